"""Builders of hostile and damaged inputs, shared by tests/test_bad_inputs.py and
bench/bench_bombs.py (not a test module).

Every builder writes into a fresh folder and returns what to run on it. The bombs are torch
``.pt`` zip files in a DeepSpeed-like folder (``latest`` + ``global_step1/``) whose pickle or
zip directory declares far more than it holds; a reader that believed them would allocate
gigabytes before noticing.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Callable

__all__ = [
    "REPO",
    "cli_command",
    "run_measured",
    "baseline_rss_kb",
    "torch_zip",
    "deepspeed_folder",
    "BOMBS",
]

REPO = Path(__file__).resolve().parents[1]
MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def cli_command(*args: str) -> list[str]:
    """The zero-ckpt CLI of this checkout, in a fresh interpreter."""
    return [sys.executable, "-m", "cli.main", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("ZERO_CKPT_DEBUG", None)
    env.update(extra or {})
    return env


_RUNNER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
try:
    p = subprocess.run(sys.argv[2:], capture_output=True, text=True, timeout=float(sys.argv[1]))
    rc, err = p.returncode, p.stderr
except subprocess.TimeoutExpired as exc:
    rc, err = "timeout", (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
print(json.dumps({"rc": rc, "stderr": err, "seconds": time.perf_counter() - t,
                  "rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def run_measured(cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` under a fresh runner process; ``{"rc", "stderr", "seconds", "rss_kb"}``
    where ``rss_kb`` is the peak resident memory of ``cmd`` alone (the runner's only child)."""
    import json

    out = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(timeout), *cmd],
        capture_output=True, text=True, timeout=timeout + 30, env=child_env(env), cwd=str(REPO),
    )
    return json.loads(out.stdout)


def baseline_rss_kb() -> int:
    """Peak RSS of an interpreter that imported torch and the CLI, doing nothing else."""
    code = "import torch, cli.main, zero_ckpt, zero_ckpt.formats.deepspeed, zero_ckpt.formats.torch_optim"
    return run_measured([sys.executable, "-c", code])["rss_kb"]


# ----- torch zip files ---------------------------------------------------------------------------


def torch_zip(pkl: bytes, *, compress_pickle: bool = False, extra: dict[str, bytes] | None = None) -> bytes:
    """A ``torch.save``-shaped zip (``archive/data.pkl``, ``byteorder``, ``version``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl,
                   compress_type=zipfile.ZIP_DEFLATED if compress_pickle else zipfile.ZIP_STORED)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/version", b"3\n")
        for name, data in (extra or {}).items():
            z.writestr(f"archive/{name}", data)
    return buf.getvalue()


def deepspeed_folder(root: Path, model_pt: bytes, optim_pt: bytes | None = None) -> Path:
    """``root/latest`` -> ``global_step1`` holding the model-states and rank-0 optim files."""
    tag = root / "global_step1"
    tag.mkdir(parents=True, exist_ok=True)
    (root / "latest").write_text("global_step1")
    (tag / MODEL_FILE).write_bytes(model_pt)
    (tag / OPTIM_FILE).write_bytes(optim_pt if optim_pt is not None else model_pt)
    return root


def _proto(body: bytes, protocol: int = 4) -> bytes:
    return bytes([0x80, protocol]) + body + b"."


def pickle_binbytes8() -> bytes:
    """BINBYTES8 declaring 2**40 bytes (an unpickler allocates before reading)."""
    return _proto(b"\x8e" + struct.pack("<Q", 1 << 40) + b"x" * 16)


def pickle_binunicode8() -> bytes:
    """BINUNICODE8 declaring 2**36 bytes."""
    return _proto(b"\x8d" + struct.pack("<Q", 1 << 36) + b"x" * 16)


def pickle_bytearray_call() -> bytes:
    """``builtins.bytearray(2**31)``: 2 GiB of zeros from 30 bytes."""
    return _proto(b"c__builtin__\nbytearray\nJ" + struct.pack("<i", 2**31 - 1) + b"\x85R", 2)


def pickle_list_of_range() -> bytes:
    """``builtins.list(builtins.range(10**9))``: 8 GB of references."""
    return _proto(b"c__builtin__\nlist\nc__builtin__\nrange\nJ" + struct.pack("<i", 10**9) + b"\x85R\x85R", 2)


def pickle_many_appends(n: int = 2_500_000) -> bytes:
    """One list grown by ``n`` single APPENDs of a memoized object (3 bytes each; the stack
    stays 2 deep, so only a count of container items can stop it)."""
    return _proto(b"]q\x00Nq\x010" + b"h\x01a" * n, 2)


def pickle_many_setitems(n: int = 2_500_000) -> bytes:
    """A dict of ``n`` distinct int keys (7 bytes each in the pickle, ~100 in memory)."""
    pairs = b"".join(b"J" + struct.pack("<i", i) + b"h\x01" for i in range(n))
    return _proto(b"}q\x00Nq\x01" + b"(" + pairs + b"u", 2)


def pickle_huge_memo_index() -> bytes:
    """LONG_BINPUT at index 2**31 - 1: an unpickler grows its memo table to the index."""
    return _proto(b"]r" + struct.pack("<I", 2**31 - 1), 2)


def pickle_deep_stack(n: int = 100_000) -> bytes:
    """``[[[[...]]]]`` 100,000 lists deep, built on the stack."""
    return _proto(b"]" * n + b"a" * (n - 1), 2)


def pickle_deep_memo_chain(n: int = 50_000) -> bytes:
    """Lists nested ``n`` deep with a constant stack (each new list appended to the last)."""
    body = b"]q\x00"  # outermost, memo 0
    parts = [body]
    for i in range(1, n):
        # get previous (memo i-1), make a new list, memoize it as i, append it to previous, pop
        parts.append(b"j" + struct.pack("<I", i - 1) + b"]r" + struct.pack("<I", i) + b"a0")
    return _proto(b"".join(parts), 2)


def pickle_unhashable_key() -> bytes:
    """A dict keyed by an instance of an unknown class (inert, so unhashable once read)."""
    return _proto(b"}q\x00cmodule.that.does.not\nExist\n)\x81K\x01s", 2)


def pickle_list_key() -> bytes:
    """A dict keyed by a list."""
    return _proto(b"}q\x00]K\x01s", 2)


def zip_bomb_deflated(n: int = 256 << 20) -> bytes:
    """``data.pkl`` deflated from ``n`` bytes of zeros (ratio about 1000:1)."""
    comp = zlib.compressobj(1, zlib.DEFLATED, -15)
    chunk = b"\x00" * (1 << 20)
    raw = b"".join(comp.compress(chunk) for _ in range(n >> 20)) + comp.flush()
    small = torch_zip(b"\x80\x02}.", compress_pickle=True)
    # Splice the raw deflate stream in as data.pkl: patch sizes and CRC in both headers.
    z = zipfile.ZipFile(io.BytesIO(small))
    info = z.getinfo("archive/data.pkl")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as w:
        for item in z.infolist():
            if item.filename != "archive/data.pkl":
                w.writestr(item, z.read(item.filename))
    # zipfile cannot write a given compressed stream: build the member by hand at the front.
    name = info.filename.encode()
    crc = 0
    for _ in range(n >> 20):
        crc = zlib.crc32(chunk, crc)
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(raw), n, len(name), 0) + name
    rest = zipfile.ZipFile(io.BytesIO(out.getvalue()))
    buf = io.BytesIO()
    buf.write(local + raw)
    central = [struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(raw), n,
                           len(name), 0, 0, 0, 0, 0, 0) + name]
    for item in rest.infolist():
        data = rest.read(item.filename)
        off = buf.tell()
        iname = item.filename.encode()
        icrc = zlib.crc32(data)
        buf.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, icrc, len(data), len(data), len(iname), 0) + iname + data)
        central.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, icrc, len(data),
                                   len(data), len(iname), 0, 0, 0, 0, 0, off) + iname)
    cd_off = buf.tell()
    cd = b"".join(central)
    buf.write(cd)
    buf.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(central), len(central), len(cd), cd_off, 0))
    return buf.getvalue()


def zip_many_members_declared() -> bytes:
    """A zip whose end record declares 4,000,000 records (a huge central directory)."""
    data = bytearray(torch_zip(b"\x80\x02}."))
    at = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, at + 8, 0xFFFE, 0xFFFE)
    # zip64 is needed for more than 65,535: declare it through a zip64 end record + locator.
    z64_off = at
    cd_size, cd_off = struct.unpack("<II", data[at + 12 : at + 20])
    z64 = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 4_000_000, 4_000_000, cd_size, cd_off)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, z64_off, 1)
    eocd = bytes(data[at:])
    eocd = eocd[:8] + struct.pack("<HH", 0xFFFF, 0xFFFF) + eocd[12:]
    return bytes(data[:at]) + z64 + locator + eocd


def zip_stored_size_lie() -> bytes:
    """A stored ``data.pkl`` whose declared size is larger than the bytes stored."""
    data = bytearray(torch_zip(b"\x80\x02}."))
    first_cd = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, first_cd + 24, 1 << 30)  # uncompressed size of data.pkl
    return bytes(data)


# name -> (pickle or zip builder, is_zip)
BOMBS: dict[str, tuple[Callable[[], bytes], bool]] = {
    "binbytes8 2**40": (pickle_binbytes8, False),
    "binunicode8 2**36": (pickle_binunicode8, False),
    "bytearray(2**31)": (pickle_bytearray_call, False),
    "list(range(1e9))": (pickle_list_of_range, False),
    "2.5M single APPENDs": (pickle_many_appends, False),
    "2.5M-entry dict (SETITEMS)": (pickle_many_setitems, False),
    "memo index 2**31": (pickle_huge_memo_index, False),
    "100k-deep stack": (pickle_deep_stack, False),
    "50k-deep memo chain": (pickle_deep_memo_chain, False),
    "unhashable key": (pickle_unhashable_key, False),
    "list as key": (pickle_list_key, False),
    "zip: deflated 256 MiB data.pkl": (zip_bomb_deflated, True),
    "zip: 4M records declared": (zip_many_members_declared, True),
    "zip: stored size lie": (zip_stored_size_lie, True),
}


def build_bomb(root: Path, name: str) -> Path:
    """A DeepSpeed-like folder whose model-states file is the bomb ``name``."""
    make, is_zip = BOMBS[name]
    data = make() if is_zip else torch_zip(make())
    return deepspeed_folder(root, data)


def huge_latest(root: Path, nbytes: int = 512 << 20) -> Path:
    """A DeepSpeed-like folder whose ``latest`` is a ``nbytes`` sparse file."""
    deepspeed_folder(root, torch_zip(b"\x80\x02}."))
    with open(root / "latest", "wb") as f:
        f.write(b"global_step1")
        f.truncate(nbytes)
    return root

