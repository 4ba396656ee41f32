"""PyTorch Distributed Checkpoint (DCP) ``.metadata``: read and write it without torch or pickle.load.

``torch.distributed.checkpoint.save`` with ``FileSystemWriter`` (the default
``SerializationFormat.TORCH_SAVE``) writes, per checkpoint folder::

    .metadata            pickle of torch.distributed.checkpoint.metadata.Metadata
    __<rank>_<n>.distcp  concatenated storage records: each a complete torch.save zip archive
                         of one tensor chunk (or of one pickled Python object, a BYTES item)

``Metadata`` holds ``state_dict_metadata`` (flattened key -> ``TensorStorageMetadata`` with
``properties``/``size``/``chunks`` or ``BytesStorageMetadata``), ``planner_data`` (flattened
key -> the path of keys/indices in the original nested state dict), ``storage_data``
(``MetadataIndex(fqn, chunk offsets, index)`` -> ``_StorageInfo(relative_path, offset,
length[, transform_descriptors])``), ``storage_meta`` and ``version``.

:func:`read_dcp_metadata` rebuilds that pickle with an unpickler that knows exactly those
classes (as inert stand-ins), ``torch.Size``, torch dtypes, the strided layout,
``pathlib`` paths (``storage_meta.checkpoint_id``) and ``collections.OrderedDict``; any other
global is refused with :class:`DcpFormatError` naming the file and the global, before anything
runs. :func:`write_dcp_metadata` writes the pickle back (protocol 2) so that torch's own
``pickle.load`` in ``FileSystemReader.read_metadata`` rebuilds objects equal to what
``dcp.save`` wrote. No torch import here.
"""

from __future__ import annotations

import io
import math
import pickle
import posixpath
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from zero_ckpt.errors import CheckpointError
from zero_ckpt.formats.dcp._pickling import Global, NewObj, Reduce, dumps
from zero_ckpt.formats.torch_zip import ELEMENT_SIZES, check_pickle

__all__ = [
    "DcpFormatError",
    "DcpChunk",
    "DcpTensor",
    "DcpBytes",
    "DcpStorageMeta",
    "DcpMetadata",
    "read_dcp_metadata",
    "write_dcp_metadata",
    "DCP_METADATA_FILE",
    "MAX_METADATA_BYTES",
]

DCP_METADATA_FILE = ".metadata"
MAX_METADATA_BYTES = 256 << 20  # a .metadata of millions of chunks is tens of MB

_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
# dtype names as torch spells them (torch.<name>); ours are the same names
_DTYPES = frozenset(ELEMENT_SIZES)
# _MEM_FORMAT_ENCODING values: TORCH_CONTIGUOUS_FORMAT, TORCH_CHANNELS_LAST, TORCH_PRESERVE_FORMAT
_MEMORY_FORMATS = (0, 1, 2)
_PATH_CLASSES = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path", "PurePath")


class DcpFormatError(CheckpointError, ValueError):
    """A DCP checkpoint's metadata or records are not what zero-ckpt can read (the message says
    which file, which item and why)."""


# ----- the plain data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DcpChunk:
    """One saved chunk of a tensor: the block ``[offsets, offsets + sizes)`` of the full tensor,
    stored as a torch.save archive at bytes ``[byte_offset, byte_offset + byte_length)`` of
    ``file`` (relative to the checkpoint folder)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    byte_offset: int
    byte_length: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class DcpTensor:
    """A tensor of the flattened state dict: ``fqn`` (DCP's flattened key), full ``shape``,
    ``dtype`` (our names: ``"float32"``, ``"bfloat16"``, ...), its ``chunks`` in the metadata's
    order. ``requires_grad``, ``pin_memory`` and ``memory_format`` (0 contiguous, 1
    channels_last, 2 preserve) are kept from ``TensorProperties`` so they are written back."""

    fqn: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[DcpChunk, ...]
    requires_grad: bool = False
    pin_memory: bool = False
    memory_format: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ELEMENT_SIZES[self.dtype]


@dataclass(frozen=True)
class DcpBytes:
    """A non-tensor item (a pickled Python object, saved with torch.save) at bytes
    ``[byte_offset, byte_offset + byte_length)`` of ``file``."""

    fqn: str
    file: str
    byte_offset: int
    byte_length: int


@dataclass(frozen=True)
class DcpStorageMeta:
    """``Metadata.storage_meta``: ``checkpoint_id`` as a string (``checkpoint_id_is_path``: it
    was a ``pathlib`` path), ``save_id``, ``load_id``, ``modules``."""

    checkpoint_id: str | None = None
    save_id: str | None = None
    load_id: str | None = None
    modules: tuple[str, ...] = ()
    checkpoint_id_is_path: bool = False


@dataclass
class DcpMetadata:
    """The content of a DCP ``.metadata``. ``planner_data``: flattened key -> path tuple of the
    nested state dict (``"optim.state.inp.weight.exp_avg" -> ("optim", "state", "inp.weight",
    "exp_avg")``); ``version``: DCP's format version (``"1.0.0"``), None in old checkpoints."""

    tensors: dict[str, DcpTensor]
    bytes_items: dict[str, DcpBytes]
    planner_data: dict = field(default_factory=dict)
    version: str | None = None
    storage_meta: DcpStorageMeta | None = None


# ----- reading -------------------------------------------------------------------------------------


class _Obj:
    """Stand-in for an instance of one of DCP's metadata classes: ``NEWOBJ`` then ``BUILD``."""

    _dcp_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Obj":
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "state", None)
        return obj

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)

    def __setattr__(self, name: str, value: Any) -> None:  # BUILD with a (state, slots) pair
        raise pickle.UnpicklingError(f"unexpected attribute {name!r} on {self._dcp_name}")


def _stand_in(name: str) -> type:
    return type(f"Dcp[{name}]", (_Obj,), {"_dcp_name": name})


_CLASSES = {
    (_MD, n): _stand_in(n)
    for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
              "BytesStorageMetadata", "MetadataIndex", "StorageMeta")
}
_CLASSES[(_FS, "_StorageInfo")] = _stand_in("_StorageInfo")
_KIND = {cls: name for (_, name), cls in _CLASSES.items()}


class _Dtype(str):
    """``torch.<dtype>``, kept as its name."""


class _Layout(str):
    """``torch.serialization._get_layout(name)``, kept as the name."""


class _MemFormat(int):
    """``_MEM_FORMAT_ENCODING(value)``."""


class _PathStr(str):
    """A ``pathlib`` path, kept as its string."""


def _torch_size(*args: Any) -> tuple:
    dims = tuple(args[0]) if len(args) == 1 else args
    if any(type(d) is not int or d < 0 for d in dims):
        raise pickle.UnpicklingError(f"torch.Size{dims!r:.80} holds something other than sizes")
    return dims


def _get_layout(name: Any) -> _Layout:
    if not isinstance(name, str):
        raise pickle.UnpicklingError("torch.serialization._get_layout takes a name")
    return _Layout(name)


def _mem_format(value: Any) -> _MemFormat:
    if type(value) is not int or value not in _MEMORY_FORMATS:
        raise pickle.UnpicklingError(f"unknown _MEM_FORMAT_ENCODING {value!r:.40}")
    return _MemFormat(value)


def _path(*parts: Any) -> _PathStr:
    if not all(isinstance(p, str) for p in parts):
        raise pickle.UnpicklingError("a pathlib path made of something other than strings")
    return _PathStr(posixpath.join(*parts) if parts else ".")


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, url: str) -> None:
        super().__init__(io.BytesIO(data))
        self._url = url

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        found = _CLASSES.get((module, name))
        if found is not None:
            return found
        if module == _MD and name == "_MEM_FORMAT_ENCODING":
            return _mem_format
        if module == "torch":
            if name == "Size":
                return _torch_size
            if name in _DTYPES:
                return _Dtype(name)
        if module == "torch.serialization" and name == "_get_layout":
            return _get_layout
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "pathlib" and name in _PATH_CLASSES:
            return _path
        raise DcpFormatError(
            f"{self._url}: the pickle asks for {module}.{name}, which is not part of a DCP "
            "checkpoint's metadata; the file is refused and nothing from it was run (it is "
            "damaged, from an unsupported torch version, or malicious)",
            path=self._url,
        )

    def persistent_load(self, pid: Any) -> Any:  # noqa: D401 - pickle API
        raise pickle.UnpicklingError("a DCP .metadata has no persistent ids")


class _Parser:
    def __init__(self, url: str) -> None:
        self.url = url

    def error(self, message: str) -> DcpFormatError:
        return DcpFormatError(f"{self.url}: {message}", path=self.url)

    def obj(self, value: Any, kind: str, what: str) -> _Obj:
        if not isinstance(value, _Obj) or value._dcp_name != kind:
            got = value._dcp_name if isinstance(value, _Obj) else type(value).__name__
            raise self.error(f"{what} should be a {kind}, found {got}")
        return value

    def fields(self, value: Any, kind: str, what: str, required: tuple[str, ...],
               optional: tuple[str, ...] = ()) -> dict:
        obj = self.obj(value, kind, what)
        state = obj.state
        if state is None:
            state = {}
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (dict state, slot state)
        if not isinstance(state, dict):
            raise self.error(f"{what} ({kind}) has a state of type {type(state).__name__}, not its fields")
        missing = [k for k in required if k not in state]
        unknown = [k for k in state if k not in required and k not in optional]
        if missing or unknown:
            raise self.error(
                f"{what} ({kind}) lacks fields {missing} or has unknown fields {unknown[:5]}; "
                "written by an unsupported torch version?"
            )
        return state

    def size(self, value: Any, what: str) -> tuple[int, ...]:
        if not isinstance(value, tuple) or any(type(d) is not int or d < 0 for d in value):
            raise self.error(f"{what} should be a torch.Size, found {value!r:.80}")
        return value

    def nonneg(self, value: Any, what: str) -> int:
        if type(value) is not int or value < 0:
            raise self.error(f"{what} should be a non-negative integer, found {value!r:.40}")
        return value

    def rel_path(self, value: Any, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(f"{what} should be a file name, found {value!r:.80}")
        norm = posixpath.normpath(value)
        if (value.startswith("/") or "\\" in value or norm.startswith("..") or norm != value
                or any(ord(c) < 32 for c in value)):
            raise self.error(
                f"{what} names {value!r:.120}, which is not a plain file inside the checkpoint "
                "folder; refused (damaged or hostile)"
            )
        return value

    def properties(self, value: Any, fqn: str) -> tuple[str, bool, bool, int]:
        obj = self.obj(value, "TensorProperties", f"{fqn}'s properties")
        state = obj.state
        if not isinstance(state, tuple) or len(state) != 5:
            raise self.error(f"{fqn}'s TensorProperties has an unexpected state {state!r:.120}")
        dtype, layout, requires_grad, mem, pin = state
        if not isinstance(dtype, _Dtype):
            raise self.error(f"{fqn} has dtype {dtype!r:.40}, which zero-ckpt does not read")
        if not isinstance(layout, _Layout) or layout != "torch.strided":
            raise self.error(
                f"{fqn} has layout {layout!s:.40}; only dense (torch.strided) tensors are read"
            )
        if type(requires_grad) is not bool or type(pin) is not bool or not isinstance(mem, _MemFormat):
            raise self.error(f"{fqn}'s TensorProperties has an unexpected state {state!r:.120}")
        return str(dtype), requires_grad, pin, int(mem)

    def storage_info(self, value: Any, what: str) -> tuple[str, int, int]:
        state = self.fields(value, "_StorageInfo", what, ("relative_path", "offset", "length"),
                            ("transform_descriptors",))
        transforms = state.get("transform_descriptors")
        if transforms:
            raise self.error(
                f"{what} is stored through transforms {list(transforms)!r:.120} (compression or "
                "another DCP extension); zero-ckpt reads only plain records: save without "
                "_extensions"
            )
        return (
            self.rel_path(state["relative_path"], f"{what}'s file"),
            self.nonneg(state["offset"], f"{what}'s byte offset"),
            self.nonneg(state["length"], f"{what}'s byte length"),
        )


def read_dcp_metadata(data: bytes, url: str) -> DcpMetadata:
    """Parse a DCP ``.metadata`` (``data``, the file's bytes; ``url`` names it in errors).

    Raises :class:`DcpFormatError` for a global that is not part of DCP's metadata (nothing is
    imported or called), a malformed pickle, a chunk without its storage entry (or an entry
    without its chunk), a chunk outside its tensor, a record path leaving the folder, and
    records written through transforms (compression, other extensions).
    """
    if len(data) > MAX_METADATA_BYTES:
        raise DcpFormatError(
            f"{url}: is {len(data)} bytes, more than the {MAX_METADATA_BYTES} a DCP .metadata "
            "can be; damaged or hostile",
            path=url,
        )
    try:
        check_pickle(data, url)
        root = _Unpickler(data, url).load()
    except CheckpointError as exc:
        if isinstance(exc, DcpFormatError):
            raise
        raise DcpFormatError(str(exc), path=url) from None
    except RecursionError:
        raise DcpFormatError(f"{url}: the pickled metadata is nested too deeply (damaged or hostile)",
                             path=url) from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
            KeyError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise DcpFormatError(
            f"{url}: cannot read the pickled DCP metadata ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); the file is damaged or not a DCP .metadata",
            path=url,
        ) from None
    return _convert(root, _Parser(url))


def _convert(root: Any, p: _Parser) -> DcpMetadata:
    top = p.fields(root, "Metadata", "the metadata", ("state_dict_metadata",),
                   ("planner_data", "storage_data", "storage_meta", "version"))
    sdm = top["state_dict_metadata"]
    if not isinstance(sdm, dict):
        raise p.error("state_dict_metadata is not a dict")
    version = top.get("version")
    if version is not None and not isinstance(version, str):
        raise p.error(f"version {version!r:.40} is not a string")
    planner = top.get("planner_data")
    planner_data: dict = {}
    if planner is not None:
        if not isinstance(planner, dict):
            raise p.error("planner_data is not a dict")
        for key, path in planner.items():
            if not isinstance(key, str) or not isinstance(path, tuple) or not all(
                isinstance(k, (str, int)) and not isinstance(k, bool) for k in path
            ):
                raise p.error(f"planner_data entry {key!r:.80} -> {path!r:.80} is not a key path")
            planner_data[key] = tuple(str(k) if isinstance(k, str) else k for k in path)

    # storage_data: (fqn, chunk offsets or None) -> (file, offset, length)
    storage = top.get("storage_data")
    if not isinstance(storage, dict):
        raise p.error("storage_data is missing or not a dict; was the save completed?")
    located: dict[tuple[str, tuple | None], tuple[str, int, int]] = {}
    for index, info in storage.items():
        fields = p.fields(index, "MetadataIndex", "a storage_data key", ("fqn",), ("offset", "index"))
        fqn = fields["fqn"]
        if not isinstance(fqn, str):
            raise p.error(f"storage_data key {fqn!r:.80} is not a name")
        offset = fields.get("offset")
        if offset is not None:
            offset = p.size(offset, f"{fqn}'s storage offset")
        key = (fqn, offset)
        if key in located:
            raise p.error(f"storage_data lists {fqn} at offsets {offset} twice")
        located[key] = p.storage_info(info, f"{fqn}'s record at {list(offset) if offset is not None else 'none'}")

    tensors: dict[str, DcpTensor] = {}
    bytes_items: dict[str, DcpBytes] = {}
    for fqn, md in sdm.items():
        if not isinstance(fqn, str):
            raise p.error(f"state_dict_metadata key {fqn!r:.80} is not a name")
        kind = md._dcp_name if isinstance(md, _Obj) else type(md).__name__
        if kind == "BytesStorageMetadata":
            p.fields(md, kind, fqn, ())
            where = located.pop((fqn, None), None)
            if where is None:
                raise p.error(f"{fqn} (a bytes item) has no storage_data entry: the checkpoint is incomplete")
            bytes_items[fqn] = DcpBytes(fqn, *where)
            continue
        if kind != "TensorStorageMetadata":
            raise p.error(f"{fqn} has metadata of kind {kind}, neither tensor nor bytes")
        state = p.fields(md, kind, fqn, ("properties", "size", "chunks"))
        dtype, requires_grad, pin, mem = p.properties(state["properties"], fqn)
        shape = p.size(state["size"], f"{fqn}'s size")
        raw_chunks = state["chunks"]
        if not isinstance(raw_chunks, list):
            raise p.error(f"{fqn}'s chunks are not a list")
        chunks = []
        covered = 0
        for i, raw in enumerate(raw_chunks):
            cf = p.fields(raw, "ChunkStorageMetadata", f"{fqn}'s chunk {i}", ("offsets", "sizes"))
            offsets = p.size(cf["offsets"], f"{fqn}'s chunk {i} offsets")
            sizes = p.size(cf["sizes"], f"{fqn}'s chunk {i} sizes")
            if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                o + s > d for o, s, d in zip(offsets, sizes, shape)
            ):
                raise p.error(
                    f"{fqn}'s chunk {i} at offsets {list(offsets)} of sizes {list(sizes)} does not "
                    f"fit its shape {list(shape)} (damaged)"
                )
            where = located.pop((fqn, offsets), None)
            if where is None:
                raise p.error(
                    f"{fqn}'s chunk at offsets {list(offsets)} has no storage_data entry: the "
                    "checkpoint is incomplete or damaged"
                )
            chunks.append(DcpChunk(offsets, sizes, *where))
            covered += math.prod(sizes)
        if covered > math.prod(shape):
            raise p.error(f"{fqn}'s chunks hold {covered} elements, more than its shape {list(shape)} has")
        tensors[fqn] = DcpTensor(fqn, shape, dtype, tuple(chunks), requires_grad, pin, mem)
    if located:
        (fqn, offset), _ = next(iter(located.items()))
        raise p.error(
            f"storage_data has {len(located)} records no item describes, e.g. {fqn} at offsets "
            f"{list(offset) if offset is not None else None} (damaged)"
        )
    return DcpMetadata(tensors, bytes_items, planner_data, version,
                       _storage_meta(top.get("storage_meta"), p))


def _storage_meta(value: Any, p: _Parser) -> DcpStorageMeta | None:
    if value is None:
        return None
    f = p.fields(value, "StorageMeta", "storage_meta", (), ("checkpoint_id", "save_id", "load_id", "modules"))
    cid = f.get("checkpoint_id")
    for name in ("checkpoint_id", "save_id", "load_id"):
        if f.get(name) is not None and not isinstance(f.get(name), str):
            raise p.error(f"storage_meta.{name} {f.get(name)!r:.60} is not a string")
    modules = f.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise p.error("storage_meta.modules is not a list of names")
    return DcpStorageMeta(
        None if cid is None else str(cid), f.get("save_id"), f.get("load_id"), tuple(modules),
        isinstance(cid, _PathStr),
    )


# ----- writing -------------------------------------------------------------------------------------


def _g(name: str, module: str = _MD) -> Global:
    return Global(module, name)


def _size(dims: tuple[int, ...]) -> Reduce:
    return Reduce(_g("Size", "torch"), (tuple(int(d) for d in dims),))


def write_dcp_metadata(meta: DcpMetadata) -> bytes:
    """The ``.metadata`` pickle (protocol 2) of ``meta``: ``pickle.load`` with torch installed
    gives a ``Metadata`` equal, field by field, to the one ``dcp.save`` writes for the same
    checkpoint. Tensors are listed first, then bytes items; a chunk's ``MetadataIndex.index``
    is its position in its tensor's chunk list."""
    layout = Reduce(_g("_get_layout", "torch.serialization"), ("torch.strided",))
    mem_formats = {m: Reduce(_g("_MEM_FORMAT_ENCODING"), (m,)) for m in _MEMORY_FORMATS}
    sdm: dict[str, Any] = {}
    storage: dict[Any, Any] = {}

    def info(file: str, offset: int, length: int) -> NewObj:
        return NewObj(_g("_StorageInfo", _FS), {"relative_path": file, "offset": int(offset), "length": int(length)})

    for fqn, t in meta.tensors.items():
        if t.dtype not in _DTYPES:
            raise DcpFormatError(f"{fqn}: dtype {t.dtype!r} cannot be written to a DCP checkpoint")
        props = NewObj(_g("TensorProperties"), (
            Global("torch", t.dtype), layout, bool(t.requires_grad), mem_formats[t.memory_format], bool(t.pin_memory),
        ))
        chunks = []
        for i, c in enumerate(t.chunks):
            chunks.append(NewObj(_g("ChunkStorageMetadata"), {"offsets": _size(c.offsets), "sizes": _size(c.sizes)}))
            index = NewObj(_g("MetadataIndex"), {"fqn": fqn, "offset": _size(c.offsets), "index": i})
            storage[index] = info(c.file, c.byte_offset, c.byte_length)
        sdm[fqn] = NewObj(_g("TensorStorageMetadata"), {"properties": props, "size": _size(t.shape), "chunks": chunks})
    for fqn, b in meta.bytes_items.items():
        if fqn in sdm:
            raise DcpFormatError(f"{fqn} is both a tensor and a bytes item")
        sdm[fqn] = NewObj(_g("BytesStorageMetadata"))
        storage[NewObj(_g("MetadataIndex"), {"fqn": fqn, "offset": None, "index": None})] = info(
            b.file, b.byte_offset, b.byte_length
        )
    sm = meta.storage_meta
    storage_meta = None
    if sm is not None:
        cid: Any = sm.checkpoint_id
        if cid is not None and sm.checkpoint_id_is_path:
            cid = Reduce(Global("pathlib", "PosixPath"), (cid,))
        storage_meta = NewObj(_g("StorageMeta"), {
            "checkpoint_id": cid, "save_id": sm.save_id, "load_id": sm.load_id, "modules": list(sm.modules),
        })
    top = NewObj(_g("Metadata"), {
        "state_dict_metadata": sdm,
        "planner_data": dict(meta.planner_data),
        "storage_data": storage,
        "storage_meta": storage_meta,
        "version": meta.version,
    })
    return dumps(top)
