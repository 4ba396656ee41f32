"""zero_core.averagers: parity with PyTorch's model averagers, and what we add.

One spawn of 4 gloo processes (tests/_dist_avg.py) runs every multi-process scenario; each
test below reports one scenario. Parity with PyTorch is asserted **bit for bit**
(``torch.equal``): with one dtype and one bucket our reduced buffer holds the same bytes in
the same order as PyTorch's ``torch.cat``, is divided by the same group size before the same
``SUM`` all-reduce, so gloo does identical arithmetic. Where buckets change how gloo chunks
the buffer (so, possibly, the order in which 4 ranks' values are summed), the data are small
integers, whose sums are exact in any order, and random data are compared to fp32/bf16
rounding (``assert_close``).

The real ``ZeroOptimizer`` scenario runs only when ``zero_core.optimizer`` exists; every other
ZeRO check uses ``FakeZero`` (the same interface) so it runs now.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch.distributed as dist

import _dist_avg
from zero_core import averagers as za
from zero_core.averagers import _plan_cross_groups

HAVE_ZERO_OPTIMIZER = importlib.util.find_spec("zero_core.optimizer") is not None
WORLD = 4


@pytest.fixture(scope="module")
def world4():
    names = [n for n in _dist_avg.SCENARIOS if n != "zero_real" or HAVE_ZERO_OPTIMIZER]
    return _dist_avg.run_scenarios(names, WORLD)


def _expect_ok(results, name):
    per_rank = results[name]
    missing = [r for r in range(WORLD) if r not in per_rank]
    failed = {r: tb for r, tb in sorted(per_rank.items()) if tb is not None}
    if missing or failed:
        first = next(iter(failed.values()), "")
        pytest.fail(
            f"{name}: ranks {missing} gave no result, ranks {sorted(failed)} failed\n{first}"
        )


def test_periodic_matches_torch_bit_for_bit(world4):
    """Warmup, period boundaries, world and subgroup, param groups, a grad-less param."""
    _expect_ok(world4, "periodic_parity")


def test_hierarchical_matches_torch_bit_for_bit(world4):
    """{2: 2, 4: 4} with warmup and {1: 1, 3: 2, 6: 4} at world 4; averaging blocks checked."""
    _expect_ok(world4, "hierarchical_parity")


def test_argument_checks_and_warnings_match_torch(world4):
    _expect_ok(world4, "args_and_warnings")


def test_state_dict_resumes_and_refuses_mismatch(world4):
    _expect_ok(world4, "state_dict_roundtrip")


def test_bucketed_equals_unbucketed_within_bucket_bytes(world4):
    _expect_ok(world4, "bucketed")


def test_zero_interface_fake_optimizer(world4):
    """Cross-group averaging of master partitions, model refresh, validation (FakeZero)."""
    _expect_ok(world4, "zero_fake")


@pytest.mark.skipif(not HAVE_ZERO_OPTIMIZER, reason="zero_core.optimizer does not exist yet")
def test_zero_optimizer_two_groups_of_two(world4):
    """World 4 = 2 ZeRO groups of 2, SGD: masters averaged, model == masters, same models."""
    _expect_ok(world4, "zero_real")


# --------------------------------------------------------------------------- single process


def test_no_process_group_is_a_clear_error():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        za.PeriodicModelAverager(period=2)


def test_all_is_public_api():
    assert set(za.__all__) == {
        "DEFAULT_BUCKET_BYTES", "ModelAverager", "PeriodicModelAverager",
        "HierarchicalModelAverager", "average_parameters", "get_params_to_average",
        "average_parameters_or_parameter_groups", "zero_cross_group", "average_zero_optimizer",
    }
    assert all(hasattr(za, name) for name in za.__all__)


def _infos(zero_groups, avg_groups, world, numels=None):
    infos = []
    for r in range(world):
        zero = next(g for g in zero_groups if r in g)
        avg = next((g for g in avg_groups if r in g), None)
        infos.append((zero, avg, list((numels or {}).get(r, [8])), zero.index(r)))
    return infos


def test_plan_cross_groups_two_zero_groups_of_two():
    infos = _infos([[0, 1], [2, 3]], [[0, 1, 2, 3]], 4)
    assert _plan_cross_groups(infos) == [[0, 2], [1, 3]]


def test_plan_cross_groups_per_level_and_outsiders():
    # World 8, ZeRO groups of 2, averaging in blocks of 4: two disjoint averaging groups.
    zero = [[0, 1], [2, 3], [4, 5], [6, 7]]
    infos = _infos(zero, [[0, 1, 2, 3], [4, 5, 6, 7]], 8)
    assert _plan_cross_groups(infos) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    # Ranks 4..7 outside any averaging group: no cross groups for them.
    infos = _infos(zero, [[0, 1, 2, 3]], 8)
    assert _plan_cross_groups(infos) == [[0, 2], [1, 3]]
    # Averaging group == ZeRO group: cross groups of one (averaging is the identity).
    assert _plan_cross_groups(_infos([[0, 1]], [[0, 1]], 2)) == [[0], [1]]


@pytest.mark.parametrize(
    "zero, avg, numels, match",
    [
        ([[0, 1], [2, 3]], [[0, 2], [1, 3]], None, "must contain whole ZeRO groups"),
        ([[0], [1, 2, 3]], [[0, 1, 2, 3]], None, "same size"),
        ([[0, 1], [2, 3]], [[0, 1, 2, 3]], {2: [9]}, "different sizes"),
    ],
)
def test_plan_cross_groups_rejects(zero, avg, numels, match):
    with pytest.raises(ValueError, match=match):
        _plan_cross_groups(_infos(zero, avg, 4, numels))


def test_plan_cross_groups_rejects_disagreement():
    infos = _infos([[0, 1], [2, 3]], [[0, 1, 2, 3]], 4)
    infos[3] = (infos[3][0], [2, 3], infos[3][2], infos[3][3])
    with pytest.raises(ValueError, match="disagree on the averaging group"):
        _plan_cross_groups(infos)
    infos = _infos([[0, 1], [2, 3]], [[0, 1, 2, 3]], 4)
    infos[1] = ([1, 0], infos[1][1], infos[1][2], 0)
    with pytest.raises(ValueError, match="disagree on their ZeRO group"):
        _plan_cross_groups(infos)
