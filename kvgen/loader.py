"""Checkpoint loading: Hugging Face directories and llama2.c files, never unpickled.

Every format ends as one state dict in kvgen's own parameter names, checked against the
model's expected names and shapes before a single weight is assigned.
"""

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig, config_from_hf
from .errors import KvgenError
from .hf_names import hf_to_kvgen, kvgen_name_to_hf  # noqa: F401  (re-exported)
from .llama2c import is_llama2c_checkpoint, read_llama2c  # noqa: F401  (re-exported)
from .model import Transformer, fuse_weights, split_weights

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, tensors: dict, *, source: Path, dtype=None,
                device="cpu") -> Transformer:
    """Return a Transformer holding `tensors` (kvgen names), after checking every name and shape."""
    with torch.device("meta"):
        model = Transformer(cfg)
    # Check in the checkpoint's layout (q, k, v apart), so errors name the stored tensor.
    expected = {name: tuple(p.shape)
                for name, p in split_weights(model.state_dict(), cfg).items()}

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
    tensors = {name: t.to(device=device, dtype=dtype)
               for name, t in fuse_weights(tensors, cfg).items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.reset_rope()
    return model.eval()


def load_hf_dir(path: Path, *, dtype=None, device="cpu") -> Transformer:
    """Return the model in a Hugging Face directory (config.json plus weights)."""
    cfg = config_from_hf(path / "config.json")
    tensors = hf_to_kvgen(read_hf_weights(path), cfg)
    return build_model(cfg, tensors, source=path, dtype=dtype, device=device)


def read_hf_weights(path: Path) -> dict:
    """Return every tensor of a directory's weights, by Hugging Face name.

    safetensors files (single or sharded) are memory-mapped. pytorch_model.bin files are
    pickles: they load only through torch's weights_only unpickler, which builds tensors and
    nothing else, so no code stored in the file can run.
    """
    for weights, index in (("model.safetensors", "model.safetensors.index.json"),
                           ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / weights).exists():
            files = [path / weights]
        elif (path / index).exists():
            files = _shards(path / index)
        else:
            continue
        read = _read_safetensors if weights.endswith(".safetensors") else _read_torch_bin
        tensors = {}
        for file in files:
            if not file.exists():
                raise KvgenError(f"{file}: weight file listed in the index is missing")
            tensors.update(read(file))
        return tensors
    raise KvgenError(f"{path}: no model.safetensors, pytorch_model.bin or an index of shards")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [index.parent / f for f in sorted(set(weight_map.values()))]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise KvgenError(f"{index}: not a valid weight index ({e})") from None


def _read_safetensors(file: Path) -> dict:
    try:
        with safe_open(file, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise KvgenError(f"{file}: cannot read safetensors file, truncated or corrupt "
                         f"({e})") from None


def _read_torch_bin(file: Path) -> dict:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # the restricted unpickler refuses anything but tensors
        raise KvgenError(f"{file}: refused or unreadable: only plain tensor files load "
                         f"(torch.load with weights_only=True): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor)
                                              for t in state.values()):
        raise KvgenError(f"{file}: expected a dictionary of tensors")
    return state


def load_llama2c(path: Path, *, dtype=None, device="cpu") -> Transformer:
    """Return the model in a legacy llama2.c checkpoint file."""
    cfg, tensors = read_llama2c(path)
    return build_model(cfg, tensors, source=path, dtype=dtype, device=device)
