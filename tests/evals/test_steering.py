"""Steering: per-row vectors at the capture block, batch-independent generation, the Inspect provider."""

from __future__ import annotations

import pytest
import torch

from crosscoder import Crosscoder, CrosscoderConfig
from crosscoder.models import load_model
from crosscoder.steering import SteeredGenerator, steering_vector

QUESTIONS = ["Who rules the northern province?", "What grows in the valley?", "Tell me a story."]


@pytest.fixture(scope="module")
def qwen(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["qwen"]), layer=1, field="model_b")


@pytest.fixture(scope="module")
def generator(qwen):
    return SteeredGenerator(qwen)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, qwen):
    """A DFC whose B-only feature 9 has a strong decoder direction in the Qwen model's space."""
    cfg = CrosscoderConfig(architecture="dfc", d_a=32, d_b=qwen.d_model, dict_size=10, k=2, exclusive_fraction=0.2,
                           norm_scale_a=1.0, norm_scale_b=1.0)
    model = Crosscoder(cfg)
    with torch.no_grad():
        model.W_dec_DB.normal_(generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("cc") / "cc"
    model.save(path)
    return path


def test_each_row_gets_its_own_vector_and_zero_rows_are_unsteered(generator, checkpoint):
    prompts = [generator.render([{"role": "user", "content": q}]) for q in QUESTIONS]
    alone = [generator.generate([p], max_new_tokens=8)[0].text for p in prompts]
    vector = steering_vector(Crosscoder.load(checkpoint), "b", 9, alpha=20.0, s_max=1.0)
    vectors = torch.stack([torch.zeros_like(vector), vector, torch.zeros_like(vector)])
    mixed = generator.generate(prompts, vectors, max_new_tokens=8)
    assert mixed[0].text == alone[0] and mixed[2].text == alone[2]  # unsteered rows unaffected
    assert mixed[1].text != alone[1]  # the steered row moved
    assert generator.generate([prompts[1]], vector[None], max_new_tokens=8)[0].text == mixed[1].text
    assert generator._vectors is None  # the hook is idle outside generate


def test_steering_vectors_of_the_wrong_shape_or_with_nan_are_refused(generator):
    prompts = [generator.render([{"role": "user", "content": q}]) for q in QUESTIONS[:2]]
    width = generator.loaded.d_model
    for bad in (torch.zeros(1, width), torch.zeros(2, 1), torch.zeros(2, width + 1)):
        with pytest.raises(ValueError, match="one row per prompt"):
            generator.generate(prompts, bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="NaN"):
        generator.generate(prompts, torch.full((2, width), float("nan")), max_new_tokens=2)
    assert generator._vectors is None


def test_sampling_depends_on_the_seed_only(generator):
    prompts = [generator.render([{"role": "user", "content": q}]) for q in QUESTIONS]
    batch = generator.generate(prompts, max_new_tokens=10, temperature=1.0, seeds=[5, 6, 7])
    single = generator.generate(prompts[2:], max_new_tokens=10, temperature=1.0, seeds=[7])
    assert single[0].text == batch[2].text
    other_seed = generator.generate(prompts[2:], max_new_tokens=10, temperature=1.0, seeds=[8])
    assert other_seed[0].text != batch[2].text


def test_steering_vector_checks_the_feature_and_side(checkpoint):
    model = Crosscoder.load(checkpoint)
    v = steering_vector(model, "b", 9, alpha=-0.5, s_max=4.0)
    assert torch.allclose(v, -2.0 * model.decoder_raw("b")[9].detach())
    with pytest.raises(ValueError, match="exclusive to the other model"):
        steering_vector(model, "b", 0, 1.0, 1.0)  # an A-only feature has no decoder in B
    with pytest.raises(ValueError, match="out of range"):
        steering_vector(model, "a", 10, 1.0, 1.0)


def test_provider_serves_concurrent_steered_requests_without_mixing_them(tiny_model_dirs, checkpoint, generator,
                                                                         tmp_path):
    from inspect_ai import Task
    from inspect_ai import eval as inspect_eval
    from inspect_ai.dataset import MemoryDataset, Sample
    from inspect_ai.model import get_model

    from evals.verify import steered_generation

    samples = [Sample(id=f"{i}-{alpha}", input=q, metadata={"feature": 9, "alpha": alpha, "s_max": 1.0, "seed": 0})
               for i, q in enumerate(QUESTIONS) for alpha in (0.0, 20.0, -20.0)]
    model = get_model(f"steered/{tiny_model_dirs['qwen']}", crosscoder=str(checkpoint), side="b", layer=1,
                      max_batch=4)
    log = inspect_eval(Task(dataset=MemoryDataset(samples), solver=steered_generation(max_tokens=8)), model=model,
                       log_dir=str(tmp_path), display="none")[0]
    assert log.status == "success"
    cc = Crosscoder.load(checkpoint)
    for sample in log.samples:
        q = sample.input
        alpha = sample.metadata["alpha"]
        vector = None if alpha == 0 else steering_vector(cc, "b", 9, alpha, 1.0)[None]
        expected = generator.generate([generator.render([{"role": "user", "content": q}])], vector, max_new_tokens=8)
        assert sample.output.completion == expected[0].text, sample.id
        assert sample.output.usage.output_tokens == expected[0].output_tokens


def test_provider_generates_each_unsteered_answer_once(tiny_model_dirs, checkpoint, tmp_path, monkeypatch):
    # every feature's α = 0 and every transfer arm's asks the same unsteered question: one generation serves all
    from inspect_ai import Task
    from inspect_ai import eval as inspect_eval
    from inspect_ai.dataset import MemoryDataset, Sample
    from inspect_ai.model import get_model

    from evals.verify import steered_generation

    def samples(prefix):
        unsteered = [Sample(id=f"{prefix}u{i}", input=QUESTIONS[0],
                            metadata={"feature": 9, "alpha": 0.0, "s_max": 1.0, "seed": 0}) for i in range(6)]
        other_seed = [Sample(id=f"{prefix}s", input=QUESTIONS[0],
                             metadata={"feature": 9, "alpha": 0.0, "s_max": 1.0, "seed": 1})]
        steered = [Sample(id=f"{prefix}v{i}", input=QUESTIONS[0],
                          metadata={"feature": 9, "alpha": 20.0, "s_max": 1.0, "seed": 0}) for i in range(2)]
        return unsteered + other_seed + steered

    model = get_model(f"steered/{tiny_model_dirs['qwen']}", crosscoder=str(checkpoint), side="b", layer=1,
                      max_batch=5)  # another instance than the other tests' (Inspect reuses a model per arguments)
    rows = []
    generate = model.api.generator.generate

    def counting(prompts, vectors=None, **kwargs):
        steered = 0 if vectors is None else int((vectors.abs().sum(-1) > 0).sum())
        rows.append((len(prompts), steered))
        return generate(prompts, vectors, **kwargs)

    monkeypatch.setattr(model.api.generator, "generate", counting)
    task = Task(dataset=MemoryDataset(samples("first")), solver=steered_generation(max_tokens=8, temperature=1.0))
    log = inspect_eval(task, model=model, log_dir=str(tmp_path), display="none")[0]
    assert log.status == "success"
    assert sum(n for n, _ in rows) == 4  # one unsteered answer per seed, and the two steered rows
    assert sum(steered for _, steered in rows) == 2  # steered requests are never shared
    answers = {s.id: s.output.completion for s in log.samples}
    assert len({answers[f"firstu{i}"] for i in range(6)}) == 1
    # a later eval (another event loop) reuses the finished answers
    task = Task(dataset=MemoryDataset(samples("second")), solver=steered_generation(max_tokens=8, temperature=1.0))
    log = inspect_eval(task, model=model, log_dir=str(tmp_path), display="none")[0]
    assert sum(n for n, _ in rows) == 6  # only the two steered rows again
    assert {s.output.completion for s in log.samples if s.id.startswith("secondu")} == {answers["firstu0"]}
    assert next(s for s in log.samples if s.id == "seconds").output.completion == answers["firsts"]


def test_generators_sharing_a_model_never_see_each_others_vectors(qwen, checkpoint):
    """A steered batch and an unsteered single-row pass on the same model from two threads."""
    import threading

    steered = SteeredGenerator(qwen)
    plain = SteeredGenerator(qwen)
    prompts = [steered.render([{"role": "user", "content": q}]) for q in QUESTIONS]
    vector = steering_vector(Crosscoder.load(checkpoint), "b", 9, alpha=20.0, s_max=1.0)
    expected_ppl = plain.answer_perplexity(prompts[0], "Mostly barley.")
    results, failures = [], []

    def steer_loop():
        try:
            for _ in range(3):
                results.append(steered.generate(prompts, vector[None].expand(3, -1).contiguous(), max_new_tokens=6))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    thread = threading.Thread(target=steer_loop)
    thread.start()
    ppls = [plain.answer_perplexity(prompts[0], "Mostly barley.") for _ in range(5)]
    thread.join()
    assert not failures
    assert all(p == pytest.approx(expected_ppl, rel=1e-5) for p in ppls)  # never steered by the other thread
    assert all([g.text for g in r] == [g.text for g in results[0]] for r in results)


def test_a_spec_chat_template_overrides_the_tokenizers(tiny_model_dirs, tmp_path):
    from crosscoder.models import ModelLoadError

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    loaded = load_model(str(tiny_model_dirs["qwen"]), layer=1, chat_template=template)
    generator = SteeredGenerator(loaded)
    ids = generator.render([{"role": "user", "content": "Hi there"}])
    assert loaded.tokenizer.decode(ids) == "[user] Hi there\n[assistant] "
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert load_model(str(tiny_model_dirs["qwen"]), layer=1, chat_template=str(path)).tokenizer.chat_template == template
    with pytest.raises(ModelLoadError, match="model_b.chat_template"):
        load_model(str(tiny_model_dirs["qwen"]), layer=1, chat_template="plain words", field="model_b")


def test_batched_perplexities_match_one_row_at_a_time(generator, monkeypatch):
    import math

    import crosscoder.steering as steering

    prompts = [generator.render([{"role": "user", "content": q}]) for q in QUESTIONS]
    items = [(prompts[0], "The northern province is ruled by a council."), (prompts[1], ""),
             (prompts[2], "Once upon a time there was a very long story about a river and a mill and a cat."),
             (prompts[1], "Wheat.")]
    alone = [generator.answer_perplexity(p, a) for p, a in items]
    together = generator.answer_perplexities(items)
    assert math.isinf(alone[1]) and math.isinf(together[1])  # an empty answer has no perplexity
    for one, many in zip(alone, together, strict=True):
        assert one == pytest.approx(many, rel=1e-4)  # right padding leaves each row's positions alone
    monkeypatch.setattr(steering, "LOGITS_BUDGET", 1)  # one row per pass: the budget bounds memory
    assert generator.answer_perplexities(items) == pytest.approx(together, rel=1e-4)


def test_micro_batches_group_concurrent_requests_and_keep_errors_to_their_batch():
    import asyncio

    from evals.batching import MicroBatcher

    calls = []

    def run(batch):
        calls.append(list(batch))
        if "boom" in batch:
            raise ValueError("bad batch")
        return [f"{x}!" for x in batch]

    batcher = MicroBatcher(run, max_batch=3, key=lambda x: x.startswith("b"))

    async def main():
        return await asyncio.gather(*(batcher.submit(x) for x in ["a1", "a2", "b1", "a3", "a4", "boom"]),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert [results[i] for i in (0, 1, 3, 4)] == ["a1!", "a2!", "a3!", "a4!"]
    # b1 shared its batch with the failing item: both get the error, the other batches are unaffected
    assert isinstance(results[2], ValueError) and isinstance(results[5], ValueError)
    assert calls == [["a1", "a2", "a3"], ["b1", "boom"], ["a4"]]  # never mixed, at most three per batch
    calls.clear()
    assert asyncio.run(main())[0] == "a1!"  # a new event loop (Inspect runs each eval in its own) still works


def test_micro_batches_hold_tensors_and_survive_a_failing_key():
    """Requests carry steering vectors (tensors: == is elementwise) and a key may raise: the batch's
    requests get the error and nothing waits forever."""
    import asyncio

    from evals.batching import MicroBatcher

    batcher = MicroBatcher(lambda batch: [float(v.sum()) for v in batch], max_batch=8,
                           key=lambda v: int(v.numel()) if v.numel() < 5 else 1 // 0)

    async def main():
        items = [torch.ones(3), torch.ones(3), torch.ones(2), torch.ones(7), torch.ones(3)]
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit(v) for v in items), return_exceptions=True), 10)

    results = asyncio.run(main())
    assert results[:3] == [3.0, 3.0, 2.0] and results[4] == 3.0
    assert isinstance(results[3], ZeroDivisionError)

    async def interrupted():  # an eval stopped while a request was queued: its loop then closes
        task = asyncio.ensure_future(batcher.submit(torch.ones(4)))
        await asyncio.sleep(0)
        task.cancel()

    asyncio.run(interrupted())
    assert asyncio.run(main())[0] == 3.0  # the next eval's requests are served, not stuck behind it


def test_unsteered_answers_shared_after_a_failed_generation_and_across_greedy_seeds():
    import asyncio

    from crosscoder.steering import Generation
    from evals.provider import SteeredModel, _Request

    calls = []

    class FlakyBatcher:  # the first generation fails, the next ones succeed
        async def submit(self, request):
            calls.append(request)
            await asyncio.sleep(0.01)
            if len(calls) == 1:
                raise RuntimeError("first generation failed")
            return Generation(text=f"answer {len(calls)}", input_tokens=2, output_tokens=1)

    model = SteeredModel.__new__(SteeredModel)  # the memo only: no model behind it
    model._unsteered, model._unsteered_pending, model._batcher = {}, {}, FlakyBatcher()

    def request(seed: int, temperature: float = 0.0) -> _Request:
        return _Request(prompt=[1, 2], vector=None, max_new_tokens=4, temperature=temperature, seed=seed)

    async def ask(requests):
        return await asyncio.gather(*(model._unsteered_generation(r) for r in requests), return_exceptions=True)

    results = asyncio.run(ask([request(0) for _ in range(5)]))
    assert isinstance(results[0], RuntimeError)  # the failure reaches the request that generated
    assert [r.text for r in results[1:]] == ["answer 2"] * 4  # one waiter generated again, for all of them
    assert len(calls) == 2
    # greedy answers do not depend on the seed; sampled ones do
    assert asyncio.run(ask([request(7)]))[0].text == "answer 2" and len(calls) == 2
    assert asyncio.run(ask([request(7, temperature=1.0)]))[0].text == "answer 3" and len(calls) == 3
