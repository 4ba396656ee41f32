"""A real PyTorch Distributed Checkpoint (DCP) saved by FSDP2 on CPU + gloo, for the DCP tests.

:func:`save_fsdp2_checkpoint` spawns ``world_size`` gloo ranks (through :mod:`tests._dist`),
builds a tiny model with uneven dimensions (so dim-0 shards are uneven: 13 rows -> 7 + 6, 5 -> 3
+ 2, and the 1-row gate leaves rank 1 an empty shard), wraps every layer and the root with FSDP2's
``fully_shard`` on a CPU device mesh, runs two Adam steps and writes
``dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)`` with
``msd, osd = get_state_dict(model, optimizer)``: the checkpoint a training job using FSDP2 and
DCP writes, in DCP's default format (``FileSystemWriter``, torch.save records).

Run as a script to write one and print its flattened keys::

    .venv/bin/python -m tests._dcp_fsdp2 /tmp/dcp-ckpt 2
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _dist import check, run_scenarios  # noqa: E402


def _build(seed: int = 0):
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 13)
            self.norm = nn.LayerNorm(13)
            self.out = nn.Linear(13, 5)
            self.gate = nn.Linear(5, 1)  # one row: rank 1's dim-0 shard of it is empty
            self.register_buffer("scale", torch.arange(3, dtype=torch.float32) + 0.5)

        def forward(self, x):
            return self.gate(self.out(torch.relu(self.norm(self.inp(x))))) * self.scale.sum()

    torch.manual_seed(seed)
    return Tiny()


def _save(rank: int, world_size: int, path: str, steps: int) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model = _build()
    for layer in (model.inp, model.norm, model.out, model.gate):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.01)
    torch.manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(4, 8)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def save_fsdp2_checkpoint(path: str, world_size: int = 2, steps: int = 2) -> None:
    """Write an FSDP2 + Adam DCP checkpoint at ``path`` (a new or empty folder)."""
    results = run_scenarios([("fsdp2-save", _save, (str(path), steps))], world_size, timeout_s=120)
    check(results, "fsdp2-save", world_size)


if __name__ == "__main__":
    out = sys.argv[1]
    ws = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    save_fsdp2_checkpoint(out, ws)
    import pickle

    with open(os.path.join(out, ".metadata"), "rb") as f:
        meta = pickle.load(f)
    for key, md in meta.state_dict_metadata.items():
        print(key, type(md).__name__, getattr(md, "size", ""))
