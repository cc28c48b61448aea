"""edm_lit against the official NVlabs/edm code on one GPU, in one run: the whole training loop and generation.

    python benchmarks/bench_gpu.py [--official DIR] [--network NET] [--data ZIP] [--budget 230]
                                   [--out book/results/bench_gpu.json] [--smoke]

Training rows: `edm-lit train` (and, with --official, the official `train.py`) with the paper's class-
conditional CIFAR-10 DDPM++ recipe at batch 512, each in its own process for a few kimg on the same data set.
A row's images/s comes from the run's own `stats.jsonl`: 1000 / the mean seconds per kimg of its ticks after
the first (the first tick holds start-up and cuDNN autotuning; its length is recorded as `first_tick_s`).
Peak memory is the largest `Resources/peak_gpu_mem_gb` of the run. Achieved TFLOP/s counts
--gflop-per-image (forward + backward of DDPM++ at 32x32) per trained image, against --peak-tflops (fp16/bf16
tensor cores) or --peak-tflops-fp32 (fp32 rows: the paper trains with TF32 off).

Generation rows: `edm-lit generate` (and the official `generate.py`) at 35 NFE (18 Heun steps), batch 512,
PNGs written, from one network: --network, else the official fp32 row's snapshot (both read .pkl), else
ours. A row's images/s is (n2 - n1) / (t2 - t1) over two runs of n1 and n2 seeds, which removes start-up;
`seconds_for_50k` extrapolates the whole command to 50,000 images. Half-precision rows also report how far
their PNGs are from the fp32 row's (same seeds): mean and max absolute difference in 8-bit levels.

Each row is written to --out as soon as it is measured; --budget bounds the whole run (rows that no longer
fit are recorded as skipped). Without --data, a CIFAR-shaped labelled set (32x32 RGB, 10 classes) is made
from scikit-learn's digits through `edm-lit dataset`. --smoke: a CPU-sized plumbing check (8x8 digits,
ddpmpp-tiny, tiny batches; the numbers mean nothing). The official code is CC BY-NC-SA: it is run from the
folder you give (a scratch copy, with one line patched for torch >= 2.2), never copied into this project.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GFLOP_PER_IMAGE = 127.13  # DDPM++ CIFAR-10 conditional, forward + backward per trained image (FlopCounterMode)
RECIPE = ["--cond=1", "--arch=ddpmpp", "--batch=512", "--seed=0", "--workers=2"]
# (precision, options, flags): ours; the official tool has the first two precisions only
OURS = [
    ("fp32", [], []),
    ("fp16", [], ["--fp16=1"]),
    ("bf16", [], ["--bf16=1"]),
    ("fp16", ["fused_adam", "channels_last"], ["--fp16=1", "--fused-adam=1", "--channels-last=1"]),
    ("bf16", ["fused_adam", "channels_last"], ["--bf16=1", "--fused-adam=1", "--channels-last=1"]),
    ("fp32", ["fused_adam"], ["--fused-adam=1"]),
    ("bf16", ["fused_adam", "channels_last", "compile"],
     ["--bf16=1", "--fused-adam=1", "--channels-last=1", "--compile=1"]),
]
OFFICIAL = [("fp32", [], []), ("fp16", [], ["--fp16=1"])]
GENERATE = [("fp32", []), ("fp16", ["--fp16=1"]), ("bf16", ["--bf16=1"])]


class Results:
    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {**meta, "rows": [], "generate": []}
        self.write()

    def add(self, kind: str, row: dict) -> None:
        self.data[kind].append(row)
        self.write()
        print(json.dumps(row), file=sys.stderr, flush=True)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


class Clock:
    def __init__(self, budget: float):
        self.end = time.time() + budget

    def left(self) -> float:
        return self.end - time.time()


def make_data(work: Path, smoke: bool, env: dict) -> str:
    """A CIFAR-shaped labelled data set (or the 8x8 digits in smoke mode) through `edm-lit dataset`."""
    dest = work / "data.zip"
    if smoke:
        source = "digits"
    else:
        import PIL.Image

        from edm_lit.data import digits_source

        digits = [(image, label) for _, image, label in digits_source().items]
        rng, source = np.random.default_rng(0), work / "images"
        for i in range(5000):
            image, label = digits[int(rng.integers(len(digits)))]
            glyph = PIL.Image.fromarray(image).resize((24, 24), PIL.Image.BILINEAR)
            alpha = np.asarray(glyph, np.float32)[..., None] / 255
            ink, paper = rng.uniform(0.3, 1, 3), rng.uniform(0, 0.4, 3)
            canvas = np.tile(paper, (32, 32, 1))
            y, x = rng.integers(0, 9, 2)
            canvas[y:y + 24, x:x + 24] = alpha * ink + (1 - alpha) * paper
            (source / str(label)).mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(np.uint8(canvas * 255)).save(source / str(label) / f"{i:05d}.png")
    subprocess.run([sys.executable, "-m", "edm_lit.cli", "dataset", f"--source={source}", f"--dest={dest}"],
                   env=env, check=True, cwd=ROOT)
    return str(dest)


def official_copy(src: Path, work: Path) -> Path:
    """A scratch copy of the official code with the one line that torch >= 2.2 refuses patched."""
    dst = work / "official"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "docs"))
    misc = dst / "torch_utils" / "misc.py"
    misc.write_text(misc.read_text().replace("super().__init__(dataset)", "super().__init__()"))
    return dst


def read_stats(run_root: Path) -> dict:
    files = sorted(run_root.glob("**/stats.jsonl"))
    if not files:
        return {}
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]

    def value(row, key):
        v = row.get(key)
        return v.get("mean") if isinstance(v, dict) else v
    per_kimg = [value(r, "Timing/sec_per_kimg") for r in rows]
    steady = [s for s in per_kimg[1:] if s]
    memory = [value(r, "Resources/peak_gpu_mem_gb") for r in rows if value(r, "Resources/peak_gpu_mem_gb")]
    return {"ticks": len(rows), "first_tick_s": value(rows[0], "Timing/sec_per_tick") if rows else None,
            "images_per_s": 1000 / float(np.mean(steady)) if steady else None,
            "peak_gpu_mem_gb": max(memory) if memory else None, "loss_last": value(rows[-1], "Loss/loss"),
            "snapshots": [str(p) for p in sorted(files[0].parent.glob("network-snapshot-*"))]}


def train_row(impl, precision, options, flags, args, data, work, env, clock, official_dir) -> dict:
    out = work / f"train-{impl}-{precision}-{'-'.join(options) or 'plain'}"
    common = [f"--outdir={out}", f"--data={data}", f"--duration={args.kimg / 1000}", f"--tick={args.tick_kimg}",
              "--snap=1000", "--dump=1000"] + (args.smoke_recipe if args.smoke else RECIPE) + flags
    if impl == "official":
        cmd, cwd = [sys.executable, "train.py"] + [f for f in common if not f.startswith("--workers")], official_dir
    else:
        cmd, cwd = [sys.executable, "-m", "edm_lit.train"] + common, ROOT
    timeout = min(args.row_seconds, clock.left())
    row = {"impl": impl, "precision": precision, "options": options, "command": " ".join(cmd[1:])}
    if timeout < 30:
        return {**row, "skipped": "budget"}
    start = time.time()
    try:
        run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        row["returncode"] = run.returncode
        if run.returncode:
            row["stderr_tail"] = run.stderr[-800:]
    except subprocess.TimeoutExpired:
        row["timed_out_after_s"] = round(timeout)
    row["wall_s"] = round(time.time() - start, 1)
    row.update(read_stats(out))
    if row.get("images_per_s") and args.gflop_per_image:
        peak = args.peak_tflops_fp32 if precision == "fp32" else args.peak_tflops
        row["tflops"] = row["images_per_s"] * args.gflop_per_image / 1000
        row["fraction_of_peak"] = row["tflops"] / peak if peak else None
    return row


def generate_seconds(impl, flags, network, n, outdir, official_dir, env, timeout) -> float:
    seeds = f"--seeds=0-{n - 1}"
    common = [f"--network={network}", f"--outdir={outdir}", seeds, f"--batch={min(512, n)}"] + flags
    if impl == "official":
        cmd, cwd = [sys.executable, "generate.py"] + common, official_dir
    else:
        cmd, cwd = [sys.executable, "-m", "edm_lit.cli", "generate"] + common, ROOT
    start = time.time()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, timeout=timeout)
    return time.time() - start


def png_difference(folder_a: Path, folder_b: Path) -> dict:
    import PIL.Image

    names = sorted(p.name for p in folder_a.glob("*.png") if (folder_b / p.name).exists())
    diffs = [np.abs(np.asarray(PIL.Image.open(folder_a / n), np.int16) - np.asarray(PIL.Image.open(folder_b / n),
                                                                                     np.int16)) for n in names]
    if not diffs:
        return {}
    return {"images_compared": len(names), "mean_abs_levels": float(np.mean([d.mean() for d in diffs])),
            "max_abs_levels": int(max(d.max() for d in diffs))}


def generate_row(impl, precision, flags, network, args, work, env, clock, official_dir) -> dict:
    row = {"impl": impl, "precision": precision, "network": network}
    n1, n2 = args.gen_images
    if clock.left() < 30:
        return {**row, "skipped": "budget"}
    folder = work / f"gen-{impl}-{precision}"
    try:
        t1 = generate_seconds(impl, flags, network, n1, work / "gen-warm", official_dir, env, clock.left())
        t2 = generate_seconds(impl, flags, network, n2, folder, official_dir, env, clock.left())
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        stderr = getattr(e, "stderr", b"") or b""
        return {**row, "error": f"{type(e).__name__}: {stderr.decode(errors='replace')[-800:]}"}
    shutil.rmtree(work / "gen-warm", ignore_errors=True)
    rate = (n2 - n1) / max(t2 - t1, 1e-9)
    row.update(images_per_s=rate, seconds_for_50k=t1 + (50_000 - n1) / rate, seconds=[t1, t2], images=[n1, n2])
    reference = work / f"gen-{impl}-fp32"
    if precision != "fp32" and reference.exists():
        row["vs_fp32"] = png_difference(reference, folder)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, help="a copy of NVlabs/edm: run it side by side")
    ap.add_argument("--network", help="network for the generation rows (an official .pkl runs in both)")
    ap.add_argument("--data", help="data set for the training rows (default: CIFAR-shaped digits, made here)")
    ap.add_argument("--out", type=Path, default=ROOT / "book" / "results" / "bench_gpu.json")
    ap.add_argument("--budget", type=float, default=230, help="seconds for the whole run")
    ap.add_argument("--row-seconds", type=float, default=75, help="limit of one training row")
    ap.add_argument("--kimg", type=float, default=4.0, help="kimg trained per row")
    ap.add_argument("--tick-kimg", type=int, default=1, help="kimg per tick (one seconds-per-kimg sample)")
    ap.add_argument("--gen-images", type=int, nargs=2, default=[512, 1024], metavar=("N1", "N2"))
    ap.add_argument("--gflop-per-image", type=float, default=GFLOP_PER_IMAGE)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16/bf16 peak (H100/H200 SXM)")
    ap.add_argument("--peak-tflops-fp32", type=float, default=67.0, help="dense fp32 peak without TF32")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny network and data")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    args = ap.parse_args(argv)
    import torch

    args.smoke_recipe = ["--cond=1", "--arch=ddpmpp-tiny", "--batch=32", "--seed=0", "--workers=1", "--augment=0"]
    if args.smoke:  # the FLOP count is DDPM++ at 32x32: no TFLOP/s for the tiny network
        args.kimg, args.tick_kimg, args.gen_images = min(args.kimg, 0.16), 1, [8, 24]
        args.gflop_per_image = None
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    clock = Clock(args.budget)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    results = Results(args.out, {"gpu": gpu, "torch": torch.__version__, "smoke": args.smoke,
                                 "gflop_per_image": args.gflop_per_image, "peak_tflops": args.peak_tflops,
                                 "peak_tflops_fp32": args.peak_tflops_fp32, "kimg_per_row": args.kimg})
    data = args.data or make_data(work, args.smoke, env)
    official_dir = official_copy(args.official, work) if args.official else None
    plan = [("edm_lit", *row) for row in OURS[:3]]
    if official_dir:
        plan = [x for pair in zip(plan[:2], [("official", *r) for r in OFFICIAL]) for x in pair] + plan[2:]
    plan += [("edm_lit", *row) for row in OURS[3:]]
    for impl, precision, options, flags in plan:
        if args.smoke and "--fp16=1" in flags:
            continue  # fp16 runs on CUDA only
        results.add("rows", train_row(impl, precision, options, flags, args, data, work, env, clock, official_dir))
    network = args.network
    if network is None:
        snapshots = [s for r in results.data["rows"] if r["precision"] == "fp32" and not r["options"]
                     for s in r.get("snapshots", []) if s.endswith((".pkl", ".json"))]
        official_pkls = [s for s in snapshots if s.endswith(".pkl")]
        network = (official_pkls or snapshots or [None])[-1]
    if network is None:
        print("no network for the generation rows", file=sys.stderr)
        return 1
    impls = ["edm_lit"] + (["official"] if official_dir and network.endswith(".pkl") else [])
    for precision, flags in GENERATE:
        for impl in impls:
            if (impl == "official" and flags) or (args.smoke and "--fp16=1" in flags):
                continue  # the official generate.py has no precision flag: it runs what the snapshot says
            results.add("generate", generate_row(impl, precision, flags, network, args, work, env, clock,
                                                 official_dir))
    print(json.dumps(results.data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
