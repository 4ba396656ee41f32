"""Writing DeepSpeed ZeRO-1/2 checkpoints at any data-parallel size, and DeepSpeed's universal layout.

:func:`write_view` (the registry's writer of ``deepspeed``; :func:`write_deepspeed` is its URL-level
form) takes a :class:`~zero_ckpt.view.SourceView` of any format (format v1, DeepSpeed ZeRO-1/2 at
any size, PyTorch DCP, a plug-in's) and writes the folder DeepSpeed itself would have saved had
the run used ``world_size`` data-parallel ranks::

    dst/latest                                              names the tag, written last
    dst/<tag>/[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt   r < world_size
    dst/<tag>/mp_rank_00_model_states.pt

so ``engine.load_checkpoint(dst)`` at the new size restores the optimizer state exactly (DeepSpeed
refuses to re-partition ZeRO-1/2 state itself). The partitioning is recomputed as DeepSpeed's
``DeepSpeedZeroOptimizer`` (or ``BF16_Optimizer``) does at the new size, from the facts the reader
documents (:mod:`zero_ckpt.formats.deepspeed.reading`):

* each group's params are laid end to end in ``param_shapes`` order, the flat buffer is padded at
  the tail to a multiple of ``2 * dp`` and cut into ``dp`` equal partitions
  (``partition_numel = ceil(numel / (2 * dp)) * 2``, our layout with ``align`` 2);
* ``single_partition_of_fp32_groups[g]``: the rank's fp32 masters with the padding stripped
  (``BF16_Optimizer``: padded); ``group_paddings[g]``: the padding elements in the rank's
  partition (``BF16_Optimizer``: all of the group's padding, on the last rank only);
* ``base_optimizer_state``: the wrapped torch optimizer's ``state_dict()`` whose state tensors
  cover the *padded* partition (zeros in the padding, as Adam leaves them); with
  ``elastic_checkpoint`` a list of per-group states without padding;
* ``partition_count``, ``param_slice_mappings`` (``fragment_address(numel, start)`` of every param
  overlapping the rank's partition, in the group's param order) and ``param_alignment_paddings``
  for the new cut;
* under ``round_robin_gradients`` the flat order itself depends on the size: DeepSpeed reorders a
  group's params round-robin over the ranks (``_round_robin_reorder``). The source's order is
  undone with its size and redone with the new one (``param_shapes`` records the new order);
  ``param_slice_mappings`` are written as DeepSpeed computes them (cumulative offsets in the
  group's own order, which disagree with the buffer under round robin, as in DeepSpeed's files).

Everything else is kept: from a DeepSpeed source, every other entry of rank 0's optim file (loss
scaler, clip_grad, zero_stage, ds_version, hyperparameters, step tensors, ...) and the whole
model states file (module weights, buffers, frozen params and their fragments, tied names, step
counters, lr scheduler and client state), with ``dp_world_size``, ``param_shapes`` (its order
under round robin) and, in ``ds_config``, ``train_batch_size`` (the per-rank batch is kept) set
for the new size. From any other source (format v1, DCP, ...) the files are synthesised in
DeepSpeed 0.19's layout (see *Limits*); the state is read through the view alone (its extents,
module-only tensors and checks).

:func:`write_universal_view` (``deepspeed-universal``; URL-level: :func:`write_deepspeed_universal`)
writes what ``ds_to_universal`` writes for a ZeRO-1/2 checkpoint: ``<tag>/zero/<param>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt`` (each
``{"param": full tensor, "cat_dim": 0}``; every tensor state of the optimizer gets a file),
``step.pt`` (the step tensor), ``{"param": tensor.float()}`` in ``fp32.pt`` for module entries the
optimizer does not own (tied names, frozen params, buffers), ``<tag>/zero/optimizer_state.pt``
(rank 0's optimizer state without the partitioned entries, plus ``param_groups``), a copy of
``mp_rank_00_model_states.pt``, and ``latest_universal`` naming the tag (written last). Unlike
``ds_to_universal`` the per-param values follow ``param_shapes`` order, so they are right under
``round_robin_gradients`` too.

How: the ``.pt`` files are torch.save zip archives planned here record by record as
:mod:`zero_ckpt.segments` (literal local headers and pickle, protocol 2, exactly the opcodes
torch.save emits for the same objects, DeepSpeed classes named by reference without importing
DeepSpeed; tensor records copied or cast from byte ranges of the source files, format-v1 shards or
DeepSpeed optim/model files, with zeros for padding; data descriptors and central directory
computed from the records' CRC-32) and run by the one streaming engine,
:func:`zero_ckpt.transfer.run_file_plans`, in chunks. Memory stays within the chunk buffers
whatever the checkpoint's size; source bytes are never modified,
so the state is bit-identical. Format-v1 sources are checked against their checksums as they are
read. ``deepspeed`` is never imported.

Not written: DeepSpeed's recovery scripts (``zero_to_fp32.py``, which ``save_checkpoint`` copies
into the run folder; use DeepSpeed's installed one or ``zero-ckpt consolidate``). An
``elastic_checkpoint`` source is written as DeepSpeed writes one (lean per-group states, no
``param_groups``); DeepSpeed 0.19.8 cannot load those itself when the optimizer keeps ``step`` in
its state (torch's Adam): it asserts on the missing ``base_optimizer_state_step``. DeepSpeed's
universal loading places params in their group order, so under ``round_robin_gradients`` it
resumes with scrambled state whoever wrote the universal files; and it fails on a rank that holds
no element of some group (e.g. a 10-element group at 4 ranks).

Limits (sources that did not come from DeepSpeed: format v1, DCP, ...):

* the model states file has no ``lr_scheduler``/client state; ``module`` holds every param (the
  fp32 masters cast to the param's dtype), every tied name and every tensor of the checkpoint's
  model file; those are all listed in ``buffer_names`` (unless ``extra.deepspeed.buffer_names``
  says which are buffers) and no ``frozen_param_*`` entries are written (DeepSpeed restores
  frozen params from ``module`` then);
* ``loss_scaler``, ``dynamic_loss_scale``, ``overflow`` and ``clip_grad`` are left out (DeepSpeed
  keeps the values of its config) unless ``extra.deepspeed`` recorded them;
* the ``step`` scalar becomes a float32 tensor as torch's Adam keeps it; ``ds_version`` is
  :data:`DEEPSPEED_FORMAT_VERSION`; ``ds_config`` is what ``extra.deepspeed`` recorded, else a
  minimal one.
"""

from __future__ import annotations

import bisect
import math
import pickle
import posixpath
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Iterable

import torch

from zero_core.layout import GroupLayout, compute_partition_numel
from zero_ckpt.errors import CheckpointError, LayoutMismatchError
from zero_ckpt.formats.deepspeed.reading import DEEPSPEED_ALIGN
from zero_ckpt.formats.torch_zip import (
    STORAGE_DTYPES,
    StorageRef,
    TensorRef,
    TorchZipFile,
    Unknown,
    open_torch_zip,
    zip_central,
    zip_descriptor,
    zip_end_records,
    zip_local_header,
)
from zero_ckpt.manifest import GroupMeta, Manifest, ParamMeta
from zero_ckpt.plan import CopyOp, FilePlan
from zero_ckpt.safetensors_format import dtype_size
from zero_ckpt.destination import prepare_destination
from zero_ckpt.storage import Location, open_location
from zero_ckpt.segments import CastViaSegment, Crc32Segment, LiteralSegment, Segment, ZerosSegment
from zero_ckpt.transfer import ProgressFn, ProgressTracker, write_and_commit
from zero_ckpt.view import ModelTensor, SourceView, WriteResult

__all__ = [
    "DEEPSPEED_FORMAT_VERSION",
    "DeepSpeedWriteError",
    "write_deepspeed",
    "write_deepspeed_universal",
    "write_universal_view",
    "write_view",
]

# The DeepSpeed release whose file layout is written when the source records none.
DEEPSPEED_FORMAT_VERSION = "0.19.8"

_MODEL_FILE = "mp_rank_00_model_states.pt"
_LATEST = "latest"
_LATEST_UNIVERSAL = "latest_universal"
# Entries of an optim file that hold one rank's cut (recomputed); ds_to_universal drops the same
# three from optimizer_state.pt.
_SHARDED_KEYS = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")
_DS_CLASSES = {
    "loss_scaler": ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    "zero_stage": ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    "fragment_address": ("deepspeed.utils.tensor_fragment", "fragment_address"),
}
_TORCH_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
# dtype name -> torch.<Name>Storage, the typed-storage class torch.save names in its pickle.
_STORAGE_CLASSES = {dtype: name for name, dtype in STORAGE_DTYPES.items() if name != "UntypedStorage"}


class DeepSpeedWriteError(CheckpointError, ValueError):
    """The source cannot be written as the DeepSpeed checkpoint asked for (the message says why)."""


# ----- what the pickles hold: stand-ins for the objects torch.save would pickle ------------------


@dataclass(eq=False)
class _Global:
    """A class or function named by reference (``module.name``), never imported."""

    module: str
    name: str


_GLOBALS: dict[tuple[str, str], _Global] = {}


def _glob(module: str, name: str) -> _Global:
    key = (module, name)
    if key not in _GLOBALS:
        _GLOBALS[key] = _Global(module, name)
    return _GLOBALS[key]


@dataclass(eq=False)
class _Call:
    """``func(*args)``: pickled as REDUCE (enums, ``torch.Size``)."""

    func: _Global
    args: tuple


@dataclass(eq=False)
class _New:
    """``cls.__new__(cls, *args)`` then items/entries/state: pickled as NEWOBJ (+ APPENDS,
    SETITEMS, BUILD), as protocol 2 pickles plain objects and dataclasses."""

    cls: _Global
    args: tuple = ()
    state: Any = None
    items: list | None = None
    entries: dict | None = None


@dataclass(frozen=True)
class _Copy:
    """``nbytes`` from the source file ``path`` at byte ``start``; ``check``: ``(file, tensor,
    offset in the tensor)`` for the source checksum bookkeeping, None for unchecked sources."""

    path: str
    start: int
    nbytes: int
    check: tuple[str, str, int] | None = None

    @property
    def dst_nbytes(self) -> int:
        return self.nbytes


@dataclass(frozen=True)
class _Cast:
    """``numel`` elements of ``src_dtype`` from ``path`` at ``start``, cast to ``dst_dtype``
    (through ``via`` first when given: a module weight in the model dtype, then ``.float()``)."""

    path: str
    start: int
    numel: int
    src_dtype: str
    dst_dtype: str
    via: str | None = None

    @property
    def dst_nbytes(self) -> int:
        return self.numel * dtype_size(self.dst_dtype)


# What a storage record holds, in order; placed in the file as engine segments by _archive_plan.
_Segment = _Copy | _Cast | ZerosSegment | LiteralSegment


@dataclass(eq=False)
class _Storage:
    """A storage record of the archive: ``numel`` elements of ``dtype`` made of ``segments``."""

    dtype: str
    numel: int
    segments: tuple[_Segment, ...]

    def __post_init__(self) -> None:
        got = sum(s.dst_nbytes for s in self.segments)
        if got != self.numel * dtype_size(self.dtype):
            raise DeepSpeedWriteError(
                f"a storage of {self.numel} {self.dtype} elements was planned with {got} bytes "
                f"instead of {self.numel * dtype_size(self.dtype)} (a bug in the writer's plan)",
                expected=self.numel * dtype_size(self.dtype), actual=got,
            )


@dataclass(eq=False)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


def _tensor(
    dtype: str, shape: tuple[int, ...], segments: Iterable[_Segment], requires_grad: bool = False
) -> _Tensor:
    shape = tuple(int(d) for d in shape)
    storage = _Storage(dtype, math.prod(shape), tuple(s for s in segments if s.dst_nbytes))
    return _Tensor(storage, 0, shape, _contiguous_stride(shape), requires_grad)


def _scalar_tensor(value: float) -> _Tensor:
    """A float32 0-d tensor (how torch's Adam keeps ``step``)."""
    return _tensor("float32", (), [LiteralSegment(struct.pack("<f", float(value)))])


def _size(shape: Iterable[int]) -> _Call:
    return _Call(_glob("torch", "Size"), (tuple(int(d) for d in shape),))


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    """Protocol-2 pickler for the stand-ins; storages become torch's persistent ids, keyed
    ``"0"``, ``"1"``, ... in order of first use (as torch.save numbers them)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=2)
        self.storages: list[_Storage] = []
        self._keys: dict[int, str] = {}

    def persistent_id(self, obj: Any) -> Any:  # noqa: D401 - pickle API
        if isinstance(obj, _Storage):
            key = self._keys.get(id(obj))
            if key is None:
                key = self._keys[id(obj)] = str(len(self.storages))
                self.storages.append(obj)
            return ("storage", _glob("torch", _STORAGE_CLASSES[obj.dtype]), key, "cpu", obj.numel)
        return None

    def _save_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    def _save_call(self, obj: _Call) -> None:
        self.save(obj.func)
        self.save(tuple(obj.args))
        self.write(pickle.REDUCE)
        self.memoize(obj)

    def _save_new(self, obj: _New) -> None:
        self.save(obj.cls)
        self.save(tuple(obj.args))
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        if obj.items:
            self._batch_appends(iter(obj.items))
        if obj.entries:
            self._batch_setitems(iter(obj.entries.items()))
        if obj.state is not None:
            self.save(obj.state)
            self.write(pickle.BUILD)

    def _save_tensor(self, obj: _Tensor) -> None:
        # what torch.Tensor.__reduce_ex__ gives for a plain CPU tensor
        self.save(_glob("torch._utils", "_rebuild_tensor_v2"))
        args = (obj.storage, obj.offset, tuple(obj.shape), tuple(obj.stride), obj.requires_grad, OrderedDict())
        self.save(args)
        self.write(pickle.REDUCE)
        self.memoize(obj)

    dispatch[_Global] = _save_global
    dispatch[_Call] = _save_call
    dispatch[_New] = _save_new
    dispatch[_Tensor] = _save_tensor


def _pickle(obj: Any) -> tuple[bytes, list[_Storage]]:
    import io

    buf = io.BytesIO()
    p = _Pickler(buf)
    p.dump(obj)
    return buf.getvalue(), p.storages


# ----- copying a parsed source tree ----------------------------------------------------------------


class _TreeCopier:
    """A tree parsed from a source ``.pt`` (:class:`TensorRef`, :class:`Unknown`, containers) in
    stand-in form; tensors keep their bytes by copying their storage records from ``zf``.

    Objects the source pickle shared stay shared; ``Unknown`` records become REDUCE calls when
    they carry only arguments (enums, namedtuples), else NEWOBJ + state (plain objects)."""

    def __init__(self, zf: TorchZipFile) -> None:
        self.zf = zf
        self._storages: dict[tuple[str, str], _Storage] = {}
        self._memo: dict[int, Any] = {}

    def storage(self, ref: StorageRef, dtype: str) -> _Storage:
        key = (ref.key, dtype)
        if key not in self._storages:
            start, _ = self.zf.storage_range(ref)
            size = dtype_size(dtype)
            if ref.nbytes % size:
                raise DeepSpeedWriteError(
                    f"{self.zf.url}: storage {ref.key!r} of {ref.nbytes} bytes is viewed as {dtype}; "
                    "it cannot be copied as a typed storage",
                    path=self.zf.url,
                )
            self._storages[key] = _Storage(dtype, ref.nbytes // size, (_Copy(self.zf.rel, start, ref.nbytes),))
        return self._storages[key]

    def __call__(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str, bytes, complex)):
            return value
        if isinstance(value, (_Global, _Call, _New, _Tensor)):
            return value
        done = self._memo.get(id(value))
        if done is not None:
            return done
        if isinstance(value, TensorRef):
            if value.dtype not in _STORAGE_CLASSES:
                raise DeepSpeedWriteError(
                    f"{self.zf.url}: a tensor of dtype {value.dtype} cannot be rewritten", path=self.zf.url
                )
            out: Any = _Tensor(self.storage(value.storage, value.dtype), value.offset, value.shape,
                               value.stride, value.requires_grad)
        elif isinstance(value, Unknown):
            args = tuple(self(a) for a in value.args)
            if value.state is None and not value.items and not value.entries and args:
                out = _Call(_glob(value.module, value.name), args)
            else:
                out = _New(_glob(value.module, value.name), args, None,
                           [self(v) for v in value.items] or None,
                           {self(k): self(v) for k, v in value.entries.items()} or None)
                self._memo[id(value)] = out
                out.state = self(value.state)
                return out
        elif isinstance(value, OrderedDict):
            out = OrderedDict()
            self._memo[id(value)] = out
            for k, v in value.items():
                out[self(k)] = self(v)
            return out
        elif isinstance(value, dict):
            out = {}
            self._memo[id(value)] = out
            for k, v in value.items():
                out[self(k)] = self(v)
            return out
        elif isinstance(value, list):
            out = []
            self._memo[id(value)] = out
            out.extend(self(v) for v in value)
            return out
        elif isinstance(value, tuple):
            out = tuple(self(v) for v in value)
        elif isinstance(value, (set, frozenset)):
            out = type(value)(self(v) for v in value)
        else:
            raise DeepSpeedWriteError(
                f"{self.zf.url}: holds a {type(value).__name__} that cannot be rewritten", path=self.zf.url
            )
        self._memo[id(value)] = out
        return out


# ----- the torch.save zip container ------------------------------------------------------------


_ZIP64_LIMIT = 0xFFFFFFFF  # sizes/offsets from here on go in zip64 fields (a module global: tests lower it)


@dataclass
class _Record:
    name: str
    segments: tuple[_Segment, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.dst_nbytes for s in self.segments)


# The zip pieces are torch_zip's (shared with the DCP writer); these pass this module's zip64
# threshold on.
_local_header = zip_local_header
_descriptor = zip_descriptor


def _central(name: bytes, crc: int, nbytes: int, offset: int) -> bytes:
    return zip_central(name, crc, nbytes, offset, _ZIP64_LIMIT)


def _end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    return zip_end_records(count, cd_offset, cd_size, _ZIP64_LIMIT)


def _torch_records(payload: bytes, storages: list[_Storage]) -> list[_Record]:
    """The records of a torch.save archive, in torch's order."""
    records = [
        _Record("data.pkl", (LiteralSegment(payload),)),
        _Record(".format_version", (LiteralSegment(b"1"),)),
        _Record(".storage_alignment", (LiteralSegment(b"64"),)),
        _Record("byteorder", (LiteralSegment(b"little"),)),
    ]
    records += [_Record(f"data/{i}", s.segments) for i, s in enumerate(storages)]
    # torch draws a random id per file; a content-derived one keeps the output reproducible
    ident = str(int.from_bytes(zlib.crc32(payload).to_bytes(4, "little") * 5, "little"))[:40].rjust(40, "0")
    records.append(_Record("version", (LiteralSegment(b"3\n"),)))
    records.append(_Record(".data/serialization_id", (LiteralSegment(ident.encode()),)))
    return records


@dataclass
class _Job:
    """One output file: ``rel`` (relative to the destination) and the object it holds."""

    rel: str
    obj: Any


def _placed(seg: _Segment, pos: int) -> Segment:
    """A record's piece as the engine segment that fills bytes from ``pos`` on."""
    if isinstance(seg, _Copy):
        _, tensor, offset = seg.check if seg.check is not None else (seg.path, None, 0)
        return CopyOp(seg.path, tensor, offset, seg.start, None, 0, pos, seg.nbytes, "uint8", "uint8",
                      check_source=seg.check is not None)
    if isinstance(seg, _Cast):
        op = CopyOp(seg.path, None, 0, seg.start, None, 0, pos, seg.numel, seg.src_dtype, seg.dst_dtype,
                    check_source=False)
        return op if seg.via is None else CastViaSegment(op, seg.via)
    return seg  # ZerosSegment, LiteralSegment


def _render_descriptor(nbytes: int, zip64: bool, crcs: tuple[int, ...]) -> bytes:
    return _descriptor(crcs[0], nbytes, zip64)


def _render_central(entries: tuple[tuple[bytes, int, int], ...], crcs: tuple[int, ...]) -> bytes:
    return b"".join(_central(name, crc, n, offset) for (name, n, offset), crc in zip(entries, crcs))


def _archive_plan(rel: str, archive: str, records: list[_Record]) -> FilePlan:
    """The zip archive of ``records`` as engine segments: per record a literal local header, its
    data, a data descriptor computed from the data's CRC-32; then the central directory (computed
    from every record's CRC-32) and the literal end records. Sizes never depend on a CRC, so every
    offset is known here."""
    ops: list[Segment] = []
    entries: list[tuple[bytes, int, int]] = []
    ranges: list[tuple[int, int]] = []
    pos = 0
    for rec in records:
        name = f"{archive}/{rec.name}".encode()
        n = rec.nbytes
        zip64 = n >= _ZIP64_LIMIT
        head = _local_header(name, pos, zip64)
        ops.append(LiteralSegment(head))
        entries.append((name, n, pos))
        data_start = pos = pos + len(head)
        for seg in rec.segments:
            ops.append(_placed(seg, pos))
            pos += seg.dst_nbytes
        ranges.append((data_start, n))
        size = len(_descriptor(0, n, zip64))
        ops.append(Crc32Segment(size, ((data_start, n),), partial(_render_descriptor, n, zip64)))
        pos += size
    cd = sum(len(_central(name, 0, n, offset)) for name, n, offset in entries)
    ops.append(Crc32Segment(cd, tuple(ranges), partial(_render_central, tuple(entries))))
    end = _end_records(len(records), pos, cd)
    ops.append(LiteralSegment(end))
    return FilePlan(rel, b"", None, tuple(ops), pos + cd + len(end))


def _file_plan(job: _Job) -> FilePlan:
    """The plan of one output file: a byte-for-byte copy, or a torch.save archive of the job's object."""
    if isinstance(job.obj, _RawCopy):
        return FilePlan(job.rel, b"", None, (_placed(_Copy(job.obj.path, 0, job.obj.nbytes), 0),), job.obj.nbytes)
    payload, storages = _pickle(job.obj)
    archive = posixpath.basename(job.rel).rsplit(".", 1)[0] or "archive"
    return _archive_plan(job.rel, archive, _torch_records(payload, storages))


def _read_bytes(plan: FilePlan) -> int:
    """Source bytes a plan reads (for progress totals)."""
    ops = (seg.op if isinstance(seg, CastViaSegment) else seg for seg in plan.ops)
    return sum(op.src_nbytes for op in ops if isinstance(op, CopyOp))


# ----- the source --------------------------------------------------------------------------------


@dataclass
class _Source:
    """The source view, plus (DeepSpeed sources only) rank 0's optim file and the model states
    file parsed, whose other entries are kept; ``ds``: ``extra.deepspeed`` of the manifest."""

    loc: Location
    view: SourceView
    optim_zf: TorchZipFile | None = None
    optim_root: Any = None
    model_zf: TorchZipFile | None = None
    model_root: Any = None
    model_rel: str | None = None
    ds: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def manifest(self) -> Manifest:
        return self.view.manifest

    @property
    def is_deepspeed(self) -> bool:
        return self.view.format == "deepspeed"

    @property
    def ds_config(self) -> dict:
        cfg = self.ds.get("ds_config")
        if self.is_deepspeed and isinstance(self.model_root, dict):
            raw = self.model_root.get("ds_config")
            if isinstance(raw, dict):
                cfg = raw
        return cfg if isinstance(cfg, dict) else {}

    @property
    def zero_config(self) -> dict:
        z = self.ds_config.get("zero_optimization")
        return z if isinstance(z, dict) else {}

    @property
    def optimizer(self) -> str:
        return str(self.ds.get("optimizer") or "DeepSpeedZeroOptimizer")

    @property
    def bf16_optimizer(self) -> bool:
        return self.optimizer == "BF16_Optimizer"

    @property
    def elastic(self) -> bool:
        if self.optim_root is not None:
            base = self.optim_root.get("optimizer_state_dict", {}).get("base_optimizer_state")
            return isinstance(base, list)
        return bool(self.zero_config.get("elastic_checkpoint")) and not self.bf16_optimizer

    @property
    def round_robin(self) -> bool:
        return bool(self.zero_config.get("round_robin_gradients")) and not self.bf16_optimizer

    @property
    def order_world_size(self) -> int:
        """The data-parallel size at which the recorded flat order was made (round robin)."""
        if self.is_deepspeed:
            return self.manifest.world_size
        ws = self.ds.get("dp_world_size")
        if not isinstance(ws, int) or ws < 1:
            raise DeepSpeedWriteError(
                f"{self.loc.url}: the checkpoint was saved with round_robin_gradients but does not record "
                "the data-parallel size its param order was made for (extra.deepspeed.dp_world_size)",
                path=self.loc.url,
            )
        return ws

    @property
    def prefix(self) -> str:
        if self.is_deepspeed or "file_prefix" in self.ds:
            return str(self.ds.get("file_prefix") or "")
        bf16 = any(p.dtype == "bfloat16" for g in self.manifest.groups for p in g.params)
        return "bf16_" if bf16 else ""

    @property
    def ds_version(self) -> str:
        v = self.ds.get("ds_version")
        return v if isinstance(v, str) and v else DEEPSPEED_FORMAT_VERSION

    @property
    def tag(self) -> str:
        if self.is_deepspeed and isinstance(self.view.origin.get("tag"), str) and self.view.origin["tag"]:
            return str(self.view.origin["tag"])
        if isinstance(self.ds.get("tag"), str) and self.ds["tag"]:
            return self.ds["tag"]
        steps = self.ds.get("global_steps")
        if not isinstance(steps, int):
            steps = self.manifest.step if isinstance(self.manifest.step, int) else 0
        return f"global_step{steps}"


def _open(loc: Location, view: SourceView) -> _Source:
    """The writer's source: any view. From a DeepSpeed view, rank 0's optim file and the model
    states file are parsed too (their other entries are kept); other views are synthesised
    from, in DeepSpeed 0.19's layout."""
    extra = view.manifest.extra if isinstance(view.manifest.extra, dict) else {}
    ds = extra.get("deepspeed")
    ds = dict(ds) if isinstance(ds, dict) else {}
    if view.format != "deepspeed":
        return _Source(loc, view, ds=ds)
    tag = view.origin.get("tag") or ""
    model_rel = posixpath.join(tag, _MODEL_FILE) if tag else _MODEL_FILE
    optim_zf = open_torch_zip(loc, view.manifest.shard(0).path)
    model_zf = open_torch_zip(loc, model_rel)
    src = _Source(loc, view, optim_zf, optim_zf.load(), model_zf, model_zf.load(), model_rel, ds,
                  list(view.origin.get("notes") or ()))
    osd = src.optim_root.get("optimizer_state_dict") if isinstance(src.optim_root, dict) else None
    if not isinstance(osd, dict):
        raise DeepSpeedWriteError(f"{optim_zf.url}: no optimizer_state_dict", path=optim_zf.url)
    if not isinstance(src.model_root, dict):
        raise DeepSpeedWriteError(f"{model_zf.url}: the model states file is not a dict", path=model_zf.url)
    return src


# ----- the new cut ---------------------------------------------------------------------------------


def _round_robin(items: list, n: int) -> list:
    """DeepSpeed's ``_round_robin_reorder``: item i goes to bucket ``i % n``, buckets in order."""
    buckets: dict[int, list] = {}
    for i, x in enumerate(items):
        buckets.setdefault(i % n, []).append(x)
    return [x for b in buckets.values() for x in b]


def _undo_round_robin(items: list, n: int) -> list:
    positions = _round_robin(list(range(len(items))), n)
    out: list = [None] * len(items)
    for pos, i in enumerate(positions):
        out[i] = items[pos]
    return out


@dataclass(frozen=True)
class _Group:
    """A group cut for the target: params in the target's flat order (``params``, offsets in that
    order), the group's own order (``own``: DeepSpeed's ``bit16_groups``), partition size."""

    index: int
    meta: GroupMeta
    params: tuple[ParamMeta, ...]
    own: tuple[ParamMeta, ...]
    layout: GroupLayout
    src_offsets: dict[str, int]
    starts: tuple[int, ...] = ()  # target offsets of ``params`` (for bisect)
    own_starts: tuple[int, ...] = ()  # cumulative offsets in ``own`` order

    @property
    def pn(self) -> int:
        return self.layout.partition_numel

    def overlapping(self, lo: int, hi: int) -> Iterable[ParamMeta]:
        """Params (target order) with elements in ``[lo, hi)``."""
        i = max(bisect.bisect_right(self.starts, lo) - 1, 0)
        while i < len(self.params) and self.params[i].offset < hi:
            yield self.params[i]
            i += 1


def _plan_groups(src: _Source, world_size: int) -> list[_Group]:
    groups = []
    for gi, g in enumerate(src.manifest.groups):
        recorded = list(g.params)
        own = _undo_round_robin(recorded, src.order_world_size) if src.round_robin else recorded
        ordered = _round_robin(own, world_size) if src.round_robin else own
        params, offset = [], 0
        for p in ordered:
            params.append(replace(p, offset=offset))
            offset += p.numel
        layout = GroupLayout.build(((p.name, p.shape, p.dtype) for p in params), world_size=world_size,
                                   align=DEEPSPEED_ALIGN)
        if layout.partition_numel != compute_partition_numel(g.numel, world_size, DEEPSPEED_ALIGN):
            raise AssertionError("layout disagrees with DeepSpeed's partition size")
        own_starts, acc = [], 0
        for p in own:
            own_starts.append(acc)
            acc += p.numel
        groups.append(_Group(gi, g, tuple(params), tuple(own), layout,
                             {p.name: p.offset for p in g.params}, tuple(p.offset for p in params),
                             tuple(own_starts)))
    return groups


def _source_segments(src: _Source, group: _Group, key: str, a: int, b: int, out: list[_Segment]) -> None:
    """Append to ``out`` the segments holding the source's flat elements ``[a, b)`` of ``key``
    (from the view's extents, in the key's dtype; adjacent ranges of one stored tensor merged)."""
    dtype = group.meta.dtype_of(key, src.manifest.master_dtype)
    size = dtype_size(dtype)
    for e in src.view.extents(group.index, key, a, b):
        if e.dtype != dtype:
            out.append(_Cast(e.file, e.byte_start, e.numel, e.dtype, dtype))
            continue
        check = (e.file, e.tensor, e.tensor_offset) if e.tensor is not None else None
        seg = _Copy(e.file, e.byte_start, e.numel * size, check)
        prev = out[-1] if out else None
        if (isinstance(prev, _Copy) and prev.path == seg.path and prev.start + prev.nbytes == seg.start
                and prev.check and check and prev.check[1] == check[1] and prev.check[2] + prev.nbytes == check[2]):
            out[-1] = _Copy(prev.path, prev.start, prev.nbytes + seg.nbytes, prev.check)
        else:
            out.append(seg)


def _pieces(src: _Source, group: _Group, key: str, lo: int, hi: int) -> list[_Segment]:
    """Segments holding target flat elements ``[lo, hi)`` of ``key``, read from the source."""
    out: list[_Segment] = []
    for p in group.overlapping(lo, hi):
        a, b = max(lo, p.offset), min(hi, p.offset + p.numel)
        if a >= b:
            continue
        s = group.src_offsets[p.name] + (a - p.offset)
        _source_segments(src, group, key, s, s + (b - a), out)
    return out


def _param_segments(src: _Source, group: _Group, p: ParamMeta, key: str) -> list[_Segment]:
    """One whole param's ``key``, in source order (for the universal layout)."""
    out: list[_Segment] = []
    s = group.src_offsets[p.name]
    _source_segments(src, group, key, s, s + p.numel, out)
    return out


def _cast(seg: _Segment, src_dtype: str, dst_dtype: str, via: str | None = None) -> _Cast:
    """A source segment of ``src_dtype`` elements read as ``dst_dtype`` (through ``via``)."""
    if isinstance(seg, _Cast):
        return _Cast(seg.path, seg.start, seg.numel, seg.src_dtype, dst_dtype, via)
    return _Cast(seg.path, seg.start, seg.dst_nbytes // dtype_size(src_dtype), src_dtype, dst_dtype, via)


def _model_segments(t: ModelTensor, dtype: str | None = None) -> list[_Segment]:
    """A module-only tensor of the view, from its pieces (cast to ``dtype`` when given)."""
    out: list[_Segment] = []
    want = dtype or t.dtype
    for e in t.pieces:
        if e.dtype != want:
            out.append(_Cast(e.file, e.byte_start, e.numel, e.dtype, want))
        else:
            check = (e.file, e.tensor, e.tensor_offset) if e.tensor is not None else None
            out.append(_Copy(e.file, e.byte_start, e.numel * dtype_size(e.dtype), check))
    return out


def _slice_mappings(group: _Group, rank: int, cls: _Global) -> OrderedDict:
    """``param_slice_mappings[g]`` as DeepSpeed computes it: the group's own param order with
    cumulative offsets, intersected with the rank's padded partition."""
    out: OrderedDict = OrderedDict()
    start, end = rank * group.pn, (rank + 1) * group.pn
    i = max(bisect.bisect_right(group.own_starts, start) - 1, 0)
    while i < len(group.own) and group.own_starts[i] < end:
        p, offset = group.own[i], group.own_starts[i]
        lo, hi = max(offset, start), min(offset + p.numel, end)
        in_partition = start <= offset < end or offset < start < offset + p.numel
        if in_partition and p.numel > 0:
            out[p.name] = _New(cls, (), {"numel": hi - lo, "start": lo - start})
        i += 1
    return out


def _retarget_config(cfg: Any, old: int, new: int, notes: list[str]) -> Any:
    """``ds_config`` for the new size: ``train_batch_size`` (micro batch x accumulation x dp)
    scaled so the per-rank batch stays what the config says."""
    if not isinstance(cfg, dict) or "train_batch_size" not in cfg or old == new:
        return cfg
    out = type(cfg)(cfg)
    tbs = cfg["train_batch_size"]
    micro, gas = cfg.get("train_micro_batch_size_per_gpu"), cfg.get("gradient_accumulation_steps")
    if isinstance(micro, int) and isinstance(gas, int):
        out["train_batch_size"] = micro * gas * new
    elif isinstance(tbs, int) and (tbs * new) % old == 0:
        out["train_batch_size"] = tbs * new // old
    else:
        note = f"ds_config train_batch_size {tbs!r} kept: it does not scale to {new} ranks"
        if note not in notes:
            notes.append(note)
    return out


# ----- the files of one rank ----------------------------------------------------------------------


class _Writer:
    """Builds the objects of the output files for one source and target size."""

    def __init__(self, src: _Source, world_size: int) -> None:
        self.src = src
        self.world_size = world_size
        self.groups = _plan_groups(src, world_size)
        self.notes: list[str] = list(src.notes)
        self.optim_copy = _TreeCopier(src.optim_zf) if src.optim_zf is not None else None
        self.model_copy = _TreeCopier(src.model_zf) if src.model_zf is not None else None
        self.template = self._template()

    # --- templates: rank 0's optim file of the source, or one synthesised in DeepSpeed's layout ---

    def _template(self) -> dict:
        src = self.src
        if src.optim_root is not None:
            root = src.optim_root
            out: dict = OrderedDict() if isinstance(root, OrderedDict) else {}
            for k, v in root.items():
                out[k] = v if k == "optimizer_state_dict" else self.optim_copy(v)  # type: ignore[misc]
            return out
        return {
            "optimizer_state_dict": self._synth_osd(),
            "ds_config": self._synth_config(),
            "ds_version": src.ds_version,
        }

    def _synth_config(self) -> dict:
        if self.src.ds_config:
            return dict(self.src.ds_config)
        bf16 = self.src.prefix == "bf16_"
        return {"zero_optimization": {"stage": self._stage()}, "bf16": {"enabled": bf16}}

    def _stage(self) -> int:
        stage = self.src.manifest.zero_stage
        if stage == 0 and not self.src.is_deepspeed:
            # a checkpoint of an unpartitioned optimizer (e.g. PyTorch DCP): ZeRO-1 partitions
            # exactly the optimizer state
            note = "the source records ZeRO stage 0 (an unpartitioned optimizer): written as ZeRO stage 1"
            if note not in self.notes:
                self.notes.append(note)
            return 1
        if stage not in (1, 2):
            raise DeepSpeedWriteError(
                f"{self.src.loc.url} records ZeRO stage {stage}; DeepSpeed ZeRO-1/2 checkpoints need stage 1 "
                "or 2",
                path=self.src.loc.url,
            )
        return stage

    def _synth_osd(self) -> dict:
        src, ds = self.src, self.src.ds
        osd: dict = {}
        scaler = ds.get("loss_scaler")
        if not self.src.bf16_optimizer and isinstance(scaler, dict) and isinstance(scaler.get("class"), str):
            module, _, name = scaler["class"].rpartition(".")
            state = {k: v for k, v in scaler.items() if k != "class"}
            osd["loss_scaler"] = _New(_glob(module, name), (), state)
            osd["dynamic_loss_scale"] = name == "DynamicLossScaler"
            osd["overflow"] = False
        if isinstance(ds.get("clip_grad"), (int, float)) and not isinstance(ds.get("clip_grad"), bool):
            osd["clip_grad"] = ds["clip_grad"]
        states = []
        for g in src.manifest.groups:
            st: dict = {}
            for k, v in g.scalars.items():
                st[k] = _scalar_tensor(v) if k == "step" else v
            for k in g.state_keys:
                st[k] = None  # filled per rank
            states.append(st)
        if self.src.elastic:
            osd["base_optimizer_state"] = states
        else:
            groups = []
            for i, g in enumerate(src.manifest.groups):
                # torch keeps betas as a tuple; JSON gave a list
                hp = {k: tuple(v) if k == "betas" and isinstance(v, list) else v
                      for k, v in g.hyperparams.items()}
                groups.append({**hp, "params": [i]})
            osd["base_optimizer_state"] = {"state": dict(enumerate(states)), "param_groups": groups}
        osd["single_partition_of_fp32_groups"] = None
        if not src.bf16_optimizer:
            osd["zero_stage"] = _Call(_glob(*_DS_CLASSES["zero_stage"]), (self._stage(),))
        osd["group_paddings"] = None
        if not src.bf16_optimizer:
            osd["param_alignment_paddings"] = None
        osd["partition_count"] = None
        osd["ds_version"] = src.ds_version
        osd["param_slice_mappings"] = None
        return osd

    # --- one rank's optim file --------------------------------------------------------------------

    def _real(self, group: _Group, rank: int) -> tuple[int, int]:
        return group.layout.real_range(rank)

    def _state_tensor(self, group: _Group, key: str, rank: int, padded: bool) -> _Tensor:
        lo, hi = self._real(group, rank)
        dtype = group.meta.dtype_of(key, self.src.manifest.master_dtype)
        segs = _pieces(self.src, group, key, lo, hi)
        n = hi - lo
        if padded:
            segs.append(ZerosSegment((group.pn - n) * dtype_size(dtype)))
            n = group.pn
        return _tensor(dtype, (n,), segs)

    def _group_state(self, group: _Group, template: Any, rank: int, padded: bool) -> Any:
        out: dict = OrderedDict() if isinstance(template, OrderedDict) else {}
        items = template.items() if isinstance(template, dict) else []
        for k, v in items:
            if k in group.meta.state_keys:
                out[k] = self._state_tensor(group, k, rank, padded)
            else:
                out[k] = self._copy(v)
        return out

    def _copy(self, value: Any) -> Any:
        return self.optim_copy(value) if self.optim_copy is not None else value

    def _base_state(self, base: Any, rank: int) -> Any:
        if isinstance(base, list):  # elastic_checkpoint: lean per-group states
            return [self._group_state(g, base[g.index], rank, padded=False) for g in self.groups]
        if not isinstance(base, dict):
            url = self.src.loc.url
            raise DeepSpeedWriteError(f"{url}: base_optimizer_state is not a dict", path=url)
        state = base.get("state", {})
        param_groups = base.get("param_groups", [])
        new_state: dict = OrderedDict() if isinstance(state, OrderedDict) else {}
        by_pid = {}
        for g in self.groups:
            pg = param_groups[g.index] if g.index < len(param_groups) else {}
            pid = pg.get("params", [g.index])[0] if isinstance(pg, dict) else g.index
            by_pid[pid] = g
        for pid, st in state.items():
            g = by_pid.get(pid)
            new_state[pid] = self._group_state(g, st, rank, padded=True) if g is not None else self._copy(st)
        out: dict = OrderedDict() if isinstance(base, OrderedDict) else {}
        for k, v in base.items():
            out[k] = new_state if k == "state" else self._copy(v)
        return out

    def _fp32(self, group: _Group, rank: int) -> _Tensor:
        lo, hi = self._real(group, rank)
        segs = _pieces(self.src, group, "master", lo, hi)
        n = hi - lo
        if self.src.bf16_optimizer:  # BF16_Optimizer keeps the padding (zeros) in its fp32 partition
            segs.append(ZerosSegment((group.pn - n) * dtype_size(self.src.manifest.master_dtype)))
            n = group.pn
        return _tensor(self.src.manifest.master_dtype, (n,), segs, requires_grad=True)

    def _paddings(self, rank: int) -> list[int]:
        if self.src.bf16_optimizer:
            return [g.layout.padding if rank == self.world_size - 1 else 0 for g in self.groups]
        return [g.pn - g.layout.real_numel(rank) for g in self.groups]

    def _fragment_class(self) -> _Global:
        root = self.src.optim_root
        if root is not None:
            for mapping in root["optimizer_state_dict"].get("param_slice_mappings") or []:
                for addr in (mapping.values() if isinstance(mapping, dict) else []):
                    if isinstance(addr, Unknown):
                        return _glob(addr.module, addr.name)
        return _glob(*_DS_CLASSES["fragment_address"])

    def optim_file(self, rank: int) -> _Job:
        template = self.template
        osd_t = template["optimizer_state_dict"]
        osd: dict = OrderedDict() if isinstance(osd_t, OrderedDict) else {}
        frag = self._fragment_class()
        for k, v in osd_t.items():
            if k == "base_optimizer_state":
                osd[k] = self._base_state(v, rank)
            elif k == "single_partition_of_fp32_groups":
                osd[k] = [self._fp32(g, rank) for g in self.groups]
            elif k == "group_paddings":
                osd[k] = self._paddings(rank)
            elif k == "partition_count":
                per_group = isinstance(v, list) or v is None
                osd[k] = [self.world_size] * len(self.groups) if per_group else self.world_size
            elif k == "param_slice_mappings":
                osd[k] = [_slice_mappings(g, rank, frag) for g in self.groups]
            elif k == "param_alignment_paddings":
                osd[k] = [[0] * len(g.params) for g in self.groups]
            else:
                osd[k] = self._copy(v)
        top: dict = OrderedDict() if isinstance(template, OrderedDict) else {}
        for k, v in template.items():
            if k == "optimizer_state_dict":
                top[k] = osd
            elif k == "ds_config":
                top[k] = _retarget_config(v, self.src.manifest.world_size, self.world_size, self.notes)
            else:
                top[k] = v
        name = f"{self.src.prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        return _Job(name, top)

    # --- the model states file --------------------------------------------------------------------

    def _param_shapes(self) -> list:
        return [OrderedDict((p.name, _size(p.shape)) for p in g.params) for g in self.groups]

    def model_file(self, world_size: int | None = None) -> _Job:
        """The model states file at ``world_size`` (default: the target's)."""
        ws = self.world_size if world_size is None else world_size
        src = self.src
        if src.model_root is not None:
            out: dict = OrderedDict() if isinstance(src.model_root, OrderedDict) else {}
            for k, v in src.model_root.items():
                if k == "param_shapes":
                    out[k] = self._param_shapes()
                elif k == "frozen_param_shapes" and isinstance(v, dict):
                    copy = self.model_copy
                    shapes = ((n, _size(s) if isinstance(s, tuple) else copy(s)) for n, s in v.items())  # type: ignore[misc]
                    out[k] = type(v)(shapes)
                elif k == "dp_world_size":
                    out[k] = ws
                elif k == "ds_config":
                    cfg = self.model_copy(v)  # type: ignore[misc]
                    out[k] = _retarget_config(cfg, src.manifest.world_size, ws, self.notes)
                else:
                    out[k] = self.model_copy(v)  # type: ignore[misc]
            return _Job(_MODEL_FILE, out)
        return _Job(_MODEL_FILE, self._synth_model(ws))

    def _module(self) -> tuple[OrderedDict, list[str], dict[str, str]]:
        """``module`` (params from the masters in their dtype, tied names sharing the storage,
        the model file's tensors), buffer names, shared params."""
        src = self.src
        module: OrderedDict = OrderedDict()
        shared: dict[str, str] = {}
        for g in self.groups:
            for p in g.meta.params:
                master = src.manifest.master_dtype
                segs = [_cast(s, master, p.dtype) for s in _param_segments(src, g, p, "master")]
                t = _tensor(p.dtype, p.shape, segs)
                module[p.name] = t
                for alias in p.aliases:
                    module[alias] = _Tensor(t.storage, 0, t.shape, t.stride)
                    shared[alias] = p.name
        names = []
        for mt in src.view.model:
            module[mt.name] = _tensor(mt.dtype, mt.shape, _model_segments(mt))
            names.append(mt.name)
        recorded = src.ds.get("buffer_names")
        buffers = [b for b in recorded if b in names] if isinstance(recorded, list) else names
        if not isinstance(recorded, list) and names:
            self.notes.append(
                "the source does not say which model-file tensors are buffers: all are listed in buffer_names "
                "and no frozen_param_* entries are written"
            )
        return module, buffers, shared

    def _synth_model(self, ws: int) -> dict:
        src, ds = self.src, self.src.ds
        module, buffers, shared = self._module()
        recorded_shared = ds.get("shared_params")
        if isinstance(recorded_shared, dict):
            shared = {**shared, **{k: v for k, v in recorded_shared.items() if k in module}}
        steps = ds.get("global_steps")
        if not isinstance(steps, int):
            steps = src.manifest.step if isinstance(src.manifest.step, int) else 0
        cfg = self._synth_config()
        samples = ds.get("global_samples", steps)
        samples = samples if isinstance(samples, int) else steps
        recorded_ws = int(ds.get("dp_world_size") or src.manifest.world_size)
        return {
            "module": module,
            "buffer_names": buffers,
            "optimizer": None,
            "param_shapes": self._param_shapes(),
            "shared_params": shared,
            "lr_scheduler": None,
            "data_sampler": None,
            "random_ltd": None,
            "skipped_steps": ds.get("skipped_steps", 0) if isinstance(ds.get("skipped_steps", 0), int) else 0,
            "global_steps": steps,
            "global_samples": samples,
            "dp_world_size": ws,
            "mp_world_size": 1,
            "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
            "ds_config": _retarget_config(cfg, recorded_ws, ws, self.notes),
            "ds_version": src.ds_version,
        }


# ----- running the jobs --------------------------------------------------------------------------------


def _run(src: _Source, d: Location, jobs: list[_Job], commit: tuple[str, bytes], progress: ProgressFn | None,
         workers: int | None, chunk_bytes: int | None, fsync: bool | None,
         precheck: Any = None) -> tuple[tuple[str, ...], int]:
    """Write every job through the engine, check the sources' checksums, then the commit file."""
    plans = [_file_plan(j) for j in jobs]
    tracker = ProgressTracker(progress, sum(_read_bytes(p) for p in plans)) if progress is not None else None

    def write_commit_file(_: Any) -> None:
        with d.writer(commit[0], len(commit[1])) as writer:
            writer.write(commit[1])
            writer.commit(fsync=fsync)

    written = write_and_commit(
        src.loc, d, src.view, plans, write_commit_file, precheck=precheck, progress=tracker, workers=workers,
        chunk_bytes=chunk_bytes, fsync=fsync,
    )
    return tuple(sorted(written)) + (commit[0],), sum(w.bytes for w in written.values()) + len(commit[1])


# ----- public ------------------------------------------------------------------------------------------


def _tag_name(tag: str | None, source: _Source) -> str:
    name = tag or source.tag
    if not name or "/" in name or name in (".", ".."):
        raise DeepSpeedWriteError(f"tag {name!r} is not a folder name")
    return name


def write_view(
    s: Location,
    d: Location,
    view: SourceView,
    *,
    world_size: int,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
    src_url: str | None = None,
    tag: str | None = None,
    precheck: Any = None,
    **_: Any,
) -> WriteResult:
    """Write ``view`` (any format, read from ``s``; ``precheck``: the source format's check of its files, run before the commit when the streamed checks did not cover every byte) to ``d`` as a
    DeepSpeed ZeRO-1/2 run folder for ``world_size`` data-parallel ranks (see
    :func:`write_deepspeed`); ``latest`` last. The registry's writer of ``deepspeed``."""
    if world_size is None or world_size < 1:
        raise LayoutMismatchError(f"target world size must be at least 1, got {world_size}")
    source = _open(s, view)
    w = _Writer(source, world_size)
    name = _tag_name(tag, source)
    jobs = [w.optim_file(r) for r in range(world_size)] + [w.model_file()]
    jobs = [_Job(posixpath.join(name, j.rel), j.obj) for j in jobs]
    prepare_destination(s, d, overwrite)
    files, nbytes = _run(source, d, jobs, (_LATEST, name.encode()), progress, workers, chunk_bytes, fsync,
                         precheck)
    return WriteResult("deepspeed", d.url, world_size, files, nbytes, tuple(w.notes), tag=name)


def write_universal_view(
    s: Location,
    d: Location,
    view: SourceView,
    *,
    world_size: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
    src_url: str | None = None,
    tag: str | None = None,
    precheck: Any = None,
    **_: Any,
) -> WriteResult:
    """Write ``view`` (any format, read from ``s``; ``precheck``: the source format's check of its files, run before the commit when the streamed checks did not cover every byte) to ``d`` in
    DeepSpeed's universal layout (see :func:`write_deepspeed_universal`); ``latest_universal``
    last. ``world_size`` is ignored: the universal layout loads at any size. The registry's
    writer of ``deepspeed-universal``."""
    source = _open(s, view)
    if source.elastic:
        raise DeepSpeedWriteError(
            f"{s.url} is an elastic_checkpoint: it records no param_groups (learning rates, betas, ...), "
            "which the universal layout's optimizer_state.pt needs (ds_to_universal fails on it too); "
            "write it with --format deepspeed instead",
            path=s.url,
        )
    w = _Writer(source, source.manifest.world_size)
    name = _tag_name(tag, source)
    jobs = _universal_jobs(w, name)
    prepare_destination(s, d, overwrite)
    commit = (_LATEST_UNIVERSAL, name.encode())
    files, nbytes = _run(source, d, jobs, commit, progress, workers, chunk_bytes, fsync, precheck)
    return WriteResult("deepspeed-universal", d.url, None, files, nbytes, tuple(w.notes), tag=name)


def _write_url(
    writer: Any, src: str, dst: str, storage_options: dict[str, Any] | None,
    dst_storage_options: dict[str, Any] | None, expected_world_size: int | None, **options: Any,
) -> WriteResult:
    """Open ``src`` (any format with a byte layout), view it, precheck it and run ``writer``."""
    from zero_ckpt.formats.registry import format_module, open_view, precheck, resolve

    with open_location(src, storage_options) as s, open_location(
        dst, storage_options if dst_storage_options is None else dst_storage_options
    ) as d:
        fmt = resolve(s)
        if getattr(format_module(fmt), "import_source", None) is not None:
            raise DeepSpeedWriteError(
                f"{s.url} is a {fmt} checkpoint, which has no byte layout to write from; convert it to "
                "zero-ckpt first (zero-ckpt convert), then write that",
                path=s.url,
            )
        view = open_view(s, fmt)
        view.check_saved_world_size(expected_world_size)
        return writer(s, d, view, src_url=src, precheck=lambda: precheck(s, view), **options)


def write_deepspeed(
    src: str,
    dst: str,
    *,
    world_size: int,
    tag: str | None = None,
    expected_world_size: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
) -> WriteResult:
    """Write the checkpoint at ``src`` (any readable format: format v1, DeepSpeed ZeRO-1/2 at any
    size, PyTorch DCP, ...) as a DeepSpeed ZeRO-1/2 run folder at ``dst`` for ``world_size``
    data-parallel ranks.

    ``dst`` gets ``<tag>/[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (r < world_size),
    ``<tag>/mp_rank_00_model_states.pt`` and, last, ``latest`` naming ``tag`` (default: the
    source's tag, else ``global_step<N>``): ``engine.load_checkpoint(dst)`` at ``world_size``
    ranks resumes with the optimizer state intact. One file per rank, each holding 1/world_size
    of the state, built from byte ranges of the source in ``chunk_bytes`` pieces on ``workers``
    threads. ``expected_world_size`` (the CLI's ``--from``) must match the source's. On any
    error nothing this call wrote is left and ``latest`` is not written. Returns a
    :class:`~zero_ckpt.view.WriteResult` (``tag``: the tag written).
    """
    if world_size < 1:
        raise LayoutMismatchError(f"target world size must be at least 1, got {world_size}")
    return _write_url(
        write_view, src, dst, storage_options, dst_storage_options, expected_world_size,
        world_size=world_size, tag=tag, overwrite=overwrite, progress=progress, workers=workers,
        chunk_bytes=chunk_bytes, fsync=fsync,
    )


def write_deepspeed_universal(
    src: str,
    dst: str,
    *,
    tag: str | None = None,
    expected_world_size: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
) -> WriteResult:
    """Write the checkpoint at ``src`` in DeepSpeed's universal layout, as ``ds_to_universal``
    does, into the run folder ``dst``: ``<tag>/zero/<param>/{fp32,exp_avg,exp_avg_sq,...,step}.pt``,
    ``<tag>/zero/optimizer_state.pt``, ``<tag>/mp_rank_00_model_states.pt`` and, last,
    ``latest_universal`` naming ``tag`` (DeepSpeed loads it at any size with
    ``"checkpoint": {"load_universal": true}``). One param at a time, streamed. Returns a
    :class:`~zero_ckpt.view.WriteResult` (``world_size`` None).
    """
    return _write_url(
        write_universal_view, src, dst, storage_options, dst_storage_options, expected_world_size,
        tag=tag, overwrite=overwrite, progress=progress, workers=workers, chunk_bytes=chunk_bytes,
        fsync=fsync,
    )


def _universal_jobs(w: _Writer, tag: str) -> list[_Job]:
    src = w.src
    zero = posixpath.join(tag, "zero")
    jobs: list[_Job] = []
    owned: set[str] = set()
    template_osd = w.template["optimizer_state_dict"]
    base = template_osd.get("base_optimizer_state") if isinstance(template_osd, dict) else None
    states = base.get("state", {}) if isinstance(base, dict) else {}
    groups_t = base.get("param_groups", []) if isinstance(base, dict) else []
    for g in w.groups:
        pg = groups_t[g.index] if g.index < len(groups_t) and isinstance(groups_t[g.index], dict) else {}
        pid = (pg.get("params") or [g.index])[0]
        state_t = states.get(pid, {}) if isinstance(states, dict) else {}
        step = state_t.get("step") if isinstance(state_t, dict) else None
        for p in g.meta.params:
            if p.numel == 0:
                continue  # DeepSpeed maps no fragment for it: it gets the module's value below
            owned.add(p.name)
            folder = posixpath.join(zero, p.name)
            for key in ("master", *g.meta.state_keys):
                dtype = g.meta.dtype_of(key, src.manifest.master_dtype)
                # fp32 is cut from the requires_grad fp32 partitions, so DeepSpeed's tensor has it too
                t = _tensor(dtype, p.shape, _param_segments(src, g, p, key), requires_grad=key == "master")
                fname = "fp32.pt" if key == "master" else f"{key}.pt"
                jobs.append(_Job(posixpath.join(folder, fname), {"cat_dim": 0, "param": t}))
            if step is not None:
                jobs.append(_Job(posixpath.join(folder, "step.pt"), w._copy(step)))
    # module entries the optimizer does not own: {"param": tensor.float()}, as ds_to_universal
    for name, t in _module_entries(w):
        if name not in owned:
            jobs.append(_Job(posixpath.join(zero, name, "fp32.pt"), {"param": t}))
    osd: dict = OrderedDict() if isinstance(template_osd, OrderedDict) else {}
    for k, v in template_osd.items():
        if k in _SHARDED_KEYS:
            continue
        if v is None:  # a per-rank slot of a synthesised template: the source's values
            v = _source_rank_value(w, k)
        osd[k] = w._copy(v)
    osd["param_groups"] = w._copy(groups_t)
    jobs.append(_Job(posixpath.join(zero, "optimizer_state.pt"), osd))
    if src.model_zf is not None:  # ds_to_universal copies it unchanged
        jobs.append(_Job(posixpath.join(tag, _MODEL_FILE), _RawCopy(src.model_rel, src.model_zf.size)))
    else:
        model = w.model_file(src.manifest.world_size)
        jobs.append(_Job(posixpath.join(tag, model.rel), model.obj))
    return jobs


def _source_rank_value(w: _Writer, key: str) -> Any:
    """Rank 0's value of a per-rank entry at the source's size (synthesised sources)."""
    src = w.src
    ws = src.manifest.world_size
    if key == "group_paddings":
        pns = [compute_partition_numel(g.meta.numel, ws, DEEPSPEED_ALIGN) for g in w.groups]
        return [pn - min(pn, g.meta.numel) for pn, g in zip(pns, w.groups)]
    if key == "partition_count":
        return [ws] * len(w.groups)
    if key == "param_alignment_paddings":
        return [[0] * len(g.params) for g in w.groups]
    return None


@dataclass(eq=False)
class _RawCopy:
    """A file copied byte for byte (the model states file of the universal layout)."""

    path: str
    nbytes: int


def _module_entries(w: _Writer) -> list[tuple[str, _Tensor]]:
    """``(name, float32 tensor)`` of every module entry, as ``model_state['module']`` gives them
    (DeepSpeed source: the saved module weights; format v1: masters through the param dtype)."""
    src = w.src
    out = []
    if src.model_root is not None:
        module = src.model_root.get("module")
        if not isinstance(module, dict):
            return []
        zf, rel = src.model_zf, str(src.model_rel)
        for name, t in module.items():
            if not isinstance(t, TensorRef) or t.dtype not in _TORCH_DTYPES:
                continue
            start, _ = zf.tensor_range(t, f"module tensor {name!r}")  # type: ignore[union-attr] # refuses non-contiguous
            out.append((name, _tensor("float32", t.shape, [_Cast(rel, start, t.numel, t.dtype, "float32")])))
        return out
    master = src.manifest.master_dtype
    for g in w.groups:
        for p in g.meta.params:
            for name in (p.name, *p.aliases):
                segs = [_cast(s, master, "float32", via=p.dtype) for s in _param_segments(src, g, p, "master")]
                out.append((name, _tensor("float32", p.shape, segs)))
    for mt in src.view.model:
        if mt.dtype in _TORCH_DTYPES:
            segs = [_Cast(e.file, e.byte_start, e.numel, e.dtype, "float32") for e in mt.pieces]
            out.append((mt.name, _tensor("float32", mt.shape, segs)))
    return out
