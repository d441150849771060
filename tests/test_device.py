"""Which precision the CPU path picks, and when a chosen one is left to emulation."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline import device
from pipeline.config import parse_params
from pipeline.device import Device, cpu_flags, emulated_on_cpu, emulation_warning, resolve_device

# Abridged /proc/cpuinfo: CPU-2 and EPYC-2 of BENCHMARKS.md, an AVX-512 Xeon without bfloat16
# instructions (Cascade Lake; CPU-3 shows the same), and an Arm machine.
XEON_AMX = (
    "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 "
    "amx_tile\n"
)
ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
CASCADE_LAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def flags_of(cpuinfo: str, folder) -> set[str] | None:
    (folder / "cpuinfo").write_text(cpuinfo)
    return cpu_flags(folder / "cpuinfo")


def test_cpu_flags_are_the_x86_flags_line_and_unknown_elsewhere(tmp_path):
    (tmp_path / "xeon").write_text(XEON_AMX + "\nprocessor\t: 1\nflags\t\t: other\n")
    (tmp_path / "arm").write_text(GRAVITON)
    assert cpu_flags(tmp_path / "xeon") == {
        "fpu", "avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"
    }  # fmt: skip
    assert cpu_flags(tmp_path / "arm") is None  # Arm's feature names are not x86's
    assert cpu_flags(tmp_path / "missing") is None  # not Linux


def test_emulation_follows_tensorflows_onednn_rule(tmp_path):
    xeon, zen3 = flags_of(XEON_AMX, tmp_path), flags_of(ZEN3, tmp_path)
    cascade = flags_of(CASCADE_LAKE, tmp_path)
    for precision in ("mixed_bfloat16", "mixed_float16"):
        assert emulated_on_cpu(precision, zen3, onednn=True) == "eigen"  # no AVX-512
        assert emulated_on_cpu(precision, xeon, onednn=True) is None
        assert emulated_on_cpu(precision, xeon, onednn=False) == "eigen"  # oneDNN off
        assert emulated_on_cpu(precision, None, onednn=True) is None  # unknown CPU: no claim
        assert emulated_on_cpu("float32", zen3, onednn=False) is None
    # AVX-512 without bfloat16 instructions: oneDNN runs bfloat16 but emulates its arithmetic
    # (3x slower than float32 on CPU-3), and float16 needs AVX512-FP16 or AMX-FP16 beside
    # AVX512BW. Only AVX-NE-CONVERT: oneDNN runs both, speed unmeasured, no claim.
    assert emulated_on_cpu("mixed_bfloat16", cascade, onednn=True) == "onednn"
    assert emulated_on_cpu("mixed_bfloat16", cascade, onednn=False) == "eigen"
    assert emulated_on_cpu("mixed_bfloat16", cascade | {"avx512_bf16"}, onednn=True) is None
    assert emulated_on_cpu("mixed_bfloat16", cascade | {"amx_bf16"}, onednn=True) is None
    assert emulated_on_cpu("mixed_bfloat16", {"avx2", "avx_ne_convert"}, onednn=True) is None
    assert emulated_on_cpu("mixed_float16", cascade, onednn=True) == "eigen"
    assert emulated_on_cpu("mixed_float16", {"avx_ne_convert"}, onednn=True) is None
    assert emulated_on_cpu("mixed_float16", {"avx512_fp16"}, onednn=True) == "eigen"  # + BW


@pytest.mark.parametrize(
    ("flags", "chosen", "precision", "emulated"),
    [
        (XEON_AMX, "auto", "mixed_bfloat16", None),
        (ZEN3, "auto", "float32", None),
        (CASCADE_LAKE, "auto", "float32", None),  # bfloat16 not native: auto stays float32
        (CASCADE_LAKE, "mixed_bfloat16", "mixed_bfloat16", "onednn"),
        (ZEN3, "float32", "float32", None),
        (ZEN3, "mixed_bfloat16", "mixed_bfloat16", "eigen"),
        (ZEN3, "mixed_float16", "mixed_float16", "eigen"),
        (XEON_AMX, "mixed_float16", "mixed_float16", None),
        (None, "mixed_bfloat16", "mixed_bfloat16", None),  # unknown CPU: no claim either way
        (None, "auto", "float32", None),
    ],
)
def test_auto_and_emulation_on_a_cpu(
    raw_params, monkeypatch, tmp_path, flags, chosen, precision, emulated
):
    import tensorflow as tf

    params = parse_params(raw_params).train
    known = None if flags is None else flags_of(flags, tmp_path)
    monkeypatch.setattr(device, "cpu_flags", lambda: known)
    monkeypatch.setattr(device, "onednn_enabled", lambda: True)
    listed = tf.config.list_physical_devices
    no_gpu = lambda kind=None: [] if kind == "GPU" else listed(kind)  # noqa: E731
    monkeypatch.setattr(tf.config, "list_physical_devices", no_gpu)  # a CPU machine
    resolved = resolve_device(dataclasses.replace(params, precision=chosen))
    assert (resolved.kind, resolved.precision, resolved.emulated) == ("CPU", precision, emulated)
    assert (emulation_warning(resolved) is not None) == (emulated is not None)


def test_the_emulation_warning_says_why_and_the_way_out():
    warning = emulation_warning(Device("CPU", 1, "mixed_float16", False, True, emulated="eigen"))
    assert warning == (
        "train: warning: train.precision mixed_float16 is emulated by TensorFlow's own kernels "
        "on this CPU (oneDNN runs it only with AVX512-FP16, AMX-FP16 or AVX-NE-CONVERT): on a "
        "Zen 3, float16 trained 4x and bfloat16 11x slower than float32 (BENCHMARKS.md); "
        "train.precision auto picks the fastest here"
    )
    off = emulation_warning(Device("CPU", 1, "mixed_bfloat16", False, False, emulated="eigen"))
    assert "(oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0))" in off
    assert emulation_warning(
        Device("CPU", 1, "mixed_bfloat16", False, True, emulated="onednn")
    ) == (
        "train: warning: train.precision mixed_bfloat16 is emulated by oneDNN in float32 "
        "arithmetic on this CPU (AVX-512 without AVX512-BF16 or AMX-BF16): on such a Xeon "
        "bfloat16 trained 3x slower than float32 (BENCHMARKS.md); train.precision auto "
        "picks the fastest here"
    )
    assert emulation_warning(Device("CPU", 1, "mixed_float16", False)) is None
    assert emulation_warning(Device("GPU", 1, "mixed_float16", True)) is None
