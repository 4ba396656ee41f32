"""Storage backends behind one small interface.

- Nothing outside ``zero_ckpt/storage/`` looks at a Location's filesystem or backend
  (``.fs``, ``.is_local``, ``._s3``): callers use the Location's methods.
- Each backend (local disk, ``memory://`` through generic fsspec, S3 on the moto server)
  passes the same small contract: write, commit, size, ranged read, list, remove, and a
  missing file raises MissingShardError naming its URL.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers_ckpt import memory_rm  # noqa: E402
from zero_ckpt.errors import CheckpointError, MissingShardError  # noqa: E402
from zero_ckpt.storage import Location, open_location  # noqa: E402
from zero_ckpt.storage.backend import Backend  # noqa: E402
from zero_ckpt.storage.fsspec_backend import FsspecBackend, MemoryBackend  # noqa: E402
from zero_ckpt.storage.local import LocalBackend  # noqa: E402
from zero_ckpt.storage.s3 import S3Backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("zero_ckpt", "cli", "zero_core")
STORAGE_PACKAGE = ROOT / "zero_ckpt" / "storage"
# The attribute names of a Location's insides: only the storage package may use them.
_INSIDES = re.compile(r"\.fs\b|\.fs\.|_s3\b|is_local")

DATA = bytes(range(256)) * 5 + b"end"  # 1283 bytes


# ----- the layering rule --------------------------------------------------------------------------


def _outside_storage() -> list[Path]:
    files = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if STORAGE_PACKAGE in path.parents:
                continue
            files.append(path)
    return files


def test_storage_is_a_package_of_backends() -> None:
    assert (STORAGE_PACKAGE / "__init__.py").is_file()
    assert not (ROOT / "zero_ckpt" / "storage.py").exists()
    for name in ("backend", "local", "fsspec_backend", "s3"):
        assert (STORAGE_PACKAGE / f"{name}.py").is_file(), name


def test_nothing_outside_storage_reaches_into_a_location() -> None:
    files = _outside_storage()
    assert any(p.name == "destination.py" for p in files)  # the scan sees the callers
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _INSIDES.search(line)
    ]
    assert offenders == [], "use Location's methods instead:\n" + "\n".join(offenders)


def test_the_rule_catches_what_it_should() -> None:
    for line in ("loc.fs.isfile(p)", "type(loc.fs) is x", "if dst._s3 is None:", "if loc.is_local:"):
        assert _INSIDES.search(line), line
    for line in ("loc.is_file()", "loc.local_path()", "_s3_status(e)", "dst.supports_positioned_write"):
        assert not _INSIDES.search(line), line


# ----- one contract, every backend -------------------------------------------------------------


@pytest.fixture(params=["local", "memory", "s3"])
def loc(request, tmp_path: Path):
    if request.param == "local":
        url, options, cleanup = str(tmp_path / "store"), {}, None
    elif request.param == "memory":
        root = f"memory://backends-{uuid.uuid4().hex}"
        url, options, cleanup = f"{root}/store", {}, root
    else:
        bucket, options = request.getfixturevalue("s3_bucket")
        url, cleanup = f"{bucket}/store", None
    try:
        with open_location(url, options) as location:
            yield location
    finally:
        if cleanup:
            memory_rm(cleanup)


_EXPECTED = {"local": LocalBackend, "memory": MemoryBackend, "s3": S3Backend}


def test_each_url_gets_its_backend(request, loc: Location) -> None:
    kind = request.node.callspec.params["loc"]
    backend = loc._backend
    assert type(backend) is _EXPECTED[kind]
    assert isinstance(backend, Backend)
    assert (loc.local_path("a/b") is not None) == (kind == "local")
    if kind == "local":
        assert loc.local_path("a/b") == os.path.join(loc.local_path(), "a/b")
    assert loc.supports_positioned_write == (kind in ("local", "s3"))
    assert loc.supports_conditional_put == (kind == "s3")


def test_write_commit_size_read_list_remove(loc: Location) -> None:
    w = loc.writer("sub/f.bin", len(DATA))
    w.write(DATA[:700])
    assert not loc.exists("sub/f.bin")  # invisible until commit
    w.write(DATA[700:])
    w.commit()
    loc.write_atomic("top.json", b"{}")
    assert loc.exists("sub/f.bin") and loc.is_file("sub/f.bin")
    assert loc.size("sub/f.bin") == len(DATA)
    assert loc.read_bytes("sub/f.bin") == DATA
    assert loc.read_range("sub/f.bin", 10, 300) == DATA[10:300]
    assert loc.read_range("sub/f.bin", len(DATA) - 3, len(DATA) + 50) == DATA[-3:]  # short at the end
    view = memoryview(bytearray(100))
    loc.read_into("sub/f.bin", 1000, view)
    assert bytes(view) == DATA[1000:1100]
    assert loc.list_files() == ["sub/f.bin", "top.json"]
    loc.remove("sub/f.bin")
    loc.remove("sub/f.bin")  # a missing file is fine
    assert not loc.exists("sub/f.bin")
    assert loc.list_files() == ["top.json"]
    loc.remove_all()
    assert loc.list_files() == []


def test_positioned_writes_where_supported(loc: Location) -> None:
    w = loc.writer("p.bin", len(DATA))
    if not loc.supports_positioned_write:
        assert not w.supports_write_at
        w.abort()
        return
    assert w.supports_write_at
    w.write_at(600, DATA[600:])
    w.write_at(0, DATA[:600])
    w.commit()
    assert loc.read_bytes("p.bin") == DATA


def test_abort_leaves_nothing(loc: Location) -> None:
    w = loc.writer("gone.bin", len(DATA))
    w.write(DATA[:10])
    w.abort()
    assert not loc.exists("gone.bin")
    assert loc.list_files() == []


def test_a_missing_file_raises_the_projects_error(loc: Location) -> None:
    url = loc.url_of("nope.bin")
    for read in (
        lambda: loc.size("nope.bin"),
        lambda: loc.read_bytes("nope.bin"),
        lambda: loc.read_bytes("nope.bin", max_bytes=100),
        lambda: loc.read_range("nope.bin", 0, 10),
        lambda: loc.read_into("nope.bin", 0, memoryview(bytearray(4))),
    ):
        with pytest.raises(MissingShardError) as info:
            read()
        assert isinstance(info.value, CheckpointError) and isinstance(info.value, FileNotFoundError)
        assert str(info.value) == f"{url} is missing" and info.value.path == url
    assert not loc.exists("nope.bin")
    assert not loc.is_file("nope.bin")


def test_conditional_put_on_s3(s3_bucket) -> None:
    bucket, options = s3_bucket
    with open_location(f"{bucket}/cas", options) as loc:
        assert loc.etag("claim.json") is None
        assert loc.put_conditional("claim.json", b"one", if_none_match=True)
        assert not loc.put_conditional("claim.json", b"two", if_none_match=True)
        etag = loc.etag("claim.json")
        assert etag is not None
        assert not loc.put_conditional("claim.json", b"three", if_match='"0123"')
        assert loc.put_conditional("claim.json", b"four", if_match=etag)
        assert loc.read_bytes("claim.json") == b"four"


def test_other_backends_refuse_conditional_put(tmp_path: Path) -> None:
    with open_location(str(tmp_path / "x")) as loc:
        assert isinstance(loc._backend, FsspecBackend)
        with pytest.raises(NotImplementedError):
            loc.put_conditional("a", b"", if_none_match=True)
