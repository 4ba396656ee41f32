"""zero_core.integrations.accelerate: a ZeroOptimizer in a plain Accelerate loop.

The tiny Llama of tests/_hf_common.py trains 8 steps of 12 sequences. Reference: one process,
``torch.optim.AdamW`` through ``accelerator.prepare`` and ``accelerator.clip_grad_norm_``.
On 2 gloo ranks, a ZeroOptimizer through ``prepare`` (model not wrapped in DDP, optimizer
inside Accelerate's ``AcceleratedOptimizer``, scheduler stepping with it) and
``clip_grad_norm_`` must give the same global loss and gradient norm at every step, to fp32
rounding: stage 2 with 6 sequences per rank, and stage 1 under ``accelerator.accumulate``
with 2 micro-batches of 3. Every step clips (norms near 1, limit 0.5).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

import _dist  # noqa: E402
import _hf_common as H  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    H.reset_accelerate()
    try:
        logs = H.accelerate_loop(world_size=1, accumulation=1, stage=None)
    finally:
        H.reset_accelerate()
    assert len(logs) == H.STEPS
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.3  # the comparison is not of constants
    return logs


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("accelerate_dp2")
    scenarios = [
        ("stage2", H.accelerate_run, (str(root / "stage2.json"), 1, 2)),
        ("stage1_accumulate", H.accelerate_run, (str(root / "stage1_accumulate.json"), 2, 1)),
    ]
    return root, _dist.run_scenarios(scenarios, 2)


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) == H.STEPS
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert w["grad_norm"] > H.MAX_GRAD_NORM  # the step clipped
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL), f"step {step} loss"
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=RTOL), f"step {step} grad_norm"


@pytest.mark.parametrize("name", ["stage2", "stage1_accumulate"])
def test_dp2_loop_equals_single_process_reference(reference, dp2, name):
    root, results = dp2
    _dist.check(results, name, 2)
    _assert_same(json.loads((root / f"{name}.json").read_text()), reference)


def test_prepare_refuses_a_plain_optimizer():
    from accelerate import Accelerator

    from zero_core import ZeroConfigError
    from zero_core.integrations.accelerate import prepare

    H.reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(4, 4)
        with pytest.raises(ZeroConfigError, match="expected a ZeroOptimizer .*got SGD"):
            prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1))
    finally:
        H.reset_accelerate()


def test_unwrap_and_clip_through_the_accelerate_wrapper():
    """One process: what prepare returns unwraps to the ZeroOptimizer, the model is the same
    object, and clip_grad_norm_ through the wrapper equals torch's on a plain copy."""
    from accelerate import Accelerator

    from zero_core import ZeroOptimizer
    from zero_core.integrations.accelerate import clip_grad_norm_, prepare, unwrap_optimizer

    H.reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        plain.load_state_dict(model.state_dict())
        zero = ZeroOptimizer(model.named_parameters(), torch.optim.SGD, stage=2, lr=0.1)
        prepared_model, opt = prepare(accelerator, model, zero)
        assert prepared_model is model and unwrap_optimizer(opt) is zero
        x = torch.randn(5, 8)
        prepared_model(x).pow(2).sum().backward()
        plain(x).pow(2).sum().backward()
        want = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
        got = clip_grad_norm_(opt, 0.1)
        assert float(got) == pytest.approx(float(want), rel=RTOL) and float(want) > 0.1
        opt.step()
        with torch.no_grad():
            for p in plain.parameters():
                p -= 0.1 * p.grad
        for a, b in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-7)
    finally:
        H.reset_accelerate()
