"""The LSTM encoder-decoder with Luong global attention.

Encoder: embedding + bidirectional multi-layer LSTM; each direction has
hidden_size/2 units. Padding never reaches a real position: the forward LSTM reads
right-padded rows (pads come after the tokens), the backward LSTM reads each row
reversed within its own length (pads again come last), and attention masks the
pads. That is what packed sequences give, without their cost: on CPU PyTorch runs
a packed LSTM step by step, and its backward pass spent about a quarter of each
training step zero-filling gradients (measured with torch.profiler), where an
unpacked layer is one fused oneDNN call. The decoder starts from a learned bridge
over the two directions' final states. Decoder: multi-layer LSTM, then Luong "general" attention
over the encoder states (no input feeding, which is what lets the teacher-forced
pass run the decoder LSTM over the whole target in one fused call), then
tanh(W_c [context; h]) and an output layer tied to the embedding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .dropout import Dropout
from .tokenizer import PAD_ID

LSTMState = tuple[Tensor, Tensor]  # (h, c), each (L, B, H)


@dataclass
class EncoderOutput:
    memory: Tensor  # (B, S, H) encoder states
    keys: Tensor  # (B, S, H) memory projected by W_a, precomputed once per input
    mask: Tensor  # (B, S) True where the source has a token
    state: LSTMState  # initial decoder state

    def index_select(self, index: Tensor) -> EncoderOutput:
        """Rows picked (or repeated) by `index`; used to expand to beams and to filter."""
        return EncoderOutput(
            memory=self.memory.index_select(0, index),
            keys=self.keys.index_select(0, index),
            mask=self.mask.index_select(0, index),
            state=(self.state[0].index_select(1, index), self.state[1].index_select(1, index)),
        )

    def first_positions(self, length: int) -> EncoderOutput:
        """The first `length` source positions (a batch encoded with extra right padding)."""
        if length == self.mask.shape[1]:
            return self
        return EncoderOutput(memory=self.memory[:, :length].contiguous(),
                             keys=self.keys[:, :length].contiguous(),
                             mask=self.mask[:, :length].contiguous(), state=self.state)


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V, E, H, L = cfg.vocab_size, cfg.embedding_dim, cfg.hidden_size, cfg.num_layers
        between = cfg.dropout if L > 1 else 0.0
        self.embedding = nn.Embedding(V, E, padding_idx=PAD_ID)
        self.enc_fwd = nn.ModuleList(nn.LSTM(E if i == 0 else H, H // 2, batch_first=True)
                                     for i in range(L))
        self.enc_bwd = nn.ModuleList(nn.LSTM(E if i == 0 else H, H // 2, batch_first=True)
                                     for i in range(L))
        self.bridge = nn.Linear(H, L * H)  # final encoder summary -> initial decoder h per layer
        self.decoder = nn.LSTM(E, H, num_layers=L, dropout=between, batch_first=True)
        self.attn = nn.Linear(H, H, bias=False)  # Luong "general" score: h_t^T W_a h_s
        self.combine = nn.Linear(2 * H, H, bias=False)
        self.drop = Dropout(cfg.dropout)
        if cfg.tie_embeddings:
            self.bottleneck: nn.Module = nn.Linear(H, E, bias=False) if E != H else nn.Identity()
            self.out_bias = nn.Parameter(torch.zeros(V))
            self.out: nn.Linear | None = None
        else:
            self.bottleneck = nn.Identity()
            self.out = nn.Linear(H, V)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.embedding.weight, std=self.cfg.embedding_dim ** -0.5)
        with torch.no_grad():
            self.embedding.weight[PAD_ID].zero_()
            for lstm in (*self.enc_fwd, *self.enc_bwd, self.decoder):
                for name, p in lstm.named_parameters():
                    if name.startswith("bias_ih"):  # forget gate bias 1: remember by default
                        n = p.shape[0] // 4
                        p[n:2 * n].fill_(1.0)
                    elif name.startswith("bias_hh"):
                        p.zero_()

    # -- encoder -----------------------------------------------------------
    def encode(self, src: Tensor, src_lens: Tensor) -> EncoderOutput:
        """src (B, S) right-padded token ids, src_lens (B,) >= 1."""
        B, S = src.shape
        lens = src_lens.to(src.device)
        pos = torch.arange(S, device=src.device)[None, :]  # (1, S)
        mask = pos < lens[:, None]  # (B, S)
        # reverse each row within its length; pads stay where they are
        rev = torch.where(mask, lens[:, None] - 1 - pos, pos)  # (B, S)
        x = self.drop(self.embedding(src))  # (B, S, E)
        for i, (fwd, bwd) in enumerate(zip(self.enc_fwd, self.enc_bwd, strict=True)):
            if i:
                x = self.drop(x)
            f, _ = fwd(x)  # (B, S, H/2)
            idx = rev[:, :, None].expand(-1, -1, x.shape[-1])
            b, _ = bwd(x.gather(1, idx))
            b = b.gather(1, rev[:, :, None].expand(-1, -1, b.shape[-1]))  # back in order
            x = torch.cat([f, b], dim=-1)  # (B, S, H)
        memory = x
        last = (lens - 1)[:, None, None].expand(-1, 1, f.shape[-1])
        summary = torch.cat([f.gather(1, last)[:, 0], b[:, 0]], dim=-1)  # (B, H)
        L, H = self.cfg.num_layers, self.cfg.hidden_size
        h = torch.tanh(self.bridge(summary)).view(B, L, H).transpose(0, 1).contiguous()  # (L, B, H)
        c = torch.zeros_like(h)
        return EncoderOutput(memory=memory, keys=self.attn(memory), mask=mask, state=(h, c))

    # -- decoder -----------------------------------------------------------
    def attend(self, dec_out: Tensor, enc: EncoderOutput) -> Tensor:
        """dec_out (B, T, H) -> attentional states (B, T, H)."""
        scores = torch.bmm(dec_out, enc.keys.transpose(1, 2))  # (B, T, S)
        scores = scores.masked_fill(~enc.mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights, enc.memory)  # (B, T, H)
        return torch.tanh(self.combine(torch.cat([context, dec_out], dim=-1)))

    def project(self, features: Tensor) -> Tensor:
        """Attentional states (..., H) -> vocabulary logits (..., V)."""
        features = self.drop(features)
        if self.out is not None:
            return self.out(features)
        return F.linear(self.bottleneck(features), self.embedding.weight, self.out_bias)

    def decode_features(self, tgt_in: Tensor, enc: EncoderOutput) -> Tensor:
        """Teacher forcing: the whole shifted target in one LSTM call. tgt_in (B, T)."""
        emb = self.drop(self.embedding(tgt_in))  # (B, T, E)
        dec_out, _ = self.decoder(emb, enc.state)  # (B, T, H)
        return self.attend(dec_out, enc)

    def forward(self, src: Tensor, src_lens: Tensor, tgt_in: Tensor) -> Tensor:
        """Logits (B, T, V) for the teacher-forced target."""
        return self.project(self.decode_features(tgt_in, self.encode(src, src_lens)))

    def decode_features_sampled(self, tgt_in: Tensor, enc: EncoderOutput, ratio: float,
                                rng: random.Random) -> Tensor:
        """Teacher-forcing ratio < 1: a step-by-step loop that sometimes feeds back the
        model's own prediction. Slower; an option, not the default path."""
        state = enc.state
        token = tgt_in[:, 0]
        feats = []
        for t in range(tgt_in.shape[1]):
            if t > 0:
                token = tgt_in[:, t] if rng.random() < ratio else self.project(feats[-1]).argmax(-1)
            out, state = self.decoder(self.drop(self.embedding(token))[:, None, :], state)
            feats.append(self.attend(out, enc)[:, 0])
        return torch.stack(feats, dim=1)

    def step(self, tokens: Tensor, state: LSTMState, enc: EncoderOutput) -> tuple[Tensor, LSTMState]:
        """One decoding step for R rows: tokens (R,) -> log-probs (R, V) and the new state."""
        emb = self.embedding(tokens)[:, None, :]  # (R, 1, E)
        out, state = self.decoder(emb, state)  # (R, 1, H)
        logits = self.project(self.attend(out, enc)[:, 0])  # (R, V)
        return torch.log_softmax(logits.float(), dim=-1), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
