"""Bad-input benchmark: each hostile or damaged input, run through the CLI in a fresh process.

For every case (the pickle and zip bombs of tests/bad_inputs.py in a DeepSpeed-like folder, a
huge ``latest``, a sparse 300 MB ``manifest.json``, deep JSON, a FIFO in place of the
manifest, absurd ``--to`` values) it runs ``zero-ckpt reshard SRC DST --to 2`` (or the given
``--to``) in a fresh interpreter with a timeout, and prints: exit code, seconds, and peak RSS
above the baseline, an interpreter that imported torch and the CLI and did nothing else.

    python bench/bench_bombs.py                 # this checkout
    python bench/bench_bombs.py --repo OLD_TREE # another checkout (e.g. before the caps)
    python bench/bench_bombs.py --timeout 20    # seconds per case (a hang shows as "timeout")
    python bench/bench_bombs.py --limit-gb 8    # address-space cap per case (old code's bombs
                                                # then fail with MemoryError at the cap)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from bad_inputs import BOMBS, build_bomb, huge_latest  # noqa: E402

_RUNNER = r"""
import json, resource, subprocess, sys, time
limit = int(float(sys.argv[2]) * (1 << 30))
def cap():  # address-space cap: a bomb of the old code fails instead of swamping the machine
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
t = time.perf_counter()
try:
    p = subprocess.run(sys.argv[3:], capture_output=True, text=True, timeout=float(sys.argv[1]), preexec_fn=cap)
    rc, err = p.returncode, p.stderr
except subprocess.TimeoutExpired:
    rc, err = "timeout", ""
print(json.dumps({"rc": rc, "stderr": err, "seconds": time.perf_counter() - t,
                  "rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measure(cmd: list[str], repo: Path, timeout: float, limit_gb: float = 8.0) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo))
    env.pop("ZERO_CKPT_DEBUG", None)
    out = subprocess.run([sys.executable, "-c", _RUNNER, str(timeout), str(limit_gb), *cmd], capture_output=True,
                         text=True, env=env, cwd=str(repo), timeout=timeout + 60)
    return json.loads(out.stdout)


def cases(work: Path, repo: Path) -> list[tuple[str, Path, str]]:
    """``(name, source folder, --to)`` for every case, built under ``work`` (the valid
    checkpoint by ``repo``'s own writer, so that its manifest is what that version reads)."""
    out = []
    for i, name in enumerate(BOMBS):
        out.append((name, build_bomb(work / f"bomb{i}", name), "2"))
    out.append(("DeepSpeed 'latest' of 512 MiB", huge_latest(work / "latest"), "2"))
    ckpt = work / "ckpt"
    code = f"import sys; sys.path.insert(0, {str(repo / 'tests')!r}); from helpers_ckpt import write_standard; write_standard({str(ckpt)!r}, 4)"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(repo)), cwd=str(repo))
    big = work / "bigmanifest"
    shutil.copytree(ckpt, big)
    with open(big / "manifest.json", "r+b") as f:
        f.truncate(300 << 20)
    out.append(("manifest.json of 300 MB (sparse)", big, "2"))
    deep = work / "deepjson"
    shutil.copytree(ckpt, deep)
    (deep / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    out.append(("manifest.json 100k '[' deep", deep, "2"))
    fifo = work / "fifo"
    shutil.copytree(ckpt, fifo)
    (fifo / "manifest.json").unlink()
    os.mkfifo(fifo / "manifest.json")
    out.append(("FIFO as manifest.json", fifo, "2"))
    out.append(("--to 1000000000", ckpt, "1000000000"))
    out.append(("--to 2**63", ckpt, str(2**63)))
    out.append(("valid checkpoint (reference)", ckpt, "2"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=HERE.parent, help="checkout whose CLI runs")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--limit-gb", type=float, default=8.0,
                        help="address-space cap per case (GiB): what a bomb can take at most")
    args = parser.parse_args()
    repo = args.repo.resolve()
    base = measure([sys.executable, "-c", "import torch, cli.main, zero_ckpt, zero_ckpt.formats.deepspeed"],
                   repo, args.timeout, args.limit_gb)["rss_kb"]
    print(f"CLI of {repo}; baseline (torch + CLI imported): {base / 1024:.0f} MiB peak RSS")
    print(f"| {'case':34s} | exit | seconds | peak RSS above baseline (MiB) | message |")
    print(f"|{'-' * 36}|------|---------|-------------------------------|---------|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, src, to in cases(work, repo):
            dst = work / f"out-{abs(hash(name))}"
            r = measure([sys.executable, "-m", "cli.main", "reshard", str(src), str(dst), "--to", to],
                        repo, args.timeout, args.limit_gb)
            above = (r["rss_kb"] - base) / 1024
            line = r["stderr"].strip().splitlines()[-1] if r["stderr"].strip() else ""
            # the message without "error: <path>": what the case was refused for
            msg = re.sub(r"^error: (\S*" + re.escape(str(work)) + r"\S*?:? )?", "", line)[:64].replace("|", "/")
            print(f"| {name:34s} | {r['rc']!s:4s} | {r['seconds']:7.2f} | {above:29.0f} | {msg} |", flush=True)


if __name__ == "__main__":
    main()
