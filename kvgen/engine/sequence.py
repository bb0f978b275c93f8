"""One request inside the engine: its tokens, how many have keys in the pool, its block table."""

import enum
import hashlib
from array import array

import torch

from ..generate import TextStream
from ..sampling import Sampler


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds blocks; prefilling or decoding
    FINISHED = "finished"


class Sequence:
    """A request's state: prompt plus generated ids, and where their keys and values live.

    The first num_computed tokens have keys and values in the pool, in the blocks listed by
    block_table (token at position p in slot block_table[p // block_size] * block_size
    + p % block_size). The tokens after them are fed to the model next: a prompt or a chunk of
    one, a recomputation after preemption, or, while decoding, the one token last sampled.
    """

    def __init__(self, request_id, prompt_ids: list[int], *, max_new_tokens: int,
                 sampler: Sampler, text: TextStream, stop_token_ids: set[int],
                 return_logits: bool = False, callback=None):
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.text = text
        self.stop_token_ids = stop_token_ids
        self.return_logits = return_logits
        self.callback = callback

        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.num_computed = 0
        self.block_table: list[int] = []
        self.num_cached_blocks = 0  # leading blocks already offered to the prefix cache
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self._hashes: list[bytes] = []

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        """Return how many tokens still need their keys and values computed."""
        return len(self.token_ids) - self.num_computed

    def block_hashes(self, n: int, block_size: int) -> list[bytes]:
        """Return the chained hashes of the first n full blocks.

        Block i's hash covers block i - 1's hash and block i's token ids, so equal hashes mean
        equal tokens from position 0 on. Ids are packed as 64-bit integers, whole: no two
        different ids (nor two different sequences, short of a SHA-256 collision) hash alike.
        Tokens are only ever appended, so hashes already computed stay valid.
        """
        assert n * block_size <= len(self.token_ids)
        while len(self._hashes) < n:
            i = len(self._hashes)
            parent = self._hashes[-1] if self._hashes else b""
            ids = array("q", self.token_ids[i * block_size:(i + 1) * block_size])
            self._hashes.append(hashlib.sha256(parent + ids.tobytes()).digest())
        return self._hashes[:n]

    def add_token(self, token_id: int) -> tuple[str, str | None]:
        """Return (text released, finish reason or None) after appending a sampled token.

        The rules are generate_steps': a stop token ends the sequence and adds no text, a stop
        string ends it at the string, and max_new_tokens ends it with "length".
        """
        self.token_ids.append(token_id)
        if token_id in self.stop_token_ids:
            return self.text.finish(), "stop"
        text = self.text.add(token_id)
        if self.text.stopped:
            return text, "stop"
        if len(self.token_ids) - self.num_prompt_tokens == self.max_new_tokens:
            return text + self.text.finish(), "length"
        return text, None

    def sample(self, logits: torch.Tensor) -> int:
        """Return the next token id for logits [vocab], from this request's own sampler."""
        return self.sampler(logits)
