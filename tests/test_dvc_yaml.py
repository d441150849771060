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


def out_paths(stage: str, kind: str = "outs") -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in DVC[stage].get(kind, [])]


def posix(*files) -> list[str]:
    return [file.as_posix() for file in files]


def test_stage_paths_match_pipeline_paths():
    """Every out, metrics file and plot dvc.yaml names is a path pipeline/paths.py gives the
    code, so a rename in one fails here, not as a missing out after a whole training."""
    assert out_paths("download") == posix(paths.RAW_DIR)
    assert out_paths("prepare") == posix(paths.PREPARED_DIR)
    assert paths.RAW_DIR.as_posix() in DVC["prepare"]["deps"]
    assert out_paths("train") == posix(paths.MODEL_FILE, paths.MODEL_INFO)
    assert out_paths("train", "metrics") == posix(paths.TRAIN_METRICS)
    assert out_paths("train", "plots") == posix(paths.HISTORY_FILE)
    assert out_paths("evaluate") == []
    assert out_paths("evaluate", "metrics") == posix(paths.TEST_METRICS)
    assert sorted(out_paths("evaluate", "plots")) == sorted(posix(
        paths.CONFUSION_FILE, paths.MISCLASSIFIED_PNG, paths.PER_CLASS_PNG, paths.CONFUSION_PNG,
    ))  # fmt: skip
    assert {"models/model.keras", "models/model_info.json"} <= set(DVC["evaluate"]["deps"])
    top = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    drawn = {file for plot in top["plots"] for spec in plot.values() for file in spec["y"]}
    assert drawn == set(posix(paths.HISTORY_FILE))


def test_every_uncached_out_is_a_metric_or_plot_so_the_run_cache_keeps_the_stage():
    """DVC saves a stage's run to its run cache only if each `cache: false` out is declared
    as metrics or plots (dvc/stage: no_cache_outs): params tried before come back without
    training again, as the README says."""
    for name, stage in DVC.items():
        for out in stage.get("outs", []):
            options = next(iter(out.values())) if isinstance(out, dict) else {}
            assert options.get("cache", True), (name, out)


# Plumbing every stage imports: listing it would re-run the whole DAG for a reworded error
# message or a filtered log line. (startup.py's oneDNN switch changes speed and float
# round-off, as another machine would, not what is computed.)
NOT_DEPS = {"pipeline/config.py", "pipeline/paths.py", "pipeline/errors.py", "pipeline/startup.py"}


def imported_modules(path: str, top_level: bool = False) -> set[str]:
    """pipeline/*.py files that `path` imports, at the top or inside a function (or at the
    top only: what importing it runs)."""
    found = set()
    tree = ast.parse((ROOT / path).read_text())
    for node in tree.body if top_level else ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found |= {n.replace(".", "/") + ".py" for n in names if n.startswith("pipeline.")}
    return {file for file in found if (ROOT / file).is_file()}


def code_of(module: str) -> set[str]:
    """The stage's module, what it imports anywhere, and what those import at their top,
    on and on: prepare imports imagefolder, whose top imports images.py's decoder."""
    code = {module} | imported_modules(module)
    todo = sorted(code - {module})
    while todo:
        for found in imported_modules(todo.pop(), top_level=True) - code - NOT_DEPS:
            code.add(found)
            todo.append(found)
    return code


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stage_depends_on_the_code_it_runs(stage):
    """The stage's module and every module it runs, so that a code change re-runs it."""
    module = DVC[stage]["cmd"].removeprefix("python -m ").replace(".", "/") + ".py"
    code = code_of(module)
    assert sorted(code - NOT_DEPS - set(DVC[stage]["deps"])) == []


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
