"""Spawn a gloo process group on 127.0.0.1 and run test scenarios on every rank.

The parent binds a ``TCPStore`` server on port 0 (the OS picks a free port; no race), the
children join it as clients. Starting processes costs seconds (torch import), so children come
from a forkserver that preloaded torch, and :func:`run_scenarios` runs many scenarios in one
spawn and reports each one's outcome per rank
through a queue; no sleeps. A scenario that fails on one rank may leave the other ranks in a
collective until the process-group timeout; read the first failure.
"""

from __future__ import annotations

import queue as queue_mod
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

PG_TIMEOUT_S = 30

Scenario = tuple[str, Callable[..., None], tuple]


def run_scenarios(
    scenarios: list[Scenario], world_size: int, timeout_s: float = 240.0
) -> dict[str, dict[int, str | None]]:
    """Run ``fn(rank, world_size, *args)`` for each ``(name, fn, args)`` on every rank, in
    order, in one spawn. Returns ``{name: {rank: None (passed) | traceback}}``; a rank missing
    from a scenario's dict never reported (its process died or the run timed out).

    Scenario functions must be module-level (they are pickled by reference).
    """
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    ctx = _context()
    results_q = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, store.port, scenarios, results_q))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[str, dict[int, str | None]] = {name: {} for name, _, _ in scenarios}
    deadline = time.monotonic() + timeout_s
    try:
        for _ in range(world_size * len(scenarios)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, name, err = results_q.get(timeout=remaining)
            except queue_mod.Empty:
                break
            results[name][rank] = err
    finally:
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 1.0))
            if p.is_alive():
                p.kill()
                p.join()
    return results


def _context() -> Any:
    """A forkserver that imported torch (and torch._dynamo, which the first optimizer call
    imports) once: children fork from it instead of paying ~3 s of imports each. Falls back to
    spawn where forkserver does not exist."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "torch.optim"])
    return ctx


def check(results: dict[str, dict[int, str | None]], name: str, world_size: int) -> None:
    """Fail (with every rank's traceback) unless ``name`` passed on all ranks."""
    outcome = results[name]
    problems = []
    for rank in range(world_size):
        if rank not in outcome:
            problems.append(f"rank {rank}: no result (process died or timed out)")
        elif outcome[rank] is not None:
            problems.append(f"rank {rank}:\n{outcome[rank]}")
    if problems:
        raise AssertionError(f"scenario {name!r} at world size {world_size}:\n" + "\n".join(problems))


def _child(
    rank: int, world_size: int, port: int, scenarios: list[Scenario], results_q: Any
) -> None:
    import torch

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, False)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        for name, fn, args in scenarios:
            try:
                fn(rank, world_size, *args)
                results_q.put((rank, name, None))
            except BaseException:
                results_q.put((rank, name, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
