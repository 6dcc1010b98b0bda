"""The FastAPI application: built by ``create_app(settings)``, nothing at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tokenrelay import __version__
from tokenrelay.queueing.batch_queue import sync_connect
from tokenrelay.queueing.batches import BatchStore
from tokenrelay.queueing.connection import connect
from tokenrelay.queueing.files import FileStore
from tokenrelay.queueing.relay import ChunkRelay

from . import errors
from .batches import BatchService
from .draining import Drain
from .metrics import Metrics
from .ratelimit import BodySizeLimit, RateLimiter
from .requestid import RequestIdMiddleware
from .resume import Resumes
from .routes import (
    batches,
    cancel,
    completions,
    embeddings,
    files,
    health,
    metrics,
    models,
    status,
    tokenize,
)
from .service import GenerationService
from .settings import APISettings
from .tokenizers import TokenizerCache


def create_app(settings: APISettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings.redis)
        file_redis = connect(settings.redis, decode_responses=False)  # file chunks are bytes
        app.state.files = FileStore(file_redis, settings.redis.keys)
        rq_redis = sync_connect(settings.redis)  # RQ, which queues batches, is synchronous
        app.state.batches = BatchService(
            BatchStore(redis, settings.redis.keys), app.state.files, rq_redis, settings
        )
        relay = ChunkRelay(redis, settings.redis.keys)
        await relay.start()
        app.state.service = GenerationService(redis, relay, settings, app.state.metrics)
        app.state.resumes = Resumes(redis, settings.redis.keys, settings.resume_grace)
        app.state.tokenizers = TokenizerCache(redis, settings.redis.keys)
        app.state.limiter = RateLimiter(
            redis, settings.redis.keys, settings.rate_limit_rpm, settings.rate_limit_tpm
        )
        try:
            yield
        finally:
            await app.state.resumes.close()  # jobs in a resume grace nobody follows: cancelled
            await relay.close()
            await redis.aclose()
            await file_redis.aclose()
            rq_redis.close()

    app = FastAPI(
        title="tokenrelay", version=__version__, lifespan=lifespan, root_path=settings.root_path
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.drain = Drain(settings.shutdown_grace)
    errors.install(app)
    # POST /v1/files streams its upload under its own limit (--max-file-size)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes, exempt=("/v1/files",))
    app.add_middleware(RequestIdMiddleware)  # outermost: every response gets the header
    routes = (
        models,
        completions,
        cancel,
        embeddings,
        tokenize,
        files,
        batches,
        status,
        health,
        metrics,
    )
    for module in routes:
        app.include_router(module.router)
    return app
