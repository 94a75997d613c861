"""Verify: sweep samples, the LLM grader's prompt and parsing, a sweep graded by a scripted grader."""

from __future__ import annotations

import math

import pytest
import torch

from evals.prompts import load_prompt_set
from evals.rubrics import load_rubric
from evals.verify import grader_prompt, parse_score, sweep_samples


def test_sweep_crosses_prompts_kinds_and_alphas():
    prompts = load_prompt_set("zoo_state_narrative")
    samples = sweep_samples([{"feature": 3, "own_model": "b", "s_max": 2.5}], ["zoo_state_narrative"], [-1, 0, 1],
                            samples_per_prompt=2, max_prompts=3)
    kinds = [s.metadata["kind"] for s in samples]
    assert kinds.count("topic") == 3 * 3 * 2 and kinds.count("control") == 3 * 3 * 2 and kinds.count("generic") == 6
    assert {s.input for s in samples if s.metadata["kind"] == "topic"} == set(prompts.prompts[:3])
    assert len({s.id for s in samples}) == len(samples)
    assert all(s.metadata["s_max"] == 2.5 and s.metadata["rubric"] == "zoo_state_narrative" for s in samples)


def test_grader_prompt_contains_the_whole_rubric_and_scores_parse():
    rubric = load_rubric("zoo_state_narrative")
    prompt = grader_prompt(rubric)
    assert all(anchor.split()[0] in prompt for anchor in rubric.anchors.values())
    assert all(ex.response in prompt for ex in rubric.calibration)
    assert prompt.rstrip().endswith("SCORE: <1-5>")
    assert parse_score("It repeats the line.\nSCORE: 5") == 5.0
    assert parse_score("SCORE: 2 ... on reflection\n**SCORE:** 3") == 3.0
    assert math.isnan(parse_score("I would give it a four.")) and math.isnan(parse_score("SCORE: 9"))
    # a half point is kept; out of range, or the template's range echoed back, is no score
    assert parse_score("SCORE: 4.5") == 4.5 and parse_score("SCORE: 2.9") == 2.9 and parse_score("SCORE: 4.") == 4.0
    assert all(math.isnan(parse_score(r)) for r in ("SCORE: 5.5", "SCORE: 1-5", "SCORE: 3 - 4", "SCORE: 0"))
    # the final line decides, as the prompt asks, even when an example quoted above it carries a score
    assert parse_score("Like the example (Score: 5) but softer.\nSCORE: 3") == 3.0


@pytest.fixture(scope="module")
def scripted_grader():
    """A grader model that gives behaviour 4 and answers coherence prompts without a score."""
    from inspect_ai.model import ModelAPI, ModelOutput, ModelUsage, modelapi

    class Scripted(ModelAPI):
        async def generate(self, input, tools, tool_choice, config):
            system = input[0].text
            reply = "Fluent enough." if "Scale: coherence" in system else "Repeats the line.\nSCORE: 4"
            out = ModelOutput.from_content(model="scripted", content=reply)
            out.usage = ModelUsage(input_tokens=1, output_tokens=1, total_tokens=2)
            return out

    modelapi(name="scripted-test-grader")(lambda: Scripted)
    return "scripted-test-grader/any"


def test_llm_graded_sweep_keeps_unparsed_grades_as_missing(tiny_model_dirs, scripted_grader, tmp_path):
    from inspect_ai.model import get_model

    from crosscoder import Crosscoder, CrosscoderConfig
    from evals.verify import verify_task
    from evals.verify_stage import run_eval

    cfg = CrosscoderConfig(architecture="dfc", d_a=32, d_b=48, dict_size=10, k=2, exclusive_fraction=0.2,
                           norm_scale_a=1.0, norm_scale_b=1.0)
    cc = Crosscoder(cfg)
    with torch.no_grad():
        cc.W_dec_DB.normal_()
    cc.save(tmp_path / "cc")
    task = verify_task([{"feature": 9, "own_model": "b", "s_max": 1.0}], ["zoo_state_narrative"], [0.0, 1.0],
                       grader="grader", max_tokens=6, max_prompts=2)
    log = run_eval(task, tmp_path, model=get_model(f"steered/{tiny_model_dirs['qwen']}", crosscoder=str(tmp_path / "cc"),
                   side="b", layer=1), model_roles={"grader": get_model(scripted_grader)})
    assert log.status == "success" and len(log.samples) == (2 + 2 + 1) * 2
    # the log still names the package and version that provide the task (looked up once per process)
    assert "crosscoder-audit" in log.eval.packages
    for sample in log.samples:
        score = sample.scores["rubric_scorer"]
        assert score.value["behaviour"] == 4.0 and math.isnan(score.value["coherence"])
        assert score.metadata["unparsed"] == ["coherence"] and "SCORE: 4" in score.metadata["raw_behaviour"]
    metrics = {s.name: s.metrics for s in log.results.scores}
    assert metrics["behaviour"]["mean_graded"].value == pytest.approx(4.0)
    assert math.isnan(metrics["coherence"]["mean_graded"].value)


def test_distribution_scan_is_done_once_and_gives_the_same_answer():
    from importlib.metadata import packages_distributions

    from inspect_ai._util import package

    from evals.verify_stage import _scan_distributions_once

    _scan_distributions_once()
    _scan_distributions_once()  # a second call must not wrap the cache again
    cached = package.packages_distributions
    assert cached.cache_info is not None and not hasattr(cached.__wrapped__, "cache_info")
    assert cached() == packages_distributions() and cached() is cached()
    assert "crosscoder-audit" in cached()["evals"]
