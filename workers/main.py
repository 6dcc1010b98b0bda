"""`tokenrelay worker`: load a model and serve its Redis job stream."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys

import redis.asyncio as aioredis

from tokenrelay import runtime
from tokenrelay.queueing import tokenizers
from tokenrelay.queueing.connection import RedisSettings, connect

from .engine import Engine
from .lowbit.formats import FORMATS as LOW_BIT_CHOICES
from .worker import STOP_WRITES_S, Worker, WorkerOptions

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-path",
        help="a transformers model folder or a .gguf file (required unless --engine fake)",
    )
    parser.add_argument(
        "--model-names",
        help="comma-separated names clients use for this model (default: the model folder's name)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "xpu", "mps"])
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights dtype; auto = bfloat16/float16 on GPUs, float32 on CPU",
    )
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="split the model over this many GPUs: with the paged engine the same as "
        "--tensor-parallel-size; with --engine hf an accelerate device map (layers spread "
        "over the GPUs, one at work at a time)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=None,
        help="paged engine: split every layer over this many GPUs (vLLM's flag; one process "
        "a GPU, this worker one of them; NCCL on CUDA, gloo with --device cpu)",
    )
    parser.add_argument(
        "--max-gpu-memory",
        help="per-GPU memory cap, e.g. 20GiB: each GPU's share with --tensor-parallel-size, "
        "the accelerate split's with --engine hf --num-gpus",
    )
    parser.add_argument(
        "--low-bit",
        choices=list(LOW_BIT_CHOICES),
        help="weight format, IPEX-LLM's names: sym_int4 / asym_int4 (4-bit, groups of 32, "
        "symmetric or with a minimum: GGUF Q4_0's and Q4_1's grids), sym_int8 (8-bit, a "
        "scale per channel), fp16, bf16. 4-bit and 8-bit run on CPU; on CUDA sym_int8 goes "
        "through bitsandbytes with the hf engine, and the rest are not there yet",
    )
    parser.add_argument(
        "--load-8bit", action="store_true", help="FastChat's flag: the same as --low-bit sym_int8"
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument(
        "--limit-worker-concurrency",
        type=int,
        default=None,
        help="sequences this worker runs at once (default: 8 on CPU; with the paged engine "
        "on a GPU, what its KV cache holds at 2,048 tokens a sequence, at most 256)",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="paged engine on a GPU: no torch.compile and no CUDA graphs (vLLM's flag): "
        "starts faster, decodes slower",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="share of the GPU's memory the paged engine may fill: weights, activations "
        "and the KV cache, which takes all that is left (vLLM's flag)",
    )
    parser.add_argument(
        "--redis-url",
        help="the Redis to take jobs from (default: that of the `tokenrelay serve` running "
        f"here, else {runtime.DEFAULT_REDIS_URL})",
    )
    parser.add_argument("--key-prefix", default="tr", help=argparse.SUPPRESS)
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        help="seconds between registry heartbeats (default 1)",
    )
    parser.add_argument(
        "--heartbeat-ttl",
        type=float,
        default=4.0,
        help="seconds after the last heartbeat until this worker counts as dead "
        "and its jobs are reclaimed (default 4)",
    )
    parser.add_argument(
        "--max-deliveries",
        type=int,
        default=3,
        help="deliveries of one job before it goes to the dead-letter stream",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight jobs get to finish on SIGTERM (default 30)",
    )
    parser.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "paged", "batch", "hf", "generate", "fake"],
        help="paged: continuous batching over a paged KV cache sized to the device, any "
        "decoder-only transformers model (CUDA graphs and Triton attention on GPUs); batch: "
        "continuous batching over a slotted cache with hand-written Llama, Mistral and Qwen2 "
        "layers (faster on a CPU); hf: transformers' forward, one job per step, any model; "
        "generate: FastChat's way, one request at a time through generate() (a benchmark "
        "baseline); auto: batch on a CPU where the model allows it, else paged where it "
        "allows, else hf; fake: a deterministic test engine with no model",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest sequence (prompt + completion) a request may have (default: the "
        "model's own context length, or what the GPU's KV cache holds if that is less; "
        "4096 with the batch engine)",
    )
    parser.add_argument(
        "--chunk-interval",
        type=float,
        default=0.05,
        help="seconds between a busy worker's rounds of chunk publishing; tokens made in "
        "between travel as one chunk (first and last chunks go at once)",
    )
    parser.add_argument(
        "--task",
        default="auto",
        choices=["auto", "generate", "embed"],
        help="generate: chat and completions; embed: /v1/embeddings (an encoder such as "
        "all-MiniLM-L6-v2, or a decoder pooled as --pooling says); auto: embed for a "
        "sentence-transformers folder or an encoder model (BERT and kin), else generate",
    )
    parser.add_argument(
        "--pooling",
        choices=["mean", "last"],
        default=None,
        help="--task embed: how a sequence's hidden states become one vector (default: the "
        "folder's sentence-transformers pooling, else mean for an encoder, last token for a "
        "decoder; then L2-normalized)",
    )
    parser.add_argument("--fake-token-delay", type=float, default=0.0, help=argparse.SUPPRESS)


def model_names(args: argparse.Namespace) -> list[str]:
    if args.model_names:
        return [n.strip() for n in args.model_names.split(",") if n.strip()]
    if args.model_path:
        from pathlib import Path

        path = Path(args.model_path.rstrip("/"))
        return [path.stem if path.suffix == ".gguf" else path.name]
    return ["fake"]


def low_bit(args: argparse.Namespace) -> str | None:
    """``--low-bit``, with ``--load-8bit`` read as sym_int8."""
    if args.load_8bit and args.low_bit not in (None, "sym_int8"):
        raise SystemExit(f"--load-8bit means --low-bit sym_int8, not {args.low_bit}: pass one")
    return "sym_int8" if args.load_8bit else args.low_bit


def paged_blockers(args: argparse.Namespace) -> list[str]:
    """The flags that rule out the paged engine: it needs the whole model on one device,
    so a split model is not for it, nor one that bitsandbytes quantized (CUDA int8)."""
    blockers = []
    if low_bit(args) == "sym_int8" and args.device == "cuda":
        blockers.append("--load-8bit / --low-bit sym_int8 on CUDA (bitsandbytes)")
    if tensor_parallel_size(args) > 1:
        return blockers  # the split is the paged engine's own (paged/ranks.py)
    if args.num_gpus > 1:
        blockers.append(f"--num-gpus {args.num_gpus}")
    if args.max_gpu_memory:
        blockers.append("--max-gpu-memory")
    return blockers


def tensor_parallel_size(args: argparse.Namespace) -> int:
    """The GPUs the paged engine splits each layer over: --tensor-parallel-size, or on CUDA
    --num-gpus unless --engine hf or generate spreads the layers with accelerate."""
    if args.tensor_parallel_size is not None:
        if args.tensor_parallel_size < 1:
            raise SystemExit("--tensor-parallel-size must be at least 1")
        if args.tensor_parallel_size > 1 and args.engine not in ("auto", "paged"):
            raise SystemExit(
                f"--tensor-parallel-size is the paged engine's, not --engine {args.engine}'s: "
                "use --engine paged, or --engine hf --num-gpus N for an accelerate split"
            )
        return int(args.tensor_parallel_size)
    return int(args.num_gpus) if args.engine in ("auto", "paged") and args.device == "cuda" else 1


def choose_engine(
    args: argparse.Namespace, *, model_type: str, reason: str | None, slotted: bool = False
) -> str:
    """Which engine serves a loaded model: ``batch``, ``paged``, ``hf`` or ``generate``.

    ``reason``: why the paged engine cannot run the model (None: it can); ``slotted``:
    whether the batch engine's hand-written layers can (a Llama, Mistral or Qwen2 shape).
    On a CPU ``auto`` prefers the batch engine: there it decodes SmolLM2 at 8 streams 1.4x
    as fast as the paged one (BENCHMARKS.md, the CPU section). ``--engine paged`` or
    ``batch`` that cannot be honoured exits with the reason.
    """
    if args.engine not in ("auto", "paged", "batch"):
        return str(args.engine)
    blockers = paged_blockers(args)
    if args.engine in ("paged", "batch") and blockers:
        raise SystemExit(
            f"--engine {args.engine} needs the whole model, unquantized, on one device, so it "
            f"cannot run with {' or '.join(blockers)}: drop those flags, or use --engine hf"
        )
    if args.engine == "batch":
        if model_type and not slotted:
            raise SystemExit(
                f"--engine batch runs Llama, Mistral and Qwen2 shapes, not {model_type!r}; "
                "use --engine paged or hf"
            )
        return "batch"
    if reason is not None:
        if args.engine == "paged":
            raise SystemExit(f"--engine paged cannot serve this model: {reason}; use --engine hf")
        log.info("serving %s with the hf engine: %s", model_type or "the model", reason)
        return "hf"
    if blockers:
        return "hf"
    if tensor_parallel_size(args) > 1:
        return "paged"  # the one engine that splits layers over GPUs
    if args.engine == "auto" and slotted and args.device == "cpu":
        return "batch"
    return "paged"


def build_engine(args: argparse.Namespace) -> Engine:
    if args.engine == "fake":
        from .fake_engine import FakeEngine

        return FakeEngine(token_delay=args.fake_token_delay)
    if not args.model_path:
        raise SystemExit("tokenrelay worker: --model-path is required (a model folder or .gguf)")
    from .embed_build import build_embed_engine, resolve_task

    if resolve_task(args) == "embed":
        return build_embed_engine(args)
    if args.engine in ("paged", "batch"):  # refuse before spending minutes on loading
        choose_engine(args, model_type="", reason=None)
    if tensor_parallel_size(args) > 1:
        return _split_engine(args)
    from .hf_engine import HFEngine
    from .loader import LoadOptions, generation_defaults, load

    model, tokenizer = load(
        LoadOptions(
            model_path=args.model_path,
            device=args.device,
            dtype=args.dtype,
            num_gpus=args.num_gpus,
            max_gpu_memory=args.max_gpu_memory,
            low_bit=low_bit(args),
            trust_remote_code=args.trust_remote_code,
        )
    )
    model_type = getattr(model.config, "model_type", "")
    from .llama_runner import supports
    from .paged import unsupported_reason

    kind = choose_engine(
        args, model_type=model_type, reason=unsupported_reason(model), slotted=supports(model)
    )
    engine: Engine
    if kind == "generate":
        from .generate_engine import GenerateEngine

        engine = GenerateEngine(model, tokenizer)
    elif kind == "batch":
        from .batch_engine import BatchEngine
        from .paged.build import model_context

        engine = BatchEngine(
            model,
            tokenizer,
            slots=args.limit_worker_concurrency or 8,
            max_len=args.max_model_len or min(4096, model_context(model)),
        )
    elif kind == "paged":
        from .paged.build import build_paged_engine

        engine = build_paged_engine(
            model,
            tokenizer,
            max_model_len=args.max_model_len,
            max_seqs=args.limit_worker_concurrency,
            gpu_memory_utilization=args.gpu_memory_utilization,
            eager=args.enforce_eager,
        )
    else:
        engine = HFEngine(model, tokenizer)
    engine.sampling_defaults = generation_defaults(model)
    engine.weights = getattr(model, "low_bit", None) or str(model.dtype).removeprefix("torch.")
    log.info("sampling defaults from the model's generation_config: %s", engine.sampling_defaults)
    return engine


def _split_engine(args: argparse.Namespace) -> Engine:
    """The paged engine over --tensor-parallel-size GPUs (paged/ranks.py)."""
    import multiprocessing
    import multiprocessing.forkserver

    from .paged.multicast import disable_multicast

    disable_multicast()  # before any process starts, the fork server included
    # the other ranks fork from a server that imports the engine once: start it now, so it
    # imports transformers while this process does
    multiprocessing.set_forkserver_preload(["tokenrelay.workers.paged.ranks"])
    multiprocessing.forkserver.ensure_running()
    import torch

    from .loader import LoadOptions, check_device, generation_defaults
    from .paged.ranks import RankSpec, free_port, memory_bytes, start_engine

    world = tensor_parallel_size(args)
    if low_bit(args):
        raise SystemExit(
            f"--tensor-parallel-size {world} splits unquantized weights; drop --low-bit"
        )
    check_device(args.device)
    if args.device not in ("cuda", "cpu"):
        raise SystemExit(
            f"--tensor-parallel-size runs on cuda (NCCL) or cpu (gloo), not {args.device}"
        )
    if args.device == "cuda" and torch.cuda.device_count() < world:
        raise SystemExit(
            f"--tensor-parallel-size {world} needs {world} GPUs; "
            f"{torch.cuda.device_count()} are visible"
        )
    spec = RankSpec(
        load=LoadOptions(
            model_path=args.model_path,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
        ),
        world=world,
        port=free_port(),
        max_model_len=args.max_model_len,
        max_seqs=args.limit_worker_concurrency,
        gpu_memory_utilization=args.gpu_memory_utilization,
        cap_bytes=memory_bytes(args.max_gpu_memory) if args.max_gpu_memory else None,
    )
    engine = start_engine(spec)
    model = engine.runner.model
    engine.sampling_defaults = generation_defaults(model)
    engine.weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    log.info("paged engine split over %d ranks (%s)", world, args.device)
    return engine


def run(args: argparse.Namespace) -> None:
    engine = build_engine(args)
    if args.limit_worker_concurrency is None:
        args.limit_worker_concurrency = getattr(engine, "max_seqs", 8)
    # The engine thread and the event loop share the GIL; a shorter switch interval than
    # Python's 5 ms lets the engine get it back quickly after each GPU step.
    sys.setswitchinterval(0.0005)
    # The loaded model is a large, long-lived heap; a full collection walks all of it while
    # holding the GIL, stalling the engine thread. Freezing moves it out of the collector's
    # view (as vLLM does after start-up); measured in BENCHMARKS.md ("gc.freeze").
    gc.collect()
    gc.freeze()
    options = WorkerOptions(
        models=model_names(args),
        device=args.device,
        concurrency=args.limit_worker_concurrency,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_ttl=args.heartbeat_ttl,
        max_deliveries=args.max_deliveries,
        shutdown_grace=args.shutdown_grace,
        chunk_interval=args.chunk_interval,
    )
    # Every running job publishes through the pool: size it past the concurrency.
    settings = RedisSettings(
        url=runtime.redis_url(args.redis_url),
        prefix=args.key_prefix,
        max_connections=max(64, args.limit_worker_concurrency + 16),
    )
    try:
        asyncio.run(_serve(settings, engine, options))
    finally:
        engine.close()


async def _publish_tokenizer(
    redis: aioredis.Redis, settings: RedisSettings, engine: Engine, models: list[str]
) -> str:
    """The engine's tokenizer into Redis for the API's /tokenize; '' when there is none
    (the fake engine) or it cannot be saved, which leaves generation as it is."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        return ""
    try:
        return await tokenizers.publish(redis, settings.keys, models, tokenizer)
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        log.warning("tokenizer not published, /tokenize will refuse this model: %s", exc)
        return ""


async def _serve(settings: RedisSettings, engine: Engine, options: WorkerOptions) -> None:
    redis = connect(settings)
    try:
        await redis.ping()
    except Exception as exc:
        raise SystemExit(
            f"tokenrelay worker: cannot reach Redis at {settings.url} ({exc}). Start Redis or "
            "pass --redis-url (or run `tokenrelay serve`, which starts its own)."
        ) from exc
    worker = Worker(redis, settings.keys, engine, options)
    worker.info.tokenizer = await _publish_tokenizer(redis, settings, engine, options.models)
    worker.info.task = getattr(engine, "task", "generate")  # the API routes by it
    worker.info.dimensions = getattr(engine, "dimensions", 0)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_WRITES_S):  # never hold the exit on a close
                await redis.aclose()
