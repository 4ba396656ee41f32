"""Driver process for ``tests/test_crash.py`` (not a test module).

Imports torch and zero_ckpt once, then forks one child per kill point, so a kill point costs
milliseconds instead of an interpreter start. Protocol: one JSON object per line on stdin,
one JSON reply per line on stdout (nothing else is ever written to stdout).

- ``{"op": "save", "name": N, "step": S, "latest": bool, "fork": bool, "kill_at": K}``:
  ``write_checkpoint`` of a small checkpoint into ``<root>/N`` (world size 4, two groups, a
  model file), then ``update_latest(root, N)`` when ``latest``.
- ``{"op": "retain", "keep_last": K, "kill_at": K}``: ``apply_retention(root, K)``.
- ``{"op": "exit"}``.

With ``fork`` (the default) the operation runs in a forked child that counts every call of
``FileWriter.write``/``write_at``/``commit`` and ``Location.write_atomic``/``remove``/
``remove_all`` twice (on entry and on return) and SIGKILLs itself at event number ``kill_at``
(1-based; None: never). The reply says how the child ended and, when it was not killed, the
events in order (``"commit:after s3://b/run/step-2/manifest.json"``), so the test knows what
every kill point means. Where the driver itself misbehaves, it says so on stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

HOOKED = {
    "FileWriter": ("write", "write_at", "commit"),
    "Location": ("write_atomic", "remove", "remove_all"),
}
CHILD_DEADLINE_S = 60  # SIGALRM ends a child that hangs (a safety net, not synchronisation)


def _groups(seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    shapes = [{"enc.w": (5, 3), "enc.b": (5,), "enc.g": (2,)}, {"head.w": (7,)}]
    return [
        {
            name: {
                "master": torch.randn(shape, generator=gen),
                "exp_avg": torch.randn(shape, generator=gen),
                "exp_avg_sq": torch.randn(shape, generator=gen).abs(),
            }
            for name, shape in group.items()
        }
        for group in shapes
    ]


def _save(root: str, so: dict, cmd: dict) -> None:
    import torch

    from zero_ckpt.runs import update_latest
    from zero_ckpt.writer import write_checkpoint

    write_checkpoint(
        f"{root}/{cmd['name']}",
        _groups(cmd["step"]),
        world_size=4,
        align=2,
        scalars=[{"step": cmd["step"]}, {"step": cmd["step"]}],
        model_state={"buf": torch.arange(6.0) + cmd["step"]},
        storage_options=so,
    )
    if cmd.get("latest"):
        update_latest(root, cmd["name"], so)


def _retain(root: str, so: dict, cmd: dict) -> None:
    from zero_ckpt.runs import apply_retention

    apply_retention(root, cmd["keep_last"], so)


def _install_hooks(kill_at: int | None, events: list[str]) -> None:
    from zero_ckpt import storage

    def event(label: str) -> None:
        events.append(label)
        if len(events) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(cls, method):
        original = getattr(cls, method)

        def hooked(self, *args, **kwargs):
            if isinstance(self, storage.FileWriter):
                where = self.url
            else:
                where = self.url_of(args[0]) if args and isinstance(args[0], str) else self.url
            event(f"{method}:before {where}")
            result = original(self, *args, **kwargs)
            event(f"{method}:after {where}")
            return result

        setattr(cls, method, hooked)

    for cls_name, methods in HOOKED.items():
        for method in methods:
            wrap(getattr(storage, cls_name), method)


def _run_forked(op, root: str, so: dict, cmd: dict) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_fd)
            signal.alarm(CHILD_DEADLINE_S)
            events: list[str] = []
            _install_hooks(cmd.get("kill_at"), events)
            op(root, so, cmd)
            data = json.dumps(events).encode()
            while data:
                data = data[os.write(write_fd, data):]
        except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    return {
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "events": json.loads(data) if data else None,
    }


def main() -> None:
    config = json.loads(sys.stdin.readline())
    import torch

    torch.set_num_threads(1)  # no OpenMP pool to inherit across fork()
    import zero_ckpt.runs  # noqa: F401 - imported before forking, as the children need it
    import zero_ckpt.writer  # noqa: F401

    root, so = config["root"], config.get("storage_options") or {}
    ops = {"save": _save, "retain": _retain}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        op = ops[cmd["op"]]
        try:
            if cmd.get("fork", True):
                reply = _run_forked(op, root, so, cmd)
            else:
                op(root, so, cmd)
                reply = {"signal": None, "exit": 0, "events": None}
        except Exception as exc:  # noqa: BLE001 - the test shows it
            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
