"""edm_lit.data (Chapter 6): the official data-set layout, read and written; parity with the official tools;
bad data; atomic writes.

Reference files (tests/data/, made by tests/data/make_dataset_refs.py from the official code):
dataset_sources.zip (source images), dataset_official.zip (written by the official dataset_tool.py),
dataset_tool_refs.pt (the official tool's outputs), dataset_refs.pt (the official ImageFolderDataset's items).
"""
import contextlib
import importlib.util
import io
import json
import pickle
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from edm_lit.cli import main
from edm_lit.data import (DatasetError, ImageFolderDataset, Source, archive_name, convert_dataset, is_safe_member_name,
                          parse_resolution, quick_dataset, subset_indices, write_dataset)

DATA = Path(__file__).parent / "data"

def _reference_script():
    """tests/data/make_dataset_refs.py, the script that made the references (its tables, not its main)."""
    spec = importlib.util.spec_from_file_location("make_dataset_refs", DATA / "make_dataset_refs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


READER_CASES = _reference_script().READER_CASES  # the constructor arguments the references were made with
TOOL_CASES = {
    "square": ("square", {}),
    "square_8x8_max10": ("square", dict(resolution="8x8", max_images=10)),
    "rect_center_crop": ("rect", dict(transform="center-crop", resolution="16x16")),
    "rect_center_crop_wide": ("rect", dict(transform="center-crop-wide", resolution="16x8")),
    "square_zip_json": ("square.zip", {}),
}


def png(pixels) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="png")
    return buffer.getvalue()


def folder_of(root: Path, images, labels=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(images):
        (root / archive_name(i)).parent.mkdir(exist_ok=True)
        (root / archive_name(i)).write_bytes(png(pixels))
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def grey(n=3, size=8, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, [n, size, size], dtype=np.uint8))


def all_items(ds):
    items = [ds[i] for i in range(len(ds))]
    return np.stack([im for im, _ in items]), np.stack([lab for _, lab in items])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    with zipfile.ZipFile(DATA / "dataset_sources.zip") as z:
        z.extractall(root)
    return root


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("unpacked") / "dataset_official"
    with zipfile.ZipFile(DATA / "dataset_official.zip") as z:
        z.extractall(root)
    return root


# ---- parity with the official reader and tool ----

@pytest.mark.parametrize("kind", ["zip", "folder"])
@pytest.mark.parametrize("case", list(READER_CASES))
def test_reader_matches_official(parity, official_folder, kind, case):
    ref = parity("dataset_refs.pt")[case]
    path = DATA / "dataset_official.zip" if kind == "zip" else official_folder
    ds = ImageFolderDataset(path, **READER_CASES[case])
    assert len(ds) == ref["length"] and ds.name == ref["name"] == "dataset_official"
    assert ds.image_shape == ref["image_shape"] and ds.resolution == ref["resolution"]
    assert ds.label_shape == ref["label_shape"] and ds.label_dim == ref["label_dim"]
    assert ds.has_labels == ref["has_labels"]
    images, labels = all_items(ds)
    assert images.dtype == np.uint8 and labels.dtype == np.float32
    assert torch.equal(torch.from_numpy(images), ref["images"])
    assert torch.equal(torch.from_numpy(labels), ref["labels"])
    details = [ds.get_details(i) for i in range(len(ds))]
    assert [d.raw_idx for d in details] == ref["raw_idx"].tolist()
    assert [d.xflip for d in details] == ref["xflip"].tolist()


@pytest.mark.parametrize("case", list(TOOL_CASES))
def test_converter_matches_official_tool(parity, sources, tmp_path, case):
    ref = parity("dataset_tool_refs.pt")[case]
    source, options = TOOL_CASES[case]
    dest = convert_dataset(sources / source, tmp_path / "out.zip", progress=False, **options)
    with zipfile.ZipFile(dest) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        assert names == ref["names"]
        pixels = [np.array(PIL.Image.open(io.BytesIO(z.read(n)))) for n in names]
        labels = json.loads(z.read("dataset.json"))["labels"]
        assert all(z.getinfo(n).compress_type == zipfile.ZIP_STORED for n in names)
    pixels = np.stack([p if p.ndim == 3 else p[:, :, None] for p in pixels])
    assert torch.equal(torch.from_numpy(pixels), ref["images"])
    if ref["labels"] is None:
        assert labels is None
    else:
        assert [pair[0] for pair in labels] == ref["label_names"]
        assert [pair[1] for pair in labels] == ref["labels"].tolist()


def test_subset_is_a_seeded_sorted_sample():
    a, b = subset_indices(1000, 100, random_seed=1), subset_indices(1000, 100, random_seed=1)
    assert np.array_equal(a, b) and len(np.unique(a)) == 100 and (np.diff(a) > 0).all()
    assert not np.array_equal(a, subset_indices(1000, 100, random_seed=2))
    assert np.array_equal(subset_indices(50, 100), np.arange(50))


# ---- round trip, labels, one-hot ----

@pytest.mark.parametrize("dest_name", ["set.zip", "set"])
@pytest.mark.parametrize("channels", [1, 3])
def test_written_dataset_reads_back_bit_exact(tmp_path, dest_name, channels):
    rng = np.random.default_rng(channels)
    shape = [16, 16] if channels == 1 else [16, 16, 3]
    images = rng.integers(0, 256, [25, *shape], dtype=np.uint8)
    classes = rng.integers(0, 7, 25)
    source = Source(25, ((i, images[i], int(classes[i])) for i in range(25)), True)
    dest = write_dataset(source, tmp_path / dest_name, progress=False)
    ds = ImageFolderDataset(dest, use_labels=True)
    read, labels = all_items(ds)
    expected = images[:, None] if channels == 1 else images.transpose(0, 3, 1, 2)
    assert np.array_equal(read, expected)
    assert ds.label_dim == classes.max() + 1 and ds.has_labels and ds.has_onehot_labels
    assert np.array_equal(labels, np.eye(ds.label_dim, dtype=np.float32)[classes])
    assert (labels.sum(1) == 1).all()
    flipped = ImageFolderDataset(dest, xflip=True)
    assert len(flipped) == 50 and np.array_equal(flipped[25 + 3][0], expected[3][:, :, ::-1])
    assert flipped.get_label(0).shape == (0,) and not flipped.has_labels


def test_unlabelled_and_vector_labels(tmp_path):
    root = folder_of(tmp_path / "a", grey(3))
    ds = ImageFolderDataset(root, use_labels=True)
    assert ds.label_shape == [0] and ds[0][1].dtype == np.float32 and ds[0][1].shape == (0,)
    vectors = [[archive_name(i), [0.5 * i, 1.0]] for i in range(3)]
    ds = ImageFolderDataset(folder_of(tmp_path / "b", grey(3), vectors), use_labels=True)
    assert ds.label_shape == [2] and not ds.has_onehot_labels
    assert np.array_equal(ds[2][1], np.array([1.0, 1.0], np.float32))


def test_quick_dataset_is_the_digits(tmp_path):
    """The book's one loader of the digits (`digits_source`, written by `quick_dataset`) against its source:
    scikit-learn's own loader is the independent reference here, and only here."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    ds = ImageFolderDataset(quick_dataset(tmp_path / "digits.zip"), use_labels=True)
    assert len(ds) == 1797 and ds.image_shape == [1, 8, 8] and ds.label_dim == 10
    images, labels = all_items(ds)
    assert np.array_equal(images[:, 0], np.round(digits.images * 255 / 16).astype(np.uint8))
    assert np.array_equal(labels.argmax(1), digits.target)


def fake_cifar(path: Path, per_batch=3, hostile=False):
    rng = np.random.default_rng(5)
    with tarfile.open(path, "w:gz") as tar:
        for b in range(1, 6):
            batch = {"data": rng.integers(0, 256, [per_batch, 3072], dtype=np.uint8),
                     "labels": [int(k) for k in rng.integers(0, 10, per_batch)], "batch_label": f"batch {b}"}
            data = pickle.dumps(print if hostile and b == 2 else batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{b}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            yield batch


def test_cifar10_archive(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    batches = list(fake_cifar(archive))
    ds = ImageFolderDataset(convert_dataset(archive, tmp_path / "c.zip", progress=False), use_labels=True)
    images, labels = all_items(ds)
    expected = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    assert np.array_equal(images, expected)
    assert labels.argmax(1).tolist() == sum((b["labels"] for b in batches), [])
    limited = ImageFolderDataset(convert_dataset(archive, tmp_path / "d", max_images=4, progress=False))
    assert len(limited) == 4


def test_cifar10_archive_with_code_is_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    list(fake_cifar(archive, hostile=True))
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz: not a CIFAR-10 python archive.*refusing"):
        convert_dataset(archive, tmp_path / "c.zip", progress=False)
    assert not (tmp_path / "c.zip").exists()


def test_image_folder_labels_from_subfolders(tmp_path):
    for k, cls in enumerate(["zebra", "ant"]):
        for i, pixels in enumerate(grey(2, seed=k)):
            (tmp_path / "src" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "src" / cls / f"{i}.png").write_bytes(png(pixels))
    ds = ImageFolderDataset(convert_dataset(tmp_path / "src", tmp_path / "o.zip", progress=False), use_labels=True)
    assert ds.get_label(0).argmax() == 0 and ds.get_label(3).argmax() == 1  # ant < zebra
    assert np.array_equal(ds[0][0][0], grey(2, seed=1)[0])


# ---- bad data: a DatasetError naming the file ----

def _bad(tmp_path, name):
    return tmp_path / name


BAD = {
    "missing": (lambda r: r / "nowhere.zip", {}, "nowhere.zip: no such file"),
    "mixed": (lambda r: folder_of(r, grey(2) + [np.zeros([16, 16])]), {}, "img00000002.png: image shape"),
    "mixed_channels": (lambda r: folder_of(r, grey(2) + [np.zeros([8, 8, 3])]), {}, "img00000002.png: image shape"),
    "non_square": (lambda r: folder_of(r, [np.zeros([8, 6])] * 2), dict(resolution=8), "resolution=8 asks for 8x8"),
    "wrong_resolution": (lambda r: folder_of(r, grey(2)), dict(resolution=16), "asks for 16x16"),
    "truncated": (lambda r: (folder_of(r, grey(3)) / archive_name(1)).write_bytes(png(grey(1)[0])[:-30]) and r,
                  {}, "img00000001.png: truncated PNG"),
    "corrupt": (lambda r: (folder_of(r, grey(3)) / archive_name(2)).write_bytes(b"\x89PNG\r\n\x1a\nxx") and r,
                {}, "img00000002.png: not a readable image"),
    "not_an_image": (lambda r: (folder_of(r, grey(3)) / "00000/notes.png").write_bytes(b"hello") and r,
                     {}, "notes.png: not a readable image"),
    "label_missing": (lambda r: folder_of(r, grey(3), [[archive_name(0), 1], [archive_name(1), 1]]),
                      dict(use_labels=True), "dataset.json: no label for image '00000/img00000002.png'"),
    "label_extra": (lambda r: folder_of(r, grey(2), [[archive_name(i), 1] for i in range(3)]),
                    dict(use_labels=True), "dataset.json: label for '00000/img00000002.png', which is not an image"),
    "label_float": (lambda r: folder_of(r, grey(2), [[archive_name(0), 1], [archive_name(1), 1.5]]),
                    dict(use_labels=True), "label of '00000/img00000001.png' is 1.5"),
    "label_text": (lambda r: folder_of(r, grey(2), [[archive_name(0), "cat"], [archive_name(1), 1]]),
                   dict(use_labels=True), "label of '00000/img00000000.png' is 'cat'"),
    "label_negative": (lambda r: folder_of(r, grey(2), [[archive_name(0), -1], [archive_name(1), 1]]),
                       dict(use_labels=True), "label of '00000/img00000000.png' is -1"),
    "label_twice": (lambda r: folder_of(r, grey(2), [[archive_name(0), 0], [archive_name(0), 1]]),
                    dict(use_labels=True), "labelled twice"),
    "label_json": (lambda r: (folder_of(r, grey(2)) / "dataset.json").write_text("{labels: [") and r,
                   dict(use_labels=True), "dataset.json: not valid JSON"),
    "empty_folder": (lambda r: r, {}, "no image files found"),
    "empty_zip": (lambda r: zipfile.ZipFile(r / "e.zip", "w").close() or r / "e.zip", {}, "e.zip: no image files"),
    "not_a_zip": (lambda r: (r / "x.zip").write_bytes(b"PK nonsense") and r / "x.zip", {}, "x.zip: not a valid ZIP"),
    "not_a_dataset": (lambda r: (r / "x.txt").write_text("") or r / "x.txt", {}, "x.txt: a data set must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_refused_naming_the_file(tmp_path, case):
    make, kwargs, fragment = BAD[case]
    root = tmp_path / "ds"
    root.mkdir()
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(make(root), **kwargs)
    assert fragment in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "a/../../evil.png", "C:/evil.png", "..\\evil.png"])
def test_zip_path_traversal_is_refused(tmp_path, member):
    assert not is_safe_member_name(member)
    with zipfile.ZipFile(tmp_path / "t.zip", "w") as z:
        z.writestr(archive_name(0), png(grey(1)[0]))
        z.writestr(member, png(grey(1)[0]))
    with pytest.raises(DatasetError, match="t.zip: member .* points outside the archive"):
        ImageFolderDataset(tmp_path / "t.zip")
    with pytest.raises(DatasetError, match="points outside the archive"):
        convert_dataset(tmp_path / "t.zip", tmp_path / "out.zip", progress=False)
    assert not (tmp_path / "out.zip").exists()


def test_damage_inside_a_png_names_the_file_when_decoded(tmp_path):
    root = folder_of(tmp_path / "d", grey(3, size=32))
    data = bytearray((root / archive_name(1)).read_bytes())
    data[60:70] = bytes(10)  # inside the image data; header and IEND intact
    (root / archive_name(1)).write_bytes(bytes(data))
    ds = ImageFolderDataset(root)
    ds[0]
    with pytest.raises(DatasetError, match="img00000001.png: cannot decode"):
        ds[1]


def test_damage_inside_a_png_is_found_by_verify(tmp_path):
    root = folder_of(tmp_path / "d", grey(3, size=32))
    ImageFolderDataset(root).verify()  # intact: decodes every image without complaint
    data = bytearray((root / archive_name(2)).read_bytes())
    data[60:70] = bytes(10)
    (root / archive_name(2)).write_bytes(bytes(data))
    ds = ImageFolderDataset(root)
    with pytest.raises(DatasetError, match=f"{root}/00000/img00000002.png: cannot decode"):
        ds.verify()
    seed = next(seed for seed in range(100) if 2 not in subset_indices(3, 2, seed))
    ImageFolderDataset(root, max_size=2, random_seed=seed).verify()  # only the images kept are decoded


def test_non_square_dataset_opens_but_has_no_resolution(tmp_path):
    root = folder_of(tmp_path / "rect", [np.zeros([8, 6])] * 2)
    ds = ImageFolderDataset(root)
    assert ds.image_shape == [1, 8, 6] and len(ds) == 2
    with pytest.raises(DatasetError, match=f"{root}: images are 6x8, but a square resolution is required"):
        ds.resolution


def test_max_size_accepts_numpy_integers():
    plain = ImageFolderDataset(DATA / "dataset_official.zip", max_size=7, random_seed=3)
    for max_size in [np.int64(7), np.int32(7), np.uint8(7)]:
        ds = ImageFolderDataset(DATA / "dataset_official.zip", max_size=max_size, random_seed=3)
        assert [ds.get_details(i).raw_idx for i in range(len(ds))] == [plain.get_details(i).raw_idx
                                                                       for i in range(len(plain))]
    for bad in [True, np.bool_(True), 2.0, "3"]:
        with pytest.raises(ValueError, match="max_size"):
            ImageFolderDataset(DATA / "dataset_official.zip", max_size=bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_size"):
        ImageFolderDataset(DATA / "dataset_official.zip", max_size=0)
    with pytest.raises(ValueError, match="WxH"):
        parse_resolution("32")
    with pytest.raises(ValueError, match="needs a resolution"):
        convert_dataset("digits", "/nonexistent/x.zip", transform="center-crop")
    with pytest.raises(ValueError, match="transform must be"):
        convert_dataset("digits", "/nonexistent/x.zip", transform="crop", resolution="8x8")


def test_writer_refuses_bad_images_and_existing_dest(tmp_path):
    src = folder_of(tmp_path / "rect", [np.zeros([8, 6])] * 2)
    with pytest.raises(DatasetError, match="must be square"):
        convert_dataset(src, tmp_path / "o.zip", progress=False)
    src = folder_of(tmp_path / "odd", [np.zeros([12, 12])] * 2)
    with pytest.raises(DatasetError, match="power of two"):
        convert_dataset(src, tmp_path / "o.zip", progress=False)
    src = folder_of(tmp_path / "mixed", [np.zeros([8, 8]), np.zeros([16, 16])])
    with pytest.raises(DatasetError) as info:
        convert_dataset(src, tmp_path / "o", progress=False)
    assert str(info.value).startswith(f"{src}/00000/img00000001.png: image shape (H, W, C) is (16, 16, 1), "
                                      f"expected (8, 8, 1) like the first image ({src}/00000/img00000000.png)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed", "odd", "rect"]  # nothing left behind
    (tmp_path / "o.zip").write_bytes(b"keep me")
    with pytest.raises(DatasetError, match="o.zip: destination exists"):
        convert_dataset("digits", tmp_path / "o.zip", max_images=2, progress=False)
    assert (tmp_path / "o.zip").read_bytes() == b"keep me"


# ---- atomic writes ----

@pytest.mark.parametrize("dest_name", ["set.zip", "set"])
def test_interrupted_write_leaves_nothing(tmp_path, dest_name):
    def items():
        for i, pixels in enumerate(grey(20)):
            if i == 10:
                raise KeyboardInterrupt
            yield i, pixels, 0

    with pytest.raises(KeyboardInterrupt):
        write_dataset(Source(20, items(), True), tmp_path / dest_name, progress=False)
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = """
import sys, time, numpy as np
from edm_lit.data import Source, write_dataset
def items():
    for i in range(100000):
        if i == 5:
            print("writing", flush=True)
        time.sleep(0.01)
        yield i, np.full([8, 8], i % 256, np.uint8), 0
write_dataset(Source(100000, items(), True), sys.argv[1], progress=False)
"""


@pytest.mark.parametrize("dest_name", ["set.zip", "set"])
def test_killed_write_leaves_no_final_name(tmp_path, dest_name):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / dest_name)], cwd=root,
                            stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(root), "PATH": ""})
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / dest_name).exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{dest_name}.partial-")
    write_dataset(Source(2, ((i, pixels, 0) for i, pixels in enumerate(grey(2))), True), tmp_path / dest_name,
                  progress=False)  # the next run to that destination removes what the killed one left
    assert [p.name for p in tmp_path.iterdir()] == [dest_name] and len(ImageFolderDataset(tmp_path / dest_name)) == 2


# ---- the data set in worker processes, and the command line ----

def test_dataset_pickles_for_worker_processes():
    ds = ImageFolderDataset(DATA / "dataset_official.zip", use_labels=True)
    ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(copy[5][0], ds[5][0]) and np.array_equal(copy[5][1], ds[5][1])
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.uint8 and labels.shape == (8, 3)


def test_cli_dataset(tmp_path, sources):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["dataset", f"--source={sources / 'rect'}", f"--dest={tmp_path / 'r.zip'}",
                     "--transform=center-crop", "--resolution=8x8", "--max-images=4"]) == 0
        assert len(ImageFolderDataset(tmp_path / "r.zip")) == 4
        err.seek(0), err.truncate()
        assert main(["dataset", f"--source={tmp_path / 'missing'}", f"--dest={tmp_path / 'x.zip'}"]) == 1
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm-lit dataset: error:") and "missing" in lines[0]
    assert not (tmp_path / "x.zip").exists()


def _cli_error(args) -> str:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        assert main(args) == 1
    # stderr may also carry the progress bar of the images written before the error
    lines = [line.strip() for line in err.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("edm-lit dataset:")]
    assert errors == lines[-1:] and lines[-1].startswith("edm-lit dataset: error:"), lines
    assert "Traceback" not in err.getvalue() and out.getvalue() == ""
    return lines[-1]


SOURCE_LABELS = {  # a source's dataset.json and the error that names it
    "entry_without_label": ([["00000/img00000000.png"], ["00000/img00000001.png", 1]],
                            "entry ['00000/img00000000.png'] is not a [file name, label] pair"),
    "image_unlabelled": ([["00000/img00000000.png", 0]], "no label for image '00000/img00000001.png'"),
    "label_for_no_image": ([["00000/img00000000.png", 0], ["00000/img00000001.png", 1], ["x.png", 2]],
                           "label for 'x.png', which is not an image"),
    "label_float": ([["00000/img00000000.png", 0], ["00000/img00000001.png", 1.5]],
                    "label of '00000/img00000001.png' is 1.5"),
    "name_not_text": ([[0, 0], ["00000/img00000001.png", 1]], "entry [0, 0] is not a [file name, label] pair"),
    "labels_not_a_list": ({"00000/img00000000.png": 0}, "'labels' must be a list"),
}


@pytest.mark.parametrize("kind", ["folder", "zip"])
@pytest.mark.parametrize("case", list(SOURCE_LABELS))
def test_cli_refuses_bad_source_labels_naming_the_file(tmp_path, case, kind):
    labels, fragment = SOURCE_LABELS[case]
    src = folder_of(tmp_path / "src", grey(2), labels)
    if kind == "zip":
        with zipfile.ZipFile(tmp_path / "src.zip", "w") as z:
            for f in sorted(src.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(src).as_posix())
        src = tmp_path / "src.zip"
    line = _cli_error(["dataset", f"--source={src}", f"--dest={tmp_path / 'out.zip'}"])
    assert f"{src}/dataset.json: {fragment}" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", "src.zip"][:1 + (kind == "zip")])


def test_cli_malformed_source_json_names_the_file(tmp_path):
    src = folder_of(tmp_path / "src", grey(2))
    for text, fragment in [('{"labels": [["0.png"', "not valid JSON"), ("[1, 2]", "expected an object")]:
        (src / "dataset.json").write_text(text)
        line = _cli_error(["dataset", f"--source={src}", f"--dest={tmp_path / 'out'}"])
        assert f"{src}/dataset.json: {fragment}" in line
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_cli_mixed_source_resolutions_name_the_source_image(tmp_path):
    src = folder_of(tmp_path / "src", [np.zeros([8, 8]), np.zeros([8, 8]), np.zeros([16, 16])])
    line = _cli_error(["dataset", f"--source={src}", f"--dest={tmp_path / 'o3.zip'}"])
    assert (f"{src}/00000/img00000002.png: image shape (H, W, C) is (16, 16, 1), expected (8, 8, 1) like the first "
            f"image ({src}/00000/img00000000.png)") in line
    assert "o3.zip" not in line and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_labelled_source_item_without_label_is_refused(tmp_path):
    items = ((i, pixels, None if i == 1 else 0) for i, pixels in enumerate(grey(3)))
    with pytest.raises(DatasetError, match="image 1: no label"):
        write_dataset(Source(3, items, True, lambda i: f"mine: image {i}"), tmp_path / "o.zip", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        quick_dataset(tmp_path / "d.zip")
    assert not (tmp_path / "d.zip").exists()


def test_course_helpers_read_a_dataset_and_train_a_small_denoiser(tmp_path):
    """edm_lit.course (Chapter 6): dataset_tensors maps uint8 -> [-1, 1] exactly, with one-hot labels;
    train_denoiser takes the steps it is asked for, with finite losses, and changes the network."""
    from edm_lit.course import dataset_tensors, small_denoiser, train_denoiser

    pixels = [np.full([8, 8], v, np.uint8) for v in (0, 128, 255)]
    items = ((i, image, i % 2) for i, image in enumerate(pixels))
    ds = ImageFolderDataset(write_dataset(Source(3, items, True), tmp_path / "d.zip", progress=False),
                            use_labels=True)
    images, labels = dataset_tensors(ds)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float32
    assert torch.equal(images[:, 0, 0, 0], torch.tensor([0, 128, 255]) / 127.5 - 1)
    assert torch.equal(labels, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    torch.manual_seed(0)
    net = small_denoiser(8, 1, label_dim=2)
    before = [p.detach().clone() for p in net.parameters()]
    losses = train_denoiser(net, images, labels, steps=3, batch=4)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
