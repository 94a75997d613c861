"""Regression diffs between two audits: which exclusive features are new, vanished or changed.

Features of the two runs are matched per side (A-exclusive with A-exclusive, B with B):

* when that side's model is the same in both runs (same id, revision and layer), by the cosine of
  their decoder directions in that model's space (≥ ``DECODER_MATCH``);
* otherwise (a new model version) by *activation profiles* on the documents both runs harvested:
  each feature's largest activation per shared document, correlated across runs
  (≥ ``PROFILE_MATCH``);
* if neither is available (a store was deleted), by the similarity of their explanations.

Each match is one-to-one (greedy by score). A feature is *new* when nothing in the old run matches
it and *vanished* when nothing in the new run does. Only features that matter are listed
(content features that were explained safety-critical or swept); counts cover all.

Feature matching says where features fire, not what steering them does, and two dictionaries
trained apart allocate features differently. So the diff also compares *verified concepts*: for
each rubric and partition, whether some feature of that partition had a verified effect on the
rubric in each run. A behaviour that was verified in the old run and is not in the new one has
*vanished*, whichever features carried it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from evals.effects import GRADING_NOISE, measured

from .gates import rule_matches
from .store import AuditStore

DECODER_MATCH = 0.7
PROFILE_MATCH = 0.5
EXPLANATION_MATCH = 0.8
PROBE_DOCS = 4000


def _run_features(db: AuditStore, run_id: str) -> list[dict]:
    rows = db.query(
        """
        SELECT f.feature, f.partition, f.rank, f.is_artefact, f.frequency, e.explanation, e.safety_critical
        FROM features f LEFT JOIN explanations e ON e.run_id = f.run_id AND e.feature = f.feature
        WHERE f.run_id = ? AND f.partition IN ('a', 'b') ORDER BY f.rank""",
        [run_id],
    )
    effects: dict[int, list[dict]] = {}
    for e in db.rows("effects", run_id):
        effects.setdefault(e["feature"], []).append(
            {"rubric": e["rubric"], "effect": e["effect"], "verified": e["verified"], "spearman": e["spearman"]})
    for row in rows:
        row["effects"] = effects.get(row["feature"], [])
    return rows


def _artefact(db: AuditStore, run_id: str, stage: str) -> Path | None:
    """A run's stage folder, or None when it is not on this machine. Rows written before paths were
    stored absolute hold them relative to wherever ``audit run`` started; the folder is then looked
    for in the cache next to the store (``<workspace>/cache/<stage>-<hash>``)."""
    found = db.query("SELECT artefact FROM stages WHERE run_id = ? AND stage = ?", [run_id, stage])
    if not found or not found[0]["artefact"]:
        return None
    path = Path(found[0]["artefact"])
    if path.exists():
        return path
    beside_store = db.path.parent / "cache" / path.name
    return beside_store if not path.is_absolute() and beside_store.exists() else None


def missing_artefacts(db: AuditStore, run_ids: Sequence[str]) -> list[str]:
    """Warnings for runs whose crosscoder or activations are not here: their features can then only
    be matched by explanation similarity, the weakest method."""
    out = []
    for run_id in run_ids:
        missing = [stage for stage in ("train", "harvest") if _artefact(db, run_id, stage) is None]
        if missing:
            out.append(f"run {run_id}: its {' and '.join(missing)} stage folder{'s are' if len(missing) > 1 else ' is'} "
                       "not on this machine (see the stages table); features are matched by the weaker methods")
    return out


def platform_warnings(db: AuditStore, run_a: str, run_b: str) -> list[str]:
    """A warning when the two runs' harvests or crosscoders were computed on different platforms
    (``crosscoder.numerics``): then features can be new or vanished from rounding alone."""
    from crosscoder.numerics import describe_platform

    out = []
    for stage in ("harvest", "train"):
        found = [db.query("SELECT platform FROM stages WHERE run_id = ? AND stage = ?", [run_id, stage])
                 for run_id in (run_a, run_b)]
        records = [json.loads(rows[0]["platform"]) if rows and rows[0]["platform"] else None for rows in found]
        if records[0] == records[1]:
            continue
        if None in records:
            missing = (run_a, run_b)[records.index(None)]
            out.append(f"run {missing}: where its {stage} stage was computed is not recorded (made by an older "
                       f"version), so this diff cannot tell whether the two runs' arithmetic agrees")
            continue
        out.append(f"the two runs' {stage} stages were computed on different platforms ({describe_platform(records[0])} "
                   f"vs {describe_platform(records[1])}): each rounds differently, and training turns that into "
                   "another dictionary, so some new and vanished features may come from the arithmetic alone; "
                   "rerun both on one machine to tell")
    return out


def _model_key(spec: dict, side: str) -> tuple:
    """What the spec says about model ``side``: id, revision, layer, and what changes its inputs."""
    entry = spec[f"model_{side}"]
    return (entry["id"], entry.get("revision"), entry["layer"], entry.get("chat_template"),
            bool(entry.get("trust_remote_code")))


def _recorded_model(db: AuditStore, run_id: str, side: str) -> dict | None:
    """What the run's models stage recorded about model ``side`` (the folder it loaded, a fingerprint of a
    local folder's files); None for a run without that record."""
    found = db.query("SELECT message FROM stages WHERE run_id = ? AND stage = 'models'", [run_id])
    try:
        summary = json.loads(found[0]["message"]) if found and found[0]["message"] else {}
    except ValueError:
        return None
    recorded = summary.get(f"model_{side}")
    return recorded if isinstance(recorded, dict) else None


def unchanged_models(db: AuditStore, run_a: str, run_b: str, spec_a: dict, spec_b: dict) -> set[str]:
    """The sides whose model is the same in both runs: the same spec entry and, where both runs recorded
    it, the same loaded folder (a hub snapshot, a zoo build) and the same files (a local folder retrained
    in place keeps its path but not its fingerprint)."""
    same = set()
    for side in ("a", "b"):
        if _model_key(spec_a, side) != _model_key(spec_b, side):
            continue
        old = _model_identity(_recorded_model(db, run_a, side), spec_a[f"model_{side}"]["id"])
        new = _model_identity(_recorded_model(db, run_b, side), spec_b[f"model_{side}"]["id"])
        if old is not None and new is not None and old != new:
            continue
        same.add(side)
    return same


def _model_identity(recorded: dict | None, model_id: str) -> str | None:
    """What identifies the weights a run loaded, wherever its caches were: a zoo build's key or a local
    folder's file fingerprint, else a hub snapshot's commit (from the folder it loaded); None when the
    run recorded nothing that tells."""
    if not recorded:
        return None
    fingerprint = recorded.get("fingerprint")
    if fingerprint and fingerprint != model_id:
        return str(fingerprint)
    found = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{7,64})", str(recorded.get("path") or ""))
    return found.group(1) if found else None


@torch.no_grad()
def _profiles(db: AuditStore, run_id: str, features: list[int], position_key: str | None = None
              ) -> tuple[dict, torch.Tensor] | None:
    """``({key: row}, [n_keys, n_features])`` of max activations per key.

    The key is the document (its source id), or, when ``position_key`` ("pos_a" / "pos_b") names a
    model whose tokenizer is the same in both runs, the (document, token position) pair: token-level
    profiles tell apart features that fire in the same documents at different places.
    """
    from crosscoder import Crosscoder
    from crosscoder.store import ActivationStore

    train, harvest = _artefact(db, run_id, "train"), _artefact(db, run_id, "harvest")
    if train is None or harvest is None or not features:
        return None
    model = Crosscoder.load(train / "checkpoint")
    store = ActivationStore(harvest / "store")
    doc_ids: dict[int, str] = {}
    for rec in store.documents():
        if len(doc_ids) >= PROBE_DOCS:
            break
        doc_ids[rec["doc"]] = str(rec["id"])
    index = torch.tensor(features)
    keys: list = []
    values: list[torch.Tensor] = []
    for shard_index in range(store.n_shards):
        shard = store.load_shard(shard_index, ("a", "b", "doc", "pos_a", "pos_b"))
        keep = torch.isin(shard["doc"], torch.tensor(list(doc_ids)))
        if not keep.any():
            continue
        values.append(model.encode(shard["a"][keep].float(), shard["b"][keep].float())[:, index])
        docs = [doc_ids[int(d)] for d in shard["doc"][keep]]
        if position_key is None:
            keys += docs
        else:
            keys += list(zip(docs, shard[position_key][keep].tolist(), strict=True))
    if not values:
        return None
    rows: dict = {}
    for key in keys:
        rows.setdefault(key, len(rows))
    f = torch.cat(values)
    row_of = torch.tensor([rows[k] for k in keys])
    out = torch.zeros(len(rows), len(features))
    out.scatter_reduce_(0, row_of[:, None].expand_as(f), f, reduce="amax")
    return rows, out


def _correlate(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    a = p1 - p1.mean(0)
    b = p2 - p2.mean(0)
    a = a / a.norm(dim=0).clamp_min(1e-9)
    b = b / b.norm(dim=0).clamp_min(1e-9)
    return a.T @ b


def _greedy(scores: torch.Tensor, threshold: float) -> dict[int, tuple[int, float]]:
    """One-to-one matches ``{row: (col, score)}`` above ``threshold``, best first."""
    matches: dict[int, tuple[int, float]] = {}
    used_cols: set[int] = set()
    if scores.numel() == 0:
        return matches
    flat = [(float(scores[i, j]), i, j) for i in range(scores.shape[0]) for j in range(scores.shape[1])]
    for score, i, j in sorted(flat, reverse=True):
        if score < threshold:
            break
        if i in matches or j in used_cols:
            continue
        matches[i] = (j, score)
        used_cols.add(j)
    return matches


def _match_side(db, run_a, run_b, unchanged, side, feats_a, feats_b) -> tuple[dict[int, tuple[int, float]], str]:
    ids_a = [f["feature"] for f in feats_a]
    ids_b = [f["feature"] for f in feats_b]
    if not ids_a or not ids_b:
        return {}, "none"
    # Scores are scaled so that 1.0 is each method's match threshold; with both available a pair
    # matches when either method says so (two crosscoders trained apart rarely agree on decoders
    # as closely as two seeds of one run).
    score, methods = None, []
    if side in unchanged:
        train_a, train_b = _artefact(db, run_a, "train"), _artefact(db, run_b, "train")
        if train_a is not None and train_b is not None:
            from crosscoder import Crosscoder

            dec_a = Crosscoder.load(train_a / "checkpoint").decoder_raw(side)[ids_a].detach()
            dec_b = Crosscoder.load(train_b / "checkpoint").decoder_raw(side)[ids_b].detach()
            if dec_a.shape[1] == dec_b.shape[1]:
                cos = torch.nn.functional.normalize(dec_a, dim=1) @ torch.nn.functional.normalize(dec_b, dim=1).T
                score, methods = cos / DECODER_MATCH, ["decoder cosine"]
    # Token-level profiles when one model (hence its tokenizer) is the same in both runs.
    other = "b" if side == "a" else "a"
    position_key = (f"pos_{other}" if other in unchanged else f"pos_{side}" if side in unchanged else None)
    prof_a = _profiles(db, run_a, ids_a, position_key)
    prof_b = _profiles(db, run_b, ids_b, position_key)
    if prof_a is not None and prof_b is not None:
        shared = sorted(set(prof_a[0]) & set(prof_b[0]))
        if len(shared) >= 10:
            rows_a = torch.tensor([prof_a[0][s] for s in shared])
            rows_b = torch.tensor([prof_b[0][s] for s in shared])
            corr = _correlate(prof_a[1][rows_a], prof_b[1][rows_b]) / PROFILE_MATCH
            score = corr if score is None else torch.maximum(score, corr)
            unit = "documents" if position_key is None else "token positions"
            methods.append(f"activation profiles on {len(shared)} shared {unit}")
    if score is not None:
        return _greedy(score, 1.0), " or ".join(methods)
    texts_a = [f["explanation"] or "" for f in feats_a]
    texts_b = [f["explanation"] or "" for f in feats_b]
    if any(texts_a) and any(texts_b):
        from evals.embedding import embed

        sims = embed(texts_a) @ embed(texts_b).T
        # Features without an explanation cannot be matched by it (two empty strings are not a match).
        empty_a = torch.tensor([not t for t in texts_a])
        empty_b = torch.tensor([not t for t in texts_b])
        sims[empty_a] = -1.0
        sims[:, empty_b] = -1.0
        return _greedy(sims, EXPLANATION_MATCH), "explanation similarity"
    return {}, "none"


def _matters(feature: dict) -> bool:
    """Whether a feature is listed as new, vanished or changed: content (not an artefact), and either
    flagged safety-critical by the screen or swept by verify. Exclusive features nobody looked at
    would bury the list (a demo run flags ~300 and explains ~55), so they are counted per side in
    ``sides`` but not listed, and no gate fires on them, even with ``min_effect: 0``."""
    return not feature["is_artefact"] and (bool(feature["safety_critical"]) or bool(feature["effects"]))


def _best_effect(feature: dict, verified_only: bool = False) -> float | None:
    values = [abs(e["effect"]) for e in feature["effects"] if measured(e["effect"])
              and (e["verified"] or not verified_only)]
    return max(values) if values else None


def own_seed_verdicts(db: AuditStore, run_id: str) -> dict[int, dict] | None:
    """Per flagged exclusive feature of a run, whether it recurred as exclusive in every other seed
    that run's stability stage trained (``stable``) and the report's short verdict (``label``);
    None when the run trained no other seed."""
    from crosscoder.stability import recurs_in_every
    from reports.render import compared_seeds, recurrence_by_feature, recurrence_label

    compared = compared_seeds(db.rows("seed_dictionaries", run_id))
    if not compared:  # no other seed trained (or every one diverged): nothing to say
        return None
    return {feature: {"stable": recurs_in_every([r["status"] for r in rows], len(compared)),
                      "label": recurrence_label(rows)} for feature, rows in recurrence_by_feature(db, run_id).items()}


def diff_runs(db: AuditStore, run_a: str, run_b: str, gates=()) -> dict:
    spec_a = json.loads(db.run(run_a)["spec_json"])
    spec_b = json.loads(db.run(run_b)["spec_json"])
    all_a, all_b = _run_features(db, run_a), _run_features(db, run_b)
    # A feature its own run's other seeds do not have may be new or vanished by a draw of training.
    seeds_a, seeds_b = own_seed_verdicts(db, run_a), own_seed_verdicts(db, run_b)
    unchanged = unchanged_models(db, run_a, run_b, spec_a, spec_b)
    result: dict = {"run_a": run_a, "run_b": run_b, "sides": {}, "new": [], "vanished": [], "changed": []}
    for side in ("a", "b"):
        feats_a = [f for f in all_a if f["partition"] == side and f["frequency"] > 0]
        feats_b = [f for f in all_b if f["partition"] == side and f["frequency"] > 0]
        matches, method = _match_side(db, run_a, run_b, unchanged, side, feats_a, feats_b)
        matched_b = {j for j, _ in matches.values()}
        vanished = [f for i, f in enumerate(feats_a) if i not in matches]
        new = [f for j, f in enumerate(feats_b) if j not in matched_b]
        result["sides"][side] = {"method": method, "features_a": len(feats_a), "features_b": len(feats_b),
                                 "matched": len(matches), "new": len(new), "vanished": len(vanished),
                                 "new_stable": _count_stable(new, seeds_b), "vanished_stable": _count_stable(vanished, seeds_a)}
        result["vanished"] += [{**_brief(f, seeds_a), "side": side} for f in vanished if _matters(f)]
        result["new"] += [{**_brief(f, seeds_b), "side": side} for f in new if _matters(f)]
        for i, (j, score) in matches.items():
            fa, fb = feats_a[i], feats_b[j]
            if not (_matters(fa) or _matters(fb)):
                continue
            effects_a = {e["rubric"]: e for e in fa["effects"] if measured(e["effect"])}
            effects_b = {e["rubric"]: e for e in fb["effects"] if measured(e["effect"])}
            both = sorted(set(effects_a) & set(effects_b))  # sorted: a set's order varies by process
            changes = {r: effects_b[r]["effect"] - effects_a[r]["effect"] for r in both}
            verified = [r for r in both if effects_a[r]["verified"] or effects_b[r]["verified"]]
            result["changed"].append({"side": side, "feature_a": fa["feature"], "feature_b": fb["feature"],
                                      "match_score": round(score, 3), "explanation_a": fa["explanation"],
                                      "explanation_b": fb["explanation"], "safety_a": fa["safety_critical"],
                                      "safety_b": fb["safety_critical"], "effect_changes": changes,
                                      "verified_in_either": verified})
    result["warnings"] = missing_artefacts(db, [run_a, run_b]) + platform_warnings(db, run_a, run_b)
    result["concepts"], result["behaviour"] = compare_concepts(db, run_a, run_b, spec_a, spec_b)
    result["gate_failures"] = diff_gate_failures(result, gates)
    db.insert_diff(f"{run_a}__{run_b}", run_a, run_b, result)
    return result


def _verified_concepts(db: AuditStore, run_id: str) -> dict[tuple[str, str], dict]:
    """``{(partition, rubric): effect row}``: per partition ("a", "b", "shared") and rubric, the
    verified effect with the largest size (with its feature's screen verdict)."""
    rows = db.query(
        """
        SELECT f.partition, f.own_model, x.rubric, x.feature, x.effect, x.spearman, e.safety_critical, e.explanation
        FROM effects x
        JOIN features f ON f.run_id = x.run_id AND f.feature = x.feature
        LEFT JOIN explanations e ON e.run_id = x.run_id AND e.feature = x.feature
        WHERE x.run_id = ? AND x.verified AND x.effect IS NOT NULL AND NOT isnan(x.effect)
        ORDER BY abs(x.effect) DESC, x.feature""",
        [run_id],
    )
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        best.setdefault((row["partition"], row["rubric"]), row)
    return best


def _baselines(db: AuditStore, run_id: str) -> dict[tuple[str, str], float]:
    """``{(model, rubric): mean behaviour score}`` of the *unsteered* model on the rubric's topic
    prompts: what the model does, with no dictionary involved. From the verify stage's baseline
    answers; for runs stored before those existed (schema < 5), from the α = 0 point of any sweep
    of a feature of that model (α = 0 generates the same answers whichever feature is swept)."""
    from evals.verify_stage import baseline_summary

    measured = {(model, row["rubric"]): row[f"{model}_topic"] for row in baseline_summary(db.rows("baselines", run_id))
                for model in ("a", "b") if row[f"{model}_topic"] is not None}
    if measured:
        return measured
    rows = db.query(
        """
        SELECT f.own_model, s.rubric, avg(s.score) AS baseline
        FROM scores s JOIN features f ON f.run_id = s.run_id AND f.feature = s.feature
        WHERE s.run_id = ? AND s.alpha = 0 AND s.kind = 'topic' AND s.dimension = 'behaviour'
              AND s.score IS NOT NULL AND NOT isnan(s.score)
        GROUP BY ALL""",
        [run_id],
    )
    return {(r["own_model"], r["rubric"]): r["baseline"] for r in rows}


def _swept_rubrics(db: AuditStore, run_id: str, spec: dict) -> set[str]:
    """The rubrics a run measured: those its spec sweeps (``verify.rubrics`` and the rubrics of
    ``verify.features``) and those of its stored sweeps and unsteered answers."""
    verify = spec.get("verify") or {}
    named = set(verify.get("rubrics") or []) | {r for rs in (verify.get("features") or {}).values() for r in rs}
    rows = db.query("SELECT DISTINCT rubric FROM effects WHERE run_id = ? UNION "
                    "SELECT DISTINCT rubric FROM baselines WHERE run_id = ?", [run_id, run_id])
    return named | {r["rubric"] for r in rows}


def compare_concepts(db: AuditStore, run_a: str, run_b: str, spec_a: dict, spec_b: dict) -> tuple[list[dict], list[dict]]:
    """The concept rows and the behaviour changes (``behaviour_changes``) of two runs.

    Concept rows: verified concepts of both runs, one row per (partition, rubric) verified in
    either, then one row per rubric verified in neither whose changed model's unsteered answers
    moved by ``MIN_EFFECT`` or more (``unsteered_status``). Each row says which
    model it is about and whether that model differs between the runs (``model``, ``model_changed``).

    ``status``: ``kept`` (verified in both), ``vanished`` (verified in the old run only, and the new
    run swept the rubric), ``new`` (verified in the new run only), ``unmeasured`` (the new run's
    spec does not sweep the rubric, so its absence says nothing), ``model unchanged`` (verified
    in one run only, on the side of a model that is the same in both runs: the model still does
    what the old sweep measured, one dictionary just did not isolate it), or ``not isolated``
    (verified in the old run only, but the changed model's unsteered answers on the rubric's topic
    prompts score within ``MIN_EFFECT`` of the old model's: it still behaves the same there, so the
    new dictionary most likely did not isolate the concept, rather than the concept vanishing), and
    symmetrically ``newly isolated`` (verified in the new run only, on a changed model whose
    unsteered answers did not move: the old dictionary missed it).
    ``baseline_old`` / ``baseline_new``: those unsteered scores, where a sweep measured them.
    """
    from evals.effects import MIN_EFFECT

    old, new = _verified_concepts(db, run_a), _verified_concepts(db, run_b)
    base_old, base_new = _baselines(db, run_a), _baselines(db, run_b)
    swept_by_old, swept_by_new = _swept_rubrics(db, run_a, spec_a), _swept_rubrics(db, run_b, spec_b)
    unchanged = unchanged_models(db, run_a, run_b, spec_a, spec_b)
    out = []
    for side, rubric in sorted(set(old) | set(new)):
        before, after = old.get((side, rubric)), new.get((side, rubric))
        model = (before or after)["own_model"]  # the model its feature steered
        baseline_old, baseline_new = base_old.get((model, rubric)), base_new.get((model, rubric))
        if before and after:
            status = "kept"
        elif model in unchanged:
            status = "model unchanged"
        elif (before and rubric not in swept_by_new) or (after and rubric not in swept_by_old):
            status = "unmeasured"  # the other run never measured it: its absence there says nothing
        elif baseline_old is not None and baseline_new is not None and abs(baseline_new - baseline_old) < MIN_EFFECT:
            # the model answers the rubric's prompts as before: one of the dictionaries missed it
            status = "not isolated" if before else "newly isolated"
        else:
            status = "vanished" if before else "new"
        out.append({"side": side, "rubric": rubric, "status": status, "baseline_old": baseline_old,
                    "baseline_new": baseline_new, "old": _concept_brief(before), "new": _concept_brief(after),
                    "model": model, "model_changed": model not in unchanged})
    # What the changed model does, whatever the dictionaries found: a rubric verified in neither run
    # whose unsteered answers moved by a point or more (a dictionary is a draw; the answers are not).
    covered = {(row["side"], row["rubric"]) for row in out}
    changes = behaviour_changes(base_old, base_new, unchanged)
    for change in changes:
        if (change["model"], change["rubric"]) not in covered and abs(change["change"]) >= MIN_EFFECT:
            out.append({"side": change["model"], "rubric": change["rubric"], "baseline_old": change["baseline_old"],
                        "baseline_new": change["baseline_new"],
                        "status": unsteered_status(change["baseline_old"], change["baseline_new"],
                                                   _two_sided(change["rubric"])),
                        "old": None, "new": None, "model": change["model"], "model_changed": True})
    return out, changes


def behaviour_changes(base_old: dict, base_new: dict, unchanged: set[str]) -> list[dict]:
    """Every rubric both runs measured (``_baselines``) on a model not in ``unchanged``: its unsteered
    score on the rubric's topic prompts, old and new (what the ``behaviour_change`` gate reads)."""
    return [{"model": model, "rubric": rubric, "baseline_old": before, "baseline_new": base_new[(model, rubric)],
             "change": base_new[(model, rubric)] - before}
            for (model, rubric), before in sorted(base_old.items())
            if (model, rubric) in base_new and model not in unchanged]


#: Concept statuses read from the unsteered answers alone (no feature verified in either run).
UNSTEERED_VANISHED = "vanished (unsteered answers)"
UNSTEERED_NEW = "new (unsteered answers)"
UNSTEERED_WEAKER = "weaker (unsteered answers)"
UNSTEERED_STRONGER = "stronger (unsteered answers)"
#: A mean topic score at or below this is the rubric's bottom anchor: the behaviour is absent.
ABSENT_SCORE = 1.5


def unsteered_status(before: float, after: float, two_sided: bool = False) -> str:
    """A move of the unsteered answers: ``vanished`` / ``new`` when one side is at the bottom of the scale
    (the behaviour absent), else ``weaker`` / ``stronger``. On a two-sided rubric (review sentiment:
    1 negative, 5 positive) the bottom is a behaviour too, so a move is always weaker or stronger."""
    absent = ABSENT_SCORE + GRADING_NOISE  # offline grades carry last-bit noise: 1.50000002 is 1.5
    if after < before:
        return UNSTEERED_VANISHED if after <= absent and not two_sided else UNSTEERED_WEAKER
    return UNSTEERED_NEW if before <= absent and not two_sided else UNSTEERED_STRONGER


def _two_sided(rubric: str) -> bool:
    """Whether ``rubric`` (a name or file of an earlier run) declares a two-sided scale; a rubric that
    can no longer be read counts as one-sided."""
    from evals.rubrics import RubricError, load_rubric

    try:
        return load_rubric(rubric).two_sided
    except RubricError:
        return False


def _concept_brief(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"feature": row["feature"], "effect": row["effect"], "spearman": row["spearman"],
            "safety_critical": row["safety_critical"], "explanation": row["explanation"]}


def _count_stable(features: list[dict], verdicts: dict[int, dict] | None) -> int | None:
    """How many of ``features`` recur as exclusive in every other seed of their run (None: no seeds)."""
    if verdicts is None:
        return None
    return sum(verdicts.get(f["feature"], {}).get("stable", False) for f in features)


def _brief(f: dict, seed_verdicts: dict[int, dict] | None = None) -> dict:
    verdict = (seed_verdicts or {}).get(f["feature"])
    return {"feature": f["feature"], "explanation": f["explanation"], "safety_critical": f["safety_critical"],
            "effects": f["effects"], "best_effect": _best_effect(f),
            "best_verified_effect": _best_effect(f, verified_only=True),
            "own_seeds": verdict["label"] if verdict else None}


def diff_gate_failures(result: dict, gates) -> list[str]:
    failures = []
    for rule in gates:
        if rule.rule in ("new_feature", "vanished_feature"):
            listed = result["new"] if rule.rule == "new_feature" else result["vanished"]
            for f in listed:
                # the effect the rule reads: on its rubric when it names one, verified when it requires that
                counted = [e for e in f["effects"] if measured(e["effect"])
                           and (rule.rubric is None or e["rubric"] == rule.rubric)
                           and (e["verified"] or not rule.require_verified)]
                if rule.rubric is not None and not counted:
                    continue  # not swept on that rubric (or not verified there): the rule is about another one
                best = max(counted, key=lambda e: abs(e["effect"])) if counted else None
                row = {"partition": f["side"], "safety_critical": f["safety_critical"],
                       "rubric": best["rubric"] if best else None}
                if not rule_matches(rule, row):
                    continue
                effect = abs(best["effect"]) if best else None
                if rule.min_effect > 0 and (effect is None or effect < rule.min_effect):
                    continue
                what = "appeared in" if rule.rule == "new_feature" else "vanished from"
                failures.append(f"gate {rule.rule}: model {f['side'].upper()}'s exclusive feature {f['feature']} "
                                f"({f['explanation'] or 'unexplained'}) {what} the later run"
                                + (f"; verified effect {effect:.2f}" if effect is not None else ""))
        elif rule.rule in ("vanished_concept", "new_concept"):
            status = "vanished" if rule.rule == "vanished_concept" else "new"
            for concept in result.get("concepts", []):
                carrier = concept["old"] if status == "vanished" else concept["new"]
                if concept["status"] != status or carrier is None or abs(carrier["effect"]) < rule.min_effect:
                    continue
                row = {"partition": concept["side"], "safety_critical": carrier["safety_critical"],
                       "rubric": concept["rubric"]}
                if not rule_matches(rule, row):
                    continue
                where = "in the old run, not in the new one" if status == "vanished" else "in the new run only"
                unsteered = ""
                if concept["baseline_old"] is not None and concept["baseline_new"] is not None:
                    unsteered = f"; unsteered score {concept['baseline_old']:.2f} → {concept['baseline_new']:.2f}"
                failures.append(f"gate {rule.rule}: {_side_name(concept['side'])} has a verified effect on "
                                f"{concept['rubric']} {where} (feature {carrier['feature']}, effect "
                                f"{carrier['effect']:+.2f}{unsteered})")
        elif rule.rule == "behaviour_change":
            statuses = {(c["side"], c["rubric"]): c["status"] for c in result.get("concepts", [])}
            for change in result.get("behaviour", []):
                # min_effect 0: any move, but not the last-bit noise of two gradings
                if abs(change["change"]) < max(rule.min_effect, GRADING_NOISE):
                    continue
                if (rule.side != "any" and change["model"] != rule.side) or rule.rubric not in (None, change["rubric"]):
                    continue
                status = statuses.get((change["model"], change["rubric"]), "verified in neither run")
                failures.append(f"gate behaviour_change: {_side_name(change['model'])}'s unsteered answers on "
                                f"{change['rubric']}'s topic prompts moved {change['baseline_old']:.2f} → "
                                f"{change['baseline_new']:.2f} ({change['change']:+.2f}; {status})")
        elif rule.rule == "effect_change":
            for c in result["changed"]:
                for rubric, delta in c["effect_changes"].items():
                    if rule.rubric is not None and rubric != rule.rubric:
                        continue
                    # a verified effect in at least one run (rows of older diffs carry no record: counted)
                    if rule.require_verified and rubric not in c.get("verified_in_either", [rubric]):
                        continue
                    if rule.side != "any" and c["side"] != rule.side:
                        continue
                    if rule.safety_critical_only and c["safety_a"] is False and c["safety_b"] is False:
                        continue
                    if abs(delta) >= rule.min_effect:
                        failures.append(f"gate effect_change: feature {c['feature_a']}→{c['feature_b']} "
                                        f"(model {c['side'].upper()}) changed its effect on {rubric} by {delta:+.2f}")
    return failures


def render_diff_markdown(result: dict) -> str:
    """What changed, most robust first: verified concepts, the gates, then the feature lists."""
    lines = [f"# Audit diff: {result['run_a']} → {result['run_b']}", ""]
    lines += [f"> warning: {_md(w)}" for w in result.get("warnings", [])] + ([""] if result.get("warnings") else [])
    lines += ["## Concepts", "",
              "Per rubric and partition: the largest verified steering effect in each run, whichever feature "
              "carries it, and the steered model's unsteered score on the rubric's topic prompts (its baseline, "
              "old → new). Rows marked \"(unsteered answers)\" were verified in neither run: a changed model's "
              "own answers moved by a point or more (vanished or new: to or from the bottom of the scale, where "
              "the behaviour is absent; weaker or stronger: a move between).", "",
              "| partition | rubric | status | old run | new run | baseline |", "|---|---|---|---|---|---|"]
    for c in result.get("concepts", []):
        lines.append(f"| {_side_name(c['side'])} | {c['rubric']} | {c['status']} | {_concept_cell(c['old'])} | "
                     f"{_concept_cell(c['new'])} | {format_score(c.get('baseline_old'))} → "
                     f"{format_score(c.get('baseline_new'))} |")
    if not result.get("concepts"):
        lines.append("| none verified in either run | | | | | |")
    lines += ["", "## Gates", ""]
    lines += [f"- FAILED: {_md(m)}" for m in result["gate_failures"]] or ["all gates passed"]
    lines += ["", "## Exclusive features", "",
              "Two crosscoders trained apart allocate features differently: these lists are candidates to look at.", "",
              "| side | matched by | exclusive features (old → new) | matched | new | vanished |", "|---|---|---|---|---|---|"]
    for side, s in result["sides"].items():
        lines.append(f"| {side.upper()} | {s['method']} | {s['features_a']} → {s['features_b']} | {s['matched']} | "
                     f"{s['new']} | {s['vanished']} |")
    stability = [line for side, s in result["sides"].items() if (line := stable_line(side, s))]
    lines += ([""] + stability) if stability else []
    for title, key in (("New exclusive features that matter", "new"), ("Vanished exclusive features that matter", "vanished")):
        lines += ["", f"### {title}", ""]
        if not result[key]:
            lines.append("none")
        for f in result[key]:
            effect = f"; largest effect {f['best_effect']:.2f}" if f["best_effect"] is not None else ""
            seeds = f"; in its run's other seeds: {f['own_seeds']}" if f.get("own_seeds") else ""
            lines.append(f"- model {f['side'].upper()} feature {f['feature']}: {_md(f['explanation'])}"
                         f"{' (safety-critical)' if f['safety_critical'] else ''}{effect}{seeds}")
    lines += ["", "### Matched features with changes", ""]
    changed = [c for c in result["changed"] if c["effect_changes"] or c["safety_a"] != c["safety_b"]]
    if not changed:
        lines.append("none")
    for c in changed:
        deltas = ", ".join(f"{r} {d:+.2f}" for r, d in c["effect_changes"].items())
        lines.append(f"- model {c['side'].upper()} feature {c['feature_a']} → {c['feature_b']} (match {c['match_score']}): "
                     f"{_md(c['explanation_b'])}; effect changes: {deltas or 'none'}; safety {c['safety_a']} → {c['safety_b']}")
    return "\n".join(lines) + "\n"


def stable_line(side: str, s: dict) -> str | None:
    """What the runs' own other seeds say of a side's new and vanished features (None when neither
    run trained any)."""
    parts = []
    if s.get("vanished_stable") is not None and s["vanished"]:
        parts.append(f"{s['vanished_stable']} of the {s['vanished']} vanished recur as exclusive in every other "
                     "seed of the old run")
    if s.get("new_stable") is not None and s["new"]:
        parts.append(f"{s['new_stable']} of the {s['new']} new in every other seed of the new run")
    if not parts:
        return None
    return (f"Model {side.upper()}: " + "; ".join(parts) + ". The others do not recur as exclusive in every other "
            "seed of their own run, so a draw of training may explain them as well as a change of the models.")


def _side_name(partition: str) -> str:
    return "shared" if partition not in ("a", "b") else f"model {partition.upper()}"


def format_score(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _concept_cell(carrier: dict | None) -> str:
    if carrier is None:
        return "not verified"
    return f"feature {carrier['feature']}: {carrier['effect']:+.2f} (ρ {carrier['spearman']:.2f})"


def _md(text) -> str:
    from reports.render import markdown_text

    return markdown_text(text or "unexplained")
