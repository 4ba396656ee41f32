"""Opening a checkpoint for reading: its manifest and its shards' headers (no torch).

What every reader needs before planning: ``manifest.json`` read and validated (a directory
without one is incomplete), and each shard's safetensors header fetched with two ranged reads
and checked against the layout. Kept free of torch so that ``zero-ckpt inspect`` and ``list``
start fast.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from zero_ckpt.checks import check_shard_header
from zero_ckpt.checksum import crc32c
from zero_ckpt.errors import (
    CheckpointError,
    CorruptShardError,
    IncompleteCheckpointError,
    ManifestError,
    Problem,
    raise_problems,
)
from zero_ckpt.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, FileMeta, Manifest
from zero_ckpt.safetensors_format import SafetensorsHeader, header_length, parse_header
from zero_ckpt.storage import Location

__all__ = ["load_manifest", "read_header", "read_source_headers"]


def load_manifest(loc: Location) -> Manifest:
    """Read and validate ``manifest.json``; a directory without one is incomplete."""
    if not loc.exists(MANIFEST_NAME):
        if loc.exists() and loc.list_files():
            raise IncompleteCheckpointError(
                f"{loc.url} has no {MANIFEST_NAME}: it is an incomplete checkpoint (a save or "
                "conversion that did not finish) and cannot be used",
                path=loc.url_of(MANIFEST_NAME),
            )
        raise IncompleteCheckpointError(
            f"no checkpoint at {loc.url}: {MANIFEST_NAME} not found (check the path)",
            path=loc.url_of(MANIFEST_NAME),
        )
    url = loc.url_of(MANIFEST_NAME)
    try:
        # Refused by size before it is read: a manifest is never larger than this.
        data = loc.read_bytes(MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
    except CorruptShardError as exc:
        raise ManifestError(f"{exc}", path=url) from None
    return Manifest.from_json(data, url).validate(url)


def read_header(loc: Location, rel: str, file_bytes: int | None = None) -> tuple[SafetensorsHeader, int]:
    """Parse a safetensors file's header with two ranged reads; also return the header's CRC."""
    url = loc.url_of(rel)
    first = loc.read_range(rel, 0, 8)
    n = header_length(first, url)
    prefix = loc.read_range(rel, 0, 8 + n)
    return parse_header(prefix, url, file_bytes), crc32c(prefix)


def read_source_headers(
    loc: Location, manifest: Manifest, workers: int = 4
) -> tuple[dict[int, SafetensorsHeader], dict[str, int]]:
    """Every shard's header, checked against the manifest (size and layout).

    Returns ``(headers by rank, header CRC by path)``; raises one error listing every problem
    (missing shard, wrong size, header that does not match the layout).
    """

    def one(meta: FileMeta) -> tuple[FileMeta, SafetensorsHeader | None, int, list[Problem]]:
        url = loc.url_of(meta.path)
        try:
            size = loc.size(meta.path)
            if size != meta.bytes:
                return meta, None, 0, [
                    Problem(url, f"is {size} bytes, the manifest says {meta.bytes} (truncated or "
                            "replaced?)", "size", meta.rank)
                ]
            header, crc = read_header(loc, meta.path, size)
        except CheckpointError as exc:
            kind = "missing" if isinstance(exc, FileNotFoundError) else "header"
            return meta, None, 0, [Problem(url, _strip_url(str(exc), url), kind, meta.rank)]
        problems = check_shard_header(manifest, meta.rank, header, url)  # type: ignore[arg-type]
        return meta, header, crc, problems

    with ThreadPoolExecutor(max_workers=max(1, min(workers, 16))) as pool:
        results = list(pool.map(one, manifest.shards))
    problems = [p for _, _, _, ps in results for p in ps]
    raise_problems(problems, CorruptShardError)
    headers = {meta.rank: h for meta, h, _, _ in results}  # type: ignore[misc]
    crcs = {meta.path: crc for meta, _, crc, _ in results}
    return headers, crcs  # type: ignore[return-value]


def _strip_url(message: str, url: str) -> str:
    prefix = f"{url}: "
    if message.startswith(prefix):
        return message[len(prefix):]
    if message.startswith(url + " "):
        return message[len(url) + 1:]
    return message
