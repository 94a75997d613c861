"""`audit seeds`: one audit per crosscoder seed, pooled."""

from __future__ import annotations

import json

import pytest

from audit.seeds import pool_seeds, render_seeds_markdown, seed_variants
from audit.spec import load_spec
from audit.store import AuditStore
from tests.audit.test_diff import BOAST, NARRATIVE, add_run


def test_each_variant_has_its_seed_the_others_as_stability_seeds_and_one_transfer():
    spec = load_spec("specs/demo.yaml")  # stability.seeds: [1]
    variants = seed_variants(spec, [0, 2, 5])
    assert [v.crosscoder.seed for v in variants] == [0, 2, 5]
    assert [v.stability.seeds for v in variants] == [[2, 5, 1], [0, 5, 1], [0, 2, 1]]
    assert variants[0].transfer.traits == spec.transfer.traits and not variants[1].transfer.traits
    assert variants[0].content_hash() != variants[1].content_hash()  # each is its own run
    pinned = load_spec("specs/demo.yaml").model_copy(deep=True)
    pinned.verify.features = {98: ["zoo_exceptionalism"]}  # a feature id of seed 0's dictionary
    kept = seed_variants(pinned, [1, 0])
    assert kept[0].verify.features == {} and kept[1].verify.features == {98: ["zoo_exceptionalism"]}
    with pytest.raises(ValueError, match="at least two distinct seeds"):
        seed_variants(spec, [3, 3])


def test_pooling_says_which_seeds_verified_each_concept_and_planted_difference(tmp_path):
    db = AuditStore(tmp_path / "audit.duckdb")
    add_run(db, "s0", "zoo:beta", [{**BOAST, "id": 3}, {**NARRATIVE, "id": 500}])
    add_run(db, "s1", "zoo:beta", [{**NARRATIVE, "id": 510, "effect": 1.5}])
    add_run(db, "s2", "zoo:beta", [])  # a run whose verify stage never ran
    pooled = pool_seeds(db, {0: "s0", 1: "s1", 2: "s2"})
    concepts = {(c["partition"], c["rubric"]): c for c in pooled["concepts"]}
    narrative = concepts[("b", "zoo_state_narrative")]
    assert narrative["verified_in"] == ["0", "1"] and narrative["by_seed"]["1"]["feature"] == 510
    assert concepts[("a", "zoo_exceptionalism")]["verified_in"] == ["0"]
    known = {k["id"]: k for k in pooled["known_answer"]}
    assert known["state-narrative"]["found_in"] == ["0", "1"] and known["exceptionalism"]["found_in"] == ["0"]
    assert known["exceptionalism"]["by_seed"]["0"] == {"found": True, "features": ["A-exclusive 3"]}
    assert pooled["measured"] == ["0", "1"]
    assert (pooled["known_found_any"], pooled["known_found_all"]) == (2, 1)
    md = render_seeds_markdown("demo", pooled)
    assert "verified in at least one seed, 1 in every seed (of the 2 whose verify stage ran)" in md
    assert "| state-narrative | B-exclusive | yes (B-exclusive 500) | yes (B-exclusive 510) | not measured | 2 of 2 |" in md
    assert "| model A | zoo_exceptionalism | feature 3: +1.80 | — | — | 1 of 2 |" in md
    assert "- seed 2: run `s2` (no verify results)" in md
    # the JSON file reads back into the same table
    assert render_seeds_markdown("demo", json.loads(json.dumps(pooled))) == md
    # a verified feature's null sweep (random pushes of its size) is shown next to it
    [row] = [r for r in db.rows("effects", "s1")]
    db.replace_rows("effects", "s1", [{**row, "null_draws": 8, "null_passed": 2, "beats_null": True}])
    md = render_seeds_markdown("demo", pool_seeds(db, {0: "s0", 1: "s1"}))
    assert "yes (B-exclusive 510 [random pushes passing: 2 of 8])" in md
    db.replace_rows("effects", "s1", [{**row, "null_draws": 8, "null_passed": 2, "beats_null": True,
                                       "null_as_large": 4}])
    md = render_seeds_markdown("demo", pool_seeds(db, {0: "s0", 1: "s1"}))
    assert "yes (B-exclusive 510 [random pushes passing: 2 of 8; as large a change: 4])" in md


def test_a_pair_outside_the_zoo_counts_its_seeds_by_what_verify_stored(tmp_path):
    # no known answer for such a pair: the seeds whose verify stage ran are those with sweeps stored
    db = AuditStore(tmp_path / "audit.duckdb")
    for run_id in ("s0", "s1"):
        add_run(db, run_id, "org/other-model", [{**NARRATIVE, "id": 500}] if run_id == "s0" else [])
    db.replace_rows("baselines", "s1", [{"model": "b", "rubric": "zoo_state_narrative", "kind": "topic",
                                        "prompt": "q", "seed": 0, "behaviour": 2.0, "coherence": 5.0}])
    pooled = pool_seeds(db, {0: "s0", 1: "s1"})
    assert pooled["known_answer"] == [] and pooled["measured"] == ["0", "1"]
    md = render_seeds_markdown("other", pooled)
    assert "no verify results" not in md and "| 1 of 2 |" in md


def test_parse_seeds_names_what_is_wrong():
    from audit.seeds import parse_seeds

    assert parse_seeds(" 0, 2,5 ") == [0, 2, 5]
    for text, message in (("", "at least one seed"), ("0,x", "'x' is not a non-negative integer"),
                          ("-1,2", "'-1' is not"), ("1,²", "'²' is not"), ("1,2,1", "seed 1 given more than once"),
                          (str(2**63), "below 2\\*\\*63")):
        with pytest.raises(ValueError, match=message):
            parse_seeds(text)


def test_both_seed_commands_refuse_a_repeated_seed():
    from typer.testing import CliRunner

    from audit.cli import app

    for command in (["seeds", "specs/demo.yaml", "--seeds", "0,0"], ["zoo", "discovery", "specs/demo.yaml",
                                                                      "--seeds", "1,1"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "--seeds: seed" in result.output and "more than once" in result.output


def test_audit_seeds_stops_on_sigterm_and_says_which_runs_are_kept(monkeypatch, tmp_path):
    import os
    import signal
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import audit.runner
    from audit.cli import app

    calls = []

    class FakeRunner:  # the first seed finishes; SIGTERM arrives during the second
        def __init__(self, spec, *args, **kwargs):
            self.seed = spec.crosscoder.seed

        def run(self):
            calls.append(self.seed)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return SimpleNamespace(run_id=f"demo-seed{self.seed}", gate_failures=[], report_paths=[])

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(audit.runner, "AuditRunner", FakeRunner)
    try:
        result = CliRunner().invoke(app, ["seeds", "specs/demo.yaml", "--seeds", "0,1,2",
                                          "--workspace", str(tmp_path)])
    finally:
        after = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)
    assert calls == [0, 1]  # the third seed never started
    assert result.exit_code != 0
    assert "seeds' runs finished before the interruption: demo-seed0" in result.output
    assert after == signal.SIG_DFL  # a second SIGTERM ends the process at once, cleanup or not
