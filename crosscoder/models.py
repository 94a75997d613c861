"""Loading causal LMs by hub id, local folder or ``zoo:`` id, and capturing one block's output."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` inside the block (unchanged when None), then restored."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be used; the message names the spec field."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_id: str
    revision: str | None
    layer: int
    d_model: int
    n_layers: int
    dtype: torch.dtype
    device: torch.device
    local_path: str | None  # where the weights were read from, when known

    def describe(self) -> dict:
        return {
            "id": self.model_id,
            "revision": self.revision,
            "layer": self.layer,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "dtype": str(self.dtype).removeprefix("torch."),
            "architecture": type(self.model).__name__,
            "local_path": self.local_path,
        }


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_model_path(model_id: str, field: str = "model") -> str:
    """``zoo:<name>`` → the built zoo folder; anything else is returned unchanged."""
    if model_id.startswith("zoo:"):
        try:
            from .zoo import resolve_model
        except ImportError as exc:  # pragma: no cover - the zoo ships with the package
            raise ModelLoadError(f"{field}.id: {model_id!r} needs the tiny zoo, which failed to import: {exc}") from exc
        try:
            return str(resolve_model(model_id.removeprefix("zoo:")))
        except KeyError as exc:
            raise ModelLoadError(f"{field}.id: {exc.args[0] if exc.args else model_id}") from None
    return str(Path(model_id).expanduser()) if model_id.startswith("~") else model_id


LOCAL_PREFIXES = ("/", "./", "../", "~")


def looks_local(model_id: str) -> bool:
    """A model id that names a folder on this machine rather than a hub repository."""
    return model_id.startswith(LOCAL_PREFIXES) or Path(model_id).expanduser().exists()


def config_error_hint(model_id: str, source: str) -> str:
    """What to add to "cannot load the config of ...": nothing for an existing folder, else whether
    a local folder is missing or a hub id could not be fetched (offline machines)."""
    if Path(source).is_dir():
        return ""
    if looks_local(model_id):
        return " (local model folder not found)"
    return " (no local folder by that name; on an offline machine use a local folder or a zoo: id)"


def build_zoo_models(model_ids: list[str]) -> None:
    """Build every not-yet-built ``zoo:`` model among ``model_ids`` at once, so that two missing
    models build in parallel processes rather than one after the other (a cold demo waits for
    the slower one only). Unknown names are left for ``resolve_model_path`` to report."""
    names = [m.removeprefix("zoo:") for m in model_ids if m.startswith("zoo:")]
    if not names:
        return
    from .zoo import ZOO_MODELS, build_zoo

    known = [n for n in dict.fromkeys(names) if n in ZOO_MODELS]
    if known:
        build_zoo(known)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks, for the common causal-LM layouts."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers"):
        node = model
        for attribute in path.split("."):
            node = getattr(node, attribute, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise ModelLoadError(f"cannot find the decoder blocks of {type(model).__name__}")


def load_model(
    model_id: str,
    layer: int,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    field: str = "model",
    chat_template: str | None = None,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its fast tokenizer; check that ``layer`` exists.

    ``field`` (e.g. ``"model_a"``) prefixes every error so that the user knows which spec entry
    to fix. Weights come from a local folder when ``model_id`` is one, else from the hub cache.
    ``device_map`` ("auto", "balanced", "sequential"): spread a model too big for one device over
    all visible GPUs (and CPU memory) with accelerate, instead of moving it to ``device``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelLoadError(f"{field}.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    source = resolve_model_path(model_id, field)
    is_local = Path(source).is_dir()
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{field}.id: cannot load the config of {model_id!r}{config_error_hint(model_id, source)}: "
                             f"{_first_line(exc)}") from None
    try:
        placement = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **common, **placement)
    except ValueError as exc:
        raise ModelLoadError(
            f"{field}.id: {model_id!r} ({type(config).__name__}) is not a causal language model: {_first_line(exc)}"
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"{field}.id: cannot load the weights of {model_id!r}: {_first_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{field}.id: {model_id!r} has no usable tokenizer: {_first_line(exc)}") from None
    if chat_template is not None:
        tokenizer.chat_template = _read_chat_template(chat_template, field)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"{field}.id: {model_id!r} has only a slow tokenizer; alignment needs a fast one (offsets)")

    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ModelLoadError(
            f"{field}.layer: {layer} is out of range: {model_id!r} has {len(blocks)} decoder blocks (0–{len(blocks) - 1})"
        )
    if device_map:  # accelerate placed the blocks; inputs go where the embeddings are
        device = model.get_input_embeddings().weight.device
        model = model.eval()
    else:
        device = torch.device(device) if device is not None else default_device()
        model = model.to(device).eval()
    d_model = int(getattr(model.config, "hidden_size", 0) or blocks[layer].self_attn.o_proj.out_features)
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id=model_id, revision=revision, layer=layer, d_model=d_model,
        n_layers=len(blocks), dtype=DTYPES[dtype], device=device, local_path=source if is_local else None,
    )


class _StopForward(Exception):
    """Raised by the capture hook: blocks above the captured one need not run."""


@torch.no_grad()
def capture_block_output(loaded: LoadedModel, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Output of decoder block ``loaded.layer`` (== ``hidden_states[layer + 1]``), ``[batch, seq, d]``.

    transformers 5.x blocks return a tensor, 4.x a tuple whose first element is the hidden state;
    both are handled. The forward pass stops after the captured block.
    """
    captured: list[Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_layers(loaded.model)[loaded.layer].register_forward_hook(hook)
    try:
        loaded.model(input_ids=input_ids.to(loaded.device),
                     attention_mask=None if attention_mask is None else attention_mask.to(loaded.device),
                     use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the capture hook did not run: the model skipped its decoder blocks")
    return captured[0]


def render_prompt(tokenizer, messages: Sequence[dict] | str) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's chat template and the assistant turn opened
    (the point where the model is about to answer), or of a plain text prompt."""
    if isinstance(messages, str):
        return tokenizer(messages, add_special_tokens=True)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        return _apply_chat_template(tokenizer, list(messages))
    # No chat template (a base model): a plain transcript.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    # enable_thinking=False: reasoning models (Qwen3) would otherwise spend the token budget in a
    # <think> block; templates that do not know the variable ignore it.
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                            enable_thinking=False)
    except Exception as exc:  # jinja2 TemplateError: e.g. a template that rejects the system role
        if not messages or messages[0]["role"] != "system" or "system" not in str(exc).lower():
            raise
        system, rest = messages[0]["content"], list(messages[1:])
        rest[0] = {**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}
        return _apply_chat_template(tokenizer, rest)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def bos_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer's own post-processor puts before a text (e.g. Llama's BOS)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    prefix_len = len(with_special) - len(without)
    if prefix_len > 0 and with_special[prefix_len:] == without:
        return list(with_special[:prefix_len])
    return []


def _read_chat_template(value: str, field: str) -> str:
    """A Jinja chat template given inline, or the contents of a ``.jinja`` file."""
    if value.endswith((".jinja", ".j2")):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{field}.chat_template: no such file {value!r}")
        return path.read_text(encoding="utf-8")
    if "{%" not in value and "{{" not in value:
        raise ModelLoadError(f"{field}.chat_template: neither a Jinja template nor a .jinja file: {value[:60]!r}")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
