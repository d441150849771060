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
    return Device("CPU", 1, precision, jit_compile=False, onednn=onednn_enabled())


def _cpu_has_bfloat16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay with float32
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags
