"""bench/sanitizer_smoke.py on the CPU: the GPU check runs it under compute-sanitizer, so a case
that breaks (a new op without cases, an autograd change) should fail here first, not on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import vlmkern

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_passes_on_cpu():
    env = {"PYTHONPATH": str(Path(vlmkern.__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitizer_smoke.py"), "--device",
                          "cpu"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cases match the reference on cpu" in res.stdout
