"""TensorFlow imported without its start-up chatter: output plumbing, no effect on results.

TF 2.21 writes its first lines before its logging is set up, so
TF_CPP_MIN_LOG_LEVEL cannot silence them. train, evaluate and predict call
import_tensorflow() first; it holds file descriptor 2 during the import and the
device probe and passes on every line but the known ones.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

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
