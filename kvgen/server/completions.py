"""POST /v1/completions: text (or token ids) in, text out, whole or streamed."""

import time
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .generation import Choice, Delta, Generation
from .logprobs import completion_logprobs
from .prompts import DEFAULT_COMPLETION_TOKENS, completion_prompt_ids, fit_max_tokens
from .schemas import CompletionRequest, parse_completion
from .state import ServerState
from .transport import ClosingStreamingResponse, read_json, sse, unless_disconnected


async def create_completion(request: Request) -> Response:
    arrival = time.perf_counter()
    state: ServerState = request.app.state.kvgen
    req = parse_completion(await read_json(request, state.max_body_bytes))
    state.check_model(req.model)
    prompts = await completion_prompt_ids(state.llm, req.prompts)
    max_tokens = fit_max_tokens(prompts, req.sampling.max_tokens, DEFAULT_COMPLETION_TOKENS,
                                state.llm.config.max_seq_len, "prompt")
    gen = Generation(state, prompts, max_tokens, req.sampling, arrival=arrival,
                     id_prefix="cmpl")
    # Echoed text: the prompt as sent, or the decoded ids of a token-id prompt.
    echoes = [p if isinstance(p, str) else state.llm.tokenizer.decode(ids)
              for p, ids in zip(req.prompts, prompts)] if req.echo else None
    await gen.start()
    if req.sampling.stream:
        return ClosingStreamingResponse(_events(gen, req, echoes), on_close=gen.close)
    try:
        choices = await unless_disconnected(request, gen.collect())
    finally:
        gen.close()
    return JSONResponse(_body(gen, state.model_name, [_choice(gen, c, echoes) for c in choices])
                        | {"usage": gen.usage()})


def _body(gen: Generation, model: str, choices: list[dict]) -> dict:
    return {"id": gen.id, "object": "text_completion", "created": gen.created, "model": model,
            "choices": choices}


def _choice(gen: Generation, c: Choice, echoes: list[str] | None) -> dict:
    prefix = echoes[c.index // gen.sampling.n] if echoes else ""
    logprobs = None if c.logprobs is None else completion_logprobs(c.logprobs, len(prefix))
    return {"index": c.index, "text": prefix + c.text, "logprobs": logprobs,
            "finish_reason": c.finish_reason}


async def _events(gen: Generation, req: CompletionRequest,
                  echoes: list[str] | None) -> AsyncIterator[str]:
    model = gen.state.model_name
    usage = {"usage": None} if req.sampling.include_usage else {}
    if echoes:
        yield sse(_body(gen, model, [
            {"index": i, "text": echoes[i // gen.sampling.n], "logprobs": None,
             "finish_reason": None} for i in range(len(gen.prompts) * gen.sampling.n)]) | usage)
    offsets = [0] * (len(gen.prompts) * gen.sampling.n)  # logprobs' text offsets, per choice
    async for d in gen.deltas():
        if not (d.text or d.finish_reason or d.logprobs):
            continue  # a token whose text is held back (half a character, maybe a stop string)
        yield sse(_body(gen, model, [_delta(d, offsets)]) | usage)
    if req.sampling.include_usage:
        yield sse(_body(gen, model, []) | {"usage": gen.usage()})


def _delta(d: Delta, offsets: list[int]) -> dict:
    logprobs = None
    if d.logprobs is not None:
        logprobs = completion_logprobs(d.logprobs, offsets[d.index])
        offsets[d.index] += sum(len(t.token) for t in d.logprobs)
    return {"index": d.index, "text": d.text, "logprobs": logprobs,
            "finish_reason": d.finish_reason}
