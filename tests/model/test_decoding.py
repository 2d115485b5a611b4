"""Searches: greedy, batched beam search and sampling, against references and hand-built models."""

from __future__ import annotations

import math

import pytest
import torch

import model.decoding as decoding
from model.decoding import (
    BeamSearch,
    DecodeOptions,
    Hypothesis,
    ban_repeated_ngrams,
    decode,
    length_penalty,
    make_search,
)
from model.inference import decode_sources, encode_sources, step_rows
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
    batched = decode_sources(tiny_model, srcs, opts)
    for src, got in zip(srcs, batched, strict=True):
        want = reference_beam(tiny_model, src, opts)
        assert [h.tokens for h in got] == [h.tokens for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)


def test_beam_size_one_equals_greedy(tiny_model: Seq2Seq) -> None:
    srcs = sources(8, tiny_model.cfg.vocab_size, seed=2)
    greedy = decode_sources(tiny_model, srcs, DecodeOptions(strategy="greedy", max_length=10))
    beam1 = decode_sources(tiny_model, srcs, DecodeOptions(strategy="beam", beam_size=1, max_length=10))
    assert [g[0].tokens for g in greedy] == [b[0].tokens for b in beam1]


@pytest.mark.parametrize("strategy,n_best", [("greedy", 1), ("beam", 3), ("beam", 1)])
def test_batched_decoding_equals_single_decodes(tiny_model: Seq2Seq, strategy: str, n_best: int) -> None:
    srcs = sources(10, tiny_model.cfg.vocab_size, seed=3)
    opts = DecodeOptions(strategy=strategy, beam_size=3, n_best=n_best, max_length=9, no_repeat_ngram_size=2)
    together = decode_sources(tiny_model, srcs, opts)
    for src, hyps in zip(srcs, together, strict=True):
        alone = decode_sources(tiny_model, [src], opts)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_nbest_lists_are_sorted_and_distinct(tiny_model: Seq2Seq) -> None:
    srcs = sources(5, tiny_model.cfg.vocab_size, seed=4)
    opts = DecodeOptions(strategy="beam", beam_size=5, n_best=5, max_length=8)
    for hyps in decode_sources(tiny_model, srcs, opts):
        assert len(hyps) == 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)


def _table(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 3


def _counted(table: torch.Tensor, opts: DecodeOptions) -> tuple[list[Hypothesis], int]:
    """One item's hypotheses under the bigram model, and the decoder steps the search took."""
    steps = 0
    inner = bigram_step(table)

    def step(tokens: torch.Tensor, state: torch.Tensor):
        nonlocal steps
        steps += 1
        return inner(tokens, state)
    hyps = decode(step, torch.zeros(1, 1), lambda s, i: s.index_select(0, i), batch_size=1, opts=opts)[0]
    return hyps, steps


@pytest.mark.parametrize("n_best", [1, 2])
def test_early_stopping_settles_the_n_best_of_the_full_search_in_fewer_steps(n_best: int) -> None:
    """With no length penalty the rule is exact: a settled item's n best are those the search
    run to K finished hypotheses finds, and it gets there in fewer steps."""
    full = DecodeOptions(strategy="beam", beam_size=4, n_best=n_best, max_length=14, length_penalty=0.0,
                         early_stopping=False)
    early = DecodeOptions(**{**full.__dict__, "early_stopping": True})
    saved = 0
    for seed in range(12):
        table = _table(seed)
        table[:, EOS_ID] -= 2.0  # replies of a few tokens, so that the beams finish apart
        want, full_steps = _counted(table, full)
        got, early_steps = _counted(table, early)
        assert len(got) >= n_best
        assert [h.tokens for h in got[:n_best]] == [h.tokens for h in want[:n_best]]
        assert early_steps <= full_steps
        saved += full_steps - early_steps
    assert saved > 0


def test_early_stopping_stops_when_the_best_live_beam_cannot_catch_up() -> None:
    """The rule by hand, with a length penalty: the reply "" (EOS at once, p 0.3) is settled as
    soon as the best live beam, ending at the next step, would score below it."""
    table = torch.full((V, V), -30.0)
    table[BOS_ID, EOS_ID], table[BOS_ID, 7] = math.log(0.3), math.log(0.7)
    table[7] = 0.0  # after "7" every token is as likely as any other: 1/V each
    opts = DecodeOptions(strategy="beam", beam_size=2, n_best=1, max_length=10, length_penalty=0.6)
    hyps, steps = _counted(table, opts)
    best = math.log(0.3) / length_penalty(1.0, 0.6)
    assert hyps[0].tokens == [] and hyps[0].score == pytest.approx(best)
    # After step 1 the live "7" could still end at length 2 with a better score: go on.
    assert best < math.log(0.7) / length_penalty(2.0, 0.6)
    # After step 2 its best continuation, ending at length 3, cannot: stop.
    assert best >= (math.log(0.7) - math.log(V)) / length_penalty(3.0, 0.6)
    assert steps == 2
    _, full_steps = _counted(table, DecodeOptions(**{**opts.__dict__, "early_stopping": False}))
    assert full_steps > 2


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


def _drive(search, step, state, results, on_step=None, steps=None):
    """Run a search over a bigram step, to the end or for `steps` steps; finished items go
    into `results`. Returns the state, reordered as the search went."""
    while len(search) and (steps is None or steps > 0):
        logp, state = step(search.last_tokens(), state)
        res = search.advance(logp)
        results.update(dict(res.finished))
        if res.reorder is not None:
            state = state.index_select(0, res.reorder)
        if on_step is not None:
            state = on_step(search, state)
        steps = None if steps is None else steps - 1
    return state


@pytest.mark.parametrize("strategy,n_best", [("greedy", 1), ("beam", 3), ("beam", 1)])
def test_items_joining_a_running_search_decode_as_if_alone(strategy: str, n_best: int) -> None:
    """What the server's continuous batching relies on: concatenate mid-way, same results."""
    table = _table(10)
    opts = DecodeOptions(strategy=strategy, beam_size=3, n_best=n_best, max_length=8, no_repeat_ngram_size=2)
    step = bigram_step(table)
    alone = run(table, 1, opts)[0]
    first = make_search(["a"], opts)
    state = torch.zeros(first.num_rows, 1)
    results = {}
    state = _drive(first, step, state, results, steps=3)  # "a" decodes three steps on its own
    search = type(first).concatenate([first, make_search(["b"], opts)])
    state = torch.cat([state, torch.zeros(search.num_rows - state.shape[0], 1)])
    _drive(search, step, state, results)
    for key in ("a", "b"):
        assert [h.tokens for h in results[key]] == [h.tokens for h in alone]


def test_decode_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="strategy"):
        DecodeOptions(strategy="nucleus")
    with pytest.raises(ValueError, match="n_best"):
        DecodeOptions(strategy="beam", beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="temperature"):
        DecodeOptions(temperature=0.0)


# -- per-step bookkeeping: filter, in-place advance, the last-resort EOS, fast kernels ---------

@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_filter_drops_items_between_steps_and_the_rest_decode_as_if_alone(strategy: str) -> None:
    table = _table(11)
    table[:, EOS_ID] = -50.0  # nobody finishes early: every item is still there when filtered
    opts = DecodeOptions(strategy=strategy, beam_size=3, n_best=2, max_length=8, no_repeat_ngram_size=2)
    step = bigram_step(table)
    search = make_search(["a", "b", "c"], opts, generator=torch.Generator().manual_seed(0))
    K = search.K
    state = torch.zeros(search.num_rows, 1)
    results: dict = {}
    for _ in range(3):
        logp, state = step(search.last_tokens(), state)
        res = search.advance(logp)
        if res.reorder is not None:
            state = state.index_select(0, res.reorder)
    seqs_before, last_before = search.seqs.clone(), search.last_tokens().clone()

    index = search.drop({"b", "not-there"})

    assert search.ids == ["a", "c"] and len(search) == 2 and search.num_rows == 2 * K
    assert index.tolist() == [*range(K), *range(2 * K, 3 * K)]  # the rows of a and c, in order
    assert torch.equal(search.seqs, seqs_before[index])
    assert torch.equal(search.last_tokens(), last_before[index])
    if isinstance(search, BeamSearch):
        assert set(search.results) == {"a", "c"}
    _drive(search, step, state.index_select(0, index), results)
    assert set(results) == {"a", "c"}
    if strategy != "sample":  # deterministic: the kept items decode as if "b" had never been there
        alone = run(table, 1, opts)[0]
        for key in ("a", "c"):
            assert [h.tokens for h in results[key]] == [h.tokens for h in alone]


def test_filter_of_every_item_empties_the_search() -> None:
    search = make_search([1, 2], DecodeOptions(strategy="beam", beam_size=2, max_length=4))
    assert search.drop([1, 2]).numel() == 0
    assert len(search) == 0 and search.num_rows == 0 and search.seqs.shape[0] == 0


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
@pytest.mark.parametrize("no_repeat,min_length", [(0, 1), (2, 3)])
def test_inplace_advance_gives_the_same_steps_as_the_copying_one(strategy: str, no_repeat: int,
                                                               min_length: int) -> None:
    table = _table(12)
    opts = DecodeOptions(strategy=strategy, beam_size=3, n_best=2, max_length=9, min_length=min_length,
                         no_repeat_ngram_size=no_repeat, top_p=0.9)
    copying = make_search(list(range(4)), opts, generator=torch.Generator().manual_seed(7))
    inplace = make_search(list(range(4)), opts, generator=torch.Generator().manual_seed(7))
    state = torch.zeros(copying.num_rows, 1)
    step = bigram_step(table)
    steps = 0
    while len(copying):
        assert torch.equal(copying.last_tokens(), inplace.last_tokens())
        logp, state = step(copying.last_tokens(), state)
        given = logp.clone()
        a = copying.advance(logp)
        assert torch.equal(logp, given)  # the default leaves the caller's tensor alone
        b = inplace.advance(given, inplace=True)
        assert [(i, [vars(h) for h in hs]) for i, hs in a.finished] == \
            [(i, [vars(h) for h in hs]) for i, hs in b.finished]
        assert torch.equal(a.tokens, b.tokens)
        assert (a.reorder is None) == (b.reorder is None)
        if a.reorder is not None:
            assert torch.equal(a.reorder, b.reorder)
            state = state.index_select(0, a.reorder)
        steps += 1
    assert len(inplace) == 0 and steps > 1


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
@pytest.mark.parametrize("min_length", [0, 3])
def test_end_of_sequence_is_the_last_resort_when_every_token_is_banned(strategy: str,
                                                                      min_length: int) -> None:
    """Vocabulary: the special tokens, EOS and one word (5). The model never wants EOS and
    no_repeat_ngram_size=1 bans the word once said: at step 2 nothing is left, and the search
    must end with EOS at log-prob 0 (even before min_length), not emit a banned token."""
    table = torch.zeros(6, 6)
    table[:, EOS_ID] = float("-inf")
    word_logp = torch.log_softmax(table[BOS_ID], -1)[5].item()
    opts = DecodeOptions(strategy=strategy, beam_size=2, n_best=1, max_length=6, min_length=min_length,
                         no_repeat_ngram_size=1)
    for hyps in run(table, 2, opts, generator=torch.Generator().manual_seed(0)):
        best = hyps[0]
        assert best.tokens == [5] and best.finished
        assert best.logprob == pytest.approx(word_logp)  # the last-resort EOS adds log-prob 0


def test_min_length_holds_while_other_tokens_remain() -> None:
    """EOS is by far the likeliest, two words exist and each may be said once: EOS comes at
    exactly min_length, after both words, for every strategy."""
    table = torch.full((7, 7), -5.0)
    table[:, EOS_ID] = 10.0
    for strategy in ("greedy", "beam", "sample"):
        opts = DecodeOptions(strategy=strategy, beam_size=2, n_best=2 if strategy != "greedy" else 1,
                             max_length=6, min_length=3, no_repeat_ngram_size=1)
        for hyps in run(table, 2, opts, generator=torch.Generator().manual_seed(1)):
            for h in hyps:
                assert h.finished and sorted(h.tokens) == [5, 6]


def _brute_force_bans(seqs: torch.Tensor, lengths: torch.Tensor, n: int) -> set[tuple[int, int]]:
    banned = set()
    for r, (row, length) in enumerate(zip(seqs.tolist(), lengths.tolist(), strict=True)):
        toks = row[:length]
        if n < 1 or length < n - 1:
            continue
        last = toks[len(toks) - (n - 1):] if n > 1 else []
        for s in range(length - n + 1):
            if toks[s:s + n - 1] == last:
                banned.add((r, toks[s + n - 1]))
    return banned


@pytest.mark.parametrize("seed", range(6))
def test_ban_repeated_ngrams_matches_a_brute_force_count(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    R, M, vocab = 5, 12, 9
    seqs = torch.randint(5, vocab, (R, M), generator=g)  # few symbols: many repeats
    lengths = torch.randint(0, M + 1, (R,), generator=g)
    for n in range(0, 5):
        logp = torch.log_softmax(torch.randn(R, vocab, generator=g), -1)
        banned = logp.clone()
        ban_repeated_ngrams(banned, seqs, lengths, n)
        want = _brute_force_bans(seqs, lengths, n)
        got = {(r, v) for r, v in (banned == float("-inf")).nonzero().tolist()}
        assert got == want
        assert torch.equal(banned[banned > float("-inf")], logp[banned > float("-inf")])  # the rest untouched
        # rows of one common length take the slicing shortcut, with the same bans
        L = int(lengths[0])
        same = torch.full((R,), L)
        found = decoding._ngram_repeats(seqs[:, :L], same, n, L)
        pairs = set() if found is None else {
            (r, int(found[1][r, s])) for r, s in found[0].nonzero().tolist()}
        assert pairs == _brute_force_bans(seqs, same, n)


@pytest.mark.parametrize("kind", ["random", "ties", "mostly -inf", "nan", "tied top"])
def test_fast_topk_equals_torch_topk(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    for B, n, k in [(1, 40000, 10), (3, 24000, 8), (8, 4000, 2), (2, 2047, 4), (2, 4001, 6)]:
        x = torch.randn(B, n, generator=g)
        if kind == "ties":
            x = (x * 2).round()
        elif kind == "mostly -inf":
            x[torch.rand(B, n, generator=g) < 0.9995] = float("-inf")
        elif kind == "nan":
            x[0, n // 3] = float("nan")
        elif kind == "tied top":
            x[:, [5, n - 5]] = 50.0
        want = x.topk(k, dim=1)
        values, indices = decoding._topk(x, k)
        assert torch.equal(values.nan_to_num(), want.values.nan_to_num())
        assert torch.equal(indices, want.indices)


def test_fast_argmax_equals_torch_argmax_on_ties_infinities_and_nan() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-2, 2, (50, 300), generator=g).float()
    x[x == -2] = float("-inf")
    x[:5] = float("-inf")  # whole rows
    x[7, [3, 9]] = float("nan")
    for t in (x, x.double(), x[:, ::3], x.to(torch.bfloat16)):
        assert torch.equal(decoding._argmax(t), t.argmax(-1))


def test_beam_search_with_a_wide_vocabulary_equals_beam_search_with_plain_topk(monkeypatch) -> None:
    """Wide rows (K*V >= 2048) take the blocked topk: the search must not change."""
    table = torch.randn(600, 600, generator=torch.Generator().manual_seed(5)) * 4
    table[::2, 9] = table[::2, 10] = 12.0  # a tie at the top of half the rows: the plain path's steps
    opts = DecodeOptions(strategy="beam", beam_size=5, n_best=5, max_length=7, no_repeat_ngram_size=2)
    fast = run(table, 3, opts)
    monkeypatch.setattr(decoding, "_topk", lambda x, k: x.topk(k, dim=1))
    plain = run(table, 3, opts)
    assert [[vars(h) for h in hs] for hs in fast] == [[vars(h) for h in hs] for hs in plain]
