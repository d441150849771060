"""Outputs written whole: a kill, a crash or a full disk midway leaves the old file or
none, never part of one that `dvc metrics show`, evaluate or a resumed training would
then read as if it were complete."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk: both must survive a power loss."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def partial_path(path: Path) -> Path:
    """Where `path` is written before its rename: `test.part.json` for `test.json`. The
    suffix stays last, since Keras, numpy and matplotlib pick the format by it."""
    return path.with_name(f"{path.stem}.part{path.suffix}")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield the path to write `path`'s new content to; once written, flush it to disk and
    rename it over `path`. On an error before the rename the partial file is removed and
    `path` untouched; one flushing the folder afterwards is raised with `path` new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        yield partial
        fsync(partial)  # on disk before the rename makes it look complete
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    try:
        fsync(path.parent)  # the rename itself
    except OSError as error:
        # Some network and FUSE file systems cannot flush a folder (PostgreSQL tolerates
        # these too); there the rename is as durable as they make it.
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise


def write_text(path: Path, text: str, private: bool = False) -> None:
    """`private`: owner-only (0600) from its first byte, for secrets and what names them."""
    with replacing(path) as partial:
        if not private:
            partial.write_text(text)
            return
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.chmod(partial, 0o600)  # also when a kill left one with wider permissions
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
