"""What sharpness-aware minimization costs per step: plain steps against SAM steps.

    python -m benchmarks.sam [--steps 8] [--rounds 3] [--batch-size 128] [--params params.yaml]

The default network (params.yaml's `model`), compiled as the train stage compiles it
(its optimizer, loss and precision choice), on random uint8 images in memory: one
model takes plain steps, an identical one SAM steps (`pipeline.sam`, switched on from
the first epoch). The two take turns, `--rounds` times, each an epoch of `--steps`
steps after a first untimed epoch (tracing). Prints the median images per second of
each and their ratio; SAM's two forward and backward passes per step put it near 0.5.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from pipeline import paths

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per mode")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--params", type=Path, default=ROOT / paths.PARAMS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.startup import import_tensorflow

    import_tensorflow()
    import keras
    import numpy as np

    from pipeline.config import load_params
    from pipeline.device import resolve_device
    from pipeline.model import SmoothedCrossentropy, build_model
    from pipeline.optimizer import make_optimizer
    from pipeline.sam import sharpness_aware

    params = load_params(args.params)
    device = resolve_device(params.train)
    keras.mixed_precision.set_global_policy(device.precision)
    count = args.steps * args.batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.int32)

    def compiled(sam: bool):
        keras.utils.set_random_seed(0)
        model = build_model(params.model, num_classes=10, image_size=32, mean=[128.0] * 3,
                            std=[64.0] * 3)  # fmt: skip
        model.compile(
            optimizer=make_optimizer(params.train, 1000, device.precision),  # as train has it
            loss=SmoothedCrossentropy(params.train.label_smoothing),
            metrics=["accuracy"], jit_compile=device.jit_compile,
        )  # fmt: skip
        callbacks = [sharpness_aware(model, args.rho, 1)] if sam else []
        return model, callbacks

    models = {"plain": compiled(False), "sam": compiled(True)}
    rates: dict[str, list[float]] = {name: [] for name in models}
    for model, callbacks in models.values():  # tracing, untimed
        model.fit(images, labels, batch_size=args.batch_size, epochs=1, verbose=0,
                  callbacks=callbacks)  # fmt: skip
    for index in range(args.rounds):
        for name, (model, callbacks) in models.items():
            started = time.perf_counter()
            model.fit(images, labels, batch_size=args.batch_size, epochs=1, verbose=0,
                      callbacks=callbacks)  # fmt: skip
            rates[name].append(count / (time.perf_counter() - started))
            print(f"sam bench: round {index + 1}/{args.rounds} {name}: "
                  f"{rates[name][-1]:.1f} img/s", flush=True)  # fmt: skip
    plain, sam = (statistics.median(rates[name]) for name in ("plain", "sam"))
    print(
        f"{device.kind}, {device.precision}, batch {args.batch_size}: plain {plain:.1f} img/s, "
        f"SAM {sam:.1f} img/s; SAM / plain {sam / plain:.2f}"
    )


if __name__ == "__main__":
    main()
