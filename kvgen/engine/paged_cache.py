"""The paged KV cache: one preallocated pool of blocks for all requests, read through block tables.

Slot s of the pool is token s % block_size of block s // block_size. A sequence's keys are
wherever its block table says, so requests of any length share the pool without reserving
their maximum length up front.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import paged_attention
from ..cache import allocate
from ..config import ModelConfig
from ..errors import KvgenError
from ..hardware import parse_bytes


def parse_memory(value) -> int:
    """Return a byte count from an int or a string such as "2GiB", "512MB" or "1000000"."""
    return parse_bytes(value, "kv_cache_memory")


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Return one block's bytes: 2 (K and V) x layers x kv heads x head_dim x block_size x
    bytes per element."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * block_size * element


# With neither num_blocks nor kv_cache_memory: this much, or less when max_num_seqs requests
# at the model's full context need less.
DEFAULT_KV_CACHE_MEMORY = 2**30


def pool_blocks(cfg: ModelConfig, block_size: int, dtype: torch.dtype, *, num_blocks=None,
                kv_cache_memory=None, max_num_seqs: int = 256) -> int:
    """Return the pool's block count: num_blocks, or as many as kv_cache_memory holds."""
    per_block = bytes_per_block(cfg, block_size, dtype)
    if num_blocks is not None and kv_cache_memory is not None:
        raise KvgenError("give num_blocks or kv_cache_memory, not both")
    if num_blocks is None:
        if kv_cache_memory is None:
            full = max_num_seqs * -(-cfg.max_seq_len // block_size) * per_block
            kv_cache_memory = min(DEFAULT_KV_CACHE_MEMORY, full)
        num_blocks = parse_memory(kv_cache_memory) // per_block
        if num_blocks == 0:
            raise KvgenError(f"kv_cache_memory {kv_cache_memory!r} holds no block; one block "
                             f"of {block_size} tokens takes {per_block} bytes")
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks <= 0:
        raise KvgenError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    return num_blocks


class PagedKVCache:
    """Keys and values of every layer for num_blocks blocks of block_size tokens."""

    def __init__(self, cfg: ModelConfig, *, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device):
        # Head-major, so that keys gathered by slot land as [kv_heads, keys, head_dim]: each
        # head's keys contiguous, which attention reads faster than heads interleaved.
        shape = (cfg.n_layers, cfg.n_kv_heads, num_blocks * block_size, cfg.head_dim)
        # Zeros, not empty: padding keys read from unused slots are masked, but a NaN in masked
        # values would still reach the output through the attention weights' zeros.
        self.k = allocate(shape, dtype, device)  # [layers, kv_heads, slots, hd]
        self.v = allocate(shape, dtype, device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self._scratch = torch.empty(0, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def scratch(self, n: int) -> torch.Tensor:
        """Return a reusable buffer of n elements for gathered keys and values.

        Kept between steps because a fresh large allocation costs more than the gather itself
        (page faults on CPU); each layer's gather overwrites the previous layer's, whose
        attention is done by then.
        """
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=self.k.dtype, device=self.k.device)
        return self._scratch[:n]


class PromptPiece(NamedTuple):
    """Consecutive tokens of one sequence's prompt in a PagedInPlaceView's row."""
    offset: int  # where they sit in the row
    count: int
    start: int  # position of the first; 0 for a prompt with nothing cached
    key_slots: torch.Tensor | None  # [start + count] pool slots of positions 0.., if start > 0
    mask: torch.Tensor | None  # [count, start + count], True where a query sees a key


class PagedInPlaceView:
    """The cache as one forward pass of the engine sees it, attention read in place.

    The pass is one row of tokens [1, n_tokens], every sequence's tokens side by side, no
    padding. The first n_decode are single tokens (decode steps, mostly): token i attends to
    keys 0..n_keys[i]-1 of the sequence whose block table is tables[token_table[i]], read by
    the paged-attention kernel where they lie in the pool. The rest are prompt pieces, where
    many queries share one sequence's keys: PyTorch's attention does those faster (it tiles
    queries against keys), on the piece's own keys when nothing came before it, else on its
    sequence's keys gathered from the pool.
    """

    attends_in_place = True

    def __init__(self, cache: PagedKVCache, write_slots: torch.Tensor, tables: torch.Tensor,
                 token_table: torch.Tensor, n_keys: torch.Tensor, prompts: list[PromptPiece]):
        self.cache, self.write_slots = cache, write_slots
        self.tables, self.token_table, self.n_keys = tables, token_table, n_keys
        self.n_decode = len(n_keys)
        self.prompts = prompts

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Return attention outputs [1, n_tokens, n_heads * head_dim] after writing k, v
        ([1, n_kv_heads, n_tokens, head_dim]) to their slots; q is [1, n_heads, n_tokens,
        head_dim].
        """
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        k_pool.index_copy_(1, self.write_slots, k[0])
        v_pool.index_copy_(1, self.write_slots, v[0])
        _, n_heads, n_tokens, head_dim = q.shape
        out = torch.empty(n_tokens, n_heads, head_dim, dtype=q.dtype, device=q.device)

        if self.n_decode:
            paged_attention.paged_attention(
                q[0, :, :self.n_decode].transpose(0, 1), k_pool, v_pool, self.tables,
                self.token_table, self.n_keys, self.cache.block_size, out=out[:self.n_decode])

        gqa = k.shape[1] != n_heads
        for p in self.prompts:
            span = slice(p.offset, p.offset + p.count)
            if p.start == 0:  # its keys are exactly its own tokens'
                piece = F.scaled_dot_product_attention(
                    q[:, :, span], k[:, :, span], v[:, :, span], is_causal=True,
                    enable_gqa=gqa)
            else:
                keys = k_pool.index_select(1, p.key_slots)[None]
                values = v_pool.index_select(1, p.key_slots)[None]
                piece = F.scaled_dot_product_attention(q[:, :, span], keys, values,
                                                       attn_mask=p.mask, enable_gqa=gqa)
            out[span] = piece[0].transpose(0, 1)
        return out.view(1, n_tokens, n_heads * head_dim)


class PagedBatchView:
    """The cache as one forward pass of the engine sees it (duck-typed like KVCache), read
    through a gathered copy: the path where the paged-attention kernel cannot run (no C
    compiler, a dtype other than fp32, a GPU).

    Each layer copies every row's keys and values out of the pool and pads rows to the
    longest; on the GPT-2-shaped serving benchmark (benchmarks/engine_bench.py, about 30
    running requests of a few hundred tokens) that copy and the attention over it took over
    half of a decode step, which is why PagedInPlaceView exists.

    write_rows [n] picks, from the batch's flattened [rows * t] tokens, those that are real
    (None: all are); write_slots [n] is the pool slot of each. key_slots [rows, n_keys] is the
    pool slot of each key a row attends to, padded with any valid slot where the row has fewer
    keys (the mask hides those). All are built once per step and reused by every layer.
    """

    def __init__(self, cache: PagedKVCache, write_rows: torch.Tensor | None,
                 write_slots: torch.Tensor, key_slots: torch.Tensor):
        self.cache = cache
        self.write_rows, self.write_slots = write_rows, write_slots
        self.rows, self.n_keys = key_slots.shape
        self.key_slots = key_slots.flatten()

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write the real tokens of k, v ([rows, kv_heads, t, head_dim]) to their slots and
        return every row's keys and values [rows, kv_heads, n_keys, head_dim].

        `start` is unused: each row's positions are in the slots. All rows are written before
        any is read, so a prompt split over several rows sees its own earlier rows' keys.
        """
        rows, heads, t, head_dim = k.shape
        size = heads * rows * self.n_keys * head_dim
        buffer = self.cache.scratch(2 * size)
        out = []
        for i, (pool, new) in enumerate(((self.cache.k[layer], k), (self.cache.v[layer], v))):
            new = new.transpose(0, 1).reshape(heads, rows * t, head_dim)
            if self.write_rows is not None:
                new = new.index_select(1, self.write_rows)
            pool.index_copy_(1, self.write_slots, new)
            gathered = buffer[i * size:(i + 1) * size].view(heads, rows * self.n_keys, head_dim)
            torch.index_select(pool, 1, self.key_slots, out=gathered)
            out.append(gathered.view(heads, rows, self.n_keys, head_dim).transpose(0, 1))
        return out[0], out[1]
