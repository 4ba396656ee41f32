"""The storage contract, run on local disk and on ``memory://``: writers commit or leave nothing,
ranged reads are exact, errors name the URL, destinations are prepared safely."""

from __future__ import annotations

import os
import random
import sys
import threading
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers_ckpt import all_files, memory_rm  # noqa: E402
from zero_ckpt.checksum import crc32c  # noqa: E402
from zero_ckpt.errors import (  # noqa: E402
    CheckpointError,
    CorruptShardError,
    DestinationExistsError,
    MissingShardError,
)
from zero_ckpt.destination import prepare_destination  # noqa: E402
from zero_ckpt.storage import Location, open_location  # noqa: E402

DATA = bytes(range(256)) * 3 + b"tail"  # 772 bytes



# Contract tests whose S3 answer differs by design (covered in tests/test_s3.py instead).
_NOT_ON_S3: dict[str, str] = {}


@pytest.fixture(params=["local", "memory", "s3"])
def kind(request) -> str:
    if request.param == "s3":
        reason = _NOT_ON_S3.get(request.node.originalname)
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture
def base(request, kind: str, tmp_path: Path):
    """A fresh, not yet existing directory URL of the given kind (cleaned up afterwards)."""
    if kind == "local":
        yield str(tmp_path / "store")
    elif kind == "s3":
        # The moto server's endpoint reaches every Location through the AWS environment
        # variable botocore reads, so the tests' Location(url) calls need no options.
        bucket, options = request.getfixturevalue("s3_bucket")
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", options["endpoint_url"])
        yield f"{bucket}/store"
    else:
        root = f"memory://storage-{uuid.uuid4().hex}"
        try:
            yield f"{root}/store"
        finally:
            memory_rm(root)


@pytest.fixture
def loc(base: str):
    with open_location(base) as location:
        yield location


def _local_leftovers(loc: Location) -> list[str]:
    return all_files(loc.root) if loc.is_local else []


# ----- writers --------------------------------------------------------------------------------------


def test_commit_makes_the_file_visible(loc: Location) -> None:
    w = loc.writer("sub/f.bin", len(DATA))
    assert w.write(DATA[:100]) == crc32c(DATA[:100])
    w.write(DATA[100:])
    assert w.bytes_written == len(DATA)
    w.commit()
    assert loc.exists("sub/f.bin")
    assert loc.read_bytes("sub/f.bin") == DATA
    assert loc.size("sub/f.bin") == len(DATA)
    assert loc.list_files() == ["sub/f.bin"]
    w.commit()  # a second commit is a no-op
    w.abort()  # so is an abort after commit
    assert loc.read_bytes("sub/f.bin") == DATA
    assert _local_leftovers(loc) in ([], ["sub/f.bin"])


def test_file_is_invisible_until_commit(request, kind: str, loc: Location) -> None:
    w = loc.writer("f.bin", len(DATA))
    w.write(DATA)
    assert not loc.exists("f.bin")
    w.commit()
    assert loc.exists("f.bin")


def test_abort_leaves_nothing(request, kind: str, loc: Location) -> None:
    w = loc.writer("sub/f.bin", len(DATA))
    w.write(DATA[:10])
    w.abort()
    w.abort()  # idempotent
    w.commit()  # commit after abort does nothing
    assert not loc.exists("sub/f.bin")
    assert loc.list_files() == []
    assert _local_leftovers(loc) == []  # no temporary sibling either


def test_abort_keeps_an_existing_file(request, kind: str, loc: Location) -> None:
    loc.write_atomic("f.bin", b"old")
    w = loc.writer("f.bin", 3)
    w.write(b"new")
    w.abort()
    assert loc.read_bytes("f.bin") == b"old"


def test_context_manager_commits(loc: Location) -> None:
    with loc.writer("a.bin") as w:
        w.write(b"hello")
    assert loc.read_bytes("a.bin") == b"hello"


def test_context_manager_aborts_on_error(request, kind: str, loc: Location) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with loc.writer("b.bin", 10) as w:
            w.write(b"partial")
            raise RuntimeError("boom")
    assert not loc.exists("b.bin")
    assert loc.list_files() == []
    assert _local_leftovers(loc) == []


def test_empty_file(loc: Location) -> None:
    with loc.writer("empty.bin", 0):
        pass
    assert loc.read_bytes("empty.bin") == b""
    assert loc.size("empty.bin") == 0


def test_write_atomic(loc: Location) -> None:
    loc.write_atomic("manifest.json", b'{"a": 1}')
    assert loc.read_bytes("manifest.json") == b'{"a": 1}'
    loc.write_atomic("manifest.json", b'{"a": 22}')  # replaces
    assert loc.read_bytes("manifest.json") == b'{"a": 22}'
    assert loc.list_files() == ["manifest.json"]
    assert _local_leftovers(loc) in ([], ["manifest.json"])


def test_write_at_needs_a_sized_local_or_s3_writer(kind: str, loc: Location) -> None:
    sized = loc.writer("s.bin", 8)
    unsized = loc.writer("u.bin")
    try:
        assert sized.supports_write_at is (kind in ("local", "s3"))
        assert unsized.supports_write_at is False
        with pytest.raises(RuntimeError, match="write_at needs"):
            unsized.write_at(0, b"x")
        if kind == "memory":
            with pytest.raises(RuntimeError):
                sized.write_at(0, b"x")
    finally:
        sized.abort()
        unsized.abort()


def test_write_at_from_several_threads(tmp_path: Path) -> None:
    size, piece = 1 << 16, 1000
    data = random.Random(7).randbytes(size)
    offsets = list(range(0, size, piece))
    random.Random(8).shuffle(offsets)
    with open_location(str(tmp_path / "d")) as loc:
        w = loc.writer("big.bin", size)
        assert w.supports_write_at
        barrier = threading.Barrier(8)

        def work(mine: list[int]) -> None:
            barrier.wait()
            for off in mine:
                w.write_at(off, memoryview(data)[off : off + piece])

        threads = [threading.Thread(target=work, args=(offsets[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not loc.exists("big.bin")
        w.commit()
        assert loc.read_bytes("big.bin") == data
        assert all_files(tmp_path / "d") == ["big.bin"]


# ----- reads ---------------------------------------------------------------------------------------


@pytest.fixture
def stored(loc: Location) -> Location:
    loc.write_atomic("dir/data.bin", DATA)
    return loc


def test_read_range_exact(stored: Location) -> None:
    assert stored.read_range("dir/data.bin", 0, 8) == DATA[:8]
    assert stored.read_range("dir/data.bin", 250, 270) == DATA[250:270]
    assert stored.read_range("dir/data.bin", 5, 5) == b""
    # fewer bytes only when the file is shorter
    assert stored.read_range("dir/data.bin", len(DATA) - 3, len(DATA) + 10) == DATA[-3:]
    assert stored.read_range("dir/data.bin", len(DATA) + 5, len(DATA) + 10) == b""


def test_read_into_exact(stored: Location) -> None:
    buf = bytearray(100)
    stored.read_into("dir/data.bin", 300, memoryview(buf))
    assert bytes(buf) == DATA[300:400]
    buf = bytearray(len(DATA))
    stored.read_into("dir/data.bin", 0, memoryview(buf))
    assert bytes(buf) == DATA
    stored.read_into("dir/data.bin", len(DATA), memoryview(bytearray(0)))  # nothing needed: fine


def test_read_into_past_eof_names_the_url(stored: Location) -> None:
    url = stored.url_of("dir/data.bin")
    with pytest.raises(CorruptShardError) as info:
        stored.read_into("dir/data.bin", len(DATA) - 4, memoryview(bytearray(10)))
    msg = str(info.value)
    assert url in msg and "truncated" in msg
    assert f"ends at byte {len(DATA)}" in msg and f"up to {len(DATA) + 6}" in msg
    assert info.value.path == url
    assert (info.value.expected, info.value.actual) == (len(DATA) + 6, len(DATA))


def test_missing_file_errors_name_the_url(loc: Location) -> None:
    loc.makedirs()
    url = loc.url_of("shards/nope.safetensors")
    for call in (
        lambda: loc.size("shards/nope.safetensors"),
        lambda: loc.read_bytes("shards/nope.safetensors"),
        lambda: loc.read_range("shards/nope.safetensors", 0, 8),
        lambda: loc.read_into("shards/nope.safetensors", 0, memoryview(bytearray(8))),
    ):
        with pytest.raises(MissingShardError) as info:
            call()
        assert str(info.value) == f"{url} is missing"
        assert info.value.path == url
        assert isinstance(info.value, FileNotFoundError)
    assert not loc.exists("shards/nope.safetensors")


def test_list_files(loc: Location) -> None:
    assert loc.list_files() == []  # not there yet
    assert not loc.exists()
    for rel in ("manifest.json", "shards/rank-00001-of-00002.safetensors",
                "shards/rank-00000-of-00002.safetensors", "model.safetensors"):
        loc.write_atomic(rel, rel.encode())
    assert loc.list_files() == [
        "manifest.json",
        "model.safetensors",
        "shards/rank-00000-of-00002.safetensors",
        "shards/rank-00001-of-00002.safetensors",
    ]
    assert loc.exists()
    loc.remove("model.safetensors")
    loc.remove("model.safetensors")  # missing is fine
    assert "model.safetensors" not in loc.list_files()
    loc.remove_all()
    assert loc.list_files() == []


def test_naming(base: str) -> None:
    loc = Location(base + "/")
    assert loc.url == base
    assert loc.url_of("shards/x") == f"{base}/shards/x"
    assert loc.url_of("") == base
    assert loc.canonical_root() == Location(base).canonical_root()
    assert loc.canonical_root() != Location(base + "-other").canonical_root()
    with pytest.raises(CheckpointError, match="non-empty URL string"):
        Location("")


# ----- prepare_destination ------------------------------------------------------------------------


def test_prepare_missing_or_empty_destination(base: str) -> None:
    dst = Location(base + "/new")
    prepare_destination(None, dst, overwrite=False)
    assert dst.exists() and dst.list_files() == []
    prepare_destination(None, dst, overwrite=False)  # empty: still fine


def test_prepare_refuses_zero_ckpt_files_and_keeps_foreign_ones(base: str) -> None:
    dst = Location(base + "/out")
    dst.write_atomic("old/keep.bin", b"keep")
    prepare_destination(None, dst, overwrite=False)  # a foreign file alone is fine
    dst.write_atomic("manifest.json", b"{}")
    with pytest.raises(DestinationExistsError) as info:
        prepare_destination(None, dst, overwrite=False)
    msg = str(info.value)
    assert dst.url in msg and "already exists" in msg and "'manifest.json'" in msg and "overwrite" in msg
    assert dst.read_bytes("old/keep.bin") == b"keep" and dst.read_bytes("manifest.json") == b"{}"


def test_prepare_overwrite_removes_only_zero_ckpt_files(base: str) -> None:
    dst = Location(base + "/out")
    dst.write_atomic("manifest.json", b"{}")
    dst.write_atomic("shards/rank-00000-of-00002.safetensors", b"a")
    dst.write_atomic("notes/readme.md", b"mine")
    prepare_destination(None, dst, overwrite=True)
    assert dst.list_files() == ["notes/readme.md"]
    assert dst.exists()
    dst.write_atomic("x", b"x")  # usable afterwards
    assert dst.list_files() == ["notes/readme.md", "x"]


def test_prepare_refuses_a_foreign_file_in_a_folder_it_writes(base: str) -> None:
    dst = Location(base + "/out")
    dst.write_atomic("shards/a.bin", b"a")
    for overwrite in (False, True):
        with pytest.raises(DestinationExistsError, match="shards/a.bin is not a file zero-ckpt writes"):
            prepare_destination(None, dst, overwrite=overwrite)
    assert dst.read_bytes("shards/a.bin") == b"a"


@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_refuses_the_source_and_its_parents(base: str, overwrite: bool) -> None:
    src = Location(base + "/runs/ckpt")
    src.write_atomic("manifest.json", b"{}")
    for dst_url in (base + "/runs/ckpt", base + "/runs/ckpt/", base + "/runs", base):
        with pytest.raises(DestinationExistsError, match="is the source, inside it or contains it"):
            prepare_destination(src, Location(dst_url), overwrite)
    assert src.read_bytes("manifest.json") == b"{}"


def test_prepare_allows_a_sibling_with_a_common_prefix(base: str) -> None:
    src = Location(base + "/ckpt")
    src.write_atomic("manifest.json", b"{}")
    dst = Location(base + "/ckpt-dp16")  # shares a string prefix, is not the source
    prepare_destination(src, dst, overwrite=False)
    assert dst.exists() and src.read_bytes("manifest.json") == b"{}"


@pytest.mark.parametrize("suffix", ["/.", "/../ckpt"])
def test_prepare_refuses_the_source_spelled_differently(base: str, suffix: str) -> None:
    src = Location(base + "/ckpt")
    src.write_atomic("manifest.json", b"{}")
    try:
        with pytest.raises(DestinationExistsError):
            prepare_destination(src, Location(base + "/ckpt" + suffix), overwrite=True)
    finally:
        assert src.exists("manifest.json"), "the source's manifest.json was deleted"
