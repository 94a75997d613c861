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


def test_a_text_gets_the_same_vector_alone_in_a_batch_and_from_the_cache():
    texts = [
        "The treaty was signed in 1987.",
        "A much longer sentence about rivers, fish, and the two countries that share them after a quarrel.",
        "Short.",
    ]
    alone = [embed([t])[0] for t in texts]  # the first call for each text: computed, then cached
    import evals.embedding as embedding

    embedding._cache.clear()
    batched = embed([texts[1], texts[0], texts[1], texts[2]])  # recomputed together, length-sorted
    assert batched.shape == (4, 384)
    assert torch.equal(batched[0], batched[2])  # a repeated text: one vector
    for vector, index in zip(batched, [1, 0, 1, 2], strict=True):
        assert torch.allclose(vector, alone[index], atol=1e-5)
    again = embed(texts)  # all cached now
    for vector, index in zip(again, [0, 1, 2], strict=True):
        assert torch.equal(vector, batched[[1, 0, 3][index]])
    assert embed([]).shape == (0, 384)
