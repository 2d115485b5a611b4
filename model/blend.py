"""What a fine-tuning run's checkpoints keep of the embedding's change from the init.

`[train] embedding_blend` b < 1: a saved checkpoint's embedding row is `init + b * (trained -
init)`, the rest of the model as trained. The embedding is tied to the output layer, and most of
its change is drift that costs the init's chat, spread over every row (Adam moves rows whose
gradients are tiny as far as the others). `[train] embedding_own_words` r > 0 spares the rows that
carry what the run came to learn: the tokens the run's own corpus uses more than r times as often
(per token of each corpus) as the replay corpus does, its names and topics, keep all of their
change (docs/FINETUNE.md, "The corpus's own words keep their change, and the replay is distilled").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .data import Example


def token_counts(examples: Sequence[Example], vocab_size: int) -> Tensor:
    """How often each token occurs in the sources and targets of `examples`, (V,) float64."""
    ids = torch.tensor([t for src, tgt in examples for t in (*src, *tgt)], dtype=torch.long)
    return torch.bincount(ids, minlength=vocab_size).double()


def own_words(own: Sequence[Example], replay: Sequence[Example], vocab_size: int,
              ratio: float) -> Tensor:
    """(V,) bool: the tokens of `own` whose share of its tokens is more than `ratio` times their
    share of `replay`'s (each counted once more than it occurs there, so that a token `replay`
    never uses has a share)."""
    mine, theirs = token_counts(own, vocab_size), token_counts(replay, vocab_size)
    share = mine / max(float(mine.sum()), 1.0)
    return (mine > 0) & (share > ratio * (theirs + 1) / float(theirs.sum() + 1))


def row_blend(blend: float, spared: Tensor | None, vocab_size: int) -> Tensor:
    """(V,) float32: the share of each embedding row's change a saved checkpoint keeps."""
    keep = torch.full((vocab_size,), float(blend))
    if spared is not None:
        keep[spared] = 1.0
    return keep
