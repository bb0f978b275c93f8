"""The `kvgen` command line: generate, serve, convert, plan and params.

Generated text goes to stdout; the stats line, logs and errors go to stderr.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import KvgenError
from .hardware import HARDWARE
from .planner import DTYPE_BYTES
from .presets import PRESETS


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except KvgenError as e:
        print(f"kvgen: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"kvgen: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvgen", description="Text generation with decoder-only transformers and a KV cache.")
    parser.add_argument("--version", action="version", version=f"kvgen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.set_defaults(run=lambda _: parser.print_help() or 2)
    commands = parser.add_subparsers(title="commands")

    gen = commands.add_parser("generate", help="generate text from one or more prompts")
    gen.add_argument("--model", help="Hugging Face directory, llama2.c checkpoint or its folder, "
                     "or a Hugging Face repo id in the local cache "
                     "(default: the small model bundled with kvgen)")
    gen.add_argument("--download", action="store_true",
                     help="fetch a Hugging Face repo id missing from the local cache")
    gen.add_argument("--tokenizer", help="tokenizer file, if not found beside the model")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    source.add_argument("--prompts-file", help="many prompts, served by the engine: one per "
                        "line, or JSON Lines (*.jsonl) of strings or {\"prompt\": ...} objects")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--no-cache", action="store_true",
                     help="recompute the whole sequence every step instead of using the KV cache")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 disables top-p")
    gen.add_argument("--seed", type=int, help="seed for reproducible sampling")
    gen.add_argument("--stop", action="append", help="stop string; may repeat")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    gen.add_argument("--threads", type=int,
                     help="CPU threads (default: 1 for models under 20M parameters, else "
                     "PyTorch's default)")
    gen.add_argument("--compile", action="store_true",
                     help="run decode steps through torch.compile (needs a C++ compiler on "
                     "the CPU; the first steps pay the compilation)")
    _add_engine_options(gen.add_argument_group("engine (with --prompts-file)"))
    gen.set_defaults(run=_generate)

    conv = commands.add_parser("convert",
                               help="write a llama2.c checkpoint as a Hugging Face directory")
    conv.add_argument("checkpoint", help="llama2.c checkpoint (.bin)")
    conv.add_argument("out_dir", help="output directory")
    conv.add_argument("--tokenizer", help="llama2.c tokenizer .bin to export as tokenizer.json")
    conv.add_argument("--overwrite", action="store_true", help="replace files in out_dir")
    conv.set_defaults(run=_convert)

    plan = commands.add_parser("plan", help="parameters, memory, FLOPs and time bounds of a "
                               "model and workload, from its configuration alone")
    plan.add_argument("--model", help="config.json, a Hugging Face directory, a llama2.c "
                      "checkpoint or its folder")
    plan.add_argument("--preset", help="a published configuration: " + ", ".join(PRESETS))
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--prompt-len", type=int, default=512)
    plan.add_argument("--new-tokens", type=int, default=128)
    plan.add_argument("--dtype", default="float16", help="weights: " + ", ".join(DTYPE_BYTES))
    plan.add_argument("--kv-dtype", help="cache (default: --dtype)")
    plan.add_argument("--memory", help="budget per device: 80GB (80e9 bytes), 80GiB, or bytes")
    plan.add_argument("--hardware", help="profile for time bounds: " + ", ".join(HARDWARE))
    plan.add_argument("--measure", action="store_true",
                      help="time bounds from this machine's measured FLOP/s and bandwidth")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel devices")
    plan.add_argument("--block-size", type=int, help="paged cache block, in tokens")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--plot", metavar="FILE.png",
                      help="draw cache and weight memory against context and batch size")
    plan.set_defaults(run=_plan)

    params = commands.add_parser("params", help="parameters of the encoder-decoder Transformer, "
                                 "Table 3 of Attention Is All You Need")
    params.add_argument("--preset", help="one row: base, A1-A4, B1, B2, C1-C7, D, E, big")
    params.add_argument("--vocab", type=int, default=37000, help="shared vocabulary size")
    params.add_argument("--no-bias", action="store_true", help="leave out the linear biases")
    params.set_defaults(run=_params)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server on the "
                                "serving engine")
    serve.add_argument("--model", help="as for generate (default: the bundled model)")
    serve.add_argument("--download", action="store_true",
                       help="fetch a Hugging Face repo id missing from the local cache")
    serve.add_argument("--tokenizer", help="tokenizer file, if not found beside the model")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("KVGEN_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 routes (default: "
                       "$KVGEN_API_KEY, which keeps the key out of the process list)")
    serve.add_argument("--served-model-name",
                       help="the model's name in the API (default: its folder's name)")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                       help="larger request bodies get 413")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    serve.add_argument("--threads", type=int, help="CPU threads, as for generate")
    engine = serve.add_argument_group("engine")
    _add_engine_options(engine)
    engine.add_argument("--max-num-seqs", type=int, default=256,
                        help="most requests running at once")
    serve.set_defaults(run=_serve)

    bench = commands.add_parser("bench", help="kvgen with and without its cache beside "
                                "transformers, measured in one run, with the planner's figures")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face model directory or llama2.c checkpoint")
    source.add_argument("--shape", help="random weights of a known shape: gpt2 (124M) or tiny")
    bench.add_argument("--batch", type=int, action="append", help="batch size; may repeat")
    bench.add_argument("--prompt-len", type=int, default=32)
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3, help="runs per engine (median kept)")
    bench.add_argument("--engine", action="append",
                       help="only this engine: 'kvgen cache', 'kvgen no-cache', "
                       "'kvgen cache compiled', 'transformers cache', "
                       "'transformers no-cache'; may repeat")
    bench.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    bench.add_argument("--compile", action="store_true",
                       help="add kvgen's cached engine with torch.compile'd decode steps")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="per-step latency and tokens/s")
    bench.set_defaults(run=_bench)
    return parser


def _add_engine_options(group):
    """Add the serving engine's options, which generate --prompts-file and serve share."""
    group.add_argument("--block-size", type=int, help="tokens per KV-cache block (default 16)")
    group.add_argument("--kv-cache-memory", help="KV-cache pool size: 2GiB, 512MB, or bytes")
    group.add_argument("--num-blocks", type=int, help="KV-cache pool size in blocks")
    group.add_argument("--max-prefill-tokens", type=int,
                       help="prompt tokens per step; longer prompts are prefilled in chunks")
    group.add_argument("--no-prefix-caching", action="store_true",
                       help="do not reuse the cached blocks of shared prompt prefixes")


def _engine_kwargs(args) -> dict:
    """Return Engine's keywords from the engine options."""
    return dict(block_size=16 if args.block_size is None else args.block_size,
                num_blocks=args.num_blocks, kv_cache_memory=args.kv_cache_memory,
                enable_prefix_caching=not args.no_prefix_caching,
                max_prefill_tokens=args.max_prefill_tokens)


def _generate(args) -> int:
    from .llm import load

    if not args.prompts_file:  # fail before loading: these would be silently unused
        given = [f"--{name.replace('_', '-')}" for name in
                 ("block_size", "kv_cache_memory", "num_blocks", "max_prefill_tokens")
                 if getattr(args, name) is not None]
        given += ["--no-prefix-caching"] if args.no_prefix_caching else []
        if given:
            raise KvgenError(f"{', '.join(given)}: serving-engine options, which generate "
                             f"uses only with --prompts-file")

    llm = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer,
               download=args.download)
    _set_threads(args.threads, llm)
    if args.compile:
        llm.compile_decode()
    options = dict(max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop=args.stop)
    if args.prompts_file:
        return _generate_many(llm, args, options)

    if len(args.prompt) == 1:
        pieces = llm.stream(args.prompt[0], **options)  # checks the options first
        sys.stdout.write(args.prompt[0])
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for i, result in enumerate(llm.generate(args.prompt, **options)):
            sys.stdout.write(f"--- [{i}] finish: {result.finish_reason}\n")
            sys.stdout.write(args.prompt[i] + result.text + "\n")
    sys.stdout.flush()
    print(llm.last_stats.summary(), file=sys.stderr)
    return 0


SMALL_MODEL_PARAMS = 20_000_000


# More threads than this per logical core only slow a run down; far more crash PyTorch's
# OpenMP runtime (--threads 100000 ended in a segmentation fault).
MAX_THREADS_PER_CORE = 4


def _check_threads(threads):
    """Raise KvgenError unless threads is None or 1 .. MAX_THREADS_PER_CORE x logical cores."""
    cores = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= MAX_THREADS_PER_CORE * cores:
        raise KvgenError(f"--threads must be between 1 and {MAX_THREADS_PER_CORE * cores} "
                         f"({MAX_THREADS_PER_CORE} per logical core here), got {threads}")


def _set_threads(threads, llm):
    """Use `threads` CPU threads; by default one for a small model, whose per-token work is
    smaller than the cost of keeping a second thread in step (and a thread waiting for a core
    that another process holds stalls every step)."""
    import torch

    _check_threads(threads)
    if threads is None and sum(p.numel() for p in llm.model.parameters()) < SMALL_MODEL_PARAMS:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def _generate_many(llm, args, options) -> int:
    from .engine import Engine
    from .engine.prompts_file import read_prompts_file

    prompts = read_prompts_file(args.prompts_file)
    if options.pop("use_cache") is False:
        raise KvgenError("--no-cache does not apply to --prompts-file: the engine runs on its "
                         "paged cache")
    engine = Engine(llm, **_engine_kwargs(args))
    start = time.perf_counter()
    results = engine.generate(prompts, progress=True, **options)
    seconds = time.perf_counter() - start
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        text = prompt["prompt"] if isinstance(prompt, dict) else prompt
        text = text if isinstance(text, str) else ""  # token-id prompts: the new text only
        sys.stdout.write(f"--- [{i}] finish: {result.finish_reason}\n{text}{result.text}\n")
    sys.stdout.flush()
    s = engine.stats()
    print(f"requests {len(results)} | new tokens {s.generated_tokens} | "
          f"{s.generated_tokens / seconds:.1f} tokens/s | prefix cache hit rate "
          f"{s.prefix_cache_hit_rate:.1%} | preemptions {s.preemptions} | KV cache "
          f"{s.kv_cache_bytes} bytes in {s.num_blocks} blocks of {s.block_size}", file=sys.stderr)
    return 0


def _serve(args) -> int:
    import uvicorn

    from .engine import Engine
    from .llm import load
    from .server import create_app, default_model_name

    if not 1 <= args.port <= 65535:
        raise KvgenError(f"--port must be between 1 and 65535, got {args.port}")
    # Bound here, before the model loads, so that a taken port is one clear error up front
    # and "serving ..." is printed only once the server can take requests.
    listening = _listen(args.host, args.port)
    llm = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer,
               download=args.download)
    _set_threads(args.threads, llm)
    engine = Engine(llm, **_engine_kwargs(args), max_num_seqs=args.max_num_seqs)
    # A hub id is served under that id, not the name of its snapshot folder (a hash).
    name = args.served_model_name or (
        args.model if args.model and not Path(args.model).exists() else
        default_model_name(llm.source))
    app = create_app(llm, engine=engine, model_name=name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes)
    print(f"serving {llm.source} as {name!r} on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr)
    config = uvicorn.Config(app, ws="none", lifespan="on",
                            log_level="info" if args.verbose else "warning")
    uvicorn.Server(config).run(sockets=[listening])
    return 0


def _listen(host: str, port: int):
    """Return a socket bound to host:port, or raise KvgenError saying why it cannot be."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listening = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise KvgenError(f"cannot listen on {host}:{port}: {e}") from None
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart without waiting
    try:
        listening.bind((host, port))
    except OSError as e:
        listening.close()
        raise KvgenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return listening


def _check_plot_path(path):
    """Raise KvgenError if a picture cannot be written at path (checked before the work)."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise KvgenError(f"--plot {path}: folder {folder} does not exist")


def _bench(args) -> int:
    import json

    import torch

    from .bench import bench, plot_report

    _check_threads(args.threads)
    if args.plot:
        _check_plot_path(args.plot)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = bench(args.model, shape=args.shape, batches=args.batch or [1],
                   prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                   repeats=args.repeats, engines=args.engine, compile=args.compile,
                   progress=lambda what: print(f"running {what}", file=sys.stderr))
    if args.plot:
        plot_report(report, args.plot)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0

    print(f"{report.model}: prompt {report.prompt_len}, {report.new_tokens} new tokens, "
          f"median of {report.repeats}, {report.threads} threads; this machine reads "
          f"{report.bandwidth_bytes_per_s / 1e9:.1f} GB/s")
    print(f"{'engine':<24}{'batch':>6}{'TTFT ms':>10}{'prefill tok/s':>15}"
          f"{'decode tok/s':>14}{'KV bytes':>14}{'warm-up s':>11}")
    for r in report.runs:
        kv = "" if r.kv_cache_bytes is None else str(r.kv_cache_bytes)
        print(f"{r.engine:<24}{r.batch:>6}{r.ttft_s * 1e3:>10.1f}"
              f"{r.prefill_tokens_per_s:>15.1f}{r.decode_tokens_per_s:>14.1f}{kv:>14}"
              f"{r.warmup_s:>11.2f}")
    for p, ratios in zip(report.predictions, report.ratios()):
        print(f"batch {p.batch}: planner KV bytes {p.kv_cache_bytes}, decode step lower bound "
              f"{p.decode_step_lower_bound_s * 1e3:.3f} ms")
        for name, value in ratios.items():
            if name != "batch":
                print(f"  {name}: {value:.2f}")
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _convert(args) -> int:
    from .convert import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.out_dir, tokenizer=args.tokenizer,
                          overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _plan(args) -> int:
    from .planner import plan, plot_plan

    p = plan(args.model, preset=args.preset, batch=args.batch, prompt_len=args.prompt_len,
             new_tokens=args.new_tokens, dtype=args.dtype, kv_dtype=args.kv_dtype,
             memory=args.memory, hardware=args.hardware, measure=args.measure, tp=args.tp,
             block_size=args.block_size)
    if args.plot:
        _check_plot_path(args.plot)
        print(f"wrote {plot_plan(p, args.plot)}", file=sys.stderr)
    print(p.to_json() if args.json else "\n".join(_plan_lines(p)))
    return 0


def _plan_lines(p) -> list[str]:
    a, w, c, m, f, t = p.arch, p.workload, p.params, p.memory, p.flops, p.traffic
    s, n = w.prompt_len, w.new_tokens
    biases = [name for name, on in (("qkv", a.qkv_bias), ("out", a.out_bias),
                                    ("mlp", a.mlp_bias)) if on]
    published = f"; published as {_count(p.published_params)}" if p.published_params else ""
    window = f", window {a.sliding_window:,}" if a.sliding_window else ""
    capped = (", at most the window" if a.sliding_window else "") \
        + (", in whole blocks" if w.block_size else "")
    lines = [
        f"model      {p.model}" + (f" ({p.source})" if p.source else ""),
        f"shape      {a.n_layers} layers, dim {a.dim:,}, {a.n_heads} heads of {a.head_dim} "
        f"({a.n_kv_heads} KV heads), MLP {a.hidden_dim:,} ({'gated' if a.gated_mlp else 'plain'})",
        f"           vocab {a.vocab_size:,}, context {a.max_context:,}{window}, "
        f"{'LayerNorm' if a.norm == 'layer' else 'RMSNorm'}, "
        f"{'learned' if a.learned_positions else 'rotary'} positions",
        f"           biases: {' '.join(biases) or 'none'}, "
        f"{'tied' if a.tied else 'untied'} embeddings",
        f"workload   batch {w.batch}, prompt {s:,}, new tokens {n:,}; weights {w.dtype}, "
        f"cache {w.kv_dtype}" + (f", blocks of {w.block_size}" if w.block_size else ""),
        "", "parameters"]
    for name in ("token_embedding", "position_embedding", "attention", "mlp", "norms",
                 "output_head"):
        lines.append(f"  {name.replace('_', ' '):22}{getattr(c, name):>18,}")
    lines += [f"  {'total':22}{c.total:>18,}  ({_count(c.total)}{published})", "", "memory",
              f"  {'weights':22}{_si(m.weight_bytes, 'B'):>12}  ({m.weight_bytes:,} bytes)",
              f"  {'KV cache per token':22}{_si(m.kv_bytes_per_token, 'B'):>12}",
              f"  {'KV cache per sequence':22}{_si(m.kv_bytes_per_sequence, 'B'):>12}  "
              f"({m.cache_tokens:,} tokens: prompt + new{capped})",
              f"  {'KV cache, batch':22}{_si(m.kv_bytes, 'B'):>12}  ({m.kv_bytes:,} bytes), "
              f"{m.cache_to_weights:.3g} x the weights",
              f"  {'kvgen engine allocates':22}{_si(m.engine_kv_bytes, 'B'):>12}  "
              f"({m.engine_cache_tokens:,} slots per sequence: the last token is never fed "
              f"back)",
              "", "FLOPs (2 per multiply-add: matrix products, causal attention; logits for the "
              "last position)",
              f"  {'prefill':22}{_si(f.prefill, 'FLOP'):>12}  "
              f"(attention {_si(f.prefill_attention, 'FLOP')})",
              f"  {'decode step':22}{_si(f.decode_first, 'FLOP'):>12}  at position {s:,}, "
              f"{_si(f.decode_last, 'FLOP')} at {s + n - 2:,}" if n > 1 else
              f"  {'decode step':22}{'none':>12}  (the prefill yields the only new token)",
              f"  {f'{n} tokens, cached':22}{_si(f.cached_total, 'FLOP'):>12}  "
              f"(prefill, then {n - 1:,} decode steps)",
              f"  {f'{n} tokens, uncached':22}{_si(f.uncached_total, 'FLOP'):>12}  "
              f"(a full forward per token): {f.uncached_over_cached:.4g} x cached",
              "", "bytes moved per device (weights once, cached keys and values once)",
              f"  {'prefill':22}{_si(t.prefill_bytes, 'B'):>12}  "
              f"{t.prefill_intensity:,.1f} FLOP/byte",
              f"  {'last decode step':22}{_si(t.decode_last_bytes, 'B'):>12}  "
              f"{t.decode_last_intensity:,.1f} FLOP/byte"]
    if p.bounds:
        b = p.bounds
        lines += ["", f"time lower bounds on {b.hardware} per device ({_si(b.peak_flops, 'FLOP/s')}"
                  f", {_si(b.bandwidth, 'B/s')}; {b.source})",
                  f"  {'prefill':22}{_seconds(b.prefill_s):>12}",
                  f"  {'last decode step':22}{_seconds(b.decode_last_step_s):>12}  "
                  f"{b.decode_bound_by + '-bound ' if n > 1 else ''}(ridge "
                  f"{b.ridge_intensity:,.0f} FLOP/byte)",
                  f"  {f'{n - 1} decode steps':22}{_seconds(b.decode_s):>12}",
                  f"  {f'all {n} tokens':22}{_seconds(b.total_s):>12}",
                  f"  {f'{n} tokens, uncached':22}{_seconds(b.uncached_s):>12}  "
                  f"{b.uncached_over_cached_s:.4g} x cached"]
    tp = p.tensor_parallel
    if tp.devices > 1:
        lines += ["", f"tensor parallel over {tp.devices} devices",
                  f"  {'KV heads per device':22}{tp.kv_heads_per_device:>12}",
                  f"  {'weights per device':22}{_si(tp.weight_bytes_per_device, 'B'):>12}",
                  f"  {'KV cache per device':22}{_si(tp.kv_bytes_per_device, 'B'):>12}"]
    if p.fit:
        x = p.fit
        context = f"{'any':>12}  (the window caps the cache)" if x.max_context is None \
            else f"{x.max_context:>12,}  tokens at batch {w.batch}"
        lines += ["", f"memory budget {_si(x.memory_bytes, 'B')} per device "
                  "(weights and cache only)",
                  f"  {'fits':22}{'yes' if x.fits else 'no':>12}",
                  f"  {'largest batch':22}{x.max_batch:>12,}  at {m.cache_tokens:,} tokens each",
                  f"  {'longest context':22}{context}",
                  f"  {'fewest devices (tp)':22}{tp.smallest_fitting_devices or 'none':>12}"]
    return lines + (["", "notes"] + [f"  {note}" for note in p.notes] if p.notes else [])


def _si(x: float, unit: str) -> str:
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6),
                          ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {prefix}{unit}"
    return f"{x:.4g} {unit}".rstrip()


def _count(x: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:g}"


def _seconds(x: float) -> str:
    return f"{x:.4g} s" if x >= 1 else f"{x * 1e3:.4g} ms" if x >= 1e-3 else f"{x * 1e6:.4g} us"


def _params(args) -> int:
    from .presets import table3
    from .transformer_params import encdec_params

    rows = table3(vocab_size=args.vocab, bias=not args.no_bias)
    if args.preset is not None:
        rows = [r for r in rows if r.name == args.preset]
        if not rows:
            raise KvgenError(f"unknown Table 3 row {args.preset!r}; known rows: "
                             f"{', '.join(r.name for r in table3())}")
    print(f"Transformer parameters (Vaswani et al. 2017, arXiv:1706.03762, Table 3), "
          f"vocabulary {args.vocab:,}, {'no linear biases' if args.no_bias else 'with biases'}")
    print(f"{'row':5} {'change':34} {'N':>2} {'d_model':>7} {'d_ff':>5} {'h':>3} {'d_k':>4} "
          f"{'d_v':>4} {'kvgen':>12} {'paper':>6} {'delta':>7}")
    for r in rows:
        x, count = r.model, encdec_params(r.model).total
        paper = f"{r.paper_millions}M" if r.paper_millions else "-"
        delta = f"{100 * (count / (r.paper_millions * 1e6) - 1):+.1f}%" \
            if r.paper_millions else ""
        print(f"{r.name:5} {r.change:34} {x.n_layers:>2} {x.d_model:>7} {x.d_ff:>5} "
              f"{x.n_heads:>3} {x.d_k:>4} {x.d_v:>4} {count:>12,} {paper:>6} {delta:>7}".rstrip())
    # The vocabulary at which each row would match the paper exactly: they disagree.
    implied = sorted((round((r.paper_millions * 1e6 - encdec_params(r.model).total
                             + encdec_params(r.model).embedding) / r.model.d_model), r.name)
                     for r in rows if r.paper_millions)
    if len(implied) > 1:
        print(f"\nthe vocabulary at which a row matches the paper's (rounded) figure runs from "
              f"{implied[0][0]:,} ({implied[0][1]}) to {implied[-1][0]:,} ({implied[-1][1]}):"
              f"\n  no one vocabulary size reproduces every row")
    first = encdec_params(rows[0].model)
    print(f"\nper layer ({rows[0].name}): encoder {first.encoder_layer:,}, decoder "
          f"{first.decoder_layer:,}; shared embedding {first.embedding:,}")
    print("assumptions: one vocabulary shared by source and target embeddings and the output "
          "projection;\n  a bias on every linear layer but the tied output projection (none "
          "with --no-bias);\n  LayerNorm weight and bias: two per encoder layer, three per "
          "decoder layer;\n  sinusoidal positions have no parameters (row E's learned ones "
          "are not counted);\n  the paper gives no count for rows A, D and E.")
    if args.no_bias:
        print("note: the widely copied 4,198,400 per decoder layer of the base model counts the "
              "decoder's third\n  LayerNorm twice (4,197,376 + 1,024).")
    return 0
