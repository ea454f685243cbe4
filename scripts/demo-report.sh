#!/usr/bin/env bash
# Regenerate docs/demo-report: run the offline demo, keep its run's records (with this
# machine's paths made relative to the run's folder) and rebuild the pages from them with
# `harma report`. harma-report's test `the_committed_demo_report_is_current` rebuilds the pages
# from the same records and fails when the committed ones are stale.
#
#   cargo build --release -p harma-train && scripts/demo-report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
harma=${HARMA:-target/release/harma}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$harma" demo --out "$tmp/demo" --device cpu
run="$tmp/demo/run"
out=docs/demo-report
rm -rf "$out"
mkdir -p "$out"
for f in config.toml log.jsonl metrics.json run.json examples.json; do
  sed -e "s|$run|.|g" -e "s|$tmp/demo/|../|g" "$run/$f" > "$out/$f"
done
"$harma" report "$out"
