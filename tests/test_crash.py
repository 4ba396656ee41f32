"""Crash safety: a save (or a retention pass) killed with SIGKILL at every write it makes.

A driver process (``tests/_crash_child.py``) writes checkpoint A (``step-1``) and points
``latest`` at it, then for each kill point forks a child that writes checkpoint B
(``step-2``) and moves ``latest`` to it, killing itself at the chosen write event (entry and
return of every ``FileWriter.write``/``write_at``/``commit`` and ``Location.write_atomic``).
A first, unkilled run lists the events; then every event is a kill point on local disk and
a sample of them on S3. After each kill this process, playing the job that resumes, checks:

- A and ``latest`` are intact: same files, same bytes (A verifies), ``latest`` names A
  (or B, exactly when the kill came after ``latest``'s commit);
- B is complete exactly when the kill came after its manifest's commit; otherwise opening it
  fails with IncompleteCheckpointError saying "incomplete" (or "not found" when nothing of
  it reached storage), and ``list`` shows it INCOMPLETE, never complete.

Synchronisation is blocking reads on pipes and ``waitpid``; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import zero_ckpt
from zero_ckpt.errors import CheckpointError, IncompleteCheckpointError
from zero_ckpt.runs import apply_retention, list_checkpoints, resolve_checkpoint, update_latest
from zero_ckpt.storage import open_location

DRIVER = Path(__file__).with_name("_crash_child.py")
A, B = "step-1", "step-2"
REPLY_DEADLINE_S = 120  # a hung driver fails the test instead of hanging it


class Driver:
    """The driver process: ``call(cmd) -> reply`` over its stdin/stdout."""

    def __init__(self, root: str, storage_options: dict, log: Path) -> None:
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            bufsize=0,
        )
        self._buf = b""
        self._send({"root": root, "storage_options": storage_options})

    def _send(self, msg: dict) -> None:
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())

    def call(self, **cmd) -> dict:
        self._send(cmd)
        deadline = time.monotonic() + REPLY_DEADLINE_S
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"driver gave no reply to {cmd} in {REPLY_DEADLINE_S}s{self.tail()}")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise AssertionError(f"driver exited while running {cmd}{self.tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        assert "error" not in reply, f"{cmd}: {reply['error']}{self.tail()}"
        return reply

    def tail(self) -> str:
        self._log_file.flush()
        text = self.log.read_text(errors="replace")[-3000:]
        return f"\ndriver stderr:\n{text}" if text else ""

    def close(self) -> None:
        try:
            self._send({"op": "exit"})
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


@dataclass
class Run:
    root: str
    so: dict
    driver: Driver

    def loc(self, name: str = ""):
        return open_location(f"{self.root}/{name}" if name else self.root, self.so)

    def snapshot(self, name: str) -> dict[str, bytes]:
        with self.loc(name) as loc:
            return {rel: loc.read_bytes(rel) for rel in loc.list_files()}


def _start(root: str, so: dict, tmp_path: Path) -> Run:
    driver = Driver(root, so, tmp_path / "driver.log")
    run = Run(root, so, driver)
    reply = driver.call(op="save", name=A, step=1, latest=True, fork=False)
    assert reply["exit"] == 0
    return run


def _event_index(events: list[str], label: str) -> int:
    """1-based number of the event: killing at it or later means it happened."""
    return events.index(label) + 1


def _check_after_kill(run: Run, a_files: dict[str, bytes], b_done: bool, latest_done: bool) -> None:
    """A unchanged byte for byte (it verified once, so it still does), latest and B as the
    kill point allows, ``list`` agreeing."""
    a_url, b_url = f"{run.root}/{A}", f"{run.root}/{B}"
    assert run.snapshot(A) == a_files, "checkpoint A changed"
    with run.loc() as loc:
        assert loc.read_bytes("latest") == (f"{B}\n" if latest_done else f"{A}\n").encode()
    assert resolve_checkpoint(run.root, run.so) == (b_url if latest_done else a_url)

    with run.loc(B) as loc:
        b_files = loc.list_files()
    if b_done:
        assert zero_ckpt.verify(b_url, storage_options=run.so).ok
    else:
        with pytest.raises(IncompleteCheckpointError) as info:
            zero_ckpt.open_checkpoint(b_url, storage_options=run.so)
        assert ("incomplete" if b_files else "not found") in str(info.value), str(info.value)

    listed = {c.name: c for c in list_checkpoints(run.root, run.so)}
    assert listed[A].complete and listed[A].is_latest == (not latest_done)
    if b_done:
        assert listed[B].complete and listed[B].is_latest == latest_done
    elif b_files:
        assert listed[B].status == "incomplete", listed[B]
    else:
        assert B not in listed


def _kill_points(run: Run, points: list[int], events: list[str]) -> list[str]:
    """Kill a save of B at each point; return a description of every check that failed."""
    a_files = run.snapshot(A)
    b_commit = _event_index(events, f"commit:after {run.root}/{B}/manifest.json")
    latest_commit = _event_index(events, f"commit:after {run.root}/latest")
    assert b_commit < latest_commit
    failures = []
    for n in points:
        reply = run.driver.call(op="save", name=B, step=2, latest=True, kill_at=n)
        label = f"kill at event {n}/{len(events)} ({events[n - 1]})"
        try:
            assert reply["signal"] == signal.SIGKILL, f"child was not killed: {reply}{run.driver.tail()}"
            _check_after_kill(run, a_files, n >= b_commit, n >= latest_commit)
        except (AssertionError, CheckpointError) as exc:  # report every kill point
            failures.append(f"{label}: {exc}")
        finally:
            with run.loc(B) as loc:
                loc.remove_all()
            if n >= latest_commit:
                update_latest(run.root, A, run.so)
    return failures


def _dry_run(run: Run) -> list[str]:
    reply = run.driver.call(op="save", name=B, step=2, latest=True, kill_at=None)
    assert reply["exit"] == 0, run.driver.tail()
    events = reply["events"]
    assert zero_ckpt.verify(f"{run.root}/{A}", storage_options=run.so).ok
    _check_after_kill(run, run.snapshot(A), b_done=True, latest_done=True)
    with run.loc(B) as loc:
        loc.remove_all()
    update_latest(run.root, A, run.so)
    return events


def test_save_killed_at_every_write_local(tmp_path):
    run = _start(str(tmp_path / "run"), {}, tmp_path)
    try:
        events = _dry_run(run)
        assert len(events) > 40  # 4 shards, the model file, the manifest and latest
        failures = _kill_points(run, list(range(1, len(events) + 1)), events)
    finally:
        run.driver.close()
    assert not failures, f"{len(failures)} kill points failed:\n" + "\n".join(failures[:10])
    assert zero_ckpt.verify(f"{run.root}/{A}").ok
    # killed writers leave temporary files at the top (latest's); they are not checkpoints
    assert [c.name for c in list_checkpoints(run.root)] == [A]


def test_save_killed_at_sampled_writes_s3(s3_bucket, tmp_path):
    bucket, so = s3_bucket
    run = _start(f"{bucket}/run", so, tmp_path)
    try:
        events = _dry_run(run)
        b_commit = _event_index(events, f"commit:after {run.root}/{B}/manifest.json")
        latest_commit = _event_index(events, f"commit:after {run.root}/latest")
        sample = set(range(1, len(events) + 1, max(1, len(events) // 4)))
        sample |= {b_commit - 1, b_commit, latest_commit - 1, latest_commit, len(events)}
        failures = _kill_points(run, sorted(sample), events)
    finally:
        run.driver.close()
    assert not failures, f"{len(failures)} kill points failed:\n" + "\n".join(failures[:10])
    assert zero_ckpt.verify(f"{run.root}/{A}", storage_options=so).ok


def test_retention_killed_at_every_delete_local(tmp_path):
    """Retention killed at any delete: what it keeps is intact, what it removes is either
    still complete or recognisably incomplete (never complete-looking with files missing),
    and the next pass finishes the job."""
    root = tmp_path / "run"
    run = _start(str(root), {}, tmp_path)
    pristine = tmp_path / "pristine"
    try:
        for step in (2, 3, 4):
            run.driver.call(op="save", name=f"step-{step}", step=step, latest=step == 2, fork=False)
        shutil.copytree(root, pristine)
        kept = {name: run.snapshot(name) for name in ("step-2", "step-4")}
        reply = run.driver.call(op="retain", keep_last=1, kill_at=None)
        assert reply["exit"] == 0, run.driver.tail()
        events = reply["events"]
        assert events[0] == f"remove:before {run.root}/step-1/manifest.json"
        failures = []
        for n in range(1, len(events) + 1):
            shutil.rmtree(root)
            shutil.copytree(pristine, root)
            reply = run.driver.call(op="retain", keep_last=1, kill_at=n)
            try:
                assert reply["signal"] == signal.SIGKILL, reply
                listed = {c.name: c for c in list_checkpoints(run.root)}
                for name, files in kept.items():
                    assert run.snapshot(name) == files and listed[name].complete
                assert listed["step-2"].is_latest
                for name in ("step-1", "step-3"):
                    assert name not in listed or listed[name].status in ("complete", "incomplete")
                    if name in listed and listed[name].complete:
                        assert zero_ckpt.verify(f"{run.root}/{name}").ok
                gone = {"step-1", "step-3"} - set(listed)
                assert sorted(apply_retention(run.root, 1)) == sorted({"step-1", "step-3"} - gone)
                assert [c.name for c in list_checkpoints(run.root)] == ["step-2", "step-4"]
            except (AssertionError, CheckpointError) as exc:  # report every kill point
                failures.append(f"kill at event {n} ({events[n - 1]}): {exc}")
    finally:
        run.driver.close()
    assert not failures, "\n".join(failures[:10])
