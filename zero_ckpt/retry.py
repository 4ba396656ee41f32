"""Bounded retries with exponential backoff and full jitter, for remote storage calls.

Storage (``zero_ckpt.storage``) decides which errors are transient (a reset connection, HTTP
500/503, throttling) and wraps every remote call in :meth:`RetryPolicy.call` (threads) or
:meth:`RetryPolicy.acall` (coroutines on fsspec's event loop). A call is attempted at most
``attempts`` times; between attempts it sleeps ``uniform(0, min(max_delay, base_delay * 2**k))``
seconds after the ``k+1``-th failure ("full jitter": many workers retrying after one outage
spread out instead of hitting the server again in lockstep). A permanent error, or the last
transient one, is raised as :class:`GaveUp` carrying the attempts made and the last error.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from zero_ckpt import knobs

__all__ = ["RetryPolicy", "GaveUp"]

T = TypeVar("T")


class GaveUp(Exception):
    """A call failed: ``last`` is the final error, ``attempts`` how many were made,
    ``transient`` whether that error was one worth retrying (so the budget ran out)."""

    def __init__(self, last: BaseException, attempts: int, transient: bool) -> None:
        super().__init__(f"{last!r} after {attempts} attempt(s)")
        self.last = last
        self.attempts = attempts
        self.transient = transient


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` in all (the first included); delays in seconds."""

    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 20.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("retry delays must not be negative")

    @classmethod
    def from_knobs(cls) -> "RetryPolicy":
        """ZERO_CKPT_RETRIES, ZERO_CKPT_RETRY_BASE_SECONDS, ZERO_CKPT_RETRY_MAX_SECONDS."""
        return cls(knobs.retry_attempts(), knobs.retry_base_seconds(), knobs.retry_max_seconds())

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``failures`` consecutive failures (1, 2, ...)."""
        cap = min(self.max_delay, self.base_delay * (2 ** (failures - 1)))
        return (rng or random).uniform(0.0, cap)

    def call(
        self,
        fn: Callable[[], T],
        is_transient: Callable[[BaseException], bool],
        sleep: Callable[[float], Any] = time.sleep,
    ) -> T:
        """``fn()``, retried while it raises transient errors; GaveUp otherwise."""
        failures = 0
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, never swallowed
                failures += 1
                transient = is_transient(exc)
                if not transient or failures >= self.attempts:
                    raise GaveUp(exc, failures, transient) from exc
            sleep(self.delay(failures))

    async def acall(
        self,
        fn: Callable[[], Awaitable[T]],
        is_transient: Callable[[BaseException], bool],
    ) -> T:
        """The coroutine version of :meth:`call` (``fn`` makes a fresh awaitable per try)."""
        failures = 0
        while True:
            try:
                return await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below, never swallowed
                failures += 1
                transient = is_transient(exc)
                if not transient or failures >= self.attempts:
                    raise GaveUp(exc, failures, transient) from exc
            await asyncio.sleep(self.delay(failures))
