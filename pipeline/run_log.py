"""The training's MLflow run: started or continued, its params, tags, per-epoch metrics,
final figures and model, and how it ends.

Every call that writes to the store goes through retry_locked (a busy SQLite store is
waited out); pipeline/tracking.py connects to the store first and turns its failures
into one-line errors.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from pipeline.tracking import (
    TrackingError,
    few_retries,
    is_locked,
    redact,
    refusal,
    rerun_command,
    retry_locked,
    run_is_gone,
    short_reason,
    store_errors,
)


@retry_locked
def start_run(run_id: str | None):
    """Start a new run, or continue `run_id` (a resumed training), as the active run.

    A run the store no longer has (deleted in the UI, or MLFLOW_TRACKING_URI now names
    another store) cannot be continued: a new run starts, and says so.
    """
    import mlflow

    if run_id is not None and run_is_gone(run_id):
        print(
            f"train: MLflow run {run_id} is deleted or not in this tracking store; "
            "the training goes on in a new run",
            flush=True,
        )
        run_id = None
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.start_run(run_id=run_id)
    except MlflowException as error:
        # Its experiment was renamed in the UI since: connect() made a new one of our name,
        # and MLflow continues no run of another experiment than the active one.
        if run_id is None or "active experiment ID does not match" not in str(error):
            raise
    own = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    name = mlflow.get_experiment(own).name
    print(f"train: MLflow run {run_id} is in experiment '{name}' now; it goes on there")
    mlflow.set_experiment(experiment_id=own)
    return mlflow.start_run(run_id=run_id)


@retry_locked
def log_params(params: dict) -> None:
    """Log the params the active run does not have yet (a run restarted after a kill has some;
    MLflow refuses to change one, and a new data.url for the same images keeps the run)."""
    import mlflow

    run = mlflow.active_run()
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v))
    if changed:
        print(f"train: the MLflow run keeps the values it started with for {', '.join(changed)}")
    mlflow.log_params({key: value for key, value in params.items() if key not in logged})


@retry_locked
def log_params_file(params: dict) -> None:
    """The run's params as train/params.json, on every start of the run, before any epoch.

    Also the run's first upload: MLflow opens a run's artifact store only then, so a
    store that cannot take files (a folder this machine may not write, as the experiment
    a teammate created on a shared database keeps theirs; an s3:// bucket without
    credentials; a server whose --artifacts-destination is broken) stops the training
    here, not after its last epoch when the model is logged.
    """
    import mlflow

    where = redact(mlflow.get_artifact_uri())
    try:
        mlflow.log_dict(params, "train/params.json")
    except Exception as error:  # artifact stores raise their own types (OSError, boto3's, ...)
        if is_locked(error):  # the run's lookup in a busy mlflow.db: retry_locked waits
            raise
        if refused := refusal(error):
            raise TrackingError(
                f"cannot store the run's artifacts: {refused}; then retry with {rerun_command()}"
            ) from None
        raise TrackingError(
            f"cannot store the run's artifacts at {where} ({short_reason(error)}), so "
            "neither its model; no epoch was trained by this attempt: fix the artifact store "
            "(a folder this machine can write, the server's --artifacts-destination, "
            f"credentials) or wait until it answers, then retry with {rerun_command()}"
        ) from None


@retry_locked
def set_tags(tags: dict[str, str], unset: tuple[str, ...] = ()) -> None:
    """Set `tags` on the active run and delete those of `unset` that `tags` lacks."""
    import mlflow

    mlflow.set_tags(tags)
    run_id = mlflow.active_run().info.run_id
    logged = mlflow.MlflowClient().get_run(run_id).data.tags
    for key in unset:
        if key in logged and key not in tags:
            mlflow.delete_tag(key)


@retry_locked
def log_epoch(row: dict, step: int) -> None:
    import mlflow

    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)


@retry_locked
def backfill_metrics(run_id: str, history: list[dict]) -> None:
    """Log the epochs a killed run checkpointed, or a store outage kept from the store,
    but not yet logged; never twice. Each metric's steps are looked up on their own, and
    each request (at most 1000 values, MLflow's batch limit) holds whole epochs, so a
    request that fails part-way through a long backfill leaves nothing half-logged."""
    import mlflow
    from mlflow.entities import Metric

    if not history:
        return
    client = mlflow.MlflowClient()
    keys = sorted({key for row in history for key in row if key != "epoch"})
    logged = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}
    now_ms = int(time.time() * 1000)
    batch: list[Metric] = []
    for row in history:
        epoch = [
            Metric(key, value, now_ms, row["epoch"])
            for key, value in row.items()
            if key != "epoch" and row["epoch"] not in logged[key]
        ]
        if len(batch) + len(epoch) > 1000:
            client.log_batch(run_id, metrics=batch)
            batch = []
        batch += epoch
    if batch:
        client.log_batch(run_id, metrics=batch)


@retry_locked
def log_final(summary: dict, files: list[Path]) -> None:
    """The training's summary figures as final_* metrics (those the run lacks: a rerun
    after a failed log does not add a second value) and its files under train/."""
    import mlflow

    run_id = mlflow.active_run().info.run_id
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    final = {f"final_{k}": v for k, v in summary.items() if isinstance(v, int | float)}
    mlflow.log_metrics({key: value for key, value in final.items() if key not in logged})
    for file in files:
        mlflow.log_artifact(str(file), artifact_path="train")


@retry_locked
def log_model(model, examples, class_names: list[str]) -> str:
    """Log `model` with the keras flavor as the active run's `model`; its model URI.

    The signature says what a caller sends: a batch of raw uint8 images
    (batch, H, W, 3), and gets back class probabilities (batch, classes).
    Once per run: a try cut short (a busy SQLite store, which retry_locked waits
    out, a kill, a store error) leaves a model PENDING or FAILED, which the next
    try deletes before it logs (where the user may: on a server with logins only
    the experiment's managers can; otherwise it stays, marked unfinished); one
    that finished (READY) is the run's model.
    """
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import infer_signature

    run = mlflow.active_run().info
    earlier = mlflow.search_logged_models(
        experiment_ids=[run.experiment_id],
        filter_string=f"source_run_id = '{run.run_id}'",
        output_format="list",
    )
    for found in earlier:
        if found.status == LoggedModelStatus.READY:
            return found.model_uri
    for found in earlier:
        try:
            mlflow.MlflowClient().delete_logged_model(found.model_id)
        except store_errors() as error:
            if is_locked(error):
                raise  # retry_locked waits for the other writer
            print(
                f"train: an earlier try's unfinished model {found.model_id} stays "
                f"({found.status}; not deleted: {short_reason(error)})",
                flush=True,
            )

    sample = examples.images[:4]  # (4, H, W, 3) uint8
    signature = infer_signature(sample, model.predict(sample, verbose=0))
    with _input_example_fix():
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            input_example=sample,
            # Known, so MLflow need not infer them (slow, and it imports half the env).
            pip_requirements=_pip_requirements(),
            metadata={"class_names": list(class_names)},
        )
    return info.model_uri


@retry_locked
def end_run(run_id: str) -> None:
    """Mark the active run `run_id` FINISHED and end it.

    mlflow.end_run alone takes the run off its stack before it writes the status, so
    a retry after a busy SQLite store would find no run and leave it RUNNING: the
    status is written first, through the client, and retried; the end after it only
    drops the run from the stack (its second write of the same status may fail).
    """
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")
    with contextlib.suppress(*store_errors()):
        mlflow.end_run()


@retry_locked
def end_abandoned(run_id: str, logged: bool) -> None:
    """End a run that discarded recovery state leaves behind, if it is still RUNNING
    (a SIGKILL leaves it so): FINISHED when its model was logged, else KILLED. Best
    effort, within seconds: its training is not coming back either way."""
    import mlflow

    status = "FINISHED" if logged else "KILLED"
    try:
        with few_retries():
            client = mlflow.MlflowClient()
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "deleted" or run.info.status != "RUNNING":
                return
            client.set_terminated(run_id, status)
    except store_errors() as error:
        if is_locked(error):
            raise  # retry_locked waits for the other writer
        if getattr(error, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":  # another store's
            print(f"train: could not mark MLflow run {run_id} {status} ({short_reason(error)})")
        return
    print(f"train: marked MLflow run {run_id} of the discarded state {status}", flush=True)


@contextlib.contextmanager
def _input_example_fix():
    """Work around MLflow 3.17's keras flavor writing the input example before it
    creates the model directory (FileNotFoundError on input_example.json): make
    the directory first. Scoped to one log_model call; harmless once fixed upstream."""
    import mlflow.keras.save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model, example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, example, path, *args, **kwargs)

    keras_save._save_example = save_example
    try:
        yield
    finally:
        keras_save._save_example = original


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("tensorflow", "keras", "mlflow", "numpy")]
