"""Jobs that only move bytes never import torch (1.3 s of start-up on this machine).

Each command runs in a fresh interpreter through the CLI's ``main``; after it, ``torch`` must
not be in ``sys.modules``. A cast (consolidate to another dtype) imports it, and only then.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DP8 = ROOT / "fixtures" / "dp8"
DS_RUN = ROOT / "fixtures" / "deepspeed" / "z2_fp32_dp2" / "ckpt"

PROBE = """
import sys
sys.argv = ["zero-ckpt", *sys.argv[1:]]
from cli.main import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("EXIT", code, "TORCH", "torch" in sys.modules)
"""


def _run(*args: str) -> tuple[int, bool]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    last = proc.stdout.strip().splitlines()[-1].split()
    return int(last[1]), last[3] == "True"


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", str(DP8)],
        ["verify", str(DP8)],
        ["list", str(ROOT / "fixtures")],
        ["reshard", str(DP8), "{out}", "--to", "3", "-q"],
        ["reshard", str(DS_RUN), "{out}", "--to", "3", "-q"],
        ["convert", str(DS_RUN), "{out}", "-q"],
        ["verify", str(DS_RUN)],
    ],
    ids=["inspect", "verify", "list", "reshard", "reshard-deepspeed", "convert-deepspeed", "verify-deepspeed"],
)
def test_byte_moving_jobs_never_import_torch(tmp_path, args):
    code, torch_loaded = _run(*[a.format(out=tmp_path / "out") for a in args])
    assert code == 0
    assert not torch_loaded


def test_a_cast_imports_torch_only_then(tmp_path):
    code, torch_loaded = _run("consolidate", str(DP8), str(tmp_path / "bf16"), "--dtype", "bfloat16", "-q")
    assert code == 0 and torch_loaded
