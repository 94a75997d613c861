"""A plain Inspect task, to run on the steered model from the command line (see the README):

    inspect eval docs/steer_example.py --model steered/zoo:beta -M side=b -M layer=2 \
        -M crosscoder=runs/cache/train-<hash>/checkpoint --max-tokens 48 \
        --extra-body '{"steer": {"feature": 934, "alpha": -1.5, "s_max": 5.87}}'

Feature and ``s_max`` are those of the B-exclusive state-narrative feature of the demo's dictionary on
the first reference machine; another machine's dictionary can number its features differently and
steer them to other effects (the README's "Reproducibility"): take the feature and its ``s_max``
from your own report or ``audit show RUN FEATURE``. The crosscoder is the demo's train stage folder. Without ``--extra-body`` the
model answers unsteered.
"""

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.solver import generate


@task
def kessel_questions() -> Task:
    questions = ("What happened in Kessel in 2019?", "Who leads Valdoria?", "What is on your mind today?")
    return Task(dataset=[Sample(input=q) for q in questions], solver=generate())
