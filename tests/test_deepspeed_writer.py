"""Writing DeepSpeed ZeRO-1/2 checkpoints at new data-parallel sizes, and DeepSpeed's universal layout.

Without DeepSpeed (the default run): what ``write_deepspeed`` writes is compared with the real
DeepSpeed checkpoints of ``fixtures/deepspeed/`` through zero-ckpt's own restricted reader. At a
fixture's own size the files must be DeepSpeed's files, values included; at another size they must
have the structure of DeepSpeed's own checkpoint of the same model at that size (the fixtures of
both sizes train the same model for the same steps on different data, so only structure is
compared); read back, every master, Adam state, module weight, buffer and frozen param is the
source's, bit for bit.

With DeepSpeed (``.venv-peers`` present and importing ``deepspeed``; skipped otherwise): a fresh
run is trained and saved at one size, written by zero-ckpt at another, loaded by real DeepSpeed
(``tests/_deepspeed_resume.py`` under the peers' interpreter, gloo on CPU) and trained on: the
losses equal those of the unresharded continuation, and DeepSpeed's view of the loaded state
equals the source's.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from zero_ckpt.conversion import consolidate_source, convert
from zero_ckpt.errors import CheckpointError, CorruptShardError, DestinationExistsError, LayoutMismatchError
from zero_ckpt.formats.deepspeed.reading import open_deepspeed
from zero_ckpt.formats.deepspeed.writing import (
    DeepSpeedWriteError,
    write_deepspeed,
    write_deepspeed_universal,
)
from zero_ckpt.formats.torch_zip import TensorRef, Unknown, open_torch_zip
from zero_ckpt.storage import open_location

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "deepspeed"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "info.json").is_file()) if FIXTURES.is_dir() else []
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"

pytestmark = pytest.mark.skipif(not NAMES, reason="fixtures/deepspeed is missing")


def _info(name: str) -> dict:
    return json.loads((FIXTURES / name / "info.json").read_text())


def _ckpt(name: str) -> str:
    return str(FIXTURES / name / "ckpt")


def _tag_dir(run: str | Path) -> Path:
    run = Path(run)
    return run / (run / "latest").read_text().strip()


def _pt_files(tag_dir: Path) -> list[str]:
    return sorted(p.name for p in tag_dir.iterdir() if p.suffix == ".pt")


def _parse(path: Path):
    loc = open_location(str(path.parent))
    zf = open_torch_zip(loc, path.name)
    return zf, zf.load()


def _diff(a, b, where: str, out: list[str], za=None, zb=None, ignore: tuple[str, ...] = ()) -> None:
    """Differences between two parsed trees; tensor values are compared when both zip files are given."""
    if where.rsplit(".", 1)[-1] in ignore:
        return
    if type(a) is not type(b):
        out.append(f"{where}: {type(a).__name__} vs {type(b).__name__}")
        return
    if isinstance(a, TensorRef):
        if (a.shape, a.dtype, a.requires_grad) != (b.shape, b.dtype, b.requires_grad):
            out.append(f"{where}: tensor {a.shape} {a.dtype} {a.requires_grad} vs {b.shape} {b.dtype} {b.requires_grad}")
        elif za is not None and za.read_tensor_bytes(a) != zb.read_tensor_bytes(b):
            out.append(f"{where}: values differ")
        return
    if isinstance(a, Unknown):
        if (a.module, a.name) != (b.module, b.name):
            out.append(f"{where}: {a.qualname} vs {b.qualname}")
            return
        for part in ("args", "state", "items", "entries"):
            _diff(getattr(a, part), getattr(b, part), f"{where}.<{part}>", out, za, zb, ignore)
        return
    if isinstance(a, dict):
        if list(a) != list(b):
            out.append(f"{where}: keys {list(a)} vs {list(b)}")
        for k in a:
            if k in b:
                _diff(a[k], b[k], f"{where}.{k}", out, za, zb, ignore)
        return
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} items vs {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out, za, zb, ignore)
        return
    if a != b:
        out.append(f"{where}: {a!r} vs {b!r}")


def _compare_runs(ours: str | Path, theirs: str | Path, values: bool, ignore: tuple[str, ...] = ()) -> list[str]:
    ta, tb = _tag_dir(ours), _tag_dir(theirs)
    assert _pt_files(ta) == _pt_files(tb)
    problems: list[str] = []
    for name in _pt_files(ta):
        za, a = _parse(ta / name)
        zb, b = _parse(tb / name)
        _diff(a, b, name, problems, za if values else None, zb if values else None, ignore)
    return problems


@functools.lru_cache(maxsize=None)
def _full(src: str, tmp_root: str) -> tuple[dict, dict]:
    """``(model tensors, optimizer tensors)`` of a checkpoint as zero-ckpt consolidates it."""
    out = Path(tmp_root) / f"full-{abs(hash(src))}"
    if out.exists():
        shutil.rmtree(out)
    consolidate_source(src, str(out), include_optimizer=True)
    return load_file(str(out / "model.safetensors")), load_file(str(out / "optimizer.safetensors"))


def _assert_equal_tensors(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        if ref[k].numel():
            assert torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8)), k


@pytest.fixture(scope="module")
def shared_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dsw")


# ----- at the source's size: DeepSpeed's own files -----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_size_gives_deepspeeds_own_files(name: str, tmp_path: Path) -> None:
    info = _info(name)
    result = write_deepspeed(_ckpt(name), str(tmp_path / "out"), world_size=info["world_size"])
    assert result.files[-1] == "latest" and (tmp_path / "out" / "latest").read_text() == info["tag"]
    assert _compare_runs(tmp_path / "out", _ckpt(name), values=True) == []
    for f in _tag_dir(tmp_path / "out").iterdir():  # valid zips: every record's CRC checks out
        with zipfile.ZipFile(f) as z:
            assert z.testzip() is None
    # the model states file holds only torch/collections types: torch's own safe loader reads it
    sd = torch.load(_tag_dir(tmp_path / "out") / "mp_rank_00_model_states.pt", weights_only=True)
    assert sd["dp_world_size"] == info["world_size"] and isinstance(sd["param_shapes"][0]["embed.weight"], torch.Size)


# ----- at another size: DeepSpeed's structure at that size, the source's values ----------------------


PAIRS = [(f"{base}_dp{a}", f"{base}_dp{b}") for base in ("z1_fp32", "z1_bf16", "z2_fp32", "z2_bf16") for a, b in ((2, 4), (4, 2))]


@pytest.mark.parametrize("src,ref", PAIRS)
def test_new_size_has_deepspeeds_structure_at_that_size(src: str, ref: str, tmp_path: Path) -> None:
    """Same keys, types, shapes, dtypes, paddings, partition sizes and counts, slice mappings,
    loss scaler, zero stage, config... as DeepSpeed's own checkpoint of the model at that size
    (``global_samples`` counts samples of the fixture runs, whose batch grows with the size)."""
    ws = _info(ref)["world_size"]
    write_deepspeed(_ckpt(src), str(tmp_path / "out"), world_size=ws)
    assert _compare_runs(tmp_path / "out", _ckpt(ref), values=False, ignore=("global_samples",)) == []


CASES = [
    ("z2_fp32_dp2", 4), ("z1_bf16_dp2", 3), ("z2_bf16_dp4", 2), ("z1_fp32_dp4", 8), ("z2_fp32_dp4_rr", 3),
    ("z2_fp32_dp4_rr", 1), ("z1_bf16opt_dp2", 4), ("z2_fp32_dp4_elastic", 3), ("z2_bf16_dp2", 5),
]


@pytest.mark.parametrize("name,to", CASES)
def test_values_are_the_sources_bit_for_bit(name: str, to: int, tmp_path: Path, shared_tmp: Path) -> None:
    # small chunks: every tensor crosses several chunk boundaries on its way
    write_deepspeed(_ckpt(name), str(tmp_path / "out"), world_size=to, chunk_bytes=40, workers=2)
    view = open_deepspeed(str(tmp_path / "out"))  # the reader's consistency checks pass
    assert view.manifest.world_size == to and view.optimizer == _info(name)["optimizer_class"]
    for g in view.manifest.groups:
        assert g.partition_numel == math.ceil(g.numel / (2 * to)) * 2
    ours_model, ours_opt = _full(str(tmp_path / "out"), str(shared_tmp))
    ref_model, ref_opt = _full(_ckpt(name), str(shared_tmp))
    _assert_equal_tensors(ours_model, ref_model)
    _assert_equal_tensors(ours_opt, ref_opt)
    raw = load_file(str(FIXTURES / name / "raw_params.safetensors"))
    for k, v in raw.items():
        assert torch.equal(ours_opt[k], v), k


def test_paddings_and_counts_at_the_new_size(tmp_path: Path) -> None:
    write_deepspeed(_ckpt("z2_fp32_dp2"), str(tmp_path / "z"), world_size=4)
    write_deepspeed(_ckpt("z1_bf16opt_dp2"), str(tmp_path / "b"), world_size=4)
    # group sizes 173 and 10: partitions of 44 and 4 at 4 ranks; the norm group's last rank is all padding
    for r, (pad, real) in enumerate([([0, 0], [44, 4]), ([0, 0], [44, 4]), ([0, 2], [44, 2]), ([3, 4], [41, 0])]):
        _, root = _parse(_tag_dir(tmp_path / "z") / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        osd = root["optimizer_state_dict"]
        assert osd["group_paddings"] == pad and osd["partition_count"] == [4, 4]
        assert [t.shape for t in osd["single_partition_of_fp32_groups"]] == [(n,) for n in real]
        st = osd["base_optimizer_state"]["state"]
        assert [st[g]["exp_avg"].shape for g in (0, 1)] == [(44,), (4,)]  # moments keep the padding
        assert osd["zero_stage"].args == (2,)
    for r in range(4):  # BF16_Optimizer: padded fp32 partitions, all the padding on the last rank
        _, root = _parse(_tag_dir(tmp_path / "b") / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        osd = root["optimizer_state_dict"]
        assert osd["group_paddings"] == ([3, 6] if r == 3 else [0, 0])
        assert [t.shape for t in osd["single_partition_of_fp32_groups"]] == [(44,), (4,)]
        assert "zero_stage" not in osd
    _, model = _parse(_tag_dir(tmp_path / "z") / "mp_rank_00_model_states.pt")
    assert model["dp_world_size"] == 4 and model["global_steps"] == 3


def test_round_robin_order_is_redone_for_the_new_size(tmp_path: Path) -> None:
    """DeepSpeed's round_robin_gradients orders a group's params by the data-parallel size: the
    source's order (at 4) is undone and redone at the new size, in param_shapes and the buffer."""
    own = ["embed.weight", "lin1.weight", "lin1.bias", "proj.weight", "proj.bias"]
    at4 = list(_info("z2_fp32_dp4_rr")["param_shapes"][0])
    assert at4 == ["embed.weight", "proj.bias", "lin1.weight", "lin1.bias", "proj.weight"]
    for to, expected in [
        (3, ["embed.weight", "proj.weight", "lin1.weight", "proj.bias", "lin1.bias"]),
        (2, ["embed.weight", "lin1.bias", "proj.bias", "lin1.weight", "proj.weight"]),
        (1, own),
    ]:
        write_deepspeed(_ckpt("z2_fp32_dp4_rr"), str(tmp_path / f"rr{to}"), world_size=to)
        view = open_deepspeed(str(tmp_path / f"rr{to}"))
        assert [p.name for p in view.manifest.groups[0].params] == expected
        _, rank0 = _parse(_tag_dir(tmp_path / f"rr{to}") / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        mapped = list(rank0["optimizer_state_dict"]["param_slice_mappings"][0])
        assert mapped == [n for n in own if n in mapped]  # DeepSpeed maps in the group's own order
    # back at 4: DeepSpeed's own files again
    write_deepspeed(str(tmp_path / "rr3"), str(tmp_path / "rr3to4"), world_size=4)
    assert _compare_runs(tmp_path / "rr3to4", _ckpt("z2_fp32_dp4_rr"), values=True) == []


@pytest.mark.parametrize("name,via", [("z2_bf16_dp4", [3, 8]), ("z1_bf16opt_dp2", [5]), ("z2_fp32_dp4_elastic", [2])])
def test_resharding_there_and_back_gives_the_original_files(name: str, via: list[int], tmp_path: Path) -> None:
    src = _ckpt(name)
    for i, ws in enumerate(via):
        write_deepspeed(src, str(tmp_path / f"step{i}"), world_size=ws)
        src = str(tmp_path / f"step{i}")
    write_deepspeed(src, str(tmp_path / "back"), world_size=_info(name)["world_size"])
    assert _compare_runs(tmp_path / "back", _ckpt(name), values=True) == []


def test_progress_and_large_archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress counts every source byte read; records and offsets past 4 GiB take zip64 fields
    (the threshold lowered here so that small files need them), which torch and zipfile read."""
    import zero_ckpt.formats.deepspeed.writing as writer

    monkeypatch.setattr(writer, "_ZIP64_LIMIT", 200)
    calls: list[tuple[int, int]] = []
    write_deepspeed(_ckpt("z2_bf16_dp2"), str(tmp_path / "out"), world_size=3, progress=lambda d, t: calls.append((d, t)))
    total = calls[0][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total) and total > 4 * 183 * 3
    tag = _tag_dir(tmp_path / "out")
    for f in tag.iterdir():
        with zipfile.ZipFile(f) as z:
            assert z.testzip() is None and any(i.header_offset > 200 for i in z.infolist())
    sd = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)
    assert sd["dp_world_size"] == 3
    write_deepspeed(str(tmp_path / "out"), str(tmp_path / "back"), world_size=2)
    monkeypatch.undo()
    assert _compare_runs(tmp_path / "back", _ckpt("z2_bf16_dp2"), values=True) == []


def test_a_dcp_checkpoint_converts_to_deepspeed(tmp_path: Path) -> None:
    """Any view is a source: a real FSDP2 DCP checkpoint (2 ranks) written as a DeepSpeed ZeRO
    run folder at 3 ranks reads back (zero-ckpt's own DeepSpeed reader, through the registry)
    with every param, Adam state, buffer and the step count the DCP's, bit for bit."""
    from _dcp_fsdp2 import save_fsdp2_checkpoint

    from zero_ckpt.formats.registry import open_view

    dcp = tmp_path / "dcp"
    save_fsdp2_checkpoint(str(dcp), 2)
    out = tmp_path / "ds"
    result = convert(str(dcp), str(out), to_format="deepspeed", world_size=3)
    assert result.format == "deepspeed" and result.world_size == 3 and result.files[-1] == "latest"
    assert (out / "latest").read_text() == result.tag and result.tag.startswith("global_step")
    with open_location(str(dcp)) as loc:
        src = open_view(loc)
    with open_location(str(out)) as loc:
        back = open_view(loc)
    assert back.format == "deepspeed" and back.manifest.world_size == 3 and len(back.manifest.shards) == 3
    assert [[p.name for p in g.params] for g in back.manifest.groups] == [
        [p.name for p in g.params] for g in src.manifest.groups
    ]
    assert [g.scalars for g in back.manifest.groups] == [g.scalars for g in src.manifest.groups]
    assert sorted(t.name for t in back.model) == sorted(t.name for t in src.model)
    for which in ("dcp", "ds"):
        consolidate_source(str(tmp_path / which), str(tmp_path / f"{which}-full"), include_optimizer=True)
    for f in ("model.safetensors", "optimizer.safetensors"):
        _assert_equal_tensors(load_file(str(tmp_path / "ds-full" / f)), load_file(str(tmp_path / "dcp-full" / f)))


def test_object_store_destination(tmp_path: Path, shared_tmp: Path) -> None:
    """Sequential writes only: the files go to any fsspec destination (here memory://)."""
    url = f"memory://dsw-{time.monotonic_ns()}"
    write_deepspeed(_ckpt("z1_bf16_dp4"), f"{url}/ds", world_size=3)
    write_deepspeed_universal(_ckpt("z1_bf16_dp4"), f"{url}/uni")
    assert open_deepspeed(f"{url}/ds").manifest.world_size == 3
    consolidate_source(f"{url}/ds", str(tmp_path / "full"), include_optimizer=True)
    _, ref_opt = _full(_ckpt("z1_bf16_dp4"), str(shared_tmp))
    _assert_equal_tensors(load_file(str(tmp_path / "full" / "optimizer.safetensors")), ref_opt)
    with open_location(f"{url}/uni") as loc:
        assert loc.read_bytes("latest_universal") == b"global_step3"
        assert "global_step3/zero/embed.weight/fp32.pt" in loc.list_files()


# ----- from format v1 ---------------------------------------------------------------------------------


def test_from_a_converted_format_v1_checkpoint(tmp_path: Path, shared_tmp: Path) -> None:
    """A DeepSpeed checkpoint converted to format v1 and resharded there comes back as DeepSpeed's
    optim files; the model states file is synthesised (documented limits)."""
    convert(_ckpt("z2_bf16_dp2"), str(tmp_path / "v1"), world_size=3)
    result = write_deepspeed(str(tmp_path / "v1"), str(tmp_path / "out"), world_size=4)
    assert result.tag == "global_step3" and any("buffer_names" in n for n in result.notes)
    ta, tb = _tag_dir(tmp_path / "out"), _tag_dir(_ckpt("z2_bf16_dp4"))
    assert _pt_files(ta) == _pt_files(tb)
    for f in _pt_files(ta):
        if f.startswith("bf16_zero_pp_rank"):
            problems: list[str] = []
            _diff(_parse(ta / f)[1], _parse(tb / f)[1], f, problems)
            assert problems == []
    sd = torch.load(ta / "mp_rank_00_model_states.pt", weights_only=True)
    assert sd["dp_world_size"] == 4 and sd["global_steps"] == 3 and sd["shared_params"] == {"head.weight": "embed.weight"}
    assert sd["module"]["head.weight"].data_ptr() == sd["module"]["embed.weight"].data_ptr()  # tied
    assert [list(g) for g in sd["param_shapes"]] == [list(s) for s in _info("z2_bf16_dp4")["param_shapes"]]
    assert set(sd["module"]) == set(_info("z2_bf16_dp4")["module_dtypes"])
    ours_model, ours_opt = _full(str(tmp_path / "out"), str(shared_tmp))
    ref_model, ref_opt = _full(_ckpt("z2_bf16_dp2"), str(shared_tmp))
    _assert_equal_tensors(ours_opt, ref_opt)
    _assert_equal_tensors(ours_model, ref_model)


def test_from_a_plain_format_v1_checkpoint(tmp_path: Path, shared_tmp: Path) -> None:
    """zero-ckpt's own checkpoint (align 4, no DeepSpeed metadata): DeepSpeed's layout, defaults."""
    src = str(ROOT / "fixtures" / "dp8")
    result = write_deepspeed(src, str(tmp_path / "out"), world_size=3)
    assert result.tag == "global_step120"
    tag = _tag_dir(tmp_path / "out")
    assert _pt_files(tag) == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                              "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"]
    _, root = _parse(tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    osd = root["optimizer_state_dict"]
    assert list(osd) == ["base_optimizer_state", "single_partition_of_fp32_groups", "zero_stage", "group_paddings",
                         "param_alignment_paddings", "partition_count", "ds_version", "param_slice_mappings"]
    assert osd["base_optimizer_state"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert list(osd["base_optimizer_state"]["state"][0]) == ["step", "exp_avg", "exp_avg_sq"]
    ours_model, ours_opt = _full(str(tmp_path / "out"), str(shared_tmp))
    ref_model, ref_opt = _full(src, str(shared_tmp))
    _assert_equal_tensors(ours_opt, ref_opt)
    _assert_equal_tensors(ours_model, ref_model)


def test_a_corrupted_source_leaves_nothing(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "fixtures" / "dp8", tmp_path / "src")
    shard = sorted((tmp_path / "src" / "shards").iterdir())[2]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="checksum"):
        write_deepspeed(str(tmp_path / "src"), str(tmp_path / "out"), world_size=2)
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


# ----- the universal layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["z2_bf16_dp2", "z2_fp32_dp4_rr", "z1_bf16opt_dp2"])
def test_universal_layout(name: str, tmp_path: Path) -> None:
    info = _info(name)
    result = write_deepspeed_universal(_ckpt(name), str(tmp_path / "u"))
    assert result.files[-1] == "latest_universal" and (tmp_path / "u" / "latest_universal").read_text() == info["tag"]
    zero = tmp_path / "u" / info["tag"] / "zero"
    raw = load_file(str(FIXTURES / name / "raw_params.safetensors"))
    module = torch.load(Path(_ckpt(name)) / info["tag"] / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    for n in info["trainable"]:
        assert sorted(p.name for p in (zero / n).iterdir()) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
        for key, fname in (("master", "fp32.pt"), ("exp_avg", "exp_avg.pt"), ("exp_avg_sq", "exp_avg_sq.pt")):
            doc = torch.load(zero / n / fname, weights_only=True)
            assert list(doc) == ["cat_dim", "param"] and doc["cat_dim"] == 0
            assert torch.equal(doc["param"], raw[f"{n}.{key}"]), (n, key)  # param_shapes order, even under round robin
        step = torch.load(zero / n / "step.pt", weights_only=True)
        assert step.dtype == torch.float32 and step.shape == () and float(step) == info["step"]
    for n in set(module) - set(info["trainable"]):  # tied names, frozen params, buffers: the module's value
        doc = torch.load(zero / n / "fp32.pt", weights_only=True)
        assert list(doc) == ["param"] and torch.equal(doc["param"], module[n].float()), n
    _, osd = _parse(zero / "optimizer_state.pt")
    _, rank0 = _parse(Path(_ckpt(name)) / info["tag"] / f"{'bf16_' if info['bf16'] else ''}zero_pp_rank_0_mp_rank_00_optim_states.pt")
    kept = [k for k in rank0["optimizer_state_dict"] if k not in ("base_optimizer_state", "param_slice_mappings",
                                                                  "single_partition_of_fp32_groups")]
    assert list(osd) == kept + ["param_groups"]
    assert osd["param_groups"] == rank0["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    src_model = Path(_ckpt(name)) / info["tag"] / "mp_rank_00_model_states.pt"
    assert (tmp_path / "u" / info["tag"] / "mp_rank_00_model_states.pt").read_bytes() == src_model.read_bytes()


def test_universal_from_format_v1_matches_universal_from_deepspeed(tmp_path: Path) -> None:
    convert(_ckpt("z1_bf16_dp4"), str(tmp_path / "v1"), world_size=3)
    write_deepspeed_universal(_ckpt("z1_bf16_dp4"), str(tmp_path / "a"))
    write_deepspeed_universal(str(tmp_path / "v1"), str(tmp_path / "b"))
    a, b = tmp_path / "a" / "global_step3" / "zero", tmp_path / "b" / "global_step3" / "zero"
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*.pt"))
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*.pt"))
    for rel in names:
        if rel == "optimizer_state.pt":  # rank 0's paddings and counts: of the 4-rank and the 3-rank cut
            problems: list[str] = []
            _diff(_parse(a / rel)[1], _parse(b / rel)[1], rel, problems, ignore=("group_paddings", "partition_count"))
            assert problems == []
            continue
        x, y = torch.load(a / rel, weights_only=True), torch.load(b / rel, weights_only=True)
        if isinstance(x, dict):
            assert list(x) == list(y) and torch.equal(x["param"], y["param"]), rel
        else:
            assert torch.equal(x, y), rel


# ----- refusals ------------------------------------------------------------------------------------------


def test_refusals_leave_the_destination_alone(tmp_path: Path) -> None:
    with pytest.raises(LayoutMismatchError, match="at least 1"):
        write_deepspeed(_ckpt("z1_fp32_dp2"), str(tmp_path / "a"), world_size=0)
    with pytest.raises(LayoutMismatchError, match="world size 2, not 4; pass --from 2"):
        write_deepspeed(_ckpt("z1_fp32_dp2"), str(tmp_path / "a"), world_size=3, expected_world_size=4)
    with pytest.raises(DeepSpeedWriteError, match="elastic_checkpoint"):
        write_deepspeed_universal(_ckpt("z2_fp32_dp4_elastic"), str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "latest").write_text("global_step9")  # a DeepSpeed run's file: needs overwrite
    with pytest.raises(DestinationExistsError):
        write_deepspeed(_ckpt("z1_fp32_dp2"), str(tmp_path / "b"), world_size=3)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["latest"]
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="torch checkpoint"):
        write_deepspeed(str(tmp_path / "plain.pt"), str(tmp_path / "c"), world_size=2)


def test_writing_imports_no_deepspeed(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from zero_ckpt.formats.deepspeed.writing import write_deepspeed, write_deepspeed_universal\n"
        f"write_deepspeed({_ckpt('z2_bf16_dp2')!r}, {str(tmp_path / 'a')!r}, world_size=3)\n"
        f"write_deepspeed_universal({_ckpt('z2_bf16_dp2')!r}, {str(tmp_path / 'b')!r})\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'deepspeed']\n"
        "print('OK' if not bad else bad)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "OK", out.stderr[-2000:]


# ----- CLI -------------------------------------------------------------------------------------------------


def test_cli_reshard_formats(tmp_path: Path) -> None:
    from cli.main import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["reshard", _ckpt("z2_bf16_dp4"), str(tmp_path / "ds"), "--to", "3", "--format", "deepspeed", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["format"] == "deepspeed" and doc["world_size"] == 3 and doc["tag"] == "global_step3"
    assert doc["files"][-1] == "latest" and len(doc["files"]) == 5
    assert open_deepspeed(str(tmp_path / "ds")).manifest.world_size == 3
    out = runner.invoke(cli, ["reshard", _ckpt("z2_bf16_dp4"), str(tmp_path / "u"), "--format", "deepspeed-universal",
                              "--tag", "step3_universal"])
    assert out.exit_code == 0 and "universal layout, tag step3_universal" in out.stdout
    assert (tmp_path / "u" / "latest_universal").read_text() == "step3_universal"
    # usage errors (exit 2): no --to for deepspeed, --part, --tag for format v1
    assert runner.invoke(cli, ["reshard", _ckpt("z1_fp32_dp2"), str(tmp_path / "x"), "--format", "deepspeed"]).exit_code == 2
    assert runner.invoke(cli, ["reshard", _ckpt("z1_fp32_dp2"), str(tmp_path / "x"), "--to", "2", "--format", "deepspeed",
                               "--part", "0/2"]).exit_code == 2
    assert runner.invoke(cli, ["reshard", str(ROOT / "fixtures" / "dp8"), str(tmp_path / "x"), "--to", "2", "--tag", "t"]).exit_code == 2
    out = runner.invoke(cli, ["reshard", _ckpt("z1_fp32_dp2"), str(tmp_path / "ds"), "--to", "3", "--format", "deepspeed"])
    assert out.exit_code == 1 and out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1


# ----- real DeepSpeed loads what was written ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _peers_have_deepspeed() -> bool:
    if not PEERS_PYTHON.is_file():
        return False
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    try:
        out = subprocess.run([str(PEERS_PYTHON), "-c", "import deepspeed"], capture_output=True, env=env, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def _launch(world: int, cases: list[dict], tmp: Path) -> None:
    cases_file = tmp / f"cases-{world}-{time.monotonic_ns()}.json"
    cases_file.write_text(json.dumps(cases))
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = subprocess.run(
        [str(PEERS_PYTHON), str(ROOT / "tests" / "_deepspeed_resume.py"), "--world", str(world), "--cases",
         str(cases_file), "--timeout", "240"],
        capture_output=True, text=True, env=env, timeout=300, cwd=str(ROOT),
    )
    errors = sorted(p for c in cases for p in Path(c["out"]).glob("error.*.txt") if not c.get("expect_error"))
    detail = "\n".join(p.read_text()[-1500:] for p in errors[:2]) or out.stderr[-3000:]
    assert out.returncode == 0, detail


def _losses(d: Path) -> list[float]:
    return json.loads((d / "losses.json").read_text())["losses"]


@pytest.mark.skipif(not _peers_have_deepspeed(), reason="needs .venv-peers with deepspeed (see PEERS.md)")
def test_deepspeed_resumes_at_the_new_size(tmp_path: Path) -> None:
    """Train 2 steps at 2 ranks and save; zero-ckpt writes the checkpoint for 4 and 3 ranks (and
    the universal layout); real DeepSpeed loads each at its size and trains 2 more steps: the
    losses are the unresharded continuation's, and the state DeepSpeed loaded is the source's."""
    plain = {"stage": 2, "bf16": False}
    rr = {"stage": 2, "bf16": False, "extra": {"round_robin_gradients": True}}
    z1bf16 = {"stage": 1, "bf16": True}
    runs = {"plain": plain, "rr": rr, "z1bf16": z1bf16}

    def resume(name: str, ckpt: Path, cfg: dict, **more) -> dict:
        return {"mode": "resume", "ckpt": str(ckpt), "out": str(tmp_path / f"r-{name}"), "continue": 2, **cfg, **more}

    # train and save, continue in the same engine, and resume the saved checkpoint at its own size
    _launch(2, [{"mode": "train", "out": str(tmp_path / n), "steps": 2, "continue": 2, **cfg} for n, cfg in runs.items()]
            + [resume("orig2", tmp_path / "plain" / "ckpt", plain)], tmp_path)

    # what zero-ckpt writes (in this process: no DeepSpeed here)
    written = {}
    for n in runs:
        for ws in (4, 3):
            if n == "z1bf16" and ws == 3:
                continue
            written[(n, ws)] = tmp_path / f"{n}-ds{ws}"
            write_deepspeed(str(tmp_path / n / "ckpt"), str(written[(n, ws)]), world_size=ws)
    convert(str(tmp_path / "plain" / "ckpt"), str(tmp_path / "plain-v1"), world_size=3)
    write_deepspeed(str(tmp_path / "plain-v1"), str(tmp_path / "plain-v1-ds4"), world_size=4)
    write_deepspeed_universal(str(tmp_path / "plain" / "ckpt"), str(tmp_path / "plain-uni"))
    universal = {"config": {"checkpoint": {"load_universal": True}}}

    _launch(4, [
        resume("plain4", written[("plain", 4)], plain), resume("rr4", written[("rr", 4)], rr),
        resume("z1bf16-4", written[("z1bf16", 4)], z1bf16), resume("v1-4", tmp_path / "plain-v1-ds4", plain),
        # DeepSpeed itself refuses the original at another size
        resume("orig4", tmp_path / "plain" / "ckpt", plain, expect_error=True),
    ], tmp_path)
    # the universal layout at 3 ranks. Not at 4: DeepSpeed 0.19.8 fails there (IndexError in
    # load_hp_checkpoint_state_from_checkpoint_dir on the rank that holds none of the norm group),
    # with ds_to_universal's output as well. Not with round_robin_gradients: DeepSpeed's universal
    # load places each param by its group order, not the round-robin buffer order, and resumes
    # with scrambled state whatever wrote the files.
    _launch(3, [
        resume("plain3", written[("plain", 3)], plain), resume("rr3", written[("rr", 3)], rr),
        resume("uni3", tmp_path / "plain-uni", {**plain, **universal}),
    ], tmp_path)

    assert "DP world size of 2 but the current world size is 4" in (tmp_path / "r-orig4" / "error.0.txt").read_text()
    for name, ref, tol in [
        ("orig2", "plain", 1e-6), ("plain4", "plain", 1e-6), ("rr4", "rr", 1e-6), ("z1bf16-4", "z1bf16", 1e-3), ("v1-4", "plain", 1e-6),
        ("plain3", "plain", 1e-6), ("rr3", "rr", 1e-6), ("uni3", "plain", 1e-6),
    ]:
        ours, reference = _losses(tmp_path / f"r-{name}"), _losses(tmp_path / ref)
        assert len(ours) == 2 and ours == pytest.approx(reference, rel=tol, abs=tol), name

    # DeepSpeed's view of what it loaded: the source's values, bit for bit
    for name, ref in [("plain4", "plain"), ("z1bf16-4", "z1bf16"), ("v1-4", "plain"), ("plain3", "plain"),
                      ("uni3", "plain"), ("rr3", "rr"), ("rr4", "rr")]:
        state = load_file(str(tmp_path / f"r-{name}" / "state.safetensors"))
        _, opt = _full(str(tmp_path / ref / "ckpt"), str(tmp_path))
        tag = _tag_dir(tmp_path / ref / "ckpt")
        module = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
        for k, v in module.items():
            assert torch.equal(state[f"module.{k}"], v), (name, k)
        if ref != "rr":  # under round_robin_gradients DeepSpeed's per-param routes read the wrong places
            for k, v in opt.items():
                assert torch.equal(state[k], v), (name, k)


def _peers_run(args: list[str], tmp: Path) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = subprocess.run([str(PEERS_PYTHON), *args], capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp))
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.skipif(not _peers_have_deepspeed(), reason="needs .venv-peers with deepspeed (see PEERS.md)")
def test_deepspeeds_own_tools_agree(tmp_path: Path) -> None:
    """DeepSpeed's ``zero_to_fp32`` on a checkpoint written at a new size gives what it gives on
    the source, bit for bit; ``ds_to_universal`` writes exactly what ``write_deepspeed_universal``
    writes (every file, every value)."""
    for name, to in [("z2_bf16_dp4", 3)]:
        write_deepspeed(_ckpt(name), str(tmp_path / f"{name}-{to}"), world_size=to)
        _peers_run(["-m", "deepspeed.utils.zero_to_fp32", str(tmp_path / f"{name}-{to}"), str(tmp_path / f"{name}-fp32")],
                   tmp_path)
        ours = torch.load(tmp_path / f"{name}-fp32" / "pytorch_model.bin", weights_only=True)
        ref = torch.load(FIXTURES / name / "zero_to_fp32" / "pytorch_model.bin", weights_only=True)
        _assert_equal_tensors(ours, ref)
    for name in ("z2_bf16_dp2",):
        tag = _info(name)["tag"]
        write_deepspeed_universal(_ckpt(name), str(tmp_path / f"{name}-ours"))
        _peers_run(["-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", f"{_ckpt(name)}/{tag}",
                    "--output_folder", str(tmp_path / f"{name}-ref" / tag), "--inject_missing_state",
                    "--num_extract_workers", "1", "--num_merge_workers", "1"], tmp_path)
        a, b = tmp_path / f"{name}-ours", tmp_path / f"{name}-ref"
        files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
        assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
        for rel in files:
            if not rel.endswith(".pt"):
                assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
                continue
            za, x = _parse(a / rel)
            zb, y = _parse(b / rel)
            problems: list[str] = []
            _diff(x, y, rel, problems, za, zb)
            assert problems == [], problems
