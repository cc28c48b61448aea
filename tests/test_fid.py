"""edm_lit.fid: Fréchet distance vs closed forms, streaming statistics, Inception structure, the command (Chapter 8)."""
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import edm_lit.fid as fid
from edm_lit.checkpoints import save_network
from edm_lit.cli import main as cli
from edm_lit.data import DatasetError
from edm_lit.fid import (FeatureStats, InceptionV3Features, fid_calc, fid_ref, frechet_distance, load_inception,
                         load_reference, save_reference)
from edm_lit.data import digit_classifier, train_digit_classifier
from edm_lit.files import write_png
from edm_lit.generate import generate

ROOT = Path(__file__).resolve().parents[1]


def spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def test_closed_forms():
    rng = np.random.default_rng(1)
    assert frechet_distance([0.5], [[0.25]], [2.0], [[4.0]]) == pytest.approx(1.5**2 + 1.5**2, rel=1e-12)
    d1, d2, m1, m2 = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50), rng.normal(size=50), rng.normal(size=50)
    exact = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(m1, np.diag(d1), m2, np.diag(d2)) == pytest.approx(exact, rel=1e-10)
    s = spd(rng, 50)
    assert frechet_distance(m1, s, m1, 4 * s) == pytest.approx(np.trace(s), rel=1e-10)  # (1 - 2)^2 tr S
    assert abs(frechet_distance(m1, s, m1, s)) < 1e-9 * np.trace(s)
    s2, (r, _) = spd(rng, 50), np.linalg.qr(rng.normal(size=(50, 50)))
    fd = frechet_distance(m1, s, m2, s2)
    assert frechet_distance(r @ m1, r @ s @ r.T, r @ m2, r @ s2 @ r.T) == pytest.approx(fd, rel=1e-9)
    assert frechet_distance(m2, s2, m1, s) == pytest.approx(fd, rel=1e-9)  # symmetric
    assert fd > 0


def test_matches_sqrtm_route_and_handles_singular_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    for rank in (None, 20):  # full rank, then two rank-20 covariances in 40 dimensions
        s1, s2, m1, m2 = spd(rng, 40, rank), spd(rng, 40, rank), rng.normal(size=40), rng.normal(size=40)
        textbook = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2) - 2 * np.real(np.trace(scipy_linalg.sqrtm(s1 @ s2)))
        ours = frechet_distance(m1, s1, m2, s2)
        assert isinstance(ours, float) and np.isfinite(ours)
        assert ours == pytest.approx(textbook, rel=1e-6)


def test_bad_statistics_refused():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(np.array([0, np.nan, 0]), eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=5.0, size=(777, 16)) @ rng.normal(size=(16, 16))
    for splits in ([1], [100, 101, 700], list(range(1, 777, 64))):
        stats = FeatureStats()
        for chunk in np.array_split(x, splits):
            stats.update(torch.from_numpy(chunk))
        assert stats.n == 777
        np.testing.assert_allclose(stats.mean(), x.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    float32_in = FeatureStats().update(torch.from_numpy(x).float())
    assert float32_in.total.dtype == torch.float64
    with pytest.raises(ValueError, match="does not match"):
        float32_in.update(torch.zeros(2, 17))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats().update(torch.zeros(1, 4)).cov()


def test_reference_layout_and_bad_files(tmp_path, monkeypatch):
    save_reference(tmp_path / "r.npz", np.arange(3.0), np.eye(3))
    with np.load(tmp_path / "r.npz") as z:
        assert sorted(z.files) == ["mu", "sigma"] and z["mu"].dtype == z["sigma"].dtype == np.float64
    mu, sigma = load_reference(tmp_path / "r.npz")
    assert np.array_equal(mu, np.arange(3.0)) and np.array_equal(sigma, np.eye(3))
    np.savez(tmp_path / "m.npz", sigma=np.eye(3))
    with pytest.raises(ValueError, match="lacks mu"):
        load_reference(tmp_path / "m.npz")
    np.savez(tmp_path / "s.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="lacks sigma"):
        load_reference(tmp_path / "s.npz")
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "none.npz")
    monkeypatch.setenv("EDM_LIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="could not download"):
        load_reference("http://127.0.0.1:9/fid-refs/cifar10-32x32.npz")


def test_inception_structure_with_random_weights():
    net = InceptionV3Features().eval()
    assert sum(p.numel() for p in net.parameters()) == 23_850_960  # torchvision's v3 without aux head, 1008 classes
    sd = net.state_dict()
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sd["fc.weight"].shape == (1008, 2048)
    with torch.no_grad():
        f = net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
        g = net(torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8))
    assert f.shape == (2, 2048) and g.shape == (1, 2048) and bool((f >= 0).all())
    with pytest.raises(ValueError, match="images must be"):
        net(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))


def test_inception_weights_loading(tmp_path, monkeypatch):
    monkeypatch.delenv("EDM_LIT_INCEPTION", raising=False)
    monkeypatch.setenv("EDM_LIT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth") as e:
        load_inception(allow_download=False)
    assert str(tmp_path / "empty-cache") in str(e.value)
    with pytest.raises(FileNotFoundError, match="download failed"):
        monkeypatch.setattr(fid, "INCEPTION_URL", "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
        load_inception()
    weights = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(InceptionV3Features().state_dict(), weights)
    with pytest.raises(ValueError, match="is not pt_inception-2015-12-05-6726825d.pth"):
        load_inception(weights)
    monkeypatch.setattr(fid, "INCEPTION_SHA256", hashlib.sha256(weights.read_bytes()).hexdigest())
    monkeypatch.setattr(fid, "INCEPTION_BYTES", weights.stat().st_size)
    monkeypatch.setenv("EDM_LIT_INCEPTION", str(weights))
    net = load_inception()
    assert torch.equal(net.state_dict()["Mixed_5b.branch_pool.conv.weight"],
                       torch.load(weights, weights_only=True)["Mixed_5b.branch_pool.conv.weight"])


@pytest.fixture(scope="module")
def tiny_net(parity_net):
    return parity_net


def pixel_features(images):
    proj = torch.linspace(-1, 1, images[0].numel() * 8).reshape(-1, 8)
    return (images.flatten(1).float() / 255) @ proj


def test_generate_then_fid_end_to_end(tiny_net, tmp_path, monkeypatch, capsys):
    """`edm-lit generate` then `edm-lit fid ref` and `fid calc` on a tiny network (a pixel-projection extractor
    stands in for Inception, whose weights are a download)."""
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu", allow_download=True: pixel_features)
    save_network(tiny_net, tmp_path / "tiny")
    assert cli(["generate", f"--network={tmp_path / 'tiny.json'}", f"--outdir={tmp_path / 'a'}", "--seeds=0-11",
                "--subdirs", "--steps=2", "--batch=5"]) == 0
    assert cli(["generate", f"--network={tmp_path / 'tiny.json'}", f"--outdir={tmp_path / 'b'}", "--seeds=100-111",
                "--steps=2", f"--npz={tmp_path / 'b.npz'}"]) == 0
    assert cli(["fid", "ref", f"--data={tmp_path / 'a'}", f"--dest={tmp_path / 'ref.npz'}"]) == 0
    capsys.readouterr()
    assert cli(["fid", "calc", f"--images={tmp_path / 'b'}", f"--ref={tmp_path / 'ref.npz'}", "--num=12"]) == 0
    printed = float(capsys.readouterr().out.strip())
    direct = fid_calc(tmp_path / "b.npz", tmp_path / "ref.npz", num=12, extractor=pixel_features, progress=False)
    assert printed == pytest.approx(direct, rel=1e-6) and printed > 0
    assert abs(fid_calc(tmp_path / "a", tmp_path / "ref.npz", num=12, extractor=pixel_features, progress=False)) < 1e-6 * printed
    # a subset: --num smaller than the folder, chosen by --seed
    sub = fid_calc(tmp_path / "b", tmp_path / "ref.npz", num=6, seed=3, extractor=pixel_features, progress=False)
    assert np.isfinite(sub)


def test_fid_bad_input(tiny_net, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu", allow_download=True: pixel_features)
    generate(tiny_net, tmp_path / "imgs", seeds="0-3", progress=False, num_steps=2)
    fid_ref(tmp_path / "imgs", tmp_path / "ref.npz", extractor=pixel_features, progress=False)
    np.savez(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="64-d are expected"):
        fid_calc(tmp_path / "imgs", tmp_path / "d64.npz", num=4, extractor=pixel_features)
    with pytest.raises(ValueError, match="found 4 images"):
        fid_calc(tmp_path / "imgs", tmp_path / "ref.npz", extractor=pixel_features)  # default num = 50,000
    write_png(tmp_path / "imgs" / "odd.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="differs"):
        fid_calc(tmp_path / "imgs", tmp_path / "ref.npz", num=4, extractor=pixel_features)
    capsys.readouterr()
    for argv in (["fid", "calc", f"--images={tmp_path / 'imgs'}", f"--ref={tmp_path / 'ref.npz'}", "--num=4"],
                 ["fid", "calc", f"--images={tmp_path / 'nothing'}", f"--ref={tmp_path / 'ref.npz'}", "--num=4"],
                 ["fid", "calc", f"--images={tmp_path / 'imgs'}", f"--ref={tmp_path / 'nope.npz'}", "--num=4"],
                 ["fid", "ref", f"--data={tmp_path / 'nothing'}", f"--dest={tmp_path / 'r2.npz'}"]):
        assert cli(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("edm-lit fid ") and "error:" in err and len(err.strip().splitlines()) == 1


def test_digit_features_learn_the_digits():
    pytest.importorskip("sklearn")
    from edm_lit.data import digits_source  # the one digits loader (Chapter 6)

    items = list(digits_source().items)
    images = torch.from_numpy(np.stack([np.asarray(image) for _, image, _ in items]))[:, None]
    labels = torch.tensor([label for _, _, label in items])
    model = train_digit_classifier(images[:1500], labels[:1500], steps=300)
    acc = (model(images[1500:]).argmax(1) == labels[1500:]).float().mean().item()
    assert acc > 0.85
    assert model.features(images[:3]).shape == (3, 64)
    with pytest.raises(ValueError, match="one label each"):
        train_digit_classifier(images[:5], labels[:4])


def _reduce_worker(rank, store, features, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        stats = FeatureStats()
        if rank == 0:  # rank 1 received no batch (more processes than batches)
            stats.update(torch.from_numpy(features))
        stats.all_reduce()
        np.savez(f"{out}-{rank}.npz", n=stats.n, mu=stats.mean(), sigma=stats.cov())
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_with_a_process_that_saw_no_images(tmp_path):
    x = np.random.default_rng(4).normal(size=(9, 5))
    torch.multiprocessing.spawn(_reduce_worker, args=(str(tmp_path / "store"), x, str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        got = np.load(tmp_path / f"out-{rank}.npz")
        assert int(got["n"]) == 9
        np.testing.assert_allclose(got["mu"], x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(got["sigma"], np.cov(x, rowvar=False), rtol=1e-10)
    assert FeatureStats().all_reduce().n == 0  # not distributed: a no-op, also when empty


def test_offline_inception_message_names_the_one_path_the_loader_finds(tmp_path, monkeypatch):
    monkeypatch.delenv("EDM_LIT_INCEPTION", raising=False)
    monkeypatch.setenv("EDM_LIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "INCEPTION_URL", "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    messages = []
    for allow_download in (False, True):
        with pytest.raises(FileNotFoundError) as e:
            fid.inception_weights_path(allow_download=allow_download)
        messages.append(str(e.value))
    targets = {p for m in messages for p in re.findall(r"save it as (\S+?)[ );]", m)}
    assert targets == {str(fid.inception_cache_path())}, messages
    target = fid.inception_cache_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"stand-in weights")
    assert fid.inception_weights_path(allow_download=False) == target
    assert fid.download(fid.INCEPTION_URL) == target  # the file download() would write is that one


@pytest.fixture(scope="module")
def detector_cache(tmp_path_factory):
    """One digits-detector cache for this module's tests (the first use trains it, a few seconds)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDM_LIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def test_cli_digits_fid_end_to_end_on_the_quick_model(detector_cache, tmp_path, capsys):
    """Issue 10: `edm-lit generate` + `edm-lit fid ref|calc --detector=digits` on Chapter 7's committed quick model."""
    pytest.importorskip("sklearn")
    quick = ROOT / "book" / "results" / "quick_digits.json"
    assert cli(["dataset", "--source=digits", f"--dest={tmp_path / 'digits.zip'}"]) == 0
    assert cli(["generate", f"--network={quick}", f"--outdir={tmp_path / 'out'}", "--seeds=0-23", "--batch=12"]) == 0
    assert cli(["fid", "ref", f"--data={tmp_path / 'digits.zip'}", f"--dest={tmp_path / 'ref.npz'}",
                "--detector=digits"]) == 0
    capsys.readouterr()
    assert cli(["fid", "calc", f"--images={tmp_path / 'out'}", f"--ref={tmp_path / 'ref.npz'}", "--num=24",
                "--detector=digits"]) == 0
    printed = float(capsys.readouterr().out.strip())
    api = fid_calc(tmp_path / "out", tmp_path / "ref.npz", num=24, detector="digits", progress=False)
    net = digit_classifier()
    by_hand = fid_calc(tmp_path / "out", tmp_path / "ref.npz", num=24, extractor=net.features, progress=False)
    assert printed == pytest.approx(api, rel=5e-6) and api == pytest.approx(by_hand, rel=1e-9) and printed > 0
    with np.load(tmp_path / "ref.npz") as z:
        assert sorted(z.files) == ["detector", "mu", "sigma"] and z["mu"].shape == (64,)
    assert fid.reference_detector(tmp_path / "ref.npz") == fid.digits_detector_name(net)
    # the default detector against a digits reference: refused before any Inception weights are looked for
    assert cli(["fid", "calc", f"--images={tmp_path / 'out'}", f"--ref={tmp_path / 'ref.npz'}", "--num=24"]) == 1
    err = capsys.readouterr().err
    assert "'digits:" in err and "'inception-pytorch-fid:" in err and len(err.strip().splitlines()) == 1


def test_digits_detector_is_cached_and_mismatches_are_refused(detector_cache, tmp_path):
    pytest.importorskip("sklearn")
    a, b = digit_classifier(), digit_classifier()
    assert fid.digits_detector_name(a) == fid.digits_detector_name(b)
    assert list((fid.cache_dir()).glob("digits-detector-*.pt"))
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    for i, image in enumerate(images):
        write_png(tmp_path / "imgs" / f"{i:06d}.png", image.permute(1, 2, 0))
    mu, sigma = fid.feature_statistics_of(a.features(images))
    save_reference(tmp_path / "other.npz", mu, sigma, detector="digits:000000000000")  # another digits network
    save_reference(tmp_path / "plain.npz", mu, sigma)  # no record: counts as NVIDIA's detector
    for ref in ("other.npz", "plain.npz"):
        with pytest.raises(ValueError, match="feature network"):
            fid_calc(tmp_path / "imgs", tmp_path / ref, num=6, detector="digits", progress=False)
    with pytest.raises(ValueError, match="detector must be one of"):
        fid_calc(tmp_path / "imgs", tmp_path / "plain.npz", num=6, detector="clip", progress=False)
    with pytest.raises(ValueError, match="grey 8x8"):
        fid.DigitsExtractor(a)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_course_digits_fid_equals_fid_calc(detector_cache, tmp_path):
    """edm_lit.course.DigitsFID (images in memory, Chapters 8.7 and 9) is fid_calc --detector=digits."""
    pytest.importorskip("sklearn")
    from edm_lit.course import DigitsFID
    from edm_lit.data import quick_dataset

    judge = DigitsFID()
    images = judge.real[100:160]
    for i, image in enumerate(images):
        write_png(tmp_path / "imgs" / f"{i:06d}.png", image.permute(1, 2, 0))
    fid_ref(quick_dataset(tmp_path / "d.zip"), tmp_path / "ref.npz", detector="digits", progress=False)
    api = fid_calc(tmp_path / "imgs", tmp_path / "ref.npz", num=60, detector="digits", progress=False)
    in_memory = judge(judge.features(images))
    assert in_memory == pytest.approx(api, rel=1e-6) and in_memory > 0  # float32 batches
    assert torch.equal(judge.features(images), judge.features(images.permute(0, 2, 3, 1)))
