"""Writing a PyTorch DCP checkpoint from any :class:`~zero_ckpt.view.SourceView`.

The result is what ``dcp.save({"model": msd, "optim": osd})`` writes for
``msd, osd = get_state_dict(model, optimizer)`` of a model sharded FSDP2-style over
``world_size`` ranks: ``__<r>_0.distcp`` per rank holding that rank's dim-0 shard
(``torch.chunk`` rows: ``ceil(dim0 / world_size)`` per rank) of every param (``model.<fqn>``,
from the fp32 master cast to the param's dtype) and of every optimizer state
(``optim.state.<fqn>.<key>``), each chunk a ``torch.save`` record; the step count per param
(``optim.state.<fqn>.step``, a 0-dim float32 tensor as torch's Adam keeps it), the param groups
(``optim.param_groups.<g>.<hyperparam>``, ``...params``: the FQNs) and module-only tensors
(buffers, frozen params) whole on rank 0; ``.metadata`` last (its presence makes the checkpoint
loadable). ``dcp.load`` reads it into an FSDP2 (or DDP, or single-device) model and optimizer
at any world size, resharding as it reads.

Planning is pure (:func:`plan_dcp`); the records' bytes stream through the one engine
(:func:`zero_ckpt.transfer.run_file_plans`), the zip CRC-32s computed as the data passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from zero_ckpt.formats.dcp.metadata import (
    DCP_METADATA_FILE,
    DcpBytes,
    DcpChunk,
    DcpMetadata,
    DcpTensor,
    write_dcp_metadata,
)
from zero_ckpt.formats.dcp.records import encode_bytes_item, encode_tensor_record, tensor_record_bytes
from zero_ckpt.manifest import Manifest
from zero_ckpt.plan import CopyOp, FilePlan, state_ops
from zero_ckpt.safetensors_format import dtype_size
from zero_ckpt.segments import Crc32Segment, LiteralSegment
from zero_ckpt.view import SourceView, WriteResult

__all__ = ["DcpPlan", "plan_dcp", "write_view", "rank_file", "MODEL_KEY", "OPTIM_KEY"]

MODEL_KEY = "model"
OPTIM_KEY = "optim"
_DCP_VERSION = "1.0.0"
_STEP_DTYPE = "float32"  # torch.optim's step tensors (torch._get_scalar_dtype())


def rank_file(rank: int) -> str:
    return f"__{rank}_0.distcp"


@dataclass(frozen=True)
class DcpPlan:
    """The ``.distcp`` files (one per rank, in rank order) and the ``.metadata`` bytes."""

    files: tuple[FilePlan, ...]
    metadata: bytes


class _File:
    """One ``.distcp`` being planned: segments appended in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.segments: list[Any] = []
        self.size = 0

    def literal(self, data: bytes) -> tuple[int, int]:
        start = self.size
        self.segments.append(LiteralSegment(bytes(data)))
        self.size += len(data)
        return start, len(data)

    def tensor(self, dtype: str, shape: tuple[int, ...], ops: list[CopyOp]) -> tuple[int, int]:
        """A torch.save record of one tensor whose data ``ops`` fill (their dst offsets are
        relative to the data's start); returns the record's ``(offset, length)``."""
        layout = encode_tensor_record(dtype, shape)
        start = self.size
        self.literal(layout.prefix)
        data_at = self.size
        self.segments += [replace(op, dst_start=data_at + op.dst_offset) for op in ops]
        self.size += layout.data_nbytes
        self.segments.append(Crc32Segment(
            layout.total_bytes - len(layout.prefix) - layout.data_nbytes,
            ((data_at, layout.data_nbytes),),
            lambda crcs, layout=layout: layout.suffix(crcs[0]),
        ))
        self.size = start + layout.total_bytes
        return start, layout.total_bytes

    def plan(self, rank: int) -> FilePlan:
        return FilePlan(self.path, b"", None, tuple(self.segments), self.size, rank)


def _rows(dim0: int, world: int, rank: int) -> tuple[int, int]:
    per = math.ceil(dim0 / world) if dim0 else 0
    lo = min(dim0, rank * per)
    return lo, min(dim0, lo + per)


def _plain(value: Any) -> Any:
    # JSON lists back to the tuples torch.optim keeps in param_groups (betas, ...)
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def plan_dcp(view: SourceView, world_size: int) -> DcpPlan:
    """Plan the DCP checkpoint of ``view`` sharded over ``world_size`` ranks (pure)."""
    m: Manifest = view.manifest
    files = [_File(rank_file(r)) for r in range(world_size)]
    chunks: dict[str, list[DcpChunk]] = {}
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    bytes_items: dict[str, DcpBytes] = {}
    planner: dict[str, tuple] = {}

    def tensor(fqn: str, path: tuple, dtype: str, shape: tuple[int, ...], f: _File,
               offsets: tuple[int, ...], sizes: tuple[int, ...], ops: list[CopyOp]) -> None:
        off, n = f.tensor(dtype, sizes, ops)
        chunks.setdefault(fqn, []).append(DcpChunk(offsets, sizes, f.path, off, n))
        shapes[fqn] = (shape, dtype)
        planner[fqn] = path

    def obj(fqn: str, path: tuple, value: Any) -> None:
        off, n = files[0].literal(encode_bytes_item(value))
        bytes_items[fqn] = DcpBytes(fqn, files[0].path, off, n)
        planner[fqn] = path

    for gi, g in enumerate(m.groups):
        for p in g.params:
            dim0 = p.shape[0] if p.shape else 1
            row = p.numel // dim0 if dim0 else 0
            for key, fqn, path, dtype in [
                ("master", f"{MODEL_KEY}.{p.name}", (MODEL_KEY, p.name), p.dtype),
                *[(k, f"{OPTIM_KEY}.state.{p.name}.{k}", (OPTIM_KEY, "state", p.name, k),
                   g.dtype_of(k, m.master_dtype)) for k in g.state_keys],
            ]:
                for r in range(world_size):
                    lo, hi = _rows(dim0, world_size, r) if p.shape else ((0, 1) if r == 0 else (0, 0))
                    if hi <= lo:
                        continue
                    ops = state_ops(view, gi, key, p.offset + lo * row, p.offset + hi * row, fqn, 0, dtype)
                    offsets = (lo, *([0] * (len(p.shape) - 1))) if p.shape else ()
                    sizes = (hi - lo, *p.shape[1:]) if p.shape else ()
                    tensor(fqn, path, dtype, p.shape, files[r], offsets, sizes, ops)
            for k, value in g.scalars.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    fqn = f"{OPTIM_KEY}.state.{p.name}.{k}"
                    rec = tensor_record_bytes(_STEP_DTYPE, (), _float32(value))
                    off, n = files[0].literal(rec)
                    chunks[fqn] = [DcpChunk((), (), files[0].path, off, n)]
                    shapes[fqn] = ((), _STEP_DTYPE)
                    planner[fqn] = (OPTIM_KEY, "state", p.name, k)
        for hp, value in g.hyperparams.items():
            obj(f"{OPTIM_KEY}.param_groups.{gi}.{hp}", (OPTIM_KEY, "param_groups", gi, hp), _plain(value))
        obj(f"{OPTIM_KEY}.param_groups.{gi}.params", (OPTIM_KEY, "param_groups", gi, "params"),
            [p.name for p in g.params])
    for mt in view.model:
        fqn = f"{MODEL_KEY}.{mt.name}"
        ops = []
        size = dtype_size(mt.dtype)
        for e in mt.pieces:
            ops.append(CopyOp(e.file, e.tensor, e.tensor_offset, e.byte_start, fqn, e.start * size,
                              e.start * size, e.numel, e.dtype, mt.dtype))
        tensor(fqn, (MODEL_KEY, mt.name), mt.dtype, mt.shape, files[0],
               tuple(0 for _ in mt.shape), mt.shape, ops)

    meta = DcpMetadata(
        tensors={fqn: DcpTensor(fqn, shapes[fqn][0], shapes[fqn][1], tuple(cs)) for fqn, cs in chunks.items()},
        bytes_items=bytes_items,
        planner_data=planner,
        version=_DCP_VERSION,
    )
    return DcpPlan(tuple(f.plan(r) for r, f in enumerate(files)), write_dcp_metadata(meta))


def _float32(value: float) -> bytes:
    import struct

    return struct.pack("<f", float(value))


def write_view(
    s: Any,
    d: Any,
    view: SourceView,
    *,
    world_size: int,
    overwrite: bool = False,
    progress: Any = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
    precheck: Any = None,
    **_: Any,
) -> WriteResult:
    """Write ``view`` (read from ``s``) to ``d`` as a DCP checkpoint for ``world_size`` ranks;
    ``.metadata`` last. On any error ``d`` keeps nothing this call wrote."""
    from zero_ckpt.destination import check_reads, claim_destination, prepare_output
    from zero_ckpt.transfer import ProgressTracker, write_and_commit

    plan = plan_dcp(view, world_size)
    outputs = tuple(f.path for f in plan.files) + (DCP_METADATA_FILE,)
    check_reads(d, sources=(s,), files=[(s, f.path) for f in view.files])
    with claim_destination(d, "convert", overwrite):
        prepare_output(d, overwrite, outputs=outputs, folders=())
        written = write_and_commit(
            s, d, view, plan.files, lambda _: d.write_atomic(DCP_METADATA_FILE, plan.metadata),
            precheck=precheck,
            progress=ProgressTracker(progress, sum(f.data_bytes for f in plan.files)),
            workers=workers, chunk_bytes=chunk_bytes, fsync=fsync,
        )
    total = sum(w.bytes for w in written.values()) + len(plan.metadata)
    return WriteResult("dcp", d.url, world_size, outputs, total)
