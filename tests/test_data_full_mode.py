"""Chapters 6 and 6b in full mode, on a CPU, with a tiny data set of the reader's (issue 13).

Full mode reads the reader's data set from EDM_LIT_DATA, labelled or not (FFHQ and AFHQv2 have no
labels); reading and augmenting it needs no GPU. The chapters run through nbclient as a reader's
kernel would, with the environment of full mode.
"""
import contextlib
import io
from pathlib import Path

import jupytext
import numpy as np
import PIL.Image
import pytest
from nbclient import NotebookClient

from edm_lit.cli import main

BOOK = Path(__file__).resolve().parents[1] / "book"


def tiny_dataset(root: Path, labelled: bool) -> Path:
    """20 RGB 32x32 images written by `edm-lit dataset`: two classes (sub-folders) or none."""
    rng = np.random.default_rng(7)
    for i in range(20):
        folder = root / "src" / (f"class{i % 2}" if labelled else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, [32, 32, 3], dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    dest = root / ("labelled.zip" if labelled else "unlabelled.zip")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["dataset", f"--source={root / 'src'}", f"--dest={dest}"]) == 0
    return dest


def run_chapter(name: str, stop_before: str = None) -> str:
    """Execute book/`name` (up to the markdown cell starting with `stop_before`); its printed text."""
    nb = jupytext.read(BOOK / name)
    if stop_before is not None:
        end = next(i for i, cell in enumerate(nb.cells) if cell.source.startswith(stop_before))
        nb.cells = nb.cells[:end]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(BOOK)}}).execute()
    return "".join(output.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.get("output_type") == "stream")


@pytest.fixture
def full_mode(monkeypatch, tmp_path):
    def use(labelled: bool) -> Path:
        data = tiny_dataset(tmp_path, labelled)
        monkeypatch.setenv("EDM_LIT_MODE", "full")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small tensors on a shared CPU: one thread is fastest
        monkeypatch.setenv("EDM_LIT_DATA", str(data))
        return data
    return use


def test_chapter_6_reads_an_unlabelled_data_set_in_full_mode(full_mode):
    data = full_mode(labelled=False)
    text = run_chapter("06_data.py")
    assert "full mode: reading your data set needs" not in text  # no fall-back to quick mode
    assert f"{data.stem}: 20 images of shape [3, 32, 32], no labels" in text
    assert "item 0: uint8 (3, 32, 32); no labels: the data set is read label-free (unconditional)" in text
    assert "(full mode)" in text


def test_chapter_6_reads_a_labelled_data_set_in_full_mode(full_mode):
    data = full_mode(labelled=True)
    text = run_chapter("06_data.py")
    assert f"{data.stem}: 20 images of shape [3, 32, 32], 2 classes" in text
    assert "item 0: uint8 (3, 32, 32), label [1. 0.] (class 0)" in text


def test_chapter_6b_augments_the_data_set_in_full_mode(full_mode):
    data = full_mode(labelled=False)
    text = run_chapter("06b_augment.py", stop_before="## 6b.8")  # 6b.8 trains on the digits, as quick mode
    assert f"full mode: augmenting 20 images of {data.stem} (32x32, 3 channels) on the CPU" in text
    assert f"{data.stem} (32x32, 3 channels), 20 images with a zero geometric label" in text
    assert "full mode: §6b.7 and §6b.8 stay on the 8x8 digits at quick size" in text
