# ---
# jupyter:
#   edm_lit:
#     export: fid
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
# # A6b. FID at scale: the engineering
#
# The FID half of Appendix A6, all of it in `edm_lit.fid`: the Inception-v3 port whose
# features Chapter 8.4 chooses, layer by layer (A6b.1); its weights file — where it is
# found, its size and SHA-256 (A6b.2); reference files — the official layout, the record
# of the feature network that made them, and the defences of the reader (A6b.3); and the
# image sets that `fid ref` and `fid calc` read (A6b.4). Chapter 8 uses all of them through
# `fid_ref` and `fid_calc`; the command line is Appendix A1.3.

# %%
import io
import os
import re
import tempfile
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from edm_lit.files import write_png

torch.set_num_threads(1)  # small tensors: one thread is fastest
WORK = Path(tempfile.mkdtemp(prefix="edm_lit_A6b_"))

# %% [markdown]
# ## A6b.1 The Inception-v3 port, layer by layer
#
# Chapter 8.4 says which network the FID features come from and why we write it ourselves:
# the Inception-v3 graph of 2015-12-05 with the parameter names of the `pytorch-fid` port,
# so that its published weights load with `torch.load(weights_only=True)`. The network,
# block by block (every convolution is followed by batch normalisation with
# $\epsilon = 10^{-3}$ and a ReLU; a "Mixed" block runs parallel branches and concatenates
# them):
#
# | block | input → output | what it does |
# |---|---|---|
# | stem | 3×299² → 192×35² | five convolutions (3×3 stride 2, 3×3, 3×3, 1×1, 3×3), two 3×3 stride-2 max pools |
# | Mixed_5b, 5c, 5d | 192/256/288 → 256/288/288, 35² | 1×1; 5×5; two 3×3; avg-pool + 1×1 |
# | Mixed_6a | 288 → 768, 17² | stride-2 reduction: 3×3; two 3×3; max pool |
# | Mixed_6b–6e | 768 → 768, 17² | factorised 7×7: 1×7 and 7×1 convolutions |
# | Mixed_7a | 768 → 1280, 8² | stride-2 reduction |
# | Mixed_7b, 7c | 1280/2048 → 2048, 8² | branches that split into parallel 1×3 and 3×1 |
# | pool | 2048×8² → 2048 | global average: **the FID features** |
#
# Two details of the 2015 graph differ from the textbook Inception and matter for the
# numbers: its average pools ignore the zero padding (`count_include_pad=False`), and the
# pool branch of the last block (Mixed_7c) uses a **max** pool. A branch is written as
# (pool, chain, fork): an optional pool, a chain of convolutions, and optionally a fork
# into two convolutions whose outputs are concatenated.

# %% tags=["export"]
import torch
import torch.nn.functional as F


class _ConvBN(torch.nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU: Inception-v3's unit."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding,
                                    bias=False)
        self.bn = torch.nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool(x, kind):
    if kind == "avg":  # the 2015 graph averages over the valid pixels only
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    if kind == "max/2":
        return F.max_pool2d(x, 3, stride=2)
    return x


class _Mixed(torch.nn.Module):
    """Parallel branches (pool, chain, fork), concatenated along channels."""

    def __init__(self, branches):
        super().__init__()
        self.plan = []
        for pool, chain, fork in branches:
            for name, *shape in chain + fork:
                self.add_module(name, _ConvBN(*shape))
            self.plan.append((pool, [c[0] for c in chain], [f[0] for f in fork]))

    def forward(self, x):
        outputs = []
        for pool, chain, fork in self.plan:
            y = _pool(x, pool)
            for name in chain:
                y = self._modules[name](y)
            if fork:
                y = torch.cat([self._modules[name](y) for name in fork], 1)
            outputs.append(y)
        return torch.cat(outputs, 1)


# %% [markdown]
# The blocks of each kind differ only in their widths; `(1, 7)` and `(7, 1)` are the
# factorised convolutions, with the padding that keeps the size.

# %% tags=["export"]
_ROW7, _COL7 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
_ROW3, _COL3 = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))


def _block_a(cin, pool_features):  # Mixed_5b, 5c, 5d
    return _Mixed([
        (None, [("branch1x1", cin, 64, 1)], []),
        (None, [("branch5x5_1", cin, 48, 1), ("branch5x5_2", 48, 64, 5, 1, 2)], []),
        (None, [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1),
                ("branch3x3dbl_3", 96, 96, 3, 1, 1)], []),
        ("avg", [("branch_pool", cin, pool_features, 1)], [])])


def _block_c(c7):  # Mixed_6b to 6e
    return _Mixed([
        (None, [("branch1x1", 768, 192, 1)], []),
        (None, [("branch7x7_1", 768, c7, 1), ("branch7x7_2", c7, c7, *_ROW7),
                ("branch7x7_3", c7, 192, *_COL7)], []),
        (None, [("branch7x7dbl_1", 768, c7, 1), ("branch7x7dbl_2", c7, c7, *_COL7),
                ("branch7x7dbl_3", c7, c7, *_ROW7), ("branch7x7dbl_4", c7, c7, *_COL7),
                ("branch7x7dbl_5", c7, 192, *_ROW7)], []),
        ("avg", [("branch_pool", 768, 192, 1)], [])])


def _block_e(cin, pool):  # Mixed_7b, 7c
    fork2 = [("branch3x3_2a", 384, 384, *_ROW3), ("branch3x3_2b", 384, 384, *_COL3)]
    fork3 = [("branch3x3dbl_3a", 384, 384, *_ROW3),
             ("branch3x3dbl_3b", 384, 384, *_COL3)]
    return _Mixed([
        (None, [("branch1x1", cin, 320, 1)], []),
        (None, [("branch3x3_1", cin, 384, 1)], fork2),
        (None, [("branch3x3dbl_1", cin, 448, 1), ("branch3x3dbl_2", 448, 384, 3, 1, 1)],
         fork3),
        (pool, [("branch_pool", cin, 192, 1)], [])])


def _reduction_6a():
    return _Mixed([
        (None, [("branch3x3", 288, 384, 3, 2)], []),
        (None, [("branch3x3dbl_1", 288, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1),
                ("branch3x3dbl_3", 96, 96, 3, 2)], []),
        ("max/2", [], [])])


def _reduction_7a():
    return _Mixed([
        (None, [("branch3x3_1", 768, 192, 1), ("branch3x3_2", 192, 320, 3, 2)], []),
        (None, [("branch7x7x3_1", 768, 192, 1), ("branch7x7x3_2", 192, 192, *_ROW7),
                ("branch7x7x3_3", 192, 192, *_COL7), ("branch7x7x3_4", 192, 192, 3, 2)],
         []),
        ("max/2", [], [])])


# %% [markdown]
# The whole network: the stem, the eleven Mixed blocks, the average over the 8×8 map. The
# classifier layer (1008 classes) is kept so that the published file loads strictly, but is
# not used. Images enter as uint8 in $[0, 255]$, grey ones repeated to three channels,
# resized to 299×299 with PyTorch's bilinear filter and mapped to $[-1, 1]$.

# %% tags=["export"]
INCEPTION_RESOLUTION = 299
INCEPTION_FEATURES = 2048
_MIXED = ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")


class InceptionV3Features(torch.nn.Module):
    """The 2015-12-05 Inception-v3 graph (pytorch-fid's parameter names): uint8
    images -> 2048-d pool features. Appendix A6b.1."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = _block_a(192, 32), _block_a(256, 64)
        self.Mixed_5d, self.Mixed_6a = _block_a(288, 64), _reduction_6a()
        self.Mixed_6b, self.Mixed_6c = _block_c(128), _block_c(160)
        self.Mixed_6d, self.Mixed_6e = _block_c(160), _block_c(192)
        self.Mixed_7a = _reduction_7a()
        self.Mixed_7b, self.Mixed_7c = _block_e(1280, "avg"), _block_e(2048, "max")
        self.fc = torch.nn.Linear(INCEPTION_FEATURES, 1008)  # unused for FID

    def forward(self, images):
        """uint8 (or float in [0, 255]) [N, 1 or 3, H, W] -> float32 [N, 2048]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, 1 or 3, H, W], got shape "
                             f"{list(images.shape)}")
        x = images.to(torch.float32).expand(-1, 3, -1, -1) / 255
        size = (INCEPTION_RESOLUTION,) * 2
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in _MIXED:
            x = self._modules["Mixed_" + name](x)
        return x.mean(dim=(2, 3))


# %% [markdown]
# **Check** — with random weights (the published ones are a download) the network has the
# published layout: 2048 features for any input size, non-negative (a ReLU, then an
# average), grey images equal to their three-channel repeat, and the parameter names and
# shapes of the `pytorch-fid` file.

# %% tags=["hide-input"]
inception = InceptionV3Features().eval()
keys = inception.state_dict()
n_params = sum(p.numel() for p in inception.parameters())
with torch.no_grad():
    feats = inception(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    grey = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(inception(grey), inception(grey.expand(-1, 3, -1, -1)))
print(f"{n_params:,} parameters, {len(keys)} tensors; features {list(feats.shape)}")
assert feats.shape == (2, 2048) and (feats >= 0).all()
assert {"Conv2d_1a_3x3.conv.weight", "Mixed_6e.branch7x7dbl_5.bn.running_mean",
        "Mixed_7c.branch3x3dbl_3b.bn.running_var", "fc.weight"} <= set(keys)
assert keys["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
assert keys["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)

# %% [markdown]
# **Look** — what the port does to an image: every image is resized to 299×299, and the
# blocks trade resolution for channels until 2,048 channels of 8×8 remain, which the final
# average turns into the feature vector. Measured with forward hooks on the network above:

# %%
import matplotlib.pyplot as plt

blocks = [n for n, _ in inception.named_children() if n != "fc"]
shapes = {}


def record(name):
    def hook(module, args, out):  # returns None: the output is kept as it is
        shapes[name] = tuple(out.shape[1:])
    return hook


hooks = [getattr(inception, n).register_forward_hook(record(n)) for n in blocks]
with torch.no_grad():
    inception(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
for hook in hooks:
    hook.remove()
names = [n for n in blocks if n in shapes]
fig, ax = plt.subplots(figsize=(9, 3))
ax.bar(range(len(names)), [shapes[n][0] for n in names], color="C0", label="channels")
ax2 = ax.twinx()
ax2.plot(range(len(names)), [shapes[n][1] for n in names], "o-", color="C1",
         label="side (pixels)")
ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
ax.set_ylabel("channels")
ax2.set_ylabel("feature map side (pixels)")
ax.set_title("Inception-v3 of FID: a 32x32 image, resized to 299x299, block by block")
fig.tight_layout()
plt.show()
assert shapes[names[-1]] == (2048, 8, 8) and shapes["Conv2d_1a_3x3"][1] == 149

# %% [markdown]
# ## A6b.2 The weights file
#
# The weights are `pt_inception-2015-12-05-6726825d.pth` from the `pytorch-fid` releases:
# a plain tensor file, loaded with `torch.load(weights_only=True)` (no code runs), and
# checked first by its size and its **whole** SHA-256 (its name carries only the first 32
# bits). They are looked for in this order: the path given (`--weights`),
# `$EDM_LIT_INCEPTION`, the download cache (`$EDM_LIT_CACHE`, Appendix A2), else they are
# downloaded into the cache. Offline, the message names the one path to save the file as —
# the path where the loader (and `download`) then find it.

# %% tags=["export"]
import hashlib
import os

from edm_lit.checkpoints import CheckpointError, cache_dir, download, is_url

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                 "fid_weights/" + INCEPTION_FILE)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_BYTES = 95_628_359
INCEPTION_DETECTOR = "inception-pytorch-fid:" + INCEPTION_SHA256  # what refs record
INCEPTION_ENV = "EDM_LIT_INCEPTION"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_cache_path():
    """Where the weights are kept in the cache: the name that
    `download(INCEPTION_URL)` writes and finds. Appendix A6b.2."""
    key = hashlib.sha256(INCEPTION_URL.encode()).hexdigest()[:12]
    return cache_dir() / f"{key}-{INCEPTION_FILE}"


def inception_weights_path(weights=None, allow_download=True):
    """The weights: `weights`, $EDM_LIT_INCEPTION, the cache, else a download; a clear
    error offline. Appendix A6b.2."""
    candidates = ([weights] if weights is not None else
                  [os.environ.get(INCEPTION_ENV), inception_cache_path()])
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    if weights is not None:
        raise FileNotFoundError(f"no Inception weights at {weights}; download "
                                f"{INCEPTION_URL} and pass its path")
    hint = (f"FID needs the Inception-v3 weights {INCEPTION_FILE}. Download "
            f"{INCEPTION_URL} and save it as {inception_cache_path()} (or anywhere, "
            f"and set {INCEPTION_ENV}=PATH or pass --weights=PATH)")
    if not allow_download:
        raise FileNotFoundError(hint)
    try:
        return download(INCEPTION_URL)
    except CheckpointError as e:
        raise FileNotFoundError(f"{hint}. The download failed: {e}") from None


def load_inception(weights=None, device="cpu", allow_download=True):
    """The FID Inception-v3 with the published pytorch-fid weights, checked by size and
    whole SHA-256, loaded weights_only. Appendix A6b.2."""
    path = inception_weights_path(weights, allow_download)
    size = os.path.getsize(path)
    digest = _sha256(path) if size == INCEPTION_BYTES else None
    if digest != INCEPTION_SHA256:
        why = (f"{size} bytes, expected {INCEPTION_BYTES}" if digest is None
               else f"its SHA-256 is {digest}, expected {INCEPTION_SHA256}")
        raise ValueError(f"{path} is not {INCEPTION_FILE}: {why}")
    net = InceptionV3Features()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.to(device).eval().requires_grad_(False)


# %% [markdown]
# **Check** — offline and without weights, the message names one path; a file saved there
# is what the loader and `download` find; a file of the wrong size is refused by its size
# before it is hashed. (`tests/test_fid_bad_input.py` checks that a file sharing the first
# 32 bits of the hash is refused by the whole hash.)

# %% tags=["hide-input"]
from edm_lit.fid import load_inception

with mock.patch.dict(os.environ, {"EDM_LIT_CACHE": str(WORK / "cache")}):
    os.environ.pop(INCEPTION_ENV, None)  # restored on leaving
    try:
        inception_weights_path(allow_download=False)
        raise AssertionError("no weights: must fail")
    except FileNotFoundError as e:
        message = str(e)
    print("FileNotFoundError:", message.replace(str(WORK), "WORK"))
    targets = set(re.findall(r"save it as (\S+?) \(", message))
    assert len(targets) == 1, message
    target = Path(targets.pop())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"stand-in")
    assert Path(inception_weights_path(allow_download=False)) == target
    assert target == download(INCEPTION_URL)
    try:
        load_inception(allow_download=False)
        raise AssertionError("a stand-in must be refused")
    except ValueError as e:
        print("ValueError:", str(e).replace(str(WORK), "WORK"))

# %% [markdown]
# ## A6b.3 Reference files: layout, detector records, defences
#
# A reference is the official `fid-refs` layout: an `.npz` with float64 `mu` $[d]$ and
# `sigma` $[d, d]$. Ours add a string `detector` naming the feature network that made them
# (Chapter 8.4): `inception-pytorch-fid:` and the SHA-256 of the weights, or `digits:` and
# a hash of the digits classifier's weights. The official `fid.py` reads a reference as
# `dict(np.load(f))` and uses `mu` and `sigma` only, so the extra entry does not disturb
# it; a reference without the entry — every one NVIDIA publishes — counts as made by
# NVIDIA's detector. A reference is read defensively: each array's header is checked
# against the size of the file before anything is loaded (a small file that declares a
# 200,000² covariance would otherwise ask for 298 GiB), no pickled objects, and `mu`,
# `sigma` must be real, finite, of matching shapes, symmetric (`_as_stats`, which
# `frechet_distance` applies to its inputs too) and positive semi-definite (Chapter 8.2).

# %% tags=["export"]
import io
import math
import zipfile
import zlib

import numpy as np

NVIDIA_DETECTOR = "nvidia:inception-2015-12-05.pkl"  # a reference without a record
_MAX_DEFLATE_RATIO = 1032  # deflate shrinks at most ~1032:1; a claim beyond is not real
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


SYMMETRY_TOLERANCE = 1e-6  # |sigma - sigma^T| above this * max |sigma|: not symmetric


def _as_stats(mu, sigma, which):
    """(mu, sigma) in float64; refused unless real, finite, [d], [d, d], symmetric."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    for name, array in (("mu", mu), ("sigma", sigma)):
        if array.dtype.kind not in "iuf":  # bool, complex, object, text: not coerced
            raise ValueError(f"{name}{which} must hold real numbers, got dtype "
                             f"{array.dtype}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{which} must be a vector [d], got shape {list(mu.shape)}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma{which} must be [d, d] = {[mu.shape[0]] * 2} to match "
                         f"mu{which}, got {list(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{which} and sigma{which} must be finite (no NaN or inf)")
    asymmetry = float(np.abs(sigma - sigma.T).max(initial=0.0))
    scale = max(float(np.abs(sigma).max(initial=0.0)), np.finfo(np.float64).tiny)
    if asymmetry > SYMMETRY_TOLERANCE * scale:
        raise ValueError(f"sigma{which} is not symmetric (largest |sigma - sigma^T| is "
                         f"{asymmetry:.3g}): not a covariance")
    return mu, (sigma + sigma.T) / 2


def digits_detector_name(net):
    """'digits:' and 12 hex digits of the SHA-256 of the weights. Appendix A6b.3."""
    state = net.state_dict().items()
    data = b"".join(k.encode() + v.detach().cpu().contiguous().numpy().tobytes()
                    for k, v in state)
    return "digits:" + hashlib.sha256(data).hexdigest()[:12]


def save_reference(path, mu, sigma, detector=None):
    """Reference statistics in the official layout (float64 `mu`, `sigma`), plus the
    string `detector` naming the feature network; all or nothing, to `path` exactly.
    Appendix A6b.3."""
    from edm_lit.files import write_atomic  # Appendix A3

    mu, sigma = _as_stats(mu, sigma, "")
    buffer = io.BytesIO()
    record = {} if detector is None else {"detector": np.array(str(detector))}
    np.savez(buffer, mu=mu, sigma=sigma, **record)
    write_atomic(path, buffer.getvalue())


# %% tags=["export"]
def _declared(z, info, path, size):
    """The shape of an .npy member, refused if it claims more than the file holds."""
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in _NPY_HEADERS:
            raise ValueError(f"{path}: {info.filename} has .npy format version "
                             f"{version}, not read here")
        shape, _, dtype = _NPY_HEADERS[version](f)
    need = dtype.itemsize * math.prod(shape)
    stored = info.compress_type == zipfile.ZIP_STORED
    room = min(info.file_size, size * (1 if stored else _MAX_DEFLATE_RATIO))
    if dtype.hasobject or need > room:
        raise ValueError(f"{path}: {info.filename} declares {list(shape)} {dtype} "
                         f"({need / 2**30:.3g} GiB), but the file can hold at most "
                         f"{room:,} bytes of it: damaged, or not what it claims")
    return shape


def _read_members(path, keys, optional, what):
    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as z:
        npy = [i for i in z.infolist() if i.filename.endswith(".npy")]
        members = {i.filename[:-4]: i for i in npy}
        missing = [k for k in keys if k not in members]
        if missing:
            raise KeyError(f"{path} is not {what}: it lacks {' and '.join(missing)} "
                           f"(has {sorted(members)})")
        wanted = [*keys, *(k for k in optional if k in members)]
        shapes = {k: _declared(z, members[k], path, size) for k in wanted}
        arrays = {}
        for k in wanted:
            with z.open(members[k]) as f:
                arrays[k] = np.lib.format.read_array(f, allow_pickle=False)
            if arrays[k].shape != shapes[k]:
                raise ValueError(f"{path}: {k} is shorter than it declares")
        return arrays


def read_npz(path, keys, optional=(), what="an .npz"):
    """{key: array} of an .npz; one clear error for a file that is not a complete .npz,
    lacks a key, or declares more bytes than it holds (checked before loading).
    Appendix A6b.3."""
    try:
        return _read_members(path, keys, optional, what)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__}: "
                         f"{e}); truncated, damaged, or not an .npz (e.g. an .npy "
                         f"renamed)") from None


# %% tags=["export"]
def _read_reference(path_or_url, cache=None):
    """(mu, sigma, detector) of a reference, each checked, errors naming the file."""
    path = download(path_or_url, cache) if is_url(path_or_url) else path_or_url
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such reference statistics file: {path}")
    what = "FID reference statistics (mu [d], sigma [d, d])"
    data = read_npz(path, ("mu", "sigma"), ("detector",), what)
    mu, sigma = _as_stats(data["mu"], data["sigma"], f" in {path}")
    _psd_eigh(sigma, f"sigma in {path}")
    detector = data.get("detector", np.array(NVIDIA_DETECTOR))
    if detector.dtype.kind != "U" or detector.ndim != 0:
        raise ValueError(f"{path}: 'detector' must be a string naming a feature "
                         f"network, got {detector.dtype} {list(detector.shape)}")
    return mu, sigma, str(detector)


def load_reference(path_or_url, cache=None):
    """(mu, sigma) of an official-layout .npz (a path or a URL). Appendix A6b.3."""
    return _read_reference(path_or_url, cache)[:2]


def reference_detector(path_or_url, cache=None):
    """The feature network a reference records (NVIDIA_DETECTOR when none).
    Appendix A6b.3."""
    return _read_reference(path_or_url, cache)[2]


# %% [markdown]
# `fid_calc` compares the record of the reference with the detector it uses; a mismatch is
# refused in one line that names both, unless `--allow-detector-mismatch` (then it warns).

# %% tags=["export"]
import warnings


def _described(name):
    if name == NVIDIA_DETECTOR:
        return "NVIDIA's detector (no record in the file, as in NVIDIA's fid-refs)"
    return repr(name)


def compare_detectors(ref, recorded, ours, allow=False, warn=None):
    """Refuse an FID across feature networks (`recorded` by the reference, `ours`); with
    `allow`, call `warn` (default warnings.warn) with one line instead. Chapter 8.4."""
    if recorded == ours:
        return
    message = (f"the reference {ref} was made with {_described(recorded)} but this FID "
               f"uses {_described(ours)}; FIDs of different feature networks are "
               f"different quantities (Chapter 8.4)")
    if not allow:
        raise ValueError(f"{message}: remake the reference with `edm-lit fid ref` and "
                         f"the same --detector, or pass --allow-detector-mismatch to "
                         f"compare anyway")
    (warn or warnings.warn)(f"{message}; compared anyway (--allow-detector-mismatch)")


# %% [markdown]
# **Check** — a reference written by `save_reference` has exactly the official layout and
# reads back, as the official script reads it too; a recorded detector reads back; a file
# without `sigma`, and a valid ZIP whose `sigma` claims to be 200,000 × 200,000, are
# refused with a message that names the file and what is wrong. A reference of another
# detector is refused, or compared with a warning.

# %% tags=["hide-input"]
from edm_lit.fid import NVIDIA_DETECTOR, compare_detectors, load_reference
from edm_lit.fid import reference_detector, save_reference

rng = np.random.default_rng(0)
A = rng.normal(size=(32, 32))
mu0, sigma0 = rng.normal(size=32), A @ A.T / 32
save_reference(WORK / "ref.npz", mu0, sigma0)
with np.load(WORK / "ref.npz") as z:
    assert sorted(z.files) == ["mu", "sigma"] and z["mu"].dtype == np.float64
mu_r, sigma_r = load_reference(WORK / "ref.npz")
assert np.array_equal(mu_r, mu0) and np.array_equal(sigma_r, (sigma0 + sigma0.T) / 2)
assert reference_detector(WORK / "ref.npz") == NVIDIA_DETECTOR  # no record
save_reference(WORK / "tagged.npz", mu0, sigma0, detector="digits:0123456789ab")
official_style = dict(np.load(WORK / "tagged.npz"))  # how the official fid.py reads one
assert np.array_equal(official_style["mu"], mu0)
assert reference_detector(WORK / "tagged.npz") == "digits:0123456789ab"
np.savez(WORK / "bad.npz", mu=mu0)
mu_npy, sigma_npy = io.BytesIO(), io.BytesIO()
np.save(mu_npy, np.zeros(3))
header = {"descr": "<f8", "fortran_order": False, "shape": (200_000, 200_000)}
np.lib.format.write_array_header_1_0(sigma_npy, header)
with zipfile.ZipFile(WORK / "huge.npz", "w") as z:
    z.writestr("mu.npy", mu_npy.getvalue())
    z.writestr("sigma.npy", sigma_npy.getvalue() + bytes(64))
for bad in ("bad.npz", "huge.npz"):
    try:
        load_reference(WORK / bad)
        raise AssertionError("must refuse")
    except ValueError as e:
        print("ValueError:", str(e).replace(str(WORK), "WORK"))
warned = []
compare_detectors("r.npz", "digits:0123456789ab", INCEPTION_DETECTOR, True,
                  warned.append)
assert len(warned) == 1 and "compared anyway" in warned[0]
try:
    compare_detectors("r.npz", NVIDIA_DETECTOR, INCEPTION_DETECTOR)
    raise AssertionError("must refuse")
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## A6b.4 Image sets
#
# `fid ref` and `fid calc` read images as the official tools do, through the data set of
# Chapter 6 (`ImageFolderDataset`): a folder, searched recursively (so `--subdirs` output
# works), or a `.zip`; we also accept the `.npz` that `generate --npz` writes. All images
# must have one shape. `calc` uses `num` images (50,000 by default, the paper's protocol);
# from a larger set it takes the seeded random subset of the official `--num`/`--seed`, and
# it refuses a set with fewer images than asked. Under `torchrun` each process embeds every
# $W$-th batch.

# %% tags=["export"]
from edm_lit.data import ImageFolderDataset, subset_indices


class _NpzImages(torch.utils.data.Dataset):
    """The `images` [N, H, W, C] uint8 of a `generate --npz` file, as [C, H, W]."""

    def __init__(self, path, max_size=None, random_seed=0):
        what = "an .npz of images (`edm-lit generate --npz`)"
        images = read_npz(path, ("images",), what=what)["images"]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"{path}: 'images' must be uint8 [N, H, W, C], got "
                             f"{images.dtype} {list(images.shape)}")
        self.images = images[subset_indices(len(images), max_size, random_seed)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        return self.images[idx].transpose(2, 0, 1), None


def open_images(path, num=None, seed=0):
    """The images to embed: a folder or .zip (ImageFolderDataset) or an .npz; at least
    `num` of them, `num` used. Appendix A6b.4."""
    path = os.fspath(path)
    if num is not None and num < 2:
        raise ValueError(f"num must be >= 2, got {num}")
    if path.endswith(".npz") and os.path.isfile(path):
        images = _NpzImages(path, num, seed)
    else:
        images = ImageFolderDataset(path, max_size=num, random_seed=seed)
    need = 2 if num is None else num
    if len(images) < need:
        raise ValueError(f"found {len(images)} images at {path}, but {need} are needed "
                         f"(the paper's protocol uses 50,000; generate more or pass a "
                         f"smaller --num)")
    return images


def image_batches(images, batch_size=64, rank=0, world_size=1):
    """uint8 [N, C, H, W] batches of a data set: the share of process `rank`.
    Appendix A6b.4."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(images), batch_size)[rank::world_size]:
        stop = min(start + batch_size, len(images))
        yield torch.from_numpy(np.stack([images[i][0] for i in range(start, stop)]))


# %% [markdown]
# **Check** — a folder of PNGs and the `.npz` of the same images give the same batches, in
# the same order, and two processes share the batches; too few images, and a folder that mixes shapes, are refused in one line.

# %% tags=["hide-input"]
from edm_lit.data import DatasetError

pixels = np.random.default_rng(1).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
for seed, image in enumerate(pixels):
    write_png(WORK / "imgs" / f"{seed:06d}.png", image)
np.savez(WORK / "imgs.npz", images=pixels, seeds=np.arange(12))  # as `generate --npz`
as_folder = torch.cat(list(image_batches(open_images(WORK / "imgs", 12), 5)))
as_npz = torch.cat(list(image_batches(open_images(WORK / "imgs.npz", 12), 5)))
assert torch.equal(as_folder, as_npz) and as_folder.shape == (12, 1, 8, 8)
shares = [list(image_batches(open_images(WORK / "imgs"), 5, r, 2)) for r in (0, 1)]
assert [len(s) for s in shares] == [2, 1]  # batches 0, 2 and batch 1 of three
write_png(WORK / "imgs" / "small.png", np.zeros((4, 4, 1), np.uint8))
for call in [lambda: open_images(WORK / "imgs.npz", 100),
             lambda: open_images(WORK / "imgs")]:
    try:
        len(call())
        raise AssertionError("must refuse")
    except (ValueError, DatasetError) as e:
        print(f"{type(e).__name__}: {str(e).replace(str(WORK), 'WORK')}")

# %% [markdown]
# ## A6b.5 Sums over processes
#
# Under `torchrun` each process adds the features of its batches to its own `FeatureStats`
# (Chapter 8.3); `all_reduce` then sums $n$, $\sum f$ and $\sum f f^\top$ over the
# processes, so that every process holds the statistics of all images. A process that saw
# no batch (more processes than batches) learns the feature size from the others and adds
# zeros; processes that saw different feature sizes all raise the same error, so that none
# waits for the others. Without a process group it does nothing. The method is attached
# to the class of Chapter 8.3.

# %%
from edm_lit.fid import FeatureStats

# %% tags=["export"]
def _all_reduce(self):
    """Sum the statistics of all processes, in place; returns them. Appendix A6b.5."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return self
    none = 1 << 62  # stands for "no features here" in the minimum
    dims = torch.tensor([self.dim or 0, -(self.dim or none)], dtype=torch.int64,
                        device=self.device)
    dist.all_reduce(dims, dist.ReduceOp.MAX)  # [largest dim, -(smallest dim)]
    largest, smallest = int(dims[0]), -int(dims[1])
    if largest == 0:  # no process saw any feature
        return self
    if smallest != largest:  # raised by every process alike
        raise ValueError(f"processes saw different feature dimensions ({smallest} and "
                         f"{largest})")
    if self.total is None:
        self._allocate(largest)
    count = torch.tensor([float(self.n)], dtype=torch.float64, device=self.device)
    for t in (count, self.total, self.outer):
        dist.all_reduce(t)
    self.n = int(count.item())
    return self


FeatureStats.all_reduce = _all_reduce


# %% [markdown]
# **Check** — two CPU processes (Gloo), of which one saw all 9 feature vectors and the
# other none, both end with the statistics of the 9.

# %% tags=["hide-input"]
import subprocess
import sys

worker = """
import numpy as np, torch, torch.distributed as dist
from edm_lit.fid import FeatureStats
dist.init_process_group("gloo")
x = np.random.default_rng(4).normal(size=(9, 5))
stats = FeatureStats()
if dist.get_rank() == 0:
    stats.update(torch.from_numpy(x))
stats.all_reduce()
ok = stats.n == 9 and np.allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-10)
with open(f"{__file__}.{dist.get_rank()}", "w") as f:  # one file each: no interleaving
    f.write(f"{dist.get_rank()} {stats.n} {ok}")
dist.destroy_process_group()
"""
(WORK / "worker.py").write_text(worker)
torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2", str(WORK / "worker.py")]
env = dict(os.environ, OMP_NUM_THREADS="1")
done = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
lines = [(WORK / f"worker.py.{rank}").read_text() for rank in (0, 1)]
print(lines)
assert done.returncode == 0 and lines == ["0 9 True", "1 9 True"], done

# %% [markdown]
# ## What this appendix exported
#
# To `edm_lit.fid`: `InceptionV3Features` (A6b.1), `inception_cache_path`,
# `inception_weights_path` and `load_inception` with the `INCEPTION_*` constants (A6b.2),
# `digits_detector_name`, `save_reference`, `read_npz`, `load_reference`,
# `reference_detector`, `compare_detectors` and `NVIDIA_DETECTOR` (A6b.3), `open_images`
# and `image_batches` (A6b.4), and `FeatureStats.all_reduce` (A6b.5). The layers of the
# Inception port and the rest of the plumbing are private (names starting with `_`).
