"""ZeroOptimizer on CUDA with NCCL: parity, host syncs, memory, step time. Run by gpu_check.sh.

    torchrun --nproc-per-node N bench/gpu_check.py parity     # every rank: one GPU
    torchrun --nproc-per-node N bench/gpu_check.py bench

``parity``: stage 1/2 x offload off/"cpu" x fp32/bf16, AdamW, 4 steps with accumulation
(``no_sync``) and clipping, against a single-process torch AdamW over fp32 masters on the full
batch (computed on every rank); prints the max relative difference of the params and whether
backward + step made more than one host sync (``torch.cuda.set_sync_debug_mode``), and
``memory_report()`` against the formula.

``bench``: step time (median of 10 after 3 warm-up) and peak CUDA memory of DDP + AdamW,
DDP + ZeroRedundancyOptimizer(AdamW) and ZeroOptimizer stage 1/2 (offload off/on) on a
~350M-param MLP stack in bf16 (ZeroOptimizer) / fp32 (DDP).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zero_core import ZeroOptimizer  # noqa: E402


def log(*args: object) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def mlp(widths: list[int], dtype: torch.dtype, device: torch.device) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1]).to(device=device, dtype=dtype)


def parity(device: torch.device) -> int:
    rank, ws = dist.get_rank(), dist.get_world_size()
    widths = [64, 257, 129, 33]
    batch = 8 * ws
    failures = 0
    for stage in (1, 2):
        for offload in (None, "cpu"):
            for dtype in (torch.float32, torch.bfloat16):
                model = mlp(widths, dtype, device)
                ref = mlp(widths, dtype, device)
                opt = ZeroOptimizer(model.named_parameters(), torch.optim.AdamW, stage=stage,
                                    offload=offload, comm_dtype=torch.float32, lr=1e-3,
                                    bucket_numel=4096)
                masters = [p.detach().float().clone().requires_grad_(True) for p in ref.parameters()]
                ref_opt = torch.optim.AdamW(masters, lr=1e-3)
                syncs = []
                for step in range(4):
                    gen = torch.Generator(device="cpu").manual_seed(step)
                    x = torch.randn(2, batch, widths[0], generator=gen).to(device)
                    y = torch.randn(2, batch, widths[-1], generator=gen).to(device)
                    lo, hi = rank * 8, (rank + 1) * 8
                    # reference: full batch, fp32 master grads = mean of per-rank grads
                    grads = [torch.zeros_like(m) for m in masters]
                    for r in range(ws):
                        ref.zero_grad()
                        for micro in range(2):
                            out = ref(x[micro, r * 8:(r + 1) * 8].to(dtype)).float()
                            (((out - y[micro, r * 8:(r + 1) * 8]) ** 2).mean() / 2).backward()
                        for g, p in zip(grads, ref.parameters()):
                            g.add_(p.grad.float() / ws)
                    for m, g in zip(masters, grads):
                        m.grad = g
                    torch.nn.utils.clip_grad_norm_(masters, 1.0)
                    ref_opt.step()
                    with torch.no_grad():
                        for p, m in zip(ref.parameters(), masters):
                            p.copy_(m)
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
                    import warnings

                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        for micro in range(2):
                            ctx = opt.no_sync() if micro == 0 else _Null()
                            with ctx:
                                out = model(x[micro, lo:hi].to(dtype)).float()
                                (((out - y[micro, lo:hi]) ** 2).mean() / 2).backward()
                        opt.clip_grad_norm(1.0)
                        opt.step()
                    torch.cuda.set_sync_debug_mode(0)
                    syncs.append(sum("synchroniz" in str(w.message) for w in caught))
                worst = max(
                    ((p.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)).item()
                    for p, r in zip(model.parameters(), ref.parameters())
                )
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                ok = worst <= tol
                failures += not ok
                report = opt.memory_report()
                log(f"parity stage={stage} offload={offload or 'off'} dtype={str(dtype)[6:]} "
                    f"world={ws}: max rel diff {worst:.2e} (tol {tol:g}) {'OK' if ok else 'FAIL'}; "
                    f"host syncs per step {syncs}; owned MiB {report['total'] / 2**20:.2f}")
    return failures


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def bench(device: torch.device) -> int:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    widths = [4096] * 22  # ~353M params
    batch = 16
    rank = dist.get_rank()
    rows = []

    def run(label: str, make: "callable") -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        model, opt, dtype = make()
        gen = torch.Generator(device="cpu").manual_seed(rank)
        x = torch.randn(batch, widths[0], generator=gen).to(device, dtype)
        times = []
        for i in range(13):
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(x).float().pow(2).mean().backward()
            opt.step()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(f"| {label} | {statistics.median(times):.4f} | {peak:.2f} |")
        del model, opt

    run("DDP + AdamW (fp32)", lambda: _ddp(DDP, mlp(widths, torch.float32, device), None))
    run("DDP + ZeroRedundancyOptimizer(AdamW) (fp32)",
        lambda: _ddp(DDP, mlp(widths, torch.float32, device), ZeroRedundancyOptimizer))
    for stage in (1, 2):
        for offload in (None, "cpu"):
            for dtype in (torch.float32, torch.bfloat16):
                def make(stage=stage, offload=offload, dtype=dtype):
                    model = mlp(widths, dtype, device)
                    opt = ZeroOptimizer(model.named_parameters(), torch.optim.AdamW, stage=stage,
                                        offload=offload, lr=1e-4)
                    return model, opt, dtype
                run(f"ZeroOptimizer stage {stage}, offload {offload or 'off'}, {str(dtype)[6:]}", make)
    log(f"\n| configuration (world {dist.get_world_size()}, {sum(a * b + b for a, b in zip(widths, widths[1:])):,} params) "
        f"| step s (median of 10) | peak CUDA GiB |\n|---|---:|---:|")
    for row in rows:
        log(row)
    return 0


def _ddp(DDP, model, zro):
    wrapped = DDP(model)
    if zro is None:
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    else:
        opt = zro(wrapped.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4)
    return wrapped, opt, torch.float32


def main() -> int:
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    try:
        return parity(device) if sys.argv[1] == "parity" else bench(device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
