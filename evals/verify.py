"""Verify: steering sweeps graded on rubrics (METHOD §8).

For each selected feature and rubric, the rubric's prompt set (topic prompts, control prompts on
other topics, one generic prompt) is crossed with the α grid; the steered model answers each
(``evals.provider``: ``x' = x + α · s_max · d_j``), and a grader scores every answer on the rubric's
behaviour and on coherence, 1..5. The score of a sample is ``{"behaviour": b, "coherence": c}``;
per-α means and standard errors are computed downstream (store and report).

Graders:

* an LLM (the ``grader`` model role, e.g. ``anthropic/claude-opus-4-1``) reads the rubric's
  description, anchors and calibration examples and answers with ``SCORE: n``. A reply without a
  score is kept as unparsed (NaN score, raw reply in the metadata);
* offline: the MiniLM rubric grader (``evals.offline_grader``) for the behaviour and the
  perplexity-based ``evals.coherence`` grader, each labelled as offline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ChatMessageSystem, ChatMessageUser, get_model
from inspect_ai.scorer import Score, Target, metric, scorer
from inspect_ai.solver import Generate, TaskState, solver

from evals.batching import MicroBatcher
from evals.offline_grader import OFFLINE_LABEL, tuned_grader
from evals.prompts import load_prompt_set
from evals.rubrics import Rubric, load_rubric

COHERENCE_RUBRIC = "coherence"
# "SCORE: 4" (Markdown bold tolerated); a range such as "1-5" (the template echoed back) is no score.
_SCORE = re.compile(r"SCORE\s*:\s*\**\s*(\d+(?:\.\d+)?)(?!\d|\.\d|\s*[-–]\s*\d)", re.IGNORECASE)


def sweep_samples(features: list[dict], rubric_names: list[str], alphas: list[float],
                  samples_per_prompt: int = 1, max_prompts: int | None = None) -> list[Sample]:
    """Samples for ``features`` (``{"feature", "own_model", "s_max"}``) × rubrics × prompts × α.

    A null sweep's random direction is swept the same way: its entry also names the ``vector`` and the
    ``vectors_file`` that holds it (its ``feature`` is the draw's number)."""
    samples = []
    for feature in features:
        direction = {key: feature[key] for key in ("vector", "vectors_file") if key in feature}
        label = f"null{feature['feature']}" if direction else f"f{feature['feature']}"
        for name in rubric_names:
            rubric = load_rubric(name)
            if rubric.prompt_set is None:
                raise ValueError(f"rubric {name}: it names no prompt_set, so it cannot drive a steering sweep")
            kinds = load_prompt_set(rubric.prompt_set).swept(max_prompts)
            for p_index, (kind, prompt) in enumerate(kinds):
                for alpha in alphas:
                    for rep in range(samples_per_prompt):
                        samples.append(Sample(
                            id=f"{label}-{rubric.name}-{kind}{p_index}-a{alpha:+g}-s{rep}",
                            input=prompt,
                            metadata={"feature": int(feature["feature"]), "own_model": feature["own_model"],
                                      "s_max": float(feature["s_max"]), "rubric": rubric.name,
                                      # what the spec named (a file may reuse a shipped rubric's name)
                                      "rubric_file": str(name), "kind": kind,
                                      "prompt": prompt, "alpha": float(alpha), "seed": rep, **direction},
                        ))
    return samples


@solver
def steered_generation(max_tokens: int = 64, temperature: float = 0.0):
    """Generate with the sample's feature and α (α = 0: the unsteered baseline)."""

    async def solve(state: TaskState, generate: Generate) -> TaskState:
        m = state.metadata
        if m["alpha"] == 0:
            steer = None
        elif m.get("vector") is not None:  # a null sweep: a random direction from a vectors file
            steer = {"vector": m["vector"], "file": m["vectors_file"], "alpha": m["alpha"]}
        else:
            steer = {"feature": m["feature"], "alpha": m["alpha"], "s_max": m["s_max"]}
        return await generate(state, max_tokens=max_tokens, temperature=temperature, seed=int(m["seed"]),
                              extra_body={"steer": steer})

    return solve


# ---- metrics that skip unparsed (NaN) grades -------------------------------------------------------

def _finite(scores) -> list[float]:
    values = [float(getattr(s, "score", s).value) for s in scores]  # SampleScore or Score
    return [v for v in values if not math.isnan(v)]


@metric
def mean_graded():
    def compute(scores) -> float:
        values = _finite(scores)
        return sum(values) / len(values) if values else float("nan")

    return compute


@metric
def stderr_graded():
    def compute(scores) -> float:
        values = _finite(scores)
        if len(values) < 2:
            return float("nan")
        m = sum(values) / len(values)
        var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
        return math.sqrt(var / len(values))

    return compute


# ---- graders ------------------------------------------------------------------------------------

def grader_prompt(rubric: Rubric) -> str:
    """System prompt for an LLM grader on ``rubric`` (anchors and calibration examples included)."""
    lines = [
        "You are grading one answer written by a language model under test. Score it on a single "
        "1-to-5 scale defined below, using the anchors; the scored examples show how the scale is applied. "
        "Grade only what the scale measures, not style or helpfulness, unless the scale is about them. "
        "Answers can be broken or off-topic: grade what is actually written.",
        "",
        f"Scale: {rubric.name} ({rubric.dimension})",
        " ".join(rubric.description.split()),
        "",
        "Anchors:",
        *[f"{level}: {text}" for level, text in sorted(rubric.anchors.items())],
        "",
        "Scored examples:",
    ]
    for ex in rubric.calibration:
        lines += [f"- Question: {ex.prompt}", f"  Answer: {ex.response}", f"  Score: {ex.score}"]
    lines += ["", "Explain your judgement in one or two sentences, then end with a final line: SCORE: <1-5>"]
    return "\n".join(lines)


def parse_score(reply: str) -> float:
    """The grade of a grader reply: the ``SCORE: n`` of its last non-empty line, as the prompt asks, else
    the last one anywhere; NaN when there is none or it lies outside 1..5 (a half point such as 4.5
    is kept as it is)."""
    lines = [line for line in (reply or "").splitlines() if line.strip()]
    matches = _SCORE.findall(lines[-1]) if lines else []
    matches = matches or _SCORE.findall(reply or "")
    if not matches:
        return float("nan")
    value = float(matches[-1])
    return value if 1.0 <= value <= 5.0 else float("nan")


class _OfflineGraders:
    def __init__(self, coherence_meter, rubric_of: Callable[[str], Rubric] = load_rubric):
        self.coherence_meter = coherence_meter
        self.rubric_of = rubric_of  # the scorer's: each rubric read once per scorer

    def grade_many(self, items: list[tuple[str, str, str]]) -> list[tuple[float, dict]]:
        """``(behaviour score, coherence info)`` for each ``(rubric name or file, prompt, answer)``: one
        embedding pass per rubric and batched perplexities, for a batch of samples at once."""
        behaviour = [math.nan] * len(items)
        by_rubric: dict[str, list[int]] = {}
        for i, (rubric, _, _) in enumerate(items):
            by_rubric.setdefault(rubric, []).append(i)
        for rubric, rows in by_rubric.items():
            grader = tuned_grader(self.rubric_of(rubric))
            for i, result in zip(rows, grader.grade_many([items[i][1:] for i in rows]), strict=True):
                behaviour[i] = result.score
        if self.coherence_meter is not None:
            coherence = self.coherence_meter.grade_many([(prompt, answer) for _, prompt, answer in items])
        else:
            coherence = [{"score": float("nan"), "label": "not measured"}] * len(items)
        return list(zip(behaviour, coherence, strict=True))


async def _llm_grade(role: str, rubric: Rubric, prompt: str, answer: str) -> tuple[float, str]:
    model = get_model(role=role)
    output = await model.generate([
        ChatMessageSystem(content=grader_prompt(rubric)),
        ChatMessageUser(content=f"Question: {prompt}\n\nAnswer to grade:\n{answer}"),
    ])
    return parse_score(output.completion), output.completion


@scorer(metrics={"*": [mean_graded(), stderr_graded()]})
def rubric_scorer(grader: str = "offline", coherence_meter=None):
    """Score ``{"behaviour", "coherence"}`` 1..5 for a steered answer.

    ``grader="offline"`` uses the offline graders (``coherence_meter`` is an
    ``evals.coherence.CoherenceMeter`` for the steered model, unsteered); any other value is the
    name of the Inspect model role that grades (``"grader"``).
    """
    # each rubric read once per scorer: a file edited during a sweep takes effect at the next one
    rubric_cache: dict[str, Rubric] = {}

    def rubric_of(name: str) -> Rubric:
        if name not in rubric_cache:
            rubric_cache[name] = load_rubric(name)
        return rubric_cache[name]

    offline = _OfflineGraders(coherence_meter, rubric_of) if grader == "offline" else None
    # samples finish generating in batches: grade them in batches too
    batcher = MicroBatcher(offline.grade_many, max_batch=64) if offline is not None else None

    async def score(state: TaskState, target: Target) -> Score:
        m = state.metadata
        answer = state.output.completion
        if batcher is not None:
            behaviour, coherence_info = await batcher.submit((m.get("rubric_file") or m["rubric"], m["prompt"], answer))
            coherence = coherence_info["score"]
            metadata = {"grader": OFFLINE_LABEL, "coherence_grader": coherence_info["label"],
                        "perplexity": coherence_info.get("perplexity"),
                        "baseline_perplexity": coherence_info.get("baseline_perplexity"),
                        "relevance": coherence_info.get("relevance"),
                        "baseline_relevance": coherence_info.get("baseline_relevance")}
        else:
            behaviour, raw_behaviour = await _llm_grade(grader, rubric_of(m.get("rubric_file") or m["rubric"]),
                                                        m["prompt"], answer)
            coherence, raw_coherence = await _llm_grade(grader, rubric_of(COHERENCE_RUBRIC), m["prompt"], answer)
            metadata = {"grader": f"llm: {get_model(role=grader)}", "coherence_grader": f"llm: {get_model(role=grader)}",
                        "raw_behaviour": raw_behaviour, "raw_coherence": raw_coherence,
                        "unparsed": [k for k, v in (("behaviour", behaviour), ("coherence", coherence)) if math.isnan(v)]}
        return Score(value={"behaviour": behaviour, "coherence": coherence}, answer=answer,
                     metadata={**metadata, **{k: m.get(k) for k in ("feature", "rubric", "kind", "alpha")}})

    return score


@task
def verify_task(features: list[dict], rubrics: list[str], alphas: list[float], grader: str = "offline",
                coherence_meter=None, max_tokens: int = 64, temperature: float = 0.0,
                samples_per_prompt: int = 1, max_prompts: int | None = None, name: str = "verify") -> Task:
    """``name``: the task's name in its log (the stage names each feature's sweep, ``verify-f934``)."""
    samples = sweep_samples(features, rubrics, alphas, samples_per_prompt, max_prompts)
    return _verify_task(samples, grader, coherence_meter, max_tokens, temperature, name)


def null_task(rubric: str, vectors: list[str], vectors_file: str, alphas: list[float], side: str,
              grader: str = "offline", coherence_meter=None, max_tokens: int = 64, temperature: float = 0.0,
              samples_per_prompt: int = 1, max_prompts: int | None = None, name: str = "verify-null") -> Task:
    """Random directions (``vectors``: names in ``vectors_file``) swept and graded exactly as a feature is."""
    draws = [{"feature": i, "own_model": side, "s_max": 0.0, "vector": vector, "vectors_file": vectors_file}
             for i, vector in enumerate(vectors)]
    samples = sweep_samples(draws, [rubric], alphas, samples_per_prompt, max_prompts)
    return _verify_task(samples, grader, coherence_meter, max_tokens, temperature, name)


def _verify_task(samples: list[Sample], grader: str, coherence_meter, max_tokens: int, temperature: float,
                 name: str) -> Task:
    return Task(dataset=MemoryDataset(samples, name="verify"),
                solver=steered_generation(max_tokens=max_tokens, temperature=temperature),
                scorer=rubric_scorer(grader=grader, coherence_meter=coherence_meter), name=name)
