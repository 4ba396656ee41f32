"""Writing format v1 from any :class:`~zero_ckpt.view.SourceView`: shards cut for a world size,
``model.safetensors`` planned tensor by tensor, ``manifest.json`` last.

``reshard`` (a format-v1 source) and ``convert`` (any other) are this writer; nothing here
knows which format the view came from.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

from zero_ckpt.destination import check_reads, claim_destination, prepare_output
from zero_ckpt.manifest import MANIFEST_NAME, MODEL_FILE_NAME, Manifest
from zero_ckpt.plan import ReshardPlan, plan_reshard
from zero_ckpt.storage import Location
from zero_ckpt.transfer import ProgressFn, ProgressTracker, WrittenFile, write_and_commit
from zero_ckpt.view import SourceView

__all__ = ["write_view", "target_manifest", "VERSION"]

VERSION = "0.1.0"


def target_manifest(
    view: SourceView, plan: ReshardPlan, written: Mapping[str, WrittenFile], d: Location, src_url: str
) -> Manifest:
    """The new manifest from what was written: the same bytes whoever computes it. A source
    in another format is recorded under ``extra["converted_from"]``."""
    source = view.manifest
    shards = tuple(written[f.path].meta(f.rank) for f in plan.files if f.rank is not None)
    model_file = written[MODEL_FILE_NAME].meta() if MODEL_FILE_NAME in written else None
    extra = dict(source.extra)
    if view.format != "zero-ckpt":
        extra["converted_from"] = {
            "format": view.format,
            "url": src_url,
            **dict(view.origin),
            "world_size": source.world_size,
            "created_by": source.created_by,
        }
    return replace(
        plan.target, shards=shards, model_file=model_file, extra=extra,
        created_by=f"zero-ckpt {VERSION}",
    ).validate(d.url_of(MANIFEST_NAME))


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
    precheck: Callable[[], None] | None = None,
    **_: Any,
) -> Manifest:
    """Write ``view`` (read from ``s``) to ``d`` as format v1 with ``world_size`` shards.

    Every source byte is checked as it streams against the checksums the view records;
    ``precheck`` (the source format's own check of its files) runs before the commit when some
    byte was not covered that way. On any error ``d`` keeps nothing this call wrote and has no
    ``manifest.json``."""
    plan = plan_reshard(view, world_size)
    check_reads(d, sources=(s,), files=[(s, f.path) for f in view.files])
    with claim_destination(d, "reshard" if view.format == "zero-ckpt" else "convert", overwrite):
        prepare_output(d, overwrite, folders=("shards",))
        committed: list[Manifest] = []

        def commit(written: Mapping[str, WrittenFile]) -> None:
            committed.append(target_manifest(view, plan, written, d, src_url or s.url))
            d.write_atomic(MANIFEST_NAME, committed[0].to_json().encode())

        write_and_commit(
            s, d, view, plan.files, commit, precheck=precheck,
            progress=ProgressTracker(progress, sum(f.data_bytes for f in plan.files)),
            workers=workers, chunk_bytes=chunk_bytes, fsync=fsync,
        )
    return committed[0]
