"""A C++ error inside minigpt._C reaches Python as an exception, not a crash.

The Python wrappers check their inputs before calling the extension, so its TORCH_CHECKs are a
second line that ordinary use never reaches. On the H100 image (2026-11-26) one such throw, from
a `_C` compiled there with /opt/gcc's g++, ended a test process with SIGSEGV; that process had
launched compiled Triton kernels before, whose launcher modules Triton builds and loads at run
time. These calls go straight to `_C` with input that fails a TORCH_CHECK, and one to a torch
op that fails in torch's own C++ (to tell our build from the process's), each in a child
process, so a crash shows up as this test's failure (with the signal) instead of taking a
pytest worker down: first in a fresh process, then (on a GPU) after a compiled Triton kernel
ran there.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

CASES = {
    "cross_entropy_fwd": (
        "C.cross_entropy_fwd(torch.randn(4, 0), torch.zeros(4, dtype=torch.long), None, -100, "
        "0.0, 1.0)",
        "non-empty class dimension"),
    "layer_norm_fwd": (
        "C.layer_norm_fwd(torch.randn(3, 0), torch.randn(0), None, None, 1e-5)",
        "non-empty last dimension"),
    "torch_matmul": ("torch.ones(2) @ torch.ones(3)", "size"),
}

# A compiled Triton kernel on the GPU (the interpreter loads no launcher module).
AFTER_TRITON = """
    from minigpt import ops
    x = torch.randn(4, 33, device="cuda")
    ops.softmax(x, backend="triton")
    torch.cuda.synchronize()
"""


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("before", ["fresh", "after-triton-cuda"])
def test_cpp_error_is_a_python_exception(name, before):
    if before == "after-triton-cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: compiled Triton kernels load their launcher there")
    call, message = CASES[name]
    code = textwrap.dedent("""
        import torch
        from minigpt import _backend
        C = _backend.extension()
    """) + (textwrap.dedent(AFTER_TRITON) if before != "fresh" else "") + textwrap.dedent(f"""
        try:
            {call}
        except RuntimeError as e:
            print("raised:", str(e).splitlines()[0])
        else:
            print("no error")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (f"{name} with bad input ({before}) ended the process with code "
                               f"{p.returncode} (negative: killed by that signal):\n{p.stderr}")
    assert "raised:" in p.stdout and message in p.stdout, p.stdout + p.stderr
