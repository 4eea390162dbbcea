"""Training: nanoGPT's loop on our model.

AdamW, linear warmup then cosine decay to min_lr, gradient clipping, gradient accumulation,
bf16 autocast on CUDA, periodic train/val evaluation, a metrics log (metrics.jsonl +
metrics.csv), a loss-curve PNG, atomic checkpoints every ``ckpt_interval`` steps, exact
resume, and DistributedDataParallel when launched by torchrun (WORLD_SIZE > 1).

Exact resume without saving RNG states: every random draw of a step (its batches, its dropout
masks) comes from generators seeded by (seed, rank, step, micro-step), so the data sampler's
"position" is simply the step number in the checkpoint, and a run resumed at step k draws
exactly what the uninterrupted run drew at step k, on every rank.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import json
import math
import os
import sys
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from minigpt import _backend
from minigpt import checkpoint as ckpt
from minigpt import data as data_mod
from minigpt.model import GPT, GPTConfig
from minigpt.ops import no_host_sync
from minigpt.tokenizer import CharTokenizer

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")


@dataclass
class TrainConfig:
    # data / output
    data: Optional[str] = None          # None: the default Shakespeare corpus
    out_dir: str = "out/shakespeare"
    # model (GPTConfig; vocab_size comes from the tokenizer)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    # optimization
    batch_size: int = 8                 # per rank and micro-step
    grad_accum: int = 1
    max_iters: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 50
    lr_decay_iters: Optional[int] = None    # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0              # 0 disables
    # evaluation, logging, checkpoints
    eval_interval: int = 200
    eval_iters: int = 10
    log_interval: int = 10
    ckpt_interval: int = 200
    sample_tokens: int = 300            # printed at the end; 0 disables
    # runtime
    seed: int = 1337
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                 # auto | float32 | bfloat16 | float16 (autocast)
    backend: Optional[str] = None       # MINIGPT_BACKEND for every op
    compile: bool = False
    cuda_graph: bool = False            # each step one CUDA graph replay (minigpt/graph.py)
    threads: Optional[int] = None       # CPU threads; None: see cpu_threads()
    progress: bool = True

    def check(self):
        if (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                or not 0 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

        def pos_int(name, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ValueError(f"{name.replace('_', '-')} must be a "
                                 f"{'non-negative' if allow_zero else 'positive'} integer, got {v!r}")
        for n in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters",
                  "log_interval", "ckpt_interval"):
            pos_int(n)
        for n in ("warmup_iters", "sample_tokens"):
            pos_int(n, allow_zero=True)
        if self.lr_decay_iters is not None:
            pos_int("lr_decay_iters")
        for n in ("lr", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{n.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr must be positive")
        if self.min_lr > self.lr:
            raise ValueError(f"min-lr ({self.min_lr}) must not exceed lr ({self.lr})")
        for n in ("beta1", "beta2"):
            if not 0 <= getattr(self, n) < 1:
                raise ValueError(f"{n} must be in [0, 1), got {getattr(self, n)!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.backend is not None:
            from minigpt._backend import BACKENDS
            if self.backend not in BACKENDS:
                raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        self.model_config(vocab_size=1)  # n_head / n_embd / block_size / dropout checks
        if self.cuda_graph:
            if self.dropout > 0:
                raise ValueError(f"cuda-graph needs dropout 0 (got {self.dropout}): attention "
                                 "dropout draws its seed on the host, so every replay would "
                                 "reuse one mask")
            if self.dtype == "float16":
                raise ValueError("cuda-graph: float16 needs a GradScaler, whose inf check is a "
                                 "host sync; use bfloat16 or float32")


    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         block_size=self.block_size, dropout=self.dropout, bias=self.bias,
                         vocab_size=vocab_size)


# Named starting points (--config). "seed" is the default: the seed's MiniGPT, tuned to train
# in a few minutes on a 2-core CPU. The other two are nanoGPT's shakespeare_char settings
# (config/train_shakespeare_char.py) and its CPU "baby" variant from nanoGPT's README.
PRESETS = {
    "seed": {},
    "shakespeare_char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
                             bias=False, batch_size=64, max_iters=5000, lr=1e-3, min_lr=1e-4,
                             warmup_iters=100, beta2=0.99, eval_interval=250, eval_iters=200,
                             ckpt_interval=250),
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False,
                 batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                 beta2=0.99, eval_interval=250, eval_iters=20, ckpt_interval=500),
}


def make_config(preset: str = "seed", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown --config {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown training options {bad}")
    return TrainConfig(**{**PRESETS[preset], **overrides})


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then flat."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def _seed_for(*parts) -> int:
    # A fixed mixing of small integers into a 63-bit seed (hash() of ints is stable, but
    # keep it explicit).
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & ((1 << 63) - 1)
    return h


class _Dist:
    """Process-group set-up from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK)."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device_arg = str(_backend.pick_device(device_arg))  # checked against what torch sees
        self.ddp = self.world > 1
        if self.ddp:
            import torch.distributed as dist

            if device_arg.startswith("cuda"):
                device_arg = f"cuda:{self.local_rank}"
                torch.cuda.set_device(device_arg)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device_arg.startswith("cuda") else "gloo")
        self.device = torch.device(device_arg)
        self.master = self.rank == 0

    def barrier(self):
        if self.ddp:
            import torch.distributed as dist
            dist.barrier()

    def rank0_says(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (what only rank 0 found out, e.g. in evaluation)."""
        if not self.ddp:
            return flag
        import torch.distributed as dist
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def close(self):
        if self.ddp:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def cpu_threads(requested: Optional[int] = None) -> int:
    """Set and return torch's CPU thread count. ``requested`` wins; else $OMP_NUM_THREADS
    (torchrun sets 1) is left alone; else, when the machine is already busy (1-minute load
    average >= its cores), use one thread: a small model's many short parallel ops then wait
    on descheduled worker threads, and we measured 20x slower steps with 2 threads than with
    1 on a loaded 2-core machine. An idle machine keeps torch's default."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be a positive integer, got {requested}")
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ and hasattr(os, "getloadavg"):
        ncpu = os.cpu_count() or 1
        if ncpu > 1 and os.getloadavg()[0] >= ncpu:
            torch.set_num_threads(1)
    return torch.get_num_threads()


_THREADS = _backend.Overlapping(torch.get_num_threads, torch.set_num_threads)


def threads_for_call(requested: Optional[int], cpu: bool = True):
    """A block run with ``cpu_threads(requested)`` (when ``cpu``), after which torch's thread
    count is what it was, also when calls in other threads overlap it (_backend.Overlapping)."""
    return _THREADS.hold(lambda: cpu_threads(requested) if cpu else None)


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


class MetricsLog:
    """metrics.jsonl (every logged step and eval) and metrics.csv (evals), append-only; a
    resumed run first drops the rows written after its checkpoint, and those of another run.

    An ``--overwrite`` run replaces the old checkpoint only at its first save, and so its
    metrics (``pending``): until ``saved()`` they go to hidden files beside the old run's, so
    that a resume of the old checkpoint after an early interruption finds the old rows, not the
    new run's. Each row also names its run (``run``, the id the run's checkpoints carry), and a
    resume keeps only its own run's."""

    CSV_FIELDS = ["step", "train_loss", "val_loss", "lr", "elapsed_s"]

    def __init__(self, out_dir: Path, resume_step: Optional[int], run_id: Optional[str] = None,
                 pending: bool = False):
        self.final = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        self.jsonl, self.csv = ((out_dir / f".{p.name}.new" for p in self.final) if pending
                                else self.final)
        self.run_id = run_id
        self.rows = []
        if resume_step is not None and self.jsonl.exists():
            with open(self.jsonl, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut off by a crash
                    if not isinstance(row, dict):
                        continue
                    # A checkpoint from before run ids (None) keeps its rows by step alone.
                    ours = run_id is None or row.get("run") == run_id
                    if ours and row.get("step", 0) <= resume_step:
                        self.rows.append(row)
        with open(self.jsonl, "w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        with open(self.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, self.CSV_FIELDS)
            w.writeheader()
            for row in self.rows:
                if row.get("kind") == "eval":
                    w.writerow({k: row.get(k) for k in self.CSV_FIELDS})

    def saved(self):
        """A checkpoint of this run is in place: its metrics become the visible ones."""
        if (self.jsonl, self.csv) != self.final:
            for tmp, final in zip((self.jsonl, self.csv), self.final):
                os.replace(tmp, final)
            self.jsonl, self.csv = self.final

    def log(self, row: dict):
        if self.run_id is not None:
            row = dict(row, run=self.run_id)
        self.rows.append(row)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if row.get("kind") == "eval":
            with open(self.csv, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, self.CSV_FIELDS).writerow({k: row.get(k) for k in self.CSV_FIELDS})

    def plot(self, path: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r for r in self.rows if r.get("kind") == "train"]
        evals = [r for r in self.rows if r.get("kind") == "eval"]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if steps:
            ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.45,
                    label="train (batch)")
        if evals:
            ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-",
                    label="train (eval)")
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "s-",
                    label="val (eval)")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss (nats/char)")
        ax.set_title("MiniGPT training")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)


@torch.no_grad()
def estimate_loss(model, splits, cfg: TrainConfig, device, amp_dtype, rank=0) -> dict:
    """Mean loss over eval_iters fixed random batches of each split."""
    out = {}
    was_training = model.training
    model.eval()
    for i, name in enumerate(("train", "val")):
        g = torch.Generator().manual_seed(_seed_for(cfg.seed, rank, 1 << 40, i))
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = data_mod.get_batch(getattr(splits, name), cfg.batch_size, cfg.block_size, g)
            with _autocast(device, amp_dtype):
                _, loss = model(x.to(device), y.to(device))
            losses[k] = loss.float().item()
        out[name] = losses.mean().item()
    model.train(was_training)
    return out


def _autocast(device, amp_dtype, cache: bool = True):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype, cache_enabled=cache)


def accumulated_step(model, params, optimizer, xs, ys, autocast, grad_clip: float):
    """One optimizer step over the micro-batches ``xs``, ``ys`` (K, B, T): each one's loss / K
    backward (the gradients add up to the mean loss's), clipping ``params`` to ``grad_clip``
    (0: none), ``optimizer.step()``. Returns the mean loss as a tensor, with no host sync: the
    body of a step captured as a CUDA graph (minigpt/graph.py) and of ``bench train``. Like
    ``train``, it takes the batches as in range and runs the model in ``no_host_sync``: the
    token-id and target checks would read them on the host, two syncs per micro-batch on a GPU
    (``bench train``'s plain variants paid them, the compiled and graphed ones did not)."""
    total = 0.0
    for x, y in zip(xs, ys):
        with no_host_sync():
            with autocast():
                _, loss = model(x, y)
            (loss / len(xs)).backward()
        total = total + loss.detach().float() / len(xs)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return total


def _print(*a, **k):
    print(*a, **k, flush=True)


def train(cfg: TrainConfig, resume: bool = False, explicit: Optional[set] = None,
          overwrite: bool = False, _stop_after: Optional[int] = None) -> dict:
    """Run training; returns a summary dict (final losses, step, paths, and on rank 0 the
    sample). ``explicit``: names of the options the user set (on resume they override the
    checkpoint's hyperparameters; model options that differ from the checkpoint's are an
    error). A fresh run refuses an ``out_dir`` that already holds a checkpoint unless
    ``overwrite``. ``_stop_after`` (tests) ends the loop after that many steps, as an interruption
    would, without the end-of-run extras."""
    explicit_given = explicit is not None
    explicit = set(explicit or ())
    if cfg.data:  # saved with the run: --resume from another directory must find the same file
        cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; --out names the run's directory")
    # A checkpoint folder as --out would nest the next save inside it, where neither
    # --resume nor sample would find it.
    problem = ckpt.run_dir_problem(out_dir)
    if problem:
        raise ValueError(f"--out {problem}")
    resumed = None
    if resume:
        try:
            resumed = ckpt.load_checkpoint(out_dir, with_optimizer=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--resume: no checkpoint to resume in {out_dir} ({e}); "
                                    "start the run without --resume") from None
        # Before the model's config is compared: an imported checkpoint (minigpt export
        # --format minigpt) has none of a run's state, and that is what to say about it.
        if (not resumed["config"].get("optimizer") or resumed.get("optimizer_tensors") is None
                or "step" not in resumed["config"]["train"]):
            raise ckpt.CheckpointError(f"--resume: {resumed['path']} has no optimizer state or "
                                       "training step (not a training checkpoint)")
        saved = resumed["config"].get("train", {}).get("hparams", {})
        merged = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(cfg)}}
        ignored = sorted(k for k, v in merged.items()
                         if k not in explicit and k != "out_dir" and getattr(cfg, k) != v)
        if ignored and not explicit_given:
            # The CLI passes the options the user typed; a library caller who changed a value
            # in the config without `explicit` would otherwise see it dropped without a word.
            warnings.warn("train(resume=True) keeps the checkpoint's " + ", ".join(
                f"{k}={merged[k]!r}" for k in ignored[:6]) + " over this config's values; pass "
                "explicit={...} with the names to change", stacklevel=2)
        for k in explicit:
            if k in MODEL_KEYS and k in merged and merged[k] != getattr(cfg, k):
                raise ValueError(f"--resume: the checkpoint in {out_dir} was trained with "
                                 f"{k}={merged[k]!r}, but {k}={getattr(cfg, k)!r} was given; "
                                 "model options cannot change on resume")
            merged[k] = getattr(cfg, k)
        merged["out_dir"] = cfg.out_dir
        cfg = TrainConfig(**{**dataclasses.asdict(cfg), **merged})
    cfg.check()

    dist = _Dist(cfg.device)
    try:
        # A library call leaves the process as it found it: its thread count, the variable,
        # and torch's global generators, which _train seeds for the weights and every step's
        # dropout (a caller's seeded draws after train() had come from the run's last seed).
        rng_devices = [dist.device] if dist.device.type == "cuda" else []
        with threads_for_call(cfg.threads, dist.device.type == "cpu"), \
                _backend.backend_env(cfg.backend, none_unsets=False), \
                torch.random.fork_rng(devices=rng_devices):
            return _train(cfg, dist, out_dir, resumed, overwrite, _stop_after)
    except BaseException as e:
        if dist.ddp:
            # The traceback holds _train's frame and with it the DDP wrapper, whose reducer
            # keeps the process group alive past dist.close(): gloo's threads were then torn
            # down at interpreter exit, an abort ("terminate called without an active
            # exception") after the error message. Returning frees them; an error must too.
            traceback.clear_frames(e.__traceback__)
            gc.collect()
        raise
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: _Dist, out_dir: Path, resumed, overwrite, _stop_after):
    device = dist.device
    amp_dtype = _autocast_dtype(cfg, device)
    if dist.master:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- data ----
    tokenizer = resumed["tokenizer"] if resumed else None
    text, data_path, tokenizer = data_mod.load_corpus(cfg.data, tokenizer,
                                                      fallback_dir=str(out_dir))
    splits = data_mod.split(tokenizer.encode_array(text), cfg.block_size)
    digest = data_mod.text_digest(text)
    if resumed:
        was = resumed["config"].get("train", {}).get("data_sha256")
        if was and was != digest and dist.master:
            _print(f"warning: {data_path} differs from the corpus the run started with")

    # ---- model and optimizer ----
    mcfg = cfg.model_config(tokenizer.vocab_size)
    if resumed:
        model = resumed["model"]
        if model.config != mcfg:
            raise ValueError(f"--resume: checkpoint model config {model.config} does not match "
                             f"{mcfg}")
    else:
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = GPT(mcfg)
    model.to(device).train()
    if cfg.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda-graph needs a CUDA device, not {device}")
    if cfg.cuda_graph and dist.ddp:
        raise ValueError("cuda-graph is not supported with DistributedDataParallel (torchrun)")
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                           device.type, capturable=cfg.cuda_graph)
    start_step, best_val = 0, float("inf")
    if resumed:
        opt = resumed["config"]["optimizer"]
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        ckpt.restore_optimizer(optimizer, resumed["optimizer_tensors"], opt["param_groups"])
        # Only the moments come from the checkpoint. The groups' settings are this run's
        # (its --weight-decay and --beta1/2 on resume, its --cuda-graph's capturable flag and
        # tensor lr); load_state_dict had put the saving run's back.
        for group, settings in zip(optimizer.param_groups, fresh):
            group.update(settings)
        if cfg.cuda_graph:  # a capturable AdamW counts its steps on the GPU
            for st in optimizer.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(device=device, dtype=torch.float32)
        state = resumed["config"]["train"]
        start_step = int(state["step"])
        if state.get("best_val_loss") is not None:
            best_val = float(state["best_val_loss"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dist.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # The checkpoint's, or a fresh run's own (rank 0's is the one written).
    run_id = resumed["config"]["train"].get("run_id") if resumed else uuid.uuid4().hex

    def train_state(step):
        return {"step": step, "best_val_loss": best_val if math.isfinite(best_val) else None,
                "hparams": dataclasses.asdict(cfg),
                "run_id": run_id,
                "data": str(data_path), "data_sha256": digest, "world_size": dist.world,
                "tokens_per_step": cfg.batch_size * cfg.block_size * cfg.grad_accum * dist.world}

    prev = None if resumed else ckpt.existing_checkpoint(out_dir)
    if prev is not None and not overwrite:
        # Checked by every rank (no rank may go on to wait for one that stopped), after the
        # data and model are known to be good and before anything is written.
        raise ValueError(f"{out_dir} already holds {prev}; continue it with --resume, "
                         "start over with --overwrite, or choose another --out")
    log = (MetricsLog(out_dir, start_step if resumed else None, run_id,
                      pending=prev is not None) if dist.master else None)
    if dist.master:
        n_params = raw_model.num_params()
        _print(f"minigpt train: {n_params / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
               f"corpus {data_path} ({len(text):,} chars: {len(splits.train):,} train / "
               f"{len(splits.val):,} val), device {device}"
               f"{f' x{dist.world} ranks' if dist.ddp else ''}, "
               f"{'autocast ' + str(amp_dtype).replace('torch.', '') if amp_dtype else 'float32'}"
               + (f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else "")
               + (f", resuming at step {start_step}" if resumed else ""))

    t0 = time.time()
    last = {"train": None, "val": None}
    loss_val = float("nan")
    end_step = cfg.max_iters if _stop_after is None else min(cfg.max_iters, start_step + _stop_after)
    bar = None
    if dist.master and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_iters, initial=start_step, desc="train", unit="step",
                   dynamic_ncols=True, file=sys.stderr)

    bad_eval = {}

    def evaluate(step) -> bool:
        """Evaluate and log; False (nothing logged) for a non-finite loss. The training loss
        is read before the step's update, so a step that made the weights NaN shows first
        here; the run then stops before the log and the save, keeping the last good
        checkpoint (and metrics.jsonl valid JSON)."""
        nonlocal best_val
        losses = estimate_loss(raw_model, splits, cfg, device, amp_dtype)
        if not all(math.isfinite(v) for v in losses.values()):
            bad_eval.update(losses)
            return False
        last.update(losses)
        best_val = min(best_val, losses["val"])
        row = {"kind": "eval", "step": step, "train_loss": losses["train"],
               "val_loss": losses["val"], "lr": get_lr(step, cfg),
               "elapsed_s": round(time.time() - t0, 3)}
        log.log(row)
        msg = f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        (bar.write(msg) if bar is not None else _print(msg))
        return True

    def draw(g, step, micro):
        """Micro-batch ``micro`` of ``step``: the same one whenever that step runs (resume)."""
        g.manual_seed(_seed_for(cfg.seed, dist.rank, step, micro))
        return data_mod.get_batch(splits.train, cfg.batch_size, cfg.block_size, g)

    graphed = None
    if cfg.cuda_graph:
        from minigpt.graph import GraphedStep, check_capturable, set_lr

        check_capturable(raw_model, optimizer, amp_dtype)
        params = list(raw_model.parameters())
        graphed = GraphedStep(
            lambda xs, ys: accumulated_step(model, params, optimizer, xs, ys,
                                            lambda: _autocast(device, amp_dtype, cache=False),
                                            cfg.grad_clip), optimizer)

    step = start_step
    if dist.master and not resumed and end_step > 0:
        evaluate(0)
    # The loss reaches the host only at steps that log, evaluate or checkpoint it (nanoGPT
    # reads it only to log): a read waits for the GPU, and one every step would leave the GPU
    # idle while the host draws and sends the next batch. A non-finite loss in between is
    # remembered on the device and stops the run at the next read, before any checkpoint.
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    t_read, step_read = time.time(), step
    while step < end_step:
        lr = get_lr(step, cfg)
        g = torch.Generator()
        if graphed is not None:
            set_lr(optimizer, lr)
            xy = [draw(g, step, micro) for micro in range(cfg.grad_accum)]
            xs = torch.stack([x for x, _ in xy]).to(device, non_blocking=True)
            ys = torch.stack([y for _, y in xy]).to(device, non_blocking=True)
            total = graphed(xs, ys)
            step += 1
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(_seed_for(cfg.seed, dist.rank, step, 1 << 41))  # dropout masks
            total = 0.0
            for micro in range(cfg.grad_accum):
                x, y = draw(g, step, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = (not dist.ddp or micro == cfg.grad_accum - 1)
                ctx = contextlib.nullcontext() if sync else model.no_sync()
                # The batches come from our own tokenizer, in range by construction: the ops'
                # value checks (host syncs on a GPU, five a step) are left out, so the host can
                # queue the whole step ahead of the GPU.
                with ctx, no_host_sync():
                    with _autocast(device, amp_dtype):
                        _, loss = model(x, y)
                        loss = loss / cfg.grad_accum
                    scaler.scale(loss).backward()
                total += loss.detach().float()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        nonfinite |= ~torch.isfinite(total)
        logs = step % cfg.log_interval == 0 or step == end_step
        if (logs or step % cfg.eval_interval == 0 or step % cfg.ckpt_interval == 0
                or step == cfg.max_iters):
            loss_val = float(total)
            if bool(nonfinite):
                raise RuntimeError(f"training diverged by step {step} (a non-finite loss; the "
                                   f"last is {loss_val}); try a smaller --lr")
            # Per step over the steps since the last read: in a run ahead of the GPU only a
            # read shows how long its steps took.
            now = time.time()
            dt = (now - t_read) / max(step - step_read, 1)
            t_read, step_read = now, step
        if dist.master:
            if logs:
                log.log({"kind": "train", "step": step, "loss": loss_val, "lr": lr,
                         "step_ms": round(1000 * dt, 2),
                         "tokens_per_s": round(cfg.batch_size * cfg.block_size * cfg.grad_accum
                                               * dist.world / max(dt, 1e-9), 1)})
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", refresh=False)
            if bar is not None:
                bar.update(1)
        eval_step = step % cfg.eval_interval == 0 or step == cfg.max_iters
        finite = evaluate(step) if eval_step and dist.master else True
        if eval_step and not dist.rank0_says(finite):  # every rank stops, none waits for 0
            raise RuntimeError(f"training diverged by step {step} (evaluation loss "
                               f"{bad_eval.get('train')} train, {bad_eval.get('val')} val); "
                               "try a smaller --lr")
        if dist.master and (step % cfg.ckpt_interval == 0 or step == cfg.max_iters):
            ckpt.save_checkpoint(out_dir, raw_model, tokenizer, train_state(step), optimizer)
            log.saved()
        if dist.ddp and (step % cfg.ckpt_interval == 0 or step == cfg.max_iters):
            dist.barrier()  # ranks leave together; resumed ranks find the checkpoint complete
        if step_read == step:  # the next interval's clock starts after this step's eval and save
            t_read = time.time()
    if bar is not None:
        bar.close()

    summary = {"step": step, "loss": loss_val, "train_loss": last["train"],
               "val_loss": last["val"], "best_val_loss": best_val, "out_dir": str(out_dir),
               "elapsed_s": time.time() - t0, "model": raw_model, "tokenizer": tokenizer,
               "rank": dist.rank, "threads": torch.get_num_threads() if device.type == "cpu" else None}
    if _stop_after is not None and step < cfg.max_iters:
        return summary
    if dist.master:
        if step == start_step:  # nothing left to do (resumed a finished run)
            _print(f"nothing to train: the checkpoint is already at step {step} "
                   f"(max-iters {cfg.max_iters})")
        log.plot(out_dir / "loss.png")
        summary["loss_png"] = str(out_dir / "loss.png")
        _print(f"done: {step} steps in {summary['elapsed_s']:.1f}s"
               + (f", val loss {last['val']:.4f}" if last["val"] is not None else "")
               + f"; checkpoint in {out_dir / ckpt.CKPT}, metrics in {out_dir}")
        if cfg.sample_tokens > 0:
            summary["sample"] = sample_text(raw_model, tokenizer, cfg.sample_tokens, seed=cfg.seed)
            _print("---- sample ----")
            _print(summary["sample"])
            _print("----------------")
    return summary


def sample_text(model: GPT, tokenizer: CharTokenizer, n: int, prompt: str = "\n",
                temperature=0.8, top_k=200, top_p=None, seed=1337) -> str:
    """Continue ``prompt`` (``\\n`` if it is in the vocabulary, else the first character) by
    ``n`` characters; returns the prompt plus the continuation."""
    if prompt and tokenizer.unknown(prompt):
        prompt = tokenizer.chars[0]
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    out = model.generate(idx, n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return tokenizer.decode(out[0].tolist())
