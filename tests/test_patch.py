"""minigpt.patch.apply_to_llama: a tiny random transformers Llama gives the same logits, loss and
gradients patched and unpatched, really runs on minigpt.ops, generates the same tokens with a KV
cache, falls back correctly with a padding mask, and reverts exactly."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import minigpt.ops  # noqa: E402
from minigpt import _backend  # noqa: E402
from minigpt.patch import apply_to_llama, is_patched, revert  # noqa: E402

V = 128
RTOL = 1e-5


def _model(attn_implementation="sdpa", **kw):
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=attn_implementation, **kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norm weights, so a skipped weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _batch():
    ids = torch.randint(0, V, (2, 16))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 9] = -100
    return ids, labels


def _rel_close(a, b, name, rtol=RTOL):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rtol * max(scale, 1e-6), f"{name}: max error {err:.3e} vs scale {scale:.3e}"


class _Spy:
    """Counts calls to each minigpt.ops function the patch should reach."""

    NAMES = ("rms_norm", "rope", "swiglu", "attention", "cross_entropy",
             "fused_linear_cross_entropy")

    def __init__(self, monkeypatch):
        self.calls = {n: 0 for n in self.NAMES}
        for n in self.NAMES:
            fn = getattr(minigpt.ops, n)
            monkeypatch.setattr(minigpt.ops, n, self._wrap(n, fn))

    def _wrap(self, name, fn):
        def spy(*a, **k):
            self.calls[name] += 1
            return fn(*a, **k)

        return spy


# The Triton interpreter is slow: one attention implementation is enough for it. (With a GPU
# the interpreter is off, and the model here lives on the CPU.)
CASES = [(be, impl) for be in (None, "cpu", "torch") for impl in ("sdpa", "eager")]
if _backend.is_available("triton", "cpu"):
    CASES.append(("triton", "sdpa"))


@pytest.mark.parametrize("backend,attn_implementation", CASES)
def test_patched_llama_matches_unpatched(backend, attn_implementation, monkeypatch):
    ref = _model(attn_implementation)
    patched = apply_to_llama(copy.deepcopy(ref), backend=backend)
    assert is_patched(patched) and not is_patched(ref)
    spy = _Spy(monkeypatch)
    ids, labels = _batch()

    # Training step: loss and every parameter's gradient. The patched model takes the fused
    # linear cross-entropy path and never forms the logits.
    ref.train()
    patched.train()
    out_ref = ref(ids, labels=labels)
    out = patched(ids, labels=labels)
    assert out.logits is None
    _rel_close(out.loss, out_ref.loss, "loss")
    names = [n for n, _ in ref.named_parameters()]
    g_ref = torch.autograd.grad(out_ref.loss, list(ref.parameters()))
    g = torch.autograd.grad(out.loss, list(patched.parameters()))
    for n, a, b in zip(names, g, g_ref):
        _rel_close(a, b, f"grad {n}")
    # Every layer really ran on minigpt.ops: 2 norms per layer + the final one, one rope,
    # attention and swiglu per layer, one fused loss.
    assert spy.calls == {"rms_norm": 5, "rope": 2, "swiglu": 2, "attention": 2,
                         "cross_entropy": 0, "fused_linear_cross_entropy": 1}

    # Logits (no labels), and loss + logits together through ops.cross_entropy.
    ref.eval()
    patched.eval()
    with torch.no_grad():
        _rel_close(patched(ids).logits, ref(ids).logits, "logits")
        both = patched(ids, labels=labels)
        both_ref = ref(ids, labels=labels)
    _rel_close(both.logits, both_ref.logits, "logits with labels")
    _rel_close(both.loss, both_ref.loss, "eval loss")
    assert spy.calls["cross_entropy"] == 1


def test_logits_on_request_and_num_items_in_batch():
    ref, ids, labels = _model(), *_batch()
    patched = apply_to_llama(copy.deepcopy(ref))
    n = torch.tensor(50)
    out_ref = ref(ids, labels=labels, num_items_in_batch=n)
    out = patched(ids, labels=labels, num_items_in_batch=n, skip_logits=False)
    _rel_close(out.loss, out_ref.loss, "loss / num_items_in_batch")
    _rel_close(out.logits, out_ref.logits, "logits")
    fused = patched(ids, labels=labels, num_items_in_batch=n, skip_logits=True)
    _rel_close(fused.loss, out_ref.loss, "fused loss / num_items_in_batch")
    tup = patched(ids, labels=labels, return_dict=False)
    _rel_close(tup[0], ref(ids, labels=labels).loss, "tuple output")


def test_padding_mask_falls_back_and_matches(monkeypatch):
    ref = _model()
    patched = apply_to_llama(copy.deepcopy(ref))
    spy = _Spy(monkeypatch)
    ids, _ = _batch()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second sequence
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = patched(ids, attention_mask=mask).logits
    # Padded query rows see nothing; compare the real tokens.
    _rel_close(b[0], a[0], "logits row 0")
    _rel_close(b[1, 5:], a[1, 5:], "logits row 1")
    assert spy.calls["attention"] == 0 and spy.calls["rope"] == 2  # transformers' attention
    with torch.no_grad():
        patched(ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is purely causal
    assert spy.calls["attention"] == 2


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_bidirectional_llama_is_not_run_causal(attn_implementation):
    # transformers 5: model(ids, is_causal=False) or config.is_causal = False; no mask reaches
    # the attention then, and "no mask, T == S" had meant causal to the patch
    ref = _model(attn_implementation)
    patched = apply_to_llama(copy.deepcopy(ref))
    ids, _ = _batch()
    with torch.no_grad():
        causal, bidir = ref(ids).logits, ref(ids, is_causal=False).logits
        if torch.allclose(causal, bidir):
            pytest.skip(f"transformers {transformers.__version__} has no bidirectional Llama")
        _rel_close(patched(ids, is_causal=False).logits, bidir, "is_causal=False")
        ref.config.is_causal = patched.config.is_causal = False
        _rel_close(patched(ids).logits, ref(ids).logits, "config.is_causal=False")


def test_padded_batch_under_inference_mode():
    # transformers' pipelines run in inference mode, whose tensors have no version counter
    ref = _model()
    patched = apply_to_llama(copy.deepcopy(ref))
    ids, _ = _batch()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.inference_mode():
        for _ in range(2):  # the second call finds the memo
            a = ref(ids, attention_mask=mask).logits
            b = patched(ids, attention_mask=mask).logits
            _rel_close(b[0], a[0], "logits row 0")
            _rel_close(b[1, 5:], a[1, 5:], "logits row 1")
        full = torch.ones_like(ids)
        _rel_close(patched(ids, attention_mask=full).logits, ref(ids).logits, "unpadded")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_mask_refilled_in_place_is_read_again(attn_implementation):
    # one 4-D mask buffer reused for each batch (packed documents): the memo of "causal?" was
    # keyed on the tensor alone and kept the first batch's answer
    ref = _model(attn_implementation)
    patched = apply_to_llama(copy.deepcopy(ref))
    ids, _ = _batch()
    T = ids.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(2, 1, T, T)
    # transformers' eager attention adds a 4-D mask to the scores: additive there, bool for SDPA
    hidden = False if attn_implementation == "sdpa" else torch.finfo(torch.float32).min
    mask = (allowed.clone() if attn_implementation == "sdpa" else
            torch.zeros(2, 1, T, T).masked_fill(~allowed, hidden))
    with torch.no_grad():
        _rel_close(patched(ids, attention_mask=mask).logits,
                   ref(ids, attention_mask=mask.clone()).logits, "causal mask")
        mask[:, :, 8:, :8] = hidden  # two documents of 8 tokens, each causal on its own
        _rel_close(patched(ids, attention_mask=mask).logits,
                   ref(ids, attention_mask=mask.clone()).logits, "packed documents")


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_generate_with_cache_matches(attn_implementation, cache_implementation):
    ref = _model(attn_implementation)
    patched = apply_to_llama(copy.deepcopy(ref))
    ids = torch.randint(0, V, (1, 6))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0,
              cache_implementation=cache_implementation)
    torch.testing.assert_close(patched.generate(ids, **kw), ref.generate(ids, **kw), rtol=0,
                               atol=0)


def test_partial_patch_and_revert(monkeypatch):
    ref = _model()
    model = copy.deepcopy(ref)
    apply_to_llama(model, rms_norm=False, attention=False, cross_entropy=False)
    spy = _Spy(monkeypatch)
    ids, labels = _batch()
    with torch.no_grad():
        _rel_close(model(ids).logits, ref(ids).logits, "partial logits")
    assert spy.calls["rms_norm"] == 0 and spy.calls["attention"] == 0
    assert spy.calls["rope"] == 2 and spy.calls["swiglu"] == 2

    apply_to_llama(model)  # re-patching starts from scratch
    revert(model)
    assert not is_patched(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    spy.calls = dict.fromkeys(spy.calls, 0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels=labels).loss, ref(ids, labels=labels).loss,
                                   rtol=0, atol=0)
    assert sum(spy.calls.values()) == 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="Llama"):
        apply_to_llama(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        apply_to_llama(_model(), backend="fast")
    assert is_patched(apply_to_llama(_model(), backend=" Torch "))  # as the ops take names


def test_patched_model_pickles_and_compiles_fullgraph():
    """torch.save of a patched model wrote a file that could not be loaded (a bound method
    pickles as getattr(module, '_attention_forward')), and torch.compile(fullgraph=True) of
    the patched causal-LM forward stopped at dataclasses.fields."""
    import io

    ref = _model()
    model = apply_to_llama(copy.deepcopy(ref))
    ids, labels = _batch()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert is_patched(back)
    with torch.no_grad():
        want = ref(ids, labels=labels)
        got = back(ids, labels=labels)
        torch.testing.assert_close(back.eval()(ids).logits, model.eval()(ids).logits,
                                   rtol=0, atol=0)
        _rel_close(got.loss, want.loss, "loss after torch.load")
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        _rel_close(compiled(ids, labels=labels).loss, want.loss, "compiled loss")
    revert(back)
    assert not is_patched(back)


def test_replacement_forwards_import_nothing():
    """The forwards that run inside a patched model import nothing when called: transformers
    and transformers.models.llama are lazy modules, and Dynamo of torch 2.11 (the GPU image's)
    refused to import one in a traced function ("Bad import result"), so torch.compile of a
    patched model failed there (2.13 allows it, so only this test shows it here)."""
    import dis

    from minigpt import patch

    fns = [patch._rms_norm_forward, patch._mlp_forward, patch._mask_is_causal,
           patch._attention_forward, patch._keep, patch._causal_lm_forward]
    for fn in fns:
        imports = [i.argval for i in dis.get_instructions(fn) if i.opname == "IMPORT_NAME"]
        assert not imports, f"{fn.__name__} imports {imports} when called"


def test_mask_check_under_compile_falls_back():
    """Under torch.compile a 4-D mask's values are not known: the check answers "not purely
    causal" (transformers' attention takes the mask) instead of failing the fullgraph trace
    on a data-dependent bool() (as it did on torch 2.11, whose transformers path passes the
    mask). Eagerly it still reads the mask."""
    from minigpt.patch import _mask_is_causal

    T = S = 5
    causal = torch.ones(1, 1, T, S, dtype=torch.bool).tril()
    padded = causal.clone()
    padded[..., 0] = False
    assert _mask_is_causal(causal, T, S) and not _mask_is_causal(padded, T, S)
    x = torch.randn(3)
    fn = torch.compile(lambda m, x: x * 2 if _mask_is_causal(m, T, S) else x - 1,
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(causal, x), x - 1)
    # No mask: the same answer as eagerly (T == S), traced without a guard on data.
    fn = torch.compile(lambda x: x * 2 if _mask_is_causal(None, T, S) else x - 1,
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), x * 2)


def test_without_transformers_import_works_and_apply_says_what_is_missing():
    """minigpt.patch imports transformers at module level now (see the test above): without
    it the module still imports, and apply_to_llama raises ImportError naming transformers."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import minigpt.patch as P\n"
            "try:\n"
            "    P.apply_to_llama(object())\n"
            "except ImportError as e:\n"
            "    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR apply_to_llama needs transformers"), r.stdout
