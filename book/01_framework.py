# ---
# jupyter:
#   edm_lit:
#     export: framework
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
# # 1. The unified framework
#
# Every diffusion model in the paper does the same two things: it learns to **denoise** data
# at any noise level σ, and it **samples** by following an ordinary differential equation from
# pure noise (large σ) down to σ = 0, asking the denoiser for directions on the way. The
# models differ only in a few independent choices: how σ grows with time t, how the signal is
# scaled, and where the solver takes its steps. This chapter writes those choices down as code
# (`edm_lit.framework`) and builds *ground truth*: data sets whose ideal denoiser we know in
# closed form, so that every later claim can be checked exactly.

# %% tags=["export"]
import math

import torch

# %%
import functools

import matplotlib.pyplot as plt
import numpy as np
import torch
from myst_nb import glue

from edm_lit.mode import get_mode

MODE = get_mode()
torch.manual_seed(0)
# most tensors here are tiny: one thread is fastest, and immune to a busy machine
torch.set_num_threads(1)
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})

# %% [markdown]
# ## 1.1 Noise levels and the ideal denoiser
#
# > Let us denote the data distribution by $p_\text{data}(\mathbf{x})$, with standard
# > deviation $\sigma_\text{data}$, and consider the family of mollified distributions
# > $p(\mathbf{x}; \sigma)$ obtained by adding i.i.d. Gaussian noise of standard deviation
# > $\sigma$ to the data. (Sec. 2)
#
# For $\sigma_\text{max} \gg \sigma_\text{data}$, $p(\mathbf{x}; \sigma_\text{max})$ is
# indistinguishable from pure Gaussian noise; at $\sigma = 0$ it is the data. A **denoiser**
# $D(\mathbf{x}; \sigma)$ minimises the expected $L_2$ error (Eq. 2)
#
# $$\mathbb{E}_{\mathbf{y}\sim p_\text{data}} \mathbb{E}_{\mathbf{n}\sim\mathcal{N}(\mathbf{0},\sigma^2\mathbf{I})} \left\| D(\mathbf{y}+\mathbf{n}; \sigma) - \mathbf{y} \right\|_2^2 ,$$
#
# so the ideal one is the posterior mean $D(\mathbf{x}; \sigma) = \mathbb{E}[\mathbf{y} \mid \mathbf{y}+\mathbf{n} = \mathbf{x}]$.
# Tweedie's formula ties it to the **score** of the noised distribution (Eq. 3):
#
# $$\nabla_{\mathbf{x}} \log p(\mathbf{x}; \sigma) = \big(D(\mathbf{x}; \sigma) - \mathbf{x}\big) / \sigma^2 .$$
#
# The score is all the ODE below needs; a network that denoises gives us the score for free.
#
# ### Ground truth: a Gaussian mixture
#
# If $p_\text{data} = \sum_k w_k\, \mathcal{N}(\boldsymbol{\mu}_k, s_k^2 \mathbf{I})$, adding noise keeps
# it a mixture: $p(\mathbf{x}; \sigma) = \sum_k w_k\, \mathcal{N}(\boldsymbol{\mu}_k, (s_k^2 + \sigma^2)\mathbf{I})$.
# With responsibilities $r_k(\mathbf{x}) \propto w_k\, \mathcal{N}(\mathbf{x}; \boldsymbol{\mu}_k, v_k \mathbf{I})$,
# $v_k = s_k^2 + \sigma^2$, everything is closed form:
#
# $$\nabla_{\mathbf{x}} \log p = \sum_k r_k \frac{\boldsymbol{\mu}_k - \mathbf{x}}{v_k}, \qquad
#   D(\mathbf{x}; \sigma) = \sum_k r_k \left(\boldsymbol{\mu}_k + \frac{s_k^2}{v_k}(\mathbf{x} - \boldsymbol{\mu}_k)\right).$$
#
# A **finite data set** $\{\mathbf{y}_i\}$ is the special case $s_k = 0$: its ideal denoiser is a
# softmax-weighted average of the training points — what a network that memorises its data
# would compute. The class below follows the denoiser interface of the official code
# (`net(x, sigma, class_labels)` with `sigma_min`, `sigma_max`, `round_sigma`), so samplers
# can run on it exactly as on a trained network. Shapes are any `[N, *shape]`, images
# included. First, the checks of its inputs (private helpers):

# %% tags=["export"]
def _as_f64(value, name: str) -> torch.Tensor:
    if torch.is_tensor(value):
        t = value.detach().to(torch.float64)
    else:
        t = torch.as_tensor(value, dtype=torch.float64)
    if torch.isnan(t).any():
        raise ValueError(f"{name} must not be NaN")
    return t


def _check_sigma(sigma, name: str = "sigma") -> torch.Tensor:
    """Noise levels as float64; refuses negative, infinite or NaN values."""
    sigma = _as_f64(sigma, name)
    if not torch.isfinite(sigma).all() or (sigma < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got min "
                         f"{sigma.min().item():g}, max {sigma.max().item():g}")
    return sigma


def _mixture_args(means, stds, weights):
    """A mixture's means [K, *shape], stds [K] and normalised weights [K], checked."""
    means = _as_f64(means, "means")
    if means.ndim < 2:
        raise ValueError("means must be [K, *shape] with at least one event dimension, "
                         f"got shape {tuple(means.shape)}")
    K = means.shape[0]
    stds = _as_f64(stds, "stds")
    if stds.numel() == 1:
        stds = stds.reshape(()).expand(K).clone()
    if stds.shape != (K,):
        raise ValueError(f"stds must be a scalar or have shape [{K}], "
                         f"got {tuple(stds.shape)}")
    if (stds < 0).any() or not torch.isfinite(stds).all():
        raise ValueError("stds must be finite and >= 0")
    if weights is None:
        weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
    weights = _as_f64(weights, "weights")
    if weights.shape != (K,) or (weights <= 0).any():
        raise ValueError(f"weights must be [{K}] and positive, "
                         f"got {tuple(weights.shape)}")
    return means, stds, weights / weights.sum()


def _flatten(x, sigma, shape, device):
    """x [N, *shape] as float64 [N, D], and sigma (a scalar or [N]) as float64 [N]."""
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"x must have shape [N, {', '.join(map(str, shape))}], "
                         f"got {tuple(x.shape)}")
    N = x.shape[0]
    sigma = _check_sigma(sigma).to(device).reshape(-1)
    if sigma.numel() not in (1, N):
        raise ValueError("sigma must be a scalar or hold one value per sample "
                         f"({N}), got {sigma.numel()} values")
    return x.to(torch.float64).reshape(N, -1), sigma.expand(N)


# %% tags=["export"]
class GaussianMixture:
    """p_data = sum_k w_k N(mu_k, s_k^2 I): closed-form p(x; sigma), score and ideal
    denoiser (Eq. 2, 3). Chapter 1.

    `means` [K, *shape] (e.g. [K, C, H, W]); `stds` a scalar or [K] (0 gives a point
    mass: `GaussianMixture.from_data(images)` is a finite data set); `weights` [K].
    `gm(x, sigma, class_labels=None)` returns D(x; sigma) like a trained network.
    """

    sigma_min, sigma_max, label_dim = 0.0, float("inf"), 0  # the denoiser interface

    def __init__(self, means, stds=0.0, weights=None):
        self.means, self.stds, self.weights = _mixture_args(means, stds, weights)
        self.shape = tuple(self.means.shape[1:])
        self.dim = math.prod(self.shape)
        image = len(self.shape) == 3 and self.shape[1] == self.shape[2]
        self.img_channels = self.shape[0] if image else None
        self.img_resolution = self.shape[1] if image else None
        self._mu = self.means.reshape(len(self.weights), -1)
        self._mu_sq = self._mu.square().sum(1)

    @classmethod
    def from_data(cls, data):
        """The empirical distribution of a finite data set [N, *shape]: its ideal
        denoiser memorises the data."""
        return cls(data, stds=0.0)

    def __repr__(self):
        return f"GaussianMixture(K={len(self.weights)}, shape={self.shape})"

    @property
    def data_std(self) -> float:
        """Standard deviation of all coordinates of y ~ p_data pooled (sigma_data)."""
        mean = (self.weights @ self._mu).mean()
        spread = (self._mu - mean).square().sum(1) + self.dim * self.stds.square()
        return math.sqrt((self.weights @ spread).item() / self.dim)

    def to(self, device):
        """Move the mixture's tensors to `device` (the computations stay in float64)."""
        new = GaussianMixture.__new__(GaussianMixture)
        new.__dict__.update({k: (v.to(device) if torch.is_tensor(v) else v)
                             for k, v in self.__dict__.items()})
        return new

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """Draw n samples y ~ p_data as float64 [n, *shape]."""
        k = torch.multinomial(self.weights.cpu(), n, replacement=True,
                              generator=generator)
        eps = torch.randn((n, self.dim), dtype=torch.float64, generator=generator)
        k, eps = k.to(self._mu.device), eps.to(self._mu.device)
        return (self._mu[k] + self.stds[k, None] * eps).reshape(n, *self.shape)

    def round_sigma(self, sigma):
        """Any noise level is supported: identity (the official nets' interface)."""
        return torch.as_tensor(sigma)

    def _flat(self, x, sigma):
        return _flatten(x, sigma, self.shape, self._mu.device)

    def _log_resp(self, x, sigma):
        """log w_k N(x; mu_k, v_k I) per sample and component, and v = s^2 + sigma^2."""
        v = self.stds.square()[None, :] + sigma.square()[:, None]
        if (v == 0).any():
            raise ValueError("sigma must be > 0 for point masses (stds == 0), "
                             "e.g. a finite data set")
        d2 = x.square().sum(1, keepdim=True) - 2 * x @ self._mu.T + self._mu_sq[None, :]
        log_norm = 0.5 * self.dim * torch.log(2 * math.pi * v)
        return self.weights.log()[None, :] - log_norm - 0.5 * d2.clamp_min(0) / v, v

    def log_prob(self, x, sigma) -> torch.Tensor:
        """log p(x; sigma), one value per sample [N]."""
        logw, _ = self._log_resp(*self._flat(x, sigma))
        return torch.logsumexp(logw, dim=1)

    def score(self, x, sigma) -> torch.Tensor:
        """grad_x log p(x; sigma), from the mixture formula (not via Eq. 3)."""
        xf, s = self._flat(x, sigma)
        logw, v = self._log_resp(xf, s)
        r = torch.softmax(logw, dim=1)
        out = (r / v) @ self._mu - (r / v).sum(1, keepdim=True) * xf
        return out.reshape(x.shape)

    def denoise(self, x, sigma) -> torch.Tensor:
        """The ideal denoiser D(x; sigma) = E[y | y + n = x] (Eq. 2), float64."""
        xf, s = self._flat(x, sigma)
        logw, v = self._log_resp(xf, s)
        r = torch.softmax(logw, dim=1)
        shrink = self.stds.square()[None, :] / v
        out = (r * shrink).sum(1, keepdim=True) * xf + (r * (1 - shrink)) @ self._mu
        return out.reshape(x.shape)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        """D(x; sigma) in x's dtype: the interface of a trained denoiser network."""
        return self.denoise(x, sigma).to(x.dtype)


# %% [markdown]
# Image-shaped ground truth for the chapters that follow: smooth random "images" as the
# means of a mixture.

# %% tags=["export"]
def toy_image_mixture(num_components: int = 8, channels: int = 3, resolution: int = 8,
                      std: float = 0.1, seed: int = 0) -> GaussianMixture:
    """An image-shaped Gaussian mixture: smooth random 'images' in [-1, 1] as means,
    isotropic noise. Chapter 1."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_components, channels, 2, 2)
    coarse = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    means = torch.nn.functional.interpolate(coarse, size=(resolution, resolution),
                                            mode="bilinear", align_corners=True)
    return GaussianMixture(means, stds=std)


# %% [markdown]
# **Check** — three independent routes must agree. The mixture formula for the score must be
# the gradient of `log_prob` (autograd), and it must equal $(D - \mathbf{x})/\sigma^2$, Eq. 3,
# computed from the denoiser. We test an image-shaped mixture, `[3, 8, 8]`.

# %% tags=["hide-input"]
gm_img = toy_image_mixture()
x = gm_img.sample(16) + 0.7 * torch.randn(16, *gm_img.shape, dtype=torch.float64)
for sigma in [0.05, 0.7, 5.0]:
    xg = x.clone().requires_grad_(True)
    gm_img.log_prob(xg, sigma).sum().backward()
    by_formula = gm_img.score(x, sigma)
    by_eq3 = (gm_img.denoise(x, sigma) - x) / sigma**2
    scale = by_formula.abs().max().item()
    err_autograd = (by_formula - xg.grad).abs().max().item() / scale
    err_eq3 = (by_formula - by_eq3).abs().max().item() / scale
    print(f"sigma={sigma:<5} score vs autograd {err_autograd:.1e}   "
          f"score vs Eq. 3 {err_eq3:.1e}")
    assert err_autograd < 1e-13 and err_eq3 < 2e-15

# %% [markdown]
# **Check** — the denoiser is the posterior mean. In 1-D we can estimate
# $\mathbb{E}[y \mid x]$ by brute force: draw many pairs $(y, x = y + n)$, bin them by $x$,
# average $y$ in each bin. No formula of the mixture is used.

# %% tags=["hide-input"]
gm1 = GaussianMixture(torch.tensor([[-1.5], [0.0], [1.2]]),
                      stds=torch.tensor([0.2, 0.08, 0.3]),
                      weights=torch.tensor([0.3, 0.3, 0.4]))
n_mc = MODE.pick(quick=2_000_000, full=20_000_000)
sigma_mc = 0.5
y = gm1.sample(n_mc)
x_mc = y + sigma_mc * torch.randn_like(y)
edges = torch.linspace(-2.5, 2.5, 51, dtype=torch.float64)
idx = torch.bucketize(x_mc[:, 0], edges) - 1
ok = (idx >= 0) & (idx < 50)
counts = torch.bincount(idx[ok], minlength=50).double()
mc_mean = torch.bincount(idx[ok], weights=y[ok, 0], minlength=50) / counts
centres = 0.5 * (edges[1:] + edges[:-1])
exact = gm1.denoise(centres[:, None], sigma_mc)[:, 0]
print(f"max |MC - exact| = {(mc_mean - exact).abs().max():.4f} over 50 bins "
      f"({n_mc:,} pairs)")
assert (mc_mean - exact).abs().max() < 0.02

# %% [markdown]
# In many dimensions binning fails, but self-normalised importance sampling does not: with
# $\mathbf{y}_i \sim p_\text{data}$, $\mathbb{E}[\mathbf{y}\mid\mathbf{x}] \approx \sum_i w_i \mathbf{y}_i / \sum_i w_i$,
# $w_i = \exp(-\|\mathbf{x}-\mathbf{y}_i\|^2 / 2\sigma^2)$. We write it out in plain torch for the
# image mixture (192 dimensions). It is only trustworthy while the weights are spread over
# many samples; at small σ they collapse onto a handful, so we print the effective sample size
# and stay above σ = 0.7.

# %% tags=["hide-input"]
ys = gm_img.sample(MODE.pick(quick=200_000, full=2_000_000)).reshape(-1, gm_img.dim)
for sigma in [0.7, 1.0, 2.0, 4.0]:
    noise = sigma * torch.randn(4, *gm_img.shape, dtype=torch.float64)
    xq = (gm_img.sample(4) + noise).reshape(4, -1)
    w = torch.softmax(-torch.cdist(xq, ys).square() / (2 * sigma**2), dim=1)
    ess = (1 / w.square().sum(1)).min().item()  # effective sample size of the weights
    closed_form = gm_img.denoise(xq.reshape(4, *gm_img.shape), sigma).reshape(4, -1)
    err = (w @ ys - closed_form).abs().max().item()
    print(f"sigma={sigma}: max |importance-sampled - closed form| = {err:.4f}  "
          f"(effective samples >= {ess:,.0f})")
    assert err < 0.03 and ess > 100

# %% [markdown]
# ## 1.2 The probability-flow ODE
#
# > A probability flow ODE continuously increases or reduces noise level of the image when
# > moving forward or backward in time, respectively. (Sec. 2)
#
# Take a schedule $\sigma(t)$ and move a sample $\mathbf{x}$ so that it stays distributed as
# $p(\mathbf{x}; \sigma(t))$ while $t$ changes. The paper's Eq. 1 does exactly that:
#
# $$\mathrm{d}\mathbf{x} = -\dot\sigma(t)\, \sigma(t)\, \nabla_{\mathbf{x}} \log p\big(\mathbf{x}; \sigma(t)\big)\, \mathrm{d}t .$$
#
# Many earlier models also *scale* the signal, $\mathbf{x} = s(t)\, \hat{\mathbf{x}}$. The general
# form is Eq. 4,
#
# $$\mathrm{d}\mathbf{x} = \left[\frac{\dot s(t)}{s(t)}\mathbf{x} - s(t)^2\, \dot\sigma(t)\, \sigma(t)\, \nabla_{\mathbf{x}} \log p\!\left(\frac{\mathbf{x}}{s(t)}; \sigma(t)\right)\right] \mathrm{d}t ,$$
#
# where the gradient is taken with respect to $\mathbf{x}$ (so it carries a factor $1/s$ from
# the chain rule). Substituting Eq. 3 gives the slope that Algorithm 1 evaluates, written with
# the denoiser only:
#
# $$\frac{\mathrm{d}\mathbf{x}}{\mathrm{d}t} = \left(\frac{\dot\sigma(t)}{\sigma(t)} + \frac{\dot s(t)}{s(t)}\right)\mathbf{x} - \frac{\dot\sigma(t)\, s(t)}{\sigma(t)}\, D\!\left(\frac{\mathbf{x}}{s(t)}; \sigma(t)\right).$$
#
# Next to the slope we export an accurate reference solver (classical RK4), for exact
# trajectories. §1.3 checks the slope against Eq. 4 taken literally, once it has a schedule
# with $s(t) \ne 1$.

# %% tags=["export"]
def ode_slope(schedule, denoiser, x, t, class_labels=None) -> torch.Tensor:
    """dx/dt of the probability-flow ODE (Eq. 4 with Eq. 3, as in Algorithm 1), for
    t > 0. Chapter 1."""
    t = _as_f64(t, "t")
    sigma, s = schedule.sigma(t), schedule.s(t)
    if (sigma == 0).any():
        raise ValueError("the ODE slope is singular at sigma(t) = 0; stop at t > 0")
    dsigma, ds = schedule.sigma_deriv(t), schedule.s_deriv(t)
    D = denoiser(x / s, sigma, class_labels).to(torch.float64)
    return (dsigma / sigma + ds / s) * x - dsigma * s / sigma * D


def solve_ode_rk4(schedule, denoiser, x, t_grid, class_labels=None) -> torch.Tensor:
    """Reference solution of the ODE along `t_grid` (all t > 0) by classical RK4;
    returns every state [T, *x.shape].

    Not a sampler: it spends 4 denoiser calls per step to get an accurate ground truth.
    Chapter 1.
    """
    t_grid = _as_f64(t_grid, "t_grid").to(x.device)
    if t_grid.ndim != 1 or len(t_grid) < 2 or (t_grid <= 0).any():
        raise ValueError("t_grid must be 1-D with at least two times, all > 0")
    x = x.to(torch.float64)
    states = [x]

    def f(x_, t_):
        return ode_slope(schedule, denoiser, x_, t_, class_labels)

    for t0, t1 in zip(t_grid[:-1], t_grid[1:]):
        h = t1 - t0
        k1 = f(x, t0)
        k2 = f(x + 0.5 * h * k1, t0 + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, t0 + 0.5 * h)
        k4 = f(x + h * k3, t1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        states.append(x)
    return torch.stack(states)


# %% [markdown]
# ## 1.3 Table 1: four models, one framework
#
# > In our framework, there are no implicit dependencies between the components — any
# > choices (within reason) for the individual formulas will, in principle, lead to a
# > functioning model. (Sec. 2)
#
# The paper's Table 1 lists, for each model, the noise schedule $\sigma(t)$, the scaling
# $s(t)$ and the time steps $t_0 > t_1 > \dots > t_{N-1}$ at which the original sampler
# evaluates the network ($t_N = 0$ is appended). We make each column an object with the same
# methods: $\sigma(t)$, $\dot\sigma(t)$, $\sigma^{-1}(\sigma)$, $s(t)$, $\dot s(t)$ and
# `time_steps(N)`, with the paper's constants as defaults.
#
# | | VP | VE | iDDPM + DDIM | EDM |
# |---|---|---|---|---|
# | $\sigma(t)$ | $\sqrt{e^{\frac12\beta_d t^2 + \beta_\text{min} t} - 1}$ | $\sqrt t$ | $t$ | $t$ |
# | $s(t)$ | $1 / \sqrt{e^{\frac12\beta_d t^2 + \beta_\text{min} t}}$ | $1$ | $1$ | $1$ |
# | $t_{i<N}$ | $1 + \frac{i}{N-1}(\epsilon_s - 1)$ | $\sigma_\text{max}^2 (\sigma_\text{min}^2/\sigma_\text{max}^2)^{\frac{i}{N-1}}$ | $u_{\lfloor j_0 + \frac{M-1-j_0}{N-1} i + \frac12 \rfloor}$ | Eq. 5 |
# | constants | $\beta_d = 19.9$, $\beta_\text{min} = 0.1$, $\epsilon_s = 10^{-3}$ | $\sigma_\text{min} = 0.02$, $\sigma_\text{max} = 100$ | $C_1 = 0.001$, $C_2 = 0.008$, $M = 1000$, $j_0 = 8$ | $\sigma_\text{min} = 0.002$, $\sigma_\text{max} = 80$, $\rho = 7$ |
#
# Each schedule's time runs over $[0, t_\text{max}]$ with $\sigma(t_\text{max}) = \sigma_\text{max}$;
# a time outside that range, or a negative σ, is refused with a `ValueError`.

# %% tags=["export"]
class Schedule:
    """One column of Table 1: sigma(t), s(t), their derivatives, sigma^-1 and the time
    steps. Chapter 1.

    Subclasses give the formulas (`_sigma`, `_sigma_deriv`, `_sigma_inv`, `_s`,
    `_s_deriv`, `_time_steps`); the public methods take floats or tensors, validate the
    range and return float64 tensors.
    """

    name = "schedule"

    def __init__(self, sigma_min: float, sigma_max: float):
        if not (0 < sigma_min < sigma_max < math.inf):
            raise ValueError("need 0 < sigma_min < sigma_max < inf, got "
                             f"sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def __repr__(self):
        return (f"{type(self).__name__}(sigma_min={self.sigma_min:g}, "
                f"sigma_max={self.sigma_max:g})")

    @property
    def t_max(self) -> float:
        """The time at which sigma(t) = sigma_max; the schedule lives on [0, t_max]."""
        return float(self._sigma_inv(torch.tensor(self.sigma_max, dtype=torch.float64)))

    def _t_gap(self) -> float:
        """Times in (0, _t_gap()) have no real sigma(t): 0 here; a VP schedule with
        beta_min < 0 has a gap."""
        return 0.0

    def _check_t(self, t) -> torch.Tensor:
        t = _as_f64(t, "t")
        t_max, gap = self.t_max, self._t_gap()
        outside = (t < 0) | (t > t_max * (1 + 1e-12)) | ((t > 0) & (t < gap))
        if not torch.isfinite(t).all() or outside.any():
            where = f"[0, {t_max:g}]" + (f" outside (0, {gap:g})" if gap else "")
            raise ValueError(f"{self.name}: t must lie in {where}, got values in "
                             f"[{t.min().item():g}, {t.max().item():g}]")
        return t

    def sigma(self, t) -> torch.Tensor:
        return self._sigma(self._check_t(t))

    def sigma_deriv(self, t) -> torch.Tensor:
        return self._sigma_deriv(self._check_t(t))

    def sigma_inv(self, sigma) -> torch.Tensor:
        return self._sigma_inv(_check_sigma(sigma))

    def s(self, t) -> torch.Tensor:
        return self._s(self._check_t(t))

    def s_deriv(self, t) -> torch.Tensor:
        return self._s_deriv(self._check_t(t))

    def time_steps(self, num_steps: int) -> torch.Tensor:
        """t_0 > ... > t_{N-1} of Table 1, then t_N = 0: N + 1 float64 values."""
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
        # i / (N - 1)
        frac = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
        return torch.cat([self._time_steps(frac), torch.zeros(1, dtype=torch.float64)])

    def sigma_steps(self, num_steps: int) -> torch.Tensor:
        """The noise levels sigma(t_i) at the time steps (N + 1 values, the last 0)."""
        return self._sigma(self.time_steps(num_steps))

    # sigma(t) = t and s(t) = 1 unless a subclass says otherwise
    def _sigma(self, t):
        return t

    def _sigma_deriv(self, t):
        return torch.ones_like(t)

    def _sigma_inv(self, sigma):
        return sigma

    def _s(self, t):
        return torch.ones_like(t)

    def _s_deriv(self, t):
        return torch.zeros_like(t)


# %% [markdown]
# **VP** (variance preserving, Song et al. 2021). Writing
# $f(t) = \frac12\beta_d t^2 + \beta_\text{min} t$, $\sigma(t) = \sqrt{e^{f} - 1}$ and
# $s(t) = e^{-f/2} = 1/\sqrt{1 + \sigma^2}$, so that $s^2(1 + \sigma^2) = 1$: the scaled signal
# keeps unit variance. Differentiating, $\dot\sigma = \frac12 f'(t)\,(\sigma + 1/\sigma)$ and
# $\dot s = -\frac12 f'(t)\, s$; solving the quadratic $f(t) = \ln(1 + \sigma^2)$ gives
# $\sigma^{-1}(\sigma) = \big(\sqrt{\beta_\text{min}^2 + 2\beta_d \ln(1+\sigma^2)} - \beta_\text{min}\big) / \beta_d$.
# The sampler runs $t$ from 1 down to $\epsilon_s$, so $\sigma_\text{min} = \sigma(\epsilon_s)$
# and $\sigma_\text{max} = \sigma(1)$.

# %% tags=["export"]
class VP(Schedule):
    """Variance preserving (Table 1, column VP):
    sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1). Chapter 1."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1,
                 epsilon_s: float = 1e-3):
        positive = 0.5 * beta_d * epsilon_s + beta_min > 0  # sigma(epsilon_s) > 0
        if not (beta_d > 0 and 0 < epsilon_s < 1 and positive):
            raise ValueError("need beta_d > 0, 0 < epsilon_s < 1 and "
                             "sigma(epsilon_s) > 0 (beta_min > -beta_d epsilon_s / 2); "
                             "got beta_d="
                             f"{beta_d}, beta_min={beta_min}, epsilon_s={epsilon_s}")
        self.beta_d, self.beta_min = float(beta_d), float(beta_min)
        self.epsilon_s = float(epsilon_s)

        def f(t):
            return 0.5 * beta_d * t**2 + beta_min * t

        super().__init__(math.sqrt(math.expm1(f(epsilon_s))),
                         math.sqrt(math.expm1(f(1.0))))

    @classmethod
    def from_sigma_range(cls, sigma_min: float, sigma_max: float,
                         epsilon_s: float = 1e-3) -> "VP":
        """The VP schedule whose t in [epsilon_s, 1] spans [sigma_min, sigma_max].

        beta_min comes out >= 0 only for epsilon_s <= sqrt(ln(1 + sigma_min^2) /
        ln(1 + sigma_max^2)); a negative one (e.g. sigma in [0.002, 80], as the ablation
        sampler of Chapter 2 asks for) leaves sigma(t) real on [epsilon_s, 1] but not on
        (0, -2 beta_min / beta_d), where the public methods refuse t.
        """
        a, b = math.log(sigma_min**2 + 1), math.log(sigma_max**2 + 1)
        beta_d = 2 * (a / epsilon_s - b) / (epsilon_s - 1)
        return cls(beta_d=beta_d, beta_min=b - 0.5 * beta_d, epsilon_s=epsilon_s)

    def _t_gap(self):
        return max(0.0, -2 * self.beta_min / self.beta_d)

    def _f(self, t):
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def _sigma(self, t):
        return torch.expm1(self._f(t)).sqrt()

    def _sigma_deriv(self, t):
        sigma = self._sigma(t)
        return 0.5 * (self.beta_min + self.beta_d * t) * (sigma + 1 / sigma)

    def _sigma_inv(self, sigma):
        root = (self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt()
        return (root - self.beta_min) / self.beta_d

    def _s(self, t):
        return torch.exp(-0.5 * self._f(t))

    def _s_deriv(self, t):
        return -0.5 * (self.beta_min + self.beta_d * t) * self._s(t)

    def _time_steps(self, frac):
        return 1 + frac * (self.epsilon_s - 1)


# %% [markdown]
# **VE** (variance exploding, Song et al. 2021): $\sigma(t) = \sqrt t$, no scaling, and time
# steps spaced geometrically in $\sigma^2$.

# %% tags=["export"]
class VE(Schedule):
    """Variance exploding (Table 1, column VE): sigma(t) = sqrt(t), s(t) = 1.
    Chapter 1."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(sigma_min, sigma_max)

    def _sigma(self, t):
        return t.sqrt()

    def _sigma_deriv(self, t):
        return 0.5 / t.sqrt()

    def _sigma_inv(self, sigma):
        return sigma**2

    def _time_steps(self, frac):
        return self.sigma_max**2 * (self.sigma_min**2 / self.sigma_max**2) ** frac


# %% [markdown]
# **iDDPM** (improved DDPM, Nichol & Dhariwal 2021, sampled with DDIM). The model was trained
# on a discrete table of $M + 1$ noise levels, built backwards from $u_M = 0$:
#
# $$u_{j-1} = \sqrt{\frac{u_j^2 + 1}{\max(\bar\alpha_{j-1}/\bar\alpha_j,\, C_1)} - 1}, \qquad
#   \bar\alpha_j = \sin^2\!\left(\frac{\pi}{2}\frac{j}{M(C_2 + 1)}\right).$$
#
# The official code evaluates $\bar\alpha_j$ in single precision (its index is an integer
# tensor); we do the same, so our table matches theirs to the last bit.

# %% tags=["export"]
def iddpm_u(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008,
            dtype=torch.float64) -> torch.Tensor:
    """The iDDPM noise-level table u_0 > ... > u_M = 0 (Table 1, footnote of column
    iDDPM), M + 1 values. Chapter 1."""
    if int(M) != M or M < 2:
        raise ValueError(f"M must be an integer >= 2, got {M}")
    # integer indices: alpha_bar is computed in float32, as in the official code
    j = torch.arange(M + 1)
    alpha_bar = (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2
    # alpha_bar_{j-1} / alpha_bar_j, j = 1..M
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1).to(dtype)
    u = torch.zeros(M + 1, dtype=dtype)
    for k in range(M, 0, -1):
        u[k - 1] = ((u[k] ** 2 + 1) / ratio[k - 1] - 1).sqrt()
    return u


class IDDPM(Schedule):
    """Improved DDPM + DDIM (Table 1, column iDDPM): sigma(t) = t on the table u;
    steps u_{floor(j0 + ...)}. Chapter 1."""

    name = "iddpm"

    def __init__(self, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
                 j_0: int = 8):
        if not 0 <= j_0 < M - 1:
            raise ValueError(f"j_0 must lie in [0, M - 1), got {j_0}")
        self.C_1, self.C_2, self.M, self.j_0 = C_1, C_2, int(M), int(j_0)
        self.u = iddpm_u(M, C_1, C_2)
        super().__init__(float(self.u[M - 1]), float(self.u[0]))

    def _time_steps(self, frac):
        j = torch.floor(self.j_0 + (self.M - 1 - self.j_0) * frac + 0.5).to(torch.int64)
        return self.u[j]


# %% [markdown]
# **EDM**: $\sigma(t) = t$, $s(t) = 1$ — the paper argues for the simplest choice (Sec. 3,
# and §1.4 below), and chooses the time steps by Eq. 5,
#
# $$t_{i<N} = \sigma_i = \left(\sigma_\text{max}^{1/\rho} + \frac{i}{N-1}\left(\sigma_\text{min}^{1/\rho} - \sigma_\text{max}^{1/\rho}\right)\right)^{\rho}, \qquad t_N = 0 ,$$
#
# which Chapter 2 derives. (With $N = 1$ we take the single step at $\sigma_\text{max}$.)

# %% tags=["export"]
def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0, device=None) -> torch.Tensor:
    """sigma_0 > ... > sigma_{N-1} of Eq. 5 (without the final 0), float64. Chapter 1;
    derived in Chapter 2."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError("need 0 < sigma_min < sigma_max < inf, got "
                         f"sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + frac * (lo - hi)) ** rho


class EDM(Schedule):
    """EDM (Table 1, column EDM): sigma(t) = t, s(t) = 1, time steps by Eq. 5.
    Chapter 1."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0):
        super().__init__(sigma_min, sigma_max)
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        self.rho = float(rho)

    def __repr__(self):
        return (f"EDM(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}, "
                f"rho={self.rho:g})")

    def time_steps(self, num_steps: int) -> torch.Tensor:
        steps = edm_sigma_steps(num_steps, self.sigma_min, self.sigma_max, self.rho)
        return torch.cat([steps, torch.zeros(1, dtype=torch.float64)])


SCHEDULES = {"vp": VP, "ve": VE, "iddpm": IDDPM, "edm": EDM}


# %% [markdown]
# **Checks** — each schedule's inverse inverts it, and the hand-derived derivatives agree with
# central finite differences, over the whole time range.

# %% tags=["hide-input"]
schedules = {name: cls() for name, cls in SCHEDULES.items()}
for name, sch in schedules.items():
    t = torch.linspace(0.02, 0.98, 97, dtype=torch.float64) * sch.t_max
    h = 1e-6 * sch.t_max
    inv_err = ((sch.sigma_inv(sch.sigma(t)) - t).abs() / t).max().item()
    fd_sigma = (sch.sigma(t + h) - sch.sigma(t - h)) / (2 * h)
    fd_s = (sch.s(t + h) - sch.s(t - h)) / (2 * h)
    deriv = sch.sigma_deriv(t)
    d_err = ((deriv - fd_sigma).abs() / deriv.abs()).max().item()
    s_err = (sch.s_deriv(t) - fd_s).abs().max().item()
    print(f"{name:6s} sigma in [{sch.sigma_min:.4g}, {sch.sigma_max:.5g}], "
          f"t_max={sch.t_max:<10.5g} |inv| {inv_err:.0e}  |dsigma| {d_err:.0e}  "
          f"|ds| {s_err:.0e}")
    # finite differences: ~1e-10 of rounding
    assert inv_err < 1e-14 and d_err < 1e-9 and s_err < 1e-9
    assert sch.sigma(0) == 0 and sch.s(0) == 1

# %% [markdown]
# And the VP defaults reproduce the familiar numbers: $\sigma(\epsilon_s) \approx 0.0105$ and
# $\sigma(1) \approx 152$, which is where the paper's VP sampler starts and ends. Fitting the
# VP schedule to another σ range can make $\beta_\text{min}$ negative (EDM's range 0.002–80
# does); σ(t) is then still real on $[\epsilon_s, 1]$, and the times just above 0 where it is
# not are refused.

# %% tags=["hide-input"]
vp = schedules["vp"]
print(f"VP: sigma(eps_s) = {vp.sigma_min:.6f}, sigma(1) = {vp.sigma_max:.3f}")
assert abs(vp.sigma_min - 0.0104860) < 1e-6 and abs(vp.sigma_max - 152.167) < 1e-3
assert abs(VP.from_sigma_range(vp.sigma_min, vp.sigma_max).beta_d - 19.9) < 1e-9
vp_edm_range = VP.from_sigma_range(0.002, 80.0)
print(f"VP fitted to [0.002, 80]: beta_min = {vp_edm_range.beta_min:.5f}")
ends = vp_edm_range.sigma(torch.tensor([1e-3, 1.0]))
assert vp_edm_range.beta_min < 0
assert (ends - torch.tensor([0.002, 80.0])).abs().max() < 1e-9

# %% [markdown]
# **Check** — the slope of §1.2 is Eq. 4 read correctly. We compute Eq. 4 literally, with the
# gradient of $\mathbf{x} \mapsto \log p(\mathbf{x}/s; \sigma)$ taken by autograd, and compare
# with `ode_slope`, for the VP schedule, where $s(t) \ne 1$.

# %% tags=["hide-input"]
x = 1.5 * torch.randn(8, *gm_img.shape, dtype=torch.float64)
for t in [0.05, 0.3, 0.9]:
    t_ = torch.tensor(t, dtype=torch.float64)
    s, sig, ds, dsig = vp.s(t_), vp.sigma(t_), vp.s_deriv(t_), vp.sigma_deriv(t_)
    xg = x.clone().requires_grad_(True)
    gm_img.log_prob(xg / s, sig).sum().backward()  # grad wrt x of log p(x/s; sigma)
    eq4 = ds / s * x - s**2 * dsig * sig * xg.grad
    err = ((ode_slope(vp, gm_img, x, t_) - eq4).abs().max() / eq4.abs().max()).item()
    print(f"t={t}: |ode_slope - Eq. 4| / |Eq. 4| = {err:.1e}")
    assert err < 1e-10

# %% [markdown]
# **Look** — the four noise schedules. Left: σ against normalised time $t/t_\text{max}$.
# Right: where each method's original sampler places its $N = 18$ steps. VE and VP spend many
# steps at large σ; iDDPM's table jumps from its largest level straight into the middle of
# the range; EDM's $\rho = 7$ concentrates steps at small σ, where (Chapter 2 shows) the ODE
# is hardest.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for name, sch in schedules.items():
    t = torch.linspace(0, 1, 400, dtype=torch.float64) * sch.t_max
    if name == "iddpm":  # sigma(t) = t, but only the table entries exist
        t = sch.u
    ax1.plot(t / sch.t_max, sch.sigma(t), label=f"{name}: σ(t) to {sch.sigma_max:.4g}")
    ax2.plot(sch.sigma_steps(18)[:-1], "o-", ms=3, label=name)
ax1.set(yscale="log", xlabel="t / t_max", ylabel="σ(t)", title="noise schedules σ(t)",
        ylim=(1e-3, 3e4))
ax2.set(yscale="log", xlabel="step i", ylabel="σ(t_i)",
        title="time steps of the original samplers (N = 18)")
_ = ax1.legend(), ax2.legend()
plt.tight_layout()

# %% [markdown]
# ## 1.4 ODE trajectories and why σ(t) = t
#
# > We argue that the best choice for these functions is σ(t) = t and s(t) = 1, which is
# > also the choice made in DDIM. [...] An immediate consequence is that at any $\mathbf{x}$
# > and $t$, a single Euler step to $t = 0$ yields the denoised image
# > $D_\theta(\mathbf{x}; t)$. (Sec. 3, "Trajectory curvature and noise schedule")
#
# The schedule changes how a solver *sees* the ODE, not where it goes: writing
# $\hat{\mathbf{x}} = \mathbf{x}/s$, every choice of $\sigma(t)$ and $s(t)$ moves
# $\hat{\mathbf{x}}$ through the same sequence of distributions $p(\hat{\mathbf{x}}; \sigma)$
# and ends at the same point. The shape of the path in $t$, however, depends on the choice —
# and a solver takes straight steps. With σ(t) = t and s(t) = 1 (EDM), the tangent at any
# point aims directly at the denoiser's output:
# $\mathbf{x} - \sigma\, \mathrm{d}\mathbf{x}/\mathrm{d}\sigma = D(\mathbf{x}; \sigma)$.
#
# Below: the 1-D mixture of §1.1, trajectories from σ = 5 under VP, VE and EDM, each
# integrated with RK4 on 400 steps uniform in $\log\sigma$, drawn over the noised density
# $p(x; \sigma(t))$ in each schedule's own time (paper Fig. 3).

# %%
SIGMA_MAX_1D, SIGMA_END = 5.0, 1e-3
toy = {"vp": VP.from_sigma_range(SIGMA_END, SIGMA_MAX_1D, epsilon_s=1e-4),
       "ve": VE(SIGMA_END, SIGMA_MAX_1D), "edm": EDM(SIGMA_END, SIGMA_MAX_1D)}
# the same starting points in x / (s sigma)
z = torch.linspace(-2.2, 2.2, 13, dtype=torch.float64)[:, None]
sigma_grid = torch.logspace(math.log10(SIGMA_MAX_1D), math.log10(SIGMA_END), 401,
                            dtype=torch.float64)
paths = {}
for name, sch in toy.items():
    t_grid = sch.sigma_inv(sigma_grid)
    x0 = z * sch.sigma(t_grid[0]) * sch.s(t_grid[0])
    paths[name] = (t_grid, solve_ode_rk4(sch, gm1, x0, t_grid)[..., 0])

# %% [markdown]
# **Check** — the end points $\mathbf{x}/s$ are the same for all three schedules, and the
# EDM tangent aims at the denoiser: one Euler step from $(\mathbf{x}, \sigma)$ to 0 gives
# exactly $D(\mathbf{x}; \sigma)$. For VP and VE it does not.

# %% tags=["hide-input"]
ends = {name: (p[-1] / sch.s(t[-1]))
        for (name, sch), (t, p) in zip(toy.items(), paths.values())}
spread = max((ends[n] - ends["edm"]).abs().max().item() for n in ends)
print(f"largest difference of the end points x/s across schedules: {spread:.1e}")
assert spread < 1e-7
xs = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
for name, sch in toy.items():
    t = sch.sigma_inv(torch.tensor(2.0, dtype=torch.float64))
    x = xs * sch.s(t)
    one_step = (x + (0 - t) * ode_slope(sch, gm1, x, t)) / sch.s(0.0)
    miss = (one_step - gm1.denoise(xs, 2.0)).abs().max().item()
    print(f"{name:4s}: |Euler step to t = 0 - D(x; sigma)| = {miss:.2e}")
    assert (miss < 1e-14) == (name == "edm")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
titles = {"vp": "VP: σ(t) of Table 1, s(t) = 1/√(1+σ²)",
          "ve": "VE: σ(t) = √t, s(t) = 1", "edm": "EDM: σ(t) = t, s(t) = 1"}
for ax, (name, sch) in zip(axes, toy.items()):
    t_grid, p = paths[name]
    lim = 1.05 * p.abs().max().item()
    xgrid = torch.linspace(-lim, lim, 200, dtype=torch.float64)
    ts = torch.linspace(0, 1, 150, dtype=torch.float64) * sch.t_max
    ts = ts.clamp_min(sch.sigma_inv(torch.tensor(SIGMA_END, dtype=torch.float64)))
    # density of x = s * x_hat with x_hat ~ p(.; sigma)
    sig, s = sch.sigma(ts), sch.s(ts)
    dens = torch.stack([gm1.log_prob((xgrid / si)[:, None], sg).exp() / si
                        for sg, si in zip(sig, s)], 1)
    ax.pcolormesh(ts, xgrid, dens.clamp_max(dens.quantile(0.98)), cmap="Blues",
                  shading="auto")
    ax.plot(t_grid, p, color="k", lw=0.8)
    ax.set(xlabel=f"t ({name} time)", ylabel="x", ylim=(-lim, lim), xlim=(0, sch.t_max),
           title=titles[name])
plt.tight_layout()

# %% [markdown]
# In VP and VE time the paths bend sharply near the end (and VE's time axis squeezes all of
# the interesting part into the first sliver); in EDM time they are nearly straight lines
# aimed at the current denoised guess, which is why a few large steps suffice.
#
# **Check** — how straight, as a number. In the coordinates of the figure (time as a
# fraction of $t_\text{max}$, $x$ as a fraction of the largest $|x|$ of the panel) a straight
# path has length equal to its chord; the *excess length*, path length / chord − 1, averaged
# over the 13 trajectories, measures how much it bends. EDM's paths have
# {glue:text}`excess_edm`, VP's {glue:text}`excess_vp` and VE's {glue:text}`excess_ve`.

# %% tags=["hide-input"]
excess = {}
for name, sch in toy.items():
    t_grid, p = paths[name]
    # the figure's coordinates
    tn, xn = (t_grid / sch.t_max)[:, None].expand_as(p), p / p.abs().max()
    length = torch.stack([tn.diff(dim=0), xn.diff(dim=0)], -1).norm(dim=-1).sum(0)
    chord = torch.stack([tn[-1] - tn[0], xn[-1] - xn[0]], -1).norm(dim=-1)
    excess[name] = (length / chord - 1).mean().item()
    glue(f"excess_{name}", f"{100 * excess[name]:.2f} %", display=False)
print("excess length (path length / chord - 1):",
      ", ".join(f"{n}: {100 * e:.2f} %" for n, e in excess.items()))
# EDM's trajectories are the straightest
assert excess["edm"] < 0.6 * min(excess["vp"], excess["ve"])

# %% [markdown]
# ## 1.5 Explore: schedule, σ range and ρ
#
# > The time steps $\{t_i\}$ determine how the step sizes and thus truncation errors are
# > distributed between different noise levels. (Sec. 3)
#
# Move the sliders to see where the time steps fall over the trajectories (the dots mark the
# points a sampler would visit, shown on the exact solution). The explorer needs a live
# kernel; the static grid after it shows the same thing for four values of ρ.

# %%
@functools.lru_cache(maxsize=16)
def exact_paths(sigma_min, sigma_max, points=300):
    """The exact 1-D trajectories from z * sigma_max, on a grid uniform in log sigma."""
    grid = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), points,
                          dtype=torch.float64)
    paths = solve_ode_rk4(EDM(sigma_min, sigma_max), gm1, z * sigma_max, grid)
    return grid, paths[..., 0]


def plot_steps(ax, schedule_name="edm", sigma_min=0.002, sigma_max=5.0, rho=7.0,
               num_steps=10):
    """Exact 1-D trajectories in sigma, with the N time steps of the chosen
    discretization marked."""
    if schedule_name == "edm":
        sch = EDM(sigma_min, sigma_max, rho)
    elif schedule_name == "ve":
        sch = VE(sigma_min, sigma_max)
    else:
        eps = 0.5 * math.sqrt(math.log1p(sigma_min**2) / math.log1p(sigma_max**2))
        sch = VP.from_sigma_range(sigma_min, sigma_max, epsilon_s=eps)
    grid, sol = exact_paths(sigma_min, sigma_max)
    steps = sch.sigma_steps(num_steps)[:-1]
    at_steps = torch.stack([sol[(grid - s).abs().argmin()] for s in steps])
    ax.plot(grid, sol, color="k", lw=0.6)
    ax.plot(steps, at_steps, "o", color="C3", ms=3)
    rho_text = f", ρ={rho:g}" if schedule_name == "edm" else ""
    ax.set(xscale="log", xlabel="σ", ylabel="x",
           title=f"{schedule_name}{rho_text}, N={num_steps}")
    ax.invert_xaxis()


# %%
# NBVAL_IGNORE_OUTPUT
import ipywidgets as widgets


def explore(schedule_name="edm", log10_sigma_min=-2.7, sigma_max=5.0, rho=7.0,
            num_steps=10):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    plot_steps(ax, schedule_name, 10**log10_sigma_min, sigma_max, rho, num_steps)
    plt.show()


Slider = widgets.FloatSlider
_ = widgets.interact(explore, schedule_name=["edm", "vp", "ve"],
                     log10_sigma_min=Slider(value=-2.7, min=-3, max=-1, step=0.1),
                     sigma_max=Slider(value=5, min=1, max=80, step=1),
                     rho=Slider(value=7, min=1, max=15, step=0.5),
                     num_steps=widgets.IntSlider(value=10, min=2, max=40))

# %%
fig, axes = plt.subplots(1, 4, figsize=(15, 3.2), sharey=True)
for ax, rho in zip(axes, [1, 3, 7, 15]):
    plot_steps(ax, "edm", 0.002, 5.0, rho, 10)
plt.tight_layout()

# %% [markdown]
# With ρ = 1 the steps are uniform in σ and almost all of them fall where the paths are
# straight; as ρ grows they crowd towards small σ, where the paths turn towards the modes.
#
# ## Summary
#
# Exported to `edm_lit.framework`:
#
# - `GaussianMixture` — ground truth with closed-form `log_prob`, `score`, `denoise` and the
#   denoiser interface (`gm(x, sigma)`, `sigma_min`, `sigma_max`, `round_sigma`);
#   `GaussianMixture.from_data` for a finite data set; `toy_image_mixture` for image-shaped
#   data;
# - `ode_slope` (Eq. 4 with Eq. 3) and `solve_ode_rk4`, a reference solver for exact
#   trajectories;
# - `Schedule` and the four columns of Table 1, `VP`, `VE`, `IDDPM`, `EDM` (`SCHEDULES` by
#   name), with `sigma`, `sigma_deriv`, `sigma_inv`, `s`, `s_deriv`, `time_steps`,
#   `sigma_steps`; `iddpm_u` and `edm_sigma_steps` (Eq. 5).
#
# ## Exercises
#
# 1. For VE, where does one Euler step from $(x, t)$ to $t = 0$ land, in terms of $x$ and
#    $D(x; \sigma)$?
# 2. The ideal denoiser of a finite data set returns a training point as σ → 0. What does
#    that imply for a network trained to perfection on a small data set?
# 3. With `z` fixed, how do the end points of the 1-D trajectories change as σ_max grows from
#    5 to 80?
#
# :::{dropdown} Answers
# 1. With σ = √t, dσ/dt = 1/(2√t), so dx/dt = (x − D)/(2t) and one Euler step of length −t
#    gives x − (x − D)/2 = (x + D)/2: only halfway to the denoised guess, which is why VE
#    needs many steps.
# 2. Its samples are copies of the training set: the ideal denoiser generalises nothing.
#    Real networks generalise because they are *not* ideal.
# 3. Hardly at all once σ_max ≫ σ_data: $p(x; \sigma_\text{max})$ is then nearly Gaussian and
#    the map from z to the end point converges.
# :::
