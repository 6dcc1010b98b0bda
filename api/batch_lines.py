"""A batch's input file, checked whole before any line runs.

Each line is ``{"custom_id", "method": "POST", "url", "body"}``; its body is validated with
the request schema of the endpoint the API uses (api/schemas.py), so a line is accepted
exactly when the same request sent on its own would be. Any bad line fails the batch in
``validating``, with errors naming the line, as OpenAI does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tokenrelay.queueing.batches import LineError
from tokenrelay.queueing.messages import Job

from .embeddings import EmbeddingRequest
from .errors import invalid_field
from .ratelimit import prompt_chars
from .schemas import ChatCompletionRequest, CompletionRequest

LineRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest
SCHEMAS: dict[str, type[LineRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}
MAX_LINES = 50_000  # as OpenAI
MAX_ERRORS = 100  # reported; a file with more says so in the last one


@dataclass(frozen=True)
class BatchLine:
    number: int  # 1-based line of the input file
    custom_id: str
    request: LineRequest
    prompt_chars: int = 0  # what the API's --max-prompt-chars counts

    @property
    def prompt_field(self) -> str:
        if isinstance(self.request, EmbeddingRequest):
            return "input"
        return "prompt" if isinstance(self.request, CompletionRequest) else "messages"

    def output_id(self, batch_id: str) -> str:
        return f"batch_req_{batch_id.removeprefix('batch_')}_{self.number}"

    def job(self, batch_id: str, deadline: float) -> Job:
        """The line's job, with an id made from the batch and the line: queued again by a
        runner that resumes the batch, it is the same job (enqueue is idempotent by id)."""
        job = self.request.to_job(0.0, self.output_id(batch_id))
        kind = job.id.split("-", 1)[0]
        return job.model_copy(
            update={"id": f"{kind}-{batch_id}-{self.number}", "deadline": deadline}
        )


def parse(data: bytes, endpoint: str) -> tuple[list[BatchLine], list[LineError]]:
    """The file's lines, or the problems that make it unusable (empty when none)."""
    lines: list[BatchLine] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = _line(number, raw, endpoint, seen)
        except LineProblem as problem:
            errors.append(problem.error)
            if len(errors) == MAX_ERRORS:
                errors.append(LineError(code="too_many_errors", message=_more(number)))
                break
            continue
        seen[line.custom_id] = number
        lines.append(line)
    if not errors and not lines:
        errors.append(LineError(code="empty_file", message="The input file has no requests."))
    if len(lines) > MAX_LINES:
        message = f"The input file has {len(lines)} requests; a batch takes {MAX_LINES} at most."
        errors.append(LineError(code="too_many_requests", message=message))
    return lines, errors


class LineProblem(Exception):
    def __init__(self, number: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error = LineError(
            code=code, message=f"Line {number}: {message}", param=param, line=number
        )


def _more(number: int) -> str:
    return f"Stopped checking at line {number}: fix the errors above and upload the file again."


def _line(number: int, raw: bytes, endpoint: str, seen: dict[str, int]) -> BatchLine:
    try:
        item: Any = json.loads(raw)
    except ValueError as exc:
        raise LineProblem(number, "invalid_json_line", f"not valid JSON ({exc}).") from exc
    if not isinstance(item, dict):
        raise LineProblem(number, "invalid_json_line", "not a JSON object.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineProblem(
            number, "missing_custom_id", "'custom_id' must be a non-empty string.", "custom_id"
        )
    if custom_id in seen:
        message = f"custom_id '{custom_id}' is already used on line {seen[custom_id]}."
        raise LineProblem(number, "duplicate_custom_id", message, "custom_id")
    if item.get("method") != "POST":
        message = f"'method' must be 'POST', not {item.get('method')!r}."
        raise LineProblem(number, "invalid_method", message, "method")
    if item.get("url") != endpoint:
        message = f"'url' is {item.get('url')!r}, but this batch's endpoint is '{endpoint}'."
        raise LineProblem(number, "mismatched_url", message, "url")
    body = item.get("body")
    return BatchLine(number, custom_id, _request(number, body, endpoint), prompt_chars(body))


def _request(number: int, body: Any, endpoint: str) -> LineRequest:
    if not isinstance(body, dict):
        raise LineProblem(number, "invalid_body", "'body' must be a JSON object.", "body")
    if body.get("stream"):
        message = "'body.stream' must be false: a batch's answers are written to a file."
        raise LineProblem(number, "stream_not_supported", message, "body.stream")
    try:
        return SCHEMAS[endpoint].model_validate(body)
    except ValidationError as exc:
        error = invalid_field(list(exc.errors()))
        param = f"body.{error.param}" if error.param else "body"
        raise LineProblem(number, error.code or "invalid_value", error.message, param) from exc
