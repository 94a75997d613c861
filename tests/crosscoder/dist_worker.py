"""Entry point the distributed tests start under ``torchrun`` (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node N dist_worker.py JOB ARGS_JSON

Jobs: ``train`` (a crosscoder from an activation store; rank 0 writes the model and the
per-step statistics), ``harvest`` (a harvest into one store). ``fail_after_shards`` makes rank 1
exit abruptly after that many committed shards, as a killed process would.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from crosscoder import CrosscoderConfig, train_crosscoder
from crosscoder.distributed import init_from_env
from crosscoder.store import ActivationStore


def train(args: dict) -> None:
    sync = init_from_env("cpu")
    torch.set_num_threads(1)
    config = CrosscoderConfig(**args["config"])
    history: list[dict] = []

    def callback(step: int, stats: dict) -> None:
        history.append({"step": step, **stats})
        if args.get("stop_at") == step:
            raise KeyboardInterrupt(f"stopped at step {step}")

    with contextlib.suppress(KeyboardInterrupt):  # the stop_at "kill"
        train_crosscoder(config, ActivationStore(args["store"]), steps=args["steps"], batch_size=args["batch_size"],
                         checkpoint_dir=args["checkpoint_dir"], checkpoint_every=args.get("checkpoint_every", 1000),
                         template_weight=args.get("template_weight", 1.0), callback=callback)
    if sync.is_main:
        Path(args["history"]).write_text(json.dumps(history))


def harvest(args: dict) -> None:
    from crosscoder.data import SourceSettings
    from crosscoder.harvest import HarvestSettings, ModelSettings
    from crosscoder.harvest import harvest as run_harvest

    sync = init_from_env("cpu")
    torch.set_num_threads(1)
    settings = HarvestSettings(
        model_a=ModelSettings(args["model_a"], args["layer_a"]), model_b=ModelSettings(args["model_b"], args["layer_b"]),
        sources=[SourceSettings(**source) for source in args["sources"]], max_tokens=args["max_tokens"],
        context_length=args["context_length"], shard_pairs=args["shard_pairs"], batch_docs=args["batch_docs"],
        device="cpu",
    )
    fail_after = args.get("fail_after_shards")

    def on_shard(shards_committed: int) -> None:
        if fail_after is not None and sync.rank == 1 and shards_committed >= fail_after:
            os._exit(9)  # no clean-up, no flush: as if the process had been killed

    run_harvest(settings, args["store"], on_shard=on_shard)


if __name__ == "__main__":
    job, payload = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    {"train": train, "harvest": harvest}[job](payload)
