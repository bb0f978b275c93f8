"""The contiguous key/value cache: every layer's keys and values, preallocated for max_len slots."""

import torch


class KVCache:
    """Keys and values of every layer for a batch, in slots 0..max_len-1.

    Slot j of every row holds the token fed at step j of that batch (left padding included), so
    all rows fill the same slots at the same time; the caller says where with `start`.
    """

    def __init__(self, *, n_layers: int, batch: int, n_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device="cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        # One allocation each for K and V; layer l's view is [batch, n_kv_heads, max_len, head_dim].
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
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
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
