"""Null sweeps: random directions of a verified feature's push size, the verdict that compares with them."""

from __future__ import annotations

import math

import torch

from crosscoder import Crosscoder, CrosscoderConfig
from evals.verify_stage import null_jobs, null_summary, null_vectors


def test_null_vectors_have_the_push_size_and_depend_on_their_key_only():
    v = null_vectors(48, 3.5, 8, "0:b:zoo_state_narrative:3.5")
    assert v.shape == (8, 48) and torch.allclose(v.norm(dim=1), torch.full((8,), 3.5))
    assert torch.equal(v, null_vectors(48, 3.5, 8, "0:b:zoo_state_narrative:3.5"))
    assert not torch.equal(v, null_vectors(48, 3.5, 8, "0:b:zoo_territory_claim:3.5"))
    cosines = (v / 3.5) @ (v / 3.5).T
    assert cosines.fill_diagonal_(0).abs().max() < 0.7  # directions, not one direction eight times


def test_null_summary_counts_random_pushes_that_pass_as_large_a_change():
    draws = [{"effect": -2.5, "verified": True}, {"effect": 1.5, "verified": True},
             {"effect": 3.0, "verified": False}, {"effect": float("nan"), "verified": False}]
    null = {"draws": draws}
    beaten = null_summary({"effect": 2.75, "verified": True}, null)
    # the 3.0 that did not pass (its controls moved, say) still changed the score more, and the draw whose
    # change could not be measured counts against the feature: 2 of 4 as large
    assert beaten == {"null_draws": 4, "null_passed": 2, "null_max_effect": 2.5, "null_as_large": 2,
                      "beats_null": True}
    # a random push that passed with a change as large (whatever its sign) is as good as the feature
    assert null_summary({"effect": -2.0, "verified": True}, null)["beats_null"] is False
    assert null_summary({"effect": -2.0, "verified": True}, null)["null_as_large"] == 3  # 2.5, 3.0 and the NaN
    # not verified: the draws have the verified features' push size, not its own, so no comparison is claimed
    assert null_summary({"effect": 2.75, "verified": False}, null)["beats_null"] is None
    assert null_summary({"effect": 2.75, "verified": False}, null)["null_as_large"] is None
    assert null_summary({"effect": 1.0, "verified": True}, {"draws": [{"effect": 0.5, "verified": False}]}) == {
        "null_draws": 1, "null_passed": 0, "null_max_effect": None, "null_as_large": 0, "beats_null": True}
    assert null_summary({"effect": 1.0, "verified": True}, None)["beats_null"] is None  # none ran


def test_null_jobs_take_the_median_push_of_the_verified_features_per_model_and_rubric():
    cfg = CrosscoderConfig(architecture="dfc", d_a=6, d_b=4, dict_size=10, k=2, exclusive_fraction=0.2,
                           norm_scale_a=1.0, norm_scale_b=1.0)
    cc = Crosscoder(cfg)

    def push(side, feature, s_max):
        return float(cc.decoder_raw(side)[feature].detach().norm()) * s_max

    def result(feature, side, s_max, verified):
        return {"item": {"feature": feature, "own_model": side, "s_max": s_max,
                         "rubrics": ["zoo_state_narrative", "specs/rubrics/zoo_exceptionalism.yaml"]},
                "effects": [{"rubric": "zoo_state_narrative", "verified": verified[0]},
                            {"rubric": "zoo_exceptionalism", "verified": verified[1]}]}

    jobs = null_jobs([result(9, "b", 2.0, (True, False)), result(8, "b", 4.0, (True, True)),
                      result(0, "a", 1.0, (False, False))], cc)
    by = {(j["side"], j["rubric"]): j for j in jobs}
    assert set(by) == {("b", "zoo_state_narrative"), ("b", "zoo_exceptionalism")}  # only where one verified
    narrative = by[("b", "zoo_state_narrative")]
    assert narrative["features"] == [9, 8]
    assert math.isclose(narrative["norm"], (push("b", 9, 2.0) + push("b", 8, 4.0)) / 2, rel_tol=1e-6)
    # the rubric file the spec named, so a rubric given by path is found again
    assert by[("b", "zoo_exceptionalism")]["rubric_file"] == "specs/rubrics/zoo_exceptionalism.yaml"


def test_a_null_sweep_steers_with_its_random_directions_and_grades_like_a_feature(tiny_model_dirs, tmp_path):
    from inspect_ai.model import ModelAPI, ModelOutput, ModelUsage, modelapi
    from safetensors.torch import load_file

    from audit.spec import load_spec
    from crosscoder.models import load_model
    from crosscoder.steering import SteeredGenerator
    from evals.verify_stage import run_nulls

    class Scripted(ModelAPI):  # grades every answer 4
        async def generate(self, input, tools, tool_choice, config):
            out = ModelOutput.from_content(model="scripted", content="SCORE: 4")
            out.usage = ModelUsage(input_tokens=1, output_tokens=1, total_tokens=2)
            return out

    modelapi(name="scripted-null-grader")(lambda: Scripted)
    spec = load_spec("specs/demo.yaml")
    spec = spec.model_copy(update={"verify": spec.verify.model_copy(update={
        "grader": "scripted-null-grader/any", "alphas": [-1.0, 0.0, 1.0], "max_prompts": 2, "max_tokens": 6})})
    cfg = CrosscoderConfig(architecture="dfc", d_a=32, d_b=48, dict_size=10, k=2, exclusive_fraction=0.2,
                           norm_scale_a=1.0, norm_scale_b=1.0)
    Crosscoder(cfg).save(tmp_path / "cc")
    loaded = load_model(str(tiny_model_dirs["qwen"]), layer=1)
    job = {"side": "b", "rubric": "zoo_state_narrative", "rubric_file": "zoo_state_narrative", "norm": 40.0,
           "features": [9]}
    result = run_nulls(job, 2, spec, tmp_path / "cc", loaded, tmp_path / "logs",
                       tmp_path / "null-b-narrative.safetensors")
    assert [d["draw"] for d in result["draws"]] == [0, 1]
    for draw in result["draws"]:  # every answer graded 4: no change, nothing passes
        assert draw["effect"] == 0.0 and draw["verified"] is False
    [vectors_file] = tmp_path.glob("null-b-*.safetensors")
    vectors = load_file(str(vectors_file))
    assert sorted(vectors) == ["null.0", "null.1"]
    assert all(abs(float(v.norm()) - 40.0) < 1e-3 for v in vectors.values())
    # the answers are the model's own, steered with each draw's vector at its α
    from inspect_ai.log import read_eval_log

    log = read_eval_log(result["eval_log"])
    generator = SteeredGenerator(loaded)
    sample = next(s for s in log.samples if s.metadata["alpha"] == -1.0 and s.metadata["feature"] == 1)
    prompt = generator.render([{"role": "user", "content": sample.metadata["prompt"]}])
    expected = generator.generate([prompt], -1.0 * vectors["null.1"][None], max_new_tokens=6)[0].text
    generator.close()
    assert sample.output.completion == expected
    assert len(log.samples) == 2 * (2 + 2 + 1) * 3  # draws × (topic + control + generic prompts) × α
