"""Accelerate with a :class:`~zero_core.ZeroOptimizer`.

``accelerator.prepare(model, optimizer)`` in a distributed run wraps the model in
``DistributedDataParallel``, which all-reduces every gradient once more (the ZeroOptimizer
already reduces them, into its partitions), and ``accelerator.clip_grad_norm_`` clips the
model's ``.grad``, which stage 2 leaves empty (the norm comes back 0 and nothing is clipped).
:func:`prepare` keeps the model unwrapped (Accelerate still applies its autocast and
``torch.compile``) and wraps the optimizer in Accelerate's ``AcceleratedOptimizer`` (so
``accelerator.accumulate`` skips the step of accumulating micro-batches, as usual);
:func:`clip_grad_norm_` clips by the true global norm::

    accelerator = Accelerator()
    model = build_model().to(accelerator.device)   # place the model first: the optimizer
    opt = ZeroOptimizer(model.named_parameters(), torch.optim.AdamW, lr=1e-3)  # makes its
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ...)      # params views of flat buffers
    model, opt, loader, sched = prepare(accelerator, model, opt, loader, sched)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                clip_grad_norm_(opt, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()

Each rank gets its own shard of ``loader`` (Accelerate's sampler sharding, unchanged).
Checkpoints: ``zero_ckpt.save(path, optimizer=unwrap_optimizer(opt), model=model)`` on every
rank (not ``accelerator.save_state``, which keeps one rank's ``optimizer.state_dict()``).
"""

from __future__ import annotations

from typing import Any

import torch

from zero_core.integrations import require
from zero_core.optimizer import ZeroConfigError, ZeroOptimizer

__all__ = ["prepare", "clip_grad_norm_", "unwrap_optimizer"]

# Distributed modes that shard or wrap the model their own way: a ZeroOptimizer cannot join them.
_REFUSED_MODES = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


def unwrap_optimizer(optimizer: Any) -> ZeroOptimizer:
    """The :class:`ZeroOptimizer` inside ``optimizer`` (itself, or under Accelerate's
    ``AcceleratedOptimizer`` wrappers); ZeroConfigError when there is none."""
    opt = optimizer
    for _ in range(8):  # wrappers nest shallowly; a cycle must not loop forever
        if isinstance(opt, ZeroOptimizer):
            return opt
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            break
        opt = inner
    raise ZeroConfigError(
        f"expected a ZeroOptimizer (or Accelerate's wrapper of one), got "
        f"{type(optimizer).__name__}; build it with ZeroOptimizer(model.named_parameters(), ...)"
    )


def clip_grad_norm_(optimizer: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the gradients by their global norm over every rank; return that norm (0-d fp32).

    Collective: call on all ranks, after the last backward of a step and before ``step``
    (under ``accelerator.accumulate``: when ``accelerator.sync_gradients``). ``optimizer`` is
    the ZeroOptimizer or what :func:`prepare` returned for it. Use this instead of
    ``accelerator.clip_grad_norm_(model.parameters(), ...)``, which sees no gradients in stage 2.
    """
    return unwrap_optimizer(optimizer).clip_grad_norm(max_norm, norm_type)


def _same_device(a: torch.device, b: torch.device) -> bool:
    # Accelerate names the CPU of a distributed run "cpu:0"; tensors say "cpu".
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)


def _check_accelerator(accelerator: Any, zero: ZeroOptimizer) -> None:
    mode = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if mode in _REFUSED_MODES:
        raise ZeroConfigError(
            f"Accelerate is configured for {mode}, which shards or wraps the model itself; a "
            f"ZeroOptimizer needs plain data parallelism (multi-GPU/multi-CPU): drop the "
            f"{mode} plugin or use a plain optimizer"
        )
    if accelerator.num_processes != zero.world_size:
        raise ZeroConfigError(
            f"Accelerate runs {accelerator.num_processes} processes but the ZeroOptimizer's "
            f"process group has {zero.world_size} ranks; build the ZeroOptimizer over the "
            f"data-parallel group of all processes (process_group=None)"
        )
    if getattr(accelerator, "scaler", None) is not None:
        raise ZeroConfigError(
            "Accelerate's fp16 mixed precision uses torch's GradScaler, which cannot unscale "
            "ZeroOptimizer's partitioned gradients; use mixed_precision='bf16', or an fp16 "
            "model with ZeroOptimizer(loss_scale='dynamic') and mixed_precision='no'"
        )
    if accelerator.device_placement:
        for g in range(len(zero.layouts)):
            for p in zero.group_params(g):
                if not _same_device(p.device, accelerator.device):
                    raise ZeroConfigError(
                        f"the model's params are on {p.device} but Accelerate trains on "
                        f"{accelerator.device}; move the model to accelerator.device before "
                        f"building the ZeroOptimizer (its params are views of the "
                        f"optimizer's flat buffers and cannot be moved afterwards)"
                    )


def prepare(
    accelerator: Any, model: torch.nn.Module, optimizer: Any, *rest: Any
) -> tuple[Any, ...]:
    """``accelerator.prepare`` for ``model`` and its ZeroOptimizer (plus any ``rest``:
    data loaders, schedulers, ...), returned in the order given.

    The model gets Accelerate's mixed-precision autocast and compilation but is not wrapped in
    ``DistributedDataParallel`` (the ZeroOptimizer reduces the gradients) nor moved (its params
    are views of the optimizer's flat buffers: place the model on ``accelerator.device``
    before building the optimizer). The optimizer comes back as Accelerate's
    ``AcceleratedOptimizer`` around the ZeroOptimizer (its state is not round-tripped through
    ``state_dict``). ``rest`` goes through ``accelerator.prepare`` as usual; a scheduler
    built on the ZeroOptimizer steps with it.

    Raises ZeroConfigError for DeepSpeed/FSDP/Megatron/XLA modes, fp16 (GradScaler) mixed
    precision, a process-count mismatch, or a model on another device.
    """
    require("accelerate", "zero_core.integrations.accelerate.prepare")
    zero = unwrap_optimizer(optimizer)
    _check_accelerator(accelerator, zero)
    # evaluation_mode: autocast and torch.compile only, no DDP wrap. Accelerate marks the model
    # prepared, so a later accelerator.prepare(model) returns it as is.
    prepared_model = accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)
    prepared_opt = accelerator.prepare_optimizer(zero, device_placement=False)
    prepared_rest = accelerator.prepare(*rest) if rest else ()
    if len(rest) == 1:
        prepared_rest = (prepared_rest,)
    return (prepared_model, prepared_opt, *prepared_rest)
