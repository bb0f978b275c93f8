"""Model families against Hugging Face transformers: GPT-2, Llama (plain, llama3 and linear rope
scaling), Qwen2, Mistral (sliding window). Small random models saved by transformers itself."""

import json

import pytest
import torch

import kvgen
from kvgen.errors import KvgenError

transformers = pytest.importorskip("transformers")

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
             initializer_range=0.2)  # wide weights: logits far apart, so greedy picks are clear
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _build(family, init=0.2):
    t = transformers
    small = {**SMALL, "initializer_range": init}
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                              n_positions=96, initializer_range=init))
    if family == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**small, tie_word_embeddings=True))
    if family == "llama-untied-bias":
        return t.LlamaForCausalLM(t.LlamaConfig(**small, attention_bias=True, mlp_bias=True))
    if family == "llama3":
        return t.LlamaForCausalLM(t.LlamaConfig(**small, rope_parameters=LLAMA3))
    if family == "llama-linear":
        return t.LlamaForCausalLM(t.LlamaConfig(
            **small, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                      "factor": 4.0}))
    if family == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**small, rope_theta=1e6))
    if family == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**small, sliding_window=8))
    raise ValueError(family)


FAMILIES = ["gpt2", "llama", "llama-untied-bias", "llama3", "llama-linear", "qwen2", "mistral"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(transformers model, kvgen LLM) for one family, same weights."""
    torch.manual_seed(0)
    hf = _build(request.param).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, kvgen.load(folder)


def _prompt(n, seed=1):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_logits_and_tokens_match_transformers(pair, use_cache):
    family, hf, llm = pair
    prompt = _prompt(12 if family == "mistral" else 6)
    n = 20 if family == "mistral" else 24
    ours = llm.generate([prompt], max_new_tokens=n, temperature=0, use_cache=use_cache,
                        return_logits=True)[0]
    assert len(ours.token_ids) == n

    # Every step's logits, from one transformers forward over the sequence kvgen produced.
    theirs = _hf_logits(hf, prompt + ours.token_ids[:-1])[len(prompt) - 1:]
    assert (theirs - ours.logits).abs().max() < 1e-4
    top2 = theirs.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert clear.all(), "pick another seed: a near tie makes the token check meaningless"
    assert ours.token_ids == theirs.argmax(-1).tolist()


def test_batch_rows_equal_solo_runs(pair):
    _, _, llm = pair
    prompts = [_prompt(3, 2), _prompt(7, 3), _prompt(12, 4)]
    for use_cache in (True, False):
        batch = llm.generate(prompts, max_new_tokens=10, temperature=0, use_cache=use_cache,
                             return_logits=True)
        for prompt, row in zip(prompts, batch):
            solo = llm.generate([prompt], max_new_tokens=10, temperature=0, return_logits=True)[0]
            assert row.token_ids == solo.token_ids
            assert (row.logits - solo.logits).abs().max() < 1e-4


def test_gpt2_positions_advance_in_decode(pair):
    """A decode step at position p must use position row p: a one-token prompt then 5 steps
    equals transformers on the same 6 tokens (row 0 for the prompt, rows 1..5 after)."""
    family, hf, llm = pair
    if family != "gpt2":
        pytest.skip("learned positions are GPT-2's")
    ours = llm.generate([[5]], max_new_tokens=6, temperature=0, return_logits=True)[0]
    theirs = _hf_logits(hf, [5] + ours.token_ids[:-1])
    assert (theirs - ours.logits).abs().max() < 1e-4


def test_mistral_cache_stops_growing_at_the_window(pair):
    family, _, llm = pair
    if family != "mistral":
        pytest.skip("sliding window is Mistral's")
    llm.generate([_prompt(12)], max_new_tokens=20, temperature=0)
    cfg = llm.config
    per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4  # K and V, fp32
    assert llm.last_stats.kv_cache_bytes == 8 * per_slot


def test_bf16_first_step_close_to_fp32(pair, tmp_path):
    """bfloat16 weights and cache: the same first token, logits within 5e-2 (weights at half
    the width of the other tests: bf16's 8-bit mantissa errors grow with the logits' size)."""
    family = pair[0]
    torch.manual_seed(0)
    _build(family, init=0.1).save_pretrained(tmp_path)
    llm, half = kvgen.load(tmp_path), kvgen.load(tmp_path, dtype="bfloat16")
    prompt = _prompt(10)
    a = llm.generate([prompt], max_new_tokens=1, temperature=0, return_logits=True)[0]
    b = half.generate([prompt], max_new_tokens=1, temperature=0, return_logits=True)[0]
    assert a.token_ids == b.token_ids
    assert (a.logits - b.logits).abs().max() < 5e-2
    assert half.last_stats.kv_cache_bytes * 2 == llm.last_stats.kv_cache_bytes > 0


@pytest.mark.parametrize("head_dim", [16, 64])
def test_llama3_inverse_frequencies_equal_transformers(head_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from kvgen.model import rope_inv_freq

    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters={**LLAMA3, "original_max_position_embeddings": 8192})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inv_freq(head_dim, 500000.0, ("llama3", 8.0, 1.0, 4.0, 8192))
    assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=0)


def _save(tmp_path, family, **config_changes):
    torch.manual_seed(0)
    _build(family).save_pretrained(tmp_path)
    if config_changes:
        config = json.loads((tmp_path / "config.json").read_text())
        config.update(config_changes)
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("family,change,needle", [
    ("gpt2", dict(activation_function="relu"), "activation_function"),
    ("qwen2", dict(use_sliding_window=True), "use_sliding_window"),
    ("llama", dict(hidden_act="gelu"), "hidden_act"),
    ("llama", dict(model_type="falcon"), "falcon"),
])
def test_unsupported_options_are_named(tmp_path, family, change, needle):
    with pytest.raises(KvgenError, match=needle):
        kvgen.load(_save(tmp_path, family, **change))


def test_missing_and_unused_tensors_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _save(tmp_path, "qwen2")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(KvgenError, match=r"lack.*layers\.1\.attn\.wk\.bias"):
        kvgen.load(folder)

    tensors["model.layers.1.self_attn.k_proj.bias"] = torch.zeros(32)
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(KvgenError, match=r"does not use: model\.extra\.weight"):
        kvgen.load(folder)


def test_pytorch_bin_loads_only_plain_tensors(tmp_path):
    from safetensors.torch import load_file

    folder = _save(tmp_path, "llama")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    kvgen.load(folder).generate([[1, 2, 3]], max_new_tokens=2, temperature=0)

    class Payload:  # a pickle that would run code when unpickled without weights_only
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(KvgenError, match="weights_only"):
        kvgen.load(folder)


def test_tokenizer_larger_than_embedding_is_refused(tmp_path, stories_hf_dir):
    folder = _save(tmp_path, "llama")  # vocab 128; stories260K's tokenizer has 512 tokens
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((stories_hf_dir / name).read_bytes())
    with pytest.raises(KvgenError, match="512 tokens.*128"):
        kvgen.load(folder)


def test_hub_names_resolve_from_the_cache_only(tmp_path, monkeypatch, stories_hf_dir):
    """A repo id found in the local Hugging Face cache loads offline; one that is not gives an
    error naming the cache folder."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in stories_hf_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    llm = kvgen.load("someone/tiny")
    assert llm.generate("Once upon a time", max_new_tokens=5, temperature=0)[0].text.startswith(
        ", there")
    with pytest.raises(KvgenError, match=f"Hugging Face cache \\({cache}\\)"):
        kvgen.load("someone/absent")
