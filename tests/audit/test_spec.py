"""The audit spec schema and `audit validate`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit.cli import app
from audit.spec import SpecError, load_spec

SPECS = sorted((Path(__file__).parents[2] / "specs").glob("*.yaml"))
SENTIMENT = Path(__file__).parents[2] / "specs" / "rubrics" / "zoo_sentiment.yaml"

GOOD = """\
name: tiny
model_a:
  id: zoo:alpha
  layer: 1
model_b:
  id: zoo:beta
  layer: 2
data:
  sources:
    - path: corpus.jsonl
crosscoder:
  dict_size: 256
  k: 8
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_validates(path):
    spec = load_spec(path)
    assert spec.crosscoder.to_config(d_a=64, d_b=96).dict_size == spec.crosscoder.dict_size


def test_defaults_and_hash(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.crosscoder.architecture == "dfc" and spec.model_a.trust_remote_code is False
    assert spec.data.sources[0].text_field == "text"
    changed = load_spec(write(tmp_path, GOOD.replace("k: 8", "k: 9")))
    assert spec.content_hash("model_a", "model_b", "data") == changed.content_hash("model_a", "model_b", "data")
    assert spec.content_hash("crosscoder") != changed.content_hash("crosscoder")
    # Where the work runs leaves the run id alone; the dtypes change the results, so the hash.
    elsewhere = load_spec(write(tmp_path, GOOD + "compute:\n  device: cuda\n  nproc: 8\n  harvest_batch_docs: 4\n"))
    assert elsewhere.content_hash() == spec.content_hash()
    assert load_spec(write(tmp_path, GOOD + "compute:\n  model_dtype: bfloat16\n")).content_hash() != spec.content_hash()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("layer: 2", "layer: -1"), ":7: model_b.layer: Input should be greater than or equal to 0"),
        (("k: 8", "k: 256"), ":11: crosscoder: k=256 must be smaller than dict_size=256"),
        (("  dict_size: 256", "  dict_size: 256\n  exclusive_fraction: 0.7"), "crosscoder: exclusive_fraction=0.7 must lie in [0, 0.5)"),
        (("  layer: 1", "  layer: 1\n  colour: red"), ":5: model_a.colour: Extra inputs are not permitted"),
        (("    - path: corpus.jsonl", "    - path: corpus.jsonl\n      text_field: null"), "data.sources.0: set text_field"),
        (("name: tiny", "name: 'bad name!'"), ":1: name: String should match pattern"),
        (("crosscoder:\n  dict_size: 256\n  k: 8\n", ""), "crosscoder: Field required"),
        (("  layer: 1", "  layer: 1\n  dtype: bfloat16"), "model_a: dtype has moved to compute.model_dtype"),
        (("  k: 8", "  k: 8\n  train:\n    device: cuda"), "crosscoder.train: device has moved to compute.device"),
        (("  k: 8", "  k: 8\n  train:\n    batch_size: 100\ncompute:\n  nproc: 8"),
         "must be a multiple of compute.nproc (8)"),
        (("  k: 8", "  k: 8\ncompute:\n  nproc: 0"), "compute.nproc: Input should be greater than or equal to 1"),
        # the message names a field the file does not set first: the line is that of the one it sets
        (("  k: 8", "  k: 8\ncompute:\n  nproc: 7"), ":15: crosscoder.train.batch_size (256) must be a multiple of compute.nproc (7)"),
        (("  k: 8", "  k: 8\ncompute:\n  nproc: 2\n  device_map: auto"), "compute: device_map spreads one model"),
        # a check across fields points at the line of the field its message names
        (("  k: 8", "  k: 8\nstability:\n  seeds: [1, 0]"), ":15: stability.seeds lists 0, the seed of the audited dictionary"),
        (("  k: 8", "  k: 8\nstability:\n  seeds: [1, 2, 1]"), ":15: stability.seeds: seed(s) [1] listed more than once"),
        (("  k: 8", "  k: 8\nstability:\n  seeds: [1]\n  threshold: 1.5"), "stability.threshold: Input should be less than"),
        # NaN and infinity are never settings; seeds must fit the 64-bit generators; a layer is a number
        (("  k: 8", "  k: 8\n  aux_alpha: .nan"), "crosscoder.aux_alpha: Input should be a finite number"),
        (("  k: 8", "  k: 8\n  outlier_factor: .inf"), "crosscoder.outlier_factor: Input should be a finite number"),
        (("  k: 8", "  k: 8\nverify:\n  alphas: [0, .nan]"), "verify.alphas.1: Input should be a finite number"),
        (("    - path: corpus.jsonl", "    - path: corpus.jsonl\n      weight: .inf"), "weight: Input should be a finite"),
        (("  k: 8", "  k: 8\nstability:\n  seeds: [99999999999999999999]"), "stability.seeds.0: Input should be less"),
        (("  k: 8", "  k: 8\n  seed: -3"), "crosscoder.seed: Input should be greater than or equal to 0"),
        (("  layer: 1", "  layer: true"), "model_a.layer: Input should be a valid integer"),
        (("  k: 8", "  k: 8\nverify:\n  features:\n    999: [zoo_sentiment]"),
         "verify.features: feature id(s) [999] outside the dictionary (crosscoder.dict_size 256: ids 0–255)"),
        # a grid of repeats is one strength; a typo in a model or device name fails here, not stages later
        (("  k: 8", "  k: 8\nverify:\n  alphas: [0, 0]"), "verify.alphas: the α grid needs at least 2 distinct"),
        (("  k: 8", "  k: 8\ntransfer:\n  alphas: [0, -0.0, 1]"), "transfer.alphas: the α grid needs at least 3"),
        (("  k: 8", "  k: 8\nverify:\n  grader: claude"), "verify.grader: 'claude' is neither 'offline' nor an Inspect"),
        (("  k: 8", "  k: 8\nscreen:\n  explainer: opus"), "screen.explainer: 'opus' is neither"),
        (("  k: 8", "  k: 8\ncompute:\n  device: tpu"), "compute.device: 'tpu' is not a device this tool runs on"),
        (("  k: 8", "  k: 8\nverify:\n  alphas: [-1, 0, 1]\nreport:\n  examples_alpha: 5"),
         "report.examples_alpha 5: the sweeps generate no answers at ±5 (verify.alphas: -1, 0, 1)"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, edit, expected):
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value), str(info.value)


def test_broken_yaml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"spec.yaml:4: not valid YAML"):
        load_spec(write(tmp_path, "name: x\nmodel_a:\n  id: [unclosed\n"))
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "absent.yaml")
    with pytest.raises(SpecError, match="is a folder; give the spec file itself"):
        load_spec(tmp_path)
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(write(tmp_path, "- a list\n"))


def test_validate_command_exit_codes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the spec's data path is relative to where the audit runs
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello"}\n')
    runner = CliRunner()
    good = write(tmp_path, GOOD)
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0 and "ok" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("k: 8", "k: 0"))
    result = runner.invoke(app, ["validate", str(good), str(bad)])
    assert result.exit_code == 1
    assert "crosscoder.k" in result.output


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("  k: 8", "  k: 8\nverify:\n  rubrics: [no_such_rubric]"), "verify.rubrics: "),
        (("  k: 8", "  k: 8\nverify:\n  features:\n    3: [no_such_rubric]"), "verify.features.3: "),
        (("  k: 8", "  k: 8\ntransfer:\n  traits: [no_such_trait]"), "transfer.traits: "),
        (("  layer: 1", "  layer: 4"), "model_a.layer: 4 is out of range: 'zoo:alpha' has 4 decoder blocks (0–3)"),
        (("zoo:beta", "zoo:gamma"), "model_b.id: no zoo model named 'gamma'"),
        (("zoo:beta", "./no_such_model"), "model_b.id: local model folder './no_such_model' not found"),
        (("corpus.jsonl", "missing.jsonl"), "data.sources.0.path: no such file 'missing.jsonl'"),
        (("corpus.jsonl", "zoo:nothing"), "data.sources.0.path: no zoo data named 'nothing'"),
        (("  k: 8", "  k: 8\nverify:\n  rubrics: [zoo_sentiment]\ngates:\n  - rule: effect_change\n    rubric: zoo_sentimnet"),
         "gates.0.rubric: 'zoo_sentimnet' is not a rubric this spec sweeps, so the gate could never fire"),
        # a gate names the rubric as its sweeps record it, by the rubric's own name, not by its file
        (("  k: 8", f"  k: 8\nverify:\n  rubrics: [{SENTIMENT}]\ngates:\n  - rule: new_concept\n"
          f"    rubric: {SENTIMENT}"), "(swept: zoo_sentiment)"),
        (("  layer: 1", "  layer: 1\n  chat_template: hello"), "model_a.chat_template: 'hello' is neither a Jinja"),
        (("corpus.jsonl", "table.tsv"), "data.sources.0.path: 'table.tsv' is a file of a type this tool does not read"),
        # a rubric with nothing to steer on (no prompt set) cannot be swept
        (("  k: 8", "  k: 8\nverify:\n  rubrics: [coherence_no_prompts.yaml]"),
         "verify.rubrics: rubric coherence_no_prompts names no prompt_set, so it cannot drive a steering sweep"),
    ],
)
def test_validate_checks_what_the_spec_refers_to(tmp_path, monkeypatch, edit, expected):
    """A spec that validates must not fail minutes into a run on a missing file or a bad layer."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "table.tsv").write_text("text\thello\n")
    rubric = Path(__file__).parents[2] / "specs" / "rubrics" / "coherence.yaml"
    (tmp_path / "coherence_no_prompts.yaml").write_text(
        rubric.read_text().replace("name: coherence", "name: coherence_no_prompts").replace("prompt_set: open_questions\n", ""))
    result = CliRunner().invoke(app, ["validate", str(write(tmp_path, GOOD.replace(*edit)))])
    assert result.exit_code == 1, result.output
    assert expected in " ".join(result.output.split()), result.output


def test_validate_reads_a_local_models_depth_from_its_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello"}\n')
    folder = tmp_path / "my_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"text_config": {"num_hidden_layers": 2}}')
    spec = write(tmp_path, GOOD.replace("zoo:beta", "./my_model").replace("layer: 2", "layer: 1"))
    assert CliRunner().invoke(app, ["validate", str(spec)]).exit_code == 0
    result = CliRunner().invoke(app, ["validate", str(write(tmp_path, GOOD.replace("zoo:beta", "./my_model")))])
    assert result.exit_code == 1 and "model_b.layer: 2 is out of range" in " ".join(result.output.split())


def test_repeated_keys_and_non_utf8_files_are_refused(tmp_path):
    with pytest.raises(SpecError, match=r"spec.yaml:14: name: given twice in the same mapping \(first at line 1\)"):
        load_spec(write(tmp_path, GOOD + "name: other\n"))
    with pytest.raises(SpecError, match=r"spec.yaml:5: layer: given twice in the same mapping \(first at line 4\)"):
        load_spec(write(tmp_path, GOOD.replace("  layer: 1", "  layer: 1\n  layer: 2")))
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.replace("tiny", "t\xe9ny").encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8 text"):
        load_spec(path)


def test_a_missing_api_key_is_a_note_for_validate_and_an_error_for_the_run(tmp_path, monkeypatch):
    from audit.checks import missing_api_keys

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello"}\n')
    text = GOOD + "verify:\n  grader: anthropic/claude-opus-4-1\ntransfer:\n  grader: anthropic/claude-opus-4-1\n"
    path = write(tmp_path, text)
    assert [m.split(":")[0] for m in missing_api_keys(load_spec(path))] == ["verify.grader"]  # no traits: no transfer
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "note: verify.grader" in result.output
    with_traits = write(tmp_path, text.replace("transfer:\n", "transfer:\n  traits: [zoo_sentiment]\n"))
    assert [m.split(":")[0] for m in missing_api_keys(load_spec(with_traits))] == ["verify.grader", "transfer.grader"]
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    assert missing_api_keys(load_spec(with_traits)) == []
    # another hosted provider: its key, and its client package (not a dependency of ours)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    openai = load_spec(write(tmp_path, GOOD + "screen:\n  explainer: openai/gpt-4o\n"))
    notes = missing_api_keys(openai)
    assert any("screen.explainer: openai/gpt-4o needs OPENAI_API_KEY" in n for n in notes)
    import importlib.util
    if importlib.util.find_spec("openai") is None:
        assert any("needs the Python package openai (pip install openai)" in n for n in notes)
    assert missing_api_keys(load_spec(write(tmp_path, GOOD + "screen:\n  explainer: mockllm/model\n"))) == []


def test_validate_reads_a_hub_models_depth_from_the_local_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello"}\n')
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-lm" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"num_hidden_layers": 4}')
    (cache / "models--acme--tiny-lm" / "refs").mkdir()
    (cache / "models--acme--tiny-lm" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    too_deep = write(tmp_path, GOOD.replace("zoo:beta", "acme/tiny-lm").replace("layer: 2", "layer: 4"))
    result = CliRunner().invoke(app, ["validate", str(too_deep)])
    assert result.exit_code == 1 and "model_b.layer: 4 is out of range: 'acme/tiny-lm' has 4" in " ".join(result.output.split())
    # not in the cache: nothing to check offline, the models stage will
    absent = write(tmp_path, GOOD.replace("zoo:beta", "acme/other-lm").replace("layer: 2", "layer: 40"))
    assert CliRunner().invoke(app, ["validate", str(absent)]).exit_code == 0


def test_repeated_key_detection_is_exact_and_safe_with_aliases():
    import yaml

    from crosscoder.yamlfile import _repeated_key

    assert _repeated_key(yaml.compose("a: 1\nb: {c: 2, c: 3}\n")) == ("c", 2, 2)
    assert _repeated_key(yaml.compose("3: a\n'3': b\n")) is None  # an int and a string key
    assert _repeated_key(yaml.compose("x: &x {b: 1}\nc:\n  <<: *x\n  <<: *x\n")) is None  # merge keys may repeat
    assert _repeated_key(yaml.compose("name: &a [*a]\n")) is None  # a self-referencing alias ends
    nested = "l0: &l0 [x, x]\n" + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 12))
    assert _repeated_key(yaml.compose(nested)) is None  # 10^11 paths, each node walked once


def test_layer_counts_of_other_config_layouts(tmp_path):
    from audit.checks import config_layers

    for text, expected in (('{"n_layer": 12}', 12), ('{"text_config": {"num_hidden_layers": 3}}', 3),
                           ('{"num_layers": 5}', 5), ('{"hidden_size": 8}', None)):
        (tmp_path / "config.json").write_text(text)
        assert config_layers(tmp_path / "config.json") == expected  # None: unknown, left to the models stage


def test_a_folder_named_like_a_shipped_rubric_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "zoo_sentiment").mkdir()  # e.g. a results folder
    spec = write(tmp_path, GOOD.replace("  k: 8", "  k: 8\nverify:\n  rubrics: [zoo_sentiment]\n"
                                         "transfer:\n  traits: [zoo_sentiment]"))
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0, result.output


def test_an_unknown_stage_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["run", str(write(tmp_path, GOOD)), "--only", "bogus"])
    assert result.exit_code == 2 and "--only bogus: no such stage" in result.output


def test_plan_refuses_a_spec_that_validate_refuses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello"}\n')
    result = CliRunner().invoke(app, ["plan", str(write(tmp_path, GOOD.replace("  layer: 1", "  layer: 99"))),
                                      "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 1 and "model_a.layer: 99 is out of range" in " ".join(result.output.split())
