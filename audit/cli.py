"""The ``audit`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .signals import stop_on_sigterm
from .spec import SpecError, load_spec
from .zoo_cli import zoo_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Cross-architecture model diffing audits.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of the crosscoder core.")
app.add_typer(bench_app, name="bench")
app.add_typer(zoo_app, name="zoo")
console = Console()
errors = Console(stderr=True)


@app.command()
def validate(spec: list[Path] = typer.Argument(..., help="spec files to check")) -> None:
    """Check audit spec files; print every problem with its file, line and field."""
    from .checks import missing_api_keys, spec_problems

    failed = False
    for path in spec:
        try:
            loaded = load_spec(path)
        except SpecError as exc:
            failed = True
            errors.print("[red]invalid[/red] " + escape(str(exc)), markup=True, highlight=False)
            continue
        problems = spec_problems(loaded)  # what it refers to: rubrics, traits, models, layers, data files
        if problems:
            failed = True
            errors.print("[red]invalid[/red] " + escape("\n".join(f"{path}: {p}" for p in problems)),
                         markup=True, highlight=False)
            continue
        console.print(
            f"[green]ok[/green] {path}: {loaded.name} — {loaded.model_a.id} L{loaded.model_a.layer} vs "
            f"{loaded.model_b.id} L{loaded.model_b.layer}, {loaded.crosscoder.architecture} "
            f"D={loaded.crosscoder.dict_size} k={loaded.crosscoder.k}",
            highlight=False,
        )
        for note in missing_api_keys(loaded):  # not an error here: the run may happen elsewhere
            console.print(f"  note: {note}", style="yellow", highlight=False, markup=False)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def harvest(
    spec: Path = typer.Argument(..., help="audit spec"),
    out: str | None = typer.Option(None, help="store folder or fsspec URL, e.g. s3://bucket/store (default "
                                   "runs/<name>/harvest-<input hash>)"),
    device: str | None = typer.Option(None, help="cuda, cpu, ... (default: CUDA when present)"),
) -> None:
    """Run the harvest stage alone: paired, aligned activations into an activation store."""
    from crosscoder.data import DataSourceError
    from crosscoder.harvest import harvest as run_harvest
    from crosscoder.models import ModelLoadError
    from crosscoder.store import StoreError

    from .spec import harvest_settings

    loaded = _load_or_exit(spec)
    settings = harvest_settings(loaded, device)
    folder = out or str(Path("runs") / loaded.name / f"harvest-{settings.input_hash()}")
    try:
        store = run_harvest(settings, folder, progress=True)
    except (ModelLoadError, DataSourceError, StoreError) as exc:
        errors.print("[red]harvest failed[/red]: " + escape(str(exc)), highlight=False)
        errors.print(f"finished shards in {folder} are kept; fix the problem and rerun to resume", highlight=False, markup=False)
        raise typer.Exit(code=1) from None
    alignment = store.meta["alignment"]
    console.print(
        f"{store.n_pairs:,} pairs in {len(store.meta['shards'])} shards → {folder}\n"
        f"fully aligned {alignment['fully_aligned']}/{alignment['sequences']} sequences "
        f"({100 * alignment['fully_aligned_frac']:.2f} %), pairs per token A {alignment['pairs_per_token_a']:.3f}, "
        f"B {alignment['pairs_per_token_b']:.3f}, merged {100 * alignment['merged_frac']:.1f} %",
        highlight=False,
    )


@app.command()
def run(
    spec: Path = typer.Argument(..., help="audit spec (YAML)"),
    workspace: Path = typer.Option(Path("runs"), help="workspace: stage cache, run folders, audit.duckdb"),
    db: Path | None = typer.Option(None, help="DuckDB file (default <workspace>/audit.duckdb)"),
    only: str | None = typer.Option(None, help="run only this stage (earlier stages must be cached)"),
    start: str | None = typer.Option(None, "--from", help="run from this stage on"),
    force: bool = typer.Option(False, help="rerun the selected stages even when cached"),
    device: str | None = typer.Option(None, help="cuda, cpu, ... (default: the spec's compute.device, else CUDA "
                                      "when present)"),
    nproc: int | None = typer.Option(None, min=1, help="processes (one per GPU) for harvest and training, under "
                                     "torchrun (default: the spec's compute.nproc)"),
) -> None:
    """Run an audit end to end: validate → models → harvest → train → stability → analyse → screen → verify → transfer → report."""
    from transformers.utils import logging as hf_logging

    from .runner import STAGES, AuditRunner, StageError
    from .store import StoreBusyError, StoreOpenError

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening; theirs interleave
    for option, name in (("--only", only), ("--from", start)):
        if name is not None and name not in STAGES:
            errors.print(f"{option} {name}: no such stage; choose one of {', '.join(STAGES)}", highlight=False,
                         markup=False)
            raise typer.Exit(code=2)
    loaded = _load_or_exit(spec)
    try:
        runner = AuditRunner(loaded, spec, workspace=workspace, db_path=db, device=device, console=console,
                             nproc=nproc)
    except StageError as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]", highlight=False)
        raise typer.Exit(code=1) from None
    console.print(f"run [bold]{runner.run_id}[/bold] → {runner.run_dir}", highlight=False)
    stop_on_sigterm()
    try:
        result = runner.run(only=only, start=start, force=force)
    except (StoreOpenError, StoreBusyError) as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]", highlight=False)
        raise typer.Exit(code=1) from None
    except StageError as exc:
        errors.print("[red]stage failed[/red] " + escape(str(exc)), highlight=False)
        if "kept in" not in str(exc):  # the stage's own message may say it already
            errors.print(f"finished stages are kept in {runner.cache}; fix the problem and rerun the same command "
                         f"(stages: {', '.join(STAGES)})", highlight=False, markup=False)
        raise typer.Exit(code=1) from None
    except OSError as exc:  # before any stage: the workspace's folders cannot be made or written
        errors.print(f"cannot write the run's files: {_os_error(exc)}; check --workspace and --db", highlight=False,
                     markup=False)
        raise typer.Exit(code=1) from None
    view = Table(title=f"run {result.run_id}")
    for column in ("stage", "status", "seconds", "artefact"):
        view.add_column(column)
    for r in result.stages:
        status = "cached" if r.cached else "done alongside" if r.alongside else "done"  # alongside: a 2nd process
        view.add_row(r.stage, status, f"{r.seconds:.1f}", str(r.artefact or ""))
    console.print(view)
    for path in result.report_paths:
        console.print(f"report: {path}", highlight=False)
    _exit_on_gates(result.gate_failures)


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="audit spec (YAML)"),
    workspace: Path = typer.Option(Path("runs"), help="workspace whose stage cache is checked"),
    nproc: int | None = typer.Option(None, min=1, help="processes for harvest and training (part of the "
                                     "harvest's cache key; default: the spec's compute.nproc)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the plan to this JSON file"),
) -> None:
    """What `audit run` would compute for SPEC: which stages are cached, the size of the rest, and the LLM
    calls of each stage still to run (nothing is loaded or run)."""
    from .checks import spec_problems
    from .plan import llm_totals, plan_audit, write_plan
    from .runner import AuditRunner, StageError

    loaded = _load_or_exit(spec)
    # as the run's validate stage: a plan of a run that would fail at once is no plan (data files are left out,
    # as there: a cached harvest does not read them again)
    problems = spec_problems(loaded, data=False)
    if problems:
        errors.print("[red]invalid[/red] " + escape("\n".join(f"{spec}: {p}" for p in problems)), highlight=False)
        raise typer.Exit(code=1)
    try:
        runner = AuditRunner(loaded, spec, workspace=workspace, console=Console(quiet=True), nproc=nproc)
        plans = plan_audit(runner)
    except (StageError, SpecError, ValueError, OSError) as exc:
        errors.print(f"[red]cannot plan {escape(str(spec))}:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(code=1) from None
    console.print(f"plan for run [bold]{runner.run_id}[/bold] (workspace {escape(str(workspace))}); ≈: an estimate, "
                  "exact once the stages that choose the features are cached", highlight=False)
    for p in plans:
        colour = "green" if p.status == "cached" else "red" if p.status.startswith("error") else "yellow"
        console.print(f"[bold]{p.stage}[/bold] [{colour}]{escape(p.status)}[/{colour}]: {escape(p.work)}",
                      highlight=False)
        about = "" if p.exact else "≈ "
        counts = ([f"{about}{p.generations:,} answers generated"] if p.generations else []) + [
            f"{about}{n:,} calls to {escape(model)}" for model, n in p.llm_calls.items()]
        if counts:
            console.print("    " + "; ".join(counts), highlight=False)
    totals = llm_totals(plans)
    if totals:
        console.print("LLM calls of the stages still to run (retries come on top): "
                      + ", ".join(f"{n:,} to {model}" for model, n in totals.items()), highlight=False)
    else:
        console.print("No LLM calls: every stage still to run uses the offline explainer and graders, or none.",
                      highlight=False)
    if json_out is not None:
        write_plan(plans, json_out)
        console.print(f"wrote {json_out}", highlight=False)


def _store(workspace: Path, db: Path | None):
    """The workspace's existing DuckDB store (``--db`` overrides ``<workspace>/audit.duckdb``), for the
    commands that read it; a missing or unusable file ends the command with a message."""
    from .store import AuditStore, StoreBusyError, StoreOpenError

    try:
        return AuditStore(db or workspace / "audit.duckdb", must_exist=True)
    except (StoreOpenError, StoreBusyError) as exc:
        errors.print(str(exc), highlight=False, markup=False)
        raise typer.Exit(code=1) from None


def _resolve_run(store, ref: str) -> str:
    """A run id, a spec file (its run id) or a spec name (its latest run) → a run id in the store."""
    from .runner import run_id_for

    if store.run(ref) is not None:
        return ref
    if ref.endswith((".yaml", ".yml")) and Path(ref).is_file():
        run_id = run_id_for(_load_or_exit(Path(ref)))
        if store.run(run_id) is not None:
            return run_id
        errors.print(f"{ref}: its run {run_id} is not in {store.path}; run `audit run {ref}` first", highlight=False, markup=False)
        raise typer.Exit(code=1)
    latest = store.query("SELECT run_id FROM runs WHERE spec_name = ? ORDER BY updated_at DESC LIMIT 1", [ref])
    if latest:
        return latest[0]["run_id"]
    errors.print(f"no run {ref!r} in {store.path} (not a run id, spec file or spec name); `audit runs` lists them",
                 highlight=False, markup=False)
    raise typer.Exit(code=1)


def _print_diff(result: dict) -> None:
    """The diff in the terminal: exclusive features per side (candidates), then the verified
    concepts, which the gates mostly rest on, last so they stay on screen (plain text, never markup)."""
    from rich.text import Text

    from .diff import format_score

    view = Table(title=f"exclusive features: {result['run_a']} → {result['run_b']}")
    for column in ("side", "matched by", "old → new", "matched", "new", "vanished"):
        view.add_column(column)
    for side, s in result["sides"].items():
        view.add_row(side.upper(), s["method"], f"{s['features_a']} → {s['features_b']}", str(s["matched"]),
                     str(s["new"]), str(s["vanished"]))
    console.print(view)
    from .diff import stable_line

    for side, s in result["sides"].items():
        line = stable_line(side, s)
        if line:
            console.print(Text(line))
    for title, key in (("new", "new"), ("vanished", "vanished")):
        for f in result[key]:
            effect = f" (largest effect {f['best_effect']:.2f})" if f["best_effect"] is not None else ""
            seeds = f" [its run's other seeds: {f['own_seeds']}]" if f.get("own_seeds") else ""
            console.print(Text(f"{title}: model {f['side'].upper()} feature {f['feature']}: "
                               f"{f['explanation'] or 'unexplained'}{effect}{seeds}"))
    concepts = Table(title="concepts: verified effects, and unsteered answers that moved")
    for column in ("side", "rubric", "status", "old run", "new run", "unsteered"):
        concepts.add_column(column, overflow="fold")  # rubric names are what users grep for: never cut
    for c in result.get("concepts", []):
        where = "shared" if c["side"] not in ("a", "b") else c["side"].upper()
        cells = [f"feature {x['feature']}: {x['effect']:+.2f}" if x else "not verified" for x in (c["old"], c["new"])]
        baseline = f"{format_score(c.get('baseline_old'))} → {format_score(c.get('baseline_new'))}"
        concepts.add_row(where, c["rubric"], c["status"], *cells, baseline)
    console.print(concepts)


def _stored_spec(spec_json: str, run_id: str):
    """The spec a run was made with, or None (with a warning) when this version cannot read it."""
    from pydantic import ValidationError

    from .spec import AuditSpec

    try:
        return AuditSpec.model_validate_json(spec_json)
    except ValidationError as exc:
        errors.print(f"warning: run {run_id}'s stored spec does not validate with this version "
                     f"({exc.error_count()} problems); using defaults for its report and gates", markup=False)
        return None


def _exit_on_gates(failures: list[str]) -> None:
    if failures:
        for message in failures:
            errors.print("[red]gate failed[/red] " + escape(message), highlight=False)
        raise typer.Exit(code=3)


@app.command()
def runs(
    workspace: Path = typer.Option(Path("runs")),
    db: Path | None = typer.Option(None, help="DuckDB file (default <workspace>/audit.duckdb)"),
) -> None:
    """List the runs in the workspace's store."""
    from .store import run_status

    store = _store(workspace, db)
    wide = console.width >= 120  # below that the report paths would wrap every row into a tall column
    view = Table(title=str(store.path), caption=None if wide else "each run's report: the report_path column of "
                 "the runs table, or `audit report RUN` (a wider terminal shows the paths here)")
    view.add_column("run", no_wrap=True)  # the id is what users copy; never wrap it
    for column in ("models", "status", "updated", "flagged", "verified"):
        view.add_column(column, overflow="fold")
    if wide:
        view.add_column("report", overflow="fold")
    for row in store.query("""
        SELECT r.run_id, r.model_a, r.model_b, r.status, r.updated_at, r.report_path, r.pid, r.host,
               (SELECT count(*) FROM features f WHERE f.run_id = r.run_id) AS flagged,
               (SELECT count(DISTINCT feature) FROM effects e WHERE e.run_id = r.run_id AND e.verified) AS verified
        FROM runs r ORDER BY r.updated_at DESC"""):
        models = f"{row['model_a']} vs {row['model_b']}" if wide else f"{row['model_a']}\n{row['model_b']}"
        cells = [row["run_id"], models, run_status(row),
                 str(row["updated_at"])[:16], str(row["flagged"]), str(row["verified"])]
        # a run that stopped before its report stage has a path recorded but no file there
        written = row["report_path"] and any(Path(row["report_path"]).with_suffix(suffix).is_file()
                                             for suffix in (".html", ".md"))  # report.formats may be Markdown only
        report = _relative(row["report_path"]) if written else "none yet"
        view.add_row(*cells, *([report] if wide else []))
    console.print(view)


def _os_error(exc: OSError) -> str:
    """``strerror: filename`` of a failed file operation (what a user can act on), else its text."""
    return f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)


def _relative(path: str | None) -> str:
    """``path`` relative to the working directory when it lies below it (narrow terminals wrap less)."""
    if not path:
        return ""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


@app.command()
def report(
    run_id: str = typer.Argument(..., help="run id (see `audit runs`)"),
    workspace: Path | None = typer.Option(None, help="workspace (default: runs); given, the report is written "
                                          "in it even when the run was made elsewhere"),
    db: Path | None = typer.Option(None, help="DuckDB file (default <workspace>/audit.duckdb)"),
    out: Path | None = typer.Option(None, help="folder for report.html / report.md (default: the run's folder in the "
                                    "workspace, <workspace>/<spec name>/<run id>)"),
) -> None:
    """Re-render a run's report from the store."""
    from reports.render import render_run

    store = _store(workspace or Path("runs"), db)
    found = store.run(run_id)
    if found is None:
        errors.print(f"no run {run_id!r} in {store.path}; `audit runs` lists them", highlight=False, markup=False)
        raise typer.Exit(code=1)
    spec = _stored_spec(found["spec_json"], run_id)
    recorded = Path(found["run_dir"]) if found["run_dir"] else Path("runs") / found["spec_name"] / run_id
    # with --workspace, the run's folder in that workspace (where `audit run --workspace` puts it), not the
    # folder the store recorded: a copied or moved workspace must not write back into the original
    folder = out or (workspace / found["spec_name"] / run_id if workspace is not None else recorded)
    if out is None and recorded.resolve() != folder.resolve():
        console.print(f"the run was made in {recorded}; writing its report in this workspace, {folder}",
                      highlight=False, markup=False)
    try:
        paths = render_run(store, run_id, folder, spec.report if spec else None)
    except OSError as exc:
        errors.print(f"cannot write the report into {folder}: {_os_error(exc)}; choose another --out", highlight=False,
                     markup=False)
        raise typer.Exit(code=1) from None
    for path in paths:
        console.print(f"wrote {path}", highlight=False)


@app.command()
def show(
    run_id: str = typer.Argument(..., help="run id (see `audit runs`)"),
    feature: int = typer.Argument(..., help="feature id"),
    workspace: Path = typer.Option(Path("runs")),
    db: Path | None = typer.Option(None, help="DuckDB file (default <workspace>/audit.duckdb)"),
) -> None:
    """Print one feature's card in the terminal."""
    from .show import feature_card

    store = _store(workspace, db)
    try:
        feature_card(store, run_id, feature, console)
    except KeyError as exc:
        errors.print(str(exc.args[0]), highlight=False, markup=False)
        raise typer.Exit(code=1) from None


@app.command()
def diff(
    run_a: str = typer.Argument(..., help="the earlier run (baseline): a run id, a spec file or a spec name"),
    run_b: str = typer.Argument(..., help="the later run: a run id, a spec file or a spec name"),
    workspace: Path = typer.Option(Path("runs")),
    db: Path | None = typer.Option(None, help="DuckDB file (default <workspace>/audit.duckdb)"),
    out: Path | None = typer.Option(None, help="folder for diff.json and diff.md (default <workspace>/diffs/A__B)"),
    spec: Path | None = typer.Option(None, help="spec whose gates apply (default: the later run's spec)"),
) -> None:
    """Compare two audits: new, vanished and changed exclusive features; exits 3 when a gate fires."""
    from .diff import diff_runs, render_diff_markdown

    store = _store(workspace, db)
    run_a, run_b = _resolve_run(store, run_a), _resolve_run(store, run_b)
    gates_spec = _load_or_exit(spec) if spec else _stored_spec(store.run(run_b)["spec_json"], run_b)
    result = diff_runs(store, run_a, run_b, gates_spec.gates if gates_spec else [])
    folder = out or workspace / "diffs" / f"{run_a}__{run_b}"
    _print_diff(result)  # before writing: a folder that cannot be written must not cost the comparison
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "diff.json").write_text(json.dumps(result, indent=2, default=str))
        (folder / "diff.md").write_text(render_diff_markdown(result))
    except OSError as exc:
        errors.print(f"cannot write the diff into {folder}: {_os_error(exc)}; choose another --out", highlight=False,
                     markup=False)
        raise typer.Exit(code=1) from None
    for warning in result.get("warnings", []):
        errors.print(f"warning: {warning}", style="yellow", highlight=False, markup=False)
    console.print(f"wrote {folder / 'diff.json'} and {folder / 'diff.md'}", highlight=False)
    _exit_on_gates(result["gate_failures"])


@app.command()
def seeds(
    spec: Path = typer.Argument(..., help="audit spec (YAML)"),
    seeds: str = typer.Option("0,1,2", help="crosscoder seeds, comma-separated: one audit per seed"),
    workspace: Path = typer.Option(Path("runs"), help="workspace: stage cache, run folders, audit.duckdb"),
    db: Path | None = typer.Option(None, help="DuckDB file (default <workspace>/audit.duckdb)"),
    device: str | None = typer.Option(None, help="cuda, cpu, ... (default: the spec's compute.device)"),
    nproc: int | None = typer.Option(None, min=1, help="processes for harvest and training (as for `audit run`)"),
) -> None:
    """Run an audit once per crosscoder seed and pool what they verify (a concept one dictionary misses,
    another may isolate); exits 3 when a gate of any seed's run fires."""
    from transformers.utils import logging as hf_logging

    from .runner import AuditRunner, StageError
    from .seeds import parse_seeds, pool_seeds, render_seeds_markdown, seed_variants
    from .store import AuditStore, StoreBusyError, StoreOpenError

    hf_logging.disable_progress_bar()
    loaded = _load_or_exit(spec)
    try:
        seed_list = parse_seeds(seeds)
        variants = seed_variants(loaded, seed_list)
    except ValueError as exc:
        errors.print(f"--seeds: {exc}", style="red", highlight=False, markup=False)
        raise typer.Exit(code=2) from None
    runs: dict[int, str] = {}
    gate_failures: list[str] = []
    stop_on_sigterm()
    try:
        for seed, variant in zip(seed_list, variants, strict=True):
            console.rule(f"[bold]seed {seed}[/bold] ({len(runs) + 1} of {len(seed_list)})")
            result = AuditRunner(variant, spec, workspace=workspace, db_path=db, device=device, console=console,
                                 nproc=nproc).run()
            runs[seed] = result.run_id
            gate_failures += [f"seed {seed}: {message}" for message in result.gate_failures]
            for path in result.report_paths:
                console.print(f"seed {seed} report: {path}", highlight=False)
        pooled = pool_seeds(AuditStore(db or workspace / "audit.duckdb"), runs)
    except (StageError, StoreOpenError, StoreBusyError) as exc:
        errors.print("[red]failed[/red] " + escape(str(exc)), highlight=False)
        errors.print(f"the finished seeds' runs are kept ({', '.join(runs.values()) or 'none'}); rerun the same "
                     "command to resume", highlight=False, markup=False)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        errors.print(f"seeds' runs finished before the interruption: {', '.join(runs.values()) or 'none'}",
                     highlight=False, markup=False)
        raise
    folder = workspace / loaded.name
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"seeds-{'-'.join(map(str, seed_list))}"
    stem.with_suffix(".json").write_text(json.dumps(pooled, indent=2, default=str))
    markdown = render_seeds_markdown(loaded.name, pooled)
    stem.with_suffix(".md").write_text(markdown)
    console.print(markdown, highlight=False, markup=False)
    console.print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}", highlight=False)
    _exit_on_gates(gate_failures)


def _load_or_exit(path: Path):
    try:
        return load_spec(path)
    except SpecError as exc:
        errors.print("[red]invalid spec[/red] " + escape(str(exc)), highlight=False)
        raise typer.Exit(code=2) from None


@bench_app.command("toy")
def bench_toy(
    out: Path = typer.Option(Path("runs/bench-toy"), help="folder for table.md, results.json, recall.png"),
    dict_sizes: str = typer.Option("128,256,512", help="comma-separated dictionary sizes"),
    seeds: int = typer.Option(5, help="number of seeds per setting"),
    steps: int = typer.Option(1200, help="training steps per crosscoder"),
) -> None:
    """Ground-truth benchmark: exclusive-concept recall and false positives per variant."""
    from crosscoder.synthetic import ToyBenchSettings, aggregate, run_toy_benchmark
    from reports.bench import render_toy_benchmark

    settings = ToyBenchSettings(
        dict_sizes=tuple(int(s) for s in dict_sizes.split(",")), seeds=tuple(range(seeds)), steps=steps
    )
    total = len(settings.dict_sizes) * len(settings.architectures) * len(settings.seeds)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("toy benchmark"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), console=console) as progress:
        task = progress.add_task("toy", total=total, info="")

        def on_result(row: dict) -> None:
            progress.update(task, advance=1, info=(
                f"{row['architecture']} D={row['dict_size']} seed={row['seed']}: "
                f"recall {row['exclusive_recall']:.2f}, FVE {row['fve_a']:.3f}"))

        rows = run_toy_benchmark(settings, on_result=on_result)
    table = aggregate(rows)
    paths = render_toy_benchmark(out, settings, rows, table)
    _print_toy_table(table)
    console.print(f"wrote {', '.join(str(p) for p in paths)}")


def _print_toy_table(table: list[dict]) -> None:
    view = Table(title="Exclusive-concept recovery (mean ± s.e. over seeds)")
    for column in ("variant", "D", "excl. recall", "FP shared", "FP unmatched", "recall (checked)",
                   "FP (checked)", "FVE A/B", "dead %"):
        view.add_column(column, justify="right")
    for row in table:
        view.add_row(
            row["architecture"], str(row["dict_size"]),
            f"{row['exclusive_recall']:.2f} ± {row['exclusive_recall_se']:.2f}",
            f"{row['fp_shared']:.1f}", f"{row['fp_unmatched']:.1f}",
            f"{row['checked_exclusive_recall']:.2f}",
            f"{row['checked_fp_shared'] + row['checked_fp_unmatched']:.1f}",
            f"{row['fve_a']:.3f}/{row['fve_b']:.3f}", f"{100 * row['dead_fraction']:.1f}",
        )
    console.print(view)


@bench_app.command("train")
def bench_train(
    out: Path = typer.Option(Path("runs/bench-train"), help="folder for results.json"),
    dict_size: int = typer.Option(16384),
    d_a: int = typer.Option(256),
    d_b: int = typer.Option(384),
    k: int = typer.Option(32),
    batch_size: int = typer.Option(1024),
    steps: int = typer.Option(40),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
) -> None:
    """Training throughput and peak memory: sparse crosscoder vs a dense PyTorch reference."""
    from crosscoder.bench_train import run_train_benchmark

    result = run_train_benchmark(d_a=d_a, d_b=d_b, dict_size=dict_size, k=k, batch_size=batch_size,
                                 steps=steps, device=device, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    view = Table(title=f"Training throughput, D={dict_size} k={k} d={d_a}/{d_b} batch={batch_size} on {device}")
    for column in ("implementation", "pairs/s", "ms/step", "peak MiB", "FVE after run"):
        view.add_column(column, justify="right")
    for row in result["results"]:
        view.add_row(row["implementation"], f"{row['pairs_per_s']:,.0f}", f"{row['step_ms']:.1f}",
                     f"{row['peak_memory_mib']:,.0f}", f"{row['final_fve']:.4f}")
    console.print(view)
    console.print(f"speed-up {result['speedup']:.2f}×, FVE gap {result['fve_gap']:+.2e}; wrote {out / 'results.json'}")


@bench_app.command("harvest")
def bench_harvest(
    out: Path = typer.Option(Path("runs/bench-harvest"), help="folder for results.json"),
    geometry: str = typer.Option("small", help="'small' (CPU-sized) or 'paper' (Llama-3.1-8B L16 vs Qwen3-8B L14)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    max_tokens: int = typer.Option(20_000, help="model A tokens to harvest"),
    context_length: int = typer.Option(256),
) -> None:
    """Harvest throughput with random-weight models of real geometry and the real tokenizers."""
    from crosscoder.bench_harvest import run_harvest_benchmark

    result = run_harvest_benchmark(geometry, device, dtype, max_tokens=max_tokens, context_length=context_length)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    console.print(
        f"{result['pairs']:,} pairs in {result['elapsed_s']:.1f} s: {result['pairs_per_s']:,.0f} pairs/s, "
        f"{result['tokens_per_s']:,.0f} tokens/s (both models); fully aligned "
        f"{100 * result['alignment']['fully_aligned_frac']:.2f} %; wrote {out / 'results.json'}",
        highlight=False,
    )


@bench_app.command("align")
def bench_align(
    out: Path = typer.Option(Path("runs/bench-align"), help="folder for results.json"),
    repeats: int = typer.Option(3),
    generated: int = typer.Option(3000, help="generated sequences added to the hand-written ones"),
) -> None:
    """Alignment rate and speed on the real Llama-3 and Qwen tokenizers over a varied test corpus."""
    from crosscoder.bench_align import alignment_test_corpus, benchmark_alignment, load_reference_tokenizers

    llama, qwen = load_reference_tokenizers()
    texts = alignment_test_corpus(n_generated=generated)
    raw = benchmark_alignment(texts, llama, qwen, repeats=repeats)
    # What the harvest does: trailing whitespace is dropped before aligning (it carries nothing).
    stripped = benchmark_alignment([t.rstrip() for t in texts], llama, qwen, repeats=repeats)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"raw": raw, "trailing_whitespace_stripped": stripped}, indent=2, default=str))
    for label, result in (("as written", raw), ("trailing whitespace stripped (harvest)", stripped)):
        console.print(f"{label}: {json.dumps(result, default=str)[:600]}", highlight=False)


def main() -> None:
    try:
        app()
    except SystemExit as exc:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent exit 130
        if exc.code == 130:
            errors.print("interrupted: finished work is kept; rerun the same command to resume")
        raise


if __name__ == "__main__":
    main()
