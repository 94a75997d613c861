"""Inspect model providers: a locally served HF model with feature steering, and offline models.

``steered/<model id>`` serves a causal LM (hub id, local folder or ``zoo:`` id) with the chat
template of its tokenizer. A request is steered when its ``GenerateConfig.extra_body`` carries

* ``{"steer": {"feature": j, "alpha": α, "s_max": s}}`` and the provider was given a crosscoder
  (``-M crosscoder=PATH -M side=b -M layer=L``): ``x' = x + α · s_max · d_j``; or
* ``{"steer": {"vector": name, "alpha": α, "file": PATH}}``: ``x' = x + α · v_name`` with ``v_name``
  read from the safetensors file ``PATH`` (or from ``-M vectors=PATH`` when the request names no
  file), for persona and transferred vectors,

at the capture block, every position. Inspect calls ``generate`` concurrently, so requests are queued and run in
micro-batches in which every row carries its own steering vector (zero for unsteered rows).

Usage is reported from our own token counts, so nothing reaches for a tokenizer download.

Inspect keeps every model it creates; so that an audit holds each model in memory once, the
runner registers the models it has loaded (``share_loaded_model``) and passes their key as
``-M shared=KEY``: the provider then serves that object instead of loading its own copy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import torch
from inspect_ai.model import (
    ChatMessage,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    modelapi,
)
from inspect_ai.tool import ToolChoice, ToolInfo

from crosscoder import Crosscoder
from crosscoder.models import load_model
from crosscoder.steering import Generation, SteeredGenerator, steering_vector
from evals.batching import MicroBatcher

DEFAULT_MAX_TOKENS = 64
_SHARED: dict[str, Any] = {}


def share_loaded_model(key: str, loaded) -> str:
    """Make an already loaded ``LoadedModel`` available to providers created with ``shared=key``."""
    _SHARED[key] = loaded
    return key


@dataclass
class _Request:
    prompt: list[int]
    vector: torch.Tensor | None
    max_new_tokens: int
    temperature: float
    seed: int


def parse_steer(extra_body: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``steer`` entry of ``extra_body``, checked; ``None`` when the request is unsteered."""
    if not extra_body or extra_body.get("steer") is None:
        return None
    steer = extra_body["steer"]
    if "vector" in steer:
        if "alpha" not in steer:
            raise ValueError(f"extra_body.steer: missing alpha (got {sorted(steer)})")
        return {"vector": str(steer["vector"]), "alpha": float(steer["alpha"]), "file": steer.get("file")}
    missing = [key for key in ("feature", "alpha", "s_max") if key not in steer]
    if missing:
        raise ValueError(f"extra_body.steer: missing {', '.join(missing)} (got {sorted(steer)})")
    return {"feature": int(steer["feature"]), "alpha": float(steer["alpha"]), "s_max": float(steer["s_max"])}


def _messages(input: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.text} for m in input]


class SteeredModel(ModelAPI):
    """A local HF model, optionally with a crosscoder whose features steer it."""

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        config: GenerateConfig = GenerateConfig(),  # noqa: B008 - Inspect's own signature
        crosscoder: str | None = None,
        side: str = "a",
        layer: int | None = None,
        dtype: str = "float32",
        device: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_batch: int = 32,
        vectors: str | None = None,
        shared: str | None = None,
        **_: Any,
    ) -> None:
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key, config=config)
        if crosscoder is not None and layer is None:
            raise ValueError("steered model: a crosscoder needs the capture layer (-M layer=L)")
        if side not in ("a", "b"):
            raise ValueError(f"steered model: side must be 'a' or 'b', got {side!r}")
        if shared is not None:
            if shared not in _SHARED:
                raise ValueError(f"steered model: no shared model registered under {shared!r}")
            self.loaded = _SHARED[shared]
        else:
            self.loaded = load_model(model_name, layer if layer is not None else 0, revision=revision, dtype=dtype,
                                     device=device, trust_remote_code=bool(trust_remote_code), field="steered model")
        self.generator = SteeredGenerator(self.loaded)
        self.crosscoder = Crosscoder.load(crosscoder) if crosscoder is not None else None
        self.default_vectors = vectors
        self._vector_files: dict[str, dict[str, torch.Tensor]] = {}
        self.side = side
        self.max_batch = int(max_batch)
        # rows of one batch share the generation length and temperature; each keeps its own vector
        self._batcher = MicroBatcher(self._run_batch, self.max_batch, key=lambda r: (r.max_new_tokens, r.temperature))
        # Unsteered answers, generated once per (prompt, length, temperature, seed): a sweep asks every
        # feature's α = 0 and each transfer arm its own, all the same question to the same model.
        self._unsteered: dict[tuple, Generation] = {}
        self._unsteered_pending: dict[tuple, asyncio.Future] = {}

    def max_connections(self) -> int:
        return 4 * self.max_batch

    def _vector(self, steer: dict[str, Any] | None) -> torch.Tensor | None:
        if steer is None or steer["alpha"] == 0:
            return None
        if "vector" in steer:
            path = steer.get("file") or self.default_vectors
            if path is None:
                raise ValueError("steered model: a vector request needs extra_body.steer.file or -M vectors=PATH")
            if path not in self._vector_files:
                from safetensors.torch import load_file

                self._vector_files[path] = load_file(path)
            vectors = self._vector_files[path]
            if steer["vector"] not in vectors:
                raise ValueError(f"steered model: no vector named {steer['vector']!r} in {path} (have {sorted(vectors)})")
            vector = vectors[steer["vector"]].float()
            if vector.numel() != self.loaded.d_model:
                raise ValueError(f"steered model: vector {steer['vector']!r} has {vector.numel()} entries, the model's "
                                 f"width is {self.loaded.d_model}")
            return steer["alpha"] * vector
        if self.crosscoder is None:
            raise ValueError("this steered model has no crosscoder (-M crosscoder=PATH) but a request asked to steer")
        return steering_vector(self.crosscoder, self.side, int(steer["feature"]), steer["alpha"], steer["s_max"])

    async def generate(
        self,
        input: list[ChatMessage],
        tools: list[ToolInfo],
        tool_choice: ToolChoice,
        config: GenerateConfig,
    ) -> ModelOutput:
        steer = parse_steer(config.extra_body)
        request = _Request(
            prompt=self.generator.render(_messages(input)),
            vector=self._vector(steer),
            max_new_tokens=config.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=config.temperature if config.temperature is not None else 0.0,
            seed=config.seed if config.seed is not None else 0,
        )
        if request.vector is None:
            generation = await self._unsteered_generation(request)
        else:
            generation = await self._batcher.submit(request)
        output = ModelOutput.from_content(model=self.model_name, content=generation.text)
        output.usage = ModelUsage(input_tokens=generation.input_tokens, output_tokens=generation.output_tokens,
                                  total_tokens=generation.input_tokens + generation.output_tokens)
        return output

    async def _unsteered_generation(self, request: _Request) -> Generation:
        """The unsteered answer to ``request``: generated by the first request that asks, and shared with the
        ones that ask the same while it runs or after it finished (a sample depends on its seed only; at
        temperature 0, on nothing but the prompt)."""
        seed = request.seed if request.temperature > 0 else None
        key = (tuple(request.prompt), request.max_new_tokens, request.temperature, seed)
        loop = asyncio.get_running_loop()
        while True:
            if key in self._unsteered:
                return self._unsteered[key]
            pending = self._unsteered_pending.get(key)
            if pending is None or pending.get_loop() is not loop:  # each Inspect eval runs its own event loop
                break
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this request itself was cancelled
            # the request generating it failed or was cancelled: the first waiter to get here generates it
        future = loop.create_future()
        self._unsteered_pending[key] = future
        try:
            generation = await self._batcher.submit(request)
        except BaseException:
            future.cancel()
            raise
        finally:
            if self._unsteered_pending.get(key) is future:
                del self._unsteered_pending[key]
        self._unsteered[key] = generation
        future.set_result(generation)
        return generation

    def _run_batch(self, batch: list[_Request]):
        d = self.loaded.d_model
        vectors = None
        if any(r.vector is not None for r in batch):
            vectors = torch.stack([r.vector if r.vector is not None else torch.zeros(d) for r in batch])
        return self.generator.generate(
            [r.prompt for r in batch], vectors, max_new_tokens=batch[0].max_new_tokens,
            temperature=batch[0].temperature, seeds=[r.seed for r in batch],
        )


@modelapi(name="steered")
def steered() -> type[ModelAPI]:
    return SteeredModel
