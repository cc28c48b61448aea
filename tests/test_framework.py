"""Chapter 1 (edm_lit.framework): schedules, ground truth, the ODE, parity with the official time steps."""
import math

import pytest
import torch

from edm_lit.framework import (EDM, IDDPM, SCHEDULES, VE, VP, GaussianMixture, edm_sigma_steps, iddpm_u, ode_slope,
                               solve_ode_rk4, toy_image_mixture)

F64 = torch.float64


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_inverse_and_derivatives(name):
    sch = SCHEDULES[name]()
    t = torch.linspace(0.01, 0.99, 50, dtype=F64) * sch.t_max
    assert torch.allclose(sch.sigma_inv(sch.sigma(t)), t, rtol=1e-15, atol=0)
    h = 1e-6 * sch.t_max
    fd = (sch.sigma(t + h) - sch.sigma(t - h)) / (2 * h)
    assert torch.allclose(sch.sigma_deriv(t), fd, rtol=3e-9, atol=0)  # central differences: ~1e-9 of rounding
    fd_s = (sch.s(t + h) - sch.s(t - h)) / (2 * h)
    assert torch.allclose(sch.s_deriv(t), fd_s, rtol=3e-9, atol=1e-12)
    assert float(sch.sigma(0)) == 0 and float(sch.s(0)) == 1
    steps = sch.time_steps(18)
    assert steps.dtype == F64 and len(steps) == 19 and steps[-1] == 0
    assert (steps[:-1].diff() <= 0).all()


def test_vp_constants_and_scaling():
    vp = VP()
    assert vp.sigma_min == pytest.approx(0.010485992786706403, rel=1e-12)
    assert vp.sigma_max == pytest.approx(152.16697028394634, rel=1e-12)
    t = torch.linspace(0, 1, 11, dtype=F64)
    assert torch.allclose(vp.s(t) ** 2 * (1 + vp.sigma(t) ** 2), torch.ones_like(t), rtol=2e-15, atol=0)  # variance preserving
    again = VP.from_sigma_range(vp.sigma_min, vp.sigma_max)
    assert again.beta_d == pytest.approx(19.9, rel=1e-10) and again.beta_min == pytest.approx(0.1, rel=1e-8)


def test_edm_time_steps_match_official(parity):
    ref = parity("time_steps.pt")
    for case in ref["edm"]:
        ours = EDM(case["sigma_min"], case["sigma_max"], case["rho"]).time_steps(case["num_steps"])
        assert torch.allclose(ours, case["t_steps"], rtol=1e-12, atol=0), case["num_steps"]
        assert torch.equal(ours[:-1], edm_sigma_steps(case["num_steps"], case["sigma_min"], case["sigma_max"], case["rho"]))


def test_vp_ve_steps_match_official_ablation(parity):
    for case in parity("time_steps.pt")["ablation"]:
        if case["net"].startswith("none") and case["discretization"] in ("vp", "ve"):
            ours = {"vp": VP(), "ve": VE()}[case["discretization"]].sigma_steps(case["num_steps"])
            assert torch.allclose(ours, case["sigma_steps"], rtol=1e-12, atol=0)


def test_iddpm_table_matches_official(parity):
    ref = parity("time_steps.pt")
    assert torch.equal(iddpm_u(dtype=torch.float32), ref["iddpm_u_M1000"])  # bit for bit, as iDDPMPrecond builds it
    u = iddpm_u()
    for case in ref["ablation"]:
        if case["discretization"] == "iddpm" and case["net"].startswith("none"):
            # the official ablation sampler: entries of u inside [0.002, 81], N picked evenly and rounded
            kept = u[(u >= 0.002) & (u <= 81)]
            n = case["num_steps"]
            idx = ((len(kept) - 1) / (n - 1) * torch.arange(n, dtype=F64)).round().long()
            assert torch.allclose(kept[idx], case["sigma_steps"][:-1], rtol=1e-12, atol=0)


def test_iddpm_table1_steps():
    sch = IDDPM()
    steps = sch.time_steps(10)
    assert steps[0] == sch.u[sch.j_0] and steps[-2] == sch.u[sch.M - 1]


def test_single_step_and_bad_steps():
    assert edm_sigma_steps(1).tolist() == [80.0]
    for bad in [0, -3, 2.5]:
        with pytest.raises(ValueError, match="num_steps"):
            EDM().time_steps(bad)
    with pytest.raises(ValueError, match="sigma_min"):
        edm_sigma_steps(10, sigma_min=0)
    with pytest.raises(ValueError, match="sigma_min"):
        EDM(sigma_min=5, sigma_max=1)
    with pytest.raises(ValueError, match="rho"):
        EDM(rho=0)
    with pytest.raises(ValueError, match="beta_d"):
        VP(beta_d=-1)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_bad_times_and_sigmas(name):
    sch = SCHEDULES[name]()
    with pytest.raises(ValueError, match="t must lie in"):
        sch.sigma(-0.1)
    with pytest.raises(ValueError, match="t must lie in"):
        sch.s(torch.tensor([0.5 * sch.t_max, 1.01 * sch.t_max]))
    with pytest.raises(ValueError, match="t must lie in"):
        sch.sigma_deriv(float("inf"))
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        sch.sigma_inv(-1.0)
    with pytest.raises(ValueError, match="NaN"):
        sch.sigma(float("nan"))


def test_gmm_score_denoiser_identities():
    gm = toy_image_mixture(num_components=5, channels=2, resolution=4, std=0.2)
    x = gm.sample(10, generator=torch.Generator().manual_seed(1)) + 0.5 * torch.randn(10, 2, 4, 4, dtype=F64)
    for sigma in [0.01, 0.3, 2.0, 50.0]:
        xg = x.clone().requires_grad_(True)
        gm.log_prob(xg, sigma).sum().backward()
        score = gm.score(x, sigma)
        assert torch.allclose(score, xg.grad, rtol=1e-14, atol=1e-14)
        assert torch.allclose(score, (gm.denoise(x, sigma) - x) / sigma**2, rtol=1e-12, atol=1e-12)  # Eq. 3
    # per-sample sigma, in any broadcastable layout
    sig = torch.linspace(0.1, 3, 10, dtype=F64)
    rows = torch.cat([gm.denoise(x[i:i + 1], sig[i]) for i in range(10)])
    assert torch.allclose(gm.denoise(x, sig), rows, rtol=1e-13, atol=0)
    assert torch.allclose(gm.denoise(x, sig.reshape(10, 1, 1, 1)), rows, rtol=1e-13, atol=0)
    assert gm.img_channels == 2 and gm.img_resolution == 4 and gm.round_sigma(0.5) == 0.5


def test_finite_data_denoiser_is_softmax_average():
    data = torch.randn(7, 3, dtype=F64)
    gm = GaussianMixture.from_data(data)
    x = torch.randn(5, 3, dtype=F64)
    sigma = 0.8
    w = torch.softmax(-((x[:, None] - data[None]) ** 2).sum(-1) / (2 * sigma**2), dim=1)
    assert torch.allclose(gm(x, sigma), w @ data, rtol=1e-14, atol=1e-15)
    assert torch.allclose(gm(data, 1e-4), data, rtol=0, atol=1e-15)  # tiny noise: the nearest training point
    with pytest.raises(ValueError, match="sigma must be > 0 for point masses"):
        gm(x, 0.0)


def test_data_std_matches_samples():
    gm = toy_image_mixture()
    ys = gm.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert gm.data_std == pytest.approx(ys.std().item(), rel=1e-3)


def test_gmm_bad_input():
    gm = toy_image_mixture(num_components=3, channels=3, resolution=4)
    x = torch.zeros(2, 3, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 3, 4, 4\]"):
        gm(torch.zeros(2, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        gm.denoise(x, -0.5)
    with pytest.raises(ValueError, match="one value per sample"):
        gm.score(x, torch.ones(3))
    with pytest.raises(ValueError, match="stds must be a scalar"):
        GaussianMixture(torch.zeros(3, 2), stds=torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(3, 2), weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="means must be"):
        GaussianMixture(torch.zeros(3))


def test_rk4_matches_closed_form_single_gaussian():
    mu, s = 0.7, 0.3
    gm = GaussianMixture(torch.tensor([[mu]]), stds=s)
    x0 = torch.tensor([[-20.0], [3.0], [40.0]], dtype=F64)
    sigma0, sigma1 = 40.0, 1e-3
    for sch in [EDM(sigma1, sigma0), VE(sigma1, sigma0), VP.from_sigma_range(sigma1, sigma0, epsilon_s=1e-4)]:
        t_grid = sch.sigma_inv(torch.logspace(math.log10(sigma0), math.log10(sigma1), 200, dtype=F64))
        out = solve_ode_rk4(sch, gm, x0 * sch.s(t_grid[0]), t_grid)[-1] / sch.s(t_grid[-1])
        # the ODE moves x linearly in sqrt(s^2 + sigma^2) for a single Gaussian
        exact = mu + (x0 - mu) * math.sqrt(s**2 + sigma1**2) / math.sqrt(s**2 + sigma0**2)
        assert torch.allclose(out, exact, atol=1e-7), sch


def test_ode_slope_rejects_sigma_zero():
    gm = toy_image_mixture(resolution=4)
    with pytest.raises(ValueError, match="singular"):
        ode_slope(EDM(), gm, torch.zeros(1, 3, 4, 4, dtype=F64), 0.0)
    with pytest.raises(ValueError, match="t_grid"):
        solve_ode_rk4(EDM(), gm, torch.zeros(1, 3, 4, 4, dtype=F64), torch.tensor([1.0, 0.0]))
