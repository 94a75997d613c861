"""Persona vectors: a trait's direction at the capture layer, from contrasting prompts (METHOD §9).

A trait file (``specs/traits/<name>.yaml``) gives questions and two ways of asking them: one that
elicits the trait and one that suppresses it (a system prompt, a user-side template, or both).
The model answers every question both ways (greedy, unsteered); the persona vector is the mean
capture-block activation over the positions that *generate* the answer (the prompt's last token
through the answer's second-to-last: the states each answer token is produced from) under
elicitation minus the same mean under suppression. ``α = 1`` therefore moves the residual stream
by the average difference the trait makes. Reading the answer tokens themselves (one position
later) leaves out the position where a short templated answer's tone is chosen; on the zoo that
version moved B→A with ρ 0.74, this one with 0.95 (A→B: 1.00 and 0.82). Unlike the original
recipe we do not filter answers by how strongly they show the trait; the number of answers behind
each mean is reported instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from .models import LoadedModel, capture_block_output
from .steering import SteeredGenerator
from .yamlfile import load_yaml_model, named_or_path

TRAIT_DIR = Path(__file__).resolve().parents[1] / "specs" / "traits"


class TraitError(ValueError):
    """A trait file is missing, unreadable or does not match the schema."""


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str | None = Field(default=None, description="system prompt of this condition")
    template: str = Field(default="{question}", description="user message; {question} is replaced")

    @field_validator("template")
    @classmethod
    def _asks_the_question(cls, template: str) -> str:
        import string

        try:
            names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as exc:
            raise ValueError(f"cannot be read as a template ({exc}); write literal braces as {{{{ and }}}}") from None
        if names != ["question"]:
            found = ", ".join(repr(n) for n in names) or "none"
            raise ValueError(f"must hold {{question}} exactly once, and no other field (found: {found}); write "
                             "literal braces as {{ and }}")
        return template


class Trait(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    rubric: str = Field(min_length=1, description="rubric that grades the trait (specs/rubrics/<name>.yaml)")
    questions: list[str] = Field(min_length=2)
    eliciting: Condition
    suppressing: Condition
    eval_prompts: list[str] = Field(default_factory=list, description="prompts to steer on (default: the "
                                    "rubric's prompt set)")

    def messages(self, question: str, condition: Condition) -> list[dict[str, str]]:
        out = [{"role": "system", "content": condition.system}] if condition.system else []
        return out + [{"role": "user", "content": condition.template.format(question=question)}]


def load_trait(path_or_name: str | Path) -> Trait:
    return load_yaml_model(named_or_path(path_or_name, TRAIT_DIR), Trait, TraitError, "trait")


@dataclass
class PersonaVector:
    trait: str
    vector: Tensor  # [d] in the model's raw activation scale
    n_answers: int  # per condition
    answer_tokens: tuple[int, int]  # tokens averaged under elicitation, suppression
    examples: list[dict] = field(default_factory=list)  # a few (question, elicited, suppressed) answers


@torch.no_grad()
def extract_persona_vector(loaded: LoadedModel, trait: Trait, max_new_tokens: int = 48,
                           max_questions: int | None = None) -> PersonaVector:
    generator = SteeredGenerator(loaded)
    try:
        questions = trait.questions[:max_questions]
        means, counts, answers = [], [], []
        for condition in (trait.eliciting, trait.suppressing):
            prompts = [generator.render(trait.messages(q, condition)) for q in questions]
            outputs = generator.generate(prompts, max_new_tokens=max_new_tokens)
            total = torch.zeros(loaded.d_model, dtype=torch.float64)
            n_tokens = 0
            texts = []
            for prompt, out in zip(prompts, outputs, strict=True):
                texts.append(out.text)
                # The tokens the model generated: decoding and re-tokenising them need not give them back
                # (merges across the prompt boundary, stripped whitespace).
                answer_ids = list(out.token_ids)
                if not answer_ids:
                    continue
                if not prompt:
                    raise ValueError(f"trait {trait.name}: an empty rendered prompt has no position that "
                                     "generates the answer")
                ids = torch.tensor([prompt + answer_ids])
                # The positions that generate the answer: the prompt's last token (its state chooses the
                # first answer token, where a templated answer's tone is decided) to the answer's
                # second-to-last token.
                with generator.lock:  # the model may be shared with other threads
                    hidden = capture_block_output(loaded, ids)[0, len(prompt) - 1:-1].double().cpu()
                total += hidden.sum(0)
                n_tokens += hidden.shape[0]
            if n_tokens == 0:
                raise ValueError(f"trait {trait.name}: the model gave only empty answers under one condition")
            means.append(total / n_tokens)
            counts.append(n_tokens)
            answers.append(texts)
    finally:
        generator.close()
    examples = [{"question": q, "eliciting": a, "suppressing": b}
                for q, a, b in list(zip(questions, answers[0], answers[1], strict=True))[:3]]
    return PersonaVector(trait=trait.name, vector=(means[0] - means[1]).float(), n_answers=len(questions),
                         answer_tokens=(counts[0], counts[1]), examples=examples)
