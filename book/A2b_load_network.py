# ---
# jupyter:
#   edm_lit:
#     export: checkpoints
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: edm_lit
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A2b. `load_network`: our format, URLs, and what a hostile file can do
#
# Appendix A2 reads an official snapshot as data and rebuilds its network with our classes.
# This appendix adds our own code-free format, downloads, the one entry point
# `load_network` (and `edm-lit convert`), and then states what a hostile file can and
# cannot do, with every attack measured (§A2b.4) and tested.

# %% tags=["hide-input"]
import copy
import functools
import math
import os
import pickle
import tempfile
from pathlib import Path

import torch

from edm_lit.checkpoints import (  # Appendix A2
    MAX_FILE_BYTES, NETWORK_CLASSES, CheckpointError, _brief, _build_meta_network,
    _build_network, _check_init_kwargs, _check_shapes, _ints, _materialize, _parameters,
    _read_regular_file, _SCALARS, _INTERFACE, read_official_pickle)
from edm_lit import precond
from edm_lit import course
from edm_lit.course import official_layout_pickle
from edm_lit.loss import EDMLoss
from edm_lit.precond import EDMPrecond

PARITY = torch.load(Path("data") / "precond_edm.pt", weights_only=True)
official = EDMPrecond(**PARITY["kwargs"]).eval().requires_grad_(False)
official.load_state_dict(PARITY["state_dict"], strict=True)
workdir = Path(tempfile.mkdtemp())
pkl = workdir / "network-snapshot-000000.pkl"  # an official-layout snapshot (A2.4)
pkl.write_bytes(official_layout_pickle(dict(ema=official, loss_fn=EDMLoss())))

refusal = functools.partial(course.refusal, hide=workdir)  # Appendix A2

# %% [markdown]
# ## A2b.1 Our own format
#
# Our checkpoints are data only: the weights in a
# [safetensors](https://huggingface.co/docs/safetensors) file (a JSON header of names, dtypes
# and shapes, then raw bytes) and beside it a small JSON file with the network's class name,
# its constructor arguments, a format version, the weights file's name and its SHA-256.
# `save_network(net, "out/cifar")` writes `out/cifar.json` and
# `out/cifar-<first 16 hex digits of the SHA-256>.safetensors`.
#
# Naming the weights by their hash makes the pair atomic: the weights are written under a
# temporary name, flushed (`fsync`) and renamed to their content-derived name; only then is
# the `.json` written the same way and renamed over the old one (Appendix A3's
# `write_atomic`). The `.json` is the commit point: whenever the program stops, it names
# complete weights, the old pair's or the new one's. The old weights are removed afterwards.
#
# Reading trusts the `.json` no more than a pickle: `weights` must be a bare file name ending
# in `.safetensors` (so it can only name a file beside the `.json`; the same error for
# `"../x"` whether or not `../x` exists), the SHA-256 must match, and the constructor
# arguments pass the checks and the meta-device comparison of Appendix A2 §A2.4 before
# anything is allocated. JSON has no infinity: EDM's `sigma_max=inf` is `{"float": "inf"}`.
# A preconditioner records no constructor arguments, so `network_config` reads them back
# from its attributes of the same names and from the inner network's `init_kwargs`.

# %% tags=["export:checkpoints"]
import contextlib
import hashlib
import http.client
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from edm_lit.files import check_writable, write_atomic

FORMAT_NAME = "edm_lit.network"
FORMAT_VERSION = 1
_MAX_CONFIG_BYTES = 1 << 20  # our .json config
_HASHED_WEIGHTS = re.compile(r"(.+)-[0-9a-f]{16}\.safetensors")


def _to_json(value, where="init_kwargs"):
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
    raise ValueError(f"{where} = {value!r} cannot be stored in a checkpoint's config")


def _from_json(value, depth=0):
    """Inverse of _to_json for constructor arguments: scalars, {"float": ...}, lists."""
    if type(value) is dict and set(value) == {"float"} and type(value["float"]) is str:
        try:
            return float(value["float"])
        except ValueError:
            raise CheckpointError(f"{value['float']!r:.40} is not a float") from None
    if isinstance(value, list) and depth == 0:
        return [_from_json(v, 1) for v in value]
    if type(value) not in _SCALARS:
        raise CheckpointError(f"constructor argument {_brief(value)} is not a number, "
                              "string or short list of them")
    return value


def network_config(net) -> dict:
    """{'class_name', 'init_kwargs'} that rebuild `net`: a VP/VE/iDDPM/EDMPrecond,
    SongUNet or DhariwalUNet of edm_lit. Appendix A2b."""
    cls = type(net)
    if NETWORK_CLASSES.get(cls.__name__) is not cls:
        raise ValueError(f"net must be one of {sorted(NETWORK_CLASSES)} of edm_lit, "
                         f"got {cls.__module__}.{cls.__name__}")
    if not isinstance(net, precond.Precond):
        return {"class_name": cls.__name__, "init_kwargs": dict(net.init_kwargs)}
    kwargs = {k: getattr(net, k) for k, p in _parameters(cls).items()
              if p.kind is p.POSITIONAL_OR_KEYWORD and k != "model_type"
              and hasattr(net, k)}
    inner = network_config(net.model)
    kwargs["model_type"] = inner["class_name"]
    inner_kwargs = inner["init_kwargs"].items()
    kwargs.update((k, v) for k, v in inner_kwargs if k not in _INTERFACE)
    return {"class_name": cls.__name__, "init_kwargs": kwargs}

# %% [markdown]
# The names of a pair, and the checks of what a config and a weights file say.

# %% tags=["export:checkpoints"]
def _config_path(path) -> Path:
    """The .json of a pair from its name with either suffix or none (weights may carry
    their hash)."""
    path = Path(path)
    if path.suffix == ".json":
        return path
    if path.suffix == ".safetensors":
        hashed = _HASHED_WEIGHTS.fullmatch(path.name)
        return path.with_name((hashed.group(1) if hashed else path.stem) + ".json")
    return path.with_name(path.name + ".json")


def _weights_name(header: dict, config_path) -> str:
    """The weights a config names: a bare .safetensors name, else one same error."""
    name = header.get("weights")
    if type(name) is not str or not name.endswith(".safetensors") \
            or name.startswith(".") or len(name) > 255 \
            or any(c in name for c in "/\\\0:") or Path(name).name != name:
        raise CheckpointError(f"{config_path}: 'weights' must be the bare name of a "
                              ".safetensors file beside the config, got "
                              f"{_brief(name)}")
    return name


def _read_config(config_path) -> dict:
    """Our .json: a regular file of at most 1 MiB, UTF-8 JSON, our format, version."""
    data = _read_regular_file(config_path, _MAX_CONFIG_BYTES)
    try:
        header = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON (truncated?): "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path} is not an edm_lit network config (no "
                              f"format {FORMAT_NAME!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version "
                              f"{_brief(header.get('format_version'))}; this edm_lit "
                              f"reads version {FORMAT_VERSION}")
    digest = header.get("weights_sha256")
    if type(digest) is not str or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise CheckpointError(f"{config_path}: 'weights_sha256' must be 64 lowercase "
                              "hex digits")
    if type(header.get("init_kwargs", {})) is not dict:
        raise CheckpointError(f"{config_path}: 'init_kwargs' must be an object")
    return header


def _safetensors_shapes(data: bytes, source) -> dict:
    """Names and shapes from a safetensors header; the file's length is checked."""
    n = int.from_bytes(data[:8], "little")
    try:
        if len(data) < 8 or n > min(len(data) - 8, 100 << 20):
            raise ValueError("header length past the end of the file")
        header = json.loads(data[8:8 + n].decode("utf-8"))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes = {k: tuple(v["shape"]) for k, v in entries.items()}
        end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError,
            RecursionError) as e:
        raise CheckpointError(f"{source} is not a readable safetensors file: "
                              f"{type(e).__name__}: {e}") from None
    if end != len(data) - 8 - n or not all(_ints(s) for s in shapes.values()):
        raise CheckpointError(f"{source} is not a complete safetensors file "
                              "(truncated?)")
    return shapes

# %% [markdown]
# Writing and reading a pair.

# %% tags=["export:checkpoints"]
def save_network(net, path) -> tuple:
    """Write `net` as PATH.json + PATH-<hash>.safetensors, atomically as a pair; returns
    both paths. Appendix A2b."""
    from safetensors.torch import save

    config_path, config = _config_path(path), network_config(net)
    state = net.state_dict()
    blob = save({k: v.detach().to("cpu").contiguous() for k, v in state.items()},
                metadata={"format": FORMAT_NAME})
    digest = hashlib.sha256(blob).hexdigest()
    weights_path = config_path.with_name(f"{config_path.stem}-{digest[:16]}"
                                         ".safetensors")
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
              "class_name": config["class_name"],
              "init_kwargs": _to_json(config["init_kwargs"]),
              "weights": weights_path.name, "weights_sha256": digest}
    config_path.parent.mkdir(parents=True, exist_ok=True)
    try:  # the weights the present config names, if it is ours: removed at the end
        old = _weights_name(_read_config(config_path), config_path)
    except CheckpointError:
        old = None
    write_atomic(weights_path, blob)
    write_atomic(config_path, (json.dumps(header, indent=2) + "\n").encode())
    if old not in (None, weights_path.name) \
            and _config_path(config_path.parent / old) == config_path:
        (config_path.parent / old).unlink(missing_ok=True)
    return config_path, weights_path


def _load_ours(path, weights_path=None):
    from safetensors.torch import load

    config_path = _config_path(path)
    header = _read_config(config_path)
    name = header.get("class_name")
    if weights_path is None:
        weights_path = config_path.parent / _weights_name(header, config_path)
    try:
        kwargs = {k: _from_json(v) for k, v in header.get("init_kwargs", {}).items()}
    except CheckpointError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    kwargs = _check_init_kwargs(name, kwargs, str(config_path))
    data = _read_regular_file(weights_path)
    if hashlib.sha256(data).hexdigest() != header["weights_sha256"]:
        raise CheckpointError(f"{weights_path} does not match the SHA-256 recorded in "
                              f"{config_path} (truncated, corrupt or replaced)")
    meta = _build_meta_network(name, kwargs, str(config_path))
    _check_shapes({k: v.shape for k, v in meta.state_dict().items()},
                  _safetensors_shapes(data, weights_path), str(weights_path))
    try:
        state = load(bytes(data))
    except Exception as e:  # the library's own validation of the file
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: "
                              f"{e}") from None
    return _materialize(meta, state, name, kwargs)

# %% [markdown]
# **Check.** Saving a second network under the same name replaces the pair and removes the
# old weights; `sigma_max=inf` is stored as `{"float": "inf"}` and read back; a config whose
# `weights` leaves its folder is refused with the same message whether the target exists.

# %% tags=["hide-input"]
first, second = copy.deepcopy(official), copy.deepcopy(official)
with torch.no_grad():
    second.model.map_label.weight.add_(1)
save_network(first, workdir / "pair" / "net")
config_path, weights_path = save_network(second, workdir / "pair" / "net")
print(sorted(p.name for p in config_path.parent.iterdir()))
assert sorted(config_path.parent.iterdir()) == sorted([config_path, weights_path])
header = json.loads(config_path.read_text())
assert header["init_kwargs"]["sigma_max"] == {"float": "inf"}
again = _load_ours(config_path)
assert again.sigma_max == math.inf
assert torch.equal(again.model.map_label.weight, second.model.map_label.weight)
(workdir / "secret.safetensors").write_bytes(weights_path.read_bytes())
messages = []
for target in ["../secret.safetensors", "../absent.safetensors"]:
    config_path.write_text(json.dumps(dict(header, weights=target)))
    messages.append(refusal(_load_ours, config_path))
print(messages[0])
assert messages[0].replace("secret", "?") == messages[1].replace("absent", "?")

# %% [markdown]
# ## A2b.2 URLs and the cache
#
# A URL is downloaded once into a cache directory (`$EDM_LIT_CACHE`, else
# `~/.cache/edm_lit`) under a name derived from the URL. The download goes to a `.part`
# file and, when a connection drops, resumes where it stopped (an HTTP `Range` request whose
# `206` answer must start where the part file ends; three attempts per call, the next call
# continues). It enters the cache only complete: with a `Content-Length` the byte count must
# match (a malformed header is an error); without one the connection must have closed
# cleanly *and* the file must parse as what its name says, else the part is deleted. Every
# rank of a `torchrun` job may ask for the same URL at once, so a download holds an
# exclusive `flock` on `<name>.lock` (released by the operating system if the process dies):
# one process downloads, the others wait and then find the file in the cache (a test runs
# three at once). Offline, the error names the URL and where to put a copy downloaded
# elsewhere.

# %% tags=["export:checkpoints"]
_DOWNLOAD_ATTEMPTS = 3


def cache_dir() -> Path:
    """Where downloads are kept: $EDM_LIT_CACHE, else ~/.cache/edm_lit. Appendix A2b."""
    return Path(os.environ.get("EDM_LIT_CACHE") or Path.home() / ".cache" / "edm_lit")


def is_url(path_or_url) -> bool:
    """Whether `path_or_url` is an http(s) URL (else a path). Appendix A2b."""
    return isinstance(path_or_url, str) and \
        urllib.parse.urlparse(path_or_url).scheme in ("http", "https")


def _content_length(response, url):
    value = response.headers.get("Content-Length")
    if value is not None and not re.fullmatch(r"\s*[0-9]{1,19}\s*", value):
        raise CheckpointError(f"could not download {url}: the server sent an invalid "
                              f"Content-Length {value!r:.40}")
    return None if value is None else int(value)


def _fetch_into(url: str, part: Path, timeout: float):
    """Append the rest of `url` to `part` (a Range request when part has bytes); returns
    the expected size, or None when the server does not say."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is complete
            return have
        raise
    with response:
        answer = response.headers.get("Content-Range") or ""
        if have and response.status == 206 and not answer.startswith(f"bytes {have}-"):
            part.unlink()  # a part of the file, but not the one that continues ours
            raise http.client.HTTPException(f"the server answered the range request "
                                            f"for bytes {have}- with {answer!r:.60}")
        if have and response.status != 206:
            have = 0  # the server ignored the range and sends the whole file
        length = _content_length(response, url)
        expected = None if length is None else have + length
        if (expected or 0) > MAX_FILE_BYTES:
            raise CheckpointError(f"could not download {url}: {expected:,} bytes is "
                                  "more than the limit")
        with open(part, "ab" if have else "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):  # may raise if cut
                f.write(block)
                if f.tell() > MAX_FILE_BYTES:
                    raise CheckpointError(f"could not download {url}: more than "
                                          f"{MAX_FILE_BYTES:,} bytes")
    if expected is not None and part.stat().st_size != expected:
        raise http.client.IncompleteRead(b"", expected - part.stat().st_size)
    return expected


def _verify_complete(part: Path, name: str, url: str) -> None:
    """Without a Content-Length, a download is complete only if it parses."""
    suffix = Path(name).suffix
    try:
        if suffix == ".pkl":
            read_official_pickle(part)
        elif suffix == ".json":
            _read_config(part)
        elif suffix == ".safetensors":
            _safetensors_shapes(_read_regular_file(part), part)
        else:
            raise CheckpointError("a file of unknown type cannot be checked")
    except CheckpointError as e:
        part.unlink(missing_ok=True)
        raise CheckpointError(f"could not download {url}: the server sent no "
                              "Content-Length and the file it sent is incomplete or "
                              f"corrupt ({e}); nothing was cached") from None

# %% [markdown]
# One process at a time per URL, and the download itself.

# %% tags=["export:checkpoints"]
@contextlib.contextmanager
def _exclusive(lock: Path):
    """Hold an exclusive flock on the file `lock` (created; removed on release)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent downloads are not coordinated
        yield
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us removed the file: locking it locks nothing
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # still locked: a waiter sees it gone, tries again
        os.close(fd)


def download(url: str, cache=None, timeout: float = 60.0) -> Path:
    """Download `url` into the cache (resumable, verified, renamed in when complete; one
    process at a time per URL, the others wait) and return its path. Appendix A2b."""
    cache = Path(cache) if cache is not None else cache_dir()
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest.with_name(dest.name + ".lock")):
        if dest.is_file():  # another process completed it while we waited
            return dest
        part, error = dest.with_name(dest.name + ".part"), None
        for _ in range(_DOWNLOAD_ATTEMPTS):
            try:
                if _fetch_into(url, part, timeout) is None:
                    _verify_complete(part, name, url)
                os.replace(part, dest)
                return dest
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                error = e
                if isinstance(e, urllib.error.HTTPError) and e.code < 500:
                    break  # 404 and friends do not change by retrying
    raise CheckpointError(f"could not download {url}: {error}. If this machine is "
                          "offline, download the file elsewhere and pass its local "
                          f"path (or save it as {dest}); a partial download is kept "
                          f"in {part} and resumes on the next attempt")

# %% [markdown]
# **Check.** A loopback server sends the snapshot but drops the first connection half way:
# the download resumes with a `Range` request from the byte where it stopped, and a second
# call finds the file in the cache and asks the server for nothing.

# %% tags=["hide-input"]
import http.server
import threading


class Server(http.server.BaseHTTPRequestHandler):
    """Sends `blob` from the byte a Range header asks for; the first answer stops
    half way."""
    blob, starts = pkl.read_bytes(), []

    def log_message(self, *args):
        pass

    def do_GET(self):
        start = int(self.headers.get("Range", "bytes=0-")[6:-1])
        self.starts.append(start)
        self.send_response(206 if start else 200)
        size = len(self.blob)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        self.wfile.write(self.blob[start:size // 2 if len(self.starts) == 1 else size])
        self.close_connection = True


httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{httpd.server_address[1]}/edm-mini.pkl"
for _ in range(2):
    cached = download(url, cache=workdir / "cache")
httpd.shutdown()
print(f"requests from byte {Server.starts}; cached {cached.name}: "
      f"{cached.stat().st_size:,} bytes")
assert Server.starts == [0, len(Server.blob) // 2]
assert cached.read_bytes() == Server.blob
assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no .part, no .lock

# %% [markdown]
# ## A2b.3 One entry point, and conversion
#
# `load_network` takes a path or an `http(s)` URL and tells the format by the name: `.pkl` is
# an official snapshot (its `ema` network is returned), `.json`, `.safetensors`, a bare name
# or a folder with one `.json` is ours; a `.json` from a URL fetches its weights, by their
# bare name, from beside it. Whatever goes wrong inside, it raises a `CheckpointError` that
# names the file. `convert` (the command `edm-lit convert IN OUT`, Appendix A1) checks that
# the output can be written *before* it loads (a download can be large), then saves.

# %% tags=["export:checkpoints"]
def _load_network(path_or_url, cache):
    if is_url(path_or_url):
        path = download(path_or_url, cache)
        if path.suffix == ".json":  # our format: the weights beside the config's URL
            name = _weights_name(_read_config(path), path_or_url)
            weights_url = urllib.parse.urljoin(path_or_url, urllib.parse.quote(name))
            return _load_ours(path, download(weights_url, cache))
        if path.suffix != ".pkl":
            raise CheckpointError(f"cannot tell the format of {path_or_url}: a URL "
                                  "must end in .pkl or .json")
    elif isinstance(path_or_url, (str, os.PathLike)):
        path = Path(path_or_url)
    else:
        raise CheckpointError("path_or_url must be a path or an http(s) URL, got "
                              f"{type(path_or_url).__name__}")
    if path.is_dir():
        configs = sorted(path.glob("*.json"))
        if len(configs) != 1:
            raise CheckpointError(f"{path} is a directory with {len(configs)} .json "
                                  "configs; pass one of them")
        path = configs[0]
    if path.suffix == ".pkl":
        data = read_official_pickle(path)
        if not isinstance(data, dict):
            return _build_network(data, str(path))
        if "ema" not in data:
            keys = sorted(map(str, data))[:10]
            raise CheckpointError(f"{path}: the snapshot has no 'ema' network (keys: "
                                  f"{keys})")
        return _build_network(data["ema"], f"{path} ['ema']")
    if path.suffix in (".json", ".safetensors", ""):
        return _load_ours(path)
    raise CheckpointError(f"cannot tell the format of {path}: expected an official "
                          ".pkl, or our .json/.safetensors")


def load_network(path_or_url, cache=None) -> torch.nn.Module:
    """The network, ready (eval mode, no grad), from an official .pkl (its 'ema'), our
    .json + .safetensors, or a URL of either. Appendix A2b."""
    try:
        return _load_network(path_or_url, cache)
    except CheckpointError:
        raise
    except Exception as e:  # whatever else a malformed file provokes: a bad checkpoint
        raise CheckpointError(f"{path_or_url!s:.200}: cannot load this checkpoint "
                              f"({type(e).__name__}: {e})") from None


def _convert_destination(src, dst) -> Path:
    """DST itself, or DST/<name of SRC> when DST is a folder; checked writable."""
    dst = Path(dst)
    if dst.is_dir():
        stem = Path(urllib.parse.urlparse(src).path if is_url(src) else str(src)).stem
        dst = dst / (stem or "network")
    try:
        check_writable(dst, "OUT")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return dst


def convert(src, dst) -> tuple:
    """An official snapshot (path or URL) in our format, DST.json and
    DST-<hash>.safetensors (DST may be a folder); returns both paths. Appendix A2b."""
    dst = _convert_destination(src, dst)
    return save_network(load_network(src), dst)

# %% [markdown]
# **Check.** The official-layout snapshot of §A2.4, converted to our format, loads as the
# same network (equal outputs); a truncated snapshot and a config that does not fit its
# weights fail with an error that says what is wrong; an output that cannot be written is
# refused before the source is even downloaded.

# %% tags=["hide-input"]
config_path, weights_path = convert(pkl, workdir / "converted" / "cifar-mini")
print(f"{config_path.name}:", config_path.read_text()[:150].replace("\n", " "), "...")
x, sigma, labels = PARITY["x"], PARITY["sigma"], PARITY["class_labels"]
with torch.no_grad():
    assert torch.equal(load_network(config_path)(x, sigma, labels),
                       load_network(pkl)(x, sigma, labels))
(workdir / "truncated.pkl").write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])
cfg = json.loads(config_path.read_text())
cfg["init_kwargs"]["model_channels"] = 32
(workdir / "converted" / "wrong.json").write_text(json.dumps(cfg))
for bad in [workdir / "truncated.pkl", workdir / "converted" / "wrong.json"]:
    print(refusal(load_network, bad)[:150], "...")
(workdir / "a-file").write_text("")  # OUT inside a file: cannot be written
print(refusal(convert, "https://example.invalid/edm.pkl", workdir / "a-file" / "out"))

# %% [markdown]
# ## A2b.4 What a hostile file can and cannot do
#
# `load_network` (and `edm-lit convert`) may be given any file or URL. For **any** content
# of the `.pkl`, the `.json`, the `.safetensors` file or the server's answers, it guarantees:
#
# 1. **No code from the file runs.** A pickle reaches only the callables of the table
#    `_ALLOWED_GLOBALS` (Appendix A2), all ours, each checking its arguments; `module_src` is
#    never read.
# 2. **Bounded time and memory.** Every opcode consumes bytes of a file of at most
#    `MAX_FILE_BYTES`; declared lengths are checked against the bytes left; nesting and
#    container entries are capped; keys hash in time linear in their length; nothing is
#    decompressed. The network is allocated only after the file has shown all its weights,
#    each a tensor of its own, so it never has more weights than the file has bytes.
# 3. **No memory outside the file becomes a weight**: a storage is exactly the bytes the
#    file holds for it, and every tensor lies inside its storage.
# 4. **Only the named files are read**: regular files (never a FIFO, device or directory),
#    and for our format the weights beside the `.json`, by a bare name.
# 5. **Every failure is a `CheckpointError`** (a `ValueError`) that names the file;
#    `edm-lit convert` prints it as one line and exits with status 1.
# 6. **Writing is atomic and durable**: a pair is replaced as a pair; only complete
#    downloads enter the cache, and processes downloading one URL take turns.
#
# It does **not** promise that the *numbers* in a file are benign (any weights, any
# outputs), that a large legitimate network fits in your memory, or protection against
# someone who rewrites the files while they are read. Each class of attack has its test in
# `tests/test_checkpoints.py`, which builds the hostile file and asserts the refusal within a
# time bound and, where the file carries code, that the marker file it would write never
# appears:
#
# | attack | test |
# |---|---|
# | a reduce calling `os.system`, `eval`, ...; the same inside a storage | `test_malicious_reduce_is_refused_without_effect`, `test_malicious_storage_payload_is_refused` |
# | code in `module_src` | `test_module_src_is_never_executed` |
# | a tensor past its storage, overlapping or sharing elements | `test_attack_tensor_outside_its_storage` |
# | one tensor or module record filling many weights (through the memo) | `test_attack_one_tensor_fills_many_weights` |
# | a tiny file asking for a huge network; a zip storage; a storage claiming 10¹² elements | `test_attack_tiny_file_asks_for_huge_network` |
# | a FIFO, `/dev/zero`, a directory; deep nesting, tuple keys, a 1 TB length, a 2⁹⁰-leaf tuple | `test_attack_special_files_and_bombs` |
# | `"weights": "../x"`, also from a URL | `test_attack_weights_path_traversal` |
# | `BUILD` on a function or record, `NEWOBJ` of other types, a callable `model_type` | `test_attack_build_and_callables` |
# | a download cut short, a bad `Content-Length` or `Content-Range` | `test_attack_download_without_or_with_bad_content_length`, `test_url_download_resumes_after_a_drop` |
# | anything provoking a Python exception; random damage | `test_attack_malformed_files_give_checkpoint_errors`, `test_truncated_files`, `test_fuzzed_files_give_checkpoint_errors_only` |
# | a crash while saving; a restrictive umask | `test_save_network_pair_is_atomic_durable_and_honours_umask` |
#
# **Check, and the figure.** One file of each class, built here and given to `load_network`;
# for each we measure the file's size, what it asks for, and the time and the peak memory
# until it is refused (the peak is reset before each; on Linux, `/proc/self/clear_refs`).

# %% tags=["hide-input"]
import collections
import io
import zipfile


class Call:
    """Pickles as the call func(*args): what a hostile file can say."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def in_official_layout(edit=None):
    return official_layout_pickle({"ema": official}, edit_state=edit)


huge_kwargs = dict(network_config(official)["init_kwargs"], model_channels=4096)
huge = _build_meta_network("EDMPrecond", huge_kwargs)  # shapes only: no memory


def asks_huge(name, state):  # the record asks for 4096 channels; its weights stay small
    return dict(state, _init_kwargs=huge_kwargs) if name == "EDMPrecond" else state


shared = {}


def one_tensor_per_shape(name, state):  # each shape's weights: one tensor, pickled once
    if state.get("_parameters"):
        state["_parameters"] = {k: shared.setdefault(v.shape, v)
                                for k, v in state["_parameters"].items()}
    return state


def weight_bytes(net):
    return sum(v.numel() * v.element_size() for v in net.state_dict().values())


dag = ()
for _ in range(90):
    dag = (dag, dag)  # 2^90 leaves, 90 levels in the file thanks to the memo
zip_blob = io.BytesIO()
with zipfile.ZipFile(zip_blob, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("archive/data/0", bytes(64 << 20))
past_end = Call(torch._utils._rebuild_tensor_v2, torch.zeros(3)._typed_storage(), 0,
                (10**6,), (1,), False, collections.OrderedDict())
config = json.loads(config_path.read_text())
marker = workdir / "pwned"
ATTACKS = {  # file name: (what it asks for, bytes it asks for or None, content)
    "reduce.pkl": ("a call of os.system", None,
                   pickle.dumps({"ema": Call(os.system, f"touch {marker}")})),
    "past-end.pkl": ("10⁶ elements of a 3-element storage", 4e6,
                     pickle.dumps({"ema": past_end})),
    "shared.pkl": ("all weights from one tensor per shape", weight_bytes(official),
                   in_official_layout(one_tensor_per_shape)),
    "huge.pkl": ("a network with 4096 channels", weight_bytes(huge),
                 in_official_layout(asks_huge)),
    "zip.pkl": ("64 MiB inflated from a zip storage", 64 << 20, pickle.dumps(
        {"ema": Call(torch.storage._load_from_bytes, zip_blob.getvalue())})),
    "terabyte.pkl": ("10¹² bytes, declared", 1e12,
                     b"\x80\x04\x8e" + (10**12).to_bytes(8, "little")),
    "deep-key.pkl": ("a dict key nested 10⁵ deep", None,
                     b"\x80\x04}" + b")" + b"\x85" * 100_000 + b"Ns."),
    "dag.pkl": ("a set of a tuple with 2⁹⁰ leaves", None, b"\x80\x02\x8c\x08builtins"
                b"\x8c\x03set\x93]" + pickle.dumps(dag, 2)[2:-1] + b"a\x85R."),
    "defaults.pkl": ("new __defaults__ for our function", None, b"\x80\x04\x8c\x17"
                     b"torch_utils.persistence\x8c\x1b_reconstruct_persistent_obj\x93N}"
                     b"\x8c\x0c__defaults__K\x01\x85s\x86b."),
    "traversal.json": ("weights at ../../network-snapshot-000000.pkl", None, json.dumps(
        dict(config, weights="../../network-snapshot-000000.pkl")).encode()),
    "fifo.pkl": ("a read that waits for a writer forever", None, None),
    "zero.json": ("the endless bytes of /dev/zero", math.inf, None),
}
attacks = workdir / "attacks"
attacks.mkdir()
for name, (_, _, content) in ATTACKS.items():
    if content is not None:
        (attacks / name).write_bytes(content)
os.mkfifo(attacks / "fifo.pkl")
(attacks / "zero.json").symlink_to("/dev/zero")

# %% tags=["hide-input"]
import re
import resource
import sys
import time

from myst_nb import glue


def peak_mib(reset=False) -> float:
    """This process's peak resident memory in MiB; reset=True starts anew (Linux)."""
    if Path("/proc/self/clear_refs").exists():
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes, else KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


measured = {}
for name, (asks, asked, _) in ATTACKS.items():
    before = peak_mib(reset=True)
    start = time.perf_counter()
    message = refusal(load_network, attacks / name)
    seconds, grew = time.perf_counter() - start, peak_mib() - before
    size = os.stat(attacks / name).st_size
    measured[name] = dict(size=size, seconds=seconds, mib=grew)
    print(f"{name:15} {1e3 * seconds:7.1f} ms {grew:6.1f} MiB  {message[:80]}")
assert not marker.exists()
slowest = max(measured, key=lambda n: measured[n]["seconds"])
most = max(measured, key=lambda n: measured[n]["mib"])
asked_mib = {n: ATTACKS[n][1] / 2**20 for n in ATTACKS if ATTACKS[n][1]}
print(f"slowest: {slowest}; most memory: {most}; huge.pkl asks for "
      f"{asked_mib['huge.pkl'] / 1024:.0f} GiB of weights in "
      f"{measured['huge.pkl']['size'] / 1e6:.1f} MB")
# bounds about ten times what was measured on a 2-core CPU (at most 70 ms, 1 MiB)
assert measured[slowest]["seconds"] < 1 and measured[most]["mib"] < 10
assert slowest in ("huge.pkl", "shared.pkl")  # a whole network is read and checked
glue("attack_count", len(measured), display=False)
glue("attack_max_ms", 1e3 * measured[slowest]["seconds"], display=False)
glue("attack_max_mib", measured[most]["mib"], display=False)
glue("huge_gib", asked_mib["huge.pkl"] / 1024, display=False)

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np

names = list(ATTACKS)[::-1]
rows = np.arange(len(names))
fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(13, 5.5), sharey=True,
                                    gridspec_kw=dict(width_ratios=[1.4, 1, 1]))
sizes = [measured[n]["size"] for n in names]
bars = ax0.barh(rows, [max(b, 1) for b in sizes], color="tab:blue", label="file size")
ax0.bar_label(bars, [f"{b:,} B" for b in sizes], fontsize=7, padding=2)
top, asked = 1e15, [ATTACKS[n][1] for n in names]
ax0.scatter([min(a, top) for a in asked if a], [r for r, a in zip(rows, asked) if a],
            marker=">", color="tab:red", zorder=3, label="memory it asks for")
ax0.annotate("∞", (top, rows[names.index("zero.json")]), xytext=(7, -4),
             textcoords="offset points")
ax0.set(xscale="log", xlim=(1, 1e16), xlabel="bytes (log scale)",
        title="the file, and the memory it asks for")
ax0.legend(loc="upper right", fontsize=8)
bars = ax1.barh(rows, [1e3 * measured[n]["seconds"] for n in names], color="tab:green")
ax1.bar_label(bars, fmt="%.2g", fontsize=7, padding=2)
ax1.set(xscale="log", xlim=(None, 2e3), xlabel="ms until refused (log scale)",
        title="time to refusal")
bars = ax2.barh(rows, [measured[n]["mib"] for n in names], color="tab:orange")
ax2.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
ax2.set(xlim=(0, 1.3 * max(measured[n]["mib"] for n in names) + 0.1),
        xlabel="MiB above the peak before the load", title="peak memory to refusal")
ax0.set_yticks(rows, [f"{n}: {ATTACKS[n][0]}" for n in names], fontsize=8)
fig.suptitle("Each hostile file is refused quickly and with little memory (this run)")
fig.tight_layout()
plt.show()

# %% [markdown]
# All {glue:text}`attack_count` hostile files were refused, none slower than
# {glue:text}`attack_max_ms:.0f` ms (the slowest is one of the two that describe a whole
# network, which is read and built on the `meta` device before it is refused), and none
# raised the peak memory by more than {glue:text}`attack_max_mib:.1f` MiB, though `huge.pkl`
# asks for {glue:text}`huge_gib:.0f` GiB of weights and `zero.json` for endless bytes.

# %% [markdown]
# ## A2b.5 Sampling from an official pretrained network
#
# Everything above comes together in a few lines. To generate CIFAR-10 images with the
# paper's best conditional model, on a machine with internet access and preferably a GPU:
#
# ```python
# import torch
# from edm_lit.checkpoints import load_network
# from edm_lit.samplers import edm_sampler  # Chapters 2-3
#
# url = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl"
# device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# net = load_network(url).to(device)  # cached in ~/.cache/edm_lit; no code from it runs
# n, res = 16, net.img_resolution
# latents = torch.randn([n, net.img_channels, res, res], device=device)
# labels = torch.eye(net.label_dim, device=device)[torch.arange(n) % net.label_dim]
# images = edm_sampler(net, latents, labels)  # 18 Heun steps, float64, as generate.py
# images = (images * 127.5 + 128).clip(0, 255).to(torch.uint8)  # [16, 3, 32, 32]
# ```
#
# `load_network` returns the snapshot's `ema` network, our `EDMPrecond` around our `SongUNet`
# (DDPM++), in eval mode. Offline, download the `.pkl` elsewhere and pass its path, or
# convert it once (`edm-lit convert edm-cifar10-32x32-cond-vp.pkl cifar10-cond-vp`) and then
# load `cifar10-cond-vp.json`, which contains no code at all. The other released snapshots
# (`edm-cifar10-32x32-uncond-vp.pkl`, `...-ve.pkl`, `edm-ffhq-64x64-uncond-*.pkl`,
# `edm-afhqv2-64x64-uncond-*.pkl`, `edm-imagenet-64x64-cond-adm.pkl`, and the `baseline-*`
# networks with VP, VE and iDDPM preconditioning) load the same way.
#
# **Check.** The same lines on the official-layout snapshot of §A2.4: the deterministic
# 18-step sampler on the official latents and labels reproduces the images the official
# `edm_sampler` made with the official network (`book/data/sampler_edm.pt`).

# %% tags=["hide-input"]
from edm_lit.samplers import edm_sampler

SAMPLER = torch.load(Path("data") / "sampler_edm.pt", weights_only=True)
with torch.no_grad():
    images = edm_sampler(load_network(pkl), SAMPLER["latents"].double(),
                         SAMPLER["class_labels"])
want = SAMPLER["det_out"]
err = ((images - want).abs().max() / want.abs().max()).item()
print(f"loaded snapshot + edm_sampler vs the official: {err:.1e} (35 network calls)")
assert err < 1e-6  # float32 rounding in the network only, as in tests/test_parity.py
