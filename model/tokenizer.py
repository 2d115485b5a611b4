"""Byte-level BPE tokenizer (HF `tokenizers`) with the chatbot's special tokens.

Byte-level BPE covers every byte, so any string (Chinese, emoji, control
characters after normalisation) encodes without an unknown token. Special
tokens typed by a user are encoded as plain text (`encode_special_tokens`), so a
message containing "<sep>" cannot forge a turn boundary.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a tokenizer is built: a model worker never loads the library (3 MiB)
    from tokenizers import Tokenizer as HFTokenizer

PAD, BOS, EOS, UNK, SEP = "<pad>", "<s>", "</s>", "<unk>", "<sep>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, SEP)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, SEP_ID = range(5)

_SPACE = re.compile(r"\s+")


def normalize(text: str, *, lowercase: bool = False) -> str:
    """NFKC, control characters, lone surrogates and U+FFFD dropped, whitespace collapsed.

    U+FFFD (the replacement character) is dropped because decode() removes it: it is what
    a split multi-byte character decodes to, so keeping it here would break round trips."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or (ch != "\ufffd" and unicodedata.category(ch) not in ("Cc", "Cs", "Co", "Cn"))
    )
    text = _SPACE.sub(" ", text).strip()
    return text.lower() if lowercase else text


class Tokenizer:
    """Thin wrapper: normalisation, turn joining and special-token handling."""

    def __init__(self, hf: HFTokenizer, *, lowercase: bool = False) -> None:
        self.lowercase = lowercase
        self._data: str | None = None
        self._hf = self._checked(hf)

    @classmethod
    def deferred(cls, data: str, *, lowercase: bool = False) -> Tokenizer:
        """The tokenizer of `data` (tokenizer.json's text), built and checked on first use. For a
        process that holds a checkpoint but never tokenises (the model worker, whose requests come
        as token ids): the first HF tokenizer a process builds costs it about 8 MiB."""
        tok = cls.__new__(cls)
        tok.lowercase, tok._data, tok._hf = lowercase, data, None
        return tok  # _data is set whenever _hf is None: `hf` builds from it

    @staticmethod
    def _checked(hf: HFTokenizer) -> HFTokenizer:
        hf.encode_special_tokens = True
        for i, tok in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(tok) != i:
                raise ValueError(f"tokenizer.json: special token {tok!r} must have id {i}")
        return hf

    @property
    def hf(self) -> HFTokenizer:
        return self._hf if self._hf is not None else self._build()

    def _build(self) -> HFTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        self._hf = self._checked(HFTokenizer.from_str(self._data))
        return self._hf

    @property
    def built(self) -> bool:
        """Whether the HF tokenizer exists yet (False only for a `deferred` one never used)."""
        return self._hf is not None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2,
              lowercase: bool = False) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator((normalize(t, lowercase=lowercase) for t in texts), trainer=trainer)
        return cls(hf, lowercase=lowercase)

    def normalize(self, text: str) -> str:
        return normalize(text, lowercase=self.lowercase)

    def encode(self, text: str) -> list[int]:
        text = self.normalize(text)
        return self.hf.encode(text, add_special_tokens=False).ids if text else []

    def encode_context(self, turns: Sequence[str], max_len: int) -> list[int]:
        """Turns joined by <sep>, truncated from the left to `max_len` tokens."""
        ids: list[int] = []
        for i, turn in enumerate(turns):
            if i:
                ids.append(SEP_ID)
            ids.extend(self.encode(turn))
        return ids[-max_len:] if max_len else ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in ids if i >= len(SPECIAL_TOKENS)]
        # Model output may split a multi-byte character; drop the replacement marks.
        return self.hf.decode(ids, skip_special_tokens=True).replace("\ufffd", "").strip()

    def to_str(self) -> str:
        return self.hf.to_str()

    @classmethod
    def from_str(cls, data: str, *, lowercase: bool = False) -> Tokenizer:
        tok = cls.deferred(data, lowercase=lowercase)
        tok._build()  # now, not on first use
        return tok

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")
