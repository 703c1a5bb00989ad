#!/usr/bin/env bash
# One fan-out run against one server, measuring the server rather than the clients: its share
# of its core, delivered messages per server CPU-second, and (PERF_STAT=1) its socket writes
# per delivered message; PERF_RECORD=1 also records a call-graph profile for `perf report`.
#
# The same workload as bench/compare.sh, server on core SERVER_CPU, load generator on
# LOADGEN_CPU. The load generator's one core saturates before channelmesh's does, so the
# delivered rate alone understates the faster server; CPU per delivery does not.
#
#   bench/profile.sh                       # channelmesh dev, saturating
#   TARGET=nats RATE=6500 PERF_STAT=1 bench/profile.sh
#   PERF_RECORD=1 bench/profile.sh && perf report -i "$OUT/perf.data"
#   OPEN=1 RATE=4000 PERF_STAT=1 bench/profile.sh       # open loop: RATE published/s, paced
#   OPEN=1 RATE=12000 DEV_FLAGS=--multi-process PERF_RECORD=1 bench/profile.sh
#
# perf counts and samples the server's whole core (SERVER_CPU), so that `dev --multi-process`
# (every service its own process) is measured whole; the load generator is on the other core.
#
# Needs `perf` for PERF_STAT/PERF_RECORD (Debian: linux-perf). Results go to OUT
# (default bench/out/), which is kept.
set -euo pipefail
cd "$(dirname "$0")/.." && root="$(pwd)"

TARGET="${TARGET:-channelmesh}"
# shellcheck source=bench/workload.sh
. "$root/bench/workload.sh"
OUT="${OUT:-$root/bench/out}"
BASE="${BASE:-24000}"
GW_PORT="${GW_PORT:-9480}"
NATS_WS_PORT="${NATS_WS_PORT:-4623}"
# The measured window: from FROM seconds into the workload, for SPAN seconds (the connects
# before it are excluded).
FROM="${FROM:-4}"
SPAN="${SPAN:-4}"

# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
mkdir -p "$OUT"

case "$TARGET" in
  nats)
    command -v nats-server >/dev/null || { apt-get update -qq && apt-get install -y nats-server; }
    printf 'listen: "127.0.0.1:%s"\nwebsocket {\n  listen: "127.0.0.1:%s"\n  no_tls: true\n}\n' \
      "$((NATS_WS_PORT + 10000))" "$NATS_WS_PORT" >"$work/nats.conf"
    taskset -c "$SERVER_CPU" nats-server -c "$work/nats.conf" >"$OUT/server.log" 2>&1 &
    server=$!
    wait_port 127.0.0.1 "$NATS_WS_PORT"
    target=(--target nats --gateway "ws://127.0.0.1:${NATS_WS_PORT}")
    ;;
  channelmesh)
    export CHANNELMESH_JWT_SECRET="bench-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
    export CHANNELMESH_ADMIN_TOKEN="bench-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
    # shellcheck disable=SC2086 # DEV_FLAGS are words
    dev_up "$OUT/server.log" "${dev_security[@]}" ${DEV_FLAGS:-}
    server=$dev_pid
    target=(--target channelmesh --gateway "http://127.0.0.1:${GW_PORT}/api/"
      --gateway "http://127.0.0.1:$((GW_PORT + 1))/api/" --admin "127.0.0.1:$((BASE + 51))")
    ;;
  *) echo "TARGET is channelmesh or nats" >&2; exit 2 ;;
esac
started+=("$server")

ticks() { # user + system of the given processes, in clock ticks
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
  echo "$t"
}
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
hz=$(getconf CLK_TCK)

# The workload runs in the background; the window is measured once the clients are connected
# (the load generator prints its progress line "running" on stderr).
# Closed loop (the default), or OPEN=1: one open-loop step of RATE published/s for DURATION s.
pace=(--seconds "$DURATION" --rate "$RATE" --window "$WINDOW" --publish clients)
if [ "${OPEN:-0}" = 1 ]; then
  pace=(--open-loop --rates "$RATE" --step-seconds "$DURATION" --settle-seconds 5)
fi
taskset -c "$LOADGEN_CPU" "$loadgen_bin" fanout "${target[@]}" --server-pid "$server" \
  --clients "$CLIENTS" --channels "$CHANNELS" --payload "$PAYLOAD" "${pace[@]}" \
  --processes "$PROCESSES" --json >"$OUT/report.json" 2>"$OUT/loadgen.log" &
loadgen=$!
started+=("$loadgen")
# Connected: the server has accepted every client. Then skip into the run.
for _ in $(seq 600); do
  [ "$(ss -Htn state established "( sport = :${NATS_WS_PORT} or sport = :${GW_PORT} or sport = :$((GW_PORT + 1)) )" | wc -l)" -ge "$CLIENTS" ] && break
  sleep 0.1
done
sleep "$FROM"
if [ "${PERF_STAT:-0}" = 1 ]; then
  perf stat -x, -e 'syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_writev' \
    -e 'syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_epoll_wait' \
    -a -C "$SERVER_CPU" -o "$OUT/perf-stat.csv" -- sleep "$SPAN" >/dev/null 2>&1 &
  perf_pid=$!
fi
if [ "${PERF_RECORD:-0}" = 1 ]; then
  perf record -e cpu-clock -c 1000000 --call-graph dwarf,16384 -C "$SERVER_CPU" \
    -o "$OUT/perf.data" -- sleep "$SPAN" >/dev/null 2>&1 &
  perf_pid=$!
fi
workers=$(pgrep -P "$loadgen" | tr '\n' ' ')
# The server's children too: `dev --multi-process` runs each service as one.
children=$(pgrep -P "$server" | tr "\n" " " || true)
# shellcheck disable=SC2086 # lists of pids
s1=$(ticks "$server" $children); l1=$(ticks "$loadgen" $workers); b1=$(busy)
sleep "$SPAN"
# shellcheck disable=SC2086
s2=$(ticks "$server" $children); l2=$(ticks "$loadgen" $workers); b2=$(busy)
[ -n "${perf_pid:-}" ] && wait "$perf_pid" || true
wait "$loadgen"

python3 - "$OUT/report.json" "$s1" "$s2" "$l1" "$l2" "$b1" "$b2" "$hz" "$SPAN" "$OUT/perf-stat.csv" "${PERF_STAT:-0}" <<'EOF'
import json, sys
report, s1, s2, l1, l2, b1, b2, hz, span, stat, has_stat = sys.argv[1:]
r = json.load(open(report))
# An open-loop run reports its one step.
r = dict(r, **r["steps"][0]) if r.get("steps") else r
s1, s2, l1, l2, b1, b2 = (int(x) for x in (s1, s2, l1, l2, b1, b2))
hz, span = int(hz), float(span)
server = (s2 - s1) / hz / span  # cores
loadgen = (l2 - l1) / hz / span
# Busy time of neither, e.g. another job on a shared machine: a run with much of it is noise.
others = max(0.0, (b2 - b1) / hz / span - server - loadgen)
rate = r["delivered_per_s"]
print(f"target               {r['target']}")
print(f"delivered/s          {rate:,.0f}   lost {r['lost']}")
print(f"latency us           p50 {r['p50_us']}  p99 {r['p99_us']}  max {r['max_us']}")
print(f"CPU, % of a core     server {server * 100:.0f}, load generator {loadgen * 100:.0f}, other {others * 100:.0f}")
if server > 0:
    print(f"delivered per server CPU-second   {rate / server:,.0f}")
if has_stat == "1":
    writes = 0
    for line in open(stat):
        f = line.split(",")
        if len(f) > 2 and f[0].strip().isdigit():
            call = f[2].split("sys_enter_")[-1]
            print(f"{call + '/s':<21}{int(f[0]) / span:,.0f}")
            if call in ("sendto", "write", "writev"):
                writes += int(f[0])
    if writes:
        print(f"socket writes/s      {writes / span:,.0f}   delivered per write {rate * span / writes:.1f}")
EOF
