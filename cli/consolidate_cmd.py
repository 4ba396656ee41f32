"""``zero-ckpt consolidate SRC OUT``: full (unpartitioned) safetensors weights from a checkpoint,
or plain torch files (``--format torch``)."""

from __future__ import annotations

from typing import Any

import click

from cli._common import (
    SizeType,
    announce_part,
    cli_options,
    common_options,
    echo_json,
    echo_part,
    json_option,
    part_options,
    progress_bar,
)


@click.command("consolidate")
@click.argument("src")
@click.argument("out")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default=None,
    help="Cast the weights to this dtype (default: each parameter's model dtype).",
)
@click.option(
    "--max-shard-size",
    type=SizeType(),
    default=None,
    metavar="SIZE",
    help="Split the output into files of at most SIZE (5GB = 5*10^9 bytes, 5GiB = 5*2^30).",
)
@click.option(
    "--include-optimizer",
    is_flag=True,
    help="Also write the full optimizer state (exp_avg, ...) next to the weights.",
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["safetensors", "torch"]),
    default="safetensors",
    show_default=True,
    help=(
        "torch: write optimizer.pt, a state dict that optimizer.load_state_dict of a plain torch "
        "optimizer accepts, next to the model (holds the whole optimizer state in memory)."
    ),
)
@click.option(
    "--model-format",
    type=click.Choice(["safetensors", "pt"]),
    default=None,
    help="With --format torch: the model as model.safetensors (default) or model.pt.",
)
@click.option(
    "--hf-config-from",
    default=None,
    metavar="DIR",
    help=(
        "Copy config.json, generation_config.json and the tokenizer files of this Hugging Face "
        "model folder next to the weights, so from_pretrained(OUT) loads OUT as it is."
    ),
)
@click.option(
    "--all-tied-names",
    is_flag=True,
    help=(
        "Write a tied weight under every name (lm_head.weight and transformer.wte.weight); "
        "default: once, under the name save_pretrained keeps."
    ),
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the files zero-ckpt wrote in OUT before (other files in OUT are kept).",
)
@part_options
@json_option
@common_options
@click.pass_context
def consolidate(
    ctx: click.Context,
    src: str,
    out: str,
    dtype: str | None,
    max_shard_size: int | None,
    include_optimizer: bool,
    out_format: str,
    model_format: str | None,
    hf_config_from: str | None,
    all_tied_names: bool,
    overwrite: bool,
    part: Any,
    workers: int | None,
    as_json: bool,
    storage_options: dict[str, Any],
    quiet: bool,
) -> None:
    """Gather the partitioned master weights of SRC into ordinary full tensors in OUT.

    Padding is dropped and fragments are joined, so each parameter comes out whole under its
    model name, in safetensors files that safetensors.torch.load_file reads.

    Tied weights are written once, under the name save_pretrained keeps (--all-tied-names:
    under every name). --hf-config-from DIR copies the model's config.json,
    generation_config.json and tokenizer files from DIR (e.g. where
    model.config.save_pretrained and tokenizer.save_pretrained wrote them; DIR may be OUT).

    OUT may already hold files zero-ckpt does not write (README.md, config.json, your own
    folders): they are never changed. Weights, index or manifest from an earlier run are
    refused unless --overwrite, which removes exactly the files zero-ckpt writes (stale
    model-0000x-of-0000y shards included) and keeps everything else.

    While it runs, OUT holds zero-ckpt-incomplete.json (created exclusively: a second job
    into OUT fails at once); it is removed after the index, the last file. If it is still
    there, the job was interrupted and OUT is incomplete: run it again with --overwrite.

    With --part I/N (or --distributed under torchrun) this process writes only its share of the output
    files (use --max-shard-size to have several); the part that completes the set verifies
    the pooled checksums and writes the index. OUT/_parts/ marks unfinished output.

    With --format torch, OUT gets optimizer.pt (state by param id in group order, as a
    non-sharded torch optimizer saves it, with param_names per group) and model.safetensors
    (or model.pt): load them with optimizer.load_state_dict(torch.load(...)) and
    model.load_state_dict(...). SRC may also be a DeepSpeed ZeRO-1/2 folder.

    \b
    Examples:
      zero-ckpt consolidate ./step-1200-dp16 ./hf-out --dtype bfloat16 --max-shard-size 5GB
      zero-ckpt consolidate ./step-1200 ./full --include-optimizer
      zero-ckpt consolidate ./step-1200 ./hf-out --hf-config-from ./hf-config --dtype bfloat16
      zero-ckpt consolidate SRC ./hf-out --max-shard-size 5GB --part 1/2   # host 1; 0/2 on the other
      zero-ckpt consolidate ./step-1200-dp16 ./torch-out --format torch
    """
    import zero_ckpt

    opts = cli_options(ctx, storage_options, quiet)
    if model_format is not None and out_format != "torch":
        raise click.UsageError("--model-format applies to --format torch only")
    if out_format == "torch":
        if hf_config_from is not None or all_tied_names:
            raise click.UsageError(
                "--hf-config-from and --all-tied-names apply to safetensors output; --format "
                "torch writes every tied name, as a torch state dict has them"
            )
        if part is not None:
            raise click.UsageError(
                "--format torch writes one optimizer.pt and cannot be split with --part"
            )
        from zero_ckpt.conversion import consolidate_source

        with progress_bar("consolidate", quiet=opts.quiet) as progress:
            files = consolidate_source(
                src,
                out,
                dtype=dtype,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                progress=progress,
                storage_options=opts.storage_options,
                workers=workers,
                format="torch",
                model_format=model_format or "safetensors",
            )
        if as_json:
            echo_json({"src": src, "out": out, "format": "torch", "files": files})
        else:
            click.echo(f"consolidated {src} -> {out} as torch files:")
            for name in files:
                click.echo(f"  {name}")
        return
    part = announce_part(part, opts.quiet)
    job: dict[str, Any] = dict(
        dtype=dtype, max_shard_size=max_shard_size, include_optimizer=include_optimizer,
        overwrite=overwrite, storage_options=opts.storage_options, workers=workers,
        hf_config_from=hf_config_from, all_tied_names=all_tied_names,
    )
    if part is not None:
        with progress_bar("consolidate", quiet=opts.quiet) as progress:
            part_result = zero_ckpt.consolidate_part(src, out, part=part, progress=progress, **job)
        echo_part(part_result, as_json, "consolidated", src, out, {})
        return
    with progress_bar("consolidate", quiet=opts.quiet) as progress:
        result = zero_ckpt.consolidate(src, out, progress=progress, **job)
    if as_json:
        echo_json(
            {"src": src, "out": out, "files": list(result.files), "total_bytes": result.total_bytes}
        )
    else:
        from zero_ckpt.summary import format_bytes

        n = len(result.files)
        click.echo(
            f"consolidated {src} -> {out}: {n} file{'s' if n != 1 else ''}, "
            f"{format_bytes(result.total_bytes)}"
        )
        for name in result.files:
            click.echo(f"  {name}")
