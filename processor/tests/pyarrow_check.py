"""Reads the Parquet sink's output with pyarrow (an independent reader) and compares
it with what was sent. Prints one JSON object of findings; the Rust test asserts on it.

Usage: pyarrow_check.py OUT_DIR EXPECTED_JSONL

EXPECTED_JSONL has one object per distinct event sent, with the provenance fields
under their Parquet column names (times as epoch milliseconds) plus `speed_kph`.
"""

import collections
import datetime
import json
import os
import sys
import urllib.parse

import pyarrow.dataset as ds
import pyarrow.parquet as pq

PROVENANCE = [
    "device_id", "fleet_id", "cert_sha256", "cert_serial", "transport", "ingest_node",
    "connection_id", "received_at", "captured_at", "sent_at", "seq", "schema_version",
    "software_version", "vehicle_config_id", "ingest_version", "remote_addr",
]
TIMES = {"received_at", "captured_at", "sent_at"}


def epoch_ms(value):
    return int(value.timestamp() * 1000) if value is not None else None


def main(out_dir, expected_path):
    expected = {}
    with open(expected_path) as f:
        for line in f:
            row = json.loads(line)
            expected[(row["fleet_id"], row["device_id"], row["seq"])] = row

    files = []
    for dirpath, _, names in os.walk(out_dir):
        files += [os.path.join(dirpath, n) for n in names]
    stray = [f for f in files if not f.endswith(".parquet")]
    parquet_files = sorted(f for f in files if f.endswith(".parquet"))

    span_mismatches, partition_mismatches = [], []
    for path in parquet_files:
        table = pq.read_table(path)
        # part-<partition>-<first>-<last>.parquet must match the rows' coordinates.
        _, part, first, last = os.path.basename(path)[: -len(".parquet")].split("-")
        parts = set(table.column("kafka_partition").to_pylist())
        offsets = table.column("kafka_offset").to_pylist()
        if parts != {int(part)} or min(offsets) != int(first) or max(offsets) != int(last):
            span_mismatches.append(os.path.relpath(path, out_dir))
        # fleet=/date=/hour= must match each row's fleet_id and received_at (UTC).
        rel = os.path.relpath(os.path.dirname(path), out_dir).split(os.sep)
        keys = dict(seg.split("=", 1) for seg in rel)
        fleet = urllib.parse.unquote(keys["fleet"])
        for fid, at in zip(table.column("fleet_id").to_pylist(),
                           table.column("received_at").to_pylist()):
            at = at.astimezone(datetime.timezone.utc)
            if (fid, at.strftime("%Y-%m-%d"), at.strftime("%H")) != (fleet, keys["date"], keys["hour"]):
                partition_mismatches.append(os.path.relpath(path, out_dir))
                break

    # The whole tree as one Hive-partitioned dataset, as a data team would read it.
    dataset = ds.dataset(out_dir, format="parquet", partitioning="hive")
    table = dataset.to_table()
    rows = table.to_pylist()
    counts = collections.Counter((r["fleet_id"], r["device_id"], r["seq"]) for r in rows)
    mismatches = []
    for r in rows:
        want = expected.get((r["fleet_id"], r["device_id"], r["seq"]))
        if want is None:
            continue
        for col in PROVENANCE + ["speed_kph"]:
            got = epoch_ms(r[col]) if col in TIMES else r[col]
            if got != want[col]:
                mismatches.append({"key": [r["fleet_id"], r["device_id"], r["seq"]],
                                   "column": col, "got": str(got), "want": str(want[col])})
    per_fleet = collections.Counter(r["fleet_id"] for r in rows)
    print(json.dumps({
        "files": len(parquet_files),
        "stray_files": [os.path.relpath(f, out_dir) for f in stray],
        "rows": len(rows),
        "rows_per_fleet": dict(sorted(per_fleet.items())),
        "more_than_once": sorted([list(k) for k, n in counts.items() if n > 1])[:20],
        "missing": sorted([list(k) for k in expected if k not in counts])[:20],
        "missing_count": sum(1 for k in expected if k not in counts),
        "unexpected": sorted([list(k) for k in counts if k not in expected])[:20],
        "provenance_mismatches": mismatches[:20],
        "span_mismatches": span_mismatches[:20],
        "partition_mismatches": partition_mismatches[:20],
        "schema": {f.name: str(f.type) for f in table.schema},
    }, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
