"""Harvest: run two causal LMs over the same text, pair their activations across tokenizers, store.

For each record: tokenize with both tokenizers (chat records through each model's own chat
template), align by character offsets (``crosscoder.align``), run both models up to the captured
block, and keep the activations at the paired positions. Special tokens, template markers and
whitespace-only tokens are never paired.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import storage
from .align import align_chat, align_text, encode_ids, render_chat
from .data import SourceSettings, iter_records
from .distributed import DistContext, all_gather_objects, barrier, rank_device
from .distributed import current as current_context
from .models import LoadedModel, bos_prefix, capture_block_output, load_model
from .store import ActivationStore, StoreError, StoreWriter, store_exists

HARVEST_CODE_VERSION = 2  # bump when a change alters which pairs are produced


@dataclass(frozen=True)
class ModelSettings:
    id: str
    layer: int
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    chat_template: str | None = None  # overrides the tokenizer's (a Jinja string or a .jinja file)
    device_map: str | None = None  # hardware: spread a big model over devices (not part of the hash)


@dataclass
class HarvestSettings:
    model_a: ModelSettings
    model_b: ModelSettings
    sources: list[SourceSettings]
    max_tokens: int = 200_000  # budget counted in model A's tokens
    context_length: int = 256
    seed: int = 0
    shard_pairs: int = 65_536
    batch_docs: int = 16
    device: str | None = None
    extra: dict = field(default_factory=dict)  # anything else that should change the hash
    # Processes that harvest. N ranks store exactly one process's pairs, but laid out in per-rank
    # shards, which changes the order training reads them in: so it is part of the store's identity.
    ranks: int = 1

    def input_hash(self) -> str:
        """What determines the pairs: models, layers, data, budget, context, seed, code version."""
        payload = asdict(self)
        for key in ("shard_pairs", "batch_docs", "device"):
            payload.pop(key)
        if payload["ranks"] == 1:  # keep the hashes of one-process stores made before ranks existed
            payload.pop("ranks")
        for side in ("model_a", "model_b"):  # keep the hashes of stores made before the override existed
            if payload[side]["chat_template"] is None:
                payload[side].pop("chat_template")
            payload[side].pop("device_map")
        payload["code_version"] = HARVEST_CODE_VERSION
        versions = zoo_data_versions(self.sources)
        if versions:  # generated data: the same name may hold other records after a code change
            payload["zoo_data_versions"] = versions
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def zoo_data_versions(sources: list[SourceSettings]) -> dict[str, str]:
    """{``zoo:<name>``: version of its generated records} for the zoo data among ``sources``."""
    zoo_paths = sorted({s.path for s in sources if s.path.startswith("zoo:")})
    if not zoo_paths:
        return {}
    from .zoo import DATA_NAMES, data_version

    # An unknown name is left to the data source to report (with its spec field).
    return {path: data_version(path[4:]) for path in zoo_paths if path[4:] in DATA_NAMES}


@dataclass
class _Prepared:
    record: dict
    ids_a: list[int]
    ids_b: list[int]
    pos_a: list[int]
    pos_b: list[int]
    merged: list[bool]
    complete: bool
    cut_reason: str | None
    in_chat: bool
    generation_prompt_pair: bool = False  # the last pair is the generation-prompt pair


def prepare_record(record: dict, model_a: LoadedModel, model_b: LoadedModel, context_length: int) -> _Prepared:
    """Token ids both models will read, and the aligned positions in those ids."""
    if "messages" in record:
        # Templates put a space or newline next to the content ("user: How", ".\n"); a token
        # that only overhangs the content by whitespace still read the same content.
        prompt_open = bool(record.get("add_generation_prompt"))
        alignment = align_chat(record["messages"], model_a.tokenizer, model_b.tokenizer,
                               whitespace_overhang=True, add_generation_prompt=prompt_open)
        ids_a, ids_b = list(alignment.ids_a), list(alignment.ids_b)
        shift_a = shift_b = 0
        in_chat = True
    else:
        # Trailing whitespace carries nothing, and one tokenizer may merge it into the last
        # content token while the other splits it off, which would leave that token unpaired.
        text = record["text"].rstrip()
        alignment = align_text(text, model_a.tokenizer, model_b.tokenizer)
        prefix_a, prefix_b = bos_prefix(model_a.tokenizer), bos_prefix(model_b.tokenizer)
        ids_a, ids_b = prefix_a + list(alignment.ids_a), prefix_b + list(alignment.ids_b)
        shift_a, shift_b = len(prefix_a), len(prefix_b)
        in_chat = False
    truncated = len(ids_a) > context_length or len(ids_b) > context_length
    ids_a, ids_b = ids_a[:context_length], ids_b[:context_length]
    pos_a, pos_b, merged = [], [], []
    for (i, j), was_merged in zip(alignment.pairs, alignment.merged, strict=True):
        i, j = i + shift_a, j + shift_b
        if i >= len(ids_a) or j >= len(ids_b):
            break  # pairs are increasing in both: the rest are beyond the context too
        pos_a.append(i)
        pos_b.append(j)
        merged.append(was_merged)
    at_prompt = False
    last_a, last_b = len(ids_a) - 1, len(ids_b) - 1
    fresh = not pos_a or (pos_a[-1] < last_a and pos_b[-1] < last_b)
    if in_chat and record.get("add_generation_prompt") and not truncated and fresh:
        # The last token of each model's generation prompt is where that model is about to answer:
        # different template text, same moment in the conversation. Paired and flagged, because a
        # planted behaviour lives in what the model is about to say.
        pos_a.append(last_a)
        pos_b.append(last_b)
        merged.append(True)
        at_prompt = True
    return _Prepared(record, ids_a, ids_b, pos_a, pos_b, merged, alignment.complete, alignment.cut_reason, in_chat,
                     at_prompt)


def _run_batch(model: LoadedModel, sequences: list[list[int]]) -> Tensor:
    """Block outputs for a right-padded batch, ``[batch, max_len, d]`` on CPU."""
    longest = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return capture_block_output(model, ids, mask).cpu()


def _new_stats() -> dict:
    return {"sequences": 0, "fully_aligned": 0, "chat_sequences": 0, "pairs": 0, "tokens_a": 0, "tokens_b": 0,
            "merged_pairs": 0, "cut_reasons": {}, "elapsed_s": 0.0}


def count_tokens_a(record: dict, model_a: LoadedModel, context_length: int) -> int:
    """``len(prepare_record(record, …).ids_a)`` without aligning: what the token budget counts.

    Every rank of a distributed harvest counts every record, its own and the others', so that all
    ranks stop where a one-process harvest stops.
    """
    tokenizer = model_a.tokenizer
    if "messages" in record:
        rendered = render_chat(record["messages"], tokenizer, bool(record.get("add_generation_prompt")))
        length = len(encode_ids(tokenizer, rendered))
    else:
        length = len(bos_prefix(tokenizer)) + len(encode_ids(tokenizer, record["text"].rstrip()))
    return min(length, context_length)


def harvest(
    settings: HarvestSettings,
    folder: str | Path,
    *,
    models: tuple[LoadedModel, LoadedModel] | None = None,
    progress: bool = False,
    on_shard: Callable[[int], None] | None = None,
    sync: DistContext | None = None,
) -> ActivationStore:
    """Harvest into ``folder`` (a path or an fsspec URL such as ``s3://bucket/store``) and return the finished store.

    A finished store with the same input hash is returned as is; an interrupted one resumes after
    its last committed shard. ``models`` lets a caller pass already-loaded models. ``on_shard(n)``
    runs after each committed shard (``n``: this rank's shards so far).

    Distributed (under ``torchrun``; ``sync`` defaults to the initialised process group): record
    ``i`` of the data stream goes to rank ``i mod N``; every rank counts every record's tokens, so
    all stop at the record where one process would, and N ranks store exactly the pairs one
    process stores. Each rank writes and resumes its own shards; rank 0 merges the statistics and
    writes ``meta.json``.
    """
    folder = storage.locate(folder)
    sync = sync if sync is not None else current_context()
    input_hash = settings.input_hash()
    if store_exists(folder):
        store = ActivationStore(folder)
        if store.meta.get("input_hash") == input_hash:
            return store
    if settings.ranks != sync.world_size:
        raise StoreError(f"these harvest settings are for {settings.ranks} process(es) (settings.ranks), but "
                         f"{sync.world_size} are running; the number of ranks is part of a store's identity")
    if models is None:
        device = rank_device(settings.device, sync)
        models = tuple(
            load_model(entry.id, entry.layer, entry.revision, entry.dtype, device, entry.trust_remote_code,
                       field=side, chat_template=entry.chat_template, device_map=entry.device_map)
            for side, entry in (("model_a", settings.model_a), ("model_b", settings.model_b))
        )
    model_a, model_b = models
    writer = StoreWriter(folder, input_hash, settings.shard_pairs, sync.rank, sync.world_size)
    stats = writer.stats or _new_stats()
    resume_after = writer.progress["next_record"]  # this rank's records before it are committed
    records = enumerate(iter_records(settings.sources, settings.seed))

    bar = _HarvestProgress(settings.max_tokens) if progress and sync.is_main else None
    started = time.perf_counter() - stats["elapsed_s"]
    budget_used = 0  # model A tokens of all records so far, every rank's
    try:
        while budget_used < settings.max_tokens:
            batch: list[tuple[int, _Prepared]] = []
            for index, record in records:
                if index % sync.world_size == sync.rank and index >= resume_after:
                    prepared = prepare_record(record, model_a, model_b, settings.context_length)
                    batch.append((index, prepared))
                    tokens = len(prepared.ids_a)
                    stats["tokens_a"] += tokens
                else:
                    tokens = count_tokens_a(record, model_a, settings.context_length)
                budget_used += tokens
                if len(batch) >= settings.batch_docs or budget_used >= settings.max_tokens:
                    break
            if not batch:
                break  # the budget is spent, or the sources ran out
            hidden_a = _run_batch(model_a, [p.ids_a for _, p in batch])
            hidden_b = _run_batch(model_b, [p.ids_b for _, p in batch])
            for row, (index, prepared) in enumerate(batch):
                pos_a, pos_b = torch.tensor(prepared.pos_a, dtype=torch.long), torch.tensor(prepared.pos_b, dtype=torch.long)
                doc = {"id": prepared.record["id"], "ids_a": prepared.ids_a, "ids_b": prepared.ids_b,
                       "chat": prepared.in_chat}
                template = torch.zeros(len(prepared.pos_a), dtype=torch.bool)
                if prepared.generation_prompt_pair:
                    template[-1] = True
                writer.add_document(doc, hidden_a[row, pos_a], hidden_b[row, pos_b], pos_a, pos_b,
                                    torch.tensor(prepared.merged, dtype=torch.bool), prepared.in_chat, template,
                                    number=index)
                _count(stats, prepared)
            stats["elapsed_s"] = time.perf_counter() - started
            if writer.should_flush():
                writer.flush(stats)
                if on_shard is not None:
                    on_shard(len(writer.progress["shards"]))
            if bar is not None:
                bar.update(budget_used, stats, sync.world_size)
        writer.flush(stats)
        if on_shard is not None:
            on_shard(len(writer.progress["shards"]))
    finally:
        if bar is not None:
            bar.close()

    # Every rank's shards and statistics, reduced on rank 0 into meta.json.
    parts = all_gather_objects({"shards": writer.progress["shards"], "stats": stats,
                                "docs": writer.progress["docs_consumed"]}, sync)
    if sync.is_main:
        merged = merge_stats([part["stats"] for part in parts])
        meta = {
            "model_a": model_a.describe(),
            "model_b": model_b.describe(),
            "data": {"sources": [asdict(s) for s in settings.sources], "max_tokens": settings.max_tokens,
                     "context_length": settings.context_length, "seed": settings.seed,
                     "zoo_data_versions": zoo_data_versions(settings.sources)},
            "dtype": {"a": str(model_a.dtype).removeprefix("torch."), "b": str(model_b.dtype).removeprefix("torch.")},
            "alignment": alignment_summary(merged),
            "ranks": sync.world_size,
        }
        writer.finalize(meta, target_norm=math.sqrt((model_a.d_model + model_b.d_model) / 2),
                        shards=[shard for part in parts for shard in part["shards"]], stats=merged,
                        docs=sum(part["docs"] for part in parts))
    barrier(sync)
    return ActivationStore(folder)


def merge_stats(parts: list[dict]) -> dict:
    """The statistics of a harvest from those of its ranks: counts add up, time is the slowest rank's."""
    merged = _new_stats()
    for part in parts:
        for key, value in part.items():
            if key == "cut_reasons":
                for reason, count in value.items():
                    merged["cut_reasons"][reason] = merged["cut_reasons"].get(reason, 0) + count
            elif key == "elapsed_s":
                merged["elapsed_s"] = max(merged["elapsed_s"], value)
            else:
                merged[key] += value
    return merged


def _count(stats: dict, prepared: _Prepared) -> None:
    stats["sequences"] += 1
    stats["fully_aligned"] += int(prepared.complete)
    stats["chat_sequences"] += int(prepared.in_chat)
    stats["pairs"] += len(prepared.pos_a)
    stats["tokens_b"] += len(prepared.ids_b)
    stats["merged_pairs"] += sum(prepared.merged)
    if prepared.cut_reason:
        reason = prepared.cut_reason.split(" after char")[0]
        stats["cut_reasons"][reason] = stats["cut_reasons"].get(reason, 0) + 1


def alignment_summary(stats: dict) -> dict:
    """The alignment statistics the store's meta.json reports (METHOD §2)."""
    sequences = max(stats["sequences"], 1)
    return {
        "sequences": stats["sequences"],
        "fully_aligned": stats["fully_aligned"],
        "fully_aligned_frac": stats["fully_aligned"] / sequences,
        "pairs": stats["pairs"],
        "pairs_per_token_a": stats["pairs"] / max(stats["tokens_a"], 1),
        "pairs_per_token_b": stats["pairs"] / max(stats["tokens_b"], 1),
        "merged_frac": stats["merged_pairs"] / max(stats["pairs"], 1),
        "cut_reasons": dict(Counter(stats["cut_reasons"])),
        "chat_sequences": stats["chat_sequences"],
    }


class _HarvestProgress:
    def __init__(self, total_tokens: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("harvest"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"),
                                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self._task = self._progress.add_task("harvest", total=total_tokens, completed=0, info="")
        self._progress.start()

    def update(self, budget_used: int, stats: dict, ranks: int) -> None:
        """``stats`` are this rank's (rank 0 shows the bar); rates are scaled to all ranks."""
        rate = ranks * (stats["tokens_a"] + stats["tokens_b"]) / max(stats["elapsed_s"], 1e-9)
        aligned = stats["fully_aligned"] / max(stats["sequences"], 1)
        on = f" on {ranks} ranks" if ranks > 1 else ""
        self._progress.update(self._task, completed=budget_used,
                              info=f"{ranks * stats['pairs']:,} pairs · {rate:,.0f} tok/s{on} · {100 * aligned:.1f}% aligned")

    def close(self) -> None:
        self._progress.stop()
