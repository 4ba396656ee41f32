"""What a save writes and how: the snapshot (metadata, this rank's shard tensors, the model's
other state, taken at one moment) and the writing of it, shared by :func:`zero_ckpt.save`
(:mod:`zero_ckpt.saving`) and :func:`zero_ckpt.async_save` (:mod:`zero_ckpt.async_saving`);
plus the naming of the optimizer's params that :mod:`zero_ckpt.loading` shares.

Part of the bridge layer (imports torch; collectives over the optimizer's process group, each
fallible step followed by :func:`zero_ckpt.agreement.agree`). The optimizer is used through
its bridge interface (``layouts``, ``group_params``, ``master_partition``,
``state_partitions``, ``group_scalars``, ``group_hyperparams``, ``loss_scaler_state``), so
this module imports nothing from ``zero_core``'s optimizer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch

from zero_ckpt import __version__, runs
from zero_ckpt.agreement import agree, all_gather
from zero_ckpt.errors import CheckpointError, ManifestError
from zero_ckpt.manifest import (
    MANIFEST_NAME,
    FileMeta,
    GroupMeta,
    Manifest,
    ParamMeta,
    shard_path,
    tensor_name,
)
from zero_ckpt.destination import prepare_destination
from zero_ckpt.storage import Location
from zero_ckpt.writer import dtype_name, write_model_file, write_shard

__all__ = [
    "Snapshot",
    "take_snapshot",
    "write_snapshot",
    "check_save_args",
    "group_of",
    "param_names",
    "owned_names",
    "model_only_state",
]


def group_of(optimizer: Any):
    """The optimizer's process group (None: the default group, or none at all)."""
    return getattr(optimizer, "process_group", None)


# ----- naming ----------------------------------------------------------------------------------


def param_names(optimizer: Any, model: torch.nn.Module | None) -> list[list[str]]:
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


def owned_names(manifest: Manifest) -> set[str]:
    return {n for gm in manifest.groups for p in gm.params for n in (p.name, *p.aliases)}


def model_only_state(model: torch.nn.Module | None, owned: set[str]) -> dict[str, torch.Tensor]:
    """Module state the optimizer does not own: buffers and frozen parameters (live tensors,
    each stored once under its first name)."""
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
        out[name] = t.detach()
    return out


# ----- snapshot and writing --------------------------------------------------------------------


def _build_manifest(optimizer: Any, model: torch.nn.Module | None, extra: Mapping[str, Any]) -> Manifest:
    names = param_names(optimizer, model)
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
    manifest = Manifest(
        world_size=ws,
        zero_stage=int(getattr(optimizer, "stage", 2)),
        master_dtype="float32",
        groups=tuple(groups),
        shards=tuple(FileMeta(shard_path(r, ws), 0, "", r) for r in range(ws)),
        extra=dict(extra),
        created_by=f"zero-ckpt {__version__}",
    )
    try:  # fail before anything is written, not at the commit
        manifest.to_json()
    except (TypeError, ValueError) as exc:
        raise ManifestError(
            f"the checkpoint metadata cannot be written as JSON ({exc}); pass `extra` (and "
            "hyperparameters) made of dicts, lists, strings, finite numbers, booleans and None"
        ) from None
    return manifest


@dataclass
class Snapshot:
    """What a save writes, taken at one moment: the agreed metadata (rank 0's), this rank's
    shard tensors and (rank 0) the model's other state. Views of live state for a blocking
    save, copies in reusable staging buffers for an async one."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    model_state: dict[str, torch.Tensor]


def take_snapshot(
    optimizer: Any,
    model: torch.nn.Module | None,
    extra: Mapping[str, Any] | None,
    averager: Any,
    group,
    staging: dict[str, torch.Tensor] | None,
) -> Snapshot:
    """Take this rank's snapshot: the agreed metadata (built on every rank, rank 0's kept),
    views of the shard tensors, and (rank 0) the model's other state; copied into
    ``staging`` (host buffers kept across saves) when given. Collective over ``group``."""
    rank = optimizer.rank

    def build() -> Manifest:
        meta_extra: dict[str, Any] = {"user": dict(extra or {})}
        scaler = optimizer.loss_scaler_state()
        if scaler:
            meta_extra["loss_scaler"] = scaler
        if averager is not None:
            meta_extra["averager"] = averager.state_dict()
        return _build_manifest(optimizer, model, meta_extra)

    # Everything that can be refused is refused before the destination is touched.
    local = agree("building the checkpoint metadata", build, group)
    # One metadata for all: rank 0's (a rank whose state does not fit it fails when writing).
    manifest: Manifest = all_gather(local if rank == 0 else None, group)[0]
    tensors: dict[str, torch.Tensor] = {}
    for g, layout in enumerate(optimizer.layouts):
        real = layout.real_numel(rank)
        tensors[tensor_name(g, "master")] = optimizer.master_partition(g)[:real]
        for key, t in optimizer.state_partitions(g).items():
            tensors[tensor_name(g, key)] = t[:real]
    model_state = model_only_state(model, owned_names(manifest)) if rank == 0 else {}
    if staging is not None:
        tensors = _stage(staging, "opt", tensors)
        model_state = _stage(staging, "model", model_state)
        # The metadata too is the one at the save call: without a process group (or on rank
        # 0 of one, before the all-gather copies it) it still shares the caller's nested
        # ``extra`` values, which training may change while the save is in flight.
        manifest = copy.deepcopy(manifest)
    return Snapshot(manifest, tensors, model_state)


def _stage(staging: dict[str, torch.Tensor], prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors into host buffers kept across saves (pinned when they come from a GPU),
    reallocating only when a size or dtype changes."""
    out = {}
    for name, t in tensors.items():
        key = f"{prefix}/{name}"
        buf = staging.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            staging[key] = buf
        buf.copy_(t.detach(), non_blocking=t.is_cuda)
        out[name] = buf
    if any(t.is_cuda for t in tensors.values()):
        torch.cuda.synchronize()
    return out


def write_snapshot(
    snap: Snapshot,
    loc: Location,
    group,
    rank: int,
    *,
    overwrite: bool,
    latest: bool,
    keep_last: int | None,
) -> Manifest:
    """Write a snapshot: destination, shards (+ model file), manifest, then ``latest`` and
    retention. Collective over ``group``; raises the same error on every rank."""
    agree(
        "preparing the destination",
        lambda: prepare_destination(None, loc, overwrite) if rank == 0 else None,
        group,
    )

    def write_rank_files() -> tuple[FileMeta, FileMeta | None]:
        loc.makedirs("shards")
        shard = write_shard(loc, snap.manifest, rank, snap.tensors)
        model_file = write_model_file(loc, snap.model_state) if rank == 0 else None
        return shard, model_file

    written = agree("writing shards", write_rank_files, group)
    gathered = all_gather(written, group)
    final = replace(snap.manifest, shards=tuple(s for s, _ in gathered), model_file=gathered[0][1])

    def commit() -> None:
        if rank == 0:
            final.validate(loc.url_of(MANIFEST_NAME))
            loc.write_atomic(MANIFEST_NAME, final.to_json().encode())

    agree("writing the manifest", commit, group)
    if latest or keep_last is not None:

        def publish() -> None:
            if rank != 0:
                return
            run_url, _, name = loc.url.rpartition("/")
            run_url = run_url or "."
            runs.update_latest(run_url, name, loc.storage_options)
            if keep_last is not None:
                runs.apply_retention(run_url, keep_last, loc.storage_options)

        # The checkpoint is complete and committed even if this step fails; say so.
        try:
            agree("updating latest / retention (the checkpoint itself is complete)", publish, group)
        except CheckpointError as exc:
            raise type(exc)(
                f"{loc.url} was saved completely, but updating the run directory failed: {exc}",
                path=exc.path,
                rank=exc.rank,
            ) from None
    return final


def check_save_args(keep_last: int | None) -> None:
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")
