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
# Chapters 2–4 treated the denoiser as a black box $F_\theta$ wrapped by the preconditioning of
# Eq. 7. The paper deliberately does **not** change that box: to show that its sampler,
# preconditioning and training choices help on their own, it re-uses the architectures of the
# works it compares against (Sec. 5, App. F.2):
#
# - **DDPM++** and **NCSN++** (Song et al. 2021), the VP and VE networks — both are one class
#   here, `SongUNet`, switched by four arguments;
# - **ADM** (Dhariwal & Nichol 2021), the ImageNet network — `DhariwalUNet`.
#
# This chapter builds both from a handful of layers, block by block, with **the same
# constructor arguments and the same `state_dict()` key names as the official implementation**,
# so its pretrained weights load unchanged. The second half loads the official `.pkl` snapshots
# *safely* — without running the code those files carry — and the last section trains a small
# network against a loss floor we know exactly.

# %% tags=["export"]
import math

import torch
import torch.nn.functional as F
from torch.nn.functional import silu

# %%
import time

import matplotlib.pyplot as plt
import torch

from edm_lit.mode import get_mode

MODE = get_mode()
torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})

# %% [markdown]
# ## 5.1 Layers
#
# Everything is built from four layers: a fully connected layer, a convolution that can also
# resample, group normalisation, and attention. Each keeps its parameters under the names the
# official code uses (`weight`, `bias`, `resample_filter`), because those names *are* the keys of
# the `state_dict()`.
#
# ### Initialisation
#
# The official code initialises every weight from one of four schemes, all with variance
# $1/\text{fan}$: *Kaiming* uses $\text{fan} = \text{fan}_\text{in}$, *Xavier* the mean
# $(\text{fan}_\text{in} + \text{fan}_\text{out})/2$; each comes as a uniform distribution on
# $[-\sqrt{3/\text{fan}}, \sqrt{3/\text{fan}}]$ or a normal one with standard deviation
# $\sqrt{1/\text{fan}}$. A layer then multiplies by `init_weight` (or `init_bias` for the bias,
# drawn from the same distribution). Output layers are created with `init_weight=0` (ADM) or
# `1e-5` (DDPM++/NCSN++), so a fresh network starts close to $F_\theta = 0$.

# %% tags=["export"]
INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random weights with variance 1/fan (Kaiming: fan_in; Xavier: mean of fan_in and fan_out). Chapter 5."""
    if mode not in INIT_MODES:
        raise ValueError(f"init mode must be one of {INIT_MODES}, got {mode!r}")
    fan = fan_in if mode.startswith("kaiming") else (fan_in + fan_out) / 2
    if mode.endswith("uniform"):
        return math.sqrt(3 / fan) * (torch.rand(*shape) * 2 - 1)
    return math.sqrt(1 / fan) * torch.randn(*shape)


class Linear(torch.nn.Module):
    """Fully connected layer, y = x W^T + b, computed in x's dtype. Chapter 5."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


# %% [markdown]
# **Check** — each scheme has the variance it promises (estimated from 200,000 draws).

# %%
for mode in ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"]:
    fan_in, fan_out = 300, 100
    w = weight_init([400, 500], mode, fan_in, fan_out)
    fan = fan_in if mode.startswith("kaiming") else (fan_in + fan_out) / 2
    print(f"{mode:16s} var = {w.var().item():.5f}   1/fan = {1 / fan:.5f}")
    assert abs(w.var().item() * fan - 1) < 0.02

# %% [markdown]
# ### Convolution with resampling
#
# The U-Nets change resolution inside their blocks. Down-sampling by 2 is a low-pass filter
# followed by taking every other pixel; up-sampling by 2 inserts zeros between pixels and
# low-passes (a transposed convolution with stride 2, the filter scaled by 4 so that the mean
# is kept). The filter is the outer product of a 1-D *resample filter* with itself, normalised
# to sum 1: DDPM++ and ADM use `[1, 1]` (a 2×2 box: average pooling and nearest-neighbour
# up-sampling), NCSN++ uses the smoother `[1, 3, 3, 1]`. The 2-D filter is stored as a buffer
# `resample_filter` — the official checkpoints carry it, so it is part of our `state_dict()` too.
#
# A `Conv2d` may resample (`up` or `down`), convolve (`kernel > 0`), or both. With `kernel=0`
# it is a pure resampler without weights. `fused_resample=True`, which NCSN++'s residual
# encoder uses, convolves first at full resolution and filters afterwards, as the official code
# does. For the box filter we take a cheaper route to the same numbers: `avg_pool2d` for
# down-sampling and nearest-neighbour repetition for up-sampling.

# %% tags=["export"]
class Conv2d(torch.nn.Module):
    """2-D convolution with optional 2x up- or down-sampling by an FIR filter, computed in x's dtype. Chapter 5."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive, got both True")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum().square())[None, None] if up or down else None)
        # the pooling shortcut applies exactly when the filter is the 2x2 box (all entries 1/4)
        taps = [float(v) for v in resample_filter]
        self._box = (up or down) and len(taps) == 2 and taps[0] == taps[1]

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        f = self.resample_filter  # a loaded filter decides again whether the shortcut applies
        self._box = f is not None and f.shape[-1] == 2 and bool((f == 0.25).all())

    def _resample(self, x, channels, pad):
        f = self.resample_filter.to(x.dtype)
        if self.up:
            if self._box and pad == 0:
                return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            return F.conv_transpose2d(x, (4 * f).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=pad)
        if self._box and pad == 0:
            return F.avg_pool2d(x, 2)
        return F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=pad)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0
        if self.fused_resample and w is not None and (self.up or self.down):
            if self.up:  # up-sample with the padding of both, then convolve without padding
                return F.conv2d(self._resample(x, self.in_channels, w_pad + f_pad), w, b)
            x = self._resample(F.conv2d(x, w, padding=w_pad + f_pad), self.out_channels, 0)
            return x if b is None else x.add_(b.reshape(1, -1, 1, 1))
        if self.up or self.down:
            x = self._resample(x, self.in_channels, f_pad)
        if w is not None:
            return F.conv2d(x, w, b, padding=w_pad)
        return x if b is None else x + b.reshape(1, -1, 1, 1)


class GroupNorm(torch.nn.Module):
    """Group normalisation with min(32, C // 4) groups (at least 4 channels per group). Chapter 5."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1:
            raise ValueError(f"GroupNorm needs num_channels >= {min_channels_per_group}, got {num_channels}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


# %% [markdown]
# **Check** — with the box filter, down-sampling is 2×2 averaging and up-sampling repeats each
# pixel; the general path (grouped convolutions, which the `[1, 3, 3, 1]` filter uses) gives the
# same numbers as the shortcut. Any normalised filter keeps a constant image constant (away from
# the zero-padded border).

# %%
x = torch.randn(2, 4, 8, 8)
for up in [False, True]:
    box = Conv2d(4, 4, kernel=0, up=up, down=not up)
    fast = box(x)
    box._box = False  # force the grouped-convolution path
    slow = box(x)
    print(f"{'up' if up else 'down'}: shortcut vs grouped convolution: {(fast - slow).abs().max():.1e}")
    assert torch.allclose(fast, slow, atol=1e-6)
assert torch.allclose(Conv2d(4, 4, 0, down=True)(x), x.reshape(2, 4, 4, 2, 4, 2).mean((3, 5)))
smooth = Conv2d(1, 1, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
assert torch.allclose(smooth(torch.ones(1, 1, 16, 16))[..., 1:-1, 1:-1], torch.ones(1, 1, 6, 6))

# %% [markdown]
# ### Attention
#
# Self-attention lets every pixel look at every other pixel of the same feature map. A 1×1
# convolution `qkv` makes, per head, a query, a key and a value vector of $c$ channels at each of
# the $L = HW$ positions; the output at position $i$ is
#
# $$\mathbf{a}_i = \sum_j \operatorname{softmax}_j\!\left(\frac{\mathbf{q}_i^\top \mathbf{k}_j}{\sqrt{c}}\right) \mathbf{v}_j .$$
#
# One detail matters for loading weights: the official layout of the `qkv` output interleaves
# the three — channel $3m + s$ of a head holds channel $m$ of $s \in \{q, k, v\}$ — so we split it
# the same way. The official code writes the product and softmax out in float32 (even for float16
# activations); we call PyTorch's `scaled_dot_product_attention`, which computes the same
# function and on a GPU uses fused kernels that accumulate in float32.

# %% tags=["export"]
def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over pixels from a [N, 3C, H, W] qkv map (official channel layout). Chapter 5."""
    N, C3, H, W = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(N * num_heads, C // num_heads, 3, H * W).unbind(2)  # each [N*heads, c, L]
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [N*heads, L, c]
    return a.transpose(1, 2).reshape(N, C, H, W)


# %% [markdown]
# **Check** — against the formula written out with `einsum` and `softmax`.

# %%
qkv = torch.randn(2, 3 * 8, 4, 4)
q, k, v = qkv.reshape(2 * 2, 4, 3, 16).unbind(2)
w = torch.einsum("ncq,nck->nqk", q, k / 2.0).softmax(dim=2)  # c = 4 channels per head, sqrt(c) = 2
by_hand = torch.einsum("nqk,nck->ncq", w, v).reshape(2, 8, 4, 4)
print(f"fused attention vs formula: {(attention(qkv, num_heads=2) - by_hand).abs().max():.1e}")
assert torch.allclose(attention(qkv, num_heads=2), by_hand, atol=1e-6)

# %% [markdown]
# ## 5.2 Telling the network the noise level
#
# The network gets the noise level as a scalar $c_\text{noise}(\sigma)$ per image (Eq. 7; for EDM
# $c_\text{noise} = \tfrac14 \ln\sigma$). A scalar is a poor input for a deep network, so it is
# first spread over many channels of sines and cosines at geometrically spaced frequencies:
#
# - **positional** (DDPM++, ADM; the Transformer's embedding): frequencies
#   $\omega_i = (1/10000)^{i/(n-1)}$ for $i = 0 \dots n-1$, $n$ = half the channels (ADM divides by
#   $n$ instead of $n - 1$: `endpoint=False`);
# - **Fourier** (NCSN++): random frequencies $2\pi f_i$, $f_i \sim \mathcal{N}(0, 16^2)$, fixed at
#   construction and saved as the buffer `freqs`.
#
# Both return $[\cos(\omega c), \sin(\omega c)]$. Class labels (one-hot, `label_dim`) and
# augmentation labels (Chapter 6, `augment_dim`) enter through linear layers and are added to
# the noise embedding; two more linear layers (`map_layer0`, `map_layer1`) make the vector `emb`
# that every block receives.

# %% tags=["export"]
class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding [cos(w_i c), sin(w_i c)] with w_i = (1/max_positions)^(i/n'). Chapter 5."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        angles = torch.outer(x, ((1 / self.max_positions) ** exponent).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi f_i c), sin(2 pi f_i c)], f_i ~ N(0, scale^2) kept in buffer `freqs`. Chapter 5."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# %% [markdown]
# **Look** — the positional embedding (64 channels, as in a small DDPM++) over the range of
# $c_\text{noise}$ it receives. The frequencies run from 1 down to $10^{-4}$, a design made for
# DDPM's integer time steps $0 \dots 999$ (the VP column of Table 1 feeds $c_\text{noise} = 999\,t$),
# which sweep every channel through its range. EDM's $c_\text{noise} = \tfrac14 \ln\sigma$ spans only
# about $[-1.6, 1.1]$ for σ from 0.002 to 80, so just the first few channels vary and the rest
# are nearly constant: the later layers `map_layer0/1` must work from a handful of informative
# features.

# %%
sigmas = torch.logspace(math.log10(0.002), math.log10(80), 200)
embed = PositionalEmbedding(64, endpoint=True)
inputs = {"EDM: c_noise = ln(σ)/4, σ in [0.002, 80]": sigmas.log() / 4,
          "VP: c_noise = 999 t, t in [0, 1]": torch.linspace(0, 999, 200)}
fig, axes = plt.subplots(1, 2, figsize=(12, 3))
varying = {}
for ax, (name, c_noise) in zip(axes, inputs.items()):
    emb = embed(c_noise)
    im = ax.imshow(emb.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, extent=[0, 199, 63.5, -0.5])
    ax.set(xlabel="input index (increasing c_noise)", ylabel="channel (cos | sin)", title=name)
    ax.grid(False)
    spread = emb.max(0).values - emb.min(0).values
    varying[name] = int((spread[:32] > 0.1).sum())
fig.colorbar(im, ax=axes)
print("cos channels (of 32) that change by more than 0.1 over the range:", varying)
edm_name, vp_name = inputs
assert varying[edm_name] <= 6 and varying[vp_name] >= 24
emb = embed(sigmas.log() / 4)
assert emb.abs().max() <= 1 and (emb[1:] - emb[:-1]).norm(dim=1).min() > 1e-3  # bounded; neighbours stay apart

# %% [markdown]
# ## 5.3 The U-Net block
#
# All three architectures use one residual block (`UNetBlock`), configured differently:
#
# 1. `norm0` → SiLU → `conv0` (3×3; this is where the block up- or down-samples);
# 2. the embedding enters through `affine`: either added to the features (DDPM++/NCSN++,
#    `adaptive_scale=False`) or as a per-channel scale and shift after `norm1` (ADM,
#    `adaptive_scale=True`: $h \leftarrow \text{norm}(h)(1 + s) + b$);
# 3. `norm1` → SiLU → dropout → `conv1` (3×3, initialised to (almost) zero);
# 4. the **skip connection** adds the input back — through `skip`, a 1×1 convolution (or a plain
#    resampler), when the channel count or resolution changes — and multiplies by `skip_scale`
#    ($1/\sqrt2$ in DDPM++/NCSN++ to keep the variance of the sum at one, 1 in ADM);
# 5. optionally **attention**: `norm2` → `qkv` → attention → `proj` (zero-initialised), again
#    added to its input and scaled.
#
# Because `conv1` and `proj` start at zero, a fresh block is close to its skip connection: a
# deep network starts near a simple function and learns the residuals.

# %% tags=["export"]
class UNetBlock(torch.nn.Module):
    """Residual block with embedding input, optional up/down-sampling and self-attention (DDPM++, NCSN++, ADM). Chapter 5."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def _scale(self, x):
        return x if self.skip_scale == 1 else x.mul_(self.skip_scale)

    def forward(self, x, emb):
        h = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = silu(self.norm1(h.add_(params)))
        if self.dropout and self.training:
            h = F.dropout(h, p=self.dropout, training=True)
        h = self._scale(self.conv1(h).add_(self.skip(x) if self.skip is not None else x))
        if self.num_heads:
            h = self._scale(self.proj(attention(self.qkv(self.norm2(h)), self.num_heads)).add_(h))
        return h


# %% [markdown]
# **Check** — with ADM's initialisation (`conv1` and `proj` exactly zero) a fresh block *is* its
# skip connection, and it keeps the resolution it was asked for.

# %%
adm_init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
block = UNetBlock(32, 64, emb_channels=16, down=True, attention=True, channels_per_head=32, init=adm_init,
                  init_zero=dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0))
x, emb = torch.randn(3, 32, 16, 16), torch.randn(3, 16)
out = block(x, emb)
assert out.shape == (3, 64, 8, 8) and block.num_heads == 2
assert torch.allclose(out, block.skip(x), atol=1e-6)
print("fresh ADM block == its skip connection; output", tuple(out.shape))

# %% [markdown]
# ## 5.4 DDPM++ and NCSN++: `SongUNet`
#
# The U-Net has an **encoder** that halves the resolution level by level and a **decoder** that
# doubles it back, with *skip connections* handing every encoder output to the decoder at the
# same resolution (concatenated to its input). Per level $\ell$ (resolution $r = R / 2^\ell$,
# channels `model_channels * channel_mult[ℓ]`):
#
# - encoder: at level 0 a 3×3 convolution `{r}x{r}_conv` lifts the image to `model_channels`;
#   at deeper levels a down-sampling block `{r}x{r}_down`; then `num_blocks` blocks
#   `{r}x{r}_block{i}`, with attention where $r$ is in `attn_resolutions`;
# - decoder: at the deepest level two blocks `{r}x{r}_in0` (with attention) and `_in1`; at the
#   others an up-sampling block `{r}x{r}_up`; then `num_blocks + 1` blocks that each consume one
#   skip connection, the last with attention where $r$ is in `attn_resolutions`;
# - output: `aux_norm` → SiLU → `aux_conv` (3×3, initialised at $10^{-5}$) at full resolution.
#
# These names are the keys of `enc` and `dec` (`torch.nn.ModuleDict`s) and so the prefixes of the
# `state_dict()` keys, e.g. `enc.16x16_block0.conv0.weight`. The variants:
#
# | | DDPM++ (VP) | NCSN++ (VE) |
# |---|---|---|
# | `embedding_type` | `positional` | `fourier` |
# | `channel_mult_noise` | 1 | 2 |
# | `encoder_type` | `standard` | `residual`: an extra path down-samples the *input image* and adds it at every level (`{r}x{r}_aux_residual`) |
# | `resample_filter` | `[1, 1]` | `[1, 3, 3, 1]` |
#
# (`encoder_type='skip'` and `decoder_type='skip'`, progressive-growing variants of the original
# code, are available as in the official implementation; the paper's configurations do not use
# them.) The constructor's arguments and defaults are the official ones.

# %% tags=["export"]
def _init_kwargs(local_vars: dict) -> dict:
    """The constructor arguments, from `locals()` at the top of __init__ (sequences copied to lists)."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in local_vars.items()
            if k not in ("self", "__class__")}


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. (2021), official constructor arguments and state_dict keys. Chapter 5.

    DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard', resample_filter=[1, 1].
    NCSN++: embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1].
    forward(x, noise_labels, class_labels, augment_labels=None) returns F(x) with out_channels channels.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,),
                 dropout=0.10, label_dropout=0, embedding_type="positional", channel_mult_noise=1,
                 encoder_type="standard", decoder_type="standard", resample_filter=(1, 1)):
        init_kwargs = _init_kwargs(locals())
        _check_choice("embedding_type", embedding_type, ("positional", "fourier"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution must be divisible by 2^(len(channel_mult) - 1), got {img_resolution}")
        super().__init__()
        self.init_kwargs = init_kwargs
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        # mapping network: noise level (+ class, augmentation labels) -> embedding vector
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # encoder; `skip_channels` remembers what each non-aux module hands to the decoder
        self.enc = torch.nn.ModuleDict()
        c, c_aux, skip_channels = in_channels, in_channels, []
        for level, mult in enumerate(channel_mult):
            r = img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(c, model_channels, kernel=3, **init)
                c = model_channels
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(c, c, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{r}x{r}_aux_down"] = Conv2d(c_aux, c_aux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f"{r}x{r}_aux_skip"] = Conv2d(c_aux, c, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{r}x{r}_aux_residual"] = Conv2d(c_aux, c, kernel=3, down=True, resample_filter=resample_filter,
                                                                fused_resample=True, **init)
                    c_aux = c
            skip_channels.append(c)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(c, model_channels * mult, attention=r in attn_resolutions, **block)
                c = model_channels * mult
                skip_channels.append(c)

        # decoder
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            r = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(c, c, attention=True, **block)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(c, c, **block)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(c, c, up=True, **block)
            for i in range(num_blocks + 1):
                attn = i == num_blocks and r in attn_resolutions
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(c + skip_channels.pop(), model_channels * mult, attention=attn, **block)
                c = model_channels * mult
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{r}x{r}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                         resample_filter=resample_filter)
                self.dec[f"{r}x{r}_aux_norm"] = GroupNorm(c, eps=1e-6)
                self.dec[f"{r}x{r}_aux_conv"] = Conv2d(c, out_channels, kernel=3, **init_zero)

    def _embedding(self, x, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [cos, sin] -> [sin, cos], as the original
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"class_labels are required: the network has label_dim={self.map_label.in_features}")
            labels = class_labels
            if self.training and self.label_dropout:  # drop whole labels (classifier-free guidance training)
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embedding(x, noise_labels, class_labels, augment_labels)
        skips, aux = [], x
        for name, module in self.enc.items():
            if "aux_down" in name:
                aux = module(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + module(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + module(aux)) / math.sqrt(2)
            else:
                x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
                skips.append(x)
        out = h = None
        for name, module in self.dec.items():
            if "aux_up" in name:
                out = module(out)
            elif "aux_norm" in name:
                h = module(x)
            elif "aux_conv" in name:
                h = module(silu(h))
                out = h if out is None else h + out
            else:
                if x.shape[1] != module.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out


# %% [markdown]
# **Check — parity with the official code.** `tests/data/precond_edm.pt` holds the weights of a
# small DDPM++ network made by the official implementation (16×16, `model_channels=16`, two
# levels, attention at 8×8, 10 classes, 9 augmentation labels) and what its inner network
# returned for given inputs. We build ours with the same arguments, load the official
# `state_dict` with `strict=True` (every key present, none extra, every shape equal) and compare.

# %%
from pathlib import Path

PARITY = torch.load(Path("..") / "tests" / "data" / "precond_edm.pt", weights_only=True)
model_kwargs = {k: v for k, v in PARITY["kwargs"].items() if k not in ("img_channels", "model_type")}
small = SongUNet(in_channels=3, out_channels=3, **model_kwargs).eval()
small.load_state_dict({k.removeprefix("model."): v for k, v in PARITY["state_dict"].items()}, strict=True)
with torch.no_grad():
    ours = small(PARITY["model_in_x"], PARITY["model_in_noise_labels"], PARITY["model_in_class_labels"])
    ours_aug = small(PARITY["model_in_x"], PARITY["model_in_noise_labels"], PARITY["model_in_class_labels"],
                     augment_labels=PARITY["augment_labels"])
for got, ref in [(ours, PARITY["model_out"]), (ours_aug, PARITY["model_out_with_augment_labels"])]:
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"max|ours - official| / max|official| = {err:.1e}")
    assert err <= 1e-5
n_small = sum(p.numel() for p in small.parameters())
assert n_small == PARITY["num_params"] and len(small.state_dict()) == len(PARITY["state_dict"]) == 149
print(f"{len(small.state_dict())} state_dict keys, {n_small:,} parameters — as the official network")

# %% [markdown]
# ## 5.5 ADM: `DhariwalUNet`
#
# The ImageNet network follows the same plan with different choices: ADM's initialisation
# (Kaiming-uniform scaled by $\sqrt{1/3}$, output layers exactly zero), adaptive scale/shift in
# every block, no $1/\sqrt2$ on the skips, multi-head attention with 64 channels per head at
# resolutions 32, 16 and 8, attention in *every* block of those levels, a plain encoder, the
# embedding layers in a slightly different order (the class label is added after `map_layer1`,
# through a bias-free layer), and a final `out_norm` → SiLU → `out_conv` instead of the `aux`
# output layers. The paper's ImageNet-64 model is ADM with 192 channels, multipliers
# $[1, 2, 3, 4]$ and 3 blocks per level.

# %% tags=["export"]
class DhariwalUNet(torch.nn.Module):
    """ADM U-Net of Dhariwal & Nichol (2021), official constructor arguments and state_dict keys. Chapter 5.

    forward(x, noise_labels, class_labels, augment_labels=None) returns F(x) with out_channels channels.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0):
        init_kwargs = _init_kwargs(locals())
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution must be divisible by 2^(len(channel_mult) - 1), got {img_resolution}")
        super().__init__()
        self.init_kwargs = init_kwargs
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = torch.nn.ModuleDict()
        c, skip_channels = in_channels, []
        for level, mult in enumerate(channel_mult):
            r = img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(c, model_channels * mult, kernel=3, **init)
                c = model_channels * mult
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(c, c, down=True, **block)
            skip_channels.append(c)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(c, model_channels * mult, attention=r in attn_resolutions, **block)
                c = model_channels * mult
                skip_channels.append(c)

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            r = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(c, c, attention=True, **block)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(c, c, **block)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(c, c, up=True, **block)
            for i in range(num_blocks + 1):
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(c + skip_channels.pop(), model_channels * mult,
                                                          attention=r in attn_resolutions, **block)
                c = model_channels * mult
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"class_labels are required: the network has label_dim={self.map_label.in_features}")
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = silu(emb)
        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        for module in self.dec.values():
            if x.shape[1] != module.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        return self.out_conv(silu(self.out_norm(x)))

# %% [markdown]
# ## 5.6 The paper's networks, counted
#
# The paper's configurations (App. F.2, Table 7 and the official presets): CIFAR-10 at 32×32
# with `model_channels=128`, `channel_mult=[2, 2, 2]`, 4 blocks, attention at 16×16, dropout
# 0.13, 10 classes and 9 augmentation labels; ImageNet-64 ADM with 192 channels,
# `channel_mult=[1, 2, 3, 4]`, 3 blocks, attention at 32, 16 and 8, 1000 classes. We build them
# inside the EDM preconditioner on PyTorch's `meta` device — shapes without memory, so even the
# 296-million-parameter ADM costs nothing — and count. The official parameter counts are
# 55,735,299, 56,400,643 and 295,899,267.

# %%
from edm_lit.precond import EDMPrecond

CIFAR = dict(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, model_channels=128,
             channel_mult=[2, 2, 2], dropout=0.13, model_type="SongUNet")
DDPMPP = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
              resample_filter=[1, 1])
NCSNPP = dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1])
ADM = dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=192,
           channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10)
paper = {"CIFAR-10 DDPM++ (cond.)": (dict(**CIFAR, **DDPMPP), 55_735_299),
         "CIFAR-10 NCSN++ (cond.)": (dict(**CIFAR, **NCSNPP), 56_400_643),
         "ImageNet-64 ADM (cond.)": (ADM, 295_899_267)}
shapes = {}
for name, (kwargs, official) in paper.items():
    with torch.device("meta"):
        net = EDMPrecond(**kwargs)
    count = sum(p.numel() for p in net.parameters())
    shapes[name] = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    print(f"{name:25s} {count:>13,} parameters (official {official:,}), {len(shapes[name])} state_dict keys")
    assert count == official

# %% [markdown]
# There is no ADM parity file, so we spot-check the key names and shapes that the naming scheme
# of §5.4–5.5 predicts for the ImageNet model: the bias-free class embedding, the stored box
# filter of a down-sampling block, 6 heads of 64 channels at 32×32 (so `qkv` has
# $3 \cdot 384$ outputs), no attention at 64×64, four decoder blocks per level, and the output layers.

# %%
adm_keys = shapes["ImageNet-64 ADM (cond.)"]
expected = {"model.map_label.weight": (768, 1000), "model.map_layer0.weight": (768, 192),
            "model.enc.64x64_conv.weight": (192, 3, 3, 3), "model.enc.32x32_down.conv0.resample_filter": (1, 1, 2, 2),
            "model.enc.32x32_block0.qkv.weight": (1152, 384, 1, 1), "model.enc.32x32_block0.skip.weight": (384, 192, 1, 1),
            "model.enc.32x32_block0.affine.weight": (768, 768), "model.dec.8x8_in0.proj.weight": (768, 768, 1, 1),
            "model.dec.64x64_block3.conv0.weight": (192, 384, 3, 3), "model.out_norm.weight": (192,),
            "model.out_conv.weight": (3, 192, 3, 3)}
for key, shape in expected.items():
    assert adm_keys.get(key) == shape, (key, adm_keys.get(key), shape)
assert "model.map_label.bias" not in adm_keys and not any(k.startswith("model.enc.64x64_block0.qkv") for k in adm_keys)
assert not any(".dec.64x64_block4." in k for k in adm_keys) and "model.dec.8x8_in1.qkv.weight" not in adm_keys
print(f"{len(expected)} ADM keys checked by name and shape")

# %% [markdown]
# ## 5.7 Precision: float16 and bfloat16
#
# Every layer above computes in the dtype of its *input* and casts its weights to it. That is
# the official `use_fp16` mechanism: the preconditioner (Chapter 4) casts the network input to
# float16 when `use_fp16=True` and the device is a GPU, the layers follow, while the embedding
# (computed from float32 noise labels) stays in float32 and the weights, their gradients and the
# optimiser stay in float32. The alternative, `torch.autocast(device_type, dtype=torch.bfloat16)`
# around the forward pass, lets PyTorch choose the precision per operation (convolutions and
# matrix products in bfloat16). The speed-up is a GPU matter; here we check that both paths run
# and agree with float32 — float16 to about $10^{-3}$, bfloat16 (8 bits of mantissa) to about
# $10^{-2}$ of the output's scale.

# %%
args = (PARITY["model_in_x"], PARITY["model_in_noise_labels"], PARITY["model_in_class_labels"])
with torch.no_grad():
    ref = small(*args)
    out_fp16 = small(args[0].half(), *args[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = small(*args)
for name, out in [("float16 input", out_fp16), ("bfloat16 autocast", out_bf16)]:
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    print(f"{name:18s} output {out.dtype}, max error / max|output| = {err:.1e}")
    assert err < (5e-3 if out.dtype == torch.float16 else 5e-2)

# %% [markdown]
# ## 5.8 Loading the official checkpoints — safely
#
# The official snapshots (`network-snapshot-*.pkl` from training, and the released
# `edm-cifar10-32x32-cond-vp.pkl` and friends) are Python **pickles** of a dictionary:
# `ema` (the network with averaged weights, the one to sample from), `loss_fn`, `augment_pipe`
# and `dataset_kwargs`. Pickle is not a data format but a small program: its opcodes look up
# *any* importable Python callable by name and call it with arguments from the file, so
# `pickle.load` on an untrusted file can, for instance, call `os.system`. The official files go
# further on purpose: their network classes are written by `torch_utils.persistence`, which stores
# **the source code of the module that defined each class** (`module_src`) and, on loading,
# `exec`s it to recreate the class. Loading an official snapshot the official way therefore runs
# whatever code the file contains.
#
# We never do that. What the file must contain is fully determined by how the official code
# writes it — each persistent object is reduced to a call
# `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
#
# | field of `meta` | holds |
# |---|---|
# | `type` | `'class'` |
# | `version` | 6 (the persistence format's version) |
# | `module_src` | the source code of the defining module — **ignored** by us |
# | `class_name` | e.g. `'EDMPrecond'`, `'SongUNet'`, `'UNetBlock'` |
# | `state` | the object's `__dict__`: `_parameters`, `_buffers`, `_modules` (the children, persistent objects themselves), the `_init_kwargs` the constructor got, … |
#
# and each tensor to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)` (wrapped in
# `_rebuild_parameter` for parameters), its storage to `torch.storage._load_from_bytes(b)` — bytes
# in PyTorch's legacy serialisation format, which we read with PyTorch's own restricted loader
# (`weights_only=True`). So we unpickle with a **restricted unpickler**: its `find_class`, the one
# place where a pickle can name a callable, answers only for that short list (plus
# `collections.OrderedDict`, `set`, `ModuleDict`, NumPy scalars, which a module's `__dict__` holds)
# and maps each name to *our own* function that turns the data into a plain record. Everything
# else raises `CheckpointError` before anything runs. The network is then rebuilt from the
# recorded `_init_kwargs` with **our** classes, and its tensors copied in with a strict
# `state_dict` check.

# %% tags=["export:checkpoints"]
import collections
import hashlib
import http.client
import inspect
import io
import json
import math
import os
import pickle
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch

from edm_lit import networks, precond


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: refused, corrupt, incompatible with our networks, or unreachable. Chapter 5."""


# classes an official pickle may contain, by the name it records; networks are rebuilt with our classes
NETWORK_CLASSES = {
    "EDMPrecond": precond.EDMPrecond, "VPPrecond": precond.VPPrecond, "VEPrecond": precond.VEPrecond,
    "iDDPMPrecond": precond.iDDPMPrecond, "SongUNet": networks.SongUNet, "DhariwalUNet": networks.DhariwalUNet,
}
SUBMODULE_CLASSES = {"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding"}
RECORD_CLASSES = {"AugmentPipe", "EDMLoss", "VPLoss", "VELoss"}  # kept as plain records of their settings
PERSISTENCE_VERSION = 6

# %% [markdown]
# The records and the handful of functions the unpickler may hand out. Each checks the types of
# its arguments — they come from the file — and none of them imports, executes or opens anything.

# %% tags=["export:checkpoints"]
class PersistentObject:
    """A persistent object of an official pickle, as data: its class name and saved state; its code is never run. Chapter 5."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __repr__(self):
        return f"PersistentObject({self.class_name!r})"


class _ModuleDictRecord:
    """Stands in for torch.nn.ModuleDict inside a pickle (built with NEWOBJ, then BUILD with its __dict__)."""

    class_name = "ModuleDict"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointError("malformed ModuleDict state in the pickle")
        self.state = state


class _EasyDict(dict):
    """Stands in for dnnlib.util.EasyDict (a dict subclass) in a pickle."""

    def __setstate__(self, state):
        pass


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str) or not isinstance(meta.get("state"), dict):
        raise CheckpointError("malformed persistent object in the pickle (expected meta with class_name and state)")
    name = meta["class_name"]
    if meta.get("type") != "class" or meta.get("version") != PERSISTENCE_VERSION:
        raise CheckpointError(f"unsupported persistence record for {name!r}: type {meta.get('type')!r}, "
                              f"version {meta.get('version')!r} (expected 'class', {PERSISTENCE_VERSION})")
    if name not in NETWORK_CLASSES.keys() | SUBMODULE_CLASSES | RECORD_CLASSES:
        raise CheckpointError(f"refusing to load persistent class {name!r} from a checkpoint: not an allowed class")
    return PersistentObject(name, meta["state"])  # meta['module_src'] is deliberately never looked at


def _load_storage(data):
    if not isinstance(data, bytes):
        raise CheckpointError("malformed tensor storage in the pickle")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"refusing a tensor storage that PyTorch's restricted loader rejects: {e}") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise CheckpointError(f"expected a tensor storage in the pickle, got {type(storage).__name__}")
    return storage


def _is_ints(value):
    return isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)) or not isinstance(storage_offset, int) \
            or not _is_ints(size) or not _is_ints(stride) or len(size) != len(stride):
        raise CheckpointError("malformed tensor in the pickle")
    try:
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), False,
                                               collections.OrderedDict())
    except RuntimeError as e:  # e.g. a size that does not fit the storage
        raise CheckpointError(f"malformed tensor in the pickle: {e}") from None


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("malformed parameter in the pickle")
    return data


_NUMPY_SCALARS = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


class _NumpyDType:
    """Stands in for numpy.dtype in a pickle: only the plain numeric scalar types."""

    def __init__(self, code, align=False, copy=True):
        if code not in _NUMPY_SCALARS:
            raise CheckpointError(f"refusing NumPy dtype {code!r} from a checkpoint: not a plain numeric scalar type")
        self.code, self.order = code, "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "="):
            self.order = state[1]


def _numpy_scalar(dtype, data=b""):
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise CheckpointError("malformed NumPy scalar in the pickle")
    dt = np.dtype(dtype.code).newbyteorder(dtype.order)
    if len(data) != dt.itemsize:
        raise CheckpointError("malformed NumPy scalar in the pickle")
    return np.frombuffer(data, dt)[0].item()  # a plain Python number


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictRecord,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the official persistence format only; any other global is refused before it is called. Chapter 5."""

    def find_class(self, module, name):
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise CheckpointError(f"refusing to load '{module}.{name}' from a checkpoint: not an allowed type")
        return target

    def persistent_load(self, pid):
        raise CheckpointError("refusing a pickle with persistent ids: not the official snapshot format")


def read_official_pickle(path):
    """Unpickle an official .pkl with the restricted unpickler: dicts, tensors and PersistentObject records. Chapter 5."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint: {path}") from None
    except Exception as e:  # truncated files end in EOFError or UnpicklingError, garbage in many others
        raise CheckpointError(f"{path} is not a readable official snapshot (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None

# %% [markdown]
# From records to a network. The record of the top-level network carries its constructor's
# keyword arguments; we pass them to our class of the same name, then walk the record tree and
# collect its parameters and persistent buffers under their dotted names — which are exactly the
# `state_dict()` keys — checking on the way that every child module has the class our network
# has at that place. A strict load then demands the same keys and shapes; when they differ the
# error names them.

# %% tags=["export:checkpoints"]
def _state_of(record, prefix, out):
    """Collect parameters and persistent buffers of a record tree into out[dotted name] = tensor."""
    state = record.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None and name not in skip:
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"{prefix + name} in the pickle is not a tensor")
                out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _state_of(child, f"{prefix}{name}.", out)
    return out


def _check_architecture(record, module, prefix=""):
    """Every child in the file must sit where our network has a module of the same class name."""
    for name, child in (record.state.get("_modules") or {}).items():
        ours = module._modules.get(name) if module is not None else None
        where = prefix + name
        if child is None:
            continue
        if not isinstance(child, (PersistentObject, _ModuleDictRecord)):
            raise CheckpointError(f"{where} in the pickle is not a module")
        if ours is None:
            raise CheckpointError(f"wrong architecture: the checkpoint has a module {where!r} ({child.class_name}) "
                                  f"that our {type(module).__name__} does not")
        if type(ours).__name__ != child.class_name:
            raise CheckpointError(f"wrong architecture at {where!r}: the checkpoint has {child.class_name}, "
                                  f"our network {type(ours).__name__}")
        _check_architecture(child, ours, where + ".")


def load_state_dict_strictly(net, state: dict, source) -> None:
    """load_state_dict(strict=True), with a CheckpointError naming missing, unexpected and mis-shaped keys. Chapter 5."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} (checkpoint {tuple(state[k].shape)}, network {tuple(v.shape)})"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                for what, keys in [("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", misshaped)] if keys]
    if problems:
        raise CheckpointError(f"{source} does not fit {type(net).__name__}: " + "; ".join(problems))
    net.load_state_dict(state, strict=True)


def build_network(record: PersistentObject, source="the checkpoint") -> torch.nn.Module:
    """Our network (EDMPrecond, SongUNet, ...) with the weights of an official record, in eval mode. Chapter 5."""
    if not isinstance(record, PersistentObject) or record.class_name not in NETWORK_CLASSES:
        found = record.class_name if isinstance(record, PersistentObject) else type(record).__name__
        raise CheckpointError(f"{source} holds {found}, not one of the networks {sorted(NETWORK_CLASSES)}")
    args, kwargs = record.state.get("_init_args") or (), record.state.get("_init_kwargs")
    if args or not isinstance(kwargs, dict):
        raise CheckpointError(f"{source}: the {record.class_name} record has no keyword constructor arguments")
    try:
        net = NETWORK_CLASSES[record.class_name](**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot build {record.class_name}(**{kwargs}): {e}") from None
    _check_architecture(record, net)
    load_state_dict_strictly(net, _state_of(record, "", {}), source)
    return net.eval().requires_grad_(False)


def load_official_snapshot(path) -> dict:
    """All entries of an official snapshot .pkl: networks built with our classes, other records as PersistentObject. Chapter 5."""
    data = read_official_pickle(path)
    if isinstance(data, PersistentObject):
        return {"ema": build_network(data, str(path))}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a snapshot dict with an 'ema' network, got {type(data).__name__}")
    return {k: build_network(v, f"{path} [{k!r}]") if isinstance(v, PersistentObject) and v.class_name in NETWORK_CLASSES
            else v for k, v in data.items()}

# %% [markdown]
# ### Our own format
#
# For our own checkpoints we use a format that is data only: the weights in a
# [safetensors](https://huggingface.co/docs/safetensors) file (a JSON header of names, dtypes and
# shapes followed by raw bytes; nothing to execute) and, beside it, a small JSON file with the
# network's class name, its constructor arguments, a format version and the SHA-256 of the
# weights file. `save_network(net, "out/cifar")` writes `out/cifar.safetensors` and
# `out/cifar.json`; each is written to a temporary file first and moved into place with
# `os.replace`, so a crash never leaves a half-written file under the final name.
# Non-finite floats (EDM's default `sigma_max=inf`) are stored as `{"float": "inf"}`, since
# JSON has no infinity.
#
# A preconditioner records no constructor arguments of its own, so `network_config` reads them
# back: every argument of its class's constructor is also an attribute of the same name, and
# the inner network (ours) keeps its `init_kwargs`.

# %% tags=["export:checkpoints"]
FORMAT_NAME = "edm_lit.network"
FORMAT_VERSION = 1
_INTERFACE_KWARGS = ("img_resolution", "in_channels", "out_channels", "label_dim")  # set by the preconditioner


def _to_json(value, where="init_kwargs"):
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
    raise ValueError(f"{where} = {value!r} cannot be stored in a checkpoint's JSON config")


def _from_json(value):
    if isinstance(value, dict):
        return float(value["float"]) if set(value) == {"float"} else {k: _from_json(v) for k, v in value.items()}
    return [_from_json(v) for v in value] if isinstance(value, list) else value


def network_config(net) -> dict:
    """{'class_name', 'init_kwargs'} that rebuild `net` (an EDMPrecond/VP/VE/iDDPM or SongUNet/DhariwalUNet). Chapter 5."""
    cls = type(net)
    if NETWORK_CLASSES.get(cls.__name__) is not cls:
        raise ValueError(f"net must be one of {sorted(NETWORK_CLASSES)} of edm_lit, got {cls.__module__}.{cls.__name__}")
    if isinstance(net, precond.Precond):
        params = inspect.signature(cls.__init__).parameters
        kwargs = {k: getattr(net, k) for k, p in params.items()
                  if p.kind is p.POSITIONAL_OR_KEYWORD and k not in ("self", "model_type") and hasattr(net, k)}
        inner = network_config(net.model)
        kwargs["model_type"] = inner["class_name"]
        kwargs.update({k: v for k, v in inner["init_kwargs"].items() if k not in _INTERFACE_KWARGS})
    else:
        kwargs = dict(net.init_kwargs)
    return {"class_name": cls.__name__, "init_kwargs": kwargs}


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pair(path) -> tuple:
    """(config .json, weights .safetensors) for a name given with or without either suffix."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_network(net, path) -> tuple:
    """Write `net` as PATH.safetensors (weights) + PATH.json (class, constructor arguments, SHA-256); atomic. Chapter 5."""
    from safetensors.torch import save_file

    config_path, weights_path = _pair(path)
    config = network_config(net)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    _write_atomically(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT_NAME}))
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "class_name": config["class_name"],
              "init_kwargs": _to_json(config["init_kwargs"]), "weights": weights_path.name,
              "weights_sha256": _sha256(weights_path)}
    _write_atomically(config_path, lambda tmp: Path(tmp).write_text(json.dumps(header, indent=2) + "\n"))
    return config_path, weights_path


def _load_ours(path) -> torch.nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, _ = _pair(path)
    try:
        header = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint: {config_path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path} is not an edm_lit network config (no format {FORMAT_NAME!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version {header.get('format_version')!r}; "
                              f"this edm_lit reads version {FORMAT_VERSION}")
    name = header.get("class_name")
    if name not in NETWORK_CLASSES:
        raise CheckpointError(f"{config_path}: unknown network class {name!r}, expected one of {sorted(NETWORK_CLASSES)}")
    weights_path = config_path.parent / str(header.get("weights"))
    if not weights_path.is_file():
        raise CheckpointError(f"{config_path} names the weights file {weights_path}, which is missing")
    if _sha256(weights_path) != header.get("weights_sha256"):
        raise CheckpointError(f"{weights_path} does not match the SHA-256 recorded in {config_path} "
                              "(truncated, corrupt or replaced)")
    kwargs = _from_json(header.get("init_kwargs") or {})
    try:
        net = NETWORK_CLASSES[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: cannot build {name}(**{kwargs}): {e}") from None
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from None
    load_state_dict_strictly(net, state, str(weights_path))
    return net.eval().requires_grad_(False)

# %% [markdown]
# ### URLs, one entry point, and conversion
#
# `load_network` takes a path or an `http(s)` URL. A URL is downloaded once into a cache
# directory (`$EDM_LIT_CACHE`, else `~/.cache/edm_lit`) under a name derived from the URL. The
# download goes to a `.part` file and resumes where it stopped — an HTTP `Range` request — when a
# connection drops (three attempts per call; the next call continues), and is renamed into place
# only when complete. Without network access you get an error that names the URL and where to
# put a manually downloaded copy. The format is recognised by the name: `.pkl` is an official
# snapshot (its `ema` network is returned), `.json`/`.safetensors` or a bare name is ours.

# %% tags=["export:checkpoints"]
DOWNLOAD_ATTEMPTS = 3


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept: $EDM_LIT_CACHE, else ~/.cache/edm_lit. Chapter 5."""
    return Path(os.environ.get("EDM_LIT_CACHE") or Path.home() / ".cache" / "edm_lit")


def is_url(path_or_url) -> bool:
    return isinstance(path_or_url, str) and urllib.parse.urlparse(path_or_url).scheme in ("http", "https")


def _fetch_into(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part` (a Range request when part has bytes); raise if it ends early."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part file is already complete
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
    if expected is not None and part.stat().st_size != expected:
        raise http.client.IncompleteRead(b"", expected - part.stat().st_size)


def download(url: str, cache=None, timeout: float = 60.0) -> Path:
    """Download `url` into the cache (resumable, atomic rename when complete) and return the local path. Chapter 5."""
    cache = Path(cache) if cache is not None else cache_dir()
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    error = None
    for _ in range(DOWNLOAD_ATTEMPTS):
        try:
            _fetch_into(url, part, timeout)
            os.replace(part, dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e
            if isinstance(e, urllib.error.HTTPError) and e.code < 500:
                break  # 404 and friends will not change by retrying
    raise CheckpointError(f"could not download {url}: {error}. If this machine is offline, download the file "
                          f"elsewhere and pass its local path (or save it as {dest}); a partial download is kept "
                          f"in {part} and resumes on the next attempt")


def load_network(path_or_url, cache=None) -> torch.nn.Module:
    """The ready network (eval mode, no grad) from an official .pkl (its 'ema'), our format, or a URL. Chapter 5."""
    path = download(path_or_url, cache) if is_url(path_or_url) else Path(path_or_url)
    if path.is_dir():
        configs = sorted(path.glob("*.json"))
        if len(configs) != 1:
            raise CheckpointError(f"{path} is a directory with {len(configs)} .json configs; pass one of them")
        path = configs[0]
    if path.suffix == ".pkl":
        data = read_official_pickle(path)
        if isinstance(data, dict):
            if "ema" not in data:
                raise CheckpointError(f"{path}: the snapshot has no 'ema' network (keys: {sorted(map(str, data))})")
            return build_network(data["ema"], f"{path} ['ema']")
        return build_network(data, str(path))
    if path.suffix in (".json", ".safetensors", ""):
        return _load_ours(path)
    raise CheckpointError(f"cannot tell the format of {path}: expected an official .pkl, or our .json/.safetensors")


def convert(src, dst) -> tuple:
    """Official snapshot (path or URL) -> our format at `dst` (.json + .safetensors); returns both paths. Chapter 5."""
    return save_network(load_network(src), dst)

# %% [markdown]
# **Check — an official snapshot loads.** We cannot download the released files here, so we
# write one ourselves in exactly the official layout: the pickler below reduces each network
# object to `torch_utils.persistence._reconstruct_persistent_obj(meta)` as the official code
# does (a stand-in `torch_utils.persistence` module exists only while pickling; the
# `module_src` we store is a placeholder). The snapshot dict has the official keys; its `ema` is
# the parity network of §5.4 wrapped in `EDMPrecond`, so the loaded network must reproduce the
# official outputs.

# %%
import io
import os
import pickle
import sys
import tempfile
import types

from edm_lit.checkpoints import (NETWORK_CLASSES, CheckpointError, convert, load_network, network_config,
                                 read_official_pickle, save_network)
from edm_lit.loss import EDMLoss

PERSISTENT = set(NETWORK_CLASSES) | {"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding",
                                     "FourierEmbedding", "EDMLoss"}


def official_layout_pickle(obj, module_src="# source code of the defining module\n") -> bytes:
    """Pickle obj as torch_utils.persistence does: every persistent object -> _reconstruct_persistent_obj(meta)."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only used to write")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    class Writer(pickle.Pickler):
        def reducer_override(self, o):
            name = type(o).__name__
            if name not in PERSISTENT or not type(o).__module__.startswith("edm_lit"):
                return NotImplemented
            kwargs = network_config(o)["init_kwargs"] if name in NETWORK_CLASSES else {}
            state = dict(o.__dict__, _init_args=(), _init_kwargs=kwargs)
            meta = dict(type="class", version=6, module_src=module_src, class_name=name, state=state)
            return _reconstruct_persistent_obj, (meta,)

    fake = types.ModuleType("torch_utils.persistence")
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": fake})
    try:
        buffer = io.BytesIO()
        Writer(buffer, protocol=4).dump(obj)
        return buffer.getvalue()
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)


official = EDMPrecond(**PARITY["kwargs"]).eval().requires_grad_(False)
official.load_state_dict(PARITY["state_dict"], strict=True)
snapshot = dict(ema=official, loss_fn=EDMLoss(), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"))
workdir = Path(tempfile.mkdtemp())
pkl = workdir / "network-snapshot-000000.pkl"
pkl.write_bytes(official_layout_pickle(snapshot))
print(f"wrote {pkl.name}: {pkl.stat().st_size:,} bytes; top level:", read_official_pickle(pkl))

net = load_network(pkl)
with torch.no_grad():
    for got, ref in [(net(PARITY["x"], PARITY["sigma"], PARITY["class_labels"]), PARITY["out"]),
                     (net(PARITY["x"], PARITY["sigma"], None), PARITY["out_class_labels_none"]),
                     (net(PARITY["x"], PARITY["sigma"], PARITY["class_labels"], augment_labels=PARITY["augment_labels"]),
                      PARITY["out_with_augment_labels"])]:
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"loaded EDMPrecond vs official output: {err:.1e}")
        assert err <= 1e-5
assert type(net) is EDMPrecond and not net.training and not any(p.requires_grad for p in net.parameters())

# %% [markdown]
# **Check — hostile files are refused, and nothing runs.** Two attacks. The classic one: a pickle
# whose reduce calls `os.system`. The one specific to this format: a perfectly shaped snapshot
# whose `module_src` contains code — the official loader would execute it. Both would create a
# marker file. The first is refused with a `CheckpointError`; the second loads (its data is
# fine) but its code is never run. Either way the marker never appears.

# %%
marker = workdir / "pwned"


class Hostile:
    def __reduce__(self):
        return os.system, (f"touch {marker}",)


(workdir / "hostile.pkl").write_bytes(pickle.dumps({"ema": Hostile()}))
try:
    load_network(workdir / "hostile.pkl")
except CheckpointError as e:
    print("refused:", e)
else:
    raise AssertionError("a pickle calling os.system must be refused")
trojan = official_layout_pickle({"ema": official}, module_src=f"open({str(marker)!r}, 'w').write('pwned')\n")
(workdir / "trojan.pkl").write_bytes(trojan)
assert str(marker).encode() in trojan  # the code is in the file ...
load_network(workdir / "trojan.pkl")
assert not marker.exists()  # ... and was never executed
print("module_src ignored; marker file exists:", marker.exists())

# %% [markdown]
# **Check — our format round-trips**, the conversion of an official snapshot gives the same
# network, and a truncated file or a config that does not fit the weights fails with an error
# that says what is wrong.

# %%
config_path, weights_path = convert(pkl, workdir / "converted" / "cifar-mini")
print(f"{config_path.name}:", config_path.read_text()[:300].replace("\n", " "), "...")
again = load_network(config_path)
with torch.no_grad():
    assert torch.equal(again(PARITY["x"], PARITY["sigma"], PARITY["class_labels"]),
                       net(PARITY["x"], PARITY["sigma"], PARITY["class_labels"]))
(workdir / "truncated.pkl").write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])
cfg = json.loads(config_path.read_text())
cfg["init_kwargs"]["model_channels"] = 32
(workdir / "converted" / "wrong.json").write_text(json.dumps(cfg))
for bad in [workdir / "truncated.pkl", workdir / "converted" / "wrong.json"]:
    try:
        load_network(bad)
    except CheckpointError as e:
        print(f"{bad.name}: {str(e)[:160]}...")
    else:
        raise AssertionError(f"{bad} must be refused")

# %% [markdown]
# ## 5.9 Training against a known floor
#
# How good can a trained denoiser get? At each noise level the best possible one is the ideal
# denoiser $D^*(\mathbf{x}; \sigma) = \mathbb{E}[\mathbf{y} \mid \mathbf{y} + \mathbf{n} = \mathbf{x}]$
# (Chapter 1), so the weighted loss of Eq. 2 has a **floor** no network can go below,
#
# $$\mathcal{L}^*(\sigma) = \lambda(\sigma)\, \frac1d\, \mathbb{E}_{\mathbf{y}, \mathbf{n}} \left\| D^*(\mathbf{y} + \mathbf{n}; \sigma) - \mathbf{y} \right\|^2 ,$$
#
# per pixel and channel ($d$ of them), with EDM's $\lambda(\sigma) = (\sigma^2 + \sigma_\text{data}^2)/(\sigma\,\sigma_\text{data})^2$.
# For real images the floor is unknown; the paper's Fig. 5a shows the loss of trained networks
# per σ and argues from its shape where training effort pays off (the loss can be reduced only at
# intermediate σ; at very small σ it is hard to tell the noise from the signal, at very large σ
# the answer is the data mean). On a Gaussian mixture $D^*$ is closed-form, so the floor is exact
# up to Monte Carlo error, and we can see how close a real training run gets.
#
# The set-up: the image-shaped mixture of Chapter 1 (eight smooth 3×8×8 "images" with
# per-pixel standard deviation 0.1), `EDMPrecond` around a small DDPM++ (`SongUNet`, two
# levels, attention at 4×4), `EDMLoss` of Chapter 4 with $\sigma_\text{data}$ set to the data's
# standard deviation, Adam. Quick mode trains for about two minutes on a CPU.

# %%
from edm_lit.framework import toy_image_mixture
from edm_lit.loss import EDMLoss

gm = toy_image_mixture(num_components=8, channels=3, resolution=8, std=0.1, seed=0)
sigma_data = gm.data_std
train_steps, batch, lr = MODE.pick(quick=2000, full=20_000), 64, 3e-3
torch.manual_seed(0)
denoiser = EDMPrecond(img_resolution=8, img_channels=3, sigma_data=sigma_data, model_type="SongUNet",
                      model_channels=MODE.pick(quick=16, full=64), channel_mult=[1, 2], num_blocks=1,
                      attn_resolutions=[4], dropout=0.0).to(MODE.device)
loss_fn = EDMLoss(sigma_data=sigma_data)
optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
data_gen = torch.Generator().manual_seed(1)
history = []
start = time.perf_counter()
for step in range(train_steps):
    for group in optimizer.param_groups:  # constant learning rate, then a linear decay over the last 30 %
        group["lr"] = lr * min(1.0, (train_steps - step) / (0.3 * train_steps))
    y = gm.sample(batch, generator=data_gen).float().to(MODE.device)
    loss = loss_fn(denoiser, y).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    history.append(loss.item())
print(f"sigma_data = {sigma_data:.3f}; {train_steps} steps of {batch} images in {time.perf_counter() - start:.0f} s; "
      f"{sum(p.numel() for p in denoiser.parameters()):,} parameters")

# %% [markdown]
# Now the loss per σ on fresh data, for the trained network and for $D^*$ on the *same*
# draws of $\mathbf{y}$ and $\mathbf{n}$ (so that most of the Monte Carlo noise cancels in the
# comparison), and the floor averaged over the training distribution of σ, which is what the
# training loss itself approaches.

# %%
sigma_eval = torch.logspace(-2, math.log10(50), 15, dtype=torch.float64)
n_eval = MODE.pick(quick=512, full=4096)
eval_gen = torch.Generator().manual_seed(2)
trained, floor = [], []
denoiser.eval()
with torch.no_grad():
    for s in sigma_eval:
        y = gm.sample(n_eval, generator=eval_gen)
        x = y + s * torch.randn(y.shape, generator=eval_gen, dtype=torch.float64)
        D = denoiser(x.float().to(MODE.device), s.float().expand(n_eval).to(MODE.device)).double().cpu()
        trained.append((loss_fn.weight(s) * (D - y).square().mean()).item())
        floor.append((loss_fn.weight(s) * (gm.denoise(x, s) - y).square().mean()).item())
    y = gm.sample(16_384, generator=eval_gen)
    s_train = (loss_fn.P_mean + loss_fn.P_std * torch.randn(16_384, 1, 1, 1, generator=eval_gen, dtype=torch.float64)).exp()
    x = y + s_train * torch.randn(y.shape, generator=eval_gen, dtype=torch.float64)
    floor_train = (loss_fn.weight(s_train) * (gm.denoise(x, s_train) - y).square()).mean().item()
trained, floor = torch.tensor(trained), torch.tensor(floor)
ratio = trained / floor
for s, t, f, r in zip(sigma_eval, trained, floor, ratio):
    print(f"sigma {s:8.3f}   trained {t:.4f}   floor {f:.4f}   trained / floor {r:.3f}")

# %%
window = 100
smooth = torch.tensor(history).unfold(0, window, 1).mean(1)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
ax1.plot(range(window - 1, len(history)), smooth, label=f"training loss (mean of {window} steps)")
ax1.axhline(floor_train, color="k", ls="--", label="floor, averaged over p_train(σ)")
ax1.set(xlabel="training step", ylabel="loss per element", yscale="log", title="training")
ax2.plot(sigma_eval, trained, "o-", label="trained network")
ax2.plot(sigma_eval, floor, "k--", label="floor: ideal denoiser D*")
ax2.axvspan(0.2, 2, color="C2", alpha=0.1, label="checked range")
p_train = torch.exp(-((sigma_eval.log() - loss_fn.P_mean) ** 2) / (2 * loss_fn.P_std**2))
ax2.fill_between(sigma_eval, 0, p_train * floor.max() / p_train.max(), color="C1", alpha=0.15,
                 label="p_train(ln σ), scaled")
ax2.set(xscale="log", xlabel="σ", ylabel="λ(σ) · loss per element", title="loss per noise level (cf. paper Fig. 5a)")
_ = ax1.legend(), ax2.legend(fontsize=8)
plt.tight_layout()

# %% [markdown]
# The trained network follows the floor closely where $p_\text{train}$ puts its samples and
# the task is easy (small σ, where $D \approx \mathbf{x}$ is nearly right, and large σ, where the answer
# is close to the data mean). The gap is largest around σ ≈ 1–3: there the noisy image is still
# informative, but deciding *which* of the eight components it came from requires the network
# to have learned them well — exactly the intermediate range the paper identifies as the one
# where training effort matters. **Check** — the training loss ends close to the floor averaged
# over $p_\text{train}$ (within 30 %); after the short quick-mode training the trained loss for
# σ in [0.2, 2] is within `MARGIN` = 40 % of the floor (in our runs it ended 17–24 % above the
# floor at σ ≈ 1.3 and within 10 % elsewhere in that range; longer training shrinks the gap);
# the largest gap lies between σ = 0.7 and 5; and nowhere is the trained loss below the floor by
# more than the Monte Carlo error.

# %%
final = smooth[-1].item()
print(f"training loss over the last {window} steps {final:.4f}; floor averaged over p_train {floor_train:.4f} "
      f"(ratio {final / floor_train:.3f})")
assert 0.85 <= final / floor_train <= 1.3
MARGIN = MODE.pick(quick=0.4, full=0.2)
mid = (sigma_eval >= 0.2) & (sigma_eval <= 2)
worst = sigma_eval[ratio.argmax()].item()
print(f"sigma in [0.2, 2]: trained / floor at most {ratio[mid].max():.3f} (allowed 1 + {MARGIN}); "
      f"largest gap at sigma = {worst:.2f}; smallest ratio {ratio.min():.3f}")
assert (ratio[mid] <= 1 + MARGIN).all()
assert 0.7 <= worst <= 5
assert (ratio >= 0.97).all()

# %% [markdown]
# ## 5.10 Sampling from an official pretrained network
#
# Everything above comes together in four lines. To generate CIFAR-10 images with the paper's
# best conditional model (FID 1.79, 35 network evaluations), on a machine with internet access
# and preferably a GPU:
#
# ```python
# import torch
# from edm_lit.checkpoints import load_network
# from edm_lit.samplers import edm_sampler  # Chapters 2-3
#
# url = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl"
# device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# net = load_network(url).to(device)          # downloaded once into ~/.cache/edm_lit; no code from the file runs
# latents = torch.randn([16, net.img_channels, net.img_resolution, net.img_resolution], device=device)
# class_labels = torch.eye(net.label_dim, device=device)[torch.arange(16, device=device) % net.label_dim]
# images = edm_sampler(net, latents, class_labels)  # 18 Heun steps, float64, as the official generate.py
# images = (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()  # [16, 32, 32, 3]
# ```
#
# `load_network` returns the snapshot's `ema` network — our `EDMPrecond` around our `SongUNet`
# (DDPM++), built from the constructor arguments recorded in the file, in eval mode. Offline,
# download the `.pkl` elsewhere and pass its path instead of the URL, or convert it once with
# `edm-lit convert edm-cifar10-32x32-cond-vp.pkl cifar10-cond-vp` and afterwards load
# `cifar10-cond-vp.json` — our safetensors format, which contains no code at all. The other
# released snapshots (`edm-cifar10-32x32-uncond-vp.pkl`, `...-ve.pkl`, `edm-ffhq-64x64-uncond-*.pkl`,
# `edm-afhqv2-64x64-uncond-*.pkl`, `edm-imagenet-64x64-cond-adm.pkl`, and the `baseline-*.pkl`
# networks with VP, VE and iDDPM preconditioning) load the same way.
#
# **Check** — the same lines on the snapshot of §5.8 (the small official-layout network): the
# deterministic 18-step sampler on the official latents and labels reproduces the images the
# official `edm_sampler` made with the official network (`tests/data/sampler_edm.pt`).

# %%
from edm_lit.samplers import edm_sampler

SAMPLER = torch.load(Path("..") / "tests" / "data" / "sampler_edm.pt", weights_only=True)
net = load_network(pkl)
with torch.no_grad():
    images = edm_sampler(net, SAMPLER["latents"].double(), SAMPLER["class_labels"])
err = ((images - SAMPLER["det_out"]).abs().max() / SAMPLER["det_out"].abs().max()).item()
print(f"loaded snapshot + edm_sampler vs official: {err:.1e} (35 network calls, float64 sampler)")
assert err < 1e-3

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.networks`:
#
# - layers with the official parameter names: `weight_init` (the four schemes), `Linear`,
#   `Conv2d` (with FIR up/down-sampling and the `resample_filter` buffer), `GroupNorm`,
#   `attention`, `UNetBlock`, and the noise embeddings `PositionalEmbedding`, `FourierEmbedding`;
# - the architectures `SongUNet` (DDPM++ / NCSN++) and `DhariwalUNet` (ADM) with the official
#   constructor arguments and `state_dict()` keys (checked against official weights and outputs
#   to $10^{-6}$, and the official parameter counts of the paper's three configurations); both
#   keep their constructor arguments in `init_kwargs`, compute in the input's dtype (`use_fp16`)
#   and run under bfloat16 autocast.
#
# Exported to `edm_lit.checkpoints`:
#
# - `load_network(path_or_url)`: an official `.pkl` (its `ema` network), our format, or a URL
#   (cached, resumable download); `load_official_snapshot` for every entry of a snapshot;
# - `RestrictedUnpickler` / `read_official_pickle`: the official persistence format read as data,
#   with an allow-list of exactly the callables it needs; everything else raises `CheckpointError`;
#   `module_src` is never executed;
# - `save_network` / `network_config` / `convert`: our format, safetensors weights plus a JSON
#   config with the SHA-256 of the weights, written atomically; `edm-lit convert IN OUT` on the
#   command line (Appendix A).
#
# ## Exercises
#
# 1. The box filter `[1, 1]` makes down-sampling an average over 2×2 pixels. What does
#    `[1, 3, 3, 1]` compute, and why might NCSN++ prefer it?
# 2. DDPM++ multiplies every residual sum by $1/\sqrt2$; ADM does not. If the residual branch
#    starts at zero, what happens to the activations' scale after 20 blocks in each case?
# 3. In §5.9, train with `P_mean = 1.0` instead of −1.2. Where does the gap to the floor grow?
#
# :::{dropdown} Answers
# 1. The 4×4 filter is the outer product of $[1, 3, 3, 1]/8$ with itself: a binomial (approximately
#    Gaussian) low-pass, which suppresses the aliasing a box filter lets through when it halves
#    the resolution; it costs a 4×4 instead of a 2×2 depthwise convolution.
# 2. With a zero residual branch each block returns its input times `skip_scale`: after 20 DDPM++
#    blocks the signal is scaled by $2^{-10} \approx 10^{-3}$ unless the branches learn to add
#    variance — the $1/\sqrt2$ keeps unit variance when the branch and the skip contribute equally.
#    ADM's blocks keep the scale at initialisation and rely on normalisation inside the branch.
# 3. $p_\text{train}$ moves to σ ≈ 2.7, so fewer training samples fall at small and
#    intermediate σ: expect the ratio to the floor to grow there and to shrink slightly at large σ.
#    This is the paper's argument for centring $p_\text{train}$ where the loss can actually be reduced.
# :::
