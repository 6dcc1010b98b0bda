"""`--task`: whether a worker's model generates text or embeds it, and loading the latter.

``auto`` reads the folder: a sentence-transformers folder (``modules.json``), or a config
whose architectures are encoders (``BertModel``, ``XLMRobertaModel``, ... and no LM head)
or whose ``model_type`` is an encoder's, embeds; anything else (a causal LM, a .gguf file)
generates. A decoder embeds only when asked (``--task embed``), pooled as ``--pooling``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .engine import Engine
from .pooling import Pooling, sentence_transformers_config

log = logging.getLogger(__name__)

ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "mpnet",
        "electra",
        "deberta",
        "deberta-v2",
        "camembert",
        "albert",
        "nomic_bert",
        "modernbert",
    }
)
_GENERATING_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _config(model_path: str) -> dict[str, object]:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def detect_task(model_path: str | None) -> str:
    """``embed`` for an encoder or a sentence-transformers folder, else ``generate``."""
    if not model_path or model_path.endswith(".gguf") or model_path.startswith("random:"):
        return "generate"
    folder = Path(model_path)
    if (folder / "modules.json").is_file():
        return "embed"
    config = _config(model_path)
    architectures = [str(a) for a in config.get("architectures") or []]  # type: ignore[attr-defined]
    if any(a.endswith(_GENERATING_HEADS) for a in architectures) or config.get("is_decoder"):
        return "generate"
    return "embed" if config.get("model_type") in ENCODER_TYPES else "generate"


def resolve_task(args: argparse.Namespace) -> str:
    if args.task != "auto":
        return str(args.task)
    if args.engine == "fake":
        return "generate"
    task = detect_task(args.model_path)
    if task == "embed":
        log.info("%s is an embedding model: serving /v1/embeddings", args.model_path)
    return task


def pooling_for(args: argparse.Namespace, encoder: bool) -> Pooling:
    """The folder's own pooling (sentence-transformers), unless --pooling overrides it;
    else mean pooling for an encoder, the last token for a decoder; normalized."""
    declared = sentence_transformers_config(Path(args.model_path))
    default = "mean" if encoder else "last"
    if declared is None:
        return Pooling(args.pooling or default, normalize=True)
    if args.pooling and args.pooling != declared.mode:
        log.warning("--pooling %s overrides the folder's %s pooling", args.pooling, declared.mode)
        return Pooling(args.pooling, declared.normalize, declared.max_length)
    return declared


def build_embed_engine(args: argparse.Namespace) -> Engine:
    if args.engine not in ("auto", "hf"):
        raise SystemExit(f"--task embed runs its own engine, not --engine {args.engine}")
    if args.low_bit or args.load_8bit or args.num_gpus > 1:
        raise SystemExit("--task embed: --low-bit, --load-8bit and --num-gpus are not supported")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .embed_engine import EmbedEngine
    from .loader import check_device, resolve_dtype

    check_device(args.device)
    config = AutoConfig.from_pretrained(args.model_path, trust_remote_code=args.trust_remote_code)
    pooling = pooling_for(args, encoder=config.model_type in ENCODER_TYPES)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModel.from_pretrained(
        args.model_path,
        dtype=resolve_dtype(args.dtype, args.device),
        trust_remote_code=args.trust_remote_code,
    ).to(args.device)
    limits = [
        args.max_model_len,
        pooling.max_length,
        getattr(config, "max_position_embeddings", None),
    ]
    max_length = min(int(n) for n in limits if n) if any(limits) else 512
    matryoshka = bool(
        getattr(config, "is_matryoshka", False) or getattr(config, "matryoshka_dimensions", None)
    )
    log.info(
        "embedding model: %s pooling%s, inputs up to %d tokens, %d dimensions%s",
        pooling.mode,
        " + L2 normalize" if pooling.normalize else "",
        max_length,
        config.hidden_size,
        " (Matryoshka: dimensions may cut them)" if matryoshka else "",
    )
    engine = EmbedEngine(model, tokenizer, pooling, max_length=max_length, matryoshka=matryoshka)
    engine.weights = str(model.dtype).removeprefix("torch.")
    return engine
