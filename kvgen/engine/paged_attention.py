"""Attention that reads keys and values in place from the block pool: the C kernel in
kvgen/csrc/paged_attention.c (built by kvgen.native), called through ctypes.

Where it cannot run (no C compiler, a pool that is not fp32 on the CPU) the engine falls back
to gathering each row's keys into a contiguous copy (PagedBatchView).
"""

import functools

import torch

from .. import native

_MAX_HEAD_DIM, _MAX_BLOCK = 512, 1024  # the C file's fixed buffers


@functools.cache
def _kernel():
    """Return the kernel's ctypes function, or None where it cannot be built here."""
    P, I, I64 = native.POINTER, native.INT, native.INT64
    return native.function("paged_attention", "kvgen_paged_attention",
                           (P, I64, I64, P, P, I64, P, I, P, P, P, I64, I, I, I, I,
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

    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the paged-attention kernel is not built here (no working C "
                           "compiler; see kvgen.native's warning): use the gathered-copy path")
    status = kernel(q.data_ptr(), q.stride(0), q.stride(1), k_pool.data_ptr(), v_pool.data_ptr(),
                    n_slots, tables.data_ptr(), tables.shape[1], token_table.data_ptr(),
                    n_keys.data_ptr(), out.data_ptr(), n_tokens, n_heads, n_kv_heads, head_dim,
                    block_size, head_dim ** -0.5)
    if status != 0:
        raise ValueError(f"paged attention kernel refused head_dim {head_dim} or block_size "
                         f"{block_size} (at most {_MAX_HEAD_DIM} and {_MAX_BLOCK})")
    return out
