"""zero_core: the flat layout math shared by the optimizer and the checkpoint toolkit.

``zero_core`` never imports ``zero_ckpt`` or fsspec (a test holds this rule). Importing
``zero_core`` or ``zero_core.layout`` imports neither torch nor torch.distributed; the
optimizer names below are loaded on first access (module ``__getattr__``).
"""

from zero_core.layout import Fragment, GroupLayout, ParamSpec, compute_partition_numel, overlap

__all__ = [
    "Fragment",
    "GroupLayout",
    "ParamSpec",
    "compute_partition_numel",
    "overlap",
    "ZeroOptimizer",
    "ZeroConfigError",
    "ZeroStateDictError",
    "LossScaler",
]

# name -> module it lives in, imported on first access
_LAZY = {
    "ZeroOptimizer": "zero_core.optimizer",
    "ZeroConfigError": "zero_core.optimizer",
    "ZeroStateDictError": "zero_core.optimizer",
    "LossScaler": "zero_core.loss_scaler",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zero_core' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
