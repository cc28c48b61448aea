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
# so its pretrained weights load unchanged (Appendix A2 loads the official `.pkl` snapshots
# *safely*, without running the code those files carry). The last two sections train small
# networks: one against a loss floor we know exactly, one on real (if tiny) images, the
# handwritten digits that ship with scikit-learn.

# %% tags=["export"]
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.functional import silu

# %%
import time

import matplotlib.pyplot as plt
import torch
from myst_nb import glue

from edm_lit.mode import get_mode

MODE = get_mode()
if MODE.quick:
    torch.set_num_threads(1)  # quick mode's tensors are small: one thread is as fast, and immune to a busy machine
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
# it is a pure resampler without weights. `fused_resample=True` changes the order of the two
# steps. Down-sampling then convolves at full resolution first (padded by what both filters need)
# and filters and decimates afterwards; NCSN++'s image path (§5.5) uses this form. Up-sampling
# first makes the *whole* up-sampled image, every pixel the filter touches ($2H + K - 2$ a side
# for a filter of $K$ taps), trims or zero-pads it to $2H + k - 1$ for a $k \times k$ kernel, and
# then convolves without padding, so that the output is $2H \times 2W$ like the unfused layer
# (no configuration of the paper uses it; the tests compare it with the official layer). For the box
# filter we take a cheaper route to the same numbers: `avg_pool2d` for
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
        f2d = (torch.outer(f, f) / f.sum().square())[None, None]  # [1, 1, K, K], sums to 1
        self.register_buffer("resample_filter", f2d if up or down else None)
        taps = [float(t) for t in resample_filter]  # (from the list: the buffer may live on the meta device)
        self._box = bool(up or down) and len(taps) == 2 and taps[0] == taps[1]

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        f = self.resample_filter  # a loaded filter decides again whether the box shortcut applies
        self._box = f is not None and f.shape[-1] == 2 and bool((f == 0.25).all())

    def _resample(self, x, pad):
        """Up- (zero-stuffing, filter x 4) or down-sampling (filter, stride 2) of every channel by the FIR filter."""
        f, channels = self.resample_filter.to(x.dtype), x.shape[1]
        if self._box and pad == 0:  # the 2x2 box: nearest-neighbour repetition or 2x2 averaging
            return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) if self.up else F.avg_pool2d(x, 2)
        if self.up:
            return F.conv_transpose2d(x, 4 * f.expand(channels, 1, -1, -1), stride=2, padding=pad, groups=channels)
        return F.conv2d(x, f.expand(channels, 1, -1, -1), stride=2, padding=pad, groups=channels)

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
        if self.down:  # convolve at full resolution over the support both filters need, then filter and decimate
            y = self._resample(F.conv2d(x, w, padding=k_w // 2 + (k_f - 1) // 2), 0)
        else:  # up-sample to the full support (2H + k_f - 2), trim or pad it to 2H + k_w - 1, convolve 'valid'
            full = self._resample(x, 0)
            y = F.conv2d(F.pad(full, [k_w // 2 - (k_f - 1) // 2] * 4), w)
        return y if b is None else y + b[:, None, None]


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
# the zero-padded border). With or without fusing, 8×8 becomes 16×16 or 4×4.

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
for taps in ([1, 1], [1, 3, 3, 1]):  # fused or not, a resampling convolution doubles or halves the size exactly
    for fused in (False, True):
        assert Conv2d(4, 6, 3, up=True, resample_filter=taps, fused_resample=fused)(x).shape == (2, 6, 16, 16)
        assert Conv2d(4, 6, 3, down=True, resample_filter=taps, fused_resample=fused)(x).shape == (2, 6, 4, 4)

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
def _cos_sin(c: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """[cos(omega_i c_n), sin(omega_i c_n)] for a batch of scalars c [N] and frequencies omega [n]: [N, 2n]."""
    angles = c[:, None] * omega.to(c.dtype)[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding [cos(w_i c), sin(w_i c)] with w_i = (1/max_positions)^(i/n'). Chapter 5."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        n = self.num_channels // 2
        steps = n - 1 if self.endpoint else n  # endpoint: the last frequency is exactly 1/max_positions
        return _cos_sin(x, (1 / self.max_positions) ** (torch.arange(n, dtype=torch.float32, device=x.device) / steps))


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi f_i c), sin(2 pi f_i c)], f_i ~ N(0, scale^2) kept in buffer `freqs`. Chapter 5."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", scale * torch.randn(num_channels // 2))  # drawn once, saved with the weights

    def forward(self, x):
        return _cos_sin(x, 2 * math.pi * self.freqs)


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
        init_attn = init if init_attn is None else dict(init_attn)
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = heads if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        sampling = dict(up=up, down=down, resample_filter=resample_filter)
        # the residual branch, in the order the data flows through it (steps 1-3 of §5.3)
        self.norm0, self.conv0 = GroupNorm(in_channels, eps=eps), Conv2d(in_channels, out_channels, 3, **sampling, **init)
        self.affine = Linear(emb_channels, (2 if adaptive_scale else 1) * out_channels, **init)
        self.norm1, self.conv1 = GroupNorm(out_channels, eps=eps), Conv2d(out_channels, out_channels, 3, **init_zero)
        # the shortcut (step 4 of §5.3): identity unless the block changes the shape
        reshapes = up or down or in_channels != out_channels
        projects = resample_proj or in_channels != out_channels
        self.skip = Conv2d(in_channels, out_channels, 1 if projects else 0, **sampling, **init) if reshapes else None
        if self.num_heads:  # attention (step 5 of §5.3)
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv, self.proj = Conv2d(out_channels, 3 * out_channels, 1, **init_attn), \
                Conv2d(out_channels, out_channels, 1, **init_zero)

    def _condition(self, h, emb):
        """Step 2: the embedding added to the features, or as a per-channel scale and shift of norm1's output."""
        e = self.affine(emb).to(h.dtype)[..., None, None]
        if not self.adaptive_scale:
            return silu(self.norm1(h + e))
        scale, shift = e.chunk(2, dim=1)
        return silu(torch.addcmul(shift, self.norm1(h), 1 + scale))

    def forward(self, x, emb):
        shortcut = x if self.skip is None else self.skip(x)
        h = self._condition(self.conv0(silu(self.norm0(x))), emb)
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training) if self.dropout else h)
        out = (h + shortcut) * self.skip_scale
        if self.num_heads:
            mixed = attention(self.qkv(self.norm2(out)), self.num_heads)
            out = (out + self.proj(mixed)) * self.skip_scale
        return out


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
# ## 5.4 The plan of a U-Net: the level table
#
# The U-Net has an **encoder** that halves the resolution level by level and a **decoder** that
# doubles it back, with *skip connections* handing every encoder output to the decoder at the
# same resolution, where it is concatenated to the decoder's input. Everything about its shape
# follows from a small table with one row per **level** $\ell = 0, 1, \dots$ (one entry of
# `channel_mult` each):
#
# | column | value |
# |---|---|
# | resolution | $r = R / 2^\ell$ (`img_resolution` $= R$) |
# | channels | `model_channels * channel_mult[ℓ]` |
# | blocks | `num_blocks` in the encoder, one more in the decoder |
# | attention | whether $r$ is in `attn_resolutions` |
#
# Two builders walk the table. The **encoder**, top to bottom: a level starts with a 3×3
# convolution `conv` (level 0, lifting the image to the first width) or a down-sampling block
# `down` (deeper levels, keeping the width), then `num_blocks` blocks `block0, block1, …`, which
# move to the level's width. Every module of the encoder hands its output to the decoder. The
# **decoder**, bottom to top: a level starts with two blocks `in0` (with attention) and `in1`
# at the bottom or an up-sampling block `up` elsewhere, then `num_blocks + 1` blocks that each
# take the next handed-over tensor (the last one handed over first) concatenated to their input.
# That is one block per hand-over: the stack is empty at the end.
#
# The **naming rule** of the official code gives each module the key `{r}x{r}_{role}` in the
# encoder's or the decoder's `ModuleDict` (`enc`, `dec`), and these keys are the prefixes of the
# `state_dict()`: e.g. `enc.16x16_block0.conv0.weight` is the first convolution of the first
# encoder block at 16×16. So the level table and the naming rule together *are* the list of
# weights that an official checkpoint carries.

# %% tags=["export"]
class Level(NamedTuple):
    """One row of a U-Net's level table. Chapter 5."""

    index: int  # 0 = full resolution
    resolution: int  # img_resolution / 2^index
    channels: int  # model_channels * channel_mult[index]
    num_blocks: int  # encoder blocks; the decoder has one more
    attention: bool  # resolution in attn_resolutions


def unet_levels(img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions) -> list[Level]:
    """The level table of a U-Net, one row per resolution, from the constructor arguments. Chapter 5."""
    depth = len(channel_mult)
    if depth < 1:
        raise ValueError("channel_mult must name at least one level, got an empty list")
    if img_resolution % 2 ** (depth - 1):
        raise ValueError(f"img_resolution must be divisible by 2^(len(channel_mult) - 1) = {2 ** (depth - 1)}, "
                         f"got {img_resolution}")
    rows = []
    for index, mult in enumerate(channel_mult):
        r = img_resolution // 2**index
        rows.append(Level(index, r, model_channels * mult, num_blocks, r in attn_resolutions))
    return rows


def level_key(level: Level, role: str) -> str:
    """The naming rule of the official code: a module's key in `enc`/`dec` is '{r}x{r}_{role}'. Chapter 5."""
    return f"{level.resolution}x{level.resolution}_{role}"


def decoder_roles(level: Level, levels: list[Level]) -> tuple[list[str], list[str]]:
    """A decoder level's modules: how it enters (in0/in1 at the bottom, up elsewhere), then its blocks. Chapter 5."""
    entry = ["in0", "in1"] if level.index == len(levels) - 1 else ["up"]
    return entry, [f"block{i}" for i in range(level.num_blocks + 1)]


# %% [markdown]
# **Look** — the level table of the paper's CIFAR-10 network (DDPM++, 32×32) and of its
# ImageNet-64 network (ADM), printed from `unet_levels`, and the U-Net the builders make from the
# first one. Each box is one module (its role; the key is `{r}x{r}_{role}`), grey lines are the
# hand-overs from encoder to decoder, and the embedding vector computed from σ (and the labels)
# goes into every block.

# %%
cifar_levels = unet_levels(32, 128, [2, 2, 2], 4, [16])
imagenet_levels = unet_levels(64, 192, [1, 2, 3, 4], 3, [32, 16, 8])
for title, levels in [("CIFAR-10 DDPM++ / NCSN++", cifar_levels), ("ImageNet-64 ADM", imagenet_levels)]:
    print(f"{title}\n{'level':>5} {'resolution':>10} {'channels':>8} {'enc. blocks':>11} {'dec. blocks':>11} attention")
    for lv in levels:
        print(f"{lv.index:>5} {lv.resolution:>10} {lv.channels:>8} {lv.num_blocks:>11} {lv.num_blocks + 1:>11} "
              f"{'yes' if lv.attention else 'no'}")
assert [lv.resolution for lv in imagenet_levels] == [64, 32, 16, 8] and not imagenet_levels[0].attention


# %%
def draw_unet(levels, ax, attention_in_decoder="last", head="aux_norm → aux_conv"):
    """The U-Net of a level table: encoder (left, going down), decoder (right, going up), hand-overs (grey)."""
    most = max(lv.num_blocks for lv in levels) + 1
    right = 2 * most + len(levels) + 2  # x of the decoder's last module at full resolution
    boxes, order, handed, pairs = {}, [], [], []
    for lv in levels:  # the encoder builder's walk: one box per module, pushing each output
        for i, role in enumerate(["conv" if lv.index == 0 else "down"] + [f"block{i}" for i in range(lv.num_blocks)]):
            key = ("enc", level_key(lv, role))
            boxes[key] = (lv.index + i, -lv.index, lv.attention and role.startswith("block"))
            order.append(key)
            handed.append(key)
    for lv in reversed(levels):  # the decoder builder's walk: each block pops one hand-over
        entry, blocks = decoder_roles(lv, levels)
        for j, role in enumerate(entry + blocks):
            key = ("dec", level_key(lv, role))
            attn = role == "in0" or (role in blocks and lv.attention
                                     and (role == blocks[-1] or attention_in_decoder == "all"))
            boxes[key] = (right - lv.index - (len(entry + blocks) - 1 - j), -lv.index, attn)
            order.append(key)
            if role in blocks:
                pairs.append((handed.pop(), key))
    for a, b in zip(order, order[1:]):  # the main path
        ax.plot([boxes[a][0], boxes[b][0]], [boxes[a][1], boxes[b][1]], color="k", lw=0.8, zorder=1)
    for src, dst in pairs:  # the hand-overs, concatenated to the decoder block's input
        (x0, y0, _), (x1, y1, _) = boxes[src], boxes[dst]
        ax.annotate("", xy=(x1, y1 + 0.12), xytext=(x0, y0 + 0.12), zorder=0, arrowprops=dict(
            arrowstyle="-|>", color="0.65", lw=0.6, shrinkA=4, shrinkB=4, connectionstyle="arc3,rad=-0.08"))
    for (side, key), (x, y, attn) in boxes.items():
        role = key.split("_", 1)[1]
        color = "0.45" if role == "conv" else "C3" if role in ("down", "up") else "C1" if attn else "C0"
        ax.text(x, y, role, ha="center", va="center", fontsize=7, color="white", zorder=2,
                bbox=dict(boxstyle="round,pad=0.3", fc=color, ec="none"))
    for lv in levels:
        ax.text(-1, -lv.index, f"{lv.resolution}×{lv.resolution}, {lv.channels} ch", ha="right", va="center", fontsize=8)
    ax.annotate("x", xy=(0, 0.1), xytext=(0, 0.55), ha="center", fontsize=9, arrowprops=dict(arrowstyle="->"))
    ax.text(right + 0.6, 0, f"→ {head} → F(x)", va="center", fontsize=8)
    ax.text(right / 2, -len(levels) + 0.35, "σ (and labels) → mapping network → emb, an input of every block",
            ha="center", fontsize=8, bbox=dict(boxstyle="round", fc="#eef", ec="0.7"))
    ax.set(xlim=(-3.5, right + 4.5), ylim=(-len(levels) + 0.1, 0.7))
    ax.axis("off")
    return boxes, pairs


fig, ax = plt.subplots(figsize=(13, 3.8))
boxes, pairs = draw_unet(cifar_levels, ax)
legend = [plt.Rectangle((0, 0), 1, 1, fc=c) for c in ["0.5", "C0", "C1", "C3"]]
_ = ax.legend(legend, ["3×3 convolution", "UNetBlock", "UNetBlock with attention", "down / up-sampling block"],
              loc="lower center", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.1))
_ = ax.set_title("DDPM++ for CIFAR-10 (32×32), drawn from its level table: encoder left, decoder right")
handovers = sum(lv.num_blocks + 1 for lv in cifar_levels)
print(f"{sum(1 for side, _ in boxes if side == 'enc')} encoder modules, "
      f"{sum(1 for side, _ in boxes if side == 'dec')} decoder modules, {len(pairs)} hand-overs")
assert len(pairs) == handovers and all(src[1].split("_")[0] == dst[1].split("_")[0] for src, dst in pairs)

# %% [markdown]
# The check under the figure is the claim of the text: every hand-over joins two modules of the
# same resolution (the key prefixes agree), and there is exactly one per decoder block.
#
# ## 5.5 DDPM++ and NCSN++: `SongUNet`
#
# DDPM++ and NCSN++ fill the plan with the block of §5.3 configured as in Song et al.: one
# attention head, skip scale $1/\sqrt2$, the embedding added to the features, Xavier-uniform
# initialisation with the output layer at $10^{-5}$. In the decoder only the *last* block of a
# level with attention has it. At full resolution the output layers `aux_norm` → SiLU →
# `aux_conv` (3×3) make the $F_\theta$ of Eq. 7. The two networks differ in four arguments:
#
# | | DDPM++ (VP) | NCSN++ (VE) |
# |---|---|---|
# | `embedding_type` | `positional` | `fourier` |
# | `channel_mult_noise` | 1 | 2 |
# | `encoder_type` | `standard` | `residual`: an extra path down-samples the *input image* and adds it at every level (`{r}x{r}_aux_residual`) |
# | `resample_filter` | `[1, 1]` | `[1, 3, 3, 1]` |
#
# NCSN++'s image path is a 3×3 convolution that down-samples (with `fused_resample=True`, §5.1):
# at each deeper level it brings the previous level's image path to the new width, and the two
# paths are averaged with the variance-keeping factor $1/\sqrt2$; both continue from the average.
# `encoder_type='skip'` and `decoder_type='skip'` are the progressive-growing variants of the
# original code (an image path that is projected and added, an output at every level that is
# up-sampled and summed); the paper's configurations do not use them, but they are here and
# checked like the others. The constructor's arguments and defaults are the official ones.

# %% tags=["export"]
def _init_scheme(mode, weight=1.0, bias=0.0) -> dict:
    """Layer keyword arguments of an initialisation: the scheme and the factors on the weights and the biases."""
    return dict(init_mode=mode, init_weight=weight, init_bias=bias)


def _init_kwargs(local_vars: dict) -> dict:
    """The constructor arguments, from `locals()` at the top of __init__ (sequences copied to lists)."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in local_vars.items()
            if k not in ("self", "__class__")}


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _label_input(class_labels, layer, dropout, training, batch):
    """Class labels for the embedding; in training, each image's label is zeroed with probability `dropout`."""
    if class_labels is None:
        raise ValueError(f"class_labels are required: the network has label_dim={layer.in_features}")
    if training and dropout:
        kept = torch.rand([batch, 1], device=class_labels.device) >= dropout
        return class_labels * kept.to(class_labels.dtype)
    return class_labels


class _LevelUNet(torch.nn.Module):
    """What SongUNet and DhariwalUNet share: encoder and decoder built level by level from the level table."""

    @property
    def levels(self) -> list[Level]:
        """The level table the network was built from."""
        return [Level(*row) for row in self._level_rows]

    def _build(self, levels, in_channels, stem_channels, make_block, make_stem, decoder_attention,
               encoder_extra=None, decoder_extra=None):
        """Fill `enc` and `dec` walking the level table; returns the channels of the decoder's output."""
        self._level_rows = [tuple(lv) for lv in levels]  # plain tuples: the module's state pickles without our types
        self.enc, self.dec = torch.nn.ModuleDict(), torch.nn.ModuleDict()
        handed = []  # channels of each encoder output handed to the decoder (a stack)
        c = in_channels
        for lv in levels:
            if lv.index == 0:
                self.enc[level_key(lv, "conv")] = make_stem(c, stem_channels)
                c = stem_channels
            else:
                self.enc[level_key(lv, "down")] = make_block(c, c, down=True)
                if encoder_extra is not None:
                    encoder_extra(lv, c)
            handed.append(c)
            for i in range(lv.num_blocks):
                self.enc[level_key(lv, f"block{i}")] = make_block(c, lv.channels, attention=lv.attention)
                c = lv.channels
                handed.append(c)
        for lv in reversed(levels):
            entry, blocks = decoder_roles(lv, levels)
            for role in entry:
                self.dec[level_key(lv, role)] = make_block(c, c, up=role == "up", attention=role == "in0")
            for i, role in enumerate(blocks):
                last = i == len(blocks) - 1
                attn = lv.attention and (last or decoder_attention == "all")
                self.dec[level_key(lv, role)] = make_block(c + handed.pop(), lv.channels, attention=attn)
                c = lv.channels
            if decoder_extra is not None:
                decoder_extra(lv, c)
        return c

    def _encode(self, x, emb, join_image=None):
        """The encoder: returns the bottom features and the stack of outputs handed to the decoder."""
        handed, image = [], x
        for lv in self.levels:
            if lv.index == 0:
                x = self.enc[level_key(lv, "conv")](x)
            else:
                x = self.enc[level_key(lv, "down")](x, emb)
                if join_image is not None:
                    x, image = join_image(lv, x, image)
            handed.append(x)
            for i in range(lv.num_blocks):
                x = self.enc[level_key(lv, f"block{i}")](x, emb)
                handed.append(x)
        return x, handed

    def _decode(self, x, emb, handed, after_level=None):
        """The decoder: every block takes the next handed-over tensor concatenated to its input."""
        out, levels = None, self.levels
        for lv in reversed(levels):
            entry, blocks = decoder_roles(lv, levels)
            for role in entry:
                x = self.dec[level_key(lv, role)](x, emb)
            for role in blocks:
                x = self.dec[level_key(lv, role)](torch.cat([x, handed.pop()], dim=1), emb)
            if after_level is not None:
                out = after_level(lv, x, out)
        return x, out


class SongUNet(_LevelUNet):
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
        levels = unet_levels(img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions)
        super().__init__()
        self.init_kwargs = init_kwargs
        self.label_dropout, self.encoder_type = label_dropout, encoder_type
        # DDPM++/NCSN++ initialisation: Xavier-uniform; output layers at 1e-5; the attention's qkv at sqrt(0.2)
        init = _init_scheme("xavier_uniform")
        out_init, qkv_init = _init_scheme("xavier_uniform", 1e-5), _init_scheme("xavier_uniform", math.sqrt(0.2))
        noise_channels, emb_channels = model_channels * channel_mult_noise, model_channels * channel_mult_emb

        # the mapping network: noise level (+ class and augmentation labels) -> the vector every block receives
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        def make_block(cin, cout, up=False, down=False, attention=False):
            return UNetBlock(cin, cout, emb_channels, up=up, down=down, attention=attention, num_heads=1,
                             dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                             resample_proj=True, adaptive_scale=False, init=init, init_zero=out_init,
                             init_attn=qkv_init)

        image_channels = [in_channels]  # channels of the image path of the 'residual' encoder

        def image_path(lv, c):  # NCSN++'s residual / the progressive encoder: the input image, down-sampled
            if encoder_type == "skip":
                self.enc[level_key(lv, "aux_down")] = Conv2d(in_channels, in_channels, 0, down=True,
                                                             resample_filter=resample_filter)
                self.enc[level_key(lv, "aux_skip")] = Conv2d(in_channels, c, 1, **init)
            elif encoder_type == "residual":
                self.enc[level_key(lv, "aux_residual")] = Conv2d(image_channels[-1], c, 3, down=True, fused_resample=True,
                                                                 resample_filter=resample_filter, **init)
                image_channels.append(c)

        def image_out(lv, c):  # the output layers: at full resolution, or at every level (progressive decoder)
            if decoder_type == "skip" or lv.index == 0:
                if decoder_type == "skip" and lv.index < len(levels) - 1:
                    self.dec[level_key(lv, "aux_up")] = Conv2d(out_channels, out_channels, 0, up=True,
                                                               resample_filter=resample_filter)
                self.dec[level_key(lv, "aux_norm")] = GroupNorm(c, eps=1e-6)
                self.dec[level_key(lv, "aux_conv")] = Conv2d(c, out_channels, 3, **out_init)

        self._build(levels, in_channels, model_channels, make_block, lambda cin, cout: Conv2d(cin, cout, 3, **init),
                    decoder_attention="last", encoder_extra=image_path, decoder_extra=image_out)

    def _embedding(self, noise_labels, class_labels, augment_labels, batch):
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)  # the original DDPM++/NCSN++ code puts the sines first
        if self.map_label is not None:
            labels = _label_input(class_labels, self.map_label, self.label_dropout, self.training, batch)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def _join_image(self, lv, x, image):
        """Encoder, after a level's down-sampling block: the image path meets the features."""
        if self.encoder_type == "residual":  # average of the two paths, variance kept: both continue from here
            x = (x + self.enc[level_key(lv, "aux_residual")](image)) * math.sqrt(0.5)
            return x, x
        image = self.enc[level_key(lv, "aux_down")](image)  # 'skip': the down-sampled image, projected and added
        return x + self.enc[level_key(lv, "aux_skip")](image), image

    def _image_out(self, lv, x, out):
        """Decoder, after a level: the output layers where there are any (and the up-sampled coarser output)."""
        if level_key(lv, "aux_conv") not in self.dec:
            return out
        y = self.dec[level_key(lv, "aux_conv")](silu(self.dec[level_key(lv, "aux_norm")](x)))
        return y if out is None else y + self.dec[level_key(lv, "aux_up")](out)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embedding(noise_labels, class_labels, augment_labels, x.shape[0])
        x, handed = self._encode(x, emb, None if self.encoder_type == "standard" else self._join_image)
        return self._decode(x, emb, handed, after_level=self._image_out)[1]


# %% [markdown]
# **Check — parity with the official code.** `book/data/precond_edm.pt` holds the weights of a
# small DDPM++ network made by the official implementation (16×16, `model_channels=16`, two
# levels, attention at 8×8, 10 classes, 9 augmentation labels) and what its inner network
# returned for given inputs. We build ours with the same arguments, load the official
# `state_dict` with `strict=True` (every key present, none extra, every shape equal) and compare.

# %%
from pathlib import Path

DATA = Path("data")
PARITY = torch.load(DATA / "precond_edm.pt", weights_only=True)
model_kwargs = {k: v for k, v in PARITY["kwargs"].items() if k not in ("img_channels", "model_type")}
small = SongUNet(in_channels=3, out_channels=3, **model_kwargs).eval()
small.load_state_dict({k.removeprefix("model."): v for k, v in PARITY["state_dict"].items()}, strict=True)
with torch.no_grad():
    ours = small(PARITY["model_in_x"], PARITY["model_in_noise_labels"], PARITY["model_in_class_labels"])
    ours_aug = small(PARITY["model_in_x"], PARITY["model_in_noise_labels"], PARITY["model_in_class_labels"],
                     augment_labels=PARITY["augment_labels"])
parity_errors = {}
for name, got, ref in [("DDPM++", ours, PARITY["model_out"]),
                       ("DDPM++, augment labels", ours_aug, PARITY["model_out_with_augment_labels"])]:
    parity_errors[name] = ((got - ref).abs().max() / ref.abs().max()).item()
n_small = sum(p.numel() for p in small.parameters())
assert n_small == PARITY["num_params"] and len(small.state_dict()) == len(PARITY["state_dict"]) == 149
print(f"{len(small.state_dict())} state_dict keys, {n_small:,} parameters — as the official network")

# %% [markdown]
# The same for NCSN++ and the progressive variants. `book/data/network_refs.pt` was made by
# `book/data/make_network_refs.py`, which runs the official networks on small configurations
# (NCSN++ with the settings of the official `train.py`, 16×16, three levels) after setting
# *every* parameter to seeded random values — the official initialisation makes the output
# layer (almost) zero, and a zero output would prove nothing. The file keeps the parameter
# names and shapes and the seed; `random_state` of the same script rebuilds the values.

# %%
import importlib.util

spec = importlib.util.spec_from_file_location("make_network_refs", DATA / "make_network_refs.py")
make_network_refs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_network_refs)
NET_REFS = torch.load(DATA / "network_refs.pt", weights_only=True)


def official_twin(name, cls):
    """Our network (class `cls`) for a case of network_refs.pt, with the official run's parameters; its parity error."""
    ref = NET_REFS[name]
    assert ref["class_name"] == cls.__name__
    net = cls(**ref["kwargs"]).eval()
    params = make_network_refs.random_state(ref["param_shapes"], ref["seed"])
    net.load_state_dict({**params, **ref["buffers"]}, strict=True)
    assert list(net.state_dict()) == ref["state_dict_keys"]  # the same keys in the same order
    with torch.no_grad():
        runs = [(net(ref["x"], ref["noise_labels"], ref["class_labels"]), ref["out"])]
        if "augment_labels" in ref:
            runs.append((net(ref["x"], ref["noise_labels"], ref["class_labels"], ref["augment_labels"]),
                         ref["out_with_augment_labels"]))
    return net, max(((a - b).abs().max() / b.abs().max()).item() for a, b in runs)


for name, label in [("ncsnpp", "NCSN++"), ("songunet_skip", "SongUNet, skip encoder and decoder")]:
    _, parity_errors[label] = official_twin(name, SongUNet)
for name, err in parity_errors.items():
    print(f"{name:36s} max|ours - official| / max|official| = {err:.1e}")
assert max(parity_errors.values()) <= 1e-5

# %% [markdown]
# ## 5.6 ADM: `DhariwalUNet`
#
# The ImageNet network fills the same plan with different choices: ADM's initialisation
# (Kaiming-uniform scaled by $\sqrt{1/3}$, output layers exactly zero), adaptive scale/shift in
# every block, no $1/\sqrt2$ on the skips, multi-head attention with 64 channels per head (a
# level narrower than 64 channels gets none) in *every* block of the attention levels, a
# first convolution straight to the first level's width, a plain encoder, the embedding layers in
# a slightly different order (the class label is added after `map_layer1`, through a bias-free
# layer), and a final `out_norm` → SiLU → `out_conv` after the decoder instead of the `aux`
# output layers. The paper's ImageNet-64 model is ADM with 192 channels, multipliers
# $[1, 2, 3, 4]$ and 3 blocks per level.

# %% tags=["export"]
class DhariwalUNet(_LevelUNet):
    """ADM U-Net of Dhariwal & Nichol (2021), official constructor arguments and state_dict keys. Chapter 5.

    forward(x, noise_labels, class_labels, augment_labels=None) returns F(x) with out_channels channels.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0):
        init_kwargs = _init_kwargs(locals())
        levels = unet_levels(img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions)
        super().__init__()
        self.init_kwargs = init_kwargs
        self.label_dropout = label_dropout
        # ADM initialisation: Kaiming-uniform times sqrt(1/3) on weights and biases; output layers exactly zero
        init, zero = _init_scheme("kaiming_uniform", math.sqrt(1 / 3), math.sqrt(1 / 3)), _init_scheme("kaiming_uniform", 0, 0)
        emb_channels = model_channels * channel_mult_emb

        # the mapping network; the class label joins after map_layer1, through a bias-free layer
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, **_init_scheme("kaiming_normal", math.sqrt(label_dim)))
                          if label_dim else None)

        def make_block(cin, cout, up=False, down=False, attention=False):
            return UNetBlock(cin, cout, emb_channels, up=up, down=down, attention=attention, channels_per_head=64,
                             dropout=dropout, init=init, init_zero=zero)

        c = self._build(levels, in_channels, levels[0].channels, make_block,
                        lambda cin, cout: Conv2d(cin, cout, 3, **init), decoder_attention="all")
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, 3, **zero)

    def _embedding(self, noise_labels, class_labels, augment_labels, batch):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_label_input(class_labels, self.map_label, self.label_dropout, self.training,
                                                    batch))
        return silu(emb)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embedding(noise_labels, class_labels, augment_labels, x.shape[0])
        x, handed = self._encode(x, emb)
        x = self._decode(x, emb, handed)[0]
        return self.out_conv(silu(self.out_norm(x)))


# %% [markdown]
# **Check — parity with the official code**, as for NCSN++: a small ADM (16×16, three levels of
# 32, 64 and 128 channels, attention at all three — so 0, 1 and 2 heads —, 4 classes, 2
# augmentation labels) with seeded random weights.

# %%
adm_small, parity_errors["ADM"] = official_twin("adm", DhariwalUNet)
heads = {key: block.num_heads for key, block in adm_small.enc.items() if isinstance(block, UNetBlock)}
print(f"ADM: max|ours - official| / max|official| = {parity_errors['ADM']:.1e}; heads per encoder block: {heads}")
assert parity_errors["ADM"] <= 1e-5 and sorted(set(heads.values())) == [0, 1, 2]
glue("parity_worst", max(parity_errors.values()), display=False)

# %% [markdown]
# ## 5.7 The paper's networks, counted
#
# The paper's configurations (App. F.2, Table 7 and the official presets): CIFAR-10 at 32×32
# with `model_channels=128`, `channel_mult=[2, 2, 2]`, 4 blocks, attention at 16×16, dropout
# 0.13, 10 classes and 9 augmentation labels; ImageNet-64 ADM with 192 channels,
# `channel_mult=[1, 2, 3, 4]`, 3 blocks, attention at 32, 16 and 8, 1000 classes. We build them
# inside the EDM preconditioner on PyTorch's `meta` device — shapes without memory, so even the
# 296-million-parameter ADM costs nothing — and count. The official parameter counts are
# 55,735,299, 56,400,643 and 295,899,267. We also check that the diagram of §5.4 shows the
# modules of the CIFAR-10 DDPM++, in their order, and nothing else (but for its output layers).

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
shapes, built = {}, {}
for name, (kwargs, official) in paper.items():
    with torch.device("meta"):
        net = built[name] = EDMPrecond(**kwargs)
    count = sum(p.numel() for p in net.parameters())
    shapes[name] = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    print(f"{name:25s} {count:>13,} parameters (official {official:,}), {len(shapes[name])} state_dict keys")
    assert count == official
cifar = built["CIFAR-10 DDPM++ (cond.)"].model  # the diagram of §5.4 shows exactly the modules the builders made
drawn = {side: [key for s, key in boxes if s == side] for side in ("enc", "dec")}
assert drawn["enc"] == list(cifar.enc) and drawn["dec"] == [k for k in cifar.dec if "aux" not in k]

# %% [markdown]
# §5.6 checked a small ADM against the official outputs; for the full ImageNet model we
# spot-check the key names and shapes that the level table and naming rule of §5.4 predict: the
# bias-free class embedding, the stored box filter of a down-sampling block, 6 heads of 64
# channels at 32×32 (so `qkv` has
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
# ## 5.8 Precision: float16 and bfloat16
#
# Every layer above computes in the dtype of its *input* and casts its weights to it. That is
# the official `use_fp16` mechanism: the preconditioner (Chapter 4) casts the network input to
# float16 when `use_fp16=True` and the device is a GPU, the layers follow, while the embedding
# (computed from float32 noise labels) stays in float32 and the weights, their gradients and the
# optimiser stay in float32. The alternative, `torch.autocast(device_type, dtype=torch.bfloat16)`
# around the forward pass, lets PyTorch choose the precision per operation (convolutions and
# matrix products in bfloat16). The speed-up is a GPU matter; here we check that both paths run
# and measure how far each is from float32, as a fraction of the output's scale: float16
# {glue:text}`err_fp16:.1e`, bfloat16 {glue:text}`err_bf16:.1e`. bfloat16 keeps 8 bits of
# mantissa where float16 keeps 11, so it should be several times further off, and it is.

# %%
args = (PARITY["model_in_x"], PARITY["model_in_noise_labels"], PARITY["model_in_class_labels"])
with torch.no_grad():
    ref = small(*args)
    out_fp16 = small(args[0].half(), *args[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = small(*args)
precision_err = {}
for name, out in [("float16 input", out_fp16), ("bfloat16 autocast", out_bf16)]:
    precision_err[out.dtype] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    print(f"{name:18s} output {out.dtype}, max error / max|output| = {precision_err[out.dtype]:.1e}")
err16, err_bf16 = precision_err[torch.float16], precision_err[torch.bfloat16]
print(f"bfloat16 error / float16 error = {err_bf16 / err16:.1f}")
assert err16 < 4e-3 and err_bf16 < 4e-2 and 3 < err_bf16 / err16 < 30
glue("err_fp16", err16, display=False)
glue("err_bf16", err_bf16, display=False)

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
# standard deviation, Adam. Quick mode trains briefly on a CPU (the cell prints for how long).

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
data_mean = (gm.weights.reshape(-1, 1, 1, 1) * gm.means).sum(0)
denoiser.eval()
with torch.no_grad():
    for s in sigma_eval:
        y = gm.sample(n_eval, generator=eval_gen)
        x = y + s * torch.randn(y.shape, generator=eval_gen, dtype=torch.float64)
        D = denoiser(x.float().to(MODE.device), s.float().expand(n_eval).to(MODE.device)).double().cpu()
        trained.append((loss_fn.weight(s) * (D - y).square().mean()).item())
        floor.append((loss_fn.weight(s) * (gm.denoise(x, s) - y).square().mean()).item())
    # at the largest σ: how far the answer is from the data mean, relative to the data's own spread
    from_mean = ((D - data_mean).square().mean() / (y - data_mean).square().mean()).item()
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
# The trained network follows the floor closely where the task is easy: at small σ, where
# $D \approx \mathbf{x}$ is nearly right, and at large σ, where the noisy image says almost
# nothing and the best answer is close to the data mean. The gap is largest at intermediate σ
# (here at σ = {glue:text}`floor_worst_sigma:.2f`): there the noisy image is still informative,
# but deciding *which* of the eight components it came from requires the network to have
# learned them well — exactly the intermediate range the paper identifies as the one where
# training effort matters.
#
# **Check** — what the run measured, and what is asserted about it:
#
# - the training loss over the last 100 steps is {glue:text}`floor_final_ratio:.3f` times the
#   floor averaged over $p_\text{train}$;
# - for σ in [0.2, 2] the trained loss is at most {glue:text}`floor_mid_excess:.1%` above the
#   floor (asserted below `MARGIN`: 30 % in quick mode, 20 % in full mode);
# - the excess over the floor at its worst is {glue:text}`floor_peak_vs_ends:.1f` times the
#   largest excess at the ends of the range (σ < 0.1 or σ > 10);
# - at σ = 50 the trained network's answer is as far from the data mean as
#   {glue:text}`floor_from_mean:.1%` of the data's own spread about it (mean squares): the
#   large-σ claim;
# - nowhere is the trained loss below the floor by more than the Monte Carlo error.

# %%
final = smooth[-1].item()
excess = ratio - 1
ends = (sigma_eval < 0.1) | (sigma_eval > 10)
mid = (sigma_eval >= 0.2) & (sigma_eval <= 2)
worst = sigma_eval[ratio.argmax()].item()
peak_vs_ends = (excess.max() / excess[ends].abs().max()).item()
MARGIN = MODE.pick(quick=0.3, full=0.2)
print(f"training loss over the last {window} steps {final:.4f}; floor averaged over p_train {floor_train:.4f} "
      f"(ratio {final / floor_train:.3f})")
print(f"sigma in [0.2, 2]: trained / floor at most {ratio[mid].max():.3f} (allowed 1 + {MARGIN}); largest gap at "
      f"sigma = {worst:.2f}, {peak_vs_ends:.1f} times the largest at the ends; smallest ratio {ratio.min():.3f}")
print(f"sigma = {sigma_eval[-1]:.0f}: mean square of D - data mean = {from_mean:.1%} of that of y - data mean")
assert 0.97 <= final / floor_train <= 1.15
assert (ratio[mid] <= 1 + MARGIN).all()
assert peak_vs_ends >= 3 and 0.2 <= worst <= 5
assert from_mean <= 0.1
assert (ratio >= 0.97).all()
for name, value in [("floor_final_ratio", final / floor_train), ("floor_mid_excess", ratio[mid].max().item() - 1),
                    ("floor_worst_sigma", worst), ("floor_peak_vs_ends", peak_vs_ends), ("floor_from_mean", from_mean)]:
    glue(name, value, display=False)

# %% [markdown]
# ## 5.10 A first network on real images: handwritten digits
#
# The mixture has a floor we can compute, but its samples are not pictures. scikit-learn ships a
# small real image set that needs no download: the UCI handwritten digits, greyscale images of
# 8×8 pixels with a few grey levels and a class label 0–9 each (the cell prints how many). We scale them to
# $[-1, 1]$ (the range the paper's image data uses) and train the same small `SongUNet` inside
# `EDMPrecond` with `EDMLoss` — now *class-conditional* (`label_dim=10`, the one-hot label enters
# the embedding of §5.2) — then draw samples with the deterministic sampler of Chapter 2
# (Algorithm 1, 18 steps) for each class.

# %%
from sklearn.datasets import load_digits

from edm_lit.samplers import edm_sampler

digits = load_digits()
images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1  # 0..16 -> [-1, 1]
labels = torch.nn.functional.one_hot(torch.as_tensor(digits.target), 10).float()
digit_sigma_data = images.std().item()
digit_steps, digit_batch, digit_lr = MODE.pick(quick=1000, full=20_000), 64, 2e-3
torch.manual_seed(0)
digit_net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, sigma_data=digit_sigma_data,
                       model_type="SongUNet", model_channels=MODE.pick(quick=16, full=64), channel_mult=[1, 2],
                       num_blocks=1, attn_resolutions=[4], dropout=0.0).to(MODE.device)
digit_loss = EDMLoss(sigma_data=digit_sigma_data)
digit_opt = torch.optim.Adam(digit_net.parameters(), lr=digit_lr)
batch_gen = torch.Generator().manual_seed(3)
digit_history = []
start = time.perf_counter()
for step in range(digit_steps):
    for group in digit_opt.param_groups:  # as in §5.9: constant, then a linear decay over the last 30 %
        group["lr"] = digit_lr * min(1.0, (digit_steps - step) / (0.3 * digit_steps))
    pick = torch.randint(len(images), (digit_batch,), generator=batch_gen)
    loss = digit_loss(digit_net, images[pick].to(MODE.device), labels[pick].to(MODE.device)).mean()
    digit_opt.zero_grad(set_to_none=True)
    loss.backward()
    digit_opt.step()
    digit_history.append(loss.item())
print(f"{len(images)} digits with {images.unique().numel()} grey levels, sigma_data = {digit_sigma_data:.3f}; {digit_steps} steps of {digit_batch} in "
      f"{time.perf_counter() - start:.0f} s; {sum(p.numel() for p in digit_net.parameters()):,} parameters")

# %%
per_class = 20
asked = torch.arange(10).repeat_interleave(per_class)
latents = torch.randn(len(asked), 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
digit_net.eval()
with torch.no_grad():
    samples = edm_sampler(digit_net, latents.to(MODE.device), torch.eye(10)[asked].to(MODE.device)).float().cpu()
shown = torch.nn.functional.pad(samples.clamp(-1, 1), [1, 1, 1, 1], value=-1)  # a white frame around each
shown = shown.reshape(10, per_class, 10, 10)[:, :12].permute(0, 2, 1, 3).reshape(100, 120)  # row = class asked for
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw=dict(width_ratios=[1.3, 1]))
ax1.imshow(shown, cmap="gray_r", vmin=-1, vmax=1)
ax1.set(title="samples: row k asked for digit k (0 at the top)", xticks=[], yticks=[])
ax1.grid(False)
levels_edges = torch.linspace(-1 - 1 / 16, 1 + 1 / 16, 18)  # one bin per grey level of the data
ax2.hist(images.flatten(), bins=levels_edges, density=True, alpha=0.6, label="training digits")
ax2.hist(samples.flatten().clamp(-1, 1), bins=levels_edges, density=True, alpha=0.6, label="samples (clamped)")
ax2.set(xlabel="pixel value", ylabel="density", title="pixel histogram", yscale="log")
_ = ax2.legend()
plt.tight_layout()

# %% [markdown]
# The rows should be recognisable digits of the class asked for. Two measurable checks: a
# classifier trained on the real digits (scikit-learn's logistic regression, which recognises
# {glue:text}`digit_clf_train:.1%` of the training images) assigns the class we asked for to
# {glue:text}`digit_clf_acc:.1%` of the samples, where guessing gives 10 %; and the samples' mean
# image is {glue:text}`digit_mean_err:.3f` away from the data's mean image (root mean square over
# the 64 pixels, on a scale where the pixels span 2), against {glue:text}`digit_mean_noise:.3f`
# between the mean images of two random halves of the data set of the samples' size.

# %%
from sklearn.linear_model import LogisticRegression

flat = images.reshape(len(images), -1).numpy()
classifier = LogisticRegression(max_iter=2000).fit(flat, digits.target)
clf_train = classifier.score(flat, digits.target)
clf_acc = classifier.score(samples.clamp(-1, 1).reshape(len(asked), -1).numpy(), asked.numpy())
mean_err = (samples.mean(0) - images.mean(0)).square().mean().sqrt().item()
halves = torch.randperm(len(images), generator=torch.Generator().manual_seed(5))[: 2 * len(asked)].chunk(2)
mean_noise = (images[halves[0]].mean(0) - images[halves[1]].mean(0)).square().mean().sqrt().item()
print(f"classifier: {clf_train:.1%} right on the training digits, {clf_acc:.1%} of the samples are the class asked for")
print(f"rms(mean image of samples - mean image of data) = {mean_err:.3f}; between two halves of the data {mean_noise:.3f}")
assert clf_acc >= 0.85
assert mean_err <= 1.5 * mean_noise
for name, value in [("digit_clf_train", clf_train), ("digit_clf_acc", clf_acc), ("digit_mean_err", mean_err),
                    ("digit_mean_noise", mean_noise)]:
    glue(name, value, display=False)

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.networks`:
#
# - layers with the official parameter names: `weight_init` (the four schemes), `Linear`,
#   `Conv2d` (with FIR up/down-sampling and the `resample_filter` buffer), `GroupNorm`,
#   `attention`, `UNetBlock`, and the noise embeddings `PositionalEmbedding`, `FourierEmbedding`;
# - the plan of a U-Net: the level table `unet_levels` (rows `Level`), the naming rule
#   `level_key` and the decoder's `decoder_roles`;
# - the architectures `SongUNet` (DDPM++ / NCSN++) and `DhariwalUNet` (ADM), built by walking the
#   level table, with the official constructor arguments and `state_dict()` keys: official weights
#   load with `strict=True`, and the outputs of DDPM++, NCSN++, the progressive variants and ADM
#   agree with the official ones to {glue:text}`parity_worst:.1e` of their scale (asserted
#   $\le 10^{-5}$); the parameter counts of the paper's three configurations are the official
#   ones. Both keep their constructor arguments in `init_kwargs`, compute in the input's dtype
#   (`use_fp16`) and run under bfloat16 autocast.
#
# Trained with `EDMLoss` (Chapter 4), a small DDPM++ gets close to the exact loss floor of a
# Gaussian mixture, and a class-conditional one draws recognisable handwritten digits.
#
# Loading official snapshots and our own checkpoint format: Appendix A2 (`edm_lit.checkpoints`).
#
# %% tags=["hide-cell"]
# numbers for the answers to the exercises, computed: 20 fresh blocks in a row, and p_train's median σ
def scale_after(blocks, x):
    with torch.no_grad():
        for block in blocks:
            x = block(x, torch.randn(x.shape[0], 16))
    return x.std().item()


torch.manual_seed(0)
probe = torch.randn(8, 32, 8, 8)
song_blocks = [UNetBlock(32, 32, 16, skip_scale=math.sqrt(0.5), adaptive_scale=False, eps=1e-6,
                         init=_init_scheme("xavier_uniform"), init_zero=_init_scheme("xavier_uniform", 1e-5))
               for _ in range(20)]
adm_blocks = [UNetBlock(32, 32, 16, init=_init_scheme("kaiming_uniform", math.sqrt(1 / 3), math.sqrt(1 / 3)),
                        init_zero=_init_scheme("kaiming_uniform", 0, 0)) for _ in range(20)]
exercise = {"ex_song_scale": scale_after(song_blocks, probe) / probe.std().item(),
            "ex_adm_scale": scale_after(adm_blocks, probe) / probe.std().item(),
            "ex_half_power": 2.0**-10, "ex_median_sigma": math.exp(1.0), "ex_median_sigma_edm": math.exp(-1.2)}
print({k: f"{v:.3g}" for k, v in exercise.items()})
assert abs(exercise["ex_song_scale"] / exercise["ex_half_power"] - 1) < 0.01 and abs(exercise["ex_adm_scale"] - 1) < 1e-6
for name, value in exercise.items():
    glue(name, value, display=False)

# %% [markdown]
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
#    blocks the signal is scaled by $(1/\sqrt2)^{20} = 2^{-10}$ = {glue:text}`ex_half_power:.2e`
#    (20 fresh DDPM++ blocks in a row, whose output layers start at $10^{-5}$, measured
#    {glue:text}`ex_song_scale:.2e`) unless the branches learn to add variance — the $1/\sqrt2$
#    keeps unit variance when the branch and the skip contribute equally. ADM's blocks keep the
#    scale at initialisation (measured {glue:text}`ex_adm_scale:.3f`) and rely on normalisation
#    inside the branch.
# 3. The median of $p_\text{train}$ moves from σ = {glue:text}`ex_median_sigma_edm:.2f` to
#    σ = {glue:text}`ex_median_sigma:.2f`, so fewer training samples fall at small and
#    intermediate σ: expect the ratio to the floor to grow there and to shrink slightly at large σ.
#    This is the paper's argument for centring $p_\text{train}$ where the loss can actually be reduced.
# :::
