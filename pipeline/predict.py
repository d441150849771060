"""predict: classify image files with the trained model or any MLflow model.

    python -m pipeline.predict cat.png dog.jpg
    python -m pipeline.predict --model models:/cifar10-resnet@champion --json photos/*.jpg
    python -m pipeline.predict photos/     # a folder: its PNG, JPEG, BMP and GIF files

Images of any size and colour mode (greyscale, palette, RGBA, CMYK, 16-bit)
are turned upright by their EXIF orientation, converted to RGB, centre-cropped
to a square and resized to the model's input size. A file that cannot be read
is reported by name and the others still classified; the exit status is 1 if
any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.errors import PipelineError, cli
from pipeline.images import load_image
from pipeline.startup import import_tensorflow

BATCH_SIZE = 256  # images per forward pass of a local .keras model (memory, not results)


@dataclass(frozen=True)
class Predictor:
    predict: Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) uint8 -> (N, classes) probabilities
    class_names: list[str]
    image_size: int


def load_predictor(model: str) -> Predictor:
    """A local .keras file (class names from models/model_info.json) or any MLflow model URI."""
    import keras

    keras.config.disable_interactive_logging()  # no progress bars between results
    if _is_mlflow_model(model):
        return _mlflow_predictor(model)
    return _keras_predictor(Path(model))


def _is_mlflow_model(model: str) -> bool:
    """A URI (models:/, runs:/, mlflow-artifacts:/, s3://, file:...) or a logged model's folder."""
    if (Path(model) / "MLmodel").is_file():
        return True
    if Path(model).is_file():  # even with a colon in its name
        return False
    scheme, colon_slash, _ = model.partition(":/")
    return bool(colon_slash) and len(scheme) > 1 and scheme.replace("-", "").isalnum()  # not C:/


def _keras_predictor(path: Path) -> Predictor:
    from pipeline.model import load_saved_model, predict_batches, read_model_info

    if not path.exists():
        raise PipelineError(
            f"{path}: no such model; train one with `dvc repro train` (from the repository "
            "root), or pass --model a .keras file or a URI such as models:/cifar10-resnet@champion"
        )
    info_file = path.parent / paths.MODEL_INFO.name
    try:
        info = read_model_info(info_file, ("class_names", "image_size"))
    except FileNotFoundError:
        raise PipelineError(
            f"{info_file}: not found beside {path}; copy the model_info.json train wrote "
            "with this model beside it, or run `dvc repro train`"
        ) from None
    class_names, image_size = info["class_names"], info["image_size"]
    model = load_saved_model(path)
    # model_info.json from another training would name the wrong classes, or too few.
    outputs, size = model.output_shape[-1], model.input_shape[1]
    if len(class_names) != outputs or image_size != size:
        raise PipelineError(
            f"{info_file} ({len(class_names)} classes, {image_size} px) does not belong to "
            f"{path} ({outputs} classes, {size} px); copy the model_info.json train wrote "
            "with this model beside it, or run `dvc repro train`"
        )
    return Predictor(
        lambda images: predict_batches(model, images, BATCH_SIZE), class_names, image_size
    )


def _mlflow_predictor(uri: str) -> Predictor:
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    # Registry and run URIs are read through the tracking store; reading must not create
    # one, and a default SQLite store that is not there means we run outside the repository.
    store = tracking.tracking_uri(tracking.repository_root())
    local = tracking.sqlite_file(store)
    needs_store = uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))
    if needs_store and local is not None and not local.is_file():
        raise PipelineError(
            f"cannot load model {uri}: no MLflow store at {local}; run this from the "
            "repository root, or set MLFLOW_TRACKING_URI to the tracking server"
        )
    tracking.quiet_mlflow_logs()
    mlflow.set_tracking_uri(store)
    where = f" from {tracking.redact(store)}" if needs_store else ""
    try:
        # A model fetched from a server or bucket lands in a folder MLflow never removes
        # (17 MB a call); this one goes once the weights are in memory.
        # An unreachable server fails in seconds, not after MLflow's minutes of retries.
        with tempfile.TemporaryDirectory(prefix="pipeline-predict-") as download:
            with tracking.few_retries():
                model = mlflow.pyfunc.load_model(uri, dst_path=download)
    except MlflowException as error:
        raise PipelineError(
            f"cannot load model {uri}{where}: "
            f"{tracking.redact((str(error).splitlines() or [''])[0])}"
        ) from None
    except ImportError as error:  # s3://, gs://, ... need their client package
        raise PipelineError(
            f"cannot load model {uri}: {error}; install the package it names"
        ) from None
    except Exception as error:  # a damaged MLmodel or model file: the model's, not ours
        first = (str(error).splitlines() or [""])[0]
        raise PipelineError(
            f"cannot load model {uri}{where}: {type(error).__name__}: {tracking.redact(first)}"
        ) from None
    class_names = (model.metadata.metadata or {}).get("class_names")
    if not class_names:
        raise PipelineError(f"{uri}: the model has no class_names metadata; log it with train")
    size = _image_size(uri, model.metadata.get_input_schema())
    outputs = _output_width(model.metadata.get_output_schema())
    if outputs is not None and outputs != len(class_names):
        raise PipelineError(
            f"{uri}: the model has {outputs} outputs but its metadata names "
            f"{len(class_names)} classes; log it with train"
        )
    return Predictor(lambda images: np.asarray(model.predict(images)), class_names, size)


def _image_size(uri: str, schema) -> int:
    """S from the signature of a model train logs: one uint8 tensor (-1, S, S, 3)."""
    spec = schema.inputs[0] if schema is not None and schema.is_tensor_spec() else None
    shape = tuple(spec.shape) if spec is not None else ()
    if (
        spec is None or len(schema.inputs) != 1 or np.dtype(spec.type) != np.uint8
        or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[1] < 1
    ):  # fmt: skip
        takes = "no input signature" if schema is None else f"input {schema.to_json()}"
        raise PipelineError(
            f"{uri}: the model has {takes}, not the uint8 images (-1, S, S, 3) a model "
            "logged by train takes; pass one that train logged"
        )
    return int(shape[1])


def _output_width(schema) -> int | None:
    """The class count of a tensor output signature; None where the model has none."""
    if schema is None or not schema.is_tensor_spec() or len(schema.inputs) != 1:
        return None
    shape = tuple(schema.inputs[0].shape)
    return int(shape[-1]) if len(shape) == 2 and shape[-1] > 0 else None


def expand_folders(paths: list[Path]) -> list[Path]:
    """Each folder replaced by the image files directly in it, by name; files kept as given.

    Image files are those prepare reads from a class folder (PNG, JPEG, BMP, GIF, by
    extension), hidden ones left out. A folder without any, or one that cannot be
    listed, stays as given, for classify to report.
    """
    from pipeline.imagefolder import IMAGE_SUFFIXES  # imagefolder imports this module

    expanded = []
    for path in paths:
        try:
            images = sorted(
                entry for entry in path.iterdir()
                if not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_SUFFIXES
                and entry.is_file()
            ) if path.is_dir() else []  # fmt: skip
        except OSError:  # permission denied: load_image names it
            images = []
        expanded += images or [path]
    return expanded


def classify(predictor: Predictor, files: list[Path], top: int) -> list[dict]:
    """One result per file, in order: its top classes, or the error that stopped it."""
    results: list[dict] = [{"image": str(f)} for f in files]
    images, readable = [], []
    for i, file in enumerate(files):
        try:
            images.append(load_image(file, predictor.image_size))
            readable.append(i)
        except ValueError as error:
            results[i]["error"] = str(error)
    if images:
        probabilities = predictor.predict(np.stack(images))
        if not np.isfinite(probabilities).all():  # NaN would print as figures, and break JSON
            raise PipelineError(
                "the model predicts NaN or infinite probabilities: its training diverged; "
                "train it again with a lower train.learning_rate"
            )
        for i, row in zip(readable, probabilities, strict=True):
            best = np.argsort(-row)[:top]
            results[i]["predictions"] = [
                {"class": predictor.class_names[c], "probability": float(row[c])} for c in best
            ]
    return results


def format_table(results: list[dict]) -> str:
    width = max([len("image")] + [len(r["image"]) for r in results])
    lines = []
    for result in results:
        if "error" in result:
            lines.append(f"{result['image']:<{width}}  error: {result['error']}")
        else:
            guesses = "  ".join(
                f"{p['class']} {p['probability']:.3f}" for p in result["predictions"]
            )
            lines.append(f"{result['image']:<{width}}  {guesses}")
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "images", nargs="+", type=Path, help="PNG, JPEG, ... files, or folders of them"
    )
    parser.add_argument(
        "--model",
        default=str(paths.MODEL_FILE),
        help="a .keras file or an MLflow model URI such as models:/cifar10-resnet@champion "
        "(default: %(default)s)",
    )
    parser.add_argument("--top", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    import_tensorflow()  # without its start-up chatter between the results
    predictor = load_predictor(args.model)
    results = classify(predictor, expand_folders(args.images), args.top)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    failed = [r for r in results if "error" in r]
    if failed and not args.json:  # the table names each failure already
        print(f"error: {len(failed)} of {len(results)} images failed", file=sys.stderr)
    elif failed:  # JSON on stdout is for programs; people read stderr
        for result in failed:
            print(f"error: {result['image']}: {result['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
