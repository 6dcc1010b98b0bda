"""Redis behind Sentinel: the ``redis+sentinel://`` URL, and clients that follow a failover.

The URL names the sentinels and the monitored primary instead of a server::

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB]
        [?sentinel_username=U&sentinel_password=P]

PORT defaults to 26379, DB to 0. USER and PASSWORD are those of the Redis servers (primary
and replicas); sentinels with their own ``requirepass`` take ``sentinel_password``.

Every connection asks the sentinels where the primary is when it connects, so a connection
lost to a failover (a reset, a refusal, or ``READONLY`` from a primary demoted to replica)
reconnects to the new primary on its next use: the pool's commands, the API's pub/sub
connection (which re-subscribes its channels) and RQ's synchronous client alike. Each move of
the primary, and each spell in which the sentinels know no primary, is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel as sync_sentinel
from redis.asyncio.connection import BlockingConnectionPool

log = logging.getLogger(__name__)

SCHEMES = ("redis+sentinel", "sentinel")
DEFAULT_PORT = 26379
# Sentinels answer at once or not at all: a dead one must not hold up the discovery.
SENTINEL_TIMEOUT_S = 1.0
ADDRESS_TTL_S = 0.25  # how long one answer of the sentinels serves every connection


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def describe(self) -> str:
        """The URL without passwords, for logs."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master}/{self.db}"


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SCHEMES


def parse(url: str) -> SentinelURL:
    """Read a ``redis+sentinel://`` URL; a malformed one raises ValueError saying why."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"not a Sentinel URL (redis+sentinel://...): {url!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    sentinels = tuple(_host_port(h) for h in hostlist.split(",") if h.strip())
    if not sentinels:
        raise ValueError("a Sentinel URL names at least one sentinel: redis+sentinel://HOST:PORT/")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(
            "a Sentinel URL's path is /MASTER_NAME or /MASTER_NAME/DB, e.g. "
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0"
        )
    if len(path) == 2 and not path[1].isdecimal():
        raise ValueError(f"the database in a Sentinel URL is a number, not {path[1]!r}")
    username, password = _userinfo(userinfo)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"sentinel_username", "sentinel_password"}
    if unknown:
        raise ValueError(f"unknown Sentinel URL parameters: {', '.join(sorted(unknown))}")
    return SentinelURL(
        sentinels=sentinels,
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username"),
        sentinel_password=query.get("sentinel_password"),
    )


def _host_port(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:PORT
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if port and not port.isdecimal():
        raise ValueError(f"a sentinel's port is a number: {text!r}")
    return host, int(port) if port else DEFAULT_PORT


def _userinfo(text: str) -> tuple[str | None, str | None]:
    if not text:
        return None, None
    user, sep, password = text.partition(":")
    if not sep:
        return None, unquote(user)  # redis+sentinel://PASSWORD@...: requirepass alone
    return unquote(user) or None, unquote(password)


class FailoverLog:
    """Logs each move of the primary, and each spell with none, once."""

    def __init__(self, master: str) -> None:
        self.master = master
        self.address: tuple[str, int] | None = None
        self.missing_since: float | None = None

    def found(self, address: tuple[str, int]) -> None:
        if self.missing_since is not None:
            gone = time.monotonic() - self.missing_since
            log.warning("Redis primary %r known again after %.1f s", self.master, gone)
            self.missing_since = None
        if address == self.address:
            return
        if self.address is None:
            log.info("Redis primary %r is %s:%s", self.master, *address)
        else:
            log.warning(
                "Redis primary %r moved from %s:%s to %s:%s (a failover): reconnecting there",
                self.master,
                *self.address,
                *address,
            )
        self.address = address

    def missing(self, exc: Exception) -> None:
        if self.missing_since is None:
            self.missing_since = time.monotonic()
            log.warning(
                "the sentinels know no Redis primary %r (a failover under way?): %s",
                self.master,
                str(exc).split(" : ", 1)[0],  # redis-py appends every sentinel's repr
            )


class _AsyncPool(async_sentinel.SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool, bounded and blocking like ``connection.connect``'s.

    Hundreds of connections reconnect at once after a failover, and each asks the sentinels
    where the primary is: one question is in flight at a time and its answer serves for
    ``ADDRESS_TTL_S`` (otherwise the sentinel clients' own pools run out, and the primary
    reads as not found while a failover is long over)."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self.failover_log = FailoverLog(service_name)
        self._asking: asyncio.Future[Any] | None = None
        self._known: tuple[float, Any] | None = None  # (when, address)

    async def get_master_address(self) -> Any:
        if self._known and time.monotonic() - self._known[0] < ADDRESS_TTL_S:
            return self._known[1]
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._ask())
            self._asking.add_done_callback(_retrieved)
        return await asyncio.shield(self._asking)

    async def _ask(self) -> Any:
        try:
            address = await super().get_master_address()
        except async_sentinel.MasterNotFoundError as exc:
            self.failover_log.missing(exc)
            raise
        finally:
            self._asking = None
        self._known = (time.monotonic(), address)
        self.failover_log.found(tuple(address))
        return address


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Every waiter may have left (cancelled): the error is still read, not warned about."""
    if not future.cancelled():
        future.exception()


class _SyncPool(sync_sentinel.SentinelConnectionPool):
    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self.failover_log = FailoverLog(service_name)

    def get_master_address(self) -> Any:
        try:
            address = super().get_master_address()
        except sync_sentinel.MasterNotFoundError as exc:
            self.failover_log.missing(exc)
            raise
        self.failover_log.found(tuple(address))
        return address


class _AsyncClient(aioredis.Redis):
    """Closes its sentinels' connections with its own."""

    sentinels: async_sentinel.Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


class _SyncClient(redis.Redis):
    sentinels: sync_sentinel.Sentinel | None = None

    def close(self) -> None:
        super().close()
        for client in self.sentinels.sentinels if self.sentinels else []:
            client.close()


def _sentinel_kwargs(target: SentinelURL, connect_timeout: float) -> dict[str, Any]:
    return {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": min(connect_timeout, SENTINEL_TIMEOUT_S),
        "username": target.sentinel_username,
        "password": target.sentinel_password,
        "protocol": 2,
    }


def async_master(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client of the primary ``url`` names; ``kwargs`` are the connections'
    (timeouts, pool size as ``max_connections`` and ``timeout``, retry, decoding)."""
    return _master(url, async_sentinel.Sentinel, _AsyncClient, _AsyncPool, kwargs)


def sync_master(url: str, **kwargs: Any) -> redis.Redis:
    """The synchronous counterpart of ``async_master`` (RQ's client)."""
    return _master(url, sync_sentinel.Sentinel, _SyncClient, _SyncPool, kwargs)


def _master(
    url: str, sentinel_class: Any, redis_class: Any, pool_class: Any, kwargs: dict[str, Any]
) -> Any:
    """A client of the primary the sentinels of ``url`` name, with its sentinel manager."""
    target = parse(url)
    manager = sentinel_class(
        list(target.sentinels),
        sentinel_kwargs=_sentinel_kwargs(target, kwargs.get("socket_connect_timeout", 3.0)),
    )
    client = manager.master_for(
        target.master,
        redis_class=redis_class,
        connection_pool_class=pool_class,
        db=target.db,
        username=target.username,
        password=target.password,
        **kwargs,
    )
    client.sentinels = manager
    return client
