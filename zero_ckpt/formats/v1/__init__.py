"""zero-ckpt's own format, version 1 (``manifest.json`` + per-rank safetensors shards).

The registry's entry points: :func:`detect`, :func:`open_view` (manifest validated, every
shard header checked against the layout, checksums recorded for the engine to verify the bytes
as they stream), :func:`verify` and the writer (``convert --to-format zero-ckpt`` is a reshard).
Torch-free.
"""

from __future__ import annotations

from typing import Any

from zero_ckpt.errors import CorruptShardError
from zero_ckpt.manifest import MANIFEST_NAME
from zero_ckpt.storage import Location
from zero_ckpt.view import SourceChecksInfo, SourceView, header_model_tensors, rank_extents

__all__ = ["NAME", "WRITER", "describe", "detect", "open_view", "verify"]

NAME = "zero-ckpt"
WRITER = "zero_ckpt.formats.v1.write:write_view"


def detect(loc: Location) -> bool:
    """A ``manifest.json``, or a save that never finished (``shards/``, ``_parts/`` only):
    reading the latter then says it is incomplete."""
    if loc.exists(MANIFEST_NAME):
        return True
    if loc.is_file() or not loc.exists():
        return False
    return any(f.startswith(("shards/", "_parts/")) for f in loc.list_files())


def describe(loc: Location) -> Any:
    """The manifest alone: no shard is touched."""
    from zero_ckpt.opening import load_manifest

    return load_manifest(loc)


def open_view(loc: Location) -> SourceView:
    """The format-v1 checkpoint at ``loc``: manifest validated, shard headers checked against
    it (one error listing every problem), model file header read."""
    from zero_ckpt.opening import load_manifest, read_header, read_source_headers

    manifest = load_manifest(loc)
    headers, crcs = read_source_headers(loc, manifest)
    by_path = {manifest.shard(r).path: h for r, h in headers.items()}
    model_header = None
    if manifest.model_file is not None:
        mf = manifest.model_file
        size = loc.size(mf.path)
        if size != mf.bytes:
            raise CorruptShardError(
                f"{loc.url_of(mf.path)} is {size} bytes, the manifest says {mf.bytes} "
                "(truncated or replaced?); restore it from a good copy",
                path=loc.url_of(mf.path),
                expected=mf.bytes,
                actual=size,
            )
        model_header, crcs[mf.path] = read_header(loc, mf.path, size)
        by_path[mf.path] = model_header
    return SourceView(
        format=NAME,
        url=loc.url,
        manifest=manifest,
        state=rank_extents(manifest, headers),
        model=header_model_tensors(manifest.model_file.path, model_header) if manifest.model_file else (),
        checks=SourceChecksInfo(by_path, crcs),
    )


def verify(loc: Location, report: Any, chunk: int, progress: Any, workers: int | None) -> Any:
    """``zero-ckpt verify`` of a format-v1 checkpoint (see :mod:`zero_ckpt.formats.v1.checking`)."""
    from zero_ckpt.formats.v1.checking import verify_v1

    return verify_v1(loc, report, chunk, progress, workers)
