"""Sharpness-aware minimization (pipeline/sam.py): the step it takes, against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.config import ParamsError, parse_params
from pipeline.sam import sharpness_aware

X = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
Y = np.random.default_rng(1).normal(size=(8, 1)).astype("float32")


def linear_model():
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros"),
    ])  # fmt: skip
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def mse_gradient(w, b):
    residual = X @ w + b - Y
    return 2 * X.T @ residual / len(X), 2 * residual.mean(0)


@pytest.mark.parametrize(("from_epoch", "initial_epoch"), [(1, 0), (2, 0), (2, 1)])
def test_a_sam_step_applies_the_gradient_at_the_sharpest_neighbour(from_epoch, initial_epoch):
    """w <- w - lr * grad(w + rho * g / ||g||), g = grad(w); before from_epoch, plain SGD.
    A resumed fit (initial_epoch) whose first epoch is from_epoch takes SAM steps at once."""
    model = linear_model()
    history = model.fit(
        X, Y, batch_size=8, epochs=initial_epoch + 1, initial_epoch=initial_epoch, verbose=0,
        callbacks=[sharpness_aware(model, 0.05, from_epoch)],
    )  # fmt: skip
    w, b = np.ones((3, 1), np.float32), np.zeros(1, np.float32)
    gw, gb = mse_gradient(w, b)
    norm = np.sqrt((gw**2).sum() + (gb**2).sum())
    if initial_epoch + 1 >= from_epoch:
        gw, gb = mse_gradient(w + 0.05 * gw / norm, b + 0.05 * gb / norm)
    np.testing.assert_allclose(model.layers[0].kernel.numpy(), w - 0.1 * gw, atol=1e-6)
    np.testing.assert_allclose(model.layers[0].bias.numpy(), b - 0.1 * gb, atol=1e-6)
    # The loss reported is the first pass's, at the weights before the step.
    assert history.history["loss"][0] == pytest.approx(float(((X @ w - Y) ** 2).mean()))


def test_sam_leaves_batchnorm_statistics_as_the_first_pass_set_them():
    def model_with_bn():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([
            keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ])  # fmt: skip
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return model

    plain, sharp = model_with_bn(), model_with_bn()
    plain.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    sharp.fit(X, Y, batch_size=8, epochs=1, verbose=0, callbacks=[sharpness_aware(sharp, 0.5, 1)])
    bn_plain, bn_sharp = plain.layers[1], sharp.layers[1]
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_array_equal(
            getattr(bn_sharp, name).numpy(), getattr(bn_plain, name).numpy(), err_msg=name
        )
    assert not np.allclose(sharp.layers[0].kernel.numpy(), plain.layers[0].kernel.numpy())


def test_an_overflowed_gradient_under_mixed_float16_is_skipped_not_spread_as_nan():
    """Dynamic loss scaling overflows now and then by design (it grows until it does): the
    step is skipped and the scale halved, as in a plain step, and the weights stay finite."""
    from keras.src.optimizers.loss_scale_optimizer import LossScaleOptimizer

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((3,)), keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, dtype="float32"),
        ])  # fmt: skip
        optimizer = LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=2.0**40)
        model.compile(optimizer=optimizer, loss="mse")
        before = [w.numpy() for w in model.trainable_weights]
        model.fit(X * 100, Y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[sharpness_aware(model, 0.05, 1)])  # fmt: skip
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert float(optimizer.dynamic_scale) == 2.0**39  # overflowed: halved, step skipped
    for old, new in zip(before, model.trainable_weights, strict=True):
        np.testing.assert_array_equal(new.numpy(), old)


def test_sam_params_are_checked(raw_params):
    raw_params["train"].update(sam_rho=0.05, sam_from_epoch=51)
    with pytest.raises(ParamsError) as error:
        parse_params(raw_params)
    assert str(error.value) == (
        "train.sam_from_epoch: must be at most train.epochs (50) with train.sam_rho above 0: "
        "SAM would never run, got 51"
    )
    raw_params["train"].update(sam_rho=0.0)  # off: where it would start does not matter
    parse_params(raw_params)
    raw_params["train"].update(sam_rho=-0.1)
    with pytest.raises(ParamsError, match="train.sam_rho"):
        parse_params(raw_params)


def test_the_train_stage_switches_sam_on_at_its_epoch(
    raw_params, mlflow_store, monkeypatch, capsys
):
    """The train stage gives fit the switch for its epoch, says so, and logs both params."""
    import pipeline.sam as sam
    from pipeline import tracking
    from pipeline.train import run_training
    from tests.test_train import tiny_training

    raw_params["train"].update(sam_rho=0.05, sam_from_epoch=2)
    params, meta, train, empty = tiny_training(raw_params, epochs=2)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tracking.connect(Path.cwd())  # mlflow_store's, in tmp_path
    calls, sam_on = [], []  # the switch's arguments; whether SAM's step is in, per epoch
    original = sam.sharpness_aware

    def spied(model, rho, from_epoch):
        calls.append((rho, from_epoch))
        switch = original(model, rho, from_epoch)
        switch_on_epoch_begin = switch.on_epoch_begin

        def on_epoch_begin(epoch, logs=None):
            switch_on_epoch_begin(epoch, logs)
            sam_on.append("train_step" in vars(model))

        switch.on_epoch_begin = on_epoch_begin
        return switch

    monkeypatch.setattr(sam, "sharpness_aware", spied)
    run_training(params, meta, train, empty)
    assert calls == [(0.05, 2)]
    assert sam_on == [False, True]  # Keras's own step in epoch 1, SAM's from epoch 2
    assert "; SAM rho 0.05 from epoch 2; MLflow run " in capsys.readouterr().out
    info = json.loads(Path("models/model_info.json").read_text())
    logged = mlflow_store.get_run(info["run_id"]).data.params
    assert (logged["train.sam_rho"], logged["train.sam_from_epoch"]) == ("0.05", "2")


def test_sam_refuses_more_than_one_replica_before_waiting_for_workers(raw_params, monkeypatch):
    """Before make_strategy: with TF_CONFIG it waits for every worker, so a refusal after it
    would come only once all were started."""
    import pipeline.distributed as distributed
    import pipeline.train as train_module
    from pipeline.device import Device
    from pipeline.distributed import Cluster
    from pipeline.errors import PipelineError
    from tests.test_train import tiny_training

    raw_params["train"].update(sam_rho=0.05)
    params, meta, train, empty = tiny_training(raw_params)

    def never(*args):
        raise AssertionError("make_strategy reached: the workers would be waited for first")

    monkeypatch.setattr(distributed, "make_strategy", never)
    two_workers = Cluster(workers=2, index=0, chief=True)
    two_gpus = Device("GPU", 2, "mixed_bfloat16", jit_compile=True)
    for cluster, device in ((two_workers, None), (None, two_gpus)):
        if device is not None:
            monkeypatch.setattr(train_module, "resolve_device", lambda cfg, d=device: d)
        with pytest.raises(PipelineError) as error:
            train_module.run_training(params, meta, train, empty, cluster=cluster)
        assert str(error.value).startswith(
            "train.sam_rho: SAM moves the weights in place, on one device; this training "
            "has 2 replicas"
        )
