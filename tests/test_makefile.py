"""The Makefile's venv target installs the extras the README promises (dry runs, no installs)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.repo import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def planned(*args: str) -> str:
    # -B: plan the install even where the stamp says it is done; -n: print, run nothing.
    result = subprocess.run(
        ["make", "-n", "-B", *args, "venv"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return result.stdout


def test_default_venv_installs_the_dev_extra():
    assert "pip install --quiet -e '.[dev]'" in planned()


@pytest.mark.parametrize("flag", ["GPU=1", "GPU=yes", "GPU=true"])
def test_gpu_flag_adds_the_cuda_build(flag):
    out = planned(flag)
    assert "pip install --quiet -e '.[dev,gpu]'" in out
    assert "touch .venv/.installed-dev-gpu" in out
