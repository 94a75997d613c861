"""Feature steering (METHOD §8) and batched generation with one steering vector per row.

Steering adds ``α · s_max · d_j`` to the output of the capture block at every position, where
``d_j`` is feature ``j``'s decoder row in the model's raw activation scale, so ``α = 1`` puts the
feature at its largest harvested activation. Each row of a batch carries its own vector (a zero
row is the unsteered baseline), so concurrent requests with different features or strengths can
share one forward pass without leaking into each other.

Several generators may share one model (the runner loads each model once and the Inspect provider,
the coherence grader and persona extraction all use it, from different threads): every forward
pass holds the model's lock (``model_lock``), so one generator's steering vectors are only ever
set while its own forward passes run.

Generation is a plain sampling loop over the KV cache rather than ``model.generate`` so that each
row has its own random generator: a sample depends on its seed only, never on which other
requests happened to be batched with it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .model import Crosscoder
from .models import LoadedModel, decoder_layers, render_prompt


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The lock that serialises forward passes of ``model`` (created on first use)."""
    lock = getattr(model, "_crosscoder_audit_lock", None)
    if lock is None:
        lock = threading.RLock()
        object.__setattr__(model, "_crosscoder_audit_lock", lock)
    return lock


def steering_vector(crosscoder: Crosscoder, side: str, feature: int, alpha: float, s_max: float) -> Tensor:
    """``α · s_max · d_j`` in ``side``'s raw activation scale, ``[d]``.

    Raises ``ValueError`` naming the problem when the feature has no decoder in that model (an
    exclusive feature of the other model) or does not exist.
    """
    D = crosscoder.config.dict_size
    if not 0 <= feature < D:
        raise ValueError(f"feature {feature} is out of range: the crosscoder has {D} features")
    direction = crosscoder.decoder_raw(side)[feature].detach().float()
    if float(direction.norm()) == 0.0:
        raise ValueError(f"feature {feature} has no decoder in model {side!r} (it is exclusive to the other model)")
    return alpha * s_max * direction.cpu()


#: Most logits elements (rows × positions × vocabulary) one perplexity forward pass may produce.
LOGITS_BUDGET = 50_000_000


@dataclass
class Generation:
    text: str
    input_tokens: int
    output_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the generated tokens (stop token excluded)


class SteeredGenerator:
    """Generates from a loaded model with per-row additive vectors at its capture block."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.block = decoder_layers(self.model)[loaded.layer]
        self.lock = model_lock(self.model)
        self._vectors: Tensor | None = None
        self._handle = self.block.register_forward_hook(self._add_vectors)

    def close(self) -> None:
        self._handle.remove()

    def _add_vectors(self, _module, _inputs, output):
        if self._vectors is None:
            return None
        if isinstance(output, tuple):
            hidden = output[0]
            return (hidden + self._vectors[:, None, :].to(hidden.device, hidden.dtype), *output[1:])
        return output + self._vectors[:, None, :].to(output.device, output.dtype)

    @contextlib.contextmanager
    def steering(self, vectors_bd: Tensor | None) -> Iterator[None]:
        with self.lock:
            self._vectors = None if vectors_bd is None else vectors_bd.to(self.loaded.device)
            try:
                yield
            finally:
                self._vectors = None

    # ---- prompts ---------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict] | str) -> list[int]:
        """Token ids of a chat (rendered with the model's chat template, assistant turn opened),
        or of a plain text prompt."""
        return render_prompt(self.tokenizer, messages)

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[list[int]],
        vectors_bd: Tensor | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seeds: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Continue each prompt; row ``i`` is steered by ``vectors_bd[i]`` (all rows unsteered if None)."""
        n = len(prompts)
        if n == 0:
            return []
        if vectors_bd is not None:
            width = self.loaded.d_model
            if tuple(vectors_bd.shape) != (n, width):
                raise ValueError(f"steering vectors have shape {tuple(vectors_bd.shape)}; one row per prompt of the "
                                 f"model's width is needed: ({n}, {width})")
            if not torch.isfinite(vectors_bd).all():
                raise ValueError("steering vectors hold NaN or infinite values")
        device = self.loaded.device
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        stop_ids = _stop_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        width = max(len(p) for p in prompts)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        generators = None
        if temperature > 0:
            seeds = list(seeds) if seeds is not None else list(range(n))
            generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        out_tokens: list[list[int]] = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool)
        cache = None
        step_ids, step_mask = input_ids, mask
        position_ids = (mask.cumsum(1) - 1).clamp_min(0)
        # transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept either.
        parameters = inspect.signature(self.model.forward).parameters
        cache_arg = "cache" if "cache" in parameters else "past_key_values"
        # Only the last position's logits are needed; a 150k vocabulary makes the others costly.
        extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        with self.steering(vectors_bd):
            for _ in range(max_new_tokens):
                out = self.model(input_ids=step_ids, attention_mask=step_mask, position_ids=position_ids,
                                 use_cache=True, **extra, **{cache_arg: cache})
                cache = getattr(out, cache_arg)
                logits = out.logits[:, -1, :].float().cpu()
                if generators is None:
                    next_ids = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    next_ids = torch.stack([torch.multinomial(probs[i], 1, generator=generators[i])[0] for i in range(n)])
                for i in range(n):
                    if done[i]:
                        continue
                    token = int(next_ids[i])
                    if token in stop_ids:
                        done[i] = True
                    else:
                        out_tokens[i].append(token)
                if bool(done.all()):
                    break
                next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
                step_ids = next_ids[:, None].to(device)
                step_mask = torch.cat([step_mask, torch.ones((n, 1), dtype=torch.long, device=device)], dim=1)
                position_ids = position_ids[:, -1:] + 1
        return [Generation(self.tokenizer.decode(t, skip_special_tokens=True).strip(), len(p), len(t), t)
                for p, t in zip(prompts, out_tokens, strict=True)]

    def answer_perplexity(self, prompt: list[int], answer: str) -> float:
        """Perplexity of ``answer`` after ``prompt`` under the *unsteered* model (inf when empty)."""
        return self.answer_perplexities([(prompt, answer)])[0]

    @torch.no_grad()
    def answer_perplexities(self, items: Sequence[tuple[list[int], str]]) -> list[float]:
        """:meth:`answer_perplexity` of each ``(prompt, answer)``, several rows per forward pass: right
        padding leaves a causal model's real positions as they are. Rows per pass are bounded so that
        the logits stay under ``LOGITS_BUDGET`` elements (a 150k vocabulary makes them the big tensor)."""
        answers = [self.tokenizer(a, add_special_tokens=False)["input_ids"] if a else [] for _, a in items]
        out = [math.inf] * len(items)
        todo = sorted((i for i in range(len(items)) if answers[i]), key=lambda i: len(items[i][0]) + len(answers[i]))
        head = self.model.get_output_embeddings()
        vocab = (head.weight.shape[0] if head is not None and getattr(head, "weight", None) is not None
                 else getattr(self.model.config, "vocab_size", None) or 262_144)  # unknown: assume a large one
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        start = 0
        with self.steering(None):
            while start < len(todo):
                longest = len(items[todo[-1]][0]) + len(answers[todo[-1]])
                rows = max(1, min(len(todo) - start, LOGITS_BUDGET // max(1, vocab * longest)))
                chunk = todo[start : start + rows]
                start += rows
                seqs = [items[i][0] + answers[i] for i in chunk]
                width = max(len(q) for q in seqs)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, q in enumerate(seqs):
                    ids[r, : len(q)] = torch.tensor(q, dtype=torch.long)
                    mask[r, : len(q)] = 1
                logits = self.model(input_ids=ids.to(self.loaded.device), attention_mask=mask.to(self.loaded.device),
                                    use_cache=False).logits
                for r, i in enumerate(chunk):
                    n_prompt, n_answer = len(items[i][0]), len(answers[i])
                    row_logits = logits[r, n_prompt - 1 : n_prompt + n_answer - 1].float()
                    target = torch.tensor(answers[i], device=row_logits.device)
                    out[i] = float(torch.exp(torch.nn.functional.cross_entropy(row_logits, target, reduction="mean")))
        return out


def _stop_ids(tokenizer, generation_config=None) -> set[int]:
    """End-of-turn tokens: the tokenizer's EOS, the generation config's (possibly a list), and the
    usual chat end markers when the vocabulary has them."""
    stops = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        stops.update(int(t) for t in (configured if isinstance(configured, list) else [configured]))
    for token in (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|return|>"):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            stops.add(token_id)
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    return stops
