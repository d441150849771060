"""data/prepared: its format, read and written here, and the digests of its splits.

The one module every stage that touches data/prepared imports, and the one their
dvc.yaml entries list: prepare writes the files, train and evaluate read them, and
train records the digests that evaluate and the registry compare, so a change here
re-runs all three (prepare.py itself, the reading of archives, re-runs prepare only).

Files: `train.npz`, `val.npz`, `test.npz` (`images` (N, S, S, 3) uint8, `labels` (N,)
int32) and `meta.json` (class names, image size S, split sizes, per-channel mean and
std of the training split in 0-255 pixel units).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import files, paths
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int32


def write_prepared(out_dir: Path, splits: dict[str, Split], meta: dict) -> None:
    """Write each file under a temporary name, then rename, so none is ever half-written."""
    for name in paths.SPLITS:  # each one: a split missing here would be a stale file there
        with files.replacing(paths.split_file(out_dir, name)) as partial:
            np.savez(partial, images=splits[name].images, labels=splits[name].labels)
    files.write_text(out_dir / paths.META_FILE, json.dumps(meta, indent=2) + "\n")


def load_split(prepared_dir: Path, split: str) -> Split:
    """Load one prepared split; a clear error says to run prepare if it is missing."""
    path = paths.split_file(prepared_dir, split)
    try:
        with np.load(path) as data:
            return Split(data["images"], data["labels"])
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `dvc repro prepare` first") from None
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise PipelineError(  # EOFError: an empty file; BadZipFile: a truncated one
            f"{path}: unreadable prepared data ({error}); run `dvc repro prepare` again"
        ) from None


# What prepare writes to meta.json, and train and evaluate read.
META_KEYS = ("class_names", "image_size", "sizes", "mean", "std")


def load_meta(prepared_dir: Path) -> dict:
    path = prepared_dir / paths.META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `dvc repro prepare` first") from None
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path}: not valid JSON ({error}); run `dvc repro prepare`") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:  # edited by hand, or another tool's
        raise PipelineError(
            f"{path}: not what prepare writes (no {', '.join(missing)}); run `dvc repro prepare`"
        )
    return meta


def data_digest(*arrays: np.ndarray) -> str:
    """A hash of the arrays' shapes and bytes: exactly these images and labels.

    Training's recovery state keeps the one of its data, the registry the test split's.

    blake2b hashes the full training split (138 MB) in about 0.2 s here, nothing
    beside an epoch; meta.json alone would miss, say, relabelled images.
    """
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def training_data_digest(train: Split, val: Split) -> str:
    """The images training learns from, train and validation splits: the recovery state's
    `data` and model_info.json's `training_data`, which evaluate compares."""
    return data_digest(train.images, train.labels, val.images, val.labels)


def digest_of_test_set(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> str:
    """A hash of the test set as a set of (image, class name) pairs, in no order.

    The registry compares models only on the same test images. The same images in
    another order are the same test set: the canonical archive's batches and an image
    folder read class by class hold the same images in different orders.
    """
    pairs = sorted(
        hashlib.blake2b(image.tobytes() + class_names[int(label)].encode(), digest_size=16).digest()
        for image, label in zip(images, labels, strict=True)
    )
    digest = hashlib.blake2b(f"{images.dtype.str}{images.shape}".encode(), digest_size=16)
    for pair in pairs:
        digest.update(pair)
    return digest.hexdigest()
