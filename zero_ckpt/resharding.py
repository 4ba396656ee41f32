"""``reshard``: rewrite a checkpoint for another data-parallel size, streaming, verified.

Reshard never changes a byte of state, only where it lives: every shard of the result is cut
from the sources' byte ranges by :func:`zero_ckpt.plan.plan_reshard`. With ``part`` the job
is split over processes or hosts (see :mod:`zero_ckpt.parts`); the last part writes the
manifest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from zero_ckpt.formats import detect_location_format
from zero_ckpt.errors import CorruptShardError, LayoutMismatchError, raise_problems
from zero_ckpt.manifest import MANIFEST_NAME, MODEL_FILE_NAME, Manifest
from zero_ckpt.parts import PartResult, PartSpec, PartWork, make_job, resolve_part, run_part
from zero_ckpt.plan import ReshardPlan, plan_reshard
from zero_ckpt.safetensors_format import SafetensorsHeader
from zero_ckpt.destination import check_reads, claim_destination, prepare_output
from zero_ckpt.storage import Location, open_location
from zero_ckpt.transfer import (
    ProgressFn,
    ProgressTracker,
    SourceChecks,
    WrittenFile,
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
    part: tuple[int, int] | str | PartSpec | None = None,
) -> Manifest | PartResult:
    """Write the checkpoint at ``src`` to ``dst`` with ``world_size`` shards; returns its manifest.

    ``expected_world_size`` (the CLI's ``--from``) must match the checkpoint's. Memory stays
    within ``workers`` x ``chunk_bytes`` buffers whatever the checkpoint's size. Every source
    byte is checksummed as it passes and compared with the manifest; on any error ``dst`` is
    left without ``manifest.json`` and without the files this call wrote.
    ``progress(done_bytes, total_bytes)`` is called as data moves.

    ``part``: ``(i, n)`` (or ``"i/n"``) runs only part i of the job split n ways and returns a
    :class:`~zero_ckpt.parts.PartResult`; the part that completes the set writes the
    manifest (``PartResult.manifest``). ``"auto"``: ``(RANK, WORLD_SIZE)`` under torchrun,
    a collective over a gloo group that rank 0 commits (every rank must call it), else the
    whole job. See :mod:`zero_ckpt.parts` for the destination and overwrite rules.
    """
    if world_size < 1:
        raise LayoutMismatchError(f"target world size must be at least 1, got {world_size}")
    spec = resolve_part(part)
    with open_location(src, storage_options) as s, open_location(
        dst, storage_options if dst_storage_options is None else dst_storage_options
    ) as d:
        if detect_location_format(s) == "deepspeed":
            return _reshard_foreign(
                src, dst, s, world_size, expected_world_size, spec, overwrite=overwrite,
                progress=progress, storage_options=storage_options,
                dst_storage_options=dst_storage_options, workers=workers,
                chunk_bytes=chunk_bytes, fsync=fsync,
            )
        if spec is not None:
            result = run_part(
                spec, s, d, lambda: _part_work(s, d, world_size, expected_world_size, spec.parts),
                overwrite=overwrite, workers=workers, chunk_bytes=chunk_bytes, fsync=fsync,
                progress=progress,
            )
            if result.committed:
                result = replace(result, manifest=load_manifest(d))
            return result
        manifest, headers, header_crcs, plan = _plan(s, world_size, expected_world_size)
        check_reads(d, sources=(s,), files=[(s, f.path) for f in _source_files(manifest)])
        with claim_destination(d, "reshard", overwrite):
            prepare_output(d, overwrite, folders=("shards",))
            checks = SourceChecks()
            tracker = ProgressTracker(progress, sum(f.data_bytes for f in plan.files))
            written = run_file_plans(
                s, d, plan.files, workers=workers, chunk_bytes=chunk_bytes, progress=tracker,
                checks=checks, fsync=fsync,
            )
            try:
                raise_problems(
                    checks.problems(s, _source_files(manifest), _by_path(manifest, headers), header_crcs),
                    CorruptShardError,
                )
                target = _target(manifest, plan, written, d)
                d.write_atomic(MANIFEST_NAME, target.to_json().encode())
            except BaseException:
                for path in written:
                    d.remove(path)
                raise
    return target


def _reshard_foreign(
    src: str,
    dst: str,
    s: Location,
    world_size: int,
    expected_world_size: int | None,
    spec: PartSpec | None,
    **options: Any,
) -> Manifest:
    """A DeepSpeed source: the same streaming re-cut, through :func:`zero_ckpt.convert`
    (its model file is a torch zip, planned tensor by tensor)."""
    from zero_ckpt.conversion import convert
    from zero_ckpt.formats.deepspeed import read_deepspeed

    if spec is not None:
        raise LayoutMismatchError(
            f"{src} is a DeepSpeed checkpoint; --part works on format-v1 sources: run "
            "`zero-ckpt convert` first, then split the reshard"
        )
    saved = read_deepspeed(s).manifest.world_size
    _check_expected(s, saved, expected_world_size)
    return convert(src, dst, from_format="deepspeed", world_size=world_size, **options)


def _check_expected(s: Location, saved: int, expected: int | None) -> None:
    if expected is not None and expected != saved:
        raise LayoutMismatchError(
            f"{s.url} holds a checkpoint saved at world size {saved}, not "
            f"{expected}; pass --from {saved} or leave --from out",
            path=s.url,
            expected=expected,
            actual=saved,
        )


def _plan(
    s: Location, world_size: int, expected_world_size: int | None
) -> tuple[Manifest, dict[int, SafetensorsHeader], dict[str, int], ReshardPlan]:
    manifest = load_manifest(s)
    _check_expected(s, manifest.world_size, expected_world_size)
    headers, header_crcs = read_source_headers(s, manifest)
    model_bytes = s.size(manifest.model_file.path) if manifest.model_file else None
    return manifest, headers, header_crcs, plan_reshard(manifest, headers, world_size, model_bytes)


def _source_files(manifest: Manifest) -> list:
    return list(manifest.shards) + ([manifest.model_file] if manifest.model_file else [])


def _by_path(manifest: Manifest, headers: Mapping[int, SafetensorsHeader]) -> dict[str, SafetensorsHeader]:
    return {manifest.shard(r).path: h for r, h in headers.items()}


def _target(manifest: Manifest, plan: ReshardPlan, written: Mapping[str, WrittenFile], d: Location) -> Manifest:
    """The new manifest from what was written: the same bytes whoever computes it."""
    shards = tuple(written[f.path].meta(f.rank) for f in plan.files if f.rank is not None)
    model_file = replace(manifest.model_file, path=MODEL_FILE_NAME) if manifest.model_file else None
    return replace(
        plan.target, shards=shards, model_file=model_file, created_by=f"zero-ckpt {_VERSION}"
    ).validate(d.url_of(MANIFEST_NAME))


def _part_work(
    s: Location, d: Location, world_size: int, expected_world_size: int | None, parts: int
) -> PartWork:
    manifest, headers, header_crcs, plan = _plan(s, world_size, expected_world_size)
    job = make_job(
        "reshard", {"world_size": world_size}, manifest, parts, _VERSION,
        f"reshard {manifest.world_size} -> {world_size}",
    )

    def commit(written: Mapping[str, WrittenFile]) -> None:
        d.write_atomic(MANIFEST_NAME, _target(manifest, plan, written, d).to_json().encode())

    return PartWork(
        job, plan.files, (MANIFEST_NAME,), tuple(_source_files(manifest)),
        _by_path(manifest, headers), header_crcs, commit,
    )
