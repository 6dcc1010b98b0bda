"""The typed messages that cross Redis: jobs (API -> worker) and chunks (worker -> API).

Every message carries a protocol version ``v``; a reader refuses a version newer than its
own instead of guessing. Messages are JSON, never pickle.

Rolling upgrades: a reader ignores fields it does not know, so one release's worker reads
the next release's jobs, and an API the next worker's chunks; ``v`` is bumped only for a
change an older reader would get wrong. A new field that changes the output is named in
the job's ``needs`` as well, and a worker that does not know a name there refuses the job
(with an error the client sees) rather than ignore what the client asked for. Upgrade the
workers first, then the API (README, "Upgrading").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

PROTOCOL_VERSION = 1

# Sampling fields a request may leave to the model: left out, they are absent from the job's
# JSON too, and the worker fills them from the model's generation_config (as vLLM does).
MODEL_DEFAULTED = ("temperature", "top_p", "top_k")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    v: int = PROTOCOL_VERSION

    @field_validator("v")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > PROTOCOL_VERSION:
            raise ValueError(
                f"protocol version {v} is newer than this release's ({PROTOCOL_VERSION}): "
                "upgrade this process"
            )
        return v


class SamplingParams(BaseModel):
    """How to sample one job.

    "Not given" is absence, not null: a field of ``MODEL_DEFAULTED`` the client left out is
    not in ``model_fields_set`` and not in the JSON, and a worker fills it from its model's
    generation_config. Its value here is the neutral fallback (no model default either).
    Absence keeps both sides of a rolling upgrade working: an older worker reads an absent
    field as this fallback (its old behaviour), and a job from an older API names every
    field, so a newer worker honours them all.
    """

    model_config = ConfigDict(extra="ignore")  # see the module's note on upgrades

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = no top-k filter
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo (the prompt scored)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    n: int = Field(1, ge=1)
    ignore_eos: bool = False
    # output-changing extras (workers/penalties.py); at these defaults they change nothing,
    # and a request that sets one names it in ``Job.needs`` (``PENALTY_FIELDS``)
    presence_penalty: float = 0.0  # OpenAI: - penalty x [count > 0] of generated tokens
    frequency_penalty: float = 0.0  # OpenAI: - penalty x count of generated tokens
    repetition_penalty: float = Field(1.0, gt=0.0)  # HF/vLLM: over prompt + generated
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)  # token id -> added to logits
    min_tokens: int = Field(0, ge=0)  # stop ids and EOS masked (stop strings unchecked) until
    include_stop_str_in_output: bool = False
    # log probabilities (workers/logprobs.py): None = none; k = the sampled token's and the
    # k likeliest alternatives (of the model's raw log-softmax) for each generated token,
    # and for each prompt token with ``prompt_logprobs`` (echo on completions)
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)

    def neutral(self, name: str) -> bool:
        """Whether field ``name`` is at its do-nothing default."""
        default = type(self).model_fields[name].get_default(call_default_factory=True)
        return bool(getattr(self, name) == default)

    @property
    def given_extras(self) -> list[str]:
        """The extras this job sets: a worker that does not know one must refuse it."""
        return [name for name in EXTRA_FIELDS if not self.neutral(name)]

    @model_serializer(mode="wrap")
    def _given_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        # absent too: the extras at their do-nothing defaults, so a worker of the release
        # before them (which forbade fields it did not know) still reads every plain job
        unset = set(MODEL_DEFAULTED) - self.model_fields_set
        unset |= {name for name in EXTRA_FIELDS if self.neutral(name)}
        return {k: v for k, v in data.items() if k not in unset}


class ChatMessage(BaseModel):
    role: str
    content: str


class Job(Message):
    """A validated generation request, as queued on a model's stream."""

    id: str
    model: str
    kind: Literal["chat", "completion", "embed"]
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    # kind "embed" (POST /v1/embeddings): texts or token id lists, one vector each, and the
    # vector length asked for (None: the model's own); served only by embedding workers
    input: list[str | list[int]] | None = Field(None, exclude_if=lambda v: v is None)
    dimensions: int | None = Field(None, ge=1, exclude_if=lambda v: v is None)
    params: SamplingParams
    # completions' echo: the API puts the prompt before each choice's text (the worker
    # scores the prompt only if ``params.prompt_logprobs`` asks)
    echo: bool = Field(False, exclude_if=lambda v: not v)
    stream: bool
    created: int
    deadline: float  # unix seconds; a worker drops the job after this
    request_id: str = ""  # for logs: the client's X-Request-ID, else ``id``
    # fields of this job that change its output and that a worker must know to run it:
    # names a later release adds (this one's are all in KNOWN_NEEDS)
    needs: list[str] = Field(default_factory=list)

    def unknown_needs(self) -> list[str]:
        return [n for n in self.needs if n not in KNOWN_NEEDS]


EXTRA_FIELDS = (
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "logit_bias",
    "min_tokens",
    "include_stop_str_in_output",
    "logprobs",
    "prompt_logprobs",
)

# what this release's workers honour: every sampling field (a later release's API lists a
# new one in ``Job.needs`` when a request sets it)
KNOWN_NEEDS = frozenset(SamplingParams.model_fields)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes (a part of a character too)


class TokenLogprob(TopLogprob):
    """One token's log probability and its likeliest alternatives; a prompt's first
    token has none (``logprob`` None)."""

    logprob: float | None  # type: ignore[assignment]
    top: list[TopLogprob] = Field(default_factory=list)


class ChoiceDelta(BaseModel):
    index: int
    text: str = ""
    finish_reason: str | None = None
    # the tokens of this delta (SamplingParams.logprobs), and the prompt's tokens in a
    # choice's first delta (prompt_logprobs): absent unless asked, on the wire too
    logprobs: list[TokenLogprob] | None = Field(None, exclude_if=lambda v: v is None)
    prompt_logprobs: list[TokenLogprob] | None = Field(None, exclude_if=lambda v: v is None)
    # an embed job's vector for input ``index``: base64 of little-endian float32, the bytes
    # OpenAI's encoding_format=base64 sends (absent for generation, on the wire too)
    embedding: str | None = Field(None, exclude_if=lambda v: v is None)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorInfo(BaseModel):
    """An error a worker reports for one request, with the HTTP status it maps to."""

    message: str
    type: str = "server_error"
    code: str | None = None
    status: int = 500
    param: str | None = None  # the request field at fault; an older API ignores it

    @classmethod
    def deadline_exceeded(cls) -> ErrorInfo:
        """A request that ran past its deadline (``Job.deadline``, the API's timeout)."""
        return cls(
            message="The request ran past its deadline.",
            type="timeout",
            code="deadline_exceeded",
            status=503,
        )


class Chunk(Message):
    """One batch of deltas for one request.

    ``attempt`` is the job's delivery number: a job re-delivered after a worker died starts
    again at seq 0 with a higher attempt, and readers drop what the old attempt sent.
    """

    id: str
    attempt: int = 1
    seq: int
    choices: list[ChoiceDelta] = Field(default_factory=list)
    usage: Usage | None = None
    error: ErrorInfo | None = None
    done: bool = False


class Result(Message):
    """The whole answer, kept under a key with a TTL for callers that did not stream."""

    id: str
    choices: list[ChoiceDelta] = Field(default_factory=list)
    usage: Usage | None = None
    error: ErrorInfo | None = None
