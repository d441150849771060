"""prepare: the downloaded dataset -> train/val/test uint8 arrays + statistics.

With `data.format: imagefolder` the dataset is a folder of class folders, read
by `pipeline.imagefolder`. With `cifar10-python` (the default) this module reads
the canonical python layout (`cifar-10-batches-py/data_batch_1..5`,
`test_batch`, `batches.meta`) straight out of the .tar.gz, without extracting
to disk and without trusting it:

- every archive member is checked: no absolute paths, no `..`, no links or
  devices (a crafted archive is refused before anything is read);
- batches are unpickled by `SafeUnpickler`, which admits only the numpy
  globals an array needs, so a pickle asking for `os.system` is refused and
  nothing runs;
- shapes, dtypes, label range and counts are validated.

Writes to data/prepared/: `train.npz`, `val.npz`, `test.npz` (`images`
(N, S, S, 3) uint8, S = 32 for CIFAR-10, `labels` (N,) int32) and `meta.json`
(class names, image size S, split sizes, per-channel mean and std of the
training split only, in 0-255 pixel units). The validation split is stratified
by class and seeded; the test split is copied through untouched and used for
nothing but evaluation.
"""

from __future__ import annotations

import argparse
import importlib
import io
import pickle
import sys
import tarfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline import paths
from pipeline.config import load_params
from pipeline.errors import PipelineError, cli
from pipeline.prepared import Split, write_prepared

BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_BATCH = "batches.meta"
PIXELS = 32 * 32 * 3  # values per flattened CIFAR row (channels first)


class ArchiveError(PipelineError):
    """The archive is corrupt, truncated, unsafe or not in the CIFAR-10 layout."""


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    class_names: tuple[str, ...]


# --- reading the archive safely --------------------------------------------------------------


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays.

    CIFAR-10's batches were written by Python 2's cPickle; their numpy arrays
    reference `numpy.core.multiarray._reconstruct`, `numpy.ndarray` and
    `numpy.dtype`. Those (under either numpy 1 or 2 module names) are the only
    globals admitted; anything else is refused before it can be called.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name}: CIFAR-10 batches contain only "
                "numpy arrays and lists"
            )
        if name in ("_reconstruct", "scalar"):
            return getattr(_multiarray(), name)
        return getattr(np, name)


def _multiarray():
    """numpy's multiarray module: numpy._core from numpy 2, numpy.core in numpy 1.26."""
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def safe_unpickle(payload: bytes, member: str) -> dict:
    try:
        # encoding="bytes": Python 2 str objects (keys, dtype codes) stay bytes.
        obj = SafeUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise ArchiveError(f"{member}: unsafe or invalid pickle: {error}") from None
    except Exception as error:  # a malformed pickle can raise nearly anything
        raise ArchiveError(f"{member}: not a valid CIFAR-10 pickle ({error})") from None
    if not isinstance(obj, dict):
        raise ArchiveError(f"{member}: expected a dict, found {type(obj).__name__}")
    # Keys are bytes in the canonical files; accept str too.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse members that could escape an extraction directory or point elsewhere."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise ArchiveError(f"unsafe archive member {member.name!r}: path escapes the archive")
    if not (member.isfile() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise ArchiveError(f"unsafe archive member {member.name!r}: a {kind}, refused")


def read_members(archive: Path, wanted: set[str]) -> dict[str, bytes]:
    """Return {basename: bytes} of the wanted files under cifar-10-batches-py/."""
    found: dict[str, bytes] = {}
    # A folder or a zip (not a tar that merely ends in one): read only by imagefolder.
    if archive.is_dir() or (zipfile.is_zipfile(archive) and not tarfile.is_tarfile(archive)):
        if archive.is_dir():  # the batches' folder itself, or one inside
            unpacked = archive.name == BATCH_DIR or next(archive.rglob(BATCH_DIR), None)
        else:
            with zipfile.ZipFile(archive) as zipped:
                unpacked = any(BATCH_DIR in PurePosixPath(n).parts for n in zipped.namelist())
        if unpacked:  # CIFAR-10 itself, not someone's images
            raise ArchiveError(
                f"{archive}: holds CIFAR-10's {BATCH_DIR}/ batches, but data.format "
                "cifar10-python reads them from the original cifar-10-python.tar.gz only; "
                "point data.url at that archive"
            )
        raise ArchiveError(f"{archive}: {NOT_CIFAR}")
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                check_member(member)
                path = PurePosixPath(member.name)
                if member.isfile() and path.parent.name == BATCH_DIR and path.name in wanted:
                    found[path.name] = tar.extractfile(member).read()
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        reason = " ".join(str(error).split()) or type(error).__name__  # tarfile's: lines
        raise ArchiveError(
            f"{archive}: truncated or corrupt archive ({reason}); "
            f"delete it and run `dvc repro download` to fetch it again"
        ) from None
    if not found:  # a tar of something else: most likely one's own images
        raise ArchiveError(f"{archive}: {NOT_CIFAR}")
    missing = sorted(wanted - set(found))
    if missing:
        raise ArchiveError(
            f"{archive}: not the CIFAR-10 python layout, missing "
            + ", ".join(f"{BATCH_DIR}/{m}" for m in missing)
        )
    return found


NOT_CIFAR = (
    f"no {BATCH_DIR}/ batches in it, so not the CIFAR-10 python archive that data.format "
    "cifar10-python reads; for a folder or archive of your own images in class folders, "
    "set data.format: imagefolder"
)


def parse_batch(payload: bytes, member: str, num_classes: int) -> Split:
    batch = safe_unpickle(payload, member)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ArchiveError(f"{member}: 'data' must be a uint8 array of shape (N, {PIXELS})")
    if data.shape[1] != PIXELS:
        raise ArchiveError(f"{member}: 'data' rows hold {data.shape[1]} values, not {PIXELS}")
    labels = np.asarray(labels if labels is not None else [])
    if labels.size and not np.issubdtype(labels.dtype, np.integer):  # 1.7 would pass as class 1
        raise ArchiveError(f"{member}: labels must be whole numbers, found {labels.dtype} values")
    labels = labels.astype(np.int64)
    if labels.shape != (len(data),):
        raise ArchiveError(f"{member}: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ArchiveError(
            f"{member}: labels must lie in 0..{num_classes - 1}, found "
            f"{labels.min()}..{labels.max()}"
        )
    # Rows are channels-first (3, 32, 32); models want (32, 32, 3).
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return Split(images, labels.astype(np.int32))


def read_cifar10(archive: Path) -> Dataset:
    """Read and validate a cifar-10-python.tar.gz archive."""
    payloads = read_members(archive, {*TRAIN_BATCHES, TEST_BATCH, META_BATCH})
    meta = safe_unpickle(payloads[META_BATCH], META_BATCH)
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) < 2:
        raise ArchiveError(f"{META_BATCH}: 'label_names' must list at least two classes")
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    batches = [parse_batch(payloads[m], m, len(class_names)) for m in TRAIN_BATCHES]
    train = Split(
        np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches])
    )
    test = parse_batch(payloads[TEST_BATCH], TEST_BATCH, len(class_names))
    for split_name, split in (("training", train), ("test", test)):
        counts = np.bincount(split.labels, minlength=len(class_names))
        if counts.min() == 0:
            empty = class_names[int(counts.argmin())]
            raise ArchiveError(f"{archive}: the {split_name} batches hold no {empty!r} images")
    return Dataset(train, test, class_names)


# --- the pure core -----------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with `val_size` validation items drawn per class in proportion.

    Each class gives round-down of its share, and the leftover items go to the
    classes with the largest remainders, so the total is exactly `val_size`.
    """
    n = len(labels)
    if not 0 <= val_size < n:
        raise PipelineError(
            f"data.val_size: must be an integer between 0 and {n - 1} for this archive's "
            f"{n} training images, got {val_size}"
        )
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * val_size / n
    take = np.floor(share).astype(int)
    leftover = val_size - take.sum()
    take[np.argsort(-(share - take), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    val = [
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)
    ]
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, dtype=int)
    train_idx = np.setdiff1d(np.arange(n), val_idx, assume_unique=True)
    return train_idx, val_idx


MIN_STD = 1.0  # 0-255 pixel units: the smallest per-channel std the model normalizes by


def channel_stats(
    images: np.ndarray, chunk_values: int = 1 << 22
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (population) of uint8 images, in 0-255 units.

    Accumulates float64 sums chunk by chunk so memory stays at one chunk's
    float copy (`chunk_values` values, 32 MB) rather than the whole split's
    (45,000 32x32 images would be 1.1 GB), whatever the image size.
    """
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    chunk = max(1, chunk_values // int(np.prod(images.shape[1:])))  # images per chunk
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, images.shape[-1]).astype(np.float64)
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    count = images.size // images.shape[-1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    # A channel with one value in every training pixel (images with no blue, say) has std
    # 0, and the model divides by it; it tells classes apart no more at any scale, so 1
    # pixel level serves and keeps other values in other images finite.
    return mean.tolist(), np.maximum(std, MIN_STD).tolist()


def prepare(dataset: Dataset, val_size: int, seed: int) -> tuple[dict[str, Split], dict]:
    """Split off validation, compute training statistics; return splits and metadata."""
    train_idx, val_idx = stratified_split(dataset.train.labels, val_size, seed)
    splits = {
        "train": Split(dataset.train.images[train_idx], dataset.train.labels[train_idx]),
        "val": Split(dataset.train.images[val_idx], dataset.train.labels[val_idx]),
        "test": dataset.test,
    }
    counts = np.bincount(splits["train"].labels, minlength=len(dataset.class_names))
    if counts.min() == 0:  # a class of a few images, all drawn for validation
        empty = dataset.class_names[int(counts.argmin())]
        raise PipelineError(
            f"data.val_size: {val_size} leaves no {empty!r} image for training (validation took "
            "all of them); lower data.val_size or add images to that class"
        )
    mean, std = channel_stats(splits["train"].images)
    meta = {
        "class_names": list(dataset.class_names),
        "image_size": int(dataset.train.images.shape[1]),
        "sizes": {name: len(split.labels) for name, split in splits.items()},
        "mean": mean,  # per channel (R, G, B), 0-255 pixel units, training split only
        "std": std,
    }
    return splits, meta


# --- files ---------------------------------------------------------------------------------------


def find_download(raw_dir: Path) -> Path:
    """The one archive (or copied folder) the download stage left in `raw_dir`."""
    candidates = sorted(p for p in raw_dir.glob("*") if p.suffix != ".part")
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "nothing"
        raise PipelineError(
            f"{raw_dir}: expected exactly one downloaded archive or folder, found {found}; "
            "run `dvc repro download` first"
        )
    return candidates[0]


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.prepare", description=__doc__.splitlines()[0]
    )
    parser.parse_args(argv)
    params = load_params(paths.PARAMS).data
    start = time.perf_counter()
    source = find_download(paths.RAW_DIR)
    print(f"prepare: reading {source} ({params.format})", flush=True)
    if params.format == "imagefolder":
        from pipeline.imagefolder import read_imagefolder  # it imports this module's types

        dataset = read_imagefolder(source, params)
    else:
        dataset = read_cifar10(source)
    splits, meta = prepare(dataset, params.val_size, params.seed)
    try:
        write_prepared(paths.PREPARED_DIR, splits, meta)
    except OSError as error:  # a full disk (about 180 MB for CIFAR-10), a read-only folder
        raise PipelineError(f"could not write {paths.PREPARED_DIR}: {error}") from None
    sizes = ", ".join(f"{n} {name}" for name, n in meta["sizes"].items())
    mean = ", ".join(f"{v:.2f}" for v in meta["mean"])
    std = ", ".join(f"{v:.2f}" for v in meta["std"])
    print(
        f"prepare: {sizes} images, {len(meta['class_names'])} classes; training mean "
        f"[{mean}], std [{std}]; wrote {paths.PREPARED_DIR} in "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
