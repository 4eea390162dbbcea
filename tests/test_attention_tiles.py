"""The Triton attention tile table (kernels/attention.py: tiles): its defaults, the precedence
of a tuned table written by benchmarks/tune_attention.py, the tuner's merge, and the shape of
every tile the launchers or the tuner can pick (tests/test_triton_compile.py compiles the
launchers' tiles for sm_90). The kernels' tests here (unequal tiles, the atomic dQ) run in the
interpreter, or compiled on a GPU machine (DEV)."""
import importlib.util
import json
import os
import re

import pytest
import torch

pytest.importorskip("triton")
from tests.conftest import skip_if_triton_refused  # noqa: E402

pytestmark = skip_if_triton_refused
from minigpt.kernels import _util  # noqa: E402
from minigpt.kernels import attention as attn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA0 = torch.device("cuda", 0)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KEY = re.compile(r"^(fwd|dkdv|dq)/(16bit|fp32)/d(16|32|64|128|256)/(causal|full)"
                 r"(/dropout)?(/short)?$")


def _tuner():
    spec = importlib.util.spec_from_file_location(
        "tune_attention", os.path.join(ROOT, "benchmarks", "tune_attention.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """An sm_90 GPU as far as tiles() can tell, with an empty tuned table in tmp_path."""
    monkeypatch.setattr(_util, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(attn, "TUNED_PATH", str(tmp_path / "attention_tuned.json"))
    monkeypatch.setattr(attn, "_tuned_cache", {})
    return monkeypatch


def _valid_tiles(t):
    bm, bn, warps, stages, *mode = t  # a fifth entry: dK/dV's atomic dQ (0 or 1)
    return (bm in (16, 32, 64, 128, 256) and bn in (16, 32, 64, 128, 256)
            and warps in (1, 2, 4, 8, 16) and 1 <= stages <= 6 and mode in ([], [0], [1]))


def test_defaults_without_a_table(gpu):
    for bd, row in ((16, 64), (32, 64), (64, 64), (128, 128), (256, 256)):
        for kernel in ("fwd", "dkdv", "dq"):
            assert attn.tiles(kernel, torch.bfloat16, bd, True, CUDA0) == \
                attn._DEFAULT_16BIT[row][kernel]
            assert attn.tiles(kernel, torch.float16, bd, False, CUDA0) == \
                attn._DEFAULT_16BIT[row][kernel]
            assert attn.tiles(kernel, torch.float32, bd, True, CUDA0) == \
                attn._DEFAULT_FP32[row][kernel]
    # The interpreter's tiles on CPU tensors, whatever the table says.
    assert attn.tiles("fwd", torch.bfloat16, 128, True, torch.device("cpu")) == \
        attn._INTERPRETER_TILES


def test_tuned_entry_takes_precedence_for_its_architecture_only(gpu):
    tuner = _tuner()
    key = attn.config_key("dq", torch.bfloat16, 128, True)
    assert key == "dq/16bit/d128/causal"
    tuner.merge_table(attn.TUNED_PATH, "sm90", {key: {"tiles": [128, 32, 4, 3]}})
    tuner.merge_table(attn.TUNED_PATH, "sm80", {key: {"tiles": [64, 32, 4, 2]}})
    assert attn.tiles("dq", torch.bfloat16, 128, True, CUDA0) == (128, 32, 4, 3)
    assert attn.tiles("dq", torch.float16, 128, True, CUDA0) == (128, 32, 4, 3)  # 16-bit
    # Other points keep their defaults.
    assert attn.tiles("dq", torch.bfloat16, 128, False, CUDA0) == attn._DEFAULT_16BIT[128]["dq"]
    assert attn.tiles("dkdv", torch.bfloat16, 128, True, CUDA0) == \
        attn._DEFAULT_16BIT[128]["dkdv"]
    assert attn.tiles("dq", torch.float32, 128, True, CUDA0) == attn._DEFAULT_FP32[128]["dq"]
    gpu.setattr(_util, "_capability", lambda index: (8, 0))
    assert attn.tiles("dq", torch.bfloat16, 128, True, CUDA0) == (64, 32, 4, 2)
    gpu.setattr(_util, "_capability", lambda index: (10, 0))
    assert attn.tiles("dq", torch.bfloat16, 128, True, CUDA0) == attn._DEFAULT_16BIT[128]["dq"]


def test_merge_keeps_other_entries_and_leaves_no_temp_file(tmp_path):
    tuner = _tuner()
    path = str(tmp_path / "t.json")
    tuner.merge_table(path, "sm90", {"fwd/16bit/d64/causal": {"tiles": [128, 64, 4, 3]}})
    tuner.merge_table(path, "sm90", {"fwd/16bit/d64/full": {"tiles": [64, 64, 4, 4]},
                                     "fwd/16bit/d64/causal": {"tiles": [128, 128, 8, 2]}})
    with open(path) as f:
        table = json.load(f)
    assert table == {"sm90": {"fwd/16bit/d64/causal": {"tiles": [128, 128, 8, 2]},
                              "fwd/16bit/d64/full": {"tiles": [64, 64, 4, 4]}}}
    assert os.listdir(tmp_path) == ["t.json"]


def test_every_tile_the_launchers_or_tuner_can_pick_is_well_formed(gpu):
    tuner = _tuner()
    picks = [t for table in (attn._DEFAULT_16BIT, attn._DEFAULT_FP32) for row in table.values()
             for t in row.values()]
    picks += [t for table in (tuner.CANDIDATES_16BIT, tuner.CANDIDATES_FP32)
              for lst in table.values() for t in lst]
    picks.append(attn._INTERPRETER_TILES)
    bad = [t for t in picks if not _valid_tiles(t)]
    assert not bad, f"malformed tiles: {bad}"
    # The committed table, once a GPU session has written one.
    path = os.path.join(ROOT, "kernels", "attention_tuned.json")
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
        for arch, entries in table.items():
            assert re.fullmatch(r"sm\d+", arch), arch
            for key, entry in entries.items():
                assert KEY.match(key), f"{arch}: bad key {key!r}"
                assert _valid_tiles(tuple(entry["tiles"])), f"{arch} {key}: {entry['tiles']}"


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_tuner_checks_and_times_candidates(kernel):
    """The tuner's own logic, through the interpreter at toy sizes (a GPU session has no time
    to find a bug in it): correct tiles pass the reference check and get timed, a wrong
    answer is caught, and the winner is one of the candidates."""
    tuner = _tuner()
    cpu = torch.device("cpu")
    point = tuner.Point(kernel, torch.float32, 24, True, cpu, big=(1, 2, 40),
                        small=(1, 2, 1, 20, 27))
    cands = [(32, 32, 4, 1), (16, 16, 4, 1)]
    assert point.check(cands[0]) is None
    rows, best, info = tuner.tune_point(point, cands, cpu, budget_s=0.05)
    assert best in cands and info["ms"] > 0 and info["default_ms"] > 0
    assert sorted(r["tiles"] for r in rows) == sorted(str(c) for c in cands)
    assert all(r["status"] == "ok" and r["TFLOP/s"] > 0 for r in rows)
    name = "out" if kernel == "fwd" else kernel[-2:]
    point.ref[name] = point.ref[name] + 0.01  # the reference moved: every tile is now wrong
    assert point.check(cands[0]).startswith(f"{name} error")


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16), (64, 16), (32, 128), (128, 32)], ids=str)
@pytest.mark.parametrize("T,S,causal", [(100, 100, True), (70, 33, True), (33, 100, True),
                                        (45, 70, False)], ids=str)
def test_kernels_with_unequal_tiles(tiles, T, S, causal):
    """The launchers' defaults and the tuner's candidates have BLOCK_M != BLOCK_N (the
    interpreter's own tiles are square): the causal split of each kernel into masked and
    unmasked blocks must hold for any pair. Forward and both backward kernels, GQA, ragged
    lengths, T > S and T < S, against the fp64 reference (interpreter; fp32)."""
    from minigpt import reference

    from ._tol import assert_close

    bm, bn = tiles
    cfg = (bm, bn, 4, 1)
    g = torch.Generator().manual_seed(T * 1000 + S + bm)
    q, k, v, do = (torch.randn(*shape, generator=g).to(DEV) for shape in
                   [(1, 4, T, 24), (1, 2, S, 24), (1, 2, S, 24), (1, 4, T, 24)])
    out, lse = attn.attention_fwd(q, k, v, causal, 24 ** -0.5, config=cfg)
    dq, dk, dv = attn.attention_bwd(do, q, k, v, out, lse, causal, 24 ** -0.5,
                                    dkdv_config=cfg, dq_config=cfg)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, causal=causal)
    ref.backward(do.double())
    for name, got, want in (("out", out, ref), ("dq", dq, q64.grad), ("dk", dk, k64.grad),
                            ("dv", dv, v64.grad)):
        assert_close(got, want.detach(), want.detach().float(), torch.float32, name)


def test_small_grids_get_their_owned_block_halved_until_the_sms_are_busy(gpu):
    # 132 SMs (an H100 SXM): a grid of fewer programs has the block a program owns halved,
    # down to 32 (queries for fwd and dq, keys for dK/dV); warps, stages and the other block
    # are kept; a grid of a wave or more keeps the table's tiles.
    gpu.setattr(_util, "_sm_count", lambda index: 132)
    fill = attn._fill_sms
    assert fill((128, 64, 4, 3), "fwd", 512, 32, CUDA0) == (64, 64, 4, 3)       # 128 -> 256
    assert fill((128, 64, 4, 3), "fwd", 1024, 32, CUDA0) == (128, 64, 4, 3)     # 256 programs
    assert fill((128, 32, 4, 5), "dq", 100, 9, CUDA0) == (32, 32, 4, 5)         # floor 32
    assert fill((32, 128, 8, 3), "dkdv", 512, 32, CUDA0) == (32, 64, 8, 3)      # keys halved
    assert fill((32, 128, 8, 3), "dkdv", 16384, 1, CUDA0) == (32, 64, 8, 3)     # 128 -> 256
    assert fill((32, 128, 8, 3), "dkdv", 32768, 1, CUDA0) == (32, 128, 8, 3)
    assert fill((128, 64, 4, 3), "fwd", 512, 32, torch.device("cpu")) == (128, 64, 4, 3)
    gpu.setattr(attn, "FILL_SMS", False)
    assert fill((128, 64, 4, 3), "fwd", 512, 32, CUDA0) == (128, 64, 4, 3)


def test_short_grids_take_their_own_tuned_tiles(gpu):
    """Where the table's tiles leave SMs idle (T = 512, B * H = 32 on an H100's 132 SMs), the
    launchers take a "/short" entry tuned at such a length (tune_attention.py --seqlen 512),
    else the table's tiles halved; a grid of a wave or more keeps the table's tiles whatever
    the short entry says. The tuner files its winners under the key the launcher reads."""
    gpu.setattr(_util, "_sm_count", lambda index: 132)
    tuner = _tuner()
    bf16 = torch.bfloat16
    table = attn._DEFAULT_16BIT[128]["dkdv"]                      # (32, 128, 8, 3)
    pick = attn.launch_tiles
    assert pick("dkdv", bf16, 128, True, CUDA0, False, 512, 32) == attn._fill_sms(
        table, "dkdv", 512, 32, CUDA0) == (32, 64, 8, 3)
    assert (tuner.entry_key("dkdv", bf16, 128, True, CUDA0, 512, 32)
            == "dkdv/16bit/d128/causal/short")
    assert tuner.entry_key("dkdv", bf16, 128, True, CUDA0, 1024, 32) == "dkdv/16bit/d128/causal"
    tuner.merge_table(attn.TUNED_PATH, "sm90",
                      {"dkdv/16bit/d128/causal/short": {"tiles": [64, 64, 4, 3]}})
    gpu.setattr(attn, "_tuned_cache", {})  # read once per process: as a new run reads it
    assert pick("dkdv", bf16, 128, True, CUDA0, False, 512, 32) == (64, 64, 4, 3)
    assert pick("dkdv", bf16, 128, True, CUDA0, False, 1024, 32) == table
    assert pick("dkdv", bf16, 128, False, CUDA0, False, 512, 32) == (32, 64, 8, 3)  # not causal
    # The tuner's candidates start with what the launcher runs there.
    cands = tuner.candidates("dkdv", bf16, 128, True, CUDA0, length=512, heads=32)
    assert cands[:3] == [(64, 64, 4, 3), table, (32, 64, 8, 3)]
    gpu.setattr(attn, "FILL_SMS", False)
    assert pick("dkdv", bf16, 128, True, CUDA0, False, 512, 32) == table


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16), (32, 32)], ids=str)
@pytest.mark.parametrize("T,S,causal", [(100, 100, True), (70, 33, True), (33, 100, True),
                                        (45, 70, False)], ids=str)
def test_backward_with_atomic_dq(tiles, T, S, causal):
    """dK/dV tiles with a fifth entry 1 (attention.atomic_dq): the dK/dV kernel adds each key
    block's dQ share with atomics and the dQ kernel does not run. GQA, ragged lengths (padded
    key rows must not reach dQ), T > S (queries that see no key), T < S, against the fp64
    reference (interpreter; fp32)."""
    from minigpt import reference

    from ._tol import assert_close

    bm, bn = tiles
    assert attn.atomic_dq((bm, bn, 4, 1, 1)) and not attn.atomic_dq((bm, bn, 4, 1))
    g = torch.Generator().manual_seed(T * 1000 + S + bm)
    q, k, v, do = (torch.randn(*shape, generator=g).to(DEV) for shape in
                   [(1, 4, T, 24), (1, 2, S, 24), (1, 2, S, 24), (1, 4, T, 24)])
    out, lse = attn.attention_fwd(q, k, v, causal, 24 ** -0.5, config=(32, 32, 4, 1))
    dq, dk, dv = attn.attention_bwd(do, q, k, v, out, lse, causal, 24 ** -0.5,
                                    dkdv_config=(bm, bn, 4, 1, 1))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, causal=causal)
    ref.backward(do.double())
    for name, got, want in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert_close(got, want.detach(), want.detach().float(), torch.float32, name)


def test_atomic_dq_with_dropout_and_packed_grads():
    # The same dropout mask (one seed) as the two-kernel backward, and dQ written into a
    # strided view (attention_qkv's packed gradient).
    from minigpt.ops.attention import _qkv_split

    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 37, 3 * 2 * 16, generator=g).to(DEV)
    q, k, v = _qkv_split(qkv, 2, 2)
    do = torch.randn(2, 2, 37, 16, generator=g).to(DEV)
    out, lse = attn.attention_fwd(q, k, v, True, 0.25, config=(16, 16, 4, 1), dropout_p=0.3,
                                  seed=77)
    want = attn.attention_bwd(do, q, k, v, out, lse, True, 0.25, dkdv_config=(16, 16, 4, 1),
                              dq_config=(16, 16, 4, 1), dropout_p=0.3, seed=77)
    dqkv = torch.empty_like(qkv)
    got = attn.attention_bwd(do, q, k, v, out, lse, True, 0.25, dkdv_config=(16, 16, 4, 1, 1),
                             dropout_p=0.3, seed=77, grads=_qkv_split(dqkv, 2, 2))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(dqkv[..., :32].view(2, 37, 2, 16).transpose(1, 2), want[0],
                               rtol=1e-4, atol=1e-5)
