"""Checkpoint loading: Hugging Face safetensors directories and llama2.c files, never unpickled.

Both formats end as one state dict in kvgen's own parameter names, checked against the model's
expected names and shapes before a single weight is assigned.
"""

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .config import LLAMA2C_HEADER, ModelConfig, config_from_hf, config_from_llama2c_header
from .errors import KvgenError
from .model import Transformer

log = logging.getLogger(__name__)

# Hugging Face Llama parameter names -> kvgen's names ({i} is the layer index).
_HF_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.w_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w_down.weight",
}
_HF_PATTERNS = [
    (re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), ours)
    for hf, ours in _HF_NAMES.items()
]
# Tensors some checkpoints carry that are derived, not learned: safe to skip.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def hf_name_to_kvgen(name: str) -> str | None:
    """Return kvgen's name for a Hugging Face Llama tensor name, or None if it has none."""
    for pattern, ours in _HF_PATTERNS:
        m = pattern.match(name)
        if m:
            return ours.format(i=m.group(1)) if m.groups() else ours
    return None


def kvgen_name_to_hf(name: str) -> str:
    """Return the Hugging Face Llama name of a kvgen parameter."""
    for hf, ours in _HF_NAMES.items():
        pattern = "^" + re.escape(ours).replace(r"\{i\}", r"(\d+)") + "$"
        m = re.match(pattern, name)
        if m:
            return hf.format(i=m.group(1)) if m.groups() else hf
    raise KeyError(name)


def build_model(cfg: ModelConfig, tensors: dict, *, source: Path, dtype=None,
                device="cpu") -> Transformer:
    """Return a Transformer holding `tensors` (kvgen names), after checking every name and shape."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}

    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise KvgenError(f"{source}: weights lack tensor(s) the model needs: {', '.join(missing)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise KvgenError(f"{source}: weights hold tensor(s) the model does not use: "
                         f"{', '.join(unexpected)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise KvgenError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                             f"expected {shape}")

    dtype = dtype or torch.float32
    tensors = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.reset_rope()
    return model.eval()


# ---------------------------------------------------------------- Hugging Face directories

def load_hf_dir(path: Path, *, dtype=None, device="cpu") -> Transformer:
    """Return the model in a Hugging Face directory (config.json plus safetensors weights)."""
    cfg = config_from_hf(path / "config.json")
    tensors = {}
    for name, tensor in _read_safetensors(path).items():
        ours = hf_name_to_kvgen(name)
        if ours is None:
            if _IGNORED.search(name):
                continue
            ours = name  # reported as unused by build_model, under its own name
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # a tied checkpoint may still store the classifier; it is the embedding
        tensors[ours] = tensor
    return build_model(cfg, tensors, source=path, dtype=dtype, device=device)


def _read_safetensors(path: Path) -> dict:
    """Return every tensor of a directory's model.safetensors or sharded safetensors files."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise KvgenError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        raise KvgenError(f"{path}: no model.safetensors or model.safetensors.index.json "
                         f"(only safetensors weights are loaded)")

    tensors = {}
    for file in files:
        if not file.exists():
            raise KvgenError(f"{file}: weight file listed in the index is missing")
        try:
            # safe_open memory-maps the file: tensors are read from disk as they are copied.
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except KvgenError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise KvgenError(f"{file}: cannot read safetensors file, truncated or corrupt "
                             f"({e})") from None
    return tensors


# ---------------------------------------------------------------- llama2.c checkpoints

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


def load_llama2c(path: Path, *, dtype=None, device="cpu") -> Transformer:
    """Return the model in a legacy llama2.c checkpoint file."""
    cfg, tensors = read_llama2c(path)
    return build_model(cfg, tensors, source=path, dtype=dtype, device=device)
