"""The input pipeline: augmentation geometry, seeded order, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import AugmentParams
from pipeline.data import (
    augment_batch,
    augment_transforms,
    cutout_mask,
    make_dataset,
    steps_per_epoch,
)
from pipeline.prepared import Split

SEED = tf.constant([7, 11], tf.int64)


def aug(
    rotation=0.0, shift=0.0, flip=False, interpolation="bilinear", fill="nearest", cutout=0
) -> AugmentParams:
    return AugmentParams(rotation, shift, flip, interpolation, fill, cutout)


def stripe_images(count: int = 16) -> np.ndarray:
    images = np.zeros((count, 32, 32, 3), np.uint8)
    images[:, 8:24, 4:10] = 255  # a bright bar left of centre
    return images


def test_no_augmentation_is_identity():
    images = stripe_images()
    out = augment_batch(tf.constant(images), aug(), SEED).numpy()
    np.testing.assert_array_equal(out, images)


def test_flip_mirrors_exactly_about_half_the_images():
    images = stripe_images(64)
    out = augment_batch(tf.constant(images), aug(flip=True), SEED).numpy()
    flipped = [bool((o == images[0][:, ::-1]).all()) for o in out]
    kept = [bool((o == images[0]).all()) for o in out]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each one or the other
    assert 16 < sum(flipped) < 48


def test_shift_stays_within_bound_and_keeps_uint8():
    images = stripe_images(64)
    out = augment_batch(tf.constant(images), aug(shift=5 / 32), SEED).numpy()
    assert out.dtype == np.uint8 and out.shape == images.shape
    # The bar's left edge (column 4) moves right by at most 5 pixels; a move left may
    # take it past column 0, so the offsets themselves are bounded both ways.
    left_edges = [np.flatnonzero(o[16, :, 0] > 127)[0] for o in out]
    assert max(left_edges) <= 4 + 5
    assert len(set(left_edges)) > 3  # and it does move
    offsets = augment_transforms(64, 32, aug(shift=5 / 32), SEED).numpy()[:, [2, 5]]
    assert np.abs(offsets).max() <= 5 and offsets.min() < -2 and offsets.max() > 2


def test_rotation_turns_about_the_centre():
    images = np.zeros((8, 33, 33, 3), np.uint8)
    images[:, 16, 2:31] = 200  # a 1-pixel bar through the centre
    out = augment_batch(tf.constant(images), aug(rotation=10.0), SEED).numpy()
    assert (out[:, 16, 16] > 100).all()  # the centre stays
    # The bar's ends, 14 px out, leave their row: by up to 2.4 px at 10 degrees.
    moved = [(o[16, 2:4, 0] < 100).any() or (o[16, 29:31, 0] < 100).any() for o in out]
    assert sum(moved) >= 3, moved  # 4 of 8 with this seed; none without rotation


def test_bilinear_shifts_blend_pixels_and_nearest_shifts_copy_them():
    images = stripe_images(64)  # only 0 and 255
    blended = augment_batch(tf.constant(images), aug(shift=5 / 32), SEED).numpy()
    copied = augment_batch(tf.constant(images), aug(shift=5 / 32, interpolation="nearest"), SEED)
    assert ((blended > 0) & (blended < 255)).any()  # fractional shifts mix the bar and the dark
    assert set(np.unique(copied.numpy())) == {0, 255}
    # Whole-pixel shifts: every image is the bar moved by an integer offset.
    left_edges = {int(np.flatnonzero(o[16, :, 0] == 255)[0]) for o in copied.numpy()}
    assert left_edges <= set(range(4 - 5, 4 + 6)) and len(left_edges) > 3


def test_nearest_shifts_draw_every_whole_pixel_offset_equally_often():
    """As pad-and-crop does: -2..2 pixels at shift 2/32, each about a fifth of the time."""
    transforms = augment_transforms(5000, 32, aug(shift=2 / 32, interpolation="nearest"), SEED)
    # No rotation or flip: output pixel x reads input pixel x - dx, so column 2 is -dx.
    for column in (2, 5):
        offsets, counts = np.unique(-transforms.numpy()[:, column], return_counts=True)
        assert offsets.tolist() == [-2, -1, 0, 1, 2]
        assert (np.abs(counts / 5000 - 0.2) < 0.025).all(), counts  # rounding gave 0.125 at +-2


def test_bilinear_blends_round_to_the_nearest_level_not_down():
    """Augmented images keep the brightness of the originals the model is tested on."""
    images = np.random.default_rng(5).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    tutorial = aug(rotation=10.0, shift=5 / 32, flip=True)
    out = augment_batch(tf.constant(images), tutorial, SEED).numpy()
    exact = tf.raw_ops.ImageProjectiveTransformV3(  # the same transforms, in float
        images=tf.constant(images, tf.float32),
        transforms=augment_transforms(64, 32, tutorial, SEED),
        output_shape=[32, 32],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    ).numpy()
    inner = np.s_[:, 8:24, 8:24]  # away from the filled edges
    error = out[inner].astype(np.float64) - exact[inner]
    assert abs(error.mean()) < 0.02  # truncation gave -0.5
    assert np.abs(error).max() <= 0.5 + 1e-4


@pytest.mark.parametrize("fill", ["nearest", "reflect"])
def test_fill_repeats_or_mirrors_the_uncovered_edge(fill):
    # Each pixel holds its column index, so a row of the output names the source
    # column of every output pixel.
    ramp = np.broadcast_to(np.arange(32, dtype=np.uint8)[None, None, :, None], (64, 32, 32, 3))
    out = augment_batch(
        tf.constant(ramp), aug(shift=5 / 32, interpolation="nearest", fill=fill), SEED
    ).numpy()
    assert (out == out[:, :1]).all()  # vertical shifts leave the column pattern unchanged
    shifts = set()
    for row in out[:, 16, :, 0].astype(int):
        right = 16 - row[16]  # pixels moved right (the centre's source is inside the image)
        source = np.arange(32) - right  # where each output pixel was, before the shift
        if fill == "nearest":
            expected = np.clip(source, 0, 31)  # the edge pixel, repeated
        else:
            expected = np.where(source < 0, -source - 1, np.where(source > 31, 63 - source, source))
        np.testing.assert_array_equal(row, expected)
        shifts.add(right)
    assert shifts <= set(range(-5, 6)) and len(shifts) > 3


@pytest.mark.parametrize("fill", ["nearest", "reflect"])
def test_shift_tta_views_are_shifts_training_makes(fill):
    """evaluate's shifted views fill the uncovered edge exactly as training's shifts do."""
    from pipeline.evaluate import shift

    images = np.random.default_rng(3).integers(0, 256, (32, 12, 12, 3), dtype=np.uint8)
    out = augment_batch(
        tf.constant(images), aug(shift=3 / 12, interpolation="nearest", fill=fill), SEED
    ).numpy()
    offsets = [(right, down) for right in range(-3, 4) for down in range(-3, 4)]
    found = set()
    for image, trained in zip(images, out, strict=True):
        # Random pixels: exactly one whole-pixel offset, fill included, reproduces it.
        matches = [
            offset for offset in offsets if (shift(image[None], *offset, fill)[0] == trained).all()
        ]
        assert len(matches) == 1, matches
        found.add(matches[0])
    assert len(found) > 8  # many different offsets, most with an edge to fill


def test_cutout_mask_is_one_square_per_image_clipped_at_the_edges():
    mask = cutout_mask(tf.constant(256), 32, 8, SEED).numpy()[..., 0]
    assert mask.shape == (256, 32, 32)
    areas = mask.sum(axis=(1, 2))
    assert areas.max() == 64 and 16 <= areas.min() < 64  # whole inside, clipped at an edge
    for m in mask:
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        assert m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # a filled rectangle
        assert m.sum() == len(rows) * len(cols)
    centres = [np.argwhere(m).mean(axis=0) for m in mask]
    assert np.ptp(np.array(centres), axis=0).min() > 20  # spread over the image


def test_cutout_paints_the_fill_colour_and_leaves_the_geometry_alone():
    images = stripe_images(32)
    colour = np.array([120, 121, 122], np.uint8)
    plain = augment_batch(tf.constant(images), aug(5.0, 0.1, True), SEED).numpy()
    cut = augment_batch(tf.constant(images), aug(5.0, 0.1, True, cutout=8), SEED, colour).numpy()
    painted = (cut == colour).all(axis=-1)
    assert (painted.sum(axis=(1, 2)) >= 16).all()
    np.testing.assert_array_equal(cut[~painted], plain[~painted])  # same transform elsewhere
    alone = augment_batch(tf.constant(images), aug(cutout=8), SEED).numpy()
    changed = (alone != images).any(axis=-1)
    assert (alone[changed] == 0).all()  # default paint is black; nothing else moves


def test_training_batches_cut_out_with_the_mean_colour():
    data = Split(np.full((32, 32, 32, 3), [10, 20, 30], np.uint8), np.zeros(32, np.int32))
    data.images[:16] = [30, 40, 50]  # mean colour (20, 30, 40)
    batch, _ = next(iter(make_dataset(data, 32, training=True, augment=aug(cutout=8), seed=1)))
    painted = (batch.numpy() == [20, 30, 40]).all(axis=-1)
    assert (painted.sum(axis=(1, 2)) >= 16).all()


def split(count: int = 100) -> Split:
    rng = np.random.default_rng(0)
    return Split(
        rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
        np.arange(count, dtype=np.int32),  # label = index: shows the order
    )


def labels_per_epoch(dataset, steps):
    labels = [y for _, y in dataset.as_numpy_iterator()]
    return [np.concatenate(labels[i : i + steps]) for i in range(0, len(labels), steps)]


def test_training_order_is_seeded_per_epoch_and_full_batches():
    data = split(100)
    steps = steps_per_epoch(100, 32)
    assert steps == 3
    epochs = labels_per_epoch(make_dataset(data, 32, training=True, seed=1, epochs=2), steps)
    again = labels_per_epoch(make_dataset(data, 32, training=True, seed=1, epochs=2), steps)
    other = labels_per_epoch(make_dataset(data, 32, training=True, seed=2, epochs=2), steps)
    assert len(epochs) == 2 and all(len(e) == 96 for e in epochs)
    assert len(set(epochs[0])) == 96  # no image twice in an epoch
    np.testing.assert_array_equal(epochs[0], again[0])
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert not np.array_equal(epochs[0], other[0])


def test_resumed_epochs_see_exactly_the_same_batches():
    data, augment = split(64), aug(10.0, 0.15625, True, "nearest", cutout=8)
    full = list(make_dataset(data, 16, training=True, augment=augment, seed=3, epochs=3))
    resumed = list(
        make_dataset(data, 16, training=True, augment=augment, seed=3, first_epoch=2, epochs=3)
    )
    assert len(resumed) == 4
    for (x_full, y_full), (x_res, y_res) in zip(full[8:], resumed, strict=True):
        np.testing.assert_array_equal(x_full.numpy(), x_res.numpy())
        np.testing.assert_array_equal(y_full.numpy(), y_res.numpy())


@pytest.mark.parametrize("count", [10, 64])
def test_evaluation_dataset_is_ordered_and_complete(count):
    data = split(count)
    labels = np.concatenate([y for _, y in make_dataset(data, 32).as_numpy_iterator()])
    np.testing.assert_array_equal(labels, np.arange(count))


def test_shards_split_each_epoch_into_disjoint_equal_parts():
    data = split(100)
    whole = labels_per_epoch(make_dataset(data, 20, training=True, seed=5), 5)[0]
    parts = [
        np.concatenate([y for _, y in make_dataset(data, 10, training=True, seed=5, shard=(2, i))])
        for i in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == 50  # the same number of steps on both workers
    assert not set(parts[0]) & set(parts[1])
    assert sorted(np.concatenate(parts)) == sorted(whole)  # together: one global epoch


def test_workers_with_several_replicas_keep_epochs_apart():
    # 2 workers x 2 replicas, global batch 20: 5 per replica, 5 steps of 110 images per
    # epoch; each worker yields 2 batches per step, 10 per epoch, none rolling over.
    data = split(110)
    whole = labels_per_epoch(make_dataset(data, 20, training=True, seed=5, epochs=2), 5)
    for epoch in range(2):
        parts = []
        for i in range(2):
            batches = make_dataset(
                data, 5, training=True, seed=5, epochs=2, shard=(2, i), replicas=4
            )
            labels = [y for _, y in batches.as_numpy_iterator()]
            assert len(labels) == 20  # 2 epochs x 5 steps x 2 local replicas
            parts.append(np.concatenate(labels[epoch * 10 : (epoch + 1) * 10]))
        assert sorted(np.concatenate(parts)) == sorted(whole[epoch])
