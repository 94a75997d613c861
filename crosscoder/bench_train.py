"""Training throughput: our sparse crosscoder against a plain dense PyTorch reference.

Both train a standard BatchTopK crosscoder on the same synthetic pairs with the same batches,
initialisation and learning rate; AuxK and k-annealing are off in both so that the comparison
is of the same computation. Peak memory is the CUDA allocator's peak on GPU, and the peak RSS of
a fresh subprocess per implementation on CPU.
"""

from __future__ import annotations

import multiprocessing
import resource
import time

import torch
from torch import Tensor, nn

from .config import CrosscoderConfig
from .model import Crosscoder
from .synthetic import make_world
from .train import estimate_norm_scales, training_step


class DenseReference(nn.Module):
    """The textbook dense formulation, written independently of ``Crosscoder``."""

    def __init__(self, model: Crosscoder):
        super().__init__()
        self.W_enc = nn.Parameter(torch.cat([model.W_enc_a, model.W_enc_b]).detach().clone())  # [d_a+d_b, D]
        self.b_enc = nn.Parameter(model.b_enc_D.detach().clone())
        self.W_dec_a = nn.Parameter(model.W_dec_a.detach().clone())
        self.W_dec_b = nn.Parameter(model.W_dec_b.detach().clone())
        self.b_dec_a = nn.Parameter(model.b_dec_A.detach().clone())
        self.b_dec_b = nn.Parameter(model.b_dec_B.detach().clone())

    def loss(self, x_a: Tensor, x_b: Tensor, k: int) -> tuple[Tensor, dict]:
        n = x_a.shape[0]
        f = torch.relu(torch.cat([x_a, x_b], dim=1) @ self.W_enc + self.b_enc)
        weight = (self.W_dec_a.norm(dim=1) + self.W_dec_b.norm(dim=1)).detach()
        scores = (f * weight).detach().flatten()
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, n * k).indices] = True
        f = f * keep.view(n, -1)
        err_a = x_a - (f @ self.W_dec_a + self.b_dec_a)
        err_b = x_b - (f @ self.W_dec_b + self.b_dec_b)
        sq_a, sq_b = err_a.pow(2).sum(), err_b.pow(2).sum()
        with torch.no_grad():
            fve_a = 1 - sq_a / (x_a - x_a.mean(0)).pow(2).sum()
            fve_b = 1 - sq_b / (x_b - x_b.mean(0)).pow(2).sum()
        return (sq_a + sq_b) / n, {"fve_a": float(fve_a), "fve_b": float(fve_b)}


def _train_one(kind: str, settings: dict) -> dict:
    device = torch.device(settings["device"])
    dtype = getattr(torch, settings["dtype"])
    torch.manual_seed(0)
    world = make_world(settings["d_a"], settings["d_b"], n_shared=settings["concepts"], n_a=settings["concepts"] // 10,
                       n_b=settings["concepts"] // 10, freq_range=(0.002, 0.05), seed=0)
    generator = torch.Generator().manual_seed(1)
    n = settings["batch_size"] * 16
    x_a, x_b = world.sample(n, generator)
    config = CrosscoderConfig(
        architecture="batchtopk", d_a=settings["d_a"], d_b=settings["d_b"], dict_size=settings["dict_size"],
        k=settings["k"], aux_alpha=0.0, outlier_factor=None, k_start=settings["k"], k_anneal_steps=0,
    )
    scale_a, scale_b = estimate_norm_scales(x_a, x_b, config)
    x_a, x_b = (x_a * scale_a).to(device, dtype), (x_b * scale_b).to(device, dtype)
    ours = Crosscoder(config)
    with torch.no_grad():
        ours.b_dec_A.copy_(x_a.float().mean(0).cpu())
        ours.b_dec_B.copy_(x_b.float().mean(0).cpu())
    module = (DenseReference(ours) if kind == "dense" else ours).to(device, dtype)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr_value())
    batch = settings["batch_size"]

    def step(i: int) -> dict:
        start = (i * batch) % n
        xa, xb = x_a[start : start + batch], x_b[start : start + batch]
        if kind == "dense":
            loss, stats = module.loss(xa, xb, config.k)
        else:
            loss, stats, _, _ = training_step(module, xa, xb, config.k, None, dense=kind == "ours-dense")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return stats

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(settings["warmup"]):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fve = []
    for i in range(settings["steps"]):
        stats = step(settings["warmup"] + i)
        fve.append((stats["fve_a"] + stats["fve_b"]) / 2)
    sync()
    elapsed = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    tail = fve[-max(1, len(fve) // 10) :]
    return {
        "implementation": kind,
        "pairs_per_s": settings["steps"] * batch / elapsed,
        "step_ms": 1000 * elapsed / settings["steps"],
        "peak_memory_mib": round(peak, 1),
        "final_fve": sum(tail) / len(tail),
    }


def run_train_benchmark(
    d_a: int = 256, d_b: int = 384, dict_size: int = 8192, k: int = 32, batch_size: int = 1024,
    steps: int = 100, warmup: int = 5, concepts: int = 2000, device: str = "cpu", dtype: str = "float32",
) -> dict:
    """Time the reference and our trainer (sparse and dense kernels) on identical data.

    Rows: ``dense`` (the reference below), ``sparse`` (ours, sparse kernels), ``ours-dense`` (ours
    with plain matmul kernels, what ``kernels="auto"`` picks on GPUs).
    """
    settings = dict(d_a=d_a, d_b=d_b, dict_size=dict_size, k=k, batch_size=batch_size, steps=steps,
                    warmup=warmup, concepts=concepts, device=device, dtype=dtype)
    rows = []
    for kind in ("dense", "sparse", "ours-dense"):
        if device == "cpu":
            # A fresh process per implementation, so peak RSS belongs to that implementation.
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                rows.append(pool.apply(_train_one, (kind, settings)))
        else:
            rows.append(_train_one(kind, settings))
    dense, sparse, ours_dense = rows
    return {
        "settings": settings,
        "torch_threads": torch.get_num_threads(),
        "results": rows,
        "speedup": sparse["pairs_per_s"] / dense["pairs_per_s"],
        "speedup_ours_dense_kernels": ours_dense["pairs_per_s"] / dense["pairs_per_s"],
        "fve_gap": sparse["final_fve"] - dense["final_fve"],
    }


def run_store_train_benchmark(store_folder: str, dict_size: int, k: int, batch_size: int, steps: int,
                              device: str = "cpu", dtype: str = "float32", warmup: int = 10,
                              profile_steps: int = 0) -> dict:
    """The shipping trainer fed by an activation store: what ``audit run`` trains at.

    DFC with 5 % exclusive features, AuxK and outlier masking on, batches read from the store's
    memory-mapped shards. Rates exclude the first ``warmup`` steps (allocation, kernel tuning).
    ``profile_steps``: also profile that many steps after the warm-up (top operators by device time).
    """
    from .store import ActivationStore
    from .train import train_crosscoder

    store = ActivationStore(store_folder)
    # The reader alone: how fast batches come off the memory-mapped shards (page cache warm).
    reader = store.batches(batch_size, epochs=None, dtype=getattr(torch, dtype))
    next(reader)
    started = time.perf_counter()
    for _ in range(20):
        next(reader)
    reader_pairs_per_s = 20 * batch_size / (time.perf_counter() - started)
    config = CrosscoderConfig(architecture="dfc", d_a=store.d_a, d_b=store.d_b, dict_size=dict_size, k=k,
                              exclusive_fraction=0.05)
    torch_device = torch.device(device)
    times: list[float] = []

    profiler = None
    if profile_steps:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch_device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities, schedule=torch.profiler.schedule(
            wait=warmup, warmup=2, active=profile_steps, repeat=1))
        profiler.start()

    def on_step(step: int, stats: dict) -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        if profiler is not None:
            profiler.step()

    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = train_crosscoder(config, store, steps=steps, batch_size=batch_size, device=device,
                             dtype=getattr(torch, dtype), callback=on_step)
    table = None
    if profiler is not None:
        profiler.stop()
        sort = "self_device_time_total" if torch_device.type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
    timed = times[warmup:]
    elapsed = timed[-1] - timed[0]
    final = model.training_metrics["final"]
    return {
        "store_pairs": store.n_pairs, "d_a": store.d_a, "d_b": store.d_b, "dict_size": dict_size, "k": k,
        "batch_size": batch_size, "steps": steps, "dtype": dtype, "reader_pairs_per_s": reader_pairs_per_s,
        "pairs_per_s": (len(timed) - 1) * batch_size / elapsed, "step_ms": 1000 * elapsed / (len(timed) - 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch_device.type == "cuda" else None,
        "final_fve_a": final["fve_a"], "final_fve_b": final["fve_b"], "final_l0": final["l0"],
        "dead_fraction": model.training_metrics["dead_fraction"], "profile": table,
    }
