"""``async_save``: a save whose files are written in the background, and the state it keeps.

``async_save`` returns an :class:`AsyncSave` as soon as this rank's state is copied to host
staging buffers; a background thread writes the snapshot (the same writing as
:func:`zero_ckpt.save`, :mod:`zero_ckpt.snapshot`) over a dedicated gloo group. This module
keeps, per optimizer, the save in flight (:func:`finish_pending`, which ``save`` and ``load``
call first), the staging buffers reused across saves, and the ``step()`` guard that stops
training once a background save has failed. The module is named by a noun so that importing
it never replaces the package's ``async_save`` function.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Mapping

import torch
import torch.distributed as dist

from zero_ckpt.agreement import distributed
from zero_ckpt.errors import CheckpointError
from zero_ckpt.manifest import Manifest
from zero_ckpt.snapshot import check_save_args, group_of, take_snapshot, write_snapshot
from zero_ckpt.storage import open_location

__all__ = ["async_save", "AsyncSave", "finish_pending"]


class AsyncSave:
    """A save running in the background. ``wait()`` blocks until it is done and returns the
    manifest, or raises its error (on every rank: the ranks agree inside the save), every
    time it is called. ``done()``: finished; ``failed()``: finished with an error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._thread: threading.Thread | None = None
        self._manifest: Manifest | None = None
        self._error: BaseException | None = None
        # Whether the error has reached the caller (wait(), the next save/load or step()):
        # it is raised by wait() every time, but stops a later save, load or step only once.
        self._reported = False

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def failed(self) -> bool:
        return self.done() and self._error is not None

    def wait(self, timeout: float | None = None) -> Manifest:
        if self._thread is None:
            raise CheckpointError(f"the background save to {self.url} was never started: nothing to wait for",
                                  path=self.url)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the save to {self.url} is still running after {timeout} s")
        if self._error is not None:
            self._reported = True
            raise self._error
        if self._manifest is None:
            raise CheckpointError(
                f"the background save to {self.url} ended without an error and without a manifest; "
                "treat the checkpoint as incomplete and save again", path=self.url,
            )
        return self._manifest

    def _unreported_failure(self, what: str) -> CheckpointError | None:
        """Once finished: the error to stop ``what`` with, when this save failed and nobody
        was told yet (then it counts as told); else None."""
        if self._error is None or self._reported:
            return None
        self._reported = True
        exc = CheckpointError(
            f"the background save to {self.url} failed; {what} stops here rather than go on "
            f"without a checkpoint: {self._error}",
            path=self.url,
        )
        exc.__cause__ = self._error
        return exc


# Per optimizer: its save in flight, and its staging buffers (kept across saves).
_PENDING: "weakref.WeakKeyDictionary[Any, AsyncSave]" = weakref.WeakKeyDictionary()
_STAGING: "weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
_GUARDED: "weakref.WeakSet[Any]" = weakref.WeakSet()
# Gloo groups for background saves, by the ranks of the optimizer's group.
_CKPT_GROUPS: dict[tuple[int, ...] | None, Any] = {}


def async_save(
    path: str,
    *,
    optimizer: Any,
    model: torch.nn.Module | None = None,
    extra: Mapping[str, Any] | None = None,
    averager: Any = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    latest: bool = False,
    keep_last: int | None = None,
) -> AsyncSave:
    """:func:`zero_ckpt.save` in the background: same arguments, same files, same rules.

    Returns an :class:`AsyncSave` as soon as this rank's state is copied to host staging
    buffers (reused across saves); the files are written by a background thread over a
    dedicated gloo group. ``wait()`` returns the manifest or raises its error. The next
    ``save``, ``async_save`` or ``load`` of the same optimizer waits for it first, and raises
    (``CheckpointError``) if it failed and ``wait()`` has not reported that yet; so does the
    optimizer's next ``step()`` once the failed save has finished on this rank (a save still
    running is not waited for). Training never silently continues past a failed save, and an
    error is stopped on once: after ``wait()`` raised it, saving and training go on.

    Collective: call on every rank of the optimizer's process group (the first call creates
    the gloo group, collectively over the whole job).
    """
    check_save_args(keep_last)
    group = group_of(optimizer)
    rank = optimizer.rank
    finish_pending(optimizer, f"the save to {path}")
    loc = open_location(path, storage_options)
    try:
        snap = take_snapshot(optimizer, model, extra, averager, group, _STAGING.setdefault(optimizer, {}))
        ckpt_group = _checkpoint_group(group)
    except BaseException:
        loc.close()
        raise
    handle = AsyncSave(loc.url)

    def background() -> None:
        try:
            handle._manifest = write_snapshot(
                snap, loc, ckpt_group, rank, overwrite=overwrite, latest=latest, keep_last=keep_last
            )
        except BaseException as exc:  # noqa: BLE001 - handed to wait() / the next step()
            handle._error = exc
        finally:
            loc.close()

    handle._thread = threading.Thread(target=background, name=f"zero-ckpt-save {loc.url}", daemon=False)
    _PENDING[optimizer] = handle
    _install_step_guard(optimizer)
    handle._thread.start()
    return handle


def _install_step_guard(optimizer: Any) -> None:
    """Make ``optimizer.step()`` raise once a background save has failed."""
    if optimizer in _GUARDED or not hasattr(optimizer, "register_step_pre_hook"):
        return

    def guard(opt: Any, args: Any, kwargs: Any) -> None:
        pending = _PENDING.get(opt)
        if pending is not None and pending.done():
            _PENDING.pop(opt, None)
            error = pending._unreported_failure("training (optimizer.step())")
            if error is not None:
                raise error

    optimizer.register_step_pre_hook(guard)
    _GUARDED.add(optimizer)


def finish_pending(optimizer: Any, what: str) -> None:
    """Wait for the optimizer's save in flight, if any (its staging buffers are about to be
    reused, or its files read); raise its error when it failed and nobody was told yet.
    Every rank decides alike: the ranks agreed on the outcome inside the save."""
    previous = _PENDING.pop(optimizer, None)
    if previous is None:
        return
    if previous._thread is not None:  # a save that never started has nothing to wait for
        previous._thread.join()
    error = previous._unreported_failure(what)
    if error is not None:
        raise error


def _checkpoint_group(group):
    """A gloo group with the same ranks as ``group``, used only by background saves so their
    collectives never interleave with training's. Creating groups is collective over the whole
    job: the first async save must be called on every rank (it is, being collective)."""
    if not distributed():
        return None
    key = tuple(dist.get_process_group_ranks(group)) if group is not None else None
    if key not in _CKPT_GROUPS:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, key)
        # Every distinct group, created in the same order on every rank.
        for k in sorted(set(everyone), key=lambda k: (k is not None, k or ())):
            if k not in _CKPT_GROUPS:
                _CKPT_GROUPS[k] = dist.new_group(ranks=list(k) if k is not None else None, backend="gloo")
    return _CKPT_GROUPS[key]
