"""Format v1 metadata: dataclasses, strict JSON (de)serialisation and validation (no I/O).

A checkpoint directory holds ``manifest.json`` (this module), one safetensors shard per
data-parallel rank (``shards/rank-00000-of-00008.safetensors``) holding 1-D tensors
``g{group}.{key}`` (``key`` = ``master`` or a state such as ``exp_avg``) of that rank's real
elements, and optionally ``model.safetensors`` (buffers, frozen params). See DESIGN.md.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from zero_core.layout import MAX_WORLD_SIZE, GroupLayout, ParamSpec, check_world_size, compute_partition_numel
from zero_ckpt.checksum import crc32c, format_checksum, parse_checksum
from zero_ckpt.errors import LayoutMismatchError, ManifestError, Problem, raise_problems
from zero_ckpt.safetensors_format import DTYPE_SIZES

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODEL_FILE_NAME",
    "ParamMeta",
    "GroupMeta",
    "FileMeta",
    "Manifest",
    "shard_path",
    "tensor_name",
    "check_manifest",
    "check_target_world_size",
    "manifest_bytes",
    "MAX_MANIFEST_BYTES",
    "MAX_JSON_DEPTH",
    "CHECKSUM_FIELD",
]

FORMAT_NAME = "zero-ckpt"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_FILE_NAME = "model.safetensors"
MASTER_KEY = "master"
_FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}

# Caps checked before memory is spent on an untrusted manifest: its size (a manifest of 1e6
# params with long names is tens of MB) and the nesting of its JSON (format v1 needs 6 levels;
# user ``extra`` gets the rest).
MAX_MANIFEST_BYTES = 256 << 20
MAX_JSON_DEPTH = 64

# The manifest's own checksum. ``to_json`` ends the document with this field, written exactly
# as ``,\n "manifest_checksum": "crc32c:<8 hex>"\n}\n``; its value is the CRC32C of every byte
# before that suffix. So every byte of the file is covered: the prefix by the CRC (which
# catches every burst of up to 32 flipped bits), the suffix by an exact match. Manifests
# written before the field existed have no suffix and are read as before.
CHECKSUM_FIELD = "manifest_checksum"
_CHECKSUM_SUFFIX = re.compile(rb',\n "manifest_checksum": "crc32c:([0-9a-f]{8})"\n\}\n\Z')
# C0 controls, DEL and C1 controls: never in a name (an ESC sequence in a name printed by
# ``inspect`` would drive the user's terminal).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def check_target_world_size(world_size: object, what: str = "target world size") -> int:
    """``world_size`` if it is an int in ``[1, MAX_WORLD_SIZE]``, else LayoutMismatchError
    naming it (call before allocating anything per rank)."""
    try:
        return check_world_size(world_size, what)
    except ValueError as exc:
        raise LayoutMismatchError(str(exc), actual=world_size) from None


def manifest_bytes(manifest: "Manifest") -> bytes:
    """The bytes of ``manifest.json`` for ``manifest``, ending in its own checksum: what every
    writer of a manifest stores (``Manifest.to_json().encode()`` is the same)."""
    return manifest.to_json().encode()


def shard_path(rank: int, world_size: int) -> str:
    """Relative path of a rank's shard: ``shards/rank-00003-of-00008.safetensors``.

    A world size above MAX_WORLD_SIZE is refused here too (LayoutMismatchError): planners
    name every rank's shard, so this is the last point before per-rank work."""
    if world_size > MAX_WORLD_SIZE:
        check_target_world_size(world_size)
    return f"shards/rank-{rank:05d}-of-{world_size:05d}.safetensors"


def tensor_name(group: int, key: str) -> str:
    """Name of a group's tensor inside a shard: ``g0.master``, ``g1.exp_avg``."""
    return f"g{group}.{key}"


@dataclass(frozen=True)
class ParamMeta:
    """A parameter of a group: model name, shape, model dtype, offset (elements) in the flat
    buffer. ``aliases`` are other names of the same tensor (tied weights), stored once."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GroupMeta:
    """One optimizer param group: its flat layout facts, hyperparameters and state keys.

    ``state_keys`` are the tensor states stored per element next to ``master`` (``exp_avg``,
    ...); ``state_dtypes`` gives a key's dtype where it differs from the master dtype.
    ``scalars`` holds per-group scalar state such as ``step``.
    """

    numel: int
    partition_numel: int
    align: int
    params: tuple[ParamMeta, ...]
    state_keys: tuple[str, ...] = ()
    hyperparams: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    state_dtypes: dict[str, str] = field(default_factory=dict)

    def layout(self, world_size: int) -> GroupLayout:
        """The group's layout cut for ``world_size`` ranks (any size, not only the saved one).

        Cached per world size: planners ask for it once per rank, and building it is linear in
        the number of params. (The cache lives outside the dataclass fields, so equality and
        ``replace`` ignore it.)"""
        cache = self.__dict__.setdefault("_layout_cache", {})
        layout = cache.get(world_size)
        if layout is None:
            check_target_world_size(world_size, "world size")
            specs = [ParamSpec(p.name, tuple(p.shape), p.dtype, p.offset) for p in self.params]
            layout = GroupLayout.from_specs(specs, world_size=world_size, align=self.align)
            cache[world_size] = layout
        return layout

    @property
    def keys(self) -> tuple[str, ...]:
        """Every tensor stored per element: ``master`` first, then the states."""
        return (MASTER_KEY, *self.state_keys)

    def dtype_of(self, key: str, master_dtype: str) -> str:
        return master_dtype if key == MASTER_KEY else self.state_dtypes.get(key, master_dtype)


@dataclass(frozen=True)
class FileMeta:
    """A file of the checkpoint: relative path, size in bytes, checksum ``crc32c:<hex>``.

    ``rank`` is set for shards. ``tensors`` maps each tensor of a shard to its own checksum,
    so a job that reads only some tensors (consolidate reads the masters) still verifies what
    it read; the file checksum is the combination of the header's and the tensors'.
    """

    path: str
    bytes: int
    checksum: str
    rank: int | None = None
    tensors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """Everything about a checkpoint except the tensor bytes. Serialises to manifest.json."""

    world_size: int
    zero_stage: int
    master_dtype: str
    groups: tuple[GroupMeta, ...]
    shards: tuple[FileMeta, ...]
    model_file: FileMeta | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    created_by: str = "zero-ckpt"
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    # ----- convenience ---------------------------------------------------------------------

    def layouts(self, world_size: int | None = None) -> list[GroupLayout]:
        ws = self.world_size if world_size is None else world_size
        return [g.layout(ws) for g in self.groups]

    def shard(self, rank: int) -> FileMeta:
        for s in self.shards:
            if s.rank == rank:
                return s
        raise KeyError(rank)

    def param_index(self) -> dict[str, tuple[int, int]]:
        """``name -> (group, param index)`` for every name, aliases included."""
        out: dict[str, tuple[int, int]] = {}
        for gi, g in enumerate(self.groups):
            for pi, p in enumerate(g.params):
                out[p.name] = (gi, pi)
                for alias in p.aliases:
                    out[alias] = (gi, pi)
        return out

    @property
    def total_numel(self) -> int:
        return sum(g.numel for g in self.groups)

    @property
    def shard_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def step(self) -> Any:
        """The first group's ``step`` scalar, if any (what ``inspect`` shows)."""
        for g in self.groups:
            if "step" in g.scalars:
                return g.scalars["step"]
        return None

    # ----- JSON ----------------------------------------------------------------------------

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": self.format,
            "version": self.version,
            "created_by": self.created_by,
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
            "master_dtype": self.master_dtype,
            "groups": [_group_to_dict(g) for g in self.groups],
            "shards": [_file_to_dict(s) for s in self.shards],
            "model_file": _file_to_dict(self.model_file) if self.model_file else None,
            "extra": self.extra,
        }
        body = json.dumps(doc, indent=1, allow_nan=False)
        # The document's last line is its own checksum (see CHECKSUM_FIELD).
        if not body.endswith("\n}"):
            raise ManifestError(f"the manifest of {self.world_size} ranks serialised to JSON that does not end "
                                "in '\\n}', where its checksum line goes (json.dumps changed its layout?)")
        prefix = body[:-2]
        crc = crc32c(prefix.encode())
        return f'{prefix},\n "{CHECKSUM_FIELD}": "{format_checksum(crc)}"\n}}\n'

    @classmethod
    def from_json(cls, text: str | bytes, path: str = MANIFEST_NAME) -> "Manifest":
        """Decode strictly: unknown format, major version or field -> ManifestError naming it.

        Refused before anything else: more than MAX_MANIFEST_BYTES, a ``manifest_checksum``
        that does not match the bytes, nesting deeper than MAX_JSON_DEPTH, non-finite
        numbers, control characters in names (C0, DEL, C1; tabs and newlines are allowed
        only in string values under ``extra``)."""
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{path}: is {len(data)} bytes, more than a manifest can be "
                f"({MAX_MANIFEST_BYTES}); it is damaged or not a zero-ckpt manifest",
                path=path,
            )
        checked = _verify_checksum(data, path)
        try:
            doc = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(
                f"{path}: not valid JSON ({str(exc)[:200]}); the manifest is damaged", path=path
            ) from None
        except RecursionError:  # the C parser stops at the interpreter's recursion limit
            raise _too_deep(path) from None
        if not isinstance(doc, dict):
            raise ManifestError(f"{path}: expected a JSON object", path=path)
        if checked:
            doc.pop(CHECKSUM_FIELD, None)
        elif CHECKSUM_FIELD in doc:
            _verify_reformatted(doc, path)
        _check_strings(doc, path)
        if doc.get("format") != FORMAT_NAME:
            raise ManifestError(
                f"{path}: format is {doc.get('format')!r}, not {FORMAT_NAME!r}; this is not a "
                "zero-ckpt manifest",
                path=path,
                actual=doc.get("format"),
            )
        version = doc.get("version")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
            raise ManifestError(
                f"{path}: format version {version!r} is not supported by this zero-ckpt (it reads "
                f"version {FORMAT_VERSION}); "
                + ("upgrade zero-ckpt to read it" if newer else "the manifest is damaged or not from zero-ckpt"),
                path=path,
                expected=FORMAT_VERSION,
                actual=version,
            )
        f = _Fields(doc, path, "manifest", _MANIFEST_KEYS)
        groups = tuple(_group_from_dict(g, path, i) for i, g in enumerate(f.list("groups")))
        shards = tuple(
            _file_from_dict(s, path, f"shards[{i}]") for i, s in enumerate(f.list("shards"))
        )
        model = doc.get("model_file")
        return cls(
            world_size=f.int("world_size"),
            zero_stage=f.int("zero_stage"),
            master_dtype=f.str("master_dtype"),
            groups=groups,
            shards=shards,
            model_file=_file_from_dict(model, path, "model_file") if model is not None else None,
            extra=f.dict("extra"),
            created_by=f.str("created_by", ""),
            format=doc["format"],
            version=version,
        )

    def validate(self, path: str = MANIFEST_NAME) -> "Manifest":
        """Raise ManifestError listing every problem :func:`check_manifest` finds; else self."""
        raise_problems(check_manifest(self, path))
        return self


_MANIFEST_KEYS = {
    "format", "version", "created_by", "world_size", "zero_stage", "master_dtype",
    "groups", "shards", "model_file", "extra", CHECKSUM_FIELD,
}
_GROUP_KEYS = {
    "numel", "partition_numel", "align", "params", "state_keys", "hyperparams", "scalars",
    "state_dtypes",
}
_PARAM_KEYS = {"name", "shape", "dtype", "offset", "aliases"}
_FILE_KEYS = {"path", "bytes", "checksum", "rank", "tensors"}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a manifest")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"number {text[:40]} is not finite; a manifest holds finite numbers only")
    return value


def _verify_checksum(data: bytes, path: str) -> bool:
    """Whether ``data`` carries its own checksum (verified: ManifestError on a mismatch)."""
    m = _CHECKSUM_SUFFIX.search(data)
    if m is None:
        return False
    actual = crc32c(data[: m.start()])
    if actual != int(m.group(1), 16):
        raise _mismatch(path, f"crc32c:{m.group(1).decode()}", actual)
    return True


def _mismatch(path: str, recorded: str, actual: int) -> ManifestError:
    return ManifestError(
        f"{path}: checksum mismatch (the content hashes to {format_checksum(actual)}, the "
        f"manifest records {recorded}): it changed after zero-ckpt wrote it; restore it from a "
        f"good copy (if you edited it on purpose, delete its {CHECKSUM_FIELD!r} field)",
        path=path,
        expected=recorded,
        actual=format_checksum(actual),
    )


def _verify_reformatted(doc: dict, path: str) -> None:
    """A manifest whose checksum field is not the exact last line zero-ckpt writes (a tool
    re-serialised it): its content is checked by writing it again as zero-ckpt does."""
    recorded = doc.pop(CHECKSUM_FIELD)
    if not isinstance(recorded, str) or not re.fullmatch(r"crc32c:[0-9a-f]{8}", recorded):
        raise ManifestError(
            f"{path}: {CHECKSUM_FIELD} is {str(recorded)[:40]!r}, not 'crc32c:<8 lowercase hex "
            "digits>'; the manifest is damaged",
            path=path,
        )
    try:
        body = json.dumps(doc, indent=1, allow_nan=False)
    except (TypeError, ValueError):
        body = ""
    actual = crc32c(body[:-2].encode())
    if actual != int(recorded[7:], 16):
        raise _mismatch(path, recorded, actual)


def _too_deep(path: str) -> ManifestError:
    return ManifestError(
        f"{path}: JSON nested more than {MAX_JSON_DEPTH} levels deep; the manifest is damaged "
        "or not from zero-ckpt",
        path=path,
    )


def _check_strings(doc: dict, path: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and control characters in every key and
    name (iteratively: no recursion; the location is worked out only for the message)."""
    # (node, depth, text allowed, parent path for messages)
    stack: list[tuple[Any, int, bool]] = [(v, 2, k == "extra") for k, v in doc.items()]
    for k in doc:
        if _CONTROL.search(k):
            raise _control_error(path, "manifest", k)
    while stack:
        node, depth, text_ok = stack.pop()
        if isinstance(node, str):
            if (_CONTROL_IN_TEXT if text_ok else _CONTROL).search(node):
                raise _control_error(path, _where(doc, node), node)
        elif isinstance(node, dict):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep(path)
            for k, v in node.items():
                if _CONTROL.search(k):
                    raise _control_error(path, _where(doc, k), k)
                if isinstance(v, (str, dict, list)):
                    stack.append((v, depth + 1, text_ok))
        elif isinstance(node, list):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep(path)
            stack.extend((v, depth + 1, text_ok) for v in node if isinstance(v, (str, dict, list)))


def _where(doc: dict, target: str) -> str:
    """The field path of the first occurrence of string ``target`` (as key or value)."""
    stack: list[tuple[Any, str, int]] = [(doc, "manifest", 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            continue
        if isinstance(node, dict):
            for k, v in node.items():
                if k is target or k == target:
                    return where
                stack.append((v, f"{where}.{k}", depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))
        elif node is target or node == target:
            return where
    return "manifest"


def _control_error(path: str, where: str, value: str) -> ManifestError:
    return ManifestError(
        f"{path}: {where} holds a control character ({ascii(value)[:80]}); names and values in "
        "a manifest must be printable text: the manifest is damaged or hostile",
        path=path,
    )


def _reject_unknown(doc: dict, allowed: set[str], path: str, where: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ManifestError(
            f"{path}: unknown field(s) {unknown} in {where}; it was written by a newer or "
            "different tool: upgrade zero-ckpt",
            path=path,
        )


def _group_to_dict(g: GroupMeta) -> dict[str, Any]:
    return {
        "numel": g.numel,
        "partition_numel": g.partition_numel,
        "align": g.align,
        "state_keys": list(g.state_keys),
        "state_dtypes": dict(g.state_dtypes),
        "hyperparams": g.hyperparams,
        "scalars": g.scalars,
        "params": [
            {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "offset": p.offset}
            | ({"aliases": list(p.aliases)} if p.aliases else {})
            for p in g.params
        ],
    }


class _Fields:
    """Typed access to one JSON object of the manifest; wrong types -> ManifestError naming
    the field (``groups[0].params[3].shape``), never a silent conversion."""

    def __init__(self, doc: Any, path: str, where: str, allowed: set[str]) -> None:
        if not isinstance(doc, dict):
            raise ManifestError(f"{path}: {where} must be a JSON object, got {type(doc).__name__}", path=path)
        _reject_unknown(doc, allowed, path, where)
        self.doc, self.path, self.where = doc, path, where

    def _fail(self, key: str, what: str) -> ManifestError:
        value = self.doc.get(key)
        return ManifestError(
            f"{self.path}: {self.where}.{key} must be {what}, got {value!r}; the manifest is damaged",
            path=self.path,
        )

    def has(self, key: str) -> bool:
        return self.doc.get(key) is not None

    def get(self, key: str) -> Any:
        if key not in self.doc:
            raise ManifestError(
                f"{self.path}: required field {key!r} is missing (in {self.where})", path=self.path
            )
        return self.doc[key]

    def int(self, key: str) -> int:
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._fail(key, "an integer")
        return v

    def str(self, key: str, default: str | None = None) -> str:
        v = self.doc.get(key, default) if default is not None else self.get(key)
        if not isinstance(v, str):
            raise self._fail(key, "a string")
        return v

    def list(self, key: str, default: list | None = None) -> list:
        v = self.doc.get(key, default) if default is not None else self.get(key)
        if not isinstance(v, list):
            raise self._fail(key, "a list")
        return v

    def ints(self, key: str) -> tuple[int, ...]:
        v = self.list(key)
        if any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise self._fail(key, "a list of integers")
        return tuple(v)

    def strs(self, key: str) -> tuple[str, ...]:
        v = self.list(key, [])
        if any(not isinstance(x, str) for x in v):
            raise self._fail(key, "a list of strings")
        return tuple(v)

    def dict(self, key: str, str_values: bool = False) -> dict[str, Any]:
        v = self.doc.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict) or (str_values and any(not isinstance(x, str) for x in v.values())):
            raise self._fail(key, "an object" + (" of strings" if str_values else ""))
        return dict(v)


def _group_from_dict(d: Any, path: str, index: int) -> GroupMeta:
    f = _Fields(d, path, f"groups[{index}]", _GROUP_KEYS)
    params = []
    for i, p in enumerate(f.list("params")):
        pf = _Fields(p, path, f"groups[{index}].params[{i}]", _PARAM_KEYS)
        params.append(
            ParamMeta(
                name=pf.str("name"),
                shape=pf.ints("shape"),
                dtype=pf.str("dtype"),
                offset=pf.int("offset"),
                aliases=pf.strs("aliases"),
            )
        )
    return GroupMeta(
        numel=f.int("numel"),
        partition_numel=f.int("partition_numel"),
        align=f.int("align"),
        params=tuple(params),
        state_keys=f.strs("state_keys"),
        hyperparams=f.dict("hyperparams"),
        scalars=f.dict("scalars"),
        state_dtypes=f.dict("state_dtypes", str_values=True),
    )


def _file_to_dict(f: FileMeta) -> dict[str, Any]:
    d: dict[str, Any] = {"path": f.path, "bytes": f.bytes, "checksum": f.checksum}
    if f.rank is not None:
        d = {"rank": f.rank, **d}
    if f.tensors:
        d["tensors"] = dict(f.tensors)
    return d


def _file_from_dict(d: Any, path: str, where: str) -> FileMeta:
    f = _Fields(d, path, where, _FILE_KEYS)
    return FileMeta(
        path=f.str("path"),
        bytes=f.int("bytes"),
        checksum=f.str("checksum"),
        rank=f.int("rank") if f.has("rank") else None,
        tensors=f.dict("tensors", str_values=True),
    )


# ----- validation -----------------------------------------------------------------------------


def check_manifest(m: Manifest, path: str = MANIFEST_NAME) -> list[Problem]:
    """Every inconsistency in ``m``, each naming the field and the fix; [] when it is sound.

    Linear in the number of params and shards (one sweep over sorted offsets).
    """
    problems: list[Problem] = []

    def bad(message: str, rank: int | None = None) -> None:
        problems.append(Problem(path, message, "manifest", rank))

    if m.world_size < 1:
        bad(f"world_size is {m.world_size}; it must be at least 1")
    if m.world_size > MAX_WORLD_SIZE:
        bad(f"world_size is {m.world_size}, above the most ranks a layout is cut for ({MAX_WORLD_SIZE})")
    if m.zero_stage not in (0, 1, 2):
        bad(f"zero_stage is {m.zero_stage}; format v1 holds ZeRO stage 0, 1 or 2 checkpoints")
    if m.master_dtype not in _FLOAT_DTYPES:
        bad(f"master_dtype is {m.master_dtype!r}; expected one of {sorted(_FLOAT_DTYPES)}")

    seen_names: set[str] = set()
    for gi, g in enumerate(m.groups):
        where = f"groups[{gi}]"
        if g.align < 1:
            bad(f"{where}.align is {g.align}; it must be at least 1")
            continue
        cursor = 0
        for pi, p in enumerate(g.params):
            pwhere = f"{where}.params[{pi}] ({p.name!r})"
            if p.offset != cursor:
                bad(
                    f"{pwhere} has offset {p.offset} but the previous params end at {cursor}: "
                    "offsets must be contiguous from 0 in flat order"
                )
            if any(d < 0 for d in p.shape):
                bad(f"{pwhere} has a negative dimension in shape {list(p.shape)}")
            if p.dtype not in DTYPE_SIZES:
                bad(f"{pwhere} has unknown dtype {p.dtype!r}")
            for n in (p.name, *p.aliases):
                if n in seen_names:
                    bad(f"{pwhere}: name {n!r} appears more than once; names must be unique")
                seen_names.add(n)
            cursor = p.offset + max(p.numel, 0)
        if g.numel != cursor:
            bad(f"{where}.numel is {g.numel} but its params add up to {cursor} elements")
        if 1 <= m.world_size <= MAX_WORLD_SIZE:
            expected_pn = compute_partition_numel(max(g.numel, 0), m.world_size, g.align)
            if g.partition_numel != expected_pn:
                bad(
                    f"{where}.partition_numel is {g.partition_numel}, expected {expected_pn} = "
                    f"ceil({g.numel} / ({m.world_size} * {g.align})) * {g.align}"
                )
        keys = list(g.state_keys)
        if len(set(keys)) != len(keys) or "master" in keys:
            bad(f"{where}.state_keys {keys} must be unique and must not contain 'master'")
        for key, dtype in g.state_dtypes.items():
            if key not in keys:
                bad(f"{where}.state_dtypes names {key!r}, which is not in state_keys {keys}")
            if dtype not in DTYPE_SIZES:
                bad(f"{where}.state_dtypes[{key!r}] is unknown dtype {dtype!r}")

    ranks = [s.rank for s in m.shards]
    if len(m.shards) != m.world_size:
        bad(
            f"lists {len(m.shards)} shards but world_size is {m.world_size}; a checkpoint needs "
            "exactly one shard per rank"
        )
    if sorted(r for r in ranks if r is not None) != list(range(len(m.shards))) or None in ranks:
        bad(f"shard ranks are {ranks}; expected each of 0..{len(m.shards) - 1} exactly once")
    files = list(m.shards) + ([m.model_file] if m.model_file else [])
    seen_paths: set[str] = set()
    for f in files:
        if f.path in seen_paths:
            bad(f"file {f.path!r} is listed twice", f.rank)
        seen_paths.add(f.path)
        parts = f.path.split("/")
        if (
            not f.path
            or f.path.startswith("/")
            or any(part in ("", ".", "..") for part in parts)
            or "\\" in f.path
            or "://" in f.path
        ):
            bad(f"file path {f.path!r} must be relative and stay inside the checkpoint", f.rank)
        if f.bytes < 0:
            bad(f"file {f.path!r} has negative size {f.bytes}", f.rank)
        for checksum in (f.checksum, *f.tensors.values()):
            try:
                parse_checksum(checksum)
            except ValueError as exc:
                bad(f"file {f.path!r}: {exc}", f.rank)
    return problems

