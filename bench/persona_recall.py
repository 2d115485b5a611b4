"""Does a fine-tuned bot state its persona's facts when asked in words it never trained on?

    python bench/persona_recall.py --checkpoint runs/juniper [--checkpoint model/pretrained/chitchat]
    python bench/persona_recall.py --checkpoint runs/juniper --rerank mmi   # needs runs/juniper/reverse
    python bench/persona_recall.py --quick   # a smoke test: the shipped model, 4 questions

For every line of the held-out file (question TAB regex), the reply the server would give by
default (beam 5, ranked by likelihood, the reply filter applied; with `--rerank mmi`, what
CHATBOT_RERANK=mmi gives: all five beams reranked with the checkpoint's reverse model) and
whether it matches the regex (case-insensitive). Prints, per checkpoint, the share of replies
that state the fact and every reply, as a markdown table (docs/FINETUNE.md).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import torch
from common import ROOT, machine_line

from app.reply_filter import ReplyFilter
from app.schemas import DEFAULT_MMI_WEIGHT
from model.checkpoint import load_checkpoint, shipped_checkpoint_path
from model.evaluation import named_settings
from model.inference import decode_sources

# what /api/chat does with only a message (beam 5, likelihood), as `chatbot eval` names it
DEFAULT = named_settings(has_reverse=False)["beam5"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append", help="repeatable (required, but for --quick)")
    p.add_argument("--heldout", type=Path, default=ROOT / "docs" / "persona" / "juniper_heldout.tsv")
    p.add_argument("--threads", type=int, help="torch threads (default 2; --quick: 1)")
    p.add_argument("--rerank", choices=("likelihood", "mmi"), default="likelihood")
    p.add_argument("--mmi-weight", type=float, default=DEFAULT_MMI_WEIGHT)
    p.add_argument("--beam-size", type=int, default=DEFAULT.beam_size)
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
    opts = replace(DEFAULT, beam_size=args.beam_size)
    if args.rerank == "mmi":  # MMI reranks every beam, so the search waits for all of them
        opts = replace(opts, n_best=opts.beam_size, rerank="mmi", mmi_weight=args.mmi_weight)
    for path in args.checkpoint:
        ckpt = load_checkpoint(path)
        if opts.rerank == "mmi" and ckpt.reverse is None:
            p.error(f"{path} has no reverse model (reverse/) to rerank with")
        cfg = ckpt.model.cfg
        sources = [ckpt.tokenizer.encode_context([q], cfg.max_source_len) for q, _ in lines]
        texts = []
        reverse = ckpt.reverse.model if opts.rerank == "mmi" else None  # type: ignore[union-attr]
        for hyps in decode_sources(ckpt.model, sources, opts, reverse=reverse):
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
