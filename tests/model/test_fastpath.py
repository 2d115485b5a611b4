"""The fast decoder step computes what the reference step computes, and int8 stays close to it."""

from __future__ import annotations

import pytest
import torch

import model.fastpath
from model.checkpoint import load_checkpoint
from model.decoding import DecodeOptions
from model.fastpath import Bf16Linear, DenseLinear, FastDecoder, fast_encoder_wins, make_step
from model.inference import DecoderRows, decode_sources, encode_sources, step_rows
from model.network import Seq2Seq
from model.precision import cpu_bf16_native
from model.quantize import Int8Linear, quantize_dynamic_int8
from model.tokenizer import BOS_ID

from .conftest import random_model

SOURCES = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19], [20]]
PROMPTS = [["hello"], ["how are you"], ["what is your name"], ["do you like cats"], ["good night"],
           ["hi", "hello nice day", "do you like music"]]

pytestmark = pytest.mark.usefixtures("one_thread")


def run_both(model: Seq2Seq, fast: FastDecoder, rows: DecoderRows, steps: int = 6,
             seed: int = 0) -> None:
    """Feed both steps the same (random) tokens for a few steps and compare everything."""
    gen = torch.Generator().manual_seed(seed)
    R = rows.state[0].shape[1]
    tokens = torch.full((R,), BOS_ID)
    ref_rows, fast_rows = rows, rows
    with torch.inference_mode():
        for _ in range(steps):
            ref_logp, ref_rows = step_rows(model, tokens, ref_rows)
            fast_logp, fast_rows = fast.step(tokens, fast_rows)
            assert fast_logp.shape == (R, model.cfg.vocab_size)
            assert torch.allclose(fast_logp, ref_logp, atol=1e-5, rtol=0)
            for ref_t, fast_t in zip(ref_rows.state, fast_rows.state, strict=True):
                assert torch.allclose(fast_t, ref_t, atol=1e-5, rtol=0)
            tokens = torch.randint(4, model.cfg.vocab_size, (R,), generator=gen)


def hyp_tokens(results: list) -> list[list[list[int]]]:
    return [[h.tokens for h in hyps] for hyps in results]


@pytest.mark.parametrize("overrides", [
    {},  # tied output with a bottleneck (E != H)
    {"embedding_dim": 32},  # tied, E == H: no bottleneck
    {"tie_embeddings": False},
    {"num_layers": 1},
    {"num_layers": 3, "embedding_dim": 40},
])
def test_step_matches_the_reference_step_on_random_models(overrides) -> None:
    model = random_model(1, **overrides)
    run_both(model, FastDecoder(model), encode_sources(model, SOURCES))


def test_step_matches_on_rows_joined_from_batches_with_different_source_lengths() -> None:
    model = random_model(2)
    a = encode_sources(model, SOURCES[:2])
    b = encode_sources(model, [[30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]])
    joined = DecoderRows.concatenate([a, b.index_select(torch.tensor([0, 0, 0]))])  # padded memory
    run_both(model, FastDecoder(model), joined)


@pytest.mark.parametrize("opts", [
    DecodeOptions(strategy="greedy", max_length=12),
    DecodeOptions(strategy="beam", beam_size=5, n_best=3, max_length=12),
    DecodeOptions(strategy="beam", beam_size=3, max_length=10, no_repeat_ngram_size=2, min_length=3),
])
def test_searches_give_identical_results_on_random_models(opts) -> None:
    for seed in (3, 4):
        model = random_model(seed)
        ref = decode_sources(model, SOURCES, opts)
        fast = FastDecoder(model).decode_sources(SOURCES, opts)
        assert hyp_tokens(fast) == hyp_tokens(ref)
        for r, f in zip(ref, fast, strict=True):
            assert [h.score for h in f] == pytest.approx([h.score for h in r], abs=1e-4)


def test_sampling_with_the_same_seed_gives_the_same_samples() -> None:
    model = random_model(5)
    opts = DecodeOptions(strategy="sample", n_best=2, max_length=10, temperature=0.8, top_p=0.9)
    ref = decode_sources(model, SOURCES, opts, generator=torch.Generator().manual_seed(11))
    fast = FastDecoder(model).decode_sources(SOURCES, opts, generator=torch.Generator().manual_seed(11))
    assert hyp_tokens(fast) == hyp_tokens(ref)


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    sources = [ckpt.tokenizer.encode_context(p, ckpt.model.cfg.max_source_len) for p in PROMPTS]
    return ckpt, sources


@pytest.mark.parametrize("opts", [
    DecodeOptions(strategy="greedy", max_length=16),
    DecodeOptions(strategy="beam", beam_size=5, n_best=5, max_length=16),
    DecodeOptions(strategy="beam", beam_size=4, n_best=2, max_length=16, no_repeat_ngram_size=3),
])
def test_the_trained_tiny_checkpoint_gives_identical_replies(trained, opts) -> None:
    ckpt, sources = trained
    ref = decode_sources(ckpt.model, sources, opts)
    fast = FastDecoder(ckpt.model).decode_sources(sources, opts)
    assert hyp_tokens(fast) == hyp_tokens(ref)
    assert any(h.finished for hyps in ref for h in hyps)  # a trained model: replies end by themselves
    run_both(ckpt.model, FastDecoder(ckpt.model), encode_sources(ckpt.model, sources))


def test_make_step_has_the_step_rows_contract_and_leaves_its_input_alone(trained) -> None:
    ckpt, sources = trained
    step = make_step(ckpt.model)
    rows = encode_sources(ckpt.model, sources)
    before = [t.clone() for t in rows.state]
    tokens = torch.full((len(sources),), BOS_ID)
    logp, new_rows = step(tokens, rows)  # outside inference mode: the step enters it itself
    assert logp.shape == (len(sources), ckpt.model.cfg.vocab_size)
    assert torch.allclose(logp.exp().sum(1), torch.ones(len(sources)), atol=1e-4)
    assert new_rows.enc is rows.enc
    assert all(torch.equal(a, b) for a, b in zip(before, rows.state, strict=True))
    assert not torch.equal(new_rows.state[0], rows.state[0])


def test_select_moves_only_the_state_on_a_reorder_and_everything_when_rows_shrink() -> None:
    model = random_model(6)
    rows = encode_sources(model, SOURCES[:2]).index_select(torch.tensor([0, 0, 1, 1]))
    permuted = FastDecoder.select(rows, torch.tensor([1, 0, 3, 3]))
    assert permuted.enc is rows.enc
    assert torch.equal(permuted.state[0], rows.state[0][:, [1, 0, 3, 3]])
    shrunk = FastDecoder.select(rows, torch.tensor([2, 3]))
    assert shrunk.enc.memory.shape[0] == 2
    assert torch.equal(shrunk.enc.memory, rows.enc.memory[2:])
    assert torch.equal(shrunk.state[1], rows.state[1][:, 2:])


def test_encode_never_applies_dropout_and_restores_the_mode() -> None:
    model = random_model(7, dropout=0.5).train()
    rows = FastDecoder(model).encode(SOURCES)
    assert model.training
    model.eval()
    # the fused float32 encoder equals the model's to rounding; dropout 0.5 would be far off
    assert torch.allclose(rows.enc.memory, encode_sources(model, SOURCES).enc.memory, atol=1e-5, rtol=0)


def test_an_unknown_quantization_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="quantize"):
        make_step(random_model(8), quantize="int4")


@pytest.mark.parametrize("packed_s, transposed_s, keeps", [
    # (seconds a call through the blocked layout, through W^T) at LAYOUT_CHECK_ROWS and at 1 row
    ((1.0, 1.0), (1.1, 0.5), "transposed"),  # blocked not 1.2x faster on rows: W^T alone
    ((1.0, 1.0), (2.0, 1.1), "packed"),  # blocked faster on rows, W^T not 1.2x faster on one
    ((1.0, 1.0), (2.0, 0.5), "both"),  # each clearly faster where it serves
])
def test_dense_linear_keeps_a_second_layout_only_where_it_is_clearly_faster(
        monkeypatch: pytest.MonkeyPatch, packed_s, transposed_s, keeps) -> None:
    current: dict = {}  # the layout and row count of the call being timed, seen by `spy`

    def fake_time(fn, **_: object) -> float:
        fn()
        return (packed_s if current["layout"] == "packed" else transposed_s)[current["rows"] == 1]

    real_call = DenseLinear.__call__

    def spy(self, x):
        current.update(rows=x.shape[0], layout="packed" if self.weight_t is None else "transposed")
        return real_call(self, x)

    monkeypatch.setattr(DenseLinear, "__call__", spy)
    monkeypatch.setattr(model.fastpath, "best_time", fake_time)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    lin = DenseLinear(weight, bias)
    monkeypatch.setattr(DenseLinear, "__call__", real_call)
    assert (lin.packed is not None, lin.weight_t is not None) == \
        {"transposed": (False, True), "packed": (True, False), "both": (True, True)}[keeps]
    for rows in (1, 3, 8, 13):  # whichever layouts were kept: the same product
        x = torch.randn(rows, 32)
        assert torch.allclose(lin(x), torch.addmm(bias, x, weight.t()), rtol=1e-5, atol=1e-5)


def test_int8_linear_is_close_to_the_float_product() -> None:
    torch.manual_seed(9)
    weight, bias = torch.randn(64, 48) * 0.1, torch.randn(64)
    weight[3] = 0.0  # an all-zero row (like the PAD embedding) must not break the scales
    x = torch.randn(5, 48)
    ref = x @ weight.T + bias
    out = Int8Linear(weight, bias)(x)
    assert out.shape == (5, 64)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    assert torch.allclose(out[:, 3], bias[3].expand(5), atol=1e-2)
    assert Int8Linear(weight).nbytes == 64 * (48 + 4)


def test_int8_step_stays_close_and_keeps_the_trained_replies(trained) -> None:
    ckpt, sources = trained
    f32, i8 = FastDecoder(ckpt.model), FastDecoder(ckpt.model, quantize="int8")
    assert i8.matrix_bytes() < f32.matrix_bytes() / 3
    rows = encode_sources(ckpt.model, sources)
    rows_i8 = i8.encode(sources)  # the int8 encoder (torch.ao's quantized LSTMs)
    assert (rows_i8.enc.memory - rows.enc.memory).abs().max() < 0.05
    assert not torch.equal(rows_i8.enc.memory, rows.enc.memory)
    tokens = torch.full((len(sources),), BOS_ID)
    a, _ = f32.step(tokens, rows)
    b, _ = i8.step(tokens, rows_i8)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert (a.exp() - b.exp()).abs().max() < 0.05
    # A few teacher-forced steps along the float model's own greedy replies stay close too.
    opts = DecodeOptions(strategy="greedy", max_length=16)
    ref = f32.decode_sources(sources, opts)
    rows_a, rows_b = rows, rows_i8
    for t in range(3):
        tokens = torch.tensor([h[0].tokens[t] if len(h[0].tokens) > t else BOS_ID for h in ref])
        a, rows_a = f32.step(tokens, rows_a)
        b, rows_b = i8.step(tokens, rows_b)
        assert (a.exp() - b.exp()).abs().max() < 0.05
    # This toy model has near ties, so int8 may flip a token here and there, not most replies.
    quantized = i8.decode_sources(sources, opts)
    assert all(h[0].finished for h in quantized)
    same = sum(x == y for x, y in zip(hyp_tokens(quantized), hyp_tokens(ref), strict=True))
    assert same >= len(sources) // 2


def test_torch_ao_quantized_copy_decodes_and_leaves_the_model_alone(trained) -> None:
    ckpt, sources = trained
    weight = ckpt.model.decoder.weight_hh_l0.clone()
    q = quantize_dynamic_int8(ckpt.model)
    assert type(q.decoder).__module__.startswith("torch.ao.nn.quantized")
    assert torch.equal(ckpt.model.decoder.weight_hh_l0, weight)
    opts = DecodeOptions(strategy="greedy", max_length=16)
    reference = decode_sources(ckpt.model, sources, opts)
    assert hyp_tokens(decode_sources(q, sources, opts)) == hyp_tokens(reference)


def test_bf16_products_are_close_and_a_row_is_the_same_alone_or_among_others() -> None:
    torch.manual_seed(11)
    weight, bias = torch.randn(96, 40) * 0.1, torch.randn(96)
    if not cpu_bf16_native():  # refused, with the reason, where the CPU has no native bf16
        with pytest.raises(ValueError, match="native bf16"):
            FastDecoder(random_model(1), quantize="bf16")
        return
    lin = Bf16Linear(weight, bias)
    x = torch.randn(37, 40)
    out = lin(x)
    assert out.dtype == torch.float32 and out.shape == (37, 96)
    ref = x @ weight.T + bias
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    for rows in (1, 5, 16, 17, 37):  # oneDNN's bf16 kernels differ with the row count; ours must not
        assert torch.equal(lin(x[:rows]), out[:rows])
        assert torch.equal(lin(x[rows - 1:rows]), out[rows - 1:rows])
    assert lin.nbytes == 2 * 96 * 41


def test_bf16_step_keeps_the_trained_replies_and_decodes_a_batch_as_each_alone(trained) -> None:
    ckpt, sources = trained
    if not cpu_bf16_native():
        with pytest.raises(ValueError, match="native bf16"):
            FastDecoder(ckpt.model, quantize="bf16")
        return
    f32, b16 = FastDecoder(ckpt.model), FastDecoder(ckpt.model, quantize="bf16")
    assert b16.matrix_bytes() < f32.matrix_bytes() / 1.9
    opts = DecodeOptions(strategy="greedy", max_length=16)
    batched = b16.decode_sources(sources, opts)
    for src, hyps in zip(sources, batched, strict=True):
        assert hyp_tokens(b16.decode_sources([src], opts)) == hyp_tokens([hyps])
    beam = DecodeOptions(strategy="beam", beam_size=3, n_best=3, max_length=16)
    together = b16.decode_sources(sources, beam)
    assert hyp_tokens(b16.decode_sources(sources[:1], beam)) == hyp_tokens(together[:1])
    same = sum(x == y for x, y in zip(hyp_tokens(batched), hyp_tokens(f32.decode_sources(sources, opts)),
                                      strict=True))
    assert same >= len(sources) // 2  # near ties may flip a token here and there, not most replies


def test_releasing_the_models_step_weights_keeps_the_replies_and_frees_them(trained) -> None:
    ckpt, sources = trained
    model = load_checkpoint(ckpt.path).model  # a copy of its own: the fixture's stays whole
    opts = DecodeOptions(strategy="beam", beam_size=4, n_best=2, max_length=16)
    fast = FastDecoder(model)
    before = hyp_tokens(fast.decode_sources(sources, opts))
    step_modules = (model.decoder, model.combine, model.bottleneck)
    step_bytes = sum(p.numel() * 4 for m in step_modules for p in m.parameters())
    encoder_lstms = [*model.enc_fwd, *model.enc_bwd]
    matrices = [p for m in encoder_lstms for n, p in m.named_parameters() if n.startswith("weight")]
    assert fast.release_model_step() == step_bytes + sum(p.numel() * 4 for p in matrices) > step_bytes
    assert all(p.device.type == "meta" for p in model.decoder.parameters())
    shared = {layer.w_ih.data_ptr() for layer in fast._fast_encoder.layers} | \
             {layer.w_hh.data_ptr() for layer in fast._fast_encoder.layers}
    for lstm in encoder_lstms:  # the model's encoder reads the fast encoder's tensors: one copy
        for name, p in lstm.named_parameters():
            assert (p.untyped_storage().data_ptr() in shared) == name.startswith("weight"), name
    assert model.embedding.weight.device.type == "cpu"  # the encoder's and the lookup's stay
    assert hyp_tokens(fast.decode_sources(sources, opts)) == before
    many = sources * 40  # past what FastEncoder serves: the model's own encoder runs
    assert hyp_tokens(fast.decode_sources(many, opts))[:len(sources)] == before
    assert hyp_tokens(fast.decode_sources(sources, DecodeOptions(strategy="greedy", max_length=16))) == \
        hyp_tokens(decode_sources(ckpt.model, sources, DecodeOptions(strategy="greedy", max_length=16)))
    with pytest.raises(ValueError, match="int8"):
        FastDecoder(ckpt.model, quantize="int8").release_model_step()


def test_the_models_own_encoder_gives_the_reference_outputs_through_padded_sources() -> None:
    model = random_model(6)
    fast = FastDecoder(model)
    many = [list(range(5, 5 + n)) for n in (3, 9, 11, 13)] * 6  # 24 sources: past FastEncoder
    assert not fast_encoder_wins(len(many), 13)
    ref, got = encode_sources(model, many), fast.encode(many)
    assert got.enc.memory.shape == ref.enc.memory.shape  # the padding to 16 tokens is cut off again
    pairs = ((got.enc.memory, ref.enc.memory), (got.enc.keys, ref.enc.keys), (got.state[0], ref.state[0]))
    for a, b in pairs:
        assert torch.equal(a, b)
    assert torch.equal(got.enc.mask, ref.enc.mask)
