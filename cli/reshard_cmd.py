"""``zero-ckpt reshard SRC DST --to M``: re-cut a checkpoint for another data-parallel size."""

from __future__ import annotations

from typing import Any

import click

from cli._common import (
    announce_part,
    cli_options,
    common_options,
    echo_json,
    echo_part,
    json_option,
    part_options,
    progress_bar,
)

FORMATS = ("zero-ckpt", "deepspeed", "deepspeed-universal")


@click.command("reshard")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--to",
    "to_world_size",
    type=click.IntRange(min=1),
    default=None,
    metavar="M",
    help="Data-parallel world size of the new checkpoint (required, except with --format deepspeed-universal).",
)
@click.option(
    "--from",
    "from_world_size",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="World size you expect SRC to have; refused (exit 1) if the manifest says otherwise.",
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(FORMATS),
    default="zero-ckpt",
    show_default=True,
    help=(
        "What DST becomes: zero-ckpt (format v1), deepspeed (a DeepSpeed ZeRO-1/2 run folder that "
        "DeepSpeed loads at M ranks) or deepspeed-universal (DeepSpeed's universal checkpoint, any size)."
    ),
)
@click.option(
    "--tag",
    default=None,
    metavar="NAME",
    help="DeepSpeed formats: the tag folder to write (default: the source's tag, else global_step<N>).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the checkpoint files zero-ckpt wrote in DST before (other files are kept).",
)
@part_options
@json_option
@common_options
@click.pass_context
def reshard(
    ctx: click.Context,
    src: str,
    dst: str,
    to_world_size: int | None,
    from_world_size: int | None,
    out_format: str,
    tag: str | None,
    overwrite: bool,
    part: Any,
    workers: int | None,
    as_json: bool,
    storage_options: dict[str, Any],
    quiet: bool,
) -> None:
    """Write the checkpoint SRC again as DST, partitioned for M ranks.

    Only byte ranges move: no value changes, no GPU or process group is needed, memory stays
    bounded. DST gets its manifest last, so an interrupted reshard never looks complete.

    SRC may be a format-v1 or a DeepSpeed ZeRO-1/2 checkpoint. With --format deepspeed, DST is
    a DeepSpeed run folder (its 'latest' file written last) that engine.load_checkpoint(DST)
    resumes at M data-parallel ranks with the optimizer state intact; with --format
    deepspeed-universal, DeepSpeed's universal layout (its 'latest_universal' written last).

    DST may hold files zero-ckpt does not write, outside shards/ (they are kept); a file of
    another kind inside DST/shards/ is refused. Checkpoint files already there (manifest.json,
    shards, model.safetensors) are refused unless --overwrite, which removes exactly those
    (stale shards of another world size included). SRC is never written: a DST inside SRC,
    containing it, or holding any file the job reads is refused, however spelled. While it
    runs DST holds zero-ckpt-incomplete.json (created exclusively: a second job into DST
    fails at once); if it is left there the job was interrupted: re-run with --overwrite.

    With --part I/N (or --distributed under torchrun) this process writes only its share of the shards;
    the part that completes the set verifies the pooled checksums and writes the manifest.

    \b
    Examples:
      zero-ckpt reshard ./step-1200 ./step-1200-dp16 --from 8 --to 16
      zero-ckpt reshard s3://bucket/run1/step-1200 ./dp3 --to 3 -o anon=true
      zero-ckpt reshard s3://b/step-1200 s3://b/dp16 --to 16 --part 0/4   # host 0; 1/4 .. 3/4 on the others
      torchrun --nproc-per-node 4 --no-python zero-ckpt reshard SRC DST --to 16 --distributed
      zero-ckpt reshard ./run/global_step1200 ./run-dp16 --to 16 --format deepspeed
      zero-ckpt reshard ./run ./run-universal --format deepspeed-universal
    """
    opts = cli_options(ctx, storage_options, quiet)
    if out_format != "zero-ckpt":
        if part is not None:
            raise click.UsageError(f"--part is not available with --format {out_format}")
        if out_format == "deepspeed" and to_world_size is None:
            raise click.UsageError("--format deepspeed needs --to M, the data-parallel size to write")
        _reshard_deepspeed(src, dst, out_format, to_world_size, from_world_size, tag, overwrite,
                           workers, as_json, opts)
        return
    if to_world_size is None:
        raise click.UsageError("Missing option '--to'.")
    if tag is not None:
        raise click.UsageError("--tag applies to --format deepspeed and deepspeed-universal only")
    import zero_ckpt

    part = announce_part(part, opts.quiet)
    job: dict[str, Any] = dict(
        world_size=to_world_size, expected_world_size=from_world_size, overwrite=overwrite,
        storage_options=opts.storage_options, workers=workers,
    )
    if part is not None:
        with progress_bar("reshard", quiet=opts.quiet) as progress:
            result = zero_ckpt.reshard_part(src, dst, part=part, progress=progress, **job)
        extra: dict[str, Any] = {}
        if result.manifest is not None:
            from zero_ckpt.summary import format_bytes

            m = result.manifest
            extra = {
                "world_size": m.world_size, "shard_count": len(m.shards),
                "shard_bytes": m.shard_bytes,
                "summary": f"world size {m.world_size}, {len(m.shards)} shards, {format_bytes(m.shard_bytes)}",
            }
        echo_part(result, as_json, "resharded", src, dst, extra)
        return
    with progress_bar("reshard", quiet=opts.quiet) as progress:
        manifest = zero_ckpt.reshard(src, dst, progress=progress, **job)
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


def _reshard_deepspeed(
    src: str,
    dst: str,
    out_format: str,
    to_world_size: int | None,
    from_world_size: int | None,
    tag: str | None,
    overwrite: bool,
    workers: int | None,
    as_json: bool,
    opts: Any,
) -> None:
    """``--format deepspeed`` / ``deepspeed-universal``: one library call, then print."""
    import zero_ckpt
    from zero_ckpt.summary import format_bytes

    with progress_bar("reshard", quiet=opts.quiet) as progress:
        result = zero_ckpt.convert(
            src, dst, to_format=out_format, world_size=to_world_size, tag=tag,
            expected_world_size=from_world_size, overwrite=overwrite, progress=progress,
            storage_options=opts.storage_options, workers=workers,
        )
    if as_json:
        echo_json(
            {
                "src": src, "dst": dst, "format": out_format, "world_size": result.world_size,
                "tag": result.tag, "files": list(result.files), "bytes": result.bytes,
                "notes": list(result.notes),
            }
        )
        return
    what = f"world size {result.world_size}" if result.world_size is not None else "universal layout"
    click.echo(
        f"wrote {src} -> {dst} as a DeepSpeed checkpoint: {what}, tag {result.tag}, "
        f"{len(result.files)} files, {format_bytes(result.bytes)}"
    )
    if not opts.quiet:
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
