"""fp8lm as an index would install it: a wheel (not the editable checkout) in a fresh venv must
carry the kernels' sources and run the compiled FP8 path, not fall back to the reference one."""
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("fp8_cpu.cpp", "kernels.inc", "attention.inc", "isa_avx2.h", "isa_avx512.h", "decode_stack.h",
           "gemm_bf16dot.h", "onednn_gemm.cpp", "onednn_widen.h")

CHECK = """
import logging, sys
logging.basicConfig(level=logging.INFO)
import fp8lm
from fp8lm.fp8.cpu_kernels import cpu_kernels
assert fp8lm.__file__.startswith(sys.prefix), fp8lm.__file__      # the wheel's copy, not the checkout
kernels = cpu_kernels()
assert kernels is not None, "the compiled kernels did not load"
print("kernels", kernels.isa, fp8lm.__file__)
"""


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_runs_the_compiled_kernels(tmp_path):
    # From a copy without the checkout's build leftovers (an old egg-info's file list would hide a gap).
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", "tests", "out"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True)
    wheel = next((tmp_path / "dist").glob("fp8lm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"fp8lm/fp8/csrc/{s}" for s in SOURCES} <= names
    assert {"fp8lm/data/heldout.txt", "fp8lm/data/calibration.jsonl"} <= names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The dependencies come from this environment's site-packages (a plain path, so the editable
    # checkout's finder there is not loaded); fp8lm itself only from the wheel.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    run = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kernels avx" in run.stdout
