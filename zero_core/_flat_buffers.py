"""One param group's flat buffers: the model-dtype flat buffer the params become views of, and
this rank's fp32 master partition. Offsets come from :class:`zero_core.layout.GroupLayout` only.

Units: elements. Private to ``zero_core``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zero_core.layout import GroupLayout

__all__: list[str] = []

#: Model dtypes a group may have; masters are always float32.
SUPPORTED_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASTER_DTYPE = torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling layouts and manifests use)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class Entry:
    """One parameter as the user gave it (frozen ones included, in the given order)."""

    name: str
    param: torch.Tensor
    trainable: bool


@dataclass
class FlatGroup:
    """A param group's buffers on this rank.

    ``flat``: the model-dtype buffer of ``layout.padded_numel`` elements; trainable param ``i``
    is ``flat[offset_i : offset_i + numel_i].view(shape_i)``. ``master``: the fp32 parameter of
    ``layout.partition_numel`` elements the wrapped optimizer steps (padding kept zero).
    """

    layout: GroupLayout
    entries: list[Entry]
    params: list[torch.Tensor]
    flat: torch.Tensor
    rank: int
    master: torch.nn.Parameter = field(init=False)

    @property
    def model_dtype(self) -> torch.dtype:
        return self.flat.dtype

    @property
    def device(self) -> torch.device:
        return self.flat.device

    @property
    def master_data(self) -> torch.Tensor:
        """The master partition without autograd (live storage; in-place writes allowed)."""
        return self.master.detach()

    def own_flat_slice(self) -> torch.Tensor:
        """This rank's partition of the model-dtype flat buffer (a view)."""
        start, end = self.layout.rank_range(self.rank)
        return self.flat[start:end]

    def real_partition_numel(self) -> int:
        """Real (non-padding) elements at the head of this rank's partition."""
        return self.layout.real_numel(self.rank)

    @property
    def master_is_model(self) -> bool:
        """True when the master partition is the model's own flat slice (no copy)."""
        own = self.own_flat_slice()
        return self.master_data.numel() > 0 and self.master_data.data_ptr() == own.data_ptr()

    def init_master(self, *, copy: bool = True, device: torch.device | None = None) -> None:
        """(Re)create the master partition from the model flat buffer (padding zero).

        ``copy=False`` (fp32 models only): the master *is* this rank's slice of the model flat
        buffer, so the wrapped optimizer updates the model in place and no second fp32 copy
        exists; exact, since an fp32 master would hold the same bits. ``device``: where the
        master lives (``cpu`` for offload; pinned when CUDA is available so that copies to and
        from the GPU are asynchronous).
        """
        with torch.no_grad():
            own = self.own_flat_slice()
            if not copy:
                data = own
            else:
                target = device or own.device
                pin = target.type == "cpu" and own.device.type == "cuda"
                data = torch.empty(own.numel(), dtype=MASTER_DTYPE, device=target, pin_memory=pin)
                data.copy_(own)
            data[self.real_partition_numel():].zero_()
        self.master = torch.nn.Parameter(data, requires_grad=True)

    def zero_master_padding(self) -> None:
        with torch.no_grad():
            self.master_data[self.real_partition_numel():].zero_()

    def param_view(self, index: int) -> torch.Tensor:
        """Trainable param ``index`` as a view of ``flat`` (its model shape)."""
        spec = self.layout.params[index]
        return self.flat[spec.offset : spec.end].view(spec.shape)


def build_flat_group(
    entries: list[Entry], *, world_size: int, rank: int, align: int
) -> FlatGroup:
    """Lay the trainable params of ``entries`` into one flat buffer and rebind them to views.

    Every trainable param must share one dtype and device (checked by the caller). After this,
    ``param.data`` is a view of ``flat``; the values are preserved. The master partition is not
    built yet (call :meth:`FlatGroup.init_master` once the buffer holds the agreed values).
    """
    trainable = [e for e in entries if e.trainable]
    layout = GroupLayout.build(
        [(e.name, tuple(e.param.shape), dtype_name(e.param.dtype)) for e in trainable],
        world_size=world_size,
        align=align,
    )
    if trainable:
        dtype, device = trainable[0].param.dtype, trainable[0].param.device
    else:
        dtype, device = MASTER_DTYPE, torch.device("cpu")
    # empty, not zeros: pages are touched as each param moves in and its old storage is
    # released, so building the buffer never holds two copies of the model
    flat = torch.empty(layout.padded_numel, dtype=dtype, device=device)
    params = [e.param for e in trainable]
    with torch.no_grad():
        flat[layout.numel :].zero_()
        for spec, p in zip(layout.params, params):
            view = flat[spec.offset : spec.end].view(spec.shape)
            view.copy_(p.detach())
            p.data = view
    return FlatGroup(layout=layout, entries=list(entries), params=params, flat=flat, rank=rank)
