"""The status tab: live workers, queue depth, in-flight jobs and tokens/s per model.

Read from the API's ``GET /v1/status`` (with the UI's key), every few seconds by itself.
"""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from .client import ApiClient, ApiError

MODEL_HEADERS = [
    "Model",
    "Workers",
    "Queued",
    "Running",
    "Batch queued",
    "Batch running",
    "Tokens/s",
    "Dead letters",
    "Oldest queued (s)",
]
WORKER_HEADERS = [
    "Worker",
    "Models",
    "Device",
    "Engine",
    "Host",
    "In flight",
    "Tokens/s",
    "Heartbeat (s ago)",
    "Up (s)",
]
REFRESH_SECONDS = 2.0


def model_rows(status: dict[str, Any]) -> list[list[Any]]:
    return [
        [
            m["name"],
            m["workers"],
            m["queued"],
            m["running"],
            m.get("batch_queued", 0),
            m.get("batch_running", 0),
            round(m.get("tokens_per_s", 0.0), 1),
            m.get("dead_letters", 0),
            round(m.get("oldest_queued_s", 0.0), 1),
        ]
        for m in status.get("models", [])
    ]


def worker_rows(status: dict[str, Any], now: float) -> list[list[Any]]:
    return [
        [
            w["id"],
            ", ".join(w["models"]),
            w["device"],
            w.get("engine", ""),
            f"{w.get('host', '')}:{w.get('pid', '')}",
            f"{w['inflight']} / {w['capacity']}",
            round(w.get("tokens_per_s", 0.0), 1),
            round(max(0.0, now - w.get("last_heartbeat", now)), 1),
            round(max(0.0, now - w.get("started_at", now))),
        ]
        for w in status.get("workers", [])
    ]


async def snapshot(api: ApiClient) -> tuple[list[list[Any]], list[list[Any]], str]:
    """Both tables and a one-line summary (or a readable error)."""
    try:
        status = await api.get("/status")
    except ApiError as exc:
        return [], [], exc.readable()
    models, workers = model_rows(status), worker_rows(status, time.time())
    summary = (
        f"{len(workers)} live worker(s), {len(models)} model(s); "
        f"updated {time.strftime('%H:%M:%S')}, every {REFRESH_SECONDS:g} s."
    )
    return models, workers, summary


def build(api: ApiClient) -> None:
    """The tab's components; call inside a ``gr.Tab``."""
    summary = gr.Markdown(elem_id="status-summary")
    gr.Markdown("### Models")
    models = gr.Dataframe(headers=MODEL_HEADERS, elem_id="status-models", interactive=False)
    gr.Markdown("### Workers")
    workers = gr.Dataframe(headers=WORKER_HEADERS, elem_id="status-workers", interactive=False)
    timer = gr.Timer(REFRESH_SECONDS)

    async def refresh() -> tuple[Any, Any, str]:
        return await snapshot(api)

    timer.tick(refresh, None, [models, workers, summary], show_progress="hidden")
