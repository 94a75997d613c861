"""An offline rubric grader: sentence-embedding similarity to a rubric's scored references.

Method (deliberately simple, and labelled as such on every result):

* references are the rubric's calibration responses (each with its score) and its five anchor
  texts (anchor ``k`` counts as a reference for level ``k``);
* the graded text (the response, or "prompt + response") is embedded with the offline MiniLM
  model; all embeddings are centred on the mean reference embedding and renormalised (so the
  shared topic does not dominate), then compared by cosine similarity with every reference;
* for each level the best similarity among that level's references is kept (``per_level``);
* the score is the softmax-weighted mean of the levels, ``sum_k k * softmax(per_level / T)_k``;
* the temperature ``T`` is chosen among a few fixed values by leave-one-out on the calibration
  examples only (each example graded against the other references), maximising exact accuracy of
  the rounded score, then accuracy within one level, ties going to the sharper (smaller) ``T``.
  With two calibration examples per level this selection is noisy; ``loo_accuracy`` reports it.

This is a similarity heuristic, not a judge: it tracks wording close to the references and can
miss negations or framing that a reader would catch. Everything is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from evals.embedding import embed
from evals.rubrics import LEVELS, Rubric, load_rubric

OFFLINE_LABEL = "offline: MiniLM similarity to calibration examples"
TEMPERATURES = (0.01, 0.02, 0.03, 0.05, 0.1)


@dataclass(frozen=True)
class GradeResult:
    score: float
    label: str = OFFLINE_LABEL
    per_level: dict[int, float] = field(default_factory=dict)


def _text(prompt: str, response: str, include_prompt: bool) -> str:
    return f"{prompt}\n{response}" if include_prompt else response


class OfflineRubricGrader:
    """Grade responses on a rubric's 1..5 scale by embedding similarity to its references."""

    def __init__(
        self,
        rubric: Rubric | str,
        *,
        include_prompt: bool = False,
        temperatures: tuple[float, ...] = TEMPERATURES,
    ) -> None:
        self.rubric = load_rubric(rubric) if isinstance(rubric, str) else rubric
        self.include_prompt = include_prompt
        calibration = self.rubric.calibration
        texts = [_text(ex.prompt, ex.response, include_prompt) for ex in calibration]
        texts += [self.rubric.anchors[level] for level in LEVELS]
        raw = embed(texts)  # [n_calibration + 5, 384]
        # Centre on the mean reference so the shared topic (every reference is about the same
        # country or product) does not dominate the similarities; renormalise afterwards.
        self._centre = raw.mean(0)
        self._refs = self._project(raw)
        self._ref_levels = torch.tensor([ex.score for ex in calibration] + list(LEVELS))
        self._n_calibration = len(calibration)
        self.temperature, self.loo_accuracy = self._tune(temperatures)

    def _project(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(vectors - self._centre, dim=-1)

    # -- scoring -----------------------------------------------------------------------------
    def _per_level(self, sims: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Best similarity per level; ``sims`` is ``[n_refs]``, ``keep`` an optional ref mask."""
        out = torch.full((len(LEVELS),), -1.0)
        for i, level in enumerate(LEVELS):
            mask = self._ref_levels == level
            if keep is not None:
                mask = mask & keep
            if mask.any():
                out[i] = sims[mask].max()
        return out

    @staticmethod
    def _score(per_level: torch.Tensor, temperature: float) -> float:
        weights = torch.softmax(per_level.double() / temperature, dim=0)
        levels = torch.tensor(LEVELS, dtype=torch.float64)
        return float((weights * levels).sum().clamp(1.0, 5.0))

    def _tune(self, temperatures: tuple[float, ...]) -> tuple[float, float]:
        n = self._n_calibration
        sims = self._refs[:n] @ self._refs.T  # [n, n_refs]
        per_levels = []
        for i in range(n):
            keep = torch.ones(len(self._ref_levels), dtype=torch.bool)
            keep[i] = False
            per_levels.append(self._per_level(sims[i], keep))
        truth = self._ref_levels[:n].double()
        best: tuple[float, float, float] | None = None  # (exact, within_one, -temperature)
        for temperature in temperatures:
            preds = torch.tensor([self._score(p, temperature) for p in per_levels], dtype=torch.float64)
            exact = float((preds.round() == truth).double().mean())
            within_one = float(((preds - truth).abs() <= 1).double().mean())
            key = (exact, within_one, -temperature)
            if best is None or key > best:
                best = key
        assert best is not None
        return -best[2], best[0]

    # -- public API --------------------------------------------------------------------------
    def grade(self, prompt: str, response: str) -> GradeResult:
        return self.grade_many([(prompt, response)])[0]

    def grade_many(self, items: list[tuple[str, str]]) -> list[GradeResult]:
        if not items:
            return []
        vectors = self._project(embed([_text(p, r, self.include_prompt) for p, r in items]))
        sims = vectors @ self._refs.T
        results = []
        for row in sims:
            per_level = self._per_level(row)
            results.append(
                GradeResult(
                    score=self._score(per_level, self.temperature),
                    per_level={level: float(per_level[i]) for i, level in enumerate(LEVELS)},
                )
            )
        return results
