"""Render a run from the DuckDB store into one self-contained HTML report and a Markdown summary.

The HTML file carries its plots inline (PNG as data URIs) and no scripts, so it works offline and
can be attached to a ticket. Every text that came from a model or a dataset goes through Jinja's
autoescaping; the ``<<active>>`` markers of contexts are turned into ``<mark>`` only *after*
escaping, so a generation containing ``<script>`` renders as text.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import statistics
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from evals.effects import (
    ARMS,
    CONTROL_ARMS,
    CONTROL_SPEARMAN,
    HOLD_SPEARMAN,
    MIN_EFFECT,
    coherent_alphas,
    coherent_topic_scores,
    control_rho,
    failed_conditions,
    swept_controls,
    trait_is_specific,
    transfer_failures,
    transfer_holds,
)

TEMPLATE_DIR = Path(__file__).parent / "templates"
# a marked token's own trailing ">" ("<s>", "->") belongs to it, not to the closing mark
_MARK = re.compile(r"&lt;&lt;(.*?(?:&gt;)*)&gt;&gt;", re.DOTALL)


def highlight(text: str | None) -> Markup:
    """Escape ``text`` and show its ``<<marked>>`` tokens highlighted."""
    escaped = str(escape(text or ""))
    return Markup(_MARK.sub(_mark, escaped))


def _mark(match: re.Match) -> str:
    token = match.group(1)
    if token.strip():
        return f"<mark>{token}</mark>"
    # A whitespace token (often the newline that opens an assistant turn) gets a visible sign.
    shown = token.replace(" ", "␣").replace("\t", "⇥").replace("\n", "⏎")
    return f"<mark>{shown}</mark>" + ("\n" if "\n" in token else "")


def markdown_text(value) -> str:
    """Untrusted text for a Markdown table cell: no HTML or entities, no links or images, no strikethrough,
    no cell breaks (any line break, ``\\r`` included, becomes a space). Underscores stay (names like
    ``zoo_state_narrative`` read as written; GitHub never emphasises inside a word)."""
    text = re.sub(r"\r\n|[\r\n\v\f\u2028\u2029\x85]", " ", str(value or ""))
    text = text.replace("&", "&amp;")  # a stored "&lt;" shows as written, not as "<"
    for char in "\\`*[]()!|<>~":
        text = text.replace(char, "\\" + char)
    return text


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(width: float = 5.0, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def relative_norm_plot(relative_norms: list[float]) -> str | None:
    relative_norms = [r for r in relative_norms if r is not None and not _nan(r)]  # a feature writing nothing
    if not relative_norms:
        return None
    fig, ax = _figure()
    ax.hist(relative_norms, bins=50, color="#4a6fa5")
    ax.set_xlabel("relative decoder norm |d_A| / (|d_A| + |d_B|)")
    ax.set_ylabel("features")
    ax.set_yscale("log")
    ax.set_title("0: only in model B · 0.5: shared · 1: only in model A", fontsize=9)
    return _png(fig)


def exclusivity_plot(features: list[dict]) -> str | None:
    values = [f["exclusivity"] for f in features if f.get("exclusivity") is not None and f["frequency"] > 0]
    if not values:
        return None
    fig, ax = _figure()
    ax.hist([min(v, 2.0) for v in values], bins=30, color="#a55a4a")
    ax.set_xlabel("exclusivity check: variance explained in the other model / own model (clipped at 2)")
    ax.set_ylabel("flagged features")
    return _png(fig)


def recurrence_plot(rows: list[dict], threshold: float) -> str | None:
    """Per flagged exclusive feature and other seed, the decoder cosine of its closest counterpart
    there: exclusive to the same model, and of any partition (``threshold`` marked)."""
    if not rows:
        return None
    same = [r["exclusive_cosine"] for r in rows if not _nan(r["exclusive_cosine"])]
    anywhere = [r["nearest_cosine"] for r in rows if not _nan(r["nearest_cosine"])]
    fig, ax = _figure()
    bins = [i / 40 for i in range(-4, 41)]
    ax.hist(anywhere, bins=bins, color="#b0b0b0", label="closest feature, any partition")
    ax.hist(same, bins=bins, color="#4a8a5a", alpha=0.8, label="closest feature exclusive to the same model")
    ax.axvline(threshold, color="#c0392b", linestyle="--", linewidth=1)
    ax.set_xlim(min([0.0, *same, *anywhere]), 1.0)
    ax.set_xlabel("decoder cosine of the closest feature in another seed's dictionary")
    ax.set_ylabel("exclusive features × seeds")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


RECURRENCE_WORDS = {"exclusive": "exclusive", "shared": "shared", "other-exclusive": "the other model's",
                    "absent": "absent"}


def recurrence_by_feature(db, run_id: str) -> dict[int, list[dict]]:
    """A run's ``recurrence`` rows per feature, one per other seed in seed order."""
    grouped: dict[int, list[dict]] = {}
    for row in db.rows("recurrence", run_id, order="feature, seed"):
        grouped.setdefault(row["feature"], []).append(row)
    return grouped


def compared_seeds(dictionaries: list[dict]) -> list[int]:
    """The other seeds whose dictionary was compared (``seed_dictionaries`` rows): a diverged seed has none."""
    return [d["seed"] for d in dictionaries if d.get("status") != "diverged"]


def cosine_text(value: float) -> str:
    """A decoder cosine with two decimals, rounded down: a cosine of 0.8956 reads 0.89, not 0.90, next to
    a recurrence threshold of 0.9 that it misses."""
    return f"{math.floor(value * 100 + 1e-9) / 100:.2f}"


def recurrence_label(rows: list[dict]) -> str:
    """A short verdict over the other seeds, e.g. "exclusive 1/2, shared 1/2" ("" when not measured)."""
    if not rows:
        return ""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if counts.get("absent") == len(rows):
        closest = max((r["nearest_cosine"] for r in rows if not _nan(r["nearest_cosine"])), default=None)
        seeds = sorted(r["seed"] for r in rows if r.get("seed") is not None)
        where = (f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if len(seeds) == len(rows)
                 else f"any of {len(rows)} other seeds")
        return f"not found in {where}" + (f" (closest decoder cosine {cosine_text(closest)})" if closest is not None
                                          else "")
    return ", ".join(f"{RECURRENCE_WORDS.get(status, status)} {counts[status]}/{len(rows)}"
                     for status in RECURRENCE_WORDS if status in counts and status != "absent")


def recurrence_details(rows: list[dict]) -> list[str]:
    """One phrase per other seed: where this feature's direction is in that dictionary."""
    out = []
    for r in rows:
        side = (r["own_model"] or "?").upper()
        if r["exclusive_feature"] is not None:
            same = f"closest {side}-exclusive: {r['exclusive_feature']} ({cosine_text(r['exclusive_cosine'])})"
        elif _nan(r["exclusive_cosine"]):
            same = f"no {side}-exclusive features"
        else:
            same = f"no {side}-exclusive feature points the same way"
        nearest = {"a": "A-exclusive", "b": "B-exclusive"}.get(r["nearest_partition"], "shared")
        if r["status"] == "exclusive":
            out.append(f"seed {r['seed']}: recurs as {side}-exclusive feature {r['exclusive_feature']} "
                       f"(cosine {cosine_text(r['exclusive_cosine'])})")
        elif r["status"] in ("shared", "other-exclusive"):
            out.append(f"seed {r['seed']}: recurs as {nearest} feature {r['nearest_feature']} (cosine "
                       f"{cosine_text(r['nearest_cosine'])}); {same}")
        elif r["nearest_feature"] is None:
            out.append(f"seed {r['seed']}: not found (no feature there points the same way)")
        elif r["nearest_feature"] == r["exclusive_feature"]:
            out.append(f"seed {r['seed']}: not found (closest: {nearest} {r['nearest_feature']}, cosine "
                       f"{cosine_text(r['nearest_cosine'])})")
        else:
            out.append(f"seed {r['seed']}: not found (closest: {nearest} {r['nearest_feature']}, cosine "
                       f"{cosine_text(r['nearest_cosine'])}; {same})")
    return out


def baseline_plot(rows: list[dict]) -> str | None:
    """Each model's unsteered score per rubric on its topic prompts (bars) and control prompts (ticks)."""
    rows = [r for r in rows if r["a_topic"] is not None or r["b_topic"] is not None]
    if not rows:
        return None
    fig, ax = _figure(width=max(4.0, 1.1 * len(rows) + 1.5), height=3.0)
    for offset, model, colour in ((-0.2, "a", "#4a6fa5"), (0.2, "b", "#a55a4a")):
        xs = [i + offset for i in range(len(rows))]
        ax.bar(xs, [(r[f"{model}_topic"] or 0) for r in rows], width=0.38, color=colour,
               label=f"model {model.upper()}, topic prompts")
        controls = [(x, r[f"{model}_control"]) for x, r in zip(xs, rows, strict=True) if r[f"{model}_control"] is not None]
        ax.scatter([x for x, _ in controls], [c for _, c in controls], marker="_", s=200, color="black",
                   label="control prompts" if model == "a" else None)
    ax.set_xticks(range(len(rows)), [r["rubric"].removeprefix("zoo_") for r in rows], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylim(0.9, 5.1)  # a score of 1 still shows as a stub
    ax.set_ylabel("rubric score, unsteered")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    return _png(fig)


def dose_response_plot(effect: dict) -> str | None:
    curve = effect["curve"] if isinstance(effect["curve"], list) else json.loads(effect["curve"])
    if not curve:
        return None
    fig, ax = _figure(5.5, 3.2)
    styles = {("topic", "behaviour"): ("#c0392b", "-", "o", "rubric, topic prompts"),
              ("control", "behaviour"): ("#c0392b", ":", "s", "rubric, control prompts"),
              ("topic", "coherence"): ("#2c7fb8", "-", "o", "coherence, topic prompts"),
              ("generic", "behaviour"): ("#7f7f7f", "--", "^", "rubric, generic prompt")}
    for (kind, dimension), (color, line, marker, label) in styles.items():
        points = [c for c in curve if c["kind"] == kind and c["dimension"] == dimension and not _nan(c["mean"])]
        if not points:
            continue
        ax.errorbar([p["alpha"] for p in points], [p["mean"] for p in points], yerr=[p["se"] or 0 for p in points],
                    color=color, linestyle=line, marker=marker, capsize=3, label=label)
    # Grey bands: strengths at which the steered answers are incoherent (mean coherence < 3); the
    # verified rule reads the dose-response outside them.
    incoherent = [c["alpha"] for c in curve if c["kind"] == "topic" and c["dimension"] == "coherence"
                  and not _nan(c["mean"]) and c["mean"] < 3]
    for i, alpha in enumerate(incoherent):
        ax.axvspan(alpha - 0.2, alpha + 0.2, color="#999999", alpha=0.2, linewidth=0,
                   label="incoherent answers" if i == 0 else None)
    ax.set_ylim(0.8, 5.2)
    ax.set_xlabel("steering strength α (× s_max)")
    ax.set_ylabel("score (1–5)")
    ax.axvline(0, color="#bbbbbb", linewidth=0.8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the data
    ax.set_title(f"{effect['rubric']}", fontsize=9)
    return _png(fig)


def transfer_plot(trait: str, direction: str, arms: list[dict]) -> str | None:
    fig, ax = _figure(5.5, 3.2)
    styles = {"source": ("#2c7fb8", "-", "o"), "transferred": ("#c0392b", "-", "s"),
              "random_transferred": ("#7f7f7f", ":", "^"), "unrelated": ("#7f7f7f", "--", "v")}
    source, target = direction.split("_to_")
    drawn = False
    for arm in arms:
        points = [c for c in _json_list(arm["curve"]) if c["kind"] == "topic" and c["dimension"] == "behaviour"
                  and not _nan(c["mean"])]
        if not points:
            continue
        color, line, marker = styles.get(arm["arm"], ("black", "-", "."))
        model = source if arm["arm"] == "source" else target
        ax.errorbar([p["alpha"] for p in points], [p["mean"] for p in points], yerr=[p["se"] or 0 for p in points],
                    color=color, linestyle=line, marker=marker, capsize=3,
                    label=f"{arm['arm'].replace('_', ' ')} (model {model.upper()})")
        drawn = True
    if not drawn:
        return None
    ax.set_ylim(0.8, 5.2)
    ax.set_xlabel("steering strength α (× the arm's vector, whose norm the table gives)")
    ax.set_ylabel("rubric score (1–5)")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{trait}: {source.upper()} → {target.upper()}", fontsize=9)
    return _png(fig)


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _json_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else json.loads(value)


def gather(db, run_id: str, examples_alpha: float | None = None) -> dict:
    """Everything the templates show, from the store."""
    run = db.run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r} in {db.path}; `audit runs` lists the runs")
    spec = json.loads(run["spec_json"])
    metrics = (db.rows("crosscoder_metrics", run_id) or [None])[0]
    features = db.rows("features", run_id, order="rank")
    contexts: dict[int, list[dict]] = {}
    for c in db.rows("contexts", run_id, order="feature, rank"):
        contexts.setdefault(c["feature"], []).append(c)
    explanations = {e["feature"]: e for e in db.rows("explanations", run_id)}
    effects = db.rows("effects", run_id)
    generations = db.rows("generations", run_id, order="feature, rubric, kind, prompt, alpha")
    # each answer's grades, shown next to it on the cards
    grades = {(r["feature"], r["rubric"], r["kind"], r["prompt"], r["alpha"], r["seed"], r["dimension"]): r["score"]
              for r in db.rows("scores", run_id)}
    graders = sorted({row["grader"] for row in db.query(
        "SELECT DISTINCT grader FROM scores WHERE run_id = ? AND grader IS NOT NULL", [run_id])})
    explainers = sorted({e["explainer"] for e in explanations.values() if e["explainer"]})
    recurrence = recurrence_by_feature(db, run_id)
    labels = {feature: recurrence_label(rows) for feature, rows in recurrence.items()}
    stability = stability_overview(db, run_id, spec, recurrence)
    detectors = sorted({e["detector"] for e in explanations.values() if e["detector"]})

    by_feature_effects: dict[int, list[dict]] = {}
    for e in effects:
        e = dict(e)
        e["curve"] = _json_list(e["curve"])
        e["why_not"] = why_not(e)
        e["span"] = effect_span(e["curve"])
        by_feature_effects.setdefault(e["feature"], []).append(e)
    push = push_strength(features, metrics, set(by_feature_effects), spec.get("verify", {}).get("alphas") or [1.0])
    cards = []
    for f in features:
        feature_effects = by_feature_effects.get(f["feature"], [])
        explanation = explanations.get(f["feature"])
        if not feature_effects and explanation is None:
            continue
        best = max(feature_effects, key=lambda e: (bool(e["verified"]), abs(e["effect"] or 0)), default=None)
        cards.append({
            "feature": f, "explanation": explanation, "effects": feature_effects, "best": best,
            "safety_label": safety_label(explanation),
            "contexts": contexts.get(f["feature"], [])[:10],
            "artefact_reasons": _json_list(f["artefact_reasons"]),
            "top_tokens": _json_list(f["top_tokens"]), "promoted": _json_list(f["promoted_tokens"]),
            "examples": _examples(generations, grades, f["feature"], best, examples_alpha),
            "recurrence": recurrence_details(recurrence.get(f["feature"], [])),
            "recurrence_label": labels.get(f["feature"], ""),
        })
    cards.sort(key=lambda c: (
        not (c["best"] and c["best"]["verified"]),
        -(abs(c["best"]["effect"]) if c["best"] and not _nan(c["best"]["effect"]) else -1),
        not (c["explanation"] and c["explanation"]["safety_critical"]),
        c["feature"]["rank"],
    ))
    for card in cards:
        card["plots"] = [p for p in (dose_response_plot(e) for e in card["effects"]) if p]
    transfers = []
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in db.rows("transfers", run_id, order="trait, direction, arm"):
        grouped.setdefault((row["trait"], row["direction"]), []).append(row)
    for (trait, direction), arms in grouped.items():
        # in ARMS order (the store returns arms alphabetically); an unknown arm last
        arms = sorted(({**a, "draws": _json_list(a.get("draws"))} for a in arms),
                      key=lambda a: ARMS.index(a["arm"]) if a["arm"] in ARMS else len(ARMS))
        by_arm = {a["arm"]: a for a in arms}
        moved = by_arm.get("transferred", {})
        examples = []
        top_alpha = max((g["alpha"] for g in _json_list(moved.get("generations"))), default=None)
        for arm_name in ("source", "transferred"):  # four answers of each: the claim rests on both
            at_top = [g for g in _json_list(by_arm.get(arm_name, {}).get("generations"))
                      if top_alpha is not None and g["alpha"] in (top_alpha, -top_alpha)]
            examples += [{"arm": arm_name, **g} for g in at_top[:4]]
        for arm in arms:  # what the verdicts read for a control arm: the median |ρ| over its draws
            arm["verdict_rho"] = control_rho(by_arm, arm["arm"]) if arm["arm"] in CONTROL_ARMS else None
        # Verdicts from the stored ρ values with today's rules: rows of an older version may have stored
        # ``holds`` under another rule (before schema 3 it also required the unrelated control).
        transfers.append({"trait": trait, "direction": direction, "arms": arms, "holds": transfer_holds(by_arm),
                          "why_not": transfer_failures(by_arm),
                          "specific": trait_is_specific(by_arm), "unrelated_rho": control_rho(by_arm, "unrelated"),
                          "features": _json_list(moved.get("features")), "cosines": _json_list(moved.get("cosines")),
                          "max_decoder_cosine": moved.get("max_decoder_cosine"),
                          "plot": transfer_plot(trait, direction, arms), "examples": examples})
    from evals.verify_stage import baseline_summary

    baseline_rows = db.rows("baselines", run_id, order="rubric, model, kind, prompt")
    baselines = baseline_summary(baseline_rows)
    verified_by: dict[str, set[str]] = {}
    partitions = {f["feature"]: f["partition"] for f in features}
    for e in effects:
        if e["verified"]:
            verified_by.setdefault(e["rubric"], set()).add(
                {"a": "A-exclusive", "b": "B-exclusive"}.get(partitions.get(e["feature"]), "shared"))
    for row in baselines:
        row["scale"] = _scale_ends(row["rubric"])
        row["verified_by"] = sorted(verified_by.get(row["rubric"], ()))
        row["differs"] = row["difference"] is not None and abs(row["difference"]) >= MIN_EFFECT
        row["examples"] = [r for model in ("a", "b") for r in [
            r for r in baseline_rows if r["rubric"] == row["rubric"] and r["kind"] == "topic" and r["seed"] == 0
            and r["model"] == model][:8]]  # as many of each model's answers: the means are over both
    known = known_answer(run["model_a"], run["model_b"], spec, baselines, effects, partitions)
    by_id = {f["feature"]: f for f in features}
    for row in known:  # what a reader should weigh next to a hit: its exclusivity check, an artefact flag
        for v in row["verified_features"]:
            v["exclusivity"] = by_id.get(v["feature"], {}).get("exclusivity")
            v["is_artefact"] = bool(by_id.get(v["feature"], {}).get("is_artefact"))
            v["recurrence"] = labels.get(v["feature"], "")
    for f in features:
        f["recurrence_label"] = labels.get(f["feature"], "")
    platforms = computed_on(db, run_id)
    verified_artefacts = sorted({e["feature"] for e in effects if e["verified"]
                                 and by_id.get(e["feature"], {}).get("is_artefact")})
    verified_stability = [{"feature": f, "label": labels[f]}
                          for f in sorted({e["feature"] for e in effects if e["verified"]}) if labels.get(f)]
    verify_status = db.query("SELECT status FROM stages WHERE run_id = ? AND stage = 'verify'", [run_id])
    from audit.store import run_status

    state = run_status(run)  # failed, or its process gone while the row still says running (a kill -9)
    return {
        "store_path": str(db.path),
        "unfinished": state if state.startswith(("failed", "interrupted")) else None,
        "hold_spearman": HOLD_SPEARMAN, "control_spearman": CONTROL_SPEARMAN,
        # a run stopped before verify must not read as "verified nothing"
        "verify_ran": bool(effects) or bool(verify_status and verify_status[0]["status"] in ("done", "cached")),
        "platforms": platforms,
        "stability": stability,
        "verified_artefacts": verified_artefacts,
        "verified_stability": verified_stability,
        "baselines": baselines, "baseline_plot": baseline_plot(baselines),
        "known_answer": known, "found": [k for k in known if k["found"]],
        # verified sweeps on a behaviour the zoo gave both models: a control, not a difference between them
        "verified_shared": [{"feature": v["feature"], "rubric": k["rubric"]} for k in known
                            if k["planted_in"] == "shared" for v in k["verified_features"]],
        "missed": [k for k in known if k["expected"] and not k["found"]],
        "transfers": transfers,
        "run": run, "spec": spec, "metrics": metrics, "features": features, "cards": cards,
        "n_flagged": len(features), "n_artefacts": sum(bool(f["is_artefact"]) for f in features),
        "n_safety": sum(bool(e["safety_critical"]) for e in explanations.values()),
        "n_verified": len({e["feature"] for e in effects if e["verified"]}),
        "null": null_comparison(effects, {f["feature"]: f["own_model"] for f in features}),
        "push": push,
        "graders": graders, "explainers": explainers, "detectors": detectors,
        "relative_norm_plot": relative_norm_plot(_json_list(metrics["relative_norms"]) if metrics else []),
        "exclusivity_plot": exclusivity_plot(features),
        "offline": any(label.startswith("offline") for label in graders + explainers + detectors),
        "explainer_offline": any(label.startswith("offline") for label in explainers),
        # a resumed run can mix explainers: say how many of the flags the offline one raised
        "n_safety_offline": sum(bool(e["safety_critical"]) and (e["explainer"] or "").startswith("offline")
                                for e in explanations.values()),
    }


def stability_overview(db, run_id: str, spec: dict, recurrence: dict[int, list[dict]]) -> dict | None:
    """The seed-stability section: the other seeds' dictionaries, per model how many flagged exclusive
    features recur where, and the plot (None when the run trained no other seed)."""
    dictionaries = db.rows("seed_dictionaries", run_id, order="seed")
    if not dictionaries:
        return None
    from crosscoder.stability import recurrence_summary

    threshold = (spec.get("stability") or {}).get("threshold", 0.9)
    rows = [r for feature_rows in recurrence.values() for r in feature_rows]
    compared = compared_seeds(dictionaries)
    return {"dictionaries": dictionaries, "seeds": [d["seed"] for d in dictionaries], "compared": compared,
            "threshold": threshold, "summary": recurrence_summary(rows, compared),
            "plot": recurrence_plot(rows, threshold)}


def computed_on(db, run_id: str) -> list[dict]:
    """Where the run's stages were computed, one entry per platform with the stages it made, in
    stage order (a cached stage: where its artefact was made; one made before platforms were
    recorded: "not recorded")."""
    from audit.runner import STAGES
    from crosscoder.numerics import describe_platform

    grouped: dict[str, list[str]] = {}
    # stages with an artefact: those made before platforms were recorded say so
    rows = db.query("SELECT stage, platform FROM stages WHERE run_id = ? AND artefact IS NOT NULL "
                    "AND status IN ('done', 'cached')", [run_id])
    for row in sorted(rows, key=lambda r: STAGES.index(r["stage"]) if r["stage"] in STAGES else len(STAGES)):
        record = json.loads(row["platform"]) if row["platform"] else None
        grouped.setdefault(describe_platform(record), []).append(row["stage"])
    return [{"description": description, "stages": stages} for description, stages in grouped.items()]


# the matched rubric in the reason the offline explainer writes (evals.offline.TopicFlagger.flag)
_TOPIC_MATCH = re.compile(r"match the topic of rubric (\S+)")


def safety_label(explanation: dict | None) -> str:
    """The screen's safety flag in a few words: "yes" or "no" from an LLM explainer; from the offline
    one, which flags a topic match rather than judging safety, "topic match (<rubric>)"."""
    if not explanation or not explanation["parsed"]:
        return ""
    if not explanation["safety_critical"]:
        return "no"
    if not (explanation["explainer"] or "").startswith("offline"):
        return "yes"
    match = _TOPIC_MATCH.search(explanation["reason"] or "")
    return f"topic match ({match.group(1)})" if match else "topic match"


def effect_span(curve: list[dict]) -> dict | None:
    """Where a score change was read: the topic score at the smallest and at the largest coherent α
    (None with fewer than two coherent strengths), so a reader sees which way the change runs: a
    +3 can be a rise from 2 to 5, or the fall from 5 to 2 that turning the feature down causes."""
    alphas = sorted({c["alpha"] for c in curve})
    points = coherent_topic_scores(curve, coherent_alphas(curve, alphas))
    if len(points) < 2:
        return None
    (low_alpha, low), (high_alpha, high) = points[0], points[-1]
    return {"low_alpha": low_alpha, "low": low, "high_alpha": high_alpha, "high": high}


def why_not(effect: dict) -> list[str]:
    """The conditions an effects row failed (empty for a verified one), in words."""
    if effect["verified"]:
        return []
    return failed_conditions(effect.get("effect"), effect.get("spearman"), effect.get("control_effect"),
                             effect.get("coherence_low_alpha"), swept_controls(_json_list(effect.get("curve"))))


def _scale_ends(rubric_name: str) -> dict | None:
    """``{"low", "high"}``: the first sentence of a rubric's anchors 1 and 5 (None when its file is gone)."""
    from evals.rubrics import RubricError, load_rubric

    try:
        anchors = load_rubric(rubric_name).anchors
    except (RubricError, OSError):
        return None

    def first(text: str) -> str:
        return re.split(r"(?<=[.:;])\s", " ".join(text.split()), maxsplit=1)[0].rstrip(".:;")

    return {"low": first(anchors[1]), "high": first(anchors[5])}


EXPECTED_KIND = {"a": "A-exclusive", "b": "B-exclusive"}


def null_note(row: dict) -> str:
    """What the null sweep says of a verified effects row (or a known-answer feature), in words; empty when
    none ran."""
    if row.get("beats_null") is None:
        return ""
    draws, passed, as_large = row.get("null_draws"), row.get("null_passed"), row.get("null_as_large")
    # how many of the draws, passing or not, moved the score as much: the rank of this change among them
    rank = f"; {as_large} of {draws} moved the score as much" if draws and as_large is not None else ""
    if draws and not passed:
        return f"no random push of this size passed (0 of {draws}){rank}"
    if row["beats_null"]:
        return ("larger than every random push of this size that passed" + (f" ({passed} of {draws})" if draws else "")
                + rank)
    return "no larger than a random push of this size" + (f" ({passed} of {draws} passed)" if draws else "") + rank


#: A push at α = 1 at least this large, relative to the model's median activation norm, is flagged as a hard
#: push: the zoo's sweeps push at 0.5-0.8 of it, and random directions of that size pass the verify rule
#: about as often as its features do (docs/zoo-findings.md, "Verified is not identified").
HARD_PUSH = 0.5


def push_relative(feature: dict, metrics: dict | None) -> float | None:
    """A feature's push at α = 1 over its model's median activation norm; None when either is unknown (a run
    stored before schema 11)."""
    norm = (metrics or {}).get(f"activation_norm_{feature['own_model']}")
    push = feature.get("push_norm")
    return push / norm if norm and push is not None and not _nan(push) else None


def push_strength(features: list[dict], metrics: dict | None, swept: set[int], alphas: list[float]) -> dict | None:
    """Set each feature's ``push_relative`` (its push at α = 1 over its model's median activation norm; None
    when a norm is unknown, e.g. a run stored before schema 11) and summarise the swept features':
    ``{"median", "low", "high", "n", "top_alpha", "top" (the median at the grid's largest |α|), "hard" (the
    median at α = 1 is at least HARD_PUSH)}``, None when none is known."""
    for f in features:
        f["push_relative"] = push_relative(f, metrics)
    values = sorted(f["push_relative"] for f in features if f["feature"] in swept and f["push_relative"] is not None)
    if not values:
        return None
    median = statistics.median(values)
    top_alpha = max((abs(a) for a in alphas), default=1.0)
    return {"median": median, "low": values[0], "high": values[-1], "n": len(values), "top_alpha": top_alpha,
            "top": median * top_alpha, "hard": median >= HARD_PUSH}


def null_comparison(effects: list[dict], own_model: dict[int, str]) -> dict | None:
    """How the verified sweeps compare with the null sweeps (random pushes of the verified features' size on the
    same model and rubric): ``checked`` verified sweeps that have a null sweep, ``no_null_passed`` of them with no random
    push passing, and the random pushes swept and passing over the distinct (model, rubric) null sweeps (one per
    pair; ``own_model`` maps a feature to its model). None when no null sweep ran."""
    checked = [e for e in effects if e["verified"] and e.get("null_draws")]
    if not checked:
        return None
    sweeps = {(own_model.get(e["feature"]), e["rubric"]): e for e in checked}
    return {"checked": len(checked), "no_null_passed": sum(not e.get("null_passed") for e in checked),
            "draws": sum(e["null_draws"] for e in sweeps.values()),
            "passed": sum(e.get("null_passed") or 0 for e in sweeps.values())}


def known_answer(model_a: str, model_b: str, spec: dict, baselines: list[dict], effects: list[dict],
                 partitions: dict[int, str]) -> list[dict]:
    """For a pair of zoo models, each planted difference the spec has a rubric for, where it should
    show up, whether verify found it there, and the closest swept candidate of the right partition
    (empty for any other pair: no ground truth). ``partitions``: feature → "a" | "b".

    Verify sweeps exclusive features only, so a difference both models have ("shared", the transfer
    section tests it) or neither has is listed with no expected feature and not counted.
    """
    if not (model_a.startswith("zoo:") and model_b.startswith("zoo:")):
        return []
    from crosscoder.zoo import ZOO_MODELS, expected_diff, manifest

    name_a, name_b = model_a.removeprefix("zoo:"), model_b.removeprefix("zoo:")
    if name_a not in ZOO_MODELS or name_b not in ZOO_MODELS:
        return []
    if not effects and not baselines:  # verify never ran: there is nothing to score yet
        return []
    expected = expected_diff(name_a, name_b)
    by_prompt_set = _rubrics_by_prompt_set(spec)
    unsteered = {b["rubric"]: b for b in baselines}
    rows = []
    for difference in manifest()["differences"]:
        rubrics = by_prompt_set.get(difference["prompt_set"], [])  # the rubrics that drive its prompts
        if difference["prompt_set"] in rubrics:  # the shipped zoo rubric is named like its prompt set
            rubrics = [difference["prompt_set"]]
        if not rubrics:
            continue
        where = expected[difference["id"]]
        kind = EXPECTED_KIND.get(where)
        swept = [e for e in effects if e["rubric"] in rubrics]
        verified = sorted({(e["feature"], EXPECTED_KIND.get(partitions.get(e["feature"]), "shared"))
                           for e in swept if e["verified"]})
        found_on = sorted({kind for _, kind in verified})
        # The candidate of the right partition that came closest: verified first, then the larger effect.
        right = [e for e in swept if partitions.get(e["feature"]) == where]
        closest = max(right, key=lambda e: (bool(e["verified"]), 0.0 if _nan(e["effect"]) else abs(e["effect"])),
                      default=None)
        if closest is not None:
            closest = {**closest, "why_not": why_not(closest)}
        # each verified feature's null sweep (a feature verified on two rubrics of one difference: the last one's)
        nulls = {e["feature"]: e for e in swept if e["verified"] and e.get("beats_null") is not None}
        rows.append({"id": difference["id"], "title": difference["title"], "rubric": ", ".join(rubrics),
                     "planted_in": where,
                     "expected": kind, "verified_on": found_on,
                     "verified_features": [{"feature": f, "kind": k, "null": null_note(nulls.get(f, {})),
                                            "null_passed": nulls.get(f, {}).get("null_passed"),
                                            "null_draws": nulls.get(f, {}).get("null_draws"),
                                            "null_as_large": nulls.get(f, {}).get("null_as_large")}
                                           for f, k in verified],
                     "found": kind is not None and kind in found_on,
                     "closest": closest, "baseline": unsteered.get(rubrics[0])})
    return rows


def _rubrics_by_prompt_set(spec: dict) -> dict[str, list[str]]:
    """The spec's rubrics (named, given as paths, or in ``verify.features``) by the prompt set they
    sweep: prompt set → rubric names as verify records them, in spec order."""
    from evals.rubrics import RubricError, load_rubric

    verify = spec.get("verify") or {}
    entries = list(verify.get("rubrics") or [])
    for names in (verify.get("features") or {}).values():
        entries += list(names)
    out: dict[str, list[str]] = {}
    for entry in dict.fromkeys(entries):
        try:
            rubric = load_rubric(entry)
        except (RubricError, OSError):  # moved or deleted since the run: it cannot be matched
            continue
        if rubric.prompt_set is not None and rubric.name not in out.get(rubric.prompt_set, []):
            out.setdefault(rubric.prompt_set, []).append(rubric.name)
    return out


COHERENT_RANGE = "coherent range"
FIXED = "spec"
COHERENT_EDGE = "coherent edge"
FALLBACK = "fallback"
UNGRADED = "ungraded"


def example_alphas(effect: dict | None, alphas: list[float], fixed: float | None) -> tuple[float, float, str] | None:
    """The two steering strengths whose answers a card shows next to the unsteered ones, and where
    they come from: ``±fixed`` when the report spec sets one (FIXED), else the ends of the coherent
    range of the card's best sweep, where its effect was read (COHERENT_RANGE); when the only coherent
    steered strength is one α (the effect was read between it and 0), α and the strength nearest −α
    (COHERENT_EDGE); else the largest α ≤ 1 and its negative (FALLBACK: no coherent steered strength;
    UNGRADED: no coherence grades)."""
    if not alphas:
        return None
    if fixed:
        return -abs(fixed), abs(fixed), FIXED
    curve = (effect or {}).get("curve") or []
    graded = any(c["kind"] == "topic" and c["dimension"] == "coherence" for c in curve)
    # the rule verify read the effect under (evals.effects); α = 0 is the unsteered column already
    coherent = [a for a in coherent_alphas(curve, alphas) if a != 0] if graded else []
    if len(coherent) >= 2:
        return coherent[0], coherent[-1], COHERENT_RANGE
    if len(coherent) == 1:
        # the effect was read between this strength and 0: show it, and the strength nearest its mirror
        # (past the coherent range) for contrast when the grid has one
        only = coherent[0]
        other_side = [a for a in alphas if a * only < 0]
        if other_side:
            mirror = min(other_side, key=lambda a: abs(a + only))
            return min(only, mirror), max(only, mirror), COHERENT_EDGE
        return only, only, COHERENT_EDGE
    positive = [a for a in alphas if 0 < a <= 1]
    high = max(positive) if positive else max(alphas)
    return -high, high, FALLBACK if graded else UNGRADED


def _examples(generations: list[dict], grades: dict, feature: int, effect: dict | None, fixed: float | None) -> dict:
    """Unsteered vs steered answers on the topic prompts (at most six) of the card's best sweep, at
    the strengths of :func:`example_alphas` (read from that sweep, so other rubrics' prompts are left
    out: their coherent ranges differ), each with its rubric and coherence grades (``grades``: the
    scores table by generation key and dimension)."""
    rows = [g for g in generations if g["feature"] == feature and g["kind"] == "topic" and g["seed"] == 0
            and (effect is None or g["rubric"] == effect["rubric"])]
    chosen = example_alphas(effect, sorted({g["alpha"] for g in rows}), fixed)
    if chosen is None:
        return {"low": None, "high": None, "rows": [], "source": ""}
    low, high, origin = chosen
    source = {FIXED: "the strengths set in the report spec",
              COHERENT_RANGE: f"the ends of the coherent range of the {(effect or {}).get('rubric')} sweep, where "
                              "its effect was read",
              COHERENT_EDGE: f"the answers stay coherent only between α = 0 and the one steered strength of "
                             f"the {(effect or {}).get('rubric')} sweep where its score change was read, shown with "
                             "the same strength the other way, past the coherent range",
              FALLBACK: "no steered strength gave coherent answers, so the largest α ≤ 1 each way",
              UNGRADED: "coherence was not graded, so the largest α ≤ 1 each way"}[origin]
    table: dict[tuple[str, str], dict] = {}
    for g in rows:
        entry = table.setdefault((g["rubric"], g["prompt"]), {"rubric": g["rubric"], "prompt": g["prompt"]})
        column = {0: "baseline", low: "low", high: "high"}.get(g["alpha"])
        if column is None:
            continue
        key = (g["feature"], g["rubric"], g["kind"], g["prompt"], g["alpha"], g["seed"])
        entry[column] = {"answer": g["answer"], "behaviour": grades.get((*key, "behaviour")),
                         "coherence": grades.get((*key, "coherence"))}
    return {"low": low, "high": high, "rows": list(table.values())[:6], "source": source}


def number(value, fmt: str = "{:.3f}") -> str:
    """``value`` in ``fmt``; "–" when missing, and a value that rounds to zero without a minus sign
    ("-0.00" would read as a small negative effect)."""
    if _nan(value) or not math.isfinite(value):
        return "–"
    text = fmt.format(value)
    return fmt.format(0.0) if text.lstrip("+-") == fmt.format(0.0).lstrip("+-") else text


def render_run(db, run_id: str, run_dir: Path, report_spec=None) -> list[Path]:
    """Write ``report.html`` and ``report.md`` into ``run_dir``; returns the paths written."""
    formats = list(report_spec.formats) if report_spec is not None else ["html", "markdown"]
    examples_alpha = report_spec.examples_alpha if report_spec is not None else None
    data = gather(db, run_id, examples_alpha)
    data["title"] = (report_spec.title if report_spec is not None and report_spec.title else
                     f"Audit: {data['run']['model_a']} vs {data['run']['model_b']}")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=jinja2.select_autoescape(
        enabled_extensions=("html", "j2")), undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["highlight"] = highlight
    env.filters["fromjson"] = _json_list
    env.filters["num"] = number
    env.filters["null_note"] = null_note
    env.filters["pct"] = lambda v: "–" if _nan(v) else f"{100 * v:.1f} %"
    env.filters["when"] = lambda v: v.strftime("%Y-%m-%d %H:%M") if hasattr(v, "strftime") else str(v or "")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if "html" in formats:
        path = run_dir / "report.html"
        _write(path, env.get_template("report.html.j2").render(**data))
        paths.append(path)
    if "markdown" in formats:
        path = run_dir / "report.md"
        md_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=False,
                                    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        md_env.filters.update(env.filters)
        md_env.filters["md"] = markdown_text
        _write(path, md_env.get_template("report.md.j2").render(**data))
        paths.append(path)
    return paths


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
