"""Chapter 7b's full mode and the device: the paper's recipe per resolution through the command line, --fp16 per device."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_lit import train as train_cli
from edm_lit.course import full_size_flags
from edm_lit.training import paper_recipe


def rgb_folder(root, resolution, n=4, classes=0):
    """n random RGB PNGs in the official folder layout (dataset.json labels when classes > 0)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = Path(root)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(root / f"{i:05d}.png")
    if classes:
        (root / "dataset.json").write_text(json.dumps({"labels": [[f"{i:05d}.png", i % classes] for i in range(n)]}))
    return root


def dry_run_options(capsys, argv) -> dict:
    assert train_cli.main([*argv, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out.split("Training options:")[1].split("\n\n")[0])


def test_32x32_labelled_gets_the_official_cifar10_conditional_ddpmpp(tmp_path, capsys):
    data = rgb_folder(tmp_path / "cifar10-32x32", 32, classes=10)
    flags = full_size_flags(data, 200)
    ours = dry_run_options(capsys, ["--outdir", str(tmp_path / "runs"), *train_cli.to_argv(flags)])
    readme = dry_run_options(capsys, ["--outdir", str(tmp_path / "runs"), f"--data={data}", "--cond=1", "--arch=ddpmpp",
                                      "--duration=0.2", "--tick=20", "--snap=5", "--dump=10", "--seed=0"])
    assert ours == readme  # the command of the official README, for 200 kimg
    assert ours["network_kwargs"] == {
        "model_type": "SongUNet", "embedding_type": "positional", "encoder_type": "standard",
        "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1], "model_channels": 128,
        "channel_mult": [2, 2, 2], "class_name": "edm_lit.precond.EDMPrecond", "augment_dim": 9, "dropout": 0.13,
        "use_fp16": False}
    assert ours["dataset_kwargs"]["use_labels"] is True and ours["augment_kwargs"]["p"] == 0.12
    assert (ours["batch_size"], ours["optimizer_kwargs"]["lr"], ours["ema_halflife_kimg"], ours["lr_rampup_kimg"],
            ours["total_kimg"], ours["loss_kwargs"]["class_name"]) == (512, 1e-3, 500, 10000, 200, "edm_lit.loss.EDMLoss")


@pytest.mark.parametrize("labelled", [False, True])
def test_64x64_gets_the_ffhq_recipe(tmp_path, capsys, labelled):
    data = rgb_folder(tmp_path / "ffhq-64x64", 64, classes=3 if labelled else 0)
    flags = full_size_flags(data, 1001)
    ours = dry_run_options(capsys, ["--outdir", str(tmp_path / "runs"), *train_cli.to_argv(flags)])
    readme = dry_run_options(capsys, ["--outdir", str(tmp_path / "runs"), f"--data={data}", f"--cond={int(labelled)}",
                                      "--arch=ddpmpp", "--batch=256", "--cres=1,2,2,2", "--lr=2e-4", "--dropout=0.05",
                                      "--augment=0.15", f"--duration={flags['duration']}", "--tick=100", "--snap=5",
                                      "--dump=10", "--seed=0"])
    assert ours == readme
    assert ours["network_kwargs"]["channel_mult"] == [1, 2, 2, 2] and ours["network_kwargs"]["dropout"] == 0.05
    assert (ours["batch_size"], ours["optimizer_kwargs"]["lr"], ours["augment_kwargs"]["p"]) == (256, 2e-4, 0.15)
    assert ours["dataset_kwargs"]["use_labels"] is labelled
    assert ours["total_kimg"] == 1001  # --duration=1.001 would give 1000 (1.001 * 1000 = 1000.99...)


def test_no_recipe_for_other_resolutions(tmp_path):
    with pytest.raises(ValueError, match="no paper recipe for 16x16"):
        paper_recipe(16, labelled=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine --fp16 trains")
def test_fp16_without_cuda_dry_run_warns_and_a_real_run_is_refused(tmp_path, capsys):
    data = rgb_folder(tmp_path / "data", 32)
    argv = ["--outdir", str(tmp_path / "runs"), f"--data={data}", "--fp16=1", "--seed=0"]
    assert train_cli.main([*argv, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert '"use_fp16": true' in captured.out and "Dry run; exiting." in captured.out
    assert captured.err.startswith("edm-lit train: warning: --fp16 needs a CUDA GPU") and captured.err.count("\n") == 1
    assert train_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("edm-lit train: error: --fp16 needs a CUDA GPU") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
