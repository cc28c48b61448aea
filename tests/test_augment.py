"""AugmentPipe (Chapter 6b): parity with the official pipeline, each transformation against an
independent computation, the label layout, p = 0, reproducibility and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from edm_lit.augment import AugmentPipe, affine_2d, mirror_index, rotation_2d, scaling_2d, translation_2d, warp_affine

PAPER = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
ALL_GEOMETRIC = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1,
                     translate_frac=1)
ALL_COLOR = dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def images(n=8, c=3, res=16, seed=0):
    return torch.rand(n, c, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def smooth_images(n=4, c=3, res=32, seed=0):
    coarse = torch.randn(n, c, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(res, res), mode="bicubic", align_corners=False)


def run(seed, x, **kwargs):
    torch.manual_seed(seed)
    return AugmentPipe(**kwargs)(x)


# --- parity with the official implementation -------------------------------------------------------

def test_parity_with_official_pipeline(parity):
    ref = parity("augment_train.pt")
    case = ref["case"]
    assert dict(case["augment_kwargs"]) == PAPER
    out, labels = run(case["torch_manual_seed"], ref["images"], **case["augment_kwargs"])
    assert labels.shape == case["labels"].shape == (8, 9)
    torch.testing.assert_close(labels, case["labels"], rtol=0, atol=1e-6)
    err = (out - case["out"]).abs().max() / case["out"].abs().max()
    assert err <= 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("index", range(4))
def test_parity_beyond_the_paper_setting(parity, index):
    """Every blit, geometric and colour transformation, grey and non-square images (tests/data/README.md)."""
    case = parity("augment_all.pt")["cases"][index]
    out, labels = run(case["torch_manual_seed"], case["images"], **case["augment_kwargs"])
    assert labels.shape == case["labels"].shape
    torch.testing.assert_close(labels, case["labels"], rtol=0, atol=1e-6)
    err = (out - case["out"]).abs().max() / case["out"].abs().max()
    assert err <= 1e-5, f"{case['name']}: relative error {err:.2e}"


def test_parity_draw_order(parity):
    """Our draws, replayed from the seed, are the official draws in the official order."""
    case = parity("augment_train.pt")["case"]
    torch.manual_seed(case["torch_manual_seed"])
    for draw in case["draws"]:
        fn = {"rand": torch.rand, "randn": torch.randn}.get(draw["fn"])
        value = torch.randint(2, draw["shape"]) if draw["fn"] == "randint" else fn(draw["shape"])
        torch.testing.assert_close(value, draw["value"], rtol=0, atol=0)
    # our pipeline consumes exactly that many draws: the generator ends in the same state
    torch.manual_seed(case["torch_manual_seed"])
    AugmentPipe(**case["augment_kwargs"])(torch.zeros(8, 3, 32, 32))
    after_ours = torch.rand(4)
    torch.manual_seed(case["torch_manual_seed"])
    for draw in case["draws"]:
        (torch.randint(2, draw["shape"]) if draw["fn"] == "randint" else getattr(torch, draw["fn"])(draw["shape"]))
    torch.testing.assert_close(after_ours, torch.rand(4), rtol=0, atol=0)


# --- blits: exact against torch primitives ---------------------------------------------------------

@pytest.mark.parametrize("name,dim", [("xflip", 3), ("yflip", 2)])
def test_flips_equal_torch_flip(name, dim):
    x = images(16)
    out, labels = run(1, x, **{name: 1})
    assert labels.shape == (16, 1)
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 16  # both outcomes occur at p = 1 (a fair bit per image)
    assert torch.equal(out[flipped], x[flipped].flip(dim))
    assert torch.equal(out[~flipped], x[~flipped])


def test_rotate_int_equals_rot90():
    x = images(32)
    out, labels = run(2, x, rotate_int=1)
    assert labels.shape == (32, 2)
    gray = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    ks = [gray[tuple(int(v) for v in row)] for row in labels]
    assert set(ks) == {0, 1, 2, 3}
    for i, k in enumerate(ks):
        assert torch.equal(out[i], torch.rot90(x[i], k, (1, 2)))


def test_translate_int_equals_mirrored_roll():
    x = images(16, res=16)
    out, labels = run(3, x, translate_int=1, translate_int_max=0.25)
    shifts = (labels * 16 * 0.25).round().long()
    assert torch.allclose(labels * 4, shifts.float())  # whole pixels
    assert shifts.abs().max() == 4 and (shifts != 0).any()
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i, (dx, dy) in enumerate(shifts.tolist()):
        expected = padded[i, :, 4 + dy:4 + dy + 16, 4 - dx:4 - dx + 16]  # content moves +dx in x, -dy in y
        assert torch.equal(out[i], expected)
        # away from the border it is torch.roll
        m = 4
        rolled = torch.roll(x[i], (-dy, dx), (1, 2))
        assert torch.equal(out[i, :, m:-m, m:-m], rolled[:, m:-m, m:-m])


def test_mirror_index():
    i = torch.arange(-6, 12)
    assert mirror_index(i, 4).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]


# --- the warp -------------------------------------------------------------------------------------

def test_identity_warp_returns_input():
    x = images(4, res=16)
    out = warp_affine(x, torch.eye(3).expand(4, 3, 3))
    assert (out - x).abs().max() < 2e-5


def test_integer_translation_warp_equals_blit():
    """A whole-pixel translation through the resampler is exact and has the blit's mirror border."""
    x = images(2, res=16)
    out = warp_affine(x, translation_2d(torch.tensor([-3.0, 2.0]), torch.tensor([2.0, -1.0])))
    padded = F.pad(x, (8, 8, 8, 8), mode="reflect")
    torch.testing.assert_close(out[0], padded[0, :, 10:26, 5:21], rtol=0, atol=2e-5)
    torch.testing.assert_close(out[1], padded[1, :, 7:23, 10:26], rtol=0, atol=2e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_quarter_turn_warp_close_to_rot90(k):
    """rotation_2d(k pi/2) as the inverse map is rot90(k); not exact (sym6 is only nearly symmetric),
    but within a few percent on a smooth image."""
    x = smooth_images()
    out = warp_affine(x, rotation_2d(torch.full((4,), k * math.pi / 2)))
    err = (out - torch.rot90(x, k, (2, 3))).abs().max() / x.abs().max()
    assert err < 0.05
    other = min((out - torch.rot90(x, j, (2, 3))).abs().max() / x.abs().max() for j in range(4) if j != k)
    assert other > 0.5


def test_scaling_warp_preserves_constant_images():
    x = torch.full((2, 1, 16, 16), 0.7)
    out = warp_affine(x, scaling_2d(torch.tensor([0.8, 1.25]), torch.tensor([0.8, 1.25])))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


# --- geometric transformations: image and label for the replayed parameters -----------------------

def replay(seed, n, layout):
    """Draw in the documented order: per transformation the parameters, then the gate."""
    torch.manual_seed(seed)
    return [getattr(torch, fn)(shape) if fn != "randint" else torch.randint(2, shape) for fn, shape in layout]


def test_scale_label_and_image():
    x = smooth_images(6)
    out, labels = run(5, x, scale=1, scale_std=0.3)
    w, gate = replay(5, 6, [("randn", (6,)), ("rand", (6,))])
    assert (gate < 1).all()
    torch.testing.assert_close(labels[:, 0], w, rtol=0, atol=0)
    s = torch.exp2(w * 0.3)
    torch.testing.assert_close(out, warp_affine(x, scaling_2d(1 / s, 1 / s)), rtol=0, atol=1e-6)


def test_rotate_frac_label_and_image():
    x = smooth_images(6)
    out, labels = run(6, x, rotate_frac=1, rotate_frac_max=0.5)
    u, _ = replay(6, 6, [("rand", (6,)), ("rand", (6,))])
    theta = (u * 2 - 1) * (math.pi * 0.5)
    torch.testing.assert_close(labels, torch.stack([theta.cos() - 1, theta.sin()], 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, warp_affine(x, rotation_2d(theta)), rtol=0, atol=1e-6)


def test_aniso_label_and_image():
    x = smooth_images(8)
    out, labels = run(7, x, aniso=1, aniso_rotate_prob=0.5)
    w, u, gate_w, gate_r = replay(7, 8, [("randn", (8,)), ("rand", (8,)), ("rand", (8,)), ("rand", (8,))])
    phi = torch.where(gate_r < 0.5, (u * 2 - 1) * math.pi, torch.zeros(8))
    assert (phi == 0).any() and (phi != 0).any()
    torch.testing.assert_close(labels, torch.stack([w * phi.cos(), w * phi.sin()], 1), rtol=0, atol=1e-6)
    s = torch.exp2(w * 0.2)
    # scale by s along the direction at angle phi counter-clockwise on screen (x right, y down the rows:
    # the unit vector (cos phi, -sin phi)) and by 1/s across it; the pipeline stores the inverse map
    c, si = phi.cos(), -phi.sin()
    forward = torch.zeros(8, 3, 3)
    forward[:, 0, 0] = s * c * c + si * si / s
    forward[:, 1, 1] = s * si * si + c * c / s
    forward[:, 0, 1] = forward[:, 1, 0] = (s - 1 / s) * c * si
    forward[:, 2, 2] = 1
    torch.testing.assert_close(out, warp_affine(x, torch.linalg.inv(forward)), rtol=0, atol=1e-5)


def test_translate_frac_label_and_image():
    x = smooth_images(4)
    out, labels = run(8, x, translate_frac=1, translate_frac_std=0.1)
    t, _ = replay(8, 4, [("randn", (2, 4)), ("rand", (1, 4))])
    torch.testing.assert_close(labels, t.T, rtol=0, atol=0)
    inverse = translation_2d(-t[0] * 3.2, -t[1] * 3.2)
    torch.testing.assert_close(out, warp_affine(x, inverse), rtol=0, atol=1e-6)


def test_paper_label_layout_and_gates():
    """Paper setting: 9 values [xflip, yflip, scale, cos-1, sin, aniso x2, translate x2]; gated rows are 0."""
    pipe = AugmentPipe(**PAPER)
    assert pipe.augment_dim == 9
    x = images(256, res=8)
    torch.manual_seed(9)
    out, labels = pipe(x)
    assert labels.shape == (256, 9) and labels.dtype == torch.float32
    assert set(labels[:, 0].tolist()) == {0.0, 1.0}
    # each transformation is on for 12% of the images (the y-flip then flips half of those)
    for cols, lo, hi in (([1], 0.01, 0.13), ([2], 0.05, 0.2), ([3, 4], 0.05, 0.2), ([5, 6], 0.05, 0.2),
                         ([7, 8], 0.05, 0.2)):
        frac = (labels[:, cols] != 0).any(1).float().mean().item()
        assert lo < frac < hi, (cols, frac)
    # the label is zero exactly for the identity: those images come back unchanged
    same = (labels[:, 1:] == 0).all(1)
    expected = torch.where(labels[:, 0, None, None, None] == 1, x.flip(3), x)
    assert (out[same] - expected[same]).abs().max() < 2e-5
    assert ((out[~same] - expected[~same]).abs().amax((1, 2, 3)) > 1e-3).all()


# --- colour ----------------------------------------------------------------------------------------

def test_brightness_and_contrast():
    x = images(6)
    out, labels = run(10, x, brightness=1, brightness_std=0.2)
    torch.testing.assert_close(out, x + 0.2 * labels[:, 0, None, None, None], rtol=0, atol=1e-6)
    out, labels = run(11, x, contrast=1, contrast_std=0.5)
    torch.testing.assert_close(out, x * torch.exp2(0.5 * labels[:, 0, None, None, None]), rtol=0, atol=1e-6)


def test_lumaflip_hue_saturation_act_around_the_grey_axis():
    x = images(16)
    mean = x.mean(1, keepdim=True)
    out, labels = run(12, x, lumaflip=1)
    k = labels[:, 0, None, None, None]
    torch.testing.assert_close(out, x - 2 * k * mean, rtol=0, atol=1e-5)  # grey level negated, chroma kept
    out, labels = run(13, x, hue=1)
    assert (labels[:, 1] != 0).all()
    torch.testing.assert_close(out.mean(1), x.mean(1), rtol=0, atol=1e-5)  # rotation about the grey axis
    torch.testing.assert_close((out - out.mean(1, keepdim=True)).norm(dim=1), (x - mean).norm(dim=1),
                               rtol=0, atol=1e-5)
    out, labels = run(14, x, saturation=1)
    s = torch.exp2(labels[:, 0, None, None, None])
    torch.testing.assert_close(out, mean + s * (x - mean), rtol=0, atol=1e-5)


def test_grey_images_take_the_mean_channel():
    x = images(6, c=1)
    out, labels = run(15, x, brightness=1, contrast=1, hue=1)
    x3, _ = run(15, x.expand(6, 3, 16, 16).contiguous(), brightness=1, contrast=1, hue=1)
    torch.testing.assert_close(out, x3.mean(1, keepdim=True), rtol=0, atol=1e-5)


# --- p = 0, reproducibility, sizes, errors ----------------------------------------------------------

def test_p_zero_is_the_identity():
    x = images(8)
    out, labels = run(16, x, p=0, **ALL_GEOMETRIC, **ALL_COLOR)
    assert labels.shape == (8, 19) and (labels == 0).all()
    assert (out - x).abs().max() < 2e-5
    out, labels = run(16, x, p=0, xflip=1, yflip=1, rotate_int=1, translate_int=1)
    assert torch.equal(out, x)  # blits alone move whole pixels: exact


def test_no_transformation_enabled():
    x = images(3)
    out, labels = AugmentPipe()(x)
    assert torch.equal(out, x) and labels.shape == (3, 0)


def test_reproducible_from_seed():
    x = images(8)
    a = run(17, x, **ALL_GEOMETRIC, **ALL_COLOR)
    b = run(17, x, **ALL_GEOMETRIC, **ALL_COLOR)
    c = run(18, x, **ALL_GEOMETRIC, **ALL_COLOR)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_augment_dim_matches_labels():
    for kwargs, dim in [(PAPER, 9), (ALL_GEOMETRIC, 13), ({**ALL_GEOMETRIC, **ALL_COLOR}, 19), ({}, 0)]:
        pipe = AugmentPipe(**kwargs)
        assert pipe.augment_dim == dim
        assert pipe(images(2))[1].shape == (2, dim)


def test_official_defaults():
    pipe = AugmentPipe()
    assert pipe.p == 1 and pipe.translate_int_max == 0.125 and pipe.scale_std == 0.2
    assert pipe.rotate_frac_max == 1 and pipe.aniso_std == 0.2 and pipe.aniso_rotate_prob == 0.5
    assert pipe.translate_frac_std == 0.125 and pipe.brightness_std == 0.2 and pipe.contrast_std == 0.5
    assert pipe.hue_max == 1 and pipe.saturation_std == 1 and pipe.enabled() == []


@pytest.mark.parametrize("kwargs,match", [({"p": -0.1}, "p must"), ({"xflip": float("nan")}, "xflip must"),
                                          ({"scale_std": "big"}, "scale_std must")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentPipe(**kwargs)


def test_bad_images():
    with pytest.raises(ValueError, match="images must"):
        AugmentPipe(xflip=1)(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="square"):
        AugmentPipe(rotate_int=1)(torch.zeros(1, 3, 8, 16))
    with pytest.raises(ValueError, match="channels"):
        AugmentPipe(brightness=1)(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="affine_2d needs"):
        affine_2d(1.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="inverse must"):
        warp_affine(torch.zeros(2, 3, 8, 8), torch.eye(3).expand(3, 3, 3))


def test_pipe_in_the_loss_feeds_the_network_augment_labels():
    """EDMLoss(net, images, augment_pipe=pipe) hands the pipe's labels to a network with augment_dim = 9."""
    from edm_lit.loss import EDMLoss
    from edm_lit.precond import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, augment_dim=9, model_type="SongUNet", model_channels=16,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[])
    seen = []
    net.model.map_augment.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    loss = EDMLoss()(net, images(4, res=8), augment_pipe=AugmentPipe(**PAPER))
    assert loss.shape == (4, 3, 8, 8) and torch.isfinite(loss).all()
    assert len(seen) == 1 and seen[0].shape == (4, 9)


def test_pipeline_never_reads_values_back_from_the_device(monkeypatch):
    """No .item(), .tolist(), bool(), int() or float() of a tensor and no tensor built from host
    data per call: on a GPU each would make the training step wait for the device. Checked on the
    CPU by making them fail after a first call (which copies the small constants once)."""
    pipe = AugmentPipe(**ALL_GEOMETRIC, **ALL_COLOR)
    x = images(4, res=16)
    torch.manual_seed(19)
    expected = pipe(x)

    def refuse(*args, **kwargs):
        raise AssertionError("the augment pipe read a value back from the device")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "tensor", refuse)
    torch.manual_seed(19)
    out, labels = pipe(x)
    monkeypatch.undo()
    assert torch.equal(out, expected[0]) and torch.equal(labels, expected[1])
