"""Training throughput, side by side on the same data and machine: `make bench`.

    python -m benchmarks.throughput [--images 1280] [--epochs 3] [--rounds 3] [--batch-size 128]
                                    [--prepared data/prepared | --imagefolder DATASET]
                                    [--sweep 256,512,1024] [--out results.json]
                                    [--with-bfloat16] [--params params.yaml]

Measures the default network (params.yaml's `model`; `--params` reads another
file's) three ways, each in its own process so peak memory is its own:

  a. bare   `model.fit` on in-memory float32 tensors, no augmentation: what
            Keras itself reaches here, the upper bound;
  b. pipeline   the pipeline's real training path, `pipeline.train.run_training`:
            its tf.data input with augmentation, its callbacks (checkpoint,
            MLflow logging per epoch) and its precision choice (the params'
            train.precision, `auto` in params.yaml; its JSON key stays
            "pipeline:auto");
  c. tutorial   the original tutorial's recipe: Keras's ImageDataGenerator
            augmentation (rotation 10, shifts 5/32, flips) feeding `model.fit`.

plus (b) again in float32 when `auto` picked a reduced precision (b/a at equal
precision needs it), and, once, the pipeline's input alone (`input`: its tf.data
batches with augmentation, drawn as fast as they come, no model): where that
is not far above (b), the input pipeline is what limits training. Where `auto`
picked float32, the CPU has no native bfloat16 and TensorFlow emulates it,
several times slower than float32 (BENCHMARKS.md): mixed_bfloat16 is measured
there only with --with-bfloat16.
Each run trains `--epochs` epochs of `--images` images; the first epoch (graph
tracing, warm-up) is dropped. An epoch's time runs from the end of the one
before to its own end, all work between steps included: the pipeline's
checkpoint and MLflow logging (after Keras's on_epoch_end), Keras's own
callbacks and the next epoch's start. The modes take turns, `--rounds` times (a, b,
c, b', a, b, c, b', ...), so that a machine that slows down or speeds up
part-way (shared CPUs, clocks, a neighbour's job) weighs on every mode alike;
each mode's figure is the median images/s of all its measured epochs.
Every mode runs with the stages' TensorFlow switches
(`pipeline.startup.set_tensorflow_environment`: oneDNN on x86-64), so the
three differ only in their own code; TF_ENABLE_ONEDNN_OPTS=0 measures all of
them without oneDNN. Prints a table with the ratios b/a and b/c and writes
JSON. Random uint8 images stand in for CIFAR-10 (throughput does not depend
on pixel values); `--prepared data/prepared` uses the real prepared split,
`--imagefolder ../shared/data/cifar10-jpeg.tar.gz` an image-folder dataset
(archive or folder) read as `prepare` reads it, once, into a scratch folder.
`--sweep 256,512,1024` also measures (b) at those batch sizes, once each after
the rounds, for the fastest batch a device takes (BENCHMARKS.md, "GPU").
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

from pipeline import paths
from pipeline.startup import nvidia_device

ROOT = Path(__file__).resolve().parents[1]


def load_images(prepared: str | None, count: int):
    import numpy as np

    from pipeline.prepared import Split, load_meta, load_split

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


def prepare_imagefolder(source: Path, params, out_dir: Path) -> int:
    """Read an image-folder dataset as the prepare stage does and write its training images
    to `out_dir` as a prepared folder (no validation split); returns their count. Without
    a test/ folder a tenth is held out, as `prepare` would be told to."""
    import dataclasses

    from pipeline.imagefolder import find_layout, open_dataset, read_imagefolder
    from pipeline.prepare import prepare
    from pipeline.prepared import write_prepared

    with open_dataset(source) as (members, _):  # a listing: has it its own test/?
        layout = find_layout(members, source)
    has_test = len(layout.images) > layout.num_train
    data = dataclasses.replace(
        params.data, format="imagefolder", url=source.resolve().as_uri(), md5="",
        test_size=0 if has_test else max(1, layout.num_train // 10), val_size=0,
    )  # fmt: skip
    splits, meta = prepare(read_imagefolder(source, data), val_size=0, seed=data.seed)
    write_prepared(out_dir, splits, meta)
    return meta["sizes"]["train"]


def rates_between(ends: list[float], images_per_epoch: int) -> list[float]:
    """Images/s of each epoch after the first, from the clock at each epoch's end."""
    pairs = zip(ends[:-1], ends[1:], strict=True)
    return [images_per_epoch / (end - before) for before, end in pairs]


def epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends: list[float] = []

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(time.perf_counter())

    return EpochTimer()


def device_peak_mb() -> float | None:
    """Peak memory on the first GPU so far, in MB; None on a CPU."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def run_keras(mode: str, params, split, meta, epochs: int, batch: int) -> dict:
    """Modes a (bare) and c (tutorial): plain model.fit, timed per epoch."""
    import keras
    import numpy as np

    from pipeline.device import resolve_device
    from pipeline.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(
        params.model, num_classes=10, image_size=32, mean=meta["mean"], std=meta["std"]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=resolve_device(params.train).jit_compile,  # XLA where the pipeline uses it
    )  # fmt: skip
    timer = epoch_timer()
    images, labels = full_batches(split, batch)
    images = images.astype(np.float32)  # in-memory float tensors
    steps = len(labels) // batch
    if mode == "bare":  # no augmentation
        model.fit(
            images, labels, batch_size=batch, epochs=epochs, callbacks=[timer], verbose=0,
            shuffle=True,
        )  # fmt: skip
    else:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

        generator = ImageDataGenerator(
            rotation_range=10, width_shift_range=5 / 32, height_shift_range=5 / 32,
            horizontal_flip=True,
        )  # fmt: skip
        flow = generator.flow(images, labels, batch_size=batch)
        model.fit(flow, steps_per_epoch=steps, epochs=epochs, callbacks=[timer], verbose=0)
    rates = rates_between(timer.ends, steps * batch)
    return {"images_per_second": statistics.median(rates), "epoch_rates": rates}


def full_batches(split, batch: int):
    """The images and labels of the whole batches the split holds, as (b) trains on: with
    the rest, Keras's legacy iterator (c) would end each pass on a short batch (another
    shape, traced anew, and fewer images than an epoch's time is divided by)."""
    kept = len(split.labels) // batch * batch
    return split.images[:kept], split.labels[:kept]


def measured_params(params, precision: str, epochs: int, batch: int):
    """The params mode b trains with: the file's, at this length and batch, in `precision`
    ("auto": the file's own train.precision, which is `auto` in params.yaml)."""
    import dataclasses

    if precision == "auto":
        precision = params.train.precision
    train_cfg = dataclasses.replace(
        params.train, epochs=epochs, batch_size=batch, precision=precision
    )
    return dataclasses.replace(params, train=train_cfg)


def run_pipeline(precision: str, params, split, meta, epochs: int, batch: int) -> dict:
    """Mode b: the train stage's own code path in a scratch directory with its own MLflow store."""
    from pipeline import paths, tracking
    from pipeline.data import steps_per_epoch
    from pipeline.prepared import Split
    from pipeline.progress import EpochRecorder
    from pipeline.train import run_training

    params = measured_params(params, precision, epochs, batch)
    empty = Split(split.images[:0], split.labels[:0])
    ends: list[float] = []
    end_epoch = EpochRecorder.end_epoch

    def timed_end_epoch(self, *args, **kwargs):  # the clock stops once checkpoint and log are done
        end_epoch(self, *args, **kwargs)
        ends.append(time.perf_counter())

    EpochRecorder.end_epoch = timed_end_epoch
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        os.chdir(scratch)
        try:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
            tracking.connect(Path(scratch))
            run_training(params, meta, split, empty)
            summary = json.loads(paths.TRAIN_METRICS.read_text())
        finally:
            os.chdir(ROOT)  # out of the folder before it is removed
            EpochRecorder.end_epoch = end_epoch
    rates = rates_between(ends, steps_per_epoch(len(split.labels), batch) * batch)
    return {
        "images_per_second": statistics.median(rates), "epoch_rates": rates,
        "precision": summary["precision"],
    }  # fmt: skip


def run_input(params, split, epochs: int, batch: int, augmented: bool = True) -> dict:
    """The pipeline's input alone: the train stage's tf.data batches, augmented as its params
    say (or not at all), drawn as fast as they come with no model; timed per epoch as the
    others are."""
    from pipeline.data import make_dataset, steps_per_epoch

    steps = steps_per_epoch(len(split.labels), batch)
    dataset = make_dataset(
        split, batch, training=True, augment=params.train.augment if augmented else None,
        seed=params.train.seed, epochs=epochs,
    )  # fmt: skip
    ends, batches = [], iter(dataset)
    for _ in range(epochs):
        for _ in range(steps):
            next(batches)
        ends.append(time.perf_counter())
    rates = rates_between(ends, steps * batch)
    return {
        "images_per_second": statistics.median(rates), "epoch_rates": rates,
        "images_per_epoch": steps * batch,  # whole batches: training drops the remainder
    }  # fmt: skip


def child(mode: str, args: argparse.Namespace) -> None:
    """Run one measurement in this process and print its JSON on the last line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.config import load_params
    from pipeline.startup import import_tensorflow, onednn_enabled

    # As the stages start: their TensorFlow switches (oneDNN), GPU memory taken as needed.
    tf = import_tensorflow()

    params = load_params(args.params)
    split, meta = load_images(args.prepared, args.images)
    if mode in ("bare", "tutorial"):
        result = run_keras(mode, params, split, meta, args.epochs, args.batch_size)
        result["precision"] = "float32"
    elif mode == "input":
        result = run_input(params, split, args.epochs, args.batch_size)
        result["precision"] = "uint8"  # no arithmetic in a model: the batches as fed
    else:
        result = run_pipeline(mode.split(":")[1], params, split, meta, args.epochs, args.batch_size)
    result["images"] = len(split.labels) // args.batch_size * args.batch_size  # whole batches
    result["gpus"] = len(tf.config.list_physical_devices("GPU"))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_gpu_mb"] = device_peak_mb()
    result["onednn"] = onednn_enabled()
    print(json.dumps(result))


def one_gpu() -> dict[str, str]:
    """The environment every mode runs in: one GPU. The pipeline's path would otherwise
    mirror over all of a machine's GPUs while bare fit and the tutorial train on the first.
    A CUDA_VISIBLE_DEVICES of the user's own is kept (and recorded in the JSON)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}


def measure(mode: str, args: argparse.Namespace, label: str = "", batch: int | None = None) -> dict:
    batch = batch or args.batch_size
    command = [sys.executable, "-m", "benchmarks.throughput", "--child", mode,
               "--images", str(args.images), "--epochs", str(args.epochs),
               "--batch-size", str(batch),
               "--params", str(args.params.resolve())]  # fmt: skip
    if args.prepared:
        command += ["--prepared", str(Path(args.prepared).resolve())]
    print(f"bench: {label}{mode} ...", flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=one_gpu())
    if result.returncode != 0:
        raise SystemExit(f"bench: {mode} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1")
    if nvidia_device() and not measured["gpus"] and not hidden:
        raise SystemExit(
            "bench: an NVIDIA driver is loaded here but TensorFlow sees no GPU, so this would "
            "measure the CPU: install TensorFlow's CUDA build (make bench GPU=1, or pip "
            "install -e '.[gpu]'), or set CUDA_VISIBLE_DEVICES=-1 to measure the CPU on purpose"
        )
    print(
        f"bench: {label}{mode}: {measured['images_per_second']:.1f} img/s "
        f"({measured['precision']}), peak {measured['peak_rss_mb']:.0f} MB"
        + (f", GPU peak {measured['peak_gpu_mb']:.0f} MB" if measured["peak_gpu_mb"] else ""),
        flush=True,
    )
    return measured


def comparison_precision(auto: str, with_bfloat16: bool) -> str | None:
    """The pipeline's precision measured beside `auto`'s choice, or None for none."""
    if auto != "float32":
        return "float32"  # the pipeline's own overhead is judged at bare Keras's precision
    return "mixed_bfloat16" if with_bfloat16 else None


def interleaved(args: argparse.Namespace) -> dict:
    """Every mode once per round, in turn; per mode, the median of all its measured epochs."""
    modes = ["bare", "pipeline:auto", "tutorial"]
    rounds: dict[str, list[dict]] = {}
    for index in range(args.rounds):
        for mode in modes:
            rounds.setdefault(mode, []).append(
                measure(mode, args, f"round {index + 1}/{args.rounds}: ")
            )
        if index == 0:  # the other precision of the pipeline, as a comparison
            auto = rounds["pipeline:auto"][0]["precision"]
            other = comparison_precision(auto, args.with_bfloat16)
            if other is None:
                note = (
                    "the pipeline trained in float32 (auto without native bfloat16, or the "
                    "params file's choice): mixed_bfloat16 not measured"
                )
                print(f"bench: {note} (--with-bfloat16 measures it)", flush=True)
            else:
                modes.append(f"pipeline:{other}")
                rounds[modes[-1]] = [measure(modes[-1], args, f"round 1/{args.rounds}: ")]
        if index == 0:  # the input pipeline alone, once: is it what limits (b)?
            rounds["input"] = [measure("input", args, f"round 1/{args.rounds}: ")]
    for batch in dict.fromkeys(args.sweep):  # (b) at other batch sizes, once each
        if batch == args.batch_size:  # measured in every round already
            continue
        rounds[f"pipeline:auto@{batch}"] = [
            measure("pipeline:auto", args, f"batch {batch}: ", batch=batch)
        ]
    results = {}
    for mode, runs in rounds.items():
        rates = [rate for run in runs for rate in run["epoch_rates"]]
        results[mode] = {
            "images_per_second": statistics.median(rates),
            "round_medians": [run["images_per_second"] for run in runs],
            "epoch_rates": rates,
            "precision": runs[0]["precision"],
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "peak_gpu_mb": max((run["peak_gpu_mb"] or 0 for run in runs), default=0) or None,
            "onednn": runs[0]["onednn"],
            "images": runs[0]["images"],  # per epoch, in whole batches of --images or the data
        }
    return results


def device() -> str:
    from pipeline.startup import import_tensorflow

    tf = import_tensorflow()  # without its start-up lines, as the stages import it

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


def batch_sizes(text: str) -> list[int]:
    """--sweep's comma-separated batch sizes."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 256,512,1024, got {text!r}")
    return sizes


def versions() -> dict[str, str | None]:
    """What produced the figures: the commit (with "+changes" when the tree differs from it)
    and the libraries that train."""
    from importlib.metadata import version

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    return {"commit": commit, "tensorflow": version("tensorflow"), "keras": version("keras")}


def onednn_label(enabled: bool | None) -> str:
    return {True: "on", False: "off", None: "unknown"}[enabled]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1280, help="training images per epoch")
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per run; the first is dropped"
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns each mode takes")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--prepared", help="use this prepared-data folder instead of random images")
    data.add_argument(
        "--imagefolder", type=Path,
        help="use this image-folder dataset's training images (archive or folder), read once",
    )  # fmt: skip
    parser.add_argument(
        "--sweep", type=batch_sizes, default=[],
        help="also measure the pipeline at these batch sizes, once each (e.g. 256,512,1024)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/throughput.json")
    parser.add_argument(
        "--with-bfloat16", action="store_true",
        help="also measure mixed_bfloat16 where auto picked float32 (emulated there: slow)",
    )  # fmt: skip
    parser.add_argument(
        "--params", type=Path, default=ROOT / paths.PARAMS,
        help="params file whose model (and train settings) to measure",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    largest = max([args.batch_size, *args.sweep])
    if args.rounds < 1 or args.epochs < 2 or args.batch_size < 1 or args.images < largest:
        parser.error(
            "need --rounds >= 1, --epochs >= 2 (the first is dropped) and "
            "--images >= --batch-size >= 1 (and >= every --sweep size)"
        )
    if args.child:
        return child(args.child, args)

    os.environ.update(one_gpu())  # here too: the device named in the JSON is the one measured
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        source = "random uint8 images"
        if args.imagefolder:
            if not args.imagefolder.exists():
                parser.error(f"--imagefolder {args.imagefolder}: no such file or folder")
            from pipeline.config import load_params

            print(f"bench: reading {args.imagefolder} ...", flush=True)
            prepare_imagefolder(args.imagefolder, load_params(args.params), Path(scratch))
            args.prepared, source = scratch, str(args.imagefolder)
        elif args.prepared:
            source = str(args.prepared)
        results = interleaved(args)
    rate = {mode: r["images_per_second"] for mode, r in results.items()}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": device(),
        "cuda_visible_devices": os.environ["CUDA_VISIBLE_DEVICES"],  # as one_gpu set it
        "onednn": results["pipeline:auto"]["onednn"],
        "data": source,
        "images_per_epoch": results["bare"]["images"], "epochs": args.epochs,
        "rounds": args.rounds, "batch_size": args.batch_size, "params": str(args.params),
        **versions(),
        "results": results,
        "pipeline_over_bare": rate["pipeline:auto"] / rate["bare"],
        "pipeline_over_tutorial": rate["pipeline:auto"] / rate["tutorial"],
    }  # fmt: skip
    other = next(
        (m for m in results if m.startswith("pipeline:") and m != "pipeline:auto" and "@" not in m),
        None,
    )  # the comparison precision, not a --sweep batch size
    if other:
        report[f"auto_over_{other.split(':')[1]}"] = rate["pipeline:auto"] / rate[other]
    # The pipeline's own overhead: against bare Keras at the same precision (float32).
    float32 = "pipeline:auto" if results["pipeline:auto"]["precision"] == "float32" else other
    report["pipeline_float32_over_bare"] = rate[float32] / rate["bare"]
    report["input_over_pipeline"] = rate["input"] / rate["pipeline:auto"]
    pipeline_rates = {args.batch_size: rate["pipeline:auto"]}
    pipeline_rates.update({int(m.split("@")[1]): rate[m] for m in results if "@" in m})
    fastest = max(pipeline_rates, key=pipeline_rates.get)
    report["fastest_batch_size"] = fastest
    report["fastest_images_per_second"] = pipeline_rates[fastest]

    print(
        f"\n{report['device']}, oneDNN {onednn_label(report['onednn'])}; {args.rounds} rounds "
        f"of {report['images_per_epoch']} images ({source}) x {args.epochs} epochs, "
        f"batch {args.batch_size}"
    )
    gpu = any(r["peak_gpu_mb"] for r in results.values())
    print(f"{'run':<26}{'precision':<16}{'img/s':>8}{'peak MB':>10}" + ("  GPU MB" if gpu else ""))
    for mode, r in results.items():
        print(
            f"{mode:<26}{r['precision']:<16}{r['images_per_second']:>8.1f}{r['peak_rss_mb']:>10.0f}"
            + (f"{r['peak_gpu_mb'] or 0:>8.0f}" if gpu else "")
        )
    print(f"b/a pipeline / bare     {report['pipeline_over_bare']:.3f}")
    print(f"b/a both float32        {report['pipeline_float32_over_bare']:.3f}")
    print(f"b/c pipeline / tutorial {report['pipeline_over_tutorial']:.3f}")
    print(f"input alone / pipeline  {report['input_over_pipeline']:.3f}")
    if args.sweep:
        print(f"fastest batch {fastest}: {pipeline_rates[fastest]:.1f} img/s")
    if other:
        precision = other.split(":")[1]
        print(f"auto / {precision:<16} {report[f'auto_over_{precision}']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
