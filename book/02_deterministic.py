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
# Chapter 1 turned sampling into solving an ordinary differential equation: start from pure
# noise at σ_max and follow the probability-flow ODE down to σ = 0, asking the denoiser for the
# direction at every point. A solver only ever sees the ODE at a handful of points, and each
# point costs one evaluation of the network — the expensive part. This chapter asks how to
# spend a fixed budget of evaluations (the *NFE*, number of function evaluations) well. The
# paper's answer (Sec. 3, Algorithm 1) has two parts: a second-order solver (Heun's method)
# instead of Euler's, and time steps that shrink towards small σ (Eq. 5). We derive both, and
# we *measure* them against the exact solution, which our ground-truth data sets give us.
#
# Everything here is deterministic. Chapter 3 adds the noise of Algorithm 2 and wraps both into
# the official interface, `edm_sampler` and `ablation_sampler`.

# %% tags=["export"]
import math
import numbers

import torch

from edm_lit.framework import VE, VP, edm_sigma_steps, iddpm_u

SOLVERS = ("euler", "heun")
DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")
SCHEDULES = ("vp", "ve", "linear")
SCALINGS = ("vp", "none")

# %% [markdown]
# The samplers check every argument a user passes, at the door, and name it in the error. The
# four small checks they share are in the collapsed cell below (exported with the rest; open it
# to read them): a choice among names, a real number with an optional lower bound, a step
# count, and a vector of time steps ending at 0.

# %% tags=["export", "hide-input"]
def check_choice(value, name, choices):
    """`value` if it is one of the strings `choices`; else a ValueError naming `name`. Chapter 2."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_real(value, name, minimum=None, strict=True):
    """`value` as a float; refuses NaN and, if `minimum` is given, values below it (or equal, if strict). Chapter 2."""
    try:
        value = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value}")
    return value


def check_num_steps(num_steps):
    """`num_steps` as an int >= 1 (an integral float is accepted); else a ValueError. Chapter 2."""
    ok = isinstance(num_steps, numbers.Real) and not isinstance(num_steps, bool)
    if not ok or not math.isfinite(num_steps) or num_steps != int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return int(num_steps)


def check_t_steps(t_steps, device=None):
    """Time steps t_0 > ... > t_N = 0 as a float64 tensor on `device`; else a ValueError. Chapter 2."""
    t_steps = torch.as_tensor(t_steps, dtype=torch.float64, device=device)
    if t_steps.ndim != 1 or len(t_steps) < 2 or t_steps[-1] != 0 or not bool((t_steps[:-1] > 0).all()):
        raise ValueError("t_steps must be 1-D with at least two entries, all > 0 except the last, which must be 0")
    return t_steps


# %%
import statistics

import matplotlib.pyplot as plt
import torch
from myst_nb import glue

from edm_lit.framework import EDM, VE, VP, GaussianMixture, ode_slope, solve_ode_rk4, toy_image_mixture
from edm_lit.mode import get_mode

MODE = get_mode()
torch.manual_seed(0)
torch.set_num_threads(1)  # the tensors of this chapter are tiny: one thread is fastest, and immune to a busy machine
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
F64 = torch.float64


def sci(v, digits=1):
    """v as 'm.m × 10⁻ᵏ' for prose (glued into the text)."""
    m, e = f"{v:.{digits}e}".split("e")
    return f"{m} × 10{str(int(e)).translate(str.maketrans('-0123456789', '⁻⁰¹²³⁴⁵⁶⁷⁸⁹'))}"


def pct(v):
    """a fraction as a percentage for prose."""
    return f"{100 * v:.1f} %"

# %% [markdown]
# ## 2.1 A sampler's view of time
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
# Chapter 1's `ode_slope` computes this with every argument checked. A sampler evaluates it
# thousands of times on values it made itself, so we give it a lean object instead: a
# `SamplerSchedule` pairs the σ(t) of one column of Table 1 (VP, VE, or *linear*, σ(t) = t) with
# a scaling s(t) chosen *independently* — `'none'` (s = 1) or `'vp'` (s = 1/√(1 + σ²)), as the
# paper's ablations mix them. Its methods skip the checks (they serve the inner loop), and
# `derivative` makes the one network call per slope. For σ(t) = t, s(t) = 1 it uses the short
# form, `(x - D) / t`, which is also how the official sampler computes it.

# %% tags=["export"]
class SamplerSchedule:
    """The sigma(t) and s(t) a sampler steps in, and the ODE slope they give (Eq. 4 with Eq. 3). Chapter 2.

    `sigma`: a schedule of edm_lit.framework (VP, VE, ...) supplying sigma(t), its derivative and inverse, or None
    for sigma(t) = t; `scaling`: 'none' (s(t) = 1) or 'vp' (s(t) = 1 / sqrt(1 + sigma(t)^2)). None and 'none' is
    EDM's choice. The methods take float64 tensors and are unchecked: they serve the sampling loop.
    """

    def __init__(self, sigma=None, scaling="none"):
        self.base, self.scaling = sigma, check_choice(scaling, "scaling", SCALINGS)
        self.plain = sigma is None and scaling == "none"

    def __repr__(self):
        return f"SamplerSchedule(sigma={self.base!r}, scaling={self.scaling!r})"

    @classmethod
    def from_names(cls, schedule="linear", scaling="none", sigma_min=0.002, sigma_max=80.0, epsilon_s=1e-3):
        """By the ablation sampler's names: schedule 'vp' (fitted to [sigma_min, sigma_max]), 've' or 'linear'."""
        check_choice(schedule, "schedule", SCHEDULES)
        if schedule == "vp":
            return cls(vp_fitted(sigma_min, sigma_max, epsilon_s), scaling)
        return cls(VE(sigma_min, sigma_max) if schedule == "ve" else None, scaling)

    def sigma(self, t):
        return t if self.base is None else self.base._sigma(t)

    def sigma_deriv(self, t):
        return torch.ones_like(t) if self.base is None else self.base._sigma_deriv(t)

    def sigma_inv(self, sigma):
        return sigma if self.base is None else self.base._sigma_inv(sigma)

    def s(self, t):
        return torch.ones_like(t) if self.scaling == "none" else 1 / (1 + self.sigma(t) ** 2).sqrt()

    def s_deriv(self, t):
        return torch.zeros_like(t) if self.scaling == "none" else -self.sigma(t) * self.sigma_deriv(t) * self.s(t) ** 3

    def derivative(self, net, x, t, class_labels=None):
        """dx/dt at (x, t), float64: one call of the denoiser `net` (Algorithm 1, lines 4 and 7)."""
        if self.plain:  # sigma(t) = t, s(t) = 1
            return (x - net(x, t, class_labels).to(torch.float64)) / t
        sigma, dsigma, s, ds = self.sigma(t), self.sigma_deriv(t), self.s(t), self.s_deriv(t)
        denoised = net(x if self.scaling == "none" else x / s, sigma, class_labels).to(torch.float64)
        return (dsigma / sigma + ds / s) * x - dsigma * s / sigma * denoised


def vp_fitted(sigma_min, sigma_max, epsilon_s=1e-3):
    """The VP schedule with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max, as the ablation sampler fits it."""
    epsilon_s = check_real(epsilon_s, "epsilon_s", 0)
    floor = math.log1p(sigma_min**2) / math.log1p(sigma_max**2)  # below it, beta_d would come out <= 0
    if not floor < epsilon_s < 1:
        raise ValueError(f"epsilon_s must lie in ({floor:.3g}, 1) for a VP schedule on [{sigma_min:g}, {sigma_max:g}], "
                         f"got {epsilon_s}")
    return VP.from_sigma_range(sigma_min, sigma_max, epsilon_s)


# %% [markdown]
# **Check** — the three pairings that are columns of Table 1 (VP with VP scaling, VE, and EDM's
# linear σ with no scaling) must give exactly Chapter 1's `ode_slope`: same ODE, different code.
# We test on the image-shaped mixture of Chapter 1.

# %%
gm_img = toy_image_mixture()
x = 3.0 * torch.randn(6, *gm_img.shape, dtype=F64)
pairs = {"vp": (SamplerSchedule(VP(), "vp"), VP()), "ve": (SamplerSchedule(VE()), VE()),
         "linear": (SamplerSchedule(), EDM())}
for name, (ours, column) in pairs.items():
    t = column.sigma_inv(torch.tensor(1.7, dtype=F64))
    mine, ref = ours.derivative(gm_img, x, t), ode_slope(column, gm_img, x, t)
    err = ((mine - ref).abs().max() / ref.abs().max()).item()
    print(f"{name:6s}: |SamplerSchedule.derivative - ode_slope| / |ode_slope| = {err:.1e}")
    assert err < 2e-15  # the same arithmetic up to rounding

# %% [markdown]
# ## 2.2 Euler and Heun
#
# Between two time steps $t_i > t_{i+1}$, write $h = t_{i+1} - t_i$ (negative: we integrate
# towards σ = 0) and $d_i$ for the slope at $(\mathbf{x}_i, t_i)$. **Euler's method** follows the
# tangent, $\mathbf{x}_{i+1} = \mathbf{x}_i + h\, d_i$. Its error per step is $O(h^2)$, so the
# error after $1/h$ steps is $O(h)$: halving the step halves the error.
#
# **Heun's method** (Algorithm 1, lines 5–8) takes that Euler step only as a guess
# $\mathbf{x}'$, evaluates the slope $d'_i$ *there*, and steps again from $\mathbf{x}_i$ with the
# average of the two slopes:
#
# $$\mathbf{x}_{i+1} = \mathbf{x}_i + h\left(\tfrac12 d_i + \tfrac12 d'_i\right).$$
#
# The average is the trapezoidal rule applied to the slope, which cancels the $h^2$ term of
# Euler's error: Heun's error per step is $O(h^3)$, its global error $O(h^2)$ — halving the step
# cuts it four-fold — for two evaluations per step instead of one. The official ablation sampler
# generalises the guess to $t_i + \alpha h$ and the weights to $1 - \tfrac1{2\alpha}$, $\tfrac1{2\alpha}$:
# a standard family of second-order Runge–Kutta methods in which α = 1 is Heun's method and
# α = ½ the midpoint method. We keep that `alpha`.
#
# The function below is one step of Algorithm 1, starting from $(\hat{\mathbf{x}}, \hat t)$
# because Chapter 3 will first move the state away from the grid by adding noise. For α = 1 the
# second evaluation is at exactly $t_{i+1}$, not at $\hat t + h$ computed in floating point, so
# that its σ is bit for bit the next time step.

# %% tags=["export"]
def ode_step(net, schedule, x_hat, t_hat, t_next, class_labels=None, second_order=True, alpha=1.0):
    """One step of Algorithm 1 from (x_hat, t_hat) to t_next: Euler (lines 4-5), then Heun's correction (6-8). Chapter 2.

    `alpha` puts the second evaluation at t_hat + alpha h (2nd-order Runge-Kutta; 1 is Heun's method, 1/2 the midpoint).
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
# $\mathcal{N}(\mu, s^2)$ the ideal denoiser is linear, $D(x; \sigma) = \mu + \frac{s^2}{s^2+\sigma^2}(x - \mu)$,
# and the ODE moves $x$ along
#
# $$x(\sigma) = \mu + (x_0 - \mu)\,\frac{\sqrt{s^2 + \sigma^2}}{\sqrt{s^2 + \sigma_0^2}} .$$
#
# One step from σ₀ = 1 with shrinking $|h|$: the error of Euler's step must fall as $|h|^2$ and
# Heun's as $|h|^3$ (slopes 2 and 3 on a log–log plot).

# %%
MU, S = 0.3, 0.5
gauss = GaussianMixture(torch.tensor([[MU]]), stds=S)  # a single Gaussian: its ODE solution is closed form


def exact_path(x0, sigma0, sigma):
    """The exact ODE solution for the single Gaussian above, started at (x0, sigma0)."""
    return MU + (x0 - MU) * math.sqrt(S**2 + sigma**2) / math.sqrt(S**2 + sigma0**2)


x0 = torch.tensor([[-1.2], [0.4], [2.5]], dtype=F64)
steps = [0.4, 0.2, 0.1, 0.05, 0.025]
local = {"euler": [], "heun": []}
for h in steps:
    t0, t1 = torch.tensor(1.0, dtype=F64), torch.tensor(1.0 - h, dtype=F64)
    for solver in local:
        x1 = ode_step(gauss, SamplerSchedule(), x0, t0, t1, second_order=solver == "heun")
        local[solver].append((x1 - exact_path(x0, 1.0, 1.0 - h)).abs().max().item())
for solver, errs in local.items():
    order = math.log(errs[-2] / errs[-1]) / math.log(2)
    print(f"{solver}: local errors {', '.join(f'{e:.1e}' for e in errs)}  ->  slope {order:.2f}")
assert abs(math.log(local["euler"][-2] / local["euler"][-1]) / math.log(2) - 2) < 0.1
assert abs(math.log(local["heun"][-2] / local["heun"][-1]) / math.log(2) - 3) < 0.1

# %% [markdown]
# ## 2.3 Where to put the steps: Eq. 5
#
# A step that is fine at σ = 50 may be far too coarse at σ = 0.05: Chapter 1's trajectories are
# nearly straight at large σ and bend where σ approaches the scale of the data's details. The
# paper places the N steps uniformly not in σ but in $\sigma^{1/\rho}$ (Eq. 5):
#
# $$\sigma_{i<N} = \left(\sigma_\text{max}^{1/\rho} + \frac{i}{N-1}\left(\sigma_\text{min}^{1/\rho} - \sigma_\text{max}^{1/\rho}\right)\right)^{\rho}, \qquad \sigma_N = 0 .$$
#
# ρ = 1 is uniform in σ; as ρ → ∞ the steps become uniform in log σ (geometric); larger ρ
# shortens the steps near $\sigma_\text{min}$ at the expense of those near $\sigma_\text{max}$.
# Chapter 1 exported the formula (`edm_sigma_steps`). A sampler adds three things, in this order,
# like the official one: it clamps $[\sigma_\text{min}, \sigma_\text{max}]$ to the range the network
# supports (`net.sigma_min`, `net.sigma_max`); it passes the steps through `net.round_sigma`, which
# snaps them onto the noise levels a network was trained on (iDDPM's table; the identity for EDM);
# and it appends $t_N = 0$.

# %% tags=["export"]
def check_sampler_inputs(net, latents, class_labels=None):
    """Refuse a net without the denoiser interface and latents or labels that do not fit. Chapter 2."""
    missing = [a for a in ("sigma_min", "sigma_max", "round_sigma") if not hasattr(net, a)]
    if missing or not callable(net):
        raise ValueError("net must be a denoiser net(x, sigma, class_labels) with sigma_min, sigma_max and "
                         f"round_sigma; {type(net).__name__} lacks {', '.join(missing) or '__call__'}")
    if not torch.is_tensor(latents) or latents.ndim < 1 or not latents.is_floating_point():
        what = f"a {latents.dtype} tensor of shape {tuple(latents.shape)}" if torch.is_tensor(latents) else repr(type(latents))
        raise ValueError(f"latents must be a floating-point tensor [N, ...], got {what}")
    if class_labels is not None and (not torch.is_tensor(class_labels) or class_labels.ndim < 1
                                     or class_labels.shape[0] != latents.shape[0]):
        got = tuple(class_labels.shape) if torch.is_tensor(class_labels) else repr(type(class_labels))
        raise ValueError(f"class_labels must be a tensor with one row per latent ({latents.shape[0]}), got {got}")


def sigma_range(net, sigma_min, sigma_max):
    """The noise range a sampler covers: [sigma_min, sigma_max] clamped to the network's. Chapter 2."""
    sigma_min, sigma_max = check_real(sigma_min, "sigma_min", 0), check_real(sigma_max, "sigma_max", 0)
    if not sigma_min < sigma_max < math.inf:
        raise ValueError(f"need sigma_min < sigma_max < inf, got sigma_min={sigma_min:g}, sigma_max={sigma_max:g}")
    lo, hi = max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max))
    if not lo < hi:
        raise ValueError(f"the sigma range [{sigma_min:g}, {sigma_max:g}] does not overlap the network's "
                         f"[{float(net.sigma_min):g}, {float(net.sigma_max):g}]")
    return lo, hi


def edm_time_steps(net, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    """EDM's t_0 > ... > t_{N-1} (Eq. 5) on the network's range and grid (round_sigma), then t_N = 0. Chapter 2."""
    num_steps, rho = check_num_steps(num_steps), check_real(rho, "rho", 0)
    sigma_min, sigma_max = sigma_range(net, sigma_min, sigma_max)
    t_steps = torch.as_tensor(net.round_sigma(edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device)))
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


# %% [markdown]
# **Checks** — the end points are exact, the last step is exactly 0, ρ = 1 is uniform, a very
# large ρ approaches the geometric (log-uniform) spacing, and the network's range wins over the
# requested one.

# %%
t18 = edm_time_steps(gm_img, 18)
print("N = 18, rho = 7:", ", ".join(f"{t:.4g}" for t in t18.tolist()))
assert abs(t18[0] - 80) < 1e-12 and abs(t18[-2] - 0.002) < 1e-15 and t18[-1] == 0 and len(t18) == 19
assert torch.allclose(edm_time_steps(gm_img, 5, rho=1)[:-1], torch.linspace(80, 0.002, 5, dtype=F64))
geometric = torch.logspace(math.log10(80), math.log10(0.002), 18, dtype=F64)
assert torch.allclose(edm_time_steps(gm_img, 18, rho=1e5)[:-1], geometric, rtol=1e-3)


class Narrow:  # a stand-in network that supports only sigma in [0.01, 20]
    sigma_min, sigma_max = 0.01, 20.0
    round_sigma = staticmethod(torch.as_tensor)


t_narrow = edm_time_steps(Narrow(), 10)
assert abs(t_narrow[0] - 20) < 1e-12 and abs(t_narrow[-2] - 0.01) < 1e-15

# %% [markdown]
# ## 2.4 Algorithm 1
#
# Start from $\mathbf{x}_0 = \sigma(t_0)\, s(t_0)\, \mathbf{n}$ with the latents $\mathbf{n} \sim \mathcal{N}(\mathbf{0}, \mathbf{I})$,
# and take N steps down the time steps. Two details matter.
#
# * **The last step is an Euler step.** At $t_N = 0$ the slope divides by σ = 0, so there is no
#   second slope to average. Nothing is lost: with σ(t) = t, one Euler step from σ to 0 lands
#   exactly on $D(\mathbf{x}; \sigma)$ (Chapter 1, §1.4) — the final step *is* a denoising.
# * **NFE = 2N − 1.** Each of the first N − 1 steps costs two evaluations and the last one; the
#   paper's 18 steps are its 35 NFE.
#
# Like the official samplers, ours works in float64 throughout: the network receives float64
# `x` and a 0-dim float64 σ and is free to compute in lower precision inside.

# %% tags=["export"]
def sample_ode(net, latents, t_steps, schedule=None, class_labels=None, solver="heun", alpha=1.0):
    """Algorithm 1: deterministic sampling along t_steps (t_N = 0) from x_0 = latents sigma(t_0) s(t_0). Chapter 2.

    `schedule` is a SamplerSchedule (None: sigma(t) = t, s(t) = 1). N steps of Heun cost 2N - 1 network calls: the
    last step, to sigma = 0, is an Euler step. float64 throughout, like the official samplers.
    """
    check_sampler_inputs(net, latents, class_labels)
    second_order = check_choice(solver, "solver", SOLVERS) == "heun"
    alpha = check_real(alpha, "alpha", 0)
    schedule = SamplerSchedule() if schedule is None else schedule
    t_steps = check_t_steps(t_steps, latents.device)
    num_steps = len(t_steps) - 1
    x_next = latents.to(torch.float64) * (schedule.sigma(t_steps[0]) * schedule.s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_next = ode_step(net, schedule, x_next, t_cur, t_next, class_labels, second_order and i < num_steps - 1, alpha)
    return x_next


# %% [markdown]
# **Checks** — a counting wrapper around the denoiser confirms NFE = 2N − 1 for Heun and N for
# Euler, that no call is ever made at σ = 0 (the last call is at $\sigma_\text{min}$), and that
# the network sees float64 and a 0-dim σ. With a single step the sampler is one denoising of the
# starting noise.

# %%
class Counting:
    """Wraps a denoiser and records the sigma of every call."""

    def __init__(self, net):
        self.net, self.sigmas = net, []
        self.sigma_min, self.sigma_max, self.round_sigma = net.sigma_min, net.sigma_max, net.round_sigma

    def __call__(self, x, sigma, class_labels=None):
        assert x.dtype == F64 and sigma.dtype == F64 and sigma.ndim == 0
        self.sigmas.append(float(sigma))
        return self.net(x, sigma, class_labels)


z = torch.randn(8, *gm_img.shape, dtype=F64)
for N in [1, 2, 18]:
    for solver, nfe in [("heun", 2 * N - 1), ("euler", N)]:
        counting = Counting(gm_img)
        sample_ode(counting, z, edm_time_steps(gm_img, N), solver=solver)
        print(f"N = {N:2d}, {solver}: {len(counting.sigmas):2d} calls, the last at sigma = {counting.sigmas[-1]:g}")
        assert len(counting.sigmas) == nfe and min(counting.sigmas) > 0 and counting.sigmas[-1] == min(counting.sigmas)
one_step = sample_ode(gm_img, z, edm_time_steps(gm_img, 1))
assert torch.allclose(one_step, gm_img(z * 80.0, torch.tensor(80.0, dtype=F64)), rtol=0, atol=1e-12)

# %% [markdown]
# **Check** — second order for the whole sampler. For the single Gaussian, the sampler's target
# is known in closed form: the exact solution down to $\sigma_\text{min}$, followed by the same
# final denoising step the sampler takes, $D(x(\sigma_\text{min}); \sigma_\text{min})$. Doubling
# the number of intervals of Eq. 5 halves every step (in $\sigma^{1/\rho}$); the error must fall
# about 4× for Heun and 2× for Euler.

# %%
def gauss_target(latents, sigma_min=0.002, sigma_max=80.0):
    """The exact end point of the sampler's problem for the single Gaussian: D(x(sigma_min); sigma_min)."""
    x_end = exact_path(latents * sigma_max, sigma_max, sigma_min)
    return gauss.denoise(x_end, sigma_min)


zg = torch.linspace(-2.5, 2.5, 11, dtype=F64)[:, None]
intervals = [8, 16, 32, 64, 128]
global_err = {"euler": [], "heun": []}
for n in intervals:
    for solver in global_err:
        out = sample_ode(gauss, zg, edm_time_steps(gauss, n + 1), solver=solver)
        global_err[solver].append((out - gauss_target(zg)).abs().max().item())
for solver, errs in global_err.items():
    ratios = [a / b for a, b in zip(errs[:-1], errs[1:])]
    print(f"{solver}: max error {', '.join(f'{e:.1e}' for e in errs)};  ratios {', '.join(f'{r:.2f}' for r in ratios)}")
assert all(3.5 < r < 4.5 for r in [a / b for a, b in zip(global_err["heun"][2:-1], global_err["heun"][3:])])
assert all(1.8 < r < 2.2 for r in [a / b for a, b in zip(global_err["euler"][2:-1], global_err["euler"][3:])])

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
# A single Gaussian has straight-ish trajectories. The paper's claims are about images, whose
# trajectories bend at every scale of detail. Our stand-in is Chapter 1's image-shaped mixture
# (8 components, 3 × 8 × 8, component std 0.1): the ODE must pick a component, and then bend
# into it. Its exact solution at σ = 0 we compute with Chapter 1's RK4 reference solver, 200 steps
# uniform in log σ down to σ = 10⁻⁴, then one application of the ideal denoiser (what is left of
# the path below 10⁻⁴ moves a point by at most {glue:text}`tail_move`, far below the errors we
# measure). Every
# sampler below starts from the *same* latents and is compared to that end point.
#
# Two numbers per run. The **typical error** is the median over samples of the RMS difference
# per pixel. The **component error rate** is the fraction of samples that end near a different
# mixture component than their exact solution (nearest mean; all components have the same std
# and weight) — a coarse step near a decision boundary sends a sample to the wrong mode, an
# error no amount of later refinement repairs. Both must go to 0 as the steps shrink.

# %%
B = MODE.pick(quick=256, full=4096)
z_img = torch.randn(B, *gm_img.shape, generator=torch.Generator().manual_seed(1), dtype=F64)


def exact_end(sigma_max, latents, steps=200, sigma_end=1e-4):
    """The exact ODE solution at sigma = 0 from latents * sigma_max (RK4 reference, then the ideal denoiser)."""
    grid = torch.logspace(math.log10(sigma_max), math.log10(sigma_end), steps + 1, dtype=F64)
    x = solve_ode_rk4(EDM(sigma_end, sigma_max), gm_img, latents * sigma_max, grid)[-1]
    return gm_img.denoise(x, sigma_end)


truth = {}  # sigma_max -> exact end points for z_img


def component(x):
    return torch.cdist(x.flatten(1), gm_img.means.flatten(1)).argmin(1)


def score(out, sigma_max=80.0):
    """(typical error, component error rate) of sampler outputs against the exact end points."""
    if sigma_max not in truth:
        truth[sigma_max] = exact_end(sigma_max, z_img)
    per_sample = (out - truth[sigma_max]).flatten(1).pow(2).mean(1).sqrt()
    return per_sample.median().item(), (component(out) != component(truth[sigma_max])).double().mean().item()


# the reference is converged: RK4's error falls 16x per halving of the step, so the 200-step reference is
# ~16x closer to the truth than its difference to a 100-step one, far below any error we measure
coarse, fine = exact_end(80.0, z_img[:32], steps=100), exact_end(80.0, z_img[:32])
print(f"RK4 reference, 100 vs 200 steps: max difference {(coarse - fine).abs().max():.1e}")
assert (coarse - fine).abs().max() < 1e-4
x_1e4 = solve_ode_rk4(EDM(1e-4, 80.0), gm_img, z_img[:32] * 80.0,
                      torch.logspace(math.log10(80), -4, 201, dtype=F64))[-1]
tail_move = (gm_img.denoise(x_1e4, 1e-4) - x_1e4).abs().max().item()  # the final denoising step's size
print(f"the path below sigma = 1e-4 moves a point by at most {tail_move:.1e}")
assert tail_move < 1e-6
glue("tail_move", sci(tail_move), display=False)

# %% [markdown]
# Now the analogue of the paper's Fig. 2 for EDM's own σ(t) = t: Euler and Heun, each with
# uniform steps (ρ = 1, uniform in t) and with EDM's steps (ρ = 7), at equal NFE — Euler gets
# twice the steps Heun gets.

# %%
NFES = MODE.pick(quick=[9, 17, 35, 65, 129], full=[9, 17, 35, 65, 129, 257, 513])


def steps_for(nfe, solver):
    return nfe if solver == "euler" else (nfe + 1) // 2


curves = {}
for rho, label in [(1, "uniform t"), (7, "EDM ρ=7")]:
    for solver in ["euler", "heun"]:
        curves[f"{solver}, {label}"] = [score(sample_ode(gm_img, z_img, edm_time_steps(gm_img, steps_for(n, solver), rho=rho),
                                                         solver=solver)) for n in NFES]
print(f"{'':18s}" + "".join(f"{n:>16d}" for n in NFES) + "   (NFE: typical error / component error rate)")
for name, row in curves.items():
    print(f"{name:18s}" + "".join(f"{e:>9.1e} /{c:5.3f}" for e, c in row))

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
for name, row in curves.items():
    style = dict(ls="-" if "EDM" in name else ":", marker="o" if "heun" in name else "s", ms=4)
    ax1.loglog(NFES, [e for e, _ in row], label=name, **style)
    ax2.semilogx(NFES, [100 * c for _, c in row], label=name, **style)
ax1.set(xlabel="NFE", ylabel="typical error (median RMS per pixel)", title="error vs NFE, σ(t) = t")
ax2.set(xlabel="NFE", ylabel="samples in the wrong component (%)", title="component errors vs NFE")
_ = ax1.legend(), ax2.legend()
plt.tight_layout()

# %% [markdown]
# What the figure shows, and the cell below asserts:
#
# * **Steps matter more than the solver.** With uniform steps both solvers are poor; Heun is even
#   *worse* than Euler there, because its huge last steps into small σ evaluate the second slope
#   far from the data, where $(\mathbf{x} - D)/\sigma$ is enormous.
# * **With EDM's steps, Heun wins and keeps winning.** At 35 NFE it has the smallest typical
#   error and sends (almost) no sample to the wrong component, while Euler with the same 35
#   evaluations misplaces a few percent; from then on Heun's typical error falls about 4× per
#   doubling of NFE, Euler's about 2×. At very low NFE (9) Euler still has the smaller typical
#   error: 5 Heun steps are too few for a second-order method to pay for its second evaluation.

# %%
at = {name: dict(zip(NFES, row)) for name, row in curves.items()}
heun7, euler7, euler1, heun1 = at["heun, EDM ρ=7"], at["euler, EDM ρ=7"], at["euler, uniform t"], at["heun, uniform t"]
print(f"at 35 NFE: Heun+EDM {heun7[35][0]:.2e} ({100 * heun7[35][1]:.1f}% component errors), "
      f"Euler+EDM {euler7[35][0]:.2e} ({100 * euler7[35][1]:.1f}%), Euler uniform {euler1[35][0]:.2e} "
      f"({100 * euler1[35][1]:.1f}%), Heun uniform {heun1[35][0]:.2e} ({100 * heun1[35][1]:.1f}%)")
assert heun7[35][0] < euler7[35][0] < euler1[35][0] < heun1[35][0]
assert heun7[35][1] < euler7[35][1] < euler1[35][1]
assert all(heun1[n][0] > euler1[n][0] for n in NFES)  # uniform steps: Heun is worse than Euler
assert all(heun7[n][0] < euler7[n][0] / 2 for n in NFES if n >= 65)
assert heun7[9][0] > euler7[9][0]
assert 3 < heun7[65][0] / heun7[129][0] < 5 and 1.6 < euler7[65][0] / euler7[129][0] < 2.4
glue("n_samples", str(B), display=False)
for key, row in [("heun7", heun7), ("euler7", euler7), ("euler1", euler1)]:
    glue(f"s_{key}_35", sci(row[35][0]), display=False)
    glue(f"s_{key}_35c", pct(row[35][1]), display=False)
    glue(f"s_{key}_129", sci(row[129][0]), display=False)

# %% [markdown]
# ## 2.6 Why ρ ≈ 7
#
# Where does a sampler's error come from? Take the exact solution at each time step $t_i$, make
# one Heun step to $t_{i+1}$ and compare with the exact solution there: the **local truncation
# error** of step i. Plotted against σ for ρ = 1, 3 and 7 (N = 18), it shows what ρ does: with
# uniform steps, the steps at large σ are wasted (errors down to {glue:text}`lte_rho1_min`) while
# the few steps at small σ are catastrophic (up to {glue:text}`lte_rho1_max`); raising ρ moves steps from where the trajectory is straight to where it bends.

# %%
def local_errors(rho, num_steps=18, latents=z_img[:64]):
    """Typical local error of each Heun step i < N - 1, started from the exact solution at t_i."""
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
spread = {rho: e.log10().std().item() for rho, (_, e) in lte.items()}
print("spread of log10(local error) over the steps:", ", ".join(f"ρ={r}: {s:.2f}" for r, s in spread.items()))
glue("lte_rho1_min", sci(lte[1][1].min().item()), display=False)
glue("lte_rho1_max", sci(lte[1][1].max().item()), display=False)
glue("rho_equal", str(min(spread, key=spread.get)), display=False)
assert lte[1][1].max() > 1e4 * lte[1][1].min()

# %% [markdown]
# The paper reports that ρ = 3 nearly *equalises* the truncation error over the steps, yet
# ρ between 5 and 10 samples images much better, and concludes that errors near σ_min weigh
# more. Our ground truth says the same. Equalisation (the smallest spread of the local errors,
# in decades) happens at ρ = {glue:text}`rho_equal`; the *global* error keeps falling well past that, because an
# error made at large σ is shrunk by the rest of the trajectory (it contracts towards the data
# by the factor $\sqrt{s^2 + \sigma^2}/\sqrt{s^2 + \sigma_i^2}$ for a Gaussian), while an error made
# near σ_min stays in the output. Below, the sweep of ρ at 18 Heun steps (35 NFE).

# %%
RHOS = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 30]
sweep = {rho: score(sample_ode(gm_img, z_img, edm_time_steps(gm_img, 18, rho=rho))) for rho in RHOS}
print("typical error at 35 NFE:", ", ".join(f"ρ={r}: {e:.1e}" for r, (e, _) in sweep.items()))
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
ax1.set(xlabel="σ at the start of the step", ylabel="local error (median RMS per pixel)",
        title="local truncation error of Heun steps, N = 18")
ax2.loglog(RHOS, [e for e, _ in sweep.values()], "o-")
ax2.axvline(7, color="C3", lw=0.8, ls="--")
ax2.set(xlabel="ρ", ylabel="typical global error", title="global error vs ρ at 35 NFE (Heun)")
_ = ax1.legend()
plt.tight_layout()

# %% [markdown]
# On this toy the curve keeps drifting down slowly after ρ = 7; the paper chose ρ = 7 from image
# quality in the range 5–10. Either way ρ = 7 sits at the knee: most of the gain, and steps at
# large σ that are still fine enough to pick the right component (§2.5).
#
# ## 2.7 The original samplers, re-expressed
#
# The paper's point of Table 1 is that the earlier models' samplers are all Algorithm 1 with
# other choices. The **ablation sampler** makes every choice an argument:
#
# * `discretization` — the time steps of a column of Table 1: `'vp'` (uniform in VP's t from 1
#   to $\epsilon_s$), `'ve'` (geometric in σ²), `'iddpm'` (entries of iDDPM's table u), `'edm'`
#   (Eq. 5, with ρ);
# * `schedule` — σ(t): `'vp'`, `'ve'` (σ = √t) or `'linear'` (σ = t);
# * `scaling` — s(t): `'vp'` or `'none'`; and `solver`, `'euler'` or `'heun'` (with `alpha`).
#
# The default σ range follows the discretization (VP: σ(ε_s) ≈ 0.0105 to σ(1) ≈ 152; VE: 0.02 to
# 100; iDDPM: 0.002 to 81; EDM: 0.002 to 80) and is clamped to the network's. The VP schedule
# is then *re-fitted* to the range, $\beta_d$ and $\beta_\text{min}$ chosen so that $\sigma(\epsilon_s)$ and
# $\sigma(1)$ are its ends (Chapter 1's `VP.from_sigma_range`; for EDM's range 0.002–80,
# $\beta_\text{min}$ comes out slightly negative, which Chapter 1 allows). iDDPM's discretization,
# as in the official ablation sampler, keeps the entries of u inside the range and takes N of
# them evenly spaced by index, rounded — not Table 1's $j_0$ formula. The time steps are
# $t_i = \sigma^{-1}(\mathrm{round\_sigma}(\sigma_i))$.

# %% tags=["export"]
ABLATION_SIGMA_RANGE = {"ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}  # 'vp': from VP()


def ablation_sigma_steps(num_steps, sigma_min, sigma_max, discretization="edm", rho=7.0, epsilon_s=1e-3,
                         C_1=0.001, C_2=0.008, M=1000, device=None):
    """sigma_0 > ... > sigma_{N-1} of a column of Table 1 ('time steps' row) on [sigma_min, sigma_max]. Chapter 2."""
    check_choice(discretization, "discretization", DISCRETIZATIONS)
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / max(num_steps - 1, 1)
    if discretization == "vp":
        vp = vp_fitted(sigma_min, sigma_max, epsilon_s)
        return vp._sigma(vp._time_steps(frac))
    if discretization == "ve":
        ve = VE(sigma_min, sigma_max)
        return ve._sigma(ve._time_steps(frac))
    if discretization == "iddpm":  # N entries of the table u inside the range, evenly spaced by index
        u = iddpm_u(M, C_1, C_2).to(device)
        u = u[(u >= sigma_min) & (u <= sigma_max)]
        if len(u) == 0:
            raise ValueError(f"no entry of the iDDPM table u lies in [{sigma_min:g}, {sigma_max:g}]")
        return u[((len(u) - 1) / max(num_steps - 1, 1) * i).round().to(torch.int64)]
    return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device)


def ablation_setup(net, num_steps=18, sigma_min=None, sigma_max=None, rho=7.0, discretization="edm",
                   schedule="linear", scaling="none", epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, device=None):
    """Time steps t_0 > ... > t_N = 0 and the SamplerSchedule of any mix of Table 1's choices (Sec. 3). Chapter 2.

    Returns (t_steps, schedule) for `sample_ode` (and Chapter 3's samplers); the arguments are the official
    ablation sampler's.
    """
    num_steps, rho = check_num_steps(num_steps), check_real(rho, "rho", 0)
    check_choice(discretization, "discretization", DISCRETIZATIONS)
    check_choice(schedule, "schedule", SCHEDULES)
    check_choice(scaling, "scaling", SCALINGS)
    epsilon_s = check_real(epsilon_s, "epsilon_s", 0)
    if not epsilon_s < 1:
        raise ValueError(f"epsilon_s must lie in (0, 1), got {epsilon_s}")
    default = (VP(epsilon_s=epsilon_s).sigma_min, VP().sigma_max) if discretization == "vp" \
        else ABLATION_SIGMA_RANGE[discretization]
    sigma_min, sigma_max = sigma_range(net, default[0] if sigma_min is None else sigma_min,
                                       default[1] if sigma_max is None else sigma_max)
    sched = SamplerSchedule.from_names(schedule, scaling, sigma_min, sigma_max, epsilon_s)
    sigma_steps = ablation_sigma_steps(num_steps, sigma_min, sigma_max, discretization, rho, epsilon_s, C_1, C_2, M,
                                       device=device)
    t_steps = sched.sigma_inv(torch.as_tensor(net.round_sigma(sigma_steps)))
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])]), sched


# %% [markdown]
# **Checks** — the VP and VE discretizations are Chapter 1's Table 1 time steps; EDM's with
# σ(t) = t are `edm_time_steps`; and whatever σ(t) and s(t), the sampler starts at
# $\sigma(t_0)\,s(t_0)\,\mathbf{n}$ and solves the *same* ODE: as the steps shrink, every pairing
# converges to the exact end point of §2.5 (its error falls more than 10× from 64 to 256 Heun steps).

# %%
for name, column in [("vp", VP()), ("ve", VE())]:
    t_ab, sch = ablation_setup(gm_img, 18, discretization=name, schedule=name, scaling="vp" if name == "vp" else "none")
    assert torch.allclose(sch.sigma(t_ab), column.sigma_steps(18), rtol=1e-12, atol=0), name
t_ab, sch = ablation_setup(gm_img, 18)
assert torch.equal(t_ab, edm_time_steps(gm_img, 18)) and sch.plain
exact16 = truth[80.0][:16]
for schedule, scaling in [("linear", "none"), ("vp", "vp"), ("ve", "none"), ("vp", "none"), ("linear", "vp")]:
    errs = []
    for N in [64, 256]:
        t_ab, sch = ablation_setup(gm_img, N, schedule=schedule, scaling=scaling)
        errs.append((sample_ode(gm_img, z_img[:16], t_ab, sch) - exact16).abs().max().item())
    print(f"sigma(t) {schedule:6s} s(t) {scaling:4s}: max error {errs[0]:.1e} (64 steps), {errs[1]:.1e} (256 steps)")
    assert errs[1] < errs[0] / 10 and errs[1] < 2e-3

# %% [markdown]
# Now the paper's Fig. 2 on ground truth. For each of the three earlier models we run its
# *original* deterministic sampler (Euler, its own time steps, σ(t) and s(t)), then Heun with
# the same steps, then Heun with EDM's steps (keeping the model's σ(t) and s(t)), and finally
# EDM's sampler. Each run is compared with the exact solution from its own σ_max.

# %%
FIG2 = {
    "VP": [("original: Euler", dict(solver="euler", discretization="vp", schedule="vp", scaling="vp")),
           ("Heun", dict(solver="heun", discretization="vp", schedule="vp", scaling="vp")),
           ("Heun + EDM steps", dict(solver="heun", discretization="edm", schedule="vp", scaling="vp"))],
    "VE": [("original: Euler", dict(solver="euler", discretization="ve", schedule="ve", scaling="none")),
           ("Heun", dict(solver="heun", discretization="ve", schedule="ve", scaling="none")),
           ("Heun + EDM steps", dict(solver="heun", discretization="edm", schedule="ve", scaling="none"))],
    "iDDPM": [("original: Euler (DDIM)", dict(solver="euler", discretization="iddpm")),
              ("Heun", dict(solver="heun", discretization="iddpm"))],
}
EDM_SAMPLER = ("EDM: Heun + EDM steps, σ(t) = t", dict(solver="heun", discretization="edm"))
fig2 = {}
for model, rows in FIG2.items():
    for label, cfg in rows + [EDM_SAMPLER]:
        cfg = dict(cfg)
        solver = cfg.pop("solver")
        results = []
        for n in NFES:
            t_ab, sch = ablation_setup(gm_img, steps_for(n, solver), **cfg)
            sigma_max = float(sch.sigma(t_ab[0]))
            results.append(score(sample_ode(gm_img, z_img, t_ab, sch, solver=solver), sigma_max))
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
# (asserted below). The intermediate curves tell a more mixed story than the paper's FID curves.
# Heun with the *original* time steps trades one kind of error for the other (for VP it lowers
# the component errors but raises the typical error; for VE and iDDPM the reverse; also
# asserted). And for the VP model, Heun with EDM's steps but VP's σ(t) and s(t) reaches a
# *smaller* typical error than with σ(t) = t ({glue:text}`vp_edm_err` against
# {glue:text}`edm35_err`), yet sends more samples to the wrong component
# ({glue:text}`vp_edm_comp` against {glue:text}`edm35_comp`, in this run): the nearly straight
# trajectories of σ(t) = t (Chapter 1, §1.4) are what keep samples in the right mode when steps
# are few.

# %%
print(f"{'at 35 NFE':42s} typical error  wrong component")
for (model, label), row in fig2.items():
    e, c = dict(zip(NFES, row))[35]
    print(f"{model:6s}{label:36s} {e:11.2e} {100 * c:12.1f}%")
for model in FIG2:
    edm_35 = dict(zip(NFES, fig2[(model, EDM_SAMPLER[0])]))[35]
    orig_35 = dict(zip(NFES, fig2[(model, FIG2[model][0][0])]))[35]
    assert edm_35[0] < orig_35[0] and edm_35[1] < orig_35[1] / 4, model
vp_edm_steps = dict(zip(NFES, fig2[("VP", "Heun + EDM steps")]))[35]
edm_35 = dict(zip(NFES, fig2[("VP", EDM_SAMPLER[0])]))[35]
assert vp_edm_steps[0] < edm_35[0] and vp_edm_steps[1] > 3 * edm_35[1] and vp_edm_steps[1] > 0
for model, sign in [("VP", +1), ("VE", -1), ("iDDPM", -1)]:  # the trade-off of Heun with the original steps
    euler_o, heun_o = (dict(zip(NFES, fig2[(model, label)]))[35] for label in [FIG2[model][0][0], "Heun"])
    # VP: typical error up, component errors down; VE and iDDPM: the reverse
    assert sign * (heun_o[0] - euler_o[0]) > 0 and sign * (heun_o[1] - euler_o[1]) < 0, model
glue("vp_edm_err", sci(vp_edm_steps[0]), display=False)
glue("edm35_err", sci(edm_35[0]), display=False)
glue("vp_edm_comp", pct(vp_edm_steps[1]), display=False)
glue("edm35_comp", pct(edm_35[1]), display=False)

# %% tags=["hide-input"]
# the numbers that the answers to the exercises below quote
ex1 = {n: score(sample_ode(gm_img, z_img, edm_time_steps(gm_img, (n + 1) // 2, sigma_min=0.02)))[0] for n in [35, 129, 513]}
s_comp = float(gm_img.stds.max())  # the components' std
print("exercise 1 (sigma_min = 0.02): typical error " + ", ".join(f"{e:.1e} at {n} NFE" for n, e in ex1.items()))
assert ex1[35] < heun7[35][0] and ex1[513] > 0.8 * ex1[129] > 2 * heun7[129][0]  # better at 35 NFE, then a floor
mid = [(sample_ode(gauss, zg, edm_time_steps(gauss, n + 1), alpha=0.5) - gauss_target(zg)).abs().max().item()
       for n in intervals]  # §2.4's convergence check with the midpoint rule
mid_ratios = [a / b for a, b in zip(mid[:-1], mid[1:])]
mid_ratio = statistics.median(mid_ratios[2:])
print(f"exercise 2 (alpha = 1/2): max error {', '.join(f'{e:.1e}' for e in mid)}; "
      f"ratios {', '.join(f'{r:.2f}' for r in mid_ratios)}")
assert 6 < mid_ratio < 10 and mid[-1] < global_err["heun"][-1]  # better than Heun's 4x per halving on this ODE
euler30 = {n: score(sample_ode(gm_img, z_img, edm_time_steps(gm_img, n, rho=30), solver="euler"))[0] for n in [35, 70]}
heun_69 = score(sample_ode(gm_img, z_img, edm_time_steps(gm_img, 35)))[0]
print(f"exercise 3: Euler rho = 30 {euler30[35]:.1e} (35 NFE), {euler30[70]:.1e} (70 NFE); Heun rho = 7 "
      f"{heun7[35][0]:.1e} (35 NFE), {heun_69:.1e} (69 NFE)")
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
# Exported to `edm_lit.samplers` (Chapter 3 adds the stochastic samplers to the same module):
#
# - `SamplerSchedule` — σ(t) of a Table 1 column with an independent scaling s(t), and the ODE
#   slope `derivative(net, x, t)` (one network call); `vp_fitted`, the VP schedule through a σ range;
# - `ode_step` — one Euler or Heun step (Algorithm 1; `alpha` for the 2nd-order Runge–Kutta family);
# - `edm_time_steps` — Eq. 5 on the network's range and grid, with $t_N = 0$; `sigma_range`;
# - `sample_ode` — Algorithm 1 along any time steps: NFE = 2N − 1 for Heun, N for Euler;
# - `ablation_sigma_steps`, `ablation_setup` — the VP, VE, iDDPM and EDM discretizations and any
#   pairing of σ(t) and s(t), with the official ablation sampler's arguments and defaults;
# - `check_sampler_inputs` and the argument checks `check_choice`, `check_real`, `check_num_steps`,
#   `check_t_steps`; the name tuples `SOLVERS`, `DISCRETIZATIONS`, `SCHEDULES`, `SCALINGS`.
#
# Measured on the image-shaped mixture (this run: {glue:text}`n_samples` samples; the tables
# above), at the paper's 35 NFE: Heun with EDM's steps has a typical error of
# {glue:text}`s_heun7_35` and {glue:text}`s_heun7_35c` of the samples in the wrong component;
# Euler with the same 35 evaluations has {glue:text}`s_euler7_35` and {glue:text}`s_euler7_35c`
# (EDM steps) or {glue:text}`s_euler1_35` and {glue:text}`s_euler1_35c` (uniform steps). At 129
# NFE the typical errors are {glue:text}`s_heun7_129` (Heun) against {glue:text}`s_euler7_129`
# (Euler).
#
# ## Exercises
#
# 1. Run §2.5 with σ_min = 0.02 instead of 0.002. What happens to Heun + EDM at 35 NFE, and
#    at 129 and 513 NFE?
# 2. Set `alpha=0.5` (the midpoint method) in the convergence check of §2.4. Is it still second
#    order?
# 3. For a fixed budget of 35 NFE, is it better to spend it on 18 Heun steps or 35 Euler steps
#    with ρ = 30?
#
# :::{dropdown} Answers
# 1. At 35 NFE the typical error *drops* (to {glue:text}`ex1_35`): no steps are spent below
#    0.02. But it stops falling, at about {glue:text}`ex1_floor` (513 NFE), however many steps you
#    add. The final Euler step from σ_min to 0 lands on
#    $D(\mathbf{x}(\sigma_\text{min}); \sigma_\text{min})$, not on $\mathbf{x}(0)$; for a component
#    of std s it stops short by a fraction ≈ σ_min²/(2s²) of the distance to the component's mean —
#    {glue:text}`ex1_short` here, {glue:text}`ex1_short_edm` with σ_min = 0.002. σ_min sets the
#    floor; the steps set how fast you reach it.
# 2. Any α > 0 gives a second-order method. On the single Gaussian the midpoint rule does even
#    better (error ratios near {glue:text}`ex2_ratio` per halving): a property
#    of that particular ODE, not of the method — try it on the mixture.
# 3. On this toy, 35 Euler steps with ρ = 30 reach a typical error of {glue:text}`ex3_euler`,
#    slightly below Heun's {glue:text}`ex3_heun`: raising ρ helps Euler too. But Euler stays first
#    order: double the budget and Heun's error falls {glue:text}`ex3_heun_gain`×, Euler's
#    {glue:text}`ex3_euler_gain`×.
# :::
