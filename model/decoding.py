"""Decoding: greedy, batched beam search and sampling as step-by-step search states.

A search owns the hypotheses of a batch of items (each with K rows: K beams, K
samples, or 1 for greedy) as flat `(B*K, ...)` tensors and advances them one step
at a time from the model's log-probs. `advance` returns the finished items and the
row index the caller uses to reorder (and shrink) the recurrent state, so the
server's engine can run many searches side by side, add items between steps
(`concatenate`) and drop finished ones at once.

Every row keeps its own length, so items that started at different steps can share
a search: decoding an item in a batch gives the same result as decoding it alone.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, UNK_ID

NEVER_EMIT = (PAD_ID, BOS_ID, UNK_ID, SEP_ID)
STRATEGIES = ("greedy", "beam", "sample")


@dataclass(frozen=True)
class DecodeOptions:
    strategy: str = "greedy"
    beam_size: int = 4
    n_best: int = 1  # beam: how many finished hypotheses to return; sample: how many samples
    max_length: int = 40
    min_length: int = 1
    length_penalty: float = 0.6  # GNMT alpha; 0 disables
    no_repeat_ngram_size: int = 0
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.beam_size < 1 or self.n_best < 1 or self.max_length < 1:
            raise ValueError("beam_size, n_best and max_length must be >= 1")
        if self.strategy == "beam" and self.n_best > self.beam_size:
            raise ValueError("n_best must be <= beam_size")
        if self.min_length < 0 or self.min_length > self.max_length:
            raise ValueError("min_length must be in [0, max_length]")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")

    @property
    def rows_per_item(self) -> int:
        if self.strategy == "beam":
            return self.beam_size
        return self.n_best if self.strategy == "sample" else 1


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, without the end-of-sequence token
    score: float  # log-probability divided by the GNMT length penalty
    logprob: float
    finished: bool = True  # False when cut at max_length


@dataclass
class StepResult:
    finished: list[tuple[Hashable, list[Hypothesis]]]
    reorder: Tensor | None  # rows of the previous state to keep, in order; None: unchanged
    tokens: Tensor  # (R,) the token each row took this step (before reordering)


def length_penalty(length: Tensor | float, alpha: float) -> Tensor | float:
    """GNMT: ((5 + |Y|) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def ban_repeated_ngrams(logp: Tensor, seqs: Tensor, lengths: Tensor, n: int) -> None:
    """Forbid (in place) every token that would complete an n-gram already in the row."""
    R, M = seqs.shape
    V = logp.shape[1]
    if n < 1 or n > M:
        return
    windows = seqs.unfold(1, n, 1)  # (R, W, n), W = M - n + 1
    starts = torch.arange(windows.shape[1], device=seqs.device)
    valid = starts[None, :] <= (lengths[:, None] - n)  # the whole window is generated
    if n > 1:
        pos = (lengths[:, None] - (n - 1) + torch.arange(n - 1, device=seqs.device)).clamp(min=0)
        prefix = seqs.gather(1, pos)  # (R, n-1) the last n-1 tokens
        valid &= (windows[:, :, :-1] == prefix[:, None, :]).all(-1)
    banned = torch.where(valid, windows[:, :, -1], V)  # V is a dummy column
    hits = logp.new_zeros(R, V + 1).scatter_(1, banned, 1.0)[:, :V] > 0
    logp.masked_fill_(hits, float("-inf"))


class Search:
    """Base: shared bookkeeping for items, rows, lengths and constraints."""

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

    @property
    def num_rows(self) -> int:
        return len(self.ids) * self.K

    def __len__(self) -> int:
        return len(self.ids)

    def last_tokens(self) -> Tensor:
        """(R,) the input for the next decoder step: BOS at the start."""
        prev = self.seqs.gather(1, (self.lengths - 1).clamp(min=0)[:, None])[:, 0]
        return torch.where(self.lengths == 0, torch.full_like(prev, BOS_ID), prev)

    def constrain(self, logp: Tensor) -> Tensor:
        logp = logp.clone()
        logp[:, list(NEVER_EMIT)] = float("-inf")
        if self.opts.no_repeat_ngram_size:
            ban_repeated_ngrams(logp, self.seqs, self.lengths, self.opts.no_repeat_ngram_size)
        # end-of-sequence is forbidden before min_length, but always allowed as a last resort
        stuck = torch.isinf(logp).all(-1)
        too_short = (self.lengths + 1 < self.opts.min_length) & ~stuck
        logp[:, EOS_ID] = torch.where(too_short, float("-inf"), torch.where(
            stuck, 0.0, logp[:, EOS_ID]))
        return logp

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
        return out

    def _row_tensors(self) -> tuple[str, ...]:
        return ("seqs", "lengths", "logprob")

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

    def choose(self, logp: Tensor) -> Tensor:
        return logp.argmax(-1)

    def advance(self, logp: Tensor) -> StepResult:
        logp = self.constrain(logp)
        tok = self.choose(logp)  # (R,)
        tok = torch.where(self.done, PAD_ID, tok)
        live = ~self.done
        self.logprob += torch.where(live, logp.gather(1, tok[:, None])[:, 0], 0.0)
        rows = torch.arange(self.num_rows, device=tok.device)
        write = self.lengths.clamp(max=self.opts.max_length - 1)
        self.seqs[rows[live], write[live]] = tok[live]
        self.lengths += live.long()
        self.done |= live & ((tok == EOS_ID) | (self.lengths >= self.opts.max_length))
        item_done = self.done.view(-1, self.K).all(-1)  # (B,)
        if not bool(item_done.any()):
            return StepResult(finished=[], reorder=None, tokens=tok)
        finished = []
        for b in item_done.nonzero()[:, 0].tolist():
            hyps = []
            for r in range(b * self.K, (b + 1) * self.K):
                n = int(self.lengths[r])
                seq = self.seqs[r, :n].tolist()
                ended = bool(n and seq[-1] == EOS_ID)
                hyps.append(self._hypothesis(seq[:-1] if ended else seq, float(self.logprob[r]), ended))
            hyps.sort(key=lambda h: h.score, reverse=True)
            finished.append((self.ids[b], hyps))
        keep = ~item_done
        reorder = self._keep_items(keep, rows.view(-1, self.K))
        for name in self._row_tensors():
            setattr(self, name, getattr(self, name).index_select(0, reorder))
        return StepResult(finished=finished, reorder=reorder, tokens=tok)


class SampleSearch(GreedySearch):
    """Temperature and nucleus (top-p) sampling."""

    def choose(self, logp: Tensor) -> Tensor:
        probs = torch.softmax(logp / self.opts.temperature, dim=-1)
        if self.opts.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above
            sorted_p = sorted_p.masked_fill(before >= self.opts.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


class BeamSearch(Search):
    """Beam search over K beams per item, one tensor computation per step.

    Each step takes the top 2K of the K*V continuations of every item: those ending
    in end-of-sequence among the first K are finished, the best K others go on (so an
    item always keeps K live beams). An item is done when it has K finished
    hypotheses or reaches max_length; its n_best best (by GNMT-normalised score) are
    returned, best first.
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        B, K = len(self.ids), self.K
        # Only the first beam is live at the start, so the K beams do not all copy it.
        self.logprob = torch.zeros(B, K, device=self.seqs.device)
        self.logprob[:, 1:] = float("-inf")
        self.logprob = self.logprob.view(-1)
        self.results: dict[Hashable, list[Hypothesis]] = {i: [] for i in self.ids}

    @classmethod
    def concatenate(cls, searches: list[Search]) -> Search:
        out = super().concatenate(searches)
        assert isinstance(out, BeamSearch)
        out.results = {k: v for s in searches for k, v in s.results.items()}  # type: ignore[attr-defined]
        return out

    def advance(self, logp: Tensor) -> StepResult:
        B, K = len(self.ids), self.K
        V = logp.shape[1]
        logp = self.constrain(logp)
        cand = (self.logprob[:, None] + logp).view(B, K * V)  # (B, K*V)
        n_cand = min(2 * K, K * V)
        top_s, top_i = cand.topk(n_cand, dim=1)  # (B, 2K), best first
        beam, tok = top_i // V, top_i % V
        rank = torch.arange(n_cand, device=logp.device)[None, :].expand(B, -1)
        item_len = self.lengths.view(B, K)[:, 0] + 1  # (B,) length after this step
        at_max = item_len >= self.opts.max_length
        is_eos = tok == EOS_ID
        finalize = (rank < K) & torch.isfinite(top_s) & (is_eos | at_max[:, None])
        src_rows = torch.arange(B, device=logp.device)[:, None] * K + beam  # (B, 2K)
        if bool(finalize.any()):
            self._finalize(finalize, src_rows, tok, top_s, is_eos)
        # The K best candidates that do not end here continue.
        order = (rank + is_eos.long() * n_cand).topk(K, dim=1, largest=False).indices  # (B, K)
        sel_rows = src_rows.gather(1, order)
        sel_tok = tok.gather(1, order)
        sel_s = top_s.gather(1, order)
        flat_rows = sel_rows.reshape(-1)
        self.seqs = self.seqs.index_select(0, flat_rows)
        self.lengths = self.lengths.index_select(0, flat_rows)
        write = self.lengths.clamp(max=self.opts.max_length - 1)
        self.seqs[torch.arange(B * K, device=logp.device), write] = sel_tok.reshape(-1)
        self.lengths += 1
        self.logprob = sel_s.reshape(-1)
        counts = torch.tensor([len(self.results[i]) for i in self.ids], device=logp.device)
        item_done = at_max | (counts >= K) | torch.isinf(sel_s).all(-1)
        finished = []
        for b in item_done.nonzero()[:, 0].tolist():
            hyps = sorted(self.results.pop(self.ids[b]), key=lambda h: h.score, reverse=True)
            finished.append((self.ids[b], hyps[: self.opts.n_best]))
        reorder = flat_rows
        if finished:
            keep = ~item_done
            new_rows = torch.arange(B * K, device=logp.device).view(B, K)
            kept = self._keep_items(keep, new_rows)
            for name in self._row_tensors():
                setattr(self, name, getattr(self, name).index_select(0, kept))
            reorder = flat_rows.index_select(0, kept)
        return StepResult(finished=finished, reorder=reorder, tokens=sel_tok.reshape(-1))

    def _finalize(self, finalize: Tensor, src_rows: Tensor, tok: Tensor, top_s: Tensor,
                  is_eos: Tensor) -> None:
        for b, j in finalize.nonzero().tolist():
            r = int(src_rows[b, j])
            seq = self.seqs[r, : int(self.lengths[r])].tolist()
            ended = bool(is_eos[b, j])
            if not ended:
                seq.append(int(tok[b, j]))
            self.results[self.ids[b]].append(self._hypothesis(seq, float(top_s[b, j]), ended))


def make_search(ids: list[Hashable], opts: DecodeOptions, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> Search:
    cls = {"greedy": GreedySearch, "beam": BeamSearch, "sample": SampleSearch}[opts.strategy]
    return cls(ids, opts, device=device, generator=generator)


StepFn = Callable[[Tensor, object], tuple[Tensor, object]]


def decode(step: StepFn, state: object, select: Callable[[object, Tensor], object],
           batch_size: int, opts: DecodeOptions, device: torch.device | str = "cpu",
           generator: torch.Generator | None = None) -> list[list[Hypothesis]]:
    """Run a search to the end over a generic step function.

    `state` holds one row per item; it is expanded to K rows per item here and
    reordered with `select(state, index)` after every step.
    """
    search = make_search(list(range(batch_size)), opts, device=device, generator=generator)
    K = search.K
    if K > 1:
        state = select(state, torch.arange(batch_size, device=device).repeat_interleave(K))
    results: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
    while len(search):
        logp, state = step(search.last_tokens(), state)
        res = search.advance(logp)
        for i, hyps in res.finished:
            results[i] = hyps  # type: ignore[index]
        if res.reorder is not None and len(search):
            state = select(state, res.reorder)
    return results
