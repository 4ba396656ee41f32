"""``reshard``: rewrite a checkpoint for another data-parallel size, streaming, verified.

Reshard never changes a byte of state, only where it lives: every shard of the result is cut
from the sources' byte ranges by :func:`zero_ckpt.plan.plan_reshard`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from zero_ckpt.errors import CorruptShardError, LayoutMismatchError, raise_problems
from zero_ckpt.manifest import MANIFEST_NAME, MODEL_FILE_NAME, Manifest
from zero_ckpt.plan import plan_reshard
from zero_ckpt.storage import open_location, prepare_destination
from zero_ckpt.transfer import (
    ProgressFn,
    ProgressTracker,
    SourceChecks,
    load_manifest,
    read_source_headers,
    run_file_plans,
)

__all__ = ["reshard"]

_VERSION = "0.1.0"


def reshard(
    src: str,
    dst: str,
    *,
    world_size: int,
    expected_world_size: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
) -> Manifest:
    """Write the checkpoint at ``src`` to ``dst`` with ``world_size`` shards; returns its manifest.

    ``expected_world_size`` (the CLI's ``--from``) must match the checkpoint's. Memory stays
    within ``workers`` x ``chunk_bytes`` buffers whatever the checkpoint's size. Every source
    byte is checksummed as it passes and compared with the manifest; on any error ``dst`` is
    left without ``manifest.json`` and without the files this call wrote.
    ``progress(done_bytes, total_bytes)`` is called as data moves.
    """
    if world_size < 1:
        raise LayoutMismatchError(f"target world size must be at least 1, got {world_size}")
    with open_location(src, storage_options) as s, open_location(
        dst, storage_options if dst_storage_options is None else dst_storage_options
    ) as d:
        manifest = load_manifest(s)
        if expected_world_size is not None and expected_world_size != manifest.world_size:
            raise LayoutMismatchError(
                f"{src} holds a checkpoint saved at world size {manifest.world_size}, not "
                f"{expected_world_size}; pass --from {manifest.world_size} or leave --from out",
                path=s.url_of(MANIFEST_NAME),
                expected=expected_world_size,
                actual=manifest.world_size,
            )
        headers, header_crcs = read_source_headers(s, manifest)
        model_bytes = s.size(manifest.model_file.path) if manifest.model_file else None
        plan = plan_reshard(manifest, headers, world_size, model_bytes)
        prepare_destination(s, d, overwrite)
        checks = SourceChecks()
        tracker = ProgressTracker(progress, sum(f.data_bytes for f in plan.files))
        written = run_file_plans(
            s, d, plan.files, workers=workers, chunk_bytes=chunk_bytes, progress=tracker,
            checks=checks, fsync=fsync,
        )
        try:
            files = list(manifest.shards) + ([manifest.model_file] if manifest.model_file else [])
            by_path = {manifest.shard(r).path: h for r, h in headers.items()}
            raise_problems(checks.problems(s, files, by_path, header_crcs), CorruptShardError)
            shards = tuple(written[f.path].meta(f.rank) for f in plan.files if f.rank is not None)
            model_file = (
                replace(manifest.model_file, path=MODEL_FILE_NAME) if manifest.model_file else None
            )
            target = replace(
                plan.target, shards=shards, model_file=model_file, created_by=f"zero-ckpt {_VERSION}"
            ).validate(d.url_of(MANIFEST_NAME))
            d.write_atomic(MANIFEST_NAME, target.to_json().encode())
        except BaseException:
            for path in written:
                d.remove(path)
            raise
    return target
