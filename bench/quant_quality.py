"""What int8 (and bf16) cost in quality: perplexity on a corpus split and greedy replies against float32.

    python bench/quant_quality.py --checkpoint runs/chitchat          # the chitchat test split
    python bench/quant_quality.py --checkpoint DIR --max-pairs 1000   # quicker
    python bench/quant_quality.py --quick   # a smoke test in seconds: the shipped model, 24 chatterbot pairs

Perplexity is per target token, teacher-forced, over the whole split, as `chatbot eval`
computes it. Four ways:

- reference float32: `model.evaluation.evaluate_loss` (what `chatbot eval` prints);
- fast float32: the fast decoder step fed the reference tokens one step at a time (a
  check: it must match the line above to rounding);
- fast int8: the same with `FastDecoder(model, quantize="int8")`: decoder matrices and the
  tied output layer int8, encoder torch.ao int8 (`FastDecoder.encode`);
- fast int8, float encoder: the int8 step on rows from the float32 encoder (what a server
  that encodes with `model.inference.encode_sources` and steps with `make_step(model, "int8")`
  runs);
- fast bf16 (where the CPU has native bf16): `FastDecoder(model, quantize="bf16")`, the
  step's matrices bf16, the encoder float32;
- torch.ao int8: `quantize_dynamic_int8(model)` (Linear and LSTM modules, encoder
  included; the tied output layer stays float32) through `evaluate_loss`.

The checkpoint is only read.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch
from common import machine_line, table

from model.checkpoint import load_checkpoint, shipped_checkpoint_path
from model.config import load_run_config
from model.data import Example, collate, make_batches
from model.decoding import DecodeOptions
from model.device import available_cores
from model.evaluation import evaluate_loss
from model.fastpath import FastDecoder
from model.precision import cpu_bf16_native
from model.quantize import quantize_dynamic_int8
from model.training import prepare_corpus


@torch.inference_mode()
def step_loss(decoder: FastDecoder, examples: Sequence[Example], batch_size: int = 128) -> tuple[float, int]:
    """Summed NLL and token count, teacher-forced through `decoder.step`."""
    nll, tokens = 0.0, 0
    for idx in make_batches(examples, batch_size=batch_size, max_tokens=8192, seed=0, shuffle=False):
        batch = collate([examples[i] for i in idx])
        rows = decoder.encode([examples[i][0] for i in idx])
        for t in range(batch.tgt_in.shape[1]):
            logp, rows = decoder.step(batch.tgt_in[:, t], rows)
            target = batch.tgt_out[:, t]
            keep = target != 0
            nll -= float(logp[keep].gather(1, target[keep, None]).sum())
            tokens += int(keep.sum())
    return nll, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="the checkpoint to quantize (required, but for --quick)")
    p.add_argument("--corpus", default="chitchat")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--max-pairs", type=int, default=0, help="0: the whole split")
    p.add_argument("--generate", type=int, default=300, help="pairs whose greedy replies are compared")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="a smoke test: the shipped model (unless "
                   "--checkpoint), 24 pairs of chatterbot:english's test split, 8 replies compared, 1 thread")
    args = p.parse_args()
    if args.quick:  # chitchat takes half a minute to split and encode; chatterbot's English a second
        args.checkpoint = args.checkpoint or str(shipped_checkpoint_path())
        args.corpus, args.max_pairs, args.generate = "chatterbot:english", 24, 8
    elif not args.checkpoint:
        p.error("--checkpoint is required")
    torch.set_num_threads(args.threads or (1 if args.quick else available_cores()))

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model.eval()
    train_cfg = ckpt.config.get("training") or {}
    cfg = load_run_config(None, {"model": asdict(model.cfg), "train": {
        k: train_cfg[k] for k in ("seed", "valid_fraction", "test_fraction") if k in train_cfg}})
    data = prepare_corpus(args.corpus, cfg, ckpt.tokenizer)
    examples = {"train": data.train, "valid": data.valid, "test": data.test}[args.split]
    if args.max_pairs:
        examples = examples[: args.max_pairs]
    print(f"# quantization quality: {args.checkpoint} (step {ckpt.metrics.get('step')}), {args.corpus} "
          f"{args.split} split, {len(examples)} pairs")
    print(f"# {machine_line()}\n")

    fast, int8 = FastDecoder(model), FastDecoder(model, quantize="int8")
    mixed = FastDecoder(model, quantize="int8")
    mixed.encoder_model = model  # int8 step, float32 encoder
    rows = []
    start = time.perf_counter()
    ref = evaluate_loss(model, ckpt.tokenizer, examples)
    rows.append(["reference float32", ref.perplexity, ref.loss, 0.0, time.perf_counter() - start])
    decoders = [("fast float32", fast), ("fast int8", int8), ("fast int8, float encoder", mixed)]
    bf16 = FastDecoder(model, quantize="bf16") if cpu_bf16_native() else None
    if bf16 is not None:  # CHATBOT_QUANTIZE=bf16: bf16 step, float32 encoder
        decoders.append(("fast bf16", bf16))
    for name, dec in decoders:
        start = time.perf_counter()
        nll, n = step_loss(dec, examples)
        ppl = math.exp(nll / n)
        rows.append([name, ppl, nll / n, 100 * (ppl / ref.perplexity - 1), time.perf_counter() - start])
        print(f"  {name}: {ppl:.3f} ({n} tokens, reference {ref.tokens})", flush=True)
    start = time.perf_counter()
    ao = evaluate_loss(quantize_dynamic_int8(model), ckpt.tokenizer, examples)
    rows.append(["torch.ao int8", ao.perplexity, ao.loss, 100 * (ao.perplexity / ref.perplexity - 1),
                 time.perf_counter() - start])
    print()
    print(table(["model", "perplexity", "loss", "change %", "seconds"], rows))

    sources = [src for src, _ in examples[: args.generate]]
    opts = DecodeOptions(strategy="greedy", max_length=model.cfg.max_target_len)
    a = [h[0].tokens for h in fast.decode_sources(sources, opts)]
    b = [h[0].tokens for h in int8.decode_sources(sources, opts)]
    same = sum(x == y for x, y in zip(a, b, strict=True))
    print(f"\ngreedy replies identical between float32 and int8: {same}/{len(sources)} "
          f"({100 * same / max(len(sources), 1):.1f}%)")
    if bf16 is not None:
        c = [h[0].tokens for h in bf16.decode_sources(sources, opts)]
        same16 = sum(x == y for x, y in zip(a, c, strict=True))
        print(f"greedy replies identical between float32 and bf16: {same16}/{len(sources)} "
              f"({100 * same16 / max(len(sources), 1):.1f}%)")
    for src, x, y in list(zip(sources, a, b, strict=True))[:5]:
        print(f"  {ckpt.tokenizer.decode(src)[-60:]!r}\n    f32:  {ckpt.tokenizer.decode(x)!r}\n"
              f"    int8: {ckpt.tokenizer.decode(y)!r}")
    print(f"\n# finished {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
