"""Model configuration: one dataclass, read from a Hugging Face config.json or a llama2.c header."""

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import KvgenError

SUPPORTED_MODEL_TYPES = ("llama",)


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
            raise KvgenError(
                f"model_type {self.model_type!r} is not supported; "
                f"kvgen supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                     "max_seq_len", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise KvgenError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise KvgenError(
                f"config: n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})"
            )
        if self.head_dim % 2 != 0:
            raise KvgenError(f"config: head_dim must be even for rotary embeddings, "
                             f"got {self.head_dim}")
        if not self.norm_eps > 0:
            raise KvgenError(f"config field norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise KvgenError(f"config field rope_theta must be positive, got {self.rope_theta!r}")

    def to_hf_dict(self) -> dict:
        """Return this configuration as a Hugging Face LlamaConfig dictionary."""
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


# HF field -> our field. Fields not listed here are either derived or irrelevant to inference.
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "intermediate_size": "hidden_dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "max_position_embeddings": "max_seq_len",
}


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
        raise KvgenError(
            f"{path}: model_type {model_type!r} is not supported; "
            f"kvgen supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # transformers 5 writes rope settings as "rope_parameters"; earlier versions as rope_theta
    # plus an optional "rope_scaling". Only plain rotary embeddings are supported so far.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise KvgenError(f"{path}: rope_parameters must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise KvgenError(f"{path}: rope scaling of type {rope_type!r} is not supported "
                         f"(kvgen supports plain rotary embeddings)")
    for option, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if raw.get(option, ok) != ok:
            raise KvgenError(f"{path}: {option}={raw[option]!r} is not supported "
                             f"(kvgen expects {ok!r})")

    fields = {}
    for hf_name, name in _HF_FIELDS.items():
        if hf_name not in raw:
            raise KvgenError(f"{path}: required field {hf_name!r} is missing")
        fields[name] = raw[hf_name]
    fields["n_kv_heads"] = raw.get("num_key_value_heads") or raw["num_attention_heads"]
    fields["head_dim"] = raw.get("head_dim")
    fields["norm_eps"] = float(raw.get("rms_norm_eps", 1e-6))
    fields["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    fields["tie_embeddings"] = bool(raw.get("tie_word_embeddings", False))
    return ModelConfig(model_type=model_type, **fields)


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
