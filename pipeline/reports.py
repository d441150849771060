"""Pictures of an evaluation: misclassified images and per-class accuracy, as PNG files.

matplotlib with the non-interactive Agg backend, so it works on servers and CI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline import files

# Inches and counts past which the charts stop growing with the class count: a figure of
# 1,000 classes at the per-class sizes below would be 55,000 px square (a 12 GB buffer),
# past Agg's 65,536 px limit soon after, and its cells' counts unreadable long before.
MAX_INCHES = 40
MAX_COUNTED_CLASSES = 30  # confusion cells with their counts written in
MAX_LABELLED_CLASSES = 100  # class names on the confusion matrix's axes
CAPTION_CHARS = 18  # of a class name under a misclassified image, "pred: " and "(97%)" beside


def _plain(name: str) -> str:
    """A class name as text, not math: matplotlib reads "$...$" as TeX, and savefig raises
    on what is not TeX (a class "$x^$ plan")."""
    return name.replace("$", r"\$")


def _short(name: str, width: int) -> str:
    """`name` in at most `width` characters, its middle elided: the start and the end of
    `automobile_with_trailer` and `automobile_with_caravan` both stay."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head) :]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def misclassified_grid(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    confidences: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    count: int,
) -> int:
    """Draw up to `count` misclassified images, most confident mistakes first; return how many.

    images (N, H, W, 3) uint8; labels and predictions (N,) class indices;
    confidences (N,) the predicted class's probability.
    """
    plt = _pyplot()
    wrong = np.flatnonzero(predictions != labels)
    total = len(wrong)
    wrong = wrong[np.argsort(-confidences[wrong], kind="stable")][:count]
    columns = max(1, min(6, len(wrong)))  # inches: 2 per image, 4.5 at least for the title
    rows = max(1, -(-len(wrong) // columns))
    # Constrained layout keeps each two-line caption clear of the image above it (tight
    # layout let the row above cover the "true:" line).
    figure, axes = plt.subplots(
        rows, columns, figsize=(max(4.5, 2.0 * columns), 2.4 * rows), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, wrong, strict=False):
        axis.imshow(images[index], interpolation="nearest")
        # 8 pt in a 2-inch column: names past CAPTION_CHARS ran into the next caption.
        true, predicted = (
            _plain(_short(class_names[k], CAPTION_CHARS))
            for k in (labels[index], predictions[index])
        )
        axis.set_title(
            f"true: {true}\npred: {predicted} ({confidences[index]:.0%})",
            fontsize=8,
            color="firebrick",
        )
    title, note = grid_text(total, len(wrong))
    if note:
        axes[0, 0].text(0.5, 0.5, note, ha="center", va="center")
    figure.suptitle(title, fontsize=10)
    with files.replacing(path) as partial:
        figure.savefig(partial, dpi=100)
    plt.close(figure)
    return len(wrong)


def grid_text(total: int, drawn: int) -> tuple[str, str | None]:
    """The error grid's title, and the note that stands in for an empty grid."""
    if not total:
        return "Misclassified test images: none", "no misclassified images"
    if not drawn:  # evaluate.misclassified: 0
        return (
            f"Misclassified test images: {total}",
            f"{total} misclassified, none drawn (evaluate.misclassified: 0)",
        )
    return f"Misclassified test images: the {drawn} most confident of {total}", None


def per_class_chart(accuracies: dict[str, float], overall: float, path: Path) -> None:
    """Horizontal bars of per-class test accuracy, with the overall accuracy as a line."""
    plt = _pyplot()
    names = list(accuracies)
    values = [accuracies[n] for n in names]
    height = min(0.35 * len(names) + 1.2, 5 * MAX_INCHES)  # inches; 100 px each
    # Wider for long names (8 pt: about 0.07 inch a character), which took the title's room.
    longest = max((len(n) for n in names), default=0)
    width = min(6 + 0.07 * max(0, longest - 15), MAX_INCHES)
    figure, axis = plt.subplots(figsize=(width, height))
    bars = axis.barh(range(len(names)), values, color="steelblue")
    axis.set_yticks(range(len(names)), [_plain(n) for n in names], fontsize=8)
    axis.invert_yaxis()  # first class on top
    axis.axvline(overall, color="black", linestyle="--", linewidth=1, zorder=1)
    axis.bar_label(
        bars, labels=[f"{v:.1%}" for v in values], padding=3, fontsize=8, zorder=2,
        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},  # over the line
    )  # fmt: skip
    axis.set_xlim(0, 1.1)
    axis.set_xlabel("test accuracy")
    # The overall figure in the title: a legend inside the axes covered the bars, which
    # reach 0.9 and more on a trained model.
    axis.set_title(f"Per-class test accuracy\n(dashed: overall {overall:.1%})")
    figure.tight_layout()
    with files.replacing(path) as partial:
        figure.savefig(partial, dpi=100)
    plt.close(figure)


def row_shares(matrix: np.ndarray) -> np.ndarray:
    """Each row of counts as fractions of its sum (0 for an empty row): per true class,
    where its images went."""
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)


def confusion_chart(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """The confusion matrix as a heat map with counts (rows: true class, columns: predicted).

    Coloured by each row's shares, not by counts: on a test set whose classes differ in
    size, counts would colour the large classes and hide the small ones' confusions."""
    plt = _pyplot()
    classes = len(class_names)
    # Inches, square; larger for long names (8 pt: about 0.07 inch a character), which the
    # true-class labels take from the matrix's width and the slanted ones from its height.
    longest = (
        max((len(n) for n in class_names), default=0) if classes <= MAX_LABELLED_CLASSES else 0
    )
    size = min(0.55 * classes + 2 + 0.07 * max(0, longest - 12), MAX_INCHES - 1)
    # One inch wider for the colour bar, so that the matrix keeps its square.
    figure, axis = plt.subplots(figsize=(size + 1, size))
    shares = row_shares(matrix)
    image = axis.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    bar = figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, format="{x:.0%}")
    bar.set_label("share of the true class's test images", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    if classes <= MAX_LABELLED_CLASSES:
        ticks, names = range(classes), [_plain(n) for n in class_names]
        axis.set_xticks(ticks, names, rotation=45, ha="right", fontsize=8)
        axis.set_yticks(ticks, names, fontsize=8)
    for (row, column), value in np.ndenumerate(matrix):
        if classes > MAX_COUNTED_CLASSES:  # the colours alone: counts would not fit
            break
        color = "white" if shares[row, column] > 0.5 else "black"  # legible on dark blue
        axis.text(column, row, str(value), ha="center", va="center", fontsize=7, color=color)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("Confusion matrix (test)\nrows: true class, colour: its share")
    figure.tight_layout()
    with files.replacing(path) as partial:
        figure.savefig(partial, dpi=100)
    plt.close(figure)
