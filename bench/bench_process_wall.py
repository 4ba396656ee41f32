"""Benchmark: whole-process wall time of byte-moving CLI jobs (start-up included) against
`cp -r` + `sync` of the same checkpoint.

Run by hand (not a test):

    .venv/bin/python bench/bench_process_wall.py --gb 1.0 --workdir /tmp/zc-wall

Writes a synthetic data-parallel-8 checkpoint (the one bench_toolkit.py writes), then times,
median of --repeats, warm page cache: `cp -r SRC X && sync`; `zero-ckpt reshard SRC DST --to 16`
(which fsyncs what it writes); `zero-ckpt consolidate SRC OUT --dtype float32` (the fp32 masters
as they are: no cast, so no torch) and `--dtype bfloat16` (the params' own dtype here: a cast, so
torch is imported); `zero-ckpt verify SRC`. Each CLI job is a fresh
process, so its time includes the interpreter and every import.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_toolkit import make_checkpoint  # noqa: E402

CLI = os.path.join(os.path.dirname(sys.executable), "zero-ckpt")


def wall(cmd: list[str] | str, shell: bool = False) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, shell=shell, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/zc-wall")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    src = os.path.join(args.workdir, "src")
    make_checkpoint(src, args.gb)
    nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)
    subprocess.run(f"cat {src}/shards/* > /dev/null && sync", shell=True, check=True)
    rows: dict[str, list[float]] = {
        "cp -r + sync": [],
        "zero-ckpt reshard --to 16 (fsync)": [],
        "zero-ckpt consolidate --dtype float32 (no cast, fsync)": [],
        "zero-ckpt consolidate --dtype bfloat16 (fsync)": [],
        "zero-ckpt verify": [],
    }
    for i in range(args.repeats):
        for name in rows:
            dst = os.path.join(args.workdir, f"out-{i}")
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            if name.startswith("cp"):
                t = wall(f"cp -r {src} {dst} && sync", shell=True)
            elif "reshard" in name:
                t = wall([CLI, "reshard", src, dst, "--to", "16", "-q"])
            elif "bfloat16" in name:
                t = wall([CLI, "consolidate", src, dst, "--dtype", "bfloat16", "-q"])
            elif "consolidate" in name:
                t = wall([CLI, "consolidate", src, dst, "--dtype", "float32", "-q"])
            else:
                t = wall([CLI, "verify", src, "-q"])
            rows[name].append(t)
            shutil.rmtree(dst, ignore_errors=True)
    floor = statistics.median(rows["cp -r + sync"])
    print(f"| job ({nbytes / 1e9:.2f} GB checkpoint, whole process) | wall s (median of {args.repeats}) | x cp -r + sync |")
    print("|---|---:|---:|")
    for name, ts in rows.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {med / floor:.2f} |")


if __name__ == "__main__":
    main()
