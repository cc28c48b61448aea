"""Sphinx extension of the book: a small "→ edm_lit.MODULE" mark above every exported code cell.

The exporter (tools/nbtools.py) sends a code cell to the package when it carries the tag
``export`` (the chapter's default module, named in the notebook metadata ``edm_lit.export``) or
``export:MODULE``. myst-nb turns cell tags into CSS classes ``tag_<tag>`` on the cell's container;
this extension reads those classes and puts the module name above the cell, so a reader of the
book sees which cells become the package, the way a reader of the package sees which chapter
each block comes from.
"""
from __future__ import annotations

import json
from pathlib import Path

from docutils import nodes

EXPORT_TAG = "export"


def default_module(notebook: Path) -> str | None:
    """The chapter's default export module, from the notebook metadata (None if it has none)."""
    if notebook.suffix != ".ipynb" or not notebook.exists():
        return None
    metadata = json.loads(notebook.read_text()).get("metadata", {})
    return (metadata.get("edm_lit") or {}).get(EXPORT_TAG)


def modules_of(classes: list[str], default: str | None) -> list[str]:
    """Module names a cell is exported to, from its container's CSS classes."""
    found = []
    for cls in classes:
        if cls == f"tag_{EXPORT_TAG}" and default:
            found.append(default)
        elif cls.startswith(f"tag_{EXPORT_TAG}:"):
            found.append(cls.split(":", 1)[1])
    return found


def add_export_marks(app, doctree) -> None:
    default = default_module(Path(app.env.doc2path(app.env.docname)))
    for cell in list(doctree.findall(nodes.container)):
        modules = modules_of(cell.get("classes", []), default)
        if not modules:
            continue
        text = "→ " + ", ".join(f"edm_lit.{m}" for m in modules)
        mark = nodes.paragraph("", "", nodes.literal(text, text), classes=["export-mark"])
        cell.parent.insert(cell.parent.index(cell), mark)


def setup(app):
    app.connect("doctree-read", add_export_marks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
