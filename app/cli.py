"""The `chatbot` command: serve, train, eval, chat."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("chatbot")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatbot", description="LSTM seq2seq chatbot: serve, train, eval, chat")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP server (REST, OpenAI-compatible API, chat page)")
    s.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the shipped model)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)

    t = sub.add_parser("train", help="train a checkpoint from a dialogue corpus")
    t.add_argument("--corpus", required=True,
                   help="chitchat, chatterbot:LANGUAGE, FILE.tsv or FILE.jsonl; comma-separated")
    t.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    t.add_argument("--config", type=Path, help="TOML file with [model], [tokenizer], [train]")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--learning-rate", type=float)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    t.add_argument("--init", metavar="DIR|shipped",
                   help="start from this checkpoint's weights, tokenizer and [model] config")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="auto (default): bf16 where the CPU has it natively and it measures faster")
    t.add_argument("--reverse", action="store_true", default=None,
                   help="train the reverse model p(message | reply) used by MMI reranking")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="score a checkpoint; prints one JSON object")
    e.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the shipped model)")
    e.add_argument("--corpus", default="chitchat")
    e.add_argument("--split", default="test", choices=("train", "valid", "test"))
    e.add_argument("--max-generate", type=int, default=1000,
                   help="pairs decoded for BLEU and distinct-n (loss uses the whole split)")
    e.add_argument("--no-samples", action="store_true", help="leave out the sample replies")
    e.add_argument("--setting-pairs", type=int, default=200,
                   help="pairs each decoding setting replies to for the reply statistics (0: none)")

    c = sub.add_parser("chat", help="talk to a checkpoint in the terminal")
    c.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the shipped model)")
    c.add_argument("--strategy", choices=("greedy", "beam", "sample"), default="greedy")
    c.add_argument("--beam-size", type=int, default=5)
    c.add_argument("--max-length", type=int, default=40)
    return p


def _train(args: argparse.Namespace) -> int:
    from model.runs import run_training

    overrides: dict[str, dict[str, Any]] = {"train": {
        "max_steps": args.max_steps, "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "eval_every": args.eval_every,
        "checkpoint_every": args.checkpoint_every, "num_threads": args.threads, "seed": args.seed,
        "precision": args.precision, "reverse": args.reverse,
    }}
    result = run_training(corpus=args.corpus, out=args.out, config=args.config, resume=args.resume,
                          overrides=overrides, progress=not args.no_progress, init=args.init)
    if not result.get("rank"):  # under torchrun, rank 0 alone prints
        print(json.dumps(result, indent=2))
    return 130 if result.get("interrupted") else 0


def _eval(args: argparse.Namespace) -> int:
    from model.runs import run_eval

    result = run_eval(checkpoint=args.checkpoint, corpus=args.corpus, split=args.split,
                      max_generate=args.max_generate, samples=not args.no_samples,
                      setting_pairs=args.setting_pairs)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from model.checkpoint import load_checkpoint, shipped_checkpoint_path
    from model.evaluation import reply
    from model.options import DEFAULT_NO_REPEAT_NGRAM_SIZE, DecodeOptions

    ckpt = load_checkpoint(args.checkpoint or shipped_checkpoint_path())
    opts = DecodeOptions(strategy=args.strategy, beam_size=args.beam_size, max_length=args.max_length,
                         no_repeat_ngram_size=DEFAULT_NO_REPEAT_NGRAM_SIZE)  # as the server does
    turns: list[str] = []
    K = ckpt.model.cfg.context_turns
    print(f"chatting with {ckpt.name} ({args.strategy}); an empty line or Ctrl-D ends, /new restarts")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            return 0
        if line == "/new":
            turns = []
            continue
        turns.append(line)
        answer = reply(ckpt.model, ckpt.tokenizer, turns[-K:], opts)
        turns.append(answer)
        print(f"bot> {answer}")


def _serve(args: argparse.Namespace) -> int:
    from app.server import serve

    return serve(checkpoint=args.checkpoint, host=args.host, port=args.port)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    handler = {"serve": _serve, "train": _train, "eval": _eval, "chat": _chat}[args.command]
    try:
        return handler(args)
    except (ValueError, OSError, RuntimeError) as exc:  # CheckpointError, CorpusError: ValueErrors
        if isinstance(exc, RuntimeError) and not _is_training_error(exc):
            raise  # a bug: its traceback
        print(f"chatbot {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _is_training_error(exc: BaseException) -> bool:
    """Imported only when a command fails: `chatbot serve`'s process never imports torch."""
    from model.training import TrainingError

    return isinstance(exc, TrainingError)


if __name__ == "__main__":
    sys.exit(main())
