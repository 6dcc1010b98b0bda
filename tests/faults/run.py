"""Run the fault scenarios outside pytest: ``python -m tests.faults.run [--full] [names...]``.

Starts its own Redis, a fresh API and workers per scenario, prints each scenario's one-line
summary, writes test-artifacts/faults/<scenario>.json and ends with a markdown table. Exits
non-zero if any scenario broke an invariant.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from tokenrelay.embedded_redis import EmbeddedRedis

from ..stack import Stack
from .catalog import SCENARIOS
from .ledger import Summary


def table(summaries: list[Summary]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    rows = [
        "| scenario | size | requests | accepted | rejected (429) | faults | lost | duplicated "
        "| completed | errored | cancelled | p99 cancel ms | p99 429 ms | leaked keys "
        "| violations | seconds |",
        "|" + "---|" * 16,
    ]
    for s in summaries:
        rows.append(
            f"| {s.scenario} | {s.size} | {s.requests} | {s.accepted} | {s.rejected} "
            f"| {s.faults} | {s.lost} | {s.duplicated} | {s.completed} | {s.errored} "
            f"| {s.cancelled} | {ms(s.p99_cancel_latency_s)} | {ms(s.p99_reject_latency_s)} "
            f"| {s.leaked_keys} | {len(s.violations)} | {s.elapsed_s:.0f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="full size (default: small)")
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], default=[])
    args = parser.parse_args()
    size = "full" if args.full else "small"
    names = args.scenarios or list(SCENARIOS)
    server = EmbeddedRedis().start()
    summaries = []
    try:
        for name in names:
            run, sizes = SCENARIOS[name]
            stack = Stack(server.url, f"f{uuid.uuid4().hex[:10]}")
            try:
                summary = asyncio.run(run(stack, n=sizes[size], size=size))
            finally:
                stack.stop()
            summary.write()
            print(summary.line(), flush=True)
            for v in summary.violations[:10]:
                print(f"    ! {v}", flush=True)
            for v in summary.slow[:10]:
                print(f"    slow: {v}", flush=True)
            summaries.append(summary)
    finally:
        server.stop()
    print()
    print(table(summaries))
    return 1 if any(s.violations or s.slow for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
