"""Make book/data/network_refs.pt: outputs of the official EDM networks for small configurations.

Usage: python book/data/make_network_refs.py PATH_TO_OFFICIAL_EDM_CHECKOUT [OUTPUT_FILE]

The official code (NVlabs/edm, CC BY-NC-SA) is imported from the path given, never copied. The official
initialisation zeroes the output layers, which would make a trivial reference, so every parameter is set by
`random_state(shapes, seed)` below. The file stores only what that function needs (each parameter's name and
shape) plus the buffers, the inputs and the outputs, so it stays small; `tests/test_networks.py` rebuilds the
same weights with the same function and loads them into our networks with `strict=True`. Plain tensors,
numbers, strings and lists only: `torch.load(path, weights_only=True)`.

`init` holds a fingerprint of each network's *own* initialisation after `torch.manual_seed(0)` (DDPM++, NCSN++,
the progressive variants and ADM): per state_dict entry the float64 sum of its values and its first
INIT_HEAD values (`init_fingerprint`). Equal fingerprints mean our constructors draw the same random numbers in
the same order as the official ones.
"""
import sys
from pathlib import Path

import torch

CASES = {
    # NCSN++ with the settings of the official train.py (--arch=ncsnpp), at toy size
    "ncsnpp": ("SongUNet", dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, augment_dim=9,
                                model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8],
                                dropout=0.0, embedding_type="fourier", channel_mult_noise=2,
                                encoder_type="residual", decoder_type="standard", resample_filter=[1, 3, 3, 1])),
    # the progressive-growing variants of the original code (no configuration of the paper uses them)
    "songunet_skip": ("SongUNet", dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=16,
                                       channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
                                       encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1])),
    # ADM: attention at every level, with 0 heads (32 channels < 64 per head), 1 head and 2 heads
    "adm": ("DhariwalUNet", dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=4, augment_dim=2,
                                 model_channels=32, channel_mult=[1, 2, 4], num_blocks=1, attn_resolutions=[16, 8, 4],
                                 dropout=0.0)),
}


# initialisation order: DDPM++ as the official train.py builds it (--arch=ddpmpp), at toy size, plus the cases above
INIT_CASES = {
    "ddpmpp": ("SongUNet", dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, augment_dim=9,
                                model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8],
                                dropout=0.0)),
    **CASES,
}
INIT_SEED, INIT_HEAD = 0, 4


def init_fingerprint(state: dict) -> dict:
    """A freshly initialised state_dict in brief: its keys, the float64 sum of each entry's values ([n]) and each
    entry's first INIT_HEAD values ([n, INIT_HEAD], NaN where an entry has fewer)."""
    heads = torch.full([len(state), INIT_HEAD], float("nan"))
    for row, value in zip(heads, state.values()):
        first = value.detach().flatten()[:INIT_HEAD].float()
        row[:len(first)] = first
    return {"keys": list(state), "sums": torch.tensor([v.double().sum().item() for v in state.values()],
                                                       dtype=torch.float64), "heads": heads}


def random_state(shapes: dict, seed: int) -> dict:
    """Parameters by name: kernels and matrices ~ N(0, 1/fan_in); normalisation gains 1 + N(0, 0.2^2); else N(0, 0.2^2)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        shape = list(shapes[name])
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if len(shape) >= 2:
            state[name] = noise / (noise[0].numel() ** 0.5)
        else:
            is_gain = "norm" in name.split(".")[-2] and name.endswith(".weight")
            state[name] = 0.2 * noise + (1.0 if is_gain else 0.0)
    return state


def main(official: str, out_path: str) -> None:
    sys.path.insert(0, official)
    from training import networks  # noqa: E402  (the official module, from the path given)

    torch.set_num_threads(1)
    refs = {"torch_version": str(torch.__version__), "official_commit": "008a4e5"}
    for index, (name, (class_name, kwargs)) in enumerate(CASES.items()):
        torch.manual_seed(index)
        net = getattr(networks, class_name)(**kwargs).eval()
        shapes = {k: list(p.shape) for k, p in net.named_parameters()}
        seed = 100 + index
        params = random_state(shapes, seed)
        buffers = {k: b for k, b in net.state_dict().items() if k not in shapes}
        net.load_state_dict({**params, **buffers}, strict=True)
        gen = torch.Generator().manual_seed(200 + index)
        n, res, label_dim = 4, kwargs["img_resolution"], kwargs.get("label_dim", 0)
        x = torch.randn(n, kwargs["in_channels"], res, res, generator=gen)
        noise_labels = torch.log(torch.tensor([0.002, 0.3, 2.5, 80.0])) / 4  # EDM's c_noise = ln(sigma) / 4
        class_labels = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
        case = {"class_name": class_name, "kwargs": kwargs, "seed": seed, "param_shapes": shapes,
                "param_sums": {k: v.double().sum().item() for k, v in params.items()}, "buffers": buffers,
                "state_dict_keys": list(net.state_dict()), "num_params": sum(p.numel() for p in net.parameters()),
                "x": x, "noise_labels": noise_labels, "class_labels": class_labels}
        with torch.no_grad():
            case["out"] = net(x, noise_labels, class_labels)
            if kwargs.get("augment_dim"):
                case["augment_labels"] = torch.randn(n, kwargs["augment_dim"], generator=gen)
                case["out_with_augment_labels"] = net(x, noise_labels, class_labels, case["augment_labels"])
        refs[name] = case

    refs["init"] = {}
    for name, (class_name, kwargs) in INIT_CASES.items():
        torch.manual_seed(INIT_SEED)
        net = getattr(networks, class_name)(**kwargs)
        refs["init"][name] = {"class_name": class_name, "kwargs": kwargs, "seed": INIT_SEED,
                              **init_fingerprint(net.state_dict())}

    # one Conv2d with fused resampling per direction and filter of the paper: output shapes and values
    gen = torch.Generator().manual_seed(300)
    refs["fused_conv"] = {"x": torch.randn(2, 4, 8, 8, generator=gen), "cases": []}
    for up in (True, False):
        for filt in ([1, 1], [1, 3, 3, 1]):
            torch.manual_seed(0)
            conv = networks.Conv2d(4, 6, kernel=3, up=up, down=not up, resample_filter=filt, fused_resample=True,
                                   init_bias=1)
            with torch.no_grad():
                refs["fused_conv"]["cases"].append({"up": up, "resample_filter": filt, "weight": conv.weight.clone(),
                                                    "bias": conv.bias.clone(), "out": conv(refs["fused_conv"]["x"])})
    torch.save(refs, out_path)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else str(Path(__file__).with_name("network_refs.pt")))
