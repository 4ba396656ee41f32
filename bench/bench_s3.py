"""Benchmark (issue 4): zero-ckpt on S3 against plain s3fs copies of the same bytes.

Run by hand (not a test), on a quiet machine:

    .venv/bin/python bench/bench_s3.py                      # 1 GB checkpoint, 3 repeats
    .venv/bin/python bench/bench_s3.py --gb 2 --repeats 5 --workdir /tmp/zc-s3-bench
    .venv/bin/python bench/bench_s3.py --quick              # 0.1 GB, 1 repeat: smoke run

The S3 server is moto's server mode on 127.0.0.1 (``tests/s3server.py``), reached through the
real s3fs client, as in the tests. Moto is a single Python process on the same machine: it
competes with the client for the cores, keeps every object (in memory up to a few MiB, larger
ones in spooled temporary files) and hashes every upload, so absolute throughput is moto's,
not S3's. The ratios (ours / plain s3fs, both against the same server in the same run) are
the figures that carry over. Moto's own peak RSS is printed at the end.

What runs (each job in a fresh subprocess, so its peak RSS, VmHWM of /proc/self/status, is its
own; the time is the job's call only, not the interpreter start; median of ``--repeats``,
ours and its floor alternating):

1. A synthetic data-parallel-8 format-v1 checkpoint of ``--gb`` GB is written to local disk
   (``bench_toolkit.make_checkpoint``: fp32 masters + Adam's two moments, two groups).
2. Upload ("save-like upload"): ``zero-ckpt reshard LOCAL s3://.../up --to 8`` against
   ``s3fs.S3FileSystem.put`` of the same folder (the upload floor). Its output is the S3
   source of every later job.
3. ``zero-ckpt reshard s3 -> s3 --to 16``. Every byte must come down to this host and go up
   again, so the floor is a plain s3fs get + put of the same bytes through the host, run
   concurrently as ours is: per file ``_cat_file`` then ``_pipe_file``, 4 files in flight
   (our default ZERO_CKPT_WORKERS). A server-side ``fs.copy`` (no bytes through the host) is
   shown for information only: it is not a floor for a re-cut.
4. ``zero-ckpt consolidate s3 -> local --dtype bfloat16``: reads every fp32 master (a third
   of the checkpoint), writes half that. Floor: s3fs ``cat_ranges`` of exactly the master
   byte ranges (from the shards' safetensors headers) written to one local file, + sync
   (ours fsyncs). A full ``fs.get`` of the checkpoint (+ sync) is shown for reference.
5. ``zero-ckpt verify s3``: reads every byte once. Floor: s3fs reads every object
   (``_cat_file``, 4 in flight), bytes discarded.
6. Load at the same size (8 -> 8) and resharded (8 -> 16, 8 -> 3). Ranks are simulated without
   a process group: for each rank r of M, one after the other, what ``zero_ckpt.load`` does
   on that rank before it touches the optimizer: read the manifest, then
   ``zero_ckpt.loading._read_partition`` with a stand-in optimizer exposing ``rank``,
   ``world_size`` and ``layouts`` (the GroupLayouts at M), then, once for all ranks, the
   pooled checksum check ``zero_ckpt.loading._verify``. Floor per rank: s3fs ``cat_ranges`` of
   exactly that rank's byte ranges (the same plan, ``plan_partition_read``). Bytes fetched
   per rank are counted on the wire in a separate, untimed pass through the request-logging
   proxy of ``tests/faultproxy.py`` (no faults): the sum of the Range lengths of the GETs
   (a GET without a Range counts the whole object), shown against checkpoint size / M.
7. Async save: a 2-rank gloo job (one process per rank, like bench_optimizer) with a
   ZeroOptimizer (stage 2, Adam) on a ~6.8M-param model (~81 MB of master + Adam state):
   how long ``zero_ckpt.async_save(...)`` blocks the training loop (until it
   returns) against a blocking ``zero_ckpt.save`` to the same server; then training steps
   run while the upload is in flight, and ``wait()``. Also each rank's plain
   ``s3fs.pipe_file`` of the same partition bytes (the floor for a save).

Moto caveat, measured here: moto answers a ranged GET by reading the whole object from its
spooled file and slicing it, under a per-object lock (``FakeKey.value``), so a range costs
O(object size) and ranges of one object are served one at a time (a 1 MiB range of a 64 MiB
object took 52 ms, of an 8 MiB object 7 ms). Real S3 charges a range by its length. Our jobs
read in ZERO_CKPT_CHUNK_BYTES (8 MiB) ranged GETs, the s3fs floors in whole objects or 50 MiB
ranges, so moto penalises ours more the larger the shards: the info rows "ZERO_CKPT_CHUNK_BYTES
=64 MiB" rerun the reading jobs with 8x fewer ranges to show how much of a gap is this
(``--no-chunk-sensitivity`` skips them).

Prints markdown tables at the end. Every output (local and S3) is removed as it goes; the
local source checkpoint is removed at the end.
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
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
PY = sys.executable
MiB = 1 << 20
LOAD_SIZES = (8, 16, 3)
CONCURRENT_FILES = 4  # files in flight in the s3fs floors: our ZERO_CKPT_WORKERS default
BIG_CHUNK = 64 << 20  # the chunk-size sensitivity rows (default chunk: 8 MiB)

# Async-save model (fp32 Linear stack, odd widths): ~6.8M params (~81 MB master + Adam state).
ASYNC_DIMS = [1021, 2039, 1531, 1021]
ASYNC_DIMS_QUICK = [257, 509, 253]
BATCH_PER_RANK = 32


# ===== child side: one job per process =======================================================


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def plain_s3fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def s3_files(fs, url: str) -> list[str]:
    """Relative paths of the objects under url (directory markers left out)."""
    root = url.removeprefix("s3://").rstrip("/")
    return sorted(p[len(root) + 1:] for p in fs.find(root) if not p.endswith("/"))


def local_sync() -> None:
    os.sync()


def _safetensors_ranges(fs, url: str, rel: str, suffix: str) -> list[tuple[str, int, int]]:
    """(path, start, end) of the tensors whose name ends with ``suffix`` in a safetensors object."""
    path = f"{url.removeprefix('s3://')}/{rel}"
    n = int.from_bytes(fs.cat_file(path, start=0, end=8), "little")
    header = json.loads(fs.cat_file(path, start=8, end=8 + n))
    out = []
    for name, entry in header.items():
        if name != "__metadata__" and name.endswith(suffix):
            a, b = entry["data_offsets"]
            out.append((path, 8 + n + a, 8 + n + b))
    return out


def child_main(job: str, spec: dict) -> dict:
    """Run one job; return {"seconds": ..., extra...}."""
    ep = spec.get("endpoint")
    os.environ.update(spec.get("env") or {})  # zero_ckpt.knobs read the environment per call
    extra: dict = {}
    if job == "baseline":
        import torch  # noqa: F401
        import s3fs  # noqa: F401
        import zero_ckpt  # noqa: F401
        import cli.main  # noqa: F401
        import zero_ckpt.saving, zero_ckpt.loading  # noqa: F401,E401

        t0 = time.perf_counter()
    elif job == "make":
        sys.path.insert(0, HERE)
        from bench_toolkit import make_checkpoint

        t0 = time.perf_counter()
        extra["numel"] = make_checkpoint(spec["dst"], spec["gb"])
    elif job == "cli":
        # Imports outside the timed call (the floors import s3fs before theirs too).
        import torch  # noqa: F401
        import s3fs  # noqa: F401
        import zero_ckpt.saving, zero_ckpt.loading  # noqa: F401,E401
        import zero_ckpt.consolidation  # noqa: F401
        import zero_ckpt.resharding  # noqa: F401
        import zero_ckpt.verification  # noqa: F401
        from cli.main import cli

        args = ["-q", "-o", f"endpoint_url={ep}", *spec["argv"]]
        t0 = time.perf_counter()
        rc = cli.main(args=args, prog_name="zero-ckpt", standalone_mode=False)
        if rc not in (None, 0):
            raise SystemExit(f"zero-ckpt {' '.join(spec['argv'])} exited with {rc}")
    elif job == "s3fs_put":
        fs = plain_s3fs(ep)
        t0 = time.perf_counter()
        fs.put(spec["src"], spec["dst"].removeprefix("s3://"), recursive=True)
    elif job == "s3fs_get":
        fs = plain_s3fs(ep)
        t0 = time.perf_counter()
        fs.get(spec["src"].removeprefix("s3://"), spec["dst"], recursive=True)
        local_sync()
    elif job == "s3fs_copy":  # server-side copy: information only
        fs = plain_s3fs(ep)
        t0 = time.perf_counter()
        fs.copy(spec["src"].removeprefix("s3://"), spec["dst"].removeprefix("s3://"), recursive=True)
    elif job in ("s3fs_getput", "s3fs_read_all"):
        import asyncio

        from fsspec.asyn import sync

        fs = plain_s3fs(ep)
        src = spec["src"].removeprefix("s3://")
        dst = spec.get("dst", "").removeprefix("s3://")
        rels = s3_files(fs, src)
        put = job == "s3fs_getput"

        async def go() -> int:
            sem = asyncio.Semaphore(CONCURRENT_FILES)

            async def one(rel: str) -> int:
                async with sem:
                    data = await fs._cat_file(f"{src}/{rel}")
                    if put:
                        await fs._pipe_file(f"{dst}/{rel}", data)
                    return len(data)

            return sum(await asyncio.gather(*(one(r) for r in rels)))

        t0 = time.perf_counter()
        extra["bytes"] = sync(fs.loop, go)
    elif job == "s3fs_master_ranges":
        fs = plain_s3fs(ep)
        src = spec["src"]
        t0 = time.perf_counter()
        ranges = [r for rel in s3_files(fs, src) if rel.startswith("shards/")
                  for r in _safetensors_ranges(fs, src, rel, ".master")]
        datas = fs.cat_ranges([p for p, _, _ in ranges], [a for _, a, _ in ranges], [b for _, _, b in ranges])
        os.makedirs(spec["dst"], exist_ok=True)
        with open(os.path.join(spec["dst"], "masters.bin"), "wb") as f:
            for d in datas:
                if isinstance(d, BaseException):
                    raise d
                f.write(d)
            f.flush()
            os.fsync(f.fileno())
        extra["bytes"] = sum(len(d) for d in datas)
    elif job in ("load_sim", "load_floor", "load_count"):
        return load_job(job, spec)
    else:
        raise SystemExit(f"unknown job {job!r}")
    extra["seconds"] = time.perf_counter() - t0
    return extra


def _stand_in(manifest, rank: int, world_size: int):
    """What zero_ckpt.loading._read_partition uses of a live optimizer."""
    from types import SimpleNamespace

    return SimpleNamespace(rank=rank, world_size=world_size, layouts=manifest.layouts(world_size))


def load_job(job: str, spec: dict) -> dict:
    from zero_ckpt import loading
    from zero_ckpt.storage import open_location
    from zero_ckpt.transfer import SourceChecks, load_manifest

    url, M = spec["src"], spec["world_size"]
    ep = spec["endpoint"]
    per_rank: list[dict] = []

    if job == "load_floor":
        from zero_ckpt.formats.registry import open_view
        from zero_ckpt.plan import plan_partition_read

        with open_location(url, {"endpoint_url": ep}) as loc:
            view = open_view(loc)
            root = url.removeprefix("s3://")
            plans = []
            for rank in range(M):
                reads = plan_partition_read(view, M, rank)
                plans.append([(f"{root}/{op.src_file}", op.src_start, op.src_start + op.src_nbytes)
                              for ops in reads.ops for op in ops if op.numel])
        fs = plain_s3fs(ep)
        fs.ls(root)  # untimed: session and connection up (ours is warmed the same way)
        t_all = time.perf_counter()
        for rank, ranges in enumerate(plans):
            t0 = time.perf_counter()
            datas = fs.cat_ranges([p for p, _, _ in ranges], [a for _, a, _ in ranges],
                                  [b for _, _, b in ranges]) if ranges else []
            dt = time.perf_counter() - t0
            for d in datas:
                if isinstance(d, BaseException):
                    raise d
            per_rank.append({"seconds": dt, "bytes": sum(len(d) for d in datas)})
            del datas
        return {"seconds": time.perf_counter() - t_all, "ranks": per_rank}

    proxy = None
    if job == "load_count":
        sys.path.insert(0, TESTS)
        from faultproxy import FaultProxy

        proxy = FaultProxy(ep, fail_rate=0.0, lifetime=24 * 3600).start()
        options = proxy.storage_options
        sizes: dict[str, int] = {}
        fs = plain_s3fs(ep)
    else:
        options = {"endpoint_url": ep}
    pooled = []
    with open_location(url, options) as loc:
        manifest = load_manifest(loc)  # untimed: the client's session and connection up
    t_all = time.perf_counter()
    try:
        for rank in range(M):
            if proxy is not None:
                proxy.log.clear()
            t0 = time.perf_counter()
            with open_location(url, options) as loc:
                manifest = load_manifest(loc)
                checks = SourceChecks()
                tensors, nbytes, headers, crcs = loading._read_partition(loc, manifest, _stand_in(manifest, rank, M), checks)
            dt = time.perf_counter() - t0
            del tensors
            pooled.append(([(k, pc.pieces) for k, pc in checks.pieces.items()], headers, crcs))
            rec = {"seconds": dt, "tensor_bytes": nbytes}
            if proxy is not None:
                rec.update(_wire_bytes(list(proxy.log), fs, sizes))
            per_rank.append(rec)
        t0 = time.perf_counter()
        with open_location(url, options) as loc:
            loading._verify(loc, manifest, pooled)
        t_verify = time.perf_counter() - t0
    finally:
        if proxy is not None:
            proxy.stop()
    return {"seconds": time.perf_counter() - t_all, "verify_seconds": t_verify, "ranks": per_rank}


def _wire_bytes(log: list, fs, sizes: dict[str, int]) -> dict:
    """Bytes the GETs in a proxy log asked for: Range lengths, or the whole object."""
    total = gets = requests = 0
    for method, path, query, rng, _fault in log:
        requests += 1
        if method != "GET" or not path.strip("/").count("/"):  # bucket-level: listings
            continue
        if "list-type" in query or "uploads" in query:
            continue
        gets += 1
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            if b:
                total += int(b) - int(a) + 1
                continue
            size = _object_size(fs, path, sizes)
            total += max(0, size - int(a))
        else:
            total += _object_size(fs, path, sizes)
    return {"wire_bytes": total, "gets": gets, "requests": requests}


def _object_size(fs, path: str, sizes: dict[str, int]) -> int:
    from urllib.parse import unquote

    key = unquote(path.lstrip("/"))
    if key not in sizes:
        sizes[key] = int(fs.info(key)["size"])
    return sizes[key]


def child_entry(job: str, spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        res = child_main(job, spec)
        res["rss"] = vm_hwm_bytes()
        res["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(res), flush=True)
    return 0 if res["ok"] else 1


# ===== async-save ranks ======================================================================


def build_model(dims: list[int]):
    import torch

    torch.manual_seed(0)
    layers: list = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def async_rank(spec: dict) -> dict:
    import torch
    import torch.distributed as dist

    import zero_ckpt
    from zero_core import ZeroOptimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    dims = spec["dims"]
    so = {"endpoint_url": spec["endpoint"]}
    base = spec["url"]
    model = build_model(dims)
    opt = ZeroOptimizer(model.named_parameters(), torch.optim.Adam, stage=2, lr=1e-3)
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(BATCH_PER_RANK, dims[0], generator=g)
    y = torch.randn(BATCH_PER_RANK, dims[-1], generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    step()
    res: dict = {"rank": rank}
    # Warm-up (untimed): connections, and the first async save creates its gloo group.
    zero_ckpt.save(f"{base}/warm-blocking", optimizer=opt, model=model, storage_options=so)
    h, res["first_async_return"] = timed(lambda: zero_ckpt.async_save(
        f"{base}/warm-async", optimizer=opt, model=model, storage_options=so))
    h.wait()
    idle = []
    for _ in range(spec["steps"]):
        idle.append(timed(step)[1])
    res["step_idle"] = idle
    res.update(blocking=[], async_return=[], async_wait=[], async_total=[], step_during=[], floor=[])
    fs = None
    partition = None
    for i in range(spec["repeats"]):
        manifest, dt = timed(lambda: zero_ckpt.save(
            f"{base}/blocking-{i}", optimizer=opt, model=model, storage_options=so))
        res["blocking"].append(dt)
        dist.barrier()
        t_start = time.perf_counter()
        h, dt = timed(lambda: zero_ckpt.async_save(
            f"{base}/async-{i}", optimizer=opt, model=model, storage_options=so))
        res["async_return"].append(dt)
        during = []
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            step()
            during.append(time.perf_counter() - t0)
        res["step_during"].append(during)
        res["done_before_wait"] = h.done()
        t0 = time.perf_counter()
        h.wait()
        res["async_wait"].append(time.perf_counter() - t0)
        res["async_total"].append(time.perf_counter() - t_start)
        # Floor: this rank's partition bytes (what its shard holds) up with plain s3fs.
        if fs is None:
            fs = plain_s3fs(spec["endpoint"])
            fs.ls(base.removeprefix("s3://").split("/")[0])  # session and connection up first
            parts = []
            for gi, layout in enumerate(opt.layouts):
                real = layout.real_numel(rank)
                parts.append(opt.master_partition(gi)[:real])
                parts += [t[:real] for t in opt.state_partitions(gi).values()]
            partition = b"".join(t.detach().contiguous().view(torch.uint8).numpy().tobytes() for t in parts)
            res["partition_bytes"] = len(partition)
            res["shard_bytes"] = manifest.shard(rank).bytes
        _, dt = timed(lambda: fs.pipe_file(f"{base.removeprefix('s3://')}/floor-{i}/rank-{rank}", partition))
        res["floor"].append(dt)
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()
    return res


def rank_entry(spec_json: str, result_path: str) -> int:
    spec = json.loads(spec_json)
    try:
        res = async_rank(spec)
        res["ok"] = True
    except BaseException as exc:  # noqa: BLE001
        traceback.print_exc()
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    res["rss"] = vm_hwm_bytes()
    with open(result_path, "w") as f:
        json.dump(res, f)
    return 0 if res["ok"] else 1


# ===== parent side ===========================================================================


class Failed(Exception):
    pass


def run_child(job: str, spec: dict, timeout: float) -> dict:
    cmd = [PY, os.path.abspath(__file__), "--child", job, "--spec", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise Failed(f"{job}: timed out after {timeout:.0f} s") from None
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        tail = " ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
        raise Failed(f"{job}: exit {out.returncode}: {tail[-400:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    if not res.get("ok"):
        raise Failed(f"{job}: {res.get('error')}")
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(spec: dict, world_size: int, workdir: str, timeout: float) -> list[dict]:
    result_dir = tempfile.mkdtemp(prefix="async-", dir=workdir)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs, logs = [], []
    try:
        for r in range(world_size):
            log = open(os.path.join(result_dir, f"rank{r}.log"), "w")
            logs.append(log)
            cmd = [PY, os.path.abspath(__file__), "--rank-job", "--spec", json.dumps(spec),
                   "--result", os.path.join(result_dir, f"rank{r}.json")]
            procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                          stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(5)  # let the others report, then stop them
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    results, errors = [], []
    for r in range(world_size):
        path = os.path.join(result_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
            results.append(res)
            if not res.get("ok"):
                errors.append(f"rank {r}: {res.get('error')}")
        else:
            with open(os.path.join(result_dir, f"rank{r}.log"), errors="replace") as f:
                tail = " ".join(f.read().strip().splitlines()[-2:])
            errors.append(f"rank {r}: no result (exit {procs[r].returncode}): {tail[-300:]}")
    shutil.rmtree(result_dir, ignore_errors=True)
    if errors:
        raise Failed("; ".join(errors))
    return results


def du(path: str) -> int:
    total = 0
    for base, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    return total


def med(xs) -> float:
    return statistics.median(xs)


def fmt_mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def cell(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def proc_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, endpoint: str, bucket: str) -> None:
        self.args = args
        self.ep = endpoint
        self.base = f"s3://{bucket}"
        self.fs = plain_s3fs(endpoint)
        self.rows: list[dict] = []  # the comparison table
        self.load_rows: list[dict] = []
        self.async_res: list[dict] | str | None = None
        self.timeout = args.timeout

    # -- helpers --
    def s3(self, name: str) -> str:
        return f"{self.base}/{name}"

    def local(self, name: str) -> str:
        p = os.path.join(self.args.workdir, name)
        shutil.rmtree(p, ignore_errors=True)
        return p

    def rm_s3(self, url: str) -> None:
        try:
            self.fs.rm(url.removeprefix("s3://"), recursive=True)
        except FileNotFoundError:
            pass

    def job(self, job: str, **spec) -> dict:
        print(f"[bench_s3] {job} {spec.get('argv', '')}", file=sys.stderr, flush=True)
        return run_child(job, {"endpoint": self.ep, **spec}, self.timeout)

    def repeat(self, fn) -> tuple[list[dict] | None, str | None]:
        """Run fn(i) for each repeat; returns (results, error)."""
        out = []
        for i in range(self.args.repeats):
            try:
                out.append(fn(i))
            except Failed as exc:
                return None, str(exc)
        return out, None

    def pair(self, label: str, ours_fn, floor_label: str, floor_fn, nbytes: int,
             infos: list[tuple[str, object, int]] = ()) -> None:
        """Alternate floor and ours per repeat; record a table row for each (and info rows)."""
        floors, ours = [], []
        ferr = oerr = None
        for i in range(self.args.repeats):
            if ferr is None:
                try:
                    floors.append(floor_fn(i))
                except Failed as exc:
                    ferr = str(exc)
            if oerr is None:
                try:
                    ours.append(ours_fn(i))
                except Failed as exc:
                    oerr = str(exc)
        f_t = med([r["seconds"] for r in floors]) if ferr is None and floors else None
        o_t = med([r["seconds"] for r in ours]) if oerr is None and ours else None
        self.rows.append({"job": floor_label, "kind": "floor", "seconds": f_t, "rss": _med_rss(floors),
                          "bytes": nbytes, "error": ferr, "ratio": 1.0 if f_t else None})
        self.rows.append({"job": label, "kind": "ours", "seconds": o_t, "rss": _med_rss(ours),
                          "bytes": nbytes, "error": oerr, "ratio": o_t / f_t if o_t and f_t else None})
        for info_label, info_fn, info_bytes in infos:
            res, err = self.repeat(info_fn)
            t = med([r["seconds"] for r in res]) if res else None
            self.rows.append({"job": info_label, "kind": "info", "seconds": t, "rss": _med_rss(res),
                              "bytes": info_bytes, "error": err, "ratio": t / f_t if t and f_t else None})

    # -- the jobs --
    def run(self) -> None:
        a = self.args
        src = self.local("dp8-src")
        made = self.job("make", dst=src, gb=a.gb)
        self.numel = made["numel"]
        self.ckpt_bytes = du(src)
        self.baseline = self.job("baseline")["rss"]
        n = self.ckpt_bytes

        # 1. upload: put floor vs reshard local -> s3 --to 8
        def put(i):
            r = self.job("s3fs_put", src=src, dst=self.s3(f"put-{i}"))
            got = len(s3_files(self.fs, self.s3(f"put-{i}")))
            if got != len(os.listdir(os.path.join(src, "shards"))) + sum(
                    1 for f in os.listdir(src) if os.path.isfile(os.path.join(src, f))):
                raise Failed(f"s3fs put left {got} objects: not the folder's files")
            self.rm_s3(self.s3(f"put-{i}"))
            return r

        def upload(i):
            r = self.job("cli", argv=["reshard", src, self.s3(f"up-{i}"), "--to", "8"])
            if i:
                self.rm_s3(self.s3(f"up-{i}"))
            return r

        self.pair("zero-ckpt reshard local -> s3 --to 8 (save-like upload)", upload,
                  "floor: s3fs put of the folder (upload)", put, n)
        S = self.s3("up-0")
        if not self.fs.exists(S.removeprefix("s3://") + "/manifest.json"):
            raise SystemExit("the upload failed: no S3 source for the other jobs")

        # 2. reshard s3 -> s3 --to 16
        def getput(i):
            r = self.job("s3fs_getput", src=S, dst=self.s3(f"gp-{i}"))
            self.rm_s3(self.s3(f"gp-{i}"))
            return r

        def server_copy(i):
            r = self.job("s3fs_copy", src=S, dst=self.s3(f"cp-{i}"))
            self.rm_s3(self.s3(f"cp-{i}"))
            return r

        big = {"ZERO_CKPT_CHUNK_BYTES": str(BIG_CHUNK)}
        big_label = f"info: ours again, ZERO_CKPT_CHUNK_BYTES={BIG_CHUNK >> 20} MiB (fewer ranged GETs; moto note)"

        def reshard16(i, env=None):
            r = self.job("cli", argv=["reshard", S, self.s3(f"dp16-{i}"), "--to", "16"], env=env)
            self.rm_s3(self.s3(f"dp16-{i}"))
            return r

        self.pair("zero-ckpt reshard s3 -> s3 --to 16", reshard16,
                  "floor: s3fs get + put through this host (4 files in flight)", getput, n,
                  [("info: s3fs server-side copy (no bytes through the host; not a floor)", server_copy, n)]
                  + ([(big_label, lambda i: reshard16(i, big), n)] if a.chunk_sensitivity else []))

        # 3. consolidate s3 -> local bf16
        masters = 4 * self.numel

        def ranges(i):
            out = self.local(f"masters-{i}")
            r = self.job("s3fs_master_ranges", src=S, dst=out)
            shutil.rmtree(out, ignore_errors=True)
            return r

        def get_all(i):
            out = self.local(f"get-{i}")
            r = self.job("s3fs_get", src=S, dst=out)
            shutil.rmtree(out, ignore_errors=True)
            return r

        def consolidate(i, env=None):
            out = self.local(f"hf-bf16-{i}")
            r = self.job("cli", argv=["consolidate", S, out, "--dtype", "bfloat16"], env=env)
            r["written"] = du(out)
            shutil.rmtree(out, ignore_errors=True)
            return r

        self.pair("zero-ckpt consolidate s3 -> local --dtype bfloat16", consolidate,
                  "floor: s3fs cat_ranges of the fp32 masters -> local file + sync", ranges, masters,
                  [("info: s3fs get of the whole checkpoint + sync (3x the bytes)", get_all, n)]
                  + ([(big_label, lambda i: consolidate(i, big), masters)] if a.chunk_sensitivity else []))

        # 4. verify
        def read_all(i):
            return self.job("s3fs_read_all", src=S)

        def verify(i, env=None):
            return self.job("cli", argv=["verify", S], env=env)

        self.pair("zero-ckpt verify s3", verify, "floor: s3fs read of every object (4 in flight)", read_all, n,
                  [(big_label, lambda i: verify(i, big), n)] if a.chunk_sensitivity else [])

        # 5. loads
        for M in LOAD_SIZES:
            row: dict = {"M": M}
            try:
                ours = [self.job("load_sim", src=S, world_size=M) for _ in range(a.repeats)]
                floor = [self.job("load_floor", src=S, world_size=M) for _ in range(a.repeats)]
                count = self.job("load_count", src=S, world_size=M)
                row.update(ours=ours, floor=floor, count=count)
            except Failed as exc:
                row["error"] = str(exc)
            self.load_rows.append(row)

        # 6. async save
        dims = ASYNC_DIMS_QUICK if a.quick else ASYNC_DIMS
        spec = {"endpoint": self.ep, "url": self.s3("async"), "dims": dims,
                "repeats": a.repeats, "steps": a.steps}
        print("[bench_s3] async save (2 gloo ranks)", file=sys.stderr, flush=True)
        try:
            self.async_res = launch_ranks(spec, 2, a.workdir, self.timeout)
            self.async_params = sum(x * y + y for x, y in zip(dims, dims[1:]))
        except Failed as exc:
            self.async_res = str(exc)
        self.rm_s3(self.s3("async"))
        self.rm_s3(S)
        shutil.rmtree(src, ignore_errors=True)
        try:
            os.rmdir(a.workdir)  # only if empty
        except OSError:
            pass

    # -- tables --
    def print_tables(self, moto: dict) -> None:
        n = self.ckpt_bytes
        base = self.baseline
        print(f"\n## S3 (moto server on 127.0.0.1) — synthetic DP-8 checkpoint, {n / 1e9:.2f} GB "
              f"({self.numel / 1e6:.0f}M params, fp32 master + exp_avg + exp_avg_sq), "
              f"median of {self.args.repeats}\n")
        print(f"baseline (python + import torch, s3fs, zero_ckpt, cli): peak RSS {fmt_mib(base)} MiB; "
              f"moto server: peak RSS {fmt_mib(moto.get('VmHWM'))} MiB, now {fmt_mib(moto.get('VmRSS'))} MiB\n")
        print("| job | wall s | MB/s | x floor (goal <= 1.3) | peak RSS MiB | above baseline MiB | notes |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for r in self.rows:
            if r["error"]:
                print(f"| {r['job']} | - | - | - | - | - | FAILED: {cell(r['error'])} |")
                continue
            t = r["seconds"]
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            above = f"{(r['rss'] - base) / MiB:,.0f}" if r["kind"] == "ours" and r["rss"] else "-"
            note = f"{r['bytes'] / 1e9:.2f} GB moved"
            print(f"| {r['job']} | {t:.2f} | {r['bytes'] / 1e6 / t:,.0f} | {ratio} | {fmt_mib(r['rss'])} | {above} | {note} |")

        print(f"\n### Load: bytes fetched per rank and time (ranks simulated one after another, client "
              f"connected before the first; checkpoint {n / 1e6:,.1f} MB)\n")
        print("| load | wire MB per rank min / median / max | checkpoint / M MB | max ÷ (ckpt / M) "
              "| GETs per rank (max) | ours s per rank median (max) | s3fs same ranges s per rank median (max) "
              "| x floor (sum over ranks) | checksum check s | peak RSS MiB (ours / floor) |")
        print("|---|---|---:|---:|---:|---|---|---:|---:|---|")
        for row in self.load_rows:
            M = row["M"]
            label = f"8 -> {M}" + (" (same size)" if M == 8 else " (resharded)")
            if "error" in row:
                print(f"| {label} | FAILED: {cell(row['error'])} | | | | | | | | |")
                continue
            wire = [r["wire_bytes"] for r in row["count"]["ranks"]]
            gets = max(r["gets"] for r in row["count"]["ranks"])
            share = n / M
            ours = _per_rank_median(row["ours"])
            floor = _per_rank_median(row["floor"])
            o_sum = med([r["seconds"] for r in row["ours"]])
            f_sum = med([r["seconds"] for r in row["floor"]])
            ver = med([r["verify_seconds"] for r in row["ours"]])
            print(f"| {label} | {min(wire) / 1e6:,.1f} / {med(wire) / 1e6:,.1f} / {max(wire) / 1e6:,.1f} "
                  f"| {share / 1e6:,.1f} | {max(wire) / share:.3f} | {gets} "
                  f"| {med(ours):.2f} ({max(ours):.2f}) | {med(floor):.2f} ({max(floor):.2f}) "
                  f"| {o_sum / f_sum:.2f} | {ver:.3f} "
                  f"| {fmt_mib(_med_rss(row['ours']))} / {fmt_mib(_med_rss(row['floor']))} |")
        for row in self.load_rows:
            if "error" in row:
                continue
            per = ", ".join(f"{r['wire_bytes'] / 1e6:.1f}" for r in row["count"]["ranks"])
            print(f"\n8 -> {row['M']}: wire MB per rank: {per}")

        print("\n### Async save: how long training is blocked (2 gloo ranks, ZeroOptimizer stage 2, Adam)\n")
        if isinstance(self.async_res, str):
            print(f"FAILED: {cell(self.async_res, 600)}")
            return
        res = self.async_res
        if not res:
            return
        state = 12 * self.async_params
        shard = sum(r.get("shard_bytes", 0) for r in res)

        def per_repeat(key):  # max over ranks, then median over repeats
            return med([max(v) for v in zip(*(r[key] for r in res))])

        idle = med([max(v) for v in zip(*(r["step_idle"] for r in res))])
        during = med([max(max(s) for s in v) if v else 0 for v in zip(*(r["step_during"] for r in res))])
        print(f"model: {self.async_params / 1e6:.2f}M params, {state / 1e6:.0f} MB of master + Adam state "
              f"({shard / 1e6:.0f} MB of shards over 2 ranks); max over ranks, median of {self.args.repeats}; "
              f"peak RSS per rank (max) {fmt_mib(max(r['rss'] for r in res))} MiB\n")
        print("| what | s |")
        print("|---|---:|")
        print(f"| blocking zero_ckpt.save (training blocked the whole time) | {per_repeat('blocking'):.3f} |")
        print(f"| async save: blocked until async_save(...) returns | {per_repeat('async_return'):.3f} |")
        print(f"| async save: first one (creates its gloo group), until it returns | "
              f"{max(r['first_async_return'] for r in res):.3f} |")
        print(f"| async save: wait() after {self.args.steps} training steps | {per_repeat('async_wait'):.3f} |")
        print(f"| async save: start to wait() returning | {per_repeat('async_total'):.3f} |")
        print(f"| floor: each rank s3fs.pipe_file of its partition bytes, concurrently | {per_repeat('floor'):.3f} |")
        print(f"| training step, no save in flight (median) | {idle:.3f} |")
        print(f"| training step while the async save uploads (slowest) | {during:.3f} |")
        blocking = per_repeat("blocking")
        print(f"\nblocked: async {per_repeat('async_return') / blocking * 100:.1f}% of a blocking save; "
              f"blocking save / plain s3fs floor: {blocking / per_repeat('floor'):.2f}x")


def _med_rss(results) -> int | None:
    if not results:
        return None
    vals = [r.get("rss") for r in results if r.get("rss")]
    return int(med(vals)) if vals else None


def _per_rank_median(results: list[dict]) -> list[float]:
    """Per rank, the median over repeats of its seconds."""
    return [med(v) for v in zip(*([r["seconds"] for r in res["ranks"]] for res in results))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=None, help="checkpoint size in GB (default 1.0; 0.1 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per job, median reported (default 3; 1 with --quick)")
    ap.add_argument("--steps", type=int, default=3, help="training steps run while an async save uploads")
    ap.add_argument("--workdir", default="/tmp/zc-s3-bench")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.1 GB, 1 repeat, tiny async model")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    ap.add_argument("--no-chunk-sensitivity", dest="chunk_sensitivity", action="store_false",
                    help="skip the info rows that rerun reshard/consolidate/verify with 64 MiB chunks")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, ROOT)
        raise SystemExit(child_entry(args.child, args.spec))
    if args.rank_job:
        sys.path.insert(0, ROOT)
        raise SystemExit(rank_entry(args.spec, args.result))
    if args.gb is None:
        args.gb = 0.1 if args.quick else 1.0
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    os.makedirs(args.workdir, exist_ok=True)
    sys.path.insert(0, TESTS)
    from s3server import MotoServer

    server = MotoServer().start()  # 127.0.0.1 only; sets fake AWS credentials in os.environ
    try:
        bench = Bench(args, server.endpoint, server.new_bucket())
        bench.run()
        moto = proc_status(server.process.pid)
    finally:
        server.stop()
    bench.print_tables(moto)


if __name__ == "__main__":
    main()
