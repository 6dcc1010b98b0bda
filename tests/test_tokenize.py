"""POST /tokenize and /detokenize (vLLM's shapes) against real processes: the API, a real
SmolLM2 worker and Redis. The ids must be the model tokenizer's own, loaded here."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from tokenrelay.embedded_redis import EmbeddedRedis

from .conftest import DEMO_MODEL
from .openai_errors import assert_error
from .stack import Stack

TEXT = "The quick brown fox — jumps over 13 lazy dogs.\n\tÜnïcödé, emoji 🚀 and   spaces."
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hi."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Count "}, {"type": "text", "text": "3"}],
    },
]
CHAT_TEXT = [{**m, "content": "Count 3"} if isinstance(m["content"], list) else m for m in CHAT]


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(demo_model)


def _post(stack: Stack, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", json=body, timeout=60)


def _ok(stack: Stack, path: str, body: Any) -> dict[str, Any]:
    r = _post(stack, path, body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _template_ids(tokenizer: Any, messages: Any, **kw: Any) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_prompt_round_trip_with_the_models_own_ids(model_stack: Stack, tokenizer: Any) -> None:
    got = _ok(model_stack, "/tokenize", {"model": DEMO_MODEL, "prompt": TEXT})
    assert got["tokens"] == tokenizer(TEXT)["input_ids"]
    assert got["count"] == len(got["tokens"]) > 10
    served = httpx.get(f"{model_stack.url}/v1/models/{DEMO_MODEL}", timeout=30).json()
    assert got["max_model_len"] == served["max_model_len"] > 0
    assert set(got) == {"count", "max_model_len", "tokens"}
    back = _ok(model_stack, "/detokenize", {"model": DEMO_MODEL, "tokens": got["tokens"]})
    assert back == {"prompt": TEXT}
    bare = {"model": DEMO_MODEL, "prompt": TEXT, "add_special_tokens": False}
    assert (
        _ok(model_stack, "/tokenize", bare)["tokens"]
        == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    )


def test_chat_is_the_chat_template(model_stack: Stack, tokenizer: Any) -> None:
    got = _ok(model_stack, "/tokenize", {"model": DEMO_MODEL, "messages": CHAT})
    assert got["tokens"] == _template_ids(tokenizer, CHAT_TEXT, add_generation_prompt=True)
    assert got["count"] == len(got["tokens"])
    no_prompt = {"model": DEMO_MODEL, "messages": CHAT, "add_generation_prompt": False}
    assert _ok(model_stack, "/tokenize", no_prompt)["tokens"] == _template_ids(
        tokenizer, CHAT_TEXT, add_generation_prompt=False
    )
    prefill = [*CHAT_TEXT[:2], {"role": "assistant", "content": "Well, the"}]
    cont = {"model": DEMO_MODEL, "messages": prefill, "continue_final_message": True}
    assert _ok(model_stack, "/tokenize", cont)["tokens"] == _template_ids(
        tokenizer, prefill, continue_final_message=True
    )
    back = _ok(model_stack, "/detokenize", {"model": DEMO_MODEL, "tokens": got["tokens"]})
    text = tokenizer.apply_chat_template(CHAT_TEXT, add_generation_prompt=True, tokenize=False)
    assert back["prompt"] == text  # special tokens included, as vLLM


def test_token_strs_and_the_only_model_by_default(model_stack: Stack, tokenizer: Any) -> None:
    got = _ok(model_stack, "/tokenize", {"prompt": "hello world", "return_token_strs": True})
    ids = tokenizer("hello world")["input_ids"]
    assert got["tokens"] == ids
    assert got["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    assert _ok(model_stack, "/detokenize", {"tokens": ids}) == {"prompt": "hello world"}
    assert _ok(model_stack, "/tokenize", {"model": DEMO_MODEL, "prompt": ""})["tokens"] == []
    assert _ok(model_stack, "/detokenize", {"model": DEMO_MODEL, "tokens": []}) == {"prompt": ""}


def test_unknown_model_is_the_completions_404(model_stack: Stack) -> None:
    completions = _post(model_stack, "/v1/completions", {"model": "nope", "prompt": "hi"})
    want = assert_error(completions, 404, "model_not_found")
    for path, body in [
        ("/tokenize", {"model": "nope", "prompt": "hi"}),
        ("/tokenize", {"model": "nope", "messages": CHAT}),
        ("/detokenize", {"model": "nope", "tokens": [1, 2]}),
    ]:
        assert assert_error(_post(model_stack, path, body), 404, "model_not_found") == want


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/tokenize", {"model": DEMO_MODEL}, None, "invalid_value"),
        ("/tokenize", {"model": DEMO_MODEL, "prompt": "a", "messages": CHAT}, None, None),
        ("/tokenize", {"model": DEMO_MODEL, "prompt": 5}, "prompt", None),
        ("/tokenize", {"model": DEMO_MODEL, "prompt": ["a"]}, "prompt", None),
        ("/tokenize", {"model": DEMO_MODEL, "messages": []}, "messages", None),
        (
            "/tokenize",
            {"model": DEMO_MODEL, "messages": [{"role": "x", "content": "a"}]},
            None,
            None,
        ),
        (
            "/tokenize",
            {
                "model": DEMO_MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url"}]}],
            },
            "messages[0].content",
            "unsupported_value",
        ),
        (
            "/tokenize",
            {"model": DEMO_MODEL, "prompt": "a", "add_special_tokens": "maybe"},
            None,
            None,
        ),
        (
            "/tokenize",
            {"model": DEMO_MODEL, "messages": CHAT, "chat_template": "{{ messages }}"},
            "chat_template",
            "unsupported_value",
        ),
        (
            "/tokenize",
            {
                "model": DEMO_MODEL,
                "messages": CHAT,
                "continue_final_message": True,
                "add_generation_prompt": True,
            },
            None,
            None,
        ),
        ("/tokenize", {"model": "", "prompt": "a"}, "model", None),
        ("/detokenize", {"model": DEMO_MODEL}, "tokens", None),
        ("/detokenize", {"model": DEMO_MODEL, "tokens": "1 2"}, "tokens", None),
        ("/detokenize", {"model": DEMO_MODEL, "tokens": [1, "x"]}, "tokens[1]", None),
        ("/detokenize", {"model": DEMO_MODEL, "tokens": [1, -1]}, "tokens[1]", "invalid_value"),
        ("/detokenize", {"model": DEMO_MODEL, "tokens": [True]}, "tokens[0]", None),
        ("/detokenize", {"model": DEMO_MODEL, "tokens": [10**12]}, "tokens[0]", "invalid_value"),
        ("/detokenize", {"model": DEMO_MODEL, "tokens": [2**70]}, "tokens[0]", None),
        ("/detokenize", [1, 2], None, "invalid_body"),
    ],
)
def test_bad_input_is_an_openai_400(
    model_stack: Stack, path: str, body: Any, param: str | None, code: str | None
) -> None:
    err = assert_error(_post(model_stack, path, body), 400, code)
    if param is not None:
        assert err["param"] == param, err


def test_invalid_json_is_a_400(model_stack: Stack) -> None:
    r = httpx.post(
        f"{model_stack.url}/tokenize",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert_error(r, 400, "invalid_json")


def test_fake_engine_has_no_tokenizer(stack: Stack) -> None:
    stack.api()
    stack.fake_worker()
    err = assert_error(_post(stack, "/tokenize", {"model": "fake", "prompt": "hi"}), 400)
    assert err["code"] == "no_tokenizer" and "fake engine" in err["message"], err
    assert_error(_post(stack, "/detokenize", {"model": "fake", "tokens": [1]}), 400, "no_tokenizer")


def test_api_needs_no_model_folder(
    redis_server: EmbeddedRedis, demo_model: Path, tmp_path: Path, tokenizer: Any
) -> None:
    """A worker on another machine: its model folder is gone from this host once it has
    loaded, and the API, started after, still tokenizes with the worker's tokenizer."""
    folder = tmp_path / "elsewhere" / DEMO_MODEL
    folder.mkdir(parents=True)
    for file in demo_model.iterdir():  # links, not a 500 MB copy: the links go below
        (folder / file.name).symlink_to(file)
    s = Stack(redis_server.url, f"tok{uuid.uuid4().hex[:8]}")
    try:
        s.worker("--model-path", str(folder), "--model-names", "remote-smol")
        shutil.rmtree(folder.parent)
        s.api()
        got = _ok(s, "/tokenize", {"model": "remote-smol", "messages": CHAT})
        assert got["tokens"] == _template_ids(tokenizer, CHAT_TEXT, add_generation_prompt=True)
    finally:
        s.stop()


def test_readme_examples_answer_as_shown(model_stack: Stack) -> None:
    """The curl examples of README's "Tokenize and detokenize" and the answers beside them."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Tokenize and detokenize", 1)[1].split("\n### ", 1)[0]
    examples = re.findall(r"curl \S+(/\w+) .*?-d '(.*?)'\n# (\{.*?\})", section, re.S)
    assert len(examples) == 3, examples
    for path, body, shown in examples:
        got = _ok(model_stack, path, json.loads(body))
        if "..." in shown:  # elided: the count and the ends
            count = int(re.search(r'"count":(\d+)', shown).group(1))  # type: ignore[union-attr]
            assert got["count"] == count and shown.count(",") < count, (got, shown)
        else:
            assert got == json.loads(shown), (path, got, shown)


async def test_concurrent_requests_share_one_tokenizer(model_stack: Stack, tokenizer: Any) -> None:
    """Encodes run in threads on one tokenizer object: they must not trip over each other
    (a fast tokenizer whose settings were changed mid-encode raises 'Already borrowed')."""
    texts = [f"{i} {TEXT * (i % 5 + 1)}" for i in range(24)]
    async with httpx.AsyncClient(base_url=model_stack.url, timeout=120) as client:
        answers = await asyncio.gather(
            *(client.post("/tokenize", json={"model": DEMO_MODEL, "prompt": t}) for t in texts)
        )
    for text, r in zip(texts, answers, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == tokenizer(text)["input_ids"]
