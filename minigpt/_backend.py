"""Backend discovery and the one dispatch rule every op follows.

Backends:
  ``triton`` - kernels/ (compiled on CUDA; the Triton interpreter on CPU tensors)
  ``cuda``   - csrc/cuda/*.cu inside the compiled extension ``minigpt._C``
  ``cpu``    - csrc/cpu/*.cpp inside ``minigpt._C``
  ``torch``  - minigpt.reference, plain eager PyTorch (always there)

``backend=None`` picks the best backend for the tensor's device, unless the environment
variable ``MINIGPT_BACKEND`` names one. An explicit ``backend=`` argument wins over both.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "MINIGPT_BACKEND"

# Order of preference when nothing is asked for.
_DEFAULT_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says how to get it."""


_EXT = None


def _ext():
    """The compiled extension, or the ImportError that says why it is missing. (A plain
    global, not lru_cache, so torch.compile traces through it without warnings.)"""
    global _EXT
    if _EXT is None:
        try:
            from minigpt import _C  # type: ignore[attr-defined]

            _EXT = _C
        except ImportError as e:  # depends on the install
            _EXT = e
    return _EXT


def extension():
    """Return ``minigpt._C`` or raise BackendUnavailableError explaining how to build it."""
    ext = _ext()
    if isinstance(ext, ImportError):
        raise BackendUnavailableError(
            f"the compiled extension minigpt._C is not available ({ext}); build it with "
            "`pip install -e . --no-build-isolation` from the MiniGPT checkout"
        )
    return ext


# The oldest Triton the kernels are checked with (CI's interpreter runs and sm_90 compiles, the
# GPU runs). Older releases are refused rather than trusted: under Triton 3.1 (the one torch
# 2.5 pins) the attention kernels with dropout returned ~1e34 and NaN in the interpreter.
# MINIGPT_TRITON_ANY_VERSION=1 lifts the check, for trying another release.
MIN_TRITON = (3, 6)


def _version_tuple(v: str) -> tuple:
    """(major, minor) of "3.6.0", "3.7.0+git1234"; (0, 0) if unreadable."""
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m[1]), int(m[2])) if m else (0, 0)


_UNSET = object()
_TRITON = _UNSET


def _triton_status() -> str | None:
    """None if Triton can be used, else why not. (Remembered in a plain global, as _ext: an
    lru_cache here made torch.compile warn at every compile of a model that calls our ops.)"""
    global _TRITON
    if _TRITON is _UNSET:
        try:
            import triton  # noqa: F401

            _TRITON = triton_version_problem()
        except ImportError as e:
            _TRITON = f"triton is not installed ({e}); `pip install triton==3.6.0`"
        except Exception as e:  # a broken install: the other backends must still work
            _TRITON = (f"triton failed to import ({type(e).__name__}: {e}); reinstall it "
                       "(`pip install --force-reinstall triton==3.6.0`)")
    return _TRITON


def _triton_interprets() -> bool:
    """Whether Triton runs its kernels in the interpreter: TRITON_INTERPRET read as Triton's
    getenv_bool reads it (1, true, on, yes or y, any case, not stripped: " 1" is off). A reading
    of our own had offered the backend where @triton.jit made compiled kernels (" 1"), or
    refused it where they were interpreted ("y"). Not through triton.knobs: torch.compile
    traces this, and cannot trace Triton's C++ getenv."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def _numpy_problem() -> str | None:
    """The Triton (<= 3.6) interpreter converts (1,)-shaped arrays with int(), which numpy
    2.4 made an error: attention and cross-entropy then failed inside the interpreter while
    softmax and the norms ran."""
    import numpy
    import triton

    if (_version_tuple(triton.__version__) <= (3, 6)
            and _version_tuple(numpy.__version__) >= (2, 4)):
        return (f"the Triton interpreter needs numpy < 2.4 (numpy {numpy.__version__} is "
                "installed): `pip install 'numpy<2.4'`")
    return None


def triton_version_problem() -> str | None:
    """Why the installed Triton is refused for its version (None: accepted, or not installed)."""
    try:
        import triton
    except ImportError:
        return None
    version = getattr(triton, "__version__", "0")
    if (_version_tuple(version) >= MIN_TRITON
            or os.environ.get("MINIGPT_TRITON_ANY_VERSION") == "1"):
        return None
    need = ".".join(map(str, MIN_TRITON))
    return (f"triton {version} is older than {need}, the oldest release MiniGPT's Triton "
            f"kernels are tested with; `pip install 'triton>={need}'` (an older torch's "
            "torch.compile may then refuse it), use the cuda backend, or set "
            "MINIGPT_TRITON_ANY_VERSION=1 to try it anyway")


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "triton":
        why = _triton_status()
        if why:
            return why
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device on this machine"
        if device.type == "cpu":
            if not _triton_interprets():
                return ("Triton runs on CPU tensors only in its interpreter: set "
                        "TRITON_INTERPRET=1 before importing triton/minigpt")
            np_problem = _numpy_problem()
            if np_problem:
                return np_problem
            import minigpt

            if minigpt._TRITON_IMPORTED_FIRST:
                return ("triton was imported (e.g. by transformers) before minigpt could switch "
                        "on its CPU interpreter: import minigpt first, or set TRITON_INTERPRET=1 "
                        "in the environment")
            return None
        return f"Triton has no kernels for device {device.type!r}"
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got a tensor on {device}"
        ext = _ext()
        if isinstance(ext, ImportError):
            return (f"minigpt._C is not built ({ext}); run `pip install -e . --no-build-isolation`")
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got a tensor on {device}"
        ext = _ext()
        if isinstance(ext, ImportError):
            return (f"minigpt._C is not built ({ext}); run `pip install -e . --no-build-isolation` "
                    "with a CUDA build of torch and nvcc on PATH")
        if not getattr(ext, "WITH_CUDA", False):
            return ("minigpt._C was built without CUDA kernels; rebuild with a CUDA build of torch "
                    "and nvcc available: `pip install -e . --no-build-isolation`")
        return None
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def is_available(backend: str, device: torch.device | str = "cpu") -> bool:
    return _unavailable_reason(backend, torch.device(device)) is None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [b for b in BACKENDS if is_available(b, device)]


# float64 is for gradcheck: the reference and the C++ CPU kernels take it, GPU kernels do not.
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = {
    "torch": _GPU_DTYPES + (torch.float64,),
    "cpu": _GPU_DTYPES + (torch.float64,),
    "triton": _GPU_DTYPES,
    "cuda": _GPU_DTYPES,
}


# resolve's answers, by everything they depend on that can change while a process runs (the
# environment variable; what is installed and built is fixed once imported). A decode step asks
# ~150 times, always the same questions.
_RESOLVED: dict = {}


def _env_backend() -> str | None:
    """MINIGPT_BACKEND, read so that torch.compile guards on it. Dynamo traces
    ``os.environ.get`` into its Mapping code and guards only on a value it found: a graph traced
    with the variable unset is then reused after it is set (torch 2.13: a compiled model kept
    our kernels under MINIGPT_BACKEND=torch). A membership test on the environment's own dict
    is guarded both ways."""
    env = os.environ
    data = getattr(env, "_data", None)
    if not isinstance(data, dict):  # os.environ replaced by a plain mapping
        return env.get(ENV_VAR)
    key = env.encodekey(ENV_VAR)
    return env.decodevalue(data[key]) if key in data else None


def pick_device(name: str | torch.device | None = None, *, indexed: bool = False,
                option: str = "--device") -> torch.device:
    """The device a command, a benchmark or training runs on: None or "auto" (CUDA when there
    is one), else "cpu", "cuda" or "cuda:N", checked against what torch sees; a clear error
    for anything else (torch's own lists every device type it knows), for CUDA where there is
    none and for an index past the GPUs. The one parser of every --device (the commands, the
    bench API, the benchmark scripts, training): four copies of it had drifted apart.

    ``indexed``: plain "cuda" comes back as the current device (``cuda:N``), for calls that
    refuse a device without an index (``torch.cuda.set_device``). ``option`` leads the error
    messages (argparse types pass "" and let argparse name the option)."""
    lead = f"{option} " if option else ""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{lead}must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{lead}{name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()  # torch's own "invalid device ordinal" came much later
        raise ValueError(f"{lead}{name}: torch sees {n} CUDA device(s), cuda:0 to "
                         f"cuda:{n - 1}")
    if indexed and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_backend_name(backend, what: str = "backend") -> None:
    """A clear error for a backend name that no op would take (None: the device's best)."""
    if backend is not None and (not isinstance(backend, str)
                                or backend.strip().lower() not in BACKENDS):
        raise ValueError(f"{what}: unknown backend {backend!r}; choose one of {BACKENDS} "
                         "(or None: the best one for the device)")


class Overlapping:
    """A process-wide setting (an environment variable, torch's thread count) that library
    calls change for their duration, where calls in several threads may overlap. Each call
    restoring what it found left the process changed: A sets x, B finds x and sets y, A ends
    and restores, B ends and "restores" x for good. Here the latest block still open decides
    the value, and when the last one ends the value from before the first comes back. (While
    they run, the setting is the process's: other threads see it too.)"""

    def __init__(self, get, set_):
        self._get, self._set = get, set_
        self._lock = threading.Lock()
        self._open: list = []   # [(token, value)] of the blocks running, oldest first
        self._before = None

    @contextlib.contextmanager
    def hold(self, apply):
        """Run ``apply()`` (which changes the setting, or not) and hold what it left for the
        block."""
        token = object()
        with self._lock:
            before = self._get()
            apply()
            if not self._open:
                self._before = before
            self._open.append((token, self._get()))
        try:
            yield
        finally:
            with self._lock:
                i = next(i for i, (t, _) in enumerate(self._open) if t is token)
                latest = i == len(self._open) - 1
                del self._open[i]
                if latest:
                    self._set(self._open[-1][1] if self._open else self._before)


def _set_env_backend(value):
    if value is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = value


_ENV_BACKEND = Overlapping(lambda: os.environ.get(ENV_VAR), _set_env_backend)


@contextlib.contextmanager
def backend_env(backend: str | None, none_unsets: bool = True):
    """MINIGPT_BACKEND=backend for the block, restored after it. ``backend`` None unsets it
    (the device's default), or with ``none_unsets=False`` leaves it as it is. The ops read it on
    every call (torch.compile at trace time), so every call that should use it must run
    inside the block. It is the process's environment: ops in other threads see it during the
    block too, and blocks in several threads at once restore it as ``Overlapping`` does."""
    if backend is None and not none_unsets:
        yield
        return
    with _ENV_BACKEND.hold(lambda: _set_env_backend(backend)):
        yield


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype | None = None,
            supported=BACKENDS) -> str:
    """The single dispatch rule: explicit argument > MINIGPT_BACKEND > best available.

    An explicit choice that cannot run raises; the automatic choice skips backends that
    cannot take ``dtype`` (float64 falls back to the reference on GPU).
    """
    env = _env_backend()
    if not (backend is None or isinstance(backend, str)) or not isinstance(supported, tuple):
        return _resolve(op, backend, env, device, dtype, supported)  # unhashable: no cache
    key = (op, backend, env, device, dtype, supported)
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = _RESOLVED[key] = _resolve(op, backend, env, device, dtype, supported)
    return hit


def _resolve(op, backend, env, device, dtype, supported) -> str:
    source = "backend argument"
    if backend is None:
        env = env.strip().lower() if env else env
        if env:  # blank (e.g. MINIGPT_BACKEND=" ") counts as unset, as "" does
            backend, source = env, f"{ENV_VAR} environment variable"
    elif isinstance(backend, str):
        backend = backend.strip().lower()  # as the environment variable is read
    if backend is not None:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {backend!r} (from the {source}); "
                             f"choose one of {BACKENDS}")
        if backend not in supported:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} does not implement this op; it has {tuple(supported)}")
        why = _unavailable_reason(backend, device)
        if why:
            raise BackendUnavailableError(f"{op}: backend {backend!r} is unavailable: {why}")
        if dtype is not None and dtype not in DTYPES[backend]:
            raise TypeError(f"{op}: backend {backend!r} does not take {dtype}; it takes "
                            f"{[str(d) for d in DTYPES[backend]]}")
        return backend
    for cand in _DEFAULT_ORDER.get(device.type, ("torch",)):
        if (cand in supported and _unavailable_reason(cand, device) is None
                and (dtype is None or dtype in DTYPES[cand])):
            return cand
    return "torch"
