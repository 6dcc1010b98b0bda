"""The API server's settings, built once from flags and passed to ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.durability import Mode


@dataclass
class APISettings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    api_keys: list[str] = field(default_factory=list)
    max_queue: int = 256  # per model: queued + in-flight jobs before 429
    request_timeout: float = 600.0  # seconds a request may take, queue wait included
    host: str = "127.0.0.1"
    port: int = 8000
    root_path: str = ""
    rate_limit_rpm: int = 0  # requests per minute per API key (per client IP without keys)
    rate_limit_tpm: int = 0  # tokens per minute, charged at admission; 0 = off
    max_body_bytes: int = 1 << 20  # request bodies over this get a 400 body_too_large
    max_file_size: int = 200_000_000  # bytes a file uploaded to POST /v1/files may hold
    max_prompt_chars: int = 200_000  # prompt / all message contents together
    shutdown_grace: float = 30.0  # seconds open requests get to finish on SIGTERM
    resume_grace: float = 10.0  # seconds a broken stream's job waits for a resume; 0 = none
    batch_window: int = 86400  # seconds a batch has to complete: its "24h" window
    # Acknowledge a job once a replica has it (WAIT 1 <ms>): auto = while the primary reports
    # a connected replica, on, off (queueing/durability.py).
    durable_enqueue: Mode = "auto"
    durable_enqueue_timeout_ms: int = 1000
