"""Hugging Face tensor names and layouts, translated to kvgen's parameter names.

Llama, Mistral and Qwen2 share one naming scheme. GPT-2 differs in names and in layout: its
projections are Conv1D modules, stored (in_features, out_features), the transpose of
nn.Linear, and its q, k and v live in one fused matrix.
"""

import re

import torch

from .config import ModelConfig

# Module paths, Hugging Face -> kvgen; ".weight" or ".bias" follows either. {i}: layer index.
_LLAMA_MODULES = {
    "model.embed_tokens": "embed",
    "model.norm": "norm",
    "lm_head": "lm_head",
    "model.layers.{i}.input_layernorm": "layers.{i}.attn_norm",
    "model.layers.{i}.self_attn.q_proj": "layers.{i}.attn.wq",
    "model.layers.{i}.self_attn.k_proj": "layers.{i}.attn.wk",
    "model.layers.{i}.self_attn.v_proj": "layers.{i}.attn.wv",
    "model.layers.{i}.self_attn.o_proj": "layers.{i}.attn.wo",
    "model.layers.{i}.post_attention_layernorm": "layers.{i}.mlp_norm",
    "model.layers.{i}.mlp.gate_proj": "layers.{i}.mlp.w_gate",
    "model.layers.{i}.mlp.up_proj": "layers.{i}.mlp.w_up",
    "model.layers.{i}.mlp.down_proj": "layers.{i}.mlp.w_down",
}
_GPT2_MODULES = {
    "wte": "embed",
    "wpe": "pos_embed",
    "ln_f": "norm",
    "lm_head": "lm_head",
    "h.{i}.ln_1": "layers.{i}.attn_norm",
    "h.{i}.attn.c_attn": "layers.{i}.attn.wqkv",  # split into wq, wk, wv below
    "h.{i}.attn.c_proj": "layers.{i}.attn.wo",
    "h.{i}.ln_2": "layers.{i}.mlp_norm",
    "h.{i}.mlp.c_fc": "layers.{i}.mlp.w_up",
    "h.{i}.mlp.c_proj": "layers.{i}.mlp.w_down",
}
_CONV1D = re.compile(r"\.(attn\.wqkv|attn\.wo|mlp\.w_up|mlp\.w_down)\.weight$")

# Tensors that checkpoints carry but that are derived, not learned: safe to skip.
_DERIVED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


def _compile(modules: dict) -> list:
    def pattern(path):
        return re.compile("^" + re.escape(path).replace(r"\{i\}", r"(\d+)")
                          + r"\.(weight|bias)$")
    return [(pattern(theirs), ours) for theirs, ours in modules.items()]


_PATTERNS = {"llama": _compile(_LLAMA_MODULES), "gpt2": _compile(_GPT2_MODULES)}
_INVERSE = [(re.compile("^" + re.escape(ours).replace(r"\{i\}", r"(\d+)") + r"\.(weight|bias)$"),
             theirs) for theirs, ours in _LLAMA_MODULES.items()]


def _rename(name: str, patterns) -> str | None:
    for pattern, ours in patterns:
        m = pattern.match(name)
        if m:
            *layer, kind = m.groups()
            return (ours.format(i=layer[0]) if layer else ours) + "." + kind
    return None


def hf_to_kvgen(tensors: dict, cfg: ModelConfig) -> dict:
    """Return a checkpoint's tensors under kvgen's names, in kvgen's layouts.

    Derived buffers are dropped; a tied model's stored classifier is dropped (it is the
    embedding). Names kvgen does not know are kept as they are, so that loading reports them.
    """
    family = "gpt2" if cfg.model_type == "gpt2" else "llama"
    out = {}
    for name, tensor in tensors.items():
        if _DERIVED.search(name):
            continue
        if family == "gpt2":
            name = name.removeprefix("transformer.")
        ours = _rename(name, _PATTERNS[family]) or name
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if family == "gpt2" and _CONV1D.search(ours):
            # A copy in (out, in) row-major order: the layout the decode kernels read fastest.
            tensor = tensor.t().contiguous()
        out[ours] = tensor
    return _split_fused_qkv(out, cfg) if family == "gpt2" else out


def _split_fused_qkv(tensors: dict, cfg: ModelConfig) -> dict:
    """Split GPT-2's fused q|k|v projection (rows stacked q, then k, then v) into three."""
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            fused = tensors.pop(f"layers.{i}.attn.wqkv.{kind}", None)
            if fused is None or fused.shape[0] % 3:
                if fused is not None:
                    tensors[f"layers.{i}.attn.wqkv.{kind}"] = fused  # reported by shape check
                continue
            q, k, v = torch.chunk(fused, 3, dim=0)
            for part, t in zip(("wq", "wk", "wv"), (q, k, v)):
                tensors[f"layers.{i}.attn.{part}.{kind}"] = t
    return tensors


def kvgen_name_to_hf(name: str) -> str:
    """Return the Hugging Face Llama name of a kvgen parameter."""
    for pattern, theirs in _INVERSE:
        m = pattern.match(name)
        if m:
            *layer, kind = m.groups()
            return (theirs.format(i=layer[0]) if layer else theirs) + "." + kind
    raise KeyError(name)
