#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the tansu broker and the Python
# packages of the cross-client tests if missing, then
# checks formatting, lints, and runs every unit, property and integration test
# (integration tests start their own brokers and ingest nodes on loopback ports).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

TANSU_BIN="$(bash deploy/local/ensure-tansu.sh)"
export TANSU_BIN
echo "broker: $TANSU_BIN ($("$TANSU_BIN" --version 2>/dev/null || echo unknown version))"
# pyarrow and confluent-kafka for the cross-client tests (an independent Parquet reader
# and a standard Kafka consumer), in a cached venv.
echo "python: $(bash deploy/local/ensure-python.sh)"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
