"""Which arithmetic produced a result.

The same code on the same platform gives bit-identical results (the zoo's weights and the harvest
hash the same run after run). Another CPU need not: PyTorch picks its vectorised kernels by the
instructions a CPU has (AVX2, AVX-512) and MKL picks its own code path, and each rounds differently
in the last bits. Training the zoo's models (800 steps each) carries such bits into other weights,
and an audit of other weights verifies other concepts (the README's "Reproducibility"). So every
stage records where it ran, and the report and `audit diff` say so when results come from
different platforms.

The zoo's cache key includes the CPU and the code paths in use (``kernel_identity``); the paths can
be chosen:
``ATEN_CPU_CAPABILITY`` (PyTorch: ``avx2``, ``avx512``, ``default``) and ``MKL_CBWR`` (MKL's
conditional numerical reproducibility: ``AVX2``, ``COMPATIBLE``…), set before torch loads. Both
change results on an AMD EPYC (Zen 3): ``ATEN_CPU_CAPABILITY=default`` and ``MKL_CBWR=COMPATIBLE``
each gave the zoo's alpha other weights, and ``MKL_CBWR=AVX2`` another harvest (the same weights).
Whether one setting gives the same bits on Intel and AMD CPUs is not measured here, so nothing is
pinned by default; what ran is recorded either way.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

#: Environment variables that change which kernels run (PyTorch's dispatch, MKL's code branch).
KERNEL_OVERRIDES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR")


def kernel_identity() -> str:
    """The CPU and the code paths in use, for cache keys of work whose bits depend on them (the zoo's
    weights). The CPU model stands in for what MKL picks by itself on it."""
    import torch

    return f"{_cpu_name()}|{torch.backends.cpu.get_cpu_capability()}|{os.environ.get('MKL_CBWR', 'native')}"


@functools.cache  # a process does not change CPUs; build keys ask for it often
def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what Python's platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def numerics_platform(device: str | None = None) -> dict[str, str]:
    """What decides the arithmetic of a stage that runs on ``device`` (None: CUDA when present).

    CPU fields are recorded for GPU runs too: tokenisation, sampling and some small ops stay on it.
    """
    import torch

    record = {
        "torch": torch.__version__.split("+")[0],
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
    }
    if device is not None and str(device).startswith("mps"):
        record["gpu"] = "Apple MPS"
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda and torch.cuda.is_available():
        index = torch.device(device or "cuda").index or 0
        record["gpu"] = torch.cuda.get_device_name(index)
        record["cuda"] = str(torch.version.cuda)
    for name in KERNEL_OVERRIDES:
        if os.environ.get(name):
            record[name] = os.environ[name]
    return record


def describe_platform(record: dict | None) -> str:
    """One line for people, e.g. "AMD EPYC (x86_64), torch 2.13.0, CPU kernels AVX2, BLAS MKL"."""
    if not record:
        return "a platform the version that made it did not record"
    parts = [f"{record.get('cpu', 'unknown CPU')} ({record.get('machine', '?')})"]
    if record.get("gpu"):  # MPS has no CUDA version
        parts.insert(0, f"{record['gpu']} (CUDA {record['cuda']})" if record.get("cuda") else record["gpu"])
    parts += [f"torch {record.get('torch', '?')}", f"CPU kernels {record.get('cpu_kernels', '?')}",
              f"BLAS {record.get('blas', '?')}"]
    parts += [f"{name}={record[name]}" for name in KERNEL_OVERRIDES if record.get(name)]
    return ", ".join(parts)
