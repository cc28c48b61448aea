"""Chapter 7 (edm-lit train): bad input and races end in one line naming the flag or file, or in the right result."""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_lit import train as train_cli
from edm_lit import training


def image_folder(root, n=16, resolution=8, seed=0):
    """n random greyscale PNGs in the official folder layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution), dtype=np.uint8)).save(root / f"{i:05d}.png")
    return root


def tiny_flags(data, *extra):
    """A CPU-sized run: the tiny DDPM++ with 8 channels, 1 kimg of batch 32, no grid (a flag in `extra` wins)."""
    return [f"--data={data}", "--arch=ddpmpp-tiny", "--cbase=8", "--batch=32", "--duration=0.001", "--tick=1",
            "--lr=2e-3", "--lr-rampup=0.001", "--ema=0.002", "--dropout=0", "--augment=0", "--grid=0",
            "--workers=1", *extra]


def one_line_error(capsys, status) -> str:
    """The one line a failed run printed on stderr (besides the progress bar of a run that had started)."""
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]
    lines = [line for line in lines if line.strip() and " kimg [" not in line]
    assert status == 1 and len(lines) == 1 and lines[0].startswith("edm-lit train: error: "), (status, err[-3000:])
    return lines[0]


def tree(root) -> dict:
    """Every file under root with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


# --- the run directory is claimed atomically ------------------------------------------------------------------------

def test_two_runs_started_together_get_their_own_directories(tmp_path, monkeypatch):
    """A second run that starts while the first is being built takes the next number (was: both took 00000)."""
    data, outdir = image_folder(tmp_path / "data"), tmp_path / "runs"
    inner = []

    class BuiltWhileAnotherStarts(training.TrainingRun):
        def __init__(self, *args, **kwargs):
            if not inner:  # the other run starts, claims its directory and trains while this one is being built
                inner.append(None)
                inner[0] = train_cli.main(["--outdir", str(outdir), "--seed=2", *tiny_flags(data)])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(training, "TrainingRun", BuiltWhileAnotherStarts)
    assert train_cli.main(["--outdir", str(outdir), "--seed=1", *tiny_flags(data)]) == 0 and inner == [0]
    runs = sorted(outdir.iterdir())
    assert [p.name[:6] for p in runs] == ["00000-", "00001-"]
    seeds = [json.loads((p / "training_options.json").read_text())["seed"] for p in runs]
    assert sorted(seeds) == [1, 2]
    for run in runs:  # each directory holds one run: two ticks, one log line each
        assert len((run / "stats.jsonl").read_text().splitlines()) == 2
        assert len((run / "log.txt").read_text().splitlines()) == 2


def test_claims_in_parallel_take_distinct_numbers(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    planned = tmp_path / "runs" / "00000-desc"
    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda _: training.claim_run_dir(planned, nosubdir=False), range(8)))
    for _, log, _ in claims:
        log.close()
    assert sorted(run.name for run, _, _ in claims) == [f"{i:05d}-desc" for i in range(8)]


def test_nosubdir_refuses_a_directory_that_holds_a_run(tmp_path, capsys):
    data, run_dir = image_folder(tmp_path / "data"), tmp_path / "run"
    assert train_cli.main(["--outdir", str(run_dir), "--nosubdir", "--seed=1", "--dump=1", *tiny_flags(data)]) == 0
    before = tree(run_dir)
    capsys.readouterr()
    status = train_cli.main(["--outdir", str(run_dir), "--nosubdir", "--seed=2", *tiny_flags(data)])
    assert "--nosubdir" in one_line_error(capsys, status)
    assert tree(run_dir) == before  # nothing overwritten, nothing mixed
    # continuing that very run in place is what --nosubdir into it is for
    status = train_cli.main(["--outdir", str(run_dir), "--nosubdir", "--seed=1", f"--resume={run_dir}",
                             *tiny_flags(data, "--duration=0.002")])
    assert status == 0 and (run_dir / "training-state-000002.json").exists()


@pytest.mark.parametrize("where", ["file", "under_file", "proc", "read_only"])
def test_unwritable_outdir_is_refused_before_building(tmp_path, capsys, monkeypatch, where):
    data = image_folder(tmp_path / "data")
    outdir = {"file": data / "00000.png", "under_file": data / "00000.png" / "runs",
              "proc": Path("/proc") / f"edm-lit-test-{os.getpid()}", "read_only": tmp_path / "ro" / "runs"}[where]
    if where == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only directory")
        outdir.parent.mkdir()
        outdir.parent.chmod(0o555)
    if where == "proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc")

    def built(*args, **kwargs):
        raise AssertionError("a network was built for a run that cannot write its results")

    monkeypatch.setattr(training, "TrainingRun", built)
    before = tree(tmp_path)
    status = train_cli.main(["--outdir", str(outdir), "--seed=1", *tiny_flags(data)])
    assert "--outdir" in one_line_error(capsys, status)
    assert tree(tmp_path) == before


# --- training states that are not ours ----------------------------------------------------------------------------

def _valid_state(run_dir, kimg):
    from edm_lit.precond import EDMPrecond

    net = EDMPrecond(8, 1, model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1,
                     attn_resolutions=[])
    ema = EDMPrecond(8, 1, model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1,
                     attn_resolutions=[])
    opt = torch.optim.Adam(net.parameters())
    return training.save_training_state(training.state_path(run_dir, kimg), net=net, ema=ema, optimizer=opt,
                                        progress={"cur_nimg": kimg * 1000, "cur_tick": 1}, options={},
                                        rng=[training.capture_rng(torch.device("cpu"))])


@pytest.mark.parametrize("edit", ["tensors_5", "no_cur_nimg", "rng_5", "tensors_path"])
def test_crafted_state_header_is_one_line_and_skipped_by_resume_dir(tmp_path, capsys, edit):
    run = tmp_path / "run"
    good = _valid_state(run, 3)
    header = json.loads(good.read_text())
    if edit == "tensors_5":
        header["tensors"] = 5
    elif edit == "no_cur_nimg":
        del header["cur_nimg"]
    elif edit == "rng_5":
        header["rng"] = 5
    else:
        header["tensors"] = "../run/" + header["tensors"]
    crafted = training.state_path(run, 7)
    crafted.write_text(json.dumps(header))
    with pytest.raises(ValueError, match="training-state-000007.json"):
        training.read_training_state(crafted)
    assert training.find_training_state(run) == (good, 3000)  # the newer, crafted file does not hide the valid one
    data = image_folder(tmp_path / "data")
    status = train_cli.main(["--outdir", str(tmp_path / "runs"), f"--resume={crafted}", *tiny_flags(data)])
    assert "training-state-000007.json" in one_line_error(capsys, status)
    assert not (tmp_path / "runs").exists()


def test_resume_dir_takes_the_latest_state_by_number(tmp_path):
    """Past 999,999 kimg (ImageNet's 2,500 Mimg) the names grow a digit: the latest is found by number."""
    run = tmp_path / "run"
    _valid_state(run, 999_999)
    latest = _valid_state(run, 1_000_000)
    assert training.find_training_state(run) == (latest, 1_000_000_000)


# --- flags that cannot train --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--duration=inf", "--ema=inf", "--lr-rampup=inf", "--ema=nan", "--lr-rampup=nan",
                                  "--cbase=0", "--cbase=-4", f"--seed={10**22}", "--seed=-1", "--lr=inf", "--lr=nan",
                                  "--ls=inf", "--tick=0", "--grid=-1", "--desc=../../escape", "--workers=0",
                                  "--cres=1,0", "--cres=", "--batch=0", "--dropout=nan"])
def test_non_finite_or_absurd_flag_is_one_line(tmp_path, capsys, flag):
    data = image_folder(tmp_path / "data")
    status = train_cli.main(["--outdir", str(tmp_path / "runs"), "--seed=1", *tiny_flags(data), flag])
    assert flag.split("=")[0] in one_line_error(capsys, status)
    assert not (tmp_path / "runs").exists()


def test_resolution_the_levels_cannot_halve_is_refused_by_the_dry_run(tmp_path, capsys):
    """6x6 images and three levels (6 -> 3 -> 1.5): --dry-run printed a configuration that cannot be built."""
    data = image_folder(tmp_path / "data", resolution=6)
    status = train_cli.main(["--outdir", str(tmp_path / "runs"), "--seed=1", "--dry-run", *tiny_flags(data, "--cres=1,1,1")])
    assert "--cres" in one_line_error(capsys, status)


# --- a run whose weights become non-finite stops --------------------------------------------------------------------

def test_diverging_run_stops_with_the_last_good_snapshot(tmp_path, capsys, monkeypatch):
    """From 1.5 kimg on the learning rate is NaN (as --lr=inf would make it): the weights turn NaN, the run stops."""
    from edm_lit.checkpoints import load_network

    learning_rate = training.learning_rate
    monkeypatch.setattr(training, "learning_rate",
                        lambda base, nimg, ramp: float("nan") if nimg >= 1500 else learning_rate(base, nimg, ramp))
    data, run_dir = image_folder(tmp_path / "data"), tmp_path / "run"
    status = train_cli.main(["--outdir", str(run_dir), "--nosubdir", "--seed=1", "--snap=1", "--dump=1",
                             *tiny_flags(data, "--duration=0.003")])
    err = one_line_error(capsys, status)
    # the rate is NaN from the step at 1,504 images; the loss of the next one (at 1,536) is the first non-finite
    assert "diverged" in err and "first non-finite loss was at kimg 1.536" in err
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.endswith(".safetensors"))
    assert names == ["log.txt", "network-snapshot-000000.json", "network-snapshot-000001.json", "stats.jsonl",
                     "training-state-000001.json", "training_options.json"]
    for snapshot in ["network-snapshot-000000.json", "network-snapshot-000001.json"]:
        assert all(torch.isfinite(v).all() for v in load_network(run_dir / snapshot).state_dict().values())
    _, tensors = training.read_training_state(run_dir / "training-state-000001.json")
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert len((run_dir / "stats.jsonl").read_text().splitlines()) == 2


def test_transfer_of_a_non_finite_network_is_one_line(tmp_path, capsys):
    from edm_lit.course import official_layout_pickle
    from edm_lit.precond import EDMPrecond

    source = EDMPrecond(8, 1, dropout=0.0, **{**training.ARCH_PRESETS["ddpmpp-tiny"], "model_channels": 8})
    with torch.no_grad():
        next(source.parameters()).fill_(float("nan"))
    (tmp_path / "nan.pkl").write_bytes(official_layout_pickle({"ema": source}))
    data = image_folder(tmp_path / "data")
    status = train_cli.main(["--outdir", str(tmp_path / "runs"), f"--transfer={tmp_path / 'nan.pkl'}", "--seed=1",
                             *tiny_flags(data)])
    assert "non-finite" in one_line_error(capsys, status)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("source", ["text", "png", "missing"])
def test_transfer_of_a_file_that_is_no_network_is_one_line(tmp_path, capsys, source):
    data = image_folder(tmp_path / "data")
    path = {"text": tmp_path / "notes.pkl", "png": data / "00000.png", "missing": tmp_path / "missing.pkl"}[source]
    if source == "text":
        path.write_text("not a network\n")
    status = train_cli.main(["--outdir", str(tmp_path / "runs"), f"--transfer={path}", "--seed=1", *tiny_flags(data)])
    err = one_line_error(capsys, status)
    assert "--transfer" in err or str(path) in err
    assert not (tmp_path / "runs").exists()


def test_resume_without_seed_continues_the_same_run(tmp_path):
    """--resume without --seed took a fresh random seed: another data order, silently not the run it resumed."""
    data, whole, resumed = image_folder(tmp_path / "data"), tmp_path / "whole", tmp_path / "resumed"
    flags = tiny_flags(data, "--duration=0.002", "--dump=1")
    assert train_cli.main(["--outdir", str(whole), "--nosubdir", "--seed=7", *flags]) == 0
    middle = whole / "training-state-000001.json"
    assert train_cli.main(["--outdir", str(resumed), "--nosubdir", f"--resume={middle}", *flags]) == 0
    _, a = training.read_training_state(whole / "training-state-000002.json")
    _, b = training.read_training_state(resumed / "training-state-000002.json")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "training_options.json").read_text())["seed"] == 7


def test_a_tick_without_one_finite_loss_stops_the_run(tmp_path):
    """Finite weights but every loss NaN: the guard zeroes every gradient and the run would train on, learning nothing."""
    from edm_lit.loss import EDMLoss

    class NanLoss(EDMLoss):
        def __call__(self, net, images, labels=None, augment_pipe=None):
            return super().__call__(net, images, labels, augment_pipe) * float("nan")

    images = np.random.default_rng(0).integers(0, 256, (16, 1, 8, 8), dtype=np.uint8)

    class Data(torch.utils.data.Dataset):
        name, resolution, num_channels, label_dim, has_labels = "d", 8, 1, 0, False

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i].copy(), np.zeros([0], dtype=np.float32)

    net = dict(training.ARCH_PRESETS["ddpmpp-tiny"], class_name="edm_lit.precond.EDMPrecond", model_channels=8,
               dropout=0.0, use_fp16=False)
    run = training.TrainingRun(run_dir=tmp_path, dataset=Data(), network_kwargs=net, loss_fn=NanLoss(),
                               batch_size=16, total_kimg=1, kimg_per_tick=0.25, snapshot_ticks=1, state_dump_ticks=1,
                               device="cpu", data_loader_kwargs=dict(num_workers=0), grid_images=0)
    with pytest.raises(training.TrainingDiverged, match="no loss of the last 16 steps was finite"):
        run.run()
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["network-snapshot-000000.json"]  # tick 0: one step


def fail_after_first_step(monkeypatch, error):
    """The run's first step trains (tick 0 writes its snapshot); every later one raises `error`."""
    real_step = training.TrainingRun.step

    def step(self):
        if self.cur_nimg > 0:
            raise error
        real_step(self)
    monkeypatch.setattr(training.TrainingRun, "step", step)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139.8 GiB total capacity)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError()], ids=["cuda", "cpu", "python"])
def test_out_of_memory_while_training_is_one_line_naming_batch_gpu(tmp_path, capsys, monkeypatch, error):
    fail_after_first_step(monkeypatch, error)
    data, run_dir = image_folder(tmp_path / "data"), tmp_path / "run"
    status = train_cli.main(["--outdir", str(run_dir), "--nosubdir", "--batch-gpu=8", *tiny_flags(data)])
    err = one_line_error(capsys, status)
    assert "out of " in err and "8 images per round (4 rounds per step)" in err and "--batch-gpu" in err
    assert (run_dir / "network-snapshot-000000.json").exists()  # what was written stays


def test_out_of_memory_while_building_is_one_line_and_leaves_no_directory(tmp_path, capsys, monkeypatch):
    def build(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    monkeypatch.setattr(training.TrainingRun, "_build", build)
    data = image_folder(tmp_path / "data")
    status = train_cli.main(["--outdir", str(tmp_path / "runs"), *tiny_flags(data)])
    err = one_line_error(capsys, status)
    assert "out of " in err and "--batch-gpu" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_another_runtime_error_in_a_step_is_not_called_out_of_memory(tmp_path, monkeypatch):
    fail_after_first_step(monkeypatch, RuntimeError("a bug"))
    data = image_folder(tmp_path / "data")
    with pytest.raises(RuntimeError, match="a bug"):
        train_cli.main(["--outdir", str(tmp_path / "run"), "--nosubdir", *tiny_flags(data)])
