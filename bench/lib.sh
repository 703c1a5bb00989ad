# Shared by the benchmark scripts (sourced): the binary, a scratch folder, the processes
# started (stopped on exit), and waiting for a port.

# BIN=path runs a binary already built instead of building the release one.
if [ -z "${BIN:-}" ]; then
  cargo build --release --bin channelmesh
  BIN=target/release/channelmesh
fi
work="$(mktemp -d)"
# A copy: other builds sharing target/ cannot swap the binary under the running workers.
cp "$BIN" "$work/channelmesh"
bin="$work/channelmesh"
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
