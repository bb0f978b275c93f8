"""The KV cache: same logits as recomputing, batching by left padding, chunked prefill, size."""

import pytest
import torch

from kvgen.cache import KVCache
from kvgen.model import attention_mask


def _prompts(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def test_cached_and_uncached_logits_agree_one_prompt(stories_llm):
    kw = dict(max_new_tokens=40, temperature=0, return_logits=True)
    cached = stories_llm.generate("Once upon a time", **kw)[0]
    uncached = stories_llm.generate("Once upon a time", use_cache=False, **kw)[0]

    assert cached.token_ids == uncached.token_ids
    assert (cached.logits - uncached.logits).abs().max() < 1e-4


def test_batch_of_different_lengths(stories_llm):
    """Rows of lengths 1, 7 and 33, padded on the left, each equal the prompt run alone."""
    prompts = _prompts([1, 7, 33])
    kw = dict(max_new_tokens=24, temperature=0, return_logits=True)
    cached = stories_llm.generate(prompts, **kw)
    uncached = stories_llm.generate(prompts, use_cache=False, **kw)

    for row, prompt in enumerate(prompts):
        solo = stories_llm.generate([prompt], **kw)[0]
        assert cached[row].token_ids == uncached[row].token_ids == solo.token_ids
        n = len(solo.token_ids)
        assert (cached[row].logits - uncached[row].logits).abs().max() < 1e-4
        assert (cached[row].logits[:n] - solo.logits).abs().max() < 1e-4


def test_rows_stop_independently(stories_llm):
    """A row that ends its story (BOS) stops while the others go on to max_new_tokens."""
    results = stories_llm.generate(["Once upon a time", "The little dog"], max_new_tokens=400,
                                   temperature=0)
    solo = [stories_llm.generate(p, max_new_tokens=400, temperature=0)[0]
            for p in ("Once upon a time", "The little dog")]
    for r, s in zip(results, solo):
        assert r.token_ids == s.token_ids and r.text == s.text
        assert r.finish_reason == s.finish_reason
    # From goldens.json: both stories end with BOS within 400 tokens (342 and 218 tokens).
    assert [len(r.token_ids) for r in results] == [342, 218]
    assert all(r.token_ids[-1] == 1 and r.finish_reason == "stop" for r in results)


def test_chunked_prefill_matches_one_prefill(stories_llm):
    """5 tokens prefilled, then 3 more as one chunk, give the logits of an 8-token prefill.

    The 3 queries sit at slots 5..7 of 8 keys: the causal mask must be aligned to the end.
    """
    model, cfg = stories_llm.model, stories_llm.config
    tokens = torch.tensor(_prompts([8], seed=3))
    no_pad = torch.zeros(1, dtype=torch.long)

    def new_cache():
        return KVCache(n_layers=cfg.n_layers, batch=1, n_kv_heads=cfg.n_kv_heads, max_len=8,
                       head_dim=cfg.head_dim)

    positions = torch.arange(8)[None]
    with torch.no_grad():
        whole = model(tokens, positions, attention_mask(no_pad, 0, 8), new_cache(), 0)
        cache = new_cache()
        first = model(tokens[:, :5], positions[:, :5], attention_mask(no_pad, 0, 5), cache, 0)
        second = model(tokens[:, 5:], positions[:, 5:], attention_mask(no_pad, 5, 3), cache, 5)
    assert (torch.cat([first, second], dim=1) - whole).abs().max() < 1e-4


def test_a_then_b_equals_b_on_fresh_model(stories_llm):
    import kvgen
    from conftest import STORIES

    stories_llm.generate("Lily and Tom went to the park", max_new_tokens=50, temperature=0)
    b_after_a = stories_llm.generate("The little dog", max_new_tokens=50, temperature=0)[0]
    fresh = kvgen.load(STORIES / "stories260K.bin")
    b_fresh = fresh.generate("The little dog", max_new_tokens=50, temperature=0)[0]
    assert b_after_a.token_ids == b_fresh.token_ids


@pytest.mark.parametrize("shape", [
    dict(n_layers=5, batch=1, n_kv_heads=4, max_len=512, head_dim=8),
    dict(n_layers=2, batch=3, n_kv_heads=1, max_len=17, head_dim=64),
    dict(n_layers=12, batch=8, n_kv_heads=12, max_len=160, head_dim=64),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cache_bytes_equal_formula_and_allocation(shape, dtype):
    element = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}[dtype]
    formula = (2 * shape["n_layers"] * shape["batch"] * shape["n_kv_heads"] * shape["head_dim"]
               * shape["max_len"] * element)
    cache = KVCache(dtype=dtype, **shape)

    allocated = cache.k.untyped_storage().nbytes() + cache.v.untyped_storage().nbytes()
    assert cache.nbytes == formula == allocated == KVCache.bytes_for(dtype=dtype, **shape)
    layer_view = cache.k[0]
    assert tuple(layer_view.shape) == (shape["batch"], shape["n_kv_heads"], shape["max_len"],
                                       shape["head_dim"])


def test_generation_reports_cache_bytes(stories_llm):
    """A 5-token prompt and 20 new tokens need 24 slots (the last token is never fed back)."""
    stories_llm.generate("Once upon a time", max_new_tokens=20, temperature=0)
    cfg = stories_llm.config
    assert stories_llm.last_stats.kv_cache_bytes == 2 * cfg.n_layers * 1 * cfg.n_kv_heads \
        * cfg.head_dim * 24 * 4
