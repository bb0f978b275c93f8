"""Load test for `kvgen serve`: N concurrent streaming clients, each sending requests back to back.

    python benchmarks/load_server.py                      # starts the bundled model on 127.0.0.1
    python benchmarks/load_server.py --model ../shared/models/stories260K --clients 32
    python benchmarks/load_server.py --url http://127.0.0.1:8000 --model-name NAME --api-key K

Reports requests/s, output tokens/s, and p50/p99 of time to first token (request sent to first
text) and inter-token latency (between successive text chunks of one stream; a token whose text
is held back, half a character or a possible stop string, arrives with the next one). Output
tokens are the server's own counts (stream_options.include_usage). Greedy requests with a fixed
max_tokens, so every run asks for the same work.
"""

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time

import httpx

PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY:", "Once upon a time",
           "The little dog", "MERCUTIO:", "Lily and Tom"]


def main() -> int:
    args = _parser().parse_args()
    if args.url:
        return asyncio.run(_report(args, args.url.rstrip("/"), args.model_name))
    server, url, name = _start_server(args)
    try:
        return asyncio.run(_report(args, url, name))
    finally:
        server.should_exit = True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (default: start one here)")
    p.add_argument("--model", help="model to serve when starting one (default: the bundled)")
    p.add_argument("--model-name", help="the model's name on --url (default: its first)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--clients", type=int, default=16, help="concurrent streams")
    p.add_argument("--requests", type=int, default=64, help="requests in all")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _start_server(args):
    """Return (uvicorn server, url, model name) for a server on a free port of 127.0.0.1."""
    import torch
    import uvicorn

    import kvgen
    from kvgen.server import create_app

    torch.set_num_threads(1)  # tiny models: see kvgen.cli._set_threads
    app = create_app(kvgen.load(args.model))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while not server.started:
        time.sleep(0.05)
    return server, url, app.state.kvgen.model_name


async def _report(args, url: str, name: str | None) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"}
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=600) as http:
        if name is None:
            name = (await http.get("/v1/models")).json()["data"][0]["id"]
        todo = list(range(args.requests))
        ttft, itl, tokens = [], [], 0

        async def client():
            nonlocal tokens
            while todo:
                i = todo.pop()
                first, gaps, used = await _one(http, name, PROMPTS[i % len(PROMPTS)],
                                               args.max_tokens)
                ttft.append(first)
                itl.extend(gaps)
                tokens += used

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        seconds = time.perf_counter() - start
    report = {"url": url, "model": name, "clients": args.clients, "requests": args.requests,
              "max_tokens": args.max_tokens, "seconds": seconds,
              "requests_per_s": args.requests / seconds, "output_tokens_per_s": tokens / seconds,
              "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
              "itl_p50_ms": _pct(itl, 50), "itl_p99_ms": _pct(itl, 99)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{name} at {url}: {args.requests} requests, {args.clients} clients, max_tokens "
              f"{args.max_tokens}, {seconds:.2f} s")
        print(f"  {report['requests_per_s']:.2f} requests/s, "
              f"{report['output_tokens_per_s']:.1f} output tokens/s")
        print(f"  time to first token p50 {report['ttft_p50_ms']:.1f} ms, "
              f"p99 {report['ttft_p99_ms']:.1f} ms")
        print(f"  inter-token latency p50 {report['itl_p50_ms']:.1f} ms, "
              f"p99 {report['itl_p99_ms']:.1f} ms")
    return 0


async def _one(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int):
    """Return (seconds to first text, seconds between text chunks, output tokens) of one
    streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = last = time.perf_counter()
    first, gaps, used = None, [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"server answered {r.status_code}: {(await r.aread())[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                used = event["usage"]["completion_tokens"]
            if not any(c["text"] for c in event.get("choices", [])):
                continue
            now = time.perf_counter()
            if first is None:
                first = now - sent
            else:
                gaps.append(now - last)
            last = now
    return first if first is not None else time.perf_counter() - sent, gaps, used


def _pct(values: list[float], p: int) -> float:
    """Return the p-th percentile of values, in milliseconds (0 for none)."""
    if len(values) < 2:
        return values[0] * 1e3 if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1e3


if __name__ == "__main__":
    sys.exit(main())
