"""A temporary copy of the repository, to run the real DAG with `dvc repro` in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# The real params shrunk for tests: a tiny network, 2 epochs, a small validation split.
TINY = {
    "model.stem_filters": 8,
    "model.filters": [8, 16],
    "model.units_per_stage": 1,
    "train.epochs": 2,
    "train.batch_size": 32,
    "data.val_size": 100,
    "evaluate.misclassified": 12,
}
COPIED = ("pipeline", "params.yaml", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore")


# Seconds any one command may take. The slowest here, a tiny `dvc repro` or a
# queued experiment, takes under a minute on 2 cores; a hung command fails its
# test with its output instead of stalling the whole suite.
COMMAND_TIMEOUT_S = 600


def run(
    cmd: list[str],
    cwd: Path,
    env: dict | None = None,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT_S,
):
    try:
        result = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{' '.join(cmd)} did not finish in {timeout:.0f} s\n"
            f"--- stdout\n{_text(exc.stdout)}\n--- stderr\n{_text(exc.stderr)}"
        ) from None
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
    return result


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def stage_env(extra: dict | None = None) -> dict:
    """The environment stages see: this venv's python and dvc first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    env.update(extra or {})
    return env


def make_repo(dest: Path, overrides: dict[str, object]) -> Path:
    """Copy the project into `dest` as a fresh git + DVC repo with params overridden.

    `overrides` maps dotted keys to values (`{"train.epochs": 1}`), applied to
    the real params.yaml.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    (dest / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    set_params(dest, overrides)
    env = stage_env()
    run(["git", "init", "-q", "-b", "main"], dest, env)
    run(["git", "config", "user.email", "test@example.invalid"], dest, env)
    run(["git", "config", "user.name", "test"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-q", "-m", "copy"], dest, env)
    return dest


def set_params(repo: Path, overrides: dict[str, object]) -> None:
    params_file = repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[last] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


DVC = str(Path(sys.executable).parent / "dvc")


def dvc(repo: Path, *args: str, env: dict | None = None, check: bool = True, **kwargs):
    return run([DVC, *args], repo, env or stage_env(), check, **kwargs)
