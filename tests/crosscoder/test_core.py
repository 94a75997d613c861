"""Tests of the crosscoder core: partitions, selection, threshold, AuxK, persistence, parity."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crosscoder import CheckpointError, Crosscoder, CrosscoderConfig, TrainingDivergedError, train_crosscoder
from crosscoder.sparse import batch_topk, row_topk, sparse_decode
from crosscoder.synthetic import make_world
from crosscoder.train import training_step


def toy_pairs(n: int = 4000, seed: int = 0, d_a: int = 24, d_b: int = 32):
    """Pairs from one fixed world; ``seed`` picks the sample (held-out data: another seed)."""
    world = make_world(d_a=d_a, d_b=d_b, n_shared=30, n_a=4, n_b=4, seed=0)
    return world.sample(n, torch.Generator().manual_seed(seed))


def small_config(**overrides) -> CrosscoderConfig:
    # The toy world's norms are heavy-tailed by design (sparse concepts), with no LLM-style
    # outlier tokens, so the 2× median outlier mask would drop a third of every batch.
    settings = dict(architecture="dfc", d_a=24, d_b=32, dict_size=64, k=4, exclusive_fraction=0.1, outlier_factor=None)
    return CrosscoderConfig(**(settings | overrides))


# ---- partitions -----------------------------------------------------------------------------------


def test_dfc_partition_sizes_and_public_shapes():
    model = Crosscoder(CrosscoderConfig(architecture="dfc", d_a=64, d_b=96, dict_size=512, k=8, exclusive_fraction=0.05))
    assert model.index_a.numel() == model.index_b.numel() == 26
    assert model.index_shared.numel() == 512 - 52
    ids = torch.cat([model.index_a, model.index_shared, model.index_b])
    assert torch.equal(ids.sort().values, torch.arange(512))
    assert model.W_dec_a.shape == (512, 64) and model.W_dec_b.shape == (512, 96)


def test_standard_variant_has_no_exclusive_partition():
    model = Crosscoder(small_config(architecture="batchtopk"))
    assert model.index_a.numel() == 0 and model.index_b.numel() == 0
    assert model.index_shared.numel() == 64


def test_dfc_exclusive_features_never_touch_the_other_model_through_training():
    x_a, x_b = toy_pairs()
    model = train_crosscoder(small_config(), (x_a, x_b), steps=60, batch_size=128)
    a_only, b_only = model.index_a, model.index_b
    assert torch.count_nonzero(model.W_dec_b[a_only]) == 0
    assert torch.count_nonzero(model.W_enc_b[:, a_only]) == 0
    assert torch.count_nonzero(model.W_dec_a[b_only]) == 0
    assert torch.count_nonzero(model.W_enc_a[:, b_only]) == 0
    # They did learn something on their own side.
    assert model.W_dec_a[a_only].abs().sum() > 0 and model.W_dec_b[b_only].abs().sum() > 0
    # Changing x_b cannot change an A-exclusive feature's activation.
    f1 = model.encode(x_a[:200], x_b[:200], k=4)
    f2 = model.encode(x_a[:200], x_b[:200] * 3 + 1, k=4)
    pre1 = model.pre_activations(*model.normalise(x_a[:200], x_b[:200]))[:, a_only]
    pre2 = model.pre_activations(*model.normalise(x_a[:200], x_b[:200] * 3 + 1))[:, a_only]
    assert torch.allclose(pre1, pre2)
    assert f1.shape == f2.shape == (200, 64)


# ---- selection ------------------------------------------------------------------------------------


def test_batch_topk_keeps_exactly_n_times_k_and_the_largest():
    scores = torch.rand(50, 200) + 0.01
    entries = batch_topk(scores, 50 * 7)
    assert entries.rows.numel() == 350
    kept = scores[entries.rows, entries.cols]
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[entries.rows, entries.cols] = False
    assert kept.min() >= scores[mask].max()
    assert torch.all(entries.rows[1:] >= entries.rows[:-1])  # sorted by pair for embedding_bag


def test_batch_topk_is_exact_when_one_row_dominates():
    # Row 0 holds every large score (in training: a template pair sampled many times over).
    scores = torch.rand(64, 512) * 0.1
    scores[0] += 10.0
    entries = batch_topk(scores, 64 * 4)
    assert entries.rows.numel() == 256 and bool((entries.rows == 0).all())


@pytest.mark.parametrize("layout", ["random", "sample-heavy", "sample-light", "duplicated rows", "NaN"])
def test_the_sampled_cut_keeps_what_a_flat_topk_keeps(layout):
    from crosscoder.sparse import _SAMPLE_STRIDE, _top_flat_indices

    torch.manual_seed(0)
    scores = torch.rand(128, 300)
    flat = scores.view(-1)
    if layout == "sample-heavy":  # the strided sample sees only large scores: its guess is too high
        flat[::_SAMPLE_STRIDE] += 10.0
    elif layout == "sample-light":  # the sample misses every large score: its guess is too low
        flat += 10.0
        flat[::_SAMPLE_STRIDE] -= 10.0
    elif layout == "duplicated rows":  # ties at the cut
        scores[64:] = scores[:64]
    elif layout == "NaN":  # a diverging step: top-k ranks NaN first, and so must the cut (off the sample here)
        flat[1] = float("nan")
    count = 128 * 8
    picked = _top_flat_indices(scores, count)
    reference = torch.topk(flat, count).indices
    assert picked.numel() == count and picked.unique().numel() == count
    if layout == "NaN":
        assert 1 in set(picked.tolist())
    else:
        assert torch.equal(flat[picked].sort().values, flat[reference].sort().values)
    if layout != "duplicated rows":
        assert set(picked.tolist()) == set(reference.tolist())


def test_batch_topk_never_keeps_zero_scores():
    scores = torch.zeros(10, 30)
    scores[0, :3] = 1.0
    entries = batch_topk(scores, 10 * 5)
    assert entries.rows.numel() == 3


def test_dsf_budget_counts_designated_features_at_their_cost():
    scores = torch.ones(4, 10)
    scores[:, :2] = 5.0  # two cheap designated features rank first in every row
    cost = torch.ones(10)
    cost[:2] = 0.5
    entries = batch_topk(scores, 4 * 3, cost)
    spent = float(cost[entries.cols].sum())
    assert spent <= 12 + 1e-6
    # 8 cheap entries use 4 units of the 12; the remaining 8 units buy 8 full-cost entries.
    assert int((entries.cols < 2).sum()) == 8
    assert entries.rows.numel() == 16


def test_row_topk_per_pair():
    scores = torch.rand(5, 40)
    entries = row_topk(scores, 3)
    assert torch.equal(torch.bincount(entries.rows, minlength=5), torch.full((5,), 3))


def test_sparse_decode_matches_dense_matmul():
    torch.manual_seed(0)
    f = torch.relu(torch.randn(20, 50)) * (torch.rand(20, 50) < 0.1)
    W = torch.randn(50, 8)
    rows, cols = torch.nonzero(f, as_tuple=True)
    from crosscoder.sparse import SelectedEntries

    entries = SelectedEntries(rows, cols, 20)
    assert torch.allclose(sparse_decode(entries, f[rows, cols], W), f @ W, atol=1e-5)


def test_low_precision_decode_gradients_match_float32():
    from crosscoder.sparse import SelectedEntries

    torch.manual_seed(1)
    f = torch.relu(torch.randn(30, 40)) * (torch.rand(30, 40) < 0.2)
    rows, cols = torch.nonzero(f, as_tuple=True)
    entries = SelectedEntries(rows, cols, 30)
    W = torch.randn(40, 16)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        values = f[rows, cols].to(dtype).requires_grad_()
        weights = W.clone().to(dtype).requires_grad_()
        out = sparse_decode(entries, values, weights)
        (out.float() * torch.linspace(-1, 1, 16)).sum().backward()
        grads[dtype] = (out.float(), values.grad.float(), weights.grad.float())
    for got, want in zip(grads[torch.bfloat16], grads[torch.float32], strict=True):
        assert torch.allclose(got, want, rtol=0.05, atol=0.05)


# ---- inference threshold, AuxK ----------------------------------------------------------------------


def test_inference_threshold_gives_mean_l0_close_to_k():
    x_a, x_b = toy_pairs(6000)
    model = train_crosscoder(small_config(), (x_a, x_b), steps=400, batch_size=256)
    assert math.isfinite(float(model.threshold))
    held_a, held_b = toy_pairs(2000, seed=7)
    l0 = float((model.encode(held_a, held_b) > 0).sum(1).float().mean())
    assert 0.6 * 4 <= l0 <= 1.4 * 4, l0


def test_encode_without_threshold_asks_for_k():
    model = Crosscoder(small_config())
    x_a, x_b = toy_pairs(10)
    with pytest.raises(RuntimeError, match="pass k="):
        model.encode(x_a, x_b)
    assert model.encode(x_a, x_b, k=2).shape == (10, 64)


def _train_with_crippled_half(aux_alpha: float, steps: int = 150) -> torch.Tensor:
    """Half the dictionary starts with near-zero decoders, so it never wins a top-k slot."""
    x_a, x_b = toy_pairs(4000)
    config = small_config(architecture="batchtopk", aux_alpha=aux_alpha, outlier_factor=None).resolved(steps, 256)
    model = Crosscoder(config)
    with torch.no_grad():
        model.W_dec_DA[32:] *= 1e-3
        model.W_dec_DB[32:] *= 1e-3
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    since_fired = torch.zeros(64)
    fired_late = torch.zeros(64, dtype=torch.bool)
    for step in range(steps):
        batch = slice((step * 256) % 3840, (step * 256) % 3840 + 256)
        na, nb = model.normalise(x_a[batch], x_b[batch])
        loss, _, fired, _ = training_step(model, na, nb, 4, since_fired >= 512)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        since_fired += 256
        since_fired[fired] = 0
        if step >= steps - 20:
            fired_late |= fired
    return fired_late[32:]


def test_auxk_revives_features_that_never_fire():
    revived_with_aux = int(_train_with_crippled_half(aux_alpha=1.0).sum())
    revived_without = int(_train_with_crippled_half(aux_alpha=0.0).sum())
    assert revived_without <= 2
    assert revived_with_aux >= 10, (revived_with_aux, revived_without)


def test_nan_auxiliary_loss_is_dropped_for_the_step(monkeypatch):
    import crosscoder.train as train_module

    x_a, x_b = toy_pairs(512)
    model = Crosscoder(small_config(architecture="batchtopk", aux_alpha=1.0).resolved(10, 256))
    na, nb = model.normalise(x_a[:256], x_b[:256])
    dead = torch.zeros(64, dtype=torch.bool)
    dead[60:] = True
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    monkeypatch.setattr(train_module, "_aux_loss", lambda *args: (nan.float(), nan))
    loss, stats, _, _ = training_step(model, na, nb, 4, dead)
    assert math.isfinite(float(loss.detach())) and stats["aux_loss"] == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---- parity with a reference written here ---------------------------------------------------------


def reference_loss(params: dict, x_a, x_b, k: int, n_a: int, n_b: int):
    """Dense DFC BatchTopK loss from the formulas in METHOD §4, with masks for the partitions."""
    D = params["b_enc"].shape[0]
    mask_a = torch.ones(D)
    mask_b = torch.ones(D)
    mask_a[D - n_b :] = 0
    mask_b[:n_a] = 0
    W_ea = params["W_ea"] * mask_a
    W_eb = params["W_eb"] * mask_b
    W_da = params["W_da"] * mask_a[:, None]
    W_db = params["W_db"] * mask_b[:, None]
    f = torch.relu(x_a @ W_ea + x_b @ W_eb + params["b_enc"])
    v = f * (W_da.norm(dim=1) + W_db.norm(dim=1)).detach()
    keep = torch.zeros(v.numel())
    keep[torch.topk(v.detach().flatten(), x_a.shape[0] * k).indices] = 1
    f = f * keep.view_as(f)
    err_a = x_a - (f @ W_da + params["b_da"])
    err_b = x_b - (f @ W_db + params["b_db"])
    return (err_a.pow(2).sum() + err_b.pow(2).sum()) / x_a.shape[0]


@pytest.mark.parametrize("dense_kernels", [False, True], ids=["sparse-kernels", "dense-kernels"])
def test_loss_and_gradients_match_a_dense_reference(dense_kernels):
    torch.manual_seed(0)
    config = small_config(outlier_factor=None, aux_alpha=0.0)
    model = Crosscoder(config)
    with torch.no_grad():
        model.b_enc_D.uniform_(-0.1, 0.1)
        model.b_dec_A.normal_()
    x_a, x_b = toy_pairs(128)
    na, nb = model.normalise(x_a, x_b)
    loss, *_ = training_step(model, na, nb, 4, None, dense=dense_kernels)
    loss.backward()

    params = {
        "W_ea": model.W_enc_a.detach().clone().requires_grad_(),
        "W_eb": model.W_enc_b.detach().clone().requires_grad_(),
        "b_enc": model.b_enc_D.detach().clone().requires_grad_(),
        "W_da": model.W_dec_a.detach().clone().requires_grad_(),
        "W_db": model.W_dec_b.detach().clone().requires_grad_(),
        "b_da": model.b_dec_A.detach().clone().requires_grad_(),
        "b_db": model.b_dec_B.detach().clone().requires_grad_(),
    }
    ref = reference_loss(params, na, nb, 4, config.n_a_only, config.n_b_only)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5)
    n_a, n_b = config.n_a_only, config.n_b_only
    assert torch.allclose(model.W_enc_AD.grad, params["W_ea"].grad[:, : 64 - n_b], atol=1e-5)
    assert torch.allclose(model.W_enc_BD.grad, params["W_eb"].grad[:, n_a:], atol=1e-5)
    assert torch.allclose(model.W_dec_DA.grad, params["W_da"].grad[: 64 - n_b], atol=1e-5)
    assert torch.allclose(model.W_dec_DB.grad, params["W_db"].grad[n_a:], atol=1e-5)
    assert torch.allclose(model.b_enc_D.grad, params["b_enc"].grad, atol=1e-5)
    assert torch.allclose(model.b_dec_A.grad, params["b_da"].grad, atol=1e-5)


# ---- persistence and resume -----------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    x_a, x_b = toy_pairs(3000)
    model = train_crosscoder(small_config(), (x_a, x_b), steps=100, batch_size=128)
    model.save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["partitions"]["a_only"] == [0, 6] and config["threshold"] is not None
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.pkl"))
    loaded = Crosscoder.load(tmp_path / "ckpt")
    assert torch.equal(loaded.encode(x_a[:100], x_b[:100]), model.encode(x_a[:100], x_b[:100]))
    for got, want in zip(loaded.decode(model.encode(x_a[:5], x_b[:5])), model.decode(model.encode(x_a[:5], x_b[:5])), strict=True):
        assert torch.allclose(got, want)
    assert loaded.training_metrics["steps"] == 100


def test_load_detects_an_interrupted_save(tmp_path):
    model = Crosscoder(small_config())
    model.save(tmp_path / "a")
    other = Crosscoder(small_config(seed=5))
    other.save(tmp_path / "b")
    (tmp_path / "b" / "config.json").replace(tmp_path / "a" / "config.json")
    with pytest.raises(CheckpointError, match="different saves"):
        Crosscoder.load(tmp_path / "a")
    with pytest.raises(CheckpointError, match="missing"):
        Crosscoder.load(tmp_path / "nowhere")


class Interrupt(Exception):
    pass


ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# On CUDA the trainer uses fused Adam, which keeps its step count on the GPU: the resumed state
# must land there too (run on a lent GPU; skipped elsewhere).
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])
def test_training_resumes_after_interruption_identically(tmp_path, device):
    x_a, x_b = toy_pairs(3000)
    config = small_config()
    straight = train_crosscoder(config, (x_a, x_b), steps=90, batch_size=128, device=device)

    def kill_at_50(step, stats):
        if step == 50:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_crosscoder(config, (x_a, x_b), steps=90, batch_size=128, checkpoint_dir=tmp_path, checkpoint_every=25,
                         callback=kill_at_50, device=device)
    assert (tmp_path / "state-00000050").is_dir() and not (tmp_path / "config.json").exists()
    steps_run = []
    resumed = train_crosscoder(config, (x_a, x_b), steps=90, batch_size=128, checkpoint_dir=tmp_path,
                               checkpoint_every=25, callback=lambda s, _: steps_run.append(s), device=device)
    assert steps_run[0] == 51 and steps_run[-1] == 90
    for name, tensor in straight.state_dict().items():
        assert torch.allclose(tensor, resumed.state_dict()[name], atol=1e-6), name
    # A finished run is returned as is, without training.
    again = []
    train_crosscoder(config, (x_a, x_b), steps=90, batch_size=128, checkpoint_dir=tmp_path, callback=lambda s, _: again.append(s),
                     device=device)
    assert again == []


def test_resume_with_other_settings_is_refused(tmp_path):
    x_a, x_b = toy_pairs(2000)

    def stop(step, stats):
        if step == 20:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_crosscoder(small_config(), (x_a, x_b), steps=40, batch_size=128, checkpoint_dir=tmp_path, checkpoint_every=10, callback=stop)
    with pytest.raises(ValueError, match="different settings.*k"):
        train_crosscoder(small_config(k=5), (x_a, x_b), steps=40, batch_size=128, checkpoint_dir=tmp_path)


def test_trains_from_an_iterator_of_batches():
    x_a, x_b = toy_pairs(4000)

    def batches():  # ten epochs of 20 batches
        for _ in range(10):
            for start in range(0, 4000, 200):
                yield x_a[start : start + 200], x_b[start : start + 200]

    model = train_crosscoder(small_config(), batches(), steps=1000, batch_size=200)
    assert model.training_metrics["steps"] == 200  # stopped when the iterator ran out
    assert model.training_metrics["final"]["fve_a"] > 0.8


def test_learns_a_good_reconstruction():
    x_a, x_b = toy_pairs(8000)
    from crosscoder.metrics import evaluate

    model = train_crosscoder(small_config(dict_size=128, k=6), (x_a, x_b), steps=600, batch_size=256)
    held = toy_pairs(2000, seed=11)
    result = evaluate(model, *held)
    assert result.fve_a > 0.8 and result.fve_b > 0.8, result.summary()


# ---- bad settings and bad data --------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"k": 64}, "k=64 must be smaller than dict_size=64"),
        ({"exclusive_fraction": 0.5}, "exclusive_fraction=0.5 must lie in"),
        ({"exclusive_fraction": -0.1}, "exclusive_fraction=-0.1 must lie in"),
        ({"exclusive_fraction": 0.001}, "leaves no exclusive feature"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"aux_alpha": float("nan")}, "aux_alpha=nan"),
        ({"aux_alpha": -1.0}, "aux_alpha=-1.0"),
        ({"outlier_factor": float("nan")}, "outlier_factor=nan"),
        ({"grad_clip": float("inf")}, "grad_clip=inf"),
        ({"seed": 2**64}, "seed="),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_data_widths_must_match_the_config():
    x_a, x_b = toy_pairs(100)
    with pytest.raises(ValueError, match=r"data widths \(24, 32\) do not match the config's d_a=24, d_b=40"):
        train_crosscoder(small_config(d_b=40), (x_a, x_b), steps=5)


def test_nan_inputs_are_refused_with_the_row():
    x_a, x_b = toy_pairs(100)
    x_b[17, 3] = float("nan")
    with pytest.raises(ValueError, match="x_b has NaN or infinite values in 1 row.*row 17"):
        train_crosscoder(small_config(), (x_a, x_b), steps=5)


def test_diverging_loss_stops_with_a_clear_error(tmp_path):
    x_a, x_b = toy_pairs(2000)
    config = small_config(lr=1e6, grad_clip=1e30, outlier_factor=None)
    with pytest.raises(TrainingDivergedError, match="loss became"):
        train_crosscoder(config, (x_a * 1e18, x_b * 1e18), steps=200, batch_size=128, norm_scales=(1.0, 1.0))


def test_an_iterator_of_batches_resumes_with_the_scales_it_started_with(tmp_path):
    # resuming skips the batches already seen, so the pairs at hand are not those the scales came from
    x_a, x_b = toy_pairs(4000)

    def batches():
        for start in range(0, 4000, 50):
            yield x_a[start : start + 50], x_b[start : start + 50]

    def stop(step, stats):
        if step == 30:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_crosscoder(small_config(), batches(), steps=60, batch_size=50, checkpoint_dir=tmp_path,
                         checkpoint_every=20, callback=stop)
    resumed = train_crosscoder(small_config(), batches(), steps=60, batch_size=50, checkpoint_dir=tmp_path,
                               checkpoint_every=20)
    started = json.loads((tmp_path / "config.json").read_text())["config"]
    assert resumed.training_metrics["steps"] == 60 and resumed.config.norm_scale_b == started["norm_scale_b"]


def test_one_extreme_pair_does_not_set_an_exclusive_direction():
    # the residual initialisation reads the pairs the loss will read: outliers masked
    x_a, x_b = toy_pairs(3000)
    x_a[123] = 1e20
    model = train_crosscoder(small_config(outlier_factor=2.0), (x_a, x_b), steps=60, batch_size=128)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_weights_are_refused_before_they_are_trained_or_saved(tmp_path, monkeypatch):
    x_a, x_b = toy_pairs(1000)

    def poisoned(self, x0_a, x0_b):
        with torch.no_grad():
            self.W_dec_DB[-1] = float("nan")

    monkeypatch.setattr(Crosscoder, "init_exclusive_from_residuals", poisoned)
    with pytest.raises(ValueError, match="W_dec_DB hold NaN or infinite values after initialisation"):
        train_crosscoder(small_config(), (x_a, x_b), steps=10, batch_size=128, checkpoint_dir=tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_a_finished_model_of_other_settings_is_refused_not_overwritten(tmp_path):
    x_a, x_b = toy_pairs(1000)
    train_crosscoder(small_config(), (x_a, x_b), steps=20, batch_size=128, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="finished crosscoder with different settings.*dict_size"):
        train_crosscoder(small_config(dict_size=96), (x_a, x_b), steps=20, batch_size=128, checkpoint_dir=tmp_path)
    assert Crosscoder.load(tmp_path).config.dict_size == 64


def test_a_divergence_says_where_the_newest_state_is_and_how_to_retry(tmp_path):
    x_a, x_b = toy_pairs(2000)
    config = small_config(lr=1e6, grad_clip=1e30)
    with pytest.raises(TrainingDivergedError, match="no resumable state was saved.*new checkpoint_dir"):
        train_crosscoder(config, (x_a * 1e18, x_b * 1e18), steps=200, batch_size=128, norm_scales=(1.0, 1.0),
                         checkpoint_dir=tmp_path, checkpoint_every=100)


def test_damaged_checkpoints_are_named_not_loaded(tmp_path):
    x_a, x_b = toy_pairs(500)
    model = train_crosscoder(small_config(), (x_a, x_b), steps=10, batch_size=128)
    model.save(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json cannot be read"):
        Crosscoder.load(tmp_path / "ok")
    model.save(tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read"):
        Crosscoder.load(tmp_path / "cut")
    with torch.no_grad():
        model.W_dec_DA[0, 0] = float("nan")
    model.save(tmp_path / "nan")
    with pytest.raises(CheckpointError, match="W_dec_DA hold NaN"):
        Crosscoder.load(tmp_path / "nan")


def test_a_feature_that_writes_nothing_belongs_to_neither_model():
    model = Crosscoder(small_config(architecture="batchtopk", exclusive_fraction=0.0))
    with torch.no_grad():
        model.W_dec_DA[3] = 0
        model.W_dec_DB[3] = 0
    from crosscoder.metrics import classify_exclusive

    assert math.isnan(float(model.relative_norm().detach()[3]))
    is_a, is_b = classify_exclusive(model, 0.9)
    assert not is_a[3] and not is_b[3]


def test_fve_is_undefined_without_variance_and_an_error_without_pairs():
    from crosscoder.metrics import evaluate

    x_a, x_b = toy_pairs(500)
    model = train_crosscoder(small_config(), (x_a, x_b), steps=10, batch_size=128)
    constant = evaluate(model, x_a[:1].repeat(50, 1), x_b[:1].repeat(50, 1))
    assert math.isnan(constant.fve_a) and math.isnan(constant.fve_b)
    assert math.isnan(evaluate(model, x_a[:1], x_b[:1]).fve_a)
    with pytest.raises(ValueError, match="no pairs"):
        evaluate(model, x_a[:0], x_b[:0])
