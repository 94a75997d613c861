"""`audit plan`: what a run would compute, before it runs (the exact counts are checked against a real run
in test_runner.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from audit.cli import app
from audit.plan import GRADER_CALLS_PER_ANSWER, llm_totals, plan_audit
from audit.runner import AuditRunner
from audit.spec import load_spec
from evals.prompts import load_prompt_set
from evals.rubrics import load_rubric

ROOT = Path(__file__).resolve().parents[2]


def _plan(spec_path: Path, workspace: Path) -> dict:
    runner = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace)
    return {p.stage: p for p in plan_audit(runner)}


def _swept_prompts(rubric: str, max_prompts: int | None) -> int:
    prompts = load_prompt_set(load_rubric(rubric).prompt_set)
    return len(prompts.prompts[:max_prompts]) + len(prompts.control_prompts[:max_prompts]) + 1


def test_the_demo_in_an_empty_workspace_is_all_to_run_and_needs_no_llm(tmp_path):
    spec = load_spec(ROOT / "specs" / "demo.yaml")
    plans = _plan(ROOT / "specs" / "demo.yaml", tmp_path)
    assert [s for s, p in plans.items() if p.status == "cached"] == []
    assert plans["harvest"].status == plans["verify"].status == "to run"
    assert "width 64" in plans["models"].work and "width 96" in plans["models"].work  # alpha and beta
    assert "308 exclusive features" in plans["analyse"].work  # 2 × round(0.15 × 1024)
    # before anything is trained the verify count is an estimate: each rubric's candidates as distinct features
    v = spec.verify
    per_rubric = {r: _swept_prompts(r, v.max_prompts) for r in v.rubrics}
    sweeps = sum(per_rubric.values()) * v.features_per_rubric * len(v.alphas)
    baselines = 2 * sum(per_rubric.values())
    assert not plans["verify"].exact and plans["verify"].generations == sweeps + baselines
    assert llm_totals(list(plans.values())) == {}  # offline explainer and graders


def test_llm_roles_are_counted_per_model_and_cached_stages_are_left_out(tmp_path):
    raw = yaml.safe_load((ROOT / "specs" / "demo.yaml").read_text())
    raw["screen"]["explainer"] = "anthropic/claude-opus-4-1"
    raw["screen"]["detector"] = "anthropic/claude-haiku-4-5"
    raw["verify"]["grader"] = "anthropic/claude-opus-4-1"
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(raw))
    plans = _plan(path, tmp_path / "ws")
    verify, screen, transfer = plans["verify"], plans["screen"], plans["transfer"]
    assert verify.llm_calls == {"anthropic/claude-opus-4-1": GRADER_CALLS_PER_ANSWER * verify.generations}
    explained = raw["screen"]["max_features"] + raw["verify"]["features_per_rubric"] * len(raw["verify"]["rubrics"])
    assert screen.llm_calls == {"anthropic/claude-opus-4-1": explained,
                                "anthropic/claude-haiku-4-5": explained * 2 * 5}  # default detection_contexts 5
    # the transfer's grader defaults to verify's
    extraction = 2 * 2 * 10  # two source models × eliciting and suppressing × the trait's 10 questions
    assert transfer.llm_calls == {"anthropic/claude-opus-4-1": GRADER_CALLS_PER_ANSWER * (transfer.generations - extraction)}
    totals = llm_totals(list(plans.values()))
    assert totals["anthropic/claude-opus-4-1"] == sum(p.llm_calls.get("anthropic/claude-opus-4-1", 0)
                                                     for p in plans.values())
    screen.status = "cached"
    assert "anthropic/claude-haiku-4-5" not in llm_totals(list(plans.values()))


def test_the_command_prints_the_plan_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", str(ROOT / "specs" / "llama_vs_qwen.yaml"), "--workspace",
                                      str(tmp_path / "ws"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "calls to anthropic/" in result.output and "LLM calls of the stages still to run" in result.output
    payload = json.loads(out.read_text())
    assert [s["stage"] for s in payload["stages"]][:3] == ["models", "harvest", "train"]
    assert sum(payload["llm_calls_to_run"].values()) > 1000


def test_a_spec_that_does_not_parse_is_refused_with_the_field_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((ROOT / "specs" / "demo.yaml").read_text().replace("dict_size: 1024", "dict_size: -3"))
    result = CliRunner().invoke(app, ["plan", str(path), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2 and "dict_size" in result.output
