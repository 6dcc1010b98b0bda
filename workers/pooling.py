"""How an embedding model turns a sequence's hidden states into one vector.

A sentence-transformers folder says it itself: ``modules.json`` lists the modules run after
the transformer (a ``Pooling`` module, whose ``config.json`` names the mode, and usually a
``Normalize``), and ``sentence_bert_config.json`` the longest input it was trained on.
all-MiniLM-L6-v2 is mean pooling over the attention mask, then L2 normalization. A folder
without them is pooled as ``--pooling`` says (mean for an encoder, the last token for a
decoder, as vLLM does), and normalized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Mode = Literal["mean", "last", "cls"]

_ST_MODES: dict[str, Mode] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_cls_token": "cls",
}


@dataclass(frozen=True)
class Pooling:
    mode: Mode
    normalize: bool = True
    max_length: int = 0  # the folder's sentence_bert_config max_seq_length; 0: not given


def sentence_transformers_config(folder: Path) -> Pooling | None:
    """The pooling a sentence-transformers folder declares, None for a plain folder."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    mode: Mode = "mean"
    normalize = False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith(".Pooling"):
            config = folder / str(module.get("path", "")) / "config.json"
            settings = json.loads(config.read_text()) if config.is_file() else {}
            chosen = [m for key, m in _ST_MODES.items() if settings.get(key)]
            if len(chosen) != 1 and any(v for k, v in settings.items() if k.startswith("pooling")):
                raise SystemExit(f"{config}: tokenrelay pools by mean, last or cls token, one")
            mode = chosen[0] if chosen else "mean"
        elif kind.endswith(".Normalize"):
            normalize = True
    bert_config = folder / "sentence_bert_config.json"
    max_length = 0
    if bert_config.is_file():
        max_length = int(json.loads(bert_config.read_text()).get("max_seq_length") or 0)
    return Pooling(mode, normalize, max_length)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: Mode) -> torch.Tensor:
    """(B, T, H) hidden states and a (B, T) 0/1 mask of right-padded rows -> (B, H)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.sum(dim=1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    # sentence-transformers' mean: the sum over real tokens over their count (at least 1e-9)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def finish(vectors: torch.Tensor, normalize: bool, dimensions: int | None) -> torch.Tensor:
    """Float32 vectors cut to ``dimensions`` (a Matryoshka model's prefix), then
    L2-normalized when the model normalizes (F.normalize's rule: norm at least 1e-12)."""
    out = vectors.float()
    if dimensions is not None:
        out = out[:, :dimensions]
    if normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=1)
    return out
