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
started=()
cleanup() {
  for pid in "${started[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${started[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
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
