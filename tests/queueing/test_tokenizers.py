"""A worker's tokenizer through Redis (queueing/tokenizers.py) and the API's cache of them
(api/tokenizers.py), in process against the real Redis and SmolLM2's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from transformers import AutoTokenizer

from tokenrelay.api.errors import APIError
from tokenrelay.api.tokenization import TokenizeRequest
from tokenrelay.api.tokenizers import TokenizerCache
from tokenrelay.queueing import tokenizers
from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.registry import Registry, WorkerInfo

MODEL = "smol"


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(demo_model)


def _worker(digest: str) -> WorkerInfo:
    return WorkerInfo(id="w1", models=[MODEL], device="cpu", capacity=1, tokenizer=digest)


async def test_published_tokenizer_loads_as_the_same_tokenizer(
    aredis: aioredis.Redis, redis_settings: RedisSettings, tokenizer: Any
) -> None:
    keys = redis_settings.keys
    digest = await tokenizers.publish(aredis, keys, [MODEL], tokenizer)
    assert 0 < await aredis.ttl(keys.tokenizer(MODEL, digest)) <= tokenizers.TOKENIZER_TTL
    loaded = await TokenizerCache(aredis, keys).get(MODEL, [_worker(digest)])
    text = "Tokenizers, published: ünïcode & emoji 🚀\n  spaces"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    # the same files give the same digest: workers of one model share one key
    assert await tokenizers.publish(aredis, keys, [MODEL], tokenizer) == digest


async def test_heartbeat_keeps_the_tokenizer_key(
    aredis: aioredis.Redis, redis_settings: RedisSettings, tokenizer: Any
) -> None:
    keys = redis_settings.keys
    digest = await tokenizers.publish(aredis, keys, [MODEL], tokenizer)
    await aredis.expire(keys.tokenizer(MODEL, digest), 5)
    await Registry(aredis, keys).heartbeat(_worker(digest), ttl=4)
    assert await aredis.ttl(keys.tokenizer(MODEL, digest)) > 5


async def test_add_special_tokens_defaults_as_vllm(
    aredis: aioredis.Redis, redis_settings: RedisSettings, demo_model: Path
) -> None:
    """SmolLM2 adds no special token; with add_bos_token set it adds <|im_start|>, which a
    prompt gets by default and a chat only when asked."""
    with_bos = AutoTokenizer.from_pretrained(demo_model)
    with_bos.add_bos_token = True
    digest = await tokenizers.publish(aredis, redis_settings.keys, [MODEL], with_bos)
    loaded = await TokenizerCache(aredis, redis_settings.keys).get(MODEL, [_worker(digest)])
    bos = with_bos.bos_token_id
    plain = TokenizeRequest(model=MODEL, prompt="hi").encode(loaded)
    assert plain == with_bos("hi")["input_ids"] and plain[0] == bos
    bare = TokenizeRequest(model=MODEL, prompt="hi", add_special_tokens=False).encode(loaded)
    assert bare == plain[1:]
    chat = [{"role": "user", "content": "hi"}]
    text = with_bos.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = TokenizeRequest(model=MODEL, messages=chat).encode(loaded)
    assert ids == with_bos(text, add_special_tokens=False)["input_ids"]
    extra = TokenizeRequest(model=MODEL, messages=chat, add_special_tokens=True).encode(loaded)
    assert extra == [bos, *ids]


async def test_gone_files_are_a_503_not_a_500(
    aredis: aioredis.Redis, redis_settings: RedisSettings, tokenizer: Any
) -> None:
    keys = redis_settings.keys
    digest = await tokenizers.publish(aredis, keys, [MODEL], tokenizer)
    await aredis.delete(keys.tokenizer(MODEL, digest))
    with pytest.raises(APIError) as gone:
        await TokenizerCache(aredis, keys).get(MODEL, [_worker(digest)])
    assert (gone.value.status, gone.value.code) == (503, "tokenizer_unavailable")
    assert "restart" in gone.value.message
    with pytest.raises(APIError) as none:
        await TokenizerCache(aredis, keys).get(MODEL, [_worker("")])
    assert (none.value.status, none.value.code) == (400, "no_tokenizer")


async def test_unreadable_files_are_a_503(
    aredis: aioredis.Redis, redis_settings: RedisSettings, tmp_path: Path
) -> None:
    (tmp_path / "tokenizer.json").write_text("not a tokenizer")
    digest, payload = tokenizers.pack(tmp_path)
    await aredis.set(redis_settings.keys.tokenizer(MODEL, digest), payload)
    with pytest.raises(APIError) as bad:
        await TokenizerCache(aredis, redis_settings.keys).get(MODEL, [_worker(digest)])
    assert (bad.value.status, bad.value.code) == (503, "tokenizer_unavailable")


@pytest.mark.parametrize("name", ["../escape.json", "/etc/x", ".hidden", "a/b.json", ""])
def test_unpack_writes_plain_file_names_only(tmp_path: Path, name: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    _, payload = tokenizers.pack(tmp_path / "src")
    blob = json.loads(payload)["files"]["tokenizer.json"]
    with pytest.raises(ValueError, match="plain file name"):
        tokenizers.unpack(json.dumps({"files": {name: blob}}), tmp_path)


def test_template_rejections_are_400s(tokenizer: Any) -> None:
    chat = TokenizeRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    strict = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = "{{ raise_exception('system message required') }}"
    with pytest.raises(APIError) as rejected:
        chat.encode(strict)
    assert (rejected.value.status, rejected.value.param) == (400, "messages")
    assert "system message required" in rejected.value.message
    strict.chat_template = None
    with pytest.raises(APIError) as none:
        chat.encode(strict)
    assert (none.value.status, none.value.code) == (400, "no_chat_template")
