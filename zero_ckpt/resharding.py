"""``reshard``: rewrite a checkpoint for another data-parallel size, streaming, verified.

Reshard never changes a byte of state, only where it lives: the source is opened as a
:class:`~zero_ckpt.view.SourceView` (any registered format) and every shard of the result is
cut from its byte ranges by :func:`zero_ckpt.plan.plan_reshard`, then written by the format-v1
writer. :func:`reshard` runs the whole job and returns the new manifest; :func:`reshard_part`
runs one part of the job split over processes or hosts (see :mod:`zero_ckpt.parts`) and
returns a :class:`~zero_ckpt.parts.PartResult`; the last part writes the manifest.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator, Mapping

from zero_ckpt.errors import LayoutMismatchError
from zero_ckpt.formats.registry import open_view, precheck
from zero_ckpt.formats.v1.write import VERSION, target_manifest, write_view
from zero_ckpt.manifest import MANIFEST_NAME, Manifest
from zero_ckpt.parts import PartResult, PartSpec, PartWork, make_job, resolve_part, run_part
from zero_ckpt.plan import plan_reshard
from zero_ckpt.storage import Location, open_location
from zero_ckpt.transfer import ProgressFn, WrittenFile, load_manifest
from zero_ckpt.view import SourceView

__all__ = ["reshard", "reshard_part"]


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
    from_format: str = "auto",
) -> Manifest:
    """Write the checkpoint at ``src`` to ``dst`` with ``world_size`` shards; returns its manifest.

    ``src`` may be in any registered format (format v1, DeepSpeed ZeRO-1/2, PyTorch DCP; see
    :mod:`zero_ckpt.formats.registry`); the result is format v1.
    ``expected_world_size`` (the CLI's ``--from``) must match the checkpoint's. Memory stays
    within ``workers`` x ``chunk_bytes`` buffers whatever the checkpoint's size. Every source
    byte is checksummed as it passes and compared with the manifest; on any error ``dst`` is
    left without ``manifest.json`` and without the files this call wrote.
    ``progress(done_bytes, total_bytes)`` is called as data moves.

    To split the job over processes or hosts, use :func:`reshard_part`.
    """
    with _locations(src, dst, world_size, storage_options, dst_storage_options) as (s, d):
        view = _open(s, expected_world_size, from_format)
        return write_view(
            s, d, view, world_size=world_size, overwrite=overwrite, progress=progress,
            workers=workers, chunk_bytes=chunk_bytes, fsync=fsync, src_url=src,
            precheck=lambda: precheck(s, view),
        )


def reshard_part(
    src: str,
    dst: str,
    *,
    world_size: int,
    part: tuple[int, int] | str | PartSpec,
    expected_world_size: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
    from_format: str = "auto",
) -> PartResult:
    """Run one part of :func:`reshard` (same arguments) split over processes or hosts.

    ``part``: ``(i, n)``, ``"i/n"`` or a :class:`~zero_ckpt.parts.PartSpec` runs only part i
    of the job split n ways (no process group); the part that completes the set writes the
    manifest (``PartResult.committed``, ``PartResult.manifest``); the others return with
    ``waiting_for``. ``"distributed"``: this process is rank ``RANK`` of a torchrun launch
    (a collective over a gloo group that rank 0 commits: every rank must call it).
    ``"auto"``: ``"distributed"`` when RANK and WORLD_SIZE are set, else the whole job runs
    here as part 0/1 (the result is committed and carries the manifest). See
    :mod:`zero_ckpt.parts` for the destination, overwrite and resume rules.
    """
    spec = resolve_part(part) or PartSpec(0, 1)  # "auto" outside torchrun: all of it, as 0/1
    with _locations(src, dst, world_size, storage_options, dst_storage_options) as (s, d):
        result = run_part(
            spec, s, d,
            lambda: _part_work(s, d, world_size, expected_world_size, spec.parts, from_format, src),
            overwrite=overwrite, workers=workers, chunk_bytes=chunk_bytes, fsync=fsync,
            progress=progress,
        )
        if result.committed:
            result = replace(result, manifest=load_manifest(d))
        return result


@contextmanager
def _locations(
    src: str, dst: str, world_size: int, storage_options: dict[str, Any] | None,
    dst_storage_options: dict[str, Any] | None,
) -> Iterator[tuple[Location, Location]]:
    if world_size < 1:
        raise LayoutMismatchError(f"target world size must be at least 1, got {world_size}")
    with open_location(src, storage_options) as s, open_location(
        dst, storage_options if dst_storage_options is None else dst_storage_options
    ) as d:
        yield s, d


def _open(s: Location, expected_world_size: int | None, from_format: str) -> SourceView:
    view = open_view(s, from_format)
    view.check_saved_world_size(expected_world_size)
    return view


def _part_work(
    s: Location, d: Location, world_size: int, expected_world_size: int | None, parts: int,
    from_format: str, src: str,
) -> PartWork:
    view = _open(s, expected_world_size, from_format)
    precheck(s, view)  # a part sees only its share of the reads: the format checks its files first
    plan = plan_reshard(view, world_size)
    job = make_job(
        "reshard", {"world_size": world_size}, view.manifest, parts, VERSION,
        f"reshard {view.manifest.world_size} -> {world_size}",
    )

    def commit(written: Mapping[str, WrittenFile]) -> None:
        d.write_atomic(MANIFEST_NAME, target_manifest(view, plan, written, d, src).to_json().encode())

    return PartWork(
        job, plan.files, (MANIFEST_NAME,), view.checked_files, view.checks.headers,
        view.checks.header_crcs, commit,
    )
