"""zero_ckpt: the checkpoint toolkit for ZeRO-partitioned optimizer state (format v1).

Offline jobs (no process group, no GPU): :func:`reshard`, :func:`consolidate`,
:func:`verify`, :func:`open_checkpoint`, :func:`write_checkpoint`.
"""

from zero_ckpt.consolidate import ConsolidateResult, consolidate
from zero_ckpt.errors import (
    CheckpointError,
    CorruptShardError,
    DestinationExistsError,
    IncompleteCheckpointError,
    LayoutMismatchError,
    ManifestError,
    MissingShardError,
    Problem,
    StorageError,
)
from zero_ckpt.manifest import FileMeta, GroupMeta, Manifest, ParamMeta
from zero_ckpt.reader import CheckpointReader, ParamInfo, open_checkpoint
from zero_ckpt.reshard import reshard
from zero_ckpt.verify import VerifyReport, verify
from zero_ckpt.writer import write_checkpoint

__version__ = "0.1.0"

__all__ = [
    "reshard",
    "consolidate",
    "ConsolidateResult",
    "verify",
    "VerifyReport",
    "open_checkpoint",
    "CheckpointReader",
    "ParamInfo",
    "write_checkpoint",
    "Manifest",
    "GroupMeta",
    "ParamMeta",
    "FileMeta",
    "CheckpointError",
    "ManifestError",
    "IncompleteCheckpointError",
    "MissingShardError",
    "CorruptShardError",
    "LayoutMismatchError",
    "DestinationExistsError",
    "StorageError",
    "Problem",
]
