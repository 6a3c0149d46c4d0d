"""benchmarks/gpu_check.py runs everywhere: on the CPU it checks the emulation and says what it skipped."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run the script itself")
def test_gpu_check_runs_on_cpu():
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "relative error" in r.stdout and "CUDA not available: skipped" in r.stdout
