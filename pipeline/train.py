"""train: the prepared data -> models/model.keras, tracked in one MLflow run.

    python -m pipeline.train     # reads model and train from params.yaml, data/prepared

Prints one line per epoch, and a progress line every 2 minutes within a long
one; checkpoints every epoch into .train-state/ so a killed run continues where
it stopped (see pipeline/resume.py); logs params, per-epoch metrics, tags and
the model to MLflow (see pipeline/run_log.py; epoch lines: pipeline/progress.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from pipeline import files, paths
from pipeline.config import Params, ParamsError, TrainParams, flatten, load_params
from pipeline.device import Device, emulation_warning, resolve_device
from pipeline.distributed import Cluster
from pipeline.errors import PipelineError, cli
from pipeline.prepared import Split, load_meta, load_split
from pipeline.progress import (
    HISTORY_COLUMNS,
    PROGRESS_EVERY_S,
    EpochLogger,
    EpochRecorder,
    StepProgress,
    divergence_remedy,
    duration,
    keras_callbacks,
)
from pipeline.recovery_key import TRAINING_SECTIONS, resume_basis, resume_key
from pipeline.startup import import_tensorflow

# The MLflow run's params: the training sections and the data params that made its data.
LOGGED_SECTIONS = ("data", *TRAINING_SECTIONS)


def logged_params(params: Params) -> dict:
    """The dotted values the MLflow run logs as params: training's and the data's."""
    return {k: v for k, v in flatten(params).items() if k.split(".")[0] in LOGGED_SECTIONS}


# --- checks ----------------------------------------------------------------------------------


def check_fits(params: TrainParams, train: Split, replicas: int = 1) -> None:
    if params.batch_size % replicas:
        raise ParamsError(
            f"train.batch_size: must be a multiple of the {replicas} training replicas "
            f"(it is the global batch, split evenly among them), got {params.batch_size}"
        )
    if params.batch_size > len(train.labels):
        raise ParamsError(
            f"train.batch_size: must be at most the {len(train.labels)} training images, "
            f"got {params.batch_size}"
        )


# --- the stage -----------------------------------------------------------------------------------


def train_summary(state, train: Split, val: Split, device: Device) -> dict:
    last = state.history[-1]
    summary = {
        "loss": last["loss"],
        "accuracy": last["accuracy"],
        "epochs": state.epochs_done,
        "train_images": len(train.labels),
        "val_images": len(val.labels),
        "wall_time_s": round(state.wall_time_s, 2),
        "images_per_second": round(
            float(np.median([r["images_per_second"] for r in state.history])), 1
        ),
        "device": device.kind,
        "precision": device.precision,
    }
    if "val_loss" in last:
        summary.update(val_loss=last["val_loss"], val_accuracy=last["val_accuracy"])
    return summary


def write_history(path: Path, history: list[dict]) -> None:
    """One row per epoch. Without a validation split the val_* cells are `nan`: dvc.yaml's loss
    and accuracy plots then draw the training curve alone (DVC drops a plot whose field is
    missing, and draws an empty cell as 0)."""
    lines = [",".join(HISTORY_COLUMNS)] + [
        ",".join(f"{row.get(c, math.nan):.6g}" for c in HISTORY_COLUMNS) for row in history
    ]
    files.write_text(path, "\n".join(lines) + "\n")


def save_model(model, path: Path) -> None:
    """Save under a temporary name, then rename: a full disk never leaves a valid-looking model."""
    try:
        with files.replacing(path) as partial:
            model.save(partial)
    except OSError as error:
        raise PipelineError(f"could not save the model to {path}: {error}") from None


@cli
def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        prog="python -m pipeline.train", description=__doc__.splitlines()[0]
    ).parse_args(argv)
    params = load_params(paths.PARAMS)  # a mistyped param fails in a second, before TensorFlow
    import_tensorflow()  # before anything imports it, so its start-up chatter is filtered
    meta = load_meta(paths.PREPARED_DIR)
    train, val = load_split(paths.PREPARED_DIR, "train"), load_split(paths.PREPARED_DIR, "val")
    check_fits(params.train, train)
    cluster = Cluster.from_environment()
    if cluster.chief:  # the only process that talks to MLflow; an unreachable store fails now
        from pipeline import tracking

        tracking.connect(tracking.repository_root())
    from pipeline.prepared import digest_of_test_set

    test = load_split(paths.PREPARED_DIR, "test")  # held out: only its digest is kept
    test_set = digest_of_test_set(test.images, test.labels, meta["class_names"])
    del test
    run_training(params, meta, train, val, cluster, test_set=test_set)


def compiled_model(params: Params, meta: dict, state, store, steps: int, device: Device):
    """The network and its optimizer: fresh, or restored from the recovery checkpoint."""

    from pipeline.model import SmoothedCrossentropy
    from pipeline.optimizer import decay_only, make_optimizer

    cfg = params.train
    if state.checkpoint:
        model, optimizer = restored_model(state, store)
        decay_only(optimizer, cfg.weight_decay_scope)  # a checkpoint does not keep it
    else:
        model = build_network(params, meta)
        optimizer = make_optimizer(cfg, steps * cfg.epochs, device.precision)
    model.compile(
        optimizer=optimizer,
        loss=SmoothedCrossentropy(cfg.label_smoothing),
        metrics=["accuracy"],
        jit_compile=device.jit_compile,
    )
    if not optimizer.built:  # the explicit multi-worker loop needs its slots up front
        optimizer.build(model.trainable_variables)
    return model


def restored_model(state, store):
    """The model and optimizer of the recovery checkpoint, as they were after its epoch."""
    import keras

    from pipeline.model import SmoothedCrossentropy  # noqa: F401  (registered: the loss reloads)
    from pipeline.optimizer import agreeing
    from pipeline.resume import seed_states

    try:
        model = keras.models.load_model(store.checkpoint_path(state))
    except Exception as error:  # a file cut short by a power loss, say
        raise PipelineError(
            f"cannot read the recovery checkpoint {store.checkpoint_path(state)} "
            f"({type(error).__name__}: {error}); delete it to train from the start "
            "(a state without its checkpoint is discarded)"
        ) from None
    # Dropout's random stream where it was (the checkpoint does not hold it), so a resumed
    # training draws the masks an unbroken one would. A state written before it was kept
    # has none: the stream starts over, as it used to.
    generators = seed_states(model)
    if state.rng and len(state.rng) == len(generators):
        for variable, value in zip(generators, state.rng, strict=True):
            variable.assign(value)
    # Restored with its state: moments, step count and (mixed_float16) loss scale.
    return model, agreeing(model.optimizer, model.trainable_variables)


def build_network(params: Params, meta: dict):
    from pipeline.model import build_model

    return build_model(
        params.model, num_classes=len(meta["class_names"]), image_size=meta["image_size"],
        mean=meta["mean"], std=meta["std"],
    )  # fmt: skip


def run_training(
    params: Params,
    meta: dict,
    train: Split,
    val: Split,
    cluster: Cluster | None = None,
    test_set: str | None = None,
) -> None:
    """Train (or resume) and export the model. test_set: the digest of the test images
    held out beside `train` (prepared.digest_of_test_set), kept in model_info.json."""
    import keras

    from pipeline import tracking
    from pipeline.data import steps_per_epoch
    from pipeline.distributed import check_same_start, make_strategy, peers_reachable
    from pipeline.resume import TrainState

    cfg, cluster = params.train, cluster or Cluster()
    tracking.retried_by(rerun(cluster.workers))  # in the errors of refused store calls
    device = resolve_device(cfg)
    if cluster.workers > 1:  # fit_workers runs its own tf.functions, which XLA does not compile
        device = dataclasses.replace(device, jit_compile=False)
    if warning := emulation_warning(device):
        print(warning, file=sys.stderr, flush=True)
    gpus = device.count if device.kind == "GPU" else 1
    # Before the strategy: under TF_CONFIG creating it waits for every worker to start.
    if cfg.sam_rho and cluster.workers * gpus > 1:
        raise PipelineError(
            f"train.sam_rho: SAM moves the weights in place, on one device; this training "
            f"has {cluster.workers * gpus} replicas (GPUs or workers): set "
            "train.sam_rho to 0, or train on one (CUDA_VISIBLE_DEVICES=0, no TF_CONFIG)"
        )
    strategy = make_strategy(gpus, cluster)
    check_fits(cfg, train, strategy.num_replicas_in_sync)
    keras.config.disable_interactive_logging()  # our one line per epoch replaces the bars
    seed_everything(cfg)
    keras.mixed_precision.set_global_policy(device.precision)

    steps = steps_per_epoch(len(train.labels), cfg.batch_size)
    basis = resume_basis(
        params, meta, train, val, device.precision, cluster.workers,
        strategy.num_replicas_in_sync,
    )  # fmt: skip
    expected = resume_key(basis)
    # Only the chief writes the recovery state; the other workers read it to resume too.
    store = recovery_store(expected, writable=cluster.chief)
    if cluster.workers > 1:
        with peers_reachable():  # the first collective: a peer may die before any step
            # Agree on what to train before the chief sets aside (or deletes) any state,
            # and read a shared .train-state only once the chief has moved what it moves.
            check_same_start(strategy, 0, expected)
            state = store.load(expected, basis) if cluster.chief else None
            check_same_start(strategy, 0, expected)
            if not cluster.chief:
                state = store.load(expected, basis)
            state = state or TrainState(fingerprint=expected, basis=basis)
            check_same_start(strategy, state.epochs_done, expected)
    else:
        state = store.load(expected, basis) or TrainState(fingerprint=expected, basis=basis)
    with strategy.scope():
        model = compiled_model(params, meta, state, store, steps, device)

    if cluster.chief:
        with (
            tracking.reported(
                "cannot start or continue the MLflow run",
                "no epoch was trained by this attempt; rerun once the store answers",
            ),
            # The other workers wait in their first collective for at most 120 s: an
            # unreachable server must fail in seconds, not after MLflow's minutes of retries.
            tracking.few_retries() if cluster.workers > 1 else contextlib.nullcontext(),
        ):
            start_run(params, state, store, device)
    where = f"{device.count} {device.kind}"
    if cluster.workers > 1:
        where = f"worker {cluster.index} of {cluster.workers} ({where} each)"
    print(
        f"train: {len(train.labels)} train / {len(val.labels)} val images, {steps} steps of "
        f"{cfg.batch_size} per epoch on {where} ({device.precision}, XLA "
        f"{'on' if device.jit_compile else 'off'}"
        + ("" if device.onednn is None else f", oneDNN {'on' if device.onednn else 'off'}")
        + ")"
        + (f"; SAM rho {cfg.sam_rho} from epoch {cfg.sam_from_epoch}" if cfg.sam_rho else "")
        + (f"; MLflow run {state.run_id}" if cluster.chief else ""),
        flush=True,
    )

    log_epoch = EpochLogger(state.run_id, state.history) if cluster.chief else lambda row: None
    recorder = EpochRecorder(
        state, store, cfg.epochs, steps * cfg.batch_size, log_epoch, divergence_remedy(cfg)
    )
    progress = StepProgress(cfg.epochs, steps, cfg.batch_size, PROGRESS_EVERY_S)
    if state.epochs_done < cfg.epochs:
        fit_epochs(
            model, strategy, train, val, cfg, steps, state.epochs_done, recorder, progress,
            cluster.workers,
        )  # fmt: skip
    if cluster.chief:
        finish(params, meta, train, val, model, state, store, device, test_set, cluster.workers)


def seed_everything(cfg: TrainParams) -> None:
    """Weight init, dropout and (with train.deterministic) the order of float sums."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()


def fit_epochs(
    model, strategy, train: Split, val: Split, cfg: TrainParams, steps: int, first_epoch: int,
    recorder: EpochRecorder, progress: StepProgress, workers: int,
) -> None:  # fmt: skip
    """Train epochs first_epoch + 1 .. cfg.epochs (1-based): Keras's fit on one machine, the
    multi-worker loop on several; `recorder` saves and logs each epoch as it ends."""
    from pipeline.data import make_dataset

    if workers > 1:
        from pipeline.distributed import fit_workers

        fit_workers(
            model, strategy, train, val, cfg, steps, first_epoch,
            lambda *args: recorder.end_epoch(model, *args), progress,
        )  # fmt: skip
        return
    dataset = make_dataset(
        train, cfg.batch_size, training=True, augment=cfg.augment, seed=cfg.seed,
        first_epoch=first_epoch, epochs=cfg.epochs,
    )  # fmt: skip
    validation = make_dataset(val, cfg.batch_size) if len(val.labels) else None
    callbacks = keras_callbacks(recorder, progress)
    if cfg.sam_rho:
        from pipeline.sam import sharpness_aware

        callbacks.append(sharpness_aware(model, cfg.sam_rho, cfg.sam_from_epoch))
    model.fit(
        dataset, epochs=cfg.epochs, initial_epoch=first_epoch, steps_per_epoch=steps,
        validation_data=validation, callbacks=callbacks, verbose=0, shuffle=False,
    )  # fmt: skip


def recovery_store(expected: str, writable: bool):
    """Where the training of fingerprint `expected` keeps its recovery state.

    In the workspace, .train-state/, which also takes back the state a killed or failed
    experiment left. In an experiment copy, the workspace's .train-state/exps/<expected>/,
    claimed for this training, as the copy's own would be deleted with it; while another
    training of the same settings holds that one, the copy's own, saying so."""
    from pipeline.resume import EXPERIMENTS_DIR, Claim, StateStore
    from pipeline.tracking import in_experiment_copy, repository_root

    shared = repository_root() / paths.TRAIN_STATE_DIR / EXPERIMENTS_DIR
    if not in_experiment_copy():
        return StateStore(paths.TRAIN_STATE_DIR, writable, experiments=shared)
    folder = shared / expected
    if not writable:  # another worker's: the chief holds the claim
        return StateStore(folder, writable=False)
    try:
        claim = Claim.take(folder)
    except OSError as error:  # the workspace's disk: read-only, full
        raise PipelineError(
            f"cannot write the recovery state in {folder.parent} ({error.strerror or error})"
        ) from None
    if claim is None:
        print(
            f"train: warning: another training of these settings holds {folder}; this "
            "one keeps its recovery state in its temporary copy, deleted with it",
            file=sys.stderr,
            flush=True,
        )
        return StateStore(paths.TRAIN_STATE_DIR, writable)
    print(f"train: recovery state in {folder}, outside this temporary copy", flush=True)
    return StateStore(folder, writable, claim=claim)


def start_run(params: Params, state, store, device: Device) -> None:
    """Chief only: start the MLflow run, or continue the recovery state's."""
    from pipeline import run_log, tracking

    for discarded in store.discarded:  # its training is not coming back
        if discarded.run_id and discarded.run_id != state.run_id:
            run_log.end_abandoned(discarded.run_id, discarded.model_uri is not None)
    previous = state.run_id
    state.run_id = run_log.start_run(state.run_id).info.run_id
    if state.run_id != previous:  # a new run: the first try, or the old run is gone
        state.model_uri = None  # a model logged to the old run is not this run's
        try:
            store.record(state)  # recorded before epoch 1 ends, so a kill resumes this run
        except OSError as error:  # the local disk's trouble, not the store's
            raise PipelineError(
                f"cannot write the recovery state in {store.directory} ({error})"
            ) from None
    # Every start: a kill while a new run's params were being logged leaves the rest to a
    # rerun, which then continues that run (log_params adds only those it lacks).
    logged = {**logged_params(params), "train.precision_resolved": device.precision}
    run_log.log_params(logged)
    run_log.log_params_file(logged)  # the first upload: a broken artifact store stops us here
    if state.epochs_done:
        print(f"train: resuming after epoch {state.epochs_done} in MLflow run {state.run_id}")
        run_log.backfill_metrics(state.run_id, state.history)
    elif state.run_id == previous:
        print(f"train: starting again in MLflow run {state.run_id} (stopped during epoch 1)")
    run_log.set_tags(tracking.run_tags(), unset=tracking.DVC_TAGS)


def rerun(workers: int) -> str:
    """What resumes a training whose recovery state is kept. Under TF_CONFIG every worker
    must start again: `dvc repro` on the chief alone would find a state for one worker
    only, set it aside and train from epoch 1."""
    if workers > 1:
        return "`python -m pipeline.train` run again on every worker (the same TF_CONFIG)"
    from pipeline.tracking import in_experiment_copy

    if in_experiment_copy():
        return "the same `dvc exp run` (or `dvc repro` in the workspace)"
    return "`dvc repro`"


def finish(
    params: Params, meta: dict, train: Split, val: Split, model, state, store, device,
    test_set: str | None = None, workers: int = 1,
):  # fmt: skip
    """Chief only: save the model and metrics, log them to MLflow, clear the recovery state."""
    import keras

    from pipeline import run_log, tracking

    # The saved model computes in float32 whatever the training policy: portable to any device.
    keras.mixed_precision.set_global_policy("float32")
    export = build_network(params, meta)
    export.set_weights(model.get_weights())
    # The last training's model_info.json goes first: it is written (below) only once this
    # model is logged, and until then it would describe, to evaluate, a model it is not.
    paths.MODEL_INFO.unlink(missing_ok=True)
    save_model(export, paths.MODEL_FILE)
    try:  # a full disk, or a metrics/ it cannot write, after hours of training
        summary = train_summary(state, train, val, device)
        files.write_text(paths.TRAIN_METRICS, json.dumps(summary, indent=2) + "\n")
        write_history(paths.HISTORY_FILE, state.history)
        if state.model_uri is None:  # else a rerun: all was logged but the run's end
            with tracking.reported(
                "the training finished but could not be logged to MLflow",
                f"its recovery state is kept, so once the store answers {rerun(workers)} logs it "
                "without training again",
            ):
                run_log.backfill_metrics(state.run_id, state.history)  # epochs an outage missed
                # The model last: calls before it are harmless to repeat when a rerun logs the run.
                run_log.log_final(summary, [paths.HISTORY_FILE, paths.TRAIN_METRICS])
                examples = val if len(val.labels) else train
                state.model_uri = run_log.log_model(export, examples, meta["class_names"])
            store.record(state)
        from pipeline.prepared import training_data_digest

        info = {
            "run_id": state.run_id,
            "model_uri": state.model_uri,
            "class_names": meta["class_names"],
            "image_size": meta["image_size"],
            # What it learnt from and what was held out from it then: evaluate refuses test
            # images drawn anew beside other training images (prepared since), which may be
            # ones it learnt from.
            "training_data": training_data_digest(train, val),
        }
        if test_set:  # training from data/prepared, not from images in memory (a benchmark)
            info["test_set"] = test_set
        files.write_text(paths.MODEL_INFO, json.dumps(info, indent=2) + "\n")
    except OSError as error:
        raise PipelineError(
            f"the training finished but its outputs could not be written ({error}); its "
            f"recovery state is kept, so once that is fixed {rerun(workers)} writes them "
            "without training again"
        ) from None
    with tracking.reported(
        "the training is logged to MLflow but its run could not be marked finished",
        f"its recovery state is kept, so once the store answers {rerun(workers)} marks it "
        "without training or logging again",
    ):
        run_log.end_run(state.run_id)
    store.clear()
    store.release()
    print(
        f"train: done, {state.epochs_done} epoch{'s' * (state.epochs_done != 1)} in "
        f"{duration(state.wall_time_s)}; "
        f"{summary['images_per_second']:.0f} img/s; saved {paths.MODEL_FILE}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
