"""The generation API: results, streaming, stop strings, prompt forms, length checks."""

import pytest

from kvgen.errors import KvgenError


def test_result_fields(stories_llm):
    (r,) = stories_llm.generate("Once upon a time", max_new_tokens=8, temperature=0)
    assert r.prompt_token_ids == [1, 403, 407, 261, 378]
    assert len(r.token_ids) == 8 and r.finish_reason == "length"
    assert r.text == stories_llm.tokenizer.decode(r.prompt_token_ids + r.token_ids)[
        len("Once upon a time"):]


def test_prompt_forms_agree(stories_llm):
    ids = stories_llm.tokenizer.encode("The little dog")
    kw = dict(max_new_tokens=12, temperature=0)
    by_text = stories_llm.generate("The little dog", **kw)[0]
    assert stories_llm.generate(ids, **kw)[0].token_ids == by_text.token_ids
    assert stories_llm.generate([ids], **kw)[0].token_ids == by_text.token_ids
    assert stories_llm.generate(["The little dog"], **kw)[0].token_ids == by_text.token_ids


@pytest.mark.parametrize("use_cache", [True, False])
def test_stream_concatenates_to_generate_text(stories_llm, use_cache):
    kw = dict(max_new_tokens=100, temperature=0, use_cache=use_cache)
    pieces = list(stories_llm.stream("Lily and Tom went to the park", **kw))
    full = stories_llm.generate("Lily and Tom went to the park", **kw)[0]
    assert "".join(pieces) == full.text
    assert len(pieces) > 10 and "\ufffd" not in "".join(pieces)


def test_stop_string_cuts_text_and_stops(stories_llm):
    # From goldens.json, greedy output begins ", there was a little girl named Lily."
    r = stories_llm.generate("Once upon a time", max_new_tokens=60, temperature=0,
                             stop=["girl"])[0]
    assert r.text == ", there was a little "
    assert r.finish_reason == "stop"
    streamed = "".join(stories_llm.stream("Once upon a time", max_new_tokens=60,
                                          temperature=0, stop="girl"))
    assert streamed == r.text


def test_stop_string_that_never_comes(stories_llm):
    r = stories_llm.generate("Once upon a time", max_new_tokens=20, temperature=0,
                             stop=["zebra"])[0]
    plain = stories_llm.generate("Once upon a time", max_new_tokens=20, temperature=0)[0]
    assert r.text == plain.text and r.finish_reason == "length"


def test_zero_new_tokens(stories_llm):
    (r,) = stories_llm.generate("Once", max_new_tokens=0)
    assert r.token_ids == [] and r.text == "" and r.finish_reason == "length"


def test_length_check_happens_before_compute(stories_llm):
    context = stories_llm.config.max_seq_len
    ok = [1] * 10
    stories_llm.generate([ok], max_new_tokens=context - 10, temperature=0)
    with pytest.raises(KvgenError, match="context of 512"):
        stories_llm.generate([ok], max_new_tokens=context - 9)
    with pytest.raises(KvgenError, match="vocabulary"):
        stories_llm.generate([[1, 99999]], max_new_tokens=1)
    with pytest.raises(KvgenError, match="no tokens"):
        stories_llm.generate([[]], max_new_tokens=1)
