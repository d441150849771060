"""Image-folder datasets (`data.format: imagefolder`): a folder of class folders -> Dataset.

The dataset is a folder, or a .tar, .tar.gz/.tgz or .zip archive of one, laid
out at its top or under one top-level folder (`pets/train/...`) as

    train/<class>/<image>   at least two classes; images may sit in subfolders
    test/<class>/<image>    optional: without it, data.test_size images are held
                            out of train/, stratified by class and seeded

Class names are the train/ folder names, sorted. Images are PNG, JPEG, BMP or
GIF (its first frame) of any size and colour mode; each becomes RGB exactly as
`pipeline.images.load_image` prepares an image to classify (EXIF orientation
applied, transparency on white, centre crop to a square, Lanczos resize to
data.image_size pixels), so training and prediction see the same pixels.
Hidden entries (`.DS_Store`, `__MACOSX/`) and other files are counted and left
out, and folders beside train/ and test/ (val/, say) are named as not read. An
image that cannot be decoded stops the stage, naming it, or with
`data.on_bad_image: skip` is named, counted and left out.

A folder is read from the copy the download stage makes of it in data/raw
(see `pipeline.download` for why a copy). As for CIFAR-10, an archive is never
extracted to disk, and a member that escapes it or is a link is refused before
anything is decoded.

Speed and memory: a first pass lists the members, so the layout is checked and
the uint8 array allocated at its final size before any pixel is decoded; a
second pass reads the members in archive order and hands them in chunks (a
bounded number in flight) to worker processes, whose decoded rows are copied
straight into that array. Processes, not threads: on small images most of
Pillow's time is Python (header parsing, mode handling) that holds the GIL.
Measured on the 2-core development machine (shared with other jobs at the
time), decoding the 60,000 CIFAR-10 JPEGs (32x32, already in memory) took
10.2 s on one core, 10.0 s with two threads and 7.1 s with two processes.
The whole stage on that archive took 16 s on 2 EPYC cores with a peak RSS of
455 MiB (BENCHMARKS.md): the 184 MB of uint8 images, the train/val copies
prepare makes, the interpreter.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import signal
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline import paths
from pipeline.config import DataParams
from pipeline.errors import PipelineError
from pipeline.images import load_image
from pipeline.prepare import ArchiveError, Dataset, check_member, stratified_split
from pipeline.prepared import Split

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})
CHUNK_IMAGES = 256  # images per decode task: (256, 32, 32, 3) uint8 is 0.8 MB to send back
CHUNK_BYTES = 32 << 20  # ... or fewer, so a task stays under 32 MB encoded and decoded
PROGRESS_S = 10.0  # seconds between progress lines while decoding
SHOWN_SKIPS = 10  # skipped images named one by one; the rest only counted


class LayoutError(PipelineError):
    """The dataset is not a usable train/<class>/<image> folder."""


@dataclass(frozen=True)
class Member:
    """A file or folder of the dataset as its archive (or the folder) lists it."""

    name: str  # POSIX path inside the archive or folder
    is_dir: bool
    handle: tarfile.TarInfo | zipfile.ZipInfo | Path  # what reads it


@dataclass(frozen=True)
class Layout:
    class_names: tuple[str, ...]
    # Every image to decode, train/ first, then test/; each split class by class, by name.
    images: list[Member]
    labels: np.ndarray  # (len(images),) int32
    num_train: int
    hidden: int  # hidden files left out
    other: int  # files that are not images where images belong, or beside train/ and test/
    unread: dict[str, int]  # files per folder beside train/ and test/ (val/, say): not read
    loose: int  # images in train/ or test/ themselves, in no class folder: no label, not read


# --- listing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def open_dataset(source: Path) -> Iterator[tuple[list[Member], Callable[[Member], bytes]]]:
    """Yield the members of a folder, zip or tar archive, checked for safety, and a reader."""
    # Tar before zip: a zip is recognised by its directory at the end, which a tar whose
    # last member is a .zip (or .npz, .docx) has too; a tar's first header is unambiguous.
    is_tar = not source.is_dir() and tarfile.is_tarfile(source)
    if not (source.is_dir() or is_tar or zipfile.is_zipfile(source)):
        if _head(source).startswith(b"PK\x03\x04"):  # a zip's first entry, but no directory
            raise ArchiveError(
                f"{source}: a zip archive without its central directory at the end: truncated "
                "or corrupt; delete it and run `dvc repro download` to fetch it again, or pack "
                "it again and update data.md5"
            )
        raise ArchiveError(
            f"{source}: neither a folder nor a .tar, .tar.gz/.tgz or .zip archive; "
            "point data.url at one (data.format imagefolder)"
        )
    try:
        if source.is_dir():
            yield _folder_members(source), lambda member: member.handle.read_bytes()
        elif is_tar:
            with tarfile.open(source, "r:*") as archive:
                members = [Member(m.name, m.isdir(), m) for m in _checked(archive)]
                _check_tar_end(source, archive, members)
                yield members, lambda member: archive.extractfile(member.handle).read()
        else:
            with zipfile.ZipFile(source) as archive:
                yield _zip_members(archive), lambda member: archive.read(member.handle)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as error:
        reason = error or type(error).__name__
        if source.is_dir():  # the copy of a folder: a file in it cannot be read
            raise ArchiveError(
                f"{source}: a file cannot be read ({reason}); fix it in the folder data.url "
                "names, then copy it again: `dvc repro --force download`"
            ) from None
        raise ArchiveError(
            f"{source}: truncated, corrupt or unreadable ({reason}); "
            "delete it and run `dvc repro download` to fetch it again"
        ) from None


def _head(source: Path) -> bytes:
    with contextlib.suppress(OSError), source.open("rb") as f:
        return f.read(8)
    return b""


def _check_tar_end(source: Path, archive: tarfile.TarFile, members: list[Member]) -> None:
    """Refuse an uncompressed tar cut between two members, or with a broken header.

    tarfile takes the end of the file, or a header it cannot read after the first, for
    the end of the archive, so either reads as a smaller dataset without an error. A
    whole tar has a zero block where its listing stopped (two by POSIX; one is asked
    for). A compressed one (gzip, bzip2, xz, lzma) is left to its stream, which detects a
    cut itself ("ended before the end-of-stream marker"); its offsets are not the file's.
    """
    if not isinstance(archive.fileobj, io.BufferedReader):  # opened through a decompressor
        return
    with source.open("rb") as f:
        f.seek(archive.offset)
        end = f.read(tarfile.BLOCKSIZE)
    if end != bytes(tarfile.BLOCKSIZE):
        last = f" after {members[-1].name!r}" if members else ""
        what = "the file ends" if not end else "a header that cannot be read follows"
        raise ArchiveError(
            f"{source}: truncated or corrupt: {what}{last} ({len(members)} entries) "
            "instead of the zero blocks that end a tar archive, so the rest of the dataset "
            "is missing; delete it and run `dvc repro download` to fetch it again, or pack "
            "it again and update data.md5"
        )


def _checked(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in archive:  # reads every header: the listing pass
        check_member(member)
        yield member


# The zip compression methods Python's zipfile reads, and what to do with another archive.
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
REPACK = "pack the images again: `zip -r pets.zip pets` (no -e) or `tar czf pets.tgz pets`"


def _zip_members(archive: zipfile.ZipFile) -> list[Member]:
    members = []
    for info in archive.infolist():
        parts = info.filename.replace("\\", "/").split("/")
        if parts[0] == "" or ":" in parts[0] or ".." in parts:  # /x, C:x, a/../../x
            raise ArchiveError(f"unsafe archive member {info.filename!r}: path escapes the archive")
        if stat.S_ISLNK(info.external_attr >> 16):  # the Unix mode sits in the high 16 bits
            raise ArchiveError(f"unsafe archive member {info.filename!r}: a link, refused")
        if info.flag_bits & 0x1:  # read() would stop midway on "password required"
            raise ArchiveError(f"archive member {info.filename!r} is encrypted; {REPACK}")
        if info.compress_type not in ZIP_METHODS:  # Deflate64, from Windows, say
            raise ArchiveError(
                f"archive member {info.filename!r} is compressed with zip method "
                f"{info.compress_type}, which Python cannot read; {REPACK}"
            )
        members.append(Member(info.filename, info.is_dir(), info))
    return members


def _folder_members(root: Path) -> list[Member]:
    members = []
    for directory, folders, files in os.walk(root):  # does not follow links: refused below
        folders.sort()
        for name in [*folders, *sorted(files)]:
            path = Path(directory, name)
            relative = path.relative_to(root).as_posix()
            # A link to a file is read like the file: DVC's symlink cache (cache.type
            # symlink, common for shared caches) turns every copied image into one, and
            # nothing is extracted anywhere. Links to folders (loops) or nowhere are refused.
            if path.is_symlink() and not path.is_file():
                raise ArchiveError(
                    f"unsafe folder entry {relative!r}: a link to a folder or to nothing, refused"
                )
            members.append(Member(relative, name in folders, path))
    return members


def find_layout(members: list[Member], source: Path) -> Layout:
    """Check the train/ and test/ class folders; list their images in a fixed order."""
    hidden, visible = 0, []
    for member in members:
        parts = PurePosixPath(member.name.replace("\\", "/")).parts
        if any(part.startswith(".") or part == "__MACOSX" for part in parts):
            hidden += not member.is_dir
        elif parts:
            visible.append((parts, member))
    # The layout sits at the top, or under one top-level folder (`tar czf pets.tgz pets`).
    tops = {parts[0] for parts, _ in visible}
    if "train" in tops:
        depth = 0
    elif len(tops) == 1 and any(parts[1:2] == ("train",) for parts, _ in visible):
        depth = 1
    else:
        cifar = any(parts[-1] == "batches.meta" for parts, _ in visible)  # CIFAR-10's own layout
        hint = (
            "; this is CIFAR-10's python archive: set data.format: cifar10-python" if cifar else ""
        )
        raise LayoutError(
            f"{source}: no train/ folder at the top or under one top-level folder; an image "
            "folder dataset holds train/<class>/<image>, and optionally test/<class>/<image>" + hint
        )
    found: dict[str, dict[str, list[Member]]] = {"train": {}, "test": {}}
    other = 0
    unread: dict[str, int] = {}
    loose = {"train": 0, "test": 0}  # images lying in train/ or test/, outside class folders
    for parts, member in visible:
        if len(parts) <= depth:  # the top-level folder itself
            continue
        split, *rest = parts[depth:]
        if split not in found and rest:
            if not member.is_dir:
                unread[split] = unread.get(split, 0) + 1
            continue
        if split in found and rest and (member.is_dir or len(rest) >= 2):
            images = found[split].setdefault(rest[0], [])  # a class folder, even an empty one
            if member.is_dir:
                continue
            if PurePosixPath(rest[-1]).suffix.lower() in IMAGE_SUFFIXES:
                images.append(member)
                continue
        if split in found and len(rest) == 1 and not member.is_dir:
            if PurePosixPath(rest[0]).suffix.lower() in IMAGE_SUFFIXES:
                loose[split] += 1
                continue
        other += not member.is_dir
    train, test = found["train"], found["test"]
    names = tuple(sorted(train))
    if len(names) < 2:
        beside = f" and {loose['train']} images outside any" if loose["train"] else ""
        raise LayoutError(
            f"{source}: train/ holds {len(names)} class folder(s) {list(names)}{beside}; a "
            "classifier needs at least two: one folder per class, train/<class>/<image>"
        )
    if loose["test"] and not test:
        raise LayoutError(
            f"{source}: test/ holds {loose['test']} images but no class folders, so they have "
            "no labels to score against; sort them into test/<class>/, or move test/ out of "
            "the dataset and set data.test_size to hold out a split of train/ instead"
        )
    for name in names:
        if not train[name]:
            raise LayoutError(
                f"{source}: train/{name}/ holds no images (PNG, JPEG, BMP or GIF); "
                "add some or remove the folder"
            )
    for name in sorted(test):
        if name not in train:
            raise LayoutError(
                f"{source}: test/{name}/ has no train/{name}/, so no model can learn that class; "
                f"add train/{name}/ images or remove test/{name}/"
            )
        if not test[name]:
            raise LayoutError(f"{source}: test/{name}/ holds no images; add some or remove it")
    if test and set(test) != set(train):
        missing = sorted(set(train) - set(test))[0]
        raise LayoutError(
            f"{source}: test/ holds no {missing!r} images; add some to test/{missing}/, or remove "
            "test/ and set data.test_size to hold out a stratified test split instead"
        )
    images, labels = [], []
    for split in (train, test):
        for label, name in enumerate(names):
            images += sorted(split.get(name, []), key=lambda member: member.name)
            labels += [label] * len(split.get(name, []))
    num_train = sum(len(train[name]) for name in names)
    unread = dict(sorted(unread.items()))
    return Layout(
        names,
        images,
        np.array(labels, np.int32),
        num_train,
        hidden,
        other,
        unread,
        sum(loose.values()),
    )


def check_test_size(test_size: int, num_train: int) -> None:
    if not test_size < num_train:
        raise PipelineError(
            f"data.test_size: must be an integer between 1 and {num_train - 1} for this "
            f"dataset's {num_train} images, got {test_size}"
        )


def check_val_size(val_size: int, available: int) -> None:
    """Refuse, before any decoding, a data.val_size that leaves no training images;
    warn about one that takes over a quarter of them (the default, 5000, suits CIFAR-10)."""
    tenth = f"dvc exp run -S data.val_size={available // 10}"
    if val_size >= available:
        raise PipelineError(
            f"data.val_size: {val_size} validation images leave none of this dataset's "
            f"{available} training images to train on; hold out about a tenth: {tenth}"
        )
    if val_size > available / 4:
        print(
            f"prepare: warning: data.val_size holds out {val_size} of the {available} training "
            f"images ({val_size / available:.0%}) for validation; for a tenth: {tenth}",
            flush=True,
        )


# --- decoding ---------------------------------------------------------------------------------


def _decode_chunk(payloads: list[bytes], size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Runs in a worker: (n, size, size, 3) uint8 rows, and (row, reason) of each failure."""
    images = np.zeros((len(payloads), size, size, 3), np.uint8)
    failures = []
    for row, payload in enumerate(payloads):
        try:
            images[row] = load_image(io.BytesIO(payload), size)
        except Exception as error:  # whatever Pillow raises, it is this one file's fault
            failures.append((row, str(error) or type(error).__name__))
    return images, failures


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the stage, which stops them: one message, not one per worker.
    SIGTERM too: forked, they would inherit the stage's handler (pipeline.errors.cli)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def decode_images(
    layout: Layout,
    members: list[Member],
    read: Callable[[Member], bytes],
    size: int,
    on_bad_image: str,
    workers: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of `layout` into (N, size, size, 3) uint8, N = len(layout.images).

    Members are read in archive order (a .tar.gz is one sequential stream) and
    each decoded row lands at its image's place in `layout.images`. Returns the
    images and a (N,) bool mask, False for images skipped as undecodable.
    """
    slot_of = {id(member): slot for slot, member in enumerate(layout.images)}
    todo = [member for member in members if id(member) in slot_of]
    images = np.empty((len(todo), size, size, 3), np.uint8)
    decoded = np.ones(len(todo), bool)
    skipped: list[str] = []

    def collect(slots: np.ndarray, names: list[str], result) -> None:
        rows, failures = result
        images[slots] = rows
        for row, reason in failures:
            if on_bad_image == "fail":
                raise LayoutError(
                    f"{names[row]}: cannot decode it ({reason}); repair or delete it, or set "
                    "data.on_bad_image: skip to leave out images that cannot be read"
                )
            decoded[slots[row]] = False
            skipped.append(names[row])
            if len(skipped) <= SHOWN_SKIPS:
                print(f"prepare: skipping {names[row]}: {reason}", flush=True)

    pending: collections.deque = collections.deque()
    done, shown_s = 0, time.monotonic()
    pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint)
    try:
        for slots, names, payloads in _chunks(todo, read, slot_of, size):
            pending.append((slots, names, pool.submit(_decode_chunk, payloads, size)))
            while len(pending) > 2 * workers:  # bounds the encoded and decoded bytes in flight
                slots, names, future = pending.popleft()
                collect(slots, names, future.result())
                done += len(slots)
                if time.monotonic() - shown_s >= PROGRESS_S:
                    shown_s = time.monotonic()
                    print(f"prepare: decoded {done}/{len(todo)} images", flush=True)
        for slots, names, future in pending:
            collect(slots, names, future.result())
    finally:
        pool.shutdown(cancel_futures=True)
    if len(skipped) > SHOWN_SKIPS:
        print(f"prepare: ... and {len(skipped) - SHOWN_SKIPS} more skipped", flush=True)
    return images, decoded


def _chunks(
    todo: list[Member], read: Callable[[Member], bytes], slot_of: dict[int, int], side: int
) -> Iterator[tuple[np.ndarray, list[str], list[bytes]]]:
    """(slots, names, encoded bytes) of up to CHUNK_IMAGES members, fewer when their encoded
    bytes or their decoded (side, side, 3) arrays would pass CHUNK_BYTES: with 2 * workers + 1
    tasks in flight, 256 images of 1024 px would hold 26 GB on 16 CPUs."""
    most = min(CHUNK_IMAGES, max(1, CHUNK_BYTES // (side * side * 3)))
    slots, names, payloads, size = [], [], [], 0
    for member in todo:
        payloads.append(read(member))
        slots.append(slot_of[id(member)])
        names.append(member.name)
        size += len(payloads[-1])
        if len(payloads) == most or size >= CHUNK_BYTES:
            yield np.array(slots), names, payloads
            slots, names, payloads, size = [], [], [], 0
    if payloads:
        yield np.array(slots), names, payloads


# --- the dataset ------------------------------------------------------------------------------


def usable_cpus() -> int:
    """CPUs this process may use: its affinity on Linux, every CPU elsewhere (macOS has none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def _fixed_at_the_source(source: Path) -> Iterator[None]:
    """A folder dataset is read from download's copy in data/raw: a fix made in the copy
    is overwritten, and one made in the folder data.url names is not copied by itself (its
    params have not changed). Layout and decoding errors say so."""
    try:
        yield
    except LayoutError as error:
        copy = source.is_dir() and source.resolve().is_relative_to(paths.RAW_DIR.resolve())
        if not copy:  # an archive, or a folder read in place (benchmarks/throughput.py)
            raise
        raise LayoutError(
            f"{error} ({source} is download's copy of the folder data.url names: change "
            "that folder, then copy it again with `dvc repro --force download`)"
        ) from None


def read_imagefolder(source: Path, data: DataParams, workers: int | None = None) -> Dataset:
    """Read an image-folder dataset (folder or archive) into train and test splits.

    `workers` decoding processes; by default one per CPU this process may use.
    """
    workers = workers or usable_cpus()
    with open_dataset(source) as (members, read):
        with _fixed_at_the_source(source):
            layout = find_layout(members, source)
        has_test = len(layout.images) > layout.num_train
        if has_test and data.test_size:
            raise LayoutError(
                f"{source}: has its own test/ folder, so data.test_size must be 0, got "
                f"{data.test_size}: set it to 0 to evaluate on test/, or remove test/ to hold "
                "out a stratified split of train/"
            )
        if not has_test and not data.test_size:
            suggestion = max(1, layout.num_train // 10)
            raise LayoutError(
                f"{source}: no test/ folder, so data.test_size must say how many train/ images "
                f"to hold out for testing, got 0: e.g. dvc exp run -S data.test_size={suggestion}"
            )
        # Sizes that cannot fit fail now, not after minutes of decoding.
        if not has_test:
            check_test_size(data.test_size, layout.num_train)
        check_val_size(data.val_size, layout.num_train - (0 if has_test else data.test_size))
        counts = ((layout.hidden, "hidden"), (layout.other, "non-image"))
        left_out = [f"{count} {what}" for count, what in counts if count]
        print(
            f"prepare: {len(layout.images)} images of {len(layout.class_names)} classes"
            + (f"; left out {' and '.join(left_out)} files" if left_out else ""),
            flush=True,
        )
        if layout.loose:
            print(
                f"prepare: left out {layout.loose} images outside class folders (train/<image> "
                "or test/<image>: no class, so no label); put them in train/<class>/ to use them",
                flush=True,
            )
        if layout.unread:  # a train/val/test layout, most often: say val/ is not used
            folders = ", ".join(f"{name}/ ({count} files)" for name, count in layout.unread.items())
            print(
                f"prepare: not read: {folders}; only train/ and test/ are, and data.val_size "
                "holds validation images out of train/ (move them there to train on them)",
                flush=True,
            )
        with _fixed_at_the_source(source):
            images, decoded = decode_images(
                layout, members, read, data.image_size, data.on_bad_image, workers
            )
    labels, num_train = layout.labels, layout.num_train
    if not decoded.all():
        num_train = int(decoded[:num_train].sum())
        images, labels = images[decoded], labels[decoded]
        print(f"prepare: skipped {int((~decoded).sum())} images that cannot be read", flush=True)
    train = Split(images[:num_train], labels[:num_train])
    if has_test:
        test = Split(images[num_train:], labels[num_train:])
    else:
        check_test_size(data.test_size, num_train)  # again: skipped images lower the count
        train_idx, test_idx = stratified_split(train.labels, data.test_size, data.seed)
        train, test = (Split(train.images[i], train.labels[i]) for i in (train_idx, test_idx))
    counts = np.bincount(train.labels, minlength=len(layout.class_names))
    if counts.min() == 0:
        empty = layout.class_names[int(counts.argmin())]
        raise LayoutError(
            f"{source}: no {empty!r} image is left for training (all were skipped or held out "
            "for testing); add images to that class or lower data.test_size"
        )
    # A class without test images would score 0 in the per-class figures and the macro F1.
    counts = np.bincount(test.labels, minlength=len(layout.class_names))
    if counts.min() == 0:
        empty = layout.class_names[int(counts.argmin())]
        fix = (
            f"those in test/{empty}/ cannot be read: add readable ones" if has_test
            else f"raise data.test_size ({data.test_size}) to at least one image per class"
        )  # fmt: skip
        raise LayoutError(f"{source}: no {empty!r} image is in the test split; {fix}")
    return Dataset(train, test, layout.class_names)
