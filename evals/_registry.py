"""Imported by Inspect through the ``inspect_ai`` entry point: registers this package's model providers."""

from evals.offline import offline  # noqa: F401
from evals.provider import steered  # noqa: F401
