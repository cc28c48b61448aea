"""The package as a user meets it: mode switch, command line, import without Jupyter, export and pairing checks."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edm_lit.cli import main
from edm_lit.mode import MODE_ENV, get_mode

ROOT = Path(__file__).resolve().parents[1]


def test_mode_switch():
    assert get_mode({}).name == "quick"
    assert get_mode({MODE_ENV: " QUICK "}).quick
    with pytest.raises(ValueError, match="EDM_LIT_MODE must be one of"):
        get_mode({MODE_ENV: "fast"})
    assert get_mode({}).pick(quick=1, full=2) == (1 if get_mode({}).quick else 2)


def test_full_mode_inputs(tmp_path, capsys):
    """Full mode reads its four variables, refuses bad ones in one line, and falls back to quick with a reason."""
    data = tmp_path / "set.zip"
    data.write_bytes(b"")
    mode = get_mode({MODE_ENV: "full", "EDM_LIT_DATA": str(data), "EDM_LIT_KIMG": "2.5",
                     "EDM_LIT_INCEPTION": "/w.pth", "EDM_LIT_PRETRAINED": "https://example.org/net.pkl"})
    assert (mode.full, mode.data, mode.kimg, mode.inception, mode.pretrained) == \
        (True, str(data), 2.5, "/w.pth", "https://example.org/net.pkl")
    assert get_mode({MODE_ENV: "full"}).pretrained.endswith("edm-cifar10-32x32-cond-vp.pkl")
    for var, value in [("EDM_LIT_KIMG", "nan"), ("EDM_LIT_KIMG", "-1"), ("EDM_LIT_KIMG", "ten"),
                       ("EDM_LIT_DATA", str(tmp_path / "missing.zip"))]:
        with pytest.raises(ValueError, match=var):
            get_mode({MODE_ENV: "full", var: value})
    capsys.readouterr()
    needs_all = mode.require("the part", gpu=True, needs=("data", "kimg"))
    line = capsys.readouterr().out
    if torch.cuda.is_available():
        assert needs_all is mode and line == ""
    else:
        assert needs_all.quick and line == "full mode: the part needs a CUDA GPU; running the quick version\n"
    cpu_part = get_mode({MODE_ENV: "full"}).require("reading the data", gpu=False, needs=("data",))
    assert cpu_part.quick and capsys.readouterr().out.strip().endswith("needs EDM_LIT_DATA; running the quick version")
    assert mode.require("reading the data", gpu=False, needs=("data",)) is mode


def test_info_in_full_mode_without_traceback(monkeypatch, capsys):
    monkeypatch.setenv(MODE_ENV, "full")
    monkeypatch.delenv("EDM_LIT_DATA", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "mode: full" in out and "EDM_LIT_DATA: (not set)" in out
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in out
    monkeypatch.setenv("EDM_LIT_KIMG", "inf")
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "EDM_LIT_KIMG" in err and "Traceback" not in err


def test_cli(capsys):
    assert main(["info"]) == 0
    assert "mode: quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_console_script_installed():
    exe = shutil.which("edm-lit", path=str(Path(sys.executable).parent))
    assert exe, "the edm-lit console script is not installed next to this Python"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("edm_lit ")


def test_package_imports_without_jupyter():
    code = (
        "import sys, pkgutil, importlib\n"
        "for name in ['IPython', 'ipykernel', 'ipywidgets', 'jupytext', 'nbformat', 'matplotlib']:\n"
        "    sys.modules[name] = None  # any import of these now fails\n"
        "import edm_lit\n"
        "for m in pkgutil.iter_modules(edm_lit.__path__):\n"
        "    importlib.import_module('edm_lit.' + m.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_book_and_package_in_step():
    """edm_lit/ is exactly what the chapters export, and every .ipynb matches its .py."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "nbtools.py"), "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _copy_project(tmp_path):
    for name in ["book", "edm_lit", "tools"]:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def _check(root):
    return subprocess.run([sys.executable, str(root / "tools" / "nbtools.py"), "check"], capture_output=True, text=True)


def test_check_catches_hand_edit(tmp_path):
    root = _copy_project(tmp_path)
    target = root / "edm_lit" / "framework.py"
    target.write_text(target.read_text().replace("def ode_slope(", "def ode_slope_edited(", 1))
    out = _check(root)
    assert out.returncode == 1 and "edm_lit/framework.py differs" in out.stderr


def test_check_catches_stray_module_and_unsynced_pair(tmp_path):
    root = _copy_project(tmp_path)
    (root / "edm_lit" / "extra.py").write_text("x = 1\n")
    chapter = root / "book" / "01_framework.py"
    chapter.write_text(chapter.read_text() + "\n# %%\nprint('new cell')\n")
    out = _check(root)
    assert out.returncode == 1
    assert "edm_lit/extra.py is not exported by any chapter" in out.stderr
    assert "01_framework.ipynb is out of sync with 01_framework.py" in out.stderr


def test_public_api():
    """`import edm_lit` offers the modules and the library's public names; every module declares __all__."""
    import importlib

    import edm_lit

    for name in edm_lit._MODULES:
        module = importlib.import_module(f"edm_lit.{name}")
        assert isinstance(module.__all__, list) and module.__all__, f"edm_lit.{name} declares no __all__"
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"edm_lit.{name}.__all__ names what it does not define: {missing}"
        assert not any(n.startswith("_") for n in module.__all__)
    for name in ["edm_sampler", "EDMPrecond", "EDMLoss", "SongUNet", "DhariwalUNet", "ImageFolderDataset",
                 "AugmentPipe", "training_loop", "frechet_distance", "load_network", "save_network"]:
        assert name in edm_lit.__all__
    from edm_lit.samplers import edm_sampler
    assert edm_lit.edm_sampler is edm_sampler and edm_lit.samplers.edm_sampler is edm_sampler
    assert set(edm_lit.__all__) <= set(dir(edm_lit))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        edm_lit.no_such_name
    out = subprocess.run([sys.executable, "-c", "import edm_lit, sys; print(len(edm_lit.__all__)); "
                          "print('edm_lit.networks' in sys.modules)"], capture_output=True, text=True, check=True)
    count, loaded = out.stdout.split()
    assert int(count) > 20 and loaded == "False"  # the API is listed without importing every module


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_shows_the_package_map_in_80_columns(monkeypatch, capsys):
    """`edm-lit --help` fits 80 columns and ends with the package map: every module once, the ones that are not
    library API marked `*` (exactly those whose names `import edm_lit` does not offer), the same table as
    README.md's; and it says that `edm-lit train` is `python -m edm_lit.train` and the loop `edm_lit.training`."""
    import edm_lit

    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width
    text = _help(["--help"], capsys)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert text.index("positional arguments") < text.index("package map")  # commands first, then the map
    rows = [r for r in re.findall(r"^  (\w+)(\*?) +(\S.*?)  +(\S.*)$", text, re.M) if r[0] != "module"]
    in_help = {module: (what, book, not star) for module, star, what, book in rows}
    assert len(in_help) == len(rows) and sorted(in_help) == sorted(edm_lit._MODULES)
    assert {module for module, (_, _, api) in in_help.items() if api} == set(edm_lit._API.values())
    assert {m for m, (_, _, api) in in_help.items() if not api} >= {"cli", "course"}
    readme = (ROOT / "README.md").read_text()
    in_readme = re.findall(r"^\| `edm_lit\.(\w+)`(\\\*)? \| (.+?) \| (.+?) \|$", readme, re.M)
    assert {module: (what, book, not star) for module, star, what, book in in_readme} == in_help
    flat = " ".join(text.split())
    assert "`edm-lit train` is the module edm_lit.train (also `python -m edm_lit.train`" in flat
    assert "The training loop it runs is the module edm_lit.training" in flat


def test_edm_lit_train_is_python_m_edm_lit_train(capsys):
    """What the help says: `edm-lit train` and `python -m edm_lit.train` take the same flags."""
    from edm_lit import train

    def flags(text):
        return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))
    with pytest.raises(SystemExit):
        train.main(["--help"])
    module_help = capsys.readouterr().out
    command_help = _help(["train", "--help"], capsys)
    assert flags(module_help) == flags(command_help) and {"--data", "--outdir", "--fp16"} <= flags(command_help)
