"""The train stage as users run it: MLflow run, resume after SIGKILL, determinism, errors."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import keras
import mlflow
import numpy as np
import psutil
import pytest
import yaml

from pipeline import evaluation_log, run_log
from pipeline.config import ParamsError, flatten, parse_params
from pipeline.distributed import peers_reachable
from pipeline.errors import PipelineError, Terminated
from pipeline.optimizer import make_optimizer, make_schedule
from pipeline.progress import HISTORY_COLUMNS, StepProgress, epoch_line
from pipeline.recovery_key import TRAINING_SECTIONS, resume_basis, resume_key, training_params
from pipeline.train import check_fits, logged_params
from tests.cifar_archive import write_archive
from tests.repo import (
    ROOT,
    Background,
    dvc,
    free_port,
    free_ports,
    make_repo,
    run,
    set_params,
    stage_env,
)
from tests.repo import TINY as BASE

TINY = {**BASE, "train.batch_size": 64, "data.val_size": 200}
# The optimizer and loss of the README's fast recipe (its epochs and augmentation aside).
RECIPE = {
    "train.optimizer": "sgd", "train.learning_rate": 0.1, "train.lr_schedule": "onecycle",
    "train.warmup": 0.15, "train.weight_decay": 0.005, "train.label_smoothing": 0.2,
}  # fmt: skip


# --- pure parts --------------------------------------------------------------------------------


def test_schedules_follow_their_shape(raw_params):
    params = parse_params(raw_params).train
    assert make_schedule(params, 100) == 0.001
    cosine = make_schedule(params.__class__(**{**params.__dict__, "lr_schedule": "cosine"}), 100)
    assert float(cosine(0)) == pytest.approx(0.001)
    assert float(cosine(50)) == pytest.approx(0.0005, rel=1e-3)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-9)
    onecycle = make_schedule(
        params.__class__(**{**params.__dict__, "lr_schedule": "onecycle"}), 100
    )
    assert float(onecycle(0)) == pytest.approx(0.001 / 25)
    assert float(onecycle(30)) == pytest.approx(0.001)  # peak after 30% warm-up
    assert float(onecycle(100)) == pytest.approx(1e-6, rel=1e-3)
    short = make_schedule(
        params.__class__(**{**params.__dict__, "lr_schedule": "onecycle", "warmup": 0.1}), 100
    )
    assert float(short(5)) == pytest.approx(0.001 / 25 + 0.5 * (0.001 - 0.001 / 25))
    assert float(short(10)) == pytest.approx(0.001)  # peak after 10% warm-up
    assert float(short(55)) == pytest.approx(0.0005, rel=1e-2)  # half-way down the cosine
    none = make_schedule(
        params.__class__(**{**params.__dict__, "lr_schedule": "onecycle", "warmup": 0.0}), 100
    )
    assert float(none(0)) == pytest.approx(0.001)  # no warm-up: starts at the peak
    assert float(none(100)) == pytest.approx(1e-6, rel=1e-3)


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_the_logged_rate_is_the_one_the_last_step_took(raw_params, precision):
    """Not Keras's `learning_rate`, the next step's: after a cosine's last step that is 0,
    and a onecycle's peak would show one epoch early."""
    from pipeline.optimizer import last_step_rate

    params = dataclasses.replace(parse_params(raw_params).train, lr_schedule="cosine")
    optimizer = make_optimizer(params, 100, precision)
    schedule = make_schedule(params, 100)
    weight = keras.Variable(np.ones(3, np.float32))
    for _ in range(100):  # the whole schedule, as fit would take it
        optimizer.apply_gradients([(np.full(3, 0.1, np.float32), weight)])
    assert int(optimizer.iterations) == 100
    assert float(np.asarray(optimizer.learning_rate)) == pytest.approx(0.0, abs=1e-12)
    assert last_step_rate(optimizer) == pytest.approx(float(schedule(99)), rel=1e-6)
    assert last_step_rate(optimizer) > 1e-8
    constant = make_optimizer(
        params.__class__(**{**params.__dict__, "lr_schedule": "constant"}), 100
    )
    assert last_step_rate(constant) == pytest.approx(0.001)


@pytest.mark.parametrize("lr_schedule", ["cosine", "constant"])
def test_the_logged_rate_is_read_under_tf_distribute_too(raw_params, lr_schedule):
    """Its variables are then MirroredVariables, which int() and float() refuse: the
    two-worker training failed at its first epoch's end."""
    import tensorflow as tf

    from pipeline.optimizer import last_step_rate

    params = dataclasses.replace(parse_params(raw_params).train, lr_schedule=lr_schedule)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        optimizer = make_optimizer(params, 100)
        weight = keras.Variable(np.ones(3, np.float32))
        optimizer.build([weight])
    assert "Mirrored" in type(optimizer.iterations.value).__name__  # what fit_workers has
    strategy.run(lambda: optimizer.apply_gradients([(tf.fill([3], 0.1), weight)]))
    expected = float(make_schedule(params, 100)(0)) if lr_schedule == "cosine" else 0.001
    assert last_step_rate(optimizer) == pytest.approx(expected, rel=1e-6)


def test_optimizers_and_decoupled_weight_decay(raw_params):
    params = parse_params(raw_params).train
    adam = make_optimizer(params, 100)
    assert isinstance(adam, keras.optimizers.Adam) and adam.weight_decay is None
    sgd = make_optimizer(
        dataclasses.replace(params, optimizer="sgd", learning_rate=0.1, weight_decay=0.01), 100
    )
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.momentum == 0.9
    # Decoupled decay: with a zero gradient a weight still shrinks by lr * weight_decay.
    weight = keras.Variable(np.ones(3, np.float32))
    sgd.apply_gradients([(np.zeros(3, np.float32), weight)])
    np.testing.assert_allclose(weight.numpy(), 1 - 0.1 * 0.01, rtol=1e-6)


TINY_META = {"class_names": ["a", "b"], "image_size": 8, "mean": [0.0] * 3, "std": [1.0] * 3}


def tiny_sgd(raw_params: dict, **train):
    """The real params with a one-unit, 8-filter network, SGD at 0.1 and `train` overrides;
    the float32 CPU device to compile it for."""
    from pipeline.device import Device

    params = parse_params(raw_params)
    params = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, stem_filters=8, filters=(8,), units_per_stage=1),
        train=dataclasses.replace(params.train, optimizer="sgd", learning_rate=0.1, **train),
    )
    return params, Device("CPU", 1, "float32", jit_compile=False)


def test_compiled_model_uses_the_params_optimizer_and_loss(raw_params):
    from pipeline.resume import TrainState
    from pipeline.train import compiled_model

    params, device = tiny_sgd(raw_params, weight_decay=0.005, label_smoothing=0.1)
    model = compiled_model(params, TINY_META, TrainState(fingerprint="-"), None, 10, device)
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert model.optimizer.weight_decay == 0.005
    assert model.loss.label_smoothing == 0.1


def test_weight_decay_scope_kernels_spares_norms_and_biases_after_a_restore_too(
    raw_params, tmp_path
):
    """Keras does not save which weights its optimizer leaves undecayed: a resumed training
    would decay BatchNorm's gammas and betas and the biases again without decay_only."""
    from pipeline.optimizer import decay_only
    from pipeline.resume import StateStore, TrainState
    from pipeline.train import compiled_model

    params, device = tiny_sgd(raw_params, weight_decay=0.1, weight_decay_scope="kernels")
    model = compiled_model(params, TINY_META, TrainState(fingerprint="-"), None, 10, device)

    def shrunk_by_one_step(model) -> dict[str, bool]:
        """{variable name: whether a step with zero gradients shrank it} (decay alone)."""
        variables = model.trainable_variables
        for variable in variables:  # ones, so that a decay shows wherever it applies
            variable.assign(np.ones(variable.shape, np.float32))
        model.optimizer.apply_gradients([(np.zeros(v.shape, np.float32), v) for v in variables])
        shrunk: dict[str, set[bool]] = {}
        for variable in variables:
            values = variable.numpy()
            if not np.allclose(values, 1.0):
                np.testing.assert_allclose(values, 1 - 0.1 * 0.1, rtol=1e-6)  # lr * decay
            shrunk.setdefault(variable.name, set()).add(not np.allclose(values, 1.0))
        assert all(len(answers) == 1 for answers in shrunk.values()), shrunk  # every layer's
        return {name: answers.pop() for name, answers in shrunk.items()}

    spared = {"gamma": False, "beta": False, "bias": False, "kernel": True}
    assert shrunk_by_one_step(model) == spared
    store, state = StateStore(tmp_path / "state"), TrainState(fingerprint="-", epochs_done=1)
    store.save(state, model)
    loaded = keras.models.load_model(store.checkpoint_path(state))
    assert shrunk_by_one_step(loaded) == dict.fromkeys(spared, True)  # forgotten: all decay
    resumed = compiled_model(params, TINY_META, state, store, 10, device)  # as resumed
    assert shrunk_by_one_step(resumed) == spared
    decay_only(resumed.optimizer, "all")
    assert shrunk_by_one_step(resumed) == dict.fromkeys(spared, True)
    # A layer whose name holds one of the words keeps its kernel decayed.
    biased = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="unbiased_beta")])
    biased.compile(optimizer=make_optimizer(params.train, 10), loss="mse")
    assert shrunk_by_one_step(biased) == {"kernel": True, "bias": False}


def test_mixed_float16_checkpoints_keep_the_overflow_agreeing_loss_scaling(raw_params, tmp_path):
    """Under mixed_float16 the optimizer is ours, not the one Keras's compile would wrap, and
    a recovery checkpoint restores it as such, with its loss scale."""
    from pipeline.optimizer import AgreedLossScaleOptimizer

    params = dataclasses.replace(parse_params(raw_params).train, optimizer="sgd")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([
            keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2, dtype="float32"),
        ])  # fmt: skip
        model.compile(optimizer=make_optimizer(params, 100, "mixed_float16"), loss="mse")
        assert isinstance(model.optimizer, AgreedLossScaleOptimizer)
        assert isinstance(model.optimizer.inner_optimizer, keras.optimizers.SGD)
        model.fit(np.ones((8, 3)) * 1e5, np.zeros((8, 2)), batch_size=8, verbose=0)  # overflows
        model.save(tmp_path / "checkpoint.keras")
        restored = keras.models.load_model(tmp_path / "checkpoint.keras").optimizer
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(restored, AgreedLossScaleOptimizer)
    assert float(restored.dynamic_scale) == 16384.0  # 32768 halved by the overflow
    assert isinstance(make_optimizer(params, 100, "mixed_bfloat16"), keras.optimizers.SGD)


def test_a_checkpoint_with_keras_own_loss_scaling_resumes_with_the_agreeing_one(
    raw_params, tmp_path
):
    """Recovery checkpoints written before AgreedLossScaleOptimizer hold Keras's own: resumed,
    it is replaced by ours, with the loss scale, the step count and the momentum it had."""
    from pipeline.device import Device
    from pipeline.optimizer import AgreedLossScaleOptimizer
    from pipeline.resume import StateStore, TrainState
    from pipeline.train import build_network, compiled_model

    params = parse_params(raw_params)
    params = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, stem_filters=4, filters=(4,), units_per_stage=1),
        train=dataclasses.replace(params.train, optimizer="sgd", learning_rate=0.01),
    )  # fmt: skip
    # Pixels divided by a std of 0.001: 255 becomes 255,000, past float16's 65,504.
    meta = {"class_names": ["a", "b"], "image_size": 8, "mean": [0.0] * 3, "std": [1e-3] * 3}
    store = StateStore(tmp_path / "state")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = build_network(params, meta)
        plain = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01, momentum=0.9))
        model.compile(optimizer=plain, loss="sparse_categorical_crossentropy")
        images = np.zeros((16, 8, 8, 3), np.uint8)
        images[:8] = 255  # the first of two steps overflows: the scale halves, then one
        model.fit(images, np.zeros(16), batch_size=8, shuffle=False, verbose=0)  # finite step
        assert (float(plain.dynamic_scale), int(plain.step_counter)) == (16384.0, 1)
        state = TrainState(fingerprint="-", epochs_done=1)
        store.save(state, model)
        device = Device("CPU", 1, "mixed_float16", jit_compile=False)
        resumed = compiled_model(params, meta, state, store, 2, device)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    optimizer = resumed.optimizer
    assert isinstance(optimizer, AgreedLossScaleOptimizer)
    assert (float(optimizer.dynamic_scale), int(optimizer.step_counter)) == (16384.0, 1)
    assert int(optimizer.iterations) == 1  # the overflowed step was skipped
    assert any(m.numpy().any() for m in optimizer.inner_optimizer.momentums)  # the finite step's


def test_a_full_disk_at_a_checkpoint_keeps_the_last_whole_epoch(tmp_path, monkeypatch):
    from pipeline.resume import StateStore, TrainState

    class Model:  # what Keras's save does on a full disk: part of the file, then OSError
        variables = ()

        def save(self, path):
            Path(path).write_bytes(b"PK half a zip")
            raise OSError(28, "No space left on device")

    store = StateStore(tmp_path / "state")
    state = TrainState(fingerprint="f", epochs_done=3, checkpoint="epoch-00003.keras")
    store.record(state)
    (tmp_path / "state/epoch-00003.keras").write_bytes(b"epoch 3")
    before = (tmp_path / "state/state.json").read_text()
    state.epochs_done = 4
    with pytest.raises(PipelineError) as error:
        store.save(state, Model())
    assert str(error.value) == (
        f"cannot save the recovery state of epoch 4 in {tmp_path / 'state'} (No space "
        "left on device); free disk space and run again: the training resumes after epoch 3"
    )
    assert (tmp_path / "state/state.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "epoch-00003.keras", "state.json"
    ]  # fmt: skip
    assert store.load("f").epochs_done == 3

    # The new state.json in place, only the folder's fsync failing (EIO, a network disk):
    # its checkpoint is the one to keep.
    class Saved:
        variables = ()

        def save(self, path):
            Path(path).write_bytes(b"epoch 4")

    from pipeline import files

    real_fsync, calls = files.fsync, []

    def fsync_folder_fails(path):
        calls.append(path)
        if Path(path).is_dir():
            raise OSError(5, "Input/output error")
        real_fsync(path)

    state = store.load("f")
    state.epochs_done = 4
    monkeypatch.setattr(files, "fsync", fsync_folder_fails)
    with pytest.raises(
        PipelineError, match=r"Input/output error\); fix that and run again: .* after epoch 4$"
    ):
        store.save(state, Saved())
    monkeypatch.undo()
    assert store.load("f").epochs_done == 4
    assert (tmp_path / "state/epoch-00004.keras").read_bytes() == b"epoch 4"


def test_training_params_are_the_sections_the_train_stage_declares(raw_params):
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    assert tuple(stage["params"]) == TRAINING_SECTIONS == ("model", "train")
    assert "data/prepared" in stage["deps"]  # data.* reach training only through it
    params = parse_params(raw_params)
    keys = training_params(params)
    assert {key.split(".")[0] for key in keys} == set(TRAINING_SECTIONS)
    assert keys["train.augment.cutout"] == 0 and "evaluate.batch_size" not in keys
    # The MLflow run also logs the data params its data/prepared came from.
    logged = logged_params(params)
    assert logged.keys() - keys == {k for k in flatten(params) if k.startswith("data.")}


def test_resume_key_follows_the_training_params_and_the_data_by_content(raw_params):
    from pipeline.prepared import Split
    from pipeline.resume import changes

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    train = Split(images[:16], rng.integers(0, 10, 16).astype(np.int32))
    val = Split(images[16:], np.arange(4, dtype=np.int32))
    meta = {"class_names": list("abcdefghij"), "sizes": {"train": 16, "val": 4}}

    def key(edits: dict | None = None, train: Split = train) -> str:
        raw = yaml.safe_load(yaml.safe_dump(raw_params))  # a deep copy
        for dotted, value in (edits or {}).items():
            section, name = dotted.split(".")
            raw[section][name] = value
        return resume_key(resume_basis(parse_params(raw), meta, train, val, "float32", 1))

    same = key()
    assert key() == same
    # A mirror of the same archive, or an evaluation setting, resumes the same training.
    assert key({"data.url": "file:///mirror/cifar.tar.gz", "data.md5": "0" * 32}) == same
    assert key({"evaluate.batch_size": 7}) == same
    # Other training params, or the same images relabelled (meta.json unchanged), do not.
    assert key({"train.learning_rate": 0.002}) != same
    # Settings that change nothing here: the precision auto resolved to (float32) named,
    # a warm-up without onecycle, SAM's first epoch without SAM, the weight decay's scope
    # without weight decay. With them on, they count.
    assert raw_params["train"]["lr_schedule"] == "constant" and not raw_params["train"]["sam_rho"]
    assert key({"train.precision": "float32", "train.warmup": 0.1}) == same
    assert key({"train.sam_from_epoch": 20}) == same
    assert not raw_params["train"]["weight_decay"]
    assert key({"train.weight_decay_scope": "kernels"}) == same
    decayed = key({"train.weight_decay": 0.005})
    assert key({"train.weight_decay": 0.005, "train.weight_decay_scope": "kernels"}) != decayed
    onecycle = key({"train.lr_schedule": "onecycle"})
    assert key({"train.lr_schedule": "onecycle", "train.warmup": 0.1}) != onecycle
    sam = key({"train.sam_rho": 0.05})
    assert key({"train.sam_rho": 0.05, "train.sam_from_epoch": 20}) != sam
    relabelled = Split(train.images, (train.labels + 1) % 10)
    assert key(train=relabelled) != same
    # Two GPUs' replicas each normalise half the batch: one GPU alone trains otherwise.
    two_gpus = resume_basis(parse_params(raw_params), meta, train, val, "float32", 1, 2)
    assert resume_key(two_gpus) != same
    assert "replicas 2 -> 1" in changes(two_gpus, resume_basis(
        parse_params(raw_params), meta, train, val, "float32", 1
    ))  # fmt: skip


def test_a_multi_worker_state_is_resumed_by_every_worker_not_by_dvc_repro(raw_params):
    """A state records its workers: `dvc repro` on the chief alone sets it aside and trains
    from epoch 1, so after a multi-worker training the hint names every worker."""
    from pipeline.prepared import Split
    from pipeline.resume import changes
    from pipeline.train import rerun

    params, meta = parse_params(raw_params), {"class_names": list("ab"), "sizes": {"train": 2}}
    train = val = Split(np.zeros((2, 8, 8, 3), np.uint8), np.arange(2, dtype=np.int32))
    workers = [resume_basis(params, meta, train, val, "float32", n, n) for n in (2, 1)]
    assert "workers 2 -> 1" in changes(*workers)
    assert rerun(1) == "`dvc repro`"
    assert rerun(2) == "`python -m pipeline.train` run again on every worker (the same TF_CONFIG)"


def test_a_failed_collective_becomes_one_clear_error():
    import tensorflow as tf

    with pytest.raises(PipelineError) as error, peers_reachable():
        raise tf.errors.UnavailableError(None, None, "task 1 stopped sending heartbeats\nmore")
    assert str(error.value).startswith(
        "a training worker stopped or became unreachable (UnavailableError: task 1 stopped "
        "sending heartbeats); restart all workers with `python -m pipeline.train`: training "
        "resumes from the last completed epoch if .train-state/ is on storage all workers "
        "share (only the chief writes it); otherwise delete the chief's to start over"
    )
    # This worker's own fault (a kernel, XLA) comes as an InternalError too: not only blamed
    # on the peers, and its first line whole.
    reason = "Failed to compile the kernel " + "x" * 300
    with pytest.raises(PipelineError) as error, peers_reachable():
        raise tf.errors.InternalError(None, None, reason)
    message = str(error.value)
    assert message.startswith("a training worker stopped or became unreachable, or this one failed")
    assert reason in message and message.endswith("the error is this one's own")
    # Another GPU count on one worker: TensorFlow's words (#47203), not a dead peer.
    reason = "Collective Op has group_size 8 and group_key 1 but that group has size 4"
    with pytest.raises(PipelineError) as error, peers_reachable():
        raise tf.errors.InternalError(None, None, reason + "\nEncountered when executing")
    assert str(error.value) == (
        f"the workers have different numbers or kinds of devices (InternalError: {reason}); "
        "give every worker the same GPUs (CUDA_VISIBLE_DEVICES), or none, and start them all again"
    )
    reason = "Device /job:worker/replica:0/task:1/device:GPU:0 is joining a group with "
    with pytest.raises(PipelineError) as error, peers_reachable():
        raise tf.errors.InternalError(None, None, reason + "incompatible device typeCPU (g=3)")
    assert str(error.value).startswith("the workers have different numbers or kinds of devices")


def test_batch_larger_than_training_set_is_a_params_error(raw_params):
    from pipeline.prepared import Split

    params = parse_params(raw_params).train
    tiny = Split(np.zeros((100, 32, 32, 3), np.uint8), np.zeros(100, np.int32))
    with pytest.raises(
        ParamsError, match=r"^train.batch_size: must be at most the 100 training images, got 128"
    ):
        check_fits(params, tiny)


def test_epoch_line_is_one_readable_line():
    row = {
        "epoch": 3, "loss": 1.23456, "accuracy": 0.5, "val_loss": 1.5, "val_accuracy": 0.45,
        "learning_rate": 0.001, "images_per_second": 812.4,
    }  # fmt: skip
    line = epoch_line(row, 50, eta_s=2530)
    assert line == (
        "train: epoch 3/50  loss 1.2346  acc 0.5000  val_loss 1.5000  val_acc 0.4500  "
        "lr 1.00e-03  812 img/s  ETA 42m10s"
    )


def test_progress_lines_come_every_interval_within_an_epoch_and_not_at_its_end():
    now = [100.0]
    progress = StepProgress(epochs=50, steps=390, batch_size=128, every_s=120, clock=lambda: now[0])
    progress.start(2)  # the third epoch
    lines = []
    for done in range(1, 391):
        now[0] += 2.5  # seconds per step: 51 img/s
        lines.append(progress.step_done(done, {"loss": 1.23456, "accuracy": 0.5}))
    shown = [(done, line) for done, line in enumerate(lines, 1) if line]
    assert [done for done, _ in shown] == [48, 96, 144, 192, 240, 288, 336, 384]
    assert shown[0][1] == (
        "train: epoch 3/50  step 48/390  loss 1.2346  acc 0.5000  51 img/s  epoch ends in 14m15s"
    )
    progress.start(3)  # a new epoch starts its own interval, with or without logs
    now[0] += 119
    assert progress.step_done(1, {}) is None
    now[0] += 2
    assert progress.step_done(2, {}) == (
        "train: epoch 4/50  step 2/390  2 img/s  epoch ends in 6h31m"
    )
    # Keras's thread pool may run step 4's callback before step 3's: no line goes back.
    now[0] += 200
    assert progress.step_done(4, {}).startswith("train: epoch 4/50  step 4/390")
    now[0] += 200
    assert progress.step_done(3, {}) is None
    assert progress.step_done(5, {}).startswith("train: epoch 4/50  step 5/390")


def test_both_training_loops_print_progress_within_the_epoch(raw_params, capsys):
    """Keras's fit (one worker) and the loop of several workers, here on the default strategy."""
    import tensorflow as tf

    from pipeline.device import Device
    from pipeline.distributed import fit_workers
    from pipeline.prepared import Split
    from pipeline.progress import keras_callbacks
    from pipeline.resume import TrainState
    from pipeline.train import compiled_model

    params = parse_params(raw_params)
    params = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, stem_filters=4, filters=(4,), units_per_stage=1),
        train=dataclasses.replace(params.train, batch_size=8, epochs=1),
    )  # fmt: skip
    meta = {"class_names": ["a", "b"], "image_size": 8, "mean": [0.0] * 3, "std": [1.0] * 3}
    rng = np.random.default_rng(0)
    train = Split(rng.integers(0, 256, (40, 8, 8, 3), np.uint8), rng.integers(0, 2, 40, np.int32))
    empty = Split(train.images[:0], train.labels[:0])
    device = Device("CPU", 1, "float32", jit_compile=False)
    model = compiled_model(params, meta, TrainState(fingerprint="-"), None, 5, device)
    ended = []

    class Recorder:  # the EpochRecorder's part the callbacks use
        def end_epoch(self, model, epoch, logs, train_s, total_s):
            ended.append(epoch)

    progress = StepProgress(epochs=1, steps=5, batch_size=8, every_s=0)
    callbacks = keras_callbacks(Recorder(), progress)
    model.fit(train.images, train.labels, batch_size=8, epochs=1, callbacks=callbacks, verbose=0)
    fit_workers(
        model, tf.distribute.get_strategy(), train, empty, params.train, 5, 0,
        lambda epoch, *_: ended.append(epoch), progress,
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert ended == [0, 0]
    assert [line.split("  ")[1] for line in lines] == [f"step {i}/5" for i in (1, 2, 3, 4)] * 2
    assert all(" loss " in line and " acc " in line for line in lines), lines


def test_recovery_state_is_kept_for_its_run_until_params_change(tmp_path, capsys):
    from pipeline.resume import StateStore, TrainState

    store = StateStore(tmp_path / "state")
    store.record(TrainState(fingerprint="abc", run_id="RUN1"))  # killed during epoch 1
    state = store.load("abc")
    assert (state.run_id, state.epochs_done, state.checkpoint) == ("RUN1", 0, None)
    assert capsys.readouterr().out == ""
    store.record(TrainState(fingerprint="abc", run_id="RUN1", epochs_done=3, checkpoint="e3.keras"))
    assert store.load("abc") is None  # its checkpoint is gone: nothing to resume from
    assert "(its checkpoint of epoch 3 is missing)" in capsys.readouterr().out
    assert not store.directory.exists()
    store.record(TrainState(fingerprint="abc", run_id="RUN1"))
    assert store.load("other") is None
    assert "(it belongs to other params or data)" in capsys.readouterr().out
    assert not store.directory.exists()


def test_a_discarded_recovery_state_says_what_changed(raw_params, tmp_path, capsys):
    """Twenty epochs of recovery state are thrown away when the training changes: the line
    names the change, a param, the precision `auto` resolved to here, or the data."""
    from pipeline.prepared import Split
    from pipeline.resume import StateStore, TrainState

    params, meta, train, val = tiny_training(raw_params)
    store = StateStore(tmp_path / "state")

    def discarded(old: dict, new: dict) -> str:
        store.record(TrainState(fingerprint=resume_key(old), run_id="RUN1", basis=old))
        assert store.load(resume_key(new), new) is None
        return capsys.readouterr().out

    basis = resume_basis(params, meta, train, val, "float32", 1)
    faster = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=30))
    out = discarded(basis, resume_basis(faster, meta, train, val, "mixed_bfloat16", 1))
    assert out == (
        f"train: discarding recovery state in {store.directory} (it belongs to other "
        "settings: train.epochs 1 -> 30; precision float32 -> mixed_bfloat16)\n"
    )
    relabelled = Split(train.images, 1 - train.labels)
    out = discarded(basis, resume_basis(params, meta, relabelled, val, "float32", 1))
    assert "(it belongs to other settings: data/prepared's images or labels)" in out
    # Tuples, as the params hold them, compare equal to the lists state.json stores.
    wider = dataclasses.replace(params, model=dataclasses.replace(params.model, filters=(4, 8)))
    out = discarded(
        basis, resume_basis(wider, {**meta, "mean": [1.0] * 3}, train, val, "float32", 2)
    )
    assert "settings: model.filters [4] -> [4, 8]; workers 1 -> 2; data/prepared's mean)" in out
    # The code that computes the training: an edited network (or pooling) is another model.
    edited = {**basis, "code": {**basis["code"], "pipeline/model.py": "0" * 16}}
    out = discarded(basis, edited)
    assert "(it belongs to other settings: the code of pipeline/model.py)" in out
    older = {k: v for k, v in basis.items() if k != "code"}  # written before code was kept
    assert "(it belongs to other settings: the code of an earlier version)" in discarded(
        older, basis
    )


def test_the_code_a_state_must_match_is_what_computes_the_training(monkeypatch):
    """The network and loss, input, optimizer, SAM and compiled model: an edit there discards
    a recovery state; a fix in logging, progress or loading code (today's crash at an
    epoch's end in last_step_rate, say) keeps its epochs."""
    import inspect

    from pipeline import distributed, model, optimizer, train
    from pipeline.recovery_key import TRAINING_CODE, code_digest

    digest = code_digest()
    assert sorted(digest) == sorted(TRAINING_CODE) == [
        "pipeline/data.py", "pipeline/distributed.py", "pipeline/model.py",
        "pipeline/optimizer.py", "pipeline/sam.py", "pipeline/train.py",
    ]  # fmt: skip
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    assert set(digest) <= set(stage["deps"])  # each edit reruns the stage, then decides
    assert code_digest() == digest  # the same code, the same digest

    real = inspect.getsource
    edited = {
        model.crossentropy, optimizer.make_schedule, train.compiled_model,
        distributed.fit_workers, train.fit_epochs, train.seed_everything,
    }  # fmt: skip
    untouched = {
        optimizer.last_step_rate, optimizer.agreeing, model.load_saved_model,
        StepProgress, train.restored_model, distributed.check_same_start,
    }  # fmt: skip

    def source_after(edit, change="edited = True\n"):
        def getsource(part):
            return real(part) + (change if part is edit else "")

        return getsource

    for part in edited | untouched:
        monkeypatch.setattr(inspect, "getsource", source_after(part))
        changed = {path for path, value in code_digest().items() if value != digest[path]}
        assert changed == ({f"pipeline/{part.__module__.split('.')[1]}.py"} if part in edited
                           else set()), part.__qualname__  # fmt: skip
    # run_training itself is outside the digest (its MLflow and recovery code may be fixed
    # under a running training): what it computes must not creep back into it.
    orchestration = real(train.run_training)
    for computing in ("make_dataset(", ".fit(", "set_random_seed", "determinism", "sharpness"):
        assert computing not in orchestration, computing
    monkeypatch.setattr(inspect, "getsource", source_after(__import__("pipeline.data").data))
    assert {p for p, v in code_digest().items() if v != digest[p]} == {"pipeline/data.py"}
    monkeypatch.setattr(inspect, "getsource", real)
    # A constant a function reads: decay_only's source is the same, what it spares is not.
    monkeypatch.setattr(optimizer, "NOT_KERNELS", ("gamma", "beta"))
    assert {p for p, v in code_digest().items() if v != digest[p]} == {"pipeline/optimizer.py"}
    monkeypatch.setattr(optimizer, "NOT_KERNELS", {"gamma", "beta"})  # order: the hash seed's
    with pytest.raises(TypeError, match="is not a plain constant to digest"):
        code_digest()
    monkeypatch.undo()

    # A comment or a docstring reworded (a `git pull` of a typo fix) keeps the state.
    monkeypatch.setattr(inspect, "getsource", source_after(train.compiled_model, "# edited\n"))
    assert code_digest() == digest
    documented = real(train.compiled_model).replace('"""The network', '"""The whole network')
    reworded = lambda part: documented if part is train.compiled_model else real(part)  # noqa: E731
    monkeypatch.setattr(inspect, "getsource", reworded)
    assert documented != real(train.compiled_model) and code_digest() == digest


def tiny_training(raw_params, epochs: int = 1):
    """A network, data and params small enough to train in-process in seconds."""
    from pipeline.prepared import Split

    params = parse_params(raw_params)
    params = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, stem_filters=4, filters=(4,), units_per_stage=1),
        train=dataclasses.replace(
            params.train, batch_size=8, epochs=epochs, precision="float32"
        ),
    )  # fmt: skip
    meta = {"class_names": ["a", "b"], "image_size": 8, "mean": [0.0] * 3, "std": [1.0] * 3}
    rng = np.random.default_rng(0)
    train = Split(rng.integers(0, 256, (40, 8, 8, 3), np.uint8), rng.integers(0, 2, 40, np.int32))
    return params, meta, train, Split(train.images[:0], train.labels[:0])


def fail_once(monkeypatch, owner, name: str, message: str, when=lambda *args: True):
    """Make owner.name raise MlflowException(message) the first time `when(*args)` holds."""
    from mlflow.exceptions import MlflowException

    original, failed = getattr(owner, name), []

    def patched(*args, **kwargs):
        if not failed and when(*args):
            failed.append(args)
            raise MlflowException(message)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)
    return failed


def test_store_failures_at_the_end_of_training_leave_one_model_and_a_finished_run(
    raw_params, mlflow_store, tmp_path, monkeypatch, capsys
):
    """Three tries at logging one training: the model upload fails; then the store is
    busy (retried) and fails as the run is marked finished; then all goes through. One
    training, one logged model, one value per final metric, a FINISHED run."""
    import mlflow.tracking.fluent as fluent

    from pipeline import tracking
    from pipeline.errors import end_mlflow_run
    from pipeline.train import run_training

    params, meta, train, empty = tiny_training(raw_params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # connect sets it
    experiment = tracking.connect(tmp_path)
    ready = lambda model_id, status: str(status) == "READY"  # noqa: E731
    Path("models").mkdir()
    Path("models/model_info.json").write_text('{"run_id": "an earlier training"}')

    with monkeypatch.context() as patch:
        fail_once(patch, fluent, "finalize_logged_model", "error code 503 != 200", ready)
        with pytest.raises(tracking.TrackingError) as error:
            run_training(params, meta, train, empty)
    # The new model is saved, the earlier training's info gone: evaluate cannot pair them.
    assert Path("models/model.keras").exists() and not Path("models/model_info.json").exists()
    assert str(error.value).startswith(
        "the training finished but could not be logged to MLflow (MlflowException: error code "
        "503 != 200); its recovery state is kept"
    )
    end_mlflow_run("FAILED")  # as the stage's error handler does
    with monkeypatch.context() as patch:
        busy = fail_once(patch, fluent, "finalize_logged_model", "database is locked", ready)
        fail_once(patch, mlflow.MlflowClient, "set_terminated", "error code 503 != 200")
        with pytest.raises(tracking.TrackingError) as error:
            run_training(params, meta, train, empty)
    assert busy, str(error.value)  # and retried
    assert str(error.value) == (
        "the training is logged to MLflow but its run could not be marked finished "
        "(MlflowException: error code 503 != 200); its recovery state is kept, so once the "
        "store answers `dvc repro` marks it without training or logging again"
    )
    end_mlflow_run("FAILED")
    first = json.loads(Path("models/model_info.json").read_text())
    run_training(params, meta, train, empty)
    out = capsys.readouterr().out
    assert out.count("train: epoch 1/1") == 1 and out.count("resuming after epoch 1") == 2
    assert json.loads(Path("models/model_info.json").read_text()) == first
    assert mlflow_store.get_run(first["run_id"]).info.status == "FINISHED"
    models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    assert [(m.model_id, str(m.status)) for m in models] == [
        (first["model_uri"].split("/")[-1], "READY")
    ]
    assert len(mlflow_store.get_metric_history(first["run_id"], "final_accuracy")) == 1
    assert not Path(".train-state").exists()


def test_outputs_it_cannot_write_after_training_are_one_line_and_the_rerun_trains_nothing(
    raw_params, mlflow_store, tmp_path, monkeypatch, capsys
):
    """A full disk or a metrics/ in the way once the epochs are done: the reason, the
    recovery state kept, and the rerun writes the outputs without training again."""
    from pipeline.errors import PipelineError, end_mlflow_run
    from pipeline.train import run_training

    params, meta, train, empty = tiny_training(raw_params)
    monkeypatch.chdir(tmp_path)
    Path("metrics").write_text("a file where the folder goes")
    with pytest.raises(PipelineError) as error:
        run_training(params, meta, train, empty)
    assert str(error.value).startswith(
        "the training finished but its outputs could not be written ([Errno 17] File exists"
    ), error.value
    assert str(error.value).endswith(
        "its recovery state is kept, so once that is fixed `dvc repro` writes them without "
        "training again"
    )
    assert Path(".train-state").is_dir() and Path("models/model.keras").exists()
    end_mlflow_run("FAILED")  # as the stage's error handler does
    Path("metrics").unlink()
    run_training(params, meta, train, empty)
    out = capsys.readouterr().out
    assert out.count("train: epoch 1/1") == 1 and "resuming after epoch 1" in out
    info = json.loads(Path("models/model_info.json").read_text())
    assert mlflow_store.get_run(info["run_id"]).info.status == "FINISHED"
    assert json.loads(Path("metrics/train.json").read_text())["epochs"] == 1
    assert not Path(".train-state").exists()


def test_a_store_error_as_the_run_starts_is_one_line_and_the_rerun_continues_the_run(
    raw_params, mlflow_store, tmp_path, monkeypatch, capsys
):
    from pipeline import tracking
    from pipeline.errors import end_mlflow_run
    from pipeline.train import run_training

    params, meta, train, empty = tiny_training(raw_params)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tracking.connect(tmp_path)
    with monkeypatch.context() as patch:  # the params' log_batch is refused
        fail_once(patch, mlflow.MlflowClient, "log_batch", "error code 403 != 200")
        with pytest.raises(tracking.TrackingError) as error:
            run_training(params, meta, train, empty)
    assert str(error.value) == (
        "cannot start or continue the MLflow run (MlflowException: error code 403 != 200); "
        "no epoch was trained by this attempt; rerun once the store answers"
    )
    assert not Path("models").exists()
    end_mlflow_run("FAILED")  # as the stage's error handler does
    state = json.loads(Path(".train-state/state.json").read_text())
    assert state["epochs_done"] == 0
    assert mlflow_store.get_run(state["run_id"]).info.status == "FAILED"
    run_training(params, meta, train, empty)  # the rerun continues that run
    assert json.loads(Path("models/model_info.json").read_text())["run_id"] == state["run_id"]
    assert mlflow_store.get_run(state["run_id"]).info.status == "FINISHED"
    assert f"starting again in MLflow run {state['run_id']}" in capsys.readouterr().out


def test_an_artifact_store_it_cannot_write_stops_the_training_before_its_first_epoch(
    raw_params, mlflow_store, tmp_path, monkeypatch
):
    """MLflow opens a run's artifact store at its first upload: one this machine cannot
    write (the folder of a teammate who created the experiment on a shared database) must
    stop the training before epoch 1, not when its model is logged after the last."""
    from pipeline import tracking
    from pipeline.errors import end_mlflow_run
    from pipeline.train import run_training

    params, meta, train, empty = tiny_training(raw_params)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    blocker = tmp_path / "a-file"  # a folder under a file: no user can create it, root neither
    blocker.write_text("")
    artifacts = (blocker / "mlartifacts").as_uri()
    mlflow_store.create_experiment(tracking.EXPERIMENT, artifact_location=artifacts)
    tracking.connect(tmp_path)
    with pytest.raises(tracking.TrackingError) as error:
        run_training(params, meta, train, empty)
    message = str(error.value)
    assert message.startswith(f"cannot store the run's artifacts at {artifacts}/"), message
    assert "Error: " in message and "no epoch was trained by this attempt" in message
    assert not Path("models").exists()
    end_mlflow_run("FAILED")  # as the stage's error handler does
    assert json.loads(Path(".train-state/state.json").read_text())["epochs_done"] == 0

    blocker.unlink()  # the store mended: the rerun trains, and the params file is there
    run_training(params, meta, train, empty)
    run_id = json.loads(Path("models/model_info.json").read_text())["run_id"]
    logged = mlflow_store.download_artifacts(run_id, "train/params.json")
    logged = json.loads(Path(logged).read_text())
    assert logged["train.batch_size"] == 8 and logged["train.precision_resolved"] == "float32"
    assert logged["model.filters"] == [4]


def test_a_run_resumed_outside_its_experiment_stops_naming_it(
    raw_params, mlflow_store, tmp_path, monkeypatch
):
    """`dvc exp run -n NAME` killed, then resumed by a plain `dvc repro`: the model lands in
    the workspace, so the run no longer names the experiment (MLflow's set_tags only adds)."""
    from pipeline import tracking
    from pipeline.device import Device
    from pipeline.resume import StateStore, TrainState
    from pipeline.train import start_run

    params, device = parse_params(raw_params), Device("CPU", 1, "float32", False)
    store, state = StateStore(tmp_path / "state"), TrainState(fingerprint="-")
    tracking.connect(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "lr-small")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    start_run(params, state, store, device)
    mlflow.end_run("KILLED")
    tags = mlflow_store.get_run(state.run_id).data.tags
    assert (tags["dvc.exp_name"], tags["dvc.baseline_rev"]) == ("lr-small", "a" * 40)
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    first = state.run_id
    start_run(params, state, store, device)
    mlflow.end_run()
    assert state.run_id == first
    assert not set(tracking.DVC_TAGS) & set(mlflow_store.get_run(first).data.tags)


def test_log_model_keeps_one_model_per_run_across_tries(
    raw_params, mlflow_store, monkeypatch, capsys
):
    """A try cut short leaves an unfinished model: the next deletes it, or, where the
    store refuses (a server's login without MANAGE), says so and logs anyway. A kill
    between log_model and recording its URI: the next try takes that model."""
    from mlflow.exceptions import MlflowException

    from pipeline.prepared import Split
    from pipeline.train import build_network

    params, meta, train, _ = tiny_training(raw_params)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    experiment = mlflow_store.create_experiment("e")
    model = build_network(params, meta)
    examples = Split(train.images[:4], train.labels[:4])

    def logged(run_id):
        where = f"source_run_id = '{run_id}'"
        found = mlflow.search_logged_models([experiment], where, output_format="list")
        return sorted((m.model_id, str(m.status)) for m in found)

    with mlflow.start_run(experiment_id=experiment) as run:
        leftover = mlflow.initialize_logged_model(name="model").model_id  # PENDING
        first = run_log.log_model(model, examples, meta["class_names"])
        assert run_log.log_model(model, examples, meta["class_names"]) == first
    assert logged(run.info.run_id) == [(first.split("/")[-1], "READY")]
    assert leftover not in first

    def refuse(self, model_id):
        raise MlflowException("Permission denied", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(mlflow.MlflowClient, "delete_logged_model", refuse)
    with mlflow.start_run(experiment_id=experiment) as run:
        leftover = mlflow.initialize_logged_model(name="model").model_id
        second = run_log.log_model(model, examples, meta["class_names"])
    assert logged(run.info.run_id) == sorted(
        [(leftover, "PENDING"), (second.split("/")[-1], "READY")]
    )
    assert (
        f"train: an earlier try's unfinished model {leftover} stays (PENDING; not deleted: "
        "MlflowException: Permission denied)"
    ) in capsys.readouterr().out.splitlines()  # among Keras's bars: the stage turns them off


def test_discarded_recovery_state_ends_its_run_if_nothing_else_did(mlflow_store, capsys):

    client = mlflow_store
    experiment = client.create_experiment("e")
    killed, logged, failed, deleted = (client.create_run(experiment) for _ in range(4))
    client.set_terminated(failed.info.run_id, "FAILED")
    client.delete_run(deleted.info.run_id)
    run_log.end_abandoned(killed.info.run_id, logged=False)
    run_log.end_abandoned(logged.info.run_id, logged=True)
    run_log.end_abandoned(failed.info.run_id, logged=False)  # its status stays
    run_log.end_abandoned(deleted.info.run_id, logged=False)
    run_log.end_abandoned("0123456789abcdef0123456789abcdef", logged=False)  # not in this store
    status = {r: client.get_run(r.info.run_id).info.status for r in (killed, logged, failed)}
    assert list(status.values()) == ["KILLED", "FINISHED", "FAILED"]
    assert client.get_run(deleted.info.run_id).info.status == "RUNNING"
    assert capsys.readouterr().out.splitlines() == [
        f"train: marked MLflow run {killed.info.run_id} of the discarded state KILLED",
        f"train: marked MLflow run {logged.info.run_id} of the discarded state FINISHED",
    ]


def test_recovery_state_discarded_for_new_params_is_kept_for_its_run(tmp_path):
    from pipeline.resume import StateStore, TrainState

    store = StateStore(tmp_path / "state")
    store.record(TrainState(fingerprint="abc", run_id="RUN1", model_uri="models:/m-1"))
    assert store.load("abc").model_uri == "models:/m-1" and store.discarded == []
    assert store.load("other") is None  # no epoch done: nothing to set aside
    [discarded] = store.discarded
    assert (discarded.run_id, discarded.model_uri) == ("RUN1", "models:/m-1")


def killed_after(store, fingerprint: str, epochs: int, run_id: str) -> None:
    """The state a training killed after `epochs` epochs leaves (its checkpoint a stand-in)."""
    from pipeline.resume import TrainState

    checkpoint = f"epoch-{epochs:05d}.keras"
    store.directory.mkdir(parents=True, exist_ok=True)
    (store.directory / checkpoint).write_bytes(f"{fingerprint} after {epochs}".encode())
    store.record(TrainState(fingerprint, run_id, epochs, checkpoint=checkpoint))


def test_a_waiting_state_taken_while_it_is_counted_does_not_stop_the_training(
    tmp_path, monkeypatch, capsys
):
    """The waiting-states line is a notice: a state whose files another training moves
    away as they are weighed (FileNotFoundError) leaves it out, not the training."""
    from pipeline.resume import Claim, StateStore

    exps = tmp_path / ".train-state/exps"
    other = StateStore(exps / "other", claim=Claim.take(exps / "other"))
    killed_after(other, "other", 3, "RUN-o")
    other.claim.release()
    workspace = StateStore(tmp_path / ".train-state", experiments=exps)
    killed_after(workspace, "fp", 5, "RUN-w")
    real_stat, seen = Path.stat, []

    def taken_meanwhile(path, *args, **kwargs):  # there when looked at, gone when weighed
        if path.parent == exps / "other" and path.suffix == ".keras":
            seen.append(path)
            if len(seen) > 1:
                raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", taken_meanwhile)
    assert workspace.load("fp").epochs_done == 5
    assert len(seen) > 1 and "wait in" not in capsys.readouterr().out


def test_clearing_the_workspace_state_spares_a_claim_taken_meanwhile(tmp_path, monkeypatch):
    """An experiment copy claiming its state in exps/ just as the workspace's training
    ends: its lock file must survive the workspace removing .train-state/."""
    import pathlib

    from pipeline import resume
    from pipeline.resume import StateStore

    store = StateStore(tmp_path / ".train-state")
    killed_after(store, "fp", 3, "RUN-w")
    claims = []

    def claimed_meanwhile(original):
        def removing(path, *args, **kwargs):
            if Path(path) == store.directory and not claims:  # the claim comes in first
                claims.append(resume.Claim.take(store.directory / "exps/other"))
            return original(path, *args, **kwargs)

        return removing

    monkeypatch.setattr(resume.shutil, "rmtree", claimed_meanwhile(shutil.rmtree))
    monkeypatch.setattr(pathlib.Path, "rmdir", claimed_meanwhile(pathlib.Path.rmdir))
    store.clear()
    assert claims and claims[0] is not None
    assert (store.directory / "exps/other.lock").is_file()  # what keeps others out
    assert sorted(p.name for p in store.directory.iterdir()) == ["exps"]
    claims[0].release()


def test_recovery_states_it_cannot_move_are_one_line_and_stay_where_they_were(tmp_path):
    """A file where kept/ goes (or a full, read-only disk): no traceback, no state lost."""
    from pipeline.resume import StateStore

    store = StateStore(tmp_path / ".train-state")
    killed_after(store, "old", 3, "RUN-o")
    (store.directory / "kept").write_text("a file where the folder goes")
    with pytest.raises(PipelineError) as error:
        store.load("new")
    assert str(error.value).startswith(
        f"cannot set aside or take back the recovery states in {store.directory} ([Errno"
    ), error.value
    assert str(error.value).endswith("); fix that and run again")
    (store.directory / "kept").unlink()
    state = store.load("old")
    assert (state.run_id, state.epochs_done) == ("RUN-o", 3)
    assert store.checkpoint_path(state).read_bytes() == b"old after 3"


def test_a_training_of_other_settings_sets_the_state_aside_and_a_rerun_takes_it_back(
    tmp_path, capsys
):
    """Killed after 40 epochs, then a 1-epoch try of other settings: the 40 are not lost."""

    from pipeline.resume import StateStore

    store = StateStore(tmp_path / "state")
    killed_after(store, "long", 40, "RUN1")
    assert store.load("quick") is None and store.discarded == []
    kept = store.directory / "kept/long"
    assert capsys.readouterr().out == (
        f"train: set aside the recovery state in {store.directory} (40 epochs; it belongs to "
        f"other params or data) as {kept}: training those settings again resumes it\n"
    )
    assert sorted(p.name for p in kept.iterdir()) == ["epoch-00040.keras", "state.json"]
    killed_after(store, "quick", 1, "RUN2")  # the quick training's own state ...
    store.clear()  # ... cleared as it finishes: the one set aside stays
    assert sorted(p.name for p in store.directory.iterdir()) == ["kept"]

    # Another worker of a multi-worker training (writes nothing) reads it where it is, and
    # finds its checkpoint still when the chief has moved it back in the meantime.
    reader = StateStore(store.directory, writable=False)
    state = reader.load("long")
    assert (state.run_id, state.epochs_done) == ("RUN1", 40)
    assert reader.checkpoint_path(state).read_bytes() == b"long after 40" and kept.is_dir()
    capsys.readouterr()

    state = store.load("long")
    assert (state.run_id, state.epochs_done) == ("RUN1", 40)
    assert store.checkpoint_path(state) == store.directory / "epoch-00040.keras"
    assert store.checkpoint_path(state).read_bytes() == b"long after 40"
    assert reader.checkpoint_path(state) == store.checkpoint_path(state)
    assert capsys.readouterr().out == (
        f"train: taking back the recovery state set aside as {kept}\n"
    )
    assert not (store.directory / "kept").exists()
    store.clear()
    assert not store.directory.exists()

    # Only the two set aside last are kept; the older are discarded, their runs to be ended.
    for name in ["a", "b", "c"]:
        killed_after(store, name, 2, f"RUN-{name}")
        assert store.load("next") is None
    assert sorted(p.name for p in (store.directory / "kept").iterdir()) == ["b", "c"]
    assert [s.run_id for s in store.discarded] == ["RUN-a"]
    assert "(more than 2 states set aside; the oldest)" in capsys.readouterr().out


def test_the_state_a_training_asks_for_is_taken_back_however_old(tmp_path, capsys):
    """A long training killed Monday, quick tries of two other settings killed since: rerun,
    the long one comes back, although two states were set aside after it."""
    from pipeline.resume import StateStore

    store = StateStore(tmp_path / "state")
    killed_after(store, "long", 40, "RUN-long")
    assert store.load("quick1") is None
    killed_after(store, "quick1", 2, "RUN-1")
    assert store.load("quick2") is None
    killed_after(store, "quick2", 2, "RUN-2")
    state = store.load("long")  # sets quick2 aside: three set aside, for a moment
    assert (state.run_id, state.epochs_done) == ("RUN-long", 40) and store.discarded == []
    assert sorted(p.name for p in (store.directory / "kept").iterdir()) == ["quick1", "quick2"]


def test_a_claim_excludes_others_until_released_or_its_process_dies(tmp_path):
    from pipeline.resume import Claim

    folder = tmp_path / ".train-state/exps/abc"
    first = Claim.take(folder)
    assert first is not None and (tmp_path / ".train-state/exps/abc.lock").is_file()
    assert Claim.take(folder) is None  # held: a second open file, even in this process
    first.release()
    assert not (tmp_path / ".train-state/exps/abc.lock").exists()
    second = Claim.take(folder)
    assert second is not None
    second.release()

    # Held by a process that is then killed: the kernel lets go, the lock file stays.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.resume import Claim; "
         f"c = Claim.take(__import__('pathlib').Path({str(folder)!r})); "
         "print(c is not None, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "True\n"
        assert Claim.take(folder) is None
    finally:
        holder.kill()
        holder.wait()
    third = Claim.take(folder)
    assert third is not None
    third.release()


def test_a_claim_waits_out_a_moments_hold_such_as_a_probe(tmp_path):
    """held()'s probe, or another's release, holds the lock for an instant: an experiment
    taking its state then must not conclude that another training holds it."""
    import fcntl
    import threading

    from pipeline.resume import Claim

    folder = tmp_path / ".train-state/exps/abc"
    Claim.take(folder).release()
    probe = os.open(Claim.lock_file(folder), os.O_RDWR | os.O_CREAT)
    fcntl.flock(probe, fcntl.LOCK_SH)  # what held() takes, for 0.3 s instead of microseconds
    threading.Timer(0.3, os.close, [probe]).start()
    claim = Claim.take(folder, patience_s=10)  # the 0.3 s are waited out, however slow CI is
    assert claim is not None
    claim.release()
    held = Claim.take(folder)
    started = time.monotonic()
    assert Claim.take(folder, patience_s=0.2) is None  # a real holder: given up on in time
    assert 0.2 <= time.monotonic() - started < 5
    held.release()


def test_the_workspace_takes_back_an_experiment_state_no_training_holds(tmp_path, capsys):
    """A queued experiment killed after 7 epochs: the same settings trained in the workspace
    resume it, unless a training in another experiment copy holds it."""
    from pipeline.resume import Claim, StateStore

    exps = tmp_path / ".train-state/exps"
    experiment = StateStore(exps / "fp", claim=Claim.take(exps / "fp"))
    killed_after(experiment, "fp", 7, "RUN-q")
    workspace = StateStore(tmp_path / ".train-state", experiments=exps)
    assert workspace.load("fp") is None  # claimed: the experiment is still training
    assert "is in use by a training in a temporary experiment copy" in capsys.readouterr().out
    assert (exps / "fp/state.json").is_file()

    experiment.claim.release()  # as its death would
    state = workspace.load("fp")
    assert (state.run_id, state.epochs_done) == ("RUN-q", 7)
    assert workspace.checkpoint_path(state).read_bytes() == b"fp after 7"
    assert workspace.checkpoint_path(state).parent == workspace.directory
    out = capsys.readouterr().out
    assert f"taking the recovery state {exps / 'fp'} of a temporary experiment copy" in out
    assert not (exps / "fp").exists() and workspace.discarded == []

    # Another experiment's state is not the workspace's to clear, set aside or discard.
    other = StateStore(exps / "other", claim=Claim.take(exps / "other"))
    killed_after(other, "other", 3, "RUN-o")
    assert workspace.load("fp").epochs_done == 7
    assert "wait in" not in capsys.readouterr().out  # still training: not waiting
    assert Claim.held(exps / "other") and not Claim.held(exps / "none")
    other.claim.release()
    assert not Claim.held(exps / "other")
    assert workspace.load("fp").epochs_done == 7
    assert capsys.readouterr().out == (
        f"train: 1 recovery state of killed or failed experiments wait in {exps} (0.0 MB): "
        f"running the same experiment again resumes it; `rm -rf {exps}` drops them (not "
        "while a queued or `--temp` experiment trains: it keeps its state there too)\n"
    )
    workspace.clear()
    assert (exps / "other/state.json").is_file()
    assert workspace.load("third") is None and workspace.discarded == []
    assert sorted(p.name for p in workspace.directory.iterdir()) == ["exps"]


def test_an_experiment_state_folder_goes_when_its_training_is_done(tmp_path):
    from pipeline.resume import Claim, StateStore

    exps = tmp_path / ".train-state/exps"
    first = StateStore(exps / "one", claim=Claim.take(exps / "one"))
    second = StateStore(exps / "two", claim=Claim.take(exps / "two"))
    killed_after(first, "one", 2, "RUN-1")
    killed_after(second, "two", 2, "RUN-2")
    first.clear()
    first.release()
    assert sorted(p.name for p in exps.iterdir()) == ["two", "two.lock"]
    second.clear()
    second.release()
    assert not (tmp_path / ".train-state").exists()


def test_an_experiment_copy_keeps_its_state_in_the_workspace(tmp_path, monkeypatch, capsys):
    """`dvc exp run --temp` and queued experiments train in .dvc/tmp/exps/<name>, which DVC
    deletes when they end: their state lives in the workspace's .train-state/exps/."""
    from pipeline.train import recovery_store, rerun

    workspace = tmp_path / "repo"
    copy = workspace / ".dvc/tmp/exps/tmpab12"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(copy))
    store = recovery_store("fp", writable=True)
    assert store.directory == workspace / ".train-state/exps/fp"
    assert capsys.readouterr().out == (
        f"train: recovery state in {store.directory}, outside this temporary copy\n"
    )
    assert rerun(1) == "the same `dvc exp run` (or `dvc repro` in the workspace)"
    reader = recovery_store("fp", writable=False)  # another worker: no claim of its own
    assert reader.directory == store.directory and reader.claim is None

    # The same settings, queued twice and run side by side: the second keeps its own.
    twin = recovery_store("fp", writable=True)
    assert twin.directory == Path(".train-state") and twin.claim is None
    assert "another training of these settings holds" in capsys.readouterr().err
    store.release()

    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    store = recovery_store("fp", writable=True)
    assert store.directory == Path(".train-state") and store.claim is None
    assert store.experiments == workspace / ".train-state/exps"
    assert rerun(1) == "`dvc repro`"

    (workspace / ".train-state").write_text("not a folder")  # the disk's trouble: one line
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(copy))
    with pytest.raises(PipelineError, match=r"cannot write the recovery state in .*/exps \("):
        recovery_store("fp", writable=True)


def take_back_killed_after_one_file(store, fingerprint: str, monkeypatch) -> None:
    from pipeline import resume

    real_replace, moved = resume.os.replace, []

    def replace(source, target):
        if moved:
            raise KeyboardInterrupt  # as a kill between two renames would stop it
        moved.append(source)
        real_replace(source, target)

    monkeypatch.setattr(resume.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        store.load(fingerprint)
    monkeypatch.undo()


def test_a_kill_while_a_state_moves_loses_nothing(tmp_path, capsys, monkeypatch):
    """A state moves a file at a time, state.json last out of the state folder and first
    into it: killed between two files, the checkpoint is found on the other side and the
    move is finished on the next load."""
    import os

    from pipeline.resume import StateStore

    store = StateStore(tmp_path / "state")
    kept = store.directory / "kept/long"
    # Set aside, killed after the checkpoint moved: state.json still in place.
    killed_after(store, "long", 40, "RUN1")
    kept.mkdir(parents=True)
    os.replace(store.directory / "epoch-00040.keras", kept / "epoch-00040.keras")
    state = store.load("long")
    assert state.epochs_done == 40
    assert store.checkpoint_path(state) == store.directory / "epoch-00040.keras"
    assert store.checkpoint_path(state).read_bytes() == b"long after 40"
    assert not kept.exists()
    # Taken back, killed after the first file moved: state.json, which goes first into
    # place, so the checkpoint is still in kept/.
    assert store.load("quick") is None  # sets it aside whole
    take_back_killed_after_one_file(store, "long", monkeypatch)
    assert sorted(p.name for p in store.directory.iterdir()) == ["kept", "state.json"]
    state = store.load("long")
    assert state.epochs_done == 40
    assert store.checkpoint_path(state).read_bytes() == b"long after 40"
    assert sorted(p.name for p in store.directory.iterdir()) == ["epoch-00040.keras", "state.json"]
    # The same kill, then a training of other settings first: it sets the state aside
    # whole (it would have deleted a checkpoint left in place without its state.json).
    assert store.load("quick") is None
    take_back_killed_after_one_file(store, "long", monkeypatch)
    assert store.load("quick") is None
    killed_after(store, "quick", 1, "RUN2")
    store.clear()  # the quick one finished
    state = store.load("long")
    assert state.epochs_done == 40
    assert store.checkpoint_path(state).read_bytes() == b"long after 40"
    assert store.discarded == []


def test_a_state_that_fails_to_read_is_kept_and_the_training_stops(tmp_path, monkeypatch):
    """EIO on a network disk is not a state of another version: deleting 40 epochs for it
    would be wrong, so training stops in one line and leaves everything."""
    from pathlib import Path

    from pipeline.resume import StateStore

    store = StateStore(tmp_path / "state")
    killed_after(store, "long", 40, "RUN1")
    real_read_text = Path.read_text

    def read_text(path, *args, **kwargs):
        if path.name == "state.json":
            raise OSError(5, "Input/output error")
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(PipelineError) as error:
        store.load("long")
    monkeypatch.undo()
    assert str(error.value) == (
        f"cannot read the recovery state {store.directory / 'state.json'} (Input/output "
        "error); nothing was deleted: fix that and run again, or delete that file to give up "
        "the state"
    )
    assert store.load("long").epochs_done == 40 and store.discarded == []


def test_an_unreadable_state_is_discarded_saying_so_and_its_run_ended(tmp_path, capsys):
    """A state.json this code cannot read (written by another version, say): not a silent
    fresh start beside a stale checkpoint, but a line, the folder cleared, its run known."""
    from pipeline.resume import StateStore

    store = StateStore(tmp_path / "state")
    store.directory.mkdir()
    (store.directory / "epoch-00007.keras").write_bytes(b"old")
    (store.directory / "state.json").write_text('{"fingerprint": "f", "run_id": "RUN7", "x": 1}')
    assert store.load("f") is None
    assert capsys.readouterr().out.startswith(
        f"train: discarding recovery state in {store.directory} (its state.json cannot be "
        "read (TypeError: "
    )
    assert [s.run_id for s in store.discarded] == ["RUN7"] and not store.directory.exists()


def test_a_long_backfill_cut_short_is_completed_metric_by_metric(mlflow_store, monkeypatch):
    """Over 1000 values take several requests, each of whole epochs: a failed second one,
    then a retry, leaves every metric with every epoch once."""

    keys = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "images_per_second")
    history = [{"epoch": e, **{k: e + i / 10 for i, k in enumerate(keys)}} for e in range(1, 201)]
    run_id = mlflow_store.create_run(mlflow_store.create_experiment("e")).info.run_id
    sizes = []
    original = mlflow.MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), **kwargs):
        sizes.append(len(metrics))
        if len(sizes) == 2:
            raise OSError("connection reset")
        return original(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", log_batch)
    with pytest.raises(OSError):
        run_log.backfill_metrics(run_id, history)
    run_log.backfill_metrics(run_id, history)
    assert all(size <= 1000 and size % len(keys) == 0 for size in sizes), sizes
    for key in keys:
        steps = sorted(m.step for m in mlflow_store.get_metric_history(run_id, key))
        assert steps == list(range(1, 201)), key


def test_a_failed_stage_marks_its_run_within_seconds(monkeypatch, capsys):
    """The store that just failed the stage is asked once more, with few retries."""
    from pipeline.errors import end_mlflow_run

    seen = []

    def end_run(status):
        seen.append((status, os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")))
        raise OSError("Connection refused\nmore detail")

    monkeypatch.setattr(mlflow, "active_run", lambda: object())
    monkeypatch.setattr(mlflow, "end_run", end_run)
    end_mlflow_run("FAILED")
    assert seen == [("FAILED", "2")]
    assert capsys.readouterr().err == (
        "warning: could not mark the MLflow run FAILED (OSError: Connection refused)\n"
    )


def test_evaluate_stops_before_its_work_if_the_training_run_is_not_in_the_store(mlflow_store):
    from pipeline import tracking

    with mlflow.start_run() as run:
        pass
    evaluation_log.check_run(run.info.run_id, Path("models/model_info.json"))  # there: no error
    mlflow_store.delete_run(run.info.run_id)
    for gone in (run.info.run_id, "0123456789abcdef0123456789abcdef"):
        with pytest.raises(tracking.TrackingError) as error:
            evaluation_log.check_run(gone, Path("models/model_info.json"))
        assert str(error.value).startswith(
            f"models/model_info.json names MLflow run {gone}, which is deleted or not in the "
            "tracking store sqlite:///"
        )


def sigterm_when_ready(script: str) -> subprocess.Popen:
    """Run `script`, wait for its "ready" line, send it SIGTERM."""
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    return child


def test_sigterm_stops_a_stage_as_ctrl_c_does():
    """`docker stop` or a scheduler's preemption: one line and exit 143, not a silent death
    that leaves the MLflow run RUNNING."""
    script = (
        "import time; from pipeline.errors import cli\n"
        "@cli\n"
        "def main():\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "raise SystemExit(main())\n"
    )
    child = sigterm_when_ready(script)
    _, err = child.communicate(timeout=30)
    assert (child.returncode, err) == (143, "terminated\n")
    # One started with SIGTERM ignored (nohup-like launchers) keeps ignoring it.
    ignoring = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    child = sigterm_when_ready(ignoring + script.replace("time.sleep(60)", "time.sleep(2)"))
    assert child.wait(timeout=30) == 0


def test_a_resumed_run_gets_the_params_a_kill_kept_it_from_logging(
    mlflow_store, raw_params, tmp_path
):
    """A replacement run (the first one deleted) killed while its params were logged: the
    rerun continues it after epoch 3, and logs what it lacks."""
    from pipeline.device import Device
    from pipeline.resume import StateStore, TrainState
    from pipeline.train import start_run

    params = parse_params(raw_params)
    run_id = mlflow_store.create_run(mlflow_store.create_experiment("e")).info.run_id
    mlflow_store.log_param(run_id, "train.epochs", params.train.epochs)  # cut short there
    history = [{"epoch": e, "loss": 1.0 / e} for e in (1, 2, 3)]
    state = TrainState("f", run_id, 3, history=history, checkpoint="epoch-00003.keras")
    start_run(params, state, StateStore(tmp_path / "state"), Device("CPU", 1, "float32", False))
    mlflow.end_run()
    logged = mlflow_store.get_run(run_id).data.params
    assert logged["train.learning_rate"] == str(params.train.learning_rate)
    assert logged["train.precision_resolved"] == "float32"


@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [(PipelineError("bad input"), "FAILED", 1), (KeyboardInterrupt(), "KILLED", 130),
     (Terminated(), "KILLED", 143), (RuntimeError("a bug"), "FAILED", None)],
)  # fmt: skip
def test_a_stage_that_stops_early_marks_its_mlflow_run(mlflow_store, raised, status, code):
    """Not FINISHED, as MLflow's exit hook would have it: `mlflow ui` shows what happened."""
    from pipeline.errors import cli

    started = []

    @cli
    def main():
        started.append(mlflow.start_run().info.run_id)
        raise raised

    if code is None:
        with pytest.raises(RuntimeError):
            main()
    else:
        assert main() == code
    assert mlflow.active_run() is None
    assert mlflow_store.get_run(started[0]).info.status == status


# --- the stage, in a repository copy ---------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_repo(tmp_path_factory):
    """A repository copy whose download and prepare stages have run on a small archive."""
    base = tmp_path_factory.mktemp("train")
    archive = base / "cifar-10-python.tar.gz"
    md5 = write_archive(archive, train_per_class=200, test_per_class=10)
    repo = make_repo(base / "repo", {**TINY, "data.url": archive.as_uri(), "data.md5": md5})
    dvc(repo, "repro", "prepare")
    return repo


@pytest.fixture
def repo(prepared_repo, tmp_path):
    """A private copy of the prepared repository, with its own MLflow store."""
    copy = tmp_path / "repo"
    shutil.copytree(prepared_repo, copy, symlinks=True)
    return copy


def train(repo, env=None, check=True):
    return run([sys.executable, "-m", "pipeline.train"], repo, stage_env(env), check)


def runs_of(repo):
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar10-resnet")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.slow
def test_train_logs_a_complete_mlflow_run(repo):
    result = train(repo)
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("train: epoch")]
    assert len(epoch_lines) == 2 and "\r" not in result.stdout

    summary = json.loads((repo / "metrics/train.json").read_text())
    assert summary["epochs"] == 2 and summary["train_images"] == 1800
    assert summary["val_images"] == 200 and 0 <= summary["val_accuracy"] <= 1
    history = (repo / "metrics/history.csv").read_text().splitlines()
    assert history[0] == "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate,images_per_second"
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2"]
    run_file = json.loads((repo / "models/model_info.json").read_text())

    client, runs = runs_of(repo)
    assert len(runs) == 1
    logged = runs[0]
    assert logged.info.run_id == run_file["run_id"]
    assert logged.data.params["train.learning_rate"] == "0.001"
    assert logged.data.params["model.filters"] == "[8, 16]"
    assert logged.data.params["train.augment.flip"] == "True"
    assert logged.data.params["data.val_size"] == "200"
    assert not [key for key in logged.data.params if key.startswith("evaluate.")]
    for metric in (
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "learning_rate",
        "images_per_second",
    ):
        assert [m.step for m in client.get_metric_history(logged.info.run_id, metric)] == [1, 2]
    tags = logged.data.tags
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert tags["data.prepared_md5"] == lock["stages"]["prepare"]["outs"][0]["md5"]
    assert "dvc.exp_name" not in tags  # plain run, not an experiment
    assert not (repo / ".train-state").exists()  # recovery state cleared once done

    # The logged model predicts exactly what models/model.keras predicts, from raw pixels.
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    local = keras.saving.load_model(repo / "models/model.keras").predict(images, verbose=0)
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    logged_model = mlflow.keras.load_model(run_file["model_uri"])
    np.testing.assert_array_equal(logged_model.predict(images, verbose=0), local)
    pyfunc = mlflow.pyfunc.load_model(run_file["model_uri"]).predict(images)
    np.testing.assert_allclose(pyfunc, local, rtol=1e-6)
    assert np.allclose(local.sum(axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_no_validation_split_trains_on_every_image(repo, tmp_path):
    # data.val_size 0 ("none"): a final model trained on all the training images.
    set_params(repo, {"data.val_size": 0})
    dvc(repo, "repro", "prepare")
    train(repo)

    summary = json.loads((repo / "metrics/train.json").read_text())
    assert (summary["train_images"], summary["val_images"]) == (2000, 0)
    assert not {"val_loss", "val_accuracy"} & set(summary)
    history = (repo / "metrics/history.csv").read_text().splitlines()
    assert history[0] == "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate,images_per_second"
    assert len(history) == 3 and all(row.split(",")[3:5] == ["nan", "nan"] for row in history[1:])
    client, runs = runs_of(repo)
    assert not any(key.startswith("val_") for key in runs[0].data.metrics)
    # The loss and accuracy plots still draw the training curves: every field is there (a
    # missing one makes DVC drop the whole plot with a warning, and DVC reads `nan` as no point).
    shown = dvc(repo, "plots", "show", "--json")
    plots = json.loads(shown.stdout)
    assert "could not find" not in shown.stderr  # evaluate has not run: its plots are missing
    assert not [e for e in plots.get("errors", []) if "history" in e["source"]]
    for name, field in (("Loss per epoch", "loss"), ("Accuracy per epoch", "accuracy")):
        [plot] = plots["data"][name]
        values = plot["content"]["data"]["values"]
        assert [v["dvc_inferred_y_value"] for v in values if v["field"] == field] == [
            row.split(",")[HISTORY_COLUMNS.index(field)] for row in history[1:]
        ]


@pytest.mark.slow
@pytest.mark.parametrize("run_deleted", [False, True])
def test_sigkill_resumes_in_the_same_run_without_gaps(repo, tmp_path, run_deleted):
    """And if the run was deleted in between: in a new run that gets every epoch's figures."""
    # The fast recipe's settings (README): its loss and optimizer state survive the kill too.
    # Warm-up over 1.8 of the 6 epochs, so the rates logged per epoch rise, then fall.
    set_params(
        repo, {"train.epochs": 6, **RECIPE, "train.learning_rate": 0.05, "train.warmup": 0.3}
    )
    state_file = repo / ".train-state/state.json"
    with Background(tmp_path) as background:
        process = background.start([sys.executable, "-m", "pipeline.train"], repo, stage_env())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if json.loads(state_file.read_text())["epochs_done"] >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        assert process.poll() is None, f"ended before the kill: {background.output(process)}"
        assert state_file.exists(), f"no recovery state in 120 s: {background.output(process)}"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = json.loads(state_file.read_text())["epochs_done"]
    assert 2 <= killed_at < 6
    assert not (repo / "models/model.keras").exists()

    set_params(repo, {"evaluate.batch_size": 250})  # evaluation settings do not restart it
    killed_run = json.loads(state_file.read_text())["run_id"]
    if run_deleted:
        runs_of(repo)[0].delete_run(killed_run)
    result = dvc(repo, "repro", "train")
    assert f"resuming after epoch {killed_at}" in result.stdout
    assert result.stdout.count("train: epoch") == 6 - killed_at
    assert ("is deleted or not in this tracking store" in result.stdout) == run_deleted

    client, runs = runs_of(repo)
    assert len(runs) == 1  # the same MLflow run, continued (or the new one)
    run_id = runs[0].info.run_id
    assert (run_id == killed_run) != run_deleted
    assert runs[0].data.params["train.epochs"] == "6"
    for metric in ("loss", "val_accuracy", "learning_rate"):
        steps = [m.step for m in client.get_metric_history(run_id, metric)]
        assert sorted(steps) == [1, 2, 3, 4, 5, 6], metric  # no gap, no duplicate
    history = (repo / "metrics/history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in history] == ["1", "2", "3", "4", "5", "6"]
    # The schedule went on from the restored step count: up to the peak, then down.
    rates = [float(row.split(",")[5]) for row in history]
    peak = rates.index(max(rates))
    assert 0 < peak < 5 and rates[-1] < rates[peak] / 100
    assert not (repo / ".train-state").exists()


def killed_after_an_epoch(background, cwd, env, states: Path, more_than: int) -> dict:
    """Train in `cwd` and SIGKILL it once the one state in `states`/*/ has more than
    `more_than` epochs; that state, and its folder."""
    process = background.start([sys.executable, "-m", "pipeline.train"], cwd, env)
    deadline, state = time.monotonic() + 120, {}
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            [found] = states.glob("*/state.json")
            state = {**json.loads(found.read_text()), "folder": found.parent}
            if state["epochs_done"] > more_than:
                break
        time.sleep(0.02)
    assert process.poll() is None, f"ended before the kill: {background.output(process)}"
    assert state, f"no recovery state at {states} in 120 s: {background.output(process)}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return {**json.loads((state["folder"] / "state.json").read_text()), "folder": state["folder"]}


@pytest.mark.slow
def test_a_killed_experiment_resumes_in_the_next_copy_and_then_in_the_workspace(repo, tmp_path):
    """`dvc exp run --temp` and queued experiments run in a copy DVC deletes when they end,
    killed or not: the next run of the same experiment, in a copy or not, resumes it."""
    set_params(repo, {"train.epochs": 6})
    states = repo / ".train-state/exps"
    outside = {".train-state", "mlflow.db", "mlartifacts", "tmp"}  # not in a DVC copy

    def experiment_copy(name: str) -> Path:
        copy = repo / ".dvc/tmp/exps" / name
        shutil.copytree(repo, copy, symlinks=True, ignore=lambda d, names: outside & set(names))
        return copy

    with Background(tmp_path) as background:
        first = experiment_copy("tmpfirst")
        killed = killed_after_an_epoch(
            background, first, stage_env({"DVC_ROOT": str(first)}), states, 0
        )
        shutil.rmtree(first)  # as DVC does with a copy whose run ended
        assert "train: recovery state in" in background.output(background.started[0][0])
        second = experiment_copy("tmpsecond")
        again = killed_after_an_epoch(
            background, second, stage_env({"DVC_ROOT": str(second)}), states, killed["epochs_done"]
        )
        shutil.rmtree(second)
        assert f"resuming after epoch {killed['epochs_done']}" in background.output(
            background.started[1][0]
        )
    assert again["run_id"] == killed["run_id"] and again["folder"] == killed["folder"]
    assert killed["epochs_done"] < again["epochs_done"] < 6

    result = train(repo)
    assert f"taking the recovery state {killed['folder']}" in result.stdout
    assert f"resuming after epoch {again['epochs_done']}" in result.stdout
    assert result.stdout.count("train: epoch") == 6 - again["epochs_done"]
    _, runs = runs_of(repo)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(killed["run_id"], "FINISHED")]
    history = (repo / "metrics/history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in history] == ["1", "2", "3", "4", "5", "6"]
    assert not (repo / ".train-state").exists()


@pytest.mark.slow
def test_a_kill_during_the_first_epoch_starts_again_in_the_same_run(repo, tmp_path):
    set_params(repo, {"train.epochs": 1})
    state_file = repo / ".train-state/state.json"
    with Background(tmp_path) as background:
        process = background.start([sys.executable, "-m", "pipeline.train"], repo, stage_env())
        deadline, logged = time.monotonic() + 120, {}
        while time.monotonic() < deadline and process.poll() is None and not logged:
            with contextlib.suppress(OSError, ValueError, KeyError, mlflow.MlflowException):
                run_id = json.loads(state_file.read_text())["run_id"]
                logged = runs_of(repo)[0].get_run(run_id).data.params
            time.sleep(0.05)
        assert process.poll() is None, f"ended before the kill: {background.output(process)}"
        os.kill(process.pid, signal.SIGKILL)  # the state names the run; no checkpoint yet
        process.wait()
    killed = json.loads(state_file.read_text())
    assert killed["epochs_done"] == 0 and killed["run_id"]
    url = yaml.safe_load((repo / "params.yaml").read_text())["data"]["url"]
    set_params(repo, {"data.url": "file:///moved/cifar-10-python.tar.gz"})  # same images

    result = train(repo)
    assert f"starting again in MLflow run {killed['run_id']} (stopped during epoch 1)" in (
        result.stdout
    )
    assert "discarding" not in result.stdout
    assert "the MLflow run keeps the values it started with for data.url\n" in result.stdout
    _, runs = runs_of(repo)
    assert [run.info.run_id for run in runs] == [killed["run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.epochs"] == "1"
    assert runs[0].data.params["data.url"] == url  # as the run started; MLflow keeps the first


@pytest.mark.slow
def test_deterministic_training_repeats_exactly(repo):
    set_params(repo, {"train.deterministic": True})
    histories, weights = [], []
    for _ in range(2):
        train(repo)
        histories.append((repo / "metrics/history.csv").read_text().splitlines()[1:])
        weights.append(keras.saving.load_model(repo / "models/model.keras").get_weights())
    first = [row.split(",")[1:5] for row in histories[0]]  # loss, acc, val_loss, val_acc
    second = [row.split(",")[1:5] for row in histories[1]]
    assert len(first) == 2
    assert first == second
    # history.csv rounds to 6 digits: the trained weights must match bit for bit.
    assert len(weights[0]) == len(weights[1]) > 0
    for one, other in zip(*weights, strict=True):
        assert np.array_equal(one, other)


@pytest.mark.slow
def test_unreachable_tracking_server_fails_before_training(repo):
    port = free_port()  # nothing listens on it
    started = time.monotonic()
    result = train(repo, {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, check=False)
    assert result.returncode == 1
    assert "train: epoch" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow tracking store http://127.0.0.1:{port} is not usable")
    assert "Traceback" not in result.stderr
    # Not a benchmark: whether MLflow's own retries ran. They wait 4 minutes (7 retries,
    # backoff factor 2); the stage's start, TensorFlow's import included, takes 10-30 s.
    assert time.monotonic() - started < 120


def start_mlflow_server(background: Background, folder: Path, port: int):
    """A plain `mlflow server` on a SQLite store in `folder`; the same folder, the same runs."""
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    process = background.start(command, folder, stage_env())
    deadline = time.monotonic() + 180  # seconds: a first start creates the schema
    while True:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return process
        assert process.poll() is None and time.monotonic() < deadline, background.output(process)
        time.sleep(0.5)


@pytest.mark.slow
def test_a_tracking_server_outage_costs_warnings_not_the_training(repo, tmp_path):
    """The server goes down after epoch 1: training goes on, and is logged once it is back."""
    folder, port = tmp_path / "server", free_port()
    folder.mkdir()
    set_params(repo, {"train.epochs": 6})
    # A refused call gives up at once, not in minutes: no retries (few_retries keeps that).
    env = stage_env({
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    })  # fmt: skip
    with Background(tmp_path) as background:
        server = start_mlflow_server(background, folder, port)
        training = background.start([sys.executable, "-m", "pipeline.train"], repo, env)
        deadline = time.monotonic() + 300
        while "train: epoch 1/6" not in background.output(training):
            assert training.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        out = background.wait(training, timeout=300)[0]
    assert training.returncode == 1, out
    assert "train: warning: epoch 6 is not logged to MLflow yet (" in out
    assert "train: epoch 6/6" in out  # every epoch trained
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith("error: the training finished but could not be logged to MLflow (")
    )
    assert "once the store answers `dvc repro` logs it without training again" in out

    with Background(tmp_path) as background:
        start_mlflow_server(background, folder, port)
        again = train(repo, env)
        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        run_id = json.loads((repo / "models/model_info.json").read_text())["run_id"]
        logged = client.get_run(run_id)
        steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert "resuming after epoch 6" in again.stdout and "train: epoch" not in again.stdout
    assert steps == [1, 2, 3, 4, 5, 6] and logged.info.status == "FINISHED"
    assert "final_images_per_second" in logged.data.metrics


@pytest.mark.slow
def test_batch_size_and_missing_data_errors_name_the_fix(repo, tmp_path):
    set_params(repo, {"train.batch_size": 5000})
    result = train(repo, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train.batch_size: must be at most the 1800 training images, got 5000"
    )
    empty = make_repo(tmp_path / "empty", TINY)
    result = train(empty, check=False)
    assert result.returncode == 1
    assert "run `dvc repro prepare` first" in result.stderr


def worker_repos(prepared_repo, tmp_path) -> list:
    """One copy of the prepared repository per worker, as on separate machines."""
    for name in ("chief", "worker"):
        shutil.copytree(prepared_repo, tmp_path / name, symlinks=True)
    return [tmp_path / "chief", tmp_path / "worker"]


def start_workers(background: Background, repos, epochs: int = 1, params: dict | None = None):
    workers = [f"127.0.0.1:{port}" for port in free_ports(len(repos))]
    processes = []
    for index, copy in enumerate(repos):
        set_params(copy, {"train.epochs": epochs, **(params or {})})
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = stage_env({"TF_CONFIG": json.dumps(config)})
        processes.append(background.start([sys.executable, "-m", "pipeline.train"], copy, env))
    return processes


@pytest.mark.slow
def test_two_workers_train_once_and_only_the_chief_writes(prepared_repo, tmp_path):
    """MultiWorkerMirroredStrategy over two local processes: one model, one MLflow run."""
    repos = worker_repos(prepared_repo, tmp_path)
    with Background(tmp_path) as background:
        processes = start_workers(background, repos, params=RECIPE)  # its loss and weight decay
        outputs = background.wait(*processes, timeout=300)
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert "on worker 0 of 2" in outputs[0] and "on worker 1 of 2" in outputs[1]
    assert "train: worker 1 of 2: waiting for every worker in TF_CONFIG" in outputs[1]
    # Both print the same training figures, all-reduced over the two shards (BN moving
    # statistics are per worker, so validation figures may differ slightly).
    lines = [
        next(x for x in out.splitlines() if x.startswith("train: epoch 1/1")) for out in outputs
    ]
    assert lines[0].split("val_loss")[0] == lines[1].split("val_loss")[0]

    chief, worker = repos
    assert (chief / "models/model.keras").is_file()
    summary = json.loads((chief / "metrics/train.json").read_text())
    assert summary["epochs"] == 1 and summary["train_images"] == 1800
    _, runs = runs_of(chief)
    assert len(runs) == 1  # logged exactly once, by the chief
    assert runs[0].data.params["train.optimizer"] == "sgd"
    # The other worker wrote nothing: no model, metrics, MLflow store or recovery state.
    for name in ("models", "metrics", "mlflow.db", "mlartifacts", ".train-state"):
        assert not (worker / name).exists(), name


@pytest.mark.slow
def test_an_overflow_on_one_worker_is_skipped_by_every_worker(tmp_path):
    """mixed_float16: Keras's loss-scale optimizer checks each worker's own gradients, and a
    worker that overflowed alone left the others in the gradient sum until it timed out."""
    from tests.repo import free_ports

    ports = ",".join(map(str, free_ports(2)))
    script = str(ROOT / "tests" / "overflow_worker.py")
    with Background(tmp_path) as background:
        workers = [
            background.start([sys.executable, script, ports, str(i)], tmp_path, stage_env())
            for i in (0, 1)
        ]
        outputs = background.wait(*workers, timeout=240)
    assert [w.returncode for w in workers] == [0, 0], outputs
    for output in outputs:  # the second step skipped, its scale halved, on both
        scales = [line for line in output.splitlines() if line.startswith("scale")]
        assert scales == ["scale 32768", "scale 16384", "scale 16384"], output
    weights = [next(x for x in out.splitlines() if x.startswith("weights")) for out in outputs]
    assert weights[0] == weights[1]


@pytest.mark.slow
def test_an_overflow_on_one_local_replica_is_skipped_not_summed_into_nan_weights():
    """Several local GPUs (MirroredStrategy, Keras's fit), here two logical CPUs: Keras's
    loss-scale optimizer took replica 0's verdict for all, so replica 1's overflowed
    gradients entered the sum and every weight became NaN."""
    script = str(ROOT / "tests" / "overflow_worker.py")
    done = subprocess.run(
        [sys.executable, script, "mirrored"], capture_output=True, text=True, timeout=240,
        env=stage_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    scales = [line for line in done.stdout.splitlines() if line.startswith("scale")]
    assert scales == ["scale 32768", "scale 16384", "scale 16384"], done.stdout
    weights = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("weights"))[8:])
    assert len(weights) == 16 and np.isfinite(weights).all(), weights


@pytest.mark.slow
def test_a_worker_whose_peers_never_start_stops_after_its_wait(tmp_path):
    """TensorFlow keeps waiting for the other workers, holding the GIL and deaf to SIGTERM
    and SIGINT; the stage stops itself after distributed.WORKER_WAIT_S (here 3 s)."""
    from tests.repo import free_ports

    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 1}}
    script = (
        "from pipeline import distributed; distributed.WORKER_WAIT_S = 3; "
        "distributed.make_strategy(1, distributed.Cluster(2, 1, False))"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
        env=stage_env({"TF_CONFIG": json.dumps(config), "PYTHONPATH": str(ROOT)}), timeout=120,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    # TensorFlow's import (up to a minute on a busy 2-core runner) and the 3 s, not an hour.
    assert time.monotonic() - started < 110
    assert result.stderr.strip().splitlines()[-1] == (
        "error: worker 1 of 2: not every worker in TF_CONFIG started within 3 s; start "
        "each with `python -m pipeline.train` and its own task index (one that failed says "
        "why in its own output), then start this one again"
    )


@pytest.mark.slow
def test_a_worker_whose_port_is_taken_says_so_in_one_line(tmp_path):
    """Restarted before the worker it replaces let go of its port (or a typo'd port that
    another program holds): TensorFlow's UnknownError, with a traceback, said only that it
    "could not start gRPC server"."""
    import socket

    from tests.repo import free_ports

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workers = [f"localhost:{port}", f"localhost:{free_ports(1)[0]}"]
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}}
        script = (
            "import sys; from pipeline import distributed, errors; "
            "distributed.WORKER_WAIT_S = 60; sys.exit(errors.cli(lambda: distributed."
            "make_strategy(1, distributed.Cluster.from_environment()))())"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
            env=stage_env({"TF_CONFIG": json.dumps(config), "PYTHONPATH": str(ROOT)}),
            timeout=120,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: worker 0 of 2: cannot listen on localhost:{port} (its entry in TF_CONFIG): "
        "the port is taken, by a worker of an earlier start still stopping (within 120 s of "
        "a peer's end) or by another program; wait and start it again, or give it a free "
        "port in every worker's TF_CONFIG"
    )


@pytest.mark.slow
def test_ctrl_c_while_waiting_for_the_peers_stops_the_worker_at_once(tmp_path):
    """TensorFlow, waiting, ignores the SIGINT a terminal sends the process group; the
    watchdog died of it, and the wait went on without its limit."""
    from tests.repo import free_ports

    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 1}}
    script = (
        "from pipeline import distributed; distributed.WORKER_WAIT_S = 300; "
        "distributed.make_strategy(1, distributed.Cluster(2, 1, False))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=stage_env({"TF_CONFIG": json.dumps(config), "PYTHONPATH": str(ROOT)}),
    )  # fmt: skip
    try:
        assert "waiting for every worker" in process.stdout.readline()
        # That line comes before the watchdog starts: a SIGINT before its handlers are set
        # would kill it instead, and test nothing.
        watchdog, deadline = None, time.monotonic() + 60
        while watchdog is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(process.pid).children()
                watchdog = next(
                    (c for c in children if "signal.signal" in " ".join(c.cmdline())), None
                )
            time.sleep(0.1)
        assert watchdog is not None, "no watchdog process within 60 s"
        time.sleep(1)  # its handlers are set milliseconds after it starts; TensorFlow waits
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        _, stderr = process.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted while waiting for the other workers"


def test_a_watchdog_whose_process_is_gone_kills_nothing():
    """Its pid, reused by another process once the watched one was SIGKILLed from outside,
    must not be killed after the wait."""
    from pipeline.distributed import _WATCHDOG

    other = subprocess.Popen(["sleep", "30"])  # not the watchdog's parent
    try:
        watchdog = subprocess.run(
            [sys.executable, "-c", _WATCHDOG, str(other.pid), "0.2", "time is up"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert watchdog.returncode == 0 and watchdog.stderr == ""
        assert other.poll() is None  # still running
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
def test_workers_with_different_params_refuse_before_building_the_model(prepared_repo, tmp_path):
    """Another learning rate on one machine trained on in silence; another model or
    precision hung in the untimed broadcasts that build the model."""
    repos = worker_repos(prepared_repo, tmp_path)
    set_params(repos[1], {"train.learning_rate": 0.002})
    # A state of other params on the chief: set aside (and the oldest set aside deleted)
    # only by a training that goes ahead, not by one the workers refuse.
    kept = repos[0] / ".train-state/state.json"
    kept.parent.mkdir()
    kept.write_text(json.dumps({"fingerprint": "another training", "epochs_done": 3}))
    with Background(tmp_path) as background:
        processes = start_workers(background, repos)
        outputs = background.wait(*processes, timeout=300)
    assert [process.returncode for process in processes] == [1, 1], outputs
    for output in outputs:
        assert output.strip().splitlines()[-1] == (
            "error: the workers would train different things: params.yaml (model, train, "
            "data), data/prepared, the training code or the precision differ between them "
            "(train.precision auto picks by GPU kind); make them the same on every worker"
        ), output[-2000:]
        assert "train: epoch" not in output
    assert not (repos[0] / "models").exists()
    assert json.loads(kept.read_text())["epochs_done"] == 3


@pytest.mark.slow
def test_a_dead_worker_ends_the_run_with_a_clear_error(prepared_repo, tmp_path):
    repos = worker_repos(prepared_repo, tmp_path)
    with Background(tmp_path) as background:
        chief, worker = start_workers(background, repos, epochs=50)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (repos[0] / ".train-state/state.json").exists():
            time.sleep(0.2)
        # Started training (the model built, its broadcasts done), else a kill here would
        # test the setup, and a failure would read "still running" instead of why.
        assert (repos[0] / ".train-state/state.json").exists() and chief.poll() is None, (
            background.output(chief)
        )
        time.sleep(2)  # inside the first epochs
        worker.kill()
        [output] = background.wait(chief, timeout=240)
    assert chief.returncode == 1
    # The stage's own last word. The failed all-reduce can leave TensorFlow's ThreadPool
    # (cross_device_ops.batch_reduce) unclosed; Python may finalise it at exit after its pipe
    # is gone ("Exception ignored in: Pool.__del__ ... Bad file descriptor", once in CI).
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors, output[-2000:]
    assert errors[-1].startswith("error: a training worker stopped or became unreachable"), output[
        -2000:
    ]


def test_a_diverged_training_stops_at_the_epoch_and_keeps_the_last_good_state(
    raw_params, mlflow_store, tmp_path, monkeypatch
):
    """A loss of NaN or inf leaves NaN weights: the stage stops there with the fix, and
    neither the model nor the recovery checkpoint of that epoch is written."""
    from pipeline import tracking
    from pipeline.train import run_training

    params, meta, train, empty = tiny_training(raw_params, epochs=3)
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, learning_rate=1e30, lr_schedule="constant")
    )
    monkeypatch.chdir(tmp_path)
    tracking.connect(tmp_path)
    with pytest.raises(PipelineError, match=r"the training diverged: its loss was (nan|inf) in "
                       r"epoch 1; lower train.learning_rate \(or warm up to it: train.lr_schedule "
                       r"onecycle\) \(the recovery state keeps epoch 0"):  # fmt: skip
        run_training(params, meta, train, empty)
    assert not Path("models/model.keras").exists()
    state = json.loads(Path(".train-state/state.json").read_text())
    assert state["epochs_done"] == 0 and state["history"] == []


def test_divergence_advice_names_warm_up_only_where_the_schedule_has_one(raw_params):
    from pipeline.progress import divergence_remedy

    train = parse_params(raw_params).train
    onecycle = dataclasses.replace(train, lr_schedule="onecycle")
    assert divergence_remedy(onecycle) == "lower train.learning_rate or lengthen train.warmup"
    for schedule in ("constant", "cosine"):
        remedy = divergence_remedy(dataclasses.replace(train, lr_schedule=schedule))
        assert "train.warmup" not in remedy and "train.lr_schedule onecycle" in remedy


def test_tf_config_is_read_into_the_workers_place_and_a_wrong_index_is_one_line(monkeypatch):
    from pipeline.distributed import Cluster

    def cluster(task: dict, **members) -> Cluster:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": members, "task": task}))
        return Cluster.from_environment()

    two = {"worker": ["a:1", "b:1"]}
    assert cluster({"type": "worker", "index": 1}, **two) == Cluster(2, 1, False)
    assert cluster({"type": "worker", "index": 0}, **two) == Cluster(2, 0, True)
    assert cluster({"type": "worker", "index": 0}, chief=["c:1"], **two) == Cluster(3, 1, False)
    assert cluster({"type": "worker", "index": 1}, chief=["c:1"], **two).address == "b:1"
    assert cluster({"type": "chief", "index": 0}, chief=["c:1"], **two).address == "c:1"
    with pytest.raises(PipelineError, match=r"task index 5 is not one of the 2 workers listed"):
        cluster({"type": "worker", "index": 5}, **two)
    with pytest.raises(PipelineError, match="TF_CONFIG is not a cluster description"):
        cluster({"type": "worker"}, **two)
    with pytest.raises(PipelineError) as error:  # not "one of the 0 chiefs (0 to -1)"
        cluster({"type": "chief", "index": 0}, **two)
    assert str(error.value) == (
        "TF_CONFIG's task is a chief but its cluster lists no chief: give this task type "
        '"worker" (worker 0 is then the chief), or list it under cluster.chief'
    )
    # Shapes TensorFlow would stop on with a traceback, or count wrongly (a string's letters).
    with pytest.raises(PipelineError, match=r'cluster.worker must be a list of "host:port" '):
        cluster({"type": "worker", "index": 0}, worker="a:1")
    with pytest.raises(PipelineError, match=r"lists 2 chiefs; there is at most one"):
        cluster({"type": "chief", "index": 0}, chief=["c:1", "d:1"], **two)
    with pytest.raises(PipelineError, match=r"lists a 'ps' job; this training .* takes only"):
        cluster({"type": "worker", "index": 0}, ps=["p:1"], **two)
    # TensorFlow's evaluator runs beside the training, not in it: not a worker.
    assert cluster({"type": "worker", "index": 1}, evaluator=["e:1"], **two) == Cluster(2, 1, False)
    monkeypatch.delenv("TF_CONFIG")
    assert Cluster.from_environment() == Cluster()


def test_a_mixed_float16_training_resumes_from_its_checkpoint(
    raw_params, mlflow_store, tmp_path, monkeypatch, capsys
):
    """The recovery checkpoint holds pipeline.optimizer's loss-scale optimizer: a stopped
    mixed_float16 training reloads it and goes on from the next epoch in the same run.
    On a CPU without float16 instructions each attempt warns that it is emulated."""
    import tensorflow as tf

    from pipeline import device, tracking
    from pipeline.errors import end_mlflow_run
    from pipeline.progress import EpochRecorder
    from pipeline.train import run_training

    params, meta, train, empty = tiny_training(raw_params, epochs=2)
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, precision="mixed_float16")
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(device, "cpu_flags", lambda: {"fpu", "avx2"})  # a Zen 3
    listed = tf.config.list_physical_devices
    no_gpu = lambda kind=None: [] if kind == "GPU" else listed(kind)  # noqa: E731
    monkeypatch.setattr(tf.config, "list_physical_devices", no_gpu)  # the CPU path, even on GPUs
    tracking.connect(tmp_path)
    original = EpochRecorder.end_epoch

    def stop_after_the_first(self, model, epoch, *args):
        original(self, model, epoch, *args)
        if epoch == 0:
            raise KeyboardInterrupt  # as a Ctrl-C after the epoch's checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(EpochRecorder, "end_epoch", stop_after_the_first)
        with pytest.raises(KeyboardInterrupt):
            run_training(params, meta, train, empty)
    end_mlflow_run("KILLED")  # as the stage's interrupt handler does
    assert json.loads(Path(".train-state/state.json").read_text())["epochs_done"] == 1
    try:
        run_training(params, meta, train, empty)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    summary = json.loads(Path("metrics/train.json").read_text())
    assert summary["epochs"] == 2 and summary["precision"] == "mixed_float16", summary
    runs = mlflow.search_runs(experiment_names=["cifar10-resnet"], output_format="list")
    assert len(runs) == 1
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    warned = "train: warning: train.precision mixed_float16 is emulated by TensorFlow's own"
    assert capsys.readouterr().err.count(warned) == 2


def test_agreeing_on_overflow_poisons_every_gradient_and_copes_with_none_and_sparse():
    import tensorflow as tf

    from pipeline.distributed import agree_on_overflow

    def run(gradients):
        return tf.distribute.get_strategy().run(agree_on_overflow, args=(gradients,))

    sparse = tf.IndexedSlices(tf.constant([[1.0, 2.0]]), tf.constant([1]), tf.constant([3, 2]))
    poisoned = run([None, sparse, tf.constant([1.0, float("inf")])])
    assert poisoned[0] is None and poisoned[1].shape == (3, 2)  # made dense
    assert all(np.isnan(g.numpy()).all() for g in poisoned[1:])
    kept = run([tf.constant([1.0, 2.0]), None])
    np.testing.assert_array_equal(kept[0].numpy(), [1.0, 2.0])
    assert kept[1] is None and run([None]) == [None]


def test_a_resumed_training_draws_the_dropout_masks_an_unbroken_one_draws(
    raw_params, mlflow_store, tmp_path, monkeypatch
):
    """Keras's checkpoint leaves out dropout's random stream: restored from the recovery
    state, a training stopped after epoch 1 and resumed ends where an unbroken one does."""
    import csv

    from pipeline import tracking
    from pipeline.errors import end_mlflow_run
    from pipeline.progress import EpochRecorder
    from pipeline.train import run_training

    params, meta, train, empty = tiny_training(raw_params, epochs=3)
    params = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, dropout=0.5),
        train=dataclasses.replace(params.train, deterministic=True),
    )  # fmt: skip
    original = EpochRecorder.end_epoch

    def stop_after_the_first(self, model, epoch, *args):
        original(self, model, epoch, *args)
        if epoch == 0:
            raise KeyboardInterrupt  # as a Ctrl-C after the epoch's checkpoint

    def trained(folder: Path, stopped: bool) -> tuple[list, list]:
        folder.mkdir()
        monkeypatch.chdir(folder)
        tracking.connect(folder)
        if stopped:
            with monkeypatch.context() as patch:
                patch.setattr(EpochRecorder, "end_epoch", stop_after_the_first)
                with pytest.raises(KeyboardInterrupt):
                    run_training(params, meta, train, empty)
            end_mlflow_run("KILLED")
        run_training(params, meta, train, empty)
        with open("metrics/history.csv") as f:  # images_per_second differs: the clock's
            losses = [(row["loss"], row["accuracy"]) for row in csv.DictReader(f)]
        weights = keras.models.load_model("models/model.keras").get_weights()
        return losses, weights

    unbroken, unbroken_weights = trained(tmp_path / "unbroken", stopped=False)
    resumed, resumed_weights = trained(tmp_path / "resumed", stopped=True)
    assert resumed == unbroken  # every epoch's loss and accuracy
    assert all(np.array_equal(a, b) for a, b in zip(unbroken_weights, resumed_weights, strict=True))
