"""``save``: write a live ``ZeroOptimizer``'s partitioned state as a format v1 checkpoint.

A collective over the optimizer's process group: every rank calls it with the same path and
writes its own shard (padding stripped) in parallel; rank 0 writes ``model.safetensors`` and,
once every shard is durable, ``manifest.json`` last. Every step that can fail on some ranks
only is followed by the cross-rank agreement (:mod:`zero_ckpt.agreement`), so a failure on
any rank raises the same error class on every rank and no rank is left waiting.

The snapshot and its writing are shared with the background save (:mod:`zero_ckpt.snapshot`,
:func:`zero_ckpt.async_save`); the module is named by a noun so that importing it never
replaces the package's ``save`` function.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from zero_ckpt.async_saving import finish_pending
from zero_ckpt.manifest import Manifest
from zero_ckpt.snapshot import check_save_args, group_of, take_snapshot, write_snapshot
from zero_ckpt.storage import open_location

__all__ = ["save"]


def save(
    path: str,
    *,
    optimizer: Any,
    model: torch.nn.Module | None = None,
    extra: Mapping[str, Any] | None = None,
    averager: Any = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    latest: bool = False,
    keep_last: int | None = None,
) -> Manifest:
    """Save the optimizer's partitioned state (and the model's other state) to ``path``;
    return the manifest written.

    Collective: call on every rank of the optimizer's process group with the same arguments.
    Each rank writes ``shards/rank-r-of-N.safetensors`` holding its partition's real elements
    (fp32 masters and every elementwise state); rank 0 writes ``model.safetensors`` (buffers
    and frozen params of ``model``) and, after every rank's shard is durable, ``manifest.json``.
    ``extra`` (JSON-serialisable) is stored under ``extra["user"]``; the loss scaler's state
    and ``averager.state_dict()`` are stored too. Rank 0's view of the metadata (groups,
    hyperparameters, step) is the one recorded; every rank's shard must fit it.

    ``path`` must not exist or be empty unless ``overwrite`` (then the old checkpoint's
    manifest is removed first, and the rest of it, before anything is written). A failure or
    crash at any point leaves no manifest, so the partial checkpoint is never loaded; a refused
    save (non-empty ``path``) changes nothing on disk. Raises on every rank.

    Run directories: with ``latest=True`` the parent of ``path`` gets a ``latest`` file naming
    this checkpoint, written only after the manifest; ``keep_last=K`` (which implies
    ``latest``: retention keeps what ``latest`` names) then deletes all but the
    newest K complete checkpoints there (never the one ``latest`` names; see
    :func:`zero_ckpt.runs.apply_retention`).

    To save in the background, see :func:`zero_ckpt.async_save`. A background save of
    ``optimizer`` still in flight is finished first (and its failure raised, as
    ``CheckpointError``, unless its ``wait()`` reported it already).
    """
    check_save_args(keep_last)
    group = group_of(optimizer)
    finish_pending(optimizer, f"the save to {path}")
    loc = open_location(path, storage_options)
    try:
        snap = take_snapshot(optimizer, model, extra, averager, group, None)
        return write_snapshot(
            snap, loc, group, optimizer.rank, overwrite=overwrite, latest=latest, keep_last=keep_last
        )
    finally:
        loc.close()
