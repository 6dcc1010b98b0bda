"""serve's supervisor: children start again when they exit, a crash loop stops everything."""

from __future__ import annotations

import time

from tokenrelay.supervisor import MAX_RESTARTS, Supervisor


def test_a_child_that_keeps_exiting_stops_everything() -> None:
    children = Supervisor()
    child = children.start("version printer", "--version")  # exits at once, every time
    reasons = []
    deadline = time.monotonic() + 120
    while not reasons and time.monotonic() < deadline:
        child.popen.wait(30)
        reasons.append(children.check())
        reasons = [r for r in reasons if r]
    children.stop()
    assert reasons and f"exited {MAX_RESTARTS + 1} times" in reasons[0]
    assert len(child.restarts) == MAX_RESTARTS
