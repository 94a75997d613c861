"""Offline coherence grader: fluency of an answer measured by the unsteered model itself.

Score on the 1..5 coherence scale from two measurements:

* the perplexity of the answer under the *unsteered* model, divided by the perplexity of the
  unsteered model's own greedy answer to the same prompt (so the scale does not depend on how
  sharp the model is in general): ratio ≤ 1.5 → 5, ≤ 3 → 4, ≤ 10 → 3, ≤ 100 → 2, else 1;
* repetition: if fewer than 30 % of the answer's words are distinct (at least 8 words), one level
  less. An empty answer scores 1;
* drift: the coherence rubric grades fluent text that has left the question 3 ("drifts away from
  the question"), and steering often produces exactly that (a question about one event answered with
  a fluent sentence about another). Relevance is the MiniLM cosine of the prompt and the answer; an
  answer whose relevance falls more than ``DRIFT_MARGIN`` below that of the unsteered model's own
  answer to the prompt scores at most 3. Measured against the unsteered answer, so a prompt that
  invites any subject (a generic open question) or one the model never answers on topic is not
  penalised; answers under ``MIN_DRIFT_WORDS`` words are exempt (a terse correct answer is far
  from its question in embedding space).

It reads meaning only through that one similarity: an answer on the right subject that says
something false or odd is graded on fluency alone. It is labelled on every result as offline.
"""

from __future__ import annotations

import math
import threading

from crosscoder.models import LoadedModel
from crosscoder.steering import SteeredGenerator
from evals.embedding import embed

OFFLINE_COHERENCE_LABEL = ("offline: perplexity under the unsteered model relative to its own answer, repetition, and "
                           "drift from the question (MiniLM)")
RATIO_LEVELS = ((1.5, 5), (3.0, 4), (10.0, 3), (100.0, 2))
#: How far below the unsteered answer's relevance to the prompt an answer's may fall before it counts
#: as drifting away from the question (cosine of MiniLM embeddings; see the module docstring).
DRIFT_MARGIN = 0.25
#: The highest coherence level of an answer that drifted away from the question (the rubric's 3).
DRIFTED_LEVEL = 3
#: Answers shorter than this many words are never counted as drift: a terse correct answer ("Yes.",
#: "Buenos días.") is far from its question in embedding space without having left it.
MIN_DRIFT_WORDS = 6


def repetition_ratio(text: str) -> float:
    """Distinct words / words (1.0 for fewer than 8 words)."""
    words = text.lower().split()
    return 1.0 if len(words) < 8 else len(set(words)) / len(words)


def level_from(ratio: float, distinct: float, drifted: bool = False) -> int:
    level = 1
    for bound, value in RATIO_LEVELS:
        if ratio <= bound:
            level = value
            break
    if distinct < 0.3:
        level -= 1
    if drifted:
        level = min(level, DRIFTED_LEVEL)
    return max(1, level)


def relevance(prompts: list[str], answers: list[str]) -> list[float]:
    """MiniLM cosine of each prompt with its answer."""
    if not prompts:
        return []
    p, a = embed(prompts), embed(answers)
    return (p * a).sum(-1).tolist()


class CoherenceMeter:
    """Grades answers to chat prompts with the unsteered model; thread-safe, caches baselines."""

    def __init__(self, loaded: LoadedModel, max_new_tokens: int = 64):
        self.generator = SteeredGenerator(loaded)
        self.max_new_tokens = max_new_tokens
        self._baseline: dict[str, float] = {}
        self._baseline_relevance: dict[str, float] = {}
        # an answer's perplexity, per (prompt, answer): sweeps repeat the unsteered answers
        self._perplexity: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def _ensure_baselines(self, rendered: dict[str, list[int]]) -> None:
        """The unsteered model's own answer to each new prompt, and its perplexity: the reference a
        steered answer's perplexity is divided by (generated together, cached per prompt)."""
        missing = [p for p in rendered if p not in self._baseline]
        if not missing:
            return
        answers = self.generator.generate([rendered[p] for p in missing], max_new_tokens=self.max_new_tokens)
        ppls = self.generator.answer_perplexities([(rendered[p], g.text) for p, g in zip(missing, answers, strict=True)])
        relevances = relevance(missing, [g.text for g in answers])
        for prompt, ppl, rel in zip(missing, ppls, relevances, strict=True):
            self._baseline[prompt] = ppl if math.isfinite(ppl) else 1.0
            self._baseline_relevance[prompt] = rel

    def grade(self, prompt: str, answer: str) -> dict:
        """``{"score", "perplexity", "baseline_perplexity", "distinct", "relevance", "baseline_relevance",
        "label"}``."""
        return self.grade_many([(prompt, answer)])[0]

    def grade_many(self, items: list[tuple[str, str]]) -> list[dict]:
        """:meth:`grade` for each ``(prompt, answer)``, with batched forward passes."""
        with self._lock:  # a blank answer is graded 1 below: no prompt rendering or baseline for it
            new = list(dict.fromkeys((p, a) for p, a in items if a.strip() and (p, a) not in self._perplexity))
            rendered = {p: self.generator.render([{"role": "user", "content": p}]) for p, _ in new}
            self._ensure_baselines(rendered)
            ppls = self.generator.answer_perplexities([(rendered[p], a) for p, a in new])
            self._perplexity.update(zip(new, ppls, strict=True))
            ppls = [self._perplexity[(p, a)] if a.strip() else math.inf for p, a in items]
        answered = [(p, a) for p, a in items if a.strip()]
        relevances = iter(relevance([p for p, _ in answered], [a for _, a in answered]))
        out = []
        for (prompt, answer), ppl in zip(items, ppls, strict=True):
            if not answer.strip():
                out.append({"score": 1.0, "perplexity": math.inf, "baseline_perplexity": None, "distinct": 0.0,
                            "relevance": None, "baseline_relevance": None, "label": OFFLINE_COHERENCE_LABEL})
                continue
            baseline = self._baseline[prompt]
            distinct = repetition_ratio(answer)
            ratio = ppl / max(baseline, 1e-6)
            rel, baseline_rel = next(relevances), self._baseline_relevance[prompt]
            drifted = rel < baseline_rel - DRIFT_MARGIN and len(answer.split()) >= MIN_DRIFT_WORDS
            out.append({"score": float(level_from(ratio, distinct, drifted)), "perplexity": ppl,
                        "baseline_perplexity": baseline, "distinct": distinct, "relevance": rel,
                        "baseline_relevance": baseline_rel, "label": OFFLINE_COHERENCE_LABEL})
        return out
