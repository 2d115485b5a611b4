"""A tiny model learns to reverse a sequence: forward, loss, optimiser step and decoding together."""

from __future__ import annotations

import math
import random

import torch

from model.config import ModelConfig
from model.data import collate
from model.decoding import DecodeOptions
from model.evaluation import batch_loss
from model.inference import decode_sources
from model.network import Seq2Seq
from model.tokenizer import EOS_ID

SYMBOLS = list(range(5, 15))  # ten token ids after the special tokens


def reverse_examples(n: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    out = []
    for _ in range(n):
        seq = [rng.choice(SYMBOLS) for _ in range(rng.randint(3, 7))]
        out.append((seq, [*reversed(seq), EOS_ID]))
    return out


def test_tiny_model_learns_to_reverse_sequences() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        _learn_to_reverse()
    finally:
        torch.set_num_threads(threads)


def _learn_to_reverse() -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = ModelConfig(vocab_size=15, embedding_dim=32, hidden_size=64, num_layers=1, dropout=0.0,
                      max_source_len=16, max_target_len=16)
    model = Seq2Seq(cfg)
    steps = 300
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        batch = collate(reverse_examples(64, rng))
        loss_sum, n = batch_loss(model, batch)
        opt.zero_grad()
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    test = reverse_examples(200, random.Random(99))
    hyps = decode_sources(model, [src for src, _ in test], DecodeOptions(strategy="greedy", max_length=12))
    exact = sum(h[0].tokens == tgt[:-1] for h, (_, tgt) in zip(hyps, test, strict=True)) / len(test)
    assert exact >= 0.95, f"exact match {exact:.2%}"
