"""The serving engine: requests added at any time, one mixed batch per step, one paged cache.

A step reads schedule -> run -> postprocess: the scheduler picks each sequence's next tokens
(a prompt chunk, a recomputation, or one decode token), the runner feeds them all to the model
in one forward pass, and each sequence that reached its last token samples the next one with
its own sampler, exactly as llm.generate would for that prompt alone.
"""

import logging
from typing import Iterator

from ..errors import KvgenError
from ..generate import TextStream
from ..llm import LLM, GenerationResult, check_stop
from ..sampling import Sampler, SamplingParams
from .block_pool import BlockPool
from .drive import generate_all, stream_request
from .outputs import EngineStats, RequestOutput
from .paged_cache import PagedKVCache, pool_blocks
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence, Status

log = logging.getLogger(__name__)


def _positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise KvgenError(f"{name} must be a positive integer, got {value!r}")
    return value


class Engine:
    """Serves many requests at once from one pool of KV-cache blocks (not thread-safe: call it
    from one thread)."""

    def __init__(self, llm: LLM, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory=None, enable_prefix_caching: bool = True,
                 max_prefill_tokens: int | None = None, max_num_seqs: int = 256):
        cfg = llm.config
        if cfg.sliding_window is not None:
            # The pool keeps every position; a window would need the mask and the prefix
            # cache to forget keys behind it. Not done yet: such models use llm.generate.
            raise KvgenError(f"the engine does not support sliding-window attention yet (this "
                             f"model's window is {cfg.sliding_window}); use llm.generate")
        self.llm = llm
        block_size = _positive_int("block_size", block_size)
        if block_size > cfg.max_seq_len:
            raise KvgenError(f"block_size {block_size} is longer than the model's context "
                             f"({cfg.max_seq_len} tokens): no sequence could fill one block")
        _positive_int("max_prefill_tokens", max_prefill_tokens, allow_none=True)
        _positive_int("max_num_seqs", max_num_seqs)
        dtype = llm.model.embed.weight.dtype
        num_blocks = pool_blocks(cfg, block_size, dtype, num_blocks=num_blocks,
                                 kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs)

        self.cache = PagedKVCache(cfg, num_blocks=num_blocks, block_size=block_size,
                                  dtype=dtype, device=llm.device)
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, max_prefill_tokens=max_prefill_tokens,
                                   max_num_seqs=max_num_seqs)
        self.runner = ModelRunner(llm.model, self.cache)
        self._requests: dict[object, Sequence] = {}
        self._ready: list[Sequence] = []  # finished before any step (max_new_tokens=0)
        self._next_id = 0
        self._counts = dict(finished=0, computed_tokens=0, generated_tokens=0, steps=0)
        log.info("engine: %d blocks of %d tokens, %d bytes of KV cache", num_blocks,
                 block_size, self.cache.nbytes)

    def add_request(self, prompt, *, max_new_tokens: int = 128, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None,
                    use_cache: bool = True, return_logits: bool = False, request_id=None,
                    callback=None):
        """Return the id of a new request for prompt (text or token ids).

        The keywords are llm.generate's; callback, if given, is called with each of the
        request's RequestOutputs as step() makes it.
        """
        if not use_cache:
            raise KvgenError("use_cache=False is not an engine option: the engine always runs "
                             "on its paged cache (llm.generate runs without one)")
        prompt_ids = self.llm.encode_prompts(prompt)
        if len(prompt_ids) != 1:
            raise KvgenError(f"add_request takes one prompt, got {len(prompt_ids)}")
        prompt_ids = prompt_ids[0]
        self.llm.check_lengths([prompt_ids], max_new_tokens)
        stop = check_stop(stop)
        if stop and self.llm.tokenizer is None:
            raise KvgenError("stop strings need a tokenizer; this model was loaded without one")
        # The last new token is never fed back, so it needs no slot.
        slots = len(prompt_ids) + max(max_new_tokens - 1, 0)
        needed = -(-slots // self.pool.block_size)
        if needed > self.pool.num_blocks:
            raise KvgenError(
                f"request needs {needed} blocks ({len(prompt_ids)} prompt tokens + "
                f"max_new_tokens {max_new_tokens}) but the whole pool has "
                f"{self.pool.num_blocks} blocks of {self.pool.block_size} tokens")
        if request_id is None:
            while self._next_id in self._requests:  # taken by a caller's own id
                self._next_id += 1
            request_id, self._next_id = self._next_id, self._next_id + 1
        elif request_id in self._requests:
            raise KvgenError(f"request_id {request_id!r} is already in use")

        params = SamplingParams(temperature, top_k, top_p, seed)
        seq = Sequence(request_id, prompt_ids, max_new_tokens=max_new_tokens,
                       sampler=Sampler(params, self.llm.device),
                       text=TextStream(self.llm.detokenizer(prompt_ids), stop),
                       stop_token_ids=self.llm.stop_token_ids, return_logits=return_logits,
                       callback=callback)
        if max_new_tokens == 0:
            seq.status, seq.finish_reason = Status.FINISHED, "length"
            self._ready.append(seq)
        else:
            self._requests[request_id] = seq
            self.scheduler.add(seq)
        return request_id

    def step(self) -> list[RequestOutput]:
        """Run one step; return an output for each request that advanced or finished."""
        batch = self.scheduler.schedule()
        logits = self.runner.run(batch) if batch else None
        return self._postprocess(batch, logits)

    def _postprocess(self, batch, logits) -> list[RequestOutput]:
        outputs = []
        for seq in self._ready:
            outputs.append(self._emit(seq, RequestOutput(seq.request_id, [], "", True, "length")))
        self._ready = []
        if batch:
            self._counts["steps"] += 1
            greedy = logits.argmax(-1).tolist()  # one sync for every greedy row
        for i, (seq, n) in enumerate(batch):
            if seq.status is not Status.RUNNING:  # aborted by a callback earlier in this loop
                continue
            seq.num_computed += n
            self._counts["computed_tokens"] += n
            self.pool.cache_full_blocks(seq)
            if seq.num_uncomputed:  # a prompt chunk short of the end: nothing to sample yet
                continue
            token = greedy[i] if seq.sampler.params.greedy else seq.sample(logits[i])
            text, reason = seq.add_token(token)
            self._counts["generated_tokens"] += 1
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
                del self._requests[seq.request_id]
            outputs.append(self._emit(seq, RequestOutput(
                seq.request_id, [token], text, reason is not None, reason, seq.num_cached_tokens,
                logits[i:i + 1].float().cpu() if seq.return_logits else None)))
        return outputs

    def _emit(self, seq: Sequence, out: RequestOutput) -> RequestOutput:
        if out.finished:
            self._counts["finished"] += 1
        if seq.callback is not None:
            seq.callback(out)
        return out

    def abort(self, request_id) -> bool:
        """Drop a request wherever it is, freeing its blocks; return whether it was unfinished."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(seq)
        return True

    def stream(self, prompt, **sampling) -> Iterator[str]:
        """Yield one new request's text piece by piece, stepping the engine meanwhile.

        Other requests advance in the same steps; their outputs reach only their callbacks.
        Closing the generator early aborts the request.
        """
        return stream_request(self, prompt, **sampling)

    def generate(self, prompts, *, progress: bool = False, **sampling) -> list[GenerationResult]:
        """Return one GenerationResult per prompt, all served by this engine together.

        prompts: as for llm.generate, or dicts holding "prompt" and per-request keywords.
        progress shows a progress bar (requests done, generated tokens per second).
        """
        return generate_all(self, prompts, progress=progress, **sampling)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._ready)

    def stats(self) -> EngineStats:
        """Return the engine's counters now."""
        pool = self.pool
        return EngineStats(
            num_blocks=pool.num_blocks, block_size=pool.block_size, free_blocks=pool.num_free,
            used_blocks=pool.num_blocks - pool.num_free, cached_blocks=len(pool.cached),
            prefix_cache_queried_tokens=pool.queried_tokens,
            prefix_cache_hit_tokens=pool.hit_tokens, preemptions=self.scheduler.num_preemptions,
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_cache_bytes=self.cache.nbytes, **self._counts)
