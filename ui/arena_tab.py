"""The arena and leaderboard tabs: one prompt to two models at once, a vote, a ranking.

A round is a ``gr.State`` dict: the two models, the mode, both conversations and whether
it was voted on. A vote ends the round (names revealed); the next prompt starts a new one.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr

from .arena import LEADERBOARD_HEADERS, WINNERS, Vote, VoteStore, leaderboard
from .chat import render, sampling, stream_answer
from .client import ApiClient, ApiError

BATTLE, NAMED = "Battle (anonymous)", "Side by side (named)"
VOTE_LABELS = {
    "a": "A is better",
    "b": "B is better",
    "tie": "Tie",
    "bothbad": "Both are bad",
}


def new_round() -> dict[str, Any]:
    return {"models": [], "mode": "", "a": [], "b": [], "voted": False}


async def pick_models(api: ApiClient, mode: str, a: str | None, b: str | None) -> list[str]:
    """Named: the two chosen. Battle: two different served models at random (or one twice)."""
    if mode == NAMED:
        if not a or not b:
            raise ApiError(400, "Choose a model for each side (refresh the lists first).")
        return [a, b]
    models = await api.models()
    if not models:
        raise ApiError(503, "No worker is live for any model.", "overloaded")
    return random.sample(models, 2) if len(models) > 1 else models * 2


async def merge(*streams: AsyncIterator[Any]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's index.

    Leaving early (Stop) cancels every reader, which closes both HTTP streams."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is done:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sides(rnd: dict[str, Any], errors: tuple[str, str] = ("", "")) -> tuple[Any, Any]:
    """Both chatbots' updates: the conversation, and the model's name once it may be seen."""
    named = rnd["mode"] == NAMED or rnd["voted"]
    models = rnd["models"] or ["", ""]
    return tuple(  # type: ignore[return-value]
        gr.update(
            value=render(rnd[side], error),
            label=f"Model {side.upper()}: {model}" if named and model else f"Model {side.upper()}",
        )
        for side, model, error in zip("ab", models, errors, strict=True)
    )


def vote_buttons(enabled: bool) -> list[Any]:
    return [gr.update(interactive=enabled) for _ in VOTE_LABELS]


def build_arena(api: ApiClient, store: VoteStore, demo: gr.Blocks) -> None:
    """The arena tab's components and events; call inside a ``gr.Tab``."""
    mode = gr.Radio([BATTLE, NAMED], value=BATTLE, label="Mode", elem_id="arena-mode")
    with gr.Row(visible=False) as pickers:
        model_a = gr.Dropdown(label="Model A", choices=[], elem_id="arena-model-a")
        model_b = gr.Dropdown(label="Model B", choices=[], elem_id="arena-model-b")
        refresh = gr.Button("Refresh models", scale=0, elem_id="arena-refresh")
    notice = gr.Markdown(elem_id="arena-notice")
    with gr.Row():
        log_a = gr.Chatbot(label="Model A", elem_id="arena-log-a", height=380, buttons=["copy"])
        log_b = gr.Chatbot(label="Model B", elem_id="arena-log-b", height=380, buttons=["copy"])
    with gr.Row():
        votes = [
            gr.Button(label, interactive=False, elem_id=f"arena-vote-{key}")
            for key, label in VOTE_LABELS.items()
        ]
    reveal = gr.Markdown(elem_id="arena-reveal")
    with gr.Row():
        text = gr.Textbox(
            placeholder="One prompt, two answers", show_label=False, elem_id="arena-input", scale=6
        )
        send = gr.Button("Send", variant="primary", elem_id="arena-send", scale=1)
        stop = gr.Button("Stop", variant="stop", elem_id="arena-stop", scale=1)
    with gr.Accordion("Parameters", open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
            max_tokens = gr.Slider(1, 4096, value=512, step=1, label="Max tokens")
    new = gr.Button("New round", elem_id="arena-new", size="sm")
    rnd = gr.State(new_round())

    async def refresh_models(a: str | None, b: str | None) -> tuple[Any, Any, str]:
        try:
            models = await api.models()
        except ApiError as exc:
            return gr.update(), gr.update(), exc.readable()
        second = models[1] if len(models) > 1 else (models or [None])[0]
        return (
            gr.update(choices=models, value=a if a in models else (models or [None])[0]),
            gr.update(choices=models, value=b if b in models else second),
            "" if models else "**No model is ready** (no worker is live).",
        )

    async def ask(message: str, rnd: dict[str, Any], mode: str, a: str | None, b: str | None):  # type: ignore[no-untyped-def]
        if not message.strip():
            return message, rnd, gr.update(), gr.update(), "", gr.update()
        if rnd["voted"] or not rnd["models"]:
            rnd = new_round()
            try:
                rnd["models"] = await pick_models(api, mode, a, b)
            except ApiError as exc:
                return message, rnd, gr.update(), gr.update(), exc.readable(), ""
            rnd["mode"] = mode
        for side in "ab":
            rnd[side] = [*rnd[side], {"role": "user", "content": message}]
        return "", rnd, *sides(rnd), "", ""

    async def answer(rnd: dict[str, Any], temp: float, max_t: float):  # type: ignore[no-untyped-def]
        if not rnd["models"] or rnd["voted"] or not rnd["a"] or rnd["a"][-1]["role"] != "user":
            return
        rnd = {**rnd, "a": [dict(m) for m in rnd["a"]], "b": [dict(m) for m in rnd["b"]]}
        errors = ["", ""]
        params = sampling(temp, 1.0, max_t)
        streams = [
            stream_answer(api, m, rnd[s], "", params)
            for m, s in zip(rnd["models"], "ab", strict=True)
        ]
        async for side, (_, error) in merge(*streams):
            errors[side] = error
            yield *sides(rnd, tuple(errors)), rnd, *vote_buttons(False)  # type: ignore[arg-type]
        answered = all(rnd[s][-1]["role"] == "assistant" for s in "ab")
        yield *sides(rnd, tuple(errors)), rnd, *vote_buttons(answered)  # type: ignore[arg-type]

    async def vote(key: str, rnd: dict[str, Any]):  # type: ignore[no-untyped-def]
        if rnd["voted"] or not rnd["models"]:
            return rnd, gr.update(), gr.update(), gr.update(), *vote_buttons(False)
        a, b = rnd["models"]
        plain = [[{"role": m["role"], "content": m["content"]} for m in rnd[s]] for s in "ab"]
        mode = "battle" if rnd["mode"] == BATTLE else "named"
        await store.add(Vote(mode, a, b, WINNERS[key], *plain))
        rnd = {**rnd, "voted": True}
        text = (
            f"**Model A** was `{a}`, **Model B** was `{b}`. Your vote: "
            f"**{VOTE_LABELS[key]}** (saved in {store.where}). Send a prompt for a new round."
        )
        return rnd, text, *sides(rnd), *vote_buttons(False)

    def voter(key: str):  # type: ignore[no-untyped-def]
        async def cast(rnd: dict[str, Any]):  # type: ignore[no-untyped-def]
            return await vote(key, rnd)

        return cast

    def reset():  # type: ignore[no-untyped-def]
        rnd = new_round()
        return rnd, "", *sides(rnd), *vote_buttons(False)

    round_outputs = [rnd, reveal, log_a, log_b, *votes]
    mode.change(lambda m: gr.update(visible=m == NAMED), mode, pickers, queue=False)
    mode.change(reset, None, round_outputs, queue=False)
    refresh.click(refresh_models, [model_a, model_b], [model_a, model_b, notice])
    demo.load(refresh_models, [model_a, model_b], [model_a, model_b, notice])
    events = [
        trigger(
            ask, [text, rnd, mode, model_a, model_b], [text, rnd, log_a, log_b, notice, reveal]
        ).then(answer, [rnd, temperature, max_tokens], [log_a, log_b, rnd, *votes])
        for trigger in (text.submit, send.click)
    ]
    stop.click(None, None, None, cancels=events)
    new.click(reset, None, round_outputs, cancels=events)
    for key, button in zip(VOTE_LABELS, votes, strict=True):
        button.click(voter(key), rnd, round_outputs)


def build_leaderboard(store: VoteStore, tab: gr.Tab) -> None:
    """The leaderboard tab: ratings from every vote, and a JSONL export of the votes."""
    gr.Markdown(
        "Bradley-Terry ratings on the Elo scale (1000 = the average model) from every "
        "arena vote; a tie or *both bad* counts half a win each, and a model against "
        "itself is left out."
    )
    table = gr.Dataframe(headers=LEADERBOARD_HEADERS, elem_id="leaderboard", interactive=False)
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="leaderboard-refresh")
        export = gr.Button("Export votes (JSONL)", elem_id="votes-export")
    file = gr.File(label="Votes", elem_id="votes-file", visible=False)

    async def rows() -> list[list[Any]]:
        return leaderboard(await store.all()) or [[None, "(no votes yet)", None, 0, 0, 0, 0]]

    async def export_votes() -> Any:
        import json

        votes = await store.all()
        with tempfile.NamedTemporaryFile(
            "w", suffix=".jsonl", prefix="votes-", delete=False, encoding="utf-8"
        ) as out:
            out.writelines(json.dumps(v, ensure_ascii=False) + "\n" for v in votes)
        return gr.update(value=out.name, visible=True)

    refresh.click(rows, None, table)
    tab.select(rows, None, table)
    export.click(export_votes, None, file)
