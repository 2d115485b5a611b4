"""Corpora: load conversations from a SPEC, split them by conversation, build pairs.

A conversation is a list of turns (strings); consecutive messages by the same
speaker are one turn. SPEC is `chitchat`, `chatterbot:LANGUAGE`, a `.tsv` file
(context TAB response per line) or a `.jsonl` file (`{"turns": [...]}` per line).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

Conversation = list[str]


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class Pair:
    context: tuple[str, ...]  # the last K turns, oldest first
    response: str


@dataclass(frozen=True)
class Splits:
    train: list[Conversation]
    valid: list[Conversation]
    test: list[Conversation]


def load_chitchat() -> list[Conversation]:
    try:
        import chitchat_dataset
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise CorpusError("the chitchat corpus needs the 'chitchat-dataset' package") from exc
    conversations = []
    for key in sorted(data := chitchat_dataset.Dataset()):
        turns: list[str] = []
        last_sender = None
        for group in data[key]["messages"]:
            text = " ".join(m["text"] for m in group if m.get("text"))
            sender = group[0].get("sender") if group else None
            if not text.strip():
                continue
            if turns and sender == last_sender:
                turns[-1] = f"{turns[-1]} {text}"
            else:
                turns.append(text)
            last_sender = sender
        if len(turns) >= 2:
            conversations.append(turns)
    return conversations


def load_chatterbot(language: str) -> list[Conversation]:
    try:
        import chatterbot_corpus
        import yaml
    except ImportError as exc:  # pragma: no cover - declared dependencies
        raise CorpusError("chatterbot corpora need 'chatterbot-corpus' and 'PyYAML'") from exc
    root = Path(chatterbot_corpus.__file__).parent / "data"
    folder = root / language.lower()
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir()))
        raise CorpusError(f"unknown chatterbot language {language!r}; known: {known}")
    conversations = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations", []):
            turns = [str(t) for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                conversations.append(turns)
    return conversations


def load_tsv(path: Path) -> list[Conversation]:
    """Each line is its own two-turn conversation: context TAB response."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise CorpusError(
                    f"{path}:{lineno}: expected 'context<TAB>response', got {len(parts)} field(s)"
                )
            conversations.append([parts[0], parts[1]])
    return conversations


def load_jsonl(path: Path) -> list[Conversation]:
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            turns = obj.get("turns") if isinstance(obj, dict) else None
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                raise CorpusError(f'{path}:{lineno}: expected {{"turns": ["...", ...]}}')
            turns = [t for t in turns if t.strip()]
            if len(turns) >= 2:
                conversations.append(turns)
    return conversations


def load_spec(spec: str) -> list[Conversation]:
    spec = spec.strip()
    if spec == "chitchat":
        return load_chitchat()
    if spec.startswith("chatterbot:"):
        return load_chatterbot(spec.split(":", 1)[1])
    path = Path(spec)
    if path.suffix.lower() in (".tsv", ".jsonl"):
        if not path.is_file():
            raise CorpusError(f"{path}: no such corpus file")
        try:
            return load_tsv(path) if path.suffix.lower() == ".tsv" else load_jsonl(path)
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{path}: not UTF-8 text ({exc.reason})") from None
    raise CorpusError(
        f"unknown corpus {spec!r}: use chitchat, chatterbot:LANGUAGE, or a .tsv/.jsonl file"
    )


def load_corpora(specs: str | Sequence[str]) -> list[Conversation]:
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    conversations: list[Conversation] = []
    for spec in specs:
        conversations.extend(load_spec(spec))
    if not conversations:
        raise CorpusError(f"corpus {','.join(specs)!r} has no conversation with two turns")
    return conversations


def split_conversations(conversations: list[Conversation], *, seed: int,
                        valid_fraction: float = 0.05, test_fraction: float = 0.05) -> Splits:
    """Shuffle whole conversations with a fixed seed, then cut: no turn leaks across splits."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = int(n * test_fraction) if n >= 20 else 0
    n_valid = int(n * valid_fraction) if n >= 20 else 0
    if n >= 3:
        n_test, n_valid = max(n_test, 1), max(n_valid, 1)
    pick = [conversations[i] for i in order]
    return Splits(train=pick[n_test + n_valid:], valid=pick[n_test:n_test + n_valid],
                  test=pick[:n_test])


def make_pairs(conversations: Iterable[Conversation], context_turns: int) -> list[Pair]:
    """Every turn after the first is a response to the `context_turns` turns before it."""
    pairs = []
    for turns in conversations:
        for i in range(1, len(turns)):
            context = tuple(turns[max(0, i - context_turns):i])
            pairs.append(Pair(context=context, response=turns[i]))
    return pairs


def reverse_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """The reverse model's pairs (MMI reranking scores log p(message | reply)): each reply
    becomes the context and the message it answered (the last context turn) the response."""
    return [Pair(context=(p.response,), response=p.context[-1]) for p in pairs]
