"""Training throughput, side by side on the same data and machine: `make bench`.

    python -m benchmarks.throughput [--images 2560] [--epochs 4] [--out results.json]

Measures the default network (params.yaml's `model`) three ways, each in its
own process so peak memory is its own:

  a. bare   `model.fit` on in-memory float32 tensors, no augmentation: what
            Keras itself reaches here, the upper bound;
  b. pipeline   the pipeline's real training path, `pipeline.train.run_training`:
            its tf.data input with augmentation, its callbacks (checkpoint,
            MLflow logging per epoch) and its precision choice;
  c. tutorial   the original tutorial's recipe: Keras's ImageDataGenerator
            augmentation (rotation 10, shifts 5/32, flips) feeding `model.fit`.

plus (b) again in float32 and in mixed_bfloat16 when `auto` picked another.
Each run trains `--epochs` epochs of `--images` images at batch 128; the first
epoch (graph tracing, warm-up) is dropped and the median images/s of the rest
is reported. Prints a table with the ratios b/a and b/c and writes JSON.
Random uint8 images stand in for CIFAR-10 (throughput does not depend on
pixel values); `--prepared data/prepared` uses the real prepared split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 128


def load_images(prepared: str | None, count: int):
    import numpy as np

    from pipeline.prepare import Split, load_meta, load_split

    if prepared:
        train = load_split(Path(prepared), "train")
        meta = load_meta(Path(prepared))
        return Split(train.images[:count], train.labels[:count]), meta
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.int32)
    pixels = images.reshape(-1, 3)
    meta = {
        "class_names": [f"class{i}" for i in range(10)], "image_size": 32,
        "mean": pixels.mean(0).tolist(), "std": pixels.std(0).tolist(),
        "sizes": {"train": count, "val": 0, "test": 0},
    }  # fmt: skip
    return Split(images, labels), meta


def epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    return EpochTimer()


def run_keras(mode: str, params, split, meta, epochs: int) -> dict:
    """Modes a (bare) and c (tutorial): plain model.fit, timed per epoch."""
    import keras
    import numpy as np

    from pipeline.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(
        params.model, num_classes=10, image_size=32, mean=meta["mean"], std=meta["std"]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
        metrics=["accuracy"], jit_compile=False,
    )  # fmt: skip
    timer = epoch_timer()
    steps = len(split.labels) // BATCH
    if mode == "bare":
        images = split.images.astype(np.float32)  # in-memory float tensors, no augmentation
        model.fit(
            images[: steps * BATCH], split.labels[: steps * BATCH], batch_size=BATCH,
            epochs=epochs, callbacks=[timer], verbose=0, shuffle=True,
        )  # fmt: skip
    else:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

        generator = ImageDataGenerator(
            rotation_range=10, width_shift_range=5 / 32, height_shift_range=5 / 32,
            horizontal_flip=True,
        )  # fmt: skip
        flow = generator.flow(split.images.astype(np.float32), split.labels, batch_size=BATCH)
        model.fit(flow, steps_per_epoch=steps, epochs=epochs, callbacks=[timer], verbose=0)
    rates = [steps * BATCH / s for s in timer.seconds[1:]]
    return {"images_per_second": statistics.median(rates), "epoch_rates": rates}


def run_pipeline(precision: str, params, split, meta, epochs: int) -> dict:
    """Mode b: the train stage's own code path in a scratch directory with its own MLflow store."""
    import dataclasses

    from pipeline import paths, tracking
    from pipeline.prepare import Split
    from pipeline.train import run_training

    train_cfg = dataclasses.replace(
        params.train, epochs=epochs, batch_size=BATCH, precision=precision
    )
    params = dataclasses.replace(params, train=train_cfg)
    empty = Split(split.images[:0], split.labels[:0])
    scratch = Path(tempfile.mkdtemp(prefix="bench-"))
    os.chdir(scratch)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
    tracking.connect(scratch)
    run_training(params, meta, split, empty)
    summary = json.loads(paths.TRAIN_METRICS.read_text())
    history = (scratch / paths.HISTORY_FILE).read_text().splitlines()
    column = history[0].split(",").index("images_per_second")
    rates = [float(line.split(",")[column]) for line in history[2:]]  # drop epoch 1
    return {
        "images_per_second": statistics.median(rates), "epoch_rates": rates,
        "precision": summary["precision"],
    }  # fmt: skip


def child(mode: str, args: argparse.Namespace) -> None:
    """Run one measurement in this process and print its JSON on the last line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.config import load_params

    params = load_params(ROOT / "params.yaml")
    split, meta = load_images(args.prepared, args.images)
    if mode in ("bare", "tutorial"):
        result = run_keras(mode, params, split, meta, args.epochs)
        result["precision"] = "float32"
    else:
        result = run_pipeline(mode.split(":")[1], params, split, meta, args.epochs)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.throughput", "--child", mode,
               "--images", str(args.images), "--epochs", str(args.epochs)]  # fmt: skip
    if args.prepared:
        command += ["--prepared", str(Path(args.prepared).resolve())]
    print(f"bench: {mode} ...", flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench: {mode} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"bench: {mode}: {measured['images_per_second']:.1f} img/s "
        f"({measured['precision']}), peak {measured['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return measured


def device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return ", ".join(
            tf.config.experimental.get_device_details(g).get("device_name", "GPU") for g in gpus
        )
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    return f"CPU: {model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2560, help="training images per epoch")
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs per run; the first is dropped"
    )
    parser.add_argument("--prepared", help="use this prepared-data folder instead of random images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/throughput.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)

    results = {mode: measure(mode, args) for mode in ("bare", "pipeline:auto", "tutorial")}
    if results["pipeline:auto"]["precision"] != "float32":
        results["pipeline:float32"] = measure("pipeline:float32", args)
    else:
        results["pipeline:mixed_bfloat16"] = measure("pipeline:mixed_bfloat16", args)
    rate = {mode: r["images_per_second"] for mode, r in results.items()}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": device(),
        "images_per_epoch": args.images, "epochs": args.epochs, "batch_size": BATCH,
        "results": results,
        "pipeline_over_bare": rate["pipeline:auto"] / rate["bare"],
        "pipeline_over_tutorial": rate["pipeline:auto"] / rate["tutorial"],
    }  # fmt: skip
    other = next(m for m in results if m.startswith("pipeline:") and m != "pipeline:auto")
    report[f"auto_over_{other.split(':')[1]}"] = rate["pipeline:auto"] / rate[other]
    # The pipeline's own overhead: against bare Keras at the same precision (float32).
    float32 = "pipeline:auto" if results["pipeline:auto"]["precision"] == "float32" else other
    report["pipeline_float32_over_bare"] = rate[float32] / rate["bare"]

    print(f"\n{report['device']}; {args.images} images x {args.epochs} epochs, batch {BATCH}")
    print(f"{'run':<26}{'precision':<16}{'img/s':>8}{'peak MB':>10}")
    for mode, r in results.items():
        print(
            f"{mode:<26}{r['precision']:<16}{r['images_per_second']:>8.1f}{r['peak_rss_mb']:>10.0f}"
        )
    print(f"b/a pipeline / bare     {report['pipeline_over_bare']:.3f}")
    print(f"b/a both float32        {report['pipeline_float32_over_bare']:.3f}")
    print(f"b/c pipeline / tutorial {report['pipeline_over_tutorial']:.3f}")
    print(f"auto / {other.split(':')[1]:<16} {report[f'auto_over_{other.split(chr(58))[1]}']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
