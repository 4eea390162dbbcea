"""The dispatch's view of Triton's version: a release older than the one the kernels are tested
with is refused with a message naming both versions (an op with no explicit backend then falls
back to the next backend), unless MINIGPT_TRITON_ANY_VERSION=1."""
import argparse
import os

import pytest
import torch

from minigpt import _backend, ops
from tests.conftest import skip_if_triton_refused

triton = pytest.importorskip("triton")


@pytest.fixture
def fresh(monkeypatch):
    """Forget cached answers before and after: they depend on what the test patches."""
    def clear():
        _backend._TRITON = _backend._UNSET
        _backend._RESOLVED.clear()
    clear()
    yield monkeypatch
    monkeypatch.undo()
    clear()


@pytest.mark.parametrize("text, want", [("3.6.0", (3, 6)), ("3.10.1", (3, 10)),
                                        ("3.7.0+git8a1b2c", (3, 7)), ("3.1", (3, 1)),
                                        ("nightly", (0, 0))])
def test_version_tuple(text, want):
    assert _backend._version_tuple(text) == want


def test_installed_triton_judged_by_its_version():
    new_enough = _backend._version_tuple(triton.__version__) >= _backend.MIN_TRITON
    assert (_backend.triton_version_problem() is None) == new_enough or \
        os.environ.get("MINIGPT_TRITON_ANY_VERSION") == "1"
    assert (_backend._triton_status() is None) == (_backend.triton_version_problem() is None)


def test_old_triton_refused_with_versions(fresh):
    fresh.setattr(triton, "__version__", "3.1.0")
    fresh.delenv("MINIGPT_TRITON_ANY_VERSION", raising=False)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = _backend._unavailable_reason("triton", dev)
    assert why is not None and "3.1.0" in why and "3.6" in why
    assert "triton" not in _backend.available_backends(dev)
    x = torch.randn(3, 7, device=dev)
    with pytest.raises(_backend.BackendUnavailableError, match="triton 3.1.0 is older"):
        ops.softmax(x, backend="triton")
    # No explicit backend: the op runs on the next one, with the reference's numbers.
    torch.testing.assert_close(ops.softmax(x), torch.softmax(x, -1), rtol=1e-6, atol=1e-6)


def test_old_triton_allowed_on_request(fresh):
    fresh.setattr(triton, "__version__", "3.1.0")
    fresh.setenv("MINIGPT_TRITON_ANY_VERSION", "1")
    assert _backend._triton_status() is None


def test_kernel_modules_import_on_a_triton_without_knobs():
    """torch 2.5's Triton 3.1 has no triton.knobs: kernels/_util.py imported it unguarded, so
    `import minigpt.kernels.attention` failed there (where the backend is refused anyway, but
    the launch rules and the tests import it: three test files failed to collect on torch
    2.5.1). Without knobs, TRITON_INTERPRET is read as such a Triton reads it: "1" only."""
    import subprocess
    import sys

    code = (
        "import sys, triton\n"
        "vars(triton).pop('knobs', None)\n"  # Triton < 3.4 has none to remove
        "sys.modules['triton.knobs'] = None\n"  # `from triton import knobs` raises ImportError
        "import minigpt.kernels.attention\n"
        "from minigpt.kernels import _util\n"
        "assert _util._knobs is None\n"
        "import os\n"
        "print(_util.interpreting(), end=' ')\n"
        "os.environ['TRITON_INTERPRET'] = 'true'\n"
        "print(_util.interpreting())\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "False"]


def test_newer_triton_accepted(fresh):
    fresh.setattr(triton, "__version__", "4.0.0")
    assert _backend._triton_status() is None


def test_compiled_code_follows_env_backend(monkeypatch):
    """A graph traced with MINIGPT_BACKEND unset must not be reused once it is set, nor the
    reverse: torch.compile guards on the variable (Dynamo's os.environ.get guards only a value
    it found, which once ran our kernels in bench train's 'compile' variant)."""
    import torch._dynamo

    seen = []

    def f(x):
        be = _backend.resolve("softmax", None, x.device, x.dtype)
        return x + len(be)  # the chosen backend's name, baked into the graph

    torch._dynamo.reset()
    cf = torch.compile(f, backend="eager", fullgraph=True)
    x = torch.randn(3)
    default = _backend.resolve("softmax", None, x.device, x.dtype)
    assert default != "torch"
    for env in ["torch", None, "torch", None]:
        if env is None:
            monkeypatch.delenv(_backend.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(_backend.ENV_VAR, env)
        seen.append(round(float((cf(x) - x)[0])))
    want = [len("torch"), len(default)] * 2
    assert seen == want, f"compiled code kept a stale backend: {seen}, want {want}"
    torch._dynamo.reset()


def test_env_backend_read():
    os.environ.pop(_backend.ENV_VAR, None)
    assert _backend._env_backend() is None
    os.environ[_backend.ENV_VAR] = "torch"
    try:
        assert _backend._env_backend() == "torch"
    finally:
        del os.environ[_backend.ENV_VAR]


def test_host_int_helpers_match_triton():
    """kernels/_util's cdiv and next_pow2 stand in for Triton's (slow to call from Python in
    3.6) in every launcher's grid and block sizes: they must agree everywhere."""
    import triton

    from minigpt.kernels._util import cdiv, next_pow2

    for n in list(range(0, 4200)) + [65535, 65536, 65537, 2**31 - 1, 2**31]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
    for a in range(0, 700):
        for b in (1, 2, 3, 7, 16, 64, 100, 1024):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


@skip_if_triton_refused  # it compiles a call that resolves to Triton
def test_compiling_a_triton_op_call_warns_nothing(fresh):
    """torch.compile traces our dispatch: an lru_cache on its Triton check made Dynamo warn
    ("a call to a functools.lru_cache-wrapped function") at compiles of code that asks for the
    Triton backend (seen on the H100, 2026-11-26). With the check's answer not yet known, the
    trace runs through the check itself."""
    import warnings

    import torch._dynamo
    import torch._dynamo.utils

    def f(x):
        return _backend.resolve("softmax", "triton", x.device, x.dtype)

    x = torch.randn(3)
    want = f(x)
    _backend._TRITON = _backend._UNSET
    _backend._RESOLVED.clear()  # else resolve() answers from its memo, never reaching the check
    # Dynamo warns once per message and process: forget what earlier tests triggered.
    fresh.setattr(torch._dynamo.utils, "warn_once_cache", set(), raising=False)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(f, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    assert got == want == "triton"
    assert not [str(w.message) for w in caught if "Dynamo" in str(w.message)]


def test_backend_argument_is_read_as_the_environment_variable_is(monkeypatch):
    # MINIGPT_BACKEND=" CPU " always worked; the same name as an argument was refused.
    monkeypatch.delenv("MINIGPT_BACKEND", raising=False)
    x = torch.randn(3, 7)
    torch.testing.assert_close(ops.softmax(x, backend=" CPU "), ops.softmax(x, backend="cpu"),
                               rtol=0, atol=0)
    assert _backend.resolve("softmax", "Torch", torch.device("cpu")) == "torch"


@skip_if_triton_refused  # an older Triton is refused for its version before import order
def test_triton_imported_before_minigpt_is_a_clear_unavailable_backend():
    # transformers imports triton; minigpt then sets TRITON_INTERPRET too late for triton's own
    # @jit helpers, and a kernel failed with "Cannot call @triton.jit'd outside of the scope
    # of a kernel". A fresh process, as a user's script would import them.
    import subprocess
    import sys

    code = ("import os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "import triton, torch\n"
            "import minigpt\n"
            "from minigpt import ops, _backend\n"
            "assert 'triton' not in _backend.available_backends('cpu')\n"
            "try:\n"
            "    ops.softmax(torch.randn(2, 3), backend='triton')\n"
            "except _backend.BackendUnavailableError as e:\n"
            "    print('ERR', e)\n"
            "print(ops.softmax(torch.randn(2, 3)).shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "imported (e.g. by transformers) before minigpt" in r.stdout
    assert "torch.Size([2, 3])" in r.stdout



def _kernel_op_cases():
    t = torch.randint(0, 7, (6,))
    return {  # name: (input shapes, op on those inputs)
        "softmax": ([(4, 7)], lambda be, x: ops.softmax(x, backend=be)),
        "layer_norm": ([(4, 7), (7,), (7,)],
                       lambda be, x, w, b: ops.layer_norm(x, w, b, backend=be)),
        "rms_norm": ([(4, 7), (7,)], lambda be, x, w: ops.rms_norm(x, w, backend=be)),
        "add_rms_norm": ([(4, 7), (7,), (4, 7)],
                         lambda be, x, w, r: ops.rms_norm(x, w, residual=r, backend=be)[0]),
        "swiglu": ([(4, 7), (4, 7)], lambda be, g, u: ops.swiglu(g, u, backend=be)),
        "attention": ([(1, 2, 5, 8)] * 3, lambda be, q, k, v: ops.attention(q, k, v, backend=be)),
        "cross_entropy": ([(6, 7)], lambda be, x: ops.cross_entropy(x, t, backend=be)),
        "fused_linear_cross_entropy": ([(6, 5), (7, 5)], lambda be, h, w:
                                       ops.fused_linear_cross_entropy(h, w, t, backend=be)),
    }


@pytest.mark.parametrize("name", list(_kernel_op_cases()))
def test_second_derivatives_refused_by_kernel_backends_not_silently_wrong(name):
    """With create_graph=True the kernel backends' gradients came back as constants: a second
    derivative silently dropped the op's own term (grad of (grad(op(x)) + 3x**2) * r came out
    as 6xr). They now refuse create_graph; first derivatives match the reference."""
    shapes, op = _kernel_op_cases()[name]
    torch.manual_seed(0)
    inputs = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    with pytest.raises(RuntimeError, match="first derivatives only.*backend='torch'"):
        torch.autograd.grad((op("cpu", *inputs) ** 2).sum(), inputs, create_graph=True)
    got = torch.autograd.grad((op("cpu", *inputs) ** 2).sum(), inputs)
    want = torch.autograd.grad((op("torch", *inputs) ** 2).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_forward_mode_ad_is_refused_by_kernel_backends():
    # The bare forward (no input requires grad) dropped a dual input's tangent silently.
    import torch.autograd.forward_ad as fwAD

    w = torch.randn(16)
    with fwAD.dual_level():
        d = fwAD.make_dual(torch.randn(3, 16), torch.randn(3, 16))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            ops.rms_norm(d, w, backend="cpu")
        assert fwAD.unpack_dual(ops.rms_norm(d, w, backend="torch")).tangent is not None
        plain = ops.rms_norm(torch.randn(3, 16), w, backend="cpu")  # no tangent: fine
    assert plain.shape == (3, 16)


def test_torch_func_transforms_are_refused_by_kernel_backends():
    # grad/jacrev failed naming the internal _EagerRMSNorm ("must override setup_context"),
    # vmap with "Cannot access data pointer"; the torch backend runs under them.
    w = torch.randn(16)
    f = {be: (lambda x, be=be: ops.rms_norm(x, w, backend=be).sum()) for be in ("cpu", "torch")}
    x = torch.randn(3, 16)
    for transform in (torch.func.grad, torch.func.vmap):
        with pytest.raises(NotImplementedError, match="torch.func transforms"):
            transform(f["cpu"])(x)
    torch.testing.assert_close(torch.func.grad(f["torch"])(x),
                               torch.autograd.functional.jacobian(f["torch"], x))


@pytest.mark.parametrize("blank", [" ", "\t", " \n "])
def test_blank_env_backend_counts_as_unset(fresh, blank):
    # MINIGPT_BACKEND="" meant "unset" but " " was read as the backend '' and every op failed
    # with "unknown backend ''".
    fresh.delenv(_backend.ENV_VAR, raising=False)
    dev = torch.device("cpu")
    want = _backend.resolve("softmax", None, dev, torch.float32)
    fresh.setenv(_backend.ENV_VAR, blank)
    assert _backend.resolve("softmax", None, dev, torch.float32) == want
    x = torch.randn(3, 7)
    torch.testing.assert_close(ops.softmax(x), torch.softmax(x, -1), rtol=1e-6, atol=1e-6)
    fresh.setenv(_backend.ENV_VAR, " Torch ")  # a name is still read as before
    assert _backend.resolve("softmax", None, dev, torch.float32) == "torch"


def test_triton_interpreter_refused_with_numpy_2_4(fresh):
    # Triton 3.6's interpreter converts (1,)-shaped arrays with int(), an error since numpy
    # 2.4: the backend was offered and attention / cross-entropy failed inside it
    import numpy

    fresh.setattr(triton, "__version__", "3.6.0")
    fresh.setattr(numpy, "__version__", "2.4.1")
    fresh.setenv("TRITON_INTERPRET", "1")
    why = _backend._unavailable_reason("triton", torch.device("cpu"))
    assert why is not None and "numpy < 2.4" in why and "2.4.1" in why
    fresh.setattr(numpy, "__version__", "2.3.5")
    _backend._RESOLVED.clear()
    assert _backend._unavailable_reason("triton", torch.device("cpu")) is None


@skip_if_triton_refused  # an older Triton reads only "1"; the backend is refused there anyway
@pytest.mark.parametrize("value", ["true", "On", "yes"])
def test_triton_interpret_read_as_triton_reads_it(fresh, value):
    fresh.setenv("TRITON_INTERPRET", value)
    assert _backend._unavailable_reason("triton", torch.device("cpu")) is None


def test_a_broken_triton_install_leaves_the_other_backends(fresh):
    import builtins

    real = builtins.__import__

    def broken(name, *a, **k):
        if name == "triton":
            raise RuntimeError("libtriton.so: undefined symbol")
        return real(name, *a, **k)

    fresh.setattr(builtins, "__import__", broken)
    why = _backend._triton_status()
    assert why.startswith("triton failed to import (RuntimeError: libtriton.so")
    assert "triton" not in _backend.available_backends(torch.device("cpu"))
    x = torch.randn(3, 7)
    torch.testing.assert_close(ops.softmax(x), torch.softmax(x, -1), rtol=1e-6, atol=1e-6)


def test_backend_names_checked_as_the_ops_take_them():
    _backend.check_backend_name(" CPU ")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        _backend.check_backend_name("fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks about CUDA on a machine without it")
@skip_if_triton_refused  # an older Triton's refusal is the one named first
def test_no_triton_on_cuda_without_cuda(fresh):
    assert "triton" not in _backend.available_backends("cuda")
    assert "no CUDA device" in _backend._unavailable_reason("triton", torch.device("cuda"))


def test_pick_device_refuses_an_index_past_the_gpus(monkeypatch):
    # generate / sample / inspect --device cuda:9 on a one-GPU machine got torch's "invalid
    # device ordinal" from deep inside the model load, not a usage error naming the option.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _backend.pick_device("cuda:0") == torch.device("cuda:0")
    assert _backend.pick_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"--device cuda:9: torch sees 1 CUDA device\(s\), "
                                         r"cuda:0 to cuda:0"):
        _backend.pick_device("cuda:9")


def test_every_device_option_takes_the_one_parser(monkeypatch):
    """The commands, the bench API, the benchmark scripts and training parsed --device with
    four copies of the rules, which drifted: training took cuda:9 on a one-GPU machine, the
    scripts refused auto, and use_device passed plain 'cuda' to torch.cuda.set_device (refused
    on the H100). All of them now ask pick_device."""
    from minigpt import bench, train

    H = bench.harness()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _backend.pick_device("cuda", indexed=True) == torch.device("cuda:0")
    assert _backend.pick_device("cpu", indexed=True) == torch.device("cpu")
    for bad, msg in (("cuda:9", "torch sees 1 CUDA device"), ("tpu", "must be auto, cpu, cuda")):
        with pytest.raises(ValueError, match=f"--device {msg}|--device {bad}: {msg}"):
            _backend.pick_device(bad)
        with pytest.raises(ValueError, match=msg):
            bench.parse_device(bad)
        with pytest.raises(ValueError, match=msg):
            train._Dist(bad)
        with pytest.raises(argparse.ArgumentTypeError, match=f"^({bad}: )?{msg}"):
            H.device_arg(bad)
    assert H.device_arg("auto") == "auto"  # the scripts' --device takes auto too now
    assert train._Dist("cpu").device == torch.device("cpu")
