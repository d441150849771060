"""A DVC remote: push a finished pipeline's data and model, pull them into a fresh clone.

A local folder stands in for object storage or SSH: `dvc push` and `dvc pull`
go through the same code for every remote. The clone gets the code, params,
dvc.lock and metrics from git and everything else from the remote, byte for
byte, and then `dvc repro` has nothing to do: no download, no training, and no
need for the MLflow store the original training logged to (it is not in git).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cifar_archive import write_archive
from tests.http_server import PayloadServer
from tests.repo import TINY as BASE
from tests.repo import dvc, make_repo, run, stage_env

pytestmark = pytest.mark.slow

TINY = {**BASE, "train.epochs": 1}


def dvc_files(repo: Path) -> dict[str, bytes]:
    """Every file of the DVC-cached outputs (data and model), by path."""
    files = {}
    for top in ("data", "models"):
        for path in sorted((repo / top).rglob("*")):
            if path.is_file() and path.name != ".gitignore":
                files[path.relative_to(repo).as_posix()] = path.read_bytes()
    return files


def git(repo: Path, *args: str):
    return run(["git", *args], repo, stage_env())


def test_push_then_pull_into_a_fresh_clone_restores_everything(tmp_path):
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    md5 = write_archive(archive, train_per_class=40, test_per_class=10)
    with PayloadServer(archive.read_bytes(), "/cifar-10-python.tar.gz") as served:
        repo = make_repo(tmp_path / "repo", {**TINY, "data.url": served.url, "data.md5": md5})
        dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "trained")

    remote = tmp_path / "remote"  # as `dvc remote add -d storage s3://bucket/path` would be
    dvc(repo, "remote", "add", "-d", "storage", str(remote))
    git(repo, "commit", "-q", "-am", "remote")
    pushed = dvc(repo, "push")
    assert "pushed" in pushed.stdout, pushed.stdout
    assert any(remote.rglob("*")), "nothing reached the remote"
    original = dvc_files(repo)
    assert {
        "data/raw/cifar-10-python.tar.gz", "data/prepared/train.npz", "data/prepared/val.npz",
        "data/prepared/test.npz", "data/prepared/meta.json", "models/model.keras",
        "models/model_info.json",
    } <= set(original)  # fmt: skip

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, stage_env())
    assert dvc_files(clone) == {}  # git carries no data or model
    assert not (clone / "mlflow.db").exists()  # nor the MLflow store
    dvc(clone, "pull")
    assert dvc_files(clone) == original  # byte for byte

    status = dvc(clone, "status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    repro = dvc(clone, "repro")
    assert "Running stage" not in repro.stdout, repro.stdout
    assert not (clone / "mlflow.db").exists()  # nothing ran, so nothing needed MLflow
    assert "Cache and remote 'storage' are in sync." in dvc(clone, "status", "-c").stdout
