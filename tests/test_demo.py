"""``make demo``'s script runs end to end (into a temporary folder) and its checks hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "scripts/demo.py", "--out", str(tmp_path / "demo-out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo OK" in done.stdout
    assert "bit-identical" in done.stdout and "byte for byte" in done.stdout
    assert "Traceback" not in done.stderr
