"""The paged engine over N GPUs: rank 0 is the worker, ranks 1..N-1 are processes it starts.

Rank 0 runs the whole engine (scheduler, sampler, text) and leads; the others only run the
model's forward over their shard (tensor_parallel.py) and follow. The step protocol:

    rank 0                                     rank r > 0
    forward_eager(seqs)  --("forward", seqs)-> the same pass over its shard
    decode_steps(tokens, seqs, steps)
                         --("decode", seqs, steps)->
                         broadcast tokens (B,)  -> its input tokens
      each step: sample, broadcast (B,)         -> the next step's input
    cache.copy_block     --("copy", ...)------> the same copy in its cache

A command (the batch's layout: positions and block tables) goes down a pipe to each rank
once per launch, however many steps it holds; the tokens go by collectives on the device
(NCCL on CUDA, gloo on CPU), so a decode step has no Python round trip of its own and a
captured graph could later replay between the broadcasts. Every rank runs each pass's two
all-reduces a layer in the same order, so a rank that stops following would hang the
others: a watchdog on rank 0 ends the worker (exit 1, its jobs reclaimed as for any dead
worker) the moment a rank's process exits, a failed collective on rank 0 does the same, and
a rank whose parent is gone exits on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..loader import DTYPES, LoadOptions, load, resolve_dtype
from . import tensor_parallel, unsupported_reason
from .build import CachePlan, plan_cache
from .cache import CacheShape, KVCache
from .engine import PagedEngine
from .multicast import disable_multicast
from .runner import ModelRunner, SeqInput
from .tensor_parallel import split_model

log = logging.getLogger(__name__)

# a collective that waits longer than this on live ranks is a hang: start-up's (loading a
# large model one rank at a time: each rank loads while the others sit at a barrier), and
# then a step's (a long prefill on a busy CPU is the slowest)
STARTUP_TIMEOUT_S = 1800.0
STEP_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """What every rank needs to load its shard and size its cache the same way."""

    load: LoadOptions
    world: int
    port: int
    max_model_len: int | None = None
    max_seqs: int | None = None
    gpu_memory_utilization: float = 0.9
    prefill_budget: int = 4096
    cap_bytes: int | None = None  # --max-gpu-memory, a GPU's share


def start_engine(spec: RankSpec) -> TensorParallelEngine:
    """Start ranks 1..N-1, load rank 0's shard here, and lead them with a paged engine."""
    disable_multicast()  # the ranks inherit it
    ranks = Ranks(spec)
    try:
        model, tokenizer = load_shard(spec, 0)
        plan = plan_cache(
            model,
            max_model_len=spec.max_model_len,
            max_seqs=spec.max_seqs,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            prefill_budget=spec.prefill_budget,
            cap_bytes=spec.cap_bytes,
        )
        ranks.send(("plan", plan))
        return TensorParallelEngine(
            model,
            tokenizer,
            ranks=ranks,
            num_blocks=plan.blocks,
            max_seqs=plan.max_seqs,
            max_len=plan.max_len,
            prefill_budget=spec.prefill_budget,
            eager=True,  # captured graphs with collectives inside: not yet
            block_size=plan.block_size,
        )
    except BaseException:
        ranks.stop(wait_s=0)  # they may be waiting for rank 0 to join: nothing to wait for
        raise


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def memory_bytes(text: str) -> int:
    """``20GiB``, ``80GB``, ``1024MiB`` or plain bytes: --max-gpu-memory's forms."""
    number = text.strip().upper().rstrip("BIKMGT ")
    unit = text.strip().upper()[len(number) :].strip()
    if unit not in UNITS or not number:
        raise SystemExit(f"--max-gpu-memory {text!r}: give a size such as 20GiB or 80GB")
    try:
        return int(float(number) * UNITS[unit])
    except ValueError:
        raise SystemExit(f"--max-gpu-memory {text!r}: give a size such as 20GiB") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def device_of(spec: RankSpec, rank: int) -> torch.device:
    return torch.device("cuda", rank) if spec.load.device == "cuda" else torch.device("cpu")


def join_group(spec: RankSpec, rank: int) -> None:
    device = device_of(spec, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks share the CPU's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{spec.port}",
        rank=rank,
        world_size=spec.world,
        timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
    )


def load_shard(spec: RankSpec, rank: int) -> tuple[torch.nn.Module, Any]:
    """Rank ``rank``'s shard on its device. The ranks load one at a time, so the host holds
    one whole copy of the weights at once, not N; rank 0 loads first, before it joins the
    group, while the others start."""
    dtype = resolve_dtype(spec.load.dtype, spec.load.device)
    on_host = dataclasses.replace(
        spec.load,
        device="cpu",
        dtype=next(k for k, v in DTYPES.items() if v == dtype),
        num_gpus=1,
        max_gpu_memory=None,
    )
    model = tokenizer = None
    for turn in range(spec.world):
        if turn == rank:
            model, tokenizer = load(on_host)
            model.eval()
            reason = unsupported_reason(model)
            if reason is not None:
                raise SystemExit(
                    f"the paged engine cannot split this model over GPUs: {reason}; "
                    f"--engine hf --num-gpus {spec.world} spreads its layers with accelerate"
                )
            split_model(model, rank, spec.world)
            model.to(device_of(spec, rank))
        if not dist.is_initialized():
            join_group(spec, rank)
        dist.barrier()
    assert model is not None
    tensor_parallel.GROUP[0] = dist.new_group(timeout=timedelta(seconds=STEP_TIMEOUT_S))
    return model, tokenizer


class Ranks:
    """Rank 0's side: the other ranks' processes, their command pipes, the watchdog. Rank 0
    joins the process group in load_shard, after loading its own shard."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self.stopping = False
        # a fork server that imported this module once: a rank starts without importing
        # torch and transformers again (and, unlike fork, without the worker's threads)
        context = mp.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        for rank in range(1, spec.world):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=follow,
                args=(spec, rank, theirs, os.getpid()),
                name=f"tokenrelay-rank-{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            log.info("tensor parallel rank %d of %d: pid %d", rank, spec.world, process.pid)
            self.pipes.append(ours)
            self.processes.append(process)
        threading.Thread(target=self._watch, name="rank-watchdog", daemon=True).start()

    def send(self, command: tuple[Any, ...]) -> None:
        for pipe in self.pipes:
            pipe.send(command)

    def fatal(self, why: str) -> None:
        """A rank is gone or out of step: the worker cannot go on. Exit at once, non-zero;
        the registry sees no more heartbeats and the jobs go to other workers."""
        if self.stopping:
            return
        log.critical("%s: the worker exits; its jobs are reclaimed by other workers", why)
        for process in self.processes:
            if process.is_alive():
                process.kill()
        logging.shutdown()
        os._exit(1)

    def stop(self, wait_s: float = 10) -> None:
        if self.stopping:
            return
        self.stopping = True
        with contextlib.suppress(OSError, ValueError):
            self.send(("stop",))
        deadline = time.monotonic() + wait_s
        for process in self.processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
        tensor_parallel.GROUP[0] = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.processes, start=1)}
        while not self.stopping:
            ended = wait(list(sentinels), timeout=0.5)
            if ended and not self.stopping:
                rank = sentinels[ended[0]]  # type: ignore[index]
                code = self.processes[rank - 1].exitcode
                self.fatal(f"tensor parallel rank {rank} exited (code {code})")


class LeaderRunner(ModelRunner):
    """Rank 0's runner: each pass is sent to the other ranks before it runs here."""

    def __init__(self, ranks: Ranks, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ranks = ranks
        self.cache.mirror = self._copy_block

    @contextlib.contextmanager
    def _in_step(self) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:  # the ranks are out of step now
            self.ranks.fatal(f"a tensor parallel pass failed on rank 0 ({exc!r})")
            raise

    def forward_eager(self, seqs: list[SeqInput], every: bool = False) -> Tensor:
        with self._in_step():
            self.ranks.send(("forward", seqs, every))
            return super().forward_eager(seqs, every)

    def decode_steps(
        self, tokens: Tensor, seqs: list[SeqInput], steps: int, sample: Callable[[Tensor], Tensor]
    ) -> Tensor:
        def shared(logits: Tensor) -> Tensor:
            picked = sample(logits)
            _broadcast(picked if picked.dtype == torch.long else picked.long())
            return picked

        with self._in_step():
            self.ranks.send(("decode", seqs, steps))
            tokens = tokens.long().contiguous()
            _broadcast(tokens)
            return super().decode_steps(tokens, seqs, steps, shared)

    def _copy_block(self, src: int, dst: int, rows: int | None) -> None:
        with self._in_step():
            self.ranks.send(("copy", src, dst, rows))


class TensorParallelEngine(PagedEngine):
    """The paged engine on rank 0, its runner leading the other ranks."""

    name = "paged"

    def __init__(self, model: Any, tokenizer: Any, *, ranks: Ranks, **kwargs: Any) -> None:
        self.ranks = ranks
        super().__init__(model, tokenizer, **kwargs)

    def _make_runner(
        self, model: Any, max_len: int, eager: bool, prefill_budget: int
    ) -> ModelRunner:
        return LeaderRunner(
            self.ranks, model, self.cache, max_len, eager=eager, prefill_budget=prefill_budget
        )

    def close(self) -> None:
        super().close()
        self.ranks.stop()


# the other ranks


def follow(spec: RankSpec, rank: int, pipe: Connection, parent: int) -> None:
    """A rank's process: load its shard, size its cache as rank 0 does, then run every pass
    rank 0 sends until it says stop. Any failure ends the process, non-zero."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(message)s")
    disable_multicast()
    threading.Thread(target=_orphaned, args=(parent,), daemon=True).start()
    try:
        join_group(spec, rank)
        runner = _follower_runner(spec, rank, pipe)
        _serve(runner, pipe, device_of(spec, rank))
    except BaseException:
        log.exception("tensor parallel rank %d failed", rank)
        os._exit(1)
    dist.destroy_process_group()


def _follower_runner(spec: RankSpec, rank: int, pipe: Connection) -> ModelRunner:
    model, _ = load_shard(spec, rank)
    plan_cache(  # in step with rank 0: the profile pass all-reduces, the blocks are reduced
        model,
        max_model_len=spec.max_model_len,
        max_seqs=spec.max_seqs,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        prefill_budget=spec.prefill_budget,
        cap_bytes=spec.cap_bytes,
    )
    op, plan = pipe.recv()
    assert op == "plan" and isinstance(plan, CachePlan)
    device = device_of(spec, rank)
    cache = KVCache(CacheShape.of(model), plan.blocks, device, plan.block_size)
    runner = ModelRunner(model, cache, plan.max_len, eager=True, prefill_budget=spec.prefill_budget)
    runner.capture_graphs(plan.max_seqs)
    return runner


def _serve(runner: ModelRunner, pipe: Connection, device: torch.device) -> None:
    while True:
        command = pipe.recv()  # EOFError when rank 0 is gone
        op = command[0]
        if op == "stop":
            return
        if op == "forward":
            runner.forward_eager(command[1], command[2])
        elif op == "decode":
            seqs, steps = command[1], command[2]
            tokens = _received(len(seqs), device)
            runner.decode_steps(tokens, seqs, steps, _Received(len(seqs), device))
        elif op == "copy":
            runner.cache.copy_block(*command[1:])
        else:
            raise RuntimeError(f"unknown command {op!r} from rank 0")


class _Received:
    """A follower's sampler: the tokens rank 0 sampled, by broadcast."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.batch, self.device = batch, device

    def __call__(self, logits: Tensor) -> Tensor:
        return _received(self.batch, self.device)


def _received(batch: int, device: torch.device) -> Tensor:
    return _broadcast(torch.empty(batch, dtype=torch.long, device=device))


def _broadcast(tokens: Tensor) -> Tensor:
    """Rank 0's ``tokens`` into the others' (B,) buffers, in the step group."""
    dist.broadcast(tokens, 0, group=tensor_parallel.GROUP[0])
    return tokens


def _orphaned(parent: int) -> None:
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(1)  # rank 0 is gone without a word: nobody to follow
        time.sleep(0.5)
