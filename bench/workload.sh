# The fan-out workload bench/compare.sh and bench/profile.sh both run (sourced), so the two
# measure the same thing: each value can be set from the environment.
CLIENTS="${CLIENTS:-1000}"
CHANNELS="${CHANNELS:-10}"
PAYLOAD="${PAYLOAD:-200}"
DURATION="${DURATION:-10}"
RATE="${RATE:-0}"
WINDOW="${WINDOW:-16}"
PROCESSES="${PROCESSES:-2}"
SERVER_CPU="${SERVER_CPU:-0}"
LOADGEN_CPU="${LOADGEN_CPU:-1}"
