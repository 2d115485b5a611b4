"""Request and response models of the HTTP API.

Requests validate strictly: no string or boolean is coerced into a number, NaN and
infinities are refused, every number has bounds and every default is written down.
`/api/chat` refuses unknown fields; the OpenAI-compatible request ignores them, as
OpenAI-compatible servers do, because chat front ends send parameters (`stop`,
`presence_penalty`, `user`, ...) that a seq2seq model has no use for.

Text fields carry the mark `x-input-text`: the served OpenAPI schema turns it into
`maxLength` = CHATBOT_MAX_INPUT_CHARS (see main.py), which the routes enforce.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from model.options import DEFAULT_LENGTH_PENALTY, DEFAULT_NO_REPEAT_NGRAM_SIZE

Strategy = Literal["greedy", "beam", "sample"]
Rerank = Literal["none", "likelihood", "mmi"]
# /api/chat's defaults: what was judged best on bench/prompts_dev.txt (docs/QUALITY.md)
DEFAULT_STRATEGY: Strategy = "beam"
DEFAULT_BEAM_SIZE = 5
DEFAULT_SAMPLES = 16
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9
DEFAULT_MMI_WEIGHT = 0.5  # CHATBOT_MMI_WEIGHT's default
TEXT_CEILING = 1_000_000  # the schema's static bound; the served limit is CHATBOT_MAX_INPUT_CHARS
INPUT_TEXT: dict[str, Any] = {"x-input-text": True}
MAX_TURNS = 256  # history / messages items
MAX_BEAM = 16
MAX_TOKENS = 256


def _integral(value: Any) -> Any:
    """JSON Schema counts 7.0 as an integer, so it is one here (7); "7", true and 7.5 are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Bounded(lo: int, hi: int) -> Any:  # a type factory, named like a type
    """An integer in [lo, hi], written inside the type so that the bounds reach the
    schema of an optional field too."""
    return Annotated[int, Field(ge=lo, le=hi), BeforeValidator(_integral)]


MIN_TOP_P = 1e-6  # smaller masses underflow float32 to 0 and would leave no token to sample


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


# -- errors ------------------------------------------------------------------
class FieldError(BaseModel):
    param: str = Field(description="Dotted path of the field, e.g. `history.0.role`")
    message: str


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, overloaded_error, ...")
    param: str | None = Field(None, description="The field at fault, when there is one")
    code: str | None = None
    details: list[FieldError] | None = Field(None, description="Every invalid field (422 only)")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- REST chat -------------------------------------------------------------------
class Turn(Strict):
    role: Literal["user", "assistant"]
    content: str = Field(max_length=TEXT_CEILING, json_schema_extra=INPUT_TEXT)


class ChatRequest(Strict):
    """A message and the conversation before it; the server keeps no state."""

    message: str = Field(min_length=1, max_length=TEXT_CEILING, json_schema_extra=INPUT_TEXT,
                         description="The user's new message")
    history: list[Turn] = Field(default_factory=list, max_length=MAX_TURNS,
                                description="Earlier turns, oldest first; the model sees the last "
                                            "few (its `context_turns`, message included)")
    strategy: Strategy = Field(DEFAULT_STRATEGY, description="greedy, beam (n-best) or sample; the "
                               "default is the setting that was judged best (docs/QUALITY.md)")
    beam_size: Bounded(1, MAX_BEAM) = Field(DEFAULT_BEAM_SIZE, description="Beam width (beam only); "
                                            "raised to n_best when smaller")
    n_best: Bounded(1, MAX_BEAM) = Field(1, description="Candidates to return: the n best beams, "
                                                         "or n samples; greedy gives one")
    max_length: Bounded(1, MAX_TOKENS) = Field(40, description="Reply length cap in tokens")
    length_penalty: float = Field(DEFAULT_LENGTH_PENALTY, ge=0.0, le=5.0,
                                  description="GNMT length penalty alpha for scores; 0 disables")
    no_repeat_ngram_size: Bounded(0, 10) = Field(DEFAULT_NO_REPEAT_NGRAM_SIZE,
                                      description="Forbid repeating any n-gram of this size; 0 off")
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.01, le=5.0,
                               description="Sampling temperature (sample only)")
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0, description="Nucleus sampling mass (sample only)")
    samples: Bounded(1, MAX_BEAM) = Field(DEFAULT_SAMPLES, description="Samples drawn (sample only; at "
                                          "least n_best): the reply is chosen among them by `rerank`")
    rerank: Rerank | None = Field(None, description="How the reply is chosen among the candidates: "
                                  "none (the search's order), likelihood (length-normalised "
                                  "log-probability) or mmi (plus log p(message | reply) from the reverse "
                                  "model); unset: the server's CHATBOT_RERANK")
    mmi_weight: float | None = Field(None, ge=0.0, le=10.0,
                                     description="Weight of the reverse model's score (mmi); unset: "
                                                 "the server's CHATBOT_MMI_WEIGHT")


class Candidate(BaseModel):
    text: str
    score: float = Field(description="The score the candidates were ranked by (see `rerank`): "
                                     "log-probability / GNMT length penalty, or the MMI score; "
                                     "higher is better")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class ChatResponse(BaseModel):
    reply: str
    candidates: list[Candidate] = Field(description="Distinct replies, best first; reply is the first "
                                                    "(candidates the reply filter blocked are left out)")
    strategy: Strategy
    rerank: Rerank = Field(description="How the reply was chosen")
    model: str
    usage: Usage
    latency_ms: float


# -- OpenAI-compatible -------------------------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str = Field(max_length=TEXT_CEILING, json_schema_extra=INPUT_TEXT)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="user and assistant turns feed the model; the others are accepted and not seen")
    content: (Annotated[str, Field(max_length=TEXT_CEILING, json_schema_extra=INPUT_TEXT)]
              | Annotated[list[TextPart], Field(max_length=64)] | None) = Field(
        None, description="Text, or a list of text parts; null counts as empty")
    name: str | None = Field(None, max_length=256)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request; the beam options are extra fields."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    messages: list[Message] = Field(min_length=1, max_length=MAX_TURNS)
    model: str | None = Field(None, max_length=256,
                              description="Any name is accepted; the served model answers")
    max_tokens: Bounded(1, MAX_TOKENS) | None = Field(None, description="Default 40")
    max_completion_tokens: Bounded(1, MAX_TOKENS) | None = Field(None,
                                              description="Alias of max_tokens")
    n: Bounded(1, MAX_BEAM) = Field(1, description="Choices: n-best beams (temperature 0 or "
                                                    "unset) or n samples (temperature > 0)")
    temperature: float | None = Field(None, ge=0.0, le=2.0,
                                      description="0 or unset: deterministic (greedy, or beam when "
                                                  "n > 1); > 0: sampling")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    strategy: Strategy | None = Field(None, description="Extra: force greedy, beam or sample")
    beam_size: Bounded(1, MAX_BEAM) | None = Field(None, description="Extra: beam width; > 1 "
                                                                      "selects beam search")
    length_penalty: float | None = Field(None, ge=0.0, le=5.0,
                                         description=f"Extra: default {DEFAULT_LENGTH_PENALTY}")
    no_repeat_ngram_size: Bounded(0, 10) | None = Field(
        None, description=f"Extra: default {DEFAULT_NO_REPEAT_NGRAM_SIZE}")
    rerank: Rerank | None = Field(None, description="Extra: none, likelihood or mmi (see /api/chat)")
    mmi_weight: float | None = Field(None, ge=0.0, le=10.0, description="Extra: see /api/chat")
    samples: Bounded(1, MAX_BEAM) | None = Field(None, description="Extra: samples drawn to choose "
                                                  "each choice among (sampling; default n)")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "content_filter"] = Field(
        description="content_filter: the reply filter blocked every candidate (the fallback reply)")
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "seq2seq-chatbot"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- service ---------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    model: str


class ModelInfo(BaseModel):
    name: str
    parameters: int
    vocab_size: int
    architecture: dict[str, Any] = Field(description="The checkpoint's model config")
    training: dict[str, Any] = Field(description="Corpus and training summary from config.json")
    metrics: dict[str, Any] = Field(description="metrics.json: validation / test scores")
    device: str
    engine: dict[str, Any] = Field(description="Batching limits the engine runs with")
    reverse: dict[str, Any] | None = Field(None, description="The reverse model rerank 'mmi' scores "
                                           "with (name, parameters, architecture, metrics); null: none")
