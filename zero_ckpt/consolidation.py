"""``consolidate``: full named tensors out of a partitioned checkpoint, streaming, verified.

The output is Hugging Face style safetensors (``model.safetensors`` or
``model-0000i-of-0000K.safetensors`` + ``model.safetensors.index.json``), values from the fp32
masters cast per chunk, so memory stays bounded even for a parameter larger than RAM. Tied
weights are written once, as ``save_pretrained`` does (see :func:`tied_names_for`), and
``hf_config_from`` copies a model's Hugging Face config and tokenizer files next to the
weights, so ``AutoModelForCausalLM.from_pretrained(out)`` loads the folder as it is.

Completion: the job claims ``out`` with the marker ``zero-ckpt-incomplete.json`` before it
writes anything and removes it after the last file (the index) is in place; a folder holding
the marker is incomplete (see :mod:`zero_ckpt.destination`). :func:`consolidate_part` runs
one part of the job, its output files split over processes or hosts (see
:mod:`zero_ckpt.parts`): an output file is the unit of work, so use ``max_shard_size`` to get
several.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from zero_ckpt import __version__
from zero_ckpt.formats.registry import open_view, precheck
from zero_ckpt import knobs
from zero_ckpt.errors import CheckpointError, CorruptShardError, MissingShardError
from zero_ckpt.manifest import Manifest
from zero_ckpt.parts import PartResult, PartSpec, PartWork, make_job, resolve_part, run_part
from zero_ckpt.plan import ConsolidatePlan, plan_consolidate
from zero_ckpt.view import SourceView
from zero_ckpt.destination import check_reads, claim_destination, prepare_output
from zero_ckpt.storage import Location, open_location
from zero_ckpt.transfer import ProgressFn, ProgressTracker, WrittenFile, write_and_commit

__all__ = ["consolidate", "consolidate_part", "ConsolidateResult", "HF_FILES", "tied_names_for"]

# What a Hugging Face model folder holds besides its weights (config, generation settings,
# tokenizer and processor files): what ``hf_config_from`` copies when present.
HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
_HF_CONFIG = "config.json"
# Names Hugging Face drops from a tied set when it cannot ask the model class (nearly every
# causal LM declares ``_tied_weights_keys = {"lm_head.weight": <input embedding>}``).
_DEFAULT_TIED_KEYS = (r"lm_head\.weight",)


@dataclass(frozen=True)
class ConsolidateResult:
    """Where the output went: ``files`` (relative to ``out``, documents last), ``total_bytes``."""

    out: str
    files: list[str]
    total_bytes: int


def consolidate(
    src: str,
    out: str,
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    include_optimizer: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
    out_storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
    hf_config_from: str | None = None,
    hf_storage_options: dict[str, Any] | None = None,
    all_tied_names: bool = False,
    from_format: str = "auto",
) -> ConsolidateResult:
    """Write full tensors of the checkpoint at ``src`` to the directory ``out``.

    ``dtype``: output dtype of every param (default: each param's recorded model dtype);
    ``max_shard_size``: bytes per output file (a larger tensor gets a file of its own);
    ``include_optimizer``: also ``optimizer*.safetensors`` (``{param}.{key}``: the fp32 master
    and every state) and ``optimizer.json`` (hyperparameters, scalars). The checkpoint's
    ``model.safetensors`` (buffers, frozen params) is carried into the model files. Every
    master read is verified against the manifest's checksums.

    ``hf_config_from``: a Hugging Face model folder (URL; ``hf_storage_options``, default
    ``storage_options``); its ``config.json`` (required), ``generation_config.json`` and
    tokenizer files (:data:`HF_FILES`, those present) are copied next to the weights, streamed
    through the storage layer; they count as this job's output (``overwrite`` replaces them).
    The folder may be ``out`` itself (nothing is copied then). Tied weights (a param with
    aliases) are written under one name, the one ``save_pretrained`` keeps
    (:func:`tied_names_for`), unless ``all_tied_names``.

    ``out`` may hold files zero-ckpt does not write (a ``README.md``, user folders): they are
    kept. Files zero-ckpt writes there (earlier weights, an index, ``manifest.json``) make the
    call refuse unless ``overwrite``, which removes exactly those first. A second job into the
    same ``out`` fails at once; an interrupted one leaves ``out/zero-ckpt-incomplete.json``
    (see :mod:`zero_ckpt.destination`).

    To split the job over processes or hosts, use :func:`consolidate_part`.
    """
    with _job_locations(src, out, storage_options, out_storage_options, hf_config_from,
                        hf_storage_options) as (s, d, hf):
        view, plan = _plan(s, dtype, max_shard_size, include_optimizer, hf, all_tied_names, from_format)
        check_reads(d, sources=(s,), files=[(s, f.path) for f in view.files])
        hf.check_reads(d)
        with claim_destination(d, "consolidate", overwrite):
            prepare_output(d, overwrite, outputs=hf.outputs, folders=())
            copied: list[str] = []

            def commit(_: Mapping[str, WrittenFile]) -> None:
                try:
                    copied.extend(hf.copy_to(d, chunk_bytes, fsync))
                    for name, data in _documents_in_order(plan.documents):
                        d.write_atomic(name, data)
                except BaseException:
                    for path in [*hf.outputs, *plan.documents]:
                        d.remove(path)
                    raise

            written = write_and_commit(
                s, d, view, plan.files, commit, precheck=lambda: precheck(s, view),
                progress=ProgressTracker(progress, sum(op.src_nbytes for f in plan.files for op in f.ops)),
                workers=workers, chunk_bytes=chunk_bytes, fsync=fsync,
            )
    names = [f.path for f in plan.files] + copied + [n for n, _ in _documents_in_order(plan.documents)]
    total = (
        sum(w.bytes for w in written.values()) + hf.copied_bytes
        + sum(len(b) for b in plan.documents.values())
    )
    return ConsolidateResult(out, names, total)


def consolidate_part(
    src: str,
    out: str,
    *,
    part: tuple[int, int] | str | PartSpec,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    include_optimizer: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
    out_storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
    hf_config_from: str | None = None,
    hf_storage_options: dict[str, Any] | None = None,
    all_tied_names: bool = False,
    from_format: str = "auto",
) -> PartResult:
    """Run one part of :func:`consolidate` (same arguments) split over processes or hosts.

    ``part``: ``(i, n)``, ``"i/n"`` or a :class:`~zero_ckpt.parts.PartSpec` writes only part
    i of the output files split n ways (no process group); the part that completes the set
    verifies the pooled source checksums and writes the index/optimizer documents (and
    copies the Hugging Face files): ``PartResult.committed``, ``PartResult.outputs``. Until
    then ``out/_parts/`` marks the output incomplete. ``"distributed"``: this process is rank
    ``RANK`` of a torchrun launch (a collective; rank 0 commits). ``"auto"``:
    ``"distributed"`` when RANK and WORLD_SIZE are set, else the whole job runs here as part
    0/1 (the result is committed). See :mod:`zero_ckpt.parts` for the destination rules.
    """
    spec = resolve_part(part) or PartSpec(0, 1)  # "auto" outside torchrun: all of it, as 0/1
    with _job_locations(src, out, storage_options, out_storage_options, hf_config_from,
                        hf_storage_options) as (s, d, hf):
        return run_part(
            spec, s, d,
            lambda: _part_work(
                s, d, dtype, max_shard_size, include_optimizer, spec.parts, hf,
                all_tied_names, chunk_bytes, fsync, from_format,
            ),
            overwrite=overwrite, workers=workers, chunk_bytes=chunk_bytes, fsync=fsync,
            progress=progress,
        )


@contextmanager
def _job_locations(
    src: str, out: str, storage_options: dict[str, Any] | None,
    out_storage_options: dict[str, Any] | None, hf_config_from: str | None,
    hf_storage_options: dict[str, Any] | None,
) -> Iterator[tuple[Location, Location, "_HfFiles"]]:
    """The source, ``out`` and the Hugging Face files of a consolidate job, closed after it."""
    o_opts = storage_options if out_storage_options is None else out_storage_options
    h_opts = storage_options if hf_storage_options is None else hf_storage_options
    with open_location(src, storage_options) as s, open_location(out, o_opts) as d:
        hf = _HfFiles.open(hf_config_from, h_opts, d)
        try:
            yield s, d, hf
        finally:
            hf.close()


def tied_names_for(
    manifest: Manifest,
    config: Mapping[str, Any] | None = None,
    *,
    all_tied_names: bool = False,
    tied_keys: Sequence[str] | None = None,
) -> dict[str, tuple[str, ...]] | None:
    """For each param with aliases (tied weights), the names its value is written under, as
    ``save_pretrained`` does; None means every name (``all_tied_names``).

    Without a config: the param's recorded name only (the first name ``named_parameters``
    gives, e.g. GPT-2's ``transformer.wte.weight``; ``lm_head.weight`` is then its alias). With a
    Hugging Face ``config`` whose ``tie_word_embeddings`` is false, every name (the model will
    not tie them, so it needs each). Otherwise Hugging Face's rule: of a tied set, the names
    matching the model class's ``_tied_weights_keys`` (``tied_keys``; default: looked up from
    ``config["architectures"]`` when transformers is installed, else ``lm_head.weight``) are
    dropped, in sorted order, keeping at least one; if none match, the recorded name is kept.
    """
    if all_tied_names:
        return None
    if config is not None and config.get("tie_word_embeddings", True) is False:
        return None
    patterns = list(tied_keys) if tied_keys is not None else None
    out: dict[str, tuple[str, ...]] = {}
    for group in manifest.groups:
        for p in group.params:
            if not p.aliases:
                continue
            names = (p.name, *p.aliases)
            if config is None:
                out[p.name] = (p.name,)
                continue
            if patterns is None:
                patterns = _model_tied_keys(config)
            drop: set[str] = set()
            for name in sorted(names):
                if len(drop) + 1 >= len(names):
                    break
                if any(re.search(pat, name) for pat in patterns):
                    drop.add(name)
            kept = tuple(n for n in names if n not in drop)
            out[p.name] = kept if drop else (p.name,)
    return out


def _model_tied_keys(config: Mapping[str, Any]) -> list[str]:
    """The ``_tied_weights_keys`` of the config's architecture, when transformers has it."""
    try:
        import transformers  # optional: only to ask the model class its tied names
    except ImportError:
        return list(_DEFAULT_TIED_KEYS)
    keys: list[str] = []
    for arch in config.get("architectures") or []:
        try:
            cls = getattr(transformers, str(arch), None)
        except Exception:  # noqa: BLE001 - a lazy import that fails: fall back
            cls = None
        found = getattr(cls, "_tied_weights_keys", None)
        if isinstance(found, Mapping):
            keys += [str(k) for k in found]
        elif isinstance(found, (list, tuple)):
            keys += [str(k) for k in found]
    return keys or list(_DEFAULT_TIED_KEYS)


class _HfFiles:
    """The Hugging Face files ``hf_config_from`` names: which exist, their config, the copy."""

    def __init__(self, loc: Location | None, names: list[str], config: Mapping[str, Any] | None,
                 same_as_out: bool) -> None:
        self.loc = loc
        self.names = names
        self.config = config
        self.same_as_out = same_as_out
        self.copied_bytes = 0

    @classmethod
    def open(cls, url: str | None, options: dict[str, Any] | None, out: Location) -> "_HfFiles":
        if url is None:
            return cls(None, [], None, False)
        loc = open_location(url, options)
        try:
            cfg_url = loc.url_of(_HF_CONFIG)
            try:
                raw = loc.read_bytes(_HF_CONFIG)
            except MissingShardError:
                raise MissingShardError(
                    f"{cfg_url} is missing: --hf-config-from needs a Hugging Face model folder "
                    "holding config.json (model.config.save_pretrained(DIR) writes one)",
                    path=cfg_url,
                ) from None
            try:
                config = json.loads(raw)
                if not isinstance(config, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                raise CheckpointError(
                    f"{cfg_url} is not a JSON object ({exc}); point --hf-config-from at a folder "
                    "that model.config.save_pretrained wrote",
                    path=cfg_url,
                ) from None
            same = loc.same_storage_kind(out) and loc.canonical_root() == out.canonical_root()
            names = [] if same else [n for n in HF_FILES if loc.exists(n)]
            return cls(loc, names, config, same)
        except BaseException:
            loc.close()
            raise

    @property
    def outputs(self) -> tuple[str, ...]:
        """Files this job writes in ``out`` (counted as its own for ``overwrite``)."""
        return tuple(self.names)

    def check_reads(self, out: Location) -> None:
        if self.loc is not None and not self.same_as_out:
            check_reads(out, sources=(self.loc,))

    def copy_to(self, d: Location, chunk_bytes: int | None, fsync: bool | None) -> list[str]:
        """Stream every file into ``d`` (each visible only when complete)."""
        if self.loc is None:
            return []
        chunk = chunk_bytes or knobs.chunk_bytes()
        for name in self.names:
            size = self.loc.size(name)
            with d.writer(name, size) as w:
                for start in range(0, size, chunk):
                    data = self.loc.read_range(name, start, min(size, start + chunk))
                    if not data:
                        break
                    w.write(data)
                if w.bytes_written != size:
                    raise CorruptShardError(
                        f"{self.loc.url_of(name)} changed size while it was copied "
                        f"({w.bytes_written} bytes read, {size} expected); run the job again",
                        path=self.loc.url_of(name),
                    )
                w.commit(fsync=fsync)
            self.copied_bytes += size
        return list(self.names)

    def close(self) -> None:
        if self.loc is not None:
            self.loc.close()


def _documents_in_order(documents: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """The model index last: the output is complete once it (and then the marker's removal)
    is there."""
    return sorted(documents.items(), key=lambda kv: kv[0] == "model.safetensors.index.json")


def _plan(
    s: Location, dtype: str | None, max_shard_size: int | None, include_optimizer: bool,
    hf: _HfFiles, all_tied_names: bool, from_format: str,
) -> tuple[SourceView, ConsolidatePlan]:
    # Any registered format: the view says where every byte is. What its checksums (or the zip
    # CRC-32s of records read whole) do not cover as it streams, the format checks before commit.
    view = open_view(s, from_format)
    plan = plan_consolidate(
        view, dtype=dtype, max_shard_size=max_shard_size, include_optimizer=include_optimizer,
        tied_names=tied_names_for(view.manifest, hf.config, all_tied_names=all_tied_names),
    )
    return view, plan


def _part_work(
    s: Location, d: Location, dtype: str | None, max_shard_size: int | None,
    include_optimizer: bool, parts: int, hf: _HfFiles, all_tied_names: bool,
    chunk_bytes: int | None, fsync: bool | None, from_format: str,
) -> PartWork:
    view, plan = _plan(s, dtype, max_shard_size, include_optimizer, hf, all_tied_names, from_format)
    precheck(s, view)  # a part sees only its share of the reads: the format checks its files first
    hf.check_reads(d)
    options = {"dtype": dtype, "max_shard_size": max_shard_size, "include_optimizer": include_optimizer}
    if hf.loc is not None:
        options["hf_files"] = list(hf.names)
    if all_tied_names:
        options["all_tied_names"] = True
    summary = "consolidate" + "".join(
        f", {k} {v}" for k, v in options.items() if v not in (None, False)
    )
    job = make_job("consolidate", options, view.manifest, parts, __version__, summary)

    def commit(written: Mapping[str, WrittenFile]) -> None:
        hf.copy_to(d, chunk_bytes, fsync)
        for name, data in _documents_in_order(plan.documents):
            d.write_atomic(name, data)

    return PartWork(
        job, plan.files, tuple(hf.outputs) + tuple(plan.documents), view.checked_files,
        view.checks.headers, view.checks.header_crcs, commit,
    )
