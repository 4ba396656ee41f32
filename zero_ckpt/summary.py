"""What ``zero-ckpt inspect`` shows, as plain data, and the small parsers the CLI needs.

The CLI only prints: every fact it shows about a checkpoint comes from :func:`summarize`
(one dict, JSON-serialisable, the same for the text and the ``--json`` output) and
:func:`param_listing` (each parameter with its fragment on every rank, from
:mod:`zero_core.layout`, never re-derived here).

Units: ``numel``, offsets and fragment bounds are **elements**; ``*_bytes`` are bytes.
No I/O except in :func:`inspect_checkpoint`, which reads the manifest through
:func:`zero_ckpt.open_checkpoint`.
"""

from __future__ import annotations

import re
from typing import Any

from zero_ckpt.manifest import Manifest

__all__ = [
    "summarize",
    "param_listing",
    "inspect_checkpoint",
    "parse_size",
    "format_bytes",
]


def summarize(
    manifest: Manifest, *, path: str | None = None, params: bool = False
) -> dict[str, Any]:
    """The inspect summary of ``manifest`` as a JSON-serialisable dict.

    Keys: ``path``, ``format``, ``version``, ``created_by``, ``world_size``, ``zero_stage``,
    ``step``, ``master_dtype``, ``total_params`` (elements over all groups), ``param_count``
    (parameter tensors, aliases not counted), ``shard_count``, ``shard_bytes``, ``model_file``
    (``{"path", "bytes"}`` or None), ``extra_keys`` and ``groups``: one dict per group with
    ``numel``, ``partition_numel``, ``align``, ``padding`` (elements past ``numel`` in the
    padded buffer, never stored), ``empty_ranks`` (ranks holding no element of the group),
    ``params`` (count), ``state_keys``, ``state_dtypes``, ``hyperparams`` and ``scalars``.
    With ``params=True`` the dict also has ``params``: :func:`param_listing`.
    """
    groups = []
    for g, layout in zip(manifest.groups, manifest.layouts()):
        groups.append(
            {
                "numel": g.numel,
                "partition_numel": g.partition_numel,
                "align": g.align,
                "padding": layout.padding,
                "empty_ranks": sum(
                    1 for r in range(manifest.world_size) if layout.real_numel(r) == 0
                ),
                "params": len(g.params),
                "state_keys": list(g.state_keys),
                "state_dtypes": dict(g.state_dtypes),
                "hyperparams": dict(g.hyperparams),
                "scalars": dict(g.scalars),
            }
        )
    model = manifest.model_file
    out: dict[str, Any] = {
        "path": path,
        "format": manifest.format,
        "version": manifest.version,
        "created_by": manifest.created_by,
        "world_size": manifest.world_size,
        "zero_stage": manifest.zero_stage,
        "step": manifest.step,
        "master_dtype": manifest.master_dtype,
        "total_params": manifest.total_numel,
        "param_count": sum(len(g.params) for g in manifest.groups),
        "shard_count": len(manifest.shards),
        "shard_bytes": manifest.shard_bytes,
        "model_file": None if model is None else {"path": model.path, "bytes": model.bytes},
        "extra_keys": sorted(manifest.extra),
        "groups": groups,
    }
    if params:
        out["params"] = param_listing(manifest)
    return out


def param_listing(manifest: Manifest) -> list[dict[str, Any]]:
    """Every parameter, in group then flat order, with where its elements live.

    Each entry: ``group``, ``name``, ``aliases``, ``shape``, ``dtype`` (model dtype), ``numel``,
    ``offset`` (in the group's flat buffer) and ``fragments``: one
    ``{"rank", "start", "end"}`` per rank holding part of it, ``[start, end)`` counted in
    elements of the flattened parameter. The fragments cover the parameter exactly once.
    """
    out: list[dict[str, Any]] = []
    for gi, (g, layout) in enumerate(zip(manifest.groups, manifest.layouts())):
        for pi, p in enumerate(g.params):
            out.append(
                {
                    "group": gi,
                    "name": p.name,
                    "aliases": list(p.aliases),
                    "shape": list(p.shape),
                    "dtype": p.dtype,
                    "numel": p.numel,
                    "offset": p.offset,
                    "fragments": [
                        {"rank": f.rank, "start": f.param_start, "end": f.param_start + f.numel}
                        for f in layout.fragments_of_param(pi)
                    ],
                }
            )
    return out


def inspect_checkpoint(
    url: str, *, params: bool = False, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read ``url``'s manifest and return :func:`summarize` of it (reads no tensor data).

    A run directory whose ``latest`` names a format-v1 checkpoint is read as that checkpoint
    (``path`` in the result names it); another format (DeepSpeed, DCP) is read as its view's logical content.

    Raises the :class:`~zero_ckpt.errors.CheckpointError` that opening raises (incomplete
    checkpoint, unreadable or unsupported manifest, ...).
    """
    # Imported here: storage pulls in fsspec; keep this module light for the CLI's --help.
    from zero_ckpt.formats.registry import describe, detect
    from zero_ckpt.storage import open_location

    from zero_ckpt.runs import latest_zero_ckpt

    with open_location(url, storage_options) as probe:
        # a run directory whose latest names a format-v1 checkpoint: that checkpoint
        url = latest_zero_ckpt(probe) or url
    with open_location(url, storage_options) as loc:
        fmt = detect(loc)
        manifest = describe(loc, fmt)
    out = summarize(manifest, path=url, params=params)
    out["source_format"] = fmt
    return out


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``"5GB"`` (5 * 10**9), ``"512MiB"`` (512 * 2**20) or ``"1000"``.

    Units, case-insensitive: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024);
    a plain number is bytes. Fractions are allowed when they give a whole byte count
    (``"1.5GB"``). Raises ValueError naming the accepted forms otherwise, or for a size < 1.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f"invalid size {text!r}: expected a number of bytes, optionally with a unit "
                "(KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024), "
                "e.g. '5GB' or '512MiB'"
            )
        number = m.group(1)
        if "." in number:
            whole, _, frac = number.partition(".")
            scale = 10 ** len(frac)
            numerator = int(whole or 0) * scale + int(frac or 0)
            value, rest = divmod(numerator * _SIZE_UNITS[unit], scale)
            if rest:
                raise ValueError(f"invalid size {text!r}: it is not a whole number of bytes")
        else:
            value = int(number) * _SIZE_UNITS[unit]
    if value < 1:
        raise ValueError(f"invalid size {text!r}: it must be at least 1 byte")
    return value


def format_bytes(n: int) -> str:
    """``1234567`` -> ``"1.23 MB"`` (powers of 1000, as ``parse_size`` reads them back)."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 1000 or unit == "PB":
            return f"{value:.2f} {unit}"
    raise AssertionError("unreachable")
