"""Tokenizers against run.c's goldens, the Hugging Face export, sentencepiece, bad files."""

import json
import random
import re
import time
from pathlib import Path

import pytest

from kvgen.errors import KvgenError
from kvgen.tokenizer import (HFTokenizer, IncrementalDetokenizer, Llama2cTokenizer,
                             SentencePieceTokenizer, export_hf_tokenizer, load_tokenizer)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"

TRICKY = ["", " ", "  two  spaces", "trailing  ", " leading", "\n", "line one\nline two\n",
          "tab\there", "caf\u00e9 na\u00efve", "\u65e5\u672c\u8a9e", "smile \U0001f642!",
          "<s> and </s> as text", "\u00a0nbsp\u2019s \u201cquotes\u201d", "x" * 50]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (expected the shared folder beside the "
                    f"repository)")
    return path


@pytest.fixture(scope="module")
def tok() -> Llama2cTokenizer:
    return load_tokenizer(_need(STORIES / "tok512.bin"), vocab_size=512)


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return json.loads(_need(STORIES / "goldens.json").read_text())["cases"]


@pytest.fixture(scope="module")
def shakespeare_lines() -> list[str]:
    return _need(SHAKESPEARE).read_text().splitlines()


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf_tok")
    export_hf_tokenizer(tok, out)
    return out


def generated_text(tokenizer, prompt_ids, gen_ids) -> str:
    prompt_text = tokenizer.decode(prompt_ids)
    return tokenizer.decode(prompt_ids + gen_ids)[len(prompt_text):]


def stream(tokenizer, prompt_ids, gen_ids) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.add(t) for t in gen_ids] + [detok.flush()]
    assert detok.text == "".join(pieces)
    return pieces


def check_stream(tokenizer, prompt_ids, gen_ids):
    pieces = stream(tokenizer, prompt_ids, gen_ids)
    assert "".join(pieces) == generated_text(tokenizer, prompt_ids, gen_ids)
    assert not any("\ufffd" in p for p in pieces), pieces


def test_golden_prompt_ids(tok, cases):
    for case in cases:
        assert tok.encode(case["prompt"]) == case["prompt_token_ids"], case["prompt"]
        assert tok.decode(case["prompt_token_ids"]) == case["prompt"]
    assert tok.encode("Once upon a time", add_bos=False) == [403, 407, 261, 378]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)


def test_golden_generated_text(tok, cases):
    for case in cases:
        prompt, gen = case["prompt_token_ids"], case["generated_token_ids"]
        where = f"prompt {case['prompt']!r}, {case['steps']} steps"
        assert generated_text(tok, prompt, gen) == case["generated_text"], where
        pieces = stream(tok, prompt, gen)
        assert "".join(pieces) == case["generated_text"], where
        assert not any("\ufffd" in p for p in pieces), where
    dog = next(c for c in cases if c["prompt"] == "The little dog")
    assert generated_text(tok, dog["prompt_token_ids"], dog["generated_token_ids"]).startswith(
        " was")
    empty = next(c for c in cases if c["prompt"] == "")
    assert stream(tok, [1], empty["generated_token_ids"])[0] == "Once"


def test_stream_keeps_spaces_around_special_tokens(tok):
    once, was, a = 403, 286, 261
    assert "".join(stream(tok, [1, once] + [2] * 8, [was, a])) == " was a"
    assert "".join(stream(tok, [1, once], [2, was, 1, a])) == " was a"
    assert "".join(stream(tok, [1, 2, 2], [was, a])) == "was a"  # first text: no space


def run_c_merge(tok, ids):
    """run.c's merge loop as written there: rescan every pair, take the best, leftmost."""
    while True:
        best = None
        for i in range(len(ids) - 1):
            j = tok._ids.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if j is not None and (best is None or tok.scores[j] > best[0]):
                best = (tok.scores[j], i, j)
        if best is None:
            return ids
        _, i, j = best
        ids = ids[:i] + [j] + ids[i + 2:]


def test_merge_matches_run_c_loop(tok):
    rng = random.Random(0)
    alphabet = "aeiouthnsrdl  ,.\n'\u00e9\u65e5"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        expected = [1] + run_c_merge(tok, tok._char_ids(" " + text))
        assert tok.encode(text) == expected, text


def test_encode_long_text_is_fast(tok, shakespeare_lines):
    text = "\n".join(shakespeare_lines)[:20_000]
    start = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - start < 2.0  # the quadratic loop would take minutes
    assert tok.decode(ids) == text


def test_byte_fallback_round_trip_and_stream(tok):
    text = "caf\u00e9 \u65e5\u672c \U0001f642 ok"
    ids = tok.encode(text)
    assert 0xF0 + 3 in ids  # the emoji's first byte, as a byte-fallback token
    assert tok.decode(ids) == text
    check_stream(tok, tok.encode("Hi"), tok.encode(" " + text, add_bos=False))


def hf_texts(cases, shakespeare_lines):
    lines = shakespeare_lines[:200]
    return [c["prompt"] for c in cases] + lines + ["\n".join(lines)] + TRICKY


def test_exported_tokenizer_matches(tok, hf_dir, cases, shakespeare_lines):
    hf = load_tokenizer(hf_dir)
    assert isinstance(hf, HFTokenizer)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id) == (512, 1, 2)
    for text in hf_texts(cases, shakespeare_lines):
        ids = tok.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.encode(text, add_bos=False) == tok.encode(text, add_bos=False), text
        assert hf.decode(ids) == tok.decode(ids) == text
    for case in cases:
        assert hf.decode(case["token_ids"]) == tok.decode(case["token_ids"])


def test_transformers_autotokenizer_agrees(tok, hf_dir, cases, shakespeare_lines):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (1, 2, 0)
    for text in hf_texts(cases, shakespeare_lines):
        ids = tok.encode(text)
        assert auto(text)["input_ids"] == ids, text
        assert auto.decode(ids, skip_special_tokens=True) == text


def test_incremental_with_exported_tokenizer(hf_dir, cases):
    hf = load_tokenizer(hf_dir / "tokenizer.json")
    for case in cases:
        assert "".join(stream(hf, case["prompt_token_ids"], case["generated_token_ids"])) == \
            case["generated_text"]
    check_stream(hf, hf.encode("Hello"), hf.encode(" \U0001f642 caf\u00e9 \u65e5\u672c",
                                                   add_bos=False))
    check_stream(hf, [1], hf.encode("  two spaces", add_bos=False))


@pytest.fixture(scope="module")
def sp_dir(shakespeare_lines, tmp_path_factory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    out = tmp_path_factory.mktemp("sp")
    # byte_fallback needs 256 byte pieces plus every character: about 320 at least.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(shakespeare_lines[:3000]), model_prefix=str(out / "tokenizer"),
        vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return out


def test_sentencepiece(sp_dir):
    sp = load_tokenizer(sp_dir)
    assert isinstance(sp, SentencePieceTokenizer)
    assert isinstance(load_tokenizer(sp_dir / "tokenizer.model"), SentencePieceTokenizer)
    assert (sp.vocab_size, sp.bos_id, sp.eos_id) == (400, 1, 2)
    for text in ["First Citizen:", " leading", "two  spaces", "caf\u00e9 \U0001f642 \u65e5\u672c"]:
        ids = sp.encode(text)
        assert ids[0] == sp.bos_id and sp.encode(text, add_bos=False) == ids[1:]
        assert sp.decode(ids) == text
    prompt = sp.encode("Before we proceed")
    check_stream(sp, prompt, sp.encode(" any further, \U0001f642 \u65e5\u672c!", add_bos=False))
    check_stream(sp, [sp.bos_id], sp.encode("  \U0001f642 hear me speak.", add_bos=False))
    assert "".join(stream(sp, prompt, sp.encode("x y", add_bos=False))) == " x y"


def test_bad_inputs(tmp_path, tok):
    missing = tmp_path / "nope.json"
    with pytest.raises(KvgenError, match=re.escape(str(missing))):
        load_tokenizer(missing)
    truncated = tmp_path / "tok.bin"
    truncated.write_bytes((STORIES / "tok512.bin").read_bytes()[:1000])
    with pytest.raises(KvgenError, match=re.escape(str(truncated))):
        load_tokenizer(truncated, vocab_size=512)
    with pytest.raises(KvgenError, match="bytes left"):
        load_tokenizer(STORIES / "tok512.bin", vocab_size=300)
    with pytest.raises(KvgenError, match="vocab_size"):
        load_tokenizer(STORIES / "tok512.bin")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(KvgenError, match=re.escape(str(empty_dir))):
        load_tokenizer(empty_dir)
    unknown = tmp_path / "vocab.txt"
    unknown.write_text("a\n")
    with pytest.raises(KvgenError, match="unknown tokenizer file kind"):
        load_tokenizer(unknown)
    with pytest.raises(KvgenError, match="512"):
        tok.decode([1, 512])
