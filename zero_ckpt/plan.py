"""Pure planning: which byte ranges of which source files go where (no I/O, no torch).

A plan is a list of :class:`FilePlan` (one per output file: its header bytes and the
:class:`CopyOp` list that fills its data section). Executors only move bytes along a plan;
every offset decision is made here, from the manifest, the layout math of
``zero_core.layout`` and the source files' parsed headers.

Because padding is never stored, a group's shards concatenated in rank order are exactly its
unpadded flat buffer; resharding N -> M is therefore a re-cutting of byte ranges, and
consolidation a gather of each parameter's range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from zero_core.layout import GroupLayout
from zero_ckpt.checks import expected_shard_tensors
from zero_ckpt.errors import LayoutMismatchError
from zero_ckpt.manifest import (
    MODEL_FILE_NAME,
    FileMeta,
    GroupMeta,
    Manifest,
    shard_path,
    tensor_name,
)
from zero_ckpt.safetensors_format import SafetensorsHeader, build_header, dtype_size, to_safetensors_dtype
from zero_ckpt.view import ModelTensor, SourceView

__all__ = [
    "CopyOp",
    "FilePlan",
    "ReshardPlan",
    "ConsolidatePlan",
    "PartitionRead",
    "plan_reshard",
    "plan_consolidate",
    "plan_partition_read",
    "plan_model_file",
    "state_ops",
    "split_op",
    "retarget_manifest",
    "shard_header",
    "CONSOLIDATED_MODEL_NAME",
    "CONSOLIDATED_OPTIMIZER_NAME",
    "OPTIMIZER_META_NAME",
]

CONSOLIDATED_MODEL_NAME = "model"
CONSOLIDATED_OPTIMIZER_NAME = "optimizer"
OPTIMIZER_META_NAME = "optimizer.json"
_FLOATS = {"float64", "float32", "float16", "bfloat16"}


@dataclass(frozen=True)
class CopyOp:
    """Move ``numel`` elements from a source file to a destination, casting if dtypes differ.

    ``src_start``/``dst_start`` are absolute byte offsets in the files; ``src_offset``/
    ``dst_offset`` the same places relative to the start of ``src_tensor``/``dst_tensor``
    (used to checksum each tensor from its pieces). A raw byte copy has tensors ``None`` and
    dtype ``uint8``.
    """

    src_file: str
    src_tensor: str | None
    src_offset: int
    src_start: int
    dst_tensor: str | None
    dst_offset: int
    dst_start: int
    numel: int
    src_dtype: str
    dst_dtype: str
    # False for a second read of a source range another op of the plan already reads (an
    # alias, or the master in both model and optimizer output): its bytes are checked once.
    check_source: bool = True

    @property
    def src_nbytes(self) -> int:
        return self.numel * dtype_size(self.src_dtype)

    @property
    def dst_nbytes(self) -> int:
        return self.numel * dtype_size(self.dst_dtype)


@dataclass(frozen=True)
class FilePlan:
    """One output file: ``header_bytes`` at offset 0, then ``ops`` tile the rest in order."""

    path: str
    header_bytes: bytes
    header: SafetensorsHeader | None
    ops: tuple[CopyOp, ...]
    file_bytes: int
    rank: int | None = None

    @property
    def data_bytes(self) -> int:
        return sum(op.dst_nbytes for op in self.ops)


@dataclass(frozen=True)
class ReshardPlan:
    """``target``: the new manifest with shard checksums still empty (the executor fills them
    from the bytes it writes); ``files``: the shards, then ``model.safetensors`` if any."""

    target: Manifest
    files: tuple[FilePlan, ...]


@dataclass(frozen=True)
class ConsolidatePlan:
    """Output safetensors files and small JSON documents (index, optimizer metadata)."""

    files: tuple[FilePlan, ...]
    documents: dict[str, bytes]


@dataclass(frozen=True)
class PartitionRead:
    """What one rank must read to rebuild its partitions at a new world size.

    ``ops[g]`` fills group ``g``'s partition buffers: for every op ``dst_tensor`` is the state
    key and ``dst_start`` the byte offset inside that key's partition buffer.
    """

    ops: tuple[tuple[CopyOp, ...], ...]
    real_numel: tuple[int, ...]


# ----- reshard -------------------------------------------------------------------------------


def retarget_manifest(manifest: Manifest, world_size: int) -> Manifest:
    """The same groups cut for ``world_size`` ranks; shard entries are placeholders."""
    if world_size < 1:
        raise LayoutMismatchError(f"target world size must be at least 1, got {world_size}")
    groups = tuple(
        replace(g, partition_numel=g.layout(world_size).partition_numel) for g in manifest.groups
    )
    shards = tuple(
        FileMeta(shard_path(r, world_size), 0, "", rank=r) for r in range(world_size)
    )
    return replace(manifest, world_size=world_size, groups=groups, shards=shards)


def shard_header(manifest: Manifest, rank: int) -> tuple[bytes, SafetensorsHeader]:
    """Header bytes and layout of rank's shard in canonical order (see checks)."""
    meta = {"format": "zero-ckpt", "rank": str(rank), "world_size": str(manifest.world_size)}
    return build_header(expected_shard_tensors(manifest, rank), meta)


def state_ops(
    view: SourceView,
    group_index: int,
    key: str,
    flat_start: int,
    flat_end: int,
    dst_tensor: str,
    dst_base: int,
    dst_dtype: str | None = None,
) -> list[CopyOp]:
    """Ops that copy flat elements ``[flat_start, flat_end)`` of ``key`` into ``dst_tensor``
    starting at absolute byte ``dst_base`` (the destination's first element is flat_start)."""
    ops = []
    for e in view.extents(group_index, key, flat_start, flat_end):
        out_dtype = dst_dtype or e.dtype
        dst_offset = (e.start - flat_start) * dtype_size(out_dtype)
        ops.append(
            CopyOp(
                src_file=e.file,
                src_tensor=e.tensor,
                src_offset=e.tensor_offset,
                src_start=e.byte_start,
                dst_tensor=dst_tensor,
                dst_offset=dst_offset,
                dst_start=dst_base + dst_offset,
                numel=e.numel,
                src_dtype=e.dtype,
                dst_dtype=out_dtype,
            )
        )
    return ops


def plan_reshard(view: SourceView, world_size: int) -> ReshardPlan:
    """Plan the source's state cut for ``world_size`` ranks (format-v1 shards), plus
    ``model.safetensors`` planned tensor by tensor from the view's module-only tensors."""
    target = retarget_manifest(replace(view.manifest, model_file=None), world_size)
    files: list[FilePlan] = []
    for rank in range(world_size):
        header_bytes, header = shard_header(target, rank)
        ops: list[CopyOp] = []
        for gi, group in enumerate(target.groups):
            lo, hi = group.layout(world_size).real_range(rank)
            for key in group.keys:
                entry = header.tensors[tensor_name(gi, key)]
                ops += state_ops(view, gi, key, lo, hi, entry.name, entry.start)
        files.append(
            FilePlan(shard_path(rank, world_size), header_bytes, header, tuple(ops), header.file_bytes, rank)
        )
    model = plan_model_file(view)
    if model is not None:
        files.append(model)
    return ReshardPlan(target, tuple(files))


def plan_model_file(view: SourceView, dst: str = MODEL_FILE_NAME) -> FilePlan | None:
    """``dst`` (safetensors, tensors sorted by name as ``write_model_file`` writes them) from
    the view's module-only tensors; None when it has none."""
    if not view.model:
        return None
    tensors = sorted(view.model, key=lambda t: t.name)
    header_bytes, header = build_header([(t.name, t.dtype, t.shape) for t in tensors], {"format": "pt"})
    ops = []
    seen: set[tuple[str, int, int]] = set()
    for t in tensors:
        out = header.tensors[t.name]
        for e in t.pieces:
            key = (e.file, e.byte_start, e.numel * dtype_size(e.dtype))
            dst_offset = e.start * dtype_size(t.dtype)
            ops.append(
                CopyOp(
                    e.file, e.tensor, e.tensor_offset, e.byte_start, t.name, dst_offset,
                    out.start + dst_offset, e.numel, e.dtype, t.dtype, check_source=key not in seen,
                )
            )
            seen.add(key)
    return FilePlan(dst, header_bytes, header, tuple(ops), header.file_bytes)


# ----- consolidate ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    # where its elements come from: a group/param/key of the shards, or a model-file tensor
    group: int | None = None
    param: int | None = None
    key: str | None = None
    model_src: ModelTensor | None = None

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * dtype_size(self.dtype)


def plan_consolidate(
    view: SourceView,
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    include_optimizer: bool = False,
    tied_names: Mapping[str, Sequence[str]] | None = None,
) -> ConsolidatePlan:
    """Plan full named tensors as Hugging Face style safetensors.

    Model files hold every param from the fp32 masters cast to ``dtype`` (default: each
    param's recorded dtype), then the tensors of the checkpoint's model file (floating ones
    cast only when ``dtype`` is given). A param with aliases (tied weights) is written under
    the names ``tied_names[param.name]`` gives (each a full copy; safetensors has no aliasing),
    by default under its name and every alias. More than ``max_shard_size``
    bytes -> ``model-0000i-of-0000K.safetensors`` plus ``model.safetensors.index.json``.
    ``include_optimizer`` adds ``optimizer*.safetensors`` (``{param}.{key}`` for master and
    every state, in their stored dtype) and ``optimizer.json`` (groups, hyperparameters,
    scalars).
    """
    if dtype is not None and dtype not in _FLOATS:
        raise LayoutMismatchError(
            f"--dtype {dtype!r} is not a floating dtype; choose one of {sorted(_FLOATS)}"
        )
    if max_shard_size is not None and max_shard_size < 1:
        raise LayoutMismatchError(f"max shard size must be positive, got {max_shard_size} bytes")
    manifest = view.manifest
    model_tensors: list[_OutTensor] = []
    for gi, group in enumerate(manifest.groups):
        for pi, p in enumerate(group.params):
            names = (p.name, *p.aliases)
            if tied_names is not None and p.name in tied_names:
                names = tuple(tied_names[p.name])
                if not names or not set(names) <= {p.name, *p.aliases}:
                    raise LayoutMismatchError(
                        f"tied names {list(names)} for {p.name!r} must be a non-empty subset of "
                        f"its names {[p.name, *p.aliases]}"
                    )
            for name in names:
                model_tensors.append(_OutTensor(name, dtype or p.dtype, p.shape, gi, pi, "master"))
    taken = {t.name for t in model_tensors}
    for mt in view.model:
        if mt.name in taken:
            raise LayoutMismatchError(
                f"the module-only tensors of {view.url} include {mt.name!r}, which is also an "
                "optimizer-owned parameter; the checkpoint is inconsistent",
                path=view.url,
            )
        out_dtype = dtype if (dtype and mt.dtype in _FLOATS) else mt.dtype
        model_tensors.append(_OutTensor(mt.name, out_dtype, mt.shape, model_src=mt))
    files, documents = _plan_output_set(
        CONSOLIDATED_MODEL_NAME, model_tensors, view, max_shard_size
    )
    if include_optimizer:
        opt_tensors = [
            _OutTensor(f"{p.name}.{key}", group.dtype_of(key, manifest.master_dtype), p.shape, gi, pi, key)
            for gi, group in enumerate(manifest.groups)
            for pi, p in enumerate(group.params)
            for key in group.keys
        ]
        opt_files, opt_docs = _plan_output_set(
            CONSOLIDATED_OPTIMIZER_NAME, opt_tensors, view, max_shard_size
        )
        files += opt_files
        documents.update(opt_docs)
        documents[OPTIMIZER_META_NAME] = _optimizer_meta(manifest)
    return ConsolidatePlan(tuple(_mark_repeated_reads(files)), documents)


def _optimizer_meta(manifest: Manifest) -> bytes:
    doc = {
        "format": "zero-ckpt-consolidated-optimizer",
        "version": 1,
        "master_dtype": manifest.master_dtype,
        "groups": [
            {
                "params": [p.name for p in g.params],
                "state_keys": ["master", *g.state_keys],
                "hyperparams": g.hyperparams,
                "scalars": g.scalars,
            }
            for g in manifest.groups
        ],
        "extra": manifest.extra,
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def _split_by_size(tensors: list[_OutTensor], max_bytes: int | None) -> list[list[_OutTensor]]:
    """Greedy in order, like transformers: a tensor larger than the limit gets its own file."""
    if max_bytes is None:
        return [tensors]
    out: list[list[_OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if out[-1] and size + t.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.nbytes
    return out


def _plan_output_set(
    stem: str,
    tensors: list[_OutTensor],
    view: SourceView,
    max_shard_size: int | None,
) -> tuple[list[FilePlan], dict[str, bytes]]:
    chunks = _split_by_size(tensors, max_shard_size)
    count = len(chunks)
    names = (
        [f"{stem}.safetensors"]
        if count == 1
        else [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    manifest = view.manifest
    files = []
    weight_map: dict[str, str] = {}
    for fname, chunk in zip(names, chunks):
        chunk = sorted(chunk, key=_safetensors_order)
        header_bytes, header = build_header(
            [(t.name, t.dtype, t.shape) for t in chunk], {"format": "pt"}
        )
        ops: list[CopyOp] = []
        for t in chunk:
            entry = header.tensors[t.name]
            weight_map[t.name] = fname
            if t.model_src is not None:
                for e in t.model_src.pieces:
                    dst_offset = e.start * dtype_size(t.dtype)
                    ops.append(
                        CopyOp(e.file, e.tensor, e.tensor_offset, e.byte_start, t.name, dst_offset,
                               entry.start + dst_offset, e.numel, e.dtype, t.dtype)
                    )
                continue
            p = manifest.groups[t.group].params[t.param]  # type: ignore[index]
            ops += state_ops(
                view, t.group, t.key, p.offset, p.offset + p.numel, t.name, entry.start, t.dtype,  # type: ignore[arg-type]
            )
        files.append(FilePlan(fname, header_bytes, header, tuple(ops), header.file_bytes))
    return files, _index_documents(stem, tensors, weight_map, count)


# safetensors' own serializer lays tensors out by dtype (this order, descending), then by name;
# the consolidated files follow it, so they are laid out byte for byte as save_pretrained's.
_ST_DTYPE_ORDER = {
    d: i for i, d in enumerate(
        ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
         "F32", "F64", "I64", "U64")
    )
}


def _safetensors_order(t: "_OutTensor") -> tuple[int, str]:
    return (-_ST_DTYPE_ORDER.get(to_safetensors_dtype(t.dtype), -1), t.name)


def _mark_repeated_reads(files: list[FilePlan]) -> list[FilePlan]:
    """Flag every op re-reading a source range that an earlier op of the plan reads."""
    seen: set[tuple[str, int, int]] = set()
    out = []
    for f in files:
        ops = []
        for op in f.ops:
            key = (op.src_file, op.src_start, op.src_nbytes)
            ops.append(op if key not in seen else replace(op, check_source=False))
            seen.add(key)
        out.append(replace(f, ops=tuple(ops)))
    return out


def _index_documents(
    stem: str, tensors: list[_OutTensor], weight_map: dict[str, str], count: int
) -> dict[str, bytes]:
    documents: dict[str, bytes] = {}
    if count > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": weight_map,
        }
        documents[f"{stem}.safetensors.index.json"] = (json.dumps(index, indent=2) + "\n").encode()
    return documents


# ----- load at another world size --------------------------------------------------------------


def plan_partition_read(
    view: SourceView,
    world_size: int,
    rank: int,
    align: int | None = None,
) -> PartitionRead:
    """Byte ranges rank needs to rebuild its partitions at ``world_size`` (any size).

    ``align`` overrides the recorded alignment (an optimizer may align differently than the
    one that saved; the flat buffer, and so the bytes, are the same).
    """
    manifest = view.manifest
    src_layouts = manifest.layouts()
    all_ops = []
    reals = []
    for gi, group in enumerate(manifest.groups):
        target_layout = GroupLayout.from_specs(
            src_layouts[gi].params, world_size=world_size, align=align or group.align
        )
        lo, hi = target_layout.real_range(rank)
        reals.append(hi - lo)
        ops: list[CopyOp] = []
        for key in group.keys:
            ops += state_ops(view, gi, key, lo, hi, key, 0)
        all_ops.append(tuple(ops))
    return PartitionRead(tuple(all_ops), tuple(reals))


def split_op(op: CopyOp, max_src_bytes: int) -> list[CopyOp]:
    """Cut an op into consecutive ops of at most ``max_src_bytes`` source bytes (whole
    elements), so one large range can be fetched by several workers at once."""
    src_size = op.src_nbytes // op.numel if op.numel else 1
    dst_size = op.dst_nbytes // op.numel if op.numel else 1
    per_op = max(1, max_src_bytes // src_size)
    if op.numel <= per_op:
        return [op]
    out = []
    for start in range(0, op.numel, per_op):
        n = min(per_op, op.numel - start)
        out.append(
            replace(
                op,
                src_offset=op.src_offset + start * src_size,
                src_start=op.src_start + start * src_size,
                dst_offset=op.dst_offset + start * dst_size,
                dst_start=op.dst_start + start * dst_size,
                numel=n,
            )
        )
    return out
