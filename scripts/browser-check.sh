#!/usr/bin/env bash
# The search page in a real browser: builds harma, makes a small archive and a tiny random model
# (`cargo xtask search-demo`), indexes it, starts `harma serve` on 127.0.0.1, and drives headless
# Chromium (Debian's package, through playwright-core from npm): types a query, checks the
# result grid (tiles, thumbnails decoded, scores, files, coordinates), clicks a tile for "more
# like this", checks an error message for a bad request, an empty query, the page at 390 px (a
# phone: nothing wider than the screen) and the committed demo report at 390 px, and saves
# screenshots.
#
#   scripts/browser-check.sh [OUT_DIR]     (default target/browser-check)
#
# Needs root for apt-get (Chromium) on a Debian machine, npm, and network to the Debian and npm
# registries the first time. Not part of CI (CI runs the Rust API tests).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/browser-check}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
driver="$out/driver"
if [ ! -d "$driver/node_modules/playwright-core" ]; then
  echo "installing playwright-core (npm) into $driver"
  mkdir -p "$driver"
  (cd "$driver" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund playwright-core@1)
fi

# HARMA_PROFILE=debug uses the test build instead of building a release
profile=${HARMA_PROFILE:-release}
if [ "$profile" = release ]; then cargo build --release -p harma-train -p xtask; fi
harma=target/$profile/harma
rm -rf "$out/archive" "$out/index"
"target/$profile/xtask" search-demo --out "$out/archive" --images 24 >/dev/null
"$harma" index build --model "$out/archive/model.safetensors" --arch tiny-quickgelu \
  --images "$out/archive/images" --out "$out/index" --tile 256

port=$((20000 + RANDOM % 20000))
"$harma" serve "$out/index" --addr "127.0.0.1:$port" >"$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  grep -q "serving" "$out/serve.log" 2>/dev/null && break
  sleep 0.2
done

NODE_PATH="$driver/node_modules" node scripts/browser-check.mjs \
  "http://127.0.0.1:$port/" "$out/search.png" "$(command -v chromium)" \
  "$(pwd)/docs/demo-report/report.html"
echo "screenshots: $out/search.png, $out/search-like.png"
