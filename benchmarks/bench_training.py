"""Training throughput of edm_lit's loop (Chapters 7, 7b): CPU quick configuration; on a GPU the paper's CIFAR-10 DDPM++.

    python benchmarks/bench_training.py [--steps 20] [--seconds 60] [--out book/results/bench_training.json]
                                        [--cpu-only | --gpu-only] [--variants fp32 fp16 ...]

CPU part: images/s of `TrainingRun.step()` — the whole step of the loop: data loading, EDMLoss forward and
backward, the nan guard, Adam, the EMA update — for the quick configuration of Chapter 7 (`ddpmpp-tiny` on
8x8 greyscale, batch 64), with random images in place of the digits.

GPU part (when CUDA is available): the paper's class-conditional CIFAR-10 DDPM++ (55.7 M parameters, 32x32,
batch `--gpu-batch`, dropout 0.13, augmentation off) through the same `TrainingRun.step()`, one row per
variant, each the loop with the flags of `edm-lit train` (7b) named in the row: fp32 (no flag), fp16 (`--fp16=1`),
bf16 (`--bf16=1`), fused_adam (`--fused-adam=1`), channels_last (`--channels-last=1`), compile (`--compile=1`),
and all (`--fp16=1 --fused-adam=1 --channels-last=1 --compile=1`). It reports images/s and the achieved TFLOP/s,
counting about 127 GFLOP per trained image (forward + backward of DDPM++ at 32x32), against the GPU's dense
peak *of the precision the row computes in*: the loop turns TF32 off (the paper trains in true fp32), so fp32
rows are compared with --peak-tflops-fp32 (e.g. 67 for an H100/H200 SXM) and fp16/bf16 rows with --peak-tflops
(e.g. 989).

Time is bounded per row: warm-up and measurement stop after --seconds (at least one timed step), and a row
that has not finished after --row-timeout seconds (a slow compilation) is recorded as timed out. Each row is
printed on stderr and written to --out (the whole JSON, atomically) as soon as it is measured, so an
interrupted run keeps what it measured. Rows that fail are recorded with their error, and the script goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edm_lit.files import write_atomic
from edm_lit.training import ARCH_PRESETS, TrainingRun

GFLOP_PER_IMAGE = 127.0  # DDPM++ CIFAR-10, forward + backward per trained image (issue 9)
# variant -> (TrainingRun arguments, the edm-lit train flags they stand for)
GPU_VARIANTS = {
    "fp32": ({}, ""),
    "fp16": ({"use_fp16": True}, "--fp16=1"),
    "bf16": ({"autocast_dtype": "bfloat16"}, "--bf16=1"),
    "fused_adam": ({"fused": True}, "--fused-adam=1"),
    "channels_last": ({"channels_last": True}, "--channels-last=1"),
    "compile": ({"torch_compile": True}, "--compile=1"),
    "all": ({"use_fp16": True, "fused": True, "channels_last": True, "torch_compile": True},
            "--fp16=1 --fused-adam=1 --channels-last=1 --compile=1"),
}


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


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise RowTimeout in this (main) thread after `seconds` (SIGALRM; no limit where it does not exist)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise RowTimeout(f"row did not finish within --row-timeout={seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def measure(run: TrainingRun, steps: int, warmup: int, seconds: float, sync) -> dict:
    """Images/s over up to `steps` timed steps after up to `warmup` steps, within `seconds` in all."""
    start = time.perf_counter()
    done_warmup = 0
    while done_warmup < warmup and time.perf_counter() - start < seconds / 2:
        run.step()
        done_warmup += 1
    sync()
    t0 = time.perf_counter()
    timed = 0
    while timed < steps and (timed == 0 or time.perf_counter() - start < seconds):
        run.step()
        timed += 1
        if timed == 1 or timed % 5 == 0:
            sync()  # so that the budget sees the device's time, not the queue's
    sync()
    elapsed = time.perf_counter() - t0
    return {"images_per_s": timed * run.batch_size / elapsed, "timed_steps": timed, "warmup_steps": done_warmup,
            "seconds": elapsed}


class Report:
    """The JSON result, printed row by row on stderr and rewritten to --out after every row."""

    def __init__(self, out, header: dict):
        self.out, self.result = out, {**header, "cpu": [], "gpu": []}

    def add(self, part: str, row: dict) -> None:
        self.result[part].append(row)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        if self.out is not None:
            write_atomic(self.out, (json.dumps(self.result, indent=2) + "\n").encode())


def run_row(report: Report, part: str, name: str, make_run, steps: int, warmup: int, seconds: float,
            row_timeout: float, sync, extra: dict) -> None:
    row = {"name": name, **extra}
    run = None
    try:
        with deadline(row_timeout):
            run = make_run()
            row.update(measure(run, steps, warmup, seconds, sync))
    except Exception as e:  # a variant that fails or times out is reported, and the script goes on
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    report.add(part, row)
    del run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cpu_rows(report: Report, args) -> None:
    net = dict(ARCH_PRESETS["ddpmpp-tiny"], class_name="edm_lit.precond.EDMPrecond", dropout=0.0, use_fp16=False)
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)

        def make_run():
            return TrainingRun(run_dir=None, dataset=RandomImages(1024, 1, 8), network_kwargs=net, batch_size=64,
                               total_kimg=10**6, lr_rampup_kimg=1, device="cpu", grid_images=0,
                               data_loader_kwargs=dict(num_workers=0))
        run_row(report, "cpu", "quick ddpmpp-tiny 8x8x1, batch 64", make_run, args.steps, 3, args.seconds,
                args.row_timeout, lambda: None, {"device": "cpu", "threads": threads})


def gpu_rows(report: Report, args) -> None:
    device = torch.device("cuda")
    base = dict(ARCH_PRESETS["ddpmpp"], class_name="edm_lit.precond.EDMPrecond", dropout=0.13, use_fp16=False)
    for name in args.variants:
        v, flags = GPU_VARIANTS[name]
        half = v.get("use_fp16") or v.get("autocast_dtype")
        peak = args.peak_tflops if half else args.peak_tflops_fp32

        def make_run(v=v):
            optimizer = {"class_name": "torch.optim.Adam", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                         **({"fused": True} if v.get("fused") else {})}
            return TrainingRun(run_dir=None, dataset=RandomImages(4 * args.gpu_batch, 3, 32, label_dim=10),
                               network_kwargs={**base, "use_fp16": bool(v.get("use_fp16"))}, batch_size=args.gpu_batch,
                               total_kimg=10**6, lr_rampup_kimg=1, device=device, optimizer_kwargs=optimizer,
                               data_loader_kwargs=dict(num_workers=2, pin_memory=True), grid_images=0,
                               autocast_dtype=v.get("autocast_dtype"), channels_last=bool(v.get("channels_last")),
                               torch_compile=bool(v.get("torch_compile")))
        extra = {"flags": flags, "device": torch.cuda.get_device_name(), "batch": args.gpu_batch,
                 "peak": "fp16/bf16 tensor core" if half else "fp32", "peak_tflops": peak}
        run_row(report, "gpu", f"CIFAR-10 DDPM++ {name}", make_run, args.steps, 5, args.seconds, args.row_timeout,
                torch.cuda.synchronize, extra)
        row = report.result["gpu"][-1]
        if "images_per_s" in row:
            row["tflops"] = row["images_per_s"] * GFLOP_PER_IMAGE / 1000
            row["fraction_of_peak"] = row["tflops"] / peak if peak else None
            report.save()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (fewer if --seconds runs out)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget of one row's warm-up + timing")
    parser.add_argument("--row-timeout", type=float, default=600.0,
                        help="a row not finished after this many seconds (e.g. compiling) is recorded as timed out")
    parser.add_argument("--gpu-batch", type=int, default=128, help="per-GPU batch of the CIFAR-10 rows")
    parser.add_argument("--variants", nargs="+", choices=sorted(GPU_VARIANTS), default=list(GPU_VARIANTS),
                        help="GPU rows to measure, in this order")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense fp16/bf16 tensor-core peak")
    parser.add_argument("--peak-tflops-fp32", type=float, default=None,
                        help="the GPU's fp32 peak without TF32 (the fp32, fused_adam, channels_last, compile rows)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cpu-only", action="store_true")
    which.add_argument("--gpu-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here, after every row")
    args = parser.parse_args(argv)
    if not (args.steps >= 1 and args.seconds > 0):
        parser.error("--steps must be >= 1 and --seconds > 0")
    import torch._dynamo  # noqa: F401  (imported by the first optimizer step; never inside a row's deadline)
    report = Report(args.out, {"benchmark": "bench_training", "torch": torch.__version__,
                               "python": platform.python_version(), "machine": platform.machine(),
                               "load_average_before": os.getloadavg(), "seconds_per_row": args.seconds})
    report.save()
    if not args.gpu_only:
        cpu_rows(report, args)
    if torch.cuda.is_available() and not args.cpu_only:
        gpu_rows(report, args)
    elif not args.cpu_only:
        report.result["gpu"] = ("not measured: no CUDA device. On a GPU this runs the paper's CIFAR-10 DDPM++ training "
                                "step (55.7 M parameters, batch --gpu-batch) with the flags of each variant "
                                f"({', '.join(GPU_VARIANTS)}) and reports images/s and TFLOP/s at {GFLOP_PER_IMAGE:g} "
                                "GFLOP per image against --peak-tflops-fp32 (fp32 rows, TF32 off) and --peak-tflops "
                                "(fp16/bf16 rows).")
    report.result["load_average_after"] = os.getloadavg()
    report.save()
    print(json.dumps(report.result, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
