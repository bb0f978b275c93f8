"""One forward pass over a mixed batch: prompt chunks and decode tokens of many sequences.

Where the paged-attention kernel runs (fp32 on the CPU with a C compiler), the batch is one
row: every sequence's tokens side by side, each attending to its own sequence's keys in the
pool (PagedInPlaceView), so nothing is padded and no layout needs choosing. Otherwise:

The model takes a rectangle of tokens [rows, width], and each row attends to its own keys
[n_keys]. A piece is up to `width` consecutive tokens of one sequence: a long prompt chunk is
cut into pieces from its end, so only its first piece is short. Usually each row holds one
piece, right-aligned (padded on the left), so last_only logits are each piece's last token's.
In a step of decode tokens only, a row may hold several sequences' tokens side by side instead,
their keys laid one after another along the row's key axis and each query masked to its own:
rows then gather about the keys their sequences have, not each the longest sequence's.
"""

from typing import NamedTuple

import torch

from ..generate import PAD_ID
from ..model import Transformer
from .. import paged_attention
from .paged_cache import PagedBatchView, PagedInPlaceView, PagedKVCache, PromptPiece
from .sequence import Sequence

# A row's keys cost a gather and the attention kernel's per-row work, not arithmetic: weigh
# each key element as this many multiply-adds when choosing a layout (fitted roughly to CPU
# timings of GPT-2 shapes; a wrong weight costs speed, never correctness).
_GATHER_WEIGHT = 24
_MAX_PACK = 4  # most decode tokens a row may hold


class Piece(NamedTuple):
    entry: int  # index in the batch
    seq: Sequence
    start: int  # position of the first token
    count: int


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, in_place: bool | None = None):
        """in_place: attend through the paged-attention kernel (None: wherever it runs)."""
        self.model, self.cache = model, cache
        self.device = model.embed.weight.device
        cfg = model.cfg
        if in_place is None:
            in_place = paged_attention.supports(cache.k.dtype, cache.k.device, cfg.head_dim,
                                                cache.block_size)
        self.in_place = in_place
        mlp = (3 if cfg.mlp == "swiglu" else 2) * cfg.dim * cfg.hidden_dim
        attn = cfg.dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        # Rough multiply-add counts, only to compare layouts with one another.
        self._per_token = cfg.n_layers * (attn + mlp)
        self._per_logits = cfg.dim * cfg.vocab_size
        self._per_row_key = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * _GATHER_WEIGHT
        # Scores and weighted sum, weighed 4x for the softmax and the kernel's per-score work.
        self._per_query_key = cfg.n_layers * 8 * cfg.n_heads * cfg.head_dim

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Return logits [len(batch), vocab] at the last of the n tokens each sequence feeds.

        Each (seq, n) feeds seq.token_ids[seq.num_computed:][:n], whose block table already
        covers them; their keys and values are written to the pool.
        """
        if self.in_place:
            return self._run_in_place(batch)

        rows = self._layout(batch)
        width = max(sum(p.count for p in row) for row in rows)
        tokens, positions, offsets, owners, last = [], [], [], [], [None] * len(batch)
        pieces, piece_row, piece_offset = [], [], []
        for r, row in enumerate(rows):
            pad = width - sum(p.count for p in row)
            # A padding query takes the first piece's first position: it sees computed keys.
            tokens.append([PAD_ID] * pad)
            positions.append([row[0].start] * pad)
            offsets.append([0] * pad)
            owners.append([len(pieces)] * pad)
            offset = 0
            for p in row:
                tokens[r] += p.seq.token_ids[p.start:p.start + p.count]
                positions[r] += range(p.start, p.start + p.count)
                offsets[r] += [offset] * p.count
                owners[r] += [len(pieces)] * p.count
                last[p.entry] = (r, len(tokens[r]) - 1)
                pieces.append(p)
                piece_row.append(r)
                piece_offset.append(offset)
                offset += p.start + p.count  # the keys of this piece's sequence up to it

        dev, bs = self.device, self.cache.block_size
        tokens = torch.tensor(tokens, device=dev)  # [rows, width]
        positions = torch.tensor(positions, device=dev)  # [rows, width]
        offsets = torch.tensor(offsets, device=dev)  # [rows, width]: key axis offset
        owners = torch.tensor(owners, device=dev)  # [rows, width]: piece of each query
        longest_table = max(len(p.seq.block_table) for p in pieces)
        table = torch.tensor([p.seq.block_table + [0] * (longest_table - len(p.seq.block_table))
                              for p in pieces], device=dev)  # [pieces, blocks]
        counts = torch.tensor([sum(p.count for p in row) for row in rows], device=dev)
        real = torch.arange(width, device=dev)[None] >= width - counts[:, None]  # [rows, width]
        write_slots = (table[owners, positions // bs] * bs + positions % bs)[real]
        write_rows = None if bool(real.all()) else real.flatten().nonzero().squeeze(1)

        key_slots = self._key_slots(pieces, table, piece_row, piece_offset, len(rows))
        n_keys = key_slots.shape[1]

        # Query at position q sees its own sequence's keys 0..q: earlier steps' keys and this
        # step's, earlier pieces of a split prompt included; any other key is padding or
        # another sequence's.
        column = torch.arange(n_keys, device=dev)[None, None, :]  # [1, 1, n_keys]
        mask = (column >= offsets[..., None]) & (column <= (offsets + positions)[..., None])
        view = PagedBatchView(self.cache, write_rows, write_slots, key_slots)
        one_per_row = all(len(row) == 1 for row in rows)
        logits = self.model(tokens, positions, mask.unsqueeze(1), view, 0,
                            last_only=one_per_row)  # [rows, 1 or width, vocab]
        rows_of, columns = (torch.tensor(x, device=dev) for x in zip(*last))
        return logits[rows_of, -1] if one_per_row else logits[rows_of, columns]

    def _run_in_place(self, batch) -> torch.Tensor:
        """run(), as one row of all the batch's tokens (see PagedInPlaceView): single tokens
        first, then prompt pieces."""
        dev, bs = self.device, self.cache.block_size
        tables = [seq.block_table for seq, _ in batch]
        longest_table = max(len(t) for t in tables)
        tables = torch.tensor([t + [0] * (longest_table - len(t)) for t in tables],
                              dtype=torch.int32, device=dev)  # [sequences, blocks]
        singles = [i for i, (_, n) in enumerate(batch) if n == 1]
        pieces = [i for i, (_, n) in enumerate(batch) if n > 1]

        tokens, positions, token_table, last, prompts = [], [], [], [0] * len(batch), []
        for i in singles + pieces:
            seq, n = batch[i]
            start = seq.num_computed
            offset = len(tokens)
            tokens += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            token_table += [i] * n
            last[i] = len(tokens) - 1
            if n > 1:
                key_slots = mask = None
                if start > 0:  # keys 0..start+n-1, each query up to its own position
                    key_pos = torch.arange(start + n, device=dev)
                    key_slots = tables[i, key_pos // bs].long() * bs + key_pos % bs
                    mask = key_pos[None] <= (start + torch.arange(n, device=dev))[:, None]
                prompts.append(PromptPiece(offset, n, start, key_slots, mask))

        positions = torch.tensor(positions, device=dev)  # [n_tokens]
        token_table = torch.tensor(token_table, dtype=torch.int32, device=dev)
        write_slots = tables[token_table.long(), positions // bs].long() * bs + positions % bs
        single_positions = positions[:len(singles)]
        view = PagedInPlaceView(self.cache, write_slots, tables, token_table[:len(singles)],
                                (single_positions + 1).to(torch.int32), prompts)
        tokens = torch.tensor([tokens], device=dev)
        last = torch.tensor(last, device=dev)
        return self.model(tokens, positions[None], None, view, 0, logits_at=last)[0]

    def _key_slots(self, pieces, table, piece_row, piece_offset, n_rows) -> torch.Tensor:
        """Return the pool slot of every key of every row [rows, n_keys]: each piece's
        sequence's keys 0..start+count-1 from the piece's row offset on, slot 0 elsewhere."""
        dev, bs = self.device, self.cache.block_size
        ends = torch.tensor([p.start + p.count for p in pieces], device=dev)  # [pieces]
        key_piece = torch.repeat_interleave(torch.arange(len(pieces), device=dev), ends)
        key_pos = torch.arange(len(key_piece), device=dev) - (ends.cumsum(0) - ends)[key_piece]
        n_keys = max(o + p.start + p.count for o, p in zip(piece_offset, pieces))
        key_slots = torch.zeros(n_rows, n_keys, dtype=torch.long, device=dev)
        key_slots[torch.tensor(piece_row, device=dev)[key_piece],
                  torch.tensor(piece_offset, device=dev)[key_piece] + key_pos] = \
            table[key_piece, key_pos // bs] * bs + key_pos % bs
        return key_slots

    def _layout(self, batch) -> list[list[Piece]]:
        """Return the pieces of each row, by the layout of lowest estimated cost."""
        lengths = [n for _, n in batch]
        n_keys = max(seq.num_computed + n for seq, n in batch)
        if max(lengths) == 1 and len(batch) > 1:
            packs = {k: self._pack(batch, k) for k in range(1, min(_MAX_PACK, len(batch)) + 1)}
            return min(packs.values(), key=self._pack_cost)
        width = self._row_width(lengths, n_keys)
        rows = []
        for entry, (seq, n) in enumerate(batch):
            start, count = seq.num_computed, n - (-(-n // width) - 1) * width
            while n > 0:  # the first piece takes the remainder
                rows.append([Piece(entry, seq, start, count)])
                start, n, count = start + count, n - count, width
        return rows

    def _pack(self, batch, k: int) -> list[list[Piece]]:
        """Return rows of k decode tokens each (the last row may have fewer), longest keys
        first, dealt back and forth so that the rows' key counts come out even."""
        order = sorted(range(len(batch)), key=lambda i: -batch[i][0].num_computed)
        n_rows = -(-len(batch) // k)
        rows = [[] for _ in range(n_rows)]
        for i, entry in enumerate(order):
            turn, place = divmod(i, n_rows)
            seq = batch[entry][0]
            rows[place if turn % 2 == 0 else n_rows - 1 - place].append(
                Piece(entry, seq, seq.num_computed, 1))
        return rows

    def _pack_cost(self, rows) -> float:
        width = max(len(row) for row in rows)
        n_keys = max(sum(p.start + 1 for p in row) for row in rows)
        logits = self._per_logits * (1 if width == 1 else width)  # last_only only when 1
        return len(rows) * (width * (self._per_token + n_keys * self._per_query_key)
                            + logits + n_keys * self._per_row_key)

    def _row_width(self, lengths: list[int], n_keys: int) -> int:
        """Return the row width with the lowest estimated cost for sequences feeding `lengths`
        tokens, one piece per row: wide rows waste padding on short pieces, narrow rows
        repeat each row's key gather and logits."""
        longest = max(lengths)
        candidates = {longest} | {1 << i for i in range(longest.bit_length())}

        def cost(width):
            rows = sum(-(-n // width) for n in lengths)
            return (rows * width * (self._per_token + n_keys * self._per_query_key)
                    + rows * (self._per_logits + n_keys * self._per_row_key))

        return min(sorted(candidates), key=cost)
