"""Train, save and resume with real DeepSpeed on CPU (gloo); run under ``.venv-peers``.

Not a test module: ``tests/test_deepspeed_writer.py`` runs it with the peers' interpreter
(``DS_ACCELERATOR=cpu .venv-peers/bin/python tests/_deepspeed_resume.py --world N --cases FILE``)
to check that DeepSpeed loads what ``write_deepspeed`` wrote. It starts ``N`` worker processes
itself (MASTER_ADDR=127.0.0.1, no launcher), as ``fixtures/make_deepspeed_fixtures.py`` does, and
uses that script's model, param groups and config.

``FILE`` is a JSON list of cases, run one after the other in the same processes:

* ``{"mode": "train", "out": DIR, "stage": 2, "bf16": false, "extra": {...}, "steps": 2, "continue": 2}``:
  train ``steps`` steps, ``engine.save_checkpoint(DIR/ckpt)``, then train ``continue`` more
  steps (the reference continuation); ``DIR/losses.json`` gets the continuation's losses.
* ``{"mode": "resume", "ckpt": CKPT, "out": DIR, ..., "continue": 2}``: a fresh engine at this
  world size, ``engine.load_checkpoint(CKPT)``, then ``DIR/state.safetensors`` gets DeepSpeed's
  own view of the loaded state (``safe_get_full_fp32_param``/``safe_get_full_optimizer_state``
  per param: ``{name}.master``, ``{name}.{key}``; ``module.{name}`` for every module entry),
  then ``continue`` steps; ``DIR/losses.json`` gets their losses (or ``DIR/error.{rank}.txt``
  the exception DeepSpeed raised while loading; the worker then exits with an error unless
  the case says ``"expect_error": true``).

The data are the same whatever the world size: every step draws one global batch of
``GLOBAL_BATCH`` sequences from a generator seeded by the step number, and rank r trains on its
``GLOBAL_BATCH / world`` rows, so runs at different sizes see the same samples and the same
averaged gradient (up to the order of the reduction). The reported loss is the mean over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 12  # divisible by 1, 2, 3, 4, 6
SEQ = 6
SEED = 4321


def _fixture_script():
    sys.path.insert(0, str(ROOT / "fixtures"))
    import make_deepspeed_fixtures as fx  # noqa: E402 - the fixtures' model, groups and config

    return fx


def _batch(step: int, rank: int, world: int):
    import torch

    gen = torch.Generator().manual_seed(SEED * 1000 + step)
    tokens = torch.randint(0, 13, (GLOBAL_BATCH, SEQ), generator=gen)
    micro = GLOBAL_BATCH // world
    return tokens[rank * micro : (rank + 1) * micro]


def _engine(case: dict, world: int):
    import deepspeed

    fx = _fixture_script()
    model = fx.build_model()
    config = fx.ds_config(case.get("stage", 2), case.get("bf16", False), case.get("extra", {}))
    config["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // world
    config.update(case.get("config", {}))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=fx.param_groups(model), config=config)
    return engine, model


def _train(engine, steps: int, world: int) -> list[float]:
    import deepspeed.comm as dist
    import torch

    rank = dist.get_rank()
    losses = []
    for _ in range(steps):
        tokens = _batch(engine.global_steps, rank, world)
        logits = engine(tokens)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 13), tokens.reshape(-1))
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses


def _dump_state(engine, model, path: Path) -> None:
    """DeepSpeed's own per-param values after a load (collectives: every rank calls this)."""
    import deepspeed.comm as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):  # link optimizer-state fragments of every group
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        out[f"{name}.master"] = safe_get_full_fp32_param(p).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).detach().clone()
    for name, t in engine.module.state_dict().items():
        out[f"module.{name}"] = t.detach().clone()
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in out.items()}, str(path))


def run_case(case: dict, world: int) -> None:
    import deepspeed.comm as dist

    rank = dist.get_rank()
    out = Path(case["out"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine, model = _engine(case, world)
    if case["mode"] == "train":
        _train(engine, case.get("steps", 2), world)
        engine.save_checkpoint(str(out / "ckpt"))
        dist.barrier()
        losses = _train(engine, case.get("continue", 2), world)
    else:
        try:
            path, _ = engine.load_checkpoint(case["ckpt"])
            if path is None:
                raise RuntimeError(f"load_checkpoint found no checkpoint in {case['ckpt']}")
        except Exception as exc:  # noqa: BLE001 - reported to the test, which decides
            # only some ranks may fail (the others then wait in a collective until the timeout)
            (out / f"error.{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            if case.get("expect_error"):  # a refusal every rank meets before any collective
                return
            raise
        _dump_state(engine, model, out / "state.safetensors")
        dist.barrier()
        losses = _train(engine, case.get("continue", 2), world)
    if rank == 0:
        (out / "losses.json").write_text(json.dumps({"losses": losses, "global_steps": engine.global_steps}))
    dist.barrier()


def worker(world: int, cases: list[dict], timeout: float) -> None:
    import faulthandler

    # a rank stuck in a collective (another rank failed) prints where it is and exits
    faulthandler.dump_traceback_later(timeout, exit=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for case in cases:
        run_case(case, world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, cases_file: str, timeout: float) -> int:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
        )
        cmd = [sys.executable, __file__, "--worker", "--world", str(world), "--cases", cases_file,
               "--timeout", str(max(1.0, timeout - 5))]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return max(codes, default=1) if any(codes) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--cases", required=True, help="JSON file: the list of cases")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.world, json.loads(Path(args.cases).read_text()), args.timeout)
        return
    raise SystemExit(launch(args.world, args.cases, args.timeout))


if __name__ == "__main__":
    main()
