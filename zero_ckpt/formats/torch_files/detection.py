"""Telling a plain torch checkpoint from other folders (torch-free, no project I/O beyond
names and existence)."""

from __future__ import annotations

from zero_ckpt.manifest import MANIFEST_NAME
from zero_ckpt.storage import Location

__all__ = ["OPTIMIZER_FILE", "SUFFIXES", "detect", "is_torch_folder"]

#: The file a plain torch optimizer folder holds.
OPTIMIZER_FILE = "optimizer.pt"
SUFFIXES = (".pt", ".pth", ".bin")


def is_torch_folder(loc: Location) -> bool:
    """Whether ``loc`` is a plain torch optimizer folder (holds ``optimizer.pt``, no
    ``manifest.json``)."""
    try:
        if loc.exists(MANIFEST_NAME) or not loc.exists(OPTIMIZER_FILE):
            return False
        return not loc.is_file()
    except OSError:
        return False


def detect(loc: Location) -> bool:
    """A ``.pt``/``.pth``/``.bin`` file, a folder holding ``optimizer.pt``, or a folder of
    torch files and JSON only."""
    if loc.is_file():
        return loc.url.endswith(SUFFIXES)
    if not loc.exists() or loc.exists(MANIFEST_NAME):
        return False
    files = loc.list_files()
    return bool(files) and (
        OPTIMIZER_FILE in files or all(f.endswith(SUFFIXES) or f.endswith(".json") for f in files)
    )


