"""Benchmark: ZeroOptimizer (stage 1/2) against DDP + Adam, torch's ZeroRedundancyOptimizer and
DeepSpeed ZeRO-1/2; optimizer bytes per rank; zero_ckpt save/load against torch.save.

Run by hand (not a test), on a quiet machine:

    .venv/bin/python bench/bench_optimizer.py                       # ~50M params, 2 gloo ranks
    .venv/bin/python bench/bench_optimizer.py --quick               # ~5M params, smoke run
    .venv/bin/python bench/bench_optimizer.py --skip-deepspeed --workdir /tmp/zo-bench

Prints three markdown tables:

1. step time (median of ``--steps`` timed steps after ``--warmup`` warm-up steps; one step is
   forward + backward + optimizer step, as each framework does it) and peak RSS per rank
   (VmHWM of /proc/self/status, max over ranks) for: baselines (a process that only built the
   model; the same plus forward/backward with no optimizer), DDP + torch.optim.Adam, DDP +
   torch.distributed.optim.ZeroRedundancyOptimizer(Adam), ZeroOptimizer stage 1 and 2,
   DeepSpeed ZeRO-1 and ZeRO-2 (run under ``.venv-peers/bin/python`` with its own baseline,
   since importing deepspeed costs memory of its own).
2. ZeroOptimizer's own bytes per rank (masters + Adam moments, read through the bridge methods
   ``master_partition(g)`` / ``state_partitions(g)``) against the minimum 12 * ceil(P / W).
3. zero_ckpt.save / zero_ckpt.load (same world size, and resharded 2 -> 1) against torch.save /
   torch.load of the same partitions, and a single-process torch.save of the full model
   state_dict + a plain Adam state_dict.

Method:
* Every configuration runs in fresh processes (one per rank, launched by this script with
  RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set; gloo), so its peak RSS is its own.
* Same model for all: a stack of fp32 nn.Linear layers with odd sizes (ReLU between), built
  under torch.manual_seed(0); a fixed random batch per rank (seed 1000 + rank), MSE loss;
  Adam(lr=1e-3) with torch's defaults everywhere (DeepSpeed: ``torch_adam: true``).
* One compute thread per rank (torch.set_num_threads(1)): 2 ranks on the 2-core build machine.
* A step's time is the max over ranks of that step (ranks are barrier-aligned before each
  step), then the median over steps.
* Checkpoint timings: median of ``--ckpt-repeats``; warm page cache. zero_ckpt fsyncs its
  files (ZERO_CKPT_FSYNC, default on) and checksums them, so the torch.save references are
  timed with flush + os.fsync too. Load times include copying into the live partitions.

Each framework is run as it ships (defaults: DDP bucket_cap_mb=25; ZeroRedundancyOptimizer
without parameters_as_bucket_view; DeepSpeed's default bucket sizes; ZeroOptimizer's
default bucket_numel). If a configuration fails, its row shows the error instead.
"""

from __future__ import annotations

import argparse
import json
import math
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
DEFAULT_PEERS_PY = os.path.join(ROOT, ".venv-peers", "bin", "python")

# Layer widths (odd sizes, fp32, bias=True): ~49.5M and ~5.1M parameters.
FULL_DIMS = [1531, 2039, 2053, 2027, 2063, 2017, 2081, 2011, 2069, 2003, 2087, 1999, 1531, 1021]
QUICK_DIMS = [509, 1021, 1019, 1013, 1009, 997, 503]
BATCH_PER_RANK = 32
LR = 1e-3
MiB = 1 << 20

# (name, label, interpreter: "main" | "peers", world size)
TRAIN_CONFIGS = [
    ("baseline", "baseline: model built only", "main"),
    ("fwdbwd", "baseline: model + fwd/bwd, no optimizer, no comm", "main"),
    ("ddp_adam", "DDP + torch.optim.Adam", "main"),
    ("ddp_zro", "DDP + torch ZeroRedundancyOptimizer(Adam)", "main"),
    ("zero1", "ZeroOptimizer stage 1 (Adam)", "main"),
    ("zero2", "ZeroOptimizer stage 2 (Adam)", "main"),
    ("zero2_copy", "ZeroOptimizer stage 2 (Adam), master_copy=True", "main"),
    ("ddp_zro_fused", "DDP + torch ZeroRedundancyOptimizer(Adam, fused=True)", "main"),
    ("zero2_fused", "ZeroOptimizer stage 2 (Adam, fused=True)", "main"),
    ("zero1_offload", "ZeroOptimizer stage 1 (Adam), offload='cpu'", "main"),
    ("zero2_offload", "ZeroOptimizer stage 2 (Adam), offload='cpu'", "main"),
    ("ds_baseline", "baseline (peers venv): deepspeed imported + model built", "peers"),
    ("ds1", "DeepSpeed ZeRO-1 (torch Adam, fp32)", "peers"),
    ("ds2", "DeepSpeed ZeRO-2 (torch Adam, fp32)", "peers"),
]


# ===== shared by every worker (main and peers venvs): model, data, measurements =============


def model_dims(quick: bool) -> list[int]:
    return QUICK_DIMS if quick else FULL_DIMS


def n_params(dims: list[int]) -> int:
    return sum(a * b + b for a, b in zip(dims, dims[1:]))


def build_model(dims: list[int]):
    import torch

    torch.manual_seed(0)
    layers: list = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def make_batch(dims: list[int], rank: int):
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(BATCH_PER_RANK, dims[0], generator=g)
    y = torch.randn(BATCH_PER_RANK, dims[-1], generator=g)
    return x, y


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def tensor_bytes(obj) -> int:
    """Sum of nbytes of every tensor reachable in nested dicts/lists (optimizer state)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def torch_optimizer_state_bytes(opt) -> int:
    return sum(tensor_bytes(s) for s in opt.state.values())


# ===== worker side ===========================================================================


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.dims = model_dims(args.quick)
        self.result: dict = {"rank": self.rank, "world_size": self.world_size}

    # -- helpers --
    def init_dist(self, deepspeed_mod=None) -> None:
        import torch.distributed as dist

        if deepspeed_mod is not None:
            deepspeed_mod.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group("gloo")
        self.result["backend"] = str(dist.get_backend())

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def timed_collective(self, fn):
        """Barrier, run fn, return (result, seconds on this rank)."""
        self.barrier()
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    def run_steps(self, step_fn) -> list[float]:
        times = []
        for i in range(self.args.warmup + self.args.steps):
            self.barrier()
            t0 = time.perf_counter()
            step_fn()
            dt = time.perf_counter() - t0
            if i >= self.args.warmup:
                times.append(dt)
        return times

    # -- configurations --
    def run(self, config: str) -> None:
        import torch

        torch.set_num_threads(1)
        fn = getattr(self, "cfg_" + config)
        fn()
        self.result["rss"] = vm_hwm_bytes()

    def cfg_baseline(self) -> None:
        self.init_dist()
        self.model = build_model(self.dims)

    def cfg_fwdbwd(self) -> None:
        import torch

        self.init_dist()
        model = build_model(self.dims)
        x, y = make_batch(self.dims, self.rank)

        def step():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()

        self.result["step_times"] = self.run_steps(step)

    def cfg_ddp_adam(self) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.init_dist()
        model = DDP(build_model(self.dims))
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        x, y = make_batch(self.dims, self.rank)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

        self.result["step_times"] = self.run_steps(step)
        # Plain Adam: the params are the model's, so its own bytes are the two moments.
        self.result["opt_bytes"] = torch_optimizer_state_bytes(opt)

    def cfg_ddp_zro(self, **adam_options) -> None:
        import torch
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.init_dist()
        model = DDP(build_model(self.dims))
        opt = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.Adam, lr=LR, **adam_options
        )
        x, y = make_batch(self.dims, self.rank)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

        self.result["step_times"] = self.run_steps(step)
        # Moments of the whole params this rank owns (torch shards by whole parameters).
        self.result["opt_bytes"] = torch_optimizer_state_bytes(opt.optim)

    def _zero_optimizer(self, model, stage: int, **options):
        import torch
        from zero_core import ZeroOptimizer

        return ZeroOptimizer(model.named_parameters(), torch.optim.Adam, stage=stage, lr=LR, **options)

    def _zero_train(self, stage: int, **options) -> None:
        import torch

        self.init_dist()
        model = build_model(self.dims)
        opt = self._zero_optimizer(model, stage, **options)
        x, y = make_batch(self.dims, self.rank)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

        self.result["step_times"] = self.run_steps(step)
        # Measured right after a step: every buffer the optimizer keeps across steps exists.
        self.result["zero_bytes"] = zero_optimizer_bytes(opt)
        self.result["memory_report"] = opt.memory_report()
        self.result["formula"] = zero_formula_bytes(opt)
        self.result["opt_bytes"] = self.result["zero_bytes"]["master_and_state"]

    def cfg_zero1(self) -> None:
        self._zero_train(1)

    def cfg_zero2(self) -> None:
        self._zero_train(2)

    def cfg_zero2_fused(self) -> None:
        self._zero_train(2, fused=True)

    def cfg_ddp_zro_fused(self) -> None:
        self.cfg_ddp_zro(fused=True)

    def cfg_zero2_copy(self) -> None:
        self._zero_train(2, master_copy=True)

    def cfg_zero1_offload(self) -> None:
        self._zero_train(1, offload="cpu")

    def cfg_zero2_offload(self) -> None:
        self._zero_train(2, offload="cpu")

    # -- DeepSpeed (peers venv) --
    def cfg_ds_baseline(self) -> None:
        import deepspeed

        self.init_dist(deepspeed)
        self.model = build_model(self.dims)

    def _ds_train(self, stage: int) -> None:
        import deepspeed
        import torch

        self.init_dist(deepspeed)
        model = build_model(self.dims)
        config = {
            "train_batch_size": BATCH_PER_RANK * self.world_size,
            "train_micro_batch_size_per_gpu": BATCH_PER_RANK,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "Adam", "params": {"lr": LR, "torch_adam": True}},
            "steps_per_print": 10**9,
        }
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        x, y = make_batch(self.dims, self.rank)

        def step():
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()  # also zeroes the grads

        self.result["step_times"] = self.run_steps(step)
        try:  # fp32 master partition + torch Adam's moments (DeepSpeedZeroOptimizer internals)
            zo = engine.optimizer
            masters = sum(tensor_bytes(t) for t in zo.single_partition_of_fp32_groups)
            self.result["opt_bytes"] = masters + torch_optimizer_state_bytes(zo.optimizer)
        except Exception as exc:  # noqa: BLE001 - internals differ between versions
            self.result["opt_bytes_error"] = repr(exc)

    def cfg_ds1(self) -> None:
        self._ds_train(1)

    def cfg_ds2(self) -> None:
        self._ds_train(2)

    # -- checkpoints --
    def _train_a_few(self, model, opt, n: int = 3) -> None:
        import torch

        x, y = make_batch(self.dims, self.rank)
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    def cfg_ckpt_save_load(self) -> None:
        """World size 2, stage 2: zero_ckpt.save / load and per-rank torch.save / torch.load."""
        import torch
        import zero_ckpt

        self.init_dist()
        model = build_model(self.dims)
        opt = self._zero_optimizer(model, 2)
        self._train_a_few(model, opt)
        opt.zero_grad(set_to_none=True)
        ckdir = self.args.ckpt_dir
        reps = self.args.ckpt_repeats
        res = self.result

        save_t = []
        for i in range(reps):
            path = os.path.join(ckdir, f"zc-{i}")
            _, dt = self.timed_collective(lambda: zero_ckpt.save(path, optimizer=opt, model=model))
            save_t.append(dt)
        res["zc_save"] = save_t
        keep = os.path.join(ckdir, "zc-0")
        if self.rank == 0:
            res["zc_bytes"] = dir_bytes(keep)
            for i in range(1, reps):
                shutil.rmtree(os.path.join(ckdir, f"zc-{i}"), ignore_errors=True)
        load_t, read = [], []
        for _ in range(reps):
            lr, dt = self.timed_collective(lambda: zero_ckpt.load(keep, optimizer=opt, model=model))
            load_t.append(dt)
            read.append(lr.bytes_read)
        res["zc_load"] = load_t
        res["zc_load_bytes_read"] = read[-1]

        # Reference: each rank torch.saves its master + state partitions (padding included,
        # as they live) to its own file, fsynced; then torch.load + copy into the partitions.
        def own_tensors():
            out = {}
            for g in range(len(opt.layouts)):
                out[f"g{g}.master"] = opt.master_partition(g)
                for k, t in opt.state_partitions(g).items():
                    out[f"g{g}.{k}"] = t
            return out

        ts_t, tl_t = [], []
        for i in range(reps):
            path = os.path.join(ckdir, f"ts-{i}-rank{self.rank}.pt")
            _, dt = self.timed_collective(lambda: torch_save_fsync(own_tensors(), path))
            ts_t.append(dt)
        res["ts_bytes"] = os.path.getsize(os.path.join(ckdir, f"ts-0-rank{self.rank}.pt"))

        def torch_load_into(path):
            data = torch.load(path, weights_only=True)
            live = own_tensors()
            with torch.no_grad():
                for k, t in data.items():
                    live[k].copy_(t)

        for i in range(reps):
            path = os.path.join(ckdir, f"ts-{i}-rank{self.rank}.pt")
            _, dt = self.timed_collective(lambda: torch_load_into(path))
            tl_t.append(dt)
        res["ts_save"], res["ts_load"] = ts_t, tl_t
        self.barrier()
        for i in range(reps):
            os.remove(os.path.join(ckdir, f"ts-{i}-rank{self.rank}.pt"))

    def cfg_ckpt_reshard_load(self) -> None:
        """World size 1: load the 2-rank checkpoint (resharded on read); then the single-process
        reference, torch.save / torch.load of the full model state_dict + plain Adam state_dict."""
        import torch
        import zero_ckpt

        self.init_dist()
        ckdir = self.args.ckpt_dir
        reps = self.args.ckpt_repeats
        res = self.result
        model = build_model(self.dims)
        opt = self._zero_optimizer(model, 2)
        keep = os.path.join(ckdir, "zc-0")
        load_t, read = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            lr = zero_ckpt.load(keep, optimizer=opt, model=model)
            load_t.append(time.perf_counter() - t0)
            read.append(lr.bytes_read)
        res["zc_reshard_load"] = load_t
        res["zc_reshard_bytes_read"] = read[-1]
        res["zc_reshard_step"] = opt.group_scalars(0).get("step")
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
        del opt, model

        model = build_model(self.dims)
        adam = torch.optim.Adam(model.parameters(), lr=LR)
        self._train_a_few(model, adam, 1)
        adam.zero_grad(set_to_none=True)
        ts_t, tl_t = [], []
        for i in range(reps):
            path = os.path.join(ckdir, f"full-{i}.pt")
            t0 = time.perf_counter()
            torch_save_fsync({"model": model.state_dict(), "optimizer": adam.state_dict()}, path)
            ts_t.append(time.perf_counter() - t0)
        res["full_bytes"] = os.path.getsize(os.path.join(ckdir, "full-0.pt"))
        for i in range(reps):
            path = os.path.join(ckdir, f"full-{i}.pt")
            t0 = time.perf_counter()
            sd = torch.load(path, weights_only=True)
            model.load_state_dict(sd["model"])
            adam.load_state_dict(sd["optimizer"])
            tl_t.append(time.perf_counter() - t0)
            del sd
        res["full_save"], res["full_load"] = ts_t, tl_t
        for i in range(reps):
            os.remove(os.path.join(ckdir, f"full-{i}.pt"))


def zero_formula_bytes(opt) -> int:
    """What ZeroOptimizer should hold on this rank, from the layout and its options alone:
    masters (4P only with master_copy=True for this fp32 model) + Adam's two fp32 moments (8P) +
    the fp32 partition gradient (4P) + stage 1: the flat gradient buffer (W*P) and the
    reduce-scatter output (P) in the model dtype / stage 2: (max_in_flight + 1) buffers of the
    largest planned bucket (at most bucket_numel elements; + a P-element output when a bucket
    spans every partition equally, never with this model's bucket size)."""
    total = 0
    W = opt.world_size
    for g, layout in enumerate(opt.layouts):
        P = layout.partition_numel
        elem = opt.group_params(g)[0].element_size()
        total += (4 * P if opt.master_copy else 0) + 8 * P + 4 * P  # fp32 model: shared unless True
        if opt.stage == 1:
            total += elem * W * P  # gloo: in-place all-reduce, no reduce-scatter output
    if opt.stage == 2:
        from zero_core._grad_reduce import plan_buckets  # the pure bucket plan (private module)

        largest = max(b.numel for layout in opt.layouts for b in plan_buckets(layout, opt.bucket_numel))
        elem = opt.group_params(0)[0].element_size()
        # max_in_flight (2) + 1 buffers of the largest bucket, and on gloo a receive buffer
        # per peer for each bucket in flight
        total += (3 + 2 * (W - 1)) * largest * elem
    return total


def zero_optimizer_bytes(opt) -> dict:
    """Bytes ZeroOptimizer holds on this rank, by kind.

    * ``master_and_state``: fp32 master partition + every elementwise state tensor (Adam's
      exp_avg, exp_avg_sq), read through the bridge methods ``master_partition(g)`` /
      ``state_partitions(g)``: the figure compared with 12 * ceil(P / W).
    * ``grad_partition``: the fp32 gradient partition (``partition_numel`` per group) the
      reducer averages gradients into and hands the wrapped optimizer as ``master.grad``;
      it exists between backward and zero_grad (set_to_none frees it), stage 1 and 2 alike.
      Private attribute (``_reducer.part_grads``), so reported separately and best-effort.
    * ``flat_model``: the model-dtype flat buffer the model's params become views of
      (``padded_numel`` per group). This REPLACES the params' own storage (they are rebound),
      so it is the model itself plus padding, not an extra copy; reported for completeness.
    """
    out = {"master_and_state": 0, "master": 0, "state": 0, "padded_numel": 0,
           "partition_numel": 0, "state_keys": []}
    for g, layout in enumerate(opt.layouts):
        m = opt.master_partition(g)
        out["master"] += m.numel() * m.element_size()
        states = opt.state_partitions(g)
        out["state"] += sum(t.numel() * t.element_size() for t in states.values())
        out["state_keys"] = sorted(set(out["state_keys"]) | set(states))
        out["padded_numel"] += layout.padded_numel
        out["partition_numel"] += layout.partition_numel
    out["master_and_state"] = out["master"] + out["state"]
    out["flat_model"] = sum(
        layout.padded_numel * p[0].element_size()
        for g, layout in enumerate(opt.layouts)
        for p in [opt.group_params(g)]
        if p
    )
    try:
        parts = opt._reducer.part_grads  # private: best effort
        out["grad_partition"] = sum(t.numel() * t.element_size() for t in parts if t is not None)
    except AttributeError:
        out["grad_partition"] = None
    return out


def torch_save_fsync(obj, path: str) -> None:
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def dir_bytes(path: str) -> int:
    total = 0
    for base, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    return total


def worker_main(args: argparse.Namespace) -> int:
    w = Worker(args)
    try:
        w.run(args.worker)
        w.result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        w.result["ok"] = False
        w.result["error"] = f"{type(exc).__name__}: {exc}"
        w.result["traceback"] = traceback.format_exc()
        traceback.print_exc()
    with open(os.path.join(args.result_dir, f"rank{w.rank}.json"), "w") as f:
        json.dump(w.result, f)
    try:
        import torch.distributed as dist

        if w.result["ok"] and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0 if w.result["ok"] else 1


# ===== parent side ===========================================================================


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failed(Exception):
    pass


def launch(args, config: str, python: str, world_size: int, extra_env: dict | None = None) -> list[dict]:
    """Run ``config`` in ``world_size`` fresh processes; return their result dicts (rank order).

    Raises Failed with a one-line reason if any rank fails or the job times out.
    """
    result_dir = tempfile.mkdtemp(prefix=f"{config}-", dir=args.workdir)
    log_dir = os.path.join(args.workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    base_env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    cmd = [python, os.path.abspath(__file__), "--worker", config, "--result-dir", result_dir,
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--ckpt-dir", args.ckpt_dir, "--ckpt-repeats", str(args.ckpt_repeats)]
    if args.quick:
        cmd.append("--quick")
    procs, logs = [], []
    for r in range(world_size):
        env = {**base_env, "RANK": str(r), "LOCAL_RANK": str(r)}
        log = open(os.path.join(log_dir, f"{config}-rank{r}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=args.workdir))
    deadline = time.monotonic() + args.timeout
    failed_at = None
    killed: set[int] = set()
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now  # give the others a moment to report, then stop them
            if now > deadline or (failed_at is not None and now - failed_at > 10):
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        killed.add(r)
                for p in procs:
                    p.wait()
                break
            time.sleep(0.2)
    except BaseException:  # Ctrl-C etc.: do not leave this job's ranks behind
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        raise
    finally:
        for log in logs:
            log.close()
    results, errors = [], []
    for r, p in enumerate(procs):
        path = os.path.join(result_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
            results.append(res)
            if not res.get("ok"):
                errors.append(f"rank {r}: {res.get('error')}")
        else:
            tail = log_tail(os.path.join(log_dir, f"{config}-rank{r}.log"))
            if r in killed:
                why = "timed out, killed" if failed_at is None else "killed after another rank failed"
            else:
                why = f"exit {p.returncode}"
            errors.append(f"rank {r} {why}: {tail}")
    shutil.rmtree(result_dir, ignore_errors=True)
    if errors:
        raise Failed("; ".join(errors))
    return results


def log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def cell(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def step_stats(results: list[dict]) -> tuple[float, float, float] | None:
    per_rank = [r.get("step_times") for r in results]
    if not per_rank or any(t is None for t in per_rank):
        return None
    per_step = [max(ts) for ts in zip(*per_rank)]  # a step ends when its slowest rank does
    return statistics.median(per_step), min(per_step), max(per_step)


def med(xs) -> float:
    return statistics.median(xs)


def max_over_ranks(results: list[dict], key: str) -> list[float]:
    """Per repeat, the max over ranks of a list of timings."""
    return [max(ts) for ts in zip(*(r[key] for r in results))]


def run_training_table(args, P: int) -> tuple[list[str], dict]:
    rows = []
    outcomes: dict[str, list[dict] | str] = {}
    for name, label, venv in TRAIN_CONFIGS:
        if args.configs and name not in args.configs:
            continue
        if venv == "peers" and args.skip_deepspeed:
            outcomes[name] = "skipped (--skip-deepspeed)"
            continue
        python = sys.executable if venv == "main" else args.peers_python
        extra_env = {"DS_ACCELERATOR": "cpu"} if venv == "peers" else None
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            if venv == "peers" and not os.path.exists(python):
                raise Failed(f"peers interpreter not found: {python}")
            outcomes[name] = launch(args, name, python, 2, extra_env)
        except Failed as exc:
            outcomes[name] = str(exc)
        print(f"[bench] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    def baseline_rss(key: str):
        res = outcomes.get(key)
        return max(r["rss"] for r in res) if isinstance(res, list) else None

    base_main, base_peers = baseline_rss("baseline"), baseline_rss("ds_baseline")
    header = ("| configuration | step s (median) | step s (min-max) | peak RSS/rank MiB (max) "
              "| over own baseline MiB | optimizer-held bytes/rank MiB (max) | notes |")
    rows += [header, "|" + "---|" * 7]
    for name, label, venv in TRAIN_CONFIGS:
        if name not in outcomes:
            continue
        res = outcomes[name]
        if isinstance(res, str):
            rows.append(f"| {label} | - | - | - | - | - | FAILED: {cell(res)} |")
            continue
        rss = max(r["rss"] for r in res)
        base = base_peers if venv == "peers" else base_main
        stats = step_stats(res)
        opt_b = [r.get("opt_bytes") for r in res]
        notes = []
        if any(r.get("opt_bytes_error") for r in res):
            notes.append("optimizer bytes n/a: " + cell(res[0].get("opt_bytes_error"), 120))
        backends = sorted({str(r.get("backend")) for r in res if r.get("backend")})
        if backends and backends != ["gloo"]:
            notes.append("backend " + ",".join(backends))
        if name in ("baseline", "ds_baseline"):
            notes.append("reference for the 'over baseline' column")
            over = "-"
        else:
            over = mib(rss - base) if base is not None else "-"
        rows.append(
            f"| {label} | {f'{stats[0]:.3f}' if stats else '-'} "
            f"| {f'{stats[1]:.3f}-{stats[2]:.3f}' if stats else '-'} | {mib(rss)} | {over} "
            f"| {mib(max(opt_b)) if all(b is not None for b in opt_b) else '-'} | {'; '.join(notes)} |"
        )
    rows.append("")
    rows.append(f"P = {P:,} params, fp32 (model {P * 4 / MiB:,.1f} MiB); world size 2, gloo; "
                f"batch {BATCH_PER_RANK}/rank; {args.steps} timed steps after {args.warmup} "
                f"warm-up; 1 thread/rank. 'optimizer-held bytes': DDP+Adam: Adam moments; "
                f"ZeroRedundancyOptimizer: moments of the params this rank owns; ZeroOptimizer: "
                f"master_partition + state_partitions; DeepSpeed: fp32 partition + moments. "
                f"Gradients/buckets are not included (see the next table for ZeroOptimizer's).")
    return rows, outcomes


def zero_bytes_table(P: int, outcomes: dict) -> list[str]:
    W = 2
    minimum = 12 * math.ceil(P / W)
    rows = [
        f"Every tensor ZeroOptimizer keeps across steps on a rank (``memory_report()``, counted "
        f"from the live tensors, max over ranks) against the formula from the layout and options "
        f"alone (``zero_formula_bytes``). For reference, fp32 master + exp_avg + exp_avg_sq alone "
        f"is 12 x ceil(P / W) = {minimum:,} bytes ({minimum / MiB:,.2f} MiB).",
        "",
        "| configuration | owned bytes/rank (MiB) | formula (MiB) | owned / formula | masters | states "
        "| partition grads | stage-1 flat grads + scratch | stage-2 bucket pool | host grads |",
        "|" + "---|" * 10,
    ]
    for name, label in (("zero1", "ZeroOptimizer stage 1"), ("zero2", "ZeroOptimizer stage 2"),
                        ("zero2_copy", "ZeroOptimizer stage 2, master_copy=True"),
                        ("zero2_fused", "ZeroOptimizer stage 2, fused Adam"),
                        ("zero1_offload", "ZeroOptimizer stage 1, offload"),
                        ("zero2_offload", "ZeroOptimizer stage 2, offload")):
        res = outcomes.get(name)
        if res is None:
            continue
        if isinstance(res, str):
            rows.append(f"| {label} | FAILED: {cell(res, 200)} |" + " - |" * 9)
            continue
        rep = max((r["memory_report"] for r in res), key=lambda m: m["total"])
        formula = max(r["formula"] for r in res)
        rows.append(
            f"| {label} | {mib(rep['total'])} | {mib(formula)} | {rep['total'] / formula:.4f} "
            f"| {mib(rep['masters'])} | {mib(rep['states'])} | {mib(rep['partition_grads'])} "
            f"| {mib(rep['flat_grads'] + rep['scratch'])} | {mib(rep['bucket_pool'])} "
            f"| {mib(rep['host_grads'])} |"
        )
    rows += [
        "",
        "The model's params are views of one flat model-dtype buffer per group (their own "
        "storage, padded to W x partition_numel), not counted here. Offload: masters, states "
        "and the step live in host memory; on a CPU-only machine the partition gradient is "
        "already in host memory, so no extra host gradient buffer exists.",
    ]
    return rows


def run_checkpoint_table(args, P: int) -> list[str]:
    rows = ["| operation | world size | time s (median) | bytes | MB/s | bytes read/rank | notes |",
            "|" + "---|" * 7]
    print("[bench] ckpt_save_load ...", file=sys.stderr, flush=True)
    try:
        res2 = launch(args, "ckpt_save_load", sys.executable, 2)
    except Failed as exc:
        rows.append(f"| zero_ckpt.save / load, torch.save references | 2 | - | - | - | - | FAILED: {cell(exc)} |")
        return rows
    print("[bench] ckpt_reshard_load ...", file=sys.stderr, flush=True)
    try:
        res1 = launch(args, "ckpt_reshard_load", sys.executable, 1)
    except Failed as exc:
        res1 = str(exc)

    def rate(nbytes, seconds):
        return f"{nbytes / seconds / 1e6:,.0f}" if seconds > 0 else "-"

    zc_bytes = res2[0]["zc_bytes"]
    ts_bytes = sum(r["ts_bytes"] for r in res2)
    t = med(max_over_ranks(res2, "zc_save"))
    rows.append(f"| zero_ckpt.save (stage 2) | 2 | {t:.3f} | {zc_bytes:,} | {rate(zc_bytes, t)} | - "
                f"| safetensors shards + manifest, fsync + checksums |")
    t = med(max_over_ranks(res2, "zc_load"))
    read = max(r["zc_load_bytes_read"] for r in res2)
    rows.append(f"| zero_ckpt.load, same size | 2 -> 2 | {t:.3f} | {zc_bytes:,} | {rate(zc_bytes, t)} "
                f"| {read:,} | checksums verified; model synced from masters |")
    if isinstance(res1, str):
        rows.append(f"| zero_ckpt.load, resharded | 2 -> 1 | - | - | - | - | FAILED: {cell(res1)} |")
    else:
        r1 = res1[0]
        t = med(r1["zc_reshard_load"])
        rows.append(f"| zero_ckpt.load, resharded | 2 -> 1 | {t:.3f} | {zc_bytes:,} | {rate(zc_bytes, t)} "
                    f"| {r1['zc_reshard_bytes_read']:,} | restored step = {r1['zc_reshard_step']} |")
    t = med(max_over_ranks(res2, "ts_save"))
    rows.append(f"| torch.save, each rank its master+state partitions | 2 | {t:.3f} | {ts_bytes:,} "
                f"| {rate(ts_bytes, t)} | - | pickle, fsync, padding included |")
    t = med(max_over_ranks(res2, "ts_load"))
    rows.append(f"| torch.load of those + copy into partitions | 2 -> 2 | {t:.3f} | {ts_bytes:,} "
                f"| {rate(ts_bytes, t)} | {max(r['ts_bytes'] for r in res2):,} | same size only |")
    if not isinstance(res1, str):
        r1 = res1[0]
        fb = r1["full_bytes"]
        t = med(r1["full_save"])
        rows.append(f"| torch.save, full model state_dict + plain Adam state_dict | 1 | {t:.3f} "
                    f"| {fb:,} | {rate(fb, t)} | - | single process, fsync |")
        t = med(r1["full_load"])
        rows.append(f"| torch.load of it + load_state_dict (model, Adam) | 1 | {t:.3f} | {fb:,} "
                    f"| {rate(fb, t)} | {fb:,} | |")
    rows += ["", f"P = {P:,} params; checkpoints after 3 Adam steps; median of "
             f"{args.ckpt_repeats} repeats, time is the slowest rank's; warm page cache; "
             f"workdir {args.workdir} ({fs_type(args.workdir)})."]
    return rows


def fs_type(path: str) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def parent_main(args: argparse.Namespace) -> int:
    dims = model_dims(args.quick)
    P = n_params(dims)
    own_workdir = args.workdir is None
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="zo-bench-", dir="/tmp"))
    os.makedirs(args.workdir, exist_ok=True)
    args.ckpt_dir = os.path.join(args.workdir, "ckpt")
    os.makedirs(args.ckpt_dir, exist_ok=True)
    print(f"[bench] P = {P:,} params ({'quick' if args.quick else 'full'}), workdir {args.workdir}",
          file=sys.stderr, flush=True)
    out = [f"# bench_optimizer ({'--quick, ' if args.quick else ''}P = {P:,}, world size 2, gloo, "
           f"torch {torch_version()}, {os.cpu_count()} cores)", ""]
    ok = True
    try:
        if not args.skip_training:
            out += ["## 1. Step time and peak RSS per rank", ""]
            rows, outcomes = run_training_table(args, P)
            out += rows + [""]
            if "zero1" in outcomes or "zero2" in outcomes:
                out += ["## 2. ZeroOptimizer's own bytes per rank", ""]
                out += zero_bytes_table(P, outcomes) + [""]
            ok = not any(isinstance(v, str) and not v.startswith("skipped") for v in outcomes.values())
        if not args.skip_checkpoint:
            out += ["## 3. Checkpoint save / load (ZeroOptimizer stage 2, 50M-class model)"
                    if not args.quick else "## 3. Checkpoint save / load (ZeroOptimizer stage 2)", ""]
            out += run_checkpoint_table(args, P) + [""]
    finally:
        print("\n".join(out))
        if args.keep_workdir:
            print(f"[bench] kept {args.workdir} (logs under logs/)", file=sys.stderr)
        else:
            shutil.rmtree(args.ckpt_dir, ignore_errors=True)
            shutil.rmtree(os.path.join(args.workdir, "logs"), ignore_errors=True)
            if own_workdir or not os.listdir(args.workdir):
                shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if ok else 1


def torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~5M-param model (smoke run)")
    ap.add_argument("--workdir", help="scratch directory (default: a new one under /tmp); "
                    "its checkpoints and logs are removed at the end")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs and checkpoints")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps (default 2)")
    ap.add_argument("--ckpt-repeats", type=int, default=3, help="repeats per checkpoint timing")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--peers-python", default=DEFAULT_PEERS_PY,
                    help="interpreter with deepspeed (default .venv-peers/bin/python)")
    ap.add_argument("--skip-deepspeed", action="store_true")
    ap.add_argument("--skip-training", action="store_true", help="only the checkpoint table")
    ap.add_argument("--skip-checkpoint", action="store_true", help="only tables 1 and 2")
    ap.add_argument("--configs", nargs="*", help="subset of: " + " ".join(c[0] for c in TRAIN_CONFIGS))
    # internal: worker mode
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
