"""Benchmark: reshard 8 -> 16 and consolidate (bf16, fp32) against `cp -r`, with peak RSS.

Run by hand (not a test):

    .venv/bin/python bench/bench_toolkit.py --sizes-gb 1 2.2 --workdir /tmp/zc-bench

For each size it writes a synthetic data-parallel-8 checkpoint (fp32 masters + Adam's two
moments, odd param sizes, two groups), then times, in the same run and on the same disk:
`cp -r` of the checkpoint, `zero-ckpt reshard --to 16`, `consolidate --dtype bfloat16`,
`consolidate --dtype float32`, `verify`. Each job runs in a fresh subprocess so its peak RSS
(ru_maxrss) is its own; "RSS above torch" subtracts a subprocess that only imports torch and
zero_ckpt. Warm page cache (the checkpoint was just written), as the peers' figures were.
Every job fsyncs its output; the copy is timed both plain and followed by `sync`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

PY = sys.executable

_CHILD = r"""
import resource, sys, time
import torch, zero_ckpt
job = sys.argv[1]
t0 = time.perf_counter()
if job == "baseline":
    pass
elif job == "reshard":
    zero_ckpt.reshard(sys.argv[2], sys.argv[3], world_size=16)
elif job == "consolidate":
    zero_ckpt.consolidate(sys.argv[2], sys.argv[3], dtype=sys.argv[4])
elif job == "verify":
    assert zero_ckpt.verify(sys.argv[2]).ok
dt = time.perf_counter() - t0
# VmHWM belongs to this exec'd image; ru_maxrss would carry the parent's high-water mark.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(dt, hwm * 1024)
"""


def run_child(*args: str, env: dict | None = None) -> tuple[float, int]:
    out = subprocess.run(
        [PY, "-c", _CHILD, *args], check=True, capture_output=True, text=True,
        env={**os.environ, **(env or {})},
    )
    seconds, rss = out.stdout.split()
    return float(seconds), int(rss)


def best_of(n: int, fn):
    """Median of n runs (each starts from a clean destination and a synced disk)."""
    results = sorted((fn() for _ in range(n)), key=lambda r: r[0])
    return results[len(results) // 2]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def make_checkpoint(path: str, gigabytes: float) -> int:
    """A DP-8 checkpoint of about `gigabytes` GB: returns total param count."""
    import torch

    from zero_ckpt import write_checkpoint

    # 3 fp32 tensors per element (master, exp_avg, exp_avg_sq) = 12 bytes.
    total = int(gigabytes * 1e9 / 12)
    g = torch.Generator().manual_seed(0)
    sizes = []
    remaining = total
    while remaining > 0:
        n = min(remaining, 1_000_003 + 7919 * len(sizes))  # odd sizes, ~1M each
        sizes.append(n)
        remaining -= n
    groups: list[dict] = [{}, {}]
    for i, n in enumerate(sizes):
        master = torch.randn(n, generator=g)
        groups[i % 2][f"layer{i}.weight"] = {
            "master": master,
            "exp_avg": master * 0.1,
            "exp_avg_sq": master.abs() * 0.01,
        }
    write_checkpoint(
        path, groups, world_size=8, align=64, model_dtypes={f"layer{i}.weight": "bfloat16" for i in range(len(sizes))},
        scalars=[{"step": 100}, {"step": 100}], hyperparams=[{"lr": 3e-4}, {"lr": 1e-4}], overwrite=True,
    )
    return total


def du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 2.2])
    ap.add_argument("--workdir", default="/tmp/zc-bench")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    base_t, base_rss = run_child("baseline")
    rows = []
    for size in args.sizes_gb:
        src = os.path.join(args.workdir, f"dp8-{size}gb")
        numel = make_checkpoint(src, size)
        nbytes = du(src)

        def fresh(name: str) -> str:
            p = os.path.join(args.workdir, name)
            shutil.rmtree(p, ignore_errors=True)
            return p

        subprocess.run(["sync"], check=True)
        t_cp = timed(["cp", "-r", src, fresh("copy")])
        t_cp_sync = t_cp + timed(["sync"])
        t_rs, rss_rs = run_child("reshard", src, fresh("dp16"))
        t_bf, rss_bf = run_child("consolidate", src, fresh("hf-bf16"), "bfloat16")
        t_fp, rss_fp = run_child("consolidate", src, fresh("hf-fp32"), "float32")
        t_v, rss_v = run_child("verify", src)
        for job, t, rss, written in [
            ("cp -r", t_cp, None, nbytes),
            ("cp -r + sync", t_cp_sync, None, nbytes),
            ("reshard 8->16", t_rs, rss_rs, du(os.path.join(args.workdir, "dp16"))),
            ("consolidate bf16", t_bf, rss_bf, du(os.path.join(args.workdir, "hf-bf16"))),
            ("consolidate fp32", t_fp, rss_fp, du(os.path.join(args.workdir, "hf-fp32"))),
            ("verify", t_v, rss_v, 0),
        ]:
            rows.append((f"{nbytes / 1e9:.2f} GB ({numel / 1e6:.0f}M params)", job, t, t / t_cp_sync, rss, written))
        for name in ("copy", "dp16", "hf-bf16", "hf-fp32", src):
            shutil.rmtree(os.path.join(args.workdir, name) if not os.path.isabs(name) else name, ignore_errors=True)
    print(f"\nbaseline: python + import torch, zero_ckpt: peak RSS {base_rss / 2**20:.0f} MiB\n")
    print("| checkpoint | job | wall s | x (cp -r + sync) | peak RSS above baseline MiB | bytes written |")
    print("|---|---|---:|---:|---:|---:|")
    for ck, job, t, ratio, rss, written in rows:
        rss_s = "-" if rss is None else f"{(rss - base_rss) / 2**20:.0f}"
        print(f"| {ck} | {job} | {t:.2f} | {ratio:.2f} | {rss_s} | {written / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
