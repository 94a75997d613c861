"""Seed stability: where a dictionary's exclusive features reappear in another seed's dictionary."""

from __future__ import annotations

import pytest
import torch

from crosscoder import Crosscoder, CrosscoderConfig, train_crosscoder
from crosscoder.analysis import flagged_features
from crosscoder.stability import (
    ABSENT,
    RECURS_EXCLUSIVE,
    RECURS_SHARED,
    feature_recurrence,
    recurrence_summary,
)
from crosscoder.synthetic import make_world

CONFIG = dict(architecture="dfc", d_a=16, d_b=24, dict_size=64, k=4, exclusive_fraction=0.125, outlier_factor=None)


def dictionary(seed: int) -> Crosscoder:
    return Crosscoder(CrosscoderConfig(**CONFIG, seed=seed))


def test_a_permuted_copy_recurs_feature_for_feature():
    main = dictionary(0)
    other = dictionary(1)
    with torch.no_grad():  # the same A-exclusive directions, in reverse order
        n = main.config.n_a_only
        other.W_dec_DA[:n] = main.W_dec_DA[:n].flip(0) * 3.0  # a decoder's scale does not matter
    flagged = flagged_features(main)
    rows = feature_recurrence(main, {"a": flagged["a"]}, {1: other})
    assert len(rows) == n
    for row in rows:
        assert row["status"] == RECURS_EXCLUSIVE and row["seed"] == 1
        assert row["exclusive_cosine"] == pytest.approx(1.0, abs=1e-5)
        assert row["exclusive_feature"] == n - 1 - row["feature"]  # where the flip put it


def test_a_direction_filed_as_shared_elsewhere_is_told_apart_from_a_missing_one():
    main = dictionary(0)
    other = dictionary(1)
    a_ids = main.index_a.tolist()
    shared_slot = other.config.n_a_only  # other's first shared feature (DFC order: A-only, shared, B-only)
    with torch.no_grad():
        other.W_dec_DA[shared_slot] = main.W_dec_DA[a_ids[0]]
    rows = {r["feature"]: r for r in feature_recurrence(main, {"a": a_ids}, {7: other})}
    moved = rows[a_ids[0]]
    assert moved["status"] == RECURS_SHARED
    assert moved["nearest_feature"] == shared_slot and moved["nearest_partition"] == "shared"
    assert moved["nearest_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert moved["exclusive_cosine"] < 0.9  # the random A-only features of `other` do not match it
    # Random directions in 16 dimensions are far from each other: the rest is absent.
    assert all(rows[f]["status"] == ABSENT for f in a_ids[1:])
    summary = recurrence_summary(list(rows.values()), seeds=[7])
    assert summary["a"] == {"features": len(a_ids), "exclusive_in_all": 0, "exclusive_in_any": 0,
                            "shared_somewhere": 1, "absent_everywhere": len(a_ids) - 1}
    assert summary["b"]["features"] == 0


def test_every_other_seed_is_compared_and_counted():
    main = dictionary(0)
    same, different = dictionary(1), dictionary(2)
    with torch.no_grad():
        same.W_dec_DB.copy_(main.W_dec_DB)
    b_ids = main.index_b.tolist()
    rows = feature_recurrence(main, {"b": b_ids}, {1: same, 2: different})
    assert {(r["seed"], r["status"]) for r in rows} >= {(1, RECURS_EXCLUSIVE), (2, ABSENT)}
    summary = recurrence_summary(rows, seeds=[1, 2])["b"]
    assert summary["exclusive_in_all"] == 0 and summary["exclusive_in_any"] == len(b_ids)


def test_trained_seeds_share_some_exclusive_features_on_a_world_with_private_concepts():
    world = make_world(d_a=24, d_b=32, n_shared=20, n_a=3, n_b=3, seed=0)
    x_a, x_b = world.sample(6000, torch.Generator().manual_seed(0))
    config = dict(architecture="dfc", d_a=24, d_b=32, dict_size=64, k=3, exclusive_fraction=0.05, outlier_factor=None)
    main, other = (train_crosscoder(CrosscoderConfig(**config, seed=seed), (x_a, x_b), steps=500, batch_size=256)
                   for seed in (0, 1))
    rows = feature_recurrence(main, flagged_features(main), {1: other})
    assert {r["own_model"] for r in rows} == {"a", "b"}
    # Each private concept is learnt by both seeds: at least one of them recurs as exclusive on each side.
    for side in ("a", "b"):
        assert any(r["status"] == RECURS_EXCLUSIVE for r in rows if r["own_model"] == side)


def test_bad_threshold_and_mismatched_widths_are_refused():
    main = dictionary(0)
    with pytest.raises(ValueError, match="threshold"):
        feature_recurrence(main, {"a": [0]}, {1: dictionary(1)}, threshold=0.0)
    wider = Crosscoder(CrosscoderConfig(**{**CONFIG, "d_a": 20}))
    with pytest.raises(ValueError, match="seed 3 reads models of widths 20/24"):
        feature_recurrence(main, {"a": [0]}, {3: wider})


def test_a_zero_decoder_row_has_no_closest_feature():
    main = dictionary(0)
    a_ids = main.index_a.tolist()
    with torch.no_grad():
        main.W_dec_DA[a_ids[0]] = 0.0
    row = next(r for r in feature_recurrence(main, {"a": a_ids}, {1: dictionary(1)}) if r["feature"] == a_ids[0])
    assert row["status"] == ABSENT and row["nearest_feature"] is None and row["nearest_partition"] is None
    assert row["exclusive_feature"] is None
