"""Split reshard/consolidate jobs (``reshard_part``/``consolidate_part``, ``--part I/N``,
torchrun env): the pure assignment, byte-identical results in any part order, the commit
protocol, destination rules, corruption split across parts, and a real two-process run with
torchrun's variables."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zero_ckpt  # noqa: E402
from cli.main import cli  # noqa: E402
from helpers_ckpt import dir_bytes, flip_byte, fs_bytes, memory_rm, write_standard  # noqa: E402
from zero_ckpt.checksum import crc32c  # noqa: E402
from zero_ckpt.errors import (  # noqa: E402
    CorruptShardError,
    DestinationExistsError,
    IncompleteCheckpointError,
)
from zero_ckpt.parts import (  # noqa: E402
    PARTS_DIR,
    PartResult,
    PartSpec,
    _cost,
    assign_parts,
    compact_pieces,
    parse_part,
    SplitJobError,
    part_from_env,
    resolve_part,
)
from zero_ckpt.formats.registry import open_view  # noqa: E402
from zero_ckpt.plan import plan_consolidate, plan_reshard  # noqa: E402
from zero_ckpt.storage import open_location  # noqa: E402
from zero_ckpt.transfer import load_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC_WS, DST_WS = 3, 5
CONSOLIDATE_OPTS = {"max_shard_size": 200, "include_optimizer": True}


@pytest.fixture(scope="module", autouse=True)
def _no_fsync():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZERO_CKPT_FSYNC", "0")
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("parts") / "src")
    write_standard(path, SRC_WS)
    return path


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Unsplit outputs, file by file."""
    base = tmp_path_factory.mktemp("ref")
    zero_ckpt.reshard(src, str(base / "r"), world_size=DST_WS)
    zero_ckpt.consolidate(src, str(base / "c"), **CONSOLIDATE_OPTS)
    return {"reshard": dir_bytes(base / "r"), "consolidate": dir_bytes(base / "c")}


def run(kind: str, src: str, dst: str, part, **kw):
    if kind == "reshard":
        return zero_ckpt.reshard_part(src, dst, world_size=DST_WS, part=part, **kw)
    return zero_ckpt.consolidate_part(src, dst, part=part, **CONSOLIDATE_OPTS, **kw)


def read_out(dst: str) -> dict[str, bytes]:
    return fs_bytes(dst) if dst.startswith("memory://") else dir_bytes(dst)


# ----- pure: assignment, pieces, part specs -----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**9), max_size=40), st.integers(1, 9))
def test_assign_parts_covers_each_item_once_and_balances(costs, n):
    parts = assign_parts(costs, n)
    assert len(parts) == n
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(costs)))  # every item in exactly one part
    assert all(list(p) == sorted(p) for p in parts)
    assert assign_parts(list(costs), n) == parts  # deterministic
    loads = [sum(costs[i] for i in p) for p in parts]
    if costs:
        assert max(loads) - min(loads) <= max(costs)  # greedy bound
        assert max(loads) <= sum(costs) / n + max(costs)


def test_assign_parts_examples():
    assert assign_parts([5, 5, 5, 5], 2) == ((0, 2), (1, 3))
    assert assign_parts([1, 9, 3], 2) == ((1,), (0, 2))
    assert assign_parts([], 3) == ((), (), ())
    assert assign_parts([7], 3) == ((0,), (), ())
    with pytest.raises(ValueError):
        assign_parts([1], 0)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.lists(st.integers(1, 299), max_size=8), st.randoms())
def test_compact_pieces_combines_to_the_same_crc(data, cuts, rnd):
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    pieces = [(a, b - a, crc32c(data[a:b])) for a, b in zip(bounds, bounds[1:])]
    rnd.shuffle(pieces)
    assert compact_pieces(pieces) == [(0, len(data), crc32c(data))]
    if len(pieces) > 2:  # a gap keeps two runs
        kept = sorted(pieces)[:1] + sorted(pieces)[2:]
        assert len(compact_pieces(kept)) == 2


def test_part_specs():
    assert parse_part("1/4") == PartSpec(1, 4)
    for bad in ("4/4", "-1/2", "x", "1", "1/0", "a/b"):
        with pytest.raises(ValueError, match="I/N"):
            parse_part(bad)
    assert part_from_env({}) is None
    assert part_from_env({"RANK": "2", "WORLD_SIZE": "3"}) == PartSpec(2, 3, from_env=True)
    with pytest.raises(ValueError, match="RANK"):
        part_from_env({"RANK": "3", "WORLD_SIZE": "3"})
    assert resolve_part(None) is None
    assert resolve_part("auto", {}) is None
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert resolve_part("auto", env) == PartSpec(0, 2, True)
    assert resolve_part("distributed", env) == PartSpec(0, 2, True)
    with pytest.raises(SplitJobError, match="MASTER_ADDR, MASTER_PORT are not set"):
        resolve_part("auto", {"RANK": "0", "WORLD_SIZE": "2"})  # never half a job without a group
    with pytest.raises(SplitJobError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        resolve_part("distributed", {})
    assert resolve_part((1, 2)) == PartSpec(1, 2)
    with pytest.raises(ValueError):
        resolve_part((2, 2))


# ----- split jobs equal unsplit ones ------------------------------------------------------------


def test_one_return_type_per_function(src, tmp_path):
    """reshard/consolidate run the whole job (no ``part``); the ``*_part`` functions run parts."""
    from typing import get_type_hints

    from zero_ckpt.manifest import Manifest

    hints = {
        fn.__name__: get_type_hints(fn)["return"]
        for fn in (zero_ckpt.reshard, zero_ckpt.consolidate, zero_ckpt.reshard_part, zero_ckpt.consolidate_part)
    }
    assert hints == {
        "reshard": Manifest, "consolidate": zero_ckpt.ConsolidateResult,
        "reshard_part": PartResult, "consolidate_part": PartResult,
    }
    with pytest.raises(TypeError, match="part"):
        zero_ckpt.reshard(src, str(tmp_path / "r"), world_size=DST_WS, part=(0, 1))
    with pytest.raises(TypeError, match="part"):
        zero_ckpt.consolidate(src, str(tmp_path / "c"), part=(0, 1))
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()
    with pytest.raises(TypeError, match="part"):
        zero_ckpt.reshard_part(src, str(tmp_path / "r"), world_size=DST_WS)  # part is required


@pytest.mark.parametrize("kind", ["reshard", "consolidate"])
def test_auto_outside_torchrun_runs_the_whole_job_as_part_0_of_1(kind, src, reference, tmp_path):
    dst = str(tmp_path / "out")
    result = run(kind, src, dst, "auto")
    assert isinstance(result, PartResult)
    assert (result.part, result.parts, result.committed, result.committed_by) == (0, 1, True, 0)
    assert result.waiting_for == () and sorted(result.outputs) == sorted(reference[kind])
    if kind == "reshard":
        assert result.manifest is not None and result.manifest.world_size == DST_WS
    assert dir_bytes(dst) == reference[kind]
    assert not (Path(dst) / PARTS_DIR).exists()


@pytest.mark.parametrize("backend", ["local", "memory"])
@pytest.mark.parametrize("kind", ["reshard", "consolidate"])
def test_parts_in_any_order_equal_unsplit(kind, backend, src, reference, tmp_path):
    rnd = random.Random(f"{kind}{backend}")
    for n in range(1, 6):
        for order_name, order in (("sequence", list(range(n))), ("shuffled", rnd.sample(range(n), n))):
            dst = (
                str(tmp_path / f"{n}-{order_name}") if backend == "local"
                else f"memory://parts-{uuid.uuid4().hex}/{n}-{order_name}"
            )
            assigned: list[str] = []
            for step, k in enumerate(order):
                result = run(kind, src, dst, (k, n))
                assert isinstance(result, PartResult)
                assert (result.part, result.parts) == (k, n)
                assigned += result.files
                last = step == n - 1
                assert result.committed == last
                if not last:
                    assert result.waiting_for == tuple(sorted(order[step + 1:]))
                    out = read_out(dst)
                    assert "manifest.json" not in out
                    assert not any(name.endswith(".json") for name in out if not name.startswith(PARTS_DIR))
                    assert any(name.startswith(f"{PARTS_DIR}/{result.job}/") for name in out)
                    if kind == "reshard":
                        with open_location(dst) as loc, pytest.raises(IncompleteCheckpointError, match="incomplete"):
                            load_manifest(loc)
                else:
                    assert result.committed_by == k
                    assert sorted(result.outputs) == sorted(reference[kind])
                    if kind == "reshard":
                        assert result.manifest is not None and result.manifest.world_size == DST_WS
            assert sorted(assigned) == sorted(n for n in reference[kind] if not n.endswith(".json"))
            assert read_out(dst) == reference[kind], (n, order)
            if backend == "local":
                assert not (Path(dst) / PARTS_DIR).exists()
            else:
                memory_rm(dst)


def test_concurrent_parts_commit_once_or_twice_identically(src, reference, tmp_path):
    for attempt in range(3):
        dst = str(tmp_path / f"c{attempt}")
        results: list[PartResult] = []
        errors: list[BaseException] = []

        def one(k: int) -> None:
            try:
                results.append(run("reshard", src, dst, (k, 3), workers=1))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert any(r.committed for r in results)
        assert dir_bytes(dst) == reference["reshard"]


def test_resume_skips_a_finished_part(src, reference, tmp_path):
    dst = str(tmp_path / "out")
    first = run("reshard", src, dst, (0, 2))
    assert not first.resumed and not first.committed
    moved: list[int] = []
    again = run("reshard", src, dst, (0, 2), progress=lambda done, total: moved.append(done))
    assert again.resumed and again.files == first.files and max(moved, default=0) == 0
    last = run("reshard", src, dst, (1, 2))
    assert last.committed
    assert dir_bytes(dst) == reference["reshard"]


# ----- destination rules ------------------------------------------------------------------------


def test_a_part_of_another_job_is_refused(src, reference, tmp_path):
    dst = str(tmp_path / "out")
    run("reshard", src, dst, (0, 2))
    before = dir_bytes(dst)
    others = [
        lambda: zero_ckpt.reshard_part(src, dst, world_size=4, part=(1, 2)),  # other target
        lambda: run("reshard", src, dst, (1, 3)),  # other part count
        lambda: run("consolidate", src, dst, (1, 2)),  # other kind
    ]
    for other in others:
        with pytest.raises(DestinationExistsError, match=f"another job.*reshard {SRC_WS} -> {DST_WS}"):
            other()
        assert dir_bytes(dst) == before  # nothing of the first job touched
    # a foreign file inside the shards/ folder the job writes is refused; one outside is kept
    Path(dst, "shards", "notes.txt").write_text("mine")
    with pytest.raises(DestinationExistsError, match="shards/notes.txt is not a file zero-ckpt writes"):
        run("reshard", src, dst, (1, 2))
    Path(dst, "shards", "notes.txt").unlink()
    Path(dst, "notes.txt").write_text("mine")
    assert run("reshard", src, dst, (1, 2)).committed
    assert Path(dst, "notes.txt").read_text() == "mine"
    Path(dst, "notes.txt").unlink()
    assert dir_bytes(dst) == reference["reshard"]
    # a finished job's destination is not empty: a new part is refused
    with pytest.raises(DestinationExistsError, match="not empty"):
        run("reshard", src, dst, (0, 2))


def test_overwrite_discards_what_is_not_this_jobs_but_keeps_other_parts_work(src, reference, tmp_path):
    dst = str(tmp_path / "out")
    zero_ckpt.reshard(src, dst, world_size=2)  # a complete, different checkpoint
    Path(dst, "stray.bin").write_bytes(b"x")
    foreign = run("consolidate", src, str(tmp_path / "elsewhere"), (0, 2))  # records to move in
    os.rename(tmp_path / "elsewhere" / PARTS_DIR, Path(dst, PARTS_DIR))
    with pytest.raises(DestinationExistsError):
        run("reshard", src, dst, (1, 3))
    first = run("reshard", src, dst, (1, 3), overwrite=True)
    names = set(dir_bytes(dst))
    assert "manifest.json" not in names and "stray.bin" in names  # foreign files are kept
    assert not any(n.startswith(f"{PARTS_DIR}/{foreign.job}") for n in names)
    assert "shards/rank-00000-of-00002.safetensors" not in names
    assert set(first.files) <= names
    second = run("reshard", src, dst, (0, 3), overwrite=True)  # concurrent-safe: keeps part 1's
    assert set(first.files) <= set(dir_bytes(dst)) and not second.committed
    assert run("reshard", src, dst, (2, 3), overwrite=True).committed
    assert Path(dst, "stray.bin").read_bytes() == b"x"
    Path(dst, "stray.bin").unlink()
    assert dir_bytes(dst) == reference["reshard"]


# ----- corruption ---------------------------------------------------------------------------------


def _split_tensor(kind: str, src: str, n: int) -> tuple[str, int]:
    """A source file and byte offset inside a tensor whose reads fall in two or more parts."""
    with open_location(src) as s:
        view = open_view(s)
        if kind == "reshard":
            files = plan_reshard(view, DST_WS).files
        else:
            files = plan_consolidate(view, **CONSOLIDATE_OPTS).files
    parts = assign_parts([_cost(f) for f in files], n)
    owner = {files[i].path: k for k, items in enumerate(parts) for i in items}
    readers: dict[tuple[str, str], set[int]] = {}
    first_byte: dict[tuple[str, str], int] = {}
    for f in files:
        for op in f.ops:
            if op.src_tensor and op.check_source and op.numel:
                readers.setdefault((op.src_file, op.src_tensor), set()).add(owner[f.path])
                first_byte.setdefault((op.src_file, op.src_tensor), op.src_start)
    key = next(k for k in sorted(readers) if len(readers[k]) > 1)
    return key[0], first_byte[key]


@pytest.mark.parametrize("kind", ["reshard", "consolidate"])
def test_corruption_in_a_tensor_split_across_parts_is_caught_at_commit(kind, src, tmp_path):
    bad = tmp_path / "src"
    shutil.copytree(src, bad)
    rel, offset = _split_tensor(kind, str(bad), 2)
    flip_byte(bad / rel, offset)
    dst = str(tmp_path / "out")
    assert not run(kind, str(bad), dst, (0, 2)).committed  # alone, part 0 cannot tell
    with pytest.raises(CorruptShardError, match=rel.split("/")[-1]):
        run(kind, str(bad), dst, (1, 2))
    # nothing that looks complete, and no records to resume from after the source is repaired
    assert not any(n == "manifest.json" or n.endswith("index.json") or n.startswith(PARTS_DIR)
                   for n in dir_bytes(dst))


def test_corruption_in_a_tensor_one_part_reads_whole_stops_that_part(src, tmp_path):
    bad = tmp_path / "src"
    shutil.copytree(src, bad)
    rel = "model.safetensors"  # copied whole by exactly one part
    flip_byte(bad / rel, -1)
    dst = str(tmp_path / "out")
    results = []
    for k in range(2):
        try:
            results.append(run("reshard", str(bad), dst, (k, 2)))
        except CorruptShardError as exc:
            assert "model.safetensors" in str(exc)
            results.append(None)
    assert results.count(None) == 1
    assert "model.safetensors" not in dir_bytes(dst)  # the failing part removed its files
    assert "manifest.json" not in dir_bytes(dst)


# ----- torchrun ---------------------------------------------------------------------------------


def test_torchrun_env_alone_runs_the_whole_job(src, reference, tmp_path, monkeypatch):
    dst = str(tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    runner = CliRunner()
    r1 = runner.invoke(cli, ["reshard", src, dst, "--to", str(DST_WS), "-q"], catch_exceptions=False)
    assert r1.exit_code == 0, r1.output
    assert r1.stdout.startswith(f"resharded {src} -> {dst}: world size {DST_WS}")
    assert dir_bytes(dst) == reference["reshard"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_with_torchrun_env_commit_once(src, reference, tmp_path):
    dst = str(tmp_path / "out")
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               ZERO_CKPT_FSYNC="0", ZERO_CKPT_PART_TIMEOUT_S="60")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cli.main", "reshard", src, dst, "--to", str(DST_WS), "--json", "-q",
             "--workers", "2", "--distributed"],
            cwd=ROOT, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    docs = [json.loads(out) for out, _ in outs]
    assert [d["part"] for d in docs] == [0, 1]
    assert all(d["committed"] and d["committed_by"] == 0 and d["world_size"] == DST_WS for d in docs)
    assert sorted(docs[0]["files"] + docs[1]["files"]) == sorted(
        n for n in reference["reshard"] if n != "manifest.json"
    )
    assert dir_bytes(dst) == reference["reshard"]


# ----- CLI ----------------------------------------------------------------------------------------


def test_cli_part_option(src, reference, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "c")
    args = ["consolidate", src, out, "--max-shard-size", "200", "--include-optimizer", "-q"]
    r = runner.invoke(cli, [*args, "--part", "1/2", "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert "consolidated part 1/2" in r.stdout and "waiting for parts 0" in r.stdout
    r = runner.invoke(cli, [*args, "--part", "0/2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["committed"] and doc["committed_by"] == 0 and doc["files"]
    assert dir_bytes(out) == reference["consolidate"]
    for bad in ("2/2", "x"):
        r = runner.invoke(cli, ["reshard", src, str(tmp_path / "r"), "--to", "2", "--part", bad])
        assert r.exit_code == 2 and "I/N" in r.output
    r = runner.invoke(cli, ["reshard", src, str(tmp_path / "r"), "--to", str(DST_WS), "--part", "0/1"])
    assert r.exit_code == 0 and "this part committed" in r.stdout
    assert dir_bytes(tmp_path / "r") == reference["reshard"]
