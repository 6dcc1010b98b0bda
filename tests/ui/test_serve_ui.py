"""`tokenrelay serve` starts the browser UI, prints its URL, and stops it on Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import psutil

from tokenrelay.commands import tokenrelay_argv
from tokenrelay.embedded_redis import free_port

from ..conftest import DEMO_MODEL
from .conftest import Page


def test_serve_starts_the_ui(tmp_path, demo_model, page: Page) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [
            *tokenrelay_argv(),
            "serve",
            "--port",
            str(free_port()),
            "--ui-port",
            str(free_port()),
        ],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while "Press Ctrl-C" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        match = re.search(r"Browser UI \(chat, arena, status\): (\S+)", log.read_text())
        assert match, log.read_text()
        page.page.goto(match.group(1))
        page.page.locator("#chat-model input").wait_for()
        page.page.wait_for_function(
            f"() => document.querySelector('#chat-model input').value === '{DEMO_MODEL}'"
        )
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("ui" in c.cmdline() for c in children)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert not [c for c in children if c.is_running() and c.status() != "zombie"]
