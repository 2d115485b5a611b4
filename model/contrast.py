"""The contrastive term of a fine-tuning run (`[train] contrast_weight`, `contrast_margin`).

A persona's questions map onto a handful of facts. Trained on the references alone, a question
worded unlike every training line often gets another fact's reply, the one most likely after
anything ("what's been playing in your headphones lately?" -> "It's called Juniper."), while
the right one is the second or third beam (docs/FINETUNE.md). This term asks for the difference
directly: each of the batch's own pairs is paired with the reply of another own pair (its
negative), and its own reply must be the more likely one after its question, by a margin:

    contrast_weight * mean over pairs of max(0, margin - (log p(reply | question)
                                                         - log p(negative | question)))

where log p is the mean over the reply's tokens (its end included), in nats, so the margin
means the same for short and long replies; a ranking hinge over whole sequences, like the
margin losses of sequence-level training (Edunov et al. 2018, "Classical Structured Prediction
Losses for Sequence to Sequence Learning"). Once a pair is apart by the margin it adds nothing.

A negative never shares one of the corpus's own words (model/blend.py `own_words`: its names and
topics) with the reply, so that two wordings of one fact ("Pickle, my grey cat." and "My cat's
called Pickle.") are not pushed apart, and is never the same reply (a run without a replay corpus,
or with `embedding_own_words = 0`, has no own words: any other reply may be a negative). Negatives
are drawn from the run's seed and step alone, so a resumed run draws the same ones.

Off by default: on the persona it stated more facts on the dev questions but not on fresh ones,
and more of its replies came out garbled (docs/FINETUNE.md, "Contrasting the facts' replies").
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from .data import Example
from .loss import row_logprob_sums

ReplyKey = tuple[tuple[int, ...], frozenset[int]]  # a reply's tokens, and its own words among them


def reply_keys(examples: Sequence[Example], own: Tensor | None) -> list[ReplyKey]:
    """For each example, what decides which replies may be its negatives: the reply's tokens and
    the corpus's own words among them (`own`, (V,) bool; None: no word is the corpus's own)."""
    mine = set() if own is None else set(torch.nonzero(own).flatten().tolist())
    return [(tuple(tgt), frozenset(mine.intersection(tgt))) for _, tgt in examples]


def pick_negatives(keys: Sequence[ReplyKey], rng: random.Random) -> list[tuple[int, int]]:
    """(i, j) pairs of positions in `keys`: j's reply is i's negative, drawn uniformly among the
    replies that differ from i's and share none of its own words; rows with none are left out."""
    pairs = []
    for i, (reply, words) in enumerate(keys):
        allowed = [j for j, (other, theirs) in enumerate(keys)
                   if j != i and other != reply and not (words & theirs)]
        if allowed:
            pairs.append((i, rng.choice(allowed)))
    return pairs


def mean_logprobs(logits: Tensor, target: Tensor, keep: Tensor) -> Tensor:
    """(B,) float32: each row's mean log-probability of its target tokens, from `logits` (N, V)
    at the positions where `keep` (B, T) is True (in row order) and `target` (B, T)."""
    return row_logprob_sums(logits, target, keep) / keep.sum(dim=1).clamp(min=1)


def hinge(own: Tensor, negative: Tensor, margin: float) -> Tensor:
    """Summed max(0, margin - (own - negative)) over the pairs, float32."""
    return torch.relu(margin - (own - negative)).sum()
