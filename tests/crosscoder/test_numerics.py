"""Where a result was computed: what decides its arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from crosscoder.numerics import describe_platform, numerics_platform


def test_the_record_names_torch_the_cpu_and_its_kernels(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    record = numerics_platform("cpu")
    assert record["torch"] == torch.__version__.split("+")[0]
    assert record["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert record["cpu"] and record["machine"]
    assert "gpu" not in record  # a CPU stage, whatever the machine has
    assert record["ATEN_CPU_CAPABILITY"] == "avx2" and "MKL_CBWR" not in record  # overrides only when set
    line = describe_platform(record)
    assert line.startswith(f"{record['cpu']} ({record['machine']}), torch ") and line.endswith("ATEN_CPU_CAPABILITY=avx2")


def test_a_gpu_comes_first_and_an_old_artefact_says_it_was_not_recorded():
    record = {"gpu": "NVIDIA H200", "cuda": "13.0", "cpu": "Intel Xeon", "machine": "x86_64", "torch": "2.13.0",
              "cpu_kernels": "AVX512", "blas": "MKL"}
    assert describe_platform(record).startswith("NVIDIA H200 (CUDA 13.0), Intel Xeon (x86_64), torch 2.13.0")
    assert describe_platform(None) == "a platform the version that made it did not record"



def test_a_zoo_built_with_other_kernels_gets_its_own_cache_key():
    probe = ("from crosscoder.zoo.build import build_key, code_version, get_spec; "
             "print(build_key(get_spec('alpha')), code_version())")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}

    def keys(**extra) -> list[str]:
        return subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True, text=True,
                              check=True).stdout.split()

    native = keys()
    assert native == keys()  # stable
    others = [keys(ATEN_CPU_CAPABILITY="default"), keys(MKL_CBWR="COMPATIBLE")]
    assert len({native[0]} | {k[0] for k in others}) == 3  # the models' builds are kept apart
    assert {native[1]} == {k[1] for k in others}  # the generated data, which no kernel shapes, is shared


def test_mps_is_recorded_as_the_device():
    record = numerics_platform("mps")
    assert record["gpu"] == "Apple MPS" and describe_platform(record).startswith("Apple MPS, ")  # no CUDA version
