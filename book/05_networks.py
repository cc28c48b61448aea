# ---
# jupyter:
#   edm_lit:
#     export: networks
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
# # 5. The networks
#
# Chapters 2–4 treated the inner network $F_\theta$ of Eq. 7 as a black box. To show that its
# sampler, preconditioning and training help on their own, the paper reuses the networks of
# the works it compares against (App. F.4): **DDPM++** and **NCSN++** (Song et al. 2021), the
# VP and VE networks, one class here (`SongUNet`) switched by four arguments, and **ADM**
# (Dhariwal & Nichol 2021), the ImageNet network (`DhariwalUNet`). We build both from a few
# layers with **the official constructor arguments and `state_dict()` keys**, so official
# weights load unchanged (Appendix A2 loads `.pkl` snapshots without running their code).
# Chapter 5b trains one against a loss floor we know exactly, Chapter 6 on real images.

# %% tags=["export"]
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.functional import silu

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from myst_nb import glue

from edm_lit.mode import get_mode

MODE = get_mode()
torch.set_num_threads(1 if MODE.quick else torch.get_num_threads())  # tiny tensors
torch.manual_seed(0)
DATA = Path("data")  # outputs of the official code for small networks (data/README.md)
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})


def rel_err(ours, ref):  # a difference as a fraction of the output's scale
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# %% [markdown]
# ## 5.1 Layers
#
# > "We follow previous work and initialize the output layer weights to zero." (App. B.6)
#
# Four layers build everything: fully connected, convolution (that can resample), group
# normalisation and attention, with the official parameter names, which *are* the keys of the
# `state_dict()`. Each computes in the dtype of its input (the official `use_fp16` mechanism).
#
# **Initialisation.** Every weight is drawn with variance $1/\text{fan}$, uniform or normal:
# *Kaiming* uses $\text{fan}_\text{in}$, *Xavier* the mean of $\text{fan}_\text{in}$ and
# $\text{fan}_\text{out}$; a layer then multiplies by `init_weight` (the bias by `init_bias`).
# Output layers get `init_weight=0` (ADM) or `1e-5` (DDPM++/NCSN++), so a fresh network starts
# at or next to $F_\theta = 0$; Chapter 5b measures what that does to the loss.

# %% tags=["export"]
INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random weights of variance 1/fan (Kaiming: fan_in; Xavier: mean). Chapter 5."""
    if mode not in INIT_MODES:
        raise ValueError(f"init mode must be one of {INIT_MODES}, got {mode!r}")
    fan = fan_in if mode.startswith("kaiming") else (fan_in + fan_out) / 2
    if mode.endswith("uniform"):
        return math.sqrt(3 / fan) * (torch.rand(*shape) * 2 - 1)
    return math.sqrt(1 / fan) * torch.randn(*shape)


class Linear(torch.nn.Module):
    """Fully connected layer, y = x W^T + b, computed in x's dtype. Chapter 5."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal",
                 init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        w = weight_init([out_features, in_features], **fans) * init_weight
        self.weight = torch.nn.Parameter(w)
        b = weight_init([out_features], **fans) * init_bias if bias else None
        self.bias = torch.nn.Parameter(b) if bias else None

    def forward(self, x):
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


# %% tags=["hide-input"]
for mode in INIT_MODES:  # each scheme has the variance it promises (200,000 draws)
    fan_in, fan_out = 300, 100
    w = weight_init([400, 500], mode, fan_in, fan_out)
    fan = fan_in if mode.startswith("kaiming") else (fan_in + fan_out) / 2
    print(f"{mode:16s} var = {w.var().item():.5f}   1/fan = {1 / fan:.5f}")
    assert abs(w.var().item() * fan - 1) < 0.02

# %% [markdown]
# **Convolution with resampling.**
#
# > "DDPM++ employs box filter $[1, 1]$ for the upsampling and downsampling layers whereas
# > NCSN++ employs bilinear filter $[1, 3, 3, 1]$." (App. F.4)
#
# Down-sampling by 2 low-passes and keeps every other pixel; up-sampling puts zeros between
# the pixels and low-passes (a transposed convolution, the filter times 4 to keep the mean).
# The 2-D filter, the outer product of the taps normalised to sum 1, is the buffer
# `resample_filter` that official checkpoints carry. For the box we take a cheaper route to
# the same numbers: 2×2 averaging, or repeating each pixel. A `Conv2d` may resample,
# convolve (`kernel > 0`), or both; `fused_resample=True` convolves at full resolution before
# decimating (NCSN++'s image path, §5.5), or after up-sampling the whole image.
#
# **Attention** lets every pixel look at every other pixel of its feature map. A 1×1
# convolution `qkv` makes, per head, a query, a key and a value of $c$ channels at each of the
# $L = HW$ positions (interleaved as in the official layout), and position $i$ receives
#
# $$\mathbf{a}_i = \sum_j \operatorname{softmax}_j\!\left(\frac{\mathbf{q}_i^\top \mathbf{k}_j}{\sqrt{c}}\right) \mathbf{v}_j ,$$
#
# which PyTorch's `scaled_dot_product_attention` computes (on a GPU in fused kernels).

# %% tags=["export"]
class Conv2d(torch.nn.Module):
    """2-D convolution, optionally with 2x up/down-sampling (FIR filter). Chapter 5."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False,
                 down=False, resample_filter=(1, 1), fused_resample=False,
                 init_mode="kaiming_normal", init_weight=1, init_bias=0):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive, got both True")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        k2 = kernel * kernel
        fans = dict(mode=init_mode, fan_in=in_channels * k2, fan_out=out_channels * k2)
        shape = [out_channels, in_channels, kernel, kernel]
        w = weight_init(shape, **fans) * init_weight if kernel else None
        self.weight = torch.nn.Parameter(w) if kernel else None
        b = weight_init([out_channels], **fans) * init_bias if kernel and bias else None
        self.bias = torch.nn.Parameter(b) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f2d = (torch.outer(f, f) / f.sum().square())[None, None]  # [1, 1, K, K], sum 1
        self.register_buffer("resample_filter", f2d if up or down else None)
        taps = [float(t) for t in resample_filter]  # (the buffer may be on 'meta')
        self._box = bool(up or down) and len(taps) == 2 and taps[0] == taps[1]

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        f = self.resample_filter  # a loaded filter decides again whether it is the box
        self._box = f is not None and f.shape[-1] == 2 and bool((f == 0.25).all())

    def _resample(self, x, pad):
        """2x up (zeros between pixels, filter x 4) or down (filter, stride 2)."""
        if self._box and pad == 0:  # nearest-neighbour repetition or 2x2 averaging
            if self.up:
                return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            return F.avg_pool2d(x, 2)
        channels = x.shape[1]
        f = self.resample_filter.to(x.dtype).expand(channels, 1, -1, -1)
        if self.up:
            return F.conv_transpose2d(x, 4 * f, stride=2, padding=pad, groups=channels)
        return F.conv2d(x, f, stride=2, padding=pad, groups=channels)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.resample_filter is None:  # a plain 'same' convolution
            return x if w is None else F.conv2d(x, w, b, padding=w.shape[-1] // 2)
        k_f = self.resample_filter.shape[-1]
        if w is None:  # a pure resampler
            return self._resample(x, (k_f - 1) // 2)
        k_w = w.shape[-1]
        if not self.fused_resample:  # resample ('same' size), then a 'same' convolution
            return F.conv2d(self._resample(x, (k_f - 1) // 2), w, b, padding=k_w // 2)
        if self.down:  # convolve where both filters reach, then filter and decimate
            y = self._resample(F.conv2d(x, w, padding=k_w // 2 + (k_f - 1) // 2), 0)
        else:  # the whole up-sampled image, trimmed or padded to 2H + k_w - 1, 'valid'
            full = self._resample(x, 0)
            y = F.conv2d(F.pad(full, [k_w // 2 - (k_f - 1) // 2] * 4), w)
        return y if b is None else y + b[:, None, None]


class GroupNorm(torch.nn.Module):
    """Group normalisation, min(32, C // 4) groups of at least 4 channels. Chapter 5."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1:
            raise ValueError("GroupNorm needs num_channels >= "
                             f"{min_channels_per_group}, got {num_channels}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return F.group_norm(x, self.num_groups, w, b, self.eps)


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over pixels from a [N, 3C, H, W] qkv map. Chapter 5."""
    N, C3, H, W = qkv.shape
    C = C3 // 3
    per_head = qkv.reshape(N * num_heads, C // num_heads, 3, H * W)  # official layout
    q, k, v = (t.transpose(1, 2) for t in per_head.unbind(2))  # each [N*heads, L, c]
    a = F.scaled_dot_product_attention(q, k, v)
    return a.transpose(1, 2).reshape(N, C, H, W)


# %% tags=["hide-input"]
# the box shortcut = 2x2 averaging = the grouped convolution ([1, 3, 3, 1] takes that
# path); fused or not, 8x8 becomes exactly 16x16 or 4x4
x = torch.randn(2, 4, 8, 8)
for up in [False, True]:
    box = Conv2d(4, 4, kernel=0, up=up, down=not up)
    fast = box(x)
    box._box = False  # force the grouped-convolution path
    gap = (fast - box(x)).abs().max().item()
    print(f"{'up' if up else 'down'}: shortcut vs grouped convolution: {gap:.1e}")
    assert gap < 1e-6
mean_2x2 = x.reshape(2, 4, 4, 2, 4, 2).mean((3, 5))
assert torch.allclose(Conv2d(4, 4, 0, down=True)(x), mean_2x2)
for taps in ([1, 1], [1, 3, 3, 1]):
    for kw in (dict(resample_filter=taps, fused_resample=f) for f in (False, True)):
        assert Conv2d(4, 6, 3, up=True, **kw)(x).shape == (2, 6, 16, 16)
        assert Conv2d(4, 6, 3, down=True, **kw)(x).shape == (2, 6, 4, 4)
qkv = torch.randn(2, 3 * 8, 4, 4)  # attention against the formula, einsum and softmax
q, k, v = qkv.reshape(2 * 2, 4, 3, 16).unbind(2)
w = torch.einsum("ncq,nck->nqk", q, k / 2.0).softmax(dim=2)  # c = 4 a head: sqrt(c) = 2
by_hand = torch.einsum("nqk,nck->ncq", w, v).reshape(2, 8, 4, 4)
gap = (attention(qkv, num_heads=2) - by_hand).abs().max().item()
print(f"fused attention vs formula: {gap:.1e}")
assert gap < 1e-6

# %% [markdown]
# ## 5.2 Telling the network the noise level
#
# > "DDPM++ inherits its positional encoding scheme for the noise level directly from DDPM
# > whereas NCSN++ replaces it with random Fourier features" (App. F.4)
#
# The network gets the noise level as one scalar per image, $c_\text{noise}(\sigma)$ (Eq. 7;
# EDM's is $\tfrac14 \ln\sigma$), first spread over channels of cosines and sines,
#
# $$\operatorname{emb}(c) = \big[\cos(\omega_0 c), \dots, \cos(\omega_{n-1} c),\ \sin(\omega_0 c), \dots, \sin(\omega_{n-1} c)\big],$$
#
# with **positional** frequencies $\omega_i = (1/10000)^{i/(n-1)}$, $n$ = half the channels
# (DDPM++; ADM divides by $n$) or **Fourier** ones $2\pi f_i$, $f_i \sim \mathcal{N}(0, 16^2)$
# drawn once (the buffer `freqs`, NCSN++). Class and augmentation labels enter through linear
# layers and are added; `map_layer0` and `map_layer1` then make the `emb` every block gets.

# %% tags=["export"]
def _cos_sin(c: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """[cos(omega_i c_n), sin(omega_i c_n)] for scalars c [N], frequencies omega [n]."""
    angles = c[:, None] * omega.to(c.dtype)[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class PositionalEmbedding(torch.nn.Module):
    """[cos(w_i c), sin(w_i c)], w_i = (1 / max_positions)^(i / n'). Chapter 5."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions
        self.endpoint = endpoint

    def forward(self, x):
        n = self.num_channels // 2
        steps = n - 1 if self.endpoint else n  # endpoint: the last w is 1/max_positions
        i = torch.arange(n, dtype=torch.float32, device=x.device)
        return _cos_sin(x, (1 / self.max_positions) ** (i / steps))


class FourierEmbedding(torch.nn.Module):
    """[cos(2 pi f_i c), sin(2 pi f_i c)], f_i ~ N(0, scale^2) in `freqs`. Chapter 5."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", scale * torch.randn(num_channels // 2))

    def forward(self, x):
        return _cos_sin(x, 2 * math.pi * self.freqs)


# %% [markdown]
# **Look** — the positional embedding (64 channels). Its frequencies, 1 down to $10^{-4}$,
# were made for DDPM's time steps $0 \dots 999$ (VP's $c_\text{noise} = 999\,t$); EDM's
# $c_\text{noise}$ spans only [{glue:text}`c_noise_lo`, {glue:text}`c_noise_hi`] for σ from
# 0.002 to 80, so only {glue:text}`varying_edm` of the 32 cosine channels change by more than
# 0.1 (VP: {glue:text}`varying_vp`): `map_layer0/1` work from a few informative features.

# %% tags=["hide-input"]
sigmas = torch.logspace(math.log10(0.002), math.log10(80), 200)
embed = PositionalEmbedding(64, endpoint=True)
inputs = {"EDM: c_noise = ln(σ)/4, σ in [0.002, 80]": sigmas.log() / 4,
          "VP: c_noise = 999 t, t in [0, 1]": torch.linspace(0, 999, 200)}
fig, axes = plt.subplots(1, 2, figsize=(12, 3))
varying = []  # cos channels (of 32) that change by more than 0.1 over the range
for ax, (name, c_noise) in zip(axes, inputs.items()):
    emb = embed(c_noise)
    im = ax.imshow(emb.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1,
                   extent=[0, 199, 63.5, -0.5])
    ax.set(xlabel="input (increasing c_noise)", ylabel="channel: cos | sin", title=name)
    ax.grid(False)
    varying.append(int(((emb.max(0).values - emb.min(0).values)[:32] > 0.1).sum()))
_ = fig.colorbar(im, ax=axes)
c_lo, c_hi = (sigmas.log() / 4)[[0, -1]].tolist()
print(f"EDM's c_noise in [{c_lo:.2f}, {c_hi:.2f}]; cos channels that vary: "
      f"EDM {varying[0]}, VP {varying[1]}")
assert varying[0] <= 6 and varying[1] >= 24
emb = embed(sigmas.log() / 4)  # bounded, and neighbouring noise levels stay apart
assert emb.abs().max() <= 1 and (emb[1:] - emb[:-1]).norm(dim=1).min() > 1e-3
for name, value in [("c_noise_lo", f"{c_lo:.2f}"), ("c_noise_hi", f"{c_hi:.2f}"),
                    ("varying_edm", varying[0]), ("varying_vp", varying[1])]:
    glue(name, value, display=False)

# %% [markdown]
# ## 5.3 The U-Net block
#
# > "the use of a slightly shallower model (3 residual blocks per resolution instead of 4)"
# > (App. F.4, on ADM against DDPM++)
#
# All three architectures stack one residual block, `UNetBlock`. With SiLU $\phi$, the
# embedding $\mathbf{e}$ and `skip_scale` $s$:
#
# $$\mathbf{h} = \text{conv}_1\Big(\text{dropout}\big(\phi\big(\text{norm}_1\big(\text{conv}_0(\phi(\text{norm}_0\,\mathbf{x})) + \text{affine}(\mathbf{e})\big)\big)\big)\Big), \qquad \mathbf{y} = s\,\big(\text{skip}(\mathbf{x}) + \mathbf{h}\big).$$
#
# `conv0` may up- or down-sample; ADM adds the embedding as a scale and shift after `norm1`,
# $\text{norm}_1(h)(1 + a) + b$ (`adaptive_scale`); `skip` is a 1×1 convolution or a
# resampler when the shape changes; $s = 1/\sqrt2$ keeps the variance of the sum at one
# (DDPM++/NCSN++; ADM: 1). Optional attention (`norm2`, `qkv`, `proj`) is added and scaled
# too. As `conv1` and `proj` start at or near zero, a fresh block is close to its skip
# connection: a deep network starts near a simple function and learns the residuals.

# %% tags=["export"]
def _init_scheme(mode, weight=1.0, bias=0.0) -> dict:
    """Layer arguments of an initialisation: scheme, factors on weights and biases."""
    return dict(init_mode=mode, init_weight=weight, init_bias=bias)


class UNetBlock(torch.nn.Module):
    """Residual block: embedding input, optional resampling and attention. Chapter 5."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False,
                 attention=False, num_heads=None, channels_per_head=64, dropout=0,
                 skip_scale=1, eps=1e-5, resample_filter=(1, 1), resample_proj=False,
                 adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        init_attn = init if init_attn is None else dict(init_attn)
        heads = out_channels // channels_per_head if num_heads is None else num_heads
        self.in_channels, self.out_channels = in_channels, out_channels
        self.emb_channels = emb_channels
        self.num_heads = heads if attention else 0
        self.dropout, self.skip_scale = dropout, skip_scale
        self.adaptive_scale = adaptive_scale
        sampling = dict(up=up, down=down, resample_filter=resample_filter)
        # the residual branch h, in the order the data flows
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **sampling, **init)
        affine_out = (2 if adaptive_scale else 1) * out_channels
        self.affine = Linear(emb_channels, affine_out, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        # the skip: the identity unless the block changes the shape
        self.skip = None
        if up or down or in_channels != out_channels:
            kernel = 1 if resample_proj or in_channels != out_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, **sampling, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def _condition(self, h, emb):
        """The embedding: added to the features, or a scale and shift after norm1."""
        e = self.affine(emb).to(h.dtype)[..., None, None]
        if not self.adaptive_scale:
            return silu(self.norm1(h + e))
        scale, shift = e.chunk(2, dim=1)
        return silu(torch.addcmul(shift, self.norm1(h), 1 + scale))

    def forward(self, x, emb):
        shortcut = x if self.skip is None else self.skip(x)
        h = self._condition(self.conv0(silu(self.norm0(x))), emb)
        if self.dropout:
            h = F.dropout(h, p=self.dropout, training=self.training)
        out = (self.conv1(h) + shortcut) * self.skip_scale
        if self.num_heads:
            mixed = attention(self.qkv(self.norm2(out)), self.num_heads)
            out = (out + self.proj(mixed)) * self.skip_scale
        return out


# %% tags=["hide-input"]
adm = dict(init=_init_scheme("kaiming_uniform", math.sqrt(1 / 3), math.sqrt(1 / 3)),
           init_zero=_init_scheme("kaiming_uniform", 0, 0))
block = UNetBlock(32, 64, 16, down=True, attention=True, channels_per_head=32, **adm)
x = torch.randn(3, 32, 16, 16)
out = block(x, torch.randn(3, 16))
assert out.shape == (3, 64, 8, 8) and block.num_heads == 2
assert torch.allclose(out, block.skip(x), atol=1e-6)
print("a fresh ADM block (conv1, proj at zero) is its skip; output", tuple(out.shape))

# %% [markdown]
# ## 5.4 The plan of a U-Net: the level table
#
# > "We abbreviate these counts in Table 7 as multiples of 128, listed from the highest
# > resolution to the lowest." (App. F.3)
#
# The **encoder** halves the resolution level by level, the **decoder** doubles it back, and
# every encoder output is handed over to a decoder block at its resolution. One row per
# **level** $\ell$ (an entry of `channel_mult`): resolution $R / 2^\ell$,
# `model_channels * channel_mult[ℓ]` channels, `num_blocks` blocks (one more in the decoder),
# attention if the resolution is in `attn_resolutions`. The encoder builder walks it top down
# (`conv` or `down`, then `block0, block1, …`, each output handed over), the decoder builder
# bottom up (`in0`, `in1` or `up`, then blocks that each take the last tensor handed over).
# The official **naming rule** keys each module `{r}x{r}_{role}` in `enc` or `dec`, the
# prefixes of the `state_dict()` (`enc.16x16_block0.conv0.weight`): the table and the rule
# *are* the list of weights a checkpoint carries. A network shows its table as `net.levels`.

# %% tags=["export"]
class _Level(NamedTuple):
    """One row of a U-Net's level table. Chapter 5."""

    index: int  # 0 = full resolution
    resolution: int  # img_resolution / 2^index
    channels: int  # model_channels * channel_mult[index]
    num_blocks: int  # encoder blocks; the decoder has one more
    attention: bool  # resolution in attn_resolutions


def _unet_levels(img_resolution, model_channels, channel_mult, num_blocks,
                 attn_resolutions) -> list:
    """The level table of a U-Net from its constructor arguments. Chapter 5."""
    depth = len(channel_mult)
    if depth < 1:
        raise ValueError("channel_mult must name at least one level, got an empty list")
    if img_resolution % 2 ** (depth - 1):
        raise ValueError("img_resolution must be divisible by 2^(len(channel_mult) - 1)"
                         f" = {2 ** (depth - 1)}, got {img_resolution}")
    rows = []
    for index, mult in enumerate(channel_mult):
        r = img_resolution // 2**index
        channels, attention = model_channels * mult, r in attn_resolutions
        rows.append(_Level(index, r, channels, num_blocks, attention))
    return rows


def _level_key(level, role: str) -> str:
    """The official naming rule: a module's key in `enc` / `dec`. Chapter 5."""
    return f"{level.resolution}x{level.resolution}_{role}"


def _decoder_roles(level, levels) -> tuple:
    """A decoder level's entry (in0, in1 at the bottom; up elsewhere), its blocks."""
    entry = ["in0", "in1"] if level.index == len(levels) - 1 else ["up"]
    return entry, [f"block{i}" for i in range(level.num_blocks + 1)]


# %% tags=["export"]
class _LevelUNet(torch.nn.Module):
    """What SongUNet and DhariwalUNet share: `enc`, `dec` built from the level table."""

    @property
    def levels(self) -> list:
        """The level table the network was built from, one row per resolution."""
        return [_Level(*row) for row in self._level_rows]

    def _build(self, levels, in_channels, stem_channels, make_block, make_stem,
               decoder_attention, encoder_extra=None, decoder_extra=None):
        """Fill `enc`, `dec` walking the table; return the decoder's output channels."""
        self._level_rows = [tuple(lv) for lv in levels]  # plain tuples pickle anywhere
        self.enc, self.dec = torch.nn.ModuleDict(), torch.nn.ModuleDict()
        handed = []  # channels of each encoder output handed to the decoder (a stack)
        c = in_channels
        for lv in levels:
            if lv.index == 0:
                self.enc[_level_key(lv, "conv")] = make_stem(c, stem_channels)
                c = stem_channels
            else:
                self.enc[_level_key(lv, "down")] = make_block(c, c, down=True)
                if encoder_extra is not None:
                    encoder_extra(lv, c)
            handed.append(c)
            for i in range(lv.num_blocks):
                key = _level_key(lv, f"block{i}")
                self.enc[key] = make_block(c, lv.channels, attention=lv.attention)
                c = lv.channels
                handed.append(c)
        for lv in reversed(levels):
            entry, blocks = _decoder_roles(lv, levels)
            for role in entry:
                block = make_block(c, c, up=role == "up", attention=role == "in0")
                self.dec[_level_key(lv, role)] = block
            for i, role in enumerate(blocks):
                last = i == len(blocks) - 1
                attn = lv.attention and (last or decoder_attention == "all")
                block = make_block(c + handed.pop(), lv.channels, attention=attn)
                self.dec[_level_key(lv, role)] = block
                c = lv.channels
            if decoder_extra is not None:
                decoder_extra(lv, c)
        return c

    def _encode(self, x, emb, join_image=None):
        """The encoder: the bottom features and the stack of outputs handed over."""
        handed, image = [], x
        for lv in self.levels:
            if lv.index == 0:
                x = self.enc[_level_key(lv, "conv")](x)
            else:
                x = self.enc[_level_key(lv, "down")](x, emb)
                if join_image is not None:
                    x, image = join_image(lv, x, image)
            handed.append(x)
            for i in range(lv.num_blocks):
                x = self.enc[_level_key(lv, f"block{i}")](x, emb)
                handed.append(x)
        return x, handed

    def _decode(self, x, emb, handed, after_level=None):
        """The decoder: each block takes the next handed-over tensor with its input."""
        out, levels = None, self.levels
        for lv in reversed(levels):
            entry, blocks = _decoder_roles(lv, levels)
            for role in entry:
                x = self.dec[_level_key(lv, role)](x, emb)
            for role in blocks:
                x = torch.cat([x, handed.pop()], dim=1)
                x = self.dec[_level_key(lv, role)](x, emb)
            if after_level is not None:
                out = after_level(lv, x, out)
        return x, out


# %%
# the level table of the paper's ImageNet-64 ADM (§5.5 draws a whole U-Net)
imagenet_levels = _unet_levels(64, 192, [1, 2, 3, 4], 3, [32, 16, 8])
print(*imagenet_levels, sep="\n")
assert [lv.attention for lv in imagenet_levels] == [False, True, True, True]


# %% [markdown]
# ## 5.5 DDPM++ and NCSN++: `SongUNet`
#
# > "These architectures correspond to relatively straightforward variations of the same
# > U-net backbone with three differences" (App. F.4)
#
# Both use the block of §5.3 with one attention head (in the decoder only in a level's last
# block), $s = 1/\sqrt2$, the embedding added, Xavier-uniform weights (output layers at
# $10^{-5}$), and `aux_norm` → SiLU → `aux_conv` to make $F_\theta$. Four arguments differ:
#
# | | DDPM++ (VP) | NCSN++ (VE) |
# |---|---|---|
# | `resample_filter` | `[1, 1]` | `[1, 3, 3, 1]` |
# | `embedding_type` | `positional` | `fourier` |
# | `channel_mult_noise` | 1 | 2 |
# | `encoder_type` | `standard` | `residual`: the *input image*, down-sampled, joins every level |
#
# NCSN++'s image path, a down-sampling 3×3 convolution per level, is averaged with the
# features by $1/\sqrt2$; the `'skip'` encoder and decoder are the original code's progressive
# variants (unused by the paper; checked). The forward pass comes first, as a base class, then
# the constructor: it makes the modules in the official order, so a seeded one draws the
# official initial weights.

# %% tags=["export"]
def _init_kwargs(local_vars: dict) -> dict:
    """The constructor arguments, from `locals()` at the top of __init__."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else v)
            for k, v in local_vars.items() if k not in ("self", "__class__")}


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _label_input(class_labels, layer, dropout, training, batch):
    """Class labels for the embedding; in training each is zeroed with p = dropout."""
    if class_labels is None:
        raise ValueError("class_labels are required: the network has "
                         f"label_dim={layer.in_features}")
    if training and dropout:
        kept = torch.rand([batch, 1], device=class_labels.device) >= dropout
        return class_labels * kept.to(class_labels.dtype)
    return class_labels


class _SongUNetForward(_LevelUNet):
    """SongUNet's forward pass, over the modules its constructor makes. Chapter 5."""

    def _embedding(self, noise_labels, class_labels, augment_labels, batch):
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)  # as the original DDPM++ code: sines first
        if self.map_label is not None:
            labels = _label_input(class_labels, self.map_label, self.label_dropout,
                                  self.training, batch)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def _join_image(self, lv, x, image):
        """Encoder, after a level's down-sampling block: the image path joins in."""
        if self.encoder_type == "residual":  # average of both paths; both go on from it
            x = (x + self.enc[_level_key(lv, "aux_residual")](image)) * math.sqrt(0.5)
            return x, x
        image = self.enc[_level_key(lv, "aux_down")](image)  # 'skip': projected, added
        return x + self.enc[_level_key(lv, "aux_skip")](image), image

    def _image_out(self, lv, x, out):
        """Decoder, after a level: its output layers, if any, + the coarser output."""
        if _level_key(lv, "aux_conv") not in self.dec:
            return out
        y = silu(self.dec[_level_key(lv, "aux_norm")](x))
        y = self.dec[_level_key(lv, "aux_conv")](y)
        return y if out is None else y + self.dec[_level_key(lv, "aux_up")](out)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embedding(noise_labels, class_labels, augment_labels, x.shape[0])
        join = None if self.encoder_type == "standard" else self._join_image
        x, handed = self._encode(x, emb, join)
        return self._decode(x, emb, handed, after_level=self._image_out)[1]


# %% tags=["export"]
class SongUNet(_SongUNetForward):
    """DDPM++ / NCSN++ U-Net (Song et al. 2021), official arguments and keys. Chapter 5.

    DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
    resample_filter=[1, 1]; NCSN++: 'fourier', 2, 'residual', [1, 3, 3, 1].
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0,
                 augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2),
                 channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1,
                 encoder_type="standard", decoder_type="standard",
                 resample_filter=(1, 1)):
        init_kwargs = _init_kwargs(locals())
        _check_choice("embedding_type", embedding_type, ("positional", "fourier"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        levels = _unet_levels(img_resolution, model_channels, channel_mult, num_blocks,
                              attn_resolutions)
        super().__init__()
        self.init_kwargs = init_kwargs
        self.label_dropout, self.encoder_type = label_dropout, encoder_type
        # Xavier-uniform; the output layers at 1e-5 of it, attention's qkv at sqrt(0.2)
        init = _init_scheme("xavier_uniform")
        out_init = _init_scheme("xavier_uniform", 1e-5)
        qkv_init = _init_scheme("xavier_uniform", math.sqrt(0.2))
        noise_ch = model_channels * channel_mult_noise
        emb_ch = model_channels * channel_mult_emb
        rf = dict(resample_filter=resample_filter)

        # the mapping network: noise level (+ labels) -> the vector every block receives
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_ch, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_ch)
        self.map_label = Linear(label_dim, noise_ch, **init) if label_dim else None
        self.map_augment = (Linear(augment_dim, noise_ch, bias=False, **init)
                            if augment_dim else None)
        self.map_layer0 = Linear(noise_ch, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)

        def make_block(cin, cout, up=False, down=False, attention=False):
            return UNetBlock(cin, cout, emb_ch, up=up, down=down, attention=attention,
                             num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                             eps=1e-6, resample_proj=True, adaptive_scale=False,
                             init=init, init_zero=out_init, init_attn=qkv_init, **rf)

        image_ch = [in_channels]  # channels of the 'residual' encoder's image path

        def image_path(lv, c):  # the input image, down-sampled level by level
            if encoder_type == "skip":
                self.enc[_level_key(lv, "aux_down")] = Conv2d(
                    in_channels, in_channels, 0, down=True, **rf)
                self.enc[_level_key(lv, "aux_skip")] = Conv2d(in_channels, c, 1, **init)
            elif encoder_type == "residual":
                self.enc[_level_key(lv, "aux_residual")] = Conv2d(
                    image_ch[-1], c, 3, down=True, fused_resample=True, **rf, **init)
                image_ch.append(c)

        def image_out(lv, c):  # output layers at full resolution, or at every level
            if decoder_type == "skip" or lv.index == 0:
                if decoder_type == "skip" and lv.index < len(levels) - 1:
                    self.dec[_level_key(lv, "aux_up")] = Conv2d(
                        out_channels, out_channels, 0, up=True, **rf)
                self.dec[_level_key(lv, "aux_norm")] = GroupNorm(c, eps=1e-6)
                self.dec[_level_key(lv, "aux_conv")] = Conv2d(
                    c, out_channels, 3, **out_init)

        def make_stem(cin, cout):
            return Conv2d(cin, cout, 3, **init)

        self._build(levels, in_channels, model_channels, make_block, make_stem,
                    decoder_attention="last", encoder_extra=image_path,
                    decoder_extra=image_out)


# %% [markdown]
# **Look** — the DDPM++ of CIFAR-10 as the builders made it (on the `meta` device): each box
# is a key `{r}x{r}_{role}` of `enc` (left, going down) or `dec` (right, going up), and the
# grey arrows are the hand-overs.

# %% tags=["hide-input"]
def draw_unet(net, ax):
    """A built U-Net's `enc` and `dec` modules, in order, and the hand-overs."""
    depth = {lv.resolution: lv.index for lv in net.levels}
    right = 2 * max(lv.num_blocks + 1 for lv in net.levels) + len(depth) + 2
    boxes, handed, pairs = {}, [], []
    for side in ("enc", "dec"):
        modules = {k: m for k, m in getattr(net, side).items() if "aux" not in k}
        level = [depth[int(k.split("x")[0])] for k in modules]
        for j, (key, module) in enumerate(modules.items()):
            lv, i, n = level[j], level[:j].count(level[j]), level.count(level[j])
            x = lv + i if side == "enc" else right - lv - (n - 1 - i)
            boxes[side, key] = (x, -lv, getattr(module, "num_heads", 0) > 0)
            if side == "enc":
                handed.append((side, key))
            elif "_block" in key:  # a decoder block takes the last tensor handed over
                pairs.append((handed.pop(), (side, key)))
    order = list(boxes)
    for a, b in zip(order, order[1:]):  # the main path
        (xa, ya, _), (xb, yb, _) = boxes[a], boxes[b]
        ax.plot([xa, xb], [ya, yb], "k", lw=0.8, zorder=1)
    arrow = dict(arrowstyle="-|>", color="0.65", lw=0.6, shrinkA=4, shrinkB=4,
                 connectionstyle="arc3,rad=-0.08")
    for src, dst in pairs:
        (x0, y0, _), (x1, y1, _) = boxes[src], boxes[dst]
        ax.annotate("", xy=(x1, y1 + 0.12), xytext=(x0, y0 + 0.12), arrowprops=arrow,
                    zorder=0)
    for (side, key), (x, y, attn) in boxes.items():
        role = key.split("_", 1)[1]
        color = ("0.45" if role == "conv" else "C3" if role in ("down", "up")
                 else "C1" if attn else "C0")
        ax.text(x, y, role, ha="center", va="center", fontsize=7, color="white",
                zorder=2, bbox=dict(boxstyle="round,pad=0.3", fc=color, ec="none"))
    for lv in net.levels:
        ax.text(-1, -lv.index, f"{lv.resolution}×{lv.resolution}, {lv.channels} ch",
                ha="right", va="center", fontsize=8)
    ax.text(-0.5, 0.45, "x →", fontsize=9)
    ax.text(right + 0.6, 0, "→ aux_norm → aux_conv → F(x)", va="center", fontsize=8)
    ax.text(right / 2, -len(depth) + 0.35, "σ, labels → mapping network → emb, input "
            "of every block", ha="center", fontsize=8, bbox=dict(fc="#eef", ec="0.7"))
    ax.set(xlim=(-3.5, right + 4.5), ylim=(-len(depth) + 0.1, 0.7))
    ax.axis("off")
    return boxes, pairs


with torch.device("meta"):
    cifar = SongUNet(32, 3, 3, model_channels=128, channel_mult=[2, 2, 2])
fig, ax = plt.subplots(figsize=(13, 3.8))
boxes, pairs = draw_unet(cifar, ax)
legend = {"3×3 convolution": "0.45", "UNetBlock": "C0",
          "UNetBlock with attention": "C1", "down / up-sampling block": "C3"}
_ = ax.legend([plt.Rectangle((0, 0), 1, 1, fc=c) for c in legend.values()], legend,
              loc="lower center", ncol=4, fontsize=8, frameon=False,
              bbox_to_anchor=(0.5, -0.1))
_ = ax.set_title("DDPM++ for CIFAR-10 (32×32), module by module")
# the claim of the text: one hand-over per decoder block, between equal resolutions
n_enc = sum(side == "enc" for side, _ in boxes)
print(f"{n_enc} encoder modules, {len(boxes) - n_enc} decoder modules, "
      f"{len(pairs)} hand-overs, {n_enc - len(pairs)} left over")
assert len(pairs) == n_enc == sum(lv.num_blocks + 1 for lv in cifar.levels)
assert all(src[1].split("_")[0] == dst[1].split("_")[0] for src, dst in pairs)

# %% [markdown]
# ## 5.6 ADM: `DhariwalUNet`
#
# > "For class-conditional ImageNet-64, we use the ADM architecture of Dhariwal and Nichol
# > […] with no changes." (App. F.4)
#
# ADM fills the same plan with other choices: Kaiming-uniform weights times $\sqrt{1/3}$,
# output layers at zero, adaptive scale and shift, $s = 1$, 64 channels an attention head in
# *every* block of the attention levels, the label added after `map_layer1`, and `out_norm`.

# %% tags=["export"]
class DhariwalUNet(_LevelUNet):
    """ADM U-Net of Dhariwal & Nichol (2021), official arguments and keys. Chapter 5."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0,
                 augment_dim=0, model_channels=192, channel_mult=(1, 2, 3, 4),
                 channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10, label_dropout=0):
        init_kwargs = _init_kwargs(locals())
        levels = _unet_levels(img_resolution, model_channels, channel_mult, num_blocks,
                              attn_resolutions)
        super().__init__()
        self.init_kwargs = init_kwargs
        self.label_dropout = label_dropout
        # Kaiming-uniform times sqrt(1/3) on weights and biases; output layers at zero
        init = _init_scheme("kaiming_uniform", math.sqrt(1 / 3), math.sqrt(1 / 3))
        zero = _init_scheme("kaiming_uniform", 0, 0)
        emb_ch = model_channels * channel_mult_emb

        # the mapping network; the class label joins after map_layer1, without a bias
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)
        label_init = _init_scheme("kaiming_normal", math.sqrt(label_dim))
        self.map_label = (Linear(label_dim, emb_ch, bias=False, **label_init)
                          if label_dim else None)

        def make_block(cin, cout, up=False, down=False, attention=False):
            return UNetBlock(cin, cout, emb_ch, up=up, down=down, attention=attention,
                             channels_per_head=64, dropout=dropout, init=init,
                             init_zero=zero)

        def make_stem(cin, cout):
            return Conv2d(cin, cout, 3, **init)

        c = self._build(levels, in_channels, levels[0].channels, make_block, make_stem,
                        decoder_attention="all")
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, 3, **zero)

    def _embedding(self, noise_labels, class_labels, augment_labels, batch):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = _label_input(class_labels, self.map_label, self.label_dropout,
                                  self.training, batch)
            emb = emb + self.map_label(labels)
        return silu(emb)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embedding(noise_labels, class_labels, augment_labels, x.shape[0])
        x, handed = self._encode(x, emb)
        x = self._decode(x, emb, handed)[0]
        return self.out_conv(silu(self.out_norm(x)))


# %% [markdown]
# **Check — parity with the official code.** `data/precond_edm.pt` holds a small DDPM++ of
# the official code and what it returned: we load it with `strict=True` (every key present,
# none extra, every shape equal) and compare. `data/network_refs.pt` does the same for NCSN++,
# the progressive variants and a small ADM (0, 1, 2 heads) with *every* parameter seeded
# random (near-zero output layers would prove nothing), and holds fingerprints of the official
# initial weights.

# %% tags=["hide-input"]
import importlib.util

from edm_lit.precond import EDMPrecond

ref = torch.load(DATA / "precond_edm.pt", weights_only=True)
wrapped = EDMPrecond(**ref["kwargs"]).eval()  # our SongUNet inside Chapter 4's wrapper
wrapped.load_state_dict(ref["state_dict"], strict=True)
assert list(wrapped.state_dict()) == list(ref["state_dict"])  # same keys, same order
args = (ref["model_in_x"], ref["model_in_noise_labels"], ref["model_in_class_labels"])
with torch.no_grad():
    out = wrapped.model(*args)
    out_aug = wrapped.model(*args, augment_labels=ref["augment_labels"])
parity_errors = {
    "DDPM++": rel_err(out, ref["model_out"]),
    "DDPM++, augment labels": rel_err(out_aug, ref["model_out_with_augment_labels"])}

spec = importlib.util.spec_from_file_location("refs", DATA / "make_network_refs.py")
make_network_refs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_network_refs)
NET_REFS = torch.load(DATA / "network_refs.pt", weights_only=True)


CLASSES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def official_twin(name):
    """Ours with the parameters of the official run `name`; its parity error."""
    ref = NET_REFS[name]
    net = CLASSES[ref["class_name"]](**ref["kwargs"]).eval()
    params = make_network_refs.random_state(ref["param_shapes"], ref["seed"])
    net.load_state_dict({**params, **ref["buffers"]}, strict=True)
    assert list(net.state_dict()) == ref["state_dict_keys"]  # same keys, same order
    inputs = (ref["x"], ref["noise_labels"], ref["class_labels"])
    with torch.no_grad():
        errors = [rel_err(net(*inputs), ref["out"])]
        if "augment_labels" in ref:
            out = net(*inputs, ref["augment_labels"])
            errors.append(rel_err(out, ref["out_with_augment_labels"]))
    return net, max(errors)


for name, label in [("ncsnpp", "NCSN++"), ("songunet_skip", "SongUNet, skip variants"),
                    ("adm", "ADM")]:
    net, parity_errors[label] = official_twin(name)
for name, err in parity_errors.items():
    print(f"{name:24s} max|ours - official| / max|official| = {err:.1e}")
heads = {block.num_heads for block in net.enc.values() if isinstance(block, UNetBlock)}
assert max(parity_errors.values()) <= 1e-5 and heads == {0, 1, 2}  # (net is the ADM)
glue("parity_worst", max(parity_errors.values()), display=False)
for name, ref in NET_REFS["init"].items():  # seeded constructors: the official weights
    torch.manual_seed(ref["seed"])
    state = CLASSES[ref["class_name"]](**ref["kwargs"]).state_dict()
    ours = make_network_refs.init_fingerprint(state)
    assert torch.allclose(ours["sums"], ref["sums"], rtol=1e-12, atol=1e-12), name
print("seeded initial weights as the official ones:", *NET_REFS["init"])

# %% [markdown]
# ## 5.7 The paper's networks, counted
#
# > "more self-attention layers interspersed throughout the network (22 instead of 6), and the
# > use of multi-head attention (e.g., 12 heads in the lowest resolution)" (App. F.4, ADM
# > against DDPM++)
#
# The paper's configurations (App. F.3, Table 7): CIFAR-10 with `channel_mult=[2, 2, 2]`, 10
# classes and 9 augmentation labels; ImageNet-64 ADM with its defaults and 1000 classes.
# Built on PyTorch's `meta` device (shapes without memory), they have the official
# 55,735,299, 56,400,643 and 295,899,267 parameters and the attention of Table 8.

# %% tags=["hide-input"]
CIFAR = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10,
             augment_dim=9, model_channels=128, channel_mult=[2, 2, 2], dropout=0.13)
NCSNPP = dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1])  # DDPM++: SongUNet's defaults
IMAGENET = dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000)
paper = {"CIFAR-10 DDPM++ (cond.)": (SongUNet, CIFAR, 55_735_299),
         "CIFAR-10 NCSN++ (cond.)": (SongUNet, dict(**CIFAR, **NCSNPP), 56_400_643),
         "ImageNet-64 ADM (cond.)": (DhariwalUNet, IMAGENET, 295_899_267)}
for name, (cls, kwargs, official) in paper.items():
    with torch.device("meta"):
        net = cls(**kwargs)
    count = sum(p.numel() for p in net.parameters())
    heads = {side: [b.num_heads for b in getattr(net, side).values()
                    if getattr(b, "num_heads", 0)] for side in ("enc", "dec")}
    n_enc, n_dec, per_block = len(heads["enc"]), len(heads["dec"]), set(heads["enc"])
    print(f"{name:23s} {count:>11,} parameters (official {official:,}); attention "
          f"blocks {n_enc} + {n_dec}, heads {sorted(per_block)}")
    assert count == official  # Table 8: ADM 9 + 13 attention blocks, 6-9-12 heads
    table8 = (9, 13, {6, 9, 12}) if "ADM" in name else (4, 2, {1})
    assert (n_enc, n_dec, per_block) == table8

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.networks`: layers with the official parameter names (`weight_init`,
# `Linear`, `Conv2d`, `GroupNorm`, `attention`, `UNetBlock`, `PositionalEmbedding`,
# `FourierEmbedding`), and `SongUNet` (DDPM++, NCSN++) and `DhariwalUNet` (ADM), built from a
# level table (`net.levels`) with the official arguments (`init_kwargs`) and weights (outputs
# within {glue:text}`parity_worst:.1e`). Chapter 5b trains one; Appendix A2 loads snapshots.

# %% tags=["hide-cell"]
# the numbers the answers quote: the scale after 20 fresh blocks of DDPM++ and of ADM
song = dict(skip_scale=math.sqrt(0.5), adaptive_scale=False, eps=1e-6,
            init=_init_scheme("xavier_uniform"),
            init_zero=_init_scheme("xavier_uniform", 1e-5))
torch.manual_seed(0)
probe, scale = torch.randn(8, 32, 8, 8), {"ex_half_power": 2.0**-10}
for name, kw in [("ex_song_scale", song), ("ex_adm_scale", adm)]:
    x = probe
    with torch.no_grad():
        for _ in range(20):
            x = UNetBlock(32, 32, 16, **kw)(x, torch.randn(8, 16))
    scale[name] = (x.std() / probe.std()).item()
print(scale)
assert abs(scale["ex_song_scale"] / 2**-10 - 1) < 0.01
assert abs(scale["ex_adm_scale"] - 1) < 1e-6
for name, value in scale.items():
    glue(name, value, display=False)

# %% [markdown]
# ## Exercises
#
# 1. The box filter `[1, 1]` makes down-sampling an average over 2×2 pixels. What does
#    `[1, 3, 3, 1]` compute, and why might NCSN++ prefer it?
# 2. DDPM++ multiplies every residual sum by $1/\sqrt2$; ADM does not. If the residual branch
#    starts at zero, what happens to the activations' scale after 20 blocks in each case?
#
# :::{dropdown} Answers
# 1. The outer product of $[1, 3, 3, 1]/8$ with itself: a binomial (nearly Gaussian)
#    low-pass, which suppresses the aliasing a box filter lets through when it halves the
#    resolution, for a 4×4 instead of a 2×2 depthwise convolution.
# 2. With a zero branch each block returns its input times `skip_scale`: after 20 DDPM++
#    blocks, $(1/\sqrt2)^{20}$ = {glue:text}`ex_half_power:.2e` (20 fresh blocks, output
#    layers at $10^{-5}$: {glue:text}`ex_song_scale:.2e`) unless the branches learn to add
#    variance. ADM's blocks keep the scale ({glue:text}`ex_adm_scale:.3f`) and rely on the
#    normalisation inside the branch.
# :::
