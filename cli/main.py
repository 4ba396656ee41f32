"""``zero-ckpt``: the command group, and the one place errors become messages and exit codes.

Exit codes: 0 success; 1 an error about the checkpoint, the storage or a value (one line
``error: <message>`` on stderr) or an unexpected failure (one line plus a hint); 2 a usage
error (click's message). With ``--json`` an error is one JSON document on stdout instead,
``{"error": "<message>", "kind": "<exception class>"}``, with the same exit code.
``ZERO_CKPT_DEBUG=1`` lets every exception through with its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from cli import consolidate_cmd, convert_cmd, inspect_cmd, list_cmd, reshard_cmd, verify_cmd
from cli._common import CliOptions, common_options, echo_json, error_document, wants_json

__all__ = ["cli", "main"]

DEBUG_ENV = "ZERO_CKPT_DEBUG"


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _asked_for_json(raw: list[str]) -> bool:
    """``--json`` on the command line, for an error click raised before parsing reached it."""
    return "--json" in (raw[: raw.index("--")] if "--" in raw else raw)


class _Group(click.Group):
    """A click group whose commands' errors print as one line instead of a traceback (as one
    JSON document ``{"error": ..., "kind": ...}`` on stdout when the command got ``--json``)."""

    def invoke(self, ctx: click.Context) -> Any:
        raw = [*getattr(ctx, "_protected_args", ()), *ctx.args]  # click clears them below
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as exc:
            if not (wants_json(ctx) or _asked_for_json(raw)):
                raise  # click's own: exit codes and usage messages as click does them
            echo_json(error_document(exc, _one_line(exc.format_message())))
            ctx.exit(exc.exit_code)
        except Exception as exc:
            if _debug():
                raise
            from zero_ckpt.errors import CheckpointError

            if isinstance(exc, (CheckpointError, ValueError, OSError)):
                message = _one_line(str(exc)) or type(exc).__name__
            else:
                first = _one_line(str(exc).split("\n", 1)[0])
                message = (
                    f"unexpected {type(exc).__name__}"
                    + (f": {first}" if first else "")
                    + f" (set {DEBUG_ENV}=1 to see the traceback)"
                )
            if wants_json(ctx) or _asked_for_json(raw):
                echo_json(error_document(exc, message))
            else:
                click.echo(f"error: {message}", err=True)
            ctx.exit(1)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="zero-ckpt", prog_name="zero-ckpt")
@common_options
@click.pass_context
def cli(ctx: click.Context, storage_options: dict[str, Any], quiet: bool) -> None:
    """Inspect, verify, reshard and consolidate ZeRO checkpoints (format v1).

    PATH/SRC/DST/OUT are local paths or fsspec URLs (s3://, memory://, file://, ...).
    Options given here apply to every command; exit status is 0 on success, 1 on an error
    (one line on stderr; set ZERO_CKPT_DEBUG=1 for the traceback), 2 on a usage error.

    \b
    Examples:
      zero-ckpt inspect s3://bucket/run1/step-1200 -o anon=true
      zero-ckpt reshard ./step-1200 ./step-1200-dp16 --from 8 --to 16
      zero-ckpt verify ./step-1200-dp16
      zero-ckpt consolidate ./step-1200-dp16 ./hf-out --dtype bfloat16 --max-shard-size 5GB
    """
    ctx.obj = CliOptions(storage_options=storage_options, quiet=quiet)


cli.add_command(inspect_cmd.inspect)
cli.add_command(verify_cmd.verify)
cli.add_command(reshard_cmd.reshard)
cli.add_command(consolidate_cmd.consolidate)
cli.add_command(convert_cmd.convert)
cli.add_command(list_cmd.list_)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``zero-ckpt``)."""
    try:
        cli.main(args=argv, prog_name="zero-ckpt")
    except BrokenPipeError:  # e.g. `zero-ckpt inspect --params ... | head`
        sys.stderr.close()
        sys.exit(1)


if __name__ == "__main__":
    main()
