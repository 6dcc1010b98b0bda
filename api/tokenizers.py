"""The tokenizers the API answers /tokenize and /detokenize with: the live workers' own,
loaded from the files each worker published in Redis (queueing/tokenizers.py).

Loaded once per digest and kept (a few, least recently used dropped first); loading and
encoding run in a thread, off the event loop. Nothing is loaded with remote code: the
files come from Redis, and a tokenizer that needs its own Python is refused.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tokenrelay.queueing import tokenizers
from tokenrelay.queueing.keys import Keys
from tokenrelay.queueing.registry import WorkerInfo

from .errors import APIError
from .service import GenerationService, redis_down


async def serving(service: GenerationService, model: str | None) -> tuple[str, list[WorkerInfo]]:
    """The model a request names (or the only one served, as vLLM's optional ``model``)
    and its live workers; 404 and 503 exactly as the completion endpoints answer them."""
    models = await service.live_models()
    if model is None:
        if len(models) != 1:
            served = "no model is" if not models else f"{len(models)} models are"
            raise APIError(
                400,
                f"'model' is required: {served} served now (GET /v1/models lists them).",
                code="invalid_value",
                param="model",
            )
        model = next(iter(models))
    workers = models.get(model)
    if not workers:
        await service.check(model, None)  # raises model_not_found, or 503 with no live worker
        workers = (await service.live_models()).get(model)  # one came up meanwhile
        if not workers:
            raise APIError(503, f"No worker is serving '{model}' right now.", "server_error")
    return model, workers


def unavailable(model: str, why: str) -> APIError:
    return APIError(
        503,
        f"The tokenizer of '{model}' cannot be loaded: {why}",
        type="server_error",
        code="tokenizer_unavailable",
    )


class TokenizerCache:
    def __init__(self, redis: aioredis.Redis, keys: Keys, size: int = 8) -> None:
        self.redis = redis
        self.keys = keys
        self.size = size
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = asyncio.Lock()  # one load at a time: loads are rare, and slow

    async def get(self, model: str, workers: list[WorkerInfo]) -> Any:
        """The tokenizer the live workers of ``model`` use."""
        digest = self._pick(model, workers)
        if digest not in self._loaded:
            async with self._lock:
                if digest not in self._loaded:
                    await self._load(model, digest)
        self._loaded.move_to_end(digest)
        return self._loaded[digest]

    def _pick(self, model: str, workers: list[WorkerInfo]) -> str:
        """One already loaded if a worker uses it, else the one most workers use."""
        digests = Counter(w.tokenizer for w in workers if w.tokenizer)
        if not digests:
            raise APIError(
                400,
                f"The workers of '{model}' publish no tokenizer: the fake engine has none, and "
                "workers of a release before /tokenize existed do not publish theirs (upgrade "
                "them).",
                code="no_tokenizer",
                param="model",
            )
        loaded = [d for d in digests if d in self._loaded]
        return loaded[0] if loaded else digests.most_common(1)[0][0]

    async def _load(self, model: str, digest: str) -> None:
        try:
            payload = await tokenizers.fetch(self.redis, self.keys, model, digest)
        except (RedisError, TimeoutError) as exc:
            raise redis_down(exc) from exc
        if payload is None:
            raise unavailable(
                model,
                "its files are no longer in Redis (was Redis flushed?); restart the model's "
                "workers to publish them again.",
            )
        try:
            tokenizer = await anyio.to_thread.run_sync(_from_payload, payload)
        except Exception as exc:  # a file transformers cannot read: the worker's, not the client's
            raise unavailable(model, f"{type(exc).__name__}: {exc}") from exc
        self._loaded[digest] = tokenizer
        while len(self._loaded) > self.size:
            self._loaded.popitem(last=False)


def _from_payload(payload: str) -> Any:
    from transformers import AutoTokenizer  # imported on the first /tokenize only

    with tempfile.TemporaryDirectory(prefix="tokenrelay-tokenizer-") as folder:
        tokenizers.unpack(payload, Path(folder))
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
