"""A temporary copy of the repository, to run the real DAG with `dvc repro` in it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.config import read_yaml

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
COMMAND_TIMEOUT_S = 300


def run(
    cmd: list[str],
    cwd: Path,
    env: dict | None = None,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT_S,
):
    # Its own session: on a timeout (or pytest-timeout's interrupt) the command is
    # killed with everything it started, so no stage keeps writing into the next test.
    process = subprocess.Popen(
        cmd, cwd=cwd, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _kill_group(process)
        raise AssertionError(
            f"{' '.join(cmd)} did not finish in {timeout:.0f} s (killed)\n"
            f"--- stdout\n{stdout}\n--- stderr\n{stderr}"
        ) from None
    except BaseException:
        _kill_group(process)
        raise
    if check and process.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {process.returncode}\n"
            f"--- stdout\n{stdout}\n--- stderr\n{stderr}"
        )
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen) -> tuple[str, str]:
    """SIGKILL a process started with start_new_session, and all it started.

    Returns what it had written to its pipes, if any.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
        stdout, stderr = process.communicate(timeout=10)
        return stdout or "", stderr or ""
    return "", ""


class Background:
    """Processes a test runs side by side (training workers, a job to kill).

    Each writes its output to a file, so no unread pipe can fill and stall it,
    and each runs in its own session; leaving the `with` block kills whatever
    is still running, with its children, whether the test passed or not.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
        log = self.folder / f"process-{len(self.started)}.log"
        with log.open("w") as output:
            process = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.started.append((process, log))
        return process

    def output(self, process: subprocess.Popen) -> str:
        return next(log for p, log in self.started if p is process).read_text(errors="replace")

    def wait(self, *processes: subprocess.Popen, timeout: float) -> list[str]:
        """The outputs once all `processes` have exited; fails if that takes over `timeout` s."""
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                tails = "\n---\n".join(self.output(p)[-2000:] for p in processes)
                raise AssertionError(f"still running after {timeout:.0f} s:\n{tails}") from None
        return [self.output(process) for process in processes]

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc_info) -> None:
        for process, _ in self.started:  # its group too, even if the process itself is gone
            _kill_group(process)


def free_port() -> int:
    """A loopback port that was free a moment ago (nothing listens on it)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different loopback ports, free a moment ago: the probes stay bound until all are
    picked, since a port released and asked for again can come back the same."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


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
    # A user's global commit.gpgsign would make every test commit ask for a key.
    run(["git", "config", "commit.gpgsign", "false"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-q", "-m", "copy"], dest, env)
    return dest


def set_params(repo: Path, overrides: dict[str, object]) -> None:
    params_file = repo / "params.yaml"
    params = read_yaml(params_file)
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
