"""The PyTorch side of `cargo xtask bench`: open_clip ViT-B-32-quickgelu with random weights,
the same batch and captions as the Rust side, threads from OMP_NUM_THREADS, on --device (cpu or
cuda). Prints JSON (on a GPU with the peak memory PyTorch reserved). The `_bf16` rates run the
same forward under bf16 autocast (oneDNN, on AMX where the CPU has it)."""
import argparse
import json
import os
import time

import torch
import open_clip

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=32)
p.add_argument("--iters", type=int, default=6)
p.add_argument("--device", default="cpu")
a = p.parse_args()
dev = torch.device(a.device)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval().to(dev)
tok = open_clip.get_tokenizer("ViT-B-32")
with open("data/annotations/rsitmd_test.json") as f:
    caps = [c for e in json.load(f) for c in e["caption"]][: a.batch]
ids = tok(caps).to(dev)
pixels = torch.randn(a.batch, 3, 224, 224, device=dev)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def rate(fn):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(a.iters):
        fn()
    sync()
    return a.batch * a.iters / (time.perf_counter() - t)


with torch.inference_mode():
    x, y = torch.randn(1600, 768, device=dev), torch.randn(768, 3072, device=dev)
    mm = rate(lambda: x @ y) / a.batch * 2 * 1600 * 768 * 3072 / 1e9
    img = rate(lambda: model.encode_image(pixels, normalize=True))
    txt = rate(lambda: model.encode_text(ids, normalize=True))
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        img16 = rate(lambda: model.encode_image(pixels, normalize=True))
        txt16 = rate(lambda: model.encode_text(ids, normalize=True))
    # the linear layers' GEMMs of a ViT-B/32 block at this batch, f32 and bf16 (x @ w^T)
    gemm = {}
    rows = a.batch * 50
    for inp, outd in [(768, 2304), (768, 768), (768, 3072), (3072, 768)]:
        for dt, key in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
            x = torch.randn(rows, inp, device=dev).to(dt)
            w = torch.randn(outd, inp, device=dev).to(dt)
            gemm[f"{inp}x{outd}_{key}"] = rate(lambda: x @ w.t()) / a.batch * 2 * rows * inp * outd / 1e9
out = {"matmul_gflops": mm, "gemm_gflops": gemm, "images_per_s": img, "captions_per_s": txt,
       "images_per_s_bf16": img16, "captions_per_s_bf16": txt16,
       "torch": torch.__version__, "threads": torch.get_num_threads()}
if dev.type == "cuda":
    out["peak_gpu_gb"] = torch.cuda.max_memory_reserved() / 1e9
print(json.dumps(out))
