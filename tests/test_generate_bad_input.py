"""`edm-lit generate` on bad input (issue 15): one line naming the flag or file, exit 1, nothing written under a
final name, checked before the work starts. Each test here failed on c97c66b (traceback, silent wrong result, or
data written)."""
import math
import os

import pytest
import torch

import edm_lit.generate as gen
from edm_lit.checkpoints import save_network
from edm_lit.cli import main as cli
from edm_lit.networks import SongUNet


@pytest.fixture(scope="module")
def net_file(parity_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "tiny"
    save_network(parity_net, path)
    return path.with_suffix(".json")


def run(capsys, *argv):
    code = cli(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err, *words):
    lines = [line for line in err.strip().splitlines() if "batch/s" not in line]  # not the progress bar
    assert len(lines) == 1 and lines[0].startswith("edm-lit generate: error:"), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def pngs(folder):
    return sorted(p.name for p in folder.rglob("*.png")) if folder.exists() else []


def test_outdir_that_is_a_file_is_refused_before_work(net_file, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    code, _, err = run(capsys, "generate", f"--network={net_file}", f"--outdir={tmp_path / 'out'}",
                       "--seeds=0-3", "--steps=2")
    assert code == 1
    one_line_error(err, "--outdir", "is a file")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_unwritable_npz_is_refused_before_any_image(net_file, tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file where a folder would have to be")
    code, _, err = run(capsys, "generate", f"--network={net_file}", f"--outdir={tmp_path / 'out'}",
                       "--seeds=0-3", "--steps=2", f"--npz={tmp_path / 'blocker' / 'all.npz'}")
    assert code == 1
    one_line_error(err, "--npz", "blocker")
    assert pngs(tmp_path / "out") == []  # found before the work, not after every image was written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
def test_read_only_npz_is_refused_before_any_image(net_file, tmp_path, capsys):
    (tmp_path / "all.npz").write_bytes(b"keep me")
    (tmp_path / "all.npz").chmod(0o444)
    code, _, err = run(capsys, "generate", f"--network={net_file}", f"--outdir={tmp_path / 'out'}",
                       "--seeds=0-3", "--steps=2", f"--npz={tmp_path / 'all.npz'}")
    assert code == 1 and "read-only" in one_line_error(err, "--npz")
    assert pngs(tmp_path / "out") == [] and (tmp_path / "all.npz").read_bytes() == b"keep me"


def test_npz_that_is_a_folder_is_refused_and_a_bare_name_is_reported_as_written(net_file, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    code, _, err = run(capsys, "generate", f"--network={net_file}", f"--outdir={tmp_path / 'a'}", "--seeds=0-1",
                       "--steps=2", f"--npz={tmp_path / 'dir'}")
    assert code == 1 and "is a folder" in one_line_error(err, "--npz")
    assert not (tmp_path / "dir.npz").exists()
    code, out, _ = run(capsys, "generate", f"--network={net_file}", f"--outdir={tmp_path / 'b'}", "--seeds=0-1",
                       "--steps=2", f"--npz={tmp_path / 'noext'}")
    assert code == 0 and (tmp_path / "noext.npz").is_file() and str(tmp_path / "noext.npz") in out


class StopAfterFirstBatch:
    """A denoiser that fails on the call after `calls`: shows how far a run got."""

    img_channels, img_resolution, label_dim, sigma_min, sigma_max = 1, 4, 0, 0.0, math.inf

    def __init__(self, calls):
        self.calls = calls

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        self.calls -= 1
        if self.calls < 0:
            raise ValueError("stopped by the test")
        return x * 0


def test_huge_seed_range_runs_lazily(tmp_path, capsys, monkeypatch):
    """c97c66b expanded --seeds=0-999999999999 into a list: MemoryError before anything ran."""
    monkeypatch.setattr(gen, "load_network", lambda path: StopAfterFirstBatch(calls=1))
    code, _, err = run(capsys, "generate", "--network=stand-in.json", f"--outdir={tmp_path / 'out'}",
                       "--seeds=0-999999999999", "--batch=2", "--steps=1")
    assert code == 1 and "stopped by the test" in one_line_error(err)
    assert pngs(tmp_path / "out") == ["000000.png", "000001.png"]  # the first batch ran and was written
    seeds = gen.parse_seeds("0-999999999999")
    assert len(seeds) == 10**12 and seeds[-1] == 999999999999 and list(seeds[5:8]) == [5, 6, 7]
    assert len(gen.parse_seeds("0-50000000")) == 50000001  # no list of 50M ints either


def test_seed_outside_int64_is_refused_by_the_parser(net_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["generate", f"--network={net_file}", f"--outdir={tmp_path / 'o'}", f"--seeds=0,{1 << 63}"])
    assert e.value.code == 2 and "int64" in capsys.readouterr().err
    assert gen.parse_seeds(f"{-(1 << 63)},{(1 << 63) - 1}") == [-(1 << 63), (1 << 63) - 1]


@pytest.mark.parametrize("text, says", [("1-a", "'1-a' is neither an integer nor a range"),
                                        ("5-3", "'5-3' is empty"), ("1,,2", "an empty entry"),
                                        ("1.5", "'1.5' is neither")])
def test_malformed_seeds_say_what_is_wrong(net_file, tmp_path, capsys, text, says):
    with pytest.raises(SystemExit):
        cli(["generate", f"--network={net_file}", f"--outdir={tmp_path / 'o'}", f"--seeds={text}"])
    err = capsys.readouterr().err
    assert "argument --seeds:" in err and says in err and "invalid" not in err


def test_inner_network_saved_alone_is_refused_in_one_line(tmp_path, capsys):
    inner = SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[])
    save_network(inner, tmp_path / "inner")
    code, _, err = run(capsys, "generate", f"--network={tmp_path / 'inner.json'}", f"--outdir={tmp_path / 'o'}",
                       "--seeds=0-1", "--steps=2")
    assert code == 1 and "not a denoiser" in one_line_error(err, "SongUNet", "inner.json")
    assert pngs(tmp_path / "o") == []


def test_network_with_nan_output_writes_nothing(parity_net, tmp_path, capsys):
    import copy

    broken = copy.deepcopy(parity_net)
    broken.model.dec["16x16_aux_conv"].weight.data.fill_(math.nan)
    save_network(broken, tmp_path / "nan")
    code, _, err = run(capsys, "generate", f"--network={tmp_path / 'nan.json'}", f"--outdir={tmp_path / 'o'}",
                       "--seeds=0-3", "--steps=2")
    assert code == 1 and "not finite" in one_line_error(err)
    assert pngs(tmp_path / "o") == []  # c97c66b wrote four black PNGs and exited 0


def test_sigma_min_above_sigma_max_is_refused_before_loading(tmp_path, capsys):
    code, _, err = run(capsys, "generate", f"--network={tmp_path / 'not-there.pkl'}",
                       f"--outdir={tmp_path / 'o'}", "--sigma_min=5", "--sigma_max=1")
    assert code == 1 and "not-there" not in one_line_error(err, "--sigma_min", "--sigma_max")


def test_fp16_and_bf16_together_are_refused(net_file, tmp_path, capsys):
    code, _, err = run(capsys, "generate", f"--network={net_file}", f"--outdir={tmp_path / 'o'}", "--fp16=1",
                       "--bf16=1", "--steps=2")
    assert code == 1
    one_line_error(err, "--fp16", "--bf16")


def test_png_write_error_in_a_writer_thread_reaches_the_caller(tmp_path):
    (tmp_path / "blocker").write_text("")
    image = torch.zeros(4, 4, 3, dtype=torch.uint8)
    with pytest.raises(OSError):
        with gen.PngWriter(threads=2) as writer:
            writer.submit(image, tmp_path / "ok.png")
            writer.submit(image, tmp_path / "blocker" / "x.png")  # its folder cannot exist
    assert (tmp_path / "ok.png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no half-written file left behind
