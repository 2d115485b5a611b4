"""Turning pairs into token ids and length-bucketed batches.

Batches group pairs of similar target (then source) length, so little compute is
spent on padding; their order is reshuffled every epoch from (seed, epoch) alone,
which is what makes the data order resumable.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ModelConfig
from .corpus import Pair
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

Example = tuple[list[int], list[int]]  # (source ids, target ids ending in EOS)


@dataclass
class Batch:
    src: Tensor  # (B, S)
    src_lens: Tensor  # (B,)
    tgt_in: Tensor  # (B, T) BOS + target
    tgt_out: Tensor  # (B, T) target + EOS, PAD where there is none
    num_tokens: int  # target tokens (EOS included)
    replay_from: int | None = None  # rows from here on are replayed pairs (fine-tuning)
    # (K, 2) rows (i, j), i increasing: row j's reply is row i's negative (model/contrast.py)
    negatives: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.src.to(device), self.src_lens, self.tgt_in.to(device),
                     self.tgt_out.to(device), self.num_tokens, self.replay_from,
                     None if self.negatives is None else self.negatives.to(device))

    def pad_rows(self, multiple: int) -> Batch:
        """The batch with empty rows added up to a multiple of `multiple` rows: a source of one
        PAD token, a target of PADs only, so the loss (real target tokens only) and every real
        row's gradient are unchanged. Some kernels are much faster on aligned row counts."""
        extra = -self.src.shape[0] % multiple
        if not extra:
            return self

        def grow(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_full((extra, *t.shape[1:]), PAD_ID)])

        return Batch(grow(self.src), torch.cat([self.src_lens, self.src_lens.new_ones(extra)]),
                     grow(self.tgt_in), grow(self.tgt_out), self.num_tokens, self.replay_from,
                     self.negatives)


def encode_pairs(pairs: Sequence[Pair], tokenizer: Tokenizer, cfg: ModelConfig) -> list[Example]:
    """Contexts truncated from the left, responses capped: nothing is dropped but the
    pairs whose response normalises to nothing."""
    examples = []
    for pair in pairs:
        tgt = tokenizer.encode(pair.response)[: cfg.max_target_len - 1]
        if not tgt:
            continue
        src = tokenizer.encode_context(pair.context, cfg.max_source_len)
        examples.append((src, [*tgt, EOS_ID]))
    return examples


def collate_sources(sources: Sequence[Sequence[int]], device: torch.device | str = "cpu"
                    ) -> tuple[Tensor, Tensor]:
    """Right-padded (B, S) ids and (B,) lengths; an empty source becomes one PAD token of
    length 1, as the encoder needs a last real position per row (its summary reads it) and
    attention one unmasked position."""
    lens = [max(len(s), 1) for s in sources]
    src = torch.full((len(sources), max(lens)), PAD_ID, dtype=torch.long)
    for i, s in enumerate(sources):
        if s:
            src[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return src.to(device), torch.tensor(lens, dtype=torch.long)


def collate(examples: Sequence[Example], replay_from: int | None = None,
            negatives: Sequence[tuple[int, int]] = ()) -> Batch:
    src, src_lens = collate_sources([e[0] for e in examples])
    T = max(len(e[1]) for e in examples)
    tgt_in = torch.full((len(examples), T), PAD_ID, dtype=torch.long)
    tgt_out = torch.full((len(examples), T), PAD_ID, dtype=torch.long)
    for i, (_, tgt) in enumerate(examples):
        tgt_out[i, : len(tgt)] = torch.tensor(tgt)
        tgt_in[i, 0] = BOS_ID
        tgt_in[i, 1: len(tgt)] = torch.tensor(tgt[:-1])
    pairs = torch.tensor(list(negatives), dtype=torch.long).view(-1, 2) if negatives else None
    return Batch(src, src_lens, tgt_in, tgt_out, sum(len(e[1]) for e in examples), replay_from, pairs)


def make_batches(examples: Sequence[Example], *, batch_size: int, max_tokens: int,
                 seed: int, shuffle: bool = True) -> list[list[int]]:
    """Index lists of length-bucketed batches; a batch holds at most `batch_size` pairs
    and about `max_tokens` padded target-plus-source tokens."""
    rng = random.Random(seed)
    jitter = [rng.random() for _ in examples] if shuffle else [0.0] * len(examples)
    order = sorted(range(len(examples)),
                   key=lambda i: (len(examples[i][1]), len(examples[i][0]) // 4, jitter[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = len(examples[i][1]) + len(examples[i][0])
        if current and (len(current) >= batch_size or max(longest, size) * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches
