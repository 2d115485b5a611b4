"""Building engines: the one place that turns settings into a served model, used by the app
(app/main.py), `chatbot serve` (app/server.py) and the model worker (app/model_worker.py).

`ModelSpec` is all the model worker is told: the checkpoint, the device and the engine's
settings; the HTTP settings (the API key among them) stay in the HTTP process. This module
imports torch only in `load_engine`, which runs where the weights live.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .jobs import Engine, EngineConfig
from .metrics import Metrics
from .settings import Settings

if TYPE_CHECKING:
    from .engine import ChatEngine


@dataclass(frozen=True)
class ModelSpec:
    checkpoint: Path
    device: str  # "auto", "cpu" or "cuda": resolved where the model loads
    engine: EngineConfig
    fast_decoder: bool = True
    quantize: str = "none"
    log_level: str = "info"

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSpec:
        return cls(checkpoint=settings.checkpoint_path(), device=settings.device,
                   engine=EngineConfig(max_batch_size=settings.max_batch_size,
                                       max_queue=settings.max_queue, num_threads=settings.threads(),
                                       encoder_threads=settings.encoder_threads, seed=settings.seed),
                   fast_decoder=settings.fast_decoder, quantize=settings.quantize,
                   log_level=settings.log_level)


def build_engine(settings: Settings, metrics: Metrics | None = None) -> Engine:
    """The engine `chatbot serve` runs: in a model worker process of its own
    (CHATBOT_MODEL_PROCESS, the default; this process then reads the checkpoint's config and
    tokenizer only) or on threads of this process. A missing or broken checkpoint raises
    CheckpointError here, before anything starts (slow for an in-process engine: call off
    the event loop)."""
    spec = ModelSpec.from_settings(settings)
    if settings.model_process:
        from .remote_engine import RemoteEngine

        return RemoteEngine(spec, request_timeout_s=settings.request_timeout_s, metrics=metrics)
    return load_engine(spec, metrics)


def load_engine(spec: ModelSpec, metrics: Metrics | None = None) -> ChatEngine:
    """Load the weights and wrap them in an engine on threads of this process."""
    from model.checkpoint import load_checkpoint
    from model.device import pick_device
    from model.fastpath import FastDecoder

    from .engine import ChatEngine

    checkpoint = load_checkpoint(spec.checkpoint, device=pick_device(spec.device))
    if not spec.fast_decoder and spec.quantize == "none":
        return ChatEngine(checkpoint, spec.engine, metrics=metrics)
    fast = FastDecoder(checkpoint.model, quantize=None if spec.quantize == "none" else spec.quantize)
    return ChatEngine(checkpoint, spec.engine, step=fast.step, encode=fast.encode, metrics=metrics)
