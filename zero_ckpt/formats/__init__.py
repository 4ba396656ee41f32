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

