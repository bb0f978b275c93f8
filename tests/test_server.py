"""kvgen serve: the official openai client against a server on 127.0.0.1, answers equal to the
library's, errors in OpenAI's shape, and 32 concurrent streams with disconnects leaking nothing."""

import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import kvgen
from kvgen.llm import DEFAULT_MODEL
from kvgen.server import create_app
from kvgen.server.chat_template import find_chat_template

from conftest import STORIES, require_stories

KEY = "test-key"
MODEL = "tiny"
MAX_BODY = 64 * 1024
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


class Server:
    """A uvicorn server for app on a daemon thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free one
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", ws="none", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the test server did not answer /health within 30 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The bundled model, copied with a chat template added to its tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("chat") / "tiny"
    shutil.copytree(DEFAULT_MODEL, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {
        "chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def server(chat_model):
    app = create_app(kvgen.load(chat_model), model_name=MODEL, api_key=KEY,
                     max_body_bytes=MAX_BODY)
    with Server(app) as s:
        yield s


@pytest.fixture(scope="module")
def ref(chat_model):
    """A second copy of the model, for the library's own answers."""
    return kvgen.load(chat_model)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _usage(u) -> tuple:
    return u.prompt_tokens, u.completion_tokens, u.total_tokens


def test_completions_equal_the_library_streamed_or_not(client, ref):
    want = ref.generate("ROMEO:", max_new_tokens=24, temperature=0)[0]
    got = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert _usage(got.usage) == (len(want.prompt_token_ids), len(want.token_ids),
                                 len(want.prompt_token_ids) + len(want.token_ids))

    chunks = list(client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and _usage(chunks[-1].usage) == _usage(got.usage)


def test_chat_equals_the_library_streamed_or_not(client, ref, chat_model):
    messages = [{"role": "system", "content": "Speak as in a play."},
                {"role": "user", "content": "Who is there?"}]
    prompt = ref.tokenizer.encode(find_chat_template(chat_model).render(messages), False)
    want = ref.generate([prompt], max_new_tokens=20, temperature=0)[0]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                         temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert _usage(got.usage) == (len(prompt), len(want.token_ids),
                                 len(prompt) + len(want.token_ids))

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert _usage(chunks[-1].usage) == _usage(got.usage)


def test_n_seed_stop_and_echo(client, ref):
    got = client.completions.create(model=MODEL, prompt="KING:", n=3, temperature=1, seed=5,
                                    max_tokens=12)
    want = [ref.generate("KING:", max_new_tokens=12, temperature=1, seed=5 + j)[0]
            for j in range(3)]  # choice j is seeded with seed + j
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [w.text for w in want]
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want)

    greedy = ref.generate("ROMEO:", max_new_tokens=24, temperature=0)[0].text
    stop = greedy.split()[3]
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=24,
                                        temperature=0, stop=[stop, "zzz"], echo=True,
                                        stream=stream)
        chunks = list(out) if stream else [out]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == "ROMEO:" + greedy[:greedy.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_models_before_sampling(client, ref):
    got = client.completions.create(model=MODEL, prompt="JULIET:", max_tokens=8, logprobs=3,
                                    temperature=0.7, seed=3)
    want = ref.generate("JULIET:", max_new_tokens=8, temperature=0.7, seed=3,
                        return_logits=True)[0]
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == got.usage.completion_tokens == len(want.token_ids)
    assert "".join(lp.tokens) == got.choices[0].text == want.text
    model_logprobs = torch.log_softmax(want.logits, -1)  # temperature 0.7 not applied
    for i, token_id in enumerate(want.token_ids):
        assert math.isclose(lp.token_logprobs[i], model_logprobs[i, token_id], abs_tol=1e-4)
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert len(top) <= 3 and math.isclose(top[0], model_logprobs[i].max(), abs_tol=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                          "content": "Hi"}], max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
               for t in content)  # greedy: the pick is the most likely token


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    m = server.metrics()
    assert m["kvgen_kv_blocks_total"] > 0 and m["kvgen_prompt_tokens_total"] > 0
    assert m["kvgen_time_to_first_token_seconds_count"] > 0
    assert "kvgen_inter_token_latency_seconds_count" in m and "kvgen_preemptions_total" in m
    assert 0 <= m["kvgen_prefix_cache_hit_rate"] <= 1


GOOD = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2}
BAD = [  # (path, body, status, param)
    ("completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("completions", b'{"prompt": "a", "temperature": NaN}', 400, None),
    ("completions", b'[1, 2]', 400, None),
    ("completions", GOOD | {"max_tokens": "5"}, 400, "max_tokens"),
    ("completions", GOOD | {"temperature": "hot"}, 400, "temperature"),
    ("completions", GOOD | {"prompt": 5}, 400, "prompt"),
    ("completions", GOOD | {"stream": "yes"}, 400, "stream"),
    ("completions", GOOD | {"stop": [""]}, 400, "stop"),
    ("completions", GOOD | {"max_tokens": 0}, 400, "max_tokens"),
    ("completions", GOOD | {"max_tokens": -3}, 400, "max_tokens"),
    ("completions", GOOD | {"temperature": -0.5}, 400, "temperature"),
    ("completions", GOOD | {"top_p": 0}, 400, "top_p"),
    ("completions", GOOD | {"top_p": 1.5}, 400, "top_p"),
    ("completions", GOOD | {"n": 0}, 400, "n"),
    ("completions", GOOD | {"logprobs": 2, "echo": True}, 400, "echo"),
    ("completions", GOOD | {"prompt": [5, 99999]}, 400, "prompt"),
    ("completions", GOOD | {"prompt": "\ud800"}, 400, "prompt"),
    ("completions", GOOD | {"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("completions", GOOD | {"model": "gpt-4"}, 404, "model"),
    ("completions", GOOD | {"prompt": "ROMEO: " * 300}, 400, "prompt"),
    ("completions", GOOD | {"max_tokens": 300}, 400, "max_tokens"),
    ("completions", GOOD | {"prompt": "x" * (MAX_BODY + 10)}, 413, None),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400,
     "messages[0].content"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
     400, "messages[0].role"),
    ("nowhere", GOOD, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, path, body, status,
                                                                param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/{path}", content=content, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and "Traceback" not in r.text
    if param is not None and status == 400:
        assert param.split("[")[0] in error["message"]  # the message names the parameter
    good = httpx.post(f"{server.url}/v1/completions", json=GOOD, headers=headers)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for r in (httpx.get(server.url + "/v1/models", headers=headers),
                  httpx.post(server.url + "/v1/completions", json=GOOD, headers=headers)):
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="a", max_tokens=1)
    right = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert right.status_code == 200


def test_32_streams_a_quarter_disconnecting(server, ref):
    prompts = ["ROMEO:", "JULIET:", "KING:", "First Citizen:", "MERCUTIO:", "Nurse:",
               "HAMLET:", "LADY CAPULET:"]
    want = {p: ref.generate(p, max_new_tokens=40, temperature=0)[0].text for p in prompts}
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                                timeout=120)
    before = server.metrics()["kvgen_generation_tokens_total"]

    async def one(i):
        prompt, leaves = prompts[i % len(prompts)], i % 4 == 3
        # Those that leave ask for 200 tokens, so a missed abort would show in the counts.
        stream = await client.completions.create(model=MODEL, prompt=prompt, temperature=0,
                                                 max_tokens=200 if leaves else 40, stream=True)
        text, chunks = "", 0
        async for chunk in stream:
            text += chunk.choices[0].text
            chunks += 1
            if leaves and chunks == 3:
                await stream.close()
                return None
        return prompt, text

    async def run_all():
        results = await asyncio.gather(*(one(i) for i in range(32)))
        await client.close()
        return results

    results = asyncio.run(run_all())
    finished = [r for r in results if r is not None]
    assert len(finished) == 24
    for prompt, text in finished:
        assert text == want[prompt], prompt

    deadline = time.monotonic() + 5
    while True:
        m = server.metrics()
        if m["kvgen_requests_running"] == m["kvgen_kv_blocks_used"] == 0 or \
                time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert m["kvgen_requests_running"] == 0 and m["kvgen_requests_waiting"] == 0
    assert m["kvgen_kv_blocks_used"] == 0
    # 24 x 40 tokens, plus a few for each of the 8 that left, not their 200.
    generated = m["kvgen_generation_tokens_total"] - before
    assert 24 * 40 <= generated < 24 * 40 + 8 * 100


@pytest.fixture(scope="module")
def stories_server():
    require_stories()
    with Server(create_app(kvgen.load(STORIES / "stories260K.bin"))) as s:
        yield s


def test_llama2c_model_completions_and_no_chat_template(stories_server):
    client = openai.OpenAI(base_url=stories_server.url + "/v1", api_key="none", max_retries=0)
    assert client.models.list().data[0].id == "stories260K"
    got = client.completions.create(model="stories260K", prompt="Once upon a time",
                                    max_tokens=30, temperature=0, logprobs=1)
    assert "".join(got.choices[0].logprobs.tokens) == got.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="stories260K",
                                       messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.message and e.value.code == "no_chat_template"


def test_kvgen_serve_command(tmp_path):
    """The CLI end to end: `kvgen serve` in a subprocess, named after the model's folder, with
    the key from KVGEN_API_KEY."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, KVGEN_API_KEY=KEY)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "kvgen", "serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        headers = {"Authorization": f"Bearer {KEY}"}
        models = httpx.get(url + "/v1/models", headers=headers).json()
        assert [m["id"] for m in models["data"]] == ["tiny-shakespeare"]
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
    assert "serving" in (tmp_path / "serve.log").read_text()


def test_kvgen_serve_on_a_taken_port_is_one_clear_error(capsys):
    from kvgen.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port)])
    err = capsys.readouterr().err
    assert code != 0
    assert f"cannot listen on 127.0.0.1:{port}" in err and "serving" not in err


def test_engine_loop_survives_a_failed_step_and_a_cancelled_add(ref):
    from kvgen.server.engine_loop import EngineFailed, EngineLoop

    engine = kvgen.Engine(ref)
    real_step, calls = engine.step, []

    def step():  # the first step fails; every step is slow enough to cancel an add meanwhile
        calls.append(1)
        time.sleep(0.01)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real_step()

    engine.step = step
    loop = EngineLoop(engine)
    options = dict(max_new_tokens=30, temperature=0)

    async def run():
        failed, ok = asyncio.Queue(), asyncio.Queue()
        await loop.add([("a", [0, 5, 6], options)], failed)
        assert isinstance(await failed.get(), EngineFailed)
        await loop.add([("b", [0, 5, 6], options)], ok)
        cancelled = asyncio.ensure_future(loop.add([("c", [0, 7], options)], asyncio.Queue()))
        await asyncio.sleep(0)
        cancelled.cancel()
        outs = [await ok.get()]
        while not outs[-1].finished:
            outs.append(await ok.get())
        return outs

    loop.start()
    try:
        outs = asyncio.run(run())
        assert loop.alive and sum(len(o.token_ids) for o in outs) == 30
        deadline = time.monotonic() + 5
        while loop.stats.running and time.monotonic() < deadline:
            time.sleep(0.01)  # "c" runs to its end if it was added before the cancel
        assert loop.stats.used_blocks == 0 and loop.stats.running == loop.stats.waiting == 0
    finally:
        loop.stop()
    assert not loop.alive
