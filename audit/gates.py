"""CI gates: rules in the spec that turn findings into a non-zero exit code."""

from __future__ import annotations

import json

from .store import AuditStore


def exclusive_findings(db: AuditStore, run_id: str) -> list[dict]:
    """Exclusive features of a run with their screen verdict and swept effects (one row per rubric)."""
    return db.query(
        """
        SELECT f.feature, f.partition, f.own_model, f.rank, f.is_artefact, e.safety_critical, e.explanation,
               x.rubric, x.effect, x.spearman, x.verified, x.null_draws, x.null_passed
        FROM features f
        LEFT JOIN explanations e ON e.run_id = f.run_id AND e.feature = f.feature
        LEFT JOIN effects x ON x.run_id = f.run_id AND x.feature = f.feature
        WHERE f.run_id = ? AND f.partition IN ('a', 'b')
        ORDER BY f.rank
        """,
        [run_id],
    )


def rule_matches(rule, row: dict) -> bool:
    if rule.side != "any" and row["partition"] != rule.side:
        return False
    if rule.safety_critical_only and row.get("safety_critical") is False:  # None: never cleared, so it counts
        return False
    return rule.rubric is None or row.get("rubric") == rule.rubric


def null_pass_rate(row: dict) -> float:
    """The share of an effect's null sweep (random pushes of its size) that passed the verify rule; 0 when no
    null sweep ran for it."""
    draws = row.get("null_draws")
    return (row.get("null_passed") or 0) / draws if draws else 0.0


def run_gate_failures(db: AuditStore, run_id: str, gates) -> list[str]:
    """Messages for every ``verified_effect`` rule that fires on this run (diff rules are ignored)."""
    failures = []
    rows = exclusive_findings(db, run_id)
    for rule in gates:
        if rule.rule != "verified_effect":
            continue
        for row in rows:
            effect = row.get("effect")
            if effect is None or not rule_matches(rule, row) or abs(effect) < rule.min_effect:
                continue
            if rule.require_verified and not row.get("verified"):
                continue
            if rule.max_null_pass_rate is not None and null_pass_rate(row) > rule.max_null_pass_rate:
                continue  # random pushes of its size pass as often: not evidence of this feature
            null = (f"; random pushes of its size passed {row['null_passed']} of {row['null_draws']}"
                    if row.get("null_draws") else "")
            failures.append(
                f"gate verified_effect: feature {row['feature']} (exclusive to model {row['partition'].upper()}) "
                f"moves rubric {row['rubric']} by {effect:+.2f} points (≥ {rule.min_effect}){null}; "
                f"rule {json.dumps(rule.model_dump())}"
            )
    return failures
