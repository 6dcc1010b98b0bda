"""Every fault scenario, with its request count at small (CI) and full (bench) size."""

from __future__ import annotations

from .scenarios_load import disconnect_storm, first_chunk_race, kill_workers, overload

SCENARIOS = {
    "kill": (kill_workers, {"small": 60, "full": 2000}),
    "disconnect": (disconnect_storm, {"small": 80, "full": 2000}),
    "race": (first_chunk_race, {"small": 300, "full": 10000}),
    "overload": (overload, {"small": 200, "full": 2000}),
}
