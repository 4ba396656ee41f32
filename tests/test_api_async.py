"""``zero_ckpt.async_save``, the ``latest`` pointer and retention from ``save``, and
``load`` of a run directory, with a live ZeroOptimizer.

World size 2 runs every scenario in ONE spawn over gloo (``_dist.run_scenarios``); world size
1 runs the same scenarios in this process without a process group. No test relies on timing
for passing: the background writer is held at a gate (a wrapper around the ``write_shard``
that ``zero_ckpt.snapshot`` calls) that the test opens when it chooses, so "the save returned
before its files were written" and "training went on while it was writing" are facts, not
races. Where a test checks that something *waits* (the next save, ``load``), a timer opens the
gate 0.3 s later: correct code always passes; code that does not wait fails unless the
timer fires first (it reads, or overwrites the staging of, a checkpoint not written yet).
"""

from __future__ import annotations

import os
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from _dist import check, run_scenarios
from test_api import CONFIGS, assert_same_snapshot, barrier, make, snapshot, train
import zero_ckpt
from zero_ckpt import async_saving, snapshot as snapshot_module
from zero_ckpt.errors import CheckpointError, DestinationExistsError
from zero_ckpt.runs import RunDirectoryError, list_checkpoints, read_latest

CFG = CONFIGS["3to3"]  # Adam, stage 2, align 4: model file (buffers, frozen param) on rank 0
GATE_TIMEOUT_S = 25  # below the process-group timeout: a gate never opened fails, not hangs


# ----- helpers ---------------------------------------------------------------------------------


class Gate:
    """Replace the ``write_shard`` that ``zero_ckpt.snapshot`` calls (for blocking and
    background saves alike) with one that records the tensors it is given and, while closed,
    holds the background writer before it writes. (``snapshot`` binds ``write_shard`` by name
    at import, so that is the name to patch.)"""

    def __init__(self, closed: bool = True, fail: BaseException | None = None) -> None:
        self.open_ = threading.Event()
        if not closed:
            self.open_.set()
        self.fail = fail
        self.calls: list[dict[str, tuple[int, int]]] = []  # name -> (id, data_ptr) per call

    def __enter__(self) -> "Gate":
        self.real = snapshot_module.write_shard
        snapshot_module.write_shard = self._write
        return self

    def __exit__(self, *exc: Any) -> None:
        self.open_.set()
        snapshot_module.write_shard = self.real

    def open(self, after: float | None = None) -> None:
        if after is None:
            self.open_.set()
        else:
            timer = threading.Timer(after, self.open_.set)
            timer.daemon = True
            timer.start()

    def _write(self, loc, manifest, rank, tensors, **kwargs):
        self.calls.append({k: (id(t), t.data_ptr()) for k, t in tensors.items()})
        if not self.open_.wait(GATE_TIMEOUT_S):
            raise RuntimeError("test gate never opened")
        if self.fail is not None:
            raise self.fail
        return self.real(loc, manifest, rank, tensors, **kwargs)


def files_of(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_files(a: str, b: str) -> None:
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb), (sorted(fa), sorted(fb))
    assert "manifest.json" in fa and any(k.startswith("shards/") for k in fa)
    for rel in fa:
        assert fa[rel] == fb[rel], f"{rel} differs between {a} and {b}"


def loaded_snapshot(path: str) -> dict[str, Any]:
    """The state a fresh optimizer holds after loading ``path`` (collective)."""
    model, opt = make(CFG)
    zero_ckpt.load(path, optimizer=opt, model=model)
    return snapshot(opt, model)


def masters_differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return any(not torch.equal(a["masters"][k], b["masters"][k]) for k in a["masters"])


def expect_raise(exc_type: type, fn: Callable[[], Any], *needles: str) -> BaseException:
    with pytest.raises(exc_type) as info:
        fn()
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    return info.value


def verified(path: str) -> None:
    report = zero_ckpt.verify(path)
    assert report.ok, report.problems


def fresh_dir(root: str, name: str, rank: int) -> str:
    d = f"{root}/{name}"
    if rank == 0:
        os.makedirs(d)
    barrier()
    return d


# ----- scenarios (module level: pickled by reference into the ranks) ---------------------------


def async_matches_blocking(rank: int, ws: int, root: str) -> None:
    """The async save returns before it writes; training goes on meanwhile; what it writes is
    the state at the save call, byte for byte what a blocking save of that state writes;
    the staging buffers are reused; the next save waits for the previous one."""
    d = fresh_dir(root, "basics", rank)
    model, opt = make(CFG)
    train(model, opt, rank, ws, range(2))
    extra = {"epoch": 1, "nested": {"seen": [1]}}
    at_save = snapshot(opt, model)
    zero_ckpt.save(f"{d}/blocking", optimizer=opt, model=model, extra=extra)

    with Gate() as gate:
        handle = zero_ckpt.async_save(f"{d}/async", optimizer=opt, model=model, extra=extra)
        assert isinstance(handle, zero_ckpt.AsyncSave)
        # The writer is held at the gate: the save returned before writing its shard.
        assert not handle.done() and not handle.failed()
        assert not Path(f"{d}/async/manifest.json").exists()
        # Training (and the user's data) move on while the save is in flight.
        extra["epoch"] = 2
        extra["nested"]["seen"].append(2)
        train(model, opt, rank, ws, range(2, 4))
        after = snapshot(opt, model)
        assert masters_differ(after, at_save)
        gate.open()
        manifest = handle.wait(timeout=60)
    assert handle.done() and not handle.failed()
    assert handle.wait() is manifest  # a second wait returns the same result
    barrier()
    assert manifest.to_json().encode() == Path(f"{d}/blocking/manifest.json").read_bytes()
    assert manifest.extra["user"] == {"epoch": 1, "nested": {"seen": [1]}}
    assert_same_files(f"{d}/blocking", f"{d}/async")
    assert_same_snapshot(loaded_snapshot(f"{d}/async"), at_save)

    # What the writer was given: the staging buffers, not the live partitions.
    staging = async_saving._STAGING[opt]
    staged = {k.split("/", 1)[1]: (id(t), t.data_ptr()) for k, t in staging.items() if k.startswith("opt/")}
    assert gate.calls == [staged]
    live_master = opt.master_partition(0)
    assert staging["opt/g0.master"].data_ptr() != live_master.data_ptr()
    if rank == 0:
        assert any(k.startswith("model/") for k in staging)  # buffers and the frozen param
    first_buffers = dict(staging)

    # Two consecutive async saves to different directories: the second waits for the first
    # (held at the gate until a timer opens it), reuses the same buffers, and neither
    # overwrites the other's state.
    at_second = after
    with Gate() as gate:
        h2 = zero_ckpt.async_save(f"{d}/second", optimizer=opt, model=model)
        train(model, opt, rank, ws, range(4, 5))
        at_third = snapshot(opt, model)
        assert masters_differ(at_third, at_second)
        gate.open(after=0.3)
        h3 = zero_ckpt.async_save(f"{d}/third", optimizer=opt, model=model)
        assert h2.done() and not h2.failed()  # the third save waited for the second
        train(model, opt, rank, ws, range(5, 6))
        h3.wait(timeout=60)
        h2.wait()
    assert len(gate.calls) == 2 and gate.calls[0] == gate.calls[1] == staged
    assert async_saving._STAGING[opt] is staging
    assert staging.keys() == first_buffers.keys()
    assert all(staging[k] is first_buffers[k] for k in staging)
    barrier()
    assert_same_snapshot(loaded_snapshot(f"{d}/second"), at_second)
    assert_same_snapshot(loaded_snapshot(f"{d}/third"), at_third)
    if rank == 0:
        verified(f"{d}/second")
        verified(f"{d}/third")
    barrier()


def async_failures(rank: int, ws: int, root: str) -> None:
    """A failed background save raises on ``wait()`` on every rank; unseen, it stops the next
    ``step()`` or the next save on every rank; once seen, it stops nothing more."""
    d = fresh_dir(root, "failures", rank)
    model, opt = make(CFG)
    train(model, opt, rank, ws, range(1))
    step = iter(range(1, 100))
    if rank == 0:
        # a user's file is fine next to a checkpoint; an earlier zero-ckpt manifest is not
        # replaced without overwrite=True
        os.makedirs(f"{d}/taken")
        Path(f"{d}/taken/keep.txt").write_text("not a checkpoint")
        Path(f"{d}/taken/manifest.json").write_text("{}")
    barrier()

    # 1. Destination refused (not empty, no overwrite): wait() raises everywhere.
    h = zero_ckpt.async_save(f"{d}/taken", optimizer=opt, model=model)
    expect_raise(DestinationExistsError, lambda: h.wait(timeout=60), "taken")
    assert h.done() and h.failed()
    barrier()
    assert sorted(os.listdir(f"{d}/taken")) == ["keep.txt", "manifest.json"]
    # The error was reported by wait(): training and the next save go on.
    train(model, opt, rank, ws, range(next(step), next(step)))
    zero_ckpt.async_save(f"{d}/retry", optimizer=opt, model=model).wait(timeout=60)

    # 2. Refused again, not waited for: the next step raises on every rank, before any
    #    collective, then training can go on (the error was reported).
    h = zero_ckpt.async_save(f"{d}/taken", optimizer=opt, model=model)
    h._thread.join(60)
    assert h.failed()
    before = snapshot(opt, model)
    expect_raise(CheckpointError, lambda: train(model, opt, rank, ws, range(next(step), next(step))),
                 "background save", "taken")
    now = snapshot(opt, model)  # the step did not happen (the forward counted a call)
    before["model"]["calls"] += 1
    assert_same_snapshot(now, before)
    train(model, opt, rank, ws, range(next(step), next(step)))
    expect_raise(DestinationExistsError, h.wait)  # wait() still tells

    # 3. A write failure (OSError) on the last rank only: wait() raises on every rank.
    bad = ws - 1
    with Gate(closed=False, fail=OSError("disk on fire") if rank == bad else None):
        h = zero_ckpt.async_save(f"{d}/broken", optimizer=opt, model=model)
        if rank == bad:
            expect_raise(OSError, lambda: h.wait(timeout=60), "disk on fire")
        else:
            expect_raise(CheckpointError, lambda: h.wait(timeout=60), f"rank {bad}", "OSError", "disk on fire")
        # 4. The same, unseen: the next save raises it on every rank and writes nothing.
        h = zero_ckpt.async_save(f"{d}/broken2", optimizer=opt, model=model)
        h._thread.join(60)
        assert h.failed()
        expect_raise(CheckpointError, lambda: zero_ckpt.save(f"{d}/after", optimizer=opt, model=model),
                     "background save", "broken2", "disk on fire")
        assert not Path(f"{d}/after").exists()
        # 5. The same, unseen: the next step raises on every rank.
        h = zero_ckpt.async_save(f"{d}/broken3", optimizer=opt, model=model)
        h._thread.join(60)
        assert h.failed()
        expect_raise(CheckpointError, lambda: train(model, opt, rank, ws, range(next(step), next(step))),
                     "background save", "broken3", "disk on fire")
    barrier()
    for name in ("broken", "broken2", "broken3"):
        assert not Path(f"{d}/{name}/manifest.json").exists(), name
    # Everything reported: training and saving go on, and the save is sound.
    train(model, opt, rank, ws, range(next(step), next(step)))
    want = snapshot(opt, model)
    zero_ckpt.async_save(f"{d}/after", optimizer=opt, model=model).wait(timeout=60)
    barrier()
    assert_same_snapshot(loaded_snapshot(f"{d}/after"), want)
    barrier()


def latest_and_retention(rank: int, ws: int, root: str) -> None:
    """Four saves (blocking and async mixed) with latest=True, keep_last=2 into a run
    directory: latest names the newest, two checkpoints remain, load(run) loads the newest;
    a run directory without latest is refused on every rank."""
    run = fresh_dir(root, "run", rank)
    model, opt = make(CFG)
    wants = {}
    handle = None
    for i in range(1, 5):
        train(model, opt, rank, ws, range(i - 1, i))
        wants[i] = snapshot(opt, model)
        save = zero_ckpt.async_save if i % 2 == 0 else zero_ckpt.save
        out = save(f"{run}/step-{i}", optimizer=opt, model=model, latest=True, keep_last=2)
        if i % 2:
            assert read_latest(run) == f"step-{i}"  # blocking: published on return
        else:
            handle = out
    assert handle is not None
    handle.wait(timeout=60)
    barrier()
    assert read_latest(run) == "step-4"
    assert Path(f"{run}/latest").read_text() == "step-4\n"
    assert sorted(os.listdir(run)) == ["latest", "step-3", "step-4"]
    infos = list_checkpoints(run)
    assert [(c.name, c.complete, c.is_latest) for c in infos] == [("step-3", True, False), ("step-4", True, True)]
    assert_same_snapshot(loaded_snapshot(run), wants[4])
    assert_same_snapshot(loaded_snapshot(f"{run}/step-3"), wants[3])

    # Without latest, a run directory is refused on every rank, and nothing changes.
    barrier()
    if rank == 0:
        os.remove(f"{run}/latest")
    barrier()
    model2, opt2 = make(CFG)
    before = snapshot(opt2, model2)
    expect_raise(RunDirectoryError, lambda: zero_ckpt.load(run, optimizer=opt2, model=model2),
                 "without a latest file", "step-4")
    assert_same_snapshot(snapshot(opt2, model2), before)
    barrier()


def load_waits(rank: int, ws: int, root: str) -> None:
    """load() of an optimizer with a save in flight waits for it (here: loads what it saves)."""
    d = fresh_dir(root, "loadwait", rank)
    model, opt = make(CFG)
    train(model, opt, rank, ws, range(2))
    want = snapshot(opt, model)
    with Gate() as gate:
        h = zero_ckpt.async_save(f"{d}/pending", optimizer=opt, model=model)
        train(model, opt, rank, ws, range(2, 3))
        assert masters_differ(snapshot(opt, model), want)
        gate.open(after=0.3)
        zero_ckpt.load(f"{d}/pending", optimizer=opt, model=model)
        assert h.done() and not h.failed()
    assert_same_snapshot(snapshot(opt, model), want)
    # A failed save not yet seen: load raises it (it is not swallowed) and changes nothing.
    if rank == 0:
        os.makedirs(f"{d}/taken")
        Path(f"{d}/taken/manifest.json").write_text("{}")
    barrier()
    h = zero_ckpt.async_save(f"{d}/taken", optimizer=opt, model=model)
    h._thread.join(60)
    expect_raise(CheckpointError, lambda: zero_ckpt.load(f"{d}/pending", optimizer=opt, model=model),
                 "background save", "taken")
    zero_ckpt.load(f"{d}/pending", optimizer=opt, model=model)  # reported: now it loads
    assert_same_snapshot(snapshot(opt, model), want)
    barrier()


SCENARIOS = [
    ("basics", async_matches_blocking),
    ("failures", async_failures),
    ("latest", latest_and_retention),
    ("load waits", load_waits),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, dict[int, str | None]]]:
    out: dict[int, dict[str, dict[int, str | None]]] = {}
    # World size 1: in this process, without a process group.
    assert not (dist.is_available() and dist.is_initialized())
    root1 = str(tmp_path_factory.mktemp("async1"))
    out[1] = {}
    for name, fn in SCENARIOS:
        try:
            fn(0, 1, root1)
            out[1][name] = {0: None}
        except (Exception, pytest.fail.Exception):  # noqa: BLE001 - reported by its test
            out[1][name] = {0: traceback.format_exc()}
    root2 = str(tmp_path_factory.mktemp("async2"))
    out[2] = run_scenarios([(name, fn, (root2,)) for name, fn in SCENARIOS], 2, timeout_s=150)
    return out


@pytest.mark.parametrize("ws", [1, 2])
def test_async_save_matches_blocking_and_reuses_staging(outcomes, ws) -> None:
    check(outcomes[ws], "basics", ws)


@pytest.mark.parametrize("ws", [1, 2])
def test_failed_async_save_raises_on_every_rank(outcomes, ws) -> None:
    check(outcomes[ws], "failures", ws)


@pytest.mark.parametrize("ws", [1, 2])
def test_latest_pointer_and_retention(outcomes, ws) -> None:
    check(outcomes[ws], "latest", ws)


@pytest.mark.parametrize("ws", [1, 2])
def test_load_waits_for_pending_save(outcomes, ws) -> None:
    check(outcomes[ws], "load waits", ws)
