"""``load``: restore a live ``ZeroOptimizer`` (and model) from a format v1 checkpoint saved at
any data-parallel size.

A collective over the optimizer's process group: each rank reads only the byte ranges its new
partition needs, planned by the same code as the offline reshard
(:func:`zero_ckpt.plan.plan_partition_read`), and the ranks verify the checksums of what they
read together. Every step that can fail on some ranks only is followed by the cross-rank
agreement (:mod:`zero_ckpt.agreement`), so a failure anywhere raises the same error class on
every rank. Everything is read and checked before anything changes: a failed load leaves the
optimizer, the model and the averager as they were.

The optimizer is used through its bridge interface (``layouts``, ``group_params``,
``load_partition``, ``load_hyperparams``, ``sync_model_from_masters``,
``load_loss_scaler_state``), so this module imports nothing from ``zero_core``'s optimizer.
The module is named by a noun so that importing it never replaces the package's ``load``.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from zero_ckpt import knobs, runs
from zero_ckpt.agreement import agree, all_gather
from zero_ckpt.async_saving import finish_pending
from zero_ckpt.checksum import crc32c, parse_checksum
from zero_ckpt.checks import check_shard_header
from zero_ckpt.errors import CorruptShardError, LayoutMismatchError, Problem, raise_problems
from zero_ckpt.manifest import Manifest
from zero_ckpt.view import SourceView, rank_extents
from zero_ckpt.plan import CopyOp, plan_partition_read, split_op
from zero_ckpt.safetensors_format import SafetensorsHeader
from zero_ckpt.snapshot import group_of, model_only_state, owned_names, param_names
from zero_ckpt.storage import Location, open_location
from zero_ckpt.transfer import (
    SourceChecks,
    _Buffers,
    copy_op_into,
    load_manifest,
    read_header,
    resolve_workers,
)

__all__ = ["load", "LoadResult"]

# Names ZeroOptimizer invents for params given without names: not an identity to check.
_INVENTED_NAME = re.compile(r"group\d+\.param\d+")


@dataclass(frozen=True)
class LoadResult:
    """What ``load`` restored: the checkpoint's manifest, the user's ``extra``, and how many
    bytes of shard tensor data this rank read (its share of the checkpoint, not all of it;
    headers and ``model.safetensors`` are not counted)."""

    manifest: Manifest
    user_extra: dict[str, Any]
    bytes_read: int


def _check_compatible(
    manifest: Manifest, optimizer: Any, names: list[list[str]], check_names: bool, url: str
) -> None:
    if len(manifest.groups) != len(optimizer.layouts):
        raise LayoutMismatchError(
            f"{url} holds {len(manifest.groups)} param groups but the optimizer has "
            f"{len(optimizer.layouts)}; build the optimizer with the same param groups",
            path=url,
        )
    for g, (gm, layout) in enumerate(zip(manifest.groups, optimizer.layouts)):
        saved = [(p.name, tuple(p.shape)) for p in gm.params]
        live = [(names[g][i], tuple(s.shape)) for i, s in enumerate(layout.params)]
        for i, (a, b) in enumerate(zip(saved, live)):
            if a[1] != b[1] or (check_names and a[0] != b[0]):
                raise LayoutMismatchError(
                    f"{url}: group {g} param {i} is {a[0]!r} of shape {list(a[1])} in the "
                    f"checkpoint but {b[0]!r} of shape {list(b[1])} in the optimizer; the model "
                    "does not match the checkpoint",
                    path=url,
                )
        if len(saved) != len(live):
            raise LayoutMismatchError(
                f"{url}: group {g} has {len(saved)} params in the checkpoint but {len(live)} in "
                "the optimizer; the model does not match the checkpoint",
                path=url,
            )


def _names_are_real(optimizer: Any, model: torch.nn.Module | None) -> bool:
    """Whether the live names identify params (a model, or names given to the optimizer)."""
    if model is not None:
        return True
    return not all(
        _INVENTED_NAME.fullmatch(p.name) for layout in optimizer.layouts for p in layout.params
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

    ``path`` is a checkpoint, or a run directory whose ``latest`` file names one. An async
    save of ``optimizer`` still in flight is finished first (and its failure raised, as
    ``CheckpointError``, unless ``wait()`` reported it already).

    Collective: call on every rank of the optimizer's process group. Each rank reads only the
    byte ranges of its new partition; the ranks then check together that every tensor they
    read matches the manifest's checksums. Then, and only then, the state is replaced: masters
    and tensor states (state the checkpoint does not hold is dropped), scalars (``step``),
    hyperparameters (``lr``, ...), the loss scaler, ``averager`` state, the model's buffers
    and frozen params (when the checkpoint has ``model.safetensors`` and ``model`` is given;
    their names and shapes must match), and the model's params are set from the loaded
    masters.

    The checkpoint must hold the same param groups with the same params (shapes; names too
    where the model or the optimizer gives names): else :class:`LayoutMismatchError`.
    Raises the same error class on every rank; when reading or checking fails (a mismatched
    model, a missing, truncated or corrupted file, a bad averager state), nothing has changed.
    """
    group = group_of(optimizer)
    finish_pending(optimizer, f"the load of {path}")
    # A run directory means the checkpoint its `latest` names: rank 0 decides, for all.
    resolved = agree(
        "resolving the checkpoint",
        lambda: runs.resolve_checkpoint(path, storage_options) if optimizer.rank == 0 else None,
        group,
    )
    path = all_gather(resolved, group)[0]
    loc = open_location(path, storage_options)
    try:
        manifest = agree("reading the manifest", lambda: load_manifest(loc), group)
        names = param_names(optimizer, model)
        check_names = _names_are_real(optimizer, model)
        agree(
            "matching the checkpoint to the optimizer",
            lambda: _check_compatible(manifest, optimizer, names, check_names, loc.url),
            group,
        )
        checks = SourceChecks()
        read = agree(
            "reading this rank's partition",
            lambda: _read_partition(loc, manifest, optimizer, checks),
            group,
        )
        tensors_by_group, bytes_read, headers, header_crcs = read
        # Together the ranks read every byte of every tensor exactly once: pool the piece
        # checksums (and the headers they saw) and verify each tensor against the manifest.
        pooled = all_gather(
            ([(k, pc.pieces) for k, pc in checks.pieces.items()], headers, header_crcs), group
        )
        agree("verifying checksums", lambda: _verify(loc, manifest, pooled), group)
        model_state = agree(
            "reading model.safetensors", lambda: _read_model_file(loc, manifest, model), group
        )
        if averager is not None and "averager" in manifest.extra:
            # Validates before it changes anything; nothing else has changed yet.
            agree(
                "restoring the averager",
                lambda: averager.load_state_dict(manifest.extra["averager"]),
                group,
            )

        def apply() -> None:
            for g, tensors in enumerate(tensors_by_group):
                gm = manifest.groups[g]
                optimizer.load_partition(g, tensors, dict(gm.scalars))
                optimizer.load_hyperparams(g, dict(gm.hyperparams))
            optimizer.load_loss_scaler_state(dict(manifest.extra.get("loss_scaler") or {}))
            with torch.no_grad():
                for live, value in model_state:
                    live.copy_(value)

        agree("loading the state", apply, group)
        optimizer.sync_model_from_masters()
        return LoadResult(manifest, dict(manifest.extra.get("user") or {}), bytes_read)
    finally:
        loc.close()


def _read_partition(
    loc: Location, manifest: Manifest, optimizer: Any, checks: SourceChecks
) -> tuple[list[dict[str, torch.Tensor]], int, dict[str, SafetensorsHeader], dict[str, int]]:
    """This rank's new partitions, read from the source shards that overlap them.

    Returns ``(tensors per group keyed master/state, tensor bytes read, headers read by
    shard path, their header CRCs)``.
    """
    rank, ws = optimizer.rank, optimizer.world_size
    layouts = optimizer.layouts
    # One plan per alignment in use (an optimizer may align differently than the one that
    # saved; the flat buffer, and so the bytes, are the same).
    aligns = sorted({layout.align for layout in layouts})
    # Headers only of the source ranks this partition overlaps.
    needed: set[int] = set()
    for g, gm in enumerate(manifest.groups):
        lo, hi = layouts[g].real_range(rank)
        needed |= {r for r, _, _ in gm.layout(manifest.world_size).locate(lo, hi)}
    headers: dict[int, SafetensorsHeader] = {}
    header_crcs: dict[str, int] = {}
    problems: list[Problem] = []
    for r in sorted(needed):
        meta = manifest.shard(r)
        url = loc.url_of(meta.path)
        size = loc.size(meta.path)
        if size != meta.bytes:
            problems.append(
                Problem(url, f"is {size} bytes, the manifest says {meta.bytes} (truncated or "
                        "replaced?)", "size", r)
            )
            continue
        header, crc = read_header(loc, meta.path, size)
        problems += check_shard_header(manifest, r, header, url)
        headers[r], header_crcs[meta.path] = header, crc
    raise_problems(problems, CorruptShardError)
    view = SourceView("zero-ckpt", loc.url, manifest, rank_extents(manifest, headers))
    plans = {a: plan_partition_read(view, ws, rank, align=a) for a in aligns}
    buffers = _Buffers()
    chunk = knobs.chunk_bytes()
    out = []
    total = 0
    jobs: list[tuple[CopyOp, memoryview]] = []
    for g, gm in enumerate(manifest.groups):
        reads = plans[layouts[g].align]
        real = reads.real_numel[g]
        if real != layouts[g].real_numel(rank):  # the plan and the optimizer disagree: a bug
            raise LayoutMismatchError(
                f"group {g}: the plan reads {real} elements for rank {rank} but the optimizer's "
                f"partition holds {layouts[g].real_numel(rank)} real elements"
            )
        dest = {
            key: torch.empty(real, dtype=getattr(torch, gm.dtype_of(key, manifest.master_dtype)))
            for key in gm.keys
        }
        views = {key: memoryview(t.view(torch.uint8).numpy()) if real else memoryview(b"") for key, t in dest.items()}
        for op in reads.ops[g]:
            # Pieces of a few chunks each: several ranged reads in flight even when the
            # partition comes from one source shard.
            jobs += [(piece, views[op.dst_tensor]) for piece in split_op(op, 4 * chunk)]  # type: ignore[index]
            total += op.src_nbytes
        out.append(dest)
    # Disjoint destination ranges: workers write without locks (the checks have their own).
    with ThreadPoolExecutor(max_workers=resolve_workers(None, chunk)) as pool:
        for f in [pool.submit(_copy, op, loc, buffers, chunk, view, checks) for op, view in jobs]:
            f.result()
    by_path = {manifest.shard(r).path: h for r, h in headers.items()}
    return out, total, by_path, header_crcs


def _copy(
    op: CopyOp, loc: Location, buffers: _Buffers, chunk: int, target: memoryview, checks: SourceChecks
) -> None:
    def emit(rel: int, data: memoryview) -> None:
        target[op.dst_start + rel : op.dst_start + rel + len(data)] = data

    copy_op_into(op, loc, buffers, chunk, emit, checks, None)


def _verify(loc: Location, manifest: Manifest, pooled: list) -> None:
    """Check every tensor (or, for shards recorded without per-tensor checksums, every
    file) the ranks read in full together against the manifest's checksums."""
    merged = SourceChecks()
    headers: dict[str, SafetensorsHeader] = {}
    header_crcs: dict[str, int] = {}
    for pieces, rank_headers, rank_crcs in pooled:
        for key, ps in pieces:
            for piece in ps:
                merged.add(key[0], key[1], *piece)
        headers.update(rank_headers)
        header_crcs.update(rank_crcs)
    raise_problems(merged.problems(loc, manifest.shards, headers, header_crcs), CorruptShardError)


def _read_model_file(
    loc: Location, manifest: Manifest, model: torch.nn.Module | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(live model tensor, saved value)`` pairs for the model's buffers and frozen params,
    read from ``model.safetensors`` and checked (checksum, names, shapes); nothing is
    written yet. Empty without a model or a model file."""
    from safetensors.torch import load as load_safetensors

    mf = manifest.model_file
    if model is None or mf is None:
        return []
    url = loc.url_of(mf.path)
    data = loc.read_bytes(mf.path, max_bytes=mf.bytes)
    if len(data) != mf.bytes or crc32c(data) != parse_checksum(mf.checksum):
        raise CorruptShardError(
            f"{url} does not match the manifest's size or checksum: the data is corrupted "
            "(restore this file from a good copy)",
            path=url,
        )
    saved = load_safetensors(data)
    live = model_only_state(model, owned_names(manifest))
    unexpected = sorted(set(saved) - set(live))
    missing = sorted(set(live) - set(saved))
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"holds {unexpected[:5]} which the model does not have")
        if missing:
            parts.append(f"lacks the model's {missing[:5]}")
        raise LayoutMismatchError(
            f"{url} {' and '.join(parts)} (buffers and frozen params); the model does not match "
            "the checkpoint",
            path=url,
        )
    pairs = []
    for name, value in saved.items():
        target = live[name]
        if tuple(target.shape) != tuple(value.shape):
            raise LayoutMismatchError(
                f"{url}: {name!r} has shape {list(value.shape)} in the checkpoint but "
                f"{list(target.shape)} in the model; the model does not match the checkpoint",
                path=url,
            )
        pairs.append((target, value))
    return pairs
