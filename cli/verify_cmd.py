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

    PATH may be in any format zero-ckpt reads. DeepSpeed ZeRO-1/2 folders, PyTorch DCP
    checkpoints and plain torch files have no checksums of their own: their structure, sizes
    and layout are cross-checked and every byte is read and compared with the CRC-32 that
    torch.save's zip format stores per record; the OK line says so.

    \b
    Examples:
      zero-ckpt verify ./step-1200
      zero-ckpt verify s3://bucket/run1/step-1200 -o anon=true --json
    """
    import zero_ckpt
    from zero_ckpt.verification import ZIP_CRC32

    opts = cli_options(ctx, storage_options, quiet)
    with progress_bar("verify", quiet=opts.quiet) as progress:
        report = zero_ckpt.verify(path, progress=progress, storage_options=opts.storage_options)
    if as_json:
        n = len(report.problems)
        echo_json(
            {
                "path": path,
                "ok": report.ok,
                "format": report.format,
                "method": report.method,
                "files_checked": report.files_checked,
                "bytes_checked": report.bytes_checked,
                "notes": list(report.notes),
                "problems": [
                    {"path": p.path, "kind": p.kind, "rank": p.rank, "message": p.message}
                    for p in report.problems
                ],
                # the shape every --json error has, so scripts need one check
                **(
                    {}
                    if report.ok
                    else {
                        "error": f"{n} problem{'s' if n != 1 else ''} in {path}: {report.problems[0]}",
                        "kind": "VerifyFailed",
                    }
                ),
            }
        )
    else:
        for problem in report.problems:
            click.echo(str(problem))
        for note in report.notes:
            click.echo(f"note: {note}")
        name = _FORMAT_NAMES.get(report.format, report.format)
        if report.ok and report.method == ZIP_CRC32:
            click.echo(
                f"OK: {report.files_checked} files, {report.bytes_checked} bytes read and "
                f"verified against their zip CRC-32s ({name} checkpoint: structure and sizes "
                f"cross-checked; {name} records no checksums of its own)"
            )
        elif report.ok:
            click.echo(f"OK: {report.files_checked} files, {report.bytes_checked} bytes verified")
        else:
            n = len(report.problems)
            click.echo(f"FAILED: {n} problem{'s' if n != 1 else ''} in {path}", err=True)
    if not report.ok:
        ctx.exit(1)


_FORMAT_NAMES = {"deepspeed": "DeepSpeed", "dcp": "PyTorch DCP", "torch": "plain torch"}
