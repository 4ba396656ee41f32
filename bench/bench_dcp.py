"""Benchmark: consolidating a PyTorch DCP checkpoint, `zero-ckpt consolidate` against torch's
`dcp_to_torch_save`: whole-process wall time and peak RSS.

Run by hand (not a test):

    .venv/bin/python bench/bench_dcp.py --params 350e6 --workdir /tmp/zc-dcp

Writes (once; reused if present) a DCP checkpoint of a model of --params fp32 parameters (a
stack of square Linear layers, no bias) plus Adam state after one step, as
``dcp.save({"model": msd, "optim": osd})`` with ``get_state_dict`` writes it, from --ranks
gloo ranks with each layer sharded FSDP2-style on dim 0 (``distribute_tensor(..., Shard(0))``),
so every rank writes its own ``__r_0.distcp``. Then times, each a fresh process, median of
--repeats with a warm page cache:

* ``python -c dcp_to_torch_save(SRC, OUT/full.pt)`` (torch's tool: loads everything, one .pt);
* ``zero-ckpt consolidate SRC OUT --include-optimizer`` (model.safetensors + optimizer.safetensors:
  the same tensors plus each param's master again under ``{param}.master``, streamed and fsynced;
  every record's zip CRC-32 checked as its bytes pass); and the same with
  ``ZERO_CKPT_FSYNC=0`` (``torch.save`` does not fsync either).

Peak RSS is the child's ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = os.path.join(os.path.dirname(sys.executable), "zero-ckpt")

_WRITER = r'''
import os, sys, math, torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard
path, params, world = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (world,))
width = 2048
layers = max(1, round(params / (width * width)))
torch.manual_seed(0)
names = [f"layers.{i}.weight" for i in range(layers)]
model, optim = {}, {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
        "weight_decay": 0.0, "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
        "differentiable": False, "fused": None, "decoupled_weight_decay": False, "params": names}]}
for n in names:
    full = torch.randn(width, width)
    model[n] = distribute_tensor(full, mesh, [Shard(0)])
    optim["state"][n] = {
        "exp_avg": distribute_tensor(full * 0.1, mesh, [Shard(0)]),
        "exp_avg_sq": distribute_tensor(full * full * 1e-3, mesh, [Shard(0)]),
        "step": torch.tensor(1.0),
    }
dcp.save({"model": model, "optim": optim}, checkpoint_id=path)
dist.destroy_process_group()
if rank == 0:
    print(layers * width * width)
'''


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a fresh child process."""
    t0 = time.perf_counter()
    # each measured command runs under its own wrapper process, so ru_maxrss is that command's
    wrapped = [sys.executable, "-c",
               "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *cmd]
    out = subprocess.run(wrapped, check=True, capture_output=True, text=True, env=env).stdout
    wall = time.perf_counter() - t0
    return wall, int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=350e6)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/zc-dcp")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, f"dcp-{int(args.params / 1e6)}m-{args.ranks}r")
    if not os.path.exists(os.path.join(src, ".metadata")):
        shutil.rmtree(src, ignore_errors=True)
        script = os.path.join(args.workdir, "write_dcp.py")
        with open(script, "w") as f:
            f.write(_WRITER)
        t0 = time.perf_counter()
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                        f"--nproc-per-node={args.ranks}", script, src, str(args.params), str(args.ranks)],
                       check=True, stdout=subprocess.DEVNULL)
        print(f"wrote {src} in {time.perf_counter() - t0:.1f} s")
    nbytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    width = 2048
    nparams = max(1, round(args.params / (width * width))) * width * width
    subprocess.run(f"cat {src}/* > /dev/null", shell=True, check=True)
    rows: dict[str, list[tuple[float, float]]] = {
        "torch dcp_to_torch_save": [],
        "zero-ckpt consolidate": [],
        "zero-ckpt consolidate, no fsync": [],
    }
    for i in range(args.repeats):
        for name in rows:
            out = os.path.join(args.workdir, f"out-{i}")
            shutil.rmtree(out, ignore_errors=True)
            if name.startswith("torch"):
                os.makedirs(out)
                cmd = [sys.executable, "-c",
                       "import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
                       "dcp_to_torch_save(sys.argv[1], sys.argv[2])", src, os.path.join(out, "full.pt")]
            else:
                cmd = [CLI, "consolidate", src, out, "--include-optimizer", "-q"]
            env = {**os.environ, "ZERO_CKPT_FSYNC": "0"} if "no fsync" in name else None
            rows[name].append(run(cmd, env))
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nDCP checkpoint: {nparams / 1e6:.0f}M fp32 params + Adam (exp_avg, exp_avg_sq), "
          f"{args.ranks} rank files, {nbytes / 2**30:.2f} GiB; median of {args.repeats}, warm cache\n")
    print(f"| {'job':<28} | {'wall s':>7} | {'peak RSS MiB':>12} |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 14}|")
    base = statistics.median(w for w, _ in rows["torch dcp_to_torch_save"])
    for name, vals in rows.items():
        w = statistics.median(v for v, _ in vals)
        r = statistics.median(v for _, v in vals)
        print(f"| {name:<28} | {w:>7.2f} | {r:>12.0f} |  ({base / w:.2f}x faster than torch)" if name.startswith("zero")
              else f"| {name:<28} | {w:>7.2f} | {r:>12.0f} |")


if __name__ == "__main__":
    main()
