"""``convert``: a checkpoint in any registered format written in another (format v1 by default).

The source is opened as a :class:`~zero_ckpt.view.SourceView` by its format package (see
:mod:`zero_ckpt.formats.registry`) and handed to the target format's writer: format v1
(``zero_ckpt.formats.v1.write``, the same writer ``reshard`` uses), DeepSpeed ZeRO-1/2 or
PyTorch DCP. Nothing is loaded whole; memory stays within the engine's buffers. Formats without
checksums of their own (DeepSpeed, DCP, torch) are checked against their zip CRC-32s before the
output is committed (as the bytes stream where the view allows).

Plain torch sources (a folder with ``optimizer.pt`` and ``model.safetensors``/``model.pt``, or
one ``.pt`` training checkpoint) have no byte layout to stream from: their format package
*imports* them (:mod:`zero_ckpt.formats.torch_optim`), loading them (memory-mapped when local)
and writing one rank's shard at a time. :func:`consolidate_source` writes full tensors
(safetensors or plain torch files) of any source.
"""

from __future__ import annotations

from typing import Any

from zero_ckpt.destination import check_reads, claim_destination
from zero_ckpt.errors import CheckpointError, LayoutMismatchError
from zero_ckpt.formats.registry import format_module, precheck, resolve, writer_for
from zero_ckpt.manifest import MANIFEST_NAME, Manifest
from zero_ckpt.storage import Location, open_location
from zero_ckpt.transfer import ProgressFn
from zero_ckpt.view import WriteResult

__all__ = ["convert", "consolidate_source"]


def convert(
    src: str,
    dst: str,
    *,
    from_format: str = "auto",
    to_format: str = "zero-ckpt",
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
    tag: str | None = None,
    expected_world_size: int | None = None,
) -> WriteResult:
    """Write the checkpoint at ``src`` to ``dst`` in ``to_format``; returns what was written
    (``.manifest``: the new manifest when ``to_format`` is format v1).

    ``from_format``: ``"auto"`` (detect) or a registered name: ``"zero-ckpt"``, ``"dcp"``
    (PyTorch distributed checkpoint of a model + torch optimizer, as ``get_state_dict`` gives
    them), ``"deepspeed"`` (a run folder with ``latest`` or a ``global_stepN`` folder of ZeRO
    stage 1/2), ``"torch"`` (a folder with ``optimizer.pt`` and ``model.safetensors``/
    ``model.pt`` (+ ``param_names.json``), or one ``.pt`` training checkpoint; see
    :mod:`zero_ckpt.formats.torch_optim`). ``to_format``: ``"zero-ckpt"``, ``"deepspeed"``
    or ``"dcp"``. ``world_size``: data-parallel size of the result (default: the source's;
    1 for a plain torch source). ``model``/``param_names``: torch sources only: the model state
    dict file and the param names (a list, or the URL of a JSON list) when the source lacks
    them. ``tag``: the tag folder of a DeepSpeed target (default: the source's, else
    ``global_step<N>``). ``expected_world_size``: refused unless the source was saved at that
    size (None: any). The target's completion marker is written last, and on any error ``dst`` keeps
    nothing this call wrote. Sources without checksums give a result whose checksums are those
    of the bytes read.
    """
    if world_size is not None and world_size < 1:
        raise LayoutMismatchError(f"target world size must be at least 1, got {world_size}")
    d_opts = storage_options if dst_storage_options is None else dst_storage_options
    with open_location(src, storage_options) as s:
        fmt = resolve(s, from_format)
        module = format_module(fmt)
        importer = getattr(module, "import_source", None)
        if importer is None and (model is not None or param_names is not None):
            raise CheckpointError(
                f"{src} is a {fmt} checkpoint; model= and param_names= apply to plain torch "
                "sources only",
                path=src,
            )
        # a source without a byte layout everywhere (plain torch) imports itself into format
        # v1 (streaming through its view when it can); to other targets it must be viewable
        if importer is not None and to_format == "zero-ckpt":
            reads = [(src, storage_options)] + [
                (u, storage_options) for u in (model, param_names) if isinstance(u, str)
            ]
            with open_location(dst, d_opts) as d:
                # the source file or folder, --model and --param-names: none may be in dst
                check_reads(d, urls=reads)
                with claim_destination(d, "convert", overwrite):
                    return _result(d, importer(
                        src, dst, world_size=world_size or 1, model=model,
                        param_names=param_names, overwrite=overwrite,
                        storage_options=storage_options, dst_storage_options=dst_storage_options,
                        fsync=fsync,
                    ))
        write = writer_for(to_format)
        view = module.open_view(s)
        view.check_saved_world_size(expected_world_size)
        with open_location(dst, d_opts) as d:
            return _result(d, write(
                s, d, view, world_size=world_size or view.manifest.world_size,
                overwrite=overwrite, progress=progress, workers=workers,
                chunk_bytes=chunk_bytes, fsync=fsync, src_url=src, tag=tag,
                precheck=lambda: precheck(s, view),
            ))


def _result(d: Location, written: Manifest | WriteResult) -> WriteResult:
    if isinstance(written, WriteResult):
        return written
    m = written
    files = tuple(f.path for f in (*m.shards, *((m.model_file,) if m.model_file else ()))) + (MANIFEST_NAME,)
    notes = tuple((m.extra.get("converted_from") or {}).get("notes", ()))
    nbytes = m.shard_bytes + (m.model_file.bytes if m.model_file else 0)
    return WriteResult("zero-ckpt", d.url, m.world_size, files, nbytes, notes, manifest=m)


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
        fmt = resolve(s, from_format)
    from zero_ckpt.consolidation import consolidate  # reads every viewable format in place

    result = consolidate(
        src, out, dtype=dtype, max_shard_size=max_shard_size,
        include_optimizer=include_optimizer, overwrite=overwrite, progress=progress,
        storage_options=storage_options, out_storage_options=out_storage_options,
        workers=workers, chunk_bytes=chunk_bytes, fsync=fsync, all_tied_names=all_tied_names,
        from_format=fmt,
    )
    return list(result.files)
