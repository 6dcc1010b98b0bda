"""Request fields that change the output and that tokenrelay does not implement.

Each is declared on the request models, so a value other than null or the field's
do-nothing value is a 400 ``unsupported_value`` naming it; an unknown field that only
tunes the service (``metadata``, ``store``, ``service_tier``, ``user``, ``prediction``) is
still accepted and ignored. What is honoured is in schemas.py and the README's table.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticCustomError

# field -> (what it asks for, the values besides null that ask for nothing)
Table = dict[str, tuple[str, tuple[Any, ...]]]

_SHARED: Table = {
    "response_format": ("structured output", ({"type": "text"},)),
    "best_of": ("best_of candidates", (1,)),
    "use_beam_search": ("beam search", (False,)),
    "length_penalty": ("a beam search length penalty", (1, 1.0)),
    "typical_p": ("typical sampling", (1, 1.0)),
    "no_repeat_ngram_size": ("n-gram blocking", (0,)),
    "guided_json": ("guided decoding", ()),
    "guided_regex": ("guided decoding", ()),
    "guided_choice": ("guided decoding", ()),
    "guided_grammar": ("guided decoding", ()),
    "guided_decoding_backend": ("guided decoding", ()),
    "structured_outputs": ("structured output", ()),
    "bad_words": ("banned words", ([],)),
    "allowed_token_ids": ("a token allow-list", ()),
    "logits_processors": ("custom logits processors", ([],)),
    "skip_special_tokens": ("special tokens in the text", (True,)),
    "spaces_between_special_tokens": ("special-token spacing", (True,)),
    "truncate_prompt_tokens": ("prompt truncation", ()),
    "prompt_logprobs": ("prompt log probabilities", ()),
    "return_tokens_as_token_ids": ("tokens as ids", (False,)),
}

CHAT: Table = {
    **_SHARED,
    "tools": ("tool calling", ([],)),
    "tool_choice": ("tool calling", ("none",)),
    "functions": ("function calling", ([],)),
    "function_call": ("function calling", ("none",)),
    "audio": ("audio output", ()),
    "modalities": ("output modalities other than text", (["text"],)),
    "reasoning_effort": ("a reasoning effort", ()),
    "verbosity": ("a verbosity", ()),
    "web_search_options": ("web search", ()),
    "echo": ("the last message echoed", (False,)),
    "add_generation_prompt": ("a prompt without the generation prompt", (True,)),
    "continue_final_message": ("continuing the final message", (False,)),
    "add_special_tokens": ("the tokenizer's special tokens around the template", (False,)),
    "chat_template": ("a chat template of the request's own", ()),
    "chat_template_kwargs": ("chat template arguments", ({},)),
    "documents": ("documents for the chat template", ([],)),
}

COMPLETION: Table = {
    **_SHARED,
    "suffix": ("a suffix (insertion)", ("",)),
    "add_special_tokens": ("a prompt without the tokenizer's special tokens", (True,)),
}


def refusing(name: str, table: Table) -> type[BaseModel]:
    """A base model declaring ``table``'s fields, each refused away from its neutral values."""

    def check(cls: type, v: Any, info: ValidationInfo) -> Any:
        what, neutral = table[info.field_name or ""]
        if v is None or any(v == n and type(v) is type(n) for n in neutral):
            return v
        raise PydanticCustomError(
            "unsupported_value",
            f"{info.field_name}={_shown(v)} ({what}) is not supported by tokenrelay; leave it out",
        )

    return create_model(  # type: ignore[call-overload, no-any-return]
        name,
        __config__=ConfigDict(extra="allow"),
        __validators__={"_refuse": field_validator(*table)(classmethod(check))},
        **dict.fromkeys(table, (Any, None)),
    )


def _shown(value: Any) -> str:
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
