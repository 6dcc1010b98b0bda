"""Load a transformers model folder or a GGUF file onto a device, with progress bars, and
quantize it for ``--low-bit``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .sampling import defaults_from

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class LoadOptions:
    model_path: str
    device: str = "cpu"
    dtype: str = "auto"
    num_gpus: int = 1
    max_gpu_memory: str | None = None
    low_bit: str | None = None  # a lowbit.formats name
    trust_remote_code: bool = False


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device in ("cuda", "xpu", "mps"):
        return torch.float16
    return torch.float32


def check_device(device: str) -> None:
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "xpu": hasattr(torch, "xpu") and torch.xpu.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if device not in available:
        raise SystemExit(f"--device {device!r} is not one of cpu, cuda, xpu, mps")
    if not available[device]:
        raise SystemExit(
            f"--device {device} was asked for, but torch {torch.__version__} sees no {device} "
            "device here. Install a torch build for it, or pass --device cpu."
        )


def _source(model_path: str) -> tuple[str, dict[str, str]]:
    path = Path(model_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SystemExit(f"--model-path {model_path}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    if not path.is_dir():
        raise SystemExit(
            f"--model-path {model_path}: not a folder or a .gguf file. tokenrelay loads local "
            "models only; download the model first (for example with `hf download`)."
        )
    return str(path), {}


def load(options: LoadOptions):  # type: ignore[no-untyped-def]
    """Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lowbit.formats import BITSANDBYTES, check_format

    check_device(options.device)
    fmt = check_format(options.low_bit, options.device) if options.low_bit else None
    if fmt is not None and fmt.dtype is not None:  # fp16, bf16: a dtype
        if options.dtype not in ("auto", fmt.dtype):
            raise SystemExit(
                f"--low-bit {fmt.name} loads in {fmt.dtype}, not --dtype {options.dtype}"
            )
        options.dtype, fmt = fmt.dtype, None
    bitsandbytes = fmt is not None and options.device == "cuda" and fmt.name == BITSANDBYTES
    if options.model_path.startswith("random:"):
        model, tokenizer = _random(options)
        if fmt is not None and not bitsandbytes:
            _quantize(model, fmt, options.model_path)
        return model, tokenizer
    source, extra = _source(options.model_path)
    kwargs: dict[str, object] = {
        "dtype": resolve_dtype(options.dtype, options.device),
        "trust_remote_code": options.trust_remote_code,
        **extra,
    }
    if bitsandbytes:
        kwargs["quantization_config"] = _eight_bit()
    if options.device == "cuda" and (options.num_gpus > 1 or options.max_gpu_memory):
        kwargs["device_map"] = "auto"
        if options.max_gpu_memory:
            kwargs["max_memory"] = dict.fromkeys(range(options.num_gpus), options.max_gpu_memory)
    elif options.device != "cpu":
        kwargs["device_map"] = options.device
    started = time.monotonic()
    log.info("loading %s on %s (%s)", options.model_path, options.device, kwargs["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    log.info("loaded %s in %.1fs", options.model_path, time.monotonic() - started)
    if fmt is not None and not bitsandbytes:
        _quantize(model, fmt, options.model_path)
    return model, tokenizer


def _quantize(model: Any, fmt: Any, model_path: str) -> None:
    from .lowbit.apply import quantize_model
    from .lowbit.gguf import describe

    if model_path.endswith(".gguf"):
        # transformers dequantizes a GGUF's tensors as it loads them; say what they were
        kinds = describe(model_path)
        exact = fmt.name == "asym_int4" and "Q4_1" in kinds
        log.info(
            "%s holds %s weights; transformers dequantized them on load, and they are "
            "re-quantized to %s now%s",
            Path(model_path).name,
            kinds,
            fmt.name,
            " (Q4_1's grid: exact)" if exact else "",
        )
    quantize_model(model, fmt)


def generation_defaults(model: Any) -> dict[str, float | int]:
    """The sampling defaults of a loaded model: what its generation_config.json sets (only
    what differs from transformers' own defaults, as vLLM reads it)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    return defaults_from(config.to_diff_dict())


def _eight_bit():  # type: ignore[no-untyped-def]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            "--low-bit sym_int8 (--load-8bit) on CUDA needs bitsandbytes: pip install bitsandbytes"
        ) from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _random(options: LoadOptions):  # type: ignore[no-untyped-def]
    """``random:1b`` / ``random:8b``: a Llama shape with random weights, for benchmarks."""
    from tokenrelay.bench.models import SHAPES, random_llama, synthetic_tokenizer

    shape = options.model_path.removeprefix("random:")
    if shape not in SHAPES:
        raise SystemExit(f"--model-path random:{shape}: shapes are {', '.join(SHAPES)}")
    dtype = resolve_dtype(options.dtype, options.device)
    return random_llama(shape, options.device, dtype), synthetic_tokenizer()
