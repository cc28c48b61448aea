# ---
# jupyter:
#   edm_lit:
#     export: precond
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
# # 4. Preconditioning and the training objective
#
# Chapters 1–3 treated the denoiser $D(\mathbf{x}; \sigma)$ as given. Now we have to *learn* it,
# with a neural network, over noise levels from $\sigma \approx 0.002$ to $\sigma = 80$. A raw
# network is a poor fit for that job: the standard deviation of its input
# $\mathbf{y} + \mathbf{n}$ grows from about $\sigma_\text{data}$ to 80, and its output must be
# an image at every σ. The paper (Sec. 5, App. B.6) wraps the network in **preconditioning**,
# scalings of its input and output that depend on σ only, and chooses the **training
# objective** (which σ to train on, how much each σ weighs) to match. This chapter derives both
# and exports them:
#
# - `edm_lit.precond`: `VPPrecond`, `VEPrecond`, `iDDPMPrecond`, `EDMPrecond`, the four
#   columns of the paper's Table 1, each a `torch.nn.Module` wrapping an inner network;
# - `edm_lit.loss`: `VPLoss`, `VELoss`, `EDMLoss`, the training losses.
#
# The inner networks themselves (`SongUNet`, `DhariwalUNet`) arrive in Chapter 5. Here every
# preconditioner wraps either a tiny stand-in network or the *ideal* network computed from the
# ground truth of Chapter 1, so that each claim can be checked exactly.

# %% tags=["export"]
import importlib

import torch

from edm_lit.framework import iddpm_u

# %% tags=["export:loss"]
import torch

from edm_lit.precond import vp_sigma

# %% tags=["export:course"]
import torch

# %%
import functools
import math

import matplotlib.pyplot as plt
import torch

from myst_nb import glue

from edm_lit.framework import VP, iddpm_u, toy_image_mixture
from edm_lit.mode import get_mode

MODE = get_mode()
torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})

# %% [markdown]
# ## 4.1 The preconditioned denoiser (Eq. 7, 8)
#
# > "we propose to precondition the neural network with a σ-dependent skip connection that
# > allows it to estimate either $\mathbf{y}$ or $\mathbf{n}$, or something in between."
# > (Sec. 5)
#
# The paper does not ask the network $F_\theta$ for $D$ directly. It writes
#
# $$D_\theta(\mathbf{x}; \sigma) = c_\text{skip}(\sigma)\, \mathbf{x} + c_\text{out}(\sigma)\, F_\theta\big(c_\text{in}(\sigma)\, \mathbf{x};\ c_\text{noise}(\sigma)\big) \tag{7}$$
#
# with four scalar functions of σ: $c_\text{in}$ scales the network's input, $c_\text{noise}$ is
# the number it receives as its noise condition, $c_\text{skip}$ lets part of the noisy input
# pass straight through, and $c_\text{out}$ scales what the network adds. Substituting Eq. 7
# into the denoising loss of Eq. 2, weighted by some $\lambda(\sigma)$, gives the objective the
# network actually sees (Eq. 8):
#
# $$\mathbb{E}_{\sigma, \mathbf{y}, \mathbf{n}} \Big[ \underbrace{\lambda(\sigma)\, c_\text{out}(\sigma)^2}_\text{effective weight}
#   \big\| \underbrace{F_\theta\big(c_\text{in}(\sigma)(\mathbf{y}+\mathbf{n}); c_\text{noise}(\sigma)\big)}_\text{network output}
#   - \underbrace{\tfrac{1}{c_\text{out}(\sigma)}\big(\mathbf{y} - c_\text{skip}(\sigma)(\mathbf{y}+\mathbf{n})\big)}_\text{effective training target} \big\|_2^2 \Big]. \tag{8}$$
#
# So the network regresses an *effective target* from a *scaled input*, and the four functions
# decide how big both are at each σ. The paper's design principle: make the network's input
# and its target have **unit variance** at every σ (networks train best on unit-scale signals),
# and, among the choices that achieve it, **amplify the network's errors as little as
# possible**: any error $\Delta F$ reaches the denoiser as $c_\text{out}\,\Delta F$.

# %% [markdown]
# ## 4.2 Deriving the EDM coefficients (App. B.6)
#
# > "we derive our choices shown in Table 1 by requiring network inputs and training targets
# > to have unit variance ($c_\text{in}$, $c_\text{out}$), and amplifying errors in
# > $F_\theta$ as little as possible ($c_\text{skip}$)." (Sec. 5)
#
# Let $\mathbf{y}$ have per-element variance $\sigma_\text{data}^2$ and $\mathbf{n} \sim \mathcal{N}(\mathbf{0}, \sigma^2\mathbf{I})$
# be independent of it.
#
# **Input.** $\operatorname{Var}[c_\text{in}(\mathbf{y}+\mathbf{n})] = c_\text{in}^2 (\sigma_\text{data}^2 + \sigma^2) = 1$ gives
#
# $$c_\text{in}(\sigma) = 1 / \sqrt{\sigma^2 + \sigma_\text{data}^2}.$$
#
# **Target.** With $\mathbf{y} - c_\text{skip}(\mathbf{y}+\mathbf{n}) = (1 - c_\text{skip})\mathbf{y} - c_\text{skip}\mathbf{n}$,
# $\operatorname{Var}[\text{target}] = \big((1-c_\text{skip})^2\sigma_\text{data}^2 + c_\text{skip}^2\sigma^2\big) / c_\text{out}^2 = 1$, so
#
# $$c_\text{out}^2 = (1 - c_\text{skip})^2 \sigma_\text{data}^2 + c_\text{skip}^2 \sigma^2 .$$
#
# **Minimal amplification.** Choose $c_\text{skip}$ to make $|c_\text{out}|$ as small as possible:
# setting the derivative $-2(1-c_\text{skip})\sigma_\text{data}^2 + 2 c_\text{skip}\sigma^2$ to zero,
#
# $$c_\text{skip}(\sigma) = \frac{\sigma_\text{data}^2}{\sigma^2 + \sigma_\text{data}^2}, \qquad
#   c_\text{out}(\sigma) = \frac{\sigma\, \sigma_\text{data}}{\sqrt{\sigma^2 + \sigma_\text{data}^2}} .$$
#
# At small σ, $c_\text{skip} \to 1$ and $c_\text{out} \to \sigma$: the network predicts the (small)
# noise and the input passes through. At large σ, $c_\text{skip} \to 0$ and $c_\text{out} \to \sigma_\text{data}$:
# the network predicts the clean image itself, and its errors are never amplified beyond
# $\sigma_\text{data}$.
#
# **Weight.** The effective weight $\lambda(\sigma) c_\text{out}(\sigma)^2$ should be the same at
# every σ, so that no noise level dominates the gradient: $\lambda(\sigma) = 1/c_\text{out}(\sigma)^2 = (\sigma^2 + \sigma_\text{data}^2) / (\sigma\sigma_\text{data})^2$.
#
# **Noise condition.** $c_\text{noise}(\sigma) = \frac14 \ln\sigma$, chosen empirically: a
# logarithmic scale, shrunk so that the training range of σ maps to a few units.
#
# **Check** — minimise $c_\text{out}^2$ over a fine grid of $c_\text{skip}$ by brute force and
# compare with the closed forms, for σ from 0.002 to 80.

# %% tags=["hide-input"]
sigma_data = 0.5
grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
for sigma in [0.002, 0.1, 0.5, 2.0, 80.0]:
    # c_out^2 that gives a unit-variance target, for each c_skip of the grid
    c_out_sq = (1 - grid) ** 2 * sigma_data**2 + grid**2 * sigma**2
    best = c_out_sq.argmin()
    c_skip_closed = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out_closed = sigma * sigma_data / math.sqrt(sigma**2 + sigma_data**2)
    print(f"sigma={sigma:<6} c_skip: grid {grid[best]:.5f} closed {c_skip_closed:.5f}"
          f"   c_out: grid {c_out_sq[best].sqrt():.5f} closed {c_out_closed:.5f}")
    assert abs(grid[best] - c_skip_closed) < 1e-5
    assert abs(c_out_sq[best].sqrt() - c_out_closed) < 1e-6

# %% [markdown]
# ## 4.3 Table 1 as code: the preconditioners
#
# > "Previous methods […] address the input scaling via a σ-dependent normalization factor and
# > attempt to precondition the output by training $F_\theta$ to predict $\mathbf{n}$ scaled
# > to unit variance" (Sec. 5)
#
# The paper's Table 1 gives the four functions for each of the models it compares:
#
# | | VP | VE | iDDPM | EDM |
# |---|---|---|---|---|
# | $c_\text{skip}$ | $1$ | $1$ | $1$ | $\sigma_\text{data}^2/(\sigma^2 + \sigma_\text{data}^2)$ |
# | $c_\text{out}$ | $-\sigma$ | $\sigma$ | $-\sigma$ | $\sigma\sigma_\text{data}/\sqrt{\sigma^2 + \sigma_\text{data}^2}$ |
# | $c_\text{in}$ | $1/\sqrt{\sigma^2 + 1}$ | $1$ | $1/\sqrt{\sigma^2 + 1}$ | $1/\sqrt{\sigma^2 + \sigma_\text{data}^2}$ |
# | $c_\text{noise}$ | $(M - 1)\,\sigma^{-1}(\sigma)$ | $\ln(\frac12\sigma)$ | $M - 1 - \arg\min_j \lvert u_j - \sigma\rvert$ | $\frac14\ln\sigma$ |
#
# VP, VE and iDDPM all set $c_\text{skip} = 1$ and $c_\text{out} = \pm\sigma$: their networks
# predict the noise $\mathbf{n}/\sigma$. VP and iDDPM divide the input by $\sqrt{\sigma^2 + 1}$
# — the variance-preserving scaling $s(t)$ of Chapter 1, which assumes $\sigma_\text{data} = 1$ —
# and VE does not scale it at all.
#
# Each preconditioner is a `torch.nn.Module` holding its inner network as `self.model`, built as
# `model_type(img_resolution=..., in_channels=img_channels, out_channels=img_channels, label_dim=..., **model_kwargs)`
# (iDDPM's network has twice the output channels: it also predicts variances, which EDM ignores).
# `model_type` is a class (or any callable), or the name of a network of `edm_lit.networks`
# (Chapter 5), looked up when the preconditioner is built. The constructor arguments, their
# defaults, the attributes (`img_resolution`, `img_channels`, `label_dim`, `use_fp16`,
# `sigma_min`, `sigma_max`, `round_sigma`) and the `state_dict` keys (`model.…`, plus the
# table `u` for iDDPM) are those of the official implementation, so its pretrained snapshots
# load unchanged (Chapter 5).
#
# The forward pass is the same for all four, `net(x, sigma, class_labels=None, force_fp32=False, **model_kwargs)`:
# `x` and σ are cast to float32 (the samplers work in float64; the network does not), σ becomes
# one value per image, `[N, 1, 1, 1]`; a conditional network called with `class_labels=None`
# gets an all-zero label; the inner network runs in float16 only when asked (`use_fp16`), not
# forced back (`force_fp32`), and on a GPU; extra keyword arguments (augmentation labels,
# Chapter 6) go through to the inner network; and Eq. 7 assembles the result in float32.

# %% tags=["export"]
def _resolve_model_type(model_type):
    """The inner network's class (or callable), or its name in edm_lit.networks."""
    if not isinstance(model_type, str):
        if not callable(model_type):
            raise ValueError("model_type must be a class, a callable or a network "
                             f"name, got {model_type!r}")
        return model_type
    try:
        networks = importlib.import_module("edm_lit.networks")
    except ModuleNotFoundError as e:
        if e.name != "edm_lit.networks":
            raise
        raise ValueError(f"model_type {model_type!r} needs edm_lit.networks (Chapter "
                         "5), which is not available; pass the network class") from None
    cls = getattr(networks, model_type, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"unknown model_type {model_type!r}: expected a network of "
                         "edm_lit.networks ('SongUNet', 'DhariwalUNet') or a class")
    return cls


def _check_count(value, name: str, minimum: int):
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_sigma_range(sigma_min, sigma_max):
    if not 0 <= sigma_min < sigma_max:
        raise ValueError("need 0 <= sigma_min < sigma_max, got "
                         f"sigma_min={sigma_min}, sigma_max={sigma_max}")
    return float(sigma_min), float(sigma_max)


# %% tags=["export"]
class Precond(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), Eq. 7, around F. Chapter 4.

    The base of the four columns of Table 1: a subclass sets `sigma_min`, `sigma_max`
    and gives `coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)`. F: `self.model`.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 model_type=None, model_out_channels=None, **model_kwargs):
        super().__init__()
        self.img_resolution = _check_count(img_resolution, "img_resolution", 1)
        self.img_channels = _check_count(img_channels, "img_channels", 1)
        self.label_dim = _check_count(label_dim, "label_dim", 0)
        self.use_fp16 = bool(use_fp16)
        out_channels = model_out_channels
        if out_channels is None:
            out_channels = self.img_channels
        self.model = _resolve_model_type(model_type)(
            img_resolution=self.img_resolution, in_channels=self.img_channels,
            out_channels=out_channels, label_dim=self.label_dim, **model_kwargs)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at sigma (Table 1), broadcastable."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        """The supported noise level nearest to sigma: sigma, for a continuous model."""
        return torch.as_tensor(sigma)

    def _prepare(self, x, sigma, class_labels):
        """Check shapes (no device syncs); x, sigma [N,1,1,1] and labels in float32."""
        C, R = self.img_channels, self.img_resolution
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, R, R):
            raise ValueError(f"x must have shape [N, {C}, {R}, {R}], "
                             f"got {tuple(x.shape)}")
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
        sigma = sigma.reshape(-1, 1, 1, 1)
        if sigma.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"sigma must hold 1 or {x.shape[0]} values (one per "
                             f"image), got {sigma.shape[0]}")
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:  # an unconditional call: the all-zero label
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        elif class_labels.ndim == 0 or class_labels.shape[-1] != self.label_dim:
            raise ValueError(f"class_labels must have shape [N, {self.label_dim}], "
                             f"got {tuple(class_labels.shape)}")
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """D(x; sigma) by Eq. 7 in float32; model_kwargs (augment_labels) go to F."""
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if fp16 else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(),
                         class_labels=class_labels, **model_kwargs)
        # (under autocast the network may return bfloat16 or float16)
        if F_x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(f"the inner network returned {F_x.dtype}, "
                               f"expected {dtype}")
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)


# %% [markdown]
# **VP.** Its $c_\text{noise}$ is the *time* $t = \sigma^{-1}(\sigma)$ of the VP schedule of
# Chapter 1, stretched to the $M$ steps of the original discrete model. The formulas are those of
# `edm_lit.framework.VP`, but we do not call it: the official code evaluates them in single
# precision as $e^{f} - 1$ and $\ln(1 + \sigma^2)$, where `framework.VP` computes in double
# precision with `expm1` and `log1p`. At the smallest training time $\epsilon_t = 10^{-5}$ the two
# differ visibly (the check below), and a pretrained VP network was trained on the official numbers,
# so the preconditioner and the loss keep them, in the dtype of their argument.

# %% tags=["export"]
def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    """sigma(t) of VP (Table 1), in the official arithmetic, in t's dtype. Chapter 4."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * t**2 + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d=19.9, beta_min=0.1):
    """t = sigma^-1(sigma) of VP (Table 1), in the official arithmetic. Chapter 4."""
    sigma = torch.as_tensor(sigma)
    root = (beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt()
    return (root - beta_min) / beta_d


def _check_vp(beta_d, beta_min, epsilon_t):
    if not (beta_d > 0 and beta_min >= 0 and 0 < epsilon_t < 1):
        raise ValueError("need beta_d > 0, beta_min >= 0, 0 < epsilon_t < 1; got "
                         f"beta_d={beta_d}, beta_min={beta_min}, epsilon_t={epsilon_t}")


class VPPrecond(Precond):
    """VP preconditioning (Table 1): noise prediction, c_noise = (M-1) t. Chapter 4."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5,
                 model_type="SongUNet", **model_kwargs):
        _check_vp(beta_d, beta_min, epsilon_t)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         **model_kwargs)
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t
        self.M = _check_count(M, "M", 2)
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        """sigma(t) of this VP schedule (`vp_sigma`)."""
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        """t = sigma^-1(sigma) of this VP schedule (`vp_sigma_inv`)."""
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def coefficients(self, sigma):
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise


class VEPrecond(Precond):
    """VE preconditioning (Table 1): predicts the noise, c_noise = ln(sigma / 2).
    Chapter 4."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0.02, sigma_max=100, model_type="SongUNet", **model_kwargs):
        sigma_min, sigma_max = _check_sigma_range(sigma_min, sigma_max)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         **model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


# %% [markdown]
# **iDDPM** was trained only on the $M$ noise levels of its table $u$ (Chapter 1), so it
# *rounds* σ to the nearest entry (`round_sigma`, which the samplers call on their time steps),
# and its noise condition is that entry's index, counted from the clean end. The table is a
# buffer of the module (`state_dict` key `u`, float32, built by `framework.iddpm_u` exactly as the
# official code builds it); the nearest entry is found with `torch.cdist`, as in the official
# code, so that near-ties are broken the same way.

# %% tags=["export"]
class iDDPMPrecond(Precond):
    """iDDPM preconditioning (Table 1): sigma snaps to the table u, c_noise = its index.
    Chapter 4."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 C_1=0.001, C_2=0.008, M=1000, model_type="DhariwalUNet",
                 **model_kwargs):
        M = _check_count(M, "M", 2)
        if not (0 < C_1 <= 1 and C_2 >= 0):
            raise ValueError(f"need 0 < C_1 <= 1, C_2 >= 0; got C_1={C_1}, C_2={C_2}")
        out_channels = 2 * _check_count(img_channels, "img_channels", 1)  # + variances
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         model_out_channels=out_channels, **model_kwargs)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        self.register_buffer("u", iddpm_u(M, C_1, C_2, dtype=torch.float32))
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def round_sigma(self, sigma, return_index=False):
        """The entry of u nearest to each sigma (in sigma's dtype), or its index j
        (int64), in sigma's shape and on its device."""
        sigma = torch.as_tensor(sigma)
        flat = sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1)
        distance = torch.cdist(flat, self.u.reshape(1, -1, 1))
        index = distance.argmin(dim=2).reshape(sigma.shape)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.to(sigma.device)

    def coefficients(self, sigma):
        j = self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), self.M - 1 - j


# %% [markdown]
# **EDM** is the derivation of §4.2, with $\sigma_\text{data} = 0.5$ (images in $[-1, 1]$) and no
# limits on σ.

# %% tags=["export"]
class EDMPrecond(Precond):
    """EDM preconditioning (Table 1; B.6): unit-variance input, target. Chapter 4."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0, sigma_max=float("inf"), sigma_data=0.5,
                 model_type="DhariwalUNet", **model_kwargs):
        sigma_min, sigma_max = _check_sigma_range(sigma_min, sigma_max)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         **model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


# %% [markdown]
# To run a forward pass we need an inner network. Chapter 5 brings the real ones; a tiny
# stand-in with the same calling convention, `F(x, noise_labels, class_labels=None, **kw)`,
# shows the wrapper at work: two convolutions, with the noise condition and the class label
# added in between.

# %%
class TinyNet(torch.nn.Module):
    """A stand-in inner network with the interface of Chapter 5's networks."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0,
                 hidden=16):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.map_noise = torch.nn.Linear(1, hidden)
        self.map_label = None
        if label_dim:
            self.map_label = torch.nn.Linear(label_dim, hidden, bias=False)
        self.conv_out = torch.nn.Conv2d(hidden, out_channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels.reshape(-1, 1).to(x.dtype))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels.to(x.dtype))
        h = torch.nn.functional.silu(self.conv_in(x) + emb[:, :, None, None])
        return self.conv_out(h)


# %% tags=["hide-input"]
nets = {"vp": VPPrecond(8, 3, model_type=TinyNet),
        "ve": VEPrecond(8, 3, model_type=TinyNet),
        "iddpm": iDDPMPrecond(8, 3, model_type=TinyNet),
        "edm": EDMPrecond(8, 3, label_dim=10, model_type=TinyNet)}
x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
for name, net in nets.items():
    D = net(x, torch.tensor(2.5, dtype=torch.float64))  # as the samplers call: float64
    keys = list(net.state_dict())
    print(f"{type(net).__name__:13s} sigma in [{net.sigma_min:.4g}, "
          f"{net.sigma_max:.4g}]  out {tuple(D.shape)} {D.dtype}  "
          f"state_dict: {keys[:2]} ... ({len(keys)} keys)")
    assert D.dtype == torch.float32 and D.shape == x.shape
    assert all(k.startswith("model.") for k in keys if k != "u")
    assert ("u" in keys) == (name == "iddpm")
assert nets["iddpm"].model.conv_out.out_channels == 6  # F predicts variances too
assert torch.equal(nets["iddpm"].u, iddpm_u(dtype=torch.float32))

# %% [markdown]
# **Check** — the VP numbers. In double precision the VP schedule of Chapter 1 and
# `vp_sigma`/`vp_sigma_inv` are the same functions; in single precision, as the official code
# runs them, $e^f - 1$ loses most digits when $f$ is tiny, so the official $\sigma_\text{min} = \sigma(\epsilon_t)$
# comes out as $2^{-10} \approx$ {glue:text}`vp_smin_f32` instead of {glue:text}`vp_smin_f64` — a
# {glue:text}`vp_smin_gap` % difference we keep for compatibility with pretrained VP networks.

# %% tags=["hide-input"]
vp64 = VP(epsilon_s=1e-5)
t = torch.linspace(1e-3, 1, 200, dtype=torch.float64)
err = ((vp_sigma(t) - vp64.sigma(t)).abs() / vp64.sigma(t)).max().item()
err_inv = ((vp_sigma_inv(vp64.sigma(t)) - t).abs() / t).max().item()
vp_net = nets["vp"]
gap = vp64.sigma_min / vp_net.sigma_min - 1
print(f"float64: |vp_sigma - VP.sigma| {err:.1e}, |vp_sigma_inv(sigma(t)) - t| "
      f"{err_inv:.1e} (relative)")
print(f"sigma_min: official float32 arithmetic {vp_net.sigma_min:.7f}, exact "
      f"{vp64.sigma_min:.7f}; sigma_max {vp_net.sigma_max:.4f} vs {vp64.sigma_max:.4f}")
assert err < 1e-12 and err_inv < 2e-12
assert vp_net.sigma_min == 2**-10 and 0.02 < gap < 0.03
assert abs(vp_net.sigma_max / vp64.sigma_max - 1) < 1e-7
glue("vp_smin_f32", f"{vp_net.sigma_min:.6f}", display=False)
glue("vp_smin_f64", f"{vp64.sigma_min:.7f}", display=False)
glue("vp_smin_gap", f"{100 * gap:.1f}", display=False)

# %% [markdown]
# **Check** — iDDPM's rounding: every σ maps to its nearest table entry, and the noise
# condition is $M - 1 - j$. A σ exactly on the table is left alone, and one below
# $u_{M-1}/2 \approx$ {glue:text}`u_half` rounds to $u_M = 0$ (the samplers clamp σ to
# `sigma_min` first).

# %% tags=["hide-input"]
idd = nets["iddpm"]
sig = torch.tensor([0.002, 0.05, 1.0, 30.0, 80.0, idd.u[500]], dtype=torch.float64)
j, rounded = idd.round_sigma(sig, return_index=True), idd.round_sigma(sig)
nearest = (sig[:, None] - idd.u[None, :].double()).abs().argmin(1)
print("sigma", sig.tolist(), "\n  -> u_j", [f"{v:.4g}" for v in rounded.tolist()],
      "j", j.tolist())
assert torch.equal(j, nearest) and rounded.dtype == torch.float64
assert rounded[-1] == sig[-1]  # a sigma on the table stays
assert idd.round_sigma(torch.tensor(80.0)).shape == ()
c_noise = idd.coefficients(sig.float().reshape(-1, 1, 1, 1))[3].flatten()
assert torch.equal(c_noise, (999 - nearest).float())
u_half = idd.u[999].item() / 2  # below it, sigma rounds to u_M = 0
assert idd.round_sigma(u_half * 0.99) == 0
assert idd.round_sigma(u_half * 1.01) == idd.u[999]
glue("u_half", f"{u_half:.4f}", display=False)

# %% [markdown]
# **Check** — the coefficients against the table, written out independently in double precision.

# %% tags=["hide-input"]
s64 = torch.logspace(-3, 2, 41, dtype=torch.float64)
sd, one = 0.5, torch.ones_like(s64)
table = {
    "vp": (one, -s64, 1 / torch.sqrt(s64**2 + 1), 999 * vp64.sigma_inv(s64)),
    "ve": (one, s64, one, torch.log(s64 / 2)),
    "edm": (sd**2 / (s64**2 + sd**2), s64 * sd / torch.sqrt(s64**2 + sd**2),
            1 / torch.sqrt(s64**2 + sd**2), torch.log(s64) / 4),
}
for name, expected in table.items():
    got = [torch.as_tensor(c, dtype=torch.float64).expand_as(s64)
           for c in nets[name].coefficients(s64)]
    worst = max(((g - e).abs() / e.abs().clamp_min(1e-300)).max().item()
                for g, e in zip(got, expected))
    print(f"{name:4s}: largest relative difference from Table 1: {worst:.1e}")
    # VP: ln(1 + sigma^2) loses ~1e-10 against log1p at sigma = 0.001
    assert worst < (3e-10 if name == "vp" else 1e-15)

# %% [markdown]
# **Look** — the four functions of each column against σ, computed by the exported
# preconditioners' `coefficients` (VP's and iDDPM's $c_\text{out} = -\sigma$ is drawn as
# $|c_\text{out}|$; $c_\text{noise}$ takes negative values, so its axis is linear near zero and
# logarithmic beyond ±1). The three older columns share $c_\text{skip} = 1$ and $|c_\text{out}| = \sigma$
# (noise prediction), and their $c_\text{in}$ is 1 (VE) or tends to 1 below σ ≈ 1 (VP, iDDPM);
# EDM's $c_\text{skip}$ hands over from the input to the network around $\sigma = \sigma_\text{data}$, and
# its $|c_\text{out}|$ levels off at $\sigma_\text{data}$. The noise conditions differ in kind: VP's
# and iDDPM's count discrete time steps (up to $M - 1 = 999$; iDDPM's is a staircase, its table
# index), VE's and EDM's are logarithms of σ.

# %%
sig_plot = torch.logspace(-3, 2, 301, dtype=torch.float64)
coef = {}  # name -> [c_skip, |c_out|, c_in, c_noise], each [301]
for name, net in nets.items():
    coef[name] = [torch.as_tensor(c, dtype=torch.float64).expand_as(sig_plot)
                  for c in net.coefficients(sig_plot)]
    coef[name][1] = coef[name][1].abs()
fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
styles = {"vp": dict(ls="-"), "ve": dict(ls="--"), "iddpm": dict(ls=":", lw=2.5),
          "edm": dict(ls="-", lw=2.5)}
labels = ["c_skip(σ)", "|c_out(σ)|", "c_in(σ)", "c_noise(σ)"]
for k, (ax, label) in enumerate(zip(axes, labels)):
    for name, cs in coef.items():
        ax.plot(sig_plot, cs[k], label=name, **styles[name])
    ax.set(xscale="log", yscale="symlog" if k == 3 else "log", xlabel="σ", title=label)
axes[3].set_yscale("symlog", linthresh=1)
_ = axes[0].legend()
plt.tight_layout()
# what the figure shows: EDM hands over around sigma_data, the others never do; every
# c_noise grows with sigma
edm_c = coef["edm"]
handover = sig_plot[(edm_c[0] - 0.5).abs().argmin()].item()
assert abs(handover / 0.5 - 1) < 0.025 and (edm_c[1] <= 0.5).all()
assert abs(edm_c[1][-1] / 0.5 - 1) < 2e-5
for n in ["vp", "ve", "iddpm"]:
    assert (coef[n][0] == 1).all() and torch.allclose(coef[n][1], sig_plot, rtol=1e-6)
assert all((cs[3][1:] >= cs[3][:-1]).all() for cs in coef.values())

# %% [markdown]
# ## 4.4 What the network sees
#
# > "note that any errors made by the network are amplified by a factor of σ" (Sec. 5, on
# > noise prediction)
#
# Now the numbers behind the design. We take the image-shaped mixture of Chapter 1 as data
# (its $\sigma_\text{data}$ is {glue:text}`sd_toy`, so we pass that to EDM), noise it at σ from 0.002 to
# 100, and measure for each preconditioner the standard deviation of the network's input
# $c_\text{in}(\mathbf{y}+\mathbf{n})$ and of the effective target of Eq. 8, and the amplification
# $|c_\text{out}|$ of the network's errors.

# %%
gm = toy_image_mixture()
sd_toy = gm.data_std
glue("sd_toy", f"{sd_toy:.2f}", display=False)
stat_nets = {**nets, "edm": EDMPrecond(8, 3, sigma_data=sd_toy, model_type=TinyNet)}
y = gm.sample(MODE.pick(quick=2048, full=8192))
sigmas = torch.logspace(math.log10(0.002), 2, 31, dtype=torch.float64)
stats = {name: {"input": [], "target": [], "c_out": []} for name in stat_nets}
for sigma in sigmas:
    xn = y + sigma * torch.randn_like(y)
    for name, net in stat_nets.items():
        c_skip, c_out, c_in, _ = net.coefficients(sigma)
        stats[name]["input"].append((c_in * xn).std().item())
        stats[name]["target"].append(((y - c_skip * xn) / c_out).std().item())
        stats[name]["c_out"].append(abs(float(c_out)))
stats = {n: {k: torch.tensor(v, dtype=torch.float64) for k, v in s.items()}
         for n, s in stats.items()}
for name, s in stats.items():
    print(f"{name:5s} input std in [{s['input'].min():.3f}, {s['input'].max():7.3f}]   "
          f"target std in [{s['target'].min():.3f}, {s['target'].max():.3f}]   "
          f"|c_out| up to {s['c_out'].max():.3g}")

# %% [markdown]
# **Check** — with EDM both the input and the target have unit variance at every σ (up to
# sampling error and the mixture's non-zero mean), and the amplification never exceeds
# $\sigma_\text{data}$. The other three keep the *target* at unit variance too — they predict
# the noise $\mathbf{n}/\sigma$, which has unit variance by construction — but not the input:
# VE's input grows like σ, and VP/iDDPM shrink small-σ inputs to $\sigma_\text{data} \approx$ {glue:text}`sd_toy`
# because their scaling assumes $\sigma_\text{data} = 1$. And their errors are amplified by $|c_\text{out}| = \sigma$,
# 100-fold at σ = 100: at large σ a noise predictor must be extremely precise, because
# $D = \mathbf{x} - \sigma F$ is the difference of two large quantities.

# %% tags=["hide-input"]
edm_s = stats["edm"]
assert ((edm_s["input"] - 1).abs() < 0.015).all()
assert ((edm_s["target"] - 1).abs() < 0.015).all()
assert (edm_s["c_out"] <= sd_toy).all() and (edm_s["c_out"] < sigmas).all()
for name in ["vp", "ve", "iddpm"]:
    assert ((stats[name]["target"] - 1).abs() < 0.015).all()  # unit-variance noise
    assert torch.allclose(stats[name]["c_out"], sigmas, rtol=1e-6)  # errors times sigma
assert abs(stats["ve"]["input"].max() / 100 - 1) < 0.02  # VE's input grows like sigma
for name in ["vp", "iddpm"]:  # VP, iDDPM: small-sigma inputs shrink to sigma_data
    assert abs(stats[name]["input"].min() / sd_toy - 1) < 0.02

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
titles = {"input": "std of the network input c_in(y+n)",
          "target": "std of the effective target (Eq. 8)",
          "c_out": "error amplification |c_out|"}
for ax, key in zip(axes, ["input", "target", "c_out"]):
    for name, s in stats.items():
        ax.plot(sigmas, s[key], label=name, **styles[name])
    ylabel = "standard deviation" if key != "c_out" else "|c_out(σ)|"
    ax.set(xscale="log", yscale="log", xlabel="σ", ylabel=ylabel, title=titles[key])
axes[1].set_ylim(0.5, 2)
_ = axes[0].legend()
plt.tight_layout()

# %% [markdown]
# ## 4.5 The ideal network
#
# For data whose ideal denoiser $D^*$ we know (Chapter 1), Eq. 7 solved for $F$ gives the
# network a perfect training run would produce,
#
# $$F^*\big(c_\text{in}(\sigma)\,\mathbf{x};\ c_\text{noise}(\sigma)\big) = \frac{D^*(\mathbf{x}; \sigma) - c_\text{skip}(\sigma)\,\mathbf{x}}{c_\text{out}(\sigma)} ,$$
#
# evaluated at the input and condition it receives. For EDM we can
# undo both, $\sigma = e^{4 c_\text{noise}}$ and $\mathbf{x} = (c_\text{in}\mathbf{x}) / c_\text{in}(\sigma)$,
# so $F^*$ is an inner network like any other and `EDMPrecond` can wrap it through `model_type`.
#
# **Check** — wrapped in the preconditioner, $F^*$ gives back $D^*$ to single precision (a few
# units of float32 rounding, the dtype the preconditioner computes in).

# %% tags=["export:course"]
class IdealF(torch.nn.Module):
    """F* = (D* - c_skip x) / c_out of EDM preconditioning for a mixture. Chapter 4."""

    def __init__(self, mixture, sigma_data, img_resolution, in_channels, out_channels,
                 label_dim=0):
        super().__init__()
        self.mixture, self.sigma_data = mixture, sigma_data

    def forward(self, x_in, noise_labels, class_labels=None, augment_labels=None):
        sigma = (4 * noise_labels.to(torch.float64)).exp().reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        x = x_in.to(torch.float64) * (sigma**2 + sd**2).sqrt()  # undo c_in
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        D = self.mixture.denoise(x, sigma.flatten().expand(len(x)))
        return ((D - c_skip * x) / c_out).to(x_in.dtype)


# %% tags=["hide-input"]
ideal_net = EDMPrecond(8, 3, sigma_data=sd_toy,
                       model_type=functools.partial(IdealF, gm, sd_toy))
for sigma in [0.002, 0.1, 1.0, 10.0, 80.0]:
    noise = sigma * torch.randn(64, *gm.shape, dtype=torch.float64)
    xn = (gm.sample(64) + noise).float()
    D_ref = gm.denoise(xn.double(), sigma)
    D = ideal_net(xn, torch.tensor(sigma))
    err = ((D - D_ref).abs().max() / D_ref.abs().max()).item()
    print(f"sigma={sigma:<6}: |D(c_skip x + c_out F*) - D*| / |D*| = {err:.1e}")
    assert err < 5e-7

# %% [markdown]
# ## 4.6 The training losses
#
# > "The probability of sampling a given noise level σ is given by $p_\text{train}(\sigma)$ and
# > the corresponding weight is given by $\lambda(\sigma)$." (Sec. 5)
#
# A loss call draws one σ per image from the training distribution $p_\text{train}$ of Table 1,
# noises the images, and returns the weighted squared error $\lambda(\sigma)\,\|D(\mathbf{y}+\mathbf{n}; \sigma) - \mathbf{y}\|^2$
# **per element**, `[N, C, H, W]`, unreduced (the training loop sums it). The three losses of
# the official code differ only in $p_\text{train}$ and $\lambda$:
#
# | | VP | VE | EDM |
# |---|---|---|---|
# | training σ | $\sigma(t)$, $t \sim \mathcal{U}(\epsilon_t, 1)$ | $\ln\sigma \sim \mathcal{U}(\ln\sigma_\text{min}, \ln\sigma_\text{max})$ | $\ln\sigma \sim \mathcal{N}(P_\text{mean}, P_\text{std}^2)$ |
# | $\lambda(\sigma)$ | $1/\sigma^2$ | $1/\sigma^2$ | $(\sigma^2 + \sigma_\text{data}^2) / (\sigma\sigma_\text{data})^2$ |
# | constants | $\beta_d = 19.9$, $\beta_\text{min} = 0.1$, $\epsilon_t = 10^{-5}$ | $\sigma_\text{min} = 0.02$, $\sigma_\text{max} = 100$ | $P_\text{mean} = -1.2$, $P_\text{std} = 1.2$, $\sigma_\text{data} = 0.5$ |
#
# With λ = 1/σ², the VP and VE effective weight $\lambda c_\text{out}^2$ is 1 too; what EDM
# changes is the preconditioning (§4.4) and *where* it trains (Chapter 5b).
#
# The order of the random draws is part of the interface: first σ (one number per image,
# `[N, 1, 1, 1]`), then the augmentation (Chapter 6; it returns the augmented images and their
# augmentation labels, which reach the network as `augment_labels`), then the noise with
# `torch.randn_like`. With the same seed, the same images and the same network, our losses then
# return the official code's numbers, to float32 rounding (`tests/test_precond_loss.py` checks
# it against reference outputs).

# %% tags=["export:loss"]
def _one_per_image(images):
    """The shape [N, 1, 1, 1] of a per-image quantity such as the training sigma."""
    return (images.shape[0], 1, 1, 1)


class DenoisingLoss:
    """lambda(sigma) ||D(y + n; sigma) - y||^2 per element, sigma ~ p_train (Eq. 2
    weighted, Table 1). Chapter 4.

    A subclass states its column of Table 1 with two methods: `draw_sigma(images)`, the
    training sigma of each image ([N, 1, 1, 1], the first random draw), and
    `weight(sigma)`, lambda(sigma).
    """

    def draw_sigma(self, images):
        raise NotImplementedError

    def weight(self, sigma):
        raise NotImplementedError

    def __call__(self, net, images, labels=None, augment_pipe=None):
        """The unreduced loss [N, C, H, W]; draws sigma, the augmentation, the noise."""
        if images.ndim != 4:
            raise ValueError("images must have shape [N, C, H, W], "
                             f"got {tuple(images.shape)}")
        sigma = self.draw_sigma(images)  # p_train: the first draw
        if augment_pipe is None:
            clean, augment_labels = images, None
        else:  # the augmentation draws next, and tells the network what it did
            clean, augment_labels = augment_pipe(images)
        noisy = clean + sigma * torch.randn_like(clean)  # y + n, the last draw
        error = net(noisy, sigma, labels, augment_labels=augment_labels) - clean
        return self.weight(sigma) * error.square()


def _inverse_square(sigma):
    """lambda(sigma) = 1 / sigma^2, the weight of the noise predictors VP and VE."""
    return sigma.square().reciprocal()


class VPLoss(DenoisingLoss):
    """VP training loss (Table 1): sigma(t), t ~ U(epsilon_t, 1); lambda = 1/sigma^2.
    Chapter 4."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        if not (beta_d > 0 and beta_min >= 0 and 0 < epsilon_t < 1):
            raise ValueError("need beta_d > 0, beta_min >= 0, 0 < epsilon_t < 1; got "
                             f"beta_d={beta_d}, beta_min={beta_min}, "
                             f"epsilon_t={epsilon_t}")
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def sigma(self, t):
        """sigma(t) of the VP schedule (`edm_lit.precond.vp_sigma`)."""
        return vp_sigma(t, self.beta_d, self.beta_min)

    def draw_sigma(self, images):
        # t = 1 - (1 - epsilon_t) u runs from 1 down to epsilon_t as u runs from 0 to 1
        u = torch.rand(_one_per_image(images), device=images.device)
        return self.sigma(1 - (1 - self.epsilon_t) * u)

    def weight(self, sigma):
        return _inverse_square(sigma)


class VELoss(DenoisingLoss):
    """VE training loss (Table 1): ln sigma ~ U(ln sigma_min, ln sigma_max);
    lambda = 1/sigma^2. Chapter 4."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        if not 0 < sigma_min < sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max, got "
                             f"sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def draw_sigma(self, images):
        # log-uniform: sigma = sigma_min (sigma_max / sigma_min)^u, u uniform on [0, 1)
        u = torch.rand(_one_per_image(images), device=images.device)
        return self.sigma_min * torch.pow(self.sigma_max / self.sigma_min, u)

    def weight(self, sigma):
        return _inverse_square(sigma)


class EDMLoss(DenoisingLoss):
    """EDM training loss (Sec. 5): ln sigma ~ N(P_mean, P_std^2); lambda = 1/c_out^2.
    Chapter 4."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        if not (P_std >= 0 and sigma_data > 0):
            raise ValueError("need P_std >= 0 and sigma_data > 0, got "
                             f"P_std={P_std}, sigma_data={sigma_data}")
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def draw_sigma(self, images):
        # log-normal: ln sigma = P_mean + P_std z with z standard normal
        z = torch.randn(_one_per_image(images), device=images.device)
        return torch.exp(self.P_mean + self.P_std * z)

    def weight(self, sigma):
        # 1 / c_out(sigma)^2, c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
        sd = self.sigma_data
        return (sigma.square() + sd**2) / (sd * sigma).square()


# %% [markdown]
# **Check** — the draw order. A network that records what it is given, and a replay of the
# random stream by hand: the first draw makes σ, the next one (after an augmentation that
# draws numbers of its own) makes the noise.

# %% tags=["hide-input"]
class Recorder(torch.nn.Module):
    """Returns its input unchanged and remembers the call: a stand-in 'network'."""

    def forward(self, x, sigma, class_labels=None, **kwargs):
        self.calls = getattr(self, "calls", []) + [(x, sigma, class_labels, kwargs)]
        return x


def flip_augment(images):
    """A toy augmentation: mirror each image with probability 1/2; (images, labels)."""
    flip = torch.rand([images.shape[0], 1, 1, 1], device=images.device) < 0.5
    flip = flip.to(images.dtype)
    return images * (1 - flip) + images.flip(3) * flip, flip.reshape(-1, 1)


images = gm.sample(8).float()
sigma_from_first_draw = {  # how each loss turns its first draw into sigma (Table 1)
    VPLoss: lambda r: vp_sigma(1 + r * (1e-5 - 1)),
    VELoss: lambda r: 0.02 * (100 / 0.02) ** r,
    EDMLoss: lambda r: (r * 1.2 - 1.2).exp(),
}
for cls, to_sigma in sigma_from_first_draw.items():
    rec, loss_fn = Recorder(), cls()
    torch.manual_seed(7)
    loss = loss_fn(rec, images, augment_pipe=flip_augment)
    torch.manual_seed(7)  # replay the stream by hand
    first = torch.randn(8, 1, 1, 1) if cls is EDMLoss else torch.rand(8, 1, 1, 1)
    y_aug, aug_labels = flip_augment(images)
    noise_unit = torch.randn_like(y_aug)
    x_in, sigma, _, kwargs = rec.calls[0]
    assert torch.equal(sigma, to_sigma(first))
    assert torch.equal(kwargs["augment_labels"], aug_labels)
    assert torch.equal(x_in, y_aug + noise_unit * sigma)
    assert torch.equal(loss, loss_fn.weight(sigma) * (x_in - y_aug) ** 2)
    first4 = [f"{s:.3g}" for s in sigma.flatten()[:4].tolist()]
    print(f"{cls.__name__}: sigma = {first4} ... from the first draw; "
          "noise drawn after the augmentation")

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.precond`: `Precond`, the forward pass of Eq. 7 shared by the four
# columns of Table 1, `VPPrecond`, `VEPrecond`, `iDDPMPrecond` (its table buffer `u`,
# `round_sigma(sigma, return_index)`) and `EDMPrecond`, with the official constructor
# arguments and defaults and the inner network as `self.model` (a class or the name of a
# Chapter 5 network); and `vp_sigma`, `vp_sigma_inv`, the VP schedule in the official
# single-precision arithmetic. Exported to `edm_lit.loss`: `DenoisingLoss` and `VPLoss`,
# `VELoss`, `EDMLoss` (`loss(net, images, labels=None, augment_pipe=None)` → the per-element
# loss `[N, C, H, W]`; σ drawn first, then the augmentation, then the noise). The ideal
# network `IdealF` of §4.5 goes to `edm_lit.course` (a book helper, not library API). Chapter 5
# puts real networks inside the preconditioners; Chapter 5b measures where training pays.

# %% tags=["hide-cell"]
# the numbers the answer to exercise 2 quotes: §4.4 with sigma_data = 0.5 on the mixture
ex_net, ex2 = EDMPrecond(8, 3, sigma_data=0.5, model_type=TinyNet), {}
for where, sigma in [("small", sigmas[0]), ("large", sigmas[-1])]:
    xn = y + sigma * torch.randn_like(y)
    c_skip, c_out, c_in, _ = ex_net.coefficients(sigma)
    ex2[where] = ((c_in * xn).std().item(), ((y - c_skip * xn) / c_out).std().item())
    glue(f"ex2_{where}_in", f"{ex2[where][0]:.2f}", display=False)
    glue(f"ex2_{where}_target", f"{ex2[where][1]:.2f}", display=False)
ratio = sd_toy / 0.5
print(f"input/target std {ex2['small'][0]:.3f}/{ex2['small'][1]:.3f} at sigma = "
      f"{sigmas[0]:.3g}, {ex2['large'][0]:.3f}/{ex2['large'][1]:.3f} at sigma = "
      f"{sigmas[-1]:.3g}; sigma_data / 0.5 = {ratio:.3f}")
assert abs(ex2["small"][0] / ratio - 1) < 0.015 and abs(ex2["small"][1] - 1) < 0.015
assert abs(ex2["large"][0] - 1) < 0.015 and abs(ex2["large"][1] / ratio - 1) < 0.015
glue("sd_ratio", f"{ratio:.2f}", display=False)
glue("ex1_gain", f"{1 / nets['edm'].coefficients(torch.tensor(0.002))[1].item():.0f}",
     display=False)

# %% [markdown]
# ## Exercises
#
# 1. Which $c_\text{skip}$, $c_\text{out}$ would make the network predict the clean image
#    $\mathbf{y}$ directly? What would its effective target variance be at σ = 0.002?
# 2. Run §4.4 with `EDMPrecond(sigma_data=0.5)` on the mixture (true $\sigma_\text{data}
#    \approx$ {glue:text}`sd_toy`). How far from 1 do the input and target deviations get?
#
# :::{dropdown} Answers
# 1. $c_\text{skip} = 0$, $c_\text{out} = 1$: the target is $\mathbf{y}$ itself, with variance
#    $\sigma_\text{data}^2$ at every σ, but at σ = 0.002 the network must reproduce its input
#    almost exactly, and every error reaches $D$ unscaled; EDM's $c_\text{out} \approx \sigma$
#    there shrinks it {glue:text}`ex1_gain`-fold instead.
# 2. At small σ the input std drops to {glue:text}`ex2_small_in` (≈ $\sigma_\text{data}/0.5$ =
#    {glue:text}`sd_ratio`) while the target (the noise) stays at {glue:text}`ex2_small_target`;
#    at large σ the input returns to {glue:text}`ex2_large_in` and the target, now essentially
#    $\mathbf{y}/\sigma_\text{data}$, drops to {glue:text}`ex2_large_target`. Neither strays far
#    from 1: a moderately wrong $\sigma_\text{data}$ costs little.
# :::
