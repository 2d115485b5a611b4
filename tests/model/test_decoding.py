"""Searches: greedy, batched beam search and sampling, against references and hand-built models."""

from __future__ import annotations

import math

import pytest
import torch

from model.decoding import DecodeOptions, Hypothesis, decode, length_penalty, make_search
from model.inference import encode_sources, generate, step_rows
from model.network import Seq2Seq
from model.tokenizer import BOS_ID, EOS_ID, SEP_ID, UNK_ID

V = 24
SPECIAL = {0, BOS_ID, UNK_ID, SEP_ID}


def bigram_step(table: torch.Tensor):
    """A fake model: the next-token log-probs depend only on the last token."""
    def step(tokens: torch.Tensor, state: torch.Tensor):
        return torch.log_softmax(table[tokens], dim=-1), state
    return step


def run(table: torch.Tensor, batch: int, opts: DecodeOptions, generator=None) -> list[list[Hypothesis]]:
    return decode(bigram_step(table), torch.zeros(batch, 1), lambda s, i: s.index_select(0, i),
                  batch_size=batch, opts=opts, generator=generator)


def sources(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# -- a plain reference beam search: one hypothesis at a time ------------------------------

def reference_beam(model: Seq2Seq, src: list[int], opts: DecodeOptions) -> list[Hypothesis]:
    """Beam search written the slow, obvious way, with the same rules as BeamSearch:
    take the best 2K continuations; those ending in EOS among the first K finish; the best
    K others continue; stop after K finished or at max_length."""
    K = opts.beam_size
    rows = encode_sources(model, [src])
    beams = [([], 0.0, rows)]
    finished: list[Hypothesis] = []

    def normalised(length: int, lp: float) -> float:
        return lp / length_penalty(float(length), opts.length_penalty)

    for t in range(opts.max_length):
        cands = []
        for b, (toks, lp, r) in enumerate(beams):
            last = torch.tensor([toks[-1] if toks else BOS_ID])
            with torch.inference_mode():
                logp, r2 = step_rows(model, last, r)
            logp = logp[0].tolist()
            for v in range(len(logp)):
                if v in SPECIAL or (v == EOS_ID and t + 1 < opts.min_length):
                    continue
                n = opts.no_repeat_ngram_size
                if n and len(toks) >= n - 1:
                    seq = [*toks, v]
                    grams = {tuple(seq[i:i + n]) for i in range(len(seq) - n)}
                    if tuple(seq[-n:]) in grams:
                        continue
                cands.append((lp + logp[v], b * len(logp) + v, b, v, r2))
        cands.sort(key=lambda c: (-c[0], c[1]))
        top = cands[: 2 * K]
        at_max = t + 1 >= opts.max_length
        for rank, (score, _, b, v, _) in enumerate(top):
            if rank < K and (v == EOS_ID or at_max):
                toks = beams[b][0] if v == EOS_ID else [*beams[b][0], v]
                length = len(toks) + (1 if v == EOS_ID else 0)
                finished.append(Hypothesis(toks, normalised(length, score), score, v == EOS_ID))
        beams = [([*beams[b][0], v], score, r) for score, _, b, v, r in top if v != EOS_ID][:K]
        if len(finished) >= K or at_max:
            break
    finished.sort(key=lambda h: h.score, reverse=True)
    return finished[: opts.n_best]


@pytest.mark.parametrize("alpha,no_repeat", [(0.0, 0), (0.6, 0), (1.0, 2)])
def test_batched_beam_search_equals_reference_beam_search(tiny_model: Seq2Seq, alpha: float,
                                                          no_repeat: int) -> None:
    V_ = tiny_model.cfg.vocab_size
    srcs = sources(6, V_, seed=1)
    opts = DecodeOptions(strategy="beam", beam_size=4, n_best=4, max_length=7, length_penalty=alpha,
                         no_repeat_ngram_size=no_repeat)
    batched = generate(tiny_model, srcs, opts)
    for src, got in zip(srcs, batched, strict=True):
        want = reference_beam(tiny_model, src, opts)
        assert [h.tokens for h in got] == [h.tokens for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)


def test_beam_size_one_equals_greedy(tiny_model: Seq2Seq) -> None:
    srcs = sources(8, tiny_model.cfg.vocab_size, seed=2)
    greedy = generate(tiny_model, srcs, DecodeOptions(strategy="greedy", max_length=10))
    beam1 = generate(tiny_model, srcs, DecodeOptions(strategy="beam", beam_size=1, max_length=10))
    assert [g[0].tokens for g in greedy] == [b[0].tokens for b in beam1]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batched_decoding_equals_single_decodes(tiny_model: Seq2Seq, strategy: str) -> None:
    srcs = sources(10, tiny_model.cfg.vocab_size, seed=3)
    opts = DecodeOptions(strategy=strategy, beam_size=3, n_best=3 if strategy == "beam" else 1,
                         max_length=9, no_repeat_ngram_size=2)
    together = generate(tiny_model, srcs, opts)
    for src, hyps in zip(srcs, together, strict=True):
        alone = generate(tiny_model, [src], opts)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_nbest_lists_are_sorted_and_distinct(tiny_model: Seq2Seq) -> None:
    srcs = sources(5, tiny_model.cfg.vocab_size, seed=4)
    opts = DecodeOptions(strategy="beam", beam_size=5, n_best=5, max_length=8)
    for hyps in generate(tiny_model, srcs, opts):
        assert len(hyps) == 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)


def _table(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_no_repeat_ngram_size_holds(strategy: str) -> None:
    table = _table(5)
    table[:, 7] += 20.0  # the model loves token 7: without the rule it would repeat it forever
    table[:, EOS_ID] = -50.0
    opts = DecodeOptions(strategy=strategy, beam_size=3, n_best=3 if strategy != "greedy" else 1,
                         max_length=12, no_repeat_ngram_size=2)
    gen = torch.Generator().manual_seed(0)
    for hyps in run(table, 3, opts, generator=gen):
        for h in hyps:
            grams = [tuple(h.tokens[i:i + 2]) for i in range(len(h.tokens) - 1)]
            assert len(grams) == len(set(grams)), h.tokens


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_min_length_holds_and_decoding_stops_at_eos(strategy: str) -> None:
    table = _table(6)
    table[:, EOS_ID] += 30.0  # end-of-sequence is by far the likeliest token everywhere
    opts = DecodeOptions(strategy=strategy, beam_size=3, n_best=2 if strategy != "greedy" else 1,
                         max_length=10, min_length=4)
    for hyps in run(table, 4, opts, generator=torch.Generator().manual_seed(1)):
        for h in hyps:
            assert h.finished  # stopped at EOS, not cut at max_length
            assert len(h.tokens) + 1 == 4  # EOS allowed exactly from the 4th token on
            assert EOS_ID not in h.tokens


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_max_length_cuts_hypotheses(strategy: str) -> None:
    table = _table(7)
    table[:, EOS_ID] = -50.0
    opts = DecodeOptions(strategy=strategy, beam_size=2, n_best=2 if strategy != "greedy" else 1,
                         max_length=5)
    for hyps in run(table, 2, opts, generator=torch.Generator().manual_seed(2)):
        assert all(len(h.tokens) == 5 and not h.finished for h in hyps)


def test_special_tokens_are_never_emitted() -> None:
    table = _table(8)
    for t in SPECIAL:
        table[:, t] += 40.0  # a model that wants to say <unk>, <pad>, <s> and <sep>
    for strategy in ("greedy", "beam", "sample"):
        opts = DecodeOptions(strategy=strategy, beam_size=3, max_length=6)
        for hyps in run(table, 2, opts, generator=torch.Generator().manual_seed(3)):
            assert not SPECIAL & {t for h in hyps for t in h.tokens}


def test_top_p_samples_only_from_the_nucleus() -> None:
    table = torch.full((V, V), -30.0)
    table[:, 9], table[:, 10], table[:, 11] = 0.0, math.log(0.5), math.log(0.25)  # ~ 0.57, 0.29, 0.14
    opts = DecodeOptions(strategy="sample", n_best=8, max_length=6, top_p=0.8)
    seen = {t for hyps in run(table, 4, opts, generator=torch.Generator().manual_seed(4))
            for h in hyps for t in h.tokens}
    assert seen == {9, 10}


def test_low_temperature_sampling_matches_greedy() -> None:
    table = _table(9)
    greedy = run(table, 3, DecodeOptions(strategy="greedy", max_length=8))
    cold = run(table, 3, DecodeOptions(strategy="sample", temperature=1e-3, max_length=8),
               generator=torch.Generator().manual_seed(5))
    assert [g[0].tokens for g in greedy] == [c[0].tokens for c in cold]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_items_joining_a_running_search_decode_as_if_alone(strategy: str) -> None:
    """What the server's continuous batching relies on: concatenate mid-way, same results."""
    table = _table(10)
    opts = DecodeOptions(strategy=strategy, beam_size=3, n_best=3 if strategy == "beam" else 1,
                         max_length=8, no_repeat_ngram_size=2)
    step = bigram_step(table)
    alone = run(table, 1, opts)[0]
    first = make_search(["a"], opts)
    state = torch.zeros(first.num_rows, 1)
    results = {}
    for _ in range(3):  # "a" decodes three steps on its own
        logp, state = step(first.last_tokens(), state)
        res = first.advance(logp)
        results.update(dict(res.finished))
        if res.reorder is not None:
            state = state.index_select(0, res.reorder)
    search = type(first).concatenate([first, make_search(["b"], opts)])
    state = torch.cat([state, torch.zeros(search.num_rows - state.shape[0], 1)])
    while len(search):
        logp, state = step(search.last_tokens(), state)
        res = search.advance(logp)
        results.update(dict(res.finished))
        if res.reorder is not None:
            state = state.index_select(0, res.reorder)
    for key in ("a", "b"):
        assert [h.tokens for h in results[key]] == [h.tokens for h in alone]


def test_decode_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="strategy"):
        DecodeOptions(strategy="nucleus")
    with pytest.raises(ValueError, match="n_best"):
        DecodeOptions(strategy="beam", beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="temperature"):
        DecodeOptions(temperature=0.0)
