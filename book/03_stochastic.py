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
# # 3. Stochastic sampling
#
# Chapter 2's sampler is deterministic: the latents fix the image. The SDE samplers of Song
# et al. instead inject fresh noise at every step, and with the networks of the time they
# often produced *better* images than the ODE — at the price of many more steps. The paper
# (Sec. 4) explains why, and keeps the benefit at a small cost with **Algorithm 2**: before
# each Heun step, raise the noise level a little by adding fresh noise ("churn"), then step
# down from there. This chapter derives Algorithm 2, exports the official interface
# (`edm_sampler`, `ablation_sampler`), shows on exact ground truth the paper's finding — the
# noise helps only when the denoiser is imperfect, and too much of it hurts — and samples a
# trained network with the paper's settings.

# %%
import math
import statistics
import time

import matplotlib.pyplot as plt
import torch
from myst_nb import glue

from edm_lit.course import Recording, sci  # Chapter 2's helpers for the chapters
from edm_lit.framework import GaussianMixture, toy_image_mixture
from edm_lit.mode import get_mode
# Chapter 2's pieces, which this chapter's exported code builds on (in the package they
# share one module, edm_lit.samplers; the names with a leading _ are private there)
from edm_lit.samplers import (_SOLVERS, SamplerSchedule, _check_choice, _check_real,
                              _check_sampler_inputs, _check_t_steps, ablation_setup,
                              edm_time_steps, ode_step, sample_ode)

MODE = get_mode()
torch.manual_seed(0)
# the tensors here are tiny: one thread is fastest, and immune to a busy machine
torch.set_num_threads(1)
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
F64 = torch.float64


def seeded(seed, device="cpu"):
    """A randn_like drawing from its own generator: one seed, one noise stream."""
    g = torch.Generator(device).manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)


# %% [markdown]
# ## 3.1 Why noise can help
#
# > The implicit Langevin diffusion drives the sample towards the desired marginal
# > distribution at a given time, actively correcting for any errors made in earlier
# > sampling steps. On the other hand, approximating the Langevin term with discrete SDE
# > solver steps introduces error in itself. (Sec. 4)
#
# The paper generalises the probability-flow ODE to a family of SDEs (Eq. 6),
#
# $$\mathrm{d}\mathbf{x}_\pm = \underbrace{-\dot\sigma(t)\,\sigma(t)\,\nabla_{\mathbf{x}}\log p\big(\mathbf{x}; \sigma(t)\big)\,\mathrm{d}t}_{\text{probability-flow ODE}}
#  \;\underbrace{\pm\; \beta(t)\,\sigma(t)^2\,\nabla_{\mathbf{x}}\log p\big(\mathbf{x}; \sigma(t)\big)\,\mathrm{d}t + \sqrt{2\beta(t)}\,\sigma(t)\,\mathrm{d}\omega_t}_{\text{Langevin diffusion}} ,$$
#
# where the second part is Langevin dynamics: it removes noise along the score and adds
# fresh noise in equal measure, and leaves $p(\mathbf{x}; \sigma)$ unchanged. With an exact
# score every β(t) ≥ 0 gives the same marginals as the ODE, so noise cannot help. But
# Langevin dynamics also *pulls any other distribution towards* $p(\mathbf{x}; \sigma)$:
# errors made earlier — by the solver or by an imperfect network — are gradually forgotten,
# as long as the score is right where the correction happens. The price is the error of
# discretising the Langevin term itself. The balance is what the paper tunes, and what we
# will measure.

# %% [markdown]
# ## 3.2 Algorithm 2: churn
#
# > We propose a stochastic sampler that combines our 2nd order deterministic ODE
# > integrator with explicit Langevin-like "churn" of adding and removing noise. (Sec. 4)
#
# Algorithm 2 splits each step in two. First it moves *up* in noise, from $t_i$ to
# $\hat t_i = t_i + \gamma_i t_i$, by adding exactly the missing noise:
#
# $$\hat{\mathbf{x}}_i = \mathbf{x}_i + \sqrt{\hat t_i^2 - t_i^2}\;\boldsymbol\epsilon_i, \qquad \boldsymbol\epsilon_i \sim \mathcal{N}(\mathbf{0}, S_\text{noise}^2 \mathbf{I}) ,$$
#
# then it takes Chapter 2's Heun step from $(\hat{\mathbf{x}}_i, \hat t_i)$ down to
# $t_{i+1}$. If $\mathbf{x}_i \sim p(\mathbf{x}; t_i)$, then
# $\hat{\mathbf{x}}_i \sim p(\mathbf{x}; \hat t_i)$ *exactly* — adding independent Gaussian
# noise is how $p(\mathbf{x}; \sigma)$ is defined — so the noise step makes no error; only
# the longer ODE step that follows does. The amount is set per step:
#
# $$\gamma_i = \begin{cases} \min\!\left(\frac{S_\text{churn}}{N}, \sqrt2 - 1\right) & \text{if } t_i \in [S_\text{tmin}, S_\text{tmax}] \\ 0 & \text{otherwise,} \end{cases}$$
#
# so $S_\text{churn}$ is the total amount, spread over the N steps; the cap √2 − 1 means a
# step never adds more noise than is already there ($\hat t_i^2 - t_i^2 \le t_i^2$); the
# window $[S_\text{tmin}, S_\text{tmax}]$ restricts it to the noise levels where it helps;
# and $S_\text{noise}$ slightly above 1 compensates a network that removes a little too much
# noise. (The official code names the window `S_min`, `S_max`; we keep those names.)
#
# With a general σ(t) and s(t), as in the ablation sampler, the same step reads
# $\hat t = \sigma^{-1}\big((1 + \gamma)\,\sigma(t)\big)$ and
# $\hat{\mathbf{x}} = \frac{s(\hat t)}{s(t)}\mathbf{x} + \sqrt{\sigma(\hat t)^2 - \sigma(t)^2}\; s(\hat t)\, S_\text{noise}\, \boldsymbol\epsilon$,
# with the raised σ passed through `net.round_sigma` first. The noise is drawn at **every**
# step, also where γ = 0 (it is then multiplied by 0), as in the official code: a random
# stream maps to the same images whatever S_churn, S_min and S_max are.

# %% tags=["export"]
def _churn_args(S_churn, S_min, S_max, S_noise):
    return (_check_real(S_churn, "S_churn", 0, strict=False),
            _check_real(S_min, "S_min"), _check_real(S_max, "S_max"),
            _check_real(S_noise, "S_noise", 0, strict=False))


def churn(net, schedule, x_cur, t_cur, gamma, S_min=0.0, S_max=math.inf, S_noise=1.0,
          randn_like=torch.randn_like):
    """Algorithm 2, lines 4-6: raise the noise level from sigma(t_cur) to
    (1 + gamma) sigma(t_cur) with fresh noise. Chapter 3.

    gamma applies only where S_min <= sigma(t_cur) <= S_max. The noise is drawn at every
    step, also where gamma = 0, so that one noise stream gives the same images as the
    official sampler. Returns (x_hat, t_hat).
    """
    sigma_cur = schedule.sigma(t_cur)
    if not S_min <= sigma_cur <= S_max:
        gamma = 0
    sigma_up = torch.as_tensor(net.round_sigma(sigma_cur + gamma * sigma_cur))
    t_hat = schedule.sigma_inv(sigma_up)
    sigma_hat, s_hat = schedule.sigma(t_hat), schedule.s(t_hat)
    if schedule.scaling != "none":
        x_cur = s_hat / schedule.s(t_cur) * x_cur
    scale = (sigma_hat**2 - sigma_cur**2).clip(min=0).sqrt() * s_hat * S_noise
    noise = randn_like(x_cur)  # drawn even when scale == 0
    # x + 0 * noise is x: skip two passes over x
    return (x_cur if scale == 0 else x_cur + scale * noise), t_hat


# %% [markdown]
# **Checks** — with the exact single-Gaussian data of Chapter 2 (std 0.5): inside the
# window the noise level rises by the factor 1 + γ, outside it does not; the noise is drawn
# either way; with γ = 0 the state is unchanged bit for bit; and the added noise has exactly
# the variance $S_\text{noise}^2(\hat t^2 - t^2)$, so that a sample of $p(x; t)$ becomes a
# sample of $p(x; \hat t)$.

# %% tags=["hide-input"]
MU, S = 0.3, 0.5
gauss = GaussianMixture(torch.tensor([[MU]]), stds=S)
plain = SamplerSchedule()
draws = []


def counting_randn_like(x):
    draws.append(x.shape)
    return torch.randn_like(x)


x = torch.randn(4, 1, dtype=F64)
t = torch.tensor(2.0, dtype=F64)
gamma = math.sqrt(2) - 1
x_hat, t_hat = churn(gauss, plain, x, t, gamma, S_min=1.0, S_max=5.0,
                     randn_like=counting_randn_like)
assert torch.isclose(t_hat, t * (1 + gamma)) and len(draws) == 1
x_same, t_same = churn(gauss, plain, x, t, gamma, S_min=3.0, S_max=5.0,
                       randn_like=counting_randn_like)
# outside the window: drawn, multiplied by 0
assert t_same == t and torch.equal(x_same, x) and len(draws) == 2

n = MODE.pick(quick=400_000, full=4_000_000)
x_t = gauss.sample(n) + t * torch.randn(n, 1, dtype=F64)  # x ~ p(x; t)
x_hat, t_hat = churn(gauss, plain, x_t, t, gamma)
expected = math.sqrt(S**2 + t_hat**2)
print(f"after churn: std {x_hat.std():.4f}, "
      f"expected sqrt(s^2 + t_hat^2) = {expected:.4f}")
assert abs(x_hat.std() / expected - 1) < 0.005 and abs(x_hat.mean() - MU) < 0.02

# %% [markdown]
# ## 3.3 The samplers
#
# > Its correctness stems from the alternation of two sub-steps that each maintain the
# > correct distribution (up to truncation error in the ODE step). (Sec. 4)
#
# Algorithm 2 is the loop of Chapter 2 with one line added: churn, then step. `sample_sde`
# runs it along any time steps and any `SamplerSchedule`; `edm_sampler` and
# `ablation_sampler` put the official interface in front — same argument names, defaults
# and order, the same random draws in the same order — so that identical inputs give
# identical outputs (`tests/test_samplers.py` replays the network calls recorded from the
# official implementation and matches its output bit for bit). `edm_sampler` is
# `ablation_sampler` with its defaults: Heun, EDM's steps, σ(t) = t, s(t) = 1.

# %% tags=["export"]
def sample_sde(net, latents, t_steps, schedule=None, class_labels=None,
               randn_like=torch.randn_like, solver="heun", alpha=1.0, S_churn=0.0,
               S_min=0.0, S_max=math.inf, S_noise=1.0):
    """Algorithm 2 along t_steps: churn (lines 4-6), then Algorithm 1's step from
    (x_hat, t_hat) (lines 7-10). Chapter 3.

    With S_churn = 0 the result equals sample_ode's bit for bit (one noise draw per step
    is still made).
    """
    _check_sampler_inputs(net, latents, class_labels)
    second_order = _check_choice(solver, "solver", _SOLVERS) == "heun"
    alpha = _check_real(alpha, "alpha", 0)
    S_churn, S_min, S_max, S_noise = _churn_args(S_churn, S_min, S_max, S_noise)
    schedule = SamplerSchedule() if schedule is None else schedule
    t_steps = _check_t_steps(t_steps, latents.device)
    num_steps = len(t_steps) - 1
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
    t_0 = t_steps[0]
    x_next = latents.to(torch.float64) * (schedule.sigma(t_0) * schedule.s(t_0))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = churn(net, schedule, x_next, t_cur, gamma, S_min, S_max, S_noise,
                             randn_like)
        heun = second_order and i < num_steps - 1
        x_next = ode_step(net, schedule, x_hat, t_hat, t_next, class_labels, heun,
                          alpha)
    return x_next


def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
                num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0,
                S_max=float("inf"), S_noise=1):
    """EDM's sampler, Algorithm 2 (Algorithm 1 when S_churn = 0), with the official
    `edm_sampler`'s interface. Chapter 3.

    Runs in float64 and returns float64; 18 steps make 35 network calls.
    """
    _check_sampler_inputs(net, latents, class_labels)
    t_steps = edm_time_steps(net, num_steps, sigma_min, sigma_max, rho,
                             device=latents.device)
    return sample_sde(net, latents, t_steps, None, class_labels, randn_like, "heun",
                      1.0, S_churn, S_min, S_max, S_noise)


def ablation_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
                     num_steps=18, sigma_min=None, sigma_max=None, rho=7, solver="heun",
                     discretization="edm", schedule="linear", scaling="none",
                     epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, alpha=1, S_churn=0,
                     S_min=0, S_max=float("inf"), S_noise=1):
    """Every sampler of the paper in one (Sec. 3-4, Fig. 2), with the official
    `ablation_sampler`'s interface. Chapter 3.

    solver 'euler'/'heun'; discretization 'vp'/'ve'/'iddpm'/'edm'; schedule
    'vp'/'ve'/'linear'; scaling 'vp'/'none'.
    """
    _check_sampler_inputs(net, latents, class_labels)
    _check_choice(solver, "solver", _SOLVERS)
    _churn_args(S_churn, S_min, S_max, S_noise)
    _check_real(alpha, "alpha", 0)
    t_steps, sched = ablation_setup(net, num_steps, sigma_min, sigma_max, rho,
                                    discretization, schedule, scaling, epsilon_s, C_1,
                                    C_2, M, device=latents.device)
    return sample_sde(net, latents, t_steps, sched, class_labels, randn_like, solver,
                      alpha, S_churn, S_min, S_max, S_noise)


# %% [markdown]
# **Checks** — on the image-shaped mixture of Chapter 1: with the defaults `edm_sampler`
# makes 35 network calls and 18 noise draws and returns exactly what Chapter 2's
# deterministic `sample_ode` returns; `ablation_sampler` with its defaults is
# `edm_sampler`; a fixed random stream gives a fixed result; and with churn on, every step
# inside the window calls the network at a raised noise level.

# %% tags=["hide-input"]
gm_img = toy_image_mixture()
latents = torch.randn(16, *gm_img.shape)  # float32, as a generator would draw them
draws.clear()
rec = Recording(gm_img)
out = edm_sampler(rec, latents, randn_like=counting_randn_like)
print(f"edm_sampler: {len(rec.sigmas)} network calls, {len(draws)} noise draws, "
      f"output {out.dtype}")
assert len(rec.sigmas) == 35 and len(draws) == 18 and out.dtype == F64
assert torch.equal(out, sample_ode(gm_img, latents, edm_time_steps(gm_img, 18)))
assert torch.equal(ablation_sampler(gm_img, latents), out)

# the paper's stochastic setting for ImageNet-64 (Appendix E.2; §3.7)
settings = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
a = edm_sampler(gm_img, latents, randn_like=seeded(7), **settings)
b = edm_sampler(gm_img, latents, randn_like=seeded(7), **settings)
assert torch.equal(a, b) and not torch.equal(a, out)
rec = Recording(gm_img)
edm_sampler(rec, latents, randn_like=seeded(7), **settings)
t18 = edm_time_steps(gm_img, 18)
first_calls = torch.tensor(rec.sigmas[::2])  # the first call of each step is at t_hat
inside = (t18[:-1] >= 0.05) & (t18[:-1] <= 50)
ratio = first_calls / t18[:-1]
print("t_hat / t_i per step:", ", ".join(f"{r:.3f}" for r in ratio.tolist()))
assert torch.allclose(ratio[inside], torch.tensor(math.sqrt(2), dtype=F64))
assert torch.allclose(ratio[~inside], torch.ones(1, dtype=F64))

# %% [markdown]
# Bad arguments are refused at the door, with the argument's name in the message:

# %% tags=["hide-input"]
bad = [(edm_sampler, dict(num_steps=0)), (edm_sampler, dict(sigma_min=0)),
       (edm_sampler, dict(sigma_min=90)), (edm_sampler, dict(rho=-1)),
       (edm_sampler, dict(S_churn=-1)), (edm_sampler, dict(S_noise=-0.5)),
       (edm_sampler, dict(class_labels=torch.zeros(3, 10))),
       (ablation_sampler, dict(solver="rk4")),
       (ablation_sampler, dict(discretization="cosine")),
       (ablation_sampler, dict(schedule="exp")), (ablation_sampler, dict(scaling="ve")),
       (ablation_sampler, dict(alpha=0))]
for sampler, kwargs in bad:
    try:
        sampler(gm_img, latents, **kwargs)
    except ValueError as e:
        print(f"{str(kwargs)[:32]:34s} -> ValueError: {e}")
    else:
        raise AssertionError(f"{sampler.__name__}: {kwargs} was accepted")

# %% [markdown]
# ## 3.4 Measuring a distribution exactly
#
# > Hence, the optimal amount of stochasticity should be determined empirically. (Sec. 4)
#
# To see whether noise *helps*, we must compare output distributions, not single samples.
# For Gaussian data there is an exact way. Take
# $p_\text{data} = \mathcal{N}(\boldsymbol\mu, s^2\mathbf{I})$ — image-shaped:
# $\boldsymbol\mu$ is one of the mixture's smooth 3 × 8 × 8 images, s = 0.5. Its denoiser is
# affine in $\mathbf{x}$, and every operation of Algorithms 1 and 2 is affine in the state,
# so the sampler's output is an *affine function of its random inputs*: the latents
# $\mathbf{n}$ and the step noises $\boldsymbol\epsilon_0, \dots, \boldsymbol\epsilon_{N-1}$,
#
# $$\mathbf{x}_N = \mathbf{c} + a\,\mathbf{n} + \textstyle\sum_i b_i\,\boldsymbol\epsilon_i ,$$
#
# with one scalar $a$, $b_i$ for all pixels (the data are isotropic). The output is
# therefore exactly Gaussian, $\mathcal{N}(\mathbf{c}, (a^2 + \sum_i b_i^2)\,\mathbf{I})$, and
# we read off $\mathbf{c}$, $a$ and the $b_i$ by running the sampler on *probes*: latents 0
# and no noise give $\mathbf{c}$; latents 1 give $\mathbf{c} + a$; a 1 in step i's noise
# gives $\mathbf{c} + b_i$. One batch of N + 2 probes does it. Between two isotropic
# Gaussians the 2-Wasserstein distance is closed form,
#
# $$W_2^2 = \|\mathbf{c} - \boldsymbol\mu\|^2 + d\,\big(\textstyle\sqrt{a^2 + \sum_i b_i^2} - s\big)^2 ,$$
#
# (the Fréchet distance that FID computes on Inception features, here exact), which we
# report per pixel, $W_2/\sqrt d$.

# %%
S_DATA = 0.5
mu_img = toy_image_mixture(num_components=1, seed=3).means
gauss_img = GaussianMixture(mu_img, stds=S_DATA)
D = gauss_img.dim


def output_gaussian(net, num_steps=18, **sampler_kwargs):
    """Exact mean image and per-pixel std of edm_sampler's output for an affine
    denoiser, from N + 2 probes."""
    probes = torch.zeros(num_steps + 2, *gauss_img.shape, dtype=F64)
    probes[1] = 1  # latents 1
    step = iter(range(num_steps))

    def one_hot_noise(x):  # step i's noise is 1 in probe i + 2 and 0 elsewhere
        eps = torch.zeros_like(x)
        eps[2 + next(step)] = 1
        return eps

    out = edm_sampler(net, probes, randn_like=one_hot_noise, num_steps=num_steps,
                      **sampler_kwargs)
    mean, coef = out[0], (out[1:] - out[0]).flatten(1)
    # one a and b_i for all pixels
    assert torch.allclose(coef, coef[:, :1].expand_as(coef), atol=1e-9)
    return mean, coef[:, 0].pow(2).sum().sqrt().item()


def w2_per_pixel(net, **sampler_kwargs):
    mean, std = output_gaussian(net, **sampler_kwargs)
    mean_sq = (mean - mu_img[0]).pow(2).sum().item()
    return math.sqrt((mean_sq + D * (std - S_DATA) ** 2) / D)


# %% [markdown]
# **Check** — the probes against brute force: run the stochastic sampler on many real random
# latents and noises and compare the sample mean and standard deviation, to within the Monte
# Carlo error: a standard error of $1/\sqrt{2nd}$ = {glue:text}`mc_se` on the pixel-averaged
# std (n samples, d pixels), and a mean absolute difference of the means near
# $\sqrt{2/\pi}\,\mathrm{std}/\sqrt{n}$.

# %% tags=["hide-input"]
n_mc = MODE.pick(quick=2000, full=20000)
mean, std = output_gaussian(gauss_img, **settings)
mc = edm_sampler(gauss_img, torch.randn(n_mc, *gauss_img.shape, dtype=F64), **settings)
print(f"per-pixel std: probes {std:.4f}, Monte Carlo {mc.std(0).mean():.4f} "
      f"({n_mc} samples)")
mc_se = 1 / math.sqrt(2 * n_mc * D)  # relative standard error of the pixel-averaged std
std_dev = abs(mc.std(0).mean() / std - 1) / mc_se
expected_dev = math.sqrt(2 / math.pi) * std / math.sqrt(n_mc)
mean_dev = (mc.mean(0) - mean).abs().mean() / expected_dev
print(f"std off by {std_dev:.1f} standard errors; mean absolute difference of the "
      f"means {mean_dev:.2f}x its expectation")
assert std_dev < 4 and mean_dev < 1.5
glue("mc_se", f"{100 * mc_se:.2f} %", display=False)

# %% [markdown]
# ## 3.5 When churn helps
#
# > Increasing the amount of stochasticity is effective in correcting errors made by earlier
# > sampling steps, but it has its own drawbacks. (Sec. 4, "Practical considerations")
#
# Now the experiment of the paper's Fig. 4, on ground truth: the distance of the sampler's
# output from the data, as $S_\text{churn}$ grows from 0 to the point where every step is at
# the cap γ = √2 − 1 (at 18 steps, $S_\text{churn} \approx 7.5$; the window is wide open, so
# every step churns). Two denoisers: the **exact** one, and a deliberately **imperfect** one
# with the flaw the paper suspects in trained networks, "a tendency to remove slightly too
# much noise" (Sec. 4):
# $\tilde D(\mathbf{x}; \sigma) = \mathbf{x} - (1 + \delta(\sigma))\,(\mathbf{x} - D(\mathbf{x}; \sigma))$
# with $\delta(\sigma) = 0.1\, e^{-\frac12 \ln^2(\sigma/\sigma_c)}$, σ_c = 1: up to 10 % too
# much around σ ≈ 1, exact at the extremes. It is still affine, so the probes stay exact.

# %%
class OverDenoising:
    """A deliberately imperfect denoiser: removes (1 + delta(sigma)) times the noise the
    exact one removes."""

    def __init__(self, exact, amount=0.1, sigma_c=1.0):
        self.exact, self.amount, self.sigma_c = exact, amount, sigma_c
        self.sigma_min, self.sigma_max = exact.sigma_min, exact.sigma_max
        self.round_sigma = exact.round_sigma

    def delta(self, sigma):
        log_ratio = torch.log(torch.as_tensor(sigma) / self.sigma_c)
        return self.amount * torch.exp(-0.5 * log_ratio**2)

    def __call__(self, x, sigma, class_labels=None):
        return x - (1 + self.delta(sigma)) * (x - self.exact(x, sigma))


imperfect = OverDenoising(gauss_img)
cap = (math.sqrt(2) - 1) * 18
FRACTIONS = [0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1]
CHURNS = [round(f * cap, 2) for f in FRACTIONS]
w2 = {name: [w2_per_pixel(net, S_churn=c) for c in CHURNS]
      for name, net in [("exact", gauss_img), ("imperfect", imperfect)]}
for name, row in w2.items():
    print(f"{name:9s} W2 per pixel: "
          + ", ".join(f"{c:g}: {v:.1e}" for c, v in zip(CHURNS, row)))

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for name, row in w2.items():
    ax.semilogy(CHURNS, row, "o-", ms=4, label=f"{name} denoiser")
ax.set(xlabel="S_churn (18 steps; γ reaches its cap √2 − 1 at the right end)",
       ylabel="W₂ to the data, per pixel",
       title="stochastic sampling on exact ground truth (Fig. 4 analogue)")
_ = ax.legend()

# %% [markdown]
# The imperfect denoiser's distance falls from {glue:text}`w2_imp_0` without churn to
# {glue:text}`w2_imp_best` at $S_\text{churn}$ = {glue:text}`churn_best`, a factor of
# {glue:text}`w2_imp_gain`. Before crediting Langevin dynamics with that, split $W_2$ into its
# two terms. For Gaussians in general $W_2^2 = \|\boldsymbol\mu_1 - \boldsymbol\mu_2\|^2 +
# \operatorname{tr}\big(\Sigma_1 + \Sigma_2 - 2(\Sigma_2^{1/2}\Sigma_1\Sigma_2^{1/2})^{1/2}\big)$;
# with our isotropic covariances the second term is $d\,(\text{std} - s)^2$. Per pixel, the
# **mean term** is $\|\mathbf{c} - \boldsymbol\mu\|/\sqrt d$ and the **std term** the signed
# error of the output's standard deviation, $\text{std} - s$ (positive: too much variance).

# %%
def w2_terms(net, **sampler_kwargs):
    """(mean term, signed std error) per pixel of the sampler's output:
    W2^2 / d = mean^2 + std_err^2."""
    mean, std = output_gaussian(net, **sampler_kwargs)
    return (mean - mu_img[0]).pow(2).mean().sqrt().item(), std - S_DATA


# exercise 1: a denoiser that removes 10 % too little
under = OverDenoising(gauss_img, amount=-0.1)
nets = [("exact", gauss_img), ("imperfect", imperfect), ("under", under)]
terms = {name: torch.tensor([w2_terms(net, S_churn=c) for c in CHURNS], dtype=F64)
         for name, net in nets}
print(f"{'S_churn':>8s}" + "".join(f"{n:>24s}" for n in terms)
      + "   (mean term / std - s, per pixel)")
for i, c in enumerate(CHURNS):
    print(f"{c:8.2f}"
          + "".join(f"{t[i, 0]:11.1e} / {t[i, 1]:+9.2e}" for t in terms.values()))

# %%
fig, ax = plt.subplots(figsize=(8, 4.5))
for name, t in terms.items():
    ax.plot(CHURNS, t[:, 1], "o-", ms=4, label=f"{name}: std − s")
    color = ax.lines[-1].get_color()
    ax.plot(CHURNS, t[:, 0], ":", lw=1, color=color, label=f"{name}: mean term")
    if name != "exact":  # minus the sampler's own error: the denoiser's part
        ax.plot(CHURNS, t[:, 1] - terms["exact"][:, 1], "--", lw=1, color=color,
                label=f"{name} − exact: the denoiser's part")
ax.axhline(0, color="k", lw=0.6)
ax.set(xlabel="S_churn (18 steps)", ylabel="per pixel",
       title="the terms of W₂: std error (solid), mean (dotted)")
_ = ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
plt.tight_layout()

# %% [markdown]
# What the data show, asserted below:
#
# * **The mean term is negligible.** It stays below {glue:text}`mean_term_max` per pixel for
#   all three denoisers, and churn even shrinks it — steadily, to
#   {glue:text}`mean_term_cap_ratio` of its $S_\text{churn} = 0$ value or less at the cap:
#   Langevin forgets the mismatch of the starting noise, see below. $W_2$ here is the std
#   error.
# * **Exact denoiser: churn adds variance.** At 18 steps the ODE already leaves slightly too
#   much variance ({glue:text}`exact_err_0` per pixel), and every bit of churn adds more, up
#   to {glue:text}`exact_err_cap` at the cap: the longer ODE step from the raised $\hat t$
#   does not quite remove the noise that was added. So $S_\text{churn} = 0$ is best.
# * **Imperfect denoiser: one variance error cancels another.** Over-denoising leaves too
#   *little* variance ({glue:text}`imp_err_0` without churn). Churn pushes the std up; at the
#   optimum the std error crosses zero ({glue:text}`imp_err_best`), and past it the sampler's
#   own excess takes over. The near-zero $W_2$ at the optimum is a cancellation of two errors
#   of opposite sign, not the absence of error.
# * **What Langevin correction itself does.** Subtract the exact denoiser's std error at the
#   same $S_\text{churn}$ (the sampler's part) from the imperfect one's: what remains is the
#   denoiser's part (dashed in the figure). Churn shrinks it from {glue:text}`imp_own_0` to
#   {glue:text}`imp_own_best`, by {glue:text}`langevin_imp` %. That is the genuine
#   correction — real, but on its own it would shrink the error by that fraction, not
#   {glue:text}`w2_imp_gain`-fold. The under-denoising network of exercise 1 shows it alone:
#   there the two errors have the *same* sign, nothing cancels, and churn removes
#   {glue:text}`langevin_under` % of the denoiser's part, so $W_2$ improves only by
#   {glue:text}`under_gain` % at its best $S_\text{churn}$.

# %% tags=["hide-input"]
exact_row, imperfect_row = w2["exact"], w2["imperfect"]
best = min(range(len(CHURNS)), key=imperfect_row.__getitem__)
print(f"imperfect denoiser: W2 {imperfect_row[0]:.1e} without churn, "
      f"{imperfect_row[best]:.1e} at S_churn = {CHURNS[best]}, "
      f"{imperfect_row[-1]:.1e} at the cap")
# exact: S_churn = 0 is best
assert all(b >= a for a, b in zip(exact_row, exact_row[1:]))
assert 0 < best < len(CHURNS) - 1  # imperfect: an interior optimum ...
assert imperfect_row[best] < imperfect_row[0] / 20  # ... far below the start ...
assert imperfect_row[-1] > 10 * imperfect_row[best]  # ... and too much churn hurts
# the decomposition
mean_max = max(t[:, 0].max().item() for t in terms.values())
std_err = {name: t[:, 1] for name, t in terms.items()}
assert all(mean_max < 0.1 * e.abs()[0] for e in std_err.values())  # W2 is the std term
# mean term at the cap / at S_churn = 0
mean_cap_ratio = max((t[-1, 0] / t[0, 0]).item() for t in terms.values())
# churn shrinks the mean term, step by step, by a factor of about 50 at the cap
assert all((t[:, 0].diff() < 0).all() for t in terms.values())
assert mean_cap_ratio < 0.05  # (measured ratios about 0.02)
# the sampler's own error: excess variance
assert (std_err["exact"] > 0).all() and (std_err["exact"].diff() > 0).all()
e_imp = std_err["imperfect"]
assert e_imp[0] < 0 and e_imp[best - 1] < 0 < e_imp[best + 1]  # a sign change
assert abs(e_imp[best]) < 0.05 * abs(e_imp[0])
# the denoiser's part
own_imp, own_under = e_imp - std_err["exact"], std_err["under"] - std_err["exact"]
langevin_imp = 1 - own_imp[best] / own_imp[0]
w2_under = terms["under"].pow(2).sum(1).sqrt()
best_under = int(w2_under.argmin())
langevin_under = 1 - own_under[best_under] / own_under[0]
under_gain = 1 - w2_under[best_under] / w2_under[0]
print(f"the denoiser's own std error, reduced by churn: {100 * langevin_imp:.0f} % "
      f"(over-denoising, at S_churn = {CHURNS[best]}), {100 * langevin_under:.0f} % "
      f"(under-denoising, at S_churn = {CHURNS[best_under]}); "
      f"W2 gain under-denoising {100 * under_gain:.0f} %")
# a genuine, partial correction in both cases
assert 0.25 < langevin_imp < 0.5 and 0.25 < langevin_under < 0.5
# exercise 1: no cancellation, an optimum that improves W2 only a little
assert (std_err["under"] > 0).all() and 0 < best_under < len(CHURNS) - 1
assert 0.05 < under_gain < 0.15
for key, value in {"w2_imp_0": sci(imperfect_row[0]),
                   "w2_imp_best": sci(imperfect_row[best]),
                   "churn_best": f"{CHURNS[best]:g}",
                   "w2_imp_gain": f"{imperfect_row[0] / imperfect_row[best]:.0f}",
                   "mean_term_max": sci(mean_max),
                   "mean_term_cap_ratio": f"{mean_cap_ratio:.2f}",
                   "exact_err_0": f"{std_err['exact'][0]:+.1e}",
                   "exact_err_cap": f"{std_err['exact'][-1]:+.1e}",
                   "imp_err_0": f"{e_imp[0]:+.1e}",
                   "imp_err_best": f"{e_imp[best]:+.1e}",
                   "imp_own_0": f"{own_imp[0]:+.1e}",
                   "imp_own_best": f"{own_imp[best]:+.1e}",
                   "langevin_imp": f"{100 * langevin_imp:.0f}",
                   "langevin_under": f"{100 * langevin_under:.0f}",
                   "under_gain": f"{100 * under_gain:.0f}",
                   "under_best": f"{CHURNS[best_under]:g}"}.items():
    glue(key, value, display=False)

# %% [markdown]
# Churn is not *wrong*, only costly at a small budget. With the exact denoiser and a fixed
# S_churn, its distance falls about {glue:text}`conv_ratio`× per doubling of the steps, like
# the ODE's. With many steps it even ends *below* the deterministic sampler, which levels
# off at {glue:text}`conv_floor`: that floor is not a solver error but the start — mean-zero
# noise at σ_max = 80, where the true $p(\mathbf{x}; 80)$ has the data's mean — and the ODE
# carries the mismatch into the output, shrunk by {glue:text}`floor_shrink` (about
# s/σ_max = {glue:text}`s_over_smax`; it is the mean term that remains), while Langevin
# forgets it like any other error.

# %% tags=["hide-input"]
NS = [16, 32, 64, 128, 256]
conv = {c: [w2_per_pixel(gauss_img, num_steps=n, S_churn=c) for n in NS]
        for c in [0, 4]}
for c, row in conv.items():
    print(f"exact denoiser, S_churn = {c}: W2 per pixel "
          + ", ".join(f"N={n}: {v:.1e}" for n, v in zip(NS, row)))
ratios = [a / b for a, b in zip(conv[4][:4], conv[4][1:])]
assert all(3.5 < r < 5 for r in ratios[:3])
assert conv[4][-1] < conv[0][-1] / 6 and abs(conv[0][-1] / conv[0][-2] - 1) < 0.05
mean_term, std_term = w2_terms(gauss_img, num_steps=NS[-1])
# the output's mean error / the start's mean mismatch
shrink = mean_term / mu_img[0].pow(2).mean().sqrt().item()
print(f"deterministic, N = {NS[-1]}: mean term {mean_term:.1e}, "
      f"std term {std_term:+.1e}; mean error / data mean = {shrink:.2e}, "
      f"s / sigma_max = {S_DATA / 80:.2e}")
assert mean_term > 5 * abs(std_term) and abs(shrink / (S_DATA / 80) - 1) < 0.05
glue("conv_ratio", f"{statistics.median(ratios[:3]):.0f}", display=False)
glue("conv_floor", sci(conv[0][-1]), display=False)
glue("floor_shrink", f"{shrink:.1e}", display=False)
glue("s_over_smax", f"{S_DATA / 80:.1e}", display=False)

# %% [markdown]
# ## 3.6 Explore: S_churn, the window and S_noise
#
# > [...] we have found that the loss of detail can be partially counteracted by setting
# > S_noise slightly above 1 to inflate the standard deviation for the newly added noise.
# > (Sec. 4)
#
# The explorer redraws the curve of §3.5 for your settings: how much the imperfect
# denoiser errs (`amount`), the window $[S_\text{tmin}, S_\text{tmax}]$ and $S_\text{noise}$.
# It needs a live kernel; the static grid after it shows three values of S_noise.

# %%
def plot_churn(ax, amount=0.1, S_min=0.0, S_max=1e3, S_noise=1.0, num_steps=18):
    """W2 of the output vs S_churn for the exact and an imperfect denoiser."""
    cap_n = (math.sqrt(2) - 1) * num_steps
    churns = [f * cap_n for f in torch.linspace(0, 1, 9).tolist()]
    nets = [("exact", gauss_img),
            (f"imperfect ({amount:g})", OverDenoising(gauss_img, amount))]
    window = dict(S_min=S_min, S_max=S_max, S_noise=S_noise)
    for name, net in nets:
        row = [w2_per_pixel(net, num_steps=num_steps, S_churn=c, **window)
               for c in churns]
        ax.semilogy(churns, row, "o-", ms=3, label=name)
    ax.set(xlabel="S_churn", ylabel="W₂ per pixel",
           title=f"S_noise = {S_noise:g}, window [{S_min:g}, {S_max:g}]")
    _ = ax.legend(fontsize=8)


# %%
# NBVAL_IGNORE_OUTPUT
import ipywidgets as widgets


def explore(amount=0.1, log10_S_min=-3.0, log10_S_max=3.0, S_noise=1.0, num_steps=18):
    fig, ax = plt.subplots(figsize=(6, 3.8))
    plot_churn(ax, amount, 10**log10_S_min, 10**log10_S_max, S_noise, num_steps)
    plt.show()


Slider = widgets.FloatSlider
_ = widgets.interact(explore, amount=Slider(value=0.1, min=-0.2, max=0.3, step=0.02),
                     log10_S_min=Slider(value=-3, min=-3, max=1, step=0.25),
                     log10_S_max=Slider(value=3, min=-1, max=3, step=0.25),
                     S_noise=Slider(value=1.0, min=0.9, max=1.1, step=0.005),
                     num_steps=widgets.IntSlider(value=18, min=4, max=64))

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), sharey=True)
for ax, S_noise in zip(axes, [1.0, 1.007, 1.05]):
    plot_churn(ax, S_noise=S_noise)
plt.tight_layout()

# %% tags=["hide-input"]
# the numbers that the answers to the exercises below quote
# exercise 2: churn only above sigma = 2
w2_window = [w2_per_pixel(imperfect, S_churn=c, S_min=2.0) for c in CHURNS]
window_gain = 1 - min(w2_window) / w2_window[0]
best_noisy = {}
for S_noise in [1.0, 1.007]:  # exercise 3
    row = [w2_per_pixel(imperfect, S_churn=c, S_noise=S_noise) for c in CHURNS]
    best_noisy[S_noise] = CHURNS[min(range(len(CHURNS)), key=row.__getitem__)]
exact_noisy = [w2_per_pixel(gauss_img, S_churn=c, S_noise=1.007) for c in CHURNS]
print(f"exercise 2: churn only above sigma = 2 improves W2 by "
      f"{100 * window_gain:.0f} %; exercise 3: best S_churn {best_noisy[1.0]:g} "
      f"(S_noise = 1), "
      f"{best_noisy[1.007]:g} (S_noise = 1.007)")
assert 0.05 < window_gain < 0.2
assert best_noisy[1.007] < best_noisy[1.0]
assert exact_noisy[0] == exact_row[0]
assert all(a > b for a, b in zip(exact_noisy[1:], exact_row[1:]))
glue("window_gain", f"{100 * window_gain:.0f}", display=False)

# %% [markdown]
# ## 3.7 Sampling a trained network with the paper's settings
#
# > Through sampler improvements alone, we are able to bring the ImageNet-64 model that
# > originally achieved FID 2.07 to 1.55 that is very close to the state-of-the-art
# > (Sec. 4, "Evaluation")
#
# Everything above used exact ground truth; the samplers are meant for networks. The
# paper's deterministic setting is Algorithm 1 with N = 18 steps, 35 NFE (its CIFAR-10
# results). Its stochastic setting is found by grid search per network (Appendix E.2); for
# its own ImageNet-64 model it is S_churn = 40, S_tmin = 0.05, S_tmax = 50,
# S_noise = 1.003, with N = 256 steps (NFE = 511, its Fig. 5c). The number of steps
# matters, because Algorithm 2 spreads S_churn over them:
#
# $$\gamma_i = \min\!\left(\frac{S_\text{churn}}{N}, \sqrt2 - 1\right):\qquad
#   N = 256:\ \gamma_i = \tfrac{40}{256} \approx 0.16, \qquad
#   N = 18:\ \gamma_i = \sqrt2 - 1 \ (\text{the cap}) \quad \text{for } t_i \in [0.05, 50].$$
#
# In full mode this section samples the paper's pretrained CIFAR-10 network
# (`EDM_LIT_PRETRAINED`, by default NVIDIA's class-conditional VP snapshot, read by
# `edm_lit.checkpoints.load_network`, Appendix A2); in quick mode, Chapter 7's committed
# quick model of the 8×8 digits. Same 16 latents, five runs: deterministic with two noise
# streams (it draws noise but must ignore it), Algorithm 2 at 18 steps with two streams, and
# Algorithm 2 at the paper's 256 steps. The ImageNet-64 settings show the mechanics here,
# not the best images: for its own CIFAR-10 models the paper found "the best results were
# obtained with deterministic sampling, and any amount of stochastic sampling was
# detrimental" (Sec. 5).

# %%
from pathlib import Path

from edm_lit.checkpoints import load_network  # Appendix A2
from edm_lit.files import image_grid  # Appendix A3

REAL = get_mode().require("sampling the official pretrained CIFAR-10 network")
source = REAL.pick(quick=Path("results") / "quick_digits.json", full=REAL.pretrained)
real_net = load_network(source).to(REAL.device)  # we loaded it: ours to move
C, R, L = real_net.img_channels, real_net.img_resolution, real_net.label_dim
real_latents = torch.randn([16, C, R, R], device=REAL.device,
                           generator=torch.Generator(REAL.device).manual_seed(0))
classes = torch.arange(16, device=REAL.device) % max(L, 1)
real_labels = torch.eye(L, device=REAL.device)[classes] if L else None
# Appendix E.2, the column of the paper's own ImageNet-64 model
PAPER_CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
RUNS = {"deterministic, 35 NFE": (18, {}, 1), "deterministic, stream 2": (18, {}, 2),
        "Algorithm 2, 35 NFE": (18, PAPER_CHURN, 1),
        "Algorithm 2, stream 2": (18, PAPER_CHURN, 2),
        "Algorithm 2, 511 NFE": (256, PAPER_CHURN, 1)}
images, calls = {}, {}
with torch.no_grad():
    for name, (num_steps, churn_settings, seed) in RUNS.items():
        rec = Recording(real_net)
        stream = seeded(seed, REAL.device)
        images[name] = edm_sampler(rec, real_latents, real_labels, num_steps=num_steps,
                                   randn_like=stream, **churn_settings)
        calls[name] = rec.sigmas
print(f"{type(real_net).__name__} {C}x{R}x{R} on {REAL.device.type}: "
      + ", ".join(f"{name}: {len(sigmas)} calls" for name, sigmas in calls.items()))

# %% [markdown]
# **Checks** — what holds for any network: 35 and 511 network calls; the deterministic
# sampler's images do not depend on the noise stream, the stochastic ones do (by
# {glue:text}`real_moved` on average, images in [−1, 1]); and the first call of each step is
# at $\hat t_i = (1 + \gamma_i)\, t_i$ with the γ above inside the window, at $t_i$ outside
# it. On the CPU the two deterministic runs agree bit for bit; on a GPU we allow $10^{-5}$,
# in case cuDNN picks different kernels for two identical calls (by reasoning; no GPU in
# this build).

# %% tags=["hide-input"]
same = 0.0 if REAL.device.type == "cpu" else 1e-5
still = images["deterministic, 35 NFE"] - images["deterministic, stream 2"]
still = still.abs().max().item()
moved = images["Algorithm 2, 35 NFE"] - images["Algorithm 2, stream 2"]
moved = moved.abs().mean().item()
print(f"another noise stream moves the deterministic images by {still:.1e} (max), "
      f"the stochastic ones by {moved:.3f} (mean |difference|)")
assert len(calls["deterministic, 35 NFE"]) == 35
assert len(calls["Algorithm 2, 511 NFE"]) == 511
assert still <= same and moved > 0.1  # measured on the quick model: about 0.5
for name in ["Algorithm 2, 35 NFE", "Algorithm 2, 511 NFE"]:
    num_steps = RUNS[name][0]
    t = edm_time_steps(real_net, num_steps)[:-1]
    # the first call of each step, at t_hat, over t_i
    ratio = torch.tensor(calls[name][::2], dtype=F64) / t
    gamma = min(40 / num_steps, math.sqrt(2) - 1)
    inside = (t >= 0.05) & (t <= 50)
    assert inside.any() and (~inside).any()
    assert torch.allclose(ratio[inside], torch.tensor(1 + gamma, dtype=F64))
    assert torch.allclose(ratio[~inside], torch.ones(1, dtype=F64))
glue("real_moved", f"{moved:.2f}", display=False)

# %%
shown = ["deterministic, 35 NFE", "Algorithm 2, 35 NFE", "Algorithm 2, 511 NFE"]
fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.9))
for ax, name in zip(axes, shown):
    grid = image_grid(images[name], 4, gap=max(1, R // 16), fill=255)
    ax.imshow(grid[..., 0] if C == 1 else grid, cmap="gray" if C == 1 else None,
              vmin=0, vmax=255)
    ax.set_title(name, fontsize=9)
    ax.set_axis_off()
what = "the pretrained network" if REAL.full else "the quick model (Chapter 7)"
_ = fig.suptitle(f"the same 16 latents, {what}; Algorithm 2: S_churn 40, S_tmin 0.05, "
                 "S_tmax 50, S_noise 1.003")

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.samplers`, next to Chapter 2's deterministic pieces:
#
# - `churn` — Algorithm 2's noise step (γ, the window, S_noise, a draw at every step), for
#   any σ(t), s(t);
# - `sample_sde` — Algorithm 2 along any time steps; with S_churn = 0 identical to
#   `sample_ode`;
# - `edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
#   sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=inf, S_noise=1)` and
#   `ablation_sampler(..., solver, discretization, schedule, scaling, epsilon_s, C_1, C_2,
#   M, alpha, ...)` — the official interfaces, same defaults and random draws, float64
#   throughout.
#
# On exact ground truth (18 steps): with the exact denoiser churn only adds error (excess
# variance); with a denoiser that over-smooths by up to 10 % around σ ≈ 1, a moderate
# S_churn cuts the distance to the data {glue:text}`w2_imp_gain`-fold, mostly because
# churn's excess variance cancels the denoiser's deficit; Langevin correction proper removes
# {glue:text}`langevin_imp` % of the denoiser's error. §3.7 runs both samplers on a trained
# network with the paper's settings.
#
# **Cost.** What `edm_sampler` costs besides the network, measured in this build (below:
# CPU, one thread, batch 64 × 3 × 32 × 32, a denoiser that returns a preallocated tensor,
# median of 5 runs): {glue:text}`ms_heun` ms per Heun step; {glue:text}`ms_euler` ms per
# Euler step, of which the float64 noise draw that the official sampler makes at every step
# is {glue:text}`draw_share` % ({glue:text}`ms_no_draw` ms without it).
# `benchmarks/bench_sampler_overhead.py` puts these beside one call of a CIFAR-10-sized
# DDPM++ network and beside diffusers' `EDMEulerScheduler` (`benchmarks/README.md`);
# absolute times depend on the machine.

# %% tags=["hide-input"]
class FreeDenoiser:
    """The denoiser interface at almost no cost: returns a preallocated tensor, so a run
    times the sampler itself."""

    sigma_min, sigma_max = 0.0, math.inf

    def __init__(self, out):
        self.out = out

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        return self.out


bench = torch.randn(64, 3, 32, 32)
zeros = torch.zeros_like(bench, dtype=F64)
free = FreeDenoiser(zeros)
runs = {"heun": lambda: edm_sampler(free, bench),
        "euler": lambda: ablation_sampler(free, bench, solver="euler"),
        "no_draw": lambda: ablation_sampler(free, bench, solver="euler",
                                            randn_like=lambda x: zeros)}
per_step = {name: [] for name in runs}
for _ in range(5):  # interleaved rounds, so that a busy machine slows all three alike
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        per_step[name].append((time.perf_counter() - start) / 18 * 1e3)
ms = {name: statistics.median(v) for name, v in per_step.items()}
draw_share = 1 - ms["no_draw"] / ms["euler"]
print(f"ms per step: Heun {ms['heun']:.2f}, Euler {ms['euler']:.2f}, Euler without "
      f"the noise draw {ms['no_draw']:.2f} "
      f"(the draw: {100 * draw_share:.0f} % of an Euler step)")
assert ms["no_draw"] < ms["euler"]  # the per-step draw is a real cost
for key in ["heun", "euler", "no_draw"]:
    glue(f"ms_{key}", f"{ms[key]:.1f}", display=False)
glue("draw_share", f"{100 * draw_share:.0f}", display=False)

# %% [markdown]
# ## Exercises
#
# 1. Make the imperfect denoiser *under*-denoise (`amount` < 0 in the explorer). Does churn
#    still help? Is there still an optimum?
# 2. Restrict churn to high noise levels (S_tmin = 2). Why does it no longer help the
#    imperfect denoiser?
# 3. The paper uses S_noise slightly above 1. In our model, which sign of `amount` calls for
#    S_noise > 1?
#
# :::{dropdown} Answers
# 1. It helps, but much less ({glue:text}`under_gain` % at `amount` = −0.1, with a shallow
#    optimum at S_churn = {glue:text}`under_best`). An under-denoising network leaves the
#    output too noisy, and churn's own error *also* adds variance; the two no longer cancel,
#    and only the genuine Langevin correction remains (§3.5).
# 2. It barely helps ({glue:text}`window_gain` %). The correction only works where the score
#    is right; above σ = 2 our denoiser is still off, and below 2, where it makes most of its
#    error, nothing corrects it any more: the rest is plain ODE sampling that carries the
#    error to the end.
# 3. `amount` > 0: a denoiser that removes too much noise leaves too little variance, and a
#    little extra noise during churn compensates. In the panels above (and asserted in the
#    collapsed cell before §3.7), S_noise > 1 moves the optimum of the imperfect denoiser to
#    smaller S_churn and only hurts the exact one.
# :::
