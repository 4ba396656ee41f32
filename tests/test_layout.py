"""Properties and worked examples of the flat layout and its fragment map (zero_core.layout).

Sizes are drawn so that ``numel`` is rarely divisible by ``world_size * align``: that is where
padding lives, and where layout bugs hide when every test uses round numbers.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zero_core.layout import (
    Fragment,
    GroupLayout,
    ParamSpec,
    compute_partition_numel,
    overlap,
)

SETTINGS = settings(max_examples=150, deadline=None)

ALIGNS = st.one_of(st.sampled_from([1, 2, 3, 4, 8, 16, 64, 128]), st.integers(1, 200))
WORLD_SIZES = st.integers(1, 64)
# Shapes with 0..4 dims; dims of 0 give 0-sized params, () a scalar of one element.
SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)
PARAM_SHAPES = st.lists(SHAPES, min_size=0, max_size=12)
# Large params (up to 2**48 elements each, below float precision: see the xfail below) with few
# dims: interval checks only, never per element.
BIG_SHAPES = st.lists(st.integers(0, 1 << 16), min_size=1, max_size=3).map(tuple)


def build(shapes, world_size, align=1, dtype="float32"):
    return GroupLayout.build(
        [(f"p{i}", shape, dtype) for i, shape in enumerate(shapes)],
        world_size=world_size,
        align=align,
    )


def all_fragments(layout):
    return [f for r in range(layout.world_size) for f in layout.fragments_of_rank(r)]


def check_layout_invariants(layout: GroupLayout) -> None:
    """Every layout property, in interval arithmetic (exact for any size)."""
    ws, pn, align, numel = layout.world_size, layout.partition_numel, layout.align, layout.numel

    # Offsets: end to end from 0, numel is the sum.
    cursor = 0
    for spec in layout.params:
        assert spec.offset == cursor
        assert spec.numel == math.prod(spec.shape)
        cursor = spec.end
    assert numel == cursor

    # Partition size: a multiple of align, big enough, and the smallest such.
    assert pn % align == 0
    assert ws * pn >= numel
    if numel == 0:
        assert pn == 0
    else:
        assert pn > 0
        assert ws * (pn - align) < numel
    assert pn == compute_partition_numel(numel, ws, align)
    assert layout.padded_numel == ws * pn
    assert layout.padding == ws * pn - numel

    # Ranges: padding only at the end; real ranges concatenate to [0, numel).
    flat = 0
    short_seen = False
    for r in range(ws):
        rs, re = layout.rank_range(r)
        assert (rs, re) == (r * pn, (r + 1) * pn)
        s, e = layout.real_range(r)
        assert s == min(rs, numel) and e == min(re, numel)
        if s < e:
            # A non-empty real range is a prefix of the rank's range.
            assert rs == s < e <= re
        else:
            # An all-padding rank's empty real range sits at the end of the real data.
            assert s == e == numel
        assert layout.real_numel(r) == e - s
        if short_seen:
            assert s == e == numel, f"rank {r} holds data after a short rank"
        if e - s < pn:
            short_seen = True
        assert s == flat, "real ranges must concatenate in rank order"
        flat = e
    assert flat == numel

    # Fragments of ranks: each inside its rank's real range and inside its param; fields agree.
    by_rank = []
    for r in range(ws):
        frags = layout.fragments_of_rank(r)
        s, e = layout.real_range(r)
        for f in frags:
            p = layout.params[f.param_index]
            assert f.rank == r
            assert f.numel > 0
            assert 0 <= f.param_start and f.param_start + f.numel <= p.numel
            assert 0 <= f.partition_start and f.partition_start + f.numel <= pn
            assert f.flat_start == p.offset + f.param_start
            assert f.flat_start == r * pn + f.partition_start
            assert s <= f.flat_start and f.flat_start + f.numel <= e
        # In flat order, tiling the rank's real range exactly (no gap, no overlap).
        cur = s
        for f in frags:
            assert f.flat_start == cur
            cur += f.numel
        assert cur == e
        by_rank.extend(frags)

    # Whole buffer: fragments of all ranks, in rank order, tile [0, numel) exactly once.
    cur = 0
    for f in by_rank:
        assert f.flat_start == cur
        cur += f.numel
    assert cur == numel

    # Fragments of params agree with fragments of ranks (same set) and tile each param.
    by_param = []
    for i, p in enumerate(layout.params):
        frags = layout.fragments_of_param(i)
        ranks = [f.rank for f in frags]
        assert ranks == sorted(set(ranks)), "one fragment per rank, in rank order"
        cur = 0
        for f in frags:
            assert f.param_index == i
            assert f.param_start == cur
            cur += f.numel
        assert cur == p.numel
        if p.numel == 0:
            assert frags == []
        by_param.extend(frags)
    assert len(by_param) == len(by_rank)
    assert set(by_param) == set(by_rank)

    # rank_of_element agrees with the real ranges at every boundary.
    for r in range(ws):
        s, e = layout.real_range(r)
        if s < e:
            assert layout.rank_of_element(s) == r
            assert layout.rank_of_element(e - 1) == r


# ----- properties -----------------------------------------------------------------------------


@SETTINGS
@given(PARAM_SHAPES, WORLD_SIZES, ALIGNS)
def test_layout_invariants(shapes, world_size, align):
    check_layout_invariants(build(shapes, world_size, align))


@SETTINGS
@given(PARAM_SHAPES, WORLD_SIZES, ALIGNS)
def test_every_element_is_held_exactly_once(shapes, world_size, align):
    """Per element, not per interval: count how many fragments hold each param element."""
    layout = build(shapes, world_size, align)
    counts = [[0] * p.numel for p in layout.params]
    owner = [[None] * p.numel for p in layout.params]
    for f in all_fragments(layout):
        for k in range(f.numel):
            counts[f.param_index][f.param_start + k] += 1
            owner[f.param_index][f.param_start + k] = (f.rank, f.partition_start + k)
    for i, p in enumerate(layout.params):
        assert counts[i] == [1] * p.numel
        for j in range(p.numel):
            rank, pos = owner[i][j]
            assert rank * layout.partition_numel + pos == p.offset + j
            assert layout.rank_of_element(p.offset + j) == rank


@SETTINGS
@given(st.lists(BIG_SHAPES, min_size=1, max_size=6), WORLD_SIZES, ALIGNS)
def test_layout_invariants_large_params(shapes, world_size, align):
    check_layout_invariants(build(shapes, world_size, align))


@SETTINGS
@given(PARAM_SHAPES, WORLD_SIZES, WORLD_SIZES, ALIGNS)
def test_with_world_size_is_a_fresh_build(shapes, ws_a, ws_b, align):
    a = build(shapes, ws_a, align)
    b = a.with_world_size(ws_b)
    assert b == build(shapes, ws_b, align)
    # The unpadded flat buffer is the same bytes, only cut differently.
    assert [b.real_range(r) for r in range(ws_b)][-1][1] == a.numel


@SETTINGS
@given(st.integers(0, 1 << 52), st.integers(1, 1 << 10), st.integers(1, 1 << 10))
def test_compute_partition_numel_is_exact_ceiling(numel, world_size, align):
    pn = compute_partition_numel(numel, world_size, align)
    chunk = world_size * align
    assert pn == -(-numel // chunk) * align  # integer ceiling
    assert pn % align == 0 and world_size * pn >= numel


@pytest.mark.parametrize("numel", [2**53 + 1, 2**60 + 1])
def test_compute_partition_numel_beyond_float_precision(numel):
    pn = compute_partition_numel(numel, 1, 1)
    assert pn == numel


# ----- worked examples --------------------------------------------------------------------------

F = Fragment  # Fragment(param_index, rank, param_start, partition_start, numel, flat_start)


def expect(layout, partition_numel, by_rank, real_ranges):
    assert layout.partition_numel == partition_numel
    assert [layout.fragments_of_rank(r) for r in range(layout.world_size)] == by_rank
    assert [layout.real_range(r) for r in range(layout.world_size)] == real_ranges
    flat = [f for frags in by_rank for f in frags]
    for i in range(len(layout.params)):
        assert layout.fragments_of_param(i) == [f for f in flat if f.param_index == i]
    check_layout_invariants(layout)


def test_example_5_7_3_ws4_align1():
    # params [0, 5) [5, 12) [12, 15); pn = ceil(15 / 4) = 4; 1 element of padding.
    layout = build([(5,), (7,), (3,)], 4, 1)
    assert layout.params == (
        ParamSpec("p0", (5,), "float32", 0),
        ParamSpec("p1", (7,), "float32", 5),
        ParamSpec("p2", (3,), "float32", 12),
    )
    assert layout.numel == 15 and layout.padding == 1 and layout.padded_numel == 16
    expect(
        layout,
        4,
        [
            [F(0, 0, 0, 0, 4, 0)],
            [F(0, 1, 4, 0, 1, 4), F(1, 1, 0, 1, 3, 5)],
            [F(1, 2, 3, 0, 4, 8)],
            [F(2, 3, 0, 0, 3, 12)],
        ],
        [(0, 4), (4, 8), (8, 12), (12, 15)],
    )
    assert [layout.rank_range(r) for r in range(4)] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert layout.fragments_of_param(1) == [F(1, 1, 0, 1, 3, 5), F(1, 2, 3, 0, 4, 8)]


def test_example_5_7_3_ws4_align4():
    # pn = ceil(15 / 16) * 4 = 4: the same cut as align 1.
    layout = build([(5,), (7,), (3,)], 4, 4)
    assert layout.align == 4 and layout.padding == 1
    expect(
        layout,
        4,
        [
            [F(0, 0, 0, 0, 4, 0)],
            [F(0, 1, 4, 0, 1, 4), F(1, 1, 0, 1, 3, 5)],
            [F(1, 2, 3, 0, 4, 8)],
            [F(2, 3, 0, 0, 3, 12)],
        ],
        [(0, 4), (4, 8), (8, 12), (12, 15)],
    )


def test_example_5_7_3_ws4_align3():
    # pn = ceil(15 / 12) * 3 = 6: rank 2 is short, rank 3 is all padding.
    layout = build([(5,), (7,), (3,)], 4, 3)
    assert layout.padding == 9
    expect(
        layout,
        6,
        [
            [F(0, 0, 0, 0, 5, 0), F(1, 0, 0, 5, 1, 5)],
            [F(1, 1, 1, 0, 6, 6)],
            [F(2, 2, 0, 0, 3, 12)],
            [],
        ],
        [(0, 6), (6, 12), (12, 15), (15, 15)],
    )
    assert layout.real_numel(3) == 0
    assert layout.rank_range(3) == (18, 24)


def test_example_5_7_3_ws4_align8():
    # pn = ceil(15 / 32) * 8 = 8: two ranks hold everything, two hold only padding.
    layout = build([(5,), (7,), (3,)], 4, 8)
    assert layout.padding == 17
    expect(
        layout,
        8,
        [
            [F(0, 0, 0, 0, 5, 0), F(1, 0, 0, 5, 3, 5)],
            [F(1, 1, 3, 0, 4, 8), F(2, 1, 0, 4, 3, 12)],
            [],
            [],
        ],
        [(0, 8), (8, 15), (15, 15), (15, 15)],
    )


def test_example_multidim_and_empty_params():
    # (2, 3) -> 6 elements at 0; (0, 4) -> empty at 6; () -> scalar at 6; (0,) -> empty at 7;
    # (1, 2, 2) -> 4 elements at 7. numel 11, ws 3, align 2: pn = ceil(11 / 6) * 2 = 4.
    layout = build([(2, 3), (0, 4), (), (0,), (1, 2, 2)], 3, 2)
    assert [(p.offset, p.numel) for p in layout.params] == [(0, 6), (6, 0), (6, 1), (7, 0), (7, 4)]
    expect(
        layout,
        4,
        [
            [F(0, 0, 0, 0, 4, 0)],
            [F(0, 1, 4, 0, 2, 4), F(2, 1, 0, 2, 1, 6), F(4, 1, 0, 3, 1, 7)],
            [F(4, 2, 1, 0, 3, 8)],
        ],
        [(0, 4), (4, 8), (8, 11)],
    )
    assert layout.fragments_of_param(1) == []
    assert layout.fragments_of_param(3) == []


def test_example_zero_sized_param_on_a_rank_boundary():
    # p1 (empty) sits exactly at the boundary between rank 0 and rank 1.
    layout = build([(4,), (0,), (4,)], 2, 1)
    expect(
        layout,
        4,
        [[F(0, 0, 0, 0, 4, 0)], [F(2, 1, 0, 0, 4, 4)]],
        [(0, 4), (4, 8)],
    )


def test_example_empty_group():
    for shapes in ([], [(0,)], [(3, 0), (0,)]):
        layout = build(shapes, 8, 64)
        assert layout.numel == 0 and layout.partition_numel == 0 and layout.padding == 0
        assert [layout.fragments_of_rank(r) for r in range(8)] == [[]] * 8
        assert [layout.real_range(r) for r in range(8)] == [(0, 0)] * 8
        check_layout_invariants(layout)


def test_example_world_size_one_holds_everything():
    layout = build([(5,), (7,), (3,)], 1, 64)
    expect(
        layout,
        64,
        [[F(0, 0, 0, 0, 5, 0), F(1, 0, 0, 5, 7, 5), F(2, 0, 0, 12, 3, 12)]],
        [(0, 15)],
    )
    assert layout.padding == 49


def test_example_param_spanning_many_ranks():
    # One 10-element param over 4 ranks of 3: split 3 / 3 / 3 / 1.
    layout = build([(10,)], 4, 1)
    assert layout.fragments_of_param(0) == [
        F(0, 0, 0, 0, 3, 0),
        F(0, 1, 3, 0, 3, 3),
        F(0, 2, 6, 0, 3, 6),
        F(0, 3, 9, 0, 1, 9),
    ]
    assert [layout.rank_of_element(i) for i in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_compute_partition_numel_examples():
    assert compute_partition_numel(0, 1, 1) == 0
    assert compute_partition_numel(0, 64, 64) == 0
    assert compute_partition_numel(1, 64, 64) == 64
    assert compute_partition_numel(15, 4, 1) == 4
    assert compute_partition_numel(16, 4, 1) == 4
    assert compute_partition_numel(17, 4, 1) == 5
    assert compute_partition_numel(1234567, 8, 64) == 154368  # DESIGN.md's example
    assert compute_partition_numel(100, 3, 3) == 36


def test_overlap():
    assert overlap(0, 5, 3, 8) == (3, 5)
    assert overlap(3, 8, 0, 5) == (3, 5)
    assert overlap(0, 5, 5, 8) is None  # touching, half-open
    assert overlap(0, 5, 1, 2) == (1, 2)
    assert overlap(2, 2, 0, 5) is None  # empty range
    assert overlap(0, 3, 7, 9) is None


def test_index_of():
    layout = build([(1,), (2,)], 1)
    assert layout.index_of("p1") == 1
    with pytest.raises(KeyError):
        layout.index_of("nope")


# ----- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "numel, world_size, align, match",
    [
        (-1, 1, 1, "numel must be >= 0, got -1"),
        (5, 0, 1, "world_size must be >= 1, got 0"),
        (5, -3, 1, "world_size must be >= 1, got -3"),
        (5, 1, 0, "align must be >= 1, got 0"),
    ],
)
def test_compute_partition_numel_rejects(numel, world_size, align, match):
    with pytest.raises(ValueError, match=match):
        compute_partition_numel(numel, world_size, align)


def test_build_rejects_bad_world_size_and_align():
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        build([(5,)], 0)
    with pytest.raises(ValueError, match="align must be >= 1, got 0"):
        build([(5,)], 2, 0)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        build([(5,)], 2).with_world_size(0)


@pytest.mark.parametrize("shape", [(-1,), (3, -2), (-1, -1)])
def test_build_rejects_negative_dimensions(shape):
    # (-1, -1) has a positive product: the dimension check, not the numel, must catch it.
    with pytest.raises(ValueError, match=r"param 1 \('p1'\) has a negative dimension"):
        build([(2,), shape], 2)


@pytest.mark.parametrize(
    "offsets, bad_index, expected",
    [
        ([1, 5], 0, 0),  # does not start at 0
        ([0, 6], 1, 5),  # gap
        ([0, 4], 1, 5),  # overlap
    ],
)
def test_from_specs_rejects_non_contiguous(offsets, bad_index, expected):
    specs = [ParamSpec(f"p{i}", (5,), "float32", off) for i, off in enumerate(offsets)]
    with pytest.raises(
        ValueError,
        match=rf"param {bad_index} \('p{bad_index}'\) starts at element {offsets[bad_index]}, "
        rf"expected {expected}",
    ):
        GroupLayout.from_specs(specs, world_size=2)


def test_from_specs_accepts_contiguous_specs():
    specs = [ParamSpec("a", (2, 2), "bfloat16", 0), ParamSpec("b", (3,), "float32", 4)]
    layout = GroupLayout.from_specs(specs, world_size=2, align=2)
    assert layout == GroupLayout(tuple(specs), 7, 2, 2, 4)


@pytest.mark.parametrize("rank", [-1, 4, 5, 100])
def test_rank_out_of_range(rank):
    layout = build([(5,), (7,), (3,)], 4)
    for method in (layout.fragments_of_rank, layout.rank_range, layout.real_range, layout.real_numel):
        with pytest.raises(ValueError, match=f"rank {rank} is outside world size 4"):
            method(rank)


@pytest.mark.parametrize("index", [-1, 15, 16])
def test_rank_of_element_out_of_range(index):
    layout = build([(5,), (7,), (3,)], 4)
    with pytest.raises(ValueError, match=f"element {index} is outside the group's 15 elements"):
        layout.rank_of_element(index)


def test_fragments_of_param_out_of_range():
    layout = build([(5,)], 2)
    with pytest.raises(IndexError):
        layout.fragments_of_param(1)
