"""`kvgen convert`: a llama2.c checkpoint written out as a Hugging Face Llama directory."""

import json
import logging
from pathlib import Path

from safetensors.torch import save_file

from .errors import KvgenError
from .loader import is_llama2c_checkpoint, kvgen_name_to_hf, read_llama2c
from .tokenizer import Llama2cTokenizer, export_hf_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

_OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")


def convert_llama2c(checkpoint, out_dir, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Return the directory written: config.json, model.safetensors and the tokenizer files.

    The q and k projections are stored in the two-halves rotary layout (kvgen's and Hugging
    Face's), so transformers' LlamaForCausalLM computes what run.c computes.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise KvgenError(f"checkpoint {checkpoint} does not exist")
    if not is_llama2c_checkpoint(checkpoint):
        raise KvgenError(f"{checkpoint} is not a legacy llama2.c checkpoint (its size does not "
                         f"match its header)")
    clashes = [f for f in _OUTPUT_FILES if (out_dir / f).exists()]
    if clashes and not overwrite:
        raise KvgenError(f"{out_dir} already holds {', '.join(clashes)}; "
                         f"pass --overwrite to replace them")

    cfg, tensors = read_llama2c(checkpoint)
    tok = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, vocab_size=cfg.vocab_size)
        if not isinstance(tok, Llama2cTokenizer):
            raise KvgenError(f"{tokenizer}: expected a llama2.c tokenizer .bin file")

    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tensors = {kvgen_name_to_hf(name): t.contiguous() for name, t in tensors.items()}
    save_file(hf_tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(
        {**cfg.to_hf_dict(), "bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    # llama2.c's stories models end a story with BOS (run.c stops there), so BOS stops too.
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [1, 2]}, indent=2) + "\n")
    if tok is not None:
        export_hf_tokenizer(tok, out_dir)
    log.info("wrote %s (%d tensors)", out_dir, len(hf_tensors))
    return out_dir
