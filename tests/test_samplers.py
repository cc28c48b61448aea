"""Chapters 2-3 (edm_lit.samplers): parity with the official samplers, NFE, convergence order, determinism, bad input."""
import inspect
import math

import pytest
import torch

from edm_lit.framework import EDM, VE, VP, GaussianMixture, iddpm_u, ode_slope, toy_image_mixture
from edm_lit.samplers import (SamplerSchedule, ablation_sampler, ablation_setup, edm_sampler, edm_time_steps,
                              sample_ode, sample_sde)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: one thread is faster and not slowed down by a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class IdentityNet:
    """The denoiser interface with no network behind it: records (sigma, x) and returns x / 2."""

    sigma_min, sigma_max = 0.0, float("inf")

    def __init__(self):
        self.sigmas, self.labels = [], []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        assert x.dtype == F64 and sigma.dtype == F64 and sigma.ndim == 0
        self.sigmas.append(float(sigma))
        self.labels.append(class_labels)
        return x * 0.5


class Replay(IdentityNet):
    """A fake network that replays the official run: its i-th call must see the recorded (sigma, x)."""

    def __init__(self, sigmas, xs=None, outs=None):
        super().__init__()
        self.ref_sigmas, self.ref_xs, self.ref_outs = sigmas, xs, outs

    def __call__(self, x, sigma, class_labels=None):
        i = len(self.sigmas)
        super().__call__(x, sigma, class_labels)
        assert float(sigma) == pytest.approx(float(self.ref_sigmas[i]), rel=1e-14, abs=0), f"call {i}: sigma"
        if self.ref_xs is None:
            return x * 0.5
        err = ((x - self.ref_xs[i]).abs().max() / self.ref_xs[i].abs().max()).item()
        assert err < 1e-12, f"call {i}: x differs by {err:.1e}"
        return self.ref_outs[i]


class IDDPMLike(IdentityNet):
    """Emulates iDDPMPrecond's range and round_sigma: sigma snapped to the nearest entry of the float32 table u."""

    def __init__(self, M=1000):
        super().__init__()
        self.u = iddpm_u(M, dtype=torch.float32)
        self.sigma_min, self.sigma_max = float(self.u[M - 1]), float(self.u[0])

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        index = (sigma.to(torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(1)
        return self.u[index].to(sigma.dtype).reshape(sigma.shape)


class VPLike(IdentityNet):
    """Emulates VPPrecond's sigma range (beta_d 19.9, beta_min 0.1, epsilon_t 1e-5), computed in float32."""

    def __init__(self):
        super().__init__()
        sigma = lambda t: ((0.5 * 19.9 * t**2 + 0.1 * t).exp() - 1).sqrt()
        self.sigma_min, self.sigma_max = float(sigma(torch.tensor(1e-5))), float(sigma(torch.tensor(1.0)))


# ---------------------------------------------------------------- parity with the official implementation

def test_deterministic_run_replays_official_calls(parity):
    ref = parity("sampler_edm.pt")
    net = Replay(ref["det_call_sigmas"], ref["det_call_x"], ref["det_call_denoised"])
    out = edm_sampler(net, ref["latents"], ref["class_labels"])
    assert len(net.sigmas) == 35 and out.dtype == F64
    assert ((out - ref["det_out"]).abs().max() / ref["det_out"].abs().max()).item() < 1e-6
    assert torch.equal(out, ref["det_out"])  # in fact bit for bit
    assert all(labels is ref["class_labels"] for labels in net.labels)


def test_stochastic_run_matches_official_noise_levels_and_draws(parity):
    # The network's outputs during the stochastic run are not stored, so the states cannot be replayed; what does
    # not depend on the network can: every call's sigma (t_hat on the first call of a step), the number and order of
    # the noise draws (one per step, also where gamma = 0), and the first step's state.
    # Note: the file's `sto_t_hat_per_step` / `sto_x_hat_per_step` hold t_i and x_i (the state *before* churn, as
    # passed to randn_like): e.g. entry 2 is 40.79 = t_2 while the call at that step is at t_hat = 57.68.
    ref = parity("sampler_edm.pt")
    settings = dict(ref["sto_settings"], S_max=float(ref["sto_settings"]["S_max"]))
    noises, seen = iter(ref["sto_step_noises"]), []

    def replay_noise(x):
        seen.append(x.clone())
        return next(noises)

    net = Replay(ref["sto_call_sigmas"])
    edm_sampler(net, ref["latents"], ref["class_labels"], randn_like=replay_noise, **settings)
    assert len(net.sigmas) == 35 and len(seen) == 18
    t_steps = edm_time_steps(net, 18)
    assert torch.allclose(t_steps[:-1], ref["sto_t_hat_per_step"], rtol=1e-14, atol=0)
    assert torch.allclose(seen[0], ref["sto_x_hat_per_step"][0], rtol=1e-14, atol=0)
    gamma = min(40 / 18, math.sqrt(2) - 1)
    for i, t in enumerate(t_steps[:-1].tolist()):
        expected = t * (1 + gamma) if 0.05 <= t <= 50 else t
        assert net.sigmas[2 * i] == pytest.approx(expected, rel=1e-14)


def test_custom_run_noise_levels(parity):
    ref = parity("sampler_edm.pt")
    net = Replay(ref["custom_call_sigmas"])
    edm_sampler(net, ref["latents"], ref["class_labels"], **ref["custom_settings"])
    assert len(net.sigmas) == 9


def test_edm_time_steps_match_official(parity):
    for case in parity("time_steps.pt")["edm"]:
        ours = edm_time_steps(IdentityNet(), case["num_steps"], case["sigma_min"], case["sigma_max"], case["rho"])
        assert torch.allclose(ours, case["t_steps"], rtol=1e-12, atol=0), case["num_steps"]


@pytest.mark.parametrize("net_kind", ["none", "iDDPMPrecond", "VPPrecond"])
def test_ablation_discretizations_match_official(parity, net_kind):
    cases = [c for c in parity("time_steps.pt")["ablation"] if c["net"].startswith(net_kind)]
    assert cases
    for case in cases:
        net = {"none": IdentityNet, "iDDPMPrecond": IDDPMLike, "VPPrecond": VPLike}[net_kind]()
        disc = case["discretization"]
        t_steps, sched = ablation_setup(net, case["num_steps"], discretization=disc, schedule="linear")
        assert torch.allclose(sched.sigma(t_steps), case["sigma_steps"], rtol=1e-12, atol=0), (net_kind, disc)
        if disc in ("vp", "ve"):  # the same noise levels reached through the model's own sigma(t)
            t_own, own = ablation_setup(net, case["num_steps"], discretization=disc, schedule=disc)
            assert torch.allclose(own.sigma(t_own), case["sigma_steps"], rtol=1e-12, atol=0)


def test_iddpm_round_sigma_in_the_loop():
    net = IDDPMLike()
    ablation_sampler(net, torch.randn(2, 3), num_steps=8, discretization="iddpm", S_churn=4)
    assert set(net.sigmas) <= set(net.u.double().tolist())  # every call, t_hat included, is on the table


# ---------------------------------------------------------------- NFE, final sigma, shapes

@pytest.mark.parametrize("num_steps", [1, 2, 5, 18])
def test_nfe_and_final_sigma(num_steps):
    for solver, nfe in [("heun", 2 * num_steps - 1), ("euler", num_steps)]:
        net = IdentityNet()
        ablation_sampler(net, torch.randn(3, 2, 4, 4), num_steps=num_steps, solver=solver)
        assert len(net.sigmas) == nfe and min(net.sigmas) > 0
    net = IdentityNet()
    edm_sampler(net, torch.randn(3, 2), num_steps=num_steps)
    assert len(net.sigmas) == 2 * num_steps - 1
    t_steps = edm_time_steps(net, num_steps)
    assert t_steps[-1] == 0 and t_steps.dtype == F64 and len(t_steps) == num_steps + 1
    assert net.sigmas[-1] == pytest.approx(0.002 if num_steps > 1 else 80.0, rel=1e-14)


def test_last_step_lands_on_the_denoiser():
    gm = toy_image_mixture(num_components=3, resolution=4)
    z = torch.randn(5, *gm.shape, dtype=F64)
    out = edm_sampler(gm, z, num_steps=1, sigma_max=3.0)
    assert torch.allclose(out, gm.denoise(z * 3.0, 3.0), rtol=0, atol=1e-14)


def test_output_dtype_shape_and_labels():
    net = IdentityNet()
    labels = torch.eye(4)[[0, 1, 2]]
    out = edm_sampler(net, torch.randn(3, 1, 2, 2), labels, num_steps=3)
    assert out.shape == (3, 1, 2, 2) and out.dtype == F64
    assert all(lab is labels for lab in net.labels)


# ---------------------------------------------------------------- exact solution of a single Gaussian

MU, S = 0.4, 0.6
GAUSS = GaussianMixture(torch.tensor([[MU, -MU]]), stds=S)


def gaussian_target(latents, sigma_min=0.002, sigma_max=80.0):
    """D(x(sigma_min); sigma_min) with x(sigma) the closed-form ODE solution: where the sampler must converge."""
    mu = torch.tensor([MU, -MU], dtype=F64)
    x = mu + (latents * sigma_max - mu) * math.sqrt(S**2 + sigma_min**2) / math.sqrt(S**2 + sigma_max**2)
    return GAUSS.denoise(x, sigma_min)


@pytest.mark.parametrize("solver,rate", [("heun", 4.0), ("euler", 2.0)])
def test_convergence_order_on_a_gaussian(solver, rate):
    z = torch.linspace(-3, 3, 13, dtype=F64)[:, None].repeat(1, 2)
    errs = []
    for intervals in [16, 32, 64, 128]:  # halving every step of Eq. 5 (uniform in sigma^(1/rho))
        out = ablation_sampler(GAUSS, z, num_steps=intervals + 1, solver=solver)
        errs.append((out - gaussian_target(z)).abs().max().item())
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(abs(r / rate - 1) < 0.12 for r in ratios), ratios


@pytest.mark.parametrize("schedule,scaling", [("vp", "vp"), ("ve", "none"), ("vp", "none"), ("linear", "vp")])
def test_every_schedule_converges_to_the_same_solution(schedule, scaling):
    # every pairing solves the same ODE down to sigma_min exactly in the limit; the last step, one Euler step in the
    # schedule's own time from t(sigma_min) to 0, is the same fixed map for any N (for sigma(t) = t it gives D)
    z = torch.linspace(-2, 2, 9, dtype=F64)[:, None].repeat(1, 2)
    t_steps, sched = ablation_setup(GAUSS, 2, schedule=schedule, scaling=scaling)
    t_end = t_steps[-2]
    mu = torch.tensor([MU, -MU], dtype=F64)
    x_end = mu + (z * 80.0 - mu) * math.sqrt(S**2 + 0.002**2) / math.sqrt(S**2 + 80.0**2)  # closed form at sigma_min
    target = sched.s(t_end) * x_end - t_end * sched.derivative(GAUSS, sched.s(t_end) * x_end, t_end)
    errs = [(ablation_sampler(GAUSS, z, num_steps=n, schedule=schedule, scaling=scaling) - target).abs().max()
            for n in [33, 129]]
    assert errs[1] < errs[0] / 12 and errs[1] < 1e-2  # 4x the steps: 16x smaller error at second order


def test_midpoint_alpha_is_second_order():
    z = torch.linspace(-3, 3, 13, dtype=F64)[:, None].repeat(1, 2)
    errs = [(ablation_sampler(GAUSS, z, num_steps=n + 1, alpha=0.5) - gaussian_target(z)).abs().max().item()
            for n in [32, 64]]
    assert errs[0] / errs[1] > 3.5


@pytest.mark.parametrize("name", ["vp", "ve", "linear"])
def test_sampler_schedule_slope_is_chapter_1s_ode(name):
    gm = toy_image_mixture(num_components=3, resolution=4)
    ours, column = {"vp": (SamplerSchedule(VP(), "vp"), VP()), "ve": (SamplerSchedule(VE()), VE()),
                    "linear": (SamplerSchedule(), EDM())}[name]
    x = 2.0 * torch.randn(5, *gm.shape, dtype=F64)
    for sigma in [0.01, 0.7, 30.0]:
        t = column.sigma_inv(torch.tensor(sigma, dtype=F64))
        assert torch.allclose(ours.derivative(gm, x, t), ode_slope(column, gm, x, t), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- determinism and batch independence

def per_sample_randn_like(seeds):
    """Like the official generator: one torch.Generator per sample, so a sample's noise ignores the batch."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda x: torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens])


def test_fixed_seed_is_deterministic_and_independent_of_batch_splitting():
    gm = toy_image_mixture(num_components=4, resolution=4)
    seeds = list(range(6))
    latents = torch.stack([torch.randn(gm.shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    kw = dict(num_steps=10, S_churn=10, S_min=0.05, S_max=50, S_noise=1.003)
    whole = edm_sampler(gm, latents, randn_like=per_sample_randn_like(seeds), **kw)
    again = edm_sampler(gm, latents, randn_like=per_sample_randn_like(seeds), **kw)
    assert torch.equal(whole, again)
    parts = torch.cat([edm_sampler(gm, latents[i:j], randn_like=per_sample_randn_like(seeds[i:j]), **kw)
                       for i, j in [(0, 1), (1, 4), (4, 6)]])
    assert torch.allclose(parts, whole, rtol=0, atol=1e-14)
    det = ablation_sampler(gm, latents, discretization="vp", schedule="vp", scaling="vp")
    det_parts = torch.cat([ablation_sampler(gm, latents[i:j], discretization="vp", schedule="vp", scaling="vp")
                           for i, j in [(0, 3), (3, 6)]])
    assert torch.allclose(det_parts, det, rtol=0, atol=1e-14)


def test_no_churn_equals_the_ode_and_still_draws_every_step():
    gm = toy_image_mixture(num_components=3, resolution=4)
    z = torch.randn(4, *gm.shape)
    draws = []

    def counting(x):
        draws.append(1)
        return torch.randn_like(x)

    t_steps, sched = ablation_setup(gm, 7, discretization="ve", schedule="ve")
    ode = sample_ode(gm, z, t_steps, sched, solver="euler")
    sde = sample_sde(gm, z, t_steps, sched, randn_like=counting, solver="euler")
    assert torch.equal(ode, sde) and len(draws) == 7
    assert torch.equal(ablation_sampler(gm, z, num_steps=7, discretization="ve", schedule="ve", solver="euler",
                                        randn_like=counting), ode)
    assert torch.equal(ablation_sampler(gm, z), edm_sampler(gm, z))


def test_churn_window_and_cap():
    net = IdentityNet()
    edm_sampler(net, torch.randn(2, 3), num_steps=10, S_churn=100, S_min=0.1, S_max=10)
    t = edm_time_steps(net, 10)[:-1]
    for i, t_i in enumerate(t.tolist()):
        assert net.sigmas[2 * i] == pytest.approx(t_i * (math.sqrt(2) if 0.1 <= t_i <= 10 else 1))


def test_vp_schedule_may_have_negative_beta_min():
    vp = VP.from_sigma_range(0.002, 80.0)  # what the ablation sampler fits for EDM's range
    assert vp.beta_min < 0 and vp.sigma(1e-3).item() == pytest.approx(0.002, rel=1e-9)
    with pytest.raises(ValueError, match="t must lie in"):
        vp.sigma(1e-4)  # sigma(t) is not real there
    with pytest.raises(ValueError, match="beta_min"):
        VP(beta_min=-1.0)
    out = ablation_sampler(IdentityNet(), torch.randn(2, 3), num_steps=5, schedule="vp", scaling="vp")
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=0), "num_steps"), (dict(num_steps=2.5), "num_steps"), (dict(num_steps=True), "num_steps"),
    (dict(sigma_min=0), "sigma_min"), (dict(sigma_min=-1), "sigma_min"), (dict(sigma_min=80), "sigma_min"),
    (dict(sigma_min=100, sigma_max=50), "sigma_min"), (dict(sigma_max=float("inf")), "sigma_max"),
    (dict(sigma_min=float("nan")), "sigma_min"), (dict(rho=0), "rho"), (dict(rho=-7), "rho"),
    (dict(S_churn=-1), "S_churn"), (dict(S_noise=-1), "S_noise"), (dict(S_min=float("nan")), "S_min"),
    (dict(class_labels=torch.zeros(3, 10)), "class_labels"), (dict(class_labels=[1, 2, 3, 4]), "class_labels"),
])
def test_edm_sampler_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        edm_sampler(IdentityNet(), torch.randn(4, 3), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="rk45"), "solver"), (dict(discretization="cosine"), "discretization"),
    (dict(schedule="exp"), "schedule"), (dict(scaling="ve"), "scaling"), (dict(alpha=0), "alpha"),
    (dict(alpha=-1), "alpha"), (dict(num_steps=-3), "num_steps"), (dict(rho=0), "rho"),
    (dict(epsilon_s=0), "epsilon_s"), (dict(epsilon_s=1.5), "epsilon_s"),
    (dict(discretization="vp", sigma_min=0.002, sigma_max=80, epsilon_s=1e-9), "epsilon_s"), (dict(sigma_min=2, sigma_max=1), "sigma_min"),
    (dict(S_churn=-0.1), "S_churn"), (dict(S_noise=-2), "S_noise"),
])
def test_ablation_sampler_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ablation_sampler(IdentityNet(), torch.randn(4, 3), **kwargs)


def test_bad_latents_and_net():
    with pytest.raises(ValueError, match="latents"):
        edm_sampler(IdentityNet(), [[0.0, 1.0]])
    with pytest.raises(ValueError, match="latents"):
        edm_sampler(IdentityNet(), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="net must be a denoiser"):
        edm_sampler(lambda x, sigma, labels=None: x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="does not overlap"):
        edm_sampler(IDDPMLike(), torch.zeros(2, 3), sigma_min=1e5, sigma_max=2e5)  # its table ends at ~20291
    with pytest.raises(ValueError, match="t_steps"):
        sample_ode(IdentityNet(), torch.zeros(2, 3), torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="scaling"):
        SamplerSchedule(scaling="exp")


# ---------------------------------------------------------------- the public surface

# the official samplers' parameters and defaults, in order (facts of NVlabs/edm's generate.py
# and its ablation sampler)
OFFICIAL_EDM_SAMPLER = [
    ("net", "required"), ("latents", "required"), ("class_labels", None), ("randn_like", torch.randn_like),
    ("num_steps", 18), ("sigma_min", 0.002), ("sigma_max", 80), ("rho", 7), ("S_churn", 0),
    ("S_min", 0), ("S_max", float("inf")), ("S_noise", 1)]
OFFICIAL_ABLATION_SAMPLER = OFFICIAL_EDM_SAMPLER[:5] + [
    ("sigma_min", None), ("sigma_max", None), ("rho", 7), ("solver", "heun"),
    ("discretization", "edm"), ("schedule", "linear"), ("scaling", "none"), ("epsilon_s", 1e-3),
    ("C_1", 0.001), ("C_2", 0.008), ("M", 1000), ("alpha", 1), ("S_churn", 0), ("S_min", 0),
    ("S_max", float("inf")), ("S_noise", 1)]


@pytest.mark.parametrize("sampler,official", [(edm_sampler, OFFICIAL_EDM_SAMPLER),
                                              (ablation_sampler, OFFICIAL_ABLATION_SAMPLER)])
def test_official_signatures(sampler, official):
    params = inspect.signature(sampler).parameters.values()
    empty = inspect.Parameter.empty
    ours = [(p.name, "required" if p.default is empty else p.default) for p in params]
    assert ours == official
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_public_surface_is_the_samplers_and_their_parts():
    import edm_lit
    import edm_lit.samplers as samplers
    assert set(samplers.__all__) == {"SamplerSchedule", "ode_step", "edm_time_steps", "sample_ode",
                                     "ablation_setup", "churn", "sample_sde", "edm_sampler",
                                     "ablation_sampler"}
    for name in samplers.__all__:
        assert getattr(edm_lit, name) is getattr(samplers, name)
    # the argument checks are private helpers, not API
    for name in ["check_choice", "check_real", "check_num_steps", "check_t_steps",
                 "check_sampler_inputs", "sigma_range", "vp_fitted", "ablation_sigma_steps"]:
        assert not hasattr(samplers, name) and hasattr(samplers, "_" + name)
        with pytest.raises(AttributeError):
            getattr(edm_lit, name)


def test_course_helpers():
    from edm_lit.course import Recording, pct, sci
    assert sci(3.7e-5) == "3.7 × 10⁻⁵" and sci(1234.5, digits=2) == "1.23 × 10³"
    assert pct(0.1234) == "12.3 %"
    rec = Recording(IdentityNet())
    edm_sampler(rec, torch.randn(2, 3), num_steps=4)
    assert len(rec.sigmas) == 7 and rec.sigmas[0] == 80.0
    assert set(rec.inputs) == {(F64, F64, 0)}  # float64 x and a 0-dim float64 sigma
