"""Model averagers for local SGD and hierarchical SGD, with PyTorch's semantics.

This module follows ``torch.distributed.algorithms.model_averaging`` (``averagers.py``,
``hierarchical_model_averager.py``, ``utils.py``): the same constructor arguments, argument
checks (same exception types and messages), warnings, ``average_parameters(params)`` call
protocol and step counting. What it adds:

1. ``state_dict()`` / ``load_state_dict()`` on every averager. The dict is JSON-serialisable
   (ints, strings and lists only); the checkpoint code stores it in ``extra["averager"]``.
   Loading a state whose configuration differs from the averager's raises ``ValueError``
   naming both values; nothing is changed on error.
2. Bucketed averaging. PyTorch flattens *all* parameters into one new buffer (a second full
   copy of the model). Here parameters are averaged in buckets of at most ``bucket_bytes``
   bytes, one ``(device, dtype)`` at a time, and copied back **in place** (PyTorch rebinds
   ``p.data`` to a view of its flat buffer, which would silently detach parameters that are
   views of a ZeRO flat buffer). Peak extra memory is one bucket (plus a temporary copy of
   any non-contiguous parameter, which is rare). A bucket holding a single contiguous piece
   is reduced in place with no copy at all.
3. ``ZeroOptimizer`` support. Passing a ``ZeroOptimizer`` (anything with ``master_partition``)
   to ``average_parameters`` averages the fp32 master partitions across ZeRO groups and
   then refreshes the model from the masters, so masters and model stay consistent.

Numerics: every bucket is divided by the group size *before* a ``SUM`` all-reduce, exactly as
PyTorch does (``ReduceOp.AVG`` is not used: gloo lacks it, and pre-dividing keeps results
bit-identical to PyTorch's averagers). When all parameters share one dtype and fit in one
bucket, the reduced buffer is byte-for-byte PyTorch's, so the results are bit-identical.
With several buckets the elementwise math is the same, but the collective may sum the ranks'
values in a different order (gloo's ring splits a buffer into chunks by size), so results
can differ in the last bit when the group has more than two ranks. Mixed dtypes: PyTorch
``torch.cat``s them into one promoted-dtype buffer; here each dtype is reduced in its own
dtype (so bf16/fp16 parameters are averaged in bf16/fp16).

ZeRO setting (``zero_cross_group``): ZeRO runs inside subgroups (e.g. world 4 = two ZeRO groups
of 2) and model averaging runs across them. Ranks at the same position of their ZeRO group
hold the same partition, so averaging is an all-reduce of each master partition over the
*cross group* of ranks sharing that position. Assumptions, checked with a clear
``ValueError``: every ZeRO group involved has the same size, and an averaging group
contains whole ZeRO groups.

Who calls what (process-group creation is collective over the *default* group, because
``dist.new_group`` requires every rank of the job to enter it, members or not):

- ``HierarchicalModelAverager(...)``: every rank of the job, same arguments, same order
  relative to other group creations (it calls ``dist.new_subgroups``).
- ``averager.average_parameters(zero_optimizer)``: the *first* call with a given optimizer
  creates the cross groups: every rank of the job makes that call at the same point, whatever
  the step. Later calls are collectives over the averaging group that is due.
- ``zero_cross_group(opt, averaging_group)``: every rank of the job.
"""

from __future__ import annotations

import logging
import operator
import warnings
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "ModelAverager",
    "PeriodicModelAverager",
    "HierarchicalModelAverager",
    "average_parameters",
    "get_params_to_average",
    "average_parameters_or_parameter_groups",
    "zero_cross_group",
    "average_zero_optimizer",
]

logger = logging.getLogger(__name__)

#: Default upper bound, in bytes, on one flattened bucket (and so on the extra memory).
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024

# PyTorch's wording, kept verbatim so that users (and tests) see the same warning.
_PERIOD_ONE_WARNING = (
    "no need to use model averaging because the communication cost "
    "of all-reducing parameters will be no less than the cost of all-reducing gradients "
    "by DistributedDataParallel in the backward pass. Therefore, only "
    "DistributedDataParallel should be used for this case."
)


# --------------------------------------------------------------------------- functions


def get_params_to_average(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
) -> list[torch.nn.Parameter]:
    """The parameters to average: those whose ``.grad`` is not None (PyTorch's filter).

    Args:
        params: a model's parameters (``model.parameters()``) or an optimizer's
            ``param_groups`` (dicts with a ``"params"`` list).

    Raises:
        NotImplementedError: for an element that is neither an ``nn.Parameter`` nor a dict
            (PyTorch's exception type).
    """
    out: list[torch.nn.Parameter] = []
    for item in params:
        if isinstance(item, torch.nn.Parameter):
            if item.grad is not None:
                out.append(item)
        elif isinstance(item, dict):
            out.extend(p for p in item["params"] if p.grad is not None)
        else:
            raise NotImplementedError(f"Parameter input of type {type(item)} is not supported")
    return out


def average_parameters(
    params: Iterable[torch.Tensor],
    process_group: dist.ProcessGroup | None = None,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """Average ``params`` in place over ``process_group`` (default: the world).

    Collective: call on all ranks of ``process_group``, with the same parameters (same
    order, shapes, dtypes) on every rank. A rank outside the group returns at once.

    Parameters are flattened into buckets of at most ``bucket_bytes`` bytes (one
    ``(device, dtype)`` at a time; a parameter larger than a bucket is split across
    buckets), each bucket is divided by the group size, ``SUM``-all-reduced and copied back
    into the parameters' own storage. Extra memory: one bucket. An empty ``params`` is a
    no-op (PyTorch raises from ``torch.cat`` instead).
    """
    group = process_group if process_group is not None else _world()
    if dist._rank_not_in_group(group):
        return
    _average_tensors([p.data for p in params], group, _check_bucket_bytes(bucket_bytes))


def average_parameters_or_parameter_groups(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    process_group: dist.ProcessGroup | None,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """Average a model's parameters or an optimizer's param groups (those with a grad).

    Collective: call on all ranks of ``process_group``.
    """
    average_parameters(get_params_to_average(params), process_group, bucket_bytes=bucket_bytes)


def zero_cross_group(opt: Any, averaging_group: dist.ProcessGroup | None = None):
    """Create the cross groups that average ``opt``'s partitions over ``averaging_group``.

    ``opt`` is a ``ZeroOptimizer`` (duck-typed: ``process_group``, ``rank``, ``layouts``,
    ``master_partition(g)``). The cross group of a rank is the set of ranks of its averaging
    group that sit at the same position of their ZeRO group, hence hold the same partition.

    Collective: call on **every rank of the default process group** (members of
    ``averaging_group`` or not), in the same order relative to other process-group
    creations: it all-gathers each rank's group membership over the default group and then
    calls ``dist.new_subgroups_by_enumeration`` (which ``dist.new_group`` requires of every
    rank). Ranks may pass different ``averaging_group`` objects as long as they are the
    disjoint blocks of one partition (e.g. the subgroups of ``dist.new_subgroups``).

    Returns:
        This rank's cross group, or None when this rank is not in ``averaging_group``.

    Raises:
        ValueError: (on every rank alike) when ZeRO groups differ in size, an averaging
            group cuts through a ZeRO group, ranks disagree on their groups, or partitions
            that would be averaged together differ in size.
    """
    world = _world()
    avg = averaging_group if averaging_group is not None else world
    zero_pg = opt.process_group if opt.process_group is not None else world
    in_avg = not dist._rank_not_in_group(avg)
    info = (
        list(dist.get_process_group_ranks(zero_pg)),
        list(dist.get_process_group_ranks(avg)) if in_avg else None,
        [int(opt.master_partition(g).numel()) for g in range(len(opt.layouts))],
        int(opt.rank),
    )
    infos: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(infos, info)
    plan = _plan_cross_groups(infos)
    if not plan:
        return None
    current, _ = dist.new_subgroups_by_enumeration(plan)
    return current if in_avg else None


def average_zero_optimizer(
    opt: Any, cross_group: dist.ProcessGroup | None, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> None:
    """Average ``opt``'s fp32 master partitions over ``cross_group``, then refresh the model.

    ``cross_group`` comes from ``zero_cross_group``; None (a rank outside every averaging
    group) makes this a no-op. Each partition is reduced in place, in slices of at most
    ``bucket_bytes`` (no copy: partitions are contiguous), then
    ``opt.sync_model_from_masters()`` all-gathers the masters into the model params.

    Collective: call on every rank of the averaging group that ``cross_group`` was made
    for (all-reduces over the cross groups, then all-gathers over each ZeRO group).
    Padding elements of the partitions are averaged too (they stay whatever the optimizer
    keeps there, zeros in practice); every master element is averaged, including those of
    parameters that got no gradient (unlike ``get_params_to_average``, which cannot apply
    to a flat partition).
    """
    if cross_group is None or dist._rank_not_in_group(cross_group):
        return
    parts = [opt.master_partition(g).detach() for g in range(len(opt.layouts))]
    _average_tensors(parts, cross_group, _check_bucket_bytes(bucket_bytes))
    opt.sync_model_from_masters()


# --------------------------------------------------------------------------- averagers


class ModelAverager(ABC):
    """Base class of the averagers.

    Args:
        process_group: the group to average over; None means the default (world) group.
        bucket_bytes: upper bound on one flattened bucket, in bytes (keyword only).

    Attributes:
        process_group: the resolved group. step: number of ``average_parameters`` calls so
        far (restored by ``load_state_dict``).
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        self.process_group = process_group if process_group is not None else _world()
        self.step = 0
        self.bucket_bytes = _check_bucket_bytes(bucket_bytes)
        # (weak reference to the ZeroOptimizer, {level key: cross group}) of the last one seen.
        self._zero: tuple[weakref.ref, dict[int, Any]] | None = None

    @abstractmethod
    def average_parameters(self, params) -> None:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        """The configuration recorded in ``state_dict`` and checked by ``load_state_dict``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """``{"type": class name, "step": int, <configuration>}``: JSON-serialisable."""
        return {"type": type(self).__name__, "step": self.step, **self._config()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``step`` from ``state_dict()`` output (possibly after a JSON round trip).

        Only ``"step"`` is required (``{"step": 1200}`` loads). Every other key present must
        match this averager's configuration; a mismatch, an unknown key or a bad ``step``
        raises ``ValueError`` naming the values, and leaves the averager unchanged.
        Not a collective.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "averager state must be a mapping (from state_dict()), got "
                f"{type(state_dict).__name__}"
            )
        name = type(self).__name__
        own = self.state_dict()
        if "type" in state_dict and state_dict["type"] != name:
            raise ValueError(
                f"averager state is from a {state_dict['type']!r} but this is a {name!r}; "
                f"construct a {state_dict['type']} to resume it"
            )
        unknown = sorted(set(state_dict) - set(own))
        if unknown:
            raise ValueError(
                f"averager state has unknown keys {unknown}; a {name} state has the keys "
                f"{sorted(own)}"
            )
        if "step" not in state_dict:
            raise ValueError(f"averager state has no 'step'; a {name} state needs one")
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"averager state has step={step!r}; it must be an int >= 0")
        for key, value in state_dict.items():
            if key == "step":
                continue
            if _normalise(value) != own[key]:
                raise ValueError(
                    f"averager state has {key}={_normalise(value)!r} but this {name} has "
                    f"{key}={own[key]!r}; construct the averager with the checkpoint's "
                    f"configuration to resume it"
                )
        self.step = step

    # ZeRO plumbing shared by the subclasses.

    def _levels(self) -> dict[int, dist.ProcessGroup]:
        """Averaging groups by level key (a period); created groups per ZeroOptimizer."""
        raise NotImplementedError

    def _zero_cross_groups(self, opt: Any) -> dict[int, Any]:
        """Cross groups for ``opt``, created on the first call with it (collective, world)."""
        if self._zero is not None and self._zero[0]() is opt:
            return self._zero[1]
        groups = {key: zero_cross_group(opt, group) for key, group in self._levels().items()}
        self._zero = (weakref.ref(opt), groups)
        return groups

    def _average(self, params, group: dist.ProcessGroup, key: int, zero_groups) -> None:
        if zero_groups is not None:
            average_zero_optimizer(params, zero_groups[key], bucket_bytes=self.bucket_bytes)
        else:
            average_parameters_or_parameter_groups(params, group, bucket_bytes=self.bucket_bytes)


class PeriodicModelAverager(ModelAverager):
    """Average parameters every ``period`` steps after ``warmup_steps`` (post-local SGD).

    Same arguments, checks and warning as PyTorch's ``PeriodicModelAverager``.

    Args:
        period: steps per averaging; 1 warns (DDP alone is cheaper).
        warmup_steps: steps without averaging first.
        process_group: the group to average over; None means the world.
        bucket_bytes: keyword only; see ``average_parameters``.

    Example::

        averager = PeriodicModelAverager(period=4, warmup_steps=100)
        for batch in data:
            ...; optimizer.step()
            averager.average_parameters(model.parameters())   # or the ZeroOptimizer
    """

    def __init__(
        self,
        period: int,
        warmup_steps: int = 0,
        process_group: dist.ProcessGroup | None = None,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        super().__init__(process_group, bucket_bytes=bucket_bytes)
        warmup_steps, period = _as_int("warmup_steps", warmup_steps), _as_int("period", period)
        if warmup_steps < 0:
            raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")
        self.warmup_steps = warmup_steps
        if period < 1:
            raise ValueError("Arg ``period`` must be a positive value.")
        if period == 1:
            warnings.warn("When period is 1, " + _PERIOD_ONE_WARNING, stacklevel=2)
        self.period = period

    def average_parameters(self, params) -> None:
        """Average if ``step >= warmup_steps`` and ``(step - warmup_steps) % period == 0``.

        Then ``step += 1``, averaged or not.

        ``params``: ``model.parameters()``, an optimizer's ``param_groups``, or a
        ``ZeroOptimizer`` (its fp32 masters are averaged across ZeRO groups, then the model
        is refreshed from them; see the module docstring).

        Collective: call on all ranks of ``process_group`` at every step. The first call
        with a ``ZeroOptimizer`` also creates process groups: every rank of the job makes it.
        """
        zero_groups = self._zero_cross_groups(params) if _is_zero_optimizer(params) else None
        if self.step >= self.warmup_steps and (self.step - self.warmup_steps) % self.period == 0:
            self._average(params, self.process_group, self.period, zero_groups)
        self.step += 1

    def _levels(self) -> dict[int, dist.ProcessGroup]:
        return {self.period: self.process_group}

    def _config(self) -> dict[str, Any]:
        return {"period": self.period, "warmup_steps": self.warmup_steps}


class HierarchicalModelAverager(ModelAverager):
    """Hierarchical SGD: groups of growing size average with growing periods.

    Same arguments, checks, warning and step rule as PyTorch's
    ``HierarchicalModelAverager``: at a step ``>= warmup_steps``, the largest period that
    divides ``step`` (not ``step - warmup_steps``) picks the group that averages.

    Args:
        period_group_size_dict: ``{period: group_size}`` in increasing period order (any
            insertion-ordered mapping). Group ``i`` is one of the contiguous blocks of
            ``process_group``'s ranks made by ``dist.new_subgroups(group_size)``; the last
            size must be the size of ``process_group``.
        warmup_steps: steps without averaging first.
        process_group: the overall group; None means the world.
        bucket_bytes: keyword only; see ``average_parameters``.

    Checks beyond PyTorch's (all ``ValueError`` unless noted, all raised before any group is
    created): periods and sizes are integers (``TypeError``), periods strictly increase,
    every size is positive, at most and a divisor of the overall size (PyTorch leaves this
    to ``new_subgroups``, with the same exception type), and each size divides the next,
    so that every group is nested in the next level's group. Equal consecutive sizes reuse
    one set of subgroups.

    Collective: construct on every rank of the job, in the same order relative to other
    process-group creations (``dist.new_subgroups`` rule).
    """

    def __init__(
        self,
        period_group_size_dict: Mapping[int, int] | None = None,
        warmup_steps: int = 0,
        process_group: dist.ProcessGroup | None = None,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        super().__init__(process_group, bucket_bytes=bucket_bytes)
        if not period_group_size_dict:
            raise ValueError("Arg ``period_group_size_dict`` must not be empty.")
        items = [
            (_as_int("period", p), _as_int("group size", s))
            for p, s in period_group_size_dict.items()
        ]
        periods = [p for p, _ in items]
        sizes = [s for _, s in items]
        if periods[0] <= 0:
            raise ValueError(
                "The minimum period in arg ``period_group_size_dict`` must be a positive value."
            )
        if any(a >= b for a, b in zip(periods, periods[1:])):
            raise ValueError(
                f"The periods in arg ``period_group_size_dict`` must strictly increase, "
                f"got {periods}."
            )
        if periods[-1] == 1:
            warnings.warn(
                "When the maximum period in arg ``period_group_size_dict`` is 1, "
                + _PERIOD_ONE_WARNING,
                stacklevel=2,
            )
        overall = dist.get_world_size(group=self.process_group)
        if sizes[-1] != overall:
            raise ValueError(
                f"The last value in arg ``period_group_size_dict`` {sizes[-1]} "
                f"must be equal to the size of arg ``process_group`` {overall}."
            )
        for size in sizes:
            # new_subgroups' checks and wording, made before any group is created.
            if size <= 0:
                raise ValueError(f"The arg 'group_size' ({size}) must be positive")
            if size > overall:
                raise ValueError(
                    f"The arg 'group_size' ({size}) must not exceed the world size ({overall})"
                )
            if overall % size != 0:
                raise ValueError(
                    f"The world size ({overall}) must be divisible by 'group_size={size}'"
                )
        for a, b in zip(sizes, sizes[1:]):
            if b % a != 0:
                raise ValueError(
                    f"Each group size in arg ``period_group_size_dict`` must divide the next "
                    f"one so that groups nest, got sizes {sizes}."
                )
        warmup_steps = _as_int("warmup_steps", warmup_steps)
        if warmup_steps < 0:
            raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")
        self.warmup_steps = warmup_steps
        self.period_group_size_dict: OrderedDict[int, int] = OrderedDict(items)
        self._periods = periods

        self.period_process_group_dict: OrderedDict[int, dist.ProcessGroup] = OrderedDict()
        by_size: dict[int, dist.ProcessGroup] = {overall: self.process_group}
        logger.info("Model averaging hierarchy:")
        for period, size in items:
            logger.info(
                "\tEach group that has %s processes average parameters every %s iterations, "
                "if no higher-level averaging.",
                size,
                period,
            )
            if size not in by_size:  # collective over the world
                by_size[size], _ = dist.new_subgroups(group_size=size, group=self.process_group)
            self.period_process_group_dict[period] = by_size[size]

    def _find_process_group(self) -> tuple[int, dist.ProcessGroup] | None:
        """(period, group) of the largest period dividing ``step``, or None."""
        for period in reversed(self._periods):
            if self.step % period == 0:
                return period, self.period_process_group_dict[period]
        return None

    def average_parameters(self, params) -> None:
        """Average over the due group if ``step >= warmup_steps``; then step += 1.

        ``params``: as for ``PeriodicModelAverager.average_parameters``.

        Collective: call on all ranks of ``process_group`` at every step (each step's
        averaging is a collective over one level's subgroup). The first call with a
        ``ZeroOptimizer`` also creates process groups (one set per level): every rank of the
        job makes it.
        """
        zero_groups = self._zero_cross_groups(params) if _is_zero_optimizer(params) else None
        if self.step >= self.warmup_steps:
            found = self._find_process_group()
            if found is not None:
                self._average(params, found[1], found[0], zero_groups)
        self.step += 1

    def _levels(self) -> dict[int, dist.ProcessGroup]:
        return dict(self.period_process_group_dict)

    def _config(self) -> dict[str, Any]:
        return {
            "period_group_size_dict": [[p, s] for p, s in self.period_group_size_dict.items()],
            "warmup_steps": self.warmup_steps,
        }


# --------------------------------------------------------------------------- internals


def _world() -> dist.ProcessGroup:
    world = dist.group.WORLD
    if world is None:
        raise RuntimeError(
            "the default process group is not initialized; call "
            "torch.distributed.init_process_group() before using an averager"
        )
    return world


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _check_bucket_bytes(bucket_bytes: Any) -> int:
    value = _as_int("bucket_bytes", bucket_bytes)
    if value < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {value}")
    return value


def _normalise(value: Any) -> Any:
    """Tuples (and dicts, for period_group_size_dict) to the lists state_dict() produces."""
    if isinstance(value, Mapping):
        return [[_normalise(k), _normalise(v)] for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _is_zero_optimizer(obj: Any) -> bool:
    # Duck typing, so that zero_core.averagers does not import the optimizer module.
    return hasattr(obj, "master_partition") and hasattr(obj, "sync_model_from_masters")


def _synchronize_accelerator() -> None:
    # PyTorch does this before its all-reduce so it cannot race work queued on the device.
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        if accelerator.is_available():
            accelerator.synchronize()
    elif torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def _average_tensors(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup, bucket_bytes: int
) -> None:
    """Average ``tensors`` in place over ``group``, at most ``bucket_bytes`` per all-reduce.

    Tensors are taken in order, grouped by ``(device, dtype)`` (first appearance order, the
    same on every rank), and laid end to end in a virtual flat stream that is cut into
    buckets of ``max(1, bucket_bytes // element_size)`` elements. A bucket that is one slice
    of one contiguous tensor is reduced in place; otherwise its pieces are gathered into one
    reusable buffer of at most a bucket, reduced, and scattered back.
    """
    kinds: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            kinds.setdefault((t.device, t.dtype), []).append(t)
    if not kinds:
        return
    size = dist.get_world_size(group)
    _synchronize_accelerator()
    for (device, dtype), ts in kinds.items():
        cap = max(1, bucket_bytes // torch.empty((), dtype=dtype).element_size())
        bucket = _Bucket(min(cap, sum(t.numel() for t in ts)), dtype, device, size, group)
        for t in ts:
            # A non-contiguous tensor goes through a contiguous temporary (``owner`` set),
            # copied back once its last piece is reduced.
            contiguous = t.is_contiguous()
            work = t.view(-1) if contiguous else t.contiguous().view(-1)
            owner = None if contiguous else t
            start, numel = 0, work.numel()
            while start < numel:
                length = min(numel - start, bucket.capacity - bucket.filled)
                bucket.add(work, start, length, owner)
                start += length
                if bucket.filled == bucket.capacity:
                    bucket.reduce()
        bucket.reduce()


class _Bucket:
    """Pieces ``(work, start, length, owner)`` waiting to be averaged together."""

    def __init__(self, capacity: int, dtype, device, size: int, group) -> None:
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.size, self.group = size, group
        self.pieces: list[tuple[torch.Tensor, int, int, torch.Tensor | None]] = []
        self.filled = 0
        self._buf: torch.Tensor | None = None  # allocated when a bucket first needs a copy

    def add(self, work: torch.Tensor, start: int, length: int, owner) -> None:
        self.pieces.append((work, start, length, owner))
        self.filled += length

    def reduce(self) -> None:
        if not self.pieces:
            return
        if len(self.pieces) == 1 and self.pieces[0][3] is None:
            work, start, length, _ = self.pieces[0]
            view = work[start : start + length]  # the parameter's own memory: no copy
            view.div_(self.size)
            dist.all_reduce(view, group=self.group)
        else:
            if self._buf is None:
                self._buf = torch.empty(self.capacity, dtype=self.dtype, device=self.device)
            flat = self._buf[: self.filled]
            offset = 0
            for work, start, length, _ in self.pieces:
                flat[offset : offset + length].copy_(work[start : start + length])
                offset += length
            flat.div_(self.size)  # divide first, then SUM: PyTorch's order, so same bits
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for work, start, length, _ in self.pieces:
                work[start : start + length].copy_(flat[offset : offset + length])
                offset += length
        for work, start, length, owner in self.pieces:
            if owner is not None and start + length == work.numel():
                owner.copy_(work.view(owner.shape))
        self.pieces, self.filled = [], 0


def _plan_cross_groups(infos: Sequence[Any]) -> list[list[int]]:
    """Pure: the cross groups (global ranks) from every rank's gathered membership.

    ``infos[r] = (zero_ranks, averaging_ranks or None, partition numels, zero position)``.
    Every rank computes the same plan from the same data, so errors are raised everywhere.
    """
    plan: list[list[int]] = []
    seen_avg: set[tuple[int, ...]] = set()
    for r, (_, avg, _, _) in enumerate(infos):
        if avg is None or tuple(avg) in seen_avg:
            continue
        avg_t = tuple(avg)
        seen_avg.add(avg_t)
        members = set(avg)
        zero_groups: list[tuple[int, ...]] = []
        for s in avg:
            if not (0 <= s < len(infos)) or infos[s][1] is None or tuple(infos[s][1]) != avg_t:
                raise ValueError(
                    f"ranks disagree on the averaging group: rank {r} passed {list(avg)} but "
                    f"rank {s} passed {None if not 0 <= s < len(infos) else infos[s][1]}; give "
                    f"every rank the averaging group it belongs to (disjoint groups)"
                )
            zero, _, _, position = infos[s]
            zero_t = tuple(zero)
            if s not in zero_t or zero_t.index(s) != position:
                raise ValueError(
                    f"rank {s} has optimizer rank {position} but sits at position "
                    f"{zero_t.index(s) if s in zero_t else None} of its ZeRO group {list(zero)}"
                )
            if not set(zero_t) <= members:
                raise ValueError(
                    f"the averaging group {list(avg)} cuts through the ZeRO group {list(zero)} "
                    f"of rank {s}; an averaging group must contain whole ZeRO groups"
                )
            for peer in zero_t:
                if tuple(infos[peer][0]) != zero_t:
                    raise ValueError(
                        f"ranks disagree on their ZeRO group: rank {s} has {list(zero)}, "
                        f"rank {peer} has {list(infos[peer][0])}"
                    )
            if zero_t not in zero_groups:
                zero_groups.append(zero_t)
        sizes = sorted({len(z) for z in zero_groups})
        if len(sizes) > 1:
            raise ValueError(
                f"the ZeRO groups inside the averaging group {list(avg)} differ in size "
                f"({[list(z) for z in zero_groups]}); every ZeRO group must have the same size"
            )
        for position in range(sizes[0]):
            cross = [z[position] for z in zero_groups]
            numels = {tuple(infos[x][2]) for x in cross}
            if len(numels) > 1:
                raise ValueError(
                    f"ranks {cross} would average partitions of different sizes "
                    f"({sorted(numels)}); every ZeRO group must hold the same model"
                )
            plan.append(sorted(cross))
    return plan
