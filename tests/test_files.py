"""Outputs written whole: an error midway leaves the old file, and no partial one."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import files


def test_write_text_replaces_the_whole_file(tmp_path):
    path = tmp_path / "metrics" / "test.json"  # its folder is made
    files.write_text(path, "old\n")
    files.write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.json"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_error_midway_keeps_the_old_file_and_removes_the_partial_one(tmp_path, error):
    path = tmp_path / "test.json"
    path.write_text("old\n")
    with pytest.raises(type(error)):
        with files.replacing(path) as partial:
            partial.write_text('{"accuracy": 0.9')  # cut short
            raise error
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["test.json"]


def test_the_partial_file_keeps_the_suffix_that_picks_the_format(tmp_path):
    """np.savez appends .npz to a name without it (and Keras refuses one without .keras)."""
    path = tmp_path / "train.npz"
    assert files.partial_path(path).name == "train.part.npz"
    with files.replacing(path) as partial:
        np.savez(partial, labels=np.arange(3))
    assert np.load(path)["labels"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["train.npz"]
