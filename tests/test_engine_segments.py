"""The one streaming engine (``transfer.run_file_plans``) runs every segment type of
``zero_ckpt.segments``: zeros, literal bytes, copy, cast (also through a ``via`` dtype) and
CRC-32-computed zip records, on local disk and ``memory://``; a torch.save archive planned as
segments reads back with ``zipfile`` (CRCs valid) and ``torch.load``. Also: library code holds no
``assert`` statement (data checks raise the project's errors)."""

from __future__ import annotations

import ast
import io
import uuid
import zipfile
import zlib
from pathlib import Path

import fsspec
import pytest
import torch

from zero_ckpt.checksum import crc32c
from zero_ckpt.errors import CheckpointError
from zero_ckpt.plan import CopyOp, FilePlan
from zero_ckpt.segments import (
    CastViaSegment,
    Crc32Segment,
    LiteralSegment,
    SegmentPlanError,
    ZerosSegment,
    check_segments,
)
from zero_ckpt.storage import open_location
from zero_ckpt.transfer import ProgressTracker, SourceChecks, run_file_plans

ROOT = Path(__file__).resolve().parents[1]


# ----- no assert in library code ---------------------------------------------------------------------


def test_library_code_has_no_assert_statement() -> None:
    found = []
    for package in ("zero_ckpt", "cli"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            found += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    assert not found, f"assert in library code (raise a zero_ckpt.errors error instead): {found}"


def test_segments_module_is_pure() -> None:
    tree = ast.parse((ROOT / "zero_ckpt" / "segments.py").read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    bad = [m for m in names if m.split(".")[0] in ("torch", "fsspec", "s3fs", "os", "zero_ckpt.storage")]
    bad += [m for m in names if m in ("zero_ckpt.storage", "zero_ckpt.transfer")]
    assert not bad, bad


# ----- helpers ----------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "memory"])
def dst_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"memory://engine-{uuid.uuid4().hex[:8]}"


def _read(url: str, rel: str) -> bytes:
    if url.startswith("memory://"):
        return fsspec.filesystem("memory").cat(url[len("memory://"):] + "/" + rel)
    return (Path(url) / rel).read_bytes()


def _exists(url: str, rel: str) -> bool:
    if url.startswith("memory://"):
        return fsspec.filesystem("memory").exists(url[len("memory://"):] + "/" + rel)
    return (Path(url) / rel).exists()


@pytest.fixture
def src_dir(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    values = torch.linspace(-3.0, 3.0, 1000, dtype=torch.float32) * 1.2345
    (d / "values.bin").write_bytes(b"PREFIX!!" + values.numpy().tobytes())
    return d


def _values(src_dir: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray((src_dir / "values.bin").read_bytes()[8:]), dtype=torch.float32)


def _run(src: Path, dst: str, plans: list[FilePlan], **kw) -> dict:
    with open_location(str(src)) as s, open_location(dst) as d:
        return run_file_plans(s, d, plans, **kw)


def _copy(start: int, dst_start: int, numel: int, src_dtype: str = "uint8", dst_dtype: str = "uint8",
          tensor: str | None = None, offset: int = 0) -> CopyOp:
    return CopyOp("values.bin", tensor, offset, start, None, 0, dst_start, numel, src_dtype, dst_dtype,
                  check_source=tensor is not None)


# ----- each segment type -------------------------------------------------------------------------------


def test_zeros_and_literal(src_dir: Path, dst_url: str) -> None:
    segs = (LiteralSegment(b"abc"), ZerosSegment(3 << 20), LiteralSegment(b""), ZerosSegment(0), LiteralSegment(b"xyz"))
    size = 4 + 3 + (3 << 20) + 3
    written = _run(src_dir, dst_url, [FilePlan("a/z.bin", b"HEAD", None, segs, size)], chunk_bytes=1 << 16)
    want = b"HEAD" + b"abc" + bytes(3 << 20) + b"xyz"
    assert _read(dst_url, "a/z.bin") == want
    assert written["a/z.bin"].bytes == size and written["a/z.bin"].crc == crc32c(want)


def test_copy_with_progress_and_source_checks(src_dir: Path, dst_url: str) -> None:
    raw = (src_dir / "values.bin").read_bytes()
    ops = (_copy(8, 2, 4000, tensor="v", offset=0),)
    tracker_calls: list[tuple[int, int]] = []
    tracker = ProgressTracker(lambda d, t: tracker_calls.append((d, t)), 4000)
    checks = SourceChecks()
    written = _run(src_dir, dst_url, [FilePlan("c.bin", b"hi", None, ops, 4002)], chunk_bytes=512,
                   progress=tracker, checks=checks)
    assert _read(dst_url, "c.bin") == b"hi" + raw[8:]
    assert written["c.bin"].crc == crc32c(b"hi" + raw[8:])
    assert tracker_calls[-1] == (4000, 4000) and len(tracker_calls) > 5  # chunked
    assert checks.pieces[("values.bin", "v")].combine(4000) == crc32c(raw[8:])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_cast(src_dir: Path, dst_url: str, dtype: str) -> None:
    values = _values(src_dir)
    size = values.to(getattr(torch, dtype)).element_size()
    ops = (_copy(8 + 40, 0, 900, "float32", dtype),)
    _run(src_dir, dst_url, [FilePlan("cast.bin", b"", None, ops, 900 * size)], chunk_bytes=256)
    got = torch.frombuffer(bytearray(_read(dst_url, "cast.bin")), dtype=getattr(torch, dtype))
    assert torch.equal(got, values[10:910].to(getattr(torch, dtype)))


def test_cast_via(src_dir: Path, dst_url: str) -> None:
    values = _values(src_dir)
    seg = CastViaSegment(_copy(8, 0, 1000, "float32", "float32"), "bfloat16")
    _run(src_dir, dst_url, [FilePlan("via.bin", b"", None, (seg,), 4000)], chunk_bytes=300)
    got = torch.frombuffer(bytearray(_read(dst_url, "via.bin")), dtype=torch.float32)
    assert torch.equal(got, values.to(torch.bfloat16).float())
    assert not torch.equal(got, values)  # the rounding happened


def test_crc32_segment_sees_the_bytes_before_it(src_dir: Path, dst_url: str) -> None:
    raw = (src_dir / "values.bin").read_bytes()
    crc_seg = Crc32Segment(8, ((4, 4000), (4004, 5)), lambda crcs: b"".join(c.to_bytes(4, "little") for c in crcs))
    segs = (_copy(8, 4, 4000), ZerosSegment(5), crc_seg)
    _run(src_dir, dst_url, [FilePlan("crc.bin", b"HEAD", None, segs, 4 + 4000 + 5 + 8)], chunk_bytes=100)
    out = _read(dst_url, "crc.bin")
    assert out[-8:-4] == zlib.crc32(raw[8:]).to_bytes(4, "little")
    assert out[-4:] == zlib.crc32(bytes(5)).to_bytes(4, "little")


def test_parallel_tasks_and_crc_file_in_one_run(src_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zero_ckpt.transfer as transfer

    monkeypatch.setattr(transfer, "_SEGMENT_BYTES", 1000)  # many tasks per local file
    raw = (src_dir / "values.bin").read_bytes()
    segs, pos, want = [], 0, b""
    for i in range(8):
        segs += [_copy(8 + i * 500, pos, 500), ZerosSegment(300), LiteralSegment(b"L%d" % i)]
        want += raw[8 + i * 500: 8 + i * 500 + 500] + bytes(300) + b"L%d" % i
        pos += 802
    plain = FilePlan("p.bin", b"", None, tuple(segs), pos)
    crc = Crc32Segment(4, ((0, pos),), lambda c: c[0].to_bytes(4, "little"))
    with_crc = FilePlan("q.bin", b"", None, tuple(segs) + (crc,), pos + 4)
    assert len(transfer._segments(plain, True)) > 1 and len(transfer._segments(with_crc, True)) == 1
    _run(src_dir, str(tmp_path / "par"), [plain, with_crc], workers=4, chunk_bytes=128)
    assert (tmp_path / "par" / "p.bin").read_bytes() == want
    assert (tmp_path / "par" / "q.bin").read_bytes() == want + zlib.crc32(want).to_bytes(4, "little")


# ----- a torch.save archive from segments ------------------------------------------------------------


def test_torch_zip_archive_from_segments(src_dir: Path, dst_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from zero_ckpt.formats.deepspeed import writing as w

    values = _values(src_dir)
    copied = w._tensor("float32", (10, 20), [w._Copy("values.bin", 8 + 400, 800)])
    cast = w._tensor("bfloat16", (100,), [w._Cast("values.bin", 8, 100, "float32", "bfloat16")])
    padded = w._tensor("float32", (70,), [w._Copy("values.bin", 8, 200), ZerosSegment(80)])
    via = w._tensor("float32", (30,), [w._Cast("values.bin", 8, 30, "float32", "float32", via="float16")])
    obj = {"copied": copied, "cast": cast, "padded": padded, "via": via, "step": w._scalar_tensor(7.0),
           "meta": {"a": [1, 2.5, "x"]}}
    plan = w._file_plan(w._Job("nested/model.pt", obj))
    check_segments(plan.path, 0, plan.ops, plan.file_bytes)
    assert any(isinstance(s, Crc32Segment) for s in plan.ops)
    _run(src_dir, dst_url, [plan], chunk_bytes=64)
    data = _read(dst_url, "nested/model.pt")
    assert len(data) == plan.file_bytes
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None  # every record's CRC-32 is valid
        assert "model/data.pkl" in zf.namelist()
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    assert torch.equal(loaded["copied"], values[100:300].reshape(10, 20))
    assert torch.equal(loaded["cast"], values[:100].to(torch.bfloat16))
    assert torch.equal(loaded["padded"], torch.cat([values[:50], torch.zeros(20)]))
    assert torch.equal(loaded["via"], values[:30].half().float())
    assert loaded["step"].item() == 7.0 and loaded["meta"] == {"a": [1, 2.5, "x"]}

    # zip64 records and central directory (the limit lowered as the DeepSpeed tests do)
    monkeypatch.setattr(w, "_ZIP64_LIMIT", 200)
    plan64 = w._file_plan(w._Job("big.pt", obj))
    _run(src_dir, dst_url, [plan64], chunk_bytes=64)
    data64 = _read(dst_url, "big.pt")
    with zipfile.ZipFile(io.BytesIO(data64)) as zf:
        assert zf.testzip() is None
    assert torch.equal(torch.load(io.BytesIO(data64), weights_only=True)["copied"], loaded["copied"])


# ----- errors and rollback ----------------------------------------------------------------------------


def test_segments_that_do_not_tile_are_refused(src_dir: Path, dst_url: str) -> None:
    with pytest.raises(SegmentPlanError, match="the plan says the file has 10"):
        _run(src_dir, dst_url, [FilePlan("x.bin", b"", None, (ZerosSegment(4),), 10)])
    with pytest.raises(SegmentPlanError, match="planned at byte 7"):
        _run(src_dir, dst_url, [FilePlan("y.bin", b"ab", None, (_copy(8, 7, 4),), 6)])
    with pytest.raises(SegmentPlanError, match="not all written before it"):
        _run(src_dir, dst_url, [FilePlan("z.bin", b"", None, (Crc32Segment(4, ((0, 8),), lambda c: b"0000"),), 4)])
    assert not any(_exists(dst_url, f) for f in ("x.bin", "y.bin", "z.bin"))


def test_failure_rolls_back_every_file(src_dir: Path, dst_url: str) -> None:
    good = FilePlan("good.bin", b"", None, (LiteralSegment(b"fine"),), 4)
    wrong = Crc32Segment(4, ((0, 4),), lambda c: b"no")
    bad_render = FilePlan("bad.bin", b"", None, (LiteralSegment(b"abcd"), wrong), 8)
    with pytest.raises(SegmentPlanError, match="rendered 2 bytes, planned 4"):
        _run(src_dir, dst_url, [good, bad_render], workers=1)
    assert not _exists(dst_url, "good.bin") and not _exists(dst_url, "bad.bin")
    missing = CopyOp("nope.bin", None, 0, 0, None, 0, 0, 16, "uint8", "uint8", check_source=False)
    with pytest.raises(CheckpointError):
        _run(src_dir, dst_url, [good, FilePlan("m.bin", b"", None, (missing,), 16)], workers=2)
    assert not _exists(dst_url, "good.bin") and not _exists(dst_url, "m.bin")
