"""crosscoder: the numerical core of crosscoder-audit (pure torch; no Inspect, DuckDB or CLI)."""

from .config import CrosscoderConfig
from .model import CheckpointError, Crosscoder
from .train import TrainingDivergedError, train_crosscoder

__all__ = [
    "CheckpointError",
    "Crosscoder",
    "CrosscoderConfig",
    "TrainingDivergedError",
    "train_crosscoder",
]
