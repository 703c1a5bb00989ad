#!/usr/bin/env bash
# Scale on one box: COUNT clients of one team held open over GATEWAYS gateway processes (each
# under the 20,000-open-files limit), then one message to the team's channel, which every
# connection follows. A `channelmesh dev` mesh (release build, mutual TLS inside unless
# INSECURE=1) runs the ring managers, channel, presence and admin servers; the gateways are
# processes of their own; `channelmesh-loadgen scale` connects the clients from worker processes
# (one per gateway, each from its own 127.0.0.x source address) through the real connect flow,
# measures memory (servers' RSS, the kernel's slab and TCP pages, its own RSS) before and after,
# posts the message through the admin API (PostMessage) and reports who received it and when.
#
#   bench/scale.sh                          # 500,000 clients over 28 gateways
#   COUNT=2000 GATEWAYS=2 bench/scale.sh    # a quick look
#
# Prints the loadgen's table (stderr) and its JSON report (stdout, also kept in $OUT when set).
# MIN_FREE_MB (default 3072): the run is stopped when the box's available memory falls under it.
# Changes no sysctl; stops everything it started on exit.
set -euo pipefail
cd "$(dirname "$0")/.." && root="$(pwd)"

COUNT="${COUNT:-500000}"
# 17,900 clients at most per gateway: under its default --max-connections (18,000) and the
# 20,000 open files of a process, with room for its upstreams and the rtm.connect calls.
GATEWAYS="${GATEWAYS:-$(((COUNT + 17899) / 17900))}"
CONCURRENCY="${CONCURRENCY:-32}"
# Connects per second over all workers (0: unpaced); see `scale --rate`.
RATE="${RATE:-1500}"
MIN_FREE_MB="${MIN_FREE_MB:-3072}"
# The nice value of the `dev` process (ring managers, channel and presence servers, admin): its
# ring leases are 400 ms, and on a box whose every core is busy (gateways, load generator, other
# jobs) a starved heartbeat gets a channel server declared down and its slots moved, which
# stalls the connects. -10 lets the control plane run first; 0 leaves it as it is.
SERVER_NICE="${SERVER_NICE:--10}"
# The gateways' nice value: above the load generator's and other jobs' (their presence and ring
# sessions have leases of their own), below the control plane's.
GATEWAY_NICE="${GATEWAY_NICE:--5}"
# MULTI_PROCESS=1 runs `dev --multi-process`: each ring manager, channel, presence and admin
# server a process of its own (and its own runtime, so that one server's work does not hold up
# another's heartbeats); their RSS is summed as "the other servers".
MULTI_PROCESS="${MULTI_PROCESS:-0}"
BASE="${BASE:-35000}"
GW_PORT="${GW_PORT:-35080}"
# dev takes BASE+50..BASE+132 (its services, their HTTP sides at +40) and GW_PORT, GW_PORT+1;
# the scale gateways listen on GW_PORT+201...

# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"

free_mb() { awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo; }
# A rough need: ~30 KB per client over servers, kernel and load generator.
need_mb=$((COUNT * 30 / 1024 + MIN_FREE_MB))
if [ "$(free_mb)" -lt "$need_mb" ]; then
  echo "scale: $(free_mb) MB available, about $need_mb MB needed for $COUNT clients" >&2
  exit 1
fi

export CHANNELMESH_JWT_SECRET="bench-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
export CHANNELMESH_ADMIN_TOKEN="bench-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
limits=()
for flag in --handshakes-per-sec --connects-per-addr-per-sec; do
  if "$bin" gateway --help | grep -q -- "$flag"; then
    limits+=("$flag" 0)
  fi
done
multi=()
if [ "$MULTI_PROCESS" = 1 ]; then
  multi+=(--multi-process)
fi
nice -n "$SERVER_NICE" "$bin" dev \
  --ring-manager "127.0.0.1:$((BASE + 50))" --admin "127.0.0.1:$((BASE + 51))" \
  --presence-ring-manager "127.0.0.1:$((BASE + 52))" \
  --channel-server-port "$((BASE + 61))" --presence-server-port "$((BASE + 71))" \
  --us-east "127.0.0.1:${GW_PORT}" --eu-west "127.0.0.1:$((GW_PORT + 1))" \
  --http "127.0.0.1:$((BASE + 90))" --presence-http "127.0.0.1:$((BASE + 92))" \
  "${dev_security[@]}" "${multi[@]}" >"$work/dev.log" 2>&1 &
dev_pid=$!
started+=("$dev_pid")
for _ in $(seq 600); do
  grep -q '^ready in' "$work/dev.log" && break
  sleep 0.1
done
grep -q '^ready in' "$work/dev.log" || {
  echo "channelmesh dev was not ready in 60 s; its log:" >&2
  cat "$work/dev.log" >&2
  exit 1
}

args=(--server-pid "$dev_pid")
for child in $(pgrep -P "$dev_pid" || true); do
  args+=(--server-pid "$child")
done
for g in $(seq 1 "$GATEWAYS"); do
  port=$((GW_PORT + 200 + g))
  read -r -a security <<<"$(gateway_security "us-east-scale-$g")"
  nice -n "$GATEWAY_NICE" "$bin" gateway --region us-east --id "us-east-scale-$g" --listen "127.0.0.1:$port" \
    --ring-manager "http://127.0.0.1:$((BASE + 50))" \
    --presence-ring-manager "http://127.0.0.1:$((BASE + 52))" \
    "${security[@]}" "${limits[@]}" >"$work/gateway-$g.log" 2>&1 &
  started+=("$!")
  args+=(--gateway "http://127.0.0.1:$port/api/" --gateway-pid "$!")
done
for g in $(seq 1 "$GATEWAYS"); do
  wait_port 127.0.0.1 "$((GW_PORT + 200 + g))"
done

"$loadgen_bin" scale --clients "$COUNT" --admin "127.0.0.1:$((BASE + 51))" \
  --concurrency "$CONCURRENCY" --rate "$RATE" --json "${args[@]}" "$@" \
  >"$work/scale.json" &
loadgen_pid=$!
started+=("$loadgen_pid")
# The memory guard: the load generator (and with it its workers) stops if the box runs low.
low=0
while kill -0 "$loadgen_pid" 2>/dev/null; do
  if [ "$(free_mb)" -lt "$MIN_FREE_MB" ]; then
    echo "scale: under $MIN_FREE_MB MB available: stopping the load generator" >&2
    low=1
    kill "$loadgen_pid"
    break
  fi
  sleep 1
done
status=0
wait "$loadgen_pid" || status=$?
if [ "$low" = 1 ]; then
  exit 1
fi
if [ "$status" != 0 ]; then
  echo "scale: the load generator failed ($status); the gateways' last lines:" >&2
  tail -n 3 "$work"/gateway-*.log >&2 || true
  exit "$status"
fi
cat "$work/scale.json"
if [ -n "${OUT:-}" ]; then
  cp "$work/scale.json" "$OUT"
fi
