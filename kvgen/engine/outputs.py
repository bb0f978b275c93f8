"""What the engine hands back: per-request step outputs and engine-wide counters."""

from dataclasses import asdict, dataclass

import torch


@dataclass
class RequestOutput:
    request_id: object
    token_ids: list[int]  # ids generated this step (one per step; none for max_new_tokens=0)
    text: str  # text released this step
    finished: bool
    finish_reason: str | None  # "stop", "length", or None while the request goes on
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served at its latest admission
    logits: torch.Tensor | None = None  # [len(token_ids), vocab], with return_logits=True


@dataclass
class EngineStats:
    num_blocks: int
    block_size: int
    free_blocks: int  # blocks no request holds, cached ones included
    used_blocks: int
    cached_blocks: int  # blocks findable by the prefix cache, held or free
    prefix_cache_queried_tokens: int  # tokens of sequences looked up on admission
    prefix_cache_hit_tokens: int  # of those, tokens served from cached blocks
    preemptions: int
    running: int
    waiting: int
    finished: int  # requests finished (aborted ones not counted)
    computed_tokens: int  # tokens fed to the model: prompts, recomputations, decode tokens
    generated_tokens: int
    steps: int
    kv_cache_bytes: int  # the whole preallocated pool

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Return the fraction of looked-up tokens served from the prefix cache."""
        queried = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / queried if queried else 0.0

    def __getitem__(self, name: str):
        # Dictionary-style access too, for callers (the server) that pass stats on as JSON.
        return getattr(self, name)

    def as_dict(self) -> dict:
        return asdict(self) | {"prefix_cache_hit_rate": self.prefix_cache_hit_rate}
