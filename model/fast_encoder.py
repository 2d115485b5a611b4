"""A fast encoder for serving: the same function as `Seq2Seq.encode`, without oneDNN's per-call cost.

`nn.LSTM` on CPU runs each layer as one oneDNN RNN call, which is what training wants
(big batches, long sequences). At serving sizes it is the wrong trade: every call
reorders the layer's weights into oneDNN's layout before it starts, about 1 ms per
call whatever the batch, so encoding one 8-token source through the shipped model's
four LSTMs (two layers, two directions) took 4-5 ms, as long as five decoder steps,
and under 32 clients the server spent as much time encoding as decoding.

`FastEncoder` keeps the weights in the layout its products read and runs, per layer:

- one GEMM for the input projections of both directions at every position
  (`x @ [W_ih_fwd; W_ih_bwd]^T + biases`), the backward half then reversed within each
  row's own length, as `Seq2Seq.encode` reverses its input;
- per time step one batched product `h @ W_hh^T` for both directions (`baddbmm` over a
  leading direction axis of 2), and the cell's element-wise ops on both at once, gates
  reordered to (i, f, o, g) so that one sigmoid covers three gates.

Padding is handled as the model handles it: rows are right-padded, the backward
direction reads each row reversed within its length, so pads come after every real
token in both directions and never reach a real position. Outputs equal the model's
to float rounding (tests/model/test_fast_encoder.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .inference import DecoderRows, collate_sources
from .network import EncoderOutput, Seq2Seq


def to_ifog(t: Tensor, h: int) -> Tensor:
    """PyTorch's LSTM gate rows (i, f, g, o) reordered to (i, f, o, g), so that one sigmoid
    covers three gates (here and in model/fastpath.py's decoder step)."""
    return torch.cat([t[: 2 * h], t[3 * h:], t[2 * h: 3 * h]])


class _Layer:
    """One bidirectional layer: fused input projection, stacked recurrent weights."""

    def __init__(self, fwd: torch.nn.Module, bwd: torch.nn.Module) -> None:
        h = self.h = int(fwd.hidden_size)  # type: ignore[arg-type]

        def gates(lstm: torch.nn.Module, name: str) -> Tensor:
            return to_ifog(getattr(lstm, name), h)

        w_ih = torch.cat([gates(fwd, "weight_ih_l0"), gates(bwd, "weight_ih_l0")])  # (8h, In)
        b = torch.cat([gates(d, "bias_ih_l0") + gates(d, "bias_hh_l0") for d in (fwd, bwd)])
        self.w_ih_t = w_ih.detach().t().contiguous()  # (In, 8h)
        self.bias = b.detach().contiguous()  # (8h,)
        self.w_hh_t = torch.stack([gates(fwd, "weight_hh_l0").t(), gates(bwd, "weight_hh_l0").t()]
                                  ).detach().contiguous()  # (2, h, 4h)

    def __call__(self, x: Tensor, rev: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, S, In) -> forward and backward outputs (B, S, h) each, in source order."""
        B, S, _ = x.shape
        h = self.h
        proj = torch.addmm(self.bias, x.reshape(B * S, -1), self.w_ih_t).view(B, S, 2, 4 * h)
        # (2, S, B, 4h): direction, time, row; the backward half read in reversed order
        fwd_in = proj[:, :, 0]
        bwd_in = proj[:, :, 1].gather(1, rev[:, :, None].expand(-1, -1, 4 * h))
        inputs = torch.stack([fwd_in, bwd_in]).transpose(1, 2).contiguous()
        out = x.new_empty(2, S, B, h)
        hidden = x.new_zeros(2, B, h)
        cell = x.new_zeros(2, B, h)
        for t in range(S):
            gates = torch.baddbmm(inputs[:, t], hidden, self.w_hh_t)  # (2, B, 4h): i f o | g
            sig = gates[..., : 3 * h].sigmoid()
            cell = torch.addcmul(sig[..., h: 2 * h] * cell, sig[..., :h], gates[..., 3 * h:].tanh())
            hidden = out[:, t]
            torch.mul(sig[..., 2 * h:], cell.tanh(), out=hidden)
        f = out[0].transpose(0, 1)  # (B, S, h)
        b = out[1].transpose(0, 1).gather(1, rev[:, :, None].expand(-1, -1, h))  # back in order
        return f, b


class FastEncoder:
    """Precomputed weights and a lean `encode` for one loaded model (rebuild it if the weights change)."""

    def __init__(self, model: Seq2Seq) -> None:
        self.model = model
        self.device = model.embedding.weight.device
        with torch.no_grad():
            self.layers = [_Layer(f, b) for f, b in zip(model.enc_fwd, model.enc_bwd, strict=True)]

    @torch.inference_mode()
    def encode(self, sources: Sequence[Sequence[int]]) -> DecoderRows:
        """One row per source, as `model.inference.encode_sources` gives it (eval mode)."""
        src, lens = collate_sources(sources, self.device)
        enc = self.encode_batch(src, lens.to(self.device))
        return DecoderRows(state=enc.state, enc=enc)

    def encode_batch(self, src: Tensor, lens: Tensor) -> EncoderOutput:
        """src (B, S) right-padded token ids, lens (B,) >= 1: `Seq2Seq.encode` without dropout."""
        model = self.model
        B, S = src.shape
        pos = torch.arange(S, device=src.device)[None, :]
        mask = pos < lens[:, None]
        rev = torch.where(mask, lens[:, None] - 1 - pos, pos)
        x = model.embedding.weight.index_select(0, src.reshape(-1)).view(B, S, -1)
        for layer in self.layers:
            f, b = layer(x, rev)
            x = torch.cat([f, b], dim=-1)
        last = (lens - 1)[:, None, None].expand(-1, 1, f.shape[-1])
        summary = torch.cat([f.gather(1, last)[:, 0], b[:, 0]], dim=-1)  # (B, H)
        L, H = model.cfg.num_layers, model.cfg.hidden_size
        hid = torch.tanh(model.bridge(summary)).view(B, L, H).transpose(0, 1).contiguous()
        return EncoderOutput(memory=x, keys=model.attn(x), mask=mask, state=(hid, torch.zeros_like(hid)))
