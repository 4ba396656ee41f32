"""A plain torch checkpoint as a :class:`~zero_ckpt.view.SourceView`, read by byte range.

``optimizer.pt`` (``optimizer.state_dict()``) is a ``torch.save`` zip: its pickle is rebuilt
without torch (:func:`zero_ckpt.formats.torch_zip.open_torch_zip`, tensors as
:class:`~zero_ckpt.formats.torch_zip.TensorRef`) and every state tensor located as one byte
range of its record. The masters come from ``model.safetensors`` (header entries) or
``model.pt`` (records), or, for one ``.pt`` training checkpoint, from its ``model`` entry. The
view lays each group's owned params end to end (format v1's flat layout) exactly as the torch
loader (:mod:`zero_ckpt.formats.torch_optim`) does, and records the same
``extra["torch_optimizer"]`` facts, so converting through the view writes the same shards.

What the view does not take (:class:`TorchViewError`, and ``convert`` imports with torch
instead): legacy non-zip files, compressed records, a model given apart from the source,
non-contiguous or non-elementwise state, scalars that differ between the params of a group
(params left at their constructor state included), state keys or dtypes that differ between
params of a group, tensor hyperparameters, 0-d params.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Mapping

from zero_ckpt.errors import CheckpointError
from zero_ckpt.formats.torch_files.detection import OPTIMIZER_FILE, is_torch_folder
from zero_ckpt.formats.torch_files.names import (
    MODEL_KEYS,
    MODEL_PT_FILE,
    OPTIMIZER_KEYS,
    PARAM_NAMES_FILE,
    TorchStateDictError,
    check_optimizer_state,
    first_entry,
    read_names,
    resolve_names,
    split_url,
)
from zero_ckpt.manifest import MODEL_FILE_NAME, FileMeta, GroupMeta, Manifest, ParamMeta
from zero_ckpt.safetensors_format import DTYPE_SIZES
from zero_ckpt.storage import Location, open_location
from zero_ckpt.view import NO_CHECKSUM, Extent, ModelTensor, SourceView

__all__ = ["TorchViewError", "ALIGN", "EXTRA_KEY", "torch_view", "view_files", "source_files"]

#: Partition alignment of the groups (``zero_core.optimizer.DEFAULT_ALIGN``, what the torch
#: loader uses; a test holds them equal; importing it here would import torch).
ALIGN = 64
EXTRA_KEY = "torch_optimizer"
_EXTRA_VERSION = 1
_FLOATS = ("float64", "float32", "bfloat16", "float16")


class TorchViewError(TorchStateDictError):
    """A plain torch checkpoint the streaming view does not take (``convert`` loads it with
    torch instead); the message says why."""


def source_files(loc: Location) -> tuple[str, str | None, Any]:
    """``(optimizer file, model file or None, names file or None)`` relative to ``loc`` for a
    torch folder; a single ``.pt`` file is ``("", None, None)`` (``loc`` is the file)."""
    if not is_torch_folder(loc):
        if loc.is_file():
            return "", None, None
        raise TorchViewError(
            f"{loc.url} is not a torch checkpoint folder (no {OPTIMIZER_FILE}) nor a .pt file",
            path=loc.url,
        )
    candidates = [f for f in (MODEL_FILE_NAME, MODEL_PT_FILE) if loc.exists(f)]
    if len(candidates) != 1:
        raise TorchViewError(
            f"{loc.url} holds {' and '.join(candidates) or 'no model file'}; a torch checkpoint "
            f"folder needs exactly one of {MODEL_FILE_NAME} or {MODEL_PT_FILE} next to "
            f"{OPTIMIZER_FILE} (or pass model=... / --model)",
            path=loc.url,
        )
    names = PARAM_NAMES_FILE if loc.exists(PARAM_NAMES_FILE) else None
    return OPTIMIZER_FILE, candidates[0], names


def view_files(view: SourceView) -> tuple[str, ...]:
    """The ``torch.save`` zip files the view reads (for the zip CRC-32 precheck)."""
    return tuple(f.path for f in view.files if not f.path.endswith(".safetensors"))


class _Model:
    """The model state dict's entries: ``name -> (dtype, shape, file, byte_start, alias key)``."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, tuple[int, ...], str, int, Any]] = {}


def _zip(loc: Location, rel: str) -> Any:
    from zero_ckpt.formats.torch_zip import open_torch_zip

    url = loc.url_of(rel)
    if loc.read_range(rel, 0, 4)[:4] != b"PK\x03\x04":
        raise TorchViewError(
            f"{url} is not a torch.save zip file (a legacy pre-1.6 torch file?); it is read by "
            "loading it with torch",
            path=url,
        )
    zf = open_torch_zip(loc, rel)
    if zf.compressed:
        raise TorchViewError(f"{url}: record {zf.compressed[0][:100]!r} is compressed", path=url)
    return zf


def _tensor_entries(zf: Any, state: Mapping, what: str, out: _Model) -> None:
    from zero_ckpt.formats.torch_zip import TensorRef

    for name, t in state.items():
        if not isinstance(name, str):
            raise TorchViewError(f"{what}: model state dict key {name!r} is not a string")
        if not isinstance(t, TensorRef) or t.dtype not in DTYPE_SIZES:
            raise TorchViewError(f"{what}: model entry {name!r} is not a tensor format v1 stores")
        if not t.is_contiguous():
            raise TorchViewError(f"{what}: model entry {name!r} is stored non-contiguously")
        start, _ = zf.tensor_range(t, f"model entry {name!r}")
        key = (t.storage.key, t.offset, t.shape, t.stride, t.dtype) if t.numel else None
        out.entries[name] = (t.dtype, tuple(t.shape), zf.rel, start, key)


def _read_model(loc: Location, rel: str) -> _Model:
    out = _Model()
    if rel.endswith(".safetensors"):
        from zero_ckpt.opening import read_header

        header, _ = read_header(loc, rel, loc.size(rel))
        for e in header.tensors.values():
            out.entries[e.name] = (e.dtype, tuple(e.shape), rel, e.start, None)
        return out
    zf = _zip(loc, rel)
    obj = zf.load()
    state = first_entry(obj, MODEL_KEYS) if isinstance(obj, Mapping) else None
    if state is None:
        state = obj
    if not isinstance(state, Mapping):
        raise TorchViewError(f"{loc.url_of(rel)} holds no model state dict")
    _tensor_entries(zf, state, loc.url_of(rel), out)
    return out


def _scalar_of(value: Any) -> tuple[Any, dict[str, Any]]:
    """A scalar state value as a JSON number plus how torch held it (as the torch loader)."""
    if isinstance(value, tuple):  # (number, TensorRef) read from a one-element tensor
        number, t = value
        kind: dict[str, Any] = {"dtype": t.dtype, "shape": list(t.shape)}
    else:
        number, kind = value, {"python": type(value).__name__}
    if isinstance(number, float) and number.is_integer() and "dtype" in kind:
        number = int(number)
    return number, kind


def _jsonable(gi: int, key: str, value: Any, tuples: list[str]) -> Any:
    def convert(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float) and math.isfinite(v):
            return v
        raise TorchViewError(
            f"param_groups[{gi}] hyperparameter {key!r} is {type(v).__name__} {v!r:.60}, which the "
            "view does not take"
        )

    if isinstance(value, tuple):
        tuples.append(key)
    return convert(value)


def torch_view(loc: Location, param_names: Any = None) -> SourceView:
    """The plain torch checkpoint at ``loc`` (a folder with ``optimizer.pt`` + model file, or
    one ``.pt`` training checkpoint) as a source view; :class:`TorchViewError` (or the error
    naming a damaged file) when it cannot be one. ``param_names``: names (a list, one list per
    group, or the URL of a JSON list) overriding ``param_names.json``."""
    from zero_ckpt.formats.torch_zip import TensorRef

    opt_rel, model_rel, names_rel = source_files(loc)
    zf = _zip(loc, opt_rel)
    url = zf.url
    obj = zf.load()
    if model_rel is None:  # one training checkpoint
        if not isinstance(obj, Mapping) or ("state" in obj and "param_groups" in obj):
            raise TorchViewError(f"{url} holds an optimizer state dict alone; give model=", path=url)
        osd = first_entry(obj, OPTIMIZER_KEYS)
        msd = first_entry(obj, MODEL_KEYS)
        if osd is None or msd is None:
            raise TorchViewError(f"{url} holds no optimizer and model state dicts", path=url)
        model = _Model()
        _tensor_entries(zf, msd, url, model)
    else:
        osd = obj
        model = _read_model(loc, model_rel)
    if isinstance(param_names, str):
        parent, name = split_url(param_names)
        with open_location(parent) as nloc:
            param_names = read_names(nloc, name)
    elif param_names is None and names_rel is not None:
        param_names = read_names(loc, names_rel)
    state, groups = check_optimizer_state(osd, url)
    names = resolve_names(param_names, groups)

    def scalar(v: Any, what: str) -> Any:
        if isinstance(v, TensorRef):
            return (zf.read_scalar(v, what), v)
        return v

    plans = []
    owned_all: dict[str, tuple[str, tuple[int, ...]]] = {}
    for gi, group in enumerate(groups):
        tuples: list[str] = []
        hyper = {}
        for k, v in group.items():
            if k in ("params", "param_names"):
                continue
            if isinstance(v, TensorRef):
                raise TorchViewError(f"param_groups[{gi}] hyperparameter {k!r} is a tensor")
            hyper[k] = _jsonable(gi, k, v, tuples)
        gnames = names[gi]
        for n in gnames:
            entry = model.entries.get(n)
            if entry is None or entry[0] not in _FLOATS or not entry[1]:
                raise TorchViewError(
                    f"param {n!r} (param_groups[{gi}]) is {'missing from' if entry is None else 'not a float tensor of'} "
                    "the model state dict or 0-d"
                )
        states: dict[str, dict[str, Any]] = {}
        tensor_keys: dict[str, bool] = {}
        for pid, n in zip(group["params"], gnames):
            shape = model.entries[n][1]
            st = {k: v for k, v in state.get(pid, {}).items() if v is not None}
            for k, v in st.items():
                if not isinstance(k, str):
                    raise TorchViewError(f"state of param {n!r} has a non-string key {k!r}")
                if isinstance(v, (bool, int, float)):
                    is_tensor = False
                elif isinstance(v, TensorRef) and tuple(v.shape) == shape:
                    is_tensor = True
                elif isinstance(v, TensorRef) and v.numel == 1 and len(v.shape) <= 1:
                    is_tensor = False
                else:
                    raise TorchViewError(
                        f"state {k!r} of param {n!r} is not a param-shaped tensor nor a scalar "
                        "(non-elementwise optimizer, or param names out of order)"
                    )
                if tensor_keys.setdefault(k, is_tensor) != is_tensor:
                    raise TorchViewError(f"state {k!r} of param_groups[{gi}] is a tensor for some params only")
            states[n] = st
        stateful = [n for n in gnames if states[n]]
        owned = stateful or list(gnames)
        keys: list[str] = []
        scalars: dict[str, Any] = {}
        scalar_types: dict[str, Any] = {}
        sig = None
        for n in stateful:
            values = {k: _scalar_of(scalar(v, f"state {k!r} of {n!r}")) for k, v in states[n].items()
                      if not tensor_keys[k]}
            mine = json.dumps({k: v[0] for k, v in values.items()}, sort_keys=True)
            if sig is None:
                sig = mine
                keys = [k for k in states[n] if tensor_keys[k]]
                for k, (number, kind) in values.items():
                    scalars[k], scalar_types[k] = number, kind
            elif mine != sig:
                raise TorchViewError(
                    f"params of param_groups[{gi}] disagree on their scalar state ({sig} vs {mine} for {n!r})"
                )
            if sorted(k for k in states[n] if tensor_keys[k]) != sorted(keys):
                raise TorchViewError(f"params of param_groups[{gi}] have different state keys")
        dtypes: dict[str, str] = {}
        for n in stateful:
            for k in keys:
                d = states[n][k].dtype
                if d not in DTYPE_SIZES or dtypes.setdefault(k, d) != d:
                    raise TorchViewError(f"state {k!r} of param_groups[{gi}] mixes dtypes or has an unsupported one")
        for n in owned:
            owned_all[n] = model.entries[n][:2]
        plans.append((gnames, owned, keys, dtypes, hyper, scalars, scalar_types, tuples, states))

    master_dtype = "float64" if any(d == "float64" for d, _ in owned_all.values()) else "float32"
    state_extents: dict[tuple[int, str], list[Extent]] = {}
    group_metas = []
    records = []
    alias_of = {}
    for n in owned_all:
        key = model.entries[n][4]
        if key is not None:
            alias_of.setdefault(key, n)
    aliases: dict[str, list[str]] = {}
    model_only = []
    for n, (dtype, shape, file, start, key) in model.entries.items():
        if n in owned_all:
            continue
        target = alias_of.get(key) if key is not None else None
        if target is not None:
            aliases.setdefault(target, []).append(n)
        else:
            model_only.append(ModelTensor.whole(n, dtype, shape, file, start, n))
    for gi, (gnames, owned, keys, dtypes, hyper, scalars, scalar_types, tuples, states) in enumerate(plans):
        params, offset = [], 0
        for n in owned:
            dtype, shape, file, start, _ = model.entries[n]
            numel = math.prod(shape)
            params.append(ParamMeta(n, shape, dtype, offset, tuple(aliases.get(n, ()))))
            state_extents.setdefault((gi, "master"), []).append(
                Extent(offset, offset + numel, file, start, dtype, n, 0))
            for k in keys:
                t = states[n][k]
                b, _ = zf.tensor_range(t, f"state {k!r} of {n!r}")
                state_extents.setdefault((gi, k), []).append(
                    Extent(offset, offset + numel, zf.rel, b, t.dtype, f"{n}.{k}", 0))
            offset += numel
        g = GroupMeta(numel=offset, partition_numel=0, align=ALIGN, params=tuple(params),
                      state_keys=tuple(keys), hyperparams=hyper, scalars=scalars,
                      state_dtypes={k: d for k, d in dtypes.items() if d != master_dtype})
        group_metas.append(replace(g, partition_numel=g.layout(1).partition_numel))
        rec: dict[str, Any] = {"params": list(gnames)}
        if scalar_types:
            rec["scalar_types"] = scalar_types
        if tuples:
            rec["tuple_hyperparams"] = tuples
        records.append(rec)
    shards = (FileMeta(zf.rel, loc.size(zf.rel), NO_CHECKSUM, rank=0),)
    model_file = FileMeta(model_rel, loc.size(model_rel), NO_CHECKSUM) if model_rel else None
    manifest = Manifest(
        world_size=1, zero_stage=0, master_dtype=master_dtype, groups=tuple(group_metas),
        shards=shards, model_file=model_file,
        extra={EXTRA_KEY: {"version": _EXTRA_VERSION, "groups": records}},
        created_by="torch.save",
    )
    return SourceView(
        format="torch", url=loc.url, manifest=manifest,
        state={k: tuple(v) for k, v in state_extents.items()},
        model=tuple(sorted(model_only, key=lambda t: (t.pieces[0].file, t.pieces[0].byte_start, t.name))),
    )


def precheck(loc: Location, view: SourceView) -> None:
    """Plain torch files record no checksums of their own: every zip record the view reads is
    checked against its CRC-32 before an output is committed."""
    from zero_ckpt.formats.torch_zip import verify_record_crcs

    files = list(view_files(view))
    # one file per thread: zlib's CRC-32 releases the GIL
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(files) or 1))) as pool:
        list(pool.map(lambda rel: verify_record_crcs(loc, rel), files))


def verify(loc: Location, report: Any, chunk: int, progress: Any, workers: int | None = None) -> Any:
    """``zero-ckpt verify``: the structure (the view built: pickles rebuilt, every tensor
    located in its record), then every record of the ``torch.save`` files compared with the zip
    CRC-32 torch stores in it; a safetensors model file is read whole (it has no checksums)."""
    from zero_ckpt.errors import Problem
    from zero_ckpt.formats.torch_zip import crc_failure_message, zip_crc_failures
    from zero_ckpt.transfer import ProgressTracker

    report.format, report.method = "torch", "zip-crc32"
    try:
        view = torch_view(loc)
    except CheckpointError as exc:
        report.problems.append(Problem(exc.path or loc.url, str(exc), "structure", exc.rank))
        return report
    report.manifest = view.manifest
    files = [f.path for f in view.files]
    tracker = ProgressTracker(progress, sum(loc.size(f) for f in files))
    buf = bytearray(max(1, chunk))
    for rel in files:
        url = loc.url_of(rel)
        try:
            if rel in view_files(view):
                bad = zip_crc_failures(loc, rel, chunk, tracker.add)
                if bad:
                    report.problems.append(Problem(url, f"{url}: {crc_failure_message(bad)}", "checksum"))
            else:
                size, pos = loc.size(rel), 0
                while pos < size:
                    n = min(len(buf), size - pos)
                    loc.read_into(rel, pos, memoryview(buf)[:n])
                    tracker.add(n)
                    pos += n
        except CheckpointError as exc:
            report.problems.append(Problem(exc.path or url, str(exc), "size"))
            continue
        report.bytes_checked += loc.size(rel)
        report.files_checked += 1
    report.notes.append(
        "torch checkpoint: structure checked, and every record of its torch.save files compared "
        "with the zip CRC-32 torch stores in it (plain torch files record no checksums of their "
        "own; convert it to get zero-ckpt's)"
    )
    return report
