#!/usr/bin/env bash
# Concurrent QUIC connections on one ingest node (issue #7): CONNS devices, each with
# its own certificate and connection, connect, send one batch, wait HOLD_MS, send a
# second batch and are done. Every second the script samples ingest's open-connection
# gauge and RSS; memory per connection is the RSS growth at the peak divided by the
# connections open then. Results and logs go to .local/bench-connections.
#
# Parameters (environment):
#   CONNS=10000         devices, one certificate and one QUIC connection each
#   CONNECT_RATE=0      devices started per second (device i connects at i/CONNECT_RATE s);
#                       0 starts them all at once (one handshake storm)
#   HOLD_MS             pause between a device's two batches, counted from its own
#                       first ack; default 30000, or CONNS/CONNECT_RATE s + 30000 when paced
#
# How HOLD_MS works: a paced device holds its connection HOLD_MS after its own first
# batch, so device 0 starts its hold CONNS/CONNECT_RATE s before the last device even
# connects. Every device is still mid-hold when the last one connects (the peak)
# only if HOLD_MS > CONNS/CONNECT_RATE*1000 + margin. The margin covers handshakes and
# acks that lag behind the schedule under load and gives several 1 s samples at the
# peak: at least 5000 ms, 10000 ms or more at thousands of devices, e.g.
# CONNS=10000 CONNECT_RATE=500 -> 20000 + margin -> HOLD_MS=30000 or more.
# (loadgen closes every connection only once the whole fleet is done, so connections
# stay open after their second batch; with a shorter HOLD_MS the peak is still reached
# but part of it is connections that sit idle waiting for the run to end.)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

CONNS="${CONNS:-10000}"
CONNECT_RATE="${CONNECT_RATE:-0}"
if ! [[ "$CONNS" =~ ^[1-9][0-9]*$ && "$CONNECT_RATE" =~ ^[0-9]+$ ]]; then
    echo "CONNS must be a positive integer and CONNECT_RATE a non-negative one" >&2
    exit 2
fi
# Time from the first device's start to the last one's, in ms.
spread_ms=0
if ((CONNECT_RATE > 0)); then
    spread_ms=$(((CONNS - 1) * 1000 / CONNECT_RATE))
fi
HOLD_MS="${HOLD_MS:-$((spread_ms + 30000))}"
if ! [[ "$HOLD_MS" =~ ^[0-9]+$ ]]; then
    echo "HOLD_MS must be a non-negative integer (milliseconds)" >&2
    exit 2
fi
if ((CONNECT_RATE > 0 && HOLD_MS <= spread_ms)); then
    echo "warning: HOLD_MS=$HOLD_MS is not above the ${spread_ms} ms connect spread: early" \
        "devices finish their hold before the last one connects" >&2
elif ((CONNECT_RATE > 0 && HOLD_MS < spread_ms + 5000)); then
    echo "warning: HOLD_MS=$HOLD_MS leaves less than 5 s of margin over the ${spread_ms} ms" \
        "connect spread: the peak may last only a sample or two" >&2
fi

work="$root/.local/bench-connections"
bin="${CARGO_TARGET_DIR:-$root/target}/release"

source "$root/deploy/local/lib.sh"
on_exit_cleanup "$work/"

bench_setup "$work"

pki="$work/pki"
step "pki: $CONNS device certificates"
"$bin/fleetgate-pki" init --dir "$pki" >"$work/pki.log"
"$bin/fleetgate-pki" device --dir "$pki" --fleet conns --device car --count "$CONNS" >>"$work/pki.log"

local_ingest_toml "conns-ingest-0" "$pki" >"$work/ingest.toml"
cat >>"$work/ingest.toml" <<TOML
# Every device connects from 127.0.0.1 at once: lift the per-address handshake limit.
[quota.connections]
handshakes_per_sec_per_ip = 0
handshakes_per_sec = 0
max_connections = $((CONNS * 2))
TOML
FLEETGATE_LOG=warn FLEETGATE_QUIC__MAX_CONNECTIONS=$((CONNS + CONNS / 5)) \
    FLEETGATE_QUIC__IDLE_TIMEOUT=120s start_ingest "$bin/fleetgate-ingest" "$work/ingest.toml" "$work"
ingest_rss() { awk '/VmRSS/ {print $2}' "/proc/$ingest_pid/status"; }
open_conns() {
    python3 -c "
import urllib.request
for l in urllib.request.urlopen('http://$metrics_addr/metrics').read().decode().splitlines():
    if l.startswith('fleetgate_connections_open{') and 'quic' in l:
        print(int(float(l.rsplit(' ', 1)[1])))
"
}
rss_idle=$(ingest_rss)

if ((CONNECT_RATE > 0)); then
    step "$CONNS devices connect over QUIC at $CONNECT_RATE/s (over ${spread_ms} ms) and hold $HOLD_MS ms"
else
    step "$CONNS devices connect over QUIC at once and hold $HOLD_MS ms"
fi
"$bin/fleetgate-loadgen" fleet --transport quic --quic-addr "$quic_addr" \
    --pki-dir "$pki" --fleet conns --devices "$CONNS" --batches 2 --events-per-batch 10 \
    --interval-ms "$HOLD_MS" --connect-rate "$CONNECT_RATE" \
    --json "$work/loadgen.json" >"$work/loadgen.txt" 2>"$work/loadgen.log" &
loadgen_pid=$!
pids+=("$loadgen_pid")

# With pacing the peak is a plateau, not an instant: RSS "at peak" is the highest RSS
# sampled while the most connections were open, and the plateau length is reported.
peak_conns=0
rss_at_peak=0
samples_at_peak=0
while kill -0 "$loadgen_pid" 2>/dev/null; do
    c=$(open_conns || echo 0)
    c=${c:-0}
    r=$(ingest_rss)
    if ((c > peak_conns)); then
        peak_conns=$c
        rss_at_peak=$r
        samples_at_peak=1
    elif ((c == peak_conns && c > 0)); then
        samples_at_peak=$((samples_at_peak + 1))
        ((r > rss_at_peak)) && rss_at_peak=$r
    fi
    sleep 1
done
wait "$loadgen_pid" || true
rss_hwm=$(awk '/VmHWM/ {print $2}' "/proc/$ingest_pid/status")
python3 - "$work/loadgen.json" "$CONNS" "$CONNECT_RATE" "$HOLD_MS" "$peak_conns" "$samples_at_peak" \
    "$rss_idle" "$rss_at_peak" "$rss_hwm" <<'PY'
import json, sys
path, (conns, rate, hold_ms, peak, at_peak_samples, idle, at_peak, hwm) = \
    sys.argv[1], map(int, sys.argv[2:])
r = json.load(open(path))
start = f"started at {rate}/s" if rate else "started at once"
print(f"devices {conns} ({start}, hold {hold_ms} ms): "
      f"{r['accepted']}/{r['events_sent']} events accepted, {r['devices_failed']} devices failed")
print(f"peak open QUIC connections {peak} (seen in {at_peak_samples} 1 s samples); "
      f"ingest RSS idle {idle / 1024:.0f} MiB, at peak {at_peak / 1024:.0f} MiB, "
      f"high-water {hwm / 1024:.0f} MiB")
if peak:
    print(f"memory per connection: {(at_peak - idle) / peak:.1f} KiB "
          f"(RSS growth at peak / connections open)")
PY
