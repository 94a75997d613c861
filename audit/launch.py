"""One stage of an audit on every rank of a torchrun job: the distributed part of ``audit run``.

    torchrun --nproc_per_node 8 -m audit.launch harvest specs/llama_vs_qwen.yaml
    torchrun --nproc_per_node 8 -m audit.launch train   specs/llama_vs_qwen.yaml
    torchrun --nproc_per_node 8 -m audit.launch train   specs/llama_vs_qwen.yaml --seed 1   # stability
    audit run specs/llama_vs_qwen.yaml          # everything else, finding both stages done

``audit run SPEC --nproc N`` starts this itself on one machine; on several machines, start it on
each with torchrun's multi-node flags (see docs/runbook.md). Every rank writes into the
workspace's stage cache (a folder all nodes share); the database is written by ``audit run``.

    python -m audit.launch transfer runs/demo/<run id>/spec.resolved.json --workspace runs

is the transfer stage in one process, without torchrun: ``audit run`` starts it so (with
``--wait-for-training`` while it trains the crosscoder) when the spec sets ``compute.overlap_transfer``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m audit.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("harvest", "train", "transfer"))
    parser.add_argument("spec", type=Path)
    parser.add_argument("--workspace", type=Path, default=Path("runs"))
    parser.add_argument("--device", default=None, help="cuda, cpu … (default: the spec's compute.device)")
    parser.add_argument("--force", action="store_true", help="transfer: start afresh, not from finished work")
    parser.add_argument("--wait-for-training", action="store_true",
                        help="transfer: the process that started this one is training the crosscoder; wait for it")
    parser.add_argument("--nproc", type=int, default=None,
                        help="transfer: the processes the harvest ran on (part of its cache key; default: the spec's)")
    parser.add_argument("--seed", type=int, default=None,
                        help="train: this crosscoder seed instead of the spec's (the stability stage's other seeds)")
    parser.add_argument("--expect", type=Path, default=None,
                        help="transfer: the artefact folder the starting run expects; stop if this one differs")
    args = parser.parse_args(argv)
    if args.stage == "transfer":
        return _transfer(args)

    from crosscoder.distributed import init_from_env, shutdown
    from crosscoder.models import default_device

    from .runner import AuditRunner, StageError
    from .spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    device = args.device or spec.compute.device or str(default_device())
    sync = init_from_env(device)
    console = Console(quiet=not sync.is_main, stderr=True)
    runner = AuditRunner(spec, args.spec, workspace=args.workspace, device=device, console=console,
                         nproc=sync.world_size)
    from crosscoder import TrainingDivergedError

    from .runner import DIVERGED_EXIT

    try:
        runner.run_distributed(args.stage, seed=args.seed)
    except StageError as exc:
        print(f"rank {sync.rank}: {exc}", file=sys.stderr)
        return 1
    except TrainingDivergedError as exc:  # its own exit code: the run that launched this one decides what it means
        print(f"rank {sync.rank}: {exc}", file=sys.stderr)
        return DIVERGED_EXIT
    shutdown()
    return 0


def lower_priority() -> None:
    """Yield the CPU to the ``audit run`` that started this process: the run waits on its own stages,
    and this one has until they finish (a no-op where the OS has no ``nice``)."""
    from .runner import BACKGROUND_NICENESS

    if hasattr(os, "nice"):
        os.nice(BACKGROUND_NICENESS)


def stop_with_parent() -> None:
    """On Linux, ask the kernel to send this process SIGTERM when the process that started it dies (a
    killed ``audit run`` must not leave its second process computing); elsewhere a no-op (the waiting
    transfer still notices its parent is gone)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return


def _transfer(args: argparse.Namespace) -> int:
    from .runner import AuditRunner, StageError
    from .spec import SpecError, load_spec

    lower_priority()
    stop_with_parent()
    print(f"transfer: pid {os.getpid()}, niceness {os.nice(0) if hasattr(os, 'nice') else 'n/a'}", file=sys.stderr)
    try:
        spec = load_spec(args.spec)
        runner = AuditRunner(spec, args.spec, workspace=args.workspace, device=args.device,
                             console=Console(stderr=True), nproc=args.nproc)
        folder = runner.run_detached("transfer", force=args.force, wait_for_training=args.wait_for_training,
                                     expect=args.expect)
    except (SpecError, StageError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"transfer: done ({folder})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
