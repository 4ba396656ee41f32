"""The end-to-end demo behind ``make demo``: train, save, reshard, resume, consolidate.

    .venv/bin/python scripts/demo.py [--out demo-out]

Part A, training (gloo process groups on 127.0.0.1, one CPU thread per process):

1. train a tiny MLP with ``ZeroOptimizer`` (stage 2, AdamW, two param groups) on 8 processes,
   ``zero_ckpt.save`` it, and keep training the in-memory 8-process run as a reference;
2. ``zero-ckpt inspect`` the checkpoint;
3. ``zero-ckpt reshard <ckpt> <ckpt16> --from 8 --to 16`` and ``verify`` it;
4. resume on 16 processes with ``zero_ckpt.load`` from the resharded checkpoint: the model is
   bit-identical to the one saved, the step continues from the saved one, and the losses and
   weights follow the 8-process reference (to fp32 rounding: 16 ranks sum the gradient in a
   different order);
5. ``zero-ckpt consolidate`` both checkpoints: bit-identical, and equal to the model.

Part B, the committed fixture ``fixtures/dp8``: inspect, reshard 8 -> 16 and verify, reshard
back 16 -> 8 and compare the shards byte for byte, consolidate both and compare bit for bit.

Each CLI command is printed as a shell line before its output. Exits non-zero (after saying
which check failed) when a command fails or a check does not hold.
"""

from __future__ import annotations

import argparse
import math
import os
import queue as queue_mod
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = "fixtures/dp8"

# The training part: a tiny model, a fixed global batch split over the ranks.
TRAIN_WS, RESUME_WS = 8, 16
GLOBAL_BATCH = 48  # divisible by 8 and 16
SAVE_STEP = 6  # steps before the save
MORE_STEPS = 4  # steps after it (8-process reference and 16-process resume)
LR = 1e-2
# Losses and weights of the 16-process resume against the 8-process reference: the same
# math with gradients summed over 16 instead of 8 ranks, i.e. equal up to fp32 rounding.
RTOL, ATOL = 1e-4, 1e-6
PG_TIMEOUT_S = 120


def _zero_ckpt() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m cli.main``."""
    script = Path(sys.executable).with_name("zero-ckpt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def run(*args: str) -> None:
    """Print ``$ zero-ckpt ARGS`` and run it from the repository root; stop the demo if it fails."""
    print(f"\n$ zero-ckpt {shlex.join(args)}", flush=True)
    done = subprocess.run([*_zero_ckpt(), *args], cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"demo: `zero-ckpt {shlex.join(args)}` exited {done.returncode}")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def compare_shards(a: Path, b: Path) -> list[str]:
    """Names of the shard files that differ (or exist on one side only) between two checkpoints."""
    names = {p.name for p in (a / "shards").iterdir()} | {p.name for p in (b / "shards").iterdir()}
    return [n for n in sorted(names) if not _same_bytes(a / "shards" / n, b / "shards" / n)]


def _same_bytes(x: Path, y: Path) -> bool:
    return x.is_file() and y.is_file() and x.read_bytes() == y.read_bytes()


def compare_consolidated(a: Path, b: Path) -> tuple[int, list[str]]:
    """Compare every tensor of two consolidated outputs bit for bit, whatever their file split.

    Returns (tensors compared, differences described).
    """
    import torch
    from safetensors.torch import load_file

    def load(folder: Path) -> dict[str, "torch.Tensor"]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(folder.rglob("*.safetensors")):
            for name, t in load_file(str(f)).items():
                # Keyed by sub-folder and tensor name, not file name: the split into files
                # may differ between the two outputs, the tensors may not.
                out[f"{f.relative_to(folder).parent}/{name}"] = t
        return out

    ta, tb = load(a), load(b)
    problems = [f"only in {a}: {n}" for n in sorted(set(ta) - set(tb))]
    problems += [f"only in {b}: {n}" for n in sorted(set(tb) - set(ta))]
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        elif not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
            problems.append(f"{name}: values differ")
    return len(set(ta) & set(tb)), problems


# ----- training on gloo process groups -------------------------------------------------------


def _make_model() -> Any:
    """A tiny MLP (16 -> 37 -> 8, 933 params) and its ZeroOptimizer: stage 2, AdamW, weight
    decay on the matrices only (two param groups). Collective (the optimizer checks that all
    ranks agree and broadcasts rank 0's initial values)."""
    import torch
    from zero_core import ZeroOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 37), torch.nn.Tanh(), torch.nn.Linear(37, 8))
    named = list(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named if p.dim() > 1], "weight_decay": 0.1},
        {"params": [(n, p) for n, p in named if p.dim() <= 1], "weight_decay": 0.0},
    ]
    return model, ZeroOptimizer(groups, torch.optim.AdamW, stage=2, lr=LR)


def _train_step(model: Any, opt: Any, step: int, rank: int, ws: int) -> float:
    """One step on this rank's slice of the global batch of ``step``; returns the global loss
    (mean over the whole batch: the ranks' local means averaged). Collective."""
    import torch
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 16, generator=gen)
    teacher = torch.randn(16, 8, generator=torch.Generator().manual_seed(1234)) * 0.5
    y = torch.sin(x @ teacher)
    lo, hi = rank * GLOBAL_BATCH // ws, (rank + 1) * GLOBAL_BATCH // ws
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x[lo:hi]), y[lo:hi])
    loss.backward()
    opt.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / ws


def _state_bytes(model: Any) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in model.state_dict().items()})


def _job_train(rank: int, ws: int, out: str) -> dict[str, Any]:
    """Train SAVE_STEP steps, save, then train MORE_STEPS more as the reference."""
    import zero_ckpt

    model, opt = _make_model()
    losses = [_train_step(model, opt, s, rank, ws) for s in range(1, SAVE_STEP + 1)]
    manifest = zero_ckpt.save(
        f"{out}/trained-dp8", optimizer=opt, model=model, extra={"epoch": 0}, overwrite=True
    )
    at_save = _state_bytes(model)
    more = [_train_step(model, opt, s, rank, ws) for s in range(SAVE_STEP + 1, SAVE_STEP + MORE_STEPS + 1)]
    return {
        "losses": losses,
        "saved_step": manifest.step,
        "at_save": at_save,
        "more": more,
        "final": _state_bytes(model),
    }


def _job_resume(rank: int, ws: int, out: str) -> dict[str, Any]:
    """Load the resharded checkpoint into a fresh model, then train MORE_STEPS steps."""
    import torch.distributed as dist
    import zero_ckpt

    model, opt = _make_model()
    result = zero_ckpt.load(f"{out}/trained-dp16", optimizer=opt, model=model)
    step = opt.group_scalars(0)["step"]
    after_load = _state_bytes(model)
    shares: list[Any] = [None] * ws
    dist.all_gather_object(shares, result.bytes_read)
    more = [_train_step(model, opt, s, rank, ws) for s in range(step + 1, step + MORE_STEPS + 1)]
    return {
        "step": step,
        "lr": opt.param_groups[0]["lr"],
        "extra": result.user_extra,
        "after_load": after_load,
        "bytes_read": shares,
        "more": more,
        "final": _state_bytes(model),
        "final_step": opt.group_scalars(0)["step"],
    }


_JOBS = {"train": _job_train, "resume": _job_resume}


def _worker(rank: int, ws: int, port: int, job: str, out: str, results: Any) -> None:
    """One rank: join the gloo group, run the job, report (rank 0's report, or a traceback)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, ws, False, timeout=timedelta(seconds=PG_TIMEOUT_S))
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=ws, timeout=timedelta(seconds=PG_TIMEOUT_S)
        )
        try:
            report = _JOBS[job](rank, ws, out)
            results.put((rank, None, report if rank == 0 else None))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, traceback.format_exc(), None))


def launch(job: str, ws: int, out: str) -> dict[str, Any]:
    """Run ``job`` on ``ws`` gloo processes; return rank 0's report or stop the demo.

    Processes fork from a forkserver that imported torch once (a fresh interpreter per rank
    would import torch 16 times on a 2-core machine); the rendezvous is a TCPStore on an
    OS-chosen port.
    """
    import multiprocessing as mp

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    ctx = mp.get_context("forkserver")
    # torch._dynamo: the first torch optimizer built imports it (seconds of CPU per process).
    ctx.set_forkserver_preload(
        ["torch", "torch._dynamo", "torch.distributed", "torch.optim", "zero_core.optimizer", "zero_ckpt.saving", "zero_ckpt.loading"]
    )
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, ws, store.port, job, out, results)) for r in range(ws)
    ]
    for p in procs:
        p.start()
    report, errors = None, []
    deadline = time.monotonic() + 2 * PG_TIMEOUT_S
    answered: set[int] = set()
    try:
        while len(answered) < ws and not errors:
            try:
                rank, err, rep = results.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in answered]
                if dead:
                    errors.append(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a report")
                elif time.monotonic() > deadline:
                    errors.append(f"no answer from some ranks within {2 * PG_TIMEOUT_S} s")
                continue
            answered.add(rank)
            if err is not None:
                # The other ranks may now wait in a collective: do not wait for them.
                errors.append(f"rank {rank}:\n{err}")
            elif rank == 0:
                report = rep
    finally:
        for p in procs:
            p.join(timeout=5 if errors else PG_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
    if errors or report is None:
        raise SystemExit(f"demo: the {ws}-process run failed:\n" + "\n".join(errors))
    return report


def _load_state(data: bytes) -> dict[str, Any]:
    from safetensors.torch import load

    return load(data)


def compare_states(got: dict[str, Any], want: dict[str, Any], exact: bool) -> tuple[float, list[str]]:
    """Largest absolute difference and the tensors that differ (bit for bit, or beyond
    RTOL/ATOL when not ``exact``)."""
    import torch

    problems = [f"missing {n}" for n in sorted(set(want) - set(got))]
    problems += [f"unexpected {n}" for n in sorted(set(got) - set(want))]
    worst = 0.0
    for name in sorted(set(got) & set(want)):
        a, b = got[name], want[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            continue
        worst = max(worst, float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
        same = torch.equal(a, b) if exact else torch.allclose(a, b, rtol=RTOL, atol=ATOL)
        if not same:
            problems.append(f"{name}: values differ")
    return worst, problems


def load_folder(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def training_demo(out: str, failures: list[str]) -> None:
    def fail(message: str) -> None:
        failures.append(message)
        print(f"FAIL: {message}")

    step(f"1. train with ZeroOptimizer (stage 2, AdamW) on {TRAIN_WS} processes, then save")
    print(
        f"tiny MLP 16 -> 37 -> 8 (933 params, 2 param groups), global batch {GLOBAL_BATCH} "
        f"split over {TRAIN_WS} gloo ranks"
    )
    started = time.monotonic()
    trained = launch("train", TRAIN_WS, out)
    for i, loss in enumerate(trained["losses"], start=1):
        print(f"  step {i:2d}  loss {loss:.6f}")
    print(
        f">>> zero_ckpt.save('{out}/trained-dp8', optimizer=opt, model=model) at step "
        f"{trained['saved_step']}  ({time.monotonic() - started:.1f} s)"
    )
    if trained["saved_step"] != SAVE_STEP:
        fail(f"the checkpoint records step {trained['saved_step']}, expected {SAVE_STEP}")

    step("2. what is in the checkpoint")
    run("inspect", f"{out}/trained-dp8")

    step(f"3. reshard it {TRAIN_WS} -> {RESUME_WS} ranks with the CLI, then verify")
    run("reshard", f"{out}/trained-dp8", f"{out}/trained-dp16", "--from", str(TRAIN_WS),
        "--to", str(RESUME_WS), "--overwrite")
    run("verify", f"{out}/trained-dp16")

    step(f"4. resume training on {RESUME_WS} processes from the resharded checkpoint")
    started = time.monotonic()
    resumed = launch("resume", RESUME_WS, out)
    shares = resumed["bytes_read"]
    print(
        f">>> zero_ckpt.load('{out}/trained-dp16', optimizer=opt, model=model)  "
        f"({time.monotonic() - started:.1f} s for the run)"
    )
    print(
        f"resumed at step {resumed['step']} (saved at step {trained['saved_step']}), lr "
        f"{resumed['lr']}, user extra {resumed['extra']}; each rank read only its share: "
        f"{min(shares)}..{max(shares)} bytes, {sum(shares)} in all"
    )
    at_save = _load_state(trained["at_save"])
    _, problems = compare_states(_load_state(resumed["after_load"]), at_save, exact=True)
    if resumed["step"] != trained["saved_step"]:
        fail(f"resumed at step {resumed['step']}, but the checkpoint was saved at step {trained['saved_step']}")
    if problems:
        fail("the model after load differs from the model at save: " + "; ".join(problems[:5]))
    else:
        print("OK: after load the 16-process model is bit-identical to the 8-process model at save")
    print(f"  step   loss ({RESUME_WS} ranks, resumed)   loss ({TRAIN_WS} ranks, never stopped)")
    for i, (a, b) in enumerate(zip(resumed["more"], trained["more"]), start=resumed["step"] + 1):
        print(f"  {i:4d}   {a:.8f}                 {b:.8f}")
    if resumed["final_step"] != SAVE_STEP + MORE_STEPS:
        fail(f"the optimizer ends at step {resumed['final_step']}, expected {SAVE_STEP + MORE_STEPS}")
    worst, problems = compare_states(
        _load_state(resumed["final"]), _load_state(trained["final"]), exact=False
    )
    loss_ok = all(
        math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) for a, b in zip(resumed["more"], trained["more"])
    )
    if problems or not loss_ok:
        fail("resuming at 16 ranks does not follow the 8-rank run: " + "; ".join(problems[:5]))
    else:
        print(
            f"OK: losses and weights follow the run that never stopped (largest weight "
            f"difference {worst:.1e}: fp32 rounding, as 16 ranks sum the gradient in another order)"
        )

    step("5. consolidate both checkpoints: bit-identical, and equal to the model")
    for src, full in ((f"{out}/trained-dp8", f"{out}/trained-full-from-dp8"),
                      (f"{out}/trained-dp16", f"{out}/trained-full-from-dp16")):
        run("consolidate", src, full, "--overwrite")
    count, problems = compare_consolidated(
        ROOT / out / "trained-full-from-dp8", ROOT / out / "trained-full-from-dp16"
    )
    _, vs_model = compare_states(load_folder(ROOT / out / "trained-full-from-dp16"), at_save, exact=True)
    if count == 0 or problems or vs_model:
        fail("consolidated weights differ: " + "; ".join((problems + vs_model)[:5] or ["none found"]))
    else:
        print(
            f"OK: {count} consolidated tensors are bit-identical (from dp8 and from dp16) and "
            "equal the model's weights at save"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="zero-ckpt end-to-end demo")
    parser.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    out = parser.parse_args(argv).out
    os.chdir(ROOT)
    # One thread per process: 16 ranks share 2 cores. Set before the forkserver starts, so
    # every rank inherits it.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    os.environ.setdefault("ZERO_CKPT_WORKERS", "2")
    failures: list[str] = []

    print("##### Part A: train with ZeroOptimizer, save, reshard, resume, consolidate")
    training_demo(out, failures)

    print(f"\n##### Part B: the committed fixture {FIXTURE}")
    step("6. what is in the fixture")
    run("inspect", FIXTURE)

    step("7. reshard 8 -> 16 ranks, then verify the result")
    run("reshard", FIXTURE, f"{out}/dp16", "--from", "8", "--to", "16", "--overwrite")
    run("verify", f"{out}/dp16")

    step("8. reshard back 16 -> 8: the shards must equal the original byte for byte")
    run("reshard", f"{out}/dp16", f"{out}/dp8-again", "--from", "16", "--to", "8", "--overwrite")
    differ = compare_shards(ROOT / FIXTURE, ROOT / out / "dp8-again")
    if differ:
        failures.append(f"8 -> 16 -> 8 changed shard(s): {', '.join(differ)}")
        print(f"FAIL: shards differ after 8 -> 16 -> 8: {', '.join(differ)}")
    else:
        print("OK: 8 -> 16 -> 8 gives the original shards byte for byte")

    step("9. consolidate both and compare the full weights bit for bit")
    for src, full in ((FIXTURE, f"{out}/full-from-dp8"), (f"{out}/dp16", f"{out}/full-from-dp16")):
        run("consolidate", src, full, "--max-shard-size", "20KB", "--overwrite")
    count, problems = compare_consolidated(
        ROOT / out / "full-from-dp8", ROOT / out / "full-from-dp16"
    )
    if count == 0:
        problems.append("no tensors found in the consolidated output")
    if problems:
        failures.append("consolidated weights differ: " + "; ".join(problems[:5]))
        print("FAIL: consolidated weights differ:\n  " + "\n  ".join(problems))
    else:
        print(f"OK: {count} consolidated tensors are bit-identical (from dp8 and from dp16)")

    print()
    if failures:
        print("demo FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("demo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
