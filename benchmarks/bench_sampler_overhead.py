"""Sampler overhead per step: everything a sampler does except the network call, in ms and as ratios.

    python benchmarks/bench_sampler_overhead.py [--batch 64] [--resolution 32] [--steps 18] [--rounds 7]
                                               [--net-reps 2] [--skip-net] [--threads N] [--out FILE]

The network is replaced by a *constant denoiser* that returns a preallocated tensor (cost: one Python
call), so a sampler's run time is its own overhead: the time-step set-up, the arithmetic of Algorithm 1/2
on the [batch, 3, res, res] state, the noise draws, the dtype conversions. Measured, in one process,
interleaved round by round (median over rounds):

- `edm_lit_heun`: `edm_lit.samplers.edm_sampler` (Heun, 2 network calls per step but the last; float64, one
  noise draw per step as in the official code);
- `edm_lit_euler`: `edm_lit.samplers.ablation_sampler(solver='euler')` on EDM's steps;
- `edm_lit_euler_no_draw`: the same with a `randn_like` that returns preallocated zeros, to show what the
  per-step noise draw (kept for compatibility with the official noise streams) costs;
- `diffusers_euler`: the same Euler steps with diffusers' `EDMEulerScheduler` (float32; draws noise only when
  churning; applies EDM's preconditioning c_in, c_skip, c_out itself, which in edm_lit is part of the network).

The reference cost is one call of a DDPM++ network of the CIFAR-10 size (edm_lit.networks.SongUNet inside
edm_lit.precond.EDMPrecond, 55.7 M parameters, batch and resolution as given). If those modules are missing, a
clearly labelled stand-in is timed instead and the fractions are not DDPM++ figures.

The official implementation (NVlabs/edm) is not on PyPI and not installed here: there is no side-by-side run
with it. Its samplers do the same float64 arithmetic and the same per-step draw as ours, which is what the
`edm_lit_*` rows time. Prints a table on stderr and one JSON object on stdout (or to --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from edm_lit.samplers import ablation_sampler, edm_sampler

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


class ConstantDenoiser:
    """The denoiser interface at (almost) no cost: returns the same preallocated tensor for every call."""

    sigma_min, sigma_max = 0.0, float("inf")

    def __init__(self, out):
        self.out, self.calls = out, 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        return self.out


def run_edm_heun(latents, steps):
    net = ConstantDenoiser(torch.zeros_like(latents, dtype=torch.float64))
    edm_sampler(net, latents, num_steps=steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO)
    return net.calls


def run_edm_euler(latents, steps, draw=True):
    net = ConstantDenoiser(torch.zeros_like(latents, dtype=torch.float64))
    zeros = torch.zeros_like(latents, dtype=torch.float64)
    ablation_sampler(net, latents, num_steps=steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, solver="euler",
                     **({} if draw else {"randn_like": lambda x: zeros}))
    return net.calls


def make_diffusers_runner():
    try:
        import diffusers
        from diffusers import EDMEulerScheduler
    except ImportError:
        return None, None

    def run(latents, steps):
        scheduler = EDMEulerScheduler(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, final_sigmas_type="zero")
        scheduler.set_timesteps(steps)
        model_out = torch.zeros_like(latents)
        x = latents * scheduler.init_noise_sigma
        calls = 0
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            calls += 1  # the model call: model_out = F(x_in, c_noise = t)
            x = scheduler.step(model_out, t, x, return_dict=False)[0]
        return calls

    return run, diffusers.__version__


def ddpmpp_network(resolution):
    """DDPM++ of the CIFAR-10 size (the paper's config: 128 channels, mult [2, 2, 2], 4 blocks, attention at 16)."""
    try:
        from edm_lit.precond import EDMPrecond
        import edm_lit.networks  # noqa: F401  (SongUNet)
    except ImportError as e:
        return None, f"edm_lit.precond / edm_lit.networks unavailable ({e})"
    net = EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=10, model_type="SongUNet", augment_dim=9,
                     model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13,
                     embedding_type="positional", encoder_type="standard", decoder_type="standard",
                     channel_mult_noise=1, resample_filter=[1, 1])
    return net.eval().requires_grad_(False), "DDPM++ (edm_lit SongUNet in EDMPrecond, CIFAR-10 config)"


def stand_in_network():
    """NOT DDPM++: a plain conv stack, only so that the script still runs without edm_lit.networks."""
    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(*[torch.nn.Conv2d(3 if i == 0 else 128, 128 if i < 7 else 3, 3, padding=1)
                                              for i in range(8)])

        def forward(self, x, sigma, class_labels=None):
            return self.body(x.float())

    return StandIn().eval().requires_grad_(False), "STAND-IN (8-layer conv stack, not DDPM++)"


def time_network(net, batch, resolution, reps):
    x = torch.randn(batch, 3, resolution, resolution, dtype=torch.float64)
    sigma = torch.tensor(2.5, dtype=torch.float64)
    labels = torch.eye(10)[torch.arange(batch) % 10]
    times = []
    with torch.inference_mode():
        net(x[:2], sigma, labels[:2])  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            net(x, sigma, labels)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--net-reps", type=int, default=2)
    ap.add_argument("--skip-net", action="store_true", help="do not time the network (ratios to it are omitted)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    latents = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
    run_diffusers, diffusers_version = make_diffusers_runner()
    variants = {"edm_lit_heun": lambda: run_edm_heun(latents, args.steps),
                "edm_lit_euler": lambda: run_edm_euler(latents, args.steps),
                "edm_lit_euler_no_draw": lambda: run_edm_euler(latents, args.steps, draw=False)}
    if run_diffusers is not None:
        variants["diffusers_euler"] = lambda: run_diffusers(latents, args.steps)

    calls = {name: fn() for name, fn in variants.items()}  # warm-up round
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    per_step_ms = {name: 1e3 * statistics.median(t) / args.steps for name, t in times.items()}

    result = {
        "benchmark": "sampler_overhead",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "diffusers": diffusers_version,
                    "device": "cpu"},
        "config": {"batch": args.batch, "shape": [args.batch, 3, args.resolution, args.resolution], "steps": args.steps,
                   "rounds": args.rounds, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "rho": RHO},
        "network_calls_per_run": calls,
        "overhead_ms_per_step": per_step_ms,
        "overhead_ms_per_network_call": {n: 1e3 * statistics.median(times[n]) / calls[n] for n in variants},
        "ratios": {},
    }
    if "diffusers_euler" in per_step_ms:
        result["ratios"]["edm_lit_euler_vs_diffusers_euler"] = per_step_ms["edm_lit_euler"] / per_step_ms["diffusers_euler"]
        result["ratios"]["edm_lit_euler_no_draw_vs_diffusers_euler"] = (per_step_ms["edm_lit_euler_no_draw"]
                                                                        / per_step_ms["diffusers_euler"])
    result["ratios"]["noise_draw_share_of_edm_lit_euler"] = 1 - per_step_ms["edm_lit_euler_no_draw"] / per_step_ms["edm_lit_euler"]

    if not args.skip_net:
        net, label = ddpmpp_network(args.resolution)
        if net is None:
            reason = label
            net, label = stand_in_network()
            label = f"{label}; {reason}"
        net_ms = 1e3 * time_network(net, args.batch, args.resolution, args.net_reps)
        result["network"] = {"name": label, "parameters": sum(p.numel() for p in net.parameters()),
                             "ms_per_call": net_ms, "reps": args.net_reps}
        heun_per_call = result["overhead_ms_per_network_call"]["edm_lit_heun"]
        result["ratios"]["edm_lit_heun_overhead_per_call_vs_network_call"] = heun_per_call / net_ms
        result["ratios"]["edm_lit_heun_overhead_per_step_vs_network_call"] = per_step_ms["edm_lit_heun"] / net_ms
        if "diffusers_euler" in per_step_ms:
            result["ratios"]["diffusers_euler_overhead_per_step_vs_network_call"] = per_step_ms["diffusers_euler"] / net_ms

    lines = [f"sampler overhead, batch {args.batch}x3x{args.resolution}x{args.resolution}, {args.steps} steps, "
             f"{torch.get_num_threads()} threads, median of {args.rounds} rounds (diffusers {diffusers_version})",
             f"{'variant':24s} {'ms/step':>9s} {'ms/net call':>12s} {'net calls':>10s}"]
    for name in variants:
        lines.append(f"{name:24s} {per_step_ms[name]:9.3f} {result['overhead_ms_per_network_call'][name]:12.3f} "
                     f"{calls[name]:10d}")
    if "network" in result:
        lines.append(f"network: {result['network']['name']}, {result['network']['parameters']:,} parameters, "
                     f"{result['network']['ms_per_call']:.0f} ms per call")
    for key, value in result["ratios"].items():
        lines.append(f"{key:55s} {value:.4g}")
    print("\n".join(lines), file=sys.stderr)

    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
