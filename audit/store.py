"""The workspace's DuckDB store: every result of every run, keyed by run id, readable with plain SQL.

DuckDB lets one process hold a file open for writing, and a second process cannot even open it
read-only meanwhile. So nothing here keeps the file open: each write is one short transaction
(open, delete the run's old rows of that table, insert, commit, close), retried while another
process holds the lock. Two ``audit run``s at once then both finish with all their rows, and a
reader (``audit report``) only waits a moment.

Schema changes bump ``SCHEMA_VERSION``; an older file is migrated by ``_migrate`` (or refused with
a message saying what to do when it cannot be).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb

SCHEMA_VERSION = 12
LOCK_RETRY_SECONDS = 120.0

TABLES: dict[str, str] = {
    "runs": """
        run_id VARCHAR PRIMARY KEY, spec_name VARCHAR, spec_hash VARCHAR, created_at TIMESTAMP,
        updated_at TIMESTAMP, status VARCHAR, spec_json VARCHAR, model_a VARCHAR, model_b VARCHAR,
        layer_a INTEGER, layer_b INTEGER, explainer VARCHAR, grader VARCHAR, run_dir VARCHAR,
        crosscoder_path VARCHAR, report_path VARCHAR, pid INTEGER, host VARCHAR""",
    "stages": """
        run_id VARCHAR, stage VARCHAR, input_hash VARCHAR, artefact VARCHAR, status VARCHAR,
        seconds DOUBLE, finished_at TIMESTAMP, message VARCHAR, platform VARCHAR""",
    "crosscoder_metrics": """
        run_id VARCHAR, architecture VARCHAR, dict_size INTEGER, k INTEGER, n_a_only INTEGER,
        n_shared INTEGER, n_b_only INTEGER, fve_a DOUBLE, fve_b DOUBLE, mean_l0 DOUBLE,
        dead_fraction DOUBLE, n_pairs BIGINT, aligned_fraction DOUBLE, relative_norms VARCHAR,
        activation_norm_a DOUBLE, activation_norm_b DOUBLE""",
    "features": """
        run_id VARCHAR, feature INTEGER, partition VARCHAR, own_model VARCHAR, rank INTEGER,
        frequency DOUBLE, s_max DOUBLE, mean_activation DOUBLE, push_norm DOUBLE, relative_norm DOUBLE, r2_own DOUBLE,
        r2_other DOUBLE, exclusivity DOUBLE, template_share DOUBLE, template_coverage DOUBLE,
        chat_share DOUBLE, merged_share DOUBLE, start_share DOUBLE, top_token_share DOUBLE,
        is_artefact BOOLEAN, artefact_reasons VARCHAR, top_tokens VARCHAR, promoted_tokens VARCHAR""",
    "contexts": """
        run_id VARCHAR, feature INTEGER, rank INTEGER, doc BIGINT, position INTEGER,
        activation DOUBLE, text VARCHAR""",
    "explanations": """
        run_id VARCHAR, feature INTEGER, explainer VARCHAR, parsed BOOLEAN, explanation VARCHAR,
        safety_critical BOOLEAN, reason VARCHAR, raw VARCHAR, detection_score DOUBLE,
        detector VARCHAR, eval_log VARCHAR""",
    "generations": """
        run_id VARCHAR, feature INTEGER, rubric VARCHAR, kind VARCHAR, prompt VARCHAR, alpha DOUBLE,
        seed INTEGER, answer VARCHAR, eval_log VARCHAR""",
    "scores": """
        run_id VARCHAR, feature INTEGER, rubric VARCHAR, kind VARCHAR, prompt VARCHAR, alpha DOUBLE,
        seed INTEGER, dimension VARCHAR, score DOUBLE, grader VARCHAR""",
    "baselines": """
        run_id VARCHAR, model VARCHAR, rubric VARCHAR, kind VARCHAR, prompt VARCHAR, seed INTEGER,
        answer VARCHAR, behaviour DOUBLE, coherence DOUBLE, grader VARCHAR, eval_log VARCHAR""",
    "effects": """
        run_id VARCHAR, feature INTEGER, rubric VARCHAR, effect DOUBLE, spearman DOUBLE,
        control_effect DOUBLE, coherence_low_alpha DOUBLE, baseline DOUBLE, verified BOOLEAN,
        curve VARCHAR, onset_margin DOUBLE, null_draws INTEGER, null_passed INTEGER, null_max_effect DOUBLE,
        beats_null BOOLEAN, null_as_large INTEGER""",
    "transfers": """
        run_id VARCHAR, trait VARCHAR, direction VARCHAR, arm VARCHAR, spearman DOUBLE, effect DOUBLE,
        holds BOOLEAN, vector_norm DOUBLE, features VARCHAR, cosines VARCHAR, max_decoder_cosine DOUBLE,
        curve VARCHAR, generations VARCHAR, extraction VARCHAR, draws VARCHAR, specific BOOLEAN""",
    "seed_dictionaries": """
        run_id VARCHAR, seed INTEGER, status VARCHAR, fve_a DOUBLE, fve_b DOUBLE, mean_l0 DOUBLE,
        dead_fraction DOUBLE, artefact VARCHAR, message VARCHAR""",
    "recurrence": """
        run_id VARCHAR, feature INTEGER, own_model VARCHAR, seed INTEGER, status VARCHAR,
        exclusive_feature INTEGER, exclusive_cosine DOUBLE, nearest_feature INTEGER, nearest_cosine DOUBLE,
        nearest_partition VARCHAR""",
    "diffs": """
        diff_id VARCHAR PRIMARY KEY, run_a VARCHAR, run_b VARCHAR, created_at TIMESTAMP,
        summary VARCHAR""",
}

#: Statements that bring a file of schema ``version - 1`` to ``version``.
MIGRATIONS: dict[int, list[str]] = {
    # 2: control arms of a transfer pool several random directions; each draw's ρ and effect.
    2: ["ALTER TABLE transfers ADD COLUMN IF NOT EXISTS draws VARCHAR"],
    # 3: a transfer's verdict is split: ``holds`` (alignment) and ``specific`` (the unrelated control).
    3: ["ALTER TABLE transfers ADD COLUMN IF NOT EXISTS specific BOOLEAN"],
    # 4: why a feature was swept on a rubric: its onset margin there (``evals.onsets``).
    4: ["ALTER TABLE effects ADD COLUMN IF NOT EXISTS onset_margin DOUBLE"],
    # 5: each model's unsteered answers on every rubric (``baselines``, created with the other
    # missing tables by ``_ensure_schema``); no existing table changes.
    5: [],
    # 6: which process is writing a run (a run killed with -9 stays "running": `audit runs` checks it).
    6: ["ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid INTEGER", "ALTER TABLE runs ADD COLUMN IF NOT EXISTS host VARCHAR"],
    # 7: where each stage's artefact was computed (``crosscoder.numerics``): another CPU rounds differently.
    7: ["ALTER TABLE stages ADD COLUMN IF NOT EXISTS platform VARCHAR"],
    # 8: seed stability (METHOD §5): the other seeds' dictionaries and where each flagged exclusive
    # feature recurs in them (new tables, created by ``_ensure_schema``).
    8: [],
    # 9: a seed of the stability stage whose training diverged is recorded as such.
    9: ["ALTER TABLE seed_dictionaries ADD COLUMN IF NOT EXISTS status VARCHAR",
        "ALTER TABLE seed_dictionaries ADD COLUMN IF NOT EXISTS message VARCHAR"],
    # 10: verified effects are compared with random pushes of the same size (the null sweeps).
    10: [f"ALTER TABLE effects ADD COLUMN IF NOT EXISTS {column}"
         for column in ("null_draws INTEGER", "null_passed INTEGER", "null_max_effect DOUBLE", "beats_null BOOLEAN")],
    # 11: how hard a sweep pushes: each feature's push at α = 1 (s_max · |d_j|) and each model's median
    # activation norm at its capture layer, over the harvest.
    11: ["ALTER TABLE features ADD COLUMN IF NOT EXISTS push_norm DOUBLE",
         "ALTER TABLE crosscoder_metrics ADD COLUMN IF NOT EXISTS activation_norm_a DOUBLE",
         "ALTER TABLE crosscoder_metrics ADD COLUMN IF NOT EXISTS activation_norm_b DOUBLE"],
    # 12: how many random pushes of a null sweep changed the score as much as the feature did.
    12: ["ALTER TABLE effects ADD COLUMN IF NOT EXISTS null_as_large INTEGER"],
}


def process_host() -> str:
    """Where a process id means something: the machine's name and, on Linux, its process-id
    namespace (a container with host networking shares the host's name but not its process ids)."""
    name = socket.gethostname()
    try:
        return f"{name} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return name


def run_status(row: dict) -> str:
    """A run's stored status; "running" is checked against its process when that ran in this
    machine's process space (a run killed with -9 or by a crash never writes its final status)."""
    status = row["status"] or ""
    if status != "running" or row.get("pid") is None or os.name != "posix":  # signal 0 is POSIX only
        return status
    if row.get("host") != process_host():
        return f"running elsewhere? (recorded on {str(row.get('host')).split(' ')[0]})"
    try:
        os.kill(row["pid"], 0)  # signal 0: is the process there (it may be another's, after a reboot)
    except ProcessLookupError:
        return "interrupted (its process is gone; rerun the spec to resume)"
    except OSError:  # e.g. another user's process: it exists
        pass
    return status


class StoreBusyError(RuntimeError):
    """Another process kept the database locked for longer than the retry window."""


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("could not set" in text or "conflicting" in text or "being used" in text)


class StoreOpenError(RuntimeError):
    """The file cannot be used as an audit store (missing, not a DuckDB file, or from a newer version)."""


class AuditStore:
    """Short-lived connections to ``path`` with retry on the file lock."""

    def __init__(self, path: str | Path, retry_seconds: float = LOCK_RETRY_SECONDS, must_exist: bool = False):
        """``must_exist``: for commands that only read, a missing file is an error rather than a new store
        (a mistyped ``--db`` or ``--workspace`` would otherwise leave an empty database behind)."""
        self.path = Path(path)
        self.retry_seconds = retry_seconds
        if self.path.is_dir():
            raise StoreOpenError(f"{self.path}: is a folder; --db takes the DuckDB file (e.g. {self.path / 'audit.duckdb'})")
        if must_exist and not self.path.is_file():
            raise StoreOpenError(f"{self.path}: no audit store here; `audit run SPEC` creates one (or pass the "
                                 "right --db / --workspace)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._ensure_schema()
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreOpenError(f"{self.path}: cannot be opened as an audit store: {first}") from None

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only and self.path.exists())
                break
            except duckdb.IOException as exc:
                if not _is_lock_error(exc) or time.monotonic() > deadline:
                    if _is_lock_error(exc):
                        raise StoreBusyError(
                            f"{self.path}: another process has held the database for {self.retry_seconds:.0f} s; "
                            "wait for it to finish (or stop it) and rerun — finished stages are kept"
                        ) from exc
                    raise
                time.sleep(delay + random.uniform(0, delay))
                delay = min(delay * 2, 1.0)
        try:
            yield con
        finally:
            con.close()

    def _ensure_schema(self) -> None:
        with self.connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS schema_info (version INTEGER)")
            row = con.execute("SELECT max(version) FROM schema_info").fetchone()
            version = row[0] if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreOpenError(
                    f"{self.path}: written by a newer crosscoder-audit (schema {version} > {SCHEMA_VERSION}); "
                    "upgrade the package or point --db at another file"
                )
            con.execute("BEGIN TRANSACTION")
            # Tables the file lacks first (all of them in a new file; early schema-1 files had no
            # ``transfers``), at their current shape; the migrations then bring older tables up to date.
            for name, columns in TABLES.items():
                con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
            if version is None:
                con.execute("INSERT INTO schema_info VALUES (?)", [SCHEMA_VERSION])
            else:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[step]:
                        con.execute(statement)
                    con.execute("INSERT INTO schema_info VALUES (?)", [step])
            con.execute("COMMIT")

    # ---- writing -----------------------------------------------------------------------------
    def replace_rows(self, table: str, run_id: str, rows: Sequence[dict[str, Any]], where: dict | None = None) -> None:
        """Atomically replace ``table``'s rows of ``run_id`` (restricted by ``where``) with ``rows``."""
        columns = _columns(table)
        conditions = ["run_id = ?"] + [f"{key} = ?" for key in (where or {})]
        params = [run_id, *(where or {}).values()]
        values = [[_cell(row.get(col)) if col != "run_id" else run_id for col in columns] for row in rows]
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(f"DELETE FROM {table} WHERE {' AND '.join(conditions)}", params)
                if values:
                    _insert(con, table, columns, values)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise

    def upsert_run(self, run: dict[str, Any]) -> None:
        with self.connect() as con:
            existing = con.execute("SELECT created_at FROM runs WHERE run_id = ?", [run["run_id"]]).fetchone()
        row = {**run, "created_at": existing[0] if existing else run.get("created_at")}
        self.replace_rows("runs", run["run_id"], [row])

    def insert_diff(self, diff_id: str, run_a: str, run_b: str, summary: dict) -> None:
        with self.connect() as con:
            con.execute("DELETE FROM diffs WHERE diff_id = ?", [diff_id])
            con.execute("INSERT INTO diffs VALUES (?, ?, ?, now(), ?)", [diff_id, run_a, run_b, json.dumps(summary)])

    # ---- reading -----------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self.connect(read_only=True) as con:
            cursor = con.execute(sql, list(params))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def rows(self, table: str, run_id: str, order: str | None = None) -> list[dict[str, Any]]:
        order_by = f" ORDER BY {order}" if order else ""
        return self.query(f"SELECT * FROM {table} WHERE run_id = ?{order_by}", [run_id])

    def run(self, run_id: str) -> dict[str, Any] | None:
        found = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        return found[0] if found else None


def _columns(table: str) -> list[str]:
    return [part.strip().split()[0] for part in TABLES[table].split(",") if part.strip()]


# Below this many rows a parameterised insert is as fast; above it, DuckDB binds parameters row by row
# (6,000 contexts: ~5 s) while an Arrow table goes in as one scan (~0.2 s).
_BULK_ROWS = 64


def _insert(con, table: str, columns: list[str], values: list[list[Any]]) -> None:
    names = ", ".join(columns)
    if len(values) >= _BULK_ROWS:
        import pyarrow as pa

        try:
            incoming = pa.table({col: [row[i] for row in values] for i, col in enumerate(columns)})
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed Python types: let DuckDB cast each value
            incoming = None
        if incoming is not None:
            con.register("_incoming_rows", incoming)
            # Not in a `finally`: after a failed insert the transaction is aborted and unregistering would
            # raise an error of its own in place of the real one (the connection is closed anyway).
            con.execute(f"INSERT INTO {table} ({names}) SELECT * FROM _incoming_rows")
            con.unregister("_incoming_rows")
            return
    con.executemany(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in columns)})", values)


def _cell(value: Any) -> Any:
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value)
    if isinstance(value, float) and value != value:  # NaN → NULL
        return None
    return value
