"""Multi-process (gloo, CPU) scenarios for tests/test_averagers.py.

``run_scenarios(names, world_size)`` spawns ``world_size`` processes once and runs every named
scenario in each of them, in order, so one spawn (seconds) covers many checks. The parent binds
a ``TCPStore`` on 127.0.0.1 port 0 (a free port, no race) and the children join it as clients.
Each scenario's outcome per rank (None or a traceback) comes back through a queue; no sleeps.
A scenario that fails on one rank leaves the others in a collective until the process-group
timeout, after which the remaining scenarios still run (their results may then be noise: read
the first failure).

Every scenario runs on every rank, so process groups are created on every rank in the same
order (``dist.new_group`` is collective over the world).
"""

from __future__ import annotations

import json
import math
import queue as queue_mod
import re
import time
import traceback
import warnings
from collections import OrderedDict
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PG_TIMEOUT_S = 30


# --------------------------------------------------------------------------- harness


def run_scenarios(names: list[str], world_size: int, timeout_s: float = 150.0) -> dict:
    """{scenario: {rank: None | traceback}}; a missing rank means that process died."""
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, store.port, names, results_q))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict = {name: {} for name in names}
    expected = world_size * len(names)
    got = 0
    deadline = time.monotonic() + timeout_s
    try:
        while got < expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, name, err = results_q.get(timeout=min(remaining, 2.0))
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            results[name][rank] = err
            got += 1
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():  # only processes this function started
                p.kill()
                p.join()
    return results


def _child(rank, world_size, port, names, results_q):
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=60))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        for name in names:
            try:
                SCENARIOS[name](rank, world_size)
                results_q.put((rank, name, None))
            except BaseException:
                results_q.put((rank, name, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- helpers


def _gen(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) % (2**31))


def _twin_params(rank: int, seed: int, integer: bool = False):
    """Two identical lists of rank-dependent params: torch's copy and ours.

    Includes a non-contiguous param (a transpose) and, last, one with ``grad is None``
    (``get_params_to_average`` leaves it out).
    """
    g = _gen(seed, rank)
    raw = [
        torch.randn(3, 5, generator=g),
        torch.randn(7, generator=g),
        torch.randn(6, 4, generator=g).t(),  # non-contiguous
        torch.randn(2, 3, 4, generator=g),
        torch.randn(1, generator=g),
        torch.randn(5, generator=g),  # no grad
    ]
    if integer:
        raw = [torch.round(t * 20) for t in raw]
    pairs = []
    for i, t in enumerate(raw):
        a = torch.nn.Parameter(t.clone())
        b = torch.nn.Parameter(t.clone() if t.is_contiguous() else t.t().clone().t())
        if i < len(raw) - 1:
            a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        pairs.append((a, b))
    return [a for a, _ in pairs], [b for _, b in pairs]


def _local_update(theirs, ours, rank: int, step: int) -> None:
    """The same rank-dependent "local SGD step" applied to both copies."""
    for i, (a, b) in enumerate(zip(theirs, ours)):
        delta = torch.randn(a.shape, generator=_gen(rank, step, i))
        a.data.add_(delta)
        b.data.add_(delta)


def _assert_twins_equal(theirs, ours, where: str) -> None:
    for i, (a, b) in enumerate(zip(theirs, ours)):
        if not torch.equal(a.data, b.data):
            diff = (a.data - b.data).abs().max().item()
            raise AssertionError(f"{where}: param {i} differs from torch's (max abs diff {diff})")


def _gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    n = dist.get_world_size(group)
    out = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _flat(params) -> torch.Tensor:
    return torch.cat([p.data.reshape(-1) for p in params])


def _check_averaged_blocks(params, block: int | None, world: int, where: str) -> None:
    """block=None: ranks all differ; else ranks r // block share params, blocks differ."""
    flats = _gather(_flat(params))
    for r in range(world):
        for s in range(r + 1, world):
            same = block is not None and r // block == s // block
            if same != torch.equal(flats[r], flats[s]):
                raise AssertionError(f"{where}: ranks {r},{s} expected same={same}")


def _raises(exc_type, fn, match: str | None = None):
    import pytest

    with pytest.raises(exc_type, match=match) as info:
        fn()
    return info.value


# --------------------------------------------------------------------------- scenarios


def periodic_parity(rank, world):
    """Ours vs torch's PeriodicModelAverager: bit-identical over warmup and periods."""
    from torch.distributed.algorithms.model_averaging.averagers import (
        PeriodicModelAverager as TorchPeriodic,
    )

    from zero_core.averagers import PeriodicModelAverager

    sub, _ = dist.new_subgroups(2)
    cases = [(None, 3, 2, "params", 4), (sub, 2, 0, "params", 2), (None, 2, 1, "groups", 4)]
    for case, (pg, period, warmup, form, block) in enumerate(cases):
        theirs, ours = _twin_params(rank, seed=case)
        ta = TorchPeriodic(period, warmup, pg)
        oa = PeriodicModelAverager(period, warmup, pg)
        if form == "groups":
            t_in = torch.optim.SGD([{"params": theirs[:2]}, {"params": theirs[2:]}], lr=0.1)
            o_in = torch.optim.SGD([{"params": ours[:2]}, {"params": ours[2:]}], lr=0.1)
        for step in range(9):
            _local_update(theirs, ours, rank, step)
            no_grad_before = ours[-1].detach().clone()
            if form == "groups":
                ta.average_parameters(t_in.param_groups)
                oa.average_parameters(o_in.param_groups)
            else:
                ta.average_parameters(iter(theirs))  # model.parameters() is a generator
                oa.average_parameters(iter(ours))
            where = f"case {case} step {step}"
            _assert_twins_equal(theirs, ours, where)
            assert ta.step == oa.step == step + 1, where
            assert torch.equal(ours[-1].detach(), no_grad_before), f"{where}: grad-less param moved"
            due = step >= warmup and (step - warmup) % period == 0
            _check_averaged_blocks(ours[:-1], block if due else None, world, where)


def hierarchical_parity(rank, world):
    """Ours vs torch's HierarchicalModelAverager at world 4, two hierarchies, both inputs."""
    from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
        HierarchicalModelAverager as TorchHierarchical,
    )

    from zero_core.averagers import HierarchicalModelAverager

    cases = [
        (OrderedDict([(2, 2), (4, 4)]), 1, "params"),
        (OrderedDict([(1, 1), (3, 2), (6, 4)]), 0, "groups"),
    ]
    for case, (cfg, warmup, form) in enumerate(cases):
        theirs, ours = _twin_params(rank, seed=10 + case)
        ta = TorchHierarchical(cfg, warmup)
        oa = HierarchicalModelAverager(cfg, warmup)
        for step in range(13):
            _local_update(theirs, ours, rank, step)
            if form == "groups":
                ta.average_parameters([{"params": theirs}])
                oa.average_parameters([{"params": ours}])
            else:
                ta.average_parameters(iter(theirs))
                oa.average_parameters(iter(ours))
            where = f"case {case} step {step}"
            _assert_twins_equal(theirs, ours, where)
            assert ta.step == oa.step == step + 1, where
            size = None
            if step >= warmup:
                size = next((s for p, s in reversed(cfg.items()) if step % p == 0), None)
            _check_averaged_blocks(ours[:-1], None if size in (None, 1) else size, world, where)


def args_and_warnings(rank, world):
    """Same exception types, messages and warnings as torch; plus our extra checks."""
    from torch.distributed.algorithms.model_averaging import utils as torch_utils
    from torch.distributed.algorithms.model_averaging.averagers import (
        PeriodicModelAverager as TP,
    )
    from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
        HierarchicalModelAverager as TH,
    )
    import pytest

    from zero_core import averagers as za

    OD = OrderedDict
    bad = [
        (TP, za.PeriodicModelAverager, dict(period=0)),
        (TP, za.PeriodicModelAverager, dict(period=-3)),
        (TP, za.PeriodicModelAverager, dict(period=2, warmup_steps=-1)),
        (TP, za.PeriodicModelAverager, dict(period=0, warmup_steps=-1)),  # warmup checked first
        (TH, za.HierarchicalModelAverager, dict(period_group_size_dict=None)),
        (TH, za.HierarchicalModelAverager, dict(period_group_size_dict=OD())),
        (TH, za.HierarchicalModelAverager, dict(period_group_size_dict=OD([(0, 2), (4, 4)]))),
        (TH, za.HierarchicalModelAverager, dict(period_group_size_dict=OD([(2, 2), (4, 2)]))),
        (TH, za.HierarchicalModelAverager, dict(period_group_size_dict=OD([(2, 3), (4, 4)]))),
        (TH, za.HierarchicalModelAverager, dict(period_group_size_dict=OD([(2, 8), (4, 4)]))),
        (TH, za.HierarchicalModelAverager, dict(period_group_size_dict=OD([(2, 0), (4, 4)]))),
        (
            TH,
            za.HierarchicalModelAverager,
            dict(period_group_size_dict=OD([(2, 2), (4, 4)]), warmup_steps=-1),
        ),
    ]
    for theirs_cls, ours_cls, kwargs in bad:
        with pytest.raises(Exception) as info:
            theirs_cls(**kwargs)
        expected = info.value
        assert type(expected) is ValueError, (kwargs, expected)
        with pytest.raises(ValueError, match=f"^{re.escape(str(expected))}$"):
            ours_cls(**kwargs)

    # Warnings: same category, text, and location (stacklevel=2 points at the caller).
    for theirs_fn, ours_fn in [
        (lambda: TP(period=1), lambda: za.PeriodicModelAverager(period=1)),
        (lambda: TH(OD([(1, 4)])), lambda: za.HierarchicalModelAverager(OD([(1, 4)]))),
    ]:
        with pytest.warns(UserWarning) as theirs_w:
            theirs_fn()
        with pytest.warns(UserWarning) as ours_w:
            ours_fn()
        assert [str(w.message) for w in ours_w] == [str(w.message) for w in theirs_w]
        assert [w.filename for w in ours_w] == [__file__], [w.filename for w in ours_w]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        za.PeriodicModelAverager(period=2)
        za.HierarchicalModelAverager(OD([(2, 2), (4, 4)]))

    # Input types, as torch's get_params_to_average.
    with pytest.raises(NotImplementedError) as info:
        torch_utils.get_params_to_average([torch.zeros(2)])
    with pytest.raises(NotImplementedError, match=re.escape(str(info.value))):
        za.get_params_to_average([torch.zeros(2)])
    p = torch.nn.Parameter(torch.ones(2))
    assert za.get_params_to_average([p]) == []  # no grad
    p.grad = torch.zeros(2)
    assert za.get_params_to_average([p]) == torch_utils.get_params_to_average([p]) == [p]
    za.average_parameters([], None)  # empty: no-op, no collective (torch.cat would raise)

    # Our additions, all raised before any group is created.
    H = za.HierarchicalModelAverager
    _raises(ValueError, lambda: H(OD([(4, 2), (2, 4)])), "strictly increase")
    _raises(ValueError, lambda: H(OD([(2, 1), (6, 2), (4, 4)])), "strictly")
    _raises(ValueError, lambda: za.HierarchicalModelAverager(OD([(2, 2), (4, 1), (8, 4)])), "nest")
    _raises(TypeError, lambda: za.PeriodicModelAverager(period=2.5), "period")
    _raises(TypeError, lambda: za.HierarchicalModelAverager({2.0: 2, 4: 4}), "period")
    _raises(ValueError, lambda: za.PeriodicModelAverager(2, bucket_bytes=0), "bucket_bytes")
    _raises(TypeError, lambda: za.PeriodicModelAverager(2, bucket_bytes=1.5), "bucket_bytes")
    # A plain dict is insertion-ordered: accepted like an OrderedDict.
    h = za.HierarchicalModelAverager({2: 2, 4: 4})
    assert list(h.period_process_group_dict) == [2, 4]
    assert h.period_process_group_dict[4] is dist.group.WORLD


def state_dict_roundtrip(rank, world):
    """step survives a JSON round trip and the schedule resumes; mismatches are refused."""
    from zero_core.averagers import HierarchicalModelAverager, PeriodicModelAverager

    OD = OrderedDict
    for make in [
        lambda: PeriodicModelAverager(period=3, warmup_steps=2),
        lambda: HierarchicalModelAverager(OD([(2, 2), (4, 4)]), warmup_steps=1),
    ]:
        full, _ = _twin_params(rank, seed=20)
        resumed_params, _ = _twin_params(rank, seed=20)
        a = make()
        for step in range(5):
            _local_update(full, resumed_params, rank, step)
            a.average_parameters(full)
        sd = json.loads(json.dumps(a.state_dict()))
        assert sd["step"] == 5
        # The resumed run replays the same params and continues from step 5.
        for p, q in zip(resumed_params, full):
            p.data.copy_(q.data)
        b = make()
        b.load_state_dict(sd)
        assert b.step == 5 and b.state_dict() == a.state_dict()
        for step in range(5, 14):
            _local_update(full, resumed_params, rank, step)
            a.average_parameters(full)
            b.average_parameters(resumed_params)
            _assert_twins_equal(full, resumed_params, f"resumed step {step}")

    p = PeriodicModelAverager(period=3, warmup_steps=2)
    p.step = 7
    sd = p.state_dict()
    assert sd == {"type": "PeriodicModelAverager", "step": 7, "period": 3, "warmup_steps": 2}
    q = PeriodicModelAverager(period=4, warmup_steps=2)
    _raises(ValueError, lambda: q.load_state_dict(sd), r"period=3.*period=4")
    q = PeriodicModelAverager(period=3, warmup_steps=0)
    _raises(ValueError, lambda: q.load_state_dict(sd), r"warmup_steps=2.*warmup_steps=0")
    assert q.step == 0  # unchanged by a refused load
    q.load_state_dict({"step": 1200})  # the minimal form (DESIGN.md's manifest example)
    assert q.step == 1200
    for bad, match in [
        ({}, "no 'step'"),
        ({"step": -1}, "step=-1"),
        ({"step": "3"}, "step='3'"),
        ({"step": True}, "step=True"),
        ({"step": 1, "bucket_bytes": 4}, "unknown keys"),
    ]:
        _raises(ValueError, lambda: q.load_state_dict(bad), match)
    assert q.step == 1200

    h = HierarchicalModelAverager(OD([(2, 2), (4, 4)]), warmup_steps=1)
    h.step = 9
    hsd = json.loads(json.dumps(h.state_dict()))
    assert hsd == {
        "type": "HierarchicalModelAverager", "step": 9,
        "period_group_size_dict": [[2, 2], [4, 4]], "warmup_steps": 1,
    }
    h2 = HierarchicalModelAverager(OD([(1, 2), (4, 4)]), warmup_steps=1)
    _raises(
        ValueError, lambda: h2.load_state_dict(hsd),
        re.escape("period_group_size_dict=[[2, 2], [4, 4]]") + ".*" + re.escape("[[1, 2], [4, 4]]"),
    )
    h3 = HierarchicalModelAverager(OD([(2, 2), (4, 4)]), warmup_steps=0)
    _raises(ValueError, lambda: h3.load_state_dict(hsd), "warmup_steps=1")
    h3 = HierarchicalModelAverager(OD([(2, 2), (4, 4)]), warmup_steps=1)
    h3.load_state_dict({**hsd, "period_group_size_dict": OD([(2, 2), (4, 4)])})  # dict form ok
    assert h3.step == 9
    _raises(ValueError, lambda: h3.load_state_dict(sd), "from a 'PeriodicModelAverager'")
    _raises(ValueError, lambda: q.load_state_dict(hsd), "from a 'HierarchicalModelAverager'")


def bucketed(rank, world):
    """Small buckets: same result as one bucket, every all-reduce within bucket_bytes."""
    from torch.distributed.algorithms.model_averaging import utils as torch_utils

    from zero_core import averagers as za

    real_all_reduce = dist.all_reduce
    calls: list[tuple[int, torch.dtype]] = []

    def spy(tensor, *args, **kwargs):
        calls.append((tensor.numel() * tensor.element_size(), tensor.dtype))
        return real_all_reduce(tensor, *args, **kwargs)

    def make(integer: bool, seed: int):
        g = _gen(seed, rank)
        shapes = [(3,), (40,), (7, 2), (16,), (5,), (4, 9), (33,)]
        ts = [torch.randn(s, generator=g) for s in shapes]
        ts.append(torch.randn(9, 5, generator=g).t())  # non-contiguous, bigger than a bucket
        if integer:
            ts = [torch.round(t * 10) for t in ts]  # sums of x/4 are exact, in fp32 and bf16
        dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16,
                  torch.float32, torch.float32, torch.bfloat16, torch.float32]
        return [torch.nn.Parameter(t.to(d)) for t, d in zip(ts, dtypes)]

    for integer, seed in [(True, 30), (False, 31)]:
        small = make(integer, seed)
        big = make(integer, seed)
        ptrs = [p.data_ptr() for p in small]
        strides = [p.stride() for p in small]
        bucket_bytes = 64
        dist.all_reduce = spy
        try:
            za.average_parameters(small, None, bucket_bytes=bucket_bytes)
        finally:
            dist.all_reduce = real_all_reduce
        assert calls, "no all_reduce seen"
        assert max(n for n, _ in calls) <= bucket_bytes, calls
        for dtype in (torch.float32, torch.bfloat16):
            total = sum(p.numel() * p.element_size() for p in small if p.dtype == dtype)
            n_calls = sum(1 for _, d in calls if d == dtype)
            assert n_calls == math.ceil(total / bucket_bytes), (dtype, n_calls, total)
        calls.clear()
        assert [p.data_ptr() for p in small] == ptrs, "averaging must be in place"
        assert [p.stride() for p in small] == strides
        za.average_parameters(big, None)  # one bucket per dtype
        for i, (a, b) in enumerate(zip(small, big)):
            if integer:
                assert torch.equal(a, b), f"param {i}: bucketed != unbucketed"
            else:
                # Same elementwise math, but gloo's ring may sum the 4 ranks' values in
                # another order: one rounding of the partial sums apart (bf16: 2**-8 relative
                # to partial sums of size ~2, hence the absolute tolerance).
                tol = dict(atol=2e-2, rtol=2e-2) if a.dtype == torch.bfloat16 else {}
                torch.testing.assert_close(a, b, **tol)

    # fp32 only, integer data: bucketed equals torch's average_parameters exactly.
    ours = [p for p in make(True, 32) if p.dtype == torch.float32]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    za.average_parameters(iter(ours), None, bucket_bytes=24)
    torch_utils.average_parameters(iter(theirs), dist.group.WORLD)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)

    # bucket_bytes below one element: one element per all-reduce, still correct.
    tiny = [torch.nn.Parameter(torch.full((3,), float(rank)))]
    za.average_parameters(tiny, None, bucket_bytes=1)
    assert torch.equal(tiny[0].data, torch.full((3,), 1.5))


class FakeZero:
    """The ZeroOptimizer interface the averagers use, and nothing more.

    Per param group: the model params become views of one flat buffer (model dtype) padded to
    ``world_size * partition_numel``; the rank keeps an fp32 master copy of its partition.
    """

    def __init__(self, groups, process_group, align: int = 4):
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.layouts, self.flats, self._masters = [], [], []
        for params in groups:
            numel = sum(p.numel() for p in params)
            pn = math.ceil(numel / (self.world_size * align)) * align
            flat = torch.zeros(pn * self.world_size, dtype=params[0].dtype)
            off = 0
            for p in params:
                flat[off : off + p.numel()].copy_(p.data.reshape(-1))
                p.data = flat[off : off + p.numel()].view_as(p)
                off += p.numel()
            self.layouts.append((numel, pn))
            self.flats.append(flat)
            mine = flat[self.rank * pn : (self.rank + 1) * pn]
            self._masters.append(mine.to(torch.float32, copy=True))

    def master_partition(self, g):
        return self._masters[g]

    def sync_model_from_masters(self):
        for g, flat in enumerate(self.flats):
            parts = _gather(self._masters[g], self.process_group)
            flat.copy_(torch.cat(parts).to(flat.dtype))

    def local_step(self, zero_group_index: int, step: int):
        """A deterministic "optimizer step": same within a ZeRO group, differs across."""
        for g, m in enumerate(self._masters):
            m.add_(torch.randn(m.shape, generator=_gen(zero_group_index, self.rank, step, g)))
        self.sync_model_from_masters()


def _fake_model(seed: int, dtypes=(torch.float32, torch.bfloat16)):
    g = _gen(seed)  # same init on every rank
    return [
        [torch.nn.Parameter(torch.randn(s, generator=g).to(dtypes[0])) for s in [(3, 5), (7,)]],
        [torch.nn.Parameter(torch.randn(s, generator=g).to(dtypes[1])) for s in [(4, 2), (6,)]],
    ]


def _check_zero(opt, before_all, cross_of, where):
    """Masters averaged over the cross group; model == masters; identical models."""
    rank = dist.get_rank()
    for g in range(len(opt.layouts)):
        cross = cross_of(rank)
        expected = sum(before_all[g][x] / len(cross) for x in cross)  # k=2 or 1: exact
        got = opt.master_partition(g)
        if not torch.equal(got, expected):
            raise AssertionError(f"{where}: group {g} masters not the cross-group average")
        full = torch.cat(_gather(got, opt.process_group)).to(opt.flats[g].dtype)
        assert torch.equal(opt.flats[g], full), f"{where}: model != masters"


def zero_fake(rank, world):
    """ZeRO groups {0,1} {2,3} averaged across: periodic, hierarchical, validation errors."""
    from zero_core import averagers as za

    zg, _ = dist.new_subgroups(2)
    gi, pos = rank // 2, rank % 2

    # Periodic over the world: cross groups {0,2} and {1,3}.
    groups = _fake_model(40)
    opt = FakeZero(groups, zg)
    avg = za.PeriodicModelAverager(period=2, warmup_steps=1)
    for step in range(5):
        opt.local_step(gi, step)
        before = [_gather(opt.master_partition(g)) for g in range(2)]
        avg.average_parameters(opt)
        due = step >= 1 and (step - 1) % 2 == 0
        if due:
            _check_zero(opt, before, lambda r: [r % 2, r % 2 + 2], f"periodic step {step}")
            for g in range(2):
                flats = _gather(opt.flats[g])
                assert all(torch.equal(f, flats[0]) for f in flats), "models differ after averaging"
        else:
            for g in range(2):
                assert torch.equal(opt.master_partition(g), before[g][rank]), "averaged off-period"
    # The model params are still views of the flat buffer (averaging did not rebind them).
    assert groups[0][0].data_ptr() == opt.flats[0].data_ptr()
    assert avg.state_dict()["step"] == 5

    # Hierarchical {1: 2, 2: 4}: level 1 is the ZeRO group itself (cross groups of 1).
    opt2 = FakeZero(_fake_model(41), zg)
    h = za.HierarchicalModelAverager(OrderedDict([(1, 2), (2, 4)]))
    for step in range(1, 4):
        h.step = step
        opt2.local_step(gi, step)
        before = [_gather(opt2.master_partition(g)) for g in range(2)]
        h.average_parameters(opt2)
        cross = (lambda r: [r]) if step % 2 else (lambda r: [r % 2, r % 2 + 2])
        _check_zero(opt2, before, cross, f"hierarchical step {step}")

    # ZeRO groups of 1 and hierarchical {2: 2, 4: 4}: equals torch's averager on plain params
    # (numel a multiple of align: the partition is exactly torch's flat buffer, same bits).
    from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
        HierarchicalModelAverager as TH,
    )

    solo, _ = dist.new_subgroups(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=_gen(42, rank))) for s in [(3, 4), (8,)]]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p in plain:
        p.grad = torch.zeros_like(p)
    opt3 = FakeZero([params], solo)
    ours_h = za.HierarchicalModelAverager(OrderedDict([(2, 2), (4, 4)]))
    theirs_h = TH(OrderedDict([(2, 2), (4, 4)]))
    for step in range(5):
        delta = torch.randn(opt3.master_partition(0).shape, generator=_gen(43, rank, step))
        opt3.master_partition(0).add_(delta)
        opt3.sync_model_from_masters()
        off = 0
        for p in plain:
            p.data.add_(delta[off : off + p.numel()].view_as(p))
            off += p.numel()
        ours_h.average_parameters(opt3)
        theirs_h.average_parameters(plain)
        assert torch.equal(opt3.master_partition(0)[:off], _flat(plain)), f"solo step {step}"
        assert torch.equal(_flat(params), _flat(plain))

    # Bucketed ZeRO averaging: partitions reduced in place, in slices within bucket_bytes.
    opt4 = FakeZero(_fake_model(44), zg)
    opt4.local_step(gi, 0)
    ptrs = [opt4.master_partition(g).data_ptr() for g in range(2)]
    before = [_gather(opt4.master_partition(g)) for g in range(2)]
    cross = za.zero_cross_group(opt4)  # every rank of the world calls it
    za.average_zero_optimizer(opt4, cross, bucket_bytes=16)
    _check_zero(opt4, before, lambda r: [r % 2, r % 2 + 2], "bucketed zero")
    assert [opt4.master_partition(g).data_ptr() for g in range(2)] == ptrs

    # Invalid: averaging groups that cut through ZeRO groups; ZeRO groups of unequal size.
    cut, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    _raises(ValueError, lambda: za.zero_cross_group(FakeZero(_fake_model(45), zg), cut),
            "must contain whole ZeRO groups")
    uneven, _ = dist.new_subgroups_by_enumeration([[0], [1, 2, 3]])
    model = _fake_model(46, dtypes=(torch.float32, torch.float32))
    _raises(ValueError, lambda: za.zero_cross_group(FakeZero(model, uneven)), "same size")
    # A rank outside the averaging group gets None and averaging is a no-op there.
    _, (half,) = dist.new_subgroups_by_enumeration([[0, 1]])  # NON_GROUP_MEMBER on 2, 3
    opt5 = FakeZero(_fake_model(47), zg)
    cross = za.zero_cross_group(opt5, half)
    assert (cross is None) == (rank >= 2)
    za.average_zero_optimizer(opt5, cross)


def zero_real(rank, world):
    """The real ZeroOptimizer, world 4 = 2 ZeRO groups of 2, SGD, averaged across groups."""
    from zero_core.optimizer import ZeroOptimizer

    from zero_core.averagers import PeriodicModelAverager

    zg, _ = dist.new_subgroups(2)
    gi = rank // 2
    torch.manual_seed(0)  # same init on every rank
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    names = dict(model.named_parameters())
    opt = ZeroOptimizer(model.named_parameters(), torch.optim.SGD, process_group=zg, lr=0.1)
    avg = PeriodicModelAverager(period=2, warmup_steps=1)
    for step in range(4):
        g = _gen(50, gi, rank % 2, step)  # different data per group (and per rank)
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        before = [_gather(opt.master_partition(i)) for i in range(len(opt.layouts))]
        avg.average_parameters(opt)
        if step >= 1 and (step - 1) % 2 == 0:
            for i, layout in enumerate(opt.layouts):
                m = opt.master_partition(i)
                partner = rank ^ 2  # same position in the other ZeRO group
                expected = before[i][rank] / 2 + before[i][partner] / 2
                assert torch.equal(m, expected), f"step {step}: masters not averaged"
                full = torch.cat(_gather(m, zg))
                for spec in layout.params:
                    p = names[spec.name]
                    want = full[spec.offset : spec.offset + p.numel()].to(p.dtype).view_as(p)
                    assert torch.equal(p.detach(), want), f"step {step}: {spec.name} != master"
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            flats = _gather(flat)
            assert all(torch.equal(f, flats[0]) for f in flats), "groups hold different models"


SCENARIOS = {
    f.__name__: f
    for f in [
        periodic_parity,
        hierarchical_parity,
        args_and_warnings,
        state_dict_roundtrip,
        bucketed,
        zero_fake,
        zero_real,
    ]
}
