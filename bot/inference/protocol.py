"""Requests, results and errors of the inference service.

This module is imported by the bot process, so it must stay free of torch and
transformers: the bot only describes work here; worker processes do it.

Each request type names its ``task`` (a function in :mod:`bot.worker.tasks`,
or ``"module:function"`` for tasks that live elsewhere) and its model ``role``.
Requests of the same role, task and :meth:`Request.batch_key` may be batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from bot.errors import Busy as Busy
from bot.errors import DeadlineExceeded as DeadlineExceeded
from bot.errors import InferenceError as InferenceError
from bot.errors import InputTooLong as InputTooLong
from bot.errors import InvalidText as InvalidText
from bot.errors import ModelFailed as ModelFailed
from bot.errors import NoModelForRole as NoModelForRole
from bot.errors import TaskNotFound as TaskNotFound
from bot.errors import TooCostly as TooCostly
from bot.errors import TooManyRequests as TooManyRequests
from bot.errors import WorkerDied as WorkerDied

# The placeholder a fill-mask request uses for a blank; the worker swaps it for
# the model's own mask token ([MASK] for BERT, <mask> for RoBERTa, ...).
MASK = "\x00MASK\x00"


def check_text(texts: list[str]) -> None:
    """Refuse strings that are not text: anything a worker could not encode as UTF-8.

    Python strings may hold lone surrogates (U+D800..U+DFFF, half of a UTF-16 pair,
    e.g. from JSON ``"\\ud800"`` or undecodable command-line bytes); tokenizers fail on them.
    """
    for text in texts:
        if not isinstance(text, str):
            raise InvalidText(f"A model can only read text, not {type(text).__name__}.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(text[exc.start])
            raise InvalidText(
                f"That text contains U+{code:04X}, half of a character pair with the other half missing, "
                "which is not readable text; remove it and try again."
            ) from None


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    task: ClassVar[str]
    role: ClassVar[str | None] = "causal_lm"  # None: the task needs no model

    def texts(self) -> list[str]:
        """The strings the task tokenizes together (for input and batch limits)."""
        raise NotImplementedError

    def batch_key(self) -> tuple[Any, ...]:
        """Requests batch together only when these values are equal."""
        return ()

    def cost(self) -> float:
        """Estimated multiply-accumulate operations of this request.

        0 (the default) means an ordinary model request, bounded by the input token
        limits. Tasks whose work grows with their options (timing a layer on a long
        sequence, say) say how much, so the service can refuse what is too costly
        before it is queued.
        """
        return 0.0


@dataclass(frozen=True)
class NextToken(Request):
    """The next-token distribution after ``text`` (causal LM)."""

    text: str
    k: int = 5
    temperature: float = 1.0
    task: ClassVar[str] = "next_token"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class FillMask(Request):
    """Top-k fills at every :data:`MASK` in ``text`` (masked LM)."""

    text: str
    k: int = 5
    task: ClassVar[str] = "fill_mask"
    role: ClassVar[str] = "masked_lm"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class Generate(Request):
    """A continuation of ``text``: greedy when ``temperature`` is 0, else seeded sampling."""

    text: str
    max_new_tokens: int = 20
    temperature: float = 0.0
    seed: int = 0
    chat: bool = False  # wrap the text as a user turn in the model's chat template, if it has one
    task: ClassVar[str] = "generate"

    def texts(self) -> list[str]:
        return [self.text]

    def batch_key(self) -> tuple[Any, ...]:
        # Sampling draws from one random stream per call, so a sampled request
        # is only reproducible alone; greedy requests batch freely.
        sampled = (self.temperature, self.seed, self.text) if self.temperature > 0 else ()
        return (self.max_new_tokens, self.chat, *sampled)


@dataclass(frozen=True)
class Seq2Seq(Request):
    """Encoder-decoder generation (greedy) of at most ``max_new_tokens``."""

    text: str
    max_new_tokens: int = 60
    task: ClassVar[str] = "seq2seq"
    role: ClassVar[str] = "seq2seq"

    def texts(self) -> list[str]:
        return [self.text]

    def batch_key(self) -> tuple[Any, ...]:
        return (self.max_new_tokens,)


@dataclass(frozen=True)
class Classify(Request):
    """Label probabilities from a sequence classifier.

    Its role, ``classifier``, is not the core's: the plugin that submits it registers a
    ``ModelRole("classifier", ...)`` (plugins/sentiment.py does).
    """

    text: str
    task: ClassVar[str] = "classify"
    role: ClassVar[str] = "classifier"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class Embed(Request):
    """A mean-pooled, L2-normalised sentence embedding.

    Its role, ``embedder``, is registered by the plugin that submits it (plugins/sentiment.py
    does, with the packaged all-MiniLM-L6-v2 as its offline stand-in).
    """

    text: str
    task: ClassVar[str] = "embed"
    role: ClassVar[str] = "embedder"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class Score(Request):
    """Log-probabilities of each token of ``text`` given ``context`` (causal LM).

    With an empty context, the text is scored after the model's document
    separator (``<|endoftext|>`` where it has one) so that its first token counts too.
    """

    text: str
    context: str = ""
    task: ClassVar[str] = "score"

    def texts(self) -> list[str]:
        return [self.context + self.text]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TokenProb:
    id: int
    token: str  # the token decoded on its own (U+FFFD where its bytes are not text alone)
    prob: float
    raw: bytes = b""  # the token's own bytes; a byte-level BPE token may be part of a character


@dataclass(frozen=True)
class NextTokenResult:
    model: str
    prompt_ids: list[int]
    prompt_tokens: list[str]
    top: list[TokenProb]
    entropy_bits: float
    prompt_raw: list[bytes] = field(default_factory=list)  # each prompt token's own bytes


@dataclass(frozen=True)
class MaskFill:
    position: int  # index of the mask in the model's token sequence
    top: list[TokenProb]


@dataclass(frozen=True)
class FillMaskResult:
    model: str
    mask_token: str
    tokens: list[str]
    masks: list[MaskFill]


@dataclass(frozen=True)
class GenerateResult:
    model: str
    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    labels: list[str]
    probs: list[float]


@dataclass(frozen=True)
class EmbedResult:
    model: str
    vector: list[float]


@dataclass(frozen=True)
class ScoreResult:
    model: str
    tokens: list[str]
    logprobs: list[float]  # natural log, one per token of ``text``
