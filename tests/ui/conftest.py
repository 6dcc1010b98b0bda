"""Browser fixtures: a real `tokenrelay ui` process and headless Chromium driven by Playwright.

Chromium is Debian's package (`apt-get install chromium`); Playwright's own browser download
is never used. Every page records the hosts it asked for, so a test can check that nothing
left the deployment.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tokenrelay.embedded_redis import free_port

from ..stack import Stack

CHROMIUM = "/usr/bin/chromium"
# Every wait in the browser (locators, wait_for_function, expect): a hang guard, not a claim
# on how fast a shared 2-core machine renders. expect() alone would default to 5 s.
UI_TIMEOUT_MS = 60_000
SCREENSHOTS = Path("test-artifacts/screenshots")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def start_ui(stack: Stack, *argv: str, api_key: str = "EMPTY", root_path: str = "") -> str:
    """Start `tokenrelay ui` against the stack's API; return the page's URL."""
    port = free_port()
    args = ["--api-url", f"{stack.url}/v1", "--api-key", api_key, "--port", str(port)]
    if root_path:
        args += ["--root-path", root_path]
    proc = stack._spawn("ui", *args, *argv)
    url = f"http://127.0.0.1:{port}{root_path.rstrip('/')}/"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.alive(), f"ui exited:\n{proc.output()}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up:\n{proc.output()}")


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    # Module scope, not session: Playwright's sync API keeps an event loop running in this
    # thread while it lives, and every async test collected after it (pytest-asyncio's
    # Runner) then fails with "cannot be called from a running event loop".
    if not shutil.which("chromium") and not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium package (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A Playwright page plus the hosts it contacted and a screenshot helper."""

    def __init__(self, page) -> None:  # type: ignore[no-untyped-def]
        self.page = page
        self.hosts: set[str] = set()
        page.on("request", lambda r: self.hosts.add(urlparse(r.url).hostname or r.url))
        page.set_default_timeout(UI_TIMEOUT_MS)

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def outside_hosts(self) -> set[str]:
        return {h for h in self.hosts if h not in ("127.0.0.1", "localhost")}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.failed_call = report.failed
    return report


@pytest.fixture
def page(browser, request) -> Iterator[Page]:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = Page(context.new_page())
    yield page
    if getattr(request.node, "failed_call", False):
        page.shot(f"FAILED-{request.node.name}")
    context.close()
