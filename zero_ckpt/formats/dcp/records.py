"""DCP storage records, byte range by byte range: locate, decode and encode them (no torch).

In a DCP checkpoint saved with ``FileSystemWriter`` (``SerializationFormat.TORCH_SAVE``), a
``.distcp`` file is a concatenation of records, each a complete ``torch.save`` zip archive
(archive folder ``archive/``) at the byte range the ``.metadata`` gives for it:

- a tensor chunk's record holds one tensor; DCP clones a chunk whose storage is larger than the
  chunk before saving it, so the tensor covers its whole storage, contiguously, from element 0.
  :func:`locate_tensor_record` finds the absolute byte range of its elements in the ``.distcp``
  (zip directory and pickle only: the data is never read).
- a BYTES item's record holds a pickled Python object (``param_groups`` values, ints, lists of
  names...); :func:`read_bytes_item` rebuilds it with torch_zip's restricted unpickler.

For writing, :func:`encode_tensor_record` gives the bytes of a tensor record before and after
its data (the data is streamed in between, its CRC-32 goes into the data descriptor and the
central directory after it), and :func:`encode_bytes_item` the whole record of a small Python
object. Both load with ``torch.load`` (``weights_only=True``) exactly as DCP's own records do.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from zero_ckpt.errors import CorruptShardError
from zero_ckpt.formats.dcp._pickling import Global, PersistentId, Reduce, dumps
from zero_ckpt.formats.dcp.metadata import DcpFormatError
from zero_ckpt.formats.torch_zip import (
    ELEMENT_SIZES,
    STORAGE_DTYPES,
    ZIP64_LIMIT,
    TensorRef,
    open_torch_zip,
    zip_central,
    zip_descriptor,
    zip_end_records,
    zip_local_header,
)
from zero_ckpt.storage import Location

__all__ = [
    "locate_tensor_record",
    "read_bytes_item",
    "TensorRecordLayout",
    "encode_tensor_record",
    "tensor_record_bytes",
    "encode_bytes_item",
    "RECORD_ARCHIVE",
]

RECORD_ARCHIVE = "archive"  # torch.save's folder name when it writes to a stream (as DCP does)
# the largest BYTES item read whole (DCP's are param_group values: bytes to kilobytes)
MAX_BYTES_ITEM = 64 << 20


# ----- reading -------------------------------------------------------------------------------------


class _SliceLocation:
    """The bytes ``[base, base + length)`` of ``loc/rel`` seen as a whole file (what
    :func:`open_torch_zip` needs of a :class:`Location`: size, ranged reads, a name)."""

    def __init__(self, loc: Location, rel: str, base: int, length: int) -> None:
        self.loc, self.rel, self.base, self.length = loc, rel, base, length

    def url_of(self, rel: str) -> str:
        return f"{self.loc.url_of(rel)} (record at bytes {self.base}-{self.base + self.length})"

    def size(self, rel: str) -> int:
        return self.length

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        start = max(0, start)
        end = min(end, self.length)
        if end <= start:
            return b""
        return self.loc.read_range(rel, self.base + start, self.base + end)

    def read_into(self, rel: str, offset: int, view: memoryview) -> None:
        if offset < 0 or offset + len(view) > self.length:
            url = self.url_of(rel)
            raise CorruptShardError(
                f"{url}: bytes up to {offset + len(view)} of the record are needed but it has "
                f"{self.length} (damaged)",
                path=url,
            )
        self.loc.read_into(rel, self.base + offset, view)


def _open_record(loc: Location, rel: str, byte_offset: int, byte_length: int, what: str):
    size = loc.size(rel)
    url = loc.url_of(rel)
    if byte_offset < 0 or byte_length < 0 or byte_offset + byte_length > size:
        raise DcpFormatError(
            f"{url}: {what}'s record is at bytes [{byte_offset}, {byte_offset + byte_length}) but "
            f"the file has {size} bytes: truncated, or the .metadata belongs to another save",
            path=url,
        )
    view = _SliceLocation(loc, rel, byte_offset, byte_length)
    return open_torch_zip(view, rel)  # type: ignore[arg-type]


def locate_tensor_record(
    loc: Location,
    rel: str,
    byte_offset: int,
    byte_length: int,
    expect_dtype: str,
    expect_numel: int,
    expect_shape: tuple[int, ...] | None = None,
    what: str = "chunk",
    crc_out: list[int] | None = None,
) -> tuple[int, int]:
    """``(absolute byte offset in loc/rel, nbytes)`` of the elements of the one tensor stored
    in the torch.save record at ``[byte_offset, byte_offset + byte_length)`` of ``loc/rel``.

    The tensor must have ``expect_dtype`` (our dtype names) and ``expect_numel`` elements (and
    ``expect_shape`` when given) and cover its whole storage contiguously from element 0 (how
    DCP saves a chunk); otherwise :class:`DcpFormatError` naming the file and ``what``. Only the
    record's zip directory and pickle are read. ``crc_out`` (a list) receives the zlib CRC-32
    the record's zip directory holds for those bytes (they are the whole record entry)."""
    zf = _open_record(loc, rel, byte_offset, byte_length, what)
    obj = zf.load()
    url = zf.url

    def refuse(message: str) -> DcpFormatError:
        return DcpFormatError(f"{url}: {what}: {message}", path=url)

    if not isinstance(obj, TensorRef):
        raise refuse(f"the record holds a {type(obj).__name__}, not a tensor")
    if obj.dtype != expect_dtype:
        raise refuse(f"the record's tensor is {obj.dtype}, the metadata says {expect_dtype}")
    if obj.numel != expect_numel or (expect_shape is not None and tuple(obj.shape) != tuple(expect_shape)):
        raise refuse(
            f"the record's tensor has shape {list(obj.shape)}, the metadata says "
            f"{list(expect_shape) if expect_shape is not None else f'{expect_numel} elements'}"
        )
    storage_elements = obj.storage.nbytes // obj.itemsize if obj.itemsize else 0
    if (obj.offset != 0 or not obj.is_contiguous() or storage_elements != obj.numel
            or obj.storage.nbytes != obj.nbytes):
        raise refuse(
            f"the tensor (shape {list(obj.shape)}, stride {list(obj.stride)}, storage offset "
            f"{obj.offset}) does not cover its storage of {obj.storage.nbytes} bytes "
            "contiguously; DCP saves chunks that do, so the record is not one zero-ckpt reads"
        )
    start, nbytes = zf.tensor_range(obj, what)
    if crc_out is not None:
        crc_out.append(zf.storage_crc(obj.storage))
    return byte_offset + start, nbytes


def read_bytes_item(loc: Location, rel: str, byte_offset: int, byte_length: int, what: str = "item") -> Any:
    """The Python object of the BYTES item stored at ``[byte_offset, byte_offset +
    byte_length)`` of ``loc/rel``, rebuilt by :func:`~zero_ckpt.formats.torch_zip.restricted_load`
    (nothing in it is run; objects of other classes come back as inert ``Unknown`` records)."""
    if byte_length > MAX_BYTES_ITEM:
        url = loc.url_of(rel)
        raise DcpFormatError(
            f"{url}: {what} is a {byte_length}-byte object, more than the {MAX_BYTES_ITEM} zero-ckpt "
            "reads whole; damaged or not a DCP checkpoint",
            path=url,
        )
    return _open_record(loc, rel, byte_offset, byte_length, what).load()


# ----- writing -------------------------------------------------------------------------------------


_TYPED_STORAGE = {dtype: name for name, dtype in STORAGE_DTYPES.items() if name != "UntypedStorage"}


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


def _serialization_id(seed: int) -> bytes:
    # torch draws a random 40-digit id per file; one derived from the content keeps output reproducible
    return str(int.from_bytes((seed & 0xFFFFFFFF).to_bytes(4, "little") * 5, "little"))[:40].rjust(40, "0").encode()


def _name(record: str) -> bytes:
    return f"{RECORD_ARCHIVE}/{record}".encode()


_HEAD_RECORDS = ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"))


def _emit_records(out: bytearray, offset: int, records: list[tuple[str, bytes]],
                  central: list[tuple[bytes, int, int, int]]) -> int:
    """Append complete records (local header, data, descriptor) to ``out``, the first at byte
    ``offset`` of the archive; note each for the central directory; return the next offset."""
    for record, data in records:
        name = _name(record)
        zip64 = len(data) >= ZIP64_LIMIT
        head = zip_local_header(name, offset, zip64)
        crc = zlib.crc32(data)
        out += head
        out += data
        out += zip_descriptor(crc, len(data), zip64)
        central.append((name, crc, len(data), offset))
        offset += len(head) + len(data) + len(zip_descriptor(crc, len(data), zip64))
    return offset


def _finish(out: bytearray, offset: int, central: list[tuple[bytes, int, int, int]]) -> None:
    cd = b"".join(zip_central(*entry) for entry in central)
    out += cd
    out += zip_end_records(len(central), offset, len(cd))


@dataclass(frozen=True)
class TensorRecordLayout:
    """A torch.save record of one contiguous tensor, around its streamed data.

    Write ``prefix``, then the tensor's ``data_nbytes`` bytes (little-endian, C order), then
    ``suffix(crc)`` with ``crc`` the ``zlib.crc32`` of those bytes. ``total_bytes`` (the
    record's size, the ``_StorageInfo.length`` DCP records) is known before anything is written;
    the data starts at byte ``len(prefix)`` of the record."""

    dtype: str
    shape: tuple[int, ...]
    prefix: bytes
    data_nbytes: int
    total_bytes: int
    _pickle_crc: int
    _head: tuple[tuple[bytes, int, int, int], ...]  # central directory notes of the records before

    @property
    def data_offset(self) -> int:
        return len(self.prefix)

    def suffix(self, crc: int) -> bytes:
        """The bytes after the data: its data descriptor, the trailing records, the central
        directory and the end records."""
        zip64 = self.data_nbytes >= ZIP64_LIMIT
        out = bytearray(zip_descriptor(crc, self.data_nbytes, zip64))
        central = list(self._head)
        name, _, _, head_at = central.pop()  # data/0, noted with its local header's offset
        central.append((name, crc, self.data_nbytes, head_at))
        offset = len(self.prefix) + self.data_nbytes + len(out)
        ident = _serialization_id(zlib.crc32(crc.to_bytes(4, "little"), self._pickle_crc))
        offset = _emit_records(out, offset, [("version", b"3\n"), (".data/serialization_id", ident)], central)
        _finish(out, offset, central)
        return bytes(out)


def _tensor_pickle(dtype: str, shape: tuple[int, ...], numel: int) -> bytes:
    nbytes = numel * ELEMENT_SIZES[dtype]
    stride = _contiguous_stride(shape)
    hooks = Reduce(Global("collections", "OrderedDict"), ())
    typed = _TYPED_STORAGE.get(dtype)
    if typed is not None:  # what torch.save writes for dtypes with a typed storage class
        pid = PersistentId(("storage", Global("torch", typed), "0", "cpu", numel))
        call = Reduce(Global("torch._utils", "_rebuild_tensor_v2"), (pid, 0, shape, stride, False, hooks))
    else:  # and for the others (float8, uint16, ...): an untyped storage and the dtype
        pid = PersistentId(("storage", Global("torch.storage", "UntypedStorage"), "0", "cpu", nbytes))
        call = Reduce(Global("torch._utils", "_rebuild_tensor_v3"),
                      (pid, 0, shape, stride, False, hooks, Global("torch", dtype)))
    return dumps(call)


def encode_tensor_record(dtype: str, shape: tuple[int, ...]) -> TensorRecordLayout:
    """The record layout of a contiguous tensor of ``dtype`` (our names) and ``shape``, as
    ``torch.save(tensor, stream)`` writes it (one storage, key ``"0"``, offset 0)."""
    if dtype not in ELEMENT_SIZES:
        raise DcpFormatError(f"cannot write a tensor of dtype {dtype!r}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise DcpFormatError(f"cannot write a tensor of shape {list(shape)}")
    numel = math.prod(shape)
    nbytes = numel * ELEMENT_SIZES[dtype]
    payload = _tensor_pickle(dtype, shape, numel)
    out = bytearray()
    central: list[tuple[bytes, int, int, int]] = []
    offset = _emit_records(out, 0, [("data.pkl", payload), *_HEAD_RECORDS], central)
    central.append((_name("data/0"), 0, nbytes, offset))
    out += zip_local_header(_name("data/0"), offset, nbytes >= ZIP64_LIMIT)
    prefix = bytes(out)
    layout = TensorRecordLayout(dtype, shape, prefix, nbytes, 0, zlib.crc32(payload), tuple(central))
    total = len(prefix) + nbytes + len(layout.suffix(0))
    return TensorRecordLayout(dtype, shape, prefix, nbytes, total, zlib.crc32(payload), tuple(central))


def tensor_record_bytes(dtype: str, shape: tuple[int, ...], data: bytes | bytearray | memoryview) -> bytes:
    """The whole record of a (small) tensor whose raw little-endian bytes are ``data``."""
    layout = encode_tensor_record(dtype, shape)
    if len(data) != layout.data_nbytes:
        raise DcpFormatError(
            f"a {dtype} tensor of shape {list(shape)} has {layout.data_nbytes} bytes, got {len(data)}"
        )
    return layout.prefix + bytes(data) + layout.suffix(zlib.crc32(data))


_PLAIN = (str, int, float, bool, bytes, type(None))


def _check_plain(obj: Any, depth: int = 0) -> None:
    if depth > 50:
        raise DcpFormatError("a bytes item nested more than 50 levels deep")
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, depth + 1)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
        return
    raise DcpFormatError(
        f"a bytes item holds a {type(obj).__name__}; zero-ckpt writes only plain data (dict, "
        "list, tuple, str, int, float, bool, bytes, None)"
    )


def encode_bytes_item(obj: Any) -> bytes:
    """The torch.save record of a plain Python object (dicts, lists, tuples, str, int, float,
    bool, bytes, None), as DCP writes a BYTES item; ``torch.load`` (also with
    ``weights_only=True``) and :func:`read_bytes_item` give ``obj`` back."""
    _check_plain(obj)
    if isinstance(obj, OrderedDict):
        obj = dict(obj)
    payload = dumps(obj)
    out = bytearray()
    central: list[tuple[bytes, int, int, int]] = []
    records = [("data.pkl", payload), *_HEAD_RECORDS, ("version", b"3\n"),
               (".data/serialization_id", _serialization_id(zlib.crc32(payload)))]
    offset = _emit_records(out, 0, records, central)
    _finish(out, offset, central)
    return bytes(out)
