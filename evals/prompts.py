"""Prompt sets for steering sweeps: topic prompts, control prompts on other topics, one generic prompt.

They live as YAML in ``specs/prompts/<name>.yaml``; a rubric names its default set (``prompt_set``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from crosscoder.yamlfile import load_yaml_model, named_or_path
from evals.rubrics import REPO_ROOT

PROMPT_DIR = REPO_ROOT / "specs" / "prompts"
DEFAULT_GENERIC_PROMPT = "What is on your mind today?"


class PromptSetError(ValueError):
    """A prompt set file is missing, unreadable or does not match the schema."""


class PromptSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    prompts: list[str] = Field(min_length=1)
    control_prompts: list[str] = Field(default_factory=list)
    generic_prompt: str = DEFAULT_GENERIC_PROMPT

    def swept(self, max_prompts: int | None = None) -> list[tuple[str, str]]:
        """``(kind, prompt)`` a steering sweep asks at each α: the topic prompts, the control prompts (each
        capped at ``max_prompts``) and the generic prompt."""
        return ([("topic", p) for p in self.prompts[:max_prompts]]
                + [("control", p) for p in self.control_prompts[:max_prompts]] + [("generic", self.generic_prompt)])


def load_prompt_set(path_or_name: str | Path) -> PromptSet:
    """Load a prompt set from a YAML path or by name from ``specs/prompts/``."""
    return load_yaml_model(named_or_path(path_or_name, PROMPT_DIR), PromptSet, PromptSetError, "prompt set")
