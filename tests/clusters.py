"""A Redis Cluster for the tests: 3 primaries + 3 replicas, real redis-server processes on
loopback ports, joined with ``redis-cli --cluster create ... --cluster-replicas 1``.

Failover is tuned to be quick: a primary is failed after 1 s without a reply
(``cluster-node-timeout``); its replica is then elected by the other primaries.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.cluster import key_slot

from tokenrelay.embedded_redis import find_redis_server, free_port

NODE_TIMEOUT_MS = 1000


class ClusterNodes:
    def __init__(self, primaries: int = 3, replicas_each: int = 1) -> None:
        self.ports = [_node_port() for _ in range(primaries * (1 + replicas_each))]
        self.primaries = primaries
        self.replicas_each = replicas_each
        self.dir = Path(tempfile.mkdtemp(prefix="tokenrelay-cluster-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The URL tokenrelay's processes are given (any node of it would do)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    @property
    def seed_url(self) -> str:
        """A plain URL of one node: tokenrelay detects the cluster behind it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout: float = 60.0) -> ClusterNodes:
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            _wait_ping(port, 10.0)
        subprocess.run(
            [
                shutil.which("redis-cli") or "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas_each),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
        self.wait_ok(timeout)
        return self

    def _start_node(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        args = [
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(node_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            # A replica may be promoted however long it was cut off (the tests kill at will).
            "--cluster-require-full-coverage",
            "no",  # the other shards serve on while one fails over
            "--cluster-replica-validity-factor",
            "0",
        ]
        self.procs[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0
        )

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, decode_responses=True)

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says the cluster is ok with all slots served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ok(p) for p in self.live_ports()):
                return
            time.sleep(0.2)
        raise TimeoutError("the cluster did not come up (cluster_state ok) in time")

    def _ok(self, port: int) -> bool:
        try:
            info = self.client(port).cluster("info")
        except redis.RedisError:
            return False
        return info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == 16384

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def primary_of(self, key: str) -> int:
        """The port of the primary that serves ``key``'s slot now."""
        slot = key_slot(key.encode())
        for port in self.live_ports():
            try:
                for start, end, primary, *_ in self.client(port).execute_command("CLUSTER SLOTS"):
                    if int(start) <= slot <= int(end):
                        return int(primary[1])
            except redis.RedisError:
                continue
        raise redis.ConnectionError("no node answered CLUSTER SLOTS")

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def wait_failover(self, old_port: int, key: str, timeout: float = 60.0) -> float:
        """Seconds until a node other than ``old_port`` serves ``key``'s slot and takes
        writes (``key`` must carry a hash tag: the probe writes a key beside it)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                port = self.primary_of(key)
                # a key of the same slot, not ``key`` itself (a job stream, say)
                if port != old_port and self.client(port).set(f"{key}:failover-probe", 1, ex=60):
                    return time.monotonic() - t0
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"no failover from port {old_port} in {timeout:.0f} s")

    def move_slot(self, key: str, to_port: int) -> int:
        """Migrate ``key``'s slot, with its keys, to the primary on ``to_port`` (what
        ``redis-cli --cluster reshard`` does, for one slot); returns how many keys moved."""
        slot, src_port = key_slot(key.encode()), self.primary_of(key)
        src, dst = self.client(src_port), self.client(to_port)
        src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 50):
            src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        for port in (to_port, src_port):  # the two owners; the rest learn it by gossip
            self.client(port).execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        return moved

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _node_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a port too."""
    while (port := free_port()) > 55000:
        pass
    return port


def _wait_ping(port: int, timeout: float) -> None:
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer on port {port}")


def models_on_distinct_shards(cluster: ClusterNodes, prefix: str, count: int = 3) -> list[str]:
    """``count`` model names whose {m:NAME} slots are served by different primaries."""
    chosen: list[str] = []
    owners: set[int] = set()
    for i in range(1000):
        name = f"model-{i}"
        owner = cluster.primary_of(f"{prefix}:{{m:{name}}}:jobs")
        if owner not in owners:
            owners.add(owner)
            chosen.append(name)
            if len(chosen) == count:
                return chosen
    raise RuntimeError("could not spread models over the shards")
