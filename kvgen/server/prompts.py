"""Prompts to token ids, and how many tokens each may generate within the model's context."""

import asyncio

from ..llm import LLM
from .chat_template import ChatTemplate
from .errors import ApiError

# max_tokens when a completion request gives none: OpenAI's legacy default. A chat request
# without one may fill the rest of the context, as OpenAI's chat models do.
DEFAULT_COMPLETION_TOKENS = 16


async def completion_prompt_ids(llm: LLM, prompts: list) -> list[list[int]]:
    """Return each prompt (text, or token ids checked against the vocabulary) as token ids."""
    # Off the event loop: a long prompt through a pure-Python tokenizer takes a while.
    ids = await asyncio.to_thread(lambda: [_ids(llm, p) for p in prompts])
    for i, p in enumerate(ids):
        where = "prompt" if len(ids) == 1 else f"prompt[{i}]"
        if not p:
            raise ApiError(400, f"{where} has no tokens; at least one is needed", param="prompt")
        bad = next((t for t in p if not 0 <= t < llm.config.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"{where}: token id {bad} is outside the vocabulary [0, "
                           f"{llm.config.vocab_size})", param="prompt")
    return ids


def _ids(llm: LLM, prompt) -> list[int]:
    return llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


async def chat_prompt_ids(llm: LLM, template: ChatTemplate | None,
                          messages: list[dict]) -> list[int]:
    """Return the token ids of messages rendered by the model's chat template."""
    if template is None:
        raise ApiError(400, "this model has no chat template (tokenizer_config.json has no "
                       "chat_template), so it cannot answer chat requests; use /v1/completions",
                       param="messages", code="no_chat_template")
    text = await asyncio.to_thread(template.render, messages)
    # The template writes the special tokens it wants (BOS included), as transformers'
    # apply_chat_template assumes: the tokenizer adds none of its own.
    ids = await asyncio.to_thread(llm.tokenizer.encode, text, False)
    if not ids:
        raise ApiError(400, "messages render to an empty prompt", param="messages")
    return ids


def fit_max_tokens(prompts: list[list[int]], requested: int | None, default: int | None,
                   context: int, prompt_param: str) -> list[int]:
    """Return max_tokens for each prompt: requested, or default capped by the room left in the
    context (all of it when default is None). Raise a 400 when a prompt or requested cannot
    fit."""
    out = []
    for i, p in enumerate(prompts):
        where = prompt_param if len(prompts) == 1 else f"{prompt_param}[{i}]"
        room = context - len(p)
        if room <= 0:
            raise ApiError(400, f"{where} is {len(p)} tokens, but the model's context is "
                           f"{context} tokens: no room is left for a completion",
                           param=prompt_param, code="context_length_exceeded")
        if requested is None:
            out.append(room if default is None else min(default, room))
        elif requested > room:
            raise ApiError(400, f"max_tokens {requested} does not fit: {where} is {len(p)} "
                           f"tokens and the model's context is {context}, which leaves room "
                           f"for {room}", param="max_tokens", code="context_length_exceeded")
        else:
            out.append(requested)
    return out
