"""Bad process environments and misleading reports (issue 10, part C).

- torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) never turn a
  command into a part of a split job: it runs whole, exits 0, writes the full output; only
  ``--part I/N`` or ``--distributed`` split it, and ``--distributed`` without its environment
  or with a peer that never comes fails with a clear error, before anything is written;
- ``list`` of a missing path or a file is an error; DeepSpeed run folders list their tags;
  consolidated (HF) and other folders are shown as not checkpoints, never INCOMPLETE;
- ``verify`` of a DeepSpeed folder says how many bytes it read and against what;
- with ``--json`` every command's errors are one JSON document on stdout.

The torchrun cases run the CLI in a subprocess, as rank 0 of a job calling ``zero-ckpt`` would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from zero_ckpt.parts import SplitJobError, join_timeout_s
from zero_ckpt.runs import apply_retention, scan_run

ROOT = Path(__file__).resolve().parents[1]
DP8 = str(ROOT / "fixtures" / "dp8")  # a format-v1 checkpoint at world size 8
DS_RUN = ROOT / "fixtures" / "deepspeed" / "z2_fp32_dp2" / "ckpt"  # latest -> global_step3, 2 ranks
DS_TAG = "global_step3"
TO = 3
SHARD = "20KB"  # several consolidated files, so a part writes a strict subset

pytestmark = pytest.mark.skipif(not DS_RUN.is_dir(), reason="fixtures/deepspeed is missing")

# Everything torchrun (or torchelastic) sets; the tests set exactly what they mean.
_LAUNCHER_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
)


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith("ZERO_CKPT_")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["ZERO_CKPT_FSYNC"] = "0"
    env.update(extra)
    return env


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``zero-ckpt ARGS`` in a fresh process with exactly the launcher variables given."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=_env(env),
        capture_output=True, text=True, timeout=180,
    )


def _cli(*args: str, **env: str):
    """``zero-ckpt ARGS`` in this process with exactly the launcher variables given."""
    result = CliRunner().invoke(cli, list(args), env={**{k: None for k in _LAUNCHER_VARS}, **env})
    assert "Traceback" not in result.output
    return result


def dir_bytes(path: str | Path) -> dict[str, bytes]:
    root = Path(path)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _job_args(kind: str, dst: str) -> list[str]:
    if kind == "reshard":
        return ["reshard", DP8, dst, "--to", str(TO), "-q"]
    return ["consolidate", DP8, dst, "--max-shard-size", SHARD, "-q"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """What the unsplit jobs write, run in this process without any launcher variable."""
    base = tmp_path_factory.mktemp("reference")
    out = {}
    for kind in ("reshard", "consolidate"):
        dst = str(base / kind)
        result = _cli(*_job_args(kind, dst))
        assert result.exit_code == 0, result.output
        out[kind] = dir_bytes(dst)
    assert len([n for n in out["consolidate"] if n.endswith(".safetensors")]) >= 2
    return out


# ----- torchrun's variables alone change nothing ----------------------------------------------------


@pytest.mark.parametrize("kind", ["reshard", "consolidate"])
@pytest.mark.parametrize("with_master", [False, True], ids=["no-master-addr", "master-addr"])
def test_torchrun_env_runs_the_whole_job(kind, with_master, reference, tmp_path):
    """Rank 0 of a torchrun job calling the CLI as a subprocess: the whole job, exit 0."""
    dst = str(tmp_path / "out")
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    if with_master:
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    args = _job_args(kind, dst)
    proc = _run(*args[:-1], **env)  # not quiet: the note about --distributed is shown
    assert proc.returncode == 0, proc.stderr
    verb = "resharded" if kind == "reshard" else "consolidated"
    assert proc.stdout.startswith(f"{verb} {DP8} -> {dst}: "), proc.stdout
    assert "part" not in proc.stdout and "waiting" not in proc.stdout
    assert "pass --distributed to split it across the torchrun ranks" in proc.stderr
    assert dir_bytes(dst) == reference[kind]  # full output, no _parts/


def test_torchrun_env_rank_1_json_is_the_whole_job(reference, tmp_path):
    dst = str(tmp_path / "out")
    proc = _run(*_job_args("reshard", dst), "--json", RANK="1", WORLD_SIZE="2", LOCAL_RANK="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["world_size"] == TO and doc["shard_count"] == TO and "part" not in doc
    assert proc.stderr == ""  # -q: not even the note
    assert dir_bytes(dst) == reference["reshard"]


# ----- --distributed: only when asked, and never half a job -----------------------------------------


@pytest.mark.parametrize("kind", ["reshard", "consolidate"])
def test_distributed_without_torchrun_env_is_refused_before_any_write(kind, tmp_path):
    dst = tmp_path / "out"
    proc = _cli(*_job_args(kind, str(dst)), "--distributed")
    assert proc.exit_code == 1
    assert proc.stderr.strip().splitlines() == [
        "error: a distributed job needs torchrun's environment, but RANK, WORLD_SIZE, "
        "MASTER_ADDR, MASTER_PORT are not set; launch it with `torchrun --nproc-per-node N "
        "zero-ckpt ... --distributed` (every rank runs the same command), or pass --part I/N "
        "to run one part without a process group"
    ]
    assert proc.stdout == "" and not dst.exists()


def test_distributed_without_master_addr_names_what_is_missing(tmp_path):
    dst = tmp_path / "out"
    proc = _cli(*_job_args("reshard", str(dst)), "--distributed", RANK="0", WORLD_SIZE="2",
                LOCAL_RANK="0")
    assert proc.exit_code == 1
    assert "but MASTER_ADDR, MASTER_PORT are not set" in proc.stderr
    assert not dst.exists()


def test_distributed_error_as_json(tmp_path):
    dst = tmp_path / "out"
    proc = _cli(*_job_args("consolidate", str(dst)), "--distributed", "--json", RANK="1",
                WORLD_SIZE="2")
    assert proc.exit_code == 1 and proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert doc["kind"] == "SplitJobError" and "MASTER_ADDR, MASTER_PORT are not set" in doc["error"]
    assert not dst.exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_distributed_peer_that_never_comes_fails_in_bounded_time(rank, tmp_path):
    """A rank whose peer never starts gives up after the join timeout, says which part it is
    and what to do, and writes nothing (never a 24 h wait, never exit 0)."""
    dst = tmp_path / "out"
    start = time.monotonic()
    proc = _run(*_job_args("reshard", str(dst)), "--distributed", RANK=str(rank), WORLD_SIZE="2",
                LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                ZERO_CKPT_PART_JOIN_TIMEOUT_S="2")
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, proc.stderr
    assert f"part {rank}/2 of the distributed job" in error[0] and "within 2 s" in error[0]
    assert "nothing was written" in error[0] and "torchrun --nproc-per-node 2" in error[0]
    assert elapsed < 90 and not dst.exists()


def test_join_timeout_is_bounded_by_default():
    assert join_timeout_s({}) == 300  # not the 24 h of the work timeout
    assert join_timeout_s({"ZERO_CKPT_PART_JOIN_TIMEOUT_S": "7"}) == 7
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SplitJobError, match="ZERO_CKPT_PART_JOIN_TIMEOUT_S"):
            join_timeout_s({"ZERO_CKPT_PART_JOIN_TIMEOUT_S": bad})


def test_part_and_distributed_exclude_each_other(tmp_path):
    for order in (["--part", "0/2", "--distributed"], ["--distributed", "--part", "0/2"]):
        result = _cli(*_job_args("reshard", str(tmp_path / "out")), *order)
        assert result.exit_code == 2
        assert "--part and --distributed exclude each other" in result.output
    assert not (tmp_path / "out").exists()


# ----- --part I/N alone: an incomplete output that says so ---------------------------------------------


@pytest.mark.parametrize("kind", ["reshard", "consolidate"])
def test_first_part_alone_leaves_an_incomplete_output_and_says_so(kind, reference, tmp_path):
    dst = str(tmp_path / "out")
    proc = _run(*_job_args(kind, dst), "--part", "0/2", RANK="0", WORLD_SIZE="2")
    assert proc.returncode == 0, proc.stderr  # the part did its share; it claims nothing more
    assert f"part 0/2 of {DP8} -> {dst}" in proc.stdout
    assert proc.stdout.rstrip().endswith(
        f"waiting for parts 1 (the last part to finish commits): {dst} is NOT complete yet"
    )
    assert "complete:" not in proc.stdout and "committed" not in proc.stdout
    names = set(dir_bytes(dst))
    final = set(reference[kind])
    assert any(n.startswith("_parts/") for n in names)  # marks the output unfinished
    assert "manifest.json" not in names and "model.safetensors.index.json" not in names
    assert names & final and not final <= names

    proc = _cli(*_job_args(kind, dst), "--part", "1/2")
    assert proc.exit_code == 0, proc.output
    assert f"this part committed: {dst} is complete" in proc.stdout
    assert dir_bytes(dst) == reference[kind]


def test_first_part_alone_json_says_not_committed(tmp_path):
    dst = str(tmp_path / "out")
    result = _cli(*_job_args("reshard", dst), "--part", "0/2", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["part"], doc["parts"], doc["committed"], doc["waiting_for"]) == (0, 2, False, [1])
    assert doc["outputs"] == [] and "world_size" not in doc
    assert not (Path(dst) / "manifest.json").exists()


# ----- list -----------------------------------------------------------------------------------------------


def test_list_of_a_missing_path_is_an_error(tmp_path):
    missing = str(tmp_path / "nope")
    result = _cli("list", missing)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == (
        f"error: no run directory at {missing}: the path does not exist (check the path and, "
        "for object stores, the bucket and storage options)"
    )


def test_list_of_a_file_is_an_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    result = _cli("list", str(path))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {path} is a file, not a run directory;")


def test_list_of_an_empty_folder_says_no_checkpoints(tmp_path):
    result = _cli("list", str(tmp_path))
    assert result.exit_code == 0 and result.stdout.strip() == f"no checkpoints in {tmp_path}"


def test_list_deepspeed_run_folder(tmp_path):
    run = str(DS_RUN)
    result = _cli("list", run)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no "latest names 'global_step3', which is missing"
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "STEP", "WORLD", "SIZE", "STATUS"]
    assert lines[1].split()[:5] == ["*", DS_TAG, "deepspeed", "3", "2"]
    assert lines[1].endswith("complete")
    assert lines[2] == f"1 checkpoint, 1 complete; * = latest ({DS_TAG})"

    doc = json.loads(_cli("list", run, "--json").stdout)
    (c,) = doc["checkpoints"]
    assert (c["name"], c["kind"], c["step"], c["world_size"], c["complete"], c["is_latest"]) == (
        DS_TAG, "deepspeed", 3, 2, True, True
    )
    assert c["bytes"] == sum(p.stat().st_size for p in (DS_RUN / DS_TAG).iterdir())
    assert doc["latest"] == DS_TAG and doc["others"] == [] and doc["problems"] == []


def test_list_deepspeed_tag_missing_a_rank_is_incomplete(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(DS_RUN, run)
    (run / DS_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (run / DS_TAG / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"")  # rank 1 gap
    listing = scan_run(str(run))
    (c,) = listing.checkpoints
    assert (c.kind, c.status, c.complete, c.world_size) == ("deepspeed", "incomplete", False, 3)
    assert "optim files for ranks [1] are missing" in c.problem and str(run / DS_TAG) in c.problem
    result = _cli("list", str(run))
    assert result.stdout.splitlines()[1].endswith("INCOMPLETE")
    assert f"names '{DS_TAG}', which is not complete" in result.stderr


def test_list_of_a_deepspeed_tag_folder_points_to_its_parent():
    result = _cli("list", str(DS_RUN / DS_TAG))
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {DS_RUN / DS_TAG} is a DeepSpeed checkpoint (tag folder), not a run directory "
        "of checkpoints; list its parent directory, or use `zero-ckpt inspect` on it"
    )


@pytest.fixture()
def mixed_run(tmp_path) -> Path:
    """A run directory mixing kinds: a format-v1 checkpoint, a DeepSpeed tag, consolidated
    weights, a plain folder; latest names the DeepSpeed tag."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(DP8, run / "step-100")
    shutil.copytree(DS_RUN / DS_TAG, run / DS_TAG)
    result = _cli("consolidate", DP8, str(run / "hf-100"), "-q")
    assert result.exit_code == 0, result.output
    (run / "hf-100" / "config.json").write_text("{}")
    (run / "notes").mkdir()
    (run / "notes" / "todo.txt").write_text("not a checkpoint")
    (run / "latest").write_text(DS_TAG)
    return run


def test_list_hf_folder_is_not_an_incomplete_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = _cli("consolidate", DP8, str(run / "hf-100"), "-q")  # model.safetensors only
    assert result.exit_code == 0, result.output
    result = _cli("list", str(run))
    assert result.exit_code == 0, result.output
    assert "INCOMPLETE" not in result.stdout
    row = result.stdout.splitlines()[1]
    assert row.split()[:3] == ["hf-100", "hf", "weights"] and row.endswith("not a checkpoint")
    assert result.stdout.splitlines()[2] == "0 checkpoints, 0 complete; 1 other folder (not checkpoints)"


def test_list_mixed_kinds(mixed_run):
    result = _cli("list", str(mixed_run))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["NAME", "KIND", "STEP", "WORLD", "SIZE", "STATUS"]
    assert rows[1][:5] == ["*", DS_TAG, "deepspeed", "3", "2"] and rows[1][-1] == "complete"
    assert rows[2][:4] == ["step-100", "zero-ckpt", "120", "8"] and rows[2][-1] == "complete"
    assert rows[3][:3] == ["hf-100", "hf", "weights"] and rows[3][-3:] == ["not", "a", "checkpoint"]
    assert rows[4][:2] == ["notes", "folder"] and rows[4][-3:] == ["not", "a", "checkpoint"]
    assert result.stdout.splitlines()[5] == (
        f"2 checkpoints, 2 complete; * = latest ({DS_TAG}); 2 other folders (not checkpoints)"
    )
    doc = json.loads(_cli("list", str(mixed_run), "--json").stdout)
    assert [(c["name"], c["kind"]) for c in doc["checkpoints"]] == [
        (DS_TAG, "deepspeed"), ("step-100", "zero-ckpt")
    ]
    assert [(c["name"], c["kind"], c["status"]) for c in doc["others"]] == [
        ("hf-100", "hf", "not-a-checkpoint"), ("notes", "folder", "not-a-checkpoint")
    ]


def test_retention_in_a_mixed_run_directory_removes_only_zero_ckpt_checkpoints(mixed_run):
    shutil.copytree(DP8, mixed_run / "step-50")
    manifest = json.loads((mixed_run / "step-50" / "manifest.json").read_text())
    assert manifest  # a complete format-v1 checkpoint, older by name and same step
    before = {p.name for p in mixed_run.iterdir()}
    removed = apply_retention(str(mixed_run), keep_last=1)
    assert len(removed) == 1 and removed[0] in ("step-50", "step-100")
    after = {p.name for p in mixed_run.iterdir() if any(p.rglob("*")) or p.is_file()}
    assert after == before - set(removed)  # the DeepSpeed tag, HF and other folders stay
    assert (mixed_run / DS_TAG / "mp_rank_00_model_states.pt").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{run}"],
        ["verify", "{run}"],
        ["list", "{run}"],
        ["reshard", "{run}", "{out}", "--to", "2"],
        ["consolidate", "{run}", "{out}"],
        ["convert", "{run}", "{out}", "--to", "2"],
    ],
    ids=lambda a: a[0],
)
def test_mixed_kinds_never_give_unexpected_errors(args, mixed_run, tmp_path):
    """Any exception reaching the CLI that is not a CheckpointError is a bug: whatever the
    mix, each command succeeds or names a file in a one-line error."""
    argv = [a.format(run=mixed_run, out=tmp_path / "out") for a in args]
    for latest in (DS_TAG, "step-100", None):
        if latest is None:
            (mixed_run / "latest").unlink()
        else:
            (mixed_run / "latest").write_text(latest + "\n")
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        result = _cli(*argv)
        assert "unexpected" not in result.output, result.output
        assert result.exit_code in (0, 1), result.output
        if result.exit_code == 1:
            errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
            if argv[0] == "verify":
                assert "FAILED" in result.stderr and str(mixed_run) in result.stdout
            else:
                assert len(errors) == 1 and str(mixed_run) in errors[0], result.stderr


# ----- verify of DeepSpeed folders ---------------------------------------------------------------------


def test_verify_deepspeed_reports_bytes_read_and_the_check():
    total = sum(p.stat().st_size for p in (DS_RUN / DS_TAG).iterdir())
    result = _cli("verify", str(DS_RUN))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        f"OK: 3 files, {total} bytes read and verified against their zip CRC-32s (DeepSpeed "
        "checkpoint: structure and sizes cross-checked; DeepSpeed records no checksums of its own)"
    )
    assert "0 bytes" not in result.stdout
    doc = json.loads(_cli("verify", str(DS_RUN), "--json").stdout)
    assert (doc["ok"], doc["format"], doc["method"]) == (True, "deepspeed", "zip-crc32")
    assert (doc["files_checked"], doc["bytes_checked"]) == (3, total)


def test_verify_deepspeed_finds_a_flipped_byte(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(DS_RUN, run)
    path = run / DS_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/2"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 5] ^= 0x01  # inside the tensor bytes: the structure still parses
    path.write_bytes(bytes(data))
    result = _cli("verify", str(run))
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == (
        f"{path}: zip record {info.filename} fails its CRC-32 check: the data is corrupted "
        "(restore this file from a good copy)"
    )
    assert result.stderr.strip() == f"FAILED: 1 problem in {run}"


def test_verify_run_directory_of_format_v1_checkpoints(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(DP8, run / "step-100")
    (run / "latest").write_text("step-100\n")
    result = _cli("verify", str(run))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"note: {run} is a run directory: verified {run}/step-100, which its latest file names"
    assert lines[1].startswith("OK: 9 files, ") and lines[1].endswith(" bytes verified")


# ----- --json errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kind",
    [
        (["inspect", "{missing}"], "IncompleteCheckpointError"),
        (["list", "{missing}"], "RunDirectoryError"),
        (["verify", "{missing}"], "VerifyFailed"),
        (["reshard", "{missing}", "{out}", "--to", "2"], None),
        (["consolidate", "{missing}", "{out}"], None),
        (["convert", "{missing}", "{out}", "--to", "2"], None),
    ],
    ids=lambda a: a[0] if isinstance(a, list) else "",
)
def test_json_errors_are_json_on_stdout(args, kind, tmp_path):
    missing = str(tmp_path / "missing")
    argv = [a.format(missing=missing, out=tmp_path / "out") for a in args] + ["--json"]
    result = _cli(*argv)
    assert result.exit_code == 1, result.output
    assert "error:" not in result.stderr  # no plain-text error line
    doc = json.loads(result.stdout)
    assert isinstance(doc["error"], str) and missing in doc["error"]
    assert isinstance(doc["kind"], str) and doc["kind"]
    if kind is not None:
        assert doc["kind"] == kind
    assert not (tmp_path / "out").exists()


def test_json_usage_error_is_json_too(tmp_path):
    result = _cli("reshard", DP8, str(tmp_path / "out"), "--json")  # no --to
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": "Missing option '--to'.", "kind": "UsageError"}
    # refused while parsing, before click reached --json: still JSON
    result = _cli("reshard", DP8, str(tmp_path / "out"), "--to", "2", "--part", "2/2", "--json")
    assert result.exit_code == 2 and result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["kind"] == "BadParameter" and "part '2/2' is not of the form I/N" in doc["error"]
    assert not (tmp_path / "out").exists()


# ----- list on S3: pending multipart uploads ---------------------------------------------------------


def test_list_s3_reports_pending_multipart_uploads(s3_bucket):
    bucket, opts = s3_bucket
    run = f"{bucket}/run"
    options = [arg for key, value in opts.items() for arg in ("-o", f"{key}={json.dumps(value)}")]
    result = _cli("reshard", DP8, f"{run}/step-1", "--to", "2", "-q", *options)
    assert result.exit_code == 0, result.output
    result = _cli("list", run, "--json", *options)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pending_uploads"] == []
    from zero_ckpt.storage import open_location

    mb = 1 << 20
    with open_location(f"{run}/step-2", opts) as loc:  # a save killed mid-upload
        writer = loc.writer("shards/a.bin", 12 * mb, part_bytes=5 * mb)
        writer.write_at(0, b"\x02" * (5 * mb))
        writer._upload._wait_uploads()  # never completed, never aborted
    result = _cli("list", run, *options)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["step-1", "120", "2"]
    assert lines[-1] == (
        f"1 multipart upload left open under {run} (interrupted writes; they cost storage until "
        "aborted): step-2/shards/a.bin"
    )
    doc = json.loads(_cli("list", run, "--json", *options).stdout)
    (pending,) = doc["pending_uploads"]
    assert pending["key"] == "step-2/shards/a.bin" and pending["upload_id"]


# ----- a peer lost after joining ----------------------------------------------------------------------

_CRASHING_RANK = """
import os, sys
import zero_ckpt
import zero_ckpt.parts as parts
if os.environ["RANK"] == "1":
    def crash(*args, **kwargs):
        os._exit(3)  # a rank killed after joining the group, before its part is done
    parts._run_local = crash
try:
    zero_ckpt.reshard_part(sys.argv[1], sys.argv[2], world_size=int(sys.argv[3]), part="distributed")
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(1)
print("ok")
"""


def _two_ranks(argv_of, env: dict[str, str]) -> list[subprocess.Popen]:
    procs = [
        subprocess.Popen(
            argv_of(rank), cwd=ROOT, env=_env(dict(env, RANK=str(rank), LOCAL_RANK=str(rank))),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    try:
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return procs


def test_distributed_peer_lost_after_joining_is_a_clear_error_and_a_rerun_resumes(reference, tmp_path):
    dst = str(tmp_path / "out")
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = _two_ranks(lambda r: [sys.executable, "-c", _CRASHING_RANK, DP8, dst, str(TO)], env)
    out0 = procs[0].stdout.read()
    assert (procs[0].returncode, procs[1].returncode) == (1, 3), out0
    assert out0.startswith(
        "SplitJobError: part 0/2 of the distributed job lost the other ranks while waiting for "
        "their parts ("
    ), out0
    assert f"the job was not committed, so {dst} is incomplete: run all 2 ranks again" in out0
    assert "manifest.json" not in dir_bytes(dst)  # never looks complete

    env["MASTER_PORT"] = str(_free_port())
    procs = _two_ranks(lambda r: [sys.executable, "-m", "cli.main", *_job_args("reshard", dst),
                                  "--distributed", "--json"], env)
    docs = []
    for p in procs:
        assert p.returncode == 0, p.stderr.read()
        docs.append(json.loads(p.stdout.read()))
    assert [d["part"] for d in docs] == [0, 1] and all(d["committed"] for d in docs)
    assert docs[0]["resumed"] is True  # rank 0's finished part was kept
    assert dir_bytes(dst) == reference["reshard"]
