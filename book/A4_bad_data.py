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
# # A4. Bad data: what `edm-lit dataset` and the reader refuse, and why
#
# Chapter 6 reads and writes the official data-set format; this appendix is the reference for
# everything it refuses. Every refusal is a `DatasetError` (a `ValueError`) whose message
# starts with the file at fault, raised **before training starts** wherever possible:
#
# | when | what is checked | where |
# |---|---|---|
# | opening a data set (`ImageFolderDataset(...)`) | the container (links, FIFOs, ZIP member names), every image's header and PNG end, one shape for all, `dataset.json` | §A4.1–A4.3 |
# | `ds.verify()` (or drawing the image into a batch) | damage inside a complete PNG | §A4.2 |
# | converting (`edm-lit dataset`) | the source's labels and pixels, the CIFAR-10 pickles; the flags | §A4.4, §A4.5 |
# | writing | the destination: free, writable, claimed without replacing anything; no partial file left | §A4.6 |
#
# The code is exported to `edm_lit.data` beside Chapter 6's. Each section ends with its
# cases, built on disk and checked to fail with the expected message; §A4.7 collects them.

# %% tags=["export:data"]
import errno
import pickle
import secrets
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import PurePosixPath

try:
    import fcntl  # file locks (POSIX), for the temporary files of `edm-lit dataset`
except ImportError:  # Windows: a partial file is never taken for a dead run's (§A4.6)
    fcntl = None

# %% tags=["hide-input"]
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import PIL.Image

from edm_lit.data import (LABEL_FILE, MAX_CLASSES, DatasetError, ImageFolderDataset,
                          Source, _check_side, _is_integer, _limit, archive_name,
                          convert_dataset, digits_source, write_dataset)

WORK = Path(tempfile.mkdtemp(prefix="edm_lit_a4_"))
plt.rcParams.update({"figure.dpi": 80})
CASES = []  # (case, when it is refused, the message), for §A4.7
good = [image for _, image, _ in digits_source(3).items]  # three real 8x8 digits
SIDE = good[0].shape[0]


def png(pixels) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="png")
    return buffer.getvalue()


def folder_of(root, images, labels=None):
    """A data set folder of `images` in the official layout, with `labels` if given."""
    for i, pixels in enumerate(images):
        (root / archive_name(i)).parent.mkdir(exist_ok=True)
        (root / archive_name(i)).write_bytes(png(pixels))
    if labels is not None:
        (root / LABEL_FILE).write_text(json.dumps({"labels": labels}))
    return root


def refused(fragment, attempt, name, when, error=DatasetError):
    """Run `attempt()`; expect `error` with `fragment` in its message; record it."""
    try:
        attempt()
    except error as e:
        message = re.sub(re.escape(str(WORK)) + r"(/tmp\w+)?", "...", str(e))
    else:
        raise AssertionError(f"no error for {name}")
    assert fragment in message, (fragment, message)
    CASES.append((name, when, message))


def expect_error(fragment, name, make, **kwargs):
    """Build a bad data set with `make(folder)`; opening it must be refused."""
    target = make(Path(tempfile.mkdtemp(dir=WORK)))
    refused(fragment, lambda: ImageFolderDataset(target, **kwargs), name, "opening")


def with_good(root, name=None, extra=None):
    """The good images in `root`, plus `extra(path)` applied to `root / name`."""
    folder_of(root, good)
    if extra is not None:
        extra(root / name)
    return root


# %% [markdown]
# ## A4.1 Containers: folders, links and ZIP members
#
# - **Folders.** Symbolic links are followed, to files and folders alike, wherever they
#   point. A link loop and a broken link are refused with their name, and so is anything that
#   is not a regular file — a FIFO, a socket, a device — *without opening it*: opening a FIFO
#   waits forever for a writer (files are opened non-blocking, so even one swapped for a FIFO
#   since the listing cannot hang the reader).
# - **ZIPs.** Member names that point outside the archive (`../x.png`, `/etc/x.png`) and
#   names that occur twice are refused: we never extract, but a tool further down the line
#   might. Each `DataLoader` worker needs its **own** open archive: a worker made by `fork`
#   inherits the parent's descriptor and file position, so two processes reading at once
#   read each other's bytes. The store reopens the archive in any process other than the
#   one that opened it, and does not pickle the open handle (`spawn` workers).
#
# The cases, each built on disk and opened, follow the code (links that work are followed:
# `tests/test_data_bad_input.py`).

# %% tags=["export:data"]
_NOT_REGULAR = "not a regular file (a FIFO, socket or device)"


def _list_folder(root: Path) -> list:
    """Relative POSIX names of the regular files under `root`, links followed; loops and
    special files refused."""
    names, pending = [], [(root, "", (os.stat(root)[1:3],))]  # [1:3]: (inode, device)
    while pending:
        folder, prefix, above = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as e:
            message = f"{folder}: cannot list this folder ({e.strerror})"
            raise DatasetError(message) from None
        for entry in entries:
            where, name = Path(entry.path), prefix + entry.name
            try:  # is_dir() and is_file() follow links; stat() raises for a broken link
                is_dir, is_file = entry.is_dir(), entry.is_file()
                folder_id = entry.stat()[1:3] if is_dir or not is_file else None
            except OSError as e:
                link = " (a broken symbolic link)" if entry.is_symlink() else ""
                message = f"{where}: cannot read it{link}: {e.strerror}"
                raise DatasetError(message) from None
            if is_dir and folder_id in above:
                raise DatasetError(f"{where}: a symbolic link loop (it leads back to a "
                                   "folder that contains it)")
            if is_dir:
                pending.append((where, name + "/", above + (folder_id,)))
            elif is_file:
                names.append(name)
            else:
                raise DatasetError(f"{where}: {_NOT_REGULAR}; refusing to open it")
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
        try:  # non-blocking: a file swapped for a FIFO since the listing cannot hang us
            fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise DatasetError(f"{path}: cannot open it: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise DatasetError(f"{path}: {_NOT_REGULAR}; refusing to read it")
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def close(self):
        pass


# %% tags=["export:data"]
class _ZipStore:
    """Members of a ZIP archive, opened lazily, and again in every other process."""

    def __init__(self, path: Path):
        self.path, self._zip, self._pid, self._names = path, None, None, None
        try:
            self.names()
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{path}: not a valid ZIP archive ({e})") from None

    def _archive(self) -> zipfile.ZipFile:
        if self._pid != os.getpid():  # first use, or a fork: never share a position
            if self._zip is not None:
                self._zip.close()  # this process's copy of the descriptor only
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def names(self) -> list:
        if self._names is None:
            infos = self._archive().infolist()
            names = [info.filename for info in infos if not info.is_dir()]
            unsafe = [name for name in names if not is_safe_member_name(name)]
            if unsafe:
                raise DatasetError(f"{self.path}: member {unsafe[0]!r} points outside "
                                   "the archive (path traversal); refusing to read "
                                   "this archive")
            if len(set(names)) != len(names):
                twice = next(name for name in names if names.count(name) > 1)
                raise DatasetError(f"{self.path}: member {twice!r} occurs twice; "
                                   "refusing an ambiguous archive")
            self._names = names
        return self._names

    def open(self, name: str):
        try:
            return self._archive().open(name)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as e:
            # damaged, compressed with an unknown method, or encrypted
            message = f"{self.path}/{name}: cannot read this member ({e})"
            raise DatasetError(message) from None

    def size(self, name: str) -> int:
        return self._archive().getinfo(name).file_size

    def close(self):
        if self._zip is not None:
            self._zip.close()
        self._zip, self._pid = None, None

    def __getstate__(self):
        return dict(self.__dict__, _zip=None, _pid=None)


def is_safe_member_name(name: str) -> bool:
    """True when an archive member name stays inside the archive: relative, no `..`, no
    drive. Appendix A4."""
    posix = PurePosixPath(name.replace("\\", "/"))
    return not (posix.is_absolute() or ".." in posix.parts
                or (posix.parts and ":" in posix.parts[0]))


def _open_store(path: Path):
    if path.is_dir():
        return _FolderStore(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        return _ZipStore(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    raise DatasetError(f"{path}: a data set must be a directory or a .zip file")


# %% tags=["hide-input"]
def zip_of(members: list):
    """A maker of a ZIP `bad.zip` of `members`, [(name, pixels)] in this order."""
    def make(root):
        with warnings.catch_warnings(), zipfile.ZipFile(root / "bad.zip", "w") as z:
            warnings.simplefilter("ignore")  # zipfile warns of a duplicate, writes it
            for name, pixels in members:
                z.writestr(name, png(pixels))
        return root / "bad.zip"
    return make


third = archive_name(3)
expect_error("nowhere.zip: no such file", "missing path", lambda r: r / "nowhere.zip")
expect_error("no image files found", "empty", lambda r: (r / "a.txt").touch() or r)
expect_error("00000/again: a symbolic link loop", "link loop", lambda r: with_good(
    r, "00000/again", lambda p: p.symlink_to(r, target_is_directory=True)))
expect_error(f"{third}: cannot read it (a broken symbolic link)", "broken link",
             lambda r: with_good(r, third, lambda p: p.symlink_to(r / "no.png")))
if hasattr(os, "mkfifo"):  # POSIX; a named pipe: opening it would wait for a writer
    expect_error(f"{third}: not a regular file (a FIFO, socket or device); refusing",
                 "FIFO in the folder", lambda root: with_good(root, third, os.mkfifo))
expect_error("'../../outside.png' points outside the archive", "path traversal",
             zip_of([(archive_name(0), good[0]), ("../../outside.png", good[1])]))
expect_error("bad.zip: member '00000/img00000000.png' occurs twice", "ZIP member twice",
             zip_of([(archive_name(0), good[0]), (archive_name(0), good[1])]))

# %% [markdown]
# ## A4.2 Pixel formats, headers and decoding
#
# **Headers.** Opening a data set parses every image's header without decoding the pixels
# (size and pixel format) and checks that each PNG ends with the empty `IEND` chunk, which
# catches a truncated file. A header that declares more pixels than PIL agrees to decode
# (its guard against decompression bombs: a 100000×100000 PNG can be a few hundred bytes) is
# refused the same way. Damage *inside* a complete PNG is found only by decoding: by
# `ds.verify()`, or when the image is first drawn into a batch.
#
# **Pixels are 8-bit grey or colour**, one rule for the reader and the converter: a 1-bit
# image becomes grey levels 0 and 255, a palette image the colours of its palette (grey when
# every entry is grey, else RGB), a 16-bit grey image keeps its **high byte**, $v \gg 8$, as
# PIL does for 16-bit colour PNGs. Other formats (32-bit integers, floats, CMYK) have no one
# meaning on a 0–255 scale and are refused. Among the cases: a non-square data set opens, but
# asking for its `resolution` (training does) fails.

# %% tags=["export:data"]
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk that ends a PNG
_CHANNELS_OF_MODE = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # 8-bit PIL mode -> channels
_GREY_16 = ("I;16", "I;16B", "I;16L", "I;16N")  # PIL's modes of 16-bit grey images
_EIGHT_BIT = {"1": "L", "L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA",
              **dict.fromkeys(_GREY_16, "L")}
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error,
                 zipfile.BadZipFile, PIL.Image.DecompressionBombError)


def _palette_is_grey(image: PIL.Image.Image) -> bool:
    """Whether every entry of a palette image's palette is grey (no pixels decoded)."""
    rawmode, data = image.palette.getdata()
    probe = PIL.Image.new("P", (256, 1))
    probe.putdata(range(256))
    probe.putpalette(data, rawmode)
    colours = np.asarray(probe.convert("RGB"))
    return bool((colours == colours[..., :1]).all())


def _eight_bit_mode(image: PIL.Image.Image, where: str) -> str:
    """The 8-bit PIL mode `image` is read as: 1-bit and 16-bit grey -> L, palette -> L
    or RGB; other formats are refused."""
    if image.mode == "P":
        return "L" if _palette_is_grey(image) else "RGB"
    if image.mode not in _EIGHT_BIT:
        raise DatasetError(f"{where}: pixel format {image.mode!r} is not supported "
                           "(use 8-bit grey or RGB)")
    return _EIGHT_BIT[image.mode]


def _image_error(where: str, what: str, error: Exception) -> DatasetError:
    if isinstance(error, PIL.Image.DecompressionBombError):
        return DatasetError(f"{where}: refusing to decode it: {error}")
    return DatasetError(f"{where}: {what} ({error})")


def _read_header(store, name: str, where: str) -> tuple:
    """(channels, height, width) of one image from its header; a PNG must end with
    IEND."""
    with store.open(name) as f:
        try:
            with PIL.Image.open(f) as image:
                mode, (width, height) = _eight_bit_mode(image, where), image.size
                kind = image.format
        except DatasetError:
            raise
        except _IMAGE_ERRORS as e:
            raise _image_error(where, "not a readable image", e) from None
        if kind == "PNG":
            size, end = store.size(name), len(_PNG_TRAILER)
            f.seek(max(size - end, 0))
            if size < len(_PNG_SIGNATURE) + end or f.read() != _PNG_TRAILER:
                raise DatasetError(f"{where}: truncated PNG (it does not end with an "
                                   "IEND chunk)")
    return _CHANNELS_OF_MODE[mode], height, width


def _decode(store, name: str, where: str) -> np.ndarray:
    """The pixels of one image as a uint8 HWC (or HW, grey) array, by the 8-bit rule."""
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


# %% tags=["hide-input"]
def bomb(path):  # 57 bytes: a PNG header declaring 100000 x 100000 grey pixels
    ihdr = b"IHDR" + (100_000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    chunk = (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
    path.write_bytes(_PNG_SIGNATURE + chunk + _PNG_TRAILER)


def float_tiff(path):  # 32-bit floating-point grey: no one meaning on a 0-255 scale
    PIL.Image.fromarray(np.zeros([8, 8], np.float32)).save(path)


second, last = archive_name(1), archive_name(2)
expect_error(f"{last}: image shape", "mixed resolutions", lambda root: folder_of(
    root, [good[0], good[1], np.zeros([2 * SIDE, 2 * SIDE])]))
expect_error("resolution=8 asks for 8x8", "not the resolution asked",
             lambda root: folder_of(root, [np.zeros([8, 6])] * 2), resolution=8)
expect_error(f"{second}: truncated PNG", "truncated PNG", lambda root: with_good(
    root, second, lambda p: p.write_bytes(png(good[1])[:-20])))
expect_error(f"{last}: not a readable image", "not a PNG inside", lambda r: with_good(
    r, last, lambda p: p.write_bytes(_PNG_SIGNATURE + b"garbage" * 10)))
expect_error(f"{third}: refusing to decode it: Image size (10000000000 pixels) exceeds",
             "decompression bomb", lambda root: with_good(root, third, bomb))
expect_error("img00000003.tif: pixel format 'F' is not supported", "float pixels",
             lambda root: with_good(root, "00000/img00000003.tif", float_tiff))

ramp32 = [np.tile(np.arange(32, dtype=np.uint8), (32, 1))] * 3
hidden = folder_of(Path(tempfile.mkdtemp(dir=WORK)), ramp32)
data = bytearray((hidden / second).read_bytes())
data[60:70] = bytes(10)  # inside the compressed pixels; header and IEND intact
(hidden / second).write_bytes(bytes(data))
damaged = ImageFolderDataset(hidden)  # opens: the headers and ends are fine
refused(f"{second}: cannot decode", damaged.verify, "damage inside a PNG", "verify()")
rectangular = folder_of(Path(tempfile.mkdtemp(dir=WORK)), [np.zeros([8, 6])] * 2)
refused("square", lambda: ImageFolderDataset(rectangular).resolution,
        "non-square resolution", "training start")

# %% [markdown]
# **The pixel rules**, checked and seen (the converter writes what the reader reads):

# %% tags=["hide-input"]
def read_one(image: PIL.Image.Image) -> np.ndarray:
    root = Path(tempfile.mkdtemp(dir=WORK))
    image.save(root / "image.png")
    return ImageFolderDataset(root)[0][0]


ramp = np.add.outer(np.arange(16), np.arange(16))  # 0 .. 30, a diagonal ramp
sixteen = (ramp * 2100 + 1000).astype(np.uint16)  # 1000 .. 64000
palettes = {"grey palette": [0, 0, 0, 128, 128, 128, 255, 255, 255],
            "colour palette": [230, 60, 40, 40, 160, 70, 50, 80, 220]}
stored = {"16-bit grey": PIL.Image.fromarray(sixteen),
          "1-bit": PIL.Image.fromarray(ramp > 15)}
for name, palette in palettes.items():
    stored[name] = PIL.Image.fromarray((ramp // 11).astype(np.uint8), "P")  # 0, 1, 2
    stored[name].putpalette(palette)
read = {name: read_one(image) for name, image in stored.items()}
expected = {"16-bit grey": [sixteen >> 8], "1-bit": [(ramp > 15) * 255]}
for name, palette in palettes.items():
    colours = np.array(palette, np.uint8).reshape(3, 3)[ramp // 11].transpose(2, 0, 1)
    expected[name] = colours[:1] if name.startswith("grey") else colours
assert all(np.array_equal(read[name], expected[name]) for name in stored)
(WORK / "src16").mkdir()
stored["16-bit grey"].save(WORK / "src16" / "sixteen.png")
convert_dataset(WORK / "src16", WORK / "16.zip", progress=False)
assert np.array_equal(ImageFolderDataset(WORK / "16.zip")[0][0][0], sixteen >> 8)

fig, axes = plt.subplots(2, 4, figsize=(10, 5.2))
for col, (name, image) in enumerate(stored.items()):
    shown = np.asarray(image.convert("RGB") if image.mode == "P" else image, np.float64)
    shown /= 255 if image.mode == "P" else shown.max()  # each on its own full scale
    axes[0, col].imshow(shown, cmap="gray", vmin=0, vmax=1)
    axes[0, col].set_title(f"stored: {name}\n(PIL mode {image.mode!r})", fontsize=9)
    pixels = read[name]
    axes[1, col].imshow(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0),
                        cmap="gray", vmin=0, vmax=255)
    axes[1, col].set_title(f"read: uint8, {len(pixels)} channel(s)", fontsize=9)
    axes[0, col].set(xticks=[], yticks=[]), axes[1, col].set(xticks=[], yticks=[])
fig.suptitle("One rule for the pixels: a picture is read as the 8-bit picture it shows")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## A4.3 Labels
#
# `dataset.json` must be an object whose `labels` entry is `null` or a list of `[file name,
# label]` pairs that matches the images *exactly*: every image labelled once, no label for a
# file that is not an image of the set, and all labels classes (0 to `MAX_CLASSES` − 1) or
# all lists of numbers finite as `float32`, of one length. The converter checks a source's
# `dataset.json` with the same function. (Cases: opened with `use_labels=True`.)

# %% tags=["export:data"]
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_class(value) -> bool:
    integer = isinstance(value, int) and not isinstance(value, bool)
    return integer and 0 <= value < MAX_CLASSES


def _is_vector(value) -> bool:
    """A list of numbers that are finite as float32 (NaN, infinities, 1e300 are not)."""
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool)
        and abs(v) <= _FLOAT32_MAX for v in value)


def _label_pairs(store, where: str):
    """The [file name, label] pairs of dataset.json as a dict, or None (no labels)."""
    try:
        with store.open(LABEL_FILE) as f:
            document = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # or nested too deep
        raise DatasetError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(document, dict) or "labels" not in document:
        raise DatasetError(f"{where}: expected an object with a 'labels' entry")
    pairs = document["labels"]
    if pairs is None:
        return None
    if not isinstance(pairs, list):
        raise DatasetError(f"{where}: 'labels' must be a list of [file name, label] "
                           "pairs or null")
    table = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise DatasetError(f"{where}: entry {pair!r} is not a [file name, label] "
                               "pair")
        name = pair[0].replace("\\", "/")
        if name in table:
            raise DatasetError(f"{where}: file {name!r} is labelled twice")
        table[name] = pair[1]
    return table


def _label_table(store, image_names: list, where: str):
    """dataset.json checked against `image_names`: {name: class or vector}, one label
    per image, or None when the data set has no labels."""
    if LABEL_FILE not in store.names():
        return None
    where = f"{where}/{LABEL_FILE}"
    table = _label_pairs(store, where)
    if table is None:
        return None
    missing = [name for name in image_names if name not in table]
    if missing:
        raise DatasetError(f"{where}: no label for image {missing[0]!r} "
                           f"({len(missing)} images unlabelled)")
    extra = sorted(set(table) - set(image_names))
    if extra:
        raise DatasetError(f"{where}: label for {extra[0]!r}, which is not an image of "
                           f"the data set ({len(extra)} such labels)")
    values = [table[name] for name in image_names]
    width = len(values[0]) if isinstance(values[0], list) else None
    if not (all(_is_class(v) for v in values)
            or all(_is_vector(v) and len(v) == width for v in values)):
        bad = next(name for name, v in zip(image_names, values) if not _is_class(v))
        raise DatasetError(f"{where}: label of {bad!r} is {table[bad]!r}; labels must "
                           f"be classes (integers 0..{MAX_CLASSES - 1}) or lists of "
                           "finite numbers, all of one length")
    return {name: table[name] for name in image_names}


# %% tags=["hide-input"]
def labelled(*labels):
    """A maker of the good images with these [file name, label] pairs."""
    return lambda root: folder_of(root, good, list(labels))


a, b, c, d = (archive_name(i) for i in range(4))
for fragment, name, make in [
        (f"no label for image '{c}'", "label missing", labelled([a, 1], [b, 2])),
        (f"label for '{d}', which is not an image", "label for no image",
         labelled([a, 1], [b, 1], [c, 1], [d, 1])),
        (f"label of '{b}' is 2.5", "label not a class",
         labelled([a, 1], [b, 2.5], [c, 0])),
        (f"file '{a}' is labelled twice", "labelled twice",
         labelled([a, 1], [b, 1], [c, 1], [a, 2])),
        ("dataset.json: not valid JSON", "not JSON", lambda root: with_good(
            root, LABEL_FILE, lambda p: p.write_text("{'labels': None}")))]:
    expect_error(fragment, name, make, use_labels=True)

# %% [markdown]
# ## A4.4 The converter's sources
#
# `edm-lit dataset` checks its *source* as the reader checks a data set, naming the source
# file at fault: a malformed `dataset.json` entry, an image without a label (the official
# tool would write an unconditional data set without a word), an image whose shape differs
# from the first. **CIFAR-10**: `cifar-10-python.tar.gz` holds five training batches, each a
# pickled dictionary of a `data` array and a `labels` list. Unpickling a downloaded file can
# run arbitrary code, so an unpickler that accepts nothing but NumPy arrays, bytes, lists and
# dictionaries reads them; each batch must hold integer pixels from 0 to 255, 3,072 per
# image, and one class from 0 to 9 per image. The cases: CIFAR-10 archives whose second batch
# would call a function, holds pixels above 255 or a class 10; nothing is written.

# %% tags=["export:data"]
class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only; anything else is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
               ("numpy", "dtype"), ("_codecs", "encode")}  # encode: bytes in protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


_CIFAR10_BATCHES = tuple(f"cifar-10-batches-py/data_batch_{b}" for b in range(1, 6))
_CIFAR10_CLASSES = 10


def _cifar10_batch(tar: tarfile.TarFile, path: Path, member: str) -> tuple:
    """One training batch, checked: images [n, 32, 32, 3] uint8 and n classes 0..9."""
    where, info = f"{path}/{member}", tar.getmember(member)
    if not info.isfile():
        raise DatasetError(f"{where}: not a file in the archive")
    try:
        with tar.extractfile(info) as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except Exception as e:  # the restricted unpickler refused it, or it is not a pickle
        message = f"{path}: not a CIFAR-10 python archive ({member}: {e})"
        raise DatasetError(message) from None
    if not (isinstance(data, dict) and isinstance(data.get("data"), np.ndarray)
            and isinstance(data.get("labels"), (list, np.ndarray))):
        raise DatasetError(f"{where}: expected a dictionary with a 'data' array and a "
                           "'labels' list")
    pixels, labels = data["data"], list(data["labels"])
    if pixels.dtype.kind not in "iu" or pixels.ndim != 2 or pixels.shape[1] != 3072:
        raise DatasetError(f"{where}: 'data' is {pixels.dtype} {list(pixels.shape)}, "
                           "expected integers [N, 3072]")
    if pixels.size and not 0 <= pixels.min() <= pixels.max() <= 255:
        raise DatasetError(f"{where}: pixel values span {pixels.min()}..{pixels.max()}"
                           ", outside 0..255")
    if len(labels) != len(pixels):
        raise DatasetError(f"{where}: {len(labels)} labels for {len(pixels)} images")
    bad = [k for k in labels if not (_is_integer(k) and 0 <= k < _CIFAR10_CLASSES)]
    if bad:
        raise DatasetError(f"{where}: label {bad[0]!r} is not a class "
                           f"0..{_CIFAR10_CLASSES - 1}")
    images = pixels.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, [int(k) for k in labels]


def _cifar10_source(path: Path, max_images) -> Source:
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in _CIFAR10_BATCHES:
                batch_images, batch_labels = _cifar10_batch(tar, path, member)
                images.append(batch_images)
                labels += batch_labels
    except DatasetError:
        raise
    except (OSError, KeyError, tarfile.TarError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: not a CIFAR-10 python archive ({e})") from None
    images = np.concatenate(images)
    count = _limit(len(images), max_images)
    items = ((i, images[i], labels[i]) for i in range(count))
    return Source(count, items, True, lambda i: f"{path}: image {i}")


# %% tags=["hide-input"]
def source_folder(images, labels=None):
    root = Path(tempfile.mkdtemp(dir=WORK)) / "src"
    root.mkdir()
    return folder_of(root, images, labels)


def fake_cifar(second_batch):
    """A cifar-10-python.tar.gz: five batches of two images, batch 2 `second_batch`."""
    path = Path(tempfile.mkdtemp(dir=WORK)) / "cifar-10-python.tar.gz"
    fine = {"data": np.zeros([2, 3072], np.uint8), "labels": [0, 1]}
    with tarfile.open(path, "w:gz") as tar:
        for b in range(1, 6):
            data = pickle.dumps(second_batch if b == 2 else fine, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{b}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class CallsAFunction:  # unpickling it would call os.getcwd(): any function would do
    def __reduce__(self):
        return os.getcwd, ()


def convert_refused(fragment, source, name, when="converting"):
    """Convert `source`; expect a refusal naming it, and nothing written next to it."""
    refused(fragment, lambda: convert_dataset(source, source.parent / "out.zip",
                                              progress=False), name, when)
    assert f".../{source.name}" in CASES[-1][2]  # the message names the source
    assert [p.name for p in source.parent.iterdir()] == [source.name]  # nothing written


pixels = np.zeros([2, 3072], np.uint8)
for fragment, source, name in [
        (f"src/dataset.json: entry ['{a}'] is not a [file name, label] pair",
         source_folder(good, [[a], [b, 1], [c, 2]]), "source: malformed label"),
        (f"src/dataset.json: no label for image '{b}'",
         source_folder(good, [[a, 1], [c, 2]]), "source: label missing"),
        (f"src/{b}: image shape (H, W, C) is (16, 16, 1), expected (8, 8, 1)",
         source_folder([good[0], np.zeros([16, 16]), good[2]]), "source: mixed shapes"),
        ("(cifar-10-batches-py/data_batch_2: refusing to load",
         fake_cifar(CallsAFunction()), "CIFAR: code in a pickle"),
        ("data_batch_2: pixel values span 300..300, outside 0..255",
         fake_cifar({"data": np.full([2, 3072], 300), "labels": [0, 1]}),
         "CIFAR: pixels > 255"),
        ("data_batch_2: label 10 is not a class 0..9",
         fake_cifar({"data": pixels, "labels": [0, 10]}), "CIFAR: class 10")]:
    convert_refused(fragment, source, name)

# %% [markdown]
# ## A4.5 Flags
#
# Every flag of `edm-lit dataset` is checked before the destination is claimed or the source
# read: `--resolution=WxH` (each side 8 to 4096 pixels — the U-Nets halve it several times;
# the image written square, its side a power of two; `center-crop-wide` puts a W×H band on
# a W×W canvas, so H ≤ W), `--transform`, `--max-images`. These are usage errors
# (`ValueError`), which the command line prints in one line.

# %% tags=["export:data"]
MIN_RESOLUTION = 8  # the side of a written image, in pixels: at least ...
MAX_RESOLUTION = 4096  # ... and at most


def parse_resolution(text: str) -> tuple:
    """'32x32' -> (32, 32), width first, as `--resolution=WxH`; each side from 8 to 4096
    pixels. Appendix A4."""
    match = re.fullmatch(r"([0-9]+)[xX]([0-9]+)", str(text).strip())
    if match is None:
        raise ValueError(f"--resolution must look like WxH, e.g. 32x32, got {text!r}")
    width, height = int(match[1]), int(match[2])
    sides_ok = [MIN_RESOLUTION <= side <= MAX_RESOLUTION for side in (width, height)]
    if not all(sides_ok):
        raise ValueError(f"--resolution={text}: each side must be {MIN_RESOLUTION} to "
                         f"{MAX_RESOLUTION} pixels")
    return width, height


def _check_side(side: int, where: str, hint: str):
    if not (MIN_RESOLUTION <= side <= MAX_RESOLUTION and side & (side - 1) == 0):
        raise DatasetError(f"{where}: the side must be a power of two from "
                           f"{MIN_RESOLUTION} to {MAX_RESOLUTION}, got {side}{hint}")


def _check_resolution(resolution, transform):
    """The image `--resolution=WxH` writes: square (W = H, or W x W), side 2^k."""
    width, height = resolution
    where = f"--resolution={width}x{height}"
    if transform == "center-crop-wide" and height > width:
        raise ValueError(f"{where}: center-crop-wide puts a WxH band on a WxW canvas, "
                         "so H must not exceed W")
    if transform != "center-crop-wide" and width != height:
        raise ValueError(f"{where}: the images written must be square (WxW) unless "
                         "--transform=center-crop-wide")
    _check_side(width, where, "")


def _check_max_images(max_images):
    if max_images is not None and (not _is_integer(max_images) or max_images < 1):
        raise ValueError("max_images (--max-images) must be a positive integer or "
                         f"None, got {max_images!r}")


# %% tags=["hide-input"]
flags = [(dict(resolution="32"), "--resolution must look like WxH"),
         (dict(resolution="5000x5000"), "each side must be 8 to 4096 pixels"),
         (dict(resolution="32x16"), "must be square (WxW) unless --transform"),
         (dict(resolution="16x32", transform="center-crop-wide"), "H must not exceed"),
         (dict(resolution="48x48"), "a power of two from 8 to 4096, got 48"),
         (dict(max_images=0), "must be a positive integer or None, got 0")]
for kwargs, fragment in flags:
    name = " ".join(f"{k}={v}" for k, v in kwargs.items())
    refused(fragment, lambda: convert_dataset("digits", WORK / "never.zip", **kwargs),
            name, "parsing flags", ValueError)
assert not (WORK / "never.zip").exists()

# %% [markdown]
# ## A4.6 Writing: claiming the destination, and what a failed run leaves
#
# The data set is written under a temporary name, `.DEST.partial-PID-…`, and appears under
# its final name only when complete. A failed run removes its temporary file; a *killed* run
# cannot, so the file carries its process id and is locked (`flock`) while written: the next
# run to the destination removes those whose process is gone and whose lock is free. The
# final name is **claimed without replacing** anything (a hard link for a ZIP, a rename for a
# folder; both fail when the name is taken): of two runs writing one destination, the second
# to finish refuses and the first one's data set stays. While writing, every image must have
# the first one's shape: square, 1 or 3 channels, a power-of-two side. The cases check all
# three promises: nothing left by a failure, a killed run's file removed, a race refused.

# %% tags=["export:data"]
def _check_written_shape(image: np.ndarray, first, where: str, first_where: str):
    """(H, W, C) of an image to write: the first sets it (square, 1 or 3 channels, side
    2^k), the others must match it."""
    shape = image.shape if image.ndim == 3 else (*image.shape, 1)
    if first is None:
        height, width, channels = shape
        if height != width:
            raise DatasetError(f"{where}: images must be square after resizing/"
                               f"cropping, got {width}x{height} (use --resolution and "
                               "--transform)")
        if channels not in (1, 3):
            raise DatasetError(f"{where}: images must be grey or RGB, got {channels} "
                               "channels")
        _check_side(width, where, " (use --resolution)")
    elif shape != first:
        raise DatasetError(f"{where}: image shape (H, W, C) is {shape}, expected "
                           f"{first} like the first image ({first_where}); all images "
                           "must have one shape")
    return shape


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _lock(fd: int) -> bool:
    """Lock an open file or folder for this process (flock, non-blocking); False when
    another process holds it."""
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
        return True  # elsewhere os.kill(pid, 0) is no harmless probe; ours are in use
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # it exists, but belongs to another user
        pass
    return True


def _remove_stale_partials(dest: Path):
    """Remove the temporary files that killed runs left next to `dest`: process gone,
    lock free."""
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


# %% tags=["export:data"]
def _claim(temp: Path, dest: Path, as_zip: bool):
    """Give the finished `temp` its final name `dest`, never replacing a data set."""
    taken = DatasetError(f"{dest}: another process created the destination while "
                         "this one was writing; it was left as it is and nothing was "
                         "written")
    if not as_zip:
        try:
            os.rename(temp, dest)  # replaces at most an empty folder
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise taken from None
            raise
        return
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()  # the empty folder that may stand in for the destination
    try:
        os.link(temp, dest)  # fails when the name exists: never replaces
    except FileExistsError:
        raise taken from None
    except OSError:  # no hard links on this file system: check, then rename
        if dest.exists():
            raise taken from None
        os.replace(temp, dest)


class _PartialOutput:
    """A data set written under a temporary name beside `dest`; `commit()` claims it."""

    def __init__(self, dest: Path):
        self.dest, self.as_zip = dest, dest.suffix.lower() == ".zip"
        self.temp, self._file, self._archive, self._fd = None, None, None, None
        try:
            if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
                raise DatasetError(f"{dest}: destination exists; remove it or choose "
                                   "another --dest")
            dest.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_partials(dest)
            tag = f"{os.getpid()}-{secrets.token_hex(4)}"
            temp = dest.with_name(f".{dest.name}.partial-{tag}")
            if self.as_zip:
                self._file, self.temp = open(temp, "xb"), temp
                _lock(self._file.fileno())
                self._archive = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED)
            else:
                os.mkdir(temp)
                self.temp = temp
                if fcntl is not None:  # a folder is locked through a descriptor (POSIX)
                    self._fd = os.open(temp, os.O_RDONLY)
                    _lock(self._fd)
        except OSError as e:
            self.abort()
            folder = dest.parent
            not_folder = folder.exists() and not folder.is_dir()
            reason = f"{folder} is not a folder" if not_folder else e.strerror or e
            message = f"{dest}: cannot write the destination ({reason})"
            raise DatasetError(message) from None

    def put(self, name: str, data: bytes):
        if self.as_zip:
            self._archive.writestr(name, data)
        else:
            (self.temp / name).parent.mkdir(exist_ok=True)
            (self.temp / name).write_bytes(data)

    def commit(self):
        if self.as_zip:
            self._archive.close()
            self._file.flush()
            os.fsync(self._file.fileno())
        _claim(self.temp, self.dest, self.as_zip)
        self.abort()

    def abort(self):
        """Close and remove the temporary file (after `commit`, what is left of it)."""
        for handle in (self._archive, self._file):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001 - the write failed; removal is what counts
                pass
        if self._fd is not None:
            os.close(self._fd)
        self._archive = self._file = self._fd = None
        if self.temp is not None:
            _remove(self.temp)


# %% tags=["hide-input"]
convert_refused("images must be square after resizing/cropping, got 6x8",
                source_folder([np.zeros([8, 6])] * 2), "writing: not square", "writing")

gone = subprocess.Popen([sys.executable, "-c", "pass"])
gone.wait()  # a process that no longer exists
stale = WORK / f".again.zip.partial-{gone.pid}"
stale.write_bytes(b"the first half of a data set, written by a killed run")
convert_dataset(source_folder(good), WORK / "again.zip", progress=False)
assert not stale.exists() and len(ImageFolderDataset(WORK / "again.zip")) == 3
print(f"a partial file of a finished process ({gone.pid}): removed by the next run")


def racing(images):
    """Items of `images`; another run writes race.zip while we are at the second one."""
    for i, pixels in enumerate(images):
        if i == 1:
            other = Source(1, iter([(0, good[0], None)]), False)
            write_dataset(other, WORK / "race.zip", progress=False)
        yield i, pixels, None


refused("another process created the destination while this one was writing",
        lambda: write_dataset(Source(3, racing(good), False), WORK / "race.zip",
                              progress=False), "writing: destination taken", "writing")
assert len(ImageFolderDataset(WORK / "race.zip")) == 1  # the first run's, intact
assert not list(WORK.glob(".*.partial-*"))  # and no temporary file left by either run

# %% [markdown]
# ## A4.7 The catalogue
#
# Every case above, by the moment it is refused; none of them waits for a training step.

# %% tags=["hide-input"]
order = ["opening", "verify()", "training start", "parsing flags", "converting",
         "writing"]
for when in order:
    print(f"refused when {when}:")
    for case, moment, message in CASES:
        if moment == when:
            print(f"  {case}: {message}")
counts = {when: sum(moment == when for _, moment, _ in CASES) for when in order}
print(f"{len(CASES)} cases: " + ", ".join(f"{n} {when}" for when, n in counts.items()))
assert all(counts.values()) and sum(counts.values()) == len(CASES)
# every refusal of the data starts with the path at fault
assert all(m.startswith(("...", "/")) for _, w, m in CASES if w != "parsing flags")
