"""zero_core.integrations.hf_trainer: ZeroTrainer inside Hugging Face Trainer.

A tiny ``LlamaForCausalLM`` (tests/_hf_common.py, built locally) trains 8 steps of 12
sequences each. The reference is plain ``Trainer`` with ``torch.optim.AdamW`` in one process
on the full global batch; ZeroTrainer runs on 2 gloo ranks (6 sequences each, stage 2; stage
1 with 2 accumulation micro-batches of 3; a ZeroOptimizer and scheduler passed in) and on 3
(stage 2, 2 micro-batches of 2) and must log the same loss and the same gradient norm at every
step, to fp32 rounding, with every step clipped (``max_grad_norm``
0.5, norms near 1): a clip that does nothing (stage 2 under plain Trainer) logs norm 0 and
changes the losses. The DP=2 checkpoint at step 4 resumes at DP=3 (4 sequences each) with the
reference's losses for steps 5-8; so does the reference's own plain-Trainer checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import _dist  # noqa: E402
import _hf_common as H  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Plain Trainer, one process, full global batch; saves checkpoint-4 (plain optimizer.pt)."""
    from transformers import Trainer

    out = tmp_path_factory.mktemp("reference")
    H.reset_accelerate()
    args = H.training_args(str(out), H.GLOBAL_BATCH, save_strategy="steps", save_steps=4)
    trainer = Trainer(model=H.make_model(), args=args, train_dataset=H.TokenDataset())
    trainer.train()
    H.reset_accelerate()
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW
    logs = H.step_logs(trainer.state.log_history)
    assert [e["step"] for e in logs] == list(range(1, H.STEPS + 1))
    return out, logs


@pytest.fixture(scope="module")
def dp2(tmp_path_factory, reference):
    ref_dir, _ = reference
    root = tmp_path_factory.mktemp("dp2")

    def run(name, per_device, accumulation, stage, save_steps=None, resume=None, user=False):
        args = (str(root / name), str(root / f"{name}.json"), per_device, accumulation, stage,
                save_steps, resume, user)
        return (name, H.trainer_run, args)

    scenarios = [
        run("stage2", 6, 1, 2, save_steps=4),
        run("stage1_accumulate", 3, 2, 1),
        run("resume_plain", 6, 1, 2, resume=str(ref_dir / "checkpoint-4")),
        run("user_optimizer", 6, 1, 2, user=True),
    ]
    return root, _dist.run_scenarios(scenarios, 2)


@pytest.fixture(scope="module")
def dp3(tmp_path_factory, dp2):
    root2, results2 = dp2
    _dist.check(results2, "stage2", 2)
    root = tmp_path_factory.mktemp("dp3")
    resume = str(root2 / "stage2" / "checkpoint-4")
    scenarios = [
        ("resume", H.trainer_run,
         (str(root / "resume"), str(root / "resume.json"), 4, 1, 2, None, resume)),
        ("stage2_accumulate", H.trainer_run,
         (str(root / "stage2_accumulate"), str(root / "stage2_accumulate.json"), 2, 2, 2)),
    ]
    return root, _dist.run_scenarios(scenarios, 3)


def _logs(root: Path, name: str) -> list[dict]:
    return json.loads((root / f"{name}.json").read_text())


def _assert_same_steps(got: list[dict], want: list[dict], steps: range) -> None:
    got_by_step = {e["step"]: e for e in got}
    want_by_step = {e["step"]: e for e in want}
    assert sorted(got_by_step) == list(range(1, H.STEPS + 1))
    for step in steps:
        g, w = got_by_step[step], want_by_step[step]
        assert w["grad_norm"] > H.MAX_GRAD_NORM  # the step clipped
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL), f"step {step} loss"
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=RTOL), f"step {step} grad_norm"


def test_reference_loss_moves(reference):
    _, logs = reference
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.3  # the comparison below is not of constants


def test_stage2_dp2_equals_reference_losses_and_clipped_norms(reference, dp2):
    root, results = dp2
    _dist.check(results, "stage2", 2)
    _assert_same_steps(_logs(root, "stage2"), reference[1], range(1, H.STEPS + 1))


def test_stage1_gradient_accumulation_dp2_equals_reference(reference, dp2):
    root, results = dp2
    _dist.check(results, "stage1_accumulate", 2)
    _assert_same_steps(_logs(root, "stage1_accumulate"), reference[1], range(1, H.STEPS + 1))


def test_user_built_zero_optimizer_and_scheduler_equal_reference(reference, dp2):
    root, results = dp2
    _dist.check(results, "user_optimizer", 2)
    _assert_same_steps(_logs(root, "user_optimizer"), reference[1], range(1, H.STEPS + 1))


def test_checkpoint_holds_zero_ckpt_next_to_model_files(dp2):
    root, results = dp2
    _dist.check(results, "stage2", 2)
    ckpt = root / "stage2" / "checkpoint-4"
    names = set(os.listdir(ckpt))
    expected = {"model.safetensors", "config.json", "scheduler.pt", "trainer_state.json"}
    assert expected | {"zero_optimizer"} <= names
    assert "optimizer.pt" not in names  # no single-rank optimizer file
    manifest = json.loads((ckpt / "zero_optimizer" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["zero_stage"] == 2
    assert sorted(os.listdir(ckpt / "zero_optimizer" / "shards")) == [
        "rank-00000-of-00002.safetensors",
        "rank-00001-of-00002.safetensors",
    ]
    assert [g["scalars"]["step"] for g in manifest["groups"]] == [4, 4]
    names_saved = {p["name"] for g in manifest["groups"] for p in g["params"]}
    assert "model.embed_tokens.weight" in names_saved and "model.norm.weight" in names_saved


def test_resume_dp2_checkpoint_at_dp3_continues_reference_losses(reference, dp3):
    root, results = dp3
    _dist.check(results, "resume", 3)
    _assert_same_steps(_logs(root, "resume"), reference[1], range(5, H.STEPS + 1))


def test_stage2_gradient_accumulation_dp3_equals_reference(reference, dp3):
    root, results = dp3
    _dist.check(results, "stage2_accumulate", 3)
    _assert_same_steps(_logs(root, "stage2_accumulate"), reference[1], range(1, H.STEPS + 1))


def test_resume_plain_trainer_checkpoint_at_dp2(reference, dp2):
    root, results = dp2
    _dist.check(results, "resume_plain", 2)
    _assert_same_steps(_logs(root, "resume_plain"), reference[1], range(5, H.STEPS + 1))


# ----- one process: refusals and errors ------------------------------------------------------


def _single_trainer(tmp_path, **kw):
    from zero_core.integrations import ZeroTrainer

    H.reset_accelerate()
    args_kw = {k: kw.pop(k) for k in list(kw) if k not in ("zero_stage", "zero_options")}
    args = H.training_args(str(tmp_path / "out"), H.GLOBAL_BATCH, **args_kw)
    return ZeroTrainer(model=H.make_model(), args=args, train_dataset=H.TokenDataset(), **kw)


def test_unsupported_optim_is_refused_by_name(tmp_path):
    from zero_core import ZeroConfigError

    trainer = _single_trainer(tmp_path, optim="adafactor")  # transformers' Adafactor: factored
    expected = "^args.optim='adafactor': Adafactor is not an elementwise"
    with pytest.raises(ZeroConfigError, match=expected):
        trainer.train()


def test_optim_maps_to_the_torch_class_with_trainer_groups(tmp_path):
    from zero_core import ZeroOptimizer

    trainer = _single_trainer(tmp_path, optim="sgd", max_steps=1, zero_stage=1)
    trainer.train()
    zero = trainer.zero_optimizer
    assert isinstance(zero, ZeroOptimizer) and zero.stage == 1
    assert type(zero.optim) is torch.optim.SGD
    decay, no_decay = zero.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert "model.norm.weight" in no_decay["zero_param_names"]
    assert "model.embed_tokens.weight" in decay["zero_param_names"]


def test_zero_options_cannot_set_stage_or_loss_scale(tmp_path):
    from zero_core import ZeroConfigError

    with pytest.raises(ZeroConfigError, match="zero_stage"):
        _single_trainer(tmp_path, zero_options={"stage": 1})
    with pytest.raises(ZeroConfigError, match="loss_scale"):
        _single_trainer(tmp_path, zero_options={"loss_scale": "dynamic"})
    with pytest.raises(ZeroConfigError, match="zero_stage must be 1"):
        _single_trainer(tmp_path, zero_stage=3)


def test_foreign_optimizer_is_refused(tmp_path):
    from zero_core import ZeroConfigError
    from zero_core.integrations import ZeroTrainer

    H.reset_accelerate()
    model = H.make_model()
    args = H.training_args(str(tmp_path / "out"), H.GLOBAL_BATCH)
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(ZeroConfigError, match="expected a ZeroOptimizer.*AdamW"):
        ZeroTrainer(
            model=model, args=args, train_dataset=H.TokenDataset(), optimizers=(plain, None)
        )


def test_resume_without_optimizer_state_raises_naming_the_checkpoint(tmp_path):
    from zero_ckpt.errors import CheckpointError, IncompleteCheckpointError

    trainer = _single_trainer(
        tmp_path, max_steps=2, save_strategy="steps", save_steps=2, save_only_model=True
    )
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert not (ckpt / "zero_optimizer").exists()
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    again = _single_trainer(tmp_path, max_steps=4)
    expected = "checkpoint-2 holds no optimizer state"
    with pytest.raises(IncompleteCheckpointError, match=expected) as info:
        again.train(resume_from_checkpoint=str(ckpt))
    assert isinstance(info.value, CheckpointError) and info.value.path == str(ckpt)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before


# ----- optional imports -----------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_importing_the_package_loads_no_transformers_or_accelerate():
    proc = _python(
        "import sys, zero_core, zero_core.integrations as zi\n"
        "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))\n"
        "print(sorted(zi.__all__))\n"
    )
    assert proc.returncode == 0, proc.stderr
    loaded, names = proc.stdout.strip().splitlines()
    assert loaded == "[]"
    assert "ZeroTrainer" in names and "prepare" in names


def test_without_transformers_the_import_error_says_what_to_install():
    proc = _python(
        "import sys\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "from zero_core.integrations import ZeroTrainer\n"
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: zero_core.integrations.hf_trainer (ZeroTrainer) needs")
    assert "'transformers'" in last and "pip install 'transformers>=4.46'" in last
    assert "zero-ckpt[hf]" in last


def test_without_accelerate_prepare_says_what_to_install():
    proc = _python(
        "import sys\n"
        "sys.modules['accelerate'] = None  # as if not installed\n"
        "from zero_core.integrations import prepare\n"
        "prepare(None, None, None)\n"
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "needs the optional package 'accelerate'" in last and "pip install" in last


def test_user_optimizer_params_never_move(tmp_path):
    """torch copies CPU tensors on ``.to("cpu:0")`` (Trainer's device in a distributed CPU
    run): ZeroTrainer skips such moves, and refuses a real move of params a ZeroOptimizer holds."""
    from zero_core import ZeroConfigError, ZeroOptimizer
    from zero_core.integrations import ZeroTrainer

    H.reset_accelerate()
    model = H.make_model()
    zero = ZeroOptimizer(model.named_parameters(), torch.optim.AdamW, lr=H.LR)
    ptrs = [p.data_ptr() for p in model.parameters()]
    args = H.training_args(str(tmp_path / "out"), H.GLOBAL_BATCH)
    trainer = ZeroTrainer(
        model=model, args=args, train_dataset=H.TokenDataset(), optimizers=(zero, None)
    )
    trainer._move_model_to_device(model, torch.device("cpu:0"))
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    expected = "move the model to meta before building the optimizer"
    with pytest.raises(ZeroConfigError, match=expected):
        trainer._move_model_to_device(model, torch.device("meta"))
    assert [p.data_ptr() for p in model.parameters()] == ptrs


class _BiasFreeMLP(torch.nn.Module):
    """No biases, no norms: every param decays, so Trainer's no-decay group is empty."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32, bias=False), torch.nn.Tanh(), torch.nn.Linear(32, 1, bias=False)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.net(x), y)}


class _Regression(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(2)
        self.x = torch.randn(48, 8, generator=g)
        self.y = torch.randn(48, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def test_plain_checkpoint_with_an_empty_param_group_resumes(tmp_path):
    """Plain Trainer (constant lr) saves at step 2; ZeroTrainer resumes from it (steps 3-4,
    saving checkpoint-4 with the empty group) and again from its own checkpoint (steps 5-6)."""
    from transformers import Trainer

    from zero_core.integrations import ZeroTrainer

    def args(out, max_steps):
        return H.training_args(str(tmp_path / out), 12, max_steps=max_steps,
                               lr_scheduler_type="constant", save_strategy="steps", save_steps=2)

    H.reset_accelerate()
    plain = Trainer(model=_BiasFreeMLP(), args=args("plain", 6), train_dataset=_Regression())
    plain.train()
    ckpt = tmp_path / "plain" / "checkpoint-2"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in saved["param_groups"]] == [2, 0]
    want = {e["step"]: e for e in H.step_logs(plain.state.log_history)}
    runs = (("zero", 4, ckpt, (3, 4)), ("zero2", 6, tmp_path / "zero" / "checkpoint-4", (5, 6)))
    for out, max_steps, resume, steps in runs:
        H.reset_accelerate()
        zero = ZeroTrainer(model=_BiasFreeMLP(), args=args(out, max_steps),
                           train_dataset=_Regression())
        zero.train(resume_from_checkpoint=str(resume))
        assert [len(g["zero_param_names"]) for g in zero.zero_optimizer.param_groups] == [2, 0]
        got = {e["step"]: e for e in H.step_logs(zero.state.log_history)}
        for step in steps:
            assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=RTOL)
            assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=RTOL)
    assert (tmp_path / "zero" / "checkpoint-4" / "zero_optimizer" / "manifest.json").is_file()


def test_trainer_prepares_the_zero_optimizer_without_device_placement(tmp_path):
    """Accelerate's device placement would round-trip the whole optimizer state through the
    device (with offload="cpu": all of it onto the GPU); ZeroTrainer turns it off for the
    ZeroOptimizer and leaves everything else as Trainer prepares it."""
    from zero_core.integrations import ZeroTrainer

    H.reset_accelerate()
    model = H.make_model()
    args = H.training_args(str(tmp_path / "out"), H.GLOBAL_BATCH)
    trainer = ZeroTrainer(model=model, args=args, train_dataset=H.TokenDataset())
    trainer.create_optimizer()
    prepared = trainer.accelerator.prepare(trainer.optimizer)
    assert prepared.device_placement is False
    assert prepared.optimizer is trainer.zero_optimizer
