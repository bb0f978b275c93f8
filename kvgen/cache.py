"""The contiguous key/value cache: every layer's keys and values, preallocated for max_len slots."""

import math

import torch

from .errors import KvgenError


def allocate(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Return zeros of `shape` for a cache, or raise KvgenError naming the size when the memory
    cannot be had (a mistyped budget such as 1000TB reaches here)."""
    try:
        return torch.zeros(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        n_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KvgenError(f"cannot allocate {n_bytes:,} bytes for the KV cache "
                         f"({list(shape)} {dtype} on {device}): {reason}") from None


class KVCache:
    """Keys and values of every layer for a batch, in slots 0..max_len-1.

    Slot j of every row holds the token fed at step j of that batch (left padding included), so
    all rows fill the same slots at the same time; the caller says where with `start`.
    """

    def __init__(self, *, n_layers: int, batch: int, n_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device="cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        # One allocation each for K and V; layer l's view is [batch, n_kv_heads, max_len, head_dim].
        self.k = allocate(shape, dtype, device)
        self.v = allocate(shape, dtype, device)
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)  # views, made once
        self.max_len = max_len

    @staticmethod
    def bytes_for(*, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                  dtype: torch.dtype = torch.float32) -> int:
        """Return the cache size in bytes: 2 (K and V) x layers x batch x kv heads x head_dim
        x slots x bytes per element."""
        bytes_per_element = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * batch * n_kv_heads * head_dim * max_len * bytes_per_element

    @property
    def nbytes(self) -> int:
        """Return the bytes this cache holds, K and V together."""
        return self.k.nbytes + self.v.nbytes

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v ([batch, n_kv_heads, t, head_dim]) at slots start..start+t-1 of one layer.

        Returns that layer's keys and values for slots 0..start+t-1, which is what the new
        queries attend to.
        """
        end = start + k.shape[2]
        if end > self.max_len:
            raise IndexError(f"KV cache holds {self.max_len} slots, asked to fill up to {end}")
        k_layer, v_layer = self._k_layers[layer], self._v_layers[layer]
        k_layer[:, :, start:end] = k
        v_layer[:, :, start:end] = v
        return k_layer[:, :, :end], v_layer[:, :, :end]

    def key_slots(self, start: int, t: int) -> torch.Tensor:
        """Return the slot of each key update() returns after writing t tokens at start."""
        return torch.arange(start + t, device=self.k.device)


class SlidingWindowCache:
    """Keys and values of the last `window` slots only, in a ring: slot j lives at j % window.

    For sliding-window attention (Mistral), where no query looks further back than the window,
    so memory stops growing there. update() returns the ring's earlier contents followed by the
    new tokens; key_slots() says which slot each of those is, for the attention mask.
    """

    def __init__(self, *, n_layers: int, batch: int, n_kv_heads: int, window: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device="cpu"):
        shape = (n_layers, batch, n_kv_heads, window, head_dim)
        self.k = allocate(shape, dtype, device)
        self.v = allocate(shape, dtype, device)
        self.window = window

    @property
    def nbytes(self) -> int:
        """Return the bytes this cache holds, K and V together."""
        return self.k.nbytes + self.v.nbytes

    def _earlier_slots(self, start: int) -> torch.Tensor:
        """Return the slot held at each ring index before slot `start` is written."""
        filled = min(start, self.window)
        ring = torch.arange(filled, device=self.k.device)
        # The latest slot before `start` that maps to ring index r.
        return start - 1 - (start - 1 - ring) % self.window

    def key_slots(self, start: int, t: int) -> torch.Tensor:
        new = torch.arange(start, start + t, device=self.k.device)
        return torch.cat([self._earlier_slots(start), new])

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store the last `window` of k, v ([batch, n_kv_heads, t, head_dim]) in the ring.

        Returns the earlier ring contents followed by all t new keys and values: the t queries
        together may look back up to window - 1 slots before the first of them.
        """
        t, filled = k.shape[2], min(start, self.window)
        keys = torch.cat([self.k[layer, :, :, :filled], k], dim=2)
        values = torch.cat([self.v[layer, :, :, :filled], v], dim=2)

        kept = min(t, self.window)
        ring_index = torch.arange(start + t - kept, start + t, device=k.device) % self.window
        self.k[layer, :, :, ring_index] = k[:, :, t - kept:]
        self.v[layer, :, :, ring_index] = v[:, :, t - kept:]
        return keys, values
