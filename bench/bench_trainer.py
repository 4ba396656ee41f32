"""Benchmark: Hugging Face Trainer step time and memory, ZeroTrainer against Trainer + DDP.

Run by hand (not a test), on a quiet machine:

    .venv/bin/python bench/bench_trainer.py              # ~5.3M-param Llama, 2 gloo ranks
    .venv/bin/python bench/bench_trainer.py --quick      # ~0.9M params, smoke run

Prints one markdown table: configuration, median step seconds, peak RSS per rank (MiB).

Configurations (each in fresh processes, one per rank, launched by this script with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set, gloo, one compute thread per rank):

* baseline: transformers imported and the model built, no training (the memory floor);
* ``Trainer`` + DDP + ``torch.optim.AdamW`` (``optim="adamw_torch"``; Trainer wraps the model
  in DistributedDataParallel through ``accelerator.prepare``);
* ``ZeroTrainer`` stage 1 and stage 2 (``zero_core.integrations``; same AdamW hyperparameters,
  no DDP wrap, the ZeroOptimizer reduces the gradients).

Same for all: a ``LlamaForCausalLM`` built under ``torch.manual_seed(0)`` from a local config
(hidden 256, 4 layers, MLP 688, vocabulary 4096: ~5.3M fp32 params), random token sequences of
64, 8 per rank per step, ``max_grad_norm=1.0`` (clipping every step in both), no checkpoints,
logging only at the end. A step is Trainer's optimizer step (``on_step_begin`` to
``on_step_end`` of a callback: forward, backward, clip, optimizer step, scheduler); its time is
the max over ranks, then the median over the ``--steps`` steps after ``--warmup``.
Peak RSS is VmHWM of /proc/self/status at the end, max over ranks (and over repeats). The
configurations run ``--repeats`` times round-robin (a shared machine's load changes over
minutes); a row gives the median over its runs of each run's median step, and their range.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20
WORLD = 2
SEQ = 64
BATCH_PER_RANK = 8

FULL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8)
QUICK = dict(vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4)

CONFIGS = [
    ("baseline", "baseline: transformers imported, model built, no training"),
    ("ddp_adamw", "Trainer + DDP + torch.optim.AdamW"),
    ("zero1", "ZeroTrainer stage 1 (AdamW)"),
    ("zero2", "ZeroTrainer stage 2 (AdamW)"),
]


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(config: str, quick: bool, steps: int, warmup: int, out: str, workdir: str) -> None:
    import torch

    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=SEQ, **(QUICK if quick else FULL)))
    n_params = sum(p.numel() for p in model.parameters())
    result: dict = {"rank": rank, "params": n_params, "step_s": []}
    if config != "baseline":
        vocab = model.config.vocab_size
        total = steps + warmup

        class Data(torch.utils.data.Dataset):
            def __init__(self) -> None:
                g = torch.Generator().manual_seed(1)
                self.x = torch.randint(0, vocab, (total * BATCH_PER_RANK * WORLD, SEQ), generator=g)

            def __len__(self) -> int:
                return len(self.x)

            def __getitem__(self, i: int) -> dict:
                return {"input_ids": self.x[i], "labels": self.x[i]}

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                result["step_s"].append(time.perf_counter() - self.t0)

        args = TrainingArguments(
            output_dir=os.path.join(workdir, config), per_device_train_batch_size=BATCH_PER_RANK,
            max_steps=total, logging_steps=10_000, learning_rate=1e-3, weight_decay=0.01,
            max_grad_norm=1.0, optim="adamw_torch", save_strategy="no", report_to=[],
            use_cpu=True, ddp_backend="gloo", disable_tqdm=True, dataloader_num_workers=0,
            train_sampling_strategy="sequential",
        )
        if config == "ddp_adamw":
            from transformers import Trainer

            trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Timer()])
        else:
            from zero_core.integrations import ZeroTrainer

            trainer = ZeroTrainer(model=model, args=args, train_dataset=Data(), callbacks=[Timer()],
                                  zero_stage=1 if config == "zero1" else 2)
        trainer.train()
        result["wrapped"] = type(trainer.model_wrapped).__name__
        result["step_s"] = result["step_s"][warmup:]
    result["rss"] = vm_hwm_bytes()
    with open(out, "w") as f:
        json.dump(result, f)
    import torch.distributed as dist

    if dist.is_initialized():  # leave no gloo thread running at exit
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, args: argparse.Namespace, workdir: str) -> list[dict] | str:
    port = free_port()
    procs, outs = [], []
    for rank in range(WORLD):
        out = os.path.join(workdir, f"{config}-{rank}.json")
        outs.append(out)
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, "--out", out,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--workdir", workdir]
        if args.quick:
            cmd.append("--quick")
        procs.append(subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        ))
    errors = []
    deadline = time.monotonic() + args.timeout
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
                q.wait()
            return f"timed out after {args.timeout:.0f} s"
        if p.returncode != 0:
            errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
    if errors:
        return errors[0]
    results = []
    for out in outs:
        with open(out) as f:
            results.append(json.load(f))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~0.9M-param model")
    parser.add_argument("--steps", type=int, default=15, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each configuration, round-robin")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument(
        "--configs", help="comma-separated subset of: " + ",".join(c for c, _ in CONFIGS)
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.quick, args.steps, args.warmup, args.out, args.workdir)
        return
    rows = []
    params = None
    configs = [c for c in CONFIGS if not args.configs or c[0] in args.configs.split(",")]
    medians: dict[str, list[float]] = {c: [] for c, _ in configs}
    rss: dict[str, list[float]] = {c: [] for c, _ in configs}
    wrapped: dict[str, str] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as workdir:
        # Round-robin over the configurations, so that a change in the machine's load hits
        # them alike; each row reports the median over repeats of each run's median step.
        for rep in range(args.repeats):
            for config, label in configs:
                if config in errors or (config == "baseline" and rep):
                    continue
                res = launch(config, args, workdir)
                if isinstance(res, str):
                    errors[config] = res
                    continue
                params = res[0]["params"]
                rss[config].append(max(r["rss"] for r in res) / MiB)
                if config != "baseline":
                    per_step = [max(ts) for ts in zip(*(r["step_s"] for r in res))]
                    medians[config].append(statistics.median(per_step))
                    wrapped[config] = res[0]["wrapped"]
                print(f"done: {label} (repeat {rep + 1})", file=sys.stderr)
    for config, label in configs:
        if config in errors:
            rows.append((label, f"error: {errors[config]}", "", ""))
        elif config == "baseline":
            rows.append((label, "-", f"{max(rss[config]):.0f}", ""))
        else:
            m = medians[config]
            spread = f"runs {min(m):.3f}-{max(m):.3f} s; " if len(m) > 1 else ""
            rows.append((label, f"{statistics.median(m):.3f}", f"{max(rss[config]):.0f}",
                         f"model {wrapped[config]}; {spread}{len(m)} x {args.steps} steps"))
    print(f"\nLlamaForCausalLM, {params / 1e6:.2f}M fp32 params, {WORLD} gloo ranks x "
          f"{BATCH_PER_RANK} sequences of {SEQ}, 1 thread per rank\n")
    print("| configuration | median step s | peak RSS per rank MiB | notes |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
