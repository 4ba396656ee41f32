"""ZeroOptimizer against a single-process torch reference over the whole option matrix.

stage 1/2 x offload off/"cpu" x fp32/bf16 x Adam/AdamW/SGD, every run with gradient
accumulation (one micro-batch inside ``no_sync``, one outside), global-norm clipping and a
dynamic loss scale. The reference is what mixed precision means in plain torch: fp32 master
copies of the model's params stepped by a plain torch optimizer on the (fp32-cast, averaged)
gradients, clipped with ``torch.nn.utils.clip_grad_norm_``, copied back into the model. Loss
scales are powers of two, so scaling and unscaling are exact and the reference needs none.

At world size 1 every configuration is bit-identical to the reference (``torch.equal``). At
world size 2 the averaged gradient is summed over ranks; with fp32 communication (``comm_dtype``)
that sum of two values is exact too, so the runs stay within fp32 rounding of the reference.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from _dist import check, run_scenarios
from zero_core import ZeroOptimizer

BATCH = 8
STEPS = 3
OPTIMIZERS = {
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATRIX = [
    (stage, offload, dt, name)
    for stage, offload, dt, name in itertools.product(
        (1, 2), (None, "cpu"), DTYPES, OPTIMIZERS
    )
]


def _id(cfg: tuple) -> str:
    stage, offload, dt, name = cfg
    return f"s{stage}-{'off' if offload else 'dev'}-{dt}-{name}"


class Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.l1 = torch.nn.Linear(6, 11).to(dtype)
        self.l2 = torch.nn.Linear(11, 3).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x.to(self.l1.weight.dtype))))


def data(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + micro)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 3, generator=gen)


def loss_of(model: Net, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((model(x).float() - t) ** 2).mean()


def run_matrix_config(rank: int, world_size: int, cfg: tuple) -> None:
    stage, offload, dt, name = cfg
    dtype = DTYPES[dt]
    cls, kwargs = OPTIMIZERS[name]
    model, ref_model = Net(dtype), Net(dtype)
    opt = ZeroOptimizer(
        # step_chunk_numel: the wrapped optimizer steps 13-element chunks (bit-identical)
        model.named_parameters(), cls, stage=stage, offload=offload, align=4, bucket_numel=40,
        step_chunk_numel=13 if name != "adamw" else 0,
        comm_dtype=torch.float32, loss_scale="dynamic",
        loss_scale_options={"init_scale": 2.0**10, "hysteresis": 1}, **kwargs,
    )
    masters = [p.detach().float().clone().requires_grad_(True) for p in ref_model.parameters()]
    ref_opt = cls(masters, **kwargs)
    lo, hi = rank * BATCH // world_size, (rank + 1) * BATCH // world_size

    for step in range(STEPS):
        # the reference: each rank's slice separately (as the ranks compute it), summed in fp32.
        # Inside no_sync, stage 2 leaves gradients in param.grad, so they add up in the model
        # dtype (as with DDP's no_sync); stage 1 moves each one into its fp32 flat buffer.
        grads = [torch.zeros_like(m) for m in masters]
        for r in range(world_size):
            a, b = r * BATCH // world_size, (r + 1) * BATCH // world_size
            local = [torch.zeros_like(m) for m in masters]
            ref_model.zero_grad()
            for micro in range(2):
                x, t = data(step, micro)
                if stage == 1:
                    ref_model.zero_grad()
                (loss_of(ref_model, x[a:b], t[a:b]) / 2).backward()
                if stage == 1:
                    for g, p in zip(local, ref_model.parameters()):
                        g.add_(p.grad.float())
            if stage == 2:
                local = [p.grad.float() for p in ref_model.parameters()]
            for g, l in zip(grads, local):
                g.add_(l)
        for m, g in zip(masters, grads):
            m.grad = g / world_size if world_size > 1 else g
        ref_norm = torch.nn.utils.clip_grad_norm_(masters, 0.05)
        ref_opt.step()
        with torch.no_grad():
            for p, m in zip(ref_model.parameters(), masters):
                p.copy_(m)

        for micro in range(2):
            x, t = data(step, micro)
            ctx = opt.no_sync() if micro == 0 else _null()
            with ctx:
                opt.backward(loss_of(model, x[lo:hi], t[lo:hi]) / 2)
        norm = opt.clip_grad_norm(0.05)
        opt.step()
        assert not opt.last_step_skipped
        if world_size == 1:
            assert torch.equal(norm, ref_norm), (norm, ref_norm)
            for (n, p), r in zip(model.named_parameters(), ref_model.parameters()):
                assert torch.equal(p, r), f"{_id(cfg)} step {step} {n}: {p} != {r}"
        else:
            torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-7)
            for (n, p), r in zip(model.named_parameters(), ref_model.parameters()):
                tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
                torch.testing.assert_close(p, r, **tol, msg=lambda m: f"{_id(cfg)} {n}: {m}")
    # masters and optimizer state, per param, against the reference's
    for (n, p), m in zip(model.named_parameters(), masters):
        full = opt.get_full_master(n)
        if world_size == 1:
            assert torch.equal(full, m.detach())
        else:
            torch.testing.assert_close(full, m.detach(), rtol=1e-5, atol=1e-6)
        for key, value in ref_opt.state[m].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                got = opt.get_full_state(n, key)
                if world_size == 1:
                    assert torch.equal(got, value), f"{_id(cfg)} {n} {key}"
                else:
                    torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6)
    if offload:
        assert all(opt.master_partition(g).device.type == "cpu" for g in range(len(opt.layouts)))
        for g in range(len(opt.layouts)):
            assert all(t.device.type == "cpu" for t in opt.state_partitions(g).values())


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


@pytest.mark.parametrize("cfg", MATRIX, ids=_id)
def test_matrix_world_size_1_bit_identical(cfg: tuple) -> None:
    run_matrix_config(0, 1, cfg)


_RESULTS: dict[str, dict[int, str | None]] = {}


def _results() -> dict[str, dict[int, str | None]]:
    if not _RESULTS:
        _RESULTS.update(
            run_scenarios([(_id(c), run_matrix_config, (c,)) for c in MATRIX], 2, timeout_s=400)
        )
    return _RESULTS


@pytest.mark.parametrize("cfg", MATRIX, ids=_id)
def test_matrix_world_size_2_gloo(cfg: tuple) -> None:
    check(_results(), _id(cfg), 2)
