"""dvc.yaml and the code agree on paths and params, and the data stages run under `dvc repro`."""

from __future__ import annotations

import ast

import numpy as np
import pytest
import yaml

from pipeline import paths
from tests.cifar_archive import write_archive
from tests.http_server import PayloadServer
from tests.repo import ROOT, dvc, make_repo

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def out_paths(stage: str) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in DVC[stage]["outs"]]


def test_stage_paths_match_pipeline_paths():
    assert out_paths("download") == [paths.RAW_DIR.as_posix()]
    assert out_paths("prepare") == [paths.PREPARED_DIR.as_posix()]
    assert paths.RAW_DIR.as_posix() in DVC["prepare"]["deps"]


# Plumbing every stage imports: listing it would re-run the whole DAG for a reworded error
# message or a filtered log line. (startup.py's oneDNN switch changes speed and float
# round-off, as another machine would, not what is computed.) prepare.py also holds the
# reader of data/prepared (load_split), whose format changes only with a new
# data/prepared, itself a dep of the stages that read it.
NOT_DEPS = {"pipeline/config.py", "pipeline/paths.py", "pipeline/errors.py", "pipeline/startup.py"}
READERS = {"pipeline/prepare.py"}


def imported_modules(path: str) -> set[str]:
    """pipeline/*.py files that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found |= {n.replace(".", "/") + ".py" for n in names if n.startswith("pipeline.")}
    return {file for file in found if (ROOT / file).is_file()}


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stage_depends_on_the_code_it_runs(stage):
    """The stage's module and every module it imports, so that a code change re-runs it."""
    module = DVC[stage]["cmd"].removeprefix("python -m ").replace(".", "/") + ".py"
    code = {module} | imported_modules(module)
    readers = READERS - {module}
    assert sorted(code - NOT_DEPS - readers - set(DVC[stage]["deps"])) == []


def test_data_stages_read_only_data_params():
    """So that editing model, train or evaluate never re-runs download or prepare."""
    assert DVC["download"]["params"] == ["data.url", "data.md5"]
    assert DVC["prepare"]["params"] == [
        "data.format",
        "data.image_size",
        "data.test_size",
        "data.val_size",
        "data.seed",
        "data.on_bad_image",
    ]


@pytest.mark.slow
def test_dvc_repro_runs_download_and_prepare(tmp_path):
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    md5 = write_archive(archive, train_per_class=20, test_per_class=4)
    with PayloadServer(archive.read_bytes(), "/cifar-10-python.tar.gz") as server:
        repo = make_repo(
            tmp_path / "repo", {"data.url": server.url, "data.md5": md5, "data.val_size": 40}
        )
        first = dvc(repo, "repro", "prepare")
        assert "Running stage 'download'" in first.stdout
        assert "Running stage 'prepare'" in first.stdout
        with np.load(repo / "data/prepared/val.npz") as val:
            assert np.bincount(val["labels"]).tolist() == [4] * 10
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        assert lock["download"]["outs"][0]["md5"]
        assert lock["prepare"]["params"]["params.yaml"]["data.val_size"] == 40
        requests = len(server.requests)

        second = dvc(repo, "repro", "prepare")
        assert "Running stage" not in second.stdout
        assert len(server.requests) == requests  # nothing fetched again
