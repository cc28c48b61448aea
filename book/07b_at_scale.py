# ---
# jupyter:
#   edm_lit:
#     export: training
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: edm_lit
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 7b. Training at scale
#
# > The training and sampling of diffusion models needs a lot of electricity; our project
# > consumed ∼250MWh on an in-house cluster of NVIDIA V100s. — Karras et al. 2022, §6
#
# Chapter 7's loop trains the tiny network on one CPU core; the paper's runs take days on 8 to
# 32 GPUs. It is the same loop. This chapter adds what scale asks of it:
# lower precision, the speed options, several GPUs, snapshots and a resume that continues a
# killed run exactly, the command line `edm-lit train`, a run that diverges, and the paper's
# recipe on your own data. The engineering behind it is reference material: the flags'
# parsing (Appendix A1.2), the files (A3.5–A3.7), the `torchrun` plumbing (A5), and the
# command's own machinery (A7). This book is built on a CPU: what an option buys on a GPU is
# not measured here (`benchmarks/bench_training.py` measures it, one row per option).
#
# | section | what |
# |---|---|
# | 7b.1 | mixed precision: fp16 with loss scaling, bf16 |
# | 7b.2 | the speed options: `--fused-adam`, `--channels-last`, `--compile` |
# | 7b.3 | several GPUs: one gradient from many ranks |
# | 7b.4 | snapshots and exact resume |
# | 7b.5 | the command line, `edm-lit train` |
# | 7b.6 | a run that diverges |
# | 7b.7 | full mode: the paper's recipe on your data set |

# %% tags=["export"]
import contextlib
import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from edm_lit.distributed import gather, init_distributed  # Appendix A5
from edm_lit.files import fsync_dir, image_grid, write_png  # Appendix A3

# %% tags=["hide-input"]
import io
import json
import tempfile
import time

import matplotlib.pyplot as plt
from myst_nb import glue

from edm_lit import training
from edm_lit.course import RandomImageSet
from edm_lit.mode import get_mode

MODE = get_mode().require("training the paper's network", needs=("data", "kimg"))
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
if MODE.quick:  # tiny tensors: more threads only add synchronisation
    torch.set_num_threads(1)
scratch = Path(tempfile.mkdtemp(prefix="ch7b-"))
tiny = dict(training.ARCH_PRESETS["ddpmpp-tiny"], dropout=0.0, use_fp16=False,
            class_name="edm_lit.precond.EDMPrecond")


def tiny_run(run_dir=None, seed=0, **options):
    """Chapter 7's loop on 64 random 8x8 images with the tiny network."""
    kwargs = dict(dataset=RandomImageSet(), network_kwargs=tiny, batch_size=32,
                  total_kimg=2, device=MODE.device, grid_images=16, grid_steps=6,
                  data_loader_kwargs=dict(num_workers=0), lr_rampup_kimg=0,
                  ema_halflife_kimg=0.5)
    return training.TrainingRun(run_dir=run_dir, seed=seed, **{**kwargs, **options})


def flat(tensors):  # one float64 vector on the CPU
    return torch.cat([t.detach().double().cpu().flatten() for t in tensors])


# %% [markdown]
# ## 7b.1 Mixed precision
#
# > In practice, we store the trainable parameters as FP32 but cast them to FP16 when
# > evaluating $F_\theta$, except for the embedding and self-attention layers, where we found
# > the limited exponent range of FP16 to occasionally lead to stability issues. — App. F.3
#
# Half-precision floats are twice as fast on a GPU's tensor cores and take half the memory,
# but fp16 covers a narrow range, while bfloat16 keeps fp32's exponent:
#
# $$\text{fp16: } 2^{-24} \approx 6 \cdot 10^{-8} \le |x| \le 65504, \qquad
# \text{bf16: } \approx 10^{-38} \ldots 3 \cdot 10^{38}, \qquad
# \nabla_\theta (s\,\mathcal L) = s\,\nabla_\theta \mathcal L.$$
#
# `--fp16` sets the networks' `use_fp16` (Chapter 5: the U-Net computes in fp16 on CUDA; the
# weights and Adam stay fp32). Gradients smaller than $6 \cdot 10^{-8}$ then vanish, so the
# loss is multiplied by a constant $s$ (`--ls`, 100 for the paper's ImageNet run), which
# multiplies every gradient; Adam cancels it (Chapter 7.4). `--bf16`, ours, runs the forward
# pass under bfloat16 autocast, on a GPU or a CPU: with fp32's range it needs no loss scaling,
# at the price of fewer digits. On CUDA the loop turns TF32 off (the paper trains in true
# fp32) and records the peak GPU memory of each tick (Appendix A7.3).

# %% tags=["export"]
def _set_backends(device, cudnn_benchmark: bool) -> None:
    """cuDNN autotuning as --bench says; no TF32 (the paper trains in true fp32)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


# %% [markdown]
# **Check** — a gradient entry of $10^{-8}$ is 0 in fp16 and survives when scaled by 100, and
# in bf16 unscaled; Adam's update does not change with `--ls` while the gradients are far above
# $\epsilon$ ($10^{-3}$ here against the default $10^{-8}$), and does when they are not. A step
# under bf16 autocast on this CPU gives the fp32 gradient to a few parts in a thousand.

# %% tags=["hide-input"]
g = torch.tensor([1e-8, 1e-6])
print("fp16:", g.half().tolist(), " x100 in fp16:", (g * 100).half().tolist(),
      " bf16:", g.bfloat16().tolist())
assert g.half()[0] == 0 and (g * 100).half()[0] > 0 and g.bfloat16()[0] > 0


def adam_updates(ls, eps, n_steps=5):
    """Adam on a float64 toy problem whose gradients (about 1e-3) are scaled by `ls`."""
    start = torch.linspace(-1, 1, 50, dtype=torch.float64)
    w, targets = torch.nn.Parameter(start.clone()), start + 1
    opt = torch.optim.Adam([w], lr=1e-3, eps=eps)
    for _ in range(n_steps):
        opt.zero_grad(set_to_none=True)
        (1e-3 * (w - targets).square().sum() * ls).backward()
        opt.step()
    return w.detach() - start


for eps in [1e-8, 1e-3]:
    u1, u100 = adam_updates(1.0, eps), adam_updates(100.0, eps)
    rel = ((u1 - u100).norm() / u1.norm()).item()
    print(f"Adam eps={eps:g}: --ls=1 against --ls=100, relative difference {rel:.1e}")
    assert rel < 1e-4 if eps == 1e-8 else rel > 1e-2
grads = {}
for dtype in [None, "bfloat16"]:
    run = tiny_run(autocast_dtype=dtype)  # the same seed: the same weights and draws
    run.step()
    grads[dtype] = flat(p.grad for p in run.net.parameters())
bf16_rel = ((grads["bfloat16"] - grads[None]).norm() / grads[None].norm()).item()
print(f"one step under bf16 autocast against fp32: relative gradient difference "
      f"{bf16_rel:.1e}")
assert 1e-4 < bf16_rel < 3e-2

# %% [markdown]
# ## 7b.2 The speed options
#
# A step's time is the sum of its parts, and each option of ours works on one of them:
#
# $$t_\text{step} = t_\text{data} + t_\text{forward} + t_\text{backward} + t_\text{Adam} +
# t_\text{EMA}, \qquad \text{throughput} = B / t_\text{step}.$$
#
# `--channels-last=1` keeps the network and images in the channels-last memory format, which
# GPU convolutions prefer (forward, backward; the noise is then drawn in that layout, so such a
# run is not bitwise the one without the flag). `--fused-adam=1` uses Adam's fused kernel,
# `torch.optim.Adam(fused=True)`: one kernel for the whole update, the same formula with other
# rounding. `--compile=1` compiles the trained network with `torch.compile` (forward and
# backward; minutes of compilation at the start). Without any flag the images already travel
# as uint8, a quarter of the bytes of float32, from pinned memory and asynchronously. Each
# option keeps the exact resume (`tests/test_training_speed.py`) and the snapshots' layout.
# **Check** — on this CPU, with the tiny network: each flag takes effect, the fused update
# equals the plain one to rounding after five steps, and the images per second of each, as
# measured (compile is left out: its C++ compilation takes minutes on this CPU).

# %% tags=["hide-input"]
def images_per_second(run, steps=10, warmup=2):
    for _ in range(warmup):
        run.step()
    start = time.perf_counter()
    for _ in range(steps):
        run.step()
    return steps * run.batch_size / (time.perf_counter() - start)


adam = {"class_name": "torch.optim.Adam", "lr": 2e-3, "betas": [0.9, 0.999],
        "eps": 1e-8}
variants = {"plain": {}, "--fused-adam": {"optimizer_kwargs": {**adam, "fused": True}},
            "--channels-last": {"channels_last": True}}
speed, after5 = {}, {}
for name, extra in variants.items():
    run = tiny_run(**{"optimizer_kwargs": adam, **extra, "batch_size": 64})
    conv = run.net.model.enc["8x8_conv"].weight
    layout = conv.is_contiguous(memory_format=torch.channels_last)
    assert name != "--fused-adam" or run.optimizer.defaults["fused"]
    assert name != "--channels-last" or layout
    start = flat(run.net.parameters())
    for _ in range(5):
        run.step()
    after5[name] = flat(run.net.parameters()) - start
    speed[name] = images_per_second(run)
fused_rel = ((after5["--fused-adam"] - after5["plain"]).norm() / after5["plain"].norm())
print(f"fused against plain Adam after 5 steps: relative difference {fused_rel:.1e}")
assert fused_rel < 1e-4
for name, value in speed.items():
    glue(f"speed_{name.strip('-').replace('-', '_')}", f"{value:.0f}", display=False)
fig, ax = plt.subplots(figsize=(6, 1.8))
ax.barh(list(speed), list(speed.values()), color=["C0", "C1", "C2"])
ax.set(xlabel="images per second (tiny network, batch 64, one CPU thread)")
plt.tight_layout()

# %% [markdown]
# In this run, on a CPU shared with other work, the plain loop trained {glue:text}`speed_plain`
# images per second, fused Adam {glue:text}`speed_fused_adam` and channels-last
# {glue:text}`speed_channels_last`: one run's timings of the tiny network, which say
# little about the options. They are made for a GPU, where this book did not run;
# `benchmarks/bench_training.py` measures them there, one row per flag, with the paper's
# CIFAR-10 network.
#
# ## 7b.3 Several GPUs
#
# > Specifically, we increase the parallelism from 4 to 8 GPUs and batch size from 128 to 512
# > or 256, depending on the resolution. — App. F.3
#
# Under `torchrun` each of $W$ ranks takes $B/W$ images of the step (§7.2), computes their
# gradient, and DistributedDataParallel averages the ranks' gradients:
#
# $$\mathbf g = \frac{1}{W} \sum_{r=1}^{W} \mathbf g_r, \qquad
# \mathbf g_r = \frac{s}{B / W} \sum_{i \in \text{rank } r} \nabla_\theta\, \ell_i
# \quad\Longrightarrow\quad \mathbf g = \frac{s}{B} \sum_{i=1}^{B} \nabla_\theta\, \ell_i,$$
#
# the gradient of one process with the whole batch. A rank whose $B/W$ images do not fit in
# memory takes them in rounds of `--batch-gpu` and adds the rounds' gradients; only the last
# round synchronises (`no_sync` for the others), so accumulation costs no communication.
# `init_distributed` (Appendix A5) joins the process group — NCCL on CUDA, Gloo on a CPU — and
# only rank 0 writes files; an error of any rank reaches all of them before they go on
# (`agree_on_error`), so that they stop together instead of waiting for each other forever.
# Rank $r$ seeds numpy with $(\text{seed} \cdot W + r) \bmod 2^{31}$ and torch with numpy's
# first draw, as the official loop does, so that each rank draws its own σ, noise and dropout;
# the initial weights come from the seed alone, so that one process and several start alike.

# %% tags=["export"]
def split_batch(batch_size: int, world_size: int, batch_gpu=None) -> tuple:
    """(per-rank images of one round, accumulation rounds): batch = per_round * rounds *
    ranks. Chapter 7b."""
    if batch_size < 1 or world_size < 1:
        raise ValueError("need batch >= 1 and world size >= 1, "
                         f"got batch={batch_size}, world size={world_size}")
    if batch_size % world_size:
        raise ValueError(f"--batch={batch_size} is not divisible by the number of "
                         f"ranks ({world_size})")
    per_rank = batch_size // world_size
    per_round = per_rank if batch_gpu is None else min(int(batch_gpu), per_rank)
    if per_round < 1 or per_rank % per_round:
        raise ValueError(f"--batch={batch_size} is not divisible by ranks x "
                         f"--batch-gpu = {world_size} x {batch_gpu}: each rank gets "
                         f"{per_rank} images per step, which must be a multiple of "
                         "--batch-gpu")
    return per_round, per_rank // per_round


def _ranks(device) -> tuple:
    """(rank, world size, device): torchrun's (Appendix A5) when no device is given."""
    if device is None:
        return init_distributed()
    dist = torch.distributed
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), torch.device(device)
    return 0, 1, torch.device(device)


def _seed_rank(seed: int, rank: int, world_size: int) -> None:
    """numpy and Python's random from (seed * world_size + rank) mod 2^31, torch from
    numpy's first draw: the official per-rank seeds."""
    np.random.seed((seed * world_size + rank) % (1 << 31))
    random.seed((seed * world_size + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))


def _wrap_ranks(net, device, world_size: int):
    """`net` itself on one rank; on several, DistributedDataParallel around it."""
    if world_size == 1:
        return net
    # DDP warns at every backward when a gradient's layout differs from its bucket's
    # (harmless: it copies); one line per step and rank would drown the log
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)


# %% [markdown]
# **Check** — with a loss whose σ and noise depend only on each image, so that any split of
# the batch sees the same draws: four rounds of 8 images give the gradient of one round of
# 32, as the ranks' average does; the split of a global batch over ranks and rounds. Two real
# ranks with Gloo against one process is `tests/test_training.py::test_ddp_two_processes_match_one`.

# %% tags=["hide-input"]
from edm_lit.loss import EDMLoss
from edm_lit.training import accumulate_gradients, split_batch


class PerImageDraws(EDMLoss):
    """EDMLoss whose σ and noise depend only on each image (a test device)."""

    def __call__(self, net, images, labels=None, augment_pipe=None):
        out = []
        for image in images:
            g = torch.Generator().manual_seed(int(image.sum().item() * 1e3) % (1 << 31))
            sigma = (torch.randn([1, 1, 1, 1], generator=g) * 1.2 - 1.2).exp()
            noisy = image[None] + torch.randn(image[None].shape, generator=g) * sigma
            out.append(self.weight(sigma) * (net(noisy, sigma) - image[None]) ** 2)
        return torch.cat(out)


images, grads = torch.rand(32, 1, 8, 8) * 2 - 1, {}
for rounds in [1, 4]:
    torch.manual_seed(0)
    net = training.construct(img_resolution=8, img_channels=1, **tiny)
    parts = [(chunk, None) for chunk in images.chunk(rounds)]
    accumulate_gradients(net, PerImageDraws(), parts, 1.0, per_rank_batch=32)
    grads[rounds] = flat(p.grad for p in net.parameters())
rel = ((grads[4] - grads[1]).norm() / grads[1].norm()).item()
print(f"four rounds of 8 against one of 32: relative gradient difference {rel:.1e}")
assert rel < 1e-5
assert split_batch(512, 8, 32) == (32, 2) and split_batch(512, 1) == (512, 1)
try:
    split_batch(512, 1, 48)
    raise AssertionError("512 images cannot come in rounds of 48")
except ValueError as e:
    print(e)

# %% [markdown]
# ## 7b.4 Snapshots and exact resume
#
# > We saved a snapshot of the model every 2.5 million images and reported results for the
# > snapshot that achieved the lowest FID […] — App. F.3
#
# A run of days will be interrupted. What it needs to continue is its **state** after $n$
# images — everything the future depends on — and the state after the next step is a function
# of it and of the next images of the stream (§7.2), which depend on $n$ alone:
#
# $$S_n = \big(\theta_n,\ \theta^\text{ema}_n,\ \text{Adam}_n,\ \text{generators}_n,\ n\big),
# \qquad S_{n+B} = \text{step}\big(S_n;\ \text{stream}[\,n, n+B\,)\big).$$
#
# So a training state (Appendix A3.7: the tensors in safetensors, the rest in JSON, written
# atomically) holds the weights, the EMA, Adam's moments, the progress and the generators of
# every rank, and a run resumed from it on the same number of ranks continues bit for bit. On
# another number of ranks the weights, EMA and Adam load, but the generators cannot be mapped,
# so the ranks are seeded afresh. Resumed in its own directory, a run keeps the statistics
# lines up to the state (Appendix A3.6). The network snapshots are the EMA in the format of
# Appendix A2 with a grid of its samples (gaps between the images, Appendix A3.4), drawn from
# fixed noise with a private generator, so that making them does not change the training's
# random stream. `--transfer` starts instead from the weights of a snapshot (ours, or an
# official `.pkl` read without running its code), net and EMA alike.

# %% tags=["export"]
def _recorded_options(given: dict) -> dict:
    """The constructor's arguments a training state records (its `options`)."""
    names = ("run_dir", "dataset_kwargs", "network_kwargs", "loss_kwargs",
             "optimizer_kwargs", "augment_kwargs", "seed", "batch_size", "batch_gpu",
             "total_kimg", "ema_halflife_kimg", "ema_rampup_ratio", "lr_rampup_kimg",
             "loss_scaling", "channels_last", "torch_compile")
    options = {name: given[name] for name in names}
    options["run_dir"] = None if given["run_dir"] is None else str(given["run_dir"])
    return options


def _sample_grid(run) -> torch.Tensor:
    """EMA samples from fixed noise and labels (Chapter 3's sampler), drawn with a
    private generator."""
    from edm_lit.samplers import edm_sampler

    net, n, device = run.ema, run.grid_images, run.device
    g = torch.Generator(device=device).manual_seed(run.seed)
    shape = [n, net.img_channels, net.img_resolution, net.img_resolution]
    latents = torch.randn(shape, generator=g, device=device, dtype=torch.float64)
    labels = None
    if net.label_dim:
        cycle = torch.arange(n, device=device) % net.label_dim
        labels = torch.eye(net.label_dim, device=device)[cycle]

    def noise(x):
        return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        return edm_sampler(net, latents, labels, num_steps=run.grid_steps,
                           randn_like=noise)


def _write_snapshot(run, kimg: int) -> None:
    """network-snapshot-KIMG (the EMA, fsynced) and its grid samples-KIMG.png."""
    from edm_lit.checkpoints import save_network

    stem = run.run_dir / f"network-snapshot-{kimg:06d}"
    for path in save_network(run.ema, stem):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(run.run_dir)
    run.last_snapshot = stem.name + ".json"
    if run.grid_images > 0:
        images = _sample_grid(run)
        columns = max(1, int(math.ceil(math.sqrt(images.shape[0]))))
        grid = image_grid(images, columns, gap=max(1, images.shape[-1] // 8))
        write_png(run.run_dir / f"samples-{kimg:06d}.png", grid, durable=True)


def _dump_state(run, kimg: int) -> None:
    """training-state-KIMG: every rank's generators, gathered; written by rank 0."""
    rng = gather(capture_rng(run.device), run.world_size)  # every rank takes part
    if run.run_dir is not None:
        progress = {"cur_nimg": run.cur_nimg, "cur_tick": run.cur_tick + 1}
        save_training_state(state_path(run.run_dir, kimg), net=run.net, ema=run.ema,
                            optimizer=run.optimizer, options=run.options, rng=rng,
                            progress=progress)


# %% tags=["export"]
def _transfer(run, source) -> None:
    """--transfer: start net and EMA from a snapshot's weights (ours or an official
    .pkl, loaded safely, Appendix A2)."""
    from edm_lit.checkpoints import load_network

    theirs, ours = load_network(source).state_dict(), run.net.state_dict()
    bad = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if bad or not set(theirs) & set(ours):
        raise ValueError(f"--transfer: {source} does not fit this network (mismatched "
                         f"tensors: {bad[:5]})")
    broken = [k for k, v in theirs.items()
              if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"--transfer: {source} holds non-finite weights (NaN/inf in "
                         f"{broken[:3]})")
    common = {k: v for k, v in theirs.items() if k in ours}
    run.net.load_state_dict(common, strict=False)
    run.ema.load_state_dict(common, strict=False)


def _resume(run, state) -> None:
    """--resume: weights, EMA, Adam, progress, and this rank's generators when the
    number of ranks is the same (Appendix A3.7)."""
    header = load_training_state(state, net=run.net, ema=run.ema,
                                 optimizer=run.optimizer, rank=run.rank,
                                 world_size=run.world_size, device=run.device)
    run.cur_nimg, run.cur_tick = int(header["cur_nimg"]), int(header["cur_tick"])
    run.exact_resume = header["world_size"] == run.world_size
    if not run.exact_resume:  # other ranks' generators cannot be mapped onto these
        _seed_rank(run.seed + run.cur_nimg, run.rank, run.world_size)
    home = Path(state).parent.resolve()
    if run.run_dir is not None and home == run.run_dir.resolve():
        # resumed in its own directory: its statistics up to here stay
        run.stats_lines = _kept_stats_lines(run.run_dir / "stats.jsonl", run.cur_nimg)


# %% [markdown]
# **Check** — exact resume, on the CPU (a GPU's kernels need not be bitwise deterministic): a
# run of 2 kimg with a state at every tick, and a second run that resumes the first one's state
# at 1 kimg, end bit for bit in the same state (weights, EMA, Adam, generators), the same last
# snapshot and the same sample grid. (The test suite kills a run with SIGKILL in the middle of
# a tick and resumes it: the same.)

# %% tags=["hide-input"]
from edm_lit.training import find_training_state, read_training_state

ticks = dict(kimg_per_tick=1, snapshot_ticks=1, state_dump_ticks=1, device="cpu")
tiny_run(scratch / "whole", **ticks).run()
middle, nimg = find_training_state(scratch / "whole" / "training-state-000001.json")
resumed = tiny_run(scratch / "resumed", resume_state_dump=str(middle), **ticks)
print(f"resumed at {resumed.cur_nimg} images, tick {resumed.cur_tick}")
resumed.run()
_, a = read_training_state(scratch / "whole" / "training-state-000002.json")
_, b = read_training_state(scratch / "resumed" / "training-state-000002.json")
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
for name in ["network-snapshot-000002.json", "samples-000002.png"]:
    whole, again = (scratch / d / name for d in ("whole", "resumed"))
    assert whole.read_bytes() == again.read_bytes()
print(f"{len(a)} tensors of the final state, the snapshot and the grid: bitwise equal")

# %% [markdown]
# ## 7b.5 The command line
#
# The command is a pipeline of three steps, each in its own place:
#
# $$\text{argv} \xrightarrow{\ \text{A1.2}\ } \text{flags} \xrightarrow{\ \texttt{build\_options}\ }
# \text{options} \xrightarrow{\ \S 7.6\ } \texttt{TrainingRun(**options).run()}.$$
#
# `python -m edm_lit.train` (and `edm-lit train`, Appendix A1) takes the official flags — the
# same names, meanings and defaults, booleans written `--cond=1` — plus ours: `--bf16`,
# `--lr-rampup` (the ramp-up in Mimg, officially fixed at 10), `--grid` (images per snapshot
# grid, 0 for none), the speed options of §7b.2, and `--data=digits` for the quick data set.
# `--resume` takes a `training-state-NNNNNN.json` or a run directory (its latest complete state);
# without `--seed` it keeps the seed of the run it continues. `build_options` resolves the flags
# into the options the official tool writes to `training_options.json`, key for key, and
# refuses — before any network is built, in one line — what cannot train (Appendix A7.1); the
# command then claims its run directory (A3.5), builds the run and trains (A7.2). The paper's
# runs, unchanged — CIFAR-10 class-conditional on 8 GPUs, FFHQ 64×64, ImageNet with ADM on 32
# GPUs over 4 nodes — and the quick run of Chapter 7:
#
# ```bash
# torchrun --standalone --nproc_per_node=8 -m edm_lit.train --outdir=training-runs \
#     --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
# torchrun --standalone --nproc_per_node=8 -m edm_lit.train --outdir=training-runs \
#     --data=datasets/ffhq-64x64.zip --cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 \
#     --lr=2e-4 --dropout=0.05 --augment=0.15
# torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
#     -m edm_lit.train --outdir=training-runs --data=datasets/imagenet-64x64.zip --cond=1 \
#     --arch=adm --duration=2500 --batch=4096 --batch-gpu=32 --lr=1e-4 --ema=50 \
#     --dropout=0.10 --augment=0 --fp16=1 --ls=100 --tick=200
# python -m edm_lit.train --outdir=runs --data=digits --arch=ddpmpp-tiny --duration=0.03 \
#     --batch=64 --lr=2e-3 --lr-rampup=0.001 --ema=0.002 --dropout=0 --augment=0 --seed=0
# ```

# %% tags=["export"]
def build_options(flags: dict, world_size: int = 1, device=None) -> dict:
    """Resolve train flags (names and defaults of the official train.py) into the
    training options. Chapter 7b.

    Returns the nested dict the official tool writes to training_options.json (same
    keys), ready for `training_loop(**options)`. Raises ValueError, before any work, for
    inputs that cannot train.
    """
    unknown = set(flags) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown train options {sorted(unknown)}")
    f = {**TRAIN_DEFAULTS, **flags}
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device if device is not None else default_device)
    _refuse(f, device)  # Appendix A7.1
    split_batch(int(f["batch"]), world_size, f["batch_gpu"])
    resume = find_training_state(f["resume"]) if f["resume"] is not None else None

    c = {"dataset_kwargs": _dataset_kwargs(f)}
    dataset = construct(**c["dataset_kwargs"])  # opened once: name, resolution, labels
    if f["cond"] and not dataset.has_labels:
        raise ValueError("--cond=True requires labels specified in dataset.json")
    c["dataset_kwargs"].update(resolution=int(dataset.resolution),
                               max_size=len(dataset))
    c["data_loader_kwargs"] = dict(pin_memory=True, num_workers=int(f["workers"]),
                                   prefetch_factor=2)
    c["network_kwargs"] = _network_kwargs(f, dataset)
    loss_name = PRECOND_CLASSES[f["precond"]][1]
    c["loss_kwargs"] = {"class_name": f"edm_lit.loss.{loss_name}"}
    c["optimizer_kwargs"] = {"class_name": "torch.optim.Adam", "lr": float(f["lr"]),
                             "betas": [0.9, 0.999], "eps": 1e-8}
    if f["augment"]:
        c["augment_kwargs"] = {"class_name": "edm_lit.augment.AugmentPipe",
                               "p": float(f["augment"]), **AUGMENT_SWITCHES}
    c["total_kimg"] = max(int(f["duration"] * 1000), 1)
    c["ema_halflife_kimg"] = int(f["ema"] * 1000)
    c["batch_size"], c["batch_gpu"] = int(f["batch"]), f["batch_gpu"]
    c["loss_scaling"], c["cudnn_benchmark"] = float(f["ls"]), bool(f["bench"])
    c["kimg_per_tick"], c["snapshot_ticks"] = int(f["tick"]), int(f["snap"])
    c["state_dump_ticks"] = int(f["dump"])
    seed = f["seed"] if f["seed"] is not None else _state_seed(resume)  # a resume's
    c["seed"] = int(seed) if seed is not None else _random_seed(device)
    if f["transfer"] is not None:
        c["resume_pkl"] = str(f["transfer"])
        c["ema_rampup_ratio"] = None  # fine-tuning: the full EMA half-life at once
    elif resume is not None:
        c["resume_kimg"] = resume[1] // 1000
        c["resume_state_dump"] = str(resume[0])
    # ours, beyond the official options
    c["lr_rampup_kimg"] = int(f["lr_rampup"] * 1000)
    c["autocast_dtype"] = "bfloat16" if f["bf16"] else None
    c["grid_images"] = int(f["grid"])
    c["channels_last"] = bool(f["channels_last"])
    c["torch_compile"] = bool(f["compile"])
    if f["fused_adam"]:
        c["optimizer_kwargs"]["fused"] = True
    c["run_dir"] = None  # the run directory, claimed later (Appendix A3.5)
    if f["outdir"] is not None:
        desc = _run_desc(f, dataset, world_size)
        c["run_dir"] = _pick_run_dir(f["outdir"], desc, f["nosubdir"])
    return c


# %% tags=["export:train"]
# edm_lit.train is the command `python -m edm_lit.train` / `edm-lit train`: the official
# train.py's flags (parsed in Appendix A1.2) on edm_lit.training, the loop (Chapters 7
# and 7b), run on every rank by Appendix A7.2.
import argparse
import sys

from edm_lit import distributed, training


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m edm_lit.train`. Chapter 7b."""
    parser = argparse.ArgumentParser(
        prog="python -m edm_lit.train",
        description="Train an EDM diffusion model (the official train.py's flags).")
    return add_train_arguments(parser)  # Appendix A1.2


def main(argv=None) -> int:
    """Entry point of `python -m edm_lit.train`; returns the exit status. Chapter 7b."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_train(args)  # Appendix A7.2


# %% [markdown]
# **Check** — `--dry-run` with the paper's CIFAR-10 flags (a few random 32×32 images stand in
# for CIFAR-10: only the sizes depend on them) prints the official configuration with Table 7's
# values and writes nothing; bad input is refused in one line before any work.

# %% tags=["hide-input"]
from edm_lit import train as train_command
from edm_lit.course import random_image_folder

fake_cifar = random_image_folder(scratch / "cifar10-32x32")
runs, buffer = scratch / "runs", io.StringIO()
argv = ["--outdir", str(runs), f"--data={fake_cifar}", "--cond=1", "--arch=ddpmpp",
        "--seed=0", "--dry-run"]
args = train_command.build_parser().parse_args(argv)
status = train_command.run_train(args, out=buffer)
printed = buffer.getvalue()
print(printed[-420:])
options = json.loads(printed.split("Training options:")[1].split("\n\n")[0])
assert status == 0 and "Dry run; exiting." in printed and not runs.exists()
assert (options["batch_size"], options["total_kimg"], options["ema_halflife_kimg"],
        options["optimizer_kwargs"]["lr"], options["network_kwargs"]["dropout"],
        options["augment_kwargs"]["p"]) == (512, 200_000, 500, 1e-3, 0.13, 0.12)
bad_inputs = {"missing data set": [f"--data={scratch}/no-such.zip"],
              "--batch vs --batch-gpu": [f"--data={fake_cifar}", "--batch-gpu=48"],
              "--transfer with --resume": [f"--data={fake_cifar}", "--transfer=a.pkl",
                                           f"--resume={scratch / 'whole'}"],
              "--lr=inf": [f"--data={fake_cifar}", "--lr=inf"],
              "--seed of 23 digits": [f"--data={fake_cifar}", f"--seed={10**22}"],
              "--fp16 without CUDA": [f"--data={fake_cifar}", "--fp16=1"]}
for case, flags in bad_inputs.items():
    if case.startswith("--fp16") and MODE.device.type == "cuda":
        continue  # with CUDA, --fp16 trains
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = train_command.main(["--outdir", str(runs), *flags])
    print(f"{case:25s} -> exit {status}: {err.getvalue().strip()}")
    assert status == 1 and err.getvalue().startswith("edm-lit train: error:")
    assert err.getvalue().count("\n") == 1 and not runs.exists()

# %% [markdown]
# ## 7b.6 A run that diverges
#
# > Instead of improving FID per se, the main benefit of our preconditioning is that it makes
# > the training more robust […] — §5
#
# The nan/inf guard of §7.4 absorbs one batch whose loss overflows. It cannot absorb weights
# that are no longer finite (too large a learning rate, a broken `--transfer` network), and it
# hides a loss that is never finite any more, by zeroing every gradient: either way the run
# would train on, learning nothing. So the loop stops, at a tick and before writing it, when
#
# $$\exists\, i:\ \theta_i \notin \mathbb R \quad\text{or}\quad
# \#\{\text{finite losses of the tick}\} = 0 \ \ (\text{ticks of two steps or more}),$$
#
# with `TrainingDiverged` (the command exits 1); the snapshots and states on disk are the last
# good ones. Each step counts its finite losses and the progress of the first non-finite one on
# the device (no host sync, §7.6.2); the tick reads them once, on every rank.

# %% tags=["export"]
class TrainingDiverged(RuntimeError):
    """The run stopped before writing a tick: its weights are no longer finite, or no
    loss of the tick was. Chapter 7b."""


def _check_finite(run) -> None:
    """Raise TrainingDiverged if the weights are not finite, or no loss of a tick of two
    steps or more was. One host sync per tick."""
    params = [p for module in (run.net, run.ema) for p in module.parameters()]
    broken = torch.stack([torch.isfinite(p).all() for p in params]).all().logical_not()
    status = torch.stack([broken.to(torch.int64), run.finite_rounds])
    if torch.distributed.is_initialized():  # any rank's broken weights or finite loss
        torch.distributed.all_reduce(status, op=torch.distributed.ReduceOp.MAX)
    values = torch.cat([status, run.first_nonfinite[None]]).tolist()
    broken, finite_rounds, first = values
    run.finite_rounds.zero_()
    steps = (run.cur_nimg - run.tick_start_nimg) // run.batch_size
    if not broken and (finite_rounds > 0 or steps < 2):
        return
    what = ("the weights are no longer finite" if broken else f"no loss of the last "
            f"{steps} steps was finite (the guard zeroes every gradient)")
    loss = ""
    if first >= 0:
        loss = f"; the first non-finite loss was at kimg {first / 1e3:g}"
    last = f" (last snapshot: {run.last_snapshot})" if run.last_snapshot else ""
    raise TrainingDiverged(
        f"training diverged at kimg {run.cur_nimg / 1e3:g}: {what}{loss}. Stopped "
        f"before writing this tick, so the files on disk are from before it{last}. "
        "Lower --lr, or check the --transfer network")


# %% [markdown]
# **Check** — with a loss that is never finite the run stops at its first tick of several
# steps, before writing it: only the snapshot of tick 0 is on disk.

# %% tags=["hide-input"]
class NeverFinite(EDMLoss):
    def __call__(self, net, images, labels=None, augment_pipe=None):
        return super().__call__(net, images, labels, augment_pipe) * float("nan")


try:
    tiny_run(scratch / "diverging", loss_fn=NeverFinite(), total_kimg=1,
             kimg_per_tick=0.25, grid_images=0).run()
    raise AssertionError("the run did not stop")
except training.TrainingDiverged as e:
    print(e)
names = [p.name for p in (scratch / "diverging").glob("*.json")]
assert names == ["network-snapshot-000000.json"]

# %% [markdown]
# ## 7b.7 Full mode: the paper's recipe on your data set
#
# > Table 7 shows the exact set of hyperparameters that we used in our training experiments
# > reported in Section 5. — App. F.3
#
# The paper trains DDPM++ with EDM's preconditioning and loss at two resolutions:
#
# $$32^2\!:\ B = 512,\ \eta = 10^{-3},\ p_\text{drop} = 0.13,\ p_\text{aug} = 0.12; \qquad
# 64^2\!:\ B = 256,\ \eta = 2 \cdot 10^{-4},\ p_\text{drop} = 0.05,\ p_\text{aug} = 0.15,$$
#
# both with an EMA half-life of 0.5 Mimg and a ramp-up of 10 Mimg, channel multipliers 2,2,2 at
# 32×32 and 1,2,2,2 at 64×64 (FFHQ's dropout; AFHQv2 takes 0.25). `paper_recipe` gives these
# flags for a resolution, and `full_size_flags` for the reader's data set (`EDM_LIT_DATA`) and
# budget (`EDM_LIT_KIMG`): class-conditional when the data set has labels, about ten ticks. In
# full mode (a GPU) this section trains it through the command's own code (`edm_lit.train.main`)
# into `training-runs/`; in quick mode it prints the flags for a CIFAR-sized stand-in and runs
# a short command-line training on the digits instead, and shows that run's files.

# %% tags=["export"]
def paper_recipe(resolution: int, labelled: bool) -> dict:
    """The paper's train flags for data of this resolution (App. F.3, Table 7): DDPM++,
    EDM. Chapter 7b.

    32x32: the CIFAR-10 recipe (the official defaults); 64x64: the FFHQ/AFHQv2 recipe
    (multipliers 1,2,2,2, batch 256, lr 2e-4, dropout 0.05, augment 0.15).
    Class-conditional when labelled.
    """
    common = dict(arch="ddpmpp", precond="edm", cond=bool(labelled), ema=0.5,
                  lr_rampup=10.0)
    if resolution == 32:
        return dict(common, batch=512, lr=1e-3, dropout=0.13, augment=0.12)
    if resolution == 64:
        return dict(common, cres=[1, 2, 2, 2], batch=256, lr=2e-4, dropout=0.05,
                    augment=0.15)
    raise ValueError(f"no paper recipe for {resolution}x{resolution} images: the paper "
                     "trains DDPM++ at 32x32 (CIFAR-10) and 64x64 (FFHQ, AFHQv2)")


# %% tags=["export:course"]
import math


def full_size_flags(data, kimg: float, seed: int = 0) -> dict:
    """Chapter 7b's full-mode run: paper_recipe for `data`'s resolution and labels, for
    `kimg` thousand images, in about ten ticks. Chapter 7b."""
    from edm_lit.data import ImageFolderDataset
    from edm_lit.training import paper_recipe

    dataset = ImageFolderDataset(str(data), use_labels=True)  # labels, if it has any
    duration = kimg / 1000
    while int(duration * 1000) < int(kimg):  # 1.001 * 1000 = 1000.99...: a kimg short
        duration = math.nextafter(duration, math.inf)
    tick = max(1, int(kimg) // 10)  # snapshots and grids at the start, middle and end
    return dict(paper_recipe(dataset.resolution, dataset.has_labels), data=str(data),
                duration=duration, tick=tick, snap=max(1, int(kimg) // tick // 2),
                dump=10, seed=int(seed))


# %% tags=["hide-input"]
from edm_lit.course import QUICK_FLAGS, full_size_flags

if MODE.full:
    flags = full_size_flags(MODE.data, MODE.kimg)
    outdir = Path("training-runs")
else:  # a CIFAR-sized stand-in for the flags; a short digits run for the files
    print("full mode would train with:", json.dumps(full_size_flags(fake_cifar, 200)))
    flags = {**QUICK_FLAGS, "duration": 0.002, "tick": 1, "snap": 1, "seed": 0}
    outdir = scratch / "command-runs"
print("training:", " ".join(train_command.to_argv(flags)))
err = io.StringIO()  # the options and the progress bar, shown only if it fails
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    argv = ["--outdir", str(outdir), *train_command.to_argv(flags)]
    status = train_command.main(argv)
assert status == 0, err.getvalue()[-3000:]
shown = max((p for p in outdir.iterdir() if p.name[:5].isdigit()),
            key=lambda p: int(p.name[:5]))  # the run just made
rows = [json.loads(r) for r in (shown / "stats.jsonl").read_text().splitlines()]
grids = sorted(shown.glob("samples-*.png"))
assert rows[-1]["Progress/kimg"]["mean"] >= int(flags["duration"] * 1000)
assert len(grids) >= 2 and all(r["Loss/loss"]["mean"] is not None for r in rows)
print(sorted(p.name for p in shown.iterdir() if not p.name.endswith(".safetensors")))

# %% [markdown]
# **Look** — the sample grids of the first and the last snapshot of that run (EMA samples from
# the same noise, gaps between the images), and its loss over the ticks.

# %% tags=["hide-input"]
from PIL import Image

fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
for ax, path in zip(axes, [grids[0], grids[-1]]):
    ax.imshow(np.array(Image.open(path)), cmap="gray", vmin=0, vmax=255)
    ax.set(title=f"EMA samples, {path.stem}", xticks=[], yticks=[])
axes[2].plot([r["Progress/kimg"]["mean"] for r in rows],
             [r["Loss/loss"]["mean"] for r in rows], "o-")
axes[2].set(xlabel="training progress (kimg)", ylabel="loss", title=shown.name[:40])
plt.tight_layout()

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.training`: `_set_backends` (precision), `split_batch` and the per-rank
# plumbing, the snapshot and state writers, `--transfer` and `--resume`, `build_options`,
# `TrainingDiverged`, `paper_recipe`; to `edm_lit.train`, the command: `build_parser` and `main`
# (its flags: Appendix A1.2; running it on every rank: A7.2); to `edm_lit.course`:
# `full_size_flags`. Tested beyond this chapter: a run killed with SIGKILL mid-tick and resumed
# is bitwise the uninterrupted one, with each speed flag too (`tests/test_training*.py`); two
# Gloo ranks match one process; bad input and races end in one line.
#
# ## Exercises
#
# 1. Resume the run of §7b.4 with `world_size` 2 (two Gloo processes). Which parts of the state
#    load, and why is the continuation no longer bitwise the one-process run?
# 2. Under fp16, which gradients would `--ls=100` still lose, and what does `--bf16` trade
#    for not needing a loss scale?
#
# :::{dropdown} Answers
# 1. Weights, EMA, Adam and the progress load; the generators of one rank cannot be split into
#    two, so the ranks are seeded afresh from the seed and the progress: the σ, noise and
#    dropout of the next steps differ (the data order does not).
# 2. Those below $6 \cdot 10^{-10}$ (100 times below fp16's smallest). bf16 keeps fp32's range
#    but only 8 bits of mantissa: about 3 significant digits, which the bf16 step above shows
#    as a gradient a few parts in a thousand off.
# :::
