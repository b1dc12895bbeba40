#!/usr/bin/env python3
"""Reads telemetry.events.v1 the way a data team would: a confluent-kafka consumer
group, TelemetryEnvelope decoded with classes generated from the shipped .proto,
and duplicates removed by (fleet_id, device_id, seq). See docs/consuming.md.

    python examples/consume.py --bootstrap-servers localhost:9092 --group-id my-team

Prints one JSON line per distinct event on stdout and a summary on stderr.
Needs: pip install confluent-kafka protobuf grpcio-tools (deploy/local/ensure-python.sh).
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

from confluent_kafka import Consumer, KafkaException

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_ROOT = os.path.join(REPO, "proto", "proto")
PROTO_FILE = "fleetgate/telemetry/v1/telemetry.proto"

# How far behind a device's newest seq a redelivery is still recognised; the same
# window ingest and the processor use.
WINDOW = 1024


def load_schema(proto_root):
    """Generates telemetry_pb2 from the .proto (once per run) and imports it."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="fleetgate-pb2-")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out}",
                      os.path.join(proto_root, PROTO_FILE)])
    if rc != 0:
        sys.exit(f"protoc failed on {os.path.join(proto_root, PROTO_FILE)}")
    sys.path.insert(0, out)
    return importlib.import_module("fleetgate.telemetry.v1.telemetry_pb2")


class Deduplicator:
    """Per device: the newest seq and the seqs seen within WINDOW below it."""

    def __init__(self):
        self.devices = {}

    def fresh(self, key, seq):
        high, seen = self.devices.get(key, (0, set()))
        if seq + WINDOW <= high or seq in seen:
            return False
        seen.add(seq)
        if seq > high:
            high = seq
            seen = {s for s in seen if s + WINDOW > high}
        self.devices[key] = (high, seen)
        return True


def signal_value(sig):
    kind = sig.WhichOneof("value")
    return getattr(sig, kind) if kind else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap-servers", required=True)
    ap.add_argument("--topic", default="telemetry.events.v1")
    ap.add_argument("--group-id", required=True)
    ap.add_argument("--proto-root", default=PROTO_ROOT)
    ap.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                    help="stop after no record arrived for this long")
    ap.add_argument("--quiet", action="store_true", help="print only the summary")
    args = ap.parse_args()

    pb = load_schema(args.proto_root)
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap_servers,
        "group.id": args.group_id,
        "auto.offset.reset": "earliest",
        # Commit after processing: at-least-once, duplicates handled below.
        "enable.auto.commit": False,
    })
    consumer.subscribe([args.topic])
    dedupe = Deduplicator()
    records = events = duplicates = undecodable = 0
    last = time.monotonic()
    try:
        while True:
            msgs = consumer.consume(num_messages=500, timeout=0.5)
            if not msgs:
                if args.exit_when_idle and time.monotonic() - last >= args.exit_when_idle:
                    break
                continue
            last = time.monotonic()
            for msg in msgs:
                if msg.error():
                    raise KafkaException(msg.error())
                records += 1
                env = pb.TelemetryEnvelope()
                try:
                    env.ParseFromString(msg.value() or b"")
                except Exception:
                    undecodable += 1
                    continue
                p = env.provenance
                if not dedupe.fresh((p.fleet_id, p.device_id), p.seq):
                    duplicates += 1
                    continue
                events += 1
                if not args.quiet:
                    print(json.dumps({
                        "fleet_id": p.fleet_id, "device_id": p.device_id, "seq": p.seq,
                        "received_at_ms": p.received_at_ms, "transport": p.transport,
                        "cert_sha256": p.cert_sha256, "software_version": p.software_version,
                        "partition": msg.partition(), "offset": msg.offset(),
                        "signals": {s.name: signal_value(s) for s in env.event.signals},
                    }))
            consumer.commit(asynchronous=False)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    print(json.dumps({"records": records, "events": events, "duplicates": duplicates,
                      "undecodable": undecodable}), file=sys.stderr)


if __name__ == "__main__":
    main()
