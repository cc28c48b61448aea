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
# # 7. The training loop
#
# Chapters 4–6 gave the loss of a batch, the networks and the data. This chapter puts them into
# the loop: the paper's recipe (App. F.3, Table 7), the order of the images, the learning-rate
# ramp-up and the exponential moving average (EMA) of the weights, one Adam step, the loop, the
# loss per noise level of Fig. 5a; then a real run, the tiny DDPM++ on the 1,797 UCI digits on
# one CPU core, the model Chapters 8 and 9 evaluate. Chapter 7b takes it to scale; Appendices
# A1.2, A3.5–A3.7, A5 and A7 hold the engineering. **`edm_lit.training` is the loop**;
# **`edm_lit.train` is the command** (`edm-lit train`, the official `train.py`'s flags, 7b).

# %% tags=["export"]
# edm_lit.training is the training loop (Chapters 7 and 7b; Appendices A1.2, A3.5-A3.7,
# A7). edm_lit.train is the command that runs it: `python -m edm_lit.train`, `edm-lit
# train` (Chapter 7b).
import contextlib
import copy
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from edm_lit.distributed import init_distributed  # Appendix A5
from edm_lit.files import append_durable, remove_stale_temp_files, write_atomic  # A3

# %% tags=["hide-input"]
import json
import tempfile

import matplotlib.pyplot as plt

from edm_lit import training
from edm_lit.mode import get_mode

MODE = get_mode()  # the same in both modes; the full-size run is Chapter 7b's §7b.7
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
if MODE.quick:  # this chapter's tensors are tiny: more threads only add synchronisation
    torch.set_num_threads(1)
scratch = Path(tempfile.mkdtemp(prefix="ch7-"))

# %% [markdown]
# ## 7.1 The recipe as one configuration
#
# > We trained each model until a total of 200 million images had been drawn from the
# > training set […]; this corresponds to a total of ∼400,000 training iterations using a
# > batch size of 512. — Karras et al. 2022, App. F.3
#
# The loop minimises the paper's training loss (Section 5): the denoising error of Eq. 2,
# weighted by $\lambda(\sigma)$, with $\sigma$ drawn from $p_\text{train}$ — Eq. 8 once the
# preconditioning of Chapter 4 is written out:
#
# $$\mathbb{E}_{\sigma \sim p_\text{train}}\; \mathbb{E}_{\mathbf y \sim p_\text{data}}\;
# \mathbb{E}_{\mathbf n \sim \mathcal N(\mathbf 0, \sigma^2 \mathbf I)}
# \Big[\lambda(\sigma)\,\big\|D_\theta(\mathbf y + \mathbf n; \sigma) - \mathbf y\big\|_2^2\Big].$$
#
# Everything else is a setting. The official `train.py` resolves its flags into one dictionary
# of options (`training_options.json`) passed to the loop as keyword arguments; so does
# `build_options` (7b.5), key for key. The defaults are CIFAR-10's recipe; `ddpmpp-tiny` (16,
# 32 channels, one block per level) is quick mode's network; `construct` (A7.1) builds the
# classes named. **Check** — the defaults are Table 7's; the tiny preset builds from its name.

# %% tags=["export"]
# --arch presets: the paper's networks (App. F.4) and our CPU-sized 'ddpmpp-tiny'.
_DDPMPP = {"model_type": "SongUNet", "embedding_type": "positional",
           "encoder_type": "standard", "decoder_type": "standard",
           "channel_mult_noise": 1, "resample_filter": [1, 1]}
ARCH_PRESETS = {
    "ddpmpp": {**_DDPMPP, "model_channels": 128, "channel_mult": [2, 2, 2]},
    "ncsnpp": {"model_type": "SongUNet", "embedding_type": "fourier",
               "encoder_type": "residual", "decoder_type": "standard",
               "channel_mult_noise": 2, "resample_filter": [1, 3, 3, 1],
               "model_channels": 128, "channel_mult": [2, 2, 2]},
    "adm": {"model_type": "DhariwalUNet", "model_channels": 192,
            "channel_mult": [1, 2, 3, 4]},
    "ddpmpp-tiny": {**_DDPMPP, "model_channels": 16, "channel_mult": [1, 2],
                    "num_blocks": 1, "attn_resolutions": [4]},
}
# --precond: (preconditioner, loss) of Table 1's columns (Chapter 4).
PRECOND_CLASSES = {"vp": ("VPPrecond", "VPLoss"), "ve": ("VEPrecond", "VELoss"),
                   "edm": ("EDMPrecond", "EDMLoss")}
# The official train.py's flags and defaults: CIFAR-10's recipe (Table 7). MIMG =
# millions of images, KIMG = thousands.
TRAIN_DEFAULTS = dict(
    outdir=None, data=None, cond=False, arch="ddpmpp", precond="edm", duration=200.0,
    batch=512, batch_gpu=None, cbase=None, cres=None, lr=10e-4, ema=0.5, dropout=0.13,
    augment=0.12, xflip=False, fp16=False, ls=1.0, bench=True, cache=True, workers=1,
    desc=None, nosubdir=False, tick=50, snap=50, dump=500, seed=None, transfer=None,
    resume=None, dry_run=False,
    # ours: bf16 autocast, the ramp-up (official: fixed at 10 Mimg), the snapshot grid,
    bf16=False, lr_rampup=10.0, grid=64,
    # and the speed options of Chapter 7b
    channels_last=False, compile=False, fused_adam=False,
)
# The augmentations the paper enables, each with probability --augment (Chapter 6b).
AUGMENT_SWITCHES = {"xflip": 1e8, "yflip": 1, "scale": 1, "rotate_frac": 1, "aniso": 1,
                    "translate_frac": 1}
AUGMENT_DIM = 9


# %% tags=["hide-input"]
from edm_lit.training import ARCH_PRESETS, TRAIN_DEFAULTS, construct

names = ("batch", "lr", "duration", "ema", "dropout", "augment")
recipe = [TRAIN_DEFAULTS[k] for k in names]
print("batch, lr, duration (Mimg), EMA half-life (Mimg), dropout, augment:", recipe)
assert recipe == [512, 1e-3, 200, 0.5, 0.13, 0.12]
net = construct("training.networks.EDMPrecond", img_resolution=8, img_channels=1,
                **ARCH_PRESETS["ddpmpp-tiny"])
assert type(net).__module__ == "edm_lit.precond"
assert type(net.model).__name__ == "SongUNet"

# %% [markdown]
# ## 7.2 The order of the data
#
# Every rank must see other images, the ranks together those of one process with the same
# batch, and a resumed run must continue where the killed one stopped. One **global stream** of
# data-set indices gives all three. For $N$ images and $W$ ranks, position $p$ of the stream is
#
# $$\text{image}(p) = \pi_{\lfloor p / N \rfloor}\big(p \bmod N\big), \qquad
# \text{rank}(p) = p \bmod W, \qquad \text{step } k \text{ takes } p \in [\,kB,\ (k+1)B\,),$$
#
# with $\pi_e$ a permutation seeded with $(\text{seed}, e)$, one per epoch $e$; the ranks
# interleave, as in the official loop. The loader's position *is* the progress $n$: resuming
# needs no loader state. **Check** — two ranks together take the positions of one, in the same
# steps; a stream started at $n$ continues the uninterrupted one; an epoch visits every image.

# %% tags=["export"]
class ShardedStream(torch.utils.data.Sampler):
    """Data-set indices of one rank: positions start + rank, + world_size, ... of a
    seeded global stream. Chapter 7.

    Epoch e is a permutation of range(size) seeded by (seed, e) (the identity when
    shuffle is False); `start` (a multiple of world_size) is the images already trained.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start: int = 0, shuffle=True):
        if size < 1 or not 0 <= rank < world_size or start < 0 or start % world_size:
            raise ValueError("need size >= 1, 0 <= rank < world_size, start a multiple "
                             f"of world_size >= 0; got size={size}, rank={rank}, "
                             f"world_size={world_size}, start={start}")
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)
        self.seed, self.start, self.shuffle = int(seed), int(start), bool(shuffle)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self):
        position, epoch, order = self.start + self.rank, -1, None
        while True:
            e, i = divmod(position, self.size)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            yield int(order[i])
            position += self.world_size


def make_loader(dataset, batch_gpu: int, rank: int, world_size: int, seed: int,
                start_nimg: int, num_workers: int = 1, pin_memory: bool = False,
                prefetch_factor: int = 2):
    """An endless iterator of (uint8 images [N,C,H,W], float32 labels [N,L]) batches
    from position start_nimg. Chapter 7."""
    sampler = ShardedStream(len(dataset), rank, world_size, seed, start_nimg)
    extra = {}
    if num_workers > 0:
        extra = dict(prefetch_factor=prefetch_factor, persistent_workers=True)
    # a private generator: creating the loader must not consume the global RNG
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_gpu, sampler=sampler,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         generator=torch.Generator(), **extra)
    return iter(loader)


# %% tags=["hide-input"]
import itertools

from edm_lit.training import ShardedStream

take = lambda stream, k: list(itertools.islice(stream, k))  # noqa: E731
one = take(ShardedStream(10, seed=3), 30)
two = [take(ShardedStream(10, rank=r, world_size=2, seed=3), 15) for r in range(2)]
assert [x for pair in zip(*two) for x in pair] == one
assert take(ShardedStream(10, seed=3, start=12), 18) == one[12:]
assert all(sorted(one[e * 10:(e + 1) * 10]) == list(range(10)) for e in range(3))
print("global stream:", one[:12], "...\nrank 0:", two[0][:6], " rank 1:", two[1][:6])

# %% [markdown]
# ## 7.3 The learning-rate ramp-up and the EMA half-life
#
# > […] we increase the learning rate from 0.0002 to 0.001 for CIFAR-10, ramping it up during
# > the first 10 million images, and standardize the half-life of the exponential moving
# > average of $\theta$ to 0.5 million images. — App. F.3
#
# The learning rate of a step taken after $n$ images, and the decay $\beta$ of the average
# $\theta_\text{ema} \leftarrow \beta\,\theta_\text{ema} + (1-\beta)\,\theta$, with $B$ images
# per step:
#
# $$\eta(n) = \eta_\text{base}\,\min\!\Big(\frac{n}{n_\text{ramp}},\,1\Big), \qquad
# \beta = 0.5^{\,B / h}, \qquad h = \min\big(h_\text{target},\; r\,n\big).$$
#
# The rate ramps up over $n_\text{ramp}$, then stays: the EMA does what a decay would do. It
# is computed from the images seen *before* the step, so the first step has rate 0 and only
# initialises Adam's moments. The **half-life in images** $h$ (`--ema`) is capped at
# $r = 5\,\%$ of the images seen: early on, a long average would remember the random start.
# In images, the EMA does not depend on the batch: $\beta^2$ at $B/2$ equals $\beta$ at $B$.
# **Check** — a unit step reaches ½ in the EMA after $h$ images whatever the batch; the cap;
# the ramp's ends.

# %% tags=["export"]
def learning_rate(base_lr: float, cur_nimg: int, lr_rampup_kimg: float) -> float:
    """The learning rate of a step taken after cur_nimg images: a linear ramp-up over
    lr_rampup_kimg, then flat. Chapter 7."""
    ramp = cur_nimg / max(lr_rampup_kimg * 1000, 1e-8)
    return base_lr * min(ramp, 1.0)


def ema_beta(batch_size: int, cur_nimg: int, ema_halflife_kimg: float,
             ema_rampup_ratio=0.05) -> float:
    """EMA decay per step: a half-life of min(ema_halflife_kimg * 1000,
    ema_rampup_ratio * cur_nimg) images. Chapter 7."""
    halflife = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife = min(halflife, ema_rampup_ratio * cur_nimg)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """theta_ema <- beta theta_ema + (1 - beta) theta for every parameter. Chapter 7."""
    for p_avg, p in zip(ema.parameters(), net.parameters()):
        p_avg.copy_(p.detach().lerp(p_avg, beta))


# %% tags=["hide-input"]
from edm_lit.training import ema_beta, learning_rate, update_ema

for batch in [16, 100, 500]:
    beta, w_ema = ema_beta(batch, 10**9, 100), 0.0  # progress far past the ramp-up
    for _ in range(100_000 // batch):
        w_ema = beta * w_ema + (1 - beta) * 1.0
    print(f"batch {batch:3d}: EMA of a unit step after one half-life = {w_ema:.4f}")
    assert abs(w_ema - 0.5) < 1e-9
assert abs(ema_beta(512, 1_000_000, 500) - 0.5 ** (512 / 50_000)) < 1e-15
assert ema_beta(512, 0, 500) == 0.0  # the first step copies the network
assert [learning_rate(1e-3, n, 10_000) for n in (0, 5e6, 2e7)] == [0, 5e-4, 1e-3]
lin, avg = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
before = avg.weight.clone()
update_ema(avg, lin, 0.75)
assert torch.allclose(avg.weight, 0.75 * before + 0.25 * lin.weight)
nimg = np.linspace(0, 200e6, 400)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2))
ax1.plot(nimg / 1e6, [learning_rate(1e-3, n, 10_000) for n in nimg])
ax1.set(xlabel="training progress (Mimg)", ylabel="learning rate",
        title="lr ramp-up (CIFAR-10 recipe)")
halflife = [-512 / math.log2(ema_beta(512, n, 500)) if n else 0 for n in nimg]
ax2.plot(nimg / 1e6, np.array(halflife) / 1e6)
ax2.set(xlabel="training progress (Mimg)", ylabel="EMA half-life (Mimg)",
        title="EMA half-life with ramp-up ratio 0.05")
plt.tight_layout()

# %% [markdown]
# ## 7.4 One optimiser step
#
# > We also disable gradient clipping […] that we found to provide no benefit in practice.
# > — App. F.3
#
# With $B$ images, a loss scale $s$ and the per-image loss $\ell_i$ of Chapter 4, Adam moves
# the weights by its bias-corrected moments $\hat{\mathbf m}, \hat{\mathbf v}$ of $\mathbf g$:
#
# $$\mathbf g = \frac{s}{B} \sum_{i=1}^{B} \nabla_\theta\, \ell_i, \qquad
# \theta \leftarrow \theta - \eta\, \frac{\hat{\mathbf m}}{\sqrt{\hat{\mathbf v}} + \epsilon}.$$
#
# The images may come in rounds whose gradients add up (**accumulation**, Chapter 7b.3).
# **Loss scaling** (`--ls`, 100 for ImageNet in fp16, Chapter 7b.1) multiplies $\mathbf g$ by
# $s$ and is never divided out: $\hat{\mathbf m}$ and $\sqrt{\hat{\mathbf v}}$ both grow by $s$,
# which cancels up to Adam's $\epsilon$. The **nan/inf guard** sets NaN gradient entries to 0
# and ±inf to $\pm 10^5$, so that one overflowing batch cannot destroy the weights. **Check** —
# with the same draws, `--ls=100` gives 100 times the gradient; the guard clears NaN and inf.

# %% tags=["export"]
class _SigmaProbe:
    """Calls `net` and keeps the sigma it was called with (to sort the loss by σ)."""

    def __init__(self, net):
        self.net, self.sigma = net, None

    def __call__(self, x, sigma, *args, **kwargs):
        self.sigma = sigma.detach()
        return self.net(x, sigma, *args, **kwargs)


def accumulate_gradients(ddp_net, loss_fn, rounds, loss_scaling: float,
                         per_rank_batch: int, augment_pipe=None, autocast_dtype=None,
                         on_loss=None) -> None:
    """Backpropagate sum(loss) * loss_scaling / per_rank_batch for each (images, labels)
    round; DistributedDataParallel synchronises in the last only. Chapter 7.

    `on_loss(loss, sigma)` sees each round's per-element loss and its sigma [N,1,1,1].
    """
    probe = _SigmaProbe(ddp_net)
    for k, (images, labels) in enumerate(rounds):
        sync = contextlib.nullcontext()
        if k < len(rounds) - 1 and hasattr(ddp_net, "no_sync"):
            sync = ddp_net.no_sync()
        cast = contextlib.nullcontext()
        if autocast_dtype is not None:  # Chapter 7b.1
            cast = torch.autocast(images.device.type, dtype=autocast_dtype)
        with sync:
            with cast:
                loss = loss_fn(net=probe, images=images, labels=labels,
                               augment_pipe=augment_pipe)
            loss = loss.float()
            if on_loss is not None:
                on_loss(loss.detach(), probe.sigma)
            loss.sum().mul(loss_scaling / per_rank_batch).backward()


def sanitize_gradients(params) -> None:
    """Replace NaN gradient entries by 0 and +-inf by +-1e5, in place (the official
    guard). Chapter 7."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


# %% tags=["hide-input"]
from edm_lit.loss import EDMLoss
from edm_lit.training import accumulate_gradients, sanitize_gradients

tiny = dict(ARCH_PRESETS["ddpmpp-tiny"], class_name="edm_lit.precond.EDMPrecond",
            dropout=0.0)
images, grads = torch.rand(32, 1, 8, 8) * 2 - 1, {}
for ls in [1.0, 100.0]:
    torch.manual_seed(0)  # the same network, σ and noise for both
    net, loss_fn = construct(img_resolution=8, img_channels=1, **tiny), EDMLoss()
    accumulate_gradients(net, loss_fn, [(images, None)], ls, per_rank_batch=32)
    grads[ls] = torch.cat([p.grad.flatten() for p in net.parameters()])
rel = ((grads[100.0] - 100 * grads[1.0]).norm() / grads[100.0].norm()).item()
print(f"--ls=100 against 100 x the gradient of --ls=1: relative difference {rel:.1e}")
assert rel < 1e-5
p = torch.nn.Parameter(torch.zeros(4))
p.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0])
sanitize_gradients([p])
assert p.grad.tolist() == [0.0, 1e5, -1e5, 2.0]

# %% [markdown]
# ## 7.5 The loss per σ, in the statistics
#
# > Inspecting the per-$\sigma$ loss after training […] reveals that a significant reduction is
# > possible only at intermediate noise levels […] — §5, on Fig. 5a
#
# The loop measures that loss while it trains: the images fall into σ buckets
# $[\sigma_k, \sigma_{k+1})$, each reporting the mean weighted loss per pixel of its images,
#
# $$L_k = \frac{1}{|I_k|} \sum_{i \in I_k} \frac{\lambda(\sigma_i)}{CHW}\,
# \big\|D_\theta(\mathbf y_i + \mathbf n_i; \sigma_i) - \mathbf y_i\big\|_2^2, \qquad
# I_k = \{\, i : \sigma_k \le \sigma_i < \sigma_{k+1} \,\}.$$
#
# Each tick writes a line of statistics (A3.6) in the official layout (`Loss/loss`,
# `Timing/sec_per_kimg`, ... → `{"num", "mean", "std"}` over the tick and the ranks) plus our
# buckets, `Loss/sigma_LO_HI`. `Stats` keeps count, sum and sum of squares on the device
# (buckets filled by `index_add_` where `torch.bucketize` says), so no step waits for the GPU;
# a tick sums them over the ranks in one `all_reduce`. **Check** — the mean and deviation of
# all values; each σ in the bucket whose edges enclose it.

# %% tags=["export"]
# edges of the Loss/sigma_LO_HI statistics
SIGMA_BUCKETS = (0.002, 0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 80.0)


def stat_names() -> list:
    """Every statistic a rank may report during a tick (all ranks reduce the same list).
    Chapter 7."""
    pairs = zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:])
    return ["Loss/loss"] + [f"Loss/sigma_{lo:g}_{hi:g}" for lo, hi in pairs]


class Stats:
    """Count, sum and sum of squares per statistic, kept on the device; reduced over the
    ranks at each tick. Chapter 7."""

    def __init__(self, device):
        self.device, self.moments, self.edges = torch.device(device), {}, {}
        self.bucket_rows = {name: i + 1 for i, name in enumerate(stat_names()[1:])}
        # row 0: below the first edge; the last row: at or above the last (not reported)
        self.buckets = torch.zeros(len(SIGMA_BUCKETS) + 1, 3, dtype=torch.float64,
                                   device=self.device)

    def add(self, name: str, values) -> None:
        values = torch.as_tensor(values).detach().flatten()
        values = values.to(self.device, torch.float64)
        zero = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.moments.setdefault(name, zero).add_(torch.stack([
            values.new_full([], values.numel()), values.sum(), values.square().sum()]))

    def add_loss(self, loss: torch.Tensor, sigma: torch.Tensor) -> None:
        """Loss/loss over all elements; each image's mean loss under its σ bucket."""
        self.add("Loss/loss", loss)
        per_image = loss.detach().mean(dim=(1, 2, 3)).to(self.device, torch.float64)
        sigma = sigma.detach().flatten().to(self.device)
        if sigma.dtype not in self.edges:
            self.edges[sigma.dtype] = torch.tensor(SIGMA_BUCKETS, dtype=sigma.dtype,
                                                   device=self.device)
        row = torch.bucketize(sigma, self.edges[sigma.dtype], right=True)
        values = torch.stack([torch.ones_like(per_image), per_image,
                              per_image.square()], dim=1)
        self.buckets.index_add_(0, row, values)

    def collect(self, names_everywhere) -> dict:
        """{name: {num, mean, std}} over all ranks since the last call."""
        names = sorted(names_everywhere)
        zero = torch.zeros(3, dtype=torch.float64, device=self.device)
        table = zero.new_zeros(len(names), 3)
        for i, name in enumerate(names):
            table[i] = self.moments.get(name, zero)
            if name in self.bucket_rows:
                table[i] += self.buckets[self.bucket_rows[name]]
        if torch.distributed.is_initialized() and names:
            torch.distributed.all_reduce(table)
        self.moments = {}
        self.buckets.zero_()
        out = {}
        for name, (num, total, squares) in zip(names, table.tolist()):
            if num > 0:
                mean = total / num
                std = math.sqrt(max(squares / num - mean**2, 0.0))
                out[name] = {"num": num, "mean": mean, "std": std}
        return out


# %% tags=["hide-input"]
from edm_lit.training import SIGMA_BUCKETS, Stats, stat_names

stats, values = Stats(torch.device("cpu")), torch.randn(1000)
for part in (values[:300], values[300:]):
    stats.add("Loss/loss", part)
row = stats.collect(["Loss/loss"])["Loss/loss"]
assert row["num"] == 1000 and abs(row["mean"] - values.double().mean()) < 1e-12
assert abs(row["std"] - values.double().std(unbiased=False)) < 1e-9
g = torch.Generator().manual_seed(0)
sigma, loss = (torch.randn(256, generator=g) * 2 - 1).exp(), torch.rand(256, 1, 2, 2)
stats.add_loss(loss, sigma.reshape(-1, 1, 1, 1))
got = stats.collect(stat_names())
for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:]):
    inside, row = (sigma >= lo) & (sigma < hi), got[f"Loss/sigma_{lo:g}_{hi:g}"]
    assert row["num"] == inside.sum()
    assert abs(row["mean"] - loss.mean((1, 2, 3))[inside].double().mean()) < 1e-12
print({k: v["num"] for k, v in got.items()})

# %% [markdown]
# ## 7.6 The loop
#
# `TrainingRun` puts the pieces together. With $n$ images trained, batch $B$, $\kappa$ per tick:
#
# $$\theta \leftarrow \text{step}(\theta;\ \text{stream}[\,n, n+B\,)), \quad n \leftarrow n + B,
# \quad \text{and a tick when } n \ge n_\text{tick} + \kappa \ \text{ or } \ n \ge n_\text{total}.$$
#
# It comes in four parts, each with its check: construction, step, maintenance (a tick's work)
# and run. The first defines the class; the others attach their methods (`_add_methods`).
#
# ### 7.6.1 Construction
#
# The constructor builds the data stream, the network for the data set, its EMA copy, Adam and
# the augmentation; it restores a state or transfers weights when asked (7b.4). The initial
# weights come from the seed alone, so one process and several start alike (7b.3).

# %% tags=["export"]
def _add_methods(cls, **methods) -> None:
    """Attach functions defined after `cls` as its methods (the book writes a class over
    several cells)."""
    for name, function in methods.items():
        function.__name__, function.__qualname__ = name, f"{cls.__name__}.{name}"
        setattr(cls, name, function)


# %% tags=["export"]
class TrainingRun:
    """The paper's training loop over one configuration (`build_options`): one CPU, one
    GPU or torchrun. Chapter 7.

    `TrainingRun(**options).run()`. Only rank 0 writes to run_dir (None: nothing is
    written). `log` receives status lines; `progress_bar` shows tqdm's bar on rank 0.
    """

    def __init__(self, run_dir=".", dataset_kwargs=None, data_loader_kwargs=None,
                 network_kwargs=None, loss_kwargs=None, optimizer_kwargs=None,
                 augment_kwargs=None, seed=0, batch_size=512, batch_gpu=None,
                 total_kimg=200000, ema_halflife_kimg=500, ema_rampup_ratio=0.05,
                 lr_rampup_kimg=10000, loss_scaling=1, kimg_per_tick=50,
                 snapshot_ticks=50, state_dump_ticks=500, resume_pkl=None,
                 resume_state_dump=None, resume_kimg=0, cudnn_benchmark=True,
                 device=None, autocast_dtype=None, grid_images=64, grid_steps=18,
                 log=None, progress_bar=False, loss_fn=None, dataset=None,
                 channels_last=False, torch_compile=False):
        self.options = _recorded_options(locals())  # for its training state (7b.4)
        self.rank, self.world_size, self.device = _ranks(device)
        if network_kwargs.get("use_fp16") and self.device.type != "cuda":
            raise ValueError("use_fp16 (--fp16) needs a CUDA device")
        self.run_dir = Path(run_dir) if run_dir is not None and self.rank == 0 else None
        self.log = log if self.rank == 0 else None
        self.progress_bar = progress_bar and self.rank == 0
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.batch_gpu, self.rounds = split_batch(self.batch_size, self.world_size,
                                                  batch_gpu)
        self.per_rank_batch = self.batch_gpu * self.rounds
        self.total_nimg = int(total_kimg) * 1000
        self.ema_halflife_kimg = ema_halflife_kimg
        self.ema_rampup_ratio, self.lr_rampup_kimg = ema_rampup_ratio, lr_rampup_kimg
        self.loss_scaling, self.kimg_per_tick = float(loss_scaling), kimg_per_tick
        self.snapshot_ticks, self.state_dump_ticks = snapshot_ticks, state_dump_ticks
        if isinstance(autocast_dtype, str):
            autocast_dtype = getattr(torch, autocast_dtype)
        self.autocast_dtype, self.channels_last = autocast_dtype, bool(channels_last)
        self.grid_images, self.grid_steps = int(grid_images), int(grid_steps)
        _set_backends(self.device, cudnn_benchmark)  # Chapter 7b.1
        _seed_rank(self.seed, self.rank, self.world_size)  # Chapter 7b.3
        self.dataset = dataset if dataset is not None else construct(**dataset_kwargs)
        self.loader_kwargs = dict(data_loader_kwargs or {})
        if self.device.type != "cuda":
            self.loader_kwargs["pin_memory"] = False
        self._build(network_kwargs, loss_kwargs, optimizer_kwargs, augment_kwargs,
                    loss_fn, torch_compile)
        self.cur_nimg, self.cur_tick = int(resume_kimg) * 1000, 0
        self.stats_lines = []  # the lines a resume keeps (None: stats.jsonl begun)
        self.last_snapshot = None
        if resume_pkl is not None:
            _transfer(self, resume_pkl)  # Chapter 7b.4
        if resume_state_dump is not None:
            _resume(self, resume_state_dump)  # Chapter 7b.4
        self.tick_start_nimg = self.cur_nimg
        self.stats = Stats(self.device)
        # on the device: the progress at the first non-finite loss (-1: none yet) and
        # this tick's rounds with a finite loss (Chapter 7b.6)
        self.first_nonfinite = torch.full([], -1, dtype=torch.int64, device=self.device)
        self.finite_rounds = torch.zeros([], dtype=torch.int64, device=self.device)
        self.batches = make_loader(self.dataset, self.batch_gpu, self.rank,
                                   self.world_size, self.seed, self.cur_nimg,
                                   **self.loader_kwargs)



# %% tags=["export"]
def _build(self, network_kwargs, loss_kwargs, optimizer_kwargs, augment_kwargs, loss_fn,
           torch_compile) -> None:
    """The network (its initial weights from the seed alone), its EMA copy, the loss,
    Adam, the augmentation, and the wrapper of several ranks."""
    with torch.random.fork_rng(devices=[]):  # the same start on any number of ranks
        torch.manual_seed(self.seed)
        self.net = construct(**network_kwargs, img_resolution=self.dataset.resolution,
                             img_channels=self.dataset.num_channels,
                             label_dim=self.dataset.label_dim)
    self.net.train().requires_grad_(True).to(self.device)
    if self.channels_last:  # the 4-D weights; the images follow in _next_rounds
        self.net.to(memory_format=torch.channels_last)
    self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
    loss_kwargs = loss_kwargs or {"class_name": "edm_lit.loss.EDMLoss"}
    self.loss_fn = loss_fn if loss_fn is not None else construct(**loss_kwargs)
    optimizer_kwargs = dict(optimizer_kwargs or {"class_name": "torch.optim.Adam",
                                                 "lr": 1e-3})
    self.base_lr = float(optimizer_kwargs["lr"])
    self.optimizer = construct(params=self.net.parameters(), **optimizer_kwargs)
    self.augment_pipe = construct(**augment_kwargs) if augment_kwargs else None
    self.ddp = _wrap_ranks(self.net, self.device, self.world_size)  # Chapter 7b.3
    if torch_compile:  # Chapter 7b.2
        self.net.compile()  # in place, after the EMA copy: the state_dict keeps names


_add_methods(TrainingRun, _build=_build)


# %% [markdown]
# **Check** (random images in memory, `RandomImageSet`, A7.4) — the EMA starts equal to the
# network, in eval mode, without gradients; Adam trains exactly the network's parameters at the
# set rate; `batch_gpu` half the batch gives two rounds; the seed alone sets the weights.

# %% tags=["hide-input"]
from edm_lit.course import RandomImageSet


def flat(tensors):  # one vector on the CPU
    return torch.cat([t.detach().cpu().flatten() for t in tensors])


common = dict(dataset=RandomImageSet(), network_kwargs=tiny, device=MODE.device,
              data_loader_kwargs=dict(num_workers=0), grid_images=16, grid_steps=6,
              batch_size=32, lr_rampup_kimg=0.064, ema_halflife_kimg=0.5)
run = training.TrainingRun(run_dir=None, batch_gpu=16, total_kimg=1, seed=0, **common)
assert torch.equal(flat(run.ema.parameters()), flat(run.net.parameters()))
assert not run.ema.training and not any(p.requires_grad for p in run.ema.parameters())
trained = [id(p) for group in run.optimizer.param_groups for p in group["params"]]
assert trained == [id(p) for p in run.net.parameters()] and run.base_lr == 1e-3
assert (run.batch_gpu, run.rounds, run.cur_nimg) == (16, 2, 0)
again = training.TrainingRun(run_dir=None, seed=0, **{**common, "batch_size": 64})
assert torch.equal(flat(again.net.parameters()), flat(run.net.parameters()))
print(f"{sum(p.numel() for p in run.net.parameters()):,} parameters; "
      f"{run.rounds} rounds of {run.batch_gpu} images per step")

# %% [markdown]
# ### 7.6.2 One step
#
# A step takes the next `batch_size` images (uint8, made floats on the device), accumulates the
# gradients, sets the rate of §7.3, applies the guard, steps Adam, updates the EMA; nothing in
# it waits for the GPU.

# %% tags=["export"]
def _next_rounds(self) -> list:
    """The step's rounds: (images in [-1, 1], labels) on the device."""
    rounds = []
    for _ in range(self.rounds):
        images, labels = next(self.batches)  # uint8, converted on the device
        images = images.to(self.device, non_blocking=True).to(torch.float32) / 127.5 - 1
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        rounds.append((images, labels.to(self.device, non_blocking=True)))
    return rounds


def _on_loss(self, loss: torch.Tensor, sigma: torch.Tensor) -> None:
    """Statistics of a round's loss; the progress of the first non-finite one."""
    self.stats.add_loss(loss, sigma)
    finite = torch.isfinite(loss).all()
    self.finite_rounds += finite
    first = (self.first_nonfinite < 0) & ~finite
    self.first_nonfinite = torch.where(first, self.cur_nimg, self.first_nonfinite)


def _step(self) -> None:
    """One optimiser step on `batch_size` images (all ranks, all rounds), then the EMA
    update. Chapter 7."""
    self.optimizer.zero_grad(set_to_none=True)
    accumulate_gradients(self.ddp, self.loss_fn, self._next_rounds(), self.loss_scaling,
                         self.per_rank_batch, self.augment_pipe, self.autocast_dtype,
                         on_loss=self._on_loss)
    for group in self.optimizer.param_groups:
        group["lr"] = learning_rate(self.base_lr, self.cur_nimg, self.lr_rampup_kimg)
    sanitize_gradients(self.net.parameters())
    self.optimizer.step()
    beta = ema_beta(self.batch_size, self.cur_nimg, self.ema_halflife_kimg,
                    self.ema_rampup_ratio)
    update_ema(self.ema, self.net, beta)
    self.cur_nimg += self.batch_size


_add_methods(TrainingRun, _next_rounds=_next_rounds, _on_loss=_on_loss, step=_step)


# %% [markdown]
# **Check** — a step changes the weights as §7.4 says. The first has rate 0: the weights stay,
# the EMA copies them ($\beta = 0$). In the second they move by $-\eta\,\hat m / (\sqrt{\hat
# v} + \epsilon)$, computed by hand from Adam's moments, and the EMA by the $\beta$ of §7.3.

# %% tags=["hide-input"]
params = list(run.net.parameters())
w0 = flat(params).double()
run.step()
assert torch.equal(flat(params).double(), w0)
assert torch.equal(flat(run.ema.parameters()).double(), w0)
b1, b2 = run.optimizer.defaults["betas"]
m1, v1 = (flat(run.optimizer.state[p][k] for p in params).double()
          for k in ("exp_avg", "exp_avg_sq"))
nimg, ema_before = run.cur_nimg, flat(run.ema.parameters()).double()
run.step()
g = flat(p.grad for p in params).double()  # the gradient Adam used (after the guard)
m, v = b1 * m1 + (1 - b1) * g, b2 * v1 + (1 - b2) * g * g
eta, eps = learning_rate(1e-3, nimg, 0.064), run.optimizer.defaults["eps"]
expected = w0 - eta * (m / (1 - b1**2)) / ((v / (1 - b2**2)).sqrt() + eps)
error = ((flat(params).double() - expected).norm() / (expected - w0).norm()).item()
beta = ema_beta(32, nimg, 0.5)
ema_error = (flat(run.ema.parameters()).double() - beta * ema_before
             - (1 - beta) * flat(params).double()).abs().max().item()
print(f"step 2: rate {eta:.1e}; |weights - Adam by hand| / |update| = {error:.1e}; "
      f"EMA beta {beta:.2e}, largest EMA error {ema_error:.1e}")
assert eta == 5e-4 and error < 5e-5 and ema_error < 1e-7 and run.cur_nimg == 64

# %% [markdown]
# ### 7.6.3 Maintenance
#
# After the first step and every `--tick` kimg: stop if diverged (7b.6), log and append a row
# of statistics to `stats.jsonl` (A3.6), every `--snap` ticks a snapshot of the EMA with a grid
# of samples, every `--dump` ticks and at the end a training state (7b.4): line, snapshot, state.

# %% tags=["export"]
def _maintenance(self, done: bool, timing: dict) -> dict:
    """The tick: divergence check, statistics, log line, snapshot, training state.
    Returns the statistics row. Chapter 7."""
    _check_finite(self)  # before anything is written: Chapter 7b.6
    row = _tick_row(self, timing)  # the statistics with timing, memory: Appendix A7.3
    if self.log is not None:
        self.log(_log_line(self, row))
    if self.run_dir is not None:
        line = _stats_line(row).encode()  # Appendix A3.6
        if self.stats_lines is None:
            append_durable(self.run_dir / "stats.jsonl", line)
        else:  # a process's first line: with the lines a resume keeps, atomically
            kept = "".join(k + "\n" for k in self.stats_lines).encode()
            write_atomic(self.run_dir / "stats.jsonl", kept + line)
            self.stats_lines = None
        if self.snapshot_ticks and (done or self.cur_tick % self.snapshot_ticks == 0):
            _write_snapshot(self, self.cur_nimg // 1000)  # Chapter 7b.4
    every = self.state_dump_ticks
    if every and (done or self.cur_tick % every == 0) and self.cur_tick != 0:
        _dump_state(self, self.cur_nimg // 1000)  # Chapter 7b.4
    return row


_add_methods(TrainingRun, maintenance=_maintenance)


# %% [markdown]
# **Check** — tick 0, after the first step, writes a line and a snapshot, no state; the last,
# after the second step, a line, a snapshot equal to the EMA (named by the progress in kimg,
# still 0: it replaces the first) with its grid, and a state holding this network and progress.

# %% tags=["hide-input"]
from edm_lit.checkpoints import load_network
from edm_lit.training import read_training_state

parts = scratch / "parts"
run = training.TrainingRun(run_dir=parts, total_kimg=1, seed=0, **common)
clock = {"start": time.time(), "tick_start": time.time(), "maintenance": 0.0}
for tick, done in [(0, False), (1, True)]:
    run.cur_tick, run.tick_start_nimg = tick, run.cur_nimg
    run.step()
    run.maintenance(done, clock)
    if tick == 0:
        names = [p.name for p in parts.glob("*.json")]
        assert names == ["network-snapshot-000000.json"]
lines = (parts / "stats.jsonl").read_text().splitlines()
assert len(lines) == 2 and json.loads(lines[1])["Progress/kimg"]["mean"] == 0.064
snap = load_network(parts / "network-snapshot-000000.json")
assert torch.equal(flat(snap.parameters()), flat(run.ema.parameters()))
header, tensors = read_training_state(parts / "training-state-000000.json")
assert (header["cur_nimg"], header["cur_tick"]) == (64, 2)
assert torch.equal(flat(tensors[f"net.{k}"] for k in run.net.state_dict()),
                   flat(run.net.state_dict().values()))
print(sorted(p.name for p in parts.iterdir() if not p.name.endswith(".safetensors")))

# %% [markdown]
# ### 7.6.4 The run
#
# `run()` repeats step and maintenance to the end, with a progress bar, after removing what a
# killed run left (A3.2). `training_loop(**options)` is the official name for it.

# %% tags=["export"]
def _run(self) -> torch.nn.Module:
    """Train until total_kimg: steps, and at each tick the maintenance. Returns the EMA
    network. Chapter 7."""
    from tqdm import tqdm

    if self.run_dir is not None and self.run_dir.is_dir():
        remove_stale_temp_files(self.run_dir)  # left by a run killed while writing
    start = time.time()
    timing = {"start": start, "tick_start": start, "maintenance": 0.0}
    last_nimg = -(-self.total_nimg // self.batch_size) * self.batch_size  # at the end
    bar = tqdm(total=last_nimg, initial=self.cur_nimg, unit="kimg", unit_scale=1e-3,
               disable=not self.progress_bar,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg "
                          "[{elapsed} elapsed, ETA {remaining}{postfix}]")
    done = self.cur_nimg >= self.total_nimg
    with contextlib.closing(bar):
        while not done:
            self.step()
            bar.update(self.batch_size)
            done = self.cur_nimg >= self.total_nimg
            kimg_later = self.tick_start_nimg + self.kimg_per_tick * 1000
            if not (done or self.cur_tick == 0 or self.cur_nimg >= kimg_later):
                continue
            tick_end = time.time()
            row = self.maintenance(done, timing)
            bar.set_postfix_str(f"{row['Timing/sec_per_kimg']['mean']:.2f} sec/kimg")
            self.cur_tick += 1
            self.tick_start_nimg = self.cur_nimg
            timing["tick_start"] = time.time()
            timing["maintenance"] = timing["tick_start"] - tick_end
    return self.ema


_add_methods(TrainingRun, run=_run)


def training_loop(**options) -> torch.nn.Module:
    """Run `TrainingRun(**options)` (the keyword arguments of training_options.json);
    returns the EMA network. Chapter 7."""
    return TrainingRun(**options).run()


# %% [markdown]
# **Check** — a run of 2 kimg in ticks of 1 kimg: a line per tick in one file, only appended
# to (the same inode), snapshots with their grids, the final state.

# %% tags=["hide-input"]
first_run, inodes = scratch / "first-run", []


def log(line):
    print(line)
    if (first_run / "stats.jsonl").exists():
        inodes.append((first_run / "stats.jsonl").stat().st_ino)


ema = training.TrainingRun(run_dir=first_run, total_kimg=2, kimg_per_tick=1,
                           snapshot_ticks=1, state_dump_ticks=2, log=log,
                           **{**common, "lr_rampup_kimg": 0}).run()
assert len(inodes) == 2 and {(first_run / "stats.jsonl").stat().st_ino} == set(inodes)
lines = (first_run / "stats.jsonl").read_text().splitlines()
assert len(lines) == 3 and json.loads(lines[-1])["Progress/kimg"]["mean"] == 2.016
snap = load_network(first_run / "network-snapshot-000002.json")
assert torch.equal(flat(snap.parameters()), flat(ema.parameters()))
header, _ = read_training_state(first_run / "training-state-000002.json")
assert header["cur_nimg"] == 2016
assert len(list(first_run.glob("samples-*.png"))) == 3

# %% [markdown]
# ## 7.7 A real run: the digits on a CPU
#
# > Note that [the ideal denoiser] is feasible to compute in practice for small datasets […] — App. B.3
#
# For a finite training set $\{\mathbf y_j\}$ that ideal denoiser is known exactly (Chapter 1),
#
# $$D^\star(\mathbf x; \sigma) = \sum_j w_j(\mathbf x)\, \mathbf y_j, \qquad
# w_j(\mathbf x) \propto \exp\!\Big(-\frac{\|\mathbf x - \mathbf y_j\|^2}{2\sigma^2}\Big),$$
#
# so the loss of §7.5 has an exact **floor** in every σ bucket. We train the tiny DDPM++ on the
# 1,797 UCI digits (8×8; Chapter 6) for 30 kimg with `train_quick` (A7.4: the command's code
# path, one thread, bitwise reproducible per torch build and CPU) and compare its loss per σ
# with the floor. Chapters 8 and 9 evaluate this model (`book/results/quick_digits.json`).
# **Check** — this run is the committed model within `compare_models`' tolerance (A7.4, room
# for another CPU's rounding); the same run's network *before* the EMA lies far outside.

# %% tags=["hide-input"]
from edm_lit.course import REPRODUCTION_TOLERANCE, compare_models, train_quick

quick_dir, start = scratch / "quick", time.perf_counter()
ema_net = train_quick(quick_dir, seed=0, log=print)
rows = [json.loads(r) for r in (quick_dir / "stats.jsonl").read_text().splitlines()]
print(f"trained {rows[-1]['Progress/kimg']['mean']:.0f} kimg "
      f"in {time.perf_counter() - start:.0f} s")
committed = load_network(Path("results") / "quick_digits.json")
meta = json.loads((Path("results") / "quick_digits.meta.json").read_text())
raw_net = copy.deepcopy(ema_net)  # the trained weights before averaging
_, state = read_training_state(quick_dir / "training-state-000030.json")
raw_net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
for name, net in [("this run", ema_net), ("its raw network", raw_net)]:
    diff = compare_models(net, committed)
    worst = max(diff["outputs"].values())
    print(f"{name} vs the committed model: outputs {worst:.1e}, "
          f"weights {diff['weights']:.1e} (relative L2)")
    inside = worst <= REPRODUCTION_TOLERANCE["outputs"]
    near = diff["weights"] <= REPRODUCTION_TOLERANCE["weights"]
    assert inside == near == (net is ema_net)
loss_diff = abs(rows[-1]["Loss/loss"]["mean"] - meta["final_loss"]) / meta["final_loss"]
assert loss_diff <= REPRODUCTION_TOLERANCE["final_loss"]

# %% [markdown]
# **Loss per σ against the floor.** At small σ the floor of a finite set is 0 (the noisy image
# tells its training image: memorisation), which no *generalising* network reaches; at large σ
# it nears the loss of predicting the mean. `loss_per_bucket` (A7.4) measures on fixed draws
# (Eq. 8's weighted loss per pixel) the EMA and raw networks, the floor, and the best *linear*
# denoiser (a Gaussian fit: what knowing only the data's mean and covariance reaches).

# %% tags=["hide-input"]
from myst_nb import glue

from edm_lit.course import loss_per_bucket
from edm_lit.data import ImageFolderDataset
from edm_lit.framework import GaussianMixture

digits = ImageFolderDataset(training.digits_path())
data = torch.from_numpy(np.stack([digits[i][0] for i in range(len(digits))]))
data = data.double() / 127.5 - 1
mean, cov = data.flatten(1).mean(0), torch.cov(data.flatten(1).T)
eigvals, eigvecs = torch.linalg.eigh(cov)
eigvals = eigvals.clamp_min(0)


def linear_denoiser(x, sigma):  # E[y | x] for y ~ N(mean, cov): the best linear one
    z = (x.flatten(1) - mean) @ eigvecs
    shrunk = z * eigvals / (eigvals + sigma.flatten(1) ** 2)
    return (mean + shrunk @ eigvecs.T).view_as(x)


def as_denoiser(net):
    return lambda x, s: net(x.float(), s.float().flatten())


net_loss, raw_loss = (loss_per_bucket(as_denoiser(n), data) for n in (ema_net, raw_net))
floor_loss = loss_per_bucket(GaussianMixture.from_data(data).denoise, data)
linear_loss = loss_per_bucket(linear_denoiser, data)
has_floor = floor_loss > 0.01  # below, the floor is ~0: a ratio to it means nothing
ratio = net_loss / np.where(has_floor, floor_loss, np.nan)
vs_linear, ema_vs_raw = net_loss / linear_loss, net_loss / raw_loss
print("bucket        EMA net   raw net  floor     best linear  EMA/floor  EMA/linear")
for i, (lo, hi) in enumerate(zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:])):
    print(f"[{lo:g}, {hi:g})".ljust(12), f"{net_loss[i]:8.4f} {raw_loss[i]:8.4f}  "
          f"{floor_loss[i]:8.2e}  {linear_loss[i]:8.4f}  {ratio[i]:9.3f}  "
          f"{vs_linear[i]:9.3f}")
glued = dict(ratio_03=ratio[3], ratio_1=ratio[4], ratio_3=ratio[5], ratio_10=ratio[6],
             lin_03=vs_linear[3], lin_1=vs_linear[4], lin_3=vs_linear[5],
             lin_10=vs_linear[6], small_net_min=net_loss[:3].min(),
             small_floor_max=floor_loss[:3].max(), ema_raw_min=ema_vs_raw.min(),
             ema_raw_max=ema_vs_raw.max())
for name, value in glued.items():
    glue(name, float(value), display=False)

# %% [markdown]
# **Look.** The snapshots' sample grids at the start, halfway and the end (EMA samples from the
# same noise, 18 Heun steps) and, after training, the loss per σ of the networks, the best
# linear denoiser and the floor: Fig. 5a for the digits.

# %% tags=["hide-input"]
from PIL import Image

grids = sorted(quick_dir.glob("samples-*.png"), key=lambda p: int(p.stem.split("-")[1]))
fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
for ax, path in zip(axes, [grids[0], grids[len(grids) // 2], grids[-1]]):
    ax.imshow(np.array(Image.open(path)), cmap="gray", vmin=0, vmax=255)
    kimg = int(path.stem.split("-")[1])
    ax.set(title=f"EMA samples at {kimg} kimg", xticks=[], yticks=[])
mid = [math.sqrt(lo * hi) for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:])]
for curve, style, label in [(net_loss, "o-", "EMA network"),
                            (raw_loss, "x-", "raw network"),
                            (linear_loss, "s--", "best linear (Gaussian fit)"),
                            (floor_loss, "k:.", "floor (ideal denoiser)")]:
    axes[3].plot(mid, curve, style, label=label)
axes[3].set(xscale="log", ylim=(0, None), xlabel="σ (bucket's geometric middle)",
            ylabel="λ(σ) · loss per pixel", title="after training (cf. Fig. 5a)")
axes[3].legend(fontsize=7)
plt.tight_layout()
assert rows[-1]["Loss/loss"]["mean"] < 0.5 * rows[0]["Loss/loss"]["mean"]  # it learns

# %% [markdown]
# **Check** — where the model stands after 30 kimg:
#
# - σ ≥ 3: near the floor (network / floor {glue:text}`ratio_3:.3f`, {glue:text}`ratio_10:.3f`)
#   but a few per cent *worse* than the best linear denoiser ({glue:text}`lin_3:.3f`,
#   {glue:text}`lin_10:.3f`): the answer is near the data mean, which a Gaussian fit knows;
# - σ in [1, 3): {glue:text}`ratio_1:.2f` times the floor, a little better than linear
#   ({glue:text}`lin_1:.3f` of its loss): room for longer training;
# - σ in [0.3, 1): clearly better than linear ({glue:text}`lin_03:.2f`) — it knows what digits
#   look like — but {glue:text}`ratio_03:.1f` times the floor, low because the ideal denoiser
#   of 1,797 images can still tell which one was noised;
# - σ < 0.3: floor at most {glue:text}`small_floor_max:.1e` (memorisation), the network's loss
#   at least {glue:text}`small_net_min:.2f`: it has not learned the digits by heart.
#
# **What the EMA does.** Adam at a constant rate leaves the weights jittering around a good
# solution; their average sits closer to its centre. On the same draws (training images, fresh
# σ and noise) the EMA's loss is below the raw network's in every bucket:
# {glue:text}`ema_raw_min:.3f` to {glue:text}`ema_raw_max:.3f` of it.

# %% tags=["hide-input"]
assert np.all(ratio[5:] < 1.1) and 1.0 < ratio[4] < 1.3 and ratio[3] > 3
assert np.all((1.0 < vs_linear[5:]) & (vs_linear[5:] < 1.08))  # worse than linear
assert vs_linear[3] < 0.85 and vs_linear[4] < 1.0
assert not has_floor[:3].any() and has_floor[3:].all() and net_loss[:3].min() > 0.2
assert np.all(ema_vs_raw < 1.0) and 0.95 < ema_vs_raw.mean() < 0.99

# %% [markdown]
# ## Summary
#
# `edm_lit.training`: `ARCH_PRESETS`, `PRECOND_CLASSES`, `TRAIN_DEFAULTS`; `ShardedStream`,
# `make_loader`; `learning_rate`, `ema_beta`, `update_ema`; `accumulate_gradients`,
# `sanitize_gradients`; `SIGMA_BUCKETS`, `Stats`, `stat_names`; `TrainingRun` (construction,
# `step`, `maintenance`, `run`), `training_loop`; completed by 7b, A1.2, A3.5–A3.7 and A7.
#
# ## Exercises
#
# 1. Train the quick model with `ema=0`; compare its loss per σ with the EMA's. What goes wrong
#    with a half-life of 20 kimg in a 30 kimg run?
# 2. Why does the loop compute the rate and β from the images seen *before* the step?
#
# :::{dropdown} Answers
# 1. Without the EMA the model is the last, jittering weights (the raw network above). A 20 kimg
#    half-life is capped at 5 % of the progress (1.5 kimg at 30 kimg); without the cap
#    (`ema_rampup_ratio=None`) the average would remember the untrained start.
# 2. Both depend on the progress n at the start of the step; at n = 0 the rate is 0 (Adam only
#    initialises its moments) and β = 0 (the EMA starts as a copy of the network).
# :::
