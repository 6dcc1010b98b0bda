"""Shared fixtures: a real redis-server per session, per-test key prefixes, process stacks.

Nothing here is mocked: Redis is a real server on a free port, the API and the workers are
real processes, and the model tests load the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import fcntl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tokenrelay.embedded_redis import EmbeddedRedis
from tokenrelay.queueing.connection import RedisSettings, connect

from .stack import Stack

DEMO_MODEL = "SmolLM2-135M-Instruct"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --runslow"))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_settings(redis_server: EmbeddedRedis, prefix: str) -> RedisSettings:
    return RedisSettings(url=redis_server.url, prefix=prefix)


@pytest.fixture
async def aredis(redis_settings: RedisSettings) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_settings)
    yield client
    await client.aclose()


@pytest.fixture
def sync_redis(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from tokenrelay.demo_model import cache_dir, demo_model_path

    # One conversion at a time: two pytest processes (xdist workers, or two runs) finding
    # no folder would both convert, and the second one's rmtree would pull the folder out
    # from under the first one's workers. The conversion itself renames into place.
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".demo-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return demo_model_path()


@pytest.fixture
def stack(redis_server: EmbeddedRedis, prefix: str) -> Iterator[Stack]:
    s = Stack(redis_server.url, prefix)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def model_stack(redis_server: EmbeddedRedis, demo_model: Path) -> Iterator[Stack]:
    """One API and one real-model worker, shared by the tests that only send requests."""
    s = Stack(redis_server.url, f"m{uuid.uuid4().hex[:8]}")
    s.api()
    s.worker("--model-path", str(demo_model), "--model-names", DEMO_MODEL)
    yield s
    s.stop()
