"""DeepSpeed ZeRO stage 1/2 checkpoints as a format-v1 *view*: no conversion, no loading.

A DeepSpeed checkpoint (``engine.save_checkpoint(dir)``) is a run folder with a ``latest`` file
naming a tag folder, ``dir/global_stepN/``, which holds

* ``[bf16_|fp16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt``: rank r's ZeRO state, under
  ``optimizer_state_dict``: ``single_partition_of_fp32_groups[g]`` (the fp32 master partition
  of group g), ``base_optimizer_state`` (the wrapped torch optimizer's ``state_dict()``:
  ``state[i]['exp_avg']``... over the *padded* partition; or, with ``elastic_checkpoint``, a
  list of per-group states without padding), ``group_paddings``, ``partition_count``,
  ``param_slice_mappings``, ``param_alignment_paddings`` (newer files) and ``zero_stage``
  (absent in files of ``BF16_Optimizer``, which also keeps the padding in its fp32 partitions);
* ``mp_rank_00_model_states.pt``: ``module`` (the model's state dict in the model dtype),
  ``param_shapes`` (per group, the optimizer-owned params **in flat order**), ``buffer_names``,
  ``shared_params`` (tied names: ``{alias: name}``), ``frozen_param_shapes`` /
  ``frozen_param_fragments`` (ZeRO-2 only).

DeepSpeed lays each group's params end to end in ``param_shapes`` order, pads the flat buffer at
the tail to a multiple of ``2 * dp_world_size`` and cuts it into equal partitions: exactly our
layout with ``align = 2`` (``partition_numel = ceil(numel / (2 * dp)) * 2``), checked here for
every group and rank. So :func:`open_deepspeed` only has to say *where the bytes are*: it parses
the pickles with the restricted unpickler of :mod:`zero_ckpt.formats.torch_zip` (nothing from
the files is imported or run), locates every tensor's bytes inside the ``.pt`` zip files and
returns a :class:`~zero_ckpt.manifest.Manifest` whose shard paths are the optim files, plus one
:class:`~zero_ckpt.safetensors_format.SafetensorsHeader`-like entry table per rank
(``g{g}.master``, ``g{g}.exp_avg``, ... at the absolute byte offsets of the *real* elements).
``plan_reshard``/``plan_consolidate`` and the execution engine then work unchanged, reading
byte ranges straight out of the DeepSpeed files, in bounded memory.

Module-owned tensors the optimizer does not hold (buffers, frozen params, tied aliases of
those) become ``model_header`` entries into ``mp_rank_00_model_states.pt``.

DeepSpeed files carry no checksums: the view's files have the checksum :data:`NO_CHECKSUM` and
no per-tensor checksums, so the executors' source checks have nothing to compare (they skip).
"""

from __future__ import annotations

import math
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from zero_core.layout import compute_partition_numel
from zero_ckpt.errors import CheckpointError, IncompleteCheckpointError, MissingShardError, Problem
from zero_ckpt.formats.torch_zip import TensorRef, TorchZipFile, Unknown, open_torch_zip
from zero_ckpt.manifest import FileMeta, GroupMeta, Manifest, ParamMeta, check_manifest, tensor_name
from zero_ckpt.safetensors_format import DTYPE_SIZES, SafetensorsHeader, TensorEntry
from zero_ckpt.storage import Location, open_location

__all__ = [
    "DeepSpeedView",
    "DeepSpeedFormatError",
    "NO_CHECKSUM",
    "open_deepspeed",
    "read_deepspeed",
    "is_deepspeed_checkpoint",
    "verify_deepspeed_files",
]

# Placeholder checksum of a file of a foreign view: DeepSpeed records none.
NO_CHECKSUM = "none"
# DeepSpeed's nccl_start_alignment_factor: groups are padded to 2 * dp_world_size elements.
DEEPSPEED_ALIGN = 2

_OPTIM_RE = re.compile(
    r"^(?P<prefix>bf16_|fp16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$"
)
_MODEL_RE = re.compile(r"^mp_rank_(?P<mp>\d+)_model_states\.pt$")
_ZERO3_MODEL_RE = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
# A tag is one folder name (DeepSpeed writes str(tag)); anything that leaves the run folder is refused.
_TAG_RE = re.compile(r"^[^/\\\x00-\x1f]+$")


class DeepSpeedFormatError(CheckpointError, ValueError):
    """A DeepSpeed checkpoint that does not add up, or one of a kind zero-ckpt does not read."""


@dataclass(frozen=True)
class DeepSpeedView:
    """A DeepSpeed ZeRO-1/2 checkpoint seen as format v1.

    ``manifest``: groups, params (``param_shapes`` order), layout (``align`` 2), hyperparameters,
    scalars; ``shards[r].path`` is rank r's optim file and ``model_file`` the model states file,
    both relative to ``url`` (checksums :data:`NO_CHECKSUM`). ``headers[r]``: where rank r's real
    elements of every ``g{g}.{key}`` are in its optim file (absolute byte offsets).
    ``model_header``: buffers and frozen params in the model states file (None if there are
    none). ``notes``: facts worth telling a user (e.g. DeepSpeed metadata that was overruled).
    """

    url: str
    tag: str
    manifest: Manifest
    headers: dict[int, SafetensorsHeader]
    model_header: SafetensorsHeader | None
    optimizer: str
    notes: tuple[str, ...] = ()
    storage_options: dict[str, Any] = field(default_factory=dict)


# ----- locating the files --------------------------------------------------------------------------


_MAX_LATEST_BYTES = 4096


def _is_file(loc: Location, rel: str) -> bool:
    try:
        return loc.is_file(rel)
    except Exception:  # noqa: BLE001 - any backend failure here means "no such file"
        return False


def _resolve_tag(loc: Location) -> str:
    """The tag folder relative to ``loc``: "" when ``loc`` is the tag folder itself."""
    if _is_file(loc, "latest"):
        # A tag is a folder name: a larger 'latest' is refused before it is read.
        tag = loc.read_bytes("latest", max_bytes=_MAX_LATEST_BYTES).decode("utf-8", "replace").strip()
        if not tag or not _TAG_RE.fullmatch(tag) or tag in (".", ".."):
            raise DeepSpeedFormatError(
                f"{loc.url_of('latest')} names the tag {tag!r}, which is not a folder name; pass the "
                "global_stepN folder itself",
                path=loc.url_of("latest"),
            )
        if not loc.exists(tag):
            raise IncompleteCheckpointError(
                f"{loc.url_of('latest')} names the tag {tag!r} but {loc.url_of(tag)} does not exist "
                "(an interrupted save, or the folder was moved); pass an existing global_stepN folder",
                path=loc.url_of(tag),
            )
        return tag
    return ""


def _top_files(loc: Location, tag: str) -> list[str]:
    sub = open_location(loc.url_of(tag), loc.storage_options) if tag else loc
    try:
        return [f for f in sub.list_files() if "/" not in f]
    finally:
        if sub is not loc:
            sub.close()


def is_deepspeed_checkpoint(loc: Location) -> bool:
    """Whether ``loc`` looks like a DeepSpeed run folder (``latest``) or tag folder."""
    if _is_file(loc, "latest"):
        return True
    return any(_OPTIM_RE.match(f) or _MODEL_RE.match(f) for f in _top_files(loc, ""))


def _locate(loc: Location) -> tuple[str, str, dict[int, str], str]:
    """``(tag, model file, {rank: optim file}, file prefix)``, paths relative to ``loc``."""
    tag = _resolve_tag(loc)
    files = _top_files(loc, tag)
    where = loc.url_of(tag)
    rel = (lambda f: posixpath.join(tag, f)) if tag else (lambda f: f)
    if not tag and not any(_OPTIM_RE.match(f) for f in files):
        tags = sorted(
            {
                f.split("/")[0]
                for f in loc.list_files()
                if f.count("/") == 1 and _OPTIM_RE.match(f.split("/")[1])
            }
        )
        if tags:
            raise IncompleteCheckpointError(
                f"{loc.url} has no 'latest' file naming the checkpoint to read; pass one of its tag "
                f"folders, e.g. {loc.url_of(tags[-1])} (found: {', '.join(tags[:5])})",
                path=loc.url_of("latest"),
            )
    if not files:
        raise IncompleteCheckpointError(
            f"no DeepSpeed checkpoint at {where}: the folder is empty or missing", path=where
        )
    if any(_ZERO3_MODEL_RE.match(f) for f in files):
        raise DeepSpeedFormatError(
            f"{where} is a ZeRO stage 3 checkpoint (per-rank model states files); zero-ckpt reads "
            "ZeRO stage 1 and 2 checkpoints",
            path=where,
        )
    if any(f.startswith("layer_") or f.startswith("expp_rank_") for f in files):
        raise DeepSpeedFormatError(
            f"{where} holds pipeline-parallel (layer_*) or expert-parallel (expp_rank_*) files; "
            "zero-ckpt reads data-parallel-only ZeRO-1/2 checkpoints",
            path=where,
        )
    models = {f: _MODEL_RE.match(f) for f in files}
    models = {f: m for f, m in models.items() if m}
    optims = {f: _OPTIM_RE.match(f) for f in files}
    optims = {f: m for f, m in optims.items() if m}
    mps = {m["mp"] for m in [*models.values(), *optims.values()]}
    if mps - {"00"}:
        raise DeepSpeedFormatError(
            f"{where} holds model-parallel ranks {sorted(mps)}; zero-ckpt reads checkpoints "
            "without tensor/model parallelism (mp_rank_00 only)",
            path=where,
        )
    if not optims:
        raise IncompleteCheckpointError(
            f"no *_optim_states.pt files in {where}: not a DeepSpeed ZeRO checkpoint (or saved "
            "without optimizer state)",
            path=where,
        )
    if "mp_rank_00_model_states.pt" not in models:
        raise MissingShardError(
            f"{where}/mp_rank_00_model_states.pt is missing: it holds the param names and shapes "
            "that give the optimizer state its meaning",
            path=f"{where}/mp_rank_00_model_states.pt",
        )
    prefixes = {m["prefix"] or "" for m in optims.values()}
    if len(prefixes) > 1:
        raise DeepSpeedFormatError(
            f"{where} mixes optim files with prefixes {sorted(prefixes)} (e.g. bf16_zero_pp_rank_* "
            "and zero_pp_rank_*): two saves into one folder; keep the files of one run",
            path=where,
        )
    by_rank: dict[int, str] = {}
    for f, m in sorted(optims.items()):
        r = int(m["rank"])
        if r in by_rank:
            raise DeepSpeedFormatError(
                f"{where} holds two optim files for rank {r} ({by_rank[r].split('/')[-1]}, {f}); keep one",
                path=where,
            )
        by_rank[r] = rel(f)
    n = len(by_rank)
    if sorted(by_rank) != list(range(n)):
        missing = sorted(set(range(max(by_rank) + 1)) - set(by_rank))
        raise MissingShardError(
            f"{where}: optim files for ranks {missing} are missing (found ranks {sorted(by_rank)}); "
            "a save that did not finish on every rank",
            path=where,
        )
    return tag, rel("mp_rank_00_model_states.pt"), by_rank, prefixes.pop()


# ----- small typed accessors (every failure names the file) -------------------------------------------


class _Doc:
    def __init__(self, zf: TorchZipFile, root: Any) -> None:
        self.zf = zf
        self.url = zf.url
        self.root = root

    def fail(self, message: str, rank: int | None = None) -> DeepSpeedFormatError:
        return DeepSpeedFormatError(f"{self.url}: {message}", path=self.url, rank=rank)

    def need(self, mapping: Any, key: str, where: str) -> Any:
        if not isinstance(mapping, dict) or key not in mapping:
            raise self.fail(f"{where} has no {key!r}: not a DeepSpeed ZeRO-1/2 checkpoint or damaged")
        return mapping[key]

    def tensor(self, value: Any, what: str, ndim: int | None = 1) -> TensorRef:
        if not isinstance(value, TensorRef):
            raise self.fail(f"{what} should be a tensor, found {_describe(value)}")
        if ndim is not None and len(value.shape) != ndim:
            raise self.fail(f"{what} should be {ndim}-D, has shape {list(value.shape)}")
        return value

    def number(self, value: Any, what: str) -> Any:
        if isinstance(value, TensorRef):
            v = self.zf.read_scalar(value, what)
        elif isinstance(value, (bool, int, float)):
            v = value
        else:
            raise self.fail(f"{what} should be a number, found {_describe(value)}")
        if isinstance(v, float) and v.is_integer() and what.rsplit(" ", 1)[-1] == "step":
            v = int(v)  # torch keeps Adam's step as a float tensor; the manifest says 3, not 3.0
        return v


def _describe(value: Any) -> str:
    if isinstance(value, Unknown):
        return f"an object of {value.qualname}"
    if isinstance(value, TensorRef):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__


def _int_of(value: Any) -> int | None:
    """An int, or the value of an IntEnum such as ZeroStageEnum (pickled as a call)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, Unknown) and len(value.args) == 1 and isinstance(value.args[0], int):
        return value.args[0]
    return None


def _jsonable(value: Any, doc: _Doc | None = None) -> tuple[bool, Any]:
    """``(ok, value)``: value as JSON data (tuples as lists, one-element tensors as numbers)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True, value
    if isinstance(value, float):
        return (math.isfinite(value), value)
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            ok, j = _jsonable(v, doc)
            if not ok:
                return False, None
            out.append(j)
        return True, out
    if isinstance(value, dict):
        obj = {}
        for k, v in value.items():
            ok, j = _jsonable(v, doc)
            if not ok or not isinstance(k, str):
                return False, None
            obj[k] = j
        return True, obj
    if isinstance(value, TensorRef) and value.numel == 1 and doc is not None:
        return _jsonable(doc.zf.read_scalar(value))
    return False, None


def _json_subset(value: Any) -> Any:
    """Drop what JSON cannot hold (objects of unknown classes, tensors) from nested dicts."""
    if isinstance(value, dict):
        return {str(k): _json_subset(v) for k, v in value.items() if _jsonable(v)[0] or isinstance(v, dict)}
    ok, j = _jsonable(value)
    return j if ok else None


# ----- the reader --------------------------------------------------------------------------------


@dataclass
class _Rank:
    rank: int
    path: str
    doc: _Doc
    osd: dict
    masters: list[TensorRef]
    paddings: list[int]
    states: list[dict[str, Any]]  # per group: key -> TensorRef or scalar
    padded_states: bool


def open_deepspeed(url: str, storage_options: dict[str, Any] | None = None) -> DeepSpeedView:
    """Read the DeepSpeed ZeRO-1/2 checkpoint at ``url`` (a run folder with ``latest``, or a
    ``global_stepN`` folder) as a :class:`DeepSpeedView`. Reads only the pickled metadata and
    the zip directories (plus a few scalars such as ``step``), never the tensors.

    Raises :class:`DeepSpeedFormatError` (naming the file and the inconsistency) for a
    checkpoint that does not add up or is of a kind not supported (ZeRO-3, model/pipeline
    parallel, ``parameter_alignment``), and the usual missing/incomplete errors.
    """
    with open_location(url, storage_options) as loc:
        return read_deepspeed(loc)


def read_deepspeed(loc: Location) -> DeepSpeedView:
    """:func:`open_deepspeed` on an open location; paths in the view are relative to it."""
    tag, model_rel, optim_rels, prefix = _locate(loc)
    world = len(optim_rels)
    model_doc = _Doc(open_torch_zip(loc, model_rel), None)
    model_doc.root = model_doc.zf.load()
    ranks = [_read_rank(loc, r, optim_rels[r]) for r in range(world)]
    return _build_view(loc, tag, prefix, model_rel, model_doc, ranks)


def _read_rank(loc: Location, rank: int, rel: str) -> _Rank:
    doc = _Doc(open_torch_zip(loc, rel), None)
    doc.root = doc.zf.load()
    osd = doc.need(doc.root, "optimizer_state_dict", "the file")
    if not isinstance(osd, dict):
        raise doc.fail(f"optimizer_state_dict is {_describe(osd)}, expected a dict")
    if "fp32_flat_groups" in osd or _int_of(osd.get("zero_stage")) == 3:
        raise doc.fail("is a ZeRO stage 3 optimizer file; zero-ckpt reads ZeRO stage 1 and 2 checkpoints")
    masters_raw = doc.need(osd, "single_partition_of_fp32_groups", "optimizer_state_dict")
    if not isinstance(masters_raw, list) or not masters_raw:
        raise doc.fail("single_partition_of_fp32_groups should be a non-empty list of tensors")
    masters = [doc.tensor(t, f"single_partition_of_fp32_groups[{g}]") for g, t in enumerate(masters_raw)]
    paddings = doc.need(osd, "group_paddings", "optimizer_state_dict")
    if not isinstance(paddings, list) or len(paddings) != len(masters) or any(
        _int_of(p) is None or _int_of(p) < 0 for p in paddings  # type: ignore[operator]
    ):
        raise doc.fail(
            f"group_paddings {paddings!r:.80} should list one non-negative integer per group "
            f"({len(masters)} groups)"
        )
    states, padded = _group_states(doc, osd, len(masters))
    return _Rank(rank, rel, doc, osd, masters, [int(p) for p in paddings], states, padded)


def _group_states(doc: _Doc, osd: dict, ngroups: int) -> tuple[list[dict[str, Any]], bool]:
    """Per group, the wrapped optimizer's state (``exp_avg``, ``step``...). The torch state dict
    keeps the padding of each partition; an elastic checkpoint's lean list does not."""
    base = osd.get("base_optimizer_state")
    if base is None:
        return [{} for _ in range(ngroups)], True
    if isinstance(base, list):  # elastic_checkpoint: one lean state per group
        if len(base) != ngroups:
            raise doc.fail(f"base_optimizer_state lists {len(base)} groups, the fp32 partitions {ngroups}")
        out = []
        for g, st in enumerate(base):
            if not isinstance(st, dict):
                raise doc.fail(f"base_optimizer_state[{g}] is {_describe(st)}, expected a dict")
            st = dict(st)
            if "step" not in st and "base_optimizer_state_step" in osd:
                st["step"] = osd["base_optimizer_state_step"]
            out.append(st)
        return out, False
    state = doc.need(base, "state", "base_optimizer_state")
    groups = doc.need(base, "param_groups", "base_optimizer_state")
    if not isinstance(groups, list) or len(groups) != ngroups:
        raise doc.fail(
            f"base_optimizer_state has {len(groups) if isinstance(groups, list) else '?'} param groups, "
            f"the fp32 partitions {ngroups}"
        )
    out = []
    for g, group in enumerate(groups):
        params = doc.need(group, "params", f"base_optimizer_state.param_groups[{g}]")
        if not isinstance(params, list) or len(params) != 1:
            raise doc.fail(
                f"base_optimizer_state.param_groups[{g}] has params {params!r:.60}; a ZeRO group holds "
                "exactly one flat partition"
            )
        st = state.get(params[0], {}) if isinstance(state, dict) else None
        if not isinstance(st, dict):
            raise doc.fail(f"base_optimizer_state.state[{params[0]!r}] is {_describe(st)}, expected a dict")
        out.append(dict(st))
    return out, True


def _hyperparams(rank0: _Rank, g: int) -> dict[str, Any]:
    base = rank0.osd.get("base_optimizer_state")
    group = None
    if isinstance(base, dict) and isinstance(base.get("param_groups"), list):
        group = base["param_groups"][g]
    if not isinstance(group, dict):
        return {}
    out = {}
    for k, v in group.items():
        if k == "params":
            continue
        ok, j = _jsonable(v, rank0.doc)
        if ok:
            out[str(k)] = j
    return out


def _read_param_shapes(model_doc: _Doc, param_shapes: list) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Per group, ``(name, shape)`` in flat order, checked: names unique, shapes of ints."""
    seen: set[str] = set()
    groups_params: list[list[tuple[str, tuple[int, ...]]]] = []
    for g, shapes in enumerate(param_shapes):
        if not isinstance(shapes, dict):
            raise model_doc.fail(f"param_shapes[{g}] is {_describe(shapes)}, expected a dict of shapes")
        plist = []
        for name, shape in shapes.items():
            if not isinstance(name, str) or not isinstance(shape, tuple) or any(
                not isinstance(d, int) or d < 0 for d in shape
            ):
                raise model_doc.fail(f"param_shapes[{g}] has a malformed entry {name!r}: {shape!r:.60}")
            if name in seen:
                raise model_doc.fail(f"param {name!r} appears twice in param_shapes")
            seen.add(name)
            plist.append((name, shape))
        groups_params.append(plist)
    return groups_params


def _agreed_stage(ranks: list[_Rank]) -> tuple[bool, int]:
    """``(written by BF16_Optimizer, zero stage)``, after checking that every optim file agrees
    on the optimizer, the stage, the group count and the partition count, and that none was
    saved with ``parameter_alignment`` (padding between params, not addressable as ranges)."""
    world = len(ranks)
    r0 = ranks[0]
    ngroups = len(r0.masters)
    bf16_optimizer = "zero_stage" not in r0.osd
    stage = _int_of(r0.osd.get("zero_stage"))
    for rk in ranks:
        if len(rk.masters) != ngroups:
            raise rk.doc.fail(f"holds {len(rk.masters)} param groups, {r0.doc.url} holds {ngroups}", rk.rank)
        if ("zero_stage" not in rk.osd) != bf16_optimizer or _int_of(rk.osd.get("zero_stage")) != stage:
            raise rk.doc.fail(
                "was written by a different ZeRO optimizer or stage than rank 0's file", rk.rank
            )
        counts = rk.osd.get("partition_count")
        counts = counts if isinstance(counts, list) else [counts] * ngroups
        if len(counts) != ngroups or any(_int_of(c) != world for c in counts):
            raise rk.doc.fail(
                f"partition_count is {rk.osd.get('partition_count')!r} but the folder holds {world} optim "
                "files: files of another save are missing or mixed in (or expert-parallel groups, which "
                "zero-ckpt does not read)",
                rk.rank,
            )
        paps = rk.osd.get("param_alignment_paddings")
        if paps is not None:
            flat = [
                p
                for grp in (paps if isinstance(paps, list) else [])
                for p in (grp if isinstance(grp, list) else [grp])
            ]
            if not isinstance(paps, list) or any(_int_of(p) is None for p in flat):
                raise rk.doc.fail(f"param_alignment_paddings {paps!r:.80} is malformed", rk.rank)
            if any(_int_of(p) for p in flat):
                raise rk.doc.fail(
                    "was saved with zero_optimization.parameter_alignment: its flat buffers have padding "
                    "between params, which zero-ckpt cannot address as byte ranges; save without "
                    "parameter_alignment or convert through DeepSpeed's universal checkpoint",
                    rk.rank,
                )
    if stage is None:
        cfg = r0.doc.root.get("ds_config") if isinstance(r0.doc.root, dict) else None
        zcfg = cfg.get("zero_optimization") if isinstance(cfg, dict) else None
        stage = _int_of(zcfg.get("stage")) if isinstance(zcfg, dict) else None
        stage = 1 if stage is None else stage
    if stage not in (0, 1, 2):
        raise r0.doc.fail(f"zero_stage is {stage}; zero-ckpt reads ZeRO stage 1 and 2 checkpoints")
    return bf16_optimizer, stage


def _model_entries(
    model_doc: _Doc,
    module: dict,
    buffer_names: list[str],
    shared: dict[str, str],
    frozen_shapes: Any,
    frozen_frags: Any,
    trainable: set[str],
    model_aliases: dict[str, str],
    notes: list[str],
) -> dict[str, TensorEntry]:
    """Module-owned tensors the optimizer does not hold (buffers, frozen params, tied names of
    those) as byte ranges of the model states file. Frozen params are whatever the module
    holds besides optimizer params, tied names and buffers (ZeRO-1 files list them nowhere
    else); ZeRO-2's ``frozen_param_shapes`` are cross-checked."""
    model_entries: dict[str, TensorEntry] = {}
    frozen_names = [n for n in module if n not in trainable and n not in shared and n not in buffer_names]
    for name in list(frozen_shapes) if isinstance(frozen_shapes, dict) else []:
        if name not in module and name not in frozen_names:
            frozen_names.append(name)
    for name in [b for b in buffer_names if b in module] + frozen_names:
        t = module.get(name)
        if not isinstance(t, TensorRef) and isinstance(frozen_frags, dict):
            t = frozen_frags.get(name)
        if not isinstance(t, TensorRef):
            notes.append(f"module entry {name!r} is {_describe(t)}, not a tensor; left out")
            continue
        if t.dtype not in DTYPE_SIZES:
            notes.append(
                f"module tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold; left out"
            )
            continue
        listed = frozen_shapes.get(name) if isinstance(frozen_shapes, dict) else None
        if listed is not None and tuple(listed) != tuple(t.shape):
            raise model_doc.fail(
                f"frozen param {name!r} has shape {list(t.shape)} but frozen_param_shapes says "
                f"{list(frozen_shapes[name])}"
            )
        start, nbytes = model_doc.zf.tensor_range(t, f"module tensor {name!r}")
        model_entries[name] = TensorEntry(name, t.dtype, tuple(t.shape), start, start + nbytes)
    for alias, target in model_aliases.items():
        if target in model_entries:
            e = model_entries[target]
            model_entries[alias] = TensorEntry(alias, e.dtype, e.shape, e.start, e.end)
        else:
            notes.append(
                f"tied name {alias!r} points to {target!r}, which the checkpoint does not hold; left out"
            )
    return model_entries


def _build_view(
    loc: Location, tag: str, prefix: str, model_rel: str, model_doc: _Doc, ranks: list[_Rank]
) -> DeepSpeedView:
    world = len(ranks)
    notes: list[str] = []
    r0 = ranks[0]
    ngroups = len(r0.masters)
    bf16_optimizer, stage = _agreed_stage(ranks)

    # --- the model file: names, shapes, dtypes, buffers, frozen, tied ---------------------------
    mroot = model_doc.root
    if not isinstance(mroot, dict):
        raise model_doc.fail(f"holds {_describe(mroot)}, expected a dict")
    param_shapes = model_doc.need(mroot, "param_shapes", "the model states file")
    if not isinstance(param_shapes, list) or len(param_shapes) != ngroups:
        raise model_doc.fail(
            f"param_shapes lists {len(param_shapes) if isinstance(param_shapes, list) else '?'} groups but "
            f"the optim files hold {ngroups}: the files are from different saves"
        )
    module = mroot.get("module") if isinstance(mroot.get("module"), dict) else {}
    buffer_names = [b for b in (mroot.get("buffer_names") or []) if isinstance(b, str)]
    shared = mroot.get("shared_params") or {}
    if not isinstance(shared, dict) or any(
        not isinstance(k, str) or not isinstance(v, str) for k, v in shared.items()
    ):
        raise model_doc.fail(f"shared_params {shared!r:.80} should map names to names")
    frozen_shapes = mroot.get("frozen_param_shapes") or {}
    frozen_frags = mroot.get("frozen_param_fragments") or {}

    groups_params = _read_param_shapes(model_doc, param_shapes)
    trainable = {name for plist in groups_params for name, _ in plist}

    master_dtype = r0.masters[0].dtype
    aliases: dict[str, list[str]] = {}
    model_aliases: dict[str, str] = {}
    for alias, target in shared.items():
        if alias in trainable:
            raise model_doc.fail(
                f"shared_params makes {alias!r} an alias of {target!r}, but it is an optimizer param"
            )
        if target in trainable:
            aliases.setdefault(target, []).append(alias)
        else:
            model_aliases[alias] = target

    # --- groups: layout, masters, states --------------------------------------------------------
    groups: list[GroupMeta] = []
    entries: list[dict[str, TensorEntry]] = [{} for _ in ranks]
    for g in range(ngroups):
        params = []
        offset = 0
        for name, shape in groups_params[g]:
            mod = module.get(name)
            dtype = mod.dtype if isinstance(mod, TensorRef) else master_dtype
            if isinstance(mod, TensorRef) and tuple(mod.shape) != tuple(shape):
                raise model_doc.fail(
                    f"module weight {name!r} has shape {list(mod.shape)} but param_shapes says {list(shape)}"
                )
            params.append(ParamMeta(name, tuple(shape), dtype, offset, tuple(aliases.get(name, ()))))
            offset += math.prod(shape)
        numel = offset
        pn = _partition_numel(ranks, g, numel, bf16_optimizer)
        align = _pick_align(numel, world, pn)
        if align is None:
            raise r0.doc.fail(
                f"group {g}: partitions of {pn} elements cannot hold the {numel} elements of its params "
                f"(param_shapes) over {world} ranks: the files do not belong together"
            )
        if align != DEEPSPEED_ALIGN:
            notes.append(
                f"group {g}: partition size {pn} is not DeepSpeed's usual 2 * dp alignment; "
                f"align {align} fits"
            )
        state_keys, state_dtypes, scalars = _state_layout(ranks, g, pn, numel, master_dtype)
        for rk in ranks:
            real = max(0, min(pn, numel - rk.rank * pn))
            name = tensor_name(g, "master")
            entries[rk.rank][name] = _entry(rk, name, rk.masters[g], real)
            for key in state_keys:
                t = rk.states[g][key]
                entries[rk.rank][tensor_name(g, key)] = _entry(rk, tensor_name(g, key), t, real)
        groups.append(
            GroupMeta(
                numel=numel,
                partition_numel=pn,
                align=align,
                params=tuple(params),
                state_keys=tuple(state_keys),
                hyperparams=_hyperparams(r0, g),
                scalars=scalars,
                state_dtypes=state_dtypes,
            )
        )
        layout = groups[-1].layout(world)
        _check_slice_mappings(ranks, g, layout, notes, r0)

    if not r0.padded_states:
        notes.append(
            "elastic_checkpoint: the files record no per-group hyperparameters (lr, betas, ...); "
            "the manifest has none"
        )

    model_entries = _model_entries(
        model_doc, module, buffer_names, shared, frozen_shapes, frozen_frags, trainable,
        model_aliases, notes,
    )

    # --- the manifest ----------------------------------------------------------------------------
    shards = tuple(
        FileMeta(rk.path, rk.doc.zf.size, NO_CHECKSUM, rank=rk.rank) for rk in ranks
    )
    model_file = FileMeta(model_rel, model_doc.zf.size, NO_CHECKSUM) if model_entries else None
    version = r0.doc.root.get("ds_version") if isinstance(r0.doc.root, dict) else None
    optimizer = "BF16_Optimizer" if bf16_optimizer else "DeepSpeedZeroOptimizer"
    extra = {
        "deepspeed": {
            "ds_version": version if isinstance(version, str) else None,
            "tag": tag or None,
            "file_prefix": prefix,
            "optimizer": optimizer,
            "zero_stage": stage,
            **{
                k: _json_subset(mroot.get(k))
                for k in ("global_steps", "global_samples", "skipped_steps", "dp_world_size", "mp_world_size")
                if k in mroot
            },
            "clip_grad": _json_subset(r0.osd.get("clip_grad")),
            "loss_scaler": _loss_scaler(r0.osd.get("loss_scaler")),
            "ds_config": _json_subset(mroot.get("ds_config")),
            "shared_params": dict(shared),
        }
    }
    manifest = Manifest(
        world_size=world,
        zero_stage=stage,
        master_dtype=master_dtype,
        groups=tuple(groups),
        shards=shards,
        model_file=model_file,
        extra=extra,
        created_by=f"deepspeed {version}" if isinstance(version, str) else "deepspeed",
    )
    problems = [p for p in check_manifest(manifest, loc.url) if "checksum" not in p.message]
    if problems:
        raise DeepSpeedFormatError(
            f"{loc.url_of(tag)}: the checkpoint does not add up: "
            + "; ".join(p.message for p in problems[:5]),
            path=loc.url_of(tag),
        )
    headers = {
        rk.rank: SafetensorsHeader(entries[rk.rank], {}, 0, rk.doc.zf.size) for rk in ranks
    }
    model_header = SafetensorsHeader(model_entries, {}, 0, model_doc.zf.size) if model_entries else None
    return DeepSpeedView(
        loc.url, tag, manifest, headers, model_header, optimizer, tuple(notes), dict(loc.storage_options)
    )


def _loss_scaler(value: Any) -> Any:
    if isinstance(value, Unknown):
        state = value.state if isinstance(value.state, dict) else {}
        return {"class": value.qualname, **{k: v for k, v in _json_subset(state).items() if v is not None}}
    return _json_subset(value)


def _partition_numel(ranks: list[_Rank], g: int, numel: int, bf16_optimizer: bool) -> int:
    """Elements per partition of group g, from what every rank stored and recorded.

    ZeRO stage 1/2 stores the fp32 partition with its padding stripped and records that padding
    per rank (``stored + group_paddings[r]`` is the partition size on every rank);
    BF16_Optimizer stores it padded and records the whole tail padding on the last rank.
    """
    sizes = {}
    for rk in ranks:
        stored = rk.masters[g].numel
        sizes[rk.rank] = stored if bf16_optimizer else stored + rk.paddings[g]
    pn = sizes[0]
    for rk in ranks:
        if sizes[rk.rank] != pn:
            what = "stored" if bf16_optimizer else "stored + group_paddings"
            raise rk.doc.fail(
                f"group {g}: its fp32 partition is {sizes[rk.rank]} elements ({what}), rank 0's is {pn}: "
                "partitions must be equal; the files are from different saves or damaged",
                rk.rank,
            )
        real = max(0, min(pn, numel - rk.rank * pn))
        if bf16_optimizer:
            expected_pad = len(ranks) * pn - numel if rk.rank == len(ranks) - 1 else 0
            if rk.paddings[g] != expected_pad:
                raise rk.doc.fail(
                    f"group {g}: group_paddings says {rk.paddings[g]} but {numel} elements in {len(ranks)} "
                    f"partitions of {pn} leave {expected_pad} on this rank",
                    rk.rank,
                )
        elif rk.masters[g].numel != real:
            raise rk.doc.fail(
                f"group {g}: holds {rk.masters[g].numel} fp32 elements (padding {rk.paddings[g]}) but "
                f"{numel} elements (param_shapes) in partitions of {pn} leave {real} real ones on rank "
                f"{rk.rank}: the checkpoint does not add up",
                rk.rank,
            )
    return pn


def _pick_align(numel: int, world: int, pn: int) -> int | None:
    """The alignment that reproduces DeepSpeed's partition size with our formula: DeepSpeed's 2
    when it fits (always, unless parameter alignment or a custom build changed the padding)."""
    if numel == 0:
        return DEEPSPEED_ALIGN if pn == 0 else None
    if world * pn < numel:
        return None
    for align in (DEEPSPEED_ALIGN, 1):
        if compute_partition_numel(numel, world, align) == pn:
            return align
    for align in range(3, pn + 1):
        if pn % align == 0 and compute_partition_numel(numel, world, align) == pn:
            return align
    return None


def _state_layout(
    ranks: list[_Rank], g: int, pn: int, numel: int, master_dtype: str
) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """State keys (tensors over the partition), their dtypes and the group's scalars, checked
    to be the same on every rank."""
    r0 = ranks[0]
    keys: list[str] = []
    dtypes: dict[str, str] = {}
    scalars: dict[str, Any] = {}
    for key, value in r0.states[g].items():
        if not isinstance(key, str):
            raise r0.doc.fail(f"group {g}: optimizer state key {key!r} is not a string")
        if isinstance(value, TensorRef) and len(value.shape) >= 1:
            keys.append(key)
            if value.dtype != master_dtype:
                dtypes[key] = value.dtype
        else:
            scalars[key] = r0.doc.number(value, f"group {g} state {key}")
    for rk in ranks:
        st = rk.states[g]
        tensor_keys = [k for k in st if k in keys]
        if tensor_keys != keys or set(st) != set(r0.states[g]):
            raise rk.doc.fail(
                f"group {g}: optimizer state keys {sorted(map(str, st))} differ from rank 0's "
                f"{sorted(map(str, r0.states[g]))}",
                rk.rank,
            )
        real = max(0, min(pn, numel - rk.rank * pn))
        for key in keys:
            t = rk.doc.tensor(st[key], f"group {g} state {key!r}")
            if t.dtype != dtypes.get(key, master_dtype):
                raise rk.doc.fail(
                    f"group {g} state {key!r} is {t.dtype}, rank 0's is {dtypes.get(key, master_dtype)}",
                    rk.rank,
                )
            if t.numel not in (pn, real) or (not rk.padded_states and t.numel != real):
                raise rk.doc.fail(
                    f"group {g} state {key!r} has {t.numel} elements; the partition has {pn} "
                    f"({real} real): the checkpoint does not add up",
                    rk.rank,
                )
        for key, value in scalars.items():
            mine = rk.doc.number(st[key], f"group {g} state {key}")
            if mine != value:
                raise rk.doc.fail(f"group {g}: {key} is {mine} but rank 0 recorded {value}", rk.rank)
    return keys, dtypes, scalars


def _entry(rk: _Rank, name: str, t: TensorRef, real: int) -> TensorEntry:
    if t.numel < real:
        raise rk.doc.fail(
            f"{name}: holds {t.numel} elements, fewer than the {real} real ones of this rank", rk.rank
        )
    start, _ = rk.doc.zf.tensor_range(t, name)
    return TensorEntry(name, t.dtype, (real,), start, start + real * t.itemsize)


def _check_slice_mappings(ranks: list[_Rank], g: int, layout: Any, notes: list[str], r0: _Rank) -> None:
    """Cross-check DeepSpeed's per-rank ``param_slice_mappings`` against the layout derived from
    ``param_shapes``. They disagree under ``round_robin_gradients`` (DeepSpeed maps params in
    their group order while the flat buffer follows the round-robin order that
    ``param_shapes`` records, and its per-param APIs are then wrong); anywhere else a mismatch
    means the files do not belong together."""
    cfg = r0.doc.root.get("ds_config") if isinstance(r0.doc.root, dict) else None
    zcfg = cfg.get("zero_optimization") if isinstance(cfg, dict) else None
    round_robin = bool(isinstance(zcfg, dict) and zcfg.get("round_robin_gradients"))
    for rk in ranks:
        mappings = rk.osd.get("param_slice_mappings")
        if not isinstance(mappings, list) or g >= len(mappings) or not isinstance(mappings[g], dict):
            continue
        recorded = {}
        for name, addr in mappings[g].items():
            state = addr.state if isinstance(addr, Unknown) and isinstance(addr.state, dict) else None
            if state is None or _int_of(state.get("numel")) is None or _int_of(state.get("start")) is None:
                raise rk.doc.fail(
                    f"param_slice_mappings[{g}][{name!r}] is malformed: {_describe(addr)}", rk.rank
                )
            recorded[name] = (int(state["numel"]), int(state["start"]))
        ours = {
            layout.params[f.param_index].name: (f.numel, f.partition_start)
            for f in layout.fragments_of_rank(rk.rank)
        }
        if recorded == ours:
            continue
        diff = sorted(set(recorded.items()) ^ set(ours.items()))[:3]
        if round_robin:
            note = (
                f"group {g}: param_slice_mappings disagree with the param_shapes order "
                "(round_robin_gradients); offsets follow param_shapes, as zero_to_fp32 and the saved "
                "module weights do"
            )
            if note not in notes:
                notes.append(note)
            continue
        raise rk.doc.fail(
            f"group {g}: param_slice_mappings place params differently from the param_shapes order of "
            f"the model states file (e.g. {diff}); the files do not belong together",
            rk.rank,
        )


def verify_deepspeed_files(loc: Location, view: DeepSpeedView) -> int:
    """Every file of a DeepSpeed checkpoint (each rank's optim states and the model states)
    against the zip CRC-32s torch.save stored: called by the jobs that copy or convert one
    (reshard, convert, consolidate) before they commit an output. Returns the bytes read."""
    from zero_ckpt.formats.torch_zip import verify_record_crcs

    files = [f.path for f in view.manifest.shards]
    if view.manifest.model_file is not None:
        files.append(view.manifest.model_file.path)
    # one file per thread: zlib's CRC-32 releases the GIL
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(files)))) as pool:
        return sum(pool.map(lambda rel: verify_record_crcs(loc, rel), files))


# ----- what the registry's entry points (the package's ``__init__``) run ----------------------------


def source_view(loc: Location) -> "SourceView":
    """The DeepSpeed checkpoint at ``loc`` as a source view: rank r's optim file holds the real
    elements of its partition (one extent per rank and key), the model states file the
    module-only tensors. DeepSpeed records no checksums (see :func:`precheck`)."""
    from zero_ckpt.view import SourceView, header_model_tensors, rank_extents

    view = read_deepspeed(loc)
    manifest = view.manifest
    model = (
        header_model_tensors(manifest.model_file.path, view.model_header)
        if manifest.model_file is not None else ()
    )
    return SourceView(
        format="deepspeed",
        url=loc.url,
        manifest=manifest,
        state=rank_extents(manifest, view.headers),
        model=model,
        origin={"tag": view.tag or None, "notes": list(view.notes)},
    )


def precheck_files(loc: Location) -> None:
    """DeepSpeed records no checksums: its files are checked against their zip CRC-32s before
    anything is written, so a damaged source never shapes an output."""
    verify_deepspeed_files(loc, read_deepspeed(loc))


def verify_checkpoint(loc: Location, report: Any, chunk: int, progress: Any) -> Any:
    """DeepSpeed records no checksums: check the structure (reading the view checks every
    file is present, parses, agrees with the others and locates each range inside its file),
    then read every byte of every file once and compare each zip record with the CRC-32 the
    zip's central directory holds for it (``torch.save`` writes one per record)."""
    from zero_ckpt.transfer import ProgressTracker

    report.format, report.method = "deepspeed", "zip-crc32"
    try:
        view = read_deepspeed(loc)
    except CheckpointError as exc:
        report.problems.append(Problem(exc.path or loc.url, str(exc), "structure", exc.rank))
        return report
    report.manifest = view.manifest
    files = [*view.manifest.shards, *([view.manifest.model_file] if view.manifest.model_file else [])]
    sizes = {}
    for meta in files:
        try:
            sizes[meta.path] = loc.size(meta.path)
        except CheckpointError as exc:
            report.problems.append(Problem(loc.url_of(meta.path), str(exc), "missing", meta.rank))
    tracker = ProgressTracker(progress, sum(sizes.values()))
    for meta in files:
        if meta.path not in sizes:
            continue
        problems, nbytes = _verify_zip_crcs(loc, meta, sizes[meta.path], chunk, tracker)
        report.problems += problems
        report.bytes_checked += nbytes
        report.files_checked += 1
    report.notes.append(
        "DeepSpeed checkpoint: structure, sizes and layout cross-checked, and every byte "
        "compared with the zip CRC-32 torch.save stores per record (DeepSpeed itself records "
        "no checksums; convert it to get zero-ckpt's)"
    )
    return report


def _verify_zip_crcs(
    loc: Location, meta: FileMeta, size: int, chunk: int, tracker: Any
) -> tuple[list[Problem], int]:
    """Stream one ``torch.save`` zip file; every stored record's bytes against its CRC-32."""
    from zero_ckpt.formats.torch_zip import crc_failure_message, zip_crc_failures

    url = loc.url_of(meta.path)
    try:
        bad = zip_crc_failures(loc, meta.path, chunk, tracker.add)
    except CheckpointError as exc:
        kind = "size" if "short" in str(exc) or "truncated" in str(exc) else "structure"
        message = str(exc).removeprefix(url + ": ").removeprefix(url + " ")
        return [Problem(url, message, kind, meta.rank)], 0
    if not bad:
        return [], size
    return [Problem(url, crc_failure_message(bad), "checksum", meta.rank)], size
