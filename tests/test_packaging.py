"""What pip installs and what an sdist carries: kernels/ must arrive as minigpt.kernels (never a
top-level `kernels`), and an sdist must hold every csrc/ file a build needs, headers and .cu
files included (setuptools alone lists only the extension's own .cpp sources)."""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of the tracked files: building writes build/ and *.egg-info beside the sources."""
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout to know the tracked files")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    dst = tmp_path_factory.mktemp("tree")
    for f in filter(None, files):
        if os.path.exists(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))
    return dst


def _build(tree, *args):
    """Run ``python *args <tree>/dist`` (the last arg names the output folder) -> that folder.
    No extension: what is packaged does not depend on compiling it (which takes minutes)."""
    out = os.path.join(tree, "dist")
    proc = subprocess.run([sys.executable, *args, out], cwd=tree, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, MINIGPT_NO_EXT="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sdist_carries_csrc_and_license(tree):
    out = _build(tree, "setup.py", "-q", "sdist", "-d")
    (path,) = glob.glob(os.path.join(out, "*.tar.gz"))
    names = {n.split("/", 1)[1] for n in tarfile.open(path).getnames() if "/" in n}
    want = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*"))
            if os.path.isfile(p)}
    assert any(w.endswith(".cuh") for w in want) and any(w.endswith(".cu") for w in want)
    assert want <= names, f"missing from the sdist: {sorted(want - names)}"
    assert {"LICENSE", "setup.py", "pyproject.toml", "kernels/layer_norm.py"} <= names


def test_wheel_installs_kernels_as_minigpt_kernels(tree):
    out = _build(tree, "-m", "pip", "wheel", ".", "--no-build-isolation", "--no-deps", "-q", "-w")
    (path,) = glob.glob(os.path.join(out, "*.whl"))
    names = set(zipfile.ZipFile(path).namelist())
    kernels = {"minigpt/kernels/" + os.path.basename(p)
               for p in glob.glob(os.path.join(ROOT, "kernels", "*.py"))}
    assert kernels <= names, f"missing from the wheel: {sorted(kernels - names)}"
    assert not any(n.startswith("kernels/") for n in names)
    assert "minigpt/ops/layer_norm.py" in names and "minigpt/reference/__init__.py" in names
