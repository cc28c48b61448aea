"""`edm-lit fid ref|calc` on bad input (issues 13 and 15): one line naming the flag or file, exit 1,
nothing written under a final name, checked before the features are computed. Each test here failed on
c97c66b; the two about FIFOs and decompression bombs pass only with the data set's refusal of them
(ImageFolderDataset raising DatasetError, Chapter 6, another branch)."""
import hashlib
import io
import os
import struct
import threading
import zipfile
import zlib

import numpy as np
import pytest
import torch

import edm_lit.fid as fid
from edm_lit.cli import main as cli
from edm_lit.fid import InceptionV3Features, fid_calc, fid_ref, frechet_distance, load_inception, load_reference
from edm_lit.files import write_png

DIM = 8


class CountingFeatures:
    """A stand-in feature network (a fixed projection of the pixels) that counts its calls."""

    def __init__(self, dim=DIM):
        self.dim, self.calls = dim, 0

    def __call__(self, images):
        self.calls += 1
        proj = torch.linspace(-1, 1, images[0].numel() * self.dim).reshape(-1, self.dim)
        return (images.flatten(1).float() / 255) @ proj


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        write_png(tmp_path / "imgs" / f"{i:06d}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return tmp_path / "imgs"


@pytest.fixture
def fake_inception(monkeypatch):
    """`--detector=inception` without the download: load_inception returns the stand-in."""
    features = CountingFeatures()
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu", allow_download=True: features)
    return features


def run(capsys, *argv):
    code = cli(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err, kind="error"):
    lines = [line for line in err.strip().splitlines() if line.strip() and "batch/s" not in line]  # not the bar
    assert len(lines) == 1 and f": {kind}:" in lines[0] and lines[0].startswith("edm-lit fid"), err
    return lines[0]


def reference(path, dim=DIM, **arrays):
    a = np.random.default_rng(1).normal(size=(dim, dim))
    stats = dict(mu=np.zeros(dim), sigma=a @ a.T / dim)
    stats.update(arrays)
    np.savez(path, **stats)
    return path


@pytest.mark.parametrize("sub", ["calc", "ref"])
def test_batch_zero_is_refused_by_the_parser(images, tmp_path, capsys, sub, fake_inception):
    args = [f"--images={images}", f"--ref={reference(tmp_path / 'r.npz')}"] if sub == "calc" else \
        [f"--data={images}", f"--dest={tmp_path / 'out.npz'}"]
    with pytest.raises(SystemExit) as e:
        cli(["fid", sub, *args, "--batch=0"])
    assert e.value.code == 2 and "--batch: must be >= 1" in capsys.readouterr().err


def test_truncated_and_renamed_files_are_refused_in_one_line(images, tmp_path, capsys, fake_inception):
    good = reference(tmp_path / "good.npz")
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:300])
    np.save(tmp_path / "array.npy", np.zeros(3))
    os.replace(tmp_path / "array.npy", tmp_path / "renamed.npz")
    for bad in ("cut.npz", "renamed.npz"):
        code, _, err = run(capsys, "fid", "calc", f"--images={images}", f"--ref={tmp_path / bad}", "--num=6")
        assert code == 1 and bad in one_line(err) and "not a readable .npz" in err
    assert fake_inception.calls == 0  # refused before any feature was computed


def test_a_small_file_declaring_a_huge_sigma_is_refused_before_loading(tmp_path):
    header = io.BytesIO()
    declared = {"descr": "<f8", "fortran_order": False, "shape": (200_000, 200_000)}
    np.lib.format.write_array_header_1_0(header, declared)
    mu = io.BytesIO()
    np.save(mu, np.zeros(200_000))
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mu.npy", mu.getvalue())
        z.writestr("sigma.npy", header.getvalue() + bytes(1024))
    assert (tmp_path / "bomb.npz").stat().st_size < 10_000
    with pytest.raises(ValueError, match=r"sigma.npy declares \[200000, 200000\] float64 \(298 GiB\)"):
        load_reference(tmp_path / "bomb.npz")  # c97c66b asked for 298 GiB (MemoryError)


@pytest.mark.parametrize("what, arrays, says", [
    ("complex mu", dict(mu=np.zeros(DIM, complex)), "mu in .* must hold real numbers, got dtype complex128"),
    ("boolean sigma", dict(sigma=np.eye(DIM, dtype=bool)),
     "sigma in .* must hold real numbers, got dtype bool"),
    ("asymmetric sigma", dict(sigma=np.eye(DIM) + np.triu(np.ones((DIM, DIM)), 1)),
     "sigma in .* is not symmetric"),
])
def test_statistics_that_are_not_a_covariance_are_refused(tmp_path, what, arrays, says):
    path = reference(tmp_path / "r.npz", **arrays)
    with pytest.raises(ValueError, match=says):
        load_reference(path)  # c97c66b coerced these silently
    with pytest.raises(ValueError, match=says.replace(" in .*", "2")):
        frechet_distance(np.zeros(DIM), np.eye(DIM), *load_reference_unchecked(path))


def load_reference_unchecked(path):
    with np.load(path) as z:
        return z["mu"], z["sigma"]


def test_non_psd_reference_is_named_and_refused_before_the_features(images, tmp_path):
    path = reference(tmp_path / "negative.npz", sigma=-np.eye(DIM))
    features = CountingFeatures()
    with pytest.raises(ValueError, match=f"sigma in {path} is not positive semi-definite"):
        fid_calc(images, path, num=6, extractor=features, progress=False)
    assert features.calls == 0


def test_reference_of_another_feature_size_is_refused_at_the_first_batch(images, tmp_path):
    path = reference(tmp_path / "wide.npz", dim=2 * DIM)
    features = CountingFeatures()
    with pytest.raises(ValueError, match=f"gives {DIM}-d features, but {2 * DIM}-d are expected"):
        fid_calc(images, path, num=6, batch_size=2, extractor=features, progress=False)
    assert features.calls == 1  # not all three batches


def test_unwritable_dest_is_refused_before_the_features(images, tmp_path, capsys, fake_inception):
    (tmp_path / "blocker").write_text("")
    code, _, err = run(capsys, "fid", "ref", f"--data={images}", f"--dest={tmp_path / 'blocker' / 'ref.npz'}")
    assert code == 1 and "--dest" in one_line(err)
    assert fake_inception.calls == 0


def test_dest_names_are_reported_as_written(images, tmp_path, capsys, fake_inception):
    code, out, _ = run(capsys, "fid", "ref", f"--data={images}", f"--dest={tmp_path / 'noext'}")
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'noext.npz'}" and (tmp_path / "noext.npz").is_file()
    (tmp_path / "dir").mkdir()
    code, _, err = run(capsys, "fid", "ref", f"--data={images}", f"--dest={tmp_path / 'dir'}")
    assert code == 1 and "is a folder" in one_line(err) and not (tmp_path / "dir.npz").exists()


def test_inception_weights_are_checked_by_their_whole_sha256(tmp_path, monkeypatch):
    """c97c66b compared 32 bits: a file whose hash shares them passed."""
    weights = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(InceptionV3Features().state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    other = digest[:8] + ("0" if digest[8] != "0" else "1") + digest[9:]  # the same first 32 bits
    monkeypatch.setattr(fid, "INCEPTION_SHA256_PREFIX", digest[:8], raising=False)  # what c97c66b compared
    monkeypatch.setattr(fid, "INCEPTION_SHA256", other, raising=False)
    monkeypatch.setattr(fid, "INCEPTION_BYTES", weights.stat().st_size, raising=False)
    with pytest.raises(ValueError, match=f"its SHA-256 is {digest}, expected {other}"):
        load_inception(weights)


def test_detector_mismatch_is_refused_and_allowed_only_with_the_flag(images, tmp_path, capsys, fake_inception):
    nvidia = reference(tmp_path / "nvidia-style.npz")  # mu and sigma only, as NVIDIA's published fid-refs
    code, _, err = run(capsys, "fid", "calc", f"--images={images}", f"--ref={nvidia}", "--num=6")
    line = one_line(err)
    assert code == 1 and "NVIDIA's detector" in line and "inception-pytorch-fid:" in line
    assert "--allow-detector-mismatch" in line and fake_inception.calls == 0
    code, out, err = run(capsys, "fid", "calc", f"--images={images}", f"--ref={nvidia}", "--num=6",
                         "--allow-detector-mismatch")
    assert code == 0 and np.isfinite(float(out))
    assert "NVIDIA's detector" in one_line(err, kind="warning")
    # a reference our detector made is used without a word
    code, _, _ = run(capsys, "fid", "ref", f"--data={images}", f"--dest={tmp_path / 'ours.npz'}")
    assert fid.reference_detector(tmp_path / "ours.npz") == fid.INCEPTION_DETECTOR
    code, out, err = run(capsys, "fid", "calc", f"--images={images}", f"--ref={tmp_path / 'ours.npz'}",
                         "--num=6")
    assert code == 0 and abs(float(out)) < 1e-4 and "warning" not in err  # a set against itself: 0 + rounding


def test_fifo_in_an_image_folder_is_refused(images, tmp_path, capsys, fake_inception):
    """Needs ImageFolderDataset to refuse FIFOs with a DatasetError (Chapter 6, the data branch): on c97c66b the
    command blocks forever on opening the FIFO."""
    os.mkfifo(images / "000099.png")
    result = {}
    worker = threading.Thread(target=lambda: result.update(code=cli(["fid", "ref", f"--data={images}",
                                                                     f"--dest={tmp_path / 'r.npz'}"])))
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # unblock the reader so that the test process can end
        with open(images / "000099.png", "wb"):
            pass
        worker.join()
        pytest.fail("fid ref blocked on a FIFO in the image folder")
    assert result["code"] == 1 and "000099.png" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "r.npz").exists()


def test_decompression_bomb_png_is_refused(images, tmp_path, capsys, fake_inception):
    """Needs ImageFolderDataset to turn PIL's DecompressionBombError into a DatasetError (the data branch)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10^10 grey pixels declared
    (images / "000099.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    a = np.random.default_rng(1).normal(size=(DIM, DIM))
    fid.save_reference(tmp_path / "ours.npz", np.zeros(DIM), a @ a.T, detector=fid.INCEPTION_DETECTOR)
    code, _, err = run(capsys, "fid", "calc", f"--images={images}", f"--ref={tmp_path / 'ours.npz'}", "--num=6")
    assert code == 1 and "000099.png" in one_line(err)
    assert fake_inception.calls == 0
