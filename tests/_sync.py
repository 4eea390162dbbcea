"""forbid_host_sync(): fail on any call that reads a tensor's values on the host.

On a GPU each such read is a host sync (and an error while a CUDA graph is captured); on the
CPU it is not, so the CPU tests catch them by name instead: every Tensor method and torch
function that hands a value to Python or sizes its output by the data. They are patched on the
classes (not caught with a TorchFunctionMode, which autograd does not carry into backward).
"""
import contextlib

import torch

METHODS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__",
           "nonzero", "masked_select", "unique", "unique_consecutive", "numpy", "argwhere",
           "bincount"]
FUNCTIONS = ["nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "bincount"]


class _Forbid:
    """Records each syncing call made while entered."""

    def __init__(self):
        self.seen = []
        self._saved = []

    def _wrap(self, owner, name, fn, check=None):
        def wrapper(*args, **kwargs):
            if check is None or check(args, kwargs):
                import traceback
                where = traceback.extract_stack(limit=2)[0]
                self.seen.append(f"{name} at {where.filename.split('/')[-1]}:{where.lineno}")
            return fn(*args, **kwargs)

        own = isinstance(owner, type) and name not in vars(owner)  # inherited: delete on exit
        self._saved.append((owner, name, None if own else fn))
        setattr(owner, name, wrapper)

    def __enter__(self):
        for name in METHODS:
            self._wrap(torch.Tensor, name, getattr(torch.Tensor, name))
        for name in FUNCTIONS:
            self._wrap(torch, name, getattr(torch, name))

        def by_tensor_counts(args, kwargs):
            reps = args[1] if len(args) > 1 else kwargs.get("repeats")
            return isinstance(reps, torch.Tensor) and "output_size" not in kwargs

        def by_bool_mask(args, kwargs):
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)

        self._wrap(torch.Tensor, "repeat_interleave", torch.Tensor.repeat_interleave,
                   by_tensor_counts)
        self._wrap(torch, "repeat_interleave", torch.repeat_interleave, by_tensor_counts)
        self._wrap(torch.Tensor, "__getitem__", torch.Tensor.__getitem__, by_bool_mask)
        return self

    def __exit__(self, *exc):
        for owner, name, fn in reversed(self._saved):
            if fn is None:
                delattr(owner, name)
            else:
                setattr(owner, name, fn)
        self._saved.clear()
        return False


@contextlib.contextmanager
def forbid_host_sync():
    with _Forbid() as mode:
        yield mode
    assert not mode.seen, f"host syncs: {mode.seen}"
