"""A worker's tokenizer files in Redis, so the API tokenizes with the worker's own tokenizer
wherever the two run (``POST /tokenize``, ``/detokenize``).

At start a worker saves its loaded tokenizer (``save_pretrained``: what the model folder or
GGUF held, as the loader left it) and stores the files, compressed, under
``{m:NAME}:tokenizer:DIGEST``; its registry entry names the digest (``WorkerInfo.tokenizer``)
and each heartbeat refreshes the key's TTL. The API loads the files once per digest. No
model folder on the API's host, no request to a worker: the API and a worker on another
machine share nothing but Redis, as for generation. Named by content, so two workers of one
model with different tokenizers (mid-upgrade) never overwrite each other.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
import zlib
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from .keys import Keys

TOKENIZER_TTL = 24 * 3600  # after the last worker using it stops
MAX_FILE_BYTES = 256 * 1024 * 1024  # a file unpacked larger than this is refused


def pack(folder: Path) -> tuple[str, str]:
    """The digest of a folder's files and the JSON payload that carries them."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    sha = hashlib.sha256()
    for name, data in files.items():
        sha.update(f"{name}\0{len(data)}\0".encode())
        sha.update(data)
    blobs = {name: base64.b64encode(zlib.compress(data)).decode() for name, data in files.items()}
    return sha.hexdigest()[:32], json.dumps({"files": blobs})


def unpack(payload: str, folder: Path) -> None:
    """Write a payload's files into ``folder``; a name that is not a plain file name, or a
    file that inflates past ``MAX_FILE_BYTES``, is a ValueError."""
    files: dict[str, str] = json.loads(payload)["files"]
    for name, blob in files.items():
        if not name or name != Path(name).name or name.startswith("."):
            raise ValueError(f"tokenizer file name {name!r} is not a plain file name")
        inflate = zlib.decompressobj()
        data = inflate.decompress(base64.b64decode(blob), MAX_FILE_BYTES)
        if inflate.unconsumed_tail:
            raise ValueError(f"tokenizer file {name!r} is over {MAX_FILE_BYTES} bytes")
        (folder / name).write_bytes(data)


async def publish(redis: aioredis.Redis, keys: Keys, models: list[str], tokenizer: Any) -> str:
    """Store a loaded tokenizer's files for each of ``models``; returns their digest."""
    with tempfile.TemporaryDirectory(prefix="tokenrelay-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        digest, payload = pack(Path(folder))
    pipe = redis.pipeline(transaction=False)
    for model in models:
        pipe.set(keys.tokenizer(model, digest), payload, ex=TOKENIZER_TTL)
    await pipe.execute()
    return digest


async def fetch(redis: aioredis.Redis, keys: Keys, model: str, digest: str) -> str | None:
    """The payload a worker of ``model`` published, None when it is gone."""
    payload: str | None = await redis.get(keys.tokenizer(model, digest))
    return payload
