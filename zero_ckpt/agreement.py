"""The cross-rank error agreement: a step that may fail on some ranks fails on every rank.

Every collective piece of zero-ckpt (``save``, ``async_save``, ``load`` and the distributed
split jobs of :mod:`zero_ckpt.parts`) follows each step that can fail on some ranks only (a
rank's own file, its own reads) with one exchange of outcomes, so that no rank is left
waiting in a collective the failed rank never reaches:

- the rank where the step failed raises its own exception, unchanged;
- every other rank raises the lowest failing rank's error again: the same class when it is a
  zero-ckpt :class:`~zero_ckpt.errors.CheckpointError` subclass (so ``except
  CorruptShardError`` works on every rank), else a plain ``CheckpointError``, with the
  error's ``path`` and ``rank`` and a message that says which rank failed at which step.

The exchange is ``all_gather_object`` over a process group by default; a caller with its own
transport (the split jobs wrap theirs to name lost peers) passes ``exchange``. When the
exchange itself fails (a peer died) a rank with an error of its own raises that instead.

This module imports ``torch.distributed`` only inside :func:`all_gather`, when a process group
is in use, so the byte-moving jobs that import :mod:`zero_ckpt.parts` stay torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from zero_ckpt.errors import CheckpointError

__all__ = ["Failure", "agree", "agree_all", "all_gather", "distributed", "failure_of", "error_of"]

T = TypeVar("T")
# (rank within the group, its failure) -> the message the other ranks raise
Describe = Callable[[int, "Failure"], str]
Exchange = Callable[[Any], "list[Any]"]


@dataclass(frozen=True)
class Failure:
    """A picklable description of an exception raised on one rank (``file_rank``: the error's
    own ``rank`` attribute, e.g. the shard's; the rank it happened on is its position in the
    exchange)."""

    cls_name: str
    message: str
    path: str | None = None
    file_rank: int | None = None


def failure_of(exc: BaseException) -> Failure:
    ours = isinstance(exc, CheckpointError)
    return Failure(
        type(exc).__name__,
        str(exc),
        getattr(exc, "path", None) if ours else None,
        getattr(exc, "rank", None) if ours else None,
    )


def _error_class(name: str) -> type[CheckpointError] | None:
    """The zero-ckpt error class of that name among those loaded (every rank runs the same
    code, so the class that failed on one rank is loaded on the others); None if unknown."""
    todo: list[type] = [CheckpointError]
    while todo:
        cls = todo.pop(0)
        if cls.__name__ == name and cls.__module__.split(".")[0] == "zero_ckpt":
            return cls  # type: ignore[return-value]
        todo.extend(cls.__subclasses__())
    return None


def error_of(failure: Failure, message: str) -> CheckpointError:
    """Re-create ``failure`` (of another rank) with ``message``: its own class when that is a
    zero-ckpt error, else a plain ``CheckpointError``."""
    cls = _error_class(failure.cls_name) or CheckpointError
    return cls(message, path=failure.path, rank=failure.file_rank)


def _default_message(step: str) -> Describe:
    def describe(rank: int, f: Failure) -> str:
        if _error_class(f.cls_name) is None:
            return f"{step} failed on rank {rank}: {f.cls_name}: {f.message}"
        return f"{step} failed on rank {rank}: {f.message}"

    return describe


def distributed() -> bool:
    """Whether a default process group is in use (torch is imported only if it is loaded)."""
    import sys

    if "torch.distributed" not in sys.modules:
        return False
    dist = sys.modules["torch.distributed"]
    return dist.is_available() and dist.is_initialized()


def all_gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group). Collective."""
    if not distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _exchange(exchange: Exchange | None, group: Any, obj: Any, error: BaseException | None) -> list[Any]:
    try:
        return exchange(obj) if exchange is not None else all_gather(obj, group)
    except Exception:
        if error is not None:  # this rank's own failure is the error that matters
            raise error from None
        raise


def _settle(step: str, error: BaseException | None, failures: list[Failure | None], describe: Describe | None) -> None:
    if error is not None:
        raise error
    for rank, f in enumerate(failures):
        if f is not None:
            raise error_of(f, (describe or _default_message(step))(rank, f))


def agree(
    step: str,
    fn: Callable[[], T],
    group: Any = None,
    *,
    exchange: Exchange | None = None,
    describe: Describe | None = None,
) -> T:
    """Run ``fn`` on every rank; if it failed anywhere, raise on every rank (see the module
    docstring); else return this rank's result (which is not sent to the others).

    ``step`` names the step in the other ranks' messages (``"<step> failed on rank <r>:
    <message>"``) unless ``describe(rank, failure)`` words them. Collective: one exchange
    (``all_gather_object`` over ``group``, or ``exchange``).
    """
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    mine = None if error is None else failure_of(error)
    _settle(step, error, _exchange(exchange, group, mine, error), describe)
    return result


def agree_all(
    step: str,
    fn: Callable[[], T],
    group: Any = None,
    *,
    exchange: Exchange | None = None,
    describe: Describe | None = None,
) -> list[T]:
    """:func:`agree`, returning every rank's result in rank order: the results travel in the
    same exchange, so keep them small (metadata, records; never tensors)."""
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    mine = (result, None) if error is None else (None, failure_of(error))
    gathered = _exchange(exchange, group, mine, error)
    _settle(step, error, [f for _, f in gathered], describe)
    return [r for r, _ in gathered]
