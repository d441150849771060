"""evaluate: score models/model.keras on the test split, log to the training's MLflow run.

    python -m pipeline.evaluate     # reads evaluate from params.yaml

Writes metrics/test.json (accuracy, loss, macro precision/recall/F1 and
per-class figures), metrics/confusion.csv for `dvc plots`, and PNGs of the
misclassified images, per-class accuracy and the confusion matrix.

Every figure is of one forward pass per image, the way the saved model
predicts. With `evaluate.flip_tta: true` test.json also gets `flip_tta`:
accuracy, loss and macro F1 of the mean prediction on each image and its
mirror (MLflow: `test_accuracy_flip_tta`, ...), at twice the inference time.
With `evaluate.shift_tta: p` (pixels) it also gets `shift_tta`: the same
figures of the mean over 10 views, the image and its mirror each as is and
moved p pixels left, right, up and down (`test_accuracy_shift_tta`, ...), at
ten times the inference time; the uncovered edges are filled as training's
shifts fill them (train.augment.fill). The registry always compares single-pass accuracy.

How evaluations are recorded in MLflow: a trained model may be evaluated
several times (re-running only this stage after an `evaluate.*` change).
Evaluation k of a training run logs its metrics to that run at step k
(`test_accuracy`, `test_loss`, `test_f1_macro`, `test_accuracy_<class>`: the
metric's history keeps every evaluation, its latest value is the newest) and
its files, with the `evaluate` params it used and the commit and DVC
experiment it ran in, under the artifact folder `evaluation-k/`. Nothing is
overwritten: `evaluate.*` values are not run params (those never change once
logged), and the one run param an evaluation adds, `evaluation.k` (when and
where it ran), claims its number, so that two evaluations of one model at once
take two (see evaluation_log._claim_evaluation).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

from pipeline import files, paths
from pipeline.config import EvaluateParams, flatten, load_params
from pipeline.errors import PipelineError, cli
from pipeline.prepared import Split, load_meta, load_split
from pipeline.startup import import_tensorflow

EPSILON = 1e-7  # probabilities are clipped as Keras's cross-entropy clips them


def score(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Test figures from (N, classes) probabilities and (N,) labels; pure numpy."""
    classes = len(class_names)
    predictions = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.log(np.clip(picked, EPSILON, 1 - EPSILON)).mean())
    matrix = confusion_matrix(labels, predictions, classes)
    hits = np.diag(matrix).astype(float)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    recall = np.divide(hits, support, out=np.zeros(classes), where=support > 0)
    precision = np.divide(hits, predicted, out=np.zeros(classes), where=predicted > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(classes), where=both > 0)
    return {
        "accuracy": float(hits.sum() / len(labels)),
        "loss": loss,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "images": int(len(labels)),
        # Of the test images of each class, the share classified right (= per-class recall).
        "per_class_accuracy": {name: float(recall[i]) for i, name in enumerate(class_names)},
    }


def mirror(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) images mirrored left-right (axis 2 is width), as training's flips do."""
    return images[:, :, ::-1]


def flip_tta(probabilities: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """Flip test-time augmentation: the mean of the probabilities on each image and its mirror."""
    return (probabilities + mirrored) / 2


# train.augment.fill -> numpy.pad mode that fills an uncovered edge the same way:
# nearest repeats the edge pixel; reflect mirrors about the edge, the edge pixel
# included (d c b a | a b c d), which numpy calls "symmetric".
PAD_MODES = {"nearest": "edge", "reflect": "symmetric"}


def shift(images: np.ndarray, right: int, down: int, fill: str = "nearest") -> np.ndarray:
    """(N, H, W, C) images moved `right` and `down` pixels (negative: left, up).

    The uncovered edge is filled as training's augmentation fills it under
    train.augment.fill `fill`, so the shifted views look like training images.
    """
    pad = max(abs(right), abs(down))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=PAD_MODES[fill])
    height, width = images.shape[1:3]
    return padded[:, pad - down : pad - down + height, pad - right : pad - right + width]


SHIFT_TTA_VIEWS = 10  # image and mirror, each as is and moved 4 ways


def shifted_views(images: np.ndarray, pixels: int, fill: str = "nearest") -> Iterator[np.ndarray]:
    """The 8 shifted views of shift TTA: image and mirror, each moved `pixels` 4 ways.

    One at a time, so only one extra copy of the test set is in memory.
    """
    for base in (images, mirror(images)):
        for right, down in ((pixels, 0), (-pixels, 0), (0, pixels), (0, -pixels)):
            yield shift(base, right, down, fill)


def shift_tta(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    pixels: int,
    plain: np.ndarray,
    mirrored: np.ndarray,
    fill: str = "nearest",
) -> np.ndarray:
    """Shift test-time augmentation: the mean probabilities over the 10 views.

    plain, mirrored: the predictions on the unshifted image and mirror, already made.
    fill: train.augment.fill of the model's training, which the shifted edges follow.
    """
    total = plain + mirrored
    for view in shifted_views(images, pixels, fill):
        total = total + predict(view)
    return total / SHIFT_TTA_VIEWS


def tta_figures(figures: dict) -> dict:
    """The headline figures of a test-time-augmented score, kept beside the single-pass ones."""
    return {key: figures[key] for key in ("accuracy", "loss", "f1_macro")}


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts; rows are true classes, columns predicted ones."""
    flat = labels.astype(np.int64) * classes + predictions
    return np.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def mlflow_metrics(figures: dict) -> dict[str, float]:
    metrics = {
        "test_accuracy": figures["accuracy"],
        "test_loss": figures["loss"],
        "test_precision_macro": figures["precision_macro"],
        "test_recall_macro": figures["recall_macro"],
        "test_f1_macro": figures["f1_macro"],
    }
    for tta in ("flip_tta", "shift_tta"):
        for key, value in figures.get(tta, {}).items():
            metrics[f"test_{key}_{tta}"] = value
    # Names no class may take, even when this evaluation has no TTA: a class folder named
    # flip_tta would otherwise be the TTA accuracy in another evaluation of the same run.
    taken = set(metrics) | {f"test_accuracy_{tta}" for tta in ("flip_tta", "shift_tta")}
    for name, accuracy in figures["per_class_accuracy"].items():
        # MLflow metric names allow letters (any script's), digits, _-./ and spaces; keep
        # them plain, and within MLflow's 250 characters with room for a copy number.
        key = base = ("test_accuracy_" + re.sub(r"[^\w.-]", "_", name))[:240]
        copies = 1
        while key in taken:  # "sea lion" and "sea_lion" would share a name
            copies += 1
            key = f"{base}_{copies}"
        metrics[key] = accuracy
        taken.add(key)
    return metrics


def confusion_csv(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> str:
    """One row per test image, as DVC's confusion template wants: actual,predicted.

    Quoted where needed: class names are folder names, which may hold commas.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows(
        (class_names[a], class_names[p]) for a, p in zip(labels, predictions, strict=True)
    )
    return out.getvalue()


def check_model_matches_info(model, info: dict) -> None:
    """model_info.json written by another training (a model copied in alone) would name the
    wrong classes, or too few for the model's outputs."""
    outputs, size = model.output_shape[-1], model.input_shape[1]
    if outputs != len(info["class_names"]) or size != info["image_size"]:
        raise PipelineError(
            f"{paths.MODEL_INFO} ({len(info['class_names'])} classes, {info['image_size']} px) "
            f"does not belong to {paths.MODEL_FILE} ({outputs} classes, {size} px); copy the "
            "model_info.json train wrote with this model beside it, or run `dvc repro train`"
        )


def check_finite(probabilities: np.ndarray) -> np.ndarray:
    """A model that diverged in training predicts NaN: no figure of it means anything."""
    if not np.isfinite(probabilities).all():
        raise PipelineError(
            f"{paths.MODEL_FILE} predicts NaN or infinite probabilities: its training diverged. "
            "Nothing was evaluated, logged or registered; train it again with a lower "
            "train.learning_rate"
        )
    return probabilities


def evaluate(
    predict: Callable[[np.ndarray], np.ndarray],
    test: Split,
    class_names: list[str],
    cfg: EvaluateParams,
    fill: str,
) -> tuple[dict, np.ndarray]:
    """The test figures (test.json's content) and the single-pass probabilities (N, classes).

    `predict` maps (N, S, S, 3) uint8 images to (N, classes) probabilities; it is called
    once, or with test-time augmentation once per view (cfg.flip_tta, cfg.shift_tta, whose
    shifts fill the uncovered edges as `fill`, training's train.augment.fill, says).
    """
    probabilities = predict(test.images)
    figures = score(probabilities, test.labels, class_names)
    if cfg.flip_tta or cfg.shift_tta:
        mirrored = predict(mirror(test.images))
    if cfg.flip_tta:
        tta = score(flip_tta(probabilities, mirrored), test.labels, class_names)
        figures["flip_tta"] = tta_figures(tta)
    if cfg.shift_tta:
        mean = shift_tta(predict, test.images, cfg.shift_tta, probabilities, mirrored, fill)
        figures["shift_tta"] = tta_figures(score(mean, test.labels, class_names))
    return figures, probabilities


def write_outputs(
    figures: dict, probabilities: np.ndarray, test: Split, class_names: list[str],
    cfg: EvaluateParams,
) -> int:  # fmt: skip
    """Write metrics/test.json, confusion.csv and the PNGs; return misclassified images drawn."""
    from pipeline import reports

    predictions = probabilities.argmax(axis=1)
    matrix = confusion_matrix(test.labels, predictions, len(class_names))
    files.write_text(paths.CONFUSION_FILE, confusion_csv(test.labels, predictions, class_names))
    drawn = reports.misclassified_grid(
        test.images, test.labels, predictions, probabilities.max(axis=1), class_names,
        paths.MISCLASSIFIED_PNG, cfg.misclassified,
    )  # fmt: skip
    reports.per_class_chart(figures["per_class_accuracy"], figures["accuracy"], paths.PER_CLASS_PNG)
    reports.confusion_chart(matrix, class_names, paths.CONFUSION_PNG)
    # Last: a test.json beside the charts of the model before would pass for this model's.
    files.write_text(paths.TEST_METRICS, json.dumps(figures, indent=2) + "\n")
    return drawn


def check_model_fits(info: dict, meta: dict, now: dict | None = None) -> None:
    """The model must have been trained on classes and an image size the test data has,
    and its test images must not be drawn anew beside other training images.

    `dvc repro` keeps them in step; running this stage by hand after preparing other
    data would otherwise fail deep in TensorFlow, report figures under wrong names, or
    score the model on images it may have learnt from (another data.seed or
    data.test_size splits one image folder otherwise) and register that score.
    now: `test_set` and, when it differs from the model's, `training_data` of
    data/prepared as it is (training_digests), compared with what train recorded.
    """
    trained, prepared = info["class_names"], meta["class_names"]
    differences = []
    if len(trained) != len(prepared):
        differences.append(f"{len(trained)} classes against {len(prepared)}")
    elif trained != prepared:
        differences.append("other class names")
    if info["image_size"] != meta["image_size"]:
        differences.append(f"{info['image_size']} px images against {meta['image_size']} px")
    if not differences and now and _drawn_anew(info, now):
        differences.append(
            "other training and test images: its test images may be ones it learnt from"
        )
    if differences:
        raise PipelineError(
            f"{paths.MODEL_INFO} was trained on other data than {paths.PREPARED_DIR} holds "
            f"({', '.join(differences)}); run `dvc repro` to train on it first"
        )


DIGESTS = ("test_set", "training_data")  # what model_info.json records of the data


def _drawn_anew(info: dict, now: dict) -> bool:
    """Both splits differ from the model's. Another test set beside the same training
    images is another dataset, fine to score on; the same test set beside other training
    images (data.val_size changed) was held out from either."""
    return all(key in info and now.get(key) not in (None, info[key]) for key in DIGESTS)


def training_digests(info: dict, test: Split, class_names: list[str]) -> dict:
    """data/prepared as it is, in the digests train records; the training images are
    read (about 1 s for CIFAR-10) only when the test set differs from the model's."""
    from pipeline.prepared import digest_of_test_set, training_data_digest

    now = {"test_set": digest_of_test_set(test.images, test.labels, class_names)}
    if "test_set" in info and now["test_set"] != info["test_set"]:
        train, val = (load_split(paths.PREPARED_DIR, split) for split in paths.SPLITS[:2])
        now["training_data"] = training_data_digest(train, val)
    return now


def load_model_info() -> dict:
    from pipeline.model import read_model_info

    try:
        return read_model_info(
            paths.MODEL_INFO, ("run_id", "model_uri", "class_names", "image_size")
        )
    except FileNotFoundError:
        raise PipelineError(f"{paths.MODEL_INFO}: not found; run `dvc repro train` first") from None


@cli
def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        prog="python -m pipeline.evaluate", description=__doc__.splitlines()[0]
    ).parse_args(argv)
    params = load_params(paths.PARAMS)  # a mistyped param fails in a second, before TensorFlow
    import_tensorflow()  # before anything imports it, so its start-up chatter is filtered
    cfg = params.evaluate
    info = load_model_info()
    test = load_split(paths.PREPARED_DIR, "test")
    meta = load_meta(paths.PREPARED_DIR)
    check_model_fits(info, meta, training_digests(info, test, meta["class_names"]))
    class_names = info["class_names"]

    from pipeline.model import load_saved_model, predict_batches

    # The model before the store: a missing or damaged one is the problem to report, even
    # with the store down, and a fresh clone gets no mlflow.db from a stage that cannot run.
    started = time.perf_counter()
    try:
        model = load_saved_model(paths.MODEL_FILE)
    except FileNotFoundError:
        raise PipelineError(f"{paths.MODEL_FILE}: not found; run `dvc repro train` first") from None
    check_model_matches_info(model, info)

    from pipeline import evaluation_log, tracking

    root = tracking.repository_root()
    # What evaluates again: in a temporary experiment copy, whose files DVC deletes when
    # the stage fails, the same experiment; `dvc repro` would score the workspace's model.
    copy = tracking.in_experiment_copy()
    again = "the same `dvc exp run`" if copy else "`dvc repro`"
    tracking.retried_by(again)
    tracking.connect(root, experiment=False)  # fail before the work if the store is unreachable
    with tracking.reported(f"cannot read MLflow run {info['run_id']}", "nothing was evaluated"):
        evaluation_log.check_run(info["run_id"], paths.MODEL_INFO)  # the store may not have it
    passes = SHIFT_TTA_VIEWS if cfg.shift_tta else 2 if cfg.flip_tta else 1
    done = []  # seconds each pass over the test set took

    def predict(images: np.ndarray) -> np.ndarray:
        pass_started = time.perf_counter()
        probabilities = check_finite(predict_batches(model, images, cfg.batch_size))
        done.append(time.perf_counter() - pass_started)
        if passes > 1:  # test-time augmentation multiplies the time: show how far it is
            left = (passes - len(done)) * sum(done) / len(done)
            print(
                f"evaluate: pass {len(done)}/{passes} over the {len(images)} test images "
                f"in {done[-1]:.1f} s; about {left:.0f} s left",
                flush=True,
            )
        return probabilities

    figures, probabilities = evaluate(predict, test, class_names, cfg, params.train.augment.fill)
    try:
        drawn = write_outputs(figures, probabilities, test, class_names, cfg)
    except OSError as error:  # a full disk, a file where metrics/ should be
        raise PipelineError(
            f"could not write the evaluation's outputs in {paths.METRICS_DIR}/: {error}; "
            f"nothing was logged to MLflow. Free the space or fix the folder, then run {again}"
        ) from None
    print(
        f"evaluate: {figures['images']} test images: accuracy {figures['accuracy']:.4f}, "
        f"loss {figures['loss']:.4f}, macro F1 {figures['f1_macro']:.4f} "
        f"({time.perf_counter() - started:.1f} s)",
        flush=True,
    )
    for key, kind in (
        ("flip_tta", "flip test-time augmentation"),
        ("shift_tta", f"flip and {cfg.shift_tta}-pixel shift test-time augmentation "
                      f"({SHIFT_TTA_VIEWS} views)"),
    ):  # fmt: skip
        if key in figures:
            tta = figures[key]
            print(
                f"evaluate: with {kind}: accuracy {tta['accuracy']:.4f}, "
                f"loss {tta['loss']:.4f}, macro F1 {tta['f1_macro']:.4f}",
                flush=True,
            )
    worst = sorted(figures["per_class_accuracy"].items(), key=lambda item: item[1])[:3]
    print(
        "evaluate: weakest classes: "
        + ", ".join(f"{name} {accuracy:.3f}" for name, accuracy in worst),
        flush=True,
    )

    logged = [
        paths.TEST_METRICS, paths.CONFUSION_FILE, paths.PER_CLASS_PNG, paths.CONFUSION_PNG,
    ] + ([paths.MISCLASSIFIED_PNG] if drawn else [])  # fmt: skip
    used = {key: value for key, value in flatten(params).items() if key.startswith("evaluate.")}
    # And where it ran: an evaluation logs into the training's run, whose tags name the
    # commit and DVC experiment that trained, not this one (`dvc exp run -S evaluate.*`).
    used.update(tracking.run_tags())
    with tracking.reported(
        "the evaluation is done but could not be logged to MLflow",
        f"its figures are {'printed above' if copy else f'in {paths.TEST_METRICS}'}; once "
        f"the store answers, {again} evaluates again and logs it",
    ):
        number = evaluation_log.log_evaluation(
            info["run_id"], mlflow_metrics(figures), logged, used
        )
    print(f"evaluate: logged as evaluation {number} of MLflow run {info['run_id']}", flush=True)
    if not cfg.register:
        return
    from pipeline import registry
    from pipeline.prepared import digest_of_test_set

    with tracking.reported(
        f"evaluation {number} is logged, but the model could not be registered",
        f"{again} evaluates again (evaluation "
        f"{number + 1}) and registers it once the registry takes it; "
        "evaluate.register: false skips the registry",
    ):
        decision = registry.register(
            info["model_uri"], info["run_id"], figures["accuracy"], cfg.registered_model,
            test_set=digest_of_test_set(test.images, test.labels, class_names),
        )  # fmt: skip
    print(f"evaluate: registry: {decision.describe()}", flush=True)
    # The registry has decided (above); only its record on the run is missing if this fails.
    with tracking.reported(
        f"the registry decision is made, but it could not be tagged on MLflow run {info['run_id']}",
        f"the registry itself is right; {again} evaluates again and tags the run",
    ):
        evaluation_log.set_run_tags(info["run_id"], decision.tags())


if __name__ == "__main__":
    sys.exit(main())
