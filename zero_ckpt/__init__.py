"""zero_ckpt: the checkpoint toolkit for ZeRO-partitioned optimizer state (format v1).

Offline jobs (no process group, no GPU): :func:`reshard`, :func:`consolidate` (one part of
either, split over processes or hosts: :func:`reshard_part`, :func:`consolidate_part`),
:func:`verify`, :func:`open_checkpoint`, :func:`write_checkpoint`; from training code:
:func:`save`, :func:`async_save` and :func:`load` (collectives). Names are imported on first
access, so importing a pure module such as ``zero_ckpt.manifest`` or ``zero_ckpt.plan`` loads
neither torch nor fsspec. (Modules are named by nouns, ``resharding``, ``consolidation``, ...,
so that importing one never replaces the package's function of the same verb.)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module it lives in
_EXPORTS = {
    "reshard": "zero_ckpt.resharding",
    "reshard_part": "zero_ckpt.resharding",
    "consolidate": "zero_ckpt.consolidation",
    "consolidate_part": "zero_ckpt.consolidation",
    "ConsolidateResult": "zero_ckpt.consolidation",
    "verify": "zero_ckpt.verification",
    "convert": "zero_ckpt.conversion",
    "consolidate_source": "zero_ckpt.conversion",
    "open_deepspeed": "zero_ckpt.formats.deepspeed.reading",
    "detect_format": "zero_ckpt.formats",
    "import_torch": "zero_ckpt.formats.torch_optim",
    "import_torch_files": "zero_ckpt.formats.torch_optim",
    "export_torch": "zero_ckpt.formats.torch_optim",
    "write_deepspeed": "zero_ckpt.formats.deepspeed.writing",
    "write_deepspeed_universal": "zero_ckpt.formats.deepspeed.writing",
    "WriteResult": "zero_ckpt.view",
    "VerifyReport": "zero_ckpt.verification",
    "open_checkpoint": "zero_ckpt.reader",
    "CheckpointReader": "zero_ckpt.reader",
    "ParamInfo": "zero_ckpt.reader",
    "write_checkpoint": "zero_ckpt.writer",
    "save": "zero_ckpt.saving",
    "async_save": "zero_ckpt.async_saving",
    "AsyncSave": "zero_ckpt.async_saving",
    "load": "zero_ckpt.loading",
    "LoadResult": "zero_ckpt.loading",
    "Manifest": "zero_ckpt.manifest",
    "GroupMeta": "zero_ckpt.manifest",
    "ParamMeta": "zero_ckpt.manifest",
    "FileMeta": "zero_ckpt.manifest",
    "CheckpointError": "zero_ckpt.errors",
    "ManifestError": "zero_ckpt.errors",
    "IncompleteCheckpointError": "zero_ckpt.errors",
    "MissingShardError": "zero_ckpt.errors",
    "CorruptShardError": "zero_ckpt.errors",
    "LayoutMismatchError": "zero_ckpt.errors",
    "DestinationExistsError": "zero_ckpt.errors",
    "StorageError": "zero_ckpt.errors",
    "Problem": "zero_ckpt.errors",
    "parse_size": "zero_ckpt.summary",
    "update_latest": "zero_ckpt.runs",
    "read_latest": "zero_ckpt.runs",
    "resolve_checkpoint": "zero_ckpt.runs",
    "list_checkpoints": "zero_ckpt.runs",
    "scan_run": "zero_ckpt.runs",
    "apply_retention": "zero_ckpt.runs",
    "CheckpointInfo": "zero_ckpt.runs",
    "RunListing": "zero_ckpt.runs",
    "RunDirectoryError": "zero_ckpt.runs",
    "PartResult": "zero_ckpt.parts",
    "summarize": "zero_ckpt.summary",
    "inspect_checkpoint": "zero_ckpt.summary",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zero_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
