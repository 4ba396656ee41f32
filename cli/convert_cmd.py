"""``zero-ckpt convert SRC DST``: a DeepSpeed ZeRO-1/2, plain torch or zero-ckpt checkpoint into
format v1."""

from __future__ import annotations

from typing import Any

import click

from cli._common import cli_options, common_options, echo_json, json_option, progress_bar


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--from-format",
    type=click.Choice(["auto", "deepspeed", "torch", "zero-ckpt"]),
    default="auto",
    show_default=True,
    help=(
        "Format of SRC; auto detects it (manifest.json, DeepSpeed's latest / *_optim_states.pt, "
        "or a folder with optimizer.pt / a .pt file for plain torch)."
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
    to_world_size: int | None,
    model_path: str | None,
    param_names: str | None,
    overwrite: bool,
    as_json: bool,
    storage_options: dict[str, Any],
    quiet: bool,
) -> None:
    """Write the checkpoint SRC as a zero-ckpt (format v1) checkpoint DST.

    SRC may be a DeepSpeed run folder (with its `latest` file) or a global_stepN folder of a
    ZeRO stage 1 or 2 run (fp32, bf16). Byte ranges are streamed out of DeepSpeed's .pt files
    without loading them and without running any code from them; memory stays bounded.

    SRC may also be a plain PyTorch checkpoint: a folder with optimizer.pt (optimizer.state_dict())
    and model.safetensors or model.pt (model.state_dict()), plus param_names.json when the
    optimizer was not built from named parameters; or one .pt file holding both under
    "optimizer" and "model". It is loaded with torch.load(weights_only=True) and written at
    --to M ranks (default 1). DST gets its manifest last, so an interrupted convert never
    looks complete.

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
    """
    from zero_ckpt.conversion import convert as convert_checkpoint

    opts = cli_options(ctx, storage_options, quiet)
    with progress_bar("convert", quiet=opts.quiet) as progress:
        manifest = convert_checkpoint(
            src,
            dst,
            from_format=from_format,
            world_size=to_world_size,
            overwrite=overwrite,
            progress=progress,
            storage_options=opts.storage_options,
            model=model_path,
            param_names=param_names,
        )
    source = manifest.extra.get("converted_from") or {}
    if as_json:
        echo_json(
            {
                "src": src,
                "dst": dst,
                "from_format": source.get("format", "zero-ckpt"),
                "source_world_size": source.get("world_size"),
                "world_size": manifest.world_size,
                "shard_count": len(manifest.shards),
                "shard_bytes": manifest.shard_bytes,
                "notes": source.get("notes", []),
                "files": [s.path for s in manifest.shards]
                + ([manifest.model_file.path] if manifest.model_file else []),
            }
        )
    else:
        from zero_ckpt.summary import format_bytes

        origin = f" ({source['format']}, world size {source['world_size']})" if source else ""
        click.echo(
            f"converted {src}{origin} -> {dst}: world size {manifest.world_size}, "
            f"{len(manifest.shards)} shards, {format_bytes(manifest.shard_bytes)}"
        )
        for note in source.get("notes", []):
            click.echo(f"  note: {note}")
