"""ZeroOptimizer: ZeRO stage 1/2 over any elementwise torch optimizer.

Per param group (see ``DESIGN.md``, "The flat layout"):

* the group's trainable params, in the given order, become views of ONE flat buffer in the model
  dtype, ``world_size * partition_numel`` elements long (:class:`zero_core.layout.GroupLayout`);
* this rank keeps an fp32 master copy of its partition only (``partition_numel`` elements,
  padding kept zero) and hands the wrapped optimizer that single flat tensor as its parameter,
  so every optimizer state tensor is ``1/world_size`` of the model;
* gradients leave ``param.grad`` in ``register_post_accumulate_grad_hook`` hooks as soon as
  autograd has accumulated them (``param.grad`` is None after backward) and reach the partition
  averaged over ranks: stage 1 collects them in one flat gradient buffer and reduce-scatters it
  at the end of each backward; stage 2 copies them into a small fixed pool of bucket buffers
  reduced to their owners while backward runs (see ``_grad_reduce``). After backward the
  averaged partition gradient is readable (``get_local_fragment(p, "grad")``);
* a step consumes the gradients it used: the next backward starts from zero whether or not
  ``zero_grad`` was called (``transformers.Trainer`` only calls ``model.zero_grad()``);
* after the wrapped optimizer's step, the updated partitions are written (cast to the model
  dtype) into this rank's slice of the flat buffer and all-gathered in place into every rank's
  flat buffer, i.e. into the model's params.

Collective calls (every rank of the group must make them, in the same order) are marked
``Collective`` in their docstrings. The methods under "bridge" are the contract
``zero_ckpt``'s bridge (``snapshot``, ``saving``, ``loading``) is written against.

Params are given as torch optimizers accept them: an iterable of tensors, of ``(name, tensor)``
pairs (``model.named_parameters()``), or of param-group dicts whose ``params`` are either. An
unnamed param gets the name ``"group{g}.param{i}"`` (``g``: group index, ``i``: position in that
group as given, frozen params counted). Params with ``requires_grad=False`` are frozen: left
alone, outside the flat layout, with no master and no state.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import torch

from zero_core._flat_buffers import (
    MASTER_DTYPE,
    SUPPORTED_MODEL_DTYPES,
    Entry,
    FlatGroup,
    build_flat_group,
    dtype_name,
)
from zero_core._grad_reduce import Comm, GradReducer
from zero_core.layout import Fragment, GroupLayout
from zero_core.loss_scaler import LossScaler

__all__ = [
    "ZeroOptimizer",
    "ZeroConfigError",
    "ZeroStateDictError",
    "NON_ELEMENTWISE_NAMES",
    "DEFAULT_ALIGN",
    "DEFAULT_BUCKET_NUMEL",
]

#: Partition alignment in elements (recorded in every layout and checkpoint).
DEFAULT_ALIGN = 64
#: Gradient bucket size in elements (stage 2; a larger param is split over several buckets).
DEFAULT_BUCKET_NUMEL = 2**22
#: The wrapped optimizer steps the partition in chunks of this many elements, so its
#: temporaries (Adam: two partition-sized tensors) stay chunk-sized; 0 steps it whole.
DEFAULT_STEP_CHUNK_NUMEL = 2**17

#: Optimizer class names (matched case-insensitively as substrings) refused because their update
#: of one element depends on other elements (layer-wise trust ratios, factored or matrix
#: preconditioners, line searches), which a flat partition cannot compute. A custom class that
#: is elementwise despite its name sets the class attribute ``elementwise = True`` (or pass
#: ``elementwise=True`` to ZeroOptimizer); ``elementwise = False`` refuses any class.
NON_ELEMENTWISE_NAMES = (
    "lamb",
    "lars",
    "adafactor",
    "shampoo",
    "lbfgs",
    "sparseadam",
    "novograd",
    "muon",
    "soap",
    "galore",
    "lomo",
)

# Hyperparameter names that only make sense per tensor (trust ratios, factored second moments).
_NON_ELEMENTWISE_DEFAULTS = (
    "trust_coefficient",
    "trust_clip",
    "trust_ratio",
    "eeta",
    "relative_step",
    "scale_parameter",
    "clip_threshold",
)

# Key under which each wrapped param group lists its params' names (flat order).
_NAMES_KEY = "zero_param_names"
_STATE_DICT_VERSION = 1


class ZeroConfigError(ValueError):
    """ZeroOptimizer was given something it cannot work with; the message says what and how
    to fix it."""


class ZeroStateDictError(ZeroConfigError):
    """A state dict or partition does not fit this optimizer (world size, rank or layout)."""


# ----- argument parsing ----------------------------------------------------------------------


def _check_elementwise(optimizer_class: Any, elementwise: bool | None, defaults: dict) -> None:
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ZeroConfigError(
            f"optimizer_class must be a torch.optim.Optimizer subclass such as "
            f"torch.optim.AdamW, got {optimizer_class!r}"
        )
    name = optimizer_class.__name__
    hint = elementwise if elementwise is not None else getattr(optimizer_class, "elementwise", None)
    if hint is False:
        raise ZeroConfigError(
            f"{name} declares elementwise=False: ZeroOptimizer can only wrap optimizers whose "
            f"update of each element depends on that element alone; use a plain torch optimizer "
            f"(or DDP) for {name}"
        )
    if hint is True:
        return
    lowered = name.lower()
    for bad in NON_ELEMENTWISE_NAMES:
        if bad in lowered:
            raise ZeroConfigError(
                f"{name} is not an elementwise optimizer (it looks at whole tensors: trust "
                f"ratios, factored or matrix statistics, or line searches), so it cannot step a "
                f"flat partition; use an elementwise optimizer such as AdamW, or, if {name} "
                f"really is elementwise, set `elementwise = True` on the class or pass "
                f"elementwise=True to ZeroOptimizer"
            )
    for key in _NON_ELEMENTWISE_DEFAULTS:
        if key in defaults:
            raise ZeroConfigError(
                f"{name} has the per-tensor hyperparameter {key!r}, so it is not elementwise "
                f"and cannot step a flat partition; use an elementwise optimizer such as "
                f"AdamW, or pass elementwise=True to ZeroOptimizer if it really is elementwise"
            )


def _parse_groups(params: Any, first_index: int) -> list[tuple[list[tuple[str | None, Any]], dict]]:
    """``params`` -> ``[(items, options)]`` with ``items = [(name_or_None, tensor)]``."""
    if isinstance(params, torch.Tensor):
        raise ZeroConfigError(
            "params must be an iterable of tensors, (name, tensor) pairs or param-group dicts, "
            "got a single tensor; wrap it in a list"
        )
    items = list(params)
    if not items:
        raise ZeroConfigError(
            "ZeroOptimizer got an empty parameter list; pass model.named_parameters() or a "
            "non-empty list of param groups"
        )
    n_dicts = sum(isinstance(x, dict) for x in items)
    if n_dicts not in (0, len(items)):
        raise ZeroConfigError(
            "params mixes param-group dicts with plain params; pass either a list of dicts "
            "(each with a 'params' key) or a flat list of params"
        )
    groups = items if n_dicts else [{"params": items}]
    out = []
    for offset, group in enumerate(groups):
        g = first_index + offset
        if "params" not in group:
            raise ZeroConfigError(f"param group {g} has no 'params' key; add the group's params")
        raw = group["params"]
        if isinstance(raw, torch.Tensor):
            raw = [raw]
        elif isinstance(raw, set):
            raise ZeroConfigError(
                f"param group {g} gives its params as a set, whose order changes between runs; "
                f"pass a list instead"
            )
        raw = list(raw)
        options = {k: v for k, v in group.items() if k not in ("params", "param_names", _NAMES_KEY)}
        given_names = group.get("param_names")
        parsed: list[tuple[str | None, Any]] = []
        for i, item in enumerate(raw):
            if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
                parsed.append((item[0], item[1]))
            else:
                name = given_names[i] if given_names and len(given_names) == len(raw) else None
                parsed.append((name, item))
        out.append((parsed, options))
    return out


def _python_scalar(key: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if key == "step" and isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def _jsonable(key: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ZeroConfigError(
                f"hyperparameter {key!r} is a tensor of {value.numel()} elements, which a "
                f"checkpoint manifest cannot hold; use a python number"
            )
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(key, v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ZeroConfigError(
        f"hyperparameter {key!r} has the type {type(value).__name__}, which a checkpoint "
        f"manifest cannot hold; use numbers, strings, booleans, None or lists of them"
    )


def _layout_record(layout: GroupLayout) -> dict[str, Any]:
    return {
        "numel": layout.numel,
        "partition_numel": layout.partition_numel,
        "align": layout.align,
        "world_size": layout.world_size,
        "params": [[p.name, list(p.shape), p.dtype, p.offset] for p in layout.params],
    }


def _describe_signature_mismatch(sigs: list[Any]) -> str | None:
    ref = sigs[0]
    for r, sig in enumerate(sigs[1:], start=1):
        if sig == ref:
            continue
        if sig["config"] != ref["config"]:
            return (
                f"rank 0 has (stage, align, optimizer) {ref['config']}, rank {r} has "
                f"{sig['config']}"
            )
        a, b = ref["groups"], sig["groups"]
        if len(a) != len(b):
            return f"rank 0 has {len(a)} param groups, rank {r} has {len(b)}"
        for g, (ga, gb) in enumerate(zip(a, b)):
            if len(ga) != len(gb):
                return (
                    f"group {g}: rank 0 has {len(ga)} trainable params, rank {r} has {len(gb)}"
                )
            for j, (pa, pb) in enumerate(zip(ga, gb)):
                if pa != pb:
                    return (
                        f"group {g} param {j}: rank 0 has {pa[0]!r} shape {tuple(pa[1])} "
                        f"{pa[2]}, rank {r} has {pb[0]!r} shape {tuple(pb[1])} {pb[2]}"
                    )
        return f"rank {r} differs from rank 0"
    return None


# ----- the optimizer -------------------------------------------------------------------------


class ZeroOptimizer(torch.optim.Optimizer):
    """ZeRO stage 1/2 wrapper around an elementwise ``optimizer_class``.

    Collective (construction): call on all ranks of ``process_group`` with the same params
    (count, order, names, shapes, dtypes); this is checked with one ``all_gather_object``.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts (see the module doc).
        optimizer_class: an elementwise ``torch.optim.Optimizer`` subclass (Adam, AdamW, SGD,
            Adagrad, RMSprop, ...). Known non-elementwise ones are refused (see
            :data:`NON_ELEMENTWISE_NAMES`); ``elementwise=True`` overrides the check.
        stage: 1 (partitioned optimizer state; gradients collected in one flat buffer and
            reduce-scattered at the end of backward) or 2 (also partitioned gradients: buckets
            from a fixed pool reduced to their owners while backward runs).
        process_group: the data-parallel group (default: the world group; world size 1 works
            without ``torch.distributed`` initialised).
        align: partition alignment in elements.
        bucket_numel: stage-2 gradient bucket size in elements; the pool holds
            ``max_in_flight + 1`` buffers of at most this size.
        max_in_flight: stage-2 bucket reductions outstanding at once.
        step_chunk_numel: the wrapped optimizer steps the partition in chunks of this many
            elements (views of the same master and state tensors, so the result is
            bit-identical), keeping its temporaries chunk-sized; 0 steps it whole.
        comm_dtype: dtype gradients travel and are summed in across ranks (DeepSpeed's
            ``communication_data_type``; default: the model dtype; ``torch.float32`` for exact
            sums of bf16/fp16 gradients). ``reduce_dtype`` is an older alias.
        gradient_predivide_factor: gradients are divided by it before the reduction and by
            ``world_size / factor`` after (DeepSpeed's knob, default 1.0).
        offload: None, or ``"cpu"``: fp32 masters and optimizer state live in host memory
            (pinned when on CUDA), partition gradients are copied there asynchronously, the
            wrapped optimizer steps on the CPU and the updated partitions are copied back and
            all-gathered (ZeRO-Offload).
        master_copy: keep a separate fp32 master partition. ``None`` (default): only where it
            is needed, i.e. for bf16/fp16 models and for offloaded masters of a GPU model; for
            an fp32 model the master is then this rank's slice of the model's flat buffer:
            exact (a copy would hold the same bits), ``4 * partition_numel`` bytes and a copy per
            step saved. ``True`` always keeps a copy; ``False`` is ``None`` made explicit.
        no_grad_rule: what a step does to a param that got no gradient since the last step:
            ``"skip"`` (torch's rule, default: its value and optimizer state are left exactly
            as they were; the group's ``step`` counter still advances when other params of the
            group stepped) or ``"zero"`` (DeepSpeed's: stepped with a zero gradient). A group
            none of whose params got a gradient is skipped entirely under both rules.
        loss_scale: None (no scaling), ``"dynamic"`` or a positive float (static scale);
            ``loss_scale_options`` are passed to :class:`~zero_core.loss_scaler.LossScaler`
            (``init_scale``, ``scale_window``, ``hysteresis``, ``consecutive_hysteresis``,
            ``min_scale``, ``scale_factor``; DeepSpeed's rule and defaults).
        broadcast_params: copy rank 0's initial param values to every rank (as DDP does).
        **defaults: passed to ``optimizer_class`` (``lr``, ``betas``, ``weight_decay``, ...);
            per-group options in param-group dicts are passed through as well.

    After construction the model's trainable params are views of the flat buffers: do not
    reassign ``param.data`` or move/cast the model; after writing into the params in place
    (``model.load_state_dict``) call :meth:`sync_masters_from_model`.
    ``param_groups[g]["params"]`` holds the flat fp32 master, not the model params (use
    :meth:`group_params`).

    Gradient accumulation: several backward passes before ``step`` add up (as in torch; scale
    the loss by ``1/steps`` yourself); inside :meth:`no_sync` no communication happens (stage 2
    keeps gradients in ``param.grad``, stage 1 in its flat buffer) until the next backward
    outside it (or ``step``). Every rank must produce gradients for the same params, in the same
    order (DDP's rule). A step consumes the gradients: the next backward starts from zero
    whether or not ``zero_grad`` was called.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[torch.optim.Optimizer],
        *,
        stage: int = 2,
        process_group: Any = None,
        align: int = DEFAULT_ALIGN,
        bucket_numel: int = DEFAULT_BUCKET_NUMEL,
        max_in_flight: int = 2,
        step_chunk_numel: int = DEFAULT_STEP_CHUNK_NUMEL,
        comm_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype | None = None,
        gradient_predivide_factor: float = 1.0,
        offload: str | None = None,
        master_copy: bool | None = None,
        no_grad_rule: str = "skip",
        loss_scale: None | str | float = None,
        loss_scale_options: dict[str, Any] | None = None,
        broadcast_params: bool = True,
        elementwise: bool | None = None,
        **defaults: Any,
    ) -> None:
        if isinstance(stage, bool) or stage not in (1, 2):
            raise ZeroConfigError(
                f"stage must be 1 (partitioned optimizer state) or 2 (also partitioned "
                f"gradients), got {stage!r}"
            )
        for label, value in (
            ("align", align), ("bucket_numel", bucket_numel), ("max_in_flight", max_in_flight)
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ZeroConfigError(f"{label} must be a positive int, got {value!r}")
        if comm_dtype is not None and reduce_dtype is not None and comm_dtype != reduce_dtype:
            raise ZeroConfigError(
                f"comm_dtype={comm_dtype} and its alias reduce_dtype={reduce_dtype} disagree; "
                f"pass only comm_dtype"
            )
        comm_dtype = comm_dtype if comm_dtype is not None else reduce_dtype
        if comm_dtype is not None and comm_dtype not in SUPPORTED_MODEL_DTYPES:
            raise ZeroConfigError(
                f"comm_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                f"got {comm_dtype!r}"
            )
        if isinstance(gradient_predivide_factor, bool) or not (
            isinstance(gradient_predivide_factor, (int, float))
            and math.isfinite(gradient_predivide_factor)
            and gradient_predivide_factor > 0
        ):
            raise ZeroConfigError(
                f"gradient_predivide_factor must be a positive finite number, got "
                f"{gradient_predivide_factor!r}"
            )
        if offload not in (None, "none", "cpu"):
            raise ZeroConfigError(
                f"offload must be None or 'cpu' (fp32 masters and optimizer state in host "
                f"memory), got {offload!r}"
            )
        if no_grad_rule not in ("skip", "zero"):
            raise ZeroConfigError(
                f"no_grad_rule must be 'skip' (torch: params without a gradient are not "
                f"changed) or 'zero' (DeepSpeed: stepped with a zero gradient), got "
                f"{no_grad_rule!r}"
            )
        self._scaler = self._make_scaler(loss_scale, loss_scale_options)

        _check_elementwise(optimizer_class, elementwise, {})
        # Instantiate once on a dummy tensor: validates the hyperparameters (torch's own errors)
        # and reveals the class defaults, before anything touches the model.
        probe = optimizer_class([torch.zeros(1, requires_grad=True)], **defaults)
        _check_elementwise(optimizer_class, elementwise, probe.defaults)
        del probe
        # torch's fused kernels (``fused=True``, passed through like any option) step the
        # one-tensor partition in one pass without temporaries: 5x faster than the default
        # Adam on a CPU here, but not always bit-identical to it (AdamW's decay and SGD's
        # momentum round differently), so the default stays torch's default.

        self._optimizer_class = optimizer_class
        self._defaults = dict(defaults)
        try:
            self._comm = Comm(process_group)
        except ValueError as exc:
            raise ZeroConfigError(str(exc)) from None
        self.stage = stage
        self.align = align
        self.bucket_numel = bucket_numel
        if isinstance(step_chunk_numel, bool) or not isinstance(step_chunk_numel, int) or step_chunk_numel < 0:
            raise ZeroConfigError(
                f"step_chunk_numel must be an int >= 0 (elements; 0: no chunking), got "
                f"{step_chunk_numel!r}"
            )
        self.step_chunk_numel = step_chunk_numel
        self.offload = "cpu" if offload == "cpu" else None
        self.master_copy = master_copy
        self.no_grad_rule = no_grad_rule
        self._host_grads: list[torch.Tensor | None] = []  # offload: pinned partition grads
        self._broadcast_params = broadcast_params
        self._groups: list[FlatGroup] = []
        self._named: bool | None = None
        self._names: dict[str, tuple[int, int]] = {}
        self._frozen_names: set[str] = set()
        self._ids: dict[int, tuple[int, int]] = {}
        self._seen_ids: set[int] = set()
        self._hook_handles: list[Any] = []
        self._no_sync_depth = 0
        self._callback_queued = False
        self._grads_prepared = False
        self._found_inf = False
        #: True when the last :meth:`step` was skipped because of an fp16 overflow.
        self.last_step_skipped = False
        self._reducer = GradReducer(
            self._comm,
            stage=stage,
            bucket_numel=bucket_numel,
            comm_dtype=comm_dtype,
            predivide=float(gradient_predivide_factor),
            max_in_flight=max_in_flight,
        )
        if self._scaler is not None:
            self._reducer.unscale = 1.0 / self._scaler.scale

        # torch.optim.Optimizer plumbing (LR schedulers require an Optimizer instance; hooks).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        parsed = _parse_groups(params, 0)
        entry_groups = [self._make_entries(g, items) for g, (items, _) in enumerate(parsed)]
        self._check_same_on_all_ranks(entry_groups, first_group=0)
        masters = []
        for entries in entry_groups:
            fg = self._install_group(entries)
            masters.append(fg.master)
        self.optim = optimizer_class(
            [{"params": [m], **opts} for m, (_, opts) in zip(masters, parsed)], **defaults
        )
        self.defaults = self.optim.defaults
        for g, fg in enumerate(self._groups):
            self.optim.param_groups[g][_NAMES_KEY] = [p.name for p in fg.layout.params]

    # ----- construction helpers -----------------------------------------------------------

    @staticmethod
    def _make_scaler(loss_scale: Any, options: dict[str, Any] | None) -> LossScaler | None:
        options = dict(options or {})
        if loss_scale is None:
            if options:
                raise ZeroConfigError("loss_scale_options given without loss_scale; pass "
                                      "loss_scale='dynamic' or a float")
            return None
        if loss_scale == "dynamic":
            return LossScaler(**{"init_scale": 2.0**16, **options}, dynamic=True)
        if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
            if not (math.isfinite(loss_scale) and loss_scale > 0):
                raise ZeroConfigError(f"loss_scale must be positive and finite, got {loss_scale}")
            return LossScaler(float(loss_scale), dynamic=False, **options)
        raise ZeroConfigError(
            f"loss_scale must be None, 'dynamic' or a positive float, got {loss_scale!r}"
        )

    def _make_entries(self, g: int, items: list[tuple[str | None, Any]]) -> list[Entry]:
        entries = []
        seen_here: set[int] = set()
        for i, (name, p) in enumerate(items):
            if not isinstance(p, torch.Tensor):
                raise ZeroConfigError(
                    f"group {g} item {i} is a {type(p).__name__}, not a tensor; pass params, "
                    f"(name, param) pairs or param-group dicts"
                )
            named = name is not None
            if self._named is None:
                self._named = named
            elif self._named != named:
                raise ZeroConfigError(
                    "some params are given with names and some without; pass all as "
                    "(name, param) pairs (model.named_parameters()) or all as plain params"
                )
            name = name if named else f"group{g}.param{i}"
            if id(p) in self._seen_ids or id(p) in seen_here:
                raise ZeroConfigError(
                    f"param {name!r} appears more than once in the param groups; list every "
                    f"param once (tied weights: pass the shared param once)"
                )
            if name in self._names or name in self._frozen_names or any(
                e.name == name for e in entries
            ):
                raise ZeroConfigError(f"param name {name!r} is used twice; names must be unique")
            if not p.is_leaf:
                raise ZeroConfigError(f"param {name!r} is not a leaf tensor; pass model params")
            trainable = bool(p.requires_grad)
            if trainable and p.dtype not in SUPPORTED_MODEL_DTYPES:
                raise ZeroConfigError(
                    f"param {name!r} has dtype {dtype_name(p.dtype)}; ZeroOptimizer supports "
                    f"float32, bfloat16 and float16 params (fp32 masters); cast the model"
                )
            seen_here.add(id(p))
            entries.append(Entry(name, p, trainable))
        trainable = [e for e in entries if e.trainable]
        if trainable:
            first = trainable[0].param
            for e in trainable[1:]:
                if e.param.dtype != first.dtype or e.param.device != first.device:
                    raise ZeroConfigError(
                        f"group {g} mixes params of dtype/device {dtype_name(first.dtype)}/"
                        f"{first.device} ({trainable[0].name!r}) and "
                        f"{dtype_name(e.param.dtype)}/{e.param.device} ({e.name!r}); put params "
                        f"of different dtypes or devices into separate param groups"
                    )
        return entries

    def _check_same_on_all_ranks(self, entry_groups: list[list[Entry]], first_group: int) -> None:
        sig = {
            "config": (self.stage, self.align, self._optimizer_class.__name__),
            "groups": [
                [
                    (e.name, tuple(e.param.shape), dtype_name(e.param.dtype))
                    for e in entries
                    if e.trainable
                ]
                for entries in entry_groups
            ],
        }
        problem = _describe_signature_mismatch(self._comm.all_gather_object(sig))
        if problem is not None:
            where = "" if first_group == 0 else f" (groups from index {first_group})"
            raise ZeroConfigError(
                f"ZeroOptimizer params differ across ranks{where}: {problem}; every rank must "
                f"build ZeroOptimizer over the same model and param groups (same params in the "
                f"same order, shapes and dtypes) and the same stage, align and optimizer class"
            )

    def _install_group(self, entries: list[Entry]) -> FlatGroup:
        g = len(self._groups)
        fg = build_flat_group(
            entries, world_size=self._comm.world_size, rank=self._comm.rank, align=self.align
        )
        if self._broadcast_params and fg.flat.numel():
            with torch.no_grad():
                self._comm.broadcast(fg.flat, src=0)
        shared = self.master_copy is not True and fg.model_dtype == MASTER_DTYPE
        if shared and self.offload and fg.device.type != "cpu":
            shared = False  # offloaded masters live in host memory: they must be a copy
        fg.init_master(
            copy=not shared, device=torch.device("cpu") if self.offload else None
        )
        self._groups.append(fg)
        self._host_grads.append(None)
        for e in entries:
            self._seen_ids.add(id(e.param))
            if not e.trainable:
                self._frozen_names.add(e.name)
        for i, p in enumerate(fg.params):
            self._ids[id(p)] = (g, i)
            self._names[fg.layout.params[i].name] = (g, i)
        self._reducer.add_group(fg)
        for i, p in enumerate(fg.params):
            self._hook_handles.append(
                p.register_post_accumulate_grad_hook(_make_grad_hook(self, g, i))
            )
        return fg

    # ----- torch.optim.Optimizer surface --------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's groups (one flat fp32 master each), plus
        ``"zero_param_names"``. Changing ``lr`` etc. here takes effect on the next step."""
        return self.optim.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's state, keyed by the flat master partitions."""
        return self.optim.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (same forms as the constructor's dicts).

        Collective: call on all ranks with the same group (checked).
        """
        g = len(self._groups)
        ((items, options),) = _parse_groups([param_group], g)
        entries = self._make_entries(g, items)
        self._check_same_on_all_ranks([entries], first_group=g)
        fg = self._install_group(entries)
        self.optim.add_param_group({"params": [fg.master], **options})
        self.optim.param_groups[g][_NAMES_KEY] = [p.name for p in fg.layout.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the partition gradients and any gradients left in the model's params.

        Not needed between steps (a step consumes its gradients); kept for torch's contract.
        ``set_to_none=False`` leaves zero gradients that a following ``step`` applies, as torch.
        """
        for fg in self._groups:
            for p in fg.params:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()
        self._reducer.zero_grad(set_to_none)
        self._grads_prepared = False

    @torch.no_grad()
    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        """Reduce outstanding gradients, step the partition, all-gather the model.

        Collective. ``closure`` is called once (with grad enabled) before the step; ``kwargs``
        are passed to the wrapped optimizer's ``step``. The gradients are consumed: the next
        backward starts from zero. Params without a gradient follow ``no_grad_rule``; a group
        without any is not stepped. With loss scaling, an overflow on any rank skips the step
        on every rank (``last_step_skipped`` is then True) and updates a dynamic scale.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_params_attached()
        found_inf = self._prepare_grads()
        self._grads_prepared = False
        reducer = self._reducer
        if found_inf:
            assert self._scaler is not None
            self._scaler.update(True)
            self._reducer.unscale = 1.0 / self._scaler.scale
            self.last_step_skipped = True
            reducer.consume()
            return loss
        snapshots = []
        copies = []
        for g, fg in enumerate(self._groups):
            if not reducer.has_grad[g]:
                fg.master.grad = None
                continue
            grad = reducer.part_grads[g]
            assert grad is not None
            if grad.device != fg.master.device:  # offload: device -> pinned host, async
                host = self._host_grad(g)
                host.copy_(grad, non_blocking=True)
                copies.append(grad.device)
                grad = host
            fg.master.grad = grad
            got = reducer.got_grad[g]
            if self.no_grad_rule == "skip" and any(got) and not all(got):
                snapshots.append((g, self._snapshot_without_grad(g)))
        for device in set(copies):  # the host copies must land before the CPU step reads them
            torch.cuda.current_stream(device).synchronize()
        try:
            self._step_wrapped(kwargs)
        finally:
            for fg in self._groups:
                fg.master.grad = None
        for g, snapshot in snapshots:
            self._restore_without_grad(g, snapshot)
        for fg in self._groups:
            fg.zero_master_padding()
        self.sync_model_from_masters()
        if self._scaler is not None:
            self._scaler.update(False)
            self._reducer.unscale = 1.0 / self._scaler.scale
        self.last_step_skipped = False
        reducer.consume()
        return loss

    def _check_params_attached(self) -> None:
        """Refuse to step when a param no longer lives in its flat buffer (``model.to(...)``,
        ``param.data = ...`` after construction): the step would update buffers the model no
        longer reads, and training would silently stop."""
        for fg in self._groups:
            if not fg.params:
                continue
            base = fg.flat.untyped_storage().data_ptr()
            for spec, p in zip(fg.layout.params, fg.params):
                if p.untyped_storage().data_ptr() != base and spec.numel:
                    raise ZeroConfigError(
                        f"param {spec.name!r} no longer lives in ZeroOptimizer's flat buffer "
                        f"(the model was moved or cast, or param.data reassigned, after the "
                        f"optimizer was built); move/cast the model first, then build "
                        f"ZeroOptimizer"
                    )

    def _step_wrapped(self, kwargs: dict[str, Any]) -> None:
        """The wrapped optimizer's step over every group that has a gradient; a partition
        larger than ``step_chunk_numel`` is stepped chunk by chunk.

        A chunk is a Parameter sharing the master's storage, its grad and tensor state are
        views of the partition's, and each chunk gets its own copy of the scalar state (``step``
        is advanced once per chunk, then kept once). State the optimizer creates on its first
        step is gathered into partition-sized tensors, so ``state_partitions`` stays one tensor
        per key; state it replaces instead of updating in place is copied back.
        """
        limit = self.step_chunk_numel
        chunked = [
            g for g, fg in enumerate(self._groups)
            if limit and fg.master.grad is not None and fg.layout.partition_numel > limit
            and not self.optim.param_groups[g].get("fused")  # fused: no temporaries to bound
        ]
        if not chunked:
            self.optim.step(**kwargs)
            return
        saved_grads = {}
        for g in chunked:  # stepped below, chunk by chunk; the others in one step here
            saved_grads[g] = self._groups[g].master.grad
            self._groups[g].master.grad = None
        if any(fg.master.grad is not None for fg in self._groups):
            self.optim.step(**kwargs)
        all_groups = self.optim.param_groups
        try:
            for g in chunked:
                fg = self._groups[g]
                group = all_groups[g]
                grad = saved_grads[g]
                full = self.optim.state.get(fg.master, {})
                pn = fg.layout.partition_numel
                new_full: dict[str, Any] = {}
                self.optim.param_groups = [group]
                ranges = [(lo, min(lo + limit, pn)) for lo in range(0, pn, limit)]
                # Once the state exists as partition tensors, one step over all chunks at once
                # (each chunk's working set stays in cache); the first step, which creates the
                # state, goes chunk by chunk so that it never exists twice.
                batches = [ranges] if full else [[r] for r in ranges]
                for batch in batches:
                    self._step_chunks(fg, group, grad, full, new_full, batch, kwargs)
                self.optim.state[fg.master] = new_full
        finally:
            self.optim.param_groups = all_groups
            for g, grad in saved_grads.items():
                self._groups[g].master.grad = grad

    def _step_chunks(
        self, fg: FlatGroup, group: dict[str, Any], grad: torch.Tensor, full: dict[str, Any],
        new_full: dict[str, Any], ranges: list[tuple[int, int]], kwargs: dict[str, Any],
    ) -> None:
        """One wrapped step over the chunks ``ranges`` of ``fg``'s partition (see
        :meth:`_step_wrapped`); their resulting state lands in ``new_full``."""
        pn = fg.layout.partition_numel
        chunks = []
        for lo, hi in ranges:
            chunk = torch.nn.Parameter(fg.master_data[lo:hi])
            chunk.grad = grad[lo:hi]
            views = {}
            for key, value in full.items():
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == pn:
                    views[key] = value[lo:hi]
                elif isinstance(value, torch.Tensor):
                    views[key] = value.clone()
                else:
                    views[key] = copy.deepcopy(value)
            self.optim.state[chunk] = views
            chunks.append(chunk)
        group["params"] = chunks
        try:
            self.optim.step(**kwargs)
        finally:
            group["params"] = [fg.master]
        for chunk, (lo, hi) in zip(chunks, ranges):
            after = self.optim.state.pop(chunk, {})
            for key, value in after.items():
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == hi - lo:
                    target = new_full.get(key)
                    if target is None:
                        target = full.get(key)
                        if not (isinstance(target, torch.Tensor) and target.numel() == pn):
                            target = torch.zeros(pn, dtype=value.dtype, device=value.device)
                        new_full[key] = target
                    if value.data_ptr() != target[lo:hi].data_ptr():
                        target[lo:hi].copy_(value)
                else:
                    new_full[key] = value  # scalars: every chunk ends with the same
            if fg.master_data[lo:hi].data_ptr() != chunk.data_ptr():
                fg.master_data[lo:hi].copy_(chunk.detach())

    def _host_grad(self, g: int) -> torch.Tensor:
        host = self._host_grads[g]
        if host is None:
            fg = self._groups[g]
            host = torch.empty(
                fg.layout.partition_numel, dtype=MASTER_DTYPE, device="cpu",
                pin_memory=fg.device.type == "cuda",
            )
            self._host_grads[g] = host
        return host

    def _ranges_without_grad(self, g: int) -> list[tuple[int, int]]:
        """This rank's partition ranges ``[lo, hi)`` of params that got no gradient."""
        fg = self._groups[g]
        got = self._reducer.got_grad[g]
        ranges: list[tuple[int, int]] = []
        for frag in fg.layout.fragments_of_rank(self.rank):
            if got[frag.param_index]:
                continue
            lo, hi = frag.partition_start, frag.partition_start + frag.numel
            if ranges and ranges[-1][1] == lo:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
        return ranges

    def _snapshot_without_grad(self, g: int) -> list[tuple[int, int, dict[str, torch.Tensor | None]]]:
        fg = self._groups[g]
        state = self.optim.state.get(fg.master, {})
        out = []
        for lo, hi in self._ranges_without_grad(g):
            saved: dict[str, torch.Tensor | None] = {"master": fg.master_data[lo:hi].clone()}
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() == 1:
                    saved[key] = value[lo:hi].clone()
            out.append((lo, hi, saved))
        return out

    def _restore_without_grad(self, g: int, snapshot: list[tuple[int, int, dict]]) -> None:
        fg = self._groups[g]
        state = self.optim.state.get(fg.master, {})
        pn = fg.layout.partition_numel
        for lo, hi, saved in snapshot:
            fg.master_data[lo:hi].copy_(saved["master"])
            for key, value in state.items():
                if not (isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == pn):
                    continue
                if key in saved:
                    value[lo:hi].copy_(saved[key])
                else:  # created by this step: a param that never had a gradient has none
                    value[lo:hi].zero_()

    # ----- gradients ----------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally without communicating.

        Stage 2 leaves them in ``param.grad``; stage 1 moves them into its flat gradient
        buffer. The next backward outside (or ``step``) reduces the accumulated sum.
        """
        self._no_sync_depth += 1
        try:
            yield
        finally:
            self._no_sync_depth -= 1

    def _on_param_grad(self, g: int, i: int, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        self._grads_prepared = False  # also inside no_sync: step must collect what is left
        if self._no_sync_depth and self.stage == 2:
            return
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._callback_queued = True
        grad, p.grad = p.grad, None
        self._reducer.add_param_grad(g, i, grad)

    def _end_backward(self) -> None:
        self._callback_queued = False
        if not self._no_sync_depth:
            self._reducer.end_backward()

    def _prepare_grads(self) -> bool:
        """Finish reductions, then agree across ranks, with one all-reduce and one host sync
        for all groups, on (a) whether any gradient is non-finite (with loss scaling) and (b)
        under ``no_grad_rule="skip"`` at world size > 1, which params got a gradient on any
        rank (a param used on some ranks only is stepped with the averaged gradient, as DDP's
        ``find_unused_parameters``, never half-skipped). The partition gradients are already
        unscaled (the loss scale is undone as they are reduced), so this may run any number of
        times. Without either, no communication and no sync."""
        if self._grads_prepared:
            return self._found_inf
        reducer = self._reducer
        reducer.reduce_local_grads([fg.params for fg in self._groups])
        agree_grads = self.no_grad_rule == "skip" and self.world_size > 1
        found_inf = False
        if self._scaler is not None or agree_grads:
            device = self._device()
            pieces = []
            if self._scaler is not None:
                parts = [
                    p for g, p in enumerate(reducer.part_grads)
                    if p is not None and reducer.has_grad[g] and p.numel()
                ]
                if parts:  # max |g| per partition: NaN and inf propagate
                    norms = torch.stack(torch._foreach_norm(parts, math.inf))
                    pieces.append((~torch.isfinite(norms)).any().to(MASTER_DTYPE).reshape(1))
                else:
                    pieces.append(torch.zeros(1, dtype=MASTER_DTYPE, device=device))
            if agree_grads:
                flags = [float(x) for got in reducer.got_grad for x in got]
                pieces.append(torch.tensor(flags, dtype=MASTER_DTYPE).to(device, non_blocking=True))
            vec = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            self._comm.all_reduce(vec, op=torch.distributed.ReduceOp.MAX)
            values = vec.tolist()  # the step's one host sync
            if self._scaler is not None:
                found_inf = values.pop(0) > 0
            if agree_grads:
                k = 0
                for g, got in enumerate(reducer.got_grad):
                    agreed = [v > 0 for v in values[k : k + len(got)]]
                    k += len(got)
                    if any(agreed) and not reducer.has_grad[g]:
                        reducer.start_grad_group(g)  # other ranks reduced into it: zeros here
                    reducer.got_grad[g] = agreed
        self._found_inf = found_inf
        self._grads_prepared = True
        return found_inf

    def _device(self) -> torch.device:
        """The device the model's trainable params live on (a group without trainable params
        has a placeholder buffer on the CPU)."""
        for fg in self._groups:
            if fg.params:
                return fg.device
        return torch.device("cpu")

    @torch.no_grad()
    def clip_grad_norm(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the gradients of all groups by their global norm; return that norm.

        Collective. Call after the last backward and before :meth:`step`. The norm is over the
        averaged, unscaled gradients of every trainable param on every rank, exactly what
        ``torch.nn.utils.clip_grad_norm_`` computes on the unsharded model (0-d fp32 tensor).
        """
        found_inf = self._prepare_grads()
        norm_type = float(norm_type)
        reducer = self._reducer
        parts = [
            p for g, p in enumerate(reducer.part_grads)
            if p is not None and reducer.has_grad[g] and p.numel()
        ]
        device = self._device()
        if norm_type == math.inf:
            local = torch.zeros((), dtype=MASTER_DTYPE, device=device)
            for p in parts:
                local = torch.maximum(local, p.abs().max())
            self._comm.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
            total = local
        elif self.world_size == 1:
            # every param is whole here: torch's own computation (a norm per param, then the
            # norm of those), so clipping is bit-identical to torch.nn.utils.clip_grad_norm_
            norms = [
                torch.linalg.vector_norm(
                    reducer.part_grads[g][f.partition_start : f.partition_start + f.numel],
                    norm_type,
                )
                for g, fg in enumerate(self._groups)
                if reducer.has_grad[g]
                for f in fg.layout.fragments_of_rank(0)
            ]
            total = (
                torch.linalg.vector_norm(torch.stack(norms), norm_type)
                if norms
                else torch.zeros((), dtype=MASTER_DTYPE, device=device)
            )
        else:
            local = torch.zeros((), dtype=MASTER_DTYPE, device=device)
            for p in parts:
                local = local + torch.linalg.vector_norm(p, norm_type) ** norm_type
            self._comm.all_reduce(local)
            total = local ** (1.0 / norm_type)
        if error_if_nonfinite and not found_inf and not bool(torch.isfinite(total)):
            raise RuntimeError(
                f"the total norm of order {norm_type} of the gradients is non-finite, so it "
                f"cannot be clipped; pass error_if_nonfinite=False to clip anyway"
            )
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in parts:
            p.mul_(coef)
        return total

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` with loss scaling, else ``loss``."""
        return loss if self._scaler is None else loss * self._scaler.scale

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``scale_loss(loss).backward(**kwargs)``."""
        self.scale_loss(loss).backward(**kwargs)

    @property
    def loss_scale(self) -> float | None:
        """The current loss scale, or None without scaling."""
        return None if self._scaler is None else self._scaler.scale

    def remove_hooks(self) -> None:
        """Detach the stage-2 gradient hooks from the model's params."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()

    # ----- per-parameter access (fragment map) --------------------------------------------

    def _locate(self, param_or_name: Any) -> tuple[int, int]:
        if isinstance(param_or_name, str):
            if param_or_name in self._names:
                return self._names[param_or_name]
            if param_or_name in self._frozen_names:
                raise KeyError(
                    f"param {param_or_name!r} is frozen (requires_grad=False); ZeroOptimizer "
                    f"keeps no master or state for it"
                )
            raise KeyError(f"no trainable param named {param_or_name!r} in this optimizer")
        if isinstance(param_or_name, torch.Tensor) and id(param_or_name) in self._ids:
            return self._ids[id(param_or_name)]
        raise KeyError(f"{type(param_or_name).__name__} is not a trainable param of this optimizer")

    def _partition_tensor(self, g: int, key: str) -> torch.Tensor:
        fg = self._groups[g]
        if key == "master":
            return fg.master_data
        if key == "grad":
            part = self._reducer.part_grads[g]
            if part is None or not self._reducer.has_grad[g]:
                raise KeyError(f"group {g} has no partition gradient (no backward since zero_grad)")
            return part
        value = self.optim.state.get(fg.master, {}).get(key)
        if value is None:
            raise KeyError(f"group {g} has no optimizer state {key!r} (yet)")
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            raise KeyError(f"optimizer state {key!r} is a scalar, not a partition")
        return value

    def get_local_fragment(
        self, param_or_name: Any, key: str = "master"
    ) -> tuple[Fragment | None, torch.Tensor]:
        """This rank's fragment of a param and a live 1-D view of ``key`` over it.

        Not collective (no communication). ``key``: ``"master"``, ``"grad"`` (the averaged
        partition gradient) or a tensor state name (``"exp_avg"``, ...). The view holds the
        param's flattened elements ``[fragment.param_start, fragment.param_start + numel)``;
        ``(None, empty tensor)`` when this rank holds none of the param.
        """
        g, i = self._locate(param_or_name)
        tensor = self._partition_tensor(g, key)
        rank = self._comm.rank
        for frag in self._groups[g].layout.fragments_of_param(i):
            if frag.rank == rank:
                return frag, tensor[frag.partition_start : frag.partition_start + frag.numel]
        return None, tensor[:0]

    def _gather_param(self, g: int, i: int, tensor: torch.Tensor) -> torch.Tensor:
        spec = self._groups[g].layout.params[i]
        # on the group's device: offloaded (host) tensors cannot travel over NCCL
        out = torch.zeros(spec.numel, dtype=tensor.dtype, device=self._groups[g].device)
        for frag in self._groups[g].layout.fragments_of_param(i):
            piece = out[frag.param_start : frag.param_start + frag.numel]
            if frag.rank == self._comm.rank:
                piece.copy_(tensor[frag.partition_start : frag.partition_start + frag.numel])
            self._comm.broadcast(piece, src=frag.rank)
        return out.view(spec.shape)

    @torch.no_grad()
    def get_full_master(self, param_or_name: Any) -> torch.Tensor:
        """The param's full fp32 master value, shaped like the param (a new tensor).

        Collective: every rank of the group calls it for the same param; each fragment is
        broadcast from its owner (exact bits).
        """
        g, i = self._locate(param_or_name)
        return self._gather_param(g, i, self._groups[g].master_data)

    @torch.no_grad()
    def get_full_state(self, param_or_name: Any, key: str) -> torch.Tensor:
        """The param's full optimizer state ``key`` shaped like the param (a new tensor).

        Collective (as :meth:`get_full_master`). A scalar state (``"step"``) is returned as
        stored, without communication. KeyError (on every rank) if the state does not exist.
        """
        g, i = self._locate(param_or_name)
        fg = self._groups[g]
        if key not in ("master", "grad"):
            value = self.optim.state.get(fg.master, {}).get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                return value.clone()
            if value is not None and not isinstance(value, torch.Tensor):
                return value
        return self._gather_param(g, i, self._partition_tensor(g, key))

    @torch.no_grad()
    def set_full_master(self, param_or_name: Any, value: torch.Tensor) -> None:
        """Set a param's value: each rank updates its master fragment and the model param.

        Not collective, but every rank must pass the same full ``value`` (shaped like the
        param) for the model to stay consistent.
        """
        g, i = self._locate(param_or_name)
        fg = self._groups[g]
        spec = fg.layout.params[i]
        value = torch.as_tensor(value)
        if tuple(value.shape) != spec.shape:
            raise ZeroConfigError(
                f"set_full_master({spec.name!r}): value has shape {tuple(value.shape)}, the "
                f"param has {spec.shape}; pass the full parameter value"
            )
        flat = value.reshape(-1).to(device=fg.device, dtype=MASTER_DTYPE)
        for frag in fg.layout.fragments_of_param(i):
            if frag.rank == self._comm.rank:
                fg.master_data[frag.partition_start : frag.partition_start + frag.numel].copy_(
                    flat[frag.param_start : frag.param_start + frag.numel]
                )
        fg.param_view(i).copy_(value.to(device=fg.device, dtype=fg.model_dtype))

    # ----- bridge (zero_ckpt.snapshot/saving/loading are written against these) ------------

    @property
    def rank(self) -> int:
        """This process's rank within ``process_group``."""
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    @property
    def process_group(self) -> Any:
        """The group collectives run over (None when torch.distributed is not initialised)."""
        return self._comm.group

    @property
    def layouts(self) -> list[GroupLayout]:
        """One layout per group at the current world size, names filled in."""
        return [fg.layout for fg in self._groups]

    def group_params(self, g: int) -> list[torch.nn.Parameter]:
        """Group ``g``'s trainable params in flat order (frozen ones excluded)."""
        return list(self._groups[g].params)

    def master_partition(self, g: int) -> torch.Tensor:
        """Live 1-D fp32 master partition of group ``g`` (``partition_numel`` elements,
        padding included and zero). Not collective."""
        return self._groups[g].master_data

    def _split_state(self, g: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        fg = self._groups[g]
        pn = fg.layout.partition_numel
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        for key, value in self.optim.state.get(fg.master, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == pn:
                tensors[key] = value
            elif isinstance(value, torch.Tensor) and value.numel() == 1:
                scalars[key] = value
            elif isinstance(value, (bool, int, float)):
                scalars[key] = value
            else:
                raise ZeroConfigError(
                    f"{self._optimizer_class.__name__} keeps state {key!r} of type/shape "
                    f"{getattr(value, 'shape', type(value).__name__)}, which is neither a "
                    f"per-element tensor nor a scalar: it is not elementwise; use an "
                    f"elementwise optimizer"
                )
        return tensors, scalars

    def state_partitions(self, g: int) -> dict[str, torch.Tensor]:
        """Live 1-D tensors (``partition_numel`` each) of every tensor-valued elementwise state
        of group ``g`` (``exp_avg``, ``momentum_buffer``, ...); empty before state exists.
        Not collective."""
        return self._split_state(g)[0]

    def group_scalars(self, g: int) -> dict[str, Any]:
        """Scalar state of group ``g`` as python numbers (``{"step": 12}``). Not collective."""
        return {k: _python_scalar(k, v) for k, v in self._split_state(g)[1].items()}

    def group_hyperparams(self, g: int) -> dict[str, Any]:
        """JSON-serialisable hyperparameters of group ``g`` (tuples as lists), without
        ``params``. Not collective."""
        return {k: _jsonable(k, v) for k, v in self._user_options(g).items()}

    def _user_options(self, g: int) -> dict[str, Any]:
        """Group ``g``'s options (hyperparameters and implementation flags), without
        ``params``."""
        return {
            k: v for k, v in self.optim.param_groups[g].items() if k not in ("params", _NAMES_KEY)
        }

    @torch.no_grad()
    def load_hyperparams(self, g: int, hyperparams: dict[str, Any]) -> None:
        """Set group ``g``'s hyperparameters (lists become tuples where torch keeps tuples).
        Not collective."""
        group = self.optim.param_groups[g]
        for key, value in hyperparams.items():
            if key in ("params", _NAMES_KEY, "param_names"):
                continue
            current = group.get(key)
            if isinstance(current, torch.Tensor):
                current.fill_(value)
            elif isinstance(current, tuple) and isinstance(value, (list, tuple)):
                group[key] = tuple(value)
            else:
                group[key] = value

    @torch.no_grad()
    def load_partition(
        self, g: int, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]
    ) -> None:
        """Load this rank's partition of group ``g``. Not collective.

        ``tensors["master"]`` and every other entry (tensor state such as ``exp_avg``) are 1-D
        with at most ``partition_numel`` elements (normally the real, unpadded part); they are
        copied to the head of the partition and the rest is zeroed. State is created if the
        wrapped optimizer has none yet. ``scalars`` (``{"step": 12}``) are stored as the wrapped
        optimizer keeps them (``step``: 0-d float32 tensor for torch optimizers). The model
        params are NOT updated: call :meth:`sync_model_from_masters` afterwards.
        """
        fg = self._groups[g]
        pn = fg.layout.partition_numel
        if "master" not in tensors:
            raise ZeroStateDictError(f"load_partition(group {g}): no 'master' tensor given")

        def fill(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
            src = src.reshape(-1) if src.dim() == 0 else src
            if src.dim() != 1 or src.numel() > pn:
                raise ZeroStateDictError(
                    f"load_partition(group {g}, {key!r}): got shape {tuple(src.shape)}, expected "
                    f"1-D with at most {pn} elements (this rank's partition); the checkpoint "
                    f"does not match this layout"
                )
            n = src.numel()
            dst[:n].copy_(src)
            dst[n:].zero_()

        fill(fg.master_data, tensors["master"], "master")
        state = self.optim.state[fg.master]
        # Replace, not merge: state the checkpoint lacks (e.g. moments of a trained optimizer
        # loading a checkpoint saved before its first step) must not survive the load.
        for key in [k for k in state if k not in tensors and k not in scalars]:
            del state[key]
        for key, src in tensors.items():
            if key == "master":
                continue
            dst = state.get(key)
            if not (
                isinstance(dst, torch.Tensor)
                and dst.dim() == 1
                and dst.numel() == pn
                and dst.dtype == src.dtype
            ):
                dst = torch.zeros(pn, dtype=src.dtype, device=fg.master.device)
                state[key] = dst
            fill(dst, src, key)
        group = self.optim.param_groups[g]
        for key, value in scalars.items():
            current = state.get(key)
            if isinstance(current, torch.Tensor):
                state[key] = torch.tensor(value, dtype=current.dtype, device=current.device)
            elif current is not None:
                state[key] = type(current)(value)
            else:
                on_device = group.get("fused") or group.get("capturable")
                dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state[key] = torch.tensor(
                    value, dtype=dtype, device=fg.master.device if on_device else torch.device("cpu")
                )

    @torch.no_grad()
    def sync_model_from_masters(self) -> None:
        """Write every rank's master partition (cast to the model dtype) into every rank's
        model flat buffer. Collective."""
        for fg in self._groups:
            if not fg.flat.numel():
                continue
            own = fg.own_flat_slice()
            if not fg.master_is_model:  # cast (and, offloaded, host -> device) into place
                own.copy_(fg.master_data, non_blocking=True)
            self._comm.all_gather_into(fg.flat, own)

    @torch.no_grad()
    def sync_masters_from_model(self) -> None:
        """Copy the model's current values into this rank's master partitions (e.g. after
        ``model.load_state_dict``, which writes into the params in place). Not collective:
        each rank reads its own partition of its flat buffer."""
        for fg in self._groups:
            if fg.master_is_model:
                continue
            n = fg.real_partition_numel()
            fg.master_data[:n].copy_(fg.own_flat_slice()[:n])
            fg.master_data[n:].zero_()

    def loss_scaler_state(self) -> dict[str, Any]:
        """The loss scaler's JSON-serialisable state; ``{}`` without loss scaling."""
        return {} if self._scaler is None else self._scaler.state_dict()

    def load_loss_scaler_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`loss_scaler_state`; ignored (empty or not) without loss scaling."""
        if self._scaler is not None and state:
            self._scaler.load_state_dict(state)
            self._reducer.unscale = 1.0 / self._scaler.scale

    # ----- state dicts --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """This rank's shard (live tensors, not copies) plus layout info. Not collective.

        Only :meth:`load_state_dict` of an optimizer with the same world size, rank and layout
        can load it; use ``zero_ckpt`` to change world size, :meth:`consolidate_state_dict`
        for a plain torch state dict.
        """
        return {
            "zero_optimizer": {
                "version": _STATE_DICT_VERSION,
                "world_size": self.world_size,
                "rank": self.rank,
                "stage": self.stage,
                "optimizer_class": self._optimizer_class.__name__,
                "layouts": [_layout_record(fg.layout) for fg in self._groups],
            },
            "groups": [
                {
                    "master": fg.master_data,
                    "state": self.state_partitions(g),
                    "scalars": self.group_scalars(g),
                    "hyperparams": self.group_hyperparams(g),
                }
                for g, fg in enumerate(self._groups)
            ],
            "loss_scaler": self.loss_scaler_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict, either of two kinds (checked; :class:`ZeroStateDictError`
        otherwise):

        * :meth:`state_dict` output saved by the same rank at the same world size and layout;
          the masters are loaded and the model is updated from them (collective: all-gather);
        * a plain torch optimizer state dict (``{"state", "param_groups"}``), as a non-sharded
          ``optimizer_class`` over the same params writes it, or :meth:`consolidate_state_dict`
          returns, from any world size: every rank takes its fragments of each param's state;
          the weights come from the model (the masters are refreshed from it). Not collective.
        """
        if (
            isinstance(state_dict, dict)
            and "zero_optimizer" not in state_dict
            and "state" in state_dict
            and "param_groups" in state_dict
        ):
            self._load_torch_state_dict(state_dict)
            return
        info = state_dict.get("zero_optimizer") if isinstance(state_dict, dict) else None
        if not isinstance(info, dict) or "groups" not in state_dict:
            raise ZeroStateDictError(
                "this is not a ZeroOptimizer state dict (no 'zero_optimizer' entry); for a plain "
                "torch optimizer state dict load it into a plain optimizer, for a zero-ckpt "
                "checkpoint use zero_ckpt.load"
            )
        if info.get("version") != _STATE_DICT_VERSION:
            raise ZeroStateDictError(
                f"ZeroOptimizer state dict version {info.get('version')!r} is not supported "
                f"(expected {_STATE_DICT_VERSION}); save it again with this version"
            )
        if info["world_size"] != self.world_size:
            raise ZeroStateDictError(
                f"state dict was saved at world size {info['world_size']}, this optimizer runs "
                f"at {self.world_size}; load at the same world size or save with zero_ckpt, "
                f"which reshards"
            )
        if info["rank"] != self.rank:
            raise ZeroStateDictError(
                f"state dict holds rank {info['rank']}'s shard but this is rank {self.rank}; "
                f"load each rank's own file"
            )
        mine = [_layout_record(fg.layout) for fg in self._groups]
        if info["layouts"] != mine:
            g = next(
                (k for k, (a, b) in enumerate(zip(info["layouts"], mine)) if a != b),
                min(len(mine), len(info["layouts"])),
            )
            raise ZeroStateDictError(
                f"state dict layout differs from this optimizer's at group {g} (params, shapes, "
                f"dtypes, align or group count); build the optimizer over the same model, param "
                f"groups and align as when saving"
            )
        for g, group in enumerate(state_dict["groups"]):
            self.load_partition(g, {"master": group["master"], **group["state"]}, group["scalars"])
            self.load_hyperparams(g, group["hyperparams"])
        self.load_loss_scaler_state(state_dict.get("loss_scaler") or {})
        self.sync_model_from_masters()

    @torch.no_grad()
    def _load_torch_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups, states = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, list) or not isinstance(states, dict):
            raise ZeroStateDictError(
                "torch optimizer state dict: 'param_groups' must be a list and 'state' a dict"
            )
        if len(groups) != len(self._groups):
            raise ZeroStateDictError(
                f"torch optimizer state dict has {len(groups)} param groups, this optimizer "
                f"has {len(self._groups)}; build ZeroOptimizer with the same param groups"
            )
        self.sync_masters_from_model()
        for g, (fg, pg) in enumerate(zip(self._groups, groups)):
            ids = list(pg.get("params", []))
            trainable = [k for k, e in enumerate(fg.entries) if e.trainable]
            if len(ids) == len(fg.entries):
                ids = [ids[k] for k in trainable]
            elif len(ids) != len(trainable):
                raise ZeroStateDictError(
                    f"torch optimizer state dict group {g} lists {len(ids)} params, this "
                    f"optimizer's group {g} has {len(fg.entries)} ({len(trainable)} trainable); "
                    f"build ZeroOptimizer over the same params"
                )
            names = pg.get("param_names")
            if self._named and isinstance(names, list) and len(names) == len(fg.entries):
                mine = [e.name for e in fg.entries]
                if names != mine:
                    bad = next(k for k, (a, b) in enumerate(zip(names, mine)) if a != b)
                    raise ZeroStateDictError(
                        f"torch optimizer state dict group {g} param {bad} is {names[bad]!r}, "
                        f"this optimizer has {mine[bad]!r}; the params differ"
                    )
            pn = fg.layout.partition_numel
            tensors: dict[str, torch.Tensor] = {}
            scalars: dict[str, Any] = {}
            for index, pid in enumerate(ids):
                st = states.get(pid)
                if not st:
                    continue
                spec = fg.layout.params[index]
                for key, value in st.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        if value.numel() != spec.numel:
                            raise ZeroStateDictError(
                                f"torch optimizer state {key!r} of {spec.name!r} has "
                                f"{value.numel()} elements, the param has {spec.numel}"
                            )
                        part = tensors.get(key)
                        if part is None:
                            part = torch.zeros(pn, dtype=value.dtype, device=fg.master.device)
                            tensors[key] = part
                        flat = value.reshape(-1)
                        for frag in fg.layout.fragments_of_param(index):
                            if frag.rank == self.rank:
                                part[frag.partition_start : frag.partition_start + frag.numel].copy_(
                                    flat[frag.param_start : frag.param_start + frag.numel]
                                )
                    else:
                        number = _python_scalar(key, value)
                        # params skipped by torch carry smaller counts: the group keeps the largest
                        scalars[key] = number if key not in scalars else max(scalars[key], number)
            if tensors or scalars:
                self.load_partition(g, {"master": fg.master_data.clone(), **tensors}, scalars)
            self.load_hyperparams(
                g, {k: v for k, v in pg.items() if k not in ("params", "param_names")}
            )

    @torch.no_grad()
    def set_full_grad(self, param_or_name: Any, value: torch.Tensor) -> None:
        """Set a param's averaged gradient for the coming step (like DeepSpeed's
        ``safe_set_full_grad``): each rank writes its fragment into its partition gradient.

        Not collective, but every rank must pass the same full ``value`` (the param's shape).
        Other params of the group keep the gradient they have (zero if none arrived)."""
        g, i = self._locate(param_or_name)
        fg = self._groups[g]
        flat = self._full_value(g, i, value, "set_full_grad")
        if self.stage == 2 and fg.params[i].grad is not None:
            fg.params[i].grad = None  # left by no_sync: the value set replaces it
        part = self._reducer.start_grad(g, i)
        for frag in fg.layout.fragments_of_param(i):
            if frag.rank == self.rank:
                part[frag.partition_start : frag.partition_start + frag.numel].copy_(
                    flat[frag.param_start : frag.param_start + frag.numel]
                )
        self._reducer.got_grad[g][i] = True
        self._grads_prepared = False

    @torch.no_grad()
    def set_full_state(self, param_or_name: Any, key: str, value: Any) -> None:
        """Set a param's full optimizer state ``key`` (like DeepSpeed's
        ``safe_set_full_optimizer_state``); ``"master"`` and ``"grad"`` are accepted too.

        Not collective, but every rank must pass the same full ``value``. A tensor state the
        optimizer has not created yet is created (zero elsewhere); a scalar state (``"step"``)
        is per group in a ZeroOptimizer, so setting it sets the whole group's."""
        if key == "master":
            self.set_full_master(param_or_name, value)
            return
        if key == "grad":
            self.set_full_grad(param_or_name, value)
            return
        g, i = self._locate(param_or_name)
        fg = self._groups[g]
        state = self.optim.state[fg.master]
        current = state.get(key)
        scalar = not isinstance(value, torch.Tensor) or value.dim() == 0
        if scalar:
            number = value.item() if isinstance(value, torch.Tensor) else value
            if isinstance(current, torch.Tensor):
                current.fill_(number)
            else:
                state[key] = number
            return
        flat = self._full_value(g, i, value, f"set_full_state({key!r})")
        pn = fg.layout.partition_numel
        if not (isinstance(current, torch.Tensor) and current.numel() == pn):
            current = torch.zeros(pn, dtype=value.dtype, device=fg.master.device)
            state[key] = current
        for frag in fg.layout.fragments_of_param(i):
            if frag.rank == self.rank:
                current[frag.partition_start : frag.partition_start + frag.numel].copy_(
                    flat[frag.param_start : frag.param_start + frag.numel]
                )

    def _full_value(self, g: int, i: int, value: Any, what: str) -> torch.Tensor:
        spec = self._groups[g].layout.params[i]
        value = torch.as_tensor(value)
        if tuple(value.shape) != spec.shape:
            raise ZeroConfigError(
                f"{what} of {spec.name!r}: value has shape {tuple(value.shape)}, the param has "
                f"{spec.shape}; pass the full tensor"
            )
        return value.reshape(-1).to(device=self._groups[g].master.device, dtype=MASTER_DTYPE)

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank's optimizer holds beyond the model's params, by kind, counted from
        the live tensors: ``masters`` (separate fp32 master partitions), ``states`` (tensor
        optimizer state), ``partition_grads``, ``flat_grads`` (stage 1), ``bucket_pool``
        (stage 2), ``scratch`` (reduce-scatter outputs), ``host_grads`` (offload), ``total``.
        Not collective."""
        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        out = {
            "masters": sum(nbytes(fg.master_data) for fg in self._groups if not fg.master_is_model),
            "states": sum(
                nbytes(t) for g in range(len(self._groups)) for t in self.state_partitions(g).values()
            ),
            **self._reducer.owned_bytes(),
            "host_grads": sum(nbytes(t) for t in self._host_grads if t is not None),
        }
        out["total"] = sum(out.values())
        return out

    @torch.no_grad()
    def consolidate_state_dict(self, to: int = 0) -> dict[str, Any] | None:
        """A plain ``optimizer_class`` state dict over the same params, on rank ``to``.

        Collective (every partition of every state tensor is gathered to ``to``). Returns, on
        rank ``to``, ``{"state": {param_id: {...}}, "param_groups": [...]}`` exactly as a
        non-sharded ``optimizer_class`` built from the same params would store it: ids count
        every given param (frozen ones included, they have no state) in group order, each state
        tensor is shaped like its param (fp32), ``step`` as torch keeps it; ``param_names`` when
        names were given. Other ranks get None.
        """
        if not 0 <= to < self.world_size:
            raise ZeroConfigError(f"to={to} is not a rank of a group of size {self.world_size}")
        me = self.rank == to
        state: dict[int, dict[str, Any]] = {}
        groups: list[dict[str, Any]] = []
        next_id = 0
        for g, fg in enumerate(self._groups):
            tensors, _ = self._split_state(g)
            full = {}
            for key, t in tensors.items():
                gathered = self._comm.gather(t.to(fg.device).contiguous(), to)
                if me:
                    assert gathered is not None
                    full[key] = torch.cat(gathered)[: fg.layout.numel]
            if not me:
                continue
            raw = self.optim.state.get(fg.master, {})
            frozen_state = self._frozen_initial_state(g)
            ids = []
            index = 0
            for entry in fg.entries:
                ids.append(next_id)
                if entry.trainable:
                    spec = fg.layout.params[index]
                    index += 1
                    if raw:
                        per_param: dict[str, Any] = {}
                        for key, value in raw.items():
                            if key in full:
                                per_param[key] = (
                                    full[key][spec.offset : spec.end].view(spec.shape).clone()
                                )
                            elif isinstance(value, torch.Tensor):
                                per_param[key] = value.clone()
                            else:
                                per_param[key] = copy.deepcopy(value)
                        state[next_id] = per_param
                elif id(entry.param) in frozen_state:
                    state[next_id] = frozen_state[id(entry.param)]
                next_id += 1
            group = {k: copy.deepcopy(v) for k, v in self._user_options(g).items()}
            if self._named:
                group["param_names"] = [e.name for e in fg.entries]
            group["params"] = ids
            groups.append(group)
        return {"state": state, "param_groups": groups} if me else None


    def _frozen_initial_state(self, g: int) -> dict[int, dict[str, Any]]:
        """State a plain optimizer creates at construction for group ``g``'s frozen params.

        Frozen params never get a gradient, so a plain optimizer's state for them is whatever
        its constructor made (none for Adam/SGD; ``step`` and ``sum`` for Adagrad). Probed on
        the meta device first so that lazily initialised optimizers allocate nothing.
        """
        frozen = [e.param for e in self._groups[g].entries if not e.trainable]
        if not frozen:
            return {}
        options = self._user_options(g)

        def probe(device: torch.device | None) -> tuple[list[torch.Tensor], Any]:
            tensors = [
                torch.zeros(p.shape, dtype=p.dtype, device=device or p.device, requires_grad=True)
                for p in frozen
            ]
            return tensors, self._optimizer_class(
                [{"params": tensors, **options}], **self._defaults
            )

        try:
            tensors, plain = probe(torch.device("meta"))
            if not any(plain.state.get(t) for t in tensors):
                return {}
        except Exception:  # an optimizer that cannot live on meta: probe for real
            pass
        tensors, plain = probe(None)
        return {
            id(p): dict(plain.state[t]) for p, t in zip(frozen, tensors) if plain.state.get(t)
        }


def _make_grad_hook(opt: ZeroOptimizer, g: int, i: int) -> Any:
    ref = weakref.ref(opt)

    def hook(param: torch.Tensor) -> None:
        owner = ref()
        if owner is not None:
            owner._on_param_grad(g, i, param)

    return hook
