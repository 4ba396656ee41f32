"""``zero-ckpt list ROOT``: the checkpoints of a run directory, complete or not."""

from __future__ import annotations

from typing import Any

import click

from cli._common import cli_options, common_options, echo_json, json_option


@click.command("list")
@click.argument("root")
@json_option
@common_options
@click.pass_context
def list_(
    ctx: click.Context, root: str, as_json: bool, storage_options: dict[str, Any], quiet: bool
) -> None:
    """List the checkpoints in the run directory ROOT, oldest first.

    A run directory holds checkpoints as subdirectories and a `latest` file naming the newest
    complete one (marked *). A checkpoint is complete once its manifest.json is written;
    INCOMPLETE ones are saves that did not finish (or are still running), INVALID ones have a
    damaged manifest or miss a file it lists. DeepSpeed run folders list their global_stepN
    tags (step from the name, world size from the *_optim_states.pt files, complete when
    every rank's file and the model states file are there). Other folders (consolidated
    weights with config.json/model*.safetensors, anything else) are listed as "not a
    checkpoint". SIZE is the shard and model bytes the manifest records, or the bytes present.
    For s3:// roots, multipart uploads left open are reported. A ROOT that does not exist or
    is a file is an error (exit 1). One listing of ROOT plus one read per manifest.

    \b
    Examples:
      zero-ckpt list ./run1
      zero-ckpt list s3://bucket/run1 -o endpoint_url=http://127.0.0.1:9000 --json
    """
    from zero_ckpt.runs import scan_run

    opts = cli_options(ctx, storage_options, quiet)
    listing = scan_run(root, opts.storage_options)
    if as_json:
        echo_json(listing.to_dict())
    else:
        click.echo(render_listing(listing))
    for problem in listing.problems:
        click.echo(f"warning: {problem}", err=True)


_KIND_LABELS = {
    "zero-ckpt": "zero-ckpt", "deepspeed": "deepspeed", "dcp": "dcp", "hf": "hf weights",
    "torch": "torch files",
    "folder": "folder",
}


def render_listing(listing: Any) -> str:
    """The text table for a :class:`zero_ckpt.runs.RunListing`: checkpoints oldest first,
    then the folders that are not checkpoints; a KIND column when not all are format v1."""
    from zero_ckpt.summary import format_bytes

    entries = [*listing.checkpoints, *listing.others]
    if not entries:
        return f"no checkpoints in {listing.root}" + _pending_lines(listing)
    show_kind = any(c.kind != "zero-ckpt" for c in entries)
    header = ("", "NAME", *(("KIND",) if show_kind else ()), "STEP", "WORLD", "SIZE", "STATUS")

    def status(c: Any) -> str:
        if not c.is_checkpoint:
            return "not a checkpoint"
        return "complete" if c.complete else c.status.upper()

    rows = [
        (
            "*" if c.is_latest else "",
            c.name,
            *((_KIND_LABELS.get(c.kind, c.kind),) if show_kind else ()),
            "-" if c.step is None else str(c.step),
            "-" if c.world_size is None else str(c.world_size),
            format_bytes(c.bytes),
            status(c),
        )
        for c in entries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    first_number = 3 if show_kind else 2
    right = {first_number, first_number + 1, first_number + 2}  # numbers align right

    def line(r: tuple[str, ...]) -> str:
        cells = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(r))]
        return "  ".join(cells).rstrip()

    lines = [line(header), *(line(r) for r in rows)]
    n = len(listing.checkpoints)
    complete = sum(c.complete for c in listing.checkpoints)
    summary = f"{n} checkpoint{'s' if n != 1 else ''}, {complete} complete"
    if listing.latest is not None:
        summary += f"; * = latest ({listing.latest})"
    if listing.others:
        k = len(listing.others)
        summary += f"; {k} other folder{'s' if k != 1 else ''} (not checkpoints)"
    lines.append(summary)
    return "\n".join(lines) + _pending_lines(listing)


def _pending_lines(listing: Any) -> str:
    pending = listing.pending_uploads
    if not pending:
        return ""
    keys = [str(p.get("key") or p.get("path") or p.get("upload") or p) for p in pending]
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return (
        f"\n{len(keys)} multipart upload{'s' if len(keys) != 1 else ''} left open under "
        f"{listing.root} (interrupted writes; they cost storage until aborted): {shown}"
    )
