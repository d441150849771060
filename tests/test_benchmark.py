"""`make bench` end to end on a few images: every mode runs, the JSON holds what BENCHMARKS.md
quotes, and the ratios are the ones of the medians it prints. No timing is asserted."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import yaml

from tests.repo import ROOT, run, stage_env


@pytest.mark.slow
def test_benchmark_runs_every_mode_and_reports_consistent_ratios(tmp_path, raw_params):
    out, params = tmp_path / "throughput.json", tmp_path / "params.yaml"
    raw_params["model"].update(stem_filters=8, filters=[8, 16])  # the real config, shrunk
    params.write_text(yaml.safe_dump(raw_params))
    command = [sys.executable, "-m", "benchmarks.throughput", "--images", "136", "--epochs", "2",
               "--rounds", "1", "--batch-size", "32", "--out", str(out),
               "--params", str(params)]  # fmt: skip
    # The shrunk network: 29 s per child for bare mode instead of 46 s, 40 s instead of 67 s
    # for the pipeline's (2 EPYC cores, alone). One round: the turns the modes take over
    # several are the test below's. Killed with its child processes past 840 s
    # (tests/repo.run), before pytest's 900 s.
    result = run(command, ROOT, stage_env(), timeout=840)
    report = json.loads(out.read_text())

    results = report["results"]
    auto = results["pipeline:auto"]["precision"]
    others = [m for m in results if m.startswith("pipeline:") and m != "pipeline:auto"]
    # The comparison this machine gets without --with-bfloat16 (see the test below).
    assert others == ([] if auto == "float32" else ["pipeline:float32"])
    assert set(results) == {"bare", "pipeline:auto", "tutorial", "input", *others}
    assert len(results["input"]["epoch_rates"]) == 1  # once, in round 1; warm-up dropped
    assert report["input_over_pipeline"] == pytest.approx(
        results["input"]["images_per_second"] / results["pipeline:auto"]["images_per_second"]
    )
    # 136 images in batches of 32: every mode trains 4 whole batches an epoch, 128 images.
    assert report["images_per_epoch"] == 128 and report["data"] == "random uint8 images"
    if not others:
        assert "mixed_bfloat16 not measured" in result.stdout
    for mode in ("bare", "pipeline:auto", "tutorial"):
        assert len(results[mode]["round_medians"]) == 1, mode
        assert len(results[mode]["epoch_rates"]) == 1, mode  # the warm-up epoch dropped
    for mode, measured in results.items():
        assert measured["images_per_second"] > 0 and measured["peak_rss_mb"] > 100, mode
    rate = {mode: r["images_per_second"] for mode, r in results.items()}
    assert report["pipeline_over_bare"] == pytest.approx(rate["pipeline:auto"] / rate["bare"])
    assert report["pipeline_over_tutorial"] == pytest.approx(
        rate["pipeline:auto"] / rate["tutorial"]
    )
    assert report["batch_size"] == 32 and report["rounds"] == 1
    assert report["cuda_visible_devices"] == os.environ.get("CUDA_VISIBLE_DEVICES", "0")
    assert report["params"] == str(params)
    assert "b/a" in result.stdout and "b/c" in result.stdout
    assert "absl::InitializeLog" not in result.stdout + result.stderr  # TensorFlow's chatter
    assert report["pipeline_float32_over_bare"] == pytest.approx(
        rate["pipeline:float32" if others else "pipeline:auto"] / rate["bare"]
    )


@pytest.mark.parametrize("auto", ["float32", "mixed_bfloat16"])
def test_the_modes_take_turns_every_round_and_the_extras_run_once(monkeypatch, auto):
    """a, b and c (and b's comparison precision) alternate round after round, so a slower
    spell of a noisy machine hits them all; the input pipeline and the sweep's other batch
    sizes run once. Each mode's figure is the median of all its epochs, not of its rounds."""
    import argparse

    from benchmarks import throughput

    calls = []

    def fake_measure(mode, args, label="", batch=None):
        calls.append((mode, batch))
        rates = [10.0 * len(calls), 10.0 * len(calls) + 1]  # each call's own, told apart
        precision = auto if mode == "pipeline:auto" else mode.partition(":")[2] or "float32"
        return {
            "images_per_second": sum(rates) / 2, "epoch_rates": rates, "precision": precision,
            "peak_rss_mb": 100.0 + len(calls), "peak_gpu_mb": None, "onednn": True, "images": 8,
        }  # fmt: skip

    monkeypatch.setattr(throughput, "measure", fake_measure)
    args = argparse.Namespace(rounds=3, batch_size=32, sweep=[64, 32, 64], with_bfloat16=False)
    results = throughput.interleaved(args)

    turn = ["bare", "pipeline:auto", "tutorial"]
    other = [] if auto == "float32" else ["pipeline:float32"]
    round_1, later_round = [*turn, *other, "input"], [*turn, *other]
    assert [mode for mode, _ in calls] == [*round_1, *later_round, *later_round, "pipeline:auto"]
    assert calls[-1] == ("pipeline:auto", 64)  # 64 once; 32 is every round's size
    assert set(results) == {*turn, *other, "input", "pipeline:auto@64"}
    for mode in (*turn, *other):
        assert len(results[mode]["round_medians"]) == 3, mode
        assert len(results[mode]["epoch_rates"]) == 6, mode
    assert len(results["input"]["epoch_rates"]) == 2
    bare = [index + 1 for index, (mode, _) in enumerate(calls) if mode == "bare"]
    rates = sorted(rate for call in bare for rate in (10.0 * call, 10.0 * call + 1))
    assert results["bare"]["images_per_second"] == (rates[2] + rates[3]) / 2
    assert results["bare"]["peak_rss_mb"] == 100.0 + bare[-1]
    assert results["pipeline:auto"]["precision"] == auto


def test_every_mode_trains_on_one_gpu_unless_the_user_chose(monkeypatch, tmp_path):
    """The pipeline would mirror over all GPUs while bare fit and the tutorial use one."""
    import argparse
    import subprocess

    from benchmarks import throughput

    seen = []

    def fake_run(command, **kwargs):
        seen.append(kwargs["env"].get("CUDA_VISIBLE_DEVICES"))
        line = (
            '{"images_per_second": 1.0, "precision": "float32", "peak_rss_mb": 1.0, '
            '"peak_gpu_mb": null}'
        )
        return subprocess.CompletedProcess(command, 0, stdout=line + "\n", stderr="")

    monkeypatch.setattr(throughput.subprocess, "run", fake_run)
    args = argparse.Namespace(
        images=8, epochs=2, batch_size=4, params=tmp_path / "params.yaml", prepared=None
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    throughput.measure("bare", args)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    throughput.measure("pipeline:auto", args)
    assert seen == ["0", "2,3"]


def test_an_epoch_is_timed_from_the_end_of_the_one_before_to_its_own_end():
    from benchmarks.throughput import rates_between

    assert rates_between([10.0, 12.0, 16.0], 100) == [50.0, 25.0]  # the first epoch dropped


def test_the_pipelines_epoch_time_holds_its_checkpoint_and_mlflow_logging(
    raw_params, mlflow_store, monkeypatch
):
    """(b) is the pipeline's whole path: work done after Keras's on_epoch_end counts too."""
    import dataclasses
    import time

    from benchmarks.throughput import load_images, run_pipeline
    from pipeline.config import parse_params
    from pipeline.progress import EpochRecorder

    params = parse_params(raw_params)
    params = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, stem_filters=4, filters=(4,), units_per_stage=1),
    )
    end_epoch = EpochRecorder.end_epoch

    def slow_end_epoch(self, *args):  # a checkpoint and a log that take 1 s
        end_epoch(self, *args)
        time.sleep(1.0)

    monkeypatch.setattr(EpochRecorder, "end_epoch", slow_end_epoch)
    split, meta = load_images(None, 16)
    measured = run_pipeline("float32", params, split, meta, epochs=3, batch=8)
    assert len(measured["epoch_rates"]) == 2
    assert max(measured["epoch_rates"]) < 16  # 16 images an epoch, each over 1 s


def test_comparison_precision_measures_float32_beside_reduced_and_bfloat16_only_on_request():
    from benchmarks.throughput import comparison_precision

    # b/a at equal precision needs the pipeline in float32 wherever auto reduced it.
    assert comparison_precision("mixed_bfloat16", with_bfloat16=False) == "float32"
    assert comparison_precision("mixed_float16", with_bfloat16=False) == "float32"
    # auto's float32 means no native bfloat16: emulated, so measured only when asked.
    assert comparison_precision("float32", with_bfloat16=False) is None
    assert comparison_precision("float32", with_bfloat16=True) == "mixed_bfloat16"


def test_the_pipeline_mode_trains_in_the_params_precision_unless_told_another(raw_params):
    """`--params` with train.precision mixed_float16 measures the pipeline in it (and in
    float32 beside it); the comparison mode's own precision overrides the file's."""
    import dataclasses

    from benchmarks.throughput import measured_params
    from pipeline.config import parse_params

    params = parse_params(raw_params)
    float16 = dataclasses.replace(
        params, train=dataclasses.replace(params.train, precision="mixed_float16")
    )
    measured = measured_params(float16, "auto", epochs=2, batch=32)
    train = measured.train
    assert (train.precision, train.epochs, train.batch_size) == ("mixed_float16", 2, 32)
    assert measured.model == params.model and measured.train.augment == params.train.augment
    assert measured_params(float16, "float32", 2, 32).train.precision == "float32"
    assert measured_params(params, "auto", 2, 32).train.precision == "auto"


@pytest.mark.slow
def test_inference_benchmark_compares_both_ways_on_the_same_model(tmp_path):
    out = tmp_path / "inference.json"
    command = [sys.executable, "-m", "benchmarks.inference", "--images", "40", "--rounds", "2",
               "--batch-size", "16", "--out", str(out)]  # fmt: skip
    result = run(command, ROOT, stage_env(), timeout=300)
    report = json.loads(out.read_text())

    results = report["results"]
    assert set(results) == {"keras", "pipeline"}
    for way, measured in results.items():
        assert len(measured["round_rates"]) == 2, way  # took its turn every round
        assert measured["images_per_second"] > 0, way
    assert report["pipeline_over_keras"] == pytest.approx(
        results["pipeline"]["images_per_second"] / results["keras"]["images_per_second"]
    )
    # One model, one input, the same batches: the two ways must agree (bit for bit where
    # measured, on 2 EPYC cores; a kernel choice on another CPU may move the last digits).
    assert report["max_abs_difference"] <= 1e-5
    assert report["identical"] == (report["max_abs_difference"] == 0)
    assert "same probabilities: " in result.stdout
    assert report["images"] == 40 and report["batch_size"] == 16


@pytest.mark.slow
def test_sam_benchmark_times_both_kinds_of_step(tmp_path, raw_params):
    params = tmp_path / "params.yaml"
    raw_params["model"].update(stem_filters=8, filters=[8, 16])  # the real config, shrunk
    params.write_text(yaml.safe_dump(raw_params))
    command = [sys.executable, "-m", "benchmarks.sam", "--steps", "2", "--rounds", "2",
               "--batch-size", "16", "--params", str(params)]  # fmt: skip
    result = run(command, ROOT, stage_env(), timeout=300)
    lines = result.stdout.strip().splitlines()
    rounds = [line for line in lines if line.startswith("sam bench: round ")]
    assert [line.split(":")[1].strip() for line in rounds] == [
        "round 1/2 plain",
        "round 1/2 sam",
        "round 2/2 plain",
        "round 2/2 sam",
    ]
    rates = [float(line.split()[-2]) for line in rounds]  # printed to 0.1 img/s
    summary = re.fullmatch(
        r"(?:CPU|GPU), \w+, batch 16: plain ([\d.]+) img/s, SAM ([\d.]+) img/s; "
        r"SAM / plain ([\d.]+)",
        lines[-1],
    )
    assert summary, lines[-1]
    plain, sam, ratio = (float(group) for group in summary.groups())
    assert plain == pytest.approx((rates[0] + rates[2]) / 2, abs=0.11)  # medians of two
    assert sam == pytest.approx((rates[1] + rates[3]) / 2, abs=0.11)
    assert ratio == pytest.approx(sam / plain, rel=0.05)


def fake_child(results_by_mode: dict, gpus: int = 0, seen: list | None = None):
    """A stand-in for the measuring child processes: the mode's rate (per batch size) as
    the JSON line a child prints."""
    import subprocess

    real_run = subprocess.run

    def fake_run(command, **kwargs):
        if "--child" not in command:  # git, for the commit measured
            return real_run(command, **kwargs)
        mode = command[command.index("--child") + 1]
        batch = int(command[command.index("--batch-size") + 1])
        if seen is not None:
            seen.append((mode, batch))
        rate = results_by_mode[mode] * (batch / 128 if mode == "pipeline:auto" else 1)
        line = json.dumps({
            "images_per_second": rate, "epoch_rates": [rate, rate], "precision": "float32",
            "peak_rss_mb": 1.0, "peak_gpu_mb": None, "onednn": True, "images": 256,
            "gpus": gpus,
        })  # fmt: skip
        return subprocess.CompletedProcess(command, 0, stdout=line + "\n", stderr="")

    return fake_run


def test_the_sweep_measures_the_pipeline_at_each_batch_and_names_the_fastest(
    monkeypatch, tmp_path, capsys
):
    """--sweep: (b) once at each batch size after the rounds; the input alone once."""
    from benchmarks import throughput

    seen: list = []
    rates = {"bare": 100.0, "pipeline:auto": 96.0, "tutorial": 48.0, "input": 960.0}
    monkeypatch.setattr(throughput.subprocess, "run", fake_child(rates, seen=seen))
    monkeypatch.setattr(throughput, "nvidia_device", lambda: False)
    monkeypatch.setattr(throughput, "device", lambda: "CPU: test")
    out = tmp_path / "bench.json"
    monkeypatch.setattr(
        sys, "argv",
        ["throughput", "--images", "256", "--rounds", "2", "--sweep", "64,128,256,64",
         "--out", str(out)],
    )  # fmt: skip
    throughput.main()
    report = json.loads(out.read_text())

    assert seen == [
        ("bare", 128), ("pipeline:auto", 128), ("tutorial", 128), ("input", 128),
        ("bare", 128), ("pipeline:auto", 128), ("tutorial", 128),
        ("pipeline:auto", 64), ("pipeline:auto", 256),
    ]  # fmt: skip
    results = report["results"]
    assert results["pipeline:auto@64"]["images_per_second"] == 48.0
    assert results["pipeline:auto@256"]["images_per_second"] == 192.0
    assert (report["fastest_batch_size"], report["fastest_images_per_second"]) == (256, 192.0)
    assert report["input_over_pipeline"] == pytest.approx(10.0)
    assert report["pipeline_over_tutorial"] == pytest.approx(2.0)  # at --batch-size, 128
    assert report["images_per_epoch"] == 256 and report["data"] == "random uint8 images"
    assert report["tensorflow"] and report["keras"]
    printed = capsys.readouterr().out
    assert "fastest batch 256: 192.0 img/s" in printed
    assert "auto / " not in printed and not any(k.startswith("auto_over") for k in report)


def test_batch_sizes_are_read_and_bad_ones_refused():
    import argparse

    from benchmarks.throughput import batch_sizes

    assert batch_sizes("256,512, 1024") == [256, 512, 1024]
    for bad in ("", "big", "256,0"):
        with pytest.raises(argparse.ArgumentTypeError, match="256,512,1024"):
            batch_sizes(bad)


def test_a_gpu_machine_whose_tensorflow_sees_no_gpu_stops_at_the_first_child(monkeypatch):
    """Without TensorFlow's CUDA build the benchmark would time the CPU on a GPU machine."""
    import argparse

    from benchmarks import throughput

    monkeypatch.setattr(throughput.subprocess, "run", fake_child({"bare": 1.0}, gpus=0))
    monkeypatch.setattr(throughput, "nvidia_device", lambda: True)
    args = argparse.Namespace(
        images=8, epochs=2, batch_size=4, params=ROOT / "params.yaml", prepared=None
    )
    with pytest.raises(SystemExit, match=r"TensorFlow sees no GPU.*make bench GPU=1"):
        throughput.measure("bare", args)
    for hidden in ("-1", ""):  # the GPUs hidden on purpose: the CPU is what is wanted
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert throughput.measure("bare", args)["gpus"] == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(throughput.subprocess, "run", fake_child({"bare": 1.0}, gpus=1))
    assert throughput.measure("bare", args)["gpus"] == 1


def test_only_whole_batches_are_fed_so_no_epoch_ends_on_a_short_one():
    import numpy as np

    from benchmarks.throughput import full_batches
    from pipeline.prepared import Split

    split = Split(np.zeros((70, 2, 2, 3), np.uint8), np.arange(70, dtype=np.int32))
    images, labels = full_batches(split, 32)
    assert images.shape[0] == 64 and labels.tolist() == list(range(64))


def test_an_image_folder_is_read_as_prepare_reads_it_into_a_prepared_folder(tmp_path, raw_params):
    """--imagefolder ../shared/data/cifar10-jpeg.tar.gz: its train/ images, all of them."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from benchmarks.throughput import load_images, prepare_imagefolder
    from pipeline.config import parse_params

    def write(archive, splits):
        with tarfile.open(archive, "w:gz") as tar:
            for split, count in splits:
                for name in ("cat", "dog"):
                    for index in range(count):
                        buffer = io.BytesIO()
                        Image.new("RGB", (40, 40), (index * 50, 0, 0)).save(buffer, "JPEG")
                        member = tarfile.TarInfo(f"{split}/{name}/{index}.jpg")
                        member.size = len(buffer.getvalue())
                        tar.addfile(member, io.BytesIO(buffer.getvalue()))
        return archive

    archive = write(tmp_path / "images.tar.gz", [("train", 3), ("test", 1)])
    prepared = tmp_path / "prepared"
    assert prepare_imagefolder(archive, parse_params(raw_params), prepared) == 6
    split, meta = load_images(str(prepared), 100)
    assert split.images.shape == (6, 32, 32, 3)  # resized to data.image_size, as prepare does
    assert sorted(np.bincount(split.labels).tolist()) == [3, 3]
    assert meta["class_names"] == ["cat", "dog"]
    # Without test/, a tenth held out as prepare would (not prepare's data.test_size error).
    lone = write(tmp_path / "train-only.tar.gz", [("train", 10)])
    assert prepare_imagefolder(lone, parse_params(raw_params), tmp_path / "lone") == 18


def test_the_input_benchmark_times_both_ways_at_each_batch_size(tmp_path, capsys):
    """benchmarks/input.py: the train stage's batches with and without augmentation."""
    from benchmarks import input as input_bench

    out = tmp_path / "input.json"
    input_bench.main(
        ["--images", "48", "--epochs", "2", "--rounds", "2", "--batch-sizes", "16,32",
         "--out", str(out)]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"augmented@16", "plain@16", "augmented@32", "plain@32"}
    for key, measured in report["results"].items():
        assert len(measured["epoch_rates"]) == 2, key  # two rounds, the first epoch dropped
        assert measured["images_per_second"] == pytest.approx(
            sorted(measured["epoch_rates"])[0] / 2 + sorted(measured["epoch_rates"])[1] / 2
        )
    assert report["augment"]["flip"] is True and report["images"] == 48
    # Whole batches, as training draws them: 48 images make one batch of 32, 16 left out.
    assert report["results"]["plain@32"]["images_per_epoch"] == 32
    assert report["results"]["augmented@16"]["images_per_epoch"] == 48
    assert "batch 32" in capsys.readouterr().out
