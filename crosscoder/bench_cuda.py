"""One prepared GPU run: training and harvest throughput at realistic sizes, bf16.

    python -m crosscoder.bench_cuda --out DIR [--quick]

Writes ``DIR/cuda_bench.json`` after every stage, so a run cut short still leaves its figures.
Stages: harvest with the paper's model geometry (random weights, real tokenizers) into a store;
the shipping trainer on that store at D = 32,768 and 131,072 (k = 200, batch 2,048); and the
trainer's step against a dense reference at D = 32,768.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path

import torch

from .bench_harvest import run_harvest_benchmark
from .bench_train import run_store_train_benchmark, run_train_benchmark


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
    store = args.out / "store"  # the harvest's pairs, then the trainer's data (deleted at the end)
    if args.quick:
        stages = {
            "harvest_small": lambda: run_harvest_benchmark("small", device, "bfloat16", max_tokens=3000,
                                                           context_length=128, keep_store=store),
            "train_store_small": lambda: run_store_train_benchmark(str(store), dict_size=2048, k=16, batch_size=256,
                                                                   steps=30, device=device, dtype="bfloat16",
                                                                   profile_steps=3),
            "train_vs_dense": lambda: run_train_benchmark(d_a=64, d_b=96, dict_size=1024, k=8, batch_size=256,
                                                          steps=5, warmup=1, concepts=200, device=device,
                                                          dtype="bfloat16"),
        }
    else:
        stages = {
            # Llama-3.1-8B L16 vs Qwen3-8B L14 geometry, real tokenizers, bf16, context 1,024.
            "harvest_paper_geometry": lambda: run_harvest_benchmark(
                "paper", device, "bfloat16", max_tokens=150_000, context_length=1024, batch_docs=16,
                keep_store=store),
            # The shipping trainer on those pairs (memory-mapped store reader, DFC, AuxK, masking).
            "train_store_D32k": lambda: run_store_train_benchmark(
                str(store), dict_size=32768, k=200, batch_size=2048, steps=150, device=device, dtype="bfloat16"),
            "profile_store_D32k": lambda: run_store_train_benchmark(
                str(store), dict_size=32768, k=200, batch_size=2048, steps=60, device=device, dtype="bfloat16",
                warmup=40, profile_steps=5),
            "train_store_D131k": lambda: run_store_train_benchmark(
                str(store), dict_size=131072, k=200, batch_size=2048, steps=60, device=device, dtype="bfloat16"),
            # The same computation against a plain dense PyTorch reference, on in-memory data.
            "train_vs_dense_D32k": lambda: run_train_benchmark(
                d_a=4096, d_b=4096, dict_size=32768, k=200, batch_size=2048, steps=20, warmup=3,
                concepts=4000, device=device, dtype="bfloat16"),
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
    shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
