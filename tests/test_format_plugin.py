"""Adding a format touches only its package and the registry line.

A toy format ("toy": ``toy.json`` describing params, plus one raw little-endian ``state.raw``
holding each state's flat buffer) lives in a package written to a temporary folder, outside
the project. Registering it is one line in :data:`zero_ckpt.formats.registry.REGISTRY`; then
every job (inspect, verify, consolidate, reshard, convert to format v1 and to DCP) reads it
without any other change: the executors have no format branches.
"""

from __future__ import annotations

import json
import struct
import sys
import textwrap
from pathlib import Path

import pytest

from zero_ckpt.formats import registry

TOY_PACKAGE = '''
"""A toy checkpoint format: toy.json + state.raw (float32, little-endian)."""

import json

from zero_core.layout import compute_partition_numel
from zero_ckpt.manifest import FileMeta, GroupMeta, Manifest, ParamMeta
from zero_ckpt.view import Extent, SourceView

NAME = "toy"


def detect(loc):
    return loc.exists("toy.json")


def open_view(loc):
    doc = json.loads(loc.read_bytes("toy.json", max_bytes=1 << 20))
    params, offset = [], 0
    for name, shape in doc["params"]:
        params.append(ParamMeta(name, tuple(shape), "float32", offset))
        numel = 1
        for d in shape:
            numel *= d
        offset += numel
    keys = tuple(doc["keys"])
    group = GroupMeta(numel=offset, partition_numel=compute_partition_numel(offset, 1, 1), align=1,
                      params=tuple(params), state_keys=keys, hyperparams={"lr": doc["lr"]},
                      scalars={"step": doc["step"]})
    size = loc.size("state.raw")
    manifest = Manifest(1, 2, "float32", (group,), (FileMeta("state.raw", size, "none", rank=0),))
    state = {(0, k): (Extent(0, offset, "state.raw", i * offset * 4, "float32"),)
             for i, k in enumerate(("master", *keys))}
    return SourceView(format=NAME, url=loc.url, manifest=manifest, state=state)
'''

PARAMS = [["a.weight", [3, 2]], ["b.bias", [5]]]
NUMEL = 11


def _values(key_index: int) -> list[float]:
    return [key_index * 100.0 + i + 0.25 for i in range(NUMEL)]


@pytest.fixture()
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "plugins" / "toyfmt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(TOY_PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    # the registry line: the only change a new format makes outside its package
    monkeypatch.setattr(registry, "REGISTRY", [*registry.REGISTRY, registry.FormatEntry("toy", "toyfmt")])
    ckpt = tmp_path / "toy-ckpt"
    ckpt.mkdir()
    (ckpt / "toy.json").write_text(json.dumps(
        {"params": PARAMS, "keys": ["exp_avg", "exp_avg_sq"], "lr": 0.5, "step": 9}))
    data = b"".join(struct.pack(f"<{NUMEL}f", *_values(i)) for i in range(3))
    (ckpt / "state.raw").write_bytes(data)
    yield ckpt
    sys.modules.pop("toyfmt", None)


def test_every_job_reads_a_registered_format(toy: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    import zero_ckpt
    from zero_ckpt.summary import inspect_checkpoint

    assert zero_ckpt.detect_format(str(toy)) == "toy"
    info = inspect_checkpoint(str(toy))
    assert info["source_format"] == "toy" and info["param_count"] == 2

    report = zero_ckpt.verify(str(toy))
    assert report.ok and report.format == "toy" and report.bytes_checked == 3 * NUMEL * 4

    out = tmp_path / "hf"
    zero_ckpt.consolidate(str(toy), str(out), include_optimizer=True)
    model = load_file(out / "model.safetensors")
    assert model["a.weight"].tolist() == torch.tensor(_values(0)[:6]).reshape(3, 2).tolist()
    assert model["b.bias"].tolist() == _values(0)[6:]
    optim = load_file(out / "optimizer.safetensors")
    assert optim["b.bias.exp_avg_sq"].tolist() == _values(2)[6:]

    v1 = tmp_path / "v1"
    zero_ckpt.reshard(str(toy), str(v1), world_size=3)
    assert zero_ckpt.verify(str(v1)).ok
    again = tmp_path / "hf-again"
    zero_ckpt.consolidate(str(v1), str(again), include_optimizer=True)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (again / "optimizer.safetensors").read_bytes() == (out / "optimizer.safetensors").read_bytes()

    result = zero_ckpt.convert(str(toy), str(tmp_path / "dcp"), to_format="dcp", world_size=2)
    assert result.format == "dcp" and result.files[-1] == ".metadata"
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(tmp_path / "dcp"), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    assert torch.equal(full["model"]["a.weight"], model["a.weight"])
    assert torch.equal(full["optim"]["state"]["b.bias"]["exp_avg"], optim["b.bias.exp_avg"])
    assert full["optim"]["param_groups"][0]["params"] == ["a.weight", "b.bias"]
    assert full["optim"]["param_groups"][0]["lr"] == 0.5
