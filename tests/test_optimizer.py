"""ZeroOptimizer against plain torch optimizers, on real gloo process groups.

Each spawned run (one per world size) executes many configurations, because starting the
processes (torch import) costs seconds. Every rank gets its slice of the same global batch
with a mean-reduced loss, so the averaged gradient is the full-batch gradient the reference
(a plain, single-process torch optimizer on the same model, computed on every rank) sees.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _dist import check, run_scenarios
from zero_core import ZeroConfigError, ZeroOptimizer, ZeroStateDictError

BATCH = 12  # divisible by every world size tested
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


# ----- model and data -----------------------------------------------------------------------


class Net(torch.nn.Module):
    """Params of odd sizes (13x5, 7, 3x13, 3) and one frozen param."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter((torch.randn(13, 5, generator=gen) * 0.4).to(dtype))
        self.a = torch.nn.Parameter(torch.randn(7, generator=gen).to(dtype))
        self.v = torch.nn.Parameter((torch.randn(3, 13, generator=gen) * 0.4).to(dtype))
        self.c = torch.nn.Parameter(torch.randn(3, generator=gen).to(dtype))
        self.frozen = torch.nn.Parameter(torch.randn(4, generator=gen).to(dtype), requires_grad=False)

    def loss(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, t = x.to(self.w.dtype), t.to(self.w.dtype)
        h = torch.tanh(x @ self.w.T)
        y = h @ self.v.T + self.c
        z = (h[:, :7] * self.a).sum(-1) + self.frozen.sum()
        return ((y - t) ** 2).mean() + 0.1 * (z**2).mean()


def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(BATCH, 5, generator=gen), torch.randn(BATCH, 3, generator=gen)


def named_groups(model: Net, lrs: tuple[float, float]) -> list[dict[str, Any]]:
    return [
        {"params": [("w", model.w), ("a", model.a)], "lr": lrs[0]},
        {"params": [("v", model.v), ("frozen", model.frozen), ("c", model.c)], "lr": lrs[1]},
    ]


TRAINABLE = ("w", "a", "v", "c")


@dataclass
class Config:
    cls: type
    stage: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    lrs: tuple[float, float] = (1e-2, 3e-2)
    align: int = 1
    bucket_numel: int = 1 << 20
    accum: int = 1
    use_no_sync: bool = False
    no_sync_last: bool = False  # also the last micro-batch: step() reduces what is left
    clip: float | None = None
    sched: bool = False
    steps: int = 3
    step_chunk: int = 0  # ZeroOptimizer's step_chunk_numel (0: whole partition)
    tol: dict[str, float] = field(default_factory=lambda: dict(TIGHT))


CONFIGS = {
    "adam-s1-clip": Config(torch.optim.Adam, 1, clip=0.5),
    "adam-s2-nosync-buckets": Config(
        torch.optim.Adam, 2, accum=2, use_no_sync=True, clip=0.3, bucket_numel=16
    ),
    "adam-s2-nosync-all": Config(
        torch.optim.Adam, 2, accum=2, use_no_sync=True, no_sync_last=True, bucket_numel=30
    ),
    "adamw-s2-accum-sched": Config(
        torch.optim.AdamW, 2, {"weight_decay": 0.1}, align=4, accum=2, sched=True, bucket_numel=40
    ),
    "sgd-s1-accum": Config(torch.optim.SGD, 1, {"momentum": 0.9}, lrs=(0.1, 0.05), accum=2, clip=1.0),
    "sgd-s2-align64": Config(
        torch.optim.SGD, 2, {"momentum": 0.9, "nesterov": True}, lrs=(0.1, 0.05), align=64
    ),
    "adagrad-s2": Config(
        torch.optim.Adagrad, 2, {"initial_accumulator_value": 0.1}, align=8, step_chunk=9
    ),
    # centered RMSprop divides by sqrt(E[g^2] - E[g]^2): a cancellation that turns fp32
    # rounding of the averaged gradient (1/3 is inexact) into ~1e-5 relative differences
    "rmsprop-s1": Config(
        torch.optim.RMSprop, 1, {"momentum": 0.5, "centered": True}, lrs=(1e-2, 2e-2), clip=0.5,
        step_chunk=7,
        tol={"rtol": 1e-4, "atol": 1e-5},
    ),
}


# ----- the parity scenario -----------------------------------------------------------------


def run_parity(rank: int, world_size: int, cfg: Config) -> None:
    lo, hi = rank * BATCH // world_size, (rank + 1) * BATCH // world_size
    model, ref = Net(), Net()
    frozen0 = model.frozen.detach().clone()
    opt = ZeroOptimizer(
        named_groups(model, cfg.lrs),
        cfg.cls,
        stage=cfg.stage,
        align=cfg.align,
        bucket_numel=cfg.bucket_numel,
        step_chunk_numel=cfg.step_chunk,
        **cfg.kwargs,
    )
    ref_opt = cfg.cls(named_groups(ref, cfg.lrs), **cfg.kwargs)
    scheds = []
    if cfg.sched:
        scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7) for o in (opt, ref_opt)]

    for step in range(cfg.steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        for micro in range(cfg.accum):
            x, t = batch(step, micro)
            (ref.loss(x, t) / cfg.accum).backward()
            last = micro == cfg.accum - 1
            local = cfg.use_no_sync and (cfg.no_sync_last or not last)
            ctx = opt.no_sync() if local else contextlib.nullcontext()
            with ctx:
                (model.loss(x[lo:hi], t[lo:hi]) / cfg.accum).backward()
        if cfg.clip is not None:
            trainable = [p for p in ref.parameters() if p.requires_grad]
            ref_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
            norm = opt.clip_grad_norm(cfg.clip)
            torch.testing.assert_close(norm, ref_norm, **cfg.tol)
            assert float(norm) > cfg.clip, "clip threshold should be active in this test"
        opt.step()
        ref_opt.step()
        for s in scheds:
            s.step()
        for name in TRAINABLE:
            torch.testing.assert_close(
                getattr(model, name), getattr(ref, name), **cfg.tol, msg=lambda m: f"{name}: {m}"
            )
        assert torch.equal(model.frozen, frozen0)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
        assert all(getattr(model, n).grad is None for n in TRAINABLE)  # consumed by reduction

    check_fragment_access(opt, ref, ref_opt, rank, cfg.tol)
    check_bridge(opt, model, ref_opt, cfg, world_size)
    check_consolidate(opt, ref, ref_opt, cfg, rank, world_size)


def check_fragment_access(
    opt: ZeroOptimizer, ref: Net, ref_opt: Any, rank: int, tol: dict[str, float]
) -> None:
    for name in TRAINABLE:
        ref_param = getattr(ref, name)
        g = 0 if name in ("w", "a") else 1
        layout = opt.layouts[g]
        i = layout.index_of(name)
        full = opt.get_full_master(name)
        assert full.dtype == torch.float32 and full.shape == ref_param.shape
        torch.testing.assert_close(full, ref_param.detach(), **tol)
        assert torch.equal(opt.get_full_master(opt.group_params(g)[i]), full)  # by param
        ref_state = ref_opt.state[ref_param]
        for key, value in ref_state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                assert torch.equal(torch.as_tensor(opt.get_full_state(name, key)), value)
                continue
            torch.testing.assert_close(opt.get_full_state(name, key), value, **tol)
            frag, view = opt.get_local_fragment(name, key)
            if frag is None:
                assert view.numel() == 0
                continue
            assert frag.rank == rank
            expect = value.reshape(-1)[frag.param_start : frag.param_start + frag.numel]
            torch.testing.assert_close(view, expect, **tol)
        frag, view = opt.get_local_fragment(name)
        if frag is not None:
            expect = ref_param.detach().reshape(-1)[frag.param_start : frag.param_start + frag.numel]
            torch.testing.assert_close(view, expect, **tol)
        # every element is owned exactly once
        assert sum(f.numel for f in layout.fragments_of_param(i)) == ref_param.numel()


def check_bridge(
    opt: ZeroOptimizer, model: Net, ref_opt: Any, cfg: Config, world_size: int
) -> None:
    assert opt.world_size == world_size and opt.stage == cfg.stage and opt.align == cfg.align
    assert [p.name for p in opt.layouts[0].params] == ["w", "a"]
    assert [p.name for p in opt.layouts[1].params] == ["v", "c"]  # frozen left out
    for g, layout in enumerate(opt.layouts):
        pn = layout.partition_numel
        assert layout.world_size == world_size and layout.align == cfg.align
        master = opt.master_partition(g)
        assert master.dtype == torch.float32 and master.shape == (pn,)
        real = layout.real_numel(opt.rank)
        assert torch.count_nonzero(master[real:]) == 0, "padding must stay zero"
        parts = opt.state_partitions(g)
        ref_keys = {
            k for k, v in next(iter(ref_opt.state.values())).items()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        }
        assert set(parts) == ref_keys
        assert all(t.shape == (pn,) and t.dtype == torch.float32 for t in parts.values())
        scalars = opt.group_scalars(g)
        if "step" in scalars:
            assert scalars["step"] == cfg.steps and isinstance(scalars["step"], int)
        hp = opt.group_hyperparams(g)
        assert "params" not in hp and hp["lr"] == opt.param_groups[g]["lr"]
        if "betas" in hp:
            assert isinstance(hp["betas"], list)
    assert opt.group_params(0)[0] is model.w and opt.group_params(0)[1] is model.a
    assert opt.group_params(1)[0] is model.v and opt.group_params(1)[1] is model.c
    assert opt.loss_scaler_state() == {}


def check_consolidate(
    opt: ZeroOptimizer, ref: Net, ref_opt: Any, cfg: Config, rank: int, world_size: int
) -> None:
    to = world_size - 1
    sd = opt.consolidate_state_dict(to=to)
    if rank != to:
        assert sd is None
        return
    plain = cfg.cls(named_groups(copy.deepcopy(ref), cfg.lrs), **cfg.kwargs)
    plain.load_state_dict(sd)
    got, want = plain.state_dict(), ref_opt.state_dict()
    assert sorted(got["state"]) == sorted(want["state"])
    for pid, st in want["state"].items():
        assert list(got["state"][pid]) == list(st), pid
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                assert got["state"][pid][key].dtype == value.dtype
                assert got["state"][pid][key].shape == value.shape
                torch.testing.assert_close(got["state"][pid][key], value, **cfg.tol)
            else:
                assert got["state"][pid][key] == value
    for g_got, g_want in zip(got["param_groups"], want["param_groups"]):
        assert g_got == g_want
    # Also accepted by an optimizer built from unnamed params.
    unnamed = [
        {"params": [ref.w, ref.a], "lr": cfg.lrs[0]},
        {"params": [ref.v, ref.frozen, ref.c], "lr": cfg.lrs[1]},
    ]
    cfg.cls(unnamed, **cfg.kwargs).load_state_dict(sd)


def parity_worker(rank: int, world_size: int, name: str) -> None:
    run_parity(rank, world_size, CONFIGS[name])


PARITY_RUNS = {
    2: ["adam-s1-clip", "adam-s2-nosync-buckets", "adam-s2-nosync-all", "adamw-s2-accum-sched",
        "sgd-s1-accum", "sgd-s2-align64"],
    3: ["adam-s1-clip", "adam-s2-nosync-buckets", "adamw-s2-accum-sched", "adagrad-s2",
        "rmsprop-s1"],
    4: ["adam-s2-nosync-buckets", "adamw-s2-accum-sched", "sgd-s1-accum", "sgd-s2-align64"],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_world_size_1_without_process_group(name: str) -> None:
    assert not dist.is_initialized()
    parity_worker(0, 1, name)


@pytest.mark.parametrize(
    "world_size,name", [(ws, name) for ws, names in PARITY_RUNS.items() for name in names]
)
def test_parity_gloo(world_size: int, name: str) -> None:
    check(results_for(world_size), name, world_size)


# ----- checkpoint round trips and add_param_group (world size 2) ----------------------------


def roundtrip_worker(rank: int, world_size: int) -> None:
    def train(model: Net, opt: ZeroOptimizer, steps: range) -> None:
        lo, hi = rank * BATCH // world_size, (rank + 1) * BATCH // world_size
        for step in steps:
            opt.zero_grad()
            x, t = batch(step, 0)
            model.loss(x[lo:hi], t[lo:hi]).backward()
            opt.step()

    def make(align: int = 4) -> tuple[Net, ZeroOptimizer]:
        model = Net()
        return model, ZeroOptimizer(named_groups(model, (1e-2, 2e-2)), torch.optim.AdamW,
                                    align=align, weight_decay=0.01)

    model_a, opt_a = make()
    train(model_a, opt_a, range(3))

    # 1. state_dict / load_state_dict (through bytes, as torch.save users do)
    import io

    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    model_b, opt_b = make()
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    for name in TRAINABLE:
        assert torch.equal(getattr(model_b, name), getattr(model_a, name))

    # 2. the bridge: partitions, scalars, hyperparams copied by hand (real elements only)
    model_c, opt_c = make()
    opt_c.param_groups[0]["lr"] = 123.0
    for g, layout in enumerate(opt_a.layouts):
        n = layout.real_numel(rank)
        tensors = {"master": opt_a.master_partition(g)[:n].clone()}
        tensors.update({k: v[:n].clone() for k, v in opt_a.state_partitions(g).items()})
        opt_c.load_partition(g, tensors, opt_a.group_scalars(g))
        opt_c.load_hyperparams(g, opt_a.group_hyperparams(g))
        assert isinstance(opt_c.param_groups[g]["betas"], tuple)
        assert opt_c.state[opt_c.master_partition(g)] is not None
    opt_c.sync_model_from_masters()
    assert opt_c.param_groups[0]["lr"] == 1e-2

    train(model_a, opt_a, range(3, 5))
    train(model_b, opt_b, range(3, 5))
    train(model_c, opt_c, range(3, 5))
    for name in TRAINABLE:
        assert torch.equal(getattr(model_b, name), getattr(model_a, name)), name
        assert torch.equal(getattr(model_c, name), getattr(model_a, name)), name
    assert opt_c.group_scalars(0) == {"step": 5}

    # 3. mismatches are refused with a clear error
    sd = opt_a.state_dict()
    bad = {**sd, "zero_optimizer": {**sd["zero_optimizer"], "world_size": 8}}
    with pytest.raises(ZeroStateDictError, match="world size 8"):
        opt_b.load_state_dict(bad)
    _, opt_other_align = make(align=1)
    with pytest.raises(ZeroStateDictError, match="layout differs"):
        opt_other_align.load_state_dict(sd)
    with pytest.raises(ZeroStateDictError, match="at most"):
        opt_b.load_partition(0, {"master": torch.zeros(10_000)}, {})

    # 4. set_full_master updates master fragments and model on every rank
    new_w = torch.arange(65, dtype=torch.float32).reshape(13, 5)
    opt_a.set_full_master("w", new_w)
    assert torch.equal(model_a.w, new_w)
    assert torch.equal(opt_a.get_full_master(model_a.w), new_w)

    # 5. add_param_group (collective): a new param joins training
    extra = torch.nn.Parameter(torch.ones(5))
    opt_a.add_param_group({"params": [("extra", extra)], "lr": 0.5})
    assert len(opt_a.layouts) == 3 and opt_a.layouts[2].params[0].name == "extra"
    opt_a.zero_grad()
    (extra * torch.arange(5.0)).sum().backward()
    opt_a.step()
    assert not torch.equal(extra.detach(), torch.ones(5))
    torch.testing.assert_close(opt_a.get_full_master("extra"), extra.detach())


def test_state_dict_roundtrips_gloo() -> None:
    check(results_for(2), "roundtrip", 2)


# ----- mixed precision and loss scaling (world size 2) --------------------------------------


def mixed_precision_worker(rank: int, world_size: int) -> None:
    lo, hi = rank * BATCH // world_size, (rank + 1) * BATCH // world_size

    # bf16 model, fp32 masters
    for stage in (1, 2):
        model = Net(torch.bfloat16)
        opt = ZeroOptimizer(model.named_parameters(), torch.optim.AdamW, stage=stage, lr=2e-2)
        assert opt.master_partition(0).dtype == torch.float32
        x, t = batch(0, 0)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = model.loss(x[lo:hi], t[lo:hi])
            loss.backward()
            opt.step()
            full_loss = loss.detach().float()
            dist.all_reduce(full_loss)
            losses.append(float(full_loss) / world_size)
        assert losses[-1] < 0.8 * losses[0], losses
        for name in TRAINABLE:
            p = getattr(model, name)
            assert p.dtype == torch.bfloat16
            assert torch.equal(opt.get_full_master(name).to(torch.bfloat16), p.detach())

    # fp16 with dynamic loss scaling: inject inf on rank 1 only, every rank skips the step
    for stage in (1, 2):
        model = Net(torch.float16)
        opt = ZeroOptimizer(
            model.named_parameters(), torch.optim.Adam, stage=stage, lr=1e-2,
            loss_scale="dynamic",
            loss_scale_options={"init_scale": 1024.0, "scale_window": 2, "hysteresis": 1},
        )
        x, t = batch(1, 0)

        def one_step(inject: bool) -> None:
            opt.zero_grad()
            loss = model.loss(x[lo:hi], t[lo:hi])
            if inject:
                loss = loss * torch.tensor(float("inf"), dtype=loss.dtype)
            opt.backward(loss)
            opt.step()

        one_step(False)
        assert not opt.last_step_skipped and opt.loss_scale == 1024.0
        before_master = [opt.master_partition(g).clone() for g in range(len(opt.layouts))]
        before_model = [p.detach().clone() for p in model.parameters()]
        before_step = opt.group_scalars(0)["step"]
        one_step(inject=(rank == 1))
        assert opt.last_step_skipped, f"rank {rank} did not skip the overflowing step"
        assert opt.loss_scale == 512.0
        assert opt.group_scalars(0)["step"] == before_step == 1
        for g, m in enumerate(before_master):
            assert torch.equal(opt.master_partition(g), m)
        for p, b in zip(model.parameters(), before_model):
            assert torch.equal(p.detach(), b)
        one_step(False)
        one_step(False)
        assert opt.loss_scale == 512.0  # DeepSpeed's rule: stable = iter - last_overflow - 1
        one_step(False)
        assert not opt.last_step_skipped and opt.loss_scale == 1024.0  # stable reached 2
        assert opt.group_scalars(0)["step"] == 4
        state = opt.state_dict()["loss_scaler"]
        assert state["scale"] == 1024.0 and state["overflows"] == 1
        assert opt.loss_scaler_state() == state
        for name in TRAINABLE:
            assert torch.isfinite(getattr(model, name)).all()


def test_mixed_precision_and_loss_scaling_gloo() -> None:
    check(results_for(2), "mixed_precision", 2)


# ----- errors -------------------------------------------------------------------------------


class Lamb(torch.optim.Adam):
    """Stands in for a LAMB implementation (refused by name)."""


class TrustRatioAdam(torch.optim.Adam):
    """A LARS-style optimizer exposing a per-tensor hyperparameter."""

    def __init__(self, params: Any, lr: float = 1e-3, trust_coefficient: float = 0.001) -> None:
        super().__init__(params, lr=lr)
        self.defaults["trust_coefficient"] = trust_coefficient


class ElementwiseLambNamed(torch.optim.Adam):
    elementwise = True


def errors_worker(rank: int, world_size: int) -> None:
    model = Net()
    with pytest.raises(ZeroConfigError, match="Lamb is not an elementwise optimizer"):
        ZeroOptimizer(model.named_parameters(), Lamb, lr=1e-3)
    with pytest.raises(ZeroConfigError, match="trust_coefficient"):
        ZeroOptimizer(model.named_parameters(), TrustRatioAdam, lr=1e-3)
    with pytest.raises(ZeroConfigError, match="not an elementwise"):
        ZeroOptimizer(model.named_parameters(), torch.optim.LBFGS)
    with pytest.raises(ZeroConfigError, match="stage must be 1"):
        ZeroOptimizer(model.named_parameters(), torch.optim.Adam, stage=3)
    with pytest.raises(ZeroConfigError, match="empty parameter list"):
        ZeroOptimizer([], torch.optim.Adam)
    with pytest.raises(ZeroConfigError, match="loss_scale"):
        ZeroOptimizer(model.named_parameters(), torch.optim.Adam, loss_scale="sometimes")

    # An explicit hint allows a custom class (collective construction: all ranks do it).
    ZeroOptimizer(Net().named_parameters(), ElementwiseLambNamed, lr=1e-3)

    # Params that differ across ranks are refused on every rank, naming the difference.
    other = Net()
    if rank == 1:
        other.v = torch.nn.Parameter(torch.zeros(3, 14))
    with pytest.raises(ZeroConfigError, match="differ across ranks") as info:
        ZeroOptimizer(other.named_parameters(), torch.optim.Adam)
    message = str(info.value)
    assert "group 0 param 2" in message and "(3, 13)" in message and "(3, 14)" in message
    assert "same model" in message

    fewer = Net()
    params = list(fewer.named_parameters())
    if rank == 0:
        params = params[:-2]  # drop c (and the frozen one)
    with pytest.raises(ZeroConfigError, match="rank 0 has 3 trainable params, rank 1 has 4"):
        ZeroOptimizer(params, torch.optim.Adam)

    # Still usable afterwards: the group is not left half-way through a collective.
    ok = ZeroOptimizer(Net().named_parameters(), torch.optim.SGD, lr=0.1)
    assert ok.get_full_master("w").shape == (13, 5)
    with pytest.raises(KeyError, match="frozen"):
        ok.get_full_master("frozen")


def test_errors_gloo() -> None:
    check(results_for(2), "errors", 2)


# One spawn per world size runs every scenario of that size; tests read their outcome.
_RESULTS: dict[int, dict[str, dict[int, str | None]]] = {}


def results_for(world_size: int) -> dict[str, dict[int, str | None]]:
    if world_size not in _RESULTS:
        scenarios = [(name, parity_worker, (name,)) for name in PARITY_RUNS[world_size]]
        if world_size == 2:
            scenarios += [
                ("roundtrip", roundtrip_worker, ()),
                ("mixed_precision", mixed_precision_worker, ()),
                ("errors", errors_worker, ()),
            ]
        _RESULTS[world_size] = run_scenarios(scenarios, world_size)
    return _RESULTS[world_size]


def test_single_process_errors_and_names() -> None:
    m = Net()
    opt = ZeroOptimizer(
        [{"params": [m.w, m.a]}, {"params": [m.v, m.frozen, m.c], "lr": 0.5}],
        torch.optim.SGD,
        lr=0.1,
    )
    assert [p.name for p in opt.layouts[1].params] == ["group1.param0", "group1.param2"]
    assert opt.param_groups[1]["zero_param_names"] == ["group1.param0", "group1.param2"]
    with pytest.raises(ZeroConfigError, match="with names and some without"):
        ZeroOptimizer([("w", Net().w), Net().a], torch.optim.SGD, lr=0.1)
    n = Net()
    with pytest.raises(ZeroConfigError, match="more than once"):
        ZeroOptimizer([n.w, n.w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ZeroConfigError, match="separate param groups"):
        ZeroOptimizer([n.w, torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))],
                      torch.optim.SGD, lr=0.1)


def test_import_zero_core_does_not_import_torch() -> None:
    code = (
        "import sys, zero_core, zero_core.layout\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'torch.distributed' not in sys.modules\n"
        "from zero_core import ZeroOptimizer\n"
        "assert 'zero_ckpt' not in sys.modules and 'fsspec' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
