"""edm_lit.generate: per-seed determinism (official draw order), file layout, the command, bad input (Chapter 8)."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_lit.checkpoints import CheckpointError, load_network, save_network
from edm_lit.cli import main as cli
from edm_lit.generate import PerSeedRandom, generate, image_path, parse_seeds, sample_seeds, seed_batches
from edm_lit.precond import EDMPrecond

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def net(parity_net):
    return parity_net


@pytest.fixture(scope="module")
def net_file(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "tiny"
    save_network(net, path)
    return path.with_suffix(".json")


def test_per_seed_draws_match_official_generate_py(parity):
    ref = parity("sampler_edm.pt")
    rnd = PerSeedRandom(ref["generate_py_seeds"])
    assert torch.equal(rnd.randn([4, 3, 16, 16]), ref["generate_py_latents_cpu"])
    assert torch.equal(rnd.randint(10, [4]), ref["generate_py_label_idx_cpu"])


def test_rows_are_independent_and_seed_wraps_modulo_2_32():
    a = PerSeedRandom([5, 6, 7]).randn([3, 4])
    assert torch.equal(PerSeedRandom([7]).randn([1, 4])[0], a[2])
    assert torch.equal(PerSeedRandom([5 + (1 << 32)]).randn([1, 4])[0], a[0])
    with pytest.raises(ValueError, match="batch size"):
        PerSeedRandom([1, 2]).randn([3, 4])


def test_parse_seeds():
    assert parse_seeds("1,2,5-7") == [1, 2, 5, 6, 7]
    assert parse_seeds("0-49999")[-1] == 49999 and len(parse_seeds("0-49999")) == 50000
    assert parse_seeds("-5") == [-5] and parse_seeds("-1,+2,3-4") == [-1, 2, 3, 4]  # as the official int(p)
    for bad in ["a", "3-1", "1,,2", "-5-3", "1.5"]:
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)


def test_negative_seed_is_taken_modulo_2_32(tmp_path, capsys):
    assert torch.equal(PerSeedRandom([-1]).randn([1, 5]), PerSeedRandom([(1 << 32) - 1]).randn([1, 5]))
    kwargs = dict(progress=False, num_steps=2)
    generate(PixelGaussian(), tmp_path / "neg", seeds="-1", **kwargs)
    generate(PixelGaussian(), tmp_path / "pos", seeds=[(1 << 32) - 1], **kwargs)
    assert os.listdir(tmp_path / "neg") == ["-00001.png"]  # the official f"{seed:06d}.png"
    assert (tmp_path / "neg" / "-00001.png").read_bytes() == (tmp_path / "pos" / "4294967295.png").read_bytes()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_seed_batches_cover_every_seed_once(world_size):
    seeds = list(range(23))
    got = [s for r in range(world_size) for b in seed_batches(seeds, 4, world_size, r) for s in b]
    assert sorted(got) == seeds
    counts = {len(seed_batches(seeds, 4, world_size, r)) for r in range(world_size)}
    assert len(counts) == 1  # every process runs the same number of batches (collectives stay in step)
    assert max(len(b) for r in range(world_size) for b in seed_batches(seeds, 4, world_size, r)) <= 4


class PixelGaussian:
    """Ideal denoiser of independent N(m, s^2) pixels: treats each image on its own, in float64."""

    img_channels, img_resolution, label_dim, sigma_min, sigma_max = 3, 16, 0, 0.0, math.inf

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        return 0.2 + 0.16 / (0.16 + sigma**2) * (x - 0.2)


def test_png_bytes_identical_across_batch_sizes(tmp_path):
    kwargs = dict(seeds="0-6", progress=False, num_steps=5, S_churn=5)
    for batch in (1, 3, 7):
        generate(PixelGaussian(), tmp_path / f"b{batch}", max_batch_size=batch, **kwargs)
    names = sorted(os.listdir(tmp_path / "b1"))
    assert names == [f"{s:06d}.png" for s in range(7)]
    for name in names:
        one = (tmp_path / "b1" / name).read_bytes()
        assert one == (tmp_path / "b7" / name).read_bytes() == (tmp_path / "b3" / name).read_bytes()


def test_network_images_across_batch_sizes_within_one_level(net):
    """A float32 network's kernels may sum in another order for another batch size: at most 1 level, rarely."""
    kwargs = dict(num_steps=6, S_churn=5)
    whole = sample_seeds(net, range(6), **kwargs).int()
    for batch in (1, 4):
        parts = torch.cat([sample_seeds(net, b, **kwargs) for b in seed_batches(list(range(6)), batch)]).int()
        assert (whole - parts).abs().max() <= 1 and ((whole - parts) != 0).float().mean() < 0.01


def test_subdirs_npz_and_class(net, tmp_path):
    generate(net, tmp_path / "out", seeds=[999, 1000, 2500], subdirs=True, npz=tmp_path / "all.npz", progress=False,
             num_steps=2, class_idx=3)
    assert image_path("x", 2500, True) == os.path.join("x", "002000", "002500.png")
    for seed in (999, 1000, 2500):
        assert Path(image_path(tmp_path / "out", seed, True)).is_file()
    stored = np.load(tmp_path / "all.npz")
    assert stored["images"].dtype == np.uint8 and stored["images"].shape == (3, 16, 16, 3)
    assert np.array_equal(stored["images"], sample_seeds(net, [999, 1000, 2500], class_idx=3, num_steps=2).numpy())
    # the class changes the image; a random class is drawn per seed otherwise
    assert not torch.equal(sample_seeds(net, [999], class_idx=3, num_steps=2), sample_seeds(net, [999], class_idx=4, num_steps=2))


def test_ablation_options_select_the_ablation_sampler(net):
    base = sample_seeds(net, [0, 1], num_steps=4)
    same = sample_seeds(net, [0, 1], num_steps=4, solver="heun", discretization="edm", schedule="linear", scaling="none")
    euler = sample_seeds(net, [0, 1], num_steps=4, solver="euler")
    assert (base.int() - same.int()).abs().max() <= 1  # the two samplers agree up to rounding
    assert not torch.equal(base, euler)


def test_bad_class_and_missing_network(net, tmp_path):
    uncond = EDMPrecond(16, 3, model_type="SongUNet", model_channels=16, channel_mult=[1], num_blocks=1,
                        attn_resolutions=[])
    with pytest.raises(ValueError, match="unconditional"):
        generate(uncond, tmp_path, seeds="0", class_idx=1, progress=False)
    with pytest.raises(ValueError, match="class_idx"):
        sample_seeds(net, [0], class_idx=10, num_steps=2)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        generate(str(tmp_path / "missing.pkl"), tmp_path / "out", seeds="0", progress=False)


def _cli(capsys, *argv):
    code = cli(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_and_errors(net_file, tmp_path, capsys, monkeypatch):
    code, out, _ = _cli(capsys, "generate", f"--network={net_file}", f"--outdir={tmp_path / 'o'}", "--seeds=3,5-6",
                        "--batch=2", "--steps=3", "--S_churn=1", "--disc=vp", "--schedule=vp", "--scaling=vp",
                        "--solver=euler")
    assert code == 0 and "wrote 3 images" in out
    assert sorted(os.listdir(tmp_path / "o")) == ["000003.png", "000005.png", "000006.png"]
    code, _, err = _cli(capsys, "generate", f"--network={tmp_path / 'nope.pkl'}", f"--outdir={tmp_path / 'x'}")
    assert code == 1 and err.startswith("edm-lit generate: error:") and "nope.pkl" in err
    monkeypatch.setenv("EDM_LIT_CACHE", str(tmp_path / "cache"))
    code, _, err = _cli(capsys, "generate", "--network=http://127.0.0.1:9/edm.pkl", f"--outdir={tmp_path / 'x'}")
    assert code == 1 and "could not download" in err and "offline" in err
    with pytest.raises(SystemExit):
        cli(["generate", f"--network={net_file}", "--outdir=x", "--batch=0"])
    capsys.readouterr()


def test_torchrun_two_processes_match_one(net_file, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not found")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "edm_lit.cli", "generate", f"--network={net_file}",
           f"--outdir={tmp_path / 'multi'}", "--seeds=0-4", "--batch=2", "--steps=2", f"--npz={tmp_path / 'm.npz'}"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    generate(str(net_file), tmp_path / "single", seeds="0-4", max_batch_size=5, progress=False, num_steps=2)
    for s in range(5):
        name = f"{s:06d}.png"
        assert (tmp_path / "multi" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    assert np.load(tmp_path / "m.npz")["images"].shape == (5, 16, 16, 3)


def test_quick_model_script_reproduces_committed_file(tmp_path):
    """tools/make_quick_model.py rerun vs book/results/quick_digits: bit-identical on the machine that made it;
    on another CPU, rounding drift within edm_lit.course.REPRODUCTION_TOLERANCE (the check Chapter 7 makes)."""
    from edm_lit.course import REPRODUCTION_TOLERANCE, compare_models

    committed = ROOT / "book" / "results" / "quick_digits"
    meta = json.loads(Path(str(committed) + ".meta.json").read_text())
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_quick_model.py"), f"--out={tmp_path / 'q'}"],
                   check=True, env=env, capture_output=True, timeout=900)
    diff = compare_models(load_network(tmp_path / "q.json"), load_network(committed.with_suffix(".json")))
    rerun = json.loads((tmp_path / "q.meta.json").read_text())
    loss_diff = abs(rerun["final_loss"] - meta["final_loss"]) / meta["final_loss"]
    print(diff, loss_diff)
    assert rerun["flags"] == meta["flags"]
    assert max(diff["outputs"].values()) <= REPRODUCTION_TOLERANCE["outputs"], diff
    assert diff["weights"] <= REPRODUCTION_TOLERANCE["weights"], diff
    assert loss_diff <= REPRODUCTION_TOLERANCE["final_loss"], loss_diff
