"""The screen stage as the runner calls it: explain flagged features, then measure detection."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from inspect_ai.model import Model, get_model

from evals import offline, provider  # noqa: F401 - registers the offline and steered providers
from evals.offline import OFFLINE_DETECTOR_LABEL, OFFLINE_EXPLAINER_LABEL
from evals.screen import detection_task, screen_task, unmark
from evals.verify_stage import run_eval


def explainer_model(name: str, rubrics: list[str]) -> tuple[Model, str]:
    """The Inspect model for ``screen.explainer`` and the label that outputs carry."""
    if name == "offline":
        return get_model("offline/explainer", rubrics=",".join(rubrics)), OFFLINE_EXPLAINER_LABEL
    return get_model(name), f"llm: {name}"


def detector_model(name: str | None, explainer: str) -> tuple[Model, str]:
    chosen = name or explainer
    if chosen == "offline":
        return get_model("offline/detector"), OFFLINE_DETECTOR_LABEL
    return get_model(chosen), f"llm: {chosen}"


def split_contexts(contexts: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """(the contexts the explainer sees, the held-out ones the detection score uses as positives).

    Up to ``n`` contexts, at most half of them, are held out, spread evenly over the ranking and never
    the top one: scoring an explanation on the very examples it was written from would measure
    recall of those examples, not whether the explanation describes the feature.
    """
    # The same question in several documents gives the same context: keep its first occurrence.
    first: dict[str, dict] = {}
    for c in contexts:
        first.setdefault(unmark(c["text"]), c)
    contexts = list(first.values())
    n = min(n, len(contexts) // 2)
    if n <= 0:
        return list(contexts), []
    step = len(contexts) // n
    held = set(range(step - 1, step * n, step))
    return ([c for i, c in enumerate(contexts) if i not in held], [c for i, c in enumerate(contexts) if i in held])


def detection_items(feature: dict, explanation: str, positives: list[dict], n: int) -> list[dict]:
    """The held-out activating contexts, and up to ``n`` non-activating ones."""
    items = [{"feature": feature["feature"], "explanation": explanation, "passage": unmark(c["text"]),
              "activating": True} for c in positives]
    items += [{"feature": feature["feature"], "explanation": explanation, "passage": c["text"], "activating": False}
              for c in feature.get("negative_contexts", [])[:n]]
    return items


def run_screen(features: list[dict], screen_spec, rubrics: list[str], log_dir: Path) -> list[dict]:
    """Rows for the ``explanations`` table, one per feature (parsed or not)."""
    if not features:
        return []
    n = screen_spec.detection_contexts
    splits = {f["feature"]: split_contexts(f.get("contexts", []), n) for f in features}
    shown = [{**f, "contexts": splits[f["feature"]][0]} for f in features]
    model, label = explainer_model(screen_spec.explainer, rubrics)
    log = run_eval(screen_task(shown), log_dir, model=model)
    rows = []
    by_feature = {}
    for sample in log.samples or []:
        feature = sample.metadata["feature"]
        score = next(iter(sample.scores.values())) if sample.scores else None
        meta = score.metadata if score is not None else {"parsed": False, "raw": sample.error.message if sample.error
                                                          else "", "explanation": None, "safety_critical": None,
                                                          "reason": None}
        by_feature[feature] = meta
        rows.append({"feature": feature, "explainer": label, "parsed": bool(meta["parsed"]),
                     "explanation": meta["explanation"], "safety_critical": meta["safety_critical"],
                     "reason": meta["reason"], "raw": meta["raw"], "detection_score": None, "detector": None,
                     "eval_log": log.location})
    parsed = [f for f in features if by_feature.get(f["feature"], {}).get("parsed")]
    if n > 0 and parsed:
        items = [it for f in parsed
                 for it in detection_items(f, by_feature[f["feature"]]["explanation"], splits[f["feature"]][1], n)]
        det_model, det_label = detector_model(screen_spec.detector, screen_spec.explainer)
        det_log = run_eval(detection_task(items), log_dir, model=det_model)
        outcomes: dict[int, dict[bool, list[float]]] = defaultdict(lambda: {True: [], False: []})
        for sample in det_log.samples or []:
            if not sample.scores:
                continue
            score = next(iter(sample.scores.values()))
            outcomes[sample.metadata["feature"]][sample.metadata["activating"]].append(float(score.value))
        for row in rows:
            groups = outcomes.get(row["feature"])
            if groups and groups[True] and groups[False]:  # balanced accuracy needs both kinds
                rates = [sum(v) / len(v) for v in groups.values()]
                row["detection_score"] = sum(rates) / len(rates)
                row["detector"] = det_label
    return rows
