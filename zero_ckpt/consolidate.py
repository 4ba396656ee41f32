"""``consolidate``: full named tensors out of a partitioned checkpoint, streaming, verified.

The output is Hugging Face style safetensors (``model.safetensors`` or
``model-0000i-of-0000K.safetensors`` + ``model.safetensors.index.json``), values from the fp32
masters cast per chunk, so memory stays bounded even for a parameter larger than RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zero_ckpt.errors import CorruptShardError, raise_problems
from zero_ckpt.plan import plan_consolidate
from zero_ckpt.storage import open_location, prepare_destination
from zero_ckpt.transfer import (
    ProgressFn,
    ProgressTracker,
    SourceChecks,
    load_manifest,
    read_header,
    read_source_headers,
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
) -> ConsolidateResult:
    """Write full tensors of the checkpoint at ``src`` to the directory ``out``.

    ``dtype``: output dtype of every param (default: each param's recorded model dtype);
    ``max_shard_size``: bytes per output file (a larger tensor gets a file of its own);
    ``include_optimizer``: also ``optimizer*.safetensors`` (``{param}.{key}``: the fp32 master
    and every state) and ``optimizer.json`` (hyperparameters, scalars). The checkpoint's
    ``model.safetensors`` (buffers, frozen params) is carried into the model files. Every
    master read is verified against the manifest's checksums.
    """
    with open_location(src, storage_options) as s, open_location(
        out, storage_options if out_storage_options is None else out_storage_options
    ) as d:
        manifest = load_manifest(s)
        headers, header_crcs = read_source_headers(s, manifest)
        by_path = {manifest.shard(r).path: h for r, h in headers.items()}
        model_header = None
        if manifest.model_file is not None:
            mf = manifest.model_file
            size = s.size(mf.path)
            if size != mf.bytes:
                raise CorruptShardError(
                    f"{s.url_of(mf.path)} is {size} bytes, the manifest says {mf.bytes} "
                    "(truncated or replaced?)",
                    path=s.url_of(mf.path),
                )
            model_header, header_crcs[mf.path] = read_header(s, mf.path, size)
            by_path[mf.path] = model_header
        plan = plan_consolidate(
            manifest, headers, model_header, dtype=dtype, max_shard_size=max_shard_size,
            include_optimizer=include_optimizer,
        )
        prepare_destination(s, d, overwrite)
        checks = SourceChecks()
        tracker = ProgressTracker(progress, sum(op.src_nbytes for f in plan.files for op in f.ops))
        written = run_file_plans(
            s, d, plan.files, workers=workers, chunk_bytes=chunk_bytes, progress=tracker,
            checks=checks, fsync=fsync,
        )
        try:
            files = list(manifest.shards) + ([manifest.model_file] if manifest.model_file else [])
            raise_problems(checks.problems(s, files, by_path, header_crcs), CorruptShardError)
            for name, data in plan.documents.items():
                d.write_atomic(name, data)
        except BaseException:
            for path in [*written, *plan.documents]:
                d.remove(path)
            raise
    names = [f.path for f in plan.files] + list(plan.documents)
    total = sum(w.bytes for w in written.values()) + sum(len(b) for b in plan.documents.values())
    return ConsolidateResult(out, names, total)
