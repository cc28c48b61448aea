"""Chapter 4 (edm_lit.precond, edm_lit.loss): Table 1 coefficients, the forward pass, the losses, parity."""
import inspect
import math

import pytest
import torch

from edm_lit.framework import iddpm_u
from edm_lit.loss import EDMLoss, VELoss, VPLoss
from edm_lit.precond import EDMPrecond, Precond, VEPrecond, VPPrecond, iDDPMPrecond, vp_sigma, vp_sigma_inv
from helpers import rel_err as rel

PRECONDS = [VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond]


class FakeModel(torch.nn.Module):
    """An inner network that records its inputs and returns `reply` (or a fixed function of its input)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, **model_kwargs):
        super().__init__()
        self.built_with = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                               label_dim=label_dim, **model_kwargs)
        self.weight = torch.nn.Parameter(torch.ones([]))
        self.reply, self.calls = None, []

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        self.calls.append(dict(x=x, noise_labels=noise_labels, class_labels=class_labels, **kwargs))
        if self.reply is not None:
            return self.reply.to(x.dtype)
        out_channels = self.built_with["out_channels"]
        reps = -(-out_channels // x.shape[1])
        return (torch.sin(3 * x) * self.weight).repeat(1, reps, 1, 1)[:, :out_channels]


# ---------------------------------------------------------------------------------------------------------------------
# parity with the official implementation (reference outputs in tests/data, inner network replayed)

def _edm_from_reference(ref):
    kwargs = dict(ref["kwargs"])
    assert kwargs.pop("model_type") == "SongUNet"
    return EDMPrecond(model_type=FakeModel, **kwargs)


def test_edm_precond_parity(parity):
    ref = parity("precond_edm.pt")
    net = _edm_from_reference(ref)
    assert net.sigma_min == ref["sigma_min_attr"] and net.sigma_max == ref["sigma_max_attr"]
    assert net.model.built_with["out_channels"] == 3 and net.model.built_with["model_channels"] == 16
    net.model.reply = ref["model_out"]
    out = net(ref["x"], ref["sigma"], ref["class_labels"])
    call = net.model.calls[-1]
    assert rel(call["x"], ref["model_in_x"]) <= 1e-6
    assert rel(call["noise_labels"], ref["model_in_noise_labels"]) <= 1e-6
    assert torch.equal(call["class_labels"], ref["model_in_class_labels"])
    assert set(call) == {"x", "noise_labels", "class_labels"}
    assert out.dtype == torch.float32 and rel(out, ref["out"]) <= 1e-6


def test_edm_precond_parity_without_labels(parity):
    ref = parity("precond_edm.pt")
    net = _edm_from_reference(ref)
    net.model.reply = ref["model_out"]
    out = net(ref["x"], ref["sigma"], None)
    call = net.model.calls[-1]
    assert torch.equal(call["class_labels"], torch.zeros(1, 10))  # unconditional call on a conditional net
    assert rel(call["x"], ref["model_in_x"]) <= 1e-6 and rel(call["noise_labels"], ref["model_in_noise_labels"]) <= 1e-6
    assert rel(out, ref["out"]) <= 1e-6


def test_edm_precond_parity_with_augment_labels(parity):
    ref = parity("precond_edm.pt")
    net = _edm_from_reference(ref)
    net.model.reply = ref["model_out_with_augment_labels"]
    out = net(ref["x"], ref["sigma"], ref["class_labels"], augment_labels=ref["augment_labels"])
    call = net.model.calls[-1]
    assert torch.equal(call["augment_labels"], ref["augment_labels"])  # passed through model_kwargs
    assert rel(call["x"], ref["model_in_x"]) <= 1e-6
    assert rel(out, ref["out_with_augment_labels"]) <= 1e-6


def test_edm_precond_sampler_call_float64(parity):
    """The samplers call with float64 x and a 0-dim float64 sigma; the preconditioner casts to float32."""
    ref = parity("precond_edm.pt")
    net = _edm_from_reference(ref)
    net.model.reply = ref["model_out"][:1]
    out = net(ref["x"][:1].double(), ref["sigma"][1].double(), ref["class_labels"][:1])
    assert out.dtype == torch.float32 and net.model.calls[-1]["x"].dtype == torch.float32
    assert net.model.calls[-1]["noise_labels"].shape == (1,)
    assert rel(net.model.calls[-1]["noise_labels"], ref["model_in_noise_labels"][1:2]) <= 1e-6


def test_edm_loss_parity_and_draw_order(parity):
    ref = parity("loss_edm.pt")
    seen = {}

    def net(x, sigma, class_labels=None, augment_labels=None):
        seen.update(x=x, sigma=sigma, class_labels=class_labels, augment_labels=augment_labels)
        return ref["D_yn"]

    torch.manual_seed(ref["torch_manual_seed"])
    loss = EDMLoss(**ref["loss_kwargs"])(net, ref["images"], ref["labels"])
    assert ref["rng_draw_fns"] == ["randn", "randn_like"]
    assert torch.equal(seen["sigma"], ref["sigma"]) and seen["sigma"].shape == (8, 1, 1, 1)
    assert rel(seen["x"], ref["net_input"]) <= 5e-7 and rel(seen["x"] - ref["images"], ref["noise"]) <= 5e-7
    assert seen["class_labels"] is ref["labels"] and seen["augment_labels"] is None
    assert loss.shape == (8, 3, 16, 16) and rel(loss, ref["loss"]) <= 1e-6
    weight = EDMLoss().weight(ref["sigma"]).flatten()
    assert rel(weight, ref["weight_per_sample"]) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Table 1 against independent closed forms (double precision, written out here with math)

def _closed_form(kind, s, sd=0.5, M=1000):
    """(c_skip, c_out, c_in, c_noise) of Table 1 for one float sigma."""
    if kind == "edm":
        return sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2), 1 / math.sqrt(s**2 + sd**2), math.log(s) / 4
    if kind == "ve":
        return 1.0, s, 1.0, math.log(s / 2)
    if kind == "vp":  # t solves beta_d t^2 / 2 + beta_min t = ln(1 + s^2)
        bd, bm = 19.9, 0.1
        t = (-bm + math.sqrt(bm**2 + 2 * bd * math.log1p(s**2))) / bd
        return 1.0, -s, 1 / math.sqrt(s**2 + 1), (M - 1) * t
    u = iddpm_u(M).tolist()
    j = min(range(M + 1), key=lambda k: abs(u[k] - s))
    return 1.0, -s, 1 / math.sqrt(s**2 + 1), M - 1 - j


@pytest.mark.parametrize("cls,kind", [(VPPrecond, "vp"), (VEPrecond, "ve"), (iDDPMPrecond, "iddpm"), (EDMPrecond, "edm")])
def test_forward_matches_table1(cls, kind):
    net = cls(8, 3, model_type=FakeModel)
    sigmas = [0.03, 0.21, 1.7, 9.0, 55.0]  # away from iDDPM rounding ties
    x = torch.randn(len(sigmas), 3, 8, 8)
    D = net(x, torch.tensor(sigmas))
    call = net.model.calls[-1]
    for i, s in enumerate(sigmas):
        c_skip, c_out, c_in, c_noise = _closed_form(kind, float(torch.tensor(s)))
        assert rel(call["x"][i], c_in * x[i]) <= 5e-7
        # VP: the official single-precision ln(1 + sigma^2) costs up to ~1e-4 relative at small sigma
        tol = 1e-4 if kind == "vp" else 1e-7  # measured: 2.5e-5 (vp), 3e-8 (float32 rounding, the others)
        assert abs(call["noise_labels"][i].item() - c_noise) <= tol * max(1.0, abs(c_noise))
        F = torch.sin(3 * c_in * x[i].double())  # what the fake network returns (first img_channels channels)
        assert rel(D[i], c_skip * x[i].double() + c_out * F) <= 1e-6
    assert D.shape == x.shape and D.dtype == torch.float32


def test_vp_sigma_official_arithmetic():
    net = VPPrecond(8, 3, model_type=FakeModel)
    assert net.sigma_min == 2**-10  # sqrt(exp(f) - 1) in float32 at t = epsilon_t, as the official code computes it
    assert net.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)), rel=1e-6)
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    assert torch.allclose(vp_sigma_inv(vp_sigma(t)), t, rtol=1e-13, atol=0)
    assert vp_sigma(torch.tensor(0.5)).dtype == torch.float32 and vp_sigma(torch.tensor(0.5, dtype=torch.float64)).dtype == torch.float64


def test_iddpm_table_rounding_and_state_dict():
    net = iDDPMPrecond(8, 3, model_type=FakeModel)
    assert net.model.built_with["out_channels"] == 6
    assert torch.equal(net.u, iddpm_u(dtype=torch.float32)) and net.u.dtype == torch.float32
    assert set(net.state_dict()) == {"u", "model.weight"} and dict(net.named_buffers()).keys() == {"u"}
    assert net.sigma_min == float(net.u[999]) and net.sigma_max == float(net.u[0])
    sigma = torch.tensor([[0.05, 1.0], [30.0, float(net.u[500])]], dtype=torch.float64)
    snapped, index = net.round_sigma(sigma), net.round_sigma(sigma, return_index=True)
    assert snapped.shape == sigma.shape and snapped.dtype == torch.float64
    assert index.shape == sigma.shape and index.dtype == torch.int64
    expected = (sigma.reshape(-1, 1) - net.u.double()[None]).abs().argmin(1).reshape(2, 2)
    assert torch.equal(index, expected) and torch.equal(snapped, net.u[expected].double())
    assert snapped[1, 1] == sigma[1, 1]
    assert net.round_sigma(80.0).shape == ()


@pytest.mark.parametrize("cls", [VPPrecond, VEPrecond, EDMPrecond])
def test_continuous_round_sigma_and_state_dict(cls):
    net = cls(8, 3, model_type=FakeModel)
    s = torch.tensor([0.1234567, 7.0], dtype=torch.float64)
    assert torch.equal(net.round_sigma(s), s) and torch.is_tensor(net.round_sigma(0.5))
    assert list(net.state_dict()) == ["model.weight"] and not list(net.buffers())


def test_constructor_defaults_match_official():
    def defaults(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}

    assert defaults(VPPrecond) == dict(label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5,
                                       model_type="SongUNet")
    assert defaults(VEPrecond) == dict(label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100, model_type="SongUNet")
    assert defaults(iDDPMPrecond) == dict(label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                                          model_type="DhariwalUNet")
    assert defaults(EDMPrecond) == dict(label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5,
                                        model_type="DhariwalUNet")
    assert defaults(VPLoss) == dict(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5)
    assert defaults(VELoss) == dict(sigma_min=0.02, sigma_max=100)
    assert defaults(EDMLoss) == dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    for cls in PRECONDS:
        params = list(inspect.signature(cls.forward).parameters)
        assert params == ["self", "x", "sigma", "class_labels", "force_fp32", "model_kwargs"]
    net = EDMPrecond(16, 3, label_dim=5, model_type=FakeModel, extra=7)
    assert net.model.built_with == dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=5, extra=7)
    assert (net.img_resolution, net.img_channels, net.label_dim, net.use_fp16, net.sigma_data) == (16, 3, 5, False, 0.5)


def test_fp16_only_on_cuda_and_not_forced():
    net = EDMPrecond(8, 3, use_fp16=True, model_type=FakeModel)
    net(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]))
    assert net.model.calls[-1]["x"].dtype == torch.float32  # CPU: float32 even with use_fp16
    if torch.cuda.is_available():
        net = net.cuda()
        out = net(torch.randn(2, 3, 8, 8, device="cuda"), torch.tensor([1.0, 2.0], device="cuda"))
        assert net.model.calls[-1]["x"].dtype == torch.float16 and out.dtype == torch.float32
        net(torch.randn(2, 3, 8, 8, device="cuda"), torch.tensor([1.0, 2.0], device="cuda"), force_fp32=True)
        assert net.model.calls[-1]["x"].dtype == torch.float32


def test_labels_handling():
    uncond = VEPrecond(8, 3, model_type=FakeModel)
    uncond(torch.randn(2, 3, 8, 8), torch.tensor(1.0), class_labels=torch.ones(2, 4))
    assert uncond.model.calls[-1]["class_labels"] is None  # an unconditional net ignores labels
    cond = VEPrecond(8, 3, label_dim=4, model_type=FakeModel)
    cond(torch.randn(2, 3, 8, 8), torch.tensor(1.0), class_labels=torch.eye(4, dtype=torch.float64)[:2])
    labels = cond.model.calls[-1]["class_labels"]
    assert labels.dtype == torch.float32 and labels.shape == (2, 4)


def test_gradients_reach_the_inner_network():
    net = EDMPrecond(8, 3, model_type=FakeModel)
    EDMLoss()(net, torch.randn(4, 3, 8, 8)).sum().backward()
    assert net.model.weight.grad is not None and torch.isfinite(net.model.weight.grad)


# ---------------------------------------------------------------------------------------------------------------------
# the losses: draw order, sigma distributions, augmentation

def _recording_net(store):
    def net(x, sigma, class_labels=None, augment_labels=None):
        store.update(x=x, sigma=sigma, class_labels=class_labels, augment_labels=augment_labels)
        return torch.zeros_like(x)
    return net


def test_vp_ve_loss_draw_order_and_weight():
    images = torch.randn(6, 3, 4, 4)
    for loss_fn, to_sigma in [(VPLoss(), lambda r: vp_sigma(1 + r * (1e-5 - 1))),
                              (VELoss(), lambda r: 0.02 * (100 / 0.02) ** r)]:
        seen = {}
        torch.manual_seed(3)
        loss = loss_fn(_recording_net(seen), images, "labels")
        torch.manual_seed(3)
        sigma = to_sigma(torch.rand(6, 1, 1, 1))
        noise = torch.randn_like(images) * sigma
        assert torch.equal(seen["sigma"], sigma) and torch.equal(seen["x"], images + noise)
        assert seen["class_labels"] == "labels" and seen["augment_labels"] is None
        assert torch.equal(loss, 1 / sigma**2 * images**2) and loss.shape == images.shape


def test_loss_sigma_ranges():
    torch.manual_seed(0)
    dummy = torch.empty(20000, 1, 1, 1)
    vp = VPLoss().draw_sigma(dummy)
    assert vp.min() >= 2**-10 and vp.max() <= 152.17
    ve = VELoss().draw_sigma(dummy)
    assert ve.min() >= 0.02 and ve.max() <= 100
    ln = EDMLoss().draw_sigma(dummy).log()
    assert abs(ln.mean() + 1.2) < 0.025 and abs(ln.std() - 1.2) < 0.025  # ~3 standard errors at n = 20000


def test_augment_pipe_runs_between_sigma_and_noise():
    images = torch.randn(5, 3, 4, 4)
    labels_aug = torch.randn(5, 9)

    def augment_pipe(x):
        torch.rand(17)  # an augmentation consumes random numbers of its own
        return x.flip(3), labels_aug

    seen = {}
    torch.manual_seed(11)
    loss = EDMLoss()(_recording_net(seen), images, augment_pipe=augment_pipe)
    torch.manual_seed(11)
    sigma = (torch.randn(5, 1, 1, 1) * 1.2 - 1.2).exp()
    torch.rand(17)
    noise = torch.randn_like(images) * sigma
    assert torch.equal(seen["sigma"], sigma) and torch.equal(seen["x"], images.flip(3) + noise)
    assert seen["augment_labels"] is labels_aug
    assert torch.equal(loss, EDMLoss().weight(sigma) * images.flip(3) ** 2)


# ---------------------------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("make,match", [
    (lambda: EDMPrecond(8, 3, sigma_data=0, model_type=FakeModel), "sigma_data"),
    (lambda: EDMPrecond(8, 3, sigma_data=-0.5, model_type=FakeModel), "sigma_data"),
    (lambda: EDMPrecond(8, 3, sigma_min=-1, model_type=FakeModel), "sigma_min"),
    (lambda: VEPrecond(8, 3, sigma_min=5, sigma_max=5, model_type=FakeModel), "sigma_min"),
    (lambda: VEPrecond(8, 3, sigma_min=-0.1, model_type=FakeModel), "sigma_min"),
    (lambda: VPPrecond(8, 3, M=1, model_type=FakeModel), "M"),
    (lambda: iDDPMPrecond(8, 3, M=1, model_type=FakeModel), "M"),
    (lambda: VPPrecond(8, 3, epsilon_t=0, model_type=FakeModel), "epsilon_t"),
    (lambda: EDMPrecond(0, 3, model_type=FakeModel), "img_resolution"),
    (lambda: EDMPrecond(8, 3, label_dim=-1, model_type=FakeModel), "label_dim"),
    (lambda: EDMPrecond(8, 3, model_type="NoSuchNetwork"), "NoSuchNetwork"),
    (lambda: EDMPrecond(8, 3, model_type=42), "model_type"),
    (lambda: EDMLoss(sigma_data=0), "sigma_data"),
    (lambda: EDMLoss(P_std=-1), "P_std"),
    (lambda: VELoss(sigma_min=1, sigma_max=0.5), "sigma_min"),
    (lambda: VPLoss(epsilon_t=2), "epsilon_t"),
])
def test_bad_constructor_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_forward_input():
    net = EDMPrecond(8, 3, label_dim=10, model_type=FakeModel)
    for bad in [torch.randn(2, 3, 8, 4), torch.randn(2, 1, 8, 8), torch.randn(3, 8, 8)]:
        with pytest.raises(ValueError, match=r"\[N, 3, 8, 8\]"):
            net(bad, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"class_labels must have shape \[N, 10\]"):
        net(torch.randn(2, 3, 8, 8), torch.tensor(1.0), torch.zeros(2, 9))
    with pytest.raises(ValueError, match="sigma"):
        net(torch.randn(2, 3, 8, 8), torch.ones(3))
    with pytest.raises(ValueError, match="images"):
        EDMLoss()(net, torch.randn(3, 8, 8))


def test_base_class_is_abstract():
    assert issubclass(EDMPrecond, Precond) and isinstance(EDMPrecond(8, 3, model_type=FakeModel), torch.nn.Module)
    with pytest.raises(NotImplementedError):
        Precond(8, 3, model_type=FakeModel)(torch.randn(1, 3, 8, 8), torch.tensor(1.0))


def test_public_surface():
    """The modules offer the official classes, the VP schedule and the bases; the checks stay internal."""
    import edm_lit.loss as loss
    import edm_lit.precond as precond
    assert set(precond.__all__) == {"Precond", "vp_sigma", "vp_sigma_inv", "VPPrecond", "VEPrecond", "iDDPMPrecond",
                                    "EDMPrecond"}
    assert set(loss.__all__) == {"DenoisingLoss", "VPLoss", "VELoss", "EDMLoss"}


def test_ideal_network_gives_back_the_ideal_denoiser():
    """edm_lit.course.IdealF (Chapter 4 §4.5, used by Chapter 5b): wrapped in EDMPrecond it returns D* of the mixture."""
    import functools

    from edm_lit.course import IdealF
    from edm_lit.framework import toy_image_mixture
    gm = toy_image_mixture()
    net = EDMPrecond(8, 3, sigma_data=gm.data_std, model_type=functools.partial(IdealF, gm, gm.data_std))
    torch.manual_seed(0)
    for sigma in [0.002, 1.0, 80.0]:
        x = gm.sample(16) + sigma * torch.randn(16, *gm.shape, dtype=torch.float64)
        assert rel(net(x.float(), torch.tensor(sigma)), gm.denoise(x.float().double(), sigma)) < 5e-7
