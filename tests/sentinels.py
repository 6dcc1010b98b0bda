"""A replicated Redis for the tests: a primary, a replica and three sentinels, all real
redis-server processes on loopback ports (a sentinel is ``redis-server CONF --sentinel``).

Failover is tuned to be quick: a primary is down after 1 s without a reply
(``down-after-milliseconds``), two sentinels agree (quorum 2 of 3).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tokenrelay.embedded_redis import EmbeddedRedis, find_redis_server, free_port
from tokenrelay.queueing.durability import online_replicas

MASTER = "trmaster"
DOWN_AFTER_MS = 1000


class ReplicatedRedis:
    def __init__(self, *, replicas: int = 1, sentinels: int = 3) -> None:
        self.primary = EmbeddedRedis()
        self.replicas = [EmbeddedRedis() for _ in range(replicas)]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.dir = Path(tempfile.mkdtemp(prefix="tokenrelay-sentinel-"))
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The Sentinel URL tokenrelay's processes are given."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def start(self, timeout: float = 30.0) -> ReplicatedRedis:
        self.primary.start()
        for replica in self.replicas:
            _start_replica(replica, self.primary.port)
        for port in self.sentinel_ports:
            self.sentinels.append(self._start_sentinel(port))
        self._wait_ready(timeout)
        return self

    def _start_sentinel(self, port: int) -> subprocess.Popen[bytes]:
        conf = self.dir / f"sentinel-{port}.conf"  # a sentinel rewrites its conf: one each
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        return subprocess.Popen(
            [find_redis_server(), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,
        )

    def _wait_ready(self, timeout: float) -> None:
        """Until every sentinel sees the replica and the other sentinels: a failover needs
        both (and sentinels find each other through the primary every 2 s)."""
        deadline = time.monotonic() + timeout
        want_others, want_replicas = len(self.sentinel_ports) - 1, len(self.replicas)
        while time.monotonic() < deadline:
            if all(self._sees(p, want_others, want_replicas) for p in self.sentinel_ports):
                return
            time.sleep(0.2)
        raise TimeoutError("sentinels did not see each other and the replica in time")

    def _sees(self, port: int, others: int, replicas: int) -> bool:
        try:
            state = _sentinel(port).sentinel_master(MASTER)
        except redis.RedisError:
            return False
        return (
            state["num-other-sentinels"] >= others
            and state["num-slaves"] >= replicas
            and (replicas == 0 or self._replicas_online() >= replicas)
        )

    def _replicas_online(self) -> int:
        info = redis.Redis(port=self.primary_port(), socket_timeout=1).info("replication")
        return online_replicas(info)

    def primary_port(self) -> int:
        """Where the sentinels say the primary is now."""
        for port in self.sentinel_ports:
            try:
                return int(_sentinel(port).sentinel_get_master_addr_by_name(MASTER)[1])
            except (redis.RedisError, TypeError):
                continue
        raise redis.ConnectionError("no sentinel answered")

    def primary_url(self) -> str:
        """A plain URL of the current primary, for the test's own checks."""
        return f"redis://127.0.0.1:{self.primary_port()}/0"

    def server(self, port: int) -> EmbeddedRedis:
        return next(s for s in [self.primary, *self.replicas] if s.port == port)

    def wait_failover(self, old_port: int, timeout: float = 60.0) -> float:
        """Seconds until the sentinels name a primary other than ``old_port`` that takes
        writes."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                port = self.primary_port()
                if port != old_port and redis.Redis(port=port, socket_timeout=1).set("x", 1):
                    return time.monotonic() - t0
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"no failover from port {old_port} in {timeout:.0f} s")

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sentinels:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for server in [self.primary, *self.replicas]:
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _sentinel(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=1, decode_responses=True)


def _start_replica(server: EmbeddedRedis, primary_port: int) -> None:
    """``server`` started as a replica of the primary on ``primary_port``."""
    server.start()
    client = redis.Redis(port=server.port, socket_timeout=1)
    client.execute_command("REPLICAOF", "127.0.0.1", primary_port)
    client.close()
