"""The generation loop: prefill, then one decode step per token, for a batch of prompts.

Prompts of different lengths are left-padded to the longest, so every row writes its k-th new
token into the same cache slot. Padding is hidden by the attention mask, and each row's positions
count from its own first real token, so a row computes exactly what it would compute alone.
"""

import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from .cache import KVCache, SlidingWindowCache
from .model import Transformer, attention_mask
from .sampling import Sampler

PAD_ID = 0  # any valid id: padded slots are masked out and their outputs never read


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # the forward pass over the prompts
    ttft_s: float = 0.0  # from the start to the first sampled token
    decode_s: float = 0.0  # from the first sampled token to the last
    kv_cache_bytes: int = 0
    rows_with_output: int = 0  # rows that got a first token, which is not a decode step

    @property
    def decode_tokens_per_s(self) -> float:
        """Return tokens per second of the decode phase (first tokens excluded)."""
        decoded = self.new_tokens - self.rows_with_output
        return decoded / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        """Return the one-line stats summary the CLI prints."""
        return (f"prompt tokens {self.prompt_tokens} | new tokens {self.new_tokens} | "
                f"prefill {self.prefill_s * 1e3:.1f} ms | time to first token "
                f"{self.ttft_s * 1e3:.1f} ms | decode {self.decode_tokens_per_s:.1f} tokens/s | "
                f"KV cache {self.kv_cache_bytes} bytes")


class TextStream:
    """The generated text of one row, released as it becomes final and cut at a stop string.

    Text that could be the start of a stop string is held back until it is clearly not one,
    so a streaming reader never sees part of a stop string.
    """

    def __init__(self, detokenizer, stop: list[str]):
        self.detokenizer = detokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # released so far
        self.pending = ""  # decoded but held back
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Return the text released by one more token ('' while held back or nothing new)."""
        self.pending += self.detokenizer.add(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """Return whatever text is still held, at the end of generation."""
        self.pending += self.detokenizer.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            # A stop string may straddle released and pending text; released text never holds
            # a whole one, so searching from `hold` characters back is enough.
            combined = self.text + self.pending
            search_from = max(0, len(self.text) - self.hold)
            hits = [i for i in (combined.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                out = combined[len(self.text):min(hits)]
                self.text, self.pending, self.stopped = self.text + out, "", True
                return out
        keep = 0 if final else min(self.hold, len(self.pending))
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[
            len(self.pending) - keep:]
        self.text += out
        return out


class StepToken(NamedTuple):
    row: int
    token_id: int
    text: str  # text this token released
    finish_reason: str | None  # "stop", "length", or None while the row goes on


@torch.inference_mode()
def generate_steps(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int,
                   use_cache: bool, samplers: list[Sampler], stop_token_ids: set[int],
                   texts: list[TextStream], stats: GenerationStats,
                   on_logits=None, decode_model=None) -> Iterator[list[StepToken]]:
    """Yield, step by step, the tokens picked for the rows still running.

    A row finishes when it picks a stop token (kept in its ids, but it adds no text), when its
    text reaches a stop string, or after max_new_tokens. The caller has checked that every
    prompt plus max_new_tokens fits the model's context. on_logits, if given, is called with
    each step's logits [batch, vocab] before the tokens are picked. decode_model, if given,
    runs the cached decode steps in the model's place: the same model, compiled.
    """
    device = model.embed.weight.device
    decode_model = model if decode_model is None else decode_model
    batch, longest = len(prompts), max(len(p) for p in prompts)
    stats.prompt_tokens = sum(len(p) for p in prompts)
    if max_new_tokens == 0:
        return

    pad = torch.tensor([longest - len(p) for p in prompts], device=device)  # [batch]
    tokens = torch.tensor([[PAD_ID] * (longest - len(p)) + p for p in prompts], device=device)
    window = model.cfg.sliding_window
    # Decode steps need no mask when every query may see every key the cache returns.
    decode_needs_mask = bool(pad.any()) or window is not None
    cache = None
    if use_cache:
        # The last new token is never fed back, so it needs no slot.
        cache = new_cache(model.cfg, batch, longest + max_new_tokens - 1,
                          model.embed.weight.dtype, device)
        stats.kv_cache_bytes = cache.nbytes

    start = time.perf_counter()
    positions = (torch.arange(longest, device=device)[None] - pad[:, None]).clamp(min=0)
    key_slots = cache.key_slots(0, longest) if cache is not None else None
    # Without padding or a window the prefill's rule is plain causal: no mask tensor needed.
    causal = not bool(pad.any()) and window is None
    mask = None if causal else attention_mask(pad, 0, longest, key_slots, window)
    logits = model(tokens, positions, mask, cache, 0, last_only=True, causal=causal)
    stats.prefill_s = time.perf_counter() - start

    running = list(range(batch))
    for step in range(max_new_tokens):
        if on_logits is not None:
            on_logits(logits[:, -1])
        next_ids = _pick(logits[:, -1], samplers)
        if step == 0:
            stats.ttft_s = time.perf_counter() - start
            stats.rows_with_output = batch
            decode_start = time.perf_counter()

        out = []
        for row in running:
            token_id = next_ids[row]
            if token_id in stop_token_ids:
                out.append(StepToken(row, token_id, texts[row].finish(), "stop"))
                continue
            text = texts[row].add(token_id)
            if texts[row].stopped:
                out.append(StepToken(row, token_id, text, "stop"))
            elif step + 1 == max_new_tokens:
                out.append(StepToken(row, token_id, text + texts[row].finish(), "length"))
            else:
                out.append(StepToken(row, token_id, text, None))
        stats.new_tokens += len(out)
        running = [t.row for t in out if t.finish_reason is None]
        stats.decode_s = time.perf_counter() - decode_start
        yield out
        if not running:
            break

        # Feed the picked tokens back. Finished rows ride along (their outputs are ignored):
        # dropping rows from a batch would mean copying the cache.
        fed = torch.tensor(next_ids, device=device)[:, None]  # [batch, 1]
        if use_cache:
            slot = longest + step
            mask = (attention_mask(pad, slot, 1, cache.key_slots(slot, 1), window)
                    if decode_needs_mask else None)
            logits = decode_model(fed, slot - pad[:, None], mask, cache, slot, last_only=True)
        else:
            tokens = torch.cat([tokens, fed], dim=1)
            length = tokens.shape[1]
            positions = (torch.arange(length, device=device)[None] - pad[:, None]).clamp(min=0)
            mask = None if causal else attention_mask(pad, 0, length, None, window)
            logits = model(tokens, positions, mask, last_only=True, causal=causal)


def new_cache(cfg, batch: int, slots: int, dtype, device):
    """Return an empty cache for `slots` tokens per row: a ring of the window's size when the
    model attends through a sliding window shorter than that, else a contiguous cache."""
    shape = dict(n_layers=cfg.n_layers, batch=batch, n_kv_heads=cfg.n_kv_heads,
                 head_dim=cfg.head_dim, dtype=dtype, device=device)
    if cfg.sliding_window is not None and cfg.sliding_window < slots:
        return SlidingWindowCache(window=cfg.sliding_window, **shape)
    return KVCache(max_len=slots, **shape)


def _pick(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """Return one token id per row of logits [batch, vocab]."""
    if all(s.params.greedy for s in samplers):
        return logits.argmax(-1).tolist()
    return [sampler(row_logits) for sampler, row_logits in zip(samplers, logits)]
