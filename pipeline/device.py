"""Which device trains, in which precision: `auto` resolved to what measured fastest here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import TrainParams
from pipeline.startup import onednn_enabled


@dataclass(frozen=True)
class Device:
    kind: str  # "GPU" or "CPU"
    count: int  # local accelerators used
    precision: str  # resolved Keras dtype policy
    jit_compile: bool  # XLA
    onednn: bool | None = None  # CPU kernels through oneDNN (pipeline.startup); None: unknown
    # Which library emulates the reduced precision on this CPU, where that is known to
    # train slower than float32 (BENCHMARKS.md), else None:
    # "eigen": TensorFlow's own kernels (oneDNN off, or not running it on this CPU);
    #   on a Zen 3 float16 trained 4x and bfloat16 11x slower than float32.
    # "onednn": oneDNN's AVX-512 kernels, which emulate bfloat16 arithmetic in float32 on a
    #   CPU without AVX512-BF16 or AMX-BF16; 3x slower than float32 on CPU-3.
    emulated: str | None = None


# CPU flags (/proc/cpuinfo) with which bfloat16 is native, so `auto` picks it.
NATIVE_BFLOAT16 = ("amx_bf16", "avx512_bf16")
# TensorFlow 2.21's rule (IsDataTypeSupportedByOneDNNOnThisCPU) for running a precision
# through oneDNN at all, as flag sets of which one must be complete; otherwise Eigen runs it.
ONEDNN_CPU_FLAGS = {
    "mixed_bfloat16": ({"avx512f"}, {"avx_ne_convert"}),
    "mixed_float16": ({"avx512bw", "avx512_fp16"}, {"avx512bw", "amx_fp16"}, {"avx_ne_convert"}),
}
ONEDNN_NEEDS = {
    "mixed_bfloat16": "AVX-512 or AVX-NE-CONVERT",
    "mixed_float16": "AVX512-FP16, AMX-FP16 or AVX-NE-CONVERT",
}


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
    flags = cpu_flags()
    precision = params.precision
    if precision == "auto":
        precision = "mixed_bfloat16" if flags and flags.intersection(NATIVE_BFLOAT16) else "float32"
    onednn = onednn_enabled()
    return Device(
        "CPU", 1, precision, jit_compile=False, onednn=onednn,
        emulated=emulated_on_cpu(precision, flags, onednn),
    )  # fmt: skip


def emulated_on_cpu(precision: str, flags: set[str] | None, onednn: bool | None) -> str | None:
    """Which library emulates this reduced precision here, slower than float32
    (Device.emulated): "eigen" where TensorFlow's own kernels, not oneDNN, run it;
    "onednn" for bfloat16 on AVX-512 without bfloat16 instructions. Else None, also
    where that is not measured: unknown flags (not x86 Linux), bfloat16 with only
    AVX-NE-CONVERT, float16 with AVX512-FP16.
    """
    if precision == "float32" or flags is None:
        return None
    if onednn is False or not any(needed <= flags for needed in ONEDNN_CPU_FLAGS[precision]):
        return "eigen"
    avx512_only = "avx512f" in flags and "avx_ne_convert" not in flags
    if precision == "mixed_bfloat16" and avx512_only and not flags.intersection(NATIVE_BFLOAT16):
        return "onednn"
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first x86 CPU's feature flags; None where unknown (not Linux, or not x86:
    Arm's features have other names, so no precision is judged emulated there)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def emulation_warning(device: Device) -> str | None:
    """What to tell a user whose chosen precision this CPU only emulates, else None."""
    if device.emulated == "onednn":
        return (
            f"train: warning: train.precision {device.precision} is emulated by oneDNN in "
            "float32 arithmetic on this CPU (AVX-512 without AVX512-BF16 or AMX-BF16): on "
            "such a Xeon bfloat16 trained 3x slower than float32 (BENCHMARKS.md); "
            "train.precision auto picks the fastest here"
        )
    if device.emulated != "eigen":
        return None
    if device.onednn is False:
        why = "oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0)"
    else:
        why = f"oneDNN runs it only with {ONEDNN_NEEDS[device.precision]}"
    return (
        f"train: warning: train.precision {device.precision} is emulated by TensorFlow's "
        f"own kernels on this CPU ({why}): on a Zen 3, float16 trained 4x and bfloat16 11x "
        "slower than float32 (BENCHMARKS.md); train.precision auto picks the fastest here"
    )
