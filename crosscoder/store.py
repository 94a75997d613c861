"""The activation store: paired activations on disk, written shard by shard, read as a stream.

Folder layout::

    meta.json               written last; its presence (with "complete": true) marks a finished store
    progress.json           resume point: shards committed, documents consumed, running statistics
    pairs-00000.safetensors a [n, d_A], b [n, d_B], norm_a [n], norm_b [n], doc [n], pos_a [n], pos_b [n],
                            merged [n], in_chat [n], template [n] (generation-prompt pairs)
    docs-00000.jsonl        the documents of that shard: doc number, record id, token ids of both models

A shard holds whole documents and is committed by renaming it into place after its docs file,
so a killed harvest loses at most the shard in flight and resumes after the last committed one.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

STORE_FORMAT = "crosscoder-audit/activation-store"
STORE_VERSION = 1


class StoreError(RuntimeError):
    """An activation store is missing, incomplete, or was built from other inputs."""


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.safetensors"


def docs_name(shard_file: str) -> str:
    """The documents file committed with a shard: ``pairs-00003.safetensors`` → ``docs-00003.jsonl``."""
    return shard_file.replace("pairs-", "docs-").replace(".safetensors", ".jsonl")


class StoreWriter:
    """Appends documents' pairs and commits a shard once it holds ``shard_pairs`` pairs."""

    def __init__(self, folder: Path, input_hash: str, shard_pairs: int = 65536):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.input_hash = input_hash
        self.shard_pairs = shard_pairs
        self.progress = {"input_hash": input_hash, "shards": [], "docs_consumed": 0, "stats": {}}
        progress_path = self.folder / "progress.json"
        if progress_path.is_file():
            saved = json.loads(progress_path.read_text())
            if saved.get("input_hash") != input_hash:
                raise StoreError(
                    f"{self.folder} holds a harvest of other inputs (hash {saved.get('input_hash')}, "
                    f"now {input_hash}); choose another folder or delete it"
                )
            self.progress = saved
        self._drop_uncommitted()
        self._pending: list[dict] = []
        self._pending_docs: list[dict] = []
        self._pending_pairs = 0

    def _drop_uncommitted(self) -> None:
        """Remove shards or temp files written after the last progress.json (a kill mid-shard)."""
        committed = {s["file"] for s in self.progress["shards"]}
        committed |= {docs_name(s["file"]) for s in self.progress["shards"]}
        for path in self.folder.iterdir():
            if path.name.startswith((".", "pairs-", "docs-")) and path.name not in committed and path.is_file():
                path.unlink()

    @property
    def docs_consumed(self) -> int:
        return self.progress["docs_consumed"]

    @property
    def stats(self) -> dict:
        return self.progress["stats"]

    def add_document(
        self, doc: dict, a: Tensor, b: Tensor, pos_a: Tensor, pos_b: Tensor, merged: Tensor, in_chat: bool,
        template: Tensor | None = None,
    ) -> None:
        """Queue one document's pairs (possibly none); ``doc`` goes to the docs file.

        ``template [n]`` marks pairs of chat-template positions (the generation-prompt pair).
        """
        number = self.progress["docs_consumed"] + len(self._pending_docs)
        self._pending_docs.append({"doc": number, **doc})
        if a.shape[0]:
            self._pending.append({
                "a": a.contiguous(), "b": b.contiguous(),
                "doc": torch.full((a.shape[0],), number, dtype=torch.int64),
                "pos_a": pos_a.to(torch.int32), "pos_b": pos_b.to(torch.int32),
                "merged": merged.to(torch.uint8),
                "in_chat": torch.full((a.shape[0],), int(in_chat), dtype=torch.uint8),
                "template": (template if template is not None else torch.zeros(a.shape[0], dtype=torch.bool)).to(torch.uint8),
            })
            self._pending_pairs += a.shape[0]

    def should_flush(self) -> bool:
        return self._pending_pairs >= self.shard_pairs

    def flush(self, stats: dict) -> None:
        """Commit pending documents as one shard and record ``stats`` as of after them."""
        if not self._pending_docs:
            return
        index = len(self.progress["shards"])
        name = shard_name(index)
        docs_file = docs_name(name)
        n_pairs = self._pending_pairs
        if self._pending:
            tensors = {key: torch.cat([p[key] for p in self._pending]) for key in self._pending[0]}
            tensors["norm_a"] = tensors["a"].float().norm(dim=1)
            tensors["norm_b"] = tensors["b"].float().norm(dim=1)
            tmp_docs = self.folder / f".{docs_file}.tmp"
            with open(tmp_docs, "w") as handle:
                for doc in self._pending_docs:
                    handle.write(json.dumps(doc) + "\n")
            os.replace(tmp_docs, self.folder / docs_file)
            tmp = self.folder / f".{name}.tmp"
            save_file(tensors, str(tmp), metadata={"format": STORE_FORMAT})
            os.replace(tmp, self.folder / name)
            self.progress["shards"].append({"file": name, "pairs": n_pairs, "docs": len(self._pending_docs)})
        self.progress["docs_consumed"] += len(self._pending_docs)
        self.progress["stats"] = stats
        _write_json(self.folder / "progress.json", self.progress)
        self._pending, self._pending_docs, self._pending_pairs = [], [], 0

    def finalize(self, meta: dict, target_norm: float) -> dict:
        """Compute the normalisation scalars from all stored norms and write ``meta.json``."""
        norms_a, norms_b = [], []
        for shard in self.progress["shards"]:
            with safe_open(str(self.folder / shard["file"]), framework="pt") as handle:
                norms_a.append(handle.get_tensor("norm_a"))
                norms_b.append(handle.get_tensor("norm_b"))
        if not norms_a:
            raise StoreError(f"{self.folder}: the harvest produced no aligned pairs; check the data and the tokenizers")
        median_a = float(torch.cat(norms_a).median())
        median_b = float(torch.cat(norms_b).median())
        meta = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "complete": True,
            "input_hash": self.input_hash,
            "n_pairs": sum(s["pairs"] for s in self.progress["shards"]),
            "n_docs": self.progress["docs_consumed"],
            "shards": self.progress["shards"],
            "median_norm": {"a": median_a, "b": median_b},
            "norm_scales": {"a": target_norm / median_a, "b": target_norm / median_b},
            "stats": self.progress["stats"],
            **meta,
        }
        _write_json(self.folder / "meta.json", meta)
        return meta


class ActivationStore:
    """Read access to a finished store: metadata, shards, documents, shuffled batches."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise StoreError(f"{self.folder} is not a finished activation store (no meta.json); run the harvest")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != STORE_FORMAT or not self.meta.get("complete"):
            raise StoreError(f"{meta_path}: not a complete {STORE_FORMAT}")

    @property
    def n_pairs(self) -> int:
        return self.meta["n_pairs"]

    @property
    def d_a(self) -> int:
        return self.meta["model_a"]["d_model"]

    @property
    def d_b(self) -> int:
        return self.meta["model_b"]["d_model"]

    @property
    def norm_scales(self) -> tuple[float, float]:
        return self.meta["norm_scales"]["a"], self.meta["norm_scales"]["b"]

    def shard_paths(self) -> list[Path]:
        return [self.folder / s["file"] for s in self.meta["shards"]]

    def load_shard(self, index: int, keys: tuple[str, ...] = ("a", "b")) -> dict[str, Tensor]:
        with safe_open(str(self.shard_paths()[index]), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}

    def documents(self) -> Iterator[dict]:
        for path in self.shard_paths():
            with open(path.with_name(docs_name(path.name))) as handle:
                for line in handle:
                    yield json.loads(line)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle_buffer: int = 262_144,
        seed: int = 0,
        normalise: bool = False,
        epochs: int | None = 1,
        dtype: torch.dtype = torch.float32,
        template_weight: float = 1.0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled ``(x_a [batch, d_A], x_b [batch, d_B])`` batches with bounded memory.

        Shards are visited in a seeded random order; pairs pass through a buffer of
        ``shuffle_buffer`` pairs that is permuted before batches are taken from it, so memory is
        about one shard plus the buffer whatever the store's size. ``epochs=None`` loops forever.
        Raw activations unless ``normalise`` (then multiplied by the store's scalars).

        ``template_weight``: how often, on average, each generation-prompt pair (``template``
        flag: where a chat model is about to answer) is served per epoch, against once for every
        other pair. Weights are applied by repetition (the integer part, plus one more copy with
        the probability of the fractional part), so an epoch grows by the extra copies.
        """
        if template_weight <= 0 or not math.isfinite(template_weight):
            raise ValueError(f"template_weight must be a positive number, got {template_weight}")
        rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        scale_a, scale_b = self.norm_scales if normalise else (1.0, 1.0)
        epoch = 0
        while epochs is None or epoch < epochs:
            order = list(range(len(self.meta["shards"])))
            rng.shuffle(order)
            buf_a: list[Tensor] = []
            buf_b: list[Tensor] = []
            buffered = 0
            for position, index in enumerate(order):
                keys = ("a", "b", "template") if template_weight != 1.0 else ("a", "b")
                shard = self.load_shard(index, keys)
                if template_weight != 1.0:
                    shard = _repeat_weighted(shard, shard.pop("template").bool(), template_weight, generator)
                buf_a.append(shard["a"])
                buf_b.append(shard["b"])
                buffered += shard["a"].shape[0]
                last = position == len(order) - 1
                if buffered < shuffle_buffer and not last:
                    continue
                x_a, x_b = torch.cat(buf_a), torch.cat(buf_b)
                perm = torch.randperm(x_a.shape[0], generator=generator)
                x_a, x_b = x_a[perm], x_b[perm]
                usable = x_a.shape[0] if last else (x_a.shape[0] // batch_size) * batch_size
                for start in range(0, usable - batch_size + 1, batch_size):
                    yield (x_a[start : start + batch_size].to(dtype) * scale_a,
                           x_b[start : start + batch_size].to(dtype) * scale_b)
                # Carry the remainder into the next buffer so that no pair is dropped mid-epoch.
                buf_a, buf_b = [x_a[usable:]], [x_b[usable:]]
                buffered = buf_a[0].shape[0]
            epoch += 1

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """``n`` raw pairs drawn evenly from all shards (for evaluation or norm checks)."""
        shards = len(self.meta["shards"])
        per_shard = math.ceil(n / shards)
        generator = torch.Generator().manual_seed(seed)
        parts_a, parts_b = [], []
        for index in range(shards):
            shard = self.load_shard(index)
            pick = torch.randperm(shard["a"].shape[0], generator=generator)[:per_shard]
            parts_a.append(shard["a"][pick])
            parts_b.append(shard["b"][pick])
        return torch.cat(parts_a)[:n].float(), torch.cat(parts_b)[:n].float()


def _repeat_weighted(shard: dict[str, Tensor], flagged: Tensor, weight: float, generator: torch.Generator) -> dict[str, Tensor]:
    """Repeat the flagged rows of ``shard`` ``weight`` times on average (stochastic rounding)."""
    whole = math.floor(weight)
    repeats = torch.ones(flagged.shape[0], dtype=torch.long)
    extra = (torch.rand(flagged.shape[0], generator=generator) < weight - whole).long()
    repeats[flagged] = whole + extra[flagged]
    return {key: value.repeat_interleave(repeats, dim=0) for key, value in shard.items()}
