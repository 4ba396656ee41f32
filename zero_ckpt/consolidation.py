"""``consolidate``: full named tensors out of a partitioned checkpoint, streaming, verified.

The output is Hugging Face style safetensors (``model.safetensors`` or
``model-0000i-of-0000K.safetensors`` + ``model.safetensors.index.json``), values from the fp32
masters cast per chunk, so memory stays bounded even for a parameter larger than RAM. With
``part`` the output files are split over processes or hosts (see :mod:`zero_ckpt.parts`): an
output file is the unit of work, so use ``max_shard_size`` to get several.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from zero_ckpt import __version__
from zero_ckpt.formats import open_source
from zero_ckpt.errors import CorruptShardError, raise_problems
from zero_ckpt.manifest import Manifest
from zero_ckpt.parts import PartResult, PartSpec, PartWork, make_job, resolve_part, run_part
from zero_ckpt.plan import ConsolidatePlan, plan_consolidate
from zero_ckpt.safetensors_format import SafetensorsHeader
from zero_ckpt.destination import check_reads, claim_destination, prepare_output
from zero_ckpt.storage import Location, open_location
from zero_ckpt.transfer import (
    ProgressFn,
    ProgressTracker,
    SourceChecks,
    WrittenFile,
    run_file_plans,
)

__all__ = ["consolidate", "ConsolidateResult"]


@dataclass(frozen=True)
class ConsolidateResult:
    """Where the output went: ``files`` (relative to ``out``, documents last), ``total_bytes``."""

    out: str
    files: list[str]
    total_bytes: int


def consolidate(
    src: str,
    out: str,
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    include_optimizer: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
    out_storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
    part: tuple[int, int] | str | PartSpec | None = None,
) -> ConsolidateResult | PartResult:
    """Write full tensors of the checkpoint at ``src`` to the directory ``out``.

    ``dtype``: output dtype of every param (default: each param's recorded model dtype);
    ``max_shard_size``: bytes per output file (a larger tensor gets a file of its own);
    ``include_optimizer``: also ``optimizer*.safetensors`` (``{param}.{key}``: the fp32 master
    and every state) and ``optimizer.json`` (hyperparameters, scalars). The checkpoint's
    ``model.safetensors`` (buffers, frozen params) is carried into the model files. Every
    master read is verified against the manifest's checksums.

    ``part``: ``(i, n)`` (or ``"i/n"``) writes only part i of the output files split n ways
    and returns a :class:`~zero_ckpt.parts.PartResult`; the part that completes the set
    verifies the pooled source checksums and writes the index/optimizer documents. Until then
    ``out/_parts/`` marks the output incomplete. ``"auto"``: ``(RANK, WORLD_SIZE)`` under
    torchrun (a collective; rank 0 commits), else the whole job.
    """
    spec = resolve_part(part)
    with open_location(src, storage_options) as s, open_location(
        out, storage_options if out_storage_options is None else out_storage_options
    ) as d:
        if spec is not None:
            return run_part(
                spec, s, d,
                lambda: _part_work(s, d, dtype, max_shard_size, include_optimizer, spec.parts),
                overwrite=overwrite, workers=workers, chunk_bytes=chunk_bytes, fsync=fsync,
                progress=progress,
            )
        manifest, by_path, header_crcs, plan = _plan(s, dtype, max_shard_size, include_optimizer)
        check_reads(d, sources=(s,), files=[(s, f.path) for f in _source_files(manifest)])
        with claim_destination(d, "consolidate", overwrite):
            prepare_output(d, overwrite, folders=())
            checks = SourceChecks()
            tracker = ProgressTracker(progress, sum(op.src_nbytes for f in plan.files for op in f.ops))
            written = run_file_plans(
                s, d, plan.files, workers=workers, chunk_bytes=chunk_bytes, progress=tracker,
                checks=checks, fsync=fsync,
            )
            try:
                raise_problems(
                    checks.problems(s, _source_files(manifest), by_path, header_crcs), CorruptShardError
                )
                for name, data in _documents_in_order(plan.documents):
                    d.write_atomic(name, data)
            except BaseException:
                for path in [*written, *plan.documents]:
                    d.remove(path)
                raise
    names = [f.path for f in plan.files] + list(plan.documents)
    total = sum(w.bytes for w in written.values()) + sum(len(b) for b in plan.documents.values())
    return ConsolidateResult(out, names, total)


def _documents_in_order(documents: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """The model index last: the output is complete once it (and then the marker's removal)
    is there."""
    return sorted(documents.items(), key=lambda kv: kv[0] == "model.safetensors.index.json")


def _source_files(manifest: Manifest) -> list:
    return list(manifest.shards) + ([manifest.model_file] if manifest.model_file else [])


def _plan(
    s: Location, dtype: str | None, max_shard_size: int | None, include_optimizer: bool
) -> tuple[Manifest, dict[str, SafetensorsHeader], dict[str, int], ConsolidatePlan]:
    # Format v1 or DeepSpeed (whose shards are its .pt files, located byte range by range).
    manifest, headers, header_crcs, model_header = open_source(s)
    header_crcs = dict(header_crcs)
    by_path = {manifest.shard(r).path: h for r, h in headers.items()}
    if model_header is not None and manifest.model_file is not None:
        by_path[manifest.model_file.path] = model_header
    plan = plan_consolidate(
        manifest, headers, model_header, dtype=dtype, max_shard_size=max_shard_size,
        include_optimizer=include_optimizer,
    )
    return manifest, by_path, header_crcs, plan


def _part_work(
    s: Location, d: Location, dtype: str | None, max_shard_size: int | None,
    include_optimizer: bool, parts: int,
) -> PartWork:
    manifest, by_path, header_crcs, plan = _plan(s, dtype, max_shard_size, include_optimizer)
    options = {"dtype": dtype, "max_shard_size": max_shard_size, "include_optimizer": include_optimizer}
    summary = "consolidate" + "".join(
        f", {k} {v}" for k, v in options.items() if v not in (None, False)
    )
    job = make_job("consolidate", options, manifest, parts, __version__, summary)

    def commit(written: Mapping[str, WrittenFile]) -> None:
        for name, data in _documents_in_order(plan.documents):
            d.write_atomic(name, data)

    return PartWork(
        job, plan.files, tuple(plan.documents), tuple(_source_files(manifest)), by_path,
        header_crcs, commit,
    )
