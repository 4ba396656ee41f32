"""Jobs that copy or convert a DeepSpeed checkpoint check its bytes first.

DeepSpeed records no checksums, but ``torch.save`` stores a CRC-32 per zip record: reshard,
convert and consolidate compare every record with it before they write anything, so a
damaged DeepSpeed source never shapes an output (verify already reports it).
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
DS_RUN = ROOT / "fixtures" / "deepspeed" / "z2_fp32_dp2" / "ckpt"  # latest -> global_step3
DS_TAG = "global_step3"


def _flip_record_byte(path: Path, suffix: str) -> str:
    """Flip one byte inside a tensor record's data (the zip structure still parses)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    data = bytearray(path.read_bytes())
    offset = info.header_offset
    name_len = int.from_bytes(data[offset + 26 : offset + 28], "little")
    extra_len = int.from_bytes(data[offset + 28 : offset + 30], "little")
    data[offset + 30 + name_len + extra_len + 5] ^= 0x01
    path.write_bytes(bytes(data))
    return info.filename


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    "job",
    [
        ["reshard", "{src}", "{dst}", "--to", "3"],
        ["reshard", "{src}", "{dst}", "--to", "3", "--format", "deepspeed"],
        ["convert", "{src}", "{dst}"],
        ["consolidate", "{src}", "{dst}", "--dtype", "float32"],
    ],
    ids=["reshard", "reshard-deepspeed", "convert", "consolidate"],
)
@pytest.mark.parametrize("victim", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"])
def test_a_damaged_deepspeed_record_fails_the_job_before_any_write(tmp_path, job, victim):
    src = tmp_path / "run"
    shutil.copytree(DS_RUN, src)
    path = src / DS_TAG / victim
    with zipfile.ZipFile(path) as zf:
        suffix = next(i.filename for i in zf.infolist() if "/data/" in i.filename and i.file_size > 16)
        suffix = suffix.split("/", 1)[1]
    record = _flip_record_byte(path, suffix)
    before = _hashes(src)
    dst = tmp_path / "out"
    args = [a.format(src=src, dst=dst) for a in job]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert line == (
        f"error: {path}: zip record {record} fails its CRC-32 check: the data is corrupted "
        "(restore this file from a good copy)"
    ), line
    assert _hashes(src) == before  # the source is never changed
    assert not dst.exists() or not any(dst.rglob("*.safetensors")) and not (dst / "manifest.json").exists()


def test_an_intact_deepspeed_source_still_converts(tmp_path):
    result = CliRunner().invoke(cli, ["reshard", str(DS_RUN), str(tmp_path / "out"), "--to", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "manifest.json").exists()
