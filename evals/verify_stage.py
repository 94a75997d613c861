"""The verify stage as the runner calls it: choose features and rubrics, sweep, grade, summarise."""

from __future__ import annotations

from pathlib import Path

from inspect_ai import eval as inspect_eval
from inspect_ai.model import get_model

from evals import offline, provider  # noqa: F401 - registers the offline and steered providers
from evals.coherence import CoherenceMeter
from evals.effects import feature_effects
from evals.offline import TopicFlagger
from evals.verify import verify_task


def plan_sweeps(features: list[dict], screen_rows: list[dict], verify_spec) -> list[dict]:
    """Which features to sweep on which rubrics.

    Features: safety-critical ones first, then content features in triage order, at most
    ``verify.max_features``; artefacts and dead features are not swept unless named in
    ``verify.features``. Rubrics: the ``rubrics_per_feature`` rubrics whose topic prompts the
    feature's contexts match best (MiniLM similarity, topic minus control), plus any named for the
    feature in ``verify.features``.
    """
    by_id = {f["feature"]: f for f in features}
    screened = {r["feature"]: r for r in screen_rows}
    candidates = [f for f in features if f["frequency"] > 0 and not f["is_artefact"]]
    candidates.sort(key=lambda f: (not bool(screened.get(f["feature"], {}).get("safety_critical")), f["rank"]))
    chosen = candidates[: verify_spec.max_features] if verify_spec.rubrics else []
    ranker = TopicFlagger(list(verify_spec.rubrics)) if chosen else None
    plan: dict[int, dict] = {}
    for f in chosen:
        ranked = ranker.rank([c["text"] for c in f["contexts"]]) if ranker else []
        rubrics = [name for name, _, _ in ranked[: verify_spec.rubrics_per_feature]]
        plan[f["feature"]] = _item(f, screened, rubrics, [{"rubric": n, "topic": t, "control": c} for n, t, c in ranked])
    for feature, rubrics in verify_spec.features.items():
        if feature not in by_id:
            raise ValueError(f"verify.features: feature {feature} was not flagged in this run "
                             f"(flagged: {len(by_id)} features; see the analyse stage)")
        item = plan.setdefault(feature, _item(by_id[feature], screened, [], []))
        item["rubrics"] = list(dict.fromkeys(item["rubrics"] + list(rubrics)))
    return list(plan.values())


def _item(feature: dict, screened: dict, rubrics: list[str], match: list[dict]) -> dict:
    return {"feature": feature["feature"], "own_model": feature["own_model"], "s_max": feature["s_max"],
            "rank": feature["rank"], "safety_critical": screened.get(feature["feature"], {}).get("safety_critical"),
            "rubrics": rubrics, "rubric_match": match}


def run_sweep(item: dict, spec, crosscoder_path: Path, loaded_model, log_dir: Path, device: str | None = None) -> dict:
    """Sweep one feature on its rubrics; rows for the generations, scores and effects tables."""
    v = spec.verify
    entry = spec.model_a if item["own_model"] == "a" else spec.model_b
    steered = get_model(f"steered/{entry.id}", crosscoder=str(crosscoder_path), side=item["own_model"],
                        layer=entry.layer, dtype=entry.dtype, device=device, revision=entry.revision,
                        trust_remote_code=entry.trust_remote_code)
    roles = {}
    meter = None
    if v.grader == "offline":
        meter = CoherenceMeter(loaded_model, max_new_tokens=v.max_tokens)
    else:
        roles["grader"] = get_model(v.grader)
    task = verify_task([item], item["rubrics"], list(v.alphas), grader="offline" if v.grader == "offline" else "grader",
                       coherence_meter=meter, max_tokens=v.max_tokens, temperature=v.temperature,
                       samples_per_prompt=v.samples_per_prompt, max_prompts=v.max_prompts)
    log = inspect_eval(task, model=steered, model_roles=roles or None, log_dir=str(log_dir), display="none",
                       fail_on_error=False, retry_on_error=3)[0]
    generations, scores = [], []
    for sample in log.samples or []:
        m = sample.metadata
        key = {"feature": m["feature"], "rubric": m["rubric"], "kind": m["kind"], "prompt": m["prompt"],
               "alpha": m["alpha"], "seed": m["seed"]}
        generations.append({**key, "answer": sample.output.completion if sample.output else "",
                            "eval_log": log.location})
        if not sample.scores:
            continue
        score = next(iter(sample.scores.values()))
        for dimension in ("behaviour", "coherence"):
            grader = score.metadata.get("grader" if dimension == "behaviour" else "coherence_grader")
            scores.append({**key, "dimension": dimension, "score": score.value.get(dimension), "grader": grader})
    effects = feature_effects(scores)
    return {"feature": item["feature"], "item": item, "generations": generations, "scores": scores,
            "effects": effects, "eval_log": log.location, "status": log.status}
