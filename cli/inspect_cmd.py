"""``zero-ckpt inspect PATH``: what a checkpoint holds, from its manifest alone."""

from __future__ import annotations

import json
from typing import Any

import click

from cli._common import cli_options, common_options, echo_json, json_option


@click.command("inspect")
@click.argument("path")
@click.option(
    "--params",
    "show_params",
    is_flag=True,
    help="Also list every parameter: shape, model dtype and its fragment on each rank.",
)
@json_option
@common_options
@click.pass_context
def inspect(
    ctx: click.Context,
    path: str,
    show_params: bool,
    as_json: bool,
    storage_options: dict[str, Any],
    quiet: bool,
) -> None:
    """Summarise the checkpoint at PATH (a local path or any fsspec URL).

    Reads only manifest.json: format, world size, ZeRO stage, step, master dtype, each param
    group's layout (numel, partition_numel, align, params, state keys, hyperparameters), total
    parameters and shard bytes. A fragment "3: [0, 4096)" means rank 3 holds elements
    0..4095 of the flattened parameter. A DeepSpeed ZeRO-1/2 folder is read as its format-v1
    view (its pickled metadata only); a run directory whose `latest` names a format-v1
    checkpoint is read as that checkpoint. With --json, errors are JSON too.

    \b
    Examples:
      zero-ckpt inspect ./step-1200
      zero-ckpt inspect ./step-1200 --params
      zero-ckpt inspect s3://bucket/run1/step-1200 -o anon=true --json
    """
    from zero_ckpt.summary import inspect_checkpoint

    opts = cli_options(ctx, storage_options, quiet)
    summary = inspect_checkpoint(path, params=show_params, storage_options=opts.storage_options)
    if as_json:
        echo_json(summary)
    else:
        click.echo(render_summary(summary))


def render_summary(s: dict[str, Any]) -> str:
    """The text form of ``zero_ckpt.summary.summarize``'s dict."""
    from zero_ckpt.summary import format_bytes

    lines = [f"checkpoint     {s['path']}"]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<15}{value}")

    if s.get("source_format", "zero-ckpt") == "zero-ckpt":
        row("format", f"{s['format']} v{s['version']} (written by {s['created_by'] or 'unknown'})")
    else:
        row("format", f"{s['source_format']} (written by {s['created_by'] or 'unknown'}; read in place)")
    row("world size", s["world_size"])
    row("zero stage", s["zero_stage"])
    row("step", "-" if s["step"] is None else s["step"])
    row("master dtype", s["master_dtype"])
    row(
        "parameters",
        f"{s['total_params']:,} elements in {s['param_count']} tensors, "
        f"{len(s['groups'])} group(s)",
    )
    row(
        "shards",
        f"{s['shard_count']} files, {format_bytes(s['shard_bytes'])} ({s['shard_bytes']:,} bytes)",
    )
    model = s["model_file"]
    row("model file", "-" if model is None else f"{model['path']} ({format_bytes(model['bytes'])})")
    if s["extra_keys"]:
        row("extra", ", ".join(s["extra_keys"]))
    for i, g in enumerate(s["groups"]):
        lines.append("")
        lines.append(
            f"group {i}: {g['numel']:,} elements in {g['params']} params, partition_numel "
            f"{g['partition_numel']:,}, align {g['align']}, padding {g['padding']}"
        )
        states = ", ".join(
            f"{k} ({g['state_dtypes'][k]})" if k in g["state_dtypes"] else k
            for k in g["state_keys"]
        )
        lines.append(f"  {'states':<13}{states or '-'}")
        lines.append(f"  {'hyperparams':<13}{_pairs(g['hyperparams'])}")
        lines.append(f"  {'scalars':<13}{_pairs(g['scalars'])}")
        if g["empty_ranks"]:
            lines.append(f"  {'empty ranks':<13}{g['empty_ranks']} of {s['world_size']}")
    if "params" in s:
        lines.append("")
        lines.append("params (rank: [start, end) in elements of the flattened parameter)")
        rows = [
            (
                f"g{p['group']}",
                p["name"] + (f" (= {', '.join(p['aliases'])})" if p["aliases"] else ""),
                "[" + ", ".join(str(d) for d in p["shape"]) + "]",
                p["dtype"],
                "  ".join(f"{f['rank']}: [{f['start']}, {f['end']})" for f in p["fragments"])
                or "-",
            )
            for p in s["params"]
        ]
        widths = [max((len(r[c]) for r in rows), default=0) for c in range(4)]
        for r in rows:
            lines.append(
                "  " + "  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4]
            )
    return "\n".join(lines)


def _pairs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in d.items()) or "-"
