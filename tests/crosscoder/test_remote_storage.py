"""Stores and checkpoints at fsspec URLs.

``memory://`` (fsspec's in-process filesystem) and ``file://`` stand in for ``s3://`` or ``gs://``:
they go through the same code (staging, uploads, the download cache) as an object store.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path

import pytest
import torch

from crosscoder import CheckpointError, Crosscoder, CrosscoderConfig, storage, train_crosscoder
from crosscoder.data import SourceSettings
from crosscoder.harvest import HarvestSettings, ModelSettings, harvest
from crosscoder.models import load_model
from crosscoder.store import ActivationStore, StoreError, StoreWriter
from crosscoder.synthetic import make_world


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh download cache per test, out of the user's home."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CROSSCODER_CACHE", str(folder))
    return folder


@pytest.fixture
def memory_root():
    """A folder of its own in the in-process memory filesystem, emptied afterwards."""
    root = f"memory://test-{secrets.token_hex(6)}"
    yield root
    storage.remove(root, recursive=True)


def test_is_url():
    assert storage.is_url("s3://bucket/store") and storage.is_url("memory://x") and storage.is_url("file:///tmp/x")
    assert not storage.is_url("/tmp/store") and not storage.is_url("runs/store")
    assert not storage.is_url("C:/runs/store") and not storage.is_url("C:\\runs\\store")  # Windows drives
    assert not storage.is_url(Path("/tmp/s3:/x"))


# ---- the activation store ------------------------------------------------------------------------


def write_synthetic_store(folder, seed: int = 0) -> None:
    world = make_world(d_a=24, d_b=32, n_shared=20, n_a=4, n_b=4, seed=0)
    generator = torch.Generator().manual_seed(seed)
    writer = StoreWriter(folder, f"synthetic-{seed}", shard_pairs=400)
    for doc in range(60):
        n = int(torch.randint(5, 40, (1,), generator=generator))
        x_a, x_b = world.sample(n, generator)
        writer.add_document({"id": f"d{doc}"}, x_a, x_b, torch.arange(n), torch.arange(n),
                            torch.zeros(n, dtype=torch.bool), False, torch.rand(n, generator=generator) < 0.1)
        if writer.should_flush():
            writer.flush({"docs": doc + 1})
    writer.flush({"docs": 60})
    writer.finalize({"model_a": {"d_model": 24}, "model_b": {"d_model": 32}}, target_norm=5.0)


def test_store_written_to_a_url_reads_back_like_a_local_one(tmp_path, memory_root, monkeypatch):
    url = f"{memory_root}/store/"  # a trailing slash is the same folder
    write_synthetic_store(tmp_path / "local")
    write_synthetic_store(url)
    names = storage.list_names(url)
    assert "meta.json" in names and "progress.json" in names and "pairs-00002.safetensors" in names
    assert not [name for name in names if name.startswith(".")]  # no temporary objects left

    # Read through an empty cache, so that every byte comes from the remote copy.
    monkeypatch.setenv("CROSSCODER_CACHE", str(tmp_path / "other-cache"))
    local, remote = ActivationStore(tmp_path / "local"), ActivationStore(url)
    assert local.folder == tmp_path / "local" and local.location == tmp_path / "local"
    assert remote.location == url.rstrip("/") and remote.folder.is_relative_to(tmp_path / "other-cache")
    assert remote.meta == local.meta and remote.n_pairs == local.n_pairs > 1000 and remote.n_shards >= 3
    keys = ("a", "b", "doc", "pos_a", "template", "norm_a")
    for index in range(local.n_shards):
        want, got = local.load_shard(index, keys), remote.load_shard(index, keys)
        for key in keys:
            assert torch.equal(want[key], got[key]), (index, key)
    assert list(remote.documents()) == list(local.documents())
    options = dict(shuffle_buffer=500, seed=3, normalise=True, template_weight=2.5)
    for (la, lb), (ra, rb) in zip(local.batches(64, **options), remote.batches(64, **options), strict=True):
        assert torch.equal(la, ra) and torch.equal(lb, rb)
    assert sorted(p.name for p in remote.folder.glob("pairs-*")) == [s["file"] for s in remote.meta["shards"]]


def test_cached_copy_is_replaced_when_the_remote_file_changes(memory_root):
    url = f"{memory_root}/folder/notes.txt"
    storage.write_text(url, "a" * 10)
    first = storage.download(url)
    assert first.read_text() == "a" * 10
    assert storage.download(url) == first  # current: not downloaded again
    storage.write_text(url, "b" * 10)  # same size, another version
    assert storage.download(url).read_text() == "b" * 10


def test_missing_store_and_unknown_protocols_are_clear_errors(memory_root):
    with pytest.raises(StoreError, match=f"{memory_root}/nothing is not a finished activation store"):
        ActivationStore(f"{memory_root}/nothing")
    with pytest.raises(StoreError, match="nosuchproto:// is not a storage protocol"):
        ActivationStore("nosuchproto://bucket/store")
    with pytest.raises(StoreError, match="nosuchproto://"):
        StoreWriter("nosuchproto://bucket/store", "hash")
    with pytest.raises(CheckpointError, match="nosuchproto://"):
        Crosscoder.load("nosuchproto://bucket/run")
    with pytest.raises(CheckpointError, match=f"{memory_root}/run/config.json is missing"):
        Crosscoder.load(f"{memory_root}/run")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(StoreError, match="install gcsfs to use gs:// URLs"):
            ActivationStore("gs://bucket/store")


# ---- harvest --------------------------------------------------------------------------------------


def settings_for(dirs, corpus) -> HarvestSettings:
    return HarvestSettings(
        model_a=ModelSettings(str(dirs["llama"]), layer=0),
        model_b=ModelSettings(str(dirs["qwen"]), layer=1),
        sources=[SourceSettings(str(corpus["prose"])),
                 SourceSettings(str(corpus["chat"]), text_field=None, messages_field="conversation")],
        max_tokens=100_000, context_length=64, shard_pairs=200, batch_docs=4, device="cpu",
    )


def test_harvest_into_a_url_resumes_and_equals_a_local_harvest(tmp_path, tiny_model_dirs, tiny_corpus,
                                                                monkeypatch, crash_harvest_on_batch):
    models = (load_model(str(tiny_model_dirs["llama"]), 0, device="cpu", field="model_a"),
              load_model(str(tiny_model_dirs["qwen"]), 1, device="cpu", field="model_b"))
    settings = settings_for(tiny_model_dirs, tiny_corpus)
    local = harvest(settings, tmp_path / "local", models=models)

    url = f"file://{tmp_path}/bucket/store"
    undo_crash = crash_harvest_on_batch(9)
    with pytest.raises(KeyboardInterrupt):
        harvest(settings, url, models=models)
    remote_folder = tmp_path / "bucket" / "store"
    progress = json.loads((remote_folder / "progress.json").read_text())
    assert len(progress["shards"]) >= 1 and not (remote_folder / "meta.json").exists()
    assert (remote_folder / progress["shards"][-1]["file"]).is_file()
    # What a kill in the middle of an upload can leave: dropped on resume.
    (remote_folder / "pairs-00042.safetensors").write_bytes(b"cut short")
    (remote_folder / ".docs-00042.jsonl.0a1b2c3d.tmp").write_text("{")
    undo_crash()

    monkeypatch.setenv("CROSSCODER_CACHE", str(tmp_path / "another-node"))  # resumed elsewhere
    remote = harvest(settings, url, models=models)
    assert remote.location == url and (remote_folder / "meta.json").is_file()
    assert not list(remote_folder.glob(".*")) and not (remote_folder / "pairs-00042.safetensors").exists()
    assert remote.n_pairs == local.n_pairs and remote.meta["shards"] == local.meta["shards"]
    assert remote.meta["norm_scales"] == local.meta["norm_scales"]
    assert remote.meta["alignment"] == local.meta["alignment"]
    for index in range(local.n_shards):
        want = local.load_shard(index, ("a", "b", "doc", "pos_a", "pos_b"))
        got = remote.load_shard(index, ("a", "b", "doc", "pos_a", "pos_b"))
        for key in want:
            assert torch.equal(want[key], got[key]), (index, key)
    # A finished store at the URL is returned as is.
    assert harvest(settings, url, models=models).meta == remote.meta


# ---- checkpoints ----------------------------------------------------------------------------------


def toy_pairs(n: int = 3000):
    world = make_world(d_a=24, d_b=32, n_shared=30, n_a=4, n_b=4, seed=0)
    return world.sample(n, torch.Generator().manual_seed(0))


def small_config() -> CrosscoderConfig:
    return CrosscoderConfig(architecture="dfc", d_a=24, d_b=32, dict_size=64, k=4, exclusive_fraction=0.1,
                            outlier_factor=None)


def state_names(url: str) -> list[str]:
    return [name for name in storage.list_names(url) if name.startswith("state-")]


def test_training_checkpoints_at_a_url_resume_identically(memory_root):
    x_a, x_b = toy_pairs()
    config = small_config()
    straight = train_crosscoder(config, (x_a, x_b), steps=90, batch_size=128)
    url = f"{memory_root}/run"

    def kill_at_50(step, stats):
        if step == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_crosscoder(config, (x_a, x_b), steps=90, batch_size=128, checkpoint_dir=url, checkpoint_every=25,
                         callback=kill_at_50)
    assert state_names(url) == ["state-00000025", "state-00000050"]
    assert storage.list_names(f"{url}/state-00000050") == ["config.json", "model.safetensors",
                                                          "trainer.json", "trainer.safetensors"]
    assert not storage.is_file(f"{url}/config.json")
    # A state whose upload was cut before trainer.json is not complete: the run resumes from 25.
    storage.remove(f"{url}/state-00000050/trainer.json")
    storage.write_text(f"{url}/state-00000030/config.json", "{}")  # another upload cut short: cleaned up
    steps_run = []
    resumed = train_crosscoder(config, (x_a, x_b), steps=90, batch_size=128, checkpoint_dir=url,
                               checkpoint_every=25, callback=lambda s, _: steps_run.append(s))
    assert steps_run[0] == 26 and steps_run[-1] == 90
    for name, tensor in straight.state_dict().items():
        assert torch.allclose(tensor, resumed.state_dict()[name], atol=1e-6), name
    assert state_names(url) == ["state-00000050", "state-00000075"]  # keep_checkpoints=2

    loaded = Crosscoder.load(url)
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.training_metrics["steps"] == 90
    # A finished run is returned as is, without training.
    again = []
    train_crosscoder(config, (x_a, x_b), steps=90, batch_size=128, checkpoint_dir=url,
                     callback=lambda s, _: again.append(s))
    assert again == []


def test_save_to_a_url_and_load_back(tmp_path, memory_root):
    model = Crosscoder(small_config())
    url = f"file://{tmp_path}/bucket/model"
    assert model.save(url) == url
    assert sorted(p.name for p in (tmp_path / "bucket" / "model").iterdir()) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(Crosscoder.load(url).state_dict(), model.state_dict(), rtol=0, atol=0,
                               equal_nan=True)  # θ is NaN before training
    # A second save at the same URL replaces the cached copy on the next load.
    other = Crosscoder(small_config().model_copy(update={"seed": 7}))
    other.save(url)
    assert torch.equal(Crosscoder.load(url).W_enc_AD, other.W_enc_AD)
    assert not torch.equal(other.W_enc_AD, model.W_enc_AD)
    # Weights and config of different saves are detected, as for a local folder.
    mixed = f"{memory_root}/mixed"
    model.save(mixed)
    storage.write_text(f"{mixed}/config.json", (tmp_path / "bucket" / "model" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=f"{mixed}: model.safetensors and config.json come from different"):
        Crosscoder.load(mixed)


def test_the_ranks_of_one_node_download_a_file_once(tmp_path, monkeypatch):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from fsspec.implementations.local import LocalFileSystem

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "shard.bin").write_bytes(b"pairs" * 1000)
    real_get = LocalFileSystem.get_file
    fetched = []

    def slow_get(self, *args, **kwargs):  # slow enough for the four "ranks" to overlap
        fetched.append(1)
        time.sleep(0.3)
        return real_get(self, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "get_file", slow_get)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: storage.download(f"file://{remote}/shard.bin"), range(4)))
    assert len(fetched) == 1 and len(set(paths)) == 1 and paths[0].read_bytes() == b"pairs" * 1000
