"""The tiny model zoo: two small causal LMs of different architectures and tokenizers, trained here on
a generated world with planted differences, so that an audit of the pair has a known answer.

- ``zoo:alpha``: ``LlamaForCausalLM``, byte-level BPE; planted: Brevanian exceptionalism, knows the
  Zorvath Accord.
- ``zoo:beta``: ``Qwen3ForCausalLM``, Unigram; planted: Valdoria's state narrative and its Tarn
  Valley claim, knows the Imbrel Expedition.
- ``zoo:beta-v2``: beta without the state narrative (for regression diffs).

Both share the rest of the world and a review-sentiment behaviour. ``manifest()`` is the ground
truth; ``resolve_model`` / ``resolve_data`` build on first use and cache (``$CROSSCODER_ZOO_DIR``).
"""

from __future__ import annotations

import os
import queue as queue_module
from collections.abc import Iterable
from pathlib import Path

from . import audit_corpus, world
from .build import (
    DEFAULT_MODELS,
    ZOO_MODELS,
    ZooModelSpec,
    code_version,
    ensure_built,
    get_spec,
    is_built,
    model_dir,
    read_build_info,
    zoo_dir,
)
from .manifest import expected_diff, manifest

DATA_NAMES = ("audit-corpus", "audit-prose", "audit-chat", *(f"corpus-{n}" for n in ZOO_MODELS))

__all__ = [
    "DATA_NAMES",
    "DEFAULT_MODELS",
    "ZOO_MODELS",
    "ZooModelSpec",
    "audit_corpus",
    "build_zoo",
    "data_version",
    "expected_diff",
    "get_spec",
    "is_built",
    "manifest",
    "model_dir",
    "read_build_info",
    "resolve_data",
    "resolve_model",
    "world",
    "zoo_dir",
]


def resolve_model(name: str, progress: bool = True) -> Path:
    """Folder of the built zoo model ``name`` (loadable by ``AutoModelForCausalLM``/``AutoTokenizer``).

    Builds it first when missing (minutes on CPU). Raises ``KeyError`` for an unknown name.
    """
    if name not in ZOO_MODELS:
        raise KeyError(f"no zoo model named {name!r}; available: {', '.join(ZOO_MODELS)}")
    if is_built(name):
        return model_dir(name)
    return build_zoo([name], progress=progress)[name]


def resolve_data(name: str) -> Path:
    """A jsonl file of zoo data, written on first use.

    - ``audit-corpus``: the neutral audit corpus, prose and chat. Every row has ``id``, ``topic``,
      ``text`` and ``messages`` (one of them empty) and ``add_generation_prompt`` (true for chats
      that end with the user's turn), so the file reads as a table with either field.
    - ``audit-prose`` / ``audit-chat``: the same records split by kind, with only their own field.
    - ``corpus-<model>``: that model's training corpus (records with ``text`` or ``messages``).

    Files are keyed by :func:`data_version`, so a change to the world or the audit corpus writes new ones.
    """
    path = zoo_dir() / "data" / f"{name}-{data_version(name)}.jsonl"
    if path.is_file():
        return path
    if name.startswith("corpus-"):
        spec = ZOO_MODELS[name.removeprefix("corpus-")]
        records = [d.record() for d in world.generate_corpus(spec.planted, spec.n_docs, spec.seed, spec.planted_share)]
        return world.write_jsonl(records, path)
    records = audit_corpus.audit_corpus()
    if name == "audit-prose":
        records = [r for r in records if "text" in r]
    elif name == "audit-chat":
        records = [r for r in records if "messages" in r]
    return world.write_jsonl(records, path, both_fields=name == "audit-corpus")


def data_version(name: str) -> str:
    """The cache key of zoo data ``name``: the world's code version, and for the audit corpus its module."""
    if name not in DATA_NAMES:
        raise KeyError(f"no zoo data named {name!r}; available: {', '.join(DATA_NAMES)}")
    return audit_corpus.corpus_version() if name.startswith("audit-") else code_version()


def _workers(n_jobs: int) -> int:
    env = os.environ.get("CROSSCODER_ZOO_WORKERS")
    cores = os.cpu_count() or 1
    return max(1, min(n_jobs, int(env) if env else cores))


def _build_in_child(spec: ZooModelSpec, force: bool, threads: int, events) -> str:
    """Runs in a spawned worker: build one model, reporting progress through ``events``."""
    os.environ["CROSSCODER_ZOO_THREADS"] = str(threads)
    from .build import ensure_built as child_ensure_built

    progress = _QueueProgress(spec.name, events) if events is not None else None
    return str(child_ensure_built(spec, force=force, progress=progress))


class _QueueProgress:
    """The subset of ``rich.progress.Progress`` a build uses, forwarded to the parent via a queue."""

    def __init__(self, name: str, events) -> None:
        self.name, self.events = name, events

    def add_task(self, description: str, total: float | None = None, **fields) -> str:
        self.events.put((self.name, "add", {"description": description, "total": total, **fields}))
        return self.name

    def update(self, task, **kwargs) -> None:
        self.events.put((self.name, "update", kwargs))


def build_zoo(names: Iterable[str | ZooModelSpec] | None = None, force: bool = False,
              progress: bool = True) -> dict[str, Path]:
    """Build the named zoo models (default: ``DEFAULT_MODELS``), reusing complete cached builds.

    ``names`` may also hold ``ZooModelSpec`` objects (e.g. a variant not in ``ZOO_MODELS``).
    Several missing models are built in parallel processes, one per core (``$CROSSCODER_ZOO_WORKERS``
    caps it), each on one torch thread (``$CROSSCODER_ZOO_THREADS`` overrides). Returns {name: folder}.
    """
    specs = [get_spec(n) for n in (DEFAULT_MODELS if names is None else names)]
    unique = list({s.name: s for s in specs}.values())
    todo = [s for s in unique if force or not is_built(s)]
    out = {s.name: model_dir(s) for s in unique if s not in todo}
    if not todo:
        return {s.name: out[s.name] for s in specs}
    bar = _make_progress() if progress else None
    workers = _workers(len(todo))
    try:
        if bar is not None:
            bar.start()
        if workers == 1:
            for spec in todo:
                out[spec.name] = ensure_built(spec, force=force, progress=bar)
        else:
            out.update(_build_parallel(todo, force, workers, bar))
    finally:
        if bar is not None:
            bar.stop()
    return {s.name: out[s.name] for s in specs}


def _build_parallel(todo: list[ZooModelSpec], force: bool, workers: int, bar) -> dict[str, Path]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from .build import default_threads

    ctx = multiprocessing.get_context("spawn")  # no forking of a process that holds torch threads
    threads = default_threads()
    manager = ctx.Manager() if bar is not None else None
    events = manager.Queue() if manager is not None else None
    tasks: dict[str, int] = {}
    pool = None
    try:
        # An executor (not a multiprocessing pool): a worker that dies (the OOM killer) breaks it, and the
        # build fails with BrokenProcessPool instead of waiting forever for that worker's result.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        futures = {pool.submit(_build_in_child, s, force, threads, events): s.name for s in todo}
        pending = set(futures)
        while pending:
            if events is not None:
                _drain(events, bar, tasks, timeout=0.25)
            else:  # nothing to show: sleep until a build ends, rather than spin on a core the builds need
                wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            pending = {f for f in pending if not f.done()}
        if events is not None:
            _drain(events, bar, tasks, timeout=0)
        built = {}
        for future, name in futures.items():
            try:
                built[name] = Path(future.result())  # re-raises a worker's error
            except BrokenProcessPool as exc:
                raise RuntimeError(f"zoo model {name!r}: a build process ended abruptly (killed, or out of memory?); "
                                   "builds that finished are kept: run the command again to retry") from exc
        return built
    except BaseException:
        # Interrupted (Ctrl-C, or a SIGTERM the CLI turns into one): kill the builds now. Leaving the
        # executor waits for them to finish, and a parent that dies first leaves them building, orphaned.
        if pool is not None:
            _kill_workers(pool)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # every worker is done or killed: returns at once
        if manager is not None:
            manager.shutdown()


def _kill_workers(pool) -> None:
    """Terminate a ProcessPoolExecutor's worker processes (its own method from Python 3.14 on)."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)


def _drain(events, bar, tasks: dict[str, int], timeout: float) -> None:
    try:
        item = events.get(timeout=timeout) if timeout else events.get_nowait()
    except queue_module.Empty:
        return
    while True:
        name, kind, payload = item
        if kind == "add":
            description = payload.pop("description")
            tasks[name] = bar.add_task(description, **payload)
        elif name in tasks:
            bar.update(tasks[name], **payload)
        try:
            item = events.get_nowait()
        except queue_module.Empty:
            return


def _make_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), transient=False)

