"""``open_checkpoint``: read one parameter's full tensor (master or any state) by name,
touching only that parameter's fragments."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from zero_ckpt.checks import check_shard_header
from zero_ckpt.errors import CorruptShardError, raise_problems
from zero_ckpt.manifest import Manifest, tensor_name
from zero_ckpt.safetensors_format import SafetensorsHeader, dtype_size
from zero_ckpt.storage import Location, open_location
from zero_ckpt.transfer import load_manifest, read_header

__all__ = ["open_checkpoint", "CheckpointReader", "ParamInfo"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ParamInfo:
    """Where a named parameter lives: group, index in the group, shape, model dtype,
    offset (elements) in the group's flat buffer, and its other names (tied weights)."""

    name: str
    group: int
    index: int
    shape: tuple[int, ...]
    dtype: str
    offset: int
    numel: int
    aliases: tuple[str, ...]


class CheckpointReader:
    """An open checkpoint. ``manifest``, ``params`` (name -> ParamInfo, aliases included),
    ``read(name, key)``. Shard headers are fetched lazily, only for the ranks a read needs.

    A read touches part of a tensor, so it cannot check the tensor's checksum: it checks the
    shard's size and header; ``verify`` (or a full ``load``) checks the bytes."""

    def __init__(self, loc: Location, manifest: Manifest) -> None:
        self.location = loc
        self.url = loc.url
        self.manifest = manifest
        self._layouts = manifest.layouts()
        self._headers: dict[int, SafetensorsHeader] = {}
        self._lock = threading.Lock()
        self.params: dict[str, ParamInfo] = {}
        for gi, g in enumerate(manifest.groups):
            for pi, p in enumerate(g.params):
                info = ParamInfo(p.name, gi, pi, p.shape, p.dtype, p.offset, p.numel, p.aliases)
                for name in (p.name, *p.aliases):
                    self.params[name] = info

    def keys(self, name: str) -> tuple[str, ...]:
        """Tensors stored for a param: ``("master", "exp_avg", ...)``."""
        return self.manifest.groups[self._info(name).group].keys

    def _info(self, name: str) -> ParamInfo:
        try:
            return self.params[name]
        except KeyError:
            close = [n for n in self.params if name.split(".")[-1] in n][:5]
            hint = f"; similar names: {close}" if close else ""
            raise KeyError(f"{self.url} has no parameter {name!r}{hint}") from None

    def _header(self, rank: int) -> SafetensorsHeader:
        with self._lock:
            header = self._headers.get(rank)
        if header is None:
            meta = self.manifest.shard(rank)
            url = self.location.url_of(meta.path)
            size = self.location.size(meta.path)
            if size != meta.bytes:
                raise CorruptShardError(
                    f"{url} is {size} bytes, the manifest says {meta.bytes} (truncated or "
                    "replaced?); run `zero-ckpt verify` for a full check",
                    path=url, rank=rank, expected=meta.bytes, actual=size,
                )
            header, _ = read_header(self.location, meta.path, size)
            raise_problems(check_shard_header(self.manifest, rank, header, url), CorruptShardError)
            with self._lock:
                self._headers[rank] = header
        return header

    def read(self, name: str, key: str = "master", *, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """The full tensor of param ``name`` for ``key`` (``master`` or a state such as
        ``exp_avg``), shaped like the param, in the stored dtype unless ``dtype`` is given.
        Reads only the byte ranges of the param's fragments."""
        info = self._info(name)
        group = self.manifest.groups[info.group]
        if key not in group.keys:
            raise KeyError(f"{self.url}: param {name!r} has no {key!r}; stored: {list(group.keys)}")
        stored = group.dtype_of(key, self.manifest.master_dtype)
        size = dtype_size(stored)
        buf = bytearray(info.numel * size)
        layout = self._layouts[info.group]
        tname = tensor_name(info.group, key)
        for rank, lo, hi in layout.locate(info.offset, info.offset + info.numel):
            entry = self._header(rank).tensors[tname]
            src = entry.start + (lo - rank * layout.partition_numel) * size
            view = memoryview(buf)[(lo - info.offset) * size : (hi - info.offset) * size]
            self.location.read_into(self.manifest.shard(rank).path, src, view)
        if info.numel == 0:
            out = torch.empty(info.shape, dtype=_DTYPES[stored])
        else:
            out = torch.frombuffer(buf, dtype=_DTYPES[stored]).reshape(info.shape)
        if dtype is not None:
            out = out.to(_DTYPES[dtype] if isinstance(dtype, str) else dtype)
        return out

    def close(self) -> None:
        self.location.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(url: str, *, storage_options: dict[str, Any] | None = None) -> CheckpointReader:
    """Open the checkpoint at ``url`` for reading (manifest validated; shards read lazily)."""
    loc = open_location(url, storage_options)
    try:
        return CheckpointReader(loc, load_manifest(loc))
    except BaseException:
        loc.close()
        raise
