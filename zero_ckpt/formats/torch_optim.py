"""Plain PyTorch optimizer state dicts in and out of format v1.

**Import** (:func:`import_torch`, :func:`import_torch_files`): the state dict a non-sharded
``torch.optim`` optimizer saves (``{"state": {id: {...}}, "param_groups": [{..., "params":
[ids]}]}``), or what ``ZeroRedundancyOptimizer.consolidate_state_dict()`` /
``ZeroOptimizer.consolidate_state_dict()`` produce (the same shape), plus the model state dict,
become a format-v1 checkpoint at any world size.

- *Names.* A torch state dict keys params by integer id only. Names come, in this order of
  preference, from ``param_names`` (a flat list with one name per entry of the groups'
  ``params`` lists in group order, i.e. id order; or one list per group; or an ``nn.Module``,
  whose ``named_parameters()`` order is id order when the optimizer was built from
  ``model.parameters()``), or from the groups' own ``param_names`` lists (torch >= 2.6
  optimizers built from ``model.named_parameters()``, ``ZeroOptimizer`` built with names). The
  model state dict's key order is never used: buffers interleave with parameters there, so it
  is ambiguous, and such input is refused with a message saying how to pass names.
- *What the optimizer owns.* Per group, every param whose state has been stepped becomes a
  flat-buffer param: its master is the model value as fp32 (float64 if the model holds float64
  params), each param-shaped state tensor a state key, every 0-d / Python-number state a group
  scalar (``step``: all stepped params of a group must agree, or the import is refused).
  A param the optimizer never stepped while others of its group were (no state at all, or
  only the state a constructor makes, such as Adagrad's ``step`` 0 and constant ``sum``) is
  stored like a frozen param: its value in ``model.safetensors``, its place in the group and
  its constructor state (constants) in ``manifest.extra["torch_optimizer"]``. We neither
  zero-fill (Adam with ``step`` N and zero moments is not the state the param had) nor refuse
  (every model with a frozen param in its optimizer would be refused): this keeps the
  round trip exact. If no param of a group has state (never stepped), all are owned.
- *Model.* State dict entries the optimizer does not own (buffers, frozen and unstepped
  params) go to ``model.safetensors``; an entry sharing its storage with an owned param (a
  tied weight) is recorded as that param's alias.
- *Exactness facts* that JSON would lose (tuple hyperparameters such as ``betas``, ``step`` as
  a 0-d float32 tensor, per-param state dtypes in a group mixing dtypes) are recorded in
  ``manifest.extra["torch_optimizer"]`` so the export restores them bit for bit.

**Export** (:func:`export_torch`): ``optimizer.pt`` holding a plain torch state dict keyed
exactly as a non-sharded optimizer over the same param groups keys it (ids in group order
counting frozen params, state tensors shaped like the params, ``step`` as torch stores it,
hyperparameters, ``params`` id lists, and ``param_names`` lists, which
``Optimizer.load_state_dict`` accepts), and the model state dict as ``model.safetensors``
(streamed, bounded memory, as ``consolidate``) or ``model.pt``.

**File conventions** (:func:`import_torch_files`, ``zero-ckpt convert --from-format torch``):
the source is either

- a folder holding ``optimizer.pt`` and one of ``model.safetensors`` / ``model.pt``, and
  optionally ``param_names.json`` (a JSON list of names in id order, or one list per group);
  this is also what :func:`export_torch` writes, so an export imports again as is; or
- one ``.pt``/``.pth`` file: a training checkpoint dict holding the optimizer state dict under
  ``optimizer`` / ``optimizer_state_dict`` / ``optim`` and the model's under ``model`` /
  ``model_state_dict`` / ``state_dict``, or an optimizer state dict alone (then give
  ``model=``).

``.pt`` files are read with ``torch.load(weights_only=True)`` (local files memory-mapped):
nothing in them is executed, and a file holding other objects is refused by name.
"""

from __future__ import annotations

import bisect
import io
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from zero_ckpt.checksum import crc32c, parse_checksum
from zero_ckpt.errors import CheckpointError, CorruptShardError, LayoutMismatchError
from zero_ckpt.formats.torch_files.detection import OPTIMIZER_FILE as TORCH_OPTIMIZER_FILE, is_torch_folder
from zero_ckpt.formats.torch_files.names import (
    MODEL_KEYS as _MODEL_KEYS,
    MODEL_PT_FILE,
    NAMES_HOWTO as _NAMES_HOWTO,
    OPTIMIZER_KEYS as _OPTIMIZER_KEYS,
    PARAM_NAMES_FILE,
    TorchStateDictError,
    check_optimizer_state as _check_optimizer_state,
    first_entry as _first_entry,
    read_names as _read_names,
    resolve_names,
    split_url as _split_url,
)
from zero_ckpt.view import SourceView
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
from zero_ckpt.safetensors_format import DTYPE_SIZES, SafetensorsHeader, dtype_size
from zero_ckpt.destination import prepare_destination
from zero_ckpt.storage import Location, open_location

__all__ = [
    "OPTIMIZER_FILE",
    "MODEL_PT_FILE",
    "PARAM_NAMES_FILE",
    "EXTRA_KEY",
    "TorchStateDictError",
    "import_torch",
    "import_torch_files",
    "export_torch",
    "build_torch_state_dict",
    "is_torch_folder",
]

OPTIMIZER_FILE = TORCH_OPTIMIZER_FILE
#: ``manifest.extra`` key of what the torch round trip needs beyond the v1 fields.
EXTRA_KEY = "torch_optimizer"
_EXTRA_VERSION = 1
_VERSION = "0.1.0"
# State keys that are scalars even where every param is 0-d (so shapes cannot tell).
_SCALAR_STATE_KEYS = {"step", "eta", "mu"}
# Hyperparameters torch keeps as tuples, for checkpoints without the record (ZeroOptimizer's).
_TUPLE_HYPERPARAMS = {"betas", "etas", "step_sizes"}
_FLOATS = ("float64", "float32", "bfloat16", "float16")


# ----- small helpers -----------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _scalar_dtype() -> torch.dtype:
    # What torch.optim uses for ``step`` (torch.optim.optimizer._get_scalar_dtype).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _is_number(v: Any) -> bool:
    return isinstance(v, (bool, int, float)) and not isinstance(v, torch.Tensor)


def _finite(v: Any) -> bool:
    return not (isinstance(v, float) and not math.isfinite(v))


def _widest(dtypes: set[str]) -> str | None:
    """One flat dtype that holds every value of ``dtypes`` exactly (None: no such dtype)."""
    if len(dtypes) == 1:
        return next(iter(dtypes))
    if not dtypes <= set(_FLOATS):
        return None
    return "float64" if "float64" in dtypes else "float32"


def _storage_key(t: torch.Tensor) -> tuple | None:
    if t.numel() == 0:
        return None
    storage = t.untyped_storage().data_ptr()
    return (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


# ----- reading the input -------------------------------------------------------------------------


def _resolve_names(param_names: Any, groups: list[dict]) -> list[list[str]]:
    if isinstance(param_names, torch.nn.Module):
        flat = [n for n, _ in param_names.named_parameters()]
        total = sum(len(g["params"]) for g in groups)
        if len(flat) != total:
            raise TorchStateDictError(
                f"the model has {len(flat)} parameters but the optimizer's param groups list "
                f"{total} params: its named_parameters() order cannot be the id order; "
                "pass param_names as a list of names in id order instead"
            )
        param_names = flat
    return resolve_names(param_names, groups)


def _model_tensors(model_state: Any) -> dict[str, torch.Tensor]:
    if isinstance(model_state, torch.nn.Module):
        model_state = model_state.state_dict()
    if not isinstance(model_state, Mapping):
        raise TorchStateDictError(
            f"model_state must be a model state dict (model.state_dict()) or a module, got "
            f"{type(model_state).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    for name, t in model_state.items():
        if not isinstance(name, str):
            raise TorchStateDictError(f"model state dict key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise TorchStateDictError(
                f"model state dict entry {name!r} is a {type(t).__name__}, not a tensor; "
                "model.safetensors holds tensors only: drop it from the state dict"
            )
        if t.is_sparse or _dtype_name(t.dtype) not in DTYPE_SIZES:
            raise TorchStateDictError(
                f"model state dict entry {name!r} is a {'sparse ' if t.is_sparse else ''}"
                f"{_dtype_name(t.dtype)} tensor, which format v1 cannot store"
            )
        out[name] = t.detach()
    return out


# ----- analysis: what each group holds -----------------------------------------------------------


@dataclass
class _OwnedParam:
    name: str
    value: torch.Tensor  # the model tensor (master source)
    states: dict[str, torch.Tensor]


@dataclass
class _GroupPlan:
    names: list[str]
    owned: list[_OwnedParam] = field(default_factory=list)
    state_keys: list[str] = field(default_factory=list)
    flat_dtypes: dict[str, str] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    scalar_types: dict[str, dict[str, Any]] = field(default_factory=dict)
    hyperparams: dict[str, Any] = field(default_factory=dict)
    tuple_hyperparams: list[str] = field(default_factory=list)
    tensor_hyperparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    frozen: dict[str, dict[str, Any]] = field(default_factory=dict)
    param_state_dtypes: dict[str, dict[str, str]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"params": list(self.names)}
        optional = (
            "frozen", "scalar_types", "tuple_hyperparams", "tensor_hyperparams", "param_state_dtypes"
        )
        for key in optional:
            value = getattr(self, key)
            if value:
                rec[key] = value
        return rec


def _scalar_of(value: Any) -> tuple[Any, dict[str, Any]]:
    """A scalar state value as a JSON number plus how torch held it."""
    if isinstance(value, torch.Tensor):
        number = value.item()
        kind: dict[str, Any] = {"dtype": _dtype_name(value.dtype), "shape": list(value.shape)}
    else:
        number = value
        kind = {"python": type(value).__name__}
    if isinstance(number, float) and number.is_integer() and "dtype" in kind:
        number = int(number)  # {"step": 12}, as ZeroOptimizer checkpoints hold it
    return number, kind


def _restore_scalar(value: Any, kind: Mapping[str, Any] | None, key: str) -> Any:
    if kind is None:  # no record (a ZeroOptimizer checkpoint): torch.optim's own convention
        if key == "step":
            return torch.tensor(float(value), dtype=_scalar_dtype())
        return value
    if "python" in kind:
        return {"int": int, "float": float, "bool": bool}.get(kind["python"], lambda v: v)(value)
    return torch.tensor(value, dtype=_torch_dtype(kind["dtype"])).reshape(kind["shape"])


def _value_kind(value: Any, shape: tuple[int, ...]) -> str:
    """``tensor`` (per element, shaped like the param), ``scalar``, ``either`` (0-d param and
    0-d value: decided by the key's kind elsewhere) or ``bad``."""
    if _is_number(value):
        return "scalar"
    if not isinstance(value, torch.Tensor):
        return "bad"
    if tuple(value.shape) == shape:
        return "either" if value.numel() == 1 and value.dim() == 0 else "tensor"
    return "scalar" if value.numel() == 1 and value.dim() <= 1 else "bad"


def _constant_record(t: torch.Tensor) -> dict[str, Any] | None:
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return {"fill": 0, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
    first = flat[0].item()
    if not _finite(first) or not torch.equal(flat, torch.full_like(flat, first)):
        return None
    return {"fill": first, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}


def _encode_initial(value: Any, per_element: bool) -> dict[str, Any]:
    """The JSON record of one constructor-made state value of a param the optimizer never
    stepped: ``{"fill", "dtype", "shape"}`` for a constant tensor, ``{"value", "kind"}`` for a
    scalar (see :func:`_restore_initial`)."""
    if per_element:
        record = _constant_record(value)
        if record is None:  # the caller passes constant tensors only
            raise TorchStateDictError("internal: a non-constant initial state reached the record")
        return record
    number, kind = _scalar_of(value)
    return {"value": number, "kind": kind}


def _jsonable(gi: int, key: str, value: Any, plan: _GroupPlan) -> Any:
    def fail(what: str) -> TorchStateDictError:
        return TorchStateDictError(
            f"param_groups[{gi}] hyperparameter {key!r} is {what}, which the checkpoint "
            "manifest (JSON) cannot hold; use numbers, strings, booleans, None or lists of them"
        )

    def convert(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            raise fail(f"a tensor of shape {list(v.shape)} inside a list")
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            if not _finite(v):
                raise fail(f"{v!r} (not finite)")
            return v
        raise fail(f"a {type(v).__name__}")

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise fail(f"a tensor of {value.numel()} elements")
        plan.tensor_hyperparams[key] = {"dtype": _dtype_name(value.dtype), "shape": list(value.shape)}
        return convert(value.item())
    if isinstance(value, tuple):
        plan.tuple_hyperparams.append(key)
    return convert(value)


def _analyse_group(
    gi: int,
    group: dict,
    names: list[str],
    state: dict[int, Mapping],
    model: dict[str, torch.Tensor],
) -> _GroupPlan:
    plan = _GroupPlan(names=list(names))
    for key, value in group.items():
        if key in ("params", "param_names"):
            continue
        plan.hyperparams[key] = _jsonable(gi, key, value, plan)
    ids = list(group["params"])
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        t = model.get(name)
        if t is None:
            raise TorchStateDictError(
                f"param {name!r} (param_groups[{gi}]) is not in the model state dict; param names "
                f"must be keys of model.state_dict() in the optimizer's id order ({_NAMES_HOWTO})"
            )
        if _dtype_name(t.dtype) not in _FLOATS:
            raise TorchStateDictError(
                f"param {name!r} is {_dtype_name(t.dtype)}; an optimizer steps floating point "
                "params only (is the name order right?)"
            )
        shapes[name] = tuple(t.shape)

    # Per param: its non-None state, each value classified.
    states: dict[str, dict[str, Any]] = {}
    key_kinds: dict[str, set[str]] = {}
    for pid, name in zip(ids, names):
        st = {k: v for k, v in state.get(pid, {}).items() if v is not None}
        for k, v in st.items():
            if not isinstance(k, str):
                raise TorchStateDictError(f"state of param {name!r} has a non-string key {k!r}")
            kind = _value_kind(v, shapes[name])
            if kind == "bad":
                got = (
                    f"shape {list(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
                )
                raise TorchStateDictError(
                    f"state {k!r} of param {name!r} (param_groups[{gi}], id {pid}) is {got} but the "
                    f"param has shape {list(shapes[name])} in the model state dict: either the "
                    "param names are not in the optimizer's id order (check param_names), or the "
                    "optimizer keeps non-elementwise state (factored or per-tensor, as Adafactor, "
                    "LAMB or Shampoo do), which format v1 cannot partition; use an elementwise "
                    "optimizer (Adam, AdamW, SGD, Adagrad, RMSprop, ...)"
                )
            key_kinds.setdefault(k, set()).add(kind)
        states[name] = st

    def is_tensor_key(k: str) -> bool:
        kinds = key_kinds[k] - {"either"}
        if len(kinds) > 1:
            raise TorchStateDictError(
                f"state {k!r} of param_groups[{gi}] is a param-shaped tensor for some params and a "
                "scalar for others; the optimizer is not elementwise or the state dict is damaged"
            )
        return kinds == {"tensor"} if kinds else k not in _SCALAR_STATE_KEYS

    tensor_keys = {k for k in key_kinds if is_tensor_key(k)}

    def scalars_of(name: str) -> dict[str, Any]:
        return {k: _scalar_of(v)[0] for k, v in states[name].items() if k not in tensor_keys}

    stateful = [n for n in names if states[n]]
    if not stateful:  # never stepped: every param is owned, with no state yet
        plan.owned = [_OwnedParam(n, model[n], {}) for n in names]
        return plan

    # Stepped params agree on their scalars; params still at the constructor's state (step 0,
    # constant tensors) or without state are not owned: see the module docstring.
    by_scalars: dict[str, list[str]] = {}
    for n in stateful:
        by_scalars.setdefault(json.dumps(scalars_of(n), sort_keys=True), []).append(n)
    initial: set[str] = set()

    def at_constructor_state(members: list[str], values: dict[str, Any]) -> bool:
        constant = all(
            _constant_record(states[m][k]) is not None
            for m in members
            for k in states[m]
            if k in tensor_keys
        )
        return bool(values) and all(v == 0 for v in values.values()) and constant

    if len(by_scalars) > 1:
        for sig, members in by_scalars.items():
            if at_constructor_state(members, json.loads(sig)):
                initial.update(members)
        stepped = [(ms[0], json.loads(sig)) for sig, ms in by_scalars.items() if ms[0] not in initial]
        if len(stepped) > 1:
            (a, sa), (b, sb) = stepped[:2]
            raise TorchStateDictError(
                f"params of param_groups[{gi}] disagree on their scalar state: {a!r} has {sa}, "
                f"{b!r} has {sb} (some were stepped fewer times, e.g. they got no gradient in "
                "some steps); format v1 keeps one step per group: put such params in a group of "
                "their own"
            )
    owned_names = [n for n in stateful if n not in initial]
    ref = owned_names[0]
    plan.state_keys = [k for k in states[ref] if k in tensor_keys]
    for k, v in states[ref].items():
        if k not in tensor_keys:
            plan.scalars[k], plan.scalar_types[k] = _scalar_of(v)
    for name in names:
        st = states[name]
        if name not in owned_names:
            if st:
                plan.frozen[name] = {k: _encode_initial(v, k in tensor_keys) for k, v in st.items()}
            continue
        if sorted(k for k in st if k in tensor_keys) != sorted(plan.state_keys):
            raise TorchStateDictError(
                f"param {name!r} of param_groups[{gi}] has state {sorted(st)}, param {ref!r} has "
                f"{sorted(states[ref])}; every stepped param of a group needs the same state keys"
            )
        plan.owned.append(_OwnedParam(name, model[name], {k: st[k].detach() for k in plan.state_keys}))
    for k in plan.state_keys:
        dtypes = {_dtype_name(p.states[k].dtype) for p in plan.owned}
        unknown = sorted(dtypes - set(DTYPE_SIZES))
        if unknown:
            raise TorchStateDictError(
                f"state {k!r} of param_groups[{gi}] is {unknown[0]}, which format v1 cannot store"
            )
        flat = _widest(dtypes)
        if flat is None:
            raise TorchStateDictError(
                f"state {k!r} of param_groups[{gi}] has dtypes {sorted(dtypes)}, which cannot share "
                "one flat buffer; put params of different state dtypes in different groups"
            )
        plan.flat_dtypes[k] = flat
        for p in plan.owned:
            d = _dtype_name(p.states[k].dtype)
            if d != flat:
                plan.param_state_dtypes.setdefault(p.name, {})[k] = d
    return plan


@dataclass
class _ImportPlan:
    groups: list[_GroupPlan]
    master_dtype: str
    aliases: dict[str, list[str]]
    model_only: dict[str, torch.Tensor]


def _analyse(optimizer_state: Any, model_state: Any, param_names: Any, what: str) -> _ImportPlan:
    state, groups = _check_optimizer_state(optimizer_state, what)
    if param_names is None and isinstance(model_state, torch.nn.Module):
        if not all(isinstance(g.get("param_names"), (list, tuple)) for g in groups):
            param_names = model_state
    model = _model_tensors(model_state)
    names = _resolve_names(param_names, groups)
    plans = [_analyse_group(gi, g, names[gi], state, model) for gi, g in enumerate(groups)]
    owned = {p.name: p.value for plan in plans for p in plan.owned}
    master_dtype = "float64" if any(t.dtype == torch.float64 for t in owned.values()) else "float32"
    by_storage = {}
    for name, t in owned.items():
        key = _storage_key(t)
        if key is not None:
            by_storage.setdefault(key, name)
    aliases: dict[str, list[str]] = {}
    model_only: dict[str, torch.Tensor] = {}
    for name, t in model.items():
        if name in owned:
            continue
        target = by_storage.get(_storage_key(t)) if _storage_key(t) is not None else None
        if target is not None:
            aliases.setdefault(target, []).append(name)
        else:
            model_only[name] = t
    return _ImportPlan(plans, master_dtype, aliases, model_only)


# ----- writing format v1 -------------------------------------------------------------------------


def _build_manifest(
    plan: _ImportPlan, world_size: int, align: int, zero_stage: int, extra: dict
) -> Manifest:
    groups = []
    for gp in plan.groups:
        params, offset = [], 0
        for p in gp.owned:
            shape = tuple(p.value.shape)
            aliases = tuple(plan.aliases.get(p.name, ()))
            params.append(ParamMeta(p.name, shape, _dtype_name(p.value.dtype), offset, aliases))
            offset += math.prod(shape)
        groups.append(
            GroupMeta(
                numel=offset,
                partition_numel=0,
                align=align,
                params=tuple(params),
                state_keys=tuple(gp.state_keys),
                hyperparams=dict(gp.hyperparams),
                scalars=dict(gp.scalars),
                state_dtypes={k: d for k, d in gp.flat_dtypes.items() if d != plan.master_dtype},
            )
        )
    groups = [replace(g, partition_numel=g.layout(world_size).partition_numel) for g in groups]
    return Manifest(
        world_size=world_size,
        zero_stage=zero_stage,
        master_dtype=plan.master_dtype,
        groups=tuple(groups),
        shards=tuple(FileMeta(shard_path(r, world_size), 0, "", r) for r in range(world_size)),
        extra=extra,
        created_by=f"zero-ckpt {_VERSION}",
    )


def _rank_tensors(plan: _ImportPlan, manifest: Manifest, rank: int) -> dict[str, torch.Tensor]:
    """Rank's shard tensors, copied out of the per-param tensors (one shard in memory)."""
    out = {}
    for gi, (gp, gm) in enumerate(zip(plan.groups, manifest.groups)):
        lo, hi = gm.layout(manifest.world_size).real_range(rank)
        offsets = [p.offset for p in gm.params]
        first = max(bisect.bisect_right(offsets, lo) - 1, 0)
        for key in gm.keys:
            dtype = _torch_dtype(gm.dtype_of(key, manifest.master_dtype))
            pieces = []
            for meta, src in zip(gm.params[first:], gp.owned[first:]):
                if meta.offset >= hi:
                    break
                a, b = max(lo, meta.offset), min(hi, meta.offset + meta.numel)
                if a >= b:
                    continue
                t = src.value if key == "master" else src.states[key]
                pieces.append(t.reshape(-1)[a - meta.offset : b - meta.offset].to("cpu", dtype))
            out[tensor_name(gi, key)] = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype)
    return out


def _write(
    plan: _ImportPlan,
    src: Location | None,
    d: Location,
    world_size: int,
    align: int | None,
    zero_stage: int,
    extra: dict[str, Any],
    overwrite: bool,
    fsync: bool | None,
) -> Manifest:
    from zero_ckpt.writer import write_model_file, write_shard

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise LayoutMismatchError(f"target world size must be a positive integer, got {world_size!r}")
    if align is None:
        from zero_core.optimizer import DEFAULT_ALIGN

        align = DEFAULT_ALIGN
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise LayoutMismatchError(f"align must be a positive number of elements, got {align!r}")
    extra = dict(extra)
    extra[EXTRA_KEY] = {"version": _EXTRA_VERSION, "groups": [g.record() for g in plan.groups]}
    manifest = _build_manifest(plan, world_size, align, zero_stage, extra)
    try:  # refuse before touching the destination
        manifest.to_json()
    except (TypeError, ValueError) as exc:
        raise TorchStateDictError(f"the checkpoint metadata cannot be written as JSON ({exc})") from None
    prepare_destination(src, d, overwrite)
    written: list[str] = []
    try:
        shards = []
        for rank in range(world_size):
            tensors = _rank_tensors(plan, manifest, rank)
            shards.append(write_shard(d, manifest, rank, tensors, fsync=fsync))
            written.append(shards[-1].path)
            del tensors
        model_file = write_model_file(d, plan.model_only, fsync=fsync)
        if model_file is not None:
            written.append(model_file.path)
        manifest = replace(manifest, shards=tuple(shards), model_file=model_file).validate(
            d.url_of(MANIFEST_NAME)
        )
        d.write_atomic(MANIFEST_NAME, manifest.to_json().encode())
    except BaseException:
        for rel in written:
            d.remove(rel)
        raise
    return manifest


def import_torch(
    optimizer_state: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor] | torch.nn.Module,
    dst: str,
    *,
    world_size: int,
    param_names: Sequence[str] | Sequence[Sequence[str]] | torch.nn.Module | None = None,
    align: int | None = None,
    zero_stage: int = 0,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    fsync: bool | None = None,
) -> Manifest:
    """Write a plain torch optimizer state dict plus the model state as a format-v1 checkpoint
    of ``world_size`` shards at ``dst``; returns its manifest.

    ``optimizer_state``: ``optimizer.state_dict()`` of an elementwise ``torch.optim``
    optimizer (Adam, AdamW incl. amsgrad, SGD, Adagrad, RMSprop, ...) or the output of
    ``ZeroRedundancyOptimizer``/``ZeroOptimizer.consolidate_state_dict()``.
    ``model_state``: ``model.state_dict()`` or the module (then it also gives the names).
    ``param_names``: see the module docstring; refused when missing and the state dict records
    none. ``align``: partition alignment in elements (default: ``ZeroOptimizer``'s).
    ``zero_stage`` is recorded as is (0: the source was not sharded). ``extra``: user data
    stored under ``manifest.extra`` (JSON).

    Memory: the inputs are in memory already; this adds one rank's shard at a time. Every
    refusal (:class:`TorchStateDictError`) happens before ``dst`` is touched; shards go first,
    ``manifest.json`` last, and a failure removes what was written.
    """
    plan = _analyse(optimizer_state, model_state, param_names, "the optimizer state dict")
    meta = {**dict(extra or {}), "converted_from": {"format": "torch", "url": None, "world_size": 1}}
    with open_location(dst, storage_options) as d:
        return _write(plan, None, d, world_size, align, zero_stage, meta, overwrite, fsync)


# ----- the file convention -----------------------------------------------------------------------


def _torch_load(loc: Location, rel: str) -> Any:
    url = loc.url_of(rel)
    loc.size(rel)  # MissingShardError naming the URL
    from zero_ckpt.formats.torch_zip import check_torch_file

    check_torch_file(loc, rel)  # caps on the zip and its pickle, before torch.load spends memory
    try:
        path = loc.local_path(rel)
        if path is not None:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(io.BytesIO(loc.read_bytes(rel)), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds; name the file
        text = " ".join(str(exc).split())
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:  # torch's weights-only unpickler refused a class or function by name
            raise TorchStateDictError(
                f"{url}: holds {found.group(1)}, not only tensors and plain data, which zero-ckpt "
                "does not load (nothing from the file was executed); save only the state dicts "
                "(optimizer.state_dict(), model.state_dict())",
                path=url,
            ) from None
        detail = text.rsplit("WeightsUnpickler error: ", 1)[-1].split(" Check the doc")[0][:200]
        raise CorruptShardError(
            f"{url}: cannot read as a torch.save file ({type(exc).__name__}: {detail}); it is "
            "damaged or not a torch checkpoint",
            path=url,
        ) from None


def _load_model_file(loc: Location, rel: str) -> dict[str, torch.Tensor]:
    if rel.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load, load_file

        url = loc.url_of(rel)
        try:
            if loc.local_path(rel) is not None:
                loc.size(rel)
                return load_file(loc.path_of(rel))
            return st_load(loc.read_bytes(rel))
        except SafetensorError as exc:
            raise CorruptShardError(
                f"{url}: not a readable safetensors file ({exc})", path=url
            ) from None
    obj = _torch_load(loc, rel)
    for key in _MODEL_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    return obj


def _open_sources(
    src: str, model: str | None, param_names: Any, storage_options: dict[str, Any] | None
) -> tuple[Any, Any, Any, Location, bool]:
    """(optimizer state, model state, names, location of the source, whether it is a folder)
    for the file convention."""
    loc = open_location(src, storage_options)
    try:
        if is_torch_folder(loc):
            opt = _torch_load(loc, OPTIMIZER_FILE)
            candidates = [f for f in (MODEL_FILE_NAME, MODEL_PT_FILE) if loc.exists(f)]
            if model is None and len(candidates) != 1:
                raise TorchStateDictError(
                    f"{loc.url} holds {' and '.join(candidates) or 'no model file'}; a torch "
                    f"checkpoint folder needs exactly one of {MODEL_FILE_NAME} or {MODEL_PT_FILE} "
                    "next to optimizer.pt (or pass model=... / --model)",
                    path=loc.url,
                )
            if param_names is None and loc.exists(PARAM_NAMES_FILE):
                param_names = _read_names(loc, PARAM_NAMES_FILE)
            model_state = None if model is not None else _load_model_file(loc, candidates[0])
            folder = True
        else:
            folder = False
            if loc.exists() and not loc.is_file():
                raise CheckpointError(
                    f"{loc.url} has no {OPTIMIZER_FILE}: a plain torch checkpoint is a folder with "
                    f"{OPTIMIZER_FILE} and {MODEL_FILE_NAME} or {MODEL_PT_FILE} (+ {PARAM_NAMES_FILE}), "
                    "or one .pt file",
                    path=loc.url,
                )
            parent, name = _split_url(src)
            loc.close()
            loc = open_location(parent, storage_options)
            if not loc.exists(name):
                raise CheckpointError(
                    f"no torch checkpoint at {src}: expected a folder holding {OPTIMIZER_FILE} or a "
                    ".pt file",
                    path=src,
                )
            obj = _torch_load(loc, name)
            opt, model_state = obj, None
            if isinstance(obj, Mapping) and not ("state" in obj and "param_groups" in obj):
                opt = _first_entry(obj, _OPTIMIZER_KEYS)
                model_state = _first_entry(obj, _MODEL_KEYS)
                if opt is None:
                    raise TorchStateDictError(
                        f"{src}: holds neither an optimizer state dict nor one under "
                        f"{' / '.join(_OPTIMIZER_KEYS)} (keys: {sorted(map(str, obj))[:8]})",
                        path=src,
                    )
        if model is not None:
            mparent, mname = _split_url(model)
            with open_location(mparent, storage_options) as mloc:
                model_state = _load_model_file(mloc, mname)
        if model_state is None:
            raise TorchStateDictError(
                f"{src} holds the optimizer state but no model state; pass model=PATH (--model) "
                "with the model's state dict (.pt or .safetensors)",
                path=src,
            )
        if isinstance(param_names, str):
            nparent, nname = _split_url(param_names)
            with open_location(nparent, storage_options) as nloc:
                param_names = _read_names(nloc, nname)
        return opt, model_state, param_names, loc, folder
    except BaseException:
        loc.close()
        raise


def import_torch_files(
    src: str,
    dst: str,
    *,
    world_size: int = 1,
    model: str | None = None,
    param_names: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
    align: int | None = None,
    zero_stage: int = 0,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    fsync: bool | None = None,
) -> Manifest:
    """:func:`import_torch` from files (see the module docstring for the convention).

    ``src``: a folder with ``optimizer.pt`` + ``model.safetensors``/``model.pt`` (+
    ``param_names.json``), or one ``.pt`` file. ``model``: URL of the model state dict file
    (overrides the folder's). ``param_names``: names, or the URL of a JSON file of them.
    Memory: the files are memory-mapped when local (read whole when remote); the result is
    written one rank's shard at a time.
    """
    opt, model_state, names, loc, folder = _open_sources(src, model, param_names, storage_options)
    with loc:
        plan = _analyse(opt, model_state, names, src)
        info = {"converted_from": {"format": "torch", "url": src, "world_size": 1}}
        d_opts = storage_options if dst_storage_options is None else dst_storage_options
        with open_location(dst, d_opts) as d:
            # A source folder must not contain the destination (nor be it); a single file's
            # folder may (ckpt.pt -> ./ckpt-v1 next to it).
            source = loc if folder else None
            return _write(plan, source, d, world_size, align, zero_stage, info, overwrite, fsync)


# ----- export ------------------------------------------------------------------------------------


def _read_flat(loc: Location, view: SourceView, gi: int, key: str) -> torch.Tensor:
    """The whole unpadded flat tensor ``key`` of group ``gi``, read extent by extent, each
    stored tensor read whole checked against its recorded checksum when the format has one."""
    manifest = view.manifest
    g = manifest.groups[gi]
    stored = g.dtype_of(key, manifest.master_dtype)
    size = dtype_size(stored)
    recorded = {f.path: f for f in view.files}
    buf = bytearray(g.numel * size)
    for e in view.extents(gi, key, 0, g.numel):
        url = loc.url_of(e.file)
        if e.dtype != stored:
            raise CorruptShardError(
                f"{url}: {key} of group {gi} is stored as {e.dtype}, the metadata says {stored}; "
                "the checkpoint is inconsistent (run zero-ckpt verify)",
                path=url,
            )
        out = memoryview(buf)[e.start * size : e.stop * size]
        loc.read_into(e.file, e.byte_start, out)
        meta = recorded.get(e.file)
        expected = meta.tensors.get(e.tensor) if meta is not None and e.tensor else None
        if expected and e.tensor_offset == 0 and parse_checksum(expected) != crc32c(out):
            raise CorruptShardError(
                f"{url}: tensor {e.tensor} does not match its checksum in the manifest (corrupted); "
                "run zero-ckpt verify, or restore the shard",
                path=url, rank=meta.rank,
            )
    if not buf:
        return torch.empty(0, dtype=_torch_dtype(stored))
    return torch.frombuffer(buf, dtype=_torch_dtype(stored))


def _read_model_entries(loc: Location, view: SourceView) -> dict[str, torch.Tensor]:
    recorded = {f.path: f for f in view.files}
    out = {}
    for mt in view.model:
        data = bytearray(mt.nbytes)
        size = dtype_size(mt.dtype)
        for e in mt.pieces:
            piece = memoryview(data)[e.start * size : e.stop * size]
            loc.read_into(e.file, e.byte_start, piece)
            meta = recorded.get(e.file)
            expected = meta.tensors.get(e.tensor) if meta is not None and e.tensor else None
            if expected and e.tensor_offset == 0 and parse_checksum(expected) != crc32c(piece):
                url = loc.url_of(e.file)
                raise CorruptShardError(
                    f"{url}: tensor {e.tensor} does not match its checksum (corrupted)", path=url
                )
        dtype = _torch_dtype(mt.dtype)
        t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        out[mt.name] = t.reshape(mt.shape)
    return out


def _torch_record(manifest: Manifest) -> dict[str, Any] | None:
    rec = manifest.extra.get(EXTRA_KEY)
    if rec is None:
        return None
    groups = rec.get("groups") if isinstance(rec, dict) else None
    if (
        rec.get("version") != _EXTRA_VERSION
        or not isinstance(groups, list)
        or len(groups) != len(manifest.groups)
        or any(not isinstance(g, dict) or not isinstance(g.get("params"), list) for g in groups)
    ):
        raise TorchStateDictError(
            f"manifest extra[{EXTRA_KEY!r}] is not a version-{_EXTRA_VERSION} record with one entry "
            "per group; the checkpoint was written by another zero-ckpt or edited"
        )
    for gi, (g, gm) in enumerate(zip(groups, manifest.groups)):
        missing = [p.name for p in gm.params if p.name not in g["params"]]
        if missing:
            raise TorchStateDictError(
                f"manifest extra[{EXTRA_KEY!r}] group {gi} does not list param(s) {missing[:3]}; "
                "the checkpoint is inconsistent"
            )
    return rec


def _restore_hyperparams(gm: GroupMeta, rec: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tuples = set(rec.get("tuple_hyperparams", ())) if rec is not None else None
    tensors = rec.get("tensor_hyperparams", {}) if rec is not None else {}
    for key, value in gm.hyperparams.items():
        if key in tensors:
            kind = tensors[key]
            value = torch.tensor(value, dtype=_torch_dtype(kind["dtype"])).reshape(kind["shape"])
        elif isinstance(value, list) and (
            key in tuples if tuples is not None else key in _TUPLE_HYPERPARAMS
        ):
            value = tuple(value)
        out[key] = value
    return out


def _restore_initial(states: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, enc in states.items():
        if "fill" in enc:
            out[key] = torch.full(enc["shape"], enc["fill"], dtype=_torch_dtype(enc["dtype"]))
        else:
            out[key] = _restore_scalar(enc["value"], enc.get("kind"), key)
    return out


def build_torch_state_dict(
    loc: Location,
    view: SourceView,
    *,
    masters: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The plain torch optimizer state dict of a checkpoint (and, with ``masters``, each
    owned param's master, fp32, by name): see :func:`export_torch`. Reads one group's flat
    state at a time, checked against the source's checksums where it records them."""
    manifest = view.manifest
    rec = _torch_record(manifest)
    state: dict[int, dict[str, Any]] = {}
    param_groups: list[dict[str, Any]] = []
    master_values: dict[str, torch.Tensor] = {}
    next_id = 0
    for gi, gm in enumerate(manifest.groups):
        grec = rec["groups"][gi] if rec is not None else None
        names = list(grec["params"]) if grec is not None else [p.name for p in gm.params]
        owned = {p.name: p for p in gm.params}
        flats = {key: _read_flat(loc, view, gi, key) for key in gm.state_keys}
        master_flat = _read_flat(loc, view, gi, "master") if masters else None
        kinds = grec.get("scalar_types", {}) if grec is not None else {}
        per_param_dtypes = grec.get("param_state_dtypes", {}) if grec is not None else {}
        frozen = grec.get("frozen", {}) if grec is not None else {}
        ids = []
        for name in names:
            ids.append(next_id)
            p = owned.get(name)
            if p is None:
                if name in frozen:
                    state[next_id] = _restore_initial(frozen[name])
            else:
                if master_flat is not None:
                    master_values[name] = master_flat[p.offset : p.offset + p.numel].reshape(p.shape)
                if gm.state_keys or gm.scalars:
                    st: dict[str, Any] = {
                        k: _restore_scalar(v, kinds.get(k) if grec is not None else None, k)
                        for k, v in gm.scalars.items()
                    }
                    for key in gm.state_keys:
                        t = flats[key][p.offset : p.offset + p.numel].reshape(p.shape).clone()
                        want = per_param_dtypes.get(name, {}).get(key)
                        st[key] = t.to(_torch_dtype(want)) if want else t
                    state[next_id] = st
            next_id += 1
        del flats
        group = _restore_hyperparams(gm, grec)
        group["params"] = ids
        group["param_names"] = names
        param_groups.append(group)
    return {"state": state, "param_groups": param_groups}, master_values


class _Sink:
    """``torch.save`` target over a :class:`~zero_ckpt.storage.FileWriter` (streamed)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.writer.write(view)
        self.bytes += len(view)
        return len(view)

    def flush(self) -> None:
        pass


def _save(d: Location, rel: str, obj: Any, fsync: bool | None) -> int:
    with d.writer(rel) as w:
        sink = _Sink(w)
        torch.save(obj, sink)
        w.commit(fsync=fsync)
    return sink.bytes


def export_torch(
    src: str,
    out: str,
    *,
    from_format: str = "auto",
    model_format: str = "safetensors",
    dtype: str | None = None,
    max_shard_size: int | None = None,
    overwrite: bool = False,
    progress: Any = None,
    storage_options: dict[str, Any] | None = None,
    out_storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
) -> Any:
    """Write the checkpoint at ``src`` (format v1 or DeepSpeed ZeRO-1/2) as plain torch files
    in ``out``; returns a :class:`~zero_ckpt.consolidation.ConsolidateResult`.

    ``optimizer.pt``: ``{"state": {id: {...}}, "param_groups": [...]}`` keyed exactly as a
    non-sharded optimizer over the same param groups: ids in group order (frozen and unstepped
    params of an imported checkpoint keep their places and their constructor state), every
    state tensor shaped like its param, scalars as torch keeps them (``step``: 0-d float32
    tensor), hyperparameters (tuples restored), ``params`` id lists and ``param_names`` lists
    (``Optimizer.load_state_dict`` keeps them as group entries; torch >= 2.6 reads them as the
    group's names). A checkpoint saved by ``ZeroOptimizer`` records only its trainable params,
    so build the torch optimizer from those.

    ``model_format``: ``"safetensors"`` writes the model state as ``consolidate`` does
    (``model.safetensors`` or shards of ``max_shard_size`` + index, params in ``dtype`` or
    their model dtype, bounded memory, verified); ``"pt"`` writes ``model.pt`` (a state dict).

    Memory: ``torch.save`` needs the objects, so the whole optimizer state (and for ``"pt"``
    the model) is materialised in memory; it is built group by group from ranged reads (one
    group's flat state extra at a time) and streamed into the output file.
    """
    from zero_ckpt.consolidation import ConsolidateResult, consolidate
    from zero_ckpt.formats.registry import open_view, precheck, resolve

    if model_format not in ("safetensors", "pt"):
        raise CheckpointError(f"model_format must be 'safetensors' or 'pt', got {model_format!r}")
    if model_format == "pt" and max_shard_size is not None:
        raise CheckpointError("max_shard_size applies to model_format='safetensors' only")
    if dtype is not None and dtype not in _FLOATS:
        raise LayoutMismatchError(
            f"dtype {dtype!r} is not a floating dtype; choose one of {list(_FLOATS)}"
        )
    o_opts = storage_options if out_storage_options is None else out_storage_options
    with open_location(src, storage_options) as s, open_location(out, o_opts) as d:
        fmt = resolve(s, from_format)
        if fmt == "torch":
            raise CheckpointError(
                f"{src} is already a plain torch checkpoint; convert it to zero-ckpt first "
                "(zero-ckpt convert --from-format torch)",
                path=src,
            )
        view = open_view(s, fmt)
        manifest = view.manifest
        prepare_destination(s, d, overwrite)  # refuse early, before reading everything
        precheck(s, view)
        osd, masters = build_torch_state_dict(s, view, masters=model_format == "pt")
        files: list[str] = []
        total = 0
        try:
            if model_format == "safetensors":
                files += consolidate(
                    src, out, dtype=dtype, max_shard_size=max_shard_size,
                    overwrite=False, progress=progress, storage_options=storage_options,
                    out_storage_options=o_opts, workers=workers, chunk_bytes=chunk_bytes, fsync=fsync,
                    all_tied_names=True, from_format=fmt,
                ).files
                total += sum(d.size(f) for f in files)
            else:
                model_sd: dict[str, torch.Tensor] = OrderedDict()
                for gm in manifest.groups:
                    for p in gm.params:
                        t = masters[p.name].to(_torch_dtype(dtype or p.dtype))
                        for n in (p.name, *p.aliases):
                            model_sd[n] = t
                for name, t in _read_model_entries(s, view).items():
                    model_sd[name] = t.to(_torch_dtype(dtype)) if dtype and t.is_floating_point() else t
                del masters
                total += _save(d, MODEL_PT_FILE, model_sd, fsync)
                files.append(MODEL_PT_FILE)
            total += _save(d, OPTIMIZER_FILE, osd, fsync)
            files.append(OPTIMIZER_FILE)
        except BaseException:
            for rel in files:
                d.remove(rel)
            raise
    return ConsolidateResult(out, files, total)
