"""Writing format v1 from tensors in memory: one shard, the model file, or a whole checkpoint.

``write_shard`` and ``write_model_file`` are what a training rank calls when it saves (see
``zero_ckpt.snapshot``); ``write_checkpoint`` builds a complete checkpoint from full per-param
tensors, so tests, fixtures and benchmarks need no training run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch

from zero_core.layout import compute_partition_numel
from zero_ckpt.checksum import PieceChecksums, format_checksum
from zero_ckpt.errors import LayoutMismatchError
from zero_ckpt.manifest import (
    MANIFEST_NAME,
    MODEL_FILE_NAME,
    FileMeta,
    GroupMeta,
    Manifest,
    ParamMeta,
    shard_path,
    tensor_name,
)
from zero_ckpt.plan import shard_header
from zero_ckpt.safetensors_format import build_header
from zero_ckpt.destination import prepare_destination
from zero_ckpt.storage import Location, open_location

__all__ = ["write_shard", "write_model_file", "write_checkpoint", "dtype_name", "tensor_bytes"]

_VERSION = "0.1.0"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw bytes (CPU, contiguous) without copying when already so."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def _write_safetensors(
    loc: Location,
    rel: str,
    header_bytes: bytes,
    ordered: Sequence[tuple[str, torch.Tensor]],
    file_bytes: int,
    rank: int | None,
    fsync: bool | None,
) -> FileMeta:
    pieces = PieceChecksums()
    tensor_crcs: dict[str, str] = {}
    with loc.writer(rel, file_bytes) as w:
        pieces.add(0, len(header_bytes), w.write(header_bytes))
        for name, t in ordered:
            data = tensor_bytes(t)
            offset = w.bytes_written
            crc = w.write(data) if len(data) else 0
            pieces.add(offset, len(data), crc)
            tensor_crcs[name] = format_checksum(crc)
        if w.bytes_written != file_bytes:
            raise AssertionError(f"wrote {w.bytes_written} bytes to {rel}, planned {file_bytes}")
        w.commit(fsync=fsync)
    return FileMeta(rel, file_bytes, format_checksum(pieces.combine(file_bytes)), rank, tensor_crcs)


def write_shard(
    loc: Location,
    manifest: Manifest,
    rank: int,
    tensors: Mapping[str, torch.Tensor],
    *,
    fsync: bool | None = None,
) -> FileMeta:
    """Write rank's shard: ``tensors`` maps ``g{i}.{key}`` to 1-D tensors of exactly the rank's
    real elements (padding stripped) in the dtype the manifest records. Returns its FileMeta
    (size, checksum, per-tensor checksums) for the manifest. Not collective."""
    header_bytes, header = shard_header(manifest, rank)
    ordered = []
    for name, entry in header.tensors.items():
        t = tensors.get(name)
        if t is None:
            raise LayoutMismatchError(f"shard of rank {rank} needs tensor {name!r}, which was not given")
        if t.numel() != entry.numel or dtype_name(t.dtype) != entry.dtype:
            raise LayoutMismatchError(
                f"tensor {name!r} for rank {rank} has {t.numel()} elements of {dtype_name(t.dtype)}, "
                f"the layout needs {entry.numel} of {entry.dtype}"
            )
        ordered.append((name, t))
    rel = shard_path(rank, manifest.world_size)
    return _write_safetensors(loc, rel, header_bytes, ordered, header.file_bytes, rank, fsync)


def write_model_file(
    loc: Location, tensors: Mapping[str, torch.Tensor], *, fsync: bool | None = None
) -> FileMeta | None:
    """Write ``model.safetensors`` (buffers, frozen params); None when ``tensors`` is empty."""
    if not tensors:
        return None
    items = sorted(tensors.items())
    header_bytes, header = build_header(
        [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in items], {"format": "pt"}
    )
    return _write_safetensors(loc, MODEL_FILE_NAME, header_bytes, items, header.file_bytes, None, fsync)


def write_checkpoint(
    dst: str,
    groups: Sequence[Mapping[str, Mapping[str, torch.Tensor]]],
    *,
    world_size: int,
    align: int = 1,
    hyperparams: Sequence[Mapping[str, Any]] | None = None,
    scalars: Sequence[Mapping[str, Any]] | None = None,
    model_dtypes: Mapping[str, str] | None = None,
    zero_stage: int = 2,
    master_dtype: str = "float32",
    model_state: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Build a complete checkpoint at ``dst`` from full per-param tensors.

    ``groups``: one dict per param group, ``{param_name: {"master": tensor, "exp_avg": ...}}``,
    in flat order; every param of a group has the same keys; masters are stored in
    ``master_dtype`` and states in their own dtype. ``model_dtypes`` gives a param's model
    dtype (default: the master tensor's dtype). ``model_state``: extra tensors for
    ``model.safetensors``. Shards first, ``manifest.json`` last. ``dst`` may hold files
    zero-ckpt does not write (kept); its earlier checkpoint files are refused unless
    ``overwrite``, which removes exactly those (see :mod:`zero_ckpt.destination`).
    """
    model_dtypes = dict(model_dtypes or {})
    group_metas: list[GroupMeta] = []
    flats: list[dict[str, torch.Tensor]] = []
    for gi, group in enumerate(groups):
        params: list[ParamMeta] = []
        keys: list[str] | None = None
        per_key: dict[str, list[torch.Tensor]] = {}
        offset = 0
        for name, states in group.items():
            if "master" not in states:
                raise LayoutMismatchError(f"group {gi} param {name!r} has no 'master' tensor")
            state_keys = [k for k in states if k != "master"]
            if keys is None:
                keys = state_keys
            elif sorted(state_keys) != sorted(keys):
                raise LayoutMismatchError(
                    f"group {gi} param {name!r} has states {state_keys}, others have {keys}; "
                    "every param of a group needs the same state keys"
                )
            master = states["master"]
            shape = tuple(master.shape)
            dtype = model_dtypes.get(name, dtype_name(master.dtype))
            params.append(ParamMeta(name, shape, dtype, offset))
            offset += master.numel()
            for key in ["master", *keys]:
                t = states[key]
                if tuple(t.shape) != shape:
                    raise LayoutMismatchError(
                        f"group {gi} param {name!r}: {key} has shape {list(t.shape)}, master has {list(shape)}"
                    )
                want = master_dtype if key == "master" else dtype_name(t.dtype)
                per_key.setdefault(key, []).append(t.detach().reshape(-1).to(getattr(torch, want)))
        keys = keys or []
        state_dtypes = {
            k: dtype_name(per_key[k][0].dtype) for k in keys if dtype_name(per_key[k][0].dtype) != master_dtype
        }
        group_metas.append(
            GroupMeta(
                numel=offset,
                partition_numel=compute_partition_numel(offset, world_size, align),
                align=align,
                params=tuple(params),
                state_keys=tuple(keys),
                hyperparams=dict(hyperparams[gi]) if hyperparams else {},
                scalars=dict(scalars[gi]) if scalars else {},
                state_dtypes=state_dtypes,
            )
        )
        flats.append(
            {
                k: torch.cat(v) if v else torch.empty(0, dtype=getattr(torch, master_dtype))
                for k, v in per_key.items()
            }
        )
    placeholder = tuple(FileMeta(shard_path(r, world_size), 0, "", r) for r in range(world_size))
    manifest = Manifest(
        world_size=world_size,
        zero_stage=zero_stage,
        master_dtype=master_dtype,
        groups=tuple(group_metas),
        shards=placeholder,
        extra=dict(extra or {}),
        created_by=f"zero-ckpt {_VERSION}",
    )
    with open_location(dst, storage_options) as loc:
        prepare_destination(None, loc, overwrite)
        shards = []
        for rank in range(world_size):
            tensors = {}
            for gi, g in enumerate(group_metas):
                lo, hi = g.layout(world_size).real_range(rank)
                for key in g.keys:
                    flat = flats[gi].get(key)
                    if flat is None:  # a group without params
                        flat = torch.empty(0, dtype=getattr(torch, g.dtype_of(key, master_dtype)))
                    tensors[tensor_name(gi, key)] = flat[lo:hi]
            shards.append(write_shard(loc, manifest, rank, tensors))
        model_file = write_model_file(loc, dict(model_state or {}))
        manifest = replace(manifest, shards=tuple(shards), model_file=model_file).validate(
            loc.url_of(MANIFEST_NAME)
        )
        loc.write_atomic(MANIFEST_NAME, manifest.to_json().encode())
    return manifest
