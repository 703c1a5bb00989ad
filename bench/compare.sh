#!/usr/bin/env bash
# Side by side: the same fan-out workload (same clients, channels, payload, rate, window, client
# code; only the protocol differs) against nats-server's WebSocket listener, then against
# `channelmesh dev` (release build), in one run; prints both and the ratio.
#
# The server runs pinned to core SERVER_CPU, the load generator to LOADGEN_CPU. Everything this
# script starts is stopped when it exits. Ports are not the dev defaults, so a developer's own
# `channelmesh dev` can keep running.
#
#   bench/compare.sh                     # saturating: RATE=0, as fast as the window allows
#   RATE=20000 DURATION=20 bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.." && root="$(pwd)"

CLIENTS="${CLIENTS:-1000}"
CHANNELS="${CHANNELS:-10}"
PAYLOAD="${PAYLOAD:-200}"
DURATION="${DURATION:-10}"
RATE="${RATE:-0}"
WINDOW="${WINDOW:-16}"
PROCESSES="${PROCESSES:-2}"
SERVER_CPU="${SERVER_CPU:-0}"
LOADGEN_CPU="${LOADGEN_CPU:-1}"
NATS_WS_PORT="${NATS_WS_PORT:-4223}"
NATS_PORT="${NATS_PORT:-14222}"
# channelmesh dev's ports: BASE+50 ring manager, +51 admin, +52 presence ring manager,
# +61.. channel servers, +71.. presence servers, +90/+92 consoles; gateways GW_PORT and +1.
BASE="${BASE:-21000}"
GW_PORT="${GW_PORT:-9080}"

if ! command -v nats-server >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y nats-server
fi
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"

workload=(--clients "$CLIENTS" --channels "$CHANNELS" --payload "$PAYLOAD" --seconds "$DURATION"
  --rate "$RATE" --window "$WINDOW" --processes "$PROCESSES" --publish clients --json)

echo "workload: ${CLIENTS} clients, ${CHANNELS} channels, ${PAYLOAD} B, rate ${RATE} (0 = max), window ${WINDOW}, ${DURATION} s, ${PROCESSES} loadgen processes; server on core ${SERVER_CPU}, loadgen on core ${LOADGEN_CPU}" >&2

# 1. nats-server.
cat >"$work/nats.conf" <<EOF
listen: "127.0.0.1:${NATS_PORT}"
websocket {
  listen: "127.0.0.1:${NATS_WS_PORT}"
  no_tls: true
}
EOF
taskset -c "$SERVER_CPU" nats-server -c "$work/nats.conf" >"$work/nats.log" 2>&1 &
nats_pid=$!
started+=("$nats_pid")
wait_port 127.0.0.1 "$NATS_WS_PORT"
echo "nats-server $(nats-server --version | awk '{print $NF}') ..." >&2
taskset -c "$LOADGEN_CPU" "$bin" bench fanout --target nats --gateway "ws://127.0.0.1:${NATS_WS_PORT}" \
  --server-pid "$nats_pid" "${workload[@]}" >"$work/nats.json"
kill "$nats_pid"
wait "$nats_pid" 2>/dev/null || true

# 2. channelmesh dev. nats-server has no per-connection frame or handshake rate limits, so
# the gateway's are turned off for the comparison (where this build has them).
export CHANNELMESH_JWT_SECRET="bench-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
export CHANNELMESH_ADMIN_TOKEN="bench-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
limits=()
if "$bin" dev --help | grep -q -- '--client-frames-per-sec'; then
  limits+=(--client-frames-per-sec 0)
fi
if "$bin" dev --help | grep -q -- '--handshakes-per-sec'; then
  limits+=(--handshakes-per-sec 0)
fi
consoles=()
if "$bin" dev --help | grep -q -- '--presence-http'; then
  consoles+=(--http "127.0.0.1:$((BASE + 90))" --presence-http "127.0.0.1:$((BASE + 92))")
fi
taskset -c "$SERVER_CPU" "$bin" dev \
  --ring-manager "127.0.0.1:$((BASE + 50))" --admin "127.0.0.1:$((BASE + 51))" \
  --presence-ring-manager "127.0.0.1:$((BASE + 52))" \
  --channel-server-port "$((BASE + 61))" --presence-server-port "$((BASE + 71))" \
  --us-east "127.0.0.1:${GW_PORT}" --eu-west "127.0.0.1:$((GW_PORT + 1))" \
  "${consoles[@]}" "${limits[@]}" >"$work/dev.log" 2>&1 &
dev_pid=$!
started+=("$dev_pid")
wait_port 127.0.0.1 "$GW_PORT"
wait_port 127.0.0.1 "$((GW_PORT + 1))"
sleep 1
echo "channelmesh dev ${limits[*]} ..." >&2
taskset -c "$LOADGEN_CPU" "$bin" bench fanout --target channelmesh \
  --gateway "http://127.0.0.1:${GW_PORT}/api/" --gateway "http://127.0.0.1:$((GW_PORT + 1))/api/" \
  --server-pid "$dev_pid" "${workload[@]}" >"$work/channelmesh.json"

python3 - "$work/nats.json" "$work/channelmesh.json" <<'EOF'
import json, sys
nats, cm = (json.load(open(p)) for p in sys.argv[1:3])
rows = [
    ("delivered msgs/s", "delivered_per_s", "{:,.0f}"),
    ("published msgs/s", "published_per_s", "{:,.0f}"),
    ("latency p50 us", "p50_us", "{:,}"),
    ("latency p99 us", "p99_us", "{:,}"),
    ("latency p99.9 us", "p999_us", "{:,}"),
    ("latency max us", "max_us", "{:,}"),
    ("delivered", "delivered", "{:,}"),
    ("lost", "lost", "{:,}"),
    ("publish errors", "publish_errors", "{:,}"),
    ("disconnects", "disconnects", "{:,}"),
    ("connects/s", "connect_per_s", "{:,.0f}"),
    ("server RSS B/conn", "rss_per_connection_bytes", "{:,.0f}"),
]
print(f"fan-out: {cm['clients']} clients, {cm['channels']} channels (fan-out {cm['fanout']:.0f}), "
      f"{cm['payload_bytes']} B, rate {cm['rate'] or 'max'}, window {cm['window']}")
print(f"{'':<20} {'nats-server':>14} {'channelmesh':>14} {'cm / nats':>10}")
for label, key, fmt in rows:
    a, b = nats.get(key), cm.get(key)
    show = lambda v: "-" if v is None else fmt.format(v)
    ratio = f"{b / a:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "-"
    print(f"{label:<20} {show(a):>14} {show(b):>14} {ratio:>10}")
print("json:", json.dumps({"nats": nats, "channelmesh": cm}))
EOF
