"""evaluate's pure core: scores, flip test-time augmentation, MLflow metric names."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluate import (
    EPSILON,
    check_finite,
    confusion_csv,
    confusion_matrix,
    flip_tta,
    mirror,
    mlflow_metrics,
    score,
    shift,
    shift_tta,
    shifted_views,
    tta_figures,
)

CLASSES = ["cat", "dog", "ship"]


def one_hot(predictions, confidence=0.8) -> np.ndarray:
    probabilities = np.full((len(predictions), 3), (1 - confidence) / 2)
    probabilities[np.arange(len(predictions)), predictions] = confidence
    return probabilities


def test_score_counts_hits_per_class_and_the_clipped_loss():
    labels = np.array([0, 0, 1, 1, 2, 2])
    figures = score(one_hot([0, 1, 1, 1, 2, 0]), labels, CLASSES)
    assert figures["accuracy"] == pytest.approx(4 / 6)
    assert figures["per_class_accuracy"] == pytest.approx({"cat": 0.5, "dog": 1.0, "ship": 0.5})
    assert figures["loss"] == pytest.approx(-(4 * np.log(0.8) + 2 * np.log(0.1)) / 6)
    assert figures["images"] == 6
    # Precision of a class: of the images predicted as it, the share right; recall: of its
    # images, the share found. cat 1/2, 1/2; dog 2/3, 2/2; ship 1/1, 1/2.
    assert figures["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert figures["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert figures["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    perfect = np.eye(3)[labels]
    assert score(perfect, labels, CLASSES)["loss"] == pytest.approx(-np.log(1.0), abs=1e-6)
    # A confident miss (probability 0 on the true class) is clipped, not an infinite loss
    # that json.dumps would write as Infinity into metrics/test.json.
    wrong = np.eye(3)[(labels + 1) % 3]
    loss = score(wrong, labels, CLASSES)["loss"]
    assert np.isfinite(loss) and loss == pytest.approx(-np.log(EPSILON), rel=1e-6)
    np.testing.assert_array_equal(
        confusion_matrix(labels, np.array([0, 1, 1, 1, 2, 0]), 3), [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    )


def test_mirror_is_the_flip_training_augments_with():
    import tensorflow as tf

    from pipeline.config import AugmentParams
    from pipeline.data import augment_batch

    images = np.zeros((32, 32, 32, 3), np.uint8)
    images[:, 8:24, 4:10] = 255  # a bar left of centre: mirrored, it is right of centre
    flip = AugmentParams(0.0, 0.0, True, "bilinear", "nearest", 0)
    augmented = augment_batch(tf.constant(images), flip, tf.constant([7, 11], tf.int64)).numpy()
    mirrored = mirror(images)
    assert (mirrored[:, 16, 22:28] == 255).all() and (mirrored[:, 16, 4:10] == 0).all()
    flipped = [a for a in augmented if not np.array_equal(a, images[0])]
    assert flipped and all(np.array_equal(a, mirrored[0]) for a in flipped)


def test_flip_tta_averages_the_two_views_and_can_change_the_decision():
    plain = np.array([[0.6, 0.4, 0.0], [0.1, 0.2, 0.7]])
    mirrored = np.array([[0.0, 1.0, 0.0], [0.0, 0.2, 0.8]])
    mean = flip_tta(plain, mirrored)
    np.testing.assert_allclose(mean, [[0.3, 0.7, 0.0], [0.05, 0.2, 0.75]])
    np.testing.assert_allclose(mean.sum(axis=1), 1.0)
    labels = np.array([1, 2])
    assert score(plain, labels, CLASSES)["accuracy"] == 0.5
    assert score(mean, labels, CLASSES)["accuracy"] == 1.0


def test_shift_moves_the_content_and_repeats_the_border():
    images = np.arange(9, dtype=np.uint8).reshape(1, 3, 3, 1)  # rows 0 1 2 / 3 4 5 / 6 7 8
    right, up = shift(images, 1, 0)[0, :, :, 0], shift(images, 0, -1)[0, :, :, 0]
    np.testing.assert_array_equal(right, [[0, 0, 1], [3, 3, 4], [6, 6, 7]])
    np.testing.assert_array_equal(up, [[3, 4, 5], [6, 7, 8], [6, 7, 8]])
    np.testing.assert_array_equal(shift(images, 0, 0), images)


def test_shift_with_reflect_fill_mirrors_the_border_edge_pixel_included():
    images = np.arange(5, dtype=np.uint8).reshape(1, 1, 5, 1)  # one row: 0 1 2 3 4
    row = shift(images, 2, 0, "reflect")[0, 0, :, 0]
    np.testing.assert_array_equal(row, [1, 0, 0, 1, 2])  # (d c b a | a b c d), as training
    np.testing.assert_array_equal(shift(images, -2, 0, "reflect")[0, 0, :, 0], [2, 3, 4, 4, 3])
    # One pixel is the same under either fill: only wider shifts tell them apart.
    np.testing.assert_array_equal(shift(images, 1, 0, "reflect"), shift(images, 1, 0))


def test_shifted_views_are_the_image_and_its_mirror_moved_four_ways():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    views = list(shifted_views(images, 2))
    assert len(views) == 8 and all(view.shape == images.shape for view in views)
    assert len({view.tobytes() for view in views}) == 8  # all different
    np.testing.assert_array_equal(views[0][:, :, 2:], images[:, :, :3])  # 2 px right
    np.testing.assert_array_equal(views[3][:, :3], images[:, 2:])  # 2 px up
    np.testing.assert_array_equal(views[5][:, :, :3], mirror(images)[:, :, 2:])  # mirror, left


def test_shift_tta_is_the_mean_over_all_ten_views():
    images = np.random.default_rng(1).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)

    def predict(batch):  # a fake model: a distribution that depends on every pixel
        logits = batch.reshape(len(batch), 3, -1).astype(np.float64).mean(axis=2) / 30
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    views = [images, mirror(images)] + [
        shift(base, right, down)
        for base in (images, mirror(images))
        for right, down in ((1, 0), (-1, 0), (0, 1), (0, -1))
    ]
    expected = np.mean([predict(view) for view in views], axis=0)
    mean = shift_tta(predict, images, 1, predict(images), predict(mirror(images)))
    np.testing.assert_allclose(mean, expected)
    np.testing.assert_allclose(mean.sum(axis=1), 1.0)


def test_the_core_scores_one_pass_and_each_tta_on_its_own_views(raw_params):
    """evaluate(): test.json's figures from a predict function, as main gives it the model;
    the single-pass figures stay the headline (the registry compares them)."""
    import dataclasses

    from pipeline.config import parse_params
    from pipeline.evaluate import evaluate
    from pipeline.prepared import Split

    images = np.random.default_rng(2).integers(0, 256, (6, 6, 6, 3), dtype=np.uint8)
    test = Split(images, np.array([0, 1, 2, 0, 1, 2]))
    seen = []

    def predict(batch):  # sure and right on the images as they are, wrong on any other view
        seen.append(batch)
        as_is = np.array([(batch[i] == images[i]).all() for i in range(len(batch))])
        wrong = one_hot((test.labels + 1) % 3, 0.6)
        return np.where(as_is[:, None], one_hot(test.labels, 0.9), wrong)

    cfg = parse_params(raw_params).evaluate
    for flip, shift_px, passes, keys in (
        (False, 0, 1, set()), (True, 0, 2, {"flip_tta"}),
        (False, 1, 10, {"shift_tta"}), (True, 1, 10, {"flip_tta", "shift_tta"}),
    ):  # fmt: skip
        seen.clear()
        options = dataclasses.replace(cfg, flip_tta=flip, shift_tta=shift_px)
        figures, probabilities = evaluate(predict, test, CLASSES, options, "nearest")
        assert len(seen) == passes and keys <= set(figures), (flip, shift_px)
        assert not {"flip_tta", "shift_tta"} - keys & set(figures)
        assert figures["accuracy"] == 1.0 and probabilities.argmax(1).tolist() == [0, 1, 2] * 2
        if flip:  # one view of two right, the surer one: the mean still picks the right class
            assert figures["flip_tta"]["accuracy"] == 1.0
            assert figures["flip_tta"]["loss"] > figures["loss"]
        if shift_px:  # one view of ten right: the wrong ones carry the mean
            assert figures["shift_tta"]["accuracy"] == 0.0


def test_tta_figures_become_their_own_mlflow_metrics():
    labels = np.array([0, 1, 2])
    figures = score(one_hot([0, 1, 1]), labels, CLASSES)
    metrics = mlflow_metrics(figures)
    assert metrics["test_accuracy"] == pytest.approx(2 / 3)
    assert metrics["test_accuracy_ship"] == 0.0
    assert not any(name.endswith("_flip_tta") for name in metrics)
    figures["flip_tta"] = tta_figures(score(one_hot([0, 1, 2]), labels, CLASSES))
    metrics = mlflow_metrics(figures)
    assert metrics["test_accuracy"] == pytest.approx(2 / 3)  # the single-pass figure stays
    assert metrics["test_accuracy_flip_tta"] == 1.0
    assert {"test_loss_flip_tta", "test_f1_macro_flip_tta"} <= set(metrics)
    figures["shift_tta"] = tta_figures(score(one_hot([0, 0, 2]), labels, CLASSES))
    assert mlflow_metrics(figures)["test_accuracy_shift_tta"] == pytest.approx(2 / 3)


def test_class_names_are_made_safe_for_mlflow():
    figures = score(one_hot([0, 1]), np.array([0, 0]), ["sea lion", "sea_lion", "c"])
    metrics = mlflow_metrics(figures)
    # Two folders that clean to one name keep a metric each, in class order.
    assert (metrics["test_accuracy_sea_lion"], metrics["test_accuracy_sea_lion_2"]) == (0.5, 0.0)

    # Other scripts stay legible; a class named as a TTA figure does not overwrite it; a
    # name past MLflow's 250 characters is cut to fit.
    from mlflow.utils.validation import _validate_metric_name

    names = ["猫", "犬", "flip_tta", "x" * 300]
    probabilities = np.full((4, 4), 0.1)
    probabilities[np.arange(4), [0, 1, 2, 2]] = 0.7
    figures = score(probabilities, np.arange(4), names)
    figures["flip_tta"] = tta_figures(figures)
    metrics = mlflow_metrics(figures)
    assert metrics["test_accuracy_猫"] == 1.0 and metrics["test_accuracy_犬"] == 1.0
    assert metrics["test_accuracy_flip_tta"] == 0.75  # the TTA figure
    assert metrics["test_accuracy_flip_tta_2"] == 1.0  # the class
    long = [key for key in metrics if key.startswith("test_accuracy_xxx")]
    assert len(long) == 1 and len(long[0]) <= 250 and metrics[long[0]] == 0.0
    for key in metrics:
        _validate_metric_name(key)  # raises on a name MLflow refuses


def test_the_error_grid_says_how_many_it_leaves_out(tmp_path):
    from pipeline import reports

    assert reports.grid_text(120, 36) == (
        "Misclassified test images: the 36 most confident of 120",
        None,
    )
    assert (
        reports.grid_text(120, 0)[1] == "120 misclassified, none drawn (evaluate.misclassified: 0)"
    )
    assert reports.grid_text(0, 0)[1] == "no misclassified images"
    images = np.zeros((4, 8, 8, 3), np.uint8)
    labels, predictions = np.array([0, 1, 1, 0]), np.array([1, 1, 0, 0])
    args = (images, labels, predictions, np.full(4, 0.9), ["a", "b"], tmp_path / "grid.png")
    assert reports.misclassified_grid(*args, count=0) == 0
    assert reports.misclassified_grid(*args, count=36) == 2
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_charts_take_any_class_name_and_stop_growing_with_many_classes(tmp_path):
    """Text between two "$" is TeX to matplotlib (savefig raised on a class "$x^$ plan");
    1,000 classes (an ImageNet as an image folder) made a 55,000 px confusion chart."""
    from PIL import Image

    from pipeline import reports

    names = ["$x^$ plan", "$5 coupons", "a_b^c"]  # "$x^$" is broken TeX to mathtext
    images = np.zeros((3, 8, 8, 3), np.uint8)
    labels, predictions = np.array([0, 1, 2]), np.array([1, 2, 0])
    reports.misclassified_grid(
        images, labels, predictions, np.full(3, 0.9), names, tmp_path / "grid.png", count=3
    )
    reports.per_class_chart(dict.fromkeys(names, 0.5), 0.5, tmp_path / "per_class.png")
    reports.confusion_chart(np.eye(3, dtype=int), names, tmp_path / "confusion.png")
    many = [f"class {i}" for i in range(400)]
    reports.confusion_chart(np.eye(400, dtype=int), many, tmp_path / "many.png")
    more = [f"class {i}" for i in range(700)]  # 0.35 inch a bar: past the cap
    reports.per_class_chart(dict.fromkeys(more, 0.5), 0.5, tmp_path / "many_bars.png")
    with Image.open(tmp_path / "many.png") as chart:
        assert max(chart.size) <= reports.MAX_INCHES * 100  # 100 dpi
    with Image.open(tmp_path / "many_bars.png") as chart:
        assert chart.size[1] <= 5 * reports.MAX_INCHES * 100


def test_a_model_of_other_classes_or_image_size_is_not_evaluated():
    from pipeline.evaluate import check_model_fits

    cifar = {"class_names": ["airplane", "automobile", "bird"], "image_size": 32}
    check_model_fits(cifar, dict(cifar, sizes={"test": 10}))  # meta.json has more keys
    for other, says in (
        ({"class_names": ["cat", "dog"], "image_size": 64}, "3 classes against 2, 32 px images"),
        (dict(cifar, class_names=["a", "b", "c"]), "(other class names)"),
        (dict(cifar, image_size=64), "(32 px images against 64 px)"),
    ):
        with pytest.raises(PipelineError, match=re.escape(says)):
            check_model_fits(cifar, other)
    # Test images drawn anew beside other training images: refused. Either alone is fine:
    # data.val_size changed (same test set), or another test set of the same classes.
    trained = dict(cifar, test_set="t" * 32, training_data="d" * 32)
    for now in (
        {"test_set": "t" * 32},  # the same test set: training data not even read
        {"test_set": "T" * 32, "training_data": "d" * 32},
    ):
        check_model_fits(trained, cifar, now)
    check_model_fits(cifar, cifar, {"test_set": "T" * 32, "training_data": "D" * 32})  # old info
    with pytest.raises(PipelineError) as error:
        check_model_fits(trained, cifar, {"test_set": "T" * 32, "training_data": "D" * 32})
    assert str(error.value) == (
        "models/model_info.json was trained on other data than data/prepared holds (other "
        "training and test images: its test images may be ones it learnt from); run "
        "`dvc repro` to train on it first"
    )


def test_a_damaged_model_info_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """Not a JSONDecodeError or KeyError traceback from deep in the stage."""
    import json

    from pipeline import paths
    from pipeline.evaluate import load_model_info

    info = tmp_path / "model_info.json"
    monkeypatch.setattr(paths, "MODEL_INFO", info)
    with pytest.raises(PipelineError, match=r"model_info.json: not found; run `dvc repro train`"):
        load_model_info()
    whole = {"run_id": "r", "model_uri": "m", "class_names": ["a"], "image_size": 32}
    info.write_text(json.dumps(whole))
    assert load_model_info() == whole
    for damaged, says in (
        ("{not json", "JSONDecodeError: Expecting property name"),
        (json.dumps({k: v for k, v in whole.items() if k != "run_id"}), "KeyError: 'run_id'"),
        ("[1, 2]", "TypeError: list indices must be integers"),
    ):
        info.write_text(damaged)
        with pytest.raises(PipelineError) as error:
            load_model_info()
        assert str(error.value).startswith(f"{info}: not the model info train writes ({says}")
        assert str(error.value).endswith("; run `dvc repro train`")


def test_the_confusion_csv_quotes_class_names_dvc_would_split():
    """Folder names like "tench, Tinca tinca" must stay one cell for `dvc plots`."""
    import csv
    import io

    names = ["tench, Tinca tinca", 'say "cheese"', "ship"]
    text = confusion_csv(np.array([0, 1, 2]), np.array([1, 1, 0]), names)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["actual"], r["predicted"]) for r in rows] == [
        (names[0], names[1]), (names[1], names[1]), (names[2], names[0]),
    ]  # fmt: skip
    assert confusion_csv(np.array([0]), np.array([2]), CLASSES) == "actual,predicted\ncat,ship\n"


def test_a_model_that_predicts_nan_is_not_scored():
    """Scored, NaN everywhere is class 0 everywhere: 10% on CIFAR-10, a champion if first."""
    fine = one_hot([0, 1])
    assert check_finite(fine) is fine
    for bad in (np.nan, np.inf):
        broken = fine.copy()
        broken[1, 2] = bad
        with pytest.raises(PipelineError, match="predicts NaN or infinite .* training diverged"):
            check_finite(broken)


def test_a_model_info_of_another_model_is_refused_before_scoring():
    """A 10-class model beside a 3-class model_info.json would fail in the confusion matrix,
    or, the other way round, name the wrong classes."""
    from types import SimpleNamespace

    from pipeline.evaluate import check_model_matches_info

    model = SimpleNamespace(output_shape=(None, 10), input_shape=(None, 32, 32, 3))
    info = {"class_names": [f"c{i}" for i in range(10)], "image_size": 32}
    check_model_matches_info(model, info)
    for other in ({**info, "class_names": ["a", "b", "c"]}, {**info, "image_size": 64}):
        with pytest.raises(PipelineError, match=r"does not belong to models/model.keras \(10 cl"):
            check_model_matches_info(model, other)


def test_the_confusion_chart_colours_each_true_class_by_its_own_shares(tmp_path, monkeypatch):
    """A class of 10 test images with 5 confused weighs as much as one of 1000 with 500;
    a colour bar reads the colours as shares."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from pipeline import reports

    figures = []  # with its renderer, taken before close drops its Agg canvas
    close = plt.close
    monkeypatch.setattr(
        plt, "close",
        lambda figure: (figures.append((figure, figure.canvas.get_renderer())), close(figure)),
    )  # fmt: skip
    matrix = np.array([[500, 500, 0], [5, 5, 0], [0, 0, 0]])
    shares = reports.row_shares(matrix)
    np.testing.assert_allclose(shares, [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 0]])
    reports.confusion_chart(matrix, ["big", "small", "empty"], tmp_path / "confusion.png")
    [(figure, drawn)] = figures
    chart_axes, bar = figure.axes
    assert bar.get_ylabel() == "share of the true class's test images"
    labels = [label.get_text() for label in bar.get_yticklabels()]
    assert labels[0] == "0%" and labels[-1] == "100%", labels
    with Image.open(tmp_path / "confusion.png") as chart:
        pixels = np.asarray(chart.convert("RGB")).astype(int)
    # The matrix's cells alone (the colour bar holds every colour): pixels, y down.
    x0, y0, x1, y1 = chart_axes.get_window_extent(drawn).extents
    height = pixels.shape[0]
    pixels = pixels[round(height - y1) + 2 : round(height - y0) - 2, round(x0) + 2 : round(x1) - 2]
    # Four cells at a share of 0.5, all in the colour map's middle blue; by counts the
    # small class's would be near white and the big class's the darkest blue.
    from matplotlib import colormaps

    middle = np.array(colormaps["Blues"](0.5)[:3]) * 255
    near = np.abs(pixels - middle).max(axis=-1) <= 3
    darkest = np.abs(pixels - np.array(colormaps["Blues"](1.0)[:3]) * 255).max(axis=-1) <= 3
    cell = (pixels.shape[0] / 3) ** 2  # a third of the matrix's side, squared
    assert near.sum() > 3.5 * cell and darkest.sum() == 0


def test_outputs_that_fail_midway_leave_no_new_test_json(tmp_path, monkeypatch):
    """test.json is written last: a chart that fails leaves the old figures, not new ones
    beside the old model's charts."""
    from pipeline import evaluate, paths, reports
    from pipeline.prepared import Split

    monkeypatch.chdir(tmp_path)
    paths.METRICS_DIR.mkdir()
    paths.TEST_METRICS.write_text('{"accuracy": 0.5}\n')
    test = Split(np.zeros((3, 8, 8, 3), np.uint8), np.array([0, 1, 2]))
    figures = {"accuracy": 1.0, "per_class_accuracy": dict.fromkeys(CLASSES, 1.0)}
    args = (figures, one_hot([0, 1, 2]), test, CLASSES)
    cfg = type("Cfg", (), {"misclassified": 4})()

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reports, "confusion_chart", disk_full)
    with pytest.raises(OSError):
        evaluate.write_outputs(*args, cfg)
    assert paths.TEST_METRICS.read_text() == '{"accuracy": 0.5}\n'
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert evaluate.write_outputs(*args, cfg) == 0  # none misclassified
    assert '"accuracy": 1.0' in paths.TEST_METRICS.read_text()
    assert sorted(p.name for p in paths.METRICS_DIR.iterdir()) == [
        "confusion.csv", "confusion_matrix.png", "misclassified.png", "per_class_accuracy.png",
        "test.json",
    ]  # fmt: skip


def test_chart_text_stays_clear_of_the_images_and_inside_the_figure(tmp_path, monkeypatch):
    """Seen: from the second row of the error grid on, the image above covered the "true:"
    line; long class names ran into the next caption and pushed the per-class chart's
    title, with the overall accuracy in it, off the figure."""
    import matplotlib.pyplot as plt

    from pipeline import reports

    figures = []  # each with its renderer, taken before close drops its Agg canvas
    close = plt.close
    monkeypatch.setattr(
        plt, "close",
        lambda figure: (figures.append((figure, figure.canvas.get_renderer())), close(figure)),
    )  # fmt: skip
    names = [
        "airplane",
        "automobile_with_trailer",
        "a_class_name_of_forty_five_characters_or_so",
        "cat",
    ]
    labels = np.arange(24) % 4
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    reports.misclassified_grid(
        images, labels, (labels + 1) % 4, np.full(24, 0.97), names, tmp_path / "grid.png", 24
    )
    reports.per_class_chart(dict.fromkeys(names, 0.5), 0.723, tmp_path / "per_class.png")
    reports.confusion_chart(np.eye(4, dtype=int), names, tmp_path / "confusion.png")
    (grid, renderer), *others = figures
    axes = np.array(grid.axes).reshape(4, 6)
    extent = lambda artist: artist.get_window_extent(renderer)  # noqa: E731 (pixels, y up)
    for row, column in np.ndindex(4, 6):
        if row:
            assert extent(axes[row, column].title).y1 <= extent(axes[row - 1, column].images[0]).y0
        if column:
            assert extent(axes[row, column - 1].title).x1 <= extent(axes[row, column].title).x0
    assert "pred: a_class_…ers_or_so (97%)" in axes[0, 1].title.get_text()  # middle elided
    for figure, drawn_by in others:  # the per-class chart, the confusion matrix
        drawn = figure.axes[0].get_tightbbox(drawn_by)  # with its tick labels and title
        assert 0 <= drawn.x0 and drawn.x1 <= figure.bbox.width, (figure.axes[0].get_title(), drawn)
    assert "overall 72.3%" in others[0][0].axes[0].get_title()
