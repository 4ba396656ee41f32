"""Run directories: many checkpoints side by side, a ``latest`` pointer, listing and retention.

A run directory holds checkpoints as subdirectories (any names, e.g. ``step-1200``) and a
``latest`` file: one line of text, the name of the newest *complete* checkpoint. ::

    s3://bucket/run1/
      latest                      "step-1200\\n", replaced atomically, only after a complete save
      step-1100/manifest.json ...
      step-1200/manifest.json ...
      step-1300/shards/...        a save in progress (or one that crashed): no manifest.json

The commit point of a checkpoint stays its ``manifest.json`` (see :mod:`zero_ckpt.storage`);
``latest`` is a second, later commit that names one already complete checkpoint, so a crash at
any moment leaves ``latest`` naming the previous complete checkpoint or the new one, never a
partial one.

Listing is one recursive listing of the run directory plus one read per ``manifest.json``
(in parallel), not a round trip per directory: on object stores that is what costs. The
listing logic (grouping paths by checkpoint, ordering, which checkpoints retention removes) is
pure and lives in the ``_``-prefixed helpers and :func:`plan_retention`.

Ordering: by the manifest's ``step`` scalar; where a checkpoint has none (no manifest yet, or
no ``step`` recorded) by the last number in its name (``step-1300`` -> 1300); then by name.
Checkpoints with neither sort last (newest), which keeps retention from deleting what it
cannot place.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from zero_ckpt import knobs
from zero_ckpt.errors import CheckpointError, IncompleteCheckpointError, ManifestError
from zero_ckpt.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, MODEL_FILE_NAME, Manifest
from zero_ckpt.storage import Location, open_location

__all__ = [
    "LATEST_NAME",
    "CHECKPOINT_KINDS",
    "NOT_A_CHECKPOINT",
    "CheckpointInfo",
    "RunListing",
    "RunDirectoryError",
    "update_latest",
    "read_latest",
    "resolve_checkpoint",
    "latest_zero_ckpt",
    "list_checkpoints",
    "scan_run",
    "plan_retention",
    "apply_retention",
]

LATEST_NAME = "latest"
CHECKPOINT_KINDS = ("zero-ckpt", "deepspeed")
NOT_A_CHECKPOINT = "not-a-checkpoint"
_SHARDS_DIR = "shards"
_PARTS_DIR = "_parts"
#: a `latest` file names one checkpoint folder: anything larger is not one (read capped)
_MAX_LATEST_BYTES = 4096
_CLAIM_MARKER = "zero-ckpt-incomplete.json"  # a job's claim on its destination (storage)
_DS_OPTIM = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_DS_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_DCP_FILE = re.compile(r"^__(\d+)_(\d+)\.distcp$")
_DCP_METADATA = ".metadata"
_DS_MODEL_FILE = "mp_rank_00_model_states.pt"
_HF_FILE = re.compile(
    r"^(config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"
    r"|(model|pytorch_model)\.(safetensors|bin)\.index\.json)$"
)
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


class RunDirectoryError(CheckpointError, ValueError):
    """A run directory (or its ``latest`` file, or a retention setting) is not usable as given."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a run directory, as :func:`list_checkpoints` found it.

    ``status`` is ``"complete"`` (manifest present and valid, every file it lists present),
    ``"incomplete"`` (no ``manifest.json``: a save that has not finished or never will) or
    ``"invalid"`` (a manifest that cannot be read, fails validation, or lists a file that is
    not there); ``complete`` is ``status == "complete"`` and ``problem`` says why not.
    ``step`` and ``world_size`` come from the manifest (None without a valid one). ``bytes``:
    the shard and model file sizes the manifest records when complete, else the sizes of the
    files present. ``files``: how many files the directory holds.

    ``kind``: ``"zero-ckpt"`` (format v1, as above); ``"deepspeed"`` (a DeepSpeed ZeRO tag
    folder such as ``global_step1200``: ``step`` from its name, ``world_size`` from its
    ``*_optim_states.pt`` files, complete when every rank's file and
    ``mp_rank_00_model_states.pt`` are there, ``bytes`` the files' sizes); ``"dcp"`` (a PyTorch
    DCP checkpoint folder such as torchtitan's ``step-1200``: ``step`` from its name,
    ``world_size`` from its ``__<rank>_0.distcp`` files, complete when ``.metadata``, which
    ``dcp.save`` writes last, is there); or, for folders that
    are not checkpoints (``status`` ``"not-a-checkpoint"``), ``"hf"`` (consolidated weights:
    ``config.json``/``model*.safetensors``/``pytorch_model*.bin``), ``"torch"`` (``*.pt``
    files) and ``"folder"`` (anything else); ``problem`` says what it holds.
    """

    name: str
    url: str
    status: str
    step: int | float | None
    world_size: int | None
    bytes: int
    files: int
    is_latest: bool = False
    problem: str | None = None
    kind: str = "zero-ckpt"

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def is_checkpoint(self) -> bool:
        """A checkpoint (format v1 or DeepSpeed), as opposed to another folder."""
        return self.kind in CHECKPOINT_KINDS

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (what ``zero-ckpt list --json`` prints per checkpoint)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "url": self.url,
            "complete": self.complete,
            "status": self.status,
            "step": self.step,
            "world_size": self.world_size,
            "bytes": self.bytes,
            "files": self.files,
            "is_latest": self.is_latest,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class RunListing:
    """A run directory as :func:`scan_run` found it: its checkpoints (format v1 and DeepSpeed,
    oldest first), the name ``latest`` holds (None without the file or when it is damaged),
    every problem with the pointer (damaged, or naming a checkpoint that is missing or not
    complete), the folders beside them that are not checkpoints (``others``, by name) and, for
    ``s3://`` roots, the multipart uploads left open under the root (``pending_uploads``,
    None where not looked up)."""

    root: str
    checkpoints: tuple[CheckpointInfo, ...]
    latest: str | None
    problems: tuple[str, ...] = ()
    others: tuple[CheckpointInfo, ...] = ()
    pending_uploads: tuple[dict[str, Any], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "latest": self.latest,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "others": [c.to_dict() for c in self.others],
            "pending_uploads": None if self.pending_uploads is None else list(self.pending_uploads),
            "problems": list(self.problems),
        }


# ----- the latest pointer ----------------------------------------------------------------------


def update_latest(run_url: str, name: str, storage_options: dict[str, Any] | None = None) -> None:
    """Point ``<run_url>/latest`` at the checkpoint ``<run_url>/<name>``, atomically.

    Refuses (IncompleteCheckpointError naming the URL) unless ``<name>/manifest.json`` is
    there and valid: ``latest`` only ever names a complete checkpoint. The file is replaced
    with :meth:`Location.write_atomic`, so readers see the old name or the new one. Call it
    once, after the checkpoint's manifest is written (on rank 0 only, for a collective save).
    """
    _check_name(name, f"{run_url}/{LATEST_NAME}")
    with open_location(run_url, storage_options) as run:
        url = run.url_of(name)
        _read_valid_manifest(run, name, url)
        run.write_atomic(LATEST_NAME, (name + "\n").encode())


def read_latest(run_url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The checkpoint name ``<run_url>/latest`` holds, or None when there is no such file.

    RunDirectoryError when the file is there but does not hold one valid name.
    """
    with open_location(run_url, storage_options) as run:
        return _read_latest(run)


def resolve_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The checkpoint to use for ``url``: ``url`` itself when it is a checkpoint (or nothing
    recognisable, so the caller's own "not found"/"incomplete" error names it); for a run
    directory, the checkpoint its ``latest`` names.

    IncompleteCheckpointError when ``latest`` names a checkpoint that is missing or has no
    ``manifest.json``; RunDirectoryError for a run directory without ``latest`` (naming its
    newest complete checkpoint) or with a damaged one.
    """
    with open_location(url, storage_options) as loc:
        if loc.exists(MANIFEST_NAME):
            return loc.url
        name = _read_latest(loc)
        if name is None:
            _refuse_run_without_latest(loc)
            return loc.url
        target = loc.url_of(name)
        if not loc.exists(f"{name}/{MANIFEST_NAME}"):
            state = "is missing" if not loc.exists(name) else "has no manifest.json (incomplete)"
            raise IncompleteCheckpointError(
                f"{loc.url_of(LATEST_NAME)} names {name!r}, but {target} {state}; the run "
                "directory was changed by hand or by another tool: point latest at a complete "
                "checkpoint (zero_ckpt.runs.update_latest) or load a checkpoint URL directly",
                path=target,
            )
        return target


def latest_zero_ckpt(loc: Location) -> str | None:
    """For a run directory whose ``latest`` names a format-v1 checkpoint (one with
    ``manifest.json``): that checkpoint's URL; else None (``loc`` is itself a checkpoint, a
    DeepSpeed run folder, or holds no such pointer). Never raises for a damaged ``latest``:
    the caller then reads ``loc`` as it is and reports what it finds."""
    if loc.exists(MANIFEST_NAME):
        return None
    try:
        name = _read_latest(loc)
    except RunDirectoryError:
        return None
    if name is None or not loc.exists(f"{name}/{MANIFEST_NAME}"):
        return None
    return loc.url_of(name)


# ----- listing ---------------------------------------------------------------------------------


def list_checkpoints(
    root: str, storage_options: dict[str, Any] | None = None
) -> list[CheckpointInfo]:
    """Every checkpoint (format v1 or DeepSpeed tag folder) under the run directory ``root``,
    oldest first (see the module doc for the order), complete or not; ``[]`` when ``root``
    is empty or absent. Folders that are not checkpoints are left out (see :func:`scan_run`).

    One recursive listing of ``root``, then each ``manifest.json`` read once (in parallel).
    A damaged manifest is reported (``status="invalid"``), never raised; storage failures are
    raised. RunDirectoryError when ``root`` is itself a checkpoint.
    """
    with open_location(root, storage_options) as run:
        return _list(run)[0]


def scan_run(root: str, storage_options: dict[str, Any] | None = None) -> RunListing:
    """:func:`list_checkpoints` plus the ``latest`` pointer and its problems, the folders that
    are not checkpoints and, for ``s3://`` roots, pending multipart uploads (what ``zero-ckpt
    list`` shows). Never raises for a damaged pointer: it is reported.

    RunDirectoryError naming ``root`` when it does not exist, is a file, or is itself a
    checkpoint (format v1 or a DeepSpeed tag folder).
    """
    with open_location(root, storage_options) as run:
        infos, latest, _, problems, others = _list(run, require_root=True)
        return RunListing(
            run.url, tuple(infos), latest, tuple(problems), tuple(others),
            _pending_uploads(run, storage_options),
        )


def plan_retention(
    checkpoints: Sequence[CheckpointInfo],
    keep_last: int,
    latest: str | None = None,
    keep: Iterable[str] = (),
) -> list[str]:
    """Names :func:`apply_retention` removes, oldest first (pure).

    Removed: every complete checkpoint but the newest ``keep_last``, and every incomplete one
    whose name carries a number (``step-1300``) that sorts before the newest complete one.
    Kept always: ``latest`` and the names in ``keep``; invalid ones (a manifest written by a
    newer zero-ckpt must not be deleted by an older one); incomplete ones at or after the
    newest complete one, or that cannot be placed (a save may be in progress).
    """
    _check_keep_last(keep_last)
    ordered = sorted(checkpoints, key=_order_key)
    complete = [c for c in ordered if c.complete]
    doomed = {c.name for c in complete[: max(0, len(complete) - keep_last)]}
    if complete:
        newest = _order_key(complete[-1])
        doomed |= {
            c.name
            for c in ordered
            if c.status == "incomplete"
            and _name_number(c.name) is not None
            and _order_key(c) < newest
        }
    doomed -= {latest, *keep}
    return [c.name for c in ordered if c.name in doomed]


def apply_retention(
    root: str,
    keep_last: int,
    storage_options: dict[str, Any] | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete old checkpoints under ``root`` as :func:`plan_retention` says; return the names
    removed (or, with ``dry_run``, that would be).

    Each one loses its ``manifest.json`` first and its other files after, so a crash or a
    failed delete midway leaves it recognisably incomplete (the next run removes the rest),
    never half-deleted yet looking complete. The checkpoint ``latest`` names is never
    removed. A damaged ``latest`` stops it (RunDirectoryError) before anything is deleted.
    """
    _check_keep_last(keep_last)
    with open_location(root, storage_options) as run:
        infos, latest, foreign, _, _ = _list(run, strict_latest=True)
        # Directories holding files a save never writes are someone else's: never deleted;
        # neither are DeepSpeed checkpoints (another tool's saves) nor other folders.
        infos = [c for c in infos if c.kind == "zero-ckpt"]
        doomed = plan_retention(infos, keep_last, latest, keep=foreign)
        if dry_run:
            return doomed
        by_name = {c.name: c for c in infos}
        for name in doomed:
            with open_location(run.url_of(name), storage_options) as ckpt:
                if by_name[name].status != "incomplete":
                    ckpt.remove(MANIFEST_NAME)  # the commit point goes first
                ckpt.remove_all()
        return doomed


# ----- helpers: pure ---------------------------------------------------------------------------


def _check_keep_last(keep_last: int) -> None:
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise RunDirectoryError(
            f"keep_last is {keep_last!r}; it must be an integer of at least 1 (the number of "
            "complete checkpoints to keep)",
            actual=keep_last,
        )


def _check_name(name: Any, where: str) -> str:
    """A checkpoint name is one path component: no ``/``, not ``.``/``..``, one line."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..", LATEST_NAME)
        or any(c in name for c in "/\\\n\r\0")
        or name != name.strip()
    ):
        raise RunDirectoryError(
            f"{where}: {name!r} is not a checkpoint name; use the name of a subdirectory of the "
            "run directory, such as 'step-1200'",
            path=where,
            actual=name,
        )
    return name


def _parse_latest(data: bytes, url: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    lines = text.splitlines() if text is not None else []
    if text is None or len(lines) != 1:
        raise RunDirectoryError(
            f"{url} must hold one line, the name of a checkpoint, but holds {data[:80]!r}; the "
            "file is damaged: rewrite it with zero_ckpt.runs.update_latest(run, name)",
            path=url,
        )
    return _check_name(lines[0], url)


def _group_by_checkpoint(paths: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Relative paths of a run directory's listing -> (files at the top, {checkpoint name:
    its files relative to the checkpoint})."""
    top: list[str] = []
    groups: dict[str, list[str]] = {}
    for path in paths:
        name, sep, rest = path.partition("/")
        if not sep:
            top.append(path)
        elif rest:
            groups.setdefault(name, []).append(rest)
    return top, groups


def _name_number(name: str) -> int | None:
    m = _LAST_NUMBER.search(name)
    return int(m.group(1)) if m else None


def _natural(name: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


def _order_key(info: CheckpointInfo) -> tuple:
    step = info.step if _is_number(info.step) else _name_number(info.name)
    return (step is None, step if step is not None else 0, _natural(info.name))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_save_file(rel: str) -> bool:
    """A file a save (or its temporary files) creates inside a checkpoint directory."""
    base = rel.rsplit("/", 1)[-1]
    return (
        rel in (MANIFEST_NAME, MODEL_FILE_NAME)
        or rel.startswith(_SHARDS_DIR + "/")
        or (base.startswith(".") and ".tmp-" in base)  # storage's temporary siblings
    )


def _describe_manifest(
    url: str, files: list[str], data: bytes | None, manifest_url: str
) -> tuple[str, Any, int | None, int | None, str | None]:
    """(status, step, world_size, recorded bytes or None, problem) from a manifest's bytes."""
    if _CLAIM_MARKER in files:
        # a job's claim: it is writing this folder now, or it was interrupted
        return (
            "incomplete", None, None, None,
            f"{_CLAIM_MARKER} present: a job is writing it or was interrupted (run the job "
            "again with --overwrite to complete it)",
        )
    if data is None:
        return "incomplete", None, None, None, f"no {MANIFEST_NAME}: the save did not finish"
    try:
        m = Manifest.from_json(data, manifest_url).validate(manifest_url)
    except ManifestError as exc:
        return "invalid", None, None, None, str(exc)
    present = set(files)
    listed = list(m.shards) + ([m.model_file] if m.model_file else [])
    missing = [f.path for f in listed if f.path not in present]
    step = m.step if _is_number(m.step) else None
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    recorded = sum(f.bytes for f in listed)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return (
            "invalid", step, m.world_size, None,
            f"{url}/{missing[0]}{more} listed in the manifest is missing",
        )
    return "complete", step, m.world_size, recorded, None


# ----- helpers: I/O ----------------------------------------------------------------------------


def _read_latest(run: Location) -> str | None:
    try:
        data = run.read_bytes(LATEST_NAME, max_bytes=_MAX_LATEST_BYTES)
    except FileNotFoundError:
        return None
    return _parse_latest(data, run.url_of(LATEST_NAME))


def _read_valid_manifest(run: Location, name: str, url: str) -> Manifest:
    rel = f"{name}/{MANIFEST_NAME}"
    try:
        data = run.read_bytes(rel, max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        state = "does not exist" if not run.exists(name) else f"has no {MANIFEST_NAME}: it is incomplete"
        raise IncompleteCheckpointError(
            f"cannot point {run.url_of(LATEST_NAME)} at {url}: it {state}; latest may only "
            "name a complete checkpoint: write its manifest first",
            path=run.url_of(rel),
        ) from None
    return Manifest.from_json(data, run.url_of(rel)).validate(run.url_of(rel))


def _refuse_run_without_latest(loc: Location) -> None:
    """A directory of checkpoints without ``latest`` is not one checkpoint: say which to use."""
    _, groups = _group_by_checkpoint(loc.list_files())
    with_manifest = sorted(
        (n for n, files in groups.items() if MANIFEST_NAME in files), key=_natural
    )
    if with_manifest:
        raise RunDirectoryError(
            f"{loc.url} is a run directory of checkpoints without a {LATEST_NAME} file; name "
            f"a checkpoint (e.g. {loc.url_of(with_manifest[-1])}) or write {LATEST_NAME} with "
            "zero_ckpt.runs.update_latest",
            path=loc.url_of(LATEST_NAME),
        )


def _list(
    run: Location, strict_latest: bool = False, require_root: bool = False
) -> tuple[list[CheckpointInfo], str | None, set[str], list[str], list[CheckpointInfo]]:
    """(checkpoints in order, the name ``latest`` holds, names of format-v1 checkpoints that
    also hold files a save never writes, problems with ``latest``, folders that are not
    checkpoints by name). ``strict_latest``: raise for a damaged ``latest`` instead of
    reporting it. ``require_root``: RunDirectoryError when ``root`` is missing or a file."""
    if require_root:
        _check_root_is_not_a_file(run)
    top, groups = _group_by_checkpoint(run.list_files())
    if require_root and not top and not groups:
        _check_root_exists(run)
    if MANIFEST_NAME in top or any(_DS_OPTIM.match(f) for f in top):
        what = "a checkpoint" if MANIFEST_NAME in top else "a DeepSpeed checkpoint (tag folder)"
        raise RunDirectoryError(
            f"{run.url} is {what}, not a run directory of checkpoints; list its parent "
            "directory, or use `zero-ckpt inspect` on it",
            path=run.url,
        )
    kinds = {n: _kind_of(fs) for n, fs in groups.items()}
    latest: str | None = None
    problems: list[str] = []
    if LATEST_NAME in top:
        try:
            latest = _read_latest(run)
        except RunDirectoryError as exc:
            if strict_latest:
                raise
            problems.append(str(exc))
    names = sorted((n for n in groups if kinds[n] == "zero-ckpt"), key=_natural)

    def read_manifest(name: str) -> bytes | None:
        if MANIFEST_NAME not in groups[name]:
            return None
        try:
            return run.read_bytes(f"{name}/{MANIFEST_NAME}", max_bytes=MAX_MANIFEST_BYTES)
        except FileNotFoundError:  # removed since the listing (a concurrent retention)
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(len(names), knobs.io_workers(), 16))) as pool:
        manifests = list(pool.map(read_manifest, names))

    infos = []
    for name, data in zip(names, manifests):
        files = groups[name]
        url = run.url_of(name)
        status, step, world_size, recorded, problem = _describe_manifest(
            url, files, data, run.url_of(f"{name}/{MANIFEST_NAME}")
        )
        size = recorded if recorded is not None else _present_bytes(run, name, files)
        info = CheckpointInfo(
            name=name,
            url=url,
            status=status,
            step=step,
            world_size=world_size,
            bytes=size,
            files=len(files),
            is_latest=name == latest,
            problem=problem,
        )
        infos.append(info)
    others = []
    for name in sorted(groups, key=_natural):
        kind = kinds[name]
        if kind == "deepspeed":
            infos.append(_describe_deepspeed(run, name, groups[name], name == latest))
        elif kind == "dcp":
            infos.append(_describe_dcp(run, name, groups[name], name == latest))
        elif kind != "zero-ckpt":
            others.append(
                CheckpointInfo(
                    name=name, url=run.url_of(name), status=NOT_A_CHECKPOINT, step=None,
                    world_size=None, bytes=_present_bytes(run, name, groups[name]),
                    files=len(groups[name]), is_latest=name == latest,
                    problem=_describe_other(kind, groups[name]), kind=kind,
                )
            )
    if latest is not None:
        target = next((c for c in infos if c.name == latest), None)
        if target is None or not target.complete:
            other = next((c for c in others if c.name == latest), None)
            state = (
                f"is not a checkpoint ({other.problem})" if other is not None
                else "is missing" if target is None
                else f"is not complete ({target.problem})"
            )
            problems.append(
                f"{run.url_of(LATEST_NAME)} names {latest!r}, which {state}; point it at a "
                "complete checkpoint with zero_ckpt.runs.update_latest"
            )
    foreign = {
        n for n, fs in groups.items()
        if kinds[n] == "zero-ckpt" and not all(_is_save_file(f) for f in fs)
    }
    return sorted(infos, key=_order_key), latest, foreign, problems, others


def _check_root_is_not_a_file(run: Location) -> None:
    try:
        is_file = run.is_file()
    except OSError:  # the listing that follows reports a storage failure properly
        return
    if is_file:
        raise RunDirectoryError(
            f"{run.url} is a file, not a run directory; pass the folder that holds the "
            "checkpoints (or `zero-ckpt inspect` a checkpoint)",
            path=run.url,
        )


def _check_root_exists(run: Location) -> None:
    """An empty listing: an error when ``root`` does not exist (an empty folder is fine)."""
    try:
        exists = run.exists() or run.is_dir()
    except OSError:
        return
    if not exists:
        raise RunDirectoryError(
            f"no run directory at {run.url}: the path does not exist (check the path and, for "
            "object stores, the bucket and storage options)",
            path=run.url,
        )


def _kind_of(files: list[str]) -> str:
    """What a subdirectory of a run directory is, from its files (relative to it). Pure."""
    top = [f for f in files if "/" not in f]
    if MANIFEST_NAME in top:
        return "zero-ckpt"
    if any(_DS_OPTIM.match(f) or _DS_MODEL.match(f) for f in top):
        return "deepspeed"
    if _DCP_METADATA in top or any(_DCP_FILE.match(f) for f in top):
        return "dcp"
    if _CLAIM_MARKER in top or any(
        f.startswith((_SHARDS_DIR + "/", _PARTS_DIR + "/")) for f in files
    ):
        return "zero-ckpt"  # a save (or split job) that has not finished
    if any(_HF_FILE.match(f) for f in top):
        return "hf"  # consolidated weights (a save writes model.safetensors after its shards)
    if any(f.endswith((".pt", ".pth")) for f in top):
        return "torch"  # plain torch files (consolidate --format torch, torch.save)
    if any(_is_save_file(f) for f in files):
        return "zero-ckpt"  # temporary files of a save in progress
    return "folder"


def _describe_other(kind: str, files: list[str]) -> str:
    if kind == "hf":
        return "consolidated weights (config.json/model*.safetensors), not a checkpoint"
    if kind == "torch":
        return "plain torch files (*.pt), not a checkpoint: `zero-ckpt convert` reads them"
    subdirs = {f.split("/", 1)[0] for f in files if "/" in f}
    if LATEST_NAME in files and any(
        _DS_OPTIM.match(f.split("/", 1)[1]) for f in files if f.count("/") == 1
    ):
        return "a DeepSpeed run folder: list it to see its checkpoints"
    if any(f.split("/")[-1] == MANIFEST_NAME for f in files):
        return "holds checkpoints in subfolders: list it to see them"
    return f"{len(files)} file{'s' if len(files) != 1 else ''}" + (
        f" in {len(subdirs)} subfolder{'s' if len(subdirs) != 1 else ''}" if subdirs else ""
    ) + ", no checkpoint"


def _describe_dcp(run: Location, name: str, files: list[str], is_latest: bool) -> CheckpointInfo:
    """A DCP checkpoint folder from its file names (nothing is read but their sizes)."""
    top = [f for f in files if "/" not in f]
    ranks = sorted({int(m.group(1)) for f in top if (m := _DCP_FILE.match(f))})
    problem = None
    if _DCP_METADATA not in top:
        problem = f"no {_DCP_METADATA} (dcp.save writes it last: the save did not finish)"
    elif not ranks:
        problem = "no __<rank>_0.distcp files"
    return CheckpointInfo(
        name=name,
        url=run.url_of(name),
        status="complete" if problem is None else "incomplete",
        step=_name_number(name),
        world_size=len(ranks) or None,
        bytes=_present_bytes(run, name, files),
        files=len(files),
        is_latest=is_latest,
        problem=None if problem is None else f"{run.url_of(name)}: {problem}",
        kind="dcp",
    )


def _describe_deepspeed(
    run: Location, name: str, files: list[str], is_latest: bool
) -> CheckpointInfo:
    """A DeepSpeed tag folder from its file names (nothing is read but their sizes)."""
    top = [f for f in files if "/" not in f]
    ranks = sorted({int(m.group(2)) for f in top if (m := _DS_OPTIM.match(f))})
    problem = None
    if not ranks:
        problem = "no *_optim_states.pt files (saved without optimizer state, or incomplete)"
    elif ranks != list(range(len(ranks))) or len(ranks) != max(ranks) + 1:
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        problem = (
            f"optim files for ranks {missing} are missing (a save that did not finish on "
            "every rank)"
        )
    elif _DS_MODEL_FILE not in top:
        problem = f"{_DS_MODEL_FILE} is missing (it holds the parameter names and shapes)"
    return CheckpointInfo(
        name=name,
        url=run.url_of(name),
        status="complete" if problem is None else "incomplete",
        step=_name_number(name),
        world_size=(max(ranks) + 1) if ranks else None,
        bytes=_present_bytes(run, name, files),
        files=len(files),
        is_latest=is_latest,
        problem=None if problem is None else f"{run.url_of(name)}: {problem}",
        kind="deepspeed",
    )


def _pending_uploads(
    run: Location, storage_options: dict[str, Any] | None
) -> tuple[dict[str, Any], ...] | None:
    """Multipart uploads left open under an ``s3://`` root (None elsewhere, or where the
    storage layer cannot list them)."""
    if not run.url.startswith(("s3://", "s3a://")):
        return None
    from zero_ckpt import storage

    lister = getattr(storage, "list_pending_uploads", None)
    if lister is None:
        return None
    found = lister(run.url, storage_options=storage_options)
    out = []
    for up in found:
        if isinstance(up, dict):
            out.append(dict(up))
        elif hasattr(up, "__dataclass_fields__"):
            from dataclasses import asdict

            out.append(asdict(up))
        else:
            out.append({"upload": str(up)})
    return tuple(out)


def _present_bytes(run: Location, name: str, files: list[str]) -> int:
    total = 0
    for rel in files:
        try:
            total += run.size(f"{name}/{rel}")
        except FileNotFoundError:  # a temporary file renamed or removed since the listing
            pass
    return total
