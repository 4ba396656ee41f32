"""ZeroOptimizer used the way the ecosystem uses optimizers, and its memory and overlap promises.

* a step consumes its gradients (``model.zero_grad()`` alone, or no zero_grad at all, trains
  exactly like ``optimizer.zero_grad()``);
* params and groups without gradients follow torch's rule (skip);
* ``step(closure, **kwargs)``, plain torch state dicts at any world size, full-grad/state
  setters, the stage-1 reduced gradient readable after backward;
* stage 2's reductions are in flight during backward (made deterministic: rank 1 holds back its
  part of the first bucket until rank 0 has launched the next one);
* the bytes the optimizer owns equal the formula, at world sizes 1..4, both stages;
* the dynamic loss scale follows DeepSpeed's rule (hysteresis, window) step for step.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _dist import check, run_scenarios
from zero_core import LossScaler, ZeroConfigError, ZeroOptimizer

BATCH = 12


class Net(torch.nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.l1 = torch.nn.Linear(5, width)
        self.l2 = torch.nn.Linear(width, width)
        self.l3 = torch.nn.Linear(width, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 5, generator=gen), torch.randn(BATCH, 3, generator=gen)


def rank_slice(rank: int, ws: int) -> slice:
    return slice(rank * BATCH // ws, (rank + 1) * BATCH // ws)


def loss_of(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((model(x) - t) ** 2).mean()


# ----- a step consumes its gradients ----------------------------------------------------------


def pile_up(rank: int, ws: int) -> None:
    sl = rank_slice(rank, ws)
    for stage in (1, 2):
        finals = {}
        for how in ("optimizer", "model", "none"):
            model = Net()
            opt = ZeroOptimizer(model.named_parameters(), torch.optim.AdamW, stage=stage,
                                lr=1e-2, bucket_numel=64)
            for step in range(5):
                if how == "optimizer":
                    opt.zero_grad()
                elif how == "model":
                    model.zero_grad()  # what transformers.Trainer calls
                x, t = data(step)
                loss_of(model, x[sl], t[sl]).backward()
                opt.clip_grad_norm(1.0)
                opt.step()
            finals[how] = [p.detach().clone() for p in model.parameters()]
        for how in ("model", "none"):
            for a, b in zip(finals[how], finals["optimizer"]):
                assert torch.equal(a, b), f"stage {stage}: {how}.zero_grad() loop diverged"


# ----- params and groups without gradients ---------------------------------------------------


def no_grad_rule(rank: int, ws: int) -> None:
    sl = rank_slice(rank, ws)
    for stage in (1, 2):
        model, ref = Net(), Net()
        groups = lambda m: [  # noqa: E731
            {"params": [m.l1.weight, m.l1.bias, m.l2.weight, m.l2.bias]},
            {"params": [m.l3.weight, m.l3.bias], "lr": 2e-2},
        ]
        opt = ZeroOptimizer(groups(model), torch.optim.Adam, stage=stage, lr=1e-2, align=4)
        ref_opt = torch.optim.Adam(groups(ref), lr=1e-2)
        x, t = data(0)
        for m, o, part in ((model, opt, sl), (ref, ref_opt, slice(None))):
            loss_of(m, x[part], t[part]).backward()
            o.step()
            o.zero_grad()
        # step 2: l2 gets no gradient (detached), the whole second group gets none either
        def partial(m: Net, xs: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(m.l1(xs))
            return (torch.tanh(torch.nn.functional.linear(h, m.l2.weight.detach(), m.l2.bias.detach())) ** 2).mean()

        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state_before = {n: opt.get_full_state(n, "exp_avg") for n in ("group0.param2", "group1.param0")}
        step_before = [opt.group_scalars(g)["step"] for g in (0, 1)]
        partial(model, x[sl]).backward()
        opt.step()
        partial(ref, x).backward()
        ref_opt.step()
        for n in ("l2.weight", "l2.bias", "l3.weight", "l3.bias"):
            assert torch.equal(dict(model.named_parameters())[n], before[n]), n
        assert torch.equal(opt.get_full_state("group0.param2", "exp_avg"), state_before["group0.param2"])
        assert torch.equal(opt.get_full_state("group1.param0", "exp_avg"), state_before["group1.param0"])
        assert opt.group_scalars(1)["step"] == step_before[1]  # a group without grads: no step
        assert opt.group_scalars(0)["step"] == step_before[0] + 1
        for (n, p), r in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=lambda m: f"stage {stage} {n}: {m}")
        # DeepSpeed's rule on request: a param without a gradient is stepped with zero
        model2 = Net()
        opt2 = ZeroOptimizer(groups(model2), torch.optim.Adam, stage=stage, lr=1e-2,
                             no_grad_rule="zero")
        loss_of(model2, x[sl], t[sl]).backward()
        opt2.step()
        w = model2.l2.weight.detach().clone()
        partial(model2, x[sl]).backward()
        opt2.step()
        assert not torch.equal(model2.l2.weight, w)  # momentum moved it


# ----- torch.optim surface ---------------------------------------------------------------------


class KwargsSGD(torch.optim.SGD):
    seen: list[Any] = []

    def step(self, closure: Any = None, *, scale: float = 1.0) -> Any:  # type: ignore[override]
        KwargsSGD.seen.append(scale)
        return super().step(closure)


def torch_surface(rank: int, ws: int) -> None:
    sl = rank_slice(rank, ws)
    x, t = data(3)
    # step(closure, **kwargs): the closure's loss is returned, kwargs reach the wrapped step
    model = Net()
    opt = ZeroOptimizer(model.named_parameters(), KwargsSGD, lr=0.1, elementwise=True)

    def closure() -> torch.Tensor:
        loss = loss_of(model, x[sl], t[sl])
        loss.backward()
        return loss

    loss = opt.step(closure, scale=0.5)
    assert isinstance(loss, torch.Tensor) and KwargsSGD.seen[-1] == 0.5

    # stage 1: the averaged gradient is readable right after backward
    model, ref = Net(), Net()
    opt = ZeroOptimizer(model.named_parameters(), torch.optim.SGD, stage=1, lr=0.1)
    loss_of(model, x[sl], t[sl]).backward()
    loss_of(ref, x, t).backward()
    for (n, _), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(opt.get_full_state(n, "grad"), r.grad, rtol=1e-5, atol=1e-7)
        frag, view = opt.get_local_fragment(n, "grad")
        if frag is not None:
            expect = r.grad.reshape(-1)[frag.param_start : frag.param_start + frag.numel]
            torch.testing.assert_close(view, expect, rtol=1e-5, atol=1e-7)

    # a model moved or cast after the optimizer was built is refused, not silently untrained
    moved = Net()
    moved_opt = ZeroOptimizer(moved.named_parameters(), torch.optim.SGD, lr=0.1)
    moved.l2.weight.data = moved.l2.weight.data.clone()
    loss_of(moved, x[sl], t[sl]).backward()
    with pytest.raises(ZeroConfigError, match="l2.weight.*no longer lives"):
        moved_opt.step()

    # set_full_grad / set_full_state: like DeepSpeed's safe_set_full_*
    model, ref = Net(), Net()
    opt = ZeroOptimizer(model.named_parameters(), torch.optim.Adam, lr=1e-2, align=8)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(p.shape, generator=gen) for p in ref.parameters()]
    for (n, _), g, r in zip(model.named_parameters(), grads, ref.parameters()):
        opt.set_full_grad(n, g)
        r.grad = g.clone()
    opt.step()
    ref_opt.step()
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
        value = torch.full(p.shape, 0.25)
        opt.set_full_state(n, "exp_avg", value)
        assert torch.equal(opt.get_full_state(n, "exp_avg"), value)


def torch_state_dicts(rank: int, ws: int) -> None:
    """A plain AdamW's state dict (and a consolidated one) loads at any world size."""
    sl = rank_slice(rank, ws)
    ref = Net()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        x, t = data(step)
        ref_opt.zero_grad()
        loss_of(ref, x, t).backward()
        ref_opt.step()
    sd = copy.deepcopy(ref_opt.state_dict())
    for stage in (1, 2):
        model = copy.deepcopy(ref)
        mirror = copy.deepcopy(ref)
        mirror_opt = torch.optim.AdamW(mirror.parameters(), lr=1e-2, weight_decay=0.1)
        mirror_opt.load_state_dict(copy.deepcopy(sd))
        opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=stage, lr=5.0, align=4)
        opt.load_state_dict(copy.deepcopy(sd))
        assert opt.param_groups[0]["lr"] == 1e-2 and opt.group_scalars(0)["step"] == 2
        for step in range(2, 4):
            x, t = data(step)
            loss_of(model, x[sl], t[sl]).backward()
            opt.step()
            mirror_opt.zero_grad()
            loss_of(mirror, x, t).backward()
            mirror_opt.step()
        for p, m in zip(model.parameters(), mirror.parameters()):
            torch.testing.assert_close(p, m, rtol=1e-5, atol=1e-6)
        # and the consolidated dict of a ZeroOptimizer loads into a fresh one
        full = opt.consolidate_state_dict(to=0)
        box = [full]
        if ws > 1:
            dist.broadcast_object_list(box, src=0)
        again = copy.deepcopy(model)
        opt2 = ZeroOptimizer(again.parameters(), torch.optim.AdamW, stage=stage, lr=1.0)
        opt2.load_state_dict(box[0])
        for i, p in enumerate(again.parameters()):
            assert torch.equal(opt2.get_full_state(p, "exp_avg"), opt.get_full_state(list(model.parameters())[i], "exp_avg"))


# ----- stage 2 reduces while backward runs -----------------------------------------------------


class Gate(torch.autograd.Function):
    """Identity; in backward on rank 1 it waits until rank 0 says it launched bucket 2."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, hold: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.hold = hold
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        if ctx.hold:
            STORE.wait(["rank0_launched_second_bucket"])
        return grad, None


STORE: Any = None


def in_flight(rank: int, ws: int) -> None:
    global STORE
    STORE = dist.distributed_c10d._get_default_store()
    model = Net(width=32)
    # each Linear weight (32x32 = 1024 elements) and each small tail gets its own bucket
    opt = ZeroOptimizer(model.named_parameters(), torch.optim.SGD, stage=2, lr=0.1,
                        bucket_numel=1100, max_in_flight=4)
    launches: list[tuple[int, int, int]] = []

    def observe(g: int, b: int, pending: int) -> None:
        launches.append((g, b, pending))
        if rank == 0 and len(launches) == 2:
            STORE.set("rank0_launched_second_bucket", "1")

    opt._reducer.launch_observers.append(observe)
    x, t = data(0)
    sl = rank_slice(rank, ws)
    out = Gate.apply(model(x[sl]), rank == 1)
    loss_of_out = ((out - t[sl]) ** 2).mean()
    loss_of_out.backward()
    assert len(launches) >= 3
    if rank == 0:
        # rank 1 had not joined any reduction yet: the first bucket was still pending when the
        # second was launched from inside backward
        assert launches[1][2] >= 1, launches
    opt.step()
    ref = Net(width=32)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss_of(ref, x, t).backward()
    ref_opt.step()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)


# ----- memory: what the optimizer owns equals the formula --------------------------------------


def memory(rank: int, ws: int) -> None:
    sl = rank_slice(rank, ws)
    x, t = data(0)
    for stage in (1, 2):
        for master_copy in (True, None):
            model = Net(width=64)
            bucket = 256
            opt = ZeroOptimizer(model.named_parameters(), torch.optim.Adam, stage=stage,
                                lr=1e-3, align=8, bucket_numel=bucket, max_in_flight=2,
                                master_copy=master_copy)
            for _ in range(2):
                loss_of(model, x[sl], t[sl]).backward()
                opt.step()
            (layout,) = opt.layouts
            P, W = layout.partition_numel, ws
            report = opt.memory_report()
            expect = {
                "masters": 4 * P if master_copy else 0,
                "states": 2 * 4 * P,  # exp_avg + exp_avg_sq, fp32
                "partition_grads": 4 * P,
                "flat_grads": 4 * W * P if stage == 1 else 0,
                # (in flight + 1) bucket buffers; on gloo also a receive buffer per peer for
                # each bucket in flight (pieces travel as point-to-point sends to their owner)
                "bucket_pool": (3 + 2 * (W - 1)) * 4 * bucket if stage == 2 else 0,
                "scratch": 0,  # stage 1 on gloo all-reduces its flat buffer in place
                "host_grads": 0,
            }
            expect["total"] = sum(expect.values())
            assert report == expect, (stage, master_copy, ws, report, expect)
            model_bytes = 4 * layout.numel
            if stage == 2:
                # ZeRO-2: no full-size gradient anywhere, only the pool and the partition
                assert report["bucket_pool"] < model_bytes
            assert opt._reducer._pools.get((torch.float32, torch.device("cpu"))) is None or all(
                pool.grown == 0 for pool in opt._reducer._pools.values()
            )
            assert all(p.grad is None for p in model.parameters())


# ----- knobs ------------------------------------------------------------------------------------


def knobs(rank: int, ws: int) -> None:
    """gradient_predivide_factor and comm_dtype change only where the rounding happens."""
    sl = rank_slice(rank, ws)
    finals = {}
    for label, options in (
        ("plain", {}),
        ("predivide", {"gradient_predivide_factor": 4.0}),
        ("bf16-comm", {"comm_dtype": torch.bfloat16}),
    ):
        for stage in (1, 2):
            model = Net()
            opt = ZeroOptimizer(model.named_parameters(), torch.optim.SGD, stage=stage, lr=0.1,
                                bucket_numel=100, **options)
            for step in range(3):
                x, t = data(step)
                loss_of(model, x[sl], t[sl]).backward()
                opt.step()
            finals[label, stage] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # torch's fused Adam kernel, passed through: steps the whole partition at once
    for stage in (1, 2):
        pair = []
        for fused in (False, True):
            model = Net()
            opt = ZeroOptimizer(model.named_parameters(), torch.optim.Adam, stage=stage, lr=1e-2,
                                fused=fused, step_chunk_numel=50)
            for step in range(3):
                x, t = data(step)
                loss_of(model, x[sl], t[sl]).backward()
                opt.step()
            assert opt.param_groups[0]["fused"] is fused
            pair.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        torch.testing.assert_close(pair[1], pair[0], rtol=1e-6, atol=1e-7)
    ref = finals["plain", 1]
    torch.testing.assert_close(finals["plain", 2], ref, rtol=1e-6, atol=1e-7)
    for stage in (1, 2):
        # dividing by a power of two before and after the sum is exact
        torch.testing.assert_close(finals["predivide", stage], ref, rtol=1e-6, atol=1e-7)
        diff = (finals["bf16-comm", stage] - ref).abs().max().item()
        assert diff < 1e-2, diff  # gradients rounded to bf16 on the wire
    for bad, match in (
        ({"gradient_predivide_factor": 0}, "gradient_predivide_factor"),
        ({"comm_dtype": torch.int8}, "comm_dtype"),
        ({"offload": "nvme"}, "offload"),
        ({"no_grad_rule": "maybe"}, "no_grad_rule"),
        ({"step_chunk_numel": -1}, "step_chunk_numel"),
        ({"comm_dtype": torch.float32, "reduce_dtype": torch.bfloat16}, "disagree"),
    ):
        with pytest.raises(ZeroConfigError, match=match):
            ZeroOptimizer(Net().named_parameters(), torch.optim.SGD, lr=0.1, **bad)


# ----- regressions from review: loss scale bookkeeping, set_full_grad, partial usage ---------


def review_regressions(rank: int, ws: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4)

    def linear(**kw: Any) -> tuple[torch.nn.Linear, ZeroOptimizer, torch.nn.Linear]:
        m = torch.nn.Linear(4, 3)
        with torch.no_grad():
            m.weight.copy_(torch.arange(12.0).reshape(3, 4) / 10)
            m.bias.fill_(0.5)
        ref = copy.deepcopy(m)
        return m, ZeroOptimizer(m.named_parameters(), torch.optim.SGD, lr=1.0, **kw), ref

    # a gradient set by hand is the unscaled, averaged gradient, even under loss scaling
    m, opt, _ = linear(loss_scale=1024.0)
    w0 = m.weight.detach().clone()
    opt.set_full_grad("weight", torch.ones(3, 4))
    opt.step()
    assert torch.equal(w0 - m.weight.detach(), torch.ones(3, 4))
    # backward, clip, backward, step: each gradient unscaled exactly once
    for stage in (1, 2):
        m, opt, ref = linear(loss_scale=1024.0, stage=stage)
        opt.backward(m(x).sum())
        opt.clip_grad_norm(1e9)
        opt.backward(m(x).sum())
        opt.step()
        ref(x).sum().backward()
        ref(x).sum().backward()
        torch.testing.assert_close(m.weight.detach(), ref.weight.detach() - ref.weight.grad)
        # no_sync after clip: its gradient belongs to this step, not the next
        m, opt, ref = linear(stage=stage)
        opt.backward(m(x).sum())
        opt.clip_grad_norm(1e9)
        with opt.no_sync():
            m(x).sum().backward()
        opt.step()
        assert m.weight.grad is None
        ref(x).sum().backward()
        ref(x).sum().backward()
        torch.testing.assert_close(m.weight.detach(), ref.weight.detach() - ref.weight.grad)
        # set_full_grad replaces what no_sync collected
        m, opt, _ = linear(stage=stage)
        with opt.no_sync():
            m(x).sum().backward()
        w0 = m.weight.detach().clone()
        opt.set_full_grad("weight", torch.zeros(3, 4))
        opt.step()
        assert torch.equal(m.weight.detach(), w0)
    # zero_grad(set_to_none=False): zero gradients are applied like torch (momentum moves)
    m, opt, ref = linear(momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0, momentum=0.9)
    for step in range(3):
        opt.zero_grad(set_to_none=False)
        ref_opt.zero_grad(set_to_none=False)
        use_bias = step == 0
        out, rout = m(x), ref(x)
        if not use_bias:
            out, rout = out - m.bias, rout - ref.bias
        out.sum().backward()
        rout.sum().backward()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(m.bias.detach(), ref.bias.detach())
    if ws > 1:
        # a param used on one rank only is stepped with the average on every rank, never
        # half-skipped (b straddles the partition boundary)
        for stage in (1, 2):
            a = torch.nn.Parameter(torch.ones(4))
            b = torch.nn.Parameter(torch.ones(8))
            opt = ZeroOptimizer([("a", a), ("b", b)], torch.optim.SGD, lr=1.0, stage=stage)
            loss = a.sum() + (b.sum() if rank == ws - 1 else 0.0)
            loss.backward()
            opt.step()
            torch.testing.assert_close(b.detach(), torch.full((8,), 1.0 - 1.0 / ws))


# ----- runs -------------------------------------------------------------------------------------

SCENARIOS = {
    "pile_up": pile_up,
    "no_grad_rule": no_grad_rule,
    "torch_surface": torch_surface,
    "torch_state_dicts": torch_state_dicts,
    "memory": memory,
    "knobs": knobs,
    "review_regressions": review_regressions,
}
_RESULTS: dict[int, dict[str, dict[int, str | None]]] = {}


def results_for(ws: int) -> dict[str, dict[int, str | None]]:
    if ws not in _RESULTS:
        scenarios = [(name, fn, ()) for name, fn in SCENARIOS.items()]
        if ws == 2:
            scenarios.append(("in_flight", in_flight, ()))
        _RESULTS[ws] = run_scenarios(scenarios, ws, timeout_s=300)
    return _RESULTS[ws]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_world_size_1(name: str) -> None:
    assert not dist.is_initialized()
    SCENARIOS[name](0, 1)


@pytest.mark.parametrize("ws", [2, 3])
@pytest.mark.parametrize(
    "name",
    ["pile_up", "no_grad_rule", "torch_surface", "torch_state_dicts", "knobs", "review_regressions"],
)
def test_gloo(name: str, ws: int) -> None:
    check(results_for(ws), name, ws)


@pytest.mark.parametrize("ws", [2, 3, 4])
def test_memory_equals_formula(ws: int) -> None:
    check(results_for(ws), "memory", ws)


def test_stage2_reduction_in_flight_during_backward() -> None:
    check(results_for(2), "in_flight", 2)


# ----- loss scale: DeepSpeed's rule -----------------------------------------------------------


def deepspeed_sequence(pattern: list[bool], init: float, window: int, hysteresis: int,
                       consecutive: bool = False, min_scale: float = 1.0) -> list[float]:
    """DynamicLossScaler.update_scale of deepspeed/runtime/fp16/loss_scaler.py (0.19.8),
    transcribed: the scale after each step of ``pattern`` (True = overflow)."""
    scale, cur_iter, last, cur_h, out = init, 0, -1, hysteresis, []
    for overflow in pattern:
        if overflow:
            if hysteresis == 1 or cur_h == 1:
                scale = max(scale / 2.0, min_scale)
            else:
                cur_h -= 1
            last = cur_iter
        else:
            if consecutive:
                cur_h = hysteresis
            stable = cur_iter - last - 1
            if stable > 0 and stable % window == 0:
                if not consecutive:
                    cur_h = hysteresis
                scale *= 2.0
        cur_iter += 1
        out.append(scale)
    return out


PATTERN = [False, True, False, True, True, False, False, False, False, True] + [False] * 9 + [True, True, True]


@pytest.mark.parametrize("hysteresis,consecutive", [(1, False), (2, False), (2, True), (3, False)])
def test_loss_scale_sequence_is_deepspeeds(hysteresis: int, consecutive: bool) -> None:
    scaler = LossScaler(2.0**8, scale_window=4, hysteresis=hysteresis,
                        consecutive_hysteresis=consecutive)
    got = []
    for overflow in PATTERN:
        scaler.update(overflow)
        got.append(scaler.scale)
    assert got == deepspeed_sequence(PATTERN, 2.0**8, 4, hysteresis, consecutive)


def test_loss_scale_literal_sequence() -> None:
    """The numbers by hand, so a wrong transcription above cannot hide a wrong rule."""
    scaler = LossScaler(256.0, scale_window=2)  # DeepSpeed's default hysteresis 2
    seq = []
    for overflow in [False, False, False, True, True, False, False, False, True, False]:
        scaler.update(overflow)
        seq.append(scaler.scale)
    # iter 2: stable 2 -> 512; iter 3: hysteresis 2 -> 1, no change; iter 4: halve -> 256;
    # iters 5, 6: stable 0, 1; iter 7: stable 2 -> 512 (hysteresis refilled); iter 8: overflow
    # uses it up (2 -> 1); iter 9: stable 0
    assert seq == [256, 256, 512, 512, 256, 256, 256, 512, 512, 512]
    defaults = LossScaler()
    assert (defaults.scale, defaults.scale_window, defaults.hysteresis, defaults.min_scale) == (
        2.0**16, 1000, 2, 1.0)


PEERS_PY = Path(__file__).resolve().parents[1] / ".venv-peers" / "bin" / "python"


@pytest.mark.skipif(not PEERS_PY.exists(), reason="needs .venv-peers with deepspeed (make test builds it)")
def test_loss_scale_sequence_equals_real_deepspeed() -> None:
    code = f"""
import json, deepspeed.runtime.fp16.loss_scaler as ls
ls.dist.get_rank = lambda *a, **k: 0
out = {{}}
for h, c in [(1, False), (2, False), (2, True), (3, False)]:
    s = ls.DynamicLossScaler(init_scale=2.0**8, scale_window=4, min_scale=1.0, delayed_shift=h,
                             consecutive_hysteresis=c, raise_error_at_min_scale=False)
    seq = []
    for o in {PATTERN!r}:
        s.update_scale(o); seq.append(s.cur_scale)
    out[f"{{h}}-{{c}}"] = seq
print(json.dumps(out))
"""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([str(PEERS_PY), "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    want = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, seq in want.items():
        h, c = key.split("-")
        scaler = LossScaler(2.0**8, scale_window=4, hysteresis=int(h), consecutive_hysteresis=c == "True")
        got = []
        for overflow in PATTERN:
            scaler.update(overflow)
            got.append(scaler.scale)
        assert got == seq, key
