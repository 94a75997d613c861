"""Token alignment across two tokenizers, by character offsets.

Model A and model B tokenize the same text differently. To pair their residual activations we
need pairs ``(i, j)`` of token positions that have "read" exactly the same text: the text up to the
end of A's token ``i`` equals the text up to the end of B's token ``j``.

Method (the classic two-pointer window walk, written in terms of offsets):

* A *cut* of one side at char offset ``b`` is clean when every token before the cut ends at or before
  ``b`` and every token after it starts at or after ``b``. Byte-level BPE splits an emoji into several
  tokens that share one (start, end) span, so only the last of them is followed by a clean cut.
* A *boundary* of one side is a clean cut at ``b`` where some content token (not special, not
  whitespace-only, non-empty span) ends at ``b``; its pair token is the last such content token.
* Pairs are the boundaries common to both sides, in order. This is exactly what growing a window
  on each side until both windows end at the same character produces, but it needs one pass per
  side plus a sorted-list intersection, so it runs in linear time on plain lists of ints.

Offsets are compared instead of decoded strings, so multi-byte characters and leading spaces
inside token spans need no special cases: only end offsets matter. One repair is needed for NFC
normalisation (Qwen), see `repair_offsets`.

Inherent limit: when one tokenizer merges trailing whitespace into the final content token
("—\\n") and the other splits it off ("—", "\\n" whitespace-only, never paired), the final token
cannot be paired; the result is then incomplete with cut_reason
"final token merges trailing whitespace on one side ...". Mid-text, such spots are just merged.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Alignment",
    "align_chat",
    "align_encodings",
    "align_text",
    "align_token_spans",
    "alignment_stats",
    "content_mask",
    "render_chat",
    "repair_offsets",
    "special_token_ids",
]

Span = tuple[int, int]


@dataclass
class Alignment:
    """Result of aligning two tokenizations of one text.

    pairs:      list of (i, j): token index in A's and in B's token sequence, strictly increasing in
                both; the text up to the end of A's token i equals the text up to the end of B's token j.
    merged:     per pair, True when the window closed by this pair held more than one content token
                on either side (i.e. not a 1:1 token match).
    ends:       per pair, the shared char offset where both paired tokens end.
    complete:   True when the last content token of each side is paired (nothing was cut).
    cut_reason: None, or why alignment stopped early, e.g. "no common boundary after char 123: 'ab'".
    n_tokens_a, n_tokens_b: token counts of the two sequences (all tokens, content or not).
    ids_a, ids_b: token ids of each side when known (align_text / align_chat fill them).
    text:       the string the offsets index into (the shared content string for align_chat).
    """

    pairs: list[tuple[int, int]]
    merged: list[bool]
    ends: list[int]
    complete: bool
    cut_reason: str | None
    n_tokens_a: int
    n_tokens_b: int
    ids_a: list[int] | None = None
    ids_b: list[int] | None = None
    text: str | None = None
    offsets_a: list[Span] | None = field(default=None, repr=False)
    offsets_b: list[Span] | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------------------------
# Core walk (pure Python over lists of ints)


def _side_boundaries(
    offsets: Sequence[Span], content: Sequence[bool]
) -> tuple[list[int], list[int], list[int], int, int]:
    """Boundaries of one side, in one forward pass.

    Returns three parallel lists (one entry per boundary, strictly increasing char offset):
    the boundary char offset, the index of the last content token ending there, and the number of
    content tokens up to and including the cut (to tell 1:1 matches from merged windows); then the
    total number of content tokens and the max end offset.

    A boundary pushed after token i is retracted when a later token starts before it (overlapping
    spans, e.g. byte pieces of one emoji); boundaries are increasing, so retraction pops a suffix
    of the stack and the pass stays linear.
    """
    bounds: list[int] = []
    idx: list[int] = []
    counts: list[int] = []
    top = -1  # bounds[-1], or -1 when empty
    cover = -1  # max end offset seen so far (cumulative coverage)
    cand = -1  # last content token ending at `cover`, or -1
    n_content = 0
    i = -1
    for s, e in offsets:
        i += 1
        if e <= s:  # empty span (e.g. an added special token): covers no text, never paired
            continue
        if s < top:  # this token reaches back over earlier cuts: they were not clean
            while bounds and bounds[-1] > s:
                bounds.pop()
                idx.pop()
                counts.pop()
            top = bounds[-1] if bounds else -1
        is_content = content[i]
        if is_content:
            n_content += 1
        if e > cover:
            cover = e
            cand = i if is_content else -1
        elif e == cover and is_content:
            cand = i
        if cand >= 0:
            # After the retraction above, top < cover always holds, so this never duplicates.
            bounds.append(cover)
            idx.append(cand)
            counts.append(n_content)
            top = cover
    return bounds, idx, counts, n_content, cover


def align_token_spans(
    offsets_a: Sequence[Span],
    offsets_b: Sequence[Span],
    content_a: Sequence[bool],
    content_b: Sequence[bool],
    text_len: int | None = None,
    *,
    text: str | None = None,
) -> Alignment:
    """Align two token sequences given their char spans in one shared coordinate string.

    offsets_a, offsets_b: per token (start, end) char offsets, len n_a / n_b. Tokens with an empty
        span are ignored. Tokens outside the shared text (chat template markers) should have an
        empty span and content False.
    content_a, content_b: per token bool, True for tokens that may be paired (not special, not a
        template token, not whitespace-only).
    text_len: length of the shared string; only used to validate offsets (may be None).
    text: the shared string itself, optional; used for the cut_reason snippet.
    """
    if len(offsets_a) != len(content_a) or len(offsets_b) != len(content_b):
        raise ValueError("offsets and content masks must have the same length per side")
    if text_len is None and text is not None:
        text_len = len(text)
    bounds_a, idx_a, cnt_a, total_a, cover_a = _side_boundaries(offsets_a, content_a)
    bounds_b, idx_b, cnt_b, total_b, cover_b = _side_boundaries(offsets_b, content_b)
    if text_len is not None and max(cover_a, cover_b) > text_len:
        raise ValueError(f"token offset {max(cover_a, cover_b)} beyond text length {text_len}")

    # Intersect the two increasing boundary lists.
    pairs: list[tuple[int, int]] = []
    merged: list[bool] = []
    ends: list[int] = []
    prev_a = prev_b = 0  # content-token counts at the previous pair
    ka = kb = 0
    la, lb = len(bounds_a), len(bounds_b)
    while ka < la and kb < lb:
        ba = bounds_a[ka]
        bb = bounds_b[kb]
        if ba == bb:
            ca = cnt_a[ka]
            cb = cnt_b[kb]
            pairs.append((idx_a[ka], idx_b[kb]))
            merged.append(ca - prev_a > 1 or cb - prev_b > 1)
            ends.append(ba)
            prev_a, prev_b = ca, cb
            ka += 1
            kb += 1
        elif ba < bb:
            ka += 1
        else:
            kb += 1

    # Complete = no content token of either side lies after the last pair.
    complete = prev_a == total_a and prev_b == total_b
    cut_reason = None
    if not complete:
        at = ends[-1] if ends else 0
        snippet = f": {text[at : at + 24]!r}" if text is not None else ""
        cut_reason = f"{_cut_kind(bounds_a, bounds_b, text)} after char {at}{snippet}"
    return Alignment(
        pairs=pairs,
        merged=merged,
        ends=ends,
        complete=complete,
        cut_reason=cut_reason,
        n_tokens_a=len(offsets_a),
        n_tokens_b=len(offsets_b),
        text=text,
        offsets_a=list(offsets_a),
        offsets_b=list(offsets_b),
    )


def _cut_kind(bounds_a: list[int], bounds_b: list[int], text: str | None) -> str:
    """Name why the tail is unpaired.

    The common benign case: one tokenizer merges trailing whitespace into the final content token
    ("—\\n") while the other splits it off ("—", "\\n"); the split-off token is whitespace-only, so
    the two sides' last content tokens end at different chars and can never be paired.
    """
    if bounds_a and bounds_b and text is not None:
        lo, hi = sorted((bounds_a[-1], bounds_b[-1]))
        if lo < hi and text[lo:hi].isspace():
            return "final token merges trailing whitespace on one side"
    return "no common boundary"


# --------------------------------------------------------------------------------------------------
# Tokenizer helpers

_SPECIAL_CACHE: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of special tokens: declared specials plus added tokens flagged special (cached per object).

    A tokenizer loaded from tokenizer.json alone has no bos/eos set, so `all_special_ids` may be
    empty; `added_tokens_decoder` still knows which added tokens are special.
    """
    try:
        return _SPECIAL_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    added_tokens = getattr(tokenizer, "added_tokens_decoder", None)
    if added_tokens is None and hasattr(tokenizer, "get_added_tokens_decoder"):
        added_tokens = tokenizer.get_added_tokens_decoder()  # raw tokenizers.Tokenizer
    for tok_id, added in (added_tokens or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tok_id))
    result = frozenset(ids)
    with contextlib.suppress(TypeError):  # not weak-referenceable: just skip the cache
        _SPECIAL_CACHE[tokenizer] = result
    return result


def content_mask(
    text: str, offsets: Sequence[Span], ids: Sequence[int] | None = None, special: Iterable[int] = ()
) -> list[bool]:
    """Per token: True unless special, empty span, or whitespace-only text.

    special: either a set of special token ids (needs `ids`), or nothing.
    """
    special = special if isinstance(special, (set, frozenset)) else frozenset(special)
    if ids is None or not special:
        return [e > s and not text[s:e].isspace() for s, e in offsets]
    return [
        e > s and t not in special and not text[s:e].isspace() for (s, e), t in zip(offsets, ids, strict=True)
    ]


def repair_offsets(text: str, offsets: Sequence[Span]) -> list[Span]:
    """Extend token ends over text no token covers, when that text is not whitespace.

    Why: with an NFC normalizer (Qwen) the token for a composed "é" written as "e" + U+0301 gets the
    span of the "e" only, so the combining mark belongs to no token although the model has read it.
    Left alone, a text ending in such a mark could never be fully aligned. Whitespace gaps (trimmed
    offsets) are left alone: they do not change where content ends. Returns a new list.
    """
    out = list(offsets)
    cover = 0  # max end so far
    last: list[int] = []  # tokens ending at `cover`
    for i, (s, e) in enumerate(out):
        if e <= s:
            continue
        if s > cover and last and not text[cover:s].isspace():
            for j in last:
                out[j] = (out[j][0], s)
            cover = s
        if e > cover:
            cover = e
            last = [i]
        elif e == cover:
            last.append(i)
    if cover < len(text) and last and not text[cover:].isspace():
        for j in last:
            out[j] = (out[j][0], len(text))
    return out


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[Span]]:
    """Token ids and char offsets of `text`, without added special tokens (BOS etc.).

    Accepts an HF fast tokenizer or a raw `tokenizers.Tokenizer`. Calls the Rust backend directly
    when there is one: same result as `tokenizer(text, return_offsets_mapping=True)`, ~1.5x faster.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "get_added_tokens_decoder"):
        backend = tokenizer  # a raw tokenizers.Tokenizer
    if backend is not None:
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens, exactly as the aligners tokenize it."""
    return list(_encode(tokenizer, text)[0])


def align_encodings(
    text: str,
    offsets_a: Sequence[Span],
    offsets_b: Sequence[Span],
    ids_a: Sequence[int] | None = None,
    ids_b: Sequence[int] | None = None,
    special_a: Iterable[int] = (),
    special_b: Iterable[int] = (),
) -> Alignment:
    """Align two existing encodings of the same `text` (offsets from `return_offsets_mapping=True`).

    special_a / special_b: special token ids of each tokenizer (tokens with these ids are never
    paired, even when a literal like "<|im_end|>" in the text was encoded as one).
    Offsets are passed through `repair_offsets` first.
    """
    offsets_a = repair_offsets(text, offsets_a)
    offsets_b = repair_offsets(text, offsets_b)
    ca = content_mask(text, offsets_a, ids_a, special_a)
    cb = content_mask(text, offsets_b, ids_b, special_b)
    al = align_token_spans(offsets_a, offsets_b, ca, cb, len(text), text=text)
    al.ids_a = list(ids_a) if ids_a is not None else None
    al.ids_b = list(ids_b) if ids_b is not None else None
    return al


def align_text(text: str, tokenizer_a: Any, tokenizer_b: Any) -> Alignment:
    """Tokenize `text` with both HF fast tokenizers (add_special_tokens=False) and align.

    Indices in `pairs` refer to these special-token-free sequences; a caller that prepends BOS when
    running the model must shift its indices by one.
    """
    ids_a, offs_a = _encode(tokenizer_a, text)
    ids_b, offs_b = _encode(tokenizer_b, text)
    return align_encodings(
        text, offs_a, offs_b, ids_a, ids_b, special_token_ids(tokenizer_a), special_token_ids(tokenizer_b)
    )


# --------------------------------------------------------------------------------------------------
# Chat conversations


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template, without tokenizing.

    Fallback when the tokenizer has no chat template: one "<role>: <content>\\n" block per message
    (and "assistant:" when ``add_generation_prompt``).
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    rendered = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return rendered + "assistant:" if add_generation_prompt else rendered


def _marker(i: int) -> str:
    """A stand-in for message ``i``'s content that no template alters and no text contains (Unicode
    private-use characters around the number)."""
    return f"\ue000{i}\ue001"


def _template_pieces(skeleton: str, n: int) -> list[str] | None:
    """The template text around each content, from a rendering with :func:`_marker` contents: ``n + 1``
    pieces (before the first content, between contents, after the last); None when a marker is
    missing, repeated or out of order (a template that branches on the content itself)."""
    pieces, pos = [], 0
    for i in range(n):
        marker = _marker(i)
        at = skeleton.find(marker, pos)
        if at < 0 or skeleton.find(marker, at + 1) >= 0:
            return None
        pieces.append(skeleton[pos:at])
        pos = at + len(marker)
    pieces.append(skeleton[pos:])
    return pieces


def _locate_contents(rendered: str, contents: Sequence[str],
                     pieces: Sequence[str] | None = None) -> list[tuple[int, int, int]]:
    """Where each message content lies in `rendered`.

    With the template's own ``pieces`` (:func:`_template_pieces`), content i is looked for right where
    the template puts it, after the template text before it, so a content that also occurs in template
    text (a default system prompt, a role name) is never found there. Without them, or when the
    rendering does not follow them, each content is searched forward from the previous one.

    Returns per message (render_start, render_end, offset_in_content): templates may strip the
    content, in which case the stripped text is located and `offset_in_content` says where it
    starts inside the original content.
    """
    def variants(content: str) -> list[str]:
        return [v for v in dict.fromkeys((content, content.strip(), content.strip("\n"), content.lstrip("\n"))) if v]

    if pieces is not None and len(pieces) == len(contents) + 1:
        found, pos = [], 0
        for content, before, after in zip(contents, pieces[:-1], pieces[1:], strict=True):
            if not rendered.startswith(before, pos):
                break
            start = pos + len(before)
            # the variant the template rendered is the one its next piece follows
            match = next((v for v in variants(content) if rendered.startswith(v, start)
                          and rendered.startswith(after, start + len(v))), None)
            if match is None and content.strip():
                break
            end = start + len(match) if match else start
            found.append((start, end, content.find(match) if match else 0))
            pos = end
        else:
            if rendered.startswith(pieces[-1], pos) and pos + len(pieces[-1]) == len(rendered):
                return found
    found = []
    pos = 0
    for content in contents:
        for variant in variants(content):
            at = rendered.find(variant, pos)
            if at >= 0:
                found.append((at, at + len(variant), content.find(variant)))
                pos = at + len(variant)
                break
        else:  # empty content, or rendered beyond recognition: nothing of it is content
            found.append((pos, pos, 0))
    return found


def _to_shared(
    rendered: str,
    offsets: Sequence[Span],
    ids: Sequence[int],
    segments: Sequence[tuple[int, int, int]],
    seg_starts_shared: Sequence[int],
    special: frozenset[int],
    whitespace_overhang: bool = False,
) -> tuple[list[Span], list[bool]]:
    """Map rendered-string token spans to shared content coordinates, with a content mask.

    Tokens wholly inside one message's content are mapped and may be content. Tokens straddling a
    content edge are clipped to the overlap and are not content (their activation mixes template
    and content), unless `whitespace_overhang` and the part outside the content is whitespace only.
    Tokens outside any content get an empty span (they cover no shared text).
    """
    shared: list[Span] = []
    content: list[bool] = []
    k = 0
    n_seg = len(segments)
    for (s, e), t in zip(offsets, ids, strict=True):
        while k < n_seg and segments[k][1] <= s:
            k += 1  # segments ending at or before this token's start cannot overlap it
        span: Span = (0, 0)
        is_content = False
        # A straddling token may overlap the segment k and following ones; clip to the first overlap.
        for m in range(k, n_seg):
            r0, r1, off = segments[m]
            if r0 >= e:
                break
            lo, hi = max(s, r0), min(e, r1)
            if lo < hi:
                base = seg_starts_shared[m] + off - r0
                span = (lo + base, hi + base)
                inside = s >= r0 and e <= r1
                if not inside and whitespace_overhang:
                    inside = (s >= r0 or rendered[s:r0].isspace()) and (e <= r1 or rendered[r1:e].isspace())
                is_content = inside and t not in special and not rendered[lo:hi].isspace()
                break
        shared.append(span)
        content.append(is_content)
    return shared, content


def align_chat(
    messages: Sequence[dict[str, str]],
    tokenizer_a: Any,
    tokenizer_b: Any,
    *,
    whitespace_overhang: bool = False,
    add_generation_prompt: bool = False,
) -> Alignment:
    """Align a conversation rendered by each tokenizer's own chat template.

    messages: list of {"role": ..., "content": ...}.
    The shared coordinate string is the message contents joined with "\\n" (Alignment.text; offsets
    and `ends` index into it). Each side's rendered string is tokenized with
    add_special_tokens=False; Alignment.ids_a / ids_b are exactly those ids (run the models on
    them), and pairs index into them. Template tokens (role headers, markers) are never paired;
    neither are tokens straddling a content edge, e.g. " How" in the fallback "user: How", or "?\\n"
    at a message end -- unless whitespace_overhang=True and the part outside the content is
    whitespace only (then the token is clipped to the content and may be paired).
    """
    contents = [m["content"] for m in messages]
    shared_text = "\n".join(contents)
    seg_starts = []
    pos = 0
    for c in contents:
        seg_starts.append(pos)
        pos += len(c) + 1

    sides = []
    for tok in (tokenizer_a, tokenizer_b):
        rendered = render_chat(messages, tok, add_generation_prompt)
        ids, offs = _encode(tok, rendered)
        offs = repair_offsets(rendered, offs)
        skeleton = render_chat([{**m, "content": _marker(i)} for i, m in enumerate(messages)], tok,
                               add_generation_prompt)
        segments = _locate_contents(rendered, contents, _template_pieces(skeleton, len(contents)))
        shared, content = _to_shared(
            rendered, offs, ids, segments, seg_starts, special_token_ids(tok), whitespace_overhang
        )
        sides.append((ids, shared, content))
    (ids_a, offs_a, ca), (ids_b, offs_b, cb) = sides
    al = align_token_spans(offs_a, offs_b, ca, cb, len(shared_text), text=shared_text)
    al.ids_a, al.ids_b = ids_a, ids_b
    return al


# --------------------------------------------------------------------------------------------------
# Aggregates


def alignment_stats(alignments: Iterable[Alignment]) -> dict[str, Any]:
    """Aggregate counts over many alignments (per-token rates are pairs / tokens of that side)."""
    n = full = pairs = tok_a = tok_b = merged = 0
    reasons: Counter[str] = Counter()
    for al in alignments:
        n += 1
        full += al.complete
        pairs += len(al.pairs)
        tok_a += al.n_tokens_a
        tok_b += al.n_tokens_b
        merged += sum(al.merged)
        if al.cut_reason:
            # Group by reason kind, not by char offset / snippet.
            reasons[al.cut_reason.split(" after char")[0]] += 1
    return {
        "sequences": n,
        "fully_aligned": full,
        "fully_aligned_frac": full / n if n else 0.0,
        "pairs": pairs,
        "tokens_a": tok_a,
        "tokens_b": tok_b,
        "pairs_per_token_a": pairs / tok_a if tok_a else 0.0,
        "pairs_per_token_b": pairs / tok_b if tok_b else 0.0,
        "merged_frac": merged / pairs if pairs else 0.0,
        "cut_reasons": reasons,
    }
