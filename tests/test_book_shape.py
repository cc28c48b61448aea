"""Issue 16: chapters a learner can finish. tools/book_shape.py --check holds for the whole book: no chapter over
1,000 lines, no code cell over 80 lines, no code line over 88 characters, every numbered section of a chapter
opening with the paper's words or an equation."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import book_shape  # noqa: E402


def test_the_book_keeps_its_shape():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "book_shape.py"), "--check"], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr


def test_the_check_can_fail(tmp_path):
    """A chapter over the limits, with an unquoted section, is reported on every count."""
    lines = ["# %% [markdown]", "# # 1. A chapter", "# %% [markdown]", "# ## 1.1 A section", "# No quote here.",
             "# %%", "x = 1  " + "#" * 90] + ["y = 2"] * 85 + ["# %% [markdown]", "# text"] * 460
    path = tmp_path / "01_long.py"
    path.write_text("\n".join(lines) + "\n")
    found = book_shape.problems(book_shape.shape(path))
    assert any("1012 lines (at most 1000)" in p for p in found)
    assert any("a code cell of 86 lines" in p for p in found)
    assert any("characters wide" in p for p in found)
    assert any("section 1.1 (line 3) opens without" in p for p in found)
    appendix = tmp_path / "A9_long.py"
    appendix.write_text(path.read_text())
    assert not any("opens without" in p for p in book_shape.problems(book_shape.shape(appendix)))
