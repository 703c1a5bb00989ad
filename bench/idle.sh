#!/usr/bin/env bash
# Idle connections at scale: a `channelmesh dev` mesh (release build) for the ring, channel and
# presence servers, GATEWAYS extra us-east gateway processes (each one process, at most ~20,000
# open files), and CLIENTS idle RTM clients from PROCESSES load generator processes on
# 127.0.0.2.. . Reports connect rate and the gateways' RSS per connection (summed VmRSS of the
# gateway processes before connecting and once all are connected).
#
#   bench/idle.sh                          # 60,000 clients over 4 gateways
#   CLIENTS=20000 GATEWAYS=2 bench/idle.sh
set -euo pipefail
cd "$(dirname "$0")/.." && root="$(pwd)"

CLIENTS="${CLIENTS:-60000}"
GATEWAYS="${GATEWAYS:-4}"
PROCESSES="${PROCESSES:-$(((CLIENTS + 14999) / 15000))}"
CHANNELS="${CHANNELS:-100}"
DURATION="${DURATION:-10}"
BASE="${BASE:-21000}"
GW_PORT="${GW_PORT:-9080}"

# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"

export CHANNELMESH_JWT_SECRET="bench-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
export CHANNELMESH_ADMIN_TOKEN="bench-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
limits=()
if "$bin" gateway --help | grep -q -- '--handshakes-per-sec'; then
  limits+=(--handshakes-per-sec 0)
fi
# The load generator is thousands of clients per source address: no per-address limit.
if "$bin" gateway --help | grep -q -- '--connects-per-addr-per-sec'; then
  limits+=(--connects-per-addr-per-sec 0)
fi
consoles=()
if "$bin" dev --help | grep -q -- '--presence-http'; then
  consoles+=(--http "127.0.0.1:$((BASE + 90))" --presence-http "127.0.0.1:$((BASE + 92))")
fi
"$bin" dev \
  --ring-manager "127.0.0.1:$((BASE + 50))" --admin "127.0.0.1:$((BASE + 51))" \
  --presence-ring-manager "127.0.0.1:$((BASE + 52))" \
  --channel-server-port "$((BASE + 61))" --presence-server-port "$((BASE + 71))" \
  --us-east "127.0.0.1:${GW_PORT}" --eu-west "127.0.0.1:$((GW_PORT + 1))" \
  "${consoles[@]}" "${dev_security[@]}" >"$work/dev.log" 2>&1 &
started+=("$!")
wait_port 127.0.0.1 "$((BASE + 50))"

gateways=()
pids=()
for g in $(seq 1 "$GATEWAYS"); do
  port=$((GW_PORT + 10 + g))
  read -r -a security <<<"$(gateway_security "us-east-idle-$g")"
  # GATEWAY_WRAPPER runs each gateway under a profiler, e.g.
  # GATEWAY_WRAPPER="valgrind --tool=massif --massif-out-file=/tmp/massif.%p".
  ${GATEWAY_WRAPPER:-} "$bin" gateway --region us-east --id "us-east-idle-$g" --listen "127.0.0.1:$port" \
    --ring-manager "http://127.0.0.1:$((BASE + 50))" \
    --presence-ring-manager "http://127.0.0.1:$((BASE + 52))" \
    "${security[@]}" "${limits[@]}" >"$work/gateway-$g.log" 2>&1 &
  started+=("$!")
  pids+=(--server-pid "$!")
  gateways+=(--gateway "http://127.0.0.1:$port/api/")
done
for g in $(seq 1 "$GATEWAYS"); do
  wait_port 127.0.0.1 "$((GW_PORT + 10 + g))"
done
sleep 2

"$loadgen_bin" idle --clients "$CLIENTS" --channels "$CHANNELS" --processes "$PROCESSES" \
  --seconds "$DURATION" "${gateways[@]}" "${pids[@]}" "$@"
