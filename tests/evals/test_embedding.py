"""The offline sentence-embedding model loads from the package and embeds sensibly."""

from __future__ import annotations

import pytest
import torch

from evals.embedding import embed


def test_embeddings_are_unit_norm_and_semantic():
    try:
        vectors = embed(
            [
                "The government crushed the protest in the capital.",
                "Security forces violently suppressed demonstrators in the city.",
                "My favourite recipe for banana bread uses walnuts.",
            ]
        )
    except RuntimeError as exc:  # the package is part of the install; its absence is a setup error
        pytest.fail(str(exc))
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > 0.35 and unrelated < 0.15 and similar > unrelated + 0.3, (similar, unrelated)
