"""``convert``: a foreign checkpoint (DeepSpeed ZeRO-1/2, plain torch) into format v1.

The source is read as a format-v1 view (:mod:`zero_ckpt.formats.deepspeed`): its shards are
the DeepSpeed ``*_optim_states.pt`` files and its headers the byte ranges of the real elements
inside them, so the ordinary planners and engine do the work: ``plan_reshard`` cuts the new
shards (at the source's world size, or another one), and the model file (buffers, frozen params)
is written as ``model.safetensors`` from byte ranges of ``mp_rank_00_model_states.pt``. Nothing
is loaded whole; memory stays within the engine's buffers. :func:`consolidate_source` does the
same for full tensors (``zero_to_fp32`` without the memory), and with ``format="torch"``
writes plain torch files (``optimizer.pt`` + model) instead.

Plain torch sources (a folder with ``optimizer.pt`` and ``model.safetensors``/``model.pt``, or
one ``.pt`` training checkpoint) are imported by :mod:`zero_ckpt.formats.torch_optim`: a torch
optimizer state dict keys its state by param id with no byte layout to stream from, so it is
loaded (memory-mapped when local) and written one rank's shard at a time.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from zero_ckpt.errors import CheckpointError, LayoutMismatchError
from zero_ckpt.formats import FORMATS, detect_location_format, is_torch_folder
from zero_ckpt.formats.deepspeed import DeepSpeedView, read_deepspeed, verify_deepspeed_files
from zero_ckpt.manifest import MANIFEST_NAME, MODEL_FILE_NAME, Manifest
from zero_ckpt.plan import CopyOp, FilePlan, plan_reshard
from zero_ckpt.safetensors_format import SafetensorsHeader, build_header
from zero_ckpt.destination import check_reads, claim_destination, prepare_output
from zero_ckpt.storage import Location, open_location
from zero_ckpt.transfer import ProgressFn, ProgressTracker, run_file_plans

__all__ = ["convert", "consolidate_source", "plan_model_file", "check_format"]

_VERSION = "0.1.0"


def check_format(loc: Location, from_format: str) -> str:
    """The source format to read ``loc`` as: ``from_format`` when it names one, else detected
    (a folder holding ``optimizer.pt`` is a plain torch checkpoint, whatever model file sits
    next to it). CheckpointError naming the choices for an unknown name."""
    if from_format == "auto":
        if is_torch_folder(loc):
            return "torch"
        return detect_location_format(loc)
    if from_format not in FORMATS:
        raise CheckpointError(
            f"unknown source format {from_format!r}; choose 'auto' or one of {', '.join(FORMATS)}"
        )
    return from_format



def plan_model_file(
    model_path: str, model_header: SafetensorsHeader, dst: str = MODEL_FILE_NAME
) -> FilePlan:
    """A plan writing ``dst`` (safetensors, tensors sorted by name as ``write_model_file``
    does) from the byte ranges ``model_header`` locates in ``model_path`` (relative to the
    source location). Used for sources whose model file is not safetensors (DeepSpeed)."""
    entries = sorted(model_header.tensors.values(), key=lambda e: e.name)
    header_bytes, header = build_header([(e.name, e.dtype, e.shape) for e in entries], {"format": "pt"})
    ops = []
    seen: set[tuple[int, int]] = set()
    for e in entries:
        out = header.tensors[e.name]
        ops.append(
            CopyOp(
                model_path, e.name, 0, e.start, e.name, 0, out.start, e.numel, e.dtype, e.dtype,
                check_source=(e.start, e.end) not in seen,
            )
        )
        seen.add((e.start, e.end))
    return FilePlan(dst, header_bytes, header, tuple(ops), header.file_bytes)


def convert(
    src: str,
    dst: str,
    *,
    from_format: str = "auto",
    world_size: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
    model: str | None = None,
    param_names: Any = None,
) -> Manifest:
    """Write the checkpoint at ``src`` to ``dst`` in format v1; returns the new manifest.

    ``from_format``: ``"auto"`` (detect), ``"deepspeed"`` (a run folder with ``latest`` or a
    ``global_stepN`` folder of ZeRO stage 1/2), ``"torch"`` (a folder with ``optimizer.pt`` and
    ``model.safetensors``/``model.pt`` (+ ``param_names.json``), or one ``.pt`` training
    checkpoint; see :mod:`zero_ckpt.formats.torch_optim`) or ``"zero-ckpt"`` (a reshard).
    ``world_size``: shards of the result (default: the source's data-parallel size; 1 for a
    plain torch source). ``model``/``param_names``: torch sources only: the model state dict
    file and the param names (a list, or the URL of a JSON list) when the source lacks them.
    DeepSpeed and zero-ckpt sources are streamed as byte ranges with bounded memory (a torch
    state dict has no byte layout to stream: it is loaded, memory-mapped when local, and
    written one rank's shard at a time); ``manifest.json`` is written last, and on any error ``dst`` keeps nothing this call wrote. DeepSpeed files carry
    no checksums, so the result's checksums are those of the bytes read.
    """
    if world_size is not None and world_size < 1:
        raise LayoutMismatchError(f"target world size must be at least 1, got {world_size}")
    with open_location(src, storage_options) as s:
        fmt = check_format(s, from_format)
        if fmt == "zero-ckpt":
            from zero_ckpt.resharding import reshard
            from zero_ckpt.transfer import load_manifest

            ws = world_size or load_manifest(s).world_size
            return reshard(
                src, dst, world_size=ws, overwrite=overwrite, progress=progress,
                storage_options=storage_options, dst_storage_options=dst_storage_options,
                workers=workers, chunk_bytes=chunk_bytes, fsync=fsync,
            )
        if fmt == "torch":
            from zero_ckpt.formats.torch_optim import import_torch_files

            d_opts = storage_options if dst_storage_options is None else dst_storage_options
            reads = [(src, storage_options)] + [
                (u, storage_options) for u in (model, param_names) if isinstance(u, str)
            ]
            with open_location(dst, d_opts) as d:
                # the source file or folder, --model and --param-names: none may be in dst
                check_reads(d, urls=reads)
                with claim_destination(d, "convert", overwrite):
                    return import_torch_files(
                        src, dst, world_size=world_size or 1, model=model,
                        param_names=param_names, overwrite=overwrite,
                        storage_options=storage_options, dst_storage_options=dst_storage_options,
                        fsync=fsync,
                    )
        if model is not None or param_names is not None:
            raise CheckpointError(
                f"{src} is a {fmt} checkpoint; model= and param_names= apply to plain torch "
                "sources only",
                path=src,
            )
        if fmt != "deepspeed":
            raise CheckpointError(
                f"{src} is a {fmt} checkpoint; convert reads DeepSpeed ZeRO-1/2, plain torch and "
                "zero-ckpt checkpoints",
                path=src,
            )
        view = read_deepspeed(s)
        with open_location(dst, storage_options if dst_storage_options is None else dst_storage_options) as d:
            return _convert_view(
                s, d, view, world_size or view.manifest.world_size, overwrite, progress, workers,
                chunk_bytes, fsync, src,
            )


def _convert_view(
    s: Location,
    d: Location,
    view: DeepSpeedView,
    world_size: int,
    overwrite: bool,
    progress: ProgressFn | None,
    workers: int | None,
    chunk_bytes: int | None,
    fsync: bool | None,
    src: str,
) -> Manifest:
    source = view.manifest
    plan = plan_reshard(replace(source, model_file=None), view.headers, world_size)
    files = list(plan.files)
    if view.model_header is not None and source.model_file is not None:
        files.append(plan_model_file(source.model_file.path, view.model_header))
    check_reads(d, sources=(s,), files=[(s, f.path) for f in source.shards]
                + ([(s, source.model_file.path)] if source.model_file else []))
    # DeepSpeed records no checksums: its files are checked against their zip CRC-32s before
    # anything is written, so a damaged source never shapes an output
    verify_deepspeed_files(s, view)
    with claim_destination(d, "convert", overwrite):
        prepare_output(d, overwrite, folders=("shards",))
        return _write_view(s, d, view, plan, files, progress, workers, chunk_bytes, fsync, src)


def _write_view(
    s: Location,
    d: Location,
    view: DeepSpeedView,
    plan: Any,
    files: list[FilePlan],
    progress: ProgressFn | None,
    workers: int | None,
    chunk_bytes: int | None,
    fsync: bool | None,
    src: str,
) -> Manifest:
    source = view.manifest
    tracker = ProgressTracker(progress, sum(f.data_bytes for f in files))
    written = run_file_plans(
        s, d, files, workers=workers, chunk_bytes=chunk_bytes, progress=tracker, fsync=fsync
    )
    try:
        shards = tuple(written[f.path].meta(f.rank) for f in plan.files if f.rank is not None)
        model_file = written[MODEL_FILE_NAME].meta() if MODEL_FILE_NAME in written else None
        extra = dict(source.extra)
        extra["converted_from"] = {
            "format": "deepspeed",
            "url": src,
            "tag": view.tag or None,
            "world_size": source.world_size,
            "created_by": source.created_by,
            "notes": list(view.notes),
        }
        target = replace(
            plan.target,
            shards=shards,
            model_file=model_file,
            extra=extra,
            created_by=f"zero-ckpt {_VERSION}",
        ).validate(d.url_of(MANIFEST_NAME))
        d.write_atomic(MANIFEST_NAME, target.to_json().encode())
    except BaseException:
        for path in written:
            d.remove(path)
        raise
    return target


def consolidate_source(
    src: str,
    out: str,
    *,
    from_format: str = "auto",
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
    format: str = "safetensors",
    model_format: str = "safetensors",
    all_tied_names: bool = True,
) -> list[str]:
    """Full named tensors of the checkpoint at ``src`` (any readable format) in ``out``, as
    :func:`zero_ckpt.consolidate` writes them; returns the files written (relative to ``out``).

    ``format="torch"``: plain torch files instead, ``optimizer.pt`` (a state dict that
    ``optimizer.load_state_dict`` of a plain torch optimizer accepts) and the model as
    ``model.safetensors`` (``model_format="safetensors"``, the default) or ``model.pt``
    (``"pt"``); see :func:`zero_ckpt.formats.torch_optim.export_torch`, whose memory is that of
    the optimizer state (``torch.save`` needs the objects). ``include_optimizer`` is implied.

    For a DeepSpeed ZeRO-1/2 checkpoint the result holds what DeepSpeed's ``zero_to_fp32.py``
    gives (bit for bit with ``dtype="float32"``), plus the frozen params ZeRO-1 checkpoints keep
    only in the module weights and every tied name (as a torch state dict has them; pass
    ``all_tied_names=False`` for one name per tied set, as ``save_pretrained`` writes), in
    bounded memory.
    """
    if format == "torch":
        from zero_ckpt.formats.torch_optim import export_torch

        o_opts = storage_options if out_storage_options is None else out_storage_options
        with open_location(src, storage_options) as s, open_location(out, o_opts) as d:
            check_reads(d, sources=(s,))
            with claim_destination(d, "consolidate", overwrite):
                return export_torch(
                    src, out, from_format=from_format, model_format=model_format, dtype=dtype,
                    max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                    storage_options=storage_options, out_storage_options=out_storage_options,
                    workers=workers, chunk_bytes=chunk_bytes, fsync=fsync,
                ).files
    if format != "safetensors":
        raise CheckpointError(f"unknown output format {format!r}; choose 'safetensors' or 'torch'")
    with open_location(src, storage_options) as s:
        fmt = check_format(s, from_format)
    if fmt not in ("zero-ckpt", "deepspeed"):
        raise CheckpointError(
            f"{src} is a {fmt} checkpoint, which consolidate does not read; it is full "
            "tensors already (zero-ckpt convert --from-format torch makes it a zero-ckpt one)",
            path=src,
        )
    from zero_ckpt.consolidation import consolidate  # reads both formats in place

    result = consolidate(
        src, out, dtype=dtype, max_shard_size=max_shard_size,
        include_optimizer=include_optimizer, overwrite=overwrite, progress=progress,
        storage_options=storage_options, out_storage_options=out_storage_options,
        workers=workers, chunk_bytes=chunk_bytes, fsync=fsync, all_tied_names=all_tied_names,
    )
    return list(result.files)
