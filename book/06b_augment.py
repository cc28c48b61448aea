# ---
# jupyter:
#   edm_lit:
#     export: augment
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
# # 6b. Non-leaking augmentation
#
# > To prevent potential overfitting that often plagues diffusion models with smaller
# > datasets, we borrow an augmentation pipeline from the GAN literature [Karras et al. 2020].
# > — Karras et al. 2022, §5
#
# Images are flipped, rotated, scaled and shifted at random before the noise is added. But a
# model of augmented images generates augmented images: the augmentations **leak**, unless
# their parameters are a second conditioning input of $F_\theta$ (`augment_labels`, Chapter
# 4; `augment_dim=9`, Chapter 5), **zero** at generation time. We derive why that stops the
# leak (§6b.1), build the pipeline with the official arguments, labels and draw order
# (§6b.2–6b.5), check it (§6b.6), **measure** the leak exactly (§6b.7) and train (§6b.8).

# %% tags=["export"]
import functools
import math

import torch
import torch.nn.functional as F

# %% tags=["hide-input"]
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from myst_nb import glue

from edm_lit.files import image_grid
from edm_lit.mode import get_mode

MODE = get_mode().require("augmenting your data set", gpu=False, needs=("data",))
if MODE.quick:  # small tensors: one thread is as fast, and immune to a busy machine
    torch.set_num_threads(1)
T_START = time.time()
WORK = Path(tempfile.mkdtemp(prefix="edm_lit_ch6b_"))
torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 80})

# %% [markdown]
# ## 6b.1 Why conditioning on the augmentation stops the leak
#
# > To prevent the augmentations from leaking to the generated images, we provide the
# > augmentation parameters as a conditioning input to $F_\theta$; during inference we set
# > [them] to zero to guarantee that only non-augmented images are generated. — §5
#
# Let an augmentation be a random transformation $T_a$, $a \sim p(a)$, drawn independently
# of $\mathbf y \sim p_\text{data}$. With the label $a$ as an extra input, Eq. 2 becomes
#
# $$
# \mathbb E_{a}\, \mathbb E_{\mathbf y \sim p_\text{data}}\,
# \mathbb E_{\mathbf n \sim \mathcal N(0, \sigma^2 I)}
# \big\| D(T_a \mathbf y + \mathbf n; \sigma, a) - T_a \mathbf y \big\|_2^2 .
# $$
#
# For each fixed $a$ this is Eq. 2 for the data set $p_a = (T_a)_\# p_\text{data}$; since the
# network may use $a$, the minimiser separates: $D^*(\cdot; \cdot, a)$ is the ideal denoiser
# of $p_a$, whose score (Eq. 3) makes the ODE of Eq. 1 sample $p_a$. If the identity's label
# is $a = 0$, the zero label samples $p_0 = p_\text{data}$: **no leak, whatever $p(a)$ is.**
# Without the label the minimiser is the posterior average $\sum_a \pi_a(\mathbf x; \sigma)
# D^*(\mathbf x; \sigma, a)$, $\pi_a \propto p(a)\, p_a(\mathbf x; \sigma)$: the ideal
# denoiser of $\sum_a p(a)\, p_a$, which generates a transformed image with probability
# $P(T_a \ne \mathrm{id})$ — the leak. §6b.7 measures both. So the label must determine the
# transformation and be **zero exactly for the identity**: angles enter as $(\cos\theta - 1,
# \sin\theta)$, scales as $\log_2$ of the factor, flips as bits. A finite network shares its
# weights across labels: the transformed images teach it about the untransformed ones, and
# take part of its capacity (exercise 3).

# %% [markdown]
# ## 6b.2 The transformations as matrices
#
# $$
# G = G_1 G_2 \cdots G_k \quad\Longrightarrow\quad G^{-1} = G_k^{-1} \cdots G_2^{-1} G_1^{-1}
# $$
#
# Each augmentation moves pixel *positions* (in pixels from the image centre) by a homogeneous
# 3×3 matrix. Resampling needs the **inverse** map (where each output pixel reads), so the
# pipeline multiplies its steps' inverses on the right as it draws them, `[N, 3, 3]`.

# %% tags=["export"]
def affine_2d(a, b, c, d, tx=0.0, ty=0.0):
    """Batched homogeneous matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from tensors [N]
    or numbers. Chapter 6b."""
    entries = (a, b, tx, c, d, ty)
    ref = next((e for e in entries if torch.is_tensor(e)), None)
    if ref is None:
        raise ValueError("affine_2d needs at least one tensor entry "
                         "(it sets the batch shape, dtype and device)")
    out = torch.zeros(*ref.shape, 3, 3, dtype=ref.dtype, device=ref.device)
    for k, e in enumerate(entries):
        out[..., k // 3, k % 3] = e
    out[..., 2, 2] = 1
    return out


def rotation_2d(theta):
    """Rotation by `theta` radians about the origin, [N, 3, 3]. Chapter 6b."""
    cos, sin = theta.cos(), theta.sin()
    return affine_2d(cos, -sin, sin, cos)


def scaling_2d(sx, sy):
    """Scaling of x by `sx` and of y by `sy`, [N, 3, 3]. Chapter 6b."""
    return affine_2d(sx, 0.0, 0.0, sy)


def translation_2d(tx, ty):
    """Translation by (`tx`, `ty`) pixels, [N, 3, 3]. Chapter 6b."""
    one = torch.ones_like(tx)
    return affine_2d(one, 0.0, 0.0, one, tx, ty)


# %% [markdown]
# ## 6b.3 Random draws, one transformation at a time
#
# > The probability of enabling a given augmentation […] is fixed to 12% for CIFAR-10 and 15%
# > for FFHQ and AFHQv2, except for $x$-flips that are always enabled. — App. F.2
#
# $$
# a_k \leftarrow \begin{cases} a_k, & u < m_k\, p \\ 0 \ \text{(the identity)}, & \text{otherwise}
# \end{cases} \qquad u \sim \mathcal U[0, 1),\ \text{one } u \text{ per image}
# $$
#
# Transformation $k$ is switched by its **probability multiplier** $m_k$ times `p`: for
# CIFAR-10 `p=0.12`, multiplier 1 for y-flip, scaling, rotation, anisotropic scaling and
# fractional translation, and `xflip=1e8`, an x-flip *offered* to every image (then taken
# with probability ½). A seed reproduces the official batch only with the official **order**
# of draws: per transformation, the parameters (all images), then the gate; in table order.
#
# **Pixel blitting** moves whole pixels: x- and y-flip (label: a bit), a quarter turn $k$
# (`rotate_int`, `torch.rot90(x, k, (2, 3))`; two bits in Gray code, $0 \to 00$, $1 \to 10$,
# $2 \to 11$, $3 \to 01$) and integer translation (`translate_int`, up to `translate_int_max`
# of the size, the border mirrored without repeating the edge; label: the fraction of the
# maximum, positive y moving the content **up**).

# %% tags=["export"]
def _keep(value, prob, shape):
    """`value` where a fresh uniform draw (one per image, `shape`) is below `prob`, else
    0: the gate."""
    draw = torch.rand(shape, device=value.device)
    return torch.where(draw < prob, value, torch.zeros_like(value))


def _symmetric_uniform(shape, device):
    """Uniform on [-1, 1)."""
    return torch.rand(shape, device=device) * 2 - 1


def _pick(k, options):
    """Image i of options[k[i]]: an exact per-image choice among whole-batch images."""
    return torch.stack(options)[k, torch.arange(len(k), device=k.device)]


def mirror_index(i, n):
    """Fold integer positions `i` into [0, n) by mirroring at the edges without
    repeating them (period 2n - 2). Chapter 6b."""
    period = 2 * n - 2
    folded = torch.remainder(i, period)
    return torch.where(folded < n, folded, period - folded)


def _blit_xflip(pipe, images):
    n = len(images)
    k = _keep(torch.randint(2, (n,), device=images.device), pipe.xflip * pipe.p, n)
    return _pick(k, [images, images.flip(3)]), [k]


def _blit_yflip(pipe, images):
    n = len(images)
    k = _keep(torch.randint(2, (n,), device=images.device), pipe.yflip * pipe.p, n)
    return _pick(k, [images, images.flip(2)]), [k]


def _blit_rotate_int(pipe, images):
    n = len(images)
    k = _keep(torch.randint(4, (n,), device=images.device), pipe.rotate_int * pipe.p, n)
    quarter_turns = [torch.rot90(images, j, (2, 3)) for j in range(4)]
    return _pick(k, quarter_turns), [((k + 1) // 2) % 2, k // 2]


def _blit_translate_int(pipe, images):
    N, C, H, W = images.shape
    gate = pipe.translate_int * pipe.p
    frac = _keep(_symmetric_uniform((2, N), images.device), gate, (1, N))
    dx = (frac[0] * (W * pipe.translate_int_max)).round().long()
    dy = (frac[1] * (H * pipe.translate_int_max)).round().long()
    cols = mirror_index(torch.arange(W, device=images.device) - dx[:, None], W)
    rows = mirror_index(torch.arange(H, device=images.device) + dy[:, None], H)
    images = images.gather(3, cols[:, None, None, :].expand(N, C, H, W))
    images = images.gather(2, rows[:, None, :, None].expand(N, C, H, W))
    return images, [dx / (W * pipe.translate_int_max),
                    dy / (H * pipe.translate_int_max)]


_BLITS = (("xflip", _blit_xflip), ("yflip", _blit_yflip),
          ("rotate_int", _blit_rotate_int), ("translate_int", _blit_translate_int))


# %% [markdown]
# **General geometric transformations** draw continuous parameters and contribute an inverse
# matrix each, in this order:
#
# | multiplier | transformation of the image | parameter | label values |
# |---|---|---|---|
# | `scale` | isotropic scaling by $2^{w\,s}$, $s$ = `scale_std` | $w \sim \mathcal N(0,1)$ | $w$ |
# | `rotate_frac` | rotation by θ | θ ∼ U(−π, π)·`rotate_frac_max` | $\cos\theta - 1,\ \sin\theta$ |
# | `aniso` | scaling by $2^{w s}$ along an axis at angle φ and by $2^{-ws}$ across it, $s$ = `aniso_std` | $w \sim \mathcal N(0,1)$; φ ∼ U(−π, π), kept with probability `aniso_rotate_prob` (not scaled by `p`) | $w\cos\varphi,\ w\sin\varphi$ |
# | `translate_frac` | shift by $(t_x W, t_y H)\cdot$`translate_frac_std` | $t_x, t_y \sim \mathcal N(0,1)$ | $t_x,\ t_y$ |
#
# With the paper's settings the labels are `[xflip, yflip, scale, cos θ − 1, sin θ, w cos φ,
# w sin φ, t_x, t_y]`: `augment_dim=9`. In image coordinates (x right, y down) the inverse
# step `rotation_2d(θ)` turns the image by θ counter-clockwise as displayed.

# %% tags=["export"]
def _geo_scale(pipe, n, height, width, device):
    w = _keep(torch.randn(n, device=device), pipe.scale * pipe.p, n)
    factor = torch.exp2(w * pipe.scale_std)
    return scaling_2d(1 / factor, 1 / factor), [w]


def _geo_rotate_frac(pipe, n, height, width, device):
    theta = _symmetric_uniform(n, device) * (math.pi * pipe.rotate_frac_max)
    theta = _keep(theta, pipe.rotate_frac * pipe.p, n)
    return rotation_2d(theta), [theta.cos() - 1, theta.sin()]


def _geo_aniso(pipe, n, height, width, device):
    w = torch.randn(n, device=device)
    phi = _symmetric_uniform(n, device) * math.pi
    w = _keep(w, pipe.aniso * pipe.p, n)
    phi = _keep(phi, pipe.aniso_rotate_prob, n)
    factor = torch.exp2(w * pipe.aniso_std)
    inverse = rotation_2d(-phi) @ scaling_2d(1 / factor, factor) @ rotation_2d(phi)
    return inverse, [w * phi.cos(), w * phi.sin()]


def _geo_translate_frac(pipe, n, height, width, device):
    t = _keep(torch.randn(2, n, device=device), pipe.translate_frac * pipe.p, (1, n))
    shift_x = t[0] * (width * pipe.translate_frac_std)
    shift_y = t[1] * (height * pipe.translate_frac_std)
    return translation_2d(-shift_x, -shift_y), [t[0], t[1]]


_GEOMETRIC = (("scale", _geo_scale), ("rotate_frac", _geo_rotate_frac),
              ("aniso", _geo_aniso), ("translate_frac", _geo_translate_frac))


# %% [markdown]
# ## 6b.4 Resampling without aliasing
#
# > This transformation is applied to the image using the implementation of [Karras et al.
# > 2020] that employs 2× supersampled high-quality Wavelet filters. — App. F.2
#
# $$
# \text{out} = \big\downarrow_2 \Big( h * \operatorname{bilinear}_{G^{-1}}
# \big( h * {\uparrow_2}\, \text{in} \big) \Big),
# \qquad \sum_t h_t\, h_{t+2m} = \delta_m
# $$
#
# Bilinear interpolation alone blurs where the map magnifies and aliases where it shrinks, so
# we resample at **twice the resolution** between two low-pass filters: upsample 2× with the
# 12-tap wavelet filter `sym6`, $h$, interpolate bilinearly, filter with $h$, keep every
# second sample; $h$ is orthogonal (the sum above), so the identity warp returns the image.
# The border is mirrored as far as the warped corners reach plus $2P = 6$ pixels for the
# filters (at most the image size less a pixel), zeros beyond. Upsampled sample $k$ sits at
# $k/2$; the output is computed on $2(H + 2P) \times 2(W + 2P)$ points, sample $i$ at
# $i/2 - P$; output pixel $j$ filters samples $2(j + P) - 5 \ldots 2(j+P) + 6$. A padding
# whose *size* depends on the draws would make the host wait for the GPU at every step, so
# we pad by the cap and **zero** what lies beyond the reach: the same numbers at a fixed size
# (up to float32 rounding of the grid, well inside the parity tests' tolerance).

# %% tags=["export"]
# Low-pass decomposition filter of the Daubechies symlet with 6 vanishing moments
# (`sym6` in standard wavelet tables such as PyWavelets').
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057,
    -0.048311742585633, 0.4910559419267466, 0.787641141030194, 0.3379294217276218,
    -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
    0.0017677118642428036, -0.007800708325034148,
)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype, device) -> torch.Tensor:
    """A small constant on `device`, copied once: a copy per call waits for the GPU."""
    return torch.tensor(values, dtype=dtype, device=device)


def _reflect_pads(inverse, height, width, slack):
    """Mirror padding [left, right, top, bottom] reaching the warped corners of every
    image, plus `slack`, at most the image size less a pixel; 0-dim device tensors."""
    half_w, half_h = (width - 1) / 2, (height - 1) / 2
    pads = []
    for row, centre, cap in ((inverse[:, 0], half_w, width - 1),
                             (inverse[:, 1], half_h, height - 1)):
        row = row.float()  # the farthest corner along this axis, then either side of it
        corner = row[:, 0].abs() * half_w + row[:, 1].abs() * half_h
        for side in (-1, 1):
            reach = (corner + side * row[:, 2]).amax() + (slack - centre)
            pads.append(reach.ceil().clamp(0, cap))
    return pads


def _window(height, width, pads, upsampled, dtype, device):
    """1 on the samples of an image mirror-padded by its size less one on every side (2x
    upsampled or not) within `pads` = [left, right, top, bottom] of it, else 0."""
    scale = 2 if upsampled else 1

    def inside(n, before, after):
        position = torch.arange(scale * (3 * n - 2), device=device) // scale - (n - 1)
        return (position >= -before) & (position <= n - 1 + after)

    left, right, top, bottom = pads
    return (inside(height, top, bottom)[:, None] & inside(width, left, right)).to(dtype)


def _separable(x, taps, transpose, stride, axis):
    """Depthwise 1-D filtering along `axis` (3: width, 2: height), strided or
    transposed-strided."""
    C, k = x.shape[1], len(taps)
    weight = taps.view(1, 1, 1, k).expand(C, 1, 1, k)
    if axis == 2:
        weight = weight.transpose(2, 3)
    strides = (1, stride) if axis == 3 else (stride, 1)
    if transpose:
        pad = (0, (k - 1) // 2) if axis == 3 else ((k - 1) // 2, 0)
        return F.conv_transpose2d(x, weight, stride=strides, padding=pad, groups=C)
    return F.conv2d(x, weight, stride=strides, groups=C)


# %% tags=["export"]
def warp_affine(images, inverse, taps=SYM6):
    """Resample `images` [N, C, H, W] so that output pixel q shows input position
    inverse[n] @ q (pixels from the image centre): 2x oversampled between two `taps`
    low-pass filters, bilinear in between, mirrored borders. Chapter 6b."""
    N, C, H, W = images.shape
    if inverse.shape != (N, 3, 3):
        raise ValueError(f"inverse must have shape [{N}, 3, 3], got "
                         f"{tuple(inverse.shape)}")
    dev, P = images.device, len(taps) // 4
    h = _constant(tuple(taps), images.dtype, dev)
    pads = _reflect_pads(inverse, H, W, 2 * P)
    x = F.pad(images, (W - 1, W - 1, H - 1, H - 1), mode="reflect")  # the cap, always
    x = x * _window(H, W, pads, False, x.dtype, dev)  # zero beyond the reach, as if ...
    x = _separable(_separable(x, h, True, 2, axis=3), h, True, 2, axis=2)
    x = x * _window(H, W, pads, True, x.dtype, dev)  # ... padded by the reach alone
    # Output sample i sits at position i/2 - P (pixels); map it through `inverse`, then
    # to the upsampled padded input (sample 2 * padded position), in grid_sample units.
    f64 = dict(dtype=torch.float64, device=dev)
    ys = torch.arange(2 * (H + 2 * P), **f64) / 2 - P - (H - 1) / 2
    xs = torch.arange(2 * (W + 2 * P), **f64) / 2 - P - (W - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pos = torch.stack([gx, gy, torch.ones_like(gx)], -1)
    src = torch.einsum("nij,hwj->nhwi", inverse[:, :2].double(), pos)
    ix = 2 * (src[..., 0] + ((W - 1) / 2 + W - 1))
    iy = 2 * (src[..., 1] + ((H - 1) / 2 + H - 1))
    grid = torch.stack([(2 * ix + 1) / x.shape[3], (2 * iy + 1) / x.shape[2]], -1) - 1
    x = F.grid_sample(x, grid.to(images.dtype), mode="bilinear", padding_mode="zeros",
                      align_corners=False)
    start = 2 * P - (len(taps) - 1) // 2
    x = _separable(x[:, :, :, start:], h, False, 2, axis=3)
    return _separable(x[:, :, start:, :], h, False, 2, axis=2)


# %% [markdown]
# **Look** — what the filters buy. A zone plate $\cos(\pi r^2 / S)$ holds every frequency up
# to ½ cycle per pixel, each at its own radius. Shrunk 2× (and turned), its outer half cannot
# be held: an ideal resampler turns it grey; plain bilinear folds it back as false rings.

# %% tags=["hide-input"]
def bilinear_warp(images, inverse):
    """Plain bilinear resampling on warp_affine's coordinates, without the filters."""
    N, C, H, W = images.shape
    ys = torch.arange(H, dtype=torch.float64) - (H - 1) / 2
    xs = torch.arange(W, dtype=torch.float64) - (W - 1) / 2
    pos = torch.stack([*torch.meshgrid(xs, ys, indexing="xy"), torch.ones(H, W)], -1)
    src = torch.einsum("nij,hwj->nhwi", inverse[:, :2].double(), pos.double())
    grid = torch.stack([(2 * src[..., 0] + W) / W, (2 * src[..., 1] + H) / H], -1) - 1
    return F.grid_sample(images, grid.float(), mode="bilinear",
                         padding_mode="reflection", align_corners=False)


S = 64
coord = torch.arange(S, dtype=torch.float64) - (S - 1) / 2
radius = (coord[None, :] ** 2 + coord[:, None] ** 2).sqrt()
zone = torch.cos(math.pi * radius**2 / S).float()[None, None]
two = torch.tensor([2.0])
shrink = rotation_2d(torch.tensor([0.5])) @ scaling_2d(two, two)
outputs = {"bilinear only": bilinear_warp(zone, shrink)[0, 0],
           "the pipeline's warp": warp_affine(zone, shrink)[0, 0]}
freq = 4 * radius / S  # local frequency of the shrunk plate, cycles per output pixel
rms = lambda out, inside: out[inside].square().mean().sqrt().item()
edges = torch.linspace(0, 1, 11)
profile = {k: [rms(v, (freq >= a) & (freq < b)) for a, b in zip(edges, edges[1:])]
           for k, v in outputs.items()}
alias = {k: rms(v, (freq > 0.55) & (radius < S / 4)) for k, v in outputs.items()}
passed = {k: rms(v, freq < 0.35) for k, v in outputs.items()}
assert torch.equal(bilinear_warp(zone, torch.eye(3)[None]), zone)  # same coordinates
print("; ".join(f"{k}: rms {alias[k]:.2f} above Nyquist (ideal 0), {passed[k]:.2f} "
                "below 0.35 cycles/pixel (ideal 0.71)" for k in outputs))
assert alias["the pipeline's warp"] < 0.5 * alias["bilinear only"]
assert all(0.6 < v < 0.8 for v in passed.values())

fig, axes = plt.subplots(1, 4, figsize=(13, 3.3), width_ratios=[1, 1, 1, 1.4])
crop = slice(S // 4, 3 * S // 4)  # the part of the output that shows the plate
panels = [("zone plate (input)", zone[0, 0])]
panels += [(k, v[crop, crop]) for k, v in outputs.items()]
for ax, (name, image) in zip(axes, panels):
    ax.imshow(image, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set(title=name, xticks=[], yticks=[])
for name, values in profile.items():
    axes[3].plot((edges[:-1] + edges[1:]) / 2, values, "o-", label=name)
axes[3].axvline(0.5, color="grey", ls="--", label="Nyquist")
axes[3].set(xlabel="local frequency after the shrink (cycles / pixel)",
            ylabel="rms amplitude", title="what survives the 2x shrink")
_ = axes[3].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 6b.5 Colour, and the pipeline
#
# > […] we have found other types of augmentations, such as color corruption and image-space
# > filtering, to be consistently harmful for diffusion-based models. — App. F.2
#
# $$
# \begin{pmatrix} \mathbf c' \\ 1 \end{pmatrix} = C_5 \cdots C_2\, C_1
# \begin{pmatrix} \mathbf c \\ 1 \end{pmatrix}, \qquad
# \mathbf a = (1, 1, 1)/\sqrt 3
# $$
#
# The official pipeline still offers them (off in the paper's presets): 4×4 maps of the RGB
# value, each new step multiplied on the **left**: brightness (add $w\cdot$`brightness_std`),
# contrast (times $2^{w\cdot\text{contrast\_std}}$), luma flip (reflect through the plane
# orthogonal to the grey axis $\mathbf a$), hue (rotate about $\mathbf a$), saturation (scale
# the part orthogonal to $\mathbf a$); a grey image is the colour $(g, g, g)$, averaged back.
# The pipeline runs blits, one warp with the composed inverse matrix, one colour map (a stage
# whose multipliers are all zero is skipped) and returns the enabled transformations' labels
# in table order, `[N, augment_dim]` float32. Nothing reads a value back from the device, so
# a GPU step never waits for the augmentation (`tests/test_augment.py`).

# %% tags=["export"]
_LUMA = 1 / math.sqrt(3)


def _color_affine(linear, offset):
    """[N, 4, 4] colour maps from a linear part [N, 3, 3] and an offset [N, 3]."""
    out = torch.zeros(len(linear), 4, 4, dtype=linear.dtype, device=linear.device)
    out[:, :3, :3], out[:, :3, 3], out[:, 3, 3] = linear, offset, 1
    return out


def _luma(n, device):
    """The projector a a^T on the grey axis, and the identity, batched to [n, 3, 3]."""
    a = _constant((_LUMA,) * 3, torch.float32, device)
    eye = torch.eye(3, device=device)
    return torch.outer(a, a).expand(n, 3, 3), eye.expand(n, 3, 3)


def _col_brightness(pipe, n, device):
    w = _keep(torch.randn(n, device=device), pipe.brightness * pipe.p, n)
    _, eye = _luma(n, device)
    return _color_affine(eye, (w * pipe.brightness_std)[:, None].expand(n, 3)), [w]


def _col_contrast(pipe, n, device):
    w = _keep(torch.randn(n, device=device), pipe.contrast * pipe.p, n)
    _, eye = _luma(n, device)
    gain = torch.exp2(w * pipe.contrast_std)[:, None, None]
    return _color_affine(eye * gain, torch.zeros(n, 3, device=device)), [w]


def _col_lumaflip(pipe, n, device):
    k = _keep(torch.randint(2, (n,), device=device), pipe.lumaflip * pipe.p, n)
    proj, eye = _luma(n, device)
    flip = eye - 2 * proj * k[:, None, None]
    return _color_affine(flip, torch.zeros(n, 3, device=device)), [k]


def _col_hue(pipe, n, device):
    theta = _symmetric_uniform(n, device) * (math.pi * pipe.hue_max)
    theta = _keep(theta, pipe.hue * pipe.p, n)
    proj, eye = _luma(n, device)
    s = _LUMA  # the cross-product matrix of a
    cross = _constant(((0.0, -s, s), (s, 0.0, -s), (-s, s, 0.0)), torch.float32, device)
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    rot = cos * eye + sin * cross + (1 - cos) * proj
    labels = [theta.cos() - 1, theta.sin()]
    return _color_affine(rot, torch.zeros(n, 3, device=device)), labels


def _col_saturation(pipe, n, device):
    w = _keep(torch.randn(n, device=device), pipe.saturation * pipe.p, n)
    proj, eye = _luma(n, device)
    linear = proj + (eye - proj) * torch.exp2(w * pipe.saturation_std)[:, None, None]
    return _color_affine(linear, torch.zeros(n, 3, device=device)), [w]


_COLOR = (("brightness", _col_brightness), ("contrast", _col_contrast),
          ("lumaflip", _col_lumaflip), ("hue", _col_hue),
          ("saturation", _col_saturation))


def apply_color(images, matrix):
    """Apply per-image colour maps [N, 4, 4] to RGB or grey images [N, C, H, W], C in
    (1, 3). Chapter 6b."""
    C = images.shape[1]
    if C not in (1, 3):
        raise ValueError("colour augmentation needs RGB (3 channels) or grey (1 "
                         f"channel) images, got {C} channels")
    matrix = matrix.to(images.dtype)
    linear, offset = matrix[:, :3, :3], matrix[:, :3, 3]
    if C == 3:
        return torch.einsum("nij,njhw->nihw", linear, images) + offset[:, :, None, None]
    gain, shift = linear.sum(2).mean(1), offset.mean(1)
    return images * gain[:, None, None, None] + shift[:, None, None, None]


# %% tags=["export"]
LABEL_SIZES = {"xflip": 1, "yflip": 1, "rotate_int": 2, "translate_int": 2, "scale": 1,
               "rotate_frac": 2, "aniso": 2, "translate_frac": 2, "brightness": 1,
               "contrast": 1, "lumaflip": 1, "hue": 2, "saturation": 1}


class AugmentPipe:
    """Non-leaking augmentation (Sec. 5): `pipe(images) -> (images, augment_labels)`.

    Constructor arguments, defaults, label layout and random-draw order are those of the
    official `AugmentPipe`; every transformation is off (multiplier 0) by default. The
    paper's CIFAR-10 setting is `AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1,
    rotate_frac=1, aniso=1, translate_frac=1)`. Chapter 6b.
    """

    def __init__(self, p=1, xflip=0, yflip=0, rotate_int=0, translate_int=0,
                 translate_int_max=0.125, scale=0, rotate_frac=0, aniso=0,
                 translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2,
                 aniso_rotate_prob=0.5, translate_frac_std=0.125, brightness=0,
                 contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2,
                 contrast_std=0.5, hue_max=1, saturation_std=1):
        settings = {k: v for k, v in locals().items() if k != "self"}
        for name, value in settings.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {value!r}") from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
            setattr(self, name, value)
        self.init_kwargs = settings

    def __repr__(self):
        on = [k for k in ("p", *LABEL_SIZES) if k == "p" or getattr(self, k) > 0]
        return "AugmentPipe(" + ", ".join(f"{k}={getattr(self, k):g}" for k in on) + ")"

    def enabled(self):
        """Names of the transformations with a nonzero multiplier, in label order."""
        return [name for name in LABEL_SIZES if getattr(self, name) > 0]

    @property
    def augment_dim(self) -> int:
        """Length of the label vector (9 for the paper's setting), the network's
        augment_dim."""
        return sum(LABEL_SIZES[name] for name in self.enabled())

    def __call__(self, images):
        """Augment a batch [N, C, H, W]: (images, labels [N, augment_dim] float32)."""
        floating = torch.is_tensor(images) and images.is_floating_point()
        if not floating or images.ndim != 4:
            raise ValueError("images must be a floating-point tensor [N, C, H, W], got "
                             f"{getattr(images, 'shape', type(images))}")
        N, C, H, W = images.shape
        on, dev, labels = set(self.enabled()), images.device, []
        if "rotate_int" in on and H != W:
            raise ValueError(f"rotate_int needs square images, got {H}x{W}")
        if "translate_int" in on and min(H, W) < 2:
            raise ValueError("translate_int needs images of at least 2x2 pixels, got "
                             f"{H}x{W}")
        for name, blit in _BLITS:
            if name in on:
                images, new = blit(self, images)
                labels += new
        # geometry chains inverse matrices on the right, colour chains matrices on
        # the left
        stages = [(_GEOMETRIC, (N, H, W, dev), 3, warp_affine, 1),
                  (_COLOR, (N, dev), 4, apply_color, 0)]
        for table, args, size, apply, right in stages:
            steps = [draw(self, *args) for name, draw in table if name in on]
            if steps:
                matrix = torch.eye(size, device=dev).expand(N, size, size)
                for step, new in steps:
                    matrix = matrix @ step if right else step @ matrix
                    labels += new
                images = apply(images, matrix)
        if not labels:
            return images, torch.zeros(N, 0, device=dev)
        return images, torch.stack([label.to(torch.float32) for label in labels], 1)


# %% [markdown]
# ## 6b.6 Checks, and an augmented batch of real digits
#
# $$
# P(\text{all five gated labels are } 0) = \big(1 - \tfrac p2\big)(1 - p)^4,
# \qquad P(\text{x-flip}) = \tfrac12
# $$
#
# The tests hold the pipeline to the official one (a seed: same batch and labels, to $10^{-5}$)
# and each transformation to an independent computation. Here: the warp is exact for the
# identity and whole-pixel shifts, a quarter turn only nearly (`sym6` is *nearly* symmetric).

# %% tags=["hide-input"]
from edm_lit.augment import AugmentPipe, rotation_2d, translation_2d, warp_affine

g = torch.Generator().manual_seed(1)
noise = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
smooth = F.interpolate(torch.randn(4, 3, 4, 4, generator=g), (32, 32), mode="bicubic")
identity_err = (warp_affine(noise, torch.eye(3).expand(4, 3, 3)) - noise).abs().max()
move = translation_2d(torch.full((4,), -3.0), torch.full((4,), 2.0))
shift_err = (warp_affine(noise, move)[..., :-2, 3:] - noise[..., 2:, :-3]).abs().max()
quarter = warp_affine(smooth, rotation_2d(torch.full((4,), math.pi / 2)))
peak = smooth.abs().max()
quarter_err = (quarter - torch.rot90(smooth, 1, (2, 3))).abs().max() / peak
print(f"identity warp: max error {identity_err:.1e}; 3-pixel shift: {shift_err:.1e}; "
      f"90° turn vs rot90 on a smooth image: {quarter_err:.1%} of the peak")
assert identity_err < 2e-5 and shift_err < 2e-5
assert 1e-3 < quarter_err < 0.05

# %% [markdown]
# The label is zero exactly when the image is left alone, with the probabilities above, on
# the 1,797 digits of Chapter 6 (upsampled to 32×32 so the warps show; in full mode, your
# data set's first images, 2,000 at 32×32). **Look** — at `p=0.12` most images change only by
# the x-flip, so the figure uses `p=1` on the first eight, with their first five labels.

# %%
from edm_lit.course import dataset_tensors
from edm_lit.data import ImageFolderDataset, quick_dataset

digit_set = ImageFolderDataset(quick_dataset(WORK / "digits-8x8.zip"), use_labels=True)
digit_images, digit_onehot = dataset_tensors(digit_set)  # [1797, 1, 8, 8] in [-1, 1]
digit_classes = digit_onehot.argmax(1)
if MODE.quick:
    real_name = "digits"
    real = F.interpolate(digit_images, (32, 32), mode="bilinear", align_corners=False)
else:  # your data set: uint8 CHW items -> [-1, 1]
    data = ImageFolderDataset(MODE.data)
    channels, height, width = data.image_shape
    real_name = f"{data.name} ({width}x{height}, {channels} channels)"
    count = min(len(data), max(8, 2000 * 32 * 32 // (height * width)))
    real = torch.stack([torch.from_numpy(data[i][0]) for i in range(count)])
    real = real.float() / 127.5 - 1
    print(f"full mode: augmenting {count} images of {real_name} on the CPU "
          "(exact to float32 there)")

paper = AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                    translate_frac=1)
torch.manual_seed(0)
aug, aug_labels = paper(real)
untouched = (aug_labels[:, 1:] == 0).all(1)
expected_untouched = (1 - 0.12 / 2) * (1 - 0.12) ** 4
as_was = torch.where(aug_labels[:, 0, None, None, None] == 1, real.flip(3), real)
untouched_err = (aug[untouched] - as_was[untouched]).abs().max().item()
print(f"{paper}: augment_dim = {paper.augment_dim}")
print(f"{real_name}, {len(real)} images with a zero geometric label: "
      f"{untouched.float().mean():.3f} (predicted {expected_untouched:.3f}); "
      f"x-flipped: {aug_labels[:, 0].mean():.3f} (predicted 0.5)")
print(f"largest change of those images by the pipeline: {untouched_err:.1e}")
binom_sd = math.sqrt(expected_untouched * (1 - expected_untouched) / len(real))
assert paper.augment_dim == 9 and aug_labels.shape == (len(real), 9)
assert abs(untouched.float().mean() - expected_untouched) < 4 * binom_sd
assert abs(aug_labels[:, 0].mean() - 0.5) < 4 * math.sqrt(0.25 / len(real))
assert untouched_err < 2e-5

# %% tags=["hide-input"]
def show(ax, image):
    """One image [C, H, W] in [-1, 1]: grey (digits: dark ink on white) or colour."""
    if image.shape[0] < 3:
        ax.imshow(image[0], cmap="gray_r" if MODE.quick else "gray", vmin=-1, vmax=1)
    else:
        ax.imshow(((image[:3] + 1) / 2).clamp(0, 1).permute(1, 2, 0))
    ax.set(xticks=[], yticks=[])


full = AugmentPipe(p=1, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                   translate_frac=1)
torch.manual_seed(3)
shown = min(8, len(real))
batch, batch_labels = full(real[:shown])
fig, axes = plt.subplots(2, 8, figsize=(12, 4.2))
for i in range(shown):
    show(axes[0, i], real[i])
    show(axes[1, i], batch[i])
    label = "\n".join(f"{v:+.2f}" for v in batch_labels[i].tolist()[:5])
    axes[1, i].set_xlabel(label + "\n…", fontsize=7)
axes[0, 0].set_ylabel(real_name.split(" (")[0])
axes[1, 0].set_ylabel("augmented, p = 1")
fig.suptitle("The paper's geometric augmentations; under each image its labels "
             "[xflip, yflip, log2 scale / 0.2, cos θ − 1, sin θ, …]")
fig.tight_layout()
plt.show()
assert (batch_labels[:, [2, 3, 5, 7, 8]] != 0).all()  # at p = 1 every one is taken

# %% [markdown]
# ## 6b.7 The leak, measured on a closed-form model
#
# > We have not observed any leakage between the auxiliary tasks and the main task […] — App. F.2
#
# $$
# P(a \ne 0) = 1 - \big(1 - \tfrac p2\big)\big(1 - \tfrac{3p}4\big)
# \quad \text{for } \texttt{AugmentPipe(p, xflip=1, rotate\_int=1)}
# $$
#
# By §6b.1 a denoiser that sees the label, sampled at zero, generates clean data; one that
# ignores it, augmented data. For a Gaussian mixture both ideal denoisers are closed form. Take
# $p_\text{data}$ = ten isotropic Gaussians (σ 0.2) on the ten mean 8×8 digits, augmented by
# the eight symmetries of the square: an x-flip with probability $p/2$, then a quarter turn
# $k$ with probability $p/4$ each. They permute pixels, so $(T_a)_\# p_\text{data}$ is again
# an isotropic mixture (means $T_a \boldsymbol\mu_j$) with `GaussianMixture`'s exact denoiser
# (Chapter 1). Labels: [flip bit, Gray-code bits of $k$]. The label-conditioned denoiser
# picks the mixture of each image's label (a missing `augment_labels` reads as zero, as in
# the official networks); the label-blind one is that of all 80 components, weighted
# $p(a)/10$. The statistic: the fraction of images whose **nearest of the 80 transformed
# class means** is transformed ($a \neq 0$); nearly symmetric digits lift clean data a
# little above zero, so the references are clean and pipeline-augmented data.

# %% tags=["hide-input"]
from edm_lit.framework import GaussianMixture
from edm_lit.samplers import edm_sampler

if MODE.full:
    print("full mode: §6b.7 and §6b.8 stay on the 8x8 digits at quick size (the "
          "closed-form model and the orientation judge are built for them)")
P_AUG, STD, N_SAMPLES = 0.5, 0.2, 2000
means = [digit_images[digit_classes == c].mean(0) for c in range(10)]
class_means = torch.stack(means).double()
clean = GaussianMixture(class_means, stds=STD)
GRAY = {0: (0, 0), 1: (1, 0), 2: (1, 1), 3: (0, 1)}


def dihedral(x, flip, k):
    """T_a: x-flip (if flip), then k counter-clockwise quarter turns, as the blits."""
    return torch.rot90(x.flip(-1) if flip else x, k, (-2, -1))


SYMMETRIES = [(flip, k) for flip in (0, 1) for k in range(4)]
LABEL = {(flip, k): (flip, *GRAY[k]) for flip, k in SYMMETRIES}
PROB = {(flip, k): (P_AUG / 2 if flip else 1 - P_AUG / 2)
        * (P_AUG / 4 if k else 1 - 3 * P_AUG / 4) for flip, k in SYMMETRIES}

# The pipeline draws exactly these labels with these probabilities.
pipe = AugmentPipe(p=P_AUG, xflip=1, rotate_int=1)
torch.manual_seed(0)
probe = torch.arange(64.0).reshape(1, 1, 8, 8).expand(20000, 1, 8, 8)
probe_out, probe_labels = pipe(probe)
for sym in SYMMETRIES:
    rows = (probe_labels == torch.tensor(LABEL[sym], dtype=torch.float32)).all(1)
    assert torch.equal(probe_out[rows], dihedral(probe[rows], *sym))  # label a <-> T_a
    assert abs(rows.float().mean() - PROB[sym]) < 4 * math.sqrt(PROB[sym] / 20000)
print("label (flip, Gray code of k) -> probability: "
      + ", ".join(f"{LABEL[sym]} {PROB[sym]:.4f}" for sym in SYMMETRIES))

# %%
class AugmentConditionedMixture:
    """Closed-form D*(x; sigma, a) of augmented Gaussian-mixture data (§6b.1)."""

    sigma_min, sigma_max, label_dim, img_channels, img_resolution = 0, math.inf, 0, 1, 8
    round_sigma = staticmethod(torch.as_tensor)

    def __init__(self, m):
        self.parts = {LABEL[s]: GaussianMixture(dihedral(m.means, *s), m.stds,
                                                m.weights) for s in SYMMETRIES}

    def __call__(self, x, sigma, class_labels=None, augment_labels=None):
        if augment_labels is None:
            augment_labels = torch.zeros(len(x), 3)
        out = torch.empty_like(x)
        for label, part in self.parts.items():
            wanted = torch.tensor(label, dtype=augment_labels.dtype)
            rows = (augment_labels == wanted).all(1)
            if rows.any():
                out[rows] = part(x[rows], sigma)
        return out


conditioned = AugmentConditionedMixture(clean)
weights = torch.tensor([PROB[s] / 10 for s in SYMMETRIES for _ in range(10)])
all_means = torch.cat([dihedral(class_means, *s) for s in SYMMETRIES])
ignoring = GaussianMixture(all_means, stds=STD, weights=weights)


class WithLabel:
    """Fix the augmentation label of a denoiser (the official sampler passes none)."""

    def __init__(self, net, label):
        """`label`: one label for all images, or one row per image."""
        self.net, self.label = net, torch.as_tensor(label, dtype=torch.float32)
        for k in ("sigma_min", "sigma_max", "label_dim", "img_channels",
                  "img_resolution", "round_sigma"):
            setattr(self, k, getattr(net, k))

    def __call__(self, x, sigma, class_labels=None):
        label = self.label if self.label.ndim == 2 else self.label.expand(len(x), -1)
        return self.net(x, sigma, class_labels, augment_labels=label)


# %%
ALL_MEANS = all_means.reshape(80, -1)


def nearest_mean(x):
    """Index of the nearest of the 80 transformed class means (10 per symmetry, a = 0
    first) for each image [N, 1, 8, 8]."""
    return torch.cdist(x.reshape(len(x), -1).double(), ALL_MEANS).argmin(1)


gen = torch.Generator().manual_seed(0)
clean_data = clean.sample(N_SAMPLES, generator=gen)
torch.manual_seed(1)
augmented_data, _ = pipe(clean_data.float())
latents = torch.randn(N_SAMPLES, 1, 8, 8, generator=gen, dtype=torch.float64)
samples = {"zero label": edm_sampler(conditioned, latents),
           "label ignored": edm_sampler(ignoring, latents),
           "label of k = 1": edm_sampler(WithLabel(conditioned, (0, 1, 0)), latents)}
runs = {"clean data": clean_data, "augmented data": augmented_data, **samples}
stats = {name: (nearest_mean(x) >= 10).double().mean().item()
         for name, x in runs.items()}
quarter = nearest_mean(samples["label of k = 1"]) // 10 == SYMMETRIES.index((0, 1))
quarter_frac = quarter.double().mean().item()
predicted_leak = 1 - PROB[(0, 0)]
print(f"{N_SAMPLES} samples each, 18 Heun steps; nearest to a transformed mean:")
for name, value in stats.items():
    print(f"  {name:>15}: {value:.3f}")
print(f"predicted for augmented data: about P(a != 0) = {predicted_leak:.3f}; at the "
      f"label of one quarter turn: {quarter_frac:.3f} nearest to a k = 1 mean")

# %% tags=["hide-input"]
sd = lambda q: math.sqrt(q * (1 - q) / N_SAMPLES)  # binomial standard deviation
# zero label: as clean as the data; label ignored: as augmented as the training data
clean_sd, augmented_sd = sd(stats["clean data"]), sd(stats["augmented data"])
assert abs(stats["zero label"] - stats["clean data"]) < 5 * clean_sd + 0.005
assert abs(stats["label ignored"] - stats["augmented data"]) < 5 * augmented_sd
assert abs(stats["augmented data"] - predicted_leak) < 0.05
assert stats["label ignored"] - stats["zero label"] > 0.5 * predicted_leak
assert quarter_frac > 0.9

# %% [markdown]
# The leak is the predicted one: the label-blind denoiser samples the augmented distribution;
# conditioned and sampled at zero, the clean one; at a nonzero label, the transformed one.
# **Look** — the first samples of each run (same latents in each column):

# %% tags=["hide-input"]
def sample_rows(runs: dict, title: str):
    """The first 16 images of each run as one row with gaps, ink dark on white."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.15 * len(runs) + 0.3))
    for ax, (name, x) in zip(axes, runs.items()):
        ax.imshow(image_grid(-x[:16], 16, gap=1)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set(xticks=[], yticks=[])
        ax.set_ylabel(name.replace(" from", "\nfrom"), rotation=0, ha="right",
                      va="center")
    fig.suptitle(title)
    fig.tight_layout()
    plt.show()


sample_rows(samples, "Exact samples of the augmented-digit mixture")

# %% [markdown]
# ## 6b.8 A trained network
#
# $$
# \mathbb E\, \lambda(\sigma)\, \big\| D_\theta(T_a \mathbf y + \mathbf n; \sigma, a) -
# T_a \mathbf y \big\|_2^2 \qquad \text{(Eq. 8, with the augmentation label)}
# $$
#
# The same experiment with Chapter 6's `small_denoiser` (`augment_dim=3`) and recipe (1,000
# steps), trained on 1,500 digits augmented by the same pipeline (the label reaching the
# network through the loss, as in the paper), sampled from the same latents with the zero
# label and with labels drawn from the pipeline (by §6b.1, the augmented distribution). A
# digit's orientation is its **nearest neighbour**'s among the training digits in all eight
# orientations; the references are the 297 held-out digits, clean and augmented. The **label
# effect** is how many more samples are transformed with drawn labels than with the zero
# label (none if the label were ignored); the **position** of the zero-label samples,
# $(\text{aug} - \text{zero}) / (\text{aug} - \text{clean})$, is 0 for the whole leak, 1 for
# none (the ideal denoiser of §6b.7).

# %%
from edm_lit.course import small_denoiser, train_denoiser

train_digits, held_out = digit_images[:1500], digit_images[1500:]
oriented = torch.cat([dihedral(train_digits, *s) for s in SYMMETRIES])
REFERENCE = oriented.reshape(8 * 1500, -1)


def transformed_fraction(x):
    """Fraction of images whose nearest training digit (8 orientations) is turned."""
    nearest = torch.cdist(x.reshape(len(x), -1).float(), REFERENCE).argmin(1)
    return (nearest >= 1500).double().mean().item()


steps = 1000
torch.manual_seed(0)
sigma_data = train_digits.std().item()
net = small_denoiser(8, 1, augment_dim=pipe.augment_dim, sigma_data=sigma_data)
net = net.to(MODE.device)
t0 = time.time()
losses = train_denoiser(net, train_digits, steps=steps, augment_pipe=pipe, seed=1)
train_time = time.time() - t0
latents = torch.randn(1000, 1, 8, 8, generator=gen, dtype=torch.float64).to(MODE.device)
torch.manual_seed(2)
_, drawn_labels = pipe(torch.zeros(1000, 1, 8, 8, device=MODE.device))
net.eval()
with torch.no_grad():
    trained_samples = {"zero label": edm_sampler(net, latents, num_steps=12).cpu(),
                       "labels drawn from the pipe": edm_sampler(
                           WithLabel(net, drawn_labels), latents, num_steps=12).cpu()}
torch.manual_seed(3)
held_out_aug, _ = pipe(held_out)
runs = {"held-out digits": held_out, "held-out digits, augmented": held_out_aug,
        **trained_samples}
trained_stats = {name: transformed_fraction(x) for name, x in runs.items()}
print(f"{steps} steps of 64 digits in {train_time:.0f} s; 1000 samples per run, 12 "
      "Heun steps; nearest to a transformed training digit:")
for name, value in trained_stats.items():
    print(f"  {name:>27}: {value:.3f}")

# %% tags=["hide-input"]
clean_ref = trained_stats["held-out digits"]
aug_ref = trained_stats["held-out digits, augmented"]
zero, drawn = trained_stats["zero label"], trained_stats["labels drawn from the pipe"]
label_effect = drawn - zero
position = (aug_ref - zero) / (aug_ref - clean_ref)
print(f"label effect: {drawn:.3f} transformed with drawn labels, {zero:.3f} with the "
      f"zero label ({label_effect:+.3f})")
print(f"position: the zero-label samples ({zero:.3f}) lie {position:.0%} of the way "
      f"from the augmented ({aug_ref:.3f}) to the clean reference ({clean_ref:.3f})")
assert label_effect > 0.22  # the network reads the label (measured about 0.3)
assert abs(drawn - aug_ref) < 0.1  # drawn labels: about as turned as augmented digits
assert position > 0.5  # the zero label removes most of the leak (measured 0.6 to 0.7)
glued = dict(tr_clean=clean_ref, tr_aug=aug_ref, tr_zero=zero, tr_drawn=drawn,
             tr_effect=label_effect, tr_position=position, tr_steps=steps)
for name, value in glued.items():
    glue(name, value, display=False)

# %% [markdown]
# The network **reads the label**: drawn labels give {glue:text}`tr_drawn:.3f` transformed
# samples, the zero label {glue:text}`tr_zero:.3f` (effect {glue:text}`tr_effect:+.3f`; the
# augmented reference is {glue:text}`tr_aug:.3f`). And the zero label **removes most of the
# leak**: after {glue:text}`tr_steps` steps its samples lie {glue:text}`tr_position:.0%` of
# the way from the augmented reference to the clean one ({glue:text}`tr_clean:.3f`).

# %% tags=["hide-input"]
sample_rows(trained_samples, f"Samples of the trained network ({steps} steps)")

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.augment`: `AugmentPipe`, with the official arguments, defaults, label
# layout (9 values for the paper's setting) and draw order (a seed gives the official batch,
# to $10^{-5}$), reading no value back from the device; its pieces `affine_2d`, `rotation_2d`,
# `scaling_2d`, `translation_2d`, `warp_affine`, `mirror_index`, `apply_color`, `SYM6`,
# `LABEL_SIZES`. Training passes it to the loss, `EDMLoss()(net, images, labels,
# augment_pipe=pipe)`; generation passes no labels, read as the zero label.
#
# ## Exercises
#
# 1. In §6b.7, sample the label-blind model at `P_AUG = 1`: why is not every sample turned?
# 2. Why does the rotation label use $(\cos\theta - 1, \sin\theta)$ rather than θ itself?
# 3. The paper augments FFHQ with `p=0.15` but ImageNet not at all. Using §6b.1, what does
#    augmentation cost a model that generates with the zero label?
#
# :::{dropdown} Answers
# 1. At $p = 1$ the identity still has probability $\tfrac12 \cdot \tfrac14 = \tfrac18$.
# 2. θ = ±π are one rotation but far apart as numbers; $(\cos\theta - 1, \sin\theta)$ is
#    continuous, determines θ, and is zero exactly at θ = 0 (§6b.1).
# 3. Nothing in the limit (the ideal denoiser at $a = 0$ is the clean data's); in practice
#    clean images are only the fraction $P(a = 0)$ of what the network learns, and for 1.28
#    million ImageNet images the paper did "not find overfitting to be a concern" (App. F.3).
# :::

# %% tags=["hide-input"]
print(f"chapter ran in {time.time() - T_START:.0f} s ({MODE.name} mode)")
