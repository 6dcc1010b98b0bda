"""`tokenrelay worker` start-up decisions that need no model and no GPU."""

from __future__ import annotations

import argparse

import pytest

from tokenrelay.cli import build_parser
from tokenrelay.workers.main import build_engine, choose_engine


def worker_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["worker", "--model-path", "/nonexistent/model", *argv])


# --num-gpus N with the paged engine is tensor parallel now (test_tensor_parallel.py)
SPREAD_OR_QUANTIZED = [
    ("--load-8bit", "--device", "cuda"),  # bitsandbytes, through the hf engine
    ("--max-gpu-memory", "20GiB"),
]


def test_auto_picks_paged_for_a_supported_model_on_one_device() -> None:
    args = worker_args()
    assert choose_engine(args, model_type="llama", reason=None) == "paged"
    assert choose_engine(args, model_type="t5", reason="not decoder-only") == "hf"


def test_engine_paged_for_a_model_it_cannot_run_exits_with_the_reason() -> None:
    with pytest.raises(SystemExit, match="not decoder-only.*--engine hf"):
        choose_engine(worker_args("--engine", "paged"), model_type="t5", reason="not decoder-only")


@pytest.mark.parametrize("flags", SPREAD_OR_QUANTIZED)
def test_auto_never_picks_paged_for_a_spread_or_quantized_model(flags: tuple[str, ...]) -> None:
    """Bug: --engine auto chose the (since removed) slotted engine for a model loaded in 8
    bits or split over GPUs (--num-gpus > 1, --max-gpu-memory), though it assumed one
    device; the paged engine does too. Auto must fall back to hf there."""
    args = worker_args("--engine", "auto", *flags)
    assert choose_engine(args, model_type="llama", reason=None) == "hf"


@pytest.mark.parametrize("flags", SPREAD_OR_QUANTIZED)
@pytest.mark.parametrize("name", ["paged", "batch"])
def test_engine_paged_with_a_spread_or_quantized_model_exits_clearly(
    flags: tuple[str, ...], name: str
) -> None:
    args = worker_args("--engine", name, *flags)
    with pytest.raises(SystemExit, match=f"--engine {name} .* one device.*--engine hf") as exc:
        choose_engine(args, model_type="llama", reason=None)
    assert flags[0] in str(exc.value)
    # and before loading anything (the model path does not even exist)
    with pytest.raises(SystemExit, match=flags[0]):
        build_engine(args)


@pytest.mark.parametrize("engine", ["hf", "generate"])
def test_explicit_engines_are_kept(engine: str) -> None:
    args = worker_args("--engine", engine, "--load-8bit", "--num-gpus", "2")
    assert choose_engine(args, model_type="llama", reason=None) == engine


def test_auto_picks_the_batch_engine_on_a_cpu_for_the_shapes_it_runs() -> None:
    """On a CPU the slotted batch engine is faster than the paged one (BENCHMARKS.md, the
    CPU section): auto takes it for Llama, Mistral and Qwen2 shapes, and paged elsewhere."""
    cpu, gpu = worker_args("--device", "cpu"), worker_args("--device", "cuda")
    assert choose_engine(cpu, model_type="llama", reason=None, slotted=True) == "batch"
    assert choose_engine(cpu, model_type="gemma2", reason=None, slotted=False) == "paged"
    assert choose_engine(gpu, model_type="llama", reason=None, slotted=True) == "paged"
    explicit = worker_args("--device", "cpu", "--engine", "paged")
    assert choose_engine(explicit, model_type="llama", reason=None, slotted=True) == "paged"


def test_engine_batch_for_a_shape_it_cannot_run_exits_with_the_alternatives() -> None:
    args = worker_args("--engine", "batch")
    assert choose_engine(args, model_type="llama", reason=None, slotted=True) == "batch"
    with pytest.raises(SystemExit, match="'gemma2'.*--engine paged or hf"):
        choose_engine(args, model_type="gemma2", reason=None, slotted=False)
