"""The server's default engine (built from settings) runs the fused decoder step and
answers exactly as the reference decoding path does."""

from __future__ import annotations

import asyncio

import pytest

from app.main import create_app
from model.checkpoint import load_checkpoint
from model.decoding import DecodeOptions
from model.inference import decode_sources
from tests.api.conftest import make_settings, serving

pytestmark = pytest.mark.anyio

PROMPTS = ["hello", "do you like cats", "what is your name", "good night", "see you later"]


@pytest.mark.parametrize("fast", [True, False])
async def test_built_engine_replies_equal_the_reference_decoder(tiny_checkpoint, fast) -> None:
    ck = load_checkpoint(tiny_checkpoint)
    K = ck.model.cfg.max_source_len
    want = {}
    for strategy in ("greedy", "beam"):
        opts = DecodeOptions(strategy=strategy, beam_size=4, n_best=1, max_length=20,
                             no_repeat_ngram_size=3)
        hyps = decode_sources(ck.model, [ck.tokenizer.encode_context([p], K) for p in PROMPTS], opts)
        want[strategy] = [ck.tokenizer.decode(h[0].tokens) for h in hyps]
    app = create_app(make_settings(tiny_checkpoint, fast_decoder=fast))
    async with serving(app) as client:
        for strategy in ("greedy", "beam"):
            bodies = [{"message": p, "strategy": strategy, "beam_size": 4, "max_length": 20,
                       "no_repeat_ngram_size": 3} for p in PROMPTS]
            answers = await asyncio.gather(*(client.post("/api/chat", json=b) for b in bodies))
            assert [r.status_code for r in answers] == [200] * len(PROMPTS)
            assert [r.json()["reply"] for r in answers] == want[strategy], strategy
