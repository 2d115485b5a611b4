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
  leading direction axis of 2), and the cell's element-wise ops on both at once.

The weights stay in PyTorch's layout and gate order, read transposed by the GEMMs, so that a
server can make the model's own LSTMs views of them (`share_weights`) instead of holding two
copies (10 MiB). Against transposed copies (AMD EPYC, 1 thread): one 8-token source 4.7
against 4.3 ms, four sources of 10 tokens 9.9 against 9.9; whole replies measured the same.

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


class _Layer:
    """One bidirectional layer: both directions' input weights in one matrix, their recurrent
    weights stacked, in PyTorch's own layout and gate order (i, f, g, o), so that the model's
    LSTMs can read these very tensors (`share_with`)."""

    def __init__(self, fwd: torch.nn.LSTM, bwd: torch.nn.LSTM) -> None:
        self.h = int(fwd.hidden_size)
        self.fwd, self.bwd = fwd, bwd
        self.w_ih = torch.cat([fwd.weight_ih_l0, bwd.weight_ih_l0]).detach()  # (8h, In)
        self.bias = torch.cat([d.bias_ih_l0 + d.bias_hh_l0 for d in (fwd, bwd)]).detach()  # (8h,)
        self.w_hh = torch.stack([fwd.weight_hh_l0, bwd.weight_hh_l0]).detach()  # (2, 4h, h)

    def share_with(self) -> int:
        """Make the two LSTMs' weight matrices views of this layer's (one copy, not two); bytes
        freed. Their values do not change; a model saved afterwards must copy them first."""
        h4 = 4 * self.h
        freed = 0
        for i, lstm in enumerate((self.fwd, self.bwd)):
            views = (("weight_ih_l0", self.w_ih[i * h4:(i + 1) * h4]), ("weight_hh_l0", self.w_hh[i]))
            for name, shared in views:
                old = getattr(lstm, name)
                if old.data_ptr() != shared.data_ptr():
                    freed += old.numel() * old.element_size()
                    setattr(lstm, name, torch.nn.Parameter(shared, requires_grad=old.requires_grad))
        return freed

    def __call__(self, x: Tensor, rev: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, S, In) -> forward and backward outputs (B, S, h) each, in source order."""
        B, S, _ = x.shape
        h = self.h
        proj = torch.addmm(self.bias, x.reshape(B * S, -1), self.w_ih.t()).view(B, S, 2, 4 * h)
        # (2, S, B, 4h): direction, time, row; the backward half read in reversed order
        fwd_in = proj[:, :, 0]
        bwd_in = proj[:, :, 1].gather(1, rev[:, :, None].expand(-1, -1, 4 * h))
        inputs = torch.stack([fwd_in, bwd_in]).transpose(1, 2).contiguous()
        out = x.new_empty(2, S, B, h)
        hidden = x.new_zeros(2, B, h)
        cell = x.new_zeros(2, B, h)
        w_hh_t = self.w_hh.transpose(1, 2)  # (2, h, 4h), a view: the GEMM reads it transposed
        for t in range(S):
            gates = torch.baddbmm(inputs[:, t], hidden, w_hh_t)  # (2, B, 4h): i f g o
            sig = gates.sigmoid()  # g's share unused: one op for three gates, as (i, f, o, g) would
            cell = torch.addcmul(sig[..., h: 2 * h] * cell, sig[..., :h], gates[..., 2 * h: 3 * h].tanh())
            hidden = out[:, t]
            torch.mul(sig[..., 3 * h:], cell.tanh(), out=hidden)
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

    def share_weights(self) -> int:
        """Point the model's encoder LSTMs at this encoder's weight matrices, so that the two
        encoders (this one and the model's own, oneDNN's, which serves long batches) hold one
        copy (10 MiB at the shipped size); bytes freed. For a server: the model's parameters
        become views of shared tensors, which a checkpoint saved from it would have to copy."""
        return sum(layer.share_with() for layer in self.layers)

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
