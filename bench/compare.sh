#!/usr/bin/env bash
# Side by side: the same workload (same clients, channels, payload, client code; only the
# protocol differs) against nats-server's WebSocket listener, then against `channelmesh dev`
# (release build), in one run; prints both and the ratio.
#
# MODE=open (the default): open loop. Publishers never wait for acknowledgements; the total
# publish rate steps through RATES (published/s over the run), STEP_SECONDS each, settling after
# each, in one connected run per shape and server. For each shape in SHAPES it prints one row
# per rate with both servers side by side (delivered/s, lost, p50/p99/p99.9/max, server CPU,
# load-generator CPU, bound), each server's max sustainable rate (0 lost, p99 <= 100 ms, the
# pace kept, not load-generator bound) and the ratio channelmesh / nats-server
# (bench/open_table.py prints the tables).
#   per-channel  one publisher connection per channel (its first member)
#   firehose     one connection publishing to every channel round-robin
#   admin        the admin API's PublishStream from one process (channelmesh only: nats-server
#                has no admin API)
#   chat         the chat scenario (CHAT_CLIENTS over CHAT_CHANNELS), per-channel publishers,
#                at CHAT_RATES
# MODE=closed: the closed loop (at most WINDOW unacknowledged per publisher, NATS held to the
# same with a PING per burst), saturating with RATE=0, as this script always measured.
#
# The server runs pinned to core SERVER_CPU, the load generator to LOADGEN_CPU. Everything this
# script starts is stopped when it exits. Ports are not the dev defaults, so a developer's own
# `channelmesh dev` can keep running.
#
#   bench/compare.sh                     # open loop, every shape, RATES 2k..32k
#   SHAPES=per-channel RATES=4000,8000,16000 STEP_SECONDS=10 bench/compare.sh
#   ROUNDS=3 SHAPES=per-channel bench/compare.sh   # three alternating rounds of both servers:
#                                        # each round's table, then each round's max
#                                        # sustainable and ratio, and the median ratio
#   MODE=closed bench/compare.sh         # closed loop, saturating: RATE=0
#   MODE=closed RATE=20000 DURATION=20 bench/compare.sh
#   MODE=closed TRACE=1 RATE=6500 bench/compare.sh   # also: where the latency waits (perf)
#   INSECURE=1 bench/compare.sh          # channelmesh's services on plaintext gRPC, not mTLS
#   DEV_FLAGS=--multi-process bench/compare.sh   # every service a process of its own, as
#                                        # deployed (all pinned to the same core; the server's
#                                        # CPU and RSS are the process tree's)
set -euo pipefail
cd "$(dirname "$0")/.." && root="$(pwd)"

# shellcheck source=bench/workload.sh
. "$root/bench/workload.sh"
NATS_WS_PORT="${NATS_WS_PORT:-4223}"
NATS_PORT="${NATS_PORT:-14222}"
# channelmesh dev's ports: BASE+50 ring manager, +51 admin, +52 presence ring manager,
# +61.. channel servers, +71.. presence servers, +90/+92 consoles; gateways GW_PORT and +1.
BASE="${BASE:-21000}"
GW_PORT="${GW_PORT:-9080}"
# NODE_PEER=1 adds a second peer: bench/node-peer/server.js, Node's `ws` with the common
# in-process pub/sub pattern, speaking the RTM subset the load generator uses (so it is driven
# exactly as channelmesh is, `--target channelmesh`); `npm install`s `ws` on first use.
NODE_PEER="${NODE_PEER:-0}"
NODE_PORT="${NODE_PORT:-4724}"
# TRACE=1: for 2 s of each run's publishing, perf traces the socket syscalls of the server and
# of the load generator's workers. Per client connection, it pairs each write with the other
# side's next read: how long bytes waited in a socket before the reader got to them. "loadgen
# read wait" is the load generator's own share of the latency (server write -> worker read);
# "server read wait" is how long published messages waited for the server (worker write ->
# server read). Needs perf and ss; DURATION of at least 6 s.
TRACE="${TRACE:-0}"
MODE="${MODE:-open}"
# Open loop (MODE=open): the shapes, the rate steps (published/s over the whole run), how long
# each step publishes and settles at most, the admin shape's PublishStreams, and the chat run's
# size and steps.
SHAPES="${SHAPES:-per-channel firehose admin chat}"
# Rounds of the open-loop runs, nats-server then channelmesh in each: on a noisy machine either
# server's maximum moves from run to run, so a ratio is read over several rounds.
ROUNDS="${ROUNDS:-1}"
RATES="${RATES:-2000,4000,8000,12000,16000,24000,32000}"
STEP_SECONDS="${STEP_SECONDS:-5}"
SETTLE_SECONDS="${SETTLE_SECONDS:-5}"
ADMIN_STREAMS="${ADMIN_STREAMS:-1}"
CHAT_CLIENTS="${CHAT_CLIENTS:-10000}"
CHAT_CHANNELS="${CHAT_CHANNELS:-10000}"
CHAT_RATES="${CHAT_RATES:-1000,2000,4000,8000,16000}"
case "$MODE" in
  open | closed) ;;
  *)
    echo "MODE must be open or closed" >&2
    exit 2
    ;;
esac

if ! command -v nats-server >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y nats-server
fi
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
# LOADGEN_BIN=path drives the workload with another build than the server's (a copy too), so
# two load generators can be compared against one server build, or one against two: a
# channelmesh-loadgen, or a channelmesh binary whose `bench` is the load generator (with the
# channelmesh-loadgen beside it, if it has one).
loadgen=("$loadgen_bin")
if [ -n "${LOADGEN_BIN:-}" ]; then
  mkdir "$work/other"
  cp "$LOADGEN_BIN" "$work/other/"
  if [ "$(basename "$LOADGEN_BIN")" = channelmesh-loadgen ]; then
    loadgen=("$work/other/channelmesh-loadgen")
  else
    if [ -f "$(dirname "$LOADGEN_BIN")/channelmesh-loadgen" ]; then
      cp "$(dirname "$LOADGEN_BIN")/channelmesh-loadgen" "$work/other/"
    fi
    loadgen=("$work/other/$(basename "$LOADGEN_BIN")" bench)
  fi
fi

nats_up() { # nats-server's WebSocket listener on NATS_WS_PORT, pinned; pid in $nats_pid
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
}

cm_up() { # channelmesh dev, pinned, client limits off ($dev_limits), its consoles on ports of
  # their own where this build has them ($dev_consoles); pid in $dev_pid
  # shellcheck disable=SC2086 # DEV_FLAGS are words
  taskset -c "$SERVER_CPU" "$bin" dev \
    --ring-manager "127.0.0.1:$((BASE + 50))" --admin "127.0.0.1:$((BASE + 51))" \
    --presence-ring-manager "127.0.0.1:$((BASE + 52))" \
    --channel-server-port "$((BASE + 61))" --presence-server-port "$((BASE + 71))" \
    --us-east "127.0.0.1:${GW_PORT}" --eu-west "127.0.0.1:$((GW_PORT + 1))" \
    "${dev_consoles[@]}" "${dev_limits[@]}" "${dev_security[@]}" ${DEV_FLAGS:-} >"$work/dev.log" 2>&1 &
  dev_pid=$!
  started+=("$dev_pid")
  wait_port 127.0.0.1 "$GW_PORT"
  wait_port 127.0.0.1 "$((GW_PORT + 1))"
  wait_port 127.0.0.1 "$((BASE + 51))"
  sleep 1
}

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

export CHANNELMESH_JWT_SECRET="bench-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
export CHANNELMESH_ADMIN_TOKEN="bench-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"

if [ "$MODE" = open ]; then
  # open_run SERVER SHAPE ROUND: one connected run of SHAPE through its rate steps against
  # SERVER (nats or channelmesh); its JSON in $work/SERVER-SHAPE.rROUND.json (none when it
  # failed).
  open_run() {
    local server=$1 shape=$2 round=$3 scenario=fanout clients=$CLIENTS channels=$CHANNELS rates=$RATES
    local out="$work/$server-$shape.r$round.json"
    local args=(--shape "$shape") target=(--target channelmesh
      --gateway "http://127.0.0.1:${GW_PORT}/api/" --gateway "http://127.0.0.1:$((GW_PORT + 1))/api/"
      --admin "127.0.0.1:$((BASE + 51))" --server-pid "${dev_pid:-0}")
    if [ "$shape" = chat ]; then
      scenario=chat clients=$CHAT_CLIENTS channels=$CHAT_CHANNELS rates=$CHAT_RATES
      args=(--shape per-channel)
    fi
    if [ "$server" = nats ]; then
      target=(--target nats --gateway "ws://127.0.0.1:${NATS_WS_PORT}" --server-pid "$nats_pid")
    fi
    echo "  $server, $shape: $scenario, ${clients} clients over ${channels} channels, rates ${rates} ..." >&2
    taskset -c "$LOADGEN_CPU" "${loadgen[@]}" "$scenario" "${target[@]}" "${args[@]}" \
      --clients "$clients" --channels "$channels" --payload "$PAYLOAD" --processes "$PROCESSES" \
      --open-loop --rates "$rates" --step-seconds "$STEP_SECONDS" \
      --settle-seconds "$SETTLE_SECONDS" --admin-streams "$ADMIN_STREAMS" --json \
      >"$out" || { echo "  $server, $shape: the run failed" >&2; rm -f "$out"; }
  }
  echo "open loop: shapes ${SHAPES}; ${PAYLOAD} B; ${STEP_SECONDS} s steps, settle <= ${SETTLE_SECONDS} s; ${PROCESSES} loadgen processes; server on core ${SERVER_CPU}, loadgen on core ${LOADGEN_CPU}" >&2
  for round in $(seq "$ROUNDS"); do
    [ "$ROUNDS" = 1 ] || echo "round $round of $ROUNDS" >&2
    nats_up
    echo "nats-server $(nats-server --version | awk '{print $NF}') ..." >&2
    for shape in $SHAPES; do
      # nats-server has no admin API.
      [ "$shape" = admin ] || open_run nats "$shape" "$round"
    done
    stop_pid "$nats_pid"
    cm_up
    echo "channelmesh dev ${dev_limits[*]} ${DEV_FLAGS:-} ..." >&2
    for shape in $SHAPES; do
      open_run channelmesh "$shape" "$round"
    done
    stop_pid "$dev_pid"
  done
  # shellcheck disable=SC2086 # the shapes are words
  python3 "$root/bench/open_table.py" "$work" $SHAPES
  exit 0
fi

# run_workload OUT SERVER_PID "PORTS" COMMAND...: the load generator's run, its JSON in OUT;
# with TRACE=1, the socket waits in OUT.trace.
run_workload() {
  local out=$1 server=$2 ports=$3
  shift 3
  if [ "$TRACE" != 1 ]; then
    "$@" >"$out"
    return
  fi
  "$@" >"$out" &
  local lg=$! n
  # Publishing starts once every client is connected and the 2 s RSS settle is over.
  for _ in $(seq 600); do
    n=$(ss -tnH state established | awk -v ports=" $ports " \
      '{ split($3, a, ":"); if (index(ports, " " a[length(a)] " ")) n++ } END { print n + 0 }')
    [ "$n" -ge "$CLIENTS" ] && break
    sleep 0.1
  done
  sleep 3
  local workers
  workers=$(pgrep -P "$lg" | paste -sd, -)
  ss -tnpH state established >"$work/trace-ss.txt"
  perf record -q -e raw_syscalls:sys_enter -p "$server,$workers" -o "$work/trace.data" \
    --filter 'id == 0 || id == 1 || id == 19 || id == 20 || id == 44 || id == 45 || id == 46 || id == 47' \
    -- sleep 2 >/dev/null 2>&1 || echo "perf record failed" >&2
  wait "$lg"
  perf script -i "$work/trace.data" -F pid,time,trace >"$work/trace.txt" 2>/dev/null
  python3 - "$work/trace-ss.txt" "$work/trace.txt" "$server" "$workers" "$ports" >"$out.trace" <<'EOF'
import collections, json, re, sys
ss, trace, server, workers, ports = sys.argv[1:6]
server, workers, ports = int(server), {int(w) for w in workers.split(",") if w}, ports.split()
# (pid, fd) -> (connection, side), for the connections to the server's client ports.
sockets = {}
for line in open(ss):
    f = line.split()
    if len(f) < 5:
        continue
    local, peer = f[2], f[3]
    if local.rsplit(":", 1)[-1] not in ports and peer.rsplit(":", 1)[-1] not in ports:
        continue
    for pid, fd in re.findall(r"pid=(\d+),fd=(\d+)", line):
        side = "server" if int(pid) == server else "loadgen" if int(pid) in workers else None
        if side:
            sockets[(int(pid), int(fd))] = (tuple(sorted((local, peer))), side)
WRITES, READS = {1, 20, 44, 46}, {0, 19, 45, 47}
# Per connection and direction, writes and reads in time order.
down, up = collections.defaultdict(list), collections.defaultdict(list)
for line in open(trace):
    m = re.match(r"\s*(\d+)\s+([\d.]+):\s+(?:raw_syscalls:sys_enter:\s+)?NR (\d+) \(([0-9a-f]+)", line)
    if not m:
        continue
    pid, t, nr, fd = int(m[1]), float(m[2]), int(m[3]), int(m[4], 16)
    conn = sockets.get((pid, fd))
    if not conn:
        continue
    key, side = conn
    if nr in WRITES:
        (down if side == "server" else up)[key].append((t, "w"))
    elif nr in READS:
        (up if side == "server" else down)[key].append((t, "r"))


def waits(events):
    """Each write's wait until the reader's next read on that connection, in microseconds."""
    out = []
    for es in events.values():
        es.sort()
        pending = []
        for t, kind in es:
            if kind == "w":
                pending.append(t)
            else:
                out += [round((t - w) * 1e6) for w in pending]
                pending = []
    return sorted(out)


report = {}
for name, events in (("loadgen_wait", down), ("server_wait", up)):
    w = waits(events)
    if w:
        report[f"{name}_p50_us"] = w[len(w) // 2]
        report[f"{name}_p99_us"] = w[min(len(w) - 1, len(w) * 99 // 100)]
        report[f"{name}_writes"] = len(w)
print(json.dumps(report))
EOF
}

workload=(--clients "$CLIENTS" --channels "$CHANNELS" --payload "$PAYLOAD" --seconds "$DURATION"
  --rate "$RATE" --window "$WINDOW" --processes "$PROCESSES" --publish clients --json)

echo "closed loop: ${CLIENTS} clients, ${CHANNELS} channels, ${PAYLOAD} B, rate ${RATE} (0 = max), window ${WINDOW}, ${DURATION} s, ${PROCESSES} loadgen processes; server on core ${SERVER_CPU}, loadgen on core ${LOADGEN_CPU}" >&2

# 1. nats-server.
nats_up
echo "nats-server $(nats-server --version | awk '{print $NF}') ..." >&2
run_workload "$work/nats.json" "$nats_pid" "$NATS_WS_PORT" \
  taskset -c "$LOADGEN_CPU" "${loadgen[@]}" fanout --target nats --gateway "ws://127.0.0.1:${NATS_WS_PORT}" \
  --server-pid "$nats_pid" "${workload[@]}"
stop_pid "$nats_pid"

# 1b. The Node peer (NODE_PEER=1).
if [ "$NODE_PEER" = 1 ]; then
  if [ ! -d "$root/bench/node-peer/node_modules/ws" ]; then
    npm install --prefix "$root/bench/node-peer" --no-audit --no-fund >&2
  fi
  taskset -c "$SERVER_CPU" node "$root/bench/node-peer/server.js" "127.0.0.1:${NODE_PORT}" \
    >"$work/node.log" 2>&1 &
  node_pid=$!
  started+=("$node_pid")
  wait_port 127.0.0.1 "$NODE_PORT"
  echo "node $(node --version) ws $(node -p "require('$root/bench/node-peer/node_modules/ws/package.json').version") ..." >&2
  run_workload "$work/node.json" "$node_pid" "$NODE_PORT" \
    taskset -c "$LOADGEN_CPU" "${loadgen[@]}" fanout --target channelmesh \
    --gateway "http://127.0.0.1:${NODE_PORT}/api/" --server-pid "$node_pid" "${workload[@]}"
  kill "$node_pid"
  wait "$node_pid" 2>/dev/null || true
fi

# 2. channelmesh dev, with the gateway's client limits off (lib.sh: $dev_limits) and, where this
# build has them, its consoles on ports of their own ($dev_consoles).
cm_up
echo "channelmesh dev ${dev_limits[*]} ..." >&2
run_workload "$work/channelmesh.json" "$dev_pid" "$GW_PORT $((GW_PORT + 1))" \
  taskset -c "$LOADGEN_CPU" "${loadgen[@]}" fanout --target channelmesh \
  --gateway "http://127.0.0.1:${GW_PORT}/api/" --gateway "http://127.0.0.1:$((GW_PORT + 1))/api/" \
  --server-pid "$dev_pid" "${workload[@]}"

python3 - "$work/nats.json" "$work/channelmesh.json" "$work/node.json" <<'EOF'
import json, os, sys
nats, cm = (json.load(open(p)) for p in sys.argv[1:3])
node = json.load(open(sys.argv[3])) if os.path.exists(sys.argv[3]) else None
if node:
    node["target"] = "node-ws"
for report, path in ((nats, sys.argv[1]), (cm, sys.argv[2]), (node, sys.argv[3])):
    if report and os.path.exists(path + ".trace"):
        report.update(json.load(open(path + ".trace")))
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
if "loadgen_wait_p50_us" in nats or "loadgen_wait_p50_us" in cm:
    rows += [
        ("loadgen wait p50 us", "loadgen_wait_p50_us", "{:,}"),
        ("loadgen wait p99 us", "loadgen_wait_p99_us", "{:,}"),
        ("server wait p50 us", "server_wait_p50_us", "{:,}"),
        ("server wait p99 us", "server_wait_p99_us", "{:,}"),
    ]
print(f"closed loop, fan-out: {cm['clients']} clients, {cm['channels']} channels (fan-out {cm['fanout']:.0f}), "
      f"{cm['payload_bytes']} B, rate {cm['rate'] or 'max'}, window {cm['window']}")
def ratio(b, a):
    return f"{b / a:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "-"


head = f"{'':<20} {'nats-server':>14} {'channelmesh':>14} {'cm / nats':>10}"
if node:
    head += f" {'node ws':>14} {'cm / node':>10}"
print(head)
for label, key, fmt in rows:
    a, b = nats.get(key), cm.get(key)
    show = lambda v: "-" if v is None else fmt.format(v)
    line = f"{label:<20} {show(a):>14} {show(b):>14} {ratio(b, a):>10}"
    if node:
        n = node.get(key)
        line += f" {show(n):>14} {ratio(b, n):>10}"
    print(line)
out = {"nats": nats, "channelmesh": cm}
if node:
    out["node"] = node
print("json:", json.dumps(out))
EOF
