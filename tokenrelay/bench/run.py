"""`tokenrelay bench`: the same load, side by side, against FastChat's way, the engine
in-process, and the whole stack (API + Redis + worker), with the bandwidth roofline."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from .. import runtime
from ..commands import tokenrelay_argv
from .stats import Record, markdown, prompt_mismatches, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-path",
        default="random:1b",
        help="model folder, .gguf, or random:1b / random:8b (random weights)",
    )
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda", "xpu", "mps"])
    parser.add_argument(
        "--modes",
        default="baseline,engine,stack",
        help="comma-separated: baseline (FastChat's way: generate(), one at a "
        "time, in-process), engine (the paged engine in-process, at its defaults, with a "
        "decode-step profile against the floor on CUDA), stack (API + Redis + a worker "
        "started with --model-path and --device only, over HTTP), http (an already "
        "running server: --api-url)",
    )
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument(
        "--baseline-max-concurrency",
        type=int,
        default=16,
        help="the one-at-a-time baseline runs only up to this concurrency",
    )
    parser.add_argument(
        "--prompt-len",
        type=int,
        default=128,
        help="prompt tokens, counted by the served model's tokenizer (the run checks that the "
        "server counts as many)",
    )
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--profile", default="fixed", choices=["fixed", "mixed"])
    parser.add_argument(
        "--api-url",
        help="with mode http: the server's base URL, no /v1 (default: that of the "
        "`tokenrelay serve` running here, else http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--model-name",
        help="with mode http: the model name (default: that `tokenrelay serve`'s, else bench)",
    )
    parser.add_argument(
        "--tokenizer",
        help="with mode http: the served model's folder, whose tokens --prompt-len counts "
        "(default: that `tokenrelay serve`'s model, else the random models' tokenizer)",
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=4,
        help="processes the HTTP load comes from (one process's event loop "
        "can be slower than the server)",
    )
    parser.add_argument(
        "--low-bit",
        help="the worker's --low-bit (stack mode) and the model's format (engine mode), e.g. "
        "sym_int4; the run's label says it",
    )
    parser.add_argument("--label", help="name of this run in the table (default: model path)")
    parser.add_argument(
        "--out",
        default="bench-results.json",
        help="JSON results; a markdown table goes beside it (.md)",
    )


def run(args: argparse.Namespace) -> None:
    from .load import Workload

    levels = [int(c) for c in args.concurrency.split(",")]
    workload = Workload(args.prompt_len, args.output_len, args.profile, tokenizer=args.model_path)
    rows: list[dict[str, object]] = []
    modes = args.modes.split(",")
    if "engine" in modes or "baseline" in modes:
        rows += _in_process(args, modes, levels, workload)
    if "stack" in modes:
        rows += _stack(args, levels, workload)
    if "http" in modes:
        url, model, tokenizer = _http_target(args)
        served = replace(workload, tokenizer=tokenizer)
        for c in levels:
            rows.append(_measure_http(url, model, served, c, args, "http"))
            rows[-1]["model"] = args.label or model  # what it measured, not --model-path
    label = args.label or args.model_path + (f" --low-bit {args.low_bit}" if args.low_bit else "")
    for row in rows:
        row.setdefault("model", label)
    out = Path(args.out)
    out.write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows), flush=True)


def _http_target(args: argparse.Namespace) -> tuple[str, str, str]:
    """Mode http's URL, model and tokenizer: the flags, else the `tokenrelay serve` running
    here."""
    from .models import SYNTHETIC  # not at import: it imports torch

    serve = None if args.api_url else runtime.running()
    if serve is None:
        url = args.api_url or "http://127.0.0.1:8000"
        return url, args.model_name or "bench", args.tokenizer or SYNTHETIC
    url = serve.api_url.removesuffix("/v1")
    return url, args.model_name or serve.model, args.tokenizer or serve.model_path


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _requests(args: argparse.Namespace, concurrency: int) -> int:
    return max(8, concurrency * args.requests_per_client)


def _warmup(workload):  # type: ignore[no-untyped-def]
    """The real prompt length (first prefills of a shape are slow), few output tokens."""
    return replace(workload, output_len=8, profile="fixed")


def _check_prompts(records: list[Record], mode: str) -> None:
    """Fail the run where the server counted other prompt tokens than asked: then the
    prompts were not in the served model's tokens, and the numbers would not be honest."""
    wrong = prompt_mismatches(records)
    for line in wrong[:5]:
        _log(f"ERROR {mode}: {line}")
    if wrong:
        raise SystemExit(
            f"bench {mode}: {len(wrong)} of {len(records)} requests were not the prompt "
            "tokens asked (with --modes http, --tokenizer names the served model's folder)"
        )
    if not any(r.prompt_tokens is not None for r in records):
        _log(f"{mode}: the server reported no prompt tokens; not checked")


def _in_process(
    args: argparse.Namespace, modes: list[str], levels: list[int], workload
) -> list[dict[str, object]]:
    import torch

    from tokenrelay.workers.generate_engine import GenerateEngine
    from tokenrelay.workers.loader import LoadOptions, load

    model, tokenizer = load(
        LoadOptions(model_path=args.model_path, device=args.device, low_bit=args.low_bit)
    )
    roofline = _roofline(model, workload, args.device)
    rows = []
    if "baseline" in modes:
        engine = GenerateEngine(model, tokenizer)
        for c in [c for c in levels if c <= args.baseline_max_concurrency]:
            # one request per client: the baseline serves them one after another anyway
            rows.append(_measure_engine(engine, workload, c, c, "baseline"))
            rows[-1]["roofline_tok_s"] = roofline(1)
        engine.close()
    if "engine" in modes:
        # the engine a user gets: `tokenrelay worker --model-path ... --device ...`
        from tokenrelay.workers.paged.build import build_paged_engine

        engine = build_paged_engine(model, tokenizer, max_model_len=None, max_seqs=None)
        _log(
            f"engine: paged, defaults (max length {engine.max_context}, "
            f"{engine.max_seqs} sequences, {engine.cache.tokens} cache tokens)"
        )
        if args.device == "cuda":
            from .steps import step_profile

            bandwidth = _copy_bandwidth(args.device)
            context = workload.prompt_len + workload.output_len // 2
            for row in step_profile(engine, [1, 16, 64, 128, 256], context, bandwidth):
                _log(f"step profile: {row}")
                rows.append({"mode": "step", **row})
        for c in levels:
            engine.clock.report()
            rows.append(_measure_engine(engine, workload, c, _requests(args, c), "engine"))
            rows[-1]["roofline_tok_s"] = roofline(c)
            _log(f"engine loop, ms per step at concurrency {c}: {engine.clock.report()}")
        engine.close()
        del engine
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _measure_engine(
    engine,
    workload,
    concurrency: int,
    requests: int,  # type: ignore[no-untyped-def]
    mode: str,
) -> dict[str, object]:
    from .load import run_engine

    _log(f"{mode}: warm-up at concurrency {concurrency}")
    warm = asyncio.run(run_engine(engine, _warmup(workload), concurrency, concurrency))
    _check_prompts(warm, mode)
    _log(f"{mode}: {requests} requests at concurrency {concurrency}")
    records = asyncio.run(run_engine(engine, workload, concurrency, requests))
    row = summarize(records, mode, concurrency)
    _log(str(row))
    _check_prompts(records, mode)
    return row


def _stack(args: argparse.Namespace, levels: list[int], workload) -> list[dict[str, object]]:
    from tokenrelay.embedded_redis import EmbeddedRedis, free_port
    from tokenrelay.serve import wait_ready

    redis = EmbeddedRedis().start()
    port = free_port()
    common = ["--redis-url", redis.url]
    procs = [
        subprocess.Popen(
            tokenrelay_argv(
                "worker",
                "--model-path",
                args.model_path,
                "--model-names",
                "bench",
                "--device",
                args.device,
                *(["--low-bit", args.low_bit] if args.low_bit else []),
                *common,
            )
        ),
        subprocess.Popen(
            tokenrelay_argv(
                "api",
                "--port",
                str(port),
                "--max-queue",
                str(10 * max(levels)),
                "--log-level",
                "warning",
                *common,
            )
        ),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, procs, 900)
        return [_measure_http(url, "bench", workload, c, args, "stack") for c in levels]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
        redis.stop()


def _measure_http(
    url: str, model: str, workload, concurrency: int, args: argparse.Namespace, mode: str
) -> dict[str, object]:
    from .load import run_http_procs

    procs = args.client_procs
    _log(f"{mode}: warm-up at concurrency {concurrency}")
    warm = run_http_procs(url, model, _warmup(workload), concurrency, concurrency, procs)
    _check_prompts(warm, mode)
    requests = _requests(args, concurrency)
    _log(f"{mode}: {requests} requests at concurrency {concurrency} from {procs} processes")
    records = run_http_procs(url, model, workload, concurrency, requests, procs)
    row = summarize(records, mode, concurrency)
    _log(str(row))
    _check_prompts(records, mode)
    return row


def _roofline(model, workload, device: str):  # type: ignore[no-untyped-def]
    """Tokens/s if each decode step only had to stream the weights and live KV once."""
    import torch

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element
    context = workload.prompt_len + workload.output_len / 2
    bandwidth = _copy_bandwidth(device) if device == "cuda" else None
    shown = f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else "not measured"
    _log(
        f"weights {weights / 2**30:.2f} GiB, KV {kv_per_token / 1024:.0f} KiB/token, "
        f"copy bandwidth {shown}"
    )

    def at(batch: int) -> float | str:
        if not bandwidth:
            return ""
        step = (weights + batch * context * kv_per_token) / bandwidth
        return round(batch / step, 1)

    del torch
    return at


def _copy_bandwidth(device: str) -> float:
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    return 2 * src.numel() / seconds  # bytes read + written
