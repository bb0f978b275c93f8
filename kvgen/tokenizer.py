"""Tokenizers: llama2.c's .bin format, Hugging Face tokenizer.json and sentencepiece .model."""

import heapq
import json
import re
import struct
from pathlib import Path

import sentencepiece
import tokenizers

from .detokenizer import IncrementalDetokenizer
from .errors import KvgenError
from .hf_tokenizer_export import export_hf_tokenizer

__all__ = ["Tokenizer", "Llama2cTokenizer", "HFTokenizer", "SentencePieceTokenizer",
           "IncrementalDetokenizer", "load_tokenizer", "export_hf_tokenizer"]


class Tokenizer:
    """Text to token ids and back. decode() drops special tokens and one leading space."""

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Return the token ids of text, BOS first when add_bos and the tokenizer has one."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Return the text of ids: special tokens give none, the first piece loses one space."""
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise KvgenError(f"token id {i} is outside the tokenizer's vocabulary "
                                 f"[0, {self.vocab_size})")
        return self._decode(list(ids))

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError


def load_tokenizer(path, vocab_size: int | None = None) -> Tokenizer:
    """Return the tokenizer stored at path.

    path is a tokenizer.json, a sentencepiece tokenizer.model, a llama2.c tokenizer .bin (which
    needs vocab_size: the file does not store it) or a directory holding tokenizer.json or
    tokenizer.model (tokenizer.json wins when both are there).
    """
    path = Path(path)
    if not path.exists():
        raise KvgenError(f"tokenizer path {path} does not exist")
    if path.is_dir():
        found = [path / name for name in ("tokenizer.json", "tokenizer.model")
                 if (path / name).is_file()]
        if not found:
            raise KvgenError(f"tokenizer directory {path} holds neither tokenizer.json nor "
                             f"tokenizer.model")
        path = found[0]
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".bin":
        if vocab_size is None:
            raise KvgenError(f"{path}: a llama2.c tokenizer file does not store its vocabulary "
                             f"size; pass vocab_size (the model's)")
        return Llama2cTokenizer(path, vocab_size)
    raise KvgenError(f"{path}: unknown tokenizer file kind; expected tokenizer.json, a "
                     f"sentencepiece .model or a llama2.c tokenizer .bin")


_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_BYTE_OFFSET = 3  # run.c's rule: byte b is token b + 3, after <unk>, BOS and EOS


class Llama2cTokenizer(Tokenizer):
    """A llama2.c tokenizer .bin, encoding and decoding as run.c does, in pure Python.

    pieces holds each token's bytes as stored (BOS is b"\\n<s>\\n", byte tokens b"<0xXX>"),
    scores their merge scores (the higher merges first). Unlike run.c, decode gives no text
    for <unk>, as Hugging Face decoders skipping special tokens do. Known difference: run.c
    skips single-byte pieces that are neither printable nor whitespace when printing; decode
    keeps them, since dropping bytes would break "stream == decode of all ids".
    """

    unk_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, path, vocab_size: int):
        self.path = Path(path)
        if not isinstance(vocab_size, int) or vocab_size < 256 + _BYTE_OFFSET:
            raise KvgenError(f"{self.path}: vocab_size must be an integer >= 259 (<unk>, BOS, "
                             f"EOS and 256 byte tokens), got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.max_token_length, self.scores, self.pieces = _read_llama2c(self.path, vocab_size)
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)
        self._surface = [self._surface_of(i, piece) for i, piece in enumerate(self.pieces)]

    def _surface_of(self, i: int, piece: bytes) -> bytes:
        if i in (self.unk_id, self.bos_id, self.eos_id):
            return b""
        byte = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(byte.group(1), 16)]) if byte else piece

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        if not text:
            return ids
        # The dummy prefix: sentencepiece-trained vocabularies expect a space before the first
        # word, and run.c adds one as its own token, which is the same as prepending " ".
        return ids + self._merge(self._char_ids(" " + text))

    def _char_ids(self, text: str) -> list[int]:
        """Return one id per character, or its byte-fallback ids when it is not a piece."""
        ids = []
        for ch in text:
            raw = ch.encode("utf-8", "surrogatepass")
            i = self._ids.get(raw)
            ids.extend([i] if i is not None else [b + _BYTE_OFFSET for b in raw])
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """Return ids merged as run.c merges them: best-scoring adjacent pair first, leftmost
        on ties, until no adjacent pair joins into a piece.

        run.c rescans all pairs for each merge; a heap keyed by (-score, position) picks the
        same pair in O(log n). A merge makes its neighbours' entries stale; they are skipped
        when popped (a position's id only changes by growing, so an unchanged id is current).
        """
        nxt = list(range(1, len(ids))) + [-1]
        prv = list(range(-1, len(ids) - 1))

        def candidate(i):
            j = nxt[i]
            joined = self._ids.get(self.pieces[ids[i]] + self.pieces[ids[j]]) if j >= 0 else None
            return None if joined is None else (-self.scores[joined], i, ids[i], ids[j], joined)

        heap = [c for c in map(candidate, range(len(ids))) if c is not None]
        heapq.heapify(heap)
        while heap:
            _, i, left, right, joined = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] != left or j < 0 or ids[j] != right:
                continue
            ids[i], ids[j] = joined, None
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            for k in (prv[i], i):
                c = candidate(k) if k >= 0 else None
                if c is not None:
                    heapq.heappush(heap, c)
        return [i for i in ids if i is not None]

    def _decode(self, ids: list[int]) -> str:
        text = b"".join(self._surface[i] for i in ids).decode("utf-8", errors="replace")
        # The dummy prefix's space belongs to the first piece but not to the text.
        return text[1:] if text.startswith(" ") else text


def _read_llama2c(path: Path, vocab_size: int) -> tuple[int, list[float], list[bytes]]:
    """Return (max_token_length, scores, pieces) from a llama2.c tokenizer file.

    Layout: int32 max_token_length, then per token a float32 score, an int32 byte length and
    that many bytes, all little-endian.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KvgenError(f"cannot read tokenizer file {path}: {e}") from None
    if len(data) < 4:
        raise KvgenError(f"{path}: {len(data)} bytes, too short for a llama2.c tokenizer "
                         f"(expected an int32 max_token_length, then {vocab_size} tokens)")
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    scores, pieces, offset = [], [], 4
    for i in range(vocab_size):
        n = struct.unpack_from("<fi", data, offset)[1] if offset + 8 <= len(data) else None
        if n is None or not 0 <= n <= len(data) - offset - 8:
            raise KvgenError(f"{path}: truncated or corrupt llama2.c tokenizer: token {i} of "
                             f"{vocab_size} (at byte {offset}) does not fit in the file's "
                             f"{len(data)} bytes")
        scores.append(struct.unpack_from("<f", data, offset)[0])
        pieces.append(data[offset + 8:offset + 8 + n])
        offset += 8 + n
    if offset != len(data):
        raise KvgenError(f"{path}: {len(data) - offset} bytes left after {vocab_size} tokens; "
                         f"expected the file to end (is vocab_size {vocab_size} the model's?)")
    return max_token_length, scores, pieces


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json; BOS comes from its own post-processor."""

    def __init__(self, path):
        path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise KvgenError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = read_tokenizer_config(path.parent / "tokenizer_config.json")
        # As transformers does: when set, "<s>" in a text is text, not the special token.
        self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.bos_id = self._special_id(config.get("bos_token"), ("<s>", "<|endoftext|>"))
        self.eos_id = self._special_id(config.get("eos_token"), ("</s>", "<|endoftext|>"))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _special_id(self, configured, fallbacks) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        names = [configured] if isinstance(configured, str) else list(fallbacks)
        ids = [self._tok.token_to_id(name) for name in names]
        return next((i for i in ids if i is not None), None)


def read_tokenizer_config(path: Path) -> dict:
    """Return tokenizer_config.json's fields, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KvgenError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise KvgenError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece .model file; BOS and EOS are the model's own (None when it has none)."""

    def __init__(self, path):
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise KvgenError(f"{path}: not a readable sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)
