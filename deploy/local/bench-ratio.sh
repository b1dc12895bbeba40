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
local_ingest_toml "ratio-ingest-0" "$pki" >"$work/ingest.toml"
bench_quotas_off >>"$work/ingest.toml"
FLEETGATE_LOG=warn start_ingest "$bin/fleetgate-ingest" "$work/ingest.toml" "$work"

# The in-memory broker slows as it fills, so the baseline runs before and after the
# replays (on the same records: the gRPC recording first, the QUIC one last) and the
# ratio is taken against their mean.
# CPU seconds (user + system) a process has used so far.
cpu_s() {
    awk -v tck="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / tck }' "/proc/$1/stat"
}

# Runs a client command and records, for that phase, the CPU seconds the client, the
# broker and ingest used. Usage: measured PHASE COMMAND...
measured() {
    local phase=$1
    shift
    local broker0 ingest0
    broker0=$(cpu_s "$broker_pid")
    ingest0=$(cpu_s "$ingest_pid")
    /usr/bin/time -f '%U %S' -o "$work/cpu-$phase-client.txt" "$@"
    awk -v b0="$broker0" -v b1="$(cpu_s "$broker_pid")" -v i0="$ingest0" -v i1="$(cpu_s "$ingest_pid")" \
        'BEGIN { printf "%.2f %.2f\n", b1 - b0, i1 - i0 }' >"$work/cpu-$phase-servers.txt"
}

step "raw producer before the replays"
measured raw-before "$bin/fleetgate-loadgen" raw --recording "$work/grpc.rec" \
    --bootstrap-servers "$bootstrap" --json "$work/raw-before.json" \
    >"$work/raw-before.txt" 2>"$work/raw-before.log"

for t in grpc quic; do
    step "replay over $t at max speed"
    case "$t" in
        grpc) target=(--endpoint "https://$grpc_addr") ;;
        quic) target=(--quic-addr "$quic_addr") ;;
    esac
    measured "replay-$t" "$bin/fleetgate-loadgen" replay --recording "$work/$t.rec" \
        --transport "$t" "${target[@]}" --pki-dir "$pki" --speed max \
        --json "$work/replay-$t.json" >"$work/replay-$t.txt" 2>"$work/replay-$t.log"
done
step "raw producer after the replays"
measured raw-after "$bin/fleetgate-loadgen" raw --recording "$work/quic.rec" \
    --bootstrap-servers "$bootstrap" --json "$work/raw-after.json" \
    >"$work/raw-after.txt" 2>"$work/raw-after.log"

# Ingest's own histograms, to split the half-load ack latency into its parts.
scrape() {
    python3 -c "import sys, urllib.request; \
        sys.stdout.write(urllib.request.urlopen('http://$metrics_addr/metrics').read().decode())" >"$1"
}

# Half of the peak each transport just reached: the replay speed that offers it.
for t in grpc quic; do
    speed=$(python3 -c "import json,sys; r=json.load(open('$work/replay-$t.json')); \
        print(max(1, round(r['events_per_s'] / 2 / (r['events_sent'] / float('${DURATION%s}')))))")
    step "replay over $t at half of its peak (speed $speed)"
    case "$t" in
        grpc) target=(--endpoint "https://$grpc_addr") ;;
        quic) target=(--quic-addr "$quic_addr") ;;
    esac
    scrape "$work/metrics-before-half-$t.txt"
    "$bin/fleetgate-loadgen" replay --recording "$work/half-$t.rec" --transport "$t" "${target[@]}" \
        --pki-dir "$pki" --speed "$speed" --json "$work/half-$t.json" \
        >"$work/half-$t.txt" 2>"$work/half-$t.log"
    scrape "$work/metrics-after-half-$t.txt"
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

def buckets(path, name, labels=""):
    """Cumulative bucket counts {le: count} of one histogram series."""
    out = {}
    for line in open(path):
        if line.startswith(name + "_bucket{") and labels in line:
            le = line.split('le="')[1].split('"')[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out

def quantile(before, after, q):
    """q-quantile of the observations between two scrapes, interpolated inside its bucket."""
    les = sorted(after)
    delta = [after[le] - before.get(le, 0.0) for le in les]
    total = delta[-1]
    if total <= 0:
        return float("nan"), 0
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in zip(les, delta):
        if n >= rank:
            if le == float("inf"):
                return prev_le * 1000, int(total)
            return (prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-9)) * 1000, int(total)
        prev_le, prev_n = le, n
    return float("nan"), int(total)

print("CPU per 1,000 events at max speed (client = loadgen replay or raw producer):")
for phase, events_file in (("raw-before", "raw-before"), ("replay-grpc", "replay-grpc"),
                           ("replay-quic", "replay-quic"), ("raw-after", "raw-after")):
    r = json.load(open(os.path.join(d, f"{events_file}.json")))
    n = r.get("accepted", r.get("events"))
    client = sum(map(float, open(os.path.join(d, f"cpu-{phase}-client.txt")).read().split()[-2:]))
    broker, ingest = map(float, open(os.path.join(d, f"cpu-{phase}-servers.txt")).read().split())
    per = lambda s: s * 1e6 / n
    print(f"  {phase:<12} client {per(client):5.1f} ms  broker {per(broker):5.1f} ms"
          f"  ingest {per(ingest):5.1f} ms  total {per(client + broker + ingest):5.1f} ms")

print("ingest's view of the half-load runs (from its /metrics histograms; bucket-interpolated):")
for t in ("grpc", "quic"):
    b, a = (os.path.join(d, f"metrics-{w}-half-{t}.txt") for w in ("before", "after"))
    for label, name, sel in (
        ("batch in ingest", "fleetgate_batch_ack_latency_seconds", f'transport="{t}"'),
        ("kafka delivery", "fleetgate_kafka_delivery_latency_seconds", ""),
    ):
        before, after = buckets(b, name, sel), buckets(a, name, sel)
        p50, n = quantile(before, after, 0.5)
        p99, _ = quantile(before, after, 0.99)
        print(f"  {t:<5} {label:<16} p50 {p50:5.1f} ms  p99 {p99:5.1f} ms  ({n} observations)")
PY
