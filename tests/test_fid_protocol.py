"""The paper's FID protocol at small size (issue 13): `measure_fid` runs `generate` + `fid_calc` per seed
set, as the full-mode chapters do with 50,000 images; and a chapter without what full mode needs says so in
one line."""
import numpy as np
import pytest
import torch

from edm_lit.fid import fid_calc, fid_ref, measure_fid, reference_detector
from edm_lit.mode import get_mode


def pixel_features(images):
    proj = torch.linspace(-1, 1, images[0].numel() * 6).reshape(-1, 6)
    return (images.flatten(1).float() / 255) @ proj


def test_measure_fid_runs_disjoint_seed_sets_through_the_commands_functions(parity_net, tmp_path):
    from edm_lit.generate import generate

    generate(parity_net, tmp_path / "data", seeds="1000-1011", progress=False, num_steps=2)
    fid_ref(tmp_path / "data", tmp_path / "ref", extractor=pixel_features, extractor_name="pixels",
            progress=False)
    assert reference_detector(tmp_path / "ref.npz") == "pixels"
    fids = measure_fid(parity_net, tmp_path / "ref.npz", tmp_path / "work", num_images=5, runs=2,
                       progress=False, extractor=pixel_features, num_steps=2)
    assert len(fids) == 2 and all(np.isfinite(f) and f > 0 for f in fids)
    runs = [sorted(p.name for p in (tmp_path / "work" / f"run{k}" / "000000").glob("*.png")) for k in range(2)]
    assert runs == [[f"{s:06d}.png" for s in seeds] for seeds in (range(5), range(5, 10))]  # official layout
    # the same number through the two functions by hand
    again = fid_calc(tmp_path / "work" / "run1", tmp_path / "ref.npz", num=5, extractor=pixel_features,
                     progress=False)
    assert again == pytest.approx(fids[1], rel=1e-12)


@pytest.mark.parametrize("environ, lacking", [
    ({"EDM_LIT_MODE": "full"}, ["EDM_LIT_DATA", "EDM_LIT_INCEPTION"]),
    ({"EDM_LIT_MODE": "full", "EDM_LIT_INCEPTION": "/w.pth"}, ["EDM_LIT_DATA"]),
])
def test_full_mode_without_its_inputs_falls_back_in_one_line(environ, lacking, capsys, tmp_path):
    """What Chapters 8 and 9 ask for (`needs=("data", "inception")`); a GPU is needed too, and this machine's
    answer to that is part of the line when there is none."""
    mode = get_mode(environ).require("the paper's FID", needs=("data", "inception"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert mode.quick and len(lines) == 1 and "running the quick version" in lines[0]
    assert all(var in lines[0] for var in lacking)
    assert ("a CUDA GPU" in lines[0]) == (not torch.cuda.is_available())
    data = tmp_path / "d.zip"
    data.write_bytes(b"")
    complete = dict(environ, EDM_LIT_DATA=str(data), EDM_LIT_INCEPTION="/w.pth")
    full = get_mode(complete).require("the paper's FID", needs=("data", "inception"))
    assert full.full == torch.cuda.is_available()  # on a CPU, still the quick version (one line)
    assert len(capsys.readouterr().out.strip().splitlines()) == (0 if full.full else 1)
