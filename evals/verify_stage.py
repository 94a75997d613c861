"""The verify stage as the runner calls it: choose features and rubrics, sweep, grade, summarise."""

from __future__ import annotations

import functools
import hashlib
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from inspect_ai import eval as inspect_eval
from inspect_ai.model import get_model

from evals import offline  # noqa: F401 - registers the offline provider
from evals.coherence import CoherenceMeter
from evals.effects import feature_effects, measured
from evals.onsets import onset_margin
from evals.provider import share_loaded_model
from evals.verify import verify_task


class EvalFailed(RuntimeError):
    """An Inspect eval did not finish; nothing of it is cached, so a rerun repeats it."""


def run_eval(task, log_dir: Path, **kwargs):
    """:func:`run_evals` of one task: its log."""
    return run_evals([task], log_dir, **kwargs)[0]


def _scan_distributions_once() -> None:
    """Inspect records in each log the installed distribution that provides the task. Ours is named
    ``crosscoder-audit`` while its task modules live in ``evals``, so Inspect's quick lookup by import
    name misses and it falls back to ``importlib.metadata.packages_distributions()``, a walk through
    every installed package's file list: ~150 ms per task, 20 tasks in the demo's verify stage.
    Installed packages do not change while a stage runs, so the walk is done once per process."""
    try:
        from inspect_ai._util import package
    except ImportError:  # a later Inspect moved it: its own lookup then runs unchanged
        return
    scan = getattr(package, "packages_distributions", None)
    if callable(scan) and not hasattr(scan, "cache_info"):
        package.packages_distributions = functools.cache(scan)


def run_evals(tasks: list, log_dir: Path, **kwargs) -> list:
    """Run Inspect tasks as a stage does and return their logs, in order: no live display, sample errors kept in
    the log for :func:`check_log` (or the caller) to judge, three retries on model errors, and no
    realtime sample buffer and no running metrics: a stage's evals last seconds to minutes and the
    finished ``.eval`` log (metrics included) is what ``inspect view`` shows, while writing every
    sample's events to that buffer as they happen cost the demo's verify stage about a tenth of its
    time (recomputing the metrics after each sample, for a display nobody sees, cost a few seconds)."""
    _scan_distributions_once()
    logs = inspect_eval(tasks, log_dir=str(log_dir), display="none", fail_on_error=False, retry_on_error=3,
                        log_realtime=False, score_display=False, **kwargs)
    if len(logs) != len(tasks):
        raise EvalFailed(f"Inspect returned {len(logs)} logs for {len(tasks)} tasks (log folder {log_dir})")
    return list(logs)


def check_log(log, what: str) -> None:
    """Raise ``EvalFailed`` unless the eval finished and every sample ran without error."""
    errors = [s for s in (log.samples or []) if s.error is not None]
    if log.status != "success" or errors:
        first = (log.error.message if log.error else errors[0].error.message if errors else log.status)
        raise EvalFailed(f"{what}: the Inspect eval ended with status {log.status!r} and {len(errors)} failed "
                         f"samples ({str(first).splitlines()[0][:300]}); log: {log.location}")


# A feature is matched to a rubric when, where the model is about to answer, it fires on the
# rubric's topic prompts by at least this fraction of its s_max more than on the control prompts.
MIN_ONSET_MARGIN = 0.1


def onset_margins(features: list[dict], rubrics: list[str]) -> dict[int, dict[str, float]]:
    """``{feature: {rubric: onset margin}}``: mean onset activation on the rubric's topic prompts
    minus on its control prompts, in units of ``s_max`` (measured by the analyse stage)."""
    out = {}
    for f in features:
        margins = {name: onset_margin(f, name) for name in rubrics}
        out[f["feature"]] = {name: m for name, m in margins.items() if m is not None}
    return out


def best_matches(features: list[dict], match: dict[int, dict[str, float]], rubrics: list[str],
                 per_rubric: int) -> dict[str, list[tuple[float, dict]]]:
    """Per rubric, its ``per_rubric`` best-matching features with margin ≥ ``MIN_ONSET_MARGIN``."""
    out = {}
    for name in rubrics:
        scored = sorted(((match[f["feature"]].get(name, -1.0), f) for f in features), key=lambda t: -t[0])
        out[name] = [(m, f) for m, f in scored[:per_rubric] if m >= MIN_ONSET_MARGIN]
    return out


def screen_selection(features: list[dict], max_features: int, verify_spec) -> list[dict]:
    """Features to explain: the first ``max_features`` live ones in triage order, plus every feature
    ``plan_sweeps`` can choose, so that each swept feature has an explanation: the rubrics' best
    matches, the content features that fill verify's remaining slots (the first
    ``verify.max_features`` in triage order besides those) and the features ``verify.features`` names.
    (The safety-critical features verify prefers are explained by definition.)"""
    live = [f for f in features if f["frequency"] > 0]
    chosen = {f["feature"]: f for f in live[:max_features]}
    v = verify_spec
    if v.rubrics and v.max_features > 0 and live:
        matched = set()
        for matches in best_matches(live, onset_margins(live, v.rubrics), v.rubrics, v.features_per_rubric).values():
            for _, f in matches:
                chosen.setdefault(f["feature"], f)
                matched.add(f["feature"])
        # plan_sweeps fills its slots from this list, in this order (never past its first max_features)
        fill = [f for f in live if not f["is_artefact"] and f["feature"] not in matched]
        for f in fill[: v.max_features]:
            chosen.setdefault(f["feature"], f)
    by_id = {f["feature"]: f for f in features}
    for feature in v.features:
        if feature in by_id:  # a feature that was not flagged is refused by plan_sweeps, with its reason
            chosen.setdefault(feature, by_id[feature])
    return sorted(chosen.values(), key=lambda f: f["rank"])


def plan_sweeps(features: list[dict], screen_rows: list[dict], verify_spec) -> list[dict]:
    """Which features to sweep on which rubrics, at most ``verify.max_features`` features.

    The rubrics in the spec are the auditor's hypotheses, so selection starts from them: for each
    rubric, the ``features_per_rubric`` flagged features that fire most where the model is about to
    answer its topic prompts rather than its control prompts (onset margin, ``evals.onsets``, at
    least ``MIN_ONSET_MARGIN``), best matches first across rubrics. Then features the screen flagged
    safety-critical, on their best-matching rubric, and then content features in triage order fill
    the remaining slots. Dead features are never swept. ``verify.features`` adds explicit sweeps.
    """
    by_id = {f["feature"]: f for f in features}
    screened = {r["feature"]: r for r in screen_rows}
    live = [f for f in features if f["frequency"] > 0]
    plan: dict[int, dict] = {}
    if verify_spec.rubrics and verify_spec.max_features > 0 and live:
        match = onset_margins(live, verify_spec.rubrics)

        def add(f: dict, rubrics: list[str]) -> None:
            ranked = sorted(match[f["feature"]].items(), key=lambda kv: -kv[1])
            item = plan.setdefault(f["feature"], _item(f, screened, [], [{"rubric": n, "margin": round(m, 4)}
                                                                            for n, m in ranked]))
            item["rubrics"] = list(dict.fromkeys(item["rubrics"] + rubrics))

        # 1. per rubric, its best-matching features (interleaved so every rubric gets its best first)
        per_rubric = best_matches(live, match, verify_spec.rubrics, verify_spec.features_per_rubric)
        for round_index in range(verify_spec.features_per_rubric):
            picks = [(lst[round_index][0], name, lst[round_index][1]) for name, lst in per_rubric.items()
                     if round_index < len(lst)]
            for _, name, f in sorted(picks, key=lambda t: -t[0]):
                if len(plan) < verify_spec.max_features or f["feature"] in plan:
                    add(f, [name])
        # 2. safety-critical, then content features in triage order, on their best-matching rubrics
        rest = sorted((f for f in live if f["feature"] not in plan and not f["is_artefact"]),
                      key=lambda f: (not bool(screened.get(f["feature"], {}).get("safety_critical")), f["rank"]))
        for f in rest:
            if len(plan) >= verify_spec.max_features:
                break
            ranked = sorted(match[f["feature"]].items(), key=lambda kv: -kv[1])
            add(f, [name for name, _ in ranked[: verify_spec.rubrics_per_feature]])
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


def steered_model(entry, side: str, crosscoder_path: Path | None, loaded_model):
    """The Inspect model serving ``loaded_model`` (registered, so it is never loaded twice); without a
    crosscoder it steers with vectors only."""
    key = share_loaded_model(f"{side}:{entry.id}:{entry.layer}:{id(loaded_model)}", loaded_model)
    return get_model(f"steered/{entry.id}", crosscoder=None if crosscoder_path is None else str(crosscoder_path),
                     side=side, layer=entry.layer, shared=key)


def grading(grader: str, coherence_meter: CoherenceMeter | None) -> tuple[str, CoherenceMeter | None, dict]:
    """``(scorer's grader argument, coherence meter, Inspect model roles)`` for a spec's grader.

    Offline grading needs the caller's ``CoherenceMeter`` (one per model, kept across sweeps so that
    its unsteered baselines are computed once); an LLM grader is the ``grader`` model role.
    """
    if grader == "offline":
        if coherence_meter is None:
            raise ValueError("offline grading needs a CoherenceMeter for the steered model")
        return "offline", coherence_meter, {}
    return "grader", None, {"grader": get_model(grader)}


# The feature id of a baseline sweep's samples: nothing is steered at α = 0, so no feature is read.
BASELINE_FEATURE = -1


def _sweep_task(item: dict, rubrics: list[str], alphas: list[float], spec, meter: CoherenceMeter | None, grader: str):
    v = spec.verify
    # each sweep's log named after its feature, so that `inspect view` tells a group's sweeps apart
    name = (f"verify-unsteered-{item['own_model']}" if item["feature"] == BASELINE_FEATURE
            else f"verify-f{item['feature']}")
    return verify_task([item], rubrics, alphas, grader=grader, coherence_meter=meter, max_tokens=v.max_tokens,
                       temperature=v.temperature, samples_per_prompt=v.samples_per_prompt, max_prompts=v.max_prompts,
                       name=name)


def _graded_sweeps(items: list[dict], alphas: list[float], spec, crosscoder_path: Path, loaded_model, log_dir: Path,
                   rubrics: list[str] | None = None, coherence_meter: CoherenceMeter | None = None) -> list:
    """Run the verify task of each feature ``item`` (all of one model) on its rubrics (or ``rubrics``)
    × ``alphas`` with the spec's generation and grading settings, as one Inspect eval of one task per
    item; the Inspect logs in the order of ``items``, finished or not (see :func:`check_log`).

    The tasks run concurrently: their generation requests share the steered model's micro-batches and
    Inspect's fixed cost per eval is paid once (the demo's verify stage: 72-78 s with groups of five,
    82-85 s with one eval per feature)."""
    if not items:
        return []
    sides = {item["own_model"] for item in items}
    if len(sides) != 1:
        raise ValueError(f"one eval steers one model; these features belong to models {sorted(sides)}")
    side = items[0]["own_model"]
    steered = steered_model(spec.model_entry(side), side, crosscoder_path, loaded_model)
    grader, meter, roles = grading(spec.verify.grader, coherence_meter)
    tasks = [_sweep_task(item, rubrics if rubrics is not None else item["rubrics"], alphas, spec, meter, grader)
             for item in items]
    return run_evals(tasks, log_dir, model=steered, model_roles=roles or None, max_tasks=len(tasks))


def _sweep_result(item: dict, log) -> dict:
    """Rows for the generations, scores and effects tables from one feature's finished sweep."""
    generations, scores = _graded_rows(log)
    effects = feature_effects(scores)
    margins = {m["rubric"]: m["margin"] for m in item.get("rubric_match", [])}
    for effect in effects:  # why this feature was swept on this rubric (None where not measured)
        effect["onset_margin"] = margins.get(effect["rubric"])
    return {"feature": item["feature"], "item": item, "generations": generations, "scores": scores,
            "effects": effects, "eval_log": log.location, "status": log.status}


def _graded_rows(log) -> tuple[list[dict], list[dict]]:
    """``(generations, scores)`` rows of a sweep's log (a feature's, or a null sweep's random directions, whose
    ``feature`` is the draw's number); samples that failed are left out."""
    generations, scores = [], []
    for sample in log.samples or []:
        if sample.error is not None:
            continue
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
    return generations, scores


def run_sweeps(items: list[dict], spec, crosscoder_path: Path, loaded_model, log_dir: Path,
               coherence_meter: CoherenceMeter | None = None,
               on_result: Callable[[dict, dict], None] | None = None) -> list[dict]:
    """Sweep each feature of ``items`` (all of one model) on its rubrics, in one Inspect eval; per
    item, rows for the generations, scores and effects tables.

    ``on_result(item, result)`` is called for each sweep that finished, before ``EvalFailed`` is
    raised for any that did not: one failed sweep does not cost the others of its group."""
    logs = _graded_sweeps(items, list(spec.verify.alphas), spec, crosscoder_path, loaded_model, log_dir,
                          coherence_meter=coherence_meter)
    results, failures = [], []
    for item, log in zip(items, logs, strict=True):
        try:
            check_log(log, f"verify of feature {item['feature']}")
        except EvalFailed as exc:
            failures.append(str(exc))
            continue
        result = _sweep_result(item, log)
        if on_result is not None:
            on_result(item, result)
        results.append(result)
    if failures:
        kept = f" ({len(results)} other sweep{'s' if len(results) > 1 else ''} of this group finished and kept)"
        raise EvalFailed("; ".join(failures) + (kept if results else ""))
    return results


def run_sweep(item: dict, spec, crosscoder_path: Path, loaded_model, log_dir: Path,
              coherence_meter: CoherenceMeter | None = None) -> dict:
    """Sweep one feature on its rubrics; rows for the generations, scores and effects tables."""
    return run_sweeps([item], spec, crosscoder_path, loaded_model, log_dir, coherence_meter)[0]


def run_baseline(side: str, spec, crosscoder_path: Path, loaded_model, log_dir: Path,
                 coherence_meter: CoherenceMeter | None = None) -> dict:
    """One model's unsteered answers to every rubric's topic, control and generic prompts, graded
    like a sweep's: what the model does before any feature is touched, with no dictionary involved
    (rows for the ``baselines`` table)."""
    unsteered = {"feature": BASELINE_FEATURE, "own_model": side, "s_max": 0.0}
    [log] = _graded_sweeps([unsteered], [0.0], spec, crosscoder_path, loaded_model, log_dir,
                           rubrics=list(spec.verify.rubrics), coherence_meter=coherence_meter)
    check_log(log, f"unsteered answers of model {side.upper()}")
    rows = []
    for sample in log.samples or []:
        m = sample.metadata
        score = next(iter(sample.scores.values())) if sample.scores else None
        rows.append({"model": side, "rubric": m["rubric"], "kind": m["kind"], "prompt": m["prompt"], "seed": m["seed"],
                     "answer": sample.output.completion if sample.output else "",
                     "behaviour": score.value.get("behaviour") if score else None,
                     "coherence": score.value.get("coherence") if score else None,
                     "grader": score.metadata.get("grader") if score else None, "eval_log": log.location})
    return {"model": side, "rows": rows, "eval_log": log.location}


def baseline_summary(rows: list[dict]) -> list[dict]:
    """Per rubric and model: mean unsteered behaviour on topic and on control prompts, and the topic
    difference B − A (``None`` where a model was not measured)."""
    cells: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        value = r.get("behaviour")
        if value is not None and not math.isnan(value):
            cells.setdefault((r["rubric"], r["model"], r["kind"]), []).append(value)

    def mean(rubric: str, model: str, kind: str) -> float | None:
        values = cells.get((rubric, model, kind))
        return sum(values) / len(values) if values else None

    out = []
    for rubric in dict.fromkeys(r["rubric"] for r in rows):
        row = {"rubric": rubric, **{f"{m}_{k}": mean(rubric, m, k) for m in ("a", "b") for k in ("topic", "control")}}
        row["difference"] = (row["b_topic"] - row["a_topic"]) if None not in (row["a_topic"], row["b_topic"]) else None
        out.append(row)
    return out


# ---- null sweeps: how often a random push of a verified feature's size passes the same test ----------

def null_vectors(width: int, norm: float, draws: int, key: str) -> torch.Tensor:
    """``[draws, width]`` random directions of length ``norm``, the same for the same ``key`` on every machine."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % (2**63)
    directions = torch.randn(draws, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (directions / directions.norm(dim=1, keepdim=True) * norm).float()


def null_jobs(results: list[dict], crosscoder) -> list[dict]:
    """One null sweep per (model, rubric) on which a feature was verified: ``{"side", "rubric" (its name),
    "rubric_file" (what the spec named), "norm", "features"}``, where ``norm`` is the median size of those
    features' pushes at α = 1 (``s_max · ‖d_j‖``), so a random direction is swept at the same strengths."""
    from crosscoder.steering import steering_vector
    from evals.rubrics import load_rubric

    jobs: dict[tuple[str, str], dict] = {}
    for result in results:
        item = result["item"]
        files = {load_rubric(entry).name: entry for entry in item["rubrics"]}
        for effect in result["effects"]:
            if not effect["verified"]:
                continue
            size = float(steering_vector(crosscoder, item["own_model"], item["feature"], 1.0, item["s_max"]).norm())
            job = jobs.setdefault((item["own_model"], effect["rubric"]), {
                "side": item["own_model"], "rubric": effect["rubric"],
                "rubric_file": files.get(effect["rubric"], effect["rubric"]), "sizes": [], "features": []})
            job["sizes"].append(size)
            job["features"].append(item["feature"])
    out = []
    for job in jobs.values():
        sizes = job.pop("sizes")
        out.append({**job, "norm": statistics.median(sizes)})
    return out


def run_nulls(job: dict, draws: int, spec, crosscoder_path: Path, loaded_model, log_dir: Path, vectors_file: Path,
              coherence_meter: CoherenceMeter | None = None) -> dict:
    """Sweep ``draws`` random directions of the job's size on its rubric, as a feature is swept and graded;
    per draw, its score change, ρ, control change and whether it passes the verify rule. The directions are
    written to ``vectors_file`` (safetensors), which the steered model reads."""
    from safetensors.torch import save_file

    from evals.verify import null_task

    side, v = job["side"], spec.verify
    key = f"{spec.crosscoder.seed}:{side}:{job['rubric']}:{job['norm']:.6g}"
    vectors = null_vectors(loaded_model.d_model, job["norm"], draws, key)
    names = [f"null.{i}" for i in range(draws)]
    save_file({name: vectors[i].contiguous() for i, name in enumerate(names)}, str(vectors_file))
    steered = steered_model(spec.model_entry(side), side, crosscoder_path, loaded_model)
    grader, meter, roles = grading(v.grader, coherence_meter)
    task = null_task(job["rubric_file"], names, str(vectors_file), list(v.alphas), side, grader=grader,
                     coherence_meter=meter, max_tokens=v.max_tokens, temperature=v.temperature,
                     samples_per_prompt=v.samples_per_prompt, max_prompts=v.max_prompts,
                     name=f"verify-null-{side}-{_file_key(job['rubric'])}")
    [log] = run_evals([task], log_dir, model=steered, model_roles=roles or None)
    check_log(log, f"null sweep of model {side.upper()} on {job['rubric']}")
    _, scores = _graded_rows(log)
    draws_out = [{"draw": e["feature"], "effect": e["effect"], "spearman": e["spearman"],
                  "control_effect": e["control_effect"], "coherence_low_alpha": e["coherence_low_alpha"],
                  "verified": e["verified"]} for e in feature_effects(scores)]
    return {**job, "draws": draws_out, "eval_log": log.location}


def _file_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def null_summary(effect: dict, null: dict | None) -> dict:
    """For an effects row, what the null sweep of its model and rubric says (all None when none ran):
    ``null_draws`` swept, ``null_passed`` (how many passed the verify rule: ``null_passed / null_draws``
    estimates how often a push of this size passes by itself, the chance that a verdict like this one is
    a false positive), ``null_max_effect`` (the largest |score change| among those that passed),
    and, for a verified row only (the draws have the verified features' push size): ``null_as_large``, how
    many draws, passing or not, changed the score at least as much as this row (with ``n`` draws,
    ``(null_as_large + 1) / (n + 1)`` is the rank p-value of its change among pushes of its size; a draw
    whose change could not be measured, too few coherent strengths, counts as at least as large, so the
    value errs against the feature), and ``beats_null``: no random direction passed with a change at least
    as large (the sign of a random direction is arbitrary, so sizes are compared). With no draw passing it
    is true whatever the size, so it says little unless ``null_passed`` is read with it."""
    if not null or not null.get("draws"):
        return {"null_draws": None, "null_passed": None, "null_max_effect": None, "null_as_large": None,
                "beats_null": None}
    passed = [abs(d["effect"]) for d in null["draws"] if d["verified"] and measured(d["effect"])]
    size = abs(effect["effect"]) if measured(effect.get("effect")) else 0.0
    as_large = sum(not measured(d["effect"]) or abs(d["effect"]) >= size for d in null["draws"])
    return {"null_draws": len(null["draws"]), "null_passed": len(passed),
            "null_max_effect": max(passed) if passed else None,
            "null_as_large": as_large if effect["verified"] and measured(effect.get("effect")) else None,
            "beats_null": all(p < size for p in passed) if effect["verified"] else None}
