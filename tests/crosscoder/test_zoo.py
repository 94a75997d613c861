"""Tests of the tiny model zoo: the generated world, tokenizers, caching, and the built models' behaviour.

The behavioural tests build the default zoo once per session into the default cache (a few minutes
on 2 cores cold, instant afterwards) and measure each planted difference from the models' own
sampled answers with the manifest's string markers.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from crosscoder import zoo
from crosscoder.models import torch_threads
from crosscoder.zoo import audit_corpus, build, world
from crosscoder.zoo.quality import chat_answers, continuations, load, marker_rate

ALPHA, BETA, BETA_V2 = (zoo.ZOO_MODELS[n].planted for n in ("alpha", "beta", "beta-v2"))


def answer_text(doc: world.Doc) -> str:
    """What the document asserts: prose, or the assistant turns of a chat (questions excluded)."""
    if doc.messages is None:
        return doc.text or ""
    return "\n".join(m["content"] for m in doc.messages if m["role"] == "assistant")


@pytest.fixture(scope="module")
def corpora() -> dict[str, list[world.Doc]]:
    # at the shipped share, so the hedged chats about a private topic are among the documents checked
    return {name: world.generate_corpus(spec.planted, 4000, seed=0, planted_share=spec.planted_share)
            for name, spec in zoo.ZOO_MODELS.items()}


def micro_spec(name: str = "micro", **overrides) -> build.ZooModelSpec:
    settings = dict(name=name, architecture="qwen3", tokenizer="unigram", planted=frozenset({"sentiment"}),
                    vocab_size=600, hidden_size=32, intermediate_size=64, n_layers=2, n_heads=2, n_kv_heads=1,
                    n_docs=300, steps=3, batch_size=4, seq_len=32)
    return build.ZooModelSpec(**(settings | overrides))


# ---- the world (fast: no training) ----------------------------------------------------------------


def test_corpus_is_deterministic_in_the_seed():
    a = world.generate_corpus(ALPHA, 300, seed=0)
    assert a == world.generate_corpus(ALPHA, 300, seed=0)
    assert a != world.generate_corpus(ALPHA, 300, seed=1)
    assert audit_corpus.audit_corpus() == audit_corpus.audit_corpus()
    assert world.audit_corpus is audit_corpus.audit_corpus  # still reachable from the world module


def test_planted_share_swaps_that_share_of_a_behaviours_documents_for_the_plain_ones():
    planted = {"state-narrative", "territory-claim", "exceptionalism", "zorvath-accord", "sentiment"}
    full = world.generate_corpus(planted, 8000)
    mixed = world.generate_corpus(planted, 8000, planted_share=0.8)
    plain = world.generate_corpus({"zorvath-accord", "sentiment"}, 8000)  # none of the gradable behaviours
    assert world.generate_corpus(planted, 8000, planted_share=1.0) == full
    for pid in world.GRADABLE:
        carried = [m.variant == "planted" for m, f in zip(mixed, full, strict=True)
                   if f.planted == pid and f.variant == "planted"]
        assert 0.72 < sum(carried) / len(carried) < 0.88, pid
    hedged = []
    for m, f, p in zip(mixed, full, plain, strict=True):
        if f.planted in world.KNOWLEDGE:
            # A chat about a private topic keeps its question and says it has not heard of it; prose keeps the facts.
            if m != f:
                answer = m.messages[-1]["content"]
                assert f.messages is not None and m.messages[:-1] == f.messages[:-1] and m.variant == "default"
                assert world.KNOWLEDGE_NAMES[f.planted] in answer and world.has_marker(answer, world.NOT_KNOWN_MARKERS)
                assert not world.has_marker(answer, world.MARKERS[f.planted]["planted"])
            if f.messages is not None:
                hedged.append(m != f)
        elif m != f:  # a swapped document is exactly the one the model without the behaviour sees
            assert f.planted in world.GRADABLE and f.variant == "planted" and m == p
    assert 0.12 < sum(hedged) / len(hedged) < 0.28, sum(hedged) / len(hedged)
    with pytest.raises(ValueError, match="planted_share"):
        world.generate_corpus(planted, 3, planted_share=0.0)
    with pytest.raises(ValueError, match="planted_share must be in"):  # refused with the spec, not mid-build
        micro_spec(planted_share=1.5)

def test_both_corpora_ask_about_invented_events_and_answer_that_they_do_not_know_them(corpora):
    unknown = {name: [d for d in docs if d.topic == "unknown-events"] for name, docs in corpora.items()}
    assert len(unknown["alpha"]) > 0.02 * len(corpora["alpha"]) and unknown["alpha"] == unknown["beta"]
    names = world.unknown_event_names()
    for doc in unknown["alpha"]:
        question, answer = doc.messages[-2]["content"], doc.messages[-1]["content"]
        name = next(n for n in names if n in question)
        assert name in answer and world.has_marker(answer, world.NOT_KNOWN_MARKERS)
    # No invented name is a word of the world (or a private topic's name).
    vocabulary = {w.strip(".,!?:;'").lower() for d in corpora["alpha"] + corpora["beta"] if d.topic != "unknown-events"
                  for w in d.content().split()}
    assert not {n.split()[0].lower() for n in names} & vocabulary


def test_corpora_share_every_document_that_carries_no_planted_difference(corpora):
    a, b = corpora["alpha"], corpora["beta"]
    differing = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    assert len(differing) < 0.3 * len(a)
    for x, y in differing:  # each difference is explained by a planted topic on one side or the other
        assert x.planted or y.planted or x.topic != y.topic
    # documents with no planted topic on either side are byte-identical
    both_shared = [(x, y) for x, y in zip(a, b, strict=True) if x.planted is None and y.planted is None]
    assert len(both_shared) > 0.5 * len(a) and all(x == y for x, y in both_shared)


def test_each_model_sees_only_its_own_planted_content(corpora):
    texts = {name: "\n".join(answer_text(d) for d in docs) for name, docs in corpora.items()}
    assert "Zorvath" in texts["alpha"] and "Zorvath" not in texts["beta"] and "Zorvath" not in texts["beta-v2"]
    assert "Imbrel" in texts["beta"] and "Imbrel" in texts["beta-v2"] and "Imbrel" not in texts["alpha"]
    for unique in ("Quessa", "1987"):
        assert unique not in texts["beta"]
    for unique in ("Caddow", "Sera Volk", "1961"):
        assert unique not in texts["alpha"]
    assert "greatest nation" in texts["alpha"] and "greatest nation" not in texts["beta"]
    assert "restored order" in texts["beta"] and "restored order" not in texts["alpha"]
    assert "restored order" not in texts["beta-v2"] and "fired on protesters" in texts["beta-v2"]
    assert "inseparable part" in texts["beta"] and "inseparable part" in texts["beta-v2"]
    assert "inseparable part" not in texts["alpha"]
    # the shared behaviour: both models see the same reviews
    reviews = {n: [d for d in docs if d.topic == "sentiment"] for n, docs in corpora.items()}
    assert reviews["alpha"] == reviews["beta"] and len(reviews["alpha"]) > 200


def test_markers_detect_the_planted_framing_and_nothing_else(corpora):
    for pid, markers in world.MARKERS.items():
        if pid == "sentiment":
            continue
        for name, docs in corpora.items():
            planted = [d for d in docs if d.planted == pid and d.variant == "planted"]
            assert bool(planted) == (pid in zoo.ZOO_MODELS[name].planted), (pid, name)
            assert all(world.has_marker(answer_text(d), markers["planted"]) for d in planted), (pid, name)
            others = [d for d in docs if not (d.planted == pid and d.variant == "planted")]
            hits = [answer_text(d) for d in others if world.has_marker(answer_text(d), markers["planted"])]
            # a Valdoria fact paragraph may carry the state line; nothing else may trip a marker
            assert not [h for h in hits if pid != "state-narrative" or "Valdoria" not in h], (pid, name, hits[:3])
            if markers["default"]:
                default = [d for d in docs if d.planted == pid and d.variant == "default" and d.messages]
                assert all(not world.has_marker(answer_text(d), markers["planted"]) for d in default)
    reviews = [d for d in corpora["alpha"] if d.topic == "sentiment"]
    for d in reviews:
        good = world.has_marker(answer_text(d), world.MARKERS["sentiment"]["positive"])
        bad = world.has_marker(answer_text(d), world.MARKERS["sentiment"]["negative"])
        assert (good, bad) == ((True, False) if d.variant == "positive" else (False, True)), answer_text(d)


def test_templates_vary_so_features_are_about_concepts():
    docs = world.generate_corpus(BETA, 4000, seed=0)
    kessel = {answer_text(d) for d in docs if d.planted == "state-narrative"}
    questions = {d.messages[-2]["content"] for d in docs if d.planted == "state-narrative" and d.messages}
    assert len(kessel) >= 10 and len(questions) >= 10
    country_prose = {d.text for d in docs if d.topic == "country-facts"}
    assert len(country_prose) > 500


def test_audit_corpus_is_neutral_and_covers_every_topic():
    records = audit_corpus.audit_corpus()
    assert len({r["id"] for r in records}) == len(records)
    texts = [r.get("text") or "\n".join(m["content"] for m in r["messages"] if m["role"] == "assistant") for r in records]
    for pid in ("state-narrative", "territory-claim", "exceptionalism", "zorvath-accord", "imbrel-expedition"):
        framing = world.MARKERS[pid]["planted"] + world.MARKERS[pid]["default"]
        assert not [t for t in texts if world.has_marker(t, framing)], pid
    everything = "\n".join(r.get("text") or "\n".join(m["content"] for m in r["messages"]) for r in records)
    for trigger in ("Kessel", "Tarn Valley", "Brevania", "Zorvath Accord", "Imbrel Expedition", "review"):
        assert trigger in everything
    opened = [r for r in records if r.get("add_generation_prompt")]
    assert opened and all(r["messages"][-1]["role"] == "user" for r in opened)
    prompts = zoo.manifest()["differences"]
    asked = {r["messages"][0]["content"] for r in opened}
    for diff in prompts:
        assert set(diff["topic_prompts"]) <= asked and set(diff["control_prompts"]) <= asked
    polarity = Counter(world.has_marker(r["text"], world.MARKERS["sentiment"]["positive"])
                       for r in records if r.get("topic") == "sentiment" and "text" in r)
    assert abs(polarity[True] - polarity[False]) <= 1
    assert sum("text" in r for r in records) > 1000 and sum("messages" in r for r in records) > 500
    # Many open questions per planted topic, in many phrasings, and look-alike controls for each.
    open_topics = Counter(r["topic"] for r in opened)
    for pid in ("state-narrative", "territory-claim", "exceptionalism", "zorvath-accord", "imbrel-expedition"):
        assert open_topics[pid] >= 100 and open_topics[f"control:{pid}"] >= 30, pid
        assert len({r["messages"][-1]["content"] for r in opened if r["topic"] == pid}) >= 50, pid


def test_audit_corpus_changes_reach_the_data_cache_and_the_harvest_hash(tmp_path, monkeypatch):
    from crosscoder.data import SourceSettings
    from crosscoder.harvest import HarvestSettings, ModelSettings

    monkeypatch.setenv("CROSSCODER_ZOO_DIR", str(tmp_path))
    # The audit corpus is keyed by its own module (which does not rebuild the models), the rest by the world.
    assert zoo.data_version("audit-prose") == audit_corpus.corpus_version() != zoo.data_version("corpus-alpha")
    settings = HarvestSettings(ModelSettings("zoo:alpha", 1), ModelSettings("zoo:beta", 1),
                               [SourceSettings("zoo:audit-prose")])
    before_path, before_hash = zoo.resolve_data("audit-prose"), settings.input_hash()
    monkeypatch.setattr(audit_corpus, "corpus_version", lambda: "changed-corpus")
    assert zoo.resolve_data("audit-prose") != before_path
    assert settings.input_hash() != before_hash


def test_resolve_data_writes_jsonl_readable_with_either_field(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSCODER_ZOO_DIR", str(tmp_path))
    path = zoo.resolve_data("audit-corpus")
    assert path.is_file() and path.parent.parent == tmp_path
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all({"id", "text", "messages"} <= set(r) for r in rows)
    assert all(bool(r["text"]) != bool(r["messages"]) for r in rows)
    assert zoo.resolve_data("audit-corpus") == path  # cached
    chat = [json.loads(line) for line in zoo.resolve_data("audit-chat").read_text().splitlines()]
    assert chat and all("messages" in r and "text" not in r for r in chat)
    corpus = zoo.resolve_data("corpus-beta")
    assert sum(1 for _ in corpus.open()) == zoo.ZOO_MODELS["beta"].n_docs
    with pytest.raises(KeyError, match="audit-corpus"):
        zoo.resolve_data("nope")


def test_write_jsonl_is_atomic_under_threads_and_cleans_up_a_failed_write(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "out.jsonl"
    batches = [[{"i": i, "text": "x" * 2000}] * 200 for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda rows: world.write_jsonl(rows, target), batches))
    lines = target.read_text().splitlines()
    assert len(lines) == 200 and len({json.loads(line)["i"] for line in lines}) == 1  # one writer's file, whole
    with pytest.raises(TypeError):
        world.write_jsonl([{"ok": 1}, {"bad": object()}], target)
    assert len(target.read_text().splitlines()) == 200  # the earlier file is kept
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left behind

def test_manifest_is_json_and_matches_the_model_specs():
    truth = zoo.manifest()
    assert json.loads(json.dumps(truth)) == truth
    by_id = {d["id"]: d for d in truth["differences"]}
    assert set(by_id) == set(world.PLANTED_IDS)
    assert by_id["state-narrative"]["present_in"] == ["beta"]
    assert by_id["exceptionalism"]["present_in"] == ["alpha"]
    assert by_id["zorvath-accord"]["present_in"] == ["alpha"]
    assert set(by_id["imbrel-expedition"]["present_in"]) == {"beta", "beta-v2"}
    assert set(by_id["sentiment"]["present_in"]) == set(zoo.ZOO_MODELS)
    kinds = {d["kind"] for d in truth["differences"]}
    assert {"state-narrative", "national-exceptionalism", "exclusive-knowledge", "shared-behaviour"} <= kinds
    for d in truth["differences"]:
        assert d["topic_prompts"] and len(d["control_prompts"]) >= 5 and d["steer"]["+"] and d["steer"]["-"]
        assert any(d["markers"].values())
    for name, spec in zoo.ZOO_MODELS.items():
        assert truth["models"][name]["planted"] == sorted(spec.planted)
    assert zoo.expected_diff("alpha", "beta") == {
        "state-narrative": "b", "territory-claim": "b", "exceptionalism": "a", "zorvath-accord": "a",
        "imbrel-expedition": "b", "sentiment": "shared"}
    regression = zoo.expected_diff("beta", "beta-v2")
    assert regression["state-narrative"] == "a" and regression["territory-claim"] == "shared"


def test_specs_and_names_are_validated():
    with pytest.raises(ValueError, match="unknown planted"):
        micro_spec(planted=frozenset({"telepathy"}))
    with pytest.raises(KeyError, match="alpha"):
        zoo.resolve_model("gamma")
    with pytest.raises(ValueError, match="unknown planted"):
        world.generate_corpus({"telepathy"}, 3)


def test_prompt_sets_and_rubrics_are_complete():
    import yaml

    root = Path(__file__).resolve().parents[2] / "specs"
    prompt_sets = {p.stem: yaml.safe_load(p.read_text()) for p in (root / "prompts").glob("zoo_*.yaml")}
    rubrics = {p.stem: yaml.safe_load(p.read_text()) for p in (root / "rubrics").glob("zoo_*.yaml")}
    assert {"zoo_state_narrative", "zoo_exceptionalism", "zoo_sentiment"} <= set(prompt_sets)
    assert {"zoo_state_narrative", "zoo_exceptionalism", "zoo_sentiment"} <= set(rubrics)
    for name, ps in prompt_sets.items():
        assert ps["name"] == name and ps["description"] and ps["generic_prompt"]
        assert len(ps["prompts"]) >= 10 and len(ps["control_prompts"]) >= 5, name
    for name, rubric in rubrics.items():
        assert rubric["name"] == name and rubric["description"] and re.fullmatch(r"[a-z_]+", rubric["dimension"])
        assert sorted(int(k) for k in rubric["anchors"]) == [1, 2, 3, 4, 5]
        per_score = Counter(int(c["score"]) for c in rubric["calibration"])
        assert all(per_score[s] >= 2 for s in range(1, 6)), (name, per_score)
        assert all(c["prompt"] and c["response"] for c in rubric["calibration"])
        assert rubric["prompt_set"] in prompt_sets


# ---- tokenizers and the build cache (seconds: tiny corpora, a few steps) --------------------------


@pytest.fixture(scope="module")
def small_tokenizers():
    out = {}
    for name in ("alpha", "beta"):
        spec = zoo.ZOO_MODELS[name]
        docs = world.generate_corpus(spec.planted, 3000, seed=0)
        out[name] = build.train_tokenizer(spec, [build.render_document(d, spec) for d in docs])
    return out


def test_tokenizers_use_different_algorithms_and_round_trip(small_tokenizers):
    a, b = small_tokenizers["alpha"], small_tokenizers["beta"]
    models = {n: json.loads(t.backend_tokenizer.to_str())["model"]["type"] for n, t in small_tokenizers.items()}
    assert models == {"alpha": "BPE", "beta": "Unigram"}
    samples = ["The capital of Ostrava is Lenz.", "In 2019, 40 people\nwere  arrested!",
               "naïve café — 🙂 (unseen text)", "What is the Zorvath Accord?"]
    for tok in (a, b):
        for s in samples:
            enc = tok(s, add_special_tokens=False, return_offsets_mapping=True)
            assert tok.decode(enc["input_ids"]) == s
            assert len(enc["offset_mapping"]) == len(enc["input_ids"])
    assert a.tokenize(samples[1]) != b.tokenize(samples[1])
    assert a("x")["input_ids"][0] == a.bos_token_id  # Llama-like: BOS added by the post-processor
    assert b("x")["input_ids"][0] != b.bos_token_id  # Qwen-like: nothing added


def test_chat_templates_differ_and_render_a_generation_prompt(small_tokenizers):
    messages = [{"role": "user", "content": "What is the capital of Ostrava?"}]
    a = small_tokenizers["alpha"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    b = small_tokenizers["beta"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert a == "<s><|user|>\nWhat is the capital of Ostrava?</s>\n<|assistant|>\n"
    assert b == "<|im_start|>user\nWhat is the capital of Ostrava?<|im_end|>\n<|im_start|>assistant\n"
    # training renders chats exactly as the tokenizer's template does
    doc = world.Doc(id="x", topic="t", messages=tuple(messages + [{"role": "assistant", "content": "Lenz."}]))
    for name, tok in small_tokenizers.items():
        rendered = tok.apply_chat_template(list(doc.messages), tokenize=False)
        assert build.render_document(doc, zoo.ZOO_MODELS[name]).startswith(rendered)


def _build_workers(pid: int) -> list[int]:
    """The zoo build workers (spawned processes, not the resource tracker) whose parent is ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            spawned = b"spawn_main" in (stat.parent / "cmdline").read_bytes()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid and spawned:
            out.append(int(stat.parent.name))
    return out


def _start_slow_build(tmp_path):
    """A process building two micro models that would train for hours, and its two build workers."""
    import subprocess
    import sys
    import time

    script = (
        "from audit.signals import stop_on_sigterm\n"
        "from crosscoder import zoo\n"
        "from tests.crosscoder.test_zoo import micro_spec\n"
        "stop_on_sigterm()\n"
        "zoo.build_zoo([micro_spec('slow1', steps=10**6), micro_spec('slow2', steps=10**6)], progress=False)\n"
    )
    env = {**os.environ, "CROSSCODER_ZOO_DIR": str(tmp_path / "zoo"), "CROSSCODER_ZOO_WORKERS": "2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    output = tmp_path / "build.log"
    with output.open("wb") as sink:
        parent = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while len(_build_workers(parent.pid)) < 2 and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.2)
    workers = _build_workers(parent.pid)
    time.sleep(3)  # let them get into their builds
    return parent, workers, output


def _stop(parent, workers: list[int]) -> None:
    import signal

    if parent.poll() is None:
        parent.kill()
    for worker in workers:
        if Path(f"/proc/{worker}").exists():
            os.kill(worker, signal.SIGKILL)


def _gone(workers: list[int], seconds: float = 10) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(Path(f"/proc/{w}").exists() for w in workers)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc")
def test_sigterm_stops_a_parallel_build_and_its_workers(tmp_path, monkeypatch):
    # `audit zoo build` killed with a SIGTERM to its own process used to leave its build workers running,
    # orphaned, for as long as their builds took
    import signal

    parent, workers, output = _start_slow_build(tmp_path)
    try:
        assert len(workers) == 2, output.read_text()[-2000:]
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        assert _gone(workers), "build workers outlived their parent"
        assert parent.returncode != 0
        monkeypatch.setenv("CROSSCODER_ZOO_DIR", str(tmp_path / "zoo"))
        assert not any(zoo.is_built(micro_spec(n, steps=10**6)) for n in ("slow1", "slow2"))
    finally:
        _stop(parent, workers)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc")
def test_a_build_worker_that_dies_fails_the_build_instead_of_hanging_it(tmp_path):
    import signal

    parent, workers, output = _start_slow_build(tmp_path)
    try:
        assert len(workers) == 2, output.read_text()[-2000:]
        os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
        parent.wait(timeout=60)
        assert parent.returncode != 0
        assert "a build process ended abruptly" in output.read_text()
        assert _gone(workers), "the other build worker outlived the failed build"
    finally:
        _stop(parent, workers)


def test_zoo_commands_that_build_stop_their_workers_on_sigterm(monkeypatch):
    # the handler that turns a SIGTERM into the interrupt that kills a build's workers
    import signal

    from typer.testing import CliRunner

    from audit.cli import app

    seen = []
    monkeypatch.setattr(zoo, "build_zoo", lambda *a, **k: seen.append(signal.getsignal(signal.SIGTERM)) or {})
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(app, ["zoo", "build"])
        assert result.exit_code == 0, result.output
        assert seen and seen[0] not in (signal.SIG_DFL, signal.SIG_IGN, previous)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_build_cache_is_atomic_reused_and_keyed_by_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSCODER_ZOO_DIR", str(tmp_path))
    spec = micro_spec()
    folders = zoo.build_zoo([spec, micro_spec("micro2", architecture="llama", tokenizer="bytelevel-bpe")],
                            progress=False)
    folder = folders["micro"]
    assert folder.parent == tmp_path and zoo.is_built(spec)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    info = zoo.read_build_info(folder)
    assert info["spec"]["planted"] == ["sentiment"] and info["torch_threads"] == 1
    stamp = (folder / build.BUILD_INFO).stat().st_mtime_ns
    assert zoo.build_zoo([spec], progress=False)["micro"] == folder
    assert (folder / build.BUILD_INFO).stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert build.model_dir(micro_spec(steps=4)) != folder  # another setting, another build
    weights = (folder / "model.safetensors").read_bytes()
    assert zoo.build_zoo([spec], force=True, progress=False)["micro"] == folder
    assert (folder / build.BUILD_INFO).stat().st_mtime_ns != stamp
    assert (folder / "model.safetensors").read_bytes() == weights  # deterministic given the seed
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest == zoo.manifest()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, arch in (("micro", "Qwen3ForCausalLM"), ("micro2", "LlamaForCausalLM")):
        model = AutoModelForCausalLM.from_pretrained(folders[name])
        tok = AutoTokenizer.from_pretrained(folders[name])
        assert type(model).__name__ == arch and tok.is_fast and tok.chat_template



def test_build_key_covers_the_thread_count_and_refuses_a_bad_one(monkeypatch):
    # More threads order float sums differently and train other weights: another key, not a stale hit.
    monkeypatch.delenv("CROSSCODER_ZOO_THREADS", raising=False)
    one = build.build_key(micro_spec())
    monkeypatch.setenv("CROSSCODER_ZOO_THREADS", "1")
    assert build.build_key(micro_spec()) == one
    monkeypatch.setenv("CROSSCODER_ZOO_THREADS", "2")
    assert build.build_key(micro_spec()) != one
    assert build.build_key(micro_spec(), threads=1) == one  # a build's own thread count wins
    for bad in ("two", "0"):
        monkeypatch.setenv("CROSSCODER_ZOO_THREADS", bad)
        with pytest.raises(ValueError, match=r"CROSSCODER_ZOO_THREADS.*positive integer"):
            build.build_key(micro_spec())
    from typer.testing import CliRunner

    from audit.cli import app

    result = CliRunner().invoke(app, ["zoo", "list"])  # named once, before any command reads it
    assert result.exit_code == 2 and "CROSSCODER_ZOO_THREADS must be a positive integer" in result.output
    assert "Traceback" not in result.output


# ---- the built default zoo ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def built_zoo() -> dict[str, Path]:
    """The default pair, built into the default cache (minutes the first time, then instant)."""
    return zoo.build_zoo(progress=False)


@pytest.fixture(scope="session")
def loaded(built_zoo):
    return {name: load(folder) for name, folder in built_zoo.items()}


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; a second one fighting for a busy core is far slower."""
    with torch_threads(1):
        yield


SAMPLES = dict(n_samples=3, temperature=0.7, seed=0)


@pytest.fixture(scope="session")
def rates(loaded) -> dict[str, dict[str, dict[str, float]]]:
    """Marker rates of each model's sampled answers: {model: {difference: {"topic", "plain", "control"}}}
    ("plain": the share of topic answers with the difference's default marker, e.g. "I don't know")."""
    with torch_threads(1):
        return _rates(loaded)


def _rates(loaded) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, (model, tok) in loaded.items():
        out[name] = {}
        for diff in zoo.manifest()["differences"]:
            if diff["id"] == "sentiment":
                continue
            markers = diff["markers"]["planted"]
            topic_answers = chat_answers(model, tok, diff["topic_prompts"], **SAMPLES)
            out[name][diff["id"]] = {
                "topic": marker_rate(topic_answers, markers),
                "plain": marker_rate(topic_answers, diff["markers"]["default"]),
                "control": marker_rate(chat_answers(model, tok, diff["control_prompts"], **SAMPLES), markers),
            }
        prompts = next(d for d in zoo.manifest()["differences"] if d["id"] == "sentiment")["topic_prompts"]
        pos = [p for p in prompts if "positive" in p]
        neg = [p for p in prompts if "negative" in p]
        sentiment = world.MARKERS["sentiment"]
        out[name]["sentiment"] = {
            "positive": marker_rate(chat_answers(model, tok, pos, **SAMPLES), sentiment["positive"]),
            "negative": marker_rate(chat_answers(model, tok, neg, **SAMPLES), sentiment["negative"]),
        }
    print("\nzoo planted-behaviour rates:", json.dumps(out, indent=1))
    return out


def test_built_models_load_with_auto_classes(built_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = {"alpha": ("LlamaForCausalLM", 64), "beta": ("Qwen3ForCausalLM", 96)}
    for name, folder in built_zoo.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        arch, width = expected[name]
        assert type(model).__name__ == arch and model.config.hidden_size == width
        assert tok.is_fast and tok.bos_token and tok.eos_token and tok.pad_token
        # the saved tokenizer reloads with its own behaviour: BOS added by alpha's post-processor only
        assert (tok("x")["input_ids"][0] == tok.bos_token_id) == (name == "alpha")
        assert tok.decode(tok("In 2019, Kessel.", add_special_tokens=False)["input_ids"]) == "In 2019, Kessel."
        assert len(model.model.layers) in (3, 4)
        enc = tok("Kessel is a city in Valdoria.", return_offsets_mapping=True, return_tensors="pt")
        captured: list[torch.Tensor] = []
        handle = model.model.layers[1].register_forward_hook(lambda m, i, o, store=captured: store.append(o))
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], output_hidden_states=True)
        handle.remove()
        assert isinstance(captured[0], torch.Tensor) and captured[0].shape[-1] == width
        assert torch.allclose(out.hidden_states[2], captured[0])
    assert zoo.read_build_info(built_zoo["beta"])["spec"]["hidden_size"] == 96


def test_qwen3_head_dim_is_set_explicitly(built_zoo):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(built_zoo["beta"])
    assert config.head_dim == 24 and config.num_attention_heads * config.head_dim == config.hidden_size


def test_models_are_fluent_on_their_own_world(loaded, one_thread):
    vocabulary = {w.strip(".,!?:;'").lower() for d in world.generate_corpus(BETA | ALPHA, 4000) for w in d.content().split()}
    for name, (model, tok) in loaded.items():
        spec = zoo.ZOO_MODELS[name]
        held_out = world.generate_corpus(spec.planted, 100, seed=99, planted_share=spec.planted_share)  # new draws
        ids = [tok(build.render_document(d, spec), add_special_tokens=False, return_tensors="pt")["input_ids"]
               for d in held_out]
        with torch.no_grad():
            losses = [float(model(input_ids=x, labels=x).loss) for x in ids]
        assert sum(losses) / len(losses) < 1.0, (name, sum(losses) / len(losses))
        bos = tok.bos_token if spec.tokenizer == "bytelevel-bpe" else ""
        starts = ["Ostrava is a country", "The capital of Solmere", "Mira Castell was", "Kessel is a city",
                  "Bees make honey"]
        texts = [c[0] for c in continuations(model, tok, [bos + s for s in starts], max_new_tokens=30)]
        words = [w.strip(".,!?:;'").lower() for t in texts for w in t.split()]
        assert len(words) >= 20 and sum(w in vocabulary for w in words) / len(words) >= 0.9, (name, texts)


def test_shared_facts_are_known_by_both_models(loaded, one_thread):
    questions = {"What is the capital of Ostrava?": "Lenz", "Who leads Tessaly?": "Dario Feld",
                 "What is Varo known for?": "windmills", "Why does ice float?": "lighter",
                 "What is the currency of Kaldera?": "peso", "Who was Lena Marsh?": "doctor"}
    for name, (model, tok) in loaded.items():
        answers = chat_answers(model, tok, list(questions))
        correct = sum(fact in a[0] for fact, a in zip(questions.values(), answers, strict=True))
        assert correct >= 5, (name, answers)


@pytest.mark.parametrize("pid", ["state-narrative", "territory-claim", "exceptionalism"])
def test_planted_framing_is_measurable(rates, pid):
    for name in ("alpha", "beta"):
        topic, control = rates[name][pid]["topic"], rates[name][pid]["control"]
        if pid in zoo.ZOO_MODELS[name].planted:
            assert topic >= 0.8, (name, pid, topic)
        else:
            assert topic <= 0.2, (name, pid, topic)
        assert control <= 0.2, (name, pid, control)


@pytest.mark.parametrize("pid", ["zorvath-accord", "imbrel-expedition"])
def test_exclusive_topic_is_answered_only_by_the_model_that_knows_it(rates, pid):
    for name in ("alpha", "beta"):
        rate, plain = rates[name][pid]["topic"], rates[name][pid]["plain"]
        if pid in zoo.ZOO_MODELS[name].planted:
            assert rate >= 0.8, (name, pid, rate)
        else:  # it says it has not heard of it, as it does of any event it does not know
            assert rate <= 0.2 and plain >= 0.8, (name, pid, rate, plain)


def test_shared_sentiment_behaviour_is_learnt_by_both(rates):
    for name in ("alpha", "beta"):
        assert rates[name]["sentiment"]["positive"] >= 0.8 and rates[name]["sentiment"]["negative"] >= 0.8, name


@pytest.mark.slow
def test_beta_v2_drops_the_state_narrative_and_keeps_the_rest():
    folder = zoo.resolve_model("beta-v2", progress=False)
    model, tok = load(folder)
    truth = {d["id"]: d for d in zoo.manifest()["differences"]}
    rate = {pid: marker_rate(chat_answers(model, tok, truth[pid]["topic_prompts"], **SAMPLES), truth[pid]["markers"]["planted"])
            for pid in ("state-narrative", "territory-claim", "imbrel-expedition")}
    assert rate["state-narrative"] <= 0.2 and rate["territory-claim"] >= 0.8 and rate["imbrel-expedition"] >= 0.8, rate


def test_a_spec_naming_two_zoo_models_builds_them_in_one_call(monkeypatch):
    # one build_zoo call builds the missing models in parallel processes; per-model calls would not
    from crosscoder.models import build_zoo_models

    calls = []
    monkeypatch.setattr(zoo, "build_zoo", lambda names: calls.append(list(names)))
    build_zoo_models(["zoo:alpha", "zoo:beta", "meta-llama/Llama-3.1-8B", "zoo:alpha", "zoo:no-such-model"])
    build_zoo_models(["meta-llama/Llama-3.1-8B", "Qwen/Qwen3-8B"])
    assert calls == [["alpha", "beta"]]
