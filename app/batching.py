"""Continuous batching over the model's search objects (no threads, no asyncio here).

`RunningBatch` holds every request that is decoding: one search per distinct
DecodeOptions (model/decoding.py) and one DecoderRows with the recurrent state and
encoder output of all their rows. Between steps, items join (`add`: encoded as one
batch and concatenated onto the rows and onto the search with equal options) and
leave (`drop`, or when they finish in `step`). A step runs the decoder once over all
live rows of all searches, splits the log-probs per search, advances each, and
reorders / shrinks the rows with the index each search returns.

Rows keep their own lengths inside a search, so an item gives the same tokens here
as `model.inference.decode_sources` gives it alone (tests/api/test_batching.py).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import Tensor

from model.decoding import DecodeOptions, Hypothesis, Search, make_search
from model.inference import DecoderRows, RowStepFn, encode_sources, step_rows
from model.network import Seq2Seq
from model.tokenizer import EOS_ID, PAD_ID

# The seam for a faster decoder step: tokens (R,), rows -> log-probs (R, V), new rows.
StepFn = RowStepFn
# ... and for the encoder: token-id sources -> one DecoderRows row per source, in order.
EncodeFn = Callable[[Sequence[Sequence[int]]], DecoderRows]


def default_step(model: Seq2Seq) -> StepFn:
    return lambda tokens, rows: step_rows(model, tokens, rows)


def default_encode(model: Seq2Seq) -> EncodeFn:
    return lambda sources: encode_sources(model, sources)


T = TypeVar("T")


@dataclass(eq=False)
class Waiting(Generic[T]):
    """Encoded sources waiting to join the batch: items[i]'s row is rows[index[i]]
    (index None: row i). Picking and splitting touch lists only, so a caller can do
    them under a lock and gather the rows (`gather_rows`) after it."""

    items: list[T]
    rows: DecoderRows
    index: list[int] | None = None

    def _row(self, i: int) -> int:
        return i if self.index is None else self.index[i]

    def pick(self, positions: list[int]) -> Waiting[T]:
        """The items at these positions, in order."""
        if self.index is None and positions == list(range(len(self.items))):
            return self
        return Waiting([self.items[i] for i in positions], self.rows, [self._row(i) for i in positions])

    def rest(self, start: int) -> Waiting[T]:
        """The items from `start` on."""
        return self.pick(list(range(start, len(self.items))))


def gather_rows(groups: Sequence[Waiting[T]]) -> DecoderRows:
    """The rows of the groups' items, in order, as one DecoderRows."""
    parts = [g.rows if g.index is None else
             g.rows.index_select(torch.tensor(g.index, device=g.rows.state[0].device)) for g in groups]
    return parts[0] if len(parts) == 1 else DecoderRows.concatenate(parts)


@dataclass
class BatchItem:
    id: Hashable
    source: list[int]
    opts: DecodeOptions
    stream: bool = False  # report each token as it is chosen (one-row items only)


@dataclass
class StepOutput:
    finished: list[tuple[Hashable, list[Hypothesis]]] = field(default_factory=list)
    tokens: list[tuple[Hashable, int]] = field(default_factory=list)  # streamed items' new tokens
    rows: int = 0  # rows the step decoded
    items: int = 0


@dataclass
class _Group:
    search: Search
    index: Tensor  # (rows,) where this search's rows sit in the batch's DecoderRows


class RunningBatch:
    def __init__(self, model: Seq2Seq, *, step: StepFn | None = None, encode: EncodeFn | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.step_fn = step or default_step(model)
        self.encode = encode or default_encode(model)
        self.generator = generator
        self.groups: dict[DecodeOptions, _Group] = {}
        self.rows: DecoderRows | None = None
        self.streaming: set[Hashable] = set()

    @property
    def num_rows(self) -> int:
        return sum(g.search.num_rows for g in self.groups.values())

    def __len__(self) -> int:
        return sum(len(g.search) for g in self.groups.values())

    def __contains__(self, item_id: Hashable) -> bool:
        return any(item_id in g.search.ids for g in self.groups.values())

    def add(self, items: Sequence[BatchItem]) -> None:
        """Encode new items as one batch and join them to the running searches."""
        if items:
            self.join(items, self.encode([it.source for it in items]))

    def join(self, items: Sequence[BatchItem], encoded: DecoderRows) -> None:
        """Join items whose sources are already encoded (`encoded` has one row per item, in
        order): the engine encodes on another thread while this batch decodes."""
        if not items:
            return
        by_opts: dict[DecodeOptions, list[int]] = {}
        for i, it in enumerate(items):
            by_opts.setdefault(it.opts, []).append(i)
            if it.stream and it.opts.rows_per_item == 1:
                self.streaming.add(it.id)
        offset = self.rows.state[0].shape[1] if self.rows is not None else 0
        parts = []
        for opts, idx in by_opts.items():
            K = opts.rows_per_item
            if K == 1 and len(idx) == len(items):  # every item, in order: no copy
                parts.append(encoded)
            else:
                pick = torch.tensor(idx, device=self.device).repeat_interleave(K)
                parts.append(encoded.index_select(pick))
            search = make_search([items[i].id for i in idx], opts, device=self.device,
                                 generator=self.generator)
            index = torch.arange(offset, offset + len(idx) * K, device=self.device)
            offset += len(idx) * K
            group = self.groups.get(opts)
            if group is None:
                self.groups[opts] = _Group(search=search, index=index)
            else:
                group.search = type(group.search).concatenate([group.search, search])
                group.index = torch.cat([group.index, index])
        old = [self.rows] if self.rows is not None else []
        self.rows = DecoderRows.concatenate([*old, *parts]) if len(old) + len(parts) > 1 else parts[0]

    def drop(self, ids: set[Hashable]) -> None:
        """Remove items (cancelled, past their deadline) from the batch."""
        for opts, g in list(self.groups.items()):
            if not ids.intersection(g.search.ids):
                continue
            g.index = g.index.index_select(0, g.search.drop(ids))
            if not len(g.search):
                del self.groups[opts]
        self.streaming -= ids
        self._compact()

    def step(self) -> StepOutput:
        """One decoder step over every live row; finished items leave the batch."""
        assert self.rows is not None and self.groups
        out = StepOutput(rows=self.num_rows, items=len(self))
        R = self.rows.state[0].shape[1]
        tokens = torch.zeros(R, dtype=torch.long, device=self.device)
        for g in self.groups.values():
            tokens[g.index] = g.search.last_tokens()
        logp, self.rows = self.step_fn(tokens, self.rows)  # (R, V)
        for opts, g in list(self.groups.items()):
            ids_before = list(g.search.ids)
            # The search may overwrite what it is given: a copy, unless it is all of logp (one
            # search over every row, which `_compact` leaves in order).
            whole = len(self.groups) == 1 and g.index.numel() == logp.shape[0]
            res = g.search.advance(logp if whole else logp.index_select(0, g.index), inplace=True)
            if self.streaming and opts.rows_per_item == 1:
                for item_id, tok in zip(ids_before, res.tokens.tolist(), strict=True):
                    if item_id in self.streaming and tok not in (EOS_ID, PAD_ID):
                        out.tokens.append((item_id, tok))
            for item_id, hyps in res.finished:
                out.finished.append((item_id, hyps))
                self.streaming.discard(item_id)
            if not len(g.search):
                del self.groups[opts]
            elif res.reorder is not None:
                g.index = g.index.index_select(0, res.reorder)
        self._compact()
        return out

    def _in_place_blocks(self) -> bool:
        """Whether every search's rows still come from the block of the batch they filled after
        the last compaction. Each block is then in the search's own row order and a search
        maps rows within an item only (beams), so no row took another item's encoder output.
        A join that added rows to a search other than the last one breaks its block."""
        start = 0
        for g in self.groups.values():
            n = g.index.numel()
            if n and (int(g.index.min()) < start or int(g.index.max()) >= start + n):
                return False
            start += n
        return True

    def _compact(self) -> None:
        """Gather the live rows, search by search, into a contiguous DecoderRows."""
        if not self.groups:
            self.rows = None
            return
        assert self.rows is not None
        keep = torch.cat([g.index for g in self.groups.values()])
        R = self.rows.state[0].shape[1]
        identity = torch.arange(keep.numel(), device=self.device)
        if keep.numel() == R and torch.equal(keep, identity):
            return
        if keep.numel() == R and self._in_place_blocks():
            # Only beams moved, each within its own item, whose rows all hold the same encoder
            # output: move the recurrent state, not the encoder output.
            h, c = self.rows.state
            self.rows = DecoderRows(state=(h.index_select(1, keep), c.index_select(1, keep)),
                                    enc=self.rows.enc)
        else:
            self.rows = self.rows.index_select(keep)
        start = 0
        for g in self.groups.values():
            n = g.index.numel()
            g.index = identity[start:start + n]
            start += n
