"""``audit seeds SPEC --seeds 0,1,2``: one audit per crosscoder seed, and what they find together.

Which concepts a dictionary verifies is a draw of its training (docs/zoo-findings.md, "What the demo verifies"):
a concept missed by one seed may be verified by another, and a finding every seed makes is worth
more than one only a single seed makes. This runs the spec once per seed (each a normal run with
its own report; the harvest is shared, and each seed's dictionary is trained once: every run's
stability stage compares it with the others) and pools their verified concepts and, for a pair of
zoo models, their known answers. Results are keyed by the seed as text (``"0"``), in memory as in the
JSON file.
"""

from __future__ import annotations

import json

from crosscoder.config import SEED_LIMIT

from .spec import AuditSpec
from .store import AuditStore


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``, for the ``--seeds`` options of ``audit seeds`` and ``audit zoo discovery``.

    Raises ``ValueError`` naming what is wrong: an item that is not an integer, one out of the seed
    range, a seed given twice (a second training with one seed would only repeat the first), none."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"give at least one seed, got {text!r}")
    wrong = [t for t in items if not (t.isascii() and t.isdigit())]
    if wrong:
        verb = "is not a non-negative integer" if len(wrong) == 1 else "are not non-negative integers"
        raise ValueError(f"{', '.join(map(repr, wrong))} {verb}")
    seeds = [int(t) for t in items]
    too_large = [s for s in seeds if s >= SEED_LIMIT]
    if too_large:
        raise ValueError(f"seeds must be below 2**63, got {too_large[0]}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"seed {', '.join(map(str, repeated))} given more than once")
    return seeds


def seed_variants(spec: AuditSpec, seeds: list[int]) -> list[AuditSpec]:
    """The spec once per seed: ``crosscoder.seed`` set to it, the other seeds (and any the spec
    lists) as its stability seeds, and the transfer stage (its persona vectors are measured on the
    models; only its choice of shared features depends on the dictionary) only with the first seed
    listed. ``verify.features`` names features of the spec's own dictionary, so it is kept only for
    the spec's own seed."""
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"give at least two distinct seeds, got {seeds}")
    out = []
    for position, seed in enumerate(seeds):
        data = spec.model_dump(mode="json")
        data["crosscoder"]["seed"] = seed
        others = [s for s in seeds if s != seed] + [s for s in spec.stability.seeds if s not in seeds]
        data["stability"]["seeds"] = others
        if position > 0:
            data["transfer"]["traits"] = []
        if seed != spec.crosscoder.seed:
            data["verify"]["features"] = {}
        out.append(AuditSpec.model_validate(data))
    return out


def _known_answer(db: AuditStore, run_id: str) -> list[dict]:
    from evals.verify_stage import baseline_summary
    from reports.render import known_answer

    run = db.run(run_id)
    partitions = {f["feature"]: f["partition"] for f in db.rows("features", run_id)}
    baselines = baseline_summary(db.rows("baselines", run_id))
    return known_answer(run["model_a"], run["model_b"], json.loads(run["spec_json"]), baselines,
                        db.rows("effects", run_id), partitions)


def pool_seeds(db: AuditStore, runs: dict[int, str]) -> dict:
    """``runs``: ``{seed: run id}``. Per verified concept (partition, rubric), the carrying feature
    and effect in each seed that verified it; for zoo pairs, each planted difference's verdict per
    seed (found where expected, and on which feature)."""
    from .diff import _verified_concepts

    seeds = [str(s) for s in runs]
    concepts: dict[tuple[str, str], dict[str, dict]] = {}
    for seed, run_id in runs.items():
        for key, row in _verified_concepts(db, run_id).items():
            concepts.setdefault(key, {})[str(seed)] = {"feature": row["feature"], "effect": row["effect"],
                                                       "spearman": row["spearman"]}
    concept_rows = [{"partition": partition, "rubric": rubric, "by_seed": {s: found.get(s) for s in seeds},
                     "verified_in": [s for s in seeds if s in found]}
                    for (partition, rubric), found in sorted(concepts.items())]
    known: dict[str, dict] = {}
    measured = []  # seeds whose verify stage ran: it stored sweeps or unsteered answers (any pair, zoo or not)
    for seed, run_id in runs.items():
        rows = _known_answer(db, run_id)
        ran = db.query("SELECT (SELECT count(*) FROM effects WHERE run_id = ?) "
                       "+ (SELECT count(*) FROM baselines WHERE run_id = ?) AS n", [run_id, run_id])[0]["n"]
        if rows or ran:
            measured.append(str(seed))
        for row in rows:
            entry = known.setdefault(row["id"], {"id": row["id"], "title": row["title"], "expected": row["expected"],
                                                 "by_seed": {}, "found_in": []})
            entry["by_seed"][str(seed)] = {"found": row["found"], "features": [
                f"{v['kind']} {v['feature']}" + (f" [random pushes passing: {v['null_passed']} of {v['null_draws']}"
                                                 + (f"; as large a change: {v['null_as_large']}"
                                                    if v.get("null_as_large") is not None else "") + "]"
                                                 if v.get("null_draws") else "")
                for v in row["verified_features"]]}
            if row["found"]:
                entry["found_in"].append(str(seed))
    expected = [k for k in known.values() if k["expected"]]
    return {"seeds": seeds, "runs": {str(s): r for s, r in runs.items()}, "measured": measured,
            "concepts": concept_rows, "known_answer": list(known.values()),
            "known_found_any": sum(bool(k["found_in"]) for k in expected),
            "known_found_all": sum(len(k["found_in"]) == len(measured) > 0 for k in expected),
            "known_expected": len(expected)}


def _cell(found: dict | None) -> str:
    if not found:
        return "—"
    return f"feature {found['feature']}: {found['effect']:+.2f}"


def render_seeds_markdown(name: str, pooled: dict) -> str:
    from .diff import _side_name

    seeds = pooled["seeds"]
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"# {name}: {len(seeds)} crosscoder seeds ({', '.join(map(str, seeds))})", ""]
    lines += [f"- seed {s}: run `{pooled['runs'][s]}`" + ("" if s in pooled["measured"] else " (no verify results)")
              for s in seeds] + [""]
    measured = pooled["measured"]
    if pooled["known_expected"]:
        lines += [f"Known answer (tiny zoo): {pooled['known_found_any']} of {pooled['known_expected']} planted "
                  f"one-model differences verified in at least one seed, {pooled['known_found_all']} in every seed "
                  f"(of the {len(measured)} whose verify stage ran).",
                  "", f"| planted difference | expected on | {head} | verified in |",
                  "|---|---|" + "---|" * len(seeds) + "---|"]
        for k in pooled["known_answer"]:
            cells = []
            for s in seeds:
                verdict = k["by_seed"].get(s)
                if verdict is None:
                    cells.append("not measured")
                elif not k["expected"]:  # both models have it: steering an exclusive feature is not evidence
                    cells.append(("not counted: " + ", ".join(verdict["features"])) if verdict["features"] else "–")
                elif verdict["found"]:
                    cells.append("yes (" + ", ".join(verdict["features"]) + ")")
                else:
                    cells.append("no")
            where = f"{len(k['found_in'])} of {len(measured)}" if k["expected"] else "not counted"
            lines.append(f"| {k['id']} | {k['expected'] or 'no exclusive feature'} | {' | '.join(cells)} | {where} |")
        lines.append("")
    lines += ["Verified concepts per partition and rubric (the largest verified effect in each seed):", "",
              f"| partition | rubric | {head} | verified in |", "|---|---|" + "---|" * len(seeds) + "---|"]
    for c in pooled["concepts"]:
        where = _side_name(c["partition"])
        cells = " | ".join(_cell(c["by_seed"][s]) for s in seeds)
        lines.append(f"| {where} | {c['rubric']} | {cells} | {len(c['verified_in'])} of {len(measured)} |")
    if not pooled["concepts"]:
        lines.append("| none verified in any seed |" + " |" * (len(seeds) + 2))
    lines += ["", "A concept verified in every seed does not depend on the draw of one dictionary; one verified in "
              "a single seed is a real effect of steering that feature, but another dictionary may not isolate it."]
    return "\n".join(lines) + "\n"
