"""The processes `tokenrelay serve` starts, kept running: a worker that dies is started again."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from .commands import tokenrelay_argv

RESTART_WINDOW = 60.0  # seconds
MAX_RESTARTS = 5  # within the window, before serve gives up on a crashing worker


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] | None
    popen: subprocess.Popen[bytes]
    restarts: deque[float] = field(default_factory=deque)


class Supervisor:
    """Children of `serve`, each started again when it exits: a worker's unfinished jobs are
    reclaimed by the live workers meanwhile, and the API and the UI keep no state. One that
    keeps exiting (a crash loop) stops everything. Once stopping, an exit is the stop, not
    a crash: a signal to serve's process group reaches the children too."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.stopping = False

    def start(self, name: str, *argv: str, env: dict[str, str] | None = None) -> Child:
        child = Child(name, list(argv), env, self._popen(list(argv), env))
        self.children.append(child)
        return child

    @property
    def popens(self) -> list[subprocess.Popen[bytes]]:
        return [c.popen for c in self.children]

    def check(self) -> str | None:
        """Start exited children again; the reason to stop everything, if there is one."""
        for child in self.children:
            code = child.popen.poll()
            if code is None or self.stopping:
                continue
            now = time.monotonic()
            while child.restarts and child.restarts[0] < now - RESTART_WINDOW:
                child.restarts.popleft()
            if len(child.restarts) >= MAX_RESTARTS:
                return (
                    f"the {child.name} exited {MAX_RESTARTS + 1} times within "
                    f"{RESTART_WINDOW:.0f}s (last code {code}); see its log above"
                )
            child.restarts.append(now)
            print(
                f"tokenrelay serve: the {child.name} exited (code {code}); starting it again.",
                file=sys.stderr,
                flush=True,
            )
            child.popen = self._popen(child.argv, child.env)
        return None

    def stop(self, grace: float = 35) -> None:
        self.stopping = True
        for child in reversed(self.children):
            if child.popen.poll() is None:
                child.popen.terminate()
        for child in self.children:
            try:
                child.popen.wait(grace)
            except subprocess.TimeoutExpired:
                child.popen.kill()

    @staticmethod
    def _popen(argv: list[str], env: dict[str, str] | None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(tokenrelay_argv(*argv), env=env)
