"""Bad input and damaged checkpoints: the right error class, a message naming the file/value and
the fix, nothing complete-looking left at the destination, and the source never touched."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zero_ckpt  # noqa: E402
from helpers_ckpt import all_files, dir_bytes, flip_byte, write_standard  # noqa: E402
from zero_ckpt import (  # noqa: E402
    CheckpointError,
    CorruptShardError,
    DestinationExistsError,
    IncompleteCheckpointError,
    LayoutMismatchError,
    ManifestError,
    MissingShardError,
    StorageError,
)
from zero_ckpt.manifest import shard_path  # noqa: E402
from zero_ckpt.plan import shard_header  # noqa: E402
from zero_ckpt.storage import FileWriter  # noqa: E402

N = 4


@pytest.fixture(scope="module", autouse=True)
def _no_fsync():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZERO_CKPT_FSYNC", "0")
        yield


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pristine")
    manifest, _ = write_standard(root / "ckpt", N, 1)
    return root / "ckpt", manifest


@pytest.fixture
def src(tmp_path: Path, pristine) -> Path:
    """A fresh copy of a sound 4-rank checkpoint (shards, model file, manifest)."""
    dst = tmp_path / "src"
    shutil.copytree(pristine[0], dst)
    return dst


@pytest.fixture
def manifest(pristine):
    return pristine[1]


@contextmanager
def unchanged(path: Path):
    """The block may fail, but must not add, delete or modify any file under ``path``."""
    before = dir_bytes(path)
    yield
    after = dir_bytes(path)
    assert sorted(after) == sorted(before), "source files were added or deleted"
    assert [k for k in before if before[k] != after[k]] == [], "source files were modified"


def _shard(ckpt: Path, rank: int, n: int = N) -> Path:
    return ckpt / shard_path(rank, n)


def _url(ckpt: Path, rank: int, n: int = N) -> str:
    return f"{ckpt}/{shard_path(rank, n)}"


def _edit_manifest(ckpt: Path, fn) -> None:
    path = ckpt / "manifest.json"
    doc = json.loads(path.read_text())
    doc.pop("manifest_checksum")  # an intended edit: the manifest's own checksum goes with it
    fn(doc)
    path.write_text(json.dumps(doc))


def _flip_tensor_byte(ckpt: Path, manifest, rank: int, tensor: str, at: int = 1) -> None:
    entry = shard_header(manifest, rank)[1].tensors[tensor]
    assert entry.nbytes > at
    flip_byte(_shard(ckpt, rank), entry.start + at)


def _nothing_written(dst: Path) -> None:
    assert not (dst / "manifest.json").exists()
    assert all_files(dst) == [], f"left behind: {all_files(dst)}"


def _run_all(src: Path, out: Path):
    """reshard and consolidate (with optimizer) on ``src``, both expected to fail; errors by job."""
    errors = {}
    for job, call in (
        ("reshard", lambda: zero_ckpt.reshard(str(src), str(out / "r"), world_size=3)),
        ("consolidate", lambda: zero_ckpt.consolidate(str(src), str(out / "c"), include_optimizer=True)),
    ):
        with pytest.raises(CheckpointError) as info:
            call()
        errors[job] = info.value
    return errors


# ----- bad arguments -----------------------------------------------------------------------------


def test_wrong_expected_world_size(src: Path, tmp_path: Path) -> None:
    with unchanged(src), pytest.raises(LayoutMismatchError) as info:
        zero_ckpt.reshard(str(src), str(tmp_path / "dst"), world_size=3, expected_world_size=8)
    msg = str(info.value)
    assert str(src) in msg and "world size 4, not 8" in msg and "--from 4" in msg
    assert info.value.expected == 8 and info.value.actual == 4
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("ws", [0, -1])
def test_world_size_below_one(src: Path, tmp_path: Path, ws: int) -> None:
    with unchanged(src), pytest.raises(LayoutMismatchError, match=f"target world size must be at least 1, got {ws}"):
        zero_ckpt.reshard(str(src), str(tmp_path / "dst"), world_size=ws)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("job", ["reshard", "consolidate"])
def test_destination_exists_without_overwrite_then_with(src: Path, tmp_path: Path, job: str) -> None:
    # A user's file is never touched; zero-ckpt's own output needs --overwrite to be replaced.
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")

    def run(**kw):
        if job == "reshard":
            return zero_ckpt.reshard(str(src), str(dst), world_size=3, **kw)
        return zero_ckpt.consolidate(str(src), str(dst), **kw)

    with unchanged(src):
        run()
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    with unchanged(src), pytest.raises(DestinationExistsError) as info:
        run()
    msg = str(info.value)
    assert str(dst) in msg and "already exists" in msg and "overwrite" in msg
    assert isinstance(info.value, FileExistsError)
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    with unchanged(src):
        run(overwrite=True)
    assert (dst / "keep.txt").read_text() == "user data"
    if job == "reshard":
        assert zero_ckpt.verify(str(dst)).ok
    else:
        assert all_files(dst) == ["keep.txt", "model.safetensors"]


def test_empty_existing_destination_is_fine(src: Path, tmp_path: Path) -> None:
    (tmp_path / "dst").mkdir()
    zero_ckpt.reshard(str(src), str(tmp_path / "dst"), world_size=2)
    assert zero_ckpt.verify(str(tmp_path / "dst")).ok


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["same", "trailing-slash", "file-url", "parent"])
def test_destination_that_is_or_contains_the_source_is_refused(
    src: Path, where: str, overwrite: bool
) -> None:
    dst = {
        "same": str(src),
        "trailing-slash": f"{src}/",
        "file-url": f"file://{src}",
        "parent": str(src.parent),
    }[where]
    for call in (
        lambda: zero_ckpt.reshard(str(src), dst, world_size=3, overwrite=overwrite),
        lambda: zero_ckpt.consolidate(str(src), dst, overwrite=overwrite),
    ):
        with unchanged(src), pytest.raises(DestinationExistsError) as info:
            call()
        assert "is the source, inside it or contains it" in str(info.value)
        assert "choose a destination outside the source checkpoint" in str(info.value)
    assert zero_ckpt.verify(str(src)).ok




@pytest.mark.parametrize("spelling", ["dot", "dotdot", "symlink"])
def test_destination_spelled_differently_than_the_source_is_refused(src: Path, spelling: str) -> None:
    if spelling == "symlink":
        dst = str(src.parent / "link")
        os.symlink(src, dst)
    else:
        dst = {"dot": f"{src}/.", "dotdot": f"{src}/../{src.name}"}[spelling]
    with unchanged(src):
        with pytest.raises(DestinationExistsError):
            zero_ckpt.reshard(str(src), dst, world_size=3, overwrite=True)


def test_destination_inside_the_source_with_overwrite_leaves_the_source_intact(src: Path) -> None:
    with unchanged(src):
        try:
            zero_ckpt.reshard(str(src), str(src / "shards"), world_size=3, overwrite=True)
        except CheckpointError:
            pass


# ----- missing or incomplete checkpoints -----------------------------------------------------


def test_source_without_manifest_is_incomplete(src: Path, tmp_path: Path) -> None:
    (src / "manifest.json").unlink()
    with unchanged(src):
        for call in (
            lambda: zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=3),
            lambda: zero_ckpt.consolidate(str(src), str(tmp_path / "c")),
            lambda: zero_ckpt.open_checkpoint(str(src)),
        ):
            with pytest.raises(IncompleteCheckpointError) as info:
                call()
            msg = str(info.value)
            assert str(src) in msg and "manifest.json" in msg and "incomplete" in msg
            assert isinstance(info.value, FileNotFoundError)
        report = zero_ckpt.verify(str(src))
    assert not report.ok and [p.kind for p in report.problems] == ["incomplete"]
    assert "incomplete" in report.problems[0].message
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_non_existent_source(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for call in (
        lambda: zero_ckpt.reshard(str(missing), str(tmp_path / "r"), world_size=3),
        lambda: zero_ckpt.consolidate(str(missing), str(tmp_path / "c")),
        lambda: zero_ckpt.open_checkpoint(str(missing)),
    ):
        with pytest.raises(IncompleteCheckpointError) as info:
            call()
        assert f"no checkpoint at {missing}" in str(info.value) and "check the path" in str(info.value)
    report = zero_ckpt.verify(str(missing))
    assert [p.kind for p in report.problems] == ["incomplete"]
    assert not missing.exists() and not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_manifest_of_unknown_version(src: Path, tmp_path: Path) -> None:
    _edit_manifest(src, lambda d: d.update(version=2))
    with unchanged(src):
        for call in (
            lambda: zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=3),
            lambda: zero_ckpt.consolidate(str(src), str(tmp_path / "c")),
            lambda: zero_ckpt.open_checkpoint(str(src)),
        ):
            with pytest.raises(ManifestError) as info:
                call()
            msg = str(info.value)
            assert f"{src}/manifest.json" in msg and "version 2" in msg and "upgrade" in msg
        report = zero_ckpt.verify(str(src))
    assert [p.kind for p in report.problems] == ["manifest"] and "upgrade" in report.problems[0].message


def test_manifest_that_is_not_json(src: Path, tmp_path: Path) -> None:
    (src / "manifest.json").write_text('{"format": "zero-ckpt", ')
    with unchanged(src), pytest.raises(ManifestError, match="not valid JSON"):
        zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=3)


@pytest.mark.parametrize("rank", [0, 3])
def test_missing_shard(src: Path, tmp_path: Path, rank: int) -> None:
    _shard(src, rank).unlink()
    with unchanged(src):
        errors = _run_all(src, tmp_path)
        for err in errors.values():
            assert isinstance(err, MissingShardError), err
            assert _url(src, rank) in str(err) and "missing" in str(err)
        with zero_ckpt.open_checkpoint(str(src)) as reader:
            with pytest.raises(MissingShardError, match=shard_path(rank, N)):
                for name in reader.params:
                    reader.read(name)
        report = zero_ckpt.verify(str(src))
    assert [(p.path, p.kind, p.rank) for p in report.problems] == [(_url(src, rank), "missing", rank)]
    _nothing_written(tmp_path / "r")
    _nothing_written(tmp_path / "c")


def test_missing_model_file(src: Path, tmp_path: Path) -> None:
    (src / "model.safetensors").unlink()
    with unchanged(src):
        errors = _run_all(src, tmp_path)
        for err in errors.values():
            assert isinstance(err, MissingShardError) and f"{src}/model.safetensors" in str(err)
        report = zero_ckpt.verify(str(src))
    assert [(p.path, p.kind) for p in report.problems] == [(f"{src}/model.safetensors", "missing")]


def test_truncated_shard(src: Path, tmp_path: Path) -> None:
    path = _shard(src, 2)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with unchanged(src):
        errors = _run_all(src, tmp_path)
        for err in errors.values():
            assert isinstance(err, CorruptShardError)
            msg = str(err)
            assert _url(src, 2) in msg and f"is {len(data) - 3} bytes, the manifest says {len(data)}" in msg
            assert "truncated" in msg
        # the reader fails on the bytes that are not there, naming the shard
        with zero_ckpt.open_checkpoint(str(src)) as reader:
            with pytest.raises(CorruptShardError, match="truncated") as info:
                for name in reader.params:
                    for key in reader.keys(name):
                        reader.read(name, key)
            assert _url(src, 2) in str(info.value)
        report = zero_ckpt.verify(str(src))
    kinds = {(p.path, p.kind) for p in report.problems}
    assert (_url(src, 2), "size") in kinds
    assert {p.path for p in report.problems} == {_url(src, 2)}
    _nothing_written(tmp_path / "r")
    _nothing_written(tmp_path / "c")


def test_empty_shard_file(src: Path, tmp_path: Path) -> None:
    _shard(src, 1).write_bytes(b"")
    with unchanged(src), pytest.raises(CorruptShardError) as info:
        zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=3)
    assert _url(src, 1) in str(info.value)
    assert {p.path for p in zero_ckpt.verify(str(src)).problems} == {_url(src, 1)}


# ----- corrupted bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize("tensor", ["g0.master", "g1.master"])
def test_flipped_byte_in_a_master(src: Path, tmp_path: Path, manifest, tensor: str) -> None:
    _flip_tensor_byte(src, manifest, 1, tensor)
    with unchanged(src):
        errors = {}
        for job, call in (
            ("reshard", lambda: zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=3)),
            # consolidate reads only the masters: it must still detect it
            ("consolidate", lambda: zero_ckpt.consolidate(str(src), str(tmp_path / "c"))),
        ):
            with pytest.raises(CorruptShardError) as info:
                call()
            errors[job] = info.value
        for job, err in errors.items():
            msg = str(err)
            assert _url(src, 1) in msg and "checksum mismatch" in msg and repr(tensor) in msg, job
            assert "restore this file" in msg
            assert err.path == _url(src, 1) and err.rank == 1
        report = zero_ckpt.verify(str(src))
    assert [(p.path, p.kind, p.rank) for p in report.problems] == [(_url(src, 1), "checksum", 1)]
    assert tensor in report.problems[0].message
    for d in ("r", "c"):
        _nothing_written(tmp_path / d)




def test_flipped_master_is_detected_by_consolidate_with_optimizer(src: Path, tmp_path: Path, manifest) -> None:
    _flip_tensor_byte(src, manifest, 1, "g0.master")
    with unchanged(src), pytest.raises(CorruptShardError, match=shard_path(1, N)):
        zero_ckpt.consolidate(str(src), str(tmp_path / "c"), include_optimizer=True)


def test_flipped_master_of_an_aliased_param_is_detected_by_consolidate(src: Path, tmp_path: Path, manifest) -> None:
    def alias(doc):
        doc["groups"][1]["params"][0]["aliases"] = ["lm_head.weight"]  # head.w, ranks 0-1

    _edit_manifest(src, alias)
    _flip_tensor_byte(src, manifest, 0, "g1.master")
    assert [p.kind for p in zero_ckpt.verify(str(src)).problems] == ["checksum"]
    with unchanged(src), pytest.raises(CorruptShardError, match=shard_path(0, N)):
        zero_ckpt.consolidate(str(src), str(tmp_path / "c"))


def test_flipped_byte_in_a_state(src: Path, tmp_path: Path, manifest) -> None:
    _flip_tensor_byte(src, manifest, 0, "g1.exp_avg")  # a bfloat16 state
    with unchanged(src):
        errors = _run_all(src, tmp_path)
        for err in errors.values():
            assert isinstance(err, CorruptShardError) and _url(src, 0) in str(err)
            assert "'g1.exp_avg'" in str(err)
        report = zero_ckpt.verify(str(src))
    assert [(p.path, p.kind) for p in report.problems] == [(_url(src, 0), "checksum")]
    _nothing_written(tmp_path / "r")
    _nothing_written(tmp_path / "c")


def test_flipped_byte_in_the_model_file(src: Path, tmp_path: Path) -> None:
    flip_byte(src / "model.safetensors", -1)
    with unchanged(src):
        errors = _run_all(src, tmp_path)
        for err in errors.values():
            assert isinstance(err, CorruptShardError) and f"{src}/model.safetensors" in str(err)
        report = zero_ckpt.verify(str(src))
    assert [(p.path, p.kind) for p in report.problems] == [(f"{src}/model.safetensors", "checksum")]


def test_flipped_byte_in_header_json_breaks_it(src: Path, tmp_path: Path) -> None:
    flip_byte(_shard(src, 2), 8 + 3)  # inside the JSON: no longer valid UTF-8 JSON
    with unchanged(src):
        errors = _run_all(src, tmp_path)
        for err in errors.values():
            assert isinstance(err, CorruptShardError)
            assert _url(src, 2) in str(err) and "header is not valid JSON" in str(err)
        report = zero_ckpt.verify(str(src))
    assert [(p.path, p.kind) for p in report.problems] == [(_url(src, 2), "header")]
    _nothing_written(tmp_path / "r")


def test_changed_dtype_in_header_json(src: Path, tmp_path: Path) -> None:
    path = _shard(src, 2)
    data = bytearray(path.read_bytes())
    at = data.index(b'"F32"')
    data[at + 1] = ord("I")  # F32 -> I32: valid JSON, wrong dtype
    path.write_bytes(bytes(data))
    with unchanged(src):
        errors = _run_all(src, tmp_path)
        for err in errors.values():
            assert isinstance(err, CorruptShardError)
            assert _url(src, 2) in str(err) and "is int32, manifest says float32" in str(err)
        report = zero_ckpt.verify(str(src))
    by_kind = {p.kind for p in report.problems if p.path == _url(src, 2)}
    assert "header" in by_kind and "checksum" in by_kind
    assert {p.path for p in report.problems} == {_url(src, 2)}


def test_flipped_byte_in_header_metadata_is_found_by_verify(src: Path) -> None:
    path = _shard(src, 1)
    data = bytearray(path.read_bytes())
    at = data.index(b'"world_size":"4"')
    data[at + len('"world_size":"')] = ord("5")
    path.write_bytes(bytes(data))
    report = zero_ckpt.verify(str(src))
    assert [(p.path, p.kind) for p in report.problems] == [(_url(src, 1), "checksum")]


def test_manifest_lies_about_a_shard_size(src: Path, tmp_path: Path) -> None:
    real = _shard(src, 1).stat().st_size
    _edit_manifest(src, lambda d: d["shards"][1].update(bytes=real + 4))
    with unchanged(src):
        errors = _run_all(src, tmp_path)
        for err in errors.values():
            assert isinstance(err, CorruptShardError)
            assert f"{_url(src, 1)}: is {real} bytes, the manifest says {real + 4}" in str(err)
        report = zero_ckpt.verify(str(src))
    assert (_url(src, 1), "size") in {(p.path, p.kind) for p in report.problems}


def test_manifest_lies_about_a_checksum(src: Path) -> None:
    _edit_manifest(src, lambda d: d["shards"][2].update(checksum="crc32c:00000000"))
    report = zero_ckpt.verify(str(src))
    assert [(p.path, p.kind) for p in report.problems] == [(_url(src, 2), "checksum")]


def test_manifest_without_tensor_checksums_uses_the_file_checksum(src: Path, tmp_path: Path, manifest) -> None:
    def strip(doc):
        for shard in doc["shards"]:
            shard.pop("tensors")

    _edit_manifest(src, strip)
    assert zero_ckpt.verify(str(src)).ok
    _flip_tensor_byte(src, manifest, 2, "g1.exp_avg_sq")
    with unchanged(src), pytest.raises(CorruptShardError) as info:
        zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=3)
    assert f"{_url(src, 2)}: checksum mismatch in file" in str(info.value)
    assert [(p.path, p.kind) for p in zero_ckpt.verify(str(src)).problems] == [(_url(src, 2), "checksum")]
    _nothing_written(tmp_path / "r")


def test_verify_problem_names_the_manifest_once(src: Path) -> None:
    _edit_manifest(src, lambda d: d.update(version=2))
    (problem,) = zero_ckpt.verify(str(src)).problems
    assert str(problem).count(problem.path) == 1


def test_two_corrupted_shards_are_both_reported(src: Path, tmp_path: Path, manifest) -> None:
    _flip_tensor_byte(src, manifest, 0, "g0.exp_avg_sq")
    _flip_tensor_byte(src, manifest, 3, "g0.master")
    with unchanged(src):
        report = zero_ckpt.verify(str(src))
        with pytest.raises(CorruptShardError) as info:
            zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=3)
    assert sorted((p.path, p.kind, p.rank) for p in report.problems) == [
        (_url(src, 0), "checksum", 0),
        (_url(src, 3), "checksum", 3),
    ]
    assert report.files_checked == N + 1
    msg = str(info.value)
    assert msg.startswith("2 problems") and _url(src, 0) in msg and _url(src, 3) in msg
    _nothing_written(tmp_path / "r")


def test_missing_and_truncated_shards_are_both_reported(src: Path, tmp_path: Path) -> None:
    _shard(src, 0).unlink()
    _shard(src, 2).write_bytes(_shard(src, 2).read_bytes()[:20])
    report = zero_ckpt.verify(str(src))
    assert {(p.path, p.kind) for p in report.problems} >= {(_url(src, 0), "missing"), (_url(src, 2), "size")}
    with pytest.raises(MissingShardError) as info:  # the first problem decides the class
        zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=3)
    assert _url(src, 0) in str(info.value) and _url(src, 2) in str(info.value)


# ----- failures mid-run: nothing left at the destination --------------------------------------------


def test_corrupt_last_shard_fails_after_files_are_written(src: Path, tmp_path: Path, manifest,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _flip_tensor_byte(src, manifest, N - 1, "g0.master")
    committed: list[str] = []
    orig = FileWriter.commit

    def commit(self, *a, **kw):
        orig(self, *a, **kw)
        committed.append(self.rel)

    monkeypatch.setattr(FileWriter, "commit", commit)
    with unchanged(src):
        with pytest.raises(CorruptShardError, match=shard_path(N - 1, N)):
            zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=5, workers=1)
        assert len(committed) == 6  # every output file was written before the check failed
        _nothing_written(tmp_path / "r")
        committed.clear()
        with pytest.raises(CorruptShardError, match=shard_path(N - 1, N)):
            zero_ckpt.consolidate(str(src), str(tmp_path / "c"), max_shard_size=100, workers=1)
        assert len(committed) > 2
        _nothing_written(tmp_path / "c")


def test_overwrite_then_failure_leaves_no_stale_checkpoint(src: Path, tmp_path: Path, manifest) -> None:
    dst = tmp_path / "dst"
    zero_ckpt.reshard(str(src), str(dst), world_size=2)
    _flip_tensor_byte(src, manifest, 0, "g0.master")
    with pytest.raises(CorruptShardError):
        zero_ckpt.reshard(str(src), str(dst), world_size=3, overwrite=True)
    _nothing_written(dst)


class _FailOn:
    """Make the Nth call of a FileWriter method raise OSError (thread-safe count)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: str, nth: int) -> None:
        self.calls = 0
        self.nth = nth
        lock = threading.Lock()
        orig = getattr(FileWriter, method)
        failer = self

        def wrapper(writer, *a, **kw):
            with lock:
                failer.calls += 1
                fail = failer.calls == failer.nth
            if fail:
                raise OSError(5, "injected I/O error")
            return orig(writer, *a, **kw)

        monkeypatch.setattr(FileWriter, method, wrapper)


def _count_calls(monkeypatch: pytest.MonkeyPatch, method: str, run) -> int:
    with monkeypatch.context() as mp:
        counter = _FailOn(mp, method, nth=-1)
        run()
    return counter.calls


@pytest.mark.parametrize("method", ["write_at", "write"])
@pytest.mark.parametrize("job", ["reshard", "consolidate"])
def test_injected_write_error_leaves_nothing(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             method: str, job: str) -> None:
    def run(dst: Path):
        if job == "reshard":
            return zero_ckpt.reshard(str(src), str(dst), world_size=5, workers=2, chunk_bytes=64)
        return zero_ckpt.consolidate(str(src), str(dst), include_optimizer=True, max_shard_size=200,
                                     workers=2, chunk_bytes=64)

    total = _count_calls(monkeypatch, method, lambda: run(tmp_path / "count"))
    assert total >= 1
    # write_at: the data of every output file; write: the manifest / the JSON documents
    for nth in sorted({1, max(1, total // 2), total}):
        dst = tmp_path / f"fail-{nth}"
        with monkeypatch.context() as mp, unchanged(src):
            _FailOn(mp, method, nth)
            with pytest.raises(OSError, match="injected I/O error"):
                run(dst)
        _nothing_written(dst)  # no manifest, no output file, no temporary file


def test_disk_full_during_reshard_names_the_file_and_leaves_nothing(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from zero_ckpt import storage

    calls = {"n": 0}
    lock = threading.Lock()
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        with lock:
            calls["n"] += 1
            fail = calls["n"] == 4
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    dst = tmp_path / "dst"
    with unchanged(src):
        monkeypatch.setattr(storage.os, "pwrite", pwrite)
        with pytest.raises(StorageError) as info:
            zero_ckpt.reshard(str(src), str(dst), world_size=3, workers=1)
        monkeypatch.undo()
    msg = str(info.value)
    assert msg.startswith(f"cannot write {dst}/shards/rank-") and "no space left on device" in msg
    assert isinstance(info.value, OSError)
    _nothing_written(dst)


def test_injected_write_error_on_memory_destination(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    from helpers_ckpt import fs_bytes, memory_rm

    url = f"memory://fail-{uuid.uuid4().hex}/out"
    try:
        total = _count_calls(monkeypatch, "write", lambda: zero_ckpt.reshard(str(src), url + "0", world_size=3))
        for nth in sorted({1, max(1, total // 2), total}):
            with monkeypatch.context() as mp, unchanged(src):
                _FailOn(mp, "write", nth)
                with pytest.raises(OSError, match="injected I/O error"):
                    zero_ckpt.reshard(str(src), f"{url}{nth}x", world_size=3)
            assert fs_bytes(f"{url}{nth}x") == {}
    finally:
        memory_rm(url.rsplit("/", 1)[0])


def test_write_checkpoint_failure_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    total = _count_calls(monkeypatch, "write", lambda: write_standard(tmp_path / "count", 3, 4))
    for nth in sorted({1, max(1, total // 2), total}):
        dst = tmp_path / f"w{nth}"
        with monkeypatch.context() as mp:
            _FailOn(mp, "write", nth)
            with pytest.raises(OSError, match="injected I/O error"):
                write_standard(dst, 3, 4)
        assert not (dst / "manifest.json").exists()
        assert not [f for f in all_files(dst) if ".tmp-" in f], "temporary files left"
        with pytest.raises(IncompleteCheckpointError):
            zero_ckpt.open_checkpoint(str(dst))


def test_failed_read_with_existing_output_keeps_source_and_refuses(src: Path, tmp_path: Path) -> None:
    # a consolidate into a directory holding a finished reshard is refused, nothing touched
    zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=2)
    before = dir_bytes(tmp_path / "r")
    with unchanged(src), pytest.raises(DestinationExistsError):
        zero_ckpt.consolidate(str(src), str(tmp_path / "r"))
    assert dir_bytes(tmp_path / "r") == before
