"""One prepared GPU run: training and harvest throughput at realistic sizes, bf16.

    python -m crosscoder.bench_cuda --out DIR [--quick]

Writes ``DIR/cuda_bench.json`` after every stage, so a run cut short still leaves its figures.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from .bench_harvest import run_harvest_benchmark
from .bench_train import _train_one, run_train_benchmark


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--stages", default="", help="comma-separated stage names to run (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "stages": {},
    }
    if args.quick:
        stages = {
            "train_vs_dense": lambda: run_train_benchmark(d_a=64, d_b=96, dict_size=1024, k=8, batch_size=256,
                                                           steps=5, warmup=1, concepts=200, device=device, dtype="bfloat16"),
            "harvest_small": lambda: run_harvest_benchmark("small", device, "bfloat16", max_tokens=2000, context_length=128),
        }
    else:
        stages = {
            # The comparison the issue asks for, at D = 32k with the paper's widths and k.
            "train_vs_dense_D32k": lambda: run_train_benchmark(
                d_a=4096, d_b=4096, dict_size=32768, k=200, batch_size=2048, steps=20, warmup=3,
                concepts=4000, device=device, dtype="bfloat16"),
            # The paper's dictionary (D = 131,072, k = 200, batch 2,048): ours only.
            "train_paper_D131k": lambda: _train_one("ours-dense", dict(
                d_a=4096, d_b=4096, dict_size=131072, k=200, batch_size=2048, steps=15, warmup=3,
                concepts=4000, device=device, dtype="bfloat16")),
            "harvest_paper_geometry": lambda: run_harvest_benchmark(
                "paper", device, "bfloat16", max_tokens=120_000, context_length=1024, batch_docs=16),
        }
    wanted = [name for name in args.stages.split(",") if name]
    for name, stage in stages.items():
        if wanted and name not in wanted:
            continue
        started = time.perf_counter()
        try:
            result = stage()
            report["stages"][name] = {"ok": True, "seconds": round(time.perf_counter() - started, 1), "result": result}
        except Exception as exc:  # keep going: each stage's figures stand alone
            report["stages"][name] = {"ok": False, "error": repr(exc), "traceback": traceback.format_exc()[-3000:]}
        if device == "cuda":
            torch.cuda.empty_cache()
        (args.out / "cuda_bench.json").write_text(json.dumps(report, indent=2, default=str))
        print(json.dumps({name: report["stages"][name]}, default=str)[:2000], flush=True)


if __name__ == "__main__":
    main()
