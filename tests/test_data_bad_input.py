"""Bad input to `edm-lit dataset` and ImageFolderDataset (issue 15), grouped by what went wrong.

Each case ends in one line naming the file or flag (`edm-lit dataset: error: ...`, exit 1, no
traceback) with nothing under the final name, or, where the input has one correct meaning, in the
correct result.
"""
import contextlib
import fcntl
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import edm_lit.data as data
from edm_lit.cli import main
from edm_lit.data import DatasetError, ImageFolderDataset, archive_name, convert_dataset


# ---- helpers ----

def png(pixels) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.asarray(pixels)).save(buffer, format="png")
    return buffer.getvalue()


def saved(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height grey pixels that holds almost none (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
            + chunk(b"IEND", b""))


def grey(n=2, size=8, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, [n, size, size], dtype=np.uint8))


def folder_of(root: Path, images) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        (root / f"{i}.png").write_bytes(image if isinstance(image, bytes) else png(image))
    return root


def run_cli(args):
    """(exit code, stdout, stderr lines but the progress bar); KeyboardInterrupt fails the test."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the command (a traceback for the user)")
    lines = [line.strip() for line in err.getvalue().replace("\r", "\n").splitlines()]
    progress = ("img/s", "?img")
    return code, out.getvalue(), [line for line in lines if line and not any(p in line for p in progress)]


def dataset_error(source, dest, *flags) -> str:
    """Run `edm-lit dataset`; check it failed in one line and wrote nothing at `dest`; the line."""
    code, out, lines = run_cli(["dataset", f"--source={source}", f"--dest={dest}", *flags])
    assert code == 1 and out == "" and len(lines) == 1, (code, out, lines)
    assert lines[0].startswith("edm-lit dataset: error: "), lines
    dest = Path(dest)
    assert not dest.exists() and not list(dest.parent.glob(f".{dest.name}.partial-*"))
    return lines[0]


def convert_ok(source, dest, *flags) -> ImageFolderDataset:
    code, out, lines = run_cli(["dataset", f"--source={source}", f"--dest={dest}", *flags])
    assert code == 0 and out.strip() == f"wrote {dest}", (code, out, lines)
    return ImageFolderDataset(dest, use_labels=True)


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging (the old code waited forever on a FIFO)."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def source_not_read(monkeypatch):
    """Fail the test if the command reads its source (flags and destination are checked first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the source was read before a bad flag or destination was found")

    monkeypatch.setattr(data, "open_source", refuse)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


# ---- lost or mixed data ----

def test_later_run_removes_partial_files_of_dead_processes_only(tmp_path):
    src, gone = folder_of(tmp_path / "src", grey()), dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # what killed runs leave: the name c97c66b used, then the current one
        stale = [tmp_path / f".out.zip.partial-{gone}", tmp_path / f".out.zip.partial-{gone}-0bad"]
        for path in stale:
            path.write_bytes(b"x" * 1000)
        (tmp_path / f".out.zip.partial-{gone}-12345678").mkdir()  # a killed run writing a folder
        (tmp_path / f".out.zip.partial-{gone}-12345678" / "a.png").write_bytes(b"x")
        stale.append(tmp_path / f".out.zip.partial-{gone}-12345678")
        kept = [tmp_path / f".out.zip.partial-{alive.pid}",  # a run still writing
                tmp_path / f".out.zip.partial-{gone}-deadbeef",  # locked: a run on another host
                tmp_path / f".other.zip.partial-{gone}"]  # another destination's
        for path in kept:
            path.write_bytes(b"y")
        with open(kept[1], "rb") as locked:
            fcntl.flock(locked.fileno(), fcntl.LOCK_EX)
            assert len(convert_ok(src, tmp_path / "out.zip")) == 2
        assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    finally:
        alive.kill()
        alive.wait()


def test_interrupted_command_line_is_one_line(tmp_path, monkeypatch):
    """Ctrl-C while writing: one line, and nothing left (the library already removes its file)."""
    src, calls = folder_of(tmp_path / "src", grey(4)), []
    real_png_bytes = data.png_bytes

    def interrupted(image, **options):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_png_bytes(image, **options)

    monkeypatch.setattr(data, "png_bytes", interrupted)
    code, out, lines = run_cli(["dataset", f"--source={src}", f"--dest={tmp_path / 'out.zip'}"])
    assert code != 0 and len(lines) == 1, (code, lines)
    assert lines[0].startswith("edm-lit dataset:") and "out.zip" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("dest_name", ["out.zip", "out"])
def test_second_of_two_runs_to_one_destination_refuses(tmp_path, monkeypatch, dest_name):
    """Run A writes; meanwhile run B writes the same destination and finishes first: A refuses."""
    first, second = folder_of(tmp_path / "a", grey(3)), folder_of(tmp_path / "b", grey(2, seed=9))
    dest = tmp_path / dest_name
    real_png_bytes, started = data.png_bytes, []

    def meanwhile(image, **options):
        if not started:
            started.append(1)
            convert_dataset(second, dest, progress=False)  # run B, complete
        return real_png_bytes(image, **options)

    monkeypatch.setattr(data, "png_bytes", meanwhile)
    code, out, lines = run_cli(["dataset", f"--source={first}", f"--dest={dest}"])
    assert code == 1 and out == "" and len(lines) == 1, (code, out, lines)
    assert lines[0] == (f"edm-lit dataset: error: {dest}: another process created the destination "
                        "while this one was writing; it was left as it is and nothing was written")
    written = ImageFolderDataset(dest)  # B's data set, intact
    assert len(written) == 2 and np.array_equal(written[0][0][0], grey(2, seed=9)[0])
    assert not list(tmp_path.glob(".*partial*"))


# ---- wrong pixels or labels, written without a word ----

def test_16_bit_grey_png_keeps_its_high_byte(tmp_path):
    levels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1021 + 1000)  # 1000, 2021, ..., 65323
    src = folder_of(tmp_path / "src", [saved(PIL.Image.fromarray(levels))] * 2)
    assert PIL.Image.open(src / "0.png").mode == "I;16"
    written = convert_ok(src, tmp_path / "out.zip")
    assert np.array_equal(written[0][0][0], levels >> 8)
    assert written[0][0][0, 0, 0] == 3  # c97c66b wrote 1000 % 256 = 232
    assert np.array_equal(ImageFolderDataset(src)[1][0][0], levels >> 8)  # the reader: one rule
    eight = grey(1)[0]
    src8 = folder_of(tmp_path / "src8", [saved(PIL.Image.fromarray(eight.astype(np.uint16) * 257))])
    assert np.array_equal(ImageFolderDataset(src8)[0][0][0], eight)  # 8 bits saved as 16: exact


@pytest.mark.parametrize("palette", ["grey", "colour"])
def test_palette_png_is_written_as_its_colours(tmp_path, palette):
    index = (np.arange(64).reshape(8, 8) % 3).astype(np.uint8)
    entries = {"grey": [0, 0, 0, 90, 90, 90, 255, 255, 255],
               "colour": [255, 0, 0, 0, 255, 0, 10, 20, 30]}[palette]
    image = PIL.Image.fromarray(index, "P")
    image.putpalette(entries)
    src = folder_of(tmp_path / "src", [saved(image)] * 2)
    colours = np.array(entries, np.uint8).reshape(3, 3)[index].transpose(2, 0, 1)  # [3, 8, 8]
    expected = colours[:1] if palette == "grey" else colours
    assert np.array_equal(convert_ok(src, tmp_path / "out.zip")[0][0], expected)
    assert np.array_equal(ImageFolderDataset(src)[0][0], expected)


def test_palette_of_other_layouts_is_read_as_colours(tmp_path):
    index = (np.arange(64).reshape(8, 8) % 3).astype(np.uint8)
    image = PIL.Image.fromarray(index, "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30])
    for kind in ("bmp", "gif", "tiff"):  # palettes stored as BGRX, RGB and RGB;L
        buffer = io.BytesIO()
        image.save(buffer, format=kind)
        root = tmp_path / kind
        root.mkdir()
        (root / f"x.{kind}").write_bytes(buffer.getvalue())
        read = ImageFolderDataset(root)[0][0]
        assert np.array_equal(read, np.array(image.convert("RGB")).transpose(2, 0, 1)), kind


def test_1_bit_png_is_written_as_0_and_255(tmp_path):
    bits = np.eye(8, dtype=bool)
    src = folder_of(tmp_path / "src", [saved(PIL.Image.fromarray(bits))] * 2)
    assert np.array_equal(convert_ok(src, tmp_path / "out.zip")[0][0][0], bits * 255)


def fake_cifar(path: Path, data=None, labels=None, member_is_folder=False) -> Path:
    """cifar-10-python.tar.gz, 3 images a batch; batch 2 gets `data`, `labels`; 3 may be a folder."""
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w:gz") as tar:
        for b in range(1, 6):
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{b}")
            if member_is_folder and b == 3:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            batch = {"data": rng.integers(0, 256, [3, 3072], dtype=np.uint8), "labels": [1, 2, 3]}
            if b == 2:
                batch = {"data": batch["data"] if data is None else data,
                         "labels": labels or batch["labels"]}
            blob = pickle.dumps(batch, protocol=2)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


CIFAR = {  # what batch 2 holds -> the error naming it
    "float_pixels": (dict(data=np.full([3, 3072], 0.5)),
                     "data_batch_2: 'data' is float64 [3, 3072], expected integers [N, 3072]"),
    "pixels_above_255": (dict(data=np.full([3, 3072], 300)),
                         "data_batch_2: pixel values span 300..300, outside 0..255"),
    "negative_label": (dict(labels=[-1, 2, 3]), "data_batch_2: label -1 is not a class 0..9"),
    "label_not_integer": (dict(labels=[1.7, 2, 3]), "data_batch_2: label 1.7 is not a class 0..9"),
    "label_above_9": (dict(labels=[10, 2, 3]), "data_batch_2: label 10 is not a class 0..9"),
    "labels_shorter": (dict(labels=[1, 2]), "data_batch_2: 2 labels for 3 images"),
    "member_is_a_folder": (dict(member_is_folder=True), "data_batch_3: not a file in the archive"),
}


@pytest.mark.parametrize("case", list(CIFAR))
def test_cifar_archive_with_bad_batch_is_refused_naming_it(tmp_path, case):
    batch, fragment = CIFAR[case]
    archive = fake_cifar(tmp_path / "cifar-10-python.tar.gz", **batch)
    line = dataset_error(archive, tmp_path / "out.zip")
    assert f"{archive}/cifar-10-batches-py/{fragment}" in line, line


def test_good_cifar_archive_of_integer_arrays_is_converted(tmp_path):
    pixels = np.full([3, 3072], 200, np.int64)  # integers within 0..255: one meaning
    archive = fake_cifar(tmp_path / "cifar-10-python.tar.gz", data=pixels)
    written = convert_ok(archive, tmp_path / "out.zip")
    assert len(written) == 15 and (written[3][0] == 200).all() and written.label_dim == 4


# ---- tracebacks and hangs: the destination ----

def test_destination_under_a_file_is_refused_before_reading(tmp_path, source_not_read):
    (tmp_path / "afile").write_text("x")
    line = dataset_error("digits", tmp_path / "afile" / "o.zip")
    assert line == (f"edm-lit dataset: error: {tmp_path}/afile/o.zip: cannot write the destination "
                    f"({tmp_path}/afile is not a folder)")


@contextlib.contextmanager
def unprivileged():
    """Act as an ordinary user (root writes into read-only folders); needs POSIX."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.parametrize("dest_name", ["o.zip", "o"])
def test_read_only_destination_folder_is_refused_before_reading(dest_name, source_not_read):
    import tqdm.auto  # noqa: F401 - imported before dropping privileges

    top = Path(tempfile.mkdtemp())
    try:
        os.chmod(top, 0o755)
        (top / "ro").mkdir(mode=0o555)
        os.chmod(top / "ro", 0o555)
        with unprivileged():
            line = dataset_error("digits", top / "ro" / dest_name)
        assert line == (f"edm-lit dataset: error: {top}/ro/{dest_name}: cannot write the "
                        "destination (Permission denied)")
    finally:
        shutil.rmtree(top)


# ---- tracebacks and hangs: images ----

def test_decompression_bomb_is_a_dataset_error_naming_the_file(tmp_path):
    src = folder_of(tmp_path / "src", grey(2) + [png_header(100_000, 100_000)])
    expected = f"{src}/2.png: refusing to decode it: Image size (10000000000 pixels) exceeds limit"
    line = dataset_error(src, tmp_path / "out.zip")
    assert line.startswith(f"edm-lit dataset: error: {expected}")
    with pytest.raises(DatasetError, match="2.png: refusing to decode it"):
        ImageFolderDataset(src)  # what `train --data` and `fid calc` open
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w") as z:
        z.writestr(archive_name(0), png_header(100_000, 100_000))
    with pytest.raises(DatasetError, match=r"bomb.zip/00000/img00000000.png: refusing to decode"):
        ImageFolderDataset(tmp_path / "bomb.zip")


@pytest.mark.parametrize("fifo_name", ["x.png", "dataset.json", "sub/y.png"])
def test_fifo_in_an_image_folder_is_refused_without_opening_it(tmp_path, fifo_name):
    src = folder_of(tmp_path / "src", grey(2))
    (src / fifo_name).parent.mkdir(exist_ok=True)
    os.mkfifo(src / fifo_name)
    message = (f"{src}/{fifo_name}: not a regular file (a FIFO, socket or device); "
               "refusing to open it")
    with deadline(10):
        assert dataset_error(src, tmp_path / "out.zip") == f"edm-lit dataset: error: {message}"
        with pytest.raises(DatasetError) as info:
            ImageFolderDataset(src, use_labels=True)
    assert str(info.value) == message


def test_fifo_as_the_cifar_source_is_refused(tmp_path):
    os.mkfifo(tmp_path / "cifar-10-python.tar.gz")
    with deadline(10):
        line = dataset_error(tmp_path / "cifar-10-python.tar.gz", tmp_path / "out.zip")
    assert "cifar-10-python.tar.gz: not a regular file" in line


def test_image_that_disappears_after_opening_is_a_dataset_error(tmp_path):
    src = folder_of(tmp_path / "src", grey(2))
    ds = ImageFolderDataset(src)
    (src / "1.png").unlink()
    with pytest.raises(DatasetError, match=f"{src}/1.png: cannot open it: No such file"):
        ds[1]


# ---- tracebacks and hangs: flags ----

RESOLUTIONS = {  # --resolution -> the error
    "9" * 20 + "x" + "9" * 20: "x" + "9" * 20 + ": each side must be 8 to 4096 pixels",
    "65536x65536": "--resolution=65536x65536: each side must be 8 to 4096 pixels",
    "1x1": "--resolution=1x1: each side must be 8 to 4096 pixels",
    "4x4": "--resolution=4x4: each side must be 8 to 4096 pixels",
    "²x²": "--resolution must look like WxH",
    "12x12": "--resolution=12x12: the side must be a power of two from 8 to 4096, got 12",
    "16x8": "--resolution=16x8: the images written must be square (WxW) unless --transform=center-",
}


@pytest.mark.parametrize("resolution", list(RESOLUTIONS))
def test_resolution_out_of_range_is_refused_before_reading(tmp_path, resolution, source_not_read):
    with deadline(10):
        line = dataset_error("digits", tmp_path / "out.zip", f"--resolution={resolution}")
    assert RESOLUTIONS[resolution] in line, line


def test_center_crop_wide_band_taller_than_canvas_is_refused(tmp_path, source_not_read):
    flags = ["--resolution=8x16", "--transform=center-crop-wide"]
    line = dataset_error("digits", tmp_path / "out.zip", *flags)
    assert "--resolution=8x16: center-crop-wide puts a WxH band on a WxW canvas, so H must" in line


def test_source_images_too_small_without_resolution_are_refused(tmp_path):
    src = folder_of(tmp_path / "src", grey(2, size=2))
    line = dataset_error(src, tmp_path / "out.zip")
    assert f"{src}/0.png: the side must be a power of two from 8 to 4096, got 2 (use --res" in line


@pytest.mark.parametrize("count", ["0", "-3"])
def test_max_images_not_positive_names_the_flag(tmp_path, count, source_not_read):
    line = dataset_error("digits", tmp_path / "out.zip", f"--max-images={count}")
    assert f"max_images (--max-images) must be a positive integer or None, got {count}" in line


# ---- symbolic links: one rule, followed everywhere ----

def test_symbolic_links_to_files_and_folders_are_followed_alike(tmp_path):
    elsewhere = folder_of(tmp_path / "elsewhere" / "sub", grey(2, seed=3))
    src = folder_of(tmp_path / "src", grey(1))
    (src / "linked_folder").symlink_to(elsewhere, target_is_directory=True)
    (src / "linked_file.png").symlink_to(elsewhere / "1.png")
    # 0.png, linked_file.png, linked_folder/0.png, linked_folder/1.png
    expected = [grey(1)[0], grey(2, seed=3)[1], *grey(2, seed=3)]
    for ds in (ImageFolderDataset(src), convert_ok(src, tmp_path / "out.zip")):
        assert len(ds) == 4 and all(np.array_equal(ds[i][0][0], expected[i]) for i in range(4))


def test_symbolic_link_loop_and_broken_link_are_refused_naming_them(tmp_path):
    loop = folder_of(tmp_path / "loop", grey(2))
    (loop / "sub").mkdir()
    (loop / "sub" / "up").symlink_to(loop, target_is_directory=True)
    broken = folder_of(tmp_path / "broken", grey(2))
    (broken / "x.png").symlink_to(tmp_path / "nothing.png")
    for src, message in [(loop, f"{loop}/sub/up: a symbolic link loop"),
                         (broken, f"{broken}/x.png: cannot read it (a broken symbolic link)")]:
        with deadline(10):
            assert message in dataset_error(src, tmp_path / "out.zip")
            with pytest.raises(DatasetError, match="symbolic link"):
                ImageFolderDataset(src)


# ---- more of our own: archives and dataset.json ----

def zip_of(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, payload in members.items():
            z.writestr(name, payload)
    return path


def two_images_zip(path: Path) -> Path:
    return zip_of(path, {f"{i}.png": png(pixels) for i, pixels in enumerate(grey(2))})


def patched_zip(path: Path, flag_byte: int = None, method: int = None) -> Path:
    """Set a general-purpose flag bit (1: encrypted) or the compression method of every member."""
    raw = bytearray(two_images_zip(path).read_bytes())
    for signature, flags_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = raw.find(signature)
        while at >= 0:
            if flag_byte is not None:
                raw[at + flags_at] |= flag_byte
            if method is not None:
                raw[at + method_at:at + method_at + 2] = method.to_bytes(2, "little")
            at = raw.find(signature, at + 4)
    path.write_bytes(bytes(raw))
    return path


def bad_crc_zip(path: Path) -> Path:
    raw = bytearray(two_images_zip(path).read_bytes())
    raw[raw.find(b"IDAT") + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def duplicate_member_zip(path: Path) -> Path:
    zip_of(path, {"a.png": png(grey(1)[0]), "b.png": png(grey(1, seed=2)[0])})
    path.write_bytes(path.read_bytes().replace(b"b.png", b"a.png"))  # two members named a.png
    return path


ARCHIVES = {  # a ZIP -> the error, for the converter and the reader alike
    "duplicate_member": (duplicate_member_zip, "member 'a.png' occurs twice"),
    "bad_crc": (bad_crc_zip, "0.png: "),
    "deflate64": (lambda p: patched_zip(p, method=9),
                  "0.png: cannot read this member (That compression method is not supported)"),
    "encrypted": (lambda p: patched_zip(p, flag_byte=1),
                  "0.png: cannot read this member (File '0.png' is encrypted"),
}


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_damaged_archive_is_refused_naming_the_member(tmp_path, case):
    make, fragment = ARCHIVES[case]
    archive = make(tmp_path / "src.zip")
    assert fragment in dataset_error(archive, tmp_path / "out.zip")
    with pytest.raises(DatasetError, match="src.zip"):
        ds = ImageFolderDataset(archive)
        ds.verify()


LABELS = {  # dataset.json -> the error, for the converter and the reader alike
    "nested_too_deeply": ("[" * 100_000, "dataset.json: not valid JSON"),
    "nan_in_a_vector": ('{"labels": [["0.png", [NaN]], ["1.png", [1.0]]]}',
                        "dataset.json: label of '0.png' is [nan]"),
    "huge_in_a_vector": ('{"labels": [["0.png", [1e300]], ["1.png", [1.0]]]}',
                         "dataset.json: label of '0.png' is [1e+300]"),
    "class_beyond_int64": ('{"labels": [["0.png", %d], ["1.png", 1]]}' % 10 ** 30,
                           "dataset.json: label of '0.png' is 1000000"),
    "class_of_a_billion": ('{"labels": [["0.png", 1000000000], ["1.png", 1]]}',
                           "dataset.json: label of '0.png' is 1000000000"),
}


@pytest.mark.parametrize("case", list(LABELS))
def test_bad_labels_are_refused_naming_the_file(tmp_path, case):
    text, fragment = LABELS[case]
    src = folder_of(tmp_path / "src", grey(2))
    (src / "dataset.json").write_text(text)
    assert f"{src}/{fragment}" in dataset_error(src, tmp_path / "out.zip")
    with pytest.raises(DatasetError, match="dataset.json"):
        ImageFolderDataset(src, use_labels=True)


def test_one_hot_label_costs_its_length_not_its_square(tmp_path):
    src = folder_of(tmp_path / "src", grey(2))
    (src / "dataset.json").write_text(json.dumps({"labels": [["0.png", 0], ["1.png", 60_000]]}))
    ds = ImageFolderDataset(src, use_labels=True)
    with deadline(10):  # c97c66b built np.eye(60001): 14 GB
        label = ds.get_label(1)
    assert ds.label_dim == 60_001 and label.shape == (60_001,)
    assert label.argmax() == 60_000 and label.sum() == 1


def test_source_of_other_than_uint8_pixels_is_refused(tmp_path):
    """A Source of one's own that yields 16-bit pixels: refused, not wrapped modulo 256."""
    items = iter([(0, np.full([8, 8], 1000, np.uint16), None)])
    with pytest.raises(DatasetError, match="mine: image 0: pixels are uint16, expected uint8"):
        data.write_dataset(data.Source(1, items, False, lambda i: f"mine: image {i}"), tmp_path / "o.zip",
                           progress=False)
    assert list(tmp_path.iterdir()) == []
