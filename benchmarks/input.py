"""The input pipeline alone: how fast the train stage's tf.data batches come, no model.

    python -m benchmarks.input [--imagefolder DATASET | --prepared data/prepared]
                               [--images 25600] [--epochs 3] [--rounds 2]
                               [--batch-sizes 128,512] [--params params.yaml]
                               [--out benchmarks/results/input.json]

The training input the train stage builds (`pipeline.data.make_dataset`: a
seeded shuffle per epoch, batches gathered from the uint8 images, augmented
in parallel as the params' `train.augment` says, prefetched), drawn as fast
as it comes with nothing consuming it, two ways taking turns `--rounds` times
at each batch size: `augmented`, as training feeds the model, and `plain`,
the same batches without augmentation (what the augmentation costs is the
gap). Each figure is the median images/s of the epochs after the first
(tf.data's warm-up). Training cannot run faster than `augmented`: where a
device trains near that rate, the input pipeline is what limits it
(issue 6; BENCHMARKS.md, "GPU"). All in one process, on the CPUs this
process may use. Random uint8 images stand in unless `--imagefolder` (read
once as `prepare` reads it, e.g. ../shared/data/cifar10-jpeg.tar.gz) or
`--prepared` gives real ones: the transforms do the same work on any pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.throughput import (
    ROOT,
    batch_sizes,
    device,
    load_images,
    prepare_imagefolder,
    run_input,
    versions,
)
from pipeline import paths

WAYS = ("augmented", "plain")


def measure(params, split, epochs: int, rounds: int, sizes: list[int]) -> dict:
    """{"<way>@<batch>": {"images_per_second": median, "epoch_rates": [...],
    "images_per_epoch": whole batches}}, taking turns."""
    rates: dict[str, list[float]] = {}
    drawn: dict[str, int] = {}
    for index in range(rounds):
        for batch in sizes:
            for way in WAYS:
                measured = run_input(params, split, epochs, batch, way == "augmented")
                rates.setdefault(f"{way}@{batch}", []).extend(measured["epoch_rates"])
                drawn[f"{way}@{batch}"] = measured["images_per_epoch"]
                print(
                    f"input bench: round {index + 1}/{rounds}: {way}, batch {batch}: "
                    f"{measured['images_per_second']:.0f} img/s",
                    flush=True,
                )
    return {
        key: {
            "images_per_second": statistics.median(values),
            "epoch_rates": values,
            "images_per_epoch": drawn[key],
        }
        for key, values in rates.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--prepared", help="a prepared-data folder's training images")
    data.add_argument(
        "--imagefolder", type=Path, help="an image-folder dataset's training images, read once"
    )
    parser.add_argument("--images", type=int, default=25600, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first dropped")
    parser.add_argument("--rounds", type=int, default=2, help="turns each way takes")
    parser.add_argument("--batch-sizes", type=batch_sizes, default=[128, 512])
    parser.add_argument("--params", type=Path, default=ROOT / paths.PARAMS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/input.json")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.epochs < 2 or args.images < max(args.batch_sizes):
        parser.error("need --rounds >= 1, --epochs >= 2 and --images >= every batch size")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.config import load_params
    from pipeline.startup import import_tensorflow

    import_tensorflow()  # the stages' TensorFlow switches, without the start-up chatter
    params = load_params(args.params)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        source = args.prepared or "random uint8 images"
        if args.imagefolder:
            if not args.imagefolder.exists():
                parser.error(f"--imagefolder {args.imagefolder}: no such file or folder")
            print(f"input bench: reading {args.imagefolder} ...", flush=True)
            prepare_imagefolder(args.imagefolder, params, Path(scratch))
            args.prepared, source = scratch, str(args.imagefolder)
        split, _ = load_images(args.prepared, args.images)
        results = measure(params, split, args.epochs, args.rounds, args.batch_sizes)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": device(), "cpus": cpus,
        "data": source, "images": len(split.labels), "epochs": args.epochs,
        "rounds": args.rounds, "params": str(args.params),
        "augment": dataclasses.asdict(params.train.augment),
        **versions(), "results": results,
    }  # fmt: skip
    print(
        f"\n{report['device']}; {cpus} CPUs for tf.data; {len(split.labels)} images ({source}), "
        "whole batches of them per epoch"
    )
    for batch in args.batch_sizes:
        augmented = results[f"augmented@{batch}"]["images_per_second"]
        plain = results[f"plain@{batch}"]["images_per_second"]
        print(f"batch {batch:<6} augmented {augmented:>10.0f} img/s   plain {plain:>10.0f} img/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
