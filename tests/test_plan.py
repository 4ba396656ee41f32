"""Pure planning tests (no files): exact CopyOps for a hand-worked case, and properties over
random layouts: every output file's data section is tiled exactly, every source byte is read
exactly once, and every op moves elements to the same flat index they came from."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zero_core.layout import compute_partition_numel
from zero_ckpt.errors import CorruptShardError, LayoutMismatchError
from zero_ckpt.manifest import FileMeta, GroupMeta, Manifest, ParamMeta, shard_path
from zero_ckpt.plan import (
    CopyOp,
    FilePlan,
    plan_consolidate,
    plan_partition_read,
    plan_reshard,
    retarget_manifest,
    shard_header,
)
from zero_ckpt.safetensors_format import dtype_size
from zero_ckpt.view import ModelTensor, SourceView, rank_extents

F32, BF16 = "float32", "bfloat16"


def _manifest(
    groups_spec: list[list[tuple[str, tuple[int, ...], str]]],
    world_size: int,
    align: int = 1,
    state_dtypes: list[dict[str, str]] | None = None,
    model_file: FileMeta | None = None,
) -> Manifest:
    """A manifest from ``[(name, shape, dtype)]`` per group; ``state_dtypes[g]`` maps each of
    group g's state keys to its dtype (fp32 keys are listed with ``float32``)."""
    groups = []
    for gi, spec in enumerate(groups_spec):
        params, offset = [], 0
        for name, shape, dtype in spec:
            params.append(ParamMeta(name, tuple(shape), dtype, offset))
            offset += params[-1].numel
        states = (state_dtypes or [{}] * len(groups_spec))[gi]
        groups.append(
            GroupMeta(
                numel=offset,
                partition_numel=compute_partition_numel(offset, world_size, align),
                align=align,
                params=tuple(params),
                state_keys=tuple(states),
                state_dtypes={k: d for k, d in states.items() if d != F32},
            )
        )
    shards = tuple(FileMeta(shard_path(r, world_size), 0, "crc32c:00000000", r) for r in range(world_size))
    return Manifest(world_size, 2, F32, tuple(groups), shards, model_file=model_file).validate()


def _headers(m: Manifest):
    return {r: shard_header(m, r)[1] for r in range(m.world_size)}


def _view(m: Manifest, headers, model: tuple[ModelTensor, ...] = ()) -> SourceView:
    """The format-v1 view of a manifest whose shards have the given headers."""
    return SourceView("zero-ckpt", "mem://ckpt", m, rank_extents(m, headers), model)


def _src(r: int, n: int = 4) -> str:
    return shard_path(r, n)


# ----- hand-worked case: one group, params [5, 7, 3], N=4 align 1 (partition 4) ------------------
#
# flat:     a = [0, 5)   b = [5, 12)   c = [12, 15)         numel 15
# N=4:      rank0 [0,4)  rank1 [4,8)  rank2 [8,12)  rank3 [12,15)   (partition 4, 1 padding)
# M=3:      rank0 [0,5)  rank1 [5,10) rank2 [10,15)                 (partition 5)

HAND = [[("a", (5,), F32), ("b", (7,), BF16), ("c", (3,), F32)]]


def test_hand_worked_reshard_4_to_3() -> None:
    m = _manifest(HAND, 4)
    src = _headers(m)
    assert [src[r].tensors["g0.master"].numel for r in range(4)] == [4, 4, 4, 3]
    plan = plan_reshard(_view(m, src), 3)
    assert [f.path for f in plan.files] == [shard_path(r, 3) for r in range(3)]
    assert plan.target.world_size == 3 and plan.target.groups[0].partition_numel == 5

    def op(dst_rank, src_rank, src_offset, dst_offset, numel):
        s = src[src_rank].tensors["g0.master"].start
        d = plan.files[dst_rank].header.tensors["g0.master"].start
        return CopyOp(_src(src_rank), "g0.master", src_offset, s + src_offset,
                      "g0.master", dst_offset, d + dst_offset, numel, F32, F32)

    # offsets in bytes (fp32: 4 bytes per element)
    assert plan.files[0].ops == (op(0, 0, 0, 0, 4), op(0, 1, 0, 16, 1))
    assert plan.files[1].ops == (op(1, 1, 4, 0, 3), op(1, 2, 0, 12, 2))
    assert plan.files[2].ops == (op(2, 2, 8, 0, 2), op(2, 3, 0, 8, 3))
    for r, f in enumerate(plan.files):
        hb, header = shard_header(plan.target, r)
        assert f.header_bytes == hb and f.rank == r
        assert f.file_bytes == len(hb) + 5 * 4 == header.file_bytes
        assert f.data_bytes == 20


def test_hand_worked_reshard_with_a_bfloat16_state() -> None:
    m = _manifest(HAND, 4, state_dtypes=[{"exp_avg": BF16}])
    src = _headers(m)
    plan = plan_reshard(_view(m, src), 3)

    def op(dst_rank, src_rank, key, src_offset, dst_offset, numel, dtype):
        name = f"g0.{key}"
        s = src[src_rank].tensors[name].start
        d = plan.files[dst_rank].header.tensors[name].start
        return CopyOp(_src(src_rank), name, src_offset, s + src_offset, name, dst_offset,
                      d + dst_offset, numel, dtype, dtype)

    # master first, then exp_avg (2 bytes per element)
    assert plan.files[1].ops == (
        op(1, 1, "master", 4, 0, 3, F32), op(1, 2, "master", 0, 12, 2, F32),
        op(1, 1, "exp_avg", 2, 0, 3, BF16), op(1, 2, "exp_avg", 0, 6, 2, BF16),
    )
    assert plan.files[2].ops == (
        op(2, 2, "master", 8, 0, 2, F32), op(2, 3, "master", 0, 8, 3, F32),
        op(2, 2, "exp_avg", 4, 0, 2, BF16), op(2, 3, "exp_avg", 0, 4, 3, BF16),
    )
    assert plan.files[2].file_bytes == plan.files[2].header.data_start + 5 * 4 + 5 * 2


def test_hand_worked_consolidate() -> None:
    m = _manifest(HAND, 4)
    src = _headers(m)
    plan = plan_consolidate(_view(m, src))
    assert plan.documents == {}
    (f,) = plan.files
    assert f.path == "model.safetensors"
    # default dtype: each param's recorded model dtype (b is bfloat16)
    assert {n: (e.dtype, e.shape) for n, e in f.header.tensors.items()} == {
        "a": (F32, (5,)), "b": (BF16, (7,)), "c": (F32, (3,)),
    }
    assert json.loads(f.header_bytes[8:])["__metadata__"] == {"format": "pt"}

    def op(name, src_rank, src_offset, dst_offset, numel, dst_dtype):
        s = src[src_rank].tensors["g0.master"].start
        d = f.header.tensors[name].start
        return CopyOp(_src(src_rank), "g0.master", src_offset, s + src_offset, name, dst_offset,
                      d + dst_offset, numel, F32, dst_dtype)

    # laid out as safetensors' serializer does: by dtype (F32 before BF16), then by name
    assert list(f.header.tensors) == ["a", "c", "b"]
    assert f.ops == (
        op("a", 0, 0, 0, 4, F32), op("a", 1, 0, 16, 1, F32),
        op("c", 3, 0, 0, 3, F32),
        op("b", 1, 4, 0, 3, BF16), op("b", 2, 0, 6, 4, BF16),
    )
    assert f.file_bytes == f.header.data_start + 5 * 4 + 7 * 2 + 3 * 4


def test_hand_worked_consolidate_split_and_dtype() -> None:
    m = _manifest(HAND, 4)
    # float16 everywhere: a 10 bytes, b 14, c 6 -> limit 24: [a, b] would be 24 -> fits; c alone
    plan = plan_consolidate(_view(m, _headers(m)), dtype="float16", max_shard_size=24)
    assert [f.path for f in plan.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [list(f.header.tensors) for f in plan.files] == [["a", "b"], ["c"]]
    index = json.loads(plan.documents["model.safetensors.index.json"])
    assert index == {
        "metadata": {"total_size": 30},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                       "c": "model-00002-of-00002.safetensors"},
    }
    assert {op.dst_dtype for f in plan.files for op in f.ops} == {"float16"}
    # a tensor larger than the limit gets a file of its own
    plan = plan_consolidate(_view(m, _headers(m)), max_shard_size=1)
    assert [list(f.header.tensors) for f in plan.files] == [["a"], ["b"], ["c"]]


def test_hand_worked_consolidate_with_optimizer() -> None:
    m = _manifest(HAND, 4, state_dtypes=[{"exp_avg": BF16}])
    src = _headers(m)
    plan = plan_consolidate(_view(m, src), include_optimizer=True)
    assert [f.path for f in plan.files] == ["model.safetensors", "optimizer.safetensors"]
    opt = plan.files[1]
    assert list(opt.header.tensors) == ["a.master", "b.master", "c.master", "a.exp_avg", "b.exp_avg", "c.exp_avg"]
    assert opt.header.tensors["b.master"].dtype == F32  # stored dtype, not the model dtype
    assert opt.header.tensors["b.exp_avg"].dtype == BF16
    s2 = src[2].tensors["g0.exp_avg"].start
    d = opt.header.tensors["b.exp_avg"].start
    assert CopyOp(_src(2), "g0.exp_avg", 0, s2, "b.exp_avg", 6, d + 6, 4, BF16, BF16) in opt.ops
    meta = json.loads(plan.documents["optimizer.json"])
    assert meta["groups"][0]["params"] == ["a", "b", "c"]
    assert meta["groups"][0]["state_keys"] == ["master", "exp_avg"]


def test_hand_worked_partition_read() -> None:
    m = _manifest(HAND, 4, state_dtypes=[{"exp_avg": BF16}])
    src = _headers(m)

    def op(src_rank, key, src_offset, dst_offset, numel, dtype):
        name = f"g0.{key}"
        s = src[src_rank].tensors[name].start
        return CopyOp(_src(src_rank), name, src_offset, s + src_offset, key, dst_offset, dst_offset,
                      numel, dtype, dtype)

    # world size 3, rank 1: flat [5, 10)
    read = plan_partition_read(_view(m, src), 3, 1)
    assert read.real_numel == (5,)
    assert read.ops == ((
        op(1, "master", 4, 0, 3, F32), op(2, "master", 0, 12, 2, F32),
        op(1, "exp_avg", 2, 0, 3, BF16), op(2, "exp_avg", 0, 6, 2, BF16),
    ),)
    # align 4 overrides the recorded 1: partition 8, rank 1 = [8, 15), rank 2 holds only padding
    read = plan_partition_read(_view(m, src), 3, 1, align=4)
    assert read.real_numel == (7,)
    assert read.ops[0][:2] == (op(2, "master", 0, 0, 4, F32), op(3, "master", 0, 16, 3, F32))
    read = plan_partition_read(_view(m, src), 3, 2, align=4)
    assert read.real_numel == (0,) and read.ops == ((),)


def test_model_file_is_planned_tensor_by_tensor() -> None:
    m = _manifest(HAND, 2)
    model = (
        ModelTensor.whole("z.buf", F32, (2, 3), "model.safetensors", 200, "z.buf"),
        ModelTensor.whole("a.frozen", BF16, (4,), "model.safetensors", 100, "a.frozen"),
    )
    plan = plan_reshard(_view(m, _headers(m), model), 5)
    last = plan.files[-1]
    assert last.path == "model.safetensors" and last.rank is None
    assert sorted(last.header.tensors) == ["a.frozen", "z.buf"]  # sorted by name, as saves write it
    a, z = last.header.tensors["a.frozen"], last.header.tensors["z.buf"]
    assert last.ops == (
        CopyOp("model.safetensors", "a.frozen", 0, 100, "a.frozen", 0, a.start, 4, BF16, BF16),
        CopyOp("model.safetensors", "z.buf", 0, 200, "z.buf", 0, z.start, 6, F32, F32),
    )
    assert last.file_bytes == len(last.header_bytes) + 4 * 2 + 6 * 4


def test_plan_rejects_bad_targets() -> None:
    m = _manifest(HAND, 4)
    with pytest.raises(LayoutMismatchError, match="at least 1, got 0"):
        plan_reshard(_view(m, _headers(m)), 0)
    with pytest.raises(LayoutMismatchError, match="at least 1, got -2"):
        retarget_manifest(m, -2)
    with pytest.raises(LayoutMismatchError, match="'int8' is not a floating dtype"):
        plan_consolidate(_view(m, _headers(m)), dtype="int8")
    with pytest.raises(LayoutMismatchError, match="must be positive, got 0"):
        plan_consolidate(_view(m, _headers(m)), max_shard_size=0)


# ----- properties over random layouts ------------------------------------------------------------

_DTYPES = st.sampled_from([F32, BF16, "float16"])
_group = st.lists(st.tuples(st.integers(0, 40), _DTYPES), min_size=0, max_size=5)
_states = st.dictionaries(st.sampled_from(["exp_avg", "exp_avg_sq", "momentum_buffer"]),
                          st.sampled_from([F32, BF16]), max_size=3)
_case = st.fixed_dictionaries({
    "groups": st.lists(st.tuples(_group, _states), min_size=1, max_size=3),
    "n": st.integers(1, 12),
    "m": st.integers(1, 12),
    "align": st.sampled_from([1, 2, 4, 8, 64]),
})


def _case_manifest(case) -> Manifest:
    spec = [[(f"g{gi}.p{pi}", (numel,), dt) for pi, (numel, dt) in enumerate(params)]
            for gi, (params, _) in enumerate(case["groups"])]
    states = [dict(s) for _, s in case["groups"]]
    return _manifest(spec, case["n"], case["align"], states)


def _assert_tiles(f: FilePlan) -> None:
    """The ops, sorted by destination, cover [len(header), file_bytes) exactly once."""
    ops = sorted(f.ops, key=lambda o: o.dst_start)
    pos = len(f.header_bytes)
    if f.header is not None:
        assert f.header.data_start == pos
    for op in ops:
        assert op.numel > 0
        assert op.dst_start == pos, f"{f.path}: gap or overlap at byte {pos}"
        if f.header is not None:
            entry = f.header.tensors[op.dst_tensor]
            assert op.dst_start == entry.start + op.dst_offset
            assert op.dst_start + op.dst_nbytes <= entry.end
            assert entry.dtype == op.dst_dtype
        pos += op.dst_nbytes
    assert pos == f.file_bytes


def _src_intervals(ops) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for op in ops:
        out[op.src_file].append((op.src_start, op.src_start + op.src_nbytes))
    return out


def _assert_read_once(intervals: list[tuple[int, int]], start: int, end: int, what: str) -> None:
    pos = start
    for lo, hi in sorted(intervals):
        assert lo == pos, f"{what}: byte {pos} is read {'twice' if lo < pos else 'never'}"
        pos = hi
    assert pos == end, f"{what}: bytes [{pos}, {end}) are never read"


def _flat_index(m: Manifest, group: int, rank: int, byte_offset: int, dtype: str, world_size: int) -> int:
    return rank * m.groups[group].layout(world_size).partition_numel + byte_offset // dtype_size(dtype)


def _rank_of(path: str) -> int:
    return int(path.split("rank-")[1].split("-of-")[0])


def _group_of(tensor: str) -> int:
    return int(tensor.split(".")[0][1:])


@settings(max_examples=150, deadline=None)
@given(case=_case)
def test_property_reshard_plan(case) -> None:
    m = _case_manifest(case)
    src = _headers(m)
    plan = plan_reshard(_view(m, src), case["m"])
    assert len(plan.files) == case["m"]
    for f in plan.files:
        _assert_tiles(f)
        assert (f.header_bytes, f.header) == shard_header(plan.target, f.rank)
        for op in f.ops:
            # same key, same dtype, same flat element: a pure re-cut, never a cast
            assert op.src_tensor == op.dst_tensor and op.src_dtype == op.dst_dtype
            assert op.src_start == src[_rank_of(op.src_file)].tensors[op.src_tensor].start + op.src_offset
            g = _group_of(op.src_tensor)
            assert _flat_index(m, g, _rank_of(op.src_file), op.src_offset, op.src_dtype, case["n"]) == \
                _flat_index(m, g, f.rank, op.dst_offset, op.dst_dtype, case["m"])
    # every source byte of every tensor is read exactly once
    intervals = _src_intervals(op for f in plan.files for op in f.ops)
    assert set(intervals) <= {s.path for s in m.shards}
    for r, header in src.items():
        _assert_read_once(intervals.get(shard_path(r, case["n"]), []), header.data_start,
                          header.file_bytes, shard_path(r, case["n"]))


@settings(max_examples=100, deadline=None)
@given(case=_case, dtype=st.sampled_from([None, F32, BF16]), limit=st.sampled_from([None, 1, 50, 300]))
def test_property_consolidate_plan(case, dtype, limit) -> None:
    m = _case_manifest(case)
    src = _headers(m)
    plan = plan_consolidate(_view(m, src), dtype=dtype, max_shard_size=limit, include_optimizer=True)
    params = {p.name: (gi, p) for gi, g in enumerate(m.groups) for p in g.params}
    model_files = [f for f in plan.files if f.path.startswith("model")]
    opt_files = [f for f in plan.files if f.path.startswith("optimizer")]
    assert len(model_files) + len(opt_files) == len(plan.files)
    for f in plan.files:
        _assert_tiles(f)
    # files split the flat order; inside a file, safetensors' layout (dtype, then name)
    for files, names in (
        (model_files, list(params)),
        (opt_files, [f"{n}.{k}" for n, (gi, _) in params.items() for k in m.groups[gi].keys]),
    ):
        i = 0
        for f in files:
            got = list(f.header.tensors)
            assert set(got) == set(names[i : i + len(got)])
            i += len(got)
            ranks = {F32: 0, BF16: 1, "float16": 2}  # F32, then BF16, then F16
            assert got == sorted(got, key=lambda n: (ranks[f.header.tensors[n].dtype], n))
        assert i == len(names)
    for f in model_files:
        for name, entry in f.header.tensors.items():
            gi, p = params[name]
            assert entry.shape == p.shape and entry.dtype == (dtype or p.dtype)
        for op in f.ops:
            gi, p = params[op.dst_tensor]
            assert op.src_tensor == f"g{gi}.master" and op.src_dtype == F32
            assert _flat_index(m, gi, _rank_of(op.src_file), op.src_offset, F32, case["n"]) == \
                p.offset + op.dst_offset // dtype_size(op.dst_dtype)
    # the model files read every master byte exactly once; the optimizer files every byte
    for files in (model_files, opt_files):
        intervals = _src_intervals(op for f in files for op in f.ops)
        for r, header in src.items():
            path = shard_path(r, case["n"])
            for name, entry in header.tensors.items():
                if files is model_files and not name.endswith(".master"):
                    continue
                mine = [(lo, hi) for lo, hi in intervals.get(path, []) if entry.start <= lo < entry.end]
                _assert_read_once(mine, entry.start, entry.end, f"{path} {name}")
    if len(model_files) > 1:
        index = json.loads(plan.documents["model.safetensors.index.json"])
        assert sorted(index["weight_map"]) == sorted(params)
        assert index["metadata"]["total_size"] == sum(f.data_bytes for f in model_files)
    else:
        assert "model.safetensors.index.json" not in plan.documents
    assert "optimizer.json" in plan.documents


@settings(max_examples=100, deadline=None)
@given(case=_case, align=st.sampled_from([None, 1, 4, 16]))
def test_property_partition_read(case, align) -> None:
    m = _case_manifest(case)
    src = _headers(m)
    world = case["m"]
    all_ops = []
    for rank in range(world):
        read = plan_partition_read(_view(m, src), world, rank, align=align)
        assert len(read.ops) == len(m.groups)
        for gi, (ops, real) in enumerate(zip(read.ops, read.real_numel)):
            group = m.groups[gi]
            a = align or group.align
            pn = compute_partition_numel(group.numel, world, a)
            assert real == max(0, min(group.numel, (rank + 1) * pn) - rank * pn)
            for key in group.keys:
                mine = [op for op in ops if op.dst_tensor == key]
                size = dtype_size(group.dtype_of(key, F32))
                _assert_read_once([(o.dst_start, o.dst_start + o.dst_nbytes) for o in mine], 0,
                                  real * size, f"rank {rank} group {gi} {key}")
                for op in mine:
                    assert op.dst_start == op.dst_offset
                    assert _flat_index(m, gi, _rank_of(op.src_file), op.src_offset, op.src_dtype, case["n"]) == \
                        rank * pn + op.dst_offset // size
            all_ops += ops
    # together the ranks read every source byte exactly once
    intervals = _src_intervals(all_ops)
    for r, header in src.items():
        path = shard_path(r, case["n"])
        _assert_read_once(intervals.get(path, []), header.data_start, header.file_bytes, path)


@given(
    numel=st.integers(0, 500),
    src_dtype=st.sampled_from(["float32", "bfloat16", "float64"]),
    dst_dtype=st.sampled_from(["float32", "bfloat16"]),
    max_bytes=st.integers(1, 700),
)
@settings(max_examples=60, deadline=None)
def test_split_op_pieces_tile_the_op(numel, src_dtype, dst_dtype, max_bytes):
    from zero_ckpt.plan import CopyOp, split_op

    op = CopyOp("a", "g0.master", 12, 112, "t", 8, 208, numel, src_dtype, dst_dtype)
    pieces = split_op(op, max_bytes)
    assert sum(p.numel for p in pieces) == numel
    src, dst = op.src_start, op.dst_start
    for p in pieces:
        assert (p.src_start, p.dst_start) == (src, dst)
        assert p.src_start - p.src_offset == op.src_start - op.src_offset
        assert p.dst_start - p.dst_offset == op.dst_start - op.dst_offset
        assert p.src_nbytes <= max(max_bytes, p.src_nbytes // max(p.numel, 1))
        src += p.src_nbytes
        dst += p.dst_nbytes
    assert (src, dst) == (op.src_start + op.src_nbytes, op.dst_start + op.dst_nbytes)
