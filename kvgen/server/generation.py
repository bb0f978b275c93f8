"""The engine requests behind one API call: n choices for each prompt, their outputs merged into
one stream of per-choice deltas, with usage and latency measured on the way."""

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..errors import KvgenError
from .engine_loop import EngineFailed
from .errors import ApiError
from .logprobs import LogprobReader, TokenLogprob
from .schemas import Sampling
from .state import ServerState


@dataclass
class Delta:
    """What one engine step added to one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


@dataclass
class Choice:
    """One choice's whole output, for a non-streamed answer."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class Generation:
    """Choice i * n + j is prompt i's j-th sample (seeded with seed + j when a seed is given)."""

    def __init__(self, state: ServerState, prompts: list[list[int]], max_tokens: list[int],
                 sampling: Sampling, *, arrival: float, id_prefix: str):
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.state, self.prompts, self.sampling = state, prompts, sampling
        self.arrival = arrival  # time.perf_counter() when the request came in
        self.completion_tokens = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._index: dict[str, int] = {}
        self._readers: dict[str, LogprobReader] = {}
        self._last_token_at: dict[str, float] = {}
        requests = []
        for i, prompt in enumerate(prompts):
            for j in range(sampling.n):
                request_id = f"{self.id}-{i * sampling.n + j}"
                self._index[request_id] = i * sampling.n + j
                requests.append((request_id, prompt, sampling.engine_options(max_tokens[i], j)))
                if sampling.logprobs is not None:
                    self._readers[request_id] = LogprobReader(
                        state.llm.tokenizer, sampling.logprobs, prompt[-1])
        self._requests = requests
        self._unfinished = set(self._index)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)  # once per prompt, whatever n, as OpenAI does

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def start(self):
        """Hand every choice's request to the engine; raise an ApiError if it refuses one."""
        try:
            await self.state.engine_loop.add(self._requests, self._queue)
        except KvgenError as e:  # e.g. more blocks than the whole pool holds
            raise ApiError(400, str(e)) from None
        except EngineFailed as e:
            raise ApiError(503, str(e), code="engine_unavailable") from None
        except BaseException:  # cancelled, perhaps after the engine thread took them
            self.close()
            raise
        self.state.metrics.prompt_tokens.inc(sum(len(p) for _, p, _ in self._requests))

    def close(self):
        """Abort the choices still running (a client gone, an error): their blocks are freed
        at the engine thread's next turn."""
        for request_id in self._unfinished:
            self.state.engine_loop.abort(request_id)
        self._unfinished = set()

    async def deltas(self) -> AsyncIterator[Delta]:
        """Yield each choice's progress as the engine makes it, until every choice finished."""
        metrics = self.state.metrics
        while self._unfinished:
            out = await self._queue.get()
            if isinstance(out, EngineFailed):
                self._unfinished = set()
                raise ApiError(503, str(out), code="engine_unavailable")
            request_id, now = out.request_id, time.perf_counter()
            if out.token_ids:
                last = self._last_token_at.get(request_id)
                if last is None:
                    metrics.ttft.observe(now - self.arrival)
                else:
                    metrics.itl.observe(now - last)
                self._last_token_at[request_id] = now
            self.completion_tokens += len(out.token_ids)
            if out.finished:
                self._unfinished.discard(request_id)
            logprobs = None
            reader = self._readers.get(request_id)
            if reader is not None and out.logits is not None:
                logprobs = [reader.read(row, t) for row, t in zip(out.logits, out.token_ids)]
            yield Delta(self._index[request_id], out.text, out.token_ids, logprobs,
                        out.finish_reason)

    async def collect(self) -> list[Choice]:
        """Return every choice whole, once all have finished."""
        logprobs = self.sampling.logprobs is not None
        choices = [Choice(i, logprobs=[] if logprobs else None) for i in range(len(self._index))]
        async for d in self.deltas():
            c = choices[d.index]
            c.text += d.text
            c.token_ids += d.token_ids
            if d.logprobs is not None:
                c.logprobs += d.logprobs
            c.finish_reason = d.finish_reason or c.finish_reason
        return choices
