#!/usr/bin/env bash
# Flood bench (issue #5): honest devices stream at a steady rate while a flood fleet
# sends as fast as it can and ignores retry hints (--max-attempts 1). Each scenario runs
# on a fresh release ingest node, so its peak RSS (VmHWM) belongs to that scenario.
# Prints one line per scenario: honest accepted/sent, flood offered rate and refusals,
# ingest peak RSS. Reports and logs go to .local/bench-flood.
#
# Parameters (environment):
#   HONEST_DEVICES=20 HONEST_BATCHES=50 HONEST_INTERVAL_MS=100   (50-event batches)
#   FLOOD="0 4 20 100"      flood devices per scenario (0 = honest traffic only)
#   FLOOD_BATCHES=200 FLOOD_EVENTS_PER_BATCH=500
#   FLEET_EPS=20000         per-fleet events/s quota (burst 2x); the node's capacity
#                           for one fleet, to compare the offered flood against
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

HONEST_DEVICES="${HONEST_DEVICES:-20}"
HONEST_BATCHES="${HONEST_BATCHES:-50}"
HONEST_INTERVAL_MS="${HONEST_INTERVAL_MS:-100}"
FLOOD="${FLOOD:-0 4 20 100}"
FLOOD_BATCHES="${FLOOD_BATCHES:-200}"
FLOOD_EVENTS_PER_BATCH="${FLOOD_EVENTS_PER_BATCH:-500}"
FLEET_EPS="${FLEET_EPS:-20000}"

work="$root/.local/bench-flood"
bin="${CARGO_TARGET_DIR:-$root/target}/release"

source "$root/deploy/local/lib.sh"
on_exit_cleanup "$work/"


bench_setup "$work"

pki="$work/pki"
"$bin/fleetgate-pki" init --dir "$pki" >"$work/pki.log"

run=0
for flood in $FLOOD; do
    run=$((run + 1))
    honest_fleet="honest-$run"
    flood_fleet="flood-$run"
    "$bin/fleetgate-pki" device --dir "$pki" --fleet "$honest_fleet" --device car --count "$HONEST_DEVICES" >>"$work/pki.log"
    if ((flood > 0)); then
        "$bin/fleetgate-pki" device --dir "$pki" --fleet "$flood_fleet" --device bot --count "$flood" >>"$work/pki.log"
    fi
    dir="$work/run-$run"
    mkdir -p "$dir"
    local_ingest_toml "flood-ingest-$run" "$pki" >"$dir/ingest.toml"
    cat >>"$dir/ingest.toml" <<TOML
[quota.fleet]
events_per_sec = $FLEET_EPS
event_burst = $((FLEET_EPS * 2))
bytes_per_sec = 0
byte_burst = 0
TOML
    FLEETGATE_LOG=warn start_ingest "$bin/fleetgate-ingest" "$dir/ingest.toml" "$dir"
    rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$ingest_pid/status")

    step "run $run: $HONEST_DEVICES honest devices + $flood flood devices"
    flood_pid=""
    if ((flood > 0)); then
        "$bin/fleetgate-loadgen" fleet --transport quic --quic-addr "$quic_addr" \
            --pki-dir "$pki" --fleet "$flood_fleet" --device-prefix bot \
            --devices "$flood" --batches "$FLOOD_BATCHES" \
            --events-per-batch "$FLOOD_EVENTS_PER_BATCH" --max-attempts 1 \
            --json "$dir/flood.json" >"$dir/flood.txt" 2>"$dir/flood.log" &
        flood_pid=$!
        sleep 0.5
    fi
    honest_ok=1
    "$bin/fleetgate-loadgen" fleet --transport grpc --endpoint "https://$grpc_addr" \
        --pki-dir "$pki" --fleet "$honest_fleet" \
        --devices "$HONEST_DEVICES" --batches "$HONEST_BATCHES" --events-per-batch 50 \
        --interval-ms "$HONEST_INTERVAL_MS" --max-attempts 1 \
        --json "$dir/honest.json" >"$dir/honest.txt" 2>"$dir/honest.log" || honest_ok=0
    if [[ -n "$flood_pid" ]]; then
        wait "$flood_pid" || true
    fi
    rss_peak=$(awk '/VmHWM/ {print $2}' "/proc/$ingest_pid/status")
    python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://$metrics_addr/metrics').read().decode())" \
        >"$dir/metrics.txt"
    kill "$ingest_pid"
    wait "$ingest_pid" || true
    python3 - "$dir" "$flood" "$rss_idle" "$rss_peak" "$honest_ok" "$FLEET_EPS" <<'PY'
import json, os, sys
d, flood, idle, peak, ok, cap = sys.argv[1:]
h = json.load(open(os.path.join(d, "honest.json")))
line = (f"flood devices {flood:>4}: honest {h['accepted']}/{h['events_sent']} accepted"
        f" (refused {h['rejected_by_reason'] or 'none'}), ack p99 {h['batch_ack_latency']['p99_ms']:.1f} ms")
f = os.path.join(d, "flood.json")
if os.path.exists(f):
    r = json.load(open(f))
    offered = r["events_sent"] / r["elapsed_s"]
    line += (f"; flood offered {offered:,.0f} ev/s ({offered / int(cap):.1f}x the fleet quota),"
             f" accepted {r['accepted']:,}, refused {r['rejected_by_reason']}")
line += f"; ingest RSS idle {int(idle) / 1024:.0f} MiB, peak {int(peak) / 1024:.0f} MiB"
# What ingest itself counted: refusals by reason, shed batches, refused handshakes.
counted = {}
for m in open(os.path.join(d, "metrics.txt")):
    if m.startswith("#") or " " not in m:
        continue
    series, value = m.rsplit(" ", 1)
    v = float(value)
    if v == 0:
        continue
    if series.startswith("fleetgate_rate_limited_total"):
        reason = series.split('reason="')[1].split('"')[0]
        counted[reason] = counted.get(reason, 0) + v
    elif series.startswith(("fleetgate_overload_shed_total", "fleetgate_quic_stream_errors_total")):
        counted[series.split("{")[0].removeprefix("fleetgate_") + series[series.index("{"):]] = v
    elif series.startswith("fleetgate_handshakes_total") and 'outcome="ok"' not in series:
        counted[series.removeprefix("fleetgate_")] = v
line += f"\n    ingest counted (batches): {counted or 'no refusals'}"
print(line)
if ok != "1":
    print("  honest fleet did NOT get every event accepted", file=sys.stderr)
PY
done
