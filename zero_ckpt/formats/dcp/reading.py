"""A PyTorch DCP checkpoint of a model + torch optimizer as a :class:`~zero_ckpt.view.SourceView`.

What ``dcp.save({"model": msd, "optim": osd})`` writes with ``msd, osd = get_state_dict(model,
optimizer)`` (FSDP2, DDP, single device; any top-level names): model entries keyed by param
FQN, optimizer entries ``state.<fqn>.<key>`` and ``param_groups.<g>.<hyperparam>`` /
``param_groups.<g>.params`` (the FQNs of the group, in order). The view lays each group's params
end to end in that order (format v1's flat layout), the master being the model's parameter
values; every stored chunk is one extent. A chunk must be a contiguous row-major range of its
tensor (dim-0 shards, as FSDP2 and DDP write; a tensor-parallel column shard is refused). Model
entries the optimizer does not own (buffers, frozen params) are module-only tensors.

Only the ``.metadata`` (restricted unpickler), the small pickles of each record and the BYTES
items are read; no tensor data, no torch.
"""

from __future__ import annotations

import math
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from zero_ckpt.formats.dcp.metadata import (
    DCP_METADATA_FILE,
    MAX_METADATA_BYTES,
    DcpFormatError,
    DcpMetadata,
    DcpTensor,
    read_dcp_metadata,
)
from zero_ckpt.formats.dcp.records import locate_tensor_record, read_bytes_item
from zero_ckpt.manifest import FileMeta, GroupMeta, Manifest, ParamMeta
from zero_ckpt.storage import Location
from zero_ckpt.view import NO_CHECKSUM, Extent, ModelTensor, SourceChecksInfo, SourceView

__all__ = ["DcpSource", "read_dcp", "dcp_view", "FLOAT_DTYPES"]

FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
_RANK_FILE = re.compile(r"__(\d+)_(\d+)\.distcp$")
_SCALAR_FORMATS = {"float32": "<f", "float64": "<d", "int64": "<q", "int32": "<i", "float16": "<e"}


class DcpSource:
    """A DCP checkpoint's metadata with the roots of its model and optimizer state dicts."""

    def __init__(self, loc: Location, meta: DcpMetadata) -> None:
        self.loc, self.meta = loc, meta
        self.url = loc.url
        self.paths = {k: _path_of(k, meta) for k in [*meta.tensors, *meta.bytes_items]}
        self.opt_root = self._optimizer_root()

    def fail(self, message: str) -> DcpFormatError:
        return DcpFormatError(f"{self.url}: {message}", path=self.url)

    def _optimizer_root(self) -> tuple:
        roots = {p[:-3] for k, p in self.paths.items() if len(p) >= 3 and p[-3] == "param_groups"
                 and p[-1] == "params"}
        if len(roots) != 1:
            raise self.fail(
                "holds no optimizer state (no param_groups.<g>.params entry)" if not roots else
                f"holds {len(roots)} optimizer state dicts ({sorted('.'.join(map(str, r)) for r in roots)}); "
                "zero-ckpt reads a checkpoint of one model and one optimizer"
            )
        return roots.pop()

    def bytes_value(self, key: str) -> Any:
        item = self.meta.bytes_items[key]
        return read_bytes_item(self.loc, item.file, item.byte_offset, item.byte_length, key)


def _path_of(key: str, meta: DcpMetadata) -> tuple:
    path = meta.planner_data.get(key)
    if path:
        return tuple(path)
    # no planner data (old saves): flattened keys are dot-joined; FQNs contain dots, so only
    # the optimizer's fixed words are split off
    parts = key.split(".")
    for i, word in enumerate(parts):
        if word == "state" and i + 2 < len(parts):
            return (*parts[:i], "state", ".".join(parts[i + 1:-1]), parts[-1])
        if word == "param_groups" and i + 2 < len(parts) and parts[i + 1].isdigit():
            return (*parts[:i], "param_groups", int(parts[i + 1]), ".".join(parts[i + 2:]))
    return (parts[0], ".".join(parts[1:])) if len(parts) > 1 else (key,)


def read_dcp(loc: Location) -> DcpSource:
    """The metadata of the DCP checkpoint at ``loc`` (restricted unpickler, size-capped)."""
    data = loc.read_bytes(DCP_METADATA_FILE, max_bytes=MAX_METADATA_BYTES)
    return DcpSource(loc, read_dcp_metadata(data, loc.url_of(DCP_METADATA_FILE)))


def _flat_range(t: DcpTensor, offsets: tuple[int, ...], sizes: tuple[int, ...], src: DcpSource) -> tuple[int, int]:
    """The row-major element range a chunk covers; DcpFormatError unless it is contiguous."""
    shape = t.shape
    if not shape:
        return 0, 1
    # contiguous iff after the first dim with size > 1 every dim is whole
    k = 0
    while k < len(shape) - 1 and sizes[k] == 1:
        k += 1
    if any(sizes[i] != shape[i] or offsets[i] != 0 for i in range(k + 1, len(shape))):
        raise src.fail(
            f"{t.fqn}: the chunk at offsets {list(offsets)} of sizes {list(sizes)} is not a "
            f"contiguous range of the {list(shape)} tensor (a tensor-parallel shard); zero-ckpt "
            "reads data-parallel (dim-0) shards only"
        )
    start = 0
    for i, o in enumerate(offsets):
        start = start * shape[i] + o
    return start, start + math.prod(sizes)


def _pieces(src: DcpSource, t: DcpTensor, base: int = 0) -> tuple[list[Extent], dict]:
    """Extents of ``t`` (located in their records), shifted by ``base`` elements, in order, and
    each record's ``(file, unit) -> (zip CRC-32, nbytes)``; DcpFormatError unless they tile the
    tensor exactly."""
    pieces = []
    units = {}
    for c in t.chunks:
        lo, hi = _flat_range(t, c.offsets, c.sizes, src)
        if hi == lo:
            continue
        crc: list[int] = []
        start, nbytes = locate_tensor_record(
            src.loc, c.file, c.byte_offset, c.byte_length, t.dtype, hi - lo,
            what=f"{t.fqn} at offsets {list(c.offsets)}", crc_out=crc,
        )
        unit = f"{t.fqn}@{','.join(map(str, c.offsets))}"
        units[(c.file, unit)] = (crc[0], nbytes)
        pieces.append(Extent(base + lo, base + hi, c.file, start, t.dtype, unit, 0))
    pieces.sort(key=lambda e: e.start)
    pos = base
    for e in pieces:
        if e.start != pos:
            raise src.fail(
                f"{t.fqn}: elements [{pos - base}, {e.start - base}) are "
                f"{'stored twice' if e.start < pos else 'stored in no chunk'}; the checkpoint is damaged"
            )
        pos = e.stop
    if pos != base + t.numel:
        raise src.fail(f"{t.fqn}: elements [{pos - base}, {t.numel}) are stored in no chunk; the checkpoint is damaged")
    return pieces, units


def _scalar(src: DcpSource, t: DcpTensor) -> Any:
    fmt = _SCALAR_FORMATS.get(t.dtype)
    if fmt is None or t.numel != 1 or not t.chunks:
        raise src.fail(f"{t.fqn}: a {t.dtype} scalar of shape {list(t.shape)} is not a step count zero-ckpt reads")
    c = t.chunks[0]
    start, n = locate_tensor_record(src.loc, c.file, c.byte_offset, c.byte_length, t.dtype, 1, what=t.fqn)
    (value,) = struct.unpack(fmt, src.loc.read_range(c.file, start, start + n))
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _jsonable(value: Any) -> tuple[bool, Any]:
    if value is None or isinstance(value, (bool, int, str)):
        return True, value
    if isinstance(value, float):
        return math.isfinite(value), value
    if isinstance(value, (list, tuple)):
        out = [_jsonable(v) for v in value]
        return all(ok for ok, _ in out), [v for _, v in out]
    return False, None


def dcp_view(loc: Location, workers: int = 8) -> SourceView:
    """The DCP checkpoint at ``loc`` as a source view (see the module docstring)."""
    src = read_dcp(loc)
    meta, opt = src.meta, src.opt_root
    tensors_by_path = {src.paths[k]: t for k, t in meta.tensors.items()}
    n_groups = 1 + max(p[len(opt) + 1] for p in src.paths.values()
                       if p[:len(opt) + 1] == (*opt, "param_groups") and len(p) == len(opt) + 3)

    # the model root: the top-level entry whose keys hold the optimizer's params
    group_names: list[list[str]] = []
    hyper: list[dict[str, Any]] = []
    for g in range(n_groups):
        names = src.bytes_value(_key(src, (*opt, "param_groups", g, "params")))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise src.fail(f"param_groups[{g}].params is {names!r:.80}, expected the list of param names "
                           "get_state_dict writes")
        group_names.append(names)
        hp: dict[str, Any] = {}
        for k, p in sorted(src.paths.items()):
            if p[:len(opt) + 2] == (*opt, "param_groups", g) and len(p) == len(opt) + 3 and p[-1] != "params":
                ok, value = _jsonable(src.bytes_value(k))
                if ok:
                    hp[p[-1]] = value
        hyper.append(hp)
    owned = [n for names in group_names for n in names]
    model_root = _model_root(src, tensors_by_path, owned, opt)

    def param_tensor(name: str) -> DcpTensor:
        t = tensors_by_path.get((*model_root, name))
        if t is None:
            raise src.fail(f"the optimizer's param {name!r} has no model entry")
        return t

    master_dtypes = {param_tensor(n).dtype for n in owned}
    if len(master_dtypes) != 1 or not master_dtypes <= FLOAT_DTYPES:
        raise src.fail(f"the optimizer's params have dtypes {sorted(master_dtypes)}; zero-ckpt reads "
                       "one floating dtype for all of them")
    master_dtype = master_dtypes.pop()

    # every tensor to locate: (group, key, base) for state, or model-only
    jobs: list[tuple[Any, DcpTensor, int]] = []
    groups: list[GroupMeta] = []
    for g, names in enumerate(group_names):
        params, offset = [], 0
        keys: dict[str, str] = {}
        scalars: dict[str, Any] = {}
        for name in names:
            t = param_tensor(name)
            params.append(ParamMeta(name, t.shape, t.dtype, offset))
            jobs.append(((g, "master"), t, offset))
            states = {p[-1]: st for p, st in tensors_by_path.items()
                      if p[:-1] == (*opt, "state", name)}
            for key, st in sorted(states.items()):
                if st.shape == t.shape and key != "step":
                    if keys.setdefault(key, st.dtype) != st.dtype:
                        raise src.fail(f"state {key!r} of group {g} mixes dtypes {keys[key]} and {st.dtype}")
                    jobs.append(((g, key), st, offset))
                elif st.numel == 1:
                    value = _scalar(src, st)
                    if scalars.setdefault(key, value) != value:
                        raise src.fail(
                            f"state {key!r} is {scalars[key]} for some params of group {g} and {value} for "
                            f"{name!r}; format v1 keeps one value per group (were some params never stepped?)"
                        )
                else:
                    raise src.fail(f"state {key!r} of {name!r} has shape {list(st.shape)}, neither the "
                                   f"param's {list(t.shape)} nor a scalar: not an elementwise optimizer")
            offset += t.numel
        for name in names:
            missing = [k for k in keys if (*opt, "state", name, k) not in tensors_by_path]
            if missing:
                raise src.fail(f"{name!r} has no optimizer state {missing} while other params of group {g} "
                               "do (never stepped?); zero-ckpt needs every param of a group in the same state")
        groups.append(GroupMeta(
            numel=offset, partition_numel=0, align=1, params=tuple(params),
            state_keys=tuple(keys), hyperparams=hyper[g], scalars=scalars,
            state_dtypes={k: d for k, d in keys.items() if d != master_dtype},
        ))
    owned_set = set(owned)
    model_only = sorted(
        (p[len(model_root)], t) for p, t in tensors_by_path.items()
        if p[:len(model_root)] == model_root and len(p) == len(model_root) + 1
        and p[len(model_root)] not in owned_set
    )
    for name, t in model_only:
        jobs.append((("model", name), t, 0))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        located = list(pool.map(lambda job: _pieces(src, job[1], job[2]), jobs))
    state: dict[tuple[int, str], list[Extent]] = {}
    model: list[ModelTensor] = []
    zip_units: dict[tuple[str, str], tuple[int, int]] = {}
    for (where, t, _), (pieces, units) in zip(jobs, located):
        zip_units.update(units)
        if where[0] == "model":
            model.append(ModelTensor(where[1], t.dtype, t.shape, tuple(pieces)))
        else:
            state.setdefault(where, []).extend(pieces)

    files = sorted({e.file for ps, _ in located for e in ps}, key=_file_order)
    world = max(1, len(files))
    groups = [_with_partition(g, world) for g in groups]
    shards = tuple(FileMeta(f, loc.size(f), NO_CHECKSUM, rank=i) for i, f in enumerate(files))
    manifest = Manifest(
        world_size=world, zero_stage=0, master_dtype=master_dtype, groups=tuple(groups),
        shards=shards, created_by=f"torch.distributed.checkpoint {meta.version or ''}".strip(),
    )
    return SourceView(
        format="dcp", url=loc.url, manifest=manifest,
        state={k: tuple(sorted(v, key=lambda e: e.start)) for k, v in state.items()},
        model=tuple(model),
        checks=SourceChecksInfo(zip_units=zip_units),
        origin={"model_key": ".".join(map(str, model_root)), "optimizer_key": ".".join(map(str, opt))},
    )


def _with_partition(g: GroupMeta, world: int) -> GroupMeta:
    from dataclasses import replace

    from zero_core.layout import compute_partition_numel

    return replace(g, partition_numel=compute_partition_numel(g.numel, world, g.align))


def _file_order(path: str) -> tuple:
    m = _RANK_FILE.search(path)
    return (0, int(m.group(1)), int(m.group(2)), path) if m else (1, 0, 0, path)


def _key(src: DcpSource, path: tuple) -> str:
    for k, p in src.paths.items():
        if p == path:
            return k
    raise src.fail(f"has no entry {'.'.join(map(str, path))}")


def _model_root(src: DcpSource, tensors_by_path: dict, owned: list[str], opt: tuple) -> tuple:
    roots = {p[:-1] for p in tensors_by_path if p[-1] in owned and p[:len(opt)] != opt}
    candidates = [r for r in roots if all((*r, n) in tensors_by_path for n in owned)]
    if len(candidates) != 1:
        raise src.fail(
            "has no model state dict holding every param the optimizer names (save "
            "{'model': model_state_dict, 'optim': optim_state_dict}, as get_state_dict gives them)"
            if not candidates else
            f"has {len(candidates)} model state dicts holding the optimizer's params; zero-ckpt reads one"
        )
    return candidates[0]
