"""ServedModel: what both engines tell of the checkpoint they serve, and its tokenizer
both ways (the routes tokenise and decode with it). No torch: the HTTP process of
`chatbot serve` holds this and no weights; the model worker describes the rest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from model.config import ModelConfig
from model.options import DecodeOptions
from model.tokenizer import Tokenizer

from .errors import InvalidRequest


class ServedModel:
    def __init__(self, name: str, tokenizer: Tokenizer, cfg: ModelConfig,
                 description: dict[str, Any] | None = None) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.cfg = cfg
        # GET /api/model's account of the checkpoint (app.engine.describe); for an
        # engine in another process, it comes when the worker is ready
        self.description = description

    def encode_turns(self, turns: Sequence[str]) -> list[int]:
        """The last `context_turns` turns joined by <sep>, left-truncated to max_source_len."""
        return self.tokenizer.encode_context(list(turns)[-self.cfg.context_turns:], self.cfg.max_source_len)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    @property
    def has_reverse(self) -> bool:
        return bool(self.description and self.description.get("reverse"))

    def check_options(self, opts: DecodeOptions) -> None:
        """Refuse (422) what this checkpoint cannot do; both engines call it on submit."""
        if opts.rerank == "mmi" and not self.has_reverse:
            raise InvalidRequest("rerank 'mmi' needs a reverse model, and this checkpoint has none "
                                 "(train one with `chatbot train --reverse`)", param="rerank")

    def _describe(self, device: str, engine: dict[str, Any]) -> dict[str, Any]:
        """GET /api/model: what is loaded and how the engine runs it."""
        return {**(self.description or {"name": self.name}), "device": device, "engine": engine}
