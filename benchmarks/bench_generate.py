"""Generation throughput: images/s of the EDM sampler at 35 NFE on the CIFAR-10 DDPM++ shape, and the time to 50k.

    python benchmarks/bench_generate.py                       # CPU: a small smoke size; GPU: the sizes below
    python benchmarks/bench_generate.py --out book/results/bench_generate_gpu.json
    python benchmarks/bench_generate.py --fid --network=URL --ref=URL   # + the CIFAR-10 FID (GPU, downloads)

Rows, each timed in this one process on the same random-weight network (speed does not depend on the weights):
- `fp32_naive`: `edm_lit.samplers.edm_sampler` on the float32 network, batch as given: the official loop;
- `fp16_autocast`, `bf16_autocast`: the same under `torch.autocast` (the sampler stays float64);
- `channels_last`: float32 with the network and its input in channels_last memory format;
- `compile`: float32 with `torch.compile(net)` (compile time reported separately, excluded from the rate).
Each row: median seconds per batch over `--rounds` timed batches after `--warmup`, images/s, the ratio to
`fp32_naive`, and `seconds_for_50k_sampler_only`: 50,000 images at that rate. That extrapolates the sampler
alone (one global `randn` for the batch, no per-seed generators, no files), so it is a lower bound for a run.
One more row, `generate_fp32`, times the real path of `edm-lit generate --seeds=0-49999` on the same network:
`edm_lit.generate.generate` with per-seed generators (latent, class, and the per-step noise drawn image by
image) and one PNG written per image; its `seconds_for_50k` is the time to expect for the command (fp32).
On a CPU the defaults shrink to a smoke size (batch 2, 2 steps = 3 NFE; rows fp32_naive, channels_last and
generate_fp32 only) so the script runs anywhere; those numbers say nothing about a GPU.
With --fid: generates 50,000 images of --network and computes the FID against --ref (needs the weights).
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
    results["generate_fp32"] = time_generate(net, device, batch, steps, rounds, warmup)
    base = results.get("fp32_naive", {}).get("images_per_second")
    for row in results.values():
        if base and "images_per_second" in row:
            row["speedup_vs_fp32_naive"] = row["images_per_second"] / base
    return results


def time_generate(net, device, batch, steps, rounds, warmup):
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
                         num_steps=steps)
                sync(device)
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {e}"[:300])
    sec = statistics.median(times)
    return dict(seconds_per_batch=sec, images_per_second=batch / sec, seconds_for_50k=50000 / (batch / sec))


def measure_fid(network, ref, device):
    from edm_lit.fid import fid_calc
    from edm_lit.generate import generate

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate(network, tmp, seeds="0-49999", subdirs=True, max_batch_size=512, device=device)
        t_gen = time.perf_counter() - t0
        value = fid_calc(tmp, ref, num=50000, batch_size=250, device=device)
    return dict(network=network, ref=ref, fid=value, seconds_generate=t_gen)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="batch (default 512 on a GPU, 2 on a CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="Heun steps (default 18 = 35 NFE on a GPU, 2 = 3 NFE on a CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="timed batches per row (default 5 on a GPU, 2 on a CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fid", action="store_true", help="also measure the FID of --network against --ref")
    parser.add_argument("--network", default="https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl")
    parser.add_argument("--ref", default="https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz")
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
    if args.fid:
        try:
            report["fid"] = measure_fid(args.network, args.ref, device)
        except Exception as e:
            report["fid"] = dict(error=f"{type(e).__name__}: {e}"[:500])
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
