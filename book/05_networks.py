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
# so its pretrained weights load unchanged (Appendix B loads the official `.pkl` snapshots
# *safely*, without running the code those files carry). The last section trains a small
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
# ## 5.8 Training against a known floor
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
# Loading official snapshots and our own checkpoint format: Appendix B (`edm_lit.checkpoints`).
#
# ## Exercises
#
# 1. The box filter `[1, 1]` makes down-sampling an average over 2×2 pixels. What does
#    `[1, 3, 3, 1]` compute, and why might NCSN++ prefer it?
# 2. DDPM++ multiplies every residual sum by $1/\sqrt2$; ADM does not. If the residual branch
#    starts at zero, what happens to the activations' scale after 20 blocks in each case?
# 3. In §5.8, train with `P_mean = 1.0` instead of −1.2. Where does the gap to the floor grow?
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
