"""A decoder-only transformer for the Llama, Mistral, Qwen2 and GPT-2 families, in plain PyTorch.

Pre-norm blocks: x += attention(norm(x)); x += mlp(norm(x)). The families differ only in
named options of ModelConfig: RMSNorm or LayerNorm, rotary or learned positions, a SwiGLU or a
GELU MLP, which projections carry biases, a sliding attention window. Rotary embeddings use the
Hugging Face "two halves" layout; grouped-query attention lets each group of
n_heads // n_kv_heads query heads share one key/value head.

The same forward runs a whole sequence (no cache), a prompt into a cache (prefill), or a few new
tokens against the cache (decode); the caller says where the tokens go with `start` and what
each may see with `mask`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import paged_attention
from .config import ModelConfig
from .kernels import Linear, gelu_tanh, linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)  # one fused kernel
        # Normalise in float32 so half-precision weights do not lose the small mean of squares.
        x32 = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
    return RMSNorm(cfg.dim, cfg.norm_eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None = None) -> torch.Tensor:
    """Return the rotary inverse frequencies [head_dim / 2], after any rope scaling.

    "linear" divides every frequency by the factor (positions stretched alike). "llama3"
    (Llama 3.1's published rule) leaves high frequencies, whose wavelength is short against
    the original context, alone; divides low ones by the factor; and blends in between.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling[0] == "linear":
        return inv_freq / scaling[1]

    _, factor, low_freq_factor, high_freq_factor, original_context = scaling
    wavelength = 2 * math.pi / inv_freq
    long_wave = original_context / low_freq_factor  # longer than this: scale fully
    short_wave = original_context / high_freq_factor  # shorter than this: keep
    blend = (original_context / wavelength - low_freq_factor) / (high_freq_factor
                                                                 - low_freq_factor)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    scaled = torch.where(wavelength > long_wave, inv_freq / factor, blended)
    return torch.where(wavelength < short_wave, inv_freq, scaled)


def rope_tables(head_dim: int, max_pos: int, theta: float, scaling: tuple | None = None):
    """Return cos and sin tables, each [max_pos, head_dim], for the two-halves rotary layout."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # dim i and i + head_dim/2 share an angle
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + head_dim/2]) of x [b, heads, t, head_dim] by its angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rotary = cfg.position == "rope"
        # q, k and v in one matrix (rows: q, then k, then v): one matmul instead of three, which
        # matters when a decode step is dominated by per-operation overhead.
        self.wqkv = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim,
                           bias=cfg.qkv_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)

    def forward(self, x, cos, sin, mask, cache, layer: int, start: int, causal: bool = False):
        b, t, _ = x.shape
        qkv = self.wqkv(x).view(b, t, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qkv = qkv.transpose(1, 2)  # [b, n_heads + 2 * n_kv_heads, t, head_dim]
        n_qk = self.n_heads + self.n_kv_heads

        qk = qkv[:, :n_qk]
        if self.rotary:
            qk = apply_rope(qk, cos, sin)  # queries and keys rotate alike: one call for both
        q, k, v = qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, n_qk:]
        # q: [b, n_heads, t, head_dim]; k, v: [b, n_kv_heads, t, head_dim]

        if getattr(cache, "attends_in_place", False):  # the engine's paged attention kernel
            return self.wo(cache.attend(layer, q, k, v))

        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # now [b, n_kv_heads, n_keys, head_dim]
            if t == 1:  # a decode step: the C kernel, unless its mask is not left padding
                out = paged_attention.decode_attention(q, k, v, mask)
                if out is not None:
                    return self.wo(out.view(b, t, self.n_heads * self.head_dim))

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU, down(silu(gate(x)) * up(x)), or GPT-2's down(gelu_tanh(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        if self.gated:  # gate and up in one matrix (rows: gate, then up), one matmul
            self.w_gate_up = Linear(cfg.dim, 2 * cfg.hidden_dim, bias=cfg.mlp_bias)
        else:
            self.w_up = Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.w_down = Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.gated:
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)
            return self.w_down(F.silu(gate) * up)
        return self.w_down(gelu_tanh(self.w_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, start, causal=False):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, start, causal)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.position == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        # A tied model reads its classifier from the embedding matrix; it has no lm_head.
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size,
                                                              bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rope()

    def reset_rope(self):
        """(Re)build the rotary tables on the embedding's device; a model built on the "meta"
        device for loading has none until its weights are assigned."""
        if self.cfg.position != "rope":
            return
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                               self.cfg.rope_scaling)
        device = self.embed.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, tokens, positions, mask=None, cache=None, start: int = 0,
                last_only: bool = False, causal: bool = False, logits_at=None):
        """Return logits [b, t, vocab] (or [b, 1, vocab] with last_only) for tokens [b, t].

        positions [b, t] are each token's position in its own sequence (left padding makes them
        differ per row). mask [b, 1, t, n_keys] is True where a query may attend to a key;
        None lets every query see every key, or, with causal, each query the keys up to its
        own: the causal rule needs no mask tensor when a pass starts at slot 0 without padding
        (PyTorch's attention kernels then also skip the masked half of the scores). Without a
        cache the keys are the t tokens; with one, the tokens' keys and values go to slots
        start..start+t-1 and the queries attend to what cache.update returns (see
        cache.key_slots for which slots those are); a cache that attends_in_place takes the
        queries too and returns the attention output itself. logits_at [k] picks the tokens
        along t whose logits are wanted (logits [b, k, vocab]); last_only is logits_at=[t - 1].
        """
        if causal and (mask is not None or start != 0):
            raise ValueError("causal=True takes no mask and starts at slot 0")
        x = self.embed(tokens)  # [b, t, dim]
        cos = sin = None
        if self.cfg.position == "learned":
            x = x + self.pos_embed(positions)
        else:
            cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)  # [b, 1, t, head_dim]
            sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)

        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, start, causal)

        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[:, logits_at]
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return linear(x, weight)


def fused_parts(cfg: ModelConfig) -> dict:
    """Return, for each fused projection, its checkpoint parts and their row counts.

    Checkpoints store q, k, v (and gate, up) as separate matrices; the model keeps each group
    in one. fuse_weights and split_weights translate between the two layouts.
    """
    kv_rows = cfg.n_kv_heads * cfg.head_dim
    parts = {"attn.wqkv": {"attn.wq": cfg.n_heads * cfg.head_dim, "attn.wk": kv_rows,
                           "attn.wv": kv_rows}}
    if cfg.mlp == "swiglu":
        parts["mlp.w_gate_up"] = {"mlp.w_gate": cfg.hidden_dim, "mlp.w_up": cfg.hidden_dim}
    return parts


def _layer_groups(cfg: ModelConfig):
    for i in range(cfg.n_layers):
        for fused, parts in fused_parts(cfg).items():
            for kind in ("weight", "bias"):
                yield (f"layers.{i}.{fused}.{kind}",
                       {f"layers.{i}.{part}.{kind}": rows for part, rows in parts.items()})


def fuse_weights(tensors: dict, cfg: ModelConfig) -> dict:
    """Return a state dict with separate q/k/v (gate/up) tensors joined into the fused ones."""
    out = dict(tensors)
    for fused, parts in _layer_groups(cfg):
        if all(name in out for name in parts):
            out[fused] = torch.cat([out.pop(name) for name in parts])
    return out


def split_weights(tensors: dict, cfg: ModelConfig) -> dict:
    """Return a state dict with each fused tensor split back into its checkpoint parts."""
    out = dict(tensors)
    for fused, parts in _layer_groups(cfg):
        if fused in out:
            out.update(zip(parts, out.pop(fused).split(list(parts.values()))))
    return out


def attention_mask(pad_lens: torch.Tensor, start: int, t: int, key_slots=None,
                   window: int | None = None) -> torch.Tensor:
    """Return the boolean mask [b, 1, t, n_keys] for t queries at slots start..start+t-1.

    key_slots [n_keys] gives the slot of each key (default: slots 0..start+t-1 in order). Query
    slot s sees key slot j when j <= s (causal, aligned to the end: with fewer queries than
    keys, the last query sees every key), when j is not left padding of that row, and, with a
    window, when s - j < window. A padding query sees itself too, so no softmax row is empty:
    its output is never used, but a NaN there would reach the real rows through the cache.
    """
    device = pad_lens.device
    if key_slots is None:
        key_slots = torch.arange(start + t, device=device)  # [n_keys]
    query_slots = torch.arange(start, start + t, device=device)  # [t]
    visible = key_slots[None, :] <= query_slots[:, None]  # [t, n_keys]
    if window is not None:
        visible &= query_slots[:, None] - key_slots[None, :] < window
    not_pad = key_slots[None, :] >= pad_lens[:, None]  # [b, n_keys]
    itself = key_slots[None, :] == query_slots[:, None]
    mask = (visible[None] & not_pad[:, None, :]) | itself[None]
    return mask.unsqueeze(1)
