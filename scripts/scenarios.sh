#!/usr/bin/env bash
# Run one `harma` binary through a fixed set of commands and keep every file they write, so that
# two builds (before and after a refactor) can be compared file by file:
#
#   scripts/scenarios.sh OLD_HARMA /tmp/before
#   scripts/scenarios.sh target/release/harma /tmp/after
#   python3 scripts/compare_outputs.py /tmp/before /tmp/after
#
# The inputs are made by the binary itself (the offline demo's generated scenes and its small
# random CLIP), so nothing is downloaded. Every command is deterministic; timings, dates,
# process ids and absolute paths are what compare_outputs.py leaves out.
set -euo pipefail
harma=$(realpath "$1")
out=$2
rm -rf "$out"
mkdir -p "$out"
cd "$out"
run() { echo "+ harma $*" >&2; "$harma" "$@"; }

# the demo: data, model, a short training run with val and test, its report
run demo --out demo --steps 20 --images 60 > demo.stdout
data=demo/data
model=demo/model.safetensors
arch=demo/clip.json
adapters=demo/run/best.safetensors
common=(--model "$model" --arch "$arch")

# embedding: f32, bf16, with the trained adapters
head -n 8 "$data/captions.txt" 2>/dev/null > captions.txt || true
if [ ! -s captions.txt ]; then
  printf 'a harbour with boats\nan airport runway\nfields next to a river\n' > captions.txt
fi
run embed "${common[@]}" --images "$data/images" --captions captions.txt --out embed_f32.safetensors
run embed "${common[@]}" --images "$data/images" --captions captions.txt --precision bf16 --out embed_bf16.safetensors
run embed "${common[@]}" --adapters "$adapters" --images "$data/images" --captions captions.txt --out embed_adapters.safetensors

# evaluation, with a report folder
run eval "${common[@]}" --adapters "$adapters" --test-json "$data/test.json" --image-root "$data/images" \
  --out eval.json --report eval_report > eval.stdout

# training: f32, bf16, --recompute, and a resumed run
train=(train --train-json "$data/train.json" --val-json "$data/val.json" --test-json "$data/test.json"
  --image-root "$data/images" --init "$model" --arch "$arch" --batch-size 8 --lr 1e-3 --val-every 3)
run "${train[@]}" --steps 6 --out train_f32 > train_f32.stdout
run "${train[@]}" --steps 4 --precision bf16 --out train_bf16 > train_bf16.stdout
run "${train[@]}" --steps 4 --recompute --triplet plain-max --out train_recompute > train_recompute.stdout
run "${train[@]}" --steps 3 --out train_resumed > /dev/null
run train --resume train_resumed --steps 6 > train_resumed.stdout
run report train_f32 --compare train_bf16 --out compare > /dev/null

# search: an index of the images, text and image queries, GeoJSON-free outputs
run index build "${common[@]}" --adapters "$adapters" --images "$data/images" --out images.index > /dev/null
run search images.index "a harbour with many boats" -k 5 --json > search_text.json
first=$(ls "$data/images" | head -n 1)
run search images.index --image "$data/images/$first" -k 5 --json > search_image.json
run search images.index "fields next to a river" -k 5 > search_table.txt
run index info images.index > index_info.txt 2>&1 || true
echo "scenarios written to $out" >&2
