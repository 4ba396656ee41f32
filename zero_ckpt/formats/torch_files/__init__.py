"""Plain torch checkpoints: a folder with ``optimizer.pt`` (+ ``model.safetensors``/``model.pt``,
``param_names.json``) or one ``.pt`` training checkpoint.

The common case opens as a streaming view (:func:`open_view`, :mod:`.reading`): the pickles
are rebuilt without torch and every tensor is read by byte range from its zip record or
safetensors entry, so ``convert``, ``reshard``, ``consolidate``, ``verify`` and ``inspect``
read it like any other format. What the view does not take (legacy non-zip files,
non-elementwise state, params of a group at different steps, a model given apart, ...) is
*imported* by :func:`import_source`, which loads it with torch
(:mod:`zero_ckpt.formats.torch_optim`); ``consolidate --format torch`` writes this format.
Detection and the view are torch-free.
"""

from __future__ import annotations

from typing import Any

from zero_ckpt.formats.torch_files.detection import OPTIMIZER_FILE, SUFFIXES, detect, is_torch_folder
from zero_ckpt.manifest import Manifest
from zero_ckpt.storage import Location

__all__ = [
    "NAME", "OPTIMIZER_FILE", "SUFFIXES", "detect", "is_torch_folder", "open_view", "precheck", "verify",
    "import_source",
]

NAME = "torch"


def open_view(loc: Location) -> Any:
    """The plain torch checkpoint at ``loc`` as a source view (:mod:`.reading`); a
    CheckpointError saying why when it cannot be one (``zero-ckpt convert --from-format torch``
    then imports it by loading it with torch)."""
    from zero_ckpt.formats.torch_files.reading import TorchViewError, torch_view

    try:
        return torch_view(loc)
    except TorchViewError as exc:
        raise TorchViewError(
            f"{exc}; this plain torch checkpoint cannot be read in place: convert it first with "
            f"`zero-ckpt convert {loc.url} DST --from-format torch --to N`, which loads it with torch",
            path=loc.url,
        ) from None


def precheck(loc: Location, view: Any) -> None:
    """Check every zip record the view reads against its CRC-32 (torch files record no
    checksums of their own) before an output is committed."""
    from zero_ckpt.formats.torch_files.reading import precheck as check

    check(loc, view)


def verify(loc: Location, report: Any, chunk: int, progress: Any, workers: int | None = None) -> Any:
    """``zero-ckpt verify``: the structure, then every zip record's CRC-32 (:mod:`.reading`)."""
    from zero_ckpt.formats.torch_files.reading import verify as check

    return check(loc, report, chunk, progress, workers)


def import_source(src: str, dst: str, **options: Any) -> Manifest:
    """Write the torch checkpoint at ``src`` to ``dst`` as format v1: streamed through the view
    when it can be one (no torch), else loaded with torch (:mod:`zero_ckpt.formats.torch_optim`)."""
    from zero_ckpt.errors import CheckpointError
    from zero_ckpt.formats.torch_files.reading import torch_view

    if options.get("model") is None:
        from zero_ckpt.storage import open_location

        opts = options.get("storage_options")
        with open_location(src, opts) as s:
            try:
                view = torch_view(s, options.get("param_names"))
            except CheckpointError:
                # not a view (TorchViewError) or a file the view refuses: the loader decides,
                # with its own checks and messages (hostile pickles are refused there too)
                view = None
            if view is not None:
                return _write_view(s, src, dst, view, options)
    from zero_ckpt.formats.torch_optim import import_torch_files

    return import_torch_files(src, dst, **options)


def _write_view(s: Location, src: str, dst: str, view: Any, options: dict[str, Any]) -> Manifest:
    from zero_ckpt.formats.v1.write import write_view
    from zero_ckpt.storage import open_location

    d_opts = options.get("dst_storage_options")
    if d_opts is None:
        d_opts = options.get("storage_options")
    with open_location(dst, d_opts) as d:
        return write_view(
            s, d, view, world_size=options.get("world_size") or 1,
            overwrite=bool(options.get("overwrite")), fsync=options.get("fsync"), src_url=src,
            precheck=lambda: precheck(s, view),
        )
