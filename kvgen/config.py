"""Model configuration: one dataclass, read from a Hugging Face config.json or a llama2.c header.

The families kvgen runs differ in a few named options (norm, positions, MLP, biases, window,
rope scaling); everything else is the same decoder-only transformer.
"""

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import KvgenError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
ROPE_SCALING_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int  # width of the residual stream (HF: hidden_size)
    hidden_dim: int  # width of the MLP's inner layer (HF: intermediate_size)
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads is grouped-query attention, 1 is multi-query attention
    max_seq_len: int
    head_dim: int | None = None  # None means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    model_type: str = "llama"
    # The named options that tell the families apart; the defaults are Llama's.
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with bias, GPT-2)
    position: str = "rope"  # "rope" (rotary) or "learned" (an embedding row per position)
    mlp: str = "swiglu"  # "swiglu" (gate, up, down) or "gelu" (up, GELU tanh form, down)
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2, GPT-2)
    out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases on the MLP projections (GPT-2)
    sliding_window: int | None = None  # each query sees at most this many keys (Mistral)
    rope_scaling: tuple | None = None  # ("linear", factor) or ("llama3", factor, low, high, orig)

    def __post_init__(self):
        if self.head_dim is None:
            if isinstance(self.n_heads, int) and self.n_heads > 0 and self.dim % self.n_heads:
                raise KvgenError(f"config: n_heads ({self.n_heads}) must divide dim ({self.dim}) "
                                 f"when head_dim is not given")
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        self.validate()

    def validate(self):
        """Raise KvgenError naming the first field that cannot describe a working model."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise KvgenError(f"model_type {self.model_type!r} is not supported; "
                             f"kvgen supports {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                     "max_seq_len", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise KvgenError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise KvgenError(f"config: n_kv_heads ({self.n_kv_heads}) must divide n_heads "
                             f"({self.n_heads})")
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise KvgenError(f"config: head_dim must be even for rotary embeddings, "
                             f"got {self.head_dim}")
        for name, allowed in (("norm", ("rms", "layer")), ("position", ("rope", "learned")),
                              ("mlp", ("swiglu", "gelu"))):
            if getattr(self, name) not in allowed:
                raise KvgenError(f"config field {name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window <= 0):
            raise KvgenError(f"config field sliding_window must be a positive integer or null, "
                             f"got {self.sliding_window!r}")
        if not self.norm_eps > 0:
            raise KvgenError(f"config field norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise KvgenError(f"config field rope_theta must be positive, got {self.rope_theta!r}")

    def to_hf_dict(self) -> dict:
        """Return this (Llama) configuration as a Hugging Face LlamaConfig dictionary."""
        if self.model_type != "llama" or self.rope_scaling or self.qkv_bias or self.mlp_bias:
            raise KvgenError(f"only plain Llama configurations can be written out, "
                             f"not {self.model_type!r} with these options")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,  # read by transformers 4
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},  # and 5
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }

    def as_dict(self) -> dict:
        return asdict(self)


def config_from_hf(path: Path) -> ModelConfig:
    """Return the ModelConfig described by a Hugging Face config.json file."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KvgenError(f"no config.json at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KvgenError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise KvgenError(f"{path} must hold a JSON object")

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KvgenError(f"{path}: model_type {model_type!r} is not supported; "
                         f"kvgen supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    fields = _gpt2_fields(raw, path) if model_type == "gpt2" else _llama_like_fields(raw, path)
    return ModelConfig(model_type=model_type, **fields)


def _require(raw: dict, path: Path, name: str):
    if name not in raw:
        raise KvgenError(f"{path}: required field {name!r} is missing")
    return raw[name]


def _refuse_unless(raw: dict, path: Path, option: str, allowed, default):
    value = raw.get(option, default)
    if value not in allowed:
        raise KvgenError(f"{path}: {option}={value!r} is not supported "
                         f"(kvgen supports {', '.join(map(repr, allowed))})")
    return value


def _llama_like_fields(raw: dict, path: Path) -> dict:
    """Return ModelConfig fields for llama, mistral and qwen2 configs (same names in HF)."""
    model_type = raw["model_type"]
    fields = {name: _require(raw, path, hf) for hf, name in (
        ("vocab_size", "vocab_size"), ("hidden_size", "dim"),
        ("intermediate_size", "hidden_dim"), ("num_hidden_layers", "n_layers"),
        ("num_attention_heads", "n_heads"), ("max_position_embeddings", "max_seq_len"))}
    fields["n_kv_heads"] = raw.get("num_key_value_heads") or raw["num_attention_heads"]
    fields["head_dim"] = raw.get("head_dim")
    fields["norm_eps"] = float(raw.get("rms_norm_eps", 1e-6))
    fields["tie_embeddings"] = bool(raw.get("tie_word_embeddings", False))
    _refuse_unless(raw, path, "hidden_act", ("silu",), "silu")

    if model_type == "llama":
        fields["qkv_bias"] = fields["out_bias"] = bool(raw.get("attention_bias", False))
        fields["mlp_bias"] = bool(raw.get("mlp_bias", False))
    elif model_type == "qwen2":
        fields["qkv_bias"] = True
        # Qwen2's window applies only to some layers, and only when switched on.
        _refuse_unless(raw, path, "use_sliding_window", (False,), False)
    elif model_type == "mistral":
        fields["sliding_window"] = raw.get("sliding_window")

    fields["rope_theta"], fields["rope_scaling"] = _rope(raw, path)
    return fields


def _rope(raw: dict, path: Path) -> tuple[float, tuple | None]:
    """Return (theta, scaling) from rope_theta/rope_scaling (transformers 4) or
    rope_parameters (transformers 5)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise KvgenError(f"{path}: rope_parameters must be an object, got {rope!r}")
    theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_SCALING_TYPES:
        raise KvgenError(f"{path}: rope scaling of type {kind!r} is not supported "
                         f"(kvgen supports {', '.join(ROPE_SCALING_TYPES)})")
    try:
        if kind == "linear":
            return theta, ("linear", float(rope["factor"]))
        if kind == "llama3":
            return theta, ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                           float(rope["high_freq_factor"]),
                           int(rope["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as e:
        raise KvgenError(f"{path}: rope scaling {kind!r} lacks or mangles field {e}") from None
    return theta, None


def _gpt2_fields(raw: dict, path: Path) -> dict:
    """Return ModelConfig fields for a GPT-2 config (n_embd, n_layer, n_head, ...)."""
    _refuse_unless(raw, path, "activation_function", ("gelu_new", "gelu_pytorch_tanh"),
                   "gelu_new")
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        _refuse_unless(raw, path, option, (False,), False)
    dim = _require(raw, path, "n_embd")
    n_heads = _require(raw, path, "n_head")
    return dict(
        vocab_size=_require(raw, path, "vocab_size"), dim=dim,
        hidden_dim=raw.get("n_inner") or 4 * dim, n_layers=_require(raw, path, "n_layer"),
        n_heads=n_heads, n_kv_heads=n_heads, max_seq_len=_require(raw, path, "n_positions"),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        norm="layer", position="learned", mlp="gelu",
        qkv_bias=True, out_bias=True, mlp_bias=True)


LLAMA2C_HEADER = struct.Struct("<7i")


def config_from_llama2c_header(header: bytes, path: Path) -> ModelConfig:
    """Return the ModelConfig in a llama2.c checkpoint's 28-byte header.

    The header is seven int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
    seq_len. A negative vocab_size means the file also holds an untied output classifier.
    """
    if len(header) < LLAMA2C_HEADER.size:
        raise KvgenError(f"{path}: file is {len(header)} bytes, shorter than the "
                         f"{LLAMA2C_HEADER.size}-byte llama2.c header")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = (
        LLAMA2C_HEADER.unpack(header[:LLAMA2C_HEADER.size]))
    return ModelConfig(
        vocab_size=abs(vocab_size), dim=dim, hidden_dim=hidden_dim, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_kv_heads, max_seq_len=seq_len,
        norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=vocab_size > 0,
    )
