"""DCP (torch.distributed.checkpoint) low-level layer: .metadata and storage records, read and
written by byte ranges, checked against a real 2-rank FSDP2 save and against torch's own reader."""

from __future__ import annotations

import io
import math
import os
import pickle
import subprocess
import sys
import zlib

import pytest
import torch

from _dcp_fsdp2 import save_fsdp2_checkpoint
from zero_ckpt.formats.dcp.metadata import (
    DcpBytes,
    DcpChunk,
    DcpFormatError,
    DcpMetadata,
    DcpTensor,
    read_dcp_metadata,
    write_dcp_metadata,
)
from zero_ckpt.formats.dcp.records import (
    encode_bytes_item,
    encode_tensor_record,
    locate_tensor_record,
    read_bytes_item,
    tensor_record_bytes,
)
from zero_ckpt.storage import open_location

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "int64": torch.int64, "float64": torch.float64, "float8_e4m3fn": torch.float8_e4m3fn,
                 "bool": torch.bool, "uint8": torch.uint8}


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def fsdp2_ckpt(tmp_path_factory):
    """(folder, DcpMetadata, full nested state dict as torch's dcp_to_torch_save gives it)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root = tmp_path_factory.mktemp("dcp")
    path = str(root / "ckpt")
    save_fsdp2_checkpoint(path, world_size=2, steps=2)
    with open(os.path.join(path, ".metadata"), "rb") as f:
        meta = read_dcp_metadata(f.read(), os.path.join(path, ".metadata"))
    dcp_to_torch_save(path, str(root / "full.pt"))
    full = torch.load(str(root / "full.pt"), weights_only=False)
    return path, meta, full


def _lookup(full: dict, path: tuple):
    obj = full
    for key in path:
        obj = obj[key]
    return obj


def test_metadata_of_an_fsdp2_save(fsdp2_ckpt):
    path, meta, _ = fsdp2_ckpt
    assert meta.version == "1.0.0"
    assert set(meta.tensors) >= {
        "model.inp.weight", "model.out.bias", "model.scale",
        "optim.state.inp.weight.exp_avg", "optim.state.out.bias.exp_avg_sq", "optim.state.out.weight.step",
    }
    assert set(meta.bytes_items) >= {
        "optim.param_groups.0.lr", "optim.param_groups.0.betas", "optim.param_groups.0.params",
    }
    w = meta.tensors["model.inp.weight"]
    assert w.shape == (13, 8) and w.dtype == "float32"
    # FSDP2 shards dim 0 unevenly: 13 rows -> 7 + 6, each rank's chunk in its own file
    assert [(c.offsets, c.sizes) for c in w.chunks] == [((0, 0), (7, 8)), ((7, 0), (6, 8))]
    assert {c.file for c in w.chunks} == {"__0_0.distcp", "__1_0.distcp"}
    assert meta.tensors["optim.state.out.weight.step"].shape == ()
    # a rank whose dim-0 shard is empty still saves a (0-element) chunk, at offset == dim size
    gate = meta.tensors["optim.state.gate.weight.exp_avg"]
    assert [(c.offsets, c.sizes) for c in gate.chunks] == [((0, 0), (1, 5)), ((1, 0), (0, 5))]
    assert meta.planner_data["optim.state.inp.weight.exp_avg"] == ("optim", "state", "inp.weight", "exp_avg")
    assert meta.planner_data["optim.param_groups.0.lr"] == ("optim", "param_groups", 0, "lr")
    assert meta.storage_meta is not None and meta.storage_meta.checkpoint_id == path


def test_every_chunk_is_located_byte_exactly(fsdp2_ckpt):
    path, meta, full = fsdp2_ckpt
    loc = open_location(path)
    checked = 0
    for fqn, t in meta.tensors.items():
        whole = _lookup(full, meta.planner_data[fqn])
        assert tuple(whole.shape) == t.shape and whole.dtype == _TORCH_DTYPES[t.dtype]
        for c in t.chunks:
            start, nbytes = locate_tensor_record(
                loc, c.file, c.byte_offset, c.byte_length, t.dtype, c.numel, c.sizes, what=fqn
            )
            assert c.byte_offset < start and start + nbytes <= c.byte_offset + c.byte_length
            want = whole
            for dim, (o, s) in enumerate(zip(c.offsets, c.sizes)):
                want = want.narrow(dim, o, s)
            assert loc.read_range(c.file, start, start + nbytes) == _raw(want), fqn
            checked += 1
    assert checked > len(meta.tensors)  # sharded tensors have several chunks


def test_bytes_items_decode_as_torch_loads_them(fsdp2_ckpt):
    path, meta, full = fsdp2_ckpt
    loc = open_location(path)
    for fqn, b in meta.bytes_items.items():
        got = read_bytes_item(loc, b.file, b.byte_offset, b.byte_length, what=fqn)
        raw = loc.read_range(b.file, b.byte_offset, b.byte_offset + b.byte_length)
        assert got == torch.load(io.BytesIO(raw), weights_only=False), fqn
        assert got == _lookup(full, meta.planner_data[fqn]), fqn
    assert read_bytes_item(loc, **_where(meta.bytes_items["optim.param_groups.0.params"])) == [
        "inp.weight", "inp.bias", "norm.weight", "norm.bias", "out.weight", "out.bias",
        "gate.weight", "gate.bias",
    ]


def _where(b: DcpBytes) -> dict:
    return {"rel": b.file, "byte_offset": b.byte_offset, "byte_length": b.byte_length}


def test_written_metadata_is_what_torch_wrote(fsdp2_ckpt):
    path, meta, _ = fsdp2_ckpt
    with open(os.path.join(path, ".metadata"), "rb") as f:
        original = pickle.load(f)
    rewritten = pickle.loads(write_dcp_metadata(meta))
    assert type(rewritten) is type(original)
    for name in ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"):
        assert getattr(rewritten, name) == getattr(original, name), name
    # MetadataIndex.index is not compared by ==; it is written as the chunk's position too
    assert {k: k.index for k in rewritten.storage_data} == {k: k.index for k in original.storage_data}
    assert read_dcp_metadata(write_dcp_metadata(meta), "x") == meta


def test_rewritten_checkpoint_loads_in_torch(fsdp2_ckpt, tmp_path):
    """Every record re-encoded by our writer into new files, with our .metadata: torch's DCP
    reader gives the same state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path, meta, full = fsdp2_ckpt
    src = open_location(path)
    out = tmp_path / "rewritten"
    out.mkdir()
    files: dict[str, bytearray] = {}
    tensors, items = {}, {}
    for fqn, t in meta.tensors.items():
        chunks = []
        for i, c in enumerate(t.chunks):
            start, nbytes = locate_tensor_record(src, c.file, c.byte_offset, c.byte_length, t.dtype, c.numel)
            data = src.read_range(c.file, start, start + nbytes)
            layout = encode_tensor_record(t.dtype, c.sizes)
            name = f"zc_{i % 2}.distcp"
            buf = files.setdefault(name, bytearray())
            at = len(buf)
            buf += layout.prefix + data + layout.suffix(zlib.crc32(data))
            assert len(buf) - at == layout.total_bytes
            chunks.append(DcpChunk(c.offsets, c.sizes, name, at, layout.total_bytes))
        tensors[fqn] = DcpTensor(fqn, t.shape, t.dtype, tuple(chunks))
    for fqn, b in meta.bytes_items.items():
        record = encode_bytes_item(read_bytes_item(src, **_where(b)))
        buf = files.setdefault("zc_bytes.distcp", bytearray())
        items[fqn] = DcpBytes(fqn, "zc_bytes.distcp", len(buf), len(record))
        buf += record
    for name, buf in files.items():
        (out / name).write_bytes(bytes(buf))
    (out / ".metadata").write_bytes(write_dcp_metadata(DcpMetadata(tensors, items, meta.planner_data, meta.version)))
    dcp_to_torch_save(str(out), str(tmp_path / "again.pt"))
    again = torch.load(str(tmp_path / "again.pt"), weights_only=False)
    _assert_same(again, full)


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int64", "float8_e4m3fn", "bool"])
@pytest.mark.parametrize("shape", [(3, 5), (), (0, 4), (7,), (2, 3, 4)])
def test_written_tensor_record_loads_exactly(dtype, shape):
    n = math.prod(shape)
    t = (torch.arange(n, dtype=torch.float32) * 0.75 - 3).to(_TORCH_DTYPES[dtype]).reshape(shape)
    data = _raw(t)
    record = tensor_record_bytes(dtype, shape, data)
    layout = encode_tensor_record(dtype, shape)
    assert len(record) == layout.total_bytes
    assert record[layout.data_offset : layout.data_offset + layout.data_nbytes] == data
    back = torch.load(io.BytesIO(record), weights_only=True)
    assert back.dtype == t.dtype and back.shape == t.shape and _raw(back) == data
    import zipfile

    assert zipfile.ZipFile(io.BytesIO(record)).testzip() is None  # every CRC-32 right


def test_located_record_written_by_us(tmp_path):
    prefix = b"x" * 37
    record = tensor_record_bytes("float32", (2, 3), bytes(range(24)))
    (tmp_path / "f.distcp").write_bytes(prefix + record + b"tail")
    loc = open_location(str(tmp_path))
    assert locate_tensor_record(loc, "f.distcp", 37, len(record), "float32", 6) == (
        37 + encode_tensor_record("float32", (2, 3)).data_offset, 24,
    )
    with pytest.raises(DcpFormatError, match="bfloat16"):
        locate_tensor_record(loc, "f.distcp", 37, len(record), "bfloat16", 6)
    with pytest.raises(DcpFormatError, match="shape"):
        locate_tensor_record(loc, "f.distcp", 37, len(record), "float32", 5)
    with pytest.raises(DcpFormatError, match="truncated"):
        locate_tensor_record(loc, "f.distcp", 37, len(record) + 10, "float32", 6)


@pytest.mark.parametrize("view", ["narrow", "transpose", "offset"])
def test_a_record_not_covering_its_storage_is_refused(tmp_path, view):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = {"narrow": base[:, :2], "transpose": base.t(), "offset": base[1:]}[view]
    buf = io.BytesIO()
    torch.save(t, buf)
    (tmp_path / "f.distcp").write_bytes(buf.getvalue())
    loc = open_location(str(tmp_path))
    with pytest.raises(DcpFormatError, match="contiguously"):
        locate_tensor_record(loc, "f.distcp", 0, len(buf.getvalue()), "float32", t.numel())


def test_bytes_item_round_trip():
    for obj in [0.001, 7, (0.9, 0.999), ["a.weight", "b.bias"], None, True, {"k": [1, (2, "x")]}]:
        record = encode_bytes_item(obj)
        assert torch.load(io.BytesIO(record), weights_only=True) == obj
        assert torch.load(io.BytesIO(record), weights_only=False) == obj
    with pytest.raises(DcpFormatError, match="plain data"):
        encode_bytes_item({"x": object()})


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_metadata_is_refused(tmp_path):
    marker = tmp_path / "ran"
    for payload in (_Evil(str(marker)), {"state_dict_metadata": _Evil(str(marker))}):
        data = pickle.dumps(payload)
        with pytest.raises(DcpFormatError, match=r"bad/\.metadata: .*(posix|os)\.system"):
            read_dcp_metadata(data, "bad/.metadata")
    assert not marker.exists()
    with pytest.raises(DcpFormatError, match="bad/.metadata"):
        read_dcp_metadata(b"\x80\x02garbage", "bad/.metadata")


def _meta_with(**changes) -> bytes:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata,
    )

    info = _StorageInfo(changes.get("path", "__0_0.distcp"), 0, 10, changes.get("transforms"))
    md = Metadata(
        state_dict_metadata={"w": TensorStorageMetadata(
            TensorProperties(dtype=torch.float32), torch.Size([4]),
            [ChunkStorageMetadata(torch.Size([0]), torch.Size([4]))])},
        storage_data={MetadataIndex("w", changes.get("offset", [0]), 0): info},
    )
    return pickle.dumps(md)


def test_bad_metadata_refused_with_reasons():
    meta = read_dcp_metadata(_meta_with(), "m")
    assert meta.tensors["w"].chunks == (DcpChunk((0,), (4,), "__0_0.distcp", 0, 10),)
    with pytest.raises(DcpFormatError, match="transforms"):
        read_dcp_metadata(_meta_with(transforms=["zstd"]), "m")
    with pytest.raises(DcpFormatError, match="not a plain file"):
        read_dcp_metadata(_meta_with(path="../../etc/passwd"), "m")
    with pytest.raises(DcpFormatError, match="no storage_data entry"):
        read_dcp_metadata(_meta_with(offset=[1]), "m")


def test_dcp_layer_imports_no_torch():
    code = ("import sys, zero_ckpt.formats.dcp.metadata, zero_ckpt.formats.dcp.records; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
