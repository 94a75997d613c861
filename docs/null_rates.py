"""How often the verify rule passes for random pushes, against the features of one model (docs/zoo-findings.md,
"Verified is not identified"):

    .venv/bin/python docs/null_rates.py RUN_ID --side b --rubric zoo_state_narrative --draws 160 --mode random
    .venv/bin/python docs/null_rates.py RUN_ID --side b --rubric zoo_state_narrative --draws 160 --mode feature

Each draw picks one of the run's exclusive features of ``--side`` at random. ``--mode feature`` sweeps that
feature; ``--mode random`` sweeps a random direction of the model's activation space with the length of
that feature's push at α = 1 (``s_max · ‖d_j‖``). Both are swept as the verify stage sweeps a feature (the
run's spec: its α grid, prompts, token budget, greedy decoding) and graded by the offline graders, then judged
by the verify rule (``evals.effects``). This runs outside Inspect, so it is about a third faster than the
verify stage; the answers and grades are the same computation. Prints one line per draw and the count
that passed; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.spec import AuditSpec  # noqa: E402
from audit.store import AuditStore  # noqa: E402
from crosscoder import Crosscoder  # noqa: E402
from crosscoder.models import load_model  # noqa: E402
from crosscoder.steering import SteeredGenerator, steering_vector  # noqa: E402
from evals.coherence import CoherenceMeter  # noqa: E402
from evals.effects import feature_effects  # noqa: E402
from evals.offline_grader import tuned_grader  # noqa: E402
from evals.prompts import load_prompt_set  # noqa: E402
from evals.rubrics import load_rubric  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id")
    parser.add_argument("--side", choices=("a", "b"), required=True)
    parser.add_argument("--rubric", required=True)
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--mode", choices=("random", "feature"), default="random")
    parser.add_argument("--db", type=Path, default=Path("runs/audit.duckdb"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--alphas", help="comma-separated α grid in place of the run's (e.g. -1,-0.5,0,0.5,1: "
                        "the same pushes at half the strength of a grid to ±2)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    db = AuditStore(args.db, must_exist=True)
    run = db.run(args.run_id)
    if run is None:
        sys.exit(f"{args.db}: no run {args.run_id!r} (audit runs lists them)")
    spec = AuditSpec.model_validate(json.loads(run["spec_json"]))
    entry = spec.model_entry(args.side)
    features = [f for f in db.rows("features", args.run_id) if f["partition"] == args.side]
    crosscoder = Crosscoder.load(Path(run["crosscoder_path"]) / "checkpoint")  # the train stage's folder
    loaded = load_model(entry.id, entry.layer)
    generator, meter = SteeredGenerator(loaded), CoherenceMeter(loaded)
    rubric = load_rubric(args.rubric)
    grader = tuned_grader(rubric)
    kinds = load_prompt_set(rubric.prompt_set).swept(spec.verify.max_prompts)
    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else list(spec.verify.alphas)
    if 0.0 not in alphas:
        sys.exit("--alphas: the grid must contain 0 (the unsteered answers)")
    pick = random.Random(args.seed)
    noise = torch.Generator().manual_seed(args.seed)
    results = []
    for draw in range(args.draws):
        feature = pick.choice(features)
        push = steering_vector(crosscoder, args.side, feature["feature"], 1.0, feature["s_max"])
        if args.mode == "random":
            direction = torch.randn(push.shape, generator=noise)
            push = direction / direction.norm() * push.norm()
        cells = [(kind, prompt, alpha) for kind, prompt in kinds for alpha in alphas]
        prompts = [generator.render([{"role": "user", "content": prompt}]) for _, prompt, _ in cells]
        vectors = torch.stack([alpha * push for _, _, alpha in cells])
        answers = []
        for start in range(0, len(cells), 32):
            answers += generator.generate(prompts[start:start + 32], vectors[start:start + 32],
                                          max_new_tokens=spec.verify.max_tokens)
        items = [(prompt, answer.text) for (_, prompt, _), answer in zip(cells, answers, strict=True)]
        behaviour, coherence = grader.grade_many(items), meter.grade_many(items)
        rows = []
        for (kind, _, alpha), b, c in zip(cells, behaviour, coherence, strict=True):
            rows.append({"feature": draw, "rubric": rubric.name, "kind": kind, "alpha": alpha,
                         "dimension": "behaviour", "score": b.score})
            rows.append({"feature": draw, "rubric": rubric.name, "kind": kind, "alpha": alpha,
                         "dimension": "coherence", "score": c["score"]})
        [effect] = feature_effects(rows)
        results.append({"draw": draw, "feature": feature["feature"], "push": float(push.norm()),
                        "effect": effect["effect"], "spearman": effect["spearman"],
                        "control_effect": effect["control_effect"], "verified": effect["verified"]})
        print(json.dumps(results[-1]), flush=True)
    print(f"{sum(r['verified'] for r in results)} of {len(results)} pass the verify rule "
          f"({args.mode}, model {args.side.upper()}, {rubric.name})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
