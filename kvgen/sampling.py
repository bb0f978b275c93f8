"""Choosing the next token from logits: greedy, temperature, top-k and top-p."""

import math
from dataclasses import dataclass

import torch

from .errors import KvgenError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise KvgenError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise KvgenError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise KvgenError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int)
                                      or isinstance(self.seed, bool)):
            raise KvgenError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Return logits [vocab] scaled by temperature with tokens outside top-k / top-p set to -inf.

    At least one token (the most probable) always survives both cuts.
    """
    logits = logits.float() / params.temperature

    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)

    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass of the
        # tokens before it is still short of top_p. The first token always stays.
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, -math.inf)
    return logits


class Sampler:
    """Picks tokens for one sequence; its own seeded generator makes a run repeatable."""

    def __init__(self, params: SamplingParams, device="cpu"):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """Return the next token id for logits [vocab]."""
        if self.params.greedy:
            return int(torch.argmax(logits))
        probs = filter_logits(logits, self.params).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
