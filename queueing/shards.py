"""The relay's pub/sub on a Redis Cluster: one sharded pub/sub connection per shard.

A chunk channel (``{m:NAME}``-tagged, queueing/keys.py) lives in its model's slot; workers
``SPUBLISH`` to it, and only the nodes of that slot's shard see the message. So the API
subscribes (``SSUBSCRIBE``) on the primary that serves the slot, one connection per shard
carrying every in-flight request of the models on it, each read by its own task: a quiet
shard never delays a busy one.

When a shard's connection fails (its primary killed, a failover, a reset) or its node says a
channel moved (``sunsubscribe`` pushed after a reshard), the slot map is read again and the
channels still wanted are subscribed on the nodes that serve them now. Until then their
chunks come from the chunk log, which a quiet subscription reads every second
(queueing/relay.py), so nothing is lost: only slower for a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .cluster import node_client, node_of

log = logging.getLogger(__name__)

Route = Callable[[dict[str, Any]], None]
REROUTE_PAUSE_S = 0.5  # between attempts to resubscribe channels whose shard failed


class _Shard:
    """One node's sharded pub/sub connection and the task that reads it."""

    def __init__(self, node: ClusterNode, route: Route, lost: Callable[[_Shard], None]) -> None:
        self.name = node.name
        self.client = node_client(node, health_check_interval=0)
        self.pubsub = self.client.pubsub()
        self.channels: set[str] = set()
        self._route = route
        self._lost = lost
        self._active = asyncio.Event()
        # One command at a time: redis-py's PubSub opens its connection on the first
        # command, and two first commands at once each opened one, the second replacing the
        # first, whose SSUBSCRIBE's confirmation was then never read (a 503 after 5 s).
        self._sending = asyncio.Lock()
        self.task = asyncio.create_task(self._pump(), name=f"shard-relay {self.name}")

    async def add(self, channel: str) -> None:
        self.channels.add(channel)
        async with self._sending:
            await self.pubsub.ssubscribe(channel)
        self._active.set()

    async def remove(self, channel: str) -> None:
        self.channels.discard(channel)
        async with self._sending:
            await self.pubsub.sunsubscribe(channel)

    async def _pump(self) -> None:
        while True:
            if not self.pubsub.subscribed:
                self._active.clear()
                await self._active.wait()
                continue
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sharded pub/sub on %s failed: %s", self.name, exc)
                self._lost(self)
                return
            if message is not None:
                self._route(message)

    async def close(self) -> None:
        if asyncio.current_task() is not self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.client.aclose()


class ShardedChannels:
    """Which shard each wanted channel is subscribed on; moves them when a shard fails."""

    def __init__(self, cluster: RedisCluster, route: Route) -> None:
        self.cluster = cluster
        self._route = route
        self._shards: dict[str, _Shard] = {}
        self._where: dict[str, str] = {}  # wanted channel -> the shard it is subscribed on
        self._orphans: set[str] = set()  # wanted channels whose shard failed
        self._reroute: asyncio.Task[None] | None = None

    @property
    def connections(self) -> int:
        """Open pub/sub connections: one per shard in use."""
        return len(self._shards)

    async def add(self, channel: str) -> None:
        """SSUBSCRIBE ``channel`` on the primary serving its slot (the confirmation reaches
        the route as an ``ssubscribe`` message). A failure is raised to the caller, and the
        slot map is read again for the next one."""
        shard = None
        try:
            shard = self._shard(await node_of(self.cluster, channel))
            self._where[channel] = shard.name
            await shard.add(channel)
        except Exception as exc:
            self._where.pop(channel, None)
            if shard is not None:
                shard.channels.discard(channel)
                if not shard.channels and self._shards.get(shard.name) is shard:
                    del self._shards[shard.name]  # likely a dead node: not kept around
                    asyncio.get_running_loop().create_task(shard.close())
            self._refresh_soon()
            if isinstance(exc, RedisError):
                raise
            # A connection reset under the call (redis-py raises AttributeError or
            # RuntimeError then): the caller answers 503, as for any lost connection.
            raise RedisConnectionError(f"sharded pub/sub connection reset: {exc}") from exc

    async def remove(self, channel: str) -> None:
        self._orphans.discard(channel)
        shard = self._shards.get(self._where.pop(channel, ""))
        if shard is not None:
            await shard.remove(channel)

    def route(self, message: dict[str, Any]) -> bool:
        """Handle what only concerns the shards (a channel moved away); True if handled."""
        if message.get("type") != "sunsubscribe":
            return False
        channel = message.get("channel") or ""
        if channel in self._where:  # not ours to drop: the node no longer serves its slot
            self._orphan([channel])
        return True

    def _shard(self, node: ClusterNode) -> _Shard:
        shard = self._shards.get(node.name)
        if shard is None:
            shard = self._shards[node.name] = _Shard(node, self._dispatch, self._lost)
        return shard

    def _dispatch(self, message: dict[str, Any]) -> None:
        if not self.route(message):
            self._route(message)

    def _lost(self, shard: _Shard) -> None:
        if self._shards.get(shard.name) is shard:
            del self._shards[shard.name]
        asyncio.get_running_loop().create_task(shard.close())
        self._orphan([c for c in shard.channels if self._where.get(c) == shard.name])

    def _orphan(self, channels: list[str]) -> None:
        for channel in channels:
            self._where.pop(channel, None)
            self._orphans.add(channel)
        self._refresh_soon()

    def _refresh_soon(self) -> None:
        if self._reroute is None or self._reroute.done():
            self._reroute = asyncio.get_running_loop().create_task(self._rerouted())

    async def _rerouted(self) -> None:
        """Read the slot map again, then resubscribe the orphaned channels still wanted,
        until none is left."""
        while True:
            try:
                await self.cluster.nodes_manager.initialize()
            except Exception as exc:
                log.warning("cluster slot map not read (retrying): %s", exc)
                await asyncio.sleep(REROUTE_PAUSE_S)
                continue
            for channel in list(self._orphans):
                self._orphans.discard(channel)
                try:
                    await self.add(channel)
                except Exception as exc:
                    log.debug("resubscribing %s failed, retrying: %s", channel, exc)
                    self._orphans.add(channel)
            if not self._orphans:
                return
            await asyncio.sleep(REROUTE_PAUSE_S)

    async def close(self) -> None:
        if self._reroute is not None:
            self._reroute.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reroute
        shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            await shard.close()
