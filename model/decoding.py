"""Decoding: greedy, batched beam search and sampling as step-by-step search states.

A search owns the hypotheses of a batch of items (each with K rows: K beams, K
samples, or 1 for greedy) as flat `(B*K, ...)` tensors and advances them one step
at a time from the model's log-probs. `advance` returns the finished items and the
row index the caller uses to reorder (and shrink) the recurrent state, so the
server's engine can run many searches side by side, add items between steps
(`concatenate`) and drop finished ones at once.

Every row keeps its own length, so items that started at different steps can share
a search: decoding an item in a batch gives the same result as decoding it alone.

The bookkeeping runs after every decoder step and at batch 64 used to cost as much as
the step, so it avoids whole (R, V) passes: bans are written entry by entry, greedy
finds rows with nothing left from its argmax (NumPy's on CPU, ~20x torch's), beam
search's topk reads the best blocks of each row only, and a caller that owns the
log-probs lets `advance(logp, inplace=True)` overwrite them instead of copying.
Every shortcut gives exactly the results of the plain computation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from .options import (  # noqa: F401  (this module's API too)
    DEFAULT_LENGTH_PENALTY,
    DEFAULT_NO_REPEAT_NGRAM_SIZE,
    RERANKS,
    STRATEGIES,
    DecodeOptions,
    Hypothesis,
)
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, UNK_ID

NEVER_EMIT = (PAD_ID, BOS_ID, UNK_ID, SEP_ID)
@dataclass
class StepResult:
    finished: list[tuple[Hashable, list[Hypothesis]]]
    reorder: Tensor | None  # rows of the previous state to keep, in order; None: unchanged
    tokens: Tensor  # (R,) the token each row took this step (before reordering)


def length_penalty(length: Tensor | float, alpha: float) -> Tensor | float:
    """GNMT: ((5 + |Y|) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


@functools.lru_cache(maxsize=256)
def _arange(n: int, device: torch.device, step: int = 1) -> Tensor:
    """`arange(0, n * step, step)`, made once per shape: a step needs several and each costs a
    dispatch. Shared, so never modified, and made outside inference mode so that searches run
    with or without it can use it."""
    with torch.inference_mode(False):
        return torch.arange(0, n * step, step, device=device)


@functools.lru_cache(maxsize=16)
def _never_emit(device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        return torch.tensor(NEVER_EMIT, device=device)


def _argmax(x: Tensor) -> Tensor:
    """`x.argmax(-1)`, through NumPy for CPU floats: same indices (the first maximum, or the
    first NaN), but NumPy's SIMD argmax reads a (64, 8000) matrix in ~40 µs where torch's CPU
    argmax takes ~800 µs."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(x.detach().numpy().argmax(-1)).long()  # intp: int32 on some platforms
    return x.argmax(-1)


@functools.lru_cache(maxsize=64)
def _block_size(n: int, k: int) -> int | None:
    """A divisor of n near 200 that leaves at least 4(k+2) blocks, or None (rows too short or
    no such divisor): the block size `_topk` splits a row into."""
    if n < 2048:
        return None
    sizes = [d for d in range(16, n // (4 * (k + 2)) + 1) if n % d == 0]
    return min(sizes, key=lambda d: abs(d - 200), default=None)


def _topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`x.topk(k, dim=1)` (values, indices) for wide CPU rows such as beam candidates (B, K*V).

    torch's CPU topk reads a few ns per element, most of a beam step at B=8. The k+1 best
    values of a row lie in the k+1 blocks with the best maxima when the (k+1)-th value found
    there beats every other block's maximum, so one vectorised amax over blocks and a topk of
    those blocks alone find them. The answer is kept only when it is certain: k+1 distinct
    values (no NaN), the last above every block left out; the top k is then unique and equal
    to torch's. Otherwise (ties, NaN) the plain topk runs, with its own order of ties.
    """
    B, n = x.shape
    bs = _block_size(n, k) if x.device.type == "cpu" and x.is_contiguous() else None
    if bs is None:
        return x.topk(k, dim=1)
    blocks = x.view(B, n // bs, bs)
    best, block = blocks.amax(-1).topk(k + 2, dim=1)  # (B, k+2) block maxima, best first
    chosen = block[:, : k + 1]
    vals, pos = blocks.gather(1, chosen[:, :, None].expand(-1, -1, bs)).view(B, -1).topk(k + 1, dim=1)
    certain = (vals[:, :-1] > vals[:, 1:]).all() & (vals[:, -1] > best[:, -1]).all()
    if not bool(certain):
        return x.topk(k, dim=1)
    return vals[:, :k], (chosen.gather(1, pos[:, :k] // bs) * bs + pos[:, :k] % bs)


def _ngram_repeats(seqs: Tensor, lengths: Tensor, n: int, length: int | None = None
                   ) -> tuple[Tensor, Tensor] | None:
    """Each row's n-gram windows: (R, W) whether the window lies in the generated tokens and
    starts with the row's last n-1 tokens, and (R, W) the token that ends it (the one to ban).
    None when no window fits. Only the first max(lengths) columns of `seqs` are read.

    `length`: every row has this length (a batch that started together), which makes the
    windows and the last tokens plain slices: 5 small ops instead of 15.
    """
    if length is not None:
        if n < 1 or n > length:
            return None
        windows = seqs[:, :length].unfold(1, n, 1)  # (R, W, n): every window is generated
        valid = (windows[:, :, :-1] == seqs[:, None, length - n + 1: length]).all(-1)
        return valid, windows[:, :, -1]
    M = seqs.shape[1]
    if n < 1 or n > M:
        return None
    device = seqs.device
    windows = seqs.unfold(1, n, 1)  # (R, W, n), W = M - n + 1
    valid = _arange(windows.shape[1], device)[None, :] <= (lengths - n)[:, None]  # the window is generated
    if n > 1:
        pos = ((lengths - (n - 1))[:, None] + _arange(n - 1, device)).clamp_(min=0)
        prefix = seqs.gather(1, pos)  # (R, n-1) the last n-1 tokens
        valid &= (windows[:, :, :-1] == prefix[:, None, :]).all(-1)
    return valid, windows[:, :, -1]


def ban_repeated_ngrams(logp: Tensor, seqs: Tensor, lengths: Tensor, n: int) -> None:
    """Forbid (in place) every token that would complete an n-gram already in the row.

    Only the first max(lengths) columns of `seqs` are read, so a caller may pass a narrower
    view (fewer windows). The banned entries are written one by one rather than through an
    (R, V) mask: a few per row against V columns.
    """
    found = _ngram_repeats(seqs, lengths, n)
    if found is None:
        return
    valid, ends = found
    rows, starts = valid.nonzero(as_tuple=True)
    if len(rows):
        logp[rows, ends[rows, starts]] = float("-inf")


class Search:
    """Base: shared bookkeeping for items, rows, lengths and constraints.

    Besides the row tensors, two plain ints bound the row lengths from below and above
    (`_shortest`, `_longest`); they let a step skip work no row needs (the min_length
    ban, n-gram windows, the max_length test) without reading `lengths` back.
    """

    def __init__(self, ids: list[Hashable], opts: DecodeOptions, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> None:
        self.opts = opts
        self.K = opts.rows_per_item
        self.ids = list(ids)
        self.generator = generator
        R = len(self.ids) * self.K
        self.seqs = torch.full((R, opts.max_length), PAD_ID, dtype=torch.long, device=device)
        self.lengths = torch.zeros(R, dtype=torch.long, device=device)
        self.logprob = torch.zeros(R, device=device)
        self._last = torch.full((R,), BOS_ID, dtype=torch.long, device=device)  # the next step's input
        self._shortest = 0  # <= every row's length
        self._longest = 0  # >= every row's length

    @property
    def num_rows(self) -> int:
        return len(self.ids) * self.K

    def __len__(self) -> int:
        return len(self.ids)

    def last_tokens(self) -> Tensor:
        """(R,) the input for the next decoder step: BOS at the start, then each row's last token.

        The search keeps it from the previous step instead of gathering it from `seqs`; the
        tensor is the search's own, so read it, do not modify it.
        """
        return self._last

    def constrain(self, logp: Tensor, *, inplace: bool = False) -> Tensor:
        """The log-probs with what may not be emitted at -inf: the special tokens, n-gram
        repeats, end-of-sequence before min_length. A row with nothing left gets
        end-of-sequence at log-prob 0, as a last resort.

        `inplace=True` writes into `logp` itself (the caller's fresh tensor) instead of a copy.
        """
        if not inplace:
            logp = logp.clone()
        eos_before = self._ban(logp)
        # amax is one vectorised pass; log-probs are never +inf, so -inf max <=> all -inf
        stuck = logp.amax(-1) == float("-inf")
        if eos_before is not None:
            stuck &= eos_before == float("-inf")
        logp[:, EOS_ID].masked_fill_(stuck, 0.0)
        return logp

    def _ban(self, logp: Tensor) -> Tensor | None:
        """The bans of `constrain`, in place, without the last-resort EOS. Returns the EOS column
        from before the min_length ban (a row is stuck only if that was -inf too), or None
        when no row is short enough for the ban."""
        logp.index_fill_(1, _never_emit(logp.device), float("-inf"))
        n = self.opts.no_repeat_ngram_size
        same = self._longest if self._shortest == self._longest else None
        found = _ngram_repeats(self.seqs[:, : self._longest], self.lengths, n, same) if n else None
        if found is not None:  # as ban_repeated_ngrams, in two ops: windows that do not count
            valid, ends = found  # write into the PAD column, which is -inf already
            logp.scatter_(1, torch.where(valid, ends, PAD_ID), float("-inf"))
        if self._shortest + 1 >= self.opts.min_length:
            return None
        eos = logp[:, EOS_ID]
        before = eos.clone()
        eos.masked_fill_(self.lengths + 1 < self.opts.min_length, float("-inf"))
        return before

    def advance(self, logp: Tensor, *, inplace: bool = False) -> StepResult:
        """One step from the model's log-probs (R, V); each strategy defines it."""
        raise NotImplementedError

    def drop(self, ids: Collection[Hashable]) -> Tensor:
        """Remove the items whose ids are in `ids` (cancelled, past a deadline) between steps.

        Returns the index of the rows kept, in order, for the caller to select its recurrent
        state with; ids that are not in the search are ignored.
        """
        device = self.lengths.device
        keep = torch.tensor([i not in ids for i in self.ids], dtype=torch.bool, device=device)
        index = self._keep_items(keep, _arange(self.num_rows, device).view(-1, self.K))
        self._select_rows(index)
        return index

    def _hypothesis(self, tokens: list[int], logprob: float, finished: bool) -> Hypothesis:
        length = len(tokens) + (1 if finished else 0)
        lp = length_penalty(float(max(length, 1)), self.opts.length_penalty)
        return Hypothesis(tokens=tokens, score=logprob / lp, logprob=logprob, finished=finished)

    @classmethod
    def concatenate(cls, searches: list[Search]) -> Search:
        first = searches[0]
        if any(type(s) is not type(first) or s.opts != first.opts for s in searches):
            raise ValueError("only searches of one kind and the same options concatenate")
        out = cls.__new__(cls)
        out.__dict__.update(first.__dict__)
        out.ids = [i for s in searches for i in s.ids]
        for name in first._row_tensors():
            setattr(out, name, torch.cat([getattr(s, name) for s in searches]))
        out._shortest = min(s._shortest for s in searches)
        out._longest = max(s._longest for s in searches)
        return out

    def _row_tensors(self) -> tuple[str, ...]:
        return ("seqs", "lengths", "logprob", "_last")

    def _select_rows(self, index: Tensor) -> None:
        for name in self._row_tensors():
            setattr(self, name, getattr(self, name).index_select(0, index))

    def _keep_items(self, keep: Tensor, row_index: Tensor) -> Tensor:
        """Drop finished items; `row_index` (B, K) maps new rows to previous rows."""
        self.ids = [i for i, k in zip(self.ids, keep.tolist(), strict=True) if k]
        return row_index[keep].reshape(-1)


class GreedySearch(Search):
    """Argmax (or, in SampleSearch, a sample) per row; K independent rows per item."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.done = torch.zeros(self.num_rows, dtype=torch.bool, device=self.seqs.device)

    def _row_tensors(self) -> tuple[str, ...]:
        return (*super()._row_tensors(), "done")

    def _pick(self, logp: Tensor, inplace: bool) -> tuple[Tensor, Tensor]:
        """(R,) tokens and their constrained log-probs.

        Greedy needs no whole constrained matrix: a row is stuck exactly when its best
        log-prob after the bans is -inf, so the last-resort EOS is patched into the argmax
        instead of into the matrix (no separate pass over it).
        """
        if not inplace:
            logp = logp.clone()
        eos_before = self._ban(logp)
        tok = _argmax(logp)
        score = logp.gather(1, tok[:, None])[:, 0]
        stuck = score == float("-inf")
        if eos_before is not None:
            stuck &= eos_before == float("-inf")
        return tok.masked_fill_(stuck, EOS_ID), score.masked_fill_(stuck, 0.0)

    def advance(self, logp: Tensor, *, inplace: bool = False) -> StepResult:
        """Take one token per row. `inplace=True`: `logp` is the caller's to give away and is
        overwritten (the bans), which saves copying it."""
        tok, score = self._pick(logp, inplace)
        max_len = self.opts.max_length
        self._longest += 1
        if self.K == 1:
            # A finished row ends its item, which leaves at once: every row here is live.
            self.seqs.scatter_(1, self.lengths[:, None], tok[:, None])
            self.logprob += score
            self.lengths += 1
            self._shortest += 1
            self._last = tok
            item_done = tok == EOS_ID
            if self._longest >= max_len:
                item_done |= self.lengths >= max_len
        else:
            tok = torch.where(self.done, PAD_ID, tok)
            live = ~self.done
            self.logprob += torch.where(live, score, 0.0)
            rows = _arange(self.num_rows, tok.device)
            write = self.lengths.clamp(max=max_len - 1)
            self.seqs[rows[live], write[live]] = tok[live]
            self.lengths += live.long()
            self.done |= live & ((tok == EOS_ID) | (self.lengths >= max_len))
            self._last = torch.where(live, tok, self._last)
            item_done = self.done.view(-1, self.K).all(-1)  # (B,)
        if not bool(item_done.any()):
            return StepResult(finished=[], reorder=None, tokens=tok)
        return StepResult(finished=self._finished(item_done), reorder=self._drop_done(item_done), tokens=tok)

    def _finished(self, item_done: Tensor) -> list[tuple[Hashable, list[Hypothesis]]]:
        K = self.K
        items = item_done.nonzero()[:, 0].tolist()
        rows = [r for b in items for r in range(b * K, (b + 1) * K)]
        index = torch.tensor(rows, device=self.seqs.device)
        seqs = self.seqs.index_select(0, index).tolist()
        lengths = self.lengths.index_select(0, index).tolist()
        logprobs = self.logprob.index_select(0, index).tolist()
        finished = []
        for i, b in enumerate(items):
            hyps = []
            for j in range(i * K, (i + 1) * K):
                n = lengths[j]
                seq = seqs[j][:n]
                ended = bool(n and seq[-1] == EOS_ID)
                hyps.append(self._hypothesis(seq[:-1] if ended else seq, logprobs[j], ended))
            finished.append((self.ids[b], hyps))  # samples in the order drawn (model/rerank.py orders)
        return finished

    def _drop_done(self, item_done: Tensor) -> Tensor:
        index = self._keep_items(~item_done, _arange(self.num_rows, item_done.device).view(-1, self.K))
        self._select_rows(index)
        return index


class SampleSearch(GreedySearch):
    """Temperature and nucleus (top-p) sampling."""

    def _pick(self, logp: Tensor, inplace: bool) -> tuple[Tensor, Tensor]:
        logp = self.constrain(logp, inplace=inplace)
        tok = self.choose(logp)
        return tok, logp.gather(1, tok[:, None])[:, 0]

    def choose(self, logp: Tensor) -> Tensor:
        t = self.opts.temperature
        probs = torch.softmax(logp if t == 1.0 else logp / t, dim=-1)  # x / 1.0 == x
        if self.opts.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1).sub_(sorted_p)  # mass of the tokens ranked above
            sorted_p.masked_fill_(before >= self.opts.top_p, 0.0)
            probs.scatter_(1, order, sorted_p)  # order is a permutation: every entry is rewritten
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


class BeamSearch(Search):
    """Beam search over K beams per item, one tensor computation per step.

    Each step takes the top 2K of the K*V continuations of every item: those ending
    in end-of-sequence among the first K are finished, the best K others go on (so an
    item always keeps K live beams). An item is done when it has K finished
    hypotheses, reaches max_length, or (`early_stopping`, the default) is settled: it has
    n_best finished hypotheses and the n_best-th best of them scores at least as well as
    its best live beam would if it ended at the next step (live log-prob / length penalty
    at its length + 1). Log-probs only fall, so with no length penalty (alpha 0) no live
    beam could ever beat a settled item's n_best and the rule is exact; with alpha > 0 a
    much longer ending could still win through the penalty's bonus, which the rule
    accepts (Hugging Face's `early_stopping=False` heuristic; the shipped model's default
    reply was the same on 58 of 60 dev prompts, in about half the steps). Every finished
    hypothesis an item has (up to K, by GNMT-normalised score, best first) is returned,
    so a reply filter has the others to fall back on. The K beams of an item always have
    the same length.
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        B, K = len(self.ids), self.K
        # Only the first beam is live at the start, so the K beams do not all copy it.
        self.logprob = torch.zeros(B, K, device=self.seqs.device)
        self.logprob[:, 1:] = float("-inf")
        self.logprob = self.logprob.view(-1)
        self.results: dict[Hashable, list[Hypothesis]] = {i: [] for i in self.ids}
        # Items with n_best finished: the n_best-th best score, which a live beam must beat.
        self.settled: dict[Hashable, float] = {}

    @classmethod
    def concatenate(cls, searches: list[Search]) -> Search:
        out = super().concatenate(searches)
        assert isinstance(out, BeamSearch)
        out.results = {k: v for s in searches for k, v in s.results.items()}  # type: ignore[attr-defined]
        out.settled = {k: v for s in searches for k, v in s.settled.items()}  # type: ignore[attr-defined]
        return out

    def drop(self, ids: Collection[Hashable]) -> Tensor:
        """As `Search.drop`; the removed items' finished hypotheses are forgotten too."""
        index = super().drop(ids)
        for i in ids:
            self.results.pop(i, None)
            self.settled.pop(i, None)
        return index

    def advance(self, logp: Tensor, *, inplace: bool = False) -> StepResult:
        """One step for every item. `inplace=True`: `logp` is the caller's to give away and is
        overwritten (the bans, then the candidate scores), which saves copying it."""
        B, K = len(self.ids), self.K
        V = logp.shape[1]
        device = logp.device
        max_len = self.opts.max_length
        cand = self.constrain(logp, inplace=inplace)
        cand = cand.add_(self.logprob[:, None]).reshape(B, K * V)  # (B, K*V)
        n_cand = min(2 * K, K * V)
        top_s, top_i = _topk(cand, n_cand)  # (B, 2K), best first
        beam, tok = top_i // V, top_i % V
        is_eos = tok == EOS_ID
        first_row = _arange(B, device, K)[:, None]  # (B, 1) each item's first row
        # Of the first K candidates, those ending in EOS (or at max_length) are finished.
        at_max = None
        ends = is_eos[:, :K]
        if self._longest + 1 >= max_len:
            at_max = self.lengths.view(B, K)[:, 0] + 1 >= max_len  # (B,)
            ends = ends | at_max[:, None]
        finalize = (top_s[:, :K] > float("-inf")) & ends  # isfinite in one op: log-probs are never +inf
        finalized = bool(finalize.any())
        if finalized:
            self._finalize(finalize, first_row + beam[:, :K], tok, top_s)
        # The K best candidates that do not end here continue.
        rank = _arange(n_cand, device)
        order = torch.where(is_eos, rank + n_cand, rank).topk(K, dim=1, largest=False).indices  # (B, K)
        sel_tok = tok.gather(1, order).reshape(-1)
        sel_s = top_s.gather(1, order)
        flat_rows = (first_row + beam.gather(1, order)).reshape(-1)
        self.seqs = self.seqs.index_select(0, flat_rows)  # beams move within an item: lengths stay
        self.seqs.scatter_(1, self.lengths[:, None], sel_tok[:, None])
        self.lengths = self.lengths + 1
        self.logprob = sel_s.reshape(-1)
        self._last = sel_tok
        self._shortest += 1
        self._longest += 1
        # sel_s is sorted best first: an item has no live beam left when its first is -inf.
        item_done = sel_s[:, 0] == float("-inf")
        if at_max is not None:
            item_done |= at_max
        if finalized:  # only now can an item have reached K finished hypotheses
            counts = torch.tensor([len(self.results[i]) for i in self.ids], device=device)
            item_done |= counts >= K
        if self.settled and self.opts.early_stopping:
            item_done |= self._settled_beyond_reach(sel_s[:, 0])
        done = item_done.nonzero()[:, 0].tolist()
        if not done:
            return StepResult(finished=[], reorder=flat_rows, tokens=sel_tok)
        finished = []
        for b in done:
            self.settled.pop(self.ids[b], None)
            hyps = sorted(self.results.pop(self.ids[b]), key=lambda h: h.score, reverse=True)
            finished.append((self.ids[b], hyps[:K]))
        kept = self._keep_items(~item_done, _arange(B * K, device).view(B, K))
        self._select_rows(kept)
        return StepResult(finished=finished, reorder=flat_rows.index_select(0, kept), tokens=sel_tok)

    def _finalize(self, finalize: Tensor, src_rows: Tensor, tok: Tensor, top_s: Tensor) -> None:
        """Record the finishing candidates (B, K mask), reading what they need back in one go."""
        pairs = finalize.nonzero().tolist()
        src, toks, scores = src_rows.tolist(), tok.tolist(), top_s.tolist()
        rows = [src[b][j] for b, j in pairs]
        index = torch.tensor(rows, device=self.seqs.device)
        seqs = self.seqs.index_select(0, index).tolist()
        lengths = self.lengths.index_select(0, index).tolist()
        for (b, j), seq, n in zip(pairs, seqs, lengths, strict=True):
            seq = seq[:n]
            ended = toks[b][j] == EOS_ID
            if not ended:
                seq.append(toks[b][j])
            self.results[self.ids[b]].append(self._hypothesis(seq, scores[b][j], ended))
        n = self.opts.n_best
        for b in {b for b, _ in pairs}:
            found = self.results[self.ids[b]]
            if len(found) >= n:
                self.settled[self.ids[b]] = sorted((h.score for h in found), reverse=True)[n - 1]

    def _settled_beyond_reach(self, best_live: Tensor) -> Tensor:
        """(B,) items whose n_best-th finished score is at least what their best live beam
        (log-prob `best_live`, (B,)) would score ending at the next step."""
        B, K = len(self.ids), self.K
        next_length = (self.lengths.view(B, K)[:, 0] + 1).to(best_live.dtype)
        reach = best_live / length_penalty(next_length, self.opts.length_penalty)
        need = torch.tensor([self.settled.get(i, float("-inf")) for i in self.ids], device=best_live.device)
        return need >= reach


def make_search(ids: list[Hashable], opts: DecodeOptions, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> Search:
    cls = {"greedy": GreedySearch, "beam": BeamSearch, "sample": SampleSearch}[opts.strategy]
    return cls(ids, opts, device=device, generator=generator)


State = TypeVar("State")
# One decoder step over any recurrent state: tokens (R,), state of R rows -> log-probs (R, V) and
# the new state. model.inference.RowStepFn is this over DecoderRows, the state the model's steps use.
SearchStepFn = Callable[[Tensor, State], tuple[Tensor, State]]


def decode(step: SearchStepFn[State], state: State, select: Callable[[State, Tensor], State],
           batch_size: int, opts: DecodeOptions, device: torch.device | str = "cpu",
           generator: torch.Generator | None = None, *, inplace: bool = False) -> list[list[Hypothesis]]:
    """Run a search to the end over a generic step function.

    `state` holds one row per item; it is expanded to K rows per item here and
    reordered with `select(state, index)` after every step. `inplace=True` promises
    that `step` returns a fresh log-prob tensor each time, which the search may then
    overwrite instead of copying (see `advance`).
    """
    search = make_search(list(range(batch_size)), opts, device=device, generator=generator)
    K = search.K
    if K > 1:
        state = select(state, torch.arange(batch_size, device=device).repeat_interleave(K))
    results: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
    while len(search):
        logp, state = step(search.last_tokens(), state)
        res = search.advance(logp, inplace=inplace)  # type: ignore[attr-defined]
        for i, hyps in res.finished:
            results[i] = hyps  # type: ignore[index]
        if res.reorder is not None and len(search):
            state = select(state, res.reorder)
    return results
