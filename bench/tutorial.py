"""The classic PyTorch chatbot tutorial's seq2seq, LSTM flavour, as the baseline the benches beat.

The tutorial ("Chatbot Tutorial", pytorch.org/tutorials/beginner/chatbot_tutorial)
decodes and trains one time step at a time: a packed bidirectional encoder over
time-major (S, B) batches, then per step an RNN call on one token, Luong attention
whose energies run an `nn.Linear` over all encoder outputs again, `nn.Linear`
output layers, softmax, and max/topk; its training loop teacher-forces step by
step and sums a masked NLL per step over batches padded to their longest pair.

`TutorialSeq2Seq(model)` copies a `Seq2Seq`'s weights (the encoder's per-layer
forward/backward LSTMs become one bidirectional `nn.LSTM`), so it computes the same
function: only the way of computing differs, which is what the benches measure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.decoding import NEVER_EMIT, length_penalty
from model.inference import collate_sources
from model.network import Seq2Seq
from model.tokenizer import BOS_ID, EOS_ID

State = tuple[Tensor, Tensor]


class TutorialSeq2Seq(nn.Module):
    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        cfg = model.cfg
        V, E, H, L = cfg.vocab_size, cfg.embedding_dim, cfg.hidden_size, cfg.num_layers
        self.L, self.H = L, H
        self.embedding = nn.Embedding(V, E)
        self.dropout = nn.Dropout(cfg.dropout)
        between = cfg.dropout if L > 1 else 0.0
        self.encoder = nn.LSTM(E, H // 2, num_layers=L, bidirectional=True, dropout=between)
        self.bridge = nn.Linear(H, L * H)
        self.decoder = nn.LSTM(E, H, num_layers=L, dropout=between)
        self.attn = nn.Linear(H, H, bias=False)
        self.concat = nn.Linear(2 * H, H, bias=False)
        self.bottleneck = nn.Linear(H, E, bias=False) if cfg.tie_embeddings and E != H else nn.Identity()
        self.out = nn.Linear(E if cfg.tie_embeddings else H, V)
        with torch.no_grad():
            self.embedding.weight.copy_(model.embedding.weight)
            for i in range(L):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(self.encoder, f"{name}_l{i}").copy_(getattr(model.enc_fwd[i], f"{name}_l0"))
                    rev = getattr(self.encoder, f"{name}_l{i}_reverse")
                    rev.copy_(getattr(model.enc_bwd[i], f"{name}_l0"))
            self.bridge.load_state_dict(model.bridge.state_dict())
            self.decoder.load_state_dict(model.decoder.state_dict())
            self.attn.load_state_dict(model.attn.state_dict())
            self.concat.load_state_dict(model.combine.state_dict())
            if isinstance(self.bottleneck, nn.Linear):
                self.bottleneck.load_state_dict(model.bottleneck.state_dict())
            if model.out is None:
                self.out.weight.copy_(model.embedding.weight)
                self.out.bias.copy_(model.out_bias)
            else:
                self.out.load_state_dict(model.out.state_dict())

    def encode(self, src: Tensor, lens: Tensor) -> tuple[Tensor, State]:
        """src (S, B) time-major -> encoder outputs (S, B, H) and the decoder's first state."""
        packed = pack_padded_sequence(self.dropout(self.embedding(src)), lens.cpu(), enforce_sorted=False)
        outputs, (h_n, _) = self.encoder(packed)
        outputs, _ = pad_packed_sequence(outputs, total_length=src.shape[0])
        summary = torch.cat([h_n[-2], h_n[-1]], dim=1)  # last layer, both directions
        h = torch.tanh(self.bridge(summary)).view(-1, self.L, self.H).transpose(0, 1).contiguous()
        return outputs, (h, torch.zeros_like(h))

    def forward(self, input_step: Tensor, hidden: State, encoder_outputs: Tensor,
                pad_mask: Tensor) -> tuple[Tensor, State]:
        """One time step: input_step (1, B) -> probabilities (B, V) and the new hidden state."""
        embedded = self.dropout(self.embedding(input_step))  # (1, B, E)
        rnn_output, hidden = self.decoder(embedded, hidden)  # (1, B, H)
        energy = self.attn(encoder_outputs)  # (S, B, H): recomputed every step, as in the tutorial
        attn_energies = torch.sum(rnn_output * energy, dim=2).t()  # (B, S)
        attn_energies = attn_energies.masked_fill(pad_mask, float("-inf"))
        attn_weights = F.softmax(attn_energies, dim=1).unsqueeze(1)  # (B, 1, S)
        context = attn_weights.bmm(encoder_outputs.transpose(0, 1)).squeeze(1)  # (B, H)
        concat_output = torch.tanh(self.concat(torch.cat((context, rnn_output.squeeze(0)), 1)))
        output = self.out(self.bottleneck(self.dropout(concat_output)))
        return F.softmax(output, dim=1), hidden


def _ban(probs: Tensor, length: int, min_length: int) -> Tensor:
    """The same token rules as model.decoding, so the replies can be compared."""
    probs[:, list(NEVER_EMIT)] = 0.0
    if length + 1 < min_length:
        probs[:, EOS_ID] = 0.0
    return probs


@torch.inference_mode()
def greedy(tut: TutorialSeq2Seq, sources: list[list[int]], max_length: int, min_length: int = 1,
           ) -> list[list[int]]:
    """The tutorial's GreedySearchDecoder, batched: every row runs until all have ended."""
    src, lens = collate_sources(sources)
    enc_out, hidden = tut.encode(src.t(), lens)
    pad_mask = torch.arange(src.shape[1])[None, :] >= lens[:, None]
    decoder_input = torch.full((1, len(sources)), BOS_ID, dtype=torch.long)
    tokens = []
    done = torch.zeros(len(sources), dtype=torch.bool)
    for t in range(max_length):
        probs, hidden = tut(decoder_input, hidden, enc_out, pad_mask)
        _, token = torch.max(_ban(probs, t, min_length), dim=1)
        tokens.append(token)
        done |= token == EOS_ID
        if bool(done.all()):
            break
        decoder_input = token.unsqueeze(0)
    return [row[: row.index(EOS_ID)] if EOS_ID in row else row for row in torch.stack(tokens, 1).tolist()]


@torch.inference_mode()
def beam(tut: TutorialSeq2Seq, sources: list[list[int]], beam_size: int, max_length: int,
         min_length: int = 1, alpha: float = 0.6) -> list[list[int]]:
    """Beam search the way tutorial extensions write it: item by item, one decoder call per beam."""
    replies = []
    for source in sources:
        src, lens = collate_sources([source])
        enc_out, hidden = tut.encode(src.t(), lens)
        pad_mask = torch.zeros(1, src.shape[1], dtype=torch.bool)
        live: list[tuple[list[int], float, State]] = [([], 0.0, hidden)]
        finished: list[tuple[list[int], float]] = []
        for t in range(max_length):
            candidates = []
            for toks, score, hid in live:
                inp = torch.tensor([[toks[-1] if toks else BOS_ID]])
                probs, new_hid = tut(inp, hid, enc_out, pad_mask)
                top_lp, top_i = torch.log(_ban(probs, t, min_length)).topk(beam_size, dim=1)
                for lp, i in zip(top_lp[0].tolist(), top_i[0].tolist(), strict=True):
                    candidates.append(([*toks, i], score + lp, new_hid))
            candidates.sort(key=lambda c: c[1], reverse=True)
            live = []
            for toks, score, hid in candidates:
                if toks[-1] == EOS_ID:
                    finished.append((toks[:-1], score))
                elif len(live) < beam_size:
                    live.append((toks, score, hid))
            if len(finished) >= beam_size:
                break
        pool = finished + [(toks, score) for toks, score, _ in live]
        best = max(pool, key=lambda c: c[1] / length_penalty(float(max(len(c[0]), 1)), alpha))
        replies.append(best[0])
    return replies


def train_step(tut: TutorialSeq2Seq, optimizer: torch.optim.Optimizer,
               examples: list[tuple[list[int], list[int]]], clip: float = 1.0) -> int:
    """One tutorial training step (teacher forcing, step by step); returns the target tokens."""
    src, lens = collate_sources([s for s, _ in examples])
    T = max(len(t) for _, t in examples)  # padded to the longest target of the batch
    target = torch.zeros(T, len(examples), dtype=torch.long)
    for j, (_, tgt) in enumerate(examples):
        target[: len(tgt), j] = torch.tensor(tgt)
    mask = target != 0
    pad_mask = torch.arange(src.shape[1])[None, :] >= lens[:, None]
    optimizer.zero_grad()
    enc_out, hidden = tut.encode(src.t(), lens)
    decoder_input = torch.full((1, len(examples)), BOS_ID, dtype=torch.long)
    loss = torch.zeros(())
    for t in range(T):
        probs, hidden = tut(decoder_input, hidden, enc_out, pad_mask)
        decoder_input = target[t].view(1, -1)  # teacher forcing
        nll = -torch.log(torch.gather(probs, 1, target[t].view(-1, 1)).squeeze(1))  # maskNLLLoss
        loss = loss + nll.masked_select(mask[t]).sum()
    n = int(mask.sum())
    (loss / n).backward()
    nn.utils.clip_grad_norm_(tut.parameters(), clip)
    optimizer.step()
    return n
