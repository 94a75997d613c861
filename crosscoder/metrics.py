"""Measuring a trained crosscoder (METHOD §5): FVE, L0, dead features, exclusivity, seed stability."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import Crosscoder


@dataclass
class Evaluation:
    """Held-out measurements. Per-feature tensors are ``[D]``."""

    fve_a: float
    fve_b: float
    mean_l0: float
    dead_fraction: float  # features that never fired on the evaluation pairs
    firing_frequency: Tensor  # share of pairs on which each feature fired
    max_activation: Tensor  # s_max: largest activation seen per feature
    relative_norm: Tensor
    r2_a: Tensor  # share of model A's activation variance a feature's activation explains
    r2_b: Tensor
    n_pairs: int

    def summary(self) -> dict:
        return {
            "fve_a": round(self.fve_a, 5),
            "fve_b": round(self.fve_b, 5),
            "mean_l0": round(self.mean_l0, 3),
            "dead_fraction": round(self.dead_fraction, 5),
            "n_pairs": self.n_pairs,
        }

    def exclusivity(self) -> Tensor:
        """Cross-architecture exclusivity check ``[D]``: variance explained in the *other* model
        divided by that in the feature's own model (near 0: truly exclusive; near 1: shared).

        A feature's own model is the one its decoder favours (relative norm ≥ 0.5 → A).
        """
        own_is_a = self.relative_norm >= 0.5
        own = torch.where(own_is_a, self.r2_a, self.r2_b)
        other = torch.where(own_is_a, self.r2_b, self.r2_a)
        ratio = other / own.clamp_min(1e-12)
        return torch.where(own > 0, ratio, torch.full_like(ratio, float("nan")))


def variance_explained(f_nD: Tensor, y_nd: Tensor) -> Tensor:
    """Per feature, R² of the best free direction ``b_j`` fitted to ``y ≈ f_j · b_j`` (centred).

    Latent Scaling across architectures: the other model has no copy of a feature's decoder, so
    instead of fitting a scale of a known direction we fit the direction itself,
    ``b = Ỹᵀf̃ / |f̃|²``, and report ``|f̃|²|b|² / |Ỹ|²``. ``f [n, D]``, ``y [n, d]`` → ``[D]``.
    """
    f = f_nD - f_nD.mean(0)
    y = y_nd - y_nd.mean(0)
    cross_dD = y.T @ f  # [d, D]
    f_sq = f.pow(2).sum(0)
    explained = cross_dD.pow(2).sum(0) / f_sq.clamp_min(1e-12)
    total = y.pow(2).sum().clamp_min(1e-12)
    return torch.where(f_sq > 0, explained / total, torch.zeros_like(explained))


@torch.no_grad()
def evaluate(model: Crosscoder, x_a: Tensor, x_b: Tensor, batch_size: int = 4096) -> Evaluation:
    """Evaluate on held-out raw pairs ``x_a [n, d_a]``, ``x_b [n, d_b]`` with the inference threshold."""
    if x_a.shape[0] == 0:
        raise ValueError("evaluate: no pairs to evaluate on (x_a and x_b are empty)")
    D = model.config.dict_size
    device = model.W_enc_AD.device
    sq_err = torch.zeros(2, dtype=torch.float64)
    fired = torch.zeros(D, dtype=torch.float64)
    s_max = torch.zeros(D)
    l0_total = 0.0
    # Sums for R² without holding [n, D] in memory.
    sums = _MomentSums(D, model.config.d_a, model.config.d_b)
    for start in range(0, x_a.shape[0], batch_size):
        xa = x_a[start : start + batch_size].to(device, torch.float32)
        xb = x_b[start : start + batch_size].to(device, torch.float32)
        f = model.encode(xa, xb)
        ha, hb = model.decode(f)
        na, nb = model.normalise(xa, xb)
        sq_err[0] += float(((xa - ha) * model.norm_scales[0]).pow(2).sum())
        sq_err[1] += float(((xb - hb) * model.norm_scales[1]).pow(2).sum())
        active = f > 0
        fired += active.sum(0).double().cpu()
        l0_total += float(active.sum())
        s_max = torch.maximum(s_max, f.max(0).values.float().cpu())
        sums.add(f.float().cpu(), na.float().cpu(), nb.float().cpu())
    n = x_a.shape[0]
    var_a, var_b = sums.total_variance()
    r2_a, r2_b = sums.r2()
    return Evaluation(
        fve_a=float(1 - sq_err[0] / var_a),
        fve_b=float(1 - sq_err[1] / var_b),
        mean_l0=l0_total / max(n, 1),
        dead_fraction=float((fired == 0).double().mean()),
        firing_frequency=(fired / max(n, 1)).float(),
        max_activation=s_max,
        relative_norm=model.relative_norm().detach().cpu(),
        r2_a=r2_a,
        r2_b=r2_b,
        n_pairs=n,
    )


class _MomentSums:
    """Streaming first and second moments for FVE denominators and per-feature R²."""

    def __init__(self, D: int, d_a: int, d_b: int):
        self.n = 0
        self.f_sum = torch.zeros(D, dtype=torch.float64)
        self.f_sq = torch.zeros(D, dtype=torch.float64)
        self.y_sum = [torch.zeros(d_a, dtype=torch.float64), torch.zeros(d_b, dtype=torch.float64)]
        self.y_sq = [0.0, 0.0]
        self.cross = [torch.zeros(d_a, D, dtype=torch.float64), torch.zeros(d_b, D, dtype=torch.float64)]

    def add(self, f: Tensor, ya: Tensor, yb: Tensor) -> None:
        f64 = f.double()
        self.n += f.shape[0]
        self.f_sum += f64.sum(0)
        self.f_sq += f64.pow(2).sum(0)
        for side, y in enumerate((ya, yb)):
            y64 = y.double()
            self.y_sum[side] += y64.sum(0)
            self.y_sq[side] += float(y64.pow(2).sum())
            self.cross[side] += y64.T @ f64

    def total_variance(self) -> tuple[float, float]:
        """Σ|y − ȳ|² per model; NaN where there is no variance to explain (one pair, or identical
        rows: the difference of two large sums is then rounding noise, and FVE would be garbage)."""
        out = []
        for side in (0, 1):
            total = self.y_sq[side] - float(self.y_sum[side].pow(2).sum()) / self.n
            out.append(total if self.n > 1 and total > 1e-9 * max(self.y_sq[side], 1e-30) else float("nan"))
        return out[0], out[1]

    def r2(self) -> tuple[Tensor, Tensor]:
        f_var = self.f_sq - self.f_sum.pow(2) / self.n
        out = []
        for side in (0, 1):
            centred_cross = self.cross[side] - torch.outer(self.y_sum[side], self.f_sum) / self.n
            total = self.y_sq[side] - float(self.y_sum[side].pow(2).sum()) / self.n
            explained = centred_cross.pow(2).sum(0) / f_var.clamp_min(1e-12)
            r2 = torch.where(f_var > 1e-12, explained / max(total, 1e-12), torch.zeros_like(explained))
            out.append(r2.float())
        return out[0], out[1]


def match_features(dec_1: Tensor, dec_2: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of ``dec_1 [D1, d]``, the best cosine in ``dec_2 [D2, d]`` and its index."""
    a = dec_1 / dec_1.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = dec_2 / dec_2.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine, index = (a @ b.T).max(dim=1)
    return cosine, index


def seed_stability(models: list[Crosscoder], threshold: float = 0.9) -> dict:
    """How often each run's exclusive features recur in the other runs.

    A feature recurs in another run when that run has a feature exclusive to the same model whose
    decoder (in that model's space) has cosine ≥ ``threshold``. Returns per-run recurrence rates.
    """
    if len(models) < 2:
        raise ValueError("seed_stability needs at least two runs")
    per_run = []
    for i, model in enumerate(models):
        rates = {}
        for side in ("a", "b"):
            own = _exclusive_ids(model, side)
            if own.numel() == 0:
                rates[side] = None
                continue
            decoder = model.W_dec_a if side == "a" else model.W_dec_b
            recur = torch.ones(own.numel(), dtype=torch.bool)
            for j, other in enumerate(models):
                if j == i:
                    continue
                other_ids = _exclusive_ids(other, side)
                if other_ids.numel() == 0:
                    recur[:] = False
                    continue
                other_dec = other.W_dec_a if side == "a" else other.W_dec_b
                cosine, _ = match_features(decoder[own].detach(), other_dec[other_ids].detach())
                recur &= cosine >= threshold
            rates[side] = float(recur.float().mean())
        per_run.append(rates)
    return {"threshold": threshold, "per_run": per_run}


def classify_exclusive(model: Crosscoder, relative_norm_cut: float = 0.9) -> tuple[Tensor, Tensor]:
    """Boolean ``[D]`` masks of features classified A-exclusive and B-exclusive.

    DFC: by partition. Standard and DSF: by relative decoder norm (> cut: A, < 1 − cut: B).
    """
    D = model.config.dict_size
    if model.config.architecture == "dfc":
        is_a = torch.zeros(D, dtype=torch.bool)
        is_b = torch.zeros(D, dtype=torch.bool)
        is_a[model.index_a] = True
        is_b[model.index_b] = True
        return is_a, is_b
    r = model.relative_norm().detach().cpu()
    return r > relative_norm_cut, r < 1 - relative_norm_cut


def _exclusive_ids(model: Crosscoder, side: str) -> Tensor:
    is_a, is_b = classify_exclusive(model)
    return torch.nonzero(is_a if side == "a" else is_b).squeeze(1)
