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
    damaged manifest or miss a file it lists. SIZE is the shard and model bytes the manifest
    records, or the bytes present for one that is not complete. One listing of ROOT plus one
    read per manifest.

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


def render_listing(listing: Any) -> str:
    """The text table for a :class:`zero_ckpt.runs.RunListing`."""
    from zero_ckpt.summary import format_bytes

    if not listing.checkpoints:
        return f"no checkpoints in {listing.root}"
    header = ("", "NAME", "STEP", "WORLD", "SIZE", "STATUS")
    rows = [
        (
            "*" if c.is_latest else "",
            c.name,
            "-" if c.step is None else str(c.step),
            "-" if c.world_size is None else str(c.world_size),
            format_bytes(c.bytes),
            "complete" if c.complete else c.status.upper(),
        )
        for c in listing.checkpoints
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {2, 3, 4}  # numbers align right

    def line(r: tuple[str, ...]) -> str:
        cells = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(r))]
        return "  ".join(cells).rstrip()

    lines = [line(header), *(line(r) for r in rows)]
    complete = sum(c.complete for c in listing.checkpoints)
    summary = f"{len(rows)} checkpoint{'s' if len(rows) != 1 else ''}, {complete} complete"
    if listing.latest is not None:
        summary += f"; * = latest ({listing.latest})"
    lines.append(summary)
    return "\n".join(lines)
