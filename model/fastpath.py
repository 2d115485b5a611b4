"""A fast decoder step for serving: the same function as `Seq2Seq.step`, in fewer, cheaper ops.

At batch 1 a decoder step is a handful of matrix-vector products (about 24 MB of
float32 weights at the shipped size) wrapped in dozens of small ops; eager
`nn.LSTM` + `nn.Linear` code spends more time dispatching those small ops than
reading the weights. `FastDecoder` is built once from a loaded model and keeps:

- per LSTM layer one fused gate matrix `[W_ih; W_hh]^T` (In+H, 4H), stored
  transposed and contiguous for `torch.addmm`, with the two biases summed and the
  gate columns reordered to (i, f, o, g) so that one sigmoid covers three gates;
- the attention keys the encoder already projected (`EncoderOutput.keys`);
- `W_c^T`, the bottleneck `W_b^T` and the tied output layer (the embedding,
  pre-transposed to (E, V)), each one `addmm`/`mm`;
- the new state written in place into freshly allocated (L, R, H) tensors instead
  of being stacked.

The log-softmax stays: beam search needs real log-probabilities and greedy search
is indifferent to it, and it costs little next to the output product. Float32
results match `model.inference.step_rows` to rounding (tests/model/test_fastpath.py
checks greedy and beam outputs are identical).

`quantize="int8"` swaps every matrix for an int8 one with per-output-channel scales
(model/quantize.py): a quarter of the bytes to read at batch 1, int8 GEMMs at
large batch. The encoder then runs as torch.ao's dynamically quantized LSTMs, about
twice as fast as float32 at batch 1 (its recurrence, like the decoder step, is bound
by weight reads). It is CPU only and changes scores slightly (docs/PERFORMANCE.md
has the perplexity change).

`quantize="bf16"` (a CPU with native bf16) keeps the encoder in float32 and stores every
matrix of the step bf16 in oneDNN's blocked layout (`Bf16Linear`): 1.7-2.6x float32's
products at 1-64 rows on a CPU with AMX; log-probs and states stay float32 between the
products. Its products run on fixed blocks of rows, so a row's result never depends on
the rows beside it (a reply is the same alone or among others, as in float32).

torch.compile and TorchScript were left out: the step's cost is the products and
the search's own per-step work, and neither helps those on CPU enough to pay for
recompiling on every new (rows, source length) shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import collate_sources
from .decoding import DecodeOptions, Hypothesis, decode
from .fast_encoder import FastEncoder
from .inference import DecoderRows, RowStepFn
from .network import Seq2Seq
from .precision import cpu_bf16_native
from .quantize import Int8Linear, quantize_dynamic_int8
from .rerank import rerank_batch
from .timing import best_time
from .tokenizer import PAD_ID

QUANTIZE_MODES = (None, "int8", "bf16")
BF16_BLOCK_ROWS = 16  # a bf16 product always runs on blocks of this many rows (see Bf16Linear)
# oneDNN compiles a kernel for every row count it meets, about 0.5 MiB each whatever the
# matrix (five decoder matrices over 40 row counts: 100 MiB): products of two rows or more run on
# a multiple of this many rows (zeros added), so a server meets a few row counts, not every one.
PACKED_ROW_MULTIPLE = 8
# oneDNN's LSTM, likewise, keeps a compiled primitive per (rows, source length) it meets, about
# 0.5 MiB each (213 shapes: +99 MiB): the sources it encodes are right-padded to a multiple of
# this many tokens (the encoder's outputs at real positions do not depend on padding after them).
# 4: +36 MiB over those shapes, the encoder 2-20% slower on them; 8: +25 MiB but 8-37% slower.
ENCODER_LENGTH_MULTIPLE = 4
# DenseLinear keeps a second layout of a matrix only where it is this much faster (see there)
LAYOUT_GAIN = 1.2
LAYOUT_CHECK_ROWS = 8
LAYOUT_CHECK_MAX_BYTES = 4 << 20
LAYOUT_ROUND_S = 0.004  # one timing round: long enough that a small matrix's choice is not noise


def to_ifog(t: Tensor, h: int) -> Tensor:
    """PyTorch's LSTM gate rows (i, f, g, o) reordered to (i, f, o, g), so that one sigmoid
    covers three gates in the decoder step."""
    return torch.cat([t[: 2 * h], t[3 * h:], t[2 * h: 3 * h]])


def _onednn_pack(weight: Tensor) -> Tensor | None:
    """The weight in oneDNN's blocked layout, or None where oneDNN is not there."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 8)
    except (AttributeError, RuntimeError):
        return None


class DenseLinear:
    """y = x @ W^T + b in float32, in the layout each row count reads fastest, one copy where
    a second does not clearly pay.

    oneDNN's blocked layout (prepacked once) serves two rows or more: MKL's sgemm repacks the
    whole weight on every call once there are two rows, which made a 5-row beam step cost 1.6x
    a 1-row one; prepacked, every decoder matrix ran 1.2-2.2x faster at 2-64 rows (AMD EPYC, 1
    thread; on a Xeon about 40% at 3-8 rows and 10-15% at 64-320). A single row is a GEMV: W^T
    stored contiguous for `addmm` read it fastest on one machine, the blocked layout on another
    (the gate matrices 1.3-1.5x, the output layer the same). Each layout costs memory: a
    second copy of the matrix, and for the blocked one about 0.5 MiB of compiled kernel for
    every row count a server meets (nine in bench/memory.py's 200 requests: 4.5 MiB a matrix).
    So the layouts are timed here, on the machine at hand, and one is kept beside the other
    only where it is at least LAYOUT_GAIN faster at what it serves: the blocked one at
    LAYOUT_CHECK_ROWS rows (the small bottleneck matrix measured no faster there on the AMD
    EPYC: W^T alone), W^T at one row. Without oneDNN, W^T alone. Results agree within 1e-6
    relative.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, pack: bool = True) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        self.weight_t: Tensor | None = weight.detach().t().contiguous()  # (in, out)
        self.packed = _onednn_pack(weight) if pack else None
        if self.packed is not None:
            self._choose_layouts()

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        if self.packed is not None and (rows > 1 or self.weight_t is None):
            pad = -rows % PACKED_ROW_MULTIPLE if rows > 1 else 0
            if pad:
                x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return y[:rows] if pad else y
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)

    def _choose_layouts(self) -> None:
        """Keep the blocked layout only where it is LAYOUT_GAIN faster than W^T at
        LAYOUT_CHECK_ROWS rows, and W^T beside it only where W^T is LAYOUT_GAIN faster at one
        row (best of 5 rounds of about LAYOUT_ROUND_S each). Rows are timed for matrices of
        at most LAYOUT_CHECK_MAX_BYTES only: MKL repacks the whole matrix on every multi-row
        call, so a bigger one is always slower through W^T (the decoder's gate and output
        matrices, 6-8 MiB: 1.5-3x at 8 rows), and timing it would leave MKL's buffers for such
        a call in this thread (5 MiB for the shipped model's)."""
        packed, transposed = self.packed, self.weight_t

        def timed(rows: int, layout: str) -> float:
            x = torch.randn(rows, self.in_features, device=transposed.device)  # type: ignore[union-attr]
            self.packed, self.weight_t = (packed, None) if layout == "packed" else (None, transposed)
            once = best_time(lambda: self(x), repeats=3)
            return best_time(lambda: self(x), repeats=5, number=max(5, int(LAYOUT_ROUND_S / once)))

        with torch.inference_mode():
            if self.out_features * self.in_features * 4 <= LAYOUT_CHECK_MAX_BYTES and \
                    timed(LAYOUT_CHECK_ROWS, "transposed") < LAYOUT_GAIN * timed(LAYOUT_CHECK_ROWS, "packed"):
                self.packed, self.weight_t = None, transposed
                return
            keep_transposed = timed(1, "packed") > LAYOUT_GAIN * timed(1, "transposed")
        self.packed, self.weight_t = packed, transposed if keep_transposed else None

    @property
    def nbytes(self) -> int:
        """Bytes one product reads: the weight once, in whichever layout serves it, and the bias."""
        n = self.out_features * self.in_features * 4
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class Bf16Linear:
    """y = x @ W^T + b with W stored bf16 in oneDNN's blocked layout; float32 in and out.

    On a CPU with AMX the product runs 1.6-3.8x the float32 one at the decoder's shapes
    (half the bytes at one row, AMX tiles at many). oneDNN's bf16 kernels differ with the
    number of rows, so a row's result could change with the rows beside it; the product
    therefore always runs on blocks of BF16_BLOCK_ROWS rows (the last padded with zeros),
    which keeps every row's result the same alone or among others, and still ran 1.7-2.6x
    float32 from 1 to 64 rows. (One `baddbmm` over the blocks is as batch-invariant but ran
    2-3x slower than this loop over at most a few blocks.)
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        w = weight.detach().to(torch.bfloat16).contiguous()  # (out, in)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, BF16_BLOCK_ROWS)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16).contiguous()
        self.out_features, self.in_features = w.shape

    def __call__(self, x: Tensor) -> Tensor:
        R = x.shape[0]
        xb = x.to(torch.bfloat16)
        pad = -R % BF16_BLOCK_ROWS
        if pad:
            xb = torch.cat([xb, xb.new_zeros(pad, xb.shape[1])])
        blocks = [torch.ops.mkldnn._linear_pointwise(xb[i:i + BF16_BLOCK_ROWS], self.packed, self.bias,
                                                     "none", [], "")
                  for i in range(0, xb.shape[0], BF16_BLOCK_ROWS)]
        return torch.cat(blocks)[:R].float()

    @property
    def nbytes(self) -> int:
        return 2 * self.out_features * (self.in_features + (self.bias is not None))


Linear = DenseLinear | Int8Linear | Bf16Linear


class FastDecoder:
    """Precomputed weights and a lean `step` for one loaded model (rebuild it if the weights change)."""

    def __init__(self, model: Seq2Seq, quantize: str | None = None) -> None:
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, not {quantize!r}")
        self.model = model
        self.quantize = quantize
        self.device = model.embedding.weight.device
        if quantize in ("int8", "bf16") and self.device.type != "cpu":
            raise ValueError(f"{quantize} decoder matrices run on CPU only")
        if quantize == "bf16" and not cpu_bf16_native():
            raise ValueError("bf16 decoder matrices need a CPU with native bf16 (AVX512-BF16 or AMX)")
        cfg = model.cfg
        self.L, self.H = cfg.num_layers, cfg.hidden_size

        def make(weight: Tensor, bias: Tensor | None = None) -> Linear:
            if quantize == "int8":
                return Int8Linear(weight, bias)
            if quantize == "bf16":
                return Bf16Linear(weight, bias)
            return DenseLinear(weight, bias)

        with torch.no_grad():
            dec = model.decoder
            self.gates: list[Linear] = []
            for layer in range(self.L):
                w = torch.cat([getattr(dec, f"weight_ih_l{layer}"), getattr(dec, f"weight_hh_l{layer}")], 1)
                b = getattr(dec, f"bias_ih_l{layer}") + getattr(dec, f"bias_hh_l{layer}")
                self.gates.append(make(to_ifog(w, self.H), to_ifog(b, self.H)))  # (4H, In+H)
            self.combine = make(model.combine.weight)  # (H, 2H)
            self.bottleneck: Linear | None = (make(model.bottleneck.weight)
                                              if isinstance(model.bottleneck, torch.nn.Linear) else None)
            if model.out is not None:
                self.out = make(model.out.weight, model.out.bias)
            else:  # tied: the embedding is the output matrix
                self.out = make(model.embedding.weight, model.out_bias)
            self.embedding = model.embedding.weight.detach()  # (V, E), looked up, never copied
        self._encoder_model: Seq2Seq | None = None if quantize == "int8" else model
        self._fast_encoder = FastEncoder(model) if quantize != "int8" else None  # bf16: the step only

    # -- the step -------------------------------------------------------------------
    def step(self, tokens: Tensor, rows: DecoderRows) -> tuple[Tensor, DecoderRows]:
        """tokens (R,), rows -> log-probs (R, V) and the rows' new state."""
        if torch.is_inference_mode_enabled():
            return self._step(tokens, rows)
        with torch.inference_mode():
            return self._step(tokens, rows)

    def _step(self, tokens: Tensor, rows: DecoderRows) -> tuple[Tensor, DecoderRows]:
        H = self.H
        h, c = rows.state  # (L, R, H) each
        enc = rows.enc
        h_new = torch.empty_like(h)
        c_new = torch.empty_like(c)
        x = self.embedding.index_select(0, tokens)  # (R, E)
        for layer, gates_of in enumerate(self.gates):
            gates = gates_of(torch.cat([x, h[layer]], 1))  # (R, 4H): i f o | g
            sig = gates[:, : 3 * H].sigmoid()  # (R, 3H)
            g = gates[:, 3 * H:].tanh()
            torch.addcmul(sig[:, H: 2 * H] * c[layer], sig[:, :H], g, out=c_new[layer])
            torch.mul(sig[:, 2 * H:], c_new[layer].tanh(), out=h_new[layer])
            x = h_new[layer]  # (R, H)
        scores = torch.bmm(enc.keys, x.unsqueeze(2)).squeeze(2)  # (R, S)
        weights = torch.where(enc.mask, scores, float("-inf")).softmax(1)
        context = torch.bmm(weights.unsqueeze(1), enc.memory).squeeze(1)  # (R, H)
        feats = self.combine(torch.cat([context, x], 1)).tanh_()  # (R, H)
        if self.bottleneck is not None:
            feats = self.bottleneck(feats)  # (R, E)
        logits = self.out(feats)  # (R, V)
        return torch.log_softmax(logits.float(), dim=1), DecoderRows(state=(h_new, c_new), enc=enc)

    # -- around the step -----------------------------------------------------------------
    @property
    def encoder_model(self) -> Seq2Seq:
        """The model `encode` runs: the model itself, or (int8) a torch.ao-quantized copy made
        on first use, so that `make_step` users, who encode elsewhere, never pay for it."""
        if self._encoder_model is None:
            self._encoder_model = quantize_dynamic_int8(self.model)
        return self._encoder_model

    @encoder_model.setter
    def encoder_model(self, model: Seq2Seq) -> None:
        self._encoder_model = model

    def encode(self, sources: Sequence[Sequence[int]]) -> DecoderRows:
        """One row per source: float32 through `FastEncoder` (model/fast_encoder.py) where it is
        faster, else through the model's own encoder (int8: the torch.ao-quantized copy), the
        sources padded to a multiple of ENCODER_LENGTH_MULTIPLE tokens; the same outputs as
        the reference `encode_sources`."""
        if self._fast_encoder is not None and self._encoder_model is self.model and \
                fast_encoder_wins(len(sources), max((len(s) for s in sources), default=1)):
            return self._fast_encoder.encode(sources)
        model = self.encoder_model
        was_training = model.training
        model.eval()  # no dropout, whatever mode the caller left the model in
        try:
            src, lens = collate_sources(sources, self.device)
            length = src.shape[1]
            src = F.pad(src, (0, -length % ENCODER_LENGTH_MULTIPLE), value=PAD_ID)
            enc = model.encode(src, lens).first_positions(length)
            return DecoderRows(state=enc.state, enc=enc)
        finally:
            model.train(was_training)

    @staticmethod
    def select(rows: DecoderRows, index: Tensor) -> DecoderRows:
        """Reorder rows after a search step, copying the encoder output only when needed.

        A reorder that keeps the number of rows only moves rows within an item (beam
        search picks each item's new beams among its own), and every row of an item
        holds the same encoder output, so only the recurrent state moves. When items
        finish the rows shrink and everything is gathered, as `DecoderRows.index_select`.
        """
        h, c = rows.state
        if index.numel() != h.shape[1]:
            return rows.index_select(index)
        return DecoderRows(state=(h.index_select(1, index), c.index_select(1, index)), enc=rows.enc)

    @torch.inference_mode()
    def decode_sources(self, sources: Sequence[Sequence[int]], opts: DecodeOptions,
                       generator: torch.Generator | None = None, reverse: Seq2Seq | None = None,
                       ) -> list[list[Hypothesis]]:
        """`model.inference.decode_sources` through the fast step: one hypothesis list per source."""
        # the step's log-probs are a fresh tensor each time: the search may overwrite them
        found = decode(self.step, self.encode(sources), self.select,
                       batch_size=len(sources), opts=opts, device=self.device, generator=generator,
                       inplace=True)
        return rerank_batch(sources, found, opts, reverse)

    def release_model_step(self) -> int:
        """Free the model's own copies of what this object holds: the decoder LSTM, combine,
        bottleneck and an untied output layer (16.5 MiB at the shipped size) go to the "meta"
        device, and the model's encoder LSTMs become views of the fast encoder's weights
        (10 MiB); the embedding and attention keys stay. For a server that decodes through
        this object only: the model's own `step` can no longer run afterwards, and its
        encoder still can. Not for int8, whose torch.ao copy of the model is made from these
        weights. Returns bytes freed."""
        if self.quantize == "int8":
            raise ValueError("the int8 decoder copies the model's weights on first use: keep them")
        model = self.model
        modules = [model.decoder, model.combine, model.bottleneck, model.out]
        params = [p for m in modules if m is not None for p in m.parameters() if p.device.type != "meta"]
        freed = sum(p.numel() * p.element_size() for p in params)
        for m in modules:
            if m is not None:
                m.to("meta")
        if self._fast_encoder is not None:
            freed += self._fast_encoder.share_weights()
        return freed

    def matrix_bytes(self) -> int:
        """Bytes of the weights one step reads (the embedding lookup reads R rows only)."""
        mats: list[Linear] = [*self.gates, self.combine, self.out]
        if self.bottleneck is not None:
            mats.append(self.bottleneck)
        return sum(m.nbytes for m in mats)


def fast_encoder_wins(rows: int, length: int) -> bool:
    """Whether `FastEncoder` beats the model's own (oneDNN) encoder for `rows` sources of up to
    `length` tokens. oneDNN pays ~1 ms a call to reorder its weights but computes big batches
    more efficiently, and has a fast path for a single row; measured on the 2-core machine
    (best of 8, shipped model), 1 thread: FastEncoder 1.2-2x faster up to ~160 tokens in all
    (R=2, S=20: 5.7 against 9.0 ms) except one long source (R=1, S=40: 7.7 against 5.0 ms),
    slower from R=16, S=20 on; with 2 threads oneDNN wins from ~40 tokens on."""
    if rows == 1:
        return length <= 16
    return rows * length <= (160 if torch.get_num_threads() == 1 else 40)


def make_step(model: Seq2Seq, quantize: str | None = None) -> RowStepFn:
    """The serving seam: a step callable with `model.inference.step_rows`'s contract."""
    return FastDecoder(model, quantize=quantize).step
