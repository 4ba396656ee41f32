"""Gradient reduction into fp32 partition gradients, and the thin collective layer.

Buckets are contiguous flat ranges of whole params (in flat order, about ``bucket_numel``
elements each; a larger param gets a bucket of its own). A bucket's gradients are copied into
one buffer in the reduce dtype, then

* stage 1: all-reduced (every rank gets the whole bucket, keeps the part in its partition);
* stage 2: for each rank whose partition the bucket touches, that piece is ``reduce``-d to the
  owner only (DeepSpeed's scheme; a reduce-scatter of uneven pieces), so a rank never holds
  more than its own partition's gradient plus a few buckets in flight.

The owner adds ``piece / world_size`` (in fp32) into its partition gradient, so the result is
the average over ranks, like DDP; several backward passes accumulate (sum) as in torch.

Every rank must reduce the same buckets in the same order: the same params must receive
gradients on every rank (as with DDP without ``find_unused_parameters``). Private to
``zero_core``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from zero_core._flat_buffers import MASTER_DTYPE, FlatGroup
from zero_core.layout import GroupLayout, overlap

__all__: list[str] = []


# ----- collectives ------------------------------------------------------------------------


class _DoneWork:
    def wait(self) -> bool:
        return True


class Comm:
    """The process group the optimizer talks over; trivial when world size is 1.

    ``rank`` is the rank *within* the group; ``global_rank(r)`` maps it for point-to-point
    roots. Without an initialised default group only world size 1 is possible.
    """

    def __init__(self, process_group: Any = None) -> None:
        if dist.is_available() and dist.is_initialized():
            self.group = process_group if process_group is not None else dist.group.WORLD
            self.world_size = dist.get_world_size(self.group)
            self.rank = dist.get_rank(self.group)
            if self.rank < 0:
                raise ValueError(
                    "this process is not a member of the given process_group; build "
                    "ZeroOptimizer only on the group's ranks"
                )
        else:
            if process_group is not None:
                raise ValueError(
                    "a process_group was given but torch.distributed is not initialised; "
                    "call torch.distributed.init_process_group first"
                )
            self.group = None
            self.world_size = 1
            self.rank = 0

    @property
    def trivial(self) -> bool:
        return self.world_size == 1

    def global_rank(self, group_rank: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def all_reduce(self, t: torch.Tensor, op: Any = None, async_op: bool = False) -> Any:
        if self.trivial:
            return _DoneWork()
        op = dist.ReduceOp.SUM if op is None else op
        work = dist.all_reduce(t, op=op, group=self.group, async_op=async_op)
        return work if async_op else _DoneWork()

    def reduce(self, t: torch.Tensor, dst: int, async_op: bool = False) -> Any:
        if self.trivial:
            return _DoneWork()
        work = dist.reduce(t, dst=self.global_rank(dst), group=self.group, async_op=async_op)
        return work if async_op else _DoneWork()

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        if not self.trivial:
            dist.broadcast(t, src=self.global_rank(src), group=self.group)

    def all_gather_into(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """``out`` (world_size * n elements) <- every rank's ``inp`` (n elements), rank order."""
        if self.trivial:
            out.copy_(inp)
            return
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, inp, group=self.group)

    def gather(self, t: torch.Tensor, dst: int) -> list[torch.Tensor] | None:
        """Every rank's ``t`` (same shape everywhere) on ``dst``; None elsewhere."""
        if self.trivial:
            return [t.clone()]
        bufs = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(t, bufs, dst=self.global_rank(dst), group=self.group)
        return bufs

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.trivial:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def any_true(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if self.trivial:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)


# ----- buckets ----------------------------------------------------------------------------


@dataclass
class Bucket:
    """Flat range ``[start, end)`` of whole params ``first .. last`` (indices in the group).

    ``pieces``: ``(rank, lo, hi)`` for each rank whose partition overlaps the range.
    """

    start: int
    end: int
    param_indices: list[int]
    pieces: list[tuple[int, int, int]]
    buffer: torch.Tensor | None = None
    arrived: set[int] = field(default_factory=set)
    # Kept across steps: allocating (and first-touching) a fresh bucket every step cost about
    # a quarter of a 50M-param step on CPU.
    storage: torch.Tensor | None = None
    in_flight: bool = False


def build_buckets(layout: GroupLayout, bucket_numel: int) -> list[Bucket]:
    """Cut the group's params, in flat order, into buckets of about ``bucket_numel`` elements."""
    buckets: list[Bucket] = []
    current: list[int] = []
    size = 0
    for i, spec in enumerate(layout.params):
        if current and size + spec.numel > bucket_numel:
            buckets.append(_make_bucket(layout, current))
            current, size = [], 0
        current.append(i)
        size += spec.numel
    if current:
        buckets.append(_make_bucket(layout, current))
    return buckets


def _make_bucket(layout: GroupLayout, indices: list[int]) -> Bucket:
    start, end = layout.params[indices[0]].offset, layout.params[indices[-1]].end
    pieces = []
    for r in range(layout.world_size):
        hit = overlap(start, end, *layout.rank_range(r))
        if hit is not None:
            pieces.append((r, hit[0], hit[1]))
    return Bucket(start, end, list(indices), pieces)


@dataclass
class _InFlight:
    group: int
    bucket: Bucket
    buffer: torch.Tensor
    works: list[Any]


class GradReducer:
    """Turns model-param gradients into averaged fp32 partition gradients (one per group)."""

    def __init__(
        self,
        comm: Comm,
        *,
        stage: int,
        bucket_numel: int,
        reduce_dtype: torch.dtype | None,
        max_in_flight: int = 2,
    ) -> None:
        self.comm = comm
        self.stage = stage
        self.bucket_numel = bucket_numel
        self.reduce_dtype = reduce_dtype
        self.max_in_flight = max(1, max_in_flight)
        self.groups: list[FlatGroup] = []
        self.buckets: list[list[Bucket]] = []
        self.bucket_of: list[list[int]] = []
        self.part_grads: list[torch.Tensor | None] = []
        self._part_stale: list[bool] = []
        self.has_grad: list[bool] = []
        self._in_flight: list[_InFlight] = []

    def add_group(self, fg: FlatGroup) -> None:
        buckets = build_buckets(fg.layout, self.bucket_numel)
        owner = [0] * len(fg.layout.params)
        for b, bucket in enumerate(buckets):
            for i in bucket.param_indices:
                owner[i] = b
        self.groups.append(fg)
        self.buckets.append(buckets)
        self.bucket_of.append(owner)
        self.part_grads.append(None)
        self._part_stale.append(False)
        self.has_grad.append(False)

    # ----- filling ------------------------------------------------------------------------

    def _dtype(self, g: int) -> torch.dtype:
        return self.reduce_dtype or self.groups[g].model_dtype

    def add_param_grad(self, g: int, i: int, grad: torch.Tensor) -> None:
        """Copy param ``i``'s gradient into its bucket; launch the bucket once complete."""
        bucket = self._fill(g, i, grad)
        if len(bucket.arrived) == len(bucket.param_indices):
            self._launch(g, bucket)

    def _fill(self, g: int, i: int, grad: torch.Tensor) -> Bucket:
        if grad.is_sparse:
            raise ValueError("ZeroOptimizer does not support sparse gradients")
        bucket = self.buckets[g][self.bucket_of[g][i]]
        spec = self.groups[g].layout.params[i]
        if bucket.buffer is None:
            bucket.buffer = self._storage(g, bucket)
        dst = bucket.buffer[spec.offset - bucket.start : spec.end - bucket.start]
        if i in bucket.arrived:
            dst.add_(grad.reshape(-1))
        else:
            dst.copy_(grad.reshape(-1))
            bucket.arrived.add(i)
        return bucket

    def _storage(self, g: int, bucket: Bucket) -> torch.Tensor:
        """The bucket's persistent buffer, once its previous reduction has completed."""
        while bucket.in_flight:
            self._complete(self._in_flight.pop(0))
        if bucket.storage is None:
            bucket.storage = torch.empty(
                bucket.end - bucket.start, dtype=self._dtype(g), device=self.groups[g].device
            )
        return bucket.storage

    def _launch(self, g: int, bucket: Bucket) -> None:
        buf = bucket.buffer
        if buf is None:  # launched with no gradient at all: reduce zeros
            buf = self._storage(g, bucket)
            buf.zero_()
        else:  # params whose gradient never came count as zero
            for i in bucket.param_indices:
                if i not in bucket.arrived:
                    spec = self.groups[g].layout.params[i]
                    buf[spec.offset - bucket.start : spec.end - bucket.start].zero_()
        bucket.buffer, bucket.arrived = None, set()
        bucket.in_flight = True
        self._ensure_part_grad(g)
        self.has_grad[g] = True
        if self.stage == 1:
            works = [self.comm.all_reduce(buf, async_op=True)]
        else:
            works = [
                self.comm.reduce(buf[lo - bucket.start : hi - bucket.start], dst=r, async_op=True)
                for r, lo, hi in bucket.pieces
            ]
        self._in_flight.append(_InFlight(g, bucket, buf, works))
        while len(self._in_flight) > self.max_in_flight:
            self._complete(self._in_flight.pop(0))

    def _complete(self, item: _InFlight) -> None:
        for w in item.works:
            w.wait()
        item.bucket.in_flight = False
        rank = self.comm.rank
        layout = self.groups[item.group].layout
        base = layout.rank_range(rank)[0]
        part = self.part_grads[item.group]
        assert part is not None
        s = item.bucket.start
        for r, lo, hi in item.bucket.pieces:
            if r == rank:
                part[lo - base : hi - base].add_(
                    item.buffer[lo - s : hi - s], alpha=1.0 / self.comm.world_size
                )

    def _ensure_part_grad(self, g: int) -> None:
        if self.part_grads[g] is None:
            fg = self.groups[g]
            self.part_grads[g] = torch.zeros(
                fg.layout.partition_numel, dtype=MASTER_DTYPE, device=fg.device
            )
        elif self._part_stale[g]:  # kept from an earlier step: zero it in place
            self.part_grads[g].zero_()
        self._part_stale[g] = False

    # ----- flushing -----------------------------------------------------------------------

    def flush(self) -> None:
        """Launch every partly filled bucket (missing grads count as zero), wait for all."""
        for g, buckets in enumerate(self.buckets):
            for bucket in buckets:
                if bucket.arrived:
                    self._launch(g, bucket)
        self.wait_all()

    def wait_all(self) -> None:
        while self._in_flight:
            self._complete(self._in_flight.pop(0))

    def reduce_local_grads(self) -> None:
        """Reduce gradients still held in ``param.grad`` (stage 1's path; stage 2's leftovers).

        A group is reduced when any of its trainable params holds a gradient; each such
        gradient is consumed (``param.grad`` set to None).
        """
        self.flush()
        for g, fg in enumerate(self.groups):
            if not any(p.grad is not None for p in fg.params):
                continue
            for bucket in self.buckets[g]:
                for i in bucket.param_indices:
                    p = fg.params[i]
                    if p.grad is not None:
                        grad, p.grad = p.grad, None
                        self._fill(g, i, grad)
                if bucket.end > bucket.start:
                    self._launch(g, bucket)
        self.wait_all()

    def zero_grad(self, set_to_none: bool) -> None:
        self.wait_all()
        for buckets in self.buckets:
            for bucket in buckets:
                bucket.buffer, bucket.arrived = None, set()
        for g, part in enumerate(self.part_grads):
            if set_to_none:
                # The partition's gradient is gone (has_grad False, master.grad None); its
                # memory is kept and zeroed when the next gradient arrives.
                self.has_grad[g] = False
                self._part_stale[g] = part is not None
            elif part is not None:
                part.zero_()
