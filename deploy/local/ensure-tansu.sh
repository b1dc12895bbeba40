#!/usr/bin/env bash
# Makes sure the tansu broker binary is installed and prints its path.
set -euo pipefail

TANSU_VERSION=0.6.0

if path=$(command -v tansu 2>/dev/null); then
    echo "$path"
    exit 0
fi
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
if [[ -x "$cargo_bin" ]]; then
    echo "$cargo_bin"
    exit 0
fi

echo "tansu not found; installing tansu $TANSU_VERSION with cargo (takes a while)" >&2
cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql >&2
echo "$cargo_bin"
