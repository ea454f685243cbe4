#!/usr/bin/env bash
# The GPU check (docs/CUDA.md): parity with the CPU, throughput and peak memory at batch 32 and
# 214 in f32 and bf16, and PyTorch on the same GPU in the same run. Writes gpu-check.json and
# gpu-check.log to $REPORT_DIR (default: $OUT if set, else target/gpu-check).
#
# Needs a CUDA build of xtask (`cargo xtask build-cuda` writes target/cuda-dist/xtask), the
# NVIDIA driver, and CUDA 13 libraries (cuBLAS, cuRAND, runtime, NVRTC: a PyTorch environment's
# are found by itself). No Rust toolchain.
#
# Settings (environment):
#   XTASK         the xtask binary, or XTASK.gz     [target/cuda-dist/xtask]
#   DEVICE        cuda, cuda:N or cpu               [cuda]
#   MODEL         vit-b32 or tiny                   [vit-b32]
#   BATCHES       comma-separated batch sizes       [32,214]
#   ITERS         timed batches per measurement     [5]
#   TORCH_PYTHON  a Python with torch + open_clip_torch for the PyTorch side; "none" skips it
#                 [python3, if it imports both]
#   HARMA_REPO    a checkout of seekerhuang/HarMA: the original's training step too
#   WHEELS        a folder of wheels to install first (open_clip_torch, ftfy, wcwidth) [.whl]
#   HARMA         the CUDA harma binary, or HARMA.gz, for the data-parallel check (xtask
#                 dist-check: every GPU against one process)   [target/cuda-dist/harma]
set -euo pipefail
cd "$(dirname "$0")/.."
XTASK=${XTASK:-target/cuda-dist/xtask}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-vit-b32}
BATCHES=${BATCHES:-32,214}
ITERS=${ITERS:-5}
WHEELS=${WHEELS:-.whl}
REPORT_DIR=${REPORT_DIR:-${OUT:-target/gpu-check}}
mkdir -p "$REPORT_DIR"
log="$REPORT_DIR/gpu-check.log"
: >"$log"
say() { echo "$@" | tee -a "$log"; }

if [ ! -x "$XTASK" ] && [ -f "$XTASK.gz" ]; then
    # carried compressed (build-cuda writes xtask.gz beside xtask)
    gunzip -c "$XTASK.gz" >/tmp/harma-xtask && chmod +x /tmp/harma-xtask
    XTASK=/tmp/harma-xtask
fi
if [ ! -x "$XTASK" ]; then
    say "no $XTASK: build it with \`cargo xtask build-cuda\` (docs/CUDA.md) and bring it here"
    exit 1
fi
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1 && command -v python3 >/dev/null; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/harma-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/harma-site${PYTHONPATH:+:$PYTHONPATH}
fi
TORCH_PYTHON=${TORCH_PYTHON:-python3}
if [ "$TORCH_PYTHON" != none ] && ! "$TORCH_PYTHON" -c "import torch, open_clip" 2>/dev/null; then
    say "PyTorch side skipped: $TORCH_PYTHON cannot import torch and open_clip"
    TORCH_PYTHON=none
fi
if [ "$DEVICE" != cpu ]; then
    # the CUDA 13 libraries that PyTorch's wheels carry
    py=$([ "$TORCH_PYTHON" != none ] && echo "$TORCH_PYTHON" || echo python3)
    libs=$("$py" -c 'import glob, os, site
print(":".join(sorted({d for s in site.getsitepackages() for d in glob.glob(os.path.join(s, "nvidia", "*", "lib"))})))' 2>/dev/null || true)
    export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
    if ldd "$XTASK" | grep "not found" | tee -a "$log" | grep -q .; then
        say "the libraries above are missing: point LD_LIBRARY_PATH at CUDA 13's"
        exit 1
    fi
fi
args=(gpu-check --device "$DEVICE" --model "$MODEL" --batches "$BATCHES" --iters "$ITERS"
    --json "$REPORT_DIR/gpu-check.json")
if [ "$TORCH_PYTHON" != none ]; then
    args+=(--torch-python "$TORCH_PYTHON")
    if [ -n "${HARMA_REPO:-}" ]; then args+=(--harma-repo "$HARMA_REPO"); fi
fi
say "$XTASK ${args[*]}"
status=0
"$XTASK" "${args[@]}" 2>&1 | tee -a "$log" || status=$?

# data-parallel training on every GPU against one process (docs/DISTRIBUTED.md)
HARMA=${HARMA:-target/cuda-dist/harma}
if [ ! -x "$HARMA" ] && [ -f "$HARMA.gz" ]; then
    gunzip -c "$HARMA.gz" >/tmp/harma-bin && chmod +x /tmp/harma-bin
    HARMA=/tmp/harma-bin
fi
if [ "$DEVICE" != cpu ] && [ -x "$HARMA" ]; then
    say "$XTASK dist-check --harma $HARMA"
    "$XTASK" dist-check --harma "$HARMA" --dir /tmp/harma-dist-check \
        --json "$REPORT_DIR/gpu-dist-check.json" 2>&1 | tee -a "$log" || status=$?
elif [ "$DEVICE" != cpu ]; then
    say "no $HARMA(.gz): the data-parallel check is skipped (cargo xtask build-cuda writes it)"
fi
exit $status
