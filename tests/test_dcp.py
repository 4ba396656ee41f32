"""PyTorch DCP in and out, against real FSDP2 runs (CPU, gloo) and torch's own DCP tools.

- A 2-rank FSDP2 + Adam run saved with ``dcp.save(get_state_dict(...))``: ``zero-ckpt
  consolidate`` equals ``dcp_to_torch_save``'s tensors bit for bit (model and, with
  ``--include-optimizer``, every Adam state); ``inspect`` and ``verify`` read it; a damaged
  record is caught by ``verify`` and refused by ``consolidate`` before anything is written.
- DCP -> format v1 -> ``zero_ckpt.load`` into a ZeroOptimizer at 3 ranks: the same params and
  Adam state, and training continues as torch's Adam does from the same state.
- format v1 -> DCP (``convert --to-format dcp --to 4``) -> ``dcp.load`` into an FSDP2 model +
  Adam at 4 ranks: the same params and Adam state, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _dcp_fsdp2 import _build, save_fsdp2_checkpoint  # noqa: E402
from _dist import check, run_scenarios  # noqa: E402

from zero_ckpt.errors import CheckpointError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fsdp2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dcp") / "step-2"
    save_fsdp2_checkpoint(str(path), world_size=2, steps=2)
    return path


@pytest.fixture(scope="module")
def reference(fsdp2_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What torch's own tool makes of the checkpoint (one full state dict)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path_factory.mktemp("ref") / "full.pt"
    dcp_to_torch_save(str(fsdp2_ckpt), str(out))
    return torch.load(out, weights_only=False)


def _cli(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, list(args), env={"ZERO_CKPT_DEBUG": ""})
    return result.exit_code, result.output


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                                                                      b.view(-1).view(torch.uint8) if b.numel() else b)


# ----- reading -----------------------------------------------------------------------------------


def test_consolidate_equals_dcp_to_torch_save(fsdp2_ckpt: Path, reference: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    code, text = _cli("consolidate", str(fsdp2_ckpt), str(out), "--include-optimizer", "-q")
    assert code == 0, text
    model = load_file(out / "model.safetensors")
    assert sorted(model) == sorted(reference["model"])  # params and the buffer, no prefix
    for name, t in reference["model"].items():
        assert _bits_equal(model[name], t), name
    optim = load_file(out / "optimizer.safetensors")
    states = reference["optim"]["state"]
    for name, st in states.items():
        for key, t in st.items():
            if key == "step":
                continue
            assert _bits_equal(optim[f"{name}.{key}"], t), (name, key)
        assert _bits_equal(optim[f"{name}.master"], reference["model"][name])
    meta = json.loads((out / "optimizer.json").read_text())
    group = reference["optim"]["param_groups"][0]
    assert meta["groups"][0]["params"] == list(group["params"])
    assert meta["groups"][0]["hyperparams"]["lr"] == group["lr"]
    assert meta["groups"][0]["scalars"] == {"step": 2}


def test_inspect_and_verify_read_dcp(fsdp2_ckpt: Path) -> None:
    import zero_ckpt

    from zero_ckpt.summary import inspect_checkpoint

    info = inspect_checkpoint(str(fsdp2_ckpt))
    assert info["source_format"] == "dcp"
    assert info["world_size"] == 2
    assert info["param_count"] == len(list(_build().parameters()))
    report = zero_ckpt.verify(str(fsdp2_ckpt))
    assert report.ok, report.problems
    assert report.format == "dcp" and report.method == "zip-crc32"
    assert report.bytes_checked > 0


def test_damaged_record_is_found_and_refused(fsdp2_ckpt: Path, tmp_path: Path) -> None:
    import zero_ckpt
    from zero_ckpt.formats.dcp.reading import read_dcp
    from zero_ckpt.formats.dcp.records import locate_tensor_record
    from zero_ckpt.storage import open_location

    bad = tmp_path / "bad"
    shutil.copytree(fsdp2_ckpt, bad)
    with open_location(str(bad)) as loc:
        meta = read_dcp(loc).meta
        t = meta.tensors["optim.state.out.weight.exp_avg"]
        chunk = t.chunks[0]
        start, nbytes = locate_tensor_record(
            loc, chunk.file, chunk.byte_offset, chunk.byte_length, t.dtype, math.prod(chunk.sizes)
        )
    path = bad / chunk.file
    data = bytearray(path.read_bytes())
    data[start + nbytes // 2] ^= 0xFF  # a value of the tensor: its zip CRC-32 no longer matches
    path.write_bytes(bytes(data))
    report = zero_ckpt.verify(str(bad))
    assert not report.ok and report.problems[0].kind in ("checksum", "structure")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="CRC-32"):
        zero_ckpt.consolidate(str(bad), str(out), include_optimizer=True)
    assert not out.exists() or not any(out.iterdir())  # nothing committed, nothing left
    with pytest.raises(CheckpointError, match="CRC-32"):
        zero_ckpt.convert(str(bad), str(tmp_path / "v1"), world_size=3)
    assert not (tmp_path / "v1" / "manifest.json").exists()


def test_a_malicious_metadata_is_refused(fsdp2_ckpt: Path, tmp_path: Path) -> None:
    import pickle

    import zero_ckpt

    bad = tmp_path / "evil"
    shutil.copytree(fsdp2_ckpt, bad)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (bad / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="os|system|posix"):
        zero_ckpt.consolidate(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "pwned").exists()


# ----- DCP -> format v1 -> ZeroOptimizer at 3 ranks ------------------------------------------------


def _zero_resume(rank: int, world_size: int, v1: str, full_pt: str) -> None:
    import torch.distributed as dist

    import zero_ckpt
    from zero_core import ZeroOptimizer

    ref = torch.load(full_pt, weights_only=False)
    model = _build(seed=1)  # other values: everything must come from the checkpoint
    opt = ZeroOptimizer(model.named_parameters(), torch.optim.Adam, stage=2, lr=1e-2, weight_decay=0.01)
    zero_ckpt.load(v1, optimizer=opt, model=model)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ref["model"][name]), name
    for name, t in model.named_buffers():
        assert torch.equal(t, ref["model"][name]), name
    for name, _ in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.get_full_state(name, key), ref["optim"]["state"][name][key]), (name, key)

    # continue training: one step on the same batch everywhere equals torch's Adam from the
    # same state on one process
    torch.manual_seed(7)
    x = torch.randn(4, 8)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()

    plain = _build(seed=1)
    plain.load_state_dict(ref["model"])
    popt = torch.optim.Adam(plain.parameters(), lr=1e-2, weight_decay=0.01)
    popt.load_state_dict({
        "state": {i: dict(ref["optim"]["state"][n]) for i, (n, _) in enumerate(plain.named_parameters())},
        "param_groups": [{**ref["optim"]["param_groups"][0],
                          "params": list(range(len(list(plain.parameters()))))}],
    })
    plain(x).pow(2).mean().backward()
    popt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=name)
    dist.barrier()


def test_dcp_to_v1_then_zero_optimizer_at_3_ranks(fsdp2_ckpt: Path, reference: dict, tmp_path: Path) -> None:
    import zero_ckpt

    v1 = tmp_path / "v1"
    manifest = zero_ckpt.convert(str(fsdp2_ckpt), str(v1), world_size=3).manifest
    assert manifest.world_size == 3
    assert manifest.extra["converted_from"]["format"] == "dcp"
    assert zero_ckpt.verify(str(v1)).ok
    full = tmp_path / "full.pt"
    torch.save(reference, full)
    results = run_scenarios([("zero-resume", _zero_resume, (str(v1), str(full)))], 3, timeout_s=180)
    check(results, "zero-resume", 3)


# ----- format v1 -> DCP -> FSDP2 at 4 ranks ----------------------------------------------------------


def _fsdp2_load(rank: int, world_size: int, dcp_path: str, full_pt: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ref = torch.load(full_pt, weights_only=False)
    mesh = init_device_mesh("cpu", (world_size,))
    model = _build(seed=3)
    for layer in model.children():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.5, weight_decay=0.0)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=dcp_path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full_m, full_o = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    for name, t in ref["model"].items():
        assert torch.equal(full_m[name], t), name
    for name, st in ref["optim"]["state"].items():
        for key, t in st.items():
            assert torch.equal(full_o["state"][name][key].float(), t.float()), (name, key)
    group = full_o["param_groups"][0]
    assert group["lr"] == ref["optim"]["param_groups"][0]["lr"]
    assert group["weight_decay"] == ref["optim"]["param_groups"][0]["weight_decay"]
    assert tuple(group["betas"]) == tuple(ref["optim"]["param_groups"][0]["betas"])


def test_v1_to_dcp_then_fsdp2_at_4_ranks(fsdp2_ckpt: Path, reference: dict, tmp_path: Path) -> None:
    import zero_ckpt

    v1 = tmp_path / "v1"
    zero_ckpt.convert(str(fsdp2_ckpt), str(v1), world_size=3)
    out = tmp_path / "dcp4"
    code, text = _cli("convert", str(v1), str(out), "--to-format", "dcp", "--to", "4", "-q")
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == [".metadata", *[f"__{r}_0.distcp" for r in range(4)]]
    full = tmp_path / "full.pt"
    torch.save(reference, full)
    results = run_scenarios([("fsdp2-load", _fsdp2_load, (str(out), str(full)))], 4, timeout_s=180)
    check(results, "fsdp2-load", 4)
    # and it reads back: DCP -> consolidate gives the reference again
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(out), str(tmp_path / "again.pt"))
    again = torch.load(tmp_path / "again.pt", weights_only=False)
    for name, t in reference["model"].items():
        assert _bits_equal(again["model"][name], t), name


# ----- run directories --------------------------------------------------------------------------


def test_list_shows_dcp_checkpoints_of_a_run_and_retention_keeps_them(fsdp2_ckpt: Path, tmp_path: Path) -> None:
    from zero_ckpt.runs import apply_retention, list_checkpoints

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(fsdp2_ckpt, run / "step-2")
    (run / "step-3").mkdir()  # a save that died before rank 0 wrote .metadata
    for r in range(2):
        (run / "step-3" / f"__{r}_0.distcp").write_bytes(b"x" * 10)
    infos = {c.name: c for c in list_checkpoints(str(run))}
    done, broken = infos["step-2"], infos["step-3"]
    assert (done.kind, done.status, done.step, done.world_size) == ("dcp", "complete", 2, 2)
    assert (broken.kind, broken.status, broken.world_size) == ("dcp", "incomplete", 2)
    assert ".metadata" in broken.problem
    code, text = _cli("list", str(run))
    assert code == 0 and "dcp" in text and "step-2" in text
    # another tool's saves are never deleted
    assert apply_retention(str(run), keep_last=1) == []
    assert (run / "step-2" / ".metadata").exists() and (run / "step-3").exists()


def test_jobs_check_dcp_records_as_they_stream(fsdp2_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunk is one zip record read whole: its CRC-32 is checked as the bytes pass, so the
    jobs never read the checkpoint a second time for the format's own check."""
    import zero_ckpt
    import zero_ckpt.formats.dcp as dcp_format

    def second_read(loc, view):  # noqa: ANN001
        raise RuntimeError("the precheck read the records again")

    monkeypatch.setattr(dcp_format, "precheck", second_read)
    zero_ckpt.consolidate(str(fsdp2_ckpt), str(tmp_path / "hf"), include_optimizer=True)
    zero_ckpt.convert(str(fsdp2_ckpt), str(tmp_path / "v1"), world_size=3)
    zero_ckpt.convert(str(fsdp2_ckpt), str(tmp_path / "dcp3"), to_format="dcp", world_size=3)
    assert zero_ckpt.verify(str(tmp_path / "v1")).ok
