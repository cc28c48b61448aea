"""tests/data/README.md lists every file of tests/data and book/data with its current MD5, so the provenance note
cannot go stale."""
import hashlib
import re
from pathlib import Path

DATA = Path(__file__).parent / "data"
BOOK_DATA = Path(__file__).parents[1] / "book" / "data"  # the reference files the chapters read too


def readme_entries() -> dict:
    """{file name: MD5} from the README's entries, each a line `- `name` — ...` up to the next entry or heading."""
    text = (DATA / "README.md").read_text(encoding="utf-8")
    entries = re.split(r"\n(?=- `|#)", text)
    found = {}
    for entry in entries:
        head = re.match(r"- `([^`]+)`", entry)
        md5 = re.findall(r"MD5 `([0-9a-f]{32})`", entry)
        if head:
            assert len(md5) == 1, f"README entry for {head.group(1)} must give exactly one MD5"
            assert head.group(1) not in found, f"{head.group(1)} is listed twice"
            found[head.group(1)] = md5[0]
    return found


def test_every_data_file_is_listed_with_its_md5():
    listed = readme_entries()
    paths = {p.name: p for folder in (DATA, BOOK_DATA) for p in folder.iterdir()
             if p.is_file() and p.name != "README.md"}
    assert set(paths) == set(listed), f"not in the README: {sorted(set(paths) - set(listed))}; " \
                                      f"listed but absent: {sorted(set(listed) - set(paths))}"
    for name, md5 in listed.items():
        assert hashlib.md5(paths[name].read_bytes()).hexdigest() == md5, f"{name}: the README's MD5 is stale"
