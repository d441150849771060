"""Shared fixtures: the real params.yaml, shrunk, and generated archives."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pipeline.config import read_yaml

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """The tests' servers (archives over HTTP, MLflow, PostgreSQL, training workers) listen
    on loopback: a proxy set for the package registries must not carry their traffic,
    here or in the stages' subprocesses, which inherit this environment."""
    for name in ("NO_PROXY", "no_proxy"):
        kept = [host for host in os.environ.get(name, "").split(",") if host.strip()]
        os.environ[name] = ",".join(dict.fromkeys([*kept, "127.0.0.1", "localhost"]))
    # Nor may the developer's shell redirect the stages the tests run: a TF_CONFIG exported
    # for a multi-machine training (each test's training would wait for peers that never
    # come), MLflow's URIs and logins (a team's server and registry would get test runs).
    for name in [n for n in os.environ if n == "TF_CONFIG" or n.startswith("MLFLOW_")]:
        del os.environ[name]


# MLflow's process-wide URIs: (module, attribute), read only where MLflow is loaded.
MLFLOW_URIS = (
    ("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
    ("mlflow.tracking._model_registry.utils", "_registry_uri"),
)


@pytest.fixture(autouse=True)
def _mlflow_process_state_restored():
    """MLflow keeps its tracking and registry URIs process-wide, and exports the tracking
    URI as MLFLOW_TRACKING_URI (the stages set other MLFLOW_* variables): what one test
    leaves there would point later tests, and the stages they start, at its store."""
    saved = {name: value for name, value in os.environ.items() if name.startswith("MLFLOW_")}
    uris = {
        (module, name): getattr(sys.modules[module], name)
        for module, name in MLFLOW_URIS
        if module in sys.modules
    }
    yield
    for name in [name for name in os.environ if name.startswith("MLFLOW_")]:
        if name not in saved:
            del os.environ[name]
    os.environ.update(saved)
    for module, name in MLFLOW_URIS:
        if module in sys.modules:  # loaded by this test: back to unset
            setattr(sys.modules[module], name, uris.get((module, name)))


@pytest.fixture
def raw_params() -> dict:
    """params.yaml as the user has it, as a plain dict for the test to shrink."""
    return read_yaml(ROOT / "params.yaml")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """MLflow pointed at a fresh SQLite store in tmp_path for the test; its client.

    The test runs in tmp_path, and pipeline.tracking.connect finds this store even
    where the user exported MLFLOW_TRACKING_URI (a team's server: not for tests).
    What the test leaves in MLflow's process-wide state is undone: the tracking
    URI, the active experiment (connect sets one, and MLflow exports it as
    MLFLOW_EXPERIMENT_ID to every later subprocess) and an active run.
    """
    import mlflow
    import mlflow.tracking.fluent as fluent

    # Runs' artifacts go to ./mlruns beside a SQLite store's default experiment: in
    # tmp_path, not in the repository the tests run from.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    # setenv first: delenv alone records nothing to undo for an unset variable.
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield mlflow.MlflowClient()
    while mlflow.active_run() is not None:
        mlflow.end_run("KILLED")
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def served_archive(tmp_path_factory):
    """A small CIFAR-10-layout archive on a local HTTP server; `.url` and `.md5` for params."""
    from tests.cifar_archive import write_archive
    from tests.http_server import PayloadServer

    archive = tmp_path_factory.mktemp("served") / "cifar-10-python.tar.gz"
    md5 = write_archive(archive, train_per_class=40, test_per_class=10)
    with PayloadServer(archive.read_bytes(), "/cifar-10-python.tar.gz") as served:
        served.md5 = md5
        yield served
