"""`tokenrelay chat`: a terminal chat that streams from the public API.

FastChat's `cli` habits: the conversation is kept, `!!reset` starts over, `!!exit` quits.
Ctrl-C during a reply stops it: the stream is closed and its job cancelled on the API
(``POST /v1/chat/completions/{id}/cancel``), not a resume grace later.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import httpx

from tokenrelay import runtime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        help="the API's base URL (default: that of the `tokenrelay serve` running here, "
        f"else {runtime.DEFAULT_API_URL})",
    )
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    parser.add_argument("--model", help="model name (default: the first one served)")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=512)


def run(args: argparse.Namespace) -> None:
    from openai import APIError, OpenAI

    args.api_url = runtime.api_url(args.api_url)
    client = OpenAI(base_url=args.api_url, api_key=args.api_key, max_retries=1)
    try:
        model = args.model or client.models.list().data[0].id
    except (APIError, IndexError, httpx.HTTPError) as exc:
        raise SystemExit(f"tokenrelay chat: no model to talk to at {args.api_url}: {exc}") from exc
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print(f"Chatting with {model}. !!reset starts over, !!exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("USER: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line == "!!exit":
            return
        if line == "!!reset":
            history = list(start)
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = _ask(client, model, history, args)
        if answer is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": answer})


def _ask(client, model: str, history: list[dict[str, str]], args: argparse.Namespace) -> str | None:  # type: ignore[no-untyped-def]
    from openai import APIError

    print("ASSISTANT: ", end="", flush=True)
    parts: list[str] = []
    completion_id = None
    stream = None
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=history,
            stream=True,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
        )
        for chunk in stream:
            completion_id = completion_id or chunk.id
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                print(chunk.choices[0].delta.content, end="", flush=True)
    except KeyboardInterrupt:
        _stop(client, stream, completion_id)
        print(" [stopped]")
        return "".join(parts) or None
    except (APIError, httpx.HTTPError) as exc:
        print(f"\n[error] {exc}")
        return None
    print()
    return "".join(parts)


def _stop(client, stream, completion_id: str | None) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C during a reply: hang up, and cancel the job on the API at once (a hang-up
    alone leaves it running for the API's resume grace). Best effort."""
    from openai import APIError

    if stream is not None:
        with contextlib.suppress(httpx.HTTPError):
            stream.close()
    if completion_id:
        with contextlib.suppress(APIError, httpx.HTTPError):
            path = f"/chat/completions/{completion_id}/cancel"
            client.with_options(max_retries=0, timeout=5.0).post(path, cast_to=httpx.Response)
