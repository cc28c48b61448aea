"""Chapter 5 (edm_lit.networks): parity with the official networks, key names, parameter counts, precision."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from edm_lit.networks import (Conv2d, DhariwalUNet, FourierEmbedding, Linear, PositionalEmbedding, SongUNet,
                              UNetBlock, attention, weight_init)
from edm_lit.networks import _decoder_roles, _Level, _level_key, _unet_levels  # internal: the level table
from edm_lit.precond import EDMPrecond
from helpers import rel_err


@pytest.fixture(scope="module")
def small(ref):
    """The official DDPM++ parity network rebuilt with our SongUNet and its official weights."""
    kwargs = {k: v for k, v in ref["kwargs"].items() if k not in ("img_channels", "model_type")}
    net = SongUNet(in_channels=3, out_channels=3, **kwargs).eval()
    net.load_state_dict({k.removeprefix("model."): v for k, v in ref["state_dict"].items()}, strict=True)
    return net


def model_args(ref):
    return ref["model_in_x"], ref["model_in_noise_labels"], ref["model_in_class_labels"]


def test_songunet_matches_official(small, ref):
    with torch.no_grad():
        assert rel_err(small(*model_args(ref)), ref["model_out"]) <= 1e-5
        out = small(*model_args(ref), augment_labels=ref["augment_labels"])
        assert rel_err(out, ref["model_out_with_augment_labels"]) <= 1e-5
    assert sum(p.numel() for p in small.parameters()) == ref["num_params"]
    assert list(small.state_dict()) == [k.removeprefix("model.") for k in ref["state_dict"]]  # same keys, same order


def test_edmprecond_matches_official(ref):
    net = EDMPrecond(**ref["kwargs"]).eval()
    net.load_state_dict(ref["state_dict"], strict=True)
    assert (net.sigma_min, net.sigma_max) == (ref["sigma_min_attr"], ref["sigma_max_attr"])
    with torch.no_grad():
        assert rel_err(net(ref["x"], ref["sigma"], ref["class_labels"]), ref["out"]) <= 1e-5
        assert rel_err(net(ref["x"], ref["sigma"], None), ref["out_class_labels_none"]) <= 1e-5
        out = net(ref["x"], ref["sigma"], ref["class_labels"], augment_labels=ref["augment_labels"])
        assert rel_err(out, ref["out_with_augment_labels"]) <= 1e-5


CIFAR = dict(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, model_channels=128, channel_mult=[2, 2, 2],
             dropout=0.13, model_type="SongUNet")
PAPER = {
    "ddpmpp": (dict(CIFAR, embedding_type="positional", encoder_type="standard", decoder_type="standard",
                    channel_mult_noise=1, resample_filter=[1, 1]), 55_735_299),
    "ncsnpp": (dict(CIFAR, embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                    channel_mult_noise=2, resample_filter=[1, 3, 3, 1]), 56_400_643),
    "adm": (dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=192,
                 channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10), 295_899_267),
}


def meta_net(kwargs):
    with torch.device("meta"):
        return EDMPrecond(**kwargs)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_parameter_counts(name):
    kwargs, official = PAPER[name]
    assert sum(p.numel() for p in meta_net(kwargs).parameters()) == official


def test_adm_key_names():
    keys = {k: tuple(v.shape) for k, v in meta_net(PAPER["adm"][0]).state_dict().items()}
    assert keys["model.map_label.weight"] == (768, 1000) and "model.map_label.bias" not in keys
    assert "model.map_augment.weight" not in keys  # augment_dim = 0
    assert keys["model.enc.32x32_down.conv0.resample_filter"] == (1, 1, 2, 2)
    assert keys["model.enc.32x32_down.skip.resample_filter"] == (1, 1, 2, 2)
    assert "model.enc.32x32_down.skip.weight" not in keys  # same channels: a pure resampler on the skip path
    assert keys["model.enc.8x8_block2.qkv.weight"] == (3 * 768, 768, 1, 1)
    assert keys["model.dec.64x64_block3.conv0.weight"] == (192, 384, 3, 3)
    assert keys["model.out_conv.weight"] == (3, 192, 3, 3) and keys["model.out_norm.bias"] == (192,)
    assert not any(k.startswith("model.enc.64x64_block0.qkv") for k in keys)
    blocks = {k.split(".")[2] for k in keys if k.startswith("model.dec.")}
    assert blocks == ({f"{r}x{r}_{b}" for r in (64, 32, 16) for b in ["up", "block0", "block1", "block2", "block3"]}
                      | {"8x8_in0", "8x8_in1"} | {f"8x8_block{i}" for i in range(4)})


def test_ncsnpp_keys_and_forward():
    torch.manual_seed(0)
    net = SongUNet(16, 3, 3, label_dim=0, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8],
                   embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])
    sd = net.state_dict()
    assert sd["map_noise.freqs"].shape == (16,)  # a persistent buffer, as in the official checkpoints
    assert sd["enc.8x8_aux_residual.resample_filter"].shape == (1, 1, 4, 4)
    assert sd["enc.8x8_aux_residual.weight"].shape == (16, 3, 3, 3)  # the image path: 3 -> 16 channels
    assert sd["enc.4x4_aux_residual.weight"].shape == (32, 16, 3, 3)
    out = net(torch.randn(2, 3, 16, 16), torch.randn(2), None)
    # the output layer's weights are initialised at 1e-5 of the usual scale: max |out| measured 3e-5 (seeds 0-5: <4e-5)
    assert out.shape == (2, 3, 16, 16) and 1e-6 < out.abs().max() < 1e-4


@pytest.mark.parametrize("encoder_type,decoder_type", [("skip", "skip"), ("standard", "skip"), ("skip", "standard")])
def test_progressive_variants_run(encoder_type, decoder_type):
    net = SongUNet(16, 3, 3, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[],
                   encoder_type=encoder_type, decoder_type=decoder_type)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    net(x, torch.randn(2), None).square().sum().backward()
    assert x.grad.shape == x.shape


def test_fresh_adm_output_is_zero_and_gradients_flow():
    net = DhariwalUNet(16, 3, 3, label_dim=4, augment_dim=2, model_channels=64, channel_mult=[1, 2], num_blocks=1,
                       attn_resolutions=[8])
    x, labels = torch.randn(2, 3, 16, 16), torch.eye(4)[:2]
    out = net(x, torch.randn(2), labels, augment_labels=torch.randn(2, 2))
    assert torch.equal(out, torch.zeros_like(out))  # ADM zero-initialises its output layers
    out.sum().backward()
    assert net.out_conv.weight.grad.abs().sum() > 0


def test_all_parameters_get_gradients(small):
    net = SongUNet(**small.init_kwargs).train()
    with torch.no_grad():  # make the output layers non-zero so that gradients reach everything
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = net(torch.randn(2, 3, 16, 16), torch.randn(2), torch.eye(10)[:2], augment_labels=torch.randn(2, 9))
    out.square().sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


def test_label_dropout_and_required_labels():
    kw = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=5, model_channels=16, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[], dropout=0)
    for cls in (SongUNet, DhariwalUNet):
        kw_ = dict(kw, **({"model_channels": 64} if cls is DhariwalUNet else {}))
        net = cls(**kw_, label_dropout=1.0).train()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
        x, noise = torch.randn(2, 3, 8, 8), torch.randn(2)
        dropped = net(x, noise, torch.eye(5)[:2])
        assert torch.allclose(dropped, net(x, noise, torch.zeros(2, 5)))
        with pytest.raises(ValueError, match="class_labels are required"):
            net(x, noise, None)


def test_bad_arguments():
    for bad in [dict(embedding_type="sinusoidal"), dict(encoder_type="fancy"), dict(decoder_type="residual")]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SongUNet(16, 3, 3, model_channels=16, **bad)
    with pytest.raises(ValueError, match="img_resolution"):
        SongUNet(12, 3, 3, model_channels=16, channel_mult=[1, 2, 2, 2])
    with pytest.raises(ValueError, match="exclusive"):
        Conv2d(4, 4, 3, up=True, down=True)
    with pytest.raises(ValueError, match="init mode"):
        weight_init([3], "he_normal", 3, 3)


@pytest.mark.parametrize("mode", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"])
def test_weight_init_variance(mode):
    torch.manual_seed(0)
    w = weight_init([500, 400], mode, fan_in=200, fan_out=600)
    fan = 200 if mode.startswith("kaiming") else 400
    assert abs(w.var().item() * fan - 1) < 0.02
    if mode.endswith("uniform"):
        assert w.abs().max() <= math.sqrt(3 / fan)


def test_layers_basic():
    lin = Linear(4, 3, init_bias=1)
    x = torch.randn(5, 4)
    assert torch.allclose(lin(x), x @ lin.weight.T + lin.bias)
    assert Linear(4, 3).bias.abs().sum() == 0  # default init_bias = 0
    pe = PositionalEmbedding(8, endpoint=True)(torch.tensor([0.0, 1.0]))
    assert torch.allclose(pe[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(pe[1, [0, 3, 4, 7]], torch.tensor([math.cos(1), math.cos(1e-4), math.sin(1), math.sin(1e-4)]))
    fe = FourierEmbedding(8)
    assert fe(torch.zeros(3)).shape == (3, 8) and "freqs" in fe.state_dict()


@pytest.mark.parametrize("filt", [[1, 1], [1, 3, 3, 1]])
@pytest.mark.parametrize("fused", [False, True])
def test_resampling_paths(filt, fused):
    """The box shortcut equals the grouped convolution, and a loaded non-box filter switches it off."""
    x = torch.randn(2, 4, 8, 8)
    for up in (False, True):
        conv = Conv2d(4, 6, kernel=3, up=up, down=not up, resample_filter=filt, fused_resample=fused)
        fast = conv(x)
        assert fast.shape == ((2, 6, 16, 16) if up else (2, 6, 4, 4))
        conv._box = False
        assert torch.allclose(fast, conv(x), atol=1e-5)
    box = Conv2d(4, 4, kernel=0, down=True)
    assert box._box
    state = box.state_dict()
    state["resample_filter"] = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]])
    box.load_state_dict(state)
    assert not box._box
    assert torch.allclose(box(x), torch.nn.functional.conv2d(x, state["resample_filter"].tile(4, 1, 1, 1), groups=4,
                                                             stride=2))


def upsample_full(x, taps):
    """Zero-stuffed 2x up-sampling convolved with the 2-D filter (outer product of taps, times 4 / sum^2), every
    output pixel the filter touches kept: (2H + K - 2) pixels a side. Written with explicit loops over the taps."""
    f = torch.tensor(taps, dtype=x.dtype)
    f2 = torch.outer(f, f) * 4 / f.sum() ** 2
    N, C, H, W = x.shape
    K = len(taps)
    out = torch.zeros(N, C, 2 * H + K - 2, 2 * W + K - 2, dtype=x.dtype)
    for i in range(K):
        for j in range(K):
            out[:, :, i:i + 2 * H:2, j:j + 2 * W:2] += f2[i, j] * x
    return out


@pytest.mark.parametrize("taps", [[1, 1], [1, 3, 3, 1]])
def test_fused_upsampling_is_upsample_then_convolve(taps):
    """Fused up-sampling = the full up-sampled image, trimmed (or zero-padded) to 2H + kernel - 1, then a valid
    convolution: an output of exactly 2H x 2W."""
    torch.manual_seed(0)
    conv = Conv2d(4, 6, kernel=3, up=True, resample_filter=taps, fused_resample=True, init_bias=1)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    u = upsample_full(x, taps)
    border = (len(taps) - 2) // 2 - 1  # pixels of u beyond what a 3x3 'same' convolution of a 16x16 image reads
    if border >= 0:
        u = u[:, :, border:u.shape[2] - border, border:u.shape[3] - border]
    else:
        u = torch.nn.functional.pad(u, [-border] * 4)
    expected = torch.nn.functional.conv2d(u, conv.weight.double(), conv.bias.double())
    out = conv(x)
    assert out.shape == expected.shape == (2, 6, 16, 16)
    assert torch.allclose(out, expected, atol=1e-12)


def test_fused_resampling_matches_official(parity):
    ref = parity("network_refs.pt")["fused_conv"]
    for case in ref["cases"]:
        conv = Conv2d(4, 6, kernel=3, up=case["up"], down=not case["up"], resample_filter=case["resample_filter"],
                      fused_resample=True)
        conv.load_state_dict({"weight": case["weight"], "bias": case["bias"],
                              "resample_filter": conv.resample_filter}, strict=True)
        with torch.no_grad():
            out = conv(ref["x"])
        assert out.shape == case["out"].shape
        assert rel_err(out, case["out"]) <= 1e-5


def _refs_script():
    """book/data/make_network_refs.py, the script that made the reference file (its helpers, not its main)."""
    path = Path(__file__).parents[1] / "book" / "data" / "make_network_refs.py"
    spec = importlib.util.spec_from_file_location("make_network_refs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_state():
    return _refs_script().random_state


@pytest.mark.parametrize("name", ["ncsnpp", "songunet_skip", "adm"])
def test_network_outputs_match_official(parity, name):
    """NCSN++, the progressive SongUNet variants and ADM, with seeded random weights, against the official outputs."""
    ref = parity("network_refs.pt")[name]
    params = _random_state()(ref["param_shapes"], ref["seed"])
    for key, value in params.items():  # the same weights as the official run had (same RNG stream)
        assert math.isclose(value.double().sum().item(), ref["param_sums"][key], rel_tol=1e-9, abs_tol=1e-9), key
    net = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[ref["class_name"]](**ref["kwargs"]).eval()
    assert list(net.state_dict()) == ref["state_dict_keys"]
    assert sum(p.numel() for p in net.parameters()) == ref["num_params"]
    net.load_state_dict({**params, **ref["buffers"]}, strict=True)
    with torch.no_grad():
        assert rel_err(net(ref["x"], ref["noise_labels"], ref["class_labels"]), ref["out"]) <= 1e-5
        if "augment_labels" in ref:
            out = net(ref["x"], ref["noise_labels"], ref["class_labels"], augment_labels=ref["augment_labels"])
            assert rel_err(out, ref["out_with_augment_labels"]) <= 1e-5


@pytest.mark.parametrize("name", ["ddpmpp", "ncsnpp", "songunet_skip", "adm"])
def test_initialisation_draws_in_official_order(parity, name):
    """After torch.manual_seed(0) our constructors give the official initial weights: the same random numbers drawn
    in the same order, so a seeded training run starts where the official one does. Per state_dict entry the float64
    sum and the first values equal those of the official network (init_fingerprint of make_network_refs.py)."""
    ref = parity("network_refs.pt")["init"][name]
    torch.manual_seed(ref["seed"])
    net = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[ref["class_name"]](**ref["kwargs"])
    ours = _refs_script().init_fingerprint(net.state_dict())
    assert ours["keys"] == ref["keys"]
    assert torch.equal(ours["heads"].nan_to_num(7.0), ref["heads"].nan_to_num(7.0))  # bit for bit
    assert torch.allclose(ours["sums"], ref["sums"], rtol=1e-12, atol=1e-12)


def test_attention_matches_formula():
    qkv = torch.randn(3, 3 * 12, 4, 4)
    heads, c = 3, 4
    q, k, v = qkv.reshape(3 * heads, c, 3, 16).unbind(2)
    w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(c), dim=2)
    assert torch.allclose(attention(qkv, heads), torch.einsum("nqk,nck->ncq", w, v).reshape(3, 12, 4, 4), atol=1e-6)


def test_unet_block_zero_init_is_skip():
    block = UNetBlock(8, 16, emb_channels=4, up=True, attention=True, num_heads=2)
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(block(x, torch.randn(2, 4)), block.skip(x), atol=1e-6)


def test_reduced_precision_close_to_float32(small, ref):
    args = model_args(ref)
    with torch.no_grad():
        out32 = small(*args)
        out16 = small(args[0].half(), *args[1:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outbf = small(*args)
    assert out16.dtype == torch.float16 and rel_err(out16, out32) < 5e-3
    assert outbf.dtype == torch.bfloat16 and rel_err(outbf, out32) < 5e-2
    net = SongUNet(**small.init_kwargs).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(*args).float().square().mean()
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())


def test_init_kwargs_rebuild(small):
    twin = SongUNet(**small.init_kwargs)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    assert small.init_kwargs["channel_mult"] == [1, 2] and "self" not in small.init_kwargs


def test_level_table_and_naming_rule():
    levels = _unet_levels(64, 192, [1, 2, 3, 4], 3, [32, 16, 8])
    assert levels[1] == _Level(index=1, resolution=32, channels=384, num_blocks=3, attention=True)
    assert [lv.attention for lv in levels] == [False, True, True, True]
    assert _level_key(levels[2], "block0") == "16x16_block0"
    assert _decoder_roles(levels[3], levels) == (["in0", "in1"], ["block0", "block1", "block2", "block3"])
    assert _decoder_roles(levels[0], levels)[0] == ["up"]
    net = DhariwalUNet(16, 3, 3, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    assert net.levels == _unet_levels(16, 32, [1, 2], 1, [8])
    with pytest.raises(ValueError, match="channel_mult"):
        _unet_levels(16, 32, [], 1, [])


def test_public_surface():
    """The level-table plumbing is internal: the module offers layers and the two architectures."""
    import edm_lit.networks as networks
    assert set(networks.__all__) == {"INIT_MODES", "weight_init", "Linear", "Conv2d", "GroupNorm", "attention",
                                     "PositionalEmbedding", "FourierEmbedding", "UNetBlock", "SongUNet",
                                     "DhariwalUNet"}
