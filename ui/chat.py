"""The direct chat tab: one model, streamed answers, Stop, regenerate, clear, parameters.

The conversation lives in a ``gr.State`` as OpenAI messages (plus a ``footer`` on each
answer: its token counts and speed); the chatbot shows a rendering of it, so the footers
and error notices never reach the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr

from .client import ApiClient, ApiError, Usage

Convo = list[dict[str, str]]


def render(convo: Convo, error: str = "") -> list[dict[str, str]]:
    """The chatbot's messages: each answer with its footer, then an error notice if any."""
    shown = []
    for msg in convo:
        content = msg["content"]
        if msg.get("footer"):
            content = f"{content}\n\n<sub>{msg['footer']}</sub>"
        shown.append({"role": msg["role"], "content": content})
    if error:
        shown.append({"role": "assistant", "content": f"Error: {error}"})
    return shown


def to_messages(convo: Convo, system: str) -> list[dict[str, str]]:
    start = [{"role": "system", "content": system}] if (system or "").strip() else []
    return start + [{"role": m["role"], "content": m["content"]} for m in convo]


def sampling(temperature: float, top_p: float, max_tokens: float) -> dict[str, Any]:
    return {"temperature": temperature, "top_p": top_p, "max_tokens": int(max_tokens)}


async def stream_answer(
    api: ApiClient, model: str | None, convo: Convo, system: str, params: dict[str, Any]
) -> AsyncIterator[tuple[Convo, str]]:
    """Append an answer to ``convo`` as it streams; yield (convo, error) after each piece."""
    if not model:
        yield convo, "**No model picked.** Choose one in the model list (refresh it first)."
        return
    answer = {"role": "assistant", "content": "", "footer": ""}
    messages = to_messages(convo, system)
    convo.append(answer)
    usage = Usage()
    try:
        # aclosing: a Stop that closes this generator closes the stream's too, whose cleanup
        # cancels the job on the API (ui/client.py)
        async with contextlib.aclosing(api.stream_chat(model, messages, usage, **params)) as s:
            async for piece in s:
                answer["content"] += piece
                yield convo, ""
    except ApiError as exc:
        if not answer["content"]:
            convo.remove(answer)
        yield convo, exc.readable()
        return
    answer["footer"] = f"{model} · {usage.footer()}"
    yield convo, ""


async def model_choices(api: ApiClient, current: str | None = None) -> tuple[Any, str]:
    """A dropdown update with the served models, and a notice if there are none."""
    try:
        models = await api.models()
    except ApiError as exc:
        return gr.update(choices=[], value=None), exc.readable()
    if not models:
        notice = "**No model is ready** (no worker is live). Start a worker, then refresh."
        return gr.update(choices=[], value=None), notice
    value = current if current in models else models[0]
    return gr.update(choices=models, value=value), ""


def build(api: ApiClient, demo: gr.Blocks) -> None:
    """The tab's components and events; call inside a ``gr.Tab``."""
    with gr.Row():
        model = gr.Dropdown(label="Model", choices=[], elem_id="chat-model", scale=5)
        refresh = gr.Button("Refresh models", elem_id="chat-refresh", scale=1)
    notice = gr.Markdown(elem_id="chat-notice")
    chatbot = gr.Chatbot(elem_id="chat-log", height=460, label="Chat", buttons=["copy"])
    with gr.Row():
        text = gr.Textbox(
            placeholder="Ask something and press Enter",
            show_label=False,
            elem_id="chat-input",
            scale=6,
        )
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        stop = gr.Button("Stop", variant="stop", elem_id="chat-stop", scale=1)
    with gr.Row():
        regen = gr.Button("Regenerate", elem_id="chat-regenerate", size="sm")
        clear = gr.Button("Clear", elem_id="chat-clear", size="sm")
    with gr.Accordion("Parameters", open=False, elem_id="chat-params"):
        system = gr.Textbox("", label="System prompt", lines=2, elem_id="chat-system")
        with gr.Row():
            temperature = gr.Slider(
                0, 2, value=0.7, step=0.05, label="Temperature", elem_id="chat-temperature"
            )
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top p")
            max_tokens = gr.Slider(
                1, 4096, value=512, step=1, label="Max tokens", elem_id="chat-max-tokens"
            )
    convo = gr.State([])

    async def refresh_models(current: str | None) -> tuple[Any, str]:
        return await model_choices(api, current)

    def ask(message: str, convo: Convo) -> tuple[str, Convo, list[dict[str, str]]]:
        if message.strip():
            convo = [*convo, {"role": "user", "content": message}]
        return "", convo, render(convo)

    def drop_answer(convo: Convo) -> tuple[Convo, list[dict[str, str]]]:
        while convo and convo[-1]["role"] == "assistant":
            convo = convo[:-1]
        return convo, render(convo)

    async def answer(
        model: str | None, convo: Convo, system: str, temp: float, top_p: float, max_t: float
    ) -> AsyncIterator[tuple[list[dict[str, str]], Convo]]:
        if not convo or convo[-1]["role"] != "user":
            return
        convo = [dict(m) for m in convo]
        async for current, error in stream_answer(
            api, model, convo, system, sampling(temp, top_p, max_t)
        ):
            yield render(current, error), current

    params = [model, convo, system, temperature, top_p, max_tokens]
    refresh.click(refresh_models, model, [model, notice])
    demo.load(refresh_models, model, [model, notice])
    events = []
    for trigger in (text.submit, send.click):
        events.append(
            trigger(ask, [text, convo], [text, convo, chatbot], queue=False).then(
                answer, params, [chatbot, convo]
            )
        )
    events.append(
        regen.click(drop_answer, convo, [convo, chatbot], queue=False).then(
            answer, params, [chatbot, convo]
        )
    )
    stop.click(None, None, None, cancels=events)
    clear.click(lambda: ([], []), None, [convo, chatbot], cancels=events, queue=False)
    chatbot.clear(lambda: [], None, convo, cancels=events, queue=False)
