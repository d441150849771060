"""Image-folder datasets: formats and modes, bad and stray files, layouts, archives, safety."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import lzma
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import imagefolder
from pipeline.config import DataParams, parse_params
from pipeline.errors import PipelineError
from pipeline.imagefolder import LayoutError, read_imagefolder
from pipeline.prepare import ArchiveError
from tests.repo import dvc, make_repo, set_params


def encode(fmt: str, size: tuple[int, int], mode: str, colour) -> bytes:
    """One image file's bytes: a solid `colour` in `mode`, saved as `fmt`."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, fmt)
    return buffer.getvalue()


def grey_png(level: int) -> bytes:
    return encode("PNG", (8, 8), "L", level)


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, payload in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    return root


def write_tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A .tar.gz of `files`, plus symbolic links {name: target}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for name, target in (links or {}).items():
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
    return path


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in files.items():
            archive.writestr(name, payload)
    return path


def two_classes(train: int = 3, test: int = 2) -> dict[str, bytes]:
    """cat images are dark and dog images bright, each a distinct grey level."""
    files = {}
    for split, count, offset in (("train", train, 0), ("test", test, 50)):
        for i in range(count):
            files[f"{split}/cat/{i:02d}.png"] = grey_png(offset + i)
            files[f"{split}/dog/{i:02d}.png"] = grey_png(150 + offset + i)
    return files


@pytest.fixture
def data(raw_params) -> DataParams:
    """The shipped data params, switched to an image folder of 8x8 images."""
    return dataclasses.replace(
        parse_params(raw_params).data,
        format="imagefolder",
        url="file:///unused",
        md5="",
        image_size=8,
        val_size=1,
    )


def test_formats_sizes_and_modes_all_become_rgb_at_image_size(tmp_path, data):
    gif = io.BytesIO()  # two frames: only the first (red) is used
    frames = [Image.new("P", (12, 12), 0), Image.new("P", (12, 12), 1)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    palette = Image.new("P", (5, 9), 2)
    palette.putpalette([0, 0, 0] * 2 + [0, 200, 0] + [0] * 759)
    bmp = io.BytesIO()
    palette.save(bmp, "BMP")
    files = {
        "train/a/grey.jpg": encode("JPEG", (40, 30), "L", 90),
        "train/a/rgba.png": encode("PNG", (3, 3), "RGBA", (0, 0, 255, 0)),  # fully transparent
        "train/b/anim.gif": gif.getvalue(),
        "train/b/palette.BMP": bmp.getvalue(),
        "test/a/rgb.jpeg": encode("JPEG", (64, 64), "RGB", (250, 250, 0)),
        "test/b/cmyk.jpg": encode("JPEG", (16, 16), "CMYK", (0, 0, 0, 0)),
    }
    dataset = read_imagefolder(write_folder(tmp_path / "set", files), data)
    assert dataset.class_names == ("a", "b")
    assert dataset.train.images.shape == (4, 8, 8, 3) and dataset.train.images.dtype == np.uint8
    assert dataset.train.labels.tolist() == [0, 0, 1, 1]  # class by class, file names sorted
    centre = dataset.train.images[:, 4, 4].astype(int)
    assert np.abs(centre[0] - 90).max() <= 2  # greyscale JPEG -> equal channels
    assert centre[1].tolist() == [255, 255, 255]  # transparent -> white, as predict does
    assert centre[2].tolist() == [255, 0, 0]  # the GIF's first frame
    assert centre[3].tolist() == [0, 200, 0]  # palette colour
    test = dataset.test.images[:, 4, 4].astype(int)
    assert np.abs(test[0] - [250, 250, 0]).max() <= 3
    assert dataset.test.labels.tolist() == [0, 1]


def test_folder_zip_and_tar_with_a_top_folder_give_the_same_dataset(tmp_path, data, monkeypatch):
    monkeypatch.setattr(imagefolder, "CHUNK_IMAGES", 4)  # several chunks over two workers
    files = two_classes(train=10, test=3)
    sources = [
        write_folder(tmp_path / "folder", files),
        write_zip(tmp_path / "set.zip", files),
        write_tar(tmp_path / "set.tar.gz", {f"./pets/{k}": v for k, v in files.items()}),
    ]
    datasets = [read_imagefolder(source, data, workers=2) for source in sources]
    for dataset in datasets:
        assert dataset.class_names == ("cat", "dog")
        # Each image is one grey level, so the order of the rows is visible in the pixels.
        assert dataset.train.images[:, 0, 0, 0].tolist() == [*range(10), *range(150, 160)]
        assert dataset.train.labels.tolist() == [0] * 10 + [1] * 10
        assert dataset.test.images[:, 0, 0, 0].tolist() == [50, 51, 52, 200, 201, 202]


def test_decode_tasks_of_large_images_hold_fewer_of_them():
    members = [imagefolder.Member(f"train/a/{i}.png", False, None) for i in range(600)]
    slot_of = {id(m): i for i, m in enumerate(members)}

    def sizes(side):
        return [
            len(names)
            for _, names, _ in imagefolder._chunks(members, lambda m: b"x", slot_of, side)
        ]

    assert sizes(32) == [256, 256, 88]  # 0.8 MB decoded each
    assert set(sizes(1024)[:-1]) == {10}  # 10 x 3 MB decoded: under 32 MB


def test_hidden_and_non_image_files_are_left_out_and_counted(tmp_path, data, capsys):
    files = {
        **two_classes(),
        ".DS_Store": b"\0",
        "train/cat/._00.png": b"AppleDouble",
        "__MACOSX/train/cat/._01.png": b"AppleDouble",
        "README.md": b"# pets",
        "train/labels.csv": b"a,b",
        "train/dog/notes.txt": b"good dogs",
    }
    dataset = read_imagefolder(write_zip(tmp_path / "set.zip", files), data)
    assert len(dataset.train.labels) == 6 and len(dataset.test.labels) == 4
    out = capsys.readouterr().out
    assert "10 images of 2 classes; left out 3 hidden and 3 non-image files" in out


def test_unlabelled_test_images_are_named_as_such(tmp_path, data):
    files = {**two_classes(test=0), "test/1.png": grey_png(7), "test/2.png": grey_png(8)}
    with pytest.raises(LayoutError, match=r"test/ holds 2 images but no class folders, so they"):
        read_imagefolder(
            write_zip(tmp_path / "set.zip", files), dataclasses.replace(data, test_size=2)
        )


def test_images_outside_class_folders_are_counted_apart(tmp_path, data, capsys):
    files = {**two_classes(), "train/stray.png": grey_png(7), "train/cat/notes.txt": b"x"}
    dataset = read_imagefolder(write_zip(tmp_path / "set.zip", files), data)
    assert len(dataset.train.labels) == 6
    out = capsys.readouterr().out
    assert "10 images of 2 classes; left out 1 non-image files" in out  # the .txt only
    assert "left out 1 images outside class folders" in out
    only_loose = {"train/a.png": grey_png(1), "train/b.png": grey_png(2)}
    with pytest.raises(LayoutError, match=r"0 class folder\(s\) \[\] and 2 images outside any"):
        read_imagefolder(write_zip(tmp_path / "loose.zip", only_loose), data)


def test_a_tar_cut_between_members_is_refused_not_read_short(tmp_path, data):
    whole = tmp_path / "set.tar"
    with tarfile.open(whole, "w") as tar:  # uncompressed: nothing else notices the cut
        for name, payload in two_classes().items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert len(read_imagefolder(whole, data).test.labels) == 4  # whole, it reads
    with tarfile.open(whole) as tar:
        cut_at = tar.getmembers()[-1].offset  # where the last member's header starts
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:cut_at])
    with pytest.raises(
        ArchiveError,
        match=r"cut.tar: truncated or corrupt: the file ends after 'test/cat/01.png' \(9 entries\)",
    ):
        read_imagefolder(cut, data)
    # A header that cannot be read ends tarfile's listing just as quietly.
    broken = bytearray(whole.read_bytes())
    broken[cut_at : cut_at + 100] = b"garbage!" * 12 + b"junk"  # the name and mode fields
    (tmp_path / "broken.tar").write_bytes(bytes(broken))
    with pytest.raises(ArchiveError, match=r"broken.tar: .*a header that cannot be read follows"):
        read_imagefolder(tmp_path / "broken.tar", data)
    # Compressed, in any format tarfile reads (here the legacy .lzma), the stream is trusted.
    legacy = tmp_path / "set.tar.lzma"
    legacy.write_bytes(lzma.compress(whole.read_bytes(), format=lzma.FORMAT_ALONE))
    assert len(read_imagefolder(legacy, data).test.labels) == 4


def test_a_zip_cut_short_is_called_truncated(tmp_path, data):
    whole = write_zip(tmp_path / "set.zip", two_classes()).read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ArchiveError, match=r"a zip archive without its central directory"):
        read_imagefolder(cut, data)


def test_a_val_folder_is_named_as_not_read(tmp_path, data, capsys):
    files = {**two_classes(), "val/cat/00.png": grey_png(9), "val/dog/00.png": grey_png(99)}
    dataset = read_imagefolder(write_zip(tmp_path / "set.zip", files), data)
    assert len(dataset.train.labels) == 6  # val/ stays out: prepare's own split is the one
    out = capsys.readouterr().out
    assert "10 images of 2 classes\n" in out  # not counted as "non-image" files
    assert "prepare: not read: val/ (2 files); only train/ and test/ are" in out


def test_a_val_size_too_large_for_the_dataset_fails_before_decoding(
    tmp_path, data, monkeypatch, capsys
):
    source = write_folder(tmp_path / "pets", two_classes(train=20, test=2))  # 40 to train on

    def decode(*args):
        raise AssertionError("decoded")

    monkeypatch.setattr(imagefolder, "decode_images", decode)
    for val_size in (40, 5000):  # the default is CIFAR-10's
        with pytest.raises(PipelineError, match=(
            rf"^data.val_size: {val_size} validation images leave none of this dataset's 40 "
            r"training images to train on; hold out about a tenth: dvc exp run -S data.val_size=4$"
        )):  # fmt: skip
            read_imagefolder(source, dataclasses.replace(data, val_size=val_size))
    with pytest.raises(AssertionError, match="decoded"):  # 11 of 40: allowed, with a warning
        read_imagefolder(source, dataclasses.replace(data, val_size=11))
    assert "warning: data.val_size holds out 11 of the 40 training images (28%)" in (
        capsys.readouterr().out
    )
    with pytest.raises(PipelineError, match=r"^data.test_size: must be an integer between 1 and"):
        read_imagefolder(write_folder(tmp_path / "flat", two_classes(train=20, test=0)),
                         dataclasses.replace(data, test_size=40))  # fmt: skip


def test_corrupt_image_stops_the_stage_naming_it(tmp_path, data):
    files = {**two_classes(), "train/dog/broken.jpg": grey_png(1)[:30]}
    source = write_tar(tmp_path / "set.tar.gz", files)
    with pytest.raises(LayoutError, match=r"^train/dog/broken\.jpg: cannot decode it .*skip"):
        read_imagefolder(source, data)


def test_corrupt_image_is_skipped_and_counted_when_asked(tmp_path, data, capsys):
    files = {**two_classes(), "train/dog/broken.jpg": b"not an image", "test/cat/x.gif": b"GIF8"}
    source = write_tar(tmp_path / "set.tar.gz", files)
    dataset = read_imagefolder(source, dataclasses.replace(data, on_bad_image="skip"))
    assert dataset.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dataset.test.images[:, 0, 0, 0].tolist() == [50, 51, 200, 201]
    out = capsys.readouterr().out
    assert "skipping train/dog/broken.jpg: not an image Pillow can read" in out
    assert "skipping test/cat/x.gif" in out
    assert "skipped 2 images that cannot be read" in out


def test_a_class_whose_test_images_were_all_skipped_is_an_error(tmp_path, data):
    files = {k: (b"junk" if k.startswith("test/dog/") else v) for k, v in two_classes().items()}
    with pytest.raises(LayoutError, match=r"no 'dog' image is in the test split; those in test/d"):
        read_imagefolder(
            write_folder(tmp_path / "set", files), dataclasses.replace(data, on_bad_image="skip")
        )


def test_without_test_folder_a_stratified_seeded_test_split_is_held_out(tmp_path, data):
    files = {f"train/cat/{i:02d}.png": grey_png(i) for i in range(10)}
    files |= {f"train/dog/{i:02d}.png": grey_png(100 + i) for i in range(20)}
    source = write_folder(tmp_path / "set", files)
    split = dataclasses.replace(data, test_size=6, seed=3)
    dataset = read_imagefolder(source, split)
    assert np.bincount(dataset.test.labels).tolist() == [2, 4]  # a fifth of each class
    assert np.bincount(dataset.train.labels).tolist() == [8, 16]
    every = np.concatenate([dataset.train.images, dataset.test.images])[:, 0, 0, 0]
    assert sorted(every.tolist()) == [*range(10), *range(100, 120)]  # nothing lost or doubled
    again = read_imagefolder(source, split)
    np.testing.assert_array_equal(again.test.images, dataset.test.images)
    other_seed = read_imagefolder(source, dataclasses.replace(split, seed=4))
    assert not np.array_equal(other_seed.test.images, dataset.test.images)

    with pytest.raises(LayoutError, match=r"no test/ folder, so data.test_size must say .*=3$"):
        read_imagefolder(source, data)
    with pytest.raises(LayoutError, match="has its own test/ folder, so data.test_size must be 0"):
        read_imagefolder(write_zip(tmp_path / "t.zip", two_classes()), split)
    with pytest.raises(PipelineError, match="data.test_size: must be an integer between 1 and 29"):
        read_imagefolder(source, dataclasses.replace(data, test_size=30))
    # One test image cannot stand for both classes: cat would score 0 in the per-class figures.
    with pytest.raises(LayoutError, match=r"no 'cat' image is in the test split; raise data.test"):
        read_imagefolder(source, dataclasses.replace(split, test_size=1))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train/cat/a.png": grey_png(1)}, r"train/ holds 1 class folder\(s\) \['cat'\]; .*two"),
        (
            {**two_classes(), "train/bird/notes.txt": b"todo"},
            r"train/bird/ holds no images \(PNG, JPEG, BMP or GIF\); add some or remove",
        ),
        (
            {**two_classes(), "test/bird/a.png": grey_png(1)},
            r"test/bird/ has no train/bird/, so no model can learn that class",
        ),
        (
            {k: v for k, v in two_classes().items() if not k.startswith("test/dog")},
            r"test/ holds no 'dog' images; add some to test/dog/, or remove test/",
        ),
        ({"cat/a.png": grey_png(1), "dog/b.png": grey_png(2)}, r"no train/ folder at the top"),
        (
            {"cifar-10-batches-py/batches.meta": b"x", "cifar-10-batches-py/data_batch_1": b"x"},
            r"no train/ folder .*CIFAR-10's python archive: set data.format: cifar10-python$",
        ),
    ],
    ids=[
        "one class",
        "empty class",
        "test-only class",
        "class missing from test",
        "no train",
        "cifar archive",
    ],  # fmt: skip
)
def test_unusable_layouts_are_refused_with_the_cause_and_fix(tmp_path, data, files, message):
    with pytest.raises(LayoutError, match=message):
        read_imagefolder(write_tar(tmp_path / "set.tar.gz", files), data)


def test_empty_class_folder_is_refused(tmp_path, data, monkeypatch):
    """A folder is read from download's copy: the error says where to fix it (a fix in the
    copy is overwritten, one in the source is not copied until download runs again)."""
    monkeypatch.chdir(tmp_path)  # a stage's working directory: data/raw is download's
    elsewhere = write_folder(tmp_path / "set", two_classes())
    (elsewhere / "train" / "bird").mkdir()
    with pytest.raises(LayoutError, match=r"train/bird/ holds no images .*remove the folder$"):
        read_imagefolder(elsewhere, data)  # read in place (a benchmark): no copy to speak of
    source = write_folder(tmp_path / "data" / "raw" / "set", two_classes())
    (source / "train" / "bird").mkdir()
    with pytest.raises(LayoutError, match=r"train/bird/ holds no images") as error:
        read_imagefolder(source, data)
    assert str(error.value).endswith(
        f"({source} is download's copy of the folder data.url names: change that folder, "
        "then copy it again with `dvc repro --force download`)"
    )
    (source / "train" / "bird").rmdir()
    (source / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(LayoutError, match=r"broken.png: cannot decode it .* --force download`\)$"):
        read_imagefolder(source, data)
    archive = write_tar(tmp_path / "set.tar", {**two_classes(), "train/bird/notes.txt": b"todo"})
    with pytest.raises(LayoutError, match=r"add some or remove the folder$"):  # no copy there
        read_imagefolder(archive, data)


@pytest.mark.parametrize("writer", [write_tar, write_zip], ids=["tar.gz", "zip"])
def test_path_traversal_is_refused_before_decoding(tmp_path, data, writer):
    source = writer(tmp_path / "evil", {**two_classes(), "../../etc/evil.png": grey_png(1)})
    with pytest.raises(ArchiveError, match=r"unsafe archive member '../../etc/evil.png': path"):
        read_imagefolder(source, data)


def test_links_are_refused_in_tar_zip_and_folder(tmp_path, data):
    tar_path = write_tar(
        tmp_path / "link.tar.gz", two_classes(), links={"train/cat/passwd.png": "/etc/passwd"}
    )
    zip_path = write_zip(tmp_path / "link.zip", two_classes())
    with zipfile.ZipFile(zip_path, "a") as archive:
        info = zipfile.ZipInfo("train/cat/passwd.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    for source in (tar_path, zip_path):
        with pytest.raises(ArchiveError, match=r"'train/cat/passwd.png': a link, refused"):
            read_imagefolder(source, data)
    # In a folder, links to folders (a loop) or to nothing are refused; a link to a file is
    # read as that file (nothing is extracted): /etc/passwd is then no image.
    folder = write_folder(tmp_path / "folder", two_classes())
    for target, refused in (("..", "a link to a folder"), ("/nowhere", "to nothing")):
        (folder / "train/cat/linked").symlink_to(target)
        with pytest.raises(ArchiveError, match=rf"'train/cat/linked': .*{refused}.*, refused"):
            read_imagefolder(folder, data)
        (folder / "train/cat/linked").unlink()
    (folder / "train/cat/passwd.png").symlink_to("/etc/passwd")
    with pytest.raises(PipelineError, match=r"passwd.png"):
        read_imagefolder(folder, data)


def test_a_folder_whose_images_dvc_turned_into_links_reads_as_the_folder(tmp_path, data):
    """`dvc config cache.type symlink`: after the download stage every copied file in
    data/raw is a link into .dvc/cache."""
    files = two_classes()
    folder = write_folder(tmp_path / "pets", files)
    cache = write_folder(tmp_path / "cache", files)
    for name in files:
        (folder / name).unlink()
        (folder / name).symlink_to(cache / name)
    linked, plain = read_imagefolder(folder, data), read_imagefolder(cache, data)
    assert linked.class_names == plain.class_names
    assert np.array_equal(linked.train.images, plain.train.images)
    assert np.array_equal(linked.test.labels, plain.test.labels)


def test_an_unreadable_file_in_a_folder_says_to_copy_the_folder_again(tmp_path, data, monkeypatch):
    folder = write_folder(tmp_path / "pets", two_classes())
    listed = imagefolder._folder_members

    def members_then_one_goes(root):  # removed between listing and reading, say
        members = listed(root)
        (folder / "train/dog/01.png").unlink()
        return members

    monkeypatch.setattr(imagefolder, "_folder_members", members_then_one_goes)
    with pytest.raises(ArchiveError, match=(
        r"pets: a file cannot be read \(.*No such file.*\); fix it in the folder data.url names, "
        r"then copy it again: `dvc repro --force download`$"
    )):  # fmt: skip
        read_imagefolder(folder, data)


def test_truncated_and_foreign_archives_are_reported(tmp_path, data):
    source = write_tar(tmp_path / "set.tar.gz", two_classes(train=30))
    source.write_bytes(source.read_bytes()[:-200])
    with pytest.raises(ArchiveError, match=r"truncated, corrupt or unreadable .*repro download"):
        read_imagefolder(source, data)
    foreign = tmp_path / "set.rar"
    foreign.write_bytes(b"Rar!\x1a\x07\x00" + bytes(100))
    with pytest.raises(ArchiveError, match=r"neither a folder nor a .tar, .tar.gz/.tgz or .zip"):
        read_imagefolder(foreign, data)


def test_a_plain_tar_ending_in_a_zip_file_is_read_as_the_tar(tmp_path, data, capsys):
    """A zip is found by its directory at the file's end, which such a tar has too."""
    inner = write_zip(tmp_path / "inner.zip", {"notes.txt": b"x"}).read_bytes()
    source = tmp_path / "pets.tar"  # uncompressed: the inner zip's bytes end the file
    with tarfile.open(source, "w") as tar:
        for name, payload in {**two_classes(), "originals.zip": inner}.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert zipfile.is_zipfile(source)  # the trap
    dataset = read_imagefolder(source, data)
    assert dataset.class_names == ("cat", "dog") and len(dataset.train.labels) == 6


def patched_zip(path: Path, local_at: int, central_at: int, value: int) -> Path:
    """Set a 2-byte field of every member's local and central header (zipfile writes
    neither encrypted nor Deflate64 members itself)."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", local_at), (b"PK\x01\x02", central_at)):
        start = data.find(signature)
        while start != -1:
            data[start + offset : start + offset + 2] = value.to_bytes(2, "little")
            start = data.find(signature, start + 4)
    path.write_bytes(data)
    return path


def test_encrypted_and_unreadably_compressed_zips_are_refused_before_decoding(tmp_path, data):
    # General-purpose flags at 6 (local) and 8 (central): bit 0, encrypted (`zip -e`).
    locked = patched_zip(write_zip(tmp_path / "locked.zip", two_classes()), 6, 8, 0x1)
    with pytest.raises(ArchiveError, match=r"'train/cat/00.png' is encrypted; pack the images"):
        read_imagefolder(locked, data)
    # Compression method at 8 (local) and 10 (central): 9, Deflate64 (Windows' Explorer).
    windows = patched_zip(write_zip(tmp_path / "windows.zip", two_classes()), 8, 10, 9)
    with pytest.raises(ArchiveError, match=(
        r"'train/cat/00.png' is compressed with zip method 9, which Python cannot read; pack "
        r"the images again: `zip -r pets.zip pets` \(no -e\) or `tar czf pets.tgz pets`$"
    )):  # fmt: skip
        read_imagefolder(windows, data)


@pytest.mark.slow
def test_dvc_repro_prepares_an_image_folder_and_sees_a_changed_folder(tmp_path):
    files = two_classes(train=12, test=3)
    archive = write_tar(tmp_path / "pets.tar.gz", {f"pets/{k}": v for k, v in files.items()})
    repo = make_repo(
        tmp_path / "repo",
        {
            "data.format": "imagefolder",
            "data.url": archive.as_uri(),
            "data.md5": hashlib.md5(archive.read_bytes()).hexdigest(),
            "data.image_size": 16,
            "data.val_size": 4,
        },
    )
    first = dvc(repo, "repro", "prepare")
    assert "Running stage 'prepare'" in first.stdout
    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    assert meta["class_names"] == ["cat", "dog"] and meta["image_size"] == 16
    assert meta["sizes"] == {"train": 20, "val": 4, "test": 6}
    with np.load(repo / "data/prepared/train.npz") as train:
        assert train["images"].shape == (20, 16, 16, 3)

    # A local folder: copied into data/raw, so DVC sees what changed once it is copied again.
    folder = write_folder(tmp_path / "pets", files)
    set_params(repo, {"data.url": folder.as_uri(), "data.md5": ""})
    assert "Running stage 'prepare'" in dvc(repo, "repro", "prepare").stdout
    assert "Running stage 'download'" in dvc(repo, "repro", "--force", "download").stdout
    assert "Running stage" not in dvc(repo, "repro", "prepare").stdout  # same images
    write_folder(folder, {"train/cat/new.png": grey_png(7)})
    dvc(repo, "repro", "--force", "download")
    assert "Running stage 'prepare'" in dvc(repo, "repro", "prepare").stdout
    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    assert meta["sizes"]["train"] + meta["sizes"]["val"] == 25


def test_decoding_workers_default_to_the_usable_cpus_where_affinity_is_unknown(monkeypatch):
    """macOS has no os.sched_getaffinity: the count of CPUs stands in for it."""
    import os

    assert imagefolder.usable_cpus() >= 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert imagefolder.usable_cpus() == 6
