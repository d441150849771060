"""train: the prepared data -> models/model.keras, tracked in one MLflow run.

    python -m pipeline.train     # reads data, model and train from params.yaml

Prints one line per epoch; checkpoints every epoch into .train-state/ so a
killed run continues where it stopped (see pipeline/resume.py); logs params,
per-epoch metrics, tags and the model to MLflow (see pipeline/tracking.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.config import Params, ParamsError, TrainParams, flatten, load_params
from pipeline.errors import PipelineError, cli
from pipeline.prepare import Split, load_meta, load_split

HISTORY_COLUMNS = (
    "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second",
)  # fmt: skip


# --- device, precision and schedule ------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    kind: str  # "GPU" or "CPU"
    count: int  # local accelerators used
    precision: str  # resolved Keras dtype policy
    jit_compile: bool  # XLA


def resolve_device(params: TrainParams) -> Device:
    """Pick the dtype policy and XLA from what is here; `auto` is what measured fastest.

    GPUs: bfloat16 where the chip has it (compute capability 8.0+: A100, H100),
    float16 with loss scaling before that, and XLA. CPUs: float32 without XLA.
    On a 2-core Xeon with AMX, batch 128, the default network trained at
    94-105 img/s in float32, 75 in mixed_bfloat16 (oneDNN's bf16 convolutions
    are ~2x faster, but the casts and element-wise ops around them cost more)
    and 78 with XLA: so float32 is what auto picks on a CPU.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        precision = params.precision
        if precision == "auto":
            details = tf.config.experimental.get_device_details(gpus[0])
            major = (details.get("compute_capability") or (0, 0))[0]
            precision = "mixed_bfloat16" if major >= 8 else "mixed_float16"
        return Device("GPU", len(gpus), precision, jit_compile=True)
    precision = "float32" if params.precision == "auto" else params.precision
    return Device("CPU", 1, precision, jit_compile=False)


def make_schedule(params: TrainParams, total_steps: int):
    """Adam's learning rate per step: a float, or a schedule Keras evaluates each step."""
    import keras

    if params.lr_schedule == "constant":
        return params.learning_rate
    if params.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(params.learning_rate, total_steps)
    # onecycle: linear warm-up over the first 30% of steps from lr/25 to lr, then
    # cosine annealing down to lr/1000 (alpha is a fraction of the peak).
    warmup = max(1, int(0.3 * total_steps))
    return keras.optimizers.schedules.CosineDecay(
        params.learning_rate / 25,
        decay_steps=max(1, total_steps - warmup),
        alpha=1e-3,
        warmup_target=params.learning_rate,
        warmup_steps=warmup,
    )


def check_single_worker() -> None:
    """Refuse a multi-worker TF_CONFIG before any work, rather than fail mid-run.

    Keras 3's `fit` does not run under tf.distribute.MultiWorkerMirroredStrategy
    (keras-team/keras#20585, open; reproduced here with Keras 3.15 / TF 2.21:
    a ValueError on PerReplica values in fit's first step, with any dataset).
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return
    try:
        cluster = json.loads(raw).get("cluster", {})
        workers = sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))
    except (ValueError, AttributeError, TypeError):
        raise PipelineError("TF_CONFIG is set but is not a JSON cluster description") from None
    if workers > 1:
        raise PipelineError(
            f"TF_CONFIG describes {workers} workers, but multi-worker training is not "
            "available: Keras 3's fit fails under MultiWorkerMirroredStrategy "
            "(keras-team/keras#20585). Train on one machine (all its GPUs are used through "
            "MirroredStrategy) and unset TF_CONFIG"
        )


def check_fits(params: TrainParams, train: Split) -> None:
    if params.batch_size > len(train.labels):
        raise ParamsError(
            f"train.batch_size: must be at most the {len(train.labels)} training images, "
            f"got {params.batch_size}"
        )


# --- one epoch line and MLflow per epoch ---------------------------------------------------------


def epoch_line(row: dict, epochs: int, eta_s: float) -> str:
    parts = [
        f"epoch {row['epoch']}/{epochs}",
        f"loss {row['loss']:.4f}",
        f"acc {row['accuracy']:.4f}",
    ]
    if "val_loss" in row:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.4f}"]
    parts += [
        f"lr {row['learning_rate']:.2e}",
        f"{row['images_per_second']:.0f} img/s",
        f"ETA {_duration(eta_s)}",
    ]
    return "train: " + "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def make_callback(state, store, epochs: int, images_per_epoch: int, log_metrics):
    """A Keras callback: per epoch, checkpoint, then log to MLflow, then print one line."""
    import keras

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()
            self.train_s = None

        def on_test_begin(self, logs=None):  # validation starts: training part is done
            self.train_s = time.perf_counter() - self.started

        def on_epoch_end(self, epoch, logs=None):
            train_s = self.train_s or (time.perf_counter() - self.started)
            learning_rate = self.model.optimizer.learning_rate
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
            row["learning_rate"] = float(np.asarray(learning_rate))
            row["images_per_second"] = images_per_epoch / train_s
            state.history.append({k: row[k] for k in HISTORY_COLUMNS if k in row})
            state.epochs_done = epoch + 1
            state.wall_time_s += time.perf_counter() - self.started
            store.save(state, self.model)  # first: a crash after this resumes past the epoch
            log_metrics(state.history[-1])
            remaining = epochs - state.epochs_done
            print(epoch_line(row, epochs, remaining * state.wall_time_s / len(state.history)))
            sys.stdout.flush()

    return EpochEnd()


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
    columns = [c for c in HISTORY_COLUMNS if all(c in row for row in history)]
    lines = [",".join(columns)] + [",".join(f"{row[c]:.6g}" for c in columns) for row in history]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def save_model(model, path: Path) -> None:
    """Save under a temporary name, then rename: a full disk never leaves a valid-looking model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".part.keras")
    try:
        model.save(partial)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise PipelineError(f"could not save the model to {path}: {error}") from None


@cli
def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    params = load_params(paths.PARAMS)
    meta = load_meta(paths.PREPARED_DIR)
    train, val = load_split(paths.PREPARED_DIR, "train"), load_split(paths.PREPARED_DIR, "val")
    check_fits(params.train, train)
    check_single_worker()

    from pipeline import tracking

    root = tracking.repository_root()
    tracking.connect(root)  # before any training: an unreachable server fails now
    run_training(params, meta, train, val, root)


def run_training(params: Params, meta: dict, train: Split, val: Split, root: Path) -> None:
    import keras
    import mlflow
    import tensorflow as tf

    from pipeline import tracking
    from pipeline.data import make_dataset, steps_per_epoch
    from pipeline.model import build_model
    from pipeline.resume import StateStore, TrainState, fingerprint

    cfg = params.train
    keras.config.disable_interactive_logging()  # our one line per epoch replaces the bars
    device = resolve_device(cfg)
    keras.utils.set_random_seed(cfg.seed)  # weight init and dropout
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(device.precision)
    strategy = (
        tf.distribute.MirroredStrategy() if device.count > 1 else tf.distribute.get_strategy()
    )

    steps = steps_per_epoch(len(train.labels), cfg.batch_size)
    store = StateStore(paths.TRAIN_STATE_DIR)
    expected = fingerprint(flatten(params), meta, device.precision)
    state = store.load(expected) or TrainState(fingerprint=expected)

    with strategy.scope():
        if state.checkpoint:
            model = keras.models.load_model(store.checkpoint_path(state))
        else:
            model = build_model(
                params.model,
                num_classes=len(meta["class_names"]),
                image_size=meta["image_size"],
                mean=meta["mean"],
                std=meta["std"],
            )
        optimizer = (
            model.optimizer  # restored with its state: moments and step count
            if state.checkpoint
            else keras.optimizers.Adam(make_schedule(cfg, steps * cfg.epochs))
        )
        model.compile(
            optimizer=optimizer,
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=device.jit_compile,
        )

    run = tracking.start_run(state.run_id)
    state.run_id = run.info.run_id
    if state.epochs_done:
        print(f"train: resuming after epoch {state.epochs_done} in MLflow run {state.run_id}")
        tracking.backfill_metrics(state.run_id, state.history)
    else:
        store.start(state)
        tracking.log_params({**flatten(params), "train.precision_resolved": device.precision})
    tracking.set_tags(tracking.run_tags())
    print(
        f"train: {len(train.labels)} train / {len(val.labels)} val images, {steps} steps of "
        f"{cfg.batch_size} per epoch on {device.count} {device.kind} ({device.precision}, "
        f"XLA {'on' if device.jit_compile else 'off'}); MLflow run {state.run_id}",
        flush=True,
    )

    if state.epochs_done < cfg.epochs:
        dataset = make_dataset(
            train, cfg.batch_size, training=True, augment=cfg.augment, seed=cfg.seed,
            first_epoch=state.epochs_done, epochs=cfg.epochs,
        )  # fmt: skip
        validation = make_dataset(val, cfg.batch_size) if len(val.labels) else None
        callback = make_callback(
            state, store, cfg.epochs, steps * cfg.batch_size,
            lambda row: tracking.log_epoch(row, step=row["epoch"]),
        )  # fmt: skip
        model.fit(
            dataset, epochs=cfg.epochs, initial_epoch=state.epochs_done, steps_per_epoch=steps,
            validation_data=validation, callbacks=[callback], verbose=0, shuffle=False,
        )  # fmt: skip

    # The saved model computes in float32 whatever the training policy: portable to any device.
    keras.mixed_precision.set_global_policy("float32")
    export = build_model(
        params.model, num_classes=len(meta["class_names"]), image_size=meta["image_size"],
        mean=meta["mean"], std=meta["std"],
    )  # fmt: skip
    export.set_weights(model.get_weights())
    save_model(export, paths.MODEL_FILE)
    summary = train_summary(state, train, val, device)
    paths.TRAIN_METRICS.parent.mkdir(parents=True, exist_ok=True)
    paths.TRAIN_METRICS.write_text(json.dumps(summary, indent=2) + "\n")
    write_history(paths.HISTORY_FILE, state.history)
    model_uri = tracking.log_model(export, val if len(val.labels) else train, meta["class_names"])
    tracking.log_final(summary, [paths.HISTORY_FILE, paths.TRAIN_METRICS])
    info = {
        "run_id": state.run_id,
        "model_uri": model_uri,
        "class_names": meta["class_names"],
        "image_size": meta["image_size"],
    }
    paths.MODEL_INFO.write_text(json.dumps(info, indent=2) + "\n")
    mlflow.end_run()
    store.clear()
    print(
        f"train: done, {state.epochs_done} epochs in {_duration(state.wall_time_s)}; "
        f"{summary['images_per_second']:.0f} img/s; saved {paths.MODEL_FILE}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
