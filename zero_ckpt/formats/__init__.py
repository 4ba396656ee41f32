"""Foreign checkpoint formats read as format-v1 views, and one opener for every source.

:func:`detect_format` tells a format-v1 checkpoint (``manifest.json``) from a DeepSpeed ZeRO-1/2
folder (``latest`` / ``global_stepN`` with ``*_optim_states.pt``) and a plain torch file;
:func:`open_source` gives what the planners and the engine need from either:
``(manifest, headers_by_rank, header_crcs, model_header)``. For a DeepSpeed folder the shard
paths are its ``.pt`` files, the headers locate the real elements inside them, and
``header_crcs`` is empty (DeepSpeed records no checksums; the source checks then skip).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from zero_ckpt.errors import CheckpointError, CorruptShardError
from zero_ckpt.manifest import MANIFEST_NAME, Manifest
from zero_ckpt.safetensors_format import SafetensorsHeader
from zero_ckpt.storage import Location, open_location

__all__ = ["FORMATS", "OpenedSource", "detect_format", "detect_location_format", "open_source"]

FORMATS = ("zero-ckpt", "deepspeed", "torch")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class OpenedSource(NamedTuple):
    """A checkpoint ready to plan from: what ``plan_reshard``/``plan_consolidate`` take."""

    manifest: Manifest
    headers: dict[int, SafetensorsHeader]
    header_crcs: dict[str, int]
    model_header: SafetensorsHeader | None


#: The file a plain torch optimizer folder holds (:mod:`zero_ckpt.formats.torch_optim`).
TORCH_OPTIMIZER_FILE = "optimizer.pt"


def is_torch_folder(loc: Location) -> bool:
    """Whether ``loc`` is a plain torch optimizer folder (holds ``optimizer.pt``, no
    ``manifest.json``). Torch-free, so detecting a format never imports torch."""
    try:
        if loc.exists(MANIFEST_NAME) or not loc.exists(TORCH_OPTIMIZER_FILE):
            return False
        return not loc.is_file()
    except OSError:
        return False


def detect_location_format(loc: Location) -> str:
    """``"zero-ckpt"``, ``"deepspeed"`` or ``"torch"`` for an open location; CheckpointError
    naming the URL when it is none of them."""
    from zero_ckpt.formats.deepspeed import is_deepspeed_checkpoint

    if loc.exists(MANIFEST_NAME):
        return "zero-ckpt"
    try:
        is_file = loc.is_file()
    except OSError:
        is_file = False
    if is_file:
        if loc.url.endswith(_TORCH_SUFFIXES):
            return "torch"
        raise CheckpointError(
            f"{loc.url} is a file of unknown format; expected a checkpoint folder or a .pt file",
            path=loc.url,
        )
    if not loc.exists():
        return "zero-ckpt"  # reading it then says "no checkpoint at ... (check the path)"
    if is_deepspeed_checkpoint(loc):
        return "deepspeed"
    files = loc.list_files()
    if any(f.startswith(("shards/", "_parts/")) for f in files):
        return "zero-ckpt"  # a format-v1 save that never finished: reading it says "incomplete"
    if files and (
        "optimizer.pt" in files
        or all(f.endswith(_TORCH_SUFFIXES) or f.endswith(".json") for f in files)
    ):
        return "torch"
    if not files:
        return "zero-ckpt"  # likewise: an empty folder holds no checkpoint
    raise CheckpointError(
        f"{loc.url} is not a checkpoint zero-ckpt recognises: no {MANIFEST_NAME} (format v1), no "
        "DeepSpeed 'latest' file or *_optim_states.pt files; pass the checkpoint folder itself",
        path=loc.url,
    )


def detect_format(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The format of the checkpoint at ``url``: ``"zero-ckpt" | "deepspeed" | "torch"``."""
    with open_location(url, storage_options) as loc:
        return detect_location_format(loc)


def open_source(loc: Location, from_format: str = "auto") -> OpenedSource:
    """Manifest, shard headers (by rank), header CRCs (by path) and model-file header of the
    checkpoint at ``loc``, in format v1 or DeepSpeed ZeRO-1/2 (``from_format`` forces one).

    Format v1: the manifest is validated and every shard header checked against it (as
    ``reshard``/``consolidate`` do). DeepSpeed: a view (see :mod:`zero_ckpt.formats.deepspeed`)
    whose file paths are relative to ``loc``; a raw copy of its model file is meaningless (it is
    a torch zip), so plan model files from ``model_header`` entries instead.
    """
    fmt = detect_location_format(loc) if from_format == "auto" else from_format
    if fmt == "zero-ckpt":
        from zero_ckpt.transfer import load_manifest, read_header, read_source_headers

        manifest = load_manifest(loc)
        headers, crcs = read_source_headers(loc, manifest)
        model_header = None
        if manifest.model_file is not None:
            mf = manifest.model_file
            size = loc.size(mf.path)
            if size != mf.bytes:
                raise CorruptShardError(
                    f"{loc.url_of(mf.path)} is {size} bytes, the manifest says {mf.bytes} "
                    "(truncated or replaced?)",
                    path=loc.url_of(mf.path),
                )
            model_header, crcs[mf.path] = read_header(loc, mf.path, size)
        return OpenedSource(manifest, headers, crcs, model_header)
    if fmt == "deepspeed":
        from zero_ckpt.formats.deepspeed import read_deepspeed

        view = read_deepspeed(loc)
        return OpenedSource(view.manifest, view.headers, {}, view.model_header)
    if fmt == "torch":
        raise CheckpointError(
            f"{loc.url} is a plain torch checkpoint: convert it first with `zero-ckpt convert "
            f"{loc.url} DST --from-format torch --to N` (or zero_ckpt.convert(..., from_format='torch'))",
            path=loc.url,
        )
    raise CheckpointError(f"unknown source format {fmt!r}; choose one of {', '.join(FORMATS)} or 'auto'")
