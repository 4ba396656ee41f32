"""Loss scaling for fp16 training: a static or dynamic scale and its state (no torch import).

The scaler only does the bookkeeping; the optimizer multiplies the loss, divides the gradients
and decides (with one all-reduce over the group, so every rank agrees) whether a step
overflowed. Semantics follow ``torch.amp.GradScaler``: on overflow the step is skipped and a
dynamic scale is multiplied by ``backoff_factor``; after ``growth_interval`` consecutive good
steps it is multiplied by ``growth_factor``. A static scale never changes, but an overflowing
step is still skipped.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["LossScaler"]


class LossScaler:
    """Scale state for one optimizer.

    ``scale``: current factor the loss is multiplied by (a python float).
    ``growth_tracker``: good steps since the last change of a dynamic scale.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        *,
        dynamic: bool = True,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
    ) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"loss scale must be a positive finite number, got {init_scale}")
        if growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.scale = float(init_scale)
        self.dynamic = bool(dynamic)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.growth_tracker = 0
        self.overflows = 0

    def update(self, found_inf: bool) -> None:
        """Record one step's outcome (call once per step, with the group-wide verdict)."""
        if found_inf:
            self.overflows += 1
            self.growth_tracker = 0
            if self.dynamic:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        if not self.dynamic:
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (python numbers only)."""
        return {
            "scale": self.scale,
            "dynamic": self.dynamic,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "min_scale": self.min_scale,
            "growth_tracker": self.growth_tracker,
            "overflows": self.overflows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; keys it lacks keep their current value."""
        self.scale = float(state.get("scale", self.scale))
        self.dynamic = bool(state.get("dynamic", self.dynamic))
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
        self.min_scale = float(state.get("min_scale", self.min_scale))
        self.growth_tracker = int(state.get("growth_tracker", self.growth_tracker))
        self.overflows = int(state.get("overflows", self.overflows))
