"""Offline checks of what a spec refers to: rubric, prompt-set and trait files, models, layers, data files.

``audit validate`` and the run's validate stage both call :func:`spec_problems`, so a spec that
validates does not fail minutes later on a missing file or an out-of-range layer. Nothing here
loads weights or reaches the network: a zoo model's depth comes from its build spec, a local
folder's from its ``config.json``, a hub model's from its config in the local hub cache when it is
there (otherwise the models stage checks it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from crosscoder.models import looks_local

from .spec import AuditSpec, ModelSpec


def spec_problems(spec: AuditSpec, data: bool = True) -> list[str]:
    """Every problem found, one line each, starting with the spec field to fix. ``data=False`` leaves
    out the data files: a run whose harvest is cached does not read them again."""
    return [*rubric_problems(spec), *model_problems(spec), *(data_problems(spec) if data else [])]


def rubric_problems(spec: AuditSpec) -> list[str]:
    from crosscoder.persona import TraitError, load_trait
    from evals.prompts import PromptSetError, load_prompt_set
    from evals.rubrics import RubricError, load_rubric

    problems = []
    entries = [("verify.rubrics", name) for name in spec.verify.rubrics]
    entries += [(f"verify.features.{feature}", name) for feature, names in spec.verify.features.items()
                for name in names]
    prompted_traits: set[str] = set()  # traits with their own eval_prompts: their rubric needs no prompt set
    for name in spec.transfer.traits:
        try:
            trait = load_trait(name)
        except TraitError as exc:
            problems.append(f"transfer.traits: {exc}")
            continue
        entries.append((f"transfer.traits ({name}'s rubric)", trait.rubric))
        if trait.eval_prompts:
            prompted_traits.add(f"transfer.traits ({name}'s rubric)")
    swept: set[str] = set()  # the names a gate's rubric may give
    for field, name in entries:
        try:
            rubric = load_rubric(name)
            if rubric.prompt_set:
                load_prompt_set(rubric.prompt_set)
        except (RubricError, PromptSetError) as exc:
            problems.append(f"{field}: {exc}")
            continue
        if not rubric.prompt_set and field not in prompted_traits:  # nothing to steer on
            problems.append(f"{field}: rubric {rubric.name} names no prompt_set, so it cannot drive a steering sweep; "
                            "add `prompt_set:` to the rubric file" + (" or eval_prompts to the trait"
                                                                       if field.startswith("transfer.") else ""))
            continue
        if field.startswith("verify."):
            swept.add(rubric.name)  # effects rows carry the rubric's own name, which gates compare with
    for i, gate in enumerate(spec.gates):
        if gate.rubric is not None and gate.rubric not in swept:
            known = ", ".join(sorted(swept)) or "none: verify sweeps no rubric"
            problems.append(f"gates.{i}.rubric: {gate.rubric!r} is not a rubric this spec sweeps, so the gate could "
                            f"never fire (swept: {known})")
    return problems


def model_problems(spec: AuditSpec) -> list[str]:
    problems = []
    for side, entry in (("model_a", spec.model_a), ("model_b", spec.model_b)):
        problems += _one_model(side, entry)
    return problems


def _one_model(side: str, entry: ModelSpec) -> list[str]:
    problems = []
    layers = None
    if entry.id.startswith("zoo:"):
        from crosscoder.zoo import ZOO_MODELS

        name = entry.id.removeprefix("zoo:")
        if name not in ZOO_MODELS:
            return [f"{side}.id: no zoo model named {name!r}; available: {', '.join(ZOO_MODELS)}"]
        layers = ZOO_MODELS[name].n_layers
    elif looks_local(entry.id):
        folder = Path(entry.id).expanduser()
        if not folder.is_dir():
            return [f"{side}.id: local model folder {entry.id!r} not found"]
        config = folder / "config.json"
        if not config.is_file():
            return [f"{side}.id: {entry.id!r} has no config.json (a folder written by save_pretrained is expected)"]
        layers = config_layers(config)  # unknown (another config layout): the models stage checks it
    else:  # a hub id: its depth is known when its config is in the local hub cache (never downloaded here)
        cached = _cached_hub_config(entry.id, entry.revision)
        layers = config_layers(cached) if cached is not None else None
    if layers is not None and entry.layer >= layers:
        problems.append(f"{side}.layer: {entry.layer} is out of range: {entry.id!r} has {layers} decoder blocks "
                        f"(0–{layers - 1})")
    template = entry.chat_template
    if template and template.endswith((".jinja", ".j2")) and not Path(template).expanduser().is_file():
        problems.append(f"{side}.chat_template: no such file {template!r}")
    elif template and not template.endswith((".jinja", ".j2")) and "{{" not in template and "{%" not in template:
        problems.append(f"{side}.chat_template: {template[:40]!r} is neither a Jinja template (it has no {{{{ or {{%) "
                        "nor a .jinja file")
    return problems


def _cached_hub_config(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id; the models stage names the problem
        return None
    return Path(found) if isinstance(found, str) else None


def config_layers(config_path: Path) -> int | None:
    """``num_hidden_layers`` of a Hugging Face ``config.json`` (or of its text model's config)."""
    return _config_int(config_path, ("num_hidden_layers", "n_layer", "num_layers"))  # Llama/Qwen, GPT-2/Bloom, others


def _config_int(config_path: Path, keys: tuple[str, ...]) -> int | None:
    """The first of ``keys`` that a ``config.json`` (or its text model's config) sets to an integer."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in keys:
            if isinstance(section.get(key), int):
                return section[key]
    return None


def data_problems(spec: AuditSpec) -> list[str]:
    from crosscoder.data import local_file_problem
    from crosscoder.zoo import DATA_NAMES

    problems = []
    for i, source in enumerate(spec.data.sources):
        field = f"data.sources.{i}.path"
        if source.path.startswith("zoo:"):
            name = source.path.removeprefix("zoo:")
            if name not in DATA_NAMES:
                problems.append(f"{field}: no zoo data named {name!r}; available: {', '.join(DATA_NAMES)}")
        elif problem := local_file_problem(source.path):
            problems.append(f"{field}: {problem}")
    return problems


def missing_api_keys(spec: AuditSpec) -> list[str]:
    """LLM roles whose provider's key is not in the environment: an error when the run starts,
    a note from ``audit validate`` (a spec may be checked on a machine that will not run it)."""
    roles = [("screen.explainer", spec.screen.explainer), ("screen.detector", spec.screen.detector),
             ("verify.grader", spec.verify.grader),
             ("transfer.grader", spec.transfer.grader if spec.transfer.traits else None)]
    problems = []
    for field, model in roles:
        provider = (model or "").split("/", 1)[0]
        if provider not in API_PROVIDERS:
            continue  # offline, or a provider without a key (a local server, Inspect's mockllm)
        key, module, package = API_PROVIDERS[provider]
        if not _importable(module):
            problems.append(f"{field}: {model} needs the Python package {package} (pip install {package}), which "
                            "is not installed here (or set it to 'offline' for the offline implementation)")
        if not os.environ.get(key):
            problems.append(f"{field}: {model} needs {key} in the environment (or set it to 'offline' for the "
                            "offline implementation)")
    return problems


#: Inspect model providers that call a hosted API: ``provider: (key variable, module, pip package)``.
API_PROVIDERS = {"anthropic": ("ANTHROPIC_API_KEY", "anthropic", "anthropic"),
                 "openai": ("OPENAI_API_KEY", "openai", "openai"),
                 "google": ("GOOGLE_API_KEY", "google.genai", "google-genai"),
                 "mistral": ("MISTRAL_API_KEY", "mistralai", "mistralai")}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def model_width(entry) -> int | None:
    """The residual width (``hidden_size``) of a spec's model, from the zoo's table, a local folder's
    ``config.json`` or a hub model's config in the local hub cache; None when it is not known here."""
    if entry.id.startswith("zoo:"):
        from crosscoder.zoo import ZOO_MODELS

        zoo = ZOO_MODELS.get(entry.id.removeprefix("zoo:"))
        return zoo.hidden_size if zoo is not None else None
    config = (Path(entry.id).expanduser() / "config.json" if looks_local(entry.id)
              else _cached_hub_config(entry.id, entry.revision))
    return _config_int(config, ("hidden_size",)) if config is not None else None
