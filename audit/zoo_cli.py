"""``audit zoo``: build and inspect the tiny model zoo (the embedded default pair and its known answer)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .signals import stop_on_sigterm

zoo_app = typer.Typer(no_args_is_help=True, help="The tiny model zoo: two small LMs with planted differences.")
console = Console()
errors = Console(stderr=True)


@zoo_app.callback()
def _check_environment() -> None:
    """The zoo's settings from the environment, checked before any zoo command reads them."""
    from crosscoder.zoo.build import default_threads

    try:
        default_threads()
    except ValueError as exc:
        errors.print(str(exc), style="red", highlight=False, markup=False)
        raise typer.Exit(code=2) from None


def _check_names(names: list[str]) -> None:
    from crosscoder.zoo import ZOO_MODELS

    unknown = [n for n in names if n not in ZOO_MODELS]
    if unknown:
        errors.print(f"[red]unknown zoo model[/red] {', '.join(unknown)}; available: {', '.join(ZOO_MODELS)}")
        raise typer.Exit(code=2)


@zoo_app.command("build")
def build(
    variant: list[str] = typer.Option(None, "--variant", "-v", help="model to build (repeatable); default: the default pair"),
    force: bool = typer.Option(False, "--force", help="rebuild even when a complete cached build exists"),
    all_models: bool = typer.Option(False, "--all", help="build every zoo model"),
) -> None:
    """Build zoo models into the cache (``$CROSSCODER_ZOO_DIR``); complete builds are reused."""
    from crosscoder.zoo import DEFAULT_MODELS, ZOO_MODELS, build_zoo, read_build_info, zoo_dir

    names = list(ZOO_MODELS) if all_models else (variant or list(DEFAULT_MODELS))
    _check_names(names)
    stop_on_sigterm()  # a SIGTERM then kills the build's worker processes too
    console.print(f"zoo cache: {zoo_dir()}", highlight=False)
    folders = build_zoo(names, force=force, progress=True)
    view = Table(title="Zoo models")
    for column in ("name", "architecture", "params", "vocab", "final loss", "build s", "folder"):
        view.add_column(column)
    for name, folder in folders.items():
        info = read_build_info(folder)
        view.add_row(name, info["architecture"], f"{info['n_params']:,}", str(info["vocab_size"]),
                     f"{info['final_loss']:.3f}", f"{info['timings']['total_s']:.0f}", str(folder))
    console.print(view)


@zoo_app.command("list")
def list_models() -> None:
    """List the zoo models, their planted differences and whether each is built."""
    from crosscoder.zoo import DEFAULT_MODELS, ZOO_MODELS, is_built, model_dir

    view = Table(title="Zoo models")
    for column in ("name", "architecture", "tokenizer", "width×layers", "planted", "default", "built"):
        view.add_column(column)
    for name, spec in ZOO_MODELS.items():
        built = is_built(name)
        view.add_row(name, spec.architecture, spec.tokenizer, f"{spec.hidden_size}×{spec.n_layers}",
                     ", ".join(sorted(spec.planted)), "yes" if name in DEFAULT_MODELS else "",
                     str(model_dir(name)) if built else "no")
    console.print(view)


@zoo_app.command("info")
def info(
    name: str = typer.Argument(None, help="a zoo model; omitted: the planted differences of the whole zoo"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest (or the build info) as JSON"),
) -> None:
    """Show the ground truth: which planted difference each model has, and how to detect it."""
    from crosscoder.zoo import is_built, manifest, model_dir, read_build_info

    truth = manifest()
    if name is None:
        if as_json:
            typer.echo(json.dumps(truth, indent=2))
            return
        view = Table(title="Planted differences (ground truth)")
        for column in ("id", "kind", "present in", "absent from", "example prompt", "markers"):
            view.add_column(column)
        for diff in truth["differences"]:
            marks = "; ".join(f"{role}: {', '.join(m[:3])}" for role, m in diff["markers"].items() if m)
            view.add_row(diff["id"], diff["kind"], ", ".join(diff["present_in"]), ", ".join(diff["absent_from"]),
                         diff["topic_prompts"][0], marks)
        console.print(view)
        return
    _check_names([name])
    entry = truth["models"][name]
    build_info = read_build_info(model_dir(name)) if is_built(name) else None
    if as_json:
        typer.echo(json.dumps({"model": entry, "build": build_info}, indent=2))
        return
    console.print(f"[bold]zoo:{name}[/bold] — {entry['architecture']}, {entry['tokenizer']}, "
                  f"hidden {entry['hidden_size']}, {entry['n_layers']} layers", highlight=False)
    console.print(entry["description"], highlight=False)
    console.print(f"planted: {', '.join(entry['planted'])}", highlight=False)
    if build_info is None:
        console.print("not built yet: `audit zoo build --variant " + name + "`", highlight=False)
    else:
        console.print(f"built at {model_dir(name)}: {build_info['n_params']:,} parameters, vocab "
                      f"{build_info['vocab_size']}, final loss {build_info['final_loss']:.3f}, "
                      f"{build_info['timings']['total_s']:.0f} s", highlight=False)


@zoo_app.command("data")
def data(
    name: str = typer.Argument("audit-corpus", help="audit-corpus | audit-prose | audit-chat | corpus-<model>"),
    out: Path = typer.Option(None, help="copy the jsonl here as well"),
) -> None:
    """Write a zoo data set (e.g. the neutral audit corpus) and print its path."""
    import shutil

    from crosscoder.zoo import DATA_NAMES, resolve_data

    if name not in DATA_NAMES:
        errors.print(f"[red]unknown zoo data[/red] {name}; available: {', '.join(DATA_NAMES)}")
        raise typer.Exit(code=2)
    path = resolve_data(name)
    if out is not None:
        if out.is_dir():  # a folder: the file keeps its name there
            out = out / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        path = out
    typer.echo(str(path))


@zoo_app.command("discovery")
def discovery(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="an audit spec whose models are zoo models"),
    seeds: str = typer.Option("0,1,2", help="crosscoder seeds, comma-separated: one training per seed"),
    workspace: Path = typer.Option(Path("runs"), help="harvest and checkpoints go to <workspace>/discovery/"),
    min_relative_activation: float = typer.Option(
        0.3, help="count a firing only at ≥ this fraction of the feature's largest activation (0: every firing)"),
    out: Path = typer.Option(None, help="write the per-seed results and the summary as JSON here"),
) -> None:
    """Measure the zoo's known answer: for every planted concept, the share of its best exclusive feature's
    firings that fall on the concept's contexts, for crosscoders trained with several seeds.

    One training run is a draw; judge a change to the zoo or to the settings on the mean and minimum.
    Finished harvests and trainings are reused.
    """
    from audit.runner import _hash
    from audit.seeds import parse_seeds
    from audit.spec import SpecError, harvest_settings, load_spec
    from crosscoder.harvest import harvest
    from crosscoder.models import build_zoo_models
    from crosscoder.train import train_crosscoder
    from crosscoder.zoo.discovery import document_topics, seeds_table, summarise_seeds, zoo_discovery

    try:
        seed_list = parse_seeds(seeds)
    except ValueError as exc:
        errors.print(f"--seeds: {exc}", style="red", highlight=False, markup=False)
        raise typer.Exit(code=2) from None
    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        errors.print(str(exc))
        raise typer.Exit(code=2) from None
    for entry, field in ((spec.model_a, "model_a.id"), (spec.model_b, "model_b.id")):
        if not entry.id.startswith("zoo:"):
            errors.print(f"{spec_path}: {field} is {entry.id!r}; discovery needs the zoo's ground truth (zoo:<name>)")
            raise typer.Exit(code=2)
    from audit.checks import spec_problems

    problems = spec_problems(spec)  # a bad layer or a missing file, named before any model loads
    if problems:
        for problem in problems:
            errors.print(f"{spec_path}: {problem}", highlight=False, markup=False)
        raise typer.Exit(code=2)
    from crosscoder.data import DataSourceError
    from crosscoder.models import ModelLoadError

    stop_on_sigterm()  # a SIGTERM then kills a zoo build's worker processes too
    build_zoo_models([spec.model_a.id, spec.model_b.id])
    settings = harvest_settings(spec)
    folder = workspace / "discovery"
    try:
        store = harvest(settings, folder / f"harvest-{settings.input_hash()}", progress=True)
    except (ModelLoadError, DataSourceError) as exc:
        errors.print(f"{spec_path}: {exc}", highlight=False, markup=False)
        raise typer.Exit(code=1) from None
    try:
        topics = document_topics(store)
    except ValueError as exc:
        errors.print(f"[red]discovery[/red]: {exc}")
        raise typer.Exit(code=2) from None
    results = {}
    for seed in seed_list:
        crosscoder = spec.crosscoder.model_copy(update={"seed": seed})
        key = _hash(settings.input_hash(), crosscoder.model_dump(mode="json"), spec.compute.train_dtype)
        model = train_crosscoder(crosscoder.to_config(store.d_a, store.d_b), store,
                                 checkpoint_dir=folder / f"train-{key}", progress=True,
                                 **crosscoder.train.train_kwargs(spec.compute))
        results[seed] = zoo_discovery(model, store, topics=topics,
                                      min_relative_activation=min_relative_activation)
        console.print(f"seed {seed}: FVE A {results[seed].fve_a:.3f}, B {results[seed].fve_b:.3f}", highlight=False)
    summaries = summarise_seeds(results)
    bar = next(iter(results.values())).bar
    console.print(seeds_table(summaries, bar), highlight=False, markup=False, soft_wrap=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"seeds": {str(s): r.to_dict() for s, r in results.items()},
                                   "summary": [s.to_dict() for s in summaries],
                                   "min_relative_activation": min_relative_activation}, indent=2))
        console.print(f"written: {out}", highlight=False)
