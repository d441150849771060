"""TensorFlow's start-up chatter stays out of the stages' output; everything else gets through."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import types

import pytest

from pipeline.startup import STARTUP_NOISE, filtered_stderr, is_startup_noise
from tests.repo import ROOT, stage_env

# What TensorFlow 2.21 printed at every stage start on this CPU, TF_CPP_MIN_LOG_LEVEL=2 or not.
SEEN = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795917828.951943   20904 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1795917828.953460   20904 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1795917829.066942   20904 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 AVX512_FP16 AVX_VNNI AMX_TILE AMX_INT8 AMX_BF16 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1795917834.431424   20904 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""  # noqa: E501


def test_start_up_lines_are_noise_but_cuda_failures_beside_a_gpu_are_not():
    lines = SEEN.splitlines()
    assert all(is_startup_noise(line, nvidia_device=False) for line in lines)
    kept = [line for line in lines if not is_startup_noise(line, nvidia_device=True)]
    assert kept == [lines[2], lines[-1]]  # why a present GPU goes unused
    assert not is_startup_noise("error: data/prepared: run `dvc repro prepare` first", False)
    assert not is_startup_noise("W0000 00:00:1.0 1 some_op.cc:1] Out of memory", False)


def test_filtered_stderr_drops_the_noise_of_c_level_writes_and_passes_the_rest(capfd):
    with filtered_stderr(nvidia_device=False):
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on.\nkept from C++\n")
        print("kept from Python", file=sys.stderr)
    print("after", file=sys.stderr)
    err = capfd.readouterr().err
    # (Under pytest, sys.stderr is not file descriptor 2, so Python's line may come first.)
    assert sorted(err.splitlines()) == ["after", "kept from C++", "kept from Python"]
    assert err.endswith("after\n")


def test_what_was_written_before_a_crash_still_gets_out():
    # TensorFlow aborting in its import (a CPU it was not built for, say) must leave its reason.
    code = (
        "import os\nfrom pipeline.startup import filtered_stderr\n"
        "with filtered_stderr(nvidia_device=False):\n"
        "    os.write(2, b'oneDNN custom operations are on\\nthe reason it died\\n')\n"
        "    os._exit(3)\n"
    )
    died = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )  # returns once the filter process, holding stderr too, has passed everything on
    assert died.returncode == 3
    assert died.stderr == "the reason it died\n"


@pytest.mark.slow
def test_importing_tensorflow_prints_none_of_it():
    def start(code: str) -> str:
        env = stage_env()
        env.pop("TF_CPP_MIN_LOG_LEVEL")  # as a user's shell has it
        command = [sys.executable, "-c", code]
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return result.stderr

    plain = start("import tensorflow as tf; tf.config.list_physical_devices('GPU')")
    assert STARTUP_NOISE[0] in plain  # what there is to filter, on any machine
    quiet = start("from pipeline.startup import import_tensorflow; import_tensorflow()")
    assert not any(noise in quiet for noise in STARTUP_NOISE), quiet
    if not os.path.exists("/dev/nvidiactl"):
        assert "cuInit" not in quiet and "cuda drivers" not in quiet, quiet


def test_gpus_are_shared_by_growth_unless_the_user_says_otherwise(monkeypatch):
    from pipeline.startup import share_gpus

    class FakeConfig:  # tf.config.experimental's part of it, recording what it is told
        def __init__(self, initialised: bool = False):
            self.growth, self.initialised = [], initialised

        def set_memory_growth(self, gpu, enable):
            if self.initialised:
                raise RuntimeError("Physical devices cannot be modified after being initialized")
            self.growth.append((gpu, enable))

    def share(env_value: str | None, initialised: bool = False) -> list:
        config = FakeConfig(initialised)
        tf = types.SimpleNamespace(config=types.SimpleNamespace(experimental=config))
        if env_value is None:
            monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
        else:
            monkeypatch.setenv("TF_FORCE_GPU_ALLOW_GROWTH", env_value)
        share_gpus(tf, ["GPU:0", "GPU:1"])
        return config.growth

    assert share(None) == [("GPU:0", True), ("GPU:1", True)]
    assert share("false") == [] and share("true") == []  # TensorFlow applies the user's own
    assert share(None, initialised=True) == []  # too late in this process: no error either

    # And every stage gets it: import_tensorflow hands it the GPUs it listed.
    from pipeline import startup

    handed = []
    monkeypatch.setattr(startup, "share_gpus", lambda tf, gpus: handed.append(gpus))
    tf = startup.import_tensorflow()
    assert handed == [tf.config.list_physical_devices("GPU")]


@pytest.mark.slow
@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or os.path.exists("/dev/nvidiactl"),
    reason="oneDNN is switched on x86-64 without an NVIDIA GPU",
)
def test_stages_run_tensorflow_with_onednn_unless_the_user_turns_it_off():
    # TensorFlow's own default is off on CPUs without AVX512-VNNI/BF16 or AMX (AMD EPYC).
    code = (
        "import os\nfrom pipeline.startup import import_tensorflow, onednn_enabled\n"
        "import_tensorflow()\nprint(os.environ['TF_ENABLE_ONEDNN_OPTS'], onednn_enabled())\n"
    )

    def start(extra: dict) -> str:
        env = stage_env(extra)
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)
        env.update(extra)
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert start({}) == "1 True"
    assert start({"TF_ENABLE_ONEDNN_OPTS": "0"}) == "0 False"  # the user's choice stands
