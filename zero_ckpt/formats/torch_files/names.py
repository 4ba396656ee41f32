"""The torch-free half of reading a plain torch optimizer state dict: its structure, the
param names (from the caller, ``param_names.json`` or the groups' own ``param_names``) and
the file convention's names. Shared by the streaming view (:mod:`.reading`) and the torch
loader (:mod:`zero_ckpt.formats.torch_optim`); nothing here imports torch."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from zero_ckpt.errors import CheckpointError
from zero_ckpt.manifest import MAX_MANIFEST_BYTES
from zero_ckpt.storage import Location

__all__ = [
    "MODEL_PT_FILE",
    "PARAM_NAMES_FILE",
    "OPTIMIZER_KEYS",
    "MODEL_KEYS",
    "NAMES_HOWTO",
    "TorchStateDictError",
    "check_optimizer_state",
    "names_from_arg",
    "resolve_names",
    "read_names",
    "split_url",
    "first_entry",
]

MODEL_PT_FILE = "model.pt"
PARAM_NAMES_FILE = "param_names.json"
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim")
MODEL_KEYS = ("model", "model_state_dict", "state_dict")
NAMES_HOWTO = (
    "pass param_names= (a list of names in id order, one list per param group, or the model "
    "itself when the optimizer was built from model.parameters()), or put a param_names.json "
    "next to optimizer.pt (zero-ckpt convert --param-names FILE), or build the optimizer from "
    "model.named_parameters() so that its state dict carries the names"
)


class TorchStateDictError(CheckpointError, ValueError):
    """A torch optimizer or model state dict that format v1 cannot hold as given; the message
    names the param, key or value and the fix."""


def check_optimizer_state(osd: Any, what: str) -> tuple[dict, list[dict]]:
    """``(state by integer param id, param groups)`` of an optimizer state dict, checked."""
    if not isinstance(osd, Mapping) or "param_groups" not in osd or "state" not in osd:
        hint = ""
        if isinstance(osd, Mapping) and "zero_optimizer" in osd:
            hint = (
                " (this is a ZeroOptimizer.state_dict() shard: use consolidate_state_dict() for a "
                "plain one, or save with zero_ckpt.save)"
            )
        raise TorchStateDictError(
            f"{what} is not a torch optimizer state dict: expected a dict with 'state' and "
            f"'param_groups' (what optimizer.state_dict() returns){hint}"
        )
    state, groups = osd["state"], osd["param_groups"]
    if not isinstance(state, Mapping) or not isinstance(groups, (list, tuple)) or not groups:
        raise TorchStateDictError(
            f"{what}: 'state' must be a dict and 'param_groups' a non-empty list, as "
            "optimizer.state_dict() returns them"
        )
    out_state: dict[int, Any] = {}
    for k, v in state.items():
        key = int(k) if isinstance(k, str) and k.isdigit() else k
        if isinstance(key, bool) or not isinstance(key, int):
            raise TorchStateDictError(f"{what}: state key {k!r} is not an integer param id")
        if not isinstance(v, Mapping):
            raise TorchStateDictError(
                f"{what}: state of param id {key} is a {type(v).__name__}, not a dict"
            )
        out_state[key] = v
    seen: set[int] = set()
    for gi, g in enumerate(groups):
        ids = g.get("params") if isinstance(g, Mapping) else None
        if not isinstance(ids, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in ids
        ):
            raise TorchStateDictError(
                f"{what}: param_groups[{gi}] has no 'params' list of integer ids; is this a state "
                "dict of a torch optimizer?"
            )
        dup = seen.intersection(ids)
        if dup or len(set(ids)) != len(ids):
            raise TorchStateDictError(
                f"{what}: param id(s) {sorted(dup) or ids} appear more than once in param_groups"
            )
        seen.update(ids)
    orphans = sorted(set(out_state) - seen)
    if orphans:
        raise TorchStateDictError(
            f"{what}: state holds param id(s) {orphans[:5]} that no param group lists; the state "
            "dict is inconsistent"
        )
    return out_state, [dict(g) for g in groups]


def names_from_arg(param_names: Any, groups: list[dict]) -> list[list[str]] | None:
    """Names given by the caller (a flat list in id order, or one list per group) split per
    group and checked against the groups' sizes; None when none were given. (A module is
    turned into its ``named_parameters()`` list by the torch loader before this.)"""
    sizes = [len(g["params"]) for g in groups]
    if param_names is None:
        return None
    if isinstance(param_names, (str, bytes)) or not isinstance(param_names, Sequence):
        raise TorchStateDictError(
            f"param_names must be a list of names (or one list per param group), got "
            f"{type(param_names).__name__}"
        )
    items = list(param_names)
    if items and all(isinstance(x, (list, tuple)) for x in items):
        per_group = [list(x) for x in items]
        if [len(x) for x in per_group] != sizes:
            raise TorchStateDictError(
                f"param_names gives {[len(x) for x in per_group]} names per group, the "
                f"optimizer's groups hold {sizes} params"
            )
    else:
        if len(items) != sum(sizes):
            raise TorchStateDictError(
                f"param_names has {len(items)} names, the optimizer's param groups list "
                f"{sum(sizes)} params (one name per entry of every group's 'params', in order)"
            )
        per_group, start = [], 0
        for n in sizes:
            per_group.append(items[start : start + n])
            start += n
    if any(not isinstance(n, str) or not n for g in per_group for n in g):
        raise TorchStateDictError("param_names must hold non-empty strings only")
    return per_group


def resolve_names(param_names: Any, groups: list[dict]) -> list[list[str]]:
    """The names of every group's params: the given ones, else the groups' recorded
    ``param_names`` (both: they must agree); refused when there are none."""
    given = names_from_arg(param_names, groups)
    recorded = None
    if all(isinstance(g.get("param_names"), (list, tuple)) for g in groups):
        recorded = [list(g["param_names"]) for g in groups]
        if [len(r) for r in recorded] != [len(g["params"]) for g in groups]:
            raise TorchStateDictError(
                "the state dict's param_names lists do not match its params lists in length; "
                "the state dict is inconsistent"
            )
    if given is not None and recorded is not None and given != recorded:
        gi = next(i for i, (a, b) in enumerate(zip(given, recorded)) if a != b)
        raise TorchStateDictError(
            f"param_names given for group {gi} differ from the names the state dict records "
            f"({given[gi][:3]}... vs {recorded[gi][:3]}...); drop param_names to use the "
            "recorded ones"
        )
    names = given if given is not None else recorded
    if names is None:
        raise TorchStateDictError(
            f"the optimizer state dict names no parameters (torch keys them by integer id), and "
            f"the model state dict's order is ambiguous (buffers interleave); {NAMES_HOWTO}"
        )
    flat = [n for g in names for n in g]
    if len(set(flat)) != len(flat):
        dup = sorted({n for n in flat if flat.count(n) > 1})
        raise TorchStateDictError(f"param name(s) {dup[:5]} appear more than once in param_names")
    return names


def read_names(loc: Location, rel: str) -> Any:
    """The JSON list of names at ``loc/rel`` (size-capped)."""
    url = loc.url_of(rel)
    try:
        # A list of names: never larger than a manifest (refused before it is read).
        names = json.loads(loc.read_bytes(rel, max_bytes=MAX_MANIFEST_BYTES))
    except (ValueError, RecursionError) as exc:
        raise TorchStateDictError(f"{url}: not valid JSON ({str(exc)[:200]})", path=url) from None
    if not isinstance(names, list):
        raise TorchStateDictError(
            f"{url}: expected a JSON list of names in id order (or one list per param group)", path=url
        )
    return names


def split_url(url: str) -> tuple[str, str]:
    """``.../dir/file.pt`` -> (``.../dir``, ``file.pt``) without mangling ``s3://`` (URLs stay
    strings: ``Path`` would collapse the ``//``)."""
    head, sep, tail = url.rstrip("/").rpartition("/")
    if not sep:
        return ".", tail
    if not head or head.endswith(":/"):  # "/x.pt", "memory://x.pt"
        return head + "/", tail
    return head, tail


def first_entry(obj: Mapping, keys: Sequence[str]) -> Any:
    return next((obj[k] for k in keys if isinstance(obj.get(k), Mapping)), None)
