"""Crosscoder settings: one validated object that fully describes a dictionary's shape and training."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Seeds reach torch and numpy generators, which take 64-bit values: a seed is below this.
SEED_LIMIT = 2**63

Architecture = Literal["batchtopk", "dfc", "dsf"]


class CrosscoderConfig(BaseModel):
    """Shape, partition and training hyper-parameters of a two-model crosscoder.

    Sizes: ``d_a``/``d_b`` are the two models' residual widths, ``dict_size`` is D, ``k`` the mean
    number of active features per pair. Values left as ``None`` are resolved by
    :meth:`resolved` from the run length (see METHOD §4 for the paper's values).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Architecture = "dfc"
    d_a: int = Field(gt=0)
    d_b: int = Field(gt=0)
    dict_size: int = Field(gt=1)
    k: int = Field(gt=0)
    # DFC: fraction of D given to *each* exclusive partition (paper: 0.01 or 0.05).
    exclusive_fraction: float = 0.05
    # DSF: fraction of D designated shared, and the cost ratio of those features' selection
    # score (their score is divided by this ratio, so they are cheaper to activate).
    shared_fraction: float = 0.125
    shared_cost_ratio: float = 0.15

    # DFC: "residual" starts exclusive features on activation directions the other model cannot
    # linearly predict (see Crosscoder.init_exclusive_from_residuals); "random" as the paper.
    exclusive_init: Literal["random", "residual"] = "residual"
    seed: int = 0
    lr: float | None = None  # None: 2e-4 / sqrt(D / 2**14)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int | None = None  # linear lr warm-up; None: min(1000, steps // 20)

    aux_k: int | None = None  # None: half the mean input width, at most 512 and D // 2
    aux_alpha: float = 1 / 32
    dead_after_pairs: int | None = None  # None: min(10M, a fifth of the pairs seen in training)

    k_start: int | None = None  # None: min(1000, D // 4), never below k
    k_anneal_steps: int | None = None  # None: min(5000, steps // 10)

    threshold_beta: float = 0.999
    # Mean-L0 outlier masking: a pair is left out of the loss when either vector's norm is
    # above this multiple of the batch median. None disables it.
    outlier_factor: float | None = 2.0
    # Per-model scalars that bring raw activations to median norm sqrt((d_a + d_b) / 2).
    # None: estimated from the training data before the first step.
    norm_scale_a: float | None = None
    norm_scale_b: float | None = None

    @model_validator(mode="after")
    def _check(self) -> CrosscoderConfig:
        if self.k >= self.dict_size:
            raise ValueError(f"k={self.k} must be smaller than dict_size={self.dict_size}")
        if not 0.0 <= self.exclusive_fraction < 0.5:
            raise ValueError(
                f"exclusive_fraction={self.exclusive_fraction} must lie in [0, 0.5): "
                "it is the share of the dictionary given to each model's exclusive partition"
            )
        if self.architecture == "dfc" and self.exclusive_fraction > 0 and self.n_exclusive < 1:
            raise ValueError(
                f"exclusive_fraction={self.exclusive_fraction} of dict_size={self.dict_size} "
                "leaves no exclusive feature; raise one of them"
            )
        if not 0.0 < self.shared_fraction <= 1.0:
            raise ValueError(f"shared_fraction={self.shared_fraction} must lie in (0, 1]")
        if not 0.0 < self.shared_cost_ratio <= 1.0:
            raise ValueError(f"shared_cost_ratio={self.shared_cost_ratio} must lie in (0, 1]")
        if not 0.0 < self.threshold_beta < 1.0:
            raise ValueError(f"threshold_beta={self.threshold_beta} must lie in (0, 1)")
        for name in ("norm_scale_a", "norm_scale_b", "lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} must be a positive finite number")
        if self.outlier_factor is not None and not (math.isfinite(self.outlier_factor) and self.outlier_factor > 1.0):
            raise ValueError(f"outlier_factor={self.outlier_factor} must be a finite number > 1 (or null to disable)")
        if not (math.isfinite(self.aux_alpha) and self.aux_alpha >= 0):
            raise ValueError(f"aux_alpha={self.aux_alpha} must be a finite number ≥ 0 (0 turns AuxK off)")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip={self.grad_clip} must be a positive finite number")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas={self.adam_betas} must both lie in [0, 1)")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed={self.seed} must lie in [0, 2**63)")
        return self

    # ---- partition layout -------------------------------------------------------------------
    # Features are laid out as [A-exclusive | shared | B-exclusive]. Model A's encoder and decoder
    # only span the first two blocks and model B's only the last two, so exclusivity is structural.

    @property
    def n_exclusive(self) -> int:
        if self.architecture != "dfc":
            return 0
        return int(round(self.exclusive_fraction * self.dict_size))

    @property
    def n_a_only(self) -> int:
        return self.n_exclusive

    @property
    def n_b_only(self) -> int:
        return self.n_exclusive

    @property
    def n_shared(self) -> int:
        return self.dict_size - self.n_a_only - self.n_b_only

    @property
    def n_designated_shared(self) -> int:
        """DSF: the first this-many features of the dictionary get the reduced cost."""
        if self.architecture != "dsf":
            return 0
        return max(1, int(round(self.shared_fraction * self.dict_size)))

    def resolved(self, steps: int, batch_size: int) -> CrosscoderConfig:
        """Fill every ``None`` schedule setting from the run length; explicit values are kept."""
        updates: dict[str, object] = {}
        if self.lr is None:
            updates["lr"] = 2e-4 / math.sqrt(self.dict_size / 2**14)
        if self.warmup_steps is None:
            updates["warmup_steps"] = min(1000, steps // 20)
        if self.aux_k is None:
            updates["aux_k"] = max(1, min(512, (self.d_a + self.d_b) // 4, self.dict_size // 2))
        if self.dead_after_pairs is None:
            updates["dead_after_pairs"] = max(batch_size, min(10_000_000, steps * batch_size // 5))
        if self.k_start is None:
            updates["k_start"] = max(self.k, min(1000, self.dict_size // 4))
        if self.k_anneal_steps is None:
            updates["k_anneal_steps"] = min(5000, steps // 10)
        return self.model_copy(update=updates)

    def lr_value(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.dict_size / 2**14)
