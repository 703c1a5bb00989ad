#!/usr/bin/env bash
# What mutual TLS between the services costs the fan-out: the same workload as bench/compare.sh
# (bench/workload.sh) against `channelmesh dev` on mutual TLS (its default) and on `--insecure`,
# alternating, ROUNDS times each in one run; prints delivered/s and latency of every run.
#
# The server runs pinned to core SERVER_CPU, the load generator to LOADGEN_CPU. Ports are not the
# dev defaults, and dev's state directory is a scratch one, so a developer's own dev can keep
# running.
#
#   bench/mtls-cost.sh                   # saturating (RATE=0), 3 rounds
#   ROUNDS=5 RATE=5000 bench/mtls-cost.sh
set -euo pipefail
cd "$(dirname "$0")/.." && root="$(pwd)"

# shellcheck source=bench/workload.sh
. "$root/bench/workload.sh"
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
ROUNDS="${ROUNDS:-3}"
workload=(--clients "$CLIENTS" --channels "$CHANNELS" --payload "$PAYLOAD" --seconds "$DURATION"
  --rate "$RATE" --window "$WINDOW" --processes "$PROCESSES" --publish clients --json)
BASE="${BASE:-22000}"
GW_PORT="${GW_PORT:-9180}"
export CHANNELMESH_JWT_SECRET="bench-$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"
export CHANNELMESH_ADMIN_TOKEN="bench-$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"

run() { # mode (mtls|insecure) round: one dev, one workload, its report in $work/MODE-ROUND.json
  local security=(--state-dir "$work/state")
  [ "$1" = insecure ] && security=(--insecure)
  taskset -c "$SERVER_CPU" "$bin" dev \
    --ring-manager "127.0.0.1:$((BASE + 50))" --admin "127.0.0.1:$((BASE + 51))" \
    --presence-ring-manager "127.0.0.1:$((BASE + 52))" \
    --channel-server-port "$((BASE + 61))" --presence-server-port "$((BASE + 71))" \
    --us-east "127.0.0.1:${GW_PORT}" --eu-west "127.0.0.1:$((GW_PORT + 1))" \
    --http "127.0.0.1:$((BASE + 90))" --presence-http "127.0.0.1:$((BASE + 92))" \
    --client-frames-per-sec 0 --handshakes-per-sec 0 "${security[@]}" >"$work/dev.log" 2>&1 &
  local dev=$!
  started+=("$dev")
  for _ in $(seq 300); do
    grep -q '^ready in' "$work/dev.log" && break
    sleep 0.1
  done
  taskset -c "$LOADGEN_CPU" "$loadgen_bin" fanout --target channelmesh \
    --gateway "http://127.0.0.1:${GW_PORT}/api/" --gateway "http://127.0.0.1:$((GW_PORT + 1))/api/" \
    --server-pid "$dev" "${workload[@]}" >"$work/$1-$2.json"
  kill "$dev"
  wait "$dev" 2>/dev/null || true
}

for round in $(seq "$ROUNDS"); do
  for mode in mtls insecure; do
    echo "round $round: $mode ..." >&2
    run "$mode" "$round"
  done
done

python3 - "$work" "$ROUNDS" <<'EOF'
import json, sys
work, rounds = sys.argv[1], int(sys.argv[2])
print(f"{'round':<6} {'services':<9} {'delivered/s':>13} {'p50 us':>9} {'p99 us':>9} {'lost':>6}")
totals = {"mtls": 0.0, "insecure": 0.0}
for r in range(1, rounds + 1):
    for mode in ("mtls", "insecure"):
        d = json.load(open(f"{work}/{mode}-{r}.json"))
        totals[mode] += d["delivered_per_s"]
        print(f"{r:<6} {mode:<9} {d['delivered_per_s']:>13,.0f} {d['p50_us']:>9,} {d['p99_us']:>9,} {d['lost']:>6,}")
mtls, insecure = totals["mtls"] / rounds, totals["insecure"] / rounds
print(f"mean: mtls {mtls:,.0f}/s, insecure {insecure:,.0f}/s, mtls / insecure {mtls / insecure:.3f}")
EOF
