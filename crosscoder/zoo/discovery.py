"""The zoo's ground-truth check: does the crosscoder give each planted concept its own exclusive feature?

For a crosscoder trained on a harvest of the zoo's audit corpus, every pair in the store belongs to a
document, and every audit document has a ``topic`` (a planted id such as ``state-narrative``, a
control topic ``control:<id>`` that asks the same forms of question about something else, or a
shared topic such as ``country-facts``). A planted concept's *contexts* are the pairs of documents
whose topic is that concept (for a concept with sub-narratives, e.g. ``state-narrative``, their
documents too: see :data:`SUB_NARRATIVES`).

For each planted concept that one model has and the other lacks (``expected_diff``: "a" or "b"),
:func:`concept_discovery` looks at every exclusive feature of that model (the DFC's A-only or B-only
partition) and measures, over all pairs of the store, at the inference threshold θ:

- ``share``: the fraction of the feature's firings that fall on the concept's contexts (by count);
- ``mass_share``: the same, weighted by activation (a feature's strong firings count more);
- ``coverage``: the fraction of the concept's documents on which the feature fires at least once;
- ``control_share``: the fraction of its firings on the concept's control topic (a near miss).

The same is measured in the *other* model's exclusive partition (``opposite``): exclusive features
that only encode how the two tokenizers split a concept's names (``Zorvath``, ``Brevania``) also
concentrate on its documents, on either side, so a concept is found when its side's best feature
reaches the bar *and* clearly beats the other side's best.

The *best* feature is the one with the highest ``share`` (ties: more firings on the concept) among
features that fire at least ``min_concept_firings`` times on the concept's contexts, so that a
feature which fired once, on the concept, does not win with a share of 1. A concept passes when its
best feature's share reaches ``bar`` (0.9 by default, the acceptance bar of the zoo).
A shared concept (both models have it) gets the same measurement over shared features, reported but
never part of the bar. With ``min_relative_activation`` > 0 a firing counts only if its activation
is at least that fraction of the feature's largest activation in the store (weak firings ignored).

Topics come from the documents' source rows (``topic`` field); see :func:`document_topics`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..model import Crosscoder
from ..store import ActivationStore

#: A finer part of a planted narrative: its contexts also count as the parent's contexts.
SUB_NARRATIVES: dict[str, str] = {"territory-claim": "state-narrative"}
#: Topic given to documents whose source row has no ``topic`` field.
UNKNOWN_TOPIC = "unknown"


@dataclass
class FeatureScore:
    """One feature's firings relative to one concept."""

    feature: int
    firings: int  # all firings in the store (above the counting threshold)
    concept_firings: int  # those on the concept's contexts
    share: float  # concept_firings / firings
    mass_share: float  # activation on the concept's contexts / all activation
    coverage: float  # concept documents with at least one firing / concept documents
    control_share: float  # firings on the concept's control topic / firings
    template_share: float  # firings on generation-prompt pairs / firings
    top_topics: list[tuple[str, float]]  # the feature's three most frequent topics, share of firings

    def to_dict(self) -> dict:
        out = asdict(self)
        out["top_topics"] = [[t, round(s, 4)] for t, s in self.top_topics]
        for key in ("share", "mass_share", "coverage", "control_share", "template_share"):
            out[key] = round(out[key], 4)
        return out


@dataclass
class ConceptResult:
    concept: str
    expected: str  # "a" | "b" | "shared" | "neither"
    partition: str  # where the feature was looked for: "a_only" | "b_only" | "shared" | "none"
    context_topics: list[str]
    n_context_docs: int
    n_context_pairs: int
    best: FeatureScore | None
    runner_up: FeatureScore | None
    passed: bool | None  # None for concepts outside the bar (shared, neither)
    # The same measurement in the *other* model's exclusive partition (a control: exclusive features
    # that only encode how the two tokenizers split the concept's names also concentrate there).
    opposite: FeatureScore | None = None

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("best", "runner_up", "opposite")}
        for key in ("best", "runner_up", "opposite"):
            value = getattr(self, key)
            out[key] = value.to_dict() if value else None
        return out


@dataclass
class DiscoveryResult:
    concepts: list[ConceptResult]
    bar: float
    fve_a: float
    fve_b: float
    mean_l0: float
    n_pairs: int
    settings: dict = field(default_factory=dict)

    def concept(self, name: str) -> ConceptResult:
        for result in self.concepts:
            if result.concept == name:
                return result
        raise KeyError(name)

    def summary(self) -> dict:
        """Which exclusive concepts reach the bar, and the headline numbers."""
        judged = [c for c in self.concepts if c.passed is not None]
        return {
            "bar": self.bar,
            "passed": [c.concept for c in judged if c.passed],
            "failed": [c.concept for c in judged if not c.passed],
            "shares": {c.concept: round(c.best.share, 4) if c.best else 0.0 for c in judged},
            "mass_shares": {c.concept: round(c.best.mass_share, 4) if c.best else 0.0 for c in judged},
            "opposite_shares": {c.concept: round(c.opposite.share, 4) if c.opposite else 0.0 for c in judged},
            "fve_a": round(self.fve_a, 4),
            "fve_b": round(self.fve_b, 4),
            "mean_l0": round(self.mean_l0, 3),
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "concepts": [c.to_dict() for c in self.concepts],
            "n_pairs": self.n_pairs,
            "settings": self.settings,
        }

    def table(self) -> str:
        """A markdown table: one row per concept."""
        lines = [
            "| concept | side | best feature | share (count) | share (mass) | coverage | firings "
            "| runner-up (share) | other side's best (share) | pass |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.concepts:
            mark = "-" if c.passed is None else ("yes" if c.passed else "no")
            op = f"{c.opposite.feature} ({c.opposite.share:.2f})" if c.opposite else "-"
            if c.best is None:
                lines.append(f"| {c.concept} | {c.expected} | none | 0 | 0 | 0 | 0 | - | {op} | {mark} |")
                continue
            ru = f"{c.runner_up.feature} ({c.runner_up.share:.2f})" if c.runner_up else "-"
            lines.append(
                f"| {c.concept} | {c.expected} | {c.best.feature} | {c.best.share:.3f} | "
                f"{c.best.mass_share:.3f} | {c.best.coverage:.2f} | {c.best.firings} | {ru} | {op} | {mark} |"
            )
        return "\n".join(lines)


# ---- topics -----------------------------------------------------------------------------------------


def _source_rows(path: str) -> list[dict]:
    """Rows of a local jsonl source (``zoo:<name>`` resolved to the zoo's data file)."""
    if path.startswith("zoo:"):
        from . import resolve_data

        path = str(resolve_data(path.removeprefix("zoo:")))
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def document_topics(store: ActivationStore) -> list[str]:
    """The topic of every document of the store, indexed by document number.

    A docs file row may carry ``topic`` itself; otherwise its record id ``<source>:<row>`` is
    looked up in the store's data sources (jsonl files, or ``zoo:`` data), whose rows carry
    ``topic``. Rows without one get :data:`UNKNOWN_TOPIC`. Raises ``ValueError`` when the zoo data
    the store was harvested from has changed since (its rows would no longer match).
    """
    data = store.meta.get("data", {})
    sources = data.get("sources", [])
    from . import data_version

    for path, version in data.get("zoo_data_versions", {}).items():
        if data_version(path.removeprefix("zoo:")) != version:
            raise ValueError(
                f"{store.location} was harvested from {path} version {version}, which has changed since "
                f"(now {data_version(path.removeprefix('zoo:'))}); harvest again"
            )
    cache: dict[int, list[dict]] = {}
    topics: list[str] = []
    for doc in store.documents():
        if doc["doc"] != len(topics):
            raise ValueError(f"{store.location}: documents are not numbered 0..n-1 (found {doc['doc']})")
        topic = doc.get("topic")
        if topic is None:
            source, _, row = str(doc["id"]).partition(":")
            index = int(source)
            if index not in cache:
                cache[index] = _source_rows(sources[index]["path"])
            topic = cache[index][int(row)].get("topic", UNKNOWN_TOPIC)
        topics.append(topic)
    return topics


def context_topics(concept: str) -> list[str]:
    """The topics whose documents are a concept's contexts: itself and its sub-narratives."""
    return [concept, *sorted(sub for sub, parent in SUB_NARRATIVES.items() if parent == concept)]


# ---- encoding the store -------------------------------------------------------------------------------


@dataclass
class _Firings:
    """Every active entry of the store's pairs: pair index, feature, activation."""

    pair: Tensor  # [m] int64
    feature: Tensor  # [m] int64
    value: Tensor  # [m] float32
    doc: Tensor  # [n] int64, document of each pair
    template: Tensor  # [n] bool, generation-prompt pair
    fve_a: float
    fve_b: float
    n_pairs: int


@torch.no_grad()
def encode_store(model: Crosscoder, store: ActivationStore, batch_size: int = 8192) -> _Firings:
    """Encode all pairs of ``store`` at the inference threshold; also FVE per model over them."""
    pairs, feats, values, docs, templates = [], [], [], [], []
    sq_err = torch.zeros(2, dtype=torch.float64)
    sums = [torch.zeros(d, dtype=torch.float64) for d in (model.config.d_a, model.config.d_b)]
    sq = torch.zeros(2, dtype=torch.float64)
    offset = 0
    device = model.W_enc_AD.device
    for index in range(len(store.meta["shards"])):
        shard = store.load_shard(index, keys=("a", "b", "doc", "template"))
        docs.append(shard["doc"].long())
        templates.append(shard["template"].bool())
        for start in range(0, shard["a"].shape[0], batch_size):
            xa = shard["a"][start : start + batch_size].to(device, torch.float32)
            xb = shard["b"][start : start + batch_size].to(device, torch.float32)
            f = model.encode(xa, xb)
            ha, hb = model.decode(f)
            sa, sb = float(model.norm_scales[0]), float(model.norm_scales[1])
            sq_err[0] += float(((xa - ha) * sa).pow(2).sum())
            sq_err[1] += float(((xb - hb) * sb).pow(2).sum())
            for side, x, s in ((0, xa, sa), (1, xb, sb)):
                xs = (x * s).double().cpu()
                sums[side] += xs.sum(0)
                sq[side] += float(xs.pow(2).sum())
            rows, cols = torch.nonzero(f > 0, as_tuple=True)
            pairs.append(rows.cpu() + offset + start)
            feats.append(cols.cpu())
            values.append(f[rows, cols].float().cpu())
        offset += shard["a"].shape[0]
    n = offset
    fve = [float(1 - sq_err[s] / (sq[s] - float(sums[s].pow(2).sum()) / max(n, 1))) for s in (0, 1)]
    return _Firings(
        torch.cat(pairs),
        torch.cat(feats),
        torch.cat(values),
        torch.cat(docs),
        torch.cat(templates),
        fve[0],
        fve[1],
        n,
    )


# ---- the measurement ------------------------------------------------------------------------------------


def _partition(model: Crosscoder, expected: str) -> tuple[str, Tensor]:
    if expected == "a":
        return "a_only", model.index_a.cpu()
    if expected == "b":
        return "b_only", model.index_b.cpu()
    if expected == "shared":
        return "shared", model.index_shared.cpu()
    return "none", torch.zeros(0, dtype=torch.long)


def concept_discovery(
    model: Crosscoder,
    store: ActivationStore,
    expected: Mapping[str, str],
    *,
    topics: list[str] | None = None,
    bar: float = 0.9,
    min_concept_firings: int = 5,
    min_relative_activation: float = 0.0,
    batch_size: int = 8192,
) -> DiscoveryResult:
    """Measure, for every planted concept, the best feature of the partition it should live in.

    ``expected``: {planted id: "a" | "b" | "shared" | "neither"}, e.g.
    ``crosscoder.zoo.expected_diff("alpha", "beta")`` for a store harvested from (zoo:alpha, zoo:beta).
    ``topics``: the topic of each document (default: :func:`document_topics`). See the module
    docstring for the definitions; the result is JSON-able through ``to_dict()``.
    """
    topics = document_topics(store) if topics is None else topics
    firings = encode_store(model, store, batch_size)
    D = model.config.dict_size

    # Optionally drop weak firings: below a fraction of the feature's largest activation.
    keep = torch.ones_like(firings.value, dtype=torch.bool)
    if min_relative_activation > 0 and firings.value.numel():
        s_max = torch.zeros(D).scatter_reduce(0, firings.feature, firings.value, reduce="amax")
        keep = firings.value >= min_relative_activation * s_max[firings.feature]
    pair, feat, value = firings.pair[keep], firings.feature[keep], firings.value[keep]

    topic_names = sorted(set(topics))
    topic_id = {t: i for i, t in enumerate(topic_names)}
    doc_topic = torch.tensor([topic_id[t] for t in topics], dtype=torch.long)
    pair_doc = firings.doc
    pair_topic = doc_topic[pair_doc]
    T = len(topic_names)
    # Firings and activation mass per (topic, feature); template firings per feature.
    entry_topic = pair_topic[pair]
    count_TD = (
        torch.zeros(T * D, dtype=torch.float64)
        .index_add_(0, entry_topic * D + feat, torch.ones_like(value, dtype=torch.float64))
        .view(T, D)
    )
    mass_TD = (
        torch.zeros(T * D, dtype=torch.float64)
        .index_add_(0, entry_topic * D + feat, value.double())
        .view(T, D)
    )
    template_D = torch.zeros(D, dtype=torch.float64).index_add_(0, feat, firings.template[pair].double())
    # Documents on which each feature fires (for coverage).
    doc_feature = torch.unique(pair_doc[pair] * D + feat)
    fired_doc, fired_feat = doc_feature // D, doc_feature % D
    docs_per_topic = Counter(topics)
    pairs_per_topic = torch.bincount(pair_topic, minlength=T)

    total_D = count_TD.sum(0)
    mass_total_D = mass_TD.sum(0)
    results = []
    for concept, side in expected.items():
        partition, candidates = _partition(model, side)
        ctx = [t for t in context_topics(concept) if t in topic_id]
        ctx_ids = torch.tensor([topic_id[t] for t in ctx], dtype=torch.long)
        control = f"control:{concept}"
        n_ctx_docs = sum(docs_per_topic[t] for t in ctx)
        n_ctx_pairs = int(pairs_per_topic[ctx_ids].sum()) if ctx else 0
        on_D = count_TD[ctx_ids].sum(0) if ctx else torch.zeros(D, dtype=torch.float64)
        mass_on_D = mass_TD[ctx_ids].sum(0) if ctx else torch.zeros(D, dtype=torch.float64)
        in_ctx_doc = (
            torch.isin(doc_topic[fired_doc], ctx_ids)
            if ctx
            else torch.zeros_like(fired_doc, dtype=torch.bool)
        )
        covered_D = torch.bincount(fired_feat[in_ctx_doc], minlength=D).double()

        judged = side in ("a", "b")
        pools = {
            "own": candidates,
            "opposite": _partition(model, "b" if side == "a" else "a")[1] if judged else None,
        }
        ranked: dict[str, list[FeatureScore]] = {}
        for pool, features in pools.items():
            scored = []
            for j in features.tolist() if features is not None else []:
                if on_D[j] < min_concept_firings:
                    continue
                total = float(total_D[j])
                top = torch.argsort(count_TD[:, j], descending=True)[:3].tolist()
                scored.append(
                    FeatureScore(
                        feature=j,
                        firings=int(total),
                        concept_firings=int(on_D[j]),
                        share=float(on_D[j]) / total,
                        mass_share=float(mass_on_D[j] / mass_total_D[j]),
                        coverage=float(covered_D[j]) / max(n_ctx_docs, 1),
                        control_share=float(count_TD[topic_id[control], j]) / total
                        if control in topic_id
                        else 0.0,
                        template_share=float(template_D[j]) / total,
                        top_topics=[
                            (topic_names[t], float(count_TD[t, j]) / total) for t in top if count_TD[t, j] > 0
                        ],
                    )
                )
            ranked[pool] = sorted(
                scored, key=lambda score: (score.share, score.concept_firings), reverse=True
            )
        scored, opposite = ranked["own"], ranked["opposite"]
        best = scored[0] if scored else None
        results.append(
            ConceptResult(
                concept=concept,
                expected=side,
                partition=partition,
                context_topics=ctx,
                n_context_docs=n_ctx_docs,
                n_context_pairs=n_ctx_pairs,
                best=best,
                runner_up=scored[1] if len(scored) > 1 else None,
                passed=(best is not None and best.share >= bar) if judged else None,
                opposite=opposite[0] if opposite else None,
            )
        )
    n = max(firings.n_pairs, 1)
    return DiscoveryResult(
        concepts=results,
        bar=bar,
        fve_a=firings.fve_a,
        fve_b=firings.fve_b,
        mean_l0=float(keep.numel()) / n,
        n_pairs=firings.n_pairs,
        settings={
            "min_concept_firings": min_concept_firings,
            "min_relative_activation": min_relative_activation,
            "sub_narratives": dict(SUB_NARRATIVES),
        },
    )


def zoo_discovery(model: Crosscoder, store: ActivationStore, **kwargs) -> DiscoveryResult:
    """:func:`concept_discovery` for a store harvested from two zoo models (names read from its meta)."""
    from .manifest import expected_diff

    names = []
    for side in ("model_a", "model_b"):
        model_id = store.meta[side]["id"]
        if not str(model_id).startswith("zoo:"):
            raise ValueError(f"{store.location}: {side} is {model_id!r}, not a zoo model")
        names.append(str(model_id).removeprefix("zoo:"))
    return concept_discovery(model, store, expected_diff(*names), **kwargs)


@dataclass
class SeedSummary:
    """One concept's discovery over crosscoders trained with different seeds on the same store.

    One training run is a draw: on the demo store, the Zorvath concept's best share was 0.91, 0.54
    and 0.49 for seeds 0, 1 and 2. A change to the zoo or the settings is judged on these numbers.
    """

    concept: str
    expected: str
    shares: dict[int, float]  # seed → best exclusive feature's share (0 when none qualified)
    opposite_shares: dict[int, float]  # seed → the other side's best share
    passed: dict[int, bool]

    @property
    def mean(self) -> float:
        return sum(self.shares.values()) / len(self.shares)

    def to_dict(self) -> dict:
        return {"concept": self.concept, "expected": self.expected, "mean": round(self.mean, 4),
                "min": round(min(self.shares.values()), 4), "max": round(max(self.shares.values()), 4),
                "seeds_passed": sum(self.passed.values()), "shares": {str(k): round(v, 4) for k, v in self.shares.items()},
                "opposite_shares": {str(k): round(v, 4) for k, v in self.opposite_shares.items()}}


def summarise_seeds(results: Mapping[int, DiscoveryResult]) -> list[SeedSummary]:
    """Per judged concept (one model has it, the other lacks it), its best share in every seed."""
    if not results:
        raise ValueError("summarise_seeds needs at least one seed's result")
    first = next(iter(results.values()))
    out = []
    for concept in (c for c in first.concepts if c.passed is not None):
        per_seed = {seed: r.concept(concept.concept) for seed, r in results.items()}
        out.append(SeedSummary(
            concept=concept.concept, expected=concept.expected,
            shares={seed: c.best.share if c.best else 0.0 for seed, c in per_seed.items()},
            opposite_shares={seed: c.opposite.share if c.opposite else 0.0 for seed, c in per_seed.items()},
            passed={seed: bool(c.passed) for seed, c in per_seed.items()},
        ))
    return out


def seeds_table(summaries: list[SeedSummary], bar: float) -> str:
    """A markdown table: one row per concept, its share per seed, mean, min and seeds at the bar."""
    seeds = list(summaries[0].shares) if summaries else []
    lines = ["| concept | side | " + " | ".join(f"seed {s}" for s in seeds)
             + f" | mean | min | seeds ≥ {bar:g} | other side's mean |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    for s in summaries:
        other = sum(s.opposite_shares.values()) / len(s.opposite_shares)
        lines.append(f"| {s.concept} | {s.expected} | " + " | ".join(f"{s.shares[k]:.3f}" for k in seeds)
                     + f" | {s.mean:.3f} | {min(s.shares.values()):.3f} | {sum(s.passed.values())}/{len(seeds)}"
                     f" | {other:.3f} |")
    return "\n".join(lines)


def write_result(result: DiscoveryResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2))
    return path


__all__ = [
    "SUB_NARRATIVES",
    "ConceptResult",
    "DiscoveryResult",
    "FeatureScore",
    "SeedSummary",
    "concept_discovery",
    "context_topics",
    "document_topics",
    "encode_store",
    "seeds_table",
    "summarise_seeds",
    "write_result",
    "zoo_discovery",
]
