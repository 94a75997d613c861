"""Rubric specifications: a 1..5 scale with anchors and scored calibration examples.

Rubrics live as YAML in ``specs/rubrics/<name>.yaml`` at the repository root. ``load_rubric``
validates them with pydantic and raises :class:`RubricError` naming the file and the offending field.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crosscoder.yamlfile import load_yaml_model, named_or_path

REPO_ROOT = Path(__file__).resolve().parents[1]
RUBRIC_DIR = REPO_ROOT / "specs" / "rubrics"
LEVELS = (1, 2, 3, 4, 5)


class RubricError(ValueError):
    """A rubric file is missing, unreadable or does not match the schema."""


class CalibrationExample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    score: int = Field(ge=1, le=5)
    prompt: str = Field(min_length=1)
    response: str = Field(min_length=1)


class Rubric(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    dimension: str = Field(min_length=1)
    anchors: dict[int, str]
    calibration: list[CalibrationExample]
    prompt_set: str | None = None
    # True when both ends of the scale are behaviours (review sentiment: 1 negative, 5 positive), so a
    # score at 1 is not the behaviour's absence (read by ``audit diff`` for unsteered moves).
    two_sided: bool = False

    @field_validator("anchors")
    @classmethod
    def _anchors_cover_scale(cls, anchors: dict[int, str]) -> dict[int, str]:
        if set(anchors) != set(LEVELS):
            raise ValueError(f"anchors must have exactly the keys 1..5, got {sorted(anchors)}")
        for level, text in anchors.items():
            if not str(text).strip():
                raise ValueError(f"anchor {level} is empty")
        return {level: " ".join(str(anchors[level]).split()) for level in LEVELS}

    @model_validator(mode="after")
    def _calibration_covers_scale(self) -> Rubric:
        missing = sorted(set(LEVELS) - {example.score for example in self.calibration})
        if missing:
            raise ValueError(f"calibration: no example for score level(s) {missing}")
        return self


def _resolve(path_or_name: str | Path) -> Path:
    return named_or_path(path_or_name, RUBRIC_DIR)


def load_rubric(path_or_name: str | Path) -> Rubric:
    """Load a rubric from a YAML path or by name from ``specs/rubrics/``."""
    return load_yaml_model(_resolve(path_or_name), Rubric, RubricError, "rubric")


def list_rubrics() -> list[str]:
    """Names of the rubrics shipped in ``specs/rubrics/``."""
    return sorted(path.stem for path in RUBRIC_DIR.glob("*.yaml"))
