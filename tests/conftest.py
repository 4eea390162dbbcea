"""Shared test setup. TRITON_INTERPRET must be decided before anything imports triton:
without a GPU the Triton backend runs in its interpreter on CPU tensors."""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import minigpt  # noqa: E402,F401
from minigpt import _backend  # noqa: E402

TRITON_REFUSED = _backend.triton_version_problem()
# For modules that run the Triton kernels directly (minigpt.kernels), not through the dispatch.
skip_if_triton_refused = pytest.mark.skipif(TRITON_REFUSED is not None,
                                            reason=TRITON_REFUSED or "")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs(supported=_backend.BACKENDS):
    """Every (backend, device) this machine can run; the kernel backends only where they exist.
    A backend that should exist but does not (e.g. _C failed to build) fails the test rather
    than hiding: see test_backends_present."""
    pairs = []
    for dev in DEVICES:
        for be in supported:
            if be == "cuda" and dev != "cuda":
                continue
            if be == "cpu" and dev != "cpu":
                continue
            if be == "triton" and dev == "cpu" and torch.cuda.is_available():
                continue  # a GPU machine runs Triton compiled, not the interpreter
            # The one deliberate absence: a Triton older than the kernels are tested with is
            # refused by the dispatch (tests/test_backend.py checks that refusal).
            marks = ([pytest.mark.skip(reason=TRITON_REFUSED)]
                     if be == "triton" and TRITON_REFUSED else [])
            pairs.append(pytest.param(be, dev, id=f"{be}-{dev}", marks=marks))
    return pairs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _ieee_subnormals():
    # torch 2.5's Inductor loads CPU kernels built with -ffast-math, whose loader turns on
    # flush-to-zero for the thread: after a compile test every later test saw subnormals as 0
    # (on 2.5.1, test_swiglu_extreme_gates_match_silu failed after test_rope's compile). Each
    # test starts as a process does; tests/test_sample.py checks the sampler with it on.
    torch.set_flush_denormal(False)
    yield


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    # A MINIGPT_BACKEND in the developer's shell must not change what the tests exercise.
    monkeypatch.delenv("MINIGPT_BACKEND", raising=False)
    yield


@pytest.fixture(scope="session")
def cuda_emu(tmp_path_factory):
    """csrc/*.cu built for the CPU CUDA emulator (tests/cuda_emu): the CUDA kernels' numbers are
    checked on every machine, not only where a GPU is."""
    from tests.cuda_emu import build
    lib = build.build(tmp_path_factory.mktemp("cuda_emu"),
                      extra=[build.HERE / "selftest.cu"])
    return build.Emulator(lib)
