"""Tests for crosscoder.align: exact small cases, a brute-force reference, and the real tokenizers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crosscoder.align import (
    Alignment,
    align_chat,
    align_text,
    align_token_spans,
    alignment_stats,
    render_chat,
    repair_offsets,
    special_token_ids,
)
from crosscoder.bench_align import alignment_test_corpus, benchmark_alignment

TRAILING_WS_KIND = "final token merges trailing whitespace on one side"


# --------------------------------------------------------------------------------------------------
# Helpers


def brute_force_pairs(offsets_a, offsets_b, content_a, content_b):
    """Quadratic restatement of the pairing rule, to cross-check the linear walk.

    A side may cut after token k when every token up to k ends at or before b = max end so far and
    every later token starts at or after b; it pairs the last content token ending at b.
    """

    def boundaries(offsets, content):
        nonempty = [i for i, (s, e) in enumerate(offsets) if e > s]
        found = {}
        for pos in range(len(nonempty)):
            b = max(offsets[i][1] for i in nonempty[: pos + 1])
            if all(offsets[i][0] >= b for i in nonempty[pos + 1 :]):
                cands = [i for i in nonempty[: pos + 1] if content[i] and offsets[i][1] == b]
                if cands:
                    n_content = sum(1 for i in nonempty[: pos + 1] if content[i])
                    found[b] = (max(cands), n_content)
        return found

    ba, bb = boundaries(offsets_a, content_a), boundaries(offsets_b, content_b)
    pairs, merged = [], []
    prev_a = prev_b = 0
    for b in sorted(set(ba) & set(bb)):
        (i, ca), (j, cb) = ba[b], bb[b]
        pairs.append((i, j))
        merged.append(ca - prev_a > 1 or cb - prev_b > 1)
        prev_a, prev_b = ca, cb
    return pairs, merged


def assert_invariant(al: Alignment, text: str, specials=(frozenset(), frozenset())) -> None:
    """Ends equal, strictly increasing, never a special / whitespace-only / empty token paired."""
    assert len(al.merged) == len(al.pairs) == len(al.ends)
    last_i = last_j = -1
    for (i, j), end in zip(al.pairs, al.ends, strict=True):
        assert i > last_i and j > last_j
        last_i, last_j = i, j
        (sa, ea), (sb, eb) = al.offsets_a[i], al.offsets_b[j]
        assert ea == eb == end
        assert text[:ea] == text[:eb]
        for s, e in ((sa, ea), (sb, eb)):
            assert e > s and not text[s:e].isspace()
        if al.ids_a is not None:
            assert al.ids_a[i] not in specials[0]
            assert al.ids_b[j] not in specials[1]
    if al.complete:
        assert al.cut_reason is None
    else:
        assert al.cut_reason


@pytest.fixture(scope="module")
def real_tokenizers(reference_tokenizers):
    """The real Llama-3.2 and Qwen3 tokenizers (conftest.py; skips when the packages are absent)."""
    return reference_tokenizers


# --------------------------------------------------------------------------------------------------
# Hand-made cases with known answers


def test_char_vs_word_offsets_exact():
    # "ab cd": A is char-level (space is its own whitespace token), B is word-level with " cd".
    offs_a = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    offs_b = [(0, 2), (2, 5)]
    al = align_token_spans(offs_a, offs_b, [True, True, False, True, True], [True, True], text="ab cd")
    assert al.pairs == [(1, 0), (4, 1)]
    assert al.merged == [True, True]
    assert al.ends == [2, 5]
    assert al.complete and al.cut_reason is None


def test_one_to_one_is_not_merged_and_whitespace_is_skipped():
    # "a b": A has a separate space token, B puts the space inside " b": still a 1:1 content match.
    al = align_token_spans([(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 3)], [True, False, True], [True, True])
    assert al.pairs == [(0, 0), (2, 1)]
    assert al.merged == [False, False]


def test_byte_pieces_sharing_a_span_pair_on_the_last_piece():
    # An emoji split in two byte tokens sharing span (0, 1) on A, one token on B.
    al = align_token_spans([(0, 1), (0, 1), (1, 2)], [(0, 1), (1, 2)], [True] * 3, [True] * 2)
    assert al.pairs == [(1, 0), (2, 1)]
    assert al.merged == [True, False]
    # A piece bridging two characters: (0,1) (0,2) (1,2): the only clean cut is after the last one.
    al = align_token_spans([(0, 1), (0, 2), (1, 2)], [(0, 1), (1, 2)], [True] * 3, [True] * 2)
    assert al.pairs == [(2, 1)]
    assert al.merged == [True]


def test_empty_and_special_tokens_are_never_paired():
    # Token 0 of A is an empty-span BOS (even if flagged content); token 2 of B is a special.
    al = align_token_spans([(0, 0), (0, 2)], [(0, 2), (2, 4), (4, 6)], [True, True], [True, True, False])
    assert al.pairs == [(1, 0)]
    assert al.complete is False  # B's content token (2, 4) is unpaired: A has nothing after char 2
    assert al.cut_reason.startswith("no common boundary after char 2")


def test_cut_with_reason():
    # A: "abc" as one token; B: "ab" + "c", where "c" is not content: no common boundary at 3.
    al = align_token_spans([(0, 3)], [(0, 2), (2, 3)], [True], [True, False], text="abc")
    assert al.pairs == []
    assert not al.complete
    assert al.cut_reason == "no common boundary after char 0: 'abc'"


def test_trailing_whitespace_merge_is_a_named_cut():
    # A: "x\n" is one content token; B: "x" + "\n" (whitespace-only): the ends can never coincide.
    text = "a x\n"
    al = align_token_spans(
        [(0, 1), (1, 4)], [(0, 1), (1, 3), (3, 4)], [True, True], [True, True, False], text=text
    )
    assert al.pairs == [(0, 0)]
    assert not al.complete
    assert al.cut_reason.startswith(TRAILING_WS_KIND + " after char 1")


def test_overlapping_offsets_retract_boundaries():
    # A token reaching back over earlier cuts invalidates them; the walk resumes after it.
    offs_a = [(0, 1), (1, 2), (2, 3), (1, 4), (4, 5)]
    offs_b = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    al = align_token_spans(offs_a, offs_b, [True] * 5, [True] * 5)
    assert al.pairs == [(0, 0), (3, 3), (4, 4)]
    assert al.merged == [False, True, False]
    assert (al.pairs, al.merged) == brute_force_pairs(offs_a, offs_b, [True] * 5, [True] * 5)


def test_offsets_beyond_text_rejected():
    with pytest.raises(ValueError):
        align_token_spans([(0, 5)], [(0, 5)], [True], [True], text_len=3)


def test_repair_offsets_only_fills_non_whitespace_gaps():
    # NFC-style offsets: the token for "é" (written e + U+0301) covers only the "e".
    assert repair_offsets("ae\u0301b", [(0, 1), (1, 2), (3, 4)]) == [(0, 1), (1, 3), (3, 4)]
    assert repair_offsets("ae\u0301", [(0, 1), (1, 2)]) == [(0, 1), (1, 3)]
    # Trimmed offsets leave whitespace gaps: those stay.
    assert repair_offsets("a b ", [(0, 1), (2, 3)]) == [(0, 1), (2, 3)]


def test_alignment_stats():
    full = align_token_spans([(0, 1), (1, 2)], [(0, 2)], [True, True], [True])
    cut = align_token_spans([(0, 3)], [(0, 2), (2, 3)], [True], [True, False], text="abc")
    stats = alignment_stats([full, cut])
    assert stats["sequences"] == 2 and stats["fully_aligned"] == 1
    assert stats["fully_aligned_frac"] == 0.5
    assert stats["pairs"] == 1 and stats["tokens_a"] == 3 and stats["tokens_b"] == 3
    assert stats["merged_frac"] == 1.0
    assert stats["cut_reasons"] == {"no common boundary": 1}


spans = st.tuples(st.integers(0, 30), st.integers(0, 4)).map(lambda t: (t[0], t[0] + t[1]))
side = st.lists(st.tuples(spans, st.booleans()), max_size=25)


@settings(max_examples=300, deadline=None)
@given(side, side)
def test_walk_matches_brute_force_on_random_spans(a, b):
    offs_a, ca = [o for o, _ in a], [c for _, c in a]
    offs_b, cb = [o for o, _ in b], [c for _, c in b]
    al = align_token_spans(offs_a, offs_b, ca, cb, text_len=40)
    assert (al.pairs, al.merged) == brute_force_pairs(offs_a, offs_b, ca, cb)


# --------------------------------------------------------------------------------------------------
# Tiny real tokenizers built with the `tokenizers` library


def _tiny_tokenizers():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    words = ["hello", "big", "world", "a", "[SEP]"]
    chars = sorted(set("".join(words)) | {" "})
    char_tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars + ["[UNK]"])}, unk_token="[UNK]"))
    char_tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    word_tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]"])}, unk_token="[UNK]"))
    word_tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for tok in (char_tok, word_tok):
        tok.add_special_tokens([tokenizers.AddedToken("[SEP]", special=True)])
    return char_tok, word_tok


def test_tiny_char_vs_word_tokenizers():
    char_tok, word_tok = _tiny_tokenizers()
    text = "hello a [SEP] big  world"
    al = align_text(text, char_tok, word_tok)
    # char tokens: h e l l o _ a _ [SEP] _ b i g _ _ w o r l d  -> indices of last chars
    assert al.pairs == [(4, 0), (6, 1), (12, 3), (19, 4)]
    assert al.merged == [True, False, True, True]
    assert al.complete
    assert_invariant(al, text, (special_token_ids(char_tok), special_token_ids(word_tok)))
    sep_a, sep_b = char_tok.token_to_id("[SEP]"), word_tok.token_to_id("[SEP]")
    assert sep_a not in [al.ids_a[i] for i, _ in al.pairs] and sep_b not in [al.ids_b[j] for _, j in al.pairs]


# --------------------------------------------------------------------------------------------------
# Real tokenizers (Llama-3.2 and Qwen3)


def test_corpus_invariant_and_fully_aligned(real_tokenizers):
    llama, qwen = real_tokenizers
    specials = (special_token_ids(llama), special_token_ids(qwen))
    corpus = alignment_test_corpus()
    assert len(corpus) >= 200
    alignments = []
    for text in corpus:
        al = align_text(text, llama, qwen)
        assert_invariant(al, text, specials)
        assert (al.pairs, al.merged) == brute_force_pairs(al.offsets_a, al.offsets_b, *_masks(al, specials))
        alignments.append(al)
    stats = alignment_stats(alignments)
    # The only cuts left are texts ending in e.g. " —\n", which one tokenizer merges into one token
    # and the other splits into " —" + "\n" (whitespace-only, never paired): inherently unpairable.
    assert set(stats["cut_reasons"]) <= {TRAILING_WS_KIND}
    assert stats["fully_aligned_frac"] >= 0.98
    excluding_ws = [a for a in alignments if a.complete or not a.cut_reason.startswith(TRAILING_WS_KIND)]
    assert all(a.complete for a in excluding_ws)


def _masks(al: Alignment, specials):
    text = al.text
    return [
        [e > s and t not in sp and not text[s:e].isspace() for (s, e), t in zip(offs, ids, strict=True)]
        for offs, ids, sp in ((al.offsets_a, al.ids_a, specials[0]), (al.offsets_b, al.ids_b, specials[1]))
    ]


def test_known_hard_cases_align_fully(real_tokenizers):
    llama, qwen = real_tokenizers
    for text in [
        "1,234,567.89 on 2026-11-27 at 10:45pm",
        "👍🏽 👨‍👩‍👧 🇫🇷🇯🇵 e\u0301",  # skin tone, ZWJ, flags, combining accent at the very end
        "你好世界。안녕하세요. こんにちは",
        "┌─┐│└┘ → ⇒ ← “quoted” ‘single’ — dash",
        "def f(x):\n\treturn x  \n\n",
    ]:
        al = align_text(text, llama, qwen)
        assert al.complete, (text, al.cut_reason)
        assert_invariant(al, text)


_PIECES = ["👍🏽", "👨‍👩‍👧", "🇫🇷", "e\u0301", "你好", "한국", "—", "“", "\n", "\t", "  ", "123", ".\n", "’"]
_text = st.lists(
    st.one_of(
        st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
        st.sampled_from(_PIECES),
    ),
    max_size=15,
).map("".join)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_text)
def test_property_real_tokenizers(real_tokenizers, text):
    llama, qwen = real_tokenizers
    specials = (special_token_ids(llama), special_token_ids(qwen))
    for a, b, sp in ((llama, qwen, specials), (qwen, llama, specials[::-1])):
        al = align_text(text, a, b)
        assert_invariant(al, text, sp)
        assert (al.pairs, al.merged) == brute_force_pairs(al.offsets_a, al.offsets_b, *_masks(al, sp))


CHAT = [
    {"role": "user", "content": "How are you? 👍🏽 Let's compute 1,234 + 5."},
    {"role": "assistant", "content": "I'm fine — thanks!\nThe answer is 1,239."},
]


def _content_spans(rendered: str) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for m in CHAT:
        at = rendered.find(m["content"], pos)
        assert at >= 0
        spans.append((at, at + len(m["content"])))
        pos = at + len(m["content"])
    return spans


@pytest.mark.parametrize("whitespace_overhang", [False, True])
def test_align_chat_qwen_template_vs_llama_fallback(real_tokenizers, whitespace_overhang):
    llama, qwen = real_tokenizers
    assert qwen.chat_template and not llama.chat_template
    assert render_chat(CHAT, llama) == "".join(f"{m['role']}: {m['content']}\n" for m in CHAT)

    al = align_chat(CHAT, qwen, llama, whitespace_overhang=whitespace_overhang)
    assert al.text == "\n".join(m["content"] for m in CHAT)
    assert_invariant(al, al.text, (special_token_ids(qwen), special_token_ids(llama)))
    assert len(al.pairs) >= 20

    for tok, ids, shared_offs, pick in (
        (qwen, al.ids_a, al.offsets_a, 0),
        (llama, al.ids_b, al.offsets_b, 1),
    ):
        rendered = render_chat(CHAT, tok)
        enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == enc["input_ids"]  # the ids to run the model on are the rendered ones
        content = _content_spans(rendered)
        for pair in al.pairs:
            k = pair[pick]
            s, e = enc["offset_mapping"][k]
            ms, me = shared_offs[k]
            # Template tokens are never paired: the token lies inside one message's content
            # (or only whitespace sticks out, when allowed) ...
            inside = [(r0, r1) for r0, r1 in content if max(s, r0) < min(e, r1)]
            assert len(inside) == 1
            r0, r1 = inside[0]
            if not whitespace_overhang:
                assert r0 <= s and e <= r1
            assert rendered[max(s, r0) : min(e, r1)].strip() == rendered[s:e].strip()
            # ... and its mapped span is exactly the content text it covers.
            assert al.text[ms:me] == rendered[max(s, r0) : min(e, r1)]

    if whitespace_overhang:
        assert al.complete  # " How" / ".\n" around the fallback's content become pairable


def test_benchmark_smoke(real_tokenizers):
    llama, qwen = real_tokenizers
    result = benchmark_alignment(alignment_test_corpus()[:20], llama, qwen, repeats=1)
    assert result["walk_tokens_per_s"] > 0 and result["end_to_end_tokens_per_s"] > 0
    assert 0.0 <= result["fully_aligned_frac"] <= 1.0
    assert result["stats"]["sequences"] == 20


def test_a_content_that_also_occurs_in_template_text_is_found_where_the_template_puts_it(real_tokenizers):
    # A default system turn (as Qwen2.5's template adds when the first message is not a system one)
    # holds the very sentence the user writes: the user's tokens must be paired, not the system turn's.
    import copy

    llama, qwen = real_tokenizers
    qwen = copy.deepcopy(qwen)
    qwen.chat_template = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen. "
                          "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}"
                          "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}")
    chat = [{"role": "user", "content": "You are a helpful assistant."}, {"role": "assistant", "content": "user"}]
    al = align_chat(chat, llama, qwen, whitespace_overhang=True)
    rendered = render_chat(chat, qwen)
    user_turn = rendered.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    offsets = qwen(rendered, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [offsets[pair[1]][0] for pair in al.pairs]
    assert starts and min(starts) >= user_turn  # nothing paired inside the system turn
    # the assistant's content "user" is found in its own turn, not in the role name before it
    assistant_turn = rendered.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    assert any(s >= assistant_turn for s in starts)
