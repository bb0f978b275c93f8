"""Log-probabilities of sampled tokens and of their most likely alternatives.

They are the model's own distribution, log_softmax of the raw logits, before temperature, top-k
or top-p reshape it: the same numbers whatever the sampling settings.
"""

from dataclasses import dataclass

import torch

from ..tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens at this position, most likely first


class LogprobReader:
    """Reads one sequence's tokens, in order, into TokenLogprobs."""

    def __init__(self, tokenizer: Tokenizer, num_top: int, last_prompt_token: int):
        self.tokenizer = tokenizer
        self.num_top = num_top
        self._previous = last_prompt_token

    def read(self, logits: torch.Tensor, token_id: int) -> TokenLogprob:
        """Return the log-probability of token_id under logits [vocab], with the top ones."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = []
        if self.num_top:
            values, ids = torch.topk(logprobs, self.num_top)
            top = [(self._piece(i), v) for i, v in zip(ids.tolist(), values.tolist())]
        out = TokenLogprob(self._piece(token_id), float(logprobs[token_id]), top)
        self._previous = token_id
        return out

    def _piece(self, token_id: int) -> str:
        """Return the text token_id adds after the previous token.

        Decoded after its predecessor rather than alone: decoders drop a sequence's leading
        space (sentencepiece) or need the previous byte, so a token decoded alone can lose the
        space it carries in the text.
        """
        before = self.tokenizer.decode([self._previous])
        return self.tokenizer.decode([self._previous, token_id])[len(before):]


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> dict:
    """Return the legacy completions "logprobs" object; text offsets count from offset."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    """Return the chat "logprobs" object: {"content": [one entry per token]}."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [entry(t.token, t.logprob)
                        | {"top_logprobs": [entry(s, v) for s, v in t.top]} for t in tokens]}
