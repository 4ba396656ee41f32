"""Gradient reduction into fp32 partition gradients, and the thin collective layer.

Gradients leave ``param.grad`` as soon as autograd has accumulated them (the optimizer's
post-accumulate hooks call :meth:`GradReducer.add_param_grad`, which copies the gradient,
pre-divided and in the communication dtype, into a reduction buffer and drops ``param.grad``):

* **stage 1** copies into one flat gradient buffer per group (``world_size * partition_numel``
  elements: the only full-size gradient the optimizer keeps) and, at the end of each backward
  outside ``no_sync``, reduce-scatters it with one ``reduce_scatter_tensor`` per group (the
  layout's equal partitions are exactly what it wants), half the bytes of an all-reduce;
* **stage 2** copies into *buckets*: contiguous flat ranges of at most ``bucket_numel``
  elements (a large param is split over several), backed by a small fixed pool of buffers
  (``max_in_flight + 1``). A bucket is reduced as soon as its last gradient arrives, async,
  from inside backward, so communication overlaps the rest of backward; its buffer goes back to
  the pool when the reduction completes. A bucket is a contiguous range, so its pieces belong
  to one or two owners of unequal size: each piece is ``reduce``-d to its owner (DeepSpeed's
  scheme; a ``reduce_scatter_tensor`` needs equal pieces for every rank, which a range that
  small cannot give without sending ``world_size`` times the bytes, and a bucket cut as equal
  slices of every partition would only complete when rank 0's gradients arrive, at the very
  end of backward, holding the whole model's gradient in buffers meanwhile). When one bucket
  covers the whole group the pieces are equal and ``reduce_scatter_tensor`` is used.

On CUDA the reductions run on a dedicated stream: the stream waits for the buffer's fill
(``wait_stream``), the pieces are added into the partition gradient on that stream, and a
buffer is reused only after an event recorded there; the compute stream waits for the
communication stream before the optimizer reads the gradients. Nothing synchronises the host.
On gloo the async work handles are used the same way (``wait`` blocks only when a buffer or the
result is needed).

The owner adds ``piece * postscale`` (``predivide / world_size``) in fp32 into its partition
gradient, so the result is the average over ranks, like DDP; several backward passes before a
step accumulate (sum) as in torch. Every rank must produce gradients for the same params in the
same order (DDP's rule without ``find_unused_parameters``): the collectives are issued in the
order the buckets complete. Private to ``zero_core``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from zero_core._flat_buffers import MASTER_DTYPE, FlatGroup
from zero_core.layout import GroupLayout, overlap

__all__: list[str] = []


# ----- collectives ------------------------------------------------------------------------


class _DoneWork:
    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
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

    def send(self, t: torch.Tensor, dst: int) -> Any:
        """Async point-to-point send to group rank ``dst`` (a work handle)."""
        return dist.isend(t, dst=self.global_rank(dst), group=self.group)

    def recv(self, t: torch.Tensor, src: int) -> Any:
        """Async point-to-point receive from group rank ``src`` into ``t``."""
        return dist.irecv(t, src=self.global_rank(src), group=self.group)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False) -> Any:
        """``out`` (n elements) <- sum over ranks of ``inp[rank * n : (rank + 1) * n]``."""
        if self.trivial:
            out.copy_(inp)
            return _DoneWork()
        work = dist.reduce_scatter_tensor(out, inp, group=self.group, async_op=async_op)
        return work if async_op else _DoneWork()

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        if not self.trivial:
            dist.broadcast(t, src=self.global_rank(src), group=self.group)

    def all_gather_into(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """``out`` (world_size * n elements) <- every rank's ``inp`` (n elements), rank order.

        ``inp`` may be this rank's own slice of ``out`` (in place, no copy)."""
        if self.trivial:
            if inp.data_ptr() != out.data_ptr():
                out.copy_(inp)
            return
        n = inp.numel()
        if out.device.type == "cpu" and inp.data_ptr() == out[self.rank * n :].data_ptr():
            # gloo's all-gather stages the whole output in a temporary of its own (a second
            # model-sized buffer at every step); a broadcast per rank works in place
            works = [
                dist.broadcast(
                    out[r * n : (r + 1) * n], src=self.global_rank(r), group=self.group,
                    async_op=True,
                )
                for r in range(self.world_size)
            ]
            for work in works:
                work.wait()
            return
        dist.all_gather_into_tensor(out, inp, group=self.group)

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


# ----- bucket plan (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class BucketPlan:
    """Flat range ``[start, end)`` of one group, reduced as one unit.

    ``slices``: ``(param_index, param_lo, param_hi)``: the elements of each param inside the
    bucket (a param larger than a bucket is split over several). ``pieces``: ``(rank, lo, hi)``
    in flat coordinates for each rank whose partition overlaps the range.
    """

    start: int
    end: int
    slices: tuple[tuple[int, int, int], ...]
    pieces: tuple[tuple[int, int, int], ...]

    @property
    def numel(self) -> int:
        return self.end - self.start


def plan_buckets(layout: GroupLayout, bucket_numel: int) -> list[BucketPlan]:
    """Cut the group's real elements ``[0, numel)`` into buckets of at most ``bucket_numel``.

    Cuts fall on param boundaries where a param fits, so a small param is never split; a param
    larger than ``bucket_numel`` is cut into ``bucket_numel`` pieces. Pure (no torch).
    """
    cuts = [0]
    size = 0
    for spec in layout.params:
        n = spec.numel
        if n == 0:
            continue
        if size and size + n > bucket_numel:
            cuts.append(spec.offset)
            size = 0
        if n > bucket_numel:
            start = spec.offset
            while spec.end - start > bucket_numel:
                start += bucket_numel
                cuts.append(start)
            size = spec.end - start
        else:
            size += n
    if layout.numel > cuts[-1]:
        cuts.append(layout.numel)
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        slices = []
        for i, spec in enumerate(layout.params):
            hit = overlap(spec.offset, spec.end, lo, hi)
            if hit is not None:
                slices.append((i, hit[0] - spec.offset, hit[1] - spec.offset))
        out.append(BucketPlan(lo, hi, tuple(slices), tuple(layout.locate(lo, hi))))
    return out


# ----- buffers ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Buffer:
    tensor: torch.Tensor
    ready: Any = None  # CUDA event recorded when the reduction that used it finished


class BufferPool:
    """A fixed set of bucket buffers of one dtype/device, ``size`` of them.

    ``acquire`` takes a free buffer; when none is free it asks ``make_room`` to complete the
    oldest reduction in flight (which returns its buffer). If nothing is in flight (buckets
    completing out of order hold them all) the pool grows by one and ``grown`` counts it.
    """

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, size: int) -> None:
        self.numel, self.dtype, self.device, self.size = numel, dtype, device, size
        self.free: list[_Buffer] = []
        self.allocated: list[_Buffer] = []
        self.grown = 0

    def acquire(self, make_room: Callable[[], bool]) -> _Buffer:
        while not self.free:
            if len(self.allocated) < self.size:
                buf = _Buffer(torch.empty(self.numel, dtype=self.dtype, device=self.device))
                self.allocated.append(buf)
                return buf
            if not make_room():
                self.size += 1
                self.grown += 1
        buf = self.free.pop()
        if buf.ready is not None:  # CUDA: the compute stream waits for the old reduction
            torch.cuda.current_stream(self.device).wait_event(buf.ready)
            buf.ready = None
        if buf.tensor.numel() < self.numel:  # a group with larger buckets was added
            self.allocated.remove(buf)
            buf = _Buffer(torch.empty(self.numel, dtype=self.dtype, device=self.device))
            self.allocated.append(buf)
        return buf

    def release(self, buf: _Buffer) -> None:
        self.free.append(buf)

    def nbytes(self) -> int:
        return sum(b.tensor.numel() * b.tensor.element_size() for b in self.allocated)


@dataclass(eq=False)
class _OpenBucket:
    group: int
    index: int
    buffer: _Buffer
    arrived: set[int] = field(default_factory=set)


@dataclass(eq=False)
class _InFlight:
    """One reduction in flight and how its result reaches the partition gradient.

    ``kind``: ``"pieces"`` (this rank's piece of ``buffer`` after per-owner reduces),
    ``"scatter"`` (``out`` holds this rank's piece: reduce-scatter), ``"recv"`` (this rank's
    piece of ``buffer`` plus each peer's piece received into ``received``: gloo point-to-point),
    ``"allreduce"`` (this rank's partition of ``flat``: stage 1 on gloo).
    """

    group: int
    kind: str
    plan: BucketPlan | None
    buffer: _Buffer | None
    works: list[Any]
    out: torch.Tensor | None = None
    flat: torch.Tensor | None = None
    received: list[_Buffer] = field(default_factory=list)


class GradReducer:
    """Turns model-param gradients into averaged fp32 partition gradients (one per group).

    ``comm_dtype``: the dtype gradients travel in (None: each group's model dtype).
    ``predivide``: gradients are divided by it before the reduction and by
    ``world_size / predivide`` after (DeepSpeed's ``gradient_predivide_factor``).
    """

    def __init__(
        self,
        comm: Comm,
        *,
        stage: int,
        bucket_numel: int,
        comm_dtype: torch.dtype | None,
        predivide: float = 1.0,
        max_in_flight: int = 2,
    ) -> None:
        self.comm = comm
        self.stage = stage
        self.bucket_numel = bucket_numel
        self.comm_dtype = comm_dtype
        self.predivide = float(predivide)
        #: 1 / loss scale of the backward passes being reduced (set by the optimizer)
        self.unscale = 1.0
        self.max_in_flight = max(1, max_in_flight)
        self.groups: list[FlatGroup] = []
        self.plans: list[list[BucketPlan]] = []
        self.buckets_of_param: list[list[list[int]]] = []
        self.part_grads: list[torch.Tensor | None] = []
        self._part_stale: list[bool] = []
        self.has_grad: list[bool] = []
        #: per group, per trainable param: did a gradient arrive since the last step/zero_grad
        self.got_grad: list[list[bool]] = []
        self._flat_grads: list[torch.Tensor | None] = []  # stage 1
        self._window: list[list[bool]] = []  # stage 1: arrived since the last reduce-scatter
        self._scratch: dict[int, torch.Tensor] = {}  # per group: reduce-scatter output
        self._pools: dict[tuple[torch.dtype, torch.device], BufferPool] = {}
        self._open: dict[tuple[int, int], _OpenBucket] = {}
        self._in_flight: list[_InFlight] = []
        self._streams: dict[torch.device, Any] = {}
        #: called as ``fn(group, bucket_index, pending)`` at each stage-2 launch, ``pending``
        #: being how many earlier reductions are not complete yet (tests, diagnostics).
        self.launch_observers: list[Callable[[int, int, int], None]] = []

    def add_group(self, fg: FlatGroup) -> None:
        plans = plan_buckets(fg.layout, self.bucket_numel)
        of_param: list[list[int]] = [[] for _ in fg.layout.params]
        for b, plan in enumerate(plans):
            for i, _, _ in plan.slices:
                of_param[i].append(b)
        self.groups.append(fg)
        self.plans.append(plans)
        self.buckets_of_param.append(of_param)
        self.part_grads.append(None)
        self._part_stale.append(False)
        self.has_grad.append(False)
        self.got_grad.append([False] * len(fg.layout.params))
        self._flat_grads.append(None)
        self._window.append([False] * len(fg.layout.params))
        for pool in self._pools.values():
            pool.numel = max(pool.numel, max((p.numel for p in plans), default=0))

    # ----- helpers ------------------------------------------------------------------------

    def dtype_of(self, g: int) -> torch.dtype:
        return self.comm_dtype or self.groups[g].model_dtype

    @property
    def postscale(self) -> float:
        """What a reduced piece is multiplied by as it enters the partition gradient: the
        average over ranks, undoing the pre-division and the loss scale (so the partition
        gradient always holds unscaled values, however often it is read)."""
        return self.predivide / self.comm.world_size * self.unscale

    def _stream(self, device: torch.device) -> Any:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    @contextlib.contextmanager
    def _on_comm_stream(self, device: torch.device):
        stream = self._stream(device)
        if stream is None:
            yield None
            return
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            yield stream

    def _pool(self, g: int) -> BufferPool:
        key = (self.dtype_of(g), self.groups[g].device)
        if key not in self._pools:
            largest = max((p.numel for plans in self.plans for p in plans), default=0)
            self._pools[key] = BufferPool(
                min(self.bucket_numel, largest), key[0], key[1], self.max_in_flight + 1
            )
        return self._pools[key]

    def _copy_in(self, dst: torch.Tensor, src: torch.Tensor, accumulate: bool) -> None:
        if accumulate:
            if self.predivide != 1.0:
                dst.add_(src, alpha=1.0 / self.predivide)
            else:
                dst.add_(src)
        else:
            dst.copy_(src)
            if self.predivide != 1.0:
                dst.mul_(1.0 / self.predivide)

    def start_grad(self, g: int, i: int) -> torch.Tensor:
        """Group ``g``'s partition gradient (zeroed first if the last step consumed it), for
        a gradient of param ``i`` set by hand: what was collected for ``i`` but not reduced
        yet is dropped, so the value set replaces it."""
        self.wait_all()
        if self._window[g][i]:  # stage 1: its region is zeroed at the next reduction
            self._window[g][i] = False
        return self._ensure_part_grad(g)

    def start_grad_group(self, g: int) -> torch.Tensor:
        """Group ``g``'s partition gradient, zeroed first if the last step consumed it."""
        return self._ensure_part_grad(g)

    def _ensure_part_grad(self, g: int) -> torch.Tensor:
        part = self.part_grads[g]
        if part is None:
            fg = self.groups[g]
            part = torch.zeros(fg.layout.partition_numel, dtype=MASTER_DTYPE, device=fg.device)
            self.part_grads[g] = part
        elif self._part_stale[g]:  # consumed by a step or zero_grad: zero it in place
            part.zero_()
        self._part_stale[g] = False
        self.has_grad[g] = True
        return part

    # ----- filling ------------------------------------------------------------------------

    def add_param_grad(self, g: int, i: int, grad: torch.Tensor) -> None:
        """Take param ``i``'s gradient (the caller drops ``param.grad``).

        Stage 1 adds it into the group's flat gradient buffer (reduced by :meth:`end_backward`);
        stage 2 copies it into its buckets and launches each bucket whose last gradient this was.
        """
        if grad.is_sparse:
            raise ValueError("ZeroOptimizer does not support sparse gradients")
        flat = grad.reshape(-1)
        self.got_grad[g][i] = True
        if self.stage == 1:
            buf = self._flat_grad(g)
            spec = self.groups[g].layout.params[i]
            self._copy_in(buf[spec.offset : spec.end], flat, accumulate=self._window[g][i])
            self._window[g][i] = True
            return
        for b in self.buckets_of_param[g][i]:
            plan = self.plans[g][b]
            bucket = self._open.get((g, b))
            if bucket is None:
                pool = self._pool(g)
                bucket = _OpenBucket(g, b, pool.acquire(self._complete_oldest))
                self._open[(g, b)] = bucket
            for j, lo, hi in plan.slices:
                if j != i:
                    continue
                at = self.groups[g].layout.params[i].offset + lo - plan.start
                dst = bucket.buffer.tensor[at : at + hi - lo]
                self._copy_in(dst, flat[lo:hi], accumulate=i in bucket.arrived)
            bucket.arrived.add(i)
            if len(bucket.arrived) == len(plan.slices):
                self._launch_bucket(bucket)

    def _flat_grad(self, g: int) -> torch.Tensor:
        buf = self._flat_grads[g]
        if buf is None:
            fg = self.groups[g]
            # zeros: the padding tail is never written and must stay zero
            buf = torch.zeros(fg.layout.padded_numel, dtype=self.dtype_of(g), device=fg.device)
            self._flat_grads[g] = buf
        return buf

    def _launch_bucket(self, bucket: _OpenBucket) -> None:
        g, b = bucket.group, bucket.index
        del self._open[(g, b)]
        plan = self.plans[g][b]
        fg = self.groups[g]
        data = bucket.buffer.tensor[: plan.numel]
        for j, lo, hi in plan.slices:  # params whose gradient never came count as zero
            if j not in bucket.arrived:
                at = fg.layout.params[j].offset + lo - plan.start
                data[at : at + hi - lo].zero_()
        self._ensure_part_grad(g)
        pending = sum(not all(w.is_completed() for w in item.works) for item in self._in_flight)
        rank, comm = self.comm.rank, self.comm
        with self._on_comm_stream(fg.device):
            if comm.trivial:
                item = _InFlight(g, "pieces", plan, bucket.buffer, [])
            elif fg.device.type == "cpu":
                # gloo: its reduce (and reduce-scatter) cost 2-3x an all-reduce of the same
                # bytes here; a send of each piece to its owner costs about a third of one
                works, received = [], []
                for r, lo, hi in plan.pieces:
                    piece = data[lo - plan.start : hi - plan.start]
                    if r == rank:
                        for peer in range(comm.world_size):
                            if peer != rank:
                                into = self._recv_pool(g).acquire(self._complete_oldest)
                                received.append(into)
                                works.append(comm.recv(into.tensor[: hi - lo], src=peer))
                    else:
                        works.append(comm.send(piece, dst=r))
                item = _InFlight(g, "recv", plan, bucket.buffer, works, received=received)
            elif len(plan.pieces) == comm.world_size and len({hi - lo for _, lo, hi in plan.pieces}) == 1:
                # equal pieces for every rank: one reduce-scatter; this rank's piece lands at
                # its own place in the scratch, so buckets in flight never share it
                _, lo, hi = plan.pieces[rank]
                base = fg.layout.rank_range(rank)[0]
                out = self._scratch_of(g)[lo - base : hi - base]
                works = [comm.reduce_scatter(out, data, async_op=True)]
                item = _InFlight(g, "scatter", plan, bucket.buffer, works, out=out)
            else:
                works = [
                    comm.reduce(data[lo - plan.start : hi - plan.start], dst=r, async_op=True)
                    for r, lo, hi in plan.pieces
                ]
                item = _InFlight(g, "pieces", plan, bucket.buffer, works)
        self._in_flight.append(item)
        for fn in self.launch_observers:
            fn(g, b, pending)
        while len(self._in_flight) > self.max_in_flight:
            self._complete_oldest()

    def _recv_pool(self, g: int) -> BufferPool:
        key = ("recv", self.dtype_of(g), self.groups[g].device)
        if key not in self._pools:
            main = self._pool(g)
            # each bucket in flight receives from every peer (a bucket holds at most one piece
            # of this rank's partition)
            self._pools[key] = BufferPool(
                main.numel, main.dtype, main.device, self.max_in_flight * (self.comm.world_size - 1)
            )
        return self._pools[key]

    def _scratch_of(self, g: int) -> torch.Tensor:
        """The group's reduce-scatter output (``partition_numel`` elements, comm dtype)."""
        if g not in self._scratch:
            fg = self.groups[g]
            self._scratch[g] = torch.empty(
                fg.layout.partition_numel, dtype=self.dtype_of(g), device=fg.device
            )
        return self._scratch[g]

    def _launch_group(self, g: int) -> None:
        """Stage 1: reduce the group's flat gradient buffer (async): one reduce-scatter, or on
        gloo an in-place all-reduce (its reduce-scatter costs about three all-reduces)."""
        fg = self.groups[g]
        buf = self._flat_grads[g]
        if buf is None or fg.layout.partition_numel == 0:
            return
        window = self._window[g]
        for i, got in enumerate(window):  # params without a gradient in this window: zero
            if not got:
                spec = fg.layout.params[i]
                buf[spec.offset : spec.end].zero_()
        self._window[g] = [False] * len(window)
        self._ensure_part_grad(g)
        with self._on_comm_stream(fg.device):
            if fg.device.type == "cpu" or self.comm.trivial:
                works = [self.comm.all_reduce(buf, async_op=True)]
                self._in_flight.append(_InFlight(g, "allreduce", None, None, works, flat=buf))
            else:
                out = self._scratch_of(g)
                works = [self.comm.reduce_scatter(out, buf, async_op=True)]
                self._in_flight.append(_InFlight(g, "scatter", None, None, works, out=out))

    def _complete_oldest(self) -> bool:
        if not self._in_flight:
            return False
        item = self._in_flight.pop(0)
        fg = self.groups[item.group]
        part = self.part_grads[item.group]
        assert part is not None
        scale = self.postscale
        rank = self.comm.rank
        base, end = fg.layout.rank_range(rank)
        stream = self._stream(fg.device)
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for w in item.works:
                w.wait()
            plan = item.plan
            if item.kind == "allreduce":
                part.add_(item.flat[base:end], alpha=scale)  # type: ignore[index]
            elif item.kind == "scatter":
                if plan is None:
                    part.add_(item.out, alpha=scale)
                else:
                    _, lo, hi = plan.pieces[rank]
                    part[lo - base : hi - base].add_(item.out, alpha=scale)
            else:
                assert plan is not None and item.buffer is not None
                data = item.buffer.tensor
                for r, lo, hi in plan.pieces:
                    if r != rank:
                        continue
                    dst = part[lo - base : hi - base]
                    if item.kind == "recv":
                        # sum the pieces (own, then the peers in rank order) in the bucket
                        # buffer, then scale once, as a reduce does
                        own = data[lo - plan.start : hi - plan.start]
                        for received in item.received:
                            own.add_(received.tensor[: hi - lo])
                        dst.add_(own, alpha=scale)
                    else:
                        dst.add_(data[lo - plan.start : hi - plan.start], alpha=scale)
            if item.buffer is not None and stream is not None:
                item.buffer.ready = torch.cuda.Event()
                item.buffer.ready.record(stream)
        if item.buffer is not None:
            self._pool(item.group).release(item.buffer)
        for buf in item.received:
            self._recv_pool(item.group).release(buf)
        return True

    # ----- flushing -----------------------------------------------------------------------

    def end_backward(self) -> None:
        """Launch what this backward left: stage 2's partly filled buckets (missing grads count
        as zero), stage 1's flat buffers with new gradients; then complete every reduction
        (on CUDA: the compute stream waits for the communication stream; no host sync)."""
        if self.stage == 1:
            for g in range(len(self.groups)):
                if any(self._window[g]):  # gradients collected since the last reduction
                    self._launch_group(g)
        else:
            for key in sorted(self._open, reverse=True):
                self._launch_bucket(self._open[key])
        self.wait_all()

    def wait_all(self) -> None:
        while self._complete_oldest():
            pass
        for device, stream in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)

    def reduce_local_grads(self, params: list[list[torch.Tensor]]) -> None:
        """Reduce gradients still in ``param.grad`` (``no_sync`` leftovers, gradients set by
        hand) and whatever was collected but not reduced; each is consumed (set to None)."""
        for g, group_params in enumerate(params):
            for i, p in enumerate(group_params):
                if p.grad is not None:
                    grad, p.grad = p.grad, None
                    self.add_param_grad(g, i, grad)
        self.end_backward()

    def consume(self) -> None:
        """The step used the gradients: the next backward starts from zero."""
        self.wait_all()
        for key in list(self._open):
            self._pool(key[0]).release(self._open.pop(key).buffer)
        for g, part in enumerate(self.part_grads):
            self.has_grad[g] = False
            self._part_stale[g] = part is not None
            self.got_grad[g] = [False] * len(self.got_grad[g])
            self._window[g] = [False] * len(self._window[g])

    def zero_grad(self, set_to_none: bool) -> None:
        self.consume()
        if not set_to_none:
            # torch keeps zero gradients that the next step applies: every param has one
            for g, part in enumerate(self.part_grads):
                if part is not None:
                    part.zero_()
                    self._part_stale[g] = False
                    self.has_grad[g] = True
                    self.got_grad[g] = [True] * len(self.got_grad[g])

    # ----- memory accounting --------------------------------------------------------------

    def owned_bytes(self) -> dict[str, int]:
        """Bytes of the gradient tensors this reducer holds, by kind."""
        def nbytes(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        return {
            "partition_grads": sum(nbytes(t) for t in self.part_grads),
            "flat_grads": sum(nbytes(t) for t in self._flat_grads),
            "bucket_pool": sum(pool.nbytes() for pool in self._pools.values()),
            "scratch": sum(nbytes(t) for t in self._scratch.values()),
        }
