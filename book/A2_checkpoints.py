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
PARITY = torch.load(Path("data") / "precond_edm.pt", weights_only=True)

# %% [markdown]
# ## A2.1 Loading the official checkpoints — safely
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
# in PyTorch's legacy serialisation format. So we unpickle with **our own unpickler** (below): the
# one place where a pickle can name a callable answers only for that short list (plus
# `collections.OrderedDict`, `set`, `ModuleDict`, `EasyDict`, NumPy scalars, which a module's
# `__dict__` and the snapshot dict hold) and maps each name to *our own* function that turns the
# data into a plain record. Everything else raises `CheckpointError` before anything runs. The
# network is then rebuilt from the recorded `_init_kwargs` with **our** classes — after checking
# that the file holds every weight of it — and its tensors are copied in with a strict
# `state_dict` check. §A2.4 lists what a hostile file can and cannot do, and the test for each.

# %% tags=["export:checkpoints"]
import collections
import contextlib
import hashlib
import http.client
import inspect
import io
import json
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import sys
import types
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch

from edm_lit import networks, precond
from edm_lit.files import check_writable, write_atomic


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: refused, corrupt, incompatible with our networks, or unreachable. Appendix A2."""


# classes an official pickle may contain, by the name it records; networks are rebuilt with our classes
NETWORK_CLASSES = {
    "EDMPrecond": precond.EDMPrecond, "VPPrecond": precond.VPPrecond, "VEPrecond": precond.VEPrecond,
    "iDDPMPrecond": precond.iDDPMPrecond, "SongUNet": networks.SongUNet, "DhariwalUNet": networks.DhariwalUNet,
}
INNER_NETWORKS = ("SongUNet", "DhariwalUNet")  # the only values a file's `model_type` may take
SUBMODULE_CLASSES = {"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding"}
RECORD_CLASSES = {"AugmentPipe", "EDMLoss", "VPLoss", "VELoss"}  # kept as plain records of their settings
PERSISTENCE_VERSION = 6

# What a file may ask of us. Each limit is far above what the released snapshots need.
MAX_FILE_BYTES = 8 << 30    # a checkpoint file (the largest released snapshot is about 1.2 GB)
MAX_CONFIG_BYTES = 1 << 20  # our .json config
MAX_DEPTH = 100             # nesting of containers in a pickle (an official snapshot needs about 30)
MAX_ITEMS = 1 << 24         # entries of all containers of a pickle together
MAX_LIST = 16               # entries of a list-valued constructor argument (channel_mult, attn_resolutions, ...)
MAX_INT_KWARG = 1 << 16     # any integer constructor argument (channels, resolution, label_dim, ...)
KWARG_CAPS = {"num_blocks": 64, "M": 10_000}  # arguments that set a number of modules or the size of a CPU table

# %% [markdown]
# **Reading a file.** Every file goes through one function. It opens without blocking (a FIFO
# named `x.pkl` would otherwise wait forever for a writer), accepts only a regular file (not a
# directory, a FIFO or `/dev/zero` behind a symlink), and reads at most a fixed number of bytes.

# %% tags=["export:checkpoints"]
def read_regular_file(path, max_bytes: int = MAX_FILE_BYTES) -> bytearray:
    """The bytes of a regular file of at most max_bytes; FIFOs, devices and directories are refused without blocking. Appendix A2."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint: {path}") from None
    except (OSError, ValueError, TypeError) as e:  # permissions, a NUL in the name, ...
        raise CheckpointError(f"cannot open {path}: {getattr(e, 'strerror', None) or e}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path} is not a regular file (a directory, FIFO or device): refused")
        if info.st_size > max_bytes:
            raise CheckpointError(f"{path} has {info.st_size:,} bytes, more than the limit of {max_bytes:,}")
        data = bytearray(info.st_size)  # writable: tensors made over it may be modified without harm
        done = 0
        while done < len(data) and (n := f.readinto(memoryview(data)[done:])):
            done += n
        if done < len(data) or f.read(1):
            raise CheckpointError(f"{path} changed size while being read")
    return data

# %% [markdown]
# **The unpickler.** Python's own unpickler runs whatever the file names; overriding its
# `find_class` hook narrows *which* callables, but the machine still lets the file `BUILD`
# attributes onto any object, hash arbitrarily deep tuples and create a container of any nesting.
# So we run our own small machine, in pure Python, that knows only the opcodes of the official
# snapshots (protocols 2 to 5 as `pickle.dump` writes them): literals, containers, the memo,
# `GLOBAL`, `REDUCE`, and `NEWOBJ`/`BUILD` for the two record types that need them. Any other
# opcode ends the load.
# The rules it enforces are the security of this appendix:
#
# - a callable comes only from `GLOBAL`/`STACK_GLOBAL`, which (in `SnapshotUnpickler._global`)
#   answer from a fixed table of *our* functions, `_ALLOWED_GLOBALS`; `REDUCE` calls only those;
# - `NEWOBJ` creates only our `ModuleDict` and `EasyDict` records, `BUILD` sets state only on
#   `ModuleDict` records (a plain dict) and NumPy dtypes (a tuple): no attribute of any other
#   object can be set from the file;
# - dict keys and set members are plain scalars (str, int, float, bool, None), so hashing is cheap,
#   and error messages never print a container from the file: with the memo, a 1 kB file can
#   describe a tuple with 2⁹⁰ leaves, which hashing, comparing or printing would never finish;
# - nesting depth (`MAX_DEPTH`), the total number of container entries (`MAX_ITEMS`) and every
#   declared length (checked against the bytes that are left) are bounded, so the time is linear
#   in the file's size.

# %% tags=["export:checkpoints"]
_SCALARS = (str, int, float, bool, type(None))


def _brief(value) -> str:
    """A short description of a value from a file, for an error message: never the repr of a container,
    whose size (with shared parts, as the memo allows) can be exponential in the file's."""
    if type(value) is str:
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    return repr(value) if type(value) in _SCALARS else f"a {type(value).__name__}"


class SnapshotUnpickler:
    """A pure-Python pickle machine for the opcodes of the official snapshots only; see Appendix A2 for its rules.

    `allowed` maps (module, name) to the object GLOBAL yields; `persistent_load` handles BINPERSID (or None).
    load() returns the value and sets `self.pos` to the byte after STOP.
    """

    NEWOBJ_TYPES = ()  # filled in below: the records NEWOBJ may create
    BUILD_TYPES = ()   # the records BUILD may give a state to

    def __init__(self, data, allowed: dict, persistent_load=None, pos: int = 0):
        self.data, self.pos, self.allowed, self.persistent_load = memoryview(data), pos, allowed, persistent_load
        self.stack, self.marks, self.memo = [], [], {}
        self.depth, self.keep, self.items = {}, [], 0  # container id -> nesting depth; keep holds them alive

    # -- reading the byte stream
    def _fail(self, why):
        return CheckpointError(f"malformed or refused pickle at byte {self.pos}: {why}")

    def _take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            raise self._fail(f"truncated: {n:,} bytes declared, {len(self.data) - self.pos:,} left")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def _uint(self, n):
        return int.from_bytes(self._take(n), "little")

    def _text(self, n):
        return str(self._take(n), "utf-8", "surrogatepass")

    def _line(self):
        end = bytes(self.data[self.pos:self.pos + 256]).find(b"\n")
        if end < 0:
            raise self._fail("GLOBAL name without an end of line")
        return self._take(end + 1)[:-1].tobytes().decode("ascii")

    # -- the stack, nesting depth and sizes
    def _pop(self, n=1):
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) - n < floor:
            raise self._fail("stack underflow")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def _pop_mark(self):
        if not self.marks:
            raise self._fail("no MARK on the stack")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def _grow(self, container, children):
        """Record that `container` now holds `children`: depth and entry count stay within the limits."""
        self.items += len(children)
        depth = 1 + max((self.depth.get(id(c), 0) for c in children), default=0)
        if depth > MAX_DEPTH:
            raise self._fail(f"containers nested deeper than {MAX_DEPTH}")
        if self.items > MAX_ITEMS:
            raise self._fail(f"more than {MAX_ITEMS:,} container entries")
        if id(container) not in self.depth:
            self.keep.append(container)
        self.depth[id(container)] = max(depth, self.depth.get(id(container), 1))
        return container

    def _scalar_keys(self, keys):
        if not all(type(k) in _SCALARS for k in keys):
            raise self._fail("dict keys and set members must be str, int, float, bool or None")
        return keys

    def _target(self, kinds, what):
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) <= floor or not isinstance(self.stack[-1], kinds):
            found = type(self.stack[-1]).__name__ if len(self.stack) > floor else "nothing"
            allowed = ", ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
            raise self._fail(f"{what} on a {found}; only {allowed} may receive it")
        return self.stack[-1]

    # -- opcodes
    def op_PROTO(self):
        if self._uint(1) > 5:
            raise self._fail("pickle protocol newer than 5")

    def op_FRAME(self):
        if self._uint(8) > len(self.data) - self.pos:
            raise self._fail("truncated: a frame longer than the file")

    def op_MARK(self):
        self.marks.append(len(self.stack))

    def op_NONE(self):
        self.stack.append(None)

    def op_NEWTRUE(self):
        self.stack.append(True)

    def op_NEWFALSE(self):
        self.stack.append(False)

    def op_BININT(self):
        self.stack.append(int.from_bytes(self._take(4), "little", signed=True))

    def op_BININT1(self):
        self.stack.append(self._uint(1))

    def op_BININT2(self):
        self.stack.append(self._uint(2))

    def op_LONG1(self):
        n = self._uint(1)
        if n > 16:
            raise self._fail("integer longer than 16 bytes")
        self.stack.append(int.from_bytes(self._take(n), "little", signed=True))

    def op_BINFLOAT(self):
        self.stack.append(struct.unpack(">d", self._take(8))[0])

    def op_SHORT_BINUNICODE(self):
        self.stack.append(self._text(self._uint(1)))

    def op_BINUNICODE(self):
        self.stack.append(self._text(self._uint(4)))

    def op_BINUNICODE8(self):
        self.stack.append(self._text(self._uint(8)))

    def op_SHORT_BINBYTES(self):
        self.stack.append(self._take(self._uint(1)))  # a view of the file's bytes, not a copy

    def op_BINBYTES(self):
        self.stack.append(self._take(self._uint(4)))

    def op_BINBYTES8(self):
        self.stack.append(self._take(self._uint(8)))

    def op_EMPTY_TUPLE(self):
        self.stack.append(())

    def _tuple(self, items):
        self.stack.append(self._grow(tuple(items), items))

    def op_TUPLE(self):
        self._tuple(self._pop_mark())

    def op_TUPLE1(self):
        self._tuple(self._pop(1))

    def op_TUPLE2(self):
        self._tuple(self._pop(2))

    def op_TUPLE3(self):
        self._tuple(self._pop(3))

    def op_EMPTY_LIST(self):
        self.stack.append(self._grow([], ()))

    def op_EMPTY_DICT(self):
        self.stack.append(self._grow({}, ()))

    def op_EMPTY_SET(self):
        self.stack.append(self._grow(set(), ()))

    def op_APPEND(self):
        (value,) = self._pop(1)
        self._grow(self._target(list, "APPEND"), [value]).append(value)

    def op_APPENDS(self):
        values = self._pop_mark()
        self._grow(self._target(list, "APPENDS"), values).extend(values)

    def _setitems(self, flat):
        if len(flat) % 2:
            raise self._fail("SETITEMS with an odd number of entries")
        keys, values = self._scalar_keys(flat[0::2]), flat[1::2]
        target = self._grow(self._target(dict, "SETITEM"), values)
        target.update(zip(keys, values))

    def op_SETITEM(self):
        self._setitems(self._pop(2))

    def op_SETITEMS(self):
        self._setitems(self._pop_mark())

    def op_ADDITEMS(self):
        items = self._scalar_keys(self._pop_mark())
        self._grow(self._target(set, "ADDITEMS"), items).update(items)

    def op_FROZENSET(self):
        items = self._scalar_keys(self._pop_mark())
        self.stack.append(self._grow(frozenset(items), items))

    def _memo_put(self, index):
        if not self.stack or len(self.memo) >= MAX_ITEMS:
            raise self._fail("nothing to memoize, or memo too large")
        self.memo[index] = self.stack[-1]

    def op_MEMOIZE(self):
        self._memo_put(len(self.memo))

    def op_BINPUT(self):
        self._memo_put(self._uint(1))

    def op_LONG_BINPUT(self):
        self._memo_put(self._uint(4))

    def _memo_get(self, index):
        if index not in self.memo:
            raise self._fail(f"memo entry {index} does not exist")
        self.stack.append(self.memo[index])

    def op_BINGET(self):
        self._memo_get(self._uint(1))

    def op_LONG_BINGET(self):
        self._memo_get(self._uint(4))

    def _global(self, module, name):
        if type(module) is not str or type(name) is not str:
            raise self._fail(f"a global named by {_brief(module)} and {_brief(name)}, not two strings")
        if (module, name) not in self.allowed:
            raise CheckpointError(f"refusing to load '{module[:100]}.{name[:100]}' from a checkpoint: not an allowed type")
        self.stack.append(self.allowed[(module, name)])

    def op_GLOBAL(self):
        self._global(self._line(), self._line())

    def op_STACK_GLOBAL(self):
        self._global(*self._pop(2))

    def op_REDUCE(self):
        func, args = self._pop(2)
        if not any(func is f for f in self.allowed.values()) or func in self.NEWOBJ_TYPES or type(args) is not tuple:
            raise self._fail("REDUCE of something that is not an allowed callable with a tuple of arguments")
        result = func(*args)
        self.stack.append(self._grow(result, args) if isinstance(result, (dict, set, PersistentObject)) else result)

    def op_NEWOBJ(self):
        cls, args = self._pop(2)
        if cls not in self.NEWOBJ_TYPES or args != ():
            raise self._fail(f"NEWOBJ of {getattr(cls, '__name__', type(cls).__name__)}: only our records may be created")
        self.stack.append(self._grow(cls(), ()))

    def op_BUILD(self):
        (state,) = self._pop(1)
        target = self._target(self.BUILD_TYPES, "BUILD")
        self._grow(target, [state])
        target.__setstate__(state)  # our records check the state's type; nothing else can receive a state

    def op_BINPERSID(self):
        (pid,) = self._pop(1)
        if self.persistent_load is None:
            raise CheckpointError("refusing a pickle with persistent ids: not the official snapshot format")
        self.stack.append(self.persistent_load(pid))

    def op_STOP(self):
        return True

    OPS = {}  # opcode byte -> method, filled in from the op_* names below

    def load(self):
        while True:
            code = self._take(1)[0]
            op = self.OPS.get(code)
            if op is None:
                name = pickletools.code2op.get(chr(code))
                raise self._fail(f"opcode {name.name if name else hex(code)} is not allowed")
            if op(self):
                break
        if len(self.stack) != 1 or self.marks:
            raise self._fail("the pickle does not end with exactly one value")
        return self.stack.pop()


SnapshotUnpickler.OPS = {ord(op.code): getattr(SnapshotUnpickler, "op_" + op.name)
                         for op in pickletools.opcodes if hasattr(SnapshotUnpickler, "op_" + op.name)}

# %% [markdown]
# **The records, and the handful of functions the unpickler may hand out.** Each checks the types
# of its arguments — they come from the file — and none of them imports, executes or opens anything.
#
# A tensor storage arrives as bytes in PyTorch's legacy serialisation format (what
# `torch.storage._load_from_bytes` reads): five small pickles — a magic number, the protocol
# version 1001, a dict of system facts, the storage's description `('storage', torch.FloatStorage,
# key, location, numel)` as a persistent id, the list of keys — followed by the element count as
# an 8-byte integer and the raw elements. We parse it with the same machine (its only globals are
# the storage types) and demand that the declared count and the bytes that follow agree exactly;
# the elements are then a tensor *over the file's own bytes*, which cannot grow. A storage in
# PyTorch's newer zip format (which may be deflate-compressed) is not what the official code
# writes, so it is refused before anything is decompressed.
#
# A tensor is `_rebuild_tensor_v2(storage, offset, size, stride, ...)`. We check that every element
# it addresses lies inside its storage, that its elements do not overlap, and that all tensors on
# one storage together use no more elements than it has; only then is it made, with `as_strided`
# over the storage. So a file can never show us memory it does not contain, and the tensors it
# describes never total more elements than the bytes it holds.

# %% tags=["export:checkpoints"]
class PersistentObject:
    """A persistent object of an official pickle, as data: its class name and saved state; its code is never run. Appendix A2."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __repr__(self):
        return f"PersistentObject({self.class_name!r})"


class _ModuleDictRecord:
    """Stands in for torch.nn.ModuleDict inside a pickle (built with NEWOBJ, then BUILD with its __dict__)."""

    class_name = "ModuleDict"

    def __init__(self):
        self.state = {}

    def __setstate__(self, state):
        if type(state) is not dict:
            raise CheckpointError("malformed ModuleDict state in the pickle: not a plain dict")
        self.state = state


class _EasyDict(dict):
    """Stands in for dnnlib.util.EasyDict (a dict subclass) in a pickle."""


class _NumpyDType:
    """Stands in for numpy.dtype in a pickle: only the plain numeric scalar types."""

    CODES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}

    def __init__(self, code, align=False, copy=True):
        if type(code) is not str or code not in self.CODES:
            raise CheckpointError(f"refusing NumPy dtype {_brief(code)} from a checkpoint: not a plain numeric scalar type")
        self.code, self.order = code, "="

    def __setstate__(self, state):
        if type(state) is not tuple or len(state) < 2 or state[1] not in ("<", ">", "=", "|"):
            raise CheckpointError("malformed NumPy dtype state in the pickle")
        self.order = state[1] if state[1] != "|" else "="


SnapshotUnpickler.NEWOBJ_TYPES = (_ModuleDictRecord, _EasyDict)
SnapshotUnpickler.BUILD_TYPES = (_ModuleDictRecord, _NumpyDType)


def _reconstruct_persistent_obj(meta):
    if type(meta) is not dict or type(meta.get("class_name")) is not str or not isinstance(meta.get("state"), dict):
        raise CheckpointError("malformed persistent object in the pickle (expected meta with class_name and state)")
    name = meta["class_name"]
    if meta.get("type") != "class" or meta.get("version") != PERSISTENCE_VERSION:
        raise CheckpointError(f"unsupported persistence record for {_brief(name)}: type {_brief(meta.get('type'))}, "
                              f"version {_brief(meta.get('version'))} (expected 'class', {PERSISTENCE_VERSION})")
    if name not in NETWORK_CLASSES.keys() | SUBMODULE_CLASSES | RECORD_CLASSES:
        raise CheckpointError(f"refusing to load persistent class {_brief(name)} from a checkpoint: not an allowed class")
    return PersistentObject(name, meta["state"])  # meta['module_src'] is deliberately never looked at


_STORAGE_TYPES = {("torch", f"{name}Storage"): dtype for name, dtype in [
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8)]}
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


class _Storage:
    """The elements of one storage: a 1-D tensor over the file's bytes, and how many of them tensors use."""

    def __init__(self, flat: torch.Tensor):
        self.flat, self.used = flat, 0


def _storage_id(pid):
    ok = (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
          and type(pid[2]) is str and type(pid[3]) is str and type(pid[4]) is int and pid[4] >= 0
          and (len(pid) == 5 or pid[5] is None))
    if not ok:
        raise CheckpointError("malformed storage description in a tensor storage of the pickle")
    return pid


def _load_storage(blob):
    """torch.storage._load_from_bytes, for the legacy format only: header pickles, count, raw elements."""
    if not isinstance(blob, memoryview):
        raise CheckpointError("malformed tensor storage in the pickle")
    if blob[:2] == b"PK":
        raise CheckpointError("refusing a tensor storage in zip format: the official snapshots use the legacy format")
    pos, parts = 0, []
    for allowed, persistent in [({}, None)] * 3 + [(_STORAGE_TYPES, _storage_id), ({}, None)]:
        machine = SnapshotUnpickler(blob, allowed, persistent, pos)
        parts.append(machine.load())
        pos = machine.pos
    magic, protocol, sys_info, pid, keys = parts
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL or type(sys_info) is not dict:
        raise CheckpointError("a tensor storage in the pickle is not in PyTorch's legacy format")
    if sys_info.get("little_endian") is not True:
        raise CheckpointError("refusing a big-endian tensor storage")
    if type(pid) is not tuple or keys != [pid[2]]:
        raise CheckpointError("a tensor storage in the pickle must hold exactly one storage")
    dtype, numel = pid[1], pid[4]
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = int.from_bytes(blob[pos:pos + 8], "little", signed=True)
    if count != numel or len(blob) - pos - 8 != numel * itemsize:
        raise CheckpointError(f"a tensor storage declares {numel:,} elements of {itemsize} bytes but holds "
                              f"{max(len(blob) - pos - 8, 0):,} bytes")
    flat = torch.frombuffer(blob[pos + 8:], dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    return _Storage(flat)  # a view of the file's bytes: it cannot grow past them


def _is_ints(value):
    return type(value) in (tuple, list) and len(value) <= 8 and all(type(v) is int for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or not _is_ints(size) \
            or not _is_ints(stride) or len(size) != len(stride):
        raise CheckpointError("malformed tensor in the pickle")
    if not all(0 <= v < 1 << 62 for v in (storage_offset, *size, *stride)):
        raise CheckpointError("malformed tensor in the pickle: a negative or absurd size, stride or offset")
    have, numel = storage.flat.numel(), math.prod(size)
    dims = sorted((s, n) for n, s in zip(size, stride) if n > 1)
    reach = 0  # the furthest element the dimensions seen so far address, relative to the offset
    for s, n in dims:
        if s <= reach:
            raise CheckpointError(f"a tensor in the pickle (size {tuple(size)}, stride {tuple(stride)}) "
                                  "addresses some elements twice: refused")
        reach += (n - 1) * s
    if storage_offset > have or (numel and storage_offset + reach >= have):
        raise CheckpointError(f"a tensor in the pickle (size {tuple(size)}, stride {tuple(stride)}, offset "
                              f"{storage_offset}) reaches past the end of its storage of {have:,} elements: refused")
    storage.used += numel
    if storage.used > have:
        raise CheckpointError("tensors in the pickle share storage elements: refused")
    return torch.as_strided(storage.flat, tuple(size), tuple(stride), storage_offset)


def _scalar_set(items=()):
    """builtins.set in a pickle (protocol 2 writes set([...])): members must be scalars, so hashing is cheap."""
    if type(items) not in (list, tuple) or not all(type(k) in _SCALARS for k in items):
        raise CheckpointError("malformed set in the pickle: members must be str, int, float, bool or None")
    return set(items)


def _scalar_frozenset(items=()):
    return frozenset(_scalar_set(items))


def _ordered_dict(*items):
    """collections.OrderedDict() in a pickle: created empty; its items come with SETITEMS (scalar keys)."""
    if items:
        raise CheckpointError("malformed OrderedDict in the pickle: its items must come with SETITEMS")
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


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictRecord,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _scalar_set,
    ("builtins", "frozenset"): _scalar_frozenset,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


def read_official_pickle(path):
    """Unpickle an official .pkl with SnapshotUnpickler: dicts, tensors and PersistentObject records. Appendix A2."""
    data = read_regular_file(path)
    try:
        machine = SnapshotUnpickler(data, _ALLOWED_GLOBALS)
        value = machine.load()
        if machine.pos != len(data):
            raise CheckpointError(f"{len(data) - machine.pos:,} bytes after the end of the pickle")
        return value
    except CheckpointError as e:
        raise CheckpointError(f"{path} is not a readable official snapshot: {e}") from None
    except (RecursionError, MemoryError, ValueError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable official snapshot: {type(e).__name__}: {e}") from None

# %% [markdown]
# **From records to a network — sizes first.** The record of the top-level network carries its
# constructor's keyword arguments, and a tiny file can ask for a huge network (say
# `model_channels=10**6`). So nothing is allocated until the file has shown that it holds every
# weight of the network it asks for:
#
# 1. the arguments are checked: only names our constructors take, plain values (numbers, strings,
#    short lists), integers below `MAX_INT_KWARG`, `num_blocks` and iDDPM's `M` below their caps,
#    and `model_type` one of the two network *names* (a callable from a file is refused);
# 2. the network is built on PyTorch's `meta` device — shapes without memory — and its
#    `state_dict()` shapes are compared with the tensors in the file (missing, unexpected and
#    mis-shaped names are reported), walking the file's module tree along *our* network's tree,
#    so a file's cycles or extra children cannot make the walk longer than our network; a tensor
#    object may fill **one** entry only — the memo would let one tensor (or one module record,
#    tensors and all) fill any number of them, and the official snapshots never do: every parameter
#    and buffer of the official networks is a tensor of its own;
# 3. only then is memory allocated for the network (`to_empty`, no random initialisation to waste
#    time on) and the weights copied in with a strict `load_state_dict`, which overwrites every tensor.
#
# Since the tensors of a file never total more elements than the bytes it holds (above), and each
# fills one entry of the network, the network we allocate never has more weights than the file has
# bytes.

# %% tags=["export:checkpoints"]
_INTERFACE_KWARGS = ("img_resolution", "in_channels", "out_channels", "label_dim")  # set by the preconditioner


def _parameters(cls) -> dict:
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _check_value(name, value, source):
    items = value if type(value) in (list, tuple) else [value]
    if len(items) > MAX_LIST or not all(type(v) in _SCALARS for v in items):
        raise CheckpointError(f"{source}: constructor argument {name}={_brief(value)} is not a number, string or "
                              f"short list of them")
    cap = KWARG_CAPS.get(name, MAX_INT_KWARG)
    for v in items:
        if (type(v) is int and abs(v) > cap) or (type(v) is str and len(v) > 64):
            raise CheckpointError(f"{source}: constructor argument {name}={_brief(v)} is beyond the limit ({cap:,}) "
                                  "this loader accepts")


def check_init_kwargs(class_name: str, kwargs, source="the checkpoint") -> dict:
    """The constructor arguments a file gives for network `class_name`, checked against our class and the limits. Appendix A2."""
    cls = NETWORK_CLASSES.get(class_name) if type(class_name) is str else None
    if cls is None:
        raise CheckpointError(f"{source}: unknown network class {_brief(class_name)}, expected one of {sorted(NETWORK_CLASSES)}")
    if type(kwargs) not in (dict, collections.OrderedDict, _EasyDict) or not all(type(k) is str for k in kwargs):
        raise CheckpointError(f"{source}: the {class_name} record has no keyword constructor arguments")
    allowed = _parameters(cls)
    if issubclass(cls, precond.Precond):
        model_type = kwargs.get("model_type", allowed["model_type"].default)
        if type(model_type) is not str or model_type not in INNER_NETWORKS:
            raise CheckpointError(f"{source}: model_type must be one of {INNER_NETWORKS} (a name), got {_brief(model_type)}")
        allowed = {k for k in allowed if k != "model_type"} | \
            {k for k in _parameters(NETWORK_CLASSES[model_type]) if k not in _INTERFACE_KWARGS}
    unknown = sorted(k for k in kwargs if k not in allowed and k != "model_type")
    if unknown:
        raise CheckpointError(f"{source}: {class_name} takes no constructor arguments {unknown[:5]}")
    for name, value in kwargs.items():
        if name != "model_type":
            _check_value(name, value, source)
    return dict(kwargs)


def _on_meta(cls):
    def build(**kwargs):
        with torch.device("meta"):
            return cls(**kwargs)
    return build


def build_meta_network(class_name: str, kwargs: dict, source="the checkpoint") -> torch.nn.Module:
    """The network with checked `kwargs`, its parameters on the meta device (shapes, no memory). Appendix A2."""
    cls = NETWORK_CLASSES[class_name]
    try:
        if issubclass(cls, precond.Precond):  # the preconditioner's own small tables on the CPU, the network on meta
            return cls(**dict(kwargs, model_type=_on_meta(NETWORK_CLASSES[kwargs.get("model_type",
                                                          _parameters(cls)["model_type"].default)])))
        return _on_meta(cls)(**kwargs)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, OverflowError) as e:
        raise CheckpointError(f"{source}: cannot build {class_name}(**{kwargs}): {e}") from None


def check_shapes(expected: dict, found: dict, source) -> None:
    """Same names and shapes in the network (expected) and the file (found), else a CheckpointError naming them. Appendix A2."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k} (checkpoint {tuple(found[k])}, network {tuple(v)})"
                 for k, v in expected.items() if k in found and tuple(found[k]) != tuple(v)]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                for what, keys in [("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", misshaped)] if keys]
    if problems:
        raise CheckpointError(f"{source} does not fit the network: " + "; ".join(problems))


def _collect(record, module, prefix, out, owner=None):
    """Tensors of a record tree into out[dotted name], walking along our module tree (so cycles end); one tensor
    object in two entries (the memo allows it) is refused, so the entries never total more than the file's bytes."""
    owner = {} if owner is None else owner  # id of each tensor taken -> the entry it fills (all stay alive)
    state = record.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        tensors = state.get(group) or {}
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{prefix + group} in the pickle is not a dict")
        for name, tensor in tensors.items():
            if tensor is not None and name not in skip:
                entry = prefix + str(name)
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"{entry} in the pickle is not a tensor")
                if id(tensor) in owner:
                    raise CheckpointError(f"{entry} in the pickle is the same tensor as {owner[id(tensor)]}: "
                                          "one tensor filling several weights is refused")
                owner[id(tensor)] = entry
                out[entry] = tensor
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
            raise CheckpointError(f"wrong architecture at {where!r}: the checkpoint has {child.class_name}, "
                                  f"our network {type(ours).__name__ if ours is not None else 'nothing'}")
        _collect(child, ours, where + ".", out, owner)
    return out


def materialize(meta: torch.nn.Module, state: dict, class_name: str, kwargs: dict) -> torch.nn.Module:
    """The real network holding `state`: memory for the meta network, filled by a strict load (no random init). Appendix A2."""
    names = set(meta.state_dict())
    left_on_meta = [k for m in meta.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor) and v.is_meta]
    if left_on_meta or any(name not in names for name, _ in meta.named_buffers()):
        net = NETWORK_CLASSES[class_name](**kwargs)  # a tensor the state does not cover: build it the usual way
    else:
        net = meta.to_empty(device="cpu")  # every tensor is overwritten by the strict load below
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def build_network(record: PersistentObject, source="the checkpoint") -> torch.nn.Module:
    """Our network (EDMPrecond, SongUNet, ...) with the weights of an official record, in eval mode. Appendix A2."""
    if not isinstance(record, PersistentObject) or record.class_name not in NETWORK_CLASSES:
        found = record.class_name if isinstance(record, PersistentObject) else type(record).__name__
        raise CheckpointError(f"{source} holds {found}, not one of the networks {sorted(NETWORK_CLASSES)}")
    if record.state.get("_init_args"):
        raise CheckpointError(f"{source}: the {record.class_name} record has positional constructor arguments")
    kwargs = check_init_kwargs(record.class_name, record.state.get("_init_kwargs"), source)
    meta = build_meta_network(record.class_name, kwargs, source)
    try:
        state = _collect(record, meta, "", {})
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    check_shapes({k: v.shape for k, v in meta.state_dict().items()}, {k: v.shape for k, v in state.items()}, source)
    return materialize(meta, state, record.class_name, kwargs)


def load_official_snapshot(path) -> dict:
    """All entries of an official snapshot .pkl: networks built with our classes, other records as PersistentObject. Appendix A2."""
    data = read_official_pickle(path)
    if isinstance(data, PersistentObject):
        return {"ema": build_network(data, str(path))}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a snapshot dict with an 'ema' network, got {type(data).__name__}")
    return {k: build_network(v, f"{path} [{k!r}]") if isinstance(v, PersistentObject) and v.class_name in NETWORK_CLASSES
            else v for k, v in data.items()}

# %% [markdown]
# ## A2.2 Our own format
#
# For our own checkpoints we use a format that is data only: the weights in a
# [safetensors](https://huggingface.co/docs/safetensors) file (a JSON header of names, dtypes and
# shapes followed by raw bytes; nothing to execute) and, beside it, a small JSON file with the
# network's class name, its constructor arguments, a format version, the weights file's name and
# its SHA-256. `save_network(net, "out/cifar")` writes `out/cifar.json` and
# `out/cifar-<first 16 hex digits of the SHA-256>.safetensors`.
#
# Naming the weights by their hash makes the pair atomic: the weights are written under a
# temporary name, flushed to disk (`fsync`) and renamed to their final, content-derived name; only
# then is the `.json` written the same way and renamed over the old one, and the directory is
# flushed after each rename. The `.json` is the commit point: whenever the program stops, the
# `.json` under the final name names weights that are complete on disk — the old pair or the new
# one, never a mix. Afterwards the weights the old `.json` named are removed. Files are created
# with mode `0o666` minus the umask, as any other file the user writes.
#
# Reading our format trusts the `.json` no more than a pickle: `weights` must be a bare file name
# ending in `.safetensors` (no directory part, no leading dot), so it can only name a file beside
# the `.json` — the same error for `"../x"` whether or not `../x` exists; the SHA-256 must match;
# the constructor arguments pass the same checks and the same meta-device comparison with the
# shapes in the safetensors header before the network is allocated.
# Non-finite floats (EDM's default `sigma_max=inf`) are stored as `{"float": "inf"}`, since
# JSON has no infinity.
#
# A preconditioner records no constructor arguments of its own, so `network_config` reads them
# back: every argument of its class's constructor is also an attribute of the same name, and
# the inner network (ours) keeps its `init_kwargs`.

# %% tags=["export:checkpoints"]
FORMAT_NAME = "edm_lit.network"
FORMAT_VERSION = 1
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
    raise ValueError(f"{where} = {value!r} cannot be stored in a checkpoint's JSON config")


def _from_json(value, depth=0):
    """Inverse of _to_json for constructor arguments: scalars, {"float": "inf"}, and lists of them."""
    if isinstance(value, dict) and set(value) == {"float"} and type(value["float"]) is str:
        try:
            return float(value["float"])
        except ValueError:
            raise CheckpointError(f"{value['float']!r:.40} is not a float") from None
    if isinstance(value, list) and depth == 0:
        return [_from_json(v, 1) for v in value]
    if type(value) not in _SCALARS:
        raise CheckpointError(f"constructor argument {_brief(value)} is not a number, string or short list of them")
    return value


def network_config(net) -> dict:
    """{'class_name', 'init_kwargs'} that rebuild `net` (an EDMPrecond/VP/VE/iDDPM or SongUNet/DhariwalUNet). Appendix A2."""
    cls = type(net)
    if NETWORK_CLASSES.get(cls.__name__) is not cls:
        raise ValueError(f"net must be one of {sorted(NETWORK_CLASSES)} of edm_lit, got {cls.__module__}.{cls.__name__}")
    if isinstance(net, precond.Precond):
        kwargs = {k: getattr(net, k) for k, p in _parameters(cls).items()
                  if p.kind is p.POSITIONAL_OR_KEYWORD and k != "model_type" and hasattr(net, k)}
        inner = network_config(net.model)
        kwargs["model_type"] = inner["class_name"]
        kwargs.update({k: v for k, v in inner["init_kwargs"].items() if k not in _INTERFACE_KWARGS})
    else:
        kwargs = dict(net.init_kwargs)
    return {"class_name": cls.__name__, "init_kwargs": kwargs}


def _config_path(path) -> Path:
    """The .json of a pair, from the name given with either suffix or none (a weights name may carry its hash)."""
    path = Path(path)
    if path.suffix == ".json":
        return path
    if path.suffix == ".safetensors":
        hashed = _HASHED_WEIGHTS.fullmatch(path.name)
        return path.with_name((hashed.group(1) if hashed else path.stem) + ".json")
    return path.with_name(path.name + ".json")


def _weights_name(header: dict, config_path) -> str:
    """The weights file a config names: a bare name ending in .safetensors, else one and the same error."""
    name = header.get("weights")
    if type(name) is not str or not name.endswith(".safetensors") or name.startswith(".") or len(name) > 255 \
            or any(c in name for c in "/\\\0:") or Path(name).name != name:
        raise CheckpointError(f"{config_path}: 'weights' must be the bare name of a .safetensors file beside the "
                              f"config, got {_brief(name)}")
    return name


def _read_config(config_path) -> dict:
    """Our .json config: a regular file of at most MAX_CONFIG_BYTES, UTF-8 JSON, our format and version."""
    data = read_regular_file(config_path, MAX_CONFIG_BYTES)
    try:
        header = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON (truncated?): {type(e).__name__}: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path} is not an edm_lit network config (no format {FORMAT_NAME!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version {_brief(header.get('format_version'))}; "
                              f"this edm_lit reads version {FORMAT_VERSION}")
    if type(header.get("weights_sha256")) is not str or not re.fullmatch(r"[0-9a-f]{64}", header["weights_sha256"]):
        raise CheckpointError(f"{config_path}: 'weights_sha256' must be 64 lowercase hex digits")
    if type(header.get("init_kwargs", {})) is not dict:
        raise CheckpointError(f"{config_path}: 'init_kwargs' must be an object")
    return header


def _safetensors_shapes(data: bytes, source) -> dict:
    """Names and shapes from a safetensors header, with the file's length checked against the declared data."""
    n = int.from_bytes(data[:8], "little")
    try:
        if len(data) < 8 or n > min(len(data) - 8, 100 << 20):
            raise ValueError("header length past the end of the file")
        header = json.loads(data[8:8 + n].decode("utf-8"))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes = {k: tuple(v["shape"]) for k, v in entries.items()}
        end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{source} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    if end != len(data) - 8 - n or not all(_is_ints(s) for s in shapes.values()):
        raise CheckpointError(f"{source} is not a complete safetensors file (truncated?)")
    return shapes


def save_network(net, path) -> tuple:
    """Write `net` as PATH.json + PATH-<hash>.safetensors, atomically as a pair; returns both paths. Appendix A2."""
    from safetensors.torch import save

    config_path = _config_path(path)
    config = network_config(net)
    blob = save({k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()},
                metadata={"format": FORMAT_NAME})
    digest = hashlib.sha256(blob).hexdigest()
    weights_path = config_path.with_name(f"{config_path.stem}-{digest[:16]}.safetensors")
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "class_name": config["class_name"],
              "init_kwargs": _to_json(config["init_kwargs"]), "weights": weights_path.name, "weights_sha256": digest}
    config_path.parent.mkdir(parents=True, exist_ok=True)
    try:  # the weights the current config names, if it is ours: removed once the new pair is in place
        old = _weights_name(_read_config(config_path), config_path)
    except CheckpointError:
        old = None
    write_atomic(weights_path, blob)
    write_atomic(config_path, (json.dumps(header, indent=2) + "\n").encode())
    if old not in (None, weights_path.name) and _config_path(config_path.parent / old) == config_path:
        (config_path.parent / old).unlink(missing_ok=True)
    return config_path, weights_path


def _load_ours(path, weights_path=None) -> torch.nn.Module:
    from safetensors.torch import load

    config_path = _config_path(path)
    header = _read_config(config_path)
    name = header.get("class_name")
    weights_path = weights_path or config_path.parent / _weights_name(header, config_path)
    try:
        kwargs = {k: _from_json(v) for k, v in header.get("init_kwargs", {}).items()}
    except CheckpointError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    kwargs = check_init_kwargs(name, kwargs, str(config_path))
    data = read_regular_file(weights_path)
    if hashlib.sha256(data).hexdigest() != header["weights_sha256"]:
        raise CheckpointError(f"{weights_path} does not match the SHA-256 recorded in {config_path} "
                              "(truncated, corrupt or replaced)")
    meta = build_meta_network(name, kwargs, str(config_path))
    check_shapes({k: v.shape for k, v in meta.state_dict().items()}, _safetensors_shapes(data, weights_path),
                 str(weights_path))
    try:
        state = load(bytes(data))
    except Exception as e:  # the library's own validation of the file
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from None
    return materialize(meta, state, name, kwargs)

# %% [markdown]
# ## A2.3 URLs, one entry point, and conversion
#
# `load_network` takes a path or an `http(s)` URL. A URL is downloaded once into a cache
# directory (`$EDM_LIT_CACHE`, else `~/.cache/edm_lit`) under a name derived from the URL. The
# download goes to a `.part` file and resumes where it stopped — an HTTP `Range` request, whose
# `206` answer must start where the part file ends — when a connection drops (three attempts per
# call; the next call continues). It is renamed into the cache only when it is complete: when the
# server sent a `Content-Length`, the byte count must match (a malformed header is an error, not a
# crash); when it did not, the connection must have closed cleanly *and* the file must parse as
# what its name says (`.pkl`, `.json` or `.safetensors`) — otherwise the partial file is deleted,
# since without a length there is nothing to resume against. Several processes may ask for the
# same URL at once — every rank of a `torchrun` job calls `load_network(url)` — so a download
# holds an exclusive lock on `<name>.lock` beside it in the cache (`flock`, released by the
# operating system even if the process dies): one process downloads, the others wait for the lock,
# then find the complete file in the cache and download nothing. The lock needs no collective
# call, so it works whether all ranks load or only some. The `.json` of our format names its
# weights by a bare file name, which is fetched from beside the `.json`'s URL. Without network
# access you get an error that names the URL and where to put a manually downloaded copy. The
# format is recognised by the name: `.pkl` is an official snapshot (its `ema` network is
# returned), `.json`/`.safetensors` or a bare name is ours. Whatever goes wrong inside,
# `load_network` raises `CheckpointError` with a message that names the file.

# %% tags=["export:checkpoints"]
DOWNLOAD_ATTEMPTS = 3


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept: $EDM_LIT_CACHE, else ~/.cache/edm_lit. Appendix A2."""
    return Path(os.environ.get("EDM_LIT_CACHE") or Path.home() / ".cache" / "edm_lit")


def is_url(path_or_url) -> bool:
    return isinstance(path_or_url, str) and urllib.parse.urlparse(path_or_url).scheme in ("http", "https")


def _content_length(response, url):
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    if not re.fullmatch(r"\s*[0-9]{1,19}\s*", value):
        raise CheckpointError(f"could not download {url}: the server sent an invalid Content-Length {value!r:.40}")
    return int(value)


def _fetch_into(url: str, part: Path, timeout: float):
    """Append the rest of `url` to `part` (a Range request when part has bytes); returns the expected size or None."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part file is already complete
            return have
        raise
    with response:
        if have and response.status == 206 and not (response.headers.get("Content-Range") or "").startswith(
                f"bytes {have}-"):  # a part of the file, but not the one that continues ours: start again
            part.unlink()
            raise http.client.HTTPException(f"the server answered the range request for bytes {have}- with "
                                            f"{response.headers.get('Content-Range')!r:.60}")
        if have and response.status != 206:
            have = 0  # the server ignored the range and sends the whole file: start again
        length = _content_length(response, url)
        expected = None if length is None else have + length
        if (expected or 0) > MAX_FILE_BYTES:
            raise CheckpointError(f"could not download {url}: {expected:,} bytes is more than the limit")
        with open(part, "ab" if have else "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):  # a chunked body cut short raises here
                f.write(block)
                if f.tell() > MAX_FILE_BYTES:
                    raise CheckpointError(f"could not download {url}: more than {MAX_FILE_BYTES:,} bytes")
    if expected is not None and part.stat().st_size != expected:
        raise http.client.IncompleteRead(b"", expected - part.stat().st_size)
    return expected


def _verify_complete(part: Path, name: str, url: str) -> None:
    """Without a Content-Length, a download counts as complete only if it parses as what its name says."""
    suffix = Path(name).suffix
    try:
        if suffix == ".pkl":
            read_official_pickle(part)
        elif suffix == ".json":
            _read_config(part)
        elif suffix == ".safetensors":
            _safetensors_shapes(read_regular_file(part), part)
        else:
            raise CheckpointError("a file of unknown type cannot be checked")
    except CheckpointError as e:
        part.unlink(missing_ok=True)
        raise CheckpointError(f"could not download {url}: the server sent no Content-Length and the file it sent "
                              f"is incomplete or corrupt ({e}); nothing was cached") from None


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Hold an exclusive flock on the file `lock` (created, and removed on release) against other processes."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent downloads of one URL are then not coordinated
        yield
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us removes the file on release: locking a removed file locks nothing
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # still holding the lock, so a waiter sees the file gone and tries again
        os.close(fd)


def download(url: str, cache=None, timeout: float = 60.0) -> Path:
    """Download `url` into the cache (resumable, verified, atomic rename when complete; one process at a time per
    URL, the others wait and use the cached file) and return the local path. Appendix A2."""
    cache = Path(cache) if cache is not None else cache_dir()
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest.with_name(dest.name + ".lock")):
        if dest.is_file():  # another process completed it while we waited for the lock
            return dest
        return _download_locked(url, dest, name, timeout)


def _download_locked(url: str, dest: Path, name: str, timeout: float) -> Path:
    part = dest.with_name(dest.name + ".part")
    error = None
    for _ in range(DOWNLOAD_ATTEMPTS):
        try:
            if _fetch_into(url, part, timeout) is None:
                _verify_complete(part, name, url)
            os.replace(part, dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e
            if isinstance(e, urllib.error.HTTPError) and e.code < 500:
                break  # 404 and friends will not change by retrying
    raise CheckpointError(f"could not download {url}: {error}. If this machine is offline, download the file "
                          f"elsewhere and pass its local path (or save it as {dest}); a partial download is kept "
                          f"in {part} and resumes on the next attempt")


def _load_network(path_or_url, cache) -> torch.nn.Module:
    if is_url(path_or_url):
        path = download(path_or_url, cache)
        if path.suffix == ".json":  # our format: the weights, by their bare name, beside the config's URL
            name = _weights_name(_read_config(path), path_or_url)
            weights = download(urllib.parse.urljoin(path_or_url, urllib.parse.quote(name)), cache)
            return _load_ours(path, weights)
        if path.suffix != ".pkl":
            raise CheckpointError(f"cannot tell the format of {path_or_url}: a URL must end in .pkl or .json")
    elif isinstance(path_or_url, (str, os.PathLike)):
        path = Path(path_or_url)
    else:
        raise CheckpointError(f"path_or_url must be a path or an http(s) URL, got {type(path_or_url).__name__}")
    if path.is_dir():
        configs = sorted(path.glob("*.json"))
        if len(configs) != 1:
            raise CheckpointError(f"{path} is a directory with {len(configs)} .json configs; pass one of them")
        path = configs[0]
    if path.suffix == ".pkl":
        data = read_official_pickle(path)
        if isinstance(data, dict):
            if "ema" not in data:
                raise CheckpointError(f"{path}: the snapshot has no 'ema' network (keys: {sorted(map(str, data))[:10]})")
            return build_network(data["ema"], f"{path} ['ema']")
        return build_network(data, str(path))
    if path.suffix in (".json", ".safetensors", ""):
        return _load_ours(path)
    raise CheckpointError(f"cannot tell the format of {path}: expected an official .pkl, or our .json/.safetensors")


def load_network(path_or_url, cache=None) -> torch.nn.Module:
    """The ready network (eval mode, no grad) from an official .pkl (its 'ema'), our format, or a URL. Appendix A2."""
    try:
        return _load_network(path_or_url, cache)
    except CheckpointError:
        raise
    except Exception as e:  # whatever else a malformed file provokes is reported as what it is: a bad checkpoint
        raise CheckpointError(f"{path_or_url!s:.200}: cannot load this checkpoint ({type(e).__name__}: {e})") from None


def convert_destination(src, dst) -> Path:
    """Where `convert` writes: DST itself, or DST/<name of SRC> when DST is an existing directory. The folder
    must be writable; checked before anything is loaded (a download can be large). Appendix A2."""
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
    """Official snapshot (path or URL) -> our format at `dst` (.json + .safetensors); returns both paths. Appendix A2.

    `dst` names the pair (DST.json + DST-<hash>.safetensors), or is an existing directory to write it into."""
    dst = convert_destination(src, dst)
    return save_network(load_network(src), dst)

# %% [markdown]
# **Check — an official snapshot loads.** We cannot download the released files here, so we
# write one ourselves in exactly the official layout: the pickler below reduces each network
# object to `torch_utils.persistence._reconstruct_persistent_obj(meta)` as the official code
# does (a stand-in `torch_utils.persistence` module exists only while pickling; the
# `module_src` we store is a placeholder). The snapshot dict has the official keys; its `ema` is
# the parity network of Chapter 5 §5.5 wrapped in `EDMPrecond`, so the loaded network must reproduce the
# official outputs. (With a checkout of the official code, `EDM_LIT_OFFICIAL=/path/to/edm pytest
# tests/test_checkpoints.py -k official_code` also loads snapshots that the official code itself
# pickles, `AugmentPipe` and all, and compares their outputs with the official networks'.)

# %% tags=["export"]
PERSISTENT_CLASSES = frozenset(NETWORK_CLASSES) | {"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding",
                                                   "FourierEmbedding", "EDMLoss"}


def official_layout_pickle(obj, module_src="# source code of the defining module\n", edit_state=None,
                           version=6) -> bytes:
    """Pickle `obj` in the layout torch_utils.persistence writes: each of our persistent objects becomes
    _reconstruct_persistent_obj(meta). For tests and demonstrations of the reader; `module_src` is stored as
    given, and `edit_state(class_name, state) -> state` may alter what is written. Appendix A2."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only used to write")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    class Writer(pickle.Pickler):
        def reducer_override(self, o):
            name = type(o).__name__
            if name not in PERSISTENT_CLASSES or not type(o).__module__.startswith("edm_lit"):
                return NotImplemented
            kwargs = network_config(o)["init_kwargs"] if name in NETWORK_CLASSES else {}
            state = dict(o.__dict__, _init_args=(), _init_kwargs=kwargs)
            if edit_state is not None:
                state = edit_state(name, state)
            meta = dict(type="class", version=version, module_src=module_src, class_name=name, state=state)
            return _reconstruct_persistent_obj, (meta,)

    stand_in = types.ModuleType("torch_utils.persistence")  # exists only while pickling
    stand_in._reconstruct_persistent_obj = _reconstruct_persistent_obj
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": stand_in})
    try:
        buffer = io.BytesIO()
        Writer(buffer, protocol=4).dump(obj)
        return buffer.getvalue()
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)


# %%
import copy
import tempfile

from edm_lit.checkpoints import (CheckpointError, build_meta_network, convert, load_network,
                                 official_layout_pickle, read_official_pickle, save_network)
from edm_lit.loss import EDMLoss

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
# ## A2.4 What a hostile file can and cannot do
#
# `load_network` (and `edm-lit convert`) may be given any file or URL. For **any** content of
# the `.pkl`, the `.json`, the `.safetensors` file or the server's answers, it guarantees:
#
# 1. **No code from the file runs.** The only callables a pickle can reach are the functions in
#    the table `_ALLOWED_GLOBALS` (the only answer `SnapshotUnpickler._global` gives) — all ours, each
#    checking its arguments; `module_src` is never read.
# 2. **Bounded time and memory.** Every opcode consumes bytes of a file of at most
#    `MAX_FILE_BYTES`, every declared length is checked against the bytes that are left, nesting
#    and container entries are capped, keys hash in time linear in their length, nothing is
#    decompressed. Memory is the file plus the network, and the network is allocated only after
#    the file has shown it holds all its weights, each in a tensor of its own, so it never has more
#    weights than the file has bytes.
# 3. **No memory that is not in the file becomes a weight.** Every tensor lies inside its
#    storage, and a storage is exactly the bytes the file holds for it.
# 4. **Only the named files are read**: a regular file (never a FIFO, device or directory), and
#    for our format the weights file beside the `.json`, by a bare name.
# 5. **Every failure is a `CheckpointError`** (a `ValueError`) whose message names the file;
#    `edm-lit convert` prints it as one line and exits with status 1.
# 6. **Writing is atomic and durable**: a `.json` + `.safetensors` pair is replaced as a pair;
#    only complete downloads enter the cache, and processes that download one URL at the same
#    time take turns under a lock, so they never write the same partial file.
#
# What it does **not** promise: that the *numbers* in a file are benign (a file can hold any
# weights, so any outputs); that a legitimately large network fits in your memory (the limits are
# module constants such as `MAX_FILE_BYTES`); protection against someone who can rewrite
# the files while they are being loaded.
#
# Each class of attack has a test in `tests/test_checkpoints.py` that builds the hostile file,
# asserts the `CheckpointError` and a time bound (every test also runs under a 120 s alarm), and,
# where the file carries code, that a marker file it would write never appears:
#
# | attack | defence | test |
# |---|---|---|
# | a reduce calling `os.system`, `eval`, `getattr`, ...; the same inside a storage blob | globals only from our table; `REDUCE` only calls those | `test_malicious_reduce_is_refused_without_effect`, `test_malicious_storage_payload_is_refused` |
# | code in `module_src`, which the official loader `exec`s | never read | `test_module_src_is_never_executed` |
# | a storage smaller than its tensor; an offset or stride past its end; overlapping or shared elements | our parser of the legacy storage (declared count = bytes held); bounds, overlap and sharing checks; `as_strided` over a buffer that cannot grow | `test_attack_tensor_outside_its_storage` |
# | one tensor, or one module record, referenced again through the memo to fill many weights (a file of a few MB asking for a network dozens of times its size) | a tensor object fills one entry only, checked while the file's tensors are collected, before any allocation | `test_attack_one_tensor_fills_many_weights` |
# | a tiny file asking for a huge network; a deflate-compressed zip storage; a storage claiming 10¹² elements | argument limits; a `meta`-device build compared with the file's shapes before any allocation; zip refused undecompressed; declared = held | `test_attack_tiny_file_asks_for_huge_network` |
# | a FIFO `x.pkl`, a `.json` linked to `/dev/zero`, a directory; deep nesting, tuples as dict keys, a 1 TB length in an 11-byte file, a tuple with 2⁹⁰ leaves (shared through the memo) hashed or printed | non-blocking open, regular files only, size caps; depth and entry caps, scalar keys only, lengths checked against the bytes left | `test_attack_special_files_and_bombs` |
# | `"weights": "../x"` or an absolute path, also in a `.json` from a URL | a bare name beside the `.json`; one error whether or not the target exists | `test_attack_weights_path_traversal` |
# | `BUILD` setting a function's `__defaults__` or a record's `__class__`; `NEWOBJ` of other types; a callable `model_type` | `BUILD` only on `ModuleDict` records (a plain dict) and NumPy dtypes; `NEWOBJ` only our two records; `model_type` one of two names | `test_attack_build_and_callables` |
# | a download cut short without `Content-Length`; a malformed `Content-Length`; a `Range` answer that does not continue the file | without a length, cached only if it parses, else deleted; the header validated; `Content-Range` checked | `test_attack_download_without_or_with_bad_content_length`, `test_url_download_resumes_after_a_drop` |
# | content that provokes `AttributeError`, `TypeError`, `RecursionError`, `IsADirectoryError`, `UnicodeDecodeError`, JSON errors | checks at each step; one boundary that turns anything left into a `CheckpointError` naming the file | `test_attack_malformed_files_give_checkpoint_errors`, `test_truncated_files`, `test_fuzzed_files_give_checkpoint_errors_only` (random damage to a snapshot's structure and to a `.json`) |
# | a crash while saving; a restrictive umask | weights by hash, then the `.json` renamed in; `fsync` of files and directory; mode `0o666` minus the umask | `test_save_network_pair_is_atomic_durable_and_honours_umask` |
# | a traceback instead of an error message | `edm-lit convert: error: ...`, one line, status 1 | `test_cli_convert_errors_are_one_line` |
#
# **Check** — a few of these attacks, run here: each is refused with a `CheckpointError`, quickly,
# and the process's peak memory grows by less than 1 % of what one of them asks for — a network
# of tens of GB.

# %%
import resource
import time

from myst_nb import glue

attacks = workdir / "attacks"
attacks.mkdir()
os.mkfifo(attacks / "fifo.pkl")
(attacks / "zero.json").symlink_to("/dev/zero")
(attacks / "deep-key.pkl").write_bytes(b"\x80\x04}" + b")" + b"\x85" * 100_000 + b"Ns.")  # ((((...)))) as a dict key
(attacks / "terabyte.pkl").write_bytes(b"\x80\x04\x8e" + (10**12).to_bytes(8, "little"))  # BINBYTES8 of 1 TB
huge = copy.deepcopy(official)
huge.model.init_kwargs = dict(huge.model.init_kwargs, model_channels=4096)  # the weights stay small
(attacks / "huge.pkl").write_bytes(official_layout_pickle({"ema": huge}))
huge_meta = build_meta_network("EDMPrecond", network_config(huge)["init_kwargs"])
cfg = json.loads(config_path.read_text())
(attacks / "traversal.json").write_text(json.dumps(dict(cfg, weights="../../network-snapshot-000000.pkl")))
shared_by_shape = {}


def one_tensor_per_shape(name, state):  # every weight of a shape is the same tensor object, pickled once
    if state.get("_parameters"):
        state["_parameters"] = {k: shared_by_shape.setdefault(v.shape, v) for k, v in state["_parameters"].items()}
    return state


(attacks / "shared.pkl").write_bytes(official_layout_pickle({"ema": official}, edit_state=one_tensor_per_shape))
(attacks / "defaults.pkl").write_bytes(  # BUILD: set the __defaults__ of a function the table hands out
    b"\x80\x04\x8c\x17torch_utils.persistence\x8c\x1b_reconstruct_persistent_obj\x93N}\x8c\x0c__defaults__K\x01\x85s\x86b.")

rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
times = {}
for path in sorted(attacks.iterdir()):
    start = time.perf_counter()
    try:
        load_network(path)
    except CheckpointError as e:
        times[path.name] = time.perf_counter() - start
        print(f"{path.name:15} refused in {1e3 * times[path.name]:6.1f} ms: {str(e).replace(str(attacks), '')[:110]}")
    else:
        raise AssertionError(f"{path.name} must be refused")
rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
huge_gb = 4 * sum(p.numel() for p in huge_meta.parameters()) / 1e9
print(f"huge.pkl: {(attacks / 'huge.pkl').stat().st_size / 1e6:.1f} MB asking for {huge_gb:.0f} GB of weights; "
      f"peak memory grew by {rss_growth:.0f} MiB")
assert max(times.values()) < 5 and max(times, key=times.get) in ("huge.pkl", "shared.pkl") and huge_gb > 10
assert rss_growth < 0.01 * huge_gb * 1024  # far below 1 % of what the file asks for: nothing of that size was allocated
glue("attack_count", len(times), display=False)
glue("attack_max_ms", 1e3 * max(times.values()), display=False)
glue("huge_gb", huge_gb, display=False)
glue("rss_growth_mib", rss_growth, display=False)

# %% [markdown]
# Here {glue:text}`attack_count` hostile files were refused, the slowest in
# {glue:text}`attack_max_ms:.0f` ms (one of the two that describe a whole network, which is read and
# built on the `meta` device before it is refused);
# the file that asks for {glue:text}`huge_gb:.0f` GB of weights raised the peak memory of this
# process by {glue:text}`rss_growth_mib:.0f` MiB.

# %% [markdown]
# ## A2.5 Sampling from an official pretrained network
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
# **Check** — the same lines on the snapshot of §A2.1 (the small official-layout network): the
# deterministic 18-step sampler on the official latents and labels reproduces the images the
# official `edm_sampler` made with the official network (`book/data/sampler_edm.pt`).

# %%
from edm_lit.samplers import edm_sampler

SAMPLER = torch.load(Path("data") / "sampler_edm.pt", weights_only=True)
net = load_network(pkl)
with torch.no_grad():
    images = edm_sampler(net, SAMPLER["latents"].double(), SAMPLER["class_labels"])
err = ((images - SAMPLER["det_out"]).abs().max() / SAMPLER["det_out"].abs().max()).item()
print(f"loaded snapshot + edm_sampler vs official: {err:.1e} (35 network calls, float64 sampler)")
assert err < 1e-6  # float32 network rounding only, as in tests/test_parity.py

