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
    # A reduced precision this CPU has no instructions for: TensorFlow emulates it, several
    # times slower than float32 (on a Zen 3, float16 ~4x, bfloat16 ~11x: BENCHMARKS.md).
    emulated: bool = False


# CPU flags (/proc/cpuinfo) under which oneDNN computes each reduced precision natively.
NATIVE_CPU_FLAGS = {
    "mixed_bfloat16": ("amx_bf16", "avx512_bf16"),
    "mixed_float16": ("amx_fp16", "avx512_fp16"),
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
        precision = "mixed_bfloat16" if native_on_cpu("mixed_bfloat16", flags) else "float32"
    emulated = flags is not None and precision != "float32" and not native_on_cpu(precision, flags)
    return Device(
        "CPU", 1, precision, jit_compile=False, onednn=onednn_enabled(), emulated=emulated
    )


def native_on_cpu(precision: str, flags: set[str] | None) -> bool:
    """Whether a CPU with these flags computes `precision` natively (None: flags unknown)."""
    return bool(flags and flags.intersection(NATIVE_CPU_FLAGS.get(precision, ())))


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
    if not device.emulated:
        return None
    native = " or ".join(NATIVE_CPU_FLAGS[device.precision])
    return (
        f"train: warning: train.precision {device.precision} on a CPU without {native}: "
        "TensorFlow emulates it, several times slower than float32 (BENCHMARKS.md); "
        "train.precision auto picks the fastest this machine has"
    )
