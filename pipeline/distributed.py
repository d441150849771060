"""Training on several machines: TF_CONFIG, the strategy, and a training loop that works there.

When TF_CONFIG describes a cluster, training runs under
tf.distribute.MultiWorkerMirroredStrategy: `train.batch_size` stays the global
batch, each worker reads its own shard of every epoch (see
`pipeline.data.make_dataset(shard=...)`), gradients are all-reduced, and only
the chief (task `chief`, else worker 0) writes outputs, logs to MLflow and
saves the model. Several local GPUs without TF_CONFIG use MirroredStrategy and
Keras's `fit`. Under mixed_float16 both use `pipeline.optimizer`'s loss-scale
optimizer, which makes every replica skip a step that overflowed on any.

Keras 3's `fit` does not run under MultiWorkerMirroredStrategy
(keras-team/keras#20585, open; reproduced here with Keras 3.15 / TF 2.21: a
ValueError on PerReplica values in fit's first step), so multi-worker
training uses the explicit loop below: `strategy.run` of one step per batch,
sums reduced across workers. A worker that dies makes the others' collectives
fail after COLLECTIVE_TIMEOUT_S instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline.errors import PipelineError

COLLECTIVE_TIMEOUT_S = 120  # a step waiting longer than this on a peer fails the run
# Seconds the workers in TF_CONFIG have to start (by hand, machine after machine) before a
# waiting one stops. TensorFlow alone keeps waiting (an hour, by its source), deaf to
# SIGINT and SIGTERM (seen).
WORKER_WAIT_S = 600


@dataclass(frozen=True)
class Cluster:
    """Where this process stands among the training workers."""

    workers: int = 1
    index: int = 0  # this worker's position, 0 .. workers - 1
    chief: bool = True  # the one process that writes outputs and talks to MLflow
    address: str = field(default="", compare=False)  # "host:port", this worker's in TF_CONFIG

    @classmethod
    def from_environment(cls) -> Cluster:
        """From TF_CONFIG: {"cluster": {"worker": ["host:port", ...]}, "task": {...}}."""
        raw = os.environ.get("TF_CONFIG")
        if not raw:
            return cls()
        try:
            config = json.loads(raw)
            cluster, task = config["cluster"], config["task"]
            chiefs, workers = cluster.get("chief", []), cluster.get("worker", [])
            kind, index = task["type"], int(task["index"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise PipelineError(
                f"TF_CONFIG is not a cluster description ({error}); expected e.g. "
                '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                '"task": {"type": "worker", "index": 0}}'
            ) from None
        for job, hosts in cluster.items():
            # An evaluator is TensorFlow's side job, outside the training (not counted); ps
            # is parameter-server training's, which this (multi-worker mirrored) is not.
            if job not in ("chief", "worker", "evaluator"):
                raise PipelineError(
                    f"TF_CONFIG's cluster lists a {job!r} job; this training (multi-worker "
                    "mirrored) takes only chief and worker: list every machine under worker"
                )
            if not (isinstance(hosts, list) and all(isinstance(h, str) for h in hosts)):
                raise PipelineError(
                    f'TF_CONFIG\'s cluster.{job} must be a list of "host:port" strings, got '
                    f"{json.dumps(hosts)}"
                )
        if len(chiefs) > 1:
            raise PipelineError(
                f"TF_CONFIG's cluster lists {len(chiefs)} chiefs; there is at most one: list "
                "the others under worker"
            )
        if kind not in ("chief", "worker"):
            raise PipelineError(f"TF_CONFIG task type must be chief or worker, got {kind!r}")
        listed = len(chiefs if kind == "chief" else workers)
        if kind == "chief" and not chiefs:
            raise PipelineError(
                "TF_CONFIG's task is a chief but its cluster lists no chief: give this task "
                'type "worker" (worker 0 is then the chief), or list it under cluster.chief'
            )
        if not 0 <= index < listed:
            raise PipelineError(
                f"TF_CONFIG task index {index} is not one of the {listed} {kind}s listed in "
                f"its cluster (0 to {listed - 1})"
            )
        position = index + (len(chiefs) if kind == "worker" else 0)
        chief = kind == "chief" or (not chiefs and index == 0)
        address = (chiefs if kind == "chief" else workers)[index]
        return cls(len(chiefs) + len(workers), position, chief, address)


def make_strategy(gpus: int, cluster: Cluster):
    """The tf.distribute strategy; create it before any other TensorFlow op runs."""
    import tensorflow as tf

    if cluster.workers > 1:
        # TensorFlow waits for every worker without end, and says so only in a log line
        # TF_CPP_MIN_LOG_LEVEL hides: a worker that was never started would look like a hang.
        print(
            f"train: worker {cluster.index} of {cluster.workers}: waiting for every worker "
            "in TF_CONFIG to start (each runs `python -m pipeline.train` with its own task "
            f"index), at most {WORKER_WAIT_S // 60} minutes",
            flush=True,
        )
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=COLLECTIVE_TIMEOUT_S
        )
        wait = f"{WORKER_WAIT_S // 60} minutes" if WORKER_WAIT_S >= 120 else f"{WORKER_WAIT_S} s"
        stopped = (
            f"error: worker {cluster.index} of {cluster.workers}: not every worker in TF_CONFIG "
            f"started within {wait}; start each with `python -m "
            "pipeline.train` and its own task index (one that failed says why in its own "
            "output), then start this one again"
        )
        with deadline(WORKER_WAIT_S, stopped):
            try:
                return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
            except tf.errors.UnknownError as error:
                if "Could not start gRPC server" not in str(error):
                    raise
                # Seen when a worker is restarted before the one it replaces, or its
                # peers, let go of the port: they stop within COLLECTIVE_TIMEOUT_S.
                raise PipelineError(
                    f"worker {cluster.index} of {cluster.workers}: cannot listen on "
                    f"{cluster.address or 'its address'} (its entry in TF_CONFIG): the port is "
                    f"taken, by a worker of an earlier start still stopping (within "
                    f"{COLLECTIVE_TIMEOUT_S} s of a peer's end) or by another program; wait "
                    "and start it again, or give it a free port in every worker's TF_CONFIG"
                ) from None
    if gpus > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


# Run by `deadline` in a process of its own: pid, seconds, message. It acts only while
# the process it watches is its parent: one killed from outside leaves it to init, and its
# pid may be another process's by the time the wait is over.
_WATCHDOG = """
import os, signal, sys, time
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]

def stop(reason):
    if os.getppid() == pid:
        print(reason, file=sys.stderr, flush=True)
        os.kill(pid, signal.SIGKILL)
    os._exit(0)

# Ctrl-C (or a SIGTERM) reaches the whole process group: the waiting process ignores it,
# so the watchdog, which would otherwise die of it, ends the wait at once.
for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, lambda *_: stop("interrupted while waiting for the other workers"))
time.sleep(seconds)
stop(message)
"""


@contextlib.contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """Kill this process, printing `message`, if the block is still running after `seconds`.

    A watchdog process, not a thread or an alarm: while TensorFlow waits for the other
    workers it holds the GIL and ignores SIGTERM and SIGINT (seen: a timer thread never
    ran, `timeout` could not stop it), so only SIGKILL from outside ends the wait.
    """
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()


@contextlib.contextmanager
def peers_reachable() -> Iterator[None]:
    """Turn a collective's failure (a peer died or hangs) into one clear error."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError, tf.errors.InternalError) as error:  # fmt: skip
        first = str(error).splitlines()[0] if str(error) else ""
        # TensorFlow sizes a collective group by each worker's own devices: one worker
        # with another GPU count, or none, makes the first all-reduce malformed, before
        # check_same_start can compare anything (tensorflow/tensorflow#47203, #60847).
        if re.search(r"has group_size \d+ .* but that group has size|incompatible device", first):
            raise PipelineError(
                f"the workers have different numbers or kinds of devices ({type(error).__name__}: "
                f"{first[:300]}); give every worker the same GPUs (CUDA_VISIBLE_DEVICES), or "
                "none, and start them all again"
            ) from None
        # An InternalError is a peer's collective aborting, or this worker's own kernel or
        # XLA fault, which a restart repeats: its whole first line, and both readings.
        own = isinstance(error, tf.errors.InternalError)
        raise PipelineError(
            "a training worker stopped or became unreachable"
            + (", or this one failed" if own else "")
            + f" ({type(error).__name__}: {first[: 400 if own else 160]}); restart all "
            "workers with `python -m pipeline.train`: training resumes from the last "
            "completed epoch if .train-state/ is on storage all workers share (only the "
            "chief writes it); otherwise delete the chief's to start over"
            + ("; if every other worker still runs, the error is this one's own" if own else "")
        ) from None


def check_same_start(strategy, epochs_done: int, fingerprint: str) -> None:
    """All workers must train the same thing from the same epoch: the same recovery-state
    fingerprint (params, data, training code, precision, worker count) and epochs done.

    Run before the model is built: building it broadcasts the chief's initial values to
    the others, with no timeout, and workers building different models or optimizers
    (another params.yaml, `auto` resolving to another precision on another GPU) would wait
    there for ever; other learning rates or augmentation would train on without a word.
    One all-reduce of each value, its square and a count: all equal exactly when
    count * sum of squares == sum squared. The fingerprint's first 4 bytes go as numbers
    below 256, so float32 sums stay exact for any number of workers TensorFlow takes.
    """
    import tensorflow as tf

    ours = [float(epochs_done)] + [float(int(fingerprint[i : i + 2], 16)) for i in range(0, 8, 2)]

    def values():
        value = tf.constant(ours)
        return tf.concat([value, value * value, [1.0]], axis=0)

    sums = strategy.reduce("SUM", strategy.run(values), axis=None).numpy()
    n = len(ours)
    totals, squares, count = sums[:n], sums[n : 2 * n], sums[-1]
    differ = squares * count != totals * totals
    if differ[1:].any():
        raise PipelineError(
            "the workers would train different things: params.yaml (model, train, data), "
            "data/prepared, the training code or the precision differ between them (train."
            "precision auto picks by GPU kind); make them the same on every worker"
        )
    if differ[0]:
        raise PipelineError(
            "the workers found different recovery states in .train-state; keep it on "
            "storage all workers share, or delete it on every worker to start over"
        )


def agree_on_overflow(gradients: list) -> list:
    """In a replica context: every replica's gradients non-finite if any replica's are.

    Keras's LossScaleOptimizer (mixed_float16) looks for inf and NaN in each
    replica's own gradients, before they are summed across replicas (see
    `pipeline.optimizer.AgreedLossScaleOptimizer`, which calls this). Dynamic loss
    scaling overflows now and then by design (it doubles the scale until it does),
    so with this every replica skips the step and halves its scale together. One
    all-reduce of one number per step.
    """
    import tensorflow as tf

    given = [g for g in gradients if g is not None]
    if any(isinstance(g, tf.IndexedSlices) for g in given):  # sparse: not from this network
        given = [tf.convert_to_tensor(g) for g in given]
        gradients = [None if g is None else tf.convert_to_tensor(g) for g in gradients]
    bad = tf.constant(0.0)  # the same all-reduce on every replica, even with no gradients
    for g in given:
        bad += tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32))
    bad = tf.distribute.get_replica_context().all_reduce("SUM", bad)
    poison = tf.where(bad > 0, float("nan"), 0.0)  # g + NaN is NaN; g + 0 is g
    return [None if g is None else g + tf.cast(poison, g.dtype) for g in gradients]


def fit_workers(
    model, strategy, train, val, cfg, steps: int, first_epoch: int, end_epoch, progress=None
):
    """Train epochs first_epoch .. cfg.epochs - 1 across the workers.

    `end_epoch(epoch, logs, train_s, total_s)` is called on every worker after
    each epoch with the global loss and accuracy (and validation figures).
    `progress` (a pipeline.progress.StepProgress) gives the lines printed within an epoch.
    """
    import tensorflow as tf

    from pipeline.data import make_dataset
    from pipeline.model import crossentropy

    batch = cfg.batch_size
    optimizer = model.optimizer  # under mixed_float16 it agrees on overflows across workers

    def shard(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return make_dataset(
            train, context.get_per_replica_batch_size(batch), training=True,
            augment=cfg.augment, seed=cfg.seed, first_epoch=first_epoch, epochs=cfg.epochs,
            shard=(context.num_input_pipelines, context.input_pipeline_id),
            replicas=context.num_replicas_in_sync,
        )  # fmt: skip

    batches = iter(strategy.distribute_datasets_from_function(shard))

    @tf.function
    def train_step(iterator):
        def step(images, labels):
            with tf.GradientTape() as tape:
                probabilities = model(images, training=True)
                losses = crossentropy(labels, probabilities, cfg.label_smoothing)
                loss = tf.nn.compute_average_loss(losses, global_batch_size=batch)
                scaled = optimizer.scale_loss(loss)  # loss scaling under mixed_float16
            gradients = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            predicted = tf.argmax(probabilities, axis=1, output_type=labels.dtype)
            right = tf.reduce_sum(tf.cast(predicted == labels, tf.float32))
            return tf.stack([tf.reduce_sum(tf.cast(losses, tf.float32)), right])

        return strategy.reduce("SUM", strategy.run(step, args=next(iterator)), axis=None)

    validation = make_dataset(val, batch) if len(val.labels) else None

    @tf.function
    def validation_step(images, labels):
        probabilities = model(images, training=False)
        losses = crossentropy(labels, probabilities, cfg.label_smoothing)
        predicted = tf.argmax(probabilities, axis=1, output_type=labels.dtype)
        right = tf.reduce_sum(tf.cast(predicted == labels, tf.float32))
        return tf.stack([tf.reduce_sum(tf.cast(losses, tf.float32)), right])

    for epoch in range(first_epoch, cfg.epochs):
        started = time.perf_counter()
        if progress is not None:
            progress.start(epoch)
        totals = 0
        with peers_reachable():
            for done in range(1, steps + 1):
                totals = totals + train_step(batches).numpy()
                if progress is None:
                    continue
                seen = done * batch  # images so far this epoch, all workers together
                logs = {"loss": totals[0] / seen, "accuracy": totals[1] / seen}
                if line := progress.step_done(done, logs):
                    print(line, flush=True)
        train_s = time.perf_counter() - started
        logs = {"loss": totals[0] / (steps * batch), "accuracy": totals[1] / (steps * batch)}
        if validation is not None:
            # Each worker scores the whole validation split with the same weights: no
            # collectives, so a slow validation never holds a peer's step.
            sums = sum(validation_step(x, y).numpy() for x, y in validation)
            logs.update(val_loss=sums[0] / len(val.labels), val_accuracy=sums[1] / len(val.labels))
        end_epoch(epoch, logs, train_s, time.perf_counter() - started)
