"""The input pipeline: prepared uint8 arrays -> batched, augmented tf.data datasets.

Images stay uint8 all the way to the model (a quarter of float32's bytes to
copy); the model casts and normalises them itself. Training batches are
augmented on the fly with one projective-transform op per batch (rotation,
shift and horizontal flip folded into one matrix per image), the transform of
the tutorial's `ImageDataGenerator`, vectorised; then optionally Cutout.

Every random choice is stateless and derived from (seed, epoch, step): the
shuffle order of epoch `e` and the augmentation of its batch `s` depend on
nothing else, so a run resumed at epoch `e` sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from pipeline.config import AugmentParams
from pipeline.prepared import Split


def augment_transforms(
    batch: int, image_size: int, augment: AugmentParams, seed: tf.Tensor
) -> tf.Tensor:
    """Per-image projective transforms (batch, 8) mapping output pixels to input pixels.

    Each image gets a rotation in [-rotation, rotation] degrees about its
    centre, a shift in [-shift, shift] * image_size pixels on each axis (with
    nearest interpolation a whole number of pixels, each equally likely) and,
    with probability 1/2, a horizontal flip.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    angle = tf.random.stateless_uniform([batch], seeds[0], -augment.rotation, augment.rotation) * (
        math.pi / 180.0
    )
    max_shift = augment.shift * image_size  # pixels
    if augment.interpolation == "nearest":
        # Whole pixels, every offset in -k..k equally likely, as pad-and-crop draws them
        # (rounding a uniform draw would give the two largest half the others' share).
        k = round(max_shift)  # a whole number within 1e-3 (pipeline.config checks)
        shift_x, shift_y = (
            tf.cast(tf.random.stateless_uniform([batch], s, -k, k + 1, tf.int32), tf.float32)
            for s in (seeds[1], seeds[2])
        )
    else:
        shift_x = tf.random.stateless_uniform([batch], seeds[1], -max_shift, max_shift)
        shift_y = tf.random.stateless_uniform([batch], seeds[2], -max_shift, max_shift)
    if augment.flip:
        flip = tf.where(tf.random.stateless_uniform([batch], seeds[3]) < 0.5, -1.0, 1.0)
    else:
        flip = tf.ones([batch])
    cos, sin = tf.cos(angle), tf.sin(angle)
    centre = (image_size - 1) / 2.0
    # Output pixel (x, y) -> undo the shift, rotate back about the centre, mirror:
    #   x_in = flip * ( cos*(x - cx - dx) + sin*(y - cy - dy)) + cx
    #   y_in =        (-sin*(x - cx - dx) + cos*(y - cy - dy)) + cy
    u0, v0 = centre + shift_x, centre + shift_y
    zeros = tf.zeros([batch])
    return tf.stack(
        [
            flip * cos,
            flip * sin,
            flip * (-cos * u0 - sin * v0) + centre,
            -sin,
            cos,
            sin * u0 - cos * v0 + centre,
            zeros,
            zeros,
        ],
        axis=1,
    )


def cutout_mask(batch: tf.Tensor, image_size: int, side: int, seed: tf.Tensor) -> tf.Tensor:
    """(batch, H, W, 1) bool, True inside one side x side square per image.

    Each square's centre is uniform over the image, so squares near an edge are
    clipped by it (DeVries & Taylor's Cutout).
    """
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    shape = tf.stack([batch, 1, 1, 1])
    top = tf.random.stateless_uniform(shape, seeds[0], 0, image_size, tf.int32) - side // 2
    left = tf.random.stateless_uniform(shape, seeds[1], 0, image_size, tf.int32) - side // 2
    rows = tf.reshape(tf.range(image_size), [1, image_size, 1, 1])
    cols = tf.reshape(tf.range(image_size), [1, 1, image_size, 1])
    return (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)


def augment_batch(
    images: tf.Tensor,
    augment: AugmentParams,
    seed: tf.Tensor,
    fill_colour: np.ndarray | None = None,
) -> tf.Tensor:
    """Augment a (batch, H, W, 3) uint8 batch; uncovered edges filled as augment.fill says.

    fill_colour: (3,) uint8 RGB of the cutout squares (default black); the
    pipeline passes the training images' mean, which the model normalises to ~0.
    """
    batch, image_size = tf.shape(images)[0], images.shape[1]
    if augment.rotation or augment.shift or augment.flip:
        transforms = augment_transforms(batch, image_size, augment, seed)
        # In float32, rounded back: on uint8 the kernel truncates its bilinear blend,
        # darkening every augmented image by half a grey level on average. Nearest
        # copies pixels, so there it changes nothing; either way no slower here.
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.cast(images, tf.float32),
            transforms=transforms,
            output_shape=tf.shape(images)[1:3],
            fill_value=0.0,
            interpolation=augment.interpolation.upper(),
            # NEAREST repeats the edge pixel; REFLECT mirrors about the edge, the edge
            # pixel included (d c b a | a b c d), as numpy.pad's "symmetric".
            fill_mode=augment.fill.upper(),
        )
        images = tf.cast(tf.round(images), tf.uint8)  # a blend of 0-255 values stays in it
    if augment.cutout:
        # Its own stream (seed folded with 1), so turning cutout on leaves the
        # geometric augmentation of every batch as it was.
        mask = cutout_mask(
            batch, image_size, augment.cutout, tf.random.experimental.stateless_fold_in(seed, 1)
        )
        colour = np.zeros(3, np.uint8) if fill_colour is None else fill_colour
        images = tf.where(mask, tf.constant(colour, tf.uint8), images)
    return images


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Training steps per epoch: full batches only, so every step has the same shape."""
    return num_images // batch_size


def make_dataset(
    split: Split,
    batch_size: int,
    *,
    training: bool = False,
    augment: AugmentParams | None = None,
    seed: int = 0,
    first_epoch: int = 0,
    epochs: int = 1,
    shard: tuple[int, int] = (1, 0),
    replicas: int | None = None,
) -> tf.data.Dataset:
    """Batches of (images (batch, H, W, 3) uint8, labels (batch,) int32).

    training=False: the split once, in order, last batch partial.
    training=True: epochs `first_epoch` .. `epochs - 1` back to back, each
    in a fresh seeded order, full batches only, augmented if `augment` is set;
    feed it to `fit(..., initial_epoch=first_epoch, steps_per_epoch=...)`.

    shard=(count, index): this input pipeline is one of `count` (one per
    worker) that together make each global step. Every pipeline computes the
    same epoch order and takes every count-th image of it, so the workers see
    disjoint images and the same number of steps. `batch_size` is then one
    replica's share of the global batch and `replicas` the replicas in sync
    across all workers (default: one per pipeline); a pipeline feeding several
    local replicas yields one batch per replica per step.
    """
    images = tf.constant(split.images)  # (N, H, W, 3) uint8, shared by all epochs
    labels = tf.constant(split.labels)
    if not training:
        dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
        return dataset.prefetch(tf.data.AUTOTUNE)

    shards, shard_index = shard
    count = len(split.labels)
    global_batch = batch_size * (replicas or shards)
    per_epoch = steps_per_epoch(count, global_batch) * global_batch
    seed = np.int64(seed)
    mean_colour = None  # cutout's paint: the split's mean RGB, which the model normalises to ~0
    if augment is not None and augment.cutout:
        mean_colour = np.rint(split.images.reshape(-1, 3).mean(axis=0)).astype(np.uint8)

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count), seed=tf.stack([seed, epoch])
        )
        mine = order[:per_epoch][shard_index::shards]
        batches = tf.data.Dataset.from_tensor_slices(mine).batch(batch_size, drop_remainder=True)
        return batches.enumerate().map(lambda step, index: (epoch, step, index))

    def load(epoch: tf.Tensor, step: tf.Tensor, index: tf.Tensor):
        batch_images = tf.gather(images, index)
        if augment is not None:
            # A seed per (epoch, step, shard): the same batch is augmented the same way on resume.
            batch_seed = tf.stack([(seed * 1_000_003 + epoch) * 64 + shard_index, step])
            batch_images = augment_batch(batch_images, augment, batch_seed, mean_colour)
        return batch_images, tf.gather(labels, index)

    dataset = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_batches)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
