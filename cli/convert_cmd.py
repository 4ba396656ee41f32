"""``zero-ckpt convert SRC DST``: a checkpoint in any registered format (zero-ckpt, PyTorch DCP,
DeepSpeed ZeRO-1/2, plain torch) written in another (zero-ckpt by default, DCP, DeepSpeed)."""

from __future__ import annotations

from typing import Any

import click

from cli._common import cli_options, common_options, echo_json, json_option, progress_bar


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--from-format",
    type=click.Choice(["auto", "zero-ckpt", "dcp", "deepspeed", "torch"]),
    default="auto",
    show_default=True,
    help=(
        "Format of SRC; auto detects it (manifest.json, DCP's .metadata, DeepSpeed's latest / "
        "*_optim_states.pt, or a folder with optimizer.pt / a .pt file for plain torch)."
    ),
)
@click.option(
    "--to-format",
    type=click.Choice(["zero-ckpt", "dcp", "deepspeed"]),
    default="zero-ckpt",
    show_default=True,
    help=(
        "Format of DST: zero-ckpt (format v1), dcp (what dcp.save writes for an FSDP2 model + "
        "torch optimizer at --to M ranks; dcp.load reads it at any size) or deepspeed (a ZeRO-1/2 "
        "run folder engine.load_checkpoint resumes at --to M ranks)."
    ),
)
@click.option(
    "--to",
    "to_world_size",
    type=click.IntRange(min=1),
    default=None,
    metavar="M",
    help="Data-parallel world size of the result (default: the source's).",
)
@click.option(
    "--model",
    "model_path",
    default=None,
    metavar="FILE",
    help="torch sources: the model state dict (.safetensors or .pt) when SRC does not hold it.",
)
@click.option(
    "--param-names",
    default=None,
    metavar="FILE",
    help=(
        "torch sources: JSON list of the parameter names in the optimizer's id order (or one "
        "list per param group), when the state dict does not record them."
    ),
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the checkpoint files zero-ckpt wrote in DST before (other files are kept).",
)
@json_option
@common_options
@click.pass_context
def convert(
    ctx: click.Context,
    src: str,
    dst: str,
    from_format: str,
    to_format: str,
    to_world_size: int | None,
    model_path: str | None,
    param_names: str | None,
    overwrite: bool,
    as_json: bool,
    storage_options: dict[str, Any],
    quiet: bool,
) -> None:
    """Write the checkpoint SRC again as DST, in --to-format (zero-ckpt by default).

    SRC may be a zero-ckpt checkpoint; a PyTorch distributed checkpoint (DCP) of a model and a
    torch optimizer, as dcp.save writes get_state_dict's output (FSDP2 dim-0 shards, DDP,
    single device); a DeepSpeed run folder (with its `latest` file) or a global_stepN folder of
    a ZeRO stage 1 or 2 run (fp32, bf16). Byte ranges are streamed out of the source's files
    without loading them and without running any code from them; memory stays bounded.

    SRC may also be a plain PyTorch checkpoint: a folder with optimizer.pt (optimizer.state_dict())
    and model.safetensors or model.pt (model.state_dict()), plus param_names.json when the
    optimizer was not built from named parameters; or one .pt file holding both under
    "optimizer" and "model". It is loaded with torch.load(weights_only=True) and written at
    --to M ranks (default 1). DST gets its commit file (manifest.json, .metadata, latest) last,
    so an interrupted convert never looks complete.

    SRC, --model and --param-names are never written: a DST that is, contains or lies inside
    any of them is refused. DST may hold files zero-ckpt does not write, outside shards/ (they
    are kept); checkpoint files already there are refused unless --overwrite, which removes
    exactly those. While it runs DST holds zero-ckpt-incomplete.json (created exclusively: a
    second job into DST fails at once); if it is left there the job was interrupted.

    \b
    Examples:
      zero-ckpt convert ./run1 ./run1-zc
      zero-ckpt convert ./run1/global_step1200 ./step1200-dp16 --to 16
      zero-ckpt convert s3://bucket/run1 ./local --from-format deepspeed -o anon=true
      zero-ckpt convert ./torch-ckpt ./step1200-dp8 --to 8 --param-names names.json
      zero-ckpt convert ./fsdp-run/step-1200 ./step1200-zc --to 16          # DCP in
      zero-ckpt convert ./step1200-zc ./step1200-dcp --to-format dcp --to 64  # DCP out
    """
    from zero_ckpt.conversion import convert as convert_checkpoint

    opts = cli_options(ctx, storage_options, quiet)
    with progress_bar("convert", quiet=opts.quiet) as progress:
        result = convert_checkpoint(
            src,
            dst,
            from_format=from_format,
            to_format=to_format,
            world_size=to_world_size,
            overwrite=overwrite,
            progress=progress,
            storage_options=opts.storage_options,
            model=model_path,
            param_names=param_names,
        )
    manifest = result.manifest
    source = (manifest.extra.get("converted_from") or {}) if manifest is not None else {}
    if as_json:
        doc: dict[str, Any] = {
            "src": src,
            "dst": dst,
            "to_format": result.format,
            "world_size": result.world_size,
            "files": list(result.files),
            "bytes": result.bytes,
            "notes": list(result.notes),
        }
        if manifest is not None:
            doc.update(
                from_format=source.get("format", "zero-ckpt"),
                source_world_size=source.get("world_size"),
                shard_count=len(manifest.shards),
                shard_bytes=manifest.shard_bytes,
                files=[s.path for s in manifest.shards]
                + ([manifest.model_file.path] if manifest.model_file else []),
            )
        echo_json(doc)
        return
    from zero_ckpt.summary import format_bytes

    if manifest is not None:
        origin = f" ({source['format']}, world size {source['world_size']})" if source else ""
        click.echo(
            f"converted {src}{origin} -> {dst}: world size {manifest.world_size}, "
            f"{len(manifest.shards)} shards, {format_bytes(manifest.shard_bytes)}"
        )
    else:
        tag = f", tag {result.tag}" if result.tag else ""
        click.echo(
            f"converted {src} -> {dst} as {result.format}: world size {result.world_size}{tag}, "
            f"{len(result.files)} files, {format_bytes(result.bytes)}"
        )
    for note in result.notes:
        click.echo(f"  note: {note}")
