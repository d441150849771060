"""train's output while it runs: a line per epoch, progress lines within a long one, and
at each epoch's end the checkpoint, then MLflow, then the line (EpochRecorder).

The order at an epoch's end is the recovery guarantee: an epoch checkpointed is never
trained again, and one MLflow missed is back-filled (EpochLogger, then `finish`).
"""

from __future__ import annotations

import math
import sys
import threading
import time

from pipeline.config import TrainParams
from pipeline.errors import PipelineError

HISTORY_COLUMNS = (
    "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second",
)  # fmt: skip


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
        f"ETA {duration(eta_s)}",
    ]
    return "train: " + "  ".join(parts)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# A progress line within an epoch at most this often, in seconds: an epoch of the full data
# takes 3-4 minutes on CPU-2 (one line or none), 15-21 on an AVX2-only laptop-class CPU
# (a line every 2 minutes instead of 20 silent ones), seconds on a GPU (none).
PROGRESS_EVERY_S = 120.0


class StepProgress:
    """Within a long epoch, a line every `every_s` seconds: steps done, running loss and
    accuracy, speed so far and when the epoch will end. Pure: the caller prints."""

    def __init__(self, epochs: int, steps: int, batch_size: int, every_s: float, clock=None):
        self.epochs, self.steps, self.batch_size, self.every_s = epochs, steps, batch_size, every_s
        self.clock = clock or time.perf_counter
        self.epoch, self.started, self.last, self.last_done = 0, 0.0, 0.0, 0

    def start(self, epoch: int) -> None:
        """Epoch `epoch` (0-based) begins now."""
        self.epoch, self.started = epoch, self.clock()
        self.last, self.last_done = self.started, 0

    def step_done(self, done: int, logs: dict) -> str | None:
        """`done` steps of this epoch are finished; a line if one is due, else None. A step
        reported after a later one (Keras's thread pool runs callbacks out of order) is
        left out."""
        now = self.clock()
        if done <= self.last_done:
            return None
        self.last_done = done
        if now - self.last < self.every_s or done >= self.steps:  # the epoch line follows
            return None
        self.last = now
        elapsed = now - self.started
        parts = [f"epoch {self.epoch + 1}/{self.epochs}", f"step {done}/{self.steps}"]
        parts += [
            f"{name} {float(logs[key]):.4f}"
            for key, name in (("loss", "loss"), ("accuracy", "acc"))
            if logs.get(key) is not None
        ]
        parts += [
            f"{done * self.batch_size / elapsed:.0f} img/s",
            f"epoch ends in {duration((self.steps - done) * elapsed / done)}",
        ]
        return "train: " + "  ".join(parts)


class EpochLogger:
    """Logs each epoch's row to the MLflow run.

    A store that does not answer (a server restarting, the network down) costs
    a warning, not the training: the epochs it missed are logged with the next
    epoch that gets through, and by `finish` at the latest. `history` is the
    recovery state's, which holds every epoch so far.
    """

    def __init__(self, run_id: str, history: list[dict]) -> None:
        self.run_id, self.history, self.behind = run_id, history, False

    def __call__(self, row: dict) -> None:
        from pipeline import run_log, tracking

        try:
            with tracking.few_retries():
                if self.behind:
                    run_log.backfill_metrics(self.run_id, self.history)
                else:
                    run_log.log_epoch(row, step=row["epoch"])
            self.behind = False
        except tracking.store_errors() as error:
            self.behind = True
            print(
                f"train: warning: epoch {row['epoch']} is not logged to MLflow yet "
                f"({tracking.short_reason(error)}); training goes on and logs it later",
                flush=True,
            )


def divergence_remedy(cfg: TrainParams) -> str:
    """The params to change when the loss turns NaN: warm-up only exists under onecycle."""
    remedy = "lower train.learning_rate"
    if cfg.lr_schedule == "onecycle":
        return remedy + " or lengthen train.warmup"
    return remedy + " (or warm up to it: train.lr_schedule onecycle)"


class EpochRecorder:
    """At each epoch's end: checkpoint, then log to MLflow, then print one line.

    The checkpoint comes first: a crash after it resumes past the epoch, and
    the MLflow metrics it did not log yet are back-filled on resume.
    """

    def __init__(self, state, store, epochs: int, images_per_epoch: int, log_metrics, remedy: str):
        self.state, self.store, self.epochs = state, store, epochs
        self.images_per_epoch, self.log_metrics = images_per_epoch, log_metrics
        self.remedy = remedy  # what to change when the training diverges

    def end_epoch(self, model, epoch: int, logs: dict, train_s: float, total_s: float) -> None:
        from pipeline.optimizer import last_step_rate  # imports Keras

        state = self.state
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
        if not math.isfinite(row["loss"]):  # NaN weights from here on: nothing worth keeping
            raise PipelineError(
                f"the training diverged: its loss was {row['loss']} in epoch {epoch + 1}; "
                f"{self.remedy} (the recovery state keeps epoch {state.epochs_done}, which "
                "only a rerun with the same params resumes)"
            )
        row["learning_rate"] = last_step_rate(model.optimizer)  # the epoch's last, in logs
        row["images_per_second"] = self.images_per_epoch / train_s
        state.history.append({k: row[k] for k in HISTORY_COLUMNS if k in row})
        state.epochs_done = epoch + 1
        state.wall_time_s += total_s
        self.store.save(state, model)
        self.log_metrics(state.history[-1])
        remaining = self.epochs - state.epochs_done
        print(epoch_line(row, self.epochs, remaining * state.wall_time_s / len(state.history)))
        sys.stdout.flush()


def keras_callbacks(recorder: EpochRecorder, progress: StepProgress) -> list:
    """Times each epoch of `fit` (training part apart from validation) for the recorder,
    and prints the progress lines within it."""
    import keras

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()
            self.train_s = None
            progress.start(epoch)

        def on_test_begin(self, logs=None):  # validation starts: training part is done
            self.train_s = time.perf_counter() - self.started

        def on_epoch_end(self, epoch, logs=None):
            total_s = time.perf_counter() - self.started
            recorder.end_epoch(self.model, epoch, logs, self.train_s or total_s, total_s)

    class StepLines(keras.callbacks.Callback):
        # Keras may then call it from a worker thread, without holding up the next step
        # to turn this step's logs into numbers; the epoch's end waits for it.
        async_safe = True
        lock = threading.Lock()  # the pool's threads, one at a time: lines in step order

        def on_train_batch_end(self, batch, logs=None):
            with self.lock:
                line = progress.step_done(batch + 1, logs or {})
                if line:
                    print(line, flush=True)

    return [EpochEnd(), StepLines()]
