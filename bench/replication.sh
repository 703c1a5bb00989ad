#!/usr/bin/env bash
# What replication costs the fan-out, side by side in one run: the same workload as
# bench/compare.sh (bench/workload.sh) against `channelmesh dev --replication-factor 1` (no
# followers) and `--replication-factor 2` (every event sent to the slot's follower and
# acknowledged by it before the publisher's ack), alternating, ROUNDS times each. Each run
# reports delivered/s, publish -> ack (the RTM `reply_to`, which waits for the follower) and
# publish -> receive latency p50/p99, and the mesh's CPU (user + system of the dev process) per
# delivered message: saturating, the load generator's core fills before the mesh's does
# (bench/README.md), so the CPU per delivery is what shows replication's cost. A second workload
# at a fixed rate (LATENCY_RATE msgs/s, below saturation) gives the latencies without queueing.
#
# The server runs pinned to core SERVER_CPU, the load generator to LOADGEN_CPU. Ports are not the
# dev defaults, and dev's state directory is a scratch one, so a developer's own dev can keep
# running. INSECURE=1 runs the services' gRPC (the replication stream too) on plaintext.
#
#   bench/replication.sh                        # saturating (RATE=0) and 2,000/s, 3 rounds
#   ROUNDS=1 DURATION=5 bench/replication.sh    # a quick look
#   FACTORS="1 2 3" bench/replication.sh
set -euo pipefail
cd "$(dirname "$0")/.." && root="$(pwd)"

# shellcheck source=bench/workload.sh
. "$root/bench/workload.sh"
BASE="${BASE:-23000}"
GW_PORT="${GW_PORT:-9280}"
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
ROUNDS="${ROUNDS:-3}"
FACTORS="${FACTORS:-1 2}"
LATENCY_RATE="${LATENCY_RATE:-2000}"
# A build without replication runs factor 1 only (what it does without the flag).
replicates=0
if "$bin" dev --help | grep -q -- '--replication-factor'; then
  replicates=1
fi
for factor in $FACTORS; do
  if [ "$replicates" = 0 ] && [ "$factor" != 1 ]; then
    echo "this channelmesh has no \`dev --replication-factor\`: it runs factor 1 only" >&2
    exit 1
  fi
done
export CHANNELMESH_JWT_SECRET="bench-$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"
export CHANNELMESH_ADMIN_TOKEN="bench-$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"

run() { # factor round rate label: one dev, one workload; its report in $work/LABEL-F-ROUND.json
  local replication=()
  [ "$replicates" = 1 ] && replication=(--replication-factor "$1")
  dev_up "$work/dev.log" "${dev_security[@]}" "${replication[@]}"
  local dev=$dev_pid before
  before=$(cpu_ticks "$dev")
  taskset -c "$LOADGEN_CPU" "$loadgen_bin" fanout --target channelmesh \
    --gateway "http://127.0.0.1:${GW_PORT}/api/" --gateway "http://127.0.0.1:$((GW_PORT + 1))/api/" \
    --clients "$CLIENTS" --channels "$CHANNELS" --payload "$PAYLOAD" --seconds "$DURATION" \
    --rate "$3" --window "$WINDOW" --processes "$PROCESSES" --publish clients --json \
    >"$work/$4-$1-$2.json"
  echo "$(($(cpu_ticks "$dev") - before)) $(getconf CLK_TCK)" >"$work/$4-$1-$2.cpu"
  kill "$dev"
  wait "$dev" 2>/dev/null || true
}

echo "workload: ${CLIENTS} clients, ${CHANNELS} channels, ${PAYLOAD} B, window ${WINDOW}, ${DURATION} s; rates ${RATE} (0 = max) and ${LATENCY_RATE}; factors ${FACTORS}; server on core ${SERVER_CPU}, loadgen on core ${LOADGEN_CPU}" >&2
for round in $(seq "$ROUNDS"); do
  for factor in $FACTORS; do
    echo "round $round: replication factor $factor, rate $RATE ..." >&2
    run "$factor" "$round" "$RATE" max
    echo "round $round: replication factor $factor, rate $LATENCY_RATE ..." >&2
    run "$factor" "$round" "$LATENCY_RATE" paced
  done
done

python3 - "$work" "$ROUNDS" "$FACTORS" "$RATE" "$LATENCY_RATE" <<'PY'
import json, sys
work, rounds, factors = sys.argv[1], int(sys.argv[2]), [int(f) for f in sys.argv[3].split()]
rates = {"max": int(sys.argv[4]), "paced": int(sys.argv[5])}
cols = ["delivered/s", "ack p50 us", "ack p99 us", "recv p50 us", "recv p99 us", "lost", "errors", "mesh CPU s", "deliv/CPU-s"]
keys = ["delivered_per_s", "ack_p50_us", "ack_p99_us", "p50_us", "p99_us", "lost", "publish_errors", "cpu", "per_cpu"]
means = {}
for label in ("max", "paced"):
    print(f"rate {rates[label] or 'max (0)'}:")
    print(f"{'round':<6} {'factor':<7}" + "".join(f" {c:>12}" for c in cols))
    for factor in factors:
        means[(label, factor)] = {k: 0.0 for k in keys}
    for r in range(1, rounds + 1):
        for factor in factors:
            d = json.load(open(f"{work}/{label}-{factor}-{r}.json"))
            ticks, hz = map(int, open(f"{work}/{label}-{factor}-{r}.cpu").read().split())
            d["cpu"] = ticks / hz
            d["per_cpu"] = d["delivered"] / d["cpu"] if d["cpu"] else 0.0
            for k in keys:
                means[(label, factor)][k] += d.get(k, 0) / rounds
            print(f"{r:<6} {factor:<7}" + "".join(
                f" {d.get(k, 0):>12,.2f}" if k == "cpu" else f" {d.get(k, 0):>12,.0f}" for k in keys))
    for factor in factors:
        m = means[(label, factor)]
        print(f"{'mean':<6} {factor:<7}" + "".join(
            f" {m[k]:>12,.2f}" if k == "cpu" else f" {m[k]:>12,.0f}" for k in keys))
base = factors[0]
for factor in factors[1:]:
    a, b = means[("max", base)], means[("max", factor)]
    ratio = lambda k: b[k] / a[k] if a[k] else float("nan")
    print(f"factor {factor} / factor {base} (saturating): delivered/s {ratio('delivered_per_s'):.3f}, "
          f"delivered per mesh CPU-second {ratio('per_cpu'):.3f}")
    a, b = means[("paced", base)], means[("paced", factor)]
    print(f"factor {factor} vs factor {base} at {rates['paced']}/s: ack p50 {a['ack_p50_us']:,.0f} -> {b['ack_p50_us']:,.0f} us, "
          f"ack p99 {a['ack_p99_us']:,.0f} -> {b['ack_p99_us']:,.0f} us, receive p50 {a['p50_us']:,.0f} -> {b['p50_us']:,.0f} us, "
          f"receive p99 {a['p99_us']:,.0f} -> {b['p99_us']:,.0f} us")
PY
