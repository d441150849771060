"""The Makefile's venv target installs the extras the README promises (dry runs, no installs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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


def test_make_repro_runs_the_stages_with_the_venv_python(tmp_path):
    """dvc runs each stage's `python` from PATH: make repro must put .venv/bin first on it,
    since the user has not activated the venv (README: the two commands)."""
    shutil.copy2(ROOT / "Makefile", tmp_path)
    shutil.copy2(ROOT / "pyproject.toml", tmp_path)  # older than the venv's stamp: no install
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    stage = "python -c 'import sys; print(sys.prefix)' > prefix.txt"
    (tmp_path / "dvc.yaml").write_text(f'stages:\n  where:\n    cmd: "{stage}"\n')
    subprocess.run(
        [str(ROOT / ".venv/bin/dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DVC_NO_ANALYTICS": "1"}
    # -o venv: never (re)install into the real venv the copy links to, whatever its stamp says.
    result = subprocess.run(
        ["make", "-o", "venv", "repro"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    prefix = (tmp_path / "prefix.txt").read_text().strip()
    assert Path(prefix).resolve() == (ROOT / ".venv").resolve()


@pytest.mark.parametrize(
    ("flags", "extras"),
    [(["REMOTE=s3"], "dev,s3"), (["REMOTE=s3 ssh", "GPU=1"], "dev,gpu,s3,ssh")],
)
def test_remote_flag_adds_dvcs_plugin_for_that_remote(flags, extras):
    """`dvc pull` from an s3:// remote needs dvc-s3, which plain dvc lacks (README: a DVC
    remote; a teammate's `make venv REMOTE=s3`)."""
    assert f"pip install --quiet -e '.[{extras}]'" in planned(*flags)


def test_an_unknown_remote_kind_stops_make_naming_the_known_ones():
    result = subprocess.run(
        ["make", "-n", "REMOTE=hdfs", "venv"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "REMOTE=hdfs: must be one of s3 gs azure ssh" in result.stderr


def test_an_exported_remote_variable_is_not_taken_for_the_flag(monkeypatch):
    monkeypatch.setenv("REMOTE", "origin")  # a shell's own variable of that name
    assert "pip install --quiet -e '.[dev]'" in planned()


def test_each_remote_extra_is_dvcs_own_extra_at_the_pinned_dvc():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (dvc,) = [d for d in project["dependencies"] if d.startswith("dvc==")]
    version = dvc.removeprefix("dvc==")
    for kind in ("s3", "gs", "azure", "ssh"):
        assert project["optional-dependencies"][kind] == [f"dvc[{kind}]=={version}"]


def test_the_venv_installs_the_versions_ci_tested_which_keep_the_projects_pins():
    """A new release of any dependency cannot turn CI red on its own: make venv installs
    with .ci/constraints.txt, whose pins must not contradict pyproject.toml's."""
    import re
    import tomllib

    out = planned()
    assert "pip install --quiet -e '.[dev]' -c .ci/constraints.txt" in out
    assert "pip install --quiet --upgrade pip -c .ci/constraints.txt" in out
    # pip builds this project and source-only packages with these, not the newest.
    assert "--build-constraint .ci/build-constraints.txt" in out
    build = (ROOT / ".ci/build-constraints.txt").read_text().splitlines()
    pinned = {line.split("==")[0] for line in build if line and not line.startswith("#")}
    assert pinned == {"setuptools", "wheel"}
    pins = {
        name.lower(): version  # pip freeze keeps a project's own spelling: PyYAML, Flask
        for name, version in (
            line.split("==")
            for line in (ROOT / ".ci/constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")
        )
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        exact = re.fullmatch(
            r"([\w-]+)(?:\[[\w,]+\])?==([\w.]+)", requirement.split(";")[0].strip()
        )
        if exact:
            name, version = exact.groups()
            assert pins[name.lower()] == version, requirement
    assert {"tensorflow", "keras", "dvc", "mlflow", "pytest", "pip"} <= pins.keys()


def test_a_venv_made_with_another_python_is_reused_without_it(tmp_path):
    """`make venv PYTHON=/opt/py311/bin/python3.11` once; after a pyproject.toml change,
    `make test` (no PYTHON=) must update that .venv, not stop at "python3.11 not found"."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path)
    (tmp_path / ".ci").mkdir()
    for name in ("constraints.txt", "build-constraints.txt"):
        shutil.copy2(ROOT / ".ci" / name, tmp_path / ".ci")
    fake = tmp_path / ".venv/bin/python"  # the real Python, with a pip that only says so
    fake.parent.mkdir(parents=True)
    fake.write_text(
        '#!/bin/sh\nif [ "$1" = -m ]; then echo "pip $*" >> "$(dirname "$0")/../pip.log"; '
        f'exit 0; fi\nexec {ROOT / ".venv/bin/python"} "$@"\n'
    )
    fake.chmod(0o755)
    absent = tmp_path / "nowhere/python3.11"
    result = subprocess.run(
        ["make", "venv", f"PYTHON={absent}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "install --quiet -e .[dev]" in (tmp_path / ".venv/pip.log").read_text()
    assert (tmp_path / ".venv/.installed-dev").is_file()

    fake.unlink()  # no .venv that works: then the Python that makes one is needed
    (tmp_path / ".venv/.installed-dev").unlink()
    result = subprocess.run(
        ["make", "venv", f"PYTHON={absent}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"error: {absent} not found; install Python 3.11" in result.stdout
