"""``make demo``'s script runs end to end (into a temporary folder) and its checks hold.

One test on purpose: the demo trains on 8 and then 16 gloo processes (about a minute on two
cores), so running it once covers every part.
"""

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
    # the training part: save at 8, reshard with the CLI, resume at 16, consolidate
    assert "$ zero-ckpt reshard" in done.stdout and "--from 8 --to 16" in done.stdout
    assert "resumed at step 6 (saved at step 6)" in done.stdout
    assert "bit-identical to the 8-process model at save" in done.stdout
    assert "follow the run that never stopped" in done.stdout
    assert "equal the model's weights at save" in done.stdout
    assert "FAIL" not in done.stdout
    assert "Traceback" not in done.stderr
