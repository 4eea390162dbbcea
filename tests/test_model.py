"""The model: shapes, logits and loss against a plain eager re-implementation from the same
weights (GPT and Llama variants), KV-cached decoding against full recomputation, sampling
options, bad configs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minigpt.model import GPT, GPTConfig, KVCache, MiniGPT, llama_state_dict_to_minigpt
from minigpt.sampling import generate, sample_next

V = 37


def gpt_config(**kw):
    d = dict(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=V, dropout=0.0)
    d.update(kw)
    return GPTConfig(**d)


def llama_config(**kw):
    d = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=24, vocab_size=V,
             intermediate_size=40, rope_base=500.0, tie_embeddings=False)
    d.update(kw)
    return GPTConfig.llama(**d)


CONFIGS = [pytest.param(gpt_config, id="gpt"), pytest.param(llama_config, id="llama"),
           pytest.param(lambda: llama_config(n_kv_head=4, tie_embeddings=True), id="llama-mha")]


def make_model(cfg):
    torch.manual_seed(1)
    m = GPT(cfg)
    # Larger random weights than the init, so logits differ clearly between tokens and a
    # wrong position / cache entry changes the greedy choice.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else \
                    p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return m.eval()


# ---- a straightforward eager re-implementation, straight from the state dict ----------------

def eager_forward(m, idx, sd=None):
    """Logits from plain torch functions; ``sd`` defaults to the model's (detached) weights."""
    cfg = m.config
    sd = m.state_dict() if sd is None else sd
    B, T = idx.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim

    def norm(x, p):
        if cfg.norm == "layernorm":
            return F.layer_norm(x, (cfg.n_embd,), sd[p + ".weight"], sd.get(p + ".bias"),
                                cfg.norm_eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * sd[p + ".weight"]

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))

    x = sd["transformer.wte.weight"][idx]
    if cfg.pos == "learned":
        x = x + sd["transformer.wpe.weight"][:T]
    else:
        inv = 1.0 / cfg.rope_base ** (torch.arange(0, D, 2).double() / D)
        ang = torch.arange(T).double()[:, None] * inv[None]
        cos, sin = ang.cos().float(), ang.sin().float()

        def rot(t):  # rotate pairs (i, i + D/2), as HF Llama
            a, b = t[..., :D // 2], t[..., D // 2:]
            return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        qkv = lin(norm(x, p + "ln_1"), p + "attn.c_attn")
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if cfg.pos == "rope":
            q, k = rot(q), rot(k)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
        att = q @ k.transpose(-1, -2) / math.sqrt(D)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        x = x + lin(y, p + "attn.c_proj")
        h = norm(x, p + "ln_2")
        if cfg.mlp == "gelu":
            h = lin(F.gelu(lin(h, p + "mlp.c_fc")), p + "mlp.c_proj")
        else:
            h = lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"),
                    p + "mlp.down_proj")
        x = x + h
    x = norm(x, "transformer.ln_f")
    head = sd["transformer.wte.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    return x @ head.t()


@pytest.mark.parametrize("mk", CONFIGS)
def test_forward_matches_eager(mk):
    m = make_model(mk())
    idx = torch.randint(0, V, (3, 17))
    logits, loss = m(idx)
    assert loss is None and logits.shape == (3, 17, V)
    ref = eager_forward(m, idx)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    # only_last and the loss (fused linear cross entropy) against the same eager logits
    last, _ = m(idx, only_last=True)
    torch.testing.assert_close(last, ref[:, -1:], rtol=1e-5, atol=1e-5)
    targets = torch.randint(0, V, (3, 17))
    none, loss = m(idx, targets=targets)
    assert none is None
    torch.testing.assert_close(loss, F.cross_entropy(ref.reshape(-1, V), targets.reshape(-1)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mk", CONFIGS)
def test_backward_matches_eager(mk):
    m = make_model(mk())
    idx, targets = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9))
    _, loss = m(idx, targets=targets)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    live = dict(m.named_parameters())   # not state_dict(): that one is detached
    ref = F.cross_entropy(eager_forward(m, idx, live).reshape(-1, V), targets.reshape(-1))
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    for (name, _), g, r in zip(m.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)



def test_default_config_is_the_seed_minigpt():
    cfg = GPTConfig()
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 4, 128, 256)
    assert (cfg.norm, cfg.pos, cfg.mlp, cfg.tie_embeddings) == ("layernorm", "learned", "gelu", True)
    m = GPT(cfg)
    assert m.lm_head.weight is m.transformer.wte.weight
    assert MiniGPT is GPT
    # nanoGPT's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)
    assert abs(m.transformer.wte.weight.std().item() - 0.02) < 2e-3
    proj = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(proj - 0.02 / math.sqrt(8)) < 1e-3


def test_config_roundtrip_and_derived():
    cfg = llama_config(n_kv_head=None)
    assert cfg.n_kv_head == cfg.n_head and cfg.head_dim == 8
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTConfig(n_embd=48, n_head=4).intermediate_size == 192
    with pytest.raises(ValueError, match="unknown fields"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_layers": 3})


@pytest.mark.parametrize("kw, match", [
    (dict(n_head=0), "n_head"),
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(block_size=-1), "block_size"),
    (dict(dropout=1.5), "dropout"),
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(norm="batchnorm"), "norm"),
    (dict(pos="alibi"), "pos"),
    (dict(mlp="relu"), "mlp"),
    (dict(pos="rope", n_embd=12, n_head=4), "even head_dim"),
    (dict(n_layer=2.5), "n_layer"),
    (dict(norm_eps="1e-5"), "norm_eps"),
    (dict(norm_eps=float("inf")), "norm_eps"),
    (dict(pos="rope", rope_base="1e4"), "rope_base"),
    (dict(pos="rope", rope_base=float("inf")), "rope_base must be a finite number"),
    (dict(bias="false"), "bias must be true or false"),
    (dict(tie_embeddings="false"), "tie_embeddings must be true or false"),
    (dict(tie_embeddings=0), "tie_embeddings must be true or false"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kw)


def test_too_long_sequence_and_bad_idx():
    m = make_model(gpt_config())
    with pytest.raises(ValueError, match="block size"):
        m(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, time"):
        m(torch.zeros(25, dtype=torch.long))
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"n_layer": 2})


@pytest.mark.parametrize("idx,exc,match", [
    (torch.zeros(1, 3), TypeError, "int64 or int32"),
    (torch.zeros(1, 3, dtype=torch.uint8), TypeError, "int64 or int32"),
    (torch.zeros(1, 3, dtype=torch.bool), TypeError, "int64 or int32"),
    ([[1, 2]], TypeError, "idx must be a tensor"),
    (torch.tensor([[1, V]]), ValueError, rf"token ids must lie in \[0, {V}\).*\[1, {V}\]"),
    (torch.tensor([[-1, 2]], dtype=torch.int32), ValueError, r"token ids must lie.*\[-1, 2\]"),
])
def test_bad_idx(idx, exc, match):
    # Not torch's embedding errors ("Expected tensor for argument #1 'indices'", "index out of
    # range in self"; on CUDA a device-side assert).
    m = make_model(gpt_config())
    with pytest.raises(exc, match=match):
        m(idx)
    if isinstance(idx, torch.Tensor):
        with pytest.raises(exc, match=match):
            generate(m, idx, 2)


def test_cache_that_does_not_fit():
    # Another batch size or another model's cache failed inside a layer with torch's
    # "The expanded size of the tensor ... must match".
    m = make_model(llama_config())
    idx = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="cache holds 3 sequences but idx has 2"):
        m(idx, cache=m.new_cache(3))
    cache = m.new_cache(2)
    m(idx, cache=cache)
    with pytest.raises(ValueError, match="cache holds 2 sequences but idx has 1"):
        m(idx[:1, :1], cache=cache)
    with pytest.raises(ValueError, match="another model"):
        m(idx, cache=make_model(gpt_config()).new_cache(2))
    with pytest.raises(TypeError, match="KVCache"):
        m(idx, cache="cache")
    for kw in (dict(batch_size=2.5), dict(batch_size="2"), dict(batch_size=2, max_seqlen=2.5)):
        with pytest.raises(TypeError, match="must be an int"):
            KVCache(m.config, **kw)


@pytest.mark.parametrize("mk", [gpt_config, llama_config])
@torch.no_grad()
def test_cache_for_a_longer_context_is_refused(mk):
    """A cache of a model of the same shape but a longer context passed the check, and decoding
    past this model's context failed in the position lookup with torch's IndexError."""
    m = make_model(mk(block_size=8))
    idx = torch.randint(0, V, (1, 8))
    cache = KVCache(mk(block_size=64), batch_size=1)
    with pytest.raises(ValueError, match="holds 64 positions, this model's context is 8"):
        m(idx, cache=cache)
    assert cache.seqlens.tolist() == [0]
    # up to the context it is this model's own
    same = KVCache(mk(block_size=64), batch_size=1, max_seqlen=8)
    out = torch.cat([m(idx[:, :5], cache=same)[0]] +
                    [m(idx[:, t:t + 1], cache=same)[0] for t in range(5, 8)], dim=1)
    torch.testing.assert_close(out, m(idx)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="capacity of 8"):
        m(idx[:, :1], cache=same)


# ---- KV cache -----------------------------------------------------------------------------

@pytest.mark.parametrize("mk", CONFIGS)
def test_cache_logits_match_full_forward(mk):
    m = make_model(mk())
    idx = torch.randint(0, V, (2, 20))
    full, _ = m(idx)
    cache = m.new_cache(2)
    out = [m(idx[:, :7], cache=cache)[0]]           # prefill
    out.append(m(idx[:, 7:12], cache=cache)[0])     # a second block after the cache
    for t in range(12, 20):                         # one-token decode steps
        out.append(m(idx[:, t:t + 1], cache=cache)[0])
    assert cache.seqlens.tolist() == [20, 20]
    torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mk", CONFIGS)
def test_greedy_with_cache_equals_recompute(mk):
    m = make_model(mk())
    prompt = torch.randint(0, V, (3, 5))
    a = m.generate(prompt, 19, temperature=0)
    # nanoGPT's loop: recompute the whole sequence for every new token
    b = prompt
    for _ in range(19):
        logits, _ = m(b)
        b = torch.cat([b, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert a.shape == (3, 24)
    assert torch.equal(a, b)
    assert torch.equal(m.generate(prompt, 19, temperature=0, use_cache=False), b)


def test_cache_rows_at_different_lengths():
    # Decode writes each row at its own length; rows must not see each other's positions.
    m = make_model(llama_config())
    a, b = torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 6))
    ca, cb = m.new_cache(1), m.new_cache(1)
    m(a[:, :-1], cache=ca), m(b[:, :-1], cache=cb)
    both = m.new_cache(2)
    for L in range(2):
        both.k[L][0, :, :8], both.v[L][0, :, :8] = ca.k[L][0, :, :8], ca.v[L][0, :, :8]
        both.k[L][1, :, :5], both.v[L][1, :, :5] = cb.k[L][0, :, :5], cb.v[L][0, :, :5]
    both.seqlens[:] = torch.tensor([8, 5])
    out, _ = m(torch.cat([a[:, -1:], b[:, -1:]]), cache=both)
    torch.testing.assert_close(out[0, 0], m(a)[0][0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 0], m(b)[0][0, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same length"):
        m(torch.zeros(2, 3, dtype=torch.long), cache=both)


def test_cache_capacity_errors():
    m = make_model(gpt_config())
    cache = m.new_cache(1, max_seqlen=8)
    m(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="capacity"):
        m(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seqlen"):
        KVCache(m.config, 1, max_seqlen=25)


@pytest.mark.parametrize("mk", CONFIGS)
@torch.no_grad()
def test_cache_under_autocast_matches_no_cache(mk):
    """Under autocast the projections return bf16 keys and values, and the cache was in the
    weights' float32: every cached forward failed with 'k has dtype torch.float32 but q has
    torch.bfloat16'. Attention runs in bf16 with a cache as it does without one."""
    m = make_model(mk())
    idx = torch.randint(0, V, (2, 20))

    def cached(cache):
        out = [m(idx[:, :7], cache=cache)[0], m(idx[:, 7:12], cache=cache)[0]]
        out += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]
        return torch.cat(out, dim=1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = m(idx)
        cache = m.new_cache(2)
        got = cached(cache)
        assert cache.k[0].dtype == cache.v[-1].dtype == torch.bfloat16
        # a float32 cache, made outside autocast: it holds the same bf16 keys exactly, so the
        # same logits to the bit
        assert torch.equal(cached(KVCache(m.config, 2)), got)
        greedy = m.generate(idx[:, :5], 19, temperature=0)
        assert torch.equal(greedy, m.generate(idx[:, :5], 19, temperature=0, use_cache=False))
    assert got.dtype == full.dtype == torch.bfloat16
    # other kernels (decode attention, a block after a prefix) in the same dtype: a step or
    # two of bf16 apart (|logits| < 5 here, where a step is at most 1/32)
    assert full.abs().max() < 5
    torch.testing.assert_close(got.float(), full.float(), rtol=0, atol=0.05)
    assert m.new_cache(2).k[0].dtype == torch.float32   # outside autocast: the weights' dtype
    # the other way round a cache would round the keys: refused
    with pytest.raises(ValueError, match="cache holds torch.bfloat16 but the model's keys are "
                                         "torch.float32"):
        m(idx[:, :3], cache=cache)


@torch.no_grad()
def test_decode_into_a_full_cache_is_an_error_not_a_silent_overwrite():
    m = make_model(gpt_config())
    cache = m.new_cache(2, max_seqlen=8)
    m(torch.zeros(2, 7, dtype=torch.long), cache=cache)
    m(torch.zeros(2, 1, dtype=torch.long), cache=cache)        # fills position 7: full
    before = [k.clone() for k in cache.k]
    with pytest.raises(ValueError, match="capacity of 8"):
        m(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k))
    assert cache.seqlens.tolist() == [8, 8]


def test_generate_past_context_slides_window():
    m = make_model(gpt_config())
    prompt = torch.randint(0, V, (1, 30))       # longer than block_size 24
    out = m.generate(prompt, 40, temperature=0)
    assert out.shape == (1, 70) and torch.equal(out[:, :30], prompt)
    # the first new token only depends on the last block_size tokens
    logits, _ = m(prompt[:, -24:])
    assert out[0, 30] == logits[0, -1].argmax()


# ---- sampling -----------------------------------------------------------------------------

def test_sample_next_filters():
    logits = torch.randn(4, 50)
    top = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), top)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), top)
    assert torch.equal(sample_next(logits, 0.0), top)
    # top_k=3: every draw is among the 3 largest
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(20):
        s = sample_next(logits, 2.0, top_k=3, generator=g)
        assert (top3 == s[:, None]).any(-1).all()
    # top_p: only the smallest prefix of sorted probs reaching p can be drawn
    probs = logits.softmax(-1)
    sp, order = probs.sort(-1, descending=True)
    keep_n = ((sp.cumsum(-1) - sp) < 0.5).sum(-1)
    for _ in range(20):
        s = sample_next(logits, 1.0, top_p=0.5, generator=g)
        rank = (order == s[:, None]).float().argmax(-1)
        assert (rank < keep_n).all()


def test_sampling_seeded_and_eos_and_stream():
    m = make_model(gpt_config())
    prompt = torch.randint(0, V, (2, 4))
    a = m.generate(prompt, 15, temperature=1.0, top_k=10, seed=123)
    b = m.generate(prompt, 15, temperature=1.0, top_k=10, seed=123)
    c = m.generate(prompt, 15, temperature=1.0, top_k=10, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = m.generate(prompt[:1], 10, temperature=0)
    eos = int(greedy[0, 7])
    seen = []
    out = m.generate(prompt[:1], 10, temperature=0, eos_id=eos, stream=seen.append)
    assert out.shape[1] <= 8 and out[0, -1] == eos
    assert torch.equal(torch.cat(seen), out[0, 4:])


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0),
                                dict(top_p=1.5), dict(max_new_tokens=-1)])
def test_generate_bad_args(kw):
    m = make_model(gpt_config())
    args = dict(max_new_tokens=3)
    args.update(kw)
    with pytest.raises(ValueError):
        generate(m, torch.zeros(1, 2, dtype=torch.long), **args)


@pytest.mark.parametrize("kw,match", [(dict(seed="abc"), "seed"), (dict(seed=1.5), "seed"),
                                      (dict(stream=3), "stream")])
def test_generate_bad_seed_or_stream_named(kw, match):
    m = make_model(gpt_config())
    with pytest.raises(TypeError, match=match):
        generate(m, torch.zeros(1, 2, dtype=torch.long), 3, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
])
def test_sample_next_bad_args(kw, match):
    # A negative temperature sampled the least likely tokens; NaN, top_k=0 and top_p=0 failed
    # inside torch (multinomial's "probability tensor contains either inf, nan", a size
    # mismatch).
    with pytest.raises(ValueError, match=match):
        sample_next(torch.randn(2, V), **kw)
    if kw.get("temperature", 0) != -1.0:
        with pytest.raises(ValueError, match=match):
            generate(make_model(gpt_config()), torch.zeros(1, 2, dtype=torch.long), 2, **kw)


def test_sample_next_needs_a_batch_of_rows():
    with pytest.raises(ValueError, match=r"\(batch, vocab\)"):
        sample_next(torch.randn(V), 1.0)


@pytest.mark.parametrize("cfg", [gpt_config, lambda: llama_config(tie_embeddings=True)],
                         ids=["gpt", "llama"])
def test_a_tied_model_stays_tied_through_load_state_dict_assign(cfg):
    # assign=True (loading into a model built on meta) replaced the two Parameters apart:
    # two parameters over one storage, counted twice and stepped twice by AdamW
    ref = make_model(cfg())
    with torch.device("meta"):
        m = GPT(cfg())
    m.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True)
    if m.config.pos == "rope":
        m.to_empty(device="cpu")  # the tables are not in the state dict: rebuilt on the move
        m.load_state_dict(ref.state_dict())
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.num_params() == ref.num_params()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(ids)[0], ref(ids)[0], rtol=0, atol=0)
    opt, opt_ref = m.configure_optimizers(0.1, 1e-2), ref.configure_optimizers(0.1, 1e-2)
    assert len([p for g in opt.param_groups for p in g["params"]]) == len(
        [p for g in opt_ref.param_groups for p in g["params"]])
    for model, o in ((m, opt), (ref, opt_ref)):
        model(ids, ids)[1].backward()
        o.step()
    torch.testing.assert_close(m.transformer.wte.weight, ref.transformer.wte.weight)


def test_rope_tables_come_back_exact_after_a_narrow_dtype():
    ref = make_model(llama_config())
    m = make_model(llama_config())
    m.to(torch.bfloat16).to(torch.float32)
    m.load_state_dict(ref.state_dict())   # every weight exact again; the tables are not in it
    assert torch.equal(m.rope_cos, ref.rope_cos) and torch.equal(m.rope_sin, ref.rope_sin)
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(ids)[0], ref(ids)[0], rtol=0, atol=0)
    half = make_model(llama_config()).to(torch.bfloat16)
    assert half.rope_cos.dtype == torch.bfloat16
    assert torch.equal(half.rope_cos, ref.rope_cos.to(torch.bfloat16))
    # a move that changes nothing keeps the very tensors (a captured CUDA graph reads them)
    cos = ref.rope_cos
    ref.to(torch.float32).to("cpu")
    assert ref.rope_cos is cos


def test_llama_state_dict_mapping():
    # A state dict in Hugging Face LlamaForCausalLM names, mapped back, rebuilds our model.
    m = make_model(llama_config())
    cfg, sd = m.config, m.state_dict()
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    hf = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
          "model.norm.weight": sd["transformer.ln_f.weight"],
          "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        qw, kw, vw = sd[q + "attn.c_attn.weight"].split([H * D, Hkv * D, Hkv * D])
        hf.update({p + "self_attn.q_proj.weight": qw, p + "self_attn.k_proj.weight": kw,
                   p + "self_attn.v_proj.weight": vw,
                   p + "self_attn.o_proj.weight": sd[q + "attn.c_proj.weight"],
                   p + "input_layernorm.weight": sd[q + "ln_1.weight"],
                   p + "post_attention_layernorm.weight": sd[q + "ln_2.weight"]})
        for n in ("gate_proj", "up_proj", "down_proj"):
            hf[p + f"mlp.{n}.weight"] = sd[q + f"mlp.{n}.weight"]
    m2 = GPT(cfg)
    m2.load_state_dict(llama_state_dict_to_minigpt(hf, cfg))
    idx = torch.randint(0, V, (1, 11))
    torch.testing.assert_close(m2(idx)[0], m(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("mk", CONFIGS)
def test_autocast_bf16_training_step(mk):
    # bf16 autocast (what training uses on CUDA; CPU autocast takes the same path): the
    # residual stream stays fp32, the loss is close to fp32's and every gradient is finite.
    m = make_model(mk()).train()
    idx, targets = torch.randint(0, V, (2, 11)), torch.randint(0, V, (2, 11))
    _, ref = m(idx, targets=targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(idx, targets=targets)
        logits, _ = m(idx)
    assert loss.dtype == torch.float32 and logits.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) < 5e-2 * max(1.0, ref.item())
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# The matrix-product arguments of each aten GEMM, by schema name.
_GEMM_ARGS = {"mm": ("self", "mat2"), "addmm": ("mat1", "mat2"), "bmm": ("self", "mat2"),
              "baddbmm": ("batch1", "batch2"), "addbmm": ("batch1", "batch2"),
              "mv": ("self", "vec"), "addmv": ("mat", "vec"), "dot": ("self", "tensor")}


class _GemmDtypes(TorchDispatchMode):
    """Records the dtypes of every aten matrix product below autocast (a dispatch mode sees
    the ops after autocast has cast their inputs). For addmm's out_dtype overload only the two
    factors count: its fp32 accumulator is the point."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("aten::") and name[6:] in _GEMM_ARGS:
            bound = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
            shapes = tuple(tuple(bound[a].shape) for a in _GEMM_ARGS[name[6:]])
            dts = tuple(bound[a].dtype for a in _GEMM_ARGS[name[6:]])
            self.seen.append((str(func), shapes, dts))
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("mk", CONFIGS)
def test_autocast_training_step_multiplies_in_bf16(mk, backend, monkeypatch):
    """Every matrix product of a bf16-autocast training step, forward and backward, the loss's
    included, takes bf16 factors. The H200 profile of GPT-2 training found 92 of a step's 128 ms
    in fp32 GEMMs on CUDA cores because the fused linear cross-entropy ran outside autocast
    (benchmarks/results/bench_train_cuda-h200_profile.md); CPU autocast takes the same path."""
    monkeypatch.setenv("MINIGPT_BACKEND", backend)
    m = make_model(mk()).train()
    n_linear = sum(isinstance(mod, torch.nn.Linear) for mod in m.modules())
    idx, targets = torch.randint(0, V, (2, 11)), torch.randint(0, V, (2, 11))
    audit = _GemmDtypes()
    with audit:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = m(idx, targets=targets)
        loss.backward()
    # Each Linear's forward, input-gradient and weight-gradient product, the head's (inside the
    # fused loss) included; the first block's input needs a gradient too (trained embeddings).
    assert len(audit.seen) >= 3 * n_linear, audit.seen
    assert any(V in shapes[1] for _, shapes, _ in audit.seen), "the head's product is missing"
    wrong = [s for s in audit.seen if any(d != torch.bfloat16 for d in s[2])]
    assert not wrong, f"matrix products outside bf16 under autocast: {wrong}"


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("mk", CONFIGS)
def test_training_step_on_each_kernel_backend_matches_reference(mk, backend, monkeypatch):
    """One forward and backward of the whole model on a kernel backend against the reference
    ops (fp32): the loss and every parameter's gradient. The Triton attention writes its
    output and gradients as (B, T, H, D) storage, which the model's reshapes take as views;
    a wrong stride anywhere on that path shows here, not in the per-op tests."""
    from tests.conftest import TRITON_REFUSED

    if backend == "triton" and TRITON_REFUSED:
        pytest.skip(TRITON_REFUSED)
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the interpreter on CPU tensors; a GPU runs Triton in the cuda tests")
    idx, targets = torch.randint(0, V, (2, 11)), torch.randint(0, V, (2, 11))
    grads = {}
    for be in (backend, "torch"):
        monkeypatch.setenv("MINIGPT_BACKEND", be)
        m = make_model(mk()).train()
        _, loss = m(idx, targets=targets)
        loss.backward()
        grads[be] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    (l0, g0), (l1, g1) = grads[backend], grads["torch"]
    torch.testing.assert_close(l0, l1, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-5, msg=n)


class _Fills(TorchDispatchMode):
    """Counts the ops that make or fill a tensor with a constant: each is a kernel on a GPU."""
    NAMES = ("zeros", "zeros_like", "new_zeros", "fill", "fill_", "zero_", "full", "full_like",
             "new_full", "ones", "ones_like", "new_ones")

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ in self.NAMES
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("mk", [pytest.param(gpt_config, id="gpt"),
                                pytest.param(llama_config, id="llama")])
def test_training_step_makes_no_fills_per_layer(mk, backend, monkeypatch):
    """A layer's forward and backward fill no tensor with zeros. autograd.Function used to
    hand each backward a zero tensor for every output without a gradient (the norms' mean and
    rstd, the attention's lse): five fill kernels a GPT-2 layer, 62 a micro-step."""
    from tests.conftest import TRITON_REFUSED

    if backend == "triton" and TRITON_REFUSED:
        pytest.skip(TRITON_REFUSED)
    monkeypatch.setenv("MINIGPT_BACKEND", backend)
    # Triton compiled on a GPU machine (its interpreter runs only where there is none)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    idx, targets = (torch.randint(0, V, (2, 11), device=dev) for _ in range(2))
    fills = []
    for n_layer in (1, 3):
        m = make_model(mk(n_layer=n_layer)).to(dev).train()
        count = _Fills()
        with count:
            _, loss = m(idx, targets=targets)
            loss.backward()
        assert all(p.grad is not None for p in m.parameters())
        fills.append(count.n)
    assert fills[0] == fills[1], fills
