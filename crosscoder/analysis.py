"""Analyse flagged features on harvested data (METHOD §5, §7): statistics, contexts, triage.

For every flagged feature (a DFC exclusive partition, or the top of the relative-norm ranking for
other architectures) one streaming pass over the activation store measures firing frequency,
``s_max``, the exclusivity check (variance each model's activations owe to the feature) and where
the feature's activation mass falls: on the generation-prompt pair of open chats (``template``),
on pairs whose tokens were merged across tokenizers (``merged``), on chats at all (``in_chat``).
A second, small pass renders the top contexts in the feature's own model's tokens with every active
token marked ``<<like this>>``.

Triage: cross-architecture diffs are full of features that encode format and tokenizer
differences rather than content. A feature is flagged as a likely artefact when most of its mass
sits on merged windows, when it fires on most generation prompts regardless of the question (a
format feature, not a topic one), when its firings concentrate on one whitespace/punctuation or
special token, or on the first tokens of sequences. Content features are ranked first, by how
much of their own model's variance they explain.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .metrics import _MomentSums, classify_exclusive
from .model import Crosscoder
from .store import ActivationStore

ARTEFACT_MERGED_SHARE = 0.5
ARTEFACT_MERGED_DIFFUSE = 0.25  # ... and no single token carries this share of its firings
ARTEFACT_TEMPLATE_COVERAGE = 0.5
ARTEFACT_TOKEN_SHARE = 0.6
ARTEFACT_START_SHARE = 0.5
_FORMAT_TOKEN = re.compile(r"^[\s\W_]*$")


@dataclass
class Context:
    doc: int
    position: int  # token position in the feature's own model's sequence
    activation: float
    text: str  # window in the own model's tokens, active tokens marked <<like this>>


@dataclass
class FeatureAnalysis:
    feature: int
    partition: str  # "a" | "b" | "shared"
    own_model: str  # "a" | "b": the model whose tokens and unembedding describe it
    frequency: float
    s_max: float
    mean_activation: float  # over the pairs where it fires
    # |s_max · d_j| in the own model's raw scale: how far steering at α = 1 moves its activations
    push_norm: float
    relative_norm: float
    r2_own: float
    r2_other: float
    exclusivity: float  # r2_other / r2_own: near 0 truly exclusive, near 1 shared
    template_share: float  # share of activation mass on generation-prompt pairs
    template_coverage: float  # share of all generation-prompt pairs on which it fires
    chat_share: float
    merged_share: float
    start_share: float  # share of mass on the first two tokens of a sequence
    top_token_share: float  # share of firings on its most frequent token
    top_tokens: list[tuple[str, int]] = field(default_factory=list)  # most frequent active tokens
    promoted_tokens: list[str] = field(default_factory=list)  # its decoder through the unembedding
    contexts: list[Context] = field(default_factory=list)
    negative_contexts: list[Context] = field(default_factory=list)  # random pairs where it does not fire
    artefact_reasons: list[str] = field(default_factory=list)
    rank: int = 0
    top_token_is_format: bool = False  # its most frequent token is whitespace, punctuation or a special token

    @property
    def is_artefact(self) -> bool:
        return bool(self.artefact_reasons)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["is_artefact"] = self.is_artefact
        return out


def flagged_features(model: Crosscoder, top_n: int = 50, relative_norm_cut: float = 0.9) -> dict[str, list[int]]:
    """Features to screen: DFC exclusive partitions; otherwise the ``top_n`` most one-sided
    features per model by relative decoder norm (beyond ``relative_norm_cut``)."""
    if model.config.architecture == "dfc":
        return {"a": model.index_a.tolist(), "b": model.index_b.tolist()}
    is_a, is_b = classify_exclusive(model, relative_norm_cut)
    r = model.relative_norm().detach().cpu()
    ids_a = [int(i) for i in torch.argsort(r, descending=True) if is_a[i]][:top_n]
    ids_b = [int(i) for i in torch.argsort(r) if is_b[i]][:top_n]
    return {"a": ids_a, "b": ids_b}


def unembedding(model: torch.nn.Module) -> Tensor:
    """``[V, d]`` map from a residual direction to logits: the LM head times the final norm's gain."""
    head = model.get_output_embeddings().weight.detach().float()
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    gain = getattr(norm, "weight", None)
    return head * gain.detach().float() if gain is not None else head


def promoted_tokens(direction: Tensor, unembed_vd: Tensor, tokenizer, n: int = 10) -> list[str]:
    logits = unembed_vd.float() @ direction.float().to(unembed_vd.device)
    return [_token_text(tokenizer, int(i)) for i in torch.topk(logits, n).indices]


@torch.no_grad()
def onset_activations(model: Crosscoder, loaded: dict, prompts: list[str]) -> Tensor:
    """``[len(prompts), D]``: each feature's activation where both models are about to answer.

    Each prompt is asked as a one-turn chat in each model's own template with the assistant turn
    opened (``loaded`` maps "a"/"b" to ``LoadedModel``s at the crosscoder's layers); the two last
    positions, the generation-prompt pair the harvest also aligns, are encoded together. A planted
    behaviour is what a model is about to say, so this is where its feature should fire on the
    behaviour's trigger questions and stay quiet on look-alike questions.
    """
    from .models import capture_block_output, render_prompt

    if not prompts:
        return torch.zeros(0, model.config.dict_size)
    device = model.W_enc_AD.device
    last = {}
    for side in ("a", "b"):
        lm = loaded[side]
        rows = []
        for prompt in prompts:  # one at a time: no padding to get wrong, and prompt sets are small
            ids = render_prompt(lm.tokenizer, [{"role": "user", "content": prompt}])
            rows.append(capture_block_output(lm, torch.tensor([ids]))[0, -1].float())
        last[side] = torch.stack(rows).to(device)
    x_a, x_b = model.normalise(last["a"], last["b"])
    return torch.relu(model.pre_activations(x_a, x_b)).cpu()


def is_format_token(raw: str) -> bool:
    """Whitespace, punctuation or a special token such as ``<|im_start|>`` (from its decoded text)."""
    return bool(_FORMAT_TOKEN.match(raw)) or bool(re.fullmatch(r"<\|?[^<>\s]*\|?>", raw.strip()))


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    return text if text.strip() else repr(text)


class _TopContexts:
    """The ``k`` largest activations of each feature and where they were, kept as tensors: one
    ``topk`` per batch instead of a Python step per firing (100 M pairs × k firings at paper scale)."""

    def __init__(self, k: int, n_features: int):
        self.k = k
        self.values = torch.full((0, n_features), -math.inf)
        self.where = torch.zeros((0, n_features, 3), dtype=torch.long)  # doc, own position, position in A

    def add(self, f: Tensor, doc: Tensor, own_pos: Tensor, pos_a: Tensor) -> None:
        # A batch's candidates by topk (a full sort of [batch, n_f] costs seconds per batch with
        # thousands of features); the merge is a stable sort, so among equal activations (the same
        # question in several documents) what an earlier batch kept stays.
        values, rows = f.topk(min(self.k, f.shape[0]), dim=0)  # [take, n_f]
        values = values.masked_fill(values <= 0, -math.inf)  # only firings count
        where = torch.stack([doc[rows], own_pos.gather(0, rows), pos_a[rows]], dim=-1)
        values = torch.cat([self.values, values])
        where = torch.cat([self.where, where])
        values, order = torch.sort(values, dim=0, descending=True, stable=True)
        self.values, order = values[: self.k], order[: self.k]
        self.where = where.gather(0, order[..., None].expand(-1, -1, 3))

    def per_feature(self) -> list[list[tuple[float, int, int, int]]]:
        """Per feature slot: ``(activation, doc, own position, position in A)``, largest first (ties:
        larger document and position first)."""
        out = []
        for slot in range(self.values.shape[1]):
            fired = torch.isfinite(self.values[:, slot])
            items = [(float(v), *map(int, w)) for v, w in zip(self.values[fired, slot], self.where[fired, slot],
                                                                 strict=True)]
            out.append(sorted(items, reverse=True))
        return out


class _TokenCounts:
    """Firings per (feature slot, token id), accumulated with ``torch.unique`` per batch."""

    def __init__(self, n_features: int, merge_every: int = 64):
        self.n_features = n_features
        self.merge_every = merge_every
        self.keys = torch.zeros(0, dtype=torch.long)
        self.counts = torch.zeros(0, dtype=torch.long)
        self.pending: list[tuple[Tensor, Tensor]] = []  # per batch, merged every ``merge_every`` batches

    def add(self, slots: Tensor, token_ids: Tensor) -> None:
        known = token_ids >= 0
        keys = token_ids[known].long() * self.n_features + slots[known].long()
        if keys.numel() == 0:
            return
        self.pending.append(torch.unique(keys, return_counts=True))
        if len(self.pending) >= self.merge_every:
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        keys = torch.cat([self.keys, *(k for k, _ in self.pending)])
        counts = torch.cat([self.counts, *(c for _, c in self.pending)])
        self.pending = []
        self.keys, inverse = torch.unique(keys, return_inverse=True)
        self.counts = torch.zeros_like(self.keys).scatter_add_(0, inverse, counts)

    def per_feature(self) -> list[dict[int, int]]:
        self.merge()
        out: list[dict[int, int]] = [{} for _ in range(self.n_features)]
        for key, count in zip(self.keys.tolist(), self.counts.tolist(), strict=True):
            out[key % self.n_features][key // self.n_features] = count
        return out


def _row_tokens(store: ActivationStore, shard_index: int, doc: Tensor, pos_a: Tensor,
                pos_b: Tensor) -> tuple[Tensor, Tensor]:
    """Each pair's token id in model A and in model B (−1 where the document has no such position)."""
    numbers, starts_a, starts_b, flat_a, flat_b = [], [0], [0], [], []
    for record in store.shard_documents(shard_index):
        numbers.append(record["doc"])
        flat_a += record["ids_a"]
        flat_b += record["ids_b"]
        starts_a.append(len(flat_a))
        starts_b.append(len(flat_b))
    if not numbers:
        return torch.full_like(doc, -1, dtype=torch.long), torch.full_like(doc, -1, dtype=torch.long)
    numbers_t = torch.tensor(numbers, dtype=torch.long)
    order = torch.argsort(numbers_t)
    local = order[torch.searchsorted(numbers_t[order], doc.long()).clamp_max(len(numbers) - 1)]

    def lookup(flat: list[int], starts: list[int], pos: Tensor) -> Tensor:
        flat_t = torch.tensor(flat + [-1], dtype=torch.long)
        starts_t = torch.tensor(starts, dtype=torch.long)
        begin, end = starts_t[local], starts_t[local + 1]
        at = begin + pos.long()
        inside = (pos >= 0) & (at < end) & (numbers_t[local] == doc.long())
        return torch.where(inside, flat_t[at.clamp(0, len(flat))], torch.full_like(at, -1))

    return lookup(flat_a, starts_a, pos_a), lookup(flat_b, starts_b, pos_b)


@torch.no_grad()
def analyse_features(
    model: Crosscoder,
    store: ActivationStore,
    features: dict[str, list[int]],
    tokenizers: dict[str, object],
    unembeddings: dict[str, Tensor] | None = None,
    n_contexts: int = 20,
    n_negative: int = 5,
    window_before: int = 24,
    window_after: int = 4,
    batch_size: int = 4096,
    progress=None,
) -> list[FeatureAnalysis]:
    """Measure and render every feature in ``features`` (``{"a": ids, "b": ids, "shared": ids}``).

    ``tokenizers`` maps "a"/"b" to each model's tokenizer; ``unembeddings`` (optional) maps them to
    ``[V, d]`` matrices (``unembedding(model)``) for the promoted tokens. ``n_negative`` random
    contexts where a feature does not fire are kept for the detection score. Returns the analyses
    in triage order (content features first).
    """
    own_of: dict[int, str] = {}
    partition_of: dict[int, str] = {}
    for partition, ids in features.items():
        for fid in ids:
            partition_of[int(fid)] = partition
            own_of[int(fid)] = partition if partition in ("a", "b") else "a"
    ids = sorted(partition_of)
    if not ids:
        return []
    device = model.W_enc_AD.device
    index = torch.tensor(ids)
    n_f = len(ids)
    fired = torch.zeros(n_f, dtype=torch.float64)
    mass = torch.zeros(n_f, dtype=torch.float64)
    mass_template = torch.zeros(n_f, dtype=torch.float64)
    mass_chat = torch.zeros(n_f, dtype=torch.float64)
    mass_merged = torch.zeros(n_f, dtype=torch.float64)
    mass_start = torch.zeros(n_f, dtype=torch.float64)
    fired_template = torch.zeros(n_f, dtype=torch.float64)
    s_max = torch.zeros(n_f)
    n_template = 0
    n_pairs = 0
    sums = _MomentSums(n_f, model.config.d_a, model.config.d_b)  # flagged features only
    own_is_a = torch.tensor([own_of[fid] == "a" for fid in ids])
    top = _TopContexts(n_contexts, n_f)
    token_counts = _TokenCounts(n_f)  # firings per (feature slot, own-model token id)
    generator = torch.Generator().manual_seed(0)
    negatives: list[tuple[int, int, int, Tensor]] = []  # (doc, pos_a, pos_b, active [n_f]) of random pairs
    keys = ("a", "b", "doc", "pos_a", "pos_b", "merged", "in_chat", "template")
    shard_count = store.n_shards
    for shard_index in range(shard_count):
        shard = store.load_shard(shard_index, keys)
        token_a, token_b = _row_tokens(store, shard_index, shard["doc"], shard["pos_a"], shard["pos_b"])
        for start in range(0, shard["a"].shape[0], batch_size):
            rows = slice(start, start + batch_size)
            xa = shard["a"][rows].to(device, torch.float32)
            xb = shard["b"][rows].to(device, torch.float32)
            f = model.encode(xa, xb).float()[:, index.to(device)].cpu()  # [n, n_f]
            na, nb = model.normalise(xa, xb)
            sums.add(f, na.float().cpu(), nb.float().cpu())
            active = f > 0
            template = shard["template"][rows].bool()
            chat = shard["in_chat"][rows].bool()
            merged = shard["merged"][rows].bool()
            pos_a = shard["pos_a"][rows].long()
            pos_b = shard["pos_b"][rows].long()
            doc = shard["doc"][rows].long()
            is_start = torch.minimum(pos_a, pos_b) <= 1
            fired += active.sum(0).double()
            mass += f.sum(0).double()
            mass_template += f[template].sum(0).double()
            mass_chat += f[chat].sum(0).double()
            # A generation-prompt pair may close a merged window too; it is counted as a template pair.
            mass_merged += f[merged & ~template].sum(0).double()
            mass_start += f[is_start].sum(0).double()
            fired_template += active[template].sum(0).double()
            s_max = torch.maximum(s_max, f.max(0).values)
            n_template += int(template.sum())
            n_pairs += f.shape[0]
            for r in torch.randperm(f.shape[0], generator=generator)[: max(4 * n_negative, 8)].tolist():
                negatives.append((int(doc[r]), int(pos_a[r]), int(pos_b[r]), active[r].clone()))
            own_pos = torch.where(own_is_a[None, :], pos_a[:, None], pos_b[:, None])  # [n, n_f]
            top.add(f, doc, own_pos, pos_a)
            rows_nz, cols_nz = torch.nonzero(active, as_tuple=True)
            own_token = torch.where(own_is_a[cols_nz], token_a[rows][rows_nz], token_b[rows][rows_nz])
            token_counts.add(cols_nz, own_token)
        if progress is not None:
            progress(shard_index + 1, shard_count)
    r2_a, r2_b = sums.r2()
    relative = model.relative_norm().detach().cpu()

    # Second pass over documents: tokens of the top contexts and of every firing (token stats).
    order = torch.randperm(len(negatives), generator=generator).tolist()
    negative_rows: list[list[tuple[int, int]]] = [[] for _ in ids]
    for i in order:
        d, pa, pb, act = negatives[i]
        for slot, fid in enumerate(ids):
            if len(negative_rows[slot]) < n_negative and not bool(act[slot]):
                negative_rows[slot].append((d, pa if own_of[fid] == "a" else pb))
    top_lists = top.per_feature()
    wanted_docs = {d for items in top_lists for (_, d, _, _) in items} | {d for rows in negative_rows for d, _ in rows}
    docs = {rec["doc"]: rec for rec in store.documents() if rec["doc"] in wanted_docs}
    counts_per_slot = token_counts.per_feature()
    active_positions = _active_positions(model, store, index, own_of, ids, wanted_docs, batch_size)

    analyses = []
    for slot, fid in enumerate(ids):
        own = own_of[fid]
        tokenizer = tokenizers[own]
        ids_key = f"ids_{own}"
        counts: dict[str, int] = {}
        raw_of: dict[str, str] = {}
        for token_id, c in counts_per_slot[slot].items():
            text = _token_text(tokenizer, token_id)
            counts[text] = counts.get(text, 0) + c
            raw_of[text] = tokenizer.decode([token_id])
        ranked_tokens = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        total_fired = max(float(fired[slot]), 1.0)
        contexts = []
        for value, d, pos, _ in top_lists[slot]:
            token_ids = docs.get(d, {}).get(ids_key, [])
            marked = active_positions.get((slot, d), {pos})
            contexts.append(Context(doc=d, position=pos, activation=round(value, 4),
                                    text=render_window(tokenizer, token_ids, pos, marked, window_before, window_after)))
        negative_contexts = [
            Context(doc=d, position=pos, activation=0.0,
                    text=render_window(tokenizer, docs.get(d, {}).get(ids_key, []), pos, set(), window_before, window_after))
            for d, pos in negative_rows[slot]
        ]
        total_mass = max(float(mass[slot]), 1e-12)
        r2_own = float(r2_a[slot] if own == "a" else r2_b[slot])
        r2_other = float(r2_b[slot] if own == "a" else r2_a[slot])
        direction = model.decoder_raw(own)[fid].detach().cpu()
        promoted = []
        if unembeddings and own in unembeddings:
            promoted = promoted_tokens(direction, unembeddings[own], tokenizer)
        analysis = FeatureAnalysis(
            feature=fid,
            partition=partition_of[fid],
            own_model=own,
            frequency=float(fired[slot]) / max(n_pairs, 1),
            s_max=float(s_max[slot]),
            mean_activation=float(mass[slot]) / total_fired,
            push_norm=float(s_max[slot]) * float(direction.norm()),
            relative_norm=float(relative[fid]),
            r2_own=r2_own,
            r2_other=r2_other,
            exclusivity=r2_other / r2_own if r2_own > 0 else float("nan"),
            template_share=float(mass_template[slot]) / total_mass,
            template_coverage=float(fired_template[slot]) / max(n_template, 1),
            chat_share=float(mass_chat[slot]) / total_mass,
            merged_share=float(mass_merged[slot]) / total_mass,
            start_share=float(mass_start[slot]) / total_mass,
            top_token_share=(ranked_tokens[0][1] / total_fired) if ranked_tokens else 0.0,
            top_tokens=ranked_tokens[:10],
            promoted_tokens=promoted,
            contexts=contexts,
            negative_contexts=negative_contexts,
        )
        analysis.top_token_is_format = bool(ranked_tokens) and is_format_token(raw_of[ranked_tokens[0][0]])
        analysis.artefact_reasons = artefact_reasons(analysis)
        analyses.append(analysis)
    return triage(analyses)


@torch.no_grad()
def _active_positions(model, store, index, own_of, ids, docs, batch_size) -> dict[tuple[int, int], set[int]]:
    """``{(feature slot, doc): own-model positions where it fires}`` for the documents in ``docs``."""
    out: dict[tuple[int, int], set[int]] = {}
    if not docs:
        return out
    wanted = torch.tensor(sorted(docs))
    device = model.W_enc_AD.device
    own_is_a = torch.tensor([own_of[feature] == "a" for feature in ids], dtype=torch.bool)
    for shard_index in range(store.n_shards):
        shard = store.load_shard(shard_index, ("a", "b", "doc", "pos_a", "pos_b"))
        keep = torch.isin(shard["doc"], wanted)
        if not keep.any():
            continue
        xa, xb = shard["a"][keep], shard["b"][keep]
        doc, pos_a, pos_b = shard["doc"][keep], shard["pos_a"][keep], shard["pos_b"][keep]
        for start in range(0, xa.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            f = model.encode(xa[rows].to(device, torch.float32), xb[rows].to(device, torch.float32))
            f = f[:, index.to(device)].cpu()
            r, c = torch.nonzero(f > 0, as_tuple=True)
            r = r + start
            pos = torch.where(own_is_a[c], pos_a[r], pos_b[r])  # the position in the feature's own model
            for slot, d, p in zip(c.tolist(), doc[r].tolist(), pos.tolist(), strict=True):
                out.setdefault((slot, d), set()).add(p)
    return out


# placeholders for the marks while a window is assembled (private-use characters: never in text)
_OPEN, _CLOSE = "\ue002", "\ue003"


def render_window(tokenizer, token_ids: list[int], position: int, marked: set[int], before: int, after: int) -> str:
    """Tokens ``position-before .. position+after`` as text, tokens in ``marked`` as ``<<token>>``."""
    if not token_ids:
        return ""
    lo, hi = max(0, position - before), min(len(token_ids), position + after + 1)
    parts = []
    for p in range(lo, hi):
        piece = tokenizer.decode([token_ids[p]])
        parts.append(f"{_OPEN}{piece}{_CLOSE}" if p in marked else piece)
    prefix = "…" if lo > 0 else ""
    suffix = "…" if hi < len(token_ids) else ""
    text = "".join(parts)
    # The text's own angle brackets must not read as marks (C++'s "<<", a "<" right before a marked
    # token): those become look-alike guillemets, then the marks are written. A marked token that ends
    # in ">" ("<s>", "->") keeps it: readers take every ">" before a closing ">>" as the token's.
    text = text.replace("<<", "‹‹").replace(">>", "››").replace("<" + _OPEN, "‹" + _OPEN).replace(_CLOSE + ">", _CLOSE + "›")
    return prefix + text.replace(_OPEN, "<<").replace(_CLOSE, ">>") + suffix



def artefact_reasons(a: FeatureAnalysis) -> list[str]:
    """Why a feature probably encodes format or tokenization rather than content (empty: content)."""
    reasons = []
    if a.frequency == 0:
        return ["never fires on the harvested data"]
    # A feature on merged windows is a tokenizer artefact when it fires across many words. When it
    # concentrates on one word it is about that word, which one tokenizer may split precisely because
    # its model never saw it (a topic known to one model only).
    if a.merged_share >= ARTEFACT_MERGED_SHARE and a.top_token_share < ARTEFACT_MERGED_DIFFUSE:
        reasons.append(f"{a.merged_share:.0%} of its activation is on merged multi-token windows, spread over many "
                       "words (tokenizer difference)")
    if a.template_coverage >= ARTEFACT_TEMPLATE_COVERAGE:
        reasons.append(
            f"fires on {a.template_coverage:.0%} of all generation prompts, whatever the question (chat format)"
        )
    if a.top_tokens and a.top_token_share >= ARTEFACT_TOKEN_SHARE and a.top_token_is_format:
        # top tokens are display strings already (whitespace shown as '\\n'): no second repr
        reasons.append(f"{a.top_token_share:.0%} of its firings are on the format token «{a.top_tokens[0][0]}»")
    if a.start_share >= ARTEFACT_START_SHARE:
        reasons.append(f"{a.start_share:.0%} of its activation is on the first tokens of a sequence")
    return reasons


def triage(analyses: list[FeatureAnalysis]) -> list[FeatureAnalysis]:
    """Content features first (by variance explained in their own model), then artefacts, then dead."""

    def key(a: FeatureAnalysis):
        group = 2 if a.frequency == 0 else (1 if a.is_artefact else 0)
        return (group, -a.r2_own, a.feature)

    ordered = sorted(analyses, key=key)
    for rank, a in enumerate(ordered, start=1):
        a.rank = rank
    return ordered
