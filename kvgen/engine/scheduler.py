"""Each step's batch: which running sequences go on, which waiting ones are admitted, and who is
preempted when the pool runs out of blocks.

Policy, first come first served: running sequences go first, oldest admission first, each
feeding its next prompt chunk or its one decode token. When the pool cannot give a running
sequence the block its next tokens need, the most recently admitted sequence is preempted:
its blocks are freed and it goes back to the front of the waiting queue, to be recomputed
(through the prefix cache, where its blocks survive). Then waiting requests are admitted in
arrival order while blocks, the prefill budget and max_num_seqs allow; none are admitted in a
step that preempted, which would only hand the freed blocks straight back.
"""

import logging
from collections import deque

from .block_pool import BlockPool
from .sequence import Sequence, Status

log = logging.getLogger(__name__)

# Without chunking, a step still stops admitting prompts once it holds this many prompt tokens,
# so one step's activations stay bounded; a longer prompt is admitted alone.
UNCHUNKED_STEP_TOKENS = 2048


class Scheduler:
    def __init__(self, pool: BlockPool, *, max_prefill_tokens: int | None, max_num_seqs: int):
        self.pool = pool
        self.max_prefill_tokens = max_prefill_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Return this step's batch: (sequence, number of its next tokens to feed) pairs."""
        self._full_budget = self.max_prefill_tokens or UNCHUNKED_STEP_TOKENS
        self._budget = self._full_budget
        batch: list[tuple[Sequence, int]] = []
        preempted = self._schedule_running(batch)
        if not preempted:
            self._admit_waiting(batch)
        return batch

    def _schedule_running(self, batch) -> bool:
        """Add the running sequences that can go on to batch; return whether any was preempted."""
        preempted = False
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            n = self._take(seq.num_uncomputed)
            if n == 0:  # a prompt chunk, and this step's prefill budget is spent
                i += 1
                continue
            while not self.pool.can_append(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return True  # it was the last running sequence: nothing after it
            self.pool.append(seq, n)
            batch.append((seq, n))
            i += 1
        return preempted

    def _admit_waiting(self, batch):
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Look up and admit with nothing in between: an eviction would void the lookup.
            hit = self.pool.match_prefix(seq)
            remaining = len(seq) - hit.num_tokens
            n = self._take(remaining, dry_run=True)
            if n == 0 or not self.pool.can_admit(seq, hit, n):
                break
            self._take(remaining)
            self.waiting.popleft()
            self.pool.admit(seq, hit, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))

    def _take(self, remaining: int, dry_run: bool = False) -> int:
        """Return how many of `remaining` uncomputed tokens to feed now, and charge prompt
        tokens to the step's prefill budget (a single token, a decode step, is free)."""
        if remaining == 1:
            return 1
        if self.max_prefill_tokens is not None:
            n = max(0, min(remaining, self._budget))
        else:
            # Unchunked: the whole remainder or nothing, but never nothing in an empty step.
            fits = remaining <= self._budget or self._budget == self._full_budget
            n = remaining if fits else 0
        if not dry_run:
            self._budget -= n
        return n

    def _preempt(self, seq: Sequence):
        self.pool.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.debug("preempted request %s after %d tokens", seq.request_id, len(seq))

    def finish(self, seq: Sequence):
        """Retire a running sequence and free its blocks."""
        self.running.remove(seq)
        self.pool.free(seq)
        seq.status = Status.FINISHED

    def abort(self, seq: Sequence):
        """Drop a sequence from wherever it is, freeing any blocks it holds."""
        if seq.status is Status.RUNNING:
            self.finish(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
