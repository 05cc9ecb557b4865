"""The fragment-level emulators of the CUDA cross-attention kernels (tools/xattn_emulate.py,
tools/xattn_bwd_emulate.py) and of the Hopper shuffle GEMM (tools/shuffle_gemm_emulate.py) keep
running: a few small cases each (seconds), so a kernel or tool change that breaks them shows in
CI, not at the next GPU session. The full runs take ~1.5 min each (the shuffle GEMM's ~10 s): run
them by hand after touching the kernels."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, env: dict | None = None) -> str:
    pythonpath = os.pathsep.join([str(ROOT / "python"), str(ROOT / "tests"),
                                  os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("case", ["2 warps decode GQA rows ranges zero splits=2",
                                  "8 warps D=64 splits=3", "2 warps ranges zero images=3"])
def test_forward_emulator(case):
    out = _run("xattn_emulate.py", case)
    assert out.count("ok ") >= 1 and "FAIL" not in out


def test_backward_emulator():
    out = _run("xattn_bwd_emulate.py", "fuzz", env={"XBWD_FUZZ_ITERS": "2"})
    assert out.count("ok fuzz") == 2


def test_shuffle_gemm_emulator():
    """Odd N (single stores), a LayerNorm'd partial k tile, an RMSNorm merger, the position
    epilogue and the launcher's refusals."""
    cases = ["r=2 C=72 N=137", "internvl C=72 bfloat16", "merger rmsnorm", "positions bias",
             "unsupported"]
    out = _run("shuffle_gemm_emulate.py", *cases)
    assert out.count("ok ") >= 4 + 9 and "FAIL" not in out
