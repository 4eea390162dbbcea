"""Every CUDA file compiles with nvcc for Hopper, so CUDA code is checked on machines without a
GPU (those cannot build the CUDAExtension, since the CPU torch has no CUDA headers)."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                else None)


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/*.cu not found"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_compiles_for_sm90(path, tmp_path):
    out = tmp_path / (os.path.basename(path) + ".o")
    proc = subprocess.run([NVCC, "-c", "-arch=sm_90", "-std=c++17", "-O2", "-Xcompiler", "-Wall",
                           path, "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {path}:\n{proc.stderr[-4000:]}"
    assert out.stat().st_size > 0
