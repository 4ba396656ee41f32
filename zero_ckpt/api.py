"""The bridge between a live ``ZeroOptimizer`` and format v1: ``save`` and ``load``.

Both are collectives over the optimizer's process group: every rank calls them with the same
path. ``save`` has each rank write its own shard (padding stripped) in parallel; rank 0
writes ``model.safetensors`` and, once every shard is durable, ``manifest.json`` last.
``load`` works at any data-parallel size: each rank reads only the byte ranges its new
partition needs, planned by the same code as the offline reshard
(:func:`zero_ckpt.plan.plan_partition_read`), and the ranks verify the checksums of what they
read together.

The optimizer is used through its bridge interface only (``layouts``, ``group_params``,
``master_partition``, ``state_partitions``, ``group_scalars``, ``group_hyperparams``,
``load_partition``, ``load_hyperparams``, ``sync_model_from_masters``,
``loss_scaler_state``, ``load_loss_scaler_state``), so this module imports nothing from
``zero_core``'s optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

from zero_ckpt.checksum import PieceChecksums, crc32c, parse_checksum
from zero_ckpt.checks import check_shard_header, expected_shard_tensors
from zero_ckpt.errors import (
    CheckpointError,
    CorruptShardError,
    LayoutMismatchError,
    Problem,
    raise_problems,
)
from zero_ckpt.manifest import (
    MANIFEST_NAME,
    FileMeta,
    GroupMeta,
    Manifest,
    ParamMeta,
    shard_path,
    tensor_name,
)
from zero_ckpt.plan import plan_partition_read
from zero_ckpt.safetensors_format import dtype_size
from zero_ckpt.storage import Location, open_location, prepare_destination
from zero_ckpt.transfer import SourceChecks, _Buffers, copy_op_into, load_manifest, read_header
from zero_ckpt import knobs
from zero_ckpt.writer import dtype_name, write_model_file, write_shard

__all__ = ["save", "load", "LoadResult"]

_VERSION = "0.1.0"
T = TypeVar("T")


@dataclass(frozen=True)
class LoadResult:
    """What ``load`` restored: the checkpoint's manifest, the user's ``extra``, and how many
    shard bytes this rank read (its share, not the whole checkpoint)."""

    manifest: Manifest
    user_extra: dict[str, Any]
    bytes_read: int


# ----- collective helpers ----------------------------------------------------------------------


def _group_of(optimizer: Any):
    return getattr(optimizer, "process_group", None)


def _all_gather(obj: Any, group) -> list[Any]:
    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _agree(step: str, fn: Callable[[], T], group) -> T:
    """Run ``fn`` on every rank; if it failed anywhere, raise on every rank (no rank hangs
    in a later collective while another has given up)."""
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    failures = [f for f in _all_gather(None if error is None else _describe(error), group) if f]
    if error is not None:
        raise error
    if failures:
        raise CheckpointError(f"{step} failed on another rank: {failures[0]}")
    return result


def _describe(exc: BaseException) -> str:
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return f"rank {rank}: {type(exc).__name__}: {exc}"


# ----- naming ----------------------------------------------------------------------------------


def _param_names(optimizer: Any, model: torch.nn.Module | None) -> list[list[str]]:
    """Names per group in flat order: the model's names where a model is given (tied
    parameters get their first name), else the optimizer's."""
    by_id: dict[int, str] = {}
    if model is not None:
        for name, p in model.named_parameters():
            by_id.setdefault(id(p), name)
    names = []
    for g, layout in enumerate(optimizer.layouts):
        params = optimizer.group_params(g)
        names.append([by_id.get(id(p), spec.name) for p, spec in zip(params, layout.params)])
    return names


def _aliases(model: torch.nn.Module | None) -> dict[str, tuple[str, ...]]:
    if model is None:
        return {}
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.setdefault(first[id(p)], []).append(name)
        else:
            first[id(p)] = name
    return {k: tuple(v) for k, v in out.items()}


def _model_only_state(model: torch.nn.Module | None, owned: set[str]) -> dict[str, torch.Tensor]:
    """Module state the optimizer does not own: buffers and frozen parameters."""
    if model is None:
        return {}
    out = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in owned or t is None:
            continue
        if id(t) in seen:  # tied frozen tensors: store once under the first name
            continue
        seen.add(id(t))
        out[name] = t.detach().cpu()
    return out


# ----- save ------------------------------------------------------------------------------------


def _build_manifest(optimizer: Any, model: torch.nn.Module | None, extra: Mapping[str, Any]) -> Manifest:
    names = _param_names(optimizer, model)
    aliases = _aliases(model)
    groups = []
    for g, layout in enumerate(optimizer.layouts):
        states = optimizer.state_partitions(g)
        params = tuple(
            ParamMeta(names[g][i], spec.shape, spec.dtype, spec.offset, aliases.get(names[g][i], ()))
            for i, spec in enumerate(layout.params)
        )
        groups.append(
            GroupMeta(
                numel=layout.numel,
                partition_numel=layout.partition_numel,
                align=layout.align,
                params=params,
                state_keys=tuple(states),
                hyperparams=dict(optimizer.group_hyperparams(g)),
                scalars=dict(optimizer.group_scalars(g)),
                state_dtypes={k: dtype_name(t.dtype) for k, t in states.items() if t.dtype != torch.float32},
            )
        )
    ws = optimizer.world_size
    return Manifest(
        world_size=ws,
        zero_stage=int(getattr(optimizer, "stage", 2)),
        master_dtype="float32",
        groups=tuple(groups),
        shards=tuple(FileMeta(shard_path(r, ws), 0, "", r) for r in range(ws)),
        extra=dict(extra),
        created_by=f"zero-ckpt {_VERSION}",
    )


def save(
    path: str,
    *,
    optimizer: Any,
    model: torch.nn.Module | None = None,
    extra: Mapping[str, Any] | None = None,
    averager: Any = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Save the optimizer's partitioned state (and the model's other state) to ``path``.

    Collective: call on every rank of the optimizer's process group with the same arguments.
    Each rank writes ``shards/rank-r-of-N.safetensors`` holding its partition's real elements
    (fp32 masters and every elementwise state); rank 0 writes ``model.safetensors`` (buffers
    and frozen params of ``model``) and, after every rank's shard is durable, ``manifest.json``.
    ``extra`` (JSON-serialisable) is stored under ``extra["user"]``; the loss scaler's state
    and ``averager.state_dict()`` are stored too. A crash at any point leaves no manifest, so
    the partial checkpoint is never loaded. Returns the manifest.
    """
    group = _group_of(optimizer)
    rank = optimizer.rank
    meta_extra: dict[str, Any] = {"user": dict(extra or {})}
    scaler = optimizer.loss_scaler_state()
    if scaler:
        meta_extra["loss_scaler"] = scaler
    if averager is not None:
        meta_extra["averager"] = averager.state_dict()
    manifest = _build_manifest(optimizer, model, meta_extra)
    loc = open_location(path, storage_options)
    try:
        _agree("preparing the destination", lambda: prepare_destination(None, loc, overwrite) if rank == 0 else None, group)
        loc.makedirs("shards")

        def write_own_shard() -> FileMeta:
            tensors = {}
            for g, layout in enumerate(optimizer.layouts):
                real = layout.real_numel(rank)
                tensors[tensor_name(g, "master")] = optimizer.master_partition(g)[:real]
                for key, t in optimizer.state_partitions(g).items():
                    tensors[tensor_name(g, key)] = t[:real]
            return write_shard(loc, manifest, rank, tensors)

        owned = {p.name for gm in manifest.groups for p in gm.params}
        owned |= {a for gm in manifest.groups for p in gm.params for a in p.aliases}

        def write_rank_files() -> tuple[FileMeta, FileMeta | None]:
            shard = write_own_shard()
            model_file = write_model_file(loc, _model_only_state(model, owned)) if rank == 0 else None
            return shard, model_file

        shard, model_file = _agree("writing shards", write_rank_files, group)
        shards = _all_gather(shard, group)

        def commit() -> None:
            if rank == 0:
                final = replace(manifest, shards=tuple(shards), model_file=model_file)
                final.validate(loc.url_of(MANIFEST_NAME))
                loc.write_atomic(MANIFEST_NAME, final.to_json().encode())

        _agree("writing the manifest", commit, group)
        return replace(manifest, shards=tuple(shards), model_file=_all_gather(model_file, group)[0])
    finally:
        loc.close()


# ----- load ------------------------------------------------------------------------------------


def _check_compatible(manifest: Manifest, optimizer: Any, names: list[list[str]], url: str) -> None:
    if len(manifest.groups) != len(optimizer.layouts):
        raise LayoutMismatchError(
            f"{url} holds {len(manifest.groups)} param groups but the optimizer has "
            f"{len(optimizer.layouts)}; build the optimizer with the same param groups",
            path=url,
        )
    for g, (gm, layout) in enumerate(zip(manifest.groups, optimizer.layouts)):
        saved = [(p.name, tuple(p.shape)) for p in gm.params]
        live = [(names[g][i], tuple(s.shape)) for i, s in enumerate(layout.params)]
        if saved == live:
            continue
        for i, (a, b) in enumerate(zip(saved, live)):
            if a != b:
                raise LayoutMismatchError(
                    f"{url}: group {g} param {i} is {a[0]!r} of shape {list(a[1])} in the "
                    f"checkpoint but {b[0]!r} of shape {list(b[1])} in the optimizer; the model "
                    "does not match the checkpoint",
                    path=url,
                )
        raise LayoutMismatchError(
            f"{url}: group {g} has {len(saved)} params in the checkpoint but {len(live)} in the "
            "optimizer; the model does not match the checkpoint",
            path=url,
        )


def load(
    path: str,
    *,
    optimizer: Any,
    model: torch.nn.Module | None = None,
    averager: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> LoadResult:
    """Restore optimizer (and model) state from ``path``, saved at any data-parallel size.

    Collective: call on every rank of the optimizer's process group. Each rank reads only the
    byte ranges of its new partition; the ranks then check together that every tensor they
    read matches the manifest's checksums. Hyperparameters, scalars (step), the loss scaler,
    ``averager`` state, the model's buffers and frozen params are restored and the model's
    params are set from the loaded masters. Raises the same error on every rank.
    """
    group = _group_of(optimizer)
    loc = open_location(path, storage_options)
    try:
        manifest = _agree("reading the manifest", lambda: load_manifest(loc), group)
        names = _param_names(optimizer, model)
        _agree(
            "matching the checkpoint to the optimizer",
            lambda: _check_compatible(manifest, optimizer, names, loc.url),
            group,
        )
        checks = SourceChecks()
        loaded = _agree(
            "reading this rank's partition",
            lambda: _read_partition(loc, manifest, optimizer, checks),
            group,
        )
        # Together the ranks read every byte of every tensor exactly once: pool the piece
        # checksums and verify each tensor against the manifest.
        all_pieces = _all_gather(
            [(k, pc.pieces) for k, pc in checks.pieces.items()], group
        )
        _agree("verifying checksums", lambda: _verify_pieces(loc, manifest, all_pieces), group)
        tensors_by_group, bytes_read = loaded
        for g, tensors in enumerate(tensors_by_group):
            gm = manifest.groups[g]
            optimizer.load_partition(g, tensors, dict(gm.scalars))
            optimizer.load_hyperparams(g, dict(gm.hyperparams))
        optimizer.sync_model_from_masters()
        optimizer.load_loss_scaler_state(dict(manifest.extra.get("loss_scaler") or {}))
        if averager is not None and "averager" in manifest.extra:
            averager.load_state_dict(manifest.extra["averager"])
        if model is not None and manifest.model_file is not None:
            _agree("loading model.safetensors", lambda: _load_model_file(loc, manifest, model), group)
        return LoadResult(manifest, dict(manifest.extra.get("user") or {}), bytes_read)
    finally:
        loc.close()


def _read_partition(
    loc: Location, manifest: Manifest, optimizer: Any, checks: SourceChecks
) -> tuple[list[dict[str, torch.Tensor]], int]:
    rank, ws = optimizer.rank, optimizer.world_size
    # Headers only of the source ranks this partition overlaps.
    needed: set[int] = set()
    for g, gm in enumerate(manifest.groups):
        lo, hi = optimizer.layouts[g].real_range(rank)
        needed |= {r for r, _, _ in gm.layout(manifest.world_size).locate(lo, hi)}
    headers = {}
    for r in sorted(needed):
        meta = manifest.shard(r)
        url = loc.url_of(meta.path)
        header, _ = read_header(loc, meta.path)
        raise_problems(check_shard_header(manifest, r, header, url), CorruptShardError)
        headers[r] = header
    aligns = {layout.align for layout in optimizer.layouts}
    reads = plan_partition_read(manifest, headers, ws, rank, align=aligns.pop() if len(aligns) == 1 else None)
    buffers = _Buffers()
    chunk = knobs.chunk_bytes()
    out = []
    total = 0
    for g, gm in enumerate(manifest.groups):
        real = reads.real_numel[g]
        if real != optimizer.layouts[g].real_numel(rank):
            raise LayoutMismatchError(
                f"group {g}: the plan reads {real} elements for rank {rank} but the optimizer's "
                f"partition holds {optimizer.layouts[g].real_numel(rank)}; alignment differs per group"
            )
        dest = {
            key: torch.empty(real, dtype=getattr(torch, gm.dtype_of(key, manifest.master_dtype)))
            for key in gm.keys
        }
        views = {key: memoryview(t.view(torch.uint8).numpy()) if real else memoryview(b"") for key, t in dest.items()}
        for op in reads.ops[g]:
            target = views[op.dst_tensor]  # type: ignore[index]

            def emit(rel: int, data: memoryview, op=op, target=target) -> None:
                target[op.dst_start + rel : op.dst_start + rel + len(data)] = data

            copy_op_into(op, loc, buffers, chunk, emit, checks, None)
            total += op.src_nbytes
        out.append(dest)
    return out, total


def _verify_pieces(loc: Location, manifest: Manifest, gathered: list) -> None:
    merged: dict[tuple[str, str | None], PieceChecksums] = {}
    for rank_pieces in gathered:
        for key, pieces in rank_pieces:
            merged.setdefault(tuple(key), PieceChecksums()).pieces.extend(pieces)
    problems = []
    for meta in manifest.shards:
        url = loc.url_of(meta.path)
        sizes = {name: shape[0] * dtype_size(dtype) for name, dtype, shape in expected_shard_tensors(manifest, meta.rank)}  # type: ignore[arg-type]
        for name, recorded in meta.tensors.items():
            pc = merged.get((meta.path, name))
            if pc is None or pc.covered() != sizes.get(name):
                continue  # not read in full by the ranks together: nothing to compare
            crc = pc.combine(sizes[name])
            if crc != parse_checksum(recorded):
                problems.append(
                    Problem(url, f"checksum mismatch in tensor {name!r}: the data is corrupted "
                            "(restore this file from a good copy)", "checksum", meta.rank)
                )
    raise_problems(problems, CorruptShardError)


def _load_model_file(loc: Location, manifest: Manifest, model: torch.nn.Module) -> None:
    from safetensors.torch import load as load_safetensors

    mf = manifest.model_file
    assert mf is not None
    data = loc.read_bytes(mf.path)
    if len(data) != mf.bytes or crc32c(data) != parse_checksum(mf.checksum):
        raise CorruptShardError(
            f"{loc.url_of(mf.path)} does not match the manifest's size or checksum: the data is "
            "corrupted (restore this file from a good copy)",
            path=loc.url_of(mf.path),
        )
    tensors = load_safetensors(data)
    state = model.state_dict(keep_vars=True)
    missing = [n for n in tensors if n not in state]
    if missing:
        raise LayoutMismatchError(
            f"{loc.url_of(mf.path)} holds {missing[:5]} which the model does not have; the model "
            "does not match the checkpoint",
            path=loc.url_of(mf.path),
        )
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)
