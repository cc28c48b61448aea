"""Generation throughput: images/s of the EDM sampler at 35 NFE on the CIFAR-10 DDPM++ shape, and the time to 50k.

    python benchmarks/bench_generate.py                       # CPU: a small smoke size; GPU: the sizes below
    python benchmarks/bench_generate.py --out book/results/bench_generate_gpu.json
    python benchmarks/bench_generate.py --gap --network=URL   # + half precision vs float32 images
    python benchmarks/bench_generate.py --fid --network=URL --data=cifar10-32x32.zip   # + the FID (GPU)

Rows, each timed in this one process on the same random-weight network (speed does not depend on the weights):
- `fp32_naive`: `edm_lit.samplers.edm_sampler` on the float32 network, batch as given: the official loop;
- `fp16_autocast`, `bf16_autocast`: the same under `torch.autocast` (the sampler stays float64);
- `channels_last`: float32 with the network and its input in channels_last memory format;
- `compile`: float32 with `torch.compile(net)` (compile time reported separately, excluded from the rate).
Each row: median seconds per batch over `--rounds` timed batches after `--warmup`, images/s, the ratio to
`fp32_naive`, and `seconds_for_50k_sampler_only`: 50,000 images at that rate. That extrapolates the sampler
alone (one global `randn` for the batch, no per-seed generators, no files), so it is a lower bound for a run.
The `generate_*` rows time the real path of `edm-lit generate --seeds=0-49999` on the same network:
`edm_lit.generate.generate` with per-seed generators (latent, class, and the per-step noise drawn image by
image) and one PNG written per image; their `seconds_for_50k` is the time to expect for the command:
- `generate_fp32`: `--writers=4` (PNG encoding on 4 threads, overlapping sampling), float32 network;
- `generate_fp32_writers0`: `--writers=0` (PNGs written in the sampling thread): what the overlap saves;
- `generate_bf16`, `generate_fp16` (GPU): `--bf16=1` / `--fp16=1`, the network under autocast, with 4 writers.
On a CPU the defaults shrink to a smoke size (batch 2, 2 steps = 3 NFE; rows fp32_naive, channels_last and
the fp32 generate rows only) so the script runs anywhere; those numbers say nothing about a GPU.
With --gap: images of --network (a trained network: the published CIFAR-10 one by default) for `--gap-seeds`
seeds in float32 and in each half precision, and their mean / max difference in 8-bit levels (the bound the
half-precision flags cost). With --fid: a reference of --data made with our detector (`fid ref`), then 50,000
images of --network and their FID (`measure_fid`, one seed set). NVIDIA's published references were made
with another detector: `fid calc` refuses them unless --allow-detector-mismatch (Chapter 8.4).
Prints a table on stderr and one JSON object on stdout or to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time

import torch

from edm_lit.precond import EDMPrecond
from edm_lit.samplers import edm_sampler

CIFAR_DDPMPP = dict(img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", model_channels=128,
                    channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13,
                    embedding_type="positional", encoder_type="standard", decoder_type="standard",
                    channel_mult_noise=1, resample_filter=[1, 1])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_rows(net, device, batch, steps, rounds, warmup, rows):
    latents = torch.randn([batch, 3, 32, 32], device=device)
    labels = torch.eye(10, device=device)[torch.randint(10, [batch], device=device)]
    results = {}
    for name in rows:
        model, ctx, x = net, contextlib.nullcontext(), latents
        extra = {}
        try:
            if name in ("fp16_autocast", "bf16_autocast"):
                dtype = torch.float16 if name.startswith("fp16") else torch.bfloat16
                ctx = torch.autocast(device.type, dtype=dtype)
            elif name == "channels_last":
                model = net.to(memory_format=torch.channels_last)
                x = latents.contiguous(memory_format=torch.channels_last)
            elif name == "compile":
                model = torch.compile(net)
                t0 = time.perf_counter()
                with torch.no_grad():
                    edm_sampler(model, x, labels, num_steps=steps)
                sync(device)
                extra["compile_seconds"] = time.perf_counter() - t0
            times = []
            with torch.no_grad(), ctx:
                for r in range(warmup + rounds):
                    sync(device)
                    t0 = time.perf_counter()
                    edm_sampler(model, x, labels, num_steps=steps)
                    sync(device)
                    if r >= warmup:
                        times.append(time.perf_counter() - t0)
            sec = statistics.median(times)
            results[name] = dict(seconds_per_batch=sec, images_per_second=batch / sec,
                                 seconds_for_50k_sampler_only=50000 / (batch / sec), **extra)
        except Exception as e:  # a row that cannot run here (e.g. compile without a compiler) is reported, not fatal
            results[name] = dict(error=f"{type(e).__name__}: {e}"[:300])
        finally:
            if name == "channels_last":
                net.to(memory_format=torch.contiguous_format)
    for name, flags in GENERATE_ROWS.items():
        if device.type == "cuda" or not (flags.get("bf16") or flags.get("fp16")):
            results[name] = time_generate(net, device, batch, steps, rounds, warmup, **flags)
    base = results.get("fp32_naive", {}).get("images_per_second")
    for row in results.values():
        if base and "images_per_second" in row:
            row["speedup_vs_fp32_naive"] = row["images_per_second"] / base
    return results


GENERATE_ROWS = {"generate_fp32": dict(writers=4), "generate_fp32_writers0": dict(writers=0),
                 "generate_bf16": dict(bf16=True, writers=4), "generate_fp16": dict(fp16=True, writers=4)}


def time_generate(net, device, batch, steps, rounds, warmup, **flags):
    """The `edm-lit generate` path: per-seed generators and one PNG per image, `batch` seeds per timed call."""
    from edm_lit.generate import generate

    times = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(warmup + rounds):
                seeds = list(range(r * batch, (r + 1) * batch))
                sync(device)
                t0 = time.perf_counter()
                generate(net, tmp, seeds=seeds, subdirs=True, max_batch_size=batch, device=device, progress=False,
                         num_steps=steps, **flags)
                sync(device)
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {e}"[:300])
    sec = statistics.median(times)
    return dict(seconds_per_batch=sec, images_per_second=batch / sec, seconds_for_50k=50000 / (batch / sec),
                **flags)


def precision_gap(network, device, seeds, batch, precisions):
    """Mean and max |difference| in 8-bit levels between the float32 images of `seeds` and each precision's."""
    from edm_lit.generate import place_network, sample_seeds, seed_batches, with_precision

    net, device = place_network(network, device, device)
    gaps = {}
    for name in precisions:
        total, largest, count = 0.0, 0, 0
        for part in seed_batches(range(seeds), batch):
            exact = sample_seeds(net, part, device=device).int()
            half = sample_seeds(with_precision(net, **{name: True}), part, device=device).int()
            diff = (half - exact).abs()
            total, count = total + diff.sum().item(), count + diff.numel()
            largest = max(largest, int(diff.max()))
        gaps[name] = dict(mean_levels=total / count, max_levels=largest, images=seeds)
    return gaps


def measure_fid(network, data, ref, device, allow_mismatch):
    from edm_lit.fid import fid_calc, fid_ref, reference_detector
    from edm_lit.generate import generate

    with tempfile.TemporaryDirectory() as tmp:
        if ref is None:
            ref = f"{tmp}/ref.npz"
            fid_ref(data, ref, batch_size=250, device=device)
        t0 = time.perf_counter()
        generate(network, f"{tmp}/out", seeds="0-49999", subdirs=True, max_batch_size=512, device=device)
        t_gen = time.perf_counter() - t0
        value = fid_calc(f"{tmp}/out", ref, num=50000, batch_size=250, device=device,
                         allow_detector_mismatch=allow_mismatch)
        detector = reference_detector(ref)
    return dict(network=network, data=data, ref=ref, detector=detector, fid=value, seconds_generate=t_gen)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="batch (default 512 on a GPU, 2 on a CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="Heun steps (default 18 = 35 NFE on a GPU, 2 = 3 NFE on a CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="timed batches per row (default 5 on a GPU, 2 on a CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gap", action="store_true", help="also compare --network's images in half precision")
    parser.add_argument("--gap-seeds", type=int, default=1024, help="images for --gap (1024)")
    parser.add_argument("--fid", action="store_true", help="also the FID of --network (needs --data or --ref)")
    parser.add_argument("--network", default="https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl")
    parser.add_argument("--data", default=None, help="data set for our reference, e.g. cifar10-32x32.zip")
    parser.add_argument("--ref", default=None, help="a reference made by `edm-lit fid ref` (instead of --data)")
    parser.add_argument("--allow-detector-mismatch", action="store_true",
                        help="accept a reference made by another detector")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    batch = args.batch or (512 if gpu else 2)
    steps = args.steps or (18 if gpu else 2)
    rounds = args.rounds or (5 if gpu else 2)
    torch.manual_seed(0)
    net = EDMPrecond(**CIFAR_DDPMPP).to(device).eval().requires_grad_(False)
    # on a CPU the half-precision rows are emulated and take minutes even at the smoke size: GPU only
    rows = ["fp32_naive", "fp16_autocast", "bf16_autocast", "channels_last", "compile"] if gpu else ["fp32_naive", "channels_last"]
    report = dict(device=torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu",
                  torch=torch.__version__, threads=torch.get_num_threads(), batch=batch, steps=steps,
                  nfe=2 * steps - 1, rounds=rounds, network_params=sum(p.numel() for p in net.parameters()),
                  smoke_size_only=not gpu, rows=time_rows(net, device, batch, steps, rounds, args.warmup, rows))
    if args.gap:
        try:
            report["precision_gap"] = precision_gap(args.network, device, args.gap_seeds, batch,
                                                    ["bf16", "fp16"] if gpu else ["bf16"])
        except Exception as e:
            report["precision_gap"] = dict(error=f"{type(e).__name__}: {e}"[:500])
    if args.fid:
        try:
            if args.data is None and args.ref is None:
                raise ValueError("--fid needs --data (a data set for our reference) or --ref")
            report["fid"] = measure_fid(args.network, args.data, args.ref, device, args.allow_detector_mismatch)
        except Exception as e:
            report["fid"] = dict(error=f"{type(e).__name__}: {e}"[:500])
    for name, gap in report.get("precision_gap", {}).items():
        print(f"{name} vs fp32: {gap}", file=sys.stderr)
    for name, row in report["rows"].items():
        if "error" in row:
            print(f"{name:15s} error: {row['error']}", file=sys.stderr)
        else:
            seconds = row.get("seconds_for_50k", row.get("seconds_for_50k_sampler_only"))
            what = "" if "seconds_for_50k" in row else " (sampler only)"
            print(f"{name:15s} {row['images_per_second']:10.2f} img/s  x{row.get('speedup_vs_fp32_naive', 1):.2f}  "
                  f"50k in {seconds / 3600:.2f} h{what}", file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
