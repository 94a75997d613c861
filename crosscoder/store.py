"""The activation store: paired activations on disk, written shard by shard, read as a stream.

Folder layout::

    meta.json               written last; its presence (with "complete": true) marks a finished store
    progress.json           resume point: shards committed, documents consumed, running statistics
    pairs-00000.safetensors a [n, d_A], b [n, d_B], norm_a [n], norm_b [n], doc [n], pos_a [n], pos_b [n],
                            merged [n], in_chat [n], template [n] (generation-prompt pairs)
    docs-00000.jsonl        the documents of that shard: doc number, record id, token ids of both models

A shard holds whole documents and is committed by renaming it into place after its docs file,
so a killed harvest loses at most the shard in flight and resumes after the last committed one.
A harvest on N ranks writes ``progress-r003.json``, ``pairs-r003-00000.safetensors`` … per rank
into the same folder; each rank only ever touches its own files, and rank 0 writes ``meta.json``
listing every rank's shards. A document's number is its record's index in the data stream, so it
does not depend on the number of ranks.

The folder may be an fsspec URL (``s3://bucket/store``; see :mod:`crosscoder.storage`), for nodes
that share object storage rather than a disk. The writer then builds each file in a local staging
folder and uploads it, docs file and shard before the progress file that names them; the reader
copies shards into a local cache on first use and memory-maps the copies.
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import math
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from . import storage
from .model import write_json_atomic

STORE_FORMAT = "crosscoder-audit/activation-store"
STORE_VERSION = 1


class StoreError(RuntimeError):
    """An activation store is missing, incomplete, or was built from other inputs."""


def _locate(folder: str | os.PathLike) -> storage.Location:
    """The store's location; a URL no installed backend can open is a StoreError."""
    location = storage.locate(folder)
    if isinstance(location, str):
        try:
            storage.filesystem(location)
        except storage.StorageError as exc:
            raise StoreError(str(exc)) from exc
    return location


def store_exists(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` (a path or URL) holds a ``meta.json``, i.e. a finished store."""
    return storage.is_file(storage.child(_locate(folder), "meta.json"))


def shard_name(index: int, rank_tag: str = "") -> str:
    return f"pairs-{rank_tag}{index:05d}.safetensors"


def rank_tag(rank: int, world_size: int) -> str:
    """The part of a file name that says which rank wrote it ("" for a one-process harvest)."""
    return "" if world_size == 1 else f"r{rank:03d}-"


def progress_name(rank: int, world_size: int) -> str:
    return "progress.json" if world_size == 1 else f"progress-r{rank:03d}.json"


def docs_name(shard_file: str) -> str:
    """The documents file committed with a shard: ``pairs-00003.safetensors`` → ``docs-00003.jsonl``."""
    return shard_file.replace("pairs-", "docs-").replace(".safetensors", ".jsonl")


class StoreWriter:
    """Appends documents' pairs and commits a shard once it holds ``shard_pairs`` pairs.

    ``folder``: a path or an fsspec URL. ``rank``/``world_size``: one writer per rank of a
    distributed harvest, each with its own files.
    """

    def __init__(self, folder: str | os.PathLike, input_hash: str, shard_pairs: int = 65536, rank: int = 0,
                 world_size: int = 1):
        self.location = _locate(folder)
        self.remote = isinstance(self.location, str)
        # A remote store is staged in the local cache of its URL: reading it back on this node
        # then downloads nothing.
        self.folder = storage.cache_folder(self.location) if self.remote else self.location
        self.folder.mkdir(parents=True, exist_ok=True)
        self.input_hash = input_hash
        self.shard_pairs = shard_pairs
        self.rank, self.world_size = rank, world_size
        self.tag = rank_tag(rank, world_size)
        self._check_world_size()
        self.progress = {"input_hash": input_hash, "shards": [], "docs_consumed": 0, "next_record": 0, "stats": {},
                         "world_size": world_size}
        self.progress_path = self.folder / progress_name(rank, world_size)
        saved = self._read_json(self.progress_path.name)
        if saved is not None:
            if saved.get("input_hash") != input_hash:
                raise StoreError(
                    f"{self.location} holds a harvest of other inputs (hash {saved.get('input_hash')}, "
                    f"now {input_hash}); choose another folder or delete it"
                )
            saved.setdefault("next_record", saved["docs_consumed"])  # stores from before ranks existed
            self.progress = saved
        self._drop_uncommitted()
        self._pending: list[dict] = []
        self._pending_docs: list[dict] = []
        self._pending_pairs = 0

    def _read_json(self, name: str) -> dict | None:
        path = storage.child(self.location, name)
        return json.loads(storage.read_text(path)) if storage.is_file(path) else None

    def _write_json(self, name: str, payload: dict) -> None:
        if self.remote:
            storage.write_text(storage.child(self.location, name), json.dumps(payload, indent=2, sort_keys=True))
        else:
            write_json_atomic(self.folder / name, payload)

    def _upload(self, name: str) -> None:
        """Remote stores: upload a committed local file (kept as the cached copy)."""
        if self.remote:
            storage.upload_cached(self.folder / name, storage.child(self.location, name))

    def _check_world_size(self) -> None:
        """A half-done harvest continues on the number of ranks it started with."""
        if self.remote:
            names = storage.list_names(self.location)
            single = "progress.json" in names
            ranked = [name for name in names if fnmatch.fnmatch(name, "progress-r*.json")]
        else:
            single = (self.folder / "progress.json").is_file()
            ranked = [path.name for path in sorted(self.folder.glob("progress-r*.json"))]
        started = 1 if single else self._read_json(ranked[0]).get("world_size") if ranked else None
        if started is not None and started != self.world_size:
            raise StoreError(f"{self.location}: this harvest was started on {started} rank(s); resume it with "
                             f"--nproc {started}, or delete the folder to start over on {self.world_size}")

    def _drop_uncommitted(self) -> None:
        """Remove this rank's shards or temp files written after its last progress file (a kill mid-shard)."""
        committed = {s["file"] for s in self.progress["shards"]}
        committed |= {docs_name(s["file"]) for s in self.progress["shards"]}
        own = re.compile(rf"^\.?(pairs|docs)-{self.tag}\d{{5}}\.|^\.{re.escape(self.progress_path.name)}\.")
        if self.remote:
            for name in storage.list_names(self.location):
                if own.match(name) and name not in committed:
                    storage.remove(storage.child(self.location, name))
            # The staging folder is also the cache: keep its notes on which version a file is.
            committed |= {f".{name}.remote.json" for name in committed}
        for path in self.folder.iterdir():
            if own.match(path.name) and path.name not in committed and path.is_file():
                path.unlink()

    @property
    def docs_consumed(self) -> int:
        return self.progress["docs_consumed"]

    @property
    def stats(self) -> dict:
        return self.progress["stats"]

    def add_document(
        self, doc: dict, a: Tensor, b: Tensor, pos_a: Tensor, pos_b: Tensor, merged: Tensor, in_chat: bool,
        template: Tensor | None = None, number: int | None = None,
    ) -> None:
        """Queue one document's pairs (possibly none); ``doc`` goes to the docs file.

        ``template [n]`` marks pairs of chat-template positions (the generation-prompt pair).
        ``number``: the document's record index in the data stream (default: the next number).
        """
        if number is None:
            number = self.progress["docs_consumed"] + len(self._pending_docs)
        self._last_number = number
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
        name = shard_name(index, self.tag)
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
            # Remote: in the same order as the local commit, so a progress file never names a
            # shard or docs file that is not there.
            self._upload(docs_file)
            self._upload(name)
            self.progress["shards"].append({"file": name, "pairs": n_pairs, "docs": len(self._pending_docs)})
        self.progress["docs_consumed"] += len(self._pending_docs)
        self.progress["next_record"] = self._last_number + 1
        self.progress["stats"] = stats
        self._write_json(self.progress_path.name, self.progress)
        self._pending, self._pending_docs, self._pending_pairs = [], [], 0

    def finalize(self, meta: dict, target_norm: float, shards: list[dict] | None = None,
                 stats: dict | None = None, docs: int | None = None) -> dict:
        """Compute the normalisation scalars from all stored norms and write ``meta.json``.

        A distributed harvest's rank 0 passes every rank's ``shards``, merged ``stats`` and the
        total number of ``docs``; a one-process harvest uses its own.
        """
        shards = self.progress["shards"] if shards is None else shards
        norms_a, norms_b = [], []
        for shard in shards:
            if self.remote:  # the norms' bytes only: other ranks' shards are not on this node
                norms = read_remote_tensors(storage.child(self.location, shard["file"]), ("norm_a", "norm_b"))
                norms_a.append(norms["norm_a"])
                norms_b.append(norms["norm_b"])
                continue
            with safe_open(str(self.folder / shard["file"]), framework="pt") as handle:
                norms_a.append(handle.get_tensor("norm_a"))
                norms_b.append(handle.get_tensor("norm_b"))
        if not norms_a:
            raise StoreError(f"{self.location}: the harvest produced no aligned pairs; check the data and the tokenizers")
        median_a = float(torch.cat(norms_a).median())
        median_b = float(torch.cat(norms_b).median())
        meta = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "complete": True,
            "input_hash": self.input_hash,
            "n_pairs": sum(s["pairs"] for s in shards),
            "n_docs": self.progress["docs_consumed"] if docs is None else docs,
            "shards": shards,
            "median_norm": {"a": median_a, "b": median_b},
            "norm_scales": {"a": target_norm / median_a, "b": target_norm / median_b},
            "stats": self.progress["stats"] if stats is None else stats,
            **meta,
        }
        self._write_json("meta.json", meta)
        return meta


class ActivationStore:
    """Read access to a finished store: metadata, shards, documents, shuffled batches.

    ``folder``: a path or an fsspec URL (then ``location`` is the URL, ``folder`` the local cache
    that its shards and docs files are copied into, each on first use).
    """

    def __init__(self, folder: str | os.PathLike):
        self.location = _locate(folder)
        self.remote = isinstance(self.location, str)
        self.folder = storage.cache_folder(self.location) if self.remote else self.location
        meta_path = storage.child(self.location, "meta.json")
        if not storage.is_file(meta_path):
            raise StoreError(f"{self.location} is not a finished activation store (no meta.json); run the harvest")
        self.meta = json.loads(storage.read_text(meta_path))
        if self.meta.get("format") != STORE_FORMAT or not self.meta.get("complete"):
            raise StoreError(f"{meta_path}: not a complete {STORE_FORMAT}")
        self._maps: dict[int, dict[str, MappedTensor]] = {}
        self._local: dict[str, Path] = {}  # remote stores: file name → cached copy

    @property
    def n_pairs(self) -> int:
        return self.meta["n_pairs"]

    @property
    def n_shards(self) -> int:
        return len(self.meta["shards"])

    @property
    def d_a(self) -> int:
        return self.meta["model_a"]["d_model"]

    @property
    def d_b(self) -> int:
        return self.meta["model_b"]["d_model"]

    @property
    def norm_scales(self) -> tuple[float, float]:
        return self.meta["norm_scales"]["a"], self.meta["norm_scales"]["b"]

    def _file(self, name: str) -> Path:
        """A local path to one of the store's files (remote stores: downloaded on first use)."""
        if not self.remote:
            return self.folder / name
        if name not in self._local:
            try:
                self._local[name] = storage.download(storage.child(self.location, name))
            except FileNotFoundError as exc:
                raise StoreError(f"{self.location}: {name} is missing; the store is damaged, harvest again") from exc
        return self._local[name]

    def shard_path(self, index: int) -> Path:
        return self._file(self.meta["shards"][index]["file"])

    def shard_paths(self) -> list[Path]:
        """Local paths of all shards (a remote store's are all downloaded: prefer ``shard_path``)."""
        return [self.shard_path(index) for index in range(self.n_shards)]

    def load_shard(self, index: int, keys: tuple[str, ...] = ("a", "b")) -> dict[str, Tensor]:
        with safe_open(str(self.shard_path(index)), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}

    def documents(self) -> Iterator[dict]:
        """Every document, in the order of its number (the data stream's), whatever the ranks were."""
        by_rank: dict[str, list[str]] = {}
        for shard in self.meta["shards"]:  # each rank's shards hold increasing numbers
            tag = re.match(r"pairs-(r\d+-)?", shard["file"]).group(1) or ""
            by_rank.setdefault(tag, []).append(shard["file"])
        streams = [self._documents_of(files) for files in by_rank.values()]
        yield from heapq.merge(*streams, key=lambda doc: doc["doc"])

    def shard_documents(self, index: int) -> Iterator[dict]:
        """The documents whose pairs are in shard ``index`` (a document never spans two shards)."""
        return self._documents_of([self.meta["shards"][index]["file"]])

    def _documents_of(self, shard_files: list[str]) -> Iterator[dict]:
        for file in shard_files:
            with open(self._file(docs_name(file))) as handle:
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
        rank: int = 0,
        world_size: int = 1,
        skip_batches: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled ``(x_a [batch, d_A], x_b [batch, d_B])`` batches with bounded memory.

        Shards are visited in a seeded random order; pairs pass through a buffer of
        ``shuffle_buffer`` pairs that is permuted before batches are taken from it. Only row
        indices are shuffled: the rows of a batch are then read from memory-mapped shards, so
        memory stays small whatever the store's size. ``epochs=None`` loops forever. Raw
        activations unless ``normalise`` (then multiplied by the store's scalars).

        ``template_weight``: how often, on average, each generation-prompt pair (``template``
        flag: where a chat model is about to answer) is served per epoch, against once for every
        other pair. Weights are applied by repetition (the integer part, plus one more copy with
        the probability of the fractional part), so an epoch grows by the extra copies.

        ``rank``/``world_size`` (distributed training): yield only this rank's rows of each batch,
        ``batch_size / world_size`` of them. The batches themselves do not depend on the world
        size, and each rank reads only its own rows. ``skip_batches``: start after this many
        batches without reading them (a resumed run).
        """
        if template_weight <= 0 or not math.isfinite(template_weight):
            raise ValueError(f"template_weight must be a positive number, got {template_weight}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size} "
                             f"(rank {rank})")
        local = batch_size // world_size
        scale_a, scale_b = self.norm_scales if normalise else (1.0, 1.0)
        schedule = self._batch_rows(batch_size, shuffle_buffer, seed, epochs, template_weight)
        for number, (shard_ids, rows) in enumerate(schedule):
            if number < skip_batches:
                continue
            mine = slice(rank * local, (rank + 1) * local)
            x_a, x_b = self.gather(shard_ids[mine], rows[mine])
            yield x_a.to(dtype) * scale_a, x_b.to(dtype) * scale_b

    def _batch_rows(self, batch_size: int, shuffle_buffer: int, seed: int, epochs: int | None,
                    template_weight: float) -> Iterator[tuple[Tensor, Tensor]]:
        """``(shard index [batch], row [batch])`` of every batch, in serving order."""
        rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        shards = self.meta["shards"]
        epoch = 0
        while epochs is None or epoch < epochs:
            order = list(range(len(shards)))
            rng.shuffle(order)
            buf_shard: list[Tensor] = []
            buf_row: list[Tensor] = []
            buffered = 0
            for position, index in enumerate(order):
                rows = torch.arange(shards[index]["pairs"])
                if template_weight != 1.0:
                    flagged = self.load_shard(index, ("template",))["template"].bool()
                    rows = rows.repeat_interleave(_repeats(flagged, template_weight, generator))
                buf_shard.append(torch.full_like(rows, index))
                buf_row.append(rows)
                buffered += rows.shape[0]
                last = position == len(order) - 1
                if buffered < shuffle_buffer and not last:
                    continue
                shard_ids, row_ids = torch.cat(buf_shard), torch.cat(buf_row)
                perm = torch.randperm(shard_ids.shape[0], generator=generator)
                shard_ids, row_ids = shard_ids[perm], row_ids[perm]
                usable = shard_ids.shape[0] if last else (shard_ids.shape[0] // batch_size) * batch_size
                for start in range(0, usable - batch_size + 1, batch_size):
                    yield shard_ids[start : start + batch_size], row_ids[start : start + batch_size]
                # Carry the remainder into the next buffer so that no pair is dropped mid-epoch.
                buf_shard, buf_row = [shard_ids[usable:]], [row_ids[usable:]]
                buffered = buf_shard[0].shape[0]
            epoch += 1

    def gather(self, shard_ids: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Raw ``(a, b)`` rows by ``(shard index, row)``, read from memory-mapped shards."""
        out_a = torch.empty(rows.shape[0], self.d_a, dtype=self._dtype("a"))
        out_b = torch.empty(rows.shape[0], self.d_b, dtype=self._dtype("b"))
        for index in torch.unique(shard_ids).tolist():
            where = torch.nonzero(shard_ids == index).squeeze(1)
            mapped = self._mapped(index)
            for key, out in (("a", out_a), ("b", out_b)):
                out[where] = mapped[key].rows(rows[where])
        return out_a, out_b

    def _mapped(self, index: int) -> dict[str, MappedTensor]:
        if index not in self._maps:
            self._maps[index] = map_safetensors(self.shard_path(index), ("a", "b"))
        return self._maps[index]

    def _dtype(self, key: str) -> torch.dtype:
        return self._mapped(0)[key].torch_dtype

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


def _repeats(flagged: Tensor, weight: float, generator: torch.Generator) -> Tensor:
    """How many times each row is served: flagged rows ``weight`` times on average (stochastic rounding)."""
    whole = math.floor(weight)
    repeats = torch.ones(flagged.shape[0], dtype=torch.long)
    extra = (torch.rand(flagged.shape[0], generator=generator) < weight - whole).long()
    repeats[flagged] = whole + extra[flagged]
    return repeats


_NUMPY_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
                 "BF16": (np.uint16, torch.bfloat16), "F64": (np.float64, torch.float64),
                 "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32), "U8": (np.uint8, torch.uint8)}


class MappedTensor:
    """One tensor of a safetensors file, memory-mapped: reading rows touches only their pages."""

    def __init__(self, array: np.memmap, torch_dtype: torch.dtype):
        self.array = array
        self.torch_dtype = torch_dtype

    def rows(self, index: Tensor) -> Tensor:
        order = torch.argsort(index)  # ascending reads are kinder to the disk
        picked = torch.from_numpy(np.ascontiguousarray(self.array[index[order].numpy()]))
        if self.torch_dtype == torch.bfloat16:
            picked = picked.view(torch.bfloat16)
        out = torch.empty_like(picked)
        out[order] = picked
        return out


def map_safetensors(path: Path, keys: tuple[str, ...]) -> dict[str, MappedTensor]:
    """Memory-map tensors of a safetensors file (8-byte header length, JSON header, raw data)."""
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    mapped = {}
    for key in keys:
        info = header[key]
        np_dtype, torch_dtype = _NUMPY_DTYPES[info["dtype"]]
        start, _ = info["data_offsets"]
        array = np.memmap(path, dtype=np_dtype, mode="r", offset=8 + header_len + start, shape=tuple(info["shape"]))
        mapped[key] = MappedTensor(array, torch_dtype)
    return mapped


def read_remote_tensors(url: str, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """Tensors of a remote safetensors file, fetched by byte range (the header, then each tensor)."""
    header_len = int.from_bytes(storage.read_range(url, 0, 8), "little")
    header = json.loads(storage.read_range(url, 8, 8 + header_len))
    out = {}
    for key in keys:
        info = header[key]
        np_dtype, torch_dtype = _NUMPY_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        data = storage.read_range(url, 8 + header_len + start, 8 + header_len + end)
        tensor = torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()).reshape(info["shape"])
        out[key] = tensor.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else tensor
    return out
