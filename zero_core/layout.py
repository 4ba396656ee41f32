"""The flat layout of one optimizer param group and its fragment map (pure math, no I/O).

Every caller that needs "where does this parameter's state live" (the optimizer's per-param
access, resharding, consolidation, verification, loading at another world size) uses this
module; nothing else derives partition sizes or fragment boundaries.

Units: every offset, length and size here is in **elements**, never bytes.

The layout (DESIGN.md): the group's parameters, in order, are laid end to end in one flat
buffer of ``numel`` elements with no gaps. The buffer is cut into ``world_size`` equal
partitions of ``partition_numel`` elements (a multiple of ``align``); rank ``r`` owns
``[r * partition_numel, (r + 1) * partition_numel)``. Elements past ``numel`` are padding and
are never stored on disk: a rank's *real* range stops at ``numel``.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "ParamSpec",
    "Fragment",
    "GroupLayout",
    "compute_partition_numel",
    "overlap",
    "MAX_WORLD_SIZE",
    "check_world_size",
]

# The largest data-parallel size a layout (and format v1) is cut for: 2**16 = 65,536.
# Derivation: a shard is named ``rank-RRRRR-of-WWWWW`` with five decimal digits (at most
# 99,999 ranks), and a plan holds one file (header + ops) per rank, so the bound must keep
# planning linear work small; 2**16 is the largest power of two the names hold. Every entry
# point (planning, the CLI's --to/--from, reshard/convert/load) checks a world size against
# it before allocating anything per rank.
MAX_WORLD_SIZE = 1 << 16


def check_world_size(world_size: object, what: str = "world_size") -> int:
    """``world_size`` as an int in ``[1, MAX_WORLD_SIZE]``; ValueError naming it otherwise."""
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise ValueError(f"{what} must be an integer, got {world_size!r}")
    if world_size < 1:
        raise ValueError(f"{what} must be >= 1, got {world_size}")
    if world_size > MAX_WORLD_SIZE:
        raise ValueError(
            f"{what} is {world_size}, above the most ranks a layout is cut for ({MAX_WORLD_SIZE}); "
            f"use a world size between 1 and {MAX_WORLD_SIZE}"
        )
    return world_size


def compute_partition_numel(numel: int, world_size: int, align: int) -> int:
    """Elements per rank: ``ceil(numel / (world_size * align)) * align``.

    An empty group (``numel == 0``) has ``partition_numel == 0``.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    check_world_size(world_size)
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    return -(-numel // (world_size * align)) * align  # integer ceil: exact for any size


def overlap(a_start: int, a_end: int, b_start: int, b_end: int) -> tuple[int, int] | None:
    """The intersection ``[start, end)`` of two half-open ranges, or None if it is empty."""
    start, end = max(a_start, b_start), min(a_end, b_end)
    return (start, end) if start < end else None


@dataclass(frozen=True)
class ParamSpec:
    """One parameter's place in the flat buffer.

    ``dtype`` is the model's dtype name as torch spells it without the prefix
    (``"float32"``, ``"bfloat16"``); the flat master copy is always in the group's master dtype.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Fragment:
    """The part of parameter ``param_index`` that rank ``rank`` holds.

    ``param_start``: first element inside the parameter (flattened);
    ``partition_start``: where it sits inside the rank's partition;
    ``numel``: its length. ``flat_start`` is the same place in the whole flat buffer.
    """

    param_index: int
    rank: int
    param_start: int
    partition_start: int
    numel: int
    flat_start: int


@dataclass(frozen=True)
class GroupLayout:
    """A param group's flat layout at one world size. Build it with :meth:`build`."""

    params: tuple[ParamSpec, ...]
    numel: int
    align: int
    world_size: int
    partition_numel: int

    @classmethod
    def build(
        cls,
        params: Iterable[tuple[str, Sequence[int], str]],
        *,
        world_size: int,
        align: int = 1,
    ) -> "GroupLayout":
        """Lay ``(name, shape, dtype)`` triples end to end, in the given order."""
        specs: list[ParamSpec] = []
        offset = 0
        for name, shape, dtype in params:
            spec = ParamSpec(str(name), tuple(int(d) for d in shape), str(dtype), offset)
            specs.append(spec)
            offset = spec.end
        return cls.from_specs(specs, world_size=world_size, align=align)

    @classmethod
    def from_specs(
        cls, specs: Sequence[ParamSpec], *, world_size: int, align: int = 1
    ) -> "GroupLayout":
        """Wrap already-placed specs; raises ValueError unless they are contiguous from 0."""
        expected = 0
        for i, spec in enumerate(specs):
            if spec.offset != expected:
                raise ValueError(
                    f"param {i} ({spec.name!r}) starts at element {spec.offset}, expected "
                    f"{expected}: params must be laid end to end from 0"
                )
            if any(d < 0 for d in spec.shape):
                raise ValueError(f"param {i} ({spec.name!r}) has a negative dimension {spec.shape}")
            expected = spec.end
        partition_numel = compute_partition_numel(expected, world_size, align)
        return cls(tuple(specs), expected, align, world_size, partition_numel)

    def with_world_size(self, world_size: int) -> "GroupLayout":
        """The same params and alignment cut for another world size."""
        return GroupLayout.from_specs(self.params, world_size=world_size, align=self.align)

    # ----- ranges -------------------------------------------------------------------------

    @property
    def padded_numel(self) -> int:
        """Length of the flat buffer including padding: ``world_size * partition_numel``."""
        return self.world_size * self.partition_numel

    @property
    def padding(self) -> int:
        """Padding elements at the tail of the flat buffer."""
        return self.padded_numel - self.numel

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")

    def rank_range(self, rank: int) -> tuple[int, int]:
        """Rank's partition in the padded flat buffer: ``[r * pn, (r + 1) * pn)``."""
        self._check_rank(rank)
        return rank * self.partition_numel, (rank + 1) * self.partition_numel

    def real_range(self, rank: int) -> tuple[int, int]:
        """Rank's real (unpadded) elements in the flat buffer; possibly empty."""
        start, end = self.rank_range(rank)
        start = min(start, self.numel)
        return start, min(end, self.numel)

    def real_numel(self, rank: int) -> int:
        """How many real elements rank stores on disk (0 for an all-padding rank)."""
        start, end = self.real_range(rank)
        return end - start

    def rank_of_element(self, flat_index: int) -> int:
        """Which rank owns flat element ``flat_index`` (0 <= flat_index < numel)."""
        if not 0 <= flat_index < self.numel:
            raise ValueError(f"element {flat_index} is outside the group's {self.numel} elements")
        return flat_index // self.partition_numel

    def locate(self, flat_start: int, flat_end: int) -> list[tuple[int, int, int]]:
        """Where the flat elements ``[flat_start, flat_end)`` are stored.

        Returns ``(rank, start, end)`` pieces in flat coordinates, in order, that tile the
        range; the element at flat index ``i`` sits at ``i - rank * partition_numel`` in that
        rank's partition. The range must lie inside ``[0, numel]``.
        """
        if not 0 <= flat_start <= flat_end <= self.numel:
            raise ValueError(
                f"range [{flat_start}, {flat_end}) is outside the group's {self.numel} elements"
            )
        if flat_start == flat_end:
            return []
        pn = self.partition_numel
        out = []
        for rank in range(flat_start // pn, (flat_end - 1) // pn + 1):
            lo, hi = overlap(flat_start, flat_end, rank * pn, (rank + 1) * pn)  # type: ignore[misc]
            out.append((rank, lo, hi))
        return out

    # ----- fragments ----------------------------------------------------------------------

    @functools.cached_property
    def _offsets(self) -> list[int]:
        return [p.offset for p in self.params]

    def fragments_of_rank(self, rank: int) -> list[Fragment]:
        """Fragments rank holds, in flat order (params of size 0 hold no fragment)."""
        start, end = self.real_range(rank)
        if start == end:
            return []
        partition_base = rank * self.partition_numel
        # The last param starting at or before `start` may reach into this rank.
        first = max(bisect.bisect_right(self._offsets, start) - 1, 0)
        out: list[Fragment] = []
        for i in range(first, len(self.params)):
            p = self.params[i]
            if p.offset >= end:
                break
            hit = overlap(p.offset, p.end, start, end)
            if hit is None:
                continue
            out.append(
                Fragment(i, rank, hit[0] - p.offset, hit[0] - partition_base, hit[1] - hit[0], hit[0])
            )
        return out

    def fragments_of_param(self, param_index: int) -> list[Fragment]:
        """Fragments of one param in rank order; together they cover it exactly once."""
        p = self.params[param_index]
        pn = self.partition_numel
        return [
            Fragment(param_index, rank, lo - p.offset, lo - rank * pn, hi - lo, lo)
            for rank, lo, hi in self.locate(p.offset, p.end)
        ]

    def index_of(self, name: str) -> int:
        """Position of the param called ``name``; KeyError if the group has none."""
        for i, p in enumerate(self.params):
            if p.name == name:
                return i
        raise KeyError(name)
