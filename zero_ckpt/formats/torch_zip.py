"""Reading ``torch.save`` files without executing them: a restricted unpickler and storage locator.

A ``.pt`` file written by ``torch.save`` (the zip format, torch >= 1.6) is a zip archive:

    <archive>/data.pkl      the pickled object; every tensor storage is a persistent id
                            ("storage", <torch.FloatStorage>, "<key>", "<location>", <numel>)
    <archive>/data/<key>    the raw bytes of storage <key>, stored uncompressed (ZIP_STORED)
    <archive>/byteorder     "little" or "big" (absent in old files: little)

:func:`restricted_load` rebuilds the pickle **without importing or calling anything from it**:
allowed containers and scalars are rebuilt as themselves, storages become :class:`StorageRef`,
``torch._utils._rebuild_tensor_v2``/``_v3`` become :class:`TensorRef` (storage, element
offset, shape, stride, dtype), and every other global becomes an inert placeholder whose
instances are :class:`Unknown` records of (module, name, args, state). Globals that can only
mean code execution (``os.system``, ``builtins.eval``, ``subprocess.*``, ...) are refused with
:class:`UnsafePickleError`.

:class:`TorchZipFile` locates each storage's bytes inside the zip (local header offset + header
length of an uncompressed entry), so a tensor becomes an absolute byte range of the ``.pt`` file
that the executors read with ranged reads: nothing is loaded whole.
"""

from __future__ import annotations

import builtins
import io
import math
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from zero_ckpt.errors import CheckpointError, CorruptShardError
from zero_ckpt.storage import Location

__all__ = [
    "StorageRef",
    "TensorRef",
    "Unknown",
    "UnsafePickleError",
    "TorchZipFile",
    "restricted_load",
    "open_torch_zip",
    "check_pickle",
    "check_torch_file",
    "verify_record_crcs",
    "zip_crc_failures",
    "crc_failure_message",
    "STORAGE_DTYPES",
    "ELEMENT_SIZES",
    "MAX_PICKLE_BYTES",
    "MAX_PICKLE_ITEMS",
    "MAX_PICKLE_DEPTH",
    "MAX_ZIP_MEMBERS",
    "ZIP_FLAGS",
    "ZIP64_LIMIT",
    "ZIP_ALIGN_DATA",
    "zip_local_header",
    "zip_descriptor",
    "zip_central",
    "zip_end_records",
]

# Caps on what an untrusted ``.pt`` file may make the reader spend, each checked before the
# memory is spent (DeepSpeed's and torch's own files are far below them: a ZeRO-2 file's
# pickle is kilobytes, with a few thousand container items and a nesting of about 6).
MAX_PICKLE_BYTES = 64 << 20  # data.pkl
MAX_PICKLE_ITEMS = 2_000_000  # references put into containers, and memo entries
MAX_PICKLE_DEPTH = 100  # nesting of containers (and the unpickler's stack, x100)
MAX_ZIP_MEMBERS = 100_000  # records of one archive
_MAX_CENTRAL_DIRECTORY = 64 << 20  # bytes of the zip's central directory
_MAX_COPY_BYTES = 64 << 20  # bytes that allowed constructors (list, bytes, ...) may copy

# torch.<Name>Storage -> our dtype name (torch's without the prefix).
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
ELEMENT_SIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "uint16": 2, "uint32": 4, "uint64": 8,
}
# torch.<dtype> globals (as pickled by _rebuild_tensor_v3 and in plain data) -> dtype name.
_TORCH_DTYPE_NAMES = set(ELEMENT_SIZES) | {"float8_e4m3fnuz", "float8_e5m2fnuz", "complex32"}

# Globals whose only use in a pickle is running code: refused outright (the rest of the
# unknown globals are made inert, which is enough for safety; this names the attack).
_REFUSED_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "pty", "socket",
    "ctypes", "pickle", "_pickle", "marshal", "types", "code", "codeop", "webbrowser", "commands",
    "popen2", "platform", "multiprocessing", "asyncio", "signal", "tempfile", "pathlib", "io",
    "_io", "operator", "functools", "inspect", "pdb", "timeit", "threading", "_thread",
}
_ALLOWED_BUILTINS = {
    "set", "frozenset", "list", "dict", "tuple", "int", "float", "bool", "str", "bytes",
    "bytearray", "complex", "slice", "range",
}


class UnsafePickleError(CheckpointError, ValueError):
    """A pickle asks to call something that can only run code; it is refused, not executed."""


@dataclass(frozen=True)
class StorageRef:
    """A tensor storage of the archive: ``data/<key>``, ``numel`` elements of ``dtype``."""

    key: str
    dtype: str
    numel: int
    location: str = "cpu"

    @property
    def nbytes(self) -> int:
        return self.numel * ELEMENT_SIZES[self.dtype]


@dataclass(frozen=True)
class TensorRef:
    """An inert tensor: ``shape``/``stride`` elements into ``storage`` from element ``offset``.

    ``dtype`` is the tensor's (equal to the storage's except for ``_rebuild_tensor_v3``
    tensors over an untyped storage).
    """

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ELEMENT_SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


@dataclass
class Unknown:
    """An object of a class the reader does not rebuild: what the pickle said, nothing run.

    ``module``/``name`` name the class or callable; ``args`` what it would have been called
    with; ``state`` what ``__setstate__`` would have received; ``items``/``entries`` what list
    or dict subclass contents it carried.
    """

    module: str
    name: str
    args: tuple = ()
    state: Any = None
    items: list = field(default_factory=list)
    entries: dict = field(default_factory=dict)

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


class _Placeholder:
    """Base of the stand-in classes :func:`restricted_load` hands the unpickler for unknown
    globals. Calling one (REDUCE) or ``__new__`` (NEWOBJ) records the arguments; ``BUILD``,
    ``APPEND`` and ``SETITEM`` record state; nothing else happens."""

    _zc_module = ""
    _zc_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Placeholder":
        obj = object.__new__(cls)
        object.__setattr__(obj, "_zc_record", Unknown(cls._zc_module, cls._zc_name, tuple(args)))
        if kwargs:
            obj._zc_record.state = dict(kwargs)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D401 - inert
        pass

    def __setstate__(self, state: Any) -> None:
        self._zc_record.state = state

    def __setattr__(self, name: str, value: Any) -> None:
        if not isinstance(self._zc_record.state, dict):
            self._zc_record.state = {}
        self._zc_record.state[name] = value

    def append(self, item: Any) -> None:
        self._zc_record.items.append(item)

    def extend(self, items: Any) -> None:
        self._zc_record.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._zc_record.entries[key] = value


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _TorchDtype(str):
    """A ``torch.<dtype>`` global, kept as its name."""


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    return _tensor_ref(storage, storage_offset, size, stride, requires_grad, None)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    return _tensor_ref(storage, storage_offset, size, stride, requires_grad, dtype)


def _tensor_ref(storage, offset, size, stride, requires_grad, dtype) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if not isinstance(offset, int) or offset < 0:
        raise pickle.UnpicklingError(f"tensor storage offset {offset!r} is not a non-negative integer")
    shape = tuple(size)
    strides = tuple(stride)
    if any(not isinstance(d, int) or d < 0 for d in shape) or any(not isinstance(s, int) for s in strides):
        raise pickle.UnpicklingError(f"tensor shape {shape} / stride {strides} are not integers")
    if len(shape) != len(strides):
        raise pickle.UnpicklingError(f"tensor shape {shape} and stride {strides} differ in length")
    name = str(dtype) if dtype is not None else storage.dtype
    if name not in ELEMENT_SIZES:
        raise pickle.UnpicklingError(f"tensor dtype {name!r} is not supported")
    return TensorRef(storage, offset, shape, strides, name, bool(requires_grad))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _torch_size(*args):
    return tuple(args[0]) if len(args) == 1 else tuple(args)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol 2 pickles bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed to rebuild bytes")
    return text.encode(encoding, errors)


def _torch_device(*args):
    return ":".join(str(a) for a in args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("_codecs", "encode"): _codecs_encode,
}


def _placeholder_class(module: str, name: str) -> type:
    return type(f"Unknown[{module}.{name}]", (_Placeholder,), {"_zc_module": module, "_zc_name": name})


class _Budget:
    """What the allowed constructors may copy or create, in bytes (a reference counts 8,
    a set/dict entry 64): ``bytearray(10**10)`` or ``list(range(10**9))`` in a pickle must be
    refused before it allocates, and so must many small copies of one large object."""

    def __init__(self, path: str, limit: int = _MAX_COPY_BYTES) -> None:
        self.path, self.left = path, limit

    def charge(self, nbytes: int, what: str) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise CorruptShardError(
                f"{self.path}: the pickle asks for {what}, more than the {_MAX_COPY_BYTES} bytes "
                "zero-ckpt lets a checkpoint's metadata build; the file is damaged or hostile",
                path=self.path,
            )


def _size_of(obj: Any) -> int:
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if isinstance(obj, range):
        return 8 * len(obj)
    if isinstance(obj, (set, frozenset, dict)):
        return 64 * len(obj)
    try:
        return 8 * len(obj)
    except TypeError:
        return 8


def _checked_builtin(name: str, budget: _Budget) -> Any:
    real = getattr(builtins, name)

    def build(*args: Any) -> Any:
        if name in ("bytes", "bytearray", "str") and args and isinstance(args[0], int) and not isinstance(args[0], bool):
            if name != "str":  # bytes(n) allocates n zero bytes
                budget.charge(max(0, args[0]), f"{name}({args[0]})")
        elif name == "range":
            try:
                n = len(range(*args))
            except (OverflowError, TypeError, ValueError):
                n = _MAX_COPY_BYTES
            budget.charge(8 * n, f"range of {n} items")
            return real(*args)
        elif name == "int" and args and isinstance(args[0], (str, bytes)) and len(args[0]) > 4300:
            raise pickle.UnpicklingError("an integer of more than 4300 digits")
        else:
            budget.charge(sum(_size_of(a) for a in args[:1]) * (8 if name in ("set", "frozenset", "dict") else 1), f"{name}() of a large object")
        return real(*args)

    return build


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._budget = _Budget(path)

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("global names must be strings")
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module in ("builtins", "__builtin__"):
            if name in _ALLOWED_BUILTINS:
                return _checked_builtin(name, self._budget)
            raise UnsafePickleError(
                f"{self._path}: the pickle asks for builtins.{name}, which zero-ckpt never calls "
                "while reading a checkpoint; the file is refused (it may be malicious)",
                path=self._path,
            )
        root = module.split(".", 1)[0]
        if root in _REFUSED_MODULES:
            raise UnsafePickleError(
                f"{self._path}: the pickle asks for {module}.{name}, which can only run code; the "
                "file is refused and nothing from it was executed (it may be malicious)",
                path=self._path,
            )
        if module == "torch":
            if name in STORAGE_DTYPES:
                return _StorageType(STORAGE_DTYPES[name])
            if name in _TORCH_DTYPE_NAMES:
                return _TorchDtype(name)
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
            return _StorageType("uint8")
        return _placeholder_class(module, name)

    def persistent_load(self, pid: Any) -> Any:  # noqa: D401 - pickle API
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], str)
            or not isinstance(pid[4], int)
            or pid[4] < 0
        ):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        return StorageRef(pid[2], pid[1].dtype, pid[4], str(pid[3]))


class _TooDeep(Exception):
    pass


def _unwrap(obj: Any, seen: dict[int, Any] | None = None, depth: int = 0) -> Any:
    """Replace placeholder instances by their :class:`Unknown` records, recursively (at most
    MAX_PICKLE_DEPTH levels: deeper raises _TooDeep; keys that are not hashable once unwrapped
    raise TypeError)."""
    if depth > MAX_PICKLE_DEPTH:
        raise _TooDeep()
    if seen is None:
        seen = {}
    d = depth + 1
    key = id(obj)
    if key in seen:
        return seen[key]
    if isinstance(obj, _Placeholder):
        record = object.__getattribute__(obj, "_zc_record")
        seen[key] = record
        record.args = tuple(_unwrap(a, seen, d) for a in record.args)
        record.state = _unwrap(record.state, seen, d)
        record.items = [_unwrap(a, seen, d) for a in record.items]
        record.entries = {k: _unwrap(v, seen, d) for k, v in record.entries.items()}
        return record
    if isinstance(obj, type) and issubclass(obj, _Placeholder):
        return Unknown(obj._zc_module, obj._zc_name)
    if isinstance(obj, _StorageType):
        return obj.dtype
    if isinstance(obj, _TorchDtype):
        return str(obj)
    if isinstance(obj, OrderedDict):
        out: Any = OrderedDict()
        seen[key] = out
        for k, v in obj.items():
            out[_unwrap(k, seen, d)] = _unwrap(v, seen, d)
        return out
    if isinstance(obj, dict):
        out = {}
        seen[key] = out
        for k, v in obj.items():
            out[_unwrap(k, seen, d)] = _unwrap(v, seen, d)
        return out
    if isinstance(obj, list):
        out = []
        seen[key] = out
        out.extend(_unwrap(v, seen, d) for v in obj)
        return out
    if isinstance(obj, tuple):
        out = tuple(_unwrap(v, seen, d) for v in obj)
        seen[key] = out
        return out
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_unwrap(v, seen, d) for v in obj)
    return obj


def restricted_load(data: bytes, path: str = "<pickle>") -> Any:
    """Unpickle ``data`` without importing or executing anything it names.

    Returns plain containers and scalars, :class:`TensorRef`/:class:`StorageRef` for tensors
    and storages, :class:`Unknown` for objects of other classes. Raises
    :class:`UnsafePickleError` for globals that can only run code and
    :class:`CorruptShardError` for a pickle that is malformed; both name ``path``.
    """
    check_pickle(data, path)
    try:
        obj = _RestrictedUnpickler(data, path).load()
        return _unwrap(obj)
    except CheckpointError:
        raise
    except (_TooDeep, RecursionError):
        raise CorruptShardError(
            f"{path}: the pickled data is nested more than {MAX_PICKLE_DEPTH} levels deep; the "
            "file is damaged or hostile",
            path=path,
        ) from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
            KeyError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise CorruptShardError(
            f"{path}: cannot read the pickled data ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            "the file is damaged or not a torch checkpoint",
            path=path,
        ) from None


_MARK = pickletools.markobject
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def check_pickle(data: bytes, path: str = "<pickle>") -> None:
    """Refuse a pickle whose opcodes would make an unpickler spend unbounded memory, before
    any unpickler runs: more than MAX_PICKLE_BYTES, declared lengths past the end of the
    data (a BINBYTES8 of 2**60 bytes), memo indices past MAX_PICKLE_ITEMS (the memo is grown
    to the index), more than MAX_PICKLE_ITEMS references put into containers, a stack or
    mark nesting deeper than ``100 x MAX_PICKLE_DEPTH``. CorruptShardError naming ``path``.

    One pass over the opcodes (``pickletools.genops``), about 2 us per opcode."""

    def refuse(what: str) -> CorruptShardError:
        return CorruptShardError(
            f"{path}: cannot read the pickled data: it {what}; the file is damaged or hostile "
            "(refused before unpickling)",
            path=path,
        )

    if len(data) > MAX_PICKLE_BYTES:
        raise refuse(f"is {len(data)} bytes, more than the {MAX_PICKLE_BYTES} a checkpoint's metadata can be")
    max_stack = 100 * MAX_PICKLE_DEPTH
    depth = 0
    marks: list[int] = []
    items = 0
    stopped = False
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            before, after = op.stack_before, op.stack_after
            if name == "MARK":
                marks.append(depth)
                if len(marks) > max_stack:
                    raise refuse(f"nests more than {max_stack} marks")
                continue
            if _MARK in before:
                if not marks:
                    raise refuse(f"uses {name} without a MARK (malformed)")
                top = marks.pop()
                consumed = depth - top  # the items above the mark
                items += consumed
                depth = top - before.index(_MARK) + len(after)
            else:
                depth += len(after) - len(before)
                if name in ("APPEND", "SETITEM", "TUPLE1", "TUPLE2", "TUPLE3"):
                    items += {"TUPLE2": 2, "TUPLE3": 3}.get(name, 1)
            if name in _MEMO_OPS and isinstance(arg, int) and arg > MAX_PICKLE_ITEMS:
                raise refuse(f"stores memo entry {arg}, more than {MAX_PICKLE_ITEMS}")
            if name == "MEMOIZE":
                items += 1
            if depth > max_stack:
                raise refuse(f"stacks more than {max_stack} objects")
            if items > MAX_PICKLE_ITEMS:
                raise refuse(f"builds containers of more than {MAX_PICKLE_ITEMS} items in all")
            if name == "STOP":
                stopped = True
    except CorruptShardError:
        raise
    except (ValueError, EOFError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise refuse(f"is malformed ({' '.join(str(exc).split())[:160]})") from None
    if not stopped:
        raise refuse("ends before its STOP opcode (truncated)")


# ----- the zip container -----------------------------------------------------------------------


class _RangeFile(io.RawIOBase):
    """A read-only, seekable file over ranged reads of a :class:`Location` (for ``zipfile``)."""

    def __init__(self, loc: Location, rel: str, size: int) -> None:
        self.loc, self.rel, self.size, self.pos = loc, rel, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n:
            self.loc.read_into(self.rel, self.pos, memoryview(b).cast("B")[:n])
        self.pos += n
        return n


# ----- writing torch.save zip records (shared by the writers) --------------------------------------

ZIP_FLAGS = 0x0808  # data descriptor follows the data; UTF-8 names (what torch's writer sets)
ZIP64_LIMIT = 0xFFFFFFFF  # sizes/offsets from here on go in zip64 fields
ZIP_ALIGN_DATA = 64  # torch aligns every record's data to 64 bytes (an "FB" padding extra field)
_MARK32 = 0xFFFFFFFF  # "see the zip64 field" in a 32-bit field


def zip_local_header(name: bytes, offset: int, zip64: bool) -> bytes:
    """The local header of a record named ``name`` starting at byte ``offset`` of the archive, as
    torch writes it: sizes and CRC-32 left zero (a data descriptor follows the data), the data
    aligned to :data:`ZIP_ALIGN_DATA` bytes by an "FB" extra field; ``zip64`` for a record of
    :data:`ZIP64_LIMIT` bytes or more."""
    extra = struct.pack("<HHQQ", 1, 16, 0, 0) if zip64 else b""
    base = offset + 30 + len(name) + len(extra)
    pad = (-base) % ZIP_ALIGN_DATA
    if pad < 4:
        pad += ZIP_ALIGN_DATA
    extra += b"FB" + struct.pack("<H", pad - 4) + b"Z" * (pad - 4)
    head = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 0, ZIP_FLAGS, 0, 0, 0, 0, 0, 0,
                       len(name), len(extra))
    return head + name + extra


def zip_descriptor(crc: int, nbytes: int, zip64: bool) -> bytes:
    """The data descriptor written after a record's data: its CRC-32 and size."""
    if zip64:
        return struct.pack("<IIQQ", 0x08074B50, crc, nbytes, nbytes)
    return struct.pack("<IIII", 0x08074B50, crc, nbytes, nbytes)


def zip_central(name: bytes, crc: int, nbytes: int, offset: int, zip64_limit: int = ZIP64_LIMIT) -> bytes:
    """The central directory entry of a stored record (local header at ``offset``)."""
    extra = b""
    size32, off32 = nbytes, offset
    values = []
    if nbytes >= zip64_limit:
        values += [nbytes, nbytes]
        size32 = _MARK32
    if offset >= zip64_limit:
        values.append(offset)
        off32 = _MARK32
    if values:
        extra = struct.pack("<HH", 1, 8 * len(values)) + struct.pack(f"<{len(values)}Q", *values)
    need = 45 if values else 0
    return struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, need, need, ZIP_FLAGS, 0, 0, 0, crc, size32, size32,
        len(name), len(extra), 0, 0, 0, 0, off32,
    ) + name + extra


def zip_end_records(count: int, cd_offset: int, cd_size: int, zip64_limit: int = ZIP64_LIMIT) -> bytes:
    """The zip64 end record, its locator and the end record (torch writes all three)."""
    zip64_eocd = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, cd_offset + cd_size, 1)
    eocd = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
        cd_size if cd_size < zip64_limit else _MARK32, cd_offset if cd_offset < zip64_limit else _MARK32, 0,
    )
    return zip64_eocd + locator + eocd


_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"


def _check_zip_directory(loc: Location, rel: str, size: int) -> None:
    """Refuse a zip whose end records declare more members than MAX_ZIP_MEMBERS, or a central
    directory larger than the file or than ``_MAX_CENTRAL_DIRECTORY`` bytes, before
    ``zipfile`` reads (and allocates) the directory. A file without an end record is left to
    ``zipfile``'s own error."""
    url = loc.url_of(rel)
    tail_len = min(size, 22 + 65535)
    tail = loc.read_range(rel, size - tail_len, size)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        return
    _, _, _, entries, cd_size, cd_offset, _ = struct.unpack("<HHHHIIH", tail[at + 4 : at + 22])
    if (entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF) and at >= 20:
        locator = tail[at - 20 : at]
        if locator[:4] == _ZIP64_LOCATOR:
            (z64_offset,) = struct.unpack("<Q", locator[8:16])
            if z64_offset + 56 > size:
                raise CorruptShardError(
                    f"{url}: its zip64 end record is declared at byte {z64_offset}, past the end of "
                    f"the file ({size} bytes): damaged or hostile",
                    path=url,
                )
            record = loc.read_range(rel, z64_offset, z64_offset + 56)
            if record[:4] == _ZIP64_EOCD:
                entries, cd_size, cd_offset = struct.unpack("<QQQ", record[32:56])
    if entries > MAX_ZIP_MEMBERS:
        raise CorruptShardError(
            f"{url}: the zip declares {entries} records, more than the {MAX_ZIP_MEMBERS} a "
            "checkpoint file can hold; it is damaged or hostile",
            path=url,
        )
    if cd_size > min(size, _MAX_CENTRAL_DIRECTORY) or cd_offset + cd_size > size:
        raise CorruptShardError(
            f"{url}: the zip declares a central directory of {cd_size} bytes at byte {cd_offset}, "
            f"which does not fit the file ({size} bytes) or exceeds {_MAX_CENTRAL_DIRECTORY}; it "
            "is damaged or hostile",
            path=url,
        )


@dataclass(frozen=True)
class _Record:
    name: str
    data_start: int
    nbytes: int
    crc: int = 0  # the zlib CRC-32 the central directory records for it


class TorchZipFile:
    """A ``torch.save`` zip file at ``loc/rel``: its records' byte ranges and its pickle.

    Open with :func:`open_torch_zip`. ``archive`` is the records' common folder name;
    :meth:`load` unpickles ``data.pkl`` with :func:`restricted_load`;
    :meth:`tensor_range` gives a tensor's absolute byte range in the file.
    """

    def __init__(
        self, loc: Location, rel: str, size: int, archive: str, records: dict[str, _Record],
        compressed: tuple[str, ...] = (),
    ) -> None:
        self.loc, self.rel, self.size = loc, rel, size
        self.url = loc.url_of(rel)
        self.archive = archive
        self.records = records
        self.compressed = compressed  # names of compressed (never read) records

    def _error(self, message: str) -> CorruptShardError:
        return CorruptShardError(f"{self.url}: {message}", path=self.url)

    def read_record(self, name: str) -> bytes:
        rec = self.records.get(f"{self.archive}/{name}")
        if rec is None:
            raise self._error(f"has no {self.archive}/{name} record; not a torch checkpoint or damaged")
        return self.loc.read_range(self.rel, rec.data_start, rec.data_start + rec.nbytes)

    def load(self) -> Any:
        """The unpickled object (tensors as :class:`TensorRef`, never loaded)."""
        byteorder = f"{self.archive}/byteorder"
        if byteorder in self.records and self.read_record("byteorder").strip() != b"little":
            raise self._error("was saved on a big-endian machine; only little-endian files are read")
        rec = self.records.get(f"{self.archive}/data.pkl")
        if rec is not None and rec.nbytes > MAX_PICKLE_BYTES:
            raise self._error(
                f"cannot read the pickled data: it is {rec.nbytes} bytes, more than the "
                f"{MAX_PICKLE_BYTES} a checkpoint's metadata can be; the file is damaged or hostile"
            )
        return restricted_load(self.read_record("data.pkl"), self.url)

    def storage_range(self, storage: StorageRef) -> tuple[int, int]:
        """``(absolute byte start, nbytes)`` of a storage's record, checked against its size."""
        rec = self.records.get(f"{self.archive}/data/{storage.key}")
        if rec is None:
            raise self._error(f"storage {storage.key!r} has no data/{storage.key} record (damaged)")
        if rec.nbytes < storage.nbytes:
            raise self._error(
                f"storage {storage.key!r} should hold {storage.nbytes} bytes but its record has "
                f"{rec.nbytes} (damaged)"
            )
        return rec.data_start, rec.nbytes

    def storage_crc(self, storage: StorageRef) -> int:
        """The zlib CRC-32 the zip records for a storage's bytes (see :meth:`storage_range`)."""
        self.storage_range(storage)
        return self.records[f"{self.archive}/data/{storage.key}"].crc

    def tensor_range(self, t: TensorRef, what: str = "tensor") -> tuple[int, int]:
        """``(absolute byte start, nbytes)`` of a contiguous tensor's elements in the file."""
        if not t.is_contiguous():
            raise self._error(
                f"{what} is stored non-contiguously (shape {list(t.shape)}, stride {list(t.stride)}); "
                "it cannot be read as one byte range"
            )
        start, nbytes = self.storage_range(t.storage)
        # The offset counts elements of the tensor's dtype (typed storages have that dtype;
        # _rebuild_tensor_v3 sets a typed view over an untyped storage).
        first = t.offset * t.itemsize
        if first + t.nbytes > nbytes:
            raise self._error(
                f"{what} needs bytes [{first}, {first + t.nbytes}) of storage {t.storage.key!r}, "
                f"which has {nbytes} (damaged)"
            )
        return start + first, t.nbytes

    def read_tensor_bytes(self, t: TensorRef, what: str = "tensor") -> bytes:
        """The raw bytes of a (small) contiguous tensor."""
        start, nbytes = self.tensor_range(t, what)
        return self.loc.read_range(self.rel, start, start + nbytes)

    def read_scalar(self, t: TensorRef, what: str = "value") -> float | int | bool:
        """The value of a one-element tensor (``step`` and the like) as a Python number."""
        if t.numel != 1:
            raise self._error(f"{what} should be a single number, got a tensor of shape {list(t.shape)}")
        raw = self.read_tensor_bytes(t, what)
        fmt = {"float64": "<d", "float32": "<f", "float16": "<e", "int64": "<q", "int32": "<i",
               "int16": "<h", "int8": "<b", "uint8": "<B", "bool": "<?"}.get(t.dtype)
        if t.dtype == "bfloat16":
            return struct.unpack("<f", b"\x00\x00" + raw)[0]
        if fmt is None:
            raise self._error(f"{what} has unsupported dtype {t.dtype}")
        return struct.unpack(fmt, raw)[0]


def open_torch_zip(loc: Location, rel: str) -> TorchZipFile:
    """Index the zip at ``loc/rel``: every record's absolute data range (central directory and
    local headers only; no data is read). Refuses legacy (non-zip) torch files and compressed
    or encrypted records by name."""
    url = loc.url_of(rel)
    size = loc.size(rel)
    _check_zip_directory(loc, rel, size)
    raw = _RangeFile(loc, rel, size)
    try:
        zf = zipfile.ZipFile(raw)  # type: ignore[arg-type]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        head = loc.read_range(rel, 0, 2) if size >= 2 else b""
        hint = (
            "it is a legacy (pre-1.6, non-zip) torch file: load and re-save it with a recent torch"
            if head[:1] == b"\x80"
            else "it is not a torch.save zip file or it is damaged"
        )
        raise CorruptShardError(f"{url}: cannot open as a zip archive ({exc}); {hint}", path=url) from None
    records: dict[str, _Record] = {}
    compressed: list[str] = []
    archive = None
    with zf:
        for info in zf.infolist():
            if archive is None and info.filename.endswith("/data.pkl") and info.filename.count("/") == 1:
                archive = info.filename.split("/", 1)[0]
            if info.flag_bits & 0x1:
                raise CorruptShardError(f"{url}: record {info.filename} is encrypted", path=url)
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise CorruptShardError(
                    f"{url}: record {info.filename[:100]!r} is stored uncompressed but declares "
                    f"{info.file_size} bytes for {info.compress_size} stored ones (damaged or hostile)",
                    path=url,
                )
            if info.compress_type != zipfile.ZIP_STORED and info.filename.endswith("/data.pkl"):
                raise CorruptShardError(
                    f"{url}: record {info.filename[:100]!r} is compressed; torch.save stores it "
                    "uncompressed and zero-ckpt never inflates a checkpoint's records (a "
                    "compressed record can be a zip bomb): re-save the file with torch.save",
                    path=url,
                )
            local = loc.read_range(rel, info.header_offset, info.header_offset + 30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CorruptShardError(
                    f"{url}: record {info.filename} has no local header at byte "
                    f"{info.header_offset} (damaged)",
                    path=url,
                )
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            data_start = info.header_offset + 30 + name_len + extra_len
            if info.filename.split("/")[1:2] == ["data"] and info.compress_type != zipfile.ZIP_STORED:
                raise CorruptShardError(
                    f"{url}: tensor record {info.filename} is compressed; torch.save stores tensors "
                    "uncompressed, so this file was repacked: unzip and re-zip it with -0 (store)",
                    path=url,
                )
            if info.compress_type != zipfile.ZIP_STORED:
                compressed.append(info.filename)
                continue  # not a record we read by range
            if data_start + info.file_size > size:
                raise CorruptShardError(
                    f"{url}: record {info.filename} ends at byte {data_start + info.file_size}, past the "
                    f"end of the file ({size} bytes): truncated",
                    path=url,
                )
            records[info.filename] = _Record(info.filename, data_start, info.file_size, info.CRC)
    if archive is None:
        raise CorruptShardError(f"{url}: the zip has no <archive>/data.pkl: not a torch.save file", path=url)
    return TorchZipFile(loc, rel, size, archive, records, tuple(compressed))


def check_torch_file(loc: Location, rel: str) -> None:
    """Before a ``.pt`` file is handed to ``torch.load``: refuse (CorruptShardError naming it)
    a zip with too many records, a compressed record (torch.save stores every record; inflating
    an untrusted one can be a zip bomb) or a pickle :func:`check_pickle` refuses. Files that
    are not zips (legacy torch files) are left to ``torch.load``'s weights-only unpickler."""
    if loc.read_range(rel, 0, 4)[:4] != b"PK\x03\x04":
        return
    zf = open_torch_zip(loc, rel)
    if zf.compressed:
        raise zf._error(
            f"record {zf.compressed[0][:100]!r} is compressed; torch.save stores records "
            "uncompressed and zero-ckpt never inflates a checkpoint's records (a compressed record "
            "can be a zip bomb): re-save the file with torch.save"
        )
    rec = zf.records.get(f"{zf.archive}/data.pkl")
    if rec is not None and rec.nbytes > MAX_PICKLE_BYTES:
        raise zf._error(
            f"cannot read the pickled data: it is {rec.nbytes} bytes, more than the "
            f"{MAX_PICKLE_BYTES} a checkpoint's metadata can be; the file is damaged or hostile"
        )
    check_pickle(zf.read_record("data.pkl"), zf.url)


def zip_crc_failures(
    loc: Location, rel: str, chunk_bytes: int = 8 << 20, progress: Any = None
) -> list[str]:
    """Read every byte of the ``torch.save`` zip at ``loc/rel`` once and compare each stored
    record with the CRC-32 its central directory holds (torch writes one per record; DeepSpeed
    records no checksums of its own). Returns the names of the records that fail, sorted;
    ``progress(nbytes)`` is called per chunk read. A zip that cannot be read raises the
    CheckpointError that names it (``zipfile`` errors included)."""
    import zlib

    url = loc.url_of(rel)
    zf = open_torch_zip(loc, rel)
    size = loc.size(rel)
    try:
        with zipfile.ZipFile(_RangeFile(loc, rel, size)) as z:  # type: ignore[arg-type]
            expected = {i.filename: i.CRC for i in z.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CorruptShardError(f"{url}: {exc}", path=url) from None
    spans = sorted((r.data_start, r.data_start + r.nbytes, r.name) for r in zf.records.values())
    crcs = {name: 0 for _, _, name in spans}
    buf = bytearray(max(1, min(chunk_bytes, size)))
    pos = first = 0
    while pos < size:
        n = min(len(buf), size - pos)
        view = memoryview(buf)[:n]
        loc.read_into(rel, pos, view)
        while first < len(spans) and spans[first][1] <= pos:
            first += 1
        for start, end, name in spans[first:]:
            if start >= pos + n:
                break
            lo, hi = max(start, pos), min(end, pos + n)
            if hi > lo:
                crcs[name] = zlib.crc32(view[lo - pos : hi - pos], crcs[name])
        if progress is not None:
            progress(n)
        pos += n
    return sorted(name for name, crc in crcs.items() if name in expected and expected[name] != crc)


def crc_failure_message(bad: list[str]) -> str:
    """The one sentence for records that fail their CRC-32 (without the file's name)."""
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return (
        f"zip record {bad[0]}{more} fails its CRC-32 check: the data is corrupted "
        "(restore this file from a good copy)"
    )


def verify_record_crcs(loc: Location, rel: str, chunk_bytes: int = 8 << 20) -> int:
    """:func:`zip_crc_failures`, raising CorruptShardError naming the file and the first bad
    record. Returns the bytes read. A job that copies or converts such a file calls it before
    it commits anything."""
    bad = zip_crc_failures(loc, rel, chunk_bytes)
    if bad:
        url = loc.url_of(rel)
        raise CorruptShardError(f"{url}: {crc_failure_message(bad)}", path=url)
    return loc.size(rel)
