"""Bad input is refused early, bounded and by name; nothing a user owns is damaged (issue 10).

Each case runs the real CLI (a fresh interpreter, with a timeout: a hang fails the test) or the
library on a real checkpoint made damaged or hostile, and asserts the exit code, one line
naming the file, the source bytes unchanged and no committed output. Bombs also assert the
peak memory of the process that met them.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zero_ckpt
from bad_inputs import (
    BOMBS,
    REPO,
    baseline_rss_kb,
    build_bomb,
    child_env,
    cli_command,
    huge_latest,
    run_measured,
)
from helpers_ckpt import dir_bytes, write_standard
from zero_core.layout import MAX_WORLD_SIZE, check_world_size
from zero_ckpt.errors import (
    CheckpointError,
    CorruptShardError,
    KnobError,
    LayoutMismatchError,
    ManifestError,
    NotRegularFileError,
)
from zero_ckpt.manifest import MAX_JSON_DEPTH, Manifest
from zero_ckpt.storage import list_pending_uploads, open_location, read_capped

N = 4
SHARD = "shards/rank-00001-of-00004.safetensors"
MB = 1 << 20


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "ck"
    write_standard(path, N)
    return path


@pytest.fixture
def src(pristine: Path, tmp_path: Path) -> Path:
    path = tmp_path / "src"
    shutil.copytree(pristine, path)
    return path


@pytest.fixture(scope="module")
def baseline_kb() -> int:
    return baseline_rss_kb()


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args), capture_output=True, text=True, timeout=timeout,
        env=child_env(env), cwd=str(REPO),
    )


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1 and exactly one ``error: ...`` line containing every needle (no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: ") and "unexpected" not in line, line
    for needle in needles:
        assert needle in line, line
    return line


def no_output(dst: Path) -> bool:
    """Nothing committed at ``dst``: no manifest and no file (empty folders may remain)."""
    return not dst.exists() or not [p for p in dst.rglob("*") if p.is_file()]


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def edit_manifest(ckpt: Path, fn) -> None:
    """A deliberate edit: the manifest's own checksum goes with it."""
    path = ckpt / "manifest.json"
    doc = json.loads(path.read_text())
    doc.pop("manifest_checksum")
    fn(doc)
    path.write_text(json.dumps(doc, indent=1))


# ----- non-regular files: refused promptly, never blocking ----------------------------------------


def _make_fifo(path: Path) -> str:
    path.unlink()
    os.mkfifo(path)
    return "FIFO"


def _make_dir(path: Path) -> str:
    path.unlink()
    path.mkdir()
    return "directory"


def _make_dev_zero(path: Path) -> str:
    path.unlink()
    path.symlink_to("/dev/zero")
    return "character device"


NON_REGULAR = [
    ("manifest.json", _make_fifo, ("inspect",)),
    ("manifest.json", _make_fifo, ("reshard", "{dst}", "--to", "2")),
    ("manifest.json", _make_dev_zero, ("inspect",)),
    (SHARD, _make_fifo, ("reshard", "{dst}", "--to", "2")),
    (SHARD, _make_fifo, ("consolidate", "{dst}")),
    (SHARD, _make_dir, ("reshard", "{dst}", "--to", "2")),
    (SHARD, _make_dev_zero, ("reshard", "{dst}", "--to", "3")),
    ("model.safetensors", _make_fifo, ("reshard", "{dst}", "--to", "2")),
    ("model.safetensors", _make_dev_zero, ("consolidate", "{dst}")),
]


@pytest.mark.parametrize(
    "rel,make,cmd", NON_REGULAR,
    ids=[f"{r.split('/')[-1]}-{m.__name__[6:]}-{c[0]}" for r, m, c in NON_REGULAR],
)
def test_non_regular_file_is_refused_promptly(src: Path, tmp_path: Path, rel: str, make, cmd) -> None:
    kind = make(src / rel)
    before = sorted(str(p) for p in src.rglob("*"))
    dst = tmp_path / "dst"
    args = [cmd[0], str(src), *(a.format(dst=dst) for a in cmd[1:])]
    start = time.monotonic()
    proc = cli(*args, timeout=60)
    assert time.monotonic() - start < 60
    assert_refused(proc, str(src / rel), kind, "not a regular file")
    assert sorted(str(p) for p in src.rglob("*")) == before
    assert no_output(dst)


def test_verify_reports_a_fifo_shard_without_blocking(src: Path) -> None:
    _make_fifo(src / SHARD)
    proc = cli("verify", str(src), timeout=60)
    assert proc.returncode == 1
    assert f"{src / SHARD}" in proc.stdout + proc.stderr
    assert "FIFO" in proc.stdout + proc.stderr


def test_library_refuses_non_regular_files(src: Path) -> None:
    _make_fifo(src / SHARD)
    with open_location(str(src)) as loc:
        with pytest.raises(NotRegularFileError, match="FIFO"):
            loc.size(SHARD)
        with pytest.raises(NotRegularFileError, match="FIFO"):
            loc.read_range(SHARD, 0, 8)
        with pytest.raises(NotRegularFileError, match="FIFO"):
            loc.read_bytes(SHARD)


# ----- world sizes --------------------------------------------------------------------------------


def test_max_world_size_is_documented_and_at_least_65536() -> None:
    assert MAX_WORLD_SIZE >= 65_536
    assert check_world_size(MAX_WORLD_SIZE) == MAX_WORLD_SIZE
    with pytest.raises(ValueError, match=str(MAX_WORLD_SIZE)):
        check_world_size(MAX_WORLD_SIZE + 1)


@pytest.mark.parametrize("to", [str(MAX_WORLD_SIZE + 1), "1000000000", str(2**63)])
def test_cli_refuses_a_huge_target_at_once(src: Path, tmp_path: Path, to: str) -> None:
    start = time.monotonic()
    proc = cli("reshard", str(src), str(tmp_path / "dst"), "--to", to, timeout=60)
    assert time.monotonic() - start < 30
    assert_refused(proc, to, str(MAX_WORLD_SIZE))
    assert no_output(tmp_path / "dst")


@pytest.mark.parametrize("to", ["0", "-1"])
def test_cli_refuses_a_target_below_one(src: Path, tmp_path: Path, to: str) -> None:
    proc = cli("reshard", str(src), str(tmp_path / "dst"), "--to", to)
    assert proc.returncode in (1, 2)  # click's usage error, or ours
    assert "Traceback" not in proc.stderr and to in proc.stderr
    assert no_output(tmp_path / "dst")


@pytest.mark.parametrize("ws", [0, -1, MAX_WORLD_SIZE + 1, 2**63])
def test_library_reshard_refuses_world_size(src: Path, tmp_path: Path, ws: int) -> None:
    start = time.monotonic()
    with pytest.raises(LayoutMismatchError):
        zero_ckpt.reshard(str(src), str(tmp_path / "dst"), world_size=ws)
    assert time.monotonic() - start < 10
    assert no_output(tmp_path / "dst")


def test_manifest_world_size_above_the_maximum_is_refused(src: Path) -> None:
    edit_manifest(src, lambda d: d.update(world_size=MAX_WORLD_SIZE + 1))
    with pytest.raises(ManifestError, match=str(MAX_WORLD_SIZE)):
        zero_ckpt.open_checkpoint(str(src))


def test_convert_deepspeed_refuses_a_huge_target(tmp_path: Path) -> None:
    ds = REPO / "fixtures" / "deepspeed" / "z2_fp32_dp2" / "ckpt"
    start = time.monotonic()
    with pytest.raises(LayoutMismatchError, match=str(MAX_WORLD_SIZE)):
        zero_ckpt.convert(str(ds), str(tmp_path / "dst"), world_size=10**9)
    assert time.monotonic() - start < 30
    assert no_output(tmp_path / "dst")


# ----- manifest.json: its own checksum ------------------------------------------------------------


@pytest.mark.parametrize("where", range(20))
def test_flipped_byte_in_manifest_is_refused(src: Path, where: int) -> None:
    path = src / "manifest.json"
    size = path.stat().st_size
    offset = min(size - 1, where * size // 20 + 3)
    flip(path, offset, bit=where % 8)
    with pytest.raises(CheckpointError) as info:
        zero_ckpt.open_checkpoint(str(src))
    assert "manifest.json" in str(info.value)


def test_every_single_bit_flip_of_a_manifest_is_refused(pristine: Path) -> None:
    data = (pristine / "manifest.json").read_bytes()
    accepted = []
    for offset in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << bit
            try:
                Manifest.from_json(bytes(damaged), "manifest.json").validate()
            except CheckpointError:
                continue
            accepted.append((offset, bit))
    assert accepted == []


def test_flipped_manifest_through_the_cli(src: Path, tmp_path: Path) -> None:
    text = (src / "manifest.json").read_bytes()
    flip(src / "manifest.json", text.index(b'"enc.w"') + 2, bit=5)  # renames a param
    before = dir_bytes(src)
    proc = cli("reshard", str(src), str(tmp_path / "dst"), "--to", "2")
    assert_refused(proc, str(src / "manifest.json"), "checksum mismatch")
    assert dir_bytes(src) == before and no_output(tmp_path / "dst")


def test_manifests_without_a_checksum_still_load(tmp_path: Path) -> None:
    fixture = REPO / "fixtures" / "dp8"
    assert b"manifest_checksum" not in (fixture / "manifest.json").read_bytes()
    assert zero_ckpt.verify(str(fixture)).ok


def test_reformatted_manifest_loads_edited_one_is_refused(src: Path) -> None:
    path = src / "manifest.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(doc))  # same content, other spacing
    assert zero_ckpt.verify(str(src)).ok
    doc["groups"][0]["hyperparams"]["lr"] = 1.0
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="edited it on purpose, delete its 'manifest_checksum'"):
        zero_ckpt.open_checkpoint(str(src))


def test_every_writer_stores_the_checksum(src: Path, tmp_path: Path) -> None:
    zero_ckpt.reshard(str(src), str(tmp_path / "r"), world_size=3)
    text = (tmp_path / "r" / "manifest.json").read_bytes()
    assert text.endswith(b'"\n}\n') and b'\n "manifest_checksum": "crc32c:' in text
    assert (src / "manifest.json").read_bytes().rstrip().endswith(b'"\n}')


# ----- manifest.json: values and names -------------------------------------------------------------


def _set_lr(value):
    return lambda d: d["groups"][0]["hyperparams"].update(lr=value)


def _rename_param(name):
    return lambda d: d["groups"][0]["params"][0].update(name=name)


BAD_MANIFEST_TEXT = {
    "1e999": (lambda t: t.replace('"lr": 0.001', '"lr": 1e999'), "not finite"),
    "-1e400": (lambda t: t.replace('"lr": 0.001', '"lr": -1e400'), "not finite"),
    "NaN": (lambda t: t.replace('"lr": 0.001', '"lr": NaN'), "NaN is not allowed"),
    "Infinity": (lambda t: t.replace('"lr": 0.001', '"lr": Infinity'), "Infinity is not allowed"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFEST_TEXT))
def test_non_finite_numbers_are_refused(src: Path, case: str) -> None:
    edit_manifest(src, lambda d: None)
    path = src / "manifest.json"
    change, message = BAD_MANIFEST_TEXT[case]
    text = path.read_text()
    assert '"lr": 0.001' in text
    path.write_text(change(text))
    with pytest.raises(ManifestError, match=message):
        zero_ckpt.open_checkpoint(str(src))


@pytest.mark.parametrize(
    "name", ["enc.\x1b[31mw", "enc.\x9bw", "enc.\x7fw", "enc.\x00w", "enc.\nw"],
    ids=["ESC", "CSI-C1", "DEL", "NUL", "newline"],
)
def test_control_characters_in_names_are_refused(src: Path, name: str) -> None:
    edit_manifest(src, _rename_param(name))
    with pytest.raises(ManifestError, match="control character"):
        zero_ckpt.open_checkpoint(str(src))


def test_escape_sequence_in_a_name_through_the_cli(src: Path) -> None:
    edit_manifest(src, _rename_param("enc.\x1b]0;pwned\x07w"))
    line = assert_refused(cli("inspect", str(src)), str(src / "manifest.json"), "control character")
    assert "\x1b" not in line


def test_control_character_in_a_hyperparam_key_is_refused(src: Path) -> None:
    edit_manifest(src, lambda d: d["groups"][0]["hyperparams"].update({"l\x1br": 1.0}))
    with pytest.raises(ManifestError, match="control character"):
        zero_ckpt.open_checkpoint(str(src))


def test_text_with_newlines_is_allowed_in_extra(src: Path) -> None:
    edit_manifest(src, lambda d: d["extra"].update(user={"note": "two\nlines\tand a tab"}))
    with zero_ckpt.open_checkpoint(str(src)) as reader:
        assert reader.manifest.extra["user"]["note"] == "two\nlines\tand a tab"


def test_deep_json_nesting_is_refused_promptly(src: Path) -> None:
    (src / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    before = dir_bytes(src)
    start = time.monotonic()
    assert_refused(cli("inspect", str(src)), str(src / "manifest.json"), f"more than {MAX_JSON_DEPTH} levels")
    assert time.monotonic() - start < 30
    assert dir_bytes(src) == before


def test_nesting_within_the_limit_in_extra_is_fine(src: Path) -> None:
    deep: dict = {}
    node = deep
    for _ in range(20):
        node["x"] = {}
        node = node["x"]
    edit_manifest(src, lambda d: d["extra"].update(user=deep))
    with zero_ckpt.open_checkpoint(str(src)) as reader:
        assert "x" in reader.manifest.extra["user"]


def test_huge_manifest_is_refused_before_it_is_read(src: Path, baseline_kb: int) -> None:
    with open(src / "manifest.json", "r+b") as f:
        f.truncate(300 * MB)  # sparse
    result = run_measured(cli_command("reshard", str(src), str(src.parent / "dst"), "--to", "2"))
    assert result["rc"] == 1 and "manifest.json" in result["stderr"] and "more than" in result["stderr"]
    assert result["rss_kb"] < baseline_kb + 100 * 1024


# ----- model.safetensors and shards: verified as they stream ---------------------------------------


def _damage(path: Path, how: str) -> None:
    """``truncated``: 4 bytes short; ``data``: one bit of the last tensor; ``header``: one
    byte of the JSON header that still parses (the model file: a tensor renamed
    ``running_mean`` -> ``Running_mean``; a shard: ``"F32"`` -> ``"F12"``, an unknown dtype)."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[-4:]
    elif how == "data":
        data[-3] ^= 0x01
    else:
        (n,) = struct.unpack("<Q", data[:8])
        body = bytes(data[8 : 8 + n])
        if b"running_mean" in body:
            data[8 + body.index(b"running_mean")] ^= 0x20
        else:
            data[8 + body.index(b'"F32"') + 2] = ord("1")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["header", "data", "truncated"])
@pytest.mark.parametrize("cmd", ["reshard", "consolidate"])
def test_damaged_model_file_fails_the_job(src: Path, tmp_path: Path, how: str, cmd: str) -> None:
    _damage(src / "model.safetensors", how)
    before = dir_bytes(src)
    dst = tmp_path / "dst"
    args = ("reshard", str(src), str(dst), "--to", "2") if cmd == "reshard" else ("consolidate", str(src), str(dst))
    assert_refused(cli(*args), "model.safetensors")
    assert dir_bytes(src) == before
    assert no_output(dst)


@pytest.mark.parametrize("how", ["header", "data", "truncated"])
def test_damaged_shard_fails_reshard(src: Path, tmp_path: Path, how: str) -> None:
    _damage(src / SHARD, how)
    before = dir_bytes(src)
    assert_refused(cli("reshard", str(src), str(tmp_path / "dst"), "--to", "3"), str(src / SHARD))
    assert dir_bytes(src) == before and no_output(tmp_path / "dst")


def test_shard_with_an_absurd_header_length_is_refused(src: Path, tmp_path: Path) -> None:
    path = src / SHARD
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 0, 90_000_000)  # plausible for safetensors, not for this file
    path.write_bytes(bytes(data))
    assert_refused(cli("reshard", str(src), str(tmp_path / "dst"), "--to", "2"), str(path))
    assert no_output(tmp_path / "dst")


def test_ranged_reads_never_allocate_past_the_end_of_the_file(src: Path) -> None:
    with open_location(str(src)) as loc:
        assert loc.read_range(SHARD, 0, 1 << 40)[:8] == (src / SHARD).read_bytes()[:8]


# ----- bombs in DeepSpeed/torch files --------------------------------------------------------------


@pytest.mark.parametrize("name", list(BOMBS))
def test_pickle_and_zip_bombs_are_refused_within_memory(tmp_path: Path, baseline_kb: int, name: str) -> None:
    root = build_bomb(tmp_path / "ds", name)
    before = dir_bytes(root)
    result = run_measured(cli_command("reshard", str(root), str(tmp_path / "dst"), "--to", "2"))
    lines = result["stderr"].strip().splitlines()
    assert result["rc"] == 1, result
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unexpected" not in lines[0], lines
    assert "mp_rank_00_model_states.pt" in lines[0]
    assert result["rss_kb"] < baseline_kb + 100 * 1024, (result["rss_kb"] - baseline_kb) // 1024
    assert dir_bytes(root) == before and no_output(tmp_path / "dst")


def test_huge_latest_file_is_refused_unread(tmp_path: Path, baseline_kb: int) -> None:
    root = huge_latest(tmp_path / "ds")
    result = run_measured(cli_command("reshard", str(root), str(tmp_path / "dst"), "--to", "2"))
    assert result["rc"] == 1 and f"{root / 'latest'}" in result["stderr"], result
    assert result["rss_kb"] < baseline_kb + 100 * 1024


def test_read_capped_refuses_a_large_file(tmp_path: Path) -> None:
    (tmp_path / "latest").write_bytes(b"x" * 5000)
    with open_location(str(tmp_path)) as loc:
        assert read_capped(loc, "latest", 5000) == b"x" * 5000
        with pytest.raises(CorruptShardError, match="latest is 5000 bytes, more than the 4096"):
            read_capped(loc, "latest", 4096)


def test_bomb_in_a_plain_torch_file_is_refused_before_torch_load(tmp_path: Path) -> None:
    from bad_inputs import pickle_bytearray_call, torch_zip

    folder = tmp_path / "torchsrc"
    folder.mkdir()
    (folder / "optimizer.pt").write_bytes(torch_zip(pickle_bytearray_call()))
    proc = cli("convert", str(folder), str(tmp_path / "dst"), "--from-format", "torch", "--to", "2")
    assert_refused(proc, "optimizer.pt")


# ----- knobs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "var,value",
    [("ZERO_CKPT_CHUNK_BYTES", str(10**15)), ("ZERO_CKPT_WORKERS", "abc"),
     ("ZERO_CKPT_RETRY_MAX_SECONDS", "inf"), ("ZERO_CKPT_OPEN_FILES", "0")],
)
def test_bad_knob_values_are_named(src: Path, tmp_path: Path, var: str, value: str) -> None:
    proc = cli("reshard", str(src), str(tmp_path / "dst"), "--to", "2", env={var: value})
    assert_refused(proc, var)
    assert no_output(tmp_path / "dst")


def test_knob_error_is_a_checkpoint_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from zero_ckpt import knobs

    monkeypatch.setenv("ZERO_CKPT_CHUNK_BYTES", "9" * 5000)
    with pytest.raises(KnobError, match="ZERO_CKPT_CHUNK_BYTES"):
        knobs.chunk_bytes()


# ----- scale: 4096 ranks under ulimit -n 1024 ------------------------------------------------------


_SCALE = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
import zero_ckpt
src, big, back, out = sys.argv[1:5]
zero_ckpt.reshard(src, big, world_size=4096)
report = zero_ckpt.verify(big)
assert report.ok, report.problems[:3]
zero_ckpt.consolidate(big, out)
zero_ckpt.reshard(big, back, world_size=3)
with zero_ckpt.open_checkpoint(big) as reader:
    reader.read("enc.w")
print("ok", report.files_checked)
"""


def test_4096_ranks_under_ulimit_1024(src: Path, tmp_path: Path) -> None:
    paths = [str(tmp_path / n) for n in ("big", "back", "out")]
    proc = subprocess.run(
        [sys.executable, "-c", _SCALE, str(src), *paths], capture_output=True, text=True,
        timeout=300, env=child_env({"ZERO_CKPT_FSYNC": "0"}), cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "4097"]
    assert len(list((tmp_path / "big" / "shards").iterdir())) == 4096
    assert resource.getrlimit(resource.RLIMIT_NOFILE)  # the limit applied to the child only


# ----- S3: no pending multipart uploads left behind ------------------------------------------------


def test_failed_multipart_write_leaves_no_pending_upload(s3_bucket) -> None:
    bucket, opts = s3_bucket
    url = f"{bucket}/job"
    with open_location(url, opts) as loc:
        writer = loc.writer("big.bin", 12 * MB, part_bytes=5 * MB)
        writer.write_at(0, b"\x01" * (5 * MB))  # a full part: the multipart upload starts
        assert [u.key for u in list_pending_uploads(url, opts)] == ["big.bin"]
        writer.abort()
    assert list_pending_uploads(url, opts) == []


def test_abandoned_upload_is_listed_and_can_be_aborted(s3_bucket) -> None:
    from zero_ckpt.storage import abort_pending_uploads

    bucket, opts = s3_bucket
    url = f"{bucket}/job"
    with open_location(url, opts) as loc:
        writer = loc.writer("shards/a.bin", 12 * MB, part_bytes=5 * MB)
        writer.write_at(0, b"\x02" * (5 * MB))
        writer._upload._wait_uploads()  # as a killed process would leave it: never aborted
    pending = list_pending_uploads(url, opts)
    assert [u.key for u in pending] == ["shards/a.bin"] and pending[0].upload_id
    assert list_pending_uploads(f"{bucket}/other", opts) == []
    assert abort_pending_uploads(url, opts) == 1
    assert list_pending_uploads(url, opts) == []


# ----- descriptor pool and planning entry points ---------------------------------------------------


def test_read_descriptors_are_pooled(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZERO_CKPT_OPEN_FILES", "2")
    shards = sorted(p.relative_to(src).as_posix() for p in (src / "shards").iterdir())
    with open_location(str(src)) as loc:
        for rel in shards * 2:
            assert loc.read_range(rel, 0, 8) == (src / rel).read_bytes()[:8]
            assert len(loc._fds) <= 2
        assert len(loc._fds) == 2
    assert loc._fds == {}


def test_planning_refuses_a_huge_world_size_before_allocating(src: Path) -> None:
    from zero_ckpt.formats.registry import open_view
    from zero_ckpt.manifest import check_target_world_size
    from zero_ckpt.plan import plan_reshard
    from zero_ckpt.storage import open_location

    with open_location(str(src)) as loc:
        view = open_view(loc)
    start = time.monotonic()
    with pytest.raises(LayoutMismatchError, match=str(MAX_WORLD_SIZE)):
        plan_reshard(view, 10**12)
    assert time.monotonic() - start < 1
    assert check_target_world_size(MAX_WORLD_SIZE) == MAX_WORLD_SIZE
    with pytest.raises(LayoutMismatchError, match="target world size is 65537"):
        check_target_world_size(MAX_WORLD_SIZE + 1)


def test_huge_target_for_a_checkpoint_without_groups_is_refused(tmp_path: Path) -> None:
    zero_ckpt.write_checkpoint(str(tmp_path / "src"), [], world_size=2)
    start = time.monotonic()
    with pytest.raises(LayoutMismatchError, match=str(MAX_WORLD_SIZE)):
        zero_ckpt.reshard(str(tmp_path / "src"), str(tmp_path / "dst"), world_size=10**9)
    assert time.monotonic() - start < 10
    assert no_output(tmp_path / "dst")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_reshard_to_s3_leaves_no_pending_upload(s3_bucket, tmp_path: Path, interrupt) -> None:
    """An exception in a worker thread (here raised by the progress callback, which workers
    call) fails the job: every multipart upload it started is aborted, nothing is committed."""
    from helpers_ckpt import write_random

    bucket, opts = s3_bucket
    write_random(tmp_path / "src", [[3_000_000]], 1)  # one 36 MB shard: multipart, 8 MiB parts
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if done >= 9 << 20:  # after the first part went up
            raise interrupt("stop")

    with pytest.raises(interrupt):
        zero_ckpt.reshard(str(tmp_path / "src"), f"{bucket}/out", world_size=1, progress=progress,
                          dst_storage_options=opts, workers=1)
    assert list_pending_uploads(f"{bucket}/out", opts) == []
    with open_location(f"{bucket}/out", opts) as loc:
        assert not [f for f in loc.list_files() if f.endswith(".safetensors") or f == "manifest.json"]
