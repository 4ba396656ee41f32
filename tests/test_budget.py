"""The executors' worker count respects the buffer budget, destination buffers included."""

from __future__ import annotations

import pytest

from zero_ckpt.transfer import resolve_workers


class _Dst:
    """A destination whose writers hold ``per_worker`` bytes per worker plus ``fixed``."""

    def __init__(self, per_worker: int, fixed: int) -> None:
        self.per_worker, self.fixed = per_worker, fixed

    def write_buffer_bytes(self, workers: int) -> int:
        return self.per_worker * workers + self.fixed


MiB = 1 << 20


@pytest.mark.parametrize(
    "budget, wanted, chunk, dst, expected",
    [
        (192 * MiB, 4, 8 * MiB, None, 4),  # local: 4 x 2 x 8 MiB = 64 MiB fits
        (32 * MiB, 4, 8 * MiB, None, 2),  # 2 x 2 x 8 = 32 fits, 3 workers would not
        (192 * MiB, 4, 8 * MiB, _Dst(16 * MiB, 40 * MiB), 4),  # S3 defaults: 64 + 104 = 168
        (128 * MiB, 4, 8 * MiB, _Dst(16 * MiB, 40 * MiB), 2),  # 32 + 72 = 104; 3 -> 136 > 128
        (1 * MiB, 4, 8 * MiB, _Dst(16 * MiB, 40 * MiB), 1),  # never fewer than one
    ],
)
def test_workers_fit_the_budget(monkeypatch, budget, wanted, chunk, dst, expected) -> None:
    monkeypatch.setenv("ZERO_CKPT_BUFFER_BYTES", str(budget))
    assert resolve_workers(wanted, chunk, dst) == expected
