"""The paged-attention kernel against PyTorch's attention over the same keys gathered by hand."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from kvgen import paged_attention
from kvgen.model import attention_mask

needs_kernel = pytest.mark.skipif(
    not paged_attention.supports(torch.float32, "cpu", 64, 16),
    reason="the paged-attention kernel cannot be built here (no C compiler)")


def test_kernel_builds_where_a_compiler_is():
    if shutil.which("cc") or shutil.which("gcc"):
        assert paged_attention._kernel() is not None


@needs_kernel
@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim,block_size",
                         [(12, 12, 64, 16), (8, 4, 8, 4), (6, 2, 48, 3), (4, 1, 32, 1)])
def test_kernel_equals_sdpa_on_the_gathered_keys(n_heads, n_kv_heads, head_dim, block_size):
    torch.manual_seed(0)
    num_blocks = 64
    k_pool = torch.randn(n_kv_heads, num_blocks * block_size, head_dim)
    v_pool = torch.randn(n_kv_heads, num_blocks * block_size, head_dim)
    # Sequences of these lengths on shuffled blocks; queries at their last three positions.
    blocks = torch.randperm(num_blocks).tolist()
    tables = []
    for length in [5, 1, 17, 30]:
        n = -(-length // block_size)
        tables.append((length, blocks[:n]))
        blocks = blocks[n:]
    width = max(len(t) for _, t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for _, t in tables], dtype=torch.int32)
    queries = [(i, p) for i, (length, _) in enumerate(tables) for p in range(length)[-3:]]
    token_table = torch.tensor([i for i, _ in queries], dtype=torch.int32)
    n_keys = torch.tensor([p + 1 for _, p in queries], dtype=torch.int32)
    # Queries strided as the model's are: a transposed view of a larger tensor.
    q = torch.randn(n_heads + 3, len(queries), head_dim).transpose(0, 1)[:, :n_heads]

    out = paged_attention.paged_attention(q, k_pool, v_pool, table, token_table, n_keys,
                                          block_size)

    group = n_heads // n_kv_heads
    for j, (i, p) in enumerate(queries):
        t = tables[i][1]
        slots = torch.tensor([t[s // block_size] * block_size + s % block_size
                              for s in range(p + 1)])
        k = k_pool[:, slots].repeat_interleave(group, 0)
        v = v_pool[:, slots].repeat_interleave(group, 0)
        expected = F.scaled_dot_product_attention(q[j][:, None], k, v)[:, 0]
        torch.testing.assert_close(out[j], expected, rtol=1e-5, atol=1e-5)


def test_unsupported_pools_take_the_gather_path():
    assert not paged_attention.supports(torch.float16, "cpu", 64, 16)
    assert not paged_attention.supports(torch.float32, "cpu", 1024, 16)
    assert not paged_attention.supports(torch.float32, "cpu", 64, 4096)


def test_calling_the_kernel_where_it_is_not_built_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(paged_attention, "_kernel", lambda: None)
    with pytest.raises(RuntimeError, match="not built here"):
        paged_attention.paged_attention(
            torch.zeros(1, 2, 8), torch.zeros(2, 4, 8), torch.zeros(2, 4, 8),
            torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), 4)



@needs_kernel
@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim,slots,n_keys",
                         [(12, 12, 64, 40, 40), (8, 2, 16, 37, 20), (4, 1, 8, 2048, 1500),
                          (6, 3, 32, 1, 1)])
def test_decode_attention_equals_sdpa_on_a_contiguous_cache(n_heads, n_kv_heads, head_dim,
                                                            slots, n_keys):
    torch.manual_seed(0)
    batch = 3
    cache_k = torch.randn(batch, n_kv_heads, slots, head_dim)
    cache_v = torch.randn(batch, n_kv_heads, slots, head_dim)
    k, v = cache_k[:, :, :n_keys], cache_v[:, :, :n_keys]  # as KVCache.update returns them
    # Queries strided as the model's: heads of a transposed fused projection.
    q = torch.randn(batch, 1, n_heads + 2 * n_kv_heads, head_dim).transpose(1, 2)[:, :n_heads]

    with torch.inference_mode():
        out = paged_attention.decode_attention(q, k, v)
        expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)[:, :, 0]

    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (6, 2)])
def test_decode_attention_takes_left_padding(n_heads, n_kv_heads):
    """Rows whose first keys are padding: the kernel starts each row at its first real key."""
    torch.manual_seed(1)
    head_dim, slots, n_keys = 16, 50, 37
    pad = torch.tensor([0, 5, 36, 16])  # 36: only the query's own key is visible
    cache_k = torch.randn(len(pad), n_kv_heads, slots, head_dim)
    cache_v = torch.randn(len(pad), n_kv_heads, slots, head_dim)
    k, v = cache_k[:, :, :n_keys], cache_v[:, :, :n_keys]
    q = torch.randn(len(pad), n_heads, 1, head_dim)
    mask = attention_mask(pad, n_keys - 1, 1)  # [b, 1, 1, n_keys], as generate builds it

    with torch.inference_mode():
        out = paged_attention.decode_attention(q, k, v, mask)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  enable_gqa=True)[:, :, 0]

    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_declines_what_the_kernel_does_not_take():
    q = torch.randn(2, 4, 1, 8)
    k = v = torch.randn(2, 4, 10, 8)
    with torch.inference_mode():
        assert paged_attention.decode_attention(q.half(), k.half(), v.half()) is None
        assert paged_attention.decode_attention(torch.randn(2, 4, 2, 8), k, v) is None  # 2 queries
        assert paged_attention.decode_attention(q, k[:, :, ::2], v[:, :, ::2]) is None  # strided
        # Slots per row without a power-of-two factor of 64 past the kernel's longest block.
        odd = torch.randn(2, 4, 1025, 8)
        assert paged_attention.decode_attention(q, odd, odd) is None
    assert paged_attention.decode_attention(q, k, v) is None  # autograd on: no backward in C
    with torch.inference_mode():
        holes = torch.ones(2, 1, 1, 10, dtype=torch.bool)
        holes[1, 0, 0, 4] = False  # a hidden key after a visible one: not left padding
        assert paged_attention.decode_attention(q, k, v, holes) is None
        assert paged_attention.decode_attention(q, k, v, holes[:1]) is None  # broadcasts
