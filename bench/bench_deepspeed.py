"""Benchmark (issue 5): zero-ckpt on a real DeepSpeed ZeRO-2 checkpoint against DeepSpeed's own
tools (``zero_to_fp32.py``, ``ds_to_universal``) and against ``cp -r`` of the bytes each job
must write.

Run by hand (not a test), on a quiet machine:

    .venv/bin/python bench/bench_deepspeed.py                   # ~179M params, DP 4, ~2.9 GB
    .venv/bin/python bench/bench_deepspeed.py --repeats 5 --workdir /tmp/zc-ds-bench
    .venv/bin/python bench/bench_deepspeed.py --quick           # ~1.8M params: smoke run
    .venv/bin/python bench/bench_deepspeed.py --clean           # also delete the cached checkpoint

The checkpoint is generated once and cached in ``--workdir`` (``ds-z2-fp32-dp4-<params>/``):
4 processes under ``.venv-peers/bin/python`` (``--peers-python``; DS_ACCELERATOR=cpu, gloo,
launched like ``fixtures/make_deepspeed_fixtures.py``), a stack of fp32 ``nn.Linear`` layers
(10 x 4183 x 4183 and a 4183 x 1021 head: 179.3M params; the head makes the flat size not a
multiple of 2 * 4), DeepSpeed ZeRO stage 2, fp32, AdamW with ``torch_adam``, one training
step, ``engine.save_checkpoint``. Files: 4 x ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt``
(fp32 master partition + exp_avg + exp_avg_sq: 12 bytes/param over the 4) and
``mp_rank_00_model_states.pt`` (the fp32 module: 4 bytes/param), ~2.9 GB in all.

Then, in the same run, warm page cache (every file of the checkpoint is read once first, as
for the peers' figures in shared/PEERS.md), median of ``--repeats``, jobs alternating:

* floors, ``cp -r`` of the bytes each job must write (then ``sync``):
  - consolidate: ``mp_rank_00_model_states.pt`` (the fp32 module weights: the same tensor
    bytes as an fp32 consolidated output, within the pickle's few KB);
  - reshard: the 4 optim files (format-v1 output: shards hold the same bytes); when
    ``--format deepspeed`` is used, the whole ``global_stepN`` folder (optim + model files);
  - for reference, ``cp -r`` of the whole checkpoint folder.
* ``zero_to_fp32.py`` (``.venv-peers``; ``<ckpt>/zero_to_fp32.py <ckpt> OUT
  --safe_serialization``, without the flag if it fails);
* ``zero-ckpt consolidate <ckpt> OUT --dtype float32``, reading DeepSpeed in place; its output
  is compared with zero_to_fp32's tensor by tensor, bit for bit (``torch.equal``, dtypes,
  shapes, names), and the verdict printed;
* ``python -m deepspeed.checkpoint.ds_to_universal --input_folder <ckpt>/global_stepN
  --output_folder OUT --inject_missing_state`` (4 extract + 2 merge worker processes, its
  defaults);
* ``zero-ckpt reshard <ckpt> OUT --to 8 --format deepspeed`` when ``zero-ckpt reshard --help``
  lists ``--format``; else ``zero-ckpt reshard <ckpt> OUT --to 8`` (format-v1 output), and the
  row says so.

Measurement: each job is one fresh process (a small wrapper in this file, run by the job's
own interpreter, that imports what the job imports, then runs the script / module / CLI
in-process with ``runpy`` or click). "work s" is the job's own run after its imports (like
bench_toolkit); "command s" is the whole process from spawn to exit, as ``time`` would show;
"+ sync s" is a ``sync`` run right after (zero-ckpt fsyncs its files itself; DeepSpeed's
tools do not, and ``cp`` neither). Ratios use work + sync against cp + sync. Peak memory: the
wrapper's VmHWM (/proc/self/status) and, for process trees (ds_to_universal's workers), the
peak of the tree's summed PSS sampled every 0.1 s; "above baseline" subtracts a process of the
same interpreter that only imported torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
DEFAULT_PEERS_PY = os.path.join(ROOT, ".venv-peers", "bin", "python")
WORLD = 4
RESHARD_TO = 8
MiB = 1 << 20

# fp32 Linear widths: 10 x (4183 x 4183 + 4183) + (4183 x 1021 + 1021) = 179.3M params.
FULL_DIMS = [4183] * 11 + [1021]
QUICK_DIMS = [509, 1021, 1019, 253]
SEED = 1234


def n_params(dims: list[int]) -> int:
    return sum(a * b + b for a, b in zip(dims, dims[1:]))


# ===== DeepSpeed ranks (peers venv): generate the checkpoint =================================


def ds_worker(out: str, dims: list[int]) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as dist
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(SEED)
    layers: list = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True}},
        # Buckets well below DeepSpeed's 5e8-element defaults (a 2 GB buffer per rank each).
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "bf16": {"enabled": False},
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(SEED + 17 * rank)
    x = torch.randn(2, dims[0], generator=g)
    y = torch.randn(2, dims[-1], generator=g)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(os.path.dirname(out), "bench-info.json"), "w") as f:
            json.dump({"deepspeed": deepspeed.__version__, "torch": torch.__version__,
                       "optimizer": type(engine.optimizer).__name__}, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(peers_py: str, out: str, dims: list[int], log_dir: str, timeout: float) -> None:
    port = free_port()
    procs, logs = [], []
    try:
        for rank in range(WORLD):
            env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                       LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
            log = open(os.path.join(log_dir, f"generate-rank{rank}.log"), "w")
            logs.append(log)
            cmd = [peers_py, os.path.abspath(__file__), "--ds-worker", out, "--dims", json.dumps(dims)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                time.sleep(3)
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if any(codes):
        raise SystemExit(f"DeepSpeed ranks exited with {codes}; logs in {log_dir}/generate-rank*.log")


# ===== the measuring wrapper (runs under either interpreter; stdlib at the top) ===============


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def measure_entry(spec: dict, result_path: str) -> int:
    import importlib
    import runpy

    res: dict = {"rc": 0}
    try:
        for mod in spec.get("preimport", []):
            importlib.import_module(mod)
        kind, target, argv = spec["kind"], spec.get("target"), spec.get("argv", [])
        t0 = time.perf_counter()
        try:
            if kind == "script":
                sys.argv = [target, *argv]
                runpy.run_path(target, run_name="__main__")
            elif kind == "module":
                sys.argv = [target, *argv]
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            elif kind == "cli":
                from cli.main import cli

                rc = cli.main(args=argv, prog_name="zero-ckpt", standalone_mode=False)
                res["rc"] = rc if isinstance(rc, int) else 0
            elif kind != "imports":
                raise ValueError(f"unknown kind {kind!r}")
        except SystemExit as exc:
            res["rc"] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        res["seconds"] = time.perf_counter() - t0
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        res.update(rc=1, error=f"{type(exc).__name__}: {exc}")
    res["rss"] = vm_hwm_bytes()
    with open(result_path, "w") as f:
        json.dump(res, f)
    return 0


def compare_entry(a: str, b: str) -> int:
    """Load two consolidated outputs (safetensors or torch .bin, single or sharded) and
    compare them tensor by tensor; print one JSON line."""
    import torch

    def load_dir(d: str) -> dict:
        out = {}
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                out.update(load_file(p))
            elif name.endswith(".bin") or name.endswith(".pt"):
                out.update(torch.load(p, map_location="cpu", weights_only=True))
        return out

    x, y = load_dir(a), load_dir(b)
    report: dict = {"tensors_a": len(x), "tensors_b": len(y),
                    "only_a": sorted(set(x) - set(y))[:10], "only_b": sorted(set(y) - set(x))[:10]}
    bad = []
    for k in sorted(set(x) & set(y)):
        s, t = x[k], y[k]
        if s.dtype != t.dtype or s.shape != t.shape or not torch.equal(s, t):
            bad.append(f"{k}: {s.dtype}{list(s.shape)} vs {t.dtype}{list(t.shape)}")
    report["mismatched"] = bad[:10]
    report["n_mismatched"] = len(bad)
    report["equal"] = not bad and not report["only_a"] and not report["only_b"] and len(x) > 0
    report["numel"] = sum(t.numel() for t in x.values())
    print("COMPARE " + json.dumps(report), flush=True)
    return 0


# ===== parent side (no torch here: keeps this process small) =================================


class Failed(Exception):
    pass


def tree_pids(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log_dir = os.path.join(args.workdir, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.count = 0

    def measured(self, python: str, spec: dict, label: str, env: dict | None = None) -> dict:
        """Run one job in a fresh wrapper process; returns its times and memory."""
        self.count += 1
        result = os.path.join(self.log_dir, f"result-{self.count}.json")
        log_path = os.path.join(self.log_dir, f"{self.count:02d}-{label.split()[0]}.log")
        cmd = [python, os.path.abspath(__file__), "--measure", json.dumps(spec), "--result", result]
        print(f"[bench_deepspeed] {label}", file=sys.stderr, flush=True)
        peak = 0
        with open(log_path, "w") as log:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**os.environ, **(env or {})})
            deadline = time.monotonic() + self.args.timeout
            while p.poll() is None:
                peak = max(peak, sum(pss_bytes(q) for q in tree_pids(p.pid)))
                if time.monotonic() > deadline:
                    p.kill()
                    p.wait()
                    raise Failed(f"{label}: timed out after {self.args.timeout:.0f} s")
                time.sleep(0.1)
            command = time.perf_counter() - t0
        t_sync = timed(["sync"])
        try:
            with open(result) as f:
                res = json.load(f)
            os.remove(result)
        except (OSError, ValueError):
            res = {"rc": p.returncode, "error": "no result"}
        if res.get("rc") or res.get("error"):
            raise Failed(f"{label}: exit {res.get('rc')} {res.get('error') or ''}: {log_tail(log_path)}")
        return {"seconds": res["seconds"], "command": command, "sync": t_sync, "rss": res["rss"],
                "tree_pss": peak, "log": log_path}

    def cp(self, srcs: list[str], dst: str) -> dict:
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        subprocess.run(["sync"], check=True)
        t = timed(["cp", "-r", *srcs, dst + "/"])
        t_sync = timed(["sync"])
        nbytes = du(dst)
        shutil.rmtree(dst, ignore_errors=True)
        return {"seconds": t, "command": t, "sync": t_sync, "rss": None, "tree_pss": 0, "bytes": nbytes}


def log_tail(path: str, n: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])[-500:]


def du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for base, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    return total


def warm(path: str) -> None:
    """Read every file once so that every job starts from a warm page cache."""
    for base, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                while f.read(64 << 20):
                    pass


def med(xs) -> float:
    return statistics.median(xs)


def cell(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def zero_ckpt_cli() -> list[str]:
    exe = os.path.join(os.path.dirname(PY), "zero-ckpt")
    return [exe] if os.path.exists(exe) else [PY, "-c", "import sys; from cli.main import main; sys.argv[0]='zero-ckpt'; main()"]


def reshard_has_format() -> bool:
    out = subprocess.run([*zero_ckpt_cli(), "reshard", "--help"], capture_output=True, text=True, cwd=ROOT)
    at = out.stdout.find("--format")
    return at >= 0 and "deepspeed" in out.stdout[at : at + 400].lower()


def ensure_checkpoint(args: argparse.Namespace, dims: list[int]) -> tuple[str, dict]:
    nparams = n_params(dims)
    cache = os.path.join(args.workdir, f"ds-z2-fp32-dp{WORLD}-{nparams}")
    ckpt = os.path.join(cache, "ckpt")
    done = os.path.join(cache, "done.json")
    want = {"dims": dims, "world_size": WORLD, "stage": 2, "dtype": "fp32", "optimizer": "AdamW torch_adam",
            "steps": 1, "seed": SEED}
    if os.path.exists(done):
        with open(done) as f:
            have = json.load(f)
        if have.get("config") == want:
            print(f"[bench_deepspeed] using the cached checkpoint {ckpt}", file=sys.stderr, flush=True)
            return ckpt, have
    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(cache)
    if not os.path.exists(args.peers_python):
        raise SystemExit(f"peers interpreter not found: {args.peers_python} (see shared/PEERS.md)")
    print(f"[bench_deepspeed] generating a DeepSpeed ZeRO-2 checkpoint, {nparams / 1e6:.1f}M params, "
          f"DP {WORLD} -> {ckpt}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    generate(args.peers_python, ckpt, dims, os.path.join(args.workdir, "logs"), args.timeout)
    with open(os.path.join(cache, "bench-info.json")) as f:
        info = json.load(f)
    info.update(config=want, generate_seconds=time.perf_counter() - t0, params=nparams)
    with open(done, "w") as f:
        json.dump(info, f)
    return ckpt, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/zc-ds-bench")
    ap.add_argument("--quick", action="store_true", help="smoke run: ~1.8M params, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="median of this many (default 3; 1 with --quick)")
    ap.add_argument("--clean", action="store_true", help="also delete the cached DeepSpeed checkpoint at the end")
    ap.add_argument("--peers-python", default=DEFAULT_PEERS_PY)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per job")
    ap.add_argument("--ds-worker", help=argparse.SUPPRESS)
    ap.add_argument("--dims", help=argparse.SUPPRESS)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--compare", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ds_worker:
        ds_worker(args.ds_worker, json.loads(args.dims))
        return
    if args.measure:
        sys.path.insert(0, ROOT)
        raise SystemExit(measure_entry(json.loads(args.measure), args.result))
    if args.compare:
        raise SystemExit(compare_entry(*args.compare))
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    os.makedirs(os.path.join(args.workdir, "logs"), exist_ok=True)
    dims = QUICK_DIMS if args.quick else FULL_DIMS
    ckpt, info = ensure_checkpoint(args, dims)
    try:
        run(args, ckpt, info)
    finally:
        if args.clean:
            shutil.rmtree(os.path.dirname(ckpt), ignore_errors=True)


def run(args: argparse.Namespace, ckpt: str, info: dict) -> None:
    runner = Runner(args)
    peers = args.peers_python
    ds_env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    ds_env = {k: v for k, v in ds_env.items() if v}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    with open(os.path.join(ckpt, "latest")) as f:
        tag = f.read().strip()
    tag_dir = os.path.join(ckpt, tag)
    optim = sorted(os.path.join(tag_dir, n) for n in os.listdir(tag_dir) if n.endswith("_optim_states.pt"))
    model_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    ckpt_bytes = du(tag_dir)
    optim_bytes = sum(du(p) for p in optim)
    script = os.path.join(ckpt, "zero_to_fp32.py")
    if not os.path.exists(script):
        raise SystemExit(f"{script} is missing: regenerate the checkpoint (--clean)")
    ds_format = reshard_has_format()
    out = lambda name: os.path.join(args.workdir, name)  # noqa: E731

    warm(ckpt)
    # Baselines: the interpreter + torch, in each venv (and what deepspeed / zero_ckpt add).
    base_main = runner.measured(PY, {"kind": "imports", "preimport": ["torch"]}, "baseline main: import torch")
    base_peers = runner.measured(peers, {"kind": "imports", "preimport": ["torch"]}, "baseline peers: import torch",
                                 ds_env)
    base_zc = runner.measured(PY, {"kind": "imports", "preimport": ["torch", "zero_ckpt", "cli.main"]},
                              "baseline main: import torch, zero_ckpt, cli")
    base_ds = runner.measured(peers, {"kind": "imports", "preimport": ["torch", "deepspeed"]},
                              "baseline peers: import torch, deepspeed", ds_env)

    safe = ["--safe_serialization"]
    results: dict[str, list[dict] | str] = {}
    written: dict[str, int] = {}
    compare: dict | str | None = None

    def record(key: str, fn) -> dict | None:
        if isinstance(results.get(key), str):
            return None  # failed before: do not retry
        try:
            r = fn()
        except Failed as exc:
            results[key] = str(exc)
            return None
        results.setdefault(key, []).append(r)
        return r

    def zero_to_fp32(i: int) -> dict:
        nonlocal safe
        dst = out(f"z2fp32-{i}")
        shutil.rmtree(dst, ignore_errors=True)
        spec = {"kind": "script", "target": script, "argv": [ckpt, dst, *safe],
                "preimport": ["torch", "deepspeed.utils", "deepspeed.checkpoint.constants"]}
        try:
            r = runner.measured(peers, spec, "zero_to_fp32.py " + " ".join(safe), ds_env)
        except Failed as exc:
            if not safe:
                raise
            results["zero_to_fp32_safe_error"] = str(exc)
            safe = []
            shutil.rmtree(dst, ignore_errors=True)
            spec["argv"] = [ckpt, dst]
            r = runner.measured(peers, spec, "zero_to_fp32.py", ds_env)
        written["zero_to_fp32"] = du(dst)
        return r

    def consolidate(i: int) -> dict:
        dst = out(f"zc-fp32-{i}")
        shutil.rmtree(dst, ignore_errors=True)
        spec = {"kind": "cli", "argv": ["-q", "consolidate", ckpt, dst, "--dtype", "float32"],
                "preimport": ["torch", "zero_ckpt", "cli.main"]}
        r = runner.measured(PY, spec, "zero-ckpt consolidate --dtype float32")
        written["consolidate"] = du(dst)
        return r

    def universal(i: int) -> dict:
        # ds_to_universal also writes `latest_universal` next to its output folder: nest it.
        dst = os.path.join(out(f"universal-{i}"), "out")
        shutil.rmtree(os.path.dirname(dst), ignore_errors=True)
        spec = {"kind": "module", "target": "deepspeed.checkpoint.ds_to_universal",
                "argv": ["--input_folder", tag_dir, "--output_folder", dst, "--inject_missing_state"],
                "preimport": ["torch", "deepspeed", "deepspeed.checkpoint"]}
        r = runner.measured(peers, spec, "ds_to_universal", ds_env)
        written["ds_to_universal"] = du(dst)
        shutil.rmtree(os.path.dirname(dst), ignore_errors=True)
        return r

    def reshard(i: int) -> dict:
        dst = out(f"zc-dp{RESHARD_TO}-{i}")
        shutil.rmtree(dst, ignore_errors=True)
        argv = ["-q", "reshard", ckpt, dst, "--to", str(RESHARD_TO)] + (["--format", "deepspeed"] if ds_format else [])
        spec = {"kind": "cli", "argv": argv, "preimport": ["torch", "zero_ckpt", "cli.main"]}
        r = runner.measured(PY, spec, "zero-ckpt " + " ".join(argv[1:2] + argv[4:]))
        written["reshard"] = du(dst)
        shutil.rmtree(dst, ignore_errors=True)
        return r

    reshard_floor_srcs = [tag_dir] if ds_format else optim
    for i in range(args.repeats):
        record("cp_model", lambda: runner.cp([model_file], out("cp-model")))
        record("cp_reshard", lambda: runner.cp(reshard_floor_srcs, out("cp-reshard")))
        record("cp_all", lambda: runner.cp([tag_dir], out("cp-all")))
        record("zero_to_fp32", lambda: zero_to_fp32(i))
        record("consolidate", lambda: consolidate(i))
        if i == 0:
            a, b = out("z2fp32-0"), out("zc-fp32-0")
            if os.path.isdir(a) and os.path.isdir(b):
                print("[bench_deepspeed] comparing the two consolidated outputs", file=sys.stderr, flush=True)
                cmp_out = subprocess.run([PY, os.path.abspath(__file__), "--compare", b, a],
                                         capture_output=True, text=True, cwd=ROOT)
                line = [l for l in cmp_out.stdout.splitlines() if l.startswith("COMPARE ")]
                compare = json.loads(line[-1][8:]) if line else f"compare failed: {cmp_out.stderr[-400:]}"
            else:
                compare = "not compared: an output is missing (a job failed)"
        for d in (out(f"z2fp32-{i}"), out(f"zc-fp32-{i}")):
            shutil.rmtree(d, ignore_errors=True)
        record("ds_to_universal", lambda: universal(i))
        record("reshard", lambda: reshard(i))

    # ----- tables -----
    P = info.get("params", 0)
    print(f"\n## DeepSpeed ZeRO-2 checkpoint: {P / 1e6:.1f}M params, fp32, AdamW (torch_adam), DP {WORLD}; "
          f"DeepSpeed {info.get('deepspeed')}, torch {info.get('torch')} ({info.get('optimizer')})\n")
    print(f"{tag}/: {ckpt_bytes / 1e9:.2f} GB ({len(optim)} optim files {optim_bytes / 1e9:.2f} GB, "
          f"model file {du(model_file) / 1e9:.2f} GB); warm page cache; median of {args.repeats}; "
          f"generated in {info.get('generate_seconds', 0):.0f} s (cached in {os.path.dirname(ckpt)})\n")
    print("baselines (peak RSS, MiB): " + ", ".join(
        f"{name} {b['rss'] / MiB:,.0f}" for name, b in [
            ("main python + torch", base_main), ("+ zero_ckpt, cli", base_zc),
            ("peers python + torch", base_peers), ("+ deepspeed", base_ds)]) + "\n")

    def m(key: str, field: str) -> float | None:
        r = results.get(key)
        if not isinstance(r, list) or not r:
            return None
        vals = [x[field] for x in r if x.get(field) is not None]
        return med(vals) if vals else None

    def total(key: str) -> float | None:  # work + sync
        r = results.get(key)
        if not isinstance(r, list) or not r:
            return None
        return med([x["seconds"] + x["sync"] for x in r])

    def peak(key: str) -> float | None:
        rss, pss = m(key, "rss"), m(key, "tree_pss")
        vals = [v for v in (rss, pss) if v]
        return max(vals) if vals else None

    base_of = {"zero_to_fp32": base_peers, "ds_to_universal": base_peers,
               "consolidate": base_main, "reshard": base_main}
    reshard_label = (f"zero-ckpt reshard --to {RESHARD_TO} --format deepspeed" if ds_format else
                     f"zero-ckpt reshard --to {RESHARD_TO} (format-v1 output: --format deepspeed is not in "
                     f"this zero-ckpt yet)")
    floors = {
        "consolidate": ("cp_model", f"cp of {tag}/mp_rank_00_model_states.pt (the fp32 weights' bytes)"),
        "zero_to_fp32": ("cp_model", None),
        "reshard": ("cp_reshard", f"cp -r of {tag}/ (optim + model files)" if ds_format
                    else f"cp -r of the {len(optim)} optim files"),
        "ds_to_universal": ("cp_reshard", None),
    }
    rows = [
        ("cp_model", floors["consolidate"][1]),
        ("zero_to_fp32", "DeepSpeed zero_to_fp32.py" + (" --safe_serialization" if safe else
                                                          " (--safe_serialization failed)")),
        ("consolidate", "zero-ckpt consolidate --dtype float32 (reads DeepSpeed in place)"),
        ("cp_reshard", floors["reshard"][1]),
        ("ds_to_universal", "DeepSpeed ds_to_universal --inject_missing_state"),
        ("reshard", reshard_label),
        ("cp_all", f"cp -r of the whole {tag}/ (reference)"),
    ]
    print("| job | work s | + sync s | command s | x its cp floor (goal <= 1.3) | peak RSS MiB (top process) "
          "| peak PSS MiB (process tree, sampled) | above torch baseline MiB | bytes written |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, label in rows:
        r = results.get(key)
        if isinstance(r, str):
            print(f"| {label} | FAILED: {cell(r)} | | | | | | | |")
            continue
        if not r:
            print(f"| {label} | not run | | | | | | | |")
            continue
        t, s, c = m(key, "seconds"), m(key, "sync"), m(key, "command")
        floor_key = key if key.startswith("cp_") else floors.get(key, (None,))[0]
        ft = total(floor_key) if floor_key else None
        ratio = f"{total(key) / ft:.2f}" if ft and key != "cp_all" else "-"
        rss, pss = m(key, "rss"), m(key, "tree_pss")
        above = f"{(peak(key) - base_of[key]['rss']) / MiB:,.0f}" if key in base_of and peak(key) else "-"
        wb = r[0].get("bytes") if key.startswith("cp_") else written.get(key)
        print(f"| {label} | {t:.2f} | {s:.2f} | {c:.2f} | {ratio} | {'-' if rss is None else f'{rss / MiB:,.0f}'} "
              f"| {f'{pss / MiB:,.0f}' if pss else '-'} | {above} | {'-' if wb is None else f'{wb / 1e9:.2f} GB'} |")

    print("\n### Goals (issue 5)\n")
    print("| goal | measured | met |")
    print("|---|---:|---|")

    def goal(text: str, value: float | None, ok) -> None:
        if value is None:
            print(f"| {text} | n/a | - |")
        else:
            print(f"| {text} | {value:.2f} | {'yes' if ok(value) else 'NO'} |")

    z, c = total("zero_to_fp32"), total("consolidate")
    goal("consolidate: zero_to_fp32 time / ours (work + sync), >= 1.5", z / c if z and c else None, lambda v: v >= 1.5)
    zm = peak("zero_to_fp32") - base_peers["rss"] if peak("zero_to_fp32") else None
    cm = peak("consolidate") - base_main["rss"] if peak("consolidate") else None
    goal("consolidate: ours / zero_to_fp32 memory above torch baseline, <= 0.10",
         cm / zm if cm is not None and zm else None, lambda v: v <= 0.10)
    u, r = total("ds_to_universal"), total("reshard")
    goal(f"reshard: ds_to_universal time / ours{'' if ds_format else ' (v1 output)'}, >= 2",
         u / r if u and r else None, lambda v: v >= 2)
    cf, rf = total("cp_model"), total("cp_reshard")
    goal("consolidate / its cp floor, <= 1.3", c / cf if c and cf else None, lambda v: v <= 1.3)
    goal("reshard / its cp floor, <= 1.3", r / rf if r and rf else None, lambda v: v <= 1.3)

    print("\n### consolidate vs zero_to_fp32, bit for bit\n")
    if isinstance(compare, dict):
        verdict = "IDENTICAL" if compare["equal"] else "DIFFERENT"
        print(f"{verdict}: ours {compare['tensors_a']} tensors ({compare['numel'] / 1e6:.1f}M elements), "
              f"zero_to_fp32 {compare['tensors_b']}; mismatched {compare['n_mismatched']}"
              + (f" e.g. {compare['mismatched'][:3]}" if compare["mismatched"] else "")
              + (f"; only in ours {compare['only_a']}" if compare["only_a"] else "")
              + (f"; only in zero_to_fp32 {compare['only_b']}" if compare["only_b"] else ""))
    else:
        print(str(compare))
    if "zero_to_fp32_safe_error" in results:
        print(f"\nzero_to_fp32 --safe_serialization failed, ran without it: {cell(results['zero_to_fp32_safe_error'])}")
    if any(isinstance(v, str) for v in results.values()):
        print(f"\nlogs of every job: {runner.log_dir}")
    else:
        shutil.rmtree(runner.log_dir, ignore_errors=True)
    if not ds_format:
        print("\nnote: `zero-ckpt reshard --help` does not list --format deepspeed yet; the reshard row "
              "writes format v1 (the script switches to --format deepspeed by itself once it is there).")


if __name__ == "__main__":
    main()
