"""RunningBatch: continuous batching gives what decode_sources gives each request alone."""

from __future__ import annotations

import torch

from app.batching import BatchItem, RunningBatch
from model.checkpoint import Checkpoint
from model.decoding import DecodeOptions
from model.inference import decode_sources

from .conftest import PROMPTS

GREEDY = DecodeOptions(strategy="greedy", max_length=12)
GREEDY_SHORT = DecodeOptions(strategy="greedy", max_length=5, no_repeat_ngram_size=2)
BEAM = DecodeOptions(strategy="beam", beam_size=4, n_best=4, max_length=12, no_repeat_ngram_size=3)


def _source(ckpt: Checkpoint, text: str) -> list[int]:
    return ckpt.tokenizer.encode_context([text], ckpt.model.cfg.max_source_len)


def _alone(ckpt: Checkpoint, src: list[int], opts: DecodeOptions) -> list[list[int]]:
    return [h.tokens for h in decode_sources(ckpt.model, [src], opts)[0]]


@torch.inference_mode()
def test_items_joining_at_different_steps_decode_as_if_alone(ckpt: Checkpoint) -> None:
    batch = RunningBatch(ckpt.model)
    plan = {0: [(0, GREEDY), (1, BEAM)], 1: [(2, GREEDY), (3, GREEDY_SHORT)], 3: [(4, BEAM), (5, GREEDY)],
            4: [(6, GREEDY_SHORT), (7, BEAM)]}
    got: dict[int, list[list[int]]] = {}
    step = 0
    while step < 5 or len(batch):
        joining = plan.get(step, [])
        batch.add([BatchItem(id=i, source=_source(ckpt, PROMPTS[i]), opts=o) for i, o in joining])
        if len(batch):
            out = batch.step()
            got.update({i: [h.tokens for h in hyps] for i, hyps in out.finished})  # type: ignore[misc]
        step += 1
    assert batch.rows is None and batch.num_rows == 0
    for joining in plan.values():
        for i, opts in joining:
            assert got[i] == _alone(ckpt, _source(ckpt, PROMPTS[i]), opts), (i, opts)


@torch.inference_mode()
def test_dropped_items_leave_and_the_others_are_unchanged(ckpt: Checkpoint) -> None:
    batch = RunningBatch(ckpt.model)
    items = [BatchItem(id=i, source=_source(ckpt, PROMPTS[i]), opts=BEAM if i % 2 else GREEDY)
             for i in range(6)]
    batch.add(items)
    batch.step()
    rows_before = batch.num_rows
    batch.drop({1, 2})
    assert 1 not in batch and 2 not in batch
    assert batch.num_rows == rows_before - BEAM.beam_size - 1
    assert batch.rows is not None and batch.rows.state[0].shape[1] == batch.num_rows
    got = {}
    while len(batch):
        got.update({i: [h.tokens for h in hyps] for i, hyps in batch.step().finished})
    assert set(got) == {0, 3, 4, 5}
    for i in got:
        assert got[i] == _alone(ckpt, items[i].source, items[i].opts)


@torch.inference_mode()
def test_streamed_items_report_each_token_of_their_reply(ckpt: Checkpoint) -> None:
    batch = RunningBatch(ckpt.model)
    batch.add([BatchItem(id="s", source=_source(ckpt, "hello"), opts=GREEDY, stream=True),
               BatchItem(id="b", source=_source(ckpt, "hi"), opts=BEAM, stream=True)])
    streamed: dict[str, list[int]] = {"s": [], "b": []}
    final = {}
    while len(batch):
        out = batch.step()
        for i, tok in out.tokens:
            streamed[i].append(tok)  # type: ignore[index]
        final.update(dict(out.finished))
    assert streamed["s"] == final["s"][0].tokens and streamed["s"]
    assert streamed["b"] == []  # beams reorder: nothing to stream before the end


@torch.inference_mode()
def test_the_step_function_is_a_seam(ckpt: Checkpoint) -> None:
    from app.batching import default_step

    calls = []
    base = default_step(ckpt.model)

    def counting(tokens, rows):  # type: ignore[no-untyped-def]
        calls.append(tokens.shape[0])
        return base(tokens, rows)

    batch = RunningBatch(ckpt.model, step=counting)
    batch.add([BatchItem(id=i, source=_source(ckpt, p), opts=GREEDY) for i, p in enumerate(PROMPTS[:3])])
    while len(batch):
        batch.step()
    assert calls and calls[0] == 3 and all(r <= 3 for r in calls)


@torch.inference_mode()
def test_beam_steps_move_the_state_not_the_encoder_output(ckpt: Checkpoint) -> None:
    """While no item finishes, a beam step only reorders beams within items: the encoder
    output (the same for every beam of an item) stays where it is, and results stay exact."""
    long_beam = DecodeOptions(strategy="beam", beam_size=4, n_best=4, max_length=12, min_length=12)
    batch = RunningBatch(ckpt.model)
    sources = [_source(ckpt, p) for p in PROMPTS[:2]]
    batch.add([BatchItem(id=i, source=s, opts=long_beam) for i, s in enumerate(sources)])
    enc = batch.rows.enc if batch.rows is not None else None
    results = {}
    for _ in range(11):  # min_length 12: nobody finishes before step 12
        out = batch.step()
        assert not out.finished
        assert batch.rows is not None and batch.rows.enc is enc
    while len(batch):
        for item_id, hyps in batch.step().finished:
            results[item_id] = [h.tokens for h in hyps]
    for i, src in enumerate(sources):
        assert results[i] == _alone(ckpt, src, long_beam)
