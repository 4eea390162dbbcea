"""CUDA code is checked on machines without a GPU, which cannot build the CUDAExtension (the
CPU torch cannot link CUDA code): every .cu compiles with nvcc for Hopper, and the WITH_CUDA half
of every .cpp compiles (syntax only) against torch's and CUDA's headers."""
import glob
import json
import os
import re
import shutil
import subprocess

import pytest

from tests._baseline import UPDATE as UPDATE_BASELINE, stack_grew, write_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                else None)
CXXFILT = shutil.which("c++filt")


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/*.cu not found"



def test_object_files_do_not_collide():
    """Every source of the extension gets an object file named after its stem: a .cpp and a
    .cu of one name make ninja refuse the CUDA build ("multiple rules generate x.o"), which
    only a GPU machine runs. setup.py says so too; this catches it on every CI run."""
    srcs = [f for ext in ("cpp", "cu") for f in glob.glob(os.path.join(ROOT, "csrc", "*." + ext))]
    stems = [os.path.splitext(os.path.basename(f))[0] for f in srcs]
    assert len(srcs) > 2
    assert sorted(set(s for s in stems if stems.count(s) > 1)) == []


# setup.py's nvcc flags for the CUDAExtension: the registers below are the build's.
NVCC_FLAGS = ["-O3", "--use_fast_math"]
BASELINE_PATH = os.path.join(ROOT, "tests", "cuda_sm90_baseline.json")


def ptxas_table(stderr: str) -> dict:
    """{kernel (demangled, without its arguments): {"regs", "stack", "spill_stores",
    "spill_loads"}} from `nvcc -Xptxas -v` output."""
    kernels, name = {}, None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m[1]
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", line)
        if m and name:
            kernels[name] = {"stack": int(m[1]), "spill_stores": int(m[2]),
                             "spill_loads": int(m[3])}
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            kernels[name]["regs"] = int(m[1])
    names = subprocess.run([CXXFILT], input="\n".join(kernels), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    out = {}
    for mangled, pretty in zip(kernels, names):
        pretty = pretty.replace("(anonymous namespace)::", "")
        out[pretty[:pretty.index("(")] if "(" in pretty else pretty] = {
            k: kernels[mangled][k] for k in ("regs", "spill_loads", "spill_stores", "stack")}
    return out


@pytest.mark.skipif(NVCC is None or CXXFILT is None,
                    reason="nvcc (and binutils' c++filt) are not installed on this machine")
@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_compiles_for_sm90(path, tmp_path):
    """Every .cu compiles for sm_90 with the build's flags, and no kernel of it grows its stack
    against tests/cuda_sm90_baseline.json (a kernel per line: registers, stack, spills). A
    kernel that spills, or keeps an array in local memory because an index is no longer a
    constant after unrolling, passes every emulated test and runs at a fraction of its speed
    on a GPU, which CI does not have. After a change that means it, rewrite the record with
    MINIGPT_UPDATE_SM90_BASELINE=1 and read the diff (registers are there for it)."""
    out = tmp_path / (os.path.basename(path) + ".o")
    proc = subprocess.run([NVCC, "-c", "-arch=sm_90", "-std=c++17", *NVCC_FLAGS, "-Xcompiler",
                           "-Wall", "-Xptxas", "-v", path, "-o", str(out)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"nvcc failed on {path}:\n{proc.stderr[-4000:]}"
    assert out.stat().st_size > 0
    now = ptxas_table(proc.stderr)
    assert now, f"no kernels in nvcc's -Xptxas -v output for {path}"
    name = os.path.basename(path)
    base = {}
    if os.path.exists(BASELINE_PATH):
        with open(BASELINE_PATH) as f:
            base = json.load(f)
    if os.environ.get(UPDATE_BASELINE) == "1":
        base = {k: v for k, v in base.items() if not k.startswith(name + " | ")}
        base.update({f"{name} | {k}": v for k, v in now.items()})
        write_record(BASELINE_PATH, base)
        return
    worse, new = [], []
    for kernel, stats in sorted(now.items()):
        was = base.get(f"{name} | {kernel}")
        if was is None:
            new.append(kernel)
        elif stack_grew(was["stack"], stats["stack"]):
            worse.append(f"{kernel}: stack {was['stack']} -> {stats['stack']} bytes, spill "
                         f"stores {was['spill_stores']} -> {stats['spill_stores']}, registers "
                         f"{was['regs']} -> {stats['regs']}")
    assert not worse, (f"{name}: kernels worse than tests/cuda_sm90_baseline.json (rewrite it "
                       f"with {UPDATE_BASELINE}=1 if meant):\n" + "\n".join(worse))
    assert not new, (f"{name}: kernels tests/cuda_sm90_baseline.json does not know (rewrite it "
                     f"with {UPDATE_BASELINE}=1):\n" + "\n".join(new))


CPP_FILES = [p for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
             if os.path.basename(p) != "module.cpp"]  # module.cpp: only one WITH_CUDA attr


def _cuda_include():
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda",
                 os.path.dirname(os.path.dirname(os.path.realpath(NVCC))) if NVCC else None):
        if base and os.path.exists(os.path.join(base, "include", "cuda_runtime_api.h")):
            return os.path.join(base, "include")
    return None


@pytest.mark.skipif(_cuda_include() is None or shutil.which("g++") is None,
                    reason="needs g++ and CUDA's runtime headers (cuda_runtime_api.h)")
@pytest.mark.parametrize("path", CPP_FILES, ids=os.path.basename)
def test_cpp_cuda_branches_compile(path, tmp_path):
    """The `#ifdef WITH_CUDA` half of each csrc/*.cpp (guards, streams, calls of the .cu
    launchers) is built only where torch has CUDA, i.e. first on a lent GPU, where a compile
    error would cost the session its build. Compile it here with -DWITH_CUDA, syntax only,
    against this torch's headers (a CPU wheel ships c10/cuda's headers but not the one its
    CMake generates: a stub stands in) and CUDA's runtime headers. C++17, the older standard
    of the torch versions we support."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [str(tmp_path)] + include_paths() + [_cuda_include(),
                                                sysconfig.get_paths()["include"]]
    cmd = (["g++", "-std=c++17", "-fsyntax-only", "-fopenmp", "-DWITH_CUDA",
            "-DTORCH_EXTENSION_NAME=_C", "-Wno-c++20-extensions"]
           + [f"-I{i}" for i in incs] + [path])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{os.path.basename(path)} with -DWITH_CUDA:\n{proc.stderr[-4000:]}"


def _setup_function(name):
    """One function of setup.py, without running setup() (importing it would build)."""
    import ast

    path = os.path.join(ROOT, "setup.py")
    tree = ast.parse(open(path).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {"os": os}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns[name]


def test_setup_names_a_cuda_version_mismatch(tmp_path):
    """A CUDA torch beside an nvcc of another major version: setup.py stops before compiling,
    naming both versions and the CPU + Triton build (MINIGPT_NO_CUDA=1)."""
    check = _setup_function("_check_nvcc")
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    nvcc.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"CUDA 13\.0 but this torch was built with CUDA "
                                           r"12\.4.*MINIGPT_NO_CUDA=1"):
        check("12.4", str(tmp_path))
    check("13.0", str(tmp_path))  # same major: fine
    check("12.4", str(tmp_path / "nowhere"))  # no nvcc: torch's build reports that itself
