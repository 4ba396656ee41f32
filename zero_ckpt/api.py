"""The bridge between a live ``ZeroOptimizer`` and format v1: ``save`` and ``load``.

Both are collectives over the optimizer's process group: every rank calls them with the same
path. ``save`` has each rank write its own shard (padding stripped) in parallel; rank 0
writes ``model.safetensors`` and, once every shard is durable, ``manifest.json`` last.
``load`` works at any data-parallel size: each rank reads only the byte ranges its new
partition needs, planned by the same code as the offline reshard
(:func:`zero_ckpt.plan.plan_partition_read`), and the ranks verify the checksums of what they
read together.

Failure protocol: every step that can fail on some ranks only (a rank's own file, its own
reads) is followed by an agreement (one ``all_gather_object``), so a failure on any rank
raises on every rank, with the same exception class (a :class:`~zero_ckpt.errors.
CheckpointError` subclass is re-created on the ranks where it did not happen), and no rank is
left waiting in a collective. ``load`` reads and checks everything before it changes
anything: a failed load leaves the optimizer, the model and the averager as they were.

The optimizer is used through its bridge interface (``layouts``, ``group_params``,
``master_partition``, ``state_partitions``, ``group_scalars``, ``group_hyperparams``,
``load_partition``, ``load_hyperparams``, ``sync_model_from_masters``,
``loss_scaler_state``, ``load_loss_scaler_state``) plus the ``torch.optim.Optimizer``
surface (``param_groups``, ``state``) to drop stale state, so this module imports nothing
from ``zero_core``'s optimizer.
"""

from __future__ import annotations

import copy
import re
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

from zero_ckpt import errors as _errors
from zero_ckpt.checksum import crc32c, parse_checksum
from zero_ckpt.checks import check_shard_header
from zero_ckpt.errors import (
    CheckpointError,
    CorruptShardError,
    LayoutMismatchError,
    ManifestError,
    Problem,
    raise_problems,
)
from zero_ckpt.manifest import (
    MANIFEST_NAME,
    FileMeta,
    GroupMeta,
    Manifest,
    ParamMeta,
    shard_path,
    tensor_name,
)
from zero_ckpt.plan import CopyOp, plan_partition_read, split_op
from zero_ckpt.safetensors_format import SafetensorsHeader
from zero_ckpt.storage import Location, open_location, prepare_destination
from zero_ckpt.transfer import (
    SourceChecks,
    _Buffers,
    copy_op_into,
    load_manifest,
    read_header,
    resolve_workers,
)
from zero_ckpt import knobs, runs
from zero_ckpt.writer import dtype_name, write_model_file, write_shard

__all__ = ["save", "load", "LoadResult", "AsyncSave"]

_VERSION = "0.1.0"
T = TypeVar("T")
# Names ZeroOptimizer invents for params given without names: not an identity to check.
_INVENTED_NAME = re.compile(r"group\d+\.param\d+")


@dataclass(frozen=True)
class LoadResult:
    """What ``load`` restored: the checkpoint's manifest, the user's ``extra``, and how many
    bytes of shard tensor data this rank read (its share of the checkpoint, not all of it;
    headers and ``model.safetensors`` are not counted)."""

    manifest: Manifest
    user_extra: dict[str, Any]
    bytes_read: int


# ----- collective helpers ----------------------------------------------------------------------


def _group_of(optimizer: Any):
    return getattr(optimizer, "process_group", None)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_gather(obj: Any, group) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


@dataclass(frozen=True)
class _Failure:
    """A picklable description of an exception raised on one rank (``rank``: within the
    group; ``file_rank``: the error's own ``rank`` attribute, e.g. the shard's)."""

    rank: int
    cls_name: str
    message: str
    path: str | None
    file_rank: int | None


def _agree(step: str, fn: Callable[[], T], group) -> T:
    """Run ``fn`` on every rank; if it failed anywhere, raise on every rank.

    A rank where ``fn`` failed raises its own exception. The others raise the lowest failing
    rank's error again: the same class when it is a :class:`CheckpointError` subclass (so
    ``except CorruptShardError`` works on every rank), else a plain ``CheckpointError``;
    the message says which rank failed and at which step. Collective (one all_gather).
    """
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    mine = None if error is None else _failure(error, group)
    failures = [f for f in _all_gather(mine, group) if f is not None]
    if error is not None:
        raise error
    if failures:
        raise _reraise(step, failures[0])
    return result


def _failure(exc: BaseException, group) -> _Failure:
    rank = dist.get_rank(group) if _distributed() else 0  # the rank within the group
    return _Failure(
        rank,
        type(exc).__name__,
        str(exc),
        getattr(exc, "path", None) if isinstance(exc, CheckpointError) else None,
        getattr(exc, "rank", None) if isinstance(exc, CheckpointError) else None,
    )


def _reraise(step: str, f: _Failure) -> CheckpointError:
    # The library's error classes live in zero_ckpt.errors, except the run directory's.
    cls = getattr(_errors, f.cls_name, None) or getattr(runs, f.cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, CheckpointError)):
        cls = CheckpointError
        message = f"{step} failed on rank {f.rank}: {f.cls_name}: {f.message}"
    else:
        message = f"{step} failed on rank {f.rank}: {f.message}"
    return cls(message, path=f.path, rank=f.file_rank)


# ----- naming ----------------------------------------------------------------------------------


def _param_names(optimizer: Any, model: torch.nn.Module | None) -> list[list[str]]:
    """Names per group in flat order: the model's names where a model is given (tied
    parameters get their first name), else the optimizer's."""
    by_id: dict[int, str] = {}
    if model is not None:
        for name, p in model.named_parameters():
            by_id.setdefault(id(p), name)
    names = []
    for g, layout in enumerate(optimizer.layouts):
        params = optimizer.group_params(g)
        names.append([by_id.get(id(p), spec.name) for p, spec in zip(params, layout.params)])
    return names


def _aliases(model: torch.nn.Module | None) -> dict[str, tuple[str, ...]]:
    if model is None:
        return {}
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.setdefault(first[id(p)], []).append(name)
        else:
            first[id(p)] = name
    return {k: tuple(v) for k, v in out.items()}


def _owned_names(manifest: Manifest) -> set[str]:
    return {n for gm in manifest.groups for p in gm.params for n in (p.name, *p.aliases)}


def _model_only_state(model: torch.nn.Module | None, owned: set[str]) -> dict[str, torch.Tensor]:
    """Module state the optimizer does not own: buffers and frozen parameters (live tensors,
    each stored once under its first name)."""
    if model is None:
        return {}
    out = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in owned or t is None:
            continue
        if id(t) in seen:  # tied frozen tensors: store once under the first name
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


# ----- save ------------------------------------------------------------------------------------


def _build_manifest(optimizer: Any, model: torch.nn.Module | None, extra: Mapping[str, Any]) -> Manifest:
    names = _param_names(optimizer, model)
    aliases = _aliases(model)
    groups = []
    for g, layout in enumerate(optimizer.layouts):
        states = optimizer.state_partitions(g)
        params = tuple(
            ParamMeta(names[g][i], spec.shape, spec.dtype, spec.offset, aliases.get(names[g][i], ()))
            for i, spec in enumerate(layout.params)
        )
        groups.append(
            GroupMeta(
                numel=layout.numel,
                partition_numel=layout.partition_numel,
                align=layout.align,
                params=params,
                state_keys=tuple(states),
                hyperparams=dict(optimizer.group_hyperparams(g)),
                scalars=dict(optimizer.group_scalars(g)),
                state_dtypes={k: dtype_name(t.dtype) for k, t in states.items() if t.dtype != torch.float32},
            )
        )
    ws = optimizer.world_size
    manifest = Manifest(
        world_size=ws,
        zero_stage=int(getattr(optimizer, "stage", 2)),
        master_dtype="float32",
        groups=tuple(groups),
        shards=tuple(FileMeta(shard_path(r, ws), 0, "", r) for r in range(ws)),
        extra=dict(extra),
        created_by=f"zero-ckpt {_VERSION}",
    )
    try:  # fail before anything is written, not at the commit
        manifest.to_json()
    except (TypeError, ValueError) as exc:
        raise ManifestError(
            f"the checkpoint metadata cannot be written as JSON ({exc}); pass `extra` (and "
            "hyperparameters) made of dicts, lists, strings, finite numbers, booleans and None"
        ) from None
    return manifest


@dataclass
class _Snapshot:
    """What a save writes, taken at one moment: the agreed metadata (rank 0's), this rank's
    shard tensors and (rank 0) the model's other state. Views of live state for a blocking
    save, copies in reusable staging buffers for an async one."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    model_state: dict[str, torch.Tensor]


def _take_snapshot(
    optimizer: Any,
    model: torch.nn.Module | None,
    extra: Mapping[str, Any] | None,
    averager: Any,
    group,
    staging: dict[str, torch.Tensor] | None,
) -> _Snapshot:
    rank = optimizer.rank

    def build() -> Manifest:
        meta_extra: dict[str, Any] = {"user": dict(extra or {})}
        scaler = optimizer.loss_scaler_state()
        if scaler:
            meta_extra["loss_scaler"] = scaler
        if averager is not None:
            meta_extra["averager"] = averager.state_dict()
        return _build_manifest(optimizer, model, meta_extra)

    # Everything that can be refused is refused before the destination is touched.
    local = _agree("building the checkpoint metadata", build, group)
    # One metadata for all: rank 0's (a rank whose state does not fit it fails when writing).
    manifest: Manifest = _all_gather(local if rank == 0 else None, group)[0]
    tensors: dict[str, torch.Tensor] = {}
    for g, layout in enumerate(optimizer.layouts):
        real = layout.real_numel(rank)
        tensors[tensor_name(g, "master")] = optimizer.master_partition(g)[:real]
        for key, t in optimizer.state_partitions(g).items():
            tensors[tensor_name(g, key)] = t[:real]
    model_state = _model_only_state(model, _owned_names(manifest)) if rank == 0 else {}
    if staging is not None:
        tensors = _stage(staging, "opt", tensors)
        model_state = _stage(staging, "model", model_state)
        # The metadata too is the one at the save call: without a process group (or on rank
        # 0 of one, before the all-gather copies it) it still shares the caller's nested
        # ``extra`` values, which training may change while the save is in flight.
        manifest = copy.deepcopy(manifest)
    return _Snapshot(manifest, tensors, model_state)


def _stage(staging: dict[str, torch.Tensor], prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors into host buffers kept across saves (pinned when they come from a GPU),
    reallocating only when a size or dtype changes."""
    out = {}
    for name, t in tensors.items():
        key = f"{prefix}/{name}"
        buf = staging.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            staging[key] = buf
        buf.copy_(t.detach(), non_blocking=t.is_cuda)
        out[name] = buf
    if any(t.is_cuda for t in tensors.values()):
        torch.cuda.synchronize()
    return out


def _write_snapshot(
    snap: _Snapshot,
    loc: Location,
    group,
    rank: int,
    *,
    overwrite: bool,
    latest: bool,
    keep_last: int | None,
) -> Manifest:
    """Write a snapshot: destination, shards (+ model file), manifest, then ``latest`` and
    retention. Collective over ``group``; raises the same error on every rank."""
    _agree(
        "preparing the destination",
        lambda: prepare_destination(None, loc, overwrite) if rank == 0 else None,
        group,
    )

    def write_rank_files() -> tuple[FileMeta, FileMeta | None]:
        loc.makedirs("shards")
        shard = write_shard(loc, snap.manifest, rank, snap.tensors)
        model_file = write_model_file(loc, snap.model_state) if rank == 0 else None
        return shard, model_file

    written = _agree("writing shards", write_rank_files, group)
    gathered = _all_gather(written, group)
    final = replace(snap.manifest, shards=tuple(s for s, _ in gathered), model_file=gathered[0][1])

    def commit() -> None:
        if rank == 0:
            final.validate(loc.url_of(MANIFEST_NAME))
            loc.write_atomic(MANIFEST_NAME, final.to_json().encode())

    _agree("writing the manifest", commit, group)
    if latest or keep_last is not None:

        def publish() -> None:
            if rank != 0:
                return
            run_url, _, name = loc.url.rpartition("/")
            run_url = run_url or "."
            runs.update_latest(run_url, name, loc.storage_options)
            if keep_last is not None:
                runs.apply_retention(run_url, keep_last, loc.storage_options)

        # The checkpoint is complete and committed even if this step fails; say so.
        try:
            _agree("updating latest / retention (the checkpoint itself is complete)", publish, group)
        except CheckpointError as exc:
            raise type(exc)(
                f"{loc.url} was saved completely, but updating the run directory failed: {exc}",
                path=exc.path,
                rank=exc.rank,
            ) from None
    return final


def _check_save_args(keep_last: int | None) -> None:
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")


def save(
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
    async_: bool = False,
) -> "Manifest | AsyncSave":
    """Save the optimizer's partitioned state (and the model's other state) to ``path``.

    Collective: call on every rank of the optimizer's process group with the same arguments.
    Each rank writes ``shards/rank-r-of-N.safetensors`` holding its partition's real elements
    (fp32 masters and every elementwise state); rank 0 writes ``model.safetensors`` (buffers
    and frozen params of ``model``) and, after every rank's shard is durable, ``manifest.json``.
    ``extra`` (JSON-serialisable) is stored under ``extra["user"]``; the loss scaler's state
    and ``averager.state_dict()`` are stored too. Rank 0's view of the metadata (groups,
    hyperparameters, step) is the one recorded; every rank's shard must fit it.

    ``path`` must not exist or be empty unless ``overwrite`` (then the old checkpoint's
    manifest is removed first, and the rest of it, before anything is written). A failure or
    crash at any point leaves no manifest, so the partial checkpoint is never loaded; a refused
    save (non-empty ``path``) changes nothing on disk. Raises on every rank.

    Run directories: with ``latest=True`` the parent of ``path`` gets a ``latest`` file naming
    this checkpoint, written only after the manifest; ``keep_last=K`` (which implies
    ``latest``: retention keeps what ``latest`` names) then deletes all but the
    newest K complete checkpoints there (never the one ``latest`` names; see
    :func:`zero_ckpt.runs.apply_retention`).

    ``async_=True`` returns an :class:`AsyncSave` as soon as this rank's state is copied to
    host staging buffers (reused across saves); the files are written by a background thread
    over a dedicated gloo group. ``wait()`` returns the manifest or raises its error. The
    next ``save`` or ``load`` of the same optimizer waits for it first, and raises
    (``CheckpointError``) if it failed and ``wait()`` has not reported that yet; so does the
    optimizer's next ``step()`` once the failed save has finished on this rank (a save still
    running is not waited for). Training never silently continues past a failed save, and an
    error is stopped on once: after ``wait()`` raised it, saving and training go on.
    Otherwise returns the manifest.
    """
    _check_save_args(keep_last)
    group = _group_of(optimizer)
    rank = optimizer.rank
    _finish_pending(optimizer, f"the save to {path}")
    loc = open_location(path, storage_options)
    if not async_:
        try:
            snap = _take_snapshot(optimizer, model, extra, averager, group, None)
            return _write_snapshot(
                snap, loc, group, rank, overwrite=overwrite, latest=latest, keep_last=keep_last
            )
        finally:
            loc.close()
    try:
        snap = _take_snapshot(optimizer, model, extra, averager, group, _STAGING.setdefault(optimizer, {}))
        ckpt_group = _checkpoint_group(group)
    except BaseException:
        loc.close()
        raise
    handle = AsyncSave(loc.url)

    def background() -> None:
        try:
            handle._manifest = _write_snapshot(
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
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the save to {self.url} is still running after {timeout} s")
        if self._error is not None:
            self._reported = True
            raise self._error
        assert self._manifest is not None
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


def _finish_pending(optimizer: Any, what: str) -> None:
    """Wait for the optimizer's save in flight, if any (its staging buffers are about to be
    reused, or its files read); raise its error when it failed and nobody was told yet.
    Every rank decides alike: the ranks agreed on the outcome inside the save."""
    previous = _PENDING.pop(optimizer, None)
    if previous is None:
        return
    assert previous._thread is not None
    previous._thread.join()
    error = previous._unreported_failure(what)
    if error is not None:
        raise error


def _checkpoint_group(group):
    """A gloo group with the same ranks as ``group``, used only by background saves so their
    collectives never interleave with training's. Creating groups is collective over the whole
    job: the first async save must be called on every rank (it is, being collective)."""
    if not _distributed():
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


# ----- load ------------------------------------------------------------------------------------


def _check_compatible(
    manifest: Manifest, optimizer: Any, names: list[list[str]], check_names: bool, url: str
) -> None:
    if len(manifest.groups) != len(optimizer.layouts):
        raise LayoutMismatchError(
            f"{url} holds {len(manifest.groups)} param groups but the optimizer has "
            f"{len(optimizer.layouts)}; build the optimizer with the same param groups",
            path=url,
        )
    for g, (gm, layout) in enumerate(zip(manifest.groups, optimizer.layouts)):
        saved = [(p.name, tuple(p.shape)) for p in gm.params]
        live = [(names[g][i], tuple(s.shape)) for i, s in enumerate(layout.params)]
        for i, (a, b) in enumerate(zip(saved, live)):
            if a[1] != b[1] or (check_names and a[0] != b[0]):
                raise LayoutMismatchError(
                    f"{url}: group {g} param {i} is {a[0]!r} of shape {list(a[1])} in the "
                    f"checkpoint but {b[0]!r} of shape {list(b[1])} in the optimizer; the model "
                    "does not match the checkpoint",
                    path=url,
                )
        if len(saved) != len(live):
            raise LayoutMismatchError(
                f"{url}: group {g} has {len(saved)} params in the checkpoint but {len(live)} in "
                "the optimizer; the model does not match the checkpoint",
                path=url,
            )


def _names_are_real(optimizer: Any, model: torch.nn.Module | None) -> bool:
    """Whether the live names identify params (a model, or names given to the optimizer)."""
    if model is not None:
        return True
    return not all(
        _INVENTED_NAME.fullmatch(p.name) for layout in optimizer.layouts for p in layout.params
    )


def load(
    path: str,
    *,
    optimizer: Any,
    model: torch.nn.Module | None = None,
    averager: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> LoadResult:
    """Restore optimizer (and model) state from ``path``, saved at any data-parallel size.

    ``path`` is a checkpoint, or a run directory whose ``latest`` file names one. An async
    save of ``optimizer`` still in flight is finished first (and its failure raised, as
    ``CheckpointError``, unless ``wait()`` reported it already).

    Collective: call on every rank of the optimizer's process group. Each rank reads only the
    byte ranges of its new partition; the ranks then check together that every tensor they
    read matches the manifest's checksums. Then, and only then, the state is replaced: masters
    and tensor states (state the checkpoint does not hold is dropped), scalars (``step``),
    hyperparameters (``lr``, ...), the loss scaler, ``averager`` state, the model's buffers
    and frozen params (when the checkpoint has ``model.safetensors`` and ``model`` is given;
    their names and shapes must match), and the model's params are set from the loaded
    masters.

    The checkpoint must hold the same param groups with the same params (shapes; names too
    where the model or the optimizer gives names): else :class:`LayoutMismatchError`.
    Raises the same error class on every rank; when reading or checking fails (a mismatched
    model, a missing, truncated or corrupted file, a bad averager state), nothing has changed.
    """
    group = _group_of(optimizer)
    _finish_pending(optimizer, f"the load of {path}")
    # A run directory means the checkpoint its `latest` names: rank 0 decides, for all.
    resolved = _agree(
        "resolving the checkpoint",
        lambda: runs.resolve_checkpoint(path, storage_options) if optimizer.rank == 0 else None,
        group,
    )
    path = _all_gather(resolved, group)[0]
    loc = open_location(path, storage_options)
    try:
        manifest = _agree("reading the manifest", lambda: load_manifest(loc), group)
        names = _param_names(optimizer, model)
        check_names = _names_are_real(optimizer, model)
        _agree(
            "matching the checkpoint to the optimizer",
            lambda: _check_compatible(manifest, optimizer, names, check_names, loc.url),
            group,
        )
        checks = SourceChecks()
        read = _agree(
            "reading this rank's partition",
            lambda: _read_partition(loc, manifest, optimizer, checks),
            group,
        )
        tensors_by_group, bytes_read, headers, header_crcs = read
        # Together the ranks read every byte of every tensor exactly once: pool the piece
        # checksums (and the headers they saw) and verify each tensor against the manifest.
        pooled = _all_gather(
            ([(k, pc.pieces) for k, pc in checks.pieces.items()], headers, header_crcs), group
        )
        _agree("verifying checksums", lambda: _verify(loc, manifest, pooled), group)
        model_state = _agree(
            "reading model.safetensors", lambda: _read_model_file(loc, manifest, model), group
        )
        if averager is not None and "averager" in manifest.extra:
            # Validates before it changes anything; nothing else has changed yet.
            _agree(
                "restoring the averager",
                lambda: averager.load_state_dict(manifest.extra["averager"]),
                group,
            )

        def apply() -> None:
            for g, tensors in enumerate(tensors_by_group):
                gm = manifest.groups[g]
                optimizer.load_partition(g, tensors, dict(gm.scalars))
                optimizer.load_hyperparams(g, dict(gm.hyperparams))
            optimizer.load_loss_scaler_state(dict(manifest.extra.get("loss_scaler") or {}))
            with torch.no_grad():
                for live, value in model_state:
                    live.copy_(value)

        _agree("loading the state", apply, group)
        optimizer.sync_model_from_masters()
        return LoadResult(manifest, dict(manifest.extra.get("user") or {}), bytes_read)
    finally:
        loc.close()


def _read_partition(
    loc: Location, manifest: Manifest, optimizer: Any, checks: SourceChecks
) -> tuple[list[dict[str, torch.Tensor]], int, dict[str, SafetensorsHeader], dict[str, int]]:
    """This rank's new partitions, read from the source shards that overlap them.

    Returns ``(tensors per group keyed master/state, tensor bytes read, headers read by
    shard path, their header CRCs)``.
    """
    rank, ws = optimizer.rank, optimizer.world_size
    layouts = optimizer.layouts
    # One plan per alignment in use (an optimizer may align differently than the one that
    # saved; the flat buffer, and so the bytes, are the same).
    aligns = sorted({layout.align for layout in layouts})
    # Headers only of the source ranks this partition overlaps.
    needed: set[int] = set()
    for g, gm in enumerate(manifest.groups):
        lo, hi = layouts[g].real_range(rank)
        needed |= {r for r, _, _ in gm.layout(manifest.world_size).locate(lo, hi)}
    headers: dict[int, SafetensorsHeader] = {}
    header_crcs: dict[str, int] = {}
    problems: list[Problem] = []
    for r in sorted(needed):
        meta = manifest.shard(r)
        url = loc.url_of(meta.path)
        size = loc.size(meta.path)
        if size != meta.bytes:
            problems.append(
                Problem(url, f"is {size} bytes, the manifest says {meta.bytes} (truncated or "
                        "replaced?)", "size", r)
            )
            continue
        header, crc = read_header(loc, meta.path, size)
        problems += check_shard_header(manifest, r, header, url)
        headers[r], header_crcs[meta.path] = header, crc
    raise_problems(problems, CorruptShardError)
    plans = {a: plan_partition_read(manifest, headers, ws, rank, align=a) for a in aligns}
    buffers = _Buffers()
    chunk = knobs.chunk_bytes()
    out = []
    total = 0
    jobs: list[tuple[CopyOp, memoryview]] = []
    for g, gm in enumerate(manifest.groups):
        reads = plans[layouts[g].align]
        real = reads.real_numel[g]
        if real != layouts[g].real_numel(rank):  # the plan and the optimizer disagree: a bug
            raise LayoutMismatchError(
                f"group {g}: the plan reads {real} elements for rank {rank} but the optimizer's "
                f"partition holds {layouts[g].real_numel(rank)} real elements"
            )
        dest = {
            key: torch.empty(real, dtype=getattr(torch, gm.dtype_of(key, manifest.master_dtype)))
            for key in gm.keys
        }
        views = {key: memoryview(t.view(torch.uint8).numpy()) if real else memoryview(b"") for key, t in dest.items()}
        for op in reads.ops[g]:
            # Pieces of a few chunks each: several ranged reads in flight even when the
            # partition comes from one source shard.
            jobs += [(piece, views[op.dst_tensor]) for piece in split_op(op, 4 * chunk)]  # type: ignore[index]
            total += op.src_nbytes
        out.append(dest)
    # Disjoint destination ranges: workers write without locks (the checks have their own).
    with ThreadPoolExecutor(max_workers=resolve_workers(None, chunk)) as pool:
        for f in [pool.submit(_copy, op, loc, buffers, chunk, view, checks) for op, view in jobs]:
            f.result()
    by_path = {manifest.shard(r).path: h for r, h in headers.items()}
    return out, total, by_path, header_crcs


def _copy(
    op: CopyOp, loc: Location, buffers: _Buffers, chunk: int, target: memoryview, checks: SourceChecks
) -> None:
    def emit(rel: int, data: memoryview) -> None:
        target[op.dst_start + rel : op.dst_start + rel + len(data)] = data

    copy_op_into(op, loc, buffers, chunk, emit, checks, None)


def _verify(loc: Location, manifest: Manifest, pooled: list) -> None:
    """Check every tensor (or, for shards recorded without per-tensor checksums, every
    file) the ranks read in full together against the manifest's checksums."""
    merged = SourceChecks()
    headers: dict[str, SafetensorsHeader] = {}
    header_crcs: dict[str, int] = {}
    for pieces, rank_headers, rank_crcs in pooled:
        for key, ps in pieces:
            for piece in ps:
                merged.add(key[0], key[1], *piece)
        headers.update(rank_headers)
        header_crcs.update(rank_crcs)
    raise_problems(merged.problems(loc, manifest.shards, headers, header_crcs), CorruptShardError)


def _read_model_file(
    loc: Location, manifest: Manifest, model: torch.nn.Module | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(live model tensor, saved value)`` pairs for the model's buffers and frozen params,
    read from ``model.safetensors`` and checked (checksum, names, shapes); nothing is
    written yet. Empty without a model or a model file."""
    from safetensors.torch import load as load_safetensors

    mf = manifest.model_file
    if model is None or mf is None:
        return []
    url = loc.url_of(mf.path)
    data = loc.read_bytes(mf.path, max_bytes=mf.bytes)
    if len(data) != mf.bytes or crc32c(data) != parse_checksum(mf.checksum):
        raise CorruptShardError(
            f"{url} does not match the manifest's size or checksum: the data is corrupted "
            "(restore this file from a good copy)",
            path=url,
        )
    saved = load_safetensors(data)
    live = _model_only_state(model, _owned_names(manifest))
    unexpected = sorted(set(saved) - set(live))
    missing = sorted(set(live) - set(saved))
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"holds {unexpected[:5]} which the model does not have")
        if missing:
            parts.append(f"lacks the model's {missing[:5]}")
        raise LayoutMismatchError(
            f"{url} {' and '.join(parts)} (buffers and frozen params); the model does not match "
            "the checkpoint",
            path=url,
        )
    pairs = []
    for name, value in saved.items():
        target = live[name]
        if tuple(target.shape) != tuple(value.shape):
            raise LayoutMismatchError(
                f"{url}: {name!r} has shape {list(value.shape)} in the checkpoint but "
                f"{list(target.shape)} in the model; the model does not match the checkpoint",
                path=url,
            )
        pairs.append((target, value))
    return pairs
