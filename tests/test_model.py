"""The ResNet of pipeline/model.py: its size, its input contract, saving, mixed precision."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.config import ModelParams, load_params
from pipeline.model import (
    NORMALIZE_LAYER,
    SmoothedCrossentropy,
    build_model,
    count_params_without_normalization,
    crossentropy,
    predict_batches,
)

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"

# Whole numbers, so an image "equal to the mean" is exact in uint8.
MEAN = (125.0, 123.0, 114.0)
STD = (63.0, 62.0, 66.0)

# The Keras tutorial's pre-activation ResNet on CIFAR-10: trainable + BN moving stats.
TUTORIAL_PARAM_COUNT = 4_374_538


@pytest.fixture(scope="module")
def model_params() -> ModelParams:
    return load_params(PARAMS_FILE).model


@pytest.fixture
def tiny_params(model_params: ModelParams) -> ModelParams:
    return dataclasses.replace(model_params, stem_filters=8, filters=(8, 16), units_per_stage=1)


@pytest.fixture(scope="module")
def default_model(model_params: ModelParams) -> keras.Model:
    # Built once: the full-size model takes a few seconds on CPU.
    return build_model(model_params, num_classes=10, image_size=32, mean=MEAN, std=STD)


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def training_loss(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    probabilities = model(images, training=True)
    losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    return float(keras.ops.mean(losses))


def test_default_model_matches_tutorial_param_count(default_model):
    assert count_params_without_normalization(default_model) == TUTORIAL_PARAM_COUNT


def test_default_model_shapes_follow_the_tutorial(default_model):
    assert default_model.input.shape == (None, 32, 32, 3)
    assert default_model.input.dtype == "uint8"
    # First unit of stage 2 pools 32x32 -> 16x16; stage 4 ends at 4x4, where the
    # global average pool equals the tutorial's AvgPool(4).
    assert default_model.get_layer("stage2_unit1_pool").output.shape == (None, 16, 16, 32)
    assert default_model.get_layer("stage4_unit3_add").output.shape == (None, 4, 4, 256)
    assert default_model.output.shape == (None, 10)


def test_default_model_outputs_probabilities(default_model):
    probabilities = default_model.predict(random_images(4, 32), verbose=0)
    assert probabilities.shape == (4, 10)
    assert probabilities.dtype == np.float32
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_shrunk_model_adapts_to_classes_and_image_size(tiny_params):
    model = build_model(tiny_params, num_classes=3, image_size=16, mean=MEAN, std=STD)
    assert model.input.shape == (None, 16, 16, 3)
    assert model.get_layer("stage2_unit1_add").output.shape == (None, 8, 8, 16)
    probabilities = model.predict(random_images(5, 16), verbose=0)
    assert probabilities.shape == (5, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_odd_image_size_pools_and_projects_alike(tiny_params):
    # A 15x15 image: pooled main path and stride-2 shortcut must both give 8x8.
    model = build_model(tiny_params, num_classes=3, image_size=15, mean=MEAN, std=STD)
    assert model.get_layer("stage2_unit1_add").output.shape == (None, 8, 8, 16)


def test_stem_wider_than_first_stage_gets_a_projection(tiny_params):
    params = dataclasses.replace(tiny_params, stem_filters=12)
    model = build_model(params, num_classes=3, image_size=16, mean=MEAN, std=STD)
    assert model.get_layer("stage1_unit1_shortcut").output.shape == (None, 16, 16, 8)


def test_normalization_uses_given_mean_and_std(tiny_params):
    model = build_model(tiny_params, num_classes=3, image_size=16, mean=MEAN, std=STD)
    normalize = model.get_layer(NORMALIZE_LAYER)
    assert normalize.trainable_weights == []
    normalized = keras.Model(model.input, normalize.output)

    at_mean = np.broadcast_to(np.array(MEAN, dtype=np.uint8), (1, 16, 16, 3))
    one_std_up = np.broadcast_to(np.array(MEAN) + np.array(STD), (1, 16, 16, 3)).astype(np.uint8)
    np.testing.assert_allclose(normalized.predict(at_mean, verbose=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(normalized.predict(one_std_up, verbose=0), 1.0, atol=1e-6)


def test_rejects_statistics_that_are_not_per_channel(tiny_params):
    with pytest.raises(ValueError, match="one value per RGB channel"):
        build_model(tiny_params, num_classes=3, image_size=16, mean=(0.5,), std=(0.2,))


def test_saved_model_reloads_with_identical_predictions(tiny_params, tmp_path):
    model = build_model(tiny_params, num_classes=3, image_size=16, mean=MEAN, std=STD)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)

    images = random_images(8, 16)
    np.testing.assert_array_equal(
        reloaded.predict(images, verbose=0), model.predict(images, verbose=0)
    )
    assert reloaded.input.dtype == "uint8"
    reloaded_normalize = reloaded.get_layer(NORMALIZE_LAYER)
    np.testing.assert_allclose(reloaded_normalize.mean.numpy().ravel(), MEAN)
    np.testing.assert_allclose(reloaded_normalize.variance.numpy().ravel(), np.square(STD))


def test_predict_batches_matches_predict_in_order_for_any_batch_size(tiny_params):
    model = build_model(tiny_params, num_classes=3, image_size=16, mean=MEAN, std=STD)
    images = random_images(7, 16)
    expected = model.predict(images, verbose=0)
    for batch_size in (1, 3, 7, 50):  # 3: a last batch of one image; 50: one short batch
        np.testing.assert_allclose(predict_batches(model, images, batch_size), expected, atol=1e-6)
    assert predict_batches(model, images[:0], 3).shape == (0, 3)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        predict_batches(model, images, 0)


def test_output_is_float32_under_mixed_precision(tiny_params, mixed_bfloat16):
    model = build_model(tiny_params, num_classes=3, image_size=16, mean=MEAN, std=STD)
    # The body does run in bfloat16 ...
    assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
    # ... but the pixels are normalized and the probabilities computed in float32.
    assert model.get_layer(NORMALIZE_LAYER).output.dtype == "float32"
    assert model.output.dtype == "float32"
    probabilities = model.predict(random_images(4, 16), verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_loss_falls_when_training_on_separable_images(tiny_params):
    keras.utils.set_random_seed(0)
    # 64 images, label 1 for bright ones: separable by brightness alone.
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 32)
    low = np.where(labels == 1, 150, 0)[:, None, None, None]
    images = (low + rng.integers(0, 106, size=(64, 16, 16, 3))).astype(np.uint8)

    params = dataclasses.replace(tiny_params, dropout=0.0)
    model = build_model(params, num_classes=2, image_size=16, mean=MEAN, std=STD)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        jit_compile=False,
    )
    # Training-mode loss of the whole set before and after, with the same batch
    # statistics either side, so the comparison measures the weights alone.
    loss_before = training_loss(model, images, labels)
    model.fit(images, labels, batch_size=16, epochs=5, shuffle=True, verbose=0)  # 20 steps
    loss_after = training_loss(model, images, labels)
    # Seeded run: 0.94 -> 0.30 on CPU; demand a clear fall, not noise.
    assert loss_after < 0.7 * loss_before


# --- the training loss --------------------------------------------------------------------------


def test_crossentropy_without_smoothing_is_keras_sparse_crossentropy():
    rng = np.random.default_rng(1)
    probabilities = keras.ops.softmax(rng.normal(size=(6, 4)).astype("float32"))
    labels = np.array([0, 3, 1, 2, 2, 0])
    np.testing.assert_allclose(
        crossentropy(labels, probabilities),
        keras.losses.sparse_categorical_crossentropy(labels, probabilities),
        rtol=1e-6,
    )


def test_smoothed_crossentropy_matches_keras_on_one_hot_targets():
    rng = np.random.default_rng(2)
    probabilities = keras.ops.softmax(rng.normal(size=(6, 4)).astype("float32"))
    labels = np.array([0, 3, 1, 2, 2, 0])
    keras_loss = keras.losses.CategoricalCrossentropy(label_smoothing=0.2, reduction=None)
    expected = keras_loss(np.eye(4)[labels], probabilities)
    np.testing.assert_allclose(crossentropy(labels, probabilities, 0.2), expected, rtol=1e-5)
    # Smoothing changes it: a confident right answer now costs something.
    assert float(keras.ops.mean(crossentropy(labels, probabilities, 0.2))) != pytest.approx(
        float(keras.ops.mean(crossentropy(labels, probabilities)))
    )


def test_model_compiled_with_smoothed_loss_reloads_for_resume(tiny_params, tmp_path):
    model = build_model(tiny_params, num_classes=3, image_size=16, mean=MEAN, std=STD)
    model.compile(optimizer="sgd", loss=SmoothedCrossentropy(0.1), jit_compile=False)
    labels = np.array([0, 1, 2, 1])
    model.fit(random_images(4, 16), labels, epochs=1, verbose=0)
    model.save(tmp_path / "checkpoint.keras")
    reloaded = keras.saving.load_model(tmp_path / "checkpoint.keras")
    assert isinstance(reloaded.loss, SmoothedCrossentropy)
    assert reloaded.loss.label_smoothing == 0.1
