"""Evaluations of a trained model, logged into its training's MLflow run.

Evaluation k logs its metrics at step k and its files under `evaluation-k/`; the run
param `evaluation.k` claims the number, so two evaluations of one model at once take
two (see pipeline/evaluate.py's docstring).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from pipeline.tracking import TrackingError, redact, retry_locked, run_is_gone, store_lock


@retry_locked
def check_run(run_id: str, named_by: Path) -> None:
    """Fail before the work if the training run an evaluation logs into is not in this store."""
    import mlflow

    if run_is_gone(run_id):
        raise TrackingError(
            f"{named_by} names MLflow run {run_id}, which is deleted or not in the tracking "
            f"store {redact(mlflow.get_tracking_uri())}: the evaluation is logged into the run "
            "that trained the model. Point MLFLOW_TRACKING_URI at that run's store (a model from "
            "`dvc pull` needs the team's server), or retrain with `dvc repro -f train`"
        )


def log_evaluation(run_id: str, metrics: dict[str, float], files: list[Path], params: dict) -> int:
    """Record evaluation k of training run `run_id`: metrics at step k, files under evaluation-k/.

    Returns k. See pipeline/evaluate.py for why evaluations are kept this way. Two steps,
    each retried on its own while SQLite is locked; a retry finds the number its claim
    took (the run param `evaluation.k`, whose value `mark` is this evaluation's alone).
    """
    import socket
    import uuid

    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    mark = f"{when} {socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
    number = _log_evaluation_metrics(run_id, metrics, mark)
    _log_evaluation_files(run_id, number, files, {**params, "evaluation.claim": mark})
    return number


EVALUATION_PARAM = re.compile(r"evaluation\.(\d+)")  # a run param claiming evaluation k


def _claims(client, run_id: str) -> dict[int, str]:
    """The run's evaluation claims: number -> the mark of the evaluation that took it."""
    params = client.get_run(run_id).data.params
    return {int(m[1]): v for k, v in params.items() if (m := EVALUATION_PARAM.fullmatch(k))}


@retry_locked
def _log_evaluation_metrics(run_id: str, metrics: dict[str, float], mark: str) -> int:
    """Claim the next evaluation number and log the metrics at that step: one batch, which
    the store writes whole or not at all, up to MLflow's 1000 metrics a request (five
    headline figures and one per class: about 995 classes). Beyond, MLflow sends several,
    and a store failing between them leaves that step part-logged."""
    import mlflow

    client = mlflow.MlflowClient()
    with store_lock():  # SQLite: the whole step at once (claims alone suffice on a server)
        number = _claim_evaluation(client, run_id, mark)
        stamp = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                mlflow.entities.Metric(key, float(value), stamp, number)
                for key, value in metrics.items()
            ],
        )
    return number


def _claim_evaluation(client, run_id: str, mark: str) -> int:
    """The lowest free evaluation number, taken by logging the run param `evaluation.k` =
    `mark`. MLflow's params never change once logged, and every store (SQL databases
    through their primary key) refuses a second value for one atomically: two evaluations
    of one run at once (`dvc queue start -j 2` of `evaluate.*` experiments, on a tracking
    server) take two numbers, where reading the metric history and writing after it
    would give both the same one and the second's files would overwrite the first's.
    Numbers start after the evaluations the test_accuracy history holds (those logged
    before claims were)."""
    from mlflow.exceptions import MlflowException

    claimed = _claims(client, run_id)
    for number, value in claimed.items():
        if value == mark:  # a retry after the claim got through
            return number
    number = len(client.get_metric_history(run_id, "test_accuracy")) + 1
    while True:
        while number in claimed:
            number += 1
        try:
            client.log_param(run_id, f"evaluation.{number}", mark)
            return number
        except MlflowException:  # taken meanwhile, or the store's own trouble: look
            taken = _claims(client, run_id).get(number)
            if taken == mark:  # ours after all: the reply was lost, and a retry refused
                return number
            if taken is None:
                raise
            claimed[number] = taken


@retry_locked
def _log_evaluation_files(run_id: str, number: int, files: list[Path], params: dict) -> None:
    """Evaluation `number`'s files and params, and the count: all overwritten on a retry."""
    import mlflow

    client = mlflow.MlflowClient()
    folder = f"evaluation-{number}"
    for file in files:
        client.log_artifact(run_id, str(file), artifact_path=folder)
    client.log_dict(run_id, params, f"{folder}/params.json")
    # The highest number claimed, not this one: a later evaluation may be done first.
    client.set_tag(run_id, "evaluation.count", str(max([number, *_claims(client, run_id)])))


@retry_locked
def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
