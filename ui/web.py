"""Build the browser UI: a Gradio app over the public API, mounted on a small FastAPI app."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Before gradio is imported: no usage reports to huggingface.co from a private deployment.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from . import arena_tab, chat, status
from .arena import VoteStore
from .client import ApiClient

CSS = """
#chat-log sub, .arena-log sub { color: var(--body-text-color-subdued); }
footer { display: none !important; }
"""


# Gradio's default theme serves Source Sans Pro at weights 400 and 600, and its 600 file
# (SourceSansPro-SemiBold.woff2, 5 KB) holds only a few glyphs: text at 600 (buttons, labels)
# got an "A" or "B" from it and every other letter from a fallback font. The 700 file is
# whole, and a browser renders 600 with the next heavier face.
FONT = (
    gr.themes.LocalFont("Source Sans Pro", weights=(400, 700)),
    "ui-sans-serif",
    "system-ui",
    "sans-serif",
)


@dataclass
class UISettings:
    api_url: str = "http://127.0.0.1:8000/v1"
    api_key: str = "EMPTY"
    redis_url: str | None = None
    key_prefix: str = "tr"
    host: str = "127.0.0.1"
    port: int = 7860
    root_path: str = ""

    @property
    def path(self) -> str:
        """Where the UI is mounted: the root path, without a trailing slash ("" for /)."""
        return "/" + self.root_path.strip("/") if self.root_path.strip("/") else ""


def build_blocks(settings: UISettings) -> gr.Blocks:
    api = ApiClient(settings.api_url, settings.api_key)
    store = VoteStore(settings.redis_url, settings.key_prefix)
    with gr.Blocks(title="tokenrelay", analytics_enabled=False) as demo:
        gr.Markdown(f"## tokenrelay &nbsp; <sub>{settings.api_url}</sub>")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat.build(api, demo)
            with gr.Tab("Arena", id="arena", elem_id="tab-arena"):
                arena_tab.build_arena(api, store, demo)
            with gr.Tab("Leaderboard", id="leaderboard", elem_id="tab-leaderboard") as board:
                arena_tab.build_leaderboard(store, board)
            with gr.Tab("Status", id="status", elem_id="tab-status"):
                status.build(api)
    demo.queue(default_concurrency_limit=64)
    return demo


def create_app(settings: UISettings) -> FastAPI:
    """The ASGI app: the Gradio UI under ``settings.path`` (or /)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    path = settings.path
    if path:

        @app.get("/", include_in_schema=False)
        def to_ui() -> RedirectResponse:
            return RedirectResponse(f"{path}/")

    theme = gr.themes.Default(primary_hue="indigo", font=FONT)
    return gr.mount_gradio_app(
        app,
        build_blocks(settings),
        path=path or "/",
        theme=theme,
        css=CSS,
        footer_links=[],
        ssr_mode=False,
        enable_monitoring=False,
        pwa=False,
        mcp_server=False,
    )
