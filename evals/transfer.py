"""Transfer eval: does a direction moved through the shared dictionary steer the other model alike?

For a trait (``specs/traits/<name>.yaml``) and a direction of transfer (A→B or B→A):

* ``source``: the source model steered with its own persona vector ``α · v``;
* ``transferred``: the target model steered with ``α · transfer(v)``;
* ``random_transferred``: the target steered with a random source direction of ``v``'s norm,
  transferred the same way (does *any* transferred vector move the rubric?);
* ``unrelated``: the target steered with a random target direction of the transferred vector's
  norm (does any push of that size move it?).

Each arm is swept over the α grid on the trait's evaluation prompts and graded on the trait's
rubric (and coherence). A control arm is not one random direction but several (``draws``): one
draw decides nothing, since in a small model a random push of that size has a sizeable chance of
lining up with the trait by luck (on the zoo, single draws in two demo runs gave ρ −0.95 and +0.02).
Each draw's ρ and effect are kept, and the plotted curve pools the draws.

Two verdicts, because the controls answer two questions:

* the transfer *holds* (the dictionary aligns the spaces for this direction) when the transferred
  arm's dose-response has Spearman |ρ| ≥ ``HOLD_SPEARMAN`` with the same sign as the source arm,
  while random source directions moved the same way do not move the target: the
  ``random_transferred`` draws' median |ρ| stays at or below ``CONTROL_SPEARMAN``;
* the trait is *specific* in the target when ``unrelated`` pushes of the same size do not move it
  either (their median |ρ| ≤ ``CONTROL_SPEARMAN``). When it is not, any push of that size moves
  the rubric one way or the other, and the evidence for the transfer is that it moved it the
  source's way while transferred random directions did not. On the zoo the sentiment of a neutral
  review request is such a trait: it is decided by one knife-edge first token.

The verdicts and their thresholds live in ``evals.effects`` (the report recomputes them from stored
rows without importing Inspect). Medians over draws, not the pooled curve's ρ: draws that push the trait in opposite directions
cancel in the pooled curve, so more draws would pass more easily.
"""

from __future__ import annotations

from pathlib import Path

from inspect_ai import Task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.solver import Generate, TaskState, solver

from evals.coherence import CoherenceMeter
from evals.effects import ARMS, feature_effects
from evals.verify import rubric_scorer
from evals.verify_stage import check_log, grading, run_eval, steered_model


@solver
def vector_steered_generation(max_tokens: int = 64, temperature: float = 0.0):
    async def solve(state: TaskState, generate: Generate) -> TaskState:
        m = state.metadata
        steer = None if m["alpha"] == 0 else {"vector": m["vector"], "alpha": m["alpha"], "file": m["vectors_file"]}
        return await generate(state, max_tokens=max_tokens, temperature=temperature, seed=int(m.get("seed", 0)),
                              extra_body={"steer": steer})

    return solve


def draw_key(arm: str, draw: int) -> str:
    """The name of a control arm's ``draw``-th vector in the vectors file."""
    return f"{arm}.{draw}"


def transfer_task(arms: dict[str, list[str]], vectors_file: Path, prompts: list[str], rubric: str,
                  alphas: list[float], grader: str = "offline", coherence_meter=None, max_tokens: int = 48,
                  temperature: float = 0.0) -> Task:
    """``arms``: each arm's vector names in ``vectors_file`` (one for a plain arm, several for a control)."""
    samples = [
        Sample(id=f"{vector}-p{i}-a{alpha:+g}", input=prompt,
               metadata={"arm": arm, "vector": vector, "vectors_file": str(vectors_file), "alpha": float(alpha),
                         "prompt": prompt, "rubric": rubric, "kind": "topic", "feature": ARMS.index(arm), "seed": 0})
        for arm, vectors in arms.items() for vector in vectors for i, prompt in enumerate(prompts) for alpha in alphas
    ]
    return Task(dataset=MemoryDataset(samples, name="transfer"),
                solver=vector_steered_generation(max_tokens=max_tokens, temperature=temperature),
                scorer=rubric_scorer(grader=grader, coherence_meter=coherence_meter), name="transfer")


def run_arms(model_entry, side: str, crosscoder_path: Path | None, vectors_path: Path, arms: dict[str, list[str]],
             prompts: list[str], rubric: str, transfer_spec, grader: str, loaded_model, log_dir: Path,
             coherence_meter: CoherenceMeter | None = None) -> list[dict]:
    """Sweep ``arms`` (arm → its vector names) on one model; per-arm curves pooled over the arm's
    vectors, each vector's own ρ and effect (``draws``, for arms of several vectors), and generations."""
    model = steered_model(model_entry, side, crosscoder_path, loaded_model)
    grader, meter, roles = grading(grader, coherence_meter)
    task = transfer_task(arms, vectors_path, prompts, rubric, list(transfer_spec.alphas),
                         grader=grader, coherence_meter=meter,
                         max_tokens=transfer_spec.max_tokens, temperature=transfer_spec.temperature)
    log = run_eval(task, log_dir, model=model, model_roles=roles or None)
    check_log(log, f"transfer sweep of {', '.join(arms)}")
    vector_ids = {vector: i for i, vector in enumerate(v for vectors in arms.values() for v in vectors)}
    rows, per_vector, generations = [], [], {arm: [] for arm in arms}
    for sample in log.samples or []:
        m = sample.metadata
        answer = sample.output.completion if sample.output else ""
        generations[m["arm"]].append({"prompt": m["prompt"], "alpha": m["alpha"], "vector": m["vector"],
                                      "answer": answer})
        if not sample.scores:
            continue
        value = next(iter(sample.scores.values())).value
        for dimension in ("behaviour", "coherence"):
            row = {"feature": m["feature"], "rubric": rubric, "kind": "topic", "alpha": m["alpha"],
                   "dimension": dimension, "score": value.get(dimension)}
            rows.append(row)
            per_vector.append({**row, "feature": vector_ids[m["vector"]]})
    effects = {ARMS[e["feature"]]: e for e in feature_effects(rows)}
    vector_effects = {e["feature"]: e for e in feature_effects(per_vector)}
    out = []
    for arm, vectors in arms.items():
        pooled = effects.get(arm, {})
        draws = [{"vector": v, "spearman": vector_effects.get(vector_ids[v], {}).get("spearman", float("nan")),
                  "effect": vector_effects.get(vector_ids[v], {}).get("effect", float("nan")),
                  "coherent": len(vector_effects.get(vector_ids[v], {}).get("coherent_alphas", []))} for v in vectors]
        out.append({"arm": arm, "spearman": pooled.get("spearman", float("nan")),
                    "effect": pooled.get("effect", float("nan")), "curve": pooled.get("curve", []),
                    "draws": draws if len(vectors) > 1 else [], "generations": generations[arm],
                    "eval_log": log.location})
    return out
