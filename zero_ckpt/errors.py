"""The project's exception family and the ``Problem`` record that checks return.

Every error a user can cause (bad input, a damaged or incomplete checkpoint, a mismatched model)
is a :class:`CheckpointError` whose message names the file, the value and the fix. Subclasses
also derive from the matching builtin (``ValueError``, ``FileNotFoundError``, ...) so callers
that already catch those keep working. The CLI prints ``str(error)`` on one line and exits 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "CheckpointError",
    "ManifestError",
    "IncompleteCheckpointError",
    "MissingShardError",
    "CorruptShardError",
    "LayoutMismatchError",
    "DestinationExistsError",
    "StorageError",
    "NotRegularFileError",
    "KnobError",
    "Problem",
    "raise_problems",
]


class CheckpointError(Exception):
    """Base of every error zero-ckpt raises about a checkpoint or its use.

    ``path``, ``rank``, ``expected`` and ``actual`` are kept for programs; the message is for
    people and already contains what matters of them.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        rank: int | None = None,
        expected: Any = None,
        actual: Any = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.rank = rank
        self.expected = expected
        self.actual = actual


class ManifestError(CheckpointError, ValueError):
    """manifest.json is unreadable, of an unknown version, or inconsistent."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint directory without manifest.json: a save that never finished."""


class MissingShardError(CheckpointError, FileNotFoundError):
    """A shard or model file the manifest lists is not there."""


class CorruptShardError(CheckpointError, ValueError):
    """A shard's size, header or checksum is not what the manifest records."""


class LayoutMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the model/optimizer/world size it is used with."""


class DestinationExistsError(CheckpointError, FileExistsError):
    """The output location already holds something and overwriting was not asked for."""


class StorageError(CheckpointError, OSError):
    """Reading or writing the storage failed for a reason other than the checkpoint's content."""


class NotRegularFileError(CheckpointError, ValueError):
    """A path where a checkpoint file belongs is a directory, FIFO, device or socket."""


class KnobError(CheckpointError, ValueError):
    """An environment variable tuning zero-ckpt (``ZERO_CKPT_*``) has an invalid value."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint, as found by a check that reports every problem.

    ``path`` is the file concerned (manifest, shard or model file); ``kind`` is a short tag
    (``"missing"``, ``"size"``, ``"checksum"``, ``"layout"``, ``"header"``, ...).
    """

    path: str
    message: str
    kind: str = "invalid"
    rank: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


_KIND_TO_ERROR: dict[str, type[CheckpointError]] = {
    "missing": MissingShardError,
    "size": CorruptShardError,
    "checksum": CorruptShardError,
    "header": CorruptShardError,
    "incomplete": IncompleteCheckpointError,
}


def raise_problems(problems: list[Problem], default: type[CheckpointError] = ManifestError) -> None:
    """Raise one error listing every problem (nothing happens for an empty list).

    The error class follows the first problem's kind, so ``except MissingShardError`` works
    for the common single-problem case.
    """
    if not problems:
        return
    first = problems[0]
    cls = _KIND_TO_ERROR.get(first.kind, default)
    if len(problems) == 1:
        message = str(first)
    else:
        lines = "; ".join(str(p) for p in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        message = f"{len(problems)} problems: {lines}{more}"
    raise cls(message, path=first.path, rank=first.rank)
