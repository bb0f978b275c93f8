"""Transformers from their shapes alone: parameters by component, one device's share under
tensor parallelism, and the FLOPs of a forward pass.

Two kinds: the decoder-only models kvgen runs, described by `Arch` (built from a Hugging Face
config.json, a llama2.c header, a kvgen ModelConfig or a preset), and the encoder-decoder
Transformer of "Attention Is All You Need", described by `EncDec` (parameters only).

FLOPs: a multiply-add is 2 FLOPs. Counted are the matrix products (2 FLOPs per matrix entry per
token) and attention's two products, QK^T and AV: 4 x n_heads x head_dim per (query, key) pair,
a query at position p seeing min(p + 1, window) keys (causal). Norms, activations, softmax,
biases and rotary embeddings are left out: a small fraction of the total. Logits are computed
for the last position of a forward pass only, as kvgen's engine does.
"""

from dataclasses import dataclass

from .errors import KvgenError

HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


@dataclass(frozen=True)
class Arch:
    """What a decoder-only transformer's parameter count, cache and FLOPs depend on."""

    name: str
    vocab_size: int
    dim: int  # width of the residual stream (d_model)
    n_layers: int
    n_heads: int
    n_kv_heads: int  # fewer than n_heads is grouped-query attention
    hidden_dim: int  # width of the MLP's inner layer
    max_context: int  # longest sequence the model was built for (rows of a learned table)
    head_dim: int | None = None  # None means dim // n_heads
    norm: str = "rms"  # "rms" (a weight) or "layer" (a weight and a bias)
    learned_positions: bool = False  # an embedding row per position (GPT-2) instead of rotary
    qkv_bias: bool = False
    out_bias: bool = False
    gated_mlp: bool = True  # three matrices (gate, up, down) or two (up, down)
    mlp_bias: bool = False
    tied: bool = False  # the output head reuses the token embedding
    sliding_window: int | None = None  # each query sees at most this many keys

    def __post_init__(self):
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                      "max_context"):
            _positive(self.name, field, getattr(self, field))
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise KvgenError(f"{self.name}: n_heads ({self.n_heads}) must divide dim "
                                 f"({self.dim}) when head_dim is not given")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        _positive(self.name, "head_dim", self.head_dim)
        if self.n_heads % self.n_kv_heads:
            raise KvgenError(f"{self.name}: n_kv_heads ({self.n_kv_heads}) must divide n_heads "
                             f"({self.n_heads})")
        if self.norm not in ("rms", "layer"):
            raise KvgenError(f"{self.name}: norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.sliding_window is not None:
            _positive(self.name, "sliding_window", self.sliding_window)


def _positive(name: str, field: str, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise KvgenError(f"{name}: {field} must be a positive integer, got {value!r}")


@dataclass
class ParamCounts:
    token_embedding: int
    position_embedding: int
    attention: int  # all layers: q, k, v, output projections and their biases
    mlp: int  # all layers, biases included
    norms: int  # two per layer and the final one
    output_head: int  # 0 when tied to the token embedding (counted once, there)
    total: int


def attention_weights(a: Arch) -> int:
    """Return one layer's attention matrix entries (no biases): q and o are n_heads wide,
    k and v n_kv_heads wide."""
    return 2 * a.dim * a.head_dim * (a.n_heads + a.n_kv_heads)


def mlp_weights(a: Arch) -> int:
    """Return one layer's MLP matrix entries (no biases)."""
    return (3 if a.gated_mlp else 2) * a.dim * a.hidden_dim


def count_params(a: Arch) -> ParamCounts:
    """Return the parameters of a decoder-only model by component, tied weights counted once."""
    attn_bias = (a.head_dim * (a.n_heads + 2 * a.n_kv_heads) if a.qkv_bias else 0) \
        + (a.dim if a.out_bias else 0)
    mlp_bias = ((2 if a.gated_mlp else 1) * a.hidden_dim + a.dim) if a.mlp_bias else 0
    norm = a.dim * (2 if a.norm == "layer" else 1)
    counts = dict(
        token_embedding=a.vocab_size * a.dim,
        position_embedding=a.max_context * a.dim if a.learned_positions else 0,
        attention=a.n_layers * (attention_weights(a) + attn_bias),
        mlp=a.n_layers * (mlp_weights(a) + mlp_bias),
        norms=(2 * a.n_layers + 1) * norm,
        output_head=0 if a.tied else a.vocab_size * a.dim)
    return ParamCounts(**counts, total=sum(counts.values()))


def arch_from_hf(raw: dict, source: str) -> Arch:
    """Return the Arch of a Hugging Face config.json dictionary (llama, mistral, qwen2, gpt2).

    Qwen2's optional sliding window (off in the released models, and only on some layers when
    on) is not modelled: its cache is planned as full attention, which never undercounts.
    """
    if not isinstance(raw, dict):
        raise KvgenError(f"{source}: expected a JSON object")
    kind = raw.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise KvgenError(f"{source}: model_type {kind!r} is not supported; the planner "
                         f"reads {', '.join(HF_MODEL_TYPES)}")

    def need(field):
        if field not in raw:
            raise KvgenError(f"{source}: required field {field!r} is missing")
        return raw[field]

    if kind == "gpt2":
        dim = need("n_embd")
        return Arch(name=source, vocab_size=need("vocab_size"), dim=dim,
                    n_layers=need("n_layer"), n_heads=need("n_head"), n_kv_heads=need("n_head"),
                    hidden_dim=raw.get("n_inner") or 4 * dim, max_context=need("n_positions"),
                    norm="layer", learned_positions=True, qkv_bias=True, out_bias=True,
                    gated_mlp=False, mlp_bias=True,
                    tied=bool(raw.get("tie_word_embeddings", True)))
    heads = need("num_attention_heads")
    attention_bias = bool(raw.get("attention_bias", False)) if kind == "llama" else False
    return Arch(name=source, vocab_size=need("vocab_size"), dim=need("hidden_size"),
                n_layers=need("num_hidden_layers"), n_heads=heads,
                n_kv_heads=raw.get("num_key_value_heads") or heads,
                hidden_dim=need("intermediate_size"),
                max_context=need("max_position_embeddings"), head_dim=raw.get("head_dim"),
                qkv_bias=attention_bias or kind == "qwen2", out_bias=attention_bias,
                mlp_bias=bool(raw.get("mlp_bias", False)) if kind == "llama" else False,
                tied=bool(raw.get("tie_word_embeddings", False)),
                sliding_window=raw.get("sliding_window") if kind == "mistral" else None)


def arch_from_config(cfg, name: str) -> Arch:
    """Return the Arch of a kvgen ModelConfig."""
    return Arch(name=name, vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers,
                n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, hidden_dim=cfg.hidden_dim,
                max_context=cfg.max_seq_len, head_dim=cfg.head_dim, norm=cfg.norm,
                learned_positions=cfg.position == "learned", qkv_bias=cfg.qkv_bias,
                out_bias=cfg.out_bias, gated_mlp=cfg.mlp == "swiglu", mlp_bias=cfg.mlp_bias,
                tied=cfg.tie_embeddings, sliding_window=cfg.sliding_window)


@dataclass
class Shard:
    """One device's part of a model split over n devices (Megatron-style tensor parallelism):
    heads, MLP columns and the vocabulary divided; norms, position table and the biases of
    row-split layers (attention output, MLP down) replicated; a KV head replicated on each
    device that needs it when there are fewer KV heads than devices."""

    heads: int
    kv_heads: int
    layer_matmul: int  # matrix entries of one layer multiplied on this device
    head_matmul: int  # entries of the output head multiplied on this device
    params: int  # every parameter this device holds
    table_params: int  # of those, in lookup tables a step reads only a row of per sequence
    table_rows: int  # entries such a step reads per sequence, over all those tables


def tp_degrees(a: Arch) -> list[int]:
    """Return the device counts that split a model's heads evenly: n divides n_heads, and
    divides n_kv_heads or is a multiple of it."""
    return [n for n in range(1, a.n_heads + 1) if a.n_heads % n == 0
            and (a.n_kv_heads % n == 0 or n % a.n_kv_heads == 0)]


def shard(a: Arch, n: int = 1) -> Shard:
    """Return one device's part of the model split over n devices (n = 1: the whole model)."""
    if n not in tp_degrees(a):
        raise KvgenError(f"tp {n} does not split {a.name}'s {a.n_heads} heads and "
                         f"{a.n_kv_heads} KV heads evenly; possible: "
                         f"{', '.join(map(str, tp_degrees(a)))}")
    heads, kv_heads = a.n_heads // n, max(a.n_kv_heads // n, 1)
    hidden, vocab = -(-a.hidden_dim // n), -(-a.vocab_size // n)
    mlp_matrices = 3 if a.gated_mlp else 2
    layer_matmul = 2 * a.dim * a.head_dim * (heads + kv_heads) + mlp_matrices * a.dim * hidden
    bias = (a.head_dim * (heads + 2 * kv_heads) if a.qkv_bias else 0) \
        + (a.dim if a.out_bias else 0) \
        + ((mlp_matrices - 1) * hidden + a.dim if a.mlp_bias else 0)
    norm = a.dim * (2 if a.norm == "layer" else 1)
    positions = a.max_context * a.dim if a.learned_positions else 0
    tables = positions + (0 if a.tied else vocab * a.dim)
    params = a.n_layers * (layer_matmul + bias + 2 * norm) + norm + positions + vocab * a.dim \
        + (0 if a.tied else vocab * a.dim)
    rows = a.dim * (int(a.learned_positions) + int(not a.tied))
    return Shard(heads, kv_heads, layer_matmul, vocab * a.dim, params, tables, rows)


def keys_attended(tokens: int, window: int | None) -> int:
    """Return the (query, key) pairs of causal attention over positions 0..tokens-1."""
    if window is None or tokens <= window:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


def forward_flops(a: Arch, *, start: int, tokens: int, tp: int = 1) -> tuple[int, int]:
    """Return (matrix-product FLOPs, attention FLOPs) of one sequence's forward pass over
    `tokens` new tokens at positions start.., on one of tp devices."""
    part = shard(a, tp)
    matmul = 2 * (a.n_layers * part.layer_matmul * tokens + part.head_matmul)
    pairs = keys_attended(start + tokens, a.sliding_window) \
        - keys_attended(start, a.sliding_window)
    return matmul, 4 * a.n_layers * part.heads * a.head_dim * pairs


def generation_flops(a: Arch, prompt_len: int, new_tokens: int, cached: bool) -> int:
    """Return one sequence's FLOPs to generate new_tokens after prompt_len, in closed form.

    Cached: a prefill over s tokens, then n - 1 one-token steps at positions s..s+n-2.
    Uncached: n forwards over s, s+1, ..., s+n-1 tokens (recomputing the sequence so far).
    """
    s, n, w = prompt_len, new_tokens, a.sliding_window
    part = shard(a)
    per_token, per_forward = 2 * a.n_layers * part.layer_matmul, 2 * part.head_matmul
    per_pair = 4 * a.n_layers * a.n_heads * a.head_dim
    if cached:
        return per_token * (s + n - 1) + per_forward * n + per_pair * keys_attended(s + n - 1, w)
    tokens = n * s + n * (n - 1) // 2
    return per_token * tokens + per_forward * n + per_pair * _sum_keys(s, s + n - 1, w)


def _sum_keys(lo: int, hi: int, window: int | None) -> int:
    """Return keys_attended(T) summed over T = lo..hi, in closed form."""
    def tetrahedral(m):  # sum of T(T+1)/2 for T = 0..m
        return m * (m + 1) * (m + 2) // 6

    full_hi = hi if window is None else min(hi, window)
    total = tetrahedral(full_hi) - tetrahedral(lo - 1) if lo <= full_hi else 0
    if window is not None and hi > window:
        first = max(lo, window + 1)
        count = hi - first + 1
        total += count * window * (window + 1) // 2
        total += window * ((first - window) + (hi - window)) * count // 2
    return total


# The encoder-decoder Transformer (Vaswani et al. 2017, arXiv:1706.03762), counted as the paper
# describes it: one vocabulary shared by source and target embeddings and the output projection;
# a bias on every linear layer (no bias on the tied output projection); LayerNorm (weight and
# bias) after each sub-layer: two per encoder layer, three per decoder layer; sinusoidal
# positions, which have no parameters.

@dataclass(frozen=True)
class EncDec:
    n_layers: int  # N: layers in the encoder, and again in the decoder
    d_model: int
    d_ff: int
    n_heads: int
    d_k: int | None = None  # None means d_model // n_heads
    d_v: int | None = None  # None means d_model // n_heads
    vocab_size: int = 37000
    bias: bool = True

    def __post_init__(self):
        for field in ("n_layers", "d_model", "d_ff", "n_heads", "vocab_size"):
            _positive("transformer", field, getattr(self, field))
        if self.d_model % self.n_heads and (self.d_k is None or self.d_v is None):
            raise KvgenError(f"transformer: n_heads ({self.n_heads}) must divide d_model "
                             f"({self.d_model}) when d_k or d_v is not given")
        for field in ("d_k", "d_v"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, self.d_model // self.n_heads)
            _positive("transformer", field, getattr(self, field))


@dataclass
class EncDecCounts:
    embedding: int  # shared by source, target and the output projection
    encoder_layer: int
    decoder_layer: int
    total: int


def encdec_params(m: EncDec) -> EncDecCounts:
    """Return the parameters of the encoder-decoder Transformer, per layer and in total."""
    d, b = m.d_model, int(m.bias)
    qk = 2 * (d * m.n_heads * m.d_k + b * m.n_heads * m.d_k)
    v = d * m.n_heads * m.d_v + b * m.n_heads * m.d_v
    out = m.n_heads * m.d_v * d + b * d
    attention = qk + v + out
    ffn = 2 * d * m.d_ff + b * (m.d_ff + d)
    layer_norm = 2 * d
    encoder = attention + ffn + 2 * layer_norm
    decoder = 2 * attention + ffn + 3 * layer_norm  # self-attention and encoder-decoder attention
    embedding = m.vocab_size * d
    return EncDecCounts(embedding, encoder, decoder,
                        embedding + m.n_layers * (encoder + decoder))
