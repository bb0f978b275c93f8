"""Hugging Face transformers as an independent oracle on stories260K converted by kvgen."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")


def test_converted_dir_layout(stories_hf_dir):
    config = json.loads((stories_hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 4
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (stories_hf_dir / name).exists()


def test_transformers_greedy_and_logits_match(stories_hf_dir, stories_llm):
    hf = transformers.LlamaForCausalLM.from_pretrained(stories_hf_dir, dtype=torch.float32)
    hf.eval()
    prompt = stories_llm.tokenizer.encode("Lily and Tom went to the park")

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=64)
    hf_tokens = out[0, len(prompt):].tolist()

    ours = stories_llm.generate([prompt], max_new_tokens=64, temperature=0,
                                return_logits=True)[0]
    assert ours.token_ids == hf_tokens

    with torch.no_grad():
        hf_logits = hf(torch.tensor([prompt + hf_tokens[:-1]])).logits[0, len(prompt) - 1:]
    assert (hf_logits - ours.logits).abs().max() < 1e-4


def test_kvgen_loads_its_converted_dir(stories_hf_dir, stories_llm):
    import kvgen

    llm = kvgen.load(stories_hf_dir)
    a = llm.generate("The little dog", max_new_tokens=64, temperature=0)[0]
    b = stories_llm.generate("The little dog", max_new_tokens=64, temperature=0)[0]
    assert a.prompt_token_ids == b.prompt_token_ids and a.token_ids == b.token_ids
    assert a.text == b.text


def test_transformers_tokenizer_on_converted_dir(stories_hf_dir, goldens):
    tok = transformers.AutoTokenizer.from_pretrained(stories_hf_dir)
    for case in goldens["cases"]:
        assert tok(case["prompt"])["input_ids"] == case["prompt_token_ids"]
