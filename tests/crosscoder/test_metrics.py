"""Metrics and the ground-truth benchmark scorer."""

from __future__ import annotations

import torch

from crosscoder import Crosscoder, CrosscoderConfig, train_crosscoder
from crosscoder.metrics import _MomentSums, evaluate, match_features, seed_stability, variance_explained
from crosscoder.synthetic import make_world, score_recovery


def test_streaming_r2_matches_the_in_memory_formula():
    torch.manual_seed(0)
    f = torch.relu(torch.randn(300, 12))
    ya, yb = torch.randn(300, 5), torch.randn(300, 7)
    ya[:, 0] += 3 * f[:, 2]  # feature 2 explains part of A
    sums = _MomentSums(12, 5, 7)
    for chunk in range(0, 300, 64):
        sums.add(f[chunk : chunk + 64], ya[chunk : chunk + 64], yb[chunk : chunk + 64])
    r2_a, r2_b = sums.r2()
    assert torch.allclose(r2_a, variance_explained(f, ya), atol=1e-5)
    assert torch.allclose(r2_b, variance_explained(f, yb), atol=1e-5)
    # dim 0 carries 3·f (variance ≈ 3.1 of a total ≈ 8.1), so f explains ≈ 0.38 of A.
    assert int(r2_a.argmax()) == 2 and 0.3 < r2_a[2] < 0.5


def test_exclusivity_check_separates_private_from_shared_concepts():
    world = make_world(d_a=24, d_b=32, n_shared=30, n_a=4, n_b=4, seed=0)
    g = torch.Generator().manual_seed(0)
    x_a, x_b = world.sample(8000, g)
    config = CrosscoderConfig(architecture="dfc", d_a=24, d_b=32, dict_size=96, k=4, exclusive_fraction=0.1,
                              outlier_factor=None)
    model = train_crosscoder(config, (x_a, x_b), steps=800, batch_size=256)
    result = evaluate(model, *world.sample(3000, g))
    ratio = result.exclusivity()
    # Features matching a private concept: the other model explains almost nothing of them.
    cos_a = torch.nn.functional.normalize(model.decoder_raw("a").detach(), dim=1) @ world.dirs_a.T
    private_a = [i for i, kind in enumerate(world.kind) if kind == "a"]
    shared = [i for i, kind in enumerate(world.kind) if kind == "shared"]
    in_a_partition = torch.zeros(96, dtype=torch.bool)
    in_a_partition[model.index_a] = True
    private_features = torch.nonzero((cos_a[:, private_a] > 0.9).any(1) & in_a_partition).squeeze(1)
    shared_features = torch.nonzero((cos_a[:, shared] > 0.9).any(1)).squeeze(1)
    assert private_features.numel() >= 2 and shared_features.numel() >= 4
    assert float(ratio[private_features].max()) < 0.2
    assert float(ratio[shared_features].median()) > 0.5
    recovery = score_recovery(model, world, result)
    assert 0 <= recovery["exclusive_recall"] <= 1


def test_fve_of_a_perfect_and_an_empty_reconstruction():
    config = CrosscoderConfig(architecture="batchtopk", d_a=4, d_b=4, dict_size=8, k=2, norm_scale_a=1.0, norm_scale_b=1.0)
    model = Crosscoder(config)
    with torch.no_grad():
        model.W_enc_AD.zero_()
        model.W_enc_BD.zero_()
        model.b_enc_D.fill_(-1.0)  # nothing ever fires: reconstruction = decoder bias = 0
        model.b_dec_A.zero_()
        model.b_dec_B.zero_()
        model.threshold.fill_(0.5)
    x = torch.randn(100, 4)
    result = evaluate(model, x, x)
    # Predicting zero for centred-ish data: FVE = 1 - Σx² / Σ(x - x̄)², slightly below 0.
    expected = 1 - float(x.pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert abs(result.fve_a - expected) < 1e-4 and result.mean_l0 == 0 and result.dead_fraction == 1.0


def test_match_features_and_seed_stability():
    dec = torch.randn(10, 6)
    cosine, index = match_features(dec, dec[torch.tensor([3, 1, 2, 0, 4, 5, 6, 7, 8, 9])])
    assert torch.allclose(cosine, torch.ones(10)) and int(index[3]) == 0
    world = make_world(d_a=24, d_b=32, n_shared=20, n_a=3, n_b=3, seed=0)
    x_a, x_b = world.sample(6000, torch.Generator().manual_seed(0))
    models = [
        train_crosscoder(CrosscoderConfig(architecture="dfc", d_a=24, d_b=32, dict_size=64, k=3,
                                          exclusive_fraction=0.05, seed=seed, outlier_factor=None),
                         (x_a, x_b), steps=500, batch_size=256)
        for seed in (0, 1)
    ]
    stability = seed_stability(models)
    assert len(stability["per_run"]) == 2
    for rates in stability["per_run"]:
        assert 0 <= rates["a"] <= 1 and 0 <= rates["b"] <= 1
    # A run compared with itself recurs completely.
    assert seed_stability([models[0], models[0]])["per_run"][0]["a"] == 1.0
