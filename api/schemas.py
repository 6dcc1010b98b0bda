"""The public OpenAI request shapes, validated once and turned into queue jobs."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from tokenrelay.queueing.messages import ChatMessage, Job, SamplingParams

from .refused import CHAT, COMPLETION, refusing

MAX_N = 16
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # OpenAI's limit on the tokens one request biases
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's)
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs (OpenAI's legacy API)


def not_supported(what: str) -> PydanticCustomError:
    """A field tokenrelay accepts only at its default: any other value is a 400, never
    silently ignored (the client would trust an answer made without it)."""
    message = f"{what} is not supported by tokenrelay; leave it out"
    return PydanticCustomError("unsupported_value", message)


_PART_NAMES = {
    "image_url": "image",
    "input_image": "image",
    "input_audio": "audio",
    "file": "file",
}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: object) -> object:
        """An image, audio or file part gets a 400 that says so, not "Input should be 'text'"
        about a union member: the engines serve text models."""
        for part in v if isinstance(v, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                what = _PART_NAMES.get(kind, f"'{kind}'")
                raise PydanticCustomError(
                    "unsupported_value",
                    f"{what} content parts are not supported by this text model; send text "
                    'parts ({"type": "text", "text": ...}) only',
                )
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # unknown fields are accepted and ignored; those that would change the output are
    # declared (refused.py) and refused unless at their do-nothing value
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    include_stop_str_in_output: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        """OpenAI's rules: keys are token ids (the worker checks them against its
        vocabulary), biases from -100 to 100, at most 300 of them."""
        for key, bias in (v or {}).items():
            if not (key.isdecimal() and key.isascii()):
                raise PydanticCustomError(
                    "invalid_value",
                    f"Invalid key in 'logit_bias': {key[:40]}. You should only be submitting "
                    "non-negative integers (token ids).",
                )
            if not -100 <= bias <= 100:
                raise PydanticCustomError(
                    "invalid_value",
                    f"Invalid value in 'logit_bias' for token {key}: {bias}. A bias must be "
                    "between -100 and 100.",
                )
        if v and len(v) > MAX_LOGIT_BIAS:
            raise PydanticCustomError(
                "invalid_value",
                f"'logit_bias' has {len(v)} tokens; at most {MAX_LOGIT_BIAS} are allowed.",
            )
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _logprobs(self) -> tuple[int | None, int | None]:
        """How many alternatives per generated token and per prompt token (None: none)."""
        return None, None

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        # Left out (or null, as OpenAI reads it): not passed on, so the worker applies the
        # model's generation_config default instead of a fixed one.
        given: dict[str, float | int] = {}
        if self.temperature is not None:
            given["temperature"] = self.temperature
        if self.top_p is not None:
            given["top_p"] = self.top_p
        if self.top_k is not None:
            given["top_k"] = max(0, self.top_k)  # -1 (vLLM) and 0 both mean no top-k filter
        extras: dict[str, object] = {
            name: getattr(self, name)
            for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")
            if getattr(self, name) is not None
        }
        extras["logit_bias"] = {int(k): b for k, b in (self.logit_bias or {}).items()}
        extras["min_tokens"] = self.min_tokens or 0
        extras["include_stop_str_in_output"] = bool(self.include_stop_str_in_output)
        extras["logprobs"], extras["prompt_logprobs"] = self._logprobs()
        return SamplingParams(
            **given,  # type: ignore[arg-type]
            **extras,  # type: ignore[arg-type]
            seed=self.seed,
            max_tokens=max_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            n=self.n,
            ignore_eos=self.ignore_eos,
        )

    def _job(
        self,
        prefix: str,
        timeout: float,
        max_tokens: int | None,
        request_id: str = "",
        **kw: object,
    ) -> Job:
        now = time.time()
        job_id = f"{prefix}-{uuid.uuid4().hex}"
        params = self.sampling(max_tokens)
        return Job(
            id=job_id,
            request_id=request_id or job_id,
            model=self.model,
            params=params,
            needs=params.given_extras,  # an older worker refuses what it would ignore
            stream=self.stream,
            created=int(now),
            deadline=now + timeout,
            **kw,  # type: ignore[arg-type]
        )


def _check_min_tokens(min_tokens: int | None, max_tokens: int | None) -> None:
    """min_tokens over max_tokens is a 400 (vLLM's), on the min_tokens field."""
    if min_tokens and max_tokens is not None and min_tokens > max_tokens:
        _invalid(
            "min_tokens",
            min_tokens,
            f"min_tokens ({min_tokens}) must be at most max_tokens ({max_tokens})",
        )


def _invalid(name: str, value: object, message: str) -> None:
    """A 400 invalid_value on field ``name``, from a check across fields."""
    error = PydanticCustomError("invalid_value", message)
    details = InitErrorDetails(type=error, loc=(name,), input=value)
    raise ValidationError.from_exception_data("request", [details])


class ChatCompletionRequest(_Common, refusing("_ChatRefused", CHAT)):  # type: ignore[misc]
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _min_tokens(self) -> ChatCompletionRequest:
        _check_min_tokens(self.min_tokens, self.max_completion_tokens or self.max_tokens)
        if self.top_logprobs and not self.logprobs:  # 0 asks for nothing
            _invalid(
                "top_logprobs",
                self.top_logprobs,
                "top_logprobs is only allowed when logprobs is true",
            )
        return self

    def _logprobs(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def to_job(self, timeout: float, request_id: str = "") -> Job:
        messages = [ChatMessage(role=m.role, content=m.text()) for m in self.messages]
        return self._job(
            "chatcmpl",
            timeout,
            self.max_completion_tokens or self.max_tokens,
            request_id,
            kind="chat",
            messages=messages,
        )


class CompletionRequest(_Common, refusing("_CompletionRefused", COMPLETION)):  # type: ignore[misc]
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0: with echo, the prompt scored
    echo: bool = False
    # legacy: an int, the alternatives per token (false, as some clients send: none)
    logprobs: bool | Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_text_prompt(cls, v: object) -> object:
        """OpenAI also takes several prompts, or token ids; a job carries one text prompt,
        so those get a 400 naming what is missing (not a union member's type error)."""
        if not isinstance(v, list):
            return v
        if not v:
            raise PydanticCustomError("invalid_value", "prompt must not be an empty list")
        if all(isinstance(p, int | list) and not isinstance(p, bool) for p in v):
            raise PydanticCustomError(
                "unsupported_value",
                "prompt as token ids is not supported by tokenrelay; send the prompt as text",
            )
        if len(v) > 1:
            raise PydanticCustomError(
                "unsupported_value",
                f"prompt as a list of {len(v)} prompts is not supported by tokenrelay yet; "
                "send one request per prompt (a list of one string works)",
            )
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs_count(cls, v: bool | int | None) -> bool | int | None:
        if v is True:
            raise PydanticCustomError(
                "invalid_value",
                "logprobs on completions is the number of alternatives per token, an "
                f"integer from 0 to {MAX_COMPLETION_LOGPROBS}",
            )
        return v

    @model_validator(mode="after")
    def _min_tokens(self) -> CompletionRequest:
        _check_min_tokens(self.min_tokens, self.max_tokens)
        if self.max_tokens == 0 and not self.echo:
            _invalid("max_tokens", 0, "max_tokens must be at least 1 (0 only with echo=true)")
        return self

    def _logprobs(self) -> tuple[int | None, int | None]:
        count = None if self.logprobs is None or self.logprobs is False else int(self.logprobs)
        return count, count if self.echo else None

    def to_job(self, timeout: float, request_id: str = "") -> Job:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return self._job(
            "cmpl",
            timeout,
            self.max_tokens,
            request_id,
            kind="completion",
            prompt=prompt,
            echo=self.echo,
        )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
