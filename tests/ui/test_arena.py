"""Arena, leaderboard and status tabs in a real browser, votes checked in Redis."""

from __future__ import annotations

import json
import subprocess

from playwright.sync_api import expect

from tokenrelay.commands import tokenrelay_argv

from .conftest import Page, start_ui


def open_tab(page: Page, url: str, name: str) -> None:
    page.page.goto(url)
    page.page.get_by_role("tab", name=name).click()


def two_fake_models(stack) -> None:  # type: ignore[no-untyped-def]
    stack.api()
    stack.fake_worker()
    stack.worker("--engine", "fake", "--model-names", "fake-b")


def test_battle_vote_lands_in_redis(stack, page: Page, sync_redis, tmp_path) -> None:
    two_fake_models(stack)
    url = start_ui(stack)
    open_tab(page, url, "Arena")
    box = page.page.locator("#arena-input textarea")
    box.fill("which of you is better?")
    box.press("Enter")
    vote_a = page.page.locator("#arena-vote-a")
    page.page.wait_for_function("() => !document.querySelector('#arena-vote-a').disabled")
    for side in "ab":  # both answers streamed, names still hidden
        log = page.page.locator(f"#arena-log-{side}")
        log.get_by_text("tokens/s").wait_for()
        assert "fake" not in page.page.locator(f"#arena-log-{side} label").first.inner_text()
    page.shot("arena-answered")
    vote_a.click()
    reveal = page.page.locator("#arena-reveal")
    reveal.get_by_text("Your vote").wait_for()
    page.shot("arena-voted")

    entries = sync_redis.xrange(f"{stack.prefix}:ui:votes")
    assert len(entries) == 1
    vote = json.loads(entries[0][1]["vote"])
    assert vote["winner"] == "model_a" and vote["mode"] == "battle"
    assert {vote["model_a"], vote["model_b"]} == {"fake", "fake-b"}
    assert vote["conversation_a"][0] == {"role": "user", "content": "which of you is better?"}
    assert vote["conversation_a"][1]["role"] == "assistant"
    assert vote["model_a"] in reveal.inner_text() and vote["model_b"] in reveal.inner_text()

    # the leaderboard ranks the winner first
    page.page.get_by_role("tab", name="Leaderboard").click()
    board = page.page.locator("#leaderboard")
    expect(board.get_by_test_id("cell-0-1")).to_have_text(vote["model_a"])
    expect(board.get_by_test_id("cell-1-1")).to_have_text(vote["model_b"])
    page.shot("leaderboard")

    # and the votes export as JSONL
    out = tmp_path / "votes.jsonl"
    subprocess.run(
        [
            *tokenrelay_argv(),
            "ui",
            "--redis-url",
            stack.redis_url,
            "--key-prefix",
            stack.prefix,
            "--export-votes",
            str(out),
        ],
        check=True,
        timeout=60,
    )
    lines = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [vote["id"]]
    assert page.outside_hosts() == set()


def test_status_tab_shows_workers_and_refreshes(stack, page: Page) -> None:
    stack.api()
    stack.fake_worker()
    url = start_ui(stack)
    open_tab(page, url, "Status")
    workers = page.page.locator("#status-workers")
    expect(workers.get_by_test_id("cell-0-1")).to_have_text("fake")
    expect(workers.get_by_test_id("cell-0-5")).to_have_text("0 / 8")
    stack.worker("--engine", "fake", "--model-names", "fake-b")
    # no click: the tab refreshes itself
    models = page.page.locator("#status-models")
    expect(models.get_by_test_id("cell-1-0")).to_have_text("fake-b")
    page.shot("status")


# The width of each text in the button's first font, with two different fallbacks: equal
# when that font has every glyph, different when some letters come from the fallback.
FALLBACK_WIDTHS = """async ([texts, weight, size, family]) => {
  const ctx = document.createElement('canvas').getContext('2d');
  const widths = {};
  for (const text of texts) {
    await document.fonts.load(`${weight} ${size} ${family}`, text);
    const width = (fallback) => {
      ctx.font = `${weight} ${size} ${family}, ${fallback}`;
      return ctx.measureText(text).width;
    };
    widths[text] = [width('monospace'), width('serif')];
  }
  return widths;
}"""


def test_vote_buttons_render_in_one_font(stack, page: Page) -> None:
    """Bug: the vote buttons' "A", "B" (of "A is better", "Both are bad") were in another
    font than the rest of their text. Gradio's theme serves Source Sans Pro at weight 600,
    the buttons' weight, from a 5 KB file of a few glyphs; every other letter fell back to
    the system font. The UI now serves weights 400 and 700 (whole files)."""
    url = start_ui(stack)  # no API needed: the buttons are drawn before any answer
    open_tab(page, url, "Arena")
    buttons = page.page.locator("[id^=arena-vote-]")
    buttons.first.wait_for()
    style = buttons.first.evaluate(
        "e => { const s = getComputedStyle(e);"
        " return [s.fontWeight, s.fontSize, s.fontFamily.split(',')[0]]; }"
    )
    assert "Source Sans Pro" in style[2]
    texts = [*buttons.all_inner_texts(), "Send", "Stop"]
    widths = page.page.evaluate(FALLBACK_WIDTHS, [texts, *style])
    page.shot("arena-vote-buttons")
    for text, (with_mono, with_serif) in widths.items():
        assert with_mono == with_serif, f"{text!r} at {style}: some glyphs come from a fallback"
