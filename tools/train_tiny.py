"""Train the small Llama bundled with kvgen on tiny Shakespeare and write it out as a Hugging
Face directory: config, safetensors weights, tokenizer files and a model card made from the
figures this run measured.

From the repository root:
    .venv/bin/python tools/train_tiny.py                            # the bundled model (~20 min)
    .venv/bin/python tools/train_tiny.py --steps 20 --out /tmp/tiny   # a quick end-to-end check
"""

import argparse
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script run from a clone: kvgen need not be installed

from kvgen.config import ModelConfig  # noqa: E402
from kvgen.loader import kvgen_name_to_hf  # noqa: E402
from kvgen.model import Transformer, attention_mask, split_weights  # noqa: E402

log = logging.getLogger("train_tiny")

BOS, EOS = "<s>", "</s>"  # the BPE trainer gives special tokens the first ids: 0 and 1
PROMPT = "ROMEO:"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/tinyshakespeare.txt")
    p.add_argument("--out", type=Path, default=REPO / "kvgen/bundled/tiny-shakespeare")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256, help="context length, BOS included")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1,
                   help="1 keeps step time steady on a busy machine")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data and tokenizer

def split_text(text: str, fraction: float = 0.9) -> int:
    """Return the character offset where validation starts: the first line start at or after
    `fraction` of the text, so no line is shared by the two splits."""
    return text.index("\n", int(len(text) * fraction)) + 1


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Return a byte-level BPE tokenizer whose encode() prepends BOS."""
    # Byte-level: every string has an encoding, so no unknown token, and decoding round-trips.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def encode_with_line_starts(tok: Tokenizer, text: str):
    """Return the ids of text (no BOS) [n] and the indices of tokens that begin a non-empty
    line: the places a training window may start, as a prompt like "ROMEO:" does."""
    enc = tok.encode(text, add_special_tokens=False)
    starts = [i for i, (a, _) in enumerate(enc.offsets)
              if (a == 0 or text[a - 1] == "\n") and text[a] != "\n"]
    return torch.tensor(enc.ids), torch.tensor(starts)


def get_batch(ids, starts, bos_id: int, batch_size: int, seq_len: int, gen: torch.Generator):
    """Return inputs and targets, each [batch, seq_len]: BOS plus text from a line start."""
    starts = starts[starts + seq_len <= len(ids)]
    picks = starts[torch.randint(len(starts), (batch_size,), generator=gen)]
    windows = torch.stack([ids[s:s + seq_len] for s in picks.tolist()])  # [b, seq_len]
    bos = torch.full((batch_size, 1), bos_id, dtype=windows.dtype)
    return torch.cat([bos, windows[:, :-1]], dim=1), windows


def unigram_entropy(ids: torch.Tensor) -> float:
    """Return the entropy, in nats, of the token frequencies in ids."""
    counts = torch.tensor(list(Counter(ids.tolist()).values()), dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


# ---------------------------------------------------------------- model

def build_model(args, vocab_size: int) -> Transformer:
    """Return a freshly initialised Transformer with the shape the arguments ask for."""
    # SwiGLU's three matrices at 8/3 the width cost about what a 4x two-matrix MLP does.
    hidden = math.ceil(8 * args.dim / 3 / 32) * 32
    cfg = ModelConfig(vocab_size=vocab_size, dim=args.dim, hidden_dim=hidden,
                      n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      max_seq_len=args.seq_len, norm_eps=1e-5, rope_theta=10000.0,
                      tie_embeddings=True)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            # Small weights: the tied embedding is also the classifier, and torch's default
            # N(0, 1) embedding would start it with huge logits. Each residual branch's output
            # projection is scaled down so the stream's variance does not grow with depth.
            std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo.weight",
                                                                      "w_down.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
    return model


def causal_inputs(b: int, t: int):
    """Return positions [b, t] and the causal mask [b, 1, t, t] of unpadded rows."""
    positions = torch.arange(t).expand(b, t)
    return positions, attention_mask(torch.zeros(b, dtype=torch.long), 0, t)


def lr_at(step: int, args) -> float:
    """Return the learning rate: linear warmup, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_loss(model, ids, bos_id: int, window: int, batch_size: int = 16) -> float:
    """Return the mean cross-entropy in nats per token of ids, in eval mode.

    ids are cut into consecutive windows of `window` tokens (the last may be shorter); each
    window is predicted from BOS followed by all but its last token.
    """
    was_training = model.training
    model.eval()
    n_full = len(ids) // window
    batches = list(ids[:n_full * window].view(n_full, window).split(batch_size))
    if len(ids) % window:
        batches.append(ids[n_full * window:][None])
    total = 0.0
    for y in batches:  # y: [b, t]
        x = torch.cat([torch.full((len(y), 1), bos_id), y[:, :-1]], dim=1)
        logits = model(x, *causal_inputs(*x.shape))
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
    model.train(was_training)
    return total / len(ids)


@torch.no_grad()
def generate(model, ids: list[int], n: int, temperature: float, gen: torch.Generator):
    """Return ids extended by n tokens: greedy at temperature 0, else sampled."""
    model.eval()
    ids = list(ids)
    for _ in range(n):
        x = torch.tensor([ids])
        logits = model(x, *causal_inputs(*x.shape))[0, -1]
        if temperature == 0:
            ids.append(int(logits.argmax()))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            ids.append(int(torch.multinomial(probs, 1, generator=gen)))
    return ids


# ---------------------------------------------------------------- output

def save_model_dir(out: Path, model: Transformer, tok: Tokenizer):
    """Write the weights, config and tokenizer files transformers and kvgen read."""
    out.mkdir(parents=True, exist_ok=True)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    # state_dict() leaves out the non-persistent rotary tables; a tied model has no lm_head.
    state = split_weights(model.state_dict(), model.cfg)  # checkpoints keep q, k, v apart
    tensors = {kvgen_name_to_hf(k): v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", {**model.cfg.to_hf_dict(), "bos_token_id": bos_id,
                                     "eos_token_id": eos_id})
    write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": model.cfg.max_seq_len, "clean_up_tokenization_spaces": False})
    write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS})


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_card(out: Path, f: dict):
    """Write README.md from the figures in f, so the card states what this run measured."""
    cfg = f["cfg"]
    text = f"""# tiny-shakespeare

The default model of kvgen, so that `kvgen generate --prompt "ROMEO:"` works offline. It is a
{f['params']:,}-parameter Llama trained from scratch on tiny Shakespeare: a demo and test model
that writes Shakespeare-shaped text, not a useful language model.

| shape | value |
| --- | --- |
| layers | {cfg.n_layers} |
| dim / MLP hidden dim | {cfg.dim} / {cfg.hidden_dim} |
| query heads / key-value heads | {cfg.n_heads} / {cfg.n_kv_heads} (grouped-query attention) |
| context | {cfg.max_seq_len} tokens |
| embeddings | tied (no lm_head.weight) |
| tokenizer | byte-level BPE, {cfg.vocab_size} tokens; `{BOS}` = {f['bos_id']} (BOS, \
added by encode), `{EOS}` = {f['eos_id']} (EOS) |

## Training

Made by this command, run from the repository root:

    {f['command']}

- data: `tinyshakespeare.txt` from the project's shared data folder (`{f['data']}`, not copied
  here), {f['n_chars']:,} characters, sha256 `{f['sha256']}`
- split: characters `[0, {f['cut']})` train, `[{f['cut']}, {f['n_chars']})` validation (the
  first line start at or after 90% of the text); the tokenizer saw the training split only
- samples: `{BOS}` then {cfg.max_seq_len - 1} tokens starting at a random line start of the
  training split, seed {f['seed']}
- {f['steps']} steps of batch {f['batch_size']} ({f['tokens']:,} tokens); AdamW, peak learning
  rate {f['lr']}, {f['warmup']} warmup steps then cosine decay to a tenth, weight decay
  {f['weight_decay']}, gradient clipping at 1.0
- wall time {f['wall_min']:.1f} minutes on {f['threads']} CPU threads, torch {torch.__version__}

## Results

| figure | nats per token |
| --- | --- |
| train loss | {f['train_loss']:.4f} |
| validation loss | {f['val_loss']:.4f} |
| unigram entropy of the validation tokens | {f['unigram']:.4f} |

Losses are mean cross-entropy with the model in eval mode. The validation split ({f['n_val']:,}
tokens, encoded without BOS) is cut into consecutive windows of {cfg.max_seq_len} tokens, the
last one shorter; each window is predicted from `{BOS}` plus all but its last token. The train
loss does the same over the first {f['n_val']:,} tokens of the training split. The unigram
entropy is what a model that ignores context would score on the validation tokens.

## Samples from "{PROMPT}", 100 new tokens

Greedy:

{indent(f['greedy'])}

Sampled at temperature 0.8 (seed {f['seed']}):

{indent(f['sampled'])}
"""
    (out / "README.md").write_text(text)


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()

    raw = args.data.read_bytes()
    text = raw.decode("utf-8")
    cut = split_text(text)
    tok = train_tokenizer(text[:cut], args.vocab_size)
    bos_id = tok.token_to_id(BOS)
    if tok.decode(tok.encode(text[cut:]).ids) != text[cut:]:
        raise RuntimeError("the tokenizer does not round-trip the validation text")
    train_ids, starts = encode_with_line_starts(tok, text[:cut])
    val_ids = torch.tensor(tok.encode(text[cut:], add_special_tokens=False).ids)
    unigram = unigram_entropy(val_ids)
    log.info("data: %d train tokens (%d line starts), %d validation tokens, unigram entropy "
             "%.4f nats", len(train_ids), len(starts), len(val_ids), unigram)

    model = build_model(args, tok.get_vocab_size())
    params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %d parameters", model.cfg, params)

    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]  # norm gains: no decay
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                             {"params": vectors, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)  # data order depends on the seed alone
    positions, mask = causal_inputs(args.batch_size, args.seq_len)

    model.train()
    t_train, recent = time.time(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = get_batch(train_ids, starts, bos_id, args.batch_size, args.seq_len, gen)
        logits = model(x, positions, mask)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        recent.append(loss.item())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.time() - t_train
            log.info("step %d/%d  loss %.4f  lr %.2e  %.2f s/step  eta %.1f min", done,
                     args.steps, sum(recent) / len(recent), lr_at(step, args), elapsed / done,
                     elapsed / done * (args.steps - done) / 60)
            recent = []
        if done % args.eval_every == 0 and done != args.steps:
            log.info("step %d  validation loss %.4f", done,
                     mean_loss(model, val_ids, bos_id, args.seq_len))
    wall = time.time() - t_start

    train_loss = mean_loss(model, train_ids[:len(val_ids)], bos_id, args.seq_len)
    val_loss = mean_loss(model, val_ids, bos_id, args.seq_len)
    log.info("final: train loss %.4f, validation loss %.4f, unigram entropy %.4f nats/token",
             train_loss, val_loss, unigram)

    prompt = tok.encode(PROMPT).ids
    greedy = tok.decode(generate(model, prompt, 100, 0.0, None))
    sampled = tok.decode(generate(model, prompt, 100, 0.8,
                                  torch.Generator().manual_seed(args.seed)))
    log.info("greedy:\n%s", greedy)
    log.info("sampled:\n%s", sampled)

    save_model_dir(args.out, model, tok)
    command = shlex.join([".venv/bin/python", "tools/train_tiny.py",
                          *(sys.argv[1:] if argv is None else argv)])
    write_card(args.out, dict(
        cfg=model.cfg, params=params, bos_id=bos_id, eos_id=tok.token_to_id(EOS),
        command=command, data=os.path.relpath(args.data.resolve(), REPO), n_chars=len(text),
        sha256=hashlib.sha256(raw).hexdigest(), cut=cut, seed=args.seed, steps=args.steps,
        batch_size=args.batch_size, tokens=args.steps * args.batch_size * args.seq_len,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, wall_min=wall / 60,
        threads=args.threads, train_loss=train_loss, val_loss=val_loss, unigram=unigram,
        n_val=len(val_ids), greedy=greedy, sampled=sampled))
    size = sum(p.stat().st_size for p in args.out.iterdir())
    log.info("wrote %s (%.2f MB) in %.1f minutes", args.out, size / 1e6, wall / 60)


if __name__ == "__main__":
    main()
