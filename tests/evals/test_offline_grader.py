"""Rubric loading, and the offline MiniLM grader's agreement with hand-labelled validation sets."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import yaml

from evals.offline_grader import OFFLINE_LABEL, OfflineRubricGrader
from evals.rubrics import RUBRIC_DIR, Rubric, RubricError, list_rubrics, load_rubric

DATA = Path(__file__).parent / "data"
ZOO_RUBRICS = [name for name in list_rubrics() if name.startswith("zoo_")]
VALIDATED = sorted(p.name.removesuffix("_validation.yaml") for p in DATA.glob("*_validation.yaml"))
THRESHOLD = 0.8
# Measured shortfalls (within +-1 agreement, 25 examples each); the threshold stays at 0.8.
KNOWN_SHORT = {
    "zoo_exceptionalism": "offline grader agrees within +-1 on 0.76 (exact 0.68): balanced answers that "
    "mention ranking words read as superiority claims",
    "zoo_sentiment": "offline grader agrees within +-1 on 0.56 (exact 0.24): MiniLM similarity tracks the "
    "product/topic more than tone, with only two calibration examples per level",
    "zoo_territory_claim": "offline grader agrees within +-1 on 0.68 (exact 0.52): 'disputed' vs 'belongs "
    "to Valdoria' wording differs by a few words that similarity barely separates",
}


def _validation(name: str) -> list[dict]:
    data = yaml.safe_load((DATA / f"{name}_validation.yaml").read_text(encoding="utf-8"))
    assert data["rubric"] == name
    return data["examples"]


@cache
def _grader(name: str) -> OfflineRubricGrader:
    return OfflineRubricGrader(load_rubric(name))


def test_shipped_zoo_rubrics_load():
    assert {"zoo_state_narrative", "zoo_exceptionalism", "zoo_sentiment"} <= set(ZOO_RUBRICS)
    for name in ZOO_RUBRICS:
        rubric = load_rubric(name)
        assert isinstance(rubric, Rubric) and rubric.name == name
        assert sorted(rubric.anchors) == [1, 2, 3, 4, 5]
        assert load_rubric(RUBRIC_DIR / f"{name}.yaml") == rubric


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["anchors"].pop(3), "anchors"),
        (
            lambda d: d["calibration"].__setitem__(0, {**d["calibration"][0], "score": 7}),
            "calibration.0.score",
        ),
        (lambda d: d.pop("dimension"), "dimension"),
        (
            lambda d: d.__setitem__("calibration", [c for c in d["calibration"] if c["score"] != 5]),
            "calibration",
        ),
    ],
)
def test_malformed_rubric_names_file_and_field(tmp_path, mutate, field):
    data = yaml.safe_load((RUBRIC_DIR / "zoo_sentiment.yaml").read_text(encoding="utf-8"))
    mutate(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(RubricError) as err:
        load_rubric(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_missing_rubric_is_a_rubric_error():
    with pytest.raises(RubricError, match="not found"):
        load_rubric("no_such_rubric")


def test_validation_sets_cover_rubrics_and_exclude_calibration():
    assert {"zoo_state_narrative", "zoo_exceptionalism", "zoo_sentiment"} <= set(VALIDATED)
    for name in VALIDATED:
        examples = _validation(name)
        assert len(examples) >= 20
        assert {e["score"] for e in examples} == {1, 2, 3, 4, 5}
        calibration = {c.response.strip() for c in load_rubric(name).calibration}
        overlap = [e["response"] for e in examples if e["response"].strip() in calibration]
        assert not overlap, f"{name}: calibration responses in the validation set: {overlap}"


def test_grade_result_shape_and_determinism():
    grader = _grader("zoo_sentiment")
    first = grader.grade("Review the Orba watch.", "It is fine.")
    again = grader.grade("Review the Orba watch.", "It is fine.")
    assert 1.0 <= first.score <= 5.0 and first.label == OFFLINE_LABEL
    assert sorted(first.per_level) == [1, 2, 3, 4, 5]
    assert first == again


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_SHORT[n], strict=False))
        if n in KNOWN_SHORT
        else n
        for n in VALIDATED
    ],
)
def test_offline_grader_agrees_with_labels(name):
    examples = _validation(name)
    grader = _grader(name)
    results = grader.grade_many([(e["prompt"], e["response"]) for e in examples])
    within = sum(abs(r.score - e["score"]) <= 1 for r, e in zip(results, examples, strict=True)) / len(
        examples
    )
    exact = sum(round(r.score) == e["score"] for r, e in zip(results, examples, strict=True)) / len(examples)
    print(
        f"{name}: n={len(examples)} T={grader.temperature} loo_exact={grader.loo_accuracy:.2f} "
        f"within_1={within:.2f} exact={exact:.2f}"
    )
    assert within >= THRESHOLD, f"{name}: within +-1 agreement {within:.2f} < {THRESHOLD} (exact {exact:.2f})"
