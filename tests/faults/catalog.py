"""Every fault scenario, with its request count at small (CI) and full (bench) size."""

from __future__ import annotations

from .scenarios_clients import hangup_churn, slow_reader
from .scenarios_cluster import cluster_failover
from .scenarios_freeze import freeze_worker
from .scenarios_load import disconnect_storm, first_chunk_race, kill_workers, overload
from .scenarios_redis import redis_blips, redis_restart
from .scenarios_sentinel import sentinel_failover
from .scenarios_workers import long_generation, poison_job, rolling_restart

SCENARIOS = {
    "kill": (kill_workers, {"small": 60, "full": 2000}),
    "disconnect": (disconnect_storm, {"small": 80, "full": 2000}),
    "race": (first_chunk_race, {"small": 300, "full": 10000}),
    "overload": (overload, {"small": 200, "full": 2000}),
    "slow_reader": (slow_reader, {"small": 40, "full": 200}),
    "hangup_churn": (hangup_churn, {"small": 300, "full": 1500}),
    "redis_restart": (redis_restart, {"small": 100, "full": 300}),
    "blips": (redis_blips, {"small": 60, "full": 300}),
    "poison": (poison_job, {"small": 40, "full": 400}),
    "long": (long_generation, {"small": 6, "full": 24}),
    "rolling": (rolling_restart, {"small": 120, "full": 300}),
    "freeze": (freeze_worker, {"small": 40, "full": 300}),
    "sentinel": (sentinel_failover, {"small": 60, "full": 500}),
    "cluster": (cluster_failover, {"small": 60, "full": 1000}),
}
