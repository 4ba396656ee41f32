"""Reading real DeepSpeed ZeRO-1/2 checkpoints (``fixtures/deepspeed/``) without DeepSpeed.

The fixtures come from ``fixtures/make_deepspeed_fixtures.py`` (DeepSpeed 0.19.8 on CPU with
gloo): stage 1 and 2, fp32 and bf16, world sizes 2 and 4, round_robin_gradients, and a
BF16_Optimizer run; each with DeepSpeed's own ``zero_to_fp32`` output and its per-param values.
These tests hold that what zero-ckpt reads is what DeepSpeed wrote, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import zero_ckpt
from zero_ckpt.conversion import consolidate_source, convert
from zero_ckpt.errors import CheckpointError, IncompleteCheckpointError, MissingShardError
from zero_ckpt.formats import detect_format, open_view
from zero_ckpt.formats.deepspeed.reading import DeepSpeedFormatError, open_deepspeed
from zero_ckpt.formats.torch_zip import UnsafePickleError
from zero_ckpt.storage import open_location

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "deepspeed"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "info.json").is_file()) if FIXTURES.is_dir() else []
KEYS = ("master", "exp_avg", "exp_avg_sq")


def _info(name: str) -> dict:
    return json.loads((FIXTURES / name / "info.json").read_text())


def _ckpt(name: str) -> str:
    return str(FIXTURES / name / "ckpt")


def _module(name: str) -> dict[str, torch.Tensor]:
    """The saved module weights: the model states file holds only torch/collections types, so
    torch's own weights_only loader reads it (the optim files it refuses)."""
    info = _info(name)
    path = FIXTURES / name / "ckpt" / info["tag"] / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def _zero_to_fp32(name: str) -> dict[str, torch.Tensor] | None:
    out = FIXTURES / name / "zero_to_fp32"
    if (out / "model.safetensors").is_file():
        return load_file(str(out / "model.safetensors"))
    if (out / "pytorch_model.bin").is_file():
        return torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return None


def _expected_full(name: str) -> dict[str, torch.Tensor]:
    """What a consolidation at float32 must give: DeepSpeed's zero_to_fp32 output, plus the
    frozen params it omits at ZeRO-1 (from the module weights); for BF16_Optimizer runs, which
    zero_to_fp32 refuses, the raw per-param masters plus buffers and frozen params."""
    info = _info(name)
    module = _module(name)
    ref = _zero_to_fp32(name)
    if ref is None:
        raw = load_file(str(FIXTURES / name / "raw_params.safetensors"))
        ref = {n: raw[f"{n}.master"] for n in info["trainable"]}
        ref.update({n: module[n].float() for n in info["buffers"]})
        for alias, target in info["shared_params"].items():
            ref[alias] = ref[target]
    else:
        ref = dict(ref)
    for n in info["frozen"]:
        ref.setdefault(n, module[n].float())
    return ref


def _assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype, k
        assert ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k].view(torch.uint8) if ours[k].numel() else ours[k],
                           ref[k].contiguous().view(torch.uint8) if ref[k].numel() else ref[k]), k


pytestmark = pytest.mark.skipif(not NAMES, reason="fixtures/deepspeed is missing")


def test_fixture_set_covers_the_issue() -> None:
    infos = [_info(n) for n in NAMES]
    combos = {(i["zero_stage"], i["bf16"], i["world_size"]) for i in infos}
    assert {(s, b, w) for s in (1, 2) for b in (False, True) for w in (2, 4)} <= combos
    assert any(i["round_robin_gradients"] for i in infos)
    assert any(i["optimizer_class"] == "BF16_Optimizer" for i in infos)
    assert any(i.get("elastic_checkpoint") for i in infos)
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 3_000_000


# ----- the view ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_view_matches_what_deepspeed_recorded(name: str) -> None:
    info = _info(name)
    view = open_deepspeed(_ckpt(name))
    m = view.manifest
    ws = info["world_size"]
    assert m.world_size == ws and m.zero_stage == info["zero_stage"] and m.master_dtype == "float32"
    assert view.tag == info["tag"] and view.optimizer == info["optimizer_class"]
    assert [[p.name for p in g.params] for g in m.groups] == [list(s) for s in info["param_shapes"]]
    for g, shapes in zip(m.groups, info["param_shapes"]):
        assert [list(p.shape) for p in g.params] == list(shapes.values())
        assert g.align == 2 and g.partition_numel == math.ceil(g.numel / (2 * ws)) * 2
        assert g.state_keys == ("exp_avg", "exp_avg_sq") and g.scalars == {"step": info["step"]}
    if info.get("elastic_checkpoint"):  # lean per-group states, no param_groups saved
        assert [g.hyperparams for g in m.groups] == [{}, {}]
    else:
        assert [g.hyperparams["lr"] for g in m.groups] == [h["lr"] for h in info["hyperparams"]]
        assert [g.hyperparams["weight_decay"] for g in m.groups] == [0.01, 0.0]
    dtype = "bfloat16" if info["bf16"] else "float32"
    assert {p.dtype for g in m.groups for p in g.params} == {dtype}
    embed = m.groups[0].params[0]
    assert embed.name == "embed.weight" and embed.aliases == ("head.weight",)
    assert set(view.model_header.tensors) == {"logit_bias", "frozen.weight", "frozen.bias"}
    prefix = "bf16_" if info["bf16"] else ""
    assert [s.path for s in m.shards] == [
        f"{info['tag']}/{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ws)
    ]
    if ws == 4:  # the norm group (10 elements, partitions of 4): the last rank holds only padding
        assert [m.groups[1].layout(ws).real_numel(r) for r in range(ws)] == [4, 4, 2, 0]
        assert view.headers[3].tensors["g1.master"].shape == (0,)
    assert bool(view.notes) == (info["round_robin_gradients"] or info.get("elastic_checkpoint", False))


@pytest.mark.parametrize("name", ["z2_fp32_dp2", "z1_bf16_dp4"])
def test_run_folder_and_tag_folder_read_the_same(name: str) -> None:
    a = open_deepspeed(_ckpt(name)).manifest
    b = open_deepspeed(f"{_ckpt(name)}/{_info(name)['tag']}").manifest
    assert a.groups == b.groups and a.world_size == b.world_size
    assert [s.path.split("/")[-1] for s in a.shards] == [s.path for s in b.shards]


# ----- consolidation equals zero_to_fp32 -------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_convert_then_consolidate_equals_zero_to_fp32(name: str, tmp_path: Path) -> None:
    info = _info(name)
    manifest = convert(_ckpt(name), str(tmp_path / "v1")).manifest
    assert manifest.world_size == info["world_size"]
    assert manifest.extra["converted_from"]["format"] == "deepspeed"
    assert zero_ckpt.verify(str(tmp_path / "v1")).ok
    zero_ckpt.consolidate(str(tmp_path / "v1"), str(tmp_path / "full"), dtype="float32", all_tied_names=True)
    ours = load_file(str(tmp_path / "full" / "model.safetensors"))
    _assert_same(ours, _expected_full(name))
    ref = _zero_to_fp32(name)
    if ref is not None:  # everything zero_to_fp32 gives is there, bit for bit
        for k, v in ref.items():
            assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("name", NAMES)
def test_consolidate_directly_from_the_view(name: str, tmp_path: Path) -> None:
    files = consolidate_source(_ckpt(name), str(tmp_path / "full"), dtype="float32")
    assert files == ["model.safetensors"]
    _assert_same(load_file(str(tmp_path / "full" / "model.safetensors")), _expected_full(name))


@pytest.mark.parametrize("name", ["z2_fp32_dp4", "z1_bf16_dp2", "z2_fp32_dp4_rr", "z1_bf16opt_dp2", "z2_fp32_dp4_elastic"])
@pytest.mark.parametrize("to", [1, 3, 8])
def test_convert_reshard_consolidate_equals_zero_to_fp32(name: str, to: int, tmp_path: Path) -> None:
    convert(_ckpt(name), str(tmp_path / "v1"))
    zero_ckpt.reshard(str(tmp_path / "v1"), str(tmp_path / "re"), world_size=to)
    zero_ckpt.consolidate(
        str(tmp_path / "re"), str(tmp_path / "full"), dtype="float32", include_optimizer=True, all_tied_names=True
    )
    _assert_same(load_file(str(tmp_path / "full" / "model.safetensors")), _expected_full(name))
    raw = load_file(str(FIXTURES / name / "raw_params.safetensors"))
    opt = load_file(str(tmp_path / "full" / "optimizer.safetensors"))
    for k, v in raw.items():
        assert torch.equal(opt[k], v), k


@pytest.mark.parametrize("name", ["z2_bf16_dp4", "z1_fp32_dp2"])
def test_convert_straight_to_another_world_size(name: str, tmp_path: Path) -> None:
    m = convert(_ckpt(name), str(tmp_path / "v1"), world_size=3).manifest
    assert m.world_size == 3 and len(m.shards) == 3
    assert zero_ckpt.verify(str(tmp_path / "v1")).ok
    zero_ckpt.consolidate(str(tmp_path / "v1"), str(tmp_path / "full"), dtype="float32", all_tied_names=True)
    _assert_same(load_file(str(tmp_path / "full" / "model.safetensors")), _expected_full(name))


# ----- per-param masters and Adam states -------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_param_state_equals_deepspeeds(name: str, tmp_path: Path) -> None:
    info = _info(name)
    consolidate_source(_ckpt(name), str(tmp_path / "full"), include_optimizer=True)
    ours = load_file(str(tmp_path / "full" / "optimizer.safetensors"))
    raw = load_file(str(FIXTURES / name / "raw_params.safetensors"))
    recorded = load_file(str(FIXTURES / name / "deepspeed_params.safetensors"))
    assert sorted(ours) == sorted(f"{n}.{k}" for n in info["trainable"] for k in KEYS) == sorted(raw)
    for k in raw:
        assert torch.equal(ours[k], raw[k]), k
    if info["safe_get_matches_raw_files"]:
        for k in recorded:
            assert torch.equal(ours[k], recorded[k]), k
    else:
        # round_robin_gradients: DeepSpeed's per-param routes (safe_get_full_*) address the
        # flat buffer in the wrong order; zero-ckpt follows param_shapes, like the files do.
        assert info["round_robin_gradients"]
        assert any(not torch.equal(ours[k], recorded[k]) for k in recorded)
    # The saved module weights are DeepSpeed's all-gathered masters (cast to the model dtype):
    # an independent check of the param_shapes order.
    module = _module(name)
    for n in info["trainable"]:
        master = ours[f"{n}.master"]
        assert torch.equal(module[n], master.to(module[n].dtype)), n
    meta = json.loads((tmp_path / "full" / "optimizer.json").read_text())
    assert [g["scalars"] for g in meta["groups"]] == [{"step": info["step"]}] * 2


def test_round_robin_flat_order_is_param_shapes_order() -> None:
    info = _info("z2_fp32_dp4_rr")
    order = list(info["param_shapes"][0])
    assert order != ["embed.weight", "lin1.weight", "lin1.bias", "proj.weight", "proj.bias"]
    view = open_deepspeed(_ckpt("z2_fp32_dp4_rr"))
    assert [p.name for p in view.manifest.groups[0].params] == order
    assert "round_robin_gradients" in view.notes[0]


# ----- frozen and tied params, safetensors output --------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("z1")])
def test_zero1_frozen_params_come_from_the_module_weights(name: str, tmp_path: Path) -> None:
    info = _info(name)
    ref = _zero_to_fp32(name)
    if ref is not None:
        assert not set(info["frozen"]) & set(ref)  # zero_to_fp32 silently drops them at ZeRO-1
    consolidate_source(_ckpt(name), str(tmp_path / "full"))
    ours = load_file(str(tmp_path / "full" / "model.safetensors"))
    module = _module(name)
    for n in info["frozen"]:
        assert ours[n].dtype == module[n].dtype and torch.equal(ours[n], module[n]), n


@pytest.mark.parametrize("name", NAMES)
def test_tied_params_every_name_present_and_safetensors_works(name: str, tmp_path: Path) -> None:
    info = _info(name)
    assert info["shared_params"] == {"head.weight": "embed.weight"}
    if info["zero_to_fp32_error"] is None:  # DeepSpeed's --safe_serialization fails on them
        assert "share memory" in info["zero_to_fp32_safe_serialization_error"]
    consolidate_source(_ckpt(name), str(tmp_path / "full"), dtype="float32")
    ours = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert torch.equal(ours["head.weight"], ours["embed.weight"])
    with open_location(str(tmp_path / "full")) as loc:  # one real copy per name, plain safetensors
        assert loc.size("model.safetensors") > 2 * ours["embed.weight"].numel() * 4


def test_converted_checkpoint_reads_by_name(tmp_path: Path) -> None:
    convert(_ckpt("z2_bf16_dp4"), str(tmp_path / "v1"))
    raw = load_file(str(FIXTURES / "z2_bf16_dp4" / "raw_params.safetensors"))
    with zero_ckpt.open_checkpoint(str(tmp_path / "v1")) as reader:
        assert torch.equal(reader.read("head.weight"), raw["embed.weight.master"])
        assert torch.equal(reader.read("lin1.weight", "exp_avg_sq"), raw["lin1.weight.exp_avg_sq"])
        assert reader.manifest.model_file is not None


# ----- detection and opening ---------------------------------------------------------------------------


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format(_ckpt("z2_fp32_dp2")) == "deepspeed"
    assert detect_format(f"{_ckpt('z2_fp32_dp2')}/global_step3") == "deepspeed"
    assert detect_format(str(ROOT / "fixtures" / "dp8")) == "zero-ckpt"
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    assert detect_format(str(tmp_path / "plain.pt")) == "torch"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a checkpoint zero-ckpt recognises"):
        detect_format(str(tmp_path / "junk"))


def test_open_source_handles_both_formats() -> None:
    """Both per-rank formats open as views through the registry, with the manifests their own
    readers give: DeepSpeed's (no checksums, module-only tensors in the model states file) and
    format v1's (every shard and the model file checksummed)."""
    from zero_ckpt.opening import load_manifest

    with open_location(_ckpt("z1_fp32_dp4")) as loc:
        view = open_view(loc)
        assert view.format == "deepspeed" and view.manifest == open_deepspeed(_ckpt("z1_fp32_dp4")).manifest
        assert view.manifest.world_size == 4 and view.checks.header_crcs == {} and view.checked_files == ()
        assert view.model and view.manifest.model_file is not None
        assert {e.file for k, pieces in view.state.items() for e in pieces} == {s.path for s in view.manifest.shards}
    with open_location(str(ROOT / "fixtures" / "dp8")) as loc:
        view = open_view(loc)
        assert view.format == "zero-ckpt" and view.manifest == load_manifest(loc)
        assert view.manifest.world_size == 8 and len(view.checks.header_crcs) == 9
        assert len(view.checked_files) == 9


def test_reading_imports_no_deepspeed_and_runs_nothing() -> None:
    code = (
        "import sys\n"
        "from zero_ckpt.conversion import consolidate_source\n"
        "from zero_ckpt.formats.deepspeed.reading import open_deepspeed\n"
        f"open_deepspeed({_ckpt('z1_bf16_dp2')!r})\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'deepspeed']\n"
        "print('OK' if not bad else bad)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"
    for path in (ROOT / "zero_ckpt").rglob("*.py"):
        text = path.read_text()
        assert "import deepspeed" not in text and "from deepspeed" not in text, path


# ----- refusals -------------------------------------------------------------------------------------------


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name / "ckpt", dst)
    return dst


def test_missing_rank_file_is_named(tmp_path: Path) -> None:
    ckpt = _copy("z2_fp32_dp4", tmp_path)
    (ckpt / "global_step3" / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(MissingShardError, match=r"ranks \[2\] are missing"):
        open_deepspeed(str(ckpt))


def test_last_rank_missing_is_caught_by_partition_count(tmp_path: Path) -> None:
    ckpt = _copy("z2_fp32_dp4", tmp_path)
    (ckpt / "global_step3" / "zero_pp_rank_3_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(DeepSpeedFormatError, match="partition_count .* 3 optim files"):
        open_deepspeed(str(ckpt))


def test_files_of_two_saves_are_refused(tmp_path: Path) -> None:
    ckpt = _copy("z2_fp32_dp2", tmp_path)
    other = FIXTURES / "z2_fp32_dp4" / "ckpt" / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(other, ckpt / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(DeepSpeedFormatError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: partition_count"):
        open_deepspeed(str(ckpt))


def test_mixed_prefixes_are_refused(tmp_path: Path) -> None:
    ckpt = _copy("z2_fp32_dp2", tmp_path)
    src = FIXTURES / "z2_bf16_dp2" / "ckpt" / "global_step3" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shutil.copy(src, ckpt / "global_step3")
    with pytest.raises(DeepSpeedFormatError, match="mixes optim files"):
        open_deepspeed(str(ckpt))


def test_model_file_of_another_model_does_not_add_up(tmp_path: Path) -> None:
    ckpt = _copy("z2_fp32_dp2", tmp_path)
    model = ckpt / "global_step3" / "mp_rank_00_model_states.pt"
    sd = torch.load(model, weights_only=True)
    shapes = sd["param_shapes"]
    shapes[0]["proj.bias"] = torch.Size([11])  # 4 more elements than the optimizer holds
    torch.save(sd, model)
    with pytest.raises(DeepSpeedFormatError, match="'proj.bias' has shape \\[7\\] but param_shapes says \\[11\\]"):
        open_deepspeed(str(ckpt))
    sd["module"]["proj.bias"] = torch.zeros(11)
    torch.save(sd, model)
    with pytest.raises(DeepSpeedFormatError, match="rank_1_mp_rank_00_optim_states.pt: group 0: holds 85 .* does not add up"):
        open_deepspeed(str(ckpt))


def test_truncated_optim_file_is_refused(tmp_path: Path) -> None:
    ckpt = _copy("z1_fp32_dp2", tmp_path)
    path = ckpt / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        open_deepspeed(str(ckpt))


def test_latest_naming_a_missing_tag(tmp_path: Path) -> None:
    ckpt = _copy("z1_fp32_dp2", tmp_path)
    (ckpt / "latest").write_text("global_step9")
    with pytest.raises(IncompleteCheckpointError, match="global_step9"):
        open_deepspeed(str(ckpt))


def test_zero3_is_refused(tmp_path: Path) -> None:
    tag = tmp_path / "ck" / "global_step1"
    tag.mkdir(parents=True)
    for r in range(2):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x")
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(DeepSpeedFormatError, match="ZeRO stage 3"):
        open_deepspeed(str(tag))


def test_malicious_optim_file_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    ckpt = _copy("z1_fp32_dp2", tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer_state_dict": Evil()}, ckpt / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafePickleError, match="system"):
        open_deepspeed(str(ckpt))
    with pytest.raises(UnsafePickleError):
        convert(str(ckpt), str(tmp_path / "out"))
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_convert_refuses_an_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("x")  # a checkpoint's file: needs overwrite
    with pytest.raises(CheckpointError, match="already exists"):
        convert(_ckpt("z1_fp32_dp2"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "manifest.json").read_text() == "x"


# ----- CLI --------------------------------------------------------------------------------------------


def test_cli_convert(tmp_path: Path) -> None:
    from cli.main import cli

    if "convert" not in cli.commands:
        pytest.skip("convert is not registered in cli/main.py yet")
    runner = CliRunner()
    out = runner.invoke(cli, ["convert", _ckpt("z2_bf16_dp4"), str(tmp_path / "v1"), "--to", "3", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["world_size"] == 3 and doc["from_format"] == "deepspeed" and doc["source_world_size"] == 4
    assert zero_ckpt.verify(str(tmp_path / "v1")).ok
    out = runner.invoke(cli, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "x")])
    assert out.exit_code == 1 and out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    out = runner.invoke(cli, ["convert", _ckpt("z1_fp32_dp2"), str(tmp_path / "y"), "--from-format", "deepspeed"])
    assert out.exit_code == 0 and "world size 2" in out.stdout
