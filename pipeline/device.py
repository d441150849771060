"""Which device trains, in which precision: `auto` resolved to what measured fastest here."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import TrainParams

# TensorFlow's start-up lines: C++ logs written before its logging is set up, so
# TF_CPP_MIN_LOG_LEVEL cannot silence them (TF 2.21, seen on every stage start).
STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine, GPU will not be used",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)


def is_startup_noise(line: str, nvidia_device: bool) -> bool:
    """A TensorFlow start-up line that says nothing on this machine.

    CUDA's failed cuInit is noise only where there is no NVIDIA device at all; with
    one, it is the reason the GPU is not used, and is kept.
    """
    if "failed call to cuInit" in line:
        return not nvidia_device
    return any(noise in line for noise in STARTUP_NOISE)


@contextlib.contextmanager
def filtered_stderr(drop: Callable[[str], bool]) -> Iterator[None]:
    """Hold what is written to file descriptor 2 (C++ included), then pass on what `drop` keeps.

    Held in a file, not a pipe, so a chatty library can never block on it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not drop(line)))
            sys.stderr.flush()


def import_tensorflow():
    """TensorFlow and Keras, imported and their devices listed, without the start-up chatter.

    Stages call it first; TF_CPP_MIN_LOG_LEVEL=0 shows everything again.
    """
    nvidia = Path("/dev/nvidiactl").exists()
    quiet = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") != "0"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the lines TF does filter
    with filtered_stderr(lambda line: quiet and is_startup_noise(line, nvidia)):
        import keras  # noqa: F401  (loads its backend: TensorFlow)
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # CUDA's probe logs here
    return tf


@dataclass(frozen=True)
class Device:
    kind: str  # "GPU" or "CPU"
    count: int  # local accelerators used
    precision: str  # resolved Keras dtype policy
    jit_compile: bool  # XLA


def resolve_device(params: TrainParams) -> Device:
    """Pick the dtype policy and XLA from what is here; `auto` is what measured fastest.

    GPUs: bfloat16 where the chip has it (compute capability 8.0+: A100, H100),
    float16 with loss scaling before that, and XLA. CPUs: bfloat16 where the
    CPU computes it natively (AMX or AVX512-BF16: oneDNN runs the convolutions
    in bf16), else float32; no XLA. On a 2-core Xeon with AMX, batch 128, the
    default network trained at 96 img/s in float32 and 133 in mixed_bfloat16 on
    the full data, and bfloat16 with XLA at 70-72 (BENCHMARKS.md).
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        precision = params.precision
        if precision == "auto":
            details = tf.config.experimental.get_device_details(gpus[0])
            major = (details.get("compute_capability") or (0, 0))[0]
            precision = "mixed_bfloat16" if major >= 8 else "mixed_float16"
        return Device("GPU", len(gpus), precision, jit_compile=True)
    precision = params.precision
    if precision == "auto":
        precision = "mixed_bfloat16" if _cpu_has_bfloat16() else "float32"
    return Device("CPU", 1, precision, jit_compile=False)


def _cpu_has_bfloat16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay with float32
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags
