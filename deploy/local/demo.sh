#!/usr/bin/env bash
# End-to-end local demo: tansu broker -> dev PKI -> fleetgate-ingest -> two synthetic
# fleets over mTLS -> ingest metrics -> deduped summary of telemetry.events.v1.
# Everything runs on loopback with free ports; state and logs go to .local/demo.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

work="$root/.local/demo"
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

source "$root/deploy/local/lib.sh"
on_exit_cleanup "$work/*.log"

step() { printf '\n==> %s\n' "$*"; }

step "tansu"
tansu="$(bash deploy/local/ensure-tansu.sh)"
echo "$tansu"

step "build"
cargo build --bin fleetgate-ingest --bin fleetgate-pki --bin fleetgate-loadgen --bin fleetgate-processor

rm -rf "$work"
mkdir -p "$work"

step "broker"
start_broker "$tansu" "$work"
echo "tansu on $bootstrap with ${FLEETGATE_TOPICS[*]} (3 partitions)"

step "pki"
pki="$work/pki"
"$bin/fleetgate-pki" init --dir "$pki" >"$work/pki.log"
declare -A fleets=([acme-logistics]=5 [city-taxi]=3)
for fleet in "${!fleets[@]}"; do
    "$bin/fleetgate-pki" device --dir "$pki" --fleet "$fleet" --device car --count "${fleets[$fleet]}" >>"$work/pki.log"
done
echo "CA, server and $(find "$pki/devices" -name '*.pem' | wc -l) device certificates in $pki"

step "ingest"
local_ingest_toml "demo-ingest-0" "$pki" >"$work/ingest.toml"
start_ingest "$bin/fleetgate-ingest" "$work/ingest.toml" "$work"
echo "$ready"

step "load"
for fleet in acme-logistics city-taxi; do
    "$bin/fleetgate-loadgen" fleet \
        --endpoint "https://localhost:${grpc_addr##*:}" \
        --pki-dir "$pki" \
        --fleet "$fleet" \
        --devices "${fleets[$fleet]}" \
        --batches 20 \
        --events-per-batch 25 \
        --json "$work/loadgen-$fleet.json" \
        2> >(tee "$work/loadgen-$fleet.log" >&2)
done

step "ingest metrics"
python3 - "$metrics_addr" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10).read().decode()
for line in body.splitlines():
    if line.startswith(("fleetgate_events_accepted_total", "fleetgate_events_rejected_total")):
        print(line)
PY

step "summary of telemetry.events.v1"
"$bin/fleetgate-processor" summarize --bootstrap-servers "$bootstrap" --topic telemetry.events.v1 \
    2> >(tee "$work/processor.log" >&2)

"$bin/fleetgate-processor" summarize --bootstrap-servers "$bootstrap" --topic telemetry.events.v1 \
    --json >"$work/summary.json" 2>>"$work/processor.log"
python3 - "$work" <<'PY'
import json, sys, pathlib
work = pathlib.Path(sys.argv[1])
accepted = sum(json.loads(p.read_text())["accepted"] for p in work.glob("loadgen-*.json"))
summary = json.loads((work / "summary.json").read_text())
events, complete = summary["events_total"], summary["complete_provenance"]
print(f"loadgen accepted {accepted}; topic holds {events} distinct events, {complete} with complete provenance")
if events != accepted or complete != events:
    sys.exit("mismatch between accepted events and the topic")
PY

step "done"
echo "logs and state in $work"
