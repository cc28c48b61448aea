"""Training-step throughput: forward + backward of EDMPrecond + EDMLoss and an Adam step, in images/s.

    python benchmarks/bench_train_step.py [--resolution 16] [--batch 32] [--steps 10] [--compile] [--out FILE]

Prints one JSON object. Variants are measured in the same process, interleaved round by round, and
reported as ratios to the default, so the numbers compare within one run on one machine:

- `default`: the network as the package builds it (float32, contiguous memory format);
- `channels_last`: network and inputs in channels-last memory format;
- `official_resampling`: the 2x2 box up/down-sampling done with grouped (transposed) convolutions,
  as the official implementation does, instead of our average-pooling / repetition shortcut;
- `official_attention`: attention written out with einsum and softmax, as the official
  implementation does, instead of PyTorch's fused scaled_dot_product_attention;
- `compile` (only with --compile): torch.compile of the network.

The official implementation itself is not installed here (it is not on PyPI), so there is no
side-by-side run with it; the two `official_*` variants reproduce its two computations that we
do differently.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time

import torch

from edm_lit import networks
from edm_lit.loss import EDMLoss
from edm_lit.precond import EDMPrecond


def build(resolution: int, seed: int = 0) -> EDMPrecond:
    """A small conditional DDPM++ (3 levels, attention at half resolution), dropout 0."""
    torch.manual_seed(seed)
    return EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=10, model_type="SongUNet",
                      model_channels=32, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[resolution // 2],
                      dropout=0.0)


def einsum_attention(qkv, num_heads):
    N, C3, H, W = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(N * num_heads, C // num_heads, 3, H * W).unbind(2)
    w = torch.einsum("ncq,nck->nqk", q.float(), (k / math.sqrt(k.shape[1])).float()).softmax(dim=2).to(q.dtype)
    return torch.einsum("nqk,nck->ncq", w, v).reshape(N, C, H, W)


@contextlib.contextmanager
def variant_patches(name, net):
    convs = [m for m in net.modules() if isinstance(m, networks.Conv2d)]
    saved_box = [m._box for m in convs]
    saved_attention = networks.attention
    if name == "official_resampling":
        for m in convs:
            m._box = False
    if name == "official_attention":
        networks.attention = einsum_attention
    try:
        yield
    finally:
        networks.attention = saved_attention
        for m, box in zip(convs, saved_box):
            m._box = box


def make_step(net, batch, resolution, channels_last):
    loss_fn = EDMLoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, resolution, resolution)
    labels = torch.eye(10)[torch.arange(batch) % 10]
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def step():
        loss = loss_fn(net, images, labels).sum() / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on a CPU)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = ["default", "channels_last", "official_resampling", "official_attention"] + (["compile"] if args.compile else [])
    steps, nets = {}, {}
    for name in variants:
        net = build(args.resolution).train()
        if name == "channels_last":
            net = net.to(memory_format=torch.channels_last)
        if name == "compile":
            net.model = torch.compile(net.model)
        nets[name] = net
        steps[name] = make_step(net, args.batch, args.resolution, name == "channels_last")
        with variant_patches(name, net):
            for _ in range(3 if name == "compile" else 2):  # warm-up (and compilation)
                steps[name]()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleave the variants so that machine noise hits all of them alike
        for name in variants:
            with variant_patches(name, nets[name]):
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[name]()
                times[name].append((time.perf_counter() - start) / args.steps)
    best = {name: min(t) for name, t in times.items()}
    result = {
        "benchmark": "train_step", "device": "cpu", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "config": {"resolution": args.resolution, "batch": args.batch, "model": "SongUNet DDPM++",
                   "model_channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 2,
                   "num_params": sum(p.numel() for p in nets["default"].parameters())},
        "images_per_s": {name: round(args.batch / t, 1) for name, t in best.items()},
        "median_step_s": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "speedup_vs_default": {name: round(best["default"] / t, 3) for name, t in best.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
