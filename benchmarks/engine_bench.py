"""Serving benchmark: the engine against static batching and one request at a time, in one run.

    python benchmarks/engine_bench.py            # 64 requests, GPT-2-124M shape (slow on CPU)
    python benchmarks/engine_bench.py --quick    # fewer, shorter requests on a smaller model
    python benchmarks/engine_bench.py --json F   # also writes the figures to F (RESULTS.md)

The model is randomly initialised (GPT-2 shaped, no stop token), so every request runs to its
own max_new_tokens; timings depend only on shapes. Static batching gets the KV memory budget
the engine gets: a contiguous cache reserves the longest prompt plus the longest output for
every row, so that budget fixes its batch size; each batch is padded to its longest prompt and
runs until its slowest request is done. Throughput counts each request's own tokens only.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch

from kvgen import LLM, Engine
from kvgen.config import ModelConfig
from kvgen.engine.paged_cache import bytes_per_block
from kvgen.hardware import describe_machine
from kvgen.model import Transformer

FULL = dict(dim=768, n_layers=12, n_heads=12, requests=64, prompt=(16, 512), output=(16, 256),
            prefix=512, static_rows=16)
QUICK = dict(dim=256, n_layers=4, n_heads=4, requests=24, prompt=(16, 256), output=(8, 96),
             prefix=512, static_rows=6)


def random_gpt2(dim: int, n_layers: int, n_heads: int) -> LLM:
    """Return a randomly initialised GPT-2-shaped model without tokenizer or stop tokens."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, dim=dim, hidden_dim=4 * dim, n_layers=n_layers,
                      n_heads=n_heads, n_kv_heads=n_heads, max_seq_len=1024, norm_eps=1e-5,
                      tie_embeddings=True, model_type="gpt2", norm="layer", position="learned",
                      mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True)
    return LLM(Transformer(cfg).eval(), None, stop_token_ids=set(), source=Path("random"))


def workload(n: int, prompt: tuple, output: tuple, vocab: int, seed: int = 0):
    """Return n (prompt ids, max_new_tokens) pairs drawn with a fixed seed."""
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(*prompt))], rng.randint(*output))
            for _ in range(n)]


def one_at_a_time(llm, requests) -> float:
    start = time.perf_counter()
    for prompt, n in requests:
        llm.generate([prompt], max_new_tokens=n, temperature=0)
    return time.perf_counter() - start


def static_batches(llm, requests, rows: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(requests), rows):
        batch = requests[i:i + rows]
        llm.generate([p for p, _ in batch], max_new_tokens=max(n for _, n in batch),
                     temperature=0)
    return time.perf_counter() - start


def engine_run(engine, requests) -> tuple[float, dict]:
    """Return seconds and peak usage for all requests added at once, stepped to the end."""
    start = time.perf_counter()
    for prompt, n in requests:
        engine.add_request(prompt, max_new_tokens=n, temperature=0)
    peak = dict(blocks=0, running=0)
    while engine.has_unfinished():
        engine.step()
        s = engine.stats()
        peak["blocks"] = max(peak["blocks"], s.used_blocks)
        peak["running"] = max(peak["running"], s.running)
    return time.perf_counter() - start, peak


def time_to_first_token(engine, prompt) -> float:
    start = time.perf_counter()
    engine.add_request(prompt, max_new_tokens=1, temperature=0)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-one-at-a-time", action="store_true",
                        help="leave out the slowest mode")
    parser.add_argument("--static-rows", type=int,
                        help="rows per static batch, which also sets the KV budget of both")
    parser.add_argument("--json", type=Path, help="also write the measurements to this file")
    args = parser.parse_args()
    setup = dict(QUICK if args.quick else FULL)
    if args.static_rows:
        setup["static_rows"] = args.static_rows
    llm = random_gpt2(setup["dim"], setup["n_layers"], setup["n_heads"])
    llm.model.to(args.device)
    cfg = llm.config
    requests = workload(setup["requests"], setup["prompt"], setup["output"], cfg.vocab_size)
    useful = sum(n for _, n in requests)

    # One KV budget for both batched modes: static_rows rows of the worst-case length.
    worst = setup["prompt"][1] + setup["output"][1] - 1
    per_token = bytes_per_block(cfg, 1, llm.model.embed.weight.dtype)
    budget = setup["static_rows"] * worst * per_token
    llm.generate([requests[0][0]], max_new_tokens=2, temperature=0)  # warm up

    print(f"model: GPT-2 shape, dim {cfg.dim}, {cfg.n_layers} layers, random weights; "
          f"{len(requests)} requests, prompts {setup['prompt']}, outputs {setup['output']}, "
          f"{useful} new tokens")
    engine = Engine(llm, block_size=args.block_size, kv_cache_memory=budget)
    engine_s, peak = engine_run(engine, requests)
    stats = engine.stats()
    attention = "in place (C kernel)" if engine.runner.in_place else "gathered copy"
    print(f"KV budget {budget / 2**20:.1f} MiB (= {setup['static_rows']} rows x {worst} "
          f"tokens contiguous); engine: {stats.num_blocks} blocks of {args.block_size}, "
          f"attention {attention}, {stats.preemptions} preemptions, {stats.steps} steps")
    running = peak["running"]
    memory = dict(engine_peak=per_token * args.block_size * peak["blocks"],
                  contiguous_worst=running * worst * per_token,
                  contiguous_context=running * cfg.max_seq_len * per_token)
    print(f"KV memory at peak: the engine used {memory['engine_peak'] / 2**20:.1f} MiB for "
          f"{running} running requests;\n  a contiguous cache reserves "
          f"{memory['contiguous_worst'] / 2**20:.1f} MiB for as many rows of {worst} tokens "
          f"(longest prompt + longest output),\n  {memory['contiguous_context'] / 2**20:.1f} "
          f"MiB for rows of the model's context ({cfg.max_seq_len})")

    # Time to first token with a shared prefix: the first request computes it, the next hits.
    rng = random.Random(1)
    prefix = [rng.randrange(cfg.vocab_size) for _ in range(setup["prefix"])]
    ttft = Engine(llm, block_size=args.block_size, kv_cache_memory=budget)
    miss = time_to_first_token(ttft, prefix + [rng.randrange(cfg.vocab_size) for _ in range(8)])
    hit = time_to_first_token(ttft, prefix + [rng.randrange(cfg.vocab_size) for _ in range(8)])
    print(f"time to first token, {setup['prefix']}-token shared prefix + 8 tokens: miss "
          f"{miss * 1e3:.1f} ms, hit {hit * 1e3:.1f} ms ({hit / miss:.2f} of the miss; "
          f"{ttft.stats().prefix_cache_hit_tokens} tokens from the cache)")

    print(f"\n{'mode':32}{'seconds':>10}{'tokens/s':>12}{'engine is':>12}", flush=True)
    modes = []
    for name, run in (("engine (paged, continuous)", lambda: engine_s),
                      (f"static batches of {setup['static_rows']}",
                       lambda: static_batches(llm, requests, setup["static_rows"])),
                      ("one at a time", lambda: one_at_a_time(llm, requests))):
        if name == "one at a time" and args.skip_one_at_a_time:
            continue
        seconds = run()
        modes.append(dict(mode=name, seconds=seconds, tokens_per_s=useful / seconds,
                          engine_speedup=seconds / engine_s))
        print(f"{name:32}{seconds:>10.2f}{useful / seconds:>12.1f}{seconds / engine_s:>11.2f}x",
              flush=True)

    if args.json:
        report = dict(model=f"GPT-2 shape, dim {cfg.dim}, {cfg.n_layers} layers, random weights",
                      requests=len(requests), prompt_range=setup["prompt"],
                      output_range=setup["output"], new_tokens=useful,
                      block_size=args.block_size, num_blocks=stats.num_blocks,
                      kv_budget_bytes=budget, static_rows=setup["static_rows"],
                      attention=attention, preemptions=stats.preemptions, steps=stats.steps,
                      peak_running=running, kv_bytes=memory, modes=modes,
                      ttft=dict(prefix_tokens=setup["prefix"], miss_s=miss, hit_s=hit,
                                hit_tokens=ttft.stats().prefix_cache_hit_tokens),
                      threads=torch.get_num_threads(), machine=describe_machine())
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
