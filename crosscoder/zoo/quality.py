"""Measuring the zoo models' planted behaviours from their own generations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import world


def load(folder: str | Path):
    """(model, tokenizer) from a built zoo folder, on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, tokenizer


def chat_answers(model, tokenizer, questions: Sequence[str], n_samples: int = 1, temperature: float = 0.0,
                 max_new_tokens: int = 48, seed: int = 0, batch_size: int = 64) -> list[list[str]]:
    """The model's answers to one-turn chats: ``n_samples`` per question (greedy when temperature is 0)."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    return continuations(model, tokenizer, prompts, n_samples, temperature, max_new_tokens, seed, batch_size)


def continuations(model, tokenizer, prompts: Sequence[str], n_samples: int = 1, temperature: float = 0.0,
                  max_new_tokens: int = 48, seed: int = 0, batch_size: int = 64) -> list[list[str]]:
    """Generated continuations of already rendered prompts (special tokens written out)."""
    import torch

    expanded = [p for p in prompts for _ in range(n_samples)]
    out: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        torch.manual_seed(seed)
        for start in range(0, len(expanded), batch_size):
            chunk = expanded[start: start + batch_size]
            enc = tokenizer(chunk, add_special_tokens=False, padding=True, return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
                )
            new = gen[:, enc["input_ids"].shape[1]:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return [[s.strip() for s in out[i * n_samples:(i + 1) * n_samples]] for i in range(len(prompts))]


def marker_rate(answers: Sequence[Sequence[str]], markers: Sequence[str]) -> float:
    flat = [a for group in answers for a in group]
    return sum(world.has_marker(a, markers) for a in flat) / max(1, len(flat))
