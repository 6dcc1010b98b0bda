"""Fault scenarios at small size; the same code at full size: bench/faults.sh."""

from __future__ import annotations

import pytest

from ..stack import Stack
from .catalog import SCENARIOS


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_fault_scenario(stack: Stack, scenario: str) -> None:
    run, sizes = SCENARIOS[scenario]
    summary = await run(stack, n=sizes["small"], size="small")
    summary.write()
    print(summary.line())
    print(*(f"slow: {v}" for v in summary.slow), sep="\n")  # speed targets: the bench's
    assert not summary.violations, "\n".join(summary.violations[:20])
    assert summary.lost == 0 and summary.duplicated == 0
    assert summary.accepted == summary.completed + summary.errored + summary.cancelled
