#!/usr/bin/env bash
# The scale-out route, proven once (not CI): build harma with the `lance` feature, index a small
# generated archive, write the index as a Lance table to an S3-compatible server on 127.0.0.1
# (moto in server mode), query that table with LanceDB's own Python client, and check that its
# top-10 for the same query vectors equals `harma search`'s.
#
#   scripts/lance-proof.sh [WORK_DIR]        (default target/lance-proof)
#
# Needs: protoc (installed from Debian's protobuf-compiler when missing; or set PROTOC to the
# binary of the protoc-bin-vendored crate), python3 with venv, network to crates.io, PyPI and
# Debian the first time. The `lance` build is long: 35+ minutes on 2 cores (docs/SEARCH.md).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/lance-proof}
mkdir -p "$work"
work=$(cd "$work" && pwd)

if [ -z "${PROTOC:-}" ] && ! command -v protoc >/dev/null; then
  echo "installing Debian's protobuf-compiler (protoc) for lance-encoding's build script"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
fi
py="$work/venv/bin/python"
if [ ! -x "$py" ]; then
  python3 -m venv "$work/venv"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q lancedb "moto[server]" boto3
fi

cargo build --release -p harma-train --features lance
cargo build --release -p xtask
harma=target/release/harma
rm -rf "$work/archive" "$work/index" "$work/queries"
target/release/xtask search-demo --out "$work/archive" --images 60 >/dev/null
"$harma" index build --model "$work/archive/model.safetensors" --arch tiny-quickgelu \
  --images "$work/archive/images" --out "$work/index" --tile 128

port=$((20000 + RANDOM % 20000))
endpoint="http://127.0.0.1:$port"
"$work/venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -s "$endpoint" >/dev/null 2>&1 && break
  sleep 0.2
done
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
"$py" -c "import boto3; boto3.client('s3', endpoint_url='$endpoint').create_bucket(Bucket='harma-proof')"

"$harma" index export-lance "$work/index" s3://harma-proof/archive --table tiles \
  --storage-option "endpoint=$endpoint" --storage-option allow_http=true \
  --storage-option region=us-east-1 --storage-option aws_access_key_id=testing \
  --storage-option aws_secret_access_key=testing

mkdir -p "$work/queries"
i=0
while IFS= read -r q; do
  "$harma" search "$work/index" "$q" --json --vector -k 10 >"$work/queries/$i.json"
  i=$((i + 1))
done <<'QUERIES'
a river crossing farmland
many buildings along a straight road
a lake in the middle of a forest
a desert with a few red buildings
green grassland next to a crossing of two roads
QUERIES

"$py" scripts/lance_check.py "s3://harma-proof/archive" tiles "$endpoint" "$work/queries"/*.json
