"""A C++ error inside minigpt._C reaches Python as an exception, not a crash.

The Python wrappers check their inputs before calling the extension, so its TORCH_CHECKs are a
second line that ordinary use never reaches. On the H100 image (2026-11-26) one such throw, from
a `_C` compiled there with /opt/gcc's g++, ended the test process with SIGSEGV. These calls go
straight to `_C` with input that fails a TORCH_CHECK. Each runs in a child process, so a crash
shows up as this test's failure (with the signal) instead of taking a pytest worker down.
"""
import subprocess
import sys
import textwrap

import pytest

CASES = {
    "cross_entropy_fwd": (
        "C.cross_entropy_fwd(torch.randn(4, 0), torch.zeros(4, dtype=torch.long), None, -100, "
        "0.0, 1.0)",
        "non-empty class dimension"),
    "layer_norm_fwd": (
        "C.layer_norm_fwd(torch.randn(3, 0), torch.randn(0), None, None, 1e-5)",
        "non-empty last dimension"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpp_error_is_a_python_exception(name):
    call, message = CASES[name]
    code = textwrap.dedent(f"""
        import torch
        from minigpt import _backend
        C = _backend.extension()
        try:
            {call}
        except RuntimeError as e:
            print("raised:", str(e).splitlines()[0])
        else:
            print("no error")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (f"_C.{name} with bad input ended the process with code "
                               f"{p.returncode} (negative: killed by that signal):\n{p.stderr}")
    assert "raised:" in p.stdout and message in p.stdout, p.stdout + p.stderr
