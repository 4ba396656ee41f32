"""Checkpoint formats: one package per format, listed in :mod:`zero_ckpt.formats.registry`.

``detect_format(url)`` names the format of a checkpoint; ``registry.open_view`` opens any of
them as a :class:`~zero_ckpt.view.SourceView`, the planners' one input. Torch-free.
"""

from __future__ import annotations

from typing import Any

from zero_ckpt.formats.registry import detect as detect_location_format
from zero_ckpt.formats.registry import detect_url, format_names, open_view

__all__ = ["detect_format", "detect_location_format", "format_names", "open_view"]


def detect_format(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The registered name of the format of the checkpoint at ``url`` (``"zero-ckpt"``,
    ``"dcp"``, ``"deepspeed"``, ``"torch"``)."""
    return detect_url(url, storage_options)


# ----- transitional: the per-rank opener the DeepSpeed writer still takes -----------------------

from typing import NamedTuple  # noqa: E402

from zero_ckpt.manifest import Manifest  # noqa: E402
from zero_ckpt.safetensors_format import SafetensorsHeader  # noqa: E402


class OpenedSource(NamedTuple):
    """Manifest, headers by rank, header CRCs by path and model header of a per-rank format."""

    manifest: Manifest
    headers: dict[int, SafetensorsHeader]
    header_crcs: dict[str, int]
    model_header: SafetensorsHeader | None


def open_source(loc: Any, from_format: str = "auto") -> OpenedSource:
    """A per-rank (format v1 or DeepSpeed) checkpoint's headers by rank."""
    from zero_ckpt.formats.registry import resolve

    fmt = resolve(loc, from_format)
    if fmt == "deepspeed":
        from zero_ckpt.formats.deepspeed import read_deepspeed

        v = read_deepspeed(loc)
        return OpenedSource(v.manifest, v.headers, {}, v.model_header)
    view = open_view(loc, fmt)
    m = view.manifest
    headers = {s.rank: view.checks.headers[s.path] for s in m.shards}
    model_header = view.checks.headers.get(m.model_file.path) if m.model_file else None
    return OpenedSource(m, headers, dict(view.checks.header_crcs), model_header)  # type: ignore[arg-type]
