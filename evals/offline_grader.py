"""An offline rubric grader: a shrinkage linear discriminant on sentence embeddings.

Method (deliberately simple, and labelled as such on every result):

* references are the rubric's calibration responses (each with its score) and its five anchor
  texts (anchor ``k`` counts as a reference for level ``k``);
* every text (the response, or "prompt + response") is embedded with the offline MiniLM model,
  and three generic repetition statistics are appended (``surface_features``: repeated-word and
  repeated-bigram shares, share of the commonest word), scaled by a tuned ``surface_weight``;
  embeddings barely tell fluent prose from the looping text that hard steering produces;
* a linear discriminant analysis (LDA) is fitted on the references: the within-level scatter is
  shrunk toward a multiple of the identity (``shrinkage``), the embeddings are whitened by it and
  projected on the (at most four) directions that separate the five level means. This keeps the
  few dimensions in which the levels differ (tone, framing) and discards the many in which all
  references vary alike (topic, product, wording) — plain cosine similarity is dominated by the
  latter;
* a graded text's distance to each level's mean in that space gives a posterior over levels,
  ``p_k ∝ exp(-d_k^2 / (2 T))`` (``per_level``), and the score is its mean ``sum_k k * p_k``;
* ``surface_weight``, ``shrinkage`` and ``T`` are chosen from small fixed grids by leave-one-out
  on the calibration examples only (each example graded by a discriminant fitted without it;
  anchors always stay in), maximising LOO exact + within-one accuracy, ties going to the smaller
  ``T``. The held-out validation sets in ``tests/evals/data`` play no part in fitting. ``loo_accuracy``
  (exact) and ``loo_within_one`` report that estimate.

All computations happen in the span of the centred references (at most ``n_refs - 1``
dimensions): the discriminant directions lie in it, so this is exact and makes fitting cheap.

This is a supervised heuristic, not a judge: it learns what separates the rubric's own examples,
so it is only as good as their coverage (more calibration examples per level help most), and it
can miss negations or framing that a reader would catch. It cannot check facts: a confident false
claim and a true one embed alike (the ``factuality`` rubric stays far below the bar offline).
Everything is deterministic. Fitting takes about a second per rubric on one CPU core.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evals.embedding import embed
from evals.rubrics import LEVELS, Rubric, load_rubric

OFFLINE_LABEL = "offline: MiniLM embeddings + shrinkage LDA fitted on the rubric's calibration examples"
TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0)
SHRINKAGES = (0.3, 0.6, 0.9)
_LEVELS_F = torch.tensor(LEVELS, dtype=torch.float64)


@dataclass(frozen=True)
class GradeResult:
    """``score`` in [1, 5]; ``per_level`` maps each level to its posterior probability (sums to 1)."""

    score: float
    label: str = OFFLINE_LABEL
    per_level: dict[int, float] = field(default_factory=dict)


def _text(prompt: str, response: str, include_prompt: bool) -> str:
    return f"{prompt}\n{response}" if include_prompt else response


_WORD = re.compile(r"\w+")
# Surface statistics are multiplied by ``weight / sqrt(384)`` (the spread of one coordinate of a
# unit embedding); the weight is tuned per rubric with the other hyperparameters, so a rubric
# where repetition matters (coherence) can lean on them and the others can ignore them.
SURFACE_WEIGHTS = (4.0, 16.0, 32.0)


def surface_features(text: str) -> list[float]:
    """Generic repetition statistics of a text, each in [0, 1]: what embeddings barely see.

    ``[repeated-word share, repeated-bigram share, share of the commonest word]``. Word salad and
    looping text (what steering too hard produces) score high; ordinary prose scores low.
    """
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return [1.0, 1.0, 1.0]
    counts = Counter(words)
    bigrams = Counter(zip(words, words[1:], strict=False))
    n_bigrams = max(len(words) - 1, 1)
    repeated_bigrams = sum(c for c in bigrams.values() if c > 1) / n_bigrams
    return [1.0 - len(counts) / len(words), repeated_bigrams, max(counts.values()) / len(words)]


def _embed_with_surface(texts: list[str]) -> tuple[Tensor, Tensor]:
    """``([n, 384] MiniLM embeddings, [n, 3] surface statistics)``, float64."""
    surface = torch.tensor([surface_features(t) for t in texts], dtype=torch.float64).reshape(len(texts), 3)
    return embed(texts).double(), surface


def _features(vectors: Tensor, surface: Tensor, weight: float) -> Tensor:
    """``[n, 384 + 3]``: embeddings and surface statistics scaled by ``weight / sqrt(384)``."""
    return torch.cat([vectors, surface * (weight / vectors.shape[1] ** 0.5)], dim=1)


@dataclass(frozen=True)
class _Discriminant:
    """A fitted LDA: ``project(x) = (x - centre) @ directions``; ``means`` are the level means there."""

    centre: Tensor  # [d]
    directions: Tensor  # [d, k], k <= 4
    means: Tensor  # [5, k]

    def posterior(self, vectors: Tensor, temperature: float) -> Tensor:
        """``vectors`` ``[n, d]`` -> posterior over the five levels ``[n, 5]``."""
        z = (vectors - self.centre) @ self.directions
        d2 = torch.cdist(z, self.means).square()
        return torch.softmax(-d2 / (2 * temperature), dim=-1)


def _fit(vectors: Tensor, levels: Tensor, shrinkage: float) -> _Discriminant:
    """Shrinkage LDA on ``vectors`` ``[n, d]`` (float64) with integer ``levels`` ``[n]`` in 1..5."""
    centre = vectors.mean(0)
    centred = vectors - centre
    # Work in the span of the centred references: exact for LDA (see module docstring), and small.
    _, singular, vt = torch.linalg.svd(centred, full_matrices=False)
    basis = vt[singular > singular.max() * 1e-8].T  # [d, r]
    coords = centred @ basis  # [n, r]
    means = torch.stack([coords[levels == level].mean(0) for level in LEVELS])  # [5, r]
    resid = coords - means[levels - 1]
    # Within-level scatter, shrunk toward a multiple of the identity of the full space (whose
    # restriction to the span is the identity here): trace / d keeps the full-space scale.
    scatter = resid.T @ resid / len(levels)
    scale = scatter.trace() / vectors.shape[1]
    shrunk = (1 - shrinkage) * scatter + shrinkage * scale * torch.eye(len(scatter), dtype=scatter.dtype)
    eigvals, eigvecs = torch.linalg.eigh(shrunk)
    whiten = eigvecs / eigvals.clamp_min(1e-12).sqrt()  # [r, r]
    whitened_means = means @ whiten
    _, _, between = torch.linalg.svd(whitened_means - whitened_means.mean(0), full_matrices=False)
    directions = basis @ whiten @ between[: len(LEVELS) - 1].T  # [d, 4]
    return _Discriminant(centre=centre, directions=directions, means=(means @ basis.T) @ directions)


_THREADS_LOCK = threading.Lock()
_one_thread_users = 0  # callers inside _one_thread(); the first saves torch's thread count, the last restores it
_saved_threads = 1


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run tiny linear algebra on one thread: on a busy machine, thread hand-offs for matrices
    of a few dozen rows cost far more than the arithmetic (measured: 36 s vs 1.5 s per fit).

    torch's thread count is global and graders of several sweeps run at once in their own threads:
    the count is saved by the first caller in and restored by the last one out, so that an
    overlapping caller never saves the 1 and leaves it behind."""
    global _one_thread_users, _saved_threads
    with _THREADS_LOCK:
        if _one_thread_users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _one_thread_users += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _one_thread_users -= 1
            if _one_thread_users == 0:
                torch.set_num_threads(_saved_threads)


def _expected_level(posterior: Tensor) -> Tensor:
    return (posterior * _LEVELS_F).sum(-1).clamp(1.0, 5.0)


class OfflineRubricGrader:
    """Grade responses on a rubric's 1..5 scale with an LDA fitted on its scored references.

    Attributes set by the leave-one-out tuning: ``shrinkage``, ``temperature``,
    ``surface_weight``, and the LOO estimates ``loo_accuracy`` (exact) and ``loo_within_one``.
    """

    def __init__(
        self,
        rubric: Rubric | str,
        *,
        include_prompt: bool = False,
        temperatures: tuple[float, ...] = TEMPERATURES,
        shrinkages: tuple[float, ...] = SHRINKAGES,
        surface_weights: tuple[float, ...] = SURFACE_WEIGHTS,
    ) -> None:
        self.rubric = load_rubric(rubric) if isinstance(rubric, str) else rubric
        self.include_prompt = include_prompt
        calibration = self.rubric.calibration
        texts = [_text(ex.prompt, ex.response, include_prompt) for ex in calibration]
        texts += [self.rubric.anchors[level] for level in LEVELS]
        self._vectors, self._surface = _embed_with_surface(texts)  # [n_refs, 384], [n_refs, 3]
        self._ref_levels = torch.tensor([ex.score for ex in calibration] + list(LEVELS))
        self._n_calibration = len(calibration)
        with _one_thread():
            tuned = self._tune(surface_weights, shrinkages, temperatures)
            self.surface_weight, self.shrinkage, self.temperature, self.loo_accuracy, self.loo_within_one = (
                tuned
            )
            refs = _features(self._vectors, self._surface, self.surface_weight)
            self._model = _fit(refs, self._ref_levels, self.shrinkage)

    def _tune(
        self, weights: tuple[float, ...], shrinkages: tuple[float, ...], temperatures: tuple[float, ...]
    ) -> tuple[float, float, float, float, float]:
        """Pick (surface weight, shrinkage, T) by leave-one-out over the calibration examples.

        Maximises LOO exact + within-one accuracy; ties go to the earlier weight and shrinkage
        and to the smaller T. Anchors always stay in, so every fold still covers all five levels.
        """
        n = self._n_calibration
        truth = self._ref_levels[:n].double()
        best: tuple[tuple[float, float], tuple[float, float, float, float, float]] | None = None
        for weight in weights:
            refs = _features(self._vectors, self._surface, weight)
            for shrinkage in shrinkages:
                posteriors: dict[float, list[Tensor]] = {t: [] for t in temperatures}
                for i in range(n):
                    keep = torch.ones(len(self._ref_levels), dtype=torch.bool)
                    keep[i] = False
                    model = _fit(refs[keep], self._ref_levels[keep], shrinkage)
                    for t in temperatures:
                        posteriors[t].append(model.posterior(refs[i : i + 1], t)[0])
                for t in temperatures:
                    preds = _expected_level(torch.stack(posteriors[t]))
                    exact = float((preds.round() == truth).double().mean())
                    within_one = float(((preds - truth).abs() <= 1).double().mean())
                    key = (exact + within_one, -t)
                    if best is None or key > best[0]:
                        best = (key, (weight, shrinkage, t, exact, within_one))
        assert best is not None
        return best[1]

    # -- public API --------------------------------------------------------------------------
    def grade(self, prompt: str, response: str) -> GradeResult:
        return self.grade_many([(prompt, response)])[0]

    def grade_many(self, items: list[tuple[str, str]]) -> list[GradeResult]:
        if not items:
            return []
        vectors, surface = _embed_with_surface([_text(p, r, self.include_prompt) for p, r in items])
        with _one_thread():
            posterior = self._model.posterior(
                _features(vectors, surface, self.surface_weight), self.temperature
            )
        scores = _expected_level(posterior)  # [n]
        return [
            GradeResult(
                score=float(score),
                per_level={level: float(row[i]) for i, level in enumerate(LEVELS)},
            )
            for score, row in zip(scores, posterior, strict=True)
        ]


_tuned: dict[str, OfflineRubricGrader] = {}
_tuned_lock = threading.Lock()


def tuned_grader(rubric: Rubric | str) -> OfflineRubricGrader:
    """The :class:`OfflineRubricGrader` of ``rubric``, tuned once per process for each rubric content:
    every sweep of a verify stage grades the same rubrics, and tuning (a leave-one-out search over
    the calibration examples) took a sixth of the demo's verify time when each sweep repeated it."""
    rubric = load_rubric(rubric) if isinstance(rubric, str) else rubric
    key = rubric.model_dump_json()
    with _tuned_lock:
        if key not in _tuned:
            _tuned[key] = OfflineRubricGrader(rubric)
        return _tuned[key]
