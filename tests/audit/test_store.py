"""The DuckDB store: idempotent writes per run, several writer processes at once, readers alongside."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pytest

from audit.store import SCHEMA_VERSION, AuditStore


def test_replace_rows_is_idempotent_and_scoped_to_the_run(tmp_path):
    db = AuditStore(tmp_path / "a.duckdb")
    db.replace_rows("contexts", "r1", [{"feature": 1, "rank": 1, "text": "x"}, {"feature": 2, "rank": 1, "text": "y"}])
    db.replace_rows("contexts", "r2", [{"feature": 1, "rank": 1, "text": "other run"}])
    db.replace_rows("contexts", "r1", [{"feature": 1, "rank": 1, "text": "again"}])
    assert [r["text"] for r in db.rows("contexts", "r1")] == ["again"]
    assert [r["text"] for r in db.rows("contexts", "r2")] == ["other run"]
    db.replace_rows("stages", "r1", [{"stage": "train", "status": "done"}], where={"stage": "train"})
    db.replace_rows("stages", "r1", [{"stage": "harvest", "status": "done"}], where={"stage": "harvest"})
    db.replace_rows("stages", "r1", [{"stage": "train", "status": "cached"}], where={"stage": "train"})
    assert sorted((r["stage"], r["status"]) for r in db.rows("stages", "r1")) == [("harvest", "done"), ("train", "cached")]
    # Lists become JSON, NaN becomes NULL; plain SQL works on the file.
    db.replace_rows("features", "r1", [{"feature": 3, "top_tokens": [["a", 2]], "exclusivity": float("nan")}])
    with duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True) as con:
        assert con.execute("SELECT top_tokens, exclusivity FROM features").fetchall() == [('[["a", 2]]', None)]
        assert con.execute("SELECT version FROM schema_info").fetchall() == [(SCHEMA_VERSION,)]


def test_bulk_writes_store_what_row_by_row_writes_store(tmp_path, monkeypatch):
    import datetime

    import audit.store

    rows = [{"feature": i, "partition": "ab"[i % 2], "frequency": i if i % 3 else i + 0.5,  # ints and floats mixed
             "exclusivity": float("nan") if i % 5 == 0 else i / 7, "is_artefact": i % 4 == 0,
             "top_tokens": [["tok", i]], "s_max": None, "artefact_reasons": None if i % 2 else "chat"}
            for i in range(3 * audit.store._BULK_ROWS)]
    stages = [{"stage": f"s{i}", "finished_at": datetime.datetime(2026, 1, 1, 0, 0, i % 60), "seconds": i}
              for i in range(audit.store._BULK_ROWS)]
    bulk = AuditStore(tmp_path / "bulk.duckdb")
    bulk.replace_rows("features", "r1", rows)
    bulk.replace_rows("stages", "r1", stages)
    monkeypatch.setattr(audit.store, "_BULK_ROWS", 10**9)
    single = AuditStore(tmp_path / "single.duckdb")
    single.replace_rows("features", "r1", rows)
    single.replace_rows("stages", "r1", stages)
    for table, order in (("features", "feature"), ("stages", "stage")):
        assert bulk.rows(table, "r1", order=order) == single.rows(table, "r1", order=order)
    assert bulk.rows("features", "r1", order="feature")[0]["exclusivity"] is None  # NaN is NULL either way


def test_a_bulk_write_of_mixed_types_falls_back_to_casting_each_value(tmp_path):
    import audit.store

    db = AuditStore(tmp_path / "a.duckdb")
    rows = [{"feature": i, "rank": 1, "text": "x" if i % 2 else 7} for i in range(audit.store._BULK_ROWS)]
    db.replace_rows("contexts", "r1", rows)  # DuckDB casts 7 to '7' as it always did
    assert {r["text"] for r in db.rows("contexts", "r1")} == {"x", "7"}
    with pytest.raises(duckdb.ConversionException, match="not a number"):  # the real error, not a later one
        db.replace_rows("contexts", "r1", [{"feature": "not a number", "rank": 1, "text": "bad"}] * 100)
    assert len(db.rows("contexts", "r1")) == audit.store._BULK_ROWS  # the failed write changed nothing


def test_a_failed_write_keeps_the_previous_rows(tmp_path):
    db = AuditStore(tmp_path / "a.duckdb")
    db.replace_rows("contexts", "r1", [{"feature": 1, "rank": 1, "text": "kept"}])
    with pytest.raises(duckdb.Error):
        db.replace_rows("contexts", "r1", [{"feature": "not a number", "rank": 1, "text": "bad"}])
    assert [r["text"] for r in db.rows("contexts", "r1")] == ["kept"]


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "a.duckdb"
    AuditStore(path)
    with duckdb.connect(str(path)) as con:
        con.execute("INSERT INTO schema_info VALUES (?)", [SCHEMA_VERSION + 1])
    with pytest.raises(RuntimeError, match="newer crosscoder-audit"):
        AuditStore(path)


def test_a_version_1_file_is_migrated_keeping_its_rows(tmp_path):
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:  # the transfers table as schema 1 made it
        con.execute("CREATE TABLE schema_info (version INTEGER)")
        con.execute("INSERT INTO schema_info VALUES (1)")
        con.execute("CREATE TABLE transfers (run_id VARCHAR, trait VARCHAR, direction VARCHAR, arm VARCHAR, "
                    "spearman DOUBLE, effect DOUBLE, holds BOOLEAN, vector_norm DOUBLE, features VARCHAR, "
                    "cosines VARCHAR, max_decoder_cosine DOUBLE, curve VARCHAR, generations VARCHAR, "
                    "extraction VARCHAR)")
        con.execute("INSERT INTO transfers (run_id, trait, arm, spearman) VALUES ('old', 't', 'source', 0.9)")
        con.execute("CREATE TABLE effects (run_id VARCHAR, feature INTEGER, rubric VARCHAR, effect DOUBLE, "
                    "spearman DOUBLE, control_effect DOUBLE, coherence_low_alpha DOUBLE, baseline DOUBLE, "
                    "verified BOOLEAN, curve VARCHAR)")
        con.execute("INSERT INTO effects (run_id, feature, rubric, effect) VALUES ('old', 7, 'r', 1.5)")
    db = AuditStore(path)
    assert db.query("SELECT max(version) AS v FROM schema_info")[0]["v"] == SCHEMA_VERSION
    assert [(r["arm"], r["spearman"], r["draws"], r["specific"]) for r in db.rows("transfers", "old")] == [
        ("source", 0.9, None, None)]  # columns of schemas 2 and 3 added, empty for old rows
    db.replace_rows("transfers", "new", [{"arm": "unrelated", "draws": [{"vector": "unrelated.0", "spearman": 0.1}],
                                          "specific": False}])
    assert db.rows("transfers", "new")[0]["draws"] == '[{"vector": "unrelated.0", "spearman": 0.1}]'
    assert db.rows("transfers", "new")[0]["specific"] is False
    assert [(r["feature"], r["effect"], r["onset_margin"]) for r in db.rows("effects", "old")] == [(7, 1.5, None)]
    db.replace_rows("effects", "new", [{"feature": 8, "rubric": "r", "onset_margin": 0.4}])
    assert db.rows("effects", "new")[0]["onset_margin"] == 0.4  # schema 4's column
    db.replace_rows("features", "new", [{"feature": 8, "push_norm": 2.5}])
    db.replace_rows("crosscoder_metrics", "new", [{"activation_norm_a": 7.5, "activation_norm_b": 12.5}])
    db.replace_rows("effects", "newer", [{"feature": 8, "rubric": "r", "null_as_large": 3}])
    assert db.rows("effects", "newer")[0]["null_as_large"] == 3  # schema 12's column
    assert db.rows("features", "new")[0]["push_norm"] == 2.5  # schema 11's columns
    assert db.rows("crosscoder_metrics", "new")[0]["activation_norm_b"] == 12.5
    assert db.rows("contexts", "old") == []  # every other table exists too
    db.replace_rows("baselines", "new", [{"model": "b", "rubric": "r", "kind": "topic", "behaviour": 4.5}])
    assert db.rows("baselines", "new")[0]["behaviour"] == 4.5  # schema 5's table
    AuditStore(path)  # opening a migrated file again changes nothing


def test_an_early_version_1_file_without_a_transfers_table_is_migrated(tmp_path):
    path = tmp_path / "early.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE schema_info (version INTEGER)")
        con.execute("INSERT INTO schema_info VALUES (1)")
        con.execute("CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, status VARCHAR)")
        con.execute("INSERT INTO runs VALUES ('old', 'finished')")
    db = AuditStore(path)
    assert db.run("old")["status"] == "finished"
    db.replace_rows("transfers", "new", [{"arm": "source", "draws": []}])
    assert db.rows("transfers", "new")[0]["arm"] == "source"


WRITER = """
import sys
from audit.store import AuditStore
db = AuditStore(sys.argv[1])
for i in range(int(sys.argv[3])):
    db.replace_rows("scores", sys.argv[2], [{"feature": i, "rubric": "r", "score": float(i)}], where={"feature": i})
"""
READER = """
import sys
from audit.store import AuditStore
db = AuditStore(sys.argv[1])
print(max(db.query("SELECT count(*) AS c FROM scores")[0]["c"] for _ in range(int(sys.argv[2]))))
"""


def test_two_writers_and_a_reader_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.duckdb")
    AuditStore(path)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, f"run{i}", "60"]) for i in range(2)]
    reader = subprocess.Popen([sys.executable, "-c", READER, path, "30"], stdout=subprocess.PIPE, text=True)
    for p in procs:
        assert p.wait(timeout=240) == 0
    out, _ = reader.communicate(timeout=240)
    assert reader.returncode == 0 and 0 <= int(out) <= 120
    db = AuditStore(path)
    for i in range(2):
        assert sorted(r["feature"] for r in db.rows("scores", f"run{i}")) == list(range(60))
