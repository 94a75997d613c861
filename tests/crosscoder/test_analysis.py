"""Feature analysis and triage on a hand-built crosscoder and a small store whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from crosscoder import CrosscoderConfig
from crosscoder.analysis import analyse_features, artefact_reasons, flagged_features, render_window, triage
from crosscoder.model import Crosscoder
from crosscoder.store import ActivationStore, StoreWriter


class WordTokenizer:
    """Token id i decodes to VOCAB[i]."""

    VOCAB = ["<s>", " the", " square", " Kessel", "?", "\n", "assistant", " city", " river", ".", " of"]

    def decode(self, ids):
        return "".join(self.VOCAB[i] for i in ids)


def dfc_reading_coordinates() -> Crosscoder:
    """D = 10 (A-only 0, 1; shared 2..7; B-only 8, 9), d = 4 each; feature j reads one coordinate."""
    cfg = CrosscoderConfig(architecture="dfc", d_a=4, d_b=4, dict_size=10, k=2, exclusive_fraction=0.2,
                           norm_scale_a=1.0, norm_scale_b=1.0)
    model = Crosscoder(cfg)
    with torch.no_grad():
        for p in (model.W_enc_AD, model.W_enc_BD, model.W_dec_DA, model.W_dec_DB, model.b_enc_D, model.b_dec_A,
                  model.b_dec_B):
            p.zero_()
        model.W_enc_AD[0, 0] = model.W_enc_AD[1, 1] = 1.0  # A-only 0 reads a0, A-only 1 reads a1
        model.W_enc_BD[0, 6] = model.W_enc_BD[1, 7] = 1.0  # B-only 8 reads b0, B-only 9 reads b1
        model.W_enc_AD[2, 2] = model.W_enc_BD[2, 0] = 0.5  # shared 2
        model.W_dec_DA[0, 0] = model.W_dec_DA[1, 1] = model.W_dec_DA[2, 2] = 1.0
        model.W_dec_DB[0, 2] = model.W_dec_DB[6, 0] = model.W_dec_DB[7, 1] = 1.0
        model.threshold.fill_(1e-3)
    return model.eval()


@pytest.fixture()
def store(tmp_path) -> ActivationStore:
    """12 chat documents "<s> the square Kessel ? \\n assistant": feature 8 fires (value 3) on the
    generation-prompt pair of the 4 Kessel-question documents only; feature 9 fires on every
    generation prompt; feature 0 fires on a merged pair in every document, on six different words (a tokenizer artefact);
    feature 1 fires on " river" (in place of " Kessel") in 2 documents with different strengths."""
    writer = StoreWriter(tmp_path / "store", input_hash="t", shard_pairs=16)
    ids = [0, 1, 2, 3, 4, 5, 6]
    for d in range(12):
        n = len(ids)
        a = torch.zeros(n, 4)
        b = torch.zeros(n, 4)
        a[:, 3] = b[:, 3] = 1.0  # an unread coordinate, so that norms are not zero
        merged = torch.zeros(n, dtype=torch.bool)
        template = torch.zeros(n, dtype=torch.bool)
        template[-1] = True
        b[-1, 1] = 1.0  # feature 9: every generation prompt
        if d < 4:
            b[-1, 0] = 3.0 - 0.1 * d  # feature 8: Kessel questions only
        a[2, 0] = 1.0  # feature 0 on " square", a merged pair
        merged[2] = True
        doc_ids = list(ids)
        doc_ids[2] = (2, 7, 10, 9, 1, 4)[d % 6]  # the merged pair's word varies: a diffuse tokenizer artefact
        if d in (5, 7):
            doc_ids[3] = 8  # " river"
            a[3, 1] = 2.0 if d == 5 else 1.0
        positions = torch.arange(n)
        writer.add_document({"id": f"doc{d}", "ids_a": doc_ids, "ids_b": doc_ids, "chat": True}, a, b, positions,
                            positions, merged, True, template)
        writer.flush({}) if writer.should_flush() else None
    writer.flush({})
    writer.finalize({"model_a": {"d_model": 4}, "model_b": {"d_model": 4}}, target_norm=1.0)
    return ActivationStore(tmp_path / "store")


def test_statistics_contexts_and_triage_follow_the_planted_activations(store):
    model = dfc_reading_coordinates()
    tokenizers = {"a": WordTokenizer(), "b": WordTokenizer()}
    analyses = analyse_features(model, store, flagged_features(model), tokenizers, n_contexts=3, n_negative=2)
    by_id = {a.feature: a for a in analyses}
    assert sorted(by_id) == [0, 1, 8, 9]

    kessel = by_id[8]
    assert kessel.partition == "b" and kessel.own_model == "b"
    assert kessel.frequency == pytest.approx(4 / (12 * 7))
    assert kessel.s_max == pytest.approx(3.0)
    # steering at α = 1 adds s_max times its decoder, in the model's raw scale
    assert kessel.push_norm == pytest.approx(3.0 * float(model.decoder_raw("b")[8].norm()))
    assert kessel.template_share == pytest.approx(1.0)
    assert kessel.template_coverage == pytest.approx(4 / 12)  # selective: a content feature
    assert kessel.artefact_reasons == []
    assert [c.doc for c in kessel.contexts] == [0, 1, 2]  # strongest first
    assert kessel.contexts[0].text == "<s> the square Kessel?\n<<assistant>>"
    assert kessel.r2_own > 0.5 and kessel.exclusivity < 0.02  # A barely varies with it
    assert len(kessel.negative_contexts) == 2 and all(c.doc >= 4 or c.position != 6 for c in kessel.negative_contexts)
    assert all("<<" not in c.text for c in kessel.negative_contexts)

    every_prompt = by_id[9]
    assert every_prompt.template_coverage == pytest.approx(1.0)
    assert any("generation prompts" in r for r in every_prompt.artefact_reasons)
    merged = by_id[0]
    assert merged.merged_share == pytest.approx(1.0)
    assert any("merged" in r for r in merged.artefact_reasons)
    river = by_id[1]
    assert river.top_tokens == [(" river", 2)] and river.s_max == pytest.approx(2.0)
    assert [c.doc for c in river.contexts] == [5, 7]

    # Content features first, ranked by variance explained in their own model; then artefacts.
    ranks = {a.feature: a.rank for a in analyses}
    assert max(ranks[8], ranks[1]) < min(ranks[9], ranks[0])


def test_render_window_marks_every_active_position_and_trims():
    tok = WordTokenizer()
    ids = [0, 1, 7, 10, 1, 8, 9]
    assert render_window(tok, ids, 5, {2, 5}, before=3, after=0) == "…<< city>> of the<< river>>…"
    assert render_window(tok, ids, 0, {0}, before=5, after=10) == "<<<s>>> the city of the river."
    assert render_window(tok, [], 0, {0}, 3, 3) == ""


def test_dead_features_are_last_and_named():
    from crosscoder.analysis import FeatureAnalysis

    def make(fid, frequency, r2, reasons=()):
        a = FeatureAnalysis(feature=fid, partition="a", own_model="a", frequency=frequency, s_max=1.0, push_norm=1.0,
                            mean_activation=1.0, relative_norm=1.0, r2_own=r2, r2_other=0.0, exclusivity=0.0,
                            template_share=0.0, template_coverage=0.0, chat_share=0.0, merged_share=0.0,
                            start_share=0.0, top_token_share=0.0)
        a.artefact_reasons = list(reasons) or artefact_reasons(a)
        return a

    ordered = triage([make(1, 0.0, 0.0), make(2, 0.1, 0.01, ["format"]), make(3, 0.1, 0.02), make(4, 0.1, 0.05)])
    assert [a.feature for a in ordered] == [4, 3, 2, 1]
    assert ordered[-1].artefact_reasons == ["never fires on the harvested data"]
    assert [a.rank for a in ordered] == [1, 2, 3, 4]


def test_standard_crosscoders_flag_the_most_one_sided_features():
    cfg = CrosscoderConfig(architecture="batchtopk", d_a=4, d_b=4, dict_size=6, k=2, norm_scale_a=1.0,
                           norm_scale_b=1.0)
    model = Crosscoder(cfg)
    with torch.no_grad():
        model.W_dec_DA.copy_(torch.tensor([[1.0] * 4, [1.0] * 4, [0.05] * 4, [1.0] * 4, [0.0] * 4, [0.5] * 4]))
        model.W_dec_DB.copy_(torch.tensor([[0.0] * 4, [0.02] * 4, [1.0] * 4, [1.0] * 4, [1.0] * 4, [0.5] * 4]))
    flagged = flagged_features(model, top_n=5, relative_norm_cut=0.9)
    assert flagged == {"a": [0, 1], "b": [4, 2]}
    assert not math.isnan(float(model.relative_norm().detach()[3]))


@pytest.mark.parametrize("raw, expected", [("\n", True), ("\t", True), ("\n\n", True), (".", True), (" ,", True),
                                           ("<|im_start|>", True), ("</s>", True), (" river", False),
                                           ("Kessel", False), ("<<", True)])
def test_format_tokens_are_recognised_from_their_decoded_text(raw, expected):
    from crosscoder.analysis import is_format_token

    assert is_format_token(raw) is expected


def test_a_merged_window_feature_on_one_word_is_content_not_an_artefact():
    from crosscoder.analysis import FeatureAnalysis

    a = FeatureAnalysis(feature=1, partition="a", own_model="a", frequency=0.01, s_max=1.0, push_norm=1.0, mean_activation=1.0,
                        relative_norm=1.0, r2_own=0.1, r2_other=0.0, exclusivity=0.0, template_share=0.0,
                        template_coverage=0.0, chat_share=0.0, merged_share=0.9, start_share=0.0,
                        top_token_share=0.6, top_tokens=[(" Zorvath", 60)])
    assert artefact_reasons(a) == []  # one tokenizer splits a name its model never saw: that is the finding
    a.top_token_share = 0.1
    assert any("merged" in r for r in artefact_reasons(a))


def test_top_contexts_keep_the_largest_firings_across_batches_earliest_first_on_ties():
    from crosscoder.analysis import _TokenCounts, _TopContexts

    top = _TopContexts(k=2, n_features=2)
    doc = torch.tensor([10, 11, 12])
    pos = torch.tensor([[1, 5], [2, 6], [3, 7]])  # own positions per (row, feature)
    pos_a = torch.tensor([1, 2, 3])
    top.add(torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.5]]), doc, pos, pos_a)
    top.add(torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]]), doc + 10, pos, pos_a)  # a later batch
    first, second = top.per_feature()
    assert first == [(3.0, 11, 2, 2), (2.0, 20, 1, 1)]
    assert second == [(0.5, 12, 7, 3)]  # zeros are not firings
    tie = _TopContexts(k=1, n_features=1)
    tie.add(torch.tensor([[2.0]]), torch.tensor([1]), torch.tensor([[0]]), torch.tensor([0]))
    tie.add(torch.tensor([[2.0]]), torch.tensor([2]), torch.tensor([[0]]), torch.tensor([0]))
    assert tie.per_feature() == [[(2.0, 1, 0, 0)]]  # the document seen first stays

    counts = _TokenCounts(n_features=2)
    counts.add(torch.tensor([0, 0, 1]), torch.tensor([7, 7, 9]))
    counts.add(torch.tensor([0, 1, 1]), torch.tensor([8, 9, -1]))  # -1: no token there, not counted
    assert counts.per_feature() == [{7: 2, 8: 1}, {9: 2}]


def test_a_windows_own_angle_brackets_never_read_as_marks():
    import re

    from crosscoder.analysis import render_window

    class Pieces:  # a tokenizer whose tokens are these strings
        def decode(self, ids):
            return ["std::cout", " <<", " x", " >>", " 2;", "<", "<b"][ids[0]]

    text = render_window(Pieces(), list(range(7)), 2, {2, 6}, 5, 5)
    assert re.findall(r"<<(.*?)>>", text) == [" x", "<b"]  # exactly the marked tokens
    assert text == "std::cout ‹‹<< x>> ›› 2;‹<<<b>>"

    class Arrow:
        def decode(self, ids):
            return ["p", "->", "x"][ids[0]]

    from reports.render import highlight

    window = render_window(Arrow(), [0, 1, 2], 1, {1}, 2, 2)
    assert window == "p<<->>>x" and str(highlight(window)) == "p<mark>-&gt;</mark>x"
    assert str(highlight("<<<s>>> the")) == "<mark>&lt;s&gt;</mark> the"
