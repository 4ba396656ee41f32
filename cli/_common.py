"""Options every command shares, the progress-bar adapter and output helpers (no logic).

Exit codes: 0 success, 1 an error about the checkpoint or the storage (printed as one line
``error: <message>``), 2 a usage error (click's own message).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import click

__all__ = [
    "CliOptions",
    "common_options",
    "json_option",
    "cli_options",
    "parse_storage_options",
    "progress_bar",
    "echo_json",
    "SizeType",
    "PartType",
    "part_options",
    "announce_part",
    "echo_part",
    "wants_json",
    "error_document",
    "JSON_META_KEY",
]


@dataclass(frozen=True)
class CliOptions:
    """What the shared options say: fsspec ``storage_options`` and whether to stay quiet."""

    storage_options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False


def parse_storage_options(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("anon=true", "endpoint_url=http://h:9000")`` -> ``{"anon": True, "endpoint_url": ...}``.

    Each value is read as JSON when it is valid JSON (``true``, ``3``, ``{"a": 1}``), else kept
    as the string. Raises ``click.BadParameter`` (a usage error, exit 2) for a pair without
    ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(
                f"{pair!r} is not KEY=VALUE, e.g. --storage-option anon=true",
                param_hint="'--storage-option'",
            )
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _storage_options_callback(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, Any]:
    return parse_storage_options(value)


def common_options(f: Callable) -> Callable:
    """Add ``--storage-option KEY=VALUE`` (repeatable) and ``--quiet`` to a command or group."""
    f = click.option(
        "--quiet",
        "-q",
        is_flag=True,
        help="No progress bar (it is also off when stderr is not a terminal).",
    )(f)
    f = click.option(
        "--storage-option",
        "-o",
        "storage_options",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_storage_options_callback,
        help=(
            "fsspec storage option for the URLs (repeatable); VALUE is read as JSON when it "
            "parses, else as a string. E.g. -o anon=true -o endpoint_url=http://127.0.0.1:9000"
        ),
    )(f)
    return f


JSON_META_KEY = "zero_ckpt.json"
DISTRIBUTED_META_KEY = "zero_ckpt.distributed"


def _json_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:  # the group's error handler prints errors as JSON too (see cli.main)
        ctx.meta[JSON_META_KEY] = True
    return value


def json_option(f: Callable) -> Callable:
    """Add ``--json``: print the result as one JSON document on stdout; errors then are
    ``{"error": "...", "kind": "..."}`` on stdout too, with the same non-zero exit."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        callback=_json_callback,
        help='Print machine-readable JSON on stdout (errors too: {"error": ..., "kind": ...}).',
    )(f)


def wants_json(ctx: click.Context | None) -> bool:
    """Whether the command being run was given ``--json`` (so far as click parsed it)."""
    return bool(ctx is not None and ctx.meta.get(JSON_META_KEY))


def error_document(exc: BaseException, message: str) -> dict[str, str]:
    """The JSON an error becomes under ``--json``: the one-line message and its kind (the
    exception class name, e.g. ``MissingShardError``, ``UsageError``)."""
    return {"error": message, "kind": type(exc).__name__}


def cli_options(ctx: click.Context, storage_options: dict[str, Any], quiet: bool) -> CliOptions:
    """Merge a command's shared options with the ones given before the command name.

    ``zero-ckpt -o anon=true inspect s3://b/c`` and ``zero-ckpt inspect s3://b/c -o anon=true``
    mean the same; a key given to the command wins.
    """
    parent = ctx.find_object(CliOptions) or CliOptions()
    return CliOptions(
        storage_options={**parent.storage_options, **storage_options},
        quiet=parent.quiet or quiet,
    )


@contextmanager
def progress_bar(
    description: str, *, quiet: bool, force: bool = False, file: Any = None
) -> Iterator[Callable[[int, int], None] | None]:
    """Yield a ``progress(done_bytes, total_bytes)`` callback drawing a tqdm bar on stderr.

    Yields None (the library then skips progress work) when ``quiet`` or when stderr is not a
    terminal, unless ``force``. The library serialises calls, so the bar needs no lock.
    """
    stream = file if file is not None else sys.stderr
    if quiet or not (force or _isatty(stream)):
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(
        desc=description,
        total=None,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        file=stream,
        leave=False,
        dynamic_ncols=True,
    )

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


class SizeType(click.ParamType):
    """A byte size such as ``5GB`` or ``512MiB`` (see ``zero_ckpt.summary.parse_size``)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        from zero_ckpt.summary import parse_size

        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


# ----- split jobs (--part I/N), shared by reshard and consolidate ------------------------------


class PartType(click.ParamType):
    """``I/N``: part I (0-based) of a job split N ways (see ``zero_ckpt.parts``)."""

    name = "part"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from zero_ckpt.parts import PartSpec, parse_part

        if isinstance(value, PartSpec):
            return value
        try:
            return parse_part(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _part_callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if ctx.meta.get(DISTRIBUTED_META_KEY):
        if value is not None:
            raise click.UsageError("--part and --distributed exclude each other: use --part I/N "
                                   "on separate hosts, or --distributed under torchrun", ctx=ctx)
        from zero_ckpt.parts import DISTRIBUTED

        return DISTRIBUTED
    return value


def _distributed_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    # Not passed to the command: it turns the ``part`` argument into "distributed" (click
    # processes --part after this flag unless --part came first on the command line).
    if value:
        ctx.meta[DISTRIBUTED_META_KEY] = True
        if ctx.params.get("part") is not None:
            raise click.UsageError("--part and --distributed exclude each other: use --part I/N "
                                   "on separate hosts, or --distributed under torchrun", ctx=ctx)
    return value


def part_options(f: Any) -> Any:
    """``--part I/N``, ``--distributed`` and ``--workers N``, shared by reshard and consolidate.

    The command receives ``part``: None (the whole job here), a PartSpec (``--part``) or
    ``"distributed"`` (``--distributed``); torchrun's variables alone change nothing.
    """
    f = click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Parallel I/O threads in this process (default: ZERO_CKPT_WORKERS, 4).",
    )(f)
    f = click.option(
        "--distributed",
        is_flag=True,
        expose_value=False,
        callback=_distributed_callback,
        help=(
            "Split the job across the ranks of a torchrun launch (RANK/WORLD_SIZE/MASTER_ADDR/"
            "MASTER_PORT must be set; ranks join a gloo group, waiting "
            "ZERO_CKPT_PART_JOIN_TIMEOUT_S, 300 s, for missing ones; rank 0 commits). Without "
            "it, torchrun's variables are ignored and the whole job runs in this process."
        ),
    )(f)
    f = click.option(
        "--part",
        type=PartType(),
        default=None,
        metavar="I/N",
        callback=_part_callback,
        help=(
            "Do only part I (0-based) of the job split N ways, e.g. on N hosts; the part that "
            "completes the set commits, the others leave the output incomplete until then."
        ),
    )(f)
    return f


def announce_part(part: Any, quiet: bool) -> Any:
    """What the options said, never the environment: the ``part=`` argument of
    ``reshard_part``/``consolidate_part``, or None for the whole job (``reshard``/``consolidate``).

    When torchrun's RANK/WORLD_SIZE are set but neither --part nor --distributed was given,
    says on stderr (unless quiet) that the whole job runs here.
    """
    if part is not None:
        return part
    from zero_ckpt.parts import part_from_env

    try:
        spec = part_from_env(os.environ)
    except ValueError:
        spec = None
    if spec is not None and spec.parts > 1 and not quiet:
        click.echo(
            f"note: RANK/WORLD_SIZE are set (rank {spec.index} of {spec.parts}), but this command "
            "runs the whole job in this process; pass --distributed to split it across the "
            "torchrun ranks",
            err=True,
        )
    return None


def echo_part(result: Any, as_json: bool, verb: str, src: str, dst: str, extra: dict[str, Any]) -> None:
    """Print a part's outcome: files written, committed or which parts are awaited."""
    from zero_ckpt.summary import format_bytes

    if as_json:
        echo_json(
            {
                "src": src, "dst": dst, "job": result.job, "part": result.part,
                "parts": result.parts, "files": list(result.files), "bytes": result.bytes,
                "resumed": result.resumed, "committed": result.committed,
                "committed_by": result.committed_by, "waiting_for": list(result.waiting_for),
                "outputs": list(result.outputs), **(extra if result.committed else {}),
            }
        )
        return
    n = len(result.files)
    how = "found from an earlier run" if result.resumed else "wrote"
    click.echo(
        f"{verb} part {result.part}/{result.parts} of {src} -> {dst} (job {result.job}): "
        f"{how} {n} file{'s' if n != 1 else ''}, {format_bytes(result.bytes)}"
    )
    for name in result.files:
        click.echo(f"  {name}")
    if result.committed:
        by = (
            "this part committed" if result.committed_by == result.part
            else f"committed by part {result.committed_by}" if result.committed_by is not None
            else "committed by another part"
        )
        click.echo(f"{by}: {dst} is complete" + (f" ({extra['summary']})" if extra.get("summary") else ""))
    else:
        waiting = ",".join(str(k) for k in result.waiting_for)
        click.echo(
            f"waiting for parts {waiting} (the last part to finish commits): {dst} is NOT "
            "complete yet"
        )
