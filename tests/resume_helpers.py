"""Streams read as SSE events (id and data), cut mid-way and resumed with Last-Event-ID."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx

HANG_GUARD_S = 120.0  # only against a hang: nothing asserts the machine's speed


@dataclass
class Event:
    id: str | None
    data: str

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.data)  # type: ignore[no-any-return]


@dataclass
class Read:
    """What one connection read: its events, in order, and whether it saw [DONE]."""

    events: list[Event] = field(default_factory=list)
    done: bool = False

    @property
    def last_id(self) -> str:
        ids = [e.id for e in self.events if e.id is not None]
        assert ids, "no event with an id was read"
        return ids[-1]

    @property
    def completion_id(self) -> str:
        return str(self.events[0].body["id"])

    def text(self) -> str:
        """Choice 0's text (chat deltas or completion texts)."""
        out = []
        for e in self.events:
            body = e.body
            assert "error" not in body, body
            for choice in body["choices"]:
                if choice["index"] == 0:
                    out.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
        return "".join(out)


def has_content(event: Event) -> bool:
    return any(
        c.get("text") or c.get("delta", {}).get("content") for c in event.body.get("choices", [])
    )


def read_events(response: httpx.Response, *, cut_after: int | None = None) -> Read:
    """Read SSE events; with ``cut_after``, stop (the caller hangs up) after that many
    events with text."""
    read = Read()
    event_id: str | None = None
    data: list[str] = []
    seen = 0
    for line in response.iter_lines():
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            text = "\n".join(data)
            data, this_id, event_id = [], event_id, None
            if text == "[DONE]":
                read.done = True
                break
            event = Event(this_id, text)
            read.events.append(event)
            if cut_after is not None and has_content(event):
                seen += 1
                if seen >= cut_after:
                    break
    return read


def stream(
    client: httpx.Client, path: str, body: dict[str, Any], *, cut_after: int | None = None
) -> Read:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        return read_events(r, cut_after=cut_after)


def resume(
    client: httpx.Client, path: str, completion_id: str, last_id: str | None
) -> httpx.Response | Read:
    """GET PATH/ID/stream with Last-Event-ID: the Read, or the error response."""
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    with client.stream("GET", f"{path}/{completion_id}/stream", headers=headers) as r:
        if r.status_code != 200:
            r.read()
            return r
        return read_events(r)


def resumed(client: httpx.Client, path: str, completion_id: str, last_id: str | None) -> Read:
    got = resume(client, path, completion_id, last_id)
    assert isinstance(got, Read), f"{got.status_code}: {got.text}"
    return got
