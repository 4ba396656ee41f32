"""``zero_ckpt.save`` / ``zero_ckpt.load`` with a live ZeroOptimizer on real gloo process groups.

Checkpoints are saved at world size N and loaded at M for (4->2, 2->3, 1->4, 3->3). The runs
happen in this order, each world size in ONE spawn that runs many scenarios (starting
processes costs seconds): world size 1 in this process (no process group), then 4, 2 and 3,
each loading what an earlier run saved and saving for a later one. Every test reads its
scenario's outcome.

What "identical" means after a resharded load: continuing at the new world size M from the
loaded checkpoint is compared with

* a ZeroOptimizer at M fed the same state by hand (full tensors saved at N cut with the
  layout math, through ``load_partition``), trained in lockstep: **bit-exact** (``torch.equal``)
  because the math is the same: the same partitions, the same gradient reductions at M;
* a plain single-process torch optimizer given the same state (``consolidate_state_dict`` at
  N) and the full batch: equal **to fp32 rounding** only, because the ranks' averaged
  gradient sums M partial gradients in a different order than the full-batch backward does;
* for 3->3 (and the fp16 run at 2->2): the original optimizer continuing without the save,
  **bit-exact**.

Right after a load the full masters, every state, ``step``, hyperparameters, the model's
buffers and frozen params equal what was saved, bit for bit, and the model's params equal
the masters cast to the model dtype.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _dist import check, run_scenarios
import zero_ckpt
from zero_ckpt.errors import (
    CheckpointError,
    CorruptShardError,
    DestinationExistsError,
    IncompleteCheckpointError,
    LayoutMismatchError,
    ManifestError,
)
from zero_core import ZeroOptimizer
from zero_core.averagers import PeriodicModelAverager

BATCH = 12  # divisible by every world size used
TIGHT = {"rtol": 1e-5, "atol": 1e-6}
TRAINED_STEPS = 3  # before the save
MORE_STEPS = 3  # after the load
LRS = (1e-2, 3e-2)
CHANGED_LR = 0.02  # group 1's lr, set just before saving: must survive the load
EXTRA = {"epoch": 7, "note": "user data", "nested": {"seen": [1, 2, 3]}}


# ----- model, data, optimizer ----------------------------------------------------------------


class Net(torch.nn.Module):
    """Params of odd sizes (wide x 7, wide, 5 x wide, 5), a frozen param and two buffers
    (a float one used in the forward and an int64 counter the forward increments)."""

    def __init__(self, dtype: torch.dtype = torch.float32, wide: int = 17, extra: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter((torch.randn(wide, 7, generator=gen) * 0.3).to(dtype))
        self.b1 = torch.nn.Parameter((torch.randn(wide, generator=gen) * 0.1).to(dtype))
        self.w2 = torch.nn.Parameter((torch.randn(5, wide, generator=gen) * 0.3).to(dtype))
        self.frozen = torch.nn.Parameter(torch.randn(5, generator=gen).to(dtype), requires_grad=False)
        self.b2 = torch.nn.Parameter((torch.randn(5, generator=gen) * 0.1).to(dtype))
        if extra:
            self.b3 = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
        self.register_buffer("scale", torch.tensor([1.5, 0.5, 1.0, 2.0, 1.25], dtype=dtype))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def loss(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x, t = x.to(self.w1.dtype), t.to(self.w1.dtype)
        h = torch.tanh(x @ self.w1.T + self.b1)
        y = (h @ self.w2.T + self.b2 + self.frozen) * self.scale
        if hasattr(self, "b3"):
            y = y + self.b3
        return ((y - t) ** 2).mean()


TRAINABLE = ("w1", "b1", "w2", "b2")


def groups_of(model: Net, lrs: tuple[float, float] = LRS) -> list[dict[str, Any]]:
    second = [("w2", model.w2), ("frozen", model.frozen), ("b2", model.b2)]
    if hasattr(model, "b3"):
        second.append(("b3", model.b3))
    return [
        {"params": [("w1", model.w1), ("b1", model.b1)], "lr": lrs[0]},
        {"params": second, "lr": lrs[1]},
    ]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 7, generator=gen), torch.randn(BATCH, 5, generator=gen)


@dataclass
class Config:
    save_ws: int
    load_ws: int
    cls: type
    stage: int
    align: int
    kwargs: dict[str, Any] = field(default_factory=dict)


CONFIGS = {
    "4to2": Config(4, 2, torch.optim.AdamW, 2, 4, {"weight_decay": 0.05}),
    "2to3": Config(2, 3, torch.optim.Adam, 1, 1, {"amsgrad": True}),
    "1to4": Config(1, 4, torch.optim.AdamW, 2, 64, {"weight_decay": 0.01}),  # ranks 2, 3 short/empty
    "3to3": Config(3, 3, torch.optim.Adam, 2, 4, {}),
}


def make(cfg: Config, **net_kwargs: Any) -> tuple[Net, ZeroOptimizer]:
    model = Net(**net_kwargs)
    opt = ZeroOptimizer(
        groups_of(model), cfg.cls, stage=cfg.stage, align=cfg.align, bucket_numel=50, **cfg.kwargs
    )
    return model, opt


def train(model: Net, opt: ZeroOptimizer, rank: int, ws: int, steps: range) -> None:
    lo, hi = rank * BATCH // ws, (rank + 1) * BATCH // ws
    for step in steps:
        opt.zero_grad()
        x, t = batch(step)
        opt.backward(model.loss(x[lo:hi], t[lo:hi]))
        opt.step()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----- snapshots -----------------------------------------------------------------------------


def snapshot(opt: ZeroOptimizer, model: Net) -> dict[str, Any]:
    """Full (unsharded) optimizer and model state. Collective."""
    masters, states = {}, {}
    for g, layout in enumerate(opt.layouts):
        keys = list(opt.state_partitions(g))
        for spec in layout.params:
            masters[spec.name] = opt.get_full_master(spec.name)
            states[spec.name] = {k: opt.get_full_state(spec.name, k) for k in keys}
    return {
        "masters": masters,
        "states": states,
        "scalars": [opt.group_scalars(g) for g in range(len(opt.layouts))],
        "hyperparams": [opt.group_hyperparams(g) for g in range(len(opt.layouts))],
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "scaler": opt.loss_scaler_state(),
    }


def assert_same_snapshot(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Bit-exact equality of two snapshots (dtypes included)."""
    assert got["masters"].keys() == want["masters"].keys()
    for name, w in want["masters"].items():
        assert got["masters"][name].dtype == w.dtype and torch.equal(got["masters"][name], w), name
        assert got["states"][name].keys() == want["states"][name].keys(), name
        for key, value in want["states"][name].items():
            assert torch.equal(got["states"][name][key], value), (name, key)
    assert got["scalars"] == want["scalars"]
    assert got["hyperparams"] == want["hyperparams"]
    assert got["model"].keys() == want["model"].keys()
    for key, value in want["model"].items():
        assert got["model"][key].dtype == value.dtype and torch.equal(got["model"][key], value), key
    assert got["scaler"] == want["scaler"]


def assert_model_equals_masters(opt: ZeroOptimizer, model: Net) -> None:
    for name in TRAINABLE:
        p = getattr(model, name)
        assert torch.equal(opt.get_full_master(name).to(p.dtype), p.detach()), name


def assert_same_params(a: Net, b: Net, **tol: float) -> None:
    for key, value in b.state_dict().items():
        mine = a.state_dict()[key]
        if tol:
            torch.testing.assert_close(mine, value, **tol, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(mine, value), key


def expected_bytes_read(manifest: zero_ckpt.Manifest, layouts: list, rank: int) -> int:
    """Bytes of tensor data rank's new partition holds: its real elements of every stored
    tensor (all fp32 here), from the layout at the new world size."""
    return sum(
        layouts[g].real_numel(rank) * len(gm.keys) * 4 for g, gm in enumerate(manifest.groups)
    )


def check_consolidated(ckpt: str, out: str, model: Net) -> None:
    """``zero_ckpt.consolidate`` gives the model's state: params in the model dtype (from the
    masters), frozen params and buffers (from model.safetensors), bit for bit."""
    from safetensors.torch import load_file

    zero_ckpt.consolidate(ckpt, out, overwrite=True)
    got: dict[str, torch.Tensor] = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        got.update(load_file(str(f)))
    want = model.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, (key, got[key].dtype, value.dtype)
        assert torch.equal(got[key], value), key


# ----- save side ------------------------------------------------------------------------------


def save_side(rank: int, ws: int, name: str, root: str) -> tuple[Net, ZeroOptimizer]:
    """Train, change an lr, save; record the saved state for the load side; consolidate."""
    cfg = CONFIGS[name]
    assert ws == cfg.save_ws
    model, opt = make(cfg)
    train(model, opt, rank, ws, range(TRAINED_STEPS))
    opt.param_groups[1]["lr"] = CHANGED_LR
    ckpt = f"{root}/{name}"
    manifest = zero_ckpt.save(ckpt, optimizer=opt, model=model, extra=EXTRA)
    assert manifest.world_size == ws and len(manifest.shards) == ws
    assert [p.name for p in manifest.groups[1].params] == ["w2", "b2"]
    saved = snapshot(opt, model)
    consolidated = opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({**saved, "consolidated": consolidated}, f"{root}/ref-{name}.pt")
        check_consolidated(ckpt, f"{root}/full-{name}", model)
        report = zero_ckpt.verify(ckpt)
        assert report.ok, report.problems
    barrier()
    return model, opt


# ----- load side ------------------------------------------------------------------------------


def load_side(
    rank: int,
    ws: int,
    name: str,
    root: str,
    ckpt: str | None = None,
    original: tuple[Net, ZeroOptimizer] | None = None,
) -> None:
    cfg = CONFIGS[name]
    assert ws == cfg.load_ws
    saved = torch.load(f"{root}/ref-{name}.pt", weights_only=True)

    # A fresh optimizer that already trained a step on other data: everything must be replaced.
    model, opt = make(cfg)
    train(model, opt, rank, ws, range(50, 51))
    result = zero_ckpt.load(ckpt or f"{root}/{name}", optimizer=opt, model=model)

    # 1. Directly after the load: exactly what was saved.
    assert result.user_extra == EXTRA
    assert opt.param_groups[1]["lr"] == CHANGED_LR and opt.param_groups[0]["lr"] == LRS[0]
    assert opt.group_scalars(0) == {"step": TRAINED_STEPS}
    assert_same_snapshot(snapshot(opt, model), saved)
    assert_model_equals_masters(opt, model)

    # 2. It read its share, and together the ranks read every tensor byte exactly once.
    m = result.manifest
    assert result.bytes_read == expected_bytes_read(m, opt.layouts, rank)
    total = sum(gm.numel * len(gm.keys) * 4 for gm in m.groups)
    shares = all_gather(result.bytes_read)
    assert sum(shares) == total, (shares, total)

    # 3. Continue: lockstep with a hand-fed ZeroOptimizer at this size (bit-exact), a plain
    #    torch optimizer on the full batch (fp32 rounding), the original if it exists (bit-exact).
    hand_model, hand = make(cfg)
    for g, layout in enumerate(hand.layouts):
        lo, hi = layout.real_range(rank)
        names = [p.name for p in layout.params]
        tensors = {"master": torch.cat([saved["masters"][n].reshape(-1) for n in names])[lo:hi]}
        for key in saved["states"][names[0]]:
            tensors[key] = torch.cat([saved["states"][n][key].reshape(-1) for n in names])[lo:hi]
        hand.load_partition(g, tensors, saved["scalars"][g])
        hand.load_hyperparams(g, saved["hyperparams"][g])
    hand.sync_model_from_masters()
    with torch.no_grad():
        for key in ("frozen", "scale", "calls"):
            getattr(hand_model, key).copy_(saved["model"][key])

    ref = Net()
    ref.load_state_dict(saved["model"])
    ref_opt = cfg.cls(groups_of(ref), **cfg.kwargs)
    ref_opt.load_state_dict(saved["consolidated"])
    assert [g["lr"] for g in ref_opt.param_groups] == [LRS[0], CHANGED_LR]

    runs = [(model, opt), (hand_model, hand)] + ([original] if original else [])
    for step in range(TRAINED_STEPS, TRAINED_STEPS + MORE_STEPS):
        for m_, o_ in runs:
            train(m_, o_, rank, ws, range(step, step + 1))
        ref_opt.zero_grad()
        ref.loss(*batch(step)).backward()
        ref_opt.step()
        assert_same_params(hand_model, model)
        if original:
            assert_same_params(original[0], model)
        assert_same_params(model, ref, **TIGHT)
    assert opt.group_scalars(0) == {"step": TRAINED_STEPS + MORE_STEPS}
    assert int(model.calls) == TRAINED_STEPS + MORE_STEPS


def load_then_save(rank: int, ws: int, load_name: str | None, save_name: str | None, root: str) -> None:
    if load_name:
        load_side(rank, ws, load_name, root)
    if save_name:
        save_side(rank, ws, save_name, root)


def save_2to3_and_reshard(rank: int, ws: int, root: str) -> None:
    save_side(rank, ws, "2to3", root)
    if rank == 0:  # the offline tools accept what save wrote
        m = zero_ckpt.reshard(f"{root}/2to3", f"{root}/2to3-dp3", world_size=3, expected_world_size=2)
        assert m.world_size == 3
        assert zero_ckpt.verify(f"{root}/2to3-dp3").ok
    barrier()


def load_2to3(rank: int, ws: int, root: str) -> None:
    load_side(rank, ws, "2to3", root)
    # The same state from the offline-resharded copy (a same-size load), bit for bit.
    cfg = CONFIGS["2to3"]
    a_model, a = make(cfg)
    b_model, b = make(cfg)
    zero_ckpt.load(f"{root}/2to3", optimizer=a, model=a_model)
    zero_ckpt.load(f"{root}/2to3-dp3", optimizer=b, model=b_model)
    assert_same_snapshot(snapshot(b, b_model), snapshot(a, a_model))


def same_size(rank: int, ws: int, root: str) -> None:
    original = save_side(rank, ws, "3to3", root)
    load_side(rank, ws, "3to3", root, original=original)


# ----- fp16 with loss scaling, averager, extra (world size 2) ---------------------------------


def fp16_scaler_averager(rank: int, ws: int, root: str) -> None:
    lo, hi = rank * BATCH // ws, (rank + 1) * BATCH // ws

    def build() -> tuple[Net, ZeroOptimizer, PeriodicModelAverager]:
        model = Net(torch.float16)
        opt = ZeroOptimizer(
            groups_of(model), torch.optim.Adam, stage=2, align=4, loss_scale="dynamic",
            loss_scale_options={"init_scale": 1024.0, "scale_window": 3, "hysteresis": 1},
        )
        return model, opt, PeriodicModelAverager(period=2, warmup_steps=1)

    def step(model: Net, opt: ZeroOptimizer, avg: PeriodicModelAverager, s: int, inject: bool) -> None:
        opt.zero_grad()
        x, t = batch(s)
        loss = model.loss(x[lo:hi], t[lo:hi])
        if inject:
            loss = loss * torch.tensor(float("inf"), dtype=loss.dtype)
        opt.backward(loss)
        opt.step()
        avg.average_parameters(opt)

    model, opt, avg = build()
    for s in range(4):
        step(model, opt, avg, s, inject=(s == 2 and rank == 1))
    scaler = opt.loss_scaler_state()
    assert scaler["scale"] == 512.0 and scaler["overflows"] == 1 and scaler["last_overflow_iter"] == 2
    assert avg.step == 4 and opt.group_scalars(0) == {"step": 3}
    opt.param_groups[0]["lr"] = 5e-3
    ckpt = f"{root}/fp16"
    zero_ckpt.save(ckpt, optimizer=opt, model=model, extra={"run": "fp16"}, averager=avg)
    saved = snapshot(opt, model)
    if rank == 0:
        check_consolidated(ckpt, f"{root}/full-fp16", model)  # fp16 params, int64 buffer
    barrier()

    model2, opt2, avg2 = build()
    result = zero_ckpt.load(ckpt, optimizer=opt2, model=model2, averager=avg2)
    assert result.user_extra == {"run": "fp16"}
    assert avg2.step == 4 and opt2.param_groups[0]["lr"] == 5e-3
    assert opt2.loss_scale == 512.0
    assert_same_snapshot(snapshot(opt2, model2), saved)
    assert_model_equals_masters(opt2, model2)
    for s in range(4, 8):  # continuing equals continuing without the save, bit for bit
        step(model, opt, avg, s, inject=False)
        step(model2, opt2, avg2, s, inject=False)
        assert_same_params(model2, model)
    assert opt2.loss_scaler_state() == opt.loss_scaler_state()
    assert opt2.loss_scale == 1024.0  # grew at iteration 6 (DeepSpeed's window), as the original
    assert avg2.step == avg.step == 8


def fresh_checkpoint_resets_state(rank: int, ws: int, root: str) -> None:
    """A checkpoint saved before the first step holds no state: loading it into a trained
    optimizer drops that optimizer's exp_avg/step instead of keeping them."""
    cfg = CONFIGS["3to3"]
    model0, opt0 = make(cfg)
    zero_ckpt.save(f"{root}/step0", optimizer=opt0, model=model0)
    model, opt = make(cfg)
    train(model, opt, rank, ws, range(2))
    zero_ckpt.load(f"{root}/step0", optimizer=opt, model=model)
    assert opt.state_partitions(0) == {} and opt.group_scalars(0) == {}
    assert int(model.calls) == 0
    train(model, opt, rank, ws, range(2))
    train(model0, opt0, rank, ws, range(2))
    assert_same_params(model, model0)


# ----- errors (world size 3, on the world-size-2 checkpoint) ---------------------------------


def _expect_everywhere(exc_type: type, fn: Any, match: str | None = None) -> str:
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    if match is not None:
        assert match in message, message
    return message


def _data_start(shard: Path) -> int:
    raw = shard.read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")


def _copy_ckpt(src: str, dst: str, rank: int) -> None:
    if rank == 0:
        shutil.copytree(src, dst)
    barrier()


def errors(rank: int, ws: int, root: str) -> None:
    src = f"{root}/2to3"
    cfg = CONFIGS["2to3"]
    model, opt = make(cfg)
    train(model, opt, rank, ws, range(1))
    before = snapshot(opt, model)

    # A model with another shape / another param count: LayoutMismatchError everywhere.
    wide_model, wide = make(cfg, wide=18)
    _expect_everywhere(
        LayoutMismatchError, lambda: zero_ckpt.load(src, optimizer=wide, model=wide_model), "shape"
    )
    more_model, more = make(cfg, extra=True)
    _expect_everywhere(
        LayoutMismatchError,
        lambda: zero_ckpt.load(src, optimizer=more, model=more_model),
        "3 in the optimizer",
    )

    # A model with a buffer the checkpoint lacks: refused before anything changes.
    buf_model, buf_opt = make(cfg)
    buf_model.register_buffer("running", torch.zeros(2))
    _expect_everywhere(
        LayoutMismatchError,
        lambda: zero_ckpt.load(src, optimizer=buf_opt, model=buf_model),
        "lacks the model's ['running']",
    )

    # No manifest: incomplete, on every rank.
    incomplete = f"{root}/err-incomplete"
    if rank == 0:
        shutil.copytree(src, incomplete)
        os.remove(f"{incomplete}/manifest.json")
    barrier()
    _expect_everywhere(
        IncompleteCheckpointError,
        lambda: zero_ckpt.load(incomplete, optimizer=opt, model=model),
        "incomplete",
    )

    # One flipped data byte in the shard of saved rank 1: only some of the 3 ranks read it,
    # every rank reports it, naming the shard.
    corrupt = f"{root}/err-corrupt"
    _copy_ckpt(src, corrupt, rank)
    shard = Path(corrupt) / "shards/rank-00001-of-00002.safetensors"
    if rank == 0:
        raw = bytearray(shard.read_bytes())
        raw[_data_start(shard) + 13] ^= 0x40
        shard.write_bytes(bytes(raw))
    barrier()
    message = _expect_everywhere(
        CorruptShardError, lambda: zero_ckpt.load(corrupt, optimizer=opt, model=model), "checksum"
    )
    assert "rank-00001-of-00002.safetensors" in message

    # A truncated shard: only the ranks that read it find it; every rank raises the same class.
    truncated = f"{root}/err-truncated"
    _copy_ckpt(src, truncated, rank)
    shard0 = Path(truncated) / "shards/rank-00000-of-00002.safetensors"
    if rank == 0:
        shard0.write_bytes(shard0.read_bytes()[:-4])
    barrier()
    message = _expect_everywhere(
        CorruptShardError, lambda: zero_ckpt.load(truncated, optimizer=opt, model=model)
    )
    assert "rank-00000-of-00002.safetensors" in message

    # A failed load changed nothing.
    assert_same_snapshot(snapshot(opt, model), before)

    # Saving over an existing checkpoint without overwrite: refused everywhere, old one intact.
    existing = f"{root}/err-existing"
    _copy_ckpt(src, existing, rank)
    files = sorted(p for p in Path(existing).rglob("*") if p.is_file())
    contents = [p.read_bytes() for p in files]
    barrier()
    _expect_everywhere(
        DestinationExistsError,
        lambda: zero_ckpt.save(existing, optimizer=opt, model=model),
        "already exists",
    )
    barrier()
    assert sorted(p for p in Path(existing).rglob("*") if p.is_file()) == files
    assert [p.read_bytes() for p in files] == contents
    check_model, check_opt = make(cfg)
    zero_ckpt.load(existing, optimizer=check_opt, model=check_model)
    # ... and with overwrite it is replaced by a world-size-3 checkpoint.
    m = zero_ckpt.save(existing, optimizer=opt, model=model, overwrite=True)
    assert m.world_size == 3
    if rank == 0:
        assert zero_ckpt.verify(existing).ok
        assert not (Path(existing) / "shards/rank-00000-of-00002.safetensors").exists()

    # Metadata that JSON cannot hold is refused before anything is written.
    _expect_everywhere(
        ManifestError,
        lambda: zero_ckpt.save(f"{root}/err-json", optimizer=opt, extra={"bad": object()}),
        "JSON",
    )
    assert not Path(f"{root}/err-json").exists()
    barrier()

    # A non-checkpoint error on one rank becomes a CheckpointError on the others (no hang).
    class Boom(Exception):
        pass

    def explode() -> None:
        if rank == 2:
            raise Boom("rank 2 only")

    from zero_ckpt.agreement import agree

    if rank == 2:
        _expect_everywhere(Boom, lambda: agree("testing", explode, None))
    else:
        _expect_everywhere(CheckpointError, lambda: agree("testing", explode, None), "rank 2")


# ----- the runs -------------------------------------------------------------------------------

# world size -> scenarios, in run order (a spawn loads what an earlier one saved)
RUN_ORDER = (1, 4, 2, 3)


def _scenarios(ws: int, root: str) -> list[tuple[str, Any, tuple]]:
    if ws == 4:
        return [("load 1to4, save 4to2", load_then_save, ("1to4", "4to2", root))]
    if ws == 2:
        return [
            ("load 4to2", load_then_save, ("4to2", None, root)),
            ("save 2to3", save_2to3_and_reshard, (root,)),
            ("fp16", fp16_scaler_averager, (root,)),
        ]
    if ws == 3:
        return [
            ("load 2to3", load_2to3, (root,)),
            ("3to3", same_size, (root,)),
            ("fresh", fresh_checkpoint_resets_state, (root,)),
            ("errors", errors, (root,)),
        ]
    raise AssertionError(ws)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, dict[int, str | None]]]:
    root = str(tmp_path_factory.mktemp("api"))
    out: dict[int, dict[str, dict[int, str | None]]] = {}
    for ws in RUN_ORDER:
        if ws == 1:  # in this process, without a process group
            try:
                save_side(0, 1, "1to4", root)
                out[1] = {"save 1to4": {0: None}}
            except Exception:  # noqa: BLE001 - reported by the test that reads it
                import traceback

                out[1] = {"save 1to4": {0: traceback.format_exc()}}
            continue
        out[ws] = run_scenarios(_scenarios(ws, root), ws, timeout_s=120)
    return out


def test_save_at_1_without_process_group(runs) -> None:
    check(runs[1], "save 1to4", 1)


def test_load_1_to_4_and_save_at_4(runs) -> None:
    check(runs[4], "load 1to4, save 4to2", 4)


def test_load_4_to_2(runs) -> None:
    check(runs[2], "load 4to2", 2)


def test_save_at_2_verify_and_reshard(runs) -> None:
    check(runs[2], "save 2to3", 2)


def test_load_2_to_3_and_from_offline_reshard(runs) -> None:
    check(runs[3], "load 2to3", 3)


def test_3_to_3_equals_continuing_without_save(runs) -> None:
    check(runs[3], "3to3", 3)


def test_fp16_loss_scaler_averager_extra_survive(runs) -> None:
    check(runs[2], "fp16", 2)


def test_checkpoint_without_state_resets_state(runs) -> None:
    check(runs[3], "fresh", 3)


def test_errors_raise_on_every_rank(runs) -> None:
    check(runs[3], "errors", 3)


# ----- the one cross-rank agreement (single process; the exchange stands in for the group) -----


def _as_rank(rank: int, ws: int, others: dict[int, Any]):
    """An exchange for rank ``rank`` of ``ws`` whose peers sent ``others[r]`` (None: success)."""

    def exchange(mine: Any) -> list[Any]:
        return [mine if r == rank else others.get(r) for r in range(ws)]

    return exchange


def test_agreement_reraises_the_failing_ranks_class_path_and_rank_elsewhere() -> None:
    from zero_ckpt.agreement import agree, failure_of

    exc = CorruptShardError("shard 1 is bad", path="/x/shards/rank-1", rank=1)
    with pytest.raises(CorruptShardError) as info:
        agree("reading", lambda: 7, exchange=_as_rank(0, 3, {1: failure_of(exc), 2: None}))
    assert str(info.value) == "reading failed on rank 1: shard 1 is bad"
    assert (info.value.path, info.value.rank) == ("/x/shards/rank-1", 1)
    # A class from outside zero_ckpt becomes a CheckpointError naming it; the lowest rank wins.
    boom = failure_of(KeyError("k"))
    with pytest.raises(CheckpointError, match=r"^reading failed on rank 1: KeyError: 'k'$") as info:
        agree("reading", lambda: 7, exchange=_as_rank(0, 3, {1: boom, 2: failure_of(exc)}))
    assert type(info.value) is CheckpointError
    # The failing rank raises its own exception; without failures the result comes back.
    with pytest.raises(KeyError):
        agree("reading", lambda: {}["k"], exchange=_as_rank(0, 2, {}))
    assert agree("reading", lambda: 7, exchange=_as_rank(0, 2, {})) == 7
    assert agree("reading", lambda: 7) == 7  # no process group: a group of one


def test_agreement_own_error_wins_over_a_lost_exchange_and_describe_words_it() -> None:
    from zero_ckpt.agreement import agree, agree_all, failure_of

    def lost(obj: Any) -> list[Any]:
        raise RuntimeError("peer gone")

    with pytest.raises(KeyError):
        agree("x", lambda: {}["k"], exchange=lost)
    with pytest.raises(RuntimeError, match="peer gone"):
        agree("x", lambda: 1, exchange=lost)

    def both(mine: Any) -> list[Any]:
        return [mine, ("theirs", None)]

    assert agree_all("x", lambda: "mine", exchange=both) == ["mine", "theirs"]
    other = (None, failure_of(LayoutMismatchError("no")))
    with pytest.raises(LayoutMismatchError, match="^part 1 said: no$"):
        agree_all("x", lambda: "mine", exchange=lambda m: [m, other],
                  describe=lambda k, f: f"part {k} said: {f.message}")


def test_save_and_async_save_have_one_return_type_each() -> None:
    import inspect

    from zero_ckpt import agreement, parts

    assert "async_" not in inspect.signature(zero_ckpt.save).parameters
    assert inspect.signature(zero_ckpt.save).return_annotation in ("Manifest", zero_ckpt.Manifest)
    assert inspect.signature(zero_ckpt.async_save).return_annotation in ("AsyncSave", zero_ckpt.AsyncSave)
    # The split jobs use the one agreement, not a copy of it.
    assert parts.agree is agreement.agree and parts.agree_all is agreement.agree_all
