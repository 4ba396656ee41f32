"""Loss scaling for fp16 training: a static or dynamic scale and its state (no torch import).

The scaler only does the bookkeeping; the optimizer multiplies the loss, unscales the gradients
and decides (with one all-reduce over the group, so every rank agrees) whether a step
overflowed. The dynamic rule is DeepSpeed's ``DynamicLossScaler`` (``deepspeed/runtime/fp16/
loss_scaler.py``) with its ZeRO-config defaults, so a run moved from DeepSpeed sees the same
scale sequence for the same overflow pattern:

* on overflow the step is skipped; with ``hysteresis`` h > 1 the first h - 1 overflows only use
  up the hysteresis, the next one divides the scale by ``scale_factor`` (never below
  ``min_scale``);
* after an overflow, or from the start, the scale is multiplied by ``scale_factor`` on each
  iteration ``i`` with ``s = i - last_overflow_iter - 1 > 0`` and ``s % scale_window == 0``,
  which also refills the hysteresis (``consecutive_hysteresis=True`` refills it on every good
  step instead).

A static scale never changes, but an overflowing step is still skipped.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["LossScaler"]


class LossScaler:
    """Scale state for one optimizer.

    Args (DeepSpeed's config names in brackets): ``init_scale`` (``2 ** initial_scale_power``,
    default ``2**16``), ``scale_window`` (``loss_scale_window``, 1000; ``growth_interval`` is
    accepted as an alias), ``hysteresis`` (2), ``consecutive_hysteresis`` (False),
    ``min_scale`` (``min_loss_scale``, 1), ``scale_factor`` (2; ``growth_factor`` alias).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        *,
        dynamic: bool = True,
        scale_window: int | None = None,
        hysteresis: int = 2,
        consecutive_hysteresis: bool = False,
        min_scale: float = 1.0,
        scale_factor: float | None = None,
        growth_interval: int | None = None,
        growth_factor: float | None = None,
    ) -> None:
        if scale_window is not None and growth_interval is not None:
            raise ValueError("pass scale_window or its alias growth_interval, not both")
        if scale_factor is not None and growth_factor is not None:
            raise ValueError("pass scale_factor or its alias growth_factor, not both")
        window = scale_window if scale_window is not None else growth_interval
        factor = scale_factor if scale_factor is not None else growth_factor
        window = 1000 if window is None else window
        factor = 2.0 if factor is None else factor
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"loss scale must be a positive finite number, got {init_scale}")
        if not (math.isfinite(factor) and factor > 1.0):
            raise ValueError(f"scale_factor must be > 1, got {factor}")
        if isinstance(window, bool) or int(window) != window or window < 1:
            raise ValueError(f"scale_window must be an int >= 1, got {window}")
        if isinstance(hysteresis, bool) or int(hysteresis) != hysteresis or hysteresis < 1:
            raise ValueError(f"hysteresis must be an int >= 1, got {hysteresis}")
        if not (math.isfinite(min_scale) and min_scale > 0):
            raise ValueError(f"min_scale must be a positive finite number, got {min_scale}")
        self.scale = float(init_scale)
        self.dynamic = bool(dynamic)
        self.scale_factor = float(factor)
        self.scale_window = int(window)
        self.hysteresis = int(hysteresis)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.min_scale = float(min_scale)
        self.cur_hysteresis = self.hysteresis
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.overflows = 0

    def update(self, found_inf: bool) -> None:
        """Record one step's outcome (call once per step, with the group-wide verdict)."""
        if found_inf:
            self.overflows += 1
        if self.dynamic:
            if found_inf:
                if self.hysteresis == 1 or self.cur_hysteresis == 1:
                    self.scale = max(self.scale / self.scale_factor, self.min_scale)
                else:
                    self.cur_hysteresis -= 1
                self.last_overflow_iter = self.cur_iter
            else:
                if self.consecutive_hysteresis:
                    self.cur_hysteresis = self.hysteresis
                stable = self.cur_iter - self.last_overflow_iter - 1
                if stable > 0 and stable % self.scale_window == 0:
                    if not self.consecutive_hysteresis:
                        self.cur_hysteresis = self.hysteresis
                    self.scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (python numbers only)."""
        return {
            "scale": self.scale,
            "dynamic": self.dynamic,
            "scale_factor": self.scale_factor,
            "scale_window": self.scale_window,
            "hysteresis": self.hysteresis,
            "consecutive_hysteresis": self.consecutive_hysteresis,
            "min_scale": self.min_scale,
            "cur_hysteresis": self.cur_hysteresis,
            "cur_iter": self.cur_iter,
            "last_overflow_iter": self.last_overflow_iter,
            "overflows": self.overflows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; keys it lacks keep their current value (states
        written before the DeepSpeed rule, with ``growth_interval``/``growth_factor``, load)."""
        self.scale = float(state.get("scale", self.scale))
        self.dynamic = bool(state.get("dynamic", self.dynamic))
        self.scale_factor = float(
            state.get("scale_factor", state.get("growth_factor", self.scale_factor))
        )
        self.scale_window = int(
            state.get("scale_window", state.get("growth_interval", self.scale_window))
        )
        self.hysteresis = int(state.get("hysteresis", self.hysteresis))
        self.consecutive_hysteresis = bool(
            state.get("consecutive_hysteresis", self.consecutive_hysteresis)
        )
        self.min_scale = float(state.get("min_scale", self.min_scale))
        self.cur_hysteresis = int(state.get("cur_hysteresis", self.cur_hysteresis))
        self.cur_iter = int(state.get("cur_iter", self.cur_iter))
        self.last_overflow_iter = int(state.get("last_overflow_iter", self.last_overflow_iter))
        self.overflows = int(state.get("overflows", self.overflows))
