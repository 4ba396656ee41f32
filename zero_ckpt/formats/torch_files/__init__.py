"""Plain torch checkpoints: a folder with ``optimizer.pt`` (+ ``model.safetensors``/``model.pt``,
``param_names.json``) or one ``.pt`` training checkpoint.

A torch optimizer state dict keys its state by param id and holds per-param tensors with no
flat layout, so it is *imported* (:func:`import_source`, in
:mod:`zero_ckpt.formats.torch_optim`) rather than viewed; ``consolidate --format torch``
writes it. Detection is torch-free.
"""

from __future__ import annotations

from typing import Any

from zero_ckpt.errors import CheckpointError
from zero_ckpt.formats.torch_files.detection import OPTIMIZER_FILE, SUFFIXES, detect, is_torch_folder
from zero_ckpt.manifest import Manifest
from zero_ckpt.storage import Location

__all__ = ["NAME", "OPTIMIZER_FILE", "SUFFIXES", "detect", "is_torch_folder", "open_view", "import_source"]

NAME = "torch"


def open_view(loc: Location) -> Any:
    raise CheckpointError(
        f"{loc.url} is a plain torch checkpoint: convert it first with `zero-ckpt convert "
        f"{loc.url} DST --from-format torch --to N` (or zero_ckpt.convert(..., from_format='torch'))",
        path=loc.url,
    )


def import_source(src: str, dst: str, **options: Any) -> Manifest:
    """Write the torch checkpoint at ``src`` to ``dst`` as format v1 (torch is imported here)."""
    from zero_ckpt.formats.torch_optim import import_torch_files

    return import_torch_files(src, dst, **options)
