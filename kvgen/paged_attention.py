"""Attention that reads keys and values in place from the block pool: the C kernel in
kvgen/csrc/paged_attention.c (built by kvgen.native), called through ctypes.

Where it cannot run (no C compiler, a pool that is not fp32 on the CPU) the engine falls back
to gathering each row's keys into a contiguous copy (PagedBatchView).

The contiguous cache (kvgen/cache.py) is the same layout with one block per row, as long as
the row: `decode_attention` runs its decode steps through the kernel too.
"""

import functools
import math

import torch

from . import native

_MAX_HEAD_DIM, _MAX_BLOCK = 512, 1024  # the C file's fixed buffers


@functools.cache
def _kernel():
    """Return the kernel's ctypes function, or None where it cannot be built here."""
    P, I, I64 = native.POINTER, native.INT, native.INT64
    return native.function("paged_attention", "kvgen_paged_attention",
                           (P, I64, I64, P, P, I64, P, I, P, P, P, P, I64, I, I, I, I,
                            native.FLOAT), native.INT)


def supports(dtype: torch.dtype, device, head_dim: int, block_size: int) -> bool:
    """Return whether the kernel takes this pool (and can be built here)."""
    return (dtype == torch.float32 and torch.device(device).type == "cpu"
            and head_dim <= _MAX_HEAD_DIM and block_size <= _MAX_BLOCK
            and _kernel() is not None)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    tables: torch.Tensor, token_table: torch.Tensor, n_keys: torch.Tensor,
                    block_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return attention outputs [n_tokens, n_heads, head_dim] for queries q [n_tokens, n_heads,
    head_dim] (any strides but the last), each token attending to keys 0..n_keys-1 of its
    sequence, whose blocks are tables[token_table[token]].

    k_pool, v_pool: one layer's pool [n_kv_heads, n_slots, head_dim], contiguous. tables,
    token_table and n_keys are int32 and contiguous. The scale is 1/sqrt(head_dim), as
    scaled_dot_product_attention's. out, if given, is written instead of a new tensor
    (contiguous, of the result's shape).
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads, n_slots, _ = k_pool.shape
    if out is None:
        out = torch.empty(n_tokens, n_heads, head_dim, dtype=q.dtype, device=q.device)
    # The kernel trusts these: a wrong stride or dtype would read the wrong memory.
    assert q.dtype == k_pool.dtype == v_pool.dtype == out.dtype == torch.float32
    assert q.stride(2) == 1 and k_pool.is_contiguous() and v_pool.is_contiguous()
    assert out.shape == q.shape and out.is_contiguous() and v_pool.shape == k_pool.shape
    assert tables.dtype == token_table.dtype == n_keys.dtype == torch.int32
    assert tables.is_contiguous() and token_table.is_contiguous() and n_keys.is_contiguous()
    assert len(token_table) == len(n_keys) == n_tokens and n_heads % n_kv_heads == 0

    _call(q, k_pool, v_pool, n_slots, tables, token_table, n_keys, out, n_kv_heads, block_size)
    return out


def _call(q, k, v, n_slots, tables, token_table, n_keys, out, n_kv_heads, block_size,
          first_key=None):
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the paged-attention kernel is not built here (no working C "
                           "compiler; see kvgen.native's warning): use the gathered-copy path")
    n_tokens, n_heads, head_dim = out.shape
    status = kernel(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(),
                    n_slots, tables.data_ptr(), tables.shape[1], token_table.data_ptr(),
                    n_keys.data_ptr(), None if first_key is None else first_key.data_ptr(),
                    out.data_ptr(), n_tokens, n_heads, n_kv_heads, head_dim, block_size,
                    head_dim ** -0.5)
    if status != 0:
        raise ValueError(f"paged attention kernel refused head_dim {head_dim} or block_size "
                         f"{block_size} (at most {_MAX_HEAD_DIM} and {_MAX_BLOCK})")


use_for_decode = True  # a switch for comparing routes (and for counting FLOPs through aten)


def _cache_block_size(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int | None:
    """Return the block size that reads the cache views k, v as a pool, or None where the
    kernel does not take these tensors (then scaled_dot_product_attention does)."""
    b, n_heads, t, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if (t != 1 or q.dtype != torch.float32 or q.device.type != "cpu" or k.shape != v.shape
            or k.dtype != q.dtype or v.dtype != q.dtype or torch.is_grad_enabled()
            or torch.compiler.is_compiling()  # ctypes calls do not trace; SDPA does
            or q.stride(3) != 1 or head_dim > _MAX_HEAD_DIM or n_heads % n_kv_heads):
        return None
    # Each row's kv heads must lie one after another, each head's slots in one run.
    row_stride = k.stride(1)  # slots_per_row * head_dim
    if (k.stride() != v.stride() or k.stride(3) != 1 or k.stride(2) != head_dim
            or k.stride(0) != n_kv_heads * row_stride or row_stride % head_dim):
        return None
    slots_per_row = row_stride // head_dim
    if slots_per_row <= _MAX_BLOCK:
        return slots_per_row
    # A row longer than the kernel's score buffer is cut into blocks that divide it; an odd
    # length would make blocks of one key, slower than PyTorch's kernel.
    block_size = math.gcd(slots_per_row, _MAX_BLOCK)
    return block_size if block_size >= 64 else None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Return attention outputs [b, n_heads, head_dim] of one query per row, q [b, n_heads, 1,
    head_dim], over the keys and values of its row, k and v [b, n_kv_heads, n_keys, head_dim]
    (views of a contiguous cache's slots); or None where the kernel does not take them.

    What scaled_dot_product_attention(q, k, v, mask, enable_gqa=True) gives, without copying
    k and v: on GPT-2's shape at batch 16 the cache streams at twice the rate. mask [b, 1, 1,
    n_keys], if given, must hide only a run of keys at the start of each row (left padding, a
    window behind the query); other masks get None.
    """
    block_size = _cache_block_size(q, k, v) if use_for_decode else None
    if block_size is None or _kernel() is None:
        return None
    first_key = None if mask is None else _first_visible_key(mask, q.shape[0], k.shape[2])
    if mask is not None and first_key is None:
        return None

    b, n_heads, _, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    slots_per_row = k.stride(1) // head_dim
    # The pool starts at row 0 and its kv-head stride is one row's slots; row r's blocks are
    # the ones its kv head 0 starts at, numbered in block_size units.
    tables, token_table, key_counts = _row_tables(b, n_kv_heads, slots_per_row, block_size,
                                                  n_keys)
    out = torch.empty(b, n_heads, head_dim, dtype=q.dtype)
    _call(q[:, :, 0], k, v, slots_per_row, tables, token_table, key_counts, out, n_kv_heads,
          block_size, first_key)
    return out


# Every layer of a decode step gets the same mask tensor: its first visible keys are worked
# out once. Holding the mask keeps its id from being reused by another tensor.
_last_mask: tuple = (None, None)  # (mask, what _first_visible_key returned for it)


def _first_visible_key(mask: torch.Tensor, b: int, n_keys: int) -> torch.Tensor | None:
    """Return each row's first visible key (int32 [b]) for a mask [b, 1, 1, n_keys] that shows
    every key from there on, or None for any other mask (one that broadcasts, too: the kernel
    reads b entries)."""
    global _last_mask
    if _last_mask[0] is mask:
        return _last_mask[1]

    first_key = None
    if mask.dtype == torch.bool and mask.shape == (b, 1, 1, n_keys):
        visible = mask[:, 0, 0]
        count_from = n_keys - visible.sum(-1, dtype=torch.int32)
        # A suffix exactly when the first visible key (argmax: the first True) is there.
        if bool((visible.to(torch.uint8).argmax(-1) == count_from).all()):
            first_key = count_from
    _last_mask = (mask, first_key)
    return first_key


@functools.lru_cache(maxsize=8)  # the same for every layer of a decode step
def _row_tables(b: int, n_kv_heads: int, slots_per_row: int, block_size: int, n_keys: int):
    width = -(-n_keys // block_size)
    first_block = torch.arange(b, dtype=torch.int32)[:, None] * (n_kv_heads * slots_per_row
                                                                 // block_size)
    tables = (first_block + torch.arange(width, dtype=torch.int32)).contiguous()
    token_table = torch.arange(b, dtype=torch.int32)
    return tables, token_table, torch.full((b,), n_keys, dtype=torch.int32)
