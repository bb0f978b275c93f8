"""Decode steps through torch.compile give the llama2.c reference's tokens, like eager ones."""

import shutil

import pytest

from conftest import STORIES, require_stories
from test_golden import _cases, _expected

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on the CPU needs a C++ compiler")


@pytest.fixture(scope="module")
def compiled_llm():
    import kvgen

    require_stories()
    return kvgen.load(STORIES / "stories260K.bin").compile_decode()


@needs_compiler
def test_compiled_decode_equals_goldens(compiled_llm):
    cases = [c for c in _cases() if c["steps"] <= 256]
    if not cases:
        pytest.skip("no goldens")
    for case in cases:
        expected = _expected(case, compiled_llm.config.max_seq_len)
        result = compiled_llm.generate(case["prompt"], max_new_tokens=len(expected),
                                       temperature=0)[0]
        assert result.token_ids == expected, case["prompt"]


@needs_compiler
def test_compiled_decode_in_a_padded_batch_equals_goldens(compiled_llm):
    """Prompts of different lengths: left padding gives the decode steps a mask."""
    cases = {c["prompt"]: c for c in _cases() if c["steps"] <= 256}
    if len(cases) < 2:
        pytest.skip("no goldens")
    cases = list(cases.values())
    n = min(len(_expected(c, compiled_llm.config.max_seq_len)) for c in cases)
    results = compiled_llm.generate([c["prompt"] for c in cases], max_new_tokens=n,
                                    temperature=0)
    for case, result in zip(cases, results):
        assert result.token_ids == _expected(case, compiled_llm.config.max_seq_len)[:n]


def test_compile_without_a_compiler_is_one_clear_error(monkeypatch, capsys):
    from kvgen.cli import main

    require_stories()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code = main(["generate", "--model", str(STORIES / "stories260K.bin"), "--prompt", "Hi",
                 "--max-new-tokens", "2", "--compile"])
    assert code != 0
    assert "C++ compiler" in capsys.readouterr().err
