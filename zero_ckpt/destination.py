"""Destinations: what a job owns there, who may write there, and whether it finished.

Three rules every writing job (reshard, convert, consolidate, save) follows:

**Own only what you wrote.** A file *belongs to zero-ckpt* when its path matches one of the
names some zero-ckpt job writes (:func:`is_tool_file`: ``manifest.json``, ``shards/rank-*``,
``model*.safetensors`` and its index, ``optimizer*``, ``_parts/``, DeepSpeed's ``latest`` and
``*_optim_states.pt`` ..., and the temporary siblings of these) or when the job names it as an
output (the Hugging Face config files that ``consolidate --hf-config-from`` copies). Every other
file is *foreign* and is never changed, moved or deleted, with or without ``overwrite``:
``--overwrite`` removes exactly the zero-ckpt files (commit points first, so nothing stale
looks complete) and the job then writes its own. Without ``overwrite`` a destination holding
zero-ckpt files is refused. Foreign files are fine for consolidate (a Hugging Face folder with
``config.json`` and a ``README.md``); a checkpoint job (reshard, convert) refuses a foreign file
inside a folder it writes (``shards/``) and keeps foreign files elsewhere.

**Sources are read-only.** :func:`check_reads` refuses a destination that is a source, lies
inside one or contains one, for every location a job reads (the checkpoint, its shards and
model file wherever they resolve to, a ``--model`` or ``--param-names`` file, a torch file),
however spelled (symlinks, ``..``, ``file://``).

**One job per destination, and an interrupted one is recognisable.** Before it looks at the
destination a reshard, convert or consolidate job *claims* it (``zero_ckpt.save`` does not:
its ranks write one destination together, and its ``manifest.json`` is its commit point):
:func:`claim_destination` creates ``zero-ckpt-incomplete.json`` exclusively (locally a locked
file linked into place, which fails if the name exists, as ``O_EXCL`` does; ``O_EXCL`` itself
where hard links are unavailable; on S3 a conditional PUT with ``If-None-Match: *``), and
removes it after its last file (manifest, index) is committed or after it cleaned up on an
error. So:

- a second job into the same destination fails at once, naming the job that holds it;
- a job killed midway leaves the marker: its output is *incomplete* whatever else is there;
  :func:`read_claim` tells, a re-run without ``overwrite`` refuses naming the interrupted
  job, and a re-run with ``overwrite`` takes the claim over and starts again.

Whether the holder still runs: locally the holder keeps an ``flock`` on the marker, which the
kernel drops when the process dies, so a live job is never taken over. On S3 (and other object
stores) the marker records host and pid: on the same host a dead pid means interrupted; a
marker written on another host cannot be checked, so ``overwrite`` takes it over (make sure
that job is not running). Take-over on S3 is a conditional PUT on the marker's ETag
(``If-Match``), so two jobs never both take the same marker. Other fsspec backends (memory://,
gcs, ...) check then write: exclusive within one process only.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from zero_ckpt.errors import DestinationExistsError, StorageError
from zero_ckpt.storage import Location, check_distinct, open_location

__all__ = [
    "CLAIM_NAME",
    "ClaimInfo",
    "DestinationClaimedError",
    "is_tool_file",
    "check_reads",
    "claim_destination",
    "read_claim",
    "holds_claim",
    "check_claim",
    "prepare_output",
    "prepare_destination",
    "tool_files",
]

CLAIM_NAME = "zero-ckpt-incomplete.json"
_CLAIM_FORMAT = "zero-ckpt-claim"

# Names zero-ckpt jobs write (relative, posix). Commit points first: overwrite removes them
# before anything else, so a crash midway never leaves a stale output that looks complete.
_COMMIT_POINTS = (
    r"manifest\.json",
    r"(model|optimizer)\.safetensors\.index\.json",
    r"optimizer\.json",
    r"latest",
    r"latest_universal",
)
_DATA_FILES = (
    r"(model|optimizer)\.safetensors",
    r"(model|optimizer)-\d{5,}-of-\d{5,}\.safetensors",
    r"optimizer\.pt",
    r"model\.pt",
    r"shards/rank-\d{5,}-of-\d{5,}\.safetensors",
    r"_parts/.+",
    # DeepSpeed layouts written by reshard --format deepspeed / deepspeed-universal
    r"[^/]+/(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt",
    r"[^/]+/mp_rank_\d+_model_states\.pt",
    r"[^/]+/zero/.+\.pt",
)
_COMMIT_RE = re.compile("|".join(f"(?:{p})" for p in _COMMIT_POINTS))
_TOOL_RE = re.compile("|".join(f"(?:{p})" for p in (*_COMMIT_POINTS, *_DATA_FILES)))
_TMP_RE = re.compile(r"\.(?P<base>.+)\.tmp-[0-9a-f]+")

# Claims this process holds, by canonical destination (jobs nest: convert -> reshard,
# consolidate --format torch -> consolidate; the inner job joins the outer job's claim).
_HELD: dict[str, "_Claim"] = {}
_HELD_LOCK = threading.Lock()


class DestinationClaimedError(DestinationExistsError):
    """Another job holds the destination, or an interrupted one left its marker there."""


def _untemp(rel: str) -> str:
    head, base = posixpath.split(rel)
    m = _TMP_RE.fullmatch(base)
    return posixpath.join(head, m.group("base")) if m else rel


def is_tool_file(rel: str, outputs: Iterable[str] = ()) -> bool:
    """Whether the relative path ``rel`` is a file zero-ckpt writes (or the temporary sibling
    of one, or the claim marker), or one of ``outputs``. Pure."""
    name = _untemp(rel)
    return name == CLAIM_NAME or bool(_TOOL_RE.fullmatch(name)) or name in set(outputs)


def tool_files(files: Iterable[str], outputs: Iterable[str] = ()) -> list[str]:
    """The zero-ckpt files among ``files``, commit points (and the marker) first. Pure."""
    outs = set(outputs)
    ours = [f for f in files if is_tool_file(f, outs)]
    return sorted(ours, key=lambda f: (not (f == CLAIM_NAME or _COMMIT_RE.fullmatch(f)), f))


# ----- sources are read-only ------------------------------------------------------------------


def _canonical_file(url: str, storage_options: dict[str, Any] | None) -> Location:
    return open_location(url, storage_options)


def check_reads(
    dst: Location,
    sources: Sequence[Location] = (),
    files: Iterable[tuple[Location, str]] = (),
    urls: Iterable[tuple[str, dict[str, Any] | None]] = (),
) -> None:
    """Refuse ``dst`` when it overlaps anything the job reads.

    ``sources``: locations read as a whole (the destination may be none of them, inside one or
    contain one); ``files``: ``(location, rel)`` files read inside a source, checked where they
    really are (a symlinked shard pointing into ``dst`` is refused); ``urls``: other files read
    (``--model``, ``--param-names``) with their storage options. DestinationExistsError naming
    the path and the fix.
    """
    for s in sources:
        check_distinct(s, dst)
    d = dst.canonical_root()
    inside = d.rstrip("/") + "/"
    seen: set[str] = set()
    for loc, rel in files:
        if loc.local_path() is not None and dst.local_path() is not None:
            where = os.path.realpath(loc.path_of(rel))
        elif loc.same_storage_kind(dst):
            where = loc.canonical_root() + ("/" + rel if rel else "")
        else:
            continue
        if where in seen:
            continue
        seen.add(where)
        if where == d or where.startswith(inside):
            _refuse_read(dst, loc.url_of(rel))
    for url, options in urls:
        with _canonical_file(url, options) as f:
            if not f.same_storage_kind(dst):
                continue
            where = f.canonical_root()
            if where == d or where.startswith(inside) or d.startswith(where.rstrip("/") + "/"):
                _refuse_read(dst, url)


def _refuse_read(dst: Location, url: str) -> None:
    raise DestinationExistsError(
        f"destination {dst.url} holds {url}, which this job reads; sources are never written: "
        "choose a destination that does not contain any input file",
        path=url,
    )


# ----- claims ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimInfo:
    """What a marker says: the ``job`` (``consolidate``, ``reshard``, ...), ``host``, ``pid``,
    ``started`` (UTC, ISO 8601) and whether the holder is known to run (``live``: True,
    False, or None when it cannot be told from here)."""

    url: str
    job: str
    host: str
    pid: int
    started: str
    live: bool | None

    def describe(self) -> str:
        return f"{self.job} (pid {self.pid} on {self.host}, started {self.started})"


def _claim_doc(job: str, token: str) -> bytes:
    doc = {
        "format": _CLAIM_FORMAT,
        "version": 1,
        "job": job,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "token": token,
        "note": "zero-ckpt is writing this folder, or was interrupted while writing it: its "
        "output here is incomplete. Re-run the job with --overwrite to complete it.",
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def _parse_claim(data: bytes, url: str, live: bool | None) -> ClaimInfo:
    try:
        doc = json.loads(data)
        if doc.get("format") != _CLAIM_FORMAT:
            raise ValueError
        return ClaimInfo(url, str(doc["job"]), str(doc["host"]), int(doc["pid"]), str(doc["started"]), live)
    except (ValueError, KeyError, TypeError, AttributeError):
        return ClaimInfo(url, "unknown job", "unknown host", -1, "unknown time", live)


def _token_of(data: bytes) -> str | None:
    try:
        return str(json.loads(data).get("token"))
    except (ValueError, AttributeError):
        return None


def _pid_alive(host: str, pid: int) -> bool | None:
    if host != socket.gethostname():
        return None
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claimed_error(dst: Location, info: ClaimInfo, overwrite: bool) -> DestinationClaimedError:
    if info.live is False:
        return DestinationClaimedError(
            f"{info.url} marks an interrupted zero-ckpt {info.describe()}: the output in "
            f"{dst.url} is incomplete; re-run with --overwrite (overwrite=True) to replace it",
            path=info.url,
        )
    if info.live is None and not overwrite:
        return DestinationClaimedError(
            f"{info.url} says zero-ckpt {info.describe()} is writing {dst.url} or was interrupted "
            "(it cannot be checked from this host); wait for it, or if it is not running re-run "
            "with --overwrite (overwrite=True)",
            path=info.url,
        )
    return DestinationClaimedError(
        f"{dst.url} is being written by another zero-ckpt job, {info.describe()} (its marker "
        f"{info.url}); wait for it to finish or choose another destination",
        path=info.url,
    )


class _Claim:
    """A held claim; ``release()`` removes the marker (the outermost holder's release)."""

    def __init__(self, dst: Location, key: str, token: str) -> None:
        self.dst = dst
        self.key = key
        self.token = token
        self.depth = 1
        self.fd = -1
        self.ino: int | None = None
        self.created_root = False

    def release(self) -> None:
        with _HELD_LOCK:
            self.depth -= 1
            if self.depth > 0:
                return
            _HELD.pop(self.key, None)
        if self.dst.local_path() is not None:
            path = self.dst.path_of(CLAIM_NAME)
            try:
                if self.ino is not None and os.stat(path).st_ino == self.ino:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            finally:
                if self.fd >= 0:
                    os.close(self.fd)
                    self.fd = -1
            if self.created_root:
                try:
                    os.rmdir(self.dst.root)  # only if the failed job left it empty
                except OSError:
                    pass
        else:
            self.dst.remove(CLAIM_NAME)


class claim_destination:
    """``with claim_destination(dst, "consolidate", overwrite):`` holds ``dst`` for one job.

    Creates the marker ``dst/zero-ckpt-incomplete.json`` exclusively (see the module doc) and
    removes it on exit, success or error; a job killed in between leaves it, which marks the
    output incomplete. Raises :class:`DestinationClaimedError` (one sentence naming the marker,
    the job holding it and the fix) when another job holds ``dst``, or when an interrupted
    job's marker is there and ``overwrite`` is false; with ``overwrite`` an interrupted job's
    marker is taken over. Re-entrant within a process (a job that delegates to another joins
    its claim). Call it after the source checks, before looking at or changing ``dst``.
    """

    def __init__(self, dst: Location, job: str, overwrite: bool) -> None:
        self.dst = dst
        self.job = job
        self.overwrite = overwrite
        self._claim: _Claim | None = None

    def __enter__(self) -> "claim_destination":
        key = self.dst.canonical_root()
        with _HELD_LOCK:
            held = _HELD.get(key)
            if held is not None:
                held.depth += 1
                self._claim = held
                return self
        token = uuid.uuid4().hex
        claim = _Claim(self.dst, key, token)
        if self.dst.local_path() is not None:
            self._claim_local(claim)
        elif self.dst.supports_conditional_put:
            self._claim_conditional(claim)
        else:
            self._claim_other(claim)
        with _HELD_LOCK:
            _HELD[key] = claim
        self._claim = claim
        return self

    def __exit__(self, *exc: object) -> None:
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    # -- local disk: a locked temporary file linked into place --------------------------------

    def _claim_local(self, claim: _Claim) -> None:
        import fcntl

        root = self.dst.root
        claim.created_root = not os.path.exists(root)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise self.dst._error(exc, "", "create") from None
        path = os.path.join(root, CLAIM_NAME)
        data = _claim_doc(self.job, claim.token)
        for _attempt in range(4):
            tmp = os.path.join(root, f".{CLAIM_NAME}.tmp-{claim.token[:12]}")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
                try:
                    os.link(tmp, path)  # atomic create-if-absent of the marker, locked already
                    claim.fd, claim.ino = fd, os.fstat(fd).st_ino
                    fd = -1
                    return
                except FileExistsError:
                    pass
                except OSError:  # no hard links here (some network/FUSE mounts): O_EXCL itself
                    if self._create_excl(claim, path, data):
                        return
            finally:
                os.unlink(tmp)
                if fd >= 0:
                    os.close(fd)
            self._take_over_local(path)
        raise DestinationClaimedError(
            f"{self.dst.url_of(CLAIM_NAME)} keeps changing: another job is claiming "
            f"{self.dst.url} at the same time; choose another destination",
            path=self.dst.url_of(CLAIM_NAME),
        )

    @staticmethod
    def _create_excl(claim: _Claim, path: str, data: bytes) -> bool:
        """Create the marker with O_EXCL and lock it at once (a reader that comes between the
        two sees an unlocked marker without content: :func:`_parse_claim` names it an unknown
        job, and only ``overwrite`` takes such a marker over)."""
        import fcntl

        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, data)
        claim.fd, claim.ino = fd, os.fstat(fd).st_ino
        return True

    def _take_over_local(self, path: str) -> None:
        """The marker exists: refuse if its holder runs (or, without overwrite, if it was
        interrupted); else unlink it so the next attempt can create ours."""
        import fcntl

        probe = _probe_local_claim(path, self.dst.url_of(CLAIM_NAME), fcntl.LOCK_EX)
        if probe is None:
            return  # released meanwhile: try again
        fd, info = probe
        live = info.live
        try:
            if live or not self.overwrite:
                raise _claimed_error(self.dst, info, self.overwrite)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)  # we hold the dead holder's lock: nobody else unlinks it
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)

    # -- S3: conditional PUTs ---------------------------------------------------------------

    def _claim_conditional(self, claim: _Claim) -> None:
        if not self.dst.supports_conditional_put:
            raise StorageError(
                f"{self.dst.url}: an S3 claim was asked for a destination that is not on S3", path=self.dst.url
            )
        url = self.dst.url_of(CLAIM_NAME)
        data = _claim_doc(self.job, claim.token)

        for _attempt in range(4):
            if self.dst.put_conditional(CLAIM_NAME, data, if_none_match=True):
                return
            etag = self.dst.etag(CLAIM_NAME)
            if etag is None:
                continue  # released meanwhile
            body = self.dst.read_bytes(CLAIM_NAME)
            if _token_of(body) == claim.token:
                return  # our own PUT landed, its answer was lost and the retry refused
            info0 = _parse_claim(body, url, None)
            info = ClaimInfo(info0.url, info0.job, info0.host, info0.pid, info0.started,
                             _pid_alive(info0.host, info0.pid))
            if info.live or not self.overwrite:
                raise _claimed_error(self.dst, info, self.overwrite)
            if self.dst.put_conditional(CLAIM_NAME, data, if_match=etag):
                return
        raise DestinationClaimedError(
            f"{url} keeps changing: another job is claiming {self.dst.url} at the same time; "
            "choose another destination",
            path=url,
        )

    # -- other backends: check, then write (exclusive within this process) --------------------

    _OTHER_LOCK = threading.Lock()

    def _claim_other(self, claim: _Claim) -> None:
        url = self.dst.url_of(CLAIM_NAME)
        with self._OTHER_LOCK:
            if self.dst.exists(CLAIM_NAME):
                info0 = _parse_claim(self.dst.read_bytes(CLAIM_NAME), url, None)
                info = ClaimInfo(info0.url, info0.job, info0.host, info0.pid, info0.started,
                                 _pid_alive(info0.host, info0.pid))
                if info.live or not self.overwrite:
                    raise _claimed_error(self.dst, info, self.overwrite)
            self.dst.makedirs()
            self.dst.write_atomic(CLAIM_NAME, _claim_doc(self.job, claim.token))


def holds_claim(dst: Location) -> bool:
    """Whether this process holds ``dst``'s claim (its marker is then no stranger)."""
    with _HELD_LOCK:
        return dst.canonical_root() in _HELD


def _probe_local_claim(path: str, url: str, lock: int) -> tuple[int, ClaimInfo] | None:
    """Open a local marker and try its lock (``fcntl.LOCK_SH`` or ``LOCK_EX``) without
    waiting: its holder is alive exactly when the lock is taken. Returns the open descriptor
    (the caller closes it; a lock it got is held until then) and the marker's content, or None
    when the marker is gone."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, lock | fcntl.LOCK_NB)
            live = False
        except BlockingIOError:
            live = True
        return fd, _parse_claim(os.pread(fd, 1 << 16, 0), url, live)
    except BaseException:
        os.close(fd)
        raise


def read_claim(dst: Location) -> ClaimInfo | None:
    """The marker's content if ``dst`` holds one (an incomplete output: a job is writing it or
    was interrupted), else None. ``live`` says whether its job still runs, where that can be
    told (locally always; on object stores for a job on this host)."""
    if not dst.exists(CLAIM_NAME):
        return None
    url = dst.url_of(CLAIM_NAME)
    if dst.local_path() is not None:
        import fcntl

        probe = _probe_local_claim(dst.path_of(CLAIM_NAME), url, fcntl.LOCK_SH)
        if probe is None:
            return None
        os.close(probe[0])
        return probe[1]
    info = _parse_claim(dst.read_bytes(CLAIM_NAME), url, None)
    return ClaimInfo(info.url, info.job, info.host, info.pid, info.started, _pid_alive(info.host, info.pid))


def check_claim(dst: Location, overwrite: bool) -> None:
    """Refuse ``dst`` while a marker this process does not hold says a job runs there, or,
    without ``overwrite``, that one was interrupted (DestinationClaimedError)."""
    if holds_claim(dst):
        return
    info = read_claim(dst)
    if info is not None and (info.live or not overwrite):
        raise _claimed_error(dst, info, overwrite)


# ----- preparing the destination ----------------------------------------------------------------


def prepare_output(
    dst: Location,
    overwrite: bool,
    *,
    outputs: Iterable[str] = (),
    folders: Sequence[str] = ("shards",),
    sources: Sequence[Location] = (),
) -> list[str]:
    """Make ``dst`` ready for a job writing ``outputs`` (beyond the zero-ckpt names); returns
    the zero-ckpt files it removed.

    Refuses (DestinationExistsError, one sentence naming the file and the fix): a destination
    overlapping a source; a foreign file inside one of ``folders`` (a folder the job writes);
    zero-ckpt files (or files named in ``outputs``) unless ``overwrite``; a claim marker this
    process does not hold whose job runs (or, without ``overwrite``, was interrupted). With
    ``overwrite`` it removes exactly the zero-ckpt files and ``outputs``, commit points first;
    foreign files are never touched.
    """
    for s in sources:
        check_distinct(s, dst)
    outs = set(outputs)
    files = dst.list_files()
    if CLAIM_NAME in files:
        check_claim(dst, overwrite)
    ours = [f for f in tool_files(files, outs) if not (f == CLAIM_NAME and holds_claim(dst))]
    strangers = [
        f for f in files
        if f not in ours and f != CLAIM_NAME and f.split("/", 1)[0] in folders and "/" in f
    ]
    if strangers:
        first = strangers[0]
        raise DestinationExistsError(
            f"{dst.url_of(first)} is not a file zero-ckpt writes but lies in "
            f"{first.split('/', 1)[0]}/, which this job writes; move it out of {dst.url} or "
            "choose another destination",
            path=dst.url_of(first),
        )
    if ours and not overwrite:
        more = f" and {len(ours) - 1} more" if len(ours) > 1 else ""
        raise DestinationExistsError(
            f"destination {dst.url} already exists and holds zero-ckpt output "
            f"({ours[0]!r}{more}); choose a new path or pass --overwrite (overwrite=True) to "
            "replace those files (files zero-ckpt does not write are kept)",
            path=dst.url_of(ours[0]),
        )
    for rel in ours:
        dst.remove(rel)
    _remove_empty_dirs(dst, ours)
    dst.makedirs()
    return ours


def _remove_empty_dirs(dst: Location, removed: Iterable[str]) -> None:
    # Local disk keeps the folders of removed files (shards/, _parts/<job>/): drop them when
    # nothing else is left in them; a folder holding a user's file stays.
    if dst.local_path() is None:
        return
    dirs = {posixpath.dirname(r) for r in removed}
    for d in sorted((x for x in dirs if x), key=lambda x: -x.count("/")):
        while d:
            try:
                os.rmdir(dst.path_of(d))
            except OSError:
                break
            d = posixpath.dirname(d)


def prepare_destination(
    src: Location | None,
    dst: Location,
    overwrite: bool,
    *,
    outputs: Any = (),
    folders: Any = ("shards",),
) -> None:
    """Make ``dst`` ready for a new checkpoint or output set, owning only what zero-ckpt writes.

    Refuses a destination that is the source, inside it or contains it; one holding files
    zero-ckpt writes (``manifest.json``, shards, ``model*.safetensors`` ..., or ``outputs``)
    unless ``overwrite``; and a file it does not write inside one of ``folders``. With
    ``overwrite`` exactly those zero-ckpt files go, the commit points (``manifest.json``,
    indexes) first, so a crash midway never leaves a stale "complete" one; every other file
    stays. See the module docstring for the rules and the claim marker.
    """
    prepare_output(
        dst, overwrite, outputs=outputs, folders=tuple(folders),
        sources=(src,) if src is not None else (),
    )
