"""``ZeroTrainer``: a Hugging Face ``transformers.Trainer`` that trains with a ZeroOptimizer.

What plain ``Trainer`` gets wrong with a ZeroOptimizer, and what this subclass does instead:

- **DDP reduces every gradient a second time.** ``Trainer`` prepares the model with
  ``accelerator.prepare``, which wraps it in ``DistributedDataParallel`` in a distributed run.
  ZeroTrainer prepares the model for training without the DDP wrap (Accelerate's autocast
  and compilation still apply); the ZeroOptimizer reduces the gradients. Each rank still gets
  its own shard of the data from the distributed sampler.
- **Clipping is a no-op in stage 2.** ``max_grad_norm`` clips ``param.grad``, which stage 2
  leaves empty. ZeroTrainer clips with ``ZeroOptimizer.clip_grad_norm`` (the true global norm
  over every rank) and logs that norm as ``grad_norm``.
- **The checkpoint keeps rank 0's shard only.** ``optimizer.state_dict()`` is one rank's
  partition. ZeroTrainer saves the optimizer with ``zero_ckpt.save`` into
  ``checkpoint-N/zero_optimizer/`` (every rank writes its shard) next to the model files and
  ``scheduler.pt``, and ``resume_from_checkpoint`` loads it with ``zero_ckpt.load``, at any
  world size. A plain ``Trainer`` checkpoint (``optimizer.pt`` of a non-sharded torch
  optimizer) also resumes: each rank takes its fragments of that state.
- Gradient accumulation: micro-batches before the last one run inside
  ``ZeroOptimizer.no_sync`` (no communication until the last backward).

The optimizer is built from ``args``: the same two param groups as ``Trainer`` (weight decay
and no decay), the class and keyword arguments of ``args.optim`` where it is an elementwise
``torch.optim`` optimizer (``adamw_torch`` -> ``torch.optim.AdamW``, ``adamw_torch_fused``,
``sgd``, ``adagrad``, ``rmsprop``), ``zero_stage`` and ``zero_options`` (other
``ZeroOptimizer`` keyword arguments). Or pass your own: ``optimizers=(zero_opt, scheduler)``.

A ZeroOptimizer passed in already holds the model's params as views of its flat buffers, so
the model must not move after it is built: ZeroTrainer skips Trainer's move to ``args.device``
where the params already are (torch copies CPU tensors on ``.to("cpu:0")``, the device of a
distributed CPU run) and refuses a real move (build the model on its device first).

Not supported (refused at construction with a ZeroConfigError): ``fp16=True`` (torch's
GradScaler cannot unscale the partitioned gradients; use ``bf16=True``), ``fp16_full_eval`` /
``bf16_full_eval`` (they cast the model), a ZeroOptimizer with loss scaling, an optimizer that
is not a ZeroOptimizer, DeepSpeed and FSDP, several GPUs in one process (``nn.DataParallel``).
Written against the transformers 5.x ``Trainer``: the private hooks it overrides
(``_wrap_model``, ``_move_model_to_device``, ``_clip_grad_norm``, ``_get_grad_norm``,
``_save/_load_optimizer_and_scheduler``, ...) are checked at import.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from zero_core.integrations import INSTALL_HINT

try:
    import transformers
    from transformers import Trainer
except ImportError as _exc:
    raise ImportError(
        f"zero_core.integrations.hf_trainer (ZeroTrainer) needs the optional package "
        f"'transformers', which is not installed; {INSTALL_HINT}"
    ) from _exc

from zero_core.integrations.accelerate import _same_device, unwrap_optimizer
from zero_core.optimizer import ZeroConfigError, ZeroOptimizer

__all__ = ["ZeroTrainer", "ZERO_CHECKPOINT_DIR"]

#: Sub-directory of ``checkpoint-N/`` holding the zero-ckpt checkpoint of the optimizer.
ZERO_CHECKPOINT_DIR = "zero_optimizer"
# Trainer's own file names (transformers.trainer: SCHEDULER_NAME, OPTIMIZER_NAME).
_SCHEDULER_NAME = "scheduler.pt"
_OPTIMIZER_NAME = "optimizer.pt"

# The Trainer hooks ZeroTrainer overrides: without them it would silently train like Trainer.
_HOOKS = (
    "_wrap_model",
    "_clip_grad_norm",
    "_get_grad_norm",
    "_save_optimizer_and_scheduler",
    "_load_optimizer_and_scheduler",
    "create_optimizer",
    "training_step",
    "_load_from_checkpoint",
    "_load_best_model",
    "_move_model_to_device",
    "create_accelerator_and_postprocess",
)
_missing = [name for name in _HOOKS if not hasattr(Trainer, name)]
if _missing:
    raise ImportError(
        f"ZeroTrainer needs the transformers 5.x Trainer, whose hooks {_missing} are missing "
        f"from the installed transformers {transformers.__version__}; upgrade transformers"
    )


class ZeroTrainer(Trainer):
    """``transformers.Trainer`` with a :class:`~zero_core.ZeroOptimizer` (see the module doc).

    Args (besides ``Trainer``'s):
        zero_stage: 1 or 2, for the optimizer ZeroTrainer builds.
        zero_options: other ``ZeroOptimizer`` keyword arguments for it (``bucket_numel``,
            ``comm_dtype``, ``offload``, ...; not ``loss_scale``).

    Launch one process per device (``torchrun``, ``accelerate launch``); the ZeroOptimizer's
    process group must be all of them. Raises ZeroConfigError for the unsupported setups
    listed in the module doc.
    """

    def __init__(
        self,
        *args: Any,
        zero_stage: int = 2,
        zero_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(zero_stage, bool) or zero_stage not in (1, 2):
            raise ZeroConfigError(
                f"zero_stage must be 1 (partitioned optimizer state) or 2 (also partitioned "
                f"gradients), got {zero_stage!r}"
            )
        options = dict(zero_options or {})
        for key in ("stage", "loss_scale", "loss_scale_options"):
            if key in options:
                raise ZeroConfigError(
                    f"zero_options must not set {key!r}: "
                    + ("pass zero_stage instead" if key == "stage" else
                       "ZeroTrainer does not scale the loss; use bf16=True, or fp32")
                )
        self.zero_stage = zero_stage
        self.zero_options = options
        # A ZeroOptimizer passed in holds the model's params as views of its flat buffers
        # already: Trainer.__init__ must not move the model (see _move_model_to_device).
        bound = inspect.signature(Trainer.__init__).bind_partial(self, *args, **kwargs).arguments
        user_optimizer = (bound.get("optimizers") or (None, None))[0]
        self._user_optimizer = None if user_optimizer is None else unwrap_optimizer(user_optimizer)
        super().__init__(*args, **kwargs)
        self._check_setup()

    # ----- setup ------------------------------------------------------------------------

    def _check_setup(self) -> None:
        args = self.args
        if args.fp16:
            raise ZeroConfigError(
                "ZeroTrainer does not support fp16=True: torch's GradScaler cannot unscale "
                "ZeroOptimizer's partitioned gradients; use bf16=True (or fp32)"
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ZeroConfigError(
                "ZeroTrainer cannot run with DeepSpeed or FSDP, which shard the model their own "
                "way; drop the deepspeed/fsdp arguments, or use plain Trainer"
            )
        if args.fp16_full_eval or args.bf16_full_eval:
            raise ZeroConfigError(
                "ZeroTrainer does not support fp16_full_eval/bf16_full_eval: casting the model "
                "for evaluation would detach its params from the ZeroOptimizer's flat buffers; "
                "evaluate in the training dtype (bf16=True autocasts)"
            )
        if args.n_gpu > 1:
            raise ZeroConfigError(
                f"ZeroTrainer needs one process per device, but this process sees {args.n_gpu} "
                f"GPUs (nn.DataParallel); launch with torchrun or accelerate launch, or set "
                f"CUDA_VISIBLE_DEVICES"
            )
        if self.optimizer is not None:
            zero = unwrap_optimizer(self.optimizer)
            if zero.loss_scale is not None:
                raise ZeroConfigError(
                    "the ZeroOptimizer passed to ZeroTrainer scales the loss (loss_scale="
                    f"{zero.loss_scale}), which Trainer's backward does not do; build it with "
                    "loss_scale=None and train in bf16 or fp32"
                )
            if zero.world_size != args.world_size:
                raise ZeroConfigError(
                    f"the ZeroOptimizer's process group has {zero.world_size} ranks but the "
                    f"Trainer runs {args.world_size} processes; build it over all of them "
                    f"(process_group=None)"
                )

    @property
    def zero_optimizer(self) -> ZeroOptimizer:
        """The ZeroOptimizer (``self.optimizer`` may be Accelerate's wrapper of it)."""
        if self.optimizer is None:
            raise ZeroConfigError(
                "ZeroTrainer has no optimizer yet; it is built when training starts "
                "(or call create_optimizer())"
            )
        return unwrap_optimizer(self.optimizer)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the ZeroOptimizer from ``args`` (unless one was passed): Trainer's weight-decay
        and no-decay groups (both, even when one is empty, as Trainer: schedulers and plain
        checkpoints count groups), named, with the class and kwargs ``args.optim`` maps to.

        Collective (ZeroOptimizer construction). ZeroConfigError when ``args.optim`` does not
        map to a ``torch.optim`` optimizer ZeroOptimizer can wrap.
        """
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [(n, p) for n, p in named if n in decay],
             "weight_decay": self.args.weight_decay},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(
                self.args, opt_model
            )
        optimizer_kwargs = dict(optimizer_kwargs)
        optim = str(getattr(self.args.optim, "value", self.args.optim))  # a str enum
        special = [k for k in ("params", "model", "optimizer_dict") if k in optimizer_kwargs]
        is_class = isinstance(optimizer_cls, type)
        if not (is_class and issubclass(optimizer_cls, torch.optim.Optimizer)) or special:
            raise ZeroConfigError(
                f"args.optim={optim!r} builds "
                f"{getattr(optimizer_cls, '__name__', optimizer_cls)!r}, "
                f"which ZeroOptimizer cannot wrap; use an elementwise torch optimizer "
                f"(adamw_torch, adamw_torch_fused, sgd, adagrad, rmsprop) or pass your own "
                f"ZeroOptimizer with optimizers=(optimizer, scheduler)"
            )
        try:
            self.optimizer = ZeroOptimizer(
                groups, optimizer_cls, stage=self.zero_stage, **self.zero_options,
                **optimizer_kwargs,
            )
        except ZeroConfigError as exc:  # say which Trainer argument led there
            raise type(exc)(f"args.optim={optim!r}: {exc}") from None
        return self.optimizer

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # Trainer prepares the optimizer with device placement on: Accelerate would then
        # round-trip the whole optimizer state through the device once (state_dict, move,
        # load_state_dict), which with offload="cpu" puts all of it on the GPU. A
        # ZeroOptimizer places its own state.
        original = self.accelerator.prepare

        def prepare(*args: Any, device_placement: Any = None) -> Any:
            if device_placement is None and any(isinstance(a, ZeroOptimizer) for a in args):
                device_placement = [
                    False if isinstance(a, ZeroOptimizer) else None for a in args
                ]
            return original(*args, device_placement=device_placement)

        self.accelerator.prepare = prepare  # type: ignore[method-assign]

    def _move_model_to_device(self, model: torch.nn.Module, device: Any) -> None:
        # torch copies a CPU tensor on `.to("cpu:0")` (the device of a distributed CPU run):
        # skip moves to where the params already are, so that no param is replaced, and
        # refuse a real move once a ZeroOptimizer holds the params.
        device = torch.device(device)
        if all(_same_device(p.device, device) for p in model.parameters()):
            return
        if self._user_optimizer is not None:
            raise ZeroConfigError(
                f"the model's params are not on args.device ({device}) but the ZeroOptimizer "
                f"passed to ZeroTrainer already holds them (as views of its flat buffers, "
                f"which cannot move); move the model to {device} before building the optimizer"
            )
        super()._move_model_to_device(model, device)

    def _wrap_model(
        self, model: torch.nn.Module, training: bool = True, dataloader: Any = None
    ) -> torch.nn.Module:
        # Training: prepare the model without the DDP wrap (Accelerate's evaluation mode applies
        # autocast and compilation only) and mark it prepared, so that Trainer's following
        # accelerator.prepare(model, optimizer) leaves it as it is.
        if training and model is self.model:
            return self.accelerator.prepare_model(
                model, device_placement=False, evaluation_mode=True
            )
        return super()._wrap_model(model, training=training, dataloader=dataloader)

    # ----- the step ---------------------------------------------------------------------

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Trainer's step; micro-batches that do not end an accumulation run in ``no_sync``."""
        if self.accelerator.sync_gradients:
            return super().training_step(model, inputs, num_items_in_batch)
        with self.zero_optimizer.no_sync():
            return super().training_step(model, inputs, num_items_in_batch)

    def _clip_grad_norm(self, model: torch.nn.Module) -> torch.Tensor:
        return self.zero_optimizer.clip_grad_norm(self.args.max_grad_norm)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is None:  # no clipping asked: the norm alone (an infinite limit clips nothing)
            grad_norm = self.zero_optimizer.clip_grad_norm(float("inf"))
        return grad_norm

    # ----- checkpoints ------------------------------------------------------------------

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        # Trainer writes the weights into the params in place; the fp32 masters must follow
        # (they exist already when the ZeroOptimizer was passed in).
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._sync_masters()

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._sync_masters()

    def _sync_masters(self) -> None:
        if self.optimizer is not None:
            self.zero_optimizer.sync_masters_from_model()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Every rank writes its shard to ``output_dir/zero_optimizer/`` (``zero_ckpt.save``);
        rank 0 writes ``scheduler.pt``. Collective."""
        import zero_ckpt

        zero_ckpt.save(
            os.path.join(output_dir, ZERO_CHECKPOINT_DIR),
            optimizer=self.zero_optimizer,
            model=self.model,
            overwrite=True,  # checkpoint-N/ is Trainer's: a save of the same step replaces it
        )
        if self.args.should_save and self.lr_scheduler is not None:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, _SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Load ``checkpoint/zero_optimizer/`` with ``zero_ckpt.load`` (saved at any world
        size), or a plain Trainer's ``optimizer.pt``, and ``scheduler.pt``. Collective.

        Raises IncompleteCheckpointError (on every rank) when the checkpoint holds no
        optimizer state.
        """
        if checkpoint is None:
            return
        import zero_ckpt
        from zero_ckpt.errors import IncompleteCheckpointError

        zero_dir = os.path.join(checkpoint, ZERO_CHECKPOINT_DIR)
        plain = os.path.join(checkpoint, _OPTIMIZER_NAME)
        if os.path.isdir(zero_dir):
            zero_ckpt.load(zero_dir, optimizer=self.zero_optimizer, model=self.model)
        elif os.path.isfile(plain):
            # A plain Trainer's checkpoint: a non-sharded torch optimizer's state dict, which
            # ZeroOptimizer loads at any world size (each rank takes its fragments).
            state = torch.load(plain, map_location="cpu", weights_only=True)
            self.zero_optimizer.load_state_dict(state)
        else:
            raise IncompleteCheckpointError(
                f"{checkpoint} holds no optimizer state (neither {ZERO_CHECKPOINT_DIR}/ nor "
                f"{_OPTIMIZER_NAME}); resume from a checkpoint saved with save_only_model=False",
                path=checkpoint,
            )
        scheduler_file = os.path.join(checkpoint, _SCHEDULER_NAME)
        if self.lr_scheduler is not None and os.path.isfile(scheduler_file):
            self.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
