"""Which precision the CPU path picks, and when a chosen one is only emulated."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline import device
from pipeline.config import parse_params
from pipeline.device import Device, cpu_flags, emulation_warning, native_on_cpu, resolve_device

# Abridged /proc/cpuinfo of the two machines measured in BENCHMARKS.md.
XEON_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile\n"
ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_cpu_flags_are_the_x86_flags_line_and_unknown_elsewhere(tmp_path):
    (tmp_path / "xeon").write_text(XEON_AMX + "\nprocessor\t: 1\nflags\t\t: other\n")
    (tmp_path / "arm").write_text(GRAVITON)
    assert cpu_flags(tmp_path / "xeon") == {
        "fpu", "avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"
    }  # fmt: skip
    assert cpu_flags(tmp_path / "arm") is None  # Arm's feature names are not x86's
    assert cpu_flags(tmp_path / "missing") is None  # not Linux


def test_native_precisions_follow_the_flags(tmp_path):
    xeon, zen3 = flags_of(XEON_AMX, tmp_path), flags_of(ZEN3, tmp_path)
    assert native_on_cpu("mixed_bfloat16", xeon) and native_on_cpu("mixed_float16", xeon)
    assert not native_on_cpu("mixed_bfloat16", zen3) and not native_on_cpu("mixed_float16", zen3)
    assert not native_on_cpu("mixed_bfloat16", None) and not native_on_cpu("mixed_bfloat16", set())
    assert native_on_cpu("mixed_bfloat16", {"avx512_bf16"})  # either flag is enough


def flags_of(cpuinfo: str, folder) -> set[str] | None:
    (folder / "cpuinfo").write_text(cpuinfo)
    return cpu_flags(folder / "cpuinfo")


@pytest.mark.parametrize(
    ("flags", "chosen", "precision", "emulated"),
    [
        (XEON_AMX, "auto", "mixed_bfloat16", False),
        (ZEN3, "auto", "float32", False),
        (ZEN3, "float32", "float32", False),
        (ZEN3, "mixed_bfloat16", "mixed_bfloat16", True),
        (ZEN3, "mixed_float16", "mixed_float16", True),
        (XEON_AMX, "mixed_float16", "mixed_float16", False),
        (None, "mixed_bfloat16", "mixed_bfloat16", False),  # unknown CPU: no claim either way
        (None, "auto", "float32", False),
    ],
)
def test_auto_and_emulation_on_a_cpu(
    raw_params, monkeypatch, tmp_path, flags, chosen, precision, emulated
):
    import tensorflow as tf

    params = parse_params(raw_params).train
    known = None if flags is None else flags_of(flags, tmp_path)
    monkeypatch.setattr(device, "cpu_flags", lambda: known)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])  # a CPU machine
    resolved = resolve_device(dataclasses.replace(params, precision=chosen))
    assert (resolved.kind, resolved.precision, resolved.emulated) == ("CPU", precision, emulated)
    assert (emulation_warning(resolved) is not None) == emulated


def test_the_emulation_warning_names_the_precision_the_missing_flags_and_the_way_out():
    warning = emulation_warning(Device("CPU", 1, "mixed_float16", False, emulated=True))
    assert warning == (
        "train: warning: train.precision mixed_float16 on a CPU without amx_fp16 or "
        "avx512_fp16: TensorFlow emulates it, several times slower than float32 "
        "(BENCHMARKS.md); train.precision auto picks the fastest this machine has"
    )
    assert emulation_warning(Device("CPU", 1, "mixed_float16", False)) is None
    assert emulation_warning(Device("GPU", 1, "mixed_float16", True)) is None
