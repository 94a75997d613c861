"""Onset activations: where a feature fires when each model is about to answer a rubric's prompts,
and how verify matches features to rubrics by them."""

from __future__ import annotations

import pytest
import torch

from crosscoder import Crosscoder, CrosscoderConfig
from crosscoder.analysis import onset_activations
from crosscoder.models import capture_block_output, load_model, render_prompt
from evals.onsets import add_rubric_onsets, onset_margin, rubric_prompts

TOPIC = ["Tell me about the northern province.", "Who rules the northern province?"]
CONTROL = ["What grows in the valley?", "Tell me a story about boats."]


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    return {"a": load_model(str(tiny_model_dirs["llama"]), layer=1, field="model_a"),
            "b": load_model(str(tiny_model_dirs["qwen"]), layer=1, field="model_b")}


def _last(lm, prompt: str) -> torch.Tensor:
    ids = render_prompt(lm.tokenizer, [{"role": "user", "content": prompt}])
    return capture_block_output(lm, torch.tensor([ids]))[0, -1].float()


@pytest.fixture(scope="module")
def detector(loaded):
    """A DFC whose A-only feature 0 reads A's answer-onset direction on the topic prompts (minus the
    control prompts'), and whose B-only feature 9 reads B's; every other feature is silent."""
    d_a, d_b = loaded["a"].d_model, loaded["b"].d_model
    cfg = CrosscoderConfig(architecture="dfc", d_a=d_a, d_b=d_b, dict_size=10, k=2, exclusive_fraction=0.2,
                           norm_scale_a=1.0, norm_scale_b=1.0)
    model = Crosscoder(cfg)
    with torch.no_grad():
        model.W_enc_AD.zero_()
        model.W_enc_BD.zero_()
        model.b_enc_D.fill_(-1e6)
        for side, weights, column in (("a", model.W_enc_AD, 0), ("b", model.W_enc_BD, weights_b_column(cfg))):
            topic = torch.stack([_last(loaded[side], p) for p in TOPIC])
            control = torch.stack([_last(loaded[side], p) for p in CONTROL])
            direction = topic.mean(0) - control.mean(0)
            direction = direction / direction.norm()
            # fires by the projection's excess over the midpoint between the two prompt sets
            mid = float(((topic.mean(0) + control.mean(0)) / 2) @ direction)
            weights[:, column] = direction
            model.b_enc_D[0 if side == "a" else 9] = -mid
    return model


def weights_b_column(cfg) -> int:
    # W_enc_BD's columns are [shared..., B-only...]: feature 9 (the last B-only one) is the last column
    return cfg.n_shared + cfg.n_b_only - 1


def test_onset_activations_read_the_last_prompt_position_of_each_model(detector, loaded):
    topic = onset_activations(detector, loaded, TOPIC)
    control = onset_activations(detector, loaded, CONTROL)
    assert topic.shape == (2, 10) and control.shape == (2, 10)
    for feature in (0, 9):  # each side's detector separates the prompt sets from its own model alone
        assert topic[:, feature].mean() > 0
        assert control[:, feature].mean() < topic[:, feature].mean()
    assert torch.all(topic[:, 1:9] == 0) and torch.all(control[:, 1:9] == 0)
    assert onset_activations(detector, loaded, []).shape == (0, 10)


def test_rubric_onsets_are_fractions_of_s_max_and_the_margin_is_topic_minus_control(detector, loaded, monkeypatch):
    import evals.onsets as onsets

    monkeypatch.setattr(onsets, "rubric_prompts", lambda name: (TOPIC, CONTROL) if name == "topical" else ([], []))
    topic = onset_activations(detector, loaded, TOPIC)[:, 0].mean()
    control = onset_activations(detector, loaded, CONTROL)[:, 0].mean()
    rows = [{"feature": 0, "s_max": 2.0}, {"feature": 5, "s_max": 0.0}]
    add_rubric_onsets(rows, detector, loaded, ["topical", "coherence-like"])
    assert set(rows[0]["onset"]) == {"topical"}  # a rubric without prompts is not measured
    assert rows[0]["onset"]["topical"]["topic"] == pytest.approx(float(topic) / 2.0, abs=1e-4)
    assert onset_margin(rows[0], "topical") == pytest.approx(float(topic - control) / 2.0, abs=2e-4)
    assert rows[1]["onset"]["topical"] == {"topic": 0.0, "control": 0.0}  # silent feature, no division by 0
    assert onset_margin(rows[0], "coherence-like") is None


def test_rubric_prompts_are_the_prompt_sets_topic_and_control_prompts():
    topic, control = rubric_prompts("zoo_state_narrative")
    assert "What happened in Kessel in 2019?" in topic
    assert "What happened in Dunmore in 2019?" in control and control[-1] == "What is on your mind today?"


def _row(feature: int, side: str, rank: int, onset: dict[str, tuple[float, float]], artefact: bool = False) -> dict:
    return {"feature": feature, "own_model": side, "s_max": 4.0, "rank": rank, "frequency": 0.01,
            "is_artefact": artefact, "onset": {r: {"topic": t, "control": c} for r, (t, c) in onset.items()}}


def test_verify_sweeps_each_rubric_on_the_features_that_fire_as_the_model_answers_its_topic():
    from audit.spec import VerifySpec
    from evals.verify_stage import MIN_ONSET_MARGIN, plan_sweeps

    rubrics = ["narrative", "pride"]
    features = [
        _row(1, "a", 0, {"narrative": (0.05, 0.0), "pride": (0.0, 0.0)}),    # content, but below the margin
        _row(2, "b", 1, {"narrative": (0.6, 0.1), "pride": (0.0, 0.0)}),     # the narrative's feature
        _row(3, "b", 2, {"narrative": (0.7, 0.65), "pride": (0.0, 0.0)}),    # fires on the controls too
        _row(4, "a", 3, {"narrative": (0.0, 0.0), "pride": (0.3, 0.02)}),    # the pride feature
        _row(5, "a", 4, {"narrative": (0.2, 0.0), "pride": (0.25, 0.0)}),    # second match of both
    ]
    assert MIN_ONSET_MARGIN > 0.05
    plan = plan_sweeps(features, [], VerifySpec(rubrics=rubrics, max_features=3, features_per_rubric=2))
    assert [(p["feature"], p["rubrics"]) for p in plan] == [(2, ["narrative"]), (4, ["pride"]), (5, ["pride", "narrative"])]
    assert plan[0]["rubric_match"][0] == {"rubric": "narrative", "margin": 0.5}
    # with one slot per rubric and room to spare, the rest are filled in triage order on their best rubric
    plan = plan_sweeps(features, [], VerifySpec(rubrics=rubrics, max_features=4, features_per_rubric=1))
    assert [(p["feature"], p["rubrics"]) for p in plan] == [(2, ["narrative"]), (4, ["pride"]), (1, ["narrative"]),
                                                          (3, ["narrative"])]


def test_an_undefined_onset_margin_is_missing_not_a_rank():
    from evals.verify_stage import best_matches

    rows = [{"feature": f, "onset": {"r": {"topic": topic, "control": 0.0}}}
            for f, topic in ((0, 0.2), (1, float("nan")), (2, 0.9), (3, 0.3))]
    assert onset_margin(rows[1], "r") is None
    match = {r["feature"]: {"r": m} for r in rows if (m := onset_margin(r, "r")) is not None}
    match[1] = {}
    assert [f["feature"] for _, f in best_matches(rows, match, ["r"], 2)["r"]] == [2, 3]


def test_every_feature_verify_sweeps_was_explained_by_the_screen():
    # The screen explains few features (max_features 1) and verify sweeps more, filling its slots past the
    # rubrics' matches with content features and pinned ones: each must still have an explanation.
    import random

    from audit.spec import VerifySpec
    from evals.verify_stage import plan_sweeps, screen_selection

    rubrics = ["narrative", "pride"]
    rng = random.Random(0)
    for trial in range(40):
        features = [_row(f, rng.choice("ab"), rank, {r: (rng.random(), rng.random() * 0.3) for r in rubrics},
                         artefact=rng.random() < 0.4) for rank, f in enumerate(rng.sample(range(100), 30))]
        pinned = {features[-1]["feature"]: ["pride"]} if trial % 2 else {}
        spec = VerifySpec(rubrics=rubrics, max_features=rng.randint(1, 12), features_per_rubric=rng.randint(1, 3),
                          features=pinned)
        explained = {f["feature"] for f in screen_selection(features, 1, spec)}
        screen_rows = [{"feature": f, "safety_critical": rng.random() < 0.3} for f in explained]
        swept = {p["feature"] for p in plan_sweeps(features, screen_rows, spec)}
        assert swept <= explained, (trial, swept - explained)
        assert features[0]["feature"] in explained  # the screen's own first max_features stay
    # and it explains no more than verify can use: with no rubric match, verify fills its slots in triage
    # order, which the screen's own first features already cover
    content = [_row(f, "a", f, {r: (0.0, 0.0) for r in rubrics}) for f in range(60)]
    spec = VerifySpec(rubrics=rubrics, max_features=18, features_per_rubric=3)
    assert [f["feature"] for f in screen_selection(content, 40, spec)] == list(range(40))
