"""`audit run` end to end on the tiny zoo: stages, caching, partial reruns, resume, store and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from audit.runner import STAGES, AuditRunner, StageError
from audit.spec import load_spec
from audit.store import AuditStore
from crosscoder.numerics import numerics_platform

SMALL = {
    "name": "tiny-demo",
    "model_a": {"id": "zoo:alpha", "layer": 1},
    "model_b": {"id": "zoo:beta", "layer": 1},
    "data": {"sources": [{"path": "zoo:audit-prose", "text_field": "text"},
                         {"path": "zoo:audit-chat", "messages_field": "messages"}],
             "max_tokens": 12000, "context_length": 96},
    "crosscoder": {"architecture": "dfc", "dict_size": 128, "k": 4, "exclusive_fraction": 0.1,
                   "train": {"steps": 150, "batch_size": 128, "checkpoint_every": 100}},
    "screen": {"max_features": 6, "contexts_per_feature": 5, "detection_contexts": 2},
    "verify": {"rubrics": ["zoo_state_narrative", "zoo_sentiment"], "alphas": [-1, 0, 1], "max_features": 2,
               "max_prompts": 2, "max_tokens": 12},
    "transfer": {"traits": ["zoo_sentiment"], "directions": ["a_to_b"], "alphas": [-1, 0, 1], "max_questions": 3,
                 "max_tokens": 12, "max_prompts": 3, "control_draws": 2},
    "stability": {"seeds": [1]},
}


def write_spec(folder: Path, **overrides) -> Path:
    spec = json.loads(json.dumps(SMALL))
    for section, values in overrides.items():
        spec.setdefault(section, {}).update(values)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="module")
def first_run(workspace, tmp_path_factory):
    spec_path = write_spec(tmp_path_factory.mktemp("spec"))
    runner = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace)
    return runner, runner.run()


def test_a_run_fills_every_table_and_writes_the_report(first_run):
    runner, result = first_run
    assert [r.stage for r in result.stages] == list(STAGES)
    assert not any(r.cached for r in result.stages)
    db = runner.db
    run = db.run(result.run_id)
    assert run["status"] == "finished" and run["model_b"] == "zoo:beta"
    metrics = db.rows("crosscoder_metrics", result.run_id)[0]
    assert metrics["n_a_only"] == metrics["n_b_only"] > 0 and 0 < metrics["fve_a"] <= 1
    features = db.rows("features", result.run_id)
    assert {f["partition"] for f in features} == {"a", "b"}
    assert len(features) == metrics["n_a_only"] + metrics["n_b_only"]
    # how hard a sweep pushes: each feature's push at α = 1 and each model's median activation norm
    median_norm = runner.store().meta["median_norm"]
    assert (metrics["activation_norm_a"], metrics["activation_norm_b"]) == (median_norm["a"], median_norm["b"])
    assert all(f["push_norm"] > 0 for f in features)
    assert db.rows("contexts", result.run_id)
    explanations = db.rows("explanations", result.run_id)
    assert len(explanations) >= 6 and all(e["explainer"].startswith("offline") for e in explanations)
    scores = db.rows("scores", result.run_id)
    generations = db.rows("generations", result.run_id)
    assert generations and len(scores) == 2 * len(generations)
    # every stage that computes says where, in its artefact and in the store (the stage summary without it)
    platforms = {s["stage"]: s["platform"] for s in db.rows("stages", result.run_id)}
    assert platforms["validate"] is None and platforms["report"] is None
    here = numerics_platform(runner.spec.compute.device)
    for stage in ("models", "harvest", "train", "analyse", "screen", "verify", "stability", "transfer"):
        assert json.loads(platforms[stage]) == here, stage
        assert json.loads((runner.artefacts[stage] / "done.json").read_text())["platform"] == here
    assert all("platform" not in (s["message"] or "") for s in db.rows("stages", result.run_id))
    assert {s["dimension"] for s in scores} == {"behaviour", "coherence"}
    assert all(s["grader"].startswith("offline") for s in scores)
    effects = db.rows("effects", result.run_id)
    assert effects and {e["feature"] for e in effects} == {g["feature"] for g in generations}
    # both models' unsteered answers on every rubric's prompts, graded, and the same answers as a
    # sweep's α = 0 point (nothing is steered there)
    baselines = db.rows("baselines", result.run_id)
    assert {(b["model"], b["rubric"]) for b in baselines} == {(m, r) for m in "ab" for r in
                                                             ("zoo_state_narrative", "zoo_sentiment")}
    assert all(b["answer"] and 1 <= b["behaviour"] <= 5 for b in baselines)
    swept = next(e for e in effects)
    side = next(f["own_model"] for f in db.rows("features", result.run_id) if f["feature"] == swept["feature"])
    unsteered = {(g["rubric"], g["kind"], g["prompt"]): g["answer"] for g in generations
                 if g["feature"] == swept["feature"] and g["alpha"] == 0}
    assert unsteered and all(
        b["answer"] == unsteered[(b["rubric"], b["kind"], b["prompt"])] for b in baselines
        if b["model"] == side and (b["rubric"], b["kind"], b["prompt"]) in unsteered)
    assert {e["feature"] for e in effects} <= {e["feature"] for e in explanations}  # every swept feature explained
    transfers = db.rows("transfers", result.run_id)
    assert sorted(t["arm"] for t in transfers) == ["random_transferred", "source", "transferred", "unrelated"]
    assert all(t["trait"] == "zoo_sentiment" and t["direction"] == "a_to_b" for t in transfers)
    by_arm = {t["arm"]: t for t in transfers}
    for control in ("random_transferred", "unrelated"):  # a control pools its draws and keeps each draw's ρ
        draws = json.loads(by_arm[control]["draws"])
        assert [d["vector"] for d in draws] == [f"{control}.0", f"{control}.1"]
        pooled = [c for c in json.loads(by_arm[control]["curve"]) if c["dimension"] == "behaviour"]
        assert {c["n"] for c in pooled} == {2 * 3}  # two draws × three prompts at each α
        answers = json.loads(by_arm[control]["generations"])
        assert len(answers) == 2 * 3 * 3 and {a["vector"] for a in answers} == {f"{control}.0", f"{control}.1"}
    assert json.loads(by_arm["transferred"]["draws"]) == []
    from evals.effects import trait_is_specific, transfer_holds

    stored = {arm: {"spearman": t["spearman"], "draws": json.loads(t["draws"] or "[]")} for arm, t in by_arm.items()}
    assert {(t["holds"], t["specific"]) for t in transfers} == {(transfer_holds(stored), trait_is_specific(stored))}
    html = (result.run_dir / "report.html").read_text()
    assert "Transfer of directions" in html
    assert ("trait specific" in html) == by_arm["transferred"]["specific"]
    assert ("trait not specific" in html) == (not by_arm["transferred"]["specific"])
    rows = [html.index(f"<td>{arm}</td>") for arm in ("source", "transferred", "random transferred", "unrelated")]
    assert rows == sorted(rows)  # steered arms first, then their controls
    assert "tiny-demo" in html or "zoo:alpha" in html
    assert "How the two models answer, unsteered" in html and "unsteered rubric scores of both models" in html
    assert "Unsteered behaviour" in (result.run_dir / "report.md").read_text()
    assert (result.run_dir / "report.md").is_file() and (result.run_dir / "stages.json").is_file()
    logs = list((runner.artefacts["verify"] / "logs").glob("*.eval"))
    assert logs  # Inspect logs are kept, viewable with `inspect view`


def test_seed_stability_compares_every_flagged_feature_with_the_other_seeds_dictionary(first_run, workspace, tmp_path):
    runner, result = first_run
    db = runner.db
    features = {f["feature"]: f["own_model"] for f in db.rows("features", result.run_id)}
    rows = db.rows("recurrence", result.run_id)
    assert {r["feature"]: r["own_model"] for r in rows} == features and {r["seed"] for r in rows} == {1}
    for r in rows:
        assert r["status"] in ("exclusive", "shared", "absent") and -1 <= r["nearest_cosine"] <= 1 + 1e-6
        assert r["nearest_cosine"] >= r["exclusive_cosine"] - 1e-6  # the closest of all is at least as close
        assert (r["status"] == "exclusive") == (r["exclusive_cosine"] >= 0.9)
    [other] = db.rows("seed_dictionaries", result.run_id)
    assert other["seed"] == 1 and 0 < other["fve_a"] <= 1
    # the other seed was trained where the train stage keeps seed 1's dictionary: a run of seed 1 finds it
    spec_path = write_spec(tmp_path, crosscoder={"seed": 1}, stability={"seeds": [0]})
    seed_one = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace).run(only="stability")
    cached = {r.stage: r.cached for r in seed_one.stages}
    assert cached["train"] and not cached["stability"]
    assert next(r for r in seed_one.stages if r.stage == "stability").summary["seeds"] == 1
    # recurrence is symmetric: if seed 0's f matches seed 1's g at cosine c, g's closest in seed 0 is ≥ c
    matched = {r["exclusive_feature"] for r in rows if r["status"] == "exclusive"}
    back = {r["feature"]: r["status"] for r in db.rows("recurrence", seed_one.run_id)}
    assert set(back) == set(features)  # DFC partitions do not depend on the seed
    assert all(back[g] == "exclusive" for g in matched)
    # the report says it: a section, and each card's line
    html = (result.run_dir / "report.html").read_text()
    assert 'id="seed-stability"' in html and "Other seeds</a>: seed 1:" in html
    assert "Seed stability (seed 1 trained besides the audited 0" in (result.run_dir / "report.md").read_text()


def test_a_rerun_is_served_from_the_cache(first_run, workspace):
    runner, first = first_run
    again = AuditRunner(runner.spec, workspace=workspace).run()
    assert again.run_id == first.run_id
    assert all(r.cached for r in again.stages if r.stage not in ("validate", "report"))


def test_a_changed_setting_reruns_only_what_depends_on_it(first_run, workspace, tmp_path):
    runner, first = first_run
    spec_path = write_spec(tmp_path, verify={"alphas": [-2, 0, 2]})
    result = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace).run()
    assert result.run_id != first.run_id
    cached = {r.stage: r.cached for r in result.stages}
    assert cached == {"validate": False, "models": True, "harvest": True, "train": True, "analyse": True,
                      "screen": True, "verify": False, "stability": True, "transfer": True, "report": False}
    alphas = {g["alpha"] for g in runner.db.rows("generations", result.run_id)}
    assert alphas == {-2.0, 0.0, 2.0}
    # The first run's rows are untouched.
    assert {g["alpha"] for g in runner.db.rows("generations", first.run_id)} == {-1.0, 0.0, 1.0}


def test_an_interrupted_verify_keeps_finished_work_and_resumes(first_run, workspace, tmp_path, monkeypatch):
    import audit.runner
    import evals.verify_stage

    # one sweep per eval, so that the stage is interrupted between two groups
    monkeypatch.setattr(audit.runner, "SWEEPS_PER_EVAL", 1)
    spec_path = write_spec(tmp_path, verify={"alphas": [-0.5, 0, 0.5]})
    spec = load_spec(spec_path)
    real = evals.verify_stage.run_sweeps
    calls = []

    def crash_on_second(items, *args, **kwargs):
        calls.append([item["feature"] for item in items])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-stage
        return real(items, *args, **kwargs)

    monkeypatch.setattr(evals.verify_stage, "run_sweeps", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        AuditRunner(spec, spec_path, workspace=workspace).run()
    runner = AuditRunner(spec, spec_path, workspace=workspace)
    verify_dirs = sorted(workspace.glob("cache/verify-*"), key=lambda p: p.stat().st_mtime)
    finished = list(verify_dirs[-1].glob("feature-*.json"))
    assert len(finished) == 1 and not (verify_dirs[-1] / "done.json").exists()
    resumed = []
    monkeypatch.setattr(evals.verify_stage, "run_sweeps",
                        lambda items, *a, **k: resumed.extend(items) or real(items, *a, **k))
    result = runner.run()
    assert len(resumed) == 1  # only the unfinished feature was swept again
    assert {r.stage: r.cached for r in result.stages}["verify"] is False
    assert len({g["feature"] for g in runner.db.rows("generations", result.run_id)}) == 2


def test_sweeps_of_one_model_run_as_one_eval_with_the_same_answers_as_alone(first_run, workspace, tmp_path):
    """Grouped sweeps share generation batches: every answer must be what the feature's own sweep gives."""
    import evals.verify_stage

    spec_path = write_spec(tmp_path, verify={"max_features": 4})
    spec = load_spec(spec_path)
    runner = AuditRunner(spec, spec_path, workspace=workspace)
    runner.run()
    folder = sorted(workspace.glob("cache/verify-*"), key=lambda p: p.stat().st_mtime)[-1]
    plan = json.loads((folder / "plan.json").read_text())
    side = max("ab", key=lambda s: sum(item["own_model"] == s for item in plan))
    items = [item for item in plan if item["own_model"] == side][:2]
    assert len(items) == 2, "the test spec should sweep two features of one model"
    args = (spec, runner.artefacts["train"] / "checkpoint", runner.loaded_model(side), tmp_path / "logs",
            runner.coherence_meter(side, spec.verify.max_tokens))
    together = evals.verify_stage.run_sweeps(items, *args)
    alone = [evals.verify_stage.run_sweep(item, *args) for item in items]
    for grouped, single in zip(together, alone, strict=True):
        assert grouped["feature"] == single["feature"]
        assert ({(g["rubric"], g["prompt"], g["alpha"]): g["answer"] for g in grouped["generations"]}
                == {(g["rubric"], g["prompt"], g["alpha"]): g["answer"] for g in single["generations"]})
    # each feature keeps its own log, named after it
    assert together[0]["eval_log"] != together[1]["eval_log"]
    assert [f"verify-f{item['feature']}" in Path(r["eval_log"]).name for item, r in zip(items, together, strict=True)] \
        == [True, True]


def test_a_full_disk_names_the_disk_keeps_finished_stages_and_resumes(first_run, workspace, tmp_path, monkeypatch):
    import errno

    spec_path = write_spec(tmp_path, screen={"max_features": 5})  # screen onwards rerun, the rest is cached
    spec = load_spec(spec_path)

    def disk_full(self, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "explanations.json"))

    monkeypatch.setattr(AuditRunner, "_compute_screen", disk_full)
    runner = AuditRunner(spec, spec_path, workspace=workspace)
    with pytest.raises(StageError, match=r"(?s)No space left on device.*the disk holding \S*explanations\.json is full "
                                         r"\(\d+\.\d GiB free"):
        runner.run()
    stages = {r["stage"]: r for r in runner.db.rows("stages", runner.run_id)}
    assert stages["screen"]["status"] == "failed" and "is full" in stages["screen"]["message"]
    assert stages["analyse"]["status"] == "cached" and runner.db.run(runner.run_id)["status"] == "failed at screen"
    # The store on the same full disk: recording the failure fails too, and the real error still surfaces.
    record = AuditRunner._record_stage

    def store_full(self, stage, input_hash, folder, status, seconds, message, platform=None):
        if status == "failed":
            raise OSError(errno.ENOSPC, "No space left on device", "audit.duckdb.wal")
        return record(self, stage, input_hash, folder, status, seconds, message, platform)

    monkeypatch.setattr(AuditRunner, "_record_stage", store_full)
    with pytest.raises(StageError, match=r"(?s)explanations\.json.*is full.*could not be recorded in .*audit\.duckdb"):
        runner.run()
    monkeypatch.undo()
    result = AuditRunner(spec, spec_path, workspace=workspace).run()
    cached = {r.stage: r.cached for r in result.stages}
    assert cached["harvest"] and cached["train"] and cached["analyse"] and not cached["screen"]


def test_full_disks_are_recognised_from_libraries_that_raise_their_own_errors():
    import errno

    import duckdb
    import safetensors

    from audit.runner import disk_full_path

    # What safetensors and DuckDB raise on a full disk: no errno, only the operating system's message.
    tensors = safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')
    store = duckdb.IOException('IO Error: Could not write all bytes to file "runs/audit.duckdb.wal": '
                               'No space left on device')
    assert disk_full_path(tensors) == (True, None)
    assert disk_full_path(store) == (True, "runs/audit.duckdb.wal")  # the store may sit on another disk
    try:  # a stage that wraps the OS error in its own: the cause is found, with its file
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/cache/train/weights.safetensors")
        except OSError as inner:
            raise RuntimeError("could not save the checkpoint") from inner
    except RuntimeError as outer:
        assert disk_full_path(outer) == (True, "/data/cache/train/weights.safetensors")
    assert disk_full_path(OSError(errno.EACCES, "Permission denied", "x")) == (False, None)
    assert disk_full_path(ValueError("layer 40 is out of range")) == (False, None)


def test_bad_settings_fail_early_with_the_field_named(tmp_path, workspace, monkeypatch):
    spec_path = write_spec(tmp_path, model_b={"layer": 40})
    with pytest.raises(StageError, match=r"model_b\.layer: 40 is out of range"):
        AuditRunner(load_spec(spec_path), spec_path, workspace=workspace).run()
    spec_path = write_spec(tmp_path, verify={"rubrics": ["no_such_rubric"]})
    with pytest.raises(StageError, match="verify.rubrics: .*no_such_rubric"):
        AuditRunner(load_spec(spec_path), spec_path, workspace=workspace).run()
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    spec_path = write_spec(tmp_path, verify={"grader": "anthropic/claude-opus-4-1"})
    with pytest.raises(StageError, match="verify.grader: anthropic/claude-opus-4-1 needs ANTHROPIC_API_KEY"):
        AuditRunner(load_spec(spec_path), spec_path, workspace=workspace).run()
    # --only skips the validate stage; a rubric broken since must still be named, not a traceback
    broken = tmp_path / "broken_rubric.yaml"
    broken.write_text(Path("specs/rubrics/zoo_sentiment.yaml").read_text().replace("dimension:", "dimensionn:"))
    spec_path = write_spec(tmp_path, verify={"rubrics": [str(broken)]})
    with pytest.raises(StageError, match=r"verify.rubrics: .*broken_rubric.yaml:\d+: dimension"):
        AuditRunner(load_spec(spec_path), spec_path, workspace=workspace).run(only="analyse")



def test_only_a_stage_whose_inputs_are_missing_leaves_a_finished_runs_row_as_it_was(first_run, workspace, tmp_path):
    import shutil

    from audit.runner import MissingStagesError

    runner, result = first_run
    elsewhere = tmp_path / "copied"  # the store alone, without the stage cache
    elsewhere.mkdir()
    shutil.copy(workspace / "audit.duckdb", elsewhere / "audit.duckdb")
    before = AuditStore(elsewhere / "audit.duckdb").run(result.run_id)
    with pytest.raises(MissingStagesError, match="needs the harvest, train, analyse, screen stage"):
        AuditRunner(runner.spec, runner.spec_path, workspace=elsewhere).run(only="verify")
    after = AuditStore(elsewhere / "audit.duckdb").run(result.run_id)
    assert {k: after[k] for k in ("status", "crosscoder_path", "run_dir", "report_path")} == {
        k: before[k] for k in ("status", "crosscoder_path", "run_dir", "report_path")}

def test_from_a_stage_that_computes_before_a_missing_input_is_recorded_as_failed(first_run, workspace, tmp_path):
    import shutil

    from audit.runner import MissingStagesError

    runner, result = first_run
    elsewhere = tmp_path / "partial"
    shutil.copytree(workspace / "cache", elsewhere / "cache")
    stability = AuditRunner(runner.spec, runner.spec_path, workspace=elsewhere)._stage_folder(
        "stability", runner.hashes["stability"])
    shutil.rmtree(stability)  # the report needs it; analyse, screen, verify and transfer do not
    rerun = AuditRunner(runner.spec, runner.spec_path, workspace=elsewhere)
    with pytest.raises(MissingStagesError, match="report: needs the stability stage"):
        rerun.run(start="analyse", force=True)
    assert AuditStore(elsewhere / "audit.duckdb").run(result.run_id)["status"] == "failed at report"


def test_a_missing_local_model_folder_is_named_as_such():
    from audit.runner import _count_layers
    from audit.spec import ModelSpec
    from crosscoder.models import ModelLoadError

    entry = ModelSpec(id="./checkpoints/my-model", layer=3)
    with pytest.raises(ModelLoadError, match=r"model_a.id: .*'./checkpoints/my-model' \(local model folder not found\)"):
        _count_layers(entry.id, entry, "model_a")


def test_runs_show_and_report_commands(first_run, workspace):
    from typer.testing import CliRunner

    from audit.cli import app

    runner, result = first_run
    cli = CliRunner()
    listed = cli.invoke(app, ["runs", "--workspace", str(workspace)])
    assert listed.exit_code == 0 and result.run_id in listed.output
    feature = AuditStore(workspace / "audit.duckdb").rows("explanations", result.run_id)[0]["feature"]
    shown = cli.invoke(app, ["show", result.run_id, str(feature), "--workspace", str(workspace)])
    assert shown.exit_code == 0 and f"Feature {feature}" in shown.output and "Explanation" in shown.output
    missing = cli.invoke(app, ["show", result.run_id, "99999", "--workspace", str(workspace)])
    assert missing.exit_code == 1 and "is outside run" in " ".join(missing.output.split())
    flagged = {f["feature"] for f in AuditStore(workspace / "audit.duckdb").rows("features", result.run_id)}
    shared = min(set(range(runner.spec.crosscoder.dict_size)) - flagged)
    missing = cli.invoke(app, ["show", result.run_id, str(shared), "--workspace", str(workspace)])
    assert missing.exit_code == 1 and "was not flagged" in missing.output
    out = workspace / "rerendered"
    rendered = cli.invoke(app, ["report", result.run_id, "--workspace", str(workspace), "--out", str(out)])
    assert rendered.exit_code == 0 and (out / "report.html").is_file()



def test_the_plan_of_a_finished_run_is_all_cached_and_counts_exactly_what_it_did(first_run, workspace):
    from audit.plan import plan_audit

    runner, result = first_run
    plans = {p.stage: p for p in plan_audit(AuditRunner(runner.spec, runner.spec_path, workspace=workspace))}
    assert {stage: p.status for stage, p in plans.items() if stage != "models"} == dict.fromkeys(
        ("harvest", "train", "stability", "analyse", "screen", "verify", "transfer"), "cached")
    db = AuditStore(workspace / "audit.duckdb")
    # with analyse and screen cached, the plan uses the stages' own selections: exact counts
    verify = plans["verify"]
    assert verify.exact and verify.generations == (len(db.rows("generations", result.run_id))
                                                   + len(db.rows("baselines", result.run_id)))
    explained = len(db.rows("explanations", result.run_id))
    assert plans["screen"].work.startswith(f"{explained} features explained")
    stored = json.loads((runner.artefacts["transfer"] / "transfer.json").read_text())
    extraction = 2 * 3  # one source model (a_to_b) × eliciting and suppressing × max_questions 3
    assert plans["transfer"].generations == sum(len(r["generations"]) for r in stored) + extraction


def test_audit_seeds_runs_one_audit_per_seed_and_pools_them(first_run, workspace, tmp_path):
    from typer.testing import CliRunner

    from audit.cli import app

    runner, result = first_run
    spec_path = write_spec(tmp_path)
    cli = CliRunner()
    pooled = cli.invoke(app, ["seeds", str(spec_path), "--seeds", "0,1", "--workspace", str(workspace)])
    assert pooled.exit_code == 0, pooled.output
    # seed 0 is the first run itself (the same spec: stability seed 1, one transfer); seed 1 a run of its own
    data = json.loads((workspace / "tiny-demo" / "seeds-0-1.json").read_text())
    assert data["runs"]["0"] == result.run_id and data["runs"]["1"] != result.run_id
    seed_one = runner.db.run(data["runs"]["1"])
    assert json.loads(seed_one["spec_json"])["crosscoder"]["seed"] == 1 and seed_one["status"] == "finished"
    assert not runner.db.rows("transfers", data["runs"]["1"])  # the transfer runs once, with the first seed
    assert {r["seed"] for r in runner.db.rows("recurrence", data["runs"]["1"])} == {0}
    assert "crosscoder seeds (0, 1)" in (workspace / "tiny-demo" / "seeds-0-1.md").read_text()
    bad = cli.invoke(app, ["seeds", str(spec_path), "--seeds", "2", "--workspace", str(workspace)])
    assert bad.exit_code == 2 and "at least two distinct seeds" in bad.output
    bad = cli.invoke(app, ["seeds", str(spec_path), "--seeds", "0,x", "--workspace", str(workspace)])
    assert bad.exit_code == 2 and "'x' is not a non-negative integer" in bad.output
    # a gate of any seed's run fails the command, after the pooled table is written
    gated = write_spec(tmp_path)
    text = gated.read_text() + "gates:\n  - rule: verified_effect\n    min_effect: 0\n    require_verified: false\n" \
        "    safety_critical_only: false\n"
    gated.write_text(text)
    failed = cli.invoke(app, ["seeds", str(gated), "--seeds", "0,1", "--workspace", str(workspace)])
    assert failed.exit_code == 3 and "seed 0: " in failed.output


def test_diffing_two_runs_of_one_crosscoder_finds_nothing_new(first_run, workspace, tmp_path):
    from audit.diff import diff_runs

    runner, first = first_run
    spec_path = write_spec(tmp_path, verify={"alphas": [-2, 0, 2]})  # same harvest and crosscoder, other sweep
    second = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace).run()
    result = diff_runs(runner.db, first.run_id, second.run_id)
    for side in ("a", "b"):
        s = result["sides"][side]
        assert s["matched"] == s["features_a"] == s["features_b"] > 0
        assert "decoder cosine" in s["method"] and "token positions" in s["method"]
        assert s["new"] == s["vanished"] == 0
    assert result["new"] == result["vanished"] == [] and result["warnings"] == []


def test_a_diff_finds_the_runs_artefacts_from_any_directory(first_run, workspace, tmp_path, monkeypatch):
    from audit.diff import _artefact, diff_runs

    runner, first = first_run
    rows = runner.db.rows("stages", first.run_id)
    assert all(Path(r["artefact"]).is_absolute() for r in rows if r["artefact"])
    assert Path(runner.db.run(first.run_id)["run_dir"]).is_absolute()
    monkeypatch.chdir(tmp_path)  # somewhere else: the stored paths still lead to the artefacts
    result = diff_runs(runner.db, first.run_id, first.run_id)
    assert result["warnings"] == [] and "decoder cosine" in result["sides"]["a"]["method"]
    # A row of an older version, relative to where that run started: found in the cache beside the store.
    train = next(r for r in rows if r["stage"] == "train")
    copy = AuditStore(tmp_path / "old.duckdb")
    copy.replace_rows("stages", "old", [{**train, "artefact": f"elsewhere/cache/{Path(train['artefact']).name}"}],
                      where={"stage": "train"})
    assert _artefact(copy, "old", "train") is None  # no cache beside this store
    store = AuditStore(workspace / "audit.duckdb")
    store.replace_rows("stages", "old", [{**train, "artefact": f"elsewhere/cache/{Path(train['artefact']).name}"}],
                       where={"stage": "train"})
    assert _artefact(store, "old", "train") == workspace / "cache" / Path(train["artefact"]).name
    store.replace_rows("stages", "old", [], where={"stage": "train"})


def test_harvest_and_train_on_two_processes(first_run, tmp_path):
    """`--nproc 2`: both stages run under torchrun (gloo here). The run id is the one-process run's;
    the harvest is keyed by its number of ranks (same pairs, another shard layout), training not."""
    from crosscoder.store import ActivationStore

    spec_path = write_spec(tmp_path)
    workspace = tmp_path / "workspace"
    runner = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace, nproc=2, device="cpu")
    assert runner.run_id == first_run[1].run_id
    runner.run(only="harvest")
    runner.run(only="train")
    store = ActivationStore(runner.artefacts["harvest"] / "store")
    assert store.meta["ranks"] == 2 and store.n_pairs == ActivationStore(first_run[0].artefacts["harvest"] / "store").n_pairs
    assert runner.artefacts["harvest"].name != first_run[0].artefacts["harvest"].name
    again = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace, nproc=2)
    result = again.run(only="train")
    assert [(r.stage, r.cached) for r in result.stages] == [("harvest", True), ("train", True)]
    with pytest.raises(StageError, match="names one GPU"):
        AuditRunner(load_spec(spec_path), spec_path, workspace=workspace, nproc=2, device="cuda:1")
    metrics = json.loads((runner.artefacts["train"] / "metrics.json").read_text())
    assert 0 < metrics["fve_a"] <= 1 and 0 < metrics["fve_b"] <= 1
    # the stability stage's other seed trains on the ranks too, with its own seed
    runner.run(only="stability")
    [other] = runner.db.rows("seed_dictionaries", runner.run_id)
    assert other["status"] == "trained" and other["seed"] == 1
    config = json.loads((Path(other["artefact"]) / "checkpoint" / "config.json").read_text())["config"]
    assert config["seed"] == 1
    assert json.loads((runner.artefacts["train"] / "checkpoint" / "config.json").read_text())["config"]["seed"] == 0


def test_loading_a_model_builds_the_specs_missing_zoo_models_together_first(tmp_path, monkeypatch):
    # a run with --only/--from skips the models stage: the stages that load a model build the zoo first
    import crosscoder.models as models

    calls = []
    monkeypatch.setattr(models, "build_zoo_models", lambda ids: calls.append(list(ids)))
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: ("loaded", args[0]))
    spec_path = write_spec(tmp_path)
    runner = AuditRunner(load_spec(spec_path), spec_path, workspace=tmp_path / "ws")
    assert runner.loaded_model("b") == ("loaded", "zoo:beta")
    assert calls == [["zoo:alpha", "zoo:beta"]]


def test_a_failed_sweep_does_not_cost_the_finished_sweeps_of_its_group(first_run, workspace, tmp_path):
    import evals.verify_stage

    runner, _ = first_run
    spec = runner.spec
    folder = runner.artefacts["verify"]
    item = json.loads((folder / "plan.json").read_text())[0]
    broken = {**item, "feature": 10**6}  # no such feature: every steered request of its sweep fails
    side = item["own_model"]
    kept = []
    with pytest.raises(evals.verify_stage.EvalFailed, match=r"feature 1000000.*1 other sweep of this group finished and kept"):
        evals.verify_stage.run_sweeps([item, broken], spec, runner.artefacts["train"] / "checkpoint",
                                      runner.loaded_model(side), tmp_path / "logs",
                                      runner.coherence_meter(side, spec.verify.max_tokens),
                                      on_result=lambda done, result: kept.append((done["feature"], result)))
    assert [feature for feature, _ in kept] == [item["feature"]]
    assert kept[0][1]["generations"] and kept[0][1]["effects"]


def test_sweep_groups_hold_one_model_each_and_keep_the_plan_order():
    from audit.runner import _sweep_groups

    plan = [{"feature": f, "own_model": side} for f, side in
            [(1, "b"), (2, "a"), (3, "b"), (4, "b"), (5, "a"), (6, "b")]]
    groups = _sweep_groups(plan, 2)
    assert [[item["feature"] for item in group] for group in groups] == [[1, 3], [2, 5], [4, 6]]
    assert all(len({item["own_model"] for item in group}) == 1 for group in groups)
    assert sorted(item["feature"] for group in groups for item in group) == [1, 2, 3, 4, 5, 6]


def test_stages_run_on_the_threads_the_spec_asks_for_and_restore_them(first_run, monkeypatch):
    import torch

    from crosscoder.models import torch_threads

    runner, _ = first_run
    compute = runner.spec.compute.model_copy(update={"train_threads": 1, "eval_threads": 2})
    monkeypatch.setattr(runner, "spec", runner.spec.model_copy(update={"compute": compute}))
    assert [runner._stage_threads(s) for s in ("harvest", "train", "analyse", "screen", "verify", "transfer")] \
        == [None, 1, None, 2, 2, 2]
    # the runner wraps each stage's work in its thread count (validate: a stage with no artefact)
    before = torch.get_num_threads()
    seen = []
    real_validate = runner._compute_validate
    monkeypatch.setattr(runner, "_stage_threads", lambda stage: 1)
    monkeypatch.setattr(runner, "_compute_validate", lambda folder: seen.append(torch.get_num_threads())
                        or real_validate(folder))
    runner.run(only="validate")
    assert seen == [1] and torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_force_retrains_from_scratch_rather_than_resuming_the_finished_checkpoint(tmp_path, monkeypatch):
    import crosscoder

    spec_path = write_spec(tmp_path)
    runner = AuditRunner(load_spec(spec_path), spec_path, workspace=tmp_path / "ws")
    runner.run(only="harvest")
    runner.run(only="train")
    real = crosscoder.train_crosscoder
    found = []

    def spy(*args, checkpoint_dir, **kwargs):
        found.append(sorted(p.name for p in Path(checkpoint_dir).glob("*")) if Path(checkpoint_dir).exists() else [])
        return real(*args, checkpoint_dir=checkpoint_dir, **kwargs)

    monkeypatch.setattr(crosscoder, "train_crosscoder", spy)
    result = runner.run(only="train", force=True)
    assert found == [[]]  # nothing left to resume from: the stage trained afresh
    assert [(r.stage, r.cached) for r in result.stages] == [("harvest", True), ("train", False)]
    assert (runner.artefacts["train"] / "done.json").is_file()


def test_a_diverged_stability_seed_is_recorded_and_the_others_still_count(first_run, workspace, tmp_path, monkeypatch):
    from crosscoder import TrainingDivergedError

    real = AuditRunner._train_and_evaluate
    trained = []

    def diverge_seed_2(self, folder, seed=None):
        trained.append(seed)
        if seed == 2:
            raise TrainingDivergedError("the loss became NaN at step 7")
        return real(self, folder, seed)

    monkeypatch.setattr(AuditRunner, "_train_and_evaluate", diverge_seed_2)
    spec_path = write_spec(tmp_path, stability={"seeds": [2, 1]})
    runner = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace)
    result = runner.run(only="stability")
    assert trained == [2]  # seed 1 is the first run's, found done
    stability = next(r for r in result.stages if r.stage == "stability")
    assert stability.summary["seeds"] == 2 and stability.summary["compared"] == 1
    rows = {d["seed"]: d for d in runner.db.rows("seed_dictionaries", runner.run_id)}
    assert rows[2]["status"] == "diverged" and "NaN at step 7" in rows[2]["message"] and rows[2]["fve_a"] is None
    assert rows[1]["status"] == "trained"
    assert {r["seed"] for r in runner.db.rows("recurrence", runner.run_id)} == {1}
    # --force retrains the other seeds too, not only the comparison
    trained.clear()
    runner.run(only="stability", force=True)
    assert trained == [2, 1]


def test_a_training_that_diverged_on_the_ranks_is_a_divergence_not_a_crash(first_run, monkeypatch):
    import subprocess

    from audit.runner import DIVERGED_EXIT
    from crosscoder import TrainingDivergedError

    runner = first_run[0]
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, DIVERGED_EXIT))
    with pytest.raises(TrainingDivergedError, match="diverged"):
        runner._launch("train", seed=5)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    with pytest.raises(StageError, match="torchrun exited with code 1"):
        runner._launch("train")


def test_transfer_runs_in_a_second_process_while_screen_and_verify_run(first_run, workspace, tmp_path):
    runner, first = first_run
    # another crosscoder seed: the second process starts after the harvest and waits for the training
    # (seed 1 is the first run's stability seed, already trained: this one is not)
    spec_path = write_spec(tmp_path, compute={"overlap_transfer": True}, crosscoder={"seed": 3},
                           transfer={"alphas": [-1.5, 0, 1.5]})
    runner_b = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace)
    here = []
    runner_b._compute_transfer = lambda folder: here.append(folder) or {}  # the run must not compute it itself
    result = runner_b.run()
    stages = {r.stage: r for r in result.stages}
    assert not stages["train"].cached and here == []
    assert not stages["transfer"].cached and stages["transfer"].seconds > 0 and stages["transfer"].alongside
    assert not any(r.alongside for r in result.stages if r.stage != "transfer")
    index = json.loads((result.run_dir / "stages.json").read_text())
    assert index["transfer"]["alongside"] and not index["verify"]["alongside"]
    assert stages["transfer"].summary["transfers"] == 1
    log = (result.run_dir / "transfer.log").read_text()
    assert f"transfer: done ({stages['transfer'].artefact})" in log.replace("\n", "")
    assert f"niceness {min(19, __import__('os').nice(0) + 10)}" in log
    rows = runner.db.rows("transfers", result.run_id)
    assert {r["arm"] for r in rows} == {"source", "transferred", "random_transferred", "unrelated"}
    assert {point["alpha"] for point in json.loads(rows[0]["curve"])} == {-1.5, 0.0, 1.5}
    status = {s["stage"]: s["status"] for s in runner.db.rows("stages", result.run_id)}
    assert status["transfer"] == "done"
    made_by_child = json.loads((stages["transfer"].artefact / "done.json").read_text())["platform"]
    assert made_by_child["torch"] and {s["stage"]: s["platform"] for s in runner.db.rows("stages", result.run_id)}[
        "transfer"] == json.dumps(made_by_child)


def test_no_second_process_when_nothing_would_run_beside_it(first_run, workspace, tmp_path):
    runner, first = first_run
    # only the transfer settings differ from the first run: analyse, screen and verify come from the cache
    spec_path = write_spec(tmp_path, compute={"overlap_transfer": True}, transfer={"alphas": [-0.5, 0, 0.5]})
    result = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace).run()
    assert not (result.run_dir / "transfer.log").exists()
    assert {r.stage: r.cached for r in result.stages}["transfer"] is False


def test_a_failed_second_process_leaves_the_stage_to_the_run_itself(first_run, tmp_path):
    import subprocess
    import sys
    import time

    from audit.runner import BackgroundStage

    runner, _ = first_run
    log_path = tmp_path / "transfer.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-c", "import sys; print('out of memory'); sys.exit(3)"],
                                   stdout=log, stderr=subprocess.STDOUT)
    ran_here = []
    real = runner._stage
    runner._stage = lambda stage, run, force, made_elsewhere=None: ran_here.append((stage, made_elsewhere)) or \
        real(stage, run, force, made_elsewhere)
    try:
        result = runner._finish_background(BackgroundStage("transfer", process, log_path, time.perf_counter()))
    finally:
        del runner._stage
    assert process.returncode == 3 and ran_here == [("transfer", None)]
    assert result.stage == "transfer" and result.cached  # the first run's transfer, found in the cache
    assert BackgroundStage("transfer", process, log_path, 0.0).log_tail(1) == ["out of memory"]


@pytest.mark.skipif(not hasattr(__import__("os"), "nice"), reason="no process priorities on this OS")
def test_the_second_process_lowers_its_own_priority():
    import os
    import subprocess
    import sys

    from audit.runner import BACKGROUND_NICENESS

    code = "import os; from audit.launch import lower_priority; lower_priority(); print(os.nice(0))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(child.stdout) == min(19, os.nice(0) + BACKGROUND_NICENESS)


def test_a_second_process_with_other_settings_stops_before_any_work(first_run, workspace, tmp_path):
    runner, _ = first_run
    other = AuditRunner(runner.spec, workspace=workspace)
    with pytest.raises(StageError, match="expects .*settings differ"):
        other.run_detached("transfer", expect=tmp_path / "cache" / "transfer-0000")
    assert not (tmp_path / "cache").exists()


def test_a_transfer_waiting_for_the_training_stops_when_its_parent_has_gone(first_run, tmp_path):
    import os
    import threading

    runner, _ = first_run
    waiting = AuditRunner(runner.spec, workspace=tmp_path / "ws")
    waiting.artefacts["train"] = tmp_path / "train"
    waiting.artefacts["train"].mkdir()
    with pytest.raises(StageError, match="has stopped"):
        waiting._wait_for_training(parent=os.getppid() + 1, poll_s=0.01)  # not our parent: it has gone
    threading.Timer(0.2, lambda: (tmp_path / "train" / "done.json").write_text("{}")).start()
    waiting._wait_for_training(parent=os.getppid(), poll_s=0.01)  # returns once the training is done
    assert (tmp_path / "train" / "done.json").is_file()


def test_an_interrupted_transfer_keeps_its_source_side_and_resumes_from_it(first_run, tmp_path, monkeypatch):
    import evals.transfer_stage as transfer_stage

    runner, _ = first_run
    real_crosscoder = runner.crosscoder

    def interrupted():
        raise KeyboardInterrupt  # as if stopped while waiting for the training

    monkeypatch.setattr(runner, "crosscoder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        transfer_stage.run_transfer(runner, tmp_path, lambda done, total: None)
    assert (tmp_path / "zoo_sentiment-a_to_b-source.json").is_file()
    monkeypatch.setattr(runner, "crosscoder", real_crosscoder)
    monkeypatch.setattr(transfer_stage, "extract_persona_vector", lambda *a, **k: pytest.fail("extracted again"))
    rows = transfer_stage.run_transfer(runner, tmp_path, lambda done, total: None)
    assert {r["arm"] for r in rows} == {"source", "transferred", "random_transferred", "unrelated"}
    source = next(r for r in rows if r["arm"] == "source")
    assert source["extraction"]["n_answers"] > 0 and source["generations"]


def test_only_transfer_needs_the_training_not_the_verify_stage(first_run, workspace, tmp_path):
    # verify's settings changed (not in the cache) and so did the transfer's: --only transfer still runs
    spec_path = write_spec(tmp_path, verify={"alphas": [-0.25, 0, 0.25]}, transfer={"alphas": [-0.75, 0, 0.75]})
    runner = AuditRunner(load_spec(spec_path), spec_path, workspace=workspace)
    result = runner.run(only="transfer")
    assert [(r.stage, r.cached) for r in result.stages if r.stage in ("train", "transfer")] == \
        [("train", True), ("transfer", False)]
    assert {json.loads(r["curve"])[0]["alpha"] for r in runner.db.rows("transfers", result.run_id)} == {-0.75}
    with pytest.raises(StageError, match="needs the verify stage"):
        runner.run(only="report")


def test_a_local_data_file_edited_in_place_is_harvested_afresh(tmp_path):
    import os

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "first version"}\n')
    spec_path = write_spec(tmp_path, data={"sources": [{"path": str(corpus), "text_field": "text"}]})
    runner = AuditRunner(load_spec(spec_path), spec_path, workspace=tmp_path / "ws")
    before = runner._hash_harvest()
    assert runner._hash_harvest() == before  # stable while the file is untouched
    os.utime(corpus, ns=(5, 5))  # a fresh checkout: the same bytes with another modification time
    assert runner._hash_harvest() == before
    corpus.write_text('{"text": "second version, other rows"}\n')
    os.utime(corpus, ns=(1, 1))  # other bytes, even with a clock that went back
    assert runner._hash_harvest() != before
