"""Redis Cluster: the ``redis+cluster://`` URL, detection behind a plain URL, the client.

The URL names one or more nodes of the cluster (any nodes: the client reads the slot map
from the first that answers)::

    redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/0]
    rediss+cluster://...            (TLS)

PORT defaults to 6379; a cluster has only database 0. A plain ``redis://`` or ``rediss://``
URL whose server says ``cluster_enabled:1`` is taken as a cluster too (asked once per URL,
when the first client is made; a server that does not answer then is taken as standalone).

Every key of a model shares the hash tag ``{m:NAME}`` (queueing/keys.py), so a model's job
streams, chunk channels and per-request keys live in one slot, on one shard: each Lua script
touches one slot, and a pipeline of one model's commands goes to one node. Chunk channels
use sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``, Redis 7.0+), which stays inside the shard
instead of being broadcast over the whole cluster bus; the API's relay holds one pub/sub
connection per shard (queueing/shards.py). MOVED and ASK redirections, and the new slot map
after a primary failover, are redis-py's ``RedisCluster``'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379
PROBE_TIMEOUT_S = 2.0

# Errors a cluster answers while a shard fails over (CLUSTERDOWN, TRYAGAIN, a slot no node
# serves yet): as transient as a lost connection, and handled alike (retry, or a 503).
UNAVAILABLE: tuple[type[Exception], ...] = (ClusterDownError, TryAgainError, SlotNotCoveredError)

_detected: dict[str, bool] = {}  # plain URL -> whether its server is a cluster node

# A node lost: the slot map must be read again before the next command.
_NODE_LOST = (RedisConnectionError, RedisTimeoutError, ClusterDownError, SlotNotCoveredError)


class Cluster(RedisCluster):
    """redis-py's asyncio ``RedisCluster``, whose pipelines also make it read the slot map
    again after a node failed.

    redis-py does so after a failed single command, but a pipeline without retries (ours:
    queueing/connection.py says why) only raises, or with ``raise_on_error=False`` returns
    the error in its replies: a worker whose only commands for a failed shard are pipelined
    (heartbeats: the registry keys may lie there) kept sending them to the dead primary
    after its replica had taken over, and its model dropped out of dispatch.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except AttributeError as exc:
            raise _reset(self, exc) from exc

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _Pipeline(self, transaction)


class _Pipeline(ClusterPipeline):
    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        client = self.cluster_client
        try:
            replies = await super().execute(raise_on_error, allow_redirections)
        except _NODE_LOST:
            client._initialize = True
            raise
        except AttributeError as exc:
            raise _reset(client, exc) from exc
        if any(isinstance(reply, _NODE_LOST) for reply in replies):
            client._initialize = True
        return replies


@dataclass(frozen=True)
class ClusterURL:
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def describe(self) -> str:
        """The URL without passwords, for logs."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"{h}:{p}" for h, p in self.nodes)


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SCHEMES


def parse(url: str) -> ClusterURL:
    """Read a cluster URL (``redis+cluster://`` or a plain one detected as a cluster); a
    malformed one raises ValueError saying why."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in (*SCHEMES, "redis", "rediss"):
        raise ValueError(f"not a Redis Cluster URL (redis+cluster://HOST:PORT,...): {url!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    nodes = tuple(_host_port(h) for h in hostlist.split(",") if h.strip())
    if not nodes:
        raise ValueError("a cluster URL names at least one node: redis+cluster://HOST:PORT")
    path = parts.path.strip("/")
    if path not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, not {path!r}")
    user, _, password = userinfo.partition(":")
    return ClusterURL(
        nodes,
        unquote(user) or None,
        unquote(password) or None if userinfo else None,
        tls=scheme.startswith("rediss"),
    )


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":") if ":" in text else (text.strip(), "", "")
    if port and not port.isdecimal():
        raise ValueError(f"bad port in a cluster URL: {text!r}")
    return host.strip("[]"), int(port or DEFAULT_PORT)


def wanted(url: str) -> bool:
    """Whether ``url`` means a cluster: its scheme says so, or (a plain URL) its server does."""
    if is_cluster_url(url):
        return True
    if url.split("://", 1)[0].lower() not in ("redis", "rediss"):
        return False
    if url not in _detected:
        _detected[url] = _probe(url)
    return _detected[url]


def _probe(url: str) -> bool:
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S
        )
        try:
            enabled = bool(client.info("cluster").get("cluster_enabled"))
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False  # not reachable now: taken as standalone, as before detection existed
    if enabled:
        log.info("redis: %s is a Redis Cluster node; using the cluster client", _safe(url))
    return enabled


def _safe(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or DEFAULT_PORT}"


def async_cluster(url: str, *, max_connections: int, **options: Any) -> RedisCluster:
    """An asyncio ``RedisCluster`` on the nodes ``url`` names (``options``: the standalone
    client's timeouts, protocol, decoding and retry; ``max_connections`` is per node)."""
    spec = parse(url)
    options = dict(options)
    options.pop("retry", None)  # see below
    return Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in spec.nodes],
        username=spec.username,
        password=spec.password,
        ssl=spec.tls,
        max_connections=max_connections,
        # A node that fails (killed primary) makes the client read the slot map again on the
        # next command; the command itself is not retried, as on a standalone Redis
        # (queueing/connection.py: a retried chunk pipeline could log its chunk twice).
        # MOVED and ASK are followed all the same: a redirect is not a retry.
        retry=options.pop("cluster_retry", None) or _no_retry(),
        **options,
    )


def sync_cluster(url: str, **options: Any) -> redis.RedisCluster:
    """A synchronous ``RedisCluster`` (what ``batch_queue.sync_connect`` returns on a cluster,
    so that the API starts; RQ itself cannot run on one: api/batches.py says so)."""
    from redis.cluster import ClusterNode as SyncNode

    spec = parse(url)
    options = {k: v for k, v in options.items() if k not in ("retry",)}
    return redis.RedisCluster(
        startup_nodes=[SyncNode(host, port) for host, port in spec.nodes],
        username=spec.username,
        password=spec.password,
        ssl=spec.tls,
        **options,
    )


def _reset(client: RedisCluster, exc: AttributeError) -> RedisConnectionError:
    """A connection reset while a command was being sent on it: redis-py raises
    AttributeError (its writer is gone: ``'NoneType' object has no attribute 'writelines'``,
    seen while a primary was killed under load), not a ConnectionError, and the API answered
    500. As a ConnectionError, callers answer 503 or retry, as for any lost connection."""
    client._initialize = True
    return RedisConnectionError(f"connection reset while sending: {exc}")


def _no_retry() -> Any:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0)


async def node_of(client: RedisCluster, key: str) -> ClusterNode:
    """The primary serving ``key``'s slot, reading the slot map first if the client has
    none yet (redis-py reads it on a client's first command; this may come before)."""
    if client._initialize:
        await client.initialize()
    return client.get_node_from_key(key)


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster client (asyncio or synchronous)."""
    return isinstance(client, RedisCluster | redis.RedisCluster)


def publish_command(client: Any) -> str:
    """The command a chunk goes out with: sharded pub/sub on a cluster (stays in the
    channel's shard), plain PUBLISH elsewhere."""
    return "SPUBLISH" if is_cluster(client) else "PUBLISH"


def node_client(node: ClusterNode, **overrides: Any) -> aioredis.Redis:
    """A standalone client on one node of a cluster, with the cluster's connection options
    (for the relay's pub/sub connection on that shard)."""
    options = node.connection_kwargs
    kwargs = {k: v for k, v in options.items() if k in _NODE_OPTIONS}
    if "SSL" in getattr(options.get("connection_class"), "__name__", ""):
        kwargs["ssl"] = True
    kwargs.update(overrides)
    return aioredis.Redis(host=node.host, port=node.port, **kwargs)


_NODE_OPTIONS = {
    "username",
    "password",
    "credential_provider",
    "encoding",
    "encoding_errors",
    "decode_responses",
    "health_check_interval",
    "socket_connect_timeout",
    "socket_keepalive",
    "socket_timeout",
    "protocol",
    "ssl_ca_data",
    "ssl_min_version",
    "ssl_ciphers",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
}
