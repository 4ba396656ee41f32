"""The everyday commands read a DeepSpeed ZeRO-1/2 folder directly (no convert step):
inspect, verify, reshard and consolidate, through the library and the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

import zero_ckpt  # noqa: E402
from cli.main import cli  # noqa: E402
from test_deepspeed import _ckpt, _expected_full  # noqa: E402

NAMES = ["z1_fp32_dp2", "z2_fp32_dp4", "z2_bf16_dp2", "z2_fp32_dp4_rr"]


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


@pytest.mark.parametrize("name", NAMES)
def test_consolidate_reads_deepspeed_in_place(name: str, tmp_path: Path) -> None:
    result = zero_ckpt.consolidate(_ckpt(name), str(tmp_path / "hf"), dtype="float32", all_tied_names=True)
    assert result.files == ["model.safetensors"]
    _assert_same(load_file(str(tmp_path / "hf" / "model.safetensors")), _expected_full(name))


@pytest.mark.parametrize("name", NAMES)
def test_reshard_reads_deepspeed_in_place(name: str, tmp_path: Path) -> None:
    manifest = zero_ckpt.reshard(_ckpt(name), str(tmp_path / "v1"), world_size=3)
    assert manifest.world_size == 3 and manifest.extra["converted_from"]["format"] == "deepspeed"
    assert zero_ckpt.verify(str(tmp_path / "v1")).ok
    zero_ckpt.consolidate(str(tmp_path / "v1"), str(tmp_path / "hf"), dtype="float32", all_tied_names=True)
    _assert_same(load_file(str(tmp_path / "hf" / "model.safetensors")), _expected_full(name))


def test_reshard_checks_from_against_deepspeed(tmp_path: Path) -> None:
    with pytest.raises(zero_ckpt.LayoutMismatchError, match="saved at world size 4, not 8"):
        zero_ckpt.reshard(_ckpt("z2_fp32_dp4"), str(tmp_path / "x"), world_size=2, expected_world_size=8)
    assert not (tmp_path / "x").exists()


def test_cli_inspect_and_verify_a_deepspeed_folder() -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["inspect", _ckpt("z2_fp32_dp4"), "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert summary["source_format"] == "deepspeed" and summary["world_size"] == 4
    out = runner.invoke(cli, ["verify", _ckpt("z2_fp32_dp4")])
    assert out.exit_code == 0, out.output
    assert "DeepSpeed records no checksums" in out.output


def test_verify_reports_a_broken_deepspeed_folder(tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(_ckpt("z2_fp32_dp2"), src)
    victim = next(src.glob("global_step*/*zero_pp_rank_1_*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    report = zero_ckpt.verify(str(src))
    assert not report.ok
    assert any(victim.name in p.path or victim.name in p.message for p in report.problems)
