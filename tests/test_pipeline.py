"""The whole DAG as a user runs it: `dvc repro`, re-runs, experiments, registry, predict.

One small archive served over HTTP and a tiny model; the tests run in order
on one repository copy, each building on the state the previous one left.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time

import mlflow
import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from tests.repo import DVC, TINY, dvc, make_repo, run, set_params, stage_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(served_archive, tmp_path_factory):
    path = make_repo(
        tmp_path_factory.mktemp("pipeline") / "repo",
        {**TINY, "data.url": served_archive.url, "data.md5": served_archive.md5},
    )
    return path


@pytest.fixture
def client(repo):
    """The repository's MLflow store; created by the stages, only read here. MLflow's
    process-wide tracking URI is put back afterwards, for the tests that follow."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(previous)


def ran(output: str) -> list[str]:
    return [
        s for s in ("download", "prepare", "train", "evaluate") if f"Running stage '{s}'" in output
    ]


def commit(repo, message: str) -> None:
    run(["git", "add", "-A"], repo, stage_env())
    run(["git", "commit", "-q", "-m", message], repo, stage_env())


def test_repro_runs_all_four_stages(repo, request):
    result = dvc(repo, "repro")
    client = request.getfixturevalue("client")  # after the stages created the store
    assert ran(result.stdout) == ["download", "prepare", "train", "evaluate"]
    assert "registry: cifar10-resnet version 1 (test accuracy" in result.stdout
    assert "is the first champion" in result.stdout
    output = result.stdout + result.stderr  # no TensorFlow start-up chatter from any stage
    assert "oneDNN custom operations" not in output and "absl::InitializeLog" not in output

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"download", "prepare", "train", "evaluate"}
    assert lock["evaluate"]["params"]["params.yaml"]["evaluate"]["misclassified"] == 12
    test = json.loads((repo / "metrics/test.json").read_text())
    assert test["images"] == 100 and 0 <= test["accuracy"] <= 1 and test["loss"] > 0
    assert set(test["per_class_accuracy"]) == {
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    }  # fmt: skip
    confusion = (repo / "metrics/confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 101
    for png in ("misclassified.png", "per_class_accuracy.png", "confusion_matrix.png"):
        assert (repo / "metrics" / png).read_bytes()[:4] == b"\x89PNG"

    # dvc metrics and plots read what the stages wrote.
    metrics = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    shown = metrics[""]["data"]  # "" is the workspace
    assert shown["metrics/test.json"]["data"]["accuracy"] == test["accuracy"]
    assert shown["metrics/train.json"]["data"]["epochs"] == 2
    dvc(repo, "plots", "show", "-o", str(repo / "plots_html"))
    page = (repo / "plots_html/index.html").read_text()
    for title in ("Loss per epoch", "Accuracy per epoch", "Learning rate per epoch"):
        assert title in page
    assert "Confusion matrix (test)" in page
    for png in ("misclassified.png", "per_class_accuracy.png", "confusion_matrix.png"):
        assert png in page

    # The MLflow run holds params, per-epoch and test metrics, artifacts and the model.
    experiment = client.get_experiment_by_name("cifar10-resnet")
    assert experiment.artifact_location == (repo / "mlartifacts").as_uri()  # README's place
    assert not (repo / "mlruns").exists()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    logged = runs[0]
    assert logged.data.params["train.batch_size"] == "32"
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "val_loss")] == [1, 2]
    assert logged.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert logged.data.metrics["test_f1_macro"] == pytest.approx(test["f1_macro"])
    assert logged.data.metrics["test_accuracy_cat"] == pytest.approx(
        test["per_class_accuracy"]["cat"]
    )
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "evaluation-1")}
    assert {
        "evaluation-1/test.json", "evaluation-1/confusion.csv", "evaluation-1/misclassified.png",
        "evaluation-1/confusion_matrix.png", "evaluation-1/per_class_accuracy.png",
        "evaluation-1/params.json",
    } <= artifacts  # fmt: skip
    champion = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert str(champion.version) == "1" and champion.run_id == logged.info.run_id
    assert logged.data.tags["registry.promoted"] == "true"
    commit(repo, "first model")


def test_second_repro_does_nothing(repo):
    result = dvc(repo, "repro")
    assert ran(result.stdout) == []


def test_a_mirror_of_the_same_archive_retrains_nothing(repo, served_archive, tmp_path):
    # Under the same file name, only download re-runs (and reuses the archive it has).
    same_name = tmp_path / "copy" / "cifar-10-python.tar.gz"
    same_name.parent.mkdir()
    shutil.copy(repo / "data/raw/cifar-10-python.tar.gz", same_name)
    set_params(repo, {"data.url": same_name.as_uri()})
    assert ran(dvc(repo, "repro").stdout) == ["download"]
    # Under another name, prepare re-runs for the new data/raw, but writes the same bytes.
    other_name = tmp_path / "cifar10-mirror.tar.gz"
    shutil.copy(same_name, other_name)
    set_params(repo, {"data.url": other_name.as_uri()})
    prepared = {f.name: f.read_bytes() for f in (repo / "data/prepared").iterdir()}
    assert ran(dvc(repo, "repro").stdout) == ["download", "prepare"]
    assert {f.name: f.read_bytes() for f in (repo / "data/prepared").iterdir()} == prepared

    # Back: prepare's earlier run, with these very inputs, comes from DVC's run cache.
    set_params(repo, {"data.url": served_archive.url})
    assert ran(dvc(repo, "repro").stdout) == ["download"]
    assert ran(dvc(repo, "repro").stdout) == []
    assert run(["git", "status", "--porcelain"], repo).stdout == ""  # as committed


def test_evaluate_change_reruns_only_evaluate_and_keeps_both_evaluations(repo, client):
    set_params(
        repo, {"evaluate.misclassified": 6, "evaluate.flip_tta": True, "evaluate.shift_tta": 1}
    )
    result = dvc(repo, "repro")
    assert ran(result.stdout) == ["evaluate"]
    assert "logged as evaluation 2 of MLflow run" in result.stdout
    assert "with flip test-time augmentation: accuracy" in result.stdout
    tta = json.loads((repo / "metrics/test.json").read_text())["flip_tta"]
    assert set(tta) == {"accuracy", "loss", "f1_macro"} and 0 <= tta["accuracy"] <= 1
    assert "flip and 1-pixel shift test-time augmentation (10 views): accuracy" in result.stdout
    # Ten passes over the test set, each reported as it ends, with the time left.
    passes = [line for line in result.stdout.splitlines() if line.startswith("evaluate: pass ")]
    assert [line.split()[2] for line in passes] == [f"{k}/10" for k in range(1, 11)]
    assert passes[-1].endswith("about 0 s left")
    shifted = json.loads((repo / "metrics/test.json").read_text())["shift_tta"]
    assert set(shifted) == {"accuracy", "loss", "f1_macro"} and 0 <= shifted["accuracy"] <= 1
    assert "version 1 (test accuracy" in result.stdout and "is already @champion" in result.stdout
    (logged,) = client.search_runs([client.get_experiment_by_name("cifar10-resnet").experiment_id])
    history = client.get_metric_history(logged.info.run_id, "test_accuracy")
    assert sorted(m.step for m in history) == [1, 2]  # both evaluations, neither overwritten
    assert [
        m.step for m in client.get_metric_history(logged.info.run_id, "test_accuracy_flip_tta")
    ] == [2]
    metrics = client.get_run(logged.info.run_id).data.metrics
    assert metrics["test_accuracy_shift_tta"] == shifted["accuracy"]
    params = json.loads(
        mlflow.artifacts.load_text(f"runs:/{logged.info.run_id}/evaluation-2/params.json")
    )
    assert params["evaluate.misclassified"] == 6
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert params["git.commit"] == head and "dvc.exp_name" not in params  # `dvc repro`
    assert len(client.search_model_versions("name = 'cifar10-resnet'")) == 1  # same model
    commit(repo, "evaluate change")


def test_train_change_reruns_train_and_evaluate_only(repo, client):
    before = yaml.safe_load((repo / "params.yaml").read_text())["train"]["learning_rate"]
    first_model = (repo / "models/model_info.json").read_text()
    first_test = (repo / "metrics/test.json").read_text()
    set_params(repo, {"train.learning_rate": 0.003})
    result = dvc(repo, "repro")
    assert ran(result.stdout) == ["train", "evaluate"]
    assert "registry: cifar10-resnet version 2 (test accuracy" in result.stdout
    runs = client.search_runs([client.get_experiment_by_name("cifar10-resnet").experiment_id])
    assert len(runs) == 2
    newest = json.loads((repo / "models/model_info.json").read_text())["run_id"]
    decision = client.get_run(newest).data.tags["registry.decision"]
    first = [r for r in runs if r.info.run_id != newest][0].data.metrics["test_accuracy"]
    second = client.get_run(newest).data.metrics["test_accuracy"]
    champion = str(client.get_model_version_by_alias("cifar10-resnet", "champion").version)
    assert champion == ("2" if second > first else "1"), decision
    commit(repo, "train change")

    # Back to params trained before: DVC's run cache gives back that model and its
    # evaluation, nothing trains or logs again (README, "Experimenting").
    set_params(repo, {"train.learning_rate": before})
    result = dvc(repo, "repro")
    assert ran(result.stdout) == [] and "Stage 'train' is cached" in result.stdout
    assert (repo / "models/model_info.json").read_text() == first_model
    assert (repo / "metrics/test.json").read_text() == first_test
    assert len(client.search_runs([runs[0].info.experiment_id])) == 2
    set_params(repo, {"train.learning_rate": 0.003})
    assert ran(dvc(repo, "repro").stdout) == []
    assert run(["git", "status", "--porcelain"], repo).stdout == ""  # as committed


def test_evaluating_by_hand_on_test_images_drawn_anew_is_refused(repo, tmp_path):
    """`python -m pipeline.evaluate` by hand (README: re-scoring with TTA) after preparing
    another split of one image folder would score, and register, the model on images it
    may have learnt from; another validation split alone (same test set) is fine."""

    def evaluate_by_hand():
        command = [sys.executable, "-m", "pipeline.evaluate"]
        return run(command, repo, stage_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/other.db"}),
                   check=False)  # fmt: skip

    set_params(repo, {"data.val_size": 60})
    dvc(repo, "repro", "prepare")  # the same test set
    allowed = evaluate_by_hand()  # past the check, to the store, which lacks the run
    assert "was trained on other data" not in allowed.stderr, allowed.stderr
    assert "which is deleted or not in the tracking store" in allowed.stderr, allowed.stderr
    info = json.loads((repo / "models/model_info.json").read_text())
    info["test_set"] = "0" * 32  # as if the model's test images had been others
    (repo / "models/model_info.json").write_text(json.dumps(info))
    refused = evaluate_by_hand()
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: models/model_info.json was trained on other data than data/prepared holds "
        "(other training and test images: its test images may be ones it learnt from); run "
        "`dvc repro` to train on it first"
    )
    run(["git", "checkout", "params.yaml", "dvc.lock"], repo, stage_env())
    dvc(repo, "checkout", "--force", "prepare", "train")  # the committed split and model info
    assert dvc(repo, "status").stdout.strip().endswith("up to date.")


def test_outputs_evaluate_cannot_write_are_one_line_and_nothing_is_logged(repo, client):
    """A full disk or a file in the way: the reason and the fix, no traceback, and no
    evaluation logged that metrics/ does not hold."""
    info = json.loads((repo / "models/model_info.json").read_text())
    before = client.get_run(info["run_id"]).data.params
    blocker = repo / "metrics/confusion.csv"  # evaluate's first output
    kept = blocker.read_bytes()
    blocker.unlink()
    blocker.mkdir()  # a file cannot be renamed over a folder
    try:
        result = run([sys.executable, "-m", "pipeline.evaluate"], repo, stage_env(), check=False)
    finally:
        blocker.rmdir()
        blocker.write_bytes(kept)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(
        "error: could not write the evaluation's outputs in metrics/: [Errno 21] Is a directory"
    ), line
    assert line.endswith(
        "nothing was logged to MLflow. Free the space or fix the folder, then run `dvc repro`"
    ), line
    assert client.get_run(info["run_id"]).data.params == before  # no evaluation claimed
    assert run(["git", "status", "--porcelain"], repo).stdout == ""


def start_queue(repo, workers: int) -> None:
    """`dvc queue start` as a user's shell runs it: it returns once the workers are spawned.

    Its forked helpers keep the stdout and stderr they inherited until the
    workers exit, so the output goes to a file: read through a pipe, the call
    would block until the queue is done, or forever if a worker hangs.
    """
    log = repo / ".dvc/tmp/queue-start.log"
    with log.open("w") as output:
        start = subprocess.run(
            [DVC, "queue", "start", "-j", str(workers)],
            cwd=repo, env=stage_env(), stdout=output, stderr=subprocess.STDOUT, timeout=120,
        )  # fmt: skip
    assert start.returncode == 0, log.read_text()


def wait_for_queue(repo, timeout_s: float) -> str:
    """The last `dvc queue status` once nothing is queued or running.

    Fails with the workers' logs if the queue is not done in `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        try:
            status = dvc(repo, "queue", "status", timeout=60).stdout
        except AssertionError as error:  # a status call that fails or hangs is retried
            status = f"`dvc queue status` failed: {error}"
        else:
            if "Queued" not in status and "Running" not in status:
                return status
        time.sleep(2)
    logs = "\n".join(
        f"--- {log.name}\n{log.read_text()[-3000:]}"
        for log in sorted((repo / ".dvc/tmp/exps/celery").glob("*.out"))
    )
    raise AssertionError(f"queue not done in {timeout_s:.0f} s:\n{status}\n{logs}")


def stop_queue(repo) -> None:
    """Stop the workers, and kill any left with what they run: none outlives the test."""
    with contextlib.suppress(AssertionError):  # a stop that fails or hangs: kill below
        dvc(repo, "queue", "stop", "--kill", check=False, timeout=60)
    left = []
    for pidfile in (repo / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid"):
        with contextlib.suppress(ValueError, psutil.Error):
            worker = psutil.Process(int(pidfile.read_text()))
            if "queue-worker" in " ".join(worker.cmdline()):  # not a reused pid
                left += [*worker.children(recursive=True), worker]
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(left, timeout=10)


def test_queued_experiments_land_in_the_same_store(repo, client):
    dvc(repo, "exp", "run", "--queue", "-S", "train.learning_rate=0.002,0.0005")
    try:
        start_queue(repo, workers=2)
        status = wait_for_queue(repo, timeout_s=400)  # 30-60 s here; the test may take 900
    finally:
        stop_queue(repo)
    assert status.count("Success") == 2, status

    experiment = client.get_experiment_by_name("cifar10-resnet").experiment_id
    runs = client.search_runs([experiment], "tags.`dvc.exp_name` != ''")
    assert len(runs) == 2
    assert sorted(r.data.params["train.learning_rate"] for r in runs) == ["0.0005", "0.002"]
    names = {r.data.tags["dvc.exp_name"] for r in runs}
    shown = dvc(repo, "exp", "show", "--json").stdout
    assert all(name in shown for name in names)
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert {r.data.tags["dvc.baseline_rev"] for r in runs} == {head}
    for logged in runs:  # each trained, evaluated and registered
        assert "test_accuracy" in logged.data.metrics
        uri = f"runs:/{logged.info.run_id}/evaluation-1/params.json"
        evaluation = json.loads(mlflow.artifacts.load_text(uri))
        assert evaluation["dvc.exp_name"] == logged.data.tags["dvc.exp_name"]
        assert logged.data.tags["registry.version"] in {"3", "4"}
    assert not (repo / ".dvc/tmp/exps/mlflow.db").exists()


def test_predict_and_pyfunc_agree_with_the_keras_model(repo, client, tmp_path):
    # `client` points this process's MLflow at the repository's store, for pyfunc below.
    import keras

    rng = np.random.default_rng(1)
    files = []
    for i, (mode, size) in enumerate([("RGB", (32, 32)), ("L", (64, 48)), ("RGBA", (32, 32))]):
        path = tmp_path / f"image{i}.png"
        pixels = rng.integers(0, 256, (*size[::-1], len(mode)), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(), mode).save(path)
        files.append(path)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    files.insert(1, corrupt)

    def predict(*args):
        command = [sys.executable, "-m", "pipeline.predict", "--json", "--top", "10", *args]
        return run(command, repo, stage_env(), check=False)

    local = predict(*map(str, files))
    assert local.returncode == 1  # one file failed
    results = json.loads(local.stdout)
    assert [r["image"] for r in results] == [str(f) for f in files]
    assert "error" in results[1] and "corrupt.jpg" in local.stderr
    assert all("predictions" in r for r in results[:1] + results[2:])

    from pipeline.images import load_image

    images = np.stack([load_image(f, 32) for f in files if f != corrupt])
    expected = keras.saving.load_model(repo / "models/model.keras").predict(images, verbose=0)
    for result, row in zip(results[:1] + results[2:], expected, strict=True):
        got = {p["class"]: p["probability"] for p in result["predictions"]}
        names = json.loads((repo / "models/model_info.json").read_text())["class_names"]
        np.testing.assert_allclose([got[n] for n in names], row, rtol=1e-5, atol=1e-7)

    champion = predict("--model", "models:/cifar10-resnet@champion", str(files[0]))
    assert champion.returncode == 0, champion.stderr
    got = {p["class"]: p["probability"] for p in json.loads(champion.stdout)[0]["predictions"]}
    assert len(got) == 10  # the champion's own outputs, named as its metadata names them:
    logged = mlflow.pyfunc.load_model("models:/cifar10-resnet@champion")
    row = logged.predict(images[:1])[0]
    names = logged.metadata.metadata["class_names"]
    np.testing.assert_allclose([got[n] for n in names], row, rtol=1e-5, atol=1e-7)

    info = json.loads((repo / "models/model_info.json").read_text())
    pyfunc = mlflow.pyfunc.load_model(info["model_uri"]).predict(images)
    np.testing.assert_allclose(pyfunc, expected, rtol=1e-5, atol=1e-7)
