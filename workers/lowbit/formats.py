"""The ``--low-bit`` formats, by IPEX-LLM's names and with their meaning, and which devices
have a kernel for each.

A format is either a dtype (``fp16``, ``bf16``: the model loads in it) or a weight format:
every Linear's weight is stored quantized and multiplied by a kernel that reads it in that
form, so a decode step reads a quarter (4-bit) or half (8-bit) of the bf16 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LowBit:
    name: str
    summary: str
    devices: tuple[str, ...]  # devices with a kernel for it
    dtype: str | None = None  # a dtype format: load in this (--dtype's name), quantize nothing
    bits: int = 16
    group: int = 0  # weights per scale (0: one scale per output channel)
    symmetric: bool = True


FORMATS: dict[str, LowBit] = {
    f.name: f
    for f in (
        LowBit(
            "sym_int4",
            "4-bit weights, symmetric, one scale per 32 (GGUF Q4_0's grid)",
            ("cpu",),
            bits=4,
            group=32,
        ),
        LowBit(
            "asym_int4",
            "4-bit weights, asymmetric, a scale and a minimum per 32 (GGUF Q4_1's grid)",
            ("cpu",),
            bits=4,
            group=32,
            symmetric=False,
        ),
        LowBit(
            "sym_int8",
            "8-bit weights, symmetric, one scale per output channel",
            ("cpu",),
            bits=8,
        ),
        LowBit("fp8", "8-bit float weights (e4m3), one scale per output channel", (), bits=8),
        LowBit("nf4", "4-bit NormalFloat weights (QLoRA's), one scale per 64", (), bits=4),
        LowBit("fp16", "float16 weights and activations", ("cpu", "cuda", "xpu", "mps"), "float16"),
        LowBit(
            "bf16",
            "bfloat16 weights and activations",
            ("cpu", "cuda", "xpu", "mps"),
            "bfloat16",
        ),
    )
}


# CUDA's sym_int8 is bitsandbytes' LLM.int8 through the hf engine (FastChat's --load-8bit)
BITSANDBYTES = "sym_int8"


def supported(device: str) -> list[str]:
    return [f.name for f in FORMATS.values() if device in f.devices]


def check_format(name: str, device: str) -> LowBit:
    """The format, or a SystemExit that names what this device can do."""
    fmt = FORMATS.get(name)
    if fmt is None:
        raise SystemExit(f"--low-bit {name!r} is not a format: choose from {', '.join(FORMATS)}")
    if device not in fmt.devices and not (device == "cuda" and name == BITSANDBYTES):
        raise SystemExit(
            f"--low-bit {name} has no kernel on {device} in this release; on {device}: "
            f"{', '.join(supported(device)) or 'none'}"
        )
    return fmt
