"""Facts about the machine a figure was measured on: CPU name, ISA extensions, libraries.

One place reads /proc/cpuinfo; every report, runner description and script asks here.
Speed ratios between backends depend on the ISA (AMX, AVX-512 VNNI/BF16), so a figure is
never printed without it.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cvt_export.records import Machine

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_bf16", "amx_int8", "amx_tile", "avx_vnni")
LIBRARIES = ("torch", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "tensorrt", "numpy")


@cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "CPU"


def isa() -> list[str]:
    """The ISA extensions that change inference speed, as the kernel reports them."""
    have = set(_cpuinfo().get("flags", "").split())
    return [f for f in ISA_FLAGS if f in have]


INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_dot_exact() -> bool:
    """Whether this CPU's INT8 dot products accumulate in 32 bits (VNNI or AMX). x86 CPUs without
    them multiply u8·s8 pairs into 16-bit sums (VPMADDUBSW), which saturate for full-range INT8
    weights: runtimes must then use 7-bit weights or u8·u8 kernels. Other architectures: True."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    return any(f in isa() for f in INT8_DOT_FLAGS)


def libraries() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def describe() -> Machine:
    """The report's `machine` record."""
    return Machine(cpu=cpu_name(), cores=os.cpu_count(), isa=tuple(isa()), os=platform.platform(),
                   python=sys.version.split()[0], libraries=libraries())
