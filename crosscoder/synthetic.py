"""Ground-truth benchmark (METHOD §6): paired activations built from known concepts.

Each concept has a direction in model A's space, model B's space, or both. Concept activations
are sparse, non-negative and heavy-tailed in frequency; a shared concept fires with the same
strength in both models. A crosscoder *recovers* a concept when one of its features has decoder
cosine ≥ 0.9 with the concept's direction in that model's space; an exclusive concept only counts
when the recovering feature is classified exclusive to the right model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import CrosscoderConfig
from .metrics import Evaluation, classify_exclusive, evaluate
from .model import Crosscoder
from .train import train_crosscoder


@dataclass
class ToyWorld:
    """Known concepts: directions ``[C, d]`` per model (zero rows where a model lacks one)."""

    dirs_a: Tensor  # [C, d_a]
    dirs_b: Tensor  # [C, d_b]
    kind: list[str]  # "shared" | "a" | "b" per concept
    frequency: Tensor  # [C] firing probability
    noise: float

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` pairs ``(x_a [n, d_a], x_b [n, d_b])``."""
        fires = torch.rand(n, len(self.kind), generator=generator) < self.frequency
        magnitude = 0.5 + torch.empty(n, len(self.kind)).exponential_(1.0, generator=generator)
        z = fires * magnitude
        x_a = z @ self.dirs_a + self.noise * torch.randn(n, self.dirs_a.shape[1], generator=generator)
        x_b = z @ self.dirs_b + self.noise * torch.randn(n, self.dirs_b.shape[1], generator=generator)
        return x_a, x_b


def make_world(
    d_a: int = 48,
    d_b: int = 64,
    n_shared: int = 80,
    n_a: int = 10,
    n_b: int = 10,
    freq_range: tuple[float, float] = (0.005, 0.08),
    noise: float = 0.02,
    seed: int = 0,
) -> ToyWorld:
    """Random unit directions per concept; frequencies log-uniform over ``freq_range`` (heavy tail)."""
    generator = torch.Generator().manual_seed(seed)
    total = n_shared + n_a + n_b
    kind = ["shared"] * n_shared + ["a"] * n_a + ["b"] * n_b
    dirs_a = torch.randn(total, d_a, generator=generator)
    dirs_b = torch.randn(total, d_b, generator=generator)
    dirs_a /= dirs_a.norm(dim=1, keepdim=True)
    dirs_b /= dirs_b.norm(dim=1, keepdim=True)
    dirs_a[n_shared + n_a :] = 0  # B-only concepts have no A direction
    dirs_b[n_shared : n_shared + n_a] = 0  # A-only concepts have no B direction
    low, high = math.log(freq_range[0]), math.log(freq_range[1])
    frequency = torch.exp(low + (high - low) * torch.rand(total, generator=generator))
    return ToyWorld(dirs_a, dirs_b, kind, frequency, noise)


def score_recovery(
    model: Crosscoder,
    world: ToyWorld,
    evaluation: Evaluation,
    cosine_cut: float = 0.9,
    exclusivity_cut: float | None = None,
) -> dict:
    """Exclusive recall and false positives of one trained crosscoder against the known concepts.

    With ``exclusivity_cut``, a feature only stays classified exclusive when its exclusivity
    check (variance explained in the other model ÷ in its own) is below the cut.
    """
    is_a, is_b = classify_exclusive(model)
    alive = evaluation.firing_frequency > 0
    if exclusivity_cut is not None:
        ratio = evaluation.exclusivity()
        passes = torch.nan_to_num(ratio, nan=float("inf")) < exclusivity_cut
        is_a, is_b = is_a & passes, is_b & passes
    is_a, is_b = is_a & alive, is_b & alive

    dec_a = model.decoder_raw("a").detach().cpu()
    dec_b = model.decoder_raw("b").detach().cpu()
    cos_a = _cosine(dec_a, world.dirs_a)  # [D, C]
    cos_b = _cosine(dec_b, world.dirs_b)
    kinds = world.kind
    shared = torch.tensor([k == "shared" for k in kinds])
    only_a = torch.tensor([k == "a" for k in kinds])
    only_b = torch.tensor([k == "b" for k in kinds])

    recovered_a = ((cos_a >= cosine_cut) & is_a[:, None]).any(0) & only_a
    recovered_b = ((cos_b >= cosine_cut) & is_b[:, None]).any(0) & only_b
    n_exclusive = int(only_a.sum() + only_b.sum())
    recall = float(recovered_a.sum() + recovered_b.sum()) / max(n_exclusive, 1)

    # A feature classified exclusive is a false positive when it matches a shared concept in its
    # own model's space, or matches no concept at all.
    own_cos = torch.where(is_a[:, None], cos_a, cos_b)
    classified = is_a | is_b
    matches_shared = ((own_cos >= cosine_cut) & shared).any(1) & classified
    matches_any = (own_cos >= cosine_cut).any(1)
    matches_nothing = classified & ~matches_any
    any_recovered = ((cos_a >= cosine_cut) | (cos_b >= cosine_cut)).any(0)
    return {
        "exclusive_recall": recall,
        "fp_shared": int(matches_shared.sum()),
        "fp_unmatched": int(matches_nothing.sum()),
        "n_classified_exclusive": int(classified.sum()),
        "shared_recall": float((any_recovered & shared).sum() / shared.sum().clamp_min(1)),
    }


def _cosine(dec_Dd: Tensor, dirs_Cd: Tensor) -> Tensor:
    a = dec_Dd / dec_Dd.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = dirs_Cd / dirs_Cd.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


@dataclass
class ToyBenchSettings:
    dict_sizes: tuple[int, ...] = (128, 256, 512)
    architectures: tuple[str, ...] = ("batchtopk", "dsf", "dfc")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    k: int = 4
    exclusive_fraction: float = 0.1
    steps: int = 1500
    batch_size: int = 512
    train_pairs: int = 60_000
    eval_pairs: int = 10_000
    exclusivity_cut: float = 0.2


def run_toy_benchmark(settings: ToyBenchSettings, on_result=None) -> list[dict]:
    """Train every (architecture, dict size, seed) on the same world; one result row each."""
    world = make_world(seed=1234)
    rows = []
    for seed in settings.seeds:
        generator = torch.Generator().manual_seed(seed)
        x_a, x_b = world.sample(settings.train_pairs, generator)
        held_a, held_b = world.sample(settings.eval_pairs, generator)
        for dict_size in settings.dict_sizes:
            for architecture in settings.architectures:
                config = CrosscoderConfig(
                    architecture=architecture,
                    d_a=x_a.shape[1],
                    d_b=x_b.shape[1],
                    dict_size=dict_size,
                    k=settings.k,
                    exclusive_fraction=settings.exclusive_fraction,
                    seed=seed,
                    # No LLM-style outlier tokens here, and sparse concepts make norms
                    # heavy-tailed: a 2× median mask would drop a third of every batch.
                    outlier_factor=None,
                )
                model = train_crosscoder(config, (x_a, x_b), steps=settings.steps, batch_size=settings.batch_size)
                evaluation = evaluate(model, held_a, held_b)
                raw = score_recovery(model, world, evaluation)
                checked = score_recovery(model, world, evaluation, exclusivity_cut=settings.exclusivity_cut)
                row = {
                    "architecture": architecture,
                    "dict_size": dict_size,
                    "seed": seed,
                    **evaluation.summary(),
                    **raw,
                    **{f"checked_{key}": value for key, value in checked.items()},
                    "train_s": model.training_metrics["elapsed_s"],
                }
                rows.append(row)
                if on_result is not None:
                    on_result(row)
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and standard error over seeds, per (architecture, dict size)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["architecture"], row["dict_size"]), []).append(row)
    metrics = [
        "exclusive_recall", "fp_shared", "fp_unmatched", "checked_exclusive_recall",
        "checked_fp_shared", "checked_fp_unmatched", "fve_a", "fve_b", "dead_fraction", "mean_l0",
    ]
    table = []
    for (architecture, dict_size), group in sorted(groups.items()):
        entry: dict = {"architecture": architecture, "dict_size": dict_size, "seeds": len(group)}
        for metric in metrics:
            values = torch.tensor([float(r[metric]) for r in group], dtype=torch.float64)
            entry[metric] = float(values.mean())
            entry[f"{metric}_se"] = float(values.std() / math.sqrt(len(group))) if len(group) > 1 else 0.0
        table.append(entry)
    return table
