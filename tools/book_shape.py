"""The shape of the book: chapters a learner can finish, code a reader can see whole.

    python tools/book_shape.py [--check]

Prints one row per chapter: lines, its longest code cells, code : prose lines, display equations, paper quotes
(block quotes), and code lines wider than the column. With --check it exits 1 when a rule is broken:

- a chapter has more than MAX_CHAPTER_LINES lines;
- a code cell has more than MAX_CELL_LINES non-blank lines;
- a code line is wider than MAX_CODE_WIDTH characters (the book's column cuts it off);
- a numbered main section (`## 3.2 ...`) of a chapter (not an appendix) does not open with the paper's words
  (a `>` block quote) or an equation (`$$`) in its first markdown cell.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_CHAPTER_LINES = 1000
MAX_CELL_LINES = 80
MAX_CODE_WIDTH = 88
SECTION = re.compile(r"^# ## (\d+b?\.\d+)\s", re.M)


def cells(path: Path) -> list:
    """[(kind, first line number, lines)] of a percent-format chapter; kind is 'code' or 'markdown'."""
    out, kind, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("# %%"):
            if kind is not None:
                out.append((kind, start, lines))
            kind, start, lines = ("markdown" if "[markdown]" in line else "code"), number, []
        elif kind is not None:
            lines.append(line)
    if kind is not None:
        out.append((kind, start, lines))
    return out


def shape(path: Path) -> dict:
    parts = cells(path)
    code = [(start, [x for x in lines if x.strip()]) for kind, start, lines in parts if kind == "code"]
    prose = [x for kind, _, lines in parts if kind == "markdown" for x in lines if x.strip("# ").strip()]
    wide = [(start + i + 1, len(x)) for kind, start, lines in parts if kind == "code"
            for i, x in enumerate(lines) if len(x) > MAX_CODE_WIDTH]
    markdown = "\n".join(x for kind, _, lines in parts if kind == "markdown" for x in lines)
    sections, unquoted = [], []
    for i, (kind, start, lines) in enumerate(parts):
        text = "\n".join(lines)
        if kind != "markdown" or not SECTION.search(text):
            continue
        name = SECTION.search(text).group(1)
        sections.append(name)
        body = text[SECTION.search(text).end():]
        if not re.search(r"^#\s*>|\$\$", body, re.M):
            unquoted.append(f"{name} (line {start})")
    return {"chapter": path.stem, "lines": len(path.read_text().splitlines()),
            "longest_cells": sorted((len(c) for _, c in code), reverse=True)[:4],
            "longest_cell_at": max(code, key=lambda c: len(c[1]))[0] if code else None,
            "code_lines": sum(len(c) for _, c in code), "prose_lines": len(prose),
            "equations": markdown.count("$$") // 2,
            "quotes": len(re.findall(r"^#\s*>", markdown, re.M)), "wide": wide,
            "sections": sections, "unquoted": unquoted, "appendix": path.stem[0].isalpha()}


def problems(row: dict) -> list:
    out = []
    if row["lines"] > MAX_CHAPTER_LINES:
        out.append(f"{row['chapter']}: {row['lines']} lines (at most {MAX_CHAPTER_LINES})")
    if row["longest_cells"] and row["longest_cells"][0] > MAX_CELL_LINES:
        out.append(f"{row['chapter']}: a code cell of {row['longest_cells'][0]} lines at line "
                   f"{row['longest_cell_at']} (at most {MAX_CELL_LINES})")
    for line, width in row["wide"][:3]:
        out.append(f"{row['chapter']}: code line {line} is {width} characters wide (at most {MAX_CODE_WIDTH})")
    if len(row["wide"]) > 3:
        out.append(f"{row['chapter']}: {len(row['wide']) - 3} more code lines wider than {MAX_CODE_WIDTH}")
    if not row["appendix"]:
        out += [f"{row['chapter']}: section {s} opens without the paper's words or an equation"
                for s in row["unquoted"]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a rule is broken")
    args = ap.parse_args(argv)
    rows = [shape(p) for p in sorted((ROOT / "book").glob("[0-9A-Z]*.py"))]
    print("| chapter | lines | longest code cells | code : prose | equations | quotes | wide code lines |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['chapter']} | {r['lines']:,} | {', '.join(map(str, r['longest_cells']))} | "
              f"{r['code_lines']:,} : {r['prose_lines']:,} | {r['equations']} | {r['quotes']} | {len(r['wide'])} |")
    found = [p for r in rows for p in problems(r)]
    if args.check:
        for p in found:
            print(p, file=sys.stderr)
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
