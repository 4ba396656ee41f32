"""Shared pieces of the Trainer/Accelerate integration tests: a tiny Llama, its data, and the
multi-process scenarios (module-level: tests/_dist.py pickles them by reference).

Everything is built locally (no downloads): a ``LlamaForCausalLM`` with hidden size 32, 2
layers and a vocabulary of 128, fed fixed random token sequences. A step's global batch is
``GLOBAL_BATCH`` = 12 sequences, divisible by 1, 2 and 3 ranks, read in order (sequential
sampler), so every data-parallel size sees the same sequences in each step.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

VOCAB = 128
SEQ = 16
GLOBAL_BATCH = 12
STEPS = 8  # one epoch
LR = 1e-2
MAX_GRAD_NORM = 0.5  # the tiny Llama's gradient norm is about 1: every step clips


def make_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config)


def tokens() -> torch.Tensor:
    """Learnable sequences (each counts up from a random start by a random stride of 1 to 3,
    modulo the vocabulary), so the loss moves visibly in a few steps."""
    g = torch.Generator().manual_seed(1)
    n = GLOBAL_BATCH * STEPS
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = tokens()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def training_args(out_dir: str, per_device: int, accumulation: int = 1, **kw: Any) -> Any:
    from transformers import TrainingArguments

    options = dict(
        output_dir=out_dir, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, max_steps=STEPS, logging_steps=1,
        learning_rate=LR, weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch",
        train_sampling_strategy="sequential", save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    options.update(kw)
    return TrainingArguments(**options)


def step_logs(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """``[{"step", "loss", "grad_norm"}]`` of the per-step log entries."""
    return [
        {"step": h["step"], "loss": h["loss"], "grad_norm": h["grad_norm"]}
        for h in log_history
        if "loss" in h and "grad_norm" in h
    ]


def distributed_env(rank: int, world_size: int) -> None:
    """The launcher variables Accelerate reads to join the gloo group tests/_dist.py made."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
        OMP_NUM_THREADS="1",
    )
    reset_accelerate()


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons (each scenario builds its own Trainer)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _dump(path: str, rank: int, data: Any) -> None:
    if rank == 0:
        with open(path, "w") as f:
            json.dump(data, f)


def _check_unwrapped(trainer: Any) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from zero_core import ZeroOptimizer

    wrapped = trainer.model_wrapped
    assert not isinstance(wrapped, DistributedDataParallel), type(wrapped)
    assert trainer.model_wrapped is trainer.model
    assert not any(isinstance(m, DistributedDataParallel) for m in trainer.accelerator._models)
    assert isinstance(trainer.zero_optimizer, ZeroOptimizer)


# ----- Trainer scenarios ----------------------------------------------------------------------


def trainer_run(
    rank: int, world_size: int, out_dir: str, result: str, per_device: int, accumulation: int,
    stage: int, save_steps: int | None = None, resume: str | None = None,
    user_optimizer: bool = False,
) -> None:
    """ZeroTrainer over ``world_size`` gloo ranks; rank 0 dumps the per-step logs to
    ``result`` (JSON). ``user_optimizer``: pass a ZeroOptimizer and scheduler built here (the
    groups and schedule Trainer would build) through ``optimizers=``."""
    from transformers import get_linear_schedule_with_warmup

    from zero_core import ZeroOptimizer
    from zero_core.integrations import ZeroTrainer

    distributed_env(rank, world_size)
    save = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    args = training_args(out_dir, per_device, accumulation, ddp_backend="gloo", **save)
    assert args.world_size == world_size
    model = make_model()
    optimizers: tuple = (None, None)
    if user_optimizer:
        named = list(model.named_parameters())
        groups = [
            {"params": [(n, p) for n, p in named if "norm" not in n], "weight_decay": 0.1},
            {"params": [(n, p) for n, p in named if "norm" in n], "weight_decay": 0.0},
        ]
        opt = ZeroOptimizer(groups, torch.optim.AdamW, stage=stage, lr=LR)
        optimizers = (opt, get_linear_schedule_with_warmup(opt, 0, STEPS))
    trainer = ZeroTrainer(
        model=model, args=args, train_dataset=TokenDataset(), zero_stage=stage,
        optimizers=optimizers,
    )
    if user_optimizer:
        assert trainer.zero_optimizer is optimizers[0]
    trainer.train(resume_from_checkpoint=resume)
    _check_unwrapped(trainer)
    zero = trainer.zero_optimizer
    assert zero.stage == stage and zero.world_size == world_size
    assert zero.optim.__class__ is torch.optim.AdamW
    assert [g["weight_decay"] for g in zero.param_groups] == [0.1, 0.0]
    _dump(result, rank, step_logs(trainer.state.log_history))


# ----- Accelerate scenarios -------------------------------------------------------------------


def accelerate_loop(
    world_size: int, accumulation: int, stage: int | None, steps: int = STEPS
) -> list[dict[str, float]]:
    """A plain Accelerate loop on the tiny Llama: ``stage=None`` is the reference (plain
    ``torch.optim.AdamW``, ``accelerator.prepare``, one process), else a ZeroOptimizer through
    :func:`zero_core.integrations.accelerate.prepare`. Returns per-step global loss and norm."""
    from accelerate import Accelerator

    from zero_core import ZeroOptimizer
    from zero_core.integrations.accelerate import clip_grad_norm_, prepare

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    assert accelerator.num_processes == world_size
    model = make_model()
    per_device = GLOBAL_BATCH // (world_size * accumulation)
    loader = torch.utils.data.DataLoader(TokenDataset(), batch_size=per_device, shuffle=False)
    if stage is None:
        opt: Any = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    else:
        opt = ZeroOptimizer(
            model.named_parameters(), torch.optim.AdamW, stage=stage, lr=LR, weight_decay=0.1
        )
    # Accelerate steps a prepared scheduler once per process per optimizer step (its schedules
    # count per-process batches): the same decay per optimizer step at every world size.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * steps * world_size))
    if stage is None:
        model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    else:
        zero = opt
        model, opt, loader, sched = prepare(accelerator, model, opt, loader, sched)
        from torch.nn.parallel import DistributedDataParallel

        assert not isinstance(model, DistributedDataParallel), type(model)
        assert type(opt).__name__ == "AcceleratedOptimizer" and opt.optimizer is zero
        assert sched.scheduler.optimizer is zero
    model.train()
    logs = []
    loss_sum = torch.zeros(())
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            loss_sum += loss.detach() / accumulation
            if accelerator.sync_gradients:
                if stage is None:
                    norm = accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                else:
                    norm = clip_grad_norm_(opt, MAX_GRAD_NORM)
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            mean_loss = accelerator.reduce(loss_sum, reduction="mean")
            logs.append({"loss": float(mean_loss), "grad_norm": float(norm)})
            loss_sum = torch.zeros(())
    return logs


def accelerate_run(rank: int, world_size: int, result: str, accumulation: int, stage: int) -> None:
    distributed_env(rank, world_size)
    logs = accelerate_loop(world_size, accumulation, stage)
    _dump(result, rank, logs)
