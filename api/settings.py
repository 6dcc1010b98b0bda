"""The API server's settings, built once from flags and passed to ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenrelay.queueing.connection import RedisSettings


@dataclass
class APISettings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    api_keys: list[str] = field(default_factory=list)
    max_queue: int = 256  # per model: queued + in-flight jobs before 429
    request_timeout: float = 600.0  # seconds a request may take, queue wait included
    host: str = "127.0.0.1"
    port: int = 8000
    root_path: str = ""
