"""torch.distributed plumbing for harvesting and training under ``torchrun``.

A process joins the group that ``torchrun`` describes in its environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL when it trains on CUDA, gloo otherwise.
Without those variables everything here is a no-op for one process, so the same code runs
under ``python`` and under ``torchrun``.

What is local and what is global in a distributed training step (N ranks, global batch B,
``B/N`` rows on each rank):

- local: the rank's rows of the global batch, their pre-activations, selection scores,
  reconstructions and errors;
- global, identical on every rank: the BatchTopK selection (the ``B·k`` largest scores of the
  *whole* global batch, :func:`global_batch_topk`), the outlier-mask medians, the number of pairs
  the loss is averaged over, the AuxK variance, the gradients (DDP all-reduce), the dead-feature
  counters, the inference threshold θ, and the logged statistics.

So a run on N ranks with global batch B takes the same steps as one process with batch B, up to
the order of floating-point sums (see ``tests/crosscoder/test_distributed.py`` for the tolerance).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from .sparse import SelectedEntries, _top_flat_indices


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistContext:
    """The process group this process belongs to (one process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | torch.device | None = None, timeout_minutes: float = 60) -> DistContext:
    """Join torchrun's process group if this process was started by it; else one process.

    NCCL needs one GPU per rank: on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    if not launched_by_torchrun():
        return current()
    if not dist.is_initialized():
        on_cuda = device is not None and torch.device(device).type == "cuda"
        if on_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return current()


def shutdown() -> None:
    """Leave the process group cleanly (a process that exits with gloo threads alive may abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_device(device: str | torch.device | None, ctx: DistContext) -> torch.device | None:
    """``cuda`` becomes this rank's own GPU; other devices are left as they are."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and ctx.active:
        if device.index is not None and device.index != ctx.local_rank:
            raise ValueError(f"device {device} names one GPU, but each of the {ctx.world_size} ranks needs its own: "
                             "set compute.device to 'cuda'")
        return torch.device("cuda", ctx.local_rank)
    return device


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def _backend_device(tensor: Tensor) -> Tensor:
    """NCCL only moves CUDA tensors: a CPU tensor (a batch from the store) goes to this rank's GPU."""
    if tensor.device.type != "cuda" and dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def _all_reduce(tensor: Tensor, op) -> Tensor:
    moved = _backend_device(tensor)
    dist.all_reduce(moved, op=op)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_sum(tensor: Tensor, ctx: DistContext) -> Tensor:
    """Sum across ranks, in place (and returned)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM) if ctx.active else tensor


def all_min(tensor: Tensor, ctx: DistContext) -> Tensor:
    return _all_reduce(tensor, dist.ReduceOp.MIN) if ctx.active else tensor


def all_gather_cat(tensor: Tensor, ctx: DistContext) -> Tensor:
    """Concatenate along dim 0 in rank order, on ``tensor``'s device; every rank passes the same shape."""
    if not ctx.active:
        return tensor
    moved = _backend_device(tensor.contiguous())
    parts = [torch.empty_like(moved) for _ in range(ctx.world_size)]
    dist.all_gather(parts, moved)
    return torch.cat(parts).to(tensor.device)


def all_gather_objects(obj, ctx: DistContext) -> list:
    """Any picklable object from every rank, in rank order (small things only: statistics)."""
    if not ctx.active:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def global_batch_topk(scores_nD: Tensor, n_keep: int, ctx: DistContext,
                      cost_D: Tensor | None = None) -> SelectedEntries:
    """BatchTopK over the global batch: this rank's share of the ``n_keep`` best entries of all ranks.

    Each rank proposes its own best ``n_keep`` entries (the global best can all lie on one rank),
    every rank sees every proposal, and all ranks apply the same rule to the same list: entries
    in descending score order (ties in rank order) until ``n_keep`` entries, or with ``cost_D``
    (DSF) ``n_keep`` of budget, are used; zero scores are never kept. Same result as
    :func:`crosscoder.sparse.batch_topk` on the concatenated batch, ties aside.
    """
    n, width = scores_nD.shape
    proposals = n_keep if cost_D is None else int(math.ceil(n_keep / float(cost_D.min())))
    local = min(proposals, n * width)
    # A rank whose rows were all masked as outliers proposes nothing, but still joins the gather.
    flat = _top_flat_indices(scores_nD, local) if local else torch.zeros(0, dtype=torch.long, device=scores_nD.device)
    values = torch.zeros(proposals, dtype=torch.float32, device=scores_nD.device)
    values[:local] = scores_nD.reshape(-1)[flat].float()
    every_value = all_gather_cat(values, ctx)
    order = torch.sort(every_value, descending=True, stable=True).indices
    if cost_D is None:
        kept_in_order = torch.arange(order.numel(), device=order.device) < n_keep
    else:
        costs = torch.zeros(proposals, dtype=torch.float32, device=scores_nD.device)
        costs[:local] = cost_D[flat % width].float()
        spent = torch.cumsum(all_gather_cat(costs, ctx)[order], 0)
        kept_in_order = spent <= n_keep
    kept_in_order &= every_value[order] > 0
    kept = torch.zeros_like(kept_in_order)
    kept[order] = kept_in_order
    mine = kept[ctx.rank * proposals : ctx.rank * proposals + local]
    return SelectedEntries.from_flat(flat[mine], n, width)
