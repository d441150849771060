"""TensorFlow imported with its switches set and without its start-up chatter.

Its switches (`set_tensorflow_environment`) are environment variables its C++
reads once, on import: oneDNN's kernels on x86-64 machines without an NVIDIA
GPU, which changes speed, not results beyond float round-off. The rest is output plumbing:
TF 2.21 writes its first lines before its logging is set up, so
TF_CPP_MIN_LOG_LEVEL cannot silence them. train, evaluate and predict call
import_tensorflow() first; during the import and the device probe it sends file
descriptor 2 through a filter process that passes on every line but the known ones.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# TensorFlow's start-up lines: C++ logs written before its logging is set up, so
# TF_CPP_MIN_LOG_LEVEL cannot silence them (TF 2.21, seen on every stage start).
STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)
# CUDA's probe: noise where there is no NVIDIA device at all; with one, the reason
# the GPU goes unused, and kept.
NO_GPU_NOISE = (
    "Could not find cuda drivers on your machine, GPU will not be used",
    "failed call to cuInit",
)


def is_startup_noise(line: str, nvidia_device: bool) -> bool:
    """A TensorFlow start-up line that says nothing on this machine."""
    if any(noise in line for noise in NO_GPU_NOISE):
        return not nvidia_device
    return any(noise in line for noise in STARTUP_NOISE)


def filter_lines(source: BinaryIO, sink: BinaryIO, nvidia_device: bool) -> None:
    """Copy `source` to `sink` line by line as it comes, leaving out the start-up noise."""
    for line in source:
        if not is_startup_noise(line.decode(errors="replace"), nvidia_device):
            sink.write(line)
            sink.flush()


@contextlib.contextmanager
def filtered_stderr(nvidia_device: bool) -> Iterator[None]:
    """Send file descriptor 2 (C++ writes included) through a filter process for the block.

    A process, not a thread or a held file: if TensorFlow aborts or hangs in the
    block, every line before that still reaches the terminal, as it comes.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        kind = "gpu" if nvidia_device else "cpu"
        # This file as a script, isolated (-I): it needs only the standard library, and
        # runs whatever the working directory and sys.path of the stage.
        command = [sys.executable, "-I", str(Path(__file__).resolve()), kind]
        filter_ = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=saved, stderr=saved)
    except OSError:  # no filter: the lines are shown, nothing is lost
        os.close(saved)
        yield
        return
    os.dup2(filter_.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        filter_.stdin.close()
        filter_.wait()  # it has passed on all it keeps before anything else is written


def nvidia_device() -> bool:
    """An NVIDIA driver is loaded here (its control device exists), GPU usable or not."""
    return Path("/dev/nvidiactl").exists()


def set_tensorflow_environment() -> None:
    """TensorFlow's switches that it reads once, on import: call before importing it.

    oneDNN: on Linux, TensorFlow turns its oneDNN kernels on by itself only on CPUs
    with AVX512-VNNI, AVX-VNNI, AVX512-BF16 or AMX (recent Intel, AMD Zen 4). On 2
    AMD EPYC Zen 3 cores (AVX2 only) they made float32 inference 1.5 times and
    training 1.4 times faster (BENCHMARKS.md, "oneDNN on CPUs without AVX-512"),
    so on x86-64 they are on unless TF_ENABLE_ONEDNN_OPTS says otherwise (0 turns
    them off). Elsewhere (ARM) TensorFlow's default stands: not measured there.
    Nor beside an NVIDIA GPU, where TensorFlow advises against oneDNN (its CPU
    kernels are untested with GPUs) and the GPU does the convolutions anyway.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and not nvidia_device():
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def onednn_enabled() -> bool | None:
    """Whether the imported TensorFlow runs its CPU kernels through oneDNN; None if unknown."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # private: no public query

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def import_tensorflow():
    """TensorFlow and Keras, imported and their devices listed, without the start-up chatter.

    Stages call it first; it sets TensorFlow's switches before the import
    (`set_tensorflow_environment`). TF_CPP_MIN_LOG_LEVEL defaults to 1 (TensorFlow's
    own info lines off, its warnings on); 0 shows everything, start-up lines included.
    """
    set_tensorflow_environment()
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        quiet: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        quiet = filtered_stderr(nvidia_device())
    with quiet:
        import keras  # noqa: F401  (loads its backend: TensorFlow)
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")  # CUDA's probe logs here
    share_gpus(tf, gpus)
    return tf


def share_gpus(tf, gpus: list) -> None:
    """Let each process take GPU memory as it needs it, unless TF_FORCE_GPU_ALLOW_GROWTH says.

    TensorFlow reserves nearly all of every GPU it sees for its process by default,
    so a second process on the same GPUs (`dvc queue start -j 2`, `predict` beside a
    training) could not allocate. Through the config rather than by setting
    TF_FORCE_GPU_ALLOW_GROWTH, which TensorFlow answers with a warning per GPU. Memory
    once taken is kept, so jobs that need more than the GPU has together still fail.
    Not measured here (no GPU).
    """
    if "TF_FORCE_GPU_ALLOW_GROWTH" in os.environ:  # the user's `true` or `false`; TF applies it
        return
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised (TensorFlow used before): its setting stands
            return


if __name__ == "__main__":  # the filter process of filtered_stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the stage's; end of input ends this
    filter_lines(sys.stdin.buffer, sys.stdout.buffer, nvidia_device=sys.argv[1:] == ["gpu"])
