"""What a GGUF file's weights are stored as, for the load log."""

from __future__ import annotations

from collections import Counter


def describe(path: str) -> str:
    """e.g. ``Q4_1 (211 tensors), Q6_K (1), F32 (61)``; ``unknown types`` without the
    gguf package."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return "unknown types"
    counts = Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return ", ".join(f"{name} ({n} tensors)" for name, n in counts.most_common())
