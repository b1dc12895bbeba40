#!/usr/bin/env bash
# The pipeline's cost as a ratio (issue #7): one generated recording per transport is
# replayed at max speed through a release ingest node, and the same events are
# produced straight to the same broker with ingest's producer settings
# (`fleetgate-loadgen raw`). Prints events/s for each and the ratio, then replays
# fresh recordings at half of each transport's peak and prints the ack latencies.
# DURATION must be given in seconds (e.g. 200s).
#
# Parameters (environment):
#   DEVICES=50 DURATION=200s SAMPLE=100ms BATCH=5s   (50 events per batch)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

DEVICES="${DEVICES:-50}"
DURATION="${DURATION:-200s}"
SAMPLE="${SAMPLE:-100ms}"
BATCH="${BATCH:-5s}"

work="$root/.local/bench-ratio"
bin="${CARGO_TARGET_DIR:-$root/target}/release"

source "$root/deploy/local/lib.sh"
on_exit_cleanup "$work/"

FLEETGATE_TOPICS+=(bench.raw.v1)
bench_setup "$work"

step "recordings: $DEVICES devices x $DURATION, a sample every $SAMPLE, a batch every $BATCH"
for t in grpc quic half-grpc half-quic; do
    "$bin/fleetgate-loadgen" generate --out "$work/$t.rec" --fleet "ratio-$t" \
        --devices "$DEVICES" --duration "$DURATION" --sample-interval "$SAMPLE" \
        --batch-interval "$BATCH" --gap-probability 0 --seed 7 >&2
done

pki="$work/pki"
"$bin/fleetgate-pki" init --dir "$pki" >"$work/pki.log"
bench_ingest_toml "ratio-ingest-0" "$pki" >"$work/ingest.toml"
cat >>"$work/ingest.toml" <<TOML
# The default node quota (100k events/s) must not be what is measured.
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
FLEETGATE_LOG=warn start_ingest "$bin/fleetgate-ingest" "$work/ingest.toml" "$work"

# The in-memory broker slows as it fills, so the baseline runs before and after the
# replays (on the same records: the gRPC recording first, the QUIC one last) and the
# ratio is taken against their mean.
step "raw producer before the replays"
"$bin/fleetgate-loadgen" raw --recording "$work/grpc.rec" --bootstrap-servers "$bootstrap" \
    --json "$work/raw-before.json" >"$work/raw-before.txt" 2>"$work/raw-before.log"

for t in grpc quic; do
    step "replay over $t at max speed"
    case "$t" in
        grpc) target=(--endpoint "https://$grpc_addr") ;;
        quic) target=(--quic-addr "$quic_addr") ;;
    esac
    "$bin/fleetgate-loadgen" replay --recording "$work/$t.rec" --transport "$t" "${target[@]}" \
        --pki-dir "$pki" --speed max --json "$work/replay-$t.json" \
        >"$work/replay-$t.txt" 2>"$work/replay-$t.log"
done
step "raw producer after the replays"
"$bin/fleetgate-loadgen" raw --recording "$work/quic.rec" --bootstrap-servers "$bootstrap" \
    --json "$work/raw-after.json" >"$work/raw-after.txt" 2>"$work/raw-after.log"

# Half of the peak each transport just reached: the replay speed that offers it.
for t in grpc quic; do
    speed=$(python3 -c "import json,sys; r=json.load(open('$work/replay-$t.json')); \
        print(max(1, round(r['events_per_s'] / 2 / (r['events_sent'] / float('${DURATION%s}')))))")
    step "replay over $t at half of its peak (speed $speed)"
    case "$t" in
        grpc) target=(--endpoint "https://$grpc_addr") ;;
        quic) target=(--quic-addr "$quic_addr") ;;
    esac
    "$bin/fleetgate-loadgen" replay --recording "$work/half-$t.rec" --transport "$t" "${target[@]}" \
        --pki-dir "$pki" --speed "$speed" --json "$work/half-$t.json" \
        >"$work/half-$t.txt" 2>"$work/half-$t.log"
done

python3 - "$work" <<'PY'
import json, os, sys
d = sys.argv[1]
raws = [json.load(open(os.path.join(d, f"raw-{w}.json"))) for w in ("before", "after")]
for w, r in zip(("before", "after"), raws):
    print(f"raw {w:<7}    {r['events']:>8} events  {r['events_per_s']:>9,.0f} events/s")
raw = {"events_per_s": sum(r["events_per_s"] for r in raws) / 2}
for t in ("grpc", "quic"):
    r = json.load(open(os.path.join(d, f"replay-{t}.json")))
    l = r["batch_ack_latency"]
    print(f"ingest {t:<5}  {r['accepted']:>8} events  {r['events_per_s']:>9,.0f} events/s"
          f"  = {r['events_per_s'] / raw['events_per_s']:.0%} of raw (mean)"
          f"  (ack p50 {l['p50_ms']:.1f} ms, p99 {l['p99_ms']:.1f} ms)")
for t in ("grpc", "quic"):
    r = json.load(open(os.path.join(d, f"half-{t}.json")))
    l = r["batch_ack_latency"]
    print(f"half load {t:<5} {r['accepted']:>6} events  {r['events_per_s']:>9,.0f} events/s"
          f"  ack p50 {l['p50_ms']:.1f} ms  p90 {l.get('p90_ms', float('nan')):.1f} ms"
          f"  p99 {l['p99_ms']:.1f} ms  max {l['max_ms']:.1f} ms")
PY
