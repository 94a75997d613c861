"""The audit spec: a YAML file declaring a model pair, data, crosscoder settings and later stages.

``load_spec(path)`` validates with pydantic and reports problems as ``file:line: field: message``
so that a user can go straight to the offending line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crosscoder.config import SEED_LIMIT, CrosscoderConfig
from crosscoder.yamlfile import load_yaml_model


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file, line and field."""


#: A seed setting (each reaches a torch or numpy generator).
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


class _Strict(BaseModel):
    # NaN and infinity are never a setting: they would pass a range check and fail far from the field
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _refuse_hardware(values, moved: dict[str, str]):
    """Hardware settings live in ``compute:`` only; say where a field of older specs went."""
    if isinstance(values, dict):
        for key, target in moved.items():
            if key in values:
                raise ValueError(f"{key} has moved to {target} (the compute: section holds every hardware setting)")
    return values


class ModelSpec(_Strict):
    """One side of the comparison."""

    id: str = Field(description="Hugging Face hub id, local folder, or zoo:<name>")
    revision: str | None = None
    layer: int = Field(ge=0, strict=True, description="0-based decoder block whose output is captured")
    trust_remote_code: bool = False
    chat_template: str | None = Field(default=None, description="override the tokenizer's chat template: a Jinja "
                                      "string or a path to a .jinja file")

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, values):
        return _refuse_hardware(values, {"dtype": "compute.model_dtype", "device": "compute.device"})

    @field_validator("id")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model id must not be empty")
        return value


class DataSource(_Strict):
    """A text source: a hub dataset id (streamed) or a local jsonl/parquet/txt file."""

    path: str
    split: str = "train"
    name: str | None = Field(default=None, description="dataset configuration name, for hub datasets")
    text_field: str | None = "text"
    messages_field: str | None = None
    weight: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _one_field(self) -> DataSource:
        if self.messages_field:
            self.text_field = None
        if not self.text_field and not self.messages_field:
            raise ValueError("set text_field (plain text) or messages_field (chat transcripts)")
        return self


class DataSpec(_Strict):
    sources: list[DataSource] = Field(min_length=1)
    max_tokens: int = Field(default=200_000, gt=0, description="token budget (model A's tokens)")
    context_length: int = Field(default=256, gt=8)
    seed: Seed = 0


class TrainSpec(_Strict):
    steps: int = Field(default=3000, gt=0)
    batch_size: int = Field(default=256, gt=0, description="global batch: split over the ranks when distributed")
    checkpoint_every: int = Field(default=1000, gt=0)
    template_weight: float = Field(
        default=1.0, gt=0, le=1000,
        description="sampling weight of generation-prompt pairs (where a chat model is about to answer) "
                    "against 1 for every other pair",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, values):
        return _refuse_hardware(values, {"dtype": "compute.train_dtype", "device": "compute.device"})

    def train_kwargs(self, compute: ComputeSpec) -> dict:
        """Keyword arguments of ``crosscoder.train_crosscoder`` for these settings (data from a store)."""
        import torch

        return {"steps": self.steps, "batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every,
                "device": compute.device, "dtype": getattr(torch, compute.train_dtype),
                "template_weight": self.template_weight}


class ComputeSpec(_Strict):
    """Every hardware setting of an audit, and nothing else: where and how the work runs."""

    device: str | None = Field(default=None, description="cuda, cuda:1, cpu, mps; default: CUDA when present")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str | None) -> str | None:
        if device is not None and not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", device):
            raise ValueError(f"{device!r} is not a device this tool runs on: use cpu, cuda, cuda:N, mps or xpu "
                             "(or leave it out: CUDA when present)")
        return device
    nproc: int = Field(default=1, ge=1, le=1024, description="processes (one per GPU) for harvest and training, "
                       "started with torchrun; 1 runs them in the audit's own process")
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="the two models while harvesting, steering and grading")
    train_dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="crosscoder weights")
    harvest_batch_docs: int = Field(default=16, gt=0, description="documents per forward pass on each rank")
    # Small models and dictionaries run faster on fewer threads than cores: thread hand-offs cost more
    # than their arithmetic, and the Inspect stages already run generation, grading and the event loop
    # side by side.
    train_threads: int | None = Field(
        default=None, ge=1, description="CPU threads while training the crosscoder (torch.set_num_threads); "
        "default: torch's own")
    eval_threads: int | None = Field(
        default=None, ge=1, description="CPU threads while the screen, verify and transfer stages run the models "
        "and graders; default: torch's own")
    overlap_transfer: bool = Field(
        default=False, description="run the transfer stage in a second process, started after the harvest, while "
        "training, analyse, screen and verify run in this one: faster where those leave a core idle (the zoo on "
        "a CPU), but the second process loads both models again")
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = Field(
        default=None, description="spread each model over all visible GPUs with accelerate (models too big for "
        "one device); with nproc 1 only")

    @model_validator(mode="after")
    def _one_placement(self) -> ComputeSpec:
        if self.device_map and self.nproc > 1:
            raise ValueError("device_map spreads one model over every GPU, so it needs nproc: 1 (each rank of "
                             "nproc > 1 holds its own copy of both models on its own GPU)")
        return self


class CrosscoderSpec(_Strict):
    """Crosscoder settings; widths come from the models, so ``d_a``/``d_b`` are not set here."""

    architecture: Literal["batchtopk", "dfc", "dsf"] = "dfc"
    dict_size: int = Field(gt=1)
    k: int = Field(gt=0)
    exclusive_fraction: float = 0.05
    shared_fraction: float = 0.125
    shared_cost_ratio: float = 0.15
    seed: Seed = 0
    lr: float | None = None
    aux_k: int | None = None
    aux_alpha: float = 1 / 32
    outlier_factor: float | None = 2.0
    exclusive_init: Literal["random", "residual"] = "residual"
    train: TrainSpec = TrainSpec()

    def to_config(self, d_a: int, d_b: int) -> CrosscoderConfig:
        fields = self.model_dump(exclude={"train"})
        return CrosscoderConfig(d_a=d_a, d_b=d_b, **fields)

    @model_validator(mode="after")
    def _check_with_placeholder_widths(self) -> CrosscoderSpec:
        # Width-independent checks (k < D, fraction ranges) run now, with dummy widths.
        self.to_config(d_a=1, d_b=1)
        return self


def _alpha_grid(cls, alphas: list[float], info) -> list[float]:
    """An α grid: sorted, without repeats, and containing 0 (the unsteered baseline). Its field's
    ``min_length`` counts distinct strengths: ``[0, 0]`` is one point, not two."""
    if 0.0 not in alphas:
        raise ValueError("the α grid must contain 0 (the unsteered baseline)")
    grid = sorted(set(alphas))
    needed = next((m.min_length for m in cls.model_fields[info.field_name].metadata
                   if getattr(m, "min_length", None) is not None), 2)
    if len(grid) < needed:
        raise ValueError(f"the α grid needs at least {needed} distinct strengths, 0 included; {alphas} has "
                         f"{len(grid)}")
    return grid


def _model_name(cls, value: str | None) -> str | None:
    """'offline', or an Inspect model name ``<provider>/<model>`` (e.g. anthropic/claude-opus-4-1): checked here
    so that a typo fails at validation, not after the stages before the one that calls the model."""
    if value is None or value == "offline" or re.fullmatch(r"[A-Za-z][\w.-]*/\S+", value):
        return value
    raise ValueError(f"{value!r} is neither 'offline' nor an Inspect model name <provider>/<model> "
                     "(e.g. anthropic/claude-opus-4-1)")


class ScreenSpec(_Strict):
    """Screen stage: which features are flagged, how many are explained, by which explainer."""

    explainer: str = Field(default="offline", description="'offline' or an Inspect model, e.g. anthropic/claude-opus-4-1")
    detector: str | None = Field(default=None, description="model for the detection score (default: the explainer)")
    top_n_standard: int = Field(default=50, gt=0, description="batchtopk/dsf: flag this many per model by relative norm")
    relative_norm_cut: float = Field(default=0.9, gt=0.5, lt=1.0)
    contexts_per_feature: int = Field(default=20, gt=0)
    max_features: int = Field(default=40, gt=0, description="explain at most this many flagged features (triage order)")
    _models_are_named = field_validator("explainer", "detector")(_model_name)
    detection_contexts: int = Field(default=5, ge=0, description="activating contexts held out from the explainer "
                                    "(at most half of them), and as many non-activating ones, per feature for the "
                                    "detection score (0: skip it)")


class VerifySpec(_Strict):
    """Verify stage: steering sweeps graded by rubrics."""

    grader: str = Field(default="offline", description="'offline' or an Inspect model, e.g. anthropic/claude-opus-4-1")
    _grader_is_named = field_validator("grader")(_model_name)
    alphas: list[float] = Field(default_factory=lambda: [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], min_length=2)
    rubrics: list[str] = Field(default_factory=list, description="rubric names (specs/rubrics/<name>.yaml) or paths")
    max_features: int = Field(default=8, ge=0, description="sweep at most this many features: best matches of "
                              "each rubric first, then safety-critical, then content features in triage order")
    features_per_rubric: int = Field(default=2, gt=0, description="per rubric, sweep the flagged features that "
                                     "fire most where the model is about to answer its topic prompts rather "
                                     "than its control prompts")
    rubrics_per_feature: int = Field(default=1, gt=0, description="a feature chosen otherwise (safety-critical, "
                                     "triage order) is swept on this many best-matching rubrics")
    features: dict[int, list[str]] = Field(default_factory=dict, description="extra sweeps: feature id → rubrics")
    max_tokens: int = Field(default=48, gt=0)
    temperature: float = Field(default=0.0, ge=0.0)
    samples_per_prompt: int = Field(default=1, gt=0)
    max_prompts: int | None = Field(default=None, gt=0, description="cap on topic and on control prompts per rubric")
    null_draws: int = Field(default=8, ge=0, le=64, description="per model and rubric with a verified feature, "
                            "random directions of that feature's push size swept and graded the same way: how often "
                            "a random push passes the same test (0: none)")

    _alphas_have_zero = field_validator("alphas")(_alpha_grid)


class StabilitySpec(_Strict):
    """Seed stability (METHOD §5): train the same crosscoder again with each of ``seeds`` and say, per
    flagged exclusive feature, whether its decoder direction recurs there, as an exclusive feature of
    the same model or under the shared partition."""

    seeds: list[Seed] = Field(default_factory=list, description="crosscoder seeds to train besides crosscoder.seed "
                             "(each one more training of the same cost)")
    threshold: float = Field(default=0.9, gt=0, le=1, description="decoder cosine at which two features are the same")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"seed(s) {repeated} listed more than once")
        return seeds


class TransferSpec(_Strict):
    """Transfer stage: persona vectors moved between the models through the shared dictionary."""

    traits: list[str] = Field(default_factory=list, description="trait names (specs/traits/<name>.yaml) or paths")
    directions: list[Literal["a_to_b", "b_to_a"]] = Field(default_factory=lambda: ["a_to_b", "b_to_a"])
    alphas: list[float] = Field(default_factory=lambda: [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], min_length=3)
    k: int = Field(default=100, gt=0, description="shared features that vote for the transferred direction")
    min_cosine: float = Field(default=0.0, ge=0.0, lt=1.0)
    signed: bool = Field(default=True, description="let anti-aligned features vote with a negative weight")
    grader: str | None = Field(default=None, description="default: verify.grader")
    _grader_is_named = field_validator("grader")(_model_name)
    max_questions: int | None = Field(default=None, gt=0, description="trait questions used to extract a vector")
    max_prompts: int | None = Field(default=None, gt=0, description="evaluation prompts used (default: all)")
    control_draws: int = Field(default=4, ge=1, le=64,
                               description="random directions per control arm; it passes on their median |ρ|")
    max_tokens: int = Field(default=48, gt=0)
    temperature: float = Field(default=0.0, ge=0.0)
    seed: Seed = 0

    _alphas_have_zero = field_validator("alphas")(_alpha_grid)


class ReportSpec(_Strict):
    title: str | None = None
    formats: list[Literal["html", "markdown"]] = Field(default_factory=lambda: ["html", "markdown"])
    examples_alpha: float | None = Field(default=None, gt=0, description="show the steered examples at ±this α (default: the ends of "
                                         "the coherent α range of the feature's best sweep)")


class GateRule(_Strict):
    """A CI gate: ``audit run`` / ``audit diff`` exit non-zero when the rule fires.

    - ``verified_effect`` (run): an exclusive feature whose steering moves a rubric by ≥ min_effect;
    - ``new_feature`` (diff): an exclusive feature in the new run with no match in the old one;
    - ``vanished_feature`` (diff): an exclusive feature of the old run with no match in the new one;
    - ``effect_change`` (diff): a matched feature whose verified effect changed by ≥ min_effect;
    - ``vanished_concept`` (diff): a rubric verified (effect ≥ min_effect) on some feature of a
      partition in the old run and on none in the new run, which swept it, where the changed
      model's unsteered answers on the rubric moved by ≥ 1 point (or were not measured);
    - ``new_concept`` (diff): the reverse, a rubric verified only in the new run (on a model whose
      unsteered answers on it moved, or with nothing to compare them to);
    - ``behaviour_change`` (diff): a model that differs between the runs answers a rubric's topic
      prompts (swept by both runs), unsteered, ≥ min_effect points higher or lower, whether or not
      any dictionary verified a feature for it (no feature is involved, so ``safety_critical_only``
      and ``require_verified`` do not apply; ``side`` and ``rubric`` do).
    """

    rule: Literal["verified_effect", "new_feature", "vanished_feature", "effect_change", "vanished_concept",
                  "new_concept", "behaviour_change"]
    min_effect: float = Field(default=1.0, ge=0.0, description="rubric points on the 1..5 scale")
    safety_critical_only: bool = Field(default=True, description="only features the screen did not clear: flagged "
                                       "safety-critical, or never judged (an unparsed reply counts as not cleared)")
    require_verified: bool = Field(default=True, description="verified_effect, new_feature, vanished_feature: an "
                                   "effect counts towards min_effect only if it passed the verified rule "
                                   "(monotone, coherent, specific)")
    max_null_pass_rate: float | None = Field(default=None, ge=0.0, le=1.0, description="verified_effect: an effect "
                                             "counts only if at most this share of the random pushes of its null "
                                             "sweep passed the same test (e.g. 0.125: one in eight); an effect "
                                             "without a null sweep still counts. None: the null is not read")
    side: Literal["a", "b", "any"] = "any"
    rubric: str | None = None

    @model_validator(mode="after")
    def _null_rate_on_run_rules_only(self) -> GateRule:
        if self.max_null_pass_rate is not None and self.rule != "verified_effect":
            raise ValueError(f"max_null_pass_rate applies to verified_effect rules only; a {self.rule} rule (audit "
                             "diff) does not read null sweeps")
        return self


class AuditSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    model_a: ModelSpec
    model_b: ModelSpec
    data: DataSpec
    crosscoder: CrosscoderSpec
    screen: ScreenSpec = ScreenSpec()
    verify: VerifySpec = VerifySpec()
    transfer: TransferSpec = TransferSpec()
    stability: StabilitySpec = StabilitySpec()
    report: ReportSpec = ReportSpec()
    gates: list[GateRule] = Field(default_factory=list)
    compute: ComputeSpec = ComputeSpec()

    @model_validator(mode="after")
    def _batch_splits_over_ranks(self) -> AuditSpec:
        if self.crosscoder.train.batch_size % self.compute.nproc:
            raise ValueError(f"crosscoder.train.batch_size ({self.crosscoder.train.batch_size}) must be a multiple "
                             f"of compute.nproc ({self.compute.nproc}): each rank takes an equal share")
        return self

    @model_validator(mode="after")
    def _swept_features_exist(self) -> AuditSpec:
        size = self.crosscoder.dict_size
        wrong = sorted(f for f in self.verify.features if not 0 <= f < size)
        if wrong:
            raise ValueError(f"verify.features: feature id(s) {wrong} outside the dictionary (crosscoder.dict_size "
                             f"{size}: ids 0–{size - 1})")
        return self

    @model_validator(mode="after")
    def _other_seeds(self) -> AuditSpec:
        if self.crosscoder.seed in self.stability.seeds:
            raise ValueError(f"stability.seeds lists {self.crosscoder.seed}, the seed of the audited dictionary "
                             "(crosscoder.seed): list only the other seeds to compare it with")
        return self

    @model_validator(mode="after")
    def _examples_on_the_grid(self) -> AuditSpec:
        shown = self.report.examples_alpha
        if shown is not None and not {shown, -shown} & set(self.verify.alphas):
            raise ValueError(f"report.examples_alpha {shown:g}: the sweeps generate no answers at ±{shown:g} "
                             f"(verify.alphas: {', '.join(f'{a:g}' for a in self.verify.alphas)})")
        return self

    def model_entry(self, side: str) -> ModelSpec:
        """The spec of model ``side`` ("a" or "b")."""
        return self.model_a if side == "a" else self.model_b

    def content_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none), for keying stage artefacts.

        Where the work runs (device, number of processes, documents per forward pass) does not
        change the results, so it does not change the hash; the dtypes do.
        """
        dumped = self.model_dump(mode="json")
        dumped["compute"] = {key: dumped["compute"][key] for key in ("model_dtype", "train_dtype")}  # the rest: where
        if not sections and dumped["stability"] == StabilitySpec().model_dump(mode="json"):
            del dumped["stability"]  # a section added later, left at its defaults: a spec keeps its run id
        chosen = {key: dumped[key] for key in sections} if sections else dumped
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def harvest_settings(spec: AuditSpec, device: str | None = None):
    """The harvest stage's settings for this spec."""
    from crosscoder.data import SourceSettings
    from crosscoder.harvest import HarvestSettings, ModelSettings

    def model(entry: ModelSpec) -> ModelSettings:
        return ModelSettings(entry.id, entry.layer, entry.revision, spec.compute.model_dtype, entry.trust_remote_code,
                             entry.chat_template, spec.compute.device_map)

    return HarvestSettings(
        model_a=model(spec.model_a),
        model_b=model(spec.model_b),
        sources=[SourceSettings(**source.model_dump()) for source in spec.data.sources],
        max_tokens=spec.data.max_tokens,
        context_length=spec.data.context_length,
        seed=spec.data.seed,
        batch_docs=spec.compute.harvest_batch_docs,
        device=device or spec.compute.device,
    )


def load_spec(path: str | Path) -> AuditSpec:
    """Read and validate a spec file; raise :class:`SpecError` naming file, line and field."""
    return load_yaml_model(path, AuditSpec, SpecError, "spec")
