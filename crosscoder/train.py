"""Training loop: BatchTopK with k-annealing, AuxK revival, outlier masking, resumable checkpoints.

Loss (per step, over the pairs that survive outlier masking)::

    L = mean_i ( |x_A,i - x̂_A,i|² + |x_B,i - x̂_B,i|² ) + aux_alpha · L_aux

Squared error summed over dimensions, as in METHOD §4: it is what FVE measures, so the optimiser
and the headline metric agree. ``L_aux`` is the AuxK error of reconstructing the residual from the
top ``aux_k`` dead features, divided by the residual's total variance so its scale does not depend
on the data; it is dropped for a step where it is not finite.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import storage
from .config import CrosscoderConfig
from .distributed import DistContext, all_gather_cat, all_gather_objects, all_min, all_sum, barrier
from .distributed import current as current_context
from .model import Crosscoder, check_pair_batch, check_url, write_json_atomic
from .sparse import SelectedEntries, row_topk

PairBatch = tuple[Tensor, Tensor]
StepCallback = Callable[[int, dict], None]


class TrainingDivergedError(RuntimeError):
    """The main loss became NaN or infinite; the last checkpoint is left untouched."""


@dataclass
class TrainerState:
    """Everything beyond the weights that a resumed run needs to continue identically."""

    step: int = 0
    pairs_seen: int = 0
    pairs_since_fired: Tensor | None = None  # [D] int64, for dead-feature detection
    threshold_ema: float = 0.0  # un-corrected EMA of the smallest kept score
    threshold_updates: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)


def median_norm_scale(x_nd: Tensor, target: float) -> float:
    """Scalar that brings the median L2 norm of rows of ``x`` to ``target``."""
    median = float(x_nd.float().norm(dim=1).median())
    if not math.isfinite(median) or median <= 0:
        raise ValueError("cannot normalise: the median activation norm is zero or not finite")
    return target / median


def estimate_norm_scales(x_a: Tensor, x_b: Tensor, config: CrosscoderConfig) -> tuple[float, float]:
    """METHOD §3: both models scaled so their median norm is ``sqrt((d_a + d_b) / 2)``."""
    target = math.sqrt((config.d_a + config.d_b) / 2)
    return median_norm_scale(x_a, target), median_norm_scale(x_b, target)


# ---- data sources ---------------------------------------------------------------------------------


class _TensorBatches:
    """Deterministic minibatches from in-memory tensors: the batch of step t depends only on t."""

    def __init__(self, x_a: Tensor, x_b: Tensor, batch_size: int, seed: int, sync: DistContext | None = None):
        sync = sync or DistContext()
        self.x_a, self.x_b = x_a, x_b
        self.n = x_a.shape[0]
        self.batch_size = min(batch_size, self.n)
        self.seed = seed
        self.batches_per_epoch = self.n // self.batch_size
        self._epoch, self._perm = -1, None
        self._local = self.batch_size // sync.world_size  # distributed: this rank's rows of each batch
        self._offset = sync.rank * self._local

    def batch(self, step: int) -> PairBatch:
        epoch, within = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=generator)
            self._epoch = epoch
        index = self._perm[within * self.batch_size : (within + 1) * self.batch_size]
        index = index[self._offset : self._offset + self._local]
        return self.x_a[index], self.x_b[index]


class _IteratorBatches:
    """Batches from any iterator; a resumed run skips the batches already consumed."""

    def __init__(self, batches: Iterable[PairBatch], start_step: int):
        self._iterator: Iterator[PairBatch] = iter(batches)
        self._next_step = 0
        self._peeked: list[PairBatch] = []
        while self._next_step < start_step:
            self._pull()
            self._next_step += 1

    def _pull(self) -> PairBatch:
        if self._peeked:
            return self._peeked.pop(0)
        try:
            return next(self._iterator)
        except StopIteration:
            raise StopIteration from None

    def peek(self, n_pairs: int) -> list[PairBatch]:
        """Look ahead at batches totalling at least ``n_pairs`` (they are still served later)."""
        seen = sum(b[0].shape[0] for b in self._peeked)
        while seen < n_pairs:
            try:
                batch = next(self._iterator)
            except StopIteration:
                break
            self._peeked.append(batch)
            seen += batch[0].shape[0]
        return list(self._peeked)

    def batch(self, step: int) -> PairBatch | None:
        try:
            return self._pull()
        except StopIteration:
            return None


class _Prefetch:
    """Reads the next batches on a background thread while the current step runs.

    Reading a store batch (gathering rows from memory-mapped shards) costs about as much as a
    GPU training step at D = 32k; numpy and torch copies release the GIL, so the two overlap.
    Batches are pinned when training on CUDA, for asynchronous copies to the device.
    """

    _DONE = object()

    def __init__(self, batches: Iterable[PairBatch], depth: int = 4, pin: bool = False):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(batches), pin), daemon=True)
        self._thread.start()

    def _fill(self, batches: Iterator[PairBatch], pin: bool) -> None:
        try:
            for x_a, x_b in batches:
                if pin and x_a.device.type == "cpu":
                    x_a, x_b = x_a.pin_memory(), x_b.pin_memory()
                if not self._put((x_a, x_b)):
                    return
        except BaseException as exc:  # handed to the training thread, which raises it
            self._put(exc)
            return
        self._put(self._DONE)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[PairBatch]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---- checkpoints ----------------------------------------------------------------------------------

_STATE_DIR = re.compile(r"^state-(\d{8})$")


# The files of a state; trainer.json goes last: a remote state is complete once it is there.
_STATE_FILES = ("model.safetensors", "config.json", "trainer.safetensors", "trainer.json")


def _state_dirs(root: storage.Location) -> list[storage.Location]:
    """Complete states, oldest first."""
    if isinstance(root, str):
        # Object stores have no folder rename to publish a state at once: a state is complete
        # when its trainer.json, uploaded last, is there.
        names = [name for name in storage.list_names(root) if _STATE_DIR.match(name)]
        return [storage.child(root, name) for name in names if storage.is_file(storage.child(root, name, "trainer.json"))]
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STATE_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def _save_state(root: storage.Location, model: Crosscoder, optimizer: torch.optim.Optimizer, state: TrainerState,
                keep: int) -> storage.Location:
    """Write a resumable state folder atomically (build under a temp name, then rename; remote:
    build locally, then upload with trainer.json last)."""
    if isinstance(root, str):
        return _upload_state(root, model, optimizer, state, keep)
    final = root / f"state-{state.step:08d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _write_state(tmp, model, optimizer, state)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in _state_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _upload_state(root: str, model: Crosscoder, optimizer: torch.optim.Optimizer, state: TrainerState,
                  keep: int) -> str:
    final = storage.child(root, f"state-{state.step:08d}")
    _remove_state(final)  # what a killed run may have left of this step
    with tempfile.TemporaryDirectory(prefix="crosscoder-state-") as tmp:
        _write_state(Path(tmp), model, optimizer, state)
        for name in _STATE_FILES:
            storage.upload(Path(tmp) / name, storage.child(final, name))
    complete = _state_dirs(root)
    for old in complete[:-keep]:
        _remove_state(old)
    # States whose upload a kill cut short (no trainer.json) are never read; drop the older ones.
    newest = f"state-{state.step:08d}"
    for name in storage.list_names(root):
        if _STATE_DIR.match(name) and name < newest and storage.child(root, name) not in complete:
            _remove_state(storage.child(root, name))
    return final


def _remove_state(url: str) -> None:
    """trainer.json first, so that a state deleted halfway never looks complete."""
    storage.remove(storage.child(url, "trainer.json"))
    storage.remove(url, recursive=True)


def _write_state(folder: Path, model: Crosscoder, optimizer: torch.optim.Optimizer, state: TrainerState) -> None:
    model.save(folder)
    tensors: dict[str, Tensor] = {"pairs_since_fired": state.pairs_since_fired.cpu()}
    names = {id(p): name for name, p in model.named_parameters()}
    opt_steps = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            slot = optimizer.state.get(param, {})
            name = names[id(param)]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in slot:
                    tensors[f"adam.{name}.{key}"] = slot[key].detach().cpu().contiguous()
            if "step" in slot:
                opt_steps[name] = float(slot["step"])
    save_file(tensors, str(folder / "trainer.safetensors"))
    write_json_atomic(
        folder / "trainer.json",
        {
            "step": state.step,
            "pairs_seen": state.pairs_seen,
            "threshold_ema": state.threshold_ema,
            "threshold_updates": state.threshold_updates,
            "elapsed_s": state.elapsed_s,
            "history": state.history,
            "adam_steps": opt_steps,
        },
    )


def _load_state(folder: storage.Location, model: Crosscoder, optimizer: torch.optim.Optimizer) -> TrainerState:
    if isinstance(folder, str):
        # Read once on resume: a temporary copy, not the cache, which would keep every state read.
        with tempfile.TemporaryDirectory(prefix="crosscoder-state-") as tmp:
            for name in _STATE_FILES:
                storage.copy_to_local(storage.child(folder, name), Path(tmp) / name)
            return _load_state(Path(tmp), model, optimizer)
    saved = Crosscoder.load(folder, device=model.W_enc_AD.device)
    model.load_state_dict(saved.state_dict())
    tensors = load_file(str(folder / "trainer.safetensors"))
    meta = json.loads((folder / "trainer.json").read_text())
    device = model.W_enc_AD.device
    # where torch keeps Adam's step count: on the parameters' device for fused (or capturable) Adam, which
    # the trainer uses on CUDA, else on the CPU; float32 either way (as Optimizer.load_state_dict does)
    group = optimizer.param_groups[0]
    step_device = device if group.get("fused") or group.get("capturable") else torch.device("cpu")
    for name, param in model.named_parameters():
        if f"adam.{name}.exp_avg" in tensors:
            optimizer.state[param] = {
                "step": torch.tensor(float(meta["adam_steps"][name]), dtype=torch.float32, device=step_device),
                "exp_avg": tensors[f"adam.{name}.exp_avg"].to(device),
                "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].to(device),
            }
    return TrainerState(
        step=meta["step"],
        pairs_seen=meta["pairs_seen"],
        pairs_since_fired=tensors["pairs_since_fired"].to(device),
        threshold_ema=meta["threshold_ema"],
        threshold_updates=meta["threshold_updates"],
        elapsed_s=meta["elapsed_s"],
        history=meta["history"],
    )


def _settings_that_differ(a: CrosscoderConfig, b: CrosscoderConfig) -> list[str]:
    da, db = a.model_dump(), b.model_dump()
    return sorted(k for k in da if da[k] != db[k])


# ---- the step -------------------------------------------------------------------------------------


#: Pairs whose norm exceeds this multiple of the sample's median are left out of the initialisation.
INIT_OUTLIER_FACTOR = 100.0


def _check_finite(model: Crosscoder, when: str, error: type[Exception] = ValueError) -> None:
    """Refuse weights that hold NaN or infinite values (a finite loss does not rule them out: a NaN
    feature loses every BatchTopK selection and simply never fires)."""
    bad = model.nonfinite_parameters()
    if bad:
        raise error(f"the crosscoder's {', '.join(bad)} hold NaN or infinite values {when}")


def _saved_note(root, last_saved: int | None) -> str:
    if root is None:
        return ""
    if last_saved is None:
        return f" (no resumable state was saved in {root} yet)"
    return (f" (the newest resumable state in {root} is from step {last_saved}; resuming it with the same settings "
            "repeats the same steps)")


def k_at_step(config: CrosscoderConfig, step: int) -> int:
    """Linear k-annealing from ``k_start`` to ``k`` over ``k_anneal_steps``."""
    if not config.k_anneal_steps or step >= config.k_anneal_steps:
        return config.k
    frac = step / config.k_anneal_steps
    return int(round(config.k_start + (config.k - config.k_start) * frac))


def lr_at_step(config: CrosscoderConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last 20 % of steps."""
    lr = config.lr_value()
    if config.warmup_steps and step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    decay_start = int(total_steps * 0.8)
    if step >= decay_start and total_steps > decay_start:
        return lr * (total_steps - step) / (total_steps - decay_start)
    return lr


def outlier_mask(x_nA: Tensor, x_nB: Tensor, factor: float | None, sync: DistContext | None = None) -> Tensor:
    """Pairs to keep: neither vector's norm exceeds ``factor`` × its (global) batch median."""
    if factor is None:
        return torch.ones(x_nA.shape[0], dtype=torch.bool, device=x_nA.device)
    norm_a, norm_b = x_nA.norm(dim=1), x_nB.norm(dim=1)
    if sync is not None:
        median_a, median_b = all_gather_cat(norm_a, sync).median(), all_gather_cat(norm_b, sync).median()
    else:
        median_a, median_b = norm_a.median(), norm_b.median()
    return (norm_a <= factor * median_a) & (norm_b <= factor * median_b)


def _centred_sq_sum(x_nd: Tensor, sync: DistContext | None) -> Tensor:
    """``Σ_i |x_i − mean|²`` over the batch, or over the global batch when distributed."""
    if sync is None:
        return (x_nd - x_nd.mean(0)).pow(2).sum()
    x = x_nd.detach().double()
    packed = torch.cat([x.pow(2).sum().reshape(1), x.sum(0), x.new_tensor([x.shape[0]])])
    all_sum(packed, sync)
    total_sq, total, n = packed[0], packed[1:-1], packed[-1]
    return (total_sq - total.pow(2).sum() / n.clamp_min(1)).to(x_nd.dtype)


def training_step(
    model: Crosscoder,
    x_nA: Tensor,
    x_nB: Tensor,
    k: int,
    dead_D: Tensor | None,
    dense: bool = False,
    sync: DistContext | None = None,
) -> tuple[Tensor, dict, Tensor, float]:
    """Forward pass and loss on *normalised* inputs.

    Returns ``(loss, stats, fired_D, min_kept_score)``; ``fired_D`` marks features active in the batch.
    ``dense`` selects plain matmul kernels (see :func:`resolve_kernels`); the result is the same.
    With ``sync`` (see :mod:`crosscoder.distributed`) the inputs are this rank's rows of a global
    batch: selection, statistics, ``fired_D`` and ``min_kept_score`` are global, and ``loss`` is the
    tensor to back-propagate under DDP (this rank's share of the global loss × the world size,
    because DDP averages gradients); ``stats["loss"]`` is the global loss.
    """
    cfg = model.config
    sync = sync if sync is not None and sync.active else None
    keep = outlier_mask(x_nA, x_nB, cfg.outlier_factor, sync)
    if not bool(keep.all()):
        x_nA, x_nB = x_nA[keep], x_nB[keep]
    n = x_nA.shape[0]
    if sync is not None:
        n = int(all_sum(torch.tensor([n], dtype=torch.int64, device=x_nA.device), sync))

    codes = model.sparse_codes(x_nA, x_nB, k=k, dense=dense, sync=sync, global_rows=n)
    x_hat_a, x_hat_b = model.decode_sparse(codes.entries, codes.values, dense=dense)
    err_a, err_b = x_nA - x_hat_a, x_nB - x_hat_b
    sq_a, sq_b = err_a.pow(2).sum(), err_b.pow(2).sum()
    loss = (sq_a + sq_b) / max(n, 1)

    scores = codes.scores_nD[codes.entries.rows, codes.entries.cols]
    fired = torch.zeros(cfg.dict_size, dtype=torch.bool, device=x_nA.device)
    fired[codes.entries.cols] = True
    local_min = scores.min().double() if scores.numel() else x_nA.new_tensor(math.inf, dtype=torch.float64)
    if sync is not None:
        local_min = all_min(local_min.reshape(1), sync)[0]
        fired = all_sum(fired.to(torch.int32), sync) > 0

    aux_term, aux_value = None, x_nA.new_zeros((), dtype=torch.float64)
    n_dead = 0
    if dead_D is not None and cfg.aux_alpha > 0:
        dead_ids = torch.nonzero(dead_D).squeeze(1)
        n_dead = dead_ids.numel()
        if n_dead:
            aux_term, aux_value = _aux_loss(model, codes, x_nA, x_nB, err_a.detach(), err_b.detach(), dead_ids,
                                            dense, sync)

    with torch.no_grad():
        summed = torch.stack([sq_a.detach().double(), sq_b.detach().double(),
                              sq_a.new_tensor(codes.entries.rows.numel(), dtype=torch.float64),
                              (~keep).sum().double()])
        if sync is not None:
            all_sum(summed, sync)
        var_a, var_b = _centred_sq_sum(x_nA, sync), _centred_sq_sum(x_nB, sync)
        # One host synchronisation for every statistic of the step (each one stalls the GPU).
        values = torch.cat([summed, torch.stack([var_a.double(), var_b.double(), local_min, aux_value])]).tolist()
    total_sq_a, total_sq_b, entries, masked, var_a, var_b, min_kept, aux = values
    if aux_term is not None and math.isfinite(aux):
        loss = loss + cfg.aux_alpha * aux_term
    else:
        aux = 0.0  # a step whose AuxK loss is not finite keeps only the main loss
    stats = {
        "loss": (total_sq_a + total_sq_b) / max(n, 1) + cfg.aux_alpha * aux,
        "aux_loss": aux,
        "fve_a": 1 - total_sq_a / max(var_a, 1e-12),
        "fve_b": 1 - total_sq_b / max(var_b, 1e-12),
        "l0": entries / max(n, 1),
        "masked": int(masked),
        "dead": n_dead,
    }
    if sync is not None:
        loss = loss * sync.world_size
    return loss, stats, fired, min_kept if math.isfinite(min_kept) else float("nan")


def _aux_loss(model, codes, x_nA, x_nB, err_a, err_b, dead_ids, dense: bool = False,
              sync: DistContext | None = None) -> tuple[Tensor, Tensor]:
    """AuxK: reconstruct the residual from the top ``aux_k`` dead features (``dead_ids``) of each pair.

    Returns this rank's term of the loss (``Σ residual² / global residual variance``) and the
    global value (a float64 scalar tensor, left on the device); every rank makes the same
    collective calls whatever its own selection.
    """
    cfg = model.config
    # Only dead features compete: select among their columns (a few % of D once training is
    # under way) instead of masking all D, which made AuxK cost as much as the main pass.
    among_dead = row_topk(codes.scores_nD[:, dead_ids], min(cfg.aux_k, dead_ids.numel()))
    entries = SelectedEntries(among_dead.rows, dead_ids[among_dead.cols], among_dead.n)
    residual_var = _centred_sq_sum(err_a, sync) + _centred_sq_sum(err_b, sync)
    selected = entries.rows.numel()
    if sync is not None:
        selected = int(all_sum(torch.tensor([selected], dtype=torch.int64, device=x_nA.device), sync))
    if selected == 0:
        return torch.zeros((), device=x_nA.device), x_nA.new_zeros((), dtype=torch.float64)
    if entries.rows.numel():
        values = model.values_at(codes, entries, x_nA, x_nB)
        if dense:
            e_hat_a, e_hat_b = model.decode_features(dead_ids, among_dead.rows, among_dead.cols, values,
                                                       x_nA.shape[0])
        else:
            e_hat_a, e_hat_b = model.decode_sparse(entries, values, with_bias=False)
        residual_sq = (err_a - e_hat_a).pow(2).sum() + (err_b - e_hat_b).pow(2).sum()
    else:  # nothing selected on this rank: its residual is its whole error (no gradient)
        residual_sq = err_a.pow(2).sum() + err_b.pow(2).sum()
    term = residual_sq / residual_var.clamp_min(1e-12)
    value = term.detach().double().reshape(1)
    if sync is not None:
        all_sum(value, sync)
    return term, value[0]


def resolve_kernels(kernels: str, device: torch.device) -> bool:
    """True for dense kernels. "auto": sparse on CPU, where skipping the n·D·d matmuls of the
    decoder and the encoder backward pays (2× measured); dense on GPUs, where bf16 matmuls run at
    hundreds of TFLOP/s and scattered sparse work is the slower path (6.6× measured on an H200)."""
    if kernels not in ("auto", "sparse", "dense"):
        raise ValueError(f"kernels={kernels!r} must be 'auto', 'sparse' or 'dense'")
    if kernels == "auto":
        return torch.device(device).type != "cpu"
    return kernels == "dense"


def geometric_median(x_nd: Tensor, iterations: int = 20) -> Tensor:
    """Weiszfeld's algorithm: a robust centre for the decoder bias at initialisation."""
    centre = x_nd.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (x_nd - centre).norm(dim=1).clamp_min(1e-6)
        centre = (weights[:, None] * x_nd).sum(0) / weights.sum()
    return centre


# ---- public entry point ---------------------------------------------------------------------------


def train_crosscoder(
    config: CrosscoderConfig,
    data: PairBatch | Iterable[PairBatch],
    steps: int = 3000,
    batch_size: int = 256,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 2,
    norm_scales: tuple[float, float] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    callback: StepCallback | None = None,
    progress: bool = False,
    log_every: int = 50,
    kernels: str = "auto",
    template_weight: float = 1.0,
    sync: DistContext | None = None,
) -> Crosscoder:
    """Train a crosscoder on paired activations and return it (``eval()`` mode, on ``device``).

    ``data`` is ``(x_a [n, d_a], x_b [n, d_b])`` raw tensors, sampled in seeded epochs; an
    :class:`~crosscoder.store.ActivationStore` (streamed, shuffled, with the store's normalisation
    scalars); or any iterable of raw batches (one per step; training stops early if it runs out).
    With ``checkpoint_dir`` (a path or an fsspec URL such as ``s3://bucket/run``), a resumable
    state is written every ``checkpoint_every`` steps and the final model is saved there; calling
    again with the same settings resumes from the newest state, or returns the finished model
    without training.
    ``callback(step, stats)`` runs after each step (after any checkpoint of that step).
    ``kernels``: "sparse", "dense" or "auto" (see :func:`resolve_kernels`); results agree.
    ``template_weight`` (store data only): sampling weight of generation-prompt pairs against 1 for
    the others (see :meth:`ActivationStore.batches`); recorded in ``training_metrics``.

    Distributed (under ``torchrun``, once :func:`crosscoder.distributed.init_from_env` has joined
    the group; ``sync`` defaults to that group): ``batch_size`` is the *global* batch, split evenly
    over the ranks; each rank reads its own rows of every batch (tensors and stores; any other
    iterable must already yield this rank's rows), gradients are all-reduced by DDP and the
    BatchTopK selection, θ and the dead-feature counters are global, so N ranks take the same steps
    as one process with the same batch. Rank 0 writes the checkpoints; a run resumes on any
    number of ranks.
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be positive")
    sync = sync if sync is not None else current_context()
    if batch_size % sync.world_size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of ranks ({sync.world_size})")
    device = torch.device(device) if device is not None else torch.device("cpu")
    root = storage.locate(checkpoint_dir) if checkpoint_dir is not None else None
    if isinstance(root, str):
        check_url(root)

    states = _state_dirs(root) if root is not None else []
    resume_from = states[-1] if states else None
    start_step = 0
    skipped = 0  # batches a store iterator skips by itself on resume
    if resume_from is not None:
        start_step = json.loads(storage.read_text(storage.child(resume_from, "trainer.json")))["step"]
    seen = all_gather_objects(start_step, sync)
    if len(set(seen)) > 1:  # each rank would run a different number of steps and the job would hang
        raise ValueError(f"checkpoint_dir {root} is not the same folder on every rank (the ranks would resume "
                         f"from steps {seen}); use a folder all nodes share, or an fsspec URL")

    with contextlib.ExitStack() as cleanup:
        from .store import ActivationStore

        if isinstance(data, ActivationStore):
            if norm_scales is None:
                norm_scales = data.norm_scales
            data = data.batches(batch_size, seed=config.seed, epochs=None, template_weight=template_weight,
                                rank=sync.rank, world_size=sync.world_size, skip_batches=start_step, dtype=dtype)
            skipped = start_step
        elif template_weight != 1.0:
            raise ValueError("template_weight needs an ActivationStore (other data carry no template flags)")
        if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            x_a, x_b = data
            check_pair_batch(x_a, x_b, config.d_a, config.d_b, where="train_crosscoder data")
            source: _TensorBatches | _IteratorBatches = _TensorBatches(x_a, x_b, batch_size, config.seed, sync)
            sample = (x_a[:100_000], x_b[:100_000])
        else:
            prefetch = _Prefetch(data, pin=device.type == "cuda")
            cleanup.callback(prefetch.close)  # also when this call returns early or fails
            source = _IteratorBatches(prefetch, start_step - skipped)
            # Every rank looks at the same number of batches, and sees the whole of each.
            peeked = source.peek(math.ceil(8192 / sync.world_size))
            if not peeked:
                raise ValueError("train_crosscoder: the batch iterator yielded no data")
            sample = (torch.cat([all_gather_cat(b[0], sync) for b in peeked]),
                      torch.cat([all_gather_cat(b[1], sync) for b in peeked]))
            check_pair_batch(*sample, config.d_a, config.d_b, where="train_crosscoder data")

        if (norm_scales is None and resume_from is not None and isinstance(source, _IteratorBatches)
                and (config.norm_scale_a is None or config.norm_scale_b is None)):
            # an iterator resumes past the batches it already gave, so a fresh estimate would come from
            # other pairs: keep the scales the run started with
            started = json.loads(storage.read_text(storage.child(resume_from, "config.json")))["config"]
            if started.get("norm_scale_a") is not None and started.get("norm_scale_b") is not None:
                norm_scales = (started["norm_scale_a"], started["norm_scale_b"])
        if norm_scales is None and (config.norm_scale_a is None or config.norm_scale_b is None):
            norm_scales = estimate_norm_scales(*sample, config)
        if norm_scales is not None:
            config = config.model_copy(update={"norm_scale_a": norm_scales[0], "norm_scale_b": norm_scales[1]})
        config = config.resolved(steps, batch_size)

        if root is not None and storage.is_file(storage.child(root, "config.json")):
            finished = Crosscoder.load(root, device=device)
            if (finished.config == config and finished.training_metrics.get("steps") == steps
                    and finished.training_metrics.get("template_weight", 1.0) == template_weight):
                return finished.eval()
            if resume_from is None:  # nothing to resume: training here would overwrite that model
                differ = _settings_that_differ(finished.config, config) or ["steps or template_weight"]
                raise ValueError(f"{root} holds a finished crosscoder with different settings ({', '.join(differ)}); "
                                 "use another checkpoint_dir or delete it to train anew")

        model = Crosscoder(config).to(device=device, dtype=dtype)
        # Fused Adam on CUDA: one kernel per step instead of a dozen multi-tensor passes.
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr_value(), betas=config.adam_betas,
                                     fused=device.type == "cuda")
        state = TrainerState(pairs_since_fired=torch.zeros(config.dict_size, dtype=torch.long, device=device))

        if resume_from is not None:
            saved_config = CrosscoderConfig.model_validate(
                json.loads(storage.read_text(storage.child(resume_from, "config.json")))["config"])
            if saved_config != config:
                raise ValueError(
                    f"{root} holds a run with different settings ({', '.join(_settings_that_differ(saved_config, config))}); "
                    "use another checkpoint_dir or delete it to start over"
                )
            state = _load_state(resume_from, model, optimizer)
        else:
            with torch.no_grad():
                x0_a, x0_b = model.normalise(sample[0][:4096].to(device, dtype), sample[1][:4096].to(device, dtype))
                # Rows far beyond any activation's scale (a corrupt or exploded pair) would dominate the
                # median and the ridge solve, down to NaN directions. The high-norm pairs the loss masks
                # (above outlier_factor × the median) stay: masking them as well made the demo's exclusive
                # features more alike across seeds but less specific to its planted concepts.
                keep = outlier_mask(x0_a, x0_b, INIT_OUTLIER_FACTOR)
                if keep.any():
                    x0_a, x0_b = x0_a[keep], x0_b[keep]
                model.b_dec_A.copy_(geometric_median(x0_a))
                model.b_dec_B.copy_(geometric_median(x0_b))
                if config.exclusive_init == "residual":
                    model.init_exclusive_from_residuals(x0_a, x0_b)
            _check_finite(model, "after initialisation (check the activations for extreme values)")

        model.train()
        use_dense = resolve_kernels(kernels, device)
        step_fn: Callable = _Step(model)
        if sync.active:
            from torch.nn.parallel import DistributedDataParallel

            # DDP starts every rank from rank 0's weights and averages gradients in the backward pass.
            # θ (the only buffer) is updated identically on every rank: no need to sync it per step.
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})  # older torch
            step_fn = DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None,
                                              **no_buffer_sync)
        # θ is averaged once k has reached its target. Published runs (100k steps) start after ~1k
        # steps with β = 0.999; a short run starts after a quarter of its steps and shortens the EMA
        # window to a tenth of what remains, so that early, untrained batches do not dominate θ.
        threshold_from = max(config.k_anneal_steps or 0, config.warmup_steps or 0, min(1000, steps // 4))
        threshold_beta = min(config.threshold_beta, 1 - 10 / max(steps - threshold_from, 10))
        last_saved = state.step if resume_from is not None else None  # the newest state in checkpoint_dir
        bar = _progress_bar(progress and sync.is_main, steps, state.step)
        start_time = time.perf_counter() - state.elapsed_s
        last_stats: dict = {}
        try:
            while state.step < steps:
                batch = source.batch(state.step)
                if batch is None:  # iterator exhausted
                    break
                raw_a, raw_b = batch
                if isinstance(source, _IteratorBatches):
                    check_pair_batch(raw_a, raw_b, config.d_a, config.d_b, where=f"batch of step {state.step}")
                x_nA, x_nB = model.normalise(raw_a.to(device, dtype, non_blocking=True),
                                             raw_b.to(device, dtype, non_blocking=True))

                dead = state.pairs_since_fired >= config.dead_after_pairs
                k = k_at_step(config, state.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at_step(config, state.step, steps)

                loss, stats, fired, min_kept = step_fn(x_nA, x_nB, k, dead, use_dense, sync)
                if not math.isfinite(stats["loss"]):
                    raise TrainingDivergedError(
                        f"training loss became {stats['loss']} at step {state.step}{_saved_note(root, last_saved)}. "
                        "Lower lr, check the activations for extreme values, or keep outlier masking on "
                        "(with other settings, train into a new checkpoint_dir: a saved run of other settings "
                        "is refused)."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()

                global_rows = x_nA.shape[0] * sync.world_size
                with torch.no_grad():
                    state.pairs_since_fired += global_rows
                    state.pairs_since_fired.masked_fill_(fired, 0)
                    if state.step >= threshold_from and math.isfinite(min_kept):
                        beta = threshold_beta
                        state.threshold_ema = beta * state.threshold_ema + (1 - beta) * min_kept
                        state.threshold_updates += 1
                        # Bias-corrected EMA, so short runs get a usable θ too.
                        model.threshold.fill_(state.threshold_ema / (1 - beta**state.threshold_updates))
                state.step += 1
                state.pairs_seen += global_rows
                state.elapsed_s = time.perf_counter() - start_time
                stats |= {"k": k, "step": state.step}
                last_stats = stats
                if state.step % log_every == 0 or state.step == steps:
                    state.history.append({key: round(v, 6) if isinstance(v, float) else v for key, v in stats.items()})
                if root is not None and (state.step % checkpoint_every == 0) and state.step < steps:
                    _check_finite(model, f"at step {state.step}", TrainingDivergedError)
                    if sync.is_main:
                        _save_state(root, model, optimizer, state, keep_checkpoints)
                    last_saved = state.step
                    barrier(sync)
                if bar is not None:
                    bar.update(state.step, stats)
                if callback is not None:
                    callback(state.step, stats)
        finally:
            if bar is not None:
                bar.close()

        model.training_metrics = {
            "steps": state.step,
            "steps_requested": steps,
            "batch_size": batch_size,
            "template_weight": template_weight,
            "pairs_seen": state.pairs_seen,
            "elapsed_s": round(state.elapsed_s, 3),
            "final": last_stats,
            "dead_fraction": float((state.pairs_since_fired >= config.dead_after_pairs).float().mean()),
            "history": state.history,
        }
        model.eval()
        _check_finite(model, f"at the end of training (step {state.step})", TrainingDivergedError)
        if root is not None:
            if sync.is_main:
                model.save(root)
            barrier(sync)
        return model


class _Step(torch.nn.Module):
    """One training step as a module, so that DDP can wrap it (DDP hooks a module's forward)."""

    def __init__(self, model: Crosscoder):
        super().__init__()
        self.model = model

    def forward(self, x_nA: Tensor, x_nB: Tensor, k: int, dead_D: Tensor | None, dense: bool,
                sync: DistContext) -> tuple[Tensor, dict, Tensor, float]:
        return training_step(self.model, x_nA, x_nB, k, dead_D, dense=dense, sync=sync)


def _progress_bar(enabled: bool, total: int, start: int) -> _TrainProgress | None:
    return _TrainProgress(total, start) if enabled else None


class _TrainProgress:
    """A rich progress bar showing loss, FVE per model and L0."""

    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self._task = self._progress.add_task("train", total=total, completed=start, info="")
        self._progress.start()

    def update(self, step: int, stats: dict) -> None:
        info = f"loss {stats['loss']:.3g}  FVE {stats['fve_a']:.3f}/{stats['fve_b']:.3f}  L0 {stats['l0']:.1f}"
        self._progress.update(self._task, completed=step, info=info)

    def close(self) -> None:
        self._progress.stop()
