"""Property-based tests (hypothesis): the tokenizer on arbitrary Unicode, decoding on random
models and inputs. Deadlines are off (the machine is shared); example counts are small."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.checkpoint import Checkpoint
from model.config import ModelConfig
from model.decoding import DecodeOptions
from model.inference import decode_sources
from model.network import Seq2Seq
from model.tokenizer import SPECIAL_TOKENS, UNK_ID, Tokenizer, normalize

FIRST_PLAIN_ID = len(SPECIAL_TOKENS)  # ids below are <pad> <s> </s> <unk> <sep>
PROPS = settings(deadline=None, max_examples=150, suppress_health_check=list(HealthCheck))

# Every code point: control characters, lone surrogates, private use, unassigned.
ANY_CHAR = st.characters(codec=None, exclude_categories=())
RTL = st.sampled_from(["\u05d0", "\u05e9", "\u0627", "\u0644", "\u0645", "\u06cc", "\u200f", "\u202b",
                       "\u202e", "\u2067", "\u200e", "\u202c", " ", "1", "?"])
CONTROL = st.characters(min_codepoint=0, max_codepoint=0x9f) | st.sampled_from(
    ["\u2028", "\u2029", "\ufeff", "\u200b", "\u00ad", "\ufffd", "\U000e0001", "\udc80", "\ud83d"])
TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=60),
    st.text(RTL, max_size=60),
    st.text(ANY_CHAR | CONTROL | RTL, max_size=60),
    st.text(CONTROL | st.sampled_from(["a", " ", "\u0301", "\u3000", "\u00a0"]), max_size=30),
    st.lists(st.sampled_from(["<unk>", "<sep>", "</s>", "<s>", "<pad>", "a", " ", "\x00"]), max_size=20)
    .map("".join),
)
# Very long strings: a short random piece repeated thousands of times.
LONG_TEXT = st.builds(lambda piece, n: piece * n, st.text(ANY_CHAR | RTL, min_size=1, max_size=12),
                      st.integers(500, 3000))


def check_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert UNK_ID not in ids
    assert all(FIRST_PLAIN_ID <= i < tok.vocab_size for i in ids), "a typed special token became special"
    assert tok.decode(ids) == normalize(text)


@PROPS
@given(TEXT)
def test_any_unicode_encodes_without_unknowns_and_round_trips(tiny_tokenizer: Tokenizer, text: str) -> None:
    check_round_trip(tiny_tokenizer, text)


@settings(PROPS, max_examples=15)
@given(LONG_TEXT)
def test_very_long_strings_round_trip(tiny_tokenizer: Tokenizer, text: str) -> None:
    check_round_trip(tiny_tokenizer, text)


@PROPS
@given(st.lists(TEXT, min_size=1, max_size=5), st.integers(1, 64))
def test_context_never_exceeds_its_budget_and_has_no_unknowns(tiny_tokenizer: Tokenizer, turns: list[str],
                                                              max_len: int) -> None:
    ids = tiny_tokenizer.encode_context(turns, max_len)
    assert len(ids) <= max_len and UNK_ID not in ids


# -- decoding --------------------------------------------------------------------------------------
VOCAB = 37
OPTIONS = st.builds(
    lambda strategy, width, n_best, max_length, min_frac, ngram, temperature, top_p, alpha: DecodeOptions(
        strategy=strategy, beam_size=width, n_best=min(n_best, width) if strategy == "beam" else n_best,
        max_length=max_length, min_length=int(min_frac * max_length), no_repeat_ngram_size=ngram,
        temperature=temperature, top_p=top_p, length_penalty=alpha),
    st.sampled_from(["greedy", "beam", "sample"]), st.integers(1, 5), st.integers(1, 4), st.integers(1, 12),
    st.floats(0, 1), st.integers(0, 3), st.floats(0.05, 3.0), st.floats(1e-6, 1.0), st.floats(0, 2),
)
SOURCES = st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=10), min_size=1, max_size=4)


def random_model(seed: int, layers: int) -> Seq2Seq:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, embedding_dim=8, hidden_size=12, num_layers=layers, dropout=0.0,
                      context_turns=2, max_source_len=16, max_target_len=12)
    return Seq2Seq(cfg).eval()


@settings(PROPS, max_examples=60)
@given(st.integers(0, 2**31 - 1), st.integers(1, 2), SOURCES, OPTIONS)
def test_decoding_a_random_model_stays_in_bounds(seed: int, layers: int, sources: list[list[int]],
                                                 opts: DecodeOptions) -> None:
    model = random_model(seed, layers)
    results = decode_sources(model, sources, opts, generator=torch.Generator().manual_seed(seed))
    assert len(results) == len(sources)
    for hyps in results:
        # beam search returns every beam finished when it stopped (at least the n_best it settled,
        # unless bans left fewer live candidates), sampling its n_best samples
        expected = {"greedy": 1, "beam": opts.beam_size, "sample": opts.n_best}[opts.strategy]
        assert 1 <= len(hyps) <= expected
        for h in hyps:
            assert len(h.tokens) <= opts.max_length
            assert all(FIRST_PLAIN_ID <= t < VOCAB for t in h.tokens), h.tokens  # no special tokens
            if h.finished:  # ended by </s>, which counts towards min_length
                assert len(h.tokens) + 1 >= opts.min_length
            else:
                assert len(h.tokens) == opts.max_length
            n = opts.no_repeat_ngram_size
            if n:
                grams = [tuple(h.tokens[i:i + n]) for i in range(len(h.tokens) - n + 1)]
                assert len(grams) == len(set(grams)), h.tokens


@settings(PROPS, max_examples=40)
@given(st.lists(TEXT, min_size=1, max_size=3), st.integers(1, 24),
       st.sampled_from(["greedy", "beam", "sample"]))
def test_the_trained_model_answers_any_text_within_bounds(ckpt: Checkpoint, turns: list[str],
                                                          max_length: int, strategy: str) -> None:
    cfg, tok = ckpt.model.cfg, ckpt.tokenizer
    source = tok.encode_context(turns[-cfg.context_turns:], cfg.max_source_len)
    opts = DecodeOptions(strategy=strategy, beam_size=3, n_best=2, max_length=max_length)
    [hyps] = decode_sources(ckpt.model, [source], opts, generator=torch.Generator().manual_seed(0))
    for h in hyps:
        assert len(h.tokens) <= max_length
        assert all(FIRST_PLAIN_ID <= t < tok.vocab_size for t in h.tokens)
        text = tok.decode(h.tokens)
        assert "\ufffd" not in text and text == text.strip()
