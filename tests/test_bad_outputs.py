"""Destinations that never lose a user's files, sources that are never written, one job per
destination, and interrupted output that says so.

Every case runs the real CLI (click's CliRunner in-process, or ``python -m cli.main`` as a
subprocess where two jobs or a kill are involved) and checks: the exit code, the one-line
``error: ...`` naming the path, every source file's bytes (hashed before and after) and every
foreign file in the destination, unchanged. S3 cases run against the moto server of
``tests/s3server.py`` (the ``s3_bucket`` fixture). Subprocess synchronisation is pipes and
``wait``; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import zero_ckpt
from cli.main import cli
from zero_ckpt.destination import CLAIM_NAME, is_tool_file, read_claim
from zero_ckpt.storage import open_location

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).with_name("_dest_child.py")
DEEPSPEED = ROOT / "fixtures" / "deepspeed" / "z2_fp32_dp2" / "ckpt"
JOB_DEADLINE_S = 120  # a hung subprocess fails the test instead of hanging it

FOREIGN = {
    "config.json": b'{"model_type": "mine"}\n',
    "README.md": b"# my model\n",
    "notes/deep/a.txt": b"nested user folder\n",
    "runs/x/events.log": b"log\n",
}


def _groups(seed: int = 3) -> list[dict[str, dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [{"emb.weight": (16, 8), "lin.weight": (8, 8), "lin.bias": (8,)}, {"head.w": (12,)}]
    return [
        {
            n: {"master": torch.randn(s, generator=gen), "exp_avg": torch.randn(s, generator=gen)}
            for n, s in g.items()
        }
        for g in shapes
    ]


@pytest.fixture(scope="module")
def master_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src") / "ckpt"
    zero_ckpt.write_checkpoint(
        str(root), _groups(), world_size=8, align=2,
        model_state={"buf": torch.arange(4.0)}, scalars=[{"step": 3}, {"step": 3}],
    )
    return root


@pytest.fixture
def src(master_src: Path, tmp_path: Path) -> Path:
    """A private copy per test (a test may place things around it)."""
    dst = tmp_path / "src"
    dst.mkdir()
    for p in master_src.rglob("*"):
        if p.is_file():
            t = dst / p.relative_to(master_src)
            t.parent.mkdir(parents=True, exist_ok=True)
            t.write_bytes(p.read_bytes())
    return dst


# ----- helpers ------------------------------------------------------------------------------------


def hashes(root: Path | str, storage_options: dict | None = None) -> dict[str, str]:
    """sha256 of every file under a local folder or URL (hidden and temporary ones too)."""
    if isinstance(root, Path) or "://" not in str(root):
        root = Path(root)
        if not root.exists():
            return {}
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()
        }
    with open_location(str(root), storage_options) as loc:
        return {rel: hashlib.sha256(loc.read_bytes(rel)).hexdigest() for rel in loc.list_files()}


def put_foreign(root: Path | str, storage_options: dict | None = None, files: dict | None = None) -> None:
    with open_location(str(root), storage_options) as loc:
        for rel, data in (files or FOREIGN).items():
            loc.write_atomic(rel, data)


def foreign_intact(root: Path | str, storage_options: dict | None = None, files: dict | None = None) -> None:
    with open_location(str(root), storage_options) as loc:
        for rel, data in (files or FOREIGN).items():
            assert loc.read_bytes(rel) == data, rel


def invoke(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args], env={"ZERO_CKPT_DEBUG": ""})
    assert "Traceback" not in result.output
    return result


def ok(result) -> None:
    assert result.exit_code == 0, result.output


def error_line(result, *needles: str) -> str:
    """Exit 1, exactly one stderr line ``error: ...`` containing every needle."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def tool_names(root: Path) -> list[str]:
    return sorted(rel for rel in hashes(root) if is_tool_file(rel))


def s3_opts(s3_bucket) -> tuple[str, dict, list[str]]:
    bucket, opts = s3_bucket
    return bucket, opts, ["-o", f"endpoint_url={opts['endpoint_url']}"]


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *[str(a) for a in args]]


def child_cmd(mode: str, n: int, *args: str) -> list[str]:
    return [sys.executable, str(CHILD), mode, str(n), "--", *[str(a) for a in args]]


def popen(cmd: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZERO_CKPT_DEBUG": ""}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZERO_CKPT_DEBUG": ""}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_DEADLINE_S)


def one_error(stderr: str, *needles: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def consolidated(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("model*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


# ----- overwrite keeps foreign files: local disk ----------------------------------------------------


def test_consolidate_into_a_hf_folder_keeps_its_files_without_overwrite(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    put_foreign(out)
    before = hashes(src)
    ok(invoke("consolidate", src, out))
    foreign_intact(out)
    assert hashes(src) == before
    assert sorted(hashes(out)) == sorted([*FOREIGN, "model.safetensors"])


def test_consolidate_overwrite_replaces_only_its_files(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    put_foreign(out)
    ok(invoke("consolidate", src, out))
    before = hashes(src)
    line = error_line(invoke("consolidate", src, out, "--dtype", "bfloat16"), str(out), "model.safetensors", "--overwrite")
    assert "already exists" in line
    ok(invoke("consolidate", src, out, "--overwrite", "--dtype", "bfloat16"))
    foreign_intact(out)
    assert hashes(src) == before
    assert consolidated(out)["lin.weight"].dtype == torch.bfloat16
    assert not (out / CLAIM_NAME).exists()


def test_consolidate_overwrite_removes_stale_shards_of_an_earlier_run(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    put_foreign(out)
    ok(invoke("consolidate", src, out, "--max-shard-size", "200"))
    first = tool_names(out)
    assert "model.safetensors.index.json" in first and len([n for n in first if n.startswith("model-")]) >= 3
    ok(invoke("consolidate", src, out, "--overwrite", "--max-shard-size", "700"))
    second = tool_names(out)
    count = len([n for n in second if n.startswith("model-")])
    assert 1 < count < len([n for n in first if n.startswith("model-")])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in second if n.startswith("model-")}
    foreign_intact(out)
    ok(invoke("consolidate", src, out, "--overwrite"))  # back to one file: no index, no shards
    assert tool_names(out) == ["model.safetensors"]
    foreign_intact(out)


def test_reshard_overwrite_to_fewer_ranks_leaves_no_stale_shard(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    put_foreign(dst)
    before = hashes(src)
    ok(invoke("reshard", src, dst, "--to", "8"))
    assert (dst / "shards" / "rank-00007-of-00008.safetensors").exists()
    error_line(invoke("reshard", src, dst, "--to", "4"), str(dst), "manifest.json", "--overwrite")
    ok(invoke("reshard", src, dst, "--to", "4", "--overwrite"))
    assert sorted(p.name for p in (dst / "shards").iterdir()) == [f"rank-0000{r}-of-00004.safetensors" for r in range(4)]
    assert zero_ckpt.verify(str(dst)).ok
    foreign_intact(dst)
    assert hashes(src) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_reshard_refuses_a_foreign_file_inside_shards(src: Path, tmp_path: Path, overwrite: bool) -> None:
    dst = tmp_path / "dst"
    ok(invoke("reshard", src, dst, "--to", "2"))
    (dst / "shards" / "mine.txt").write_text("user file")
    before, before_dst = hashes(src), hashes(dst)
    args = ["--overwrite"] if overwrite else []
    error_line(invoke("reshard", src, dst, "--to", "3", *args), str(dst / "shards" / "mine.txt"), "not a file zero-ckpt writes")
    assert hashes(src) == before and hashes(dst) == before_dst


def test_convert_overwrite_keeps_foreign_files(tmp_path: Path) -> None:
    if not DEEPSPEED.is_dir():
        pytest.skip("DeepSpeed fixtures are not there")
    dst = tmp_path / "v1"
    put_foreign(dst)
    before = hashes(DEEPSPEED)
    ok(invoke("convert", DEEPSPEED, dst))
    error_line(invoke("convert", DEEPSPEED, dst, "--to", "3"), str(dst), "manifest.json")
    ok(invoke("convert", DEEPSPEED, dst, "--to", "3", "--overwrite"))
    assert zero_ckpt.verify(str(dst)).ok and json.loads((dst / "manifest.json").read_text())["world_size"] == 3
    assert not (dst / "shards" / "rank-00000-of-00002.safetensors").exists()
    foreign_intact(dst)
    assert hashes(DEEPSPEED) == before


def test_consolidate_format_torch_overwrite_keeps_foreign_files(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "torch"
    put_foreign(out)
    before = hashes(src)
    ok(invoke("consolidate", src, out, "--format", "torch"))
    ok(invoke("consolidate", src, out, "--format", "torch", "--overwrite"))
    assert sorted(tool_names(out)) == ["model.safetensors", "optimizer.pt"]
    foreign_intact(out)
    assert hashes(src) == before


def test_hf_config_files_are_the_jobs_own_output(src: Path, tmp_path: Path) -> None:
    hf = tmp_path / "cfg"
    put_foreign(hf, files={"config.json": b'{"model_type": "x", "tie_word_embeddings": false}\n',
                           "tokenizer.json": b"{}\n", "unrelated.bin": b"no"})
    out = tmp_path / "out"
    put_foreign(out, files={"config.json": b"{}\n", "README.md": b"mine\n"})
    before = hashes(src)
    # OUT's own config.json is a file the job writes: replacing it needs --overwrite
    error_line(invoke("consolidate", src, out, "--hf-config-from", hf), str(out), "config.json", "--overwrite")
    ok(invoke("consolidate", src, out, "--hf-config-from", hf, "--overwrite"))
    assert (out / "config.json").read_bytes() == (hf / "config.json").read_bytes()
    assert (out / "tokenizer.json").exists() and not (out / "unrelated.bin").exists()
    foreign_intact(out, files={"README.md": b"mine\n"})
    assert hashes(src) == before


def test_api_save_path_keeps_foreign_files(tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    put_foreign(dst)
    zero_ckpt.write_checkpoint(str(dst), _groups(), world_size=2)
    with pytest.raises(zero_ckpt.DestinationExistsError, match="already exists"):
        zero_ckpt.write_checkpoint(str(dst), _groups(4), world_size=3)
    zero_ckpt.write_checkpoint(str(dst), _groups(4), world_size=3, overwrite=True)
    assert zero_ckpt.verify(str(dst)).ok and not (dst / "shards" / "rank-00001-of-00002.safetensors").exists()
    foreign_intact(dst)


# ----- overwrite keeps foreign files: S3 ---------------------------------------------------------------


def test_s3_consolidate_overwrite_keeps_foreign_keys(src: Path, s3_bucket) -> None:
    bucket, opts, o = s3_opts(s3_bucket)
    out = f"{bucket}/hf"
    put_foreign(out, opts)
    before = hashes(src)
    ok(invoke(*o, "consolidate", src, out, "--max-shard-size", "200"))
    error_line(invoke(*o, "consolidate", src, out), out, "--overwrite")
    ok(invoke(*o, "consolidate", src, out, "--overwrite"))
    foreign_intact(out, opts)
    assert sorted(hashes(out, opts)) == sorted([*FOREIGN, "model.safetensors"])  # stale shards gone
    assert hashes(src) == before


def test_s3_reshard_overwrite_keeps_foreign_keys_and_drops_stale_shards(src: Path, s3_bucket) -> None:
    bucket, opts, o = s3_opts(s3_bucket)
    dst = f"{bucket}/dst"
    put_foreign(dst, opts)
    ok(invoke(*o, "reshard", src, dst, "--to", "8"))
    ok(invoke(*o, "reshard", src, dst, "--to", "4", "--overwrite"))
    names = hashes(dst, opts)
    assert sorted(n for n in names if n.startswith("shards/")) == [
        f"shards/rank-0000{r}-of-00004.safetensors" for r in range(4)
    ]
    assert zero_ckpt.verify(dst, storage_options=opts).ok
    foreign_intact(dst, opts)


def test_s3_reshard_refuses_existing_output_and_a_foreign_key_in_shards(src: Path, s3_bucket) -> None:
    bucket, opts, o = s3_opts(s3_bucket)
    dst = f"{bucket}/dst"
    ok(invoke(*o, "reshard", src, dst, "--to", "2"))
    before = hashes(dst, opts)
    error_line(invoke(*o, "reshard", src, dst, "--to", "3"), dst, "already exists")
    put_foreign(dst, opts, files={"shards/mine.txt": b"x"})
    error_line(invoke(*o, "reshard", src, dst, "--to", "3", "--overwrite"), f"{dst}/shards/mine.txt")
    assert {k: v for k, v in hashes(dst, opts).items() if k != "shards/mine.txt"} == before


# ----- sources are read-only --------------------------------------------------------------------------


@pytest.mark.parametrize("job", ["reshard", "consolidate", "convert"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_destination_inside_the_source_is_refused(src: Path, job: str, overwrite: bool) -> None:
    dst = src / "shards" if job == "consolidate" else src / "out"
    args = {"reshard": ["--to", "3"], "consolidate": [], "convert": ["--from-format", "zero-ckpt"]}[job]
    before = hashes(src)
    error_line(invoke(job, src, dst, *args, *(["--overwrite"] if overwrite else [])), str(dst), "source")
    assert hashes(src) == before


@pytest.mark.parametrize("job", ["reshard", "consolidate", "convert"])
def test_source_inside_the_destination_is_refused(src: Path, job: str) -> None:
    args = {"reshard": ["--to", "3"], "consolidate": [], "convert": ["--from-format", "zero-ckpt"]}[job]
    before = hashes(src)
    error_line(invoke(job, src, src.parent, *args, "--overwrite"), str(src.parent), "source")
    assert hashes(src) == before


@pytest.mark.parametrize("spelling", ["symlink", "dotdot", "file-url", "trailing-dot"])
def test_the_source_spelled_another_way_is_refused(src: Path, tmp_path: Path, spelling: str) -> None:
    if spelling == "symlink":
        os.symlink(src, tmp_path / "alias")
        dst = str(tmp_path / "alias")
    else:
        dst = {"dotdot": f"{src}/../{src.name}", "file-url": f"file://{src}", "trailing-dot": f"{src}/."}[spelling]
    before = hashes(src)
    for args in (["reshard", src, dst, "--to", "3", "--overwrite"], ["consolidate", src, dst, "--overwrite"]):
        error_line(invoke(*args), dst, "source")
    assert hashes(src) == before


def test_a_shard_symlinked_into_the_destination_is_refused(src: Path, tmp_path: Path) -> None:
    # SRC's rank-3 shard really lives in DST: writing DST could change the source
    dst = tmp_path / "dst"
    dst.mkdir()
    shard = src / "shards" / "rank-00003-of-00008.safetensors"
    (dst / "moved.bin").write_bytes(shard.read_bytes())
    shard.unlink()
    os.symlink(dst / "moved.bin", shard)
    before = hashes(src)
    error_line(invoke("reshard", src, dst, "--to", "2", "--overwrite"), str(shard), "this job reads")
    assert hashes(src) == before and (dst / "moved.bin").exists()


def _torch_folder(root: Path) -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    root.mkdir(parents=True, exist_ok=True)
    torch.save(opt.state_dict(), root / "optimizer.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "weights.safetensors"))
    (root / "names.json").write_text(json.dumps(["weight", "bias"]))
    torch.save({"optimizer": opt.state_dict(), "model": model.state_dict()}, root / "train.pt")


def test_convert_of_a_torch_file_into_its_own_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "torchckpt"
    _torch_folder(folder)
    before = hashes(folder)
    for args in ([], ["--overwrite"]):
        error_line(
            invoke("convert", folder / "train.pt", folder, "--from-format", "torch",
                   "--param-names", folder / "names.json", *args),
            str(folder / "train.pt"), "this job reads",
        )
    assert hashes(folder) == before


def test_convert_with_the_model_file_inside_the_destination_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "torchckpt"
    _torch_folder(folder)
    dst = tmp_path / "dst"
    dst.mkdir()
    model = dst / "model.safetensors"  # a name convert writes: --overwrite would replace it
    model.write_bytes((folder / "weights.safetensors").read_bytes())
    before, before_dst = hashes(folder), hashes(dst)
    error_line(
        invoke("convert", folder / "train.pt", dst, "--model", model, "--param-names",
               folder / "names.json", "--overwrite"),
        str(model), "this job reads",
    )
    assert hashes(folder) == before and hashes(dst) == before_dst


def test_convert_with_param_names_inside_the_destination_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "torchckpt"
    _torch_folder(folder)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "names.json").write_text(json.dumps(["weight", "bias"]))
    before, before_dst = hashes(folder), hashes(dst)
    error_line(
        invoke("convert", folder / "train.pt", dst, "--param-names", dst / "names.json", "--overwrite"),
        str(dst / "names.json"), "this job reads",
    )
    assert hashes(folder) == before and hashes(dst) == before_dst


def test_convert_of_a_torch_file_next_to_it_works_and_leaves_it(tmp_path: Path) -> None:
    folder = tmp_path / "torchckpt"
    _torch_folder(folder)
    before = hashes(folder)
    ok(invoke("convert", folder / "train.pt", folder / "v1", "--param-names", folder / "names.json"))
    assert zero_ckpt.verify(str(folder / "v1")).ok
    assert {k: v for k, v in hashes(folder).items() if not k.startswith("v1/")} == before


@pytest.mark.parametrize("where", ["run", "tag"])
def test_deepspeed_destination_inside_the_run_or_tag_is_refused(tmp_path: Path, where: str) -> None:
    if not DEEPSPEED.is_dir():
        pytest.skip("DeepSpeed fixtures are not there")
    run_dir = tmp_path / "run"
    import shutil

    shutil.copytree(DEEPSPEED, run_dir)
    tag = (run_dir / "latest").read_text().strip()
    dst = run_dir / "out" if where == "run" else run_dir / tag / "out"
    before = hashes(run_dir)
    for args in (["convert", run_dir, dst, "--overwrite"], ["reshard", run_dir, dst, "--to", "3", "--overwrite"],
                 ["consolidate", run_dir, dst, "--overwrite"]):
        error_line(invoke(*args), str(dst))
    assert hashes(run_dir) == before


def test_hf_config_folder_inside_the_output_is_refused_but_the_output_itself_is_fine(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    put_foreign(out / "cfg", files={"config.json": b'{"model_type": "x"}\n'})
    before_cfg = hashes(out / "cfg")
    error_line(invoke("consolidate", src, out, "--hf-config-from", out / "cfg"), str(out), "source")
    assert hashes(out / "cfg") == before_cfg
    # the natural habit: config saved into OUT first, then consolidate OUT --hf-config-from OUT
    put_foreign(out, files={"config.json": b'{"model_type": "x"}\n'})
    ok(invoke("consolidate", src, out, "--hf-config-from", out))
    assert (out / "config.json").read_bytes() == b'{"model_type": "x"}\n' and (out / "model.safetensors").exists()


# ----- one job per destination ---------------------------------------------------------------------------


def _start_paused(*args: str) -> subprocess.Popen:
    """A CLI job held after its first committed file; returns once it is there."""
    proc = popen(child_cmd("pause", 1, *args), stdin=subprocess.PIPE)
    line = proc.stdout.readline()
    assert line == b"paused\n", (line, proc.stderr.read() if proc.poll() is not None else b"")
    return proc


def _resume(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(input=b"go\n", timeout=JOB_DEADLINE_S)
    return proc.returncode, err.decode()


@pytest.mark.parametrize("job", ["reshard", "consolidate"])
def test_a_second_job_into_a_claimed_destination_fails_at_once(src: Path, tmp_path: Path, job: str) -> None:
    dst = tmp_path / "dst"
    args = [job, src, dst] + (["--to", "3"] if job == "reshard" else ["--max-shard-size", "200"])
    before = hashes(src)
    first = _start_paused(*args)
    try:
        info = read_claim(open_location(str(dst)))
        assert info is not None and info.live and info.job == job and info.pid == first.pid
        second = run(cli_cmd(*args))  # a second real CLI process
        assert second.returncode == 1
        one_error(second.stderr, str(dst), "being written by another zero-ckpt job", f"pid {first.pid}")
        # a live job is never taken over, not even with --overwrite
        error_line(invoke(*args, "--overwrite"), str(dst), "being written by another zero-ckpt job")
    finally:
        rc, err = _resume(first)
    assert rc == 0, err
    assert not (dst / CLAIM_NAME).exists()
    if job == "reshard":
        assert zero_ckpt.verify(str(dst)).ok
    else:
        assert "model.safetensors.index.json" in hashes(dst)
    assert hashes(src) == before


def test_two_jobs_started_together_exactly_one_succeeds(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    before = hashes(src)
    procs = [popen(cli_cmd("reshard", src, dst, "--to", str(n))) for n in (3, 5)]
    results = [(p.wait(timeout=JOB_DEADLINE_S), p.communicate()[1].decode()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    one_error(loser, str(dst))
    assert re.search(r"being written by another zero-ckpt job|already exists", loser)
    winner = 3 if results[0][0] == 0 else 5
    assert zero_ckpt.verify(str(dst)).ok
    assert json.loads((dst / "manifest.json").read_text())["world_size"] == winner
    assert hashes(src) == before


def test_s3_a_second_job_into_a_claimed_destination_fails_at_once(src: Path, s3_bucket) -> None:
    bucket, opts, o = s3_opts(s3_bucket)
    dst = f"{bucket}/dst"
    put_foreign(dst, opts)
    first = _start_paused(*o, "reshard", src, dst, "--to", "3")
    try:
        second = run(cli_cmd(*o, "reshard", src, dst, "--to", "5"))
        assert second.returncode == 1
        one_error(second.stderr, dst, "being written by another zero-ckpt job")
    finally:
        rc, err = _resume(first)
    assert rc == 0, err
    assert zero_ckpt.verify(dst, storage_options=opts).ok
    assert CLAIM_NAME not in hashes(dst, opts)
    foreign_intact(dst, opts)


# ----- interrupted jobs are recognisable ------------------------------------------------------------------


def test_killed_consolidate_is_marked_incomplete_and_a_rerun_with_overwrite_completes(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    put_foreign(out)
    before = hashes(src)
    killed = run(child_cmd("kill", 2, "consolidate", src, out, "--max-shard-size", "200"))
    assert killed.returncode == -9
    names = set(hashes(out))
    assert CLAIM_NAME in names and "model.safetensors.index.json" not in names
    assert any(n.startswith("model-") for n in names)  # finished shards, no index
    info = read_claim(open_location(str(out)))
    assert info is not None and info.live is False and info.job == "consolidate"
    again = invoke("consolidate", src, out, "--max-shard-size", "200")
    line = error_line(again, str(out / CLAIM_NAME), "interrupted", "incomplete", "--overwrite")
    assert "consolidate" in line
    ok(invoke("consolidate", src, out, "--max-shard-size", "200", "--overwrite"))
    assert CLAIM_NAME not in hashes(out) and read_claim(open_location(str(out))) is None
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(consolidated(out))
    foreign_intact(out)
    assert hashes(src) == before


def test_killed_reshard_is_marked_incomplete_and_refused_by_verify(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    killed = run(child_cmd("kill", 1, "reshard", src, dst, "--to", "3"))
    assert killed.returncode == -9
    assert (dst / CLAIM_NAME).exists() and not (dst / "manifest.json").exists()
    verify = invoke("verify", dst)
    assert verify.exit_code == 1 and f"{dst} has no manifest.json: it is an incomplete checkpoint" in verify.output
    error_line(invoke("reshard", src, dst, "--to", "3"), "interrupted", "reshard")
    ok(invoke("reshard", src, dst, "--to", "3", "--overwrite"))
    assert zero_ckpt.verify(str(dst)).ok and not (dst / CLAIM_NAME).exists()


def test_s3_killed_consolidate_is_marked_incomplete_and_a_rerun_completes(src: Path, s3_bucket) -> None:
    bucket, opts, o = s3_opts(s3_bucket)
    out = f"{bucket}/hf"
    put_foreign(out, opts)
    killed = run(child_cmd("kill", 1, *o, "consolidate", src, out, "--max-shard-size", "200"))
    assert killed.returncode == -9
    names = set(hashes(out, opts))
    assert CLAIM_NAME in names and "model.safetensors.index.json" not in names
    with open_location(out, opts) as loc:
        info = read_claim(loc)
    assert info is not None and info.live is False  # same host, dead pid
    error_line(invoke(*o, "consolidate", src, out, "--max-shard-size", "200"), f"{out}/{CLAIM_NAME}", "interrupted")
    ok(invoke(*o, "consolidate", src, out, "--max-shard-size", "200", "--overwrite"))
    names = set(hashes(out, opts))
    assert CLAIM_NAME not in names and "model.safetensors.index.json" in names
    foreign_intact(out, opts)


def test_a_failed_job_releases_its_claim(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    ok(invoke("reshard", src, dst, "--to", "2"))
    error_line(invoke("reshard", src, dst, "--to", "3"), "already exists")  # refused after claiming
    assert not (dst / CLAIM_NAME).exists()
    ok(invoke("reshard", src, dst, "--to", "3", "--overwrite"))
    assert zero_ckpt.verify(str(dst)).ok


# ----- split jobs keep foreign files too --------------------------------------------------------------------


def test_split_consolidate_overwrite_keeps_foreign_files_and_respects_a_claim(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    put_foreign(out)
    ok(invoke("consolidate", src, out, "--max-shard-size", "300"))
    before = hashes(src)
    for i in range(2):
        ok(invoke("consolidate", src, out, "--max-shard-size", "200", "--part", f"{i}/2", "--overwrite"))
    assert "model.safetensors.index.json" in hashes(out) and not (out / "_parts").exists()
    foreign_intact(out)
    assert hashes(src) == before
    # an unsplit job's marker (here: one that was interrupted) stops a part without --overwrite
    run(child_cmd("kill", 1, "consolidate", src, tmp_path / "k", "--max-shard-size", "200"))
    error_line(invoke("consolidate", src, tmp_path / "k", "--max-shard-size", "200", "--part", "0/2"),
               str(tmp_path / "k" / CLAIM_NAME), "interrupted")


# ----- what counts as zero-ckpt's own file (pure) ------------------------------------------------------------


@pytest.mark.parametrize(
    "rel, ours",
    [
        ("manifest.json", True),
        ("shards/rank-00007-of-00008.safetensors", True),
        ("model.safetensors", True),
        ("model-00003-of-00003.safetensors", True),
        ("model.safetensors.index.json", True),
        ("optimizer-00001-of-00002.safetensors", True),
        ("optimizer.json", True),
        ("_parts/abc/part-00000-of-00002.json", True),
        (".model-00001-of-00002.safetensors.tmp-0123456789ab", True),
        ("global_step5/zero_pp_rank_0_mp_rank_00_optim_states.pt", True),
        (CLAIM_NAME, True),
        ("config.json", False),
        ("README.md", False),
        ("shards/notes.txt", False),
        ("notes/model.safetensors", False),
        ("model-final.safetensors", False),
    ],
)
def test_is_tool_file(rel: str, ours: bool) -> None:
    assert is_tool_file(rel) is ours
