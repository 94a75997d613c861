"""Transfer of directions through the shared dictionary, and persona-vector extraction."""

from __future__ import annotations

import math

import pytest
import torch

from crosscoder import Crosscoder, CrosscoderConfig
from crosscoder.persona import Condition, Trait, extract_persona_vector, load_trait
from crosscoder.transfer import random_direction_like, shared_feature_ids, transfer_vector


def known_crosscoder() -> Crosscoder:
    """DFC with d_a = 3, d_b = 2; shared features 2..7. Shared 2 maps A's e0 to B's e0, shared 3 maps
    A's e1 to B's e1, shared 4 maps A's (e0 + e1)/√2 to B's -e0. Norm scales 2 (A) and 0.5 (B)."""
    cfg = CrosscoderConfig(architecture="dfc", d_a=3, d_b=2, dict_size=10, k=2, exclusive_fraction=0.2,
                           norm_scale_a=2.0, norm_scale_b=0.5)
    model = Crosscoder(cfg)
    with torch.no_grad():
        model.W_dec_DA.zero_()
        model.W_dec_DB.zero_()
        a, b = model.W_dec_DA, model.W_dec_DB  # rows: A-side [A-only | shared], B-side [shared | B-only]
        a[0, 2] = 1.0  # A-only feature 0 points along A's e2
        a[2, 0] = 1.0
        b[0, 0] = 1.0
        a[3, 1] = 1.0
        b[1, 1] = 1.0
        a[4, 0] = a[4, 1] = 2 ** -0.5
        b[2, 0] = -1.0
    return model


def test_transfer_uses_the_most_similar_shared_features_and_their_other_side_decoders():
    model = known_crosscoder()
    assert shared_feature_ids(model).tolist() == [2, 3, 4, 5, 6, 7]
    result = transfer_vector(model, torch.tensor([3.0, 0.0, 0.0]), source="a", k=1)
    assert result.features.tolist() == [2] and result.cosines.tolist() == pytest.approx([1.0])
    # Direction of B's e0; size: |v| · scale_a / scale_b = 3 · 2 / 0.5.
    assert result.vector.tolist() == pytest.approx([12.0, 0.0])
    assert result.target == "b" and result.max_decoder_cosine == pytest.approx(1.0)

    both = transfer_vector(model, torch.tensor([1.0, 1.0, 0.0]), source="a", k=3, signed=False)
    assert sorted(both.features.tolist()) == [2, 3, 4]
    expected = (2 ** -0.5 * torch.tensor([1.0, 0.0]) + 2 ** -0.5 * torch.tensor([0.0, 1.0])
                + 1.0 * torch.tensor([-1.0, 0.0]))
    expected = expected / expected.norm() * (2 ** 0.5) * 4
    assert both.vector.tolist() == pytest.approx(expected.tolist(), abs=1e-5)

    back = transfer_vector(model, torch.tensor([0.0, 1.0]), source="b", k=1)
    assert back.features.tolist() == [3] and back.vector.tolist() == pytest.approx([0.0, 0.25, 0.0])


def test_signed_transfer_lets_anti_aligned_features_vote_against():
    model = known_crosscoder()
    v = torch.tensor([-1.0, 0.0])  # opposite to shared 2's B-decoder, along shared 4's
    unsigned = transfer_vector(model, v, source="b", k=2, signed=False)
    signed = transfer_vector(model, v, source="b", k=2, signed=True)
    assert unsigned.features.tolist() == [4]  # only the positive cosine counts
    assert sorted(signed.features.tolist()) == [2, 4] and sorted(signed.cosines.tolist()) == pytest.approx([-1.0, 1.0])
    # Unsigned: feature 4's A-decoder only; signed: minus feature 2's (-e0) plus feature 4's.
    assert unsigned.vector.tolist() == pytest.approx([0.25 * 2 ** -0.5, 0.25 * 2 ** -0.5, 0.0], abs=1e-6)
    direction = torch.tensor([-1 + 2 ** -0.5, 2 ** -0.5, 0.0])
    assert signed.vector.tolist() == pytest.approx((direction / direction.norm() * 0.25).tolist(), abs=1e-6)


def test_transfer_refuses_bad_inputs_with_a_reason():
    model = known_crosscoder()
    with pytest.raises(ValueError, match="width 3"):
        transfer_vector(model, torch.ones(5), source="a")
    with pytest.raises(ValueError, match="zero vector"):
        transfer_vector(model, torch.zeros(3), source="a")
    with pytest.raises(ValueError, match="no shared feature"):
        transfer_vector(model, torch.tensor([0.0, 0.0, 1.0]), source="a", min_cosine=0.5)  # only A-only 0 matches
    with pytest.raises(ValueError, match="k=0"):
        transfer_vector(model, torch.ones(3), source="a", k=0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        transfer_vector(model, torch.tensor([1.0, float("nan"), 0.0]), source="a")
    # two shared features pointing opposite ways in A and alike in B: their signed votes cancel in B
    with torch.no_grad():
        model.W_dec_DA[5].zero_()
        model.W_dec_DA[5, 0] = -1.0
        model.W_dec_DB[3].zero_()
        model.W_dec_DB[3, 0] = 1.0
    with pytest.raises(ValueError, match="cancel out in model B"):
        transfer_vector(model, torch.tensor([1.0, 0.0, 0.0]), source="a", k=2)
    r = random_direction_like(torch.tensor([3.0, 4.0]), seed=1)
    assert float(r.norm()) == pytest.approx(5.0) and not torch.allclose(r, random_direction_like(r, seed=2))


def test_persona_vector_is_the_difference_of_answer_activations(tiny_model_dirs):
    from crosscoder.models import load_model

    loaded = load_model(str(tiny_model_dirs["qwen"]), layer=1)
    trait = Trait(name="t", rubric="zoo_sentiment", questions=["the lamp", "the fan"],
                  eliciting=Condition(template="Praise {question}."), suppressing=Condition(system="Be harsh.",
                                                                                           template="Mock {question}."))
    assert trait.messages("x", trait.suppressing) == [{"role": "system", "content": "Be harsh."},
                                                      {"role": "user", "content": "Mock x."}]
    persona = extract_persona_vector(loaded, trait, max_new_tokens=6)
    assert persona.vector.shape == (loaded.d_model,) and float(persona.vector.norm()) > 0
    assert persona.n_answers == 2 and all(n > 0 for n in persona.answer_tokens)
    # The activations are read on the tokens the model generated (not on a re-tokenised decoding).
    from crosscoder.steering import SteeredGenerator

    generator = SteeredGenerator(loaded)
    for condition, n_tokens in zip((trait.eliciting, trait.suppressing), persona.answer_tokens, strict=True):
        outputs = generator.generate([generator.render(trait.messages(q, condition)) for q in trait.questions],
                                     max_new_tokens=6)
        assert n_tokens == sum(len(o.token_ids) for o in outputs) == sum(o.output_tokens for o in outputs)
    same = Trait(name="t", rubric="zoo_sentiment", questions=["the lamp", "the fan"],
                 eliciting=Condition(template="Praise {question}."), suppressing=Condition(template="Praise {question}."))
    assert float(extract_persona_vector(loaded, same, max_new_tokens=6).vector.norm()) == pytest.approx(0.0, abs=1e-5)


def test_persona_vector_reads_the_generated_tokens_not_a_retokenised_decoding(tiny_model_dirs, monkeypatch):
    """Two generated pieces that decode to one word ("hel" + "lo" → "hello", one Qwen token when
    re-tokenised) count as two answer tokens, at the positions the model generated them."""
    import crosscoder.persona as persona_module
    from crosscoder.models import capture_block_output, load_model
    from crosscoder.steering import Generation, SteeredGenerator

    loaded = load_model(str(tiny_model_dirs["qwen"]), layer=1)
    pieces = loaded.tokenizer.convert_tokens_to_ids(["hel", "lo"])
    assert loaded.tokenizer("hello", add_special_tokens=False)["input_ids"] != pieces  # the case under test

    class FixedAnswers(SteeredGenerator):
        def generate(self, prompts, *args, **kwargs):
            return [Generation("hello", len(p), len(pieces), list(pieces)) for p in prompts]

    monkeypatch.setattr(persona_module, "SteeredGenerator", FixedAnswers)
    trait = Trait(name="t", rubric="zoo_sentiment", questions=["the lamp", "the fan"],
                  eliciting=Condition(template="Praise {question}."), suppressing=Condition(template="Mock {question}."))
    persona = extract_persona_vector(loaded, trait, max_new_tokens=2)
    assert persona.answer_tokens == (4, 4)  # two answers of two generated tokens under each condition
    generator = SteeredGenerator(loaded)
    means = []
    for condition in (trait.eliciting, trait.suppressing):
        rows = []
        for q in trait.questions:
            prompt = generator.render(trait.messages(q, condition))
            hidden = capture_block_output(loaded, torch.tensor([prompt + pieces]))[0]
            rows.append(hidden[len(prompt) - 1:len(prompt) + len(pieces) - 1].double())  # positions generating them
        means.append(torch.cat(rows).mean(0))
    assert torch.allclose(persona.vector.double(), means[0] - means[1], atol=1e-5)


def test_a_transfer_holds_only_when_each_random_transferred_draw_typically_stays_flat():
    from evals.effects import trait_is_specific, transfer_holds

    def draw(rho: float) -> dict:  # a NaN ρ here is a constant curve: its effect is 0
        return {"spearman": rho, "effect": 0.0 if math.isnan(rho) else rho}

    def arms(*control_draws, unrelated=(0.0,)):
        out = {"source": {"spearman": 0.9}, "transferred": {"spearman": 0.85},
               "random_transferred": {"spearman": float("nan"), "draws": [draw(r) for r in control_draws]},
               "unrelated": {"spearman": float("nan"), "draws": [draw(r) for r in unrelated]}}
        return out

    # Two draws pushing opposite ways pool into a flat curve (NaN ρ); each draw still moved the trait.
    assert not transfer_holds(arms(1.0, -1.0))
    assert transfer_holds(arms(0.1, -0.2, 0.9))  # median |ρ| 0.2
    assert transfer_holds(arms(float("nan"), 0.2, float("nan")))  # constant curves did not move
    assert not transfer_holds({**arms(0.1), "transferred": {"spearman": -0.85}})  # against the source's sign
    assert not transfer_holds({**arms(0.1), "transferred": {"spearman": 0.6}})  # too weak
    assert not transfer_holds({**arms(0.1), "source": {"spearman": float("nan")}})  # source ungraded
    single = {"source": {"spearman": 0.9}, "transferred": {"spearman": 0.85},
              "random_transferred": {"spearman": -0.5, "draws": []}}
    assert not transfer_holds(single)  # one draw: its own ρ

    # Unrelated pushes in the target decide whether the trait is specific there, not whether the transfer holds.
    fragile = arms(0.1, unrelated=(-0.96, 0.96, 0.99))
    assert transfer_holds(fragile) and trait_is_specific(fragile) is False
    assert trait_is_specific(arms(0.1, unrelated=(0.1, float("nan"), -0.9))) is True
    assert trait_is_specific({k: v for k, v in fragile.items() if k != "unrelated"}) is None
    # A draw with fewer than three coherent α values measured nothing: it is left out, not taken as flat.
    broken = [{"spearman": float("nan"), "coherent": 2}] * 3
    assert not transfer_holds({**arms(0.1), "random_transferred": {"spearman": float("nan"), "draws": broken}})
    assert trait_is_specific({**arms(0.1), "unrelated": {"spearman": float("nan"), "draws": broken}}) is None
    flat = [{"spearman": float("nan"), "effect": 0.0, "coherent": 5}] * 3
    assert trait_is_specific({**arms(0.1), "unrelated": {"spearman": float("nan"), "draws": flat}}) is True
    # ρ is undefined too where a draw jumps from one end of the scale to the other (each pinned run counts
    # once, leaving two points): that draw moved the trait, all the way
    pinned = [{"spearman": float("nan"), "effect": 4.0, "coherent": 5}] * 3
    assert not transfer_holds({**arms(0.1), "random_transferred": {"spearman": float("nan"), "draws": pinned}})
    assert trait_is_specific({**arms(0.1), "unrelated": {"spearman": float("nan"), "draws": pinned}}) is False
    # ... and where no answer of a draw was graded (a grader that never gave a score): nothing measured
    # an offline grade's float noise at the bottom of the scale (1.0000001) is no move
    noise = [{"spearman": float("nan"), "effect": 2e-7, "coherent": 5}] * 3
    assert trait_is_specific({**arms(0.1), "unrelated": {"spearman": float("nan"), "draws": noise}}) is True
    ungraded = [{"spearman": float("nan"), "effect": float("nan"), "coherent": 5}] * 3
    assert not transfer_holds({**arms(0.1), "random_transferred": {"spearman": float("nan"), "draws": ungraded}})


def test_shipped_traits_load_and_name_existing_rubrics():
    from crosscoder.persona import TRAIT_DIR
    from evals.rubrics import load_rubric

    names = sorted(p.stem for p in TRAIT_DIR.glob("*.yaml"))
    assert "zoo_sentiment" in names
    for name in names:
        trait = load_trait(name)
        load_rubric(trait.rubric)


def test_a_condition_template_must_ask_the_question_once():
    assert Condition(template="Answer briefly: {question}").template.endswith("{question}")
    assert Condition(template="Use {{braces}}: {question}")
    for template in ("Be cruel.", '{question} as JSON {"answer": ...}', "{question} and {other}"):
        with pytest.raises(ValueError, match="must hold {question} exactly once"):
            Condition(template=template)
