"""Small builders for tests: random param groups for ``write_checkpoint`` and file helpers.

Not a test module (no ``test_`` prefix). Import it as ``from helpers_ckpt import ...``;
pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import fsspec
import torch

import zero_ckpt

__all__ = [
    "STANDARD_SPEC",
    "STANDARD_MODEL_DTYPES",
    "build_groups",
    "standard_inputs",
    "write_standard",
    "write_random",
    "dir_bytes",
    "fs_bytes",
    "all_files",
    "flip_byte",
    "expected_param",
    "memory_rm",
]

# (name, shape) per group, in flat order: odd sizes, a 0-sized param, a 1-element param.
STANDARD_SPEC: list[list[tuple[str, tuple[int, ...]]]] = [
    [("enc.w", (13, 5)), ("enc.b", (7,)), ("enc.empty", (4, 0)), ("enc.g", (3,))],
    [("head.w", (29,)), ("head.s", (1,))],
]
# Model dtypes that differ from the fp32 masters.
STANDARD_MODEL_DTYPES = {"enc.w": "bfloat16", "head.s": "bfloat16"}
# Per group: state key -> dtype. Group 1 keeps exp_avg in bfloat16 (a state_dtypes entry).
STANDARD_STATES: list[dict[str, torch.dtype]] = [
    {"exp_avg": torch.float32, "exp_avg_sq": torch.float32},
    {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.float32},
]


def build_groups(
    spec: Sequence[Sequence[tuple[str, Sequence[int]]]],
    states: Sequence[Mapping[str, torch.dtype]] | None = None,
    *,
    seed: int = 0,
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """``[{name: {"master": fp32, key: tensor, ...}}]`` with seeded random values.

    ``states[g]`` maps group g's state keys to their dtypes (default: Adam's two, fp32).
    ``exp_avg_sq``-like keys (ending in ``_sq``) are non-negative.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for gi, group in enumerate(spec):
        keys = states[gi] if states is not None else {"exp_avg": torch.float32, "exp_avg_sq": torch.float32}
        g: dict[str, dict[str, torch.Tensor]] = {}
        for name, shape in group:
            shape = tuple(shape)
            entry = {"master": torch.randn(shape, generator=gen, dtype=torch.float32)}
            for key, dtype in keys.items():
                t = torch.randn(shape, generator=gen, dtype=torch.float32)
                if key.endswith("_sq"):
                    t = t.abs()
                entry[key] = t.to(dtype)
            g[name] = entry
        out.append(g)
    return out


def standard_inputs(seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``write_checkpoint`` (everything but dst/world_size/align)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return {
        "groups": build_groups(STANDARD_SPEC, STANDARD_STATES, seed=seed),
        "model_dtypes": dict(STANDARD_MODEL_DTYPES),
        "hyperparams": [
            {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
            {"lr": 0.002, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0},
        ],
        "scalars": [{"step": 120}, {"step": 120}],
        "model_state": {
            "bn.running_mean": torch.randn(4, generator=gen),
            "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        },
        "extra": {"averager": {"step": 120}},
    }


def write_standard(dst: str | os.PathLike[str], world_size: int, align: int = 1, seed: int = 0, **kw: Any):
    """Write the standard checkpoint; returns ``(manifest, inputs)``."""
    inputs = standard_inputs(seed)
    inputs.update(kw)
    manifest = zero_ckpt.write_checkpoint(str(dst), world_size=world_size, align=align, **inputs)
    return manifest, inputs


def write_random(
    dst: str | os.PathLike[str],
    sizes: Sequence[Sequence[int]],
    world_size: int,
    align: int = 1,
    seed: int = 0,
):
    """Groups of 1-D params with the given sizes (Adam states); returns ``(manifest, groups)``."""
    spec = [[(f"g{gi}.p{pi}", (n,)) for pi, n in enumerate(group)] for gi, group in enumerate(sizes)]
    groups = build_groups(spec, seed=seed)
    manifest = zero_ckpt.write_checkpoint(str(dst), groups, world_size=world_size, align=align)
    return manifest, groups


def expected_param(inputs: Mapping[str, Any], name: str, key: str = "master") -> torch.Tensor:
    """The input tensor of param ``name`` for ``key`` (as given to write_checkpoint)."""
    for group in inputs["groups"]:
        if name in group:
            return group[name][key]
    raise KeyError(name)


def all_files(root: str | os.PathLike[str]) -> list[str]:
    """Every file under a local directory (hidden and temporary ones too), relative, sorted."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def dir_bytes(root: str | os.PathLike[str]) -> dict[str, bytes]:
    """``relative path -> bytes`` of every file under a local directory."""
    root = Path(root)
    return {rel: (root / rel).read_bytes() for rel in all_files(root)}


def fs_bytes(url: str) -> dict[str, bytes]:
    """``relative path -> bytes`` of every file under an fsspec URL."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.exists(root):
        return {}
    return {p[len(root) + 1:] if p.startswith(root + "/") else p: fs.cat_file(p) for p in fs.find(root)}


def flip_byte(path: str | os.PathLike[str], offset: int) -> None:
    """XOR one byte of a local file with 0xFF (negative offsets count from the end)."""
    p = Path(path)
    data = bytearray(p.read_bytes())
    data[offset] ^= 0xFF
    p.write_bytes(bytes(data))


def memory_rm(url: str) -> None:
    """Remove a ``memory://`` tree (tests clean up the process-global memory filesystem)."""
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)
