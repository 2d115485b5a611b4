"""ModelSpec: all the model worker process is told (app/model_worker.py): the checkpoint, the
device and the engine's settings. The HTTP settings, the API key among them, stay in the HTTP
process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .jobs import EngineConfig

if TYPE_CHECKING:  # the worker never imports the HTTP settings (pydantic: ~9 MiB of its memory)
    from .settings import Settings


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
