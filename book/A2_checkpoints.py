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
# # B. Checkpoints: loading official snapshots without running their code
#
# Chapter 5 builds the paper's networks with the official constructor arguments and
# `state_dict()` names. This appendix reads the files those networks are shipped in — the official
# `.pkl` snapshots — as *data*, writes our own code-free format, and says exactly what a hostile
# file can and cannot do to you.

# %%
import math
from pathlib import Path

import torch

from edm_lit.mode import get_mode
from edm_lit.precond import EDMPrecond

MODE = get_mode()
PARITY = torch.load(Path("..") / "tests" / "data" / "precond_edm.pt", weights_only=True)

# %% [markdown]
# ## B.1 Loading the official checkpoints — safely
#
# The official snapshots (`network-snapshot-*.pkl` from training, and the released
# `edm-cifar10-32x32-cond-vp.pkl` and friends) are Python **pickles** of a dictionary:
# `ema` (the network with averaged weights, the one to sample from), `loss_fn`, `augment_pipe`
# and `dataset_kwargs`. Pickle is not a data format but a small program: its opcodes look up
# *any* importable Python callable by name and call it with arguments from the file, so
# `pickle.load` on an untrusted file can, for instance, call `os.system`. The official files go
# further on purpose: their network classes are written by `torch_utils.persistence`, which stores
# **the source code of the module that defined each class** (`module_src`) and, on loading,
# `exec`s it to recreate the class. Loading an official snapshot the official way therefore runs
# whatever code the file contains.
#
# We never do that. What the file must contain is fully determined by how the official code
# writes it — each persistent object is reduced to a call
# `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
#
# | field of `meta` | holds |
# |---|---|
# | `type` | `'class'` |
# | `version` | 6 (the persistence format's version) |
# | `module_src` | the source code of the defining module — **ignored** by us |
# | `class_name` | e.g. `'EDMPrecond'`, `'SongUNet'`, `'UNetBlock'` |
# | `state` | the object's `__dict__`: `_parameters`, `_buffers`, `_modules` (the children, persistent objects themselves), the `_init_kwargs` the constructor got, … |
#
# and each tensor to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)` (wrapped in
# `_rebuild_parameter` for parameters), its storage to `torch.storage._load_from_bytes(b)` — bytes
# in PyTorch's legacy serialisation format, which we read with PyTorch's own restricted loader
# (`weights_only=True`). So we unpickle with a **restricted unpickler**: its `find_class`, the one
# place where a pickle can name a callable, answers only for that short list (plus
# `collections.OrderedDict`, `set`, `ModuleDict`, NumPy scalars, which a module's `__dict__` holds)
# and maps each name to *our own* function that turns the data into a plain record. Everything
# else raises `CheckpointError` before anything runs. The network is then rebuilt from the
# recorded `_init_kwargs` with **our** classes, and its tensors copied in with a strict
# `state_dict` check.

# %% tags=["export:checkpoints"]
import collections
import hashlib
import http.client
import inspect
import io
import json
import math
import os
import pickle
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch

from edm_lit import networks, precond


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: refused, corrupt, incompatible with our networks, or unreachable. Appendix B."""


# classes an official pickle may contain, by the name it records; networks are rebuilt with our classes
NETWORK_CLASSES = {
    "EDMPrecond": precond.EDMPrecond, "VPPrecond": precond.VPPrecond, "VEPrecond": precond.VEPrecond,
    "iDDPMPrecond": precond.iDDPMPrecond, "SongUNet": networks.SongUNet, "DhariwalUNet": networks.DhariwalUNet,
}
SUBMODULE_CLASSES = {"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding"}
RECORD_CLASSES = {"AugmentPipe", "EDMLoss", "VPLoss", "VELoss"}  # kept as plain records of their settings
PERSISTENCE_VERSION = 6

# %% [markdown]
# The records and the handful of functions the unpickler may hand out. Each checks the types of
# its arguments — they come from the file — and none of them imports, executes or opens anything.

# %% tags=["export:checkpoints"]
class PersistentObject:
    """A persistent object of an official pickle, as data: its class name and saved state; its code is never run. Appendix B."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __repr__(self):
        return f"PersistentObject({self.class_name!r})"


class _ModuleDictRecord:
    """Stands in for torch.nn.ModuleDict inside a pickle (built with NEWOBJ, then BUILD with its __dict__)."""

    class_name = "ModuleDict"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointError("malformed ModuleDict state in the pickle")
        self.state = state


class _EasyDict(dict):
    """Stands in for dnnlib.util.EasyDict (a dict subclass) in a pickle."""

    def __setstate__(self, state):
        pass


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str) or not isinstance(meta.get("state"), dict):
        raise CheckpointError("malformed persistent object in the pickle (expected meta with class_name and state)")
    name = meta["class_name"]
    if meta.get("type") != "class" or meta.get("version") != PERSISTENCE_VERSION:
        raise CheckpointError(f"unsupported persistence record for {name!r}: type {meta.get('type')!r}, "
                              f"version {meta.get('version')!r} (expected 'class', {PERSISTENCE_VERSION})")
    if name not in NETWORK_CLASSES.keys() | SUBMODULE_CLASSES | RECORD_CLASSES:
        raise CheckpointError(f"refusing to load persistent class {name!r} from a checkpoint: not an allowed class")
    return PersistentObject(name, meta["state"])  # meta['module_src'] is deliberately never looked at


def _load_storage(data):
    if not isinstance(data, bytes):
        raise CheckpointError("malformed tensor storage in the pickle")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"refusing a tensor storage that PyTorch's restricted loader rejects: {e}") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise CheckpointError(f"expected a tensor storage in the pickle, got {type(storage).__name__}")
    return storage


def _is_ints(value):
    return isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)) or not isinstance(storage_offset, int) \
            or not _is_ints(size) or not _is_ints(stride) or len(size) != len(stride):
        raise CheckpointError("malformed tensor in the pickle")
    try:
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), False,
                                               collections.OrderedDict())
    except RuntimeError as e:  # e.g. a size that does not fit the storage
        raise CheckpointError(f"malformed tensor in the pickle: {e}") from None


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("malformed parameter in the pickle")
    return data


_NUMPY_SCALARS = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


class _NumpyDType:
    """Stands in for numpy.dtype in a pickle: only the plain numeric scalar types."""

    def __init__(self, code, align=False, copy=True):
        if code not in _NUMPY_SCALARS:
            raise CheckpointError(f"refusing NumPy dtype {code!r} from a checkpoint: not a plain numeric scalar type")
        self.code, self.order = code, "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "="):
            self.order = state[1]


def _numpy_scalar(dtype, data=b""):
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise CheckpointError("malformed NumPy scalar in the pickle")
    dt = np.dtype(dtype.code).newbyteorder(dtype.order)
    if len(data) != dt.itemsize:
        raise CheckpointError("malformed NumPy scalar in the pickle")
    return np.frombuffer(data, dt)[0].item()  # a plain Python number


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictRecord,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the official persistence format only; any other global is refused before it is called. Appendix B."""

    def find_class(self, module, name):
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise CheckpointError(f"refusing to load '{module}.{name}' from a checkpoint: not an allowed type")
        return target

    def persistent_load(self, pid):
        raise CheckpointError("refusing a pickle with persistent ids: not the official snapshot format")


def read_official_pickle(path):
    """Unpickle an official .pkl with the restricted unpickler: dicts, tensors and PersistentObject records. Appendix B."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint: {path}") from None
    except Exception as e:  # truncated files end in EOFError or UnpicklingError, garbage in many others
        raise CheckpointError(f"{path} is not a readable official snapshot (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None

# %% [markdown]
# From records to a network. The record of the top-level network carries its constructor's
# keyword arguments; we pass them to our class of the same name, then walk the record tree and
# collect its parameters and persistent buffers under their dotted names — which are exactly the
# `state_dict()` keys — checking on the way that every child module has the class our network
# has at that place. A strict load then demands the same keys and shapes; when they differ the
# error names them.

# %% tags=["export:checkpoints"]
def _state_of(record, prefix, out):
    """Collect parameters and persistent buffers of a record tree into out[dotted name] = tensor."""
    state = record.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None and name not in skip:
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"{prefix + name} in the pickle is not a tensor")
                out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _state_of(child, f"{prefix}{name}.", out)
    return out


def _check_architecture(record, module, prefix=""):
    """Every child in the file must sit where our network has a module of the same class name."""
    for name, child in (record.state.get("_modules") or {}).items():
        ours = module._modules.get(name) if module is not None else None
        where = prefix + name
        if child is None:
            continue
        if not isinstance(child, (PersistentObject, _ModuleDictRecord)):
            raise CheckpointError(f"{where} in the pickle is not a module")
        if ours is None:
            raise CheckpointError(f"wrong architecture: the checkpoint has a module {where!r} ({child.class_name}) "
                                  f"that our {type(module).__name__} does not")
        if type(ours).__name__ != child.class_name:
            raise CheckpointError(f"wrong architecture at {where!r}: the checkpoint has {child.class_name}, "
                                  f"our network {type(ours).__name__}")
        _check_architecture(child, ours, where + ".")


def load_state_dict_strictly(net, state: dict, source) -> None:
    """load_state_dict(strict=True), with a CheckpointError naming missing, unexpected and mis-shaped keys. Appendix B."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} (checkpoint {tuple(state[k].shape)}, network {tuple(v.shape)})"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                for what, keys in [("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", misshaped)] if keys]
    if problems:
        raise CheckpointError(f"{source} does not fit {type(net).__name__}: " + "; ".join(problems))
    net.load_state_dict(state, strict=True)


def build_network(record: PersistentObject, source="the checkpoint") -> torch.nn.Module:
    """Our network (EDMPrecond, SongUNet, ...) with the weights of an official record, in eval mode. Appendix B."""
    if not isinstance(record, PersistentObject) or record.class_name not in NETWORK_CLASSES:
        found = record.class_name if isinstance(record, PersistentObject) else type(record).__name__
        raise CheckpointError(f"{source} holds {found}, not one of the networks {sorted(NETWORK_CLASSES)}")
    args, kwargs = record.state.get("_init_args") or (), record.state.get("_init_kwargs")
    if args or not isinstance(kwargs, dict):
        raise CheckpointError(f"{source}: the {record.class_name} record has no keyword constructor arguments")
    try:
        net = NETWORK_CLASSES[record.class_name](**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot build {record.class_name}(**{kwargs}): {e}") from None
    _check_architecture(record, net)
    load_state_dict_strictly(net, _state_of(record, "", {}), source)
    return net.eval().requires_grad_(False)


def load_official_snapshot(path) -> dict:
    """All entries of an official snapshot .pkl: networks built with our classes, other records as PersistentObject. Appendix B."""
    data = read_official_pickle(path)
    if isinstance(data, PersistentObject):
        return {"ema": build_network(data, str(path))}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a snapshot dict with an 'ema' network, got {type(data).__name__}")
    return {k: build_network(v, f"{path} [{k!r}]") if isinstance(v, PersistentObject) and v.class_name in NETWORK_CLASSES
            else v for k, v in data.items()}

# %% [markdown]
# ### Our own format
#
# For our own checkpoints we use a format that is data only: the weights in a
# [safetensors](https://huggingface.co/docs/safetensors) file (a JSON header of names, dtypes and
# shapes followed by raw bytes; nothing to execute) and, beside it, a small JSON file with the
# network's class name, its constructor arguments, a format version and the SHA-256 of the
# weights file. `save_network(net, "out/cifar")` writes `out/cifar.safetensors` and
# `out/cifar.json`; each is written to a temporary file first and moved into place with
# `os.replace`, so a crash never leaves a half-written file under the final name.
# Non-finite floats (EDM's default `sigma_max=inf`) are stored as `{"float": "inf"}`, since
# JSON has no infinity.
#
# A preconditioner records no constructor arguments of its own, so `network_config` reads them
# back: every argument of its class's constructor is also an attribute of the same name, and
# the inner network (ours) keeps its `init_kwargs`.

# %% tags=["export:checkpoints"]
FORMAT_NAME = "edm_lit.network"
FORMAT_VERSION = 1
_INTERFACE_KWARGS = ("img_resolution", "in_channels", "out_channels", "label_dim")  # set by the preconditioner


def _to_json(value, where="init_kwargs"):
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
    raise ValueError(f"{where} = {value!r} cannot be stored in a checkpoint's JSON config")


def _from_json(value):
    if isinstance(value, dict):
        return float(value["float"]) if set(value) == {"float"} else {k: _from_json(v) for k, v in value.items()}
    return [_from_json(v) for v in value] if isinstance(value, list) else value


def network_config(net) -> dict:
    """{'class_name', 'init_kwargs'} that rebuild `net` (an EDMPrecond/VP/VE/iDDPM or SongUNet/DhariwalUNet). Appendix B."""
    cls = type(net)
    if NETWORK_CLASSES.get(cls.__name__) is not cls:
        raise ValueError(f"net must be one of {sorted(NETWORK_CLASSES)} of edm_lit, got {cls.__module__}.{cls.__name__}")
    if isinstance(net, precond.Precond):
        params = inspect.signature(cls.__init__).parameters
        kwargs = {k: getattr(net, k) for k, p in params.items()
                  if p.kind is p.POSITIONAL_OR_KEYWORD and k not in ("self", "model_type") and hasattr(net, k)}
        inner = network_config(net.model)
        kwargs["model_type"] = inner["class_name"]
        kwargs.update({k: v for k, v in inner["init_kwargs"].items() if k not in _INTERFACE_KWARGS})
    else:
        kwargs = dict(net.init_kwargs)
    return {"class_name": cls.__name__, "init_kwargs": kwargs}


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pair(path) -> tuple:
    """(config .json, weights .safetensors) for a name given with or without either suffix."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_network(net, path) -> tuple:
    """Write `net` as PATH.safetensors (weights) + PATH.json (class, constructor arguments, SHA-256); atomic. Appendix B."""
    from safetensors.torch import save_file

    config_path, weights_path = _pair(path)
    config = network_config(net)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    _write_atomically(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT_NAME}))
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "class_name": config["class_name"],
              "init_kwargs": _to_json(config["init_kwargs"]), "weights": weights_path.name,
              "weights_sha256": _sha256(weights_path)}
    _write_atomically(config_path, lambda tmp: Path(tmp).write_text(json.dumps(header, indent=2) + "\n"))
    return config_path, weights_path


def _load_ours(path) -> torch.nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, _ = _pair(path)
    try:
        header = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint: {config_path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path} is not an edm_lit network config (no format {FORMAT_NAME!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version {header.get('format_version')!r}; "
                              f"this edm_lit reads version {FORMAT_VERSION}")
    name = header.get("class_name")
    if name not in NETWORK_CLASSES:
        raise CheckpointError(f"{config_path}: unknown network class {name!r}, expected one of {sorted(NETWORK_CLASSES)}")
    weights_path = config_path.parent / str(header.get("weights"))
    if not weights_path.is_file():
        raise CheckpointError(f"{config_path} names the weights file {weights_path}, which is missing")
    if _sha256(weights_path) != header.get("weights_sha256"):
        raise CheckpointError(f"{weights_path} does not match the SHA-256 recorded in {config_path} "
                              "(truncated, corrupt or replaced)")
    kwargs = _from_json(header.get("init_kwargs") or {})
    try:
        net = NETWORK_CLASSES[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: cannot build {name}(**{kwargs}): {e}") from None
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from None
    load_state_dict_strictly(net, state, str(weights_path))
    return net.eval().requires_grad_(False)

# %% [markdown]
# ### URLs, one entry point, and conversion
#
# `load_network` takes a path or an `http(s)` URL. A URL is downloaded once into a cache
# directory (`$EDM_LIT_CACHE`, else `~/.cache/edm_lit`) under a name derived from the URL. The
# download goes to a `.part` file and resumes where it stopped — an HTTP `Range` request — when a
# connection drops (three attempts per call; the next call continues), and is renamed into place
# only when complete. Without network access you get an error that names the URL and where to
# put a manually downloaded copy. The format is recognised by the name: `.pkl` is an official
# snapshot (its `ema` network is returned), `.json`/`.safetensors` or a bare name is ours.

# %% tags=["export:checkpoints"]
DOWNLOAD_ATTEMPTS = 3


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept: $EDM_LIT_CACHE, else ~/.cache/edm_lit. Appendix B."""
    return Path(os.environ.get("EDM_LIT_CACHE") or Path.home() / ".cache" / "edm_lit")


def is_url(path_or_url) -> bool:
    return isinstance(path_or_url, str) and urllib.parse.urlparse(path_or_url).scheme in ("http", "https")


def _fetch_into(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part` (a Range request when part has bytes); raise if it ends early."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part file is already complete
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
    if expected is not None and part.stat().st_size != expected:
        raise http.client.IncompleteRead(b"", expected - part.stat().st_size)


def download(url: str, cache=None, timeout: float = 60.0) -> Path:
    """Download `url` into the cache (resumable, atomic rename when complete) and return the local path. Appendix B."""
    cache = Path(cache) if cache is not None else cache_dir()
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    error = None
    for _ in range(DOWNLOAD_ATTEMPTS):
        try:
            _fetch_into(url, part, timeout)
            os.replace(part, dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e
            if isinstance(e, urllib.error.HTTPError) and e.code < 500:
                break  # 404 and friends will not change by retrying
    raise CheckpointError(f"could not download {url}: {error}. If this machine is offline, download the file "
                          f"elsewhere and pass its local path (or save it as {dest}); a partial download is kept "
                          f"in {part} and resumes on the next attempt")


def load_network(path_or_url, cache=None) -> torch.nn.Module:
    """The ready network (eval mode, no grad) from an official .pkl (its 'ema'), our format, or a URL. Appendix B."""
    path = download(path_or_url, cache) if is_url(path_or_url) else Path(path_or_url)
    if path.is_dir():
        configs = sorted(path.glob("*.json"))
        if len(configs) != 1:
            raise CheckpointError(f"{path} is a directory with {len(configs)} .json configs; pass one of them")
        path = configs[0]
    if path.suffix == ".pkl":
        data = read_official_pickle(path)
        if isinstance(data, dict):
            if "ema" not in data:
                raise CheckpointError(f"{path}: the snapshot has no 'ema' network (keys: {sorted(map(str, data))})")
            return build_network(data["ema"], f"{path} ['ema']")
        return build_network(data, str(path))
    if path.suffix in (".json", ".safetensors", ""):
        return _load_ours(path)
    raise CheckpointError(f"cannot tell the format of {path}: expected an official .pkl, or our .json/.safetensors")


def convert(src, dst) -> tuple:
    """Official snapshot (path or URL) -> our format at `dst` (.json + .safetensors); returns both paths. Appendix B."""
    return save_network(load_network(src), dst)

# %% [markdown]
# **Check — an official snapshot loads.** We cannot download the released files here, so we
# write one ourselves in exactly the official layout: the pickler below reduces each network
# object to `torch_utils.persistence._reconstruct_persistent_obj(meta)` as the official code
# does (a stand-in `torch_utils.persistence` module exists only while pickling; the
# `module_src` we store is a placeholder). The snapshot dict has the official keys; its `ema` is
# the parity network of Chapter 5 §5.4 wrapped in `EDMPrecond`, so the loaded network must reproduce the
# official outputs.

# %%
import io
import os
import pickle
import sys
import tempfile
import types

from edm_lit.checkpoints import (NETWORK_CLASSES, CheckpointError, convert, load_network, network_config,
                                 read_official_pickle, save_network)
from edm_lit.loss import EDMLoss

PERSISTENT = set(NETWORK_CLASSES) | {"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding",
                                     "FourierEmbedding", "EDMLoss"}


def official_layout_pickle(obj, module_src="# source code of the defining module\n") -> bytes:
    """Pickle obj as torch_utils.persistence does: every persistent object -> _reconstruct_persistent_obj(meta)."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only used to write")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    class Writer(pickle.Pickler):
        def reducer_override(self, o):
            name = type(o).__name__
            if name not in PERSISTENT or not type(o).__module__.startswith("edm_lit"):
                return NotImplemented
            kwargs = network_config(o)["init_kwargs"] if name in NETWORK_CLASSES else {}
            state = dict(o.__dict__, _init_args=(), _init_kwargs=kwargs)
            meta = dict(type="class", version=6, module_src=module_src, class_name=name, state=state)
            return _reconstruct_persistent_obj, (meta,)

    fake = types.ModuleType("torch_utils.persistence")
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": fake})
    try:
        buffer = io.BytesIO()
        Writer(buffer, protocol=4).dump(obj)
        return buffer.getvalue()
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)


official = EDMPrecond(**PARITY["kwargs"]).eval().requires_grad_(False)
official.load_state_dict(PARITY["state_dict"], strict=True)
snapshot = dict(ema=official, loss_fn=EDMLoss(), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"))
workdir = Path(tempfile.mkdtemp())
pkl = workdir / "network-snapshot-000000.pkl"
pkl.write_bytes(official_layout_pickle(snapshot))
print(f"wrote {pkl.name}: {pkl.stat().st_size:,} bytes; top level:", read_official_pickle(pkl))

net = load_network(pkl)
with torch.no_grad():
    for got, ref in [(net(PARITY["x"], PARITY["sigma"], PARITY["class_labels"]), PARITY["out"]),
                     (net(PARITY["x"], PARITY["sigma"], None), PARITY["out_class_labels_none"]),
                     (net(PARITY["x"], PARITY["sigma"], PARITY["class_labels"], augment_labels=PARITY["augment_labels"]),
                      PARITY["out_with_augment_labels"])]:
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"loaded EDMPrecond vs official output: {err:.1e}")
        assert err <= 1e-5
assert type(net) is EDMPrecond and not net.training and not any(p.requires_grad for p in net.parameters())

# %% [markdown]
# **Check — hostile files are refused, and nothing runs.** Two attacks. The classic one: a pickle
# whose reduce calls `os.system`. The one specific to this format: a perfectly shaped snapshot
# whose `module_src` contains code — the official loader would execute it. Both would create a
# marker file. The first is refused with a `CheckpointError`; the second loads (its data is
# fine) but its code is never run. Either way the marker never appears.

# %%
marker = workdir / "pwned"


class Hostile:
    def __reduce__(self):
        return os.system, (f"touch {marker}",)


(workdir / "hostile.pkl").write_bytes(pickle.dumps({"ema": Hostile()}))
try:
    load_network(workdir / "hostile.pkl")
except CheckpointError as e:
    print("refused:", e)
else:
    raise AssertionError("a pickle calling os.system must be refused")
trojan = official_layout_pickle({"ema": official}, module_src=f"open({str(marker)!r}, 'w').write('pwned')\n")
(workdir / "trojan.pkl").write_bytes(trojan)
assert str(marker).encode() in trojan  # the code is in the file ...
load_network(workdir / "trojan.pkl")
assert not marker.exists()  # ... and was never executed
print("module_src ignored; marker file exists:", marker.exists())

# %% [markdown]
# **Check — our format round-trips**, the conversion of an official snapshot gives the same
# network, and a truncated file or a config that does not fit the weights fails with an error
# that says what is wrong.

# %%
config_path, weights_path = convert(pkl, workdir / "converted" / "cifar-mini")
print(f"{config_path.name}:", config_path.read_text()[:300].replace("\n", " "), "...")
again = load_network(config_path)
with torch.no_grad():
    assert torch.equal(again(PARITY["x"], PARITY["sigma"], PARITY["class_labels"]),
                       net(PARITY["x"], PARITY["sigma"], PARITY["class_labels"]))
(workdir / "truncated.pkl").write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])
cfg = json.loads(config_path.read_text())
cfg["init_kwargs"]["model_channels"] = 32
(workdir / "converted" / "wrong.json").write_text(json.dumps(cfg))
for bad in [workdir / "truncated.pkl", workdir / "converted" / "wrong.json"]:
    try:
        load_network(bad)
    except CheckpointError as e:
        print(f"{bad.name}: {str(e)[:160]}...")
    else:
        raise AssertionError(f"{bad} must be refused")

# %% [markdown]
# ## B.4 Sampling from an official pretrained network
#
# Everything above comes together in four lines. To generate CIFAR-10 images with the paper's
# best conditional model (FID 1.79, 35 network evaluations), on a machine with internet access
# and preferably a GPU:
#
# ```python
# import torch
# from edm_lit.checkpoints import load_network
# from edm_lit.samplers import edm_sampler  # Chapters 2-3
#
# url = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl"
# device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# net = load_network(url).to(device)          # downloaded once into ~/.cache/edm_lit; no code from the file runs
# latents = torch.randn([16, net.img_channels, net.img_resolution, net.img_resolution], device=device)
# class_labels = torch.eye(net.label_dim, device=device)[torch.arange(16, device=device) % net.label_dim]
# images = edm_sampler(net, latents, class_labels)  # 18 Heun steps, float64, as the official generate.py
# images = (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()  # [16, 32, 32, 3]
# ```
#
# `load_network` returns the snapshot's `ema` network — our `EDMPrecond` around our `SongUNet`
# (DDPM++), built from the constructor arguments recorded in the file, in eval mode. Offline,
# download the `.pkl` elsewhere and pass its path instead of the URL, or convert it once with
# `edm-lit convert edm-cifar10-32x32-cond-vp.pkl cifar10-cond-vp` and afterwards load
# `cifar10-cond-vp.json` — our safetensors format, which contains no code at all. The other
# released snapshots (`edm-cifar10-32x32-uncond-vp.pkl`, `...-ve.pkl`, `edm-ffhq-64x64-uncond-*.pkl`,
# `edm-afhqv2-64x64-uncond-*.pkl`, `edm-imagenet-64x64-cond-adm.pkl`, and the `baseline-*.pkl`
# networks with VP, VE and iDDPM preconditioning) load the same way.
#
# **Check** — the same lines on the snapshot of §B.1 (the small official-layout network): the
# deterministic 18-step sampler on the official latents and labels reproduces the images the
# official `edm_sampler` made with the official network (`tests/data/sampler_edm.pt`).

# %%
from edm_lit.samplers import edm_sampler

SAMPLER = torch.load(Path("..") / "tests" / "data" / "sampler_edm.pt", weights_only=True)
net = load_network(pkl)
with torch.no_grad():
    images = edm_sampler(net, SAMPLER["latents"].double(), SAMPLER["class_labels"])
err = ((images - SAMPLER["det_out"]).abs().max() / SAMPLER["det_out"].abs().max()).item()
print(f"loaded snapshot + edm_sampler vs official: {err:.1e} (35 network calls, float64 sampler)")
assert err < 1e-3

