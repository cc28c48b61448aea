"""Training throughput of edm_lit's loop (Chapter 7): CPU quick configuration; on a GPU the paper's CIFAR-10 DDPM++.

    python benchmarks/bench_training.py [--steps 20] [--out book/results/bench_training.json] [--cpu-only]

CPU part (always): images/s of `TrainingRun.step()` — the whole step of the loop: data loading, EDMLoss
forward and backward, the nan guard, Adam, the EMA update — for the quick configuration of Chapter 7
(`ddpmpp-tiny` on 8x8 greyscale, batch 64), with random images in place of the digits.

GPU part (when CUDA is available): the paper's class-conditional CIFAR-10 DDPM++ (55.7 M parameters,
32x32, batch `--gpu-batch`, dropout 0.13, augmentation off) through the same `TrainingRun.step()`, side
by side in five variants: fp32, fp16 (`use_fp16`, the official --fp16), bf16 autocast (our --bf16),
channels_last memory format (network and input images), and `torch.compile` of the network. It reports
images/s and the achieved TFLOP/s, counting about 127 GFLOP per trained image (forward + backward of
DDPM++ at 32x32), against the GPU's dense peak *of the precision the row computes in*: the loop turns TF32
off (the paper trains in true fp32), so the fp32, channels_last and compile rows are compared with
--peak-tflops-fp32 (plain fp32 peak, e.g. 67 for an H100/H200 SXM) and the fp16 and bf16 rows with
--peak-tflops (fp16/bf16 tensor-core peak, e.g. 989). Without a GPU this part is skipped and the JSON says
what it would measure.

Writes one JSON object (stdout, and --out) with the device, torch version, the load average before and
after (a busy machine makes the CPU numbers unreliable) and every row.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edm_lit.training import ARCH_PRESETS, TrainingRun

GFLOP_PER_IMAGE = 127.0  # DDPM++ CIFAR-10, forward + backward per trained image (issue 9)


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n, channels, resolution, label_dim=0):
        self.images = np.random.default_rng(0).integers(0, 256, (n, channels, resolution, resolution), dtype=np.uint8)
        self.name, self.resolution, self.num_channels, self.label_dim = "random", resolution, channels, label_dim
        self.has_labels = label_dim > 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        label = np.zeros([self.label_dim], np.float32)
        if self.label_dim:
            label[i % self.label_dim] = 1
        return self.images[i].copy(), label


def measure(run: TrainingRun, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        run.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        run.step()
    sync()
    return steps * run.batch_size / (time.perf_counter() - start)


def cpu_rows(steps: int) -> list:
    net = dict(ARCH_PRESETS["ddpmpp-tiny"], class_name="edm_lit.precond.EDMPrecond", dropout=0.0, use_fp16=False)
    rows = []
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        run = TrainingRun(run_dir=None, dataset=RandomImages(1024, 1, 8), network_kwargs=net, batch_size=64,
                          total_kimg=10**6, lr_rampup_kimg=1, device="cpu", data_loader_kwargs=dict(num_workers=0),
                          grid_images=0)
        rows.append({"name": "quick ddpmpp-tiny 8x8x1, batch 64", "device": "cpu", "threads": threads,
                     "images_per_s": measure(run, steps, 3, lambda: None)})
    return rows


def channels_last_inputs(run: TrainingRun) -> None:
    """Make the run's input images channels_last too (the network alone is not enough: convolutions convert)."""
    next_rounds = run._next_rounds
    run._next_rounds = lambda: [(images.contiguous(memory_format=torch.channels_last), labels)
                                for images, labels in next_rounds()]


def gpu_rows(steps: int, batch: int, peak_tflops, peak_tflops_fp32) -> list:
    device = torch.device("cuda")
    base = dict(ARCH_PRESETS["ddpmpp"], class_name="edm_lit.precond.EDMPrecond", dropout=0.13, use_fp16=False)
    variants = {"fp32": {}, "fp16": {"use_fp16": True}, "bf16": {"autocast": "bfloat16"},
                "channels_last": {"channels_last": True}, "compile": {"compile": True}}
    rows = []
    for name, v in variants.items():
        net = {**base, "use_fp16": v.get("use_fp16", False)}
        run = TrainingRun(run_dir=None, dataset=RandomImages(4 * batch, 3, 32, label_dim=10), network_kwargs=net,
                          batch_size=batch, total_kimg=10**6, lr_rampup_kimg=1, device=device,
                          data_loader_kwargs=dict(num_workers=2, pin_memory=True), grid_images=0,
                          autocast_dtype=v.get("autocast"))
        if v.get("channels_last"):
            run.net.to(memory_format=torch.channels_last)
            channels_last_inputs(run)
        if v.get("compile"):
            run.ddp = torch.compile(run.net)
        try:
            ips = measure(run, steps, 5, torch.cuda.synchronize)
            tflops = ips * GFLOP_PER_IMAGE / 1000
            half = name in ("fp16", "bf16")
            peak = peak_tflops if half else peak_tflops_fp32
            rows.append({"name": f"CIFAR-10 DDPM++ {name}", "device": torch.cuda.get_device_name(), "batch": batch,
                         "images_per_s": ips, "tflops": tflops, "peak": "fp16/bf16 tensor core" if half else "fp32",
                         "peak_tflops": peak, "fraction_of_peak": (tflops / peak) if peak else None})
        except Exception as e:  # report a failing variant (e.g. compile) and go on
            rows.append({"name": f"CIFAR-10 DDPM++ {name}", "error": f"{type(e).__name__}: {e}"[:300]})
        del run
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpu-batch", type=int, default=128, help="per-GPU batch of the CIFAR-10 rows")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense fp16/bf16 tensor-core peak")
    parser.add_argument("--peak-tflops-fp32", type=float, default=None,
                        help="the GPU's fp32 peak without TF32 (the fp32, channels_last and compile rows)")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here (e.g. book/results/...)")
    args = parser.parse_args(argv)
    result = {"benchmark": "bench_training", "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "load_average_before": os.getloadavg()}
    result["cpu"] = cpu_rows(args.steps)
    if torch.cuda.is_available() and not args.cpu_only:
        result["gpu"] = gpu_rows(args.steps, args.gpu_batch, args.peak_tflops, args.peak_tflops_fp32)
    else:
        result["gpu"] = ("not measured: no CUDA device. On a GPU this runs the paper's CIFAR-10 DDPM++ training step "
                         "(55.7 M parameters, batch --gpu-batch) in fp32, fp16, bf16, channels_last and torch.compile "
                         f"and reports images/s and TFLOP/s at {GFLOP_PER_IMAGE:g} GFLOP per image against "
                         "--peak-tflops-fp32 (fp32 rows, TF32 off) and --peak-tflops (fp16/bf16 rows).")
    result["load_average_after"] = os.getloadavg()
    for row in result["cpu"] + (result["gpu"] if isinstance(result["gpu"], list) else []):
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
