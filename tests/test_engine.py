"""The serving engine: every request's output equals its solo run on the contiguous cache, under
continuous batching, chunked prefill, prefix caching and preemption, and no block leaks."""

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kvgen
from kvgen import Engine, KvgenError
from kvgen.engine import parse_memory
from kvgen.engine.block_pool import BlockPool
from kvgen.engine.sequence import Sequence


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 512, (n - 1,), generator=g).tolist()


def _solo(llm, prompt, max_new_tokens, temperature=0, seed=None):
    return llm.generate([prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed, return_logits=True)[0]


def _assert_same_greedy(got, solo):
    """Equal ids; or, where a near tie in the logits flipped a pick, equal logits up to it."""
    if got.token_ids == solo.token_ids:
        return
    i = next((i for i, (a, b) in enumerate(zip(got.token_ids, solo.token_ids)) if a != b), None)
    assert i is not None, f"same tokens, different lengths: {got.token_ids} {solo.token_ids}"
    event("near tie")
    assert (got.logits[:i + 1] - solo.logits[:i + 1]).abs().max() < 1e-4
    top2 = solo.logits[i].topk(2).values
    assert top2[0] - top2[1] < 1e-4, f"token {i} differs without a near tie"


def _run(engine, arrivals):
    """Return {request index: RequestOutputs merged}, adding request k at step arrivals[k][0]."""
    ids, got, step = {}, {}, 0
    while len(ids) < len(arrivals) or engine.has_unfinished():
        for k, (at, prompt, kw) in enumerate(arrivals):
            if at == step:
                ids[engine.add_request(prompt, return_logits=True, **kw)] = k
        for out in engine.step():
            r = got.setdefault(ids[out.request_id], kvgen.GenerationResult([], [], "", None))
            r.token_ids += out.token_ids
            r.text += out.text
            r.logits = torch.cat([r.logits, out.logits]) if r.logits is not None else out.logits
            r.finish_reason = out.finish_reason
        step += 1
    return got


def _assert_no_leak(engine):
    s = engine.stats()
    assert s.free_blocks == s.num_blocks and s.running == s.waiting == 0
    assert not engine.has_unfinished() and sum(engine.pool.ref_count) == 0


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_outputs_equal_solo_runs(stories_llm, data):
    """Random arrivals, shared prefixes, prompt and output lengths, block sizes, chunking,
    row widths, prefix caching on or off, and pools so small that requests get preempted."""
    block_size = data.draw(st.sampled_from([1, 2, 3, 4, 8, 16]), "block_size")
    base = _ids(60, data.draw(st.integers(0, 3), "base"))
    token = st.integers(3, 511)
    requests = data.draw(st.lists(st.tuples(
        st.integers(0, 6), st.integers(1, 60), st.lists(token, max_size=8), st.integers(1, 20),
        st.sampled_from([None, 1, 2])), min_size=1, max_size=6), "requests")
    # Seeded sampling too: each request draws from its own generator, as it would alone.
    arrivals = [(at, base[:k] + tail, dict(max_new_tokens=n, temperature=0 if seed is None
                                           else 1, seed=seed))
                for at, k, tail, n, seed in requests]
    need = max(-(-(len(p) + kw["max_new_tokens"] - 1) // block_size) for _, p, kw in arrivals)
    tight = data.draw(st.booleans(), "tight")
    engine = Engine(stories_llm, block_size=block_size,
                    num_blocks=need + data.draw(st.integers(0, 2)) if tight else 400,
                    enable_prefix_caching=data.draw(st.booleans(), "caching"),
                    max_prefill_tokens=data.draw(st.sampled_from([None, 1, 3, 16]), "chunk"))
    # Both attention paths: the in-place kernel (where it builds) and the gathered copy.
    engine.runner.in_place &= data.draw(st.booleans(), "in-place attention")
    event(f"in-place attention: {engine.runner.in_place}")
    if not engine.runner.in_place:
        # Force every layout: prompts cut over several rows, padded rows, decode rows of k
        # tokens.
        width = data.draw(st.sampled_from([None, 1, 2, 5]), "row width")
        if width is not None:
            engine.runner._row_width = lambda lengths, n_keys: width
        pack = data.draw(st.sampled_from([None, 1, 2, 3]), "decode tokens per row")
        if pack is not None:
            engine.runner._pack_cost = lambda rows: abs(max(len(row) for row in rows) - pack)

    got = _run(engine, arrivals)
    stats = engine.stats()
    event(f"preempted: {stats.preemptions > 0}")
    event(f"prefix cache hit: {stats.prefix_cache_hit_tokens > 0}")
    for k, (_, prompt, kw) in enumerate(arrivals):
        solo = _solo(stories_llm, prompt, **kw)
        if kw["seed"] is None:
            _assert_same_greedy(got[k], solo)
        else:
            assert got[k].token_ids == solo.token_ids
    _assert_no_leak(engine)


def test_preemption_keeps_greedy_and_seeded_outputs(stories_llm):
    prompts = [_ids(n, seed) for seed, n in enumerate([9, 14, 5, 11])]
    for sampling in (dict(temperature=0), dict(temperature=1, seed=7)):
        engine = Engine(stories_llm, block_size=4, num_blocks=10)
        got = _run(engine, [(0, p, dict(max_new_tokens=24, **sampling)) for p in prompts])
        assert engine.stats().preemptions > 0
        for k, p in enumerate(prompts):
            assert got[k].token_ids == _solo(stories_llm, p, 24, **sampling).token_ids
        _assert_no_leak(engine)


def test_same_prompt_twice_reuses_three_blocks(stories_llm):
    prompt = _ids(13, 1)
    engine = Engine(stories_llm, block_size=4, num_blocks=64)
    first = _run(engine, [(0, prompt, dict(max_new_tokens=10, temperature=0))])[0]
    outs = []
    engine.add_request(prompt, max_new_tokens=10, temperature=0, callback=outs.append)
    while engine.has_unfinished():
        engine.step()
    assert outs[0].num_cached_tokens == 12 and engine.stats().prefix_cache_hit_tokens == 12
    assert sum((o.token_ids for o in outs), []) == first.token_ids
    assert first.token_ids == _solo(stories_llm, prompt, 10).token_ids
    _assert_no_leak(engine)


def test_concurrent_same_prompt_shares_only_the_full_block(stories_llm):
    prompt, n = _ids(6, 2), 20
    engine = Engine(stories_llm, block_size=4, num_blocks=64)
    got = {}
    a = engine.add_request(prompt, max_new_tokens=n, temperature=1, seed=1,
                           callback=lambda o: got.setdefault("a", []).extend(o.token_ids))
    engine.step()  # A's prompt: block 0 full and cached, block 1 holds 2 tokens
    b = engine.add_request(prompt, max_new_tokens=n, temperature=1, seed=2,
                           callback=lambda o: got.setdefault("b", []).extend(o.token_ids))
    engine.step()
    table_a, table_b = (s.block_table for s in engine.scheduler.running)
    assert table_a[0] == table_b[0] and engine.pool.ref_count[table_a[0]] == 2
    assert not set(table_a[1:]) & set(table_b[1:])
    while engine.has_unfinished():
        engine.step()
    for key, seed in (("a", 1), ("b", 2)):
        solo = stories_llm.generate(prompt, temperature=1, seed=seed, max_new_tokens=n)[0]
        assert got[key] == solo.token_ids
    assert a != b
    _assert_no_leak(engine)


def test_evicted_blocks_give_no_stale_hits(stories_llm):
    a, b = _ids(8, 3), _ids(13, 4)
    runs = []
    for caching in (True, False):
        engine = Engine(stories_llm, block_size=4, num_blocks=4, enable_prefix_caching=caching)
        kw = dict(max_new_tokens=4, temperature=0)
        runs.append([_run(engine, [(0, p, kw)])[0].token_ids for p in (a, b, a)])
        if caching:
            assert engine.pool.evictions >= 2 and engine.stats().prefix_cache_hit_tokens == 0
        _assert_no_leak(engine)
    assert runs[0] == runs[1]
    assert runs[0][0] == runs[0][2] == _solo(stories_llm, a, 4).token_ids


def test_fully_cached_prompts_still_produce_their_first_token(stories_llm):
    engine = Engine(stories_llm, block_size=4, num_blocks=64)
    for prompt in (_ids(8, 5), _ids(4, 6), [1]):
        for _ in range(2):
            got = _run(engine, [(0, prompt, dict(max_new_tokens=1, temperature=0))])[0]
            assert got.token_ids == _solo(stories_llm, prompt, 1).token_ids
    _assert_no_leak(engine)


def test_prefix_of_generated_tokens_is_reused(stories_llm):
    """A prompt that continues an earlier request's prompt plus output hits its blocks."""
    engine = Engine(stories_llm, block_size=4, num_blocks=64)
    first = _run(engine, [(0, _ids(7, 8), dict(max_new_tokens=12, temperature=0))])[0]
    prompt = _ids(7, 8) + first.token_ids[:9]
    outs = []
    engine.add_request(prompt, max_new_tokens=8, temperature=0, callback=outs.append)
    while engine.has_unfinished():
        engine.step()
    assert outs[0].num_cached_tokens == 12
    assert sum((o.token_ids for o in outs), []) == _solo(stories_llm, prompt, 8).token_ids


@pytest.mark.parametrize("when", ["waiting", "prefill", "decode"])
def test_abort_frees_every_block(stories_llm, when):
    engine = Engine(stories_llm, block_size=4, num_blocks=12, max_prefill_tokens=4)
    first = engine.add_request(_ids(13, 9), max_new_tokens=8, temperature=0)
    victim = engine.add_request(_ids(10, 10), max_new_tokens=8, temperature=0)
    seq = engine._requests[victim]
    reached = {"waiting": lambda: seq.status.value == "waiting",
               "prefill": lambda: seq.status.value == "running" and seq.num_uncomputed > 1,
               "decode": lambda: seq.status.value == "running" and seq.output_ids}[when]
    engine.step()  # the first request takes the step's whole prefill budget
    while not reached():
        engine.step()
    assert engine.stats().free_blocks < 12 and bool(seq.block_table) == (when != "waiting")
    assert engine.abort(victim) and not engine.abort(victim)
    engine.abort(first)
    _assert_no_leak(engine)
    again = _run(engine, [(0, _ids(10, 10), dict(max_new_tokens=8, temperature=0))])[0]
    assert again.token_ids == _solo(stories_llm, _ids(10, 10), 8).token_ids
    _assert_no_leak(engine)


def test_a_callback_may_abort_a_request_of_the_same_step(stories_llm):
    engine = Engine(stories_llm, block_size=4, num_blocks=32)
    victim = []
    engine.add_request(_ids(5, 11), max_new_tokens=4, temperature=0,
                       callback=lambda out: victim and engine.abort(victim[0]))
    victim.append(engine.add_request(_ids(6, 12), max_new_tokens=4, temperature=0))
    assert [o.request_id for o in engine.step()] == [0]
    while engine.has_unfinished():
        engine.step()
    _assert_no_leak(engine)


def test_streaming_callbacks_and_stop_strings_match_llm(stories_llm):
    engine = Engine(stories_llm, block_size=8, num_blocks=128)
    kw = dict(max_new_tokens=60, temperature=0, stop=["Lily"])
    reference = stories_llm.generate("Once upon a time", **kw)[0]
    pieces = []
    engine.add_request("The little dog", max_new_tokens=40, temperature=0,
                       callback=pieces.append)
    assert "".join(engine.stream("Once upon a time", **kw)) == reference.text
    while engine.has_unfinished():
        engine.step()
    assert "".join(o.text for o in pieces) == stories_llm.generate(
        "The little dog", max_new_tokens=40, temperature=0)[0].text
    results = engine.generate(["Once upon a time", {"prompt": "Lily", "max_new_tokens": 0}],
                              **kw)
    assert results[0].text == reference.text and results[0].finish_reason == "stop"
    assert results[1].token_ids == [] and results[1].finish_reason == "length"
    _assert_no_leak(engine)


def test_block_pool_takes_hits_before_evicting():
    """The only free blocks are a hit (least recently used) and one more: admitting must keep
    the hit and evict the other, and a lookup after an eviction finds nothing stale."""
    pool = BlockPool(num_blocks=2, block_size=2)

    def seq(ids):
        return Sequence(0, ids, max_new_tokens=1, sampler=None, text=None, stop_token_ids=set())

    a, c = seq([5, 6, 7]), seq([3, 4, 7])
    for s in (a, c):
        pool.admit(s, pool.match_prefix(s), 2)
        s.num_computed = 2
        pool.cache_full_blocks(s)
    pool.free(a)
    pool.free(c)  # LRU order: a's block, then c's
    b = seq([5, 6, 9, 9])
    hit = pool.match_prefix(b)
    assert hit.blocks == [0] and pool.can_admit(b, hit, 2)
    pool.admit(b, hit, 2)
    assert b.block_table == [0, 1] and pool.evictions == 1
    assert pool.match_prefix(seq([3, 4, 7])).blocks == []
    pool.free(b)
    assert pool.num_free == 2


def test_pool_sizing_and_errors(stories_llm):
    assert parse_memory("2GiB") == 2 * 2**30 and parse_memory("512MB") == 512 * 10**6
    assert parse_memory(1000) == 1000 and parse_memory("1.5KiB") == 1536
    for bad in ("2 parsecs", "", -1, 0, True, "0MB"):
        with pytest.raises(KvgenError, match="kv_cache_memory"):
            parse_memory(bad)
    per_block = 2 * 5 * 4 * 8 * 16 * 4  # K and V, layers, kv heads, head_dim, tokens, fp32
    engine = Engine(stories_llm, kv_cache_memory="1MiB")
    assert engine.stats().num_blocks == 2**20 // per_block
    assert engine.stats().kv_cache_bytes == engine.stats()["num_blocks"] * per_block
    with pytest.raises(KvgenError, match="not both"):
        Engine(stories_llm, num_blocks=4, kv_cache_memory="1MiB")
    with pytest.raises(KvgenError, match="block_size"):
        Engine(stories_llm, block_size=0)
    with pytest.raises(KvgenError, match="block_size 5000 is longer than the model's context"):
        Engine(stories_llm, block_size=5000)
    engine = Engine(stories_llm, block_size=4, num_blocks=3)
    with pytest.raises(KvgenError, match="needs 4 blocks"):
        engine.add_request(_ids(10, 1), max_new_tokens=4)
    with pytest.raises(KvgenError, match="context"):
        engine.add_request(_ids(10, 1), max_new_tokens=600)


def test_sliding_window_models_are_refused():
    from pathlib import Path

    from kvgen.config import ModelConfig
    from kvgen.model import Transformer

    cfg = ModelConfig(vocab_size=16, dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                      max_seq_len=32, sliding_window=4, model_type="mistral")
    llm = kvgen.LLM(Transformer(cfg), None, stop_token_ids=set(), source=Path("."))
    with pytest.raises(KvgenError, match="sliding-window"):
        Engine(llm)


def test_cli_prompts_file(tmp_path, capsys, stories_llm):
    from conftest import STORIES

    from kvgen.cli import main

    (tmp_path / "p.txt").write_text("Once upon a time\n\nThe little dog\n")
    (tmp_path / "p.jsonl").write_text('"Once upon a time"\n{"prompt": "The little dog"}\n')
    for name in ("p.txt", "p.jsonl"):
        assert main(["generate", "--model", str(STORIES), "--prompts-file",
                     str(tmp_path / name), "--max-new-tokens", "20", "--temperature", "0",
                     "--block-size", "4", "--kv-cache-memory", "200KB"]) == 0
        out, err = capsys.readouterr()
        for prompt in ("Once upon a time", "The little dog"):
            text = stories_llm.generate(prompt, max_new_tokens=20, temperature=0)[0].text
            assert f"{prompt}{text}\n" in out
        assert "requests 2 | new tokens 40" in err and "tokens/s" in err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "tempreature": 1}\n')
    assert main(["generate", "--model", str(STORIES), "--prompts-file",
                 str(tmp_path / "bad.jsonl")]) == 1
    assert "unknown key 'tempreature'" in capsys.readouterr().err
    # Engine options without --prompts-file would go unused: one error, before loading.
    assert main(["generate", "--model", str(STORIES), "--prompt", "a", "--block-size", "0",
                 "--no-prefix-caching"]) == 1
    assert "--block-size, --no-prefix-caching: serving-engine options" in \
        capsys.readouterr().err
