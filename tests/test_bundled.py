"""The bundled default model: transformers reads the folder as-is and computes what kvgen
computes, and the model card's validation figure is what the weights score on held-out text."""

import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kvgen
from kvgen.loader import load_hf_dir
from kvgen.model import attention_mask

transformers = pytest.importorskip("transformers")

FOLDER = Path(kvgen.__file__).parent / "bundled" / "tiny-shakespeare"
DATA = Path(kvgen.__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PROMPT = "ROMEO:"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module on one thread: the model is too small to gain from more, and decoding
    token by token synchronises threads thousands of times, which stalls (40 s instead of 1 s)
    when another process holds the other cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def ours():
    return load_hf_dir(FOLDER)


@pytest.fixture(scope="module")
def card():
    return (FOLDER / "README.md").read_text()


def card_figure(card: str, name: str) -> float:
    """Return the number in the card's results row called name."""
    m = re.search(rf"^\| {re.escape(name)} \| ([0-9.]+) \|$", card, re.MULTILINE)
    assert m, f"model card has no '{name}' row"
    return float(m.group(1))


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Return kvgen's uncached logits [b, t, vocab] for unpadded rows ids [b, t]."""
    b, t = ids.shape
    positions = torch.arange(t).expand(b, t)
    with torch.no_grad():
        return model(ids, positions, attention_mask(torch.zeros(b, dtype=torch.long), 0, t))


def test_folder_holds_what_loaders_need_within_size():
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md"):
        assert (FOLDER / name).is_file(), name
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size <= 8_000_000, f"bundled model folder is {size:,} bytes"


def test_tokenizer_adds_bos_and_round_trips(hf_tokenizer):
    text = "ROMEO:\nWhat, ho!  'Tis I, the\tman.\n\nJULIET:\nAy; é\n"
    ids = hf_tokenizer(text)["input_ids"]
    assert ids[0] == hf_tokenizer.bos_token_id
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_transformers_greedy_and_logits_match_kvgen(hf_tokenizer, ours):
    hf = transformers.LlamaForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    prompt = hf_tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64,
                          do_sample=False, eos_token_id=None,
                          pad_token_id=hf_tokenizer.eos_token_id)
    hf_tokens = out[0, len(prompt):].tolist()

    llm = kvgen.load()  # no model named: the bundled one
    assert llm.source == FOLDER
    result = llm.generate(PROMPT, max_new_tokens=64, temperature=0)[0]
    assert result.prompt_token_ids == prompt
    # kvgen stops at EOS as generation_config.json says; transformers was told not to.
    assert result.token_ids == hf_tokens[:len(result.token_ids)]
    assert len(result.token_ids) == 64 or result.token_ids[-1] == hf_tokenizer.eos_token_id
    assert result.text == hf_tokenizer.decode(prompt + result.token_ids,
                                              skip_special_tokens=True)[len(PROMPT):]

    seq = torch.tensor([prompt + hf_tokens])
    with torch.no_grad():
        hf_logits = hf(seq).logits
    assert (hf_logits - logits_of(ours, seq)).abs().max() < 1e-4


def test_validation_loss_beats_unigram_and_matches_card(ours, hf_tokenizer, card):
    if not DATA.exists():
        pytest.skip(f"training data not found at {DATA}")
    raw = DATA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() in card, "the card describes other data"
    text = raw.decode("utf-8")
    cut = text.index("\n", int(len(text) * 0.9)) + 1  # the card's split: a line start at 90%
    val = torch.tensor(hf_tokenizer(text[cut:], add_special_tokens=False)["input_ids"])

    counts = torch.tensor(list(Counter(val.tolist()).values()), dtype=torch.float64)
    p = counts / counts.sum()
    unigram = float(-(p * p.log()).sum())

    # The card's windows: consecutive, context-sized, each predicted from BOS + all but its last.
    window, total = ours.cfg.max_seq_len, 0.0
    n_full = len(val) // window
    batches = list(val[:n_full * window].view(n_full, window).split(32))
    if len(val) % window:
        batches.append(val[n_full * window:][None])
    for y in batches:  # [b, t]
        x = torch.cat([torch.full((len(y), 1), hf_tokenizer.bos_token_id), y[:, :-1]], dim=1)
        total += float(F.cross_entropy(logits_of(ours, x).flatten(0, 1), y.flatten(),
                                       reduction="sum"))
    loss = total / len(val)

    assert abs(unigram - card_figure(card, "unigram entropy of the validation tokens")) < 1e-3
    assert loss <= 0.8 * unigram, f"validation loss {loss:.3f}, unigram entropy {unigram:.3f}"
    assert abs(loss - card_figure(card, "validation loss")) <= 0.02 * loss


def test_cli_generate_without_a_model_uses_the_bundled_one():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "kvgen", "generate", "--prompt", PROMPT,
                           "--max-new-tokens", "30", "--temperature", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = kvgen.load().generate(PROMPT, max_new_tokens=30, temperature=0)[0].text
    assert proc.stdout == PROMPT + expected + "\n"
    assert "KV cache" in proc.stderr
