"""Prompts from the tokenizer's own chat template: no adapters chosen by model name."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from tokenrelay.queueing.messages import Job

from .engine import InvalidRequest


def encode_prompt(tokenizer: PreTrainedTokenizerBase, job: Job) -> list[int]:
    ids = _encode(tokenizer, job)
    # A stream continued after its worker died (workers/continuation.py): the text already
    # sent follows the prompt, encoded on its own as the generated tokens were.
    continued = getattr(job, "continued_text", "")
    if continued:
        ids += tokenizer(continued, add_special_tokens=False)["input_ids"]
    return ids


def _encode(tokenizer: PreTrainedTokenizerBase, job: Job) -> list[int]:
    if job.kind == "completion":
        return list(tokenizer(job.prompt or "")["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(
            f"Model '{job.model}' has no chat template; use /v1/completions with a prompt.",
            code="no_chat_template",
        )
    messages = [m.model_dump() for m in job.messages or []]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template that rejects a role order, say
        raise InvalidRequest(f"The chat template rejected these messages: {exc}") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
