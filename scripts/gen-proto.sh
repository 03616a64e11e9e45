#!/usr/bin/env bash
# Regenerates detectord/ingest/_proto/ from proto/*.proto with the pinned grpcio-tools.
# Usage: scripts/gen-proto.sh [OUT_DIR]   (default: detectord/ingest/_proto)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-detectord/ingest/_proto}
mkdir -p "$out"
python -m grpc_tools.protoc -I proto --python_out="$out" proto/*.proto
touch "$out/__init__.py"
