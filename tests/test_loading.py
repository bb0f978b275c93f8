"""Loading: Hugging Face directories (single and sharded), llama2.c files tied and untied,
attention variants (MHA, GQA, MQA), and configuration checks."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import kvgen
from conftest import STORIES
from kvgen.config import ModelConfig
from kvgen.errors import KvgenError

transformers = pytest.importorskip("transformers")


def _random_hf_llama(tmp_path, n_heads, n_kv_heads, tie, seed=0):
    """A small random Llama saved by transformers itself, with its logits for one sequence."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
        rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("n_heads,n_kv_heads,tie", [(4, 4, False), (4, 2, True), (4, 1, False),
                                                    (8, 2, False)],
                         ids=["MHA", "GQA-tied", "MQA", "GQA"])
def test_transformers_checkpoints(tmp_path, n_heads, n_kv_heads, tie):
    hf = _random_hf_llama(tmp_path, n_heads, n_kv_heads, tie)
    llm = kvgen.load(tmp_path)
    prompt = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(1)).tolist()

    ours = llm.generate([prompt], max_new_tokens=20, temperature=0, return_logits=True)[0]
    full = torch.tensor([prompt + ours.token_ids[:-1]])
    with torch.no_grad():
        theirs = hf(full).logits[0, len(prompt) - 1:]
    assert (theirs - ours.logits).abs().max() < 1e-4
    assert ours.token_ids == theirs.argmax(-1).tolist()


def test_sharded_safetensors(tmp_path, stories_hf_dir, stories_llm):
    tensors = load_file(stories_hf_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((stories_hf_dir / name).read_bytes())

    sharded = kvgen.load(tmp_path).generate("Once upon a time", max_new_tokens=30,
                                            temperature=0)[0]
    assert sharded.token_ids == stories_llm.generate("Once upon a time", max_new_tokens=30,
                                                     temperature=0)[0].token_ids


def test_untied_llama2c_classifier(tmp_path, stories_llm):
    """A negative vocab_size means a classifier follows the weights; here it is 2 x embedding,
    so logits double, on kvgen and on transformers after conversion."""
    raw = (STORIES / "stories260K.bin").read_bytes()
    header = list(struct.unpack("<7i", raw[:28]))
    header[5] = -header[5]
    embedding = np.frombuffer(raw[28:28 + 512 * 64 * 4], dtype="<f4")
    path = tmp_path / "untied.bin"
    path.write_bytes(struct.pack("<7i", *header) + raw[28:] + (embedding * 2).tobytes())

    llm = kvgen.load(path, tokenizer=STORIES / "tok512.bin")
    assert llm.model.lm_head is not None
    prompt = llm.tokenizer.encode("Once upon a time")
    untied = llm.generate([prompt], max_new_tokens=1, return_logits=True)[0].logits
    tied = stories_llm.generate([prompt], max_new_tokens=1, return_logits=True)[0].logits
    assert torch.allclose(untied, 2 * tied, atol=1e-4)

    from kvgen.convert import convert_llama2c

    out = convert_llama2c(path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0, -1]
    assert (theirs - untied[0]).abs().max() < 1e-4


def test_unused_tensor_is_an_error(tmp_path, stories_hf_dir):
    for name in ("config.json",):
        (tmp_path / name).write_bytes((stories_hf_dir / name).read_bytes())
    tensors = load_file(stories_hf_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KvgenError, match="q_norm"):
        kvgen.load(tmp_path)


@pytest.mark.parametrize("fields,needle", [
    (dict(n_heads=8, n_kv_heads=3), "n_kv_heads"),
    (dict(n_heads=0), "n_heads"),
    (dict(dim=60, n_heads=8), "n_heads"),
    (dict(vocab_size=-5), "vocab_size"),
])
def test_config_validation(fields, needle):
    base = dict(vocab_size=32, dim=64, hidden_dim=128, n_layers=2, n_heads=8, n_kv_heads=4,
                max_seq_len=16)
    with pytest.raises(KvgenError, match=needle):
        ModelConfig(**{**base, **fields})


def test_hf_config_missing_field(tmp_path, stories_hf_dir):
    config = json.loads((stories_hf_dir / "config.json").read_text())
    del config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KvgenError, match="num_hidden_layers"):
        kvgen.load(tmp_path)


def test_unsupported_rope_scaling_is_named(tmp_path, stories_hf_dir):
    config = json.loads((stories_hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KvgenError, match="yarn"):
        kvgen.load(tmp_path)
