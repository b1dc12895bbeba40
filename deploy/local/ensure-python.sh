#!/usr/bin/env bash
# Makes sure a Python with pyarrow, confluent-kafka and protobuf tooling exists and
# prints its interpreter path (the only line on stdout). Used by the Parquet
# end-to-end test (independent reader) and by examples/consume.py.
#
# The venv lives in ${FLEETGATE_VENV:-~/.cache/fleetgate-venv}, so reruns cost one
# import check. Installs from PyPI with pip; everything else goes to stderr.
set -euo pipefail

VENV=${FLEETGATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetgate-venv}
PACKAGES=(
    "pyarrow==26.0.1"
    "confluent-kafka==2.16.1"
    "protobuf==7.36.2"
    "grpcio-tools==1.85.1"
)
CHECK='import pyarrow, pyarrow.dataset, confluent_kafka, google.protobuf, grpc_tools.protoc'
STAMP="$VENV/.fleetgate-packages"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "${PACKAGES[*]}" ]] &&
    "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    echo "$VENV/bin/python"
    exit 0
fi

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
    echo "ensure-python: $python not found; install Python 3.9+ (apt-get install python3 python3-venv)" >&2
    exit 1
fi
echo "ensure-python: creating $VENV with ${PACKAGES[*]}" >&2
mkdir -p "$(dirname "$VENV")"
if ! "$python" -m venv "$VENV" >&2; then
    echo "ensure-python: '$python -m venv' failed; install python3-venv" >&2
    exit 1
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
"$VENV/bin/python" -c "$CHECK"
echo "${PACKAGES[*]}" >"$STAMP"
echo "$VENV/bin/python"
