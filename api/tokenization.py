"""vLLM's /tokenize and /detokenize shapes, and what each does with a loaded tokenizer.

``TokenizeRequest`` is vLLM's TokenizeCompletionRequest (``prompt``) and TokenizeChatRequest
(``messages``) in one: exactly one of the two. A chat is rendered by the tokenizer's chat
template and then encoded, as a worker builds a chat prompt (workers/prompts.py), so the
ids are the ones the model would see.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from .errors import APIError
from .schemas import Message, not_supported


class _ForModel(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are accepted and ignored

    # vLLM: left out, the model served (a 400 when several are)
    model: Annotated[str, Field(min_length=1)] | None = None


class TokenizeRequest(_ForModel):
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)] | None = None
    # vLLM's defaults: special tokens (a BOS) for a prompt; none beyond the template's for
    # a chat, whose template writes its own
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None  # default: unless continue_final_message
    continue_final_message: bool = False
    return_token_strs: bool = False
    # vLLM's fields that change the ids and that tokenrelay's chat completions do not take:
    # refused, so that /tokenize counts what generation would see
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None

    @field_validator("chat_template", "chat_template_kwargs", "tools")
    @classmethod
    def _refused(cls, v: object, info: Any) -> object:
        if v is not None:
            raise not_supported(f"{info.field_name} (the model's own chat template is used)")
        return v

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' (a string) and 'messages' (a chat)")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be true: the "
                "first continues the last message, the second starts a new one"
            )
        return self

    def encode(self, tokenizer: Any) -> list[int]:
        """The token ids, as the model would see this prompt or chat."""
        if self.messages is None:
            special = self.add_special_tokens is not False
            return list(tokenizer(self.prompt, add_special_tokens=special)["input_ids"])
        text = self._render(tokenizer, self.messages)
        return list(tokenizer(text, add_special_tokens=bool(self.add_special_tokens))["input_ids"])

    def _render(self, tokenizer: Any, messages: list[Message]) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(
                400,
                f"Model '{self.model}' has no chat template; tokenize a 'prompt' instead.",
                code="no_chat_template",
                param="messages",
            )
        chat = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            text = tokenizer.apply_chat_template(
                chat,
                add_generation_prompt=not self.continue_final_message
                if self.add_generation_prompt is None
                else self.add_generation_prompt,
                continue_final_message=self.continue_final_message,
                tokenize=False,
            )
        except Exception as exc:  # a template that rejects a role order, say
            raise APIError(
                400,
                f"The chat template rejected these messages: {exc}",
                code="invalid_value",
                param="messages",
            ) from exc
        return str(text)


class DetokenizeRequest(_ForModel):
    tokens: Annotated[list[StrictInt], Field(max_length=1_000_000)]  # true is no token id

    def decode(self, tokenizer: Any) -> str:
        """The text of the ids, special tokens included (as vLLM's /detokenize)."""
        size = len(tokenizer)
        for i, token in enumerate(self.tokens):
            if not 0 <= token < size:
                raise APIError(
                    400,
                    f"Token id {token} is not in the vocabulary of '{self.model}' "
                    f"(ids 0 to {size - 1}).",
                    code="invalid_value",
                    param=f"tokens[{i}]",
                )
        return str(tokenizer.decode(self.tokens))
