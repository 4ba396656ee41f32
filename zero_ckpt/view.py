"""What a checkpoint holds and where its bytes are: the one input of every planner (pure data).

A format's ``open`` (see :mod:`zero_ckpt.formats.registry`) reads its metadata and returns a
:class:`SourceView`; planning (:mod:`zero_ckpt.plan`) and execution see nothing else, so
``reshard``, ``consolidate``, ``convert`` and ``load`` have no format branches.

* ``manifest``: the logical content in format-v1 terms: groups, params (names, shapes, dtypes,
  flat offsets), state keys and their dtypes, hyperparameters, scalars, the world size the
  source was saved at (``shards`` are the files that hold optimizer state, ``model_file`` the
  one that holds module-only tensors, checksums where the format records them).
* ``state[(group, key)]``: the :class:`Extent` list that holds that key's flat buffer
  ``[0, group.numel)``, sorted and gap-free. A per-rank format (format v1, DeepSpeed) has one
  extent per rank; a per-param format (PyTorch DCP) one per stored chunk. Padding is never in
  an extent.
* ``model``: module-only tensors (buffers, frozen params), each whole in one place.
* ``checks``: what the engine verifies the streamed bytes against (format v1's CRCs).

Nothing here does I/O or imports torch.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from zero_ckpt.errors import CorruptShardError, LayoutMismatchError
from zero_ckpt.manifest import FileMeta, Manifest
from zero_ckpt.safetensors_format import SafetensorsHeader, dtype_size

#: The checksum a view records for a file whose format keeps none (DeepSpeed, DCP).
NO_CHECKSUM = "none"

__all__ = ["NO_CHECKSUM", "Extent", "ModelTensor", "SourceChecksInfo", "SourceView", "WriteResult", "header_model_tensors", "rank_extents"]


@dataclass(frozen=True)
class Extent:
    """Flat elements ``[start, stop)`` stored contiguously in ``file`` from byte ``byte_start``.

    ``tensor``/``tensor_offset`` name the stored tensor the bytes belong to and the byte offset
    of element ``start`` inside it: the unit the source's checksums cover (``None``: the
    format records no per-tensor checksum).
    """

    start: int
    stop: int
    file: str
    byte_start: int
    dtype: str
    tensor: str | None = None
    tensor_offset: int = 0

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ModelTensor:
    """A module-only tensor (buffer, frozen param): ``pieces`` hold its row-major elements
    ``[0, numel)`` in order (one piece when it is stored whole)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Extent, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    @classmethod
    def whole(cls, name: str, dtype: str, shape: tuple[int, ...], file: str, byte_start: int,
              tensor: str | None = None) -> "ModelTensor":
        """A tensor stored whole from ``byte_start`` of ``file`` (checksum unit ``tensor``)."""
        n = 1
        for d in shape:
            n *= d
        return cls(name, dtype, tuple(shape), (Extent(0, n, file, byte_start, dtype, tensor, 0),))


@dataclass(frozen=True)
class SourceChecksInfo:
    """What the streamed source bytes are checked against: for each recorded file, its parsed
    header (by path) and the CRC of the header bytes (format v1's CRC32Cs); and ``zip_units``:
    ``(file, unit) -> (zlib CRC-32, nbytes)`` of stored records whose bytes an extent names as
    its ``tensor`` (formats without checksums of their own whose tensors are whole zip entries,
    e.g. DCP chunks). A unit read whole as it streams is checked against its CRC-32; anything
    else the format checks before commit (its ``precheck``)."""

    headers: Mapping[str, SafetensorsHeader] = field(default_factory=dict)
    header_crcs: Mapping[str, int] = field(default_factory=dict)
    zip_units: Mapping[tuple[str, str], tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceView:
    """A checkpoint ready to plan from, in any format (see the module docstring)."""

    format: str
    url: str
    manifest: Manifest
    state: Mapping[tuple[int, str], tuple[Extent, ...]]
    model: tuple[ModelTensor, ...] = ()
    checks: SourceChecksInfo = field(default_factory=SourceChecksInfo)
    # format-specific facts worth recording in a conversion's manifest (tag, notes, ...)
    origin: Mapping[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> tuple[FileMeta, ...]:
        """Every file the view reads: the state files, then the model file."""
        m = self.manifest
        return tuple(m.shards) + ((m.model_file,) if m.model_file is not None else ())

    def check_saved_world_size(self, expected: int | None) -> None:
        """LayoutMismatchError unless the checkpoint was saved at ``expected`` ranks (the CLI's
        ``--from``; None: any)."""
        saved = self.manifest.world_size
        if expected is not None and expected != saved:
            raise LayoutMismatchError(
                f"{self.url} holds a checkpoint saved at world size {saved}, not "
                f"{expected}; pass --from {saved} or leave --from out",
                path=self.url,
                expected=expected,
                actual=saved,
            )

    @property
    def checked_files(self) -> tuple[FileMeta, ...]:
        """The files whose bytes the engine checks as they stream: those with a recorded
        checksum (format v1); formats without checksums are prechecked instead."""
        return tuple(f for f in self.files if f.checksum not in ("", NO_CHECKSUM))

    def extents(self, group: int, key: str, start: int, stop: int) -> Iterator[Extent]:
        """The pieces of ``[start, stop)`` of ``key``'s flat buffer in group ``group``, in order,
        each clipped to the range (``Extent.tensor_offset`` adjusted)."""
        if start >= stop:
            return
        pieces = self.state.get((group, key))
        if not pieces:
            raise CorruptShardError(
                f"{self.url}: no stored bytes for state {key!r} of group {group}; the checkpoint "
                "is incomplete or its metadata is damaged",
                path=self.url,
            )
        starts = [e.start for e in pieces]
        i = max(0, bisect_right(starts, start) - 1)
        pos = start
        while pos < stop:
            if i >= len(pieces) or pieces[i].start > pos or pieces[i].stop <= pos:
                raise CorruptShardError(
                    f"{self.url}: elements [{pos}, {stop}) of state {key!r} of group {group} are "
                    "stored nowhere; the checkpoint is incomplete or its metadata is damaged",
                    path=self.url,
                )
            e = pieces[i]
            hi = min(stop, e.stop)
            skip = (pos - e.start) * dtype_size(e.dtype)
            yield Extent(pos, hi, e.file, e.byte_start + skip, e.dtype, e.tensor, e.tensor_offset + skip)
            pos = hi
            i += 1


def rank_extents(
    manifest: Manifest,
    headers: Mapping[int, SafetensorsHeader],
    paths: Mapping[int, str] | None = None,
) -> dict[tuple[int, str], tuple[Extent, ...]]:
    """Extents of a per-rank format (format v1 and DeepSpeed views): rank ``r`` holds the real
    elements of its partition of every group, tensor ``g{g}.{key}`` of ``headers[r]`` in file
    ``paths[r]`` (default: the manifest's shard paths). Ranks without a header are left out
    (``load`` reads only the shards its partition overlaps)."""
    from zero_ckpt.manifest import tensor_name

    files = dict(paths) if paths is not None else {s.rank: s.path for s in manifest.shards}
    out: dict[tuple[int, str], tuple[Extent, ...]] = {}
    for gi, group in enumerate(manifest.groups):
        layout = group.layout(manifest.world_size)
        for key in group.keys:
            name = tensor_name(gi, key)
            dtype = group.dtype_of(key, manifest.master_dtype)
            pieces = []
            for rank in range(manifest.world_size):
                lo, hi = layout.real_range(rank)
                if hi <= lo or rank not in headers:
                    continue
                entry = headers[rank].tensors[name]
                pieces.append(Extent(lo, hi, files[rank], entry.start, dtype, name, 0))
            out[(gi, key)] = tuple(pieces)
    return out


def header_model_tensors(path: str, header: SafetensorsHeader | None) -> tuple[ModelTensor, ...]:
    """Module-only tensors located by a (real or synthesised) header of the file at ``path``,
    in the file's byte order."""
    if header is None:
        return ()
    return tuple(
        ModelTensor.whole(e.name, e.dtype, tuple(e.shape), path, e.start, e.name)
        for e in sorted(header.tensors.values(), key=lambda e: (e.start, e.name))
    )


@dataclass(frozen=True)
class WriteResult:
    """What a format writer wrote (``convert``'s result, whatever the target format).

    ``files`` relative to ``url``, the commit point (``manifest.json``, ``latest``,
    ``.metadata``) last; ``bytes`` their total; ``manifest`` the new manifest when the target
    is format v1; ``notes`` facts worth telling the user (e.g. metadata overruled)."""

    format: str
    url: str
    world_size: int | None
    files: tuple[str, ...]
    bytes: int
    notes: tuple[str, ...] = ()
    manifest: Manifest | None = None
    tag: str | None = None
