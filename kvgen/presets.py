"""Published model configurations, each with where its figures come from.

Decoder-only presets give the shapes of released models; `published` is the size the publisher
names the model by, shown beside the count kvgen computes from the shapes. TABLE3 holds the rows
of Table 3 of "Attention Is All You Need" (Vaswani et al. 2017, arXiv:1706.03762).
"""

from dataclasses import dataclass

from .errors import KvgenError
from .transformer_params import Arch, EncDec


@dataclass(frozen=True)
class Preset:
    arch: Arch
    published: float  # parameters, as the publisher rounds them
    source: str


def _gpt2(name, dim, layers, heads, published):
    arch = Arch(name=name, vocab_size=50257, dim=dim, n_layers=layers, n_heads=heads,
                n_kv_heads=heads, hidden_dim=4 * dim, max_context=1024, norm="layer",
                learned_positions=True, qkv_bias=True, out_bias=True, gated_mlp=False,
                mlp_bias=True, tied=True)
    return Preset(arch, published, "config.json of openai-community/" + {
        768: "gpt2", 1024: "gpt2-medium", 1280: "gpt2-large", 1600: "gpt2-xl"}[dim])


def _rotary(name, published, source, **shape):
    return Preset(Arch(name=name, **shape), published, source)


PRESETS = {p.arch.name: p for p in [
    _gpt2("gpt2-124m", 768, 12, 12, 124e6),
    _gpt2("gpt2-355m", 1024, 24, 16, 355e6),
    _gpt2("gpt2-774m", 1280, 36, 20, 774e6),
    _gpt2("gpt2-1.5b", 1600, 48, 25, 1.5e9),
    # GPT-3 is GPT-2's architecture scaled up (Brown et al. 2020, arXiv:2005.14165, section 2.1
    # and Table 2.1), with GPT-2's 50,257-token vocabulary. Its alternating locally banded
    # sparse attention layers are planned as dense: an upper bound on attention FLOPs.
    Preset(Arch(name="gpt3-175b", vocab_size=50257, dim=12288, n_layers=96, n_heads=96,
                n_kv_heads=96, hidden_dim=4 * 12288, max_context=2048, norm="layer",
                learned_positions=True, qkv_bias=True, out_bias=True, gated_mlp=False,
                mlp_bias=True, tied=True),
           175e9, "Brown et al. 2020 (arXiv:2005.14165) Table 2.1 and section 2.1"),
    _rotary("llama-2-7b", 7e9, "config.json of meta-llama/Llama-2-7b-hf", vocab_size=32000,
            dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
            max_context=4096),
    _rotary("llama-2-13b", 13e9, "config.json of meta-llama/Llama-2-13b-hf", vocab_size=32000,
            dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824,
            max_context=4096),
    _rotary("llama-2-70b", 70e9, "config.json of meta-llama/Llama-2-70b-hf", vocab_size=32000,
            dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
            max_context=4096),
    _rotary("llama-3-8b", 8e9, "config.json of meta-llama/Meta-Llama-3-8B",
            vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
            hidden_dim=14336, max_context=8192),
    _rotary("llama-3-70b", 70e9, "config.json of meta-llama/Meta-Llama-3-70B",
            vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
            hidden_dim=28672, max_context=8192),
    _rotary("mistral-7b", 7e9, "config.json of mistralai/Mistral-7B-v0.1; Jiang et al. 2023 "
            "(arXiv:2310.06825) Table 1", vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
            n_kv_heads=8, hidden_dim=14336, max_context=32768, sliding_window=4096),
    _rotary("qwen2-7b", 7e9, "config.json of Qwen/Qwen2-7B", vocab_size=152064, dim=3584,
            n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944, max_context=131072,
            qkv_bias=True),
]}


def get_preset(name: str) -> Preset:
    """Return the named preset, or raise KvgenError listing the known names."""
    if name not in PRESETS:
        raise KvgenError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class Table3Row:
    name: str
    change: str  # what differs from the base model, as the paper's row shows it
    model: EncDec
    paper_millions: int | None  # the paper's "params x10^6"; it gives none for (A), (D), (E)


_BASE = dict(n_layers=6, d_model=512, d_ff=2048, n_heads=8)


def _row(name, change, paper, **changes) -> tuple:
    return name, change, {**_BASE, **changes}, paper


# Rows (D) vary dropout and label smoothing and row (E) uses learned positional embeddings: the
# shapes are the base model's, and learned positions are not counted (stated assumption).
_TABLE3 = [
    _row("base", "", 65),
    _row("A1", "h=1, d_k=d_v=512", None, n_heads=1),
    _row("A2", "h=4, d_k=d_v=128", None, n_heads=4),
    _row("A3", "h=16, d_k=d_v=32", None, n_heads=16),
    _row("A4", "h=32, d_k=d_v=16", None, n_heads=32),
    _row("B1", "d_k=16", 58, d_k=16, d_v=64),
    _row("B2", "d_k=32", 60, d_k=32, d_v=64),
    _row("C1", "N=2", 36, n_layers=2),
    _row("C2", "N=4", 50, n_layers=4),
    _row("C3", "N=8", 80, n_layers=8),
    _row("C4", "d_model=256, d_k=d_v=32", 28, d_model=256),
    _row("C5", "d_model=1024, d_k=d_v=128", 168, d_model=1024),
    _row("C6", "d_ff=1024", 53, d_ff=1024),
    _row("C7", "d_ff=4096", 90, d_ff=4096),
    _row("D", "dropout / label smoothing", None),
    _row("E", "learned positions", None),
    _row("big", "N=6, d_model=1024, d_ff=4096, h=16", 213, d_model=1024, d_ff=4096,
         n_heads=16, d_k=64, d_v=64),
]


def table3(vocab_size: int = 37000, bias: bool = True) -> list[Table3Row]:
    """Return the rows of Table 3 as models with the given vocabulary and bias choice."""
    return [Table3Row(name, change, EncDec(**shape, vocab_size=vocab_size, bias=bias), paper)
            for name, change, shape, paper in _TABLE3]
