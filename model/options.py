"""What a search is asked for and what it gives back: plain data, no torch (the HTTP
process builds these and reads them; model/decoding.py runs the searches)."""

from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("greedy", "beam", "sample")
RERANKS = ("none", "likelihood", "mmi")  # model/rerank.py
# What a reply gets unless its request says otherwise, in the HTTP API, `chatbot chat` and the
# settings `chatbot eval` compares (docs/QUALITY.md). DecodeOptions' own no_repeat_ngram_size
# stays 0 (no ban), so that a search built without it is the plain one.
DEFAULT_LENGTH_PENALTY = 0.6  # GNMT alpha
DEFAULT_NO_REPEAT_NGRAM_SIZE = 3  # greedy LSTMs love "cooking, cooking, cooking"


@dataclass(frozen=True)
class DecodeOptions:
    strategy: str = "greedy"
    beam_size: int = 4
    # beam: how many finished hypotheses the search must settle before an item may stop early
    # (it returns every finished one it has, best first, up to beam_size); sample: how many samples
    n_best: int = 1
    max_length: int = 40
    min_length: int = 1
    length_penalty: float = DEFAULT_LENGTH_PENALTY  # GNMT alpha; 0 disables
    no_repeat_ngram_size: int = 0  # 0: no ban (replies use DEFAULT_NO_REPEAT_NGRAM_SIZE)
    early_stopping: bool = True  # beam: stop an item once no live beam can beat its n_best (BeamSearch)
    temperature: float = 1.0
    top_p: float = 1.0
    # How the reply is chosen among the candidates (model/rerank.py). Not compared: requests that
    # search alike share one search whatever their reranking.
    rerank: str = field(default="likelihood", compare=False)
    mmi_weight: float = field(default=0.5, compare=False)
    length_bonus: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.beam_size < 1 or self.n_best < 1 or self.max_length < 1:
            raise ValueError("beam_size, n_best and max_length must be >= 1")
        if self.strategy == "beam" and self.n_best > self.beam_size:
            raise ValueError("n_best must be <= beam_size")
        if self.min_length < 0 or self.min_length > self.max_length:
            raise ValueError("min_length must be in [0, max_length]")
        if self.rerank not in RERANKS:
            raise ValueError(f"rerank must be one of {', '.join(RERANKS)}")
        if not (0.0 <= self.mmi_weight <= 10.0 and -1.0 <= self.length_bonus <= 1.0):
            raise ValueError("mmi_weight must be in [0, 10] and length_bonus in [-1, 1]")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")

    @property
    def rows_per_item(self) -> int:
        if self.strategy == "beam":
            return self.beam_size
        return self.n_best if self.strategy == "sample" else 1


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, without the end-of-sequence token
    score: float  # log-probability divided by the GNMT length penalty
    logprob: float
    finished: bool = True  # False when cut at max_length
