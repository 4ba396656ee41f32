"""The ``zero-ckpt`` CLI through click's CliRunner: exit codes, messages, JSON, no tracebacks.

One small checkpoint (world size 4, align 4, two groups, uneven last ranks) is written with
``zero_ckpt.write_checkpoint`` per module and copied where a test damages it.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import zero_ckpt
from cli._common import parse_storage_options, progress_bar
from cli.main import cli
from zero_ckpt.summary import format_bytes, param_listing, parse_size, summarize

# group 0: 35 + 5 + 9 = 49 elements -> partition_numel ceil(49 / 16) * 4 = 16; ranks hold
# 16, 16, 16, 1. group 1: 6 elements -> partition_numel 4; ranks hold 4, 2, 0, 0.
SHAPES = [
    {"a.weight": (5, 7), "a.bias": (5,), "b.weight": (3, 3)},
    {"n.weight": (6,)},
]
EXPECTED_FRAGMENTS = {
    "a.weight": [(0, 0, 16), (1, 16, 32), (2, 32, 35)],
    "a.bias": [(2, 0, 5)],
    "b.weight": [(2, 0, 8), (3, 8, 9)],
    "n.weight": [(0, 0, 4), (1, 4, 6)],
}
SHARD1 = "rank-00001-of-00004.safetensors"


def _groups() -> list[dict[str, dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(7)
    return [
        {
            name: {
                "master": torch.randn(shape, generator=gen),
                "exp_avg": torch.randn(shape, generator=gen),
            }
            for name, shape in group.items()
        }
        for group in SHAPES
    ]


def _write(dst: str) -> None:
    zero_ckpt.write_checkpoint(
        dst,
        _groups(),
        world_size=4,
        align=4,
        hyperparams=[{"lr": 0.001, "weight_decay": 0.1}, {"lr": 0.001, "weight_decay": 0.0}],
        scalars=[{"step": 7}, {"step": 7}],
        model_dtypes={"a.weight": "bfloat16"},
        model_state={"buf.running_mean": torch.arange(3, dtype=torch.float32)},
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cli") / "ws4"
    _write(str(path))
    return str(path)


@pytest.fixture
def ckpt_copy(ckpt: str, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ckpt, dst)
    return dst


def invoke(*args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(cli, list(args), env=env or {"ZERO_CKPT_DEBUG": ""})
    assert "Traceback" not in result.output
    return result


def assert_error(result, pattern: str = "") -> str:
    """Exit 1 with exactly one stderr line ``error: ...`` matching ``pattern``; return it."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


# ----- inspect ---------------------------------------------------------------------------------


def test_inspect_text(ckpt: str) -> None:
    result = invoke("inspect", ckpt)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for needle in ("zero-ckpt v1", "world size     4", "zero stage     2", "step           7",
                   "master dtype   float32", "55 elements in 4 tensors, 2 group(s)",
                   "partition_numel 16, align 4, padding 15", "exp_avg", "lr=0.001",
                   "empty ranks  2 of 4", "model.safetensors"):
        assert needle in out, (needle, out)


def test_inspect_params_lists_fragments(ckpt: str) -> None:
    result = invoke("inspect", ckpt, "--params")
    assert result.exit_code == 0, result.output
    line = next(l for l in result.stdout.splitlines() if "a.weight" in l)
    assert "[5, 7]" in line and "bfloat16" in line
    assert "0: [0, 16)  1: [16, 32)  2: [32, 35)" in line


def test_inspect_json(ckpt: str) -> None:
    result = invoke("inspect", ckpt, "--json", "--params")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["world_size"] == 4 and doc["step"] == 7 and doc["total_params"] == 55
    assert [g["partition_numel"] for g in doc["groups"]] == [16, 4]
    assert doc["groups"][0]["state_keys"] == ["exp_avg"]
    got = {p["name"]: [(f["rank"], f["start"], f["end"]) for f in p["fragments"]]
           for p in doc["params"]}
    assert got == EXPECTED_FRAGMENTS


def test_inspect_missing_path(tmp_path: Path) -> None:
    assert_error(invoke("inspect", str(tmp_path / "nope")))


def test_inspect_incomplete_checkpoint(ckpt_copy: Path) -> None:
    (ckpt_copy / "manifest.json").unlink()
    assert_error(invoke("inspect", str(ckpt_copy)))


def test_inspect_damaged_manifest(ckpt_copy: Path) -> None:
    (ckpt_copy / "manifest.json").write_text("{not json")
    assert_error(invoke("inspect", str(ckpt_copy)), "manifest")


# ----- verify ----------------------------------------------------------------------------------


def test_verify_ok(ckpt: str) -> None:
    result = invoke("verify", ckpt)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"OK: 5 files, \d+ bytes verified", result.stdout.strip()), result.stdout


def test_verify_truncated_shard_names_the_file(ckpt_copy: Path) -> None:
    shard = ckpt_copy / "shards" / SHARD1
    shard.write_bytes(shard.read_bytes()[:-5])
    result = invoke("verify", str(ckpt_copy))
    assert result.exit_code == 1, result.output
    assert SHARD1 in result.stdout
    assert "FAILED" in result.stderr

    result = invoke("verify", str(ckpt_copy), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert any(SHARD1 in p["path"] for p in doc["problems"])


def test_verify_json_ok(ckpt: str) -> None:
    result = invoke("verify", ckpt, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["problems"] == [] and doc["files_checked"] == 5


def test_storage_options_reach_the_library(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    real = zero_ckpt.verify

    def spy(src, **kwargs):
        seen.update(kwargs["storage_options"])
        return real(src, **kwargs)

    monkeypatch.setattr(zero_ckpt, "verify", spy)
    result = invoke("-o", "auto_mkdir=true", "verify", ckpt, "-o", "block_size=1024", "-q")
    assert result.exit_code == 0, result.output
    assert seen == {"auto_mkdir": True, "block_size": 1024}


def test_storage_option_usage_error(ckpt: str) -> None:
    result = invoke("verify", ckpt, "-o", "novalue")
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.stderr


# ----- reshard ---------------------------------------------------------------------------------


def test_reshard_and_back(ckpt: str, tmp_path: Path) -> None:
    dst = str(tmp_path / "ws3")
    result = invoke("reshard", ckpt, dst, "--from", "4", "--to", "3")
    assert result.exit_code == 0, result.output
    assert "world size 3" in result.stdout
    doc = json.loads(invoke("inspect", dst, "--json").stdout)
    assert doc["world_size"] == 3 and doc["shard_count"] == 3
    assert invoke("verify", dst).exit_code == 0

    back = tmp_path / "ws4"
    result = invoke("reshard", dst, str(back), "--to", "4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["world_size"] == 4
    for shard in sorted((Path(ckpt) / "shards").iterdir()):
        assert (back / "shards" / shard.name).read_bytes() == shard.read_bytes()


def test_reshard_from_mismatch_says_what_the_checkpoint_holds(ckpt: str, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    line = assert_error(invoke("reshard", ckpt, str(dst), "--from", "8", "--to", "2"))
    assert re.search(r"\b4\b", line) and re.search(r"\b8\b", line), line
    assert not (dst / "manifest.json").exists()


def test_reshard_refuses_existing_destination(ckpt: str, tmp_path: Path) -> None:
    dst = str(tmp_path / "out")
    assert invoke("reshard", ckpt, dst, "--to", "2").exit_code == 0
    assert_error(invoke("reshard", ckpt, dst, "--to", "5"))
    assert json.loads(invoke("inspect", dst, "--json").stdout)["world_size"] == 2  # untouched
    result = invoke("reshard", ckpt, dst, "--to", "5", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(invoke("inspect", dst, "--json").stdout)["world_size"] == 5


def test_reshard_usage_errors(ckpt: str, tmp_path: Path) -> None:
    assert invoke("reshard", ckpt, str(tmp_path / "x")).exit_code == 2  # no --to
    assert invoke("reshard", ckpt, str(tmp_path / "x"), "--to", "0").exit_code == 2


# ----- consolidate -----------------------------------------------------------------------------


def _load_dir(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_consolidate(ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "full"
    result = invoke("consolidate", ckpt, str(out), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["files"] and doc["total_bytes"] > 0
    tensors = _load_dir(out)
    masters = {name: state["master"] for g in _groups() for name, state in g.items()}
    assert tensors["a.weight"].dtype == torch.bfloat16  # its model dtype
    assert torch.equal(tensors["a.weight"], masters["a.weight"].to(torch.bfloat16))
    assert torch.equal(tensors["b.weight"], masters["b.weight"])

    assert_error(invoke("consolidate", ckpt, str(out)))  # exists, no --overwrite
    result = invoke("consolidate", ckpt, str(out), "--overwrite", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "consolidated" in result.stdout
    assert _load_dir(out)["b.weight"].dtype == torch.bfloat16


def test_consolidate_max_shard_size_splits(ckpt: str, tmp_path: Path) -> None:
    result = invoke("consolidate", ckpt, str(tmp_path / "split"), "--max-shard-size", "100",
                    "--json")
    assert result.exit_code == 0, result.output
    assert len([f for f in json.loads(result.stdout)["files"] if f.endswith(".safetensors")]) > 1


def test_consolidate_usage_errors(ckpt: str, tmp_path: Path) -> None:
    result = invoke("consolidate", ckpt, str(tmp_path / "o"), "--max-shard-size", "5XB")
    assert result.exit_code == 2 and "invalid size" in result.stderr
    result = invoke("consolidate", ckpt, str(tmp_path / "o"), "--dtype", "int8")
    assert result.exit_code == 2


# ----- errors, help, entry point ---------------------------------------------------------------


def test_unexpected_error_is_one_line_with_hint(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(zero_ckpt, "verify", boom)
    result = invoke("verify", ckpt)
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: unexpected RuntimeError: boom (set ZERO_CKPT_DEBUG=1 to see the traceback)"
    )
    result = CliRunner().invoke(cli, ["verify", ckpt], env={"ZERO_CKPT_DEBUG": "1"})
    assert isinstance(result.exception, RuntimeError)  # let through for the traceback


def test_checkpoint_error_message_is_one_line(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise zero_ckpt.errors.CorruptShardError("shards/x: bad\n  size")

    monkeypatch.setattr(zero_ckpt, "verify", fail)
    assert assert_error(invoke("verify", ckpt)) == "error: shards/x: bad size"


@pytest.mark.parametrize("command", ["inspect", "verify", "reshard", "consolidate"])
def test_help_has_examples(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and f"zero-ckpt {command} " in result.stdout


def test_cli_import_does_not_load_torch() -> None:
    code = "import sys, cli.main; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


# ----- helpers ---------------------------------------------------------------------------------


def test_parse_storage_options() -> None:
    got = parse_storage_options(["anon=true", "n=3", "s=abc", "url=http://h:9000", "j={\"a\": 1}"])
    assert got == {"anon": True, "n": 3, "s": "abc", "url": "http://h:9000", "j": {"a": 1}}
    for bad in ("novalue", "=x"):
        with pytest.raises(click.BadParameter):
            parse_storage_options([bad])


def test_progress_bar() -> None:
    with progress_bar("x", quiet=True, force=True) as cb:
        assert cb is None
    with progress_bar("x", quiet=False, file=io.StringIO()) as cb:
        assert cb is None  # not a terminal
    stream = io.StringIO()
    with progress_bar("copy", quiet=False, force=True, file=stream) as cb:
        assert cb is not None
        cb(0, 2000)
        cb(1500, 2000)
        cb(2000, 2000)
    assert "copy" in stream.getvalue() and "2.00k" in stream.getvalue()


@pytest.mark.parametrize(
    "text, expected",
    [("5GB", 5 * 10**9), ("5GiB", 5 * 2**30), ("1000", 1000), ("512 MiB", 512 * 2**20),
     ("1.5kb", 1500), ("7", 7), (12, 12), ("3KiB", 3072), ("2MB", 2 * 10**6), ("1B", 1)],
)
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1", "0", "1.0001KB", "1e9", True])
def test_parse_size_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 999, 1000, 1234567, 5 * 10**9)] == [
        "0 B", "999 B", "1.00 KB", "1.23 MB", "5.00 GB"]


def test_summary_fragments_cover_every_param(ckpt: str) -> None:
    with zero_ckpt.open_checkpoint(ckpt) as reader:
        manifest = reader.manifest
    listing = param_listing(manifest)
    assert [p["name"] for p in listing] == [n for g in SHAPES for n in g]
    for p in listing:
        cursor = 0
        for f in p["fragments"]:
            assert f["start"] == cursor < f["end"]
            cursor = f["end"]
        assert cursor == p["numel"]
    summary = summarize(manifest, path=ckpt)
    assert [g["empty_ranks"] for g in summary["groups"]] == [0, 2]
    assert [g["padding"] for g in summary["groups"]] == [15, 10]
    assert json.loads(json.dumps(summary)) == summary
