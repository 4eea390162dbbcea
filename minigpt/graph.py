"""A whole training step as one CUDA graph: forward, backward, gradient clipping and the
optimizer step, captured once and replayed.

Why: a GPT-2 small step on an H100 is ~1,000 kernel launches, and from Python each costs the
host as long as many of the kernels take on the GPU (benchmarks/results/
bench_train_cuda-h100_profile.md: 47.7 ms of host time against 42.1 ms of GPU time), so the
GPU waits on the host. A replay is one launch; the step then takes its GPU time.

What capture needs, and how the pieces here provide it:
- no host sync inside the step: the ops skip their value checks while a graph is captured
  (``minigpt.ops.host_checks``); the model's token-id check too;
- the same tensors every step: the batch is copied into static buffers, the gradients are
  allocated once, in the capture (set to None before it), and overwritten by each replay;
- an optimizer that keeps its step count and learning rate on the GPU: AdamW with
  ``capturable=True`` (``GPT.configure_optimizers(capturable=True)``), the learning rate a
  tensor the caller refills between steps (``set_lr``);
- warm-up steps on a side stream before capture (lazy initialization, Triton's compiles,
  torch.compile's graphs), which are real training steps on the batches given.

Not supported (a clear error rather than a wrong run): float16 autocast (GradScaler syncs to
skip steps with inf gradients), attention dropout (its seed is drawn on the host, so a replay
would repeat one mask), DistributedDataParallel.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from minigpt.ops import no_host_sync


def check_capturable(model, optimizer, amp_dtype=None) -> None:
    """Raise ValueError naming what keeps this training setup out of a CUDA graph (DDP is the
    caller's to refuse: the model here is the unwrapped one)."""
    params = list(model.parameters())
    if not params or not all(p.is_cuda for p in params):
        raise ValueError("cuda_graph: the model must be on a CUDA device")
    if amp_dtype == torch.float16:
        raise ValueError("cuda_graph: float16 autocast needs a GradScaler, whose inf check is a "
                         "host sync; use bfloat16 or float32")
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "dropout", 0.0) > 0:
        raise ValueError(f"cuda_graph: dropout must be 0 (got {cfg.dropout}): attention "
                         "dropout draws its seed on the host, so every replay would reuse one mask")
    for group in optimizer.param_groups:
        if not group.get("capturable", False):
            raise ValueError("cuda_graph: the optimizer must be created with capturable=True "
                             "(GPT.configure_optimizers(..., capturable=True))")


class GraphedStep:
    """``step_fn(*batch) -> loss`` captured as a CUDA graph after ``warmup`` eager calls.

    ``step_fn`` runs one whole training step on the tensors it is given (forward, backward,
    clipping, ``optimizer.step()``) and must not zero the gradients: each call here sets them to
    None first in the eager calls, and the graph overwrites them. Call with each step's batch
    (tensors of the same shapes and dtypes every time); returns the loss tensor, which the next
    call overwrites (clone it, or read it, before).

    ``capture_peak_bytes``: the CUDA memory the step allocated at its peak during capture (what
    a replay uses, beyond the parameters and optimizer state).
    """

    def __init__(self, step_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
                 warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"GraphedStep: warmup must be >= 1, got {warmup}")
        self.step_fn, self.optimizer, self.warmup = step_fn, optimizer, warmup
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static: Sequence[torch.Tensor] = ()
        self.loss: Optional[torch.Tensor] = None
        self.capture_peak_bytes: Optional[int] = None
        self._stream: Optional[torch.cuda.Stream] = None

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            if len(batch) != len(self.static) or any(
                    b.shape != s.shape or b.dtype != s.dtype for b, s in zip(batch, self.static)):
                raise ValueError("GraphedStep: each step's batch must have the shapes and dtypes "
                                 f"it was captured with, {[tuple(s.shape) for s in self.static]}")
            for s, b in zip(self.static, batch):
                s.copy_(b, non_blocking=True)
            self.graph.replay()
            self.calls += 1
            return self.loss
        if self.calls < self.warmup:
            loss = self._eager(batch)
        else:
            loss = self._capture(batch)
        self.calls += 1
        return loss

    def _eager(self, batch):
        # Warm-up runs on a side stream, as capture wants (the caching allocator then has the
        # step's blocks on a stream other than the default one it captures from).
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream), no_host_sync():
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.step_fn(*batch)
        torch.cuda.current_stream().wait_stream(self._stream)
        return loss

    def _capture(self, batch):
        self.static = [b.clone() for b in batch]
        self.optimizer.zero_grad(set_to_none=True)  # the capture allocates them in its pool
        torch.cuda.synchronize()
        dev = self.static[0].device
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self.step_fn(*self.static)
        self.capture_peak_bytes = torch.cuda.max_memory_allocated(dev) - base
        self.graph, self.loss = graph, loss
        # Capture records the kernels without running them: this call's step runs now.
        graph.replay()
        return loss


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; a tensor one (capturable AdamW) is refilled in place, so
    a captured step reads the new value."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
