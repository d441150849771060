"""Inference throughput: Keras's `model.predict` against the pipeline's batched predict.

    python -m benchmarks.inference [--model models/model.keras] [--images 4000] [--rounds 6]
                                   [--batch-size 500] [--out benchmarks/results/inference.json]

Both ways score the same images with the same model in one process:

  keras     `model.predict(images, batch_size)`, which feeds the images through
            tf.data (with its autotuning, as Keras sets it up);
  pipeline  `pipeline.model.predict_batches`, what evaluate and predict use:
            `predict_on_batch` on each slice of `batch_size` images.

Each is warmed up once (graph tracing), then they take turns `--rounds`
times, so a machine that slows down part-way weighs on both alike. Prints
every round's images/s, the medians, their ratio pipeline/keras, and how far
apart the two ways' probabilities are (bit for bit the same where measured,
on 2 EPYC cores); writes JSON. Random uint8 images and the default network
(params.yaml's `model`) with fresh weights stand in unless `--model` names a
saved model: speed depends on neither the pixels nor the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from pipeline import paths

ROOT = Path(__file__).resolve().parents[1]


def load_model(path: Path | None):
    """The saved model at `path`, or the default network with fresh weights."""
    import keras

    from pipeline.config import load_params
    from pipeline.model import build_model

    if path is not None:
        return keras.saving.load_model(path)
    params = load_params(ROOT / paths.PARAMS)
    keras.utils.set_random_seed(0)
    # Statistics of uniform random pixels: the normalization costs the same whatever they are.
    return build_model(
        params.model, num_classes=10, image_size=32, mean=[127.5] * 3, std=[73.9] * 3
    )


def measure(model, images, batch_size: int, rounds: int) -> dict:
    """Both ways in turn; per way, images/s of every round and their median."""
    import numpy as np

    from pipeline.model import predict_batches

    ways = {
        "keras": lambda: model.predict(images, batch_size=batch_size, verbose=0),
        "pipeline": lambda: predict_batches(model, images, batch_size),
    }
    outputs = {name: predict() for name, predict in ways.items()}  # warm-up: tracing
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for index in range(rounds):
        for name, predict in ways.items():
            started = time.perf_counter()
            predict()
            rates[name].append(len(images) / (time.perf_counter() - started))
        print(
            f"bench: round {index + 1}/{rounds}: "
            + ", ".join(f"{name} {rates[name][-1]:.1f} img/s" for name in ways),
            flush=True,
        )
    return {
        "results": {
            name: {"images_per_second": statistics.median(r), "round_rates": r}
            for name, r in rates.items()
        },
        "identical": bool(np.array_equal(outputs["keras"], outputs["pipeline"])),
        "max_abs_difference": float(np.abs(outputs["keras"] - outputs["pipeline"]).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a saved .keras model (default: fresh weights)")
    parser.add_argument("--images", type=int, default=4000, help="images scored per round")
    parser.add_argument("--rounds", type=int, default=6, help="turns each way takes")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/inference.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.images < 1 or args.batch_size < 1:
        parser.error("need --rounds, --images and --batch-size of at least 1")
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.startup import import_tensorflow

    import_tensorflow()
    import numpy as np

    from benchmarks.throughput import device, onednn_label
    from pipeline.startup import onednn_enabled

    model = load_model(args.model)
    size = model.input_shape[1]
    images = np.random.default_rng(0).integers(0, 256, (args.images, size, size, 3), np.uint8)
    measured = measure(model, images, args.batch_size, args.rounds)
    rate = {name: r["images_per_second"] for name, r in measured["results"].items()}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": device(),
        "onednn": onednn_enabled(),
        "model": str(args.model) if args.model else "default network, fresh weights",
        "images": args.images, "rounds": args.rounds, "batch_size": args.batch_size,
        **measured,
        "pipeline_over_keras": rate["pipeline"] / rate["keras"],
    }  # fmt: skip
    print(
        f"\n{report['device']}, oneDNN {onednn_label(report['onednn'])}; {args.rounds} rounds "
        f"of {args.images} images, batch {args.batch_size}"
    )
    for name, value in rate.items():
        print(f"{name:<10}{value:>8.1f} img/s (median)")
    print(f"pipeline / keras {report['pipeline_over_keras']:.3f}")
    if report["identical"]:
        print("same probabilities: bit for bit")
    else:
        print(f"same probabilities: within {report['max_abs_difference']:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
