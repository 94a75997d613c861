"""The read-only commands (runs, report, show, diff) on a missing or unusable store, and odd arguments."""

from __future__ import annotations

from typer.testing import CliRunner

from audit.cli import app
from audit.store import AuditStore


def words(output: str) -> str:
    return " ".join(output.split())  # rich wraps long messages at the terminal width


def test_reading_commands_never_create_a_store(tmp_path):
    missing = tmp_path / "typo" / "audit.duckdb"
    for args in (["runs"], ["report", "r1"], ["show", "r1", "3"], ["diff", "r1", "r2"]):
        result = CliRunner().invoke(app, [*args, "--db", str(missing)])
        assert result.exit_code == 1 and "no audit store here" in words(result.output), (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not missing.parent.exists()


def test_unusable_store_files_give_a_message_not_a_traceback(tmp_path):
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"this is not a database" * 100)
    result = CliRunner().invoke(app, ["runs", "--db", str(garbage)])
    assert result.exit_code == 1 and "cannot be opened as an audit store" in words(result.output)
    result = CliRunner().invoke(app, ["runs", "--db", str(tmp_path)])
    assert result.exit_code == 1 and "is a folder" in words(result.output)
    assert garbage.read_bytes().startswith(b"this is not")  # left as it was


def test_odd_arguments_are_reported_as_text(tmp_path):
    db = tmp_path / "audit.duckdb"
    AuditStore(db)
    result = CliRunner().invoke(app, ["show", "x[/bold]", "1", "--db", str(db)])
    assert result.exit_code == 1 and "x[/bold]" in result.output  # printed as text, not read as markup
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("name: [unclosed\n")
    db_runs = AuditStore(db)
    db_runs.upsert_run({"run_id": "r1", "spec_name": "s", "spec_json": "{}", "model_a": "a", "model_b": "b",
                        "status": "finished", "run_dir": str(tmp_path)})
    result = CliRunner().invoke(app, ["diff", "r1", "r1", "--db", str(db), "--spec", str(bad_spec)])
    assert result.exit_code == 2 and "invalid spec" in words(result.output) and "bad.yaml" in result.output


def test_a_run_whose_process_is_gone_is_shown_as_interrupted(tmp_path):
    import os
    import subprocess
    import sys

    from audit.store import process_host, run_status

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(finished.stdout)  # a process that has exited (a run killed with -9 leaves the same)
    here = process_host()
    assert run_status({"status": "running", "pid": gone, "host": here}).startswith("interrupted")
    assert run_status({"status": "running", "pid": os.getpid(), "host": here}) == "running"
    assert run_status({"status": "running", "pid": gone, "host": "other-box pid:[1]"}) == (
        "running elsewhere? (recorded on other-box)")  # another machine, or a container sharing this name
    assert run_status({"status": "finished", "pid": gone, "host": here}) == "finished"
    assert run_status({"status": "running", "pid": None, "host": None}) == "running"  # rows of older versions
    db = tmp_path / "audit.duckdb"
    AuditStore(db).upsert_run({"run_id": "r1", "spec_name": "s", "spec_json": "{}", "model_a": "a", "model_b": "b",
                               "status": "running", "run_dir": str(tmp_path), "pid": gone, "host": here})
    listed = CliRunner().invoke(app, ["runs", "--db", str(db)])
    assert listed.exit_code == 0 and "interrupted" in listed.output


def test_an_interrupted_command_says_that_its_work_is_kept(tmp_path, monkeypatch, capsys):
    import sys

    import pytest

    import audit.cli
    import audit.runner

    def interrupted(self, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C mid-stage

    monkeypatch.setattr(audit.runner.AuditRunner, "run", interrupted)
    monkeypatch.setattr(sys, "argv", ["audit", "run", "specs/demo.yaml", "--workspace", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        audit.cli.main()
    assert exit_info.value.code == 130
    assert "interrupted: finished work is kept; rerun the same command to resume" in words(capsys.readouterr().err)
