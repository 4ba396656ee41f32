"""``zero-ckpt verify PATH``: check every file's presence, size and checksum."""

from __future__ import annotations

from typing import Any

import click

from cli._common import cli_options, common_options, echo_json, json_option, progress_bar


@click.command("verify")
@click.argument("path")
@json_option
@common_options
@click.pass_context
def verify(
    ctx: click.Context, path: str, as_json: bool, storage_options: dict[str, Any], quiet: bool
) -> None:
    """Check that the checkpoint at PATH is complete and intact.

    Every shard and model file the manifest lists is read once (streamed) and its size,
    header and checksum compared with the manifest. Prints each problem, naming the file;
    exits 1 if there is any, else prints "OK: N files, B bytes verified".

    \b
    Examples:
      zero-ckpt verify ./step-1200
      zero-ckpt verify s3://bucket/run1/step-1200 -o anon=true --json
    """
    import zero_ckpt

    opts = cli_options(ctx, storage_options, quiet)
    with progress_bar("verify", quiet=opts.quiet) as progress:
        report = zero_ckpt.verify(path, progress=progress, storage_options=opts.storage_options)
    if as_json:
        echo_json(
            {
                "path": path,
                "ok": report.ok,
                "files_checked": report.files_checked,
                "bytes_checked": report.bytes_checked,
                "notes": list(report.notes),
                "problems": [
                    {"path": p.path, "kind": p.kind, "rank": p.rank, "message": p.message}
                    for p in report.problems
                ],
            }
        )
    else:
        for problem in report.problems:
            click.echo(str(problem))
        for note in report.notes:
            click.echo(f"note: {note}")
        if report.ok:
            click.echo(f"OK: {report.files_checked} files, {report.bytes_checked} bytes verified")
        else:
            n = len(report.problems)
            click.echo(f"FAILED: {n} problem{'s' if n != 1 else ''} in {path}", err=True)
    if not report.ok:
        ctx.exit(1)
