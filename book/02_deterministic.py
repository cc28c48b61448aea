# ---
# jupyter:
#   edm_lit:
#     export: samplers
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
# # 2. Deterministic sampling
#
# Chapter 1 turned sampling into solving an ODE from pure noise at σ_max down to σ = 0,
# asking the denoiser for the direction at every point; each point costs one evaluation of
# the network. This chapter asks how to spend a fixed budget of evaluations (the *NFE*,
# number of function evaluations) well. The paper's answer (Sec. 3, Algorithm 1) has
# two parts: a second-order solver (Heun's method) instead of Euler's, and time steps that
# shrink towards small σ (Eq. 5). We derive both, and *measure* them against the exact
# solution, which our ground-truth data sets give us. Chapter 3 adds the noise of Algorithm 2
# and the official interface, `edm_sampler` and `ablation_sampler`.

# %% tags=["export"]
import math
import numbers

import torch

from edm_lit.framework import VE, VP, edm_sigma_steps, iddpm_u

# the names the samplers accept for each choice (Table 1's rows)
_SOLVERS = ("euler", "heun")
_DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")
_SCHEDULES = ("vp", "ve", "linear")
_SCALINGS = ("vp", "none")

# %% [markdown]
# The samplers check every argument at the door and name it in the error. Their four
# private checks: a choice among names, a real number with an optional lower bound, a step
# count, and a vector of time steps ending at 0.

# %% tags=["export"]
def _check_choice(value, name, choices):
    """`value` if it is one of the strings `choices`; else a ValueError naming it."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; "
                         f"got {value!r}")
    return value


def _check_real(value, name, minimum=None, strict=True):
    """`value` as a float; refuses NaN and, if `minimum` is given, values below it (or
    equal, if strict)."""
    try:
        value = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, "
                         f"got {value}")
    return value


def _check_num_steps(num_steps):
    """`num_steps` as an int >= 1 (an integral float is accepted); else a ValueError."""
    ok = isinstance(num_steps, numbers.Real) and not isinstance(num_steps, bool)
    if (not ok or not math.isfinite(num_steps) or num_steps != int(num_steps)
            or num_steps < 1):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return int(num_steps)


def _check_t_steps(t_steps, device=None):
    """Time steps t_0 > ... > t_N = 0 as float64 on `device`; else a ValueError."""
    t_steps = torch.as_tensor(t_steps, dtype=torch.float64, device=device)
    if (t_steps.ndim != 1 or len(t_steps) < 2 or t_steps[-1] != 0
            or not bool((t_steps[:-1] > 0).all())):
        raise ValueError("t_steps must be 1-D with at least two entries, all > 0 "
                         "except the last, which must be 0")
    return t_steps


# %%
import statistics
import types

import matplotlib.pyplot as plt
import torch
from myst_nb import glue

from edm_lit.framework import (EDM, VE, VP, GaussianMixture, ode_slope, solve_ode_rk4,
                               toy_image_mixture)
from edm_lit.mode import get_mode

MODE = get_mode()
torch.manual_seed(0)
# the tensors here are tiny: one thread is fastest, and immune to a busy machine
torch.set_num_threads(1)
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
F64 = torch.float64

# %% [markdown]
# Helpers this chapter and the next share go to `edm_lit.course` (not library API): `sci`
# and `pct` write a measured number for the prose; `Recording` records a denoiser's calls.

# %% tags=["export:course"]
def sci(v, digits=1):
    """v as 'm.m × 10⁻ᵏ' for prose (glued into the text). Chapter 2."""
    m, e = f"{v:.{digits}e}".split("e")
    superscript = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
    return f"{m} × 10{str(int(e)).translate(superscript)}"


def pct(v):
    """A fraction as a percentage for prose: 0.123 -> '12.3 %'. Chapter 2."""
    return f"{100 * v:.1f} %"


class Recording:
    """A denoiser that records every call made to it: `.sigmas` (floats) and `.inputs`
    ((x.dtype, sigma.dtype, sigma.ndim) per call). Chapter 2."""

    def __init__(self, net):
        self.net, self.sigmas, self.inputs = net, [], []
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max
        self.round_sigma = net.round_sigma

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        self.sigmas.append(float(sigma))
        self.inputs.append((x.dtype, sigma.dtype, sigma.ndim))
        return self.net(x, sigma, class_labels, **kwargs)


# %% [markdown]
# ## 2.1 A sampler's view of time
#
# > The ODE to be solved is obtained by substituting Eq. 3 into Eq. 4 to define the
# > point-wise gradient, and the solution can be found by numerical integration, i.e.,
# > taking finite steps over discrete time intervals. (Sec. 2, "Solution by discretization")
#
# Algorithm 1 of the paper is written for any noise schedule σ(t) and scaling s(t). With
# Eq. 3 substituted into Eq. 4, the slope it follows is (Chapter 1)
#
# $$\frac{\mathrm{d}\mathbf{x}}{\mathrm{d}t} = \left(\frac{\dot\sigma(t)}{\sigma(t)} + \frac{\dot s(t)}{s(t)}\right)\mathbf{x}
#   - \frac{\dot\sigma(t)\, s(t)}{\sigma(t)}\, D\!\left(\frac{\mathbf{x}}{s(t)}; \sigma(t)\right),$$
#
# and with EDM's choice σ(t) = t, s(t) = 1 it collapses to
# $\mathrm{d}\mathbf{x}/\mathrm{d}\sigma = (\mathbf{x} - D(\mathbf{x}; \sigma))/\sigma$.
#
# Chapter 1's `ode_slope` computes this with every argument checked; a sampler's inner loop
# gets a lean object instead. A `SamplerSchedule` pairs the σ(t) of one column of Table 1
# (VP, VE, or *linear*, σ(t) = t) with a scaling s(t) chosen *independently* — `'none'`
# (s = 1) or `'vp'` (s = 1/√(1 + σ²)) — as the paper's ablations mix them; `derivative`
# makes the one network call per slope, in the short form `(x - D) / t` for EDM's choice.

# %% tags=["export"]
class SamplerSchedule:
    """The sigma(t) and s(t) a sampler steps in, and the ODE slope they give (Eq. 4 with
    Eq. 3). Chapter 2.

    `sigma`: a schedule of edm_lit.framework (VP, VE, ...) supplying sigma(t), its
    derivative and inverse, or None for sigma(t) = t; `scaling`: 'none' (s(t) = 1) or
    'vp' (s(t) = 1 / sqrt(1 + sigma(t)^2)). None and 'none' is EDM's choice. The methods
    take float64 tensors and are unchecked: they serve the sampling loop.
    """

    def __init__(self, sigma=None, scaling="none"):
        self.base, self.scaling = sigma, _check_choice(scaling, "scaling", _SCALINGS)
        self.plain = sigma is None and scaling == "none"

    def __repr__(self):
        return f"SamplerSchedule(sigma={self.base!r}, scaling={self.scaling!r})"

    @classmethod
    def from_names(cls, schedule="linear", scaling="none", sigma_min=0.002,
                   sigma_max=80.0, epsilon_s=1e-3):
        """By the ablation sampler's names: schedule 'vp' (fitted to [sigma_min,
        sigma_max]), 've' or 'linear'."""
        _check_choice(schedule, "schedule", _SCHEDULES)
        if schedule == "vp":
            return cls(_vp_fitted(sigma_min, sigma_max, epsilon_s), scaling)
        return cls(VE(sigma_min, sigma_max) if schedule == "ve" else None, scaling)

    def sigma(self, t):
        return t if self.base is None else self.base._sigma(t)

    def sigma_deriv(self, t):
        return torch.ones_like(t) if self.base is None else self.base._sigma_deriv(t)

    def sigma_inv(self, sigma):
        return sigma if self.base is None else self.base._sigma_inv(sigma)

    def s(self, t):
        if self.scaling == "none":
            return torch.ones_like(t)
        return 1 / (1 + self.sigma(t) ** 2).sqrt()

    def s_deriv(self, t):
        if self.scaling == "none":
            return torch.zeros_like(t)
        return -self.sigma(t) * self.sigma_deriv(t) * self.s(t) ** 3

    def derivative(self, net, x, t, class_labels=None):
        """dx/dt at (x, t), float64: one call of the denoiser `net` (Algorithm 1,
        lines 4 and 7)."""
        if self.plain:  # sigma(t) = t, s(t) = 1
            return (x - net(x, t, class_labels).to(torch.float64)) / t
        sigma, dsigma = self.sigma(t), self.sigma_deriv(t)
        s, ds = self.s(t), self.s_deriv(t)
        x_in = x if self.scaling == "none" else x / s
        denoised = net(x_in, sigma, class_labels).to(torch.float64)
        return (dsigma / sigma + ds / s) * x - dsigma * s / sigma * denoised


def _vp_fitted(sigma_min, sigma_max, epsilon_s=1e-3):
    """The VP schedule with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max, as
    the ablation sampler fits it."""
    epsilon_s = _check_real(epsilon_s, "epsilon_s", 0)
    # below this floor, beta_d would come out <= 0
    floor = math.log1p(sigma_min**2) / math.log1p(sigma_max**2)
    if not floor < epsilon_s < 1:
        raise ValueError(f"epsilon_s must lie in ({floor:.3g}, 1) for a VP schedule on "
                         f"[{sigma_min:g}, {sigma_max:g}], got {epsilon_s}")
    return VP.from_sigma_range(sigma_min, sigma_max, epsilon_s)


# %% [markdown]
# **Check** — the three pairings that are columns of Table 1 (VP with VP scaling, VE, and
# EDM's linear σ with no scaling) must give exactly Chapter 1's `ode_slope`: same ODE,
# different code. We test on the image-shaped mixture of Chapter 1.

# %% tags=["hide-input"]
gm_img = toy_image_mixture()
x = 3.0 * torch.randn(6, *gm_img.shape, dtype=F64)
pairs = {"vp": (SamplerSchedule(VP(), "vp"), VP()), "ve": (SamplerSchedule(VE()), VE()),
         "linear": (SamplerSchedule(), EDM())}
for name, (ours, column) in pairs.items():
    t = column.sigma_inv(torch.tensor(1.7, dtype=F64))
    mine, ref = ours.derivative(gm_img, x, t), ode_slope(column, gm_img, x, t)
    err = ((mine - ref).abs().max() / ref.abs().max()).item()
    print(f"{name:6s}: |derivative - ode_slope| / |ode_slope| = {err:.1e}")
    assert err < 2e-15  # the same arithmetic up to rounding

# %% [markdown]
# ## 2.2 Euler and Heun
#
# > Through extensive tests, we have found Heun's 2nd order method [...] to provide an
# > excellent tradeoff between truncation error and NFE. (Sec. 3)
#
# Between two time steps $t_i > t_{i+1}$, write $h = t_{i+1} - t_i$ (negative: we integrate
# towards σ = 0) and $d_i$ for the slope at $(\mathbf{x}_i, t_i)$. **Euler's method** follows
# the tangent, $\mathbf{x}_{i+1} = \mathbf{x}_i + h\, d_i$. Its error per step is $O(h^2)$, so
# the error after $1/h$ steps is $O(h)$: halving the step halves the error.
#
# **Heun's method** (Algorithm 1, lines 5–8) takes that Euler step only as a guess
# $\mathbf{x}'$, evaluates the slope $d'_i$ *there*, and steps again from $\mathbf{x}_i$ with
# the average of the two slopes:
#
# $$\mathbf{x}_{i+1} = \mathbf{x}_i + h\left(\tfrac12 d_i + \tfrac12 d'_i\right).$$
#
# The average is the trapezoidal rule applied to the slope, which cancels the $h^2$ term of
# Euler's error: Heun's error per step is $O(h^3)$, its global error $O(h^2)$, for two
# evaluations per step instead of one. The official ablation sampler generalises the guess
# to $t_i + \alpha h$ and the weights to $1 - \tfrac1{2\alpha}$, $\tfrac1{2\alpha}$ (the
# paper's Appendix D.2): α = 1 is Heun's method, α = ½ the midpoint method.
#
# The step below starts from $(\hat{\mathbf{x}}, \hat t)$ because Chapter 3 first moves the
# state off the grid by adding noise. For α = 1 the second evaluation is at exactly
# $t_{i+1}$ (not $\hat t + h$ in floating point), so its σ is bit for bit the next step.

# %% tags=["export"]
def ode_step(net, schedule, x_hat, t_hat, t_next, class_labels=None, second_order=True,
             alpha=1.0):
    """One step of Algorithm 1 from (x_hat, t_hat) to t_next: Euler (lines 4-5), then
    Heun's correction (6-8). Chapter 2.

    `alpha` puts the second evaluation at t_hat + alpha h (2nd-order Runge-Kutta; 1 is
    Heun's method, 1/2 the midpoint).
    """
    h = t_next - t_hat
    d_cur = schedule.derivative(net, x_hat, t_hat, class_labels)
    if not second_order:
        return x_hat + h * d_cur
    x_prime = x_hat + alpha * h * d_cur
    t_prime = t_next if alpha == 1 else t_hat + alpha * h
    d_prime = schedule.derivative(net, x_prime, t_prime, class_labels)
    return x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)


# %% [markdown]
# **Check** — the orders, on data where we know the answer exactly. For a single Gaussian
# $\mathcal{N}(\mu, s^2)$ the ideal denoiser is linear,
# $D(x; \sigma) = \mu + \frac{s^2}{s^2+\sigma^2}(x - \mu)$, and the ODE moves $x$ along
#
# $$x(\sigma) = \mu + (x_0 - \mu)\,\frac{\sqrt{s^2 + \sigma^2}}{\sqrt{s^2 + \sigma_0^2}} .$$
#
# One step from σ₀ = 1 with shrinking $|h|$: the error of Euler's step must fall as $|h|^2$
# and Heun's as $|h|^3$ (slopes 2 and 3 on a log–log plot).

# %% tags=["hide-input"]
MU, S = 0.3, 0.5
# a single Gaussian: its ODE solution is closed form
gauss = GaussianMixture(torch.tensor([[MU]]), stds=S)


def exact_path(x0, sigma0, sigma):
    """The exact ODE solution for the single Gaussian above, started at (x0, sigma0)."""
    return MU + (x0 - MU) * math.sqrt(S**2 + sigma**2) / math.sqrt(S**2 + sigma0**2)


x0 = torch.tensor([[-1.2], [0.4], [2.5]], dtype=F64)
steps = [0.4, 0.2, 0.1, 0.05, 0.025]
local = {"euler": [], "heun": []}
for h in steps:
    t0, t1 = torch.tensor(1.0, dtype=F64), torch.tensor(1.0 - h, dtype=F64)
    for solver in local:
        heun = solver == "heun"
        x1 = ode_step(gauss, SamplerSchedule(), x0, t0, t1, second_order=heun)
        local[solver].append((x1 - exact_path(x0, 1.0, 1.0 - h)).abs().max().item())
for solver, errs in local.items():
    order = math.log(errs[-2] / errs[-1]) / math.log(2)
    print(f"{solver}: local errors {', '.join(f'{e:.1e}' for e in errs)}"
          f"  ->  slope {order:.2f}")
assert abs(math.log(local["euler"][-2] / local["euler"][-1]) / math.log(2) - 2) < 0.1
assert abs(math.log(local["heun"][-2] / local["heun"][-1]) / math.log(2) - 3) < 0.1

# %% [markdown]
# ## 2.3 Where to put the steps: Eq. 5
#
# > Here ρ controls how much the steps near σ_min are shortened at the expense of longer
# > steps near σ_max. (Sec. 3, after Eq. 5)
#
# $$\sigma_{i<N} = \left(\sigma_\text{max}^{1/\rho} + \frac{i}{N-1}\left(\sigma_\text{min}^{1/\rho} - \sigma_\text{max}^{1/\rho}\right)\right)^{\rho}, \qquad \sigma_N = 0 . \qquad (5)$$
#
# Chapter 1's trajectories are nearly straight at large σ and bend where σ approaches the
# scale of the data's details, so the steps are uniform not in σ but in $\sigma^{1/\rho}$:
# ρ = 1 is uniform in σ, ρ → ∞ uniform in log σ. Chapter 1 exported the formula
# (`edm_sigma_steps`); a sampler, like the official one, then clamps
# $[\sigma_\text{min}, \sigma_\text{max}]$ to the network's range (`net.sigma_min`,
# `net.sigma_max`), snaps the steps onto the noise levels the network was trained on
# (`net.round_sigma`: iDDPM's table; the identity for EDM), and appends $t_N = 0$.

# %% tags=["export"]
def _check_sampler_inputs(net, latents, class_labels=None):
    """Refuse a net that is no denoiser, and latents or labels that do not fit."""
    interface = ("sigma_min", "sigma_max", "round_sigma")
    missing = [a for a in interface if not hasattr(net, a)]
    if missing or not callable(net):
        raise ValueError("net must be a denoiser net(x, sigma, class_labels) with "
                         f"sigma_min, sigma_max and round_sigma; {type(net).__name__} "
                         f"lacks {', '.join(missing) or '__call__'}")
    is_tensor = torch.is_tensor(latents)
    if not is_tensor or latents.ndim < 1 or not latents.is_floating_point():
        what = (f"a {latents.dtype} tensor of shape {tuple(latents.shape)}" if is_tensor
                else repr(type(latents)))
        raise ValueError(f"latents must be a floating-point tensor [N, ...], "
                         f"got {what}")
    if class_labels is not None and (not torch.is_tensor(class_labels)
                                     or class_labels.ndim < 1
                                     or class_labels.shape[0] != latents.shape[0]):
        got = (tuple(class_labels.shape) if torch.is_tensor(class_labels)
               else repr(type(class_labels)))
        raise ValueError("class_labels must be a tensor with one row per latent "
                         f"({latents.shape[0]}), got {got}")


def _sigma_range(net, sigma_min, sigma_max):
    """The noise range a sampler covers: [sigma_min, sigma_max] clamped to the net's."""
    sigma_min = _check_real(sigma_min, "sigma_min", 0)
    sigma_max = _check_real(sigma_max, "sigma_max", 0)
    if not sigma_min < sigma_max < math.inf:
        raise ValueError("need sigma_min < sigma_max < inf, got "
                         f"sigma_min={sigma_min:g}, sigma_max={sigma_max:g}")
    lo, hi = max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max))
    if not lo < hi:
        net_range = f"[{float(net.sigma_min):g}, {float(net.sigma_max):g}]"
        raise ValueError(f"the sigma range [{sigma_min:g}, {sigma_max:g}] does not "
                         f"overlap the network's {net_range}")
    return lo, hi


def edm_time_steps(net, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                   device=None):
    """EDM's t_0 > ... > t_{N-1} (Eq. 5) on the network's range and grid (round_sigma),
    then t_N = 0. Chapter 2."""
    num_steps, rho = _check_num_steps(num_steps), _check_real(rho, "rho", 0)
    sigma_min, sigma_max = _sigma_range(net, sigma_min, sigma_max)
    sigmas = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device)
    t_steps = torch.as_tensor(net.round_sigma(sigmas))
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


# %% [markdown]
# **Checks** — the end points are exact, the last step is exactly 0, ρ = 1 is uniform, a
# very large ρ approaches the geometric (log-uniform) spacing, and the network's range wins
# over the requested one.

# %% tags=["hide-input"]
t18 = edm_time_steps(gm_img, 18)
print("N = 18, rho = 7:", ", ".join(f"{t:.4g}" for t in t18.tolist()))
assert abs(t18[0] - 80) < 1e-12 and abs(t18[-2] - 0.002) < 1e-15
assert t18[-1] == 0 and len(t18) == 19
uniform = torch.linspace(80, 0.002, 5, dtype=F64)
assert torch.allclose(edm_time_steps(gm_img, 5, rho=1)[:-1], uniform)
geometric = torch.logspace(math.log10(80), math.log10(0.002), 18, dtype=F64)
assert torch.allclose(edm_time_steps(gm_img, 18, rho=1e5)[:-1], geometric, rtol=1e-3)


# a stand-in network that supports only sigma in [0.01, 20]
narrow = types.SimpleNamespace(sigma_min=0.01, sigma_max=20.0,
                               round_sigma=torch.as_tensor)
t_narrow = edm_time_steps(narrow, 10)
assert abs(t_narrow[0] - 20) < 1e-12 and abs(t_narrow[-2] - 0.01) < 1e-15

# %% [markdown]
# ## 2.4 Algorithm 1
#
# > Note that stepping to σ = 0 would result in a division by zero, so we revert to Euler's
# > method in this case. (Sec. 3)
#
# Start from $\mathbf{x}_0 = \sigma(t_0)\, s(t_0)\, \mathbf{n}$ with the latents
# $\mathbf{n} \sim \mathcal{N}(\mathbf{0}, \mathbf{I})$ and take N steps. The last step, to
# $t_N = 0$, is an Euler step; nothing is lost: with σ(t) = t it lands exactly on
# $D(\mathbf{x}; \sigma)$ (Chapter 1, §1.4) — the final step *is* a denoising. So N steps
# cost **NFE = 2N − 1**: the paper's 18 steps are its 35 NFE. Like the official samplers,
# ours works in float64: the network receives float64 `x` and a 0-dim float64 σ.

# %% tags=["export"]
def sample_ode(net, latents, t_steps, schedule=None, class_labels=None, solver="heun",
               alpha=1.0):
    """Algorithm 1: deterministic sampling along t_steps (t_N = 0) from
    x_0 = latents sigma(t_0) s(t_0). Chapter 2.

    `schedule` is a SamplerSchedule (None: sigma(t) = t, s(t) = 1). N steps of Heun cost
    2N - 1 network calls: the last step, to sigma = 0, is an Euler step. float64
    throughout, like the official samplers.
    """
    _check_sampler_inputs(net, latents, class_labels)
    second_order = _check_choice(solver, "solver", _SOLVERS) == "heun"
    alpha = _check_real(alpha, "alpha", 0)
    schedule = SamplerSchedule() if schedule is None else schedule
    t_steps = _check_t_steps(t_steps, latents.device)
    num_steps = len(t_steps) - 1
    t_0 = t_steps[0]
    x_next = latents.to(torch.float64) * (schedule.sigma(t_0) * schedule.s(t_0))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        heun = second_order and i < num_steps - 1
        x_next = ode_step(net, schedule, x_next, t_cur, t_next, class_labels, heun,
                          alpha)
    return x_next


# %% [markdown]
# **Checks** — a `Recording` of the denoiser confirms NFE = 2N − 1 for Heun and N for
# Euler, that no call is ever made at σ = 0 (the last call is at $\sigma_\text{min}$), and
# that the network sees float64 and a 0-dim σ. With a single step the sampler is one
# denoising of the starting noise.

# %% tags=["hide-input"]
z = torch.randn(8, *gm_img.shape, dtype=F64)
for N in [1, 2, 18]:
    for solver, nfe in [("heun", 2 * N - 1), ("euler", N)]:
        rec = Recording(gm_img)
        sample_ode(rec, z, edm_time_steps(gm_img, N), solver=solver)
        print(f"N = {N:2d}, {solver}: {len(rec.sigmas):2d} calls, "
              f"the last at sigma = {rec.sigmas[-1]:g}")
        assert len(rec.sigmas) == nfe and set(rec.inputs) == {(F64, F64, 0)}
        assert min(rec.sigmas) > 0 and rec.sigmas[-1] == min(rec.sigmas)
one_step = sample_ode(gm_img, z, edm_time_steps(gm_img, 1))
assert torch.allclose(one_step, gm_img(z * 80.0, torch.tensor(80.0, dtype=F64)),
                      rtol=0, atol=1e-12)

# %% [markdown]
# **Check** — second order for the whole sampler. For the single Gaussian the target is
# closed form: the exact solution down to $\sigma_\text{min}$, then the sampler's own final
# denoising step. Doubling the number of intervals of Eq. 5 halves every step (in
# $\sigma^{1/\rho}$); the error must fall about 4× for Heun and 2× for Euler.

# %% tags=["hide-input"]
def gauss_target(latents, sigma_min=0.002, sigma_max=80.0):
    """The exact end point of the sampler's problem for the single Gaussian:
    D(x(sigma_min); sigma_min)."""
    x_end = exact_path(latents * sigma_max, sigma_max, sigma_min)
    return gauss.denoise(x_end, sigma_min)


zg = torch.linspace(-2.5, 2.5, 11, dtype=F64)[:, None]
intervals = [8, 16, 32, 64, 128]
global_err = {"euler": [], "heun": []}
for n in intervals:
    for solver in global_err:
        out = sample_ode(gauss, zg, edm_time_steps(gauss, n + 1), solver=solver)
        global_err[solver].append((out - gauss_target(zg)).abs().max().item())
ratios = {}
for solver, errs in global_err.items():
    ratios[solver] = [a / b for a, b in zip(errs[:-1], errs[1:])]
    print(f"{solver}: max error {', '.join(f'{e:.1e}' for e in errs)};  "
          f"ratios {', '.join(f'{r:.2f}' for r in ratios[solver])}")
assert all(3.5 < r < 4.5 for r in ratios["heun"][2:])
assert all(1.8 < r < 2.2 for r in ratios["euler"][2:])

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.8))
for solver, errs in global_err.items():
    nfe = [n + 1 if solver == "euler" else 2 * n + 1 for n in intervals]
    ax.loglog(nfe, errs, "o-", label=solver)
ref = torch.tensor([10.0, 300.0])
ax.loglog(ref, 2e-1 * (ref / 10) ** -1.0, "k:", lw=0.8, label="slope −1")
ax.loglog(ref, 3e-2 * (ref / 10) ** -2.0, "k--", lw=0.8, label="slope −2")
ax.set(xlabel="NFE (network evaluations)", ylabel="max |error| of the output",
       title="single Gaussian, EDM steps (ρ = 7)")
_ = ax.legend()

# %% [markdown]
# ## 2.5 Error versus cost on an image-shaped mixture
#
# > Given that the sampling process is dominated entirely by the cost of $D_\theta$,
# > improvements in NFE translate directly to sampling speed. (Sec. 3)
#
# Images bend at every scale of detail; our stand-in is Chapter 1's image-shaped mixture
# (8 components, 3 × 8 × 8, component std 0.1): the ODE must pick a component, then bend
# into it. Its exact solution at σ = 0 comes from Chapter 1's RK4 solver, 200 steps uniform
# in log σ down to σ = 10⁻⁴, then the ideal denoiser (the path below 10⁻⁴ moves a point by
# at most {glue:text}`tail_move`). Every sampler below starts from the *same*
# {glue:text}`n_samples` latents and is compared to that end point.
#
# Two numbers per run: the **typical error**, the median over samples of the RMS
# difference per pixel; and the **component error rate**, the fraction of samples that end
# nearest another component than their exact solution does — a coarse step near a decision
# boundary sends a sample to the wrong mode, an error no later refinement repairs.

# %%
B = MODE.pick(quick=256, full=4096)
z_img = torch.randn(B, *gm_img.shape, dtype=F64,
                    generator=torch.Generator().manual_seed(1))


def exact_end(sigma_max, latents, steps=200, sigma_end=1e-4):
    """The exact ODE solution at sigma = 0 from latents * sigma_max (RK4 reference, then
    the ideal denoiser)."""
    grid = torch.logspace(math.log10(sigma_max), math.log10(sigma_end), steps + 1,
                          dtype=F64)
    x = solve_ode_rk4(EDM(sigma_end, sigma_max), gm_img, latents * sigma_max, grid)[-1]
    return gm_img.denoise(x, sigma_end)


truth = {}  # sigma_max -> exact end points for z_img


def component(x):
    return torch.cdist(x.flatten(1), gm_img.means.flatten(1)).argmin(1)


def score(out, sigma_max=80.0):
    """(typical error, component error rate) of sampler outputs against the exact end
    points."""
    if sigma_max not in truth:
        truth[sigma_max] = exact_end(sigma_max, z_img)
    per_sample = (out - truth[sigma_max]).flatten(1).pow(2).mean(1).sqrt()
    wrong = component(out) != component(truth[sigma_max])
    return per_sample.median().item(), wrong.double().mean().item()


# %% [markdown]
# **Check** — the reference is converged: RK4's error falls 16× per halving of the step, so
# the 200-step reference is ~16× closer to the truth than its difference to a 100-step one,
# far below any error we measure; and the last stretch of the path, below σ = 10⁻⁴, is tiny.

# %% tags=["hide-input"]
coarse, fine = exact_end(80.0, z_img[:32], steps=100), exact_end(80.0, z_img[:32])
print(f"RK4 reference, 100 vs 200 steps: max difference "
      f"{(coarse - fine).abs().max():.1e}")
assert (coarse - fine).abs().max() < 1e-4
x_1e4 = solve_ode_rk4(EDM(1e-4, 80.0), gm_img, z_img[:32] * 80.0,
                      torch.logspace(math.log10(80), -4, 201, dtype=F64))[-1]
# the final denoising step's size
tail_move = (gm_img.denoise(x_1e4, 1e-4) - x_1e4).abs().max().item()
print(f"the path below sigma = 1e-4 moves a point by at most {tail_move:.1e}")
assert tail_move < 1e-6
glue("tail_move", sci(tail_move), display=False)
glue("n_samples", str(B), display=False)

# %% [markdown]
# Now the analogue of the paper's Fig. 2 for EDM's own σ(t) = t: Euler and Heun, each with
# uniform steps (ρ = 1) and with EDM's steps (ρ = 7), at equal NFE.

# %%
NFES = MODE.pick(quick=[9, 17, 35, 65, 129], full=[9, 17, 35, 65, 129, 257, 513])


def steps_for(nfe, solver):
    return nfe if solver == "euler" else (nfe + 1) // 2


curves = {}
for rho, label in [(1, "uniform t"), (7, "EDM ρ=7")]:
    for solver in ["euler", "heun"]:
        runs = [sample_ode(gm_img, z_img, edm_time_steps(gm_img, steps_for(n, solver),
                                                         rho=rho), solver=solver)
                for n in NFES]
        curves[f"{solver}, {label}"] = [score(out) for out in runs]
print(f"{'':18s}" + "".join(f"{n:>16d}" for n in NFES)
      + "   (NFE: typical error / component error rate)")
for name, row in curves.items():
    print(f"{name:18s}" + "".join(f"{e:>9.1e} /{c:5.3f}" for e, c in row))

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
for name, row in curves.items():
    style = dict(ls="-" if "EDM" in name else ":", ms=4,
                 marker="o" if "heun" in name else "s")
    ax1.loglog(NFES, [e for e, _ in row], label=name, **style)
    ax2.semilogx(NFES, [100 * c for _, c in row], label=name, **style)
ax1.set(xlabel="NFE", ylabel="typical error (median RMS per pixel)",
        title="error vs NFE, σ(t) = t")
ax2.set(xlabel="NFE", ylabel="samples in the wrong component (%)",
        title="component errors vs NFE")
_ = ax1.legend(), ax2.legend()
plt.tight_layout()

# %% [markdown]
# What the figure shows, and the cell below asserts:
# * **Steps matter more than the solver.** With uniform steps both solvers are poor; Heun
#   is even *worse* than Euler there, because its huge last steps into small σ evaluate the
#   second slope far from the data, where $(\mathbf{x} - D)/\sigma$ is enormous.
# * **With EDM's steps, Heun wins and keeps winning.** At 35 NFE it has the smallest
#   typical error, {glue:text}`s_heun7_35`, and sends {glue:text}`s_heun7_35c` of the
#   samples to the wrong component, while Euler with the same 35 evaluations has
#   {glue:text}`s_euler7_35` and misplaces {glue:text}`s_euler7_35c` (with uniform steps:
#   {glue:text}`s_euler1_35` and {glue:text}`s_euler1_35c`). From then on Heun's typical
#   error falls about 4× per doubling of NFE, Euler's about 2× (at 129 NFE:
#   {glue:text}`s_heun7_129` against {glue:text}`s_euler7_129`). At 9 NFE Euler still wins:
#   5 Heun steps are too few for a second-order method to pay for its second evaluation.

# %% tags=["hide-input"]
at = {name: dict(zip(NFES, row)) for name, row in curves.items()}
heun7, euler7 = at["heun, EDM ρ=7"], at["euler, EDM ρ=7"]
euler1, heun1 = at["euler, uniform t"], at["heun, uniform t"]
print("at 35 NFE: " + ", ".join(
    f"{name} {row[35][0]:.2e} ({100 * row[35][1]:.1f}% component errors)"
    for name, row in [("Heun+EDM", heun7), ("Euler+EDM", euler7),
                      ("Euler uniform", euler1), ("Heun uniform", heun1)]))
assert heun7[35][0] < euler7[35][0] < euler1[35][0] < heun1[35][0]
assert heun7[35][1] < euler7[35][1] < euler1[35][1]
assert all(heun1[n][0] > euler1[n][0] for n in NFES)  # uniform steps: Heun is worse
assert all(heun7[n][0] < euler7[n][0] / 2 for n in NFES if n >= 65)
assert heun7[9][0] > euler7[9][0]
assert 3 < heun7[65][0] / heun7[129][0] < 5
assert 1.6 < euler7[65][0] / euler7[129][0] < 2.4
for key, row in [("heun7", heun7), ("euler7", euler7), ("euler1", euler1)]:
    glue(f"s_{key}_35", sci(row[35][0]), display=False)
    glue(f"s_{key}_35c", pct(row[35][1]), display=False)
    glue(f"s_{key}_129", sci(row[129][0]), display=False)

# %% [markdown]
# ## 2.6 Why ρ ≈ 7
#
# > [...] setting ρ = 3 nearly equalizes the truncation error at each step, but that ρ in
# > range of 5 to 10 performs much better for sampling images. This suggests that errors
# > near σ_min have a large impact. (Sec. 3)
#
# One Heun step from the exact solution at $t_i$ to $t_{i+1}$, compared with the exact
# solution there, is the **local truncation error** of step i. Against σ for ρ = 1, 3 and 7
# (N = 18): uniform steps waste the large σ (errors down to {glue:text}`lte_rho1_min`) and
# are catastrophic at small σ (up to {glue:text}`lte_rho1_max`); raising ρ moves steps from
# where the trajectory is straight to where it bends.

# %%
def local_errors(rho, num_steps=18, latents=z_img[:64]):
    """Typical local error of each Heun step i < N - 1, started from the exact solution
    at t_i."""
    t = edm_time_steps(gm_img, num_steps, rho=rho)
    x, errs = latents * t[0], []
    for t_cur, t_next in zip(t[:-2], t[1:-1]):
        fine = torch.logspace(math.log10(t_cur), math.log10(t_next), 11, dtype=F64)
        x_exact = solve_ode_rk4(EDM(float(t_next), float(t_cur)), gm_img, x, fine)[-1]
        x_step = ode_step(gm_img, SamplerSchedule(), x, t_cur, t_next)
        errs.append((x_step - x_exact).flatten(1).pow(2).mean(1).sqrt().median().item())
        x = x_exact
    return t[:-2], torch.tensor(errs)


RHOS_LTE = [1, 2, 3, 4, 5, 7, 10]
lte = {rho: local_errors(rho) for rho in RHOS_LTE}
# how unequal the local errors are, in decades
spread = {rho: e.log10().std().item() for rho, (_, e) in lte.items()}
print("spread of log10(local error) over the steps:",
      ", ".join(f"ρ={r}: {s:.2f}" for r, s in spread.items()))

# %% [markdown]
# Our ground truth agrees with the paper. Equalisation (the smallest spread of the local
# errors, in decades) happens at ρ = {glue:text}`rho_equal`; the *global* error keeps
# falling well past that, because an error made at large σ is shrunk by the rest of the
# trajectory (it contracts towards the data by the factor
# $\sqrt{s^2 + \sigma^2}/\sqrt{s^2 + \sigma_i^2}$ for a Gaussian), while an error made near
# σ_min stays in the output. Below, the sweep of ρ at 18 Heun steps (35 NFE).

# %%
RHOS = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 30]
sweep = {rho: score(sample_ode(gm_img, z_img, edm_time_steps(gm_img, 18, rho=rho)))
         for rho in RHOS}
print("typical error at 35 NFE:",
      ", ".join(f"ρ={r}: {e:.1e}" for r, (e, _) in sweep.items()))

# %% tags=["hide-input"]
glue("lte_rho1_min", sci(lte[1][1].min().item()), display=False)
glue("lte_rho1_max", sci(lte[1][1].max().item()), display=False)
glue("rho_equal", str(min(spread, key=spread.get)), display=False)
assert lte[1][1].max() > 1e4 * lte[1][1].min()
best = min(e for e, _ in sweep.values())
assert min(spread, key=spread.get) in (3, 4)
assert sweep[3][0] > 2 * sweep[7][0] and sweep[1][0] > 100 * sweep[7][0]
assert sweep[7][0] < 1.6 * best  # past rho = 7 the curve is nearly flat

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
for rho in [1, 3, 7]:
    sig, e = lte[rho]
    ax1.loglog(sig, e, "o-", ms=3, label=f"ρ = {rho}")
ax1.invert_xaxis()
ax1.set(xlabel="σ at the start of the step", title="local error of Heun steps, N = 18",
        ylabel="local error (median RMS per pixel)")
ax2.loglog(RHOS, [e for e, _ in sweep.values()], "o-")
ax2.axvline(7, color="C3", lw=0.8, ls="--")
ax2.set(xlabel="ρ", ylabel="typical global error",
        title="global error vs ρ at 35 NFE (Heun)")
_ = ax1.legend()
plt.tight_layout()

# %% [markdown]
# On this toy the curve keeps drifting down slowly after ρ = 7; the paper chose ρ = 7 from
# image quality in the range 5–10. Either way ρ = 7 sits at the knee: most of the gain, and
# steps at large σ that are still fine enough to pick the right component (§2.5).
#
# ## 2.7 The original samplers, re-expressed
#
# > Note that our reimplementations are fully specified by Algorithm 1 and Table 1, even
# > though the original codebases are structured very differently from each other. (Sec. 3)
#
# The **ablation sampler** makes every choice of Table 1 an argument: `discretization`, the
# time steps of a column (`'vp'`: uniform in VP's t from 1 to $\epsilon_s$; `'ve'`:
# geometric in σ²; `'iddpm'`: entries of the table u; `'edm'`: Eq. 5); `schedule`, σ(t)
# (`'vp'`, `'ve'` or `'linear'`); `scaling`, s(t) (`'vp'` or `'none'`); and `solver`.
#
# The default σ range follows the discretization (VP: σ(ε_s) ≈ 0.0105 to σ(1) ≈ 152; VE:
# 0.02 to 100; iDDPM: 0.002 to 81; EDM: 0.002 to 80) and is clamped to the network's. The VP
# schedule is then *re-fitted* to the range (Chapter 1's `VP.from_sigma_range`). iDDPM's
# discretization, as in the official ablation sampler, takes N entries of u inside the range,
# evenly spaced by index — not Table 1's $j_0$ formula. The time steps are
# $t_i = \sigma^{-1}(\mathrm{round\_sigma}(\sigma_i))$.

# %% tags=["export"]
# default sigma ranges per discretization; 'vp' takes its own from VP()
_ABLATION_SIGMA_RANGE = {"ve": (0.02, 100.0), "iddpm": (0.002, 81.0),
                         "edm": (0.002, 80.0)}


def _ablation_sigma_steps(num_steps, sigma_min, sigma_max, discretization="edm",
                          rho=7.0, epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000,
                          device=None):
    """sigma_0 > ... > sigma_{N-1} of a column of Table 1 ('time steps' row) on
    [sigma_min, sigma_max]."""
    _check_choice(discretization, "discretization", _DISCRETIZATIONS)
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / max(num_steps - 1, 1)
    if discretization == "vp":
        vp = _vp_fitted(sigma_min, sigma_max, epsilon_s)
        return vp._sigma(vp._time_steps(frac))
    if discretization == "ve":
        ve = VE(sigma_min, sigma_max)
        return ve._sigma(ve._time_steps(frac))
    if discretization == "iddpm":  # N entries of u in the range, evenly spaced by index
        u = iddpm_u(M, C_1, C_2).to(device)
        u = u[(u >= sigma_min) & (u <= sigma_max)]
        if len(u) == 0:
            raise ValueError(f"no entry of the iDDPM table u lies in "
                             f"[{sigma_min:g}, {sigma_max:g}]")
        return u[((len(u) - 1) / max(num_steps - 1, 1) * i).round().to(torch.int64)]
    return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device)


def ablation_setup(net, num_steps=18, sigma_min=None, sigma_max=None, rho=7.0,
                   discretization="edm", schedule="linear", scaling="none",
                   epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, device=None):
    """Time steps t_0 > ... > t_N = 0 and the SamplerSchedule of any mix of Table 1's
    choices (Sec. 3). Chapter 2.

    Returns (t_steps, schedule) for `sample_ode` (and Chapter 3's samplers); the
    arguments are the official ablation sampler's.
    """
    num_steps, rho = _check_num_steps(num_steps), _check_real(rho, "rho", 0)
    _check_choice(discretization, "discretization", _DISCRETIZATIONS)
    _check_choice(schedule, "schedule", _SCHEDULES)
    _check_choice(scaling, "scaling", _SCALINGS)
    epsilon_s = _check_real(epsilon_s, "epsilon_s", 0)
    if not epsilon_s < 1:
        raise ValueError(f"epsilon_s must lie in (0, 1), got {epsilon_s}")
    if discretization == "vp":
        default = (VP(epsilon_s=epsilon_s).sigma_min, VP().sigma_max)
    else:
        default = _ABLATION_SIGMA_RANGE[discretization]
    lo = default[0] if sigma_min is None else sigma_min
    hi = default[1] if sigma_max is None else sigma_max
    sigma_min, sigma_max = _sigma_range(net, lo, hi)
    sched = SamplerSchedule.from_names(schedule, scaling, sigma_min, sigma_max,
                                       epsilon_s)
    sigma_steps = _ablation_sigma_steps(num_steps, sigma_min, sigma_max, discretization,
                                        rho, epsilon_s, C_1, C_2, M, device=device)
    t_steps = sched.sigma_inv(torch.as_tensor(net.round_sigma(sigma_steps)))
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])]), sched


# %% [markdown]
# **Checks** — the VP and VE discretizations are Chapter 1's Table 1 time steps; EDM's are
# `edm_time_steps`; and whatever σ(t) and s(t), the sampler solves the *same* ODE: every
# pairing converges to the exact end point of §2.5 (error > 10× smaller at 256 than at 64 steps).

# %% tags=["hide-input"]
for name, column in [("vp", VP()), ("ve", VE())]:
    t_ab, sch = ablation_setup(gm_img, 18, discretization=name, schedule=name,
                               scaling="vp" if name == "vp" else "none")
    assert torch.allclose(sch.sigma(t_ab), column.sigma_steps(18), rtol=1e-12, atol=0)
t_ab, sch = ablation_setup(gm_img, 18)
assert torch.equal(t_ab, edm_time_steps(gm_img, 18)) and sch.plain
exact16 = truth[80.0][:16]
pairings = [("linear", "none"), ("vp", "vp"), ("ve", "none"), ("vp", "none"),
            ("linear", "vp")]
for schedule, scaling in pairings:
    errs = []
    for N in [64, 256]:
        t_ab, sch = ablation_setup(gm_img, N, schedule=schedule, scaling=scaling)
        out = sample_ode(gm_img, z_img[:16], t_ab, sch)
        errs.append((out - exact16).abs().max().item())
    print(f"sigma(t) {schedule:6s} s(t) {scaling:4s}: max error {errs[0]:.1e} "
          f"(64 steps), {errs[1]:.1e} (256 steps)")
    assert errs[1] < errs[0] / 10 and errs[1] < 2e-3

# %% [markdown]
# Now the paper's Fig. 2 on ground truth. For each of the three earlier models we run its
# *original* deterministic sampler (Euler, its own time steps, σ(t) and s(t)), then Heun
# with the same steps, then Heun with EDM's steps (keeping the model's σ(t) and s(t)), and
# finally EDM's sampler. Each run is compared with the exact solution from its own σ_max.

# %%
def cfg(solver, disc, schedule="linear", scaling="none"):
    return dict(solver=solver, discretization=disc, schedule=schedule, scaling=scaling)


FIG2 = {
    "VP": [("original: Euler", cfg("euler", "vp", "vp", "vp")),
           ("Heun", cfg("heun", "vp", "vp", "vp")),
           ("Heun + EDM steps", cfg("heun", "edm", "vp", "vp"))],
    "VE": [("original: Euler", cfg("euler", "ve", "ve")),
           ("Heun", cfg("heun", "ve", "ve")),
           ("Heun + EDM steps", cfg("heun", "edm", "ve"))],
    "iDDPM": [("original: Euler (DDIM)", cfg("euler", "iddpm")),
              ("Heun", cfg("heun", "iddpm"))],
}
EDM_SAMPLER = ("EDM: Heun + EDM steps, σ(t) = t", cfg("heun", "edm"))
fig2 = {}
for model, rows in FIG2.items():
    for label, config in rows + [EDM_SAMPLER]:
        config = dict(config)
        solver = config.pop("solver")
        results = []
        for n in NFES:
            t_ab, sch = ablation_setup(gm_img, steps_for(n, solver), **config)
            out = sample_ode(gm_img, z_img, t_ab, sch, solver=solver)
            results.append(score(out, sigma_max=float(sch.sigma(t_ab[0]))))
        fig2[(model, label)] = results

fig, axes = plt.subplots(2, 3, figsize=(15, 7), sharex=True)
for col, model in enumerate(FIG2):
    for label, _ in FIG2[model] + [EDM_SAMPLER]:
        row = fig2[(model, label)]
        axes[0, col].loglog(NFES, [e for e, _ in row], "o-", ms=3, label=label)
        axes[1, col].semilogx(NFES, [100 * c for _, c in row], "o-", ms=3, label=label)
    axes[0, col].set(title=f"{model} model (ground truth)", ylabel="typical error")
    axes[1, col].set(xlabel="NFE", ylabel="wrong component (%)")
    _ = axes[0, col].legend(fontsize=8)
plt.tight_layout()

# %% [markdown]
# At the paper's budget of 35 NFE, EDM's sampler beats each original sampler on both counts
# (asserted below). The intermediate curves are more mixed than the paper's FID curves:
# Heun with the *original* steps trades one kind of error for the other (VP: fewer
# component errors, larger typical error; VE and iDDPM the reverse). And for VP, Heun with
# EDM's steps but VP's σ(t) and s(t) has a *smaller* typical error than σ(t) = t
# ({glue:text}`vp_edm_err` against {glue:text}`edm35_err`) yet more samples in the wrong
# component ({glue:text}`vp_edm_comp` against {glue:text}`edm35_comp`): the straight
# trajectories of σ(t) = t (§1.4) keep samples in the right mode when steps are few.

# %% tags=["hide-input"]
at35 = {key: dict(zip(NFES, row))[35] for key, row in fig2.items()}
print(f"{'at 35 NFE':42s} typical error  wrong component")
for (model, label), (e, c) in at35.items():
    print(f"{model:6s}{label:36s} {e:11.2e} {100 * c:12.1f}%")
for model in FIG2:
    edm_35, orig_35 = at35[(model, EDM_SAMPLER[0])], at35[(model, FIG2[model][0][0])]
    assert edm_35[0] < orig_35[0] and edm_35[1] < orig_35[1] / 4, model
vp_edm_steps, edm_35 = at35[("VP", "Heun + EDM steps")], at35[("VP", EDM_SAMPLER[0])]
assert vp_edm_steps[0] < edm_35[0]
assert vp_edm_steps[1] > 3 * edm_35[1] and vp_edm_steps[1] > 0
# Heun with the original steps: VP's typical error up, component errors down;
# VE and iDDPM the reverse
for model, sign in [("VP", +1), ("VE", -1), ("iDDPM", -1)]:
    euler_o, heun_o = at35[(model, FIG2[model][0][0])], at35[(model, "Heun")]
    assert sign * (heun_o[0] - euler_o[0]) > 0 and sign * (heun_o[1] - euler_o[1]) < 0
glue("vp_edm_err", sci(vp_edm_steps[0]), display=False)
glue("edm35_err", sci(edm_35[0]), display=False)
glue("vp_edm_comp", pct(vp_edm_steps[1]), display=False)
glue("edm35_comp", pct(edm_35[1]), display=False)

# %% tags=["hide-input"]
# the numbers that the answers to the exercises below quote
ex1 = {n: score(sample_ode(gm_img, z_img, edm_time_steps(gm_img, (n + 1) // 2,
                                                         sigma_min=0.02)))[0]
       for n in [35, 129, 513]}
s_comp = float(gm_img.stds.max())  # the components' std
print("exercise 1 (sigma_min = 0.02): typical error "
      + ", ".join(f"{e:.1e} at {n} NFE" for n, e in ex1.items()))
# better at 35 NFE, then a floor
assert ex1[35] < heun7[35][0] and ex1[513] > 0.8 * ex1[129] > 2 * heun7[129][0]
# §2.4's convergence check with the midpoint rule
mid = [(sample_ode(gauss, zg, edm_time_steps(gauss, n + 1), alpha=0.5)
        - gauss_target(zg)).abs().max().item() for n in intervals]
mid_ratios = [a / b for a, b in zip(mid[:-1], mid[1:])]
mid_ratio = statistics.median(mid_ratios[2:])
print(f"exercise 2 (alpha = 1/2): max error {', '.join(f'{e:.1e}' for e in mid)}; "
      f"ratios {', '.join(f'{r:.2f}' for r in mid_ratios)}")
# better than Heun's 4x per halving on this ODE
assert 6 < mid_ratio < 10 and mid[-1] < global_err["heun"][-1]
euler30 = {n: score(sample_ode(gm_img, z_img, edm_time_steps(gm_img, n, rho=30),
                               solver="euler"))[0] for n in [35, 70]}
heun_69 = score(sample_ode(gm_img, z_img, edm_time_steps(gm_img, 35)))[0]
print(f"exercise 3: Euler rho = 30 {euler30[35]:.1e} (35 NFE), {euler30[70]:.1e} "
      f"(70 NFE); Heun rho = 7 {heun7[35][0]:.1e} (35 NFE), {heun_69:.1e} (69 NFE)")
assert euler30[35] < heun7[35][0] and heun_69 < euler30[70]
assert 3 < heun7[35][0] / heun_69 < 5.5 and 1.5 < euler30[35] / euler30[70] < 2.5
glue("ex1_35", sci(ex1[35]), display=False)
glue("ex1_floor", sci(ex1[513]), display=False)
glue("ex1_short", f"{100 * 0.02**2 / (2 * s_comp**2):.0f} %", display=False)
glue("ex1_short_edm", f"{100 * 0.002**2 / (2 * s_comp**2):.2f} %", display=False)
glue("ex2_ratio", f"{mid_ratio:.0f}", display=False)
glue("ex3_euler", sci(euler30[35]), display=False)
glue("ex3_heun", sci(heun7[35][0]), display=False)
glue("ex3_heun_gain", f"{heun7[35][0] / heun_69:.1f}", display=False)
glue("ex3_euler_gain", f"{euler30[35] / euler30[70]:.1f}", display=False)

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.samplers` (Chapter 3 adds the stochastic samplers):
#
# - `SamplerSchedule` — σ(t) of a Table 1 column with an independent scaling s(t), and the
#   ODE slope `derivative(net, x, t)` (one network call);
# - `ode_step` — one Euler or Heun step (Algorithm 1; `alpha` for the 2nd-order family);
# - `edm_time_steps` — Eq. 5 on the network's range and grid, with $t_N = 0$;
# - `sample_ode` — Algorithm 1 along any time steps: NFE = 2N − 1 for Heun, N for Euler;
# - `ablation_setup` — the time steps and `SamplerSchedule` of any mix of the VP, VE, iDDPM
#   and EDM choices, with the official ablation sampler's arguments and defaults.
#
# Exported to `edm_lit.course` (helpers the chapters share, not library API): `sci`, `pct`
# and `Recording`. The measured accuracy of each sampler is in §2.5 and §2.7.
#
# ## Exercises
#
# 1. Run §2.5 with σ_min = 0.02 instead of 0.002. What happens to Heun + EDM at 35 NFE, and
#    at 129 and 513 NFE?
# 2. Set `alpha=0.5` (the midpoint method) in the convergence check of §2.4. Is it still
#    second order?
# 3. For a fixed budget of 35 NFE, is it better to spend it on 18 Heun steps or 35 Euler
#    steps with ρ = 30?
#
# :::{dropdown} Answers
# 1. At 35 NFE the typical error *drops* (to {glue:text}`ex1_35`): no steps are spent below
#    0.02. But it stops falling, at about {glue:text}`ex1_floor` (513 NFE). The final Euler
#    step lands on $D(\mathbf{x}(\sigma_\text{min}); \sigma_\text{min})$, not on
#    $\mathbf{x}(0)$: for a component of std s it stops short by a fraction ≈ σ_min²/(2s²)
#    of the distance to its mean — {glue:text}`ex1_short` here, {glue:text}`ex1_short_edm`
#    with σ_min = 0.002. σ_min sets the floor; the steps set how fast you reach it.
# 2. Any α > 0 gives a second-order method. On the single Gaussian the midpoint rule does
#    even better (error ratios near {glue:text}`ex2_ratio` per halving): a property of that
#    particular ODE, not of the method — try it on the mixture.
# 3. On this toy, 35 Euler steps with ρ = 30 reach a typical error of
#    {glue:text}`ex3_euler`, slightly below Heun's {glue:text}`ex3_heun`: raising ρ helps
#    Euler too. But Euler stays first order: double the budget and Heun's error falls
#    {glue:text}`ex3_heun_gain`×, Euler's {glue:text}`ex3_euler_gain`×.
# :::
