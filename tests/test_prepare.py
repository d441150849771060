"""prepare: splits, statistics, and refusal of unsafe or broken archives."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.prepare import (
    ArchiveError,
    Dataset,
    find_download,
    prepare,
    read_cifar10,
    stratified_split,
)
from pipeline.prepared import Split, digest_of_test_set, load_split, write_prepared
from tests.cifar_archive import CLASSES, py2_dumps, write_archive


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "raw" / "cifar-10-python.tar.gz"
    write_archive(path, train_per_class=30, test_per_class=7)
    return path


def test_reads_canonical_layout(archive):
    dataset = read_cifar10(archive)
    assert dataset.class_names == CLASSES
    assert dataset.train.images.shape == (300, 32, 32, 3)
    assert dataset.train.images.dtype == np.uint8
    assert dataset.test.images.shape == (70, 32, 32, 3)
    assert np.bincount(dataset.train.labels).tolist() == [30] * 10


def test_pixels_keep_their_channel_order(tmp_path):
    """Channels-first rows become (32, 32, 3) with red, green, blue in place."""
    from tests.cifar_archive import batch_payload

    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 1, 2] = (10, 20, 30)
    payload = batch_payload(np.repeat(image, 10, 0), np.arange(10), "b")
    path = tmp_path / "a.tar.gz"
    write_archive(path, train_per_class=1, test_per_class=1, replace={"data_batch_1": payload})
    dataset = read_cifar10(path)
    assert dataset.train.images[0, 1, 2].tolist() == [10, 20, 30]


def test_split_sizes_balance_and_statistics(archive, tmp_path):
    dataset = read_cifar10(archive)
    splits, meta = prepare(dataset, val_size=50, seed=1)
    assert meta["sizes"] == {"train": 250, "val": 50, "test": 70}
    # Stratified: 50 of 300 evenly spread over 10 classes is 5 each.
    assert np.bincount(splits["val"].labels, minlength=10).tolist() == [5] * 10
    # Statistics come from the training split only, equal to numpy's own.
    train = splits["train"].images.astype(np.float64)
    np.testing.assert_allclose(meta["mean"], train.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(meta["std"], train.std(axis=(0, 1, 2)), rtol=1e-10)
    everything = dataset.train.images.astype(np.float64).mean(axis=(0, 1, 2))
    assert not np.allclose(meta["mean"], everything, rtol=1e-6)
    # No image is in both train and val; together they are the original training set.
    together = np.concatenate([splits["train"].images, splits["val"].images])
    assert len(np.unique(together.reshape(len(together), -1), axis=0)) == len(
        np.unique(dataset.train.images.reshape(300, -1), axis=0)
    )
    # The test split is passed through untouched.
    np.testing.assert_array_equal(splits["test"].images, dataset.test.images)


def test_a_channel_with_one_value_everywhere_still_builds_a_model(tmp_path):
    """Images with no blue at all: std 0 in that channel, which the model divides by."""
    from pipeline.config import ModelParams
    from pipeline.model import build_model

    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    images[..., 2] = 0
    labels = np.arange(40, dtype=np.int32) % 2
    dataset = Dataset(Split(images, labels), Split(images[:4], labels[:4]), ("a", "b"))
    _, meta = prepare(dataset, val_size=0, seed=1)
    assert meta["std"][2] == 1.0 and meta["mean"][2] == 0.0 and 60 < meta["std"][0] < 90
    tiny = ModelParams(stem_filters=8, filters=(8,), units_per_stage=1, dropout=0.0)
    model = build_model(tiny, num_classes=2, image_size=8, mean=meta["mean"], std=meta["std"])
    other = np.full((1, 8, 8, 3), 200, np.uint8)  # blue where training had none
    assert np.isfinite(model.predict(other, verbose=0)).all()


def test_split_is_seeded_and_exact_for_uneven_classes():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train_a, val_a = stratified_split(labels, 17, seed=3)
    train_b, val_b = stratified_split(labels, 17, seed=3)
    _, val_c = stratified_split(labels, 17, seed=4)
    assert len(val_a) == 17 and len(train_a) == 83
    np.testing.assert_array_equal(val_a, val_b)
    assert not np.array_equal(val_a, val_c)
    assert np.bincount(labels[val_a]).tolist() == [9, 5, 3]  # 8.5, 5.1, 3.4 -> largest remainders
    assert len(np.intersect1d(train_a, val_a)) == 0


def test_zero_validation_and_too_large_validation(archive):
    dataset = read_cifar10(archive)
    splits, meta = prepare(dataset, val_size=0, seed=0)
    assert meta["sizes"]["val"] == 0 and splits["val"].images.shape == (0, 32, 32, 3)
    with pytest.raises(PipelineError, match="data.val_size: must be an integer between 0 and 299"):
        prepare(dataset, val_size=300, seed=0)


def test_validation_may_not_take_every_training_image_of_a_class():
    # Class 0's one image has the largest remainder (0.5): the stratified split gives it away.
    images = np.zeros((100, 32, 32, 3), np.uint8)
    labels = np.array([0] + [1] * 99)
    dataset = Dataset(Split(images, labels), Split(images[:2], np.array([0, 1])), ("few", "many"))
    with pytest.raises(PipelineError, match="data.val_size: 50 leaves no 'few' image for train"):
        prepare(dataset, val_size=50, seed=0)
    splits, _ = prepare(dataset, val_size=10, seed=0)
    assert np.bincount(splits["train"].labels).tolist() == [1, 89]


def test_written_files_round_trip(archive, tmp_path):
    splits, meta = prepare(read_cifar10(archive), val_size=20, seed=0)
    out = tmp_path / "prepared"
    write_prepared(out, splits, meta)
    assert sorted(os.listdir(out)) == ["meta.json", "test.npz", "train.npz", "val.npz"]
    loaded = load_split(out, "val")
    np.testing.assert_array_equal(loaded.images, splits["val"].images)
    assert loaded.labels.dtype == np.int32
    assert json.loads((out / paths.META_FILE).read_text())["class_names"] == list(CLASSES)


def test_meta_records_the_image_size_of_the_data():
    """An image folder resized to 16 px gives a model with 16 px inputs."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(2, dtype=np.int32), 20)
    dataset = Dataset(Split(images, labels), Split(images[:4], labels[:4]), ("cat", "dog"))
    splits, meta = prepare(dataset, val_size=10, seed=0)
    assert meta["image_size"] == 16 and meta["class_names"] == ["cat", "dog"]
    assert splits["val"].images.shape == (10, 16, 16, 3)


def test_finds_the_one_downloaded_archive_or_folder(tmp_path):
    (tmp_path / "pets").mkdir()
    (tmp_path / "other.tar.gz.part").write_bytes(b"half")  # a download in progress: not it
    assert find_download(tmp_path) == tmp_path / "pets"
    (tmp_path / "pets.zip").write_bytes(b"zip")
    with pytest.raises(PipelineError, match="exactly one downloaded archive or folder, found pe"):
        find_download(tmp_path)


def test_missing_prepared_data_says_which_stage_to_run(tmp_path):
    with pytest.raises(PipelineError, match="run `dvc repro prepare` first"):
        load_split(tmp_path, "train")


def test_a_truncated_or_empty_prepared_file_says_to_prepare_again(archive, tmp_path):
    splits, meta = prepare(read_cifar10(archive), val_size=20, seed=0)
    out = tmp_path / "prepared"
    write_prepared(out, splits, meta)
    path = paths.split_file(out, "train")
    whole = path.read_bytes()
    for cut in (whole[: len(whole) // 2], b""):  # a disk that filled up; a file never written
        path.write_bytes(cut)
        with pytest.raises(PipelineError, match=r"unreadable prepared data .*prepare` again"):
            load_split(out, "train")


class Boom:
    """Unpickling this calls os.system; a safe reader must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_side_effects(tmp_path):
    marker = tmp_path / "pwned"
    evil = py2_dumps({b"data": Boom(marker), b"labels": []})
    path = tmp_path / "evil.tar.gz"
    write_archive(path, replace={"data_batch_3": evil})
    with pytest.raises(
        ArchiveError,
        match=r"data_batch_3: unsafe or invalid pickle: refused to load global (posix|os)\.system",
    ):
        read_cifar10(path)
    assert not marker.exists()


def test_path_traversal_member_is_refused(tmp_path):
    path = tmp_path / "evil.tar.gz"
    write_archive(path, extra={"../../etc/evil": b"x"})
    with pytest.raises(ArchiveError, match=r"unsafe archive member '../../etc/evil'"):
        read_cifar10(path)


def test_link_member_is_refused(tmp_path):
    import tarfile

    path = tmp_path / "link.tar.gz"
    write_archive(path)
    with tarfile.open(path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w:gz") as tar:
        for member, data in members:
            import io

            tar.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo("cifar-10-batches-py/shadow")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ArchiveError, match="a link, refused"):
        read_cifar10(path)


def test_truncated_archive_is_reported_clearly(archive):
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match=r"truncated or corrupt archive .*dvc repro download"):
        read_cifar10(archive)


def test_wrong_layout_names_missing_members(tmp_path):
    import io
    import tarfile

    path = tmp_path / "cifar-10-python.tar.gz"
    write_archive(path)
    with tarfile.open(path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w:gz") as tar:
        for member, data in members:
            if not member.name.endswith(("batches.meta", "data_batch_1")):
                tar.addfile(member, io.BytesIO(data))
    with pytest.raises(
        ArchiveError,
        match="missing cifar-10-batches-py/batches.meta, cifar-10-batches-py/data_batch_1$",
    ):
        read_cifar10(path)


def test_ones_own_images_without_data_format_imagefolder_say_to_set_it(tmp_path):
    """A folder, a zip or a tar of class folders, read as CIFAR-10's python archive: one
    line naming data.format, not "truncated or corrupt ... delete it and download again"
    (tarfile's five-line reason) for ever, as the md5 matches."""
    import io
    import tarfile
    import zipfile

    def folder_and_zip(name: str, member: str) -> tuple:
        """A folder holding `member`, and a zip of it."""
        (tmp_path / name / member).parent.mkdir(parents=True)
        (tmp_path / name / member).write_bytes(b"bytes")
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as archive:
            archive.writestr(member, b"bytes")
        return tmp_path / name, tmp_path / f"{name}.zip"

    folder, zipped = folder_and_zip("pets", "train/cat/1.png")
    tarred = tmp_path / "pets.tar.gz"
    with tarfile.open(tarred, "w:gz") as tar:
        info = tarfile.TarInfo("pets/train/cat/1.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"png"))

    def refusal(source) -> str:
        with pytest.raises(ArchiveError) as error:
            read_cifar10(source)
        return str(error.value)

    for source in (folder, zipped, tarred):
        assert refusal(source) == (
            f"{source}: no cifar-10-batches-py/ batches in it, so not the CIFAR-10 python "
            "archive that data.format cifar10-python reads; for a folder or archive of your "
            "own images in class folders, set data.format: imagefolder"
        )
    # CIFAR-10 itself, unpacked or zipped again: not someone's images.
    unpacked, rezipped = folder_and_zip("cifar", "cifar-10-batches-py/data_batch_1")
    for source in (unpacked, unpacked / "cifar-10-batches-py", rezipped):
        assert refusal(source) == (
            f"{source}: holds CIFAR-10's cifar-10-batches-py/ batches, but data.format "
            "cifar10-python reads them from the original cifar-10-python.tar.gz only; point "
            "data.url at that archive"
        )


def test_bad_labels_and_shapes_are_refused(tmp_path):
    bad_labels = py2_dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]})
    path = tmp_path / "labels.tar.gz"
    write_archive(path, replace={"data_batch_2": bad_labels})
    with pytest.raises(ArchiveError, match=r"data_batch_2: labels must lie in 0..9, found 0..12"):
        read_cifar10(path)
    for labels, found in (([0.9, 1.7], "float64"), ([b"cat", b"dog"], "|S3")):
        # Cast to whole numbers, 1.7 would pass for class 1 and b"cat" raise ValueError.
        wrong = py2_dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels})
        write_archive(path, replace={"data_batch_3": wrong})
        with pytest.raises(
            ArchiveError, match=f"data_batch_3: labels must be whole numbers, found {found} values"
        ):
            read_cifar10(path)
    bad_shape = py2_dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    write_archive(path, replace={"test_batch": bad_shape})
    with pytest.raises(ArchiveError, match="test_batch: 'data' rows hold 100 values, not 3072"):
        read_cifar10(path)


def test_the_test_set_digest_is_of_the_images_and_their_classes_in_any_order():
    """The registry compares champions on one test set: the canonical batches (shuffled)
    and an image folder read class by class hold the same images in different orders."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 40)
    names = ["cat", "dog", "ship"]
    digest = digest_of_test_set(images, labels, names)
    order = rng.permutation(40)
    assert digest_of_test_set(images[order], labels[order], names) == digest
    relabelled = labels.copy()
    relabelled[0] = (labels[0] + 1) % 3
    changed = images.copy()
    changed[5, 0, 0, 0] ^= 1
    others = {
        digest_of_test_set(images, relabelled, names),
        digest_of_test_set(changed, labels, names),
        digest_of_test_set(images[:-1], labels[:-1], names),
        digest_of_test_set(images, labels, ["cat", "dog", "truck"]),  # another class, same index
    }
    assert digest not in others and len(others) == 4
    # The same classes listed in another order, labels following: the same test set.
    swapped = np.array([1, 0, 2])[labels]
    assert digest_of_test_set(images, swapped, ["dog", "cat", "ship"]) == digest


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"class_names": ["a"]}', "(no image_size, sizes, mean, std)"),
        ("[1, 2]", "(no class_names, image_size, sizes, mean, std)"),
    ],
)
def test_a_meta_json_prepare_did_not_write_is_one_line(tmp_path, text, message):
    """Hand-edited or another tool's: not a KeyError deep in train or evaluate."""
    from pipeline.prepared import load_meta

    (tmp_path / paths.META_FILE).write_text(text)
    with pytest.raises(PipelineError) as error:
        load_meta(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / paths.META_FILE}: not what prepare writes {message}; run `dvc repro prepare`"
    )


def test_prepared_data_it_cannot_write_is_one_line_naming_the_folder(tmp_path, raw_params):
    """A full disk or a file in the way is the user's to fix: the reason, no traceback."""
    import subprocess
    import sys

    import yaml

    from tests.repo import ROOT

    raw_params["data"]["val_size"] = 20  # of the archive's 200 training images
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    write_archive(tmp_path / paths.RAW_DIR / "cifar-10-python.tar.gz")
    (tmp_path / paths.PREPARED_DIR).parent.mkdir(exist_ok=True)
    (tmp_path / paths.PREPARED_DIR).write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare"], cwd=tmp_path, capture_output=True,
        text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith(
        f"error: could not write {paths.PREPARED_DIR}: [Errno 17] File exists"
    ), result.stderr
