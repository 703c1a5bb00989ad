# Shared by the benchmark scripts (sourced): the binaries (channelmesh, the server, as $bin;
# channelmesh-loadgen, the load generator, as $loadgen_bin), a scratch folder, how `dev` secures
# its services ($dev_security), the processes started (stopped on exit), and waiting for a port.

# BIN=path runs a channelmesh binary already built instead of building the release one; the
# load generator is the channelmesh-loadgen beside it.
if [ -z "${BIN:-}" ]; then
  cargo build --release --bin channelmesh --bin channelmesh-loadgen
  BIN=target/release/channelmesh
fi
if [ ! -f "$(dirname "$BIN")/channelmesh-loadgen" ]; then
  echo "no channelmesh-loadgen beside $BIN: cargo build --release -p channelmesh-loadgen" >&2
  exit 1
fi
work="$(mktemp -d)"
# Copies: other builds sharing target/ cannot swap a binary under the running workers. The
# load generator stays beside channelmesh, where `channelmesh bench` finds it.
cp "$BIN" "$work/channelmesh"
cp "$(dirname "$BIN")/channelmesh-loadgen" "$work/channelmesh-loadgen"
bin="$work/channelmesh"
loadgen_bin="$work/channelmesh-loadgen"
# `dev`'s flags: its state directory (its throwaway CA) in the scratch folder, apart from a
# developer's own dev; INSECURE=1 runs the services' gRPC plaintext (--insecure) instead of
# mutual TLS, to measure what mutual TLS costs.
dev_security=()
if "$bin" dev --help | grep -q -- '--state-dir'; then
  dev_security+=(--state-dir "$work/state")
fi
if [ "${INSECURE:-0}" = 1 ]; then
  dev_security+=(--insecure)
fi
# `dev`'s flags for a load run: nats-server has no per-connection frame or handshake rate
# limits, so the gateway's are turned off (where this build has them) ($dev_limits); its consoles
# on BASE+90 and BASE+92 rather than the dev defaults ($dev_consoles, with BASE set first).
dev_limits=()
for flag in --client-frames-per-sec --handshakes-per-sec --connects-per-addr-per-sec; do
  if "$bin" dev --help | grep -q -- "$flag"; then
    dev_limits+=("$flag" 0)
  fi
done
dev_consoles=()
if [ -n "${BASE:-}" ] && "$bin" dev --help | grep -q -- '--presence-http'; then
  dev_consoles+=(--http "127.0.0.1:$((BASE + 90))" --presence-http "127.0.0.1:$((BASE + 92))")
fi
started=()
# KEEP_LOGS=dir: the servers' logs are copied there when the run ends (they go with the scratch
# folder otherwise).
cleanup() {
  for pid in "${started[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${started[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "${KEEP_LOGS:-}" ]; then
    mkdir -p "$KEEP_LOGS" && cp "$work"/*.log "$KEEP_LOGS"/ 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() { # host port: wait up to 20 s for a listener
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $1:$2" >&2
  return 1
}

# A gateway process's transport (for a dev mesh started with $dev_security): a certificate
# from dev's CA (in its state directory), or --insecure.
gateway_security() { # id
  if [ "${INSECURE:-0}" = 1 ]; then
    echo --insecure
    return
  fi
  "$bin" certs --dir "$work/state" "gateway/$1" >/dev/null
  echo --tls-ca "$work/state/ca.pem" --tls-cert "$work/state/$1.pem" --tls-key "$work/state/$1.key"
}

cpu_ticks() { # user + system of process $1, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

# dev_up LOG FLAGS...: `channelmesh dev` pinned to SERVER_CPU on the BASE ports and gateways on
# GW_PORT and GW_PORT+1, its client limits off and its consoles on BASE+90/+92, with FLAGS; its
# output in LOG. Waits until it is ready (30 s at most); its pid in $dev_pid (stopped on exit).
dev_up() {
  local log=$1
  shift
  taskset -c "$SERVER_CPU" "$bin" dev \
    --ring-manager "127.0.0.1:$((BASE + 50))" --admin "127.0.0.1:$((BASE + 51))" \
    --presence-ring-manager "127.0.0.1:$((BASE + 52))" \
    --channel-server-port "$((BASE + 61))" --presence-server-port "$((BASE + 71))" \
    --us-east "127.0.0.1:${GW_PORT}" --eu-west "127.0.0.1:$((GW_PORT + 1))" \
    --http "127.0.0.1:$((BASE + 90))" --presence-http "127.0.0.1:$((BASE + 92))" \
    "${dev_limits[@]}" "$@" >"$log" 2>&1 &
  dev_pid=$!
  started+=("$dev_pid")
  for _ in $(seq 300); do
    grep -q '^ready in' "$log" && return 0
    sleep 0.1
  done
  echo "channelmesh dev was not ready in 30 s; see $log" >&2
  return 1
}
