"""A llama2.c tokenizer written out as a Hugging Face tokenizer.json that encodes the same."""

import json
import logging
import re
from pathlib import Path

from .errors import KvgenError

log = logging.getLogger(__name__)

_SPACE = "\u2581"  # sentencepiece's visible space, "▁", as Hugging Face Llama vocabularies use
_SPECIAL_NAMES = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2; llama2.c stores BOS as "\n<s>\n"
_BYTE_NAME = re.compile(r"<0x[0-9A-F]{2}>")


def export_hf_tokenizer(tok, out_dir) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir.

    tok is a Llama2cTokenizer. Hugging Face `tokenizers` and transformers' AutoTokenizer then
    encode every text as tok.encode does, BOS included, and decode the same. One known limit:
    a literal "▁" (U+2581) in the text encodes as a space, since "▁" stands for space here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = _hf_vocab(tok)
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, name) for i, name in enumerate(_SPECIAL_NAMES)],
        # The dummy prefix: run.c puts a space before any non-empty text.
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": _SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}]},
        # No pre-tokenizer: run.c merges across word boundaries, so the text is one BPE word.
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [_special("<s>"), _sequence("A")],
            "pair": [_special("<s>"), _sequence("A"), _special("<s>", 1), _sequence("B", 1)],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [tok.bos_id], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True,
                  "vocab": vocab, "merges": _merges(tok, vocab)},
    }
    _write_json(out_dir / "tokenizer.json", tokenizer)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(out_dir / "special_tokens_map.json", special)
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
        "add_bos_token": True, "add_eos_token": False,
        # run.c treats "<s>" in a prompt as plain text, not as BOS.
        "split_special_tokens": True,
        # Keep " ." and " n't" as decoded: the tokenizer's decoder already gives the text.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000})
    log.info("wrote %s/tokenizer.json (%d tokens, %d merges)", out_dir, len(vocab),
             len(tokenizer["model"]["merges"]))


def _hf_vocab(tok) -> dict[str, int]:
    """Return token name -> id: pieces with "▁" for spaces; byte and special tokens by name."""
    vocab = {}
    for i, piece in enumerate(tok.pieces):
        if i < len(_SPECIAL_NAMES):
            name = _SPECIAL_NAMES[i]
        else:
            try:
                name = piece.decode("utf-8").replace(" ", _SPACE)
            except UnicodeDecodeError:
                raise KvgenError(f"{tok.path}: token {i} ({piece!r}) is not UTF-8 text; "
                                 f"expected pieces as in the current llama2.c schema") from None
        if 3 <= i < 259 and name != f"<0x{i - 3:02X}>":
            raise KvgenError(f"{tok.path}: token {i} is {name!r}; expected the byte token "
                             f"<0x{i - 3:02X}>")
        if name in vocab:
            raise KvgenError(f"{tok.path}: tokens {vocab[name]} and {i} are both {name!r}")
        vocab[name] = i
    return vocab


def _merges(tok, vocab: dict[str, int]) -> list[str]:
    """Return BPE merges, best first, so that Hugging Face's lowest-rank-first BPE picks the
    pair run.c picks (the one joining into the highest-scoring piece).

    A piece gets one merge per way of splitting it into two pieces: run.c joins any adjacent
    pair whose text is a piece. Known limit: where run.c breaks a tie by position, ranks break
    it by order instead. Ties need two different pieces of equal score, or two splits of one
    piece side by side ("aa" "a" "aa"); tok512 has neither. Each merge is "left right", the
    format every `tokenizers` version reads; names hold no plain space (it became "▁").
    """
    mergeable = {name: i for name, i in vocab.items()
                 if i >= len(_SPECIAL_NAMES) and not _BYTE_NAME.fullmatch(name)}
    merges = []
    for name in sorted(mergeable, key=lambda n: (-tok.scores[mergeable[n]], mergeable[n])):
        merges.extend(f"{name[:k]} {name[k:]}" for k in range(1, len(name))
                      if name[:k] in mergeable and name[k:] in mergeable)
    return merges


def _added_token(i: int, name: str) -> dict:
    return {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _special(name: str, type_id: int = 0) -> dict:
    return {"SpecialToken": {"id": name, "type_id": type_id}}


def _sequence(which: str, type_id: int = 0) -> dict:
    return {"Sequence": {"id": which, "type_id": type_id}}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
