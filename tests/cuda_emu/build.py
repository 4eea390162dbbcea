"""Build csrc/*.cu for the CPU CUDA emulator (cuda_runtime.h here) and call the launchers.

The .cu sources compile unchanged except for two rewrites g++ cannot parse: kernel launches
`k<<<grid, block, smem, stream>>>(args)` and `extern __shared__ T name[];`. The launchers'
ctypes signatures are read from csrc/cuda_launchers.h, the header the .cu files are checked
against, so a test calls them exactly as the C++ bindings do.
"""
import ctypes
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common.h DType

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DYN_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")


def translate(source: str) -> str:
    """The .cu text as C++ for g++ and the emulator."""
    def launch(m):
        kernel, config = m.group(1), m.group(2)  # newlines kept: line numbers stay true
        rest = source[m.end():].lstrip()
        sep = "" if rest.startswith(")") else ", "
        return f"::emu::Launch({config})({kernel}{sep}"

    out = _LAUNCH.sub(launch, source)
    out = _DYN_SHARED.sub(r"\1* \2 = static_cast<\1*>(::emu::dynamic_smem());", out)
    assert "<<<" not in out and "extern __shared__" not in out, "a CUDA construct was not rewritten"
    return out


# A misaligned 16-byte load is a fault on a GPU but works on x86. The kernels compile with UBSan's
# alignment check, whose handler is the emulator's own (cuda_emu.cpp, no UBSan runtime linked):
# the launch fails with the source line, so a vectorized path taken for a pointer it should not
# take fails the tests instead of passing them.
SANITIZE = ["-fsanitize=alignment"]


def compiler():
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("the CUDA emulator needs a C++ compiler (g++), as the _C build does")
    return cxx


def build(out_dir: Path, extra=()) -> Path:
    """Compile every csrc/*.cu (and the `extra` .cu files) with the emulator into one shared
    library; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cxx = compiler()
    flags = ["-std=c++17", "-O1", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
             "-fno-strict-aliasing",  # packs of halves are read through uint4, as CUDA code does
             f"-I{HERE}", f"-I{CSRC}"]
    sources = [HERE / "cuda_emu.cpp"]
    for cu in [*sorted(CSRC.glob("*.cu")), *map(Path, extra)]:
        dst = out_dir / (cu.stem + "_emu.cpp")
        dst.write_text(f'#line 1 "{cu}"\n' + translate(cu.read_text()))
        sources.append(dst)

    def compile_one(src):
        obj = out_dir / (src.stem + ".o")
        extra = [] if src.name == "cuda_emu.cpp" else SANITIZE  # the handler's file is not checked
        proc = subprocess.run([cxx, *flags, *extra, "-c", str(src), "-o", str(obj)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the emulator build of {src.name} failed:\n{proc.stderr[-6000:]}")
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, sources))
    lib = out_dir / "libminigpt_cuda_emu.so"
    proc = subprocess.run([cxx, "-shared", *map(str, objs), "-o", str(lib)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"linking the CUDA emulator failed:\n{proc.stderr[-4000:]}")
    return lib


class MgAttnGeo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                "B Hq Hkv T S D qb qh qt kb kh ks vb vh vs".split()] + [("causal", ctypes.c_int)]


_CTYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float,
           "cudaStream_t": ctypes.c_void_p, "MgAttnGeo": MgAttnGeo}


def launcher_signatures():
    """{name: [ctypes type per parameter]} from csrc/cuda_launchers.h."""
    text = re.sub(r"//[^\n]*", "", (CSRC / "cuda_launchers.h").read_text())
    sigs = {}
    for name, params in re.findall(r"\bint\s+(minigpt_\w+_cuda)\s*\(([^)]*)\)\s*;", text):
        types = []
        for p in params.split(","):
            decl = " ".join(p.split())
            ptype = decl.rsplit(" ", 1)[0] if "*" not in decl else "ptr"
            ctype = ctypes.c_void_p if ptype == "ptr" else _CTYPES[ptype.replace("const ", "")]
            types.append(ctype)
        sigs[name] = types
    assert sigs, "no launchers found in csrc/cuda_launchers.h"
    return sigs


class Emulator:
    """The built library. `call(name, *args)` takes tensors (passed as their data pointers),
    None for a null pointer, Python numbers and MgAttnGeo, and raises on an error code."""

    def __init__(self, lib_path: Path):
        self.lib = ctypes.CDLL(str(lib_path))
        self.signatures = launcher_signatures()
        for name, types in self.signatures.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = types, ctypes.c_int
        self.lib.minigpt_emu_message.restype = ctypes.c_char_p
        self.lib.minigpt_emu_launch_field.restype = ctypes.c_size_t

    def last_launch(self):
        """(grid.x, dynamic shared memory bytes) of the last kernel the last call launched."""
        grid_x, _, _, _, smem = self.launches()[-1]
        return grid_x, smem

    def launches(self):
        """[(grid.x, grid.y, grid.z, threads a block, dynamic shared memory bytes)] of every
        kernel the last call launched, in order."""
        return [tuple(int(self.lib.minigpt_emu_launch_field(i, f)) for f in range(5))
                for i in range(self.lib.minigpt_emu_launch_count())]

    def call(self, name, *args):
        conv = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        self.lib.minigpt_emu_clear()
        rc = getattr(self.lib, name)(*conv)
        if rc != 0:
            why = self.lib.minigpt_emu_message().decode()
            raise RuntimeError(f"{name} returned CUDA error {rc}: {why or 'no detail'}")


# ---- guard bands: out-of-bounds reads and writes show up ----------------------------------------
_GUARD = 64


def _sentinel(dtype):
    # NaN for floats; for integers (indices, lengths) a value outside every valid range.
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min


def _is_sentinel(band):
    if band.dtype.is_floating_point:
        return torch.isnan(band)
    return band == torch.iinfo(band.dtype).min


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A copy of t (same shape and strides over its storage span) with NaN (integers: their
    minimum) on both sides of its memory, so a kernel that reads past it pulls NaN into its
    results or an index out of every range."""
    span = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1 \
        if t.numel() else 0
    buf = torch.full((span + 2 * _GUARD,), _sentinel(t.dtype), dtype=t.dtype)
    view = buf.as_strided(t.shape, t.stride(), _GUARD + t.storage_offset())
    view.copy_(t)
    view._guard_buf = buf  # keep the allocation alive with the view
    return view


def guarded_empty(shape, dtype) -> torch.Tensor:
    """An output buffer filled with NaN, inside NaN guard bands; check_guards() after the call."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + 2 * _GUARD,), _sentinel(dtype), dtype=dtype)
    view = buf[_GUARD:_GUARD + n].view(shape)
    view._guard_buf = buf
    return view


def check_guards(*tensors):
    for t in tensors:
        buf = t._guard_buf
        for band, where in ((buf[:_GUARD], "before"), (buf[-_GUARD:], "after")):
            assert _is_sentinel(band).all(), f"the kernel wrote {where} a {tuple(t.shape)} buffer"
