"""Streaming detokenization: text released token by token, never half a character."""

# How many prompt tokens the first window reaches back: enough context for the tokenizer to
# place the first new piece's leading space the way a whole-sequence decode would.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """The generated text of one sequence, released as tokens arrive.

    The generated text is decode(prompt + generated)[len(decode(prompt)):]. Each step decodes
    only a window: ids[prefix:read] was released already, ids[read:] is new; the text the new
    ids add is the window's text past the released part's. Decoding the released part too
    keeps tokenizer rules about neighbours (sentencepiece's leading space) right. Text ending
    in U+FFFD waits: it is usually a character whose bytes have not all arrived.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.text = ""
        self._ids = list(prompt_ids)
        self._read = len(self._ids)
        self._prefix = max(0, self._read - _PROMPT_CONTEXT)
        # A window whose released part has no text would lose the first new piece's leading
        # space to decode(), which strips it from a sequence's first piece; reach back further.
        while self._prefix > 0 and not tokenizer.decode(self._ids[self._prefix:self._read]):
            self._prefix -= 1

    def add(self, token_id: int) -> str:
        """Return the new text this token completes ('' while nothing new is complete)."""
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Return any text still held back, at the end of generation."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        decode = self.tokenizer.decode
        released = decode(self._ids[self._prefix:self._read])
        window = decode(self._ids[self._prefix:])
        if len(window) <= len(released) or (window.endswith(_REPLACEMENT) and not final):
            return ""
        new = window[len(released):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += new
        return new
