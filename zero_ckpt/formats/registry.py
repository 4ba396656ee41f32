"""The format registry: one line per checkpoint format, the only place formats are listed.

Each line names a format and the package that implements it. A format package exposes
(torch-free at import, so detection never loads torch):

* ``detect(loc) -> bool``: whether ``loc`` holds a checkpoint of this format (cheap: names and
  small files only);
* ``open_view(loc) -> SourceView``: the checkpoint as plain data for the planners
  (:mod:`zero_ckpt.view`), reading only metadata;
* optionally ``describe(loc) -> Manifest``: the logical content alone, cheaper than a view
  (``inspect``);
* optionally ``precheck(loc, view)``: verify the files before an output is committed (formats
  without checksums of their own check what they can, e.g. zip CRC-32s); jobs run it only for
  what the checks made as the bytes stream did not cover (``SourceChecksInfo.zip_units``);
* optionally ``verify(loc, report, chunk_bytes, progress)``: ``zero-ckpt verify`` for the format;
* optionally ``import_source(src, dst, **options) -> Manifest``: for sources with no byte
  layout to stream from (a plain torch state dict), write format v1 directly;
* optionally ``WRITER``: ``"module:function"`` of a writer taking a :class:`SourceView`
  (``convert --to-format NAME``), and ``WRITERS``: ``{target: "module:function"}`` for further
  targets the package writes (``deepspeed-universal``).

``detect`` is tried in registry order; the first that says yes wins. Adding a format is a new
package under ``zero_ckpt/formats/`` and one line in :data:`REGISTRY` (a test holds that).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from zero_ckpt.errors import CheckpointError
from zero_ckpt.storage import Location, open_location
from zero_ckpt.view import SourceView

__all__ = [
    "REGISTRY",
    "FormatEntry",
    "format_names",
    "format_module",
    "detect",
    "detect_url",
    "open_view",
    "describe",
    "resolve",
    "precheck",
    "writer_for",
]


@dataclass(frozen=True)
class FormatEntry:
    """A registered format: its name (what ``--from-format``/``--to-format`` take) and package."""

    name: str
    package: str


#: Detection order: formats with an unambiguous marker file first.
REGISTRY: list[FormatEntry] = [
    FormatEntry("zero-ckpt", "zero_ckpt.formats.v1"),
    FormatEntry("dcp", "zero_ckpt.formats.dcp"),
    FormatEntry("deepspeed", "zero_ckpt.formats.deepspeed"),
    FormatEntry("torch", "zero_ckpt.formats.torch_files"),
]


def format_names() -> tuple[str, ...]:
    return tuple(e.name for e in REGISTRY)


def format_module(name: str, role: str = "source") -> ModuleType:
    """The package implementing format ``name``; CheckpointError naming the choices if unknown."""
    for e in REGISTRY:
        if e.name == name:
            return importlib.import_module(e.package)
    auto = "'auto' or " if role == "source" else ""
    raise CheckpointError(
        f"unknown {role} format {name!r}; choose {auto}one of {', '.join(format_names())}"
    )


def detect(loc: Location) -> str:
    """The name of the format of the checkpoint at ``loc``.

    A location that holds nothing (or a half-written format-v1 save) is reported as
    ``"zero-ckpt"``: reading it then says precisely what is missing."""
    for e in REGISTRY:
        if importlib.import_module(e.package).detect(loc):
            return e.name
    if loc.is_file():
        raise CheckpointError(
            f"{loc.url} is a file of unknown format; expected a checkpoint folder or a .pt file",
            path=loc.url,
        )
    if not loc.exists() or not loc.list_files():
        return "zero-ckpt"
    raise CheckpointError(
        f"{loc.url} is not a checkpoint zero-ckpt recognises (formats: {', '.join(format_names())}):"
        " no manifest.json (format v1), no DCP .metadata, no DeepSpeed 'latest' file or "
        "*_optim_states.pt files; pass the checkpoint folder itself",
        path=loc.url,
    )


def detect_url(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """:func:`detect` for a URL."""
    with open_location(url, storage_options) as loc:
        return detect(loc)


def resolve(loc: Location, from_format: str = "auto") -> str:
    """``from_format`` checked against the registry, or the detected format for ``"auto"``."""
    if from_format == "auto":
        return detect(loc)
    format_module(from_format)
    return from_format


def open_view(loc: Location, from_format: str = "auto") -> SourceView:
    """The checkpoint at ``loc`` as a :class:`SourceView` (``from_format`` forces a format)."""
    return format_module(resolve(loc, from_format)).open_view(loc)


def describe(loc: Location, fmt: str) -> Any:
    """The logical content (:class:`~zero_ckpt.manifest.Manifest`) of the ``fmt`` checkpoint at
    ``loc``, reading as little as the format allows (``describe`` if the package has one)."""
    module = format_module(fmt)
    cheap = getattr(module, "describe", None)
    return cheap(loc) if cheap is not None else module.open_view(loc).manifest


def precheck(loc: Location, view: SourceView) -> None:
    """Run the format's pre-use check of its files (nothing for formats with checksums, which
    the engine verifies as the bytes stream)."""
    check = getattr(format_module(view.format), "precheck", None)
    if check is not None:
        check(loc, view)


def _writer_specs() -> dict[str, str]:
    """Every writable target: each format's ``WRITER`` under its own name, plus the extra
    targets a package offers in ``WRITERS`` (``{target name: "module:function"}``)."""
    specs: dict[str, str] = {}
    for e in REGISTRY:
        module = importlib.import_module(e.package)
        if getattr(module, "WRITER", None):
            specs[e.name] = module.WRITER
        for name, spec in (getattr(module, "WRITERS", None) or {}).items():
            specs.setdefault(name, spec)
    return specs


def writer_for(to_format: str) -> Any:
    """The writer function of ``to_format`` (``convert --to-format``): a format's ``WRITER``,
    or an extra target a registered package lists in ``WRITERS``."""
    specs = _writer_specs()
    spec = specs.get(to_format)
    if spec is None:
        if to_format not in format_names():
            format_module(to_format, "target")  # unknown name: CheckpointError naming the formats
        raise CheckpointError(
            f"zero-ckpt cannot write the {to_format!r} format; writable formats: {', '.join(specs)}"
        )
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)
