"""The reply filter: candidates that contain a blocked word or phrase are dropped before
the reply is chosen; when every candidate is blocked, a neutral fallback reply answers.

The blocked words are better-profanity's maintained list (its `profanity_wordlist.txt`)
plus an operator's own file (`CHATBOT_BLOCKLIST`: one word or phrase per line, `#`
comments). Matching is ours, one compiled regular expression over the lowercased text
with common character swaps undone (`sh1t`, `@ss`): better-profanity's own check takes
about 30 ms a reply (it expands every word into its variants at match time), which
would hold the event loop for half a second over 16 candidates; this takes microseconds.
A word matches whole (`ass` blocks "ass", not "class"); a phrase matches its words in
order with any whitespace between.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

DEFAULT_FALLBACK = "Let's talk about something else."
# Characters written for letters, as better-profanity's CHARS_MAPPING lists them.
_UNSWAP = str.maketrans({"@": "a", "4": "a", "3": "e", "1": "i", "!": "i", "0": "o", "$": "s", "5": "s",
                         "7": "t", "+": "t"})
_WORD_EDGE = r"[a-z0-9]"


class BlocklistError(ValueError):
    """An operator's blocklist that cannot be read; the message names the file."""


def package_words() -> list[str]:
    """better-profanity's maintained word list."""
    text = resources.files("better_profanity").joinpath("profanity_wordlist.txt").read_text("utf-8")
    return _entries(text.splitlines())


def read_blocklist(path: Path) -> list[str]:
    try:
        return _entries(Path(path).read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise BlocklistError(f"CHATBOT_BLOCKLIST {path}: cannot read it ({exc})") from None


def _entries(lines: Iterable[str]) -> list[str]:
    return [ln.strip().lower() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


class ReplyFilter:
    def __init__(self, phrases: Iterable[str], fallback: str = DEFAULT_FALLBACK) -> None:
        words = sorted({normalise(p) for p in phrases if normalise(p)}, key=len, reverse=True)
        self.size = len(words)
        self.fallback = fallback
        body = "|".join(r"\s+".join(map(re.escape, w.split())) for w in words)
        self._pattern = re.compile(rf"(?<!{_WORD_EDGE})(?:{body})(?!{_WORD_EDGE})") if words else None

    @classmethod
    def standard(cls, blocklist: Path | None = None, fallback: str = DEFAULT_FALLBACK) -> ReplyFilter:
        """The package's list, plus the operator's file when one is given."""
        return cls([*package_words(), *(read_blocklist(blocklist) if blocklist else [])], fallback)

    def blocked(self, text: str) -> bool:
        """The text as written, or with the character swaps undone, holds a blocked entry."""
        if self._pattern is None:
            return False
        text = normalise(text)
        return bool(self._pattern.search(text) or self._pattern.search(text.translate(_UNSWAP)))

    def passed(self, texts: Sequence[str]) -> list[int]:
        """Indices of the texts that pass, in order."""
        return [i for i, t in enumerate(texts) if not self.blocked(t)]
