#!/usr/bin/env bash
# Rebuild minigpt._C in place after editing csrc/ (incremental, via ninja in build/).
# The lock keeps parallel builds from trampling the same build folder.
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's venv, where setup.sh installed torch: the README's commands never activate it,
# and a bare `python` may have no torch. PYTHON=... names another interpreter.
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
exec flock /tmp/minigpt-build.lock "${PYTHON:-python3}" setup.py -q build_ext --inplace
