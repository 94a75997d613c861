"""Seed stability (METHOD §5): do a dictionary's exclusive features recur when it is trained again
with another seed?

Two crosscoders trained on the same activations differ by their random initialisation and batch
order. A feature is the same in both when their decoder directions in the same model's space point
the same way. For an audit, the question is sharper than "does it recur": a direction that one
dictionary files as exclusive to model A may be filed under the shared partition by another, and
then its exclusivity is a draw of training, not a property of the models.
"""

from __future__ import annotations

import torch

from .metrics import classify_exclusive
from .model import Crosscoder

#: The verdict for one exclusive feature in one other dictionary.
RECURS_EXCLUSIVE = "exclusive"  # a feature exclusive to the same model points the same way
RECURS_SHARED = "shared"  # no exclusive one does, but a shared feature does
RECURS_OTHER_SIDE = "other-exclusive"  # only a feature exclusive to the other model does (not in a DFC)
ABSENT = "absent"  # nothing in that dictionary points the same way


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    matrix = matrix.detach().float().cpu()
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _partition_names(model: Crosscoder, relative_norm_cut: float) -> list[str]:
    """Each feature's partition in ``model``: "a", "b" or "shared" (by relative norm when not a DFC)."""
    is_a, is_b = classify_exclusive(model, relative_norm_cut)
    return ["a" if a else "b" if b else "shared" for a, b in zip(is_a.tolist(), is_b.tolist(), strict=True)]


def feature_recurrence(main: Crosscoder, features: dict[str, list[int]], others: dict[int, Crosscoder],
                       threshold: float = 0.9, relative_norm_cut: float = 0.9) -> list[dict]:
    """For each feature of ``main`` listed in ``features`` (``{"a": [...], "b": [...]}``, the flagged
    exclusive features) and each dictionary of ``others`` (``{seed: crosscoder}``), where its decoder
    direction in its own model's space reappears: the closest feature of that dictionary exclusive
    to the same model and the closest feature of any partition, with their cosines, and a verdict
    (:data:`RECURS_EXCLUSIVE`, :data:`RECURS_SHARED`, :data:`RECURS_OTHER_SIDE` or :data:`ABSENT`) at cosine ``threshold``.
    One row per feature and other dictionary."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    rows = []
    for seed, other in others.items():
        if (other.config.d_a, other.config.d_b) != (main.config.d_a, main.config.d_b):
            raise ValueError(f"the dictionary of seed {seed} reads models of widths {other.config.d_a}/"
                             f"{other.config.d_b}, the main one {main.config.d_a}/{main.config.d_b}")
        partitions = _partition_names(other, relative_norm_cut)
        for side, ids in features.items():
            if not ids:
                continue
            own = _unit_rows((main.W_dec_a if side == "a" else main.W_dec_b)[ids])
            theirs = _unit_rows(other.W_dec_a if side == "a" else other.W_dec_b)
            cosine = own @ theirs.T  # [features, other's dictionary]
            same_side = torch.tensor([p == side for p in partitions])
            nearest_cos, nearest = cosine.max(dim=1)
            if same_side.any():
                exclusive_cos, exclusive_pos = cosine[:, same_side].max(dim=1)
                exclusive_ids = same_side.nonzero().squeeze(1)[exclusive_pos]
            else:  # that dictionary has no feature exclusive to this model
                exclusive_cos = torch.full((len(ids),), float("nan"))
                exclusive_ids = torch.full((len(ids),), -1)
            for row, feature in enumerate(ids):
                excl_cos = float(exclusive_cos[row])
                near_cos = float(nearest_cos[row])
                # a zero decoder row (or one opposite to everything) has no closest feature to speak of
                near_id = int(nearest[row]) if near_cos > 0 else None
                if excl_cos >= threshold:
                    verdict = RECURS_EXCLUSIVE
                elif near_cos >= threshold:
                    verdict = RECURS_SHARED if partitions[near_id] == "shared" else RECURS_OTHER_SIDE
                else:
                    verdict = ABSENT
                rows.append({
                    "feature": int(feature), "own_model": side, "seed": int(seed),
                    "exclusive_feature": int(exclusive_ids[row]) if excl_cos > 0 else None,
                    "exclusive_cosine": excl_cos if excl_cos == excl_cos else None,
                    "nearest_feature": near_id, "nearest_cosine": near_cos,
                    "nearest_partition": partitions[near_id] if near_id is not None else None, "status": verdict,
                })
    return rows


def recurs_in_every(statuses: list[str], n_seeds: int) -> bool:
    """Whether a feature's verdicts (one per other dictionary) say it recurs as exclusive in all
    ``n_seeds`` of them."""
    return statuses.count(RECURS_EXCLUSIVE) == n_seeds


def recurrence_summary(rows: list[dict], seeds: list[int]) -> dict[str, dict]:
    """Per model side, how many of its exclusive features recur as exclusive in every other
    dictionary, in at least one, and how many reappear only under another partition somewhere."""
    by_feature: dict[tuple[str, int], list[str]] = {}
    for row in rows:
        by_feature.setdefault((row["own_model"], row["feature"]), []).append(row["status"])
    out = {}
    for side in ("a", "b"):
        verdicts = [v for (s, _), v in by_feature.items() if s == side]
        out[side] = {
            "features": len(verdicts),
            "exclusive_in_all": sum(recurs_in_every(v, len(seeds)) for v in verdicts),
            "exclusive_in_any": sum(RECURS_EXCLUSIVE in v for v in verdicts),
            "shared_somewhere": sum(RECURS_SHARED in v or RECURS_OTHER_SIDE in v for v in verdicts),
            "absent_everywhere": sum(all(x == ABSENT for x in v) for v in verdicts),
        }
    return out
