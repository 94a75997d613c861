"""Harvest throughput with randomly initialised models of real geometry and real tokenizers.

Only blocks up to the captured one run (the capture hook stops the forward pass), so a model
built with ``layer + 1`` blocks costs exactly what the full model costs to harvest. ``paper``
is Llama-3.1-8B (layer 16) against Qwen3-8B (layer 14); ``small`` is a CPU-sized stand-in.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from .bench_align import alignment_test_corpus, load_reference_tokenizers
from .data import SourceSettings
from .harvest import HarvestSettings, ModelSettings, harvest
from .models import LoadedModel

GEOMETRIES = {
    "paper": {
        "a": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, layer=16),
        "b": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128, layer=14),
    },
    "small": {
        "a": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, layer=2),
        "b": dict(hidden_size=384, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=96, layer=2),
    },
}


def _random_model(kind: str, geometry: dict, tokenizer, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    settings = dict(geometry)
    layer = settings.pop("layer")
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if kind == "a" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_class(vocab_size=len(tokenizer), num_hidden_layers=layer + 1, max_position_embeddings=4096, **settings)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=f"random-{model_class.__name__}", revision=None,
                       layer=layer, d_model=config.hidden_size, n_layers=layer + 1, dtype=dtype, device=device,
                       local_path=None)


def run_harvest_benchmark(
    geometry: str = "small", device: str = "cpu", dtype: str = "float32", max_tokens: int = 20_000,
    context_length: int = 256, batch_docs: int = 16, keep_store: Path | None = None,
) -> dict:
    """Harvest ``max_tokens`` (model A's tokens) of a varied corpus; returns rates and alignment.

    ``keep_store``: harvest into this folder and keep it (e.g. to benchmark training on it).
    """
    torch_device, torch_dtype = torch.device(device), getattr(torch, dtype)
    llama_tok, qwen_tok = load_reference_tokenizers()
    llama_tok.bos_token = "<|begin_of_text|>"
    started = time.perf_counter()
    models = (_random_model("a", GEOMETRIES[geometry]["a"], llama_tok, torch_device, torch_dtype),
              _random_model("b", GEOMETRIES[geometry]["b"], qwen_tok, torch_device, torch_dtype))
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        # Paragraphs long enough to fill the context: several corpus texts joined.
        texts = alignment_test_corpus()
        paragraphs = [" ".join(texts[i : i + 12]).replace("\n\n", "\n") for i in range(0, len(texts), 12)]
        corpus.write_text("\n\n".join(paragraphs * 50))
        settings = HarvestSettings(
            model_a=ModelSettings(models[0].model_id, models[0].layer, dtype=dtype),
            model_b=ModelSettings(models[1].model_id, models[1].layer, dtype=dtype),
            sources=[SourceSettings(str(corpus))], max_tokens=max_tokens, context_length=context_length,
            batch_docs=batch_docs, device=device,
        )
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        store = harvest(settings, keep_store or Path(scratch) / "store", models=models)
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        stats = store.meta["stats"]
        return {
            "geometry": geometry, "device": device, "dtype": dtype, "context_length": context_length,
            "batch_docs": batch_docs, "model_build_s": round(build_s, 2), "elapsed_s": round(elapsed, 2),
            "pairs": store.n_pairs, "pairs_per_s": store.n_pairs / elapsed, "store_gib": _size_gib(store.folder),
            "tokens_per_s": (stats["tokens_a"] + stats["tokens_b"]) / elapsed,
            "alignment": store.meta["alignment"],
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch_device.type == "cuda" else None,
        }


def _size_gib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file()) / 2**30, 3)
