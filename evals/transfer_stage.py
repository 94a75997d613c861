"""The transfer stage as the runner calls it: extract, transfer, sweep the four arms, summarise."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file

from crosscoder.model import write_json_atomic
from crosscoder.persona import PersonaVector, extract_persona_vector, load_trait
from crosscoder.transfer import random_direction_like, transfer_vector
from evals.effects import trait_is_specific, transfer_holds
from evals.prompts import load_prompt_set
from evals.rubrics import load_rubric
from evals.transfer import draw_key, run_arms


def _eval_prompts(trait) -> list[str]:
    if trait.eval_prompts:
        return list(trait.eval_prompts)
    rubric = load_rubric(trait.rubric)
    if rubric.prompt_set is None:
        raise ValueError(f"trait {trait.name}: no eval_prompts and rubric {rubric.name} names no prompt_set")
    return list(load_prompt_set(rubric.prompt_set).prompts)


def run_transfer(runner, folder: Path, progress: Callable[[int, int], None]) -> list[dict]:
    """Rows of the ``transfers`` table for every trait × direction × arm; also written to
    ``folder/transfer.json``. Finished (trait, direction) pairs are kept in their own files so that
    an interrupted stage resumes where it stopped."""
    spec = runner.spec
    t = spec.transfer
    grader = t.grader or spec.verify.grader
    jobs = [(name, direction) for name in t.traits for direction in t.directions]
    rows: list[dict] = []
    persona: dict[tuple[str, str], object] = {}
    # First what needs no crosscoder, for every unfinished job: the extraction and the source model's
    # arm, which steers with the extracted vector itself (a transfer started in a second process does
    # this while the crosscoder trains); each job's source side is kept in its own files, so a rerun
    # resumes it. Then the crosscoder's part.
    source_side: dict[tuple[str, str], tuple] = {}
    for name, direction in jobs:
        trait = load_trait(name)
        stem = f"{trait.name}-{direction}"  # the trait's own name: a trait given as a path stays in the cache
        if (folder / f"{stem}.json").is_file():
            continue
        source = "a" if direction == "a_to_b" else "b"
        prompts = _eval_prompts(trait)[:t.max_prompts]
        source_path = folder / f"{stem}-source.safetensors"
        kept = folder / f"{stem}-source.json"
        if kept.is_file() and source_path.is_file():
            saved = json.loads(kept.read_text())
            extracted = PersonaVector(trait.name, load_file(str(source_path))["source"], saved["n_answers"],
                                      tuple(saved["answer_tokens"]), saved["examples"])
            source_side[(name, direction)] = (extracted, prompts, saved["arms"])
            continue
        if (name, source) not in persona:
            persona[(name, source)] = extract_persona_vector(runner.loaded_model(source), trait,
                                                             max_new_tokens=t.max_tokens, max_questions=t.max_questions)
        extracted = persona[(name, source)]
        save_file({"source": extracted.vector.contiguous()}, str(source_path))
        arms = run_arms(spec.model_entry(source), source, None, source_path, {"source": ["source"]}, prompts,
                        trait.rubric, t, grader, runner.loaded_model(source), folder / "logs",
                        runner.coherence_meter(source, t.max_tokens))
        write_json_atomic(kept, {"n_answers": extracted.n_answers, "answer_tokens": list(extracted.answer_tokens),
                                 "examples": extracted.examples, "arms": arms}, indent=None, default=float)
        source_side[(name, direction)] = (extracted, prompts, arms)
    crosscoder = runner.crosscoder() if source_side else None
    for done, (name, direction) in enumerate(jobs):
        trait = load_trait(name)
        stem = f"{trait.name}-{direction}"
        out = folder / f"{stem}.json"
        if out.is_file():
            rows += json.loads(out.read_text())
            progress(done + 1, len(jobs))
            continue
        source, target = ("a", "b") if direction == "a_to_b" else ("b", "a")
        extracted, prompts, arms = source_side[(name, direction)]
        moved = transfer_vector(crosscoder, extracted.vector, source, k=t.k, min_cosine=t.min_cosine, signed=t.signed)
        # Control draws: draw 0 keeps the seeds a single-draw control used (seed + 1, seed + 2).
        random_moved = [transfer_vector(crosscoder, random_direction_like(extracted.vector, t.seed + 1 + 2 * i),
                                        source, k=t.k, min_cosine=t.min_cosine, signed=t.signed)
                        for i in range(t.control_draws)]
        target_vectors = {"transferred": moved.vector.contiguous()}
        for i, random_info in enumerate(random_moved):
            target_vectors[draw_key("random_transferred", i)] = random_info.vector.contiguous()
            target_vectors[draw_key("unrelated", i)] = random_direction_like(moved.vector, t.seed + 2 + 2 * i).contiguous()
        target_path = folder / f"{stem}-target.safetensors"
        save_file(target_vectors, str(target_path))
        checkpoint = runner.artefacts["train"] / "checkpoint"
        draws = range(t.control_draws)
        target_arms = {"transferred": ["transferred"],
                       "random_transferred": [draw_key("random_transferred", i) for i in draws],
                       "unrelated": [draw_key("unrelated", i) for i in draws]}
        arms = arms + run_arms(spec.model_entry(target), target, checkpoint, target_path, target_arms, prompts,
                               trait.rubric, t, grader, runner.loaded_model(target), folder / "logs",
                               runner.coherence_meter(target, t.max_tokens))
        by_arm = {a["arm"]: a for a in arms}
        holds, specific = transfer_holds(by_arm), trait_is_specific(by_arm)
        extraction = {"n_answers": extracted.n_answers, "answer_tokens": list(extracted.answer_tokens),
                      "examples": extracted.examples}
        norms = {"source": float(extracted.vector.norm()), "transferred": float(moved.vector.norm()),
                 "random_transferred": sum(float(r.vector.norm()) for r in random_moved) / len(random_moved),
                 "unrelated": float(moved.vector.norm())}
        job_rows = []
        for arm in arms:
            info = moved if arm["arm"] == "transferred" else random_moved[0] if arm["arm"] == "random_transferred" else None
            job_rows.append({
                "trait": trait.name, "direction": direction, "arm": arm["arm"], "spearman": arm["spearman"],
                "effect": arm["effect"], "holds": holds, "specific": specific, "vector_norm": norms[arm["arm"]],
                "features": info.features.tolist() if info else None,
                "cosines": [float(c) for c in info.cosines] if info else None,
                "max_decoder_cosine": info.max_decoder_cosine if info else None,
                "curve": arm["curve"], "draws": arm["draws"], "generations": arm["generations"],
                "extraction": extraction,
            })
        write_json_atomic(out, job_rows, indent=None, default=float)  # a stopped process leaves no half file
        rows += job_rows
        progress(done + 1, len(jobs))
    write_json_atomic(folder / "transfer.json", rows, indent=None, default=float)
    return rows
