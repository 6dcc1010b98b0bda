"""vLLM's POST /tokenize and POST /detokenize, answered with the live workers' tokenizer."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request

from ..deps import Authorized, Service
from ..tokenization import DetokenizeRequest, TokenizeRequest
from ..tokenizers import TokenizerCache, serving

router = APIRouter(dependencies=Authorized)


def get_tokenizers(request: Request) -> TokenizerCache:
    return request.app.state.tokenizers  # type: ignore[no-any-return]


Tokenizers = Annotated[TokenizerCache, Depends(get_tokenizers)]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, service: Service, cache: Tokenizers) -> dict[str, Any]:
    """A prompt's or a chat's token ids: ``{count, max_model_len, tokens}``."""
    body.model, workers = await serving(service, body.model)
    tokenizer = await cache.get(body.model, workers)
    tokens = await anyio.to_thread.run_sync(body.encode, tokenizer)
    answer: dict[str, Any] = {
        "count": len(tokens),
        "max_model_len": max(w.max_context for w in workers),
        "tokens": tokens,
    }
    if body.return_token_strs:
        answer["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
    return answer


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeRequest, service: Service, cache: Tokenizers
) -> dict[str, Any]:
    """The text of token ids: ``{prompt}``."""
    body.model, workers = await serving(service, body.model)
    tokenizer = await cache.get(body.model, workers)
    return {"prompt": await anyio.to_thread.run_sync(body.decode, tokenizer)}
