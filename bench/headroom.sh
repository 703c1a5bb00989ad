#!/usr/bin/env bash
# The load generator's headroom: how many deliveries per second one load-generator core takes.
# `channelmesh-loadgen blast` (a trivial server, pinned to BLAST_CPU) writes pre-built, freshly
# stamped deliveries at RATE/s to the clients of a normal `fanout` run (pinned to LOADGEN_CPU),
# which reports delivered/s, latency and its own CPU; a rate at which it used over 85% of its core
# is marked load-generator bound. See bench/README.md ("The load generator's headroom").
#
#   bench/headroom.sh                         # builds the release load generator first
#   LOADGEN=/path/to/channelmesh-loadgen RATES="200000 400000" TARGETS=nats bench/headroom.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${LOADGEN:-}" ]; then
  cargo build --release --bin channelmesh-loadgen
  LOADGEN=target/release/channelmesh-loadgen
fi
work="$(mktemp -d)"
# A copy: another build sharing target/ cannot swap the binary under the running workers.
cp "$LOADGEN" "$work/channelmesh-loadgen"
loadgen="$work/channelmesh-loadgen"

PORT="${BLAST_PORT:-32095}"
RATES="${RATES:-100000 200000 400000 600000 800000}"
TARGETS="${TARGETS:-channelmesh nats}"
CLIENTS="${CLIENTS:-1000}"
CHANNELS="${CHANNELS:-10}"
SECONDS_EACH="${SECONDS_EACH:-5}"
PAYLOAD="${PAYLOAD:-200}"
BLAST_CPU="${BLAST_CPU:-0}"
LOADGEN_CPU="${LOADGEN_CPU:-1}"
# The blaster signs nothing and checks nothing; the fanout run needs a secret to mint tokens.
export CHANNELMESH_JWT_SECRET="headroom-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"

blaster=""
cleanup() {
  if [ -n "$blaster" ]; then kill "$blaster" 2>/dev/null || true; wait "$blaster" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# cpu_us/delivery: the load generator's CPU per delivery; at_85%: the deliveries/s one core
# would take at 85% busy at that cost (the projection; the rates actually reached are the proof).
printf '%-12s %10s %12s %9s %9s %9s %8s %9s %10s %s\n' target offered delivered/s p50_us p99_us max_us cores cpu_us/d at_85% bound
for target in $TARGETS; do
  for rate in $RATES; do
    taskset -c "$BLAST_CPU" "$loadgen" blast --listen "127.0.0.1:$PORT" --target "$target" \
      --rate "$rate" --payload "$PAYLOAD" 2>"$work/blast-$target-$rate.log" &
    blaster=$!
    for _ in $(seq 100); do
      (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
      sleep 0.1
    done
    if [ "$target" = nats ]; then gateway="ws://127.0.0.1:$PORT"; else gateway="http://127.0.0.1:$PORT/api/"; fi
    # A trickle of publishes: the first starts the blast; the blaster acknowledges them all.
    taskset -c "$LOADGEN_CPU" "$loadgen" fanout --target "$target" --gateway "$gateway" \
      --clients "$CLIENTS" --channels "$CHANNELS" --rate 10 --seconds "$SECONDS_EACH" \
      --payload "$PAYLOAD" --processes 1 --json >"$work/run.json"
    kill "$blaster"
    wait "$blaster" 2>/dev/null || true
    blaster=""
    python3 - "$target" "$rate" "$work/run.json" <<'EOF'
import json, sys
target, rate, path = sys.argv[1:]
r = json.load(open(path))
cores, per_s = r['loadgen_cpu_cores'], r['delivered_per_s']
cost = cores * 1e6 / per_s if per_s else 0.0
at85 = 0.85 * per_s / cores if cores else 0.0
print(f"{target:<12} {int(rate):>10} {per_s:>12.0f} {r['p50_us']:>9} {r['p99_us']:>9} {r['max_us']:>9} "
      f"{cores:>8.2f} {cost:>9.2f} {at85:>10.0f} {'LOADGEN-BOUND' if r['loadgen_bound'] else ''}")
EOF
    grep -h 'skipped' "$work/blast-$target-$rate.log" | tail -1 | sed 's/^/    /'
  done
done
