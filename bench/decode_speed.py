"""Decoding speed: the fast path against the reference path and a tutorial-style decoder.

    python bench/decode_speed.py            # the full table (a few minutes on 2 cores)
    python bench/decode_speed.py --quick    # a smoke test in seconds: a tiny model, batches 1 and 4

Every path computes the same function with the same weights (E=256, H=512, 2
layers, vocab 8,000, random weights unless --checkpoint): the tutorial-style decoder
is built from the model's own weights, so its greedy replies are checked to be the
model's. Replies are forced to `--length` tokens (end-of-sequence is banned until
then), so every path does the same work.

- tutorial: the classic PyTorch chatbot tutorial's way: a packed bidirectional
  encoder, then per time step an `nn.LSTM` call, attention energies recomputed
  with an `nn.Linear` over the encoder outputs, `nn.Linear` output layers, softmax
  then max/topk; beam search one hypothesis at a time (one decoder call per beam).
- reference: `model.inference.decode_sources` (eager `Seq2Seq.step`, batched searches).
- fast / fast-int8: `model.fastpath.FastDecoder(model[, quantize="int8"]).decode_sources`.

Bounds: the weight-read bound at batch 1 is the bytes one step reads (matrices and
the attention memory of one row) over the memory bandwidth measured here, both for
a buffer far larger than the caches (DRAM) and for one the size of the weights read
over and over (what a decode loop sees when the weights stay in cache). The GEMM
bound at batch 64 is the step's matrix products alone, timed back to back.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import best_time, calls_for, machine_line, table
from torch import Tensor
from tutorial import TutorialSeq2Seq, beam, greedy

from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.decoding import DecodeOptions
from model.device import available_cores
from model.fastpath import FastDecoder, Linear
from model.inference import collate_sources, decode_sources, encode_sources, step_rows
from model.network import Seq2Seq

SHIPPED_SIZE = ModelConfig(vocab_size=8000, embedding_dim=256, hidden_size=512, num_layers=2)
QUICK_SIZE = ModelConfig(vocab_size=500, embedding_dim=32, hidden_size=64, num_layers=2)

# -- bounds ---------------------------------------------------------------------------------


def read_bandwidth(nbytes: int, seconds: float = 0.5) -> float:
    """Bytes per second that `sum` reads from a float32 buffer of `nbytes`."""
    buf = torch.ones(max(nbytes // 4, 1024))
    n = calls_for(lambda: buf.sum(), seconds / 5)
    return buf.numel() * 4 / best_time(lambda: buf.sum(), repeats=5, number=n)


def gemm_time(fd: FastDecoder, R: int, repeats: int, seconds: float = 0.1) -> float:
    """The step's matrix products alone for R rows, back to back (seconds)."""
    mats: list[Linear] = [*fd.gates, fd.combine, fd.out]
    if fd.bottleneck is not None:
        mats.append(fd.bottleneck)

    def inputs(m: Linear) -> Tensor:
        k = m.in_features
        return torch.randn(R, k)

    xs = [inputs(m) for m in mats]

    def run() -> None:
        for m, x in zip(mats, xs, strict=True):
            m(x)

    with torch.inference_mode():
        return best_time(run, repeats=repeats, number=calls_for(run, seconds))


# -- the run --------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: a tiny random model, batches 1 and 4, short replies, one repeat")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--length", type=int, default=20, help="reply tokens per source")
    p.add_argument("--source-length", type=int, default=20)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: all cores; --quick: 1)")
    p.add_argument("--checkpoint", help="a checkpoint directory instead of random weights")
    p.add_argument("--no-tutorial", action="store_true", help="skip the (slow) tutorial-style decoder")
    p.add_argument("--tutorial-beam-items", type=int, default=8,
                   help="the tutorial beam decodes items one by one; time this many and scale")
    args = p.parse_args()
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",")]
    repeats = 1 if args.quick else args.repeats
    if args.quick:  # every path still runs, on sizes that take seconds
        args.length = args.source_length = 6
        args.beam_size, args.tutorial_beam_items = 3, 2
    time_scale = 0.1 if args.quick else 1.0  # of the seconds calls_for and read_bandwidth spend
    torch.set_num_threads(args.threads or (1 if args.quick else available_cores()))
    torch.manual_seed(0)

    if args.checkpoint:
        model = load_checkpoint(args.checkpoint).model.eval()
        label = f"checkpoint {args.checkpoint}"
    else:
        model = Seq2Seq(QUICK_SIZE if args.quick else SHIPPED_SIZE).eval()
        label = "random weights"
    cfg = model.cfg
    print(f"# decode speed: E={cfg.embedding_dim} H={cfg.hidden_size} L={cfg.num_layers} "
          f"V={cfg.vocab_size}, {label}, source {args.source_length} tokens, reply {args.length} tokens")
    print(f"# {machine_line()}\n")
    fast, int8 = FastDecoder(model), FastDecoder(model, quantize="int8")
    tut = TutorialSeq2Seq(model).eval()
    gen = torch.Generator().manual_seed(1)
    max_b = max(batches)
    all_sources = torch.randint(5, cfg.vocab_size, (max_b, args.source_length), generator=gen).tolist()
    greedy_opts = DecodeOptions(strategy="greedy", max_length=args.length, min_length=args.length)
    beam_opts = DecodeOptions(strategy="beam", beam_size=args.beam_size, max_length=args.length,
                              min_length=args.length)

    # Same function: the tutorial decoder's greedy replies are the model's.
    check = all_sources[:2]
    same = greedy(tut, check, args.length, args.length) == [
        h[0].tokens for h in decode_sources(model, check, greedy_opts)] == [
        h[0].tokens for h in fast.decode_sources(check, greedy_opts)]
    print(f"greedy replies identical across tutorial / reference / fast: {same}\n")

    # 1. one decoder step at batch 1
    rows = encode_sources(model, all_sources[:1])
    src, lens = collate_sources(all_sources[:1])
    enc_out, hidden = tut.encode(src.t(), lens)
    mask = torch.zeros(1, src.shape[1], dtype=torch.bool)
    tok = torch.tensor([7])
    with torch.inference_mode():
        tutorial_step = {"tutorial": lambda: tut(tok[None], hidden, enc_out, mask)[0].max(1)}
        steps = {
            **({} if args.no_tutorial else tutorial_step),
            "reference": lambda: step_rows(model, tok, rows),
            "fast": lambda: fast.step(tok, rows),
            "fast-int8": lambda: int8.step(tok, rows),
        }
        step_ms = {k: 1e3 * best_time(f, repeats=5 * repeats, number=calls_for(f, 0.05 * time_scale))
                   for k, f in steps.items()}
    attn = 2 * args.source_length * cfg.hidden_size * 4
    bw_dram = read_bandwidth(1 << (24 if args.quick else 29), 0.5 * time_scale)
    bw_cache = read_bandwidth(fast.matrix_bytes(), 0.5 * time_scale)
    bytes_f32, bytes_i8 = fast.matrix_bytes() + attn, int8.matrix_bytes() + attn
    bound = {k: 1e3 * b / bw for k, b, bw in (("dram", bytes_f32, bw_dram), ("cache", bytes_f32, bw_cache),
                                             ("dram8", bytes_i8, bw_dram), ("cache8", bytes_i8, bw_cache))}
    print(f"read bandwidth: {bw_dram / 1e9:.1f} GB/s from a {16 if args.quick else 512} MiB buffer (DRAM), "
          f"{bw_cache / 1e9:.1f} GB/s from a {fast.matrix_bytes() / 2**20:.1f} MiB one (cache)")
    print(f"bytes per step at batch 1: {bytes_f32 / 1e6:.1f} MB float32, {bytes_i8 / 1e6:.1f} MB int8")
    print(f"weight-read bound at batch 1: {bound['cache']:.3f} ms (cache) / {bound['dram']:.3f} ms (DRAM) "
          f"float32; {bound['cache8']:.3f} / {bound['dram8']:.3f} ms int8\n")
    rows_1 = []
    for k, ms in step_ms.items():
        i8 = k == "fast-int8"
        b_cache, b_dram = (bound["cache8"], bound["dram8"]) if i8 else (bound["cache"], bound["dram"])
        rows_1.append([k, ms, step_ms.get("tutorial", math.nan) / ms, ms / b_cache, ms / b_dram])
    print("one decoder step, batch 1 (step only, no search):\n")
    print(table(["path", "ms/step", "speed-up vs tutorial", "x cache bound", "x DRAM bound"], rows_1))

    # 2. whole replies
    paths = ([] if args.no_tutorial else ["tutorial"]) + ["reference", "fast", "fast-int8"]
    decoders = {"reference": lambda s, o: decode_sources(model, s, o), "fast": fast.decode_sources,
                "fast-int8": int8.decode_sources}
    results: dict[tuple[str, str, int], float] = {}
    for B in batches:
        sources = all_sources[:B]
        for strat, opts in (("greedy", greedy_opts), (f"beam {args.beam_size}", beam_opts)):
            for name in paths:
                if name == "tutorial":
                    if strat == "greedy":
                        run = lambda s=sources: greedy(tut, s, args.length, args.length)  # noqa: E731
                        scale = 1.0
                    else:  # items one after another: time a few, scale to B
                        n = min(B, args.tutorial_beam_items)
                        run = lambda s=sources[:n]: beam(tut, s, args.beam_size, args.length,  # noqa: E731
                                                         args.length)
                        scale = B / n
                else:
                    run = lambda s=sources, o=opts, f=decoders[name]: f(s, o)  # type: ignore[misc]  # noqa: E731
                    scale = 1.0
                small = B <= 8 and name != "tutorial"  # cheap to repeat; noisy with 2 threads
                n_rep = 3 * repeats if small else repeats
                t = best_time(run, repeats=n_rep, warmup=1 if B <= 8 else 0) * scale
                results[(name, strat, B)] = t
                print(f"  {name:9s} {strat:7s} batch {B:3d}: {t * 1e3:9.1f} ms", flush=True)
    tokens = args.length  # every reply is exactly this long
    print("\nreplies (encoder included), reply tokens per second and ms per reply token:\n")
    head = ["path", "strategy", *[f"tok/s b={b}" for b in batches], "ms/token b=1", "vs tutorial b=1"]
    out = []
    for strat in ("greedy", f"beam {args.beam_size}"):
        for name in paths:
            if (name, strat, batches[0]) not in results:
                continue
            tps = [B * tokens / results[(name, strat, B)] for B in batches]
            ms_tok = 1e3 * results[(name, strat, 1)] / tokens if 1 in batches else math.nan
            tut_t = results.get(("tutorial", strat, 1))
            out.append([name, strat, *tps, ms_tok,
                        tut_t / results[(name, strat, 1)] if tut_t and 1 in batches else math.nan])
    print(table(head, out))
    if 1 in batches:
        print("\nbeam / greedy cost per reply at batch 1: " + ", ".join(
            f"{n} {results[(n, f'beam {args.beam_size}', 1)] / results[(n, 'greedy', 1)]:.2f}x"
            for n in paths if (n, "greedy", 1) in results))

    # 3. the GEMM bound at large batch
    R = max_b
    rowsR = encode_sources(model, all_sources[:R])
    tokR = torch.full((R,), 7)
    with torch.inference_mode():
        step_f = best_time(lambda: fast.step(tokR, rowsR), repeats=3 * repeats, number=3)
        step_8 = best_time(lambda: int8.step(tokR, rowsR), repeats=3 * repeats, number=3)
        step_r = best_time(lambda: step_rows(model, tokR, rowsR), repeats=3 * repeats, number=3)
    g32 = gemm_time(fast, R, 3 * repeats, 0.1 * time_scale)
    g8 = gemm_time(int8, R, 3 * repeats, 0.1 * time_scale)
    sources = all_sources[:R]
    encode = {"reference": lambda: encode_sources(model, sources), "fast": lambda: fast.encode(sources),
              "fast-int8": lambda: int8.encode(sources)}
    enc_s = {k: best_time(f, repeats=3 * repeats) for k, f in encode.items()}
    print(f"\nbatch {R}: GEMM bound {R / g32:.0f} tok/s float32 ({g32 * 1e3:.2f} ms of products a step), "
          f"{R / g8:.0f} tok/s int8 ({g8 * 1e3:.2f} ms); the encoder takes "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in enc_s.items()) + f" for {R} sources\n")
    out = []
    for name, step_s, gemm in (("reference", step_r, g32), ("fast", step_f, g32), ("fast-int8", step_8, g8)):
        reply = results.get((name, "greedy", R), math.nan)
        decode_s = reply - enc_s[name]
        out.append([name, R / step_s, 100 * gemm / step_s, R * tokens / decode_s,
                    100 * gemm * tokens / decode_s, R * tokens / reply])
    print(table(["path", "step-only tok/s", "% of GEMM bound", "greedy decode tok/s (no encoder)",
                 "% of GEMM bound", "greedy replies tok/s"], out))
    print(f"\n# finished {time.strftime('%Y-%m-%d %H:%M')}; {machine_line()}")


if __name__ == "__main__":
    main()
