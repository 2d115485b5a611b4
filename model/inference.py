"""Glue between the network and the searches: batch sources, run a search to the end."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import collate_sources
from .decoding import DecodeOptions, Hypothesis, SearchStepFn, decode
from .network import EncoderOutput, LSTMState, Seq2Seq
from .rerank import rerank_batch


@dataclass
class DecoderRows:
    """The recurrent state and encoder output of R decoding rows."""

    state: LSTMState
    enc: EncoderOutput

    def index_select(self, index: Tensor) -> DecoderRows:
        h, c = self.state
        return DecoderRows(state=(h.index_select(1, index), c.index_select(1, index)),
                           enc=self.enc.index_select(index))

    @staticmethod
    def concatenate(rows: Sequence[DecoderRows]) -> DecoderRows:
        """Rows of several batches in one; encoder memories are padded to the longest."""
        S = max(r.enc.memory.shape[1] for r in rows)

        def pad(t: Tensor, value: float | bool = 0.0) -> Tensor:
            extra = S - t.shape[1]
            if not extra:
                return t
            shape = (t.shape[0], extra, *t.shape[2:])
            return torch.cat([t, t.new_full(shape, value)], dim=1)

        enc = EncoderOutput(
            memory=torch.cat([pad(r.enc.memory) for r in rows]),
            keys=torch.cat([pad(r.enc.keys) for r in rows]),
            mask=torch.cat([pad(r.enc.mask, False) for r in rows]),
            state=(torch.cat([r.enc.state[0] for r in rows], 1),
                   torch.cat([r.enc.state[1] for r in rows], 1)),
        )
        return DecoderRows(state=(torch.cat([r.state[0] for r in rows], 1),
                                  torch.cat([r.state[1] for r in rows], 1)), enc=enc)


# The decoder step the searches and the server's batch run over rows (`step_rows` is the reference
# one, `model.fastpath.FastDecoder.step` the fast one): tokens (R,), rows -> log-probs (R, V), new rows.
RowStepFn = SearchStepFn[DecoderRows]


@torch.inference_mode()
def encode_sources(model: Seq2Seq, sources: Sequence[Sequence[int]]) -> DecoderRows:
    device = next(model.parameters()).device
    src, lens = collate_sources(sources, device)
    enc = model.encode(src, lens)
    return DecoderRows(state=enc.state, enc=enc)


def step_rows(model: Seq2Seq, tokens: Tensor, rows: DecoderRows) -> tuple[Tensor, DecoderRows]:
    logp, state = model.step(tokens, rows.state, rows.enc)
    return logp, DecoderRows(state=state, enc=rows.enc)


@torch.inference_mode()
def decode_sources(model: Seq2Seq, sources: Sequence[Sequence[int]], opts: DecodeOptions,
                   generator: torch.Generator | None = None, reverse: Seq2Seq | None = None,
                   ) -> list[list[Hypothesis]]:
    """Encode a batch of token-id sources and search their replies with the reference step; one
    hypothesis list per source, ordered by `opts.rerank` (best first; `reverse` is the reverse
    model `mmi` needs). `FastDecoder.decode_sources` (model/fastpath.py) is the same through the
    fast step."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        found = decode(
            lambda tokens, rows: step_rows(model, tokens, rows), encode_sources(model, sources),
            DecoderRows.index_select, batch_size=len(sources), opts=opts, device=device,
            generator=generator,
            inplace=True,  # model.step returns fresh log-probs: the search may overwrite them
        )
    finally:
        model.train(was_training)
    return rerank_batch(sources, found, opts, reverse)
