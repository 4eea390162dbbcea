"""The shell scripts parse, and the GPU session script (which only runs on a lent GPU, where a
mistake would cost device time) routes its stages: an unknown stage is refused before anything
runs, and every stage it documents has a function."""
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh"))) + [os.path.join(ROOT, ".ci", "run")]


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_script_parses(path):
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_session_stages(tmp_path):
    path = os.path.join(ROOT, "scripts", "gpu_session.sh")
    text = open(path).read()
    limits = re.search(r'LIMITS="([^"]*)"', text).group(1).split()
    stages = [kv.split("=")[0] for kv in limits]
    assert {"prepare", "build", "test", "tune", "train", "quality"} <= set(stages)
    for stage in stages:
        assert re.search(rf"^stage_{stage}\(\)", text, re.M), f"no stage_{stage} function"
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(["bash", path, "nonsense"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 2 and "unknown stage 'nonsense'" in proc.stdout


def test_quality_script_names_a_missing_corpus(tmp_path):
    # It ended in a traceback from deep inside the training setup; tinyshakespeare.txt is not
    # part of the project, so a checkout without ../shared/data/ is the common case.
    import sys

    missing = str(tmp_path / "tinyshakespeare.txt")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "quality.py"),
                           "--data", missing], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"--data {missing}: no such file" in proc.stderr and "Traceback" not in proc.stderr
