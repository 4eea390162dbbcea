#!/usr/bin/env bash
# Rebuild minigpt._C in place after editing csrc/ (incremental, via ninja in build/).
# The lock keeps parallel builds from trampling the same build folder.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/minigpt-build.lock python setup.py -q build_ext --inplace
