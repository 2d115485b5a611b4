"""Choosing a reply among a search's candidates (n-best beams, or N samples).

- `none`: the search's own order (beam search: its GNMT-normalised score; samples: as drawn).
- `likelihood`: the GNMT length-normalised log p(reply | context), the search's own score.
- `mmi`: maximum mutual information, bidirectional form (Li et al. 2016, "A
  Diversity-Promoting Objective Function for Neural Conversation Models", MMI-bidi):

      score = log p(reply | context) / (|reply| + 1)
              + mmi_weight * log p(message | reply) / (|message| + 1)
              + length_bonus * |reply|

  where `message` is the context's last turn and p(message | reply) comes from a
  reverse model (trained by `chatbot train --reverse`: the source is a reply, the
  target the message it answered). Both log-probabilities are per-token means (the
  end-of-sequence token counted), so the weight means the same for short and long
  prompts. A generic reply ("i don't know") is likely after any message, so it
  predicts none of them well: the reverse term is what demotes it.

The reverse scores of every candidate of every request handed over together are one
teacher-forced pass of the reverse model over a single padded batch (`reverse_logprobs`),
so a step of the serving engine that finishes many requests scores them in one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .data import collate
from .decoding import RERANKS, DecodeOptions, Hypothesis
from .loss import row_logprob_sums
from .network import Seq2Seq
from .tokenizer import EOS_ID, SEP_ID

__all__ = ["RERANKS", "RerankItem", "last_turn", "mmi_score", "rerank", "reverse_logprobs"]



@dataclass(frozen=True)
class RerankItem:
    """One request's candidates and the source they answer."""

    source: list[int]  # the forward model's source: context turns joined by <sep>
    hypotheses: list[Hypothesis]
    opts: DecodeOptions


def last_turn(source: Sequence[int]) -> list[int]:
    """The message the reply answers: the source's tokens after its last <sep>."""
    source = list(source)
    cut = max((i for i, t in enumerate(source) if t == SEP_ID), default=-1)
    return source[cut + 1:]


@torch.inference_mode()
def reverse_logprobs(reverse: Seq2Seq, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                     ) -> list[tuple[float, int]]:
    """For each (reply, message) pair: the summed log p(message | reply) under the reverse
    model and the number of target tokens (end-of-sequence included), from one batched
    teacher-forced pass. Replies and messages are cut as the reverse model was trained."""
    cfg = reverse.cfg
    examples = [(list(reply)[-cfg.max_source_len:], [*list(message)[: cfg.max_target_len - 1], EOS_ID])
                for reply, message in pairs]
    if not examples:
        return []
    device = next(reverse.parameters()).device
    batch = collate(examples).to(device)
    enc = reverse.encode(batch.src, batch.src_lens)
    keep = batch.tgt_out != 0
    logits = reverse.project(reverse.decode_features(batch.tgt_in, enc)[keep])  # real tokens only
    sums = row_logprob_sums(logits, batch.tgt_out, keep).tolist()
    return list(zip(sums, keep.sum(1).tolist(), strict=True))


def mmi_score(hyp: Hypothesis, reverse_sum: float, reverse_tokens: int, opts: DecodeOptions) -> float:
    if not hyp.tokens:
        return -math.inf  # nothing to say is never the best reply
    forward = hyp.logprob / (len(hyp.tokens) + (1 if hyp.finished else 0))
    return (forward + opts.mmi_weight * reverse_sum / max(reverse_tokens, 1)
            + opts.length_bonus * len(hyp.tokens))


def rerank(items: Sequence[RerankItem], reverse: Seq2Seq | None) -> list[list[Hypothesis]]:
    """Each item's hypotheses, reordered (best first) by its `opts.rerank`; their `score` is
    the score they were ranked by. All the `mmi` items' candidates share one reverse pass."""
    out: list[list[Hypothesis]] = []
    mmi_pairs: list[tuple[list[int], list[int]]] = []
    for item in items:
        if item.opts.rerank == "mmi":
            if reverse is None:
                raise ValueError("rerank 'mmi' needs a reverse model, and this checkpoint has none")
            message = last_turn(item.source)
            mmi_pairs += [(h.tokens, message) for h in item.hypotheses]
    scores = iter(reverse_logprobs(reverse, mmi_pairs) if mmi_pairs and reverse is not None else [])
    for item in items:
        hyps = list(item.hypotheses)
        if item.opts.rerank == "mmi":
            hyps = [replace(h, score=mmi_score(h, *next(scores), item.opts)) for h in hyps]
        if item.opts.rerank != "none":
            hyps.sort(key=lambda h: h.score, reverse=True)
        out.append(hyps)
    return out


def rerank_batch(sources: Sequence[Sequence[int]], found: Sequence[list[Hypothesis]], opts: DecodeOptions,
                 reverse: Seq2Seq | None = None) -> list[list[Hypothesis]]:
    """`rerank` for a batch decoded with one set of options (model.inference.decode_sources
    and FastDecoder.decode_sources)."""
    return rerank([RerankItem(list(s), hyps, opts) for s, hyps in zip(sources, found, strict=True)], reverse)
