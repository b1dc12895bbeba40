#!/usr/bin/env bash
# End-to-end throughput/latency bench: tansu broker (memory storage) -> dev PKI ->
# fleetgate-ingest (release) -> fleetgate-loadgen once over gRPC, once over QUIC.
# Prints one summary line per transport; reports and logs go to .local/bench.
#
# Parameters (environment):
#   DEVICES=50 BATCHES=40 EVENTS_PER_BATCH=50   load shape, per transport run
#   TRANSPORTS="grpc quic"                       which runs, in order
#   MAX_ATTEMPTS=5 INTERVAL_MS=0                 passed to loadgen
#
# Each transport uses its own fleet (bench-grpc, bench-quic) so the two runs do not
# share device sequence numbers (ingest would reject the second run as replays).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

DEVICES="${DEVICES:-50}"
BATCHES="${BATCHES:-40}"
EVENTS_PER_BATCH="${EVENTS_PER_BATCH:-50}"
TRANSPORTS="${TRANSPORTS:-grpc quic}"
MAX_ATTEMPTS="${MAX_ATTEMPTS:-5}"
INTERVAL_MS="${INTERVAL_MS:-0}"

work="$root/.local/bench"
bin="${CARGO_TARGET_DIR:-$root/target}/release"

source "$root/deploy/local/lib.sh"
on_exit_cleanup "$work/"


for t in $TRANSPORTS; do
    case "$t" in
        grpc | quic) ;;
        *) echo "unknown transport '$t' in TRANSPORTS (use grpc and/or quic)" >&2; exit 2 ;;
    esac
done

bench_setup "$work"

step "pki ($DEVICES devices per transport)"
pki="$work/pki"
"$bin/fleetgate-pki" init --dir "$pki" >"$work/pki.log"
for t in $TRANSPORTS; do
    "$bin/fleetgate-pki" device --dir "$pki" --fleet "bench-$t" --device car --count "$DEVICES" >>"$work/pki.log"
done

step "ingest"
local_ingest_toml "bench-ingest-0" "$pki" >"$work/ingest.toml"
# Saturation runs: the default fleet quota (50k events/s) must not be what is measured.
bench_quotas_off >>"$work/ingest.toml"
FLEETGATE_LOG=warn start_ingest "$bin/fleetgate-ingest" "$work/ingest.toml" "$work"
echo "$ready" >&2

step "load: $DEVICES devices x $BATCHES batches x $EVENTS_PER_BATCH events per transport"
failed=0
for t in $TRANSPORTS; do
    case "$t" in
        grpc) target=(--endpoint "https://$grpc_addr") ;;
        quic) target=(--quic-addr "$quic_addr") ;;
    esac
    if ! "$bin/fleetgate-loadgen" fleet \
        --transport "$t" "${target[@]}" \
        --pki-dir "$pki" \
        --fleet "bench-$t" \
        --devices "$DEVICES" \
        --batches "$BATCHES" \
        --events-per-batch "$EVENTS_PER_BATCH" \
        --max-attempts "$MAX_ATTEMPTS" \
        --interval-ms "$INTERVAL_MS" \
        --json "$work/loadgen-$t.json" \
        >"$work/loadgen-$t.txt" 2>"$work/loadgen-$t.log"; then
        failed=1
        echo "loadgen over $t did not get every event accepted:" >&2
        cat "$work/loadgen-$t.txt" "$work/loadgen-$t.log" >&2
    fi
done

for t in $TRANSPORTS; do
    report="$work/loadgen-$t.json"
    if [[ ! -f "$report" ]]; then
        echo "$t: no report (see $work/loadgen-$t.log)"
        failed=1
        continue
    fi
    python3 - "$report" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["batch_ack_latency"]
print(
    f"{r['transport']:<5} events {r['accepted']}/{r['events_sent']} accepted"
    f"  {r['elapsed_s']:.2f} s  {r['events_per_s']:.0f} events/s"
    f"  ack p50 {l['p50_ms']:.1f} ms  p99 {l['p99_ms']:.1f} ms  max {l['max_ms']:.1f} ms"
    f"  ({r['batches']} batches, {r['retried']} retried, {r['devices_failed']} devices failed)"
)
PY
done
echo "reports in $work" >&2
exit "$failed"
