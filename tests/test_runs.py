"""Run directories (``zero_ckpt.runs``): the ``latest`` pointer, listing, retention, ``zero-ckpt
list``. Every I/O test runs on a local tmp dir and on S3 (moto on 127.0.0.1 through s3fs).

Checkpoints are tiny (world size 2, one group of 7 elements) so a test writes several.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from zero_ckpt.errors import IncompleteCheckpointError, StorageError
from zero_ckpt.manifest import MANIFEST_NAME
from zero_ckpt.runs import (
    LATEST_NAME,
    CheckpointInfo,
    RunDirectoryError,
    apply_retention,
    list_checkpoints,
    plan_retention,
    read_latest,
    resolve_checkpoint,
    scan_run,
    update_latest,
)
from zero_ckpt.storage import Location, open_location
from zero_ckpt.writer import write_checkpoint

SHARD0 = "shards/rank-00000-of-00002.safetensors"


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path):
    """``(run directory URL, storage_options)`` on local disk or in a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "run"), {}
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/run", options


def _groups(seed: int) -> list[dict[str, dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "w": {"master": torch.randn(2, 2, generator=gen), "exp_avg": torch.randn(2, 2, generator=gen)},
            "b": {"master": torch.randn(3, generator=gen), "exp_avg": torch.randn(3, generator=gen)},
        }
    ]


def _save(run, name: str, step: int | None, world_size: int = 2, model: bool = False):
    root, so = run
    return write_checkpoint(
        f"{root}/{name}",
        _groups(step or 0),
        world_size=world_size,
        scalars=[{"step": step}] if step is not None else None,
        model_state={"buf": torch.arange(4.0)} if model else None,
        storage_options=so,
    )


def _incomplete(run, name: str) -> None:
    """A save that never wrote its manifest: shards present, manifest.json absent."""
    _save(run, name, None)
    _loc(run, name).remove(MANIFEST_NAME)


def _loc(run, rel: str = "") -> Location:
    root, so = run
    return open_location(f"{root}/{rel}" if rel else root, so)


def _names(run) -> list[str]:
    return [c.name for c in list_checkpoints(*run)]


# ----- the latest pointer ----------------------------------------------------------------------


def test_latest_lifecycle(run):
    root, so = run
    _save(run, "step-1", 1)
    assert read_latest(root, so) is None
    update_latest(root, "step-1", so)
    assert read_latest(root, so) == "step-1"
    assert _loc(run).read_bytes(LATEST_NAME) == b"step-1\n"
    assert resolve_checkpoint(root, so) == f"{root}/step-1"

    _save(run, "step-2", 2)
    assert read_latest(root, so) == "step-1"  # saving does not move the pointer
    update_latest(root, "step-2", so)
    assert read_latest(root, so) == "step-2"
    assert resolve_checkpoint(root, so) == f"{root}/step-2"
    # a checkpoint URL resolves to itself, whatever latest says
    assert resolve_checkpoint(f"{root}/step-1", so) == f"{root}/step-1"
    assert resolve_checkpoint(f"{root}/step-1/", so) == f"{root}/step-1"


def test_update_latest_refuses_incomplete_or_missing(run):
    root, so = run
    _save(run, "step-1", 1)
    update_latest(root, "step-1", so)
    _incomplete(run, "step-2")
    with pytest.raises(IncompleteCheckpointError, match="incomplete") as info:
        update_latest(root, "step-2", so)
    assert f"{root}/step-2" in str(info.value)
    with pytest.raises(IncompleteCheckpointError, match="does not exist"):
        update_latest(root, "step-3", so)
    assert read_latest(root, so) == "step-1"  # untouched by the refusals

    _save(run, "step-4", 4)
    _loc(run, "step-4").write_atomic(MANIFEST_NAME, b"{broken")
    with pytest.raises(ValueError, match="step-4/manifest.json"):
        update_latest(root, "step-4", so)
    assert read_latest(root, so) == "step-1"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../step-1", "latest", " step-1", "x\ny"])
def test_update_latest_refuses_bad_names(tmp_path, name):
    with pytest.raises(RunDirectoryError, match="not a checkpoint name"):
        update_latest(str(tmp_path), name)


def test_resolve_checkpoint_errors(run):
    root, so = run
    loc = _loc(run)
    # nothing there at all: the URL comes back as is, for load's own "not found" error
    assert resolve_checkpoint(root, so) == root

    _save(run, "step-1", 1)
    _save(run, "step-2", 2)
    with pytest.raises(RunDirectoryError, match=r"without a latest file.*step-2"):
        resolve_checkpoint(root, so)

    loc.write_atomic(LATEST_NAME, b"step-9\n")  # edited by hand
    with pytest.raises(IncompleteCheckpointError, match=r"names 'step-9'.*step-9 is missing"):
        resolve_checkpoint(root, so)

    _incomplete(run, "step-3")
    loc.write_atomic(LATEST_NAME, b"step-3\n")
    with pytest.raises(IncompleteCheckpointError, match=r"step-3 has no manifest.json \(incomplete\)"):
        resolve_checkpoint(root, so)

    loc.write_atomic(LATEST_NAME, b"step-1\nstep-2\n")
    with pytest.raises(RunDirectoryError, match="must hold one line"):
        resolve_checkpoint(root, so)
    with pytest.raises(RunDirectoryError, match="damaged"):
        read_latest(root, so)


# ----- listing ---------------------------------------------------------------------------------


def test_list_complete_incomplete_and_corrupt(run):
    root, so = run
    m100 = _save(run, "step-100", 100)
    m300 = _save(run, "step-300", 300, world_size=3, model=True)
    _incomplete(run, "step-200")
    _save(run, "step-250", 250)
    _loc(run, "step-250").write_atomic(MANIFEST_NAME, b'{"format": "zero-ckpt", "version": 1')
    _save(run, "step-260", 260)
    _loc(run, "step-260").remove(SHARD0)  # complete-looking manifest, shard gone
    _loc(run, "notes").write_atomic("todo.txt", b"not a checkpoint")
    _loc(run).write_atomic("README", b"top-level files are not checkpoints")
    update_latest(root, "step-300", so)

    infos = {c.name: c for c in list_checkpoints(root, so)}
    assert list(infos) == ["step-100", "step-200", "step-250", "step-260", "step-300"]
    c100, c200, c250, c260, c300 = infos.values()
    assert (c100.status, c100.step, c100.world_size, c100.is_latest) == ("complete", 100, 2, False)
    assert c100.bytes == m100.shard_bytes and c100.url == f"{root}/step-100"
    assert (c300.complete, c300.step, c300.world_size, c300.is_latest) == (True, 300, 3, True)
    assert c300.bytes == m300.shard_bytes + m300.model_file.bytes
    assert c300.files == 5 and c300.problem is None

    assert (c200.complete, c200.status, c200.step, c200.world_size) == (False, "incomplete", None, None)
    assert "manifest.json" in c200.problem
    loc200 = _loc(run, "step-200")
    assert c200.bytes == sum(loc200.size(f) for f in loc200.list_files()) > 0

    assert (c250.complete, c250.status, c250.step) == (False, "invalid", None)
    assert f"{root}/step-250/manifest.json" in c250.problem and "not valid JSON" in c250.problem
    assert (c260.complete, c260.status) == (False, "invalid")
    assert f"{root}/step-260/{SHARD0} listed in the manifest is missing" in c260.problem

    listing = scan_run(root, so)
    assert listing.latest == "step-300" and listing.problems == ()
    assert [c.name for c in listing.checkpoints] == list(infos)


def test_list_order_without_steps_and_empty_roots(run):
    root, so = run
    assert list_checkpoints(root, so) == []  # absent
    _save(run, "b-10", None)
    _save(run, "a-9", None)
    _save(run, "final", None)
    _save(run, "step-2", 20)  # the manifest's step wins over the name's number
    _incomplete(run, "step-15")
    assert _names(run) == ["a-9", "b-10", "step-15", "step-2", "final"]
    with pytest.raises(RunDirectoryError, match="is a checkpoint, not a run directory"):
        list_checkpoints(f"{root}/step-2", so)


def test_list_reports_latest_problems(run):
    root, so = run
    _save(run, "step-1", 1)
    _incomplete(run, "step-2")
    loc = _loc(run)
    loc.write_atomic(LATEST_NAME, b"step-2\n")
    listing = scan_run(root, so)
    assert listing.latest == "step-2" and [c.is_latest for c in listing.checkpoints] == [False, True]
    assert len(listing.problems) == 1 and "is not complete" in listing.problems[0]
    loc.write_atomic(LATEST_NAME, b"\xff\xfe")
    listing = scan_run(root, so)
    assert listing.latest is None and "damaged" in listing.problems[0]


def test_list_is_one_listing_plus_manifest_reads(run, monkeypatch):
    """Efficient on object stores: one recursive listing of the root, one read per manifest
    (and one of latest), sizes only for checkpoints without a valid manifest."""
    root, so = run
    for step in (1, 2, 3):
        _save(run, f"step-{step}", step)
    _incomplete(run, "step-4")
    update_latest(root, "step-3", so)
    calls: list[tuple[str, str]] = []
    for method in ("list_files", "read_bytes", "size", "exists", "read_range"):
        original = getattr(Location, method)

        def spy(self, *args, _name=method, _original=original, **kwargs):
            calls.append((_name, self.url_of(args[0]) if args else self.url))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Location, method, spy)
    list_checkpoints(root, so)
    kinds = sorted(name for name, _ in calls)
    assert kinds.count("list_files") == 1 and ("list_files", root) in calls
    assert sorted(url for name, url in calls if name == "read_bytes") == sorted(
        [f"{root}/{LATEST_NAME}"] + [f"{root}/step-{s}/{MANIFEST_NAME}" for s in (1, 2, 3)]
    )
    assert {url.split("/")[-3] for name, url in calls if name == "size"} <= {"step-4"}
    assert "exists" not in kinds and "read_range" not in kinds


# ----- retention -------------------------------------------------------------------------------


def test_retention_keeps_newest_and_latest(run):
    root, so = run
    for step in (1, 2, 4, 5):
        _save(run, f"step-{step}", step)
    _incomplete(run, "step-3")  # older than the newest complete one: a dead save
    _incomplete(run, "step-6")  # newer: may be a save in progress
    _incomplete(run, "scratch")  # cannot be placed: kept
    _save(run, "step-0", 0)
    _loc(run, "step-0").remove(MANIFEST_NAME)
    _loc(run, "step-0").write_atomic("NOTES.txt", b"mine")  # holds a file no save writes
    update_latest(root, "step-2", so)

    assert apply_retention(root, 2, so, dry_run=True) == ["step-1", "step-3"]
    assert _names(run) == ["step-0", "step-1", "step-2", "step-3", "step-4", "step-5", "step-6", "scratch"]
    assert apply_retention(root, 2, so) == ["step-1", "step-3"]
    assert _names(run) == ["step-0", "step-2", "step-4", "step-5", "step-6", "scratch"]
    assert not _loc(run, "step-1").list_files() and not _loc(run, "step-3").list_files()
    assert read_latest(root, so) == "step-2"
    assert apply_retention(root, 2, so) == []  # idempotent

    update_latest(root, "step-5", so)
    assert apply_retention(root, 1, so) == ["step-2", "step-4"]
    infos = list_checkpoints(root, so)
    assert [(c.name, c.status) for c in infos if c.complete] == [("step-5", "complete")]
    assert resolve_checkpoint(root, so) == f"{root}/step-5"


def test_retention_deletes_manifest_first(run, monkeypatch):
    """A delete that fails midway (after the manifest went) leaves an incomplete checkpoint,
    never one that lists as complete with shards missing; the next run finishes the job."""
    root, so = run
    for step in (1, 2, 3):
        _save(run, f"step-{step}", step)
    update_latest(root, "step-3", so)
    order: list[str] = []
    remove, remove_all = Location.remove, Location.remove_all

    def spy_remove(self, rel):
        order.append(f"remove {self.url_of(rel)}")
        return remove(self, rel)

    def failing_remove_all(self):
        order.append(f"remove_all {self.url}")
        raise StorageError(f"cannot delete {self.url}: injected failure", path=self.url)

    monkeypatch.setattr(Location, "remove", spy_remove)
    monkeypatch.setattr(Location, "remove_all", failing_remove_all)
    with pytest.raises(StorageError, match="injected failure"):
        apply_retention(root, 1, so)
    assert order == [f"remove {root}/step-1/{MANIFEST_NAME}", f"remove_all {root}/step-1"]
    infos = {c.name: c for c in list_checkpoints(root, so)}
    assert infos["step-1"].status == "incomplete" and infos["step-1"].files > 0
    assert infos["step-2"].complete and infos["step-3"].complete

    monkeypatch.setattr(Location, "remove_all", remove_all)
    assert apply_retention(root, 1, so) == ["step-1", "step-2"]
    assert _names(run) == ["step-3"]


@pytest.mark.parametrize("keep_last", [0, -1, True, 1.5, "2"])
def test_retention_rejects_bad_keep_last(tmp_path, keep_last):
    with pytest.raises(RunDirectoryError, match="keep_last"):
        apply_retention(str(tmp_path), keep_last)


def test_retention_refuses_damaged_latest(tmp_path):
    run = (str(tmp_path), {})
    for step in (1, 2, 3):
        _save(run, f"step-{step}", step)
    _loc(run).write_atomic(LATEST_NAME, b"")
    with pytest.raises(RunDirectoryError, match="must hold one line"):
        apply_retention(run[0], 1)
    assert _names(run) == ["step-1", "step-2", "step-3"]


def _info(name: str, status: str = "complete", step: int | None = None) -> CheckpointInfo:
    return CheckpointInfo(name, f"r/{name}", status, step, 2 if status == "complete" else None, 0, 1)


def test_plan_retention_rules():
    infos = [
        _info("step-10", step=10),
        _info("step-20", "incomplete"),
        _info("step-30", step=30),
        _info("step-35", "invalid"),  # e.g. a manifest from a newer zero-ckpt: never deleted
        _info("step-40", step=40),
        _info("step-50", "incomplete"),
        _info("odd", "incomplete"),
    ]
    assert plan_retention(infos, 1) == ["step-10", "step-20", "step-30"]
    assert plan_retention(infos[::-1], 1) == ["step-10", "step-20", "step-30"]  # any input order
    assert plan_retention(infos, 1, latest="step-10") == ["step-20", "step-30"]
    assert plan_retention(infos, 1, keep=["step-20"]) == ["step-10", "step-30"]
    assert plan_retention(infos, 2) == ["step-10", "step-20"]
    assert plan_retention(infos, 3) == ["step-20"]
    assert plan_retention(infos, 10) == ["step-20"]
    # no complete checkpoint: nothing is older than "the newest complete one"
    assert plan_retention([_info("step-1", "incomplete"), _info("step-2", "invalid")], 1) == []
    # a manifest step orders before the name's number
    assert plan_retention([_info("z-1", step=5), _info("a-9", step=7)], 1) == ["z-1"]


# ----- CLI -------------------------------------------------------------------------------------


def _cli(run, *args: str):
    root, so = run
    options = [arg for key, value in so.items() for arg in ("-o", f"{key}={value}")]
    result = CliRunner().invoke(cli, ["list", *args, *options], env={"ZERO_CKPT_DEBUG": ""})
    assert "Traceback" not in result.output
    return result


def test_cli_list_table_and_json(run):
    root, so = run
    m1 = _save(run, "step-1", 1)
    _save(run, "step-2", 2, world_size=3)
    _incomplete(run, "step-3")
    update_latest(root, "step-2", so)

    result = _cli(run, root)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STEP", "WORLD", "SIZE", "STATUS"]
    assert lines[1].split()[:4] == ["step-1", "1", "2", str(m1.shard_bytes)]
    assert lines[1].split()[-1] == "complete"
    assert lines[2].split()[0] == "*" and lines[2].split()[1:4] == ["step-2", "2", "3"]
    assert lines[3].split()[:3] == ["step-3", "-", "-"] and lines[3].endswith("INCOMPLETE")
    assert lines[4] == "3 checkpoints, 2 complete; * = latest (step-2)"
    assert result.stderr == ""

    result = _cli(run, root, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["root"] == root and doc["latest"] == "step-2" and doc["problems"] == []
    assert [(c["name"], c["complete"], c["step"], c["is_latest"]) for c in doc["checkpoints"]] == [
        ("step-1", True, 1, False),
        ("step-2", True, 2, True),
        ("step-3", False, None, False),
    ]
    assert doc["checkpoints"][0]["bytes"] == m1.shard_bytes


def test_cli_list_errors_and_warnings(run):
    root, so = run
    result = _cli(run, root)  # a path that does not exist is an error, not an empty listing
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: no run directory at {root}: the path does not exist")
    _loc(run).write_atomic("README", b"not a checkpoint")
    result = _cli(run, root)
    assert result.exit_code == 0 and result.stdout.strip() == f"no checkpoints in {root}"
    _loc(run).remove("README")

    _save(run, "step-1", 1)
    _loc(run).write_atomic(LATEST_NAME, b"step-7\n")
    result = _cli(run, root)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: ") and "names 'step-7', which is missing" in result.stderr

    result = _cli(run, f"{root}/step-1")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {root}/step-1 is a checkpoint, not a run directory of checkpoints; list its "
        "parent directory, or use `zero-ckpt inspect` on it"
    ]
    assert CliRunner().invoke(cli, ["list"]).exit_code == 2  # usage error
