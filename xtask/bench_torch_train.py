"""The PyTorch side of `cargo xtask bench --harma-repo PATH`: one HarMA training step at
ViT-B/32 size with the ORIGINAL model code (its adapters at their default sizes, random backbone,
backbone frozen), contrastive + adaptive triplet (the original loss methods, one-process gloo
all-gather), and an AdamW update; batch and threads as the Rust side, on --device (cpu or cuda).
Prints JSON with pairs/s and the process's peak RSS (on a GPU also the peak memory PyTorch
reserved there)."""
import argparse
import importlib.util
import json
import os
import resource
import sys
import time
import types

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--harma-repo", required=True)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--iters", type=int, default=3)
p.add_argument("--device", default="cpu")
p.add_argument("--bf16", action="store_true", help="forward and loss under bf16 autocast")
a = p.parse_args()
dev = torch.device(a.device)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
sys.path.insert(0, a.harma_repo)
from open_clip import model as M  # noqa: E402  (HarMA's copy)

for name, attrs in {"models.swin_transformer": ["SwinTransformer", "interpolate_relative_pos_embed"],
                    "models.vit": ["VisionTransformer", "interpolate_pos_embed"],
                    "models.bert": ["BertModel", "BertConfig"], "utils": ["read_json"]}.items():
    m = types.ModuleType(name)
    for attr in attrs:
        setattr(m, attr, None)
    sys.modules[name] = m
spec = importlib.util.spec_from_file_location("harma_orig", os.path.join(a.harma_repo, "models", "harma.py"))
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="tcp://127.0.0.1:29519", rank=0, world_size=1)

model = M.CLIP(embed_dim=512,
               vision_cfg=dict(image_size=224, patch_size=32, width=768, layers=12, head_width=64),
               text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
               quick_gelu=True).to(dev)
trainable = []
for n, prm in model.named_parameters():
    t = ".mmadapter." in n or n.endswith(".gate1")
    prm.requires_grad_(t)
    if t:
        trainable.append(prm)
temp = torch.nn.Parameter(torch.tensor(0.07, device=dev))
me = types.SimpleNamespace(embed_dim=512, temp=temp)
opt = torch.optim.AdamW(trainable + [temp], lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.04)
b = a.batch
pixels = torch.randn(b, 3, 224, 224, device=dev)
with open("data/annotations/rsitmd_test.json") as f:
    caps = [c for e in json.load(f) for c in e["caption"]][:b]
ids = M.__dict__.get("tokenize", None)
from open_clip import tokenize  # noqa: E402
ids = tokenize(caps).to(dev)
idx = torch.arange(b, device=dev)


def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(ids, normalize=True)
        loss = mod.HarMABase.get_contr_loss(me, img, txt, idx=idx) + mod.HarMABase.weighted_triplet_loss(me, img, txt)
    loss.backward()
    opt.step()


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


step()
sync()
t = time.perf_counter()
for _ in range(a.iters):
    step()
sync()
rate = b * a.iters / (time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
out = {"pairs_per_s": rate, "peak_rss_gb": peak, "torch": torch.__version__}
if dev.type == "cuda":
    out["peak_gpu_gb"] = torch.cuda.max_memory_reserved() / 1e9
print(json.dumps(out))
dist.destroy_process_group()
