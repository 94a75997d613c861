"""Entry point the distributed tests start under ``torchrun`` (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node N dist_worker.py JOB ARGS_JSON

Jobs: ``train`` (a crosscoder from an activation store; rank 0 writes the model and the
per-step statistics), ``harvest`` (a harvest into one store), ``gradients`` (one DDP step's
all-reduced gradients), ``topk`` (the global BatchTopK against the one-process one). ``fail_after_shards`` makes rank 1
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
from crosscoder.distributed import init_from_env, shutdown
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
        device="cpu", ranks=sync.world_size,
    )
    fail_after = args.get("fail_after_shards")

    def on_shard(shards_committed: int) -> None:
        if fail_after is not None and sync.rank == 1 and shards_committed >= fail_after:
            os._exit(9)  # no clean-up, no flush: as if the process had been killed

    run_harvest(settings, args["store"], on_shard=on_shard)


def gradients(args: dict) -> None:
    """One DDP step on the first global batch; rank 0 saves the all-reduced gradients."""
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    from crosscoder import Crosscoder
    from crosscoder.train import _Step

    sync = init_from_env("cpu")
    torch.set_num_threads(1)
    store = ActivationStore(args["store"])
    config = CrosscoderConfig(**args["config"]).resolved(100, args["batch_size"])
    config = config.model_copy(update={"norm_scale_a": store.norm_scales[0], "norm_scale_b": store.norm_scales[1]})
    torch.manual_seed(0)
    model = Crosscoder(config)
    x_a, x_b = next(store.batches(args["batch_size"], rank=sync.rank, world_size=sync.world_size))
    x_nA, x_nB = model.normalise(x_a, x_b)
    dead = torch.zeros(config.dict_size, dtype=torch.bool)
    dead[::3] = True  # AuxK on, over a third of the features
    step = DistributedDataParallel(_Step(model))
    loss, stats, fired, min_kept = step(x_nA, x_nB, config.k, dead, False, sync)
    loss.backward()
    if sync.is_main:
        save_file({name: p.grad.contiguous() for name, p in model.named_parameters()}, args["out"])
        Path(args["out"]).with_suffix(".json").write_text(json.dumps(
            {"stats": stats, "fired": int(fired.sum()), "min_kept": min_kept}))


def topk(args: dict) -> None:
    """global_batch_topk on unequal shares of random batches, against batch_topk on the whole."""
    from crosscoder.distributed import all_gather_objects, global_batch_topk
    from crosscoder.sparse import batch_topk

    sync = init_from_env("cpu")
    generator = torch.Generator().manual_seed(0)
    agree = {"plain": 0, "cost": 0}
    for _ in range(args["trials"]):
        scores = torch.rand(16, 64, generator=generator)
        scores[scores < 0.6] = 0  # ReLU zeros: some rows have few positive scores
        cost = 0.15 + 0.85 * torch.rand(64, generator=generator)
        cut = int(torch.randint(0, 17, (1,), generator=generator))  # rank 0's rows; may be none
        mine = slice(0, cut) if sync.rank == 0 else slice(cut, 16)
        for name, cost_D in (("plain", None), ("cost", cost)):
            local = global_batch_topk(scores[mine], 16 * 3, sync, cost_D)
            offset = 0 if sync.rank == 0 else cut
            picked = all_gather_objects(sorted(zip((local.rows + offset).tolist(), local.cols.tolist(), strict=True)),
                                        sync)
            reference = batch_topk(scores, 16 * 3, cost_D)
            expected = sorted(zip(reference.rows.tolist(), reference.cols.tolist(), strict=True))
            agree[name] += sorted(picked[0] + picked[1]) == expected
    if sync.is_main:
        Path(args["out"]).write_text(json.dumps(agree))


if __name__ == "__main__":
    job, payload = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    {"train": train, "harvest": harvest, "gradients": gradients, "topk": topk}[job](payload)
    shutdown()
