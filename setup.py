"""Build MiniGPT: the Python package, the Triton kernels (kernels/ -> minigpt.kernels) and the
C++/CUDA extension minigpt._C.

    pip install -e . --no-build-isolation

C++ CPU kernels (csrc/*.cpp) are always built. CUDA kernels (csrc/*.cu) are added when torch
is a CUDA build and nvcc is found; set MINIGPT_NO_CUDA=1 to skip them, MINIGPT_NO_EXT=1 to skip
the extension entirely (the triton and torch backends still work).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _check_nvcc(torch_cuda, cuda_home):
    """torch's own check stops the build on a CUDA major-version mismatch with a message that
    does not say a CPU + Triton build is still possible; say it before any compiling."""
    import re
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return  # torch's build reports a missing nvcc itself
    m = re.search(r"release (\d+)\.(\d+)", out)
    if m and m[1] != torch_cuda.split(".")[0]:
        raise RuntimeError(
            f"nvcc at {cuda_home} is CUDA {m[1]}.{m[2]} but this torch was built with CUDA "
            f"{torch_cuda}: the CUDA kernels cannot be built against it. Point CUDA_HOME at a "
            f"CUDA {torch_cuda.split('.')[0]}.x toolkit, or build without them: "
            "MINIGPT_NO_CUDA=1 pip install -e . --no-build-isolation (the C++ CPU kernels are "
            "built; on a GPU the triton and torch backends still run).")


def extensions():
    if os.environ.get("MINIGPT_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    # Objects are named after their source's stem: csrc/x.cpp and csrc/x.cu would both make
    # x.o, which ninja refuses ("multiple rules generate"); hence the .cu files' _cuda suffix.
    stems = [os.path.splitext(os.path.basename(f))[0] for f in cpp + cu]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise RuntimeError(f"csrc/: {clash} name both a .cpp and a .cu source; their object "
                           "files would collide: rename the .cu (convention: <op>_cuda.cu)")
    # -fopenmp-simd: `#pragma omp simd reduction` lets the row sums vectorize without
    # -ffast-math. -fopenmp (compile only): at::parallel_for is an inline `#pragma omp
    # parallel` in ATen's headers, so without it every C++ kernel runs on one thread. Nothing
    # extra is linked: the GOMP_* calls bind to the libgomp torch already loaded (one runtime).
    cxx = ["-O3", "-fopenmp-simd", "-fopenmp"]
    # A wheel may be installed on another CPU (pip caches it, clusters share it): portable
    # there, unless asked; the in-place and editable builds run where they are built.
    wheel = "bdist_wheel" in sys.argv
    if os.environ.get("MINIGPT_NATIVE", "0" if wheel else "1") == "1":
        # The extension is built on the machine that runs it; let the compiler use its vector
        # units for the row loops. MINIGPT_NATIVE=0 builds a portable binary.
        # 512-bit vectors where the CPU has them: GCC defaults to 256 bits even on AVX-512
        # CPUs, and the row loops here (softmax's exp above all) are compute-bound per row.
        cxx += ["-march=native", "-mprefer-vector-width=512"]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("MINIGPT_NO_CUDA") != "1")
    if with_cuda:
        _check_nvcc(torch.version.cuda, CUDA_HOME)
        ext = CUDAExtension(
            "minigpt._C", cpp + cu,
            define_macros=[("WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math",
                                                     "-lineinfo"]})
    else:
        ext = CppExtension("minigpt._C", cpp, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="minigpt",
    version="0.1.0",
    description="A small GPT you can read in an afternoon, on fused Triton/C++/CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(
        os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["minigpt", "minigpt.*"]) + ["minigpt.kernels"],
    # The Triton kernels live in kernels/ at the top of the repo but install as minigpt.kernels:
    # a top-level `kernels` package would clash with the PyPI project of that name.
    package_dir={"minigpt": "minigpt", "minigpt.kernels": "kernels"},
    # Tile sizes measured on GPUs (benchmarks/tune_attention.py writes them).
    package_data={"minigpt.kernels": ["*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.5", "numpy", "tqdm", "safetensors", "tokenizers", "matplotlib",
                      "gguf", "huggingface_hub"],
    # numpy < 2.4: the Triton 3.6 interpreter (the triton backend on a CPU) converts
    # (1,)-shaped arrays with int(), an error since numpy 2.4
    extras_require={"triton": ["triton>=3.6", "numpy<2.4"],
                    "test": ["pytest", "transformers", "accelerate", "pillow"]},
    entry_points={"console_scripts": ["minigpt=minigpt.cli:main"]},
)
