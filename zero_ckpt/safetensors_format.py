"""The safetensors container, as bytes: header building and parsing, dtype names (no I/O).

Why not the ``safetensors`` package here: it reads and writes whole files from memory, while
the executors must write a file as a stream of ranges and read only the byte ranges they need
(possibly from object storage). The format is small and exactly specified: an 8-byte
little-endian header length ``N``, ``N`` bytes of JSON (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, offsets relative to the data
section), then the data. Files written here load with ``safetensors.safe_open`` (tested).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from zero_ckpt.errors import CorruptShardError

__all__ = [
    "DTYPE_SIZES",
    "TensorEntry",
    "SafetensorsHeader",
    "dtype_size",
    "to_safetensors_dtype",
    "from_safetensors_dtype",
    "build_header",
    "parse_header",
    "header_length",
    "MAX_HEADER_BYTES",
]

# Our dtype names are torch's without the "torch." prefix.
_TO_ST = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
_FROM_ST = {v: k for k, v in _TO_ST.items()}

DTYPE_SIZES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

# safetensors itself refuses headers above 100 MB; so do we, before allocating (and a header
# is never read past the end of its file: see Location.read_range).
MAX_HEADER_BYTES = 100_000_000
# Tensor names are printable: C0, DEL and C1 controls (terminal escape sequences) are refused.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def dtype_size(dtype: str) -> int:
    """Bytes per element of a dtype name (``"bfloat16"`` -> 2)."""
    try:
        return DTYPE_SIZES[dtype]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype!r}; supported: {', '.join(sorted(DTYPE_SIZES))}"
        ) from None


def to_safetensors_dtype(dtype: str) -> str:
    dtype_size(dtype)
    return _TO_ST[dtype]


def from_safetensors_dtype(code: str) -> str:
    try:
        return _FROM_ST[code]
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {code!r}") from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; ``start``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed (or planned) header: where each tensor's bytes are, and the file's total size."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_bytes: int


def build_header(
    tensors: Iterable[tuple[str, str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, SafetensorsHeader]:
    """Lay out ``(name, dtype, shape)`` tensors in the given order, without gaps.

    Returns the bytes to write first (length prefix + JSON, space-padded to 8 bytes as
    safetensors does) and the resulting header with absolute offsets.
    """
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    cursor = 0
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in tensors:
        if name in doc or name == "__metadata__":
            raise ValueError(f"duplicate tensor name {name!r} in one safetensors file")
        shape = tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * dtype_size(dtype)
        doc[name] = {
            "dtype": to_safetensors_dtype(dtype),
            "shape": list(shape),
            "data_offsets": [cursor, cursor + nbytes],
        }
        entries.append((name, dtype, shape, cursor, cursor + nbytes))
        cursor += nbytes
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    prefix = struct.pack("<Q", len(body)) + body
    data_start = len(prefix)
    header = SafetensorsHeader(
        {n: TensorEntry(n, d, s, data_start + a, data_start + b) for n, d, s, a, b in entries},
        dict(doc.get("__metadata__", {})),  # type: ignore[arg-type]
        data_start,
        data_start + cursor,
    )
    return prefix, header


def header_length(first8: bytes, path: str) -> int:
    """Length of the JSON header from a file's first 8 bytes; refuses absurd values."""
    if len(first8) < 8:
        raise CorruptShardError(
            f"{path}: file is {len(first8)} bytes, too short to be safetensors (truncated?)",
            path=path,
        )
    (n,) = struct.unpack("<Q", first8[:8])
    if n > MAX_HEADER_BYTES:
        raise CorruptShardError(
            f"{path}: header length {n} is not plausible; the file is not safetensors or is "
            "corrupted",
            path=path,
        )
    return n


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a safetensors header")


def parse_header(prefix: bytes, path: str, file_bytes: int | None = None) -> SafetensorsHeader:
    """Parse ``prefix`` = the first ``8 + N`` bytes of a safetensors file.

    Checks what a reader relies on: JSON validity, known dtypes, ``data_offsets`` that match
    shape x dtype and stay inside the file (when ``file_bytes`` is given). Errors name ``path``.
    """
    n = header_length(prefix[:8], path)
    if len(prefix) < 8 + n:
        raise CorruptShardError(
            f"{path}: header says {n} bytes but only {len(prefix) - 8} are there (truncated?)",
            path=path,
        )
    try:
        doc = json.loads(prefix[8 : 8 + n], parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptShardError(f"{path}: header is not valid JSON ({str(exc)[:200]})", path=path) from None
    except RecursionError:
        raise CorruptShardError(f"{path}: header is JSON nested too deeply (damaged or hostile)", path=path) from None
    if not isinstance(doc, dict):
        raise CorruptShardError(f"{path}: header is not a JSON object", path=path)
    data_start = 8 + n
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or any(
        not isinstance(k, str) or not isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptShardError(f"{path}: __metadata__ must map strings to strings", path=path)
    tensors: dict[str, TensorEntry] = {}
    data_end = data_start
    for name, info in doc.items():
        if _CONTROL.search(name):
            raise CorruptShardError(
                f"{path}: tensor name {ascii(name)[:80]} holds a control character (damaged or hostile)",
                path=path,
            )
        try:
            dtype = from_safetensors_dtype(info["dtype"])
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            ints = (*shape, begin, end)
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in ints):
                raise ValueError("shape and data_offsets must be non-negative integers")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptShardError(
                f"{path}: tensor {name!r} has a malformed header entry ({exc})", path=path
            ) from None
        if end - begin != math.prod(shape) * dtype_size(dtype):
            raise CorruptShardError(
                f"{path}: tensor {name!r} spans bytes [{begin}, {end}) which does not match "
                f"shape {list(shape)} of {dtype}",
                path=path,
            )
        entry = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
        tensors[name] = entry
        data_end = max(data_end, entry.end)
    # Tensors must tile the data section without gaps or overlaps, as safetensors requires.
    cursor = data_start
    for entry in sorted(tensors.values(), key=lambda e: (e.start, e.end)):
        if entry.start != cursor:
            raise CorruptShardError(
                f"{path}: tensor {entry.name!r} starts at byte {entry.start}, expected {cursor}: "
                "tensors overlap or leave a gap",
                path=path,
            )
        cursor = entry.end
    if file_bytes is not None and data_end > file_bytes:
        raise CorruptShardError(
            f"{path}: header needs {data_end} bytes but the file has {file_bytes} (truncated?)",
            path=path,
            expected=data_end,
            actual=file_bytes,
        )
    return SafetensorsHeader(tensors, dict(metadata), data_start, data_end)
