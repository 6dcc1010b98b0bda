"""POST /v1/embeddings: OpenAI's request, validated into an embed job, and its answer.

``input`` is a string, a list of strings, a list of token ids or a list of such lists; each
becomes one vector. Vectors travel from the worker as base64 of little-endian float32,
which is what OpenAI's ``encoding_format=base64`` sends (the openai SDK's default, decoded
by the SDK), so that format passes them through byte for byte; ``float`` decodes them.
"""

from __future__ import annotations

import base64
import sys
import time
import uuid
from array import array
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from tokenrelay.queueing.messages import Job, SamplingParams

from .errors import APIError
from .service import Run, error_from

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields ignored, as the completions'

    model: Annotated[str, Field(min_length=1)]
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: object) -> object:
        """OpenAI's rules, each a 400 saying which: no empty input, at most 2048 of them,
        one kind per list, token ids non-negative integers."""
        if isinstance(v, str):
            if not v:
                raise _invalid("'input' must not be an empty string")
            return v
        if not isinstance(v, list):
            raise _invalid(
                "'input' must be a string, an array of strings, an array of token ids or an "
                "array of arrays of token ids"
            )
        if not v:
            raise _invalid("'input' must not be an empty array")
        if len(v) > MAX_INPUTS:
            raise _invalid(f"'input' has {len(v)} items; at most {MAX_INPUTS} are allowed")
        if all(_is_id(t) for t in v):
            return v
        if all(isinstance(t, str) for t in v):
            if not all(v):
                raise _invalid(f"'input[{v.index('')}]' must not be an empty string")
            return v
        if all(isinstance(t, list) for t in v):
            for i, ids in enumerate(v):
                if not ids or not all(_is_id(t) for t in ids):
                    raise _invalid(
                        f"'input[{i}]' must be a non-empty array of token ids (integers >= 0)"
                    )
            return v
        raise _invalid("'input' must hold strings, or token ids, or arrays of token ids: one kind")

    def inputs(self) -> list[str | list[int]]:
        """One item per vector: a text or a list of token ids."""
        v = self.input
        if isinstance(v, str):
            return [v]
        if v and all(isinstance(t, int) for t in v):
            return [list(v)]  # type: ignore[arg-type]
        return list(v)  # type: ignore[arg-type]

    def to_job(self, timeout: float, request_id: str = "") -> Job:
        now = time.time()
        job_id = f"embd-{uuid.uuid4().hex}"
        return Job(
            id=job_id,
            request_id=request_id or job_id,
            model=self.model,
            kind="embed",
            input=self.inputs(),
            dimensions=self.dimensions,
            params=SamplingParams(),
            stream=False,
            created=int(now),
            deadline=now + timeout,
        )


def _is_id(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


async def answer(run: Run, encoding_format: str) -> dict[str, Any]:
    """The embeddings list object, from the run's chunks; a worker's error raises it."""
    job = run.job
    vectors: dict[int, str] = {}
    usage = None
    async for chunk in run.chunks():
        if chunk.error:
            raise error_from(chunk.error)
        for delta in chunk.choices:
            if delta.embedding is not None:
                vectors[delta.index] = delta.embedding
        usage = chunk.usage or usage
    count = len(job.input or [])
    if len(vectors) != count:
        raise APIError(
            500,
            f"The worker returned {len(vectors)} of {count} vectors.",
            type="server_error",
            code="engine_error",
        )
    tokens = usage.prompt_tokens if usage else 0
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(vectors[i], encoding_format)}
            for i in range(count)
        ],
        "model": job.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _encode(b64: str, encoding_format: str) -> str | list[float]:
    if encoding_format == "base64":
        return b64
    floats = array("f", base64.b64decode(b64))
    if sys.byteorder == "big":  # the wire is little-endian, as OpenAI's
        floats.byteswap()
    return floats.tolist()
