"""The network: a pre-activation ResNet that takes raw uint8 pixels.

With the defaults in params.yaml (stem 32, stages 32/64/128/256 of 3 units,
10 classes) it is the pre-activation ResNet of the well-known Keras CIFAR-10
tutorial, 4,374,538 parameters (trainable + BatchNorm moving statistics),
checked by tests/test_model.py:

    stem     Conv3x3(32)                                      (batch, 32, 32, 32)
    stage 1  3 x [BN-ReLU-Conv3x3(32)-BN-ReLU-Conv3x3(32)] + x  (batch, 32, 32, 32)
    stage 2  3 units of 64, the first pools 2x2               (batch, 16, 16, 64)
    stage 3  3 units of 128, the first pools 2x2              (batch, 8, 8, 128)
    stage 4  3 units of 256, the first pools 2x2              (batch, 4, 4, 256)
    head     BN-ReLU-Dropout-GlobalAvgPool-Dense(softmax)     (batch, 10)

In the first unit of stages 2+, the main path max-pools the unit's input
2x2 before its first BN-ReLU-Conv (so both convs run at the new, halved
resolution) and the shortcut is a 1x1 stride-2 conv of the unit's input.
Every conv keeps its bias (Keras' default), as the tutorial's do.

The saved model carries its own input normalization, so serving code feeds it
the same uint8 images the dataset stores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from pipeline.config import ModelParams
from pipeline.errors import PipelineError

NORMALIZE_LAYER = "normalize"  # the input normalization, not part of the network proper


def build_model(
    params: ModelParams,
    *,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> keras.Model:
    """Build the pre-activation ResNet for (image_size, image_size, 3) uint8 images.

    `mean` and `std` are the per-channel statistics of the training pixels on
    their 0-255 scale; the model normalizes with them, so it takes raw pixels.
    The output is float32 class probabilities, (batch, num_classes).
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got {mean}, {std}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive per channel, got {std}")

    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="image")
    # (batch, H, W, 3) uint8 -> float32 ~N(0, 1) per channel. The layer casts to its
    # dtype first; it is pinned to float32 so that, under a mixed-precision policy,
    # the pixels are normalized before any rounding to 16 bits. Mean and variance are
    # constants in its config: saved with the model, never trained.
    x = keras.layers.Normalization(
        mean=list(mean),
        variance=[s**2 for s in std],
        dtype="float32",
        name=NORMALIZE_LAYER,
    )(inputs)

    x = _conv(params.stem_filters, 3, name="stem_conv")(x)  # (batch, H, W, stem_filters)

    for stage, filters in enumerate(params.filters, start=1):
        for unit in range(1, params.units_per_stage + 1):
            downsample = stage > 1 and unit == 1
            x = _residual_unit(x, filters, downsample=downsample, name=f"stage{stage}_unit{unit}")
    # (batch, H / 2**(stages-1), W / 2**(stages-1), filters[-1]), e.g. (batch, 4, 4, 256)

    # Pre-activation units leave their sum un-normalized, so the head applies the
    # last BN-ReLU before pooling.
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.ReLU(name="head_relu")(x)
    x = keras.layers.Dropout(params.dropout, name="head_dropout")(x)
    # Global, not a fixed AvgPool(4), so any image_size works; at 32x32 it is the same.
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)  # (batch, filters[-1])
    # Softmax in float32 even under mixed precision: in float16/bfloat16 small
    # probabilities round to 0 (and the sum drifts from 1), so the cross-entropy's
    # log(p) would hit -inf; float32 keeps the loss and its gradient finite.
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="probabilities"
    )(x)  # (batch, num_classes) float32
    return keras.Model(inputs, outputs, name="preact_resnet")


def _conv(filters: int, kernel_size: int, *, name: str, strides: int = 1) -> keras.layers.Conv2D:
    # He initialization suits the ReLUs in front of every conv.
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        kernel_initializer="he_normal",
        name=name,
    )


def _residual_unit(
    x: keras.KerasTensor, filters: int, *, downsample: bool, name: str
) -> keras.KerasTensor:
    """One pre-activation unit: BN-ReLU-Conv3x3-BN-ReLU-Conv3x3, added to its input.

    With `downsample`, the main path max-pools 2x2 first and the shortcut is a
    1x1 stride-2 conv, so both come out at half the resolution with `filters`
    channels. "same" padding makes both round odd sizes up alike.
    """
    shortcut = x  # (batch, h, w, c)
    if downsample:
        shortcut = _conv(filters, 1, strides=2, name=f"{name}_shortcut")(x)  # (batch, h/2, w/2, f)
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"{name}_pool")(x)
    elif x.shape[-1] != filters:
        # Only when the stem's width differs from the first stage's.
        shortcut = _conv(filters, 1, name=f"{name}_shortcut")(x)

    x = keras.layers.BatchNormalization(name=f"{name}_bn1")(x)
    x = keras.layers.ReLU(name=f"{name}_relu1")(x)
    x = _conv(filters, 3, name=f"{name}_conv1")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn2")(x)
    x = keras.layers.ReLU(name=f"{name}_relu2")(x)
    x = _conv(filters, 3, name=f"{name}_conv2")(x)
    return keras.layers.Add(name=f"{name}_add")([shortcut, x])  # (batch, h', w', filters)


def count_params_without_normalization(model: keras.Model) -> int:
    """Parameters of the network proper, BatchNorm moving statistics included.

    Leaves out the input normalization's statistics (none stored as weights
    today, as it keeps them as constants), so the count is the one the ResNet
    literature and the Keras tutorial quote.
    """
    normalize = model.get_layer(NORMALIZE_LAYER)
    return int(
        sum(np.prod(w.shape) for w in model.weights)
        - sum(np.prod(w.shape) for w in normalize.weights)
    )


# --- the saved model -----------------------------------------------------------------------------


def load_saved_model(path: Path) -> keras.Model:
    """The .keras file train saved. A missing file raises FileNotFoundError (callers say
    where one comes from); a truncated or foreign one is a one-line PipelineError."""
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # a truncated or foreign file: Keras raises many types
        first = str(error).splitlines()[0] if str(error) else ""
        raise PipelineError(
            f"{path}: cannot load the model ({type(error).__name__}: {first}); "
            "it should be the .keras file train writes: `dvc repro train` or `dvc pull`"
        ) from None


def read_model_info(path: Path, keys: Sequence[str]) -> dict:
    """The model_info.json train writes beside the model, with these keys. A missing file
    raises FileNotFoundError (callers say where one comes from); another file, a one-line
    PipelineError."""
    try:
        info = json.loads(path.read_text())
        for key in keys:
            info[key]  # noqa: B018 (a KeyError names the missing key)
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError) as error:  # not JSON, or not train's
        raise PipelineError(
            f"{path}: not the model info train writes ({type(error).__name__}: {error}); "
            "run `dvc repro train`"
        ) from None
    return info


# --- inference -----------------------------------------------------------------------------------


def predict_batches(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, classes) probabilities of (N, H, W, 3) images, `batch_size` images per forward pass.

    Batch by batch through `predict_on_batch`, not `model.predict`: predict
    feeds the images through tf.data, whose autotuning halved its speed in 7
    of 12 calls on 2 AVX2 cores (97.5 img/s, against 155-192 batch by batch,
    with the same outputs bit for bit; BENCHMARKS.md, "Inference").
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not len(images):
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.concatenate(
        [
            np.asarray(model.predict_on_batch(images[start : start + batch_size]))
            for start in range(0, len(images), batch_size)
        ]
    )


# --- the training loss --------------------------------------------------------------------------


def crossentropy(labels, probabilities, label_smoothing: float = 0.0):
    """Per-image cross-entropy (batch,) of probabilities against int labels (batch,).

    With label smoothing e the target is (1 - e) on the true class plus e spread
    evenly over all classes (Keras' CategoricalCrossentropy(label_smoothing=e)
    on one-hot labels), without building the one-hot tensor.
    """
    ops = keras.ops
    # Clipped like Keras' own cross-entropy: p = 0 would give log(0) = -inf.
    log_p = ops.log(ops.clip(probabilities, 1e-7, 1.0 - 1e-7))  # (batch, classes)
    labels = ops.reshape(ops.cast(labels, "int32"), (-1, 1))
    nll = -ops.take_along_axis(log_p, labels, axis=-1)[:, 0]  # (batch,)
    if not label_smoothing:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * ops.mean(log_p, axis=-1)


@keras.saving.register_keras_serializable(package="pipeline")
class SmoothedCrossentropy(keras.losses.Loss):
    """`crossentropy` with label smoothing as a Keras loss (saved with training checkpoints)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        return crossentropy(y_true, y_pred, self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
