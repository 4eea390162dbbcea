"""MiniGPT: a small GPT you can read in an afternoon, on fused kernels that make it fast.

Import order matters here: Triton decides at import time whether it runs compiled
kernels or its CPU interpreter, so ``TRITON_INTERPRET`` must be settled before anything
imports ``triton``. Without a GPU we turn the interpreter on (unless the user already
chose), which lets the Triton backend run - slowly, but exactly - on CPU tensors.
"""
import os as _os
import sys as _sys

import torch as _torch

# True when we switch the interpreter on after something (transformers, for one) imported
# triton: its own @jit helpers were then made for compiled kernels, and an interpreted kernel
# that calls them fails ("Cannot call @triton.jit'd outside of the scope of a kernel"). The
# Triton backend then reports itself unavailable on CPU, saying why (minigpt/_backend.py).
_TRITON_IMPORTED_FIRST = False
if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _TRITON_IMPORTED_FIRST = "triton" in _sys.modules
    _os.environ["TRITON_INTERPRET"] = "1"

__version__ = "0.1.0"

from minigpt import ops  # noqa: E402,F401
from minigpt._backend import available_backends  # noqa: E402,F401


def __getattr__(name):
    # Heavier parts (model, loaders) load on first use so `import minigpt.ops` from
    # another project stays cheap.
    if name == "load":
        from minigpt.loaders import load

        return load
    raise AttributeError(f"module 'minigpt' has no attribute {name!r}")
