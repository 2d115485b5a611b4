"""Reranking: MMI as its formula says, the same in a batch as alone; the reverse model's data."""

from __future__ import annotations

import math

import pytest
import torch

from model.corpus import Pair, make_pairs, reverse_pairs
from model.decoding import DecodeOptions, Hypothesis
from model.inference import decode_sources
from model.rerank import RerankItem, last_turn, mmi_score, rerank, reverse_logprobs
from model.tokenizer import EOS_ID, SEP_ID

from .conftest import random_model

pytestmark = pytest.mark.usefixtures("one_thread")

MMI = DecodeOptions(strategy="beam", beam_size=4, n_best=4, rerank="mmi", mmi_weight=0.7, length_bonus=0.05)


def hyp(tokens: list[int], logprob: float, finished: bool = True) -> Hypothesis:
    return Hypothesis(tokens=tokens, score=logprob, logprob=logprob, finished=finished)


def test_last_turn_is_what_follows_the_last_separator() -> None:
    assert last_turn([7, 8, SEP_ID, 9, 10]) == [9, 10]
    assert last_turn([7, 8]) == [7, 8]
    assert last_turn([7, SEP_ID]) == []


def test_reverse_logprobs_are_the_teacher_forced_sums() -> None:
    reverse = random_model(3)
    reply, message = [11, 12, 13], [20, 21]
    (total, count), = reverse_logprobs(reverse, [(reply, message)])
    # by hand: the same pass, token by token
    with torch.inference_mode():
        logits = reverse(torch.tensor([reply]), torch.tensor([3]), torch.tensor([[1, 20, 21]]))
        logp = torch.log_softmax(logits.float(), -1)[0]
        expected = float(logp[0, 20] + logp[1, 21] + logp[2, EOS_ID])
    assert count == 3
    assert total == pytest.approx(expected, abs=1e-4)


def test_mmi_reorders_hand_built_candidates_exactly_as_its_formula_says() -> None:
    reverse = random_model(4)
    source = [30, 31, SEP_ID, 40, 41, 42]
    hyps = [hyp([50, 51], -1.0), hyp([60, 61, 62, 63], -3.0), hyp([70], -0.4), hyp([80, 81, 82], -2.2, False)]
    (ranked,) = rerank([RerankItem(source, hyps, MMI)], reverse)
    rev = reverse_logprobs(reverse, [(h.tokens, [40, 41, 42]) for h in hyps])
    expected = []
    for h, (total, count) in zip(hyps, rev, strict=True):
        forward = h.logprob / (len(h.tokens) + (1 if h.finished else 0))
        expected.append(forward + 0.7 * total / count + 0.05 * len(h.tokens))
    order = sorted(range(4), key=lambda i: expected[i], reverse=True)
    assert [h.tokens for h in ranked] == [hyps[i].tokens for i in order]
    assert [h.score for h in ranked] == pytest.approx([expected[i] for i in order], abs=1e-5)
    assert [h.logprob for h in ranked] == [hyps[i].logprob for i in order]  # kept as it was


def test_a_strong_reverse_weight_can_overturn_the_likelihood_order() -> None:
    reverse = random_model(5)
    hyps = [hyp([50 + i, 60 + i], -1.0 - 0.01 * i) for i in range(8)]
    by_likelihood = rerank([RerankItem([9], hyps, DecodeOptions(rerank="likelihood"))], None)[0]
    assert [h.tokens for h in by_likelihood] == [h.tokens for h in hyps]
    rev = [t / n for t, n in reverse_logprobs(reverse, [(h.tokens, [9]) for h in hyps])]
    by_mmi = rerank([RerankItem([9], hyps, DecodeOptions(rerank="mmi", mmi_weight=10.0))], reverse)[0]
    assert by_mmi[0].tokens == hyps[max(range(8), key=lambda i: rev[i])].tokens


def test_an_empty_candidate_is_never_chosen_by_mmi() -> None:
    hyps = [hyp([], -0.01), hyp([5, 6, 7], -4.0)]
    assert mmi_score(hyps[0], -1.0, 1, MMI) == -math.inf
    ranked = rerank([RerankItem([9], hyps, MMI)], random_model(6))[0]
    assert ranked[0].tokens == [5, 6, 7]


def test_none_keeps_the_search_order_and_likelihood_sorts_by_score() -> None:
    hyps = [hyp([5], -3.0), hyp([6], -1.0), hyp([7], -2.0)]
    assert [h.tokens for h in rerank([RerankItem([9], hyps, DecodeOptions(rerank="none"))], None)[0]] \
        == [[5], [6], [7]]
    assert [h.tokens for h in rerank([RerankItem([9], hyps, DecodeOptions())], None)[0]] == [[6], [7], [5]]


def test_mmi_without_a_reverse_model_is_refused() -> None:
    with pytest.raises(ValueError, match="reverse model"):
        rerank([RerankItem([9], [hyp([5], -1.0)], MMI)], None)


def test_reranked_in_a_batch_equals_reranked_alone() -> None:
    model, reverse = random_model(7), random_model(8)
    sources = [[10, 11, SEP_ID, 12], [13, 14, 15, 16, 17, 18], [19], [20, 21, 22]]
    opts = [MMI, DecodeOptions(strategy="sample", n_best=5, rerank="mmi", mmi_weight=0.3),
            DecodeOptions(strategy="beam", beam_size=3, n_best=3), MMI]
    plain = DecodeOptions(strategy="beam", beam_size=4, n_best=4, rerank="none")
    found = [decode_sources(model, [s], plain)[0] for s in sources]
    items = [RerankItem(s, h, o) for s, h, o in zip(sources, found, opts, strict=True)]
    together = rerank(items, reverse)
    for item, ranked in zip(items, together, strict=True):
        (alone,) = rerank([item], reverse)
        assert [h.tokens for h in ranked] == [h.tokens for h in alone]
        assert [h.score for h in ranked] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_decode_sources_with_mmi_uses_the_reverse_model() -> None:
    model, reverse = random_model(9), random_model(10)
    src = [[10, 11, 12]]
    opts = DecodeOptions(strategy="beam", beam_size=4, n_best=4, rerank="none")
    plain = decode_sources(model, src, opts)[0]
    mmi = decode_sources(model, src, MMI, reverse=reverse)[0]
    assert sorted(map(tuple, (h.tokens for h in mmi))) == sorted(map(tuple, (h.tokens for h in plain)))
    assert mmi == rerank([RerankItem(src[0], plain, MMI)], reverse)[0]


def test_the_reverse_models_pairs_are_the_forward_pairs_swapped() -> None:
    conversations = [["hi there", "hello you", "how are you", "fine"], ["a b", "c d"]]
    forward = make_pairs(conversations, context_turns=2)
    backward = reverse_pairs(forward)
    assert len(backward) == len(forward)
    for f, b in zip(forward, backward, strict=True):
        assert b == Pair(context=(f.response,), response=f.context[-1])
    assert backward[2] == Pair(context=("fine",), response="how are you")
