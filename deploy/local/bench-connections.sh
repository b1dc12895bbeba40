#!/usr/bin/env bash
# Concurrent QUIC connections on one ingest node (issue #7): CONNS devices, each with
# its own certificate and connection, connect, send one batch, stay connected for
# HOLD_MS, send a second batch and leave. While all are connected, the script samples
# ingest's open-connection gauge and RSS; memory per connection is the RSS growth
# divided by the connections open. Results and logs go to .local/bench-connections.
#
# Parameters (environment): CONNS=10000 HOLD_MS=30000
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

CONNS="${CONNS:-10000}"
HOLD_MS="${HOLD_MS:-30000}"

work="$root/.local/bench-connections"
bin="${CARGO_TARGET_DIR:-$root/target}/release"

source "$root/deploy/local/lib.sh"
on_exit_cleanup "$work/"

bench_setup "$work"

pki="$work/pki"
step "pki: $CONNS device certificates"
"$bin/fleetgate-pki" init --dir "$pki" >"$work/pki.log"
"$bin/fleetgate-pki" device --dir "$pki" --fleet conns --device car --count "$CONNS" >>"$work/pki.log"

bench_ingest_toml "conns-ingest-0" "$pki" >"$work/ingest.toml"
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

step "$CONNS devices connect over QUIC and stay $HOLD_MS ms"
"$bin/fleetgate-loadgen" fleet --transport quic --quic-addr "$quic_addr" \
    --pki-dir "$pki" --fleet conns --devices "$CONNS" --batches 2 --events-per-batch 10 \
    --interval-ms "$HOLD_MS" --json "$work/loadgen.json" >"$work/loadgen.txt" 2>"$work/loadgen.log" &
loadgen_pid=$!
pids+=("$loadgen_pid")

peak_conns=0
peak_rss=0
rss_at_peak=0
while kill -0 "$loadgen_pid" 2>/dev/null; do
    c=$(open_conns || echo 0)
    r=$(ingest_rss)
    if ((c > peak_conns)); then
        peak_conns=$c
        rss_at_peak=$r
    fi
    ((r > peak_rss)) && peak_rss=$r
    sleep 1
done
wait "$loadgen_pid" || true
rss_hwm=$(awk '/VmHWM/ {print $2}' "/proc/$ingest_pid/status")
python3 - "$work/loadgen.json" "$CONNS" "$peak_conns" "$rss_idle" "$rss_at_peak" "$rss_hwm" <<'PY'
import json, sys
path, conns, peak, idle, at_peak, hwm = sys.argv[1], *map(int, sys.argv[2:])
r = json.load(open(path))
print(f"devices {conns}: {r['accepted']}/{r['events_sent']} events accepted, "
      f"{r['devices_failed']} devices failed")
print(f"peak open QUIC connections {peak}; ingest RSS idle {idle / 1024:.0f} MiB, "
      f"at peak {at_peak / 1024:.0f} MiB, high-water {hwm / 1024:.0f} MiB")
if peak:
    print(f"memory per connection: {(at_peak - idle) * 1024 / peak / 1024:.1f} KiB "
          f"(RSS growth at peak / connections open)")
PY
