"""Does a fine-tuned bot state its persona's facts when asked in words it never trained on?

    python bench/persona_recall.py --checkpoint runs/juniper [--checkpoint model/pretrained/chitchat]
    python bench/persona_recall.py --quick   # a smoke test: the shipped model, 4 questions

For every line of the held-out file (question TAB regex), the reply the server would give by
default (beam search, ranked by likelihood, the reply filter applied) and whether it matches
the regex (case-insensitive). Prints, per checkpoint, the share of replies that state the fact
and every reply, as a markdown table (docs/FINETUNE.md).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from common import ROOT, machine_line

from app.reply_filter import ReplyFilter
from model.checkpoint import load_checkpoint, shipped_checkpoint_path
from model.decoding import DEFAULT_NO_REPEAT_NGRAM_SIZE, DecodeOptions
from model.inference import decode_sources

DEFAULT = DecodeOptions(strategy="beam", beam_size=5, n_best=5, min_length=2,
                        no_repeat_ngram_size=DEFAULT_NO_REPEAT_NGRAM_SIZE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append", help="repeatable (required, but for --quick)")
    p.add_argument("--heldout", type=Path, default=ROOT / "docs" / "persona" / "juniper_heldout.tsv")
    p.add_argument("--threads", type=int, help="torch threads (default 2; --quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: the shipped model (unless --checkpoint), the first 4 questions")
    args = p.parse_args()
    if args.quick:
        args.checkpoint = args.checkpoint or [shipped_checkpoint_path()]
    elif not args.checkpoint:
        p.error("--checkpoint is required")
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    lines = [ln.split("\t") for ln in args.heldout.read_text(encoding="utf-8").splitlines() if ln.strip()]
    lines = lines[:4] if args.quick else lines
    reply_filter = ReplyFilter.standard()
    replies: dict[str, list[str]] = {}
    for path in args.checkpoint:
        ckpt = load_checkpoint(path)
        cfg = ckpt.model.cfg
        sources = [ckpt.tokenizer.encode_context([q], cfg.max_source_len) for q, _ in lines]
        texts = []
        for hyps in decode_sources(ckpt.model, sources, DEFAULT):
            cands = [ckpt.tokenizer.decode(h.tokens) for h in hyps]
            kept = [cands[i] for i in reply_filter.passed(cands)]
            texts.append(kept[0] if kept else reply_filter.fallback)
        replies[str(path)] = texts
        hits = sum(bool(re.search(rx, t, re.I)) for (_, rx), t in zip(lines, texts, strict=True))
        print(f"{path}: {hits}/{len(lines)} replies state the fact ({hits / len(lines):.0%})")
    print()
    print("| question | fact | " + " | ".join(f"`{k}`" for k in replies) + " |")
    print("|---|---|" + "---|" * len(replies))
    for i, (q, rx) in enumerate(lines):
        cells = [("**" if re.search(rx, replies[k][i], re.I) else "") + replies[k][i].replace("|", "/")
                 + ("**" if re.search(rx, replies[k][i], re.I) else "") for k in replies]
        print(f"| {q} | `{rx}` | " + " | ".join(cells) + " |")
    print(f"\n# {machine_line()}")


if __name__ == "__main__":
    main()
