"""Checkpoints: safetensors + JSON only (never pickle), written atomically.

A training run's directory (``--out``) holds logs and the latest complete checkpoint in
``checkpoint/``:

    checkpoint/model.safetensors      weights (a tied head is stored once, as the embedding)
    checkpoint/optimizer.safetensors  AdamW moments (training checkpoints only)
    checkpoint/config.json            model config, training state and hyperparameters,
                                      optimizer param groups
    checkpoint/tokenizer.json         the character vocabulary

Saving writes a complete new directory next to it, then swaps it in with two renames
(checkpoint -> checkpoint.old, new -> checkpoint) and only then deletes the old one, so a crash
at any moment leaves a complete checkpoint behind: either ``checkpoint/`` or, in the instant
between the renames, ``checkpoint.old/``, which loading falls back to.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch

from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer

FORMAT = "minigpt-checkpoint"
# The layout of config.json and the tensor files. A reader refuses a newer one by name: a
# future layout read as this one would fail somewhere deep, or load the wrong thing.
VERSION = 1
CKPT = "checkpoint"
MODEL_FILE, OPTIM_FILE = "model.safetensors", "optimizer.safetensors"
CONFIG_FILE, TOKENIZER_FILE = "config.json", "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not match its config."""


# ---- saving -------------------------------------------------------------------------------

def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict, path, metadata: dict):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata=metadata)
    _fsync_file(path)


def model_state(model: GPT) -> dict:
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as transformer.wte.weight
    return sd


def optimizer_state(optimizer: torch.optim.Optimizer):
    """(tensors, json-able param groups) of an optimizer's state_dict."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"state.{pid}.{k}"] = t
    # A capturable optimizer keeps its learning rate as a 0-dim tensor (minigpt/graph.py): the
    # JSON holds its value (restore_optimizer's caller makes it a tensor again).
    groups = [{k: (v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v)
               for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def save_checkpoint(run_dir, model: GPT, tokenizer: CharTokenizer, train_state: Optional[dict] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, _fail_after=None) -> Path:
    """Write ``run_dir/checkpoint`` atomically; returns its path. ``_fail_after`` (tests)
    raises after the named stage to simulate a crash."""
    # Checked before anything is written: a save that would not load back must not replace
    # the checkpoint that does.
    if not isinstance(model, GPT):
        raise TypeError(f"save_checkpoint: model must be a minigpt GPT, got {type(model).__name__}")
    if not isinstance(tokenizer, CharTokenizer):
        raise TypeError("save_checkpoint: MiniGPT checkpoints hold a character tokenizer "
                        f"(CharTokenizer), got {type(tokenizer).__name__}")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"save_checkpoint: the tokenizer has {tokenizer.vocab_size} characters "
                         f"but the model's vocab_size is {model.config.vocab_size}")
    run_dir = Path(run_dir)
    problem = run_dir_problem(run_dir)
    if problem:
        raise ValueError(f"save_checkpoint: {problem}")
    run_dir.mkdir(parents=True, exist_ok=True)
    final, old = run_dir / CKPT, run_dir / f"{CKPT}.old"
    tmp = run_dir / f".{CKPT}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ckpt_id = uuid.uuid4().hex
    meta = {"format": FORMAT, "checkpoint_id": ckpt_id}
    try:
        tmp.mkdir()
        _save_tensors(model_state(model), tmp / MODEL_FILE, meta)
        if _fail_after == "model":
            raise RuntimeError("simulated crash while saving")
        cfg = {"format": FORMAT, "version": VERSION, "checkpoint_id": ckpt_id,
               "model": model.config.to_dict(), "train": train_state or {}}
        if optimizer is not None:
            tensors, groups = optimizer_state(optimizer)
            _save_tensors(tensors, tmp / OPTIM_FILE, meta)
            cfg["optimizer"] = {"type": type(optimizer).__name__, "param_groups": groups}
        tokenizer.save(tmp / TOKENIZER_FILE)
        _fsync_file(tmp / TOKENIZER_FILE)  # on disk before the swap, as the other files are
        _write_json(tmp / CONFIG_FILE, cfg)
        _fsync_dir(tmp)
        # Swap: the previous checkpoint is kept until the new one is in place.
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        if _fail_after == "swap":
            raise RuntimeError("simulated crash while swapping")
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def run_dir_problem(path) -> Optional[str]:
    """Why ``path`` cannot hold a run's ``checkpoint/``, or None. A folder with a config.json
    of its own (a checkpoint folder, a Hugging Face export) would shadow it: ``resolve`` reads
    the folder's own config.json first."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file; a run's folder is needed"
    if (path / CONFIG_FILE).exists():
        what = ("a checkpoint folder itself" if path.name in (CKPT, f"{CKPT}.old")
                or (path / MODEL_FILE).exists() else "a folder with its own config.json")
        return (f"{path} is {what}, not a run folder (the folder that holds {CKPT}/); "
                f"{'use ' + str(path.parent) if path.name == CKPT else 'choose another folder'}")
    return None


def existing_checkpoint(run_dir) -> Optional[str]:
    """What a run folder already holds, in words ("a checkpoint (step 6)", "an unreadable
    checkpoint ..."), or None. Anything at ``checkpoint/`` or ``checkpoint.old/`` counts: a
    checkpoint that does not load is still one that a fresh save must not replace unasked."""
    run_dir = Path(run_dir)
    for cand in (run_dir / CKPT, run_dir / f"{CKPT}.old"):
        if not cand.exists() and not cand.is_symlink():
            continue
        try:
            cfg = read_config(cand)
        except (ValueError, OSError) as e:
            return f"an unreadable checkpoint at {cand} ({e})"
        return f"a checkpoint (step {cfg['train'].get('step', '?')})"
    return None


# ---- loading ------------------------------------------------------------------------------

def resolve(path) -> Path:
    """The checkpoint directory for ``path``: a checkpoint directory itself, or a run directory
    holding ``checkpoint/`` (or, after a crash mid-swap, ``checkpoint.old/``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint must be a directory (a training --out directory or "
                              f"its checkpoint/), got the file {path}")
    for cand in (path, path / CKPT, path / f"{CKPT}.old"):
        if (cand / CONFIG_FILE).is_file():
            return cand
    raise FileNotFoundError(f"no checkpoint in {path}: expected {CONFIG_FILE} there or in "
                            f"{path / CKPT} (has training written one yet?)")


def _read_json(path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint is incomplete: {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {e})") from None


def _load_tensors(path, ckpt_id) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint is incomplete: {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None
    if ckpt_id is not None and meta.get("checkpoint_id") != ckpt_id:
        raise CheckpointError(f"{path} does not belong to this checkpoint's config.json (ids "
                              f"{meta.get('checkpoint_id')!r} != {ckpt_id!r}); files from "
                              "different saves were mixed")
    return tensors


def read_config(path) -> dict:
    """config.json of the checkpoint at ``path`` (run dir or checkpoint dir)."""
    d = resolve(path)
    cfg = _read_json(d / CONFIG_FILE)
    # Valid JSON that is not an object (a list, a number) failed with AttributeError on .get.
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or "model" not in cfg:
        fmt = cfg.get("format") if isinstance(cfg, dict) else None
        raise CheckpointError(f"{d / CONFIG_FILE} is not a MiniGPT checkpoint config "
                              f"(format {fmt!r})")
    # The sections' own types, so that a damaged file is named here rather than failing as an
    # AttributeError wherever a section is first read ("train": null, a list for "model").
    where = d / CONFIG_FILE
    version = cfg.get("version", VERSION)  # files from before the field have the first layout
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: 'version' must be a positive integer, got {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{where}: checkpoint format version {version} was written by a "
                              f"newer MiniGPT; this one reads version {VERSION}: upgrade "
                              "minigpt to load it")
    if not isinstance(cfg["model"], dict):
        raise CheckpointError(f"{where}: 'model' must be an object, got {cfg['model']!r}")
    train = cfg.setdefault("train", {})
    if not isinstance(train, dict):
        raise CheckpointError(f"{where}: 'train' must be an object, got {train!r}")
    step = train.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{where}: train.step must be a non-negative integer, got {step!r}")
    opt = cfg.get("optimizer")
    if opt is not None and not (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
                                and all(isinstance(g, dict) for g in opt["param_groups"])):
        raise CheckpointError(f"{where}: 'optimizer' must be an object with a list of "
                              "param_groups")
    return cfg


def load_checkpoint(path, device="cpu", dtype: Optional[torch.dtype] = None,
                    with_optimizer=False):
    """-> dict(model=GPT (eval mode), tokenizer, config (config.json), path, and with
    ``with_optimizer`` the optimizer tensors under 'optimizer_tensors')."""
    d = resolve(path)
    cfg = read_config(d)
    # Every save writes every field (all of them predate the format); one left out would be
    # filled with its default, a different model (rope_base, norm_eps) without a word.
    missing = sorted({f.name for f in dataclasses.fields(GPTConfig)} - set(cfg["model"]))
    if missing:
        raise CheckpointError(f"{d / CONFIG_FILE}: bad model config: fields {missing} are "
                              "missing")
    try:
        mcfg = GPTConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{d / CONFIG_FILE}: bad model config: {e}") from None
    tokenizer = CharTokenizer.load(d / TOKENIZER_FILE) if (d / TOKENIZER_FILE).is_file() else None
    if tokenizer is None:
        raise CheckpointError(f"checkpoint is incomplete: {d / TOKENIZER_FILE} is missing")
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise CheckpointError(f"config mismatch in {d}: the tokenizer has {tokenizer.vocab_size} "
                              f"characters but the model's vocab_size is {mcfg.vocab_size}")
    state = _load_tensors(d / MODEL_FILE, cfg.get("checkpoint_id"))
    # The config is checked against the weights on the meta device first: a damaged config's
    # sizes (block_size 10**7) are then an error, not hundreds of MB allocated before one.
    with torch.device("meta"):
        expected = model_state(GPT(mcfg))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"config mismatch in {d}: the weights do not fit the config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(f"config mismatch in {d}: {k} has shape "
                                  f"{tuple(state[k].shape)}, the config implies {tuple(t.shape)}")
        # Training stops at a non-finite loss before any later save, so NaN/inf weights mean
        # a damaged file (safetensors has no checksum); loaded, they only sample garbage.
        if not state[k].is_floating_point():  # a bool ln_f.weight loaded as all 1.0
            raise CheckpointError(f"{d / MODEL_FILE} is corrupt: {k} has dtype {state[k].dtype}, "
                                  "not floating point")
        if not torch.isfinite(state[k]).all():
            raise CheckpointError(f"{d / MODEL_FILE} is corrupt: {k} holds NaN or inf values")
    model = GPT(mcfg)
    model.load_state_dict(state, strict=not mcfg.tie_embeddings)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    out = dict(model=model, tokenizer=tokenizer, config=cfg, path=d)
    if with_optimizer:
        out["optimizer_tensors"] = (_load_tensors(d / OPTIM_FILE, cfg.get("checkpoint_id"))
                                    if "optimizer" in cfg else None)
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, param_groups: list):
    """Load what optimizer_state saved back into ``optimizer``, checked against its parameters
    first: torch's load_state_dict takes moments of another shape or dtype (or none at all for
    a parameter) without a word, and the resumed run then differs from the uninterrupted one or
    fails at its first step."""
    current = optimizer.state_dict()
    if len(current["param_groups"]) != len(param_groups) or any(
            len(a["params"]) != len(b.get("params", ()))
            for a, b in zip(current["param_groups"], param_groups)):
        raise CheckpointError("the optimizer state in the checkpoint does not match the model's "
                              "parameters")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict = {}
    for key, t in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise CheckpointError(f"optimizer state: unexpected tensor {key!r} (expected "
                                  "state.<parameter>.<name>)")
        pid, name = int(parts[1]), parts[2]
        if pid >= len(params):
            raise CheckpointError(f"optimizer state: {key!r} is for parameter {pid}, but the "
                                  f"model has {len(params)}")
        p = params[pid]
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CheckpointError(f"optimizer state: {key!r} must hold finite floating-point "
                                  f"values (dtype {t.dtype})")
        if t.dim() and tuple(t.shape) != tuple(p.shape):  # 0-dim: the step count
            raise CheckpointError(f"optimizer state: {key!r} has shape {tuple(t.shape)}, its "
                                  f"parameter {tuple(p.shape)}")
        state.setdefault(pid, {})[name] = t
    # Every parameter steps at every step, so a saved state covers all of them or none (a
    # save before the first step); a gap would restart that parameter's moments at zero.
    missing = sorted(set(range(len(params))) - set(state))
    if state and missing:
        raise CheckpointError(f"optimizer state is incomplete: parameters {missing[:5]} have "
                              "no state")
    if len({frozenset(st) for st in state.values()}) > 1:
        raise CheckpointError("optimizer state is damaged: the parameters hold different "
                              "entries (" + ", ".join(sorted({k for st in state.values()
                                                              for k in st})) + ")")
    groups = []
    for saved, now in zip(param_groups, current["param_groups"]):
        # Settings a newer torch added (2.13's decoupled_weight_decay, absent from a 2.5 save)
        # take this optimizer's values, as torch's own load_state_dict would.
        saved = {**{k: v for k, v in now.items() if k != "params"}, **saved}
        betas = saved.get("betas")
        if "betas" in now and not (isinstance(betas, (list, tuple)) and len(betas) == 2
                                   and all(isinstance(b, (int, float)) for b in betas)):
            raise CheckpointError(f"optimizer state: betas must be two numbers, got {betas!r}")
        for k in ("lr", "eps", "weight_decay"):
            v = saved.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise CheckpointError(f"optimizer state: {k} must be a finite number, got {v!r}")
        groups.append(dict(saved, betas=tuple(betas)) if "betas" in now else dict(saved))
    optimizer.load_state_dict({"state": state, "param_groups": groups})
