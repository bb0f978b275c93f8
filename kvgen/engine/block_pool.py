"""Which block of the pool belongs to whom: reference counts, the prefix cache, LRU eviction.

Every block is in one of three states: in use (reference count > 0, by one sequence or, when
its tokens are a shared cached prefix, by several); free and cached (count 0, its hash still
findable, evictable); free and empty. A block is cached only once it is full and its keys are
computed, so a partially filled block is never shared and a cached block is never written.
"""

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass(frozen=True)
class PrefixHit:
    """The cached blocks found for a sequence's prefix, valid until the next eviction."""

    blocks: list[int]
    num_tokens: int
    evictions: int  # the pool's eviction count at lookup time


class BlockPool:
    """The bookkeeping of num_blocks blocks of block_size tokens (the tensors live elsewhere)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block, in use or free
        self.empty = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free cached blocks, LRU first
        self.evictions = 0
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.empty) + len(self.evictable)

    def blocks_needed(self, seq: Sequence, n: int) -> int:
        """Return how many new blocks seq needs to hold the keys of its next n tokens."""
        total = -(-(seq.num_computed + n) // self.block_size)
        return max(0, total - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> PrefixHit:
        """Return the cached blocks of seq's longest cached prefix of full blocks.

        The prefix stops at least one token short of the sequence: the last token must be
        computed so that there are logits to sample the next one from.
        """
        if not self.enable_prefix_caching:
            return PrefixHit([], 0, self.evictions)
        usable = (len(seq) - 1) // self.block_size
        blocks = []
        for h in seq.block_hashes(usable, self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(blocks, len(blocks) * self.block_size, self.evictions)

    def can_admit(self, seq: Sequence, hit: PrefixHit, n: int) -> bool:
        """Return whether seq can take hit's blocks and new ones for n more tokens."""
        assert hit.evictions == self.evictions, "prefix lookup outlived an eviction"
        new = -(-(hit.num_tokens + n) // self.block_size) - len(hit.blocks)
        # A hit on a free cached block takes it out of the free blocks too.
        reused_free = sum(self.ref_count[b] == 0 for b in hit.blocks)
        return new + reused_free <= self.num_free

    def admit(self, seq: Sequence, hit: PrefixHit, n: int):
        """Give seq hit's cached blocks, then new blocks for n more tokens after them."""
        assert hit.evictions == self.evictions, "prefix lookup outlived an eviction"
        assert not seq.block_table and seq.num_computed == 0
        # Take the hits first: allocating before would be free to evict them.
        for block in hit.blocks:
            if self.ref_count[block] == 0:
                del self.evictable[block]
            self.ref_count[block] += 1
        seq.block_table = list(hit.blocks)
        seq.num_cached_blocks = len(hit.blocks)
        seq.num_computed = seq.num_cached_tokens = hit.num_tokens
        self.queried_tokens += len(seq)
        self.hit_tokens += hit.num_tokens
        self.append(seq, n)

    def can_append(self, seq: Sequence, n: int) -> bool:
        return self.blocks_needed(seq, n) <= self.num_free

    def append(self, seq: Sequence, n: int):
        """Give seq the new blocks its next n tokens need."""
        for _ in range(self.blocks_needed(seq, n)):
            seq.block_table.append(self._allocate())

    def free(self, seq: Sequence):
        """Drop seq's references to its blocks; the sequence must recompute to run again."""
        # Last block first: it ends up least recently used, so a prefix outlives its tail.
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if self.block_hash[block] is None:
                    self.empty.append(block)
                else:
                    self.evictable[block] = None
        seq.block_table = []
        seq.num_computed = seq.num_cached_blocks = 0

    def cache_full_blocks(self, seq: Sequence):
        """Offer seq's blocks that became full and computed to the prefix cache."""
        full = seq.num_computed // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_cached_blocks:
            return
        hashes = seq.block_hashes(full, self.block_size)
        for i in range(seq.num_cached_blocks, full):
            block = seq.block_table[i]
            # Two sequences may compute the same block side by side; the first one is kept.
            if self.block_hash[block] is None and hashes[i] not in self.cached:
                self.block_hash[block] = hashes[i]
                self.cached[hashes[i]] = block
        seq.num_cached_blocks = full

    def _allocate(self) -> int:
        """Return a block with reference count 1: an empty one, else the LRU cached one."""
        if self.empty:
            block = self.empty.pop()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
            self.evictions += 1  # every earlier PrefixHit may now name a reused block
        assert self.ref_count[block] == 0
        self.ref_count[block] = 1
        return block
