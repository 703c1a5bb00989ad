#!/usr/bin/env bash
# What mutual TLS between the services costs the fan-out: the same workload as bench/compare.sh
# (bench/workload.sh) against `channelmesh dev` on mutual TLS (its default) and on `--insecure`,
# alternating, ROUNDS times each in one run; prints delivered/s, latency and the mesh's CPU
# (user + system of the dev process, from the workload's start to its end) per delivered message
# of every run. Saturating, the load generator's core fills before the mesh's does (bench/README.md),
# so the CPU per delivery is the figure that shows what TLS costs the mesh.
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
  dev_up "$work/dev.log" "${security[@]}"
  local dev=$dev_pid
  local before
  before=$(cpu_ticks "$dev")
  taskset -c "$LOADGEN_CPU" "$loadgen_bin" fanout --target channelmesh \
    --gateway "http://127.0.0.1:${GW_PORT}/api/" --gateway "http://127.0.0.1:$((GW_PORT + 1))/api/" \
    --server-pid "$dev" "${workload[@]}" >"$work/$1-$2.json"
  echo "$(($(cpu_ticks "$dev") - before)) $(getconf CLK_TCK)" >"$work/$1-$2.cpu"
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
print(f"{'round':<6} {'services':<9} {'delivered/s':>13} {'p50 us':>9} {'p99 us':>9} {'lost':>6} {'mesh CPU s':>10} {'delivered/CPU-s':>16}")
totals = {m: [0.0, 0.0] for m in ("mtls", "insecure")}
for r in range(1, rounds + 1):
    for mode in ("mtls", "insecure"):
        d = json.load(open(f"{work}/{mode}-{r}.json"))
        ticks, hz = map(int, open(f"{work}/{mode}-{r}.cpu").read().split())
        cpu = ticks / hz
        per_cpu = d["delivered"] / cpu if cpu else 0.0
        totals[mode][0] += d["delivered_per_s"]
        totals[mode][1] += per_cpu
        print(f"{r:<6} {mode:<9} {d['delivered_per_s']:>13,.0f} {d['p50_us']:>9,} {d['p99_us']:>9,} {d['lost']:>6,} {cpu:>10.2f} {per_cpu:>16,.0f}")
(m_rate, m_cpu), (i_rate, i_cpu) = ([v / rounds for v in totals[m]] for m in ("mtls", "insecure"))
print(f"mean delivered/s: mtls {m_rate:,.0f}, insecure {i_rate:,.0f}, mtls / insecure {m_rate / i_rate:.3f}")
print(f"mean delivered per mesh CPU-second: mtls {m_cpu:,.0f}, insecure {i_cpu:,.0f}, mtls / insecure {m_cpu / i_cpu:.3f}")
EOF
