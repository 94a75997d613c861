"""The staged audit runner: validate → models → harvest → train → stability → analyse → screen → verify →
transfer → report.

Each stage's artefact lives in the workspace cache, ``<workspace>/cache/<stage>-<hash>/``, where the
hash covers the stage's own settings and the hash of the stage before it; the folder's
``done.json`` is written last, so a folder with it is complete. A rerun skips finished stages, a
changed setting reruns only the stages that depend on it, and an interrupted stage resumes (the
harvest after its last shard, training from its last checkpoint, verification per feature).

A run is ``<spec name>-<hash of the whole spec>``; its folder ``<workspace>/<spec name>/<run id>/``
holds the resolved spec, a ``stages.json`` index of the artefacts, and the reports. Every stage
also loads its results into the workspace's DuckDB file under the run id (idempotently), so that
a stage found in the cache still gives this run its rows.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .spec import AuditSpec, harvest_settings
from .store import AuditStore, StoreBusyError, process_host

STAGES = ("validate", "models", "harvest", "train", "stability", "analyse", "screen", "verify", "transfer", "report")
#: The earlier stages whose artefacts a stage reads, where that is not all of them: a transfer moves a
#: direction through the crosscoder and needs nothing of analyse, screen or verify.
STAGE_INPUTS = {  # stages not listed need every stage before them
    "stability": ("harvest", "train"), "analyse": ("harvest", "train"), "screen": ("harvest", "train", "analyse"),
    "verify": ("harvest", "train", "analyse", "screen"), "transfer": ("harvest", "train"),
}
RUNNER_VERSION = "1"
EVAL_PAIRS = 20_000
#: Verify sweeps run together in one Inspect eval (one model): larger generation batches, and an
#: interrupted stage loses at most one group.
SWEEPS_PER_EVAL = 5
#: The exit code of a torchrun rank whose training diverged (``audit.launch``).
DIVERGED_EXIT = 4
#: How much lower the CPU priority of a stage run in a second process is (``os.nice``).
BACKGROUND_NICENESS = 10


_DISK_FULL_TEXTS = ("no space left on device", "os error 28", "disk full", "not enough space on the disk")


def disk_full_path(exc: BaseException) -> tuple[bool, str | None]:
    """Whether ``exc`` (or an exception it was raised from) is a full disk, and the file it names.
    Not every library raises OSError(ENOSPC): safetensors and DuckDB raise their own types whose
    only trace is the operating system's message, so the text is matched too."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True, current.filename if isinstance(current.filename, str) else None
        if any(text in str(current).lower() for text in _DISK_FULL_TEXTS):
            filename = getattr(current, "filename", None)
            if not isinstance(filename, str):  # DuckDB names it in the message: ... to file "x.wal": ...
                named = re.search(r'file "([^"]+)"', str(current))
                filename = named.group(1) if named else None
            return True, filename
        current = current.__cause__ or current.__context__
    return False, None


def disk_full_hint(path: Path) -> str:
    """What to do when a write ran out of space under ``path``."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**30:.1f} GiB free now"
    except OSError:
        free = "free space unknown"
    return (f"the disk holding {path} is full ({free}): free some space and rerun the same command (or point "
            "--workspace at a larger disk, where the stages start afresh)")


class StageError(RuntimeError):
    """A stage failed in a way the user can fix; the message says what to do."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage


class MissingStagesError(StageError):
    """``--only`` / ``--from`` selected a stage whose inputs are not cached: nothing was computed."""


REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE_CODE = {  # the source files whose change should rerun a stage (its own logic, not the libraries')
    "train": ("crosscoder/train.py", "crosscoder/model.py", "crosscoder/sparse.py", "crosscoder/config.py"),
    "analyse": ("crosscoder/analysis.py", "crosscoder/metrics.py", "evals/onsets.py"),
    "screen": ("evals/screen.py", "evals/screen_stage.py", "evals/offline.py", "evals/verify_stage.py"),
    "verify": ("evals/verify.py", "evals/verify_stage.py", "evals/effects.py", "evals/coherence.py",
               "evals/offline_grader.py", "evals/provider.py", "crosscoder/steering.py", "evals/prompts.py"),
    "stability": ("crosscoder/stability.py", "crosscoder/metrics.py", "crosscoder/analysis.py"),
    "transfer": ("evals/transfer.py", "evals/transfer_stage.py", "crosscoder/transfer.py", "crosscoder/persona.py",
                 "evals/verify.py", "evals/verify_stage.py", "evals/effects.py", "evals/coherence.py",
                 "evals/offline_grader.py", "evals/provider.py", "crosscoder/steering.py"),
}


def _code_hash(stage: str) -> str:
    h = hashlib.sha256()
    for relative in STAGE_CODE[stage]:
        path = REPO_ROOT / relative
        h.update(path.read_bytes() if path.is_file() else relative.encode())
    return h.hexdigest()[:16]


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def run_id_for(spec: AuditSpec) -> str:
    return f"{spec.name}-{spec.content_hash()[:8]}"


@dataclass
class StageResult:
    stage: str
    input_hash: str
    artefact: Path | None
    cached: bool
    seconds: float
    summary: dict = field(default_factory=dict)
    alongside: bool = False  # made by a second process while this one ran other stages


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    stages: list[StageResult]
    report_paths: list[Path]
    gate_failures: list[str]


@dataclass
class BackgroundStage:
    """A stage running in a second process (see ``AuditRunner._start_background``)."""

    stage: str
    process: Any  # subprocess.Popen
    log_path: Path
    started: float

    def log_tail(self, lines: int) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line.strip() for line in text.splitlines() if line.strip()][-lines:]

    def stop(self) -> None:
        """Stop the process if it still runs (what it finished stays in the cache for the next run)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except Exception:  # noqa: BLE001 - it would not stop: make it
                self.process.kill()
                self.process.wait()


def _sweep_groups(items: list[dict], size: int) -> list[list[dict]]:
    """``items`` (verify plan entries) in groups of at most ``size`` of one model each, in plan order
    of each group's first item: the best-matching features are swept first whichever model they steer."""
    by_side: dict[str, list[dict]] = {}
    for item in items:
        by_side.setdefault(item["own_model"], []).append(item)
    groups = [mine[start:start + size] for mine in by_side.values() for start in range(0, len(mine), size)]
    position = {id(item): i for i, item in enumerate(items)}
    return sorted(groups, key=lambda group: position[id(group[0])])


#: Suffix of a stage folder set aside while ``--force`` recomputes it (restored if the recompute fails).
REPLACED_SUFFIX = ".replaced"
#: What a stage writes into its folder before it has done any work (its plan, Inspect's log folder): not progress.
BOOKKEEPING = ("plan.json", "logs")


def _aside(folder: Path) -> Path:
    """Where ``--force`` keeps a stage folder's finished artefact while the stage is computed again."""
    return folder.with_name(folder.name + REPLACED_SUFFIX)


def _saved_progress(folder: Path) -> bool:
    """Whether a stage folder holds work a rerun would resume (anything but bookkeeping)."""
    return folder.is_dir() and any(entry.name not in BOOKKEEPING for entry in folder.iterdir())


def check_device(device: str | None) -> None:
    """Raise ``StageError`` (validate) unless ``device`` (``--device`` or ``compute.device``; None: automatic)
    is one torch knows and this machine has: checked before any stage runs, so a typo never starts one."""
    if not device:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise StageError("validate", f"device {device!r} (--device or compute.device) is not a torch device: "
                         f"{str(exc).splitlines()[0]}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise StageError("validate", f"device {device!r} (--device or compute.device): this machine has no CUDA "
                         "device that torch can use; use cpu, or leave the device unset to pick one automatically")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise StageError("validate", f"device {device!r} (--device or compute.device): this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if parsed.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise StageError("validate", f"device {device!r} (--device or compute.device): no XPU is available here")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise StageError("validate", f"device {device!r} (--device or compute.device): MPS is not available here")


class AuditRunner:
    def __init__(self, spec: AuditSpec, spec_path: Path | None = None, workspace: Path = Path("runs"),
                 db_path: Path | None = None, device: str | None = None, console: Console | None = None,
                 nproc: int | None = None):
        self.spec = spec
        self.spec_path = spec_path
        self.workspace = Path(workspace)
        self.cache = self.workspace / "cache"
        self.run_id = run_id_for(spec)
        self.run_dir = self.workspace / spec.name / self.run_id
        self._db_path = db_path or self.workspace / "audit.duckdb"
        self._db: AuditStore | None = None
        self.device = device or spec.compute.device
        self.nproc = nproc or spec.compute.nproc
        if spec.crosscoder.train.batch_size % self.nproc:
            raise StageError("validate", f"crosscoder.train.batch_size ({spec.crosscoder.train.batch_size}) must be a "
                             f"multiple of the number of processes ({self.nproc})")
        if self.nproc > 1 and spec.compute.device_map:
            raise StageError("validate", "compute.device_map spreads each model over every GPU, so it needs one "
                             f"process, not {self.nproc}")
        if self.nproc > 1 and self.device and ":" in self.device:
            raise StageError("validate", f"device {self.device} names one GPU, but each of the {self.nproc} processes "
                             "needs its own: use 'cuda'")
        self.console = console or Console()
        self.hashes: dict[str, str] = {}
        self.artefacts: dict[str, Path] = {}
        self._loaded_models: dict[str, Any] = {}
        self._meters: dict[tuple[str, int], Any] = {}
        self._missing: list[str] = []  # earlier stages neither run nor cached in this invocation
        self._await_training: int | None = None  # see run_detached: the pid of the process training
        self._forced: set[str] = set()  # the stages this invocation reruns with --force

    def _stage_folder(self, stage: str, input_hash: str) -> Path:
        return self.cache / f"{stage}-{input_hash}"

    @property
    def db(self) -> AuditStore:
        """The workspace's DuckDB store, opened on first use (ranks of a torchrun job never open it)."""
        if self._db is None:
            self._db = AuditStore(self._db_path)
        return self._db

    # ---- driving ------------------------------------------------------------------------------
    def run(self, only: str | None = None, start: str | None = None, force: bool = False) -> RunResult:
        for name in (only, start):
            if name is not None and name not in STAGES:
                raise StageError(name, f"unknown stage; choose one of {', '.join(STAGES)}")
        check_device(self.device)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.run_dir / "spec.resolved.json", self.spec.model_dump(mode="json"))
        previous = self.db.run(self.run_id)  # restored if this invocation turns out to compute nothing
        self._register_run(status="running")
        first = STAGES.index(start) if start else 0
        self._missing = []  # a runner may run several times (e.g. --only harvest, then --only train)
        self._forced = {s for i, s in enumerate(STAGES) if force and (only is None or s == only) and i >= first}
        results = []
        background: BackgroundStage | None = None
        transfer_after: str | None = None  # the stage after which the transfer starts in a second process
        try:
            for index, stage in enumerate(STAGES):
                selected = (only is None or stage == only) and index >= first
                rerun = force and selected
                if background is not None and stage == background.stage:
                    result = self._finish_background(background)
                    background = None
                else:
                    result = self._stage(stage, run=selected, force=rerun)
                if result is not None:
                    results.append(result)
                if stage == "harvest" and only is None:
                    transfer_after = self._transfer_start(first, force)
                if background is None and stage == transfer_after:
                    background = self._start_background("transfer", force, wait_for_training=stage != "train")
        except MissingStagesError as exc:
            if any(not r.cached for r in results):  # --from computed stages before this one: they count
                self._register_run(status=f"failed at {exc.stage}")
            elif previous is not None:  # nothing was computed: a finished run keeps its row as it was
                self.db.upsert_run(previous)
            else:
                self._register_run(status="not run: earlier stages missing")
            raise
        finally:
            if background is not None:  # a stage before it failed or was interrupted: its finished work stays
                background.stop()
        gate_failures = self.check_gates()
        self._register_run(status="finished")
        reports = [p for p in (self.run_dir / "report.html", self.run_dir / "report.md") if p.is_file()]
        _write_json(self.run_dir / "stages.json", {r.stage: {"hash": r.input_hash, "artefact": str(r.artefact),
                                                            "cached": r.cached, "seconds": round(r.seconds, 2),
                                                            "alongside": r.alongside}
                                                  for r in results})
        return RunResult(self.run_id, self.run_dir, results, reports, gate_failures)

    def _stage(self, stage: str, run: bool, force: bool, made_elsewhere: float | None = None) -> StageResult | None:
        """Run (or find in the cache) one stage. Stages not selected still resolve their artefact
        from the cache when it exists, because later stages need it. ``made_elsewhere``: the seconds a
        second process of this run took to make the artefact (recorded as done, not cached)."""
        compute: Callable[[Path], dict] = getattr(self, f"_compute_{stage}")
        input_hash = getattr(self, f"_hash_{stage}")()
        self.hashes[stage] = input_hash
        folder = self._stage_folder(stage, input_hash) if stage not in ("validate", "report") else None
        done = folder / "done.json" if folder is not None else None
        if folder is not None and not force:
            self._recover_set_aside(folder)
        started = time.perf_counter()
        cached = done is not None and done.is_file() and not force
        if cached:
            summary = json.loads(done.read_text())
        elif not run:
            if folder is not None:
                self.artefacts[stage] = folder
            self._missing.append(stage)
            return None
        else:
            inputs = STAGE_INPUTS.get(stage)  # None: every stage before it
            needed = [s for s in self._missing if s not in ("validate", "models") and (inputs is None or s in inputs)]
            if needed:
                raise MissingStagesError(stage, f"needs the {', '.join(needed)} stage(s), which are not in the cache "
                                         "for these settings; run without --only/--from first")
            replaced = self._set_aside(stage, folder) if force and folder is not None and folder.exists() else None
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            self.console.rule(f"[bold]{stage}[/bold]")
            from crosscoder.models import torch_threads  # torch is imported by the stages, not by the CLI

            try:
                with torch_threads(self._stage_threads(stage)):
                    summary = compute(folder) or {}
                if done is not None:  # inside the try: writing the marker can hit a full disk too
                    summary = self._mark_done(done, summary)
            except BaseException as exc:  # also KeyboardInterrupt: the row says where it stopped
                message = f"{type(exc).__name__}: {exc}"[:2000]
                kept = self._after_failed_force(stage, folder, replaced) if replaced is not None else ""
                if kept:
                    message += "\n" + kept
                disk_full, full_file = disk_full_path(exc)
                hint = disk_full_hint(Path(full_file) if full_file else folder or self.cache) if disk_full else None
                if hint:
                    message += "\n" + hint
                wrapped = isinstance(exc, Exception) and not isinstance(exc, StageError)  # re-raised as a StageError
                try:
                    self._record_stage(stage, input_hash, folder, "failed", time.perf_counter() - started, message)
                    self._register_run(status=f"failed at {stage}")
                except Exception as record_exc:  # e.g. the store is on the same full disk: keep the real error
                    unrecorded = f"this failure could not be recorded in {self.db.path}: {record_exc}"
                    message += f"\n({unrecorded})"
                    if not wrapped:  # the message below is not raised: say it here
                        self.console.print(f"{stage}: {unrecorded}", style="red", markup=False, highlight=False)
                if wrapped:
                    again = ("rerun without --force to resume what this run saved" if force
                             else "rerun the same command to resume")
                    raise StageError(stage, f"{message}\nfinished artefacts are kept in {self.cache}; fix the "
                                     f"problem and {again}") from exc
                if (hint or kept) and isinstance(exc, StageError):  # a stage's own error: add what the user needs
                    extra = "\n".join(x for x in (hint, kept) if x)
                    raise StageError(stage, f"{str(exc).removeprefix(stage + ': ')}\n{extra}") from exc
                if kept and not isinstance(exc, Exception):  # Ctrl-C: the row has it, say it here too
                    self.console.print(f"{stage}: {kept}", style="yellow", markup=False, highlight=False)
                raise
            if folder is not None:  # done again (here, or resumed after a failed --force): the old copy goes
                shutil.rmtree(_aside(folder), ignore_errors=True)
        if folder is not None:
            self.artefacts[stage] = folder
        seconds = time.perf_counter() - started
        if run or cached:
            loader = getattr(self, f"_load_{stage}", None)
            if loader is not None and (run or cached):
                try:
                    loader(folder, summary)
                except (duckdb.Error, StoreBusyError) as exc:  # the artefact itself is whole
                    first = (str(exc).strip().splitlines() or [""])[0]
                    message = (f"its artefact is complete ({folder}), but its rows could not be written to "
                               f"{self.db.path}: {type(exc).__name__}: {first}")
                    with contextlib.suppress(Exception):
                        self._record_stage(stage, input_hash, folder, "failed", time.perf_counter() - started, message)
                    with contextlib.suppress(Exception):
                        self._register_run(status=f"failed at {stage}")
                    raise StageError(stage, f"{message}\nfix the problem and rerun without --force: the stage is "
                                     "then loaded from its artefact, not computed again") from exc
        alongside = cached and made_elsewhere is not None
        if alongside:
            cached, seconds = False, made_elsewhere
        self._record_stage(stage, input_hash, folder, "cached" if cached else "done", seconds,
                           json.dumps({k: v for k, v in summary.items() if k != "platform"}, default=str)[:2000],
                           platform=summary.get("platform"))
        if cached and run:
            self.console.print(f"[dim]{stage}: cached ({folder})[/dim]", highlight=False)
        return StageResult(stage, input_hash, folder, cached, seconds, summary, alongside)

    # ---- --force without losing the artefact it replaces ------------------------------------------
    def _set_aside(self, stage: str, folder: Path) -> Path | None:
        """Before a forced recompute: move the stage's folder to ``<folder>.replaced`` (kept until the stage is
        done again, so a failed recompute does not cost the artefact), or delete it for the harvest, whose
        store can be too large to keep twice. Returns the folder set aside."""
        if stage == "harvest":
            shutil.rmtree(folder)
            return None
        aside = _aside(folder)
        if aside.exists():
            if (aside / "done.json").is_file() and not (folder / "done.json").is_file():
                # an earlier --force run was killed: the copy aside is the finished one, the folder its retry
                shutil.rmtree(folder)
                return aside
            shutil.rmtree(aside)
        folder.rename(aside)
        return aside

    def _after_failed_force(self, stage: str, folder: Path, aside: Path) -> str:
        """After a forced recompute failed: the artefact it replaced goes back if the recompute saved nothing;
        otherwise both stay (its progress resumes in place). What was done, in a sentence for the user."""
        if not aside.exists():
            return ""
        if _saved_progress(folder):
            return (f"this --force run's progress stays in {folder} (rerun without --force to resume it); the "
                    f"{stage} artefact from before it is kept in {aside} (move it back to {folder} to use it)")
        return self._put_back(stage, folder, aside)

    @staticmethod
    def _put_back(stage: str, folder: Path, aside: Path) -> str:
        """Replace ``folder`` (what a failed --force run left) by the artefact set aside before it."""
        try:
            if folder.exists():
                shutil.rmtree(folder)
            aside.rename(folder)
        except OSError as exc:
            return f"the {stage} artefact from before this --force run is kept in {aside} (not moved back: {exc})"
        return f"the {stage} artefact from before this --force run is back in place ({folder})"

    @staticmethod
    def _recover_set_aside(folder: Path) -> None:
        """A folder set aside by a --force run that was killed (so neither finished nor restored): put it back
        when the retry saved nothing; drop it once the retry has finished."""
        aside = _aside(folder)
        if not aside.exists():
            return
        if (folder / "done.json").is_file():
            shutil.rmtree(aside, ignore_errors=True)
        elif (aside / "done.json").is_file() and not _saved_progress(folder):
            # if that fails (another process's --force run took the folder meanwhile), the copy stays aside
            AuditRunner._put_back("", folder, aside)

    # ---- a stage in a second process --------------------------------------------------------------
    def _transfer_start(self, first: int, force: bool) -> str | None:
        """The stage after which to start the transfer stage in a second process (None: run it in turn).

        Only when the spec asks for it, the stage has work to do, and so has a stage it would overlap:
        training (a transfer's extraction and source-model arms need no crosscoder; its process waits
        for the training before the rest), the stability stage's trainings, analyse, screen or verify. It
        starts after the harvest, or after the training when ``--force`` retrains (the old checkpoint is
        deleted then).
        """
        if not (self.spec.compute.overlap_transfer and self.spec.transfer.traits) or first > STAGES.index("verify"):
            return None
        try:  # the hashes are what the stages will compute (each is built from the one before it)
            for stage in ("harvest", "train", "stability", "analyse", "screen", "verify", "transfer"):
                self.hashes[stage] = getattr(self, f"_hash_{stage}")()
        except Exception:  # noqa: BLE001 - e.g. a missing rubric file: the stage that reads it says so
            return None

        def done(stage: str) -> bool:
            return (self._stage_folder(stage, self.hashes[stage]) / "done.json").is_file()

        if not done("harvest"):
            return None  # the run stops at the missing harvest (--from after it)
        train_runs = first <= STAGES.index("train") and (force or not done("train"))
        if not train_runs and not done("train"):
            return None  # the run stops at the missing training (--from after it): nothing to overlap
        if force:
            return "train" if train_runs else "harvest"
        # stages it would overlap; the stability stage only has work when it trains other seeds
        overlapped = ("analyse", "screen", "verify") + (("stability",) if self.spec.stability.seeds else ())
        if done("transfer") or not (train_runs or not all(done(s) for s in overlapped)):
            return None
        return "harvest"

    def _start_background(self, stage: str, force: bool, wait_for_training: bool = False) -> BackgroundStage:
        """Start ``python -m audit.launch STAGE`` for this spec and workspace in a second process (which
        lowers its own CPU priority); its output goes to a log file in the run folder."""
        import subprocess
        import sys

        folder = self._stage_folder(stage, self.hashes[stage])
        if force and folder.exists():  # here, not there: if that process fails, this one must not find it done
            shutil.rmtree(folder)
        # The folder it must fill: a process that computes another one (other settings) stops at once.
        command = [sys.executable, "-m", "audit.launch", stage, str(self.run_dir / "spec.resolved.json"),
                   "--workspace", str(self.workspace), "--nproc", str(self.nproc), "--expect", str(folder)]
        if self.device:
            command += ["--device", self.device]
        if wait_for_training:
            command.append("--wait-for-training")
        log_path = self.run_dir / f"{stage}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONPATH": _python_path()})
        self.console.print(f"[dim]{stage}: started in a second process while the next stages run (its log: "
                           f"{log_path})[/dim]", highlight=False)
        return BackgroundStage(stage, process, log_path, time.perf_counter())

    def _finish_background(self, background: BackgroundStage) -> StageResult | None:
        """Wait for the stage started in a second process, then take its artefact from the cache like any
        stage's. If that process failed, say so and run the stage here: it resumes from what the
        other process finished."""
        stage = background.stage
        self.console.rule(f"[bold]{stage}[/bold]")
        try:
            with self.console.status(f"{stage}: waiting for the second process (its log: {background.log_path})"):
                code = background.process.wait()
        except BaseException as exc:  # Ctrl-C: the row says where the run stopped (the caller stops the process)
            self._record_stage(stage, self.hashes[stage], None, "failed", time.perf_counter() - background.started,
                               f"{type(exc).__name__} while waiting for the second process")
            self._register_run(status=f"failed at {stage}")
            raise
        seconds = time.perf_counter() - background.started  # that process's wall time, its waits included
        if code == 0:
            result = self._stage(stage, run=True, force=False, made_elsewhere=seconds)
            summary = result.summary if result is not None else {}
            self.console.print(f"{stage}: done in the second process in {seconds:.0f} s "
                               f"({summary.get('holds', 0)} of {summary.get('transfers', '?')} transfers hold)",
                               highlight=False)
            return result
        tail = " | ".join(background.log_tail(3))
        self.console.print(f"[yellow]{stage}: the second process failed (exit code {code}: {tail}); running the stage "
                           f"here, from where it stopped (its log: {background.log_path})[/yellow]", highlight=False)
        return self._stage(stage, run=True, force=False)

    def run_detached(self, stage: str, force: bool = False, wait_for_training: bool = False,
                     expect: Path | None = None) -> Path:
        """Make ``stage``'s artefact in this process without touching the database: the transfer stage,
        which ``audit run`` starts in a second process (``compute.overlap_transfer``); the ``audit run``
        that started it then finds the artefact done and loads its rows. ``wait_for_training``: the
        crosscoder is being trained by the process that started this one; the work that needs no
        crosscoder is done first, then this process waits for the training to finish. ``expect``: the
        artefact folder the starting process will look in; another one here is an error."""
        from crosscoder.models import torch_threads

        if stage != "transfer":
            raise StageError(stage, "only the transfer stage runs in a second process")
        self.hashes["harvest"] = self._hash_harvest()
        self.hashes["train"] = self._hash_train()
        for earlier in ("harvest", "train"):
            folder = self._stage_folder(earlier, self.hashes[earlier])
            if not (folder / "done.json").is_file() and not (earlier == "train" and wait_for_training):
                raise StageError(stage, f"the {earlier} stage is not finished for these settings ({folder}); run "
                                 "`audit run` first")
            self.artefacts[earlier] = folder
        folder = self._stage_folder(stage, self._hash_transfer())
        if expect is not None and folder.resolve() != Path(expect).resolve():
            raise StageError(stage, f"this process would write {folder}, but the run that started it expects {expect}: "
                             "their settings differ (another --nproc, or the code changed in between)")
        if force and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if wait_for_training:
            self._await_training = os.getppid()
        with torch_threads(self._stage_threads(stage)):
            summary = self._compute_transfer(folder)
        self._mark_done(folder / "done.json", summary)
        return folder

    def _wait_for_training(self, parent: int, poll_s: float = 0.5) -> None:
        """Wait until the train stage's artefact is finished, as long as ``parent`` (the process
        training it) lives."""
        done = self.artefacts["train"] / "done.json"
        if done.is_file():
            return
        self.console.print(f"waiting for the crosscoder ({done.parent})", highlight=False)
        while not done.is_file():
            if os.getppid() != parent:
                raise StageError("transfer", "the audit run that trains the crosscoder has stopped; rerun it")
            time.sleep(poll_s)

    def _record_stage(self, stage, input_hash, folder, status, seconds, message, platform: dict | None = None) -> None:
        self.db.replace_rows("stages", self.run_id, [{
            # absolute: `audit diff` and `audit report` may run from another directory
            "stage": stage, "input_hash": input_hash, "artefact": str(folder.resolve()) if folder else None,
            "status": status, "seconds": seconds, "finished_at": datetime.now(), "message": message,
            "platform": json.dumps(platform) if platform else None}],
            where={"stage": stage})

    def _mark_done(self, done: Path, summary: dict) -> dict:
        """Write an artefact's ``done.json`` (last, so a folder with it is complete): its summary and
        where it was computed. Returns what was written."""
        summary = {**summary, "platform": self._platform()}
        _write_json(done, summary)
        return summary

    def _platform(self) -> dict:
        """Where this process computes (see ``crosscoder.numerics``): kept with each artefact it makes."""
        from crosscoder.numerics import numerics_platform

        return numerics_platform(self.device)  # --device overrides the spec's

    def _register_run(self, status: str) -> None:
        spec = self.spec
        self.db.upsert_run({
            "run_id": self.run_id, "spec_name": spec.name, "spec_hash": spec.content_hash(),
            "created_at": datetime.now(), "updated_at": datetime.now(), "status": status,
            "spec_json": json.dumps(spec.model_dump(mode="json")), "model_a": spec.model_a.id,
            "model_b": spec.model_b.id, "layer_a": spec.model_a.layer, "layer_b": spec.model_b.layer,
            "explainer": spec.screen.explainer, "grader": spec.verify.grader, "run_dir": str(self.run_dir.resolve()),
            "crosscoder_path": str(self.artefacts["train"].resolve()) if "train" in self.artefacts else None,
            "report_path": str(self.run_dir.resolve() / "report.html"),  # absolute: `audit report` runs anywhere
            "pid": os.getpid(), "host": process_host(),
        })

    # ---- validate -------------------------------------------------------------------------------
    def _hash_validate(self) -> str:
        return self.spec.content_hash()

    def _stage_threads(self, stage: str) -> int | None:
        """torch's CPU threads while ``stage`` runs (None: torch's own): ``compute.train_threads`` for
        training, ``compute.eval_threads`` for the stages that run the models and graders under Inspect."""
        if stage in ("train", "stability"):
            return self.spec.compute.train_threads
        if stage in ("screen", "verify", "transfer"):
            return self.spec.compute.eval_threads
        return None

    def _compute_validate(self, _folder) -> dict:
        from .checks import missing_api_keys, spec_problems

        # Data files are the harvest's to open (it names a missing one), so a run whose harvest is
        # cached still resumes after its corpus file has moved.
        problems = spec_problems(self.spec, data=False) + missing_api_keys(self.spec)
        if problems:
            raise StageError("validate", "\n".join(problems))
        names = list(self.spec.verify.rubrics) + [r for rs in self.spec.verify.features.values() for r in rs]
        return {"rubrics": list(dict.fromkeys(names + [_trait_rubric(name) for name in self.spec.transfer.traits]))}

    # ---- models ---------------------------------------------------------------------------------
    def _model_fingerprint(self, model_id: str) -> str:
        if model_id.startswith("zoo:"):
            from crosscoder.zoo.build import build_key, get_spec

            try:
                return build_key(get_spec(model_id.removeprefix("zoo:")))
            except KeyError:
                return model_id
            except ValueError as exc:  # a bad $CROSSCODER_ZOO_THREADS
                raise StageError("models", str(exc)) from None
        folder = Path(model_id).expanduser()
        if folder.is_dir():  # a local folder may be retrained in place: fingerprint its files
            files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
            stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
            return f"{model_id}@{_hash(stats)}"
        return model_id

    def _hash_models(self) -> str:
        return _hash(self._model_fingerprint(self.spec.model_a.id), self._model_fingerprint(self.spec.model_b.id),
                     self.spec.model_a.revision, self.spec.model_b.revision, self.spec.model_a.layer,
                     self.spec.model_b.layer)

    def _compute_models(self, folder: Path) -> dict:
        from crosscoder.models import ModelLoadError, resolve_model_path

        self._build_zoo_models()
        out = {}
        for side, entry in (("model_a", self.spec.model_a), ("model_b", self.spec.model_b)):
            try:
                path = resolve_model_path(entry.id, side)
                # the fingerprint tells `audit diff` a local folder retrained in place from the same folder
                out[side] = {"id": entry.id, "path": path, "layers": _count_layers(path, entry, side),
                             "fingerprint": self._model_fingerprint(entry.id)}
            except ModelLoadError as exc:
                raise StageError("models", str(exc)) from None
            if entry.layer >= out[side]["layers"]:
                raise StageError("models", f"{side}.layer: {entry.layer} is out of range: {entry.id!r} has "
                                 f"{out[side]['layers']} decoder blocks (0–{out[side]['layers'] - 1})")
        return out

    # ---- harvest --------------------------------------------------------------------------------
    def _harvest_settings(self):
        settings = harvest_settings(self.spec, self.device)
        settings.extra = {"models": [self._model_fingerprint(self.spec.model_a.id),
                                     self._model_fingerprint(self.spec.model_b.id)]}
        files = _data_file_fingerprints(self.spec)
        if files:  # a local data file edited in place is other data: harvest it afresh, never resume into it
            settings.extra["data_files"] = files
        settings.ranks = self.nproc
        return settings

    def _hash_harvest(self) -> str:
        return self._harvest_settings().input_hash()

    def _build_zoo_models(self) -> None:
        """Build the spec's missing zoo models together (in parallel) before anything loads one of them.
        The models stage does it, and so do the stages that load models, since a run with --only or
        --from skips the models stage and the zoo cache may have been cleared since it ran."""
        from crosscoder.models import build_zoo_models

        build_zoo_models([self.spec.model_a.id, self.spec.model_b.id])

    def _compute_harvest(self, folder: Path) -> dict:
        from crosscoder.data import DataSourceError
        from crosscoder.harvest import harvest
        from crosscoder.models import ModelLoadError
        from crosscoder.store import StoreError

        self._build_zoo_models()
        try:
            if self.nproc > 1:
                self._launch("harvest")  # the ranks write the store; the call below then just opens it
            store = harvest(self._harvest_settings(), folder / "store", progress=True)
        except (ModelLoadError, DataSourceError, StoreError) as exc:
            raise StageError("harvest", f"{exc}\nfinished shards in {folder} are kept; fix the problem and rerun "
                             "to resume") from None
        alignment = store.meta["alignment"]
        self.console.print(f"{store.n_pairs:,} pairs, {100 * alignment['fully_aligned_frac']:.1f} % of sequences "
                           "fully aligned", highlight=False)
        return {"n_pairs": store.n_pairs, "alignment": alignment}

    def store(self):
        from crosscoder.store import ActivationStore

        return ActivationStore(self.artefacts["harvest"] / "store")

    # ---- train ----------------------------------------------------------------------------------
    def _crosscoder_spec(self, seed: int | None = None):
        """The spec's crosscoder settings, or the same with another seed (the stability stage's)."""
        settings = self.spec.crosscoder
        return settings if seed is None else settings.model_copy(update={"seed": seed})

    def _hash_train(self, seed: int | None = None) -> str:
        # Where and how often to checkpoint, and on how many ranks, does not change the result.
        settings = self._crosscoder_spec(seed).model_dump(mode="json", exclude={"train": {"checkpoint_every"}})
        return _hash(self.hashes["harvest"], settings, self.spec.compute.train_dtype, RUNNER_VERSION,
                     _code_hash("train"))

    def _compute_train(self, folder: Path) -> dict:
        from crosscoder import TrainingDivergedError

        try:
            return self._train_and_evaluate(folder)
        except TrainingDivergedError as exc:
            # the error says which resumable state, if any, was saved before the divergence
            raise StageError("train", f"{exc}\nlower crosscoder.lr or check the data, then rerun") from None

    def _train_and_evaluate(self, folder: Path, seed: int | None = None) -> dict:
        """Train the spec's crosscoder (with ``seed`` in place of its own, when given) into ``folder``
        (on ``nproc`` processes under torchrun when more than one), evaluate it on held-out pairs and
        write ``metrics.json``; its summary. Raises ``TrainingDivergedError``."""
        from crosscoder.metrics import evaluate

        store = self.store()
        if self.nproc > 1:
            self._launch("train", seed)  # the ranks train; the call below then loads the finished model
        model = self._train_into(folder, store, self.device, self._crosscoder_spec(seed))
        x_a, x_b = store.sample(EVAL_PAIRS, seed=1)
        evaluation = evaluate(model.cpu() if str(model.W_enc_AD.device) != "cpu" else model, x_a, x_b)
        config = model.config
        metrics = {**evaluation.summary(), "relative_norm": evaluation.relative_norm.tolist(),
                   "n_a_only": config.n_a_only, "n_shared": config.n_shared, "n_b_only": config.n_b_only}
        _write_json(folder / "metrics.json", metrics)
        self.console.print(f"FVE A {evaluation.fve_a:.3f}, B {evaluation.fve_b:.3f}; L0 {evaluation.mean_l0:.1f}; "
                           f"dead {100 * evaluation.dead_fraction:.1f} %", highlight=False)
        return evaluation.summary()

    def crosscoder(self):
        from crosscoder import Crosscoder
        from crosscoder.models import default_device

        if self._await_training is not None:  # a second process started while the crosscoder trains
            self._wait_for_training(self._await_training)

        return Crosscoder.load(self.artefacts["train"] / "checkpoint", device=self.device or default_device())

    def _load_train(self, folder: Path, summary: dict) -> None:
        metrics = json.loads((folder / "metrics.json").read_text())
        harvest = json.loads((self.artefacts["harvest"] / "done.json").read_text())
        self.db.replace_rows("crosscoder_metrics", self.run_id, [{
            "architecture": self.spec.crosscoder.architecture, "dict_size": self.spec.crosscoder.dict_size,
            "k": self.spec.crosscoder.k, "n_a_only": metrics["n_a_only"], "n_shared": metrics["n_shared"],
            "n_b_only": metrics["n_b_only"], "fve_a": metrics["fve_a"], "fve_b": metrics["fve_b"],
            "mean_l0": metrics["mean_l0"], "dead_fraction": metrics["dead_fraction"], "n_pairs": harvest["n_pairs"],
            "aligned_fraction": harvest["alignment"]["fully_aligned_frac"],
            "relative_norms": metrics["relative_norm"],
            # the harvest's median activation norms: what a steering push at α = 1 is compared with
            **{f"activation_norm_{side}": norm for side, norm in self.store().meta.get("median_norm", {}).items()}}])
        self._register_run(status="running")

    # ---- distributed stages ---------------------------------------------------------------------
    def _launch(self, stage: str, seed: int | None = None) -> None:
        """Run ``stage`` on ``nproc`` processes of this machine under torchrun, and wait (``seed``: train
        the crosscoder with this seed, for the stability stage)."""
        import subprocess
        import sys

        spec_file = self.run_dir / "spec.resolved.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                   "-m", "audit.launch", stage, str(spec_file), "--workspace", str(self.workspace)]
        if self.device:
            command += ["--device", self.device]
        if seed is not None:
            command += ["--seed", str(seed)]
        self.console.print(f"[dim]{stage} on {self.nproc} processes: {' '.join(command[2:])}[/dim]", highlight=False)
        code = subprocess.run(command, env={**os.environ, "PYTHONPATH": _python_path()}).returncode
        if code == DIVERGED_EXIT:
            from crosscoder import TrainingDivergedError

            raise TrainingDivergedError(f"the training on {self.nproc} processes diverged (the ranks' messages are "
                                        f"above); the last good checkpoint is kept")
        if code != 0:
            raise StageError(stage, f"torchrun exited with code {code} (its ranks' messages are above); finished "
                             f"work in {self.cache} is kept and the same command resumes it")

    def run_distributed(self, stage: str, seed: int | None = None) -> None:
        """This rank's part of ``stage`` ("harvest" or "train", with ``seed`` in place of the spec's
        crosscoder seed when given) in a torchrun job (see ``audit.launch``).

        Every rank writes into the same cache folder that ``audit run`` uses, so that a later
        ``audit run`` finds the work done; the database is left to that single process.
        """
        from crosscoder.distributed import current, rank_device
        from crosscoder.harvest import harvest

        self.hashes["harvest"] = self._hash_harvest()
        harvest_folder = self._stage_folder("harvest", self.hashes["harvest"])
        if stage == "harvest":
            harvest(self._harvest_settings(), harvest_folder / "store", progress=True)
            return
        if stage != "train":
            raise StageError(stage, "only the harvest and train stages run on several processes")
        self.artefacts["harvest"] = harvest_folder
        self._train_into(self._stage_folder("train", self._hash_train(seed)), self.store(),
                         rank_device(self.device or "cpu", current()), self._crosscoder_spec(seed))

    def _train_into(self, folder: Path, store, device, settings=None):
        """Train this spec's crosscoder (or ``settings``) in ``folder/checkpoint`` (resuming, or loading
        it when finished)."""
        from crosscoder import train_crosscoder

        settings = settings or self.spec.crosscoder
        kwargs = settings.train.train_kwargs(self.spec.compute) | {"device": device}
        return train_crosscoder(settings.to_config(store.d_a, store.d_b), store,
                                checkpoint_dir=folder / "checkpoint", progress=True, **kwargs)

    # ---- analyse --------------------------------------------------------------------------------
    def _hash_analyse(self) -> str:
        s = self.spec.screen
        rubrics = self.spec.verify.rubrics  # each feature's onset activation on their prompts
        return _hash(self.hashes["train"], s.top_n_standard, s.relative_norm_cut, s.contexts_per_feature,
                     s.detection_contexts, rubrics, _rubric_files_hash(rubrics), RUNNER_VERSION,
                     _code_hash("analyse"))

    def loaded_model(self, side: str):
        if side not in self._loaded_models:
            from crosscoder.models import load_model

            entry = self.spec.model_entry(side)
            self._build_zoo_models()
            self._loaded_models[side] = load_model(entry.id, entry.layer, entry.revision, self.spec.compute.model_dtype,
                                                   self.device, entry.trust_remote_code, field=f"model_{side}",
                                                   chat_template=entry.chat_template,
                                                   device_map=self.spec.compute.device_map)
        return self._loaded_models[side]

    def coherence_meter(self, side: str, max_new_tokens: int):
        """One offline coherence grader per model and answer length, shared by every sweep: its
        unsteered baseline answers are computed once, and its steering hook is registered once."""
        from evals.coherence import CoherenceMeter

        key = (side, max_new_tokens)
        if key not in self._meters:
            self._meters[key] = CoherenceMeter(self.loaded_model(side), max_new_tokens=max_new_tokens)
        return self._meters[key]

    def _compute_analyse(self, folder: Path) -> dict:
        from crosscoder.analysis import analyse_features, flagged_features, unembedding
        from evals.onsets import add_rubric_onsets

        model = self.crosscoder()
        store = self.store()
        features = flagged_features(model, self.spec.screen.top_n_standard, self.spec.screen.relative_norm_cut)
        loaded = {side: self.loaded_model(side) for side in ("a", "b")}
        with _progress(self.console, "analyse shards") as (progress, task):
            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            analyses = analyse_features(
                model, store, features, {s: m.tokenizer for s, m in loaded.items()},
                {s: unembedding(m.model) for s, m in loaded.items()},
                n_contexts=self.spec.screen.contexts_per_feature,
                n_negative=self.spec.screen.detection_contexts, progress=advance,
            )
        rows = [a.to_dict() for a in analyses]
        with self.console.status("analyse: feature activations where each model is about to answer the rubrics' prompts"):
            add_rubric_onsets(rows, model, loaded, self.spec.verify.rubrics)
        _write_json(folder / "features.json", rows)
        n_artefacts = sum(r["is_artefact"] for r in rows)
        self.console.print(f"{len(rows)} flagged features: {len(rows) - n_artefacts} content, "
                           f"{n_artefacts} likely artefacts", highlight=False)
        return {"flagged": len(rows), "artefacts": n_artefacts}

    def features(self) -> list[dict]:
        return json.loads((self.artefacts["analyse"] / "features.json").read_text())

    def _load_analyse(self, folder: Path, summary: dict) -> None:
        features = self.features()
        self.db.replace_rows("features", self.run_id, [
            {**f, "artefact_reasons": f["artefact_reasons"], "top_tokens": f["top_tokens"],
             "promoted_tokens": f["promoted_tokens"]} for f in features])
        self.db.replace_rows("contexts", self.run_id, [
            {"feature": f["feature"], "rank": i, "doc": c["doc"], "position": c["position"],
             "activation": c["activation"], "text": c["text"]}
            for f in features for i, c in enumerate(f["contexts"], start=1)])

    # ---- screen ---------------------------------------------------------------------------------
    def _hash_screen(self) -> str:
        from evals.screen import EXPLAINER_VERSION

        s, v = self.spec.screen, self.spec.verify
        # Verify's settings choose which features are explained (those it can sweep), and its rubrics feed
        # the offline explainer's safety proxy.
        return _hash(self.hashes["analyse"], s.explainer, s.detector, s.max_features, s.detection_contexts,
                     v.rubrics, v.features_per_rubric, v.max_features, sorted(v.features), EXPLAINER_VERSION,
                     _rubric_files_hash(v.rubrics), _code_hash("screen"))

    def _compute_screen(self, folder: Path) -> dict:
        from evals.screen_stage import run_screen
        from evals.verify_stage import screen_selection

        v = self.spec.verify
        features = screen_selection(self.features(), self.spec.screen.max_features, v)
        with self.console.status(f"screen: explaining {len(features)} features with {self.spec.screen.explainer}"):
            results = run_screen(features, self.spec.screen, self.spec.verify.rubrics, folder / "logs")
        _write_json(folder / "screen.json", results)
        flagged = sum(bool(r.get("safety_critical")) for r in results)
        unparsed = sum(not r["parsed"] for r in results)
        self.console.print(f"{len(results)} explained, {flagged} flagged safety-critical, {unparsed} unparsed",
                           highlight=False)
        return {"explained": len(results), "safety_critical": flagged, "unparsed": unparsed}

    def screen_results(self) -> list[dict]:
        return json.loads((self.artefacts["screen"] / "screen.json").read_text())

    def _load_screen(self, folder: Path, summary: dict) -> None:
        self.db.replace_rows("explanations", self.run_id, self.screen_results())

    # ---- verify ---------------------------------------------------------------------------------
    def _hash_verify(self) -> str:
        v = self.spec.verify
        from evals.offline_grader import OFFLINE_LABEL

        return _hash(self.hashes["screen"], v.model_dump(mode="json"), _rubric_files_hash(
            list(v.rubrics) + [r for rs in v.features.values() for r in rs] + ["coherence"]), OFFLINE_LABEL,
            RUNNER_VERSION, _code_hash("verify"))

    def _compute_verify(self, folder: Path) -> dict:
        from evals.verify_stage import plan_sweeps, run_baseline, run_sweeps

        plan = plan_sweeps(self.features(), self.screen_results(), self.spec.verify)
        _write_json(folder / "plan.json", plan)
        if not plan:
            self.console.print("nothing to verify (no rubrics or no selected features)")
        # Each model's unsteered answers on every rubric first: the behavioural difference the
        # sweeps are meant to explain, measured without the dictionary.
        sides = ("a", "b") if self.spec.verify.rubrics else ()
        with _progress(self.console, "verify sweeps") as (progress, task):
            progress.update(task, total=len(plan) + len(sides))
            for side in sides:
                out = folder / f"baseline-{side}.json"
                if not out.is_file():
                    _write_json(out, run_baseline(side, self.spec, self.artefacts["train"] / "checkpoint",
                                                  self.loaded_model(side), folder / "logs",
                                                  self.coherence_meter(side, self.spec.verify.max_tokens)))
                progress.advance(task)
            # Pending sweeps run a few at a time, each group one Inspect eval on one model (shared
            # generation batches); a group's results are written as soon as it ends, so an
            # interrupted stage resumes from the first unfinished group.
            pending = [item for item in plan if not (folder / f"feature-{item['feature']}.json").is_file()]
            progress.advance(task, len(plan) - len(pending))
            for group in _sweep_groups(pending, SWEEPS_PER_EVAL):
                side = group[0]["own_model"]
                run_sweeps(group, self.spec, self.artefacts["train"] / "checkpoint", self.loaded_model(side),
                           folder / "logs", self.coherence_meter(side, self.spec.verify.max_tokens),
                           on_result=lambda item, result: _write_json(folder / f"feature-{item['feature']}.json", result))
                progress.advance(task, len(group))
        self._null_sweeps(folder)
        return {"features": len(plan)}

    def _null_sweeps(self, folder: Path) -> None:
        """For each model and rubric with a verified feature, ``verify.null_draws`` random directions of that
        feature's push size, swept and graded the same way (one file per job, so a rerun resumes)."""
        from crosscoder import Crosscoder
        from evals.verify_stage import null_jobs, run_nulls

        draws = self.spec.verify.null_draws
        results = self.verify_results(folder)
        if draws == 0 or not any(e["verified"] for r in results for e in r["effects"]):
            return
        checkpoint = self.artefacts["train"] / "checkpoint"
        jobs = null_jobs(results, Crosscoder.load(checkpoint))
        pending = [job for job in jobs if not self._null_file(folder, job).is_file()]
        with _progress(self.console, "null sweeps") as (progress, task):
            progress.update(task, total=len(jobs), completed=len(jobs) - len(pending))
            for job in pending:
                side = job["side"]
                result = run_nulls(job, draws, self.spec, checkpoint, self.loaded_model(side), folder / "logs",
                                   self._null_file(folder, job).with_suffix(".safetensors"),
                                   self.coherence_meter(side, self.spec.verify.max_tokens))
                _write_json(self._null_file(folder, job), result)
                progress.advance(task)

    @staticmethod
    def _null_file(folder: Path, job: dict) -> Path:
        """A null sweep's result; its directions lie beside it (``.safetensors``). Named by a hash of the
        rubric's name: two names a file name would spell alike ("a b", "a_b") must not share a file (the
        provider caches vector files by path)."""
        return folder / f"null-{job['side']}-{_hash(job['rubric'])}.json"

    def null_results(self) -> dict[tuple[str, str], dict]:
        """``{(model, rubric): null sweep}`` of this run's verify stage."""
        folder = self.artefacts.get("verify")
        if folder is None:
            return {}
        out = {}
        for path in sorted(folder.glob("null-*.json")):
            null = json.loads(path.read_text())
            out[(null["side"], null["rubric"])] = null
        return out

    def verify_results(self, folder: Path | None = None) -> list[dict]:
        """The finished sweeps of the verify stage (of ``folder``, default this run's artefact)."""
        folder = folder or self.artefacts.get("verify")
        if folder is None or not (folder / "plan.json").is_file():
            return []
        plan = json.loads((folder / "plan.json").read_text())
        return [json.loads((folder / f"feature-{p['feature']}.json").read_text()) for p in plan
                if (folder / f"feature-{p['feature']}.json").is_file()]

    def baseline_rows(self) -> list[dict]:
        """Both models' unsteered, graded answers on the spec's rubrics (``baselines`` table rows)."""
        folder = self.artefacts.get("verify")
        if folder is None:
            return []
        files = [folder / f"baseline-{side}.json" for side in ("a", "b")]
        return [row for f in files if f.is_file() for row in json.loads(f.read_text())["rows"]]

    def _load_verify(self, folder: Path, summary: dict) -> None:
        self.db.replace_rows("baselines", self.run_id, self.baseline_rows())
        results = self.verify_results()
        self.db.replace_rows("generations", self.run_id, [g for r in results for g in r["generations"]])
        self.db.replace_rows("scores", self.run_id, [s for r in results for s in r["scores"]])
        from evals.verify_stage import null_summary

        nulls = self.null_results()
        effects = [{**e, **null_summary(e, nulls.get((r["item"]["own_model"], e["rubric"])))}
                   for r in results for e in r["effects"]]
        self.db.replace_rows("effects", self.run_id, effects)

    # ---- stability ------------------------------------------------------------------------------
    def _hash_stability(self) -> str:
        s = self.spec.stability
        seeds = [self._hash_train(seed) for seed in s.seeds]  # each other dictionary, as the train stage keys it
        return _hash(self.hashes["train"], seeds, s.threshold, self.spec.screen.top_n_standard,
                     self.spec.screen.relative_norm_cut, RUNNER_VERSION, _code_hash("stability"))

    def _compute_stability(self, folder: Path) -> dict:
        """Train the crosscoder again with each of ``stability.seeds`` (each into the folder the train
        stage would use for that seed, so a run with ``crosscoder.seed`` set to it finds it done, and an
        interrupted training resumes; ``--force`` retrains them) and say where each flagged exclusive
        feature recurs. A seed whose training diverges is recorded as such; the others still count."""
        from crosscoder import Crosscoder, TrainingDivergedError
        from crosscoder.analysis import flagged_features
        from crosscoder.stability import feature_recurrence, recurrence_summary

        s = self.spec.stability
        dictionaries, rows = [], []
        main = flagged = None
        for position, seed in enumerate(s.seeds, start=1):
            seed_folder = self._stage_folder("train", self._hash_train(seed))
            done = seed_folder / "done.json"
            entry = {"seed": seed, "artefact": str(seed_folder.resolve())}
            aside = None  # --force: the seed's finished dictionary, kept until it is trained again
            if "stability" in self._forced and seed_folder.exists():
                aside = self._set_aside("train", seed_folder)
            else:
                self._recover_set_aside(seed_folder)
            if not done.is_file():
                self.console.print(f"stability: training the crosscoder with seed {seed} ({position} of "
                                   f"{len(s.seeds)}) into {seed_folder}", highlight=False)
                seed_folder.mkdir(parents=True, exist_ok=True)
                try:
                    summary = self._train_and_evaluate(seed_folder, seed=seed)
                except TrainingDivergedError as exc:
                    # a diverged retraining is nothing to resume: the dictionary it was replacing goes back
                    kept = self._put_back("train", seed_folder, aside) if aside is not None else ""
                    self.console.print(f"[yellow]stability: seed {seed} diverged ({escape(str(exc))}); it is left "
                                       f"out{escape('; ' + kept) if kept else ''}[/yellow]", highlight=False)
                    dictionaries.append({**entry, "status": "diverged", "message": str(exc)[:500]})
                    continue
                except BaseException:
                    if aside is not None:
                        # the stage's own folder must not read as untouched, or the stage around this would put
                        # its old result back and a rerun would skip this seed's retraining
                        _write_json(folder / "interrupted.json", {"seed": seed, "folder": str(seed_folder)})
                        self.console.print(f"stability: {self._after_failed_force('train', seed_folder, aside)}",
                                           markup=False, highlight=False)
                    raise
                self._mark_done(done, summary)
            # trained again (now, or resumed after a failed --force): the copy set aside goes
            shutil.rmtree(_aside(seed_folder), ignore_errors=True)
            metrics = json.loads((seed_folder / "metrics.json").read_text())
            dictionaries.append({**entry, "status": "trained",
                                 **{k: metrics[k] for k in ("fve_a", "fve_b", "mean_l0", "dead_fraction")}})
            if main is None:
                main = Crosscoder.load(self.artefacts["train"] / "checkpoint", device="cpu")
                flagged = flagged_features(main, self.spec.screen.top_n_standard, self.spec.screen.relative_norm_cut)
            # one other dictionary in memory at a time: at the paper's size each is gigabytes
            other = Crosscoder.load(seed_folder / "checkpoint", device="cpu")
            rows += feature_recurrence(main, flagged, {seed: other}, s.threshold, self.spec.screen.relative_norm_cut)
            del other
        compared = [d["seed"] for d in dictionaries if d["status"] == "trained"]
        summary = recurrence_summary(rows, compared)
        _write_json(folder / "stability.json", {"seeds": list(s.seeds), "threshold": s.threshold,
                                                "dictionaries": dictionaries, "rows": rows, "summary": summary})
        for side, counts in summary.items():
            if compared and counts["features"]:
                self.console.print(
                    f"{side.upper()}-exclusive: {counts['exclusive_in_all']} of {counts['features']} recur as "
                    f"{side.upper()}-exclusive features in every other dictionary ({counts['exclusive_in_any']} in "
                    f"at least one); {counts['shared_somewhere']} reappear under another partition; "
                    f"{counts['absent_everywhere']} nowhere (decoder cosine ≥ {s.threshold})", highlight=False)
        return {"seeds": len(s.seeds), "compared": len(compared),
                **{f"{side}_{k}": v for side, c in summary.items() for k, v in c.items()}}

    def _load_stability(self, folder: Path, summary: dict) -> None:
        payload = json.loads((folder / "stability.json").read_text())
        self.db.replace_rows("seed_dictionaries", self.run_id, payload["dictionaries"])
        self.db.replace_rows("recurrence", self.run_id, payload["rows"])

    # ---- transfer -------------------------------------------------------------------------------
    def _hash_transfer(self) -> str:
        t = self.spec.transfer
        trait_bytes = [_file_bytes_hash(_trait_path(name)) for name in t.traits]
        grader = t.grader or self.spec.verify.grader
        from evals.offline_grader import OFFLINE_LABEL

        return _hash(self.hashes["train"], t.model_dump(mode="json"), grader, trait_bytes, OFFLINE_LABEL,
                     _rubric_files_hash([_trait_rubric(name) for name in t.traits] + ["coherence"]), RUNNER_VERSION,
                     _code_hash("transfer"))

    def _compute_transfer(self, folder: Path) -> dict:
        from evals.transfer_stage import run_transfer

        traits = self.spec.transfer.traits
        if not traits:
            return {"traits": 0}
        with _progress(self.console, "transfer arms") as (progress, task):
            results = run_transfer(self, folder, lambda done, total: progress.update(task, completed=done,
                                                                                       total=total))
        moved = [r for r in results if r["arm"] == "transferred"]
        held = sum(bool(r["holds"]) for r in moved)
        specific = sum(bool(r.get("specific")) for r in moved)
        self.console.print(f"{held} of {len(moved)} transfers hold; the trait is specific (unrelated pushes leave it "
                           f"flat) in {specific} of {len(moved)} targets", highlight=False)
        return {"traits": len(traits), "transfers": len(moved), "holds": held, "specific": specific}

    def _load_transfer(self, folder: Path, summary: dict) -> None:
        path = folder / "transfer.json"
        rows = json.loads(path.read_text()) if path.is_file() else []
        self.db.replace_rows("transfers", self.run_id, rows)

    # ---- report ---------------------------------------------------------------------------------
    def _hash_report(self) -> str:
        return _hash(self.hashes["verify"], self.hashes["stability"], self.hashes["transfer"])

    def _compute_report(self, _folder) -> dict:
        from reports.render import render_run

        paths = render_run(self.db, self.run_id, self.run_dir, self.spec.report)
        return {"reports": [str(p) for p in paths]}

    # ---- gates ----------------------------------------------------------------------------------
    def check_gates(self) -> list[str]:
        from .gates import run_gate_failures

        return run_gate_failures(self.db, self.run_id, self.spec.gates)


def _count_layers(path: str, entry, side: str) -> int:
    from transformers import AutoConfig

    from crosscoder.models import ModelLoadError, config_error_hint

    try:
        config = AutoConfig.from_pretrained(path, revision=entry.revision, trust_remote_code=entry.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{side}.id: cannot load the config of {entry.id!r}{config_error_hint(entry.id, path)}: "
                             f"{str(exc).splitlines()[0]}") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text_config, "num_hidden_layers", None)
    if layers is None:
        raise ModelLoadError(f"{side}.id: {entry.id!r} has no num_hidden_layers in its config")
    return int(layers)


def _data_file_fingerprints(spec: AuditSpec) -> list[list]:
    """``[path, sha256 of its bytes]`` of each local data file of the spec (hub datasets and the zoo's
    data are keyed by their names and versions instead). By content, not modification time: a fresh
    checkout of the same files must find its harvest in the cache."""
    from crosscoder.data import LOCAL_FORMATS

    out = []
    for source in spec.data.sources:
        path = Path(source.path).expanduser()
        if not source.path.startswith("zoo:") and path.suffix in LOCAL_FORMATS and path.is_file():
            out.append([source.path, _file_bytes_hash(path)])
    return out


def _trait_path(name: str) -> Path:
    from crosscoder.persona import TRAIT_DIR
    from crosscoder.yamlfile import named_or_path

    return named_or_path(name, TRAIT_DIR)


def _trait_rubric(name: str) -> str:
    from crosscoder.persona import TraitError, load_trait

    try:
        return load_trait(name).rubric
    except TraitError as exc:
        raise StageError("validate", f"transfer.traits: {exc}") from None


def _file_bytes_hash(path: Path) -> str:
    """A file's content hash ("missing" for no file), read once per process for each version of the file
    (its size and modification time): a data file can be gigabytes, and a run hashes its stages often."""
    if not path.is_file():
        return "missing"
    stat = path.stat()
    return _streamed_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _streamed_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _rubric_files_hash(names: list[str]) -> str:
    from evals.prompts import PROMPT_DIR
    from evals.rubrics import RubricError, _resolve, load_rubric

    h = hashlib.sha256()
    for name in sorted(set(names)):
        path = _resolve(name)
        if path.is_file():
            h.update(path.read_bytes())
            try:
                rubric = load_rubric(name)
            except RubricError as exc:  # reached with --only/--from, which skip the validate stage
                raise StageError("validate", f"verify.rubrics: {exc}") from None
            prompt_path = PROMPT_DIR / f"{rubric.prompt_set}.yaml" if rubric.prompt_set else None
            if prompt_path is not None and prompt_path.is_file():
                h.update(prompt_path.read_bytes())
    return h.hexdigest()[:16]


class _progress:
    """A rich progress bar with rate and ETA for one stage."""

    def __init__(self, console: Console, label: str):
        self.progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.label = label

    def __enter__(self):
        self.progress.__enter__()
        task = self.progress.add_task(self.label, total=None)
        return self.progress, task

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def _python_path() -> str:
    """PYTHONPATH for child processes: this checkout first, so that ``-m audit.launch`` imports it."""
    existing = os.environ.get("PYTHONPATH")
    return f"{REPO_ROOT}{os.pathsep}{existing}" if existing else str(REPO_ROOT)
