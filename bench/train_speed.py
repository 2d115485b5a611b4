"""Training speed: this project's trainer against the tutorial's step-by-step loop, in one run.

    python bench/train_speed.py              # 3,000 chitchat pairs, one pass each
    python bench/train_speed.py --pairs 600  # a shorter run of the same model
    python bench/train_speed.py --quick      # a smoke test in seconds: 64 pairs, a tiny model

Both train the same model (E=256, H=512, 2 layers, output vocabulary 8,000, dropout
0.1, from the same initial weights) on the same pairs (the first conversations of
the chitchat corpus, shuffled with a fixed seed, context of 2 turns), with AdamW and
gradient clipping, forward + backward + update:

- project: `model.training.Trainer`'s own step (`batch_loss`: the whole shifted target
  in one fused LSTM call, the output layer only over real tokens) on length-bucketed
  batches (`make_batches`, 64 pairs or 4,096 tokens at most).
- tutorial: bench/tutorial.py's loop: one decoder call per time step, softmax and a
  masked NLL per step, batches of 64 drawn at random and padded to their longest pair,
  a packed bidirectional encoder.

Figures are target tokens per second (real tokens, end-of-reply included, padding not).
Each precision (`--precisions`, default fp32 then auto) runs both loops; `auto` says what
it chose and why (the trainer's timed check, model/precision.py); the tutorial loop runs
under the same autocast.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
import tutorial
from common import machine_line, table

from model.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from model.corpus import load_corpora, make_pairs
from model.data import collate, encode_pairs, make_batches
from model.device import available_cores
from model.evaluation import evaluate_loss
from model.network import Seq2Seq
from model.tokenizer import Tokenizer
from model.training import Corpus, Trainer


def load_slice(n_pairs: int, context_turns: int, vocab_size: int, seed: int,
               n_held_out: int = 0) -> tuple[Tokenizer, list, list]:
    """The first `n_pairs` pairs of the shuffled corpus, a tokenizer trained on their
    conversations, and `n_held_out` pairs of the conversations after them."""
    convs = load_corpora("chitchat")
    random.Random(seed).shuffle(convs)
    chosen, pairs = 0, []
    for conv in convs:
        chosen += 1
        pairs += make_pairs([conv], context_turns)
        if len(pairs) >= n_pairs:
            break
    pairs = pairs[:n_pairs]
    held_out: list = []
    for conv in convs[chosen:]:
        if len(held_out) >= n_held_out:
            break
        held_out += make_pairs([conv], context_turns)
    tokenizer = Tokenizer.train([t for c in convs[:chosen] for t in c], vocab_size=vocab_size,
                                min_frequency=2)
    return tokenizer, pairs, held_out[:n_held_out]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 64 pairs, E=32 H=64 V=500, batches of 16, 1 thread")
    p.add_argument("--pairs", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=4096, help="target tokens per batch at most")
    p.add_argument("--precisions", nargs="+", default=["fp32", "auto"], choices=("fp32", "bf16", "auto"),
                   help="trainer precisions, side by side in this run (the first is the baseline)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    p.add_argument("--passes", type=int, default=1, help="passes of the project's trainer over the pairs")
    p.add_argument("--held-out", type=int, default=500,
                   help="pairs of other conversations its loss is measured on after training")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores; --quick: 1)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    n_pairs = args.pairs
    mcfg = ModelConfig(vocab_size=8000, embedding_dim=256, hidden_size=512, num_layers=2, dropout=0.1)
    if args.quick:  # both loops and every precision still run, on sizes that take seconds
        n_pairs, args.batch_size, args.max_tokens = 64, 16, 1024
        mcfg = ModelConfig(vocab_size=500, embedding_dim=32, hidden_size=64, num_layers=2, dropout=0.1)
    args.threads = args.threads or (1 if args.quick else available_cores())
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    tokenizer, pairs, held_out = load_slice(n_pairs, mcfg.context_turns, mcfg.vocab_size, args.seed,
                                            n_held_out=32 if args.quick else args.held_out)
    examples = encode_pairs(pairs, tokenizer, mcfg)
    valid = encode_pairs(held_out, tokenizer, mcfg)
    n_tokens = sum(len(t) for _, t in examples)
    print(f"# train speed: E={mcfg.embedding_dim} H={mcfg.hidden_size} L={mcfg.num_layers} "
          f"V={mcfg.vocab_size}, "
          f"{len(examples)} chitchat pairs ({n_tokens} target tokens, tokenizer of {tokenizer.vocab_size} "
          f"trained on them; data ready in {time.perf_counter() - started:.0f} s)")
    print(f"# {machine_line()}\n")

    results, val_loss = {}, {}
    for mode in args.precisions:
        cfg = RunConfig(model=mcfg, tokenizer=TokenizerConfig(vocab_size=mcfg.vocab_size),
                        train=TrainConfig(batch_size=args.batch_size, max_batch_tokens=args.max_tokens,
                                          warmup_steps=10, num_threads=args.threads, seed=args.seed,
                                          precision=mode))
        # The project's trainer, its own step function on its own batches, in this precision.
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Corpus(tokenizer, examples, examples[:8], [], {})
            trainer = Trainer(cfg, corpus, Path(tmp), progress=False)
            trainer.model.train()
            batches = make_batches(examples, batch_size=args.batch_size, max_tokens=args.max_tokens,
                                   seed=args.seed)
            for idx in batches[: args.warmup]:
                trainer._train_step(collate([examples[i] for i in idx]))
            start, tokens = time.perf_counter(), 0
            for idx in batches * args.passes:
                batch = collate([examples[i] for i in idx])
                trainer._train_step(batch)
                tokens += batch.num_tokens
            name = f"project {mode} ({trainer.precision.name})"
            results[name] = (tokens, time.perf_counter() - start, len(batches) * args.passes)
            val_loss[name] = evaluate_loss(trainer.model, tokenizer, valid).loss
            print(f"  {name}: {len(batches)} batches, {results[name][1]:.1f} s; {trainer.precision.reason}",
                  flush=True)

        # The tutorial's loop, same initial weights, random unbucketed batches, same precision.
        torch.manual_seed(args.seed)
        tut = tutorial.TutorialSeq2Seq(Seq2Seq(mcfg)).train()
        opt = torch.optim.AdamW(tut.parameters(), lr=cfg.train.learning_rate, betas=(0.9, 0.98))
        order = list(range(len(examples)))
        random.Random(args.seed).shuffle(order)
        chunks = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        with trainer.precision.autocast():
            for idx in chunks[: args.warmup]:
                tutorial.train_step(tut, opt, [examples[i] for i in idx])
            start, tokens = time.perf_counter(), 0
            for idx in chunks:
                tokens += tutorial.train_step(tut, opt, [examples[i] for i in idx])
        name = f"tutorial {trainer.precision.name}"
        results[name] = (tokens, time.perf_counter() - start, len(chunks))
        print(f"  {name}: {len(chunks)} batches, {results[name][1]:.1f} s\n", flush=True)

    base = next(iter(results.values()))
    base_tps = base[0] / base[1]
    print(table(["trainer", "batches", "seconds", "target tok/s", f"vs {next(iter(results))}",
                 "held-out loss"], [
        [name, n_batches, secs, toks / secs, toks / secs / base_tps, val_loss.get(name, float("nan"))]
        for name, (toks, secs, n_batches) in results.items()]))
    print(f"# held-out loss: {len(valid)} pairs of other conversations, after the project's "
          f"{args.passes} pass(es), float32 evaluation; the tutorial's is not measured")
    print(f"\n# finished {time.strftime('%Y-%m-%d %H:%M')}; {machine_line()}")


if __name__ == "__main__":
    main()
