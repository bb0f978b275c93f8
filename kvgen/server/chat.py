"""POST /v1/chat/completions: messages rendered by the model's chat template, answered whole or
streamed as deltas."""

import time
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .generation import Choice, Delta, Generation
from .logprobs import chat_logprobs
from .prompts import chat_prompt_ids, fit_max_tokens
from .schemas import ChatRequest, parse_chat
from .state import ServerState
from .transport import ClosingStreamingResponse, read_json, sse, unless_disconnected


async def create_chat_completion(request: Request) -> Response:
    arrival = time.perf_counter()
    state: ServerState = request.app.state.kvgen
    req = parse_chat(await read_json(request, state.max_body_bytes))
    state.check_model(req.model)
    prompt = await chat_prompt_ids(state.llm, state.chat_template, req.messages)
    # No max_tokens: the answer may fill the rest of the context.
    max_tokens = fit_max_tokens([prompt], req.sampling.max_tokens, None,
                                state.llm.config.max_seq_len, "messages")
    gen = Generation(state, [prompt], max_tokens, req.sampling, arrival=arrival,
                     id_prefix="chatcmpl")
    await gen.start()
    if req.sampling.stream:
        return ClosingStreamingResponse(_events(gen, req), on_close=gen.close)
    try:
        choices = await unless_disconnected(request, gen.collect())
    finally:
        gen.close()
    return JSONResponse(_body(gen, "chat.completion", [_choice(c) for c in choices])
                        | {"usage": gen.usage()})


def _body(gen: Generation, kind: str, choices: list[dict]) -> dict:
    return {"id": gen.id, "object": kind, "created": gen.created,
            "model": gen.state.model_name, "choices": choices}


def _choice(c: Choice) -> dict:
    return {"index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": None if c.logprobs is None else chat_logprobs(c.logprobs),
            "finish_reason": c.finish_reason}


async def _events(gen: Generation, req: ChatRequest) -> AsyncIterator[str]:
    usage = {"usage": None} if req.sampling.include_usage else {}
    # OpenAI's first chunk of each choice names the role and carries no text.
    yield sse(_body(gen, "chat.completion.chunk", [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": None} for i in range(req.sampling.n)]) | usage)
    async for d in gen.deltas():
        if not (d.text or d.finish_reason or d.logprobs):
            continue  # a token whose text is held back (half a character, maybe a stop string)
        yield sse(_body(gen, "chat.completion.chunk", [_delta(d)]) | usage)
    if req.sampling.include_usage:
        yield sse(_body(gen, "chat.completion.chunk", []) | {"usage": gen.usage()})


def _delta(d: Delta) -> dict:
    return {"index": d.index, "delta": {"content": d.text} if d.text else {},
            "logprobs": None if d.logprobs is None else chat_logprobs(d.logprobs),
            "finish_reason": d.finish_reason}
