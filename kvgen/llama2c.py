"""llama2.c's legacy checkpoint format: a 28-byte header, then float32 arrays, never unpickled."""

from pathlib import Path

import numpy as np
import torch

from .config import LLAMA2C_HEADER, ModelConfig, config_from_llama2c_header
from .errors import KvgenError

LLAMA2C_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export format, not the legacy one


def llama2c_layout(cfg: ModelConfig) -> list[tuple[str, tuple]]:
    """Return (kind, shape) of each array in a legacy llama2.c file, in file order.

    Each kind stacks all layers (layer 0 first); see run.c's memory_map_weights.
    """
    d, h, l, hd = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.head_dim
    kv = cfg.n_kv_heads * hd
    layout = [
        ("embed", (cfg.vocab_size, d)), ("attn_norm", (l, d)),
        ("wq", (l, cfg.n_heads * hd, d)), ("wk", (l, kv, d)), ("wv", (l, kv, d)),
        ("wo", (l, d, cfg.n_heads * hd)), ("mlp_norm", (l, d)),
        ("w_gate", (l, h, d)), ("w_down", (l, d, h)), ("w_up", (l, h, d)),
        ("norm", (d,)),
        ("rope_cos_unused", (cfg.max_seq_len, hd // 2)),
        ("rope_sin_unused", (cfg.max_seq_len, hd // 2)),
    ]
    if not cfg.tie_embeddings:
        layout.append(("lm_head", (cfg.vocab_size, d)))
    return layout


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Return a q or k projection with rows reordered from interleaved rotary pairs to halves.

    llama2.c rotates dims (2i, 2i+1) of each head together; kvgen (like Hugging Face) rotates
    (i, i + head_dim/2). Moving the even rows of each head first, then the odd ones, makes the
    same weights compute the same attention scores under the other convention.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return (w.view(n_heads, head_dim // 2, 2, in_features)
            .transpose(1, 2).reshape(out_features, in_features))


def read_llama2c(path: Path) -> tuple[ModelConfig, dict]:
    """Return the config and kvgen-named tensors of a legacy llama2.c checkpoint."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(LLAMA2C_HEADER.size)
    if len(header) >= 4 and int.from_bytes(header[:4], "little") == LLAMA2C_V1_MAGIC:
        raise KvgenError(f"{path}: llama2.c version-1 export format; only the legacy format "
                         f"(seven int32 header fields, then float32 weights) is supported")
    cfg = config_from_llama2c_header(header, path)

    layout = llama2c_layout(cfg)
    n_floats = sum(int(np.prod(shape)) for _, shape in layout)
    expected = LLAMA2C_HEADER.size + 4 * n_floats
    if size != expected:
        what = "truncated" if size < expected else "longer than its header implies"
        raise KvgenError(f"{path}: file is {size} bytes but its header implies {expected}: {what}")

    # Reading raw float32 with an explicit dtype and offset: no code in the file can run.
    data = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=LLAMA2C_HEADER.size).copy())
    arrays, offset = {}, 0
    for kind, shape in layout:
        n = int(np.prod(shape))
        arrays[kind] = data[offset:offset + n].view(shape)
        offset += n

    tensors = {"embed.weight": arrays["embed"], "norm.weight": arrays["norm"]}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = arrays["lm_head"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        tensors[p + "attn_norm.weight"] = arrays["attn_norm"][i]
        tensors[p + "attn.wq.weight"] = interleaved_to_halves(arrays["wq"][i], cfg.n_heads)
        tensors[p + "attn.wk.weight"] = interleaved_to_halves(arrays["wk"][i], cfg.n_kv_heads)
        tensors[p + "attn.wv.weight"] = arrays["wv"][i]
        tensors[p + "attn.wo.weight"] = arrays["wo"][i]
        tensors[p + "mlp_norm.weight"] = arrays["mlp_norm"][i]
        tensors[p + "mlp.w_gate.weight"] = arrays["w_gate"][i]
        tensors[p + "mlp.w_up.weight"] = arrays["w_up"][i]
        tensors[p + "mlp.w_down.weight"] = arrays["w_down"][i]
    return cfg, tensors


def is_llama2c_checkpoint(path: Path) -> bool:
    """Return whether a file's size is exactly what its llama2.c header implies."""
    try:
        with open(path, "rb") as f:
            cfg = config_from_llama2c_header(f.read(LLAMA2C_HEADER.size), path)
    except (KvgenError, OSError):
        return False
    n_floats = sum(int(np.prod(shape)) for _, shape in llama2c_layout(cfg))
    return path.stat().st_size == LLAMA2C_HEADER.size + 4 * n_floats
