"""Service settings: `CHATBOT_*` environment variables, read once (flags override them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.device import available_cores

from .reply_filter import DEFAULT_FALLBACK
from .schemas import DEFAULT_MMI_WEIGHT


class Settings(BaseSettings):
    # env_ignore_empty: `VAR=` (as compose passes an unset variable) means the default
    model_config = SettingsConfigDict(env_prefix="CHATBOT_", extra="ignore", frozen=True,
                                      env_ignore_empty=True)

    checkpoint: Path | None = Field(None, description="Checkpoint directory; unset: the shipped model")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="Bearer key for the chat and model endpoints")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS; unset: none")
    max_batch_size: int = Field(128, ge=1, le=4096,
                                description="Decoder rows in one step (a beam request uses beam_size)")
    max_queue: int = Field(512, ge=1, le=100_000, description="Requests waiting to join the batch")
    request_timeout_s: float = Field(60.0, gt=0, le=3600, description="Deadline per request (504)")
    max_input_chars: int = Field(2000, ge=1, le=100_000, description="Characters per message (422)")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Request body limit (413)")
    rate_limit_per_minute: int = Field(0, ge=0, le=1_000_000,
                                       description="API requests a minute per API key or client "
                                                   "address (429 + Retry-After); 0: off")
    num_threads: int = Field(0, ge=0, description="torch threads of the decoder thread; 0: all "
                             "cores but one (left to the encoder thread and the HTTP loop), at least 1")
    encoder_threads: int = Field(1, ge=1, le=256, description="torch threads of the encoder thread, "
                                 "which encodes new requests while the decoder thread decodes")
    model_process: bool = Field(True, description="Run the model in a worker process of its own, "
                                "HTTP in this one (more requests/s under concurrent load, see "
                                "docs/PERFORMANCE.md); false: on threads of the HTTP process")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fast_decoder: bool = Field(True, description="The fused decoder step (model/fastpath.py); same "
                               "results as the reference step, about 2x faster per token on CPU")
    quantize: Literal["none", "int8", "bf16"] = Field(
        "none", description="int8: dynamically quantized decoder matrices on CPU; bf16: bf16 decoder "
        "matrices on a CPU with native bf16 (AMX); both faster, see docs/PERFORMANCE.md")
    seed: int | None = Field(None, description="Seed of the sampling generator; unset: random")
    rerank: Literal["none", "likelihood", "mmi"] = Field(
        "likelihood", description="How a request that does not say chooses its reply among the "
        "candidates (the judged best, docs/QUALITY.md); mmi needs a checkpoint with a reverse model")
    mmi_weight: float = Field(DEFAULT_MMI_WEIGHT, ge=0.0, le=10.0,
                              description="Weight of log p(message | reply) in rerank mmi (docs/QUALITY.md)")
    reply_filter: bool = Field(True, description="Drop candidates with blocked words (better-profanity's "
                               "list plus CHATBOT_BLOCKLIST); the fallback reply when all are")
    blocklist: Path | None = Field(None, description="The operator's own blocked words or phrases, "
                                   "one per line (# comments)")
    fallback_reply: str = Field(DEFAULT_FALLBACK, min_length=1, max_length=500,
                                description="The reply when the filter blocks every candidate")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight "
                                                               "requests may take to finish")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value

    def threads(self) -> int:
        return self.num_threads or max(1, available_cores() - 1)

    def checkpoint_path(self) -> Path:
        if self.checkpoint is not None:
            return self.checkpoint
        from model.checkpoint_meta import shipped_checkpoint_path

        return shipped_checkpoint_path()
