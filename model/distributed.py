"""Data-parallel training under `torchrun`: DistributedDataParallel over gloo (CPU) or NCCL (GPUs).

`chatbot train` looks at the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, ...)
and, when there is more than one process, trains with one model replica per process:

- Setup: rank 0 alone reads the config, checks the output directory, reads the state to resume,
  loads the corpus and trains the tokenizer; the result (config, tokenizer, encoded pairs, state) is
  broadcast to the other ranks, so other machines need neither the files nor the output directory.
- Data: every rank builds the same seeded, length-bucketed order of global batches of
  N x batch_size pairs (exactly the batches of one process with that batch size) and trains on
  its contiguous slice of each (`shard`), so all ranks run the same number of steps.
- Gradients: each rank's summed loss is divided by the global batch's tokens / N and DDP averages
  the gradients, so a step follows the global batch's per-token mean, like one process with
  N x batch_size pairs. The learning rate is not scaled: set it for the effective batch.
- Randomness: dropout (and teacher-forcing sampling) draw from a seed made of (seed, step, rank),
  so ranks differ and a resume continues the same streams without any per-rank RNG state on disk.
- Validation is sharded over the ranks and summed with all_reduce, so every rank holds the same
  loss and takes the same early-stopping decision; rank 0 alone writes checkpoints, the training
  state, log.jsonl, the loss curve and the progress bar.
- Signals: a SIGINT/SIGTERM seen by any rank is shared in the per-step all_reduce; all ranks stop
  after the same step and rank 0 saves the state once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .data import Example
from .evaluation import LossStats, evaluate_loss
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .config import RunConfig
    from .finetune import InitWeights
    from .network import Seq2Seq
    from .training import Corpus

log = logging.getLogger(__name__)

BACKEND_ENV = "CHATBOT_DIST_BACKEND"  # gloo or nccl; default: nccl with GPUs, gloo without

Setup = tuple["RunConfig", "Corpus", "dict[str, Any] | None", "InitWeights | None"]


class _LossOf(nn.Module):
    """Gives DDP a forward(): it only reduces gradients of work done inside its wrapped forward."""

    def __init__(self, model: Seq2Seq, loss_fn: Callable[[Seq2Seq, Any], tuple[torch.Tensor, int]]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> tuple[torch.Tensor, int]:
        return self.loss_fn(self.model, batch)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device  # this rank's compute device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo is happiest with CPU ones
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def cpu_threads(self) -> int:
        """Default CPU threads per rank: the machine's cores shared by its ranks."""
        return max(1, (os.cpu_count() or 1) // self.local_world_size)

    # -- data --------------------------------------------------------------
    def shard(self, batches: Sequence[list[int]]) -> list[list[int]]:
        """This rank's slice of each global batch.

        A global batch holds pairs in length order, so each contiguous slice is itself a
        length bucket. Batches with fewer pairs than ranks (at most the odd leftover bucket)
        are skipped, so every rank gets a non-empty slice and all run the same number of steps.
        """
        from .training import TrainingError

        N, r = self.world_size, self.rank
        kept = [b for b in batches if len(b) >= N]
        if not kept:
            raise TrainingError(f"no batch holds at least one pair for each of the {N} processes; "
                                "the corpus is too small for this many processes")
        return [list(b[r * len(b) // N: (r + 1) * len(b) // N]) for b in kept]

    # -- the model ---------------------------------------------------------
    def wrap(self, model: Seq2Seq, loss_fn: Callable[[Seq2Seq, Any], tuple[torch.Tensor, int]],
             ) -> DistributedDataParallel:
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Construction broadcasts rank 0's weights, so replicas start equal whatever they loaded.
        return DistributedDataParallel(_LossOf(model, loss_fn), device_ids=ids, output_device=None)

    def seed_step(self, seed: int, step: int, rng: random.Random) -> None:
        digest = hashlib.blake2b(f"{seed}/{step}/{self.rank}".encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little") >> 1
        torch.manual_seed(value)
        rng.seed(value)

    # -- collectives ---------------------------------------------------------
    def sync_step(self, num_tokens: int, stop: bool) -> tuple[int, bool]:
        """Before a step: the global batch's target tokens, and whether any rank was signalled."""
        t = torch.tensor([num_tokens, int(stop)], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t)
        tokens, stops = t.tolist()
        return int(tokens), stops > 0

    def all_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item())

    def broadcast_flag(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self._comm_device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def evaluate_loss(self, model: Seq2Seq, tokenizer: Tokenizer, examples: Sequence[Example]) -> LossStats:
        """Each rank scores every N-th example; the sums are all-reduced, so all ranks agree."""
        part = evaluate_loss(model, tokenizer, list(examples[self.rank::self.world_size]))
        t = torch.tensor([part.nll, part.tokens, part.words, part.pairs], dtype=torch.float64,
                         device=self._comm_device)
        dist.all_reduce(t)
        nll, tokens, words, pairs = t.tolist()
        return LossStats(nll=nll, tokens=round(tokens), words=round(words), pairs=round(pairs))

    def share_setup(self, prepare: Callable[[], Setup]) -> Setup:
        """Run `prepare` on rank 0 and hand its result (or its error) to every rank."""
        from .training import Corpus

        box: list[Any] = [None]
        if self.is_main:
            try:
                cfg, data, state, init = prepare()
            except Exception as exc:
                box[0] = ("error", _picklable(exc))
                dist.broadcast_object_list(box, src=0)
                raise
            # The tokenizer travels as its JSON; examples are plain lists of ints.
            box[0] = ("ok", (cfg, data.tokenizer.to_str(), data.tokenizer.lowercase, data.train,
                             data.valid, data.test, data.summary, state, init))
            dist.broadcast_object_list(box, src=0)
            return cfg, data, state, init
        dist.broadcast_object_list(box, src=0)
        kind, payload = box[0]
        if kind == "error":
            raise payload
        cfg, tok_json, lowercase, train, valid, test, summary, state, init = payload
        tokenizer = Tokenizer.from_str(tok_json, lowercase=lowercase)
        corpus = Corpus(tokenizer=tokenizer, train=train, valid=valid, test=test, summary=summary)
        return cfg, corpus, state, init

    def compare_replicas(self, model: nn.Module) -> dict[str, Any]:
        """Whether every rank holds the same weights: per-rank digests and the largest difference."""
        flat = torch.cat([p.detach().float().reshape(-1) for p in model.state_dict().values()])
        digest = hashlib.sha256(flat.cpu().numpy().tobytes()).hexdigest()[:16]
        digests: list[Any] = [None] * self.world_size
        dist.all_gather_object(digests, digest)
        high = flat.to(self._comm_device, copy=True)
        low = flat.to(self._comm_device, copy=True)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        diff = float((high - low).abs().max()) if flat.numel() else 0.0
        report = {"identical": len(set(digests)) == 1, "max_abs_diff": diff, "digests": digests}
        if not report["identical"] and self.is_main:
            log.warning("replicas differ after training: %s", report)
        return report

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _picklable(exc: Exception) -> Exception:
    from .training import TrainingError

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return TrainingError(str(exc))


def init_from_env() -> DistContext | None:
    """Join the process group torchrun describes; None for a plain single-process run."""
    from .training import TrainingError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if "RANK" not in os.environ:
        raise TrainingError(f"WORLD_SIZE={world} but RANK is not set: start the processes with torchrun")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise TrainingError(f"{BACKEND_ENV}={backend!r}: expected gloo or nccl")
    if backend == "nccl" and not cuda:
        raise TrainingError("the NCCL backend needs CUDA GPUs; none is visible (use gloo)")
    if cuda:
        count = torch.cuda.device_count()
        if local_world > count:
            log.warning("%d processes on this node share %d GPU(s)", local_world, count)
        device = torch.device("cuda", local_rank % count)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    try:
        # env:// rendezvous: torchrun sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE
        dist.init_process_group(backend, rank=rank, world_size=world)
    except (RuntimeError, ValueError) as exc:
        raise TrainingError(f"cannot join the process group (rank {rank} of {world}): {exc}") from exc
    if rank == 0:
        log.info("data-parallel training: %d processes, backend %s, device %s", world, backend, device)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                       device=device, backend=backend)
