"""ZeroOptimizer inside the training loops people use: Hugging Face ``Trainer`` and Accelerate.

Optional dependencies: transformers and accelerate are not runtime dependencies of zero-ckpt.
Importing ``zero_core`` or this package imports neither; the names below are loaded on first
access, and using them without the package installed raises an ``ImportError`` that says what
to install.

- :class:`~zero_core.integrations.hf_trainer.ZeroTrainer`: a ``transformers.Trainer`` that
  trains with a :class:`~zero_core.ZeroOptimizer` (no DDP wrap, true global-norm clipping,
  checkpoints through ``zero_ckpt.save/load``, resumable at another world size).
- :func:`~zero_core.integrations.accelerate.prepare`: ``accelerator.prepare`` for a model and
  its ZeroOptimizer (the model stays unwrapped: the optimizer reduces the gradients), and
  :func:`~zero_core.integrations.accelerate.clip_grad_norm_`.

This package sits above both ``zero_core`` and ``zero_ckpt`` (the Trainer's checkpoints go
through ``zero_ckpt``), like the CLI: ``zero_core`` itself never imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ZeroTrainer", "prepare", "clip_grad_norm_", "unwrap_optimizer", "INSTALL_HINT"]

#: What to install for the integrations (the ``hf`` extra; the ``test`` extra has them too).
INSTALL_HINT = (
    "pip install 'transformers>=4.46' 'accelerate>=1.0' (the zero-ckpt[hf] extra)"
)

# name -> module it lives in, imported on first access
_LAZY = {
    "ZeroTrainer": "zero_core.integrations.hf_trainer",
    "prepare": "zero_core.integrations.accelerate",
    "clip_grad_norm_": "zero_core.integrations.accelerate",
    "unwrap_optimizer": "zero_core.integrations.accelerate",
}


def require(package: str, feature: str) -> Any:
    """Import the optional ``package`` for ``feature``; ImportError naming what to install."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"{feature} needs the optional package {package!r}, which is not installed; "
            f"{INSTALL_HINT}"
        ) from exc


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zero_core.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
