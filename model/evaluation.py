"""Scoring a model: per-token and per-word perplexity, BLEU, distinct-n, sample replies."""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .contrast import hinge, mean_logprobs
from .data import Batch, Example, collate, make_batches
from .decoding import DEFAULT_NO_REPEAT_NGRAM_SIZE, DecodeOptions
from .inference import decode_sources
from .loss import cross_entropy_sum
from .network import EncoderOutput, Seq2Seq
from .tokenizer import Tokenizer

SAMPLE_PROMPTS = (
    "hi, how are you?",
    "what do you do for a living?",
    "do you have any pets?",
    "what is your favorite food?",
    "where are you from?",
    "what did you do this weekend?",
    "i love watching movies",
    "do you like sports?",
    "what music do you listen to?",
    "i am so tired today",
)


@dataclass
class LossStats:
    nll: float  # summed over target tokens
    tokens: int
    words: int  # whitespace words of the references, plus one end-of-reply per pair
    pairs: int

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def word_perplexity(self) -> float:
        return math.exp(min(self.nll / max(self.words, 1), 50.0))


def batch_loss(model: Seq2Seq, batch: Batch, label_smoothing: float = 0.0, *,
               teacher_forcing_ratio: float = 1.0, rng: random.Random | None = None,
               teacher: Seq2Seq | None = None, distill: float = 0.0,
               contrast_weight: float = 0.0, contrast_margin: float = 1.0,
               ) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the real target tokens, and their count; the output layer only
    sees those. The trainer's loss and the evaluation's, in the caller's precision (autocast).

    `teacher_forcing_ratio` < 1 (a training option): at each step, with probability 1 - ratio
    (one draw from `rng` for the whole batch), the decoder reads its own prediction instead of
    the reference token.

    `teacher` and `distill` > 0 (fine-tuning's `replay_distill`): on the batch's replayed rows
    (from `batch.replay_from`) the target is `distill` times the teacher's distribution (the
    init model, reading the same reference) and `1 - distill` times the reference.

    `contrast_weight` > 0 (fine-tuning's contrastive term, model/contrast.py): the batch's
    `negatives` pairs add `contrast_weight` times their mean hinge, scaled by the token count so
    that the caller's per-token mean carries it at that weight.
    """
    enc = model.encode(batch.src, batch.src_lens)
    if teacher_forcing_ratio < 1.0:
        if rng is None:
            raise ValueError("teacher_forcing_ratio < 1 needs an rng")
        feats = model.decode_features_sampled(batch.tgt_in, enc, teacher_forcing_ratio, rng)
    else:
        feats = model.decode_features(batch.tgt_in, enc)  # (B, T, H)
    keep = batch.tgt_out != 0
    logits = model.project(feats[keep])  # (N, V)
    soft = None
    if teacher is not None and distill > 0 and batch.replay_from is not None:
        soft = _teacher_logits(teacher, batch, keep[batch.replay_from:])
    loss = cross_entropy_sum(logits, batch.tgt_out[keep], label_smoothing, teacher=soft, distill=distill)
    n = int(keep.sum())
    if contrast_weight > 0 and batch.negatives is not None and len(batch.negatives):
        pairs = batch.negatives
        loss = loss + contrast_weight * n / len(pairs) * _contrast_sum(model, batch, enc, feats, logits, keep,
                                                                       contrast_margin)
    return loss, n


def _contrast_sum(model: Seq2Seq, batch: Batch, enc: EncoderOutput, feats: torch.Tensor,
                  logits: torch.Tensor, keep: torch.Tensor, margin: float) -> torch.Tensor:
    """The summed hinge of the batch's (row, negative) pairs: the rows' own replies read from the
    loss's logits (`pick_negatives` lists rows in order, each once), the negatives' decoded from the
    rows' own encodings."""
    rows, negs = batch.negatives[:, 0], batch.negatives[:, 1]
    own_keep = keep.index_select(0, rows)
    own = mean_logprobs(logits[torch.isin(torch.nonzero(keep)[:, 0], rows)],
                        batch.tgt_out.index_select(0, rows), own_keep)
    neg_out = batch.tgt_out.index_select(0, negs)
    neg_keep = neg_out != 0
    neg_feats = model.decode_features(batch.tgt_in.index_select(0, negs), enc.index_select(rows))
    negative = mean_logprobs(model.project(neg_feats[neg_keep]), neg_out, neg_keep)
    return hinge(own, negative, margin)


@torch.no_grad()
def _teacher_logits(teacher: Seq2Seq, batch: Batch, keep: torch.Tensor) -> torch.Tensor:
    """The teacher's logits at the real target tokens of the rows from `batch.replay_from` on:
    the last rows of the student's (N, V), as the mask keeps tokens in row order."""
    r = batch.replay_from
    enc = teacher.encode(batch.src[r:], batch.src_lens[r:])
    return teacher.project(teacher.decode_features(batch.tgt_in[r:], enc)[keep])


# Han characters (CJK ideographs and their extensions), kana and Hangul: one "word" each, as
# whitespace means nothing in Chinese or Japanese (and Korean spacing is loose).
_CJK = re.compile("[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
                  "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]")


def word_count(text: str) -> int:
    """Whitespace-separated words, with every Han, kana or Hangul character a word of its own."""
    return len(_CJK.findall(text)) + len(_CJK.sub(" ", text).split())


def count_words(tokenizer: Tokenizer, examples: Sequence[Example]) -> int:
    """The words of the references (word_count), plus one end-of-reply per pair."""
    return sum(word_count(tokenizer.decode(tgt)) + 1 for _, tgt in examples)


@torch.inference_mode()
def evaluate_loss(model: Seq2Seq, tokenizer: Tokenizer, examples: Sequence[Example],
                  batch_size: int = 128, max_tokens: int = 8192) -> LossStats:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for idx in make_batches(examples, batch_size=batch_size, max_tokens=max_tokens, seed=0,
                            shuffle=False):
        loss, n = batch_loss(model, collate([examples[i] for i in idx]).to(device))
        nll += float(loss)
        tokens += n
    model.train(was_training)
    return LossStats(nll=nll, tokens=tokens, words=count_words(tokenizer, examples),
                     pairs=len(examples))


def distinct_n(texts: Sequence[str], n: int) -> float:
    grams = [tuple(w[i:i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def reply(model: Seq2Seq, tokenizer: Tokenizer, turns: Sequence[str], opts: DecodeOptions) -> str:
    src = tokenizer.encode_context(turns, model.cfg.max_source_len)
    hyps = decode_sources(model, [src], opts)[0]
    return tokenizer.decode(hyps[0].tokens) if hyps else ""


def generation_metrics(model: Seq2Seq, tokenizer: Tokenizer, examples: Sequence[Example],
                       opts: DecodeOptions, batch_size: int = 64) -> dict[str, float]:
    import sacrebleu

    hyps, refs = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        out = decode_sources(model, [src for src, _ in chunk], opts)
        hyps += [tokenizer.decode(h[0].tokens) if h else "" for h in out]
        refs += [tokenizer.decode(tgt) for _, tgt in chunk]
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score if hyps else 0.0
    return {"bleu": round(bleu, 3), "distinct_1": round(distinct_n(hyps, 1), 4),
            "distinct_2": round(distinct_n(hyps, 2), 4), "generated_pairs": len(hyps)}


def named_settings(has_reverse: bool, max_length: int = 40) -> dict[str, DecodeOptions]:
    """The decoding settings `chatbot eval` compares: the server's default first (beam 5 ranked by
    likelihood, what /api/chat does with only a message; docs/QUALITY.md), then sampling and beam
    search reranked (by MMI when a reverse model is there), greedy and one sample. All ban
    repeated n-grams as the server does (DEFAULT_NO_REPEAT_NGRAM_SIZE)."""
    common = {"max_length": max_length, "min_length": 2, "no_repeat_ngram_size": DEFAULT_NO_REPEAT_NGRAM_SIZE}
    rerank = "mmi" if has_reverse else "likelihood"
    return {
        "beam5": DecodeOptions(strategy="beam", beam_size=5, n_best=1, **common),
        f"sample16_{rerank}": DecodeOptions(strategy="sample", n_best=16, temperature=0.7, top_p=0.9,
                                            rerank=rerank, mmi_weight=1.0, **common),
        f"beam10_{rerank}": DecodeOptions(strategy="beam", beam_size=10, n_best=10, rerank=rerank,
                                          mmi_weight=1.0, **common),
        "greedy": DecodeOptions(strategy="greedy", **common),
        "sample1": DecodeOptions(strategy="sample", temperature=0.7, top_p=0.9, **common),
    }


def has_loop(text: str) -> bool:
    """A word said twice in a row, or a two-word phrase said twice ("play play", "go to the
    program and go to the program")."""
    words = [w.strip(".,!?;:'\"").lower() for w in text.split()]
    words = [w for w in words if w]
    if any(a == b for a, b in itertools.pairwise(words)):
        return True
    bigrams = list(itertools.pairwise(words))
    return len(set(bigrams)) < len(bigrams)


def reply_stats(replies: Sequence[str]) -> dict[str, float]:
    """Proxies of what a reader sees: the share of distinct replies, of replies of three words
    or fewer, of replies with a repeated word or loop, and the mean length in words."""
    n = max(len(replies), 1)
    lengths = [len(r.split()) for r in replies]
    return {"distinct_replies": round(len(set(replies)) / n, 4),
            "short_3_words": round(sum(x <= 3 for x in lengths) / n, 4),
            "repetition": round(sum(has_loop(r) for r in replies) / n, 4),
            "mean_words": round(sum(lengths) / n, 2), "replies": len(replies)}


def setting_metrics(model: Seq2Seq, tokenizer: Tokenizer, sources: Sequence[Sequence[int]],
                    settings: dict[str, DecodeOptions], reverse: Seq2Seq | None = None,
                    batch_size: int = 32, seed: int = 0) -> dict[str, dict[str, float]]:
    """reply_stats of each setting's replies to the same sources."""
    out = {}
    for name, opts in settings.items():
        generator = torch.Generator().manual_seed(seed)
        texts = []
        for start in range(0, len(sources), batch_size):
            found = decode_sources(model, sources[start:start + batch_size], opts, generator=generator,
                                   reverse=reverse)
            texts += [tokenizer.decode(h[0].tokens) if h else "" for h in found]
        out[name] = reply_stats(texts)
    return out


def sample_replies(model: Seq2Seq, tokenizer: Tokenizer, prompts: Sequence[str] = SAMPLE_PROMPTS,
                   ) -> list[dict[str, str]]:
    # the server's n-gram ban
    ban = DEFAULT_NO_REPEAT_NGRAM_SIZE
    greedy = DecodeOptions(strategy="greedy", max_length=30, no_repeat_ngram_size=ban)
    beam = DecodeOptions(strategy="beam", beam_size=5, max_length=30, no_repeat_ngram_size=ban)
    return [{"prompt": p, "greedy": reply(model, tokenizer, [p], greedy),
             "beam": reply(model, tokenizer, [p], beam)} for p in prompts]
