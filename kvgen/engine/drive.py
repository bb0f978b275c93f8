"""Driving an engine to completion: many prompts with a progress bar, or one prompt streamed."""

import time
from typing import Iterator

import torch
from tqdm import tqdm

from ..errors import KvgenError
from ..llm import GenerationResult


def generate_all(engine, prompts, *, progress: bool = False, **sampling) -> list[GenerationResult]:
    """Return one GenerationResult per prompt, in order, after stepping engine until all end.

    Each prompt is text, token ids, or a dict with "prompt" and keywords overriding sampling.
    """
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                            and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise KvgenError("prompts must be a non-empty list of strings, token-id lists or dicts")
    results: dict[object, GenerationResult] = {}
    logits: dict[object, list[torch.Tensor]] = {}
    try:
        for i, prompt in enumerate(prompts):
            options = dict(sampling)
            if isinstance(prompt, dict):
                if "prompt" not in prompt:
                    raise KvgenError(f"prompt {i}: a dict prompt needs a 'prompt' key")
                options.update(prompt)
                prompt = options.pop("prompt")
            rid = engine.add_request(prompt, **options)
            results[rid] = GenerationResult(engine.llm.encode_prompts(prompt)[0], [], "", None)
            logits[rid] = []
    except Exception:
        for rid in results:  # leave the engine as it was
            engine.abort(rid)
        raise

    bar = tqdm(total=len(results), unit="req", desc="requests", disable=not progress)
    start, generated = time.perf_counter(), 0
    pending = set(results)
    with bar:
        while pending:
            for out in engine.step():
                if out.request_id not in pending:
                    continue  # another caller's request sharing the engine
                r = results[out.request_id]
                r.token_ids += out.token_ids
                r.text += out.text
                generated += len(out.token_ids)
                if out.logits is not None:
                    logits[out.request_id].append(out.logits)
                if out.finished:
                    r.finish_reason = out.finish_reason
                    pending.discard(out.request_id)
                    bar.update(1)
            bar.set_postfix_str(f"{generated / (time.perf_counter() - start):.1f} tok/s",
                                refresh=False)
    for rid, r in results.items():
        if logits[rid]:
            r.logits = torch.cat(logits[rid])
    return list(results.values())


def stream_request(engine, prompt, **sampling) -> Iterator[str]:
    """Return a generator of the text of one new request, as the engine releases it."""
    # Added now, not at the first next(), so a bad request fails at the call.
    return _stream(engine, engine.add_request(prompt, **sampling))


def _stream(engine, rid) -> Iterator[str]:
    finished = False
    try:
        while not finished:
            for out in engine.step():
                if out.request_id == rid:
                    finished = out.finished
                    if out.text:
                        yield out.text
    finally:
        if not finished:
            engine.abort(rid)
