"""The champion rule of pipeline/registry.py, on stand-ins for MLflow's objects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from pipeline.config import load_params
from pipeline.registry import Decision, recorded_accuracy, should_promote
from tests.repo import ROOT

NAME = load_params(ROOT / "params.yaml").evaluate.registered_model  # cifar10-resnet


class Client:
    """Answers get_run like MlflowClient: a run's metrics, or an error for an unknown run."""

    def __init__(self, metrics: dict[str, dict[str, float]]):
        self.metrics = metrics

    def get_run(self, run_id: str):
        if run_id == "unavailable":
            raise MlflowException("database is down", error_code=TEMPORARILY_UNAVAILABLE)
        if run_id not in self.metrics:
            raise MlflowException(f"Run '{run_id}' not found", error_code=RESOURCE_DOES_NOT_EXIST)
        return SimpleNamespace(data=SimpleNamespace(metrics=self.metrics[run_id]))


def version(tags=None, run_id=None):
    return SimpleNamespace(tags=tags or {}, run_id=run_id)


def test_strictly_better_wins_and_a_tie_keeps_the_champion():
    assert should_promote(0.9, None)
    assert should_promote(0.9, 0.8)
    assert not should_promote(0.9, 0.9)
    assert not should_promote(0.8, 0.9)


def test_champion_accuracy_comes_from_its_tag_then_its_run():
    client = Client({"r1": {"test_accuracy": 0.85}, "r2": {}})
    assert recorded_accuracy(client, version({"test_accuracy": "0.910000"}, "r1")) == 0.91
    assert recorded_accuracy(client, version(run_id="r1")) == 0.85
    assert recorded_accuracy(client, version(run_id="r2")) is None  # run never evaluated
    assert recorded_accuracy(client, version(run_id="gone")) is None  # run deleted
    assert recorded_accuracy(client, version()) is None  # registered by hand, no run
    assert recorded_accuracy(client, version({"test_accuracy": "n/a"}, "r1")) == 0.85
    # A store that fails is an error, not an unscored champion that anything replaces.
    with pytest.raises(MlflowException, match="database is down"):
        recorded_accuracy(client, version(run_id="unavailable"))


@pytest.fixture
def store(mlflow_store, tmp_path, monkeypatch):
    """A real SQLite MLflow store with a champion aliased by hand (no tags), and a new run."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    client = mlflow_store
    client.create_registered_model("cifar10-resnet")
    handmade = client.create_model_version("cifar10-resnet", source=(tmp_path / "m").as_uri())
    client.set_registered_model_alias("cifar10-resnet", "champion", handmade.version)
    with mlflow.start_run() as run:
        mlflow.log_text("stand-in", "model/MLmodel")
    return client, run


def test_an_unscored_champion_is_replaced_and_the_decision_says_why(store):
    from pipeline.registry import register

    client, run = store
    decision = register(f"runs:/{run.info.run_id}/model", run.info.run_id, 0.5, NAME)
    assert decision.describe() == (
        "cifar10-resnet version 2 (test accuracy 0.5000) beats champion version 1 "
        "(no recorded test accuracy): @champion -> version 2"
    )
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"
    kept = Decision("3", 0.5, "1", 0.75, should_promote(0.5, 0.75), NAME)
    assert kept.describe().endswith(
        "does not beat champion version 1 (0.7500): @champion stays on version 1"
    )


def test_a_store_error_reading_the_champion_fails_and_keeps_the_champion(store, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

    from pipeline.registry import register

    client, run = store

    def broken(self, name, alias):
        raise MlflowException("the store failed", error_code=INTERNAL_ERROR)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", broken)
    with pytest.raises(MlflowException, match="the store failed"):
        register(f"runs:/{run.info.run_id}/model", run.info.run_id, 0.5, NAME)
    monkeypatch.undo()
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"


def test_a_tie_keeps_the_champion_though_its_tag_rounded_its_accuracy_down(store):
    """1001 of 1500 right is 0.667333..., tagged 0.667333: the same score again is no win."""
    import mlflow

    from pipeline.registry import register

    client, run = store
    tie = 1001 / 1500
    assert register(f"runs:/{run.info.run_id}/model", run.info.run_id, tie, NAME).promoted
    with mlflow.start_run() as other:
        mlflow.log_text("stand-in", "model/MLmodel")
    decision = register(f"runs:/{other.info.run_id}/model", other.info.run_id, tie, NAME)
    assert not decision.promoted and decision.describe().endswith(
        "does not beat champion version 2 (0.6673): @champion stays on version 2"
    )
    assert should_promote(1002 / 1500, float(f"{tie:.6f}"))  # one image more does win


def test_a_champion_scored_on_other_test_images_is_not_compared(store):
    """Another dataset's model under the same name must not take @champion on its accuracy."""
    import mlflow

    from pipeline.registry import register

    client, run = store
    first = register(f"runs:/{run.info.run_id}/model", run.info.run_id, 0.5, NAME, "cifar")
    assert first.promoted and client.get_model_version("cifar10-resnet", "2").tags == {
        "test_accuracy": "0.500000", "test_images": "cifar"
    }  # fmt: skip
    with mlflow.start_run() as pets:
        mlflow.log_text("stand-in", "model/MLmodel")
    decision = register(f"runs:/{pets.info.run_id}/model", pets.info.run_id, 0.95, NAME, "pets")
    assert not decision.promoted and decision.version == "3"
    assert decision.describe() == (
        "cifar10-resnet version 3 (test accuracy 0.9500) is not compared with champion version "
        "2, scored on other test images: @champion stays on version 2 (a model of another "
        "dataset needs its own evaluate.registered_model; for new test images of the same "
        "dataset, move @champion by hand in mlflow ui)"
    )
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"
    # Under its own name it is the first champion there; cifar10-resnet keeps its own.
    own = register(f"runs:/{pets.info.run_id}/model", pets.info.run_id, 0.95, "pets-resnet", "pets")
    assert own.promoted and own.describe().startswith("pets-resnet version 1 (test accuracy")
    assert own.tags()["registry.model"] == "pets-resnet"
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"
    # A champion tagged the old way (`test_set`, an order-dependent digest) is compared with.
    client.delete_model_version_tag("cifar10-resnet", "2", "test_images")
    client.set_model_version_tag("cifar10-resnet", "2", "test_set", "cifar-in-batch-order")
    assert register(
        f"runs:/{pets.info.run_id}/model", pets.info.run_id, 0.95, NAME, "pets"
    ).promoted


REGISTER_AFTER_A_PAUSE = """
import pathlib, sys, time
import mlflow
from mlflow import MlflowClient
from pipeline import registry

uri, run_id, accuracy, name, pause, me, other = sys.argv[1:]
mlflow.set_tracking_uri(uri)
real = MlflowClient.get_model_version_by_alias

def slow(self, name, alias):  # a pause between reading the champion and moving the alias
    found = real(self, name, alias)
    # Without the lock both read before either moves it, however slow the machine; with
    # it the other cannot read yet, and this one goes on after 5 s.
    pathlib.Path(me + ".read").touch()
    waited = time.monotonic() + 5
    while not pathlib.Path(other + ".read").exists() and time.monotonic() < waited:
        time.sleep(0.01)
    time.sleep(float(pause))
    return found

MlflowClient.get_model_version_by_alias = slow
pathlib.Path(me).touch()
while not pathlib.Path(other).exists():  # both decide at the same moment
    time.sleep(0.01)
print(registry.register(f"runs:/{run_id}/model", run_id, float(accuracy), name).describe())
"""


def test_two_evaluations_deciding_at_once_on_sqlite_leave_the_better_one_champion(store, tmp_path):
    """Both read the hand-made champion, unscored, before either moves the alias: without
    the file lock both promote themselves, and the slower (the worse) one wins."""
    import subprocess
    import sys

    import mlflow

    from tests.repo import stage_env

    client, run = store
    with mlflow.start_run() as worse:
        mlflow.log_text("stand-in", "model/MLmodel")
    uri = mlflow.get_tracking_uri()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                REGISTER_AFTER_A_PAUSE,
                uri,
                run_id,
                accuracy,
                NAME,
                pause,
                str(tmp_path / me),
                str(tmp_path / other),
            ],
            cwd=tmp_path,
            env=stage_env({"PYTHONPATH": str(ROOT)}),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for run_id, accuracy, pause, me, other in [
            (run.info.run_id, "0.9", "0.5", "a", "b"),
            (worse.info.run_id, "0.5", "3", "b", "a"),
        ]
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    champion = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert champion.run_id == run.info.run_id, outputs
