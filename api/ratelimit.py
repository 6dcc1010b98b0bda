"""Per-key request and token limits kept in Redis, so they hold across API replicas.

Fixed one-minute windows: the first request of a window creates the counter key with a
60 s TTL, and the key's remaining TTL is the ``Retry-After`` of a refused request. Keys
hold a hash of the API key (or of the client IP when no keys are configured), never the
key itself. One EVALSHA per request checks and charges both counters atomically: a
refused request charges nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from tokenrelay.queueing.keys import Keys

from .errors import APIError

WINDOW_S = 60
# What a request that sets no max_tokens is charged per choice (chat completions: the
# worker may generate up to the context length, unknown at admission).
DEFAULT_CHARGE_TOKENS = 1024
CHARS_PER_TOKEN = 4

# KEYS[1] requests counter, KEYS[2] tokens counter
# ARGV: rpm limit, tpm limit, token cost, window in ms   (a limit of 0 = off)
# Returns {0} when admitted, else {1 (rpm) or 2 (tpm), ms left in the window, used}.
_SCRIPT = """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local function over(key, limit, add, which)
  local used = tonumber(redis.call('GET', key) or '0')
  if used + add > limit then
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then ttl = window end
    return {which, ttl, used}
  end
  return nil
end
local function charge(key, add)
  redis.call('INCRBY', key, add)
  if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, window) end
end
if rpm > 0 then
  local r = over(KEYS[1], rpm, 1, 1)
  if r then return r end
end
if tpm > 0 then
  local r = over(KEYS[2], tpm, cost, 2)
  if r then return r end
end
if rpm > 0 then charge(KEYS[1], 1) end
if tpm > 0 then charge(KEYS[2], cost) end
return {0}
"""


def identity(token: str | None, client_ip: str | None) -> str:
    """A short hash naming the caller in Redis keys: of the API key, else of the IP."""
    raw = f"key:{token}" if token else f"ip:{client_ip or 'unknown'}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def estimate_tokens(body: Any) -> int:
    """The tokens a request is charged at admission: prompt characters / 4 plus n times
    max_tokens (``DEFAULT_CHARGE_TOKENS`` when unset)."""
    if not isinstance(body, dict):
        return 1
    chars = prompt_chars(body)
    if "input" in body and "messages" not in body and "prompt" not in body:
        return chars // CHARS_PER_TOKEN + 1 + _token_ids(body["input"])  # embeddings: no output
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if "prompt" in body and "max_tokens" not in body:
        max_tokens = 16  # /v1/completions' default
    if not isinstance(max_tokens, int) or max_tokens < 1:
        max_tokens = DEFAULT_CHARGE_TOKENS
    n = body.get("n")
    n = n if isinstance(n, int) and n >= 1 else 1
    return chars // CHARS_PER_TOKEN + 1 + n * max_tokens


def _token_ids(value: Any) -> int:
    """Token ids in an embeddings ``input`` (ids, or lists of them)."""
    if not isinstance(value, list):
        return 0
    return sum(len(v) if isinstance(v, list) else isinstance(v, int) for v in value)


def prompt_chars(body: Any) -> int:
    """Characters of the prompt, the embeddings' inputs or all message contents; 0 for
    shapes validation rejects."""
    if not isinstance(body, dict):
        return 0
    total = 0
    for name in ("prompt", "input"):  # input: /v1/embeddings' texts
        prompt = body.get(name)
        if isinstance(prompt, str):
            total += len(prompt)
        elif isinstance(prompt, list):
            total += sum(len(p) for p in prompt if isinstance(p, str))
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                for part in content:
                    text = part.get("text") if isinstance(part, dict) else None
                    if isinstance(text, str):
                        total += len(text)
    return total


@dataclass
class RateLimiter:
    redis: aioredis.Redis
    keys: Keys
    rpm: int = 0
    tpm: int = 0

    def __post_init__(self) -> None:
        self._script = self.redis.register_script(_SCRIPT)

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    async def admit(self, ident: str, tokens: int) -> None:
        """Charge one request and ``tokens`` tokens to ``ident``, or raise a 429."""
        if not self.enabled:
            return
        keys = [self.keys.rate(ident, "rpm"), self.keys.rate(ident, "tpm")]
        reply = await self._script(keys=keys, args=[self.rpm, self.tpm, tokens, WINDOW_S * 1000])
        if int(reply[0]) == 0:
            return
        which, left_ms, used = int(reply[0]), int(reply[1]), int(reply[2])
        retry = max(1, -(-left_ms // 1000))
        if which == 1:
            message = (
                f"Rate limit reached: {self.rpm} requests per minute for this API key "
                f"(used {used}). Retry in {retry} s."
            )
        elif tokens > self.tpm:
            message = (
                f"Request too large: it is charged {tokens} tokens (prompt estimate + n * "
                f"max_tokens) and the limit is {self.tpm} tokens per minute. Lower max_tokens."
            )
        else:
            message = (
                f"Rate limit reached: {self.tpm} tokens per minute for this API key "
                f"(used {used}, this request {tokens}). Retry in {retry} s."
            )
        raise APIError(
            429, message, type="rate_limit_exceeded", code="rate_limit_exceeded", retry_after=retry
        )


class BodySizeLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 400 ``body_too_large``,
    refused from its Content-Length before reading, or as soon as the bytes read pass it.
    POSTs to a path ending in one of ``exempt`` pass untouched (they stream their body
    under a limit of their own)."""

    def __init__(self, app: Any, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.limit <= 0 or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0:
                    await self._refuse(send, "The Content-Length header is not a number.")
                    return
                if length > self.limit:
                    await self._refuse(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # a disconnect: hand it on as is
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(body)
            if not message.get("more_body"):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)

    def _exempt(self, scope: Any) -> bool:
        path: str = scope.get("path", "")
        return scope.get("method") == "POST" and path.rstrip("/").endswith(self.exempt)

    async def _refuse(self, send: Any, message: str | None = None) -> None:
        error = APIError(
            400,
            message or f"The request body is larger than this server accepts ({self.limit} bytes).",
            code="body_too_large",
        )
        response = error.response()
        response.headers["Connection"] = "close"
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Any:
    return {"type": "http.disconnect"}
