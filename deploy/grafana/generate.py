#!/usr/bin/env python3
"""Generates deploy/grafana/fleetgate.json: edit panels here, then
   python3 deploy/grafana/generate.py > deploy/grafana/fleetgate.json
Metric names must exist in docs/metrics.md (ingest/tests/sre_kit_e2e.rs checks)."""
import json
import sys

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEL = 'instance=~"$instance"'
RI = "$__rate_interval"

panels = []
next_id = [1]
y = [0]


def pid():
    next_id[0] += 1
    return next_id[0] - 1


def row(title):
    panels.append({
        "type": "row", "id": pid(), "title": title, "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y[0]}, "panels": [],
    })
    y[0] += 1


x_cursor = [0]


def place(w, h):
    if x_cursor[0] + w > 24:
        x_cursor[0] = 0
        y[0] += 8
    pos = {"h": h, "w": w, "x": x_cursor[0], "y": y[0]}
    x_cursor[0] += w
    return pos


def end_row():
    if x_cursor[0]:
        y[0] += 8
    x_cursor[0] = 0


def ts(title, targets, unit="short", desc="", w=8, stack=False):
    panels.append({
        "type": "timeseries", "id": pid(), "title": title, "description": desc,
        "datasource": DS, "gridPos": place(w, 8),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                           "showPoints": "never",
                           "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "table", "placement": "bottom",
                               "calcs": ["mean", "max", "lastNotNull"], "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [
            {"datasource": DS, "refId": chr(ord("A") + i), "expr": e, "legendFormat": l,
             "range": True}
            for i, (e, l) in enumerate(targets)
        ],
    })


def stat(title, expr, unit="short", desc="", w=4, thresholds=None, legend=""):
    steps = thresholds or [{"color": "green", "value": None}]
    panels.append({
        "type": "stat", "id": pid(), "title": title, "description": desc,
        "datasource": DS, "gridPos": place(w, 8),
        "fieldConfig": {"defaults": {"unit": unit,
                                     "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto",
                    "justifyMode": "auto", "orientation": "auto"},
        "targets": [{"datasource": DS, "refId": "A", "expr": expr, "legendFormat": legend,
                     "instant": True}],
    })


def quantiles(metric, by, label_prefix):
    out = []
    for q, name in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")):
        by_clause = f"le, {by}" if by else "le"
        legend = f"{name} {{{{{by}}}}}" if by else name
        out.append((
            f"histogram_quantile({q}, sum by ({by_clause}) (rate({metric}_bucket{{{SEL}}}[{RI}])))",
            f"{label_prefix}{legend}",
        ))
    return out


# --- Overview -------------------------------------------------------------------
row("Overview")
stat("Events accepted /s", f"sum(rate(fleetgate_events_accepted_total{{{SEL}}}[{RI}]))", "ops",
     "Events stored in Kafka and acknowledged to devices, all transports.")
stat("Hard rejects",
     f'sum(rate(fleetgate_events_rejected_total{{{SEL},reason!~"duplicate|duplicate_in_flight|overloaded|delivery_failed|rate_limited_.*|quarantined"}}[{RI}]))'
     f" / clamp_min(sum(rate(fleetgate_events_accepted_total{{{SEL}}}[{RI}])) + "
     f'sum(rate(fleetgate_events_rejected_total{{{SEL},reason!~"duplicate|duplicate_in_flight|overloaded|delivery_failed|rate_limited_.*|quarantined"}}[{RI}])), 1e-9)',
     "percentunit",
     "Share of events refused for good (validation, freshness, replay, identity). Retries, quota refusals, duplicates and quarantine diversions excluded.",
     thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.01},
                 {"color": "red", "value": 0.05}])
stat("Open connections", f"sum(fleetgate_connections_open{{{SEL}}})", "short",
     "Device connections currently open (gRPC + QUIC).")
stat("Kafka delivery p99",
     f"histogram_quantile(0.99, sum by (le) (rate(fleetgate_kafka_delivery_latency_seconds_bucket{{{SEL}}}[{RI}])))",
     "s", "Enqueue to broker acknowledgement (acks=all).",
     thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.5},
                 {"color": "red", "value": 2}])
stat("Quarantined devices", f"max(fleetgate_quarantined_devices{{{SEL}}})", "short",
     "Devices the ingest quarantine registry currently diverts (max across nodes; every node holds the full registry).")
stat("Server cert expires in", f"min(fleetgate_server_cert_expiry_seconds{{{SEL}}}) - time()", "dtdurations",
     "Time until the earliest-expiring server certificate in use (notAfter minus now).",
     thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 3 * 86400},
                 {"color": "green", "value": 14 * 86400}])
end_row()

# --- Ingest rate ------------------------------------------------------------------
row("Ingest rate")
ts("Events accepted /s by transport",
   [(f"sum by (transport) (rate(fleetgate_events_accepted_total{{{SEL}}}[{RI}]))", "{{transport}}")],
   "ops", "Acknowledged events (stored in Kafka).")
ts("Batches /s by outcome",
   [(f"sum by (outcome) (rate(fleetgate_batches_total{{{SEL}}}[{RI}]))", "{{outcome}}")],
   "ops", "accepted = every event stored; partial; rejected; retry (device resends later).", stack=True)
ts("Bytes received /s by transport",
   [(f"sum by (transport) (rate(fleetgate_bytes_received_total{{{SEL}}}[{RI}]))", "{{transport}}")],
   "Bps", "Encoded batch bytes read from devices.")
ts("Events in flight",
   [(f"sum by (instance) (fleetgate_events_in_flight{{{SEL}}})", "{{instance}}")],
   "short", "Events enqueued to Kafka but not yet acknowledged (bounded; beyond the bound ingest sheds load).")
ts("Overload shed /s",
   [(f"sum(rate(fleetgate_overload_shed_total{{{SEL}}}[{RI}]))", "shed"),
    (f'sum(rate(fleetgate_events_rejected_total{{{SEL},reason="overloaded"}}[{RI}]))', "overloaded (retry)")],
   "ops", "Work refused with retry-after because a bound was reached.")
ts("Rate limited /s (top 10 fleet, reason)",
   [(f"topk(10, sum by (fleet, reason) (rate(fleetgate_rate_limited_total{{{SEL}}}[{RI}])))", "{{fleet}} {{reason}}")],
   "ops", "Events refused by per-device, per-fleet or global quotas.")
end_row()

# --- Rejects ----------------------------------------------------------------------
row("Rejects")
ts("Event rejects /s by reason",
   [(f"sum by (reason) (rate(fleetgate_events_rejected_total{{{SEL}}}[{RI}])) > 0", "{{reason}}")],
   "ops", "Per-event verdicts other than accepted; duplicate is acknowledged as accepted but counted here.",
   w=12, stack=True)
ts("Batch rejects /s by reason",
   [(f"sum by (reason) (rate(fleetgate_batches_rejected_total{{{SEL}}}[{RI}])) > 0", "{{reason}}")],
   "ops", "Whole batches refused before they were split into events.", w=12, stack=True)
ts("Handshakes /s by outcome",
   [(f"sum by (outcome) (rate(fleetgate_handshakes_total{{{SEL}}}[{RI}]))", "{{outcome}}")],
   "ops", "TLS handshakes: ok, or the refusal (no_client_cert, cert_expired, cert_revoked, ...).", w=8)
ts("Connections closed by ingest /s",
   [(f"sum by (reason) (rate(fleetgate_connections_closed_total{{{SEL}}}[{RI}]))", "{{reason}}")],
   "ops", "Open connections ingest closed on purpose: cert_revoked (a CRL update revoked the certificate) or cloned_credential.", w=8)
ts("Cloned credentials suspected",
   [(f"sum by (action) (increase(fleetgate_cloned_credential_total{{{SEL}}}[$__range]))", "{{action}}")],
   "short", "The same device identity connected while already connected; action is what the policy did (closed_older, refused_new).", w=8)
end_row()

# --- Latency ----------------------------------------------------------------------
row("Latency")
ts("Batch ack latency by transport",
   quantiles("fleetgate_batch_ack_latency_seconds", "transport", ""),
   "s", "From batch read to ack written (includes the Kafka acknowledgement).", w=12)
ts("Device clock offset (absolute)",
   quantiles("fleetgate_device_clock_offset_seconds", "", ""),
   "s", "Size of each device's smoothed clock offset (server minus device), observed once per batch.", w=12)
end_row()

# --- Kafka delivery ---------------------------------------------------------------
row("Kafka delivery")
ts("Kafka delivery latency",
   quantiles("fleetgate_kafka_delivery_latency_seconds", "", ""),
   "s", "Enqueue to broker acknowledgement (acks=all, idempotent producer).")
ts("Delivery problems /s",
   [(f"sum(rate(fleetgate_kafka_delivery_failures_total{{{SEL}}}[{RI}]))", "delivery failed"),
    (f"sum(rate(fleetgate_kafka_enqueue_failures_total{{{SEL}}}[{RI}]))", "not enqueued"),
    (f"sum(rate(fleetgate_audit_records_failed_total{{{SEL}}}[{RI}]))", "audit record lost"),
    (f"sum(rate(fleetgate_device_state_write_failures_total{{{SEL}}}[{RI}]))", "device state not persisted"),
    (f"sum(increase(fleetgate_kafka_producer_replaced_total{{{SEL}}}[{RI}]))", "producer replaced")],
   "ops", "Devices retry what was not delivered; audit and device-state losses weaken forensics and replay protection.")
ts("Producer queue",
   [(f"sum by (instance) (fleetgate_kafka_producer_queue_messages{{{SEL}}})", "{{instance}}")],
   "short", "Records waiting in librdkafka's queue (bound: kafka.max_queued_messages).")
ts("Device state records restored at start-up",
   [(f"fleetgate_device_state_records_restored{{{SEL}}}", "{{instance}}")],
   "short", "Anti-replay windows read back from fleet.device-state.v1 when the node started.")
end_row()

# --- Connections -------------------------------------------------------------------
row("Connections")
ts("Open connections by transport",
   [(f"sum by (transport) (fleetgate_connections_open{{{SEL}}})", "{{transport}}")],
   "short", "Device connections currently open.", stack=True)
ts("QUIC streams",
   [(f"sum(rate(fleetgate_quic_streams_acked_total{{{SEL}}}[{RI}]))", "acked"),
    (f"sum by (kind) (rate(fleetgate_quic_stream_errors_total{{{SEL}}}[{RI}])) > 0", "error {{kind}}")],
   "ops", "One stream per batch; errors by kind (read_timeout, reset, ...).")
ts("QUIC connections refused /s",
   [(f"sum by (reason) (rate(fleetgate_quic_connections_refused_total{{{SEL}}}[{RI}]))", "{{reason}}")],
   "ops", "Refused before the handshake (e.g. quic.max_connections reached).")
end_row()

# --- Certificates and device state ------------------------------------------------
row("Certificates and device state")
ts("CRL reloads",
   [(f"sum by (outcome) (increase(fleetgate_crl_reloads_total{{{SEL}}}[{RI}]))", "{{outcome}}")],
   "short", "CRL file changes picked up (ok) or refused (error: the previous list stays in force).")
ts("Revoked certificates in the CRL",
   [(f"max by (instance) (fleetgate_crl_revoked_certificates{{{SEL}}})", "{{instance}}")],
   "short", "Serials revoked by the CRL each node enforces; nodes should agree.")
ts("Devices tracked",
   [(f"sum by (state) (fleetgate_devices_tracked{{{SEL}}})", "{{state}}"),
    (f"sum(rate(fleetgate_sequence_gaps_total{{{SEL}}}[{RI}]))", "sequence gaps /s"),
    (f"sum(rate(fleetgate_device_state_records_followed_total{{{SEL}}}[{RI}]))", "state records from other nodes /s")],
   "short", "Anti-replay windows held in memory, sequence numbers skipped by devices, and device state followed from other nodes.")
end_row()

# --- Quarantine --------------------------------------------------------------------
row("Quarantine")
ts("Quarantined devices",
   [(f"max(fleetgate_quarantined_devices{{{SEL}}})", "registry (max over nodes)")],
   "short", "Devices whose events are diverted to telemetry.quarantined.v1.")
ts("Quarantine decisions /s",
   [(f"sum(rate(fleetgate_processor_quarantine_decisions_total[{RI}]))", "decisions")],
   "ops", "QuarantineDecision records the processor wrote to fleet.quarantine.v1.")
ts("Events diverted to quarantine /s",
   [(f'sum by (transport) (rate(fleetgate_events_rejected_total{{{SEL},reason="quarantined"}}[{RI}]))', "{{transport}}")],
   "ops", "Events of quarantined devices, acknowledged and stored on telemetry.quarantined.v1 instead of the main topic.")
ts("Quarantine enforcement latency",
   quantiles("fleetgate_quarantine_enforcement_latency_seconds", "", ""),
   "s", "Decision timestamp to enforcement by an ingest node.")
end_row()

# --- Processor ---------------------------------------------------------------------
row("Processor")
ts("Consumer lag",
   [("sum by (topic) (fleetgate_processor_consumer_lag)", "{{topic}} total"),
    ("max(fleetgate_processor_consumer_lag)", "worst partition")],
   "short", "Records between the processor group's position and the end of its input partitions.", w=12)
ts("Findings /s by detector",
   [(f"sum by (detector) (rate(fleetgate_processor_findings_total[{RI}]))", "{{detector}}")],
   "ops", "Anomaly findings written to telemetry.anomalies.v1.", w=12)
ts("Records read /s",
   [(f"sum by (input) (rate(fleetgate_processor_records_total[{RI}]))", "{{input}}"),
    (f"sum(rate(fleetgate_processor_duplicates_dropped_total[{RI}]))", "duplicates dropped"),
    (f"sum by (input) (rate(fleetgate_processor_undecodable_total[{RI}]))", "undecodable {{input}}")],
   "ops", "Input records by topic kind; redelivered duplicates and undecodable records are skipped.")
ts("Output and commit failures /s",
   [(f"sum(rate(fleetgate_processor_output_delivery_failures_total[{RI}]))", "outputs not acked"),
    (f"sum(rate(fleetgate_processor_commit_failures_total[{RI}]))", "commits refused"),
    (f"sum(rate(fleetgate_processor_commits_total[{RI}]))", "commits")],
   "ops", "Offsets are committed only after every finding and decision was acknowledged; failures mean reprocessing, not loss.")
ts("Group members and state",
   [("sum(fleetgate_processor_assigned_partitions)", "assigned partitions (all members)"),
    ("count(fleetgate_processor_assigned_partitions > 0)", "members with partitions"),
    ("sum(fleetgate_processor_outputs_in_flight)", "outputs in flight"),
    ("max(fleetgate_processor_tracked_devices)", "tracked devices (max member)")],
   "short", "Assigned partitions should equal the input partition count; members beyond it sit idle.")
end_row()

# --- Build --------------------------------------------------------------------------
row("Build")
panels.append({
    "type": "table", "id": pid(), "title": "Ingest nodes", "datasource": DS,
    "description": "One row per ingest node: version and node id.",
    "gridPos": place(24, 6),
    "fieldConfig": {"defaults": {}, "overrides": []},
    "options": {"showHeader": True},
    "transformations": [{"id": "labelsToFields", "options": {}}],
    "targets": [{"datasource": DS, "refId": "A", "expr": f"fleetgate_build_info{{{SEL}}}",
                 "format": "table", "instant": True}],
})

dashboard = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                  "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
                   {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}],
    "annotations": {"list": []},
    "description": "fleetgate ingest, Kafka delivery, quarantine and processor health. Metric reference: docs/metrics.md.",
    "editable": True,
    "graphTooltip": 1,
    "links": [],
    "panels": panels,
    "refresh": "30s",
    "schemaVersion": 39,
    "tags": ["fleetgate"],
    "templating": {"list": [
        {"name": "DS_PROMETHEUS", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
         "options": []},
        {"name": "instance", "label": "Ingest instance", "type": "query", "datasource": DS,
         "query": {"query": "label_values(fleetgate_build_info, instance)", "refId": "instance"},
         "definition": "label_values(fleetgate_build_info, instance)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2,
         "sort": 1, "hide": 0, "options": [], "regex": ""},
    ]},
    "time": {"from": "now-3h", "to": "now"},
    "timepicker": {},
    "timezone": "",
    "title": "fleetgate",
    "uid": "fleetgate-overview",
    "version": 1,
}

json.dump(dashboard, sys.stdout, indent=2)
sys.stdout.write("\n")
