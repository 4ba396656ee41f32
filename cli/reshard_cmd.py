"""``zero-ckpt reshard SRC DST --to M``: re-cut a checkpoint for another data-parallel size."""

from __future__ import annotations

from typing import Any

import click

from cli._common import cli_options, common_options, echo_json, json_option, progress_bar


@click.command("reshard")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--to",
    "to_world_size",
    type=click.IntRange(min=1),
    required=True,
    metavar="M",
    help="Data-parallel world size of the new checkpoint.",
)
@click.option(
    "--from",
    "from_world_size",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="World size you expect SRC to have; refused (exit 1) if the manifest says otherwise.",
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it already holds a checkpoint.")
@json_option
@common_options
@click.pass_context
def reshard(
    ctx: click.Context,
    src: str,
    dst: str,
    to_world_size: int,
    from_world_size: int | None,
    overwrite: bool,
    as_json: bool,
    storage_options: dict[str, Any],
    quiet: bool,
) -> None:
    """Write the checkpoint SRC again as DST, partitioned for M ranks.

    Only byte ranges move: no value changes, no GPU or process group is needed, memory stays
    bounded. DST gets its manifest last, so an interrupted reshard never looks complete.

    \b
    Examples:
      zero-ckpt reshard ./step-1200 ./step-1200-dp16 --from 8 --to 16
      zero-ckpt reshard s3://bucket/run1/step-1200 ./dp3 --to 3 -o anon=true
    """
    import zero_ckpt

    opts = cli_options(ctx, storage_options, quiet)
    with progress_bar("reshard", quiet=opts.quiet) as progress:
        manifest = zero_ckpt.reshard(
            src,
            dst,
            world_size=to_world_size,
            expected_world_size=from_world_size,
            overwrite=overwrite,
            progress=progress,
            storage_options=opts.storage_options,
        )
    if as_json:
        echo_json(
            {
                "src": src,
                "dst": dst,
                "world_size": manifest.world_size,
                "shard_count": len(manifest.shards),
                "shard_bytes": manifest.shard_bytes,
                "files": [s.path for s in manifest.shards]
                + ([manifest.model_file.path] if manifest.model_file else []),
            }
        )
    else:
        from zero_ckpt.summary import format_bytes

        click.echo(
            f"resharded {src} -> {dst}: world size {manifest.world_size}, "
            f"{len(manifest.shards)} shards, {format_bytes(manifest.shard_bytes)}"
        )
