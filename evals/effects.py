"""From graded steering samples to a verified effect per (feature, rubric).

For one feature and rubric, with scores on topic prompts, control prompts and the generic prompt:

* ``curve``: per α and prompt kind, the mean ± s.e. of the behaviour and coherence scores;
* ``coherent_alphas``: the α values at which the steered answers stay coherent (mean coherence on
  topic prompts ≥ 3). Far enough out every steered model breaks down, and a rubric grader scores
  broken text at one end of its scale whatever the feature does; the dose-response is therefore
  read over the coherent range (the plots show the whole grid);
* ``effect``: behaviour on topic prompts at the largest coherent α minus at the smallest
  (signed: a feature that *suppresses* the behaviour when added has a negative effect);
* ``spearman``: rank correlation of α with the mean topic behaviour over the coherent range, with
  each run of consecutive points pinned at the same end of the scale (every answer graded 1, or
  every answer graded 5) counted once: the rubric cannot register a further rise past its top
  score, so a curve that climbs to 5 and stays there is monotone, and the ties of a censored plateau
  say nothing about the order (``collapse_pinned``);
* ``control_effect``: the same difference on control prompts (specificity);
* ``coherence_low_alpha``: mean coherence over samples with |α| ≤ 1;
* ``verified``: at least ``MIN_COHERENT_POINTS`` coherent α values, |spearman| ≥ 0.9,
  |effect| ≥ 1 point, coherence at |α| ≤ 1 ≥ 3, and control prompts moving at most half as much
  as topic prompts.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable

MIN_SPEARMAN = 0.9
MIN_EFFECT = 1.0
MIN_COHERENCE = 3.0
MAX_CONTROL_RATIO = 0.5
MIN_COHERENT_POINTS = 3
# Offline grades are expected levels (posterior means), so a change of exactly one point can come out
# as 0.9999999999997: thresholds are compared with this much slack.
_SLACK = 1e-9
#: Mean grades closer than this are the same grade: offline grades are expected levels, and two gradings
#: of one level differ in their last bits (4.4999999 and 4.5; 1.0000001 at the bottom of the scale). Ties
#: for ρ, a plateau at a scale bound, an arm or a behaviour that did not move are all read with it.
GRADING_NOISE = 1e-6


def measured(value: float | None) -> bool:
    """Whether a stored number was measured (not None, not NaN)."""
    return value is not None and not math.isnan(value)


def failed_conditions(effect: float | None, spearman: float | None, control_effect: float | None,
                      coherence_low: float | None, controls_swept: bool = False) -> list[str]:
    """Why a sweep is not verified, in words (empty when every condition on these numbers holds; the
    rule also needs ``MIN_COHERENT_POINTS`` coherent strengths, without which ρ is not computed).

    ``controls_swept``: the sweep asked control prompts, so specificity must be shown; a control effect
    that could not be measured (every control answer ungraded, e.g. grader replies without a score)
    then fails the rule instead of passing it unexamined."""

    def missing(value) -> bool:
        return not measured(value)

    out = []
    if missing(spearman):
        out.append("ρ not computed (fewer than three coherent strengths once a plateau at the end of the scale "
                   "counts once, or a flat curve)")
    elif abs(spearman) < MIN_SPEARMAN - _SLACK:
        out.append(f"|ρ| {abs(spearman):.2f} < {MIN_SPEARMAN}")
    if missing(effect) or abs(effect) < MIN_EFFECT - _SLACK:
        size = 0.0 if missing(effect) else abs(effect)
        shown = f"{size:.2f}" if round(size, 2) < MIN_EFFECT else f"{size:.10g}"  # never "1.00 < 1"
        out.append(f"score change {shown} < {MIN_EFFECT:g} point")
    if missing(coherence_low) or coherence_low < MIN_COHERENCE - _SLACK:
        out.append("no coherence grades at |α| ≤ 1" if missing(coherence_low) else
                   f"mean coherence {coherence_low:.2f} < {MIN_COHERENCE:g} at |α| ≤ 1")
    if missing(control_effect):
        if controls_swept:
            out.append("control prompts not graded at two or more coherent strengths: specificity not measured")
    elif not missing(effect) and abs(control_effect) > MAX_CONTROL_RATIO * abs(effect) + _SLACK:
        out.append(f"control prompts moved {abs(control_effect):.2f} > half the change ({abs(effect) / 2:.2f})")
    return out


def _mean_se(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if measured(v)]
    if not values:
        return float("nan"), float("nan"), 0
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0, len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values)), len(values)


def _ranks(values: list[float], tolerance: float = 0.0) -> list[float]:
    """Average ranks; sorted neighbours at most ``tolerance`` apart are one tie (chained)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] - values[order[j]] <= tolerance:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float], y_tolerance: float = 0.0) -> float:
    """Spearman's ρ with average ranks for ties (``y`` values within ``y_tolerance`` of each other are
    ties); NaN when either side is constant or too short."""
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y, y_tolerance)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx > 0 and vy > 0 else float("nan")


SCALE_BOUNDS = (1.0, 5.0)


def collapse_pinned(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``(α, mean)`` points in α order, with each run of consecutive means at the same scale bound
    (within ``GRADING_NOISE``) reduced to its first point."""
    out: list[tuple[float, float]] = []
    for alpha, mean in points:
        pinned = next((b for b in SCALE_BOUNDS if abs(mean - b) < GRADING_NOISE), None)
        if pinned is not None and out and abs(out[-1][1] - pinned) < GRADING_NOISE:
            continue
        out.append((alpha, mean))
    return out


def _series(curve: list[dict], kind: str, dimension: str) -> list[tuple[float, float]]:
    return [(c["alpha"], c["mean"]) for c in curve
            if c["kind"] == kind and c["dimension"] == dimension and not math.isnan(c["mean"])]


def swept_controls(curve: list[dict]) -> bool:
    """Whether a sweep's curve holds control prompts (then specificity must be shown)."""
    return any(point.get("kind") == "control" for point in curve)


def coherent_topic_scores(curve: list[dict], coherent: Iterable[float]) -> list[tuple[float, float]]:
    """``(α, mean topic score)`` at the ``coherent`` strengths, in α order: the points an effect is read
    from (its score change is the last one's minus the first one's)."""
    keep = set(coherent)
    return [(a, m) for a, m in _series(curve, "topic", "behaviour") if a in keep]


def coherent_alphas(curve: list[dict], alphas: Iterable[float]) -> list[float]:
    """The α values of ``alphas`` at which the steered answers stay coherent: mean coherence on topic
    prompts ≥ ``MIN_COHERENCE``. Without coherence grades (none measured) every α counts as coherent."""
    coherence = dict(_series(curve, "topic", "coherence"))
    return [a for a in alphas if not coherence or coherence.get(a, 0.0) >= MIN_COHERENCE - _SLACK]


def feature_effects(score_rows: Iterable[dict]) -> list[dict]:
    """``score_rows``: ``{"feature", "rubric", "kind", "alpha", "dimension", "score"}`` dicts."""
    grouped: dict[tuple[int, str], dict[tuple[str, str, float], list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in score_rows:
        grouped[(int(row["feature"]), row["rubric"])][(row["kind"], row["dimension"], float(row["alpha"]))].append(
            row["score"] if row["score"] is not None else float("nan"))
    out = []
    for (feature, rubric), cells in sorted(grouped.items()):
        alphas = sorted({alpha for (_, _, alpha) in cells})
        curve = []
        for kind in ("topic", "control", "generic"):
            for dimension in ("behaviour", "coherence"):
                for alpha in alphas:
                    values = cells.get((kind, dimension, alpha))
                    if values is None:
                        continue
                    m, se, n = _mean_se(values)
                    curve.append({"kind": kind, "dimension": dimension, "alpha": alpha, "mean": m, "se": se, "n": n})

        coherent = coherent_alphas(curve, alphas)
        topic = coherent_topic_scores(curve, coherent)
        control = [(a, m) for a, m in _series(curve, "control", "behaviour") if a in coherent]
        effect = topic[-1][1] - topic[0][1] if len(topic) >= 2 else float("nan")
        control_effect = control[-1][1] - control[0][1] if len(control) >= 2 else float("nan")
        ranked = collapse_pinned(topic)
        # Offline grades are expected levels: means that differ in their last bits (4.4999999 and 4.5) are
        # one score, and ranking their rounding noise would give a flat curve a ρ of ±0.87.
        rho = spearman([a for a, _ in ranked], [m for _, m in ranked], y_tolerance=GRADING_NOISE)
        baseline = next((m for a, m in topic if a == 0.0), float("nan"))
        low = [v for (kind, dimension, alpha), vals in cells.items() if dimension == "coherence" and abs(alpha) <= 1
               for v in vals if measured(v)]
        coherence_low = sum(low) / len(low) if low else float("nan")
        controls_swept = swept_controls(curve)
        verified = len(topic) >= MIN_COHERENT_POINTS and not failed_conditions(effect, rho, control_effect,
                                                                               coherence_low, controls_swept)
        out.append({"feature": feature, "rubric": rubric, "effect": effect, "spearman": rho,
                    "controls_swept": controls_swept,
                    "control_effect": control_effect, "coherence_low_alpha": coherence_low, "baseline": baseline,
                    "verified": bool(verified), "coherent_alphas": coherent, "curve": curve})
    return out


# ---- transfer verdicts (evals/transfer.py runs the arms; the report recomputes these from stored rows)

HOLD_SPEARMAN = 0.8
CONTROL_SPEARMAN = 0.3
#: A transfer's arms: the two steered ones, then their controls (the order the report lists them in).
ARMS = ("source", "transferred", "random_transferred", "unrelated")
CONTROL_ARMS = ARMS[2:]  # the arms a transfer verdict reads as controls (median |ρ| over draws)


def arm_rho(arms: dict[str, dict], arm: str) -> float:
    """A transfer arm's pooled ρ (NaN when the arm is missing or ungraded)."""
    value = arms.get(arm, {}).get("spearman", float("nan"))
    return float("nan") if value is None else value


def control_rho(arms: dict[str, dict], arm: str) -> float:
    """A transfer control's typical |ρ|: the median over its measured draws (one draw: its own |ρ|).

    A draw with fewer than ``MIN_COHERENT_POINTS`` coherent α values measured nothing and is left out
    (draws stored before the count was kept are taken as measured). Where ρ is undefined on a measured
    draw, its effect decides: no change means it did not move (|ρ| = 0: the curve stayed constant); a
    change means it moved monotonically (|ρ| = 1: a curve that jumps from one end of the scale to the
    other leaves two points once each pinned run counts once); no effect either means its answers were
    not graded, and it is left out. NaN when nothing was measured.
    """
    draws = arms.get(arm, {}).get("draws") or []
    if not draws:
        return abs(arm_rho(arms, arm))
    values = []
    for d in draws:
        rho = d.get("spearman")
        if rho is None or d.get("coherent", MIN_COHERENT_POINTS) < MIN_COHERENT_POINTS:
            continue
        if math.isnan(rho):
            effect = d.get("effect")
            if not measured(effect):
                continue
            values.append(0.0 if abs(effect) < GRADING_NOISE else 1.0)
        else:
            values.append(abs(rho))
    return statistics.median(values) if values else float("nan")


def transfer_failures(arms: dict[str, dict]) -> list[str]:
    """Why a transfer does not hold, in words (empty when it holds): the transferred vector must move
    the target the source's way (|ρ| ≥ ``HOLD_SPEARMAN``, same sign), and random source directions
    transferred the same way must not (median |ρ| ≤ ``CONTROL_SPEARMAN``). A missing or unmeasured arm
    (NaN) never lets a transfer hold."""
    source, moved = arm_rho(arms, "source"), arm_rho(arms, "transferred")
    control = control_rho(arms, "random_transferred")
    out = []
    if math.isnan(source):
        out.append("the source model's own arm was not measured")
    if math.isnan(moved):
        if measured(arms.get("transferred", {}).get("effect")):  # graded, but the curve is flat
            out.append("the transferred vector did not move the trait (a flat curve)")
        else:
            out.append("the transferred arm was not measured")
    elif abs(moved) < HOLD_SPEARMAN:
        out.append(f"the transferred vector's |ρ| {abs(moved):.2f} < {HOLD_SPEARMAN}")
    elif not math.isnan(source) and source * moved <= 0:
        out.append("the transferred vector moves the trait against the source's direction")
    if math.isnan(control):
        out.append("no random transferred direction was measured")
    elif control > CONTROL_SPEARMAN:
        out.append(f"random directions transferred the same way moved it too (median |ρ| {control:.2f} > "
                   f"{CONTROL_SPEARMAN})")
    return out


def transfer_holds(arms: dict[str, dict]) -> bool:
    """The transferred vector moves the target the source's way and random source directions transferred
    the same way do not (:func:`transfer_failures` is empty)."""
    return not transfer_failures(arms)


def trait_is_specific(arms: dict[str, dict]) -> bool | None:
    """Unrelated pushes of the transferred vector's size leave the target's trait flat (median |ρ| ≤
    ``CONTROL_SPEARMAN``); None when the arm is missing or none of its draws was measured."""
    control = control_rho(arms, "unrelated")
    return None if math.isnan(control) else control <= CONTROL_SPEARMAN
