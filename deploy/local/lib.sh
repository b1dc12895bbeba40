# Shared by demo.sh and the bench scripts (sourced, not run): process cleanup, loopback
# ports, and a tansu broker with the fleetgate topics.

# Topics every fleetgate deployment needs.
FLEETGATE_TOPICS=(telemetry.events.v1 telemetry.rejected.v1 fleet.device-state.v1 telemetry.quarantined.v1 telemetry.anomalies.v1 fleet.quarantine.v1)

pids=()

# Kills every process in `pids` on exit; on failure points at the logs in $1.
# Usage: on_exit_cleanup LOG_HINT
on_exit_cleanup() {
    cleanup_hint=$1
    trap _cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

_cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $status -ne 0 ]]; then
        echo "failed (exit $status); logs in $cleanup_hint" >&2
    fi
    exit "$status"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_for_port() {
    local port=$1 deadline=$((SECONDS + 30))
    until python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; do
        if ((SECONDS > deadline)); then
            echo "nothing listening on 127.0.0.1:$port" >&2
            return 1
        fi
        sleep 0.2
    done
}

# Starts tansu (in-memory) on a free port, creates FLEETGATE_TOPICS with 3
# partitions, and sets `bootstrap` and `broker_pid`. Usage: start_broker TANSU_BIN WORK_DIR
start_broker() {
    local tansu=$1 work=$2 port
    port=$(free_port)
    bootstrap="127.0.0.1:$port"
    "$tansu" broker \
        --listener-url "tcp://$bootstrap" \
        --advertised-listener-url "tcp://$bootstrap" \
        --storage-engine memory://tansu/ \
        >"$work/tansu.log" 2>&1 &
    broker_pid=$!
    pids+=("$broker_pid")
    wait_for_port "$port"
    for topic in "${FLEETGATE_TOPICS[@]}"; do
        "$tansu" topic create --broker "tcp://$bootstrap" --partitions 3 "$topic" >>"$work/tansu.log" 2>&1
    done
}

# Starts `fleetgate-ingest --config CONFIG` with logs in DIR, waits for its ready line,
# and sets `ingest_pid`, `ready`, `grpc_addr`, `quic_addr`, `metrics_addr`.
# Usage: start_ingest BIN CONFIG DIR   (FLEETGATE_* in the environment apply)
start_ingest() {
    local bin=$1 config=$2 dir=$3 deadline
    "$bin" --config "$config" >"$dir/ingest.out" 2>"$dir/ingest.log" &
    ingest_pid=$!
    pids+=("$ingest_pid")
    deadline=$((SECONDS + 30))
    until grep -q '^fleetgate-ingest ready' "$dir/ingest.out" 2>/dev/null; do
        if ! kill -0 "$ingest_pid" 2>/dev/null || ((SECONDS > deadline)); then
            echo "ingest did not become ready:" >&2
            tail -n 30 "$dir/ingest.log" >&2
            return 1
        fi
        sleep 0.2
    done
    ready="$(grep -m1 '^fleetgate-ingest ready' "$dir/ingest.out")"
    grpc_addr="$(sed -n 's/.* grpc=\([^ ]*\).*/\1/p' <<<"$ready")"
    quic_addr="$(sed -n 's/.* quic=\([^ ]*\).*/\1/p' <<<"$ready")"
    metrics_addr="$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' <<<"$ready")"
}

# Prints an ingest config on loopback ephemeral ports for a dev PKI made by
# `fleetgate-pki init` and the broker at `$bootstrap`; callers append their own tables.
# Usage: local_ingest_toml NODE_ID PKI_DIR > FILE
local_ingest_toml() {
    local node=$1 pki=$2
    cat <<TOML
node_id = "$node"
log_format = "text"

[grpc]
listen = "127.0.0.1:0"

[quic]
listen = "127.0.0.1:0"

[metrics]
listen = "127.0.0.1:0"

[tls]
server_cert = "$pki/server.pem"
server_key = "$pki/server.key"
client_ca = "$pki/ca.pem"
trust_domain = "fleetgate.local"

[kafka]
bootstrap_servers = "$bootstrap"
TOML
}

# TOML lifting the node and fleet event quotas (defaults 100k and 50k events/s), for
# benches that measure capacity rather than quotas. Usage: bench_quotas_off >> FILE
bench_quotas_off() {
    cat <<TOML
[quota.global]
events_per_sec = 0
event_burst = 0
bytes_per_sec = 0
byte_burst = 0

[quota.fleet]
events_per_sec = 0
event_burst = 0
bytes_per_sec = 0
byte_burst = 0
TOML
}

# Progress line for the bench scripts, on stderr (their stdout is the result);
# demo.sh defines its own.
step() { printf '==> %s\n' "$*" >&2; }

# What every bench needs first: the broker binary, a release build of ingest, pki and
# loadgen, an empty WORK_DIR, and a broker with FLEETGATE_TOPICS (sets `tansu` and
# `bootstrap`). Usage: bench_setup WORK_DIR
bench_setup() {
    local work=$1 root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    step "tansu"
    tansu="$(bash "$root/deploy/local/ensure-tansu.sh")"
    step "build (release)"
    (cd "$root" && cargo build --release --bin fleetgate-ingest --bin fleetgate-pki --bin fleetgate-loadgen)
    rm -rf "$work"
    mkdir -p "$work"
    step "broker"
    start_broker "$tansu" "$work"
}
