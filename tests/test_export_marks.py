"""The book marks every exported cell with its module (_ext/export_marks.py), exactly as the exporter routes it."""
import sys
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "_ext"))
sys.path.insert(0, str(ROOT / "tools"))
import export_marks  # noqa: E402
import nbtools  # noqa: E402


def test_marks_follow_the_tags():
    assert export_marks.modules_of(["cell", "tag_export"], "samplers") == ["samplers"]
    assert export_marks.modules_of(["cell", "tag_export:loss"], "precond") == ["loss"]
    assert export_marks.modules_of(["cell", "tag_export", "tag_export:loss"], "precond") == ["precond", "loss"]
    assert export_marks.modules_of(["cell", "tag_hide-input", "tag_exported"], "x") == []
    assert export_marks.modules_of(["cell", "tag_export"], None) == []


def test_every_exported_cell_is_marked_with_its_module():
    """For each chapter: the marks the extension would show equal the modules the exporter writes to."""
    exported = {}
    for module, blocks in nbtools.collect().items():
        for path, _, _, code in blocks:
            exported.setdefault(path.name, []).append((module, code))
    assert exported, "no chapter exports anything"
    for chapter in nbtools.chapters():
        nb = jupytext.read(chapter)
        default = export_marks.default_module(chapter.with_suffix(".ipynb"))
        assert default == (nb.metadata.get("edm_lit") or {}).get("export"), chapter.name
        marked = []
        for cell in nb.cells:
            if cell.cell_type == "code":
                classes = ["cell"] + [f"tag_{t}" for t in cell.metadata.get("tags", [])]
                marked += [(m, cell.source.rstrip()) for m in export_marks.modules_of(classes, default)]
        assert sorted(marked) == sorted(exported.get(chapter.name, [])), chapter.name
