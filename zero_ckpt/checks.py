"""Consistency checks between a manifest and what its files say about themselves (pure).

The executors read each shard's safetensors header and hand it here before planning, so a
shard that does not match the layout is refused by name before any byte is moved.
"""

from __future__ import annotations

from zero_ckpt.errors import Problem
from zero_ckpt.manifest import Manifest, tensor_name
from zero_ckpt.safetensors_format import SafetensorsHeader

__all__ = ["check_shard_header", "expected_shard_tensors"]


def expected_shard_tensors(manifest: Manifest, rank: int) -> list[tuple[str, str, tuple[int]]]:
    """``(name, dtype, shape)`` of every tensor rank's shard must hold, in canonical order:
    group by group, ``master`` then the state keys; each 1-D of the rank's real elements."""
    out = []
    for gi, group in enumerate(manifest.groups):
        real = group.layout(manifest.world_size).real_numel(rank)
        for key in group.keys:
            out.append((tensor_name(gi, key), group.dtype_of(key, manifest.master_dtype), (real,)))
    return out


def check_shard_header(
    manifest: Manifest, rank: int, header: SafetensorsHeader, path: str
) -> list[Problem]:
    """Every mismatch between rank's shard header and the manifest's layout, naming ``path``."""
    problems: list[Problem] = []
    expected = expected_shard_tensors(manifest, rank)
    for name, dtype, shape in expected:
        entry = header.tensors.get(name)
        if entry is None:
            problems.append(
                Problem(path, f"tensor {name!r} is missing from the shard", "header", rank)
            )
            continue
        if entry.dtype != dtype:
            problems.append(
                Problem(path, f"tensor {name!r} is {entry.dtype}, manifest says {dtype}", "header", rank)
            )
        if entry.shape != shape:
            problems.append(
                Problem(
                    path,
                    f"tensor {name!r} has shape {list(entry.shape)}, but rank {rank} holds "
                    f"{shape[0]} real elements of this group at world size {manifest.world_size}",
                    "header",
                    rank,
                )
            )
    extra = sorted(set(header.tensors) - {name for name, _, _ in expected})
    if extra:
        problems.append(
            Problem(path, f"unexpected tensors {extra} not described by the manifest", "header", rank)
        )
    return problems
