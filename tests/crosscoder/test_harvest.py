"""Harvest: model loading, block capture, pairing, the store, resume, and the streaming reader."""

from __future__ import annotations

import json

import pytest
import torch

from crosscoder import CrosscoderConfig, train_crosscoder
from crosscoder.data import DataSourceError, SourceSettings, iter_records
from crosscoder.harvest import HarvestSettings, ModelSettings, harvest
from crosscoder.models import ModelLoadError, capture_block_output, load_model
from crosscoder.store import StoreError


def settings_for(dirs, corpus, **overrides) -> HarvestSettings:
    base = dict(
        model_a=ModelSettings(str(dirs["llama"]), layer=0),
        model_b=ModelSettings(str(dirs["qwen"]), layer=1),
        sources=[SourceSettings(str(corpus["prose"])),
                 SourceSettings(str(corpus["chat"]), text_field=None, messages_field="conversation")],
        max_tokens=100_000, context_length=64, shard_pairs=200, batch_docs=4, device="cpu",
    )
    return HarvestSettings(**(base | overrides))


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    # Not the last block: transformers' last hidden_states entry is after the final norm.
    return (load_model(str(tiny_model_dirs["llama"]), 0, device="cpu", field="model_a"),
            load_model(str(tiny_model_dirs["qwen"]), 1, device="cpu", field="model_b"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dirs, tiny_corpus, loaded):
    folder = tmp_path_factory.mktemp("store")
    return harvest(settings_for(tiny_model_dirs, tiny_corpus), folder, models=loaded)


def test_capture_equals_hidden_states_of_the_block(loaded):
    model = loaded[0]
    ids = torch.tensor([[128000, 791, 4062, 14198, 39935]])
    captured = capture_block_output(model, ids)
    reference = model.model(ids, output_hidden_states=True).hidden_states[model.layer + 1]
    assert torch.allclose(captured, reference, atol=1e-6)


def test_device_map_placement_reads_the_same_activations(tiny_model_dirs, loaded):
    # accelerate's placement (here everything lands on the CPU) must not change what is captured.
    placed = load_model(str(tiny_model_dirs["llama"]), 0, field="model_a", device_map="auto")
    assert placed.device == torch.device("cpu")
    ids = torch.tensor([[128000, 791, 4062, 14198, 39935]])
    assert torch.allclose(capture_block_output(placed, ids), capture_block_output(loaded[0], ids), atol=1e-6)


def test_load_errors_name_the_field(tiny_model_dirs, tmp_path):
    with pytest.raises(ModelLoadError, match=r"model_b.layer: 3 is out of range: .* has 3 decoder blocks \(0–2\)"):
        load_model(str(tiny_model_dirs["qwen"]), 3, device="cpu", field="model_b")
    with pytest.raises(ModelLoadError, match="model_a.id: cannot load the config of 'no/such-model'"):
        load_model("no/such-model", 0, device="cpu", field="model_a")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 1, "intermediate_size": 8, "vocab_size": 10}))
    with pytest.raises(ModelLoadError, match="model_a.id: .* not a causal language model|model_a.id: cannot load"):
        load_model(str(tmp_path), 0, device="cpu", field="model_a")
    with pytest.raises(ModelLoadError, match="model_a.dtype"):
        load_model(str(tiny_model_dirs["qwen"]), 0, dtype="int4", field="model_a")


def test_store_contents_are_block_activations_of_the_paired_tokens(store, loaded):
    meta = store.meta
    assert meta["n_pairs"] > 500 and len(meta["shards"]) >= 3
    assert meta["model_a"]["d_model"] == 32 and meta["model_b"]["d_model"] == 48
    assert meta["alignment"]["fully_aligned_frac"] >= 0.95
    assert 0 < meta["alignment"]["pairs_per_token_a"] <= 1
    docs = {d["doc"]: d for d in store.documents()}
    shard = store.load_shard(1, keys=("a", "b", "doc", "pos_a", "pos_b", "in_chat"))
    model_a, model_b = loaded
    for row in (0, len(shard["doc"]) // 2, len(shard["doc"]) - 1):
        doc = docs[int(shard["doc"][row])]
        pos_a, pos_b = int(shard["pos_a"][row]), int(shard["pos_b"][row])
        hidden_a = model_a.model(torch.tensor([doc["ids_a"]]), output_hidden_states=True).hidden_states[model_a.layer + 1][0]
        hidden_b = model_b.model(torch.tensor([doc["ids_b"]]), output_hidden_states=True).hidden_states[model_b.layer + 1][0]
        assert torch.allclose(shard["a"][row], hidden_a[pos_a], atol=1e-4)
        assert torch.allclose(shard["b"][row], hidden_b[pos_b], atol=1e-4)
        # The two tokens end on the same text.
        text_a = model_a.tokenizer.decode(doc["ids_a"][: pos_a + 1], skip_special_tokens=True)
        text_b = model_b.tokenizer.decode(doc["ids_b"][: pos_b + 1], skip_special_tokens=True)
        if not doc["chat"]:
            assert text_a == text_b


def test_special_and_template_tokens_are_never_paired(store, loaded):
    """...except the flagged generation-prompt pair: the last token of each model's prompt."""
    model_a, model_b = loaded
    special_a = set(model_a.tokenizer.all_special_ids) | {128000}
    special_b = set(model_b.tokenizer.all_special_ids) | {151644, 151645}
    docs = {d["doc"]: d for d in store.documents()}
    prompt_pairs = 0
    for index in range(len(store.meta["shards"])):
        shard = store.load_shard(index, keys=("doc", "pos_a", "pos_b", "template"))
        for doc, i, j, template in zip(shard["doc"].tolist(), shard["pos_a"].tolist(), shard["pos_b"].tolist(),
                                       shard["template"].tolist(), strict=True):
            if template:
                prompt_pairs += 1
                assert i == len(docs[doc]["ids_a"]) - 1 and j == len(docs[doc]["ids_b"]) - 1
                assert model_a.tokenizer.decode(docs[doc]["ids_a"]).endswith("assistant:")
                assert model_b.tokenizer.decode(docs[doc]["ids_b"]).endswith("<|im_start|>assistant\n")
                continue
            assert docs[doc]["ids_a"][i] not in special_a
            assert docs[doc]["ids_b"][j] not in special_b
    assert store.meta["alignment"]["chat_sequences"] == 12
    assert prompt_pairs == 3


def test_same_inputs_are_reused_and_other_inputs_refused(store, tiny_model_dirs, tiny_corpus, loaded):
    again = harvest(settings_for(tiny_model_dirs, tiny_corpus), store.folder, models=loaded)
    assert again.meta == store.meta
    with pytest.raises(StoreError, match="harvest of other inputs"):
        harvest(settings_for(tiny_model_dirs, tiny_corpus, context_length=32), store.folder, models=loaded)


def test_killed_harvest_resumes_to_the_same_store(tmp_path, tiny_model_dirs, tiny_corpus, loaded, store,
                                                  crash_harvest_on_batch):
    settings = settings_for(tiny_model_dirs, tiny_corpus)
    undo_crash = crash_harvest_on_batch(9)
    with pytest.raises(KeyboardInterrupt):
        harvest(settings, tmp_path, models=loaded)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert len(progress["shards"]) >= 1 and not (tmp_path / "meta.json").exists()
    undo_crash()
    resumed = harvest(settings, tmp_path, models=loaded)
    assert resumed.n_pairs == store.n_pairs
    for index in range(len(store.meta["shards"])):
        want = store.load_shard(index, keys=("a", "b", "doc", "pos_a"))
        got = resumed.load_shard(index, keys=("a", "b", "doc", "pos_a"))
        for key in want:
            assert torch.equal(want[key], got[key]), key


def test_reader_shuffles_normalises_and_feeds_the_trainer(store):
    seen = list(store.batches(64, shuffle_buffer=300, seed=1))
    assert all(a.shape == (64, 32) and b.shape == (64, 48) for a, b in seen)
    total = sum(a.shape[0] for a, _ in seen)
    assert store.n_pairs - 64 < total <= store.n_pairs
    first = store.load_shard(0)["a"][:64]
    assert not torch.equal(seen[0][0], first)  # shuffled
    # Every yielded row is a stored row.
    all_a = torch.cat([store.load_shard(i)["a"] for i in range(len(store.meta["shards"]))])
    assert torch.isin(seen[3][0][:, 0], all_a[:, 0]).all()
    # Normalised batches have median norm sqrt((d_a + d_b) / 2).
    norm_a = torch.cat([a for a, _ in store.batches(64, normalise=True)]).norm(dim=1).median()
    assert abs(float(norm_a) - (40 ** 0.5)) / 40 ** 0.5 < 0.05
    model = train_crosscoder(CrosscoderConfig(architecture="dfc", d_a=32, d_b=48, dict_size=64, k=4), store,
                             steps=30, batch_size=64)
    assert model.norm_scales.tolist() == pytest.approx(list(store.norm_scales))
    assert model.training_metrics["steps"] == 30  # the store is looped as long as needed


def test_harvest_command(tmp_path, tiny_model_dirs, tiny_corpus):
    from typer.testing import CliRunner

    from audit.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
name: tiny
model_a: {{id: "{tiny_model_dirs['llama']}", layer: 0}}
model_b: {{id: "{tiny_model_dirs['qwen']}", layer: 1}}
data:
  sources: [{{path: "{tiny_corpus['prose']}"}}]
  max_tokens: 300
crosscoder: {{dict_size: 64, k: 4}}
""")
    result = CliRunner().invoke(app, ["harvest", str(spec), "--out", str(tmp_path / "store"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "pairs in" in result.output and (tmp_path / "store" / "meta.json").is_file()
    spec.write_text(spec.read_text().replace("layer: 1}", "layer: 9}").replace("max_tokens: 300", "max_tokens: 301"))
    result = CliRunner().invoke(app, ["harvest", str(spec), "--out", str(tmp_path / "store2"), "--device", "cpu"])
    assert result.exit_code == 1 and "model_b.layer: 9 is out of range" in result.output


def test_data_sources(tiny_corpus, tmp_path):
    records = list(iter_records([SourceSettings(str(tiny_corpus["prose"]), weight=1),
                                 SourceSettings(str(tiny_corpus["chat"]), text_field=None, messages_field="conversation", weight=3)], seed=5))
    assert len(records) == 40 + 12
    again = list(iter_records([SourceSettings(str(tiny_corpus["prose"]), weight=1),
                               SourceSettings(str(tiny_corpus["chat"]), text_field=None, messages_field="conversation", weight=3)], seed=5))
    assert [r["id"] for r in records] == [r["id"] for r in again]
    assert sum("messages" in r for r in records[:20]) > 6  # the chat source is drawn more often early
    with pytest.raises(DataSourceError, match=r"data.sources.0.path: no such file"):
        list(iter_records([SourceSettings(str(tmp_path / "absent.jsonl"))]))
    with pytest.raises(DataSourceError, match=r"data.sources.0.text_field: .* no column 'body'"):
        list(iter_records([SourceSettings(str(tiny_corpus["prose"]), text_field="body")]))
    txt = tmp_path / "notes.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    assert [r["text"].strip() for r in iter_records([SourceSettings(str(txt))])] == ["first paragraph\nstill first", "second paragraph"]
    # a suffix in capitals is the same file type; a file of a type we do not read is named as such
    upper = tmp_path / "CORPUS.JSONL"
    upper.write_text('{"text": "hello there"}\n')
    assert [r["text"] for r in iter_records([SourceSettings(str(upper))])] == ["hello there"]
    tsv = tmp_path / "table.tsv"
    tsv.write_text("text\thello\n")
    with pytest.raises(DataSourceError, match=r"is a file of a type this tool does not read \(.tsv\); use one of"):
        list(iter_records([SourceSettings(str(tsv))]))


@pytest.mark.parametrize("lines, message", [
    (['"just a string"'], r"data.sources.0.path: .*bad.jsonl:1 is a JSON str, not an object"),
    (['{"m": [{"content": "hi"}]}'], r"data.sources.0.messages_field: .*bad.jsonl:1: message 0 has no 'role'"),
    (['{"m": "hello"}'], r"data.sources.0.messages_field: .*bad.jsonl:1: 'm' is a str, not a list of messages"),
    (['{"m": [{"role": "user", "content": 5}]}'], r"bad.jsonl:1: message 0's content is a int, not text"),
    ([], r"data.sources.0.path: .*bad.jsonl' has no rows"),
])
def test_bad_chat_files_are_named_with_the_line(tmp_path, lines, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataSourceError, match=message):
        list(iter_records([SourceSettings(str(bad), text_field=None, messages_field="m")]))


def test_files_that_are_not_utf8_are_named(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataSourceError, match=r"latin.jsonl:2 is not UTF-8 text"):
        list(iter_records([SourceSettings(str(latin))]))
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"ok\n\ncaf\xe9\n")
    with pytest.raises(DataSourceError, match=r"notes.txt:3 is not UTF-8 text"):
        list(iter_records([SourceSettings(str(notes))]))


def test_chat_content_given_as_parts_is_read_as_text_and_empty_turns_keep_their_place(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"m": [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "image_url", "image_url": "x"},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Again?"}]}) + "\n")
    [record] = iter_records([SourceSettings(str(chat), text_field=None, messages_field="m")])
    assert record["messages"] == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": ""},
                                  {"role": "user", "content": "Again?"}]
