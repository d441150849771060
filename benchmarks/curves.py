"""Accuracy curves of finished runs, side by side, from their metrics/history.csv.

    python -m benchmarks.curves OUT.png LABEL=path/to/history.csv [LABEL=...]

Draws validation accuracy (solid) and augmented train accuracy (dashed) per
epoch for each run, and the learning rate below, so recipes can be compared
at a glance. The CSVs are the train stage's `metrics/history.csv`: one row
per epoch with at least epoch, accuracy and learning_rate, and val_accuracy
unless the run had no validation split (`data.val_size: 0`; train only then).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from pathlib import Path

COLUMNS = ("epoch", "accuracy", "learning_rate")
OPTIONAL = ("val_accuracy",)  # absent or all nan when the run held out no validation images


def read_history(path: Path) -> dict[str, list[float]]:
    """{column: values per epoch} of one history.csv; exits with a clear message if unusable."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        sys.exit(f"curves: {path}: cannot read: {error.strerror}")
    missing = [c for c in COLUMNS if not rows or c not in rows[0]]
    if missing:
        sys.exit(f"curves: {path}: no rows or missing columns {', '.join(missing)}")
    present = COLUMNS + tuple(c for c in OPTIONAL if c in rows[0])
    history = {c: [float(row[c]) for row in rows] for c in present}
    return {c: v for c, v in history.items() if c in COLUMNS or not all(map(math.isnan, v))}


def parse_run(argument: str) -> tuple[str, Path]:
    label, sep, path = argument.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=path/to/history.csv, got {argument!r}")
    return label, Path(path)


def draw(runs: dict[str, dict[str, list[float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    # tab20 after 10 runs (tab10's first ten are its even ones), then round again: zip
    # with tab10 alone dropped the 11th run and on.
    palette = plt.cm.tab10.colors if len(runs) <= 10 else plt.cm.tab20.colors
    colours = itertools.cycle(palette)
    for (label, history), colour in zip(runs.items(), colours, strict=False):
        val = history.get("val_accuracy")
        if val:
            summary = f"{label}: val (final {val[-1]:.4f}, best {max(val):.4f})"
            top.plot(history["epoch"], val, color=colour, label=summary)
        top.plot(history["epoch"], history["accuracy"], color=colour, linestyle="--",
                 label=f"{label}: train, augmented")  # fmt: skip
        bottom.plot(history["epoch"], history["learning_rate"], color=colour, label=label)
    top.set_ylabel("accuracy")
    top.grid(alpha=0.3)
    top.legend(loc="lower right", fontsize=8)
    bottom.set_ylabel("learning rate")
    bottom.set_yscale("log", nonpositive="mask")  # Adam's 1e-3 beside SGD's 0.1, both seen
    bottom.set_xlabel("epoch")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("runs", nargs="+", type=parse_run, metavar="LABEL=history.csv")
    args = parser.parse_args(argv)
    runs = {label: read_history(path) for label, path in args.runs}
    draw(runs, args.out)
    print(f"curves: wrote {args.out} ({len(runs)} runs)")


if __name__ == "__main__":
    main()
