"""Where a flagged feature fires on a rubric's prompts: its *onset* activation.

A planted or learned behaviour is what a model is about to say. So the evidence that a feature is
about a rubric's behaviour is that it fires at the point where the model is about to answer that
rubric's topic prompts (the opened assistant turn), and much less on its control prompts, which
look alike but should not trigger the behaviour. The analyse stage stores, for every flagged
feature and every rubric of the spec, the feature's mean onset activation on both prompt sets as a
fraction of its ``s_max``; verify uses the difference, the *onset margin*, to choose which feature
to sweep on which rubric. No Inspect import here: the analyse stage runs it.
"""

from __future__ import annotations

import math

from crosscoder.analysis import onset_activations
from evals.prompts import load_prompt_set
from evals.rubrics import load_rubric


def rubric_prompts(name: str) -> tuple[list[str], list[str]]:
    """``(topic prompts, control prompts + the generic prompt)`` of rubric ``name``'s prompt set
    (both empty when the rubric has none); the controls are never empty otherwise."""
    rubric = load_rubric(name)
    if rubric.prompt_set is None:
        return [], []
    prompts = load_prompt_set(rubric.prompt_set)
    return list(prompts.prompts), [*prompts.control_prompts, prompts.generic_prompt]


def add_rubric_onsets(rows: list[dict], crosscoder, loaded: dict, rubrics: list[str]) -> None:
    """Add ``row["onset"] = {rubric: {"topic": mean, "control": mean}}`` (fractions of the
    feature's ``s_max``) to every analysed feature row, in place."""
    per_rubric = {}
    for name in rubrics:
        topic, control = rubric_prompts(name)
        if topic:
            per_rubric[name] = (onset_activations(crosscoder, loaded, topic),
                                onset_activations(crosscoder, loaded, control))
    for row in rows:
        scale = row["s_max"] if row["s_max"] > 0 else 1.0
        row["onset"] = {name: {"topic": round(float(topic[:, row["feature"]].mean()) / scale, 4),
                               "control": round(float(control[:, row["feature"]].mean()) / scale, 4)}
                        for name, (topic, control) in per_rubric.items()}


def onset_margin(row: dict, rubric: str) -> float | None:
    """Topic minus control onset activation of a feature row on ``rubric`` (None if not measured)."""
    onset = (row.get("onset") or {}).get(rubric)
    if onset is None:
        return None
    margin = onset["topic"] - onset["control"]
    return margin if math.isfinite(margin) else None  # a NaN would scramble the ranking of candidates
