"""The blind sensibleness/specificity judgement (SSA, Adiwardana et al. 2020) of decoding settings.

    # replies of each setting to each prompt, shuffled into a sheet that names no setting
    python bench/judge_replies.py make --prompts bench/prompts_dev.txt --out bench/judged/dev \\
        --settings greedy beam5 sample:n=16,t=0.8,p=0.9,rerank=mmi,w=0.5
    # the judge (a person, or a helper session shown only sheet.md) writes judgments.json:
    #   {"<item id>": {"sensible": 0 or 1, "specific": 0 or 1}, ...}
    python bench/judge_replies.py score --out bench/judged/dev
    # a smoke test in seconds: `make` on 4 dev prompts into a temporary directory, then `score`
    # over placeholder marks (every reply sensible, none specific), which measure nothing
    python bench/judge_replies.py --quick

A setting is a name of `model.evaluation.named_settings` (`greedy`, `beam5`, `sample1`,
`sample16_mmi`, `beam10_mmi`, ...) or `STRATEGY:key=value,...` with keys n (samples, or beam
width), t (temperature), p (top-p), rerank (none/likelihood/mmi), w (mmi weight), lb (length
bonus), optionally prefixed `ALIAS/` to use the checkpoint given as `--checkpoint ALIAS=DIR`
(so a sheet can mix two models, blind). Replies are what the server would send: the
candidates ranked, the reply filter applied, the first kept one. Identical replies to one
prompt from several settings are judged once (one item), so the judge never sees the same
text twice and cannot tell settings apart by repetition. Items are shuffled with a fixed seed per prompt.

The judging protocol (docs/QUALITY.md): for each item, "sensible" = the reply makes sense
as an answer to the prompt (no contradiction, no nonsense, fits the context); "specific" =
sensible and specific to this prompt (it would not fit most other prompts: "i don't know",
"that's cool", "me too" are not). Specific implies sensible. SSA = mean of the two rates.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from common import ROOT, machine_line

from app.reply_filter import ReplyFilter
from model.checkpoint import Checkpoint, load_checkpoint, shipped_checkpoint_path
from model.decoding import DEFAULT_NO_REPEAT_NGRAM_SIZE, DecodeOptions
from model.evaluation import named_settings, reply_stats
from model.inference import decode_sources

KEYS = {"n": ("n_best", int), "t": ("temperature", float), "p": ("top_p", float),
        "rerank": ("rerank", str), "w": ("mmi_weight", float), "lb": ("length_bonus", float)}


def parse_setting(spec: str, has_reverse: bool, max_length: int) -> DecodeOptions:
    named = named_settings(has_reverse, max_length)
    if spec in named:
        return named[spec]
    strategy, _, rest = spec.partition(":")
    opts = DecodeOptions(strategy=strategy, max_length=max_length, min_length=2,
                         no_repeat_ngram_size=DEFAULT_NO_REPEAT_NGRAM_SIZE)
    fields = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        name, kind = KEYS[key]
        fields[name] = kind(value)
    if strategy == "beam" and "n_best" in fields:
        fields["beam_size"] = fields["n_best"]
    return replace(opts, **fields)


def read_prompts(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and not ln.startswith("#")]


def checkpoints(given: list[str] | None) -> dict[str, Checkpoint]:
    """`--checkpoint [ALIAS=]DIR`, repeatable; the first is the default of unprefixed settings."""
    out: dict[str, Checkpoint] = {}
    for item in given or [str(shipped_checkpoint_path())]:
        alias, _, path = item.rpartition("=")
        out[alias or "model"] = load_checkpoint(path)
    return out


def make(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ckpts = checkpoints(args.checkpoint)
    reply_filter = ReplyFilter.standard()
    prompts = read_prompts(args.prompts)[: args.max_prompts or None]
    replies: dict[str, list[str]] = {}
    for spec in args.settings:
        alias, _, setting = spec.rpartition("/") if "/" in spec.split(":")[0] else ("", "", spec)
        ckpt = ckpts[alias] if alias else next(iter(ckpts.values()))
        reverse = ckpt.reverse.model if ckpt.reverse is not None else None
        sources = [ckpt.tokenizer.encode_context([p], ckpt.model.cfg.max_source_len) for p in prompts]
        opts = parse_setting(setting, reverse is not None, ckpt.model.cfg.max_target_len)
        generator = torch.Generator().manual_seed(args.seed)
        texts = []
        for start in range(0, len(sources), 16):
            for hyps in decode_sources(ckpt.model, sources[start:start + 16], opts, generator=generator,
                                       reverse=reverse):
                cands = [ckpt.tokenizer.decode(h.tokens) for h in hyps]
                kept = [cands[i] for i in reply_filter.passed(cands)]
                texts.append(kept[0] if kept else reply_filter.fallback)
        replies[spec] = texts
        print(f"{spec}: {json.dumps(reply_stats(texts))}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items: dict[str, dict[str, object]] = {}
    lines = ["# Judge each reply to its prompt. For every item id, give two marks:",
             "# sensible (1/0): the reply makes sense as an answer to the prompt.",
             "# specific (1/0): it is sensible AND specific to this prompt (would not fit most",
             "#   other prompts; 'i don't know', 'that's cool', 'me too' are not specific).", ""]
    for i, prompt in enumerate(prompts):
        texts = sorted({replies[s][i] for s in args.settings})
        random.Random(args.seed * 1000 + i).shuffle(texts)
        lines.append(f"## Prompt {i + 1}: {prompt}")
        for j, text in enumerate(texts):
            item = f"{i + 1}{string.ascii_lowercase[j]}"
            items[item] = {"prompt": prompt, "reply": text,
                           "settings": [s for s in args.settings if replies[s][i] == text]}
            lines.append(f"- {item}: {text}")
        lines.append("")
    (out / "sheet.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "key.json").write_text(json.dumps({
        "checkpoints": {k: str(c.path) for k, c in ckpts.items()}, "prompts": str(args.prompts),
        "settings": args.settings,
        "seed": args.seed, "machine": machine_line(), "items": items}, indent=1), encoding="utf-8")
    print(f"{len(items)} items for {len(prompts)} prompts in {out / 'sheet.md'}")


def score(args: argparse.Namespace) -> None:
    out = Path(args.out)
    key = json.loads((out / "key.json").read_text(encoding="utf-8"))
    marks = json.loads((out / "judgments.json").read_text(encoding="utf-8"))
    missing = sorted(set(key["items"]) - set(marks))
    if missing:
        sys.exit(f"judgments.json lacks {len(missing)} items, e.g. {missing[:5]}")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for item, info in key["items"].items():
        sensible = int(marks[item]["sensible"])
        specific = int(marks[item]["specific"]) * sensible
        for s in info["settings"]:
            t = totals[s]
            t[0] += sensible
            t[1] += specific
            t[2] += 1
    rows = []
    for s in key["settings"]:
        sens, spec, n = totals[s]
        rows.append(f"| `{s}` | {sens / n:.0%} | {spec / n:.0%} | {(sens + spec) / (2 * n):.0%} | {n} |")
    table = "\n".join(["| setting | sensible | specific | SSA | prompts |", "|---|---|---|---|---|", *rows])
    (out / "scores.md").write_text(table + "\n", encoding="utf-8")
    print(table)


def quick() -> None:
    """`make` and `score` end to end on a few prompts, with placeholder marks."""
    with tempfile.TemporaryDirectory(prefix="judge-") as tmp:
        args = argparse.Namespace(prompts=ROOT / "bench" / "prompts_dev.txt", out=Path(tmp), checkpoint=None,
                                  settings=["greedy", "beam5", "sample:n=4,t=0.8,p=0.9"], seed=7, threads=1,
                                  max_prompts=4)
        make(args)
        items = json.loads((args.out / "key.json").read_text(encoding="utf-8"))["items"]
        marks = {item: {"sensible": 1, "specific": 0} for item in items}
        (args.out / "judgments.json").write_text(json.dumps(marks), encoding="utf-8")
        score(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke test of make and score (placeholder marks), in a temporary directory")
    sub = p.add_subparsers(dest="command")
    m = sub.add_parser("make")
    m.add_argument("--prompts", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--checkpoint", action="append", metavar="[ALIAS=]DIR",
                   help="repeatable; settings written ALIAS/SETTING use that checkpoint")
    m.add_argument("--settings", nargs="+", required=True)
    m.add_argument("--seed", type=int, default=7)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--max-prompts", type=int, default=0, help="the first N prompts only (0: all)")
    s = sub.add_parser("score")
    s.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.quick:
        quick()
    elif args.command is None:
        p.error("a command (make or score) or --quick is required")
    else:
        (make if args.command == "make" else score)(args)


if __name__ == "__main__":
    main()
