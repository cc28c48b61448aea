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
# # A2. Checkpoints: loading official snapshots without running their code
#
# Chapter 5 builds the paper's networks with the official constructor arguments and
# `state_dict()` names. This appendix reads the files the official networks ship in as
# *data*: a pickle machine of our own, the few records it may build, and the network rebuilt
# from them only once the file has shown it holds every weight. Appendix A2b adds our own
# code-free format, downloads, the entry point `load_network`, and what a hostile file can
# and cannot do. Both are reference: short blocks, each followed by its check.

# %% tags=["hide-input"]
import functools
import os
import pickle
import tempfile
from pathlib import Path

import torch

from edm_lit.precond import EDMPrecond

PARITY = torch.load(Path("data") / "precond_edm.pt", weights_only=True)
workdir = Path(tempfile.mkdtemp())

# %% tags=["export:course"]
def refusal(load, *args, hide=None) -> str:
    """The message of the ValueError that load(*args) raises, the folder `hide` shown
    as '…'; no error is a failure. Appendix A2."""
    try:
        load(*args)
    except ValueError as e:
        return str(e) if hide is None else str(e).replace(str(hide), "…")
    raise AssertionError(f"{getattr(load, '__name__', load)}{args} must be refused")

# %%
refusal = functools.partial(refusal, hide=workdir)

# %% [markdown]
# ## A2.1 What an official snapshot holds
#
# An official snapshot (`network-snapshot-*.pkl` from training, or a released `edm-*.pkl`)
# is a Python **pickle** of a dict: `ema` (the network to sample from), `loss_fn`,
# `augment_pipe` and `dataset_kwargs`. A pickle is a small program whose opcodes may import
# and call *any* Python callable, so `pickle.load` of an untrusted file can call
# `os.system`. The official files go further on purpose: `torch_utils.persistence` stores
# with each network class **the source code of its module** and `exec`s it when loading.
# Each network object is written as a call `_reconstruct_persistent_obj(meta)` of
# `torch_utils.persistence`:
#
# | field of `meta` | holds |
# |---|---|
# | `type`, `version` | `'class'`, 6 (the persistence format's version) |
# | `module_src` | the source code of the defining module: **never read** here |
# | `class_name` | e.g. `'EDMPrecond'`, `'SongUNet'`, `'UNetBlock'` |
# | `state` | the object's `__dict__`: `_parameters`, `_buffers`, `_modules`, `_init_kwargs`, … |
#
# A tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)` over a
# storage `torch.storage._load_from_bytes(b)`, bytes in PyTorch's legacy format. So we read
# the file with our own pickle machine (§A2.2), which answers this short list of names with
# our own functions (§A2.3); we rebuild the network with our classes once the file has shown
# that it holds every weight (§A2.4); anything else is a `CheckpointError`.

# %% tags=["export:checkpoints"]
import collections
import inspect
import math
import os
import pickletools
import stat
import struct

import numpy as np
import torch

from edm_lit import networks, precond


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: refused, corrupt, incompatible with our
    networks, or unreachable. Appendix A2."""


# the network classes a file may name, rebuilt with ours
NETWORK_CLASSES = {c.__name__: c for c in [
    precond.EDMPrecond, precond.VPPrecond, precond.VEPrecond, precond.iDDPMPrecond,
    networks.SongUNet, networks.DhariwalUNet]}
_INNER_NETWORKS = ("SongUNet", "DhariwalUNet")  # what a file's `model_type` may say
_SUBMODULES = {"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding",
               "FourierEmbedding"}
_RECORDS = {"AugmentPipe", "EDMLoss", "VPLoss", "VELoss"}  # kept as their settings
_PERSISTENCE_VERSION = 6

# What a file may ask of us; each limit is far above what the released files need.
MAX_FILE_BYTES = 8 << 30  # a checkpoint (the largest released one has about 1.2 GB)
_MAX_DEPTH = 100  # nesting of containers in a pickle (§A2.4 measures a snapshot's)
_MAX_ITEMS = 1 << 24  # entries of all the containers of a pickle together
_MAX_LIST = 16  # entries of a list argument (channel_mult, attn_resolutions, ...)
_MAX_INT = 1 << 16  # an integer constructor argument (channels, resolution, ...)
_CAPS = {"num_blocks": 64, "M": 10_000}  # a number of modules; iDDPM's CPU table

# %% [markdown]
# Every file goes through one reader. It opens without blocking (a FIFO named `x.pkl` would
# otherwise wait for a writer forever), accepts only a regular file (not a directory, a FIFO
# or `/dev/zero` behind a symlink) and reads at most `MAX_FILE_BYTES`.

# %% tags=["export:checkpoints"]
def _read_regular_file(path, max_bytes=None) -> bytearray:
    """The bytes of a regular file of at most max_bytes (else MAX_FILE_BYTES); FIFOs,
    devices and directories are refused without blocking."""
    max_bytes = MAX_FILE_BYTES if max_bytes is None else max_bytes
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint: {path}") from None
    except (OSError, ValueError, TypeError) as e:  # permissions, a NUL in the name...
        why = getattr(e, "strerror", None) or e
        raise CheckpointError(f"cannot open {path}: {why}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path} is not a regular file (a directory, FIFO or "
                                  "device): refused")
        if info.st_size > max_bytes:
            raise CheckpointError(f"{path} has {info.st_size:,} bytes, more than the "
                                  f"limit of {max_bytes:,}")
        data = bytearray(info.st_size)  # writable: tensors over it may be changed
        done = 0
        while done < len(data) and (n := f.readinto(memoryview(data)[done:])):
            done += n
        if done < len(data) or f.read(1):
            raise CheckpointError(f"{path} changed size while being read")
    return data

# %% tags=["hide-input"]
os.mkfifo(workdir / "fifo.pkl")
(workdir / "zero.pkl").symlink_to("/dev/zero")
for path in ["fifo.pkl", "zero.pkl", "absent.pkl"]:
    print(refusal(_read_regular_file, workdir / path))

# %% [markdown]
# ## A2.2 The pickle machine
#
# Python's unpickler runs whatever a file names; its `find_class` hook narrows *which*
# callables, but the machine still lets the file set attributes on any object (`BUILD`),
# hash tuples of any depth and nest containers without end. So we run our own small machine
# that knows only the opcodes of the official snapshots (protocols 2 to 5 as `pickle.dump`
# writes them). Its rules are the security of this appendix:
#
# - a callable comes only from `GLOBAL`/`STACK_GLOBAL`, answered from a fixed table of *our*
#   functions (`allowed`); `REDUCE` calls only those;
# - `NEWOBJ` creates only our `ModuleDict` and `EasyDict` records, and `BUILD` sets state
#   only on a `ModuleDict` record (a plain dict) or a NumPy dtype (a tuple);
# - dict keys and set members are scalars (str, int, float, bool, None), so hashing is cheap,
#   and an error message never prints a container from the file: with the memo, a 1 kB file
#   can describe a tuple with 2⁹⁰ leaves, which hashing or printing would never finish;
# - nesting depth, the number of container entries and every declared length (against the
#   bytes that are left) are bounded, so the time is linear in the file's size.
#
# First the machine's state: the byte stream, the stack with its marks, and the caps.

# %% tags=["export:checkpoints"]
_SCALARS = (str, int, float, bool, type(None))


def _brief(value) -> str:
    """A value from a file, for an error message: never the repr of a container, whose
    size (with the memo's sharing) can be exponential in the file's."""
    if type(value) is str:
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    return repr(value) if type(value) in _SCALARS else f"a {type(value).__name__}"


class _SnapshotUnpickler:
    """A pickle machine for the opcodes of the official snapshots only (_OPS).

    `allowed` maps (module, name) to what GLOBAL yields; `persistent_load` handles
    BINPERSID (or None). load() returns the value and leaves `pos` after STOP."""

    def __init__(self, data, allowed: dict, persistent_load=None, pos: int = 0):
        self.data, self.pos = memoryview(data), pos
        self.allowed, self.persistent_load = allowed, persistent_load
        self.stack, self.marks, self.memo = [], [], {}
        self.depth, self.keep, self.items = {}, [], 0  # id -> depth; keep: alive

    def fail(self, why):
        return CheckpointError(f"malformed or refused pickle at byte {self.pos}: {why}")

    def take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            left = len(self.data) - self.pos
            raise self.fail(f"truncated: {n:,} bytes declared, {left:,} left")
        self.pos += n
        return self.data[self.pos - n:self.pos]  # a view of the file, not a copy

    def uint(self, n):
        return int.from_bytes(self.take(n), "little")

    def line(self):
        end = bytes(self.data[self.pos:self.pos + 256]).find(b"\n")
        if end < 0:
            raise self.fail("GLOBAL name without an end of line")
        return self.take(end + 1)[:-1].tobytes().decode("ascii")

    def pop(self, n=1):
        if len(self.stack) - n < (self.marks[-1] if self.marks else 0):
            raise self.fail("stack underflow")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def pop_mark(self):
        if not self.marks:
            raise self.fail("no MARK on the stack")
        items = self.stack[self.marks[-1]:]
        del self.stack[self.marks.pop():]
        return items

    def grow(self, container, children):
        """Record that `container` now holds `children`, within the caps."""
        self.items += len(children)
        depth = 1 + max((self.depth.get(id(c), 0) for c in children), default=0)
        if depth > _MAX_DEPTH:
            raise self.fail(f"containers nested deeper than {_MAX_DEPTH}")
        if self.items > _MAX_ITEMS:
            raise self.fail(f"more than {_MAX_ITEMS:,} container entries")
        if id(container) not in self.depth:
            self.keep.append(container)
        self.depth[id(container)] = max(depth, self.depth.get(id(container), 1))
        return container

    def scalars(self, keys):
        if not all(type(k) in _SCALARS for k in keys):
            raise self.fail("dict keys and set members must be str, int, float, bool "
                            "or None")
        return keys

    def top(self, kinds: tuple, what: str):
        """The object on top of the stack, which must be one of `kinds`, for `what`."""
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self.fail(f"{what} on nothing")
        if not isinstance(self.stack[-1], kinds):
            found = type(self.stack[-1]).__name__
            ok = ", ".join(k.__name__ for k in kinds)
            raise self.fail(f"{what} on a {found}; only {ok} may receive it")
        return self.stack[-1]

    def load(self):
        while True:
            code = self.take(1)[0]
            if code not in _OPS:
                op = pickletools.code2op.get(chr(code))
                raise self.fail(f"opcode {op.name if op else hex(code)} is not allowed")
            if _OPS[code](self):
                break
        if len(self.stack) != 1 or self.marks:
            raise self.fail("the pickle does not end with exactly one value")
        return self.stack.pop()

# %% [markdown]
# The opcodes that touch containers, the memo and callables, each a function of the machine
# `m`; every one checks what it takes from the stack.

# %% tags=["export:checkpoints"]
def _extend(m, values, what):
    m.grow(m.top((list,), what), values).extend(values)


def _setitems(m, flat):
    if len(flat) % 2:
        raise m.fail("SETITEMS with an odd number of entries")
    keys, values = m.scalars(flat[0::2]), flat[1::2]
    m.grow(m.top((dict,), "SETITEM"), values).update(zip(keys, values))


def _additems(m, items):
    m.grow(m.top((set,), "ADDITEMS"), m.scalars(items)).update(items)


def _memo_put(m, index):
    if not m.stack or len(m.memo) >= _MAX_ITEMS:
        raise m.fail("nothing to memoize, or memo too large")
    m.memo[index] = m.stack[-1]


def _memo_get(m, index):
    if index not in m.memo:
        raise m.fail(f"memo entry {index} does not exist")
    return m.memo[index]


def _global(m, module, name):
    if type(module) is not str or type(name) is not str:
        raise m.fail(f"a global named by {_brief(module)} and {_brief(name)}, not two "
                     "strings")
    if (module, name) not in m.allowed:
        raise CheckpointError(f"refusing to load '{module[:100]}.{name[:100]}' from a "
                              "checkpoint: not an allowed type")
    return m.allowed[(module, name)]


def _reduce(m):
    func, args = m.pop(2)
    ours = any(func is f for f in m.allowed.values()) and func not in _NEWOBJ_TYPES
    if not ours or type(args) is not tuple:
        raise m.fail("REDUCE of something that is not an allowed callable with a tuple "
                     "of arguments")
    result = func(*args)
    held = isinstance(result, (dict, set, PersistentObject))
    return m.grow(result, args) if held else result


def _newobj(m):
    cls, args = m.pop(2)
    if cls not in _NEWOBJ_TYPES or args != ():
        name = getattr(cls, "__name__", type(cls).__name__)
        raise m.fail(f"NEWOBJ of {name}: only our records may be created")
    return m.grow(cls(), ())


def _build(m):
    (state,) = m.pop(1)
    target = m.top(_BUILD_TYPES, "BUILD")
    m.grow(target, [state])
    target.__setstate__(state)  # our records check the state's type


def _persistent(m):
    (pid,) = m.pop(1)
    if m.persistent_load is None:
        raise CheckpointError("refusing a pickle with persistent ids: not the official "
                              "snapshot format")
    return m.persistent_load(pid)

# %% [markdown]
# The whole instruction set is one table; an opcode that is not in it ends the load.

# %% tags=["export:checkpoints"]
def _proto(m):
    if m.uint(1) > 5:
        raise m.fail("pickle protocol newer than 5")


def _frame(m):
    if m.uint(8) > len(m.data) - m.pos:
        raise m.fail("truncated: a frame longer than the file")


def _long1(m):
    n = m.uint(1)
    if n > 16:
        raise m.fail("integer longer than 16 bytes")
    return int.from_bytes(m.take(n), "little", signed=True)


def _text(m, n):
    return str(m.take(n), "utf-8", "surrogatepass")


def _tuple(m, items):
    return m.grow(tuple(items), items)


def _frozenset(m, items):
    return m.grow(frozenset(m.scalars(items)), items)


_PUSH = {  # opcodes that push one value: name -> how the value is made
    "NONE": lambda m: None, "NEWTRUE": lambda m: True, "NEWFALSE": lambda m: False,
    "BININT": lambda m: int.from_bytes(m.take(4), "little", signed=True),
    "BININT1": lambda m: m.uint(1), "BININT2": lambda m: m.uint(2), "LONG1": _long1,
    "BINFLOAT": lambda m: struct.unpack(">d", m.take(8))[0],
    "SHORT_BINUNICODE": lambda m: _text(m, m.uint(1)),
    "BINUNICODE": lambda m: _text(m, m.uint(4)),
    "BINUNICODE8": lambda m: _text(m, m.uint(8)),
    "SHORT_BINBYTES": lambda m: m.take(m.uint(1)),
    "BINBYTES": lambda m: m.take(m.uint(4)),
    "BINBYTES8": lambda m: m.take(m.uint(8)),
    "EMPTY_TUPLE": lambda m: (),
    "TUPLE": lambda m: _tuple(m, m.pop_mark()),
    "TUPLE1": lambda m: _tuple(m, m.pop(1)),
    "TUPLE2": lambda m: _tuple(m, m.pop(2)),
    "TUPLE3": lambda m: _tuple(m, m.pop(3)),
    "EMPTY_LIST": lambda m: m.grow([], ()),
    "EMPTY_DICT": lambda m: m.grow({}, ()),
    "EMPTY_SET": lambda m: m.grow(set(), ()),
    "FROZENSET": lambda m: _frozenset(m, m.pop_mark()),
    "BINGET": lambda m: _memo_get(m, m.uint(1)),
    "LONG_BINGET": lambda m: _memo_get(m, m.uint(4)),
    "GLOBAL": lambda m: _global(m, m.line(), m.line()),
    "STACK_GLOBAL": lambda m: _global(m, *m.pop(2)),
    "REDUCE": _reduce, "NEWOBJ": _newobj, "BINPERSID": _persistent,
}
_EFFECT = {  # opcodes that change the stack, a container or the memo in place
    "PROTO": _proto, "FRAME": _frame, "MARK": lambda m: m.marks.append(len(m.stack)),
    "APPEND": lambda m: _extend(m, m.pop(1), "APPEND"),
    "APPENDS": lambda m: _extend(m, m.pop_mark(), "APPENDS"),
    "SETITEM": lambda m: _setitems(m, m.pop(2)),
    "SETITEMS": lambda m: _setitems(m, m.pop_mark()),
    "ADDITEMS": lambda m: _additems(m, m.pop_mark()),
    "MEMOIZE": lambda m: _memo_put(m, len(m.memo)),
    "BINPUT": lambda m: _memo_put(m, m.uint(1)),
    "LONG_BINPUT": lambda m: _memo_put(m, m.uint(4)),
    "BUILD": _build,
    "STOP": lambda m: True,  # the only opcode that returns True: the end
}


def _pushing(make):
    return lambda m: m.stack.append(make(m))


_OPS = {ord(op.code): _EFFECT.get(op.name) or _pushing(_PUSH[op.name])
        for op in pickletools.opcodes if op.name in {**_PUSH, **_EFFECT}}

# %% [markdown]
# **Check.** With an empty table of callables the machine reads plain data exactly as
# `pickle.loads` does (shared lists through the memo included); a callable, a key nested
# 100,000 deep and a terabyte-long string declared in 11 bytes are refused.

# %% tags=["hide-input"]
plain = {"a": [1, 2.5, None, True], "b": ("x", "é", -7, 2**70), 3: {1, 2},
         "f": frozenset({"z"})}
plain["shared"] = plain["a"]
for protocol in (4, 5):
    assert _SnapshotUnpickler(pickle.dumps(plain, protocol), {}).load() == plain
print("plain data:", _SnapshotUnpickler(pickle.dumps(plain), {}).load())
deep_key = b"\x80\x04}" + b")" + b"\x85" * 100_000 + b"Ns."  # ((((...)))) as a key
terabyte = b"\x80\x04\x8e" + (10**12).to_bytes(8, "little")  # BINBYTES8 of 10^12
for attack in [pickle.dumps(os.system), deep_key, terabyte]:
    print(refusal(lambda: _SnapshotUnpickler(attack, {}).load()))

# %% [markdown]
# ## A2.3 Records: what the allowed names yield
#
# The table of callables maps each name the official files use to *our* function, which
# checks the types of its arguments (they come from the file) and never imports, executes or
# opens anything. A network object becomes a `PersistentObject` record (its class name and
# state); `ModuleDict`, `EasyDict` and NumPy scalars become plain records or numbers.

# %% tags=["export:checkpoints"]
class PersistentObject:
    """A persistent object of an official pickle, as data: its class name and its saved
    state; its code is never run. Appendix A2."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __repr__(self):
        return f"PersistentObject({self.class_name!r})"


class _ModuleDictRecord:
    """torch.nn.ModuleDict in a pickle: NEWOBJ, then BUILD with its __dict__."""

    class_name = "ModuleDict"

    def __init__(self):
        self.state = {}

    def __setstate__(self, state):
        if type(state) is not dict:
            raise CheckpointError("malformed ModuleDict state in the pickle: not a "
                                  "plain dict")
        self.state = state


class _EasyDict(dict):
    """dnnlib.util.EasyDict (a dict subclass) in a pickle."""


class _NumpyDType:
    """numpy.dtype in a pickle: the plain numeric scalar types only."""

    CODES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}

    def __init__(self, code, align=False, copy=True):
        if type(code) is not str or code not in self.CODES:
            raise CheckpointError(f"refusing NumPy dtype {_brief(code)} from a "
                                  "checkpoint: not a plain numeric scalar type")
        self.code, self.order = code, "="

    def __setstate__(self, state):
        if type(state) is not tuple or len(state) < 2 or \
                state[1] not in ("<", ">", "=", "|"):
            raise CheckpointError("malformed NumPy dtype state in the pickle")
        self.order = state[1] if state[1] != "|" else "="


_NEWOBJ_TYPES = (_ModuleDictRecord, _EasyDict)  # what NEWOBJ may create
_BUILD_TYPES = (_ModuleDictRecord, _NumpyDType)  # what BUILD may give a state to


def _reconstruct_persistent_obj(meta):
    """torch_utils.persistence._reconstruct_persistent_obj: a record, no code."""
    if type(meta) is not dict or type(meta.get("class_name")) is not str \
            or not isinstance(meta.get("state"), dict):
        raise CheckpointError("malformed persistent object in the pickle (expected "
                              "meta with class_name and state)")
    name = meta["class_name"]
    if meta.get("type") != "class" or meta.get("version") != _PERSISTENCE_VERSION:
        raise CheckpointError(
            f"unsupported persistence record for {_brief(name)}: type "
            f"{_brief(meta.get('type'))}, version {_brief(meta.get('version'))} "
            f"(expected 'class', {_PERSISTENCE_VERSION})")
    if name not in NETWORK_CLASSES.keys() | _SUBMODULES | _RECORDS:
        raise CheckpointError(f"refusing to load persistent class {_brief(name)} from "
                              "a checkpoint: not an allowed class")
    return PersistentObject(name, meta["state"])  # meta["module_src"] is never read

# %% [markdown]
# **Tensors over the file's own bytes.** A storage arrives as bytes in PyTorch's legacy
# format: five small pickles (a magic number, the protocol 1001, system facts, the storage's
# description `('storage', dtype, key, location, numel)` as a persistent id, the list of
# keys), then the element count as 8 bytes and the raw elements. We parse it with the same
# machine (its only globals: the storage types) and demand that the declared count and the
# bytes held agree; the elements become a tensor *over the file's bytes*, which cannot grow.
# A storage in the newer zip format (maybe deflate-compressed) is refused undecompressed.
# A tensor `(storage, offset, size, stride)` must address only elements inside its storage,
# none twice, and the tensors on one storage together no more elements than it has.

# %% tags=["export:checkpoints"]
_STORAGE_TYPES = {("torch", f"{name}Storage"): dtype for name, dtype in [
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16),
    ("BFloat16", torch.bfloat16), ("Long", torch.int64), ("Int", torch.int32),
    ("Short", torch.int16), ("Char", torch.int8), ("Byte", torch.uint8)]}
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


class _Storage:
    """One storage: a 1-D tensor over the file's bytes, and how much of it is used."""

    def __init__(self, flat: torch.Tensor):
        self.flat, self.used = flat, 0


def _storage_id(pid):
    if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], torch.dtype) and type(pid[2]) is str
            and type(pid[3]) is str and type(pid[4]) is int and pid[4] >= 0
            and (len(pid) == 5 or pid[5] is None)):
        raise CheckpointError("malformed storage description in a tensor storage")
    return pid


def _load_storage(blob):
    """torch.storage._load_from_bytes, legacy format only: headers, count, elements."""
    if not isinstance(blob, memoryview):
        raise CheckpointError("malformed tensor storage in the pickle")
    if blob[:2] == b"PK":
        raise CheckpointError("refusing a tensor storage in zip format: the official "
                              "snapshots use the legacy format")
    pos, parts = 0, []
    for allowed, pids in [({}, None)] * 3 + [(_STORAGE_TYPES, _storage_id), ({}, None)]:
        machine = _SnapshotUnpickler(blob, allowed, pids, pos)
        parts.append(machine.load())
        pos = machine.pos
    magic, protocol, sys_info, pid, keys = parts
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL \
            or type(sys_info) is not dict:
        raise CheckpointError("a tensor storage in the pickle is not in PyTorch's "
                              "legacy format")
    if sys_info.get("little_endian") is not True:
        raise CheckpointError("refusing a big-endian tensor storage")
    if type(pid) is not tuple or keys != [pid[2]]:
        raise CheckpointError("a tensor storage in the pickle must hold one storage")
    dtype, numel = pid[1], pid[4]
    size, held = torch.empty((), dtype=dtype).element_size(), len(blob) - pos - 8
    if int.from_bytes(blob[pos:pos + 8], "little", signed=True) != numel \
            or held != numel * size:
        raise CheckpointError(f"a tensor storage declares {numel:,} elements of {size} "
                              f"bytes but holds {max(held, 0):,} bytes")
    if not numel:
        return _Storage(torch.empty(0, dtype=dtype))
    return _Storage(torch.frombuffer(blob[pos + 8:], dtype=dtype))


def _ints(value):
    return type(value) in (tuple, list) and len(value) <= 8 \
        and all(type(v) is int for v in value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2: a view inside its storage, no overlaps."""
    if not isinstance(storage, _Storage) or type(offset) is not int \
            or not _ints(size) or not _ints(stride) or len(size) != len(stride):
        raise CheckpointError("malformed tensor in the pickle")
    if not all(0 <= v < 1 << 62 for v in (offset, *size, *stride)):
        raise CheckpointError("malformed tensor in the pickle: a negative or absurd "
                              "size, stride or offset")
    have, numel = storage.flat.numel(), math.prod(size)
    what = f"a tensor in the pickle (size {tuple(size)}, stride {tuple(stride)}"
    reach = 0  # the furthest element the dimensions so far address, past the offset
    for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
        if s <= reach:
            raise CheckpointError(f"{what}) addresses some elements twice: refused")
        reach += (n - 1) * s
    if offset > have or (numel and offset + reach >= have):
        raise CheckpointError(f"{what}, offset {offset}) reaches past the end of its "
                              f"storage of {have:,} elements: refused")
    storage.used += numel
    if storage.used > have:
        raise CheckpointError("tensors in the pickle share storage elements: refused")
    return torch.as_strided(storage.flat, tuple(size), tuple(stride), offset)

# %% [markdown]
# The last few callables, the table itself, and the reader of an official file.

# %% tags=["export:checkpoints"]
def _scalar_set(items=()):
    """builtins.set in a pickle: scalar members only, so hashing is cheap."""
    if type(items) not in (list, tuple) or not all(type(k) in _SCALARS for k in items):
        raise CheckpointError("malformed set in the pickle: members must be str, int, "
                              "float, bool or None")
    return set(items)


def _ordered_dict(*items):
    """collections.OrderedDict() in a pickle: made empty; SETITEMS fills it."""
    if items:
        raise CheckpointError("malformed OrderedDict in the pickle: its items must "
                              "come with SETITEMS")
    return collections.OrderedDict()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("malformed parameter in the pickle")
    return data


def _numpy_scalar(dtype, data=b""):
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, (bytes, memoryview)):
        raise CheckpointError("malformed NumPy scalar in the pickle")
    dt = np.dtype(dtype.code).newbyteorder(dtype.order)
    if len(data) != dt.itemsize:
        raise CheckpointError("malformed NumPy scalar in the pickle")
    return np.frombuffer(bytes(data), dt)[0].item()  # a plain Python number


_ALLOWED_GLOBALS = {  # (module, name) -> ours: the only callables a pickle can reach
    ("torch_utils.persistence", "_reconstruct_persistent_obj"):
        _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictRecord,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _scalar_set,
    ("builtins", "frozenset"): lambda items=(): frozenset(_scalar_set(items)),
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


def read_official_pickle(path):
    """An official .pkl as data (dicts, tensors, PersistentObject records), read by our
    own pickle machine: no code from the file runs. Appendix A2."""
    data = _read_regular_file(path)
    try:
        machine = _SnapshotUnpickler(data, _ALLOWED_GLOBALS)
        value = machine.load()
        if machine.pos != len(data):
            raise CheckpointError(f"{len(data) - machine.pos:,} bytes after the end of "
                                  "the pickle")
        return value
    except CheckpointError as e:
        why = str(e)
    except (RecursionError, MemoryError, ValueError, TypeError, struct.error) as e:
        why = f"{type(e).__name__}: {e}"
    raise CheckpointError(f"{path} is not a readable official snapshot: {why}")

# %% [markdown]
# **Check.** A tensor pickled by PyTorch comes back equal, as a view of the file's own
# bytes; a tensor of more elements than its storage holds is refused.

# %% tags=["hide-input"]
weights = torch.arange(6.0).reshape(2, 3)
(workdir / "tensor.pkl").write_bytes(pickle.dumps({"w": weights}))
data = _read_regular_file(workdir / "tensor.pkl")
loaded = _SnapshotUnpickler(data, _ALLOWED_GLOBALS).load()["w"]
start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
assert torch.equal(loaded, weights) and 0 < loaded.data_ptr() - start < len(data)
print(f"tensor {loaded.tolist()} read in place, at byte {loaded.data_ptr() - start} "
      f"of the {len(data)}-byte file")
print(refusal(_rebuild_tensor, _Storage(torch.zeros(3)), 0, (10**6,), (1,)))

# %% [markdown]
# ## A2.4 From records to a network, sizes first
#
# The record of the top network carries its constructor's keyword arguments, and a tiny file
# can ask for a huge network (`model_channels=10**6`). So nothing is allocated until the file
# has shown that it holds every weight of the network it asks for:
#
# 1. the arguments are checked: only names our constructors take, plain values (numbers,
#    strings, short lists), integers within the caps, and `model_type` one of the two network
#    *names* (a callable from a file is refused);
# 2. the network is built on PyTorch's `meta` device (shapes, no memory), and the file's
#    module tree is walked along *ours* (so its cycles end), collecting the tensors; one
#    tensor object may fill **one** entry only (the memo would let one tensor, or one module
#    record, fill any number of them; the official files never do); names and shapes must
#    match exactly;
# 3. only then is memory allocated (`to_empty`, no random initialisation) and the weights
#    copied in with a strict `load_state_dict`.
#
# Since the tensors never total more elements than the file holds bytes (§A2.3), and each
# fills one entry, the network we allocate never has more weights than the file has bytes.

# %% tags=["export:checkpoints"]
_INTERFACE = ("img_resolution", "in_channels", "out_channels", "label_dim")


def _parameters(cls) -> dict:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.kind in kinds}


def _check_value(name, value, source):
    items = value if type(value) in (list, tuple) else [value]
    if len(items) > _MAX_LIST or not all(type(v) in _SCALARS for v in items):
        raise CheckpointError(f"{source}: constructor argument {name}={_brief(value)} "
                              "is not a number, string or short list of them")
    cap = _CAPS.get(name, _MAX_INT)
    for v in items:
        if (type(v) is int and abs(v) > cap) or (type(v) is str and len(v) > 64):
            raise CheckpointError(f"{source}: constructor argument {name}={_brief(v)} "
                                  f"is beyond the limit ({cap:,}) this loader accepts")


def _check_init_kwargs(class_name, kwargs, source="the checkpoint") -> dict:
    """A file's constructor arguments for `class_name`, checked against our class."""
    cls = NETWORK_CLASSES.get(class_name) if type(class_name) is str else None
    if cls is None:
        raise CheckpointError(f"{source}: unknown network class {_brief(class_name)}, "
                              f"expected one of {sorted(NETWORK_CLASSES)}")
    if type(kwargs) not in (dict, collections.OrderedDict, _EasyDict) \
            or not all(type(k) is str for k in kwargs):
        raise CheckpointError(f"{source}: the {class_name} record has no keyword "
                              "constructor arguments")
    allowed = _parameters(cls)
    if issubclass(cls, precond.Precond):  # the inner network's arguments pass through
        inner = kwargs.get("model_type", allowed["model_type"].default)
        if type(inner) is not str or inner not in _INNER_NETWORKS:
            raise CheckpointError(f"{source}: model_type must be one of "
                                  f"{_INNER_NETWORKS} (a name), got {_brief(inner)}")
        allowed = {k for k in allowed if k != "model_type"} | {
            k for k in _parameters(NETWORK_CLASSES[inner]) if k not in _INTERFACE}
    unknown = sorted(k for k in kwargs if k not in allowed and k != "model_type")
    if unknown:
        raise CheckpointError(f"{source}: {class_name} takes no constructor arguments "
                              f"{unknown[:5]}")
    for name, value in kwargs.items():
        if name != "model_type":
            _check_value(name, value, source)
    return dict(kwargs)


def _on_meta(cls):
    def build(**kwargs):
        with torch.device("meta"):
            return cls(**kwargs)
    return build


def _build_meta_network(class_name: str, kwargs: dict, source="the checkpoint"):
    """The network with checked `kwargs` on the meta device: shapes, no memory."""
    cls = NETWORK_CLASSES[class_name]
    try:
        if issubclass(cls, precond.Precond):  # its tables on the CPU, the net on meta
            inner = kwargs.get("model_type", _parameters(cls)["model_type"].default)
            return cls(**dict(kwargs, model_type=_on_meta(NETWORK_CLASSES[inner])))
        return _on_meta(cls)(**kwargs)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, OverflowError) as e:
        raise CheckpointError(f"{source}: cannot build {class_name}(**{kwargs}): "
                              f"{e}") from None


def _check_shapes(expected: dict, found: dict, source) -> None:
    """The same names and shapes in the network (expected) and in the file (found)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k} (checkpoint {tuple(found[k])}, network {tuple(v)})"
                 for k, v in expected.items() if k in found and found[k] != v]
    kinds = [("missing keys", missing), ("unexpected keys", unexpected),
             ("shape mismatches", misshaped)]
    problems = [f"{what} ({len(n)}): " + ", ".join(n[:5] + ["..."] * (len(n) > 5))
                for what, n in kinds if n]
    if problems:
        raise CheckpointError(f"{source} does not fit the network: "
                              + "; ".join(problems))

# %% [markdown]
# The walk along our tree, and the network built from a record.

# %% tags=["export:checkpoints"]
def _collect(record, module, prefix, out, owner):
    """The tensors of a record tree into out[dotted name], walking along our module
    tree; `owner` (id -> entry) lets a tensor object fill one entry only."""
    state = record.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        tensors = state.get(group) or {}
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{prefix + group} in the pickle is not a dict")
        for name, tensor in tensors.items():
            if tensor is None or name in skip:
                continue
            entry = prefix + str(name)
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{entry} in the pickle is not a tensor")
            if id(tensor) in owner:
                raise CheckpointError(f"{entry} in the pickle is the same tensor as "
                                      f"{owner[id(tensor)]}: one tensor filling "
                                      "several weights is refused")
            owner[id(tensor)], out[entry] = entry, tensor
    children = state.get("_modules") or {}
    if not isinstance(children, dict):
        raise CheckpointError(f"{prefix}_modules in the pickle is not a dict")
    for name, child in children.items():
        where, ours = prefix + str(name), module._modules.get(name)
        if child is None:
            continue
        if not isinstance(child, (PersistentObject, _ModuleDictRecord)):
            raise CheckpointError(f"{where} in the pickle is not a module")
        if ours is None or type(ours).__name__ != child.class_name:
            theirs = type(ours).__name__ if ours is not None else "nothing"
            raise CheckpointError(f"wrong architecture at {where!r}: the checkpoint "
                                  f"has {child.class_name}, our network {theirs}")
        _collect(child, ours, where + ".", out, owner)
    return out


def _materialize(meta, state: dict, class_name: str, kwargs: dict):
    """The real network holding `state`: memory for the meta network, then a strict
    load that overwrites every tensor (no random initialisation)."""
    names = set(meta.state_dict())
    on_meta = [k for m in meta.modules() for k, v in vars(m).items()
               if isinstance(v, torch.Tensor) and v.is_meta]
    if on_meta or any(name not in names for name, _ in meta.named_buffers()):
        net = NETWORK_CLASSES[class_name](**kwargs)  # a tensor `state` does not cover
    else:
        net = meta.to_empty(device="cpu")
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def _build_network(record, source="the checkpoint"):
    """Our network (EDMPrecond, SongUNet, ...) with an official record's weights."""
    ours = isinstance(record, PersistentObject)
    if not ours or record.class_name not in NETWORK_CLASSES:
        found = record.class_name if ours else type(record).__name__
        raise CheckpointError(f"{source} holds {found}, not one of the networks "
                              f"{sorted(NETWORK_CLASSES)}")
    if record.state.get("_init_args"):
        raise CheckpointError(f"{source}: the {record.class_name} record has "
                              "positional constructor arguments")
    kwargs = _check_init_kwargs(record.class_name, record.state.get("_init_kwargs"),
                                source)
    meta = _build_meta_network(record.class_name, kwargs, source)
    try:
        state = _collect(record, meta, "", {}, {})
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    _check_shapes({k: v.shape for k, v in meta.state_dict().items()},
                  {k: v.shape for k, v in state.items()}, source)
    return _materialize(meta, state, record.class_name, kwargs)


def load_official_snapshot(path) -> dict:
    """Every entry of an official snapshot .pkl: networks rebuilt with our classes,
    other records as PersistentObject. Appendix A2."""
    data = read_official_pickle(path)
    if isinstance(data, PersistentObject):
        return {"ema": _build_network(data, str(path))}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a snapshot dict with an 'ema' "
                              f"network, got {type(data).__name__}")
    return {k: _build_network(v, f"{path} [{k!r}]") if isinstance(v, PersistentObject)
            and v.class_name in NETWORK_CLASSES else v for k, v in data.items()}

# %% [markdown]
# **Check: an official snapshot loads, and its code never runs.** We cannot download the
# released files here, so we write one in exactly the official layout: the pickler below
# reduces each network object to `_reconstruct_persistent_obj(meta)` as the official code
# does (a stand-in `torch_utils.persistence` module exists only while pickling). It is a
# helper of the book and the tests (`edm_lit.course`), not API. Its `ema` is the parity
# network of Chapter 5 in `EDMPrecond`, and its `module_src` is code that would create a
# marker file: the official loader would run it. The caps of §A2.2 are far above what such
# a snapshot needs.

# %% tags=["export:course"]
import io
import pickle
import sys
import types

from edm_lit.checkpoints import NETWORK_CLASSES, network_config

_PERSISTENT = frozenset(NETWORK_CLASSES) | {
    "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding",
    "FourierEmbedding", "EDMLoss"}


def official_layout_pickle(obj, module_src="# source code of the defining module\n",
                           edit_state=None, version=6) -> bytes:
    """`obj` pickled in the layout torch_utils.persistence writes: each of our
    persistent objects becomes _reconstruct_persistent_obj(meta), `module_src` as given;
    `edit_state(class_name, state) -> state` may alter what is written. For the tests
    and demonstrations of the reader. Appendix A2."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only used to write")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    class Writer(pickle.Pickler):
        def reducer_override(self, o):
            name = type(o).__name__
            if name not in _PERSISTENT or not type(o).__module__.startswith("edm_lit"):
                return NotImplemented
            kwargs = network_config(o)["init_kwargs"] if name in NETWORK_CLASSES else {}
            state = dict(o.__dict__, _init_args=(), _init_kwargs=kwargs)
            if edit_state is not None:
                state = edit_state(name, state)
            meta = dict(type="class", version=version, module_src=module_src,
                        class_name=name, state=state)
            return _reconstruct_persistent_obj, (meta,)

    stand_in = types.ModuleType("torch_utils.persistence")  # only while pickling
    stand_in._reconstruct_persistent_obj = _reconstruct_persistent_obj
    names = ("torch_utils", "torch_utils.persistence")
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update(dict(zip(names, [types.ModuleType("torch_utils"), stand_in])))
    try:
        buffer = io.BytesIO()
        Writer(buffer, protocol=4).dump(obj)
        return buffer.getvalue()
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)

# %% tags=["hide-input"]
from edm_lit.course import official_layout_pickle
from edm_lit.loss import EDMLoss

official = EDMPrecond(**PARITY["kwargs"]).eval().requires_grad_(False)
official.load_state_dict(PARITY["state_dict"], strict=True)
marker = workdir / "pwned"
trojan = f"open({str(marker)!r}, 'w').write('pwned')\n"
snapshot = dict(ema=official, loss_fn=EDMLoss(), augment_pipe=None,
                dataset_kwargs=dict(path="cifar10.zip", use_labels=True))
pkl = workdir / "network-snapshot-000000.pkl"
pkl.write_bytes(official_layout_pickle(snapshot, module_src=trojan))
assert trojan.encode() in pkl.read_bytes()  # the code is in the file ...
print(f"{pkl.name}: {pkl.stat().st_size:,} bytes:", read_official_pickle(pkl))
loaded = load_official_snapshot(pkl)
net, x, sigma = loaded["ema"], PARITY["x"], PARITY["sigma"]
labels = PARITY["class_labels"]
with torch.no_grad():
    for got, ref in [(net(x, sigma, labels), PARITY["out"]),
                     (net(x, sigma, None), PARITY["out_class_labels_none"]),
                     (net(x, sigma, labels, augment_labels=PARITY["augment_labels"]),
                      PARITY["out_with_augment_labels"])]:
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"loaded EDMPrecond vs the official network's output: {err:.1e}")
        assert err <= 1e-5
assert type(net) is EDMPrecond and not net.training
assert not any(p.requires_grad for p in net.parameters())
assert loaded["loss_fn"].state["P_mean"] == -1.2  # records keep their settings
assert not marker.exists()  # ... and it never ran
machine = _SnapshotUnpickler(_read_regular_file(pkl), _ALLOWED_GLOBALS)
machine.load()
depth = max(machine.depth.values())
print(f"nesting depth {depth} (cap {_MAX_DEPTH}), {machine.items:,} container entries "
      f"(cap {_MAX_ITEMS:,})")
assert 4 * depth < _MAX_DEPTH and 1000 * machine.items < _MAX_ITEMS  # far below caps
print("loss_fn:", loaded["loss_fn"], loaded["loss_fn"].state)
