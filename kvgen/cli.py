"""The `kvgen` command line: generate and convert.

Generated text goes to stdout; the stats line, logs and errors go to stderr.
"""

import argparse
import logging
import sys

from . import __version__
from .errors import KvgenError


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
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text; repeat for a batch")
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
    gen.set_defaults(run=_generate)

    conv = commands.add_parser("convert",
                               help="write a llama2.c checkpoint as a Hugging Face directory")
    conv.add_argument("checkpoint", help="llama2.c checkpoint (.bin)")
    conv.add_argument("out_dir", help="output directory")
    conv.add_argument("--tokenizer", help="llama2.c tokenizer .bin to export as tokenizer.json")
    conv.add_argument("--overwrite", action="store_true", help="replace files in out_dir")
    conv.set_defaults(run=_convert)
    return parser


def _generate(args) -> int:
    from .llm import load

    llm = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer,
               download=args.download)
    options = dict(max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop=args.stop)

    if len(args.prompt) == 1:
        sys.stdout.write(args.prompt[0])
        for piece in llm.stream(args.prompt[0], **options):
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


def _convert(args) -> int:
    from .convert import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.out_dir, tokenizer=args.tokenizer,
                          overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
