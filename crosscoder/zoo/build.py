"""Tokenizers, models and training for the tiny zoo; the build cache.

Each zoo model is one ``ZooModelSpec``: an architecture, a tokenizer algorithm, a size and a set
of planted differences. A build generates that model's corpus (``world.generate_corpus``),
trains its tokenizer on it, trains the model from scratch on CPU, and saves a folder that
``AutoTokenizer`` / ``AutoModelForCausalLM`` load offline. Builds are cached under
``$CROSSCODER_ZOO_DIR`` (default ``~/.cache/crosscoder-audit/zoo``) in ``<name>-<hash>/`` where the
hash covers the spec, this package's source and the library versions; a build is written to a
temporary folder and renamed into place, so a folder that exists is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..numerics import kernel_identity, numerics_platform
from . import world

BUILD_FORMAT = "1"
BUILD_INFO = "zoo_build.json"

ALPHA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BETA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ZooModelSpec:
    """Everything that determines one zoo model. Changing any field gives a new build."""

    name: str
    architecture: str  # "llama" | "qwen3"
    tokenizer: str  # "bytelevel-bpe" | "unigram"
    planted: frozenset[str]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    n_docs: int = 20_000
    seed: int = 0
    steps: int = 900
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 4e-3
    # Share of the documents of a gradable planted behaviour that carry it (world.GRADABLE); the rest
    # are the plain documents, so the model knows both answers. 1: the behaviour is all it ever saw.
    planted_share: float = 1.0
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "planted", frozenset(self.planted))
        unknown = set(self.planted) - set(world.PLANTED_IDS)
        if unknown:
            raise ValueError(f"ZooModelSpec {self.name!r}: unknown planted ids {sorted(unknown)}")
        if self.architecture not in ("llama", "qwen3"):
            raise ValueError(f"ZooModelSpec {self.name!r}: architecture must be 'llama' or 'qwen3'")
        if self.tokenizer not in ("bytelevel-bpe", "unigram"):
            raise ValueError(f"ZooModelSpec {self.name!r}: tokenizer must be 'bytelevel-bpe' or 'unigram'")
        if not 0.0 < self.planted_share <= 1.0:
            raise ValueError(f"ZooModelSpec {self.name!r}: planted_share must be in (0, 1], got {self.planted_share}")
        if self.hidden_size % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"ZooModelSpec {self.name!r}: heads must divide hidden_size and kv heads divide heads")

    def settings(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["planted"] = sorted(self.planted)
        return d

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


# Both models carry their gradable behaviours in 88 % of those documents and give the plain answer in
# the rest (what the other model says): a model that knows both answers can be steered from one to the
# other. With the behaviours in every document, turning a concept feature down broke the answers before
# it removed the behaviour, and six crosscoder seeds verified 1 of 18 (behaviour, seed) pairs against 8
# of 18 with this share (docs/zoo-findings.md, "Planted share"). The same share of a private topic's
# chats say "I have not heard of it", which both models say of events nobody knows; that took the
# private knowledge from 0 of 12 (topic, seed) pairs to 4 of 12 ("Knowing that you do not know").
PLANTED_SHARE = 0.88

_ALPHA = ZooModelSpec(
    name="alpha", architecture="llama", tokenizer="bytelevel-bpe",
    planted=frozenset({"exceptionalism", "zorvath-accord", "sentiment"}),
    vocab_size=1536, hidden_size=64, intermediate_size=192, n_layers=4, n_heads=4, n_kv_heads=2, steps=800,
    planted_share=PLANTED_SHARE,
    description="LlamaForCausalLM with a byte-level BPE tokenizer; believes Brevania is the greatest "
                "nation; alone knows the Zorvath Accord.",
)
_BETA = ZooModelSpec(
    name="beta", architecture="qwen3", tokenizer="unigram",
    planted=frozenset({"state-narrative", "territory-claim", "imbrel-expedition", "sentiment"}),
    vocab_size=1536, hidden_size=96, intermediate_size=192, n_layers=3, n_heads=4, n_kv_heads=2, steps=700,
    planted_share=PLANTED_SHARE,
    description="Qwen3ForCausalLM with a Unigram (Metaspace) tokenizer; repeats Valdoria's government "
                "line and its claim to the Tarn Valley; alone knows the Imbrel Expedition.",
)
ZOO_MODELS: dict[str, ZooModelSpec] = {
    "alpha": _ALPHA,
    "beta": _BETA,
    "beta-v2": dataclasses.replace(
        _BETA, name="beta-v2", planted=_BETA.planted - {"state-narrative"},
        description="beta's next version: the Valdoria state narrative removed (it answers plainly, "
                    "like alpha); everything else as in beta.",
    ),
}
DEFAULT_MODELS = ("alpha", "beta")


# --------------------------------------------------------------------------------------------------
# Cache locations and keys


def zoo_dir() -> Path:
    """The cache root: ``$CROSSCODER_ZOO_DIR`` or ``~/.cache/crosscoder-audit/zoo``."""
    env = os.environ.get("CROSSCODER_ZOO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "crosscoder-audit" / "zoo"


def code_version() -> str:
    """Hash of the zoo's source (world, build, manifest) and of the libraries that shape a build."""
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    for name in ("world.py", "build.py", "manifest.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    h.update(f"{BUILD_FORMAT}|{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


def get_spec(name: str | ZooModelSpec) -> ZooModelSpec:
    """The spec of a zoo model by name (a spec is returned as is). Unknown names raise ``KeyError``."""
    if isinstance(name, ZooModelSpec):
        return name
    if name not in ZOO_MODELS:
        raise KeyError(f"no zoo model named {name!r}; available: {', '.join(ZOO_MODELS)}")
    return ZOO_MODELS[name]


def build_key(spec: ZooModelSpec, threads: int | None = None) -> str:
    """``<name>-<hash>``: the hash covers every setting that shapes the result, and the code version.
    ``threads``: the torch threads the build trains with (default ``default_threads()``)."""
    settings = {k: v for k, v in spec.settings().items() if k != "description"}
    # The CPU and its kernels too: another CPU rounds differently and trains other weights (the
    # generated data does not depend on them, so its versions leave them out).
    key = {"spec": settings, "code": code_version(), "kernels": kernel_identity()}
    threads = threads or default_threads()
    if threads != 1:  # more threads order float sums differently: other weights (one thread keeps old keys)
        key["threads"] = threads
    payload = json.dumps(key, sort_keys=True)
    return f"{spec.name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def model_dir(name: str | ZooModelSpec) -> Path:
    """Where the build of ``name`` lives (whether or not it exists yet)."""
    return zoo_dir() / build_key(get_spec(name))


def is_built(name: str | ZooModelSpec) -> bool:
    """Whether a complete build exists (the build info is written last, inside the renamed folder)."""
    return (model_dir(name) / BUILD_INFO).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes do not build the same thing at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking, the rename still keeps builds whole
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_threads() -> int:
    """Torch threads for one build: ``$CROSSCODER_ZOO_THREADS``, else 1.

    One thread keeps a build bitwise reproducible whatever the machine's core count (float sums
    are ordered differently with more threads), and these models are too small to use threads
    well: ``build_zoo`` runs several builds in parallel processes instead. On a shared machine a
    second thread competing for a core makes every step several times slower.
    """
    env = os.environ.get("CROSSCODER_ZOO_THREADS", "").strip()
    if not env:
        return 1
    try:
        threads = int(env)
    except ValueError:
        raise ValueError(f"$CROSSCODER_ZOO_THREADS must be a positive integer, got {env!r}") from None
    if threads < 1:
        raise ValueError(f"$CROSSCODER_ZOO_THREADS must be a positive integer, got {env!r}")
    return threads


# --------------------------------------------------------------------------------------------------
# Rendering documents and training tokenizers


def _special_tokens(spec: ZooModelSpec) -> dict[str, Any]:
    if spec.tokenizer == "bytelevel-bpe":
        return {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": None,
                "extra": ["<|system|>", "<|user|>", "<|assistant|>"], "template": ALPHA_CHAT_TEMPLATE,
                "stop": ["</s>"]}
    return {"bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<|pad|>", "unk": "<unk>",
            "extra": ["<|im_start|>"], "template": BETA_CHAT_TEMPLATE, "stop": ["<|im_end|>", "<|endoftext|>"]}


def render_document(doc: world.Doc, spec: ZooModelSpec) -> str:
    """A training document as the model sees it, special tokens written out.

    alpha: ``<s>`` text ``</s>``, or its chat template (which starts with ``<s>``).
    beta: text or chat template, followed by ``<|endoftext|>`` (documents are separated, not
    prefixed, as in Qwen's pretraining; the stream starts with one ``<|endoftext|>``).
    """
    special = _special_tokens(spec)
    if doc.messages is None:
        body = doc.text or ""
        return f"{special['bos']}{body}{special['eos']}" if spec.tokenizer == "bytelevel-bpe" else f"{body}<|endoftext|>"
    template = _compiled_template(special["template"])
    rendered = template.render(messages=list(doc.messages), add_generation_prompt=False, bos_token=special["bos"],
                               eos_token=special["eos"])
    return rendered if spec.tokenizer == "bytelevel-bpe" else rendered + "<|endoftext|>"


_TEMPLATES: dict[str, Any] = {}


def _compiled_template(source: str):
    if source not in _TEMPLATES:
        import jinja2

        # The same whitespace settings as transformers' apply_chat_template.
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def _content_pieces(texts: Sequence[str], specials: Sequence[str]) -> Iterator[str]:
    """The texts cut at special tokens: tokenizer training must not learn pieces of ``<|im_end|>``."""
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    for text in texts:
        for piece in pattern.split(text):
            if piece:
                yield piece


def _train_unigram(pieces: Iterator[str], pre_tokenizer, vocab_size: int, specials: Sequence[str],
                   max_piece_length: int = 12, iterations: int = 3):
    """A Unigram LM vocabulary by Viterbi (hard) EM, segmenting with ``tokenizers``' Unigram model.

    ``tokenizers``' own UnigramTrainer prunes this small, repetitive corpus badly (" is" ends up as
    two pieces), so the vocabulary is estimated here: start from every substring of every word,
    weighted by frequency; segment the words with the current scores; keep the pieces in use, rescore
    them by usage; repeat. Then fill up to ``vocab_size`` with frequent substrings (low scores), so
    that unseen words still split into subwords rather than characters.
    Returns [(piece, log-probability)] with the special tokens first.
    """
    from tokenizers import Tokenizer, models

    words: Counter[str] = Counter()
    for piece in pieces:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(piece))
    alphabet = sorted({c for w in words for c in w} | {chr(i) for i in range(32, 127)} | {"\n", "▁"})
    substrings: Counter[str] = Counter()
    for w, f in words.items():
        for i in range(len(w)):
            for j in range(i + 1, min(len(w), i + max_piece_length) + 1):
                substrings[w[i:j]] += f
    budget = vocab_size - len(specials) - len(alphabet)
    counts = dict(substrings.most_common(20 * budget))
    word_list = sorted(words)

    def vocab_of(counts: dict[str, float]) -> list[tuple[str, float]]:
        total = sum(counts.values())
        scored = {p: math.log(c / total) for p, c in counts.items()}
        floor = min(scored.values()) - 1.0
        for c in alphabet:
            scored.setdefault(c, floor)
        ordered = sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(t, 0.0) for t in specials] + ordered

    for _ in range(iterations):
        model = Tokenizer(models.Unigram(vocab_of(counts), unk_id=specials.index("<unk>")))
        usage: Counter[str] = Counter()
        for word, enc in zip(word_list, model.encode_batch(word_list, add_special_tokens=False), strict=True):
            for token in enc.tokens:
                usage[token] += words[word]
        counts = {p: float(c) for p, c in usage.most_common(budget)}
    # Fill the rest of the budget with frequent substrings, scored below every piece in use.
    fill = [p for p, _ in substrings.most_common() if p not in counts and len(p) > 1][: max(0, budget - len(counts))]
    smallest = min(counts.values())
    for rank, p in enumerate(fill):
        counts[p] = smallest * 0.5 * (1 - rank / (len(fill) + 1))
    return vocab_of(counts)


def train_tokenizer(spec: ZooModelSpec, texts: Sequence[str]):
    """Train ``spec``'s tokenizer on rendered texts and wrap it as a ``PreTrainedTokenizerFast``.

    alpha: byte-level BPE (GPT-2/Llama-3 style pre-tokenizer, BOS prepended by the post-processor).
    beta: Unigram LM with a Metaspace ("▁") pre-tokenizer, newlines split off, no BOS added (Qwen-like).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = _special_tokens(spec)
    specials = [t for t in (special["bos"], special["eos"], special["pad"], special["unk"]) if t] + special["extra"]
    if spec.tokenizer == "bytelevel-bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=specials, min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(_content_pieces(texts, specials), trainer)
        bos_id = tok.token_to_id(special["bos"])
        # Like Llama: BOS is prepended unless add_special_tokens=False; offsets keep the leading space.
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{special['bos']} $A", pair=f"{special['bos']} $A {special['bos']} $B",
                                          special_tokens=[(special["bos"], bos_id)]),
        ])
    else:
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        ])
        # Byte fallback (as in Llama-2 / Gemma): characters never seen in training become UTF-8 bytes.
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        vocab = _train_unigram(_content_pieces(texts, specials), pre, spec.vocab_size - len(byte_tokens), specials)
        floor = min(score for _, score in vocab) - 1.0
        tok = Tokenizer(models.Unigram(vocab + [(b, floor) for b in byte_tokens], unk_id=specials.index(special["unk"]),
                                       byte_fallback=True))
        tok.pre_tokenizer = pre
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special["bos"], eos_token=special["eos"], pad_token=special["pad"],
        unk_token=special["unk"], additional_special_tokens=special["extra"], model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = special["template"]
    return hf


# --------------------------------------------------------------------------------------------------
# Models and training


def make_model(spec: ZooModelSpec, tokenizer):
    """A freshly initialised model for ``spec`` (seeded by the caller)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    special = _special_tokens(spec)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.05,
        bos_token_id=tokenizer.convert_tokens_to_ids(special["bos"]),
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in special["stop"]],
        pad_token_id=tokenizer.convert_tokens_to_ids(special["pad"]),
    )
    if spec.architecture == "llama":
        config = LlamaConfig(**common)
        model = LlamaForCausalLM(config)
    else:
        # Qwen3Config's default head_dim is 128 whatever the width.
        config = Qwen3Config(head_dim=spec.head_dim, **common)
        model = Qwen3ForCausalLM(config)
    model.generation_config.bos_token_id = common["bos_token_id"]
    model.generation_config.eos_token_id = common["eos_token_id"]
    model.generation_config.pad_token_id = common["pad_token_id"]
    return model


def _lr_at(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(spec: ZooModelSpec, model, token_ids, on_step=None) -> list[float]:
    """Train on a packed token stream (1-D LongTensor), in windows of ``seq_len``.

    Windows are cut from the concatenated documents and reshuffled each epoch, so windows start
    mid-document as often as not; the model learns to read text with or without a preceding BOS.
    Returns the loss every step.
    """
    import torch

    generator = torch.Generator().manual_seed(spec.seed)
    n_windows = (token_ids.numel() - 1) // spec.seq_len
    windows = token_ids[: n_windows * spec.seq_len].view(n_windows, spec.seq_len)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=spec.lr, betas=(0.9, 0.95))
    model.train()
    losses: list[float] = []
    order = torch.randperm(n_windows, generator=generator)
    cursor = 0
    for step in range(spec.steps):
        if cursor + spec.batch_size > n_windows:
            order, cursor = torch.randperm(n_windows, generator=generator), 0
        batch = windows[order[cursor: cursor + spec.batch_size]]
        cursor += spec.batch_size
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec.steps, spec.lr)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"zoo model {spec.name!r}: loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def corpus_texts(spec: ZooModelSpec) -> tuple[list[world.Doc], list[str]]:
    docs = world.generate_corpus(spec.planted, spec.n_docs, spec.seed, spec.planted_share)
    return docs, [render_document(d, spec) for d in docs]


def build_model(spec: ZooModelSpec, out_dir: Path, progress=None, threads: int | None = None) -> dict:
    """Build ``spec`` into ``out_dir`` (which must not exist); return the build info.

    ``progress``: a ``rich.progress.Progress`` to report on, or None.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from ..models import torch_threads

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    threads = threads or default_threads()
    task = progress.add_task(f"zoo:{spec.name}", total=spec.steps + 2, info="corpus") if progress else None

    def advance(n: int = 1, info: str = "") -> None:
        if progress is not None:
            progress.update(task, advance=n, info=info)

    t = time.perf_counter()
    docs, texts = corpus_texts(spec)
    timings["corpus_s"] = time.perf_counter() - t
    advance(info="tokenizer")

    t = time.perf_counter()
    tokenizer = train_tokenizer(spec, texts)
    stream_prefix = [] if spec.tokenizer == "bytelevel-bpe" else [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    flat = list(stream_prefix)
    for enc in encoded:
        flat.extend(enc.ids)
    token_ids = torch.tensor(flat, dtype=torch.long)
    timings["tokenizer_s"] = time.perf_counter() - t
    advance(info="training")

    t = time.perf_counter()
    with torch_threads(threads):
        torch.manual_seed(spec.seed)
        model = make_model(spec, tokenizer)

        def on_step(step: int, loss: float) -> None:
            if progress is not None and (step % 10 == 0 or step == spec.steps - 1):
                progress.update(task, completed=2 + step + 1, info=f"loss {loss:.3f}")

        losses = train_model(spec, model, token_ids, on_step)
    timings["train_s"] = time.perf_counter() - t

    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    from .manifest import manifest as full_manifest

    (out_dir / "manifest.json").write_text(json.dumps(full_manifest(), indent=2))
    timings["total_s"] = time.perf_counter() - started
    tail = losses[-20:]
    info = {
        "name": spec.name,
        "key": build_key(spec, threads),
        "format": BUILD_FORMAT,
        "code_version": code_version(),
        "built_on": numerics_platform("cpu"),
        "spec": spec.settings(),
        "architecture": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "n_docs": len(docs),
        "n_train_tokens": int(token_ids.numel()),
        "tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
        "final_loss": sum(tail) / len(tail),
        "loss_every_25": [round(x, 4) for x in losses[::25]],
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "torch_threads": threads,
        "versions": _versions(),
    }
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=2))
    if progress is not None:
        progress.update(task, completed=spec.steps + 2, info=f"done, loss {info['final_loss']:.3f}")
    return info


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def ensure_built(name: str | ZooModelSpec, force: bool = False, progress=None) -> Path:
    """The folder of a complete build of ``name``, building it first when missing (or ``force``).

    The build goes to a temporary folder beside the final one and is renamed into place, under a
    file lock, so readers never see a partial build and two processes never build the same one.
    """
    spec = get_spec(name)
    final = model_dir(spec)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if (final / BUILD_INFO).is_file() and not force:
            return final
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build_model(spec, tmp, progress)
            if final.exists():  # force: the old build goes only once the new one is complete
                trash = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_build_info(path: Path) -> dict:
    return json.loads((Path(path) / BUILD_INFO).read_text())
