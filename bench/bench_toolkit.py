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
    """The median run of n (by time; each starts from a clean destination and a synced disk)."""
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


def planning_rows(n_params: int = 100_000) -> list[tuple[str, float]]:
    """Pure-planning costs at scale: manifest JSON round trip + validation, and a reshard
    plan, for a manifest of ``n_params`` params (1e5 fragments and more)."""
    from zero_core.layout import GroupLayout
    from zero_ckpt.manifest import FileMeta, GroupMeta, Manifest, ParamMeta, check_manifest, shard_path
    from zero_ckpt.plan import plan_reshard, retarget_manifest, shard_header

    layout = GroupLayout.build([(f"p{i}", (17 + i % 13,), "bfloat16") for i in range(n_params)], world_size=64, align=64)
    group = GroupMeta(layout.numel, layout.partition_numel, 64,
                      tuple(ParamMeta(p.name, p.shape, p.dtype, p.offset) for p in layout.params),
                      ("exp_avg", "exp_avg_sq"))
    m = Manifest(64, 2, "float32", (group,),
                 tuple(FileMeta(shard_path(r, 64), 1, "crc32c:00000000", r) for r in range(64)))
    out = []
    t = time.perf_counter(); text = m.to_json(); m2 = Manifest.from_json(text); problems = check_manifest(m2)
    out.append((f"manifest JSON round trip + check_manifest, {n_params:,} params ({len(text) / 1e6:.1f} MB JSON)", time.perf_counter() - t))
    assert not problems
    headers = {r: shard_header(retarget_manifest(m2, 64), r)[1] for r in range(64)}
    t = time.perf_counter(); plan = plan_reshard(m2, headers, 48)
    out.append((f"plan_reshard 64 -> 48 ({sum(len(f.ops) for f in plan.files):,} copy ops)", time.perf_counter() - t))
    t = time.perf_counter(); frags = sum(len(layout.fragments_of_rank(r)) for r in range(64))
    out.append((f"fragment map of all 64 ranks ({frags:,} fragments)", time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 2.2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/zc-bench")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    _, base_rss = run_child("baseline")
    rows = []

    def fresh(name: str) -> str:
        p = os.path.join(args.workdir, name)
        shutil.rmtree(p, ignore_errors=True)
        subprocess.run(["sync"], check=True)  # no earlier job's dirty pages in this one's time
        return p

    for size in args.sizes_gb:
        src = os.path.join(args.workdir, f"dp8-{size}gb")
        numel = make_checkpoint(src, size)
        nbytes = du(src)
        subprocess.run(f"cat {src}/shards/* > /dev/null", shell=True, check=True)  # warm cache

        def cp(with_sync: bool):
            def once():
                dst = fresh("copy")
                t = timed(["cp", "-r", src, dst])
                return (t + (timed(["sync"]) if with_sync else 0.0), None)
            return best_of(args.repeats, once)

        def ours(job: str, *extra: str, env: dict | None = None):
            def once():
                dst = fresh("out")
                t, rss = run_child(job, src, dst, *extra, env=env)
                return (t, rss, du(dst))
            return best_of(args.repeats, once)

        t_cp, _ = cp(False)
        t_cps, _ = cp(True)
        nosync = {"ZERO_CKPT_FSYNC": "0"}
        label = f"{nbytes / 1e9:.2f} GB ({numel / 1e6:.0f}M params)"
        for job, (t, rss, written), floor, floor_name in [
            ("reshard 8->16", ours("reshard"), t_cps, "cp -r + sync"),
            ("reshard 8->16, no fsync", ours("reshard", env=nosync), t_cp, "cp -r"),
            ("consolidate bf16", ours("consolidate", "bfloat16"), t_cps, "cp -r + sync"),
            ("consolidate fp32", ours("consolidate", "float32"), t_cps, "cp -r + sync"),
            ("consolidate fp32, no fsync", ours("consolidate", "float32", env=nosync), t_cp, "cp -r"),
        ]:
            rows.append((label, job, t, f"{t / floor:.2f} x {floor_name}", rss, written))
        t_v, rss_v = best_of(args.repeats, lambda: run_child("verify", src))
        rows.append((label, "verify (reads everything)", t_v, f"{t_v / t_cp:.2f} x cp -r", rss_v, 0))
        rows.append((label, "cp -r", t_cp, "-", None, nbytes))
        rows.append((label, "cp -r + sync", t_cps, "-", None, nbytes))
        for name in ("copy", "out"):
            shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    print(f"\nbaseline: python + import torch, zero_ckpt: peak RSS {base_rss / 2**20:.0f} MiB; "
          f"median of {args.repeats} runs; warm page cache; each job in a fresh process\n")
    print("| checkpoint | job | wall s | against the copy | peak RSS above baseline MiB | bytes written |")
    print("|---|---|---:|---:|---:|---:|")
    for ck, job, t, ratio, rss, written in rows:
        rss_s = "-" if rss is None else f"{(rss - base_rss) / 2**20:.0f}"
        print(f"| {ck} | {job} | {t:.2f} | {ratio} | {rss_s} | {written / 1e9:.2f} GB |")
    print("\n| planning (pure, in-process) | s |\n|---|---:|")
    for name, t in planning_rows():
        print(f"| {name} | {t:.2f} |")


if __name__ == "__main__":
    main()
