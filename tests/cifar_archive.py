"""Small archives in the canonical cifar-10-python.tar.gz layout, made by the tests."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the canonical batches: byte strings as
    (SHORT_)BINSTRING and numpy's globals under their numpy 1 names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy._core"):
            module = "numpy.core" + module[len("numpy._core") :]
            self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_dumps(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def batch_payload(images: np.ndarray, labels: np.ndarray, label: str) -> bytes:
    """A batch pickled as the canonical files are: bytes keys, (N, 3072) channels-first rows."""
    rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))
    batch = {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": rows,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    return py2_dumps(batch)


def add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_images(per_class: int, num_classes: int, rng: np.random.Generator):
    """Images whose class is visible in their brightness, so a model can learn them."""
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    base = (labels * (200 // num_classes) + 20).astype(np.int16)[:, None, None, None]
    noise = rng.integers(-15, 16, size=(len(labels), 32, 32, 3))
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_archive(
    path: Path,
    train_per_class: int = 20,
    test_per_class: int = 5,
    num_classes: int = 10,
    seed: int = 0,
    replace: dict[str, bytes] | None = None,
    extra: dict[str, bytes] | None = None,
) -> str:
    """Write a CIFAR-10-layout .tar.gz at `path` and return its md5.

    `replace` swaps a member's payload (e.g. a malicious pickle); `extra` adds
    members under arbitrary names (e.g. a path-traversal attempt).
    """
    rng = np.random.default_rng(seed)
    train_x, train_y = make_images(train_per_class, num_classes, rng)
    test_x, test_y = make_images(test_per_class, num_classes, rng)
    members: dict[str, bytes] = {}
    for i, part in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        members[f"data_batch_{i}"] = batch_payload(
            train_x[part], train_y[part], f"training batch {i} of 5"
        )
    members["test_batch"] = batch_payload(test_x, test_y, "testing batch 1 of 1")
    meta = {b"label_names": [c.encode() for c in CLASSES[:num_classes]], b"num_vis": 3072}
    members["batches.meta"] = py2_dumps(meta)
    members.update(replace or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            add_bytes(tar, f"cifar-10-batches-py/{name}", payload)
        for name, payload in (extra or {}).items():
            add_bytes(tar, name, payload)
    return hashlib.md5(path.read_bytes()).hexdigest()
