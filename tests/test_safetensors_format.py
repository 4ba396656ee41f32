"""The safetensors header codec, checked against the real ``safetensors`` library both ways."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save, save_file

from zero_ckpt.errors import CheckpointError, CorruptShardError
from zero_ckpt.safetensors_format import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorEntry,
    build_header,
    dtype_size,
    from_safetensors_dtype,
    header_length,
    parse_header,
    to_safetensors_dtype,
)

PATH = "s3://bucket/ckpt/shards/rank-00001-of-00004.safetensors"


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "g0.master": torch.randn(7, generator=g),
        "g0.exp_avg": torch.randn(7, generator=g).to(torch.bfloat16),
        "g0.exp_avg_sq": torch.randn(3, 5, generator=g).to(torch.float16),
        "g1.step_counts": torch.arange(-4, 5, dtype=torch.int64),
        "g1.mask": torch.tensor([True, False, True, True, False]),
        "g1.empty": torch.zeros(0, dtype=torch.float32),
        "g2.empty_bf16": torch.zeros(0, 3, dtype=torch.bfloat16),
        "g2.scalar": torch.tensor(2.5, dtype=torch.float64),
        "g2.bytes": torch.arange(0, 250, 7, dtype=torch.uint8),
        "g2.i32": torch.tensor([[-(2**31), 2**31 - 1]], dtype=torch.int32),
        "g2.i16": torch.tensor([-3, 3], dtype=torch.int16),
        "g2.i8": torch.tensor([-128, 127], dtype=torch.int8),
    }


def write_ours(path, tensors: dict[str, torch.Tensor], metadata=None) -> SafetensorsHeader:
    prefix, header = build_header(
        [(name, dtype_name(t), t.shape) for name, t in tensors.items()], metadata
    )
    with open(path, "wb") as f:
        f.write(prefix)
        for t in tensors.values():
            f.write(tensor_bytes(t))
    return header


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert tensor_bytes(a) == tensor_bytes(b)


# ----- build_header -> safetensors ------------------------------------------------------------


def test_build_header_loads_with_safetensors(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "ours.safetensors"
    meta = {"format": "pt", "zero_ckpt.rank": "1", "note": "é"}
    header = write_ours(path, tensors, meta)
    assert path.stat().st_size == header.file_bytes
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata() == meta
        for name, t in tensors.items():
            assert_same(f.get_tensor(name), t)
            # Ranged read through safetensors' own slicing agrees too (1-D, non-empty only).
            if t.dim() == 1 and t.numel() > 2:
                assert_same(f.get_slice(name)[1:3], t[1:3])


def test_build_header_loads_without_metadata(tmp_path):
    tensors = {"a": torch.arange(5, dtype=torch.float32), "b": torch.zeros(0, dtype=torch.int64)}
    path = tmp_path / "plain.safetensors"
    write_ours(path, tensors)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() is None
        assert_same(f.get_tensor("a"), tensors["a"])
        assert_same(f.get_tensor("b"), tensors["b"])


def test_build_header_only_empty_tensors_and_no_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    write_ours(path, {"e": torch.zeros(0)}, {"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["e"]
        assert f.get_tensor("e").shape == (0,)
    path = tmp_path / "none.safetensors"
    header = write_ours(path, {})
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == []
    assert header.tensors == {} and header.file_bytes == header.data_start


def test_build_header_exact_bytes():
    prefix, header = build_header([("a", "float32", [2])])
    body = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    assert len(body) == 54
    assert prefix == struct.pack("<Q", 56) + body + b"  "
    assert header == SafetensorsHeader(
        {"a": TensorEntry("a", "float32", (2,), 64, 72)}, {}, 64, 72
    )

    prefix, header = build_header(
        [("x", "bfloat16", (2, 3)), ("y", "bool", (0,)), ("z", "int64", ())], {"k": "v"}
    )
    body = (
        b'{"__metadata__":{"k":"v"},'
        b'"x":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},'
        b'"y":{"dtype":"BOOL","shape":[0],"data_offsets":[12,12]},'
        b'"z":{"dtype":"I64","shape":[],"data_offsets":[12,20]}}'
    )
    pad = -len(body) % 8
    assert prefix == struct.pack("<Q", len(body) + pad) + body + b" " * pad
    ds = 8 + len(body) + pad
    assert header.data_start == ds and header.file_bytes == ds + 20
    assert header.metadata == {"k": "v"}
    assert header.tensors == {
        "x": TensorEntry("x", "bfloat16", (2, 3), ds, ds + 12),
        "y": TensorEntry("y", "bool", (0,), ds + 12, ds + 12),
        "z": TensorEntry("z", "int64", (), ds + 12, ds + 20),
    }
    assert [e.nbytes for e in header.tensors.values()] == [12, 0, 8]
    assert [e.numel for e in header.tensors.values()] == [6, 0, 1]


def test_build_header_is_deterministic():
    spec = [("b", "float32", (3,)), ("a", "float16", (4, 1))]
    assert build_header(spec, {"m": "1"}) == build_header(list(spec), {"m": "1"})


# Tensor names with control characters (category Cc) are refused by parse_header.
NAME = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20).filter(
    lambda s: s != "__metadata__"
)
TENSOR_SPECS = st.lists(
    st.tuples(NAME, st.sampled_from(sorted(DTYPE_SIZES)), st.lists(st.integers(0, 6), max_size=3)),
    max_size=8,
    unique_by=lambda t: t[0],
)
METADATA = st.one_of(st.none(), st.dictionaries(NAME, st.text(max_size=10), max_size=3))


@settings(max_examples=150, deadline=None)
@given(TENSOR_SPECS, METADATA)
def test_build_then_parse_round_trip_and_alignment(specs, metadata):
    prefix, header = build_header(specs, metadata)
    assert len(prefix) % 8 == 0
    assert header.data_start == len(prefix)
    (n,) = struct.unpack("<Q", prefix[:8])
    assert n == len(prefix) - 8
    assert prefix[8:].rstrip(b" ").endswith(b"}")
    # Tensors laid out in the given order without gaps.
    cursor = header.data_start
    for name, dtype, shape in specs:
        e = header.tensors[name]
        assert (e.name, e.dtype, e.shape, e.start) == (name, dtype, tuple(shape), cursor)
        n_elems = 1
        for d in shape:
            n_elems *= d
        assert e.nbytes == n_elems * DTYPE_SIZES[dtype]
        cursor = e.end
    assert header.file_bytes == cursor
    assert list(header.tensors) == [s[0] for s in specs]
    assert header.metadata == (metadata or {})
    parsed = parse_header(prefix, PATH, file_bytes=header.file_bytes)
    assert parsed == header
    # Extra bytes after the header (the data) do not change the parse.
    assert parse_header(prefix + b"\0" * 64, PATH) == header


def test_build_header_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        build_header([("a", "float32", (1,)), ("a", "float32", (2,))])
    with pytest.raises(ValueError, match="duplicate tensor name '__metadata__'"):
        build_header([("__metadata__", "float32", (1,))])
    with pytest.raises(ValueError, match="duplicate tensor name '__metadata__'"):
        build_header([("__metadata__", "float32", (1,))], {"k": "v"})
    with pytest.raises(ValueError, match="unsupported dtype 'complex64'"):
        build_header([("a", "complex64", (1,))])


# ----- parse_header of files safetensors wrote ---------------------------------------------------


def test_parse_header_of_save_file(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "theirs.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "step": "12"})
    data = path.read_bytes()
    n = header_length(data[:8], str(path))
    header = parse_header(data[: 8 + n], str(path), file_bytes=len(data))
    assert header.data_start == 8 + n
    assert header.file_bytes == len(data)
    assert header.metadata == {"format": "pt", "step": "12"}
    assert sorted(header.tensors) == sorted(tensors)
    for name, t in tensors.items():
        e = header.tensors[name]
        assert e.dtype == dtype_name(t)
        assert e.shape == tuple(t.shape)
        assert data[e.start : e.end] == tensor_bytes(t)


def test_parse_header_of_in_memory_save():
    tensors = {"w": torch.arange(12, dtype=torch.float16).reshape(3, 4), "e": torch.zeros(0, dtype=torch.bool)}
    data = save(tensors)
    header = parse_header(data, "mem")  # the whole file works as the prefix too
    assert header.metadata == {}
    for name, t in tensors.items():
        e = header.tensors[name]
        assert data[e.start : e.end] == tensor_bytes(t)


# ----- dtype helpers ---------------------------------------------------------------------------


def test_dtype_tables_agree_with_torch():
    for name, size in DTYPE_SIZES.items():
        assert dtype_size(name) == size
        assert torch.empty(0, dtype=getattr(torch, name)).element_size() == size
        assert from_safetensors_dtype(to_safetensors_dtype(name)) == name
    assert to_safetensors_dtype("bfloat16") == "BF16"
    assert to_safetensors_dtype("bool") == "BOOL"
    with pytest.raises(ValueError, match="unsupported dtype 'float128'"):
        dtype_size("float128")
    with pytest.raises(ValueError, match="unsupported dtype 'torch.float32'"):
        to_safetensors_dtype("torch.float32")
    with pytest.raises(ValueError, match="unsupported safetensors dtype 'F128'"):
        from_safetensors_dtype("F128")


# ----- corrupt inputs ---------------------------------------------------------------------------


def framed(doc_or_bytes) -> bytes:
    body = doc_or_bytes if isinstance(doc_or_bytes, bytes) else json.dumps(doc_or_bytes).encode()
    return struct.pack("<Q", len(body)) + body


def corrupt(prefix: bytes, file_bytes=None) -> CorruptShardError:
    with pytest.raises(CorruptShardError) as info:
        parse_header(prefix, PATH, file_bytes)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, CheckpointError)
    assert err.path == PATH
    assert str(err).startswith(f"{PATH}: ")
    return err


@pytest.mark.parametrize("prefix", [b"", b"\x01", b"\x10\x00\x00\x00\x00\x00\x00"])
def test_truncated_length_prefix(prefix):
    err = corrupt(prefix)
    assert f"file is {len(prefix)} bytes, too short to be safetensors" in str(err)
    with pytest.raises(CorruptShardError, match="too short"):
        header_length(prefix, PATH)


@pytest.mark.parametrize("n", [MAX_HEADER_BYTES + 1, 2**40, 2**64 - 1])
def test_absurd_header_length(n):
    first8 = struct.pack("<Q", n)
    err = corrupt(first8 + b"{}")
    assert f"header length {n} is not plausible" in str(err)
    with pytest.raises(CorruptShardError, match="not plausible") as info:
        header_length(first8, PATH)
    assert info.value.path == PATH


def test_header_length_at_the_limit_is_accepted():
    assert header_length(struct.pack("<Q", MAX_HEADER_BYTES), PATH) == MAX_HEADER_BYTES
    assert header_length(struct.pack("<Q", 24) + b"extra", PATH) == 24


def test_header_longer_than_prefix():
    body = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    full = framed(body)
    err = corrupt(full[:-5])
    assert f"header says {len(body)} bytes but only {len(body) - 5} are there" in str(err)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"", b"\xff\xfe{}", b'{"a": {"dtype": "F32",', b"{} trailing"],
)
def test_invalid_json(body):
    assert "header is not valid JSON" in str(corrupt(framed(body)))


@pytest.mark.parametrize("body", [b"[]", b"1", b'"x"', b"null"])
def test_header_not_an_object(body):
    assert str(corrupt(framed(body))) == f"{PATH}: header is not a JSON object"


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},  # short
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]},  # long
        {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 24]},  # F32-sized
        {"dtype": "I64", "shape": [], "data_offsets": [0, 0]},  # scalar has one element
        {"dtype": "F32", "shape": [0], "data_offsets": [0, 4]},  # empty tensor with bytes
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},  # reversed
    ],
)
def test_offsets_do_not_match_shape_and_dtype(entry):
    err = corrupt(framed({"t": entry}))
    assert f"tensor 't' spans bytes [{entry['data_offsets'][0]}, {entry['data_offsets'][1]})" in str(err)
    assert "does not match shape" in str(err)


def test_negative_offset_is_malformed():
    err = corrupt(framed({"t": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}))
    assert str(err) == (
        f"{PATH}: tensor 't' has a malformed header entry (shape and data_offsets must be "
        "non-negative integers)"
    )


@pytest.mark.parametrize(
    "entry",
    [
        {"shape": [1], "data_offsets": [0, 4]},  # no dtype
        {"dtype": "F32", "data_offsets": [0, 4]},  # no shape
        {"dtype": "F32", "shape": [1]},  # no offsets
        {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]},  # unknown dtype
        {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},  # unhashable dtype
        {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
        {"dtype": "F32", "shape": [1], "data_offsets": None},
        "F32",
        None,
        [1, 2],
    ],
)
def test_malformed_entry(entry):
    assert "tensor 't' has a malformed header entry" in str(corrupt(framed({"t": entry})))


def test_header_needs_more_bytes_than_the_file_has():
    prefix, header = build_header([("a", "float32", (4,)), ("b", "int64", (3,))])
    assert parse_header(prefix, PATH, file_bytes=header.file_bytes) == header
    err = corrupt(prefix, file_bytes=header.file_bytes - 1)
    assert str(err) == (
        f"{PATH}: header needs {header.file_bytes} bytes but the file has "
        f"{header.file_bytes - 1} (truncated?)"
    )
    assert err.expected == header.file_bytes and err.actual == header.file_bytes - 1
    corrupt(prefix, file_bytes=0)


def test_truncated_real_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(100)}, str(path))
    data = path.read_bytes()[:-1]
    n = header_length(data[:8], PATH)
    err = corrupt(data[: 8 + n], file_bytes=len(data))
    assert "(truncated?)" in str(err)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]},
    ],
)
def test_negative_dimensions_are_corrupt(entry):
    corrupt(framed({"t": entry}))


@pytest.mark.parametrize("metadata", [[1], "ab", {"k": 1}, {"k": None}])
def test_malformed_metadata_is_corrupt(metadata):
    corrupt(framed({"__metadata__": metadata}))


@pytest.mark.parametrize(
    "body",
    [
        b'{"t":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}',
        b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,Infinity]}}',
    ],
)
def test_infinity_in_header_is_corrupt(body):
    corrupt(framed(body))


def test_control_characters_in_tensor_names_are_refused() -> None:
    prefix, _ = build_header([("bad\x1b[2Jname", "float32", (1,))])
    with pytest.raises(CorruptShardError, match="control character"):
        parse_header(prefix, "x.safetensors")


def test_deeply_nested_header_is_refused() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    prefix = struct.pack("<Q", len(body)) + body
    with pytest.raises(CorruptShardError, match="x.safetensors: header"):
        parse_header(prefix, "x.safetensors")
