"""Dose-response summaries: Spearman's ρ and the verified-effect rule."""

from __future__ import annotations

import math

import pytest

from evals.effects import collapse_pinned, failed_conditions, feature_effects, spearman


def test_spearman_matches_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 5, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(math.sqrt(3) / 2)  # ties get average ranks
    assert math.isnan(spearman([1, 2, 3], [2, 2, 2]))


def _rows(topic, control, coherence, feature=1, rubric="r"):
    rows = []
    for alpha, t, c, h in zip((-1.0, 0.0, 1.0, 2.0), topic, control, coherence, strict=True):
        for _ in range(2):  # two samples per cell
            rows += [{"feature": feature, "rubric": rubric, "kind": "topic", "alpha": alpha, "dimension": "behaviour",
                      "score": t}, {"feature": feature, "rubric": rubric, "kind": "control", "alpha": alpha,
                      "dimension": "behaviour", "score": c}, {"feature": feature, "rubric": rubric, "kind": "topic",
                      "alpha": alpha, "dimension": "coherence", "score": h}]
    return rows


def test_a_specific_monotone_coherent_effect_is_verified():
    (effect,) = feature_effects(_rows([1, 2, 3.5, 4.5], [1, 1, 1.2, 1.5], [5, 5, 4, 2]))
    # α = 2 is incoherent (2 < 3): the dose-response is read over α = -1, 0, 1.
    assert effect["coherent_alphas"] == [-1.0, 0.0, 1.0]
    assert effect["effect"] == pytest.approx(2.5) and effect["spearman"] == pytest.approx(1.0)
    assert effect["control_effect"] == pytest.approx(0.2) and effect["baseline"] == pytest.approx(2.0)
    assert effect["coherence_low_alpha"] == pytest.approx((5 + 5 + 4) / 3)
    assert effect["verified"]
    points = [c for c in effect["curve"] if c["kind"] == "topic" and c["dimension"] == "behaviour"]
    assert [p["alpha"] for p in points] == [-1.0, 0.0, 1.0, 2.0] and all(p["n"] == 2 for p in points)


def test_a_collapse_at_large_alpha_does_not_hide_a_coherent_dose_response():
    rows = _rows([2.9, 4.0, 4.6, 1.0], [1, 1, 1, 1], [4.5, 5, 5, 1.0])
    rows += [{**r, "alpha": -2.0, "score": 1.0} for r in _rows([0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]) if r["alpha"] == -1.0]
    (effect,) = feature_effects(rows)
    assert effect["coherent_alphas"] == [-1.0, 0.0, 1.0]
    assert effect["effect"] == pytest.approx(1.7) and effect["verified"]


@pytest.mark.parametrize("topic, control, coherence, why", [
    ([1, 3, 2, 4], [1, 1, 1, 1], [5, 5, 5, 5], "not monotone"),
    ([2, 2.2, 2.4, 2.6], [1, 1, 1, 1], [5, 5, 5, 5], "too small"),
    ([1, 2, 3, 4], [1, 2, 3, 4], [5, 5, 5, 5], "not specific"),
    ([1, 2, 3, 4], [1, 1, 1, 1], [2, 2, 2, 2], "incoherent"),
    ([1, 2, 3, 4], [1, 1, 1, 1], [5, 5, 2, 2], "too few coherent strengths"),
])
def test_effects_that_fail_a_condition_are_not_verified(topic, control, coherence, why):
    (effect,) = feature_effects(_rows(topic, control, coherence))
    assert not effect["verified"], why


def test_unparsed_grades_are_skipped_not_counted():
    rows = _rows([1, 2, 3, 4], [1, 1, 1, 1], [5, 5, 5, 5])
    rows.append({"feature": 1, "rubric": "r", "kind": "topic", "alpha": 2.0, "dimension": "behaviour",
                 "score": float("nan")})
    (effect,) = feature_effects(rows)
    assert effect["effect"] == pytest.approx(3.0) and effect["verified"]


def test_a_plateau_at_the_top_of_the_scale_is_counted_once():
    # every answer graded 5 from α = 0 on: the rubric cannot show more, the curve is monotone
    assert collapse_pinned([(-1, 3.0), (0, 5.0), (1, 5.0), (2, 5.0)]) == [(-1, 3.0), (0, 5.0)]
    assert collapse_pinned([(-1, 1.0), (0, 1.0), (1, 2.0), (2, 5.0)]) == [(-1, 1.0), (1, 2.0), (2, 5.0)]
    # a tie below the top is evidence of no change and stays; a fall after the plateau stays too
    assert collapse_pinned([(-1, 3.0), (0, 4.5), (1, 4.5)]) == [(-1, 3.0), (0, 4.5), (1, 4.5)]
    assert collapse_pinned([(-1, 5.0), (0, 5.0), (1, 4.0)]) == [(-1, 5.0), (1, 4.0)]
    # suppression from the ceiling: 2 → 4 → 5 → 5 → 5 is verified (ρ 1 over the distinct points) ...
    rows = []
    for alpha, t in zip((-1.0, -0.5, 0.0, 0.5, 1.0), (2.0, 4.0, 5.0, 5.0, 5.0), strict=True):
        rows += [{"feature": 1, "rubric": "r", "kind": "topic", "alpha": alpha, "dimension": "behaviour", "score": t},
                 {"feature": 1, "rubric": "r", "kind": "control", "alpha": alpha, "dimension": "behaviour", "score": 1},
                 {"feature": 1, "rubric": "r", "kind": "topic", "alpha": alpha, "dimension": "coherence", "score": 5}]
    (effect,) = feature_effects(rows)
    assert effect["spearman"] == pytest.approx(1.0) and effect["effect"] == pytest.approx(3.0) and effect["verified"]
    # ... while rising to the top and falling back is not
    (effect,) = feature_effects([{**r, "score": 3.0} if r["alpha"] == 1.0 and r["dimension"] == "behaviour"
                                 and r["kind"] == "topic" else r for r in rows])
    assert not effect["verified"]


def test_a_sweep_that_is_not_verified_says_which_condition_failed():
    from evals.effects import failed_conditions

    assert failed_conditions(2.0, 1.0, 0.1, 4.8) == []
    assert failed_conditions(1.0, 1.0, 0.88, 4.8) == ["control prompts moved 0.88 > half the change (0.50)"]
    assert failed_conditions(-0.5, 0.19, 0.0, 4.9) == ["|ρ| 0.19 < 0.9", "score change 0.50 < 1 point"]
    why = failed_conditions(-0.5, float("nan"), 0.2, 2.5)
    assert why[0].startswith("ρ not computed") and why[-1] == "mean coherence 2.50 < 3 at |α| ≤ 1"
    assert failed_conditions(0.99996, 1.0, 0.0, 4.8) == ["score change 0.99996 < 1 point"]  # not "1.00 < 1"
    assert failed_conditions(0.9999999999997, 1.0, 0.0, 4.8) == []  # grades are posterior means: float slack


def test_a_sweep_whose_control_answers_were_never_graded_is_not_verified():
    # e.g. an LLM grader that gave no score to any control answer: specificity was not measured
    rows = _rows([1, 2, 3, 4], [float("nan")] * 4, [5, 5, 5, 5])
    (effect,) = feature_effects(rows)
    assert math.isnan(effect["control_effect"]) and not effect["verified"]
    assert any("control prompts not graded" in why for why in failed_conditions(
        effect["effect"], effect["spearman"], effect["control_effect"], effect["coherence_low_alpha"],
        controls_swept=effect["controls_swept"]))
    # a sweep that asked no control prompts at all is judged on the other conditions
    (no_controls,) = feature_effects([r for r in rows if r["kind"] != "control"])
    assert not no_controls["controls_swept"] and no_controls["verified"]


def test_a_flat_curve_with_grading_noise_has_no_rho():
    # feature 92 of the demo on the Zorvath rubric: 4.5 at three coherent strengths, in the last bits
    # 4.4999999997, 4.5, 4.5000000002 (offline grades are expected levels); their order is noise
    (effect,) = feature_effects(_rows([4.5 - 3e-10, 4.5, 4.5 + 2e-10, 1.0], [1, 1, 1, 1], [5, 5, 5, 1]))
    assert effect["coherent_alphas"] == [-1.0, 0.0, 1.0]
    assert math.isnan(effect["spearman"]) and not effect["verified"]
    (effect,) = feature_effects(_rows([4.4, 4.5, 4.6, 1.0], [1, 1, 1, 1], [5, 5, 5, 1]))
    assert effect["spearman"] == pytest.approx(1.0)  # a real rise, however small, keeps its order

    # noise that straddles a rounding boundary is still one tie (a tolerance, not rounding)
    (effect,) = feature_effects(_rows([4.0078125 - 3e-10, 4.0078125 + 1e-10, 4.0078125 + 2e-10, 1.0], [1, 1, 1, 1],
                                      [5, 5, 5, 1]))
    assert math.isnan(effect["spearman"])


def test_a_flat_transferred_arm_did_not_move_rather_than_was_not_measured():
    from evals.effects import transfer_failures

    arms = {"source": {"spearman": 0.95}, "transferred": {"spearman": float("nan"), "effect": 0.0},
            "random_transferred": {"spearman": 0.1, "draws": []}}
    assert "the transferred vector did not move the trait (a flat curve)" in transfer_failures(arms)
    arms["transferred"] = {"spearman": float("nan"), "effect": float("nan")}
    assert "the transferred arm was not measured" in transfer_failures(arms)
