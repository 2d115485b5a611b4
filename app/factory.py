"""Building engines: the one place that turns settings into a served model, used by the app
(app/main.py), `chatbot serve` (app/server.py) and the model worker (app/model_worker.py).

The model worker is told a ModelSpec (app/spec.py) only. This module imports torch only in
`load_engine`, which runs where the weights live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .jobs import Engine
from .metrics import Metrics
from .remote_engine import RemoteEngine
from .spec import ModelSpec

if TYPE_CHECKING:  # the model worker imports this module: neither the HTTP settings nor pydantic
    from .engine import ChatEngine
    from .settings import Settings


def build_engine(settings: Settings, metrics: Metrics | None = None) -> Engine:
    """The engine `chatbot serve` runs: in a model worker process of its own
    (CHATBOT_MODEL_PROCESS, the default; this process then reads the checkpoint's config and
    tokenizer only) or on threads of this process. A missing or broken checkpoint raises
    CheckpointError here, before anything starts (slow for an in-process engine: call off
    the event loop)."""
    spec = ModelSpec.from_settings(settings)
    if settings.model_process:
        return RemoteEngine(spec, request_timeout_s=settings.request_timeout_s, metrics=metrics)
    return load_engine(spec, metrics)


def load_engine(spec: ModelSpec, metrics: Metrics | None = None, *,
                defer_tokenizer: bool = False) -> ChatEngine:
    """Load the weights and wrap them in an engine on threads of this process.
    `defer_tokenizer`: for the model worker, which is sent token ids and never tokenises (the
    HTTP process read and checked the checkpoint's tokenizer): about 8 MiB less."""
    from model.checkpoint import load_checkpoint
    from model.device import pick_device
    from model.fastpath import FastDecoder

    from . import allocator
    from .engine import ChatEngine

    allocator.fix_mmap_threshold()
    checkpoint = load_checkpoint(spec.checkpoint, device=pick_device(spec.device),
                                 defer_tokenizer=defer_tokenizer)
    if not spec.fast_decoder and spec.quantize == "none":
        return ChatEngine(checkpoint, spec.engine, metrics=metrics)
    fast = FastDecoder(checkpoint.model, quantize=None if spec.quantize == "none" else spec.quantize)
    engine = ChatEngine(checkpoint, spec.engine, step=fast.step, encode=fast.encode, metrics=metrics)
    if spec.quantize != "int8":
        fast.release_model_step()  # the engine decodes through `fast` only: one copy of each weight
    return engine
